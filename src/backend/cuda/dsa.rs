//! Launch code of `cuda/dsa.cu` (twin: `cpu::dsa`): the lightning indexer's exact top-k selection,
//! sparse attention over the selected keys (forward and backward, GQA; head shapes (d_qk, d_v) in
//! [`DSA_SHAPES`], the `_dv` functions taking d_v; and MQA over MLA's latent, [`LATENT_SHAPE`],
//! through [`dsa_attention_latent_forward`] / [`dsa_attention_latent_backward`]) and
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
//! Limits checked here: attention head shapes as above; a block serves the query heads of one kv
//! head (the gathered rows read once for all of them), or, when their shared memory would pass
//! [`ATTN_SMEM_LIMIT`] (96 KiB, opted into above 48 KiB), an even split of them over `nch`
//! blocks ([`head_chunks`]; e.g. the latent shape at 16 heads: 2 blocks per token forward, 2
//! backward). The other kernels' shared memory must fit the default 48 KiB: KL `n_index_heads · index_dim ≤ 8192`, `n_index_heads ≤
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

/// The sparse-attention kernels' per-head (d_qk, d_v) pairs (kernel suffixes d64, d128, q96v64,
/// q192v128; values a separate tensor).
pub const DSA_SHAPES: [(usize, usize); 4] = [(64, 64), (128, 128), (96, 64), (192, 128)];
/// MQA over MLA's latent (V3.2's sparse attention): one key head (h_kv = 1) of width
/// kv_lora_rank + d_rope = 576, the values its first kv_lora_rank = 512 columns.
pub const LATENT_SHAPE: (usize, usize) = (576, 512);
/// Shared memory a sparse-attention block may use (opted into above 48 KiB; every device of
/// compute capability 8.0 or more allows it).
pub const ATTN_SMEM_LIMIT: usize = 96 * 1024;
const FWD_NAMES: [&str; 5] =
    ["dsa_fwd_d64", "dsa_fwd_d128", "dsa_fwd_q96v64", "dsa_fwd_q192v128", "dsa_fwd_latent_q576v512"];
const BWD_NAMES: [&str; 5] =
    ["dsa_bwd_d64", "dsa_bwd_d128", "dsa_bwd_q96v64", "dsa_bwd_q192v128", "dsa_bwd_latent_q576v512"];

/// A kernel's head shape: (d_qk, d_v, values = the key rows' first d_v columns).
type Shape = (usize, usize, bool);

/// Dynamic shared memory of `dsa_fwd_*` for `hb` heads per block (mirrors `fwd_smem` in dsa.cu).
fn fwd_smem((d, dv, vk): Shape, hb: usize) -> usize {
    let rows = if vk { KT * (d + 2) } else { KT * (d + 2) + KT * (dv + 2) };
    (hb * dv + 2 * hb + KT + 1) * 4 + (rows + hb * d) * 2
}

/// Dynamic shared memory of `dsa_bwd_*` for `hb` heads per block (mirrors `bwd_smem` in dsa.cu).
fn bwd_smem((d, dv, vk): Shape, hb: usize) -> usize {
    let rows = if vk { KT * (d + 2) } else { KT * (d + 2) + KT * (dv + 2) };
    (hb * d + 2 * hb + 2 * hb * KT + KT + 1) * 4 + (rows + hb * (d + dv)) * 2
}

