//! Test-only verbatim copy of the pre-`flash` `cpu/window_attention.rs` (HEAD 206b9c7, module doc and
//! tests removed, `super::` paths of the shared helpers made absolute): the oracle of the
//! bitwise-preservation tests in [`super`].

use super::attention::AttnDims;
use super::blocks::{self, with_avx2, with_scratch, SharedOut};
use crate::backend::cpu::gemm::{gemm_strided, Strided};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per block (the dense kernel's: the block softmax of [`super::blocks`] is shared).
pub const BLOCK_Q: usize = super::attention::BLOCK_Q;
/// Softmax denominators are summed per this many rows of `Sᵀ`, then over those tiles.
pub const BLOCK_K: usize = super::attention::BLOCK_K;

/// Shapes of one call. Row-major layouts as in [`AttnDims`]: q, out, dout, dq: [b, t, h, d];
/// k, v, dk, dv: [b, t, h_kv, d]; lse: [b, h, t]. `window` (≥ 1) is W, `n_global` is G (any value;
/// G ≥ t makes every key global, i.e. dense causal attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
    pub window: usize,
    pub n_global: usize,
}

impl WindowDims {
    fn attn(&self) -> AttnDims {
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

    fn group(&self) -> usize {
        self.h / self.h_kv
    }

    fn validate(&self) {
        assert!(self.d > 0, "window_attention: head dim d must be > 0 (got {self:?})");
        assert!(self.h > 0 && self.h_kv > 0, "window_attention: h and h_kv must be > 0 (got {self:?})");
        assert!(self.h % self.h_kv == 0, "window_attention: h ({}) must be a multiple of h_kv ({})", self.h, self.h_kv);
        assert!(self.window > 0, "window_attention: window must be >= 1 (got {self:?})");
    }

    /// Query block `qb`: (first row `i0`, rows `tq`, [`key_segments`] of its rows).
    fn block(&self, qb: usize) -> (usize, usize, [Range<usize>; 2]) {
        let i0 = qb * BLOCK_Q;
        let i1 = (i0 + BLOCK_Q).min(self.t);
        (i0, i1 - i0, key_segments(self, i0, i1))
    }

    /// Block rows `i0 + j` (`j < tq`) that see key `s`: `j` in `lo..hi` (possibly empty).
    #[inline(always)]
    fn visible(&self, s: usize, i0: usize, tq: usize) -> (usize, usize) {
        let lo = s.saturating_sub(i0).min(tq);
        let hi = if s < self.n_global { tq } else { s.saturating_add(self.window).saturating_sub(i0).min(tq) };
        (lo, hi.max(lo))
    }

    fn q_off(&self, bi: usize, i: usize, hq: usize) -> usize {
        ((bi * self.t + i) * self.h + hq) * self.d
    }

    /// Offset of key row `s` of (batch `bi`, kv head `g`) in k-shaped tensors.
    fn kv_off(&self, bi: usize, s: usize, g: usize) -> usize {
        ((bi * self.t + s) * self.h_kv + g) * self.d
    }
}

/// The only keys the query rows `i0..i1` read: `[global prefix, window range]`, disjoint, in
/// increasing order, the first starting at 0; one of them is empty when they touch or when
/// `G = 0`. Their total length is at most `W + G + (i1 − i0) − 1`.
pub fn key_segments(dims: &WindowDims, i0: usize, i1: usize) -> [Range<usize>; 2] {
    let lo = (i0 + 1).saturating_sub(dims.window);
    let g = dims.n_global.min(i1);
    if g >= lo {
        [0..i1, i1..i1]
    } else {
        [0..g, lo..i1]
    }
}

/// Key position of row `r` of a block's score matrix `Sᵀ`.
#[inline(always)]
fn key_at(segs: &[Range<usize>; 2], r: usize) -> usize {
    let n0 = segs[0].len();
    if r < n0 {
        r
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
fn softmax_t(
    dims: &WindowDims,
    st: &mut [f32],
    segs: &[Range<usize>; 2],
    i0: usize,
    tq: usize,
    scale: f32,
) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
    blocks::softmax_t(st, tq, scale, |r| dims.visible(key_at(segs, r), i0, tq))
}

/// [`blocks::grad_t`] on a query block's transposed blocks (`[nk, tq]`, rows as in [`softmax_t`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_t(
    dims: &WindowDims,
    p: &mut [f32],
    ds: &mut [f32],
    segs: &[Range<usize>; 2],
    i0: usize,
    tq: usize,
    scale: f32,
    lse: &[f32],
    delta: &[f32],
) {
    blocks::grad_t(p, ds, tq, scale, lse, delta, |r| dims.visible(key_at(segs, r), i0, tq))
}

fn check_lens(dims: &WindowDims, tensors: &[(&str, usize, usize)]) {
    for &(name, got, want) in tensors {
        assert_eq!(got, want, "window_attention: `{name}` has length {got}, expected {want} for {dims:?}");
    }
}

/// Sliding-window + global-token causal softmax attention (see the module doc). Writes `out` and
/// the per-row log-sum-exp of the scaled scores (natural log) into `lse`.
pub fn window_attention_forward(dims: &WindowDims, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    dims.validate();
    let (ql, kvl) = (dims.q_len(), dims.kv_len());
    let lens = [("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), kvl), ("out", out.len(), ql)];
    check_lens(dims, &lens);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len())]);
    let WindowDims { b, t, h, d, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let lse = SharedOut::new(lse);
    out.par_chunks_mut(t * h * d).enumerate().for_each(|(bi, out_b)| {
        out_b.par_chunks_mut(BLOCK_Q * h * d).enumerate().for_each(|(qb, out_blk)| {
            forward_block(dims, q, k, v, bi, qb, out_blk, lse);
        })
    });
}

/// Forward for one (batch `bi`, query block `qb`), all heads: writes `out_blk` (`[tq, h, d]`)
/// and the block's entries of `lse`.
#[allow(clippy::too_many_arguments)]
fn forward_block(
    dims: &WindowDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bi: usize,
    qb: usize,
    out_blk: &mut [f32],
    lse: SharedOut,
) {
    let WindowDims { t, h, h_kv, d, .. } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    let (i0, tq, segs) = dims.block(qb);
    let nk = segs[0].len() + segs[1].len();
    with_scratch(nk * tq, |st| {
        for hq in 0..h {
            let g = hq / dims.group();
            let q_t = Strided::new(&q[dims.q_off(bi, i0, hq)..], 1, h * d);
            for (r, seg) in seg_rows(&segs) {
                let k_seg = Strided::new(&k[dims.kv_off(bi, seg.start, g)..], h_kv * d, 1);
                gemm_strided(seg.len(), tq, d, k_seg, q_t, &mut st[r * tq..], tq, false);
            }
            let (l, lse_blk) = with_avx2(
                #[inline(always)]
                || softmax_t(dims, st, &segs, i0, tq, scale),
            );
            let o = &mut out_blk[hq * d..];
            for (n, (r, seg)) in seg_rows(&segs).enumerate() {
                let v_seg = Strided::new(&v[dims.kv_off(bi, seg.start, g)..], h_kv * d, 1);
                gemm_strided(tq, d, seg.len(), Strided::new(&st[r * tq..], 1, tq), v_seg, o, h * d, n > 0);
            }
            for (o_row, &li) in o.chunks_mut(h * d).zip(&l) {
                let inv_l = 1.0 / li;
                o_row[..d].iter_mut().for_each(|x| *x *= inv_l);
            }
            // SAFETY: only this task writes the lse entries of (bi, hq, block qb).
            unsafe { lse.write((bi * h + hq) * t + i0, &lse_blk[..tq]) };
        }
    });
}

/// Gradients of [`window_attention_forward`] given `dout`; overwrites `dq`, `dk`, `dv`. Uses only
/// q, k, v, out, lse (nothing `T × T` saved from the forward).
#[allow(clippy::too_many_arguments)]
pub fn window_attention_backward(
    dims: &WindowDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    dims.validate();
    let (ql, kvl) = (dims.q_len(), dims.kv_len());
    let lens = [("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), kvl), ("out", out.len(), ql)];
    check_lens(dims, &lens);
    let lens = [("lse", lse.len(), dims.lse_len()), ("dout", dout.len(), ql), ("dq", dq.len(), ql)];
    check_lens(dims, &lens);
    check_lens(dims, &[("dk", dk.len(), kvl), ("dv", dv.len(), kvl)]);
    let WindowDims { b, t, h_kv, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    let grads = [SharedOut::new(dq), SharedOut::new(dk), SharedOut::new(dv)];
    (0..b * h_kv).into_par_iter().for_each(|task| {
        backward_group(dims, q, k, v, out, lse, dout, task / h_kv, task % h_kv, grads);
    });
}

/// Backward for one (batch `bi`, kv head `g`): writes `dq` rows of the group's query heads and
/// `dk`, `dv` rows of the kv head (`grads = [dq, dk, dv]`).
#[allow(clippy::too_many_arguments)]
fn backward_group(
    dims: &WindowDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    bi: usize,
    g: usize,
    [dq, dk, dv]: [SharedOut; 3],
) {
    let WindowDims { t, h, h_kv, d, .. } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    let n_blocks = t.div_ceil(BLOCK_Q);
    let blk = (0..n_blocks).map(|qb| dims.block(qb)).map(|(_, tq, s)| (s[0].len() + s[1].len()) * tq).max().unwrap();
    with_scratch(2 * blk + 2 * t * d + BLOCK_Q * d, |scratch| {
        let (p_buf, rest) = scratch.split_at_mut(blk);
        let (ds_buf, rest) = rest.split_at_mut(blk);
        let (dk_acc, rest) = rest.split_at_mut(t * d);
        let (dv_acc, dq_blk) = rest.split_at_mut(t * d);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        for hq in g * dims.group()..(g + 1) * dims.group() {
            for qb in 0..n_blocks {
                let (i0, tq, segs) = dims.block(qb);
                let nk = segs[0].len() + segs[1].len();
                let q_off = dims.q_off(bi, i0, hq);
                let (q_blk, do_blk) = (Strided::rows(q, q_off, h * d), Strided::rows(dout, q_off, h * d));
                let (p, ds) = (&mut p_buf[..nk * tq], &mut ds_buf[..nk * tq]);
                for (r, seg) in seg_rows(&segs) {
                    let off = dims.kv_off(bi, seg.start, g);
                    gemm_strided(
                        seg.len(),
                        tq,
                        d,
                        Strided::rows(k, off, h_kv * d),
                        q_blk.t(),
                        &mut p[r * tq..],
                        tq,
                        false,
                    );
                    gemm_strided(
                        seg.len(),
                        tq,
                        d,
                        Strided::rows(v, off, h_kv * d),
                        do_blk.t(),
                        &mut ds[r * tq..],
                        tq,
                        false,
                    );
                }
                let lse_blk = &lse[(bi * h + hq) * t + i0..][..tq];
                let delta = blocks::row_dots(dout, out, q_off, h * d, d, tq);
                with_avx2(
                    #[inline(always)]
                    || grad_t(dims, p, ds, &segs, i0, tq, scale, lse_blk, &delta[..tq]),
                );
                for (n, (r, seg)) in seg_rows(&segs).enumerate() {
                    let (ns, off) = (seg.len(), dims.kv_off(bi, seg.start, g));
                    let (p_seg, ds_seg) = (&p[r * tq..(r + ns) * tq], &ds[r * tq..(r + ns) * tq]);
                    gemm_strided(
                        tq,
                        d,
                        ns,
                        Strided::new(ds_seg, 1, tq),
                        Strided::rows(k, off, h_kv * d),
                        dq_blk,
                        d,
                        n > 0,
                    );
                    gemm_strided(ns, d, tq, Strided::rows(ds_seg, 0, tq), q_blk, &mut dk_acc[seg.start * d..], d, true);
                    gemm_strided(ns, d, tq, Strided::rows(p_seg, 0, tq), do_blk, &mut dv_acc[seg.start * d..], d, true);
                }
                // SAFETY: only this task writes the dq rows of query head hq of batch bi.
                unsafe { dq.write_rows(q_off, h * d, &dq_blk[..tq * d], d) };
            }
        }
        // SAFETY: only this task writes the dk, dv rows of kv head g of batch bi.
        unsafe {
            dk.write_rows(dims.kv_off(bi, 0, g), h_kv * d, dk_acc, d);
            dv.write_rows(dims.kv_off(bi, 0, g), h_kv * d, dv_acc, d);
        }
    });
}
