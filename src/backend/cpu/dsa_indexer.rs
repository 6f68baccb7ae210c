//! The DSA lightning indexer's scores and its top-k key selection (module doc of [`super`]).

use super::{check_lens, relu, DsaDims, BLOCK_K, BLOCK_Q, PAD};
use crate::backend::cpu::blocks::{with_avx2, with_scratch};
use crate::backend::cpu::gemm::{gemm_strided, Strided};
use rayon::prelude::*;

/// `x` ← `X = Q̃ K̃ᵀ` for the query rows `i0..i0 + tq` and keys `s0..s0 + nk` of batch `bi`:
/// `[tq·H_I, nk]`, row `i·H_I + j` for query `i0 + i`, head `j`.
pub(super) fn index_x(
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
pub(super) fn weigh(
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
pub(super) fn order_key(x: f32) -> u32 {
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