/// (blocks per kv group `nch`, shared memory per block) for a group of `gs` query heads: the
/// fewest blocks whose `ceil(gs / nch)` heads fit [`ATTN_SMEM_LIMIT`] (None when one head does not).
pub fn head_chunks(shape: Shape, gs: usize, smem_of: fn(Shape, usize) -> usize) -> Option<(usize, usize)> {
    (1..=gs.max(1)).map(|n| (n, smem_of(shape, gs.div_ceil(n)))).find(|&(_, smem)| smem <= ATTN_SMEM_LIMIT)
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

/// The shape rules of the sparse-attention kernels: (kernel index, blocks per kv group, dynamic
/// shared memory) of head shape (dims.d, dv) (the latent kernel when `latent`).
fn check_attn(
    what: &str,
    dims: &DsaDims,
    dv: usize,
    latent: bool,
    smem_of: fn(Shape, usize) -> usize,
) -> CudaResult<(usize, usize, usize)> {
    let kernel = if latent {
        check((dims.d, dv) == LATENT_SHAPE && dims.h_kv == 1, || {
            format!(
                "{what}: the latent kernel is (d_qk, d_v) = {LATENT_SHAPE:?} with h_kv = 1, got ({}, {dv}), h_kv {}",
                dims.d, dims.h_kv
            )
        })?;
        4
    } else {
        DSA_SHAPES.iter().position(|&s| s == (dims.d, dv)).ok_or_else(|| {
            super::CudaError(format!(
                "{what}: head shape (d_qk {}, d_v {dv}) has no CUDA kernel (supported: {DSA_SHAPES:?}, and the \
                 latent {LATENT_SHAPE:?} through dsa_attention_latent_*)",
                dims.d
            ))
        })?
    };
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || format!("dsa: h must be a multiple of h_kv ({dims:?})"))?;
    let gs = dims.h / dims.h_kv;
    let (nch, smem) = head_chunks((dims.d, dv, latent), gs, smem_of)
        .ok_or_else(|| super::CudaError(format!("{what}: one query head needs more than {ATTN_SMEM_LIMIT} B")))?;
    check(dims.b * dims.h_kv * nch <= 65_535, || format!("dsa: b * h_kv * {nch} blocks must be <= 65535 ({dims:?})"))?;
    Ok((kernel, nch, smem))
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
/// scores); d_v = d.
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
    dsa_attention_forward_dv(be, dims, dims.d, q, k, v, sel, out, lse)
}

/// [`dsa_attention_forward`] with values `dv` wide: v `[b, t, h_kv, dv]`, out `[b, t, h, dv]`.
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_forward_dv(
    be: &CudaBackend,
    dims: &DsaDims,
    dv: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let vl = dims.kv_len() / dims.d.max(1) * dv;
    check(v.len() == vl, || "dsa: v must be [b,t,h_kv,dv]".into())?;
    fwd(be, dims, dv, false, [q, k, v], sel, out, lse)
}

/// MQA over MLA's latent (V3.2's sparse attention): q `[b, t, h, 576]`, one key head kv
/// `[b, t, 1, 576]` (`[c_kv | k_pe]`), the values its first 512 columns (`c_kv`), read from kv
/// (each block gathers a selected row once for all the heads it serves); out `[b, t, h, 512]`,
/// lse `[b, h, t]`. dims.d = 576, dims.h_kv = 1.
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_latent_forward(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    kv: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    fwd(be, dims, LATENT_SHAPE.1, true, [q, kv, kv], sel, out, lse)
}

#[allow(clippy::too_many_arguments)]
fn fwd(
    be: &CudaBackend,
    dims: &DsaDims,
    dv: usize,
    latent: bool,
    [q, k, v]: [&DeviceBuffer<bf16>; 3],
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let (kernel, nch, smem) = check_attn("dsa_attention_forward", dims, dv, latent, fwd_smem)?;
    let ol = dims.q_len() / dims.d * dv;
    check(q.len() == dims.q_len() && out.len() == ol, || "dsa: q/out must be [b,t,h,d]/[b,t,h,dv]".into())?;
    check(k.len() == dims.kv_len(), || "dsa: k must be [b,t,h_kv,d]".into())?;
    check(lse.len() == dims.lse_len(), || "dsa: lse must be [b,h,t]".into())?;
    check(sel.len() == dims.sel_len(), || "dsa: sel must be [b,t,kmax]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    (p.q, p.k, p.v, p.sel, p.out, p.lse) = (q.ptr(), k.ptr(), v.ptr(), sel.ptr(), out.ptr(), lse.ptr());
    let grid = (dims.t as u32, (dims.b * dims.h_kv * nch) as u32, 1);
    be.launch("dsa", FWD_NAMES[kernel], grid, 128, smem as u32, &p)
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
    grads: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    dsa_attention_backward_dv(be, dims, dims.d, q, k, v, sel, out, lse, dout, grads)
}

/// [`dsa_attention_backward`] with values `dv` wide (v, dv `[b, t, h_kv, dv]`; out, dout
/// `[b, t, h, dv]`).
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_backward_dv(
    be: &CudaBackend,
    dims: &DsaDims,
    dv_width: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let vl = dims.kv_len() / dims.d.max(1) * dv_width;
    check(v.len() == vl && dv.len() == vl, || "dsa_attention_backward: v/dv must be [b,t,h_kv,dv]".into())?;
    dv.fill_zero()?;
    bwd(be, dims, dv_width, false, [q, k, v], sel, out, lse, dout, [dq, dk, dv])
}

/// Gradients of [`dsa_attention_latent_forward`] in f32: dq `[b, t, h, 576]` (overwritten) and
/// dkv `[b, t, 1, 576]` (zeroed here, then scatter-added: the keys' gradient, plus the values'
/// in its first 512 columns).
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_latent_backward(
    be: &CudaBackend,
    dims: &DsaDims,
    q: &DeviceBuffer<bf16>,
    kv: &DeviceBuffer<bf16>,
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dkv]: [&DeviceBuffer<f32>; 2],
) -> CudaResult<()> {
    bwd(be, dims, LATENT_SHAPE.1, true, [q, kv, kv], sel, out, lse, dout, [dq, dkv, dkv])
}

