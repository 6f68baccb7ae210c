//! The tiled attention core shared by the dense ([`super::attention`]) and sliding-window
//! ([`super::window_attention`]) CPU kernels: one forward and one backward, parameterised by the
//! allowed key set ([`KeySet`]) and the head shapes ([`FlashDims`], where the query/key width
//! `d_qk` and the value width `d_v` may differ). The family files keep their dims structs, their
//! key sets and their public signatures; the numerics are documented in [`super::attention`].
//!
//! Notation for one (batch, query head) pair: `Q` is `[T, d_qk]`, `K` `[T, d_qk]`, `V` `[T, d_v]`
//! (the kv head the query head maps to), `scale = 1/sqrt(d_qk)`, `A(i)` the keys query `i` sees.
//!
//! ```text
//! S = Q Kᵀ · scale (−inf outside A)    lse = log Σ_s exp S    P = exp(S − lse)    O = P V
//! dP = dO Vᵀ   D = rowsum(dO ∘ O)   dS = P ∘ (dP − D) · scale
//! dQ = dS K    dK += dSᵀ Q          dV += Pᵀ dO
//! ```
//!
//! **Tiling.** Queries go in blocks of [`BLOCK_Q`] rows `i0..i1`. A block reads only the keys of
//! its [`KeySet::segments`] (at most two disjoint increasing ranges), and its transposed scores
//! `Sᵀ` (`[nk, tq]`, one visited key per row, the rows of the first segment then those of the
//! second) come from one GEMM per segment reading `K` in place; `P·V` and the backward products
//! are split per segment likewise (accumulating into the same output). The softmax is exact (no
//! online rescaling, [`blocks::softmax_t`]): key `s` is visible to the block rows given by
//! [`KeySet::visible`], masked entries become exact zeros of `P`, denominators are summed per
//! [`BLOCK_K`] rows of `Sᵀ`, then over those tiles.
//!
//! **Parallelism, determinism, memory.** Forward: one rayon task per (batch, query block), all
//! heads. Backward: one task per (batch, kv head), visiting its query heads and blocks in a fixed
//! order and accumulating `dK`, `dV` in `[t, d]` buffers. Every output element is written by one
//! task and GEMMs are single-threaded inside tasks, so results are bitwise reproducible for any
//! thread count. Per thread: at most two `[nk, BLOCK_Q]` score blocks (plus the backward's
//! accumulators) in a reused scratch buffer; nothing `T × T`.

use super::blocks::{self, with_avx2, with_scratch, SharedOut};
use super::gemm::{gemm_strided, Strided};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per block.
pub const BLOCK_Q: usize = 64;
/// Softmax denominators are summed per this many rows of `Sᵀ` (key tile), then over those tiles.
pub const BLOCK_K: usize = 64;

/// Head shapes of one call. Row-major layouts: q, dq `[b, t, h, d_qk]`; k, dk `[b, t, h_kv, d_qk]`;
/// v, dv `[b, t, h_kv, d_v]`; out, dout `[b, t, h, d_v]`; lse `[b, h, t]`. Query head `j` reads kv
/// head `j / (h / h_kv)`. The caller validates (`h % h_kv == 0`, widths > 0, lengths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d_qk: usize,
    pub d_v: usize,
}

impl FlashDims {
    /// Query heads per kv head.
    pub(crate) fn group(&self) -> usize {
        self.h / self.h_kv
    }

    /// Offset of row `i` of (batch `bi`, query head `hq`) in tensors `[b, t, h, width]`.
    #[inline(always)]
    pub(crate) fn q_off(&self, bi: usize, i: usize, hq: usize, width: usize) -> usize {
        ((bi * self.t + i) * self.h + hq) * width
    }

    /// Offset of key row `s` of (batch `bi`, kv head `g`) in tensors `[b, t, h_kv, width]`.
    #[inline(always)]
    pub(crate) fn kv_off(&self, bi: usize, s: usize, g: usize, width: usize) -> usize {
        ((bi * self.t + s) * self.h_kv + g) * width
    }

