//! DeepSeek Sparse Attention (DSA) on the CPU: the lightning indexer and its top-k key selection,
//! softmax attention over the selected keys (forward and backward, grouped-query attention) and
//! the indexer's KL distillation loss with its gradients. Layouts and numerics as in
//! [`super::attention`]: q `[b, t, h, d]`, k, v `[b, t, h_kv, d]`, lse `[b, h, t]`, query head `i`
//! reads kv head `i / (h / h_kv)`.
//!
//! **Indexer.** Per token `t`: `H_I` index queries `q̃(t, j)` of width `d_I` (qi `[b, t, H_I, d_I]`),
//! one index key `k̃(t)` shared by the heads (ki `[b, t, d_I]`) and head weights `w(t, j)` (wi
//! `[b, t, H_I]`, already scaled by the caller):
//!
//! ```text
//! X(t, j, s) = q̃(t, j)·k̃(s)          I(t, s) = Σ_j w(t, j)·ReLU(X(t, j, s))        (s ≤ t)
//! ```
//!
//! **Selection** ([`indexer_topk`]), with `k = topk`, `W = window`: the `W` most recent keys
//! `t − W < s ≤ t` are always selected; among the older keys `s ≤ t − W` the `k` with the largest
//! `I(t, s)` are added (all of them when there are at most `k`). So `|A(t)| = min(t + 1, k + W)`,
//! and `k + W ≥ t + 1` selects every key (dense causal attention). **Ties:** keys are ranked by the
//! pair `(I(t, s), s)` in decreasing order, so at equal scores the more recent key wins (an indexer
//! whose scores are all equal, e.g. every ReLU dead, degrades to a sliding window). Scores are
//! compared exactly as f32 values (`−0 = +0`; a NaN ranks beyond ±inf by its sign). `sel[b, t, ·]`
//! holds `A(t)` in increasing order, then [`PAD`] up to `kmax = min(k + W, T)` entries.
//!
//! **Sparse attention** ([`dsa_attention_forward`], [`dsa_attention_backward`]) over any `sel` whose
//! rows are non-empty and causal (the entries of a row before its first [`PAD`], in any order):
//!
//! ```text
//! S(t, s) = q(t)·k(s) / sqrt(d)   lse(t) = log Σ_{s∈A(t)} exp S(t, s)   P = exp(S − lse)
//! out(t)  = Σ_{s∈A(t)} P(t, s) v(s)
//! D(t) = dout(t)·out(t)           dS = P ∘ (dout(t)·v(s) − D(t)) / sqrt(d)
//! dq(t) = Σ_s dS k(s)             dk(s) += dS q(t)              dv(s) += P dout(t)
//! ```
//!
//! **Indexer loss** ([`indexer_kl`]). Over a key set `S(t)` (dense: every `s ≤ t`, during warm-up;
//! sparse: `A(t)`), with the attention's `lse` over that same set (dense or sparse), the target is
//! the head-summed attention, L1-normalised, and the indexer distribution a softmax of `I`:
//!
//! ```text
//! p(t, s) = Σ_h exp(S_h(t, s) − lse_h(t)) / Z(t)      (Z(t) = Σ_{s∈S(t)} Σ_h … = h when lse matches)
//! r(t, s) = exp(I(t, s) − lse_I(t))                  lse_I(t) = log Σ_{s∈S(t)} exp I(t, s)
//! L = 1/(B·T) Σ_{b,t} KL(p(t, ·) ‖ r(t, ·))
//! ∂L/∂I = G = (r − p)/(B·T)       ∂L/∂w(t, j) = Σ_s G·ReLU(X)       ∂L/∂X = G·w·[X > 0]
//! ∂L/∂q̃(t, j) = Σ_s ∂L/∂X · k̃(s)  ∂L/∂k̃(s) = Σ_{t, j} ∂L/∂X · q̃(t, j)
//! ```
//!
//! The target is detached: no gradient flows to q, k (nor to lse).
//!
//! **Cost and memory.** The indexer scores a block of [`BLOCK_Q`] queries against key chunks of
//! [`BLOCK_K`] with one GEMM per chunk (`X = Q̃ K̃ᵀ`, the block's `H_I` heads as `BLOCK_Q·H_I` rows),
//! then ReLU and the weighted head sum; each query's row of `I` is then partially selected
//! (`select_nth_unstable` on `(score, index)` packed into one `u64`, `O(t)`), and only the `k`
//! winners are sorted. That is `O(T²·H_I·d_I)` time, but narrow, and `O(BLOCK_Q·T)` scratch per
//! task. The sparse attention gathers, per query and kv head, the selected rows of k, v into
//! contiguous `[|A|, d]` blocks (prefetching ahead, as they are scattered) and processes the
//! group's query heads together with small GEMMs (`S = Q Kᵀ`, `O = P V`; backward `dP = dO Vᵀ`,
//! `dQ = dS K`), `dk`, `dv` being scatter-added row by row: `O(T·|A|·d)` per head, linear in `T`
//! at fixed `|A|`. The dense KL runs two blocked passes, `O(T²·(h·d + H_I·d_I))`; the sparse one
//! `O(T·|A|·…)`. Nothing `T × T` is ever held.
//!
//! **Parallelism and determinism.** The indexer, the attention forward and the first KL pass run
//! one rayon task per (batch, block of [`BLOCK_Q`] queries). The attention backward runs one task
//! per (batch, kv head), visiting queries then heads in a fixed order and accumulating `dk`, `dv`
//! in `[t, d]` buffers. The KL's `dki` is computed per (batch, block of [`BLOCK_Q`] keys): densely,
//! by a second pass that recomputes the key block's scores against every later query block;
//! sparsely, from the gradients `G` saved per selected entry and the selection transposed per key
//! (each key's queries in increasing order). Every output element is written by one task, GEMMs
//! are single-threaded inside tasks and all sums have a fixed order: bitwise reproducible for any
//! thread count. Element-wise loops are compiled for AVX2 where available, with identical results.
//!
//! **Files.** The sparse attention's loops are the gathered core [`super::flash_gather`] (this
//! file holds the shapes, their checks and the selection as a key list); the indexer scores and
//! top-k selection are in `dsa_indexer.rs`, the indexer KL loss in `dsa_kl.rs`, the tests in
//! `dsa_tests.rs` and `dsa_kl_tests.rs` (child modules of this one).