#[allow(clippy::too_many_arguments)]
fn bwd(
    be: &CudaBackend,
    dims: &DsaDims,
    dv_width: usize,
    latent: bool,
    [q, k, v]: [&DeviceBuffer<bf16>; 3],
    sel: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let mut p = base_params(dims)?;
    let (kernel, nch, smem) = check_attn("dsa_attention_backward", dims, dv_width, latent, bwd_smem)?;
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    let ol = ql / dims.d * dv_width;
    check(q.len() == ql && dq.len() == ql && out.len() == ol && dout.len() == ol, || {
        "dsa_attention_backward: q/dq must be [b,t,h,d], out/dout [b,t,h,dv]".into()
    })?;
    check(k.len() == kl && dk.len() == kl, || "dsa_attention_backward: k/dk must be [b,t,h_kv,d]".into())?;
    check(lse.len() == dims.lse_len(), || "dsa_attention_backward: lse must be [b,h,t]".into())?;
    check(sel.len() == dims.sel_len(), || "dsa_attention_backward: sel must be [b,t,kmax]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    dk.fill_zero()?;
    (p.q, p.k, p.v, p.sel, p.out, p.lse, p.dout) =
        (q.ptr(), k.ptr(), v.ptr(), sel.ptr(), out.ptr(), lse.ptr(), dout.ptr());
    (p.dq, p.dk, p.dv) = (dq.ptr(), dk.ptr(), dv.ptr());
    let grid = (dims.t as u32, (dims.b * dims.h_kv * nch) as u32, 1);
    be.launch("dsa", BWD_NAMES[kernel], grid, 128, smem as u32, &p)
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
    let (_, nch, smem) = check_attn("dsa_attention_decode", dims, dims.d, false, fwd_smem)?;
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
    be.launch("dsa", name, (1, (dims.b * dims.h_kv * nch) as u32, 1), 128, smem as u32, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same figures as the `static_assert` at the end of dsa.cu.
    #[test]
    fn smem_sizes_match_the_kernels() {
        assert_eq!(fwd_smem((64, 64, false), 4), 10148);
        assert_eq!(bwd_smem((128, 128, false), 4), 21924);
        assert_eq!(kl_smem(64, 128, 128, 16, 2), 42180);
        assert_eq!(dec_scores_smem(64, 128), 33280);
        assert!(bwd_smem((128, 128, false), 24) <= SMEM_LIMIT && fwd_smem((128, 128, false), 24) <= SMEM_LIMIT);
    }

    #[test]
    fn head_chunks_fit_and_split_evenly() {
        let latent = (576, 512, true);
        // 16 heads: two blocks of 8 per token, forward and backward
        assert_eq!(head_chunks(latent, 16, fwd_smem).map(|c| c.0), Some(1));
        assert_eq!(head_chunks(latent, 16, bwd_smem).map(|c| c.0), Some(2));
        for gs in [1, 3, 16, 64, 128] {
            for smem_of in [fwd_smem as fn(Shape, usize) -> usize, bwd_smem] {
                let (nch, smem) = head_chunks(latent, gs, smem_of).unwrap();
                assert!(smem <= ATTN_SMEM_LIMIT && smem == smem_of(latent, gs.div_ceil(nch)));
                assert!(nch == 1 || smem_of(latent, gs.div_ceil(nch - 1)) > ATTN_SMEM_LIMIT);
            }
        }
        for (d, dv) in DSA_SHAPES {
            assert_eq!(head_chunks((d, dv, false), 8, bwd_smem).map(|c| c.0), Some(1), "({d}, {dv})");
        }
    }

    #[test]
    fn chunks_cover_the_rows() {
        assert_eq!(chunk_rows(100, SCORE_WORKSPACE), 128);
        assert_eq!(chunk_rows(1 << 17, SCORE_WORKSPACE), 512);
        assert_eq!(chunk_rows(1 << 22, SCORE_WORKSPACE), 64);
        assert_eq!(chunk_rows(0, SCORE_WORKSPACE), 64);
    }
}
