//! Launch code of `cuda/norm.cu` (twin: `cpu::norm`): parameter-free RMSNorm, eps = `RMS_EPS`.

use super::abi::NsNormParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use crate::backend::cpu::norm::RMS_EPS;
use half::bf16;

fn params(rows: usize, dim: usize) -> CudaResult<NsNormParams> {
    check(dim % 8 == 0 && dim > 0, || format!("rmsnorm: dim {dim} must be a positive multiple of 8 on CUDA"))?;
    Ok(NsNormParams { rows: int(rows, "rows")?, dim: int(dim, "dim")?, eps: RMS_EPS, ..Default::default() })
}

/// x, y: [rows, dim] bf16; rstd: [rows] f32 (saved for the backward).
pub fn rmsnorm_forward(
    be: &CudaBackend,
    x: &DeviceBuffer<bf16>,
    dim: usize,
    y: &DeviceBuffer<bf16>,
    rstd: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let rows = x.len() / dim.max(1);
    let mut p = params(rows, dim)?;
    check(x.len() == rows * dim && y.len() == x.len() && rstd.len() == rows, || "rmsnorm_forward: bad sizes".into())?;
    (p.x, p.y, p.rstd) = (x.ptr(), y.ptr(), rstd.ptr());
    if rows == 0 {
        return Ok(());
    }
    be.launch("norm", "rmsnorm_fwd_bf16", (rows as u32, 1, 1), 256, 0, &p)
}

/// dx = r · (dy − y · mean(dy ∘ y)), from x and the forward's rstd.
pub fn rmsnorm_backward(
    be: &CudaBackend,
    x: &DeviceBuffer<bf16>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<bf16>,
    dim: usize,
    dx: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let rows = x.len() / dim.max(1);
    let mut p = params(rows, dim)?;
    check(dy.len() == x.len() && dx.len() == x.len() && rstd.len() == rows, || "rmsnorm_backward: bad sizes".into())?;
    (p.x, p.rstd, p.dy, p.dx) = (x.ptr(), rstd.ptr(), dy.ptr(), dx.ptr());
    if rows == 0 {
        return Ok(());
    }
    be.launch("norm", "rmsnorm_bwd_bf16", (rows as u32, 1, 1), 256, 0, &p)
}