use super::attention::AttnDims;
use super::flash::FlashDims;
use super::flash_gather::{self, KeyList};

#[path = "dsa_indexer.rs"]
mod indexer;
#[path = "dsa_kl.rs"]
mod kl;

pub use indexer::indexer_topk;
pub use kl::indexer_kl;

/// Query rows per block (indexer, attention forward, KL), and keys per block of the KL's `dki`.
pub const BLOCK_Q: usize = 64;
/// Keys per chunk when a query block is scored densely (indexer, dense KL).
pub const BLOCK_K: usize = 256;
/// Padding of the rows of `sel`.
pub const PAD: u32 = u32::MAX;

/// Shapes of one call. Attention layouts as in [`AttnDims`] (q, out, dout, dq: `[b, t, h, d]`;
/// k, v, dk, dv: `[b, t, h_kv, d]`; lse: `[b, h, t]`); indexer: qi, dqi `[b, t, n_index_heads,
/// index_dim]`, ki, dki `[b, t, index_dim]`, wi, dwi `[b, t, n_index_heads]`; sel `[b, t, kmax]`.
/// `topk` and `window` (0 = none) define the selection (module doc); `topk + window ≥ 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsaDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
    pub n_index_heads: usize,
    pub index_dim: usize,
    pub topk: usize,
    pub window: usize,
}

fn checked_len(factors: &[usize]) -> usize {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f)).expect("dsa: tensor size overflows usize")
}

