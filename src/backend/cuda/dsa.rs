//! Launch code of `cuda/dsa.cu` (twin: `cpu::dsa`): the lightning indexer's exact top-k selection,
//! sparse attention over the selected keys (forward and backward, GQA, head dims 64 and 128) and
//! the indexer's KL loss in its sparse form (over the selected keys) and its dense warm-up form
//! (over every earlier key). Shapes as [`DsaDims`]; bf16 activations, f32 lse and gradients, u32
//! `sel` (rows ascending, then [`PAD`]).
//!
//! **Decode** ([`indexer_topk_decode`], [`dsa_attention_decode`]): one new query per sequence
//! against caches of `t = dims.t` positions, the new token's own key, value and index key being
//! the last (position `t − 1`): the selection and attention of the last row of the training
//! kernels, for q, out `[b, h, d]`, lse `[b, h]`, qi `[b, H_I, d_I]`, wi `[b, H_I]`, sel
//! `[b, kmax]` and the caches k, v `[b, t, h_kv, d]`, ki `[b, t, d_I]`.
//!
//! Limits checked here (each kernel's shared memory must fit the default 48 KiB):
//! attention `d ∈ {64, 128}` and a group `h / h_kv` whose shared memory fits (up to 24 heads per
//! kv head at d = 128 in the backward); KL `n_index_heads · index_dim ≤ 8192`, `n_index_heads ≤
//! 256`, `index_dim` and `d` even; decode scores `4·H_I + 2·(H_I·d_I + 64·(d_I + 2))` bytes.

use super::abi::NsDsaParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
pub use crate::backend::cpu::dsa::{DsaDims, PAD};
use half::bf16;

/// Selected keys per shared-memory tile (`KT` in dsa.cu).
const KT: usize = 32;
/// The default per-block shared memory limit (no opt-in attribute is set).
const SMEM_LIMIT: usize = 48 * 1024;
/// f32 elements of the indexer's score workspace aimed at (256 MiB): a chunk holds
/// `clamp(this / t, 64, t)` query rows (rounded down to a multiple of 64).
const SCORE_WORKSPACE: usize = 1 << 26;
/// `n_index_heads · index_dim` limit of the KL kernel (256 threads × 32 registers).
const KL_MAX_QI: usize = 8192;

/// Dynamic shared memory of `dsa_fwd_d*` (mirrors `fwd_smem` in dsa.cu).
fn fwd_smem(d: usize, gs: usize) -> usize {
    (gs * d + 2 * gs + KT + 1) * 4 + (2 * KT * (d + 2) + gs * d) * 2
}

/// Dynamic shared memory of `dsa_bwd_d*` (mirrors `bwd_smem` in dsa.cu).
fn bwd_smem(d: usize, gs: usize) -> usize {
    (gs * d + 2 * gs + 2 * gs * KT + KT + 1) * 4 + (2 * KT * (d + 2) + 2 * gs * d) * 2
}

/// Dynamic shared memory of `dsa_kl_sparse` (mirrors `kl_smem` in dsa.cu).
fn kl_smem(hi: usize, di: usize, d: usize, h: usize, gs: usize) -> usize {
    (hi * KT + gs * KT + h + hi + KT + 32 + KT + 1) * 4 + (hi * di + KT * (di + 2) + KT * (d + 2)) * 2
}

/// Keys per block of `dsa_index_scores_decode` (`DEC_KEYS` in dsa.cu).
const DEC_KEYS: usize = 64;

/// Dynamic shared memory of `dsa_index_scores_decode` (mirrors `dec_scores_smem` in dsa.cu).
fn dec_scores_smem(hi: usize, di: usize) -> usize {
    hi * 4 + (hi * di + DEC_KEYS * (di + 2)) * 2
}

/// Query rows per indexer chunk (a multiple of 64, at least 64) for a workspace of `budget` f32.
fn chunk_rows(t: usize, budget: usize) -> usize {
    let t64 = t.div_ceil(64) * 64;
    (budget / t.max(1) / 64 * 64).clamp(64, t64.max(64))
}

