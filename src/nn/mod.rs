//! The model: configuration, parameters and the forward pass on the tape.

pub mod config;
pub mod decode;
pub mod model;

pub use config::{AttnKind, ConfigOverrides, ModelConfig, MoeConfig};
pub use model::{Model, Param, ParamKind};