impl DsaDims {
    /// The shapes in field order.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: usize,
        t: usize,
        h: usize,
        h_kv: usize,
        d: usize,
        n_index_heads: usize,
        index_dim: usize,
        topk: usize,
        window: usize,
    ) -> Self {
        DsaDims { b, t, h, h_kv, d, n_index_heads, index_dim, topk, window }
    }

    /// The dense attention shapes (same b, t, h, h_kv, d).
    pub fn attn(&self) -> AttnDims {
        AttnDims { b: self.b, t: self.t, h: self.h, h_kv: self.h_kv, d: self.d }
    }

    /// Number of elements of `q`, `out`, `dout`, `dq`: `b * t * h * d`.
    pub fn q_len(&self) -> usize {
        self.attn().q_len()
    }

    /// Number of elements of `k`, `v`, `dk`, `dv`: `b * t * h_kv * d`.
    pub fn kv_len(&self) -> usize {
        self.attn().kv_len()
    }

    /// Number of elements of `lse`: `b * h * t`.
    pub fn lse_len(&self) -> usize {
        self.attn().lse_len()
    }

    /// Number of elements of `qi`, `dqi`: `b * t * n_index_heads * index_dim`.
    pub fn qi_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.n_index_heads, self.index_dim])
    }

    /// Number of elements of `ki`, `dki`: `b * t * index_dim`.
    pub fn ki_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.index_dim])
    }

    /// Number of elements of `wi`, `dwi`: `b * t * n_index_heads`.
    pub fn wi_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.n_index_heads])
    }

    /// Entries per row of `sel`: `min(topk + window, t)`.
    pub fn kmax(&self) -> usize {
        self.topk.saturating_add(self.window).min(self.t)
    }

    /// Number of elements of `sel`: `b * t * kmax`.
    pub fn sel_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.kmax()])
    }

    /// Keys [`indexer_topk`] selects for token `i`: `min(i + 1, topk + window)`.
    pub fn n_selected(&self, i: usize) -> usize {
        (i + 1).min(self.topk.saturating_add(self.window))
    }

    fn group(&self) -> usize {
        self.h / self.h_kv
    }

    fn validate_attn(&self) {
        assert!(self.d > 0, "dsa: head dim d must be > 0 (got {self:?})");
        assert!(self.h > 0 && self.h_kv > 0, "dsa: h and h_kv must be > 0 (got {self:?})");
        assert!(self.h % self.h_kv == 0, "dsa: h ({}) must be a multiple of h_kv ({})", self.h, self.h_kv);
        assert!(self.topk.saturating_add(self.window) > 0, "dsa: topk + window must be >= 1 (got {self:?})");
        assert!(self.t < PAD as usize, "dsa: t must be < 2^32 - 1 (got {self:?})");
    }

    fn validate_indexer(&self) {
        assert!(self.n_index_heads > 0 && self.index_dim > 0, "dsa: indexer heads and dim must be > 0 ({self:?})");
        assert!(self.topk.saturating_add(self.window) > 0, "dsa: topk + window must be >= 1 (got {self:?})");
        assert!(self.t < PAD as usize, "dsa: t must be < 2^32 - 1 (got {self:?})");
    }

    /// Query block `qb`: (first row, rows).
    fn q_block(&self, qb: usize) -> (usize, usize) {
        let i0 = qb * BLOCK_Q;
        (i0, BLOCK_Q.min(self.t - i0))
    }

    fn q_off(&self, bi: usize, i: usize, hq: usize) -> usize {
        ((bi * self.t + i) * self.h + hq) * self.d
    }

    fn kv_off(&self, bi: usize, s: usize, g: usize) -> usize {
        ((bi * self.t + s) * self.h_kv + g) * self.d
    }

    /// Offset of token `i`'s first index query (head 0) in qi-shaped tensors.
    fn qi_off(&self, bi: usize, i: usize) -> usize {
        (bi * self.t + i) * self.n_index_heads * self.index_dim
    }

    fn ki_off(&self, bi: usize, s: usize) -> usize {
        (bi * self.t + s) * self.index_dim
    }

    fn wi_off(&self, bi: usize, i: usize) -> usize {
        (bi * self.t + i) * self.n_index_heads
    }
}

fn check_lens(dims: &DsaDims, tensors: &[(&str, usize, usize)]) {
    for &(name, got, want) in tensors {
        assert_eq!(got, want, "dsa: `{name}` has length {got}, expected {want} for {dims:?}");
    }
}

