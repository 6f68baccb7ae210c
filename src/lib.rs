//! nanoseek: train DeepSeek-V3.2-style language models end to end.
//!
//! Layers, bottom up: `backend` (kernels: `cpu` reference, `cuda`), `tensor`,
//! `kernels` (the drop-in kernel API), `autograd` (the tape), `nn` (the model),
//! `optim`, `data`, `train`, `generate`. The `nanoseek` binary is a thin CLI over these.

pub mod autograd;
pub mod backend;
pub mod bench;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod info;
pub mod kernels;
pub mod memory;
pub mod nn;
pub mod optim;
pub mod profile;
pub mod report;
pub mod rng;
pub mod selftest;
pub mod speculative;
pub mod tensor;
pub mod train;

pub use tensor::Tensor;