fn base_params(dims: &DsaDims) -> CudaResult<NsDsaParams> {
    check(dims.t < PAD as usize, || format!("dsa: t must be < 2^32 - 1 ({dims:?})"))?;
    check(dims.topk.saturating_add(dims.window) > 0, || format!("dsa: topk + window must be >= 1 ({dims:?})"))?;
    Ok(NsDsaParams {
        b: int(dims.b, "b")?,
        t: int(dims.t, "t")?,
        h: int(dims.h, "h")?,
        h_kv: int(dims.h_kv, "h_kv")?,
        d: int(dims.d, "d")?,
        n_index_heads: int(dims.n_index_heads, "n_index_heads")?,
        index_dim: int(dims.index_dim, "index_dim")?,
        // Clamping to t leaves the selection unchanged (a row has at most t keys).
        topk: int(dims.topk.min(dims.t), "topk")?,
        window: int(dims.window.min(dims.t), "window")?,
        kmax: int(dims.kmax(), "kmax")?,
        scale: 1.0 / (dims.d.max(1) as f32).sqrt(),
        inv_bt: 1.0 / (dims.b * dims.t).max(1) as f32,
        ..Default::default()
    })
}

fn check_indexer(
    dims: &DsaDims,
    qi: &DeviceBuffer<bf16>,
    ki: &DeviceBuffer<bf16>,
    wi: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    check(dims.n_index_heads > 0 && dims.index_dim > 0, || {
        format!("dsa: indexer heads and dim must be > 0 ({dims:?})")
    })?;
    check(qi.len() == dims.qi_len(), || "dsa: qi must be [b,t,n_index_heads,index_dim]".into())?;
    check(ki.len() == dims.ki_len(), || "dsa: ki must be [b,t,index_dim]".into())?;
    check(wi.len() == dims.wi_len(), || "dsa: wi must be [b,t,n_index_heads]".into())
}

/// The shape rules of the sparse-attention kernels, and the dynamic shared memory `smem_of(d, gs)`
/// that `what` needs for gs = h / h_kv query heads per kv head, checked against the limit.
fn check_attn(what: &str, dims: &DsaDims, smem_of: fn(usize, usize) -> usize) -> CudaResult<usize> {
    check(dims.d == 64 || dims.d == 128, || format!("dsa: head dim {} (CUDA has 64 and 128)", dims.d))?;
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || format!("dsa: h must be a multiple of h_kv ({dims:?})"))?;
    check(dims.b * dims.h_kv <= 65_535, || format!("dsa: b * h_kv must be <= 65535 ({dims:?})"))?;
    let gs = dims.h / dims.h_kv;
    let smem = smem_of(dims.d, gs);
    check(smem <= SMEM_LIMIT, || format!("{what}: {gs} query heads per kv head need {smem} B of shared memory"))?;
    Ok(smem)
}

/// Top-k selection of the lightning indexer: writes `sel` (u32 `[b, t, kmax]`, each row `A(t)`
/// ascending then [`PAD`]) from qi `[b, t, H_I, d_I]`, ki `[b, t, d_I]`, wi `[b, t, H_I]`, with the
/// CPU's rule exactly (ties to the more recent key). Allocates an f32 score workspace of
/// `rows · t` elements, `rows = clamp(2^26 / t, 64, t)` rounded to 64 (at most 256 MiB, or
/// `64 · t · 4` bytes past t = 2^20), and runs two kernels per chunk of `rows` queries.
pub fn indexer_topk(
    be: &CudaBackend,
    dims: &DsaDims,
    qi: &DeviceBuffer<bf16>,
    ki: &DeviceBuffer<bf16>,
    wi: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
) -> CudaResult<()> {
    indexer_topk_chunked(be, dims, qi, ki, wi, sel, chunk_rows(dims.t, SCORE_WORKSPACE))
}

/// [`indexer_topk`] with an explicit chunk of `rows` query rows (a multiple of 64; the tests use
/// small chunks to exercise the chunking).
#[doc(hidden)]
pub fn indexer_topk_chunked(
    be: &CudaBackend,
    dims: &DsaDims,
    qi: &DeviceBuffer<bf16>,
    ki: &DeviceBuffer<bf16>,
    wi: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    rows: usize,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    check_indexer(dims, qi, ki, wi)?;
    check(sel.len() == dims.sel_len(), || "indexer_topk: sel must be [b,t,kmax]".into())?;
    check(rows > 0 && rows % 64 == 0, || format!("indexer_topk: chunk rows {rows} must be a positive multiple of 64"))?;
    if dims.b * dims.t == 0 {
        return Ok(());
    }
    let (t, qc) = (dims.t, rows.min(dims.t.div_ceil(64) * 64));
    check(qc / 64 <= 65_535, || format!("indexer_topk: chunk rows {qc} exceed the grid"))?;
    let scores = DeviceBuffer::<f32>::uninit(be, qc * t)?;
    (p.qi, p.ki, p.wi, p.sel, p.scores) = (qi.ptr(), ki.ptr(), wi.ptr(), sel.ptr(), scores.ptr());
    for bi in 0..dims.b {
        for q0 in (0..t).step_by(qc) {
            let n = qc.min(t - q0);
            (p.bi, p.q0, p.rows) = (bi as i32, q0 as i32, n as i32);
            // Rows whose older keys all fit in the top-k need no scores (the last row has the most).
            if dims.topk.saturating_add(dims.window) < q0 + n {
                let grid = ((q0 + n).div_ceil(64) as u32, n.div_ceil(64) as u32, 1);
                be.launch("dsa", "dsa_index_scores", grid, 256, 0, &p)?;
            }
            be.launch("dsa", "dsa_index_select", (n as u32, 1, 1), 256, 0, &p)?;
        }
    }
    Ok(())
}

