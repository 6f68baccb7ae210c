//! Test-only verbatim copy of the pre-`flash` `cpu/attention.rs` (HEAD 206b9c7, module doc and
//! tests removed, `super::` paths of the shared helpers made absolute): the oracle of the
//! bitwise-preservation tests in [`super`].

use super::blocks::{self, with_avx2, with_scratch, SharedOut};
use crate::backend::cpu::gemm::{gemm_strided, Strided};
use rayon::prelude::*;

/// Query rows per block.
pub const BLOCK_Q: usize = 64;
/// Key rows per tile: a query block's scores span the key tiles up to and including the diagonal,
/// and softmax denominators are summed per key tile, then over tiles.
pub const BLOCK_K: usize = 64;

/// Shapes of one attention call. Row-major layouts:
/// q, out, dout, dq: [b, t, h, d]; k, v, dk, dv: [b, t, h_kv, d]; lse: [b, h, t].
/// h must be a multiple of h_kv (grouped-query attention: query head j uses kv head j / (h / h_kv)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
}

impl AttnDims {
    /// Number of elements of `q`, `out`, `dout`, `dq`: `b * t * h * d`.
    pub fn q_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.h, self.d])
    }

    /// Number of elements of `k`, `v`, `dk`, `dv`: `b * t * h_kv * d`.
    pub fn kv_len(&self) -> usize {
        checked_len(&[self.b, self.t, self.h_kv, self.d])
    }

    /// Number of elements of `lse`: `b * h * t`.
    pub fn lse_len(&self) -> usize {
        checked_len(&[self.b, self.h, self.t])
    }

    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.h / self.h_kv
    }

    fn validate(&self) {
        assert!(self.d > 0, "attention: head dim d must be > 0 (got {self:?})");
        assert!(self.h > 0, "attention: h must be > 0 (got {self:?})");
        assert!(self.h_kv > 0, "attention: h_kv must be > 0 (got {self:?})");
        assert!(self.h % self.h_kv == 0, "attention: h ({}) must be a multiple of h_kv ({})", self.h, self.h_kv);
    }

    /// Query block `qb`: (first row `i0`, rows `tq`, visible keys `end`).
    fn block(&self, qb: usize) -> (usize, usize, usize) {
        let i0 = qb * BLOCK_Q;
        let i1 = (i0 + BLOCK_Q).min(self.t);
        (i0, i1 - i0, (i1.div_ceil(BLOCK_K) * BLOCK_K).min(self.t))
    }

    /// Offset of row `i` of (batch `bi`, query head `hq`) in q-shaped tensors.
    fn q_off(&self, bi: usize, i: usize, hq: usize) -> usize {
        ((bi * self.t + i) * self.h + hq) * self.d
    }

    /// Offset of row 0 of (batch `bi`, kv head `g`) in k-shaped tensors.
    fn kv_off(&self, bi: usize, g: usize) -> usize {
        (bi * self.t * self.h_kv + g) * self.d
    }
}

fn checked_len(factors: &[usize]) -> usize {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f)).expect("attention: tensor size overflows usize")
}

fn check_len(name: &str, got: usize, want: usize, dims: &AttnDims) {
    assert_eq!(got, want, "attention: `{name}` has length {got}, expected {want} for {dims:?}");
}

/// Key `s` is visible to the query rows `i0 + i` with `i >= visible_from(s, i0, tq)` of a block.
fn visible_from(s: usize, i0: usize, tq: usize) -> usize {
    s.saturating_sub(i0).min(tq)
}

/// [`blocks::softmax_t`] on a query block's `Sᵀ` (`[end, tq]`, keys `0..end`, causal mask).
#[inline(always)]
fn softmax_t(st: &mut [f32], i0: usize, tq: usize, scale: f32) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
    blocks::softmax_t(st, tq, scale, |s| (visible_from(s, i0, tq), tq))
}

/// [`blocks::grad_t`] on a query block's transposed blocks (`[end, tq]`, causal mask).
#[inline(always)]
fn grad_t(p: &mut [f32], ds: &mut [f32], i0: usize, tq: usize, scale: f32, lse: &[f32], delta: &[f32]) {
    blocks::grad_t(p, ds, tq, scale, lse, delta, |s| (visible_from(s, i0, tq), tq))
}

