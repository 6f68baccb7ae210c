//! Speculative decoding with the model's multi-token-prediction (MTP) modules as the draft
//! model: [`sampling`] accepts or rejects drafts so that the output is distributed exactly as
//! the main model's.

pub mod sampling;
