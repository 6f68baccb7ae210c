//! Launch code of `cuda/attention.cu` (twin: `cpu::attention`): dense causal flash
//! attention, head dims 64 and 128, grouped-query, scale 1/√d.

use super::abi::NsAttnParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
pub use crate::backend::cpu::attention::AttnDims;
use half::bf16;

/// Dynamic shared memory of the backward kernels (mirrors `bwd_smem` in flash.cuh; the
/// window_attention family uses the same bodies).
pub(crate) fn bwd_smem(d: usize) -> u32 {
    let bq = if d == 64 { 64 } else { 16 };
    ((2 * 64 * (d + 8) + 2 * bq * (d + 8) + 64 * (bq + 8)) * 2 + 8 * bq) as u32
}

fn params(dims: &AttnDims) -> CudaResult<NsAttnParams> {
    check(dims.d == 64 || dims.d == 128, || format!("attention: head dim {} (CUDA has 64 and 128)", dims.d))?;
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || format!("attention: h must be a multiple of h_kv ({dims:?})"))?;
    Ok(NsAttnParams {
        b: int(dims.b, "b")?,
        t: int(dims.t, "t")?,
        h: int(dims.h, "h")?,
        h_kv: int(dims.h_kv, "h_kv")?,
        d: int(dims.d, "d")?,
        scale: 1.0 / (dims.d as f32).sqrt(),
        ..Default::default()
    })
}

/// out (bf16 [b,t,h,d]) and lse (f32 [b,h,t], natural log of the scaled scores).
pub fn attention_forward(
    be: &CudaBackend,
    dims: &AttnDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let mut p = params(dims)?;
    check(q.len() == dims.q_len() && out.len() == dims.q_len(), || "attention: q/out must be [b,t,h,d]".into())?;
    check(k.len() == dims.kv_len() && v.len() == dims.kv_len(), || "attention: k/v must be [b,t,h_kv,d]".into())?;
    check(lse.len() == dims.lse_len(), || "attention: lse must be [b,h,t]".into())?;
    (p.q, p.k, p.v, p.out, p.lse) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    let name = if dims.d == 64 { "attn_fwd_d64" } else { "attn_fwd_d128" };
    be.launch("attention", name, ((dims.t as u32).div_ceil(64), (dims.b * dims.h) as u32, 1), 128, 0, &p)
}

/// Gradients in f32 (dq [b,t,h,d], dk and dv [b,t,h_kv,d]; overwritten, not accumulated),
/// from q, k, v, out, lse and dout. Cast them to bf16 with `optim::cast_f32_bf16` when needed.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    be: &CudaBackend,
    dims: &AttnDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let mut p = params(dims)?;
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    check(q.len() == ql && out.len() == ql && dout.len() == ql && dq.len() == ql, || {
        "attention_backward: q/out/dout/dq must be [b,t,h,d]".into()
    })?;
    check(k.len() == kl && v.len() == kl && dk.len() == kl && dv.len() == kl, || {
        "attention_backward: k/v/dk/dv must be [b,t,h_kv,d]".into()
    })?;
    check(lse.len() == dims.lse_len(), || "attention_backward: lse must be [b,h,t]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    let delta = DeviceBuffer::<f32>::uninit(be, dims.lse_len())?;
    dq.fill_zero()?;
    (p.q, p.k, p.v, p.out, p.lse, p.dout, p.delta) =
        (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr(), dout.ptr(), delta.ptr());
    (p.dq_acc, p.dk_acc, p.dv_acc) = (dq.ptr(), dk.ptr(), dv.ptr());
    let rows = dims.b * dims.t * dims.h;
    be.launch("attention", "attn_bwd_delta", (rows.div_ceil(8) as u32, 1, 1), 256, 0, &p)?;
    let name = if dims.d == 64 { "attn_bwd_d64" } else { "attn_bwd_d128" };
    let grid = ((dims.t as u32).div_ceil(64), (dims.b * dims.h_kv) as u32, 1);
    be.launch("attention", name, grid, 128, bwd_smem(dims.d), &p)
}