    /// Query block `qb`: (first row `i0`, one past its last row `i1`).
    fn block(&self, qb: usize) -> (usize, usize) {
        let i0 = qb * BLOCK_Q;
        (i0, (i0 + BLOCK_Q).min(self.t))
    }
}

/// The keys each query may attend to, as the tiled core reads them.
pub(crate) trait KeySet: Sync {
    /// The only keys the query rows `i0..i1` read: two disjoint ranges in increasing order (either
    /// may be empty). Keys in them that a row does not see are masked by [`KeySet::visible`].
    fn segments(&self, i0: usize, i1: usize) -> [Range<usize>; 2];

    /// Block rows `i0 + j` (`j < tq`) that see key `s`: `j` in `lo..hi` (`lo <= hi <= tq`).
    fn visible(&self, s: usize, i0: usize, tq: usize) -> (usize, usize);
}

/// Key position of row `r` of a block's score matrix `Sᵀ`.
#[inline(always)]
fn key_at(segs: &[Range<usize>; 2], r: usize) -> usize {
    let n0 = segs[0].len();
    if r < n0 {
        r + segs[0].start
    } else {
        segs[1].start + r - n0
    }
}

/// Non-empty segments with the row of `Sᵀ` where each starts.
fn seg_rows(segs: &[Range<usize>; 2]) -> impl Iterator<Item = (usize, Range<usize>)> {
    [(0, segs[0].clone()), (segs[0].len(), segs[1].clone())].into_iter().filter(|(_, s)| !s.is_empty())
}

/// [`blocks::softmax_t`] on a query block's `Sᵀ` (`[nk, tq]`, the rows of its key segments).
#[inline(always)]
pub(crate) fn softmax_t(
    keys: &impl KeySet,
    st: &mut [f32],
    segs: &[Range<usize>; 2],
    i0: usize,
    tq: usize,
    scale: f32,
) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
    blocks::softmax_t(st, tq, scale, |r| keys.visible(key_at(segs, r), i0, tq))
}

/// [`blocks::grad_t`] on a query block's transposed blocks (`[nk, tq]`, rows as in [`softmax_t`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn grad_t(
    keys: &impl KeySet,
    p: &mut [f32],
    ds: &mut [f32],
    segs: &[Range<usize>; 2],
    i0: usize,
    tq: usize,
    scale: f32,
    lse: &[f32],
    delta: &[f32],
) {
    blocks::grad_t(p, ds, tq, scale, lse, delta, |r| keys.visible(key_at(segs, r), i0, tq))
}

/// Forward over the key set `keys`: writes `out` and the per-row log-sum-exp of the scaled scores
/// (natural log) into `lse`. Lengths are the caller's to check.
pub(crate) fn forward(
    dims: &FlashDims,
    keys: &impl KeySet,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    par_query_blocks(dims, out, lse, |bi, qb, out_blk, lse| forward_block(dims, keys, [q, k, v], bi, qb, out_blk, lse));
}

