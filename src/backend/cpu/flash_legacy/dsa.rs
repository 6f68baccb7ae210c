//! Test-only verbatim copy of the pre-`flash` `cpu/dsa.rs` (its indexer KL loss in `dsa_kl.rs`) (HEAD 206b9c7, module doc and
//! tests removed, `super::` paths of the shared helpers made absolute): the oracle of the
//! bitwise-preservation tests in [`super`].

use super::attention::AttnDims;
use super::blocks::{with_avx2, with_scratch, SharedOut};
use crate::backend::cpu::gemm::{gemm_strided, Strided};
use crate::backend::cpu::math;
use rayon::prelude::*;
use std::f32::consts::{LN_2, LOG2_E};

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
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
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
// Indexer scores and selection
// ---------------------------------------------------------------------------------------------

/// `x` ← `X = Q̃ K̃ᵀ` for the query rows `i0..i0 + tq` and keys `s0..s0 + nk` of batch `bi`:
/// `[tq·H_I, nk]`, row `i·H_I + j` for query `i0 + i`, head `j`.
fn index_x(
    dims: &DsaDims,
    qi: &[f32],
    ki: &[f32],
    bi: usize,
    (i0, tq): (usize, usize),
    (s0, nk): (usize, usize),
    x: &mut [f32],
) {
    let (hi, di) = (dims.n_index_heads, dims.index_dim);
    let q_blk = Strided::rows(qi, dims.qi_off(bi, i0), di);
    let k_blk = Strided::rows(ki, dims.ki_off(bi, s0), di);
    gemm_strided(tq * hi, nk, di, q_blk, k_blk.t(), x, nk, false);
}

/// Row `i` of `scores` (row stride `ld`) ← `I = Σ_j w(i0 + i, j)·ReLU(X)` from [`index_x`]'s `x`
/// (`nk` keys). The heads are added in order, starting from +0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weigh(
    dims: &DsaDims,
    wi: &[f32],
    bi: usize,
    i0: usize,
    tq: usize,
    nk: usize,
    x: &[f32],
    scores: &mut [f32],
    ld: usize,
) {
    let hi = dims.n_index_heads;
    for i in 0..tq {
        let row = &mut scores[i * ld..][..nk];
        row.fill(0.0);
        for (j, &wj) in wi[dims.wi_off(bi, i0 + i)..][..hi].iter().enumerate() {
            for (r, &xv) in row.iter_mut().zip(&x[(i * hi + j) * nk..][..nk]) {
                *r += wj * relu(xv);
            }
        }
    }
}

/// Maps f32 onto u32 preserving order (a total order: `−0` is taken as `+0`; a NaN ranks beyond
/// ±inf by its sign bit).
#[inline(always)]
fn order_key(x: f32) -> u32 {
    // `x + 0.0` turns −0 into +0 and leaves every other value unchanged.
    let b = (x + 0.0).to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 1 << 31
    }
}

/// Writes `A(i)` into `out` (`kmax` entries: ascending, then [`PAD`]) from the scores
/// `I(i, 0..=i)` (`scores.len() = i + 1`); `keys` is scratch.
fn select_row(topk: usize, window: usize, scores: &[f32], keys: &mut Vec<u64>, out: &mut [u32]) {
    let n = scores.len();
    // Keys old..n are the window; the top-k are chosen among 0..old.
    let old = n.saturating_sub(window);
    let n_top = topk.min(old);
    if n_top == old {
        out.iter_mut().zip(0..old as u32).for_each(|(o, s)| *o = s);
    } else if n_top > 0 {
        keys.clear();
        keys.extend(scores[..old].iter().zip(0u32..).map(|(&x, s)| u64::from(order_key(x)) << 32 | u64::from(s)));
        // The packed keys are distinct, so the `n_top` largest are one exact set.
        keys.select_nth_unstable_by(n_top - 1, |a, b| b.cmp(a));
        out.iter_mut().zip(&keys[..n_top]).for_each(|(o, &key)| *o = key as u32);
        out[..n_top].sort_unstable();
    }
    out[n_top..].iter_mut().zip(old as u32..n as u32).for_each(|(o, s)| *o = s);
    out[n_top + n - old..].fill(PAD);
}