/// Causal softmax attention, scale 1/sqrt(d): `out[t] = sum_{s<=t} softmax_s(q_t·k_s * scale) v_s`.
/// Writes out and the per-row log-sum-exp (natural log, of the scaled scores) into lse.
pub fn attention_forward(dims: &AttnDims, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    dims.validate();
    check_len("q", q.len(), dims.q_len(), dims);
    check_len("k", k.len(), dims.kv_len(), dims);
    check_len("v", v.len(), dims.kv_len(), dims);
    check_len("out", out.len(), dims.q_len(), dims);
    check_len("lse", lse.len(), dims.lse_len(), dims);
    let AttnDims { b, t, h, d, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    // One task per (batch, query block): it writes the block's rows of `out` (all heads) and of
    // `lse`.
    let lse = SharedOut::new(lse);
    out.par_chunks_mut(t * h * d).enumerate().for_each(|(bi, out_b)| {
        out_b.par_chunks_mut(BLOCK_Q * h * d).enumerate().for_each(|(qb, out_blk)| {
            forward_block(dims, q, k, v, bi, qb, out_blk, lse);
        })
    });
}

/// Forward for one (batch `bi`, query block `qb`), all heads: writes `out_blk` (`[tq, h, d]`) and
/// the block's entries of `lse`.
#[allow(clippy::too_many_arguments)]
fn forward_block(
    dims: &AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bi: usize,
    qb: usize,
    out_blk: &mut [f32],
    lse: SharedOut,
) {
    let AttnDims { t, h, h_kv, d, .. } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    let (i0, tq, end) = dims.block(qb);
    with_scratch(end * tq, |st| {
        for hq in 0..h {
            let kv_off = dims.kv_off(bi, hq / dims.group());
            let (k_all, v_all) = (Strided::rows(k, kv_off, h_kv * d), Strided::rows(v, kv_off, h_kv * d));
            let q_blk = Strided::rows(q, dims.q_off(bi, i0, hq), h * d);
            gemm_strided(end, tq, d, k_all, q_blk.t(), st, tq, false);
            let (l, lse_blk) = with_avx2(
                #[inline(always)]
                || softmax_t(st, i0, tq, scale),
            );
            let o = &mut out_blk[hq * d..];
            gemm_strided(tq, d, end, Strided::rows(st, 0, tq).t(), v_all, o, h * d, false);
            for (o_row, &li) in o.chunks_mut(h * d).zip(&l) {
                let inv_l = 1.0 / li;
                o_row[..d].iter_mut().for_each(|x| *x *= inv_l);
            }
            // SAFETY: only this task writes the lse entries of (bi, hq, block qb).
            unsafe { lse.write((bi * h + hq) * t + i0, &lse_blk[..tq]) };
        }
    });
}

/// Gradients of the above given dout; overwrites dq, dk, dv (does not accumulate).
/// Uses only q, k, v, out, lse (no T×T matrix saved from the forward).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dims: &AttnDims,
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
    check_len("q", q.len(), dims.q_len(), dims);
    check_len("k", k.len(), dims.kv_len(), dims);
    check_len("v", v.len(), dims.kv_len(), dims);
    check_len("out", out.len(), dims.q_len(), dims);
    check_len("lse", lse.len(), dims.lse_len(), dims);
    check_len("dout", dout.len(), dims.q_len(), dims);
    check_len("dq", dq.len(), dims.q_len(), dims);
    check_len("dk", dk.len(), dims.kv_len(), dims);
    check_len("dv", dv.len(), dims.kv_len(), dims);
    let AttnDims { b, t, h_kv, .. } = *dims;
    if b == 0 || t == 0 {
        return;
    }
    // One task per (batch, kv head); it writes dk/dv of that kv head and dq of its query heads.
    let grads = [SharedOut::new(dq), SharedOut::new(dk), SharedOut::new(dv)];
    (0..b * h_kv).into_par_iter().for_each(|task| {
        backward_group(dims, q, k, v, out, lse, dout, task / h_kv, task % h_kv, grads);
    });
}

/// Backward for one (batch `bi`, kv head `g`): writes the rows of `dq` of the query heads of the
/// group and the rows of `dk`, `dv` of the kv head (`grads = [dq, dk, dv]`).
#[allow(clippy::too_many_arguments)]
fn backward_group(
    dims: &AttnDims,
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
    let AttnDims { t, h, h_kv, d, .. } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    let kv_off = dims.kv_off(bi, g);
    let (k_all, v_all) = (Strided::rows(k, kv_off, h_kv * d), Strided::rows(v, kv_off, h_kv * d));
    let blk = t * BLOCK_Q.min(t);
    with_scratch(2 * blk + 2 * t * d + BLOCK_Q * d, |scratch| {
        let (p_buf, rest) = scratch.split_at_mut(blk);
        let (ds_buf, rest) = rest.split_at_mut(blk);
        let (dk_acc, rest) = rest.split_at_mut(t * d);
        let (dv_acc, dq_blk) = rest.split_at_mut(t * d);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        for hq in g * dims.group()..(g + 1) * dims.group() {
            for qb in 0..t.div_ceil(BLOCK_Q) {
                let (i0, tq, end) = dims.block(qb);
                let q_off = dims.q_off(bi, i0, hq);
                let (q_blk, do_blk) = (Strided::rows(q, q_off, h * d), Strided::rows(dout, q_off, h * d));
                // Transposed blocks `[end, tq]`: Pᵀ (from Sᵀ) and dSᵀ (from dPᵀ).
                let (p, ds) = (&mut p_buf[..end * tq], &mut ds_buf[..end * tq]);
                gemm_strided(end, tq, d, k_all, q_blk.t(), p, tq, false);
                gemm_strided(end, tq, d, v_all, do_blk.t(), ds, tq, false);
                let lse_blk = &lse[(bi * h + hq) * t + i0..][..tq];
                let delta = blocks::row_dots(dout, out, q_off, h * d, d, tq);
                with_avx2(
                    #[inline(always)]
                    || grad_t(p, ds, i0, tq, scale, lse_blk, &delta[..tq]),
                );
                let (p, ds) = (Strided::rows(p, 0, tq), Strided::rows(ds, 0, tq));
                gemm_strided(tq, d, end, ds.t(), k_all, dq_blk, d, false);
                gemm_strided(end, d, tq, ds, q_blk, dk_acc, d, true);
                gemm_strided(end, d, tq, p, do_blk, dv_acc, d, true);
                // SAFETY: only this task writes the dq rows of query head hq of batch bi.
                unsafe { dq.write_rows(q_off, h * d, &dq_blk[..tq * d], d) };
            }
        }
        // SAFETY: only this task writes the dk, dv rows of kv head g of batch bi.
        unsafe {
            dk.write_rows(kv_off, h_kv * d, dk_acc, d);
            dv.write_rows(kv_off, h_kv * d, dv_acc, d);
        }
    });
}