/// The forward's parallel split (both cores): runs `f(bi, qb, out_blk, lse)` for every (batch
/// `bi`, query block `qb`) as one rayon task, `out_blk` being the block's rows (`[tq, h, d_v]`,
/// all heads) of `out`; the task writes them and the block's entries of `lse`.
pub(crate) fn par_query_blocks(
    dims: &FlashDims,
    out: &mut [f32],
    lse: &mut [f32],
    f: impl Fn(usize, usize, &mut [f32], SharedOut) + Sync,
) {
    let FlashDims { b, t, h, d_v, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let lse = SharedOut::new(lse);
    out.par_chunks_mut(t * h * d_v).enumerate().for_each(|(bi, out_b)| {
        out_b.par_chunks_mut(BLOCK_Q * h * d_v).enumerate().for_each(|(qb, out_blk)| f(bi, qb, out_blk, lse))
    });
}

/// Forward for one (batch `bi`, query block `qb`), all heads: writes `out_blk` (`[tq, h, d_v]`)
/// and the block's entries of `lse`.
fn forward_block(
    dims: &FlashDims,
    keys: &impl KeySet,
    [q, k, v]: [&[f32]; 3],
    bi: usize,
    qb: usize,
    out_blk: &mut [f32],
    lse: SharedOut,
) {
    let FlashDims { t, h, h_kv, d_qk, d_v, .. } = *dims;
    let scale = 1.0 / (d_qk as f32).sqrt();
    let (i0, i1) = dims.block(qb);
    let tq = i1 - i0;
    let segs = keys.segments(i0, i1);
    let nk = segs[0].len() + segs[1].len();
    with_scratch(nk * tq, |st| {
        for hq in 0..h {
            let g = hq / dims.group();
            let q_t = Strided::new(&q[dims.q_off(bi, i0, hq, d_qk)..], 1, h * d_qk);
            for (r, seg) in seg_rows(&segs) {
                let k_seg = Strided::new(&k[dims.kv_off(bi, seg.start, g, d_qk)..], h_kv * d_qk, 1);
                gemm_strided(seg.len(), tq, d_qk, k_seg, q_t, &mut st[r * tq..], tq, false);
            }
            let (l, lse_blk) = with_avx2(
                #[inline(always)]
                || softmax_t(keys, st, &segs, i0, tq, scale),
            );
            let o = &mut out_blk[hq * d_v..];
            for (n, (r, seg)) in seg_rows(&segs).enumerate() {
                let v_seg = Strided::new(&v[dims.kv_off(bi, seg.start, g, d_v)..], h_kv * d_v, 1);
                gemm_strided(tq, d_v, seg.len(), Strided::new(&st[r * tq..], 1, tq), v_seg, o, h * d_v, n > 0);
            }
            for (o_row, &li) in o.chunks_mut(h * d_v).zip(&l) {
                let inv_l = 1.0 / li;
                o_row[..d_v].iter_mut().for_each(|x| *x *= inv_l);
            }
            // SAFETY: only this task writes the lse entries of (bi, hq, block qb).
            unsafe { lse.write((bi * h + hq) * t + i0, &lse_blk[..tq]) };
        }
    });
}

/// Gradients of [`forward`] given `dout`; overwrites `dq`, `dk`, `dv` (`grads`). Uses only
/// q, k, v, out, lse (`inputs`, in that order; nothing `T × T` saved from the forward).
pub(crate) fn backward(
    dims: &FlashDims,
    keys: &impl KeySet,
    inputs: [&[f32]; 5],
    dout: &[f32],
    grads: [&mut [f32]; 3],
) {
    par_kv_groups(dims, grads, |bi, g, grads| backward_group(dims, keys, inputs, dout, bi, g, grads));
}

/// The backward's parallel split (both cores): runs `f(bi, g, [dq, dk, dv])` for every (batch
/// `bi`, kv head `g`) as one rayon task, which writes `dk`, `dv` of that kv head and `dq` of its
/// query heads.
pub(crate) fn par_kv_groups(
    dims: &FlashDims,
    [dq, dk, dv]: [&mut [f32]; 3],
    f: impl Fn(usize, usize, [SharedOut; 3]) + Sync,
) {
    let FlashDims { b, t, h_kv, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let grads = [SharedOut::new(dq), SharedOut::new(dk), SharedOut::new(dv)];
    (0..b * h_kv).into_par_iter().for_each(|task| f(task / h_kv, task % h_kv, grads));
}

/// Backward for one (batch `bi`, kv head `g`): writes the `dq` rows of the group's query heads
/// and the `dk`, `dv` rows of the kv head (`grads = [dq, dk, dv]`).
fn backward_group(
    dims: &FlashDims,
    keys: &impl KeySet,
    [q, k, v, out, lse]: [&[f32]; 5],
    dout: &[f32],
    bi: usize,
    g: usize,
    [dq, dk, dv]: [SharedOut; 3],
) {
    let FlashDims { t, h, h_kv, d_qk, d_v, .. } = *dims;
    let scale = 1.0 / (d_qk as f32).sqrt();
    let n_blocks = t.div_ceil(BLOCK_Q);
    let blk_len = |qb| {
        let (i0, i1) = dims.block(qb);
        keys.segments(i0, i1).iter().map(|s| s.len()).sum::<usize>() * (i1 - i0)
    };
    let blk = (0..n_blocks).map(blk_len).max().unwrap();
    with_scratch(2 * blk + t * (d_qk + d_v) + BLOCK_Q * d_qk, |scratch| {
        let (p_buf, rest) = scratch.split_at_mut(blk);
        let (ds_buf, rest) = rest.split_at_mut(blk);
        let (dk_acc, rest) = rest.split_at_mut(t * d_qk);
        let (dv_acc, dq_blk) = rest.split_at_mut(t * d_v);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        for hq in g * dims.group()..(g + 1) * dims.group() {
            for qb in 0..n_blocks {
                let (i0, i1) = dims.block(qb);
                let tq = i1 - i0;
                let segs = keys.segments(i0, i1);
                let nk = segs[0].len() + segs[1].len();
                let (q_off, o_off) = (dims.q_off(bi, i0, hq, d_qk), dims.q_off(bi, i0, hq, d_v));
                let q_blk = Strided::rows(q, q_off, h * d_qk);
                let do_blk = Strided::rows(dout, o_off, h * d_v);
                // Transposed blocks `[nk, tq]`: Pᵀ (from Sᵀ) and dSᵀ (from dPᵀ).
                let (p, ds) = (&mut p_buf[..nk * tq], &mut ds_buf[..nk * tq]);
                for (r, seg) in seg_rows(&segs) {
                    let k_seg = Strided::rows(k, dims.kv_off(bi, seg.start, g, d_qk), h_kv * d_qk);
                    let v_seg = Strided::rows(v, dims.kv_off(bi, seg.start, g, d_v), h_kv * d_v);
                    gemm_strided(seg.len(), tq, d_qk, k_seg, q_blk.t(), &mut p[r * tq..], tq, false);
                    gemm_strided(seg.len(), tq, d_v, v_seg, do_blk.t(), &mut ds[r * tq..], tq, false);
                }
                let lse_blk = &lse[(bi * h + hq) * t + i0..][..tq];
                let delta = blocks::row_dots(dout, out, o_off, h * d_v, d_v, tq);
                with_avx2(
                    #[inline(always)]
                    || grad_t(keys, p, ds, &segs, i0, tq, scale, lse_blk, &delta[..tq]),
                );
                for (n, (r, seg)) in seg_rows(&segs).enumerate() {
                    let ns = seg.len();
                    let k_seg = Strided::rows(k, dims.kv_off(bi, seg.start, g, d_qk), h_kv * d_qk);
                    let (p_seg, ds_seg) = (&p[r * tq..(r + ns) * tq], &ds[r * tq..(r + ns) * tq]);
                    gemm_strided(tq, d_qk, ns, Strided::new(ds_seg, 1, tq), k_seg, dq_blk, d_qk, n > 0);
                    let dk_seg = &mut dk_acc[seg.start * d_qk..];
                    gemm_strided(ns, d_qk, tq, Strided::rows(ds_seg, 0, tq), q_blk, dk_seg, d_qk, true);
                    let dv_seg = &mut dv_acc[seg.start * d_v..];
                    gemm_strided(ns, d_v, tq, Strided::rows(p_seg, 0, tq), do_blk, dv_seg, d_v, true);
                }
                // SAFETY: only this task writes the dq rows of query head hq of batch bi.
                unsafe { dq.write_rows(q_off, h * d_qk, &dq_blk[..tq * d_qk], d_qk) };
            }
        }
        // SAFETY: only this task writes the dk, dv rows of kv head g of batch bi.
        unsafe {
            dk.write_rows(dims.kv_off(bi, 0, g, d_qk), h_kv * d_qk, dk_acc, d_qk);
            dv.write_rows(dims.kv_off(bi, 0, g, d_v), h_kv * d_v, dv_acc, d_v);
        }
    });
}

#[cfg(test)]
#[path = "flash_tests.rs"]
mod tests;
