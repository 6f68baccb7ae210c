//! Launch code of `cuda/loss.cu` (twin: `cpu::loss`): logit softcap fused with cross-entropy.

use super::abi::NsLossParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use half::bf16;

fn params(rows: usize, vocab: usize, cap: f32) -> CudaResult<NsLossParams> {
    check(vocab % 8 == 0 && vocab > 0, || format!("cross_entropy: vocab {vocab} must be a multiple of 8 on CUDA"))?;
    Ok(NsLossParams { rows: int(rows, "rows")?, vocab: int(vocab, "vocab")?, cap, ..Default::default() })
}

/// Per-row loss (nats) and log-sum-exp; logits bf16 [rows, vocab], targets [rows] (< 0 ignored).
pub fn softcap_cross_entropy_forward(
    be: &CudaBackend,
    logits: &DeviceBuffer<bf16>,
    vocab: usize,
    targets: &DeviceBuffer<i32>,
    cap: f32,
    losses: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let rows = targets.len();
    let mut p = params(rows, vocab, cap)?;
    check(logits.len() == rows * vocab && losses.len() == rows && lse.len() == rows, || {
        "cross_entropy: bad sizes".into()
    })?;
    (p.logits, p.targets, p.losses, p.lse) = (logits.ptr(), targets.ptr(), losses.ptr(), lse.ptr());
    if rows == 0 {
        return Ok(());
    }
    be.launch("loss", "softcap_ce_fwd_bf16", (rows as u32, 1, 1), 256, 0, &p)
}

/// dlogits = scale · ∂loss_row/∂logits (bf16), from the forward's lse.
#[allow(clippy::too_many_arguments)]
pub fn softcap_cross_entropy_backward(
    be: &CudaBackend,
    logits: &DeviceBuffer<bf16>,
    vocab: usize,
    targets: &DeviceBuffer<i32>,
    cap: f32,
    lse: &DeviceBuffer<f32>,
    scale: f32,
    dlogits: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let rows = targets.len();
    let mut p = params(rows, vocab, cap)?;
    check(logits.len() == rows * vocab && dlogits.len() == logits.len() && lse.len() == rows, || {
        "cross_entropy_backward: bad sizes".into()
    })?;
    (p.logits, p.targets, p.lse, p.dlogits, p.scale) = (logits.ptr(), targets.ptr(), lse.ptr(), dlogits.ptr(), scale);
    if rows == 0 {
        return Ok(());
    }
    be.launch("loss", "softcap_ce_bwd_bf16", (rows as u32, 1, 1), 256, 0, &p)
}
