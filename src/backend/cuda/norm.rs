//! Launch code of `cuda/norm.cu` (twin: `cpu::norm`): parameter-free RMSNorm, eps = `RMS_EPS`,
//! and the affine LayerNorm, eps = `LN_EPS`.

use super::abi::{NsLayerNormParams, NsNormParams};
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use crate::backend::cpu::norm::{LN_EPS, RMS_EPS};
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

fn ln_params(rows: usize, dim: usize) -> CudaResult<NsLayerNormParams> {
    check(dim % 8 == 0 && dim > 0, || format!("layernorm: dim {dim} must be a positive multiple of 8 on CUDA"))?;
    Ok(NsLayerNormParams { rows: int(rows, "rows")?, dim: int(dim, "dim")?, eps: LN_EPS, ..Default::default() })
}

/// x, y: [rows, dim] bf16; (gamma, beta): [dim] bf16; stats: [rows, 2] f32 = (mean, 1/std).
pub fn layernorm_forward(
    be: &CudaBackend,
    x: &DeviceBuffer<bf16>,
    (gamma, beta): (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
    dim: usize,
    y: &DeviceBuffer<bf16>,
    stats: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let rows = x.len() / dim.max(1);
    let mut p = ln_params(rows, dim)?;
    check(
        x.len() == rows * dim
            && y.len() == x.len()
            && stats.len() == 2 * rows
            && gamma.len() == dim
            && beta.len() == dim,
        || "layernorm_forward: bad sizes".into(),
    )?;
    (p.x, p.gamma, p.beta, p.y, p.stats) = (x.ptr(), gamma.ptr(), beta.ptr(), y.ptr(), stats.ptr());
    if rows == 0 {
        return Ok(());
    }
    be.launch("norm", "layernorm_fwd_bf16", (rows as u32, 1, 1), 256, 0, &p)
}

/// dx [rows, dim] (one block per row), then dgamma, dbeta [dim] (one thread per column), from
/// x, the forward's stats, gamma and dy.
pub fn layernorm_backward(
    be: &CudaBackend,
    (x, stats, gamma, dy): (&DeviceBuffer<bf16>, &DeviceBuffer<f32>, &DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
    dim: usize,
    dx: &DeviceBuffer<bf16>,
    (dgamma, dbeta): (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
) -> CudaResult<()> {
    let rows = x.len() / dim.max(1);
    let mut p = ln_params(rows, dim)?;
    let sizes = dy.len() == x.len() && dx.len() == x.len() && stats.len() == 2 * rows && gamma.len() == dim;
    check(sizes && dgamma.len() == dim && dbeta.len() == dim, || "layernorm_backward: bad sizes".into())?;
    (p.x, p.stats, p.gamma, p.dy, p.dx) = (x.ptr(), stats.ptr(), gamma.ptr(), dy.ptr(), dx.ptr());
    (p.dgamma, p.dbeta) = (dgamma.ptr(), dbeta.ptr());
    if rows > 0 {
        be.launch("norm", "layernorm_bwd_dx_bf16", (rows as u32, 1, 1), 256, 0, &p)?;
    }
    be.launch("norm", "layernorm_bwd_params_bf16", (dim.div_ceil(256) as u32, 1, 1), 256, 0, &p)
}
