//! Launch code of `cuda/optim.cu` (twins: `cpu::optim::adamw_update`, `optim::clip_grad_norm`),
//! plus the f32 ⇄ bf16 casts.

use super::abi::{NsAdamWParams, NsMuonParams, NsReduceParams};
use super::{check, grid_for, CudaBackend, CudaResult, DeviceBuffer};
use crate::backend::cpu::optim::AdamWStep;
use half::bf16;

/// Decoupled AdamW on f32 master weights; `p_bf16` (same length) receives the bf16 copy.
/// The bias corrections are computed on the host in f64, exactly as the CPU twin does.
pub fn adamw_update(
    be: &CudaBackend,
    p: &DeviceBuffer<f32>,
    g: &DeviceBuffer<f32>,
    m: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    p_bf16: Option<&DeviceBuffer<bf16>>,
    h: AdamWStep,
) -> CudaResult<()> {
    let n = p.len();
    check(g.len() == n && m.len() == n && v.len() == n && p_bf16.is_none_or(|b| b.len() == n), || {
        "adamw_update: length mismatch".into()
    })?;
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let prm = NsAdamWParams {
        p: p.ptr(),
        g: g.ptr(),
        m: m.ptr(),
        v: v.ptr(),
        p_bf16: p_bf16.map_or(0, |b| b.ptr()),
        n: n as i64,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        decay: 1.0 - h.lr * h.weight_decay,
        step_size: (h.lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
    };
    if n == 0 {
        return Ok(());
    }
    be.launch("optim", "adamw_f32", (grid_for(n, 256 * 4), 1, 1), 256, 0, &prm)
}

const SUMSQ_BLOCKS: usize = 512;

/// Σx² over several tensors into one f32 on the device (deterministic order), and, with
/// `max_norm > 0`, scales them all so the global norm is at most `max_norm`
/// (factor max_norm / (norm + 1e-6), as `optim::clip_grad_norm`). Returns the norm
/// before clipping (one device → host copy).
pub fn clip_grad_norm(be: &CudaBackend, grads: &[&DeviceBuffer<f32>], max_norm: f32) -> CudaResult<f32> {
    let partials = DeviceBuffer::<f32>::zeros(be, SUMSQ_BLOCKS * grads.len().max(1))?;
    let out = DeviceBuffer::<f32>::zeros(be, 1)?;
    let factor = DeviceBuffer::<f32>::zeros(be, 1)?;
    for (i, g) in grads.iter().enumerate() {
        let blocks = grid_for(g.len(), 256 * 8).min(SUMSQ_BLOCKS as u32);
        let p = NsReduceParams {
            x: g.ptr(),
            partials: partials.ptr() + (i * SUMSQ_BLOCKS * 4) as u64,
            n: g.len() as i64,
            ..Default::default()
        };
        if !g.is_empty() {
            be.launch("optim", "sumsq_partial_f32", (blocks, 1, 1), 256, 0, &p)?;
        }
    }
    let p = NsReduceParams {
        partials: partials.ptr(),
        out: out.ptr(),
        factor: factor.ptr(),
        blocks: (SUMSQ_BLOCKS * grads.len().max(1)) as i32,
        max_norm,
        ..Default::default()
    };
    be.launch("optim", "sumsq_final_f32", (1, 1, 1), 256, 0, &p)?;
    for g in grads.iter().filter(|g| !g.is_empty()) {
        let p = NsReduceParams { x: g.ptr(), factor: factor.ptr(), n: g.len() as i64, ..Default::default() };
        be.launch("optim", "scale_f32", (grid_for(g.len(), 256 * 4), 1, 1), 256, 0, &p)?;
    }
    Ok((out.to_host()?[0] as f64).sqrt() as f32)
}

/// bf16 copy of an f32 buffer.
pub fn cast_f32_bf16(be: &CudaBackend, x: &DeviceBuffer<f32>, out: &DeviceBuffer<bf16>) -> CudaResult<()> {
    check(out.len() == x.len(), || "cast_f32_bf16: length mismatch".into())?;
    let p = NsReduceParams { x: x.ptr(), out: out.ptr(), n: x.len() as i64, ..Default::default() };
    if x.is_empty() {
        return Ok(());
    }
    be.launch("optim", "cast_f32_bf16", (grid_for(x.len(), 256 * 4), 1, 1), 256, 0, &p)
}

/// f32 copy of a bf16 buffer.
pub fn cast_bf16_f32(be: &CudaBackend, x: &DeviceBuffer<bf16>, out: &DeviceBuffer<f32>) -> CudaResult<()> {
    check(out.len() == x.len(), || "cast_bf16_f32: length mismatch".into())?;
    let p = NsReduceParams { x: x.ptr(), out: out.ptr(), n: x.len() as i64, ..Default::default() };
    if x.is_empty() {
        return Ok(());
    }
    be.launch("optim", "cast_bf16_f32", (grid_for(x.len(), 256 * 4), 1, 1), 256, 0, &p)
}

/// Σx² of one buffer into `out` (f32 [1], on the device), in the same fixed order as
/// [`clip_grad_norm`]'s partials (no host round trip).
pub fn sum_sq(be: &CudaBackend, x: &DeviceBuffer<f32>, out: &DeviceBuffer<f32>) -> CudaResult<()> {
    check(out.len() == 1, || "sum_sq: out must hold one value".into())?;
    let partials = DeviceBuffer::<f32>::zeros(be, SUMSQ_BLOCKS)?;
    if !x.is_empty() {
        let blocks = grid_for(x.len(), 256 * 8).min(SUMSQ_BLOCKS as u32);
        let p = NsReduceParams { x: x.ptr(), partials: partials.ptr(), n: x.len() as i64, ..Default::default() };
        be.launch("optim", "sumsq_partial_f32", (blocks, 1, 1), 256, 0, &p)?;
    }
    let p =
        NsReduceParams { partials: partials.ptr(), out: out.ptr(), blocks: SUMSQ_BLOCKS as i32, ..Default::default() };
    be.launch("optim", "sumsq_final_f32", (1, 1, 1), 256, 0, &p)
}

/// Muon's Nesterov momentum: buf ← μ·buf + (1−μ)·g, u = (1−μ)·g + μ·buf (all f32).
pub fn muon_momentum(
    be: &CudaBackend,
    buf: &DeviceBuffer<f32>,
    g: &DeviceBuffer<f32>,
    u: &DeviceBuffer<f32>,
    mu: f32,
) -> CudaResult<()> {
    let n = g.len();
    check(buf.len() == n && u.len() == n, || "muon_momentum: length mismatch".into())?;
    if n == 0 {
        return Ok(());
    }
    let p = NsMuonParams { buf: buf.ptr(), g: g.ptr(), u: u.ptr(), n: n as i64, mu, ..Default::default() };
    be.launch("optim", "muon_momentum_f32", (grid_for(n, 256 * 4), 1, 1), 256, 0, &p)
}

/// x (bf16) = u / (√sumsq + 1e-7), `sumsq` the device scalar from [`sum_sq`] of u.
pub fn muon_normalize(
    be: &CudaBackend,
    u: &DeviceBuffer<f32>,
    sumsq: &DeviceBuffer<f32>,
    x: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let n = u.len();
    check(x.len() == n && sumsq.len() == 1, || "muon_normalize: bad sizes".into())?;
    if n == 0 {
        return Ok(());
    }
    let p = NsMuonParams { u: u.ptr(), sumsq: sumsq.ptr(), x: x.ptr(), n: n as i64, ..Default::default() };
    be.launch("optim", "muon_normalize_bf16", (grid_for(n, 256 * 4), 1, 1), 256, 0, &p)
}

/// w ← w·decay − lr·o (o the bf16 Newton–Schulz output); `w_bf16` receives the bf16 copy.
pub fn muon_apply(
    be: &CudaBackend,
    w: &DeviceBuffer<f32>,
    o: &DeviceBuffer<bf16>,
    w_bf16: Option<&DeviceBuffer<bf16>>,
    decay: f32,
    lr: f32,
) -> CudaResult<()> {
    let n = w.len();
    check(o.len() == n && w_bf16.is_none_or(|b| b.len() == n), || "muon_apply: length mismatch".into())?;
    if n == 0 {
        return Ok(());
    }
    let p = NsMuonParams {
        w: w.ptr(),
        o: o.ptr(),
        w_bf16: w_bf16.map_or(0, |b| b.ptr()),
        n: n as i64,
        decay,
        lr,
        ..Default::default()
    };
    be.launch("optim", "muon_apply_f32", (grid_for(n, 256 * 4), 1, 1), 256, 0, &p)
}
