//! The CPU backend: one module per kernel family, f32, rayon-parallel and
//! deterministic (no floating-point reduction depends on thread scheduling).
//! Functions take plain slices plus explicit dimensions; shapes are checked
//! with assertions because a mismatch here is a bug in the caller.

pub mod attention;
pub(crate) mod blocks;
pub mod decode;
pub mod dsa;
pub mod elementwise;
pub mod embedding;
pub(crate) mod flash;
pub(crate) mod flash_gather;
pub mod gemm;
pub mod gemm_rows;
pub mod loss;
pub mod math;
pub mod mla_decode;
pub mod moe;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod rope;
pub mod swiglu;
pub mod window_attention;

/// Rows per rayon task for row-wise kernels: enough work per task to amortize scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}