/// Softmax attention of each query over its selected keys `sel` (rows non-empty and causal, as
/// the CPU requires): out bf16 `[b, t, h, d]` and lse f32 `[b, h, t]` (natural log of the scaled
/// scores).
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_forward(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let smem = check_attn("dsa_attention_forward", dims, fwd_smem)?;
    check(q.len() == dims.q_len() && out.len() == dims.q_len(), || "dsa: q/out must be [b,t,h,d]".into())?;
    check(k.len() == dims.kv_len() && v.len() == dims.kv_len(), || "dsa: k/v must be [b,t,h_kv,d]".into())?;
    check(lse.len() == dims.lse_len(), || "dsa: lse must be [b,h,t]".into())?;
    check(sel.len() == dims.sel_len(), || "dsa: sel must be [b,t,kmax]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    (p.q, p.k, p.v, p.sel, p.out, p.lse) = (q.ptr(), k.ptr(), v.ptr(), sel.ptr(), out.ptr(), lse.ptr());
    let name = if dims.d == 64 { "dsa_fwd_d64" } else { "dsa_fwd_d128" };
    be.launch("dsa", name, (dims.t as u32, (dims.b * dims.h_kv) as u32, 1), 128, smem as u32, &p)
}

/// Gradients of [`dsa_attention_forward`] in f32: dq `[b, t, h, d]` (overwritten), dk and dv
/// `[b, t, h_kv, d]` (zeroed here, then scatter-added with atomics: the order of the additions,
/// hence the last bits, varies between runs). Uses q, k, v, sel, out, lse and dout.
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_backward(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let smem = check_attn("dsa_attention_backward", dims, bwd_smem)?;
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    check(q.len() == ql && out.len() == ql && dout.len() == ql && dq.len() == ql, || {
        "dsa_attention_backward: q/out/dout/dq must be [b,t,h,d]".into()
    })?;
    check(k.len() == kl && v.len() == kl && dk.len() == kl && dv.len() == kl, || {
        "dsa_attention_backward: k/v/dk/dv must be [b,t,h_kv,d]".into()
    })?;
    check(lse.len() == dims.lse_len(), || "dsa_attention_backward: lse must be [b,h,t]".into())?;
    check(sel.len() == dims.sel_len(), || "dsa_attention_backward: sel must be [b,t,kmax]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    dk.fill_zero()?;
    dv.fill_zero()?;
    (p.q, p.k, p.v, p.sel, p.out, p.lse, p.dout) =
        (q.ptr(), k.ptr(), v.ptr(), sel.ptr(), out.ptr(), lse.ptr(), dout.ptr());
    (p.dq, p.dk, p.dv) = (dq.ptr(), dk.ptr(), dv.ptr());
    let name = if dims.d == 64 { "dsa_bwd_d64" } else { "dsa_bwd_d128" };
    be.launch("dsa", name, (dims.t as u32, (dims.b * dims.h_kv) as u32, 1), 128, smem as u32, &p)
}

/// KL distillation loss of the indexer and its gradients (twin of `cpu::dsa::indexer_kl`), in its
/// sparse form (`sel` given: the key set of each query is its selection `A(t)`, and `lse` the
/// sparse attention's) or its dense warm-up form (`None`: every key `s ≤ t`, `lse` the dense
/// attention's; two sweeps over the keys per query row, nothing `t × t` is stored). Writes the
/// loss (the mean KL over the `b·t` queries) into the device scalar `loss` (f32, length 1, so no
/// host round trip), and the gradients dqi `[b, t, H_I, d_I]`, dwi `[b, t, H_I]` (overwritten) and
/// dki `[b, t, d_I]` (zeroed here, then scatter-added with atomics), all f32. q, k get none.
#[allow(clippy::too_many_arguments)]
pub fn indexer_kl(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    qi: &DeviceBuffer<bf16>,
    ki: &DeviceBuffer<bf16>,
    wi: &DeviceBuffer<bf16>,
    sel: Option<&DeviceBuffer<u32>>,
    [dqi, dki, dwi]: [&DeviceBuffer<f32>; 3],
    loss: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    check_indexer(dims, qi, ki, wi)?;
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || format!("indexer_kl: h must be a multiple of h_kv ({dims:?})"))?;
    check(dims.d > 0 && dims.d % 2 == 0 && dims.index_dim % 2 == 0, || {
        format!("indexer_kl: d and index_dim must be even ({dims:?})")
    })?;
    // dwi is written by the threads tid < n_index_heads of a 256-thread block
    check(dims.n_index_heads <= 256, || format!("indexer_kl: n_index_heads must be <= 256 ({dims:?})"))?;
    check(dims.n_index_heads * dims.index_dim <= KL_MAX_QI, || {
        format!("indexer_kl: n_index_heads * index_dim must be <= {KL_MAX_QI} ({dims:?})")
    })?;
    let (hi, di, gs) = (dims.n_index_heads, dims.index_dim, dims.h / dims.h_kv);
    let smem = kl_smem(hi, di, dims.d, dims.h, gs);
    check(smem <= SMEM_LIMIT, || format!("indexer_kl: these shapes need {smem} B of shared memory ({dims:?})"))?;
    check(dims.b <= 65_535, || "indexer_kl: b must be <= 65535".into())?;
    check(q.len() == dims.q_len() && k.len() == dims.kv_len(), || {
        "indexer_kl: q/k must be [b,t,h,d]/[b,t,h_kv,d]".into()
    })?;
    check(lse.len() == dims.lse_len(), || "indexer_kl: lse must be [b,h,t]".into())?;
    if let Some(sel) = sel {
        check(sel.len() == dims.sel_len(), || "indexer_kl: sel must be [b,t,kmax]".into())?;
    }
    check(dqi.len() == dims.qi_len() && dki.len() == dims.ki_len() && dwi.len() == dims.wi_len(), || {
        "indexer_kl: dqi/dki/dwi must be shaped like qi/ki/wi".into()
    })?;
    check(!loss.is_empty(), || "indexer_kl: loss must hold one f32".into())?;
    if dims.b * dims.t == 0 {
        return loss.fill_zero();
    }
    let loss_rows = DeviceBuffer::<f32>::uninit(be, dims.b * dims.t)?;
    dki.fill_zero()?;
    (p.q, p.k, p.lse, p.qi, p.ki, p.wi) = (q.ptr(), k.ptr(), lse.ptr(), qi.ptr(), ki.ptr(), wi.ptr());
    (p.dqi, p.dki, p.dwi, p.loss_rows, p.loss) = (dqi.ptr(), dki.ptr(), dwi.ptr(), loss_rows.ptr(), loss.ptr());
    let grid = (dims.t as u32, dims.b as u32, 1);
    match sel {
        Some(sel) => {
            // per selected entry: I then G (g_sel), the target's head sum (pt)
            let g_sel = DeviceBuffer::<f32>::uninit(be, dims.sel_len())?;
            let pt = DeviceBuffer::<f32>::uninit(be, dims.sel_len())?;
            (p.sel, p.g_sel, p.pt) = (sel.ptr(), g_sel.ptr(), pt.ptr());
            be.launch("dsa", "dsa_kl_sparse", grid, 256, smem as u32, &p)?;
        }
        // the same shared-memory layout, no per-key workspace
        None => be.launch("dsa", "dsa_kl_dense", grid, 256, smem as u32, &p)?,
    }
    be.launch("dsa", "dsa_kl_loss", (1, 1, 1), 256, 0, &p)
}

/// Decode-time top-k selection (module doc): the selection of the new token at position
/// `t − 1` from its index queries qi `[b, H_I, d_I]` and weights wi `[b, H_I]` against the index
/// key cache ki `[b, t, d_I]` (the new token's key last), into sel u32 `[b, kmax]` (ascending,
/// then [`PAD`]). The same rule and the same score bits as [`indexer_topk`]'s last row. Allocates
/// an f32 score workspace of `b · t` elements; two kernels.
pub fn indexer_topk_decode(
    be: &CudaBackend,
    dims: &DsaDims,
    qi: &DeviceBuffer<bf16>,
    ki: &DeviceBuffer<bf16>,
    wi: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let (b, t, hi, di) = (dims.b, dims.t, dims.n_index_heads, dims.index_dim);
    check(hi > 0 && di > 0, || format!("indexer_topk_decode: indexer heads and dim must be > 0 ({dims:?})"))?;
    check(qi.len() == b * hi * di, || "indexer_topk_decode: qi must be [b,n_index_heads,index_dim]".into())?;
    check(ki.len() == dims.ki_len(), || "indexer_topk_decode: ki must be [b,t,index_dim]".into())?;
    check(wi.len() == b * hi, || "indexer_topk_decode: wi must be [b,n_index_heads]".into())?;
    check(sel.len() == b * dims.kmax(), || "indexer_topk_decode: sel must be [b,kmax]".into())?;
    let smem = dec_scores_smem(hi, di);
    check(smem <= SMEM_LIMIT, || format!("indexer_topk_decode: these shapes need {smem} B of shared memory"))?;
    check(b <= 65_535, || "indexer_topk_decode: b must be <= 65535".into())?;
    if b * t == 0 {
        return Ok(());
    }
    let scores = DeviceBuffer::<f32>::uninit(be, b * t)?;
    (p.qi, p.ki, p.wi, p.sel, p.scores) = (qi.ptr(), ki.ptr(), wi.ptr(), sel.ptr(), scores.ptr());
    // When every older key fits in the top-k (topk + window >= t) no score is read.
    if dims.topk.saturating_add(dims.window) < t {
        let grid = (t.div_ceil(DEC_KEYS) as u32, b as u32, 1);
        be.launch("dsa", "dsa_index_scores_decode", grid, DEC_KEYS as u32, smem as u32, &p)?;
    }
    be.launch("dsa", "dsa_index_select_decode", (b as u32, 1, 1), 256, 0, &p)
}

/// Decode-time sparse attention (module doc): the new token's query q `[b, h, d]` (position
/// `t − 1`) over its selection sel `[b, kmax]` (non-empty, entries ≤ t − 1) of the caches k, v
/// `[b, t, h_kv, d]`: out bf16 `[b, h, d]` and lse f32 `[b, h]`, as [`dsa_attention_forward`]'s
/// last row.
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_decode(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let smem = check_attn("dsa_attention_decode", dims, fwd_smem)?;
    let ql = dims.b * dims.h * dims.d;
    check(q.len() == ql && out.len() == ql, || "dsa_attention_decode: q/out must be [b,h,d]".into())?;
    check(k.len() == dims.kv_len() && v.len() == dims.kv_len(), || {
        "dsa_attention_decode: k/v must be [b,t,h_kv,d]".into()
    })?;
    check(lse.len() == dims.b * dims.h, || "dsa_attention_decode: lse must be [b,h]".into())?;
    check(sel.len() == dims.b * dims.kmax(), || "dsa_attention_decode: sel must be [b,kmax]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    (p.q, p.k, p.v, p.sel, p.out, p.lse) = (q.ptr(), k.ptr(), v.ptr(), sel.ptr(), out.ptr(), lse.ptr());
    let name = if dims.d == 64 { "dsa_fwd_decode_d64" } else { "dsa_fwd_decode_d128" };
    be.launch("dsa", name, (1, (dims.b * dims.h_kv) as u32, 1), 128, smem as u32, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same figures as the `static_assert` at the end of dsa.cu.
    #[test]
    fn smem_sizes_match_the_kernels() {
        assert_eq!(fwd_smem(64, 4), 10148);
        assert_eq!(bwd_smem(128, 4), 21924);
        assert_eq!(kl_smem(64, 128, 128, 16, 2), 42180);
        assert_eq!(dec_scores_smem(64, 128), 33280);
        assert!(bwd_smem(128, 24) <= SMEM_LIMIT && fwd_smem(128, 24) <= SMEM_LIMIT);
    }

    #[test]
    fn chunks_cover_the_rows() {
        assert_eq!(chunk_rows(100, SCORE_WORKSPACE), 128);
        assert_eq!(chunk_rows(1 << 17, SCORE_WORKSPACE), 512);
        assert_eq!(chunk_rows(1 << 22, SCORE_WORKSPACE), 64);
        assert_eq!(chunk_rows(0, SCORE_WORKSPACE), 64);
    }
}