/// The keys of query `i` of batch `bi`: its `sel` entries before the first [`PAD`]. Panics unless
/// they are non-empty and causal.
fn sel_row<'a>(dims: &DsaDims, sel: &'a [u32], bi: usize, i: usize) -> &'a [u32] {
    let kmax = dims.kmax();
    let row = &sel[(bi * dims.t + i) * kmax..][..kmax];
    let row = &row[..row.iter().position(|&s| s == PAD).unwrap_or(kmax)];
    assert!(
        !row.is_empty() && row.iter().all(|&s| s as usize <= i),
        "dsa: sel row (b {bi}, t {i}) must be non-empty with entries <= {i}, got {row:?}"
    );
    row
}

#[inline(always)]
fn relu(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Sparse attention
// ---------------------------------------------------------------------------------------------

/// The rows of `sel` as the key lists of [`flash_gather`] (each row checked by [`sel_row`]).
struct Selection<'a> {
    dims: &'a DsaDims,
    sel: &'a [u32],
}

impl KeyList for Selection<'_> {
    fn max_keys(&self) -> usize {
        self.dims.kmax()
    }

    #[inline(always)]
    fn keys(&self, bi: usize, i: usize) -> &[u32] {
        sel_row(self.dims, self.sel, bi, i)
    }
}

impl DsaDims {
    /// The core's head shapes (queries and keys `d` wide, values `dv`).
    fn flash(&self, dv: usize) -> FlashDims {
        self.attn().flash(dv)
    }
}

/// Softmax attention of each query over its selected keys `sel` (module doc): writes `out` and the
/// per-row log-sum-exp of the scaled scores (natural log) into `lse`.
pub fn dsa_attention_forward(
    dims: &DsaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    dsa_attention_forward_dv(dims, dims.d, [q, k, v], sel, out, lse)
}

/// [`dsa_attention_forward`] with values (and outputs) `dv` wide; q and k stay `d` wide (as
/// `attention::attention_forward_dv`).
pub fn dsa_attention_forward_dv(
    dims: &DsaDims,
    dv: usize,
    [q, k, v]: [&[f32]; 3],
    sel: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    dims.validate_attn();
    assert!(dv > 0, "dsa: value width dv must be > 0 (got {dims:?})");
    let (ql, kvl, a) = (dims.q_len(), dims.kv_len(), dims.attn());
    let (vl, ol) = (a.v_len(dv), a.out_len(dv));
    check_lens(dims, &[("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), vl), ("out", out.len(), ol)]);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len()), ("sel", sel.len(), dims.sel_len())]);
    flash_gather::forward(&dims.flash(dv), &Selection { dims, sel }, q, k, v, out, lse);
}

/// Gradients of [`dsa_attention_forward`] given `dout`; overwrites `dq`, `dk`, `dv`. Uses only
/// q, k, v, sel, out, lse.
#[allow(clippy::too_many_arguments)]
pub fn dsa_attention_backward(
    dims: &DsaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    dsa_attention_backward_dv(dims, dims.d, [q, k, v, out, lse], sel, dout, [dq, dk, dv])
}

/// [`dsa_attention_backward`] with values `dv_width` wide.
pub fn dsa_attention_backward_dv(
    dims: &DsaDims,
    dv_width: usize,
    [q, k, v, out, lse]: [&[f32]; 5],
    sel: &[u32],
    dout: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    dims.validate_attn();
    let (ql, kvl, a) = (dims.q_len(), dims.kv_len(), dims.attn());
    let (vl, ol) = (a.v_len(dv_width), a.out_len(dv_width));
    check_lens(dims, &[("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), vl), ("out", out.len(), ol)]);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len()), ("sel", sel.len(), dims.sel_len())]);
    check_lens(dims, &[("dout", dout.len(), ol), ("dq", dq.len(), ql), ("dk", dk.len(), kvl), ("dv", dv.len(), vl)]);
    let keys = Selection { dims, sel };
    flash_gather::backward(&dims.flash(dv_width), &keys, [q, k, v, out, lse], dout, [dq, dk, dv]);
}

#[cfg(test)]
#[path = "dsa_tests.rs"]
mod tests;