/// Top-k selection of the lightning indexer (module doc): writes `sel` (`[b, t, kmax]`, each row
/// `A(t)` ascending, padded with [`PAD`]) from qi `[b, t, H_I, d_I]`, ki `[b, t, d_I]`, wi
/// `[b, t, H_I]`.
pub fn indexer_topk(dims: &DsaDims, qi: &[f32], ki: &[f32], wi: &[f32], sel: &mut [u32]) {
    dims.validate_indexer();
    let lens = [("qi", qi.len(), dims.qi_len()), ("ki", ki.len(), dims.ki_len()), ("wi", wi.len(), dims.wi_len())];
    check_lens(dims, &lens);
    check_lens(dims, &[("sel", sel.len(), dims.sel_len())]);
    let (t, kmax) = (dims.t, dims.kmax());
    if sel.is_empty() {
        return;
    }
    sel.par_chunks_mut(t * kmax).enumerate().for_each(|(bi, sel_b)| {
        sel_b.par_chunks_mut(BLOCK_Q * kmax).enumerate().for_each(|(qb, sel_blk)| {
            with_avx2(
                #[inline(always)]
                || topk_block(dims, qi, ki, wi, bi, qb, sel_blk),
            )
        })
    });
}

/// [`indexer_topk`] for one (batch `bi`, query block `qb`): scores `[tq, i1]` (keys `0..i1`, in
/// chunks of [`BLOCK_K`]), then one selection per row.
#[inline(always)]
fn topk_block(dims: &DsaDims, qi: &[f32], ki: &[f32], wi: &[f32], bi: usize, qb: usize, sel_blk: &mut [u32]) {
    let (i0, tq) = dims.q_block(qb);
    let (i1, kmax) = (i0 + tq, dims.kmax());
    with_scratch(tq * i1 + tq * dims.n_index_heads * BLOCK_K, |scratch| {
        let (scores, x) = scratch.split_at_mut(tq * i1);
        for s0 in (0..i1).step_by(BLOCK_K) {
            let nk = BLOCK_K.min(i1 - s0);
            index_x(dims, qi, ki, bi, (i0, tq), (s0, nk), x);
            weigh(dims, wi, bi, i0, tq, nk, x, &mut scores[s0..], i1);
        }
        let mut keys = Vec::with_capacity(i1);
        for (i, out) in sel_blk.chunks_exact_mut(kmax).enumerate() {
            select_row(dims.topk, dims.window, &scores[i * i1..][..i0 + i + 1], &mut keys, out);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Sparse attention
// ---------------------------------------------------------------------------------------------

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
    dims.validate_attn();
    let (ql, kvl) = (dims.q_len(), dims.kv_len());
    check_lens(dims, &[("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), kvl), ("out", out.len(), ql)]);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len()), ("sel", sel.len(), dims.sel_len())]);
    let DsaDims { b, t, h, d, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let lse = SharedOut::new(lse);
    out.par_chunks_mut(t * h * d).enumerate().for_each(|(bi, out_b)| {
        out_b.par_chunks_mut(BLOCK_Q * h * d).enumerate().for_each(|(qb, out_blk)| {
            with_avx2(
                #[inline(always)]
                || forward_block(dims, q, k, v, sel, bi, qb, out_blk, lse),
            )
        })
    });
}

/// How many keys ahead [`gather_kv`] prefetches: the selected rows are scattered over k and v,
/// which at long `T` live in the last-level cache or in memory.
const PREFETCH_AHEAD: usize = 8;

/// Copies the rows of kv head `g` of the keys `keys` of batch `bi` from k and v into `k_sel`,
/// `v_sel` (`[keys.len(), d]`, contiguous), prefetching the rows [`PREFETCH_AHEAD`] keys ahead.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gather_kv(
    dims: &DsaDims,
    k: &[f32],
    v: &[f32],
    bi: usize,
    g: usize,
    keys: &[u32],
    k_sel: &mut [f32],
    v_sel: &mut [f32],
) {
    let d = dims.d;
    for (m, (&s, (k_row, v_row))) in
        keys.iter().zip(k_sel.chunks_exact_mut(d).zip(v_sel.chunks_exact_mut(d))).enumerate()
    {
        if let Some(&ahead) = keys.get(m + PREFETCH_AHEAD) {
            let off = dims.kv_off(bi, ahead as usize, g);
            prefetch(&k[off..][..d]);
            prefetch(&v[off..][..d]);
        }
        let off = dims.kv_off(bi, s as usize, g);
        k_row.copy_from_slice(&k[off..][..d]);
        v_row.copy_from_slice(&v[off..][..d]);
    }
}

/// Hints the CPU to load `x` into its caches (no effect on results).
#[inline(always)]
fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(16) {
        // SAFETY: a prefetch of an address inside a live slice; it never faults nor writes.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Forward for one (batch `bi`, query block `qb`), all heads: `out_blk` (`[tq, h, d]`) and the
/// block's entries of `lse`. Per query and kv head, the selected k, v rows are gathered into
/// contiguous `[n, d]` blocks, and the group's query heads are processed together by two GEMMs:
/// `S = Q Kᵀ` (`[group, n]`), then `O = P V` (`[group, d]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_block(
    dims: &DsaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    bi: usize,
    qb: usize,
    out_blk: &mut [f32],
    lse: SharedOut,
) {
    let DsaDims { t, h, h_kv, d, .. } = *dims;
    let gs = dims.group();
    let c = LOG2_E * (1.0 / (d as f32).sqrt());
    let (i0, tq) = dims.q_block(qb);
    let kmax = dims.kmax();
    with_scratch(2 * kmax * d + gs * kmax + gs + h * BLOCK_Q, |scratch| {
        let (k_sel, rest) = scratch.split_at_mut(kmax * d);
        let (v_sel, rest) = rest.split_at_mut(kmax * d);
        let (p_buf, rest) = rest.split_at_mut(gs * kmax);
        let (inv_l, lse_blk) = rest.split_at_mut(gs);
        for i in 0..tq {
            let keys = sel_row(dims, sel, bi, i0 + i);
            let n = keys.len();
            let (k_sel, v_sel, p) = (&mut k_sel[..n * d], &mut v_sel[..n * d], &mut p_buf[..gs * n]);
            for g in 0..h_kv {
                gather_kv(dims, k, v, bi, g, keys, k_sel, v_sel);
                // The group's query heads are consecutive rows of q and out.
                let q_g = Strided::rows(q, dims.q_off(bi, i0 + i, g * gs), d);
                gemm_strided(gs, n, d, q_g, Strided::rows(k_sel, 0, d).t(), p, n, false);
                for (j, row) in p.chunks_exact_mut(n).enumerate() {
                    // exp base 2 with the scale folded in, as in the dense kernel.
                    let m = math::max(row) * c;
                    row.iter_mut().for_each(|x| *x = math::exp2(*x * c - m));
                    let l = math::sum(row);
                    inv_l[j] = 1.0 / l;
                    lse_blk[(g * gs + j) * BLOCK_Q + i] = m * LN_2 + l.ln();
                }
                let o = &mut out_blk[(i * h + g * gs) * d..][..gs * d];
                gemm_strided(gs, d, n, Strided::rows(p, 0, n), Strided::rows(v_sel, 0, d), o, d, false);
                for (o_h, &il) in o.chunks_exact_mut(d).zip(&*inv_l) {
                    o_h.iter_mut().for_each(|x| *x *= il);
                }
            }
        }
        for hq in 0..h {
            // SAFETY: only this task writes the lse entries of (bi, hq, block qb).
            unsafe { lse.write((bi * h + hq) * t + i0, &lse_blk[hq * BLOCK_Q..][..tq]) };
        }
    });
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
    dims.validate_attn();
    let (ql, kvl) = (dims.q_len(), dims.kv_len());
    check_lens(dims, &[("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), kvl), ("out", out.len(), ql)]);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len()), ("sel", sel.len(), dims.sel_len())]);
    check_lens(dims, &[("dout", dout.len(), ql), ("dq", dq.len(), ql), ("dk", dk.len(), kvl), ("dv", dv.len(), kvl)]);
    let DsaDims { b, t, h_kv, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let grads = [SharedOut::new(dq), SharedOut::new(dk), SharedOut::new(dv)];
    (0..b * h_kv).into_par_iter().for_each(|task| {
        with_avx2(
            #[inline(always)]
            || backward_group(dims, q, k, v, sel, out, lse, dout, task / h_kv, task % h_kv, grads),
        )
    });
}

/// Backward for one (batch `bi`, kv head `g`): writes the `dq` rows of the group's query heads
/// and the `dk`, `dv` rows of the kv head (`grads = [dq, dk, dv]`). Per query, the selected k, v
/// rows are gathered into `[n, d]` blocks and the group's heads processed together: `S = Q Kᵀ`,
/// `dP = dO Vᵀ` (`[group, n]`) and `dQ = dS K` by GEMMs; `dk`, `dv` are accumulated in `[t, d]`
/// buffers, key by key and head by head (queries in increasing order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group(
    dims: &DsaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sel: &[u32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    bi: usize,
    g: usize,
    [dq, dk, dv]: [SharedOut; 3],
) {
    let DsaDims { t, h, h_kv, d, .. } = *dims;
    let gs = dims.group();
    let scale = 1.0 / (d as f32).sqrt();
    let c = scale * LOG2_E;
    let kmax = dims.kmax();
    with_scratch(2 * t * d + 2 * kmax * d + 2 * gs * kmax + gs * d, |scratch| {
        let (dk_acc, rest) = scratch.split_at_mut(t * d);
        let (dv_acc, rest) = rest.split_at_mut(t * d);
        let (k_sel, rest) = rest.split_at_mut(kmax * d);
        let (v_sel, rest) = rest.split_at_mut(kmax * d);
        let (p_buf, rest) = rest.split_at_mut(gs * kmax);
        let (ds_buf, dq_g) = rest.split_at_mut(gs * kmax);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        for i in 0..t {
            let keys = sel_row(dims, sel, bi, i);
            let n = keys.len();
            let (k_sel, v_sel) = (&mut k_sel[..n * d], &mut v_sel[..n * d]);
            let (p, ds) = (&mut p_buf[..gs * n], &mut ds_buf[..gs * n]);
            gather_kv(dims, k, v, bi, g, keys, k_sel, v_sel);
            // The group's query heads are consecutive rows of q, dout, out and dq.
            let qo = dims.q_off(bi, i, g * gs);
            let (q_g, do_g) = (&q[qo..][..gs * d], &dout[qo..][..gs * d]);
            gemm_strided(gs, n, d, Strided::rows(q_g, 0, d), Strided::rows(k_sel, 0, d).t(), p, n, false);
            gemm_strided(gs, n, d, Strided::rows(do_g, 0, d), Strided::rows(v_sel, 0, d).t(), ds, n, false);
            for (j, (p_row, ds_row)) in p.chunks_exact_mut(n).zip(ds.chunks_exact_mut(n)).enumerate() {
                let delta = math::dot(&do_g[j * d..][..d], &out[qo + j * d..][..d]);
                let lse2 = lse[(bi * h + g * gs + j) * t + i] * LOG2_E;
                for (pm, dsm) in p_row.iter_mut().zip(ds_row.iter_mut()) {
                    *pm = math::exp2(*pm * c - lse2);
                    *dsm = *pm * (*dsm - delta) * scale;
                }
            }
            gemm_strided(gs, d, n, Strided::rows(ds, 0, n), Strided::rows(k_sel, 0, d), dq_g, d, false);
            // SAFETY: only this task writes the dq rows of the query heads of group g of batch bi.
            unsafe { dq.write(qo, dq_g) };
            for (m, &s) in keys.iter().enumerate() {
                let s = s as usize;
                for j in 0..gs {
                    axpy(&mut dk_acc[s * d..][..d], ds[j * n + m], &q_g[j * d..][..d]);
                    axpy(&mut dv_acc[s * d..][..d], p[j * n + m], &do_g[j * d..][..d]);
                }
            }
        }
        // SAFETY: only this task writes the dk, dv rows of kv head g of batch bi.
        unsafe {
            dk.write_rows(dims.kv_off(bi, 0, g), h_kv * d, dk_acc, d);
            dv.write_rows(dims.kv_off(bi, 0, g), h_kv * d, dv_acc, d);
        }
    });
}

#[path = "dsa_kl.rs"]
mod kl;
pub use kl::indexer_kl;
