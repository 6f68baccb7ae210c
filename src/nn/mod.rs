//! The model: configuration, parameters and the forward pass on the tape.

pub mod config;
pub mod model;

pub use config::{AttnKind, ConfigOverrides, ModelConfig};
pub use model::{Model, Param, ParamKind};
