//! Launch code of `cuda/attention.cu` (twin: `cpu::attention`): dense causal flash
//! attention, grouped-query, scale 1/√d_qk. Head shapes (d_qk, d_v) ∈ [`FLASH_SHAPES`]:
//! (64, 64) and (128, 128) for GQA, (96, 64) and (192, 128) for MLA (d_qk = d_nope + d_rope,
//! values and outputs d_v wide); the `_dv` functions take d_v, the others are d_v = d_qk.
//! Shared memory and registers per kernel are listed in cuda/README.md; the backward's
//! dynamic shared memory is [`bwd_smem`] (above 48 KiB for (192, 128), opted into at launch).
//! The (96, 64) and (192, 128) kernels have not run on a GPU yet (their parity rows are in the
//! selftest's `attention` group).

use super::abi::NsAttnParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
pub use crate::backend::cpu::attention::AttnDims;
use half::bf16;

/// The (d_qk, d_v) pairs the flash kernels are built for, with their name suffix and the
/// backward's query tile BQ (`NS_FLASH_KERNELS` in attention.cu and window_attention.cu).
pub const FLASH_SHAPES: [(usize, usize); 4] = [(64, 64), (128, 128), (96, 64), (192, 128)];

/// (kernel name suffix, BQ) of a supported (d_qk, d_v) pair.
pub(crate) fn flash_shape(what: &str, d: usize, dv: usize) -> CudaResult<(usize, usize)> {
    let bq = [64, 16, 32, 16];
    match FLASH_SHAPES.iter().position(|&s| s == (d, dv)) {
        Some(i) => Ok((i, bq[i])),
        None => Err(super::CudaError(format!(
            "{what}: head shape (d_qk {d}, d_v {dv}) has no CUDA kernel (supported: {FLASH_SHAPES:?})"
        ))),
    }
}

/// Dynamic shared memory of the backward kernels (mirrors `bwd_smem` in flash.cuh; the
/// window_attention family uses the same bodies).
pub(crate) fn bwd_smem(d: usize, dv: usize, bq: usize) -> u32 {
    (((64 + bq) * (d + 8) + (64 + bq) * (dv + 8) + 64 * (bq + 8)) * 2 + 8 * bq) as u32
}

fn params(dims: &AttnDims, dv: usize) -> CudaResult<(NsAttnParams, usize, usize)> {
    let (shape, bq) = flash_shape("attention", dims.d, dv)?;
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || format!("attention: h must be a multiple of h_kv ({dims:?})"))?;
    let p = NsAttnParams {
        b: int(dims.b, "b")?,
        t: int(dims.t, "t")?,
        h: int(dims.h, "h")?,
        h_kv: int(dims.h_kv, "h_kv")?,
        d: int(dims.d, "d")?,
        dv: int(dv, "dv")?,
        scale: 1.0 / (dims.d as f32).sqrt(),
        ..Default::default()
    };
    Ok((p, shape, bq))
}

/// out (bf16 [b,t,h,d]) and lse (f32 [b,h,t], natural log of the scaled scores); d_v = d.
pub fn attention_forward(
    be: &CudaBackend,
    dims: &AttnDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    attention_forward_dv(be, dims, dims.d, q, k, v, out, lse)
}

/// [`attention_forward`] with values `dv` wide: q [b,t,h,d], k [b,t,h_kv,d], v [b,t,h_kv,dv],
/// out [b,t,h,dv].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_dv(
    be: &CudaBackend,
    dims: &AttnDims,
    dv: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (mut p, shape, _) = params(dims, dv)?;
    let (ol, vl) = (dims.q_len() / dims.d * dv, dims.kv_len() / dims.d * dv);
    check(q.len() == dims.q_len() && out.len() == ol, || "attention: q/out must be [b,t,h,d]/[b,t,h,dv]".into())?;
    check(k.len() == dims.kv_len() && v.len() == vl, || "attention: k/v must be [b,t,h_kv,d]/[b,t,h_kv,dv]".into())?;
    check(lse.len() == dims.lse_len(), || "attention: lse must be [b,h,t]".into())?;
    (p.q, p.k, p.v, p.out, p.lse) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    let name = ["attn_fwd_d64", "attn_fwd_d128", "attn_fwd_q96v64", "attn_fwd_q192v128"][shape];
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
    grads: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    attention_backward_dv(be, dims, dims.d, q, k, v, out, lse, dout, grads)
}

/// [`attention_backward`] with values `dv` wide (v, dv [b,t,h_kv,dv]; out, dout [b,t,h,dv]).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_dv(
    be: &CudaBackend,
    dims: &AttnDims,
    dv_width: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let (mut p, shape, bq) = params(dims, dv_width)?;
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    let (ol, vl) = (ql / dims.d * dv_width, kl / dims.d * dv_width);
    check(q.len() == ql && dq.len() == ql && out.len() == ol && dout.len() == ol, || {
        "attention_backward: q/dq must be [b,t,h,d], out/dout [b,t,h,dv]".into()
    })?;
    check(k.len() == kl && dk.len() == kl && v.len() == vl && dv.len() == vl, || {
        "attention_backward: k/dk must be [b,t,h_kv,d], v/dv [b,t,h_kv,dv]".into()
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
    let name = ["attn_bwd_d64", "attn_bwd_d128", "attn_bwd_q96v64", "attn_bwd_q192v128"][shape];
    let grid = ((dims.t as u32).div_ceil(64), (dims.b * dims.h_kv) as u32, 1);
    be.launch("attention", name, grid, 128, bwd_smem(dims.d, dv_width, bq), &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_sizes_match_the_kernels() {
        // the static_asserts of attention.cu and window_attention.cu
        let want = [46592, 46720, 39168, 56960];
        for (i, &(d, dv)) in FLASH_SHAPES.iter().enumerate() {
            let (shape, bq) = flash_shape("t", d, dv).unwrap();
            assert_eq!((shape, bwd_smem(d, dv, bq)), (i, want[i]));
        }
        assert!(flash_shape("t", 64, 128).unwrap_err().0.contains("(192, 128)"));
    }
}
