//! Compute backends. `cpu` is the f32 reference every other backend is checked
//! against; `cuda` holds the GPU runtime and the launch code of `cuda/*.cu`.
//! Each kernel family has the same name in `cuda/*.cu`, in `cpu/` and in the
//! launch code, so `grep rope` finds all of them.
//!
//! [`Backend`] (`ops.rs`) is the one interface the layers above use: the autograd tape, the
//! model and the trainer are written once over it, and `cpu::ops::CpuOps` and
//! `cuda::ops::CudaOps` implement it. The shape types of the kernel families are re-exported
//! here, so nothing above the kernel layer names `backend::cpu` or `backend::cuda`.

pub mod cpu;
pub mod cuda;
pub mod ops;

pub use cpu::attention::AttnDims;
pub use cpu::decode::{CacheKind, LayerCache};
pub use cpu::dsa::DsaDims;
pub use cpu::math;
pub use cpu::mla_decode::{AbsorbDims, AbsorbSide, LatentDims};
pub use cpu::moe::{update_bias, MoeCache, RouterConfig, Routing, ScoreFunc};
pub use cpu::ops::CpuOps;
pub use cpu::optim::AdamWStep;
pub use cpu::window_attention::WindowDims;
pub use cuda::nccl::{collectives as nccl_collectives, NcclComm};
pub use cuda::ops::{check_cuda_shapes, CudaOps};
pub use ops::{Backend, RopeKind, StateBuf, UpdateSlot};
