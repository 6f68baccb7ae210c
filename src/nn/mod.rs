//! The model: configuration, parameters and the forward pass on the tape.

pub mod config;
pub mod decode;
mod ffn;
pub mod indexer;
pub mod mla;
mod mla_decode;
pub mod model;
pub mod mtp;
pub mod overrides;
mod params;

pub use config::{AttnKind, ModelConfig, MoeConfig};
pub use model::{Model, Param, ParamKind};
pub use overrides::ConfigOverrides;
