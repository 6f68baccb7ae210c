//! The gathered attention core: softmax attention of each query over an explicit list of keys
//! ([`KeyList`], e.g. DSA's top-k selection), forward and backward, with grouped-query attention
//! and head shapes [`FlashDims`] (`d_qk` and `d_v` may differ). The notation and formulas are
//! those of [`super::flash`]; what differs is the schedule, kept as it was in the DSA kernel
//! (changing it would change the results' bits):
//!
//! - keys are not tiles of `K` read in place but scattered rows, gathered per query and kv head
//!   into contiguous `[n, d]` blocks (prefetching ahead);
//! - one query row at a time, the group's query heads together: `S = Q Kᵀ` (`[group, n]`) and
//!   `O = P V` by GEMMs; backward `dP = dO Vᵀ`, `dQ = dS K`;
//! - the softmax is per row: maximum, `exp` base 2 with the scale folded in, [`math::sum`];
//! - `dK`, `dV` are scatter-added row by row (`axpy`, queries in increasing order, then heads).
//!
//! **Parallelism and determinism.** The split of [`super::flash`]: forward, one rayon task per
//! (batch, block of [`BLOCK_Q`] queries), all heads; backward, one task per (batch, kv head),
//! accumulating `dK`, `dV` in `[t, d]` buffers. Every output element is written by one task, GEMMs are single-threaded
//! inside tasks and all sums have a fixed order: bitwise reproducible for any thread count. Each
//! task's loops are compiled for AVX2 where available, with identical results.

use super::blocks::{with_avx2, with_scratch, SharedOut};
use super::flash::{par_kv_groups, par_query_blocks, FlashDims, BLOCK_Q};
use super::gemm::{gemm_strided, Strided};
use super::math;
use std::f32::consts::{LN_2, LOG2_E};

/// The keys each query attends to, listed explicitly.
pub(crate) trait KeyList: Sync {
    /// An upper bound on the length of any list (scratch sizing).
    fn max_keys(&self) -> usize;

    /// The keys of query `i` of batch `bi`: non-empty, each `<= i`, in any order.
    fn keys(&self, bi: usize, i: usize) -> &[u32];
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// How many keys ahead [`gather_kv`] prefetches: the selected rows are scattered over k and v,
/// which at long `T` live in the last-level cache or in memory.
const PREFETCH_AHEAD: usize = 8;

/// Copies the rows of kv head `g` of the keys `keys` of batch `bi` from k and v into `k_sel`
/// (`[keys.len(), d_qk]`) and `v_sel` (`[keys.len(), d_v]`), contiguous, prefetching the rows
/// [`PREFETCH_AHEAD`] keys ahead.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gather_kv(
    dims: &FlashDims,
    k: &[f32],
    v: &[f32],
    bi: usize,
    g: usize,
    keys: &[u32],
    k_sel: &mut [f32],
    v_sel: &mut [f32],
) {
    let FlashDims { d_qk, d_v, .. } = *dims;
    // Row `s` of kv head `g` is row `kv_off(bi, s, g, 1)` of k (width d_qk) and of v (width d_v).
    let row = |s: u32| dims.kv_off(bi, s as usize, g, 1);
    for (m, (&s, (k_row, v_row))) in
        keys.iter().zip(k_sel.chunks_exact_mut(d_qk).zip(v_sel.chunks_exact_mut(d_v))).enumerate()
    {
        if let Some(&ahead) = keys.get(m + PREFETCH_AHEAD) {
            let r = row(ahead);
            prefetch(&k[r * d_qk..][..d_qk]);
            prefetch(&v[r * d_v..][..d_v]);
        }
        let r = row(s);
        k_row.copy_from_slice(&k[r * d_qk..][..d_qk]);
        v_row.copy_from_slice(&v[r * d_v..][..d_v]);
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

/// Forward over the key lists `keys`: writes `out` and the per-row log-sum-exp of the scaled
/// scores (natural log) into `lse`. Lengths are the caller's to check.
pub(crate) fn forward(
    dims: &FlashDims,
    keys: &impl KeyList,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    par_query_blocks(dims, out, lse, |bi, qb, out_blk, lse| {
        with_avx2(
            #[inline(always)]
            || forward_block(dims, keys, [q, k, v], bi, qb, out_blk, lse),
        )
    });
}

/// Forward for one (batch `bi`, query block `qb`), all heads: `out_blk` (`[tq, h, d_v]`) and the
/// block's entries of `lse`. Per query and kv head, the listed k, v rows are gathered into
/// contiguous blocks, and the group's query heads are processed together by two GEMMs:
/// `S = Q Kᵀ` (`[group, n]`), then `O = P V` (`[group, d_v]`).
#[inline(always)]
fn forward_block(
    dims: &FlashDims,
    keys: &impl KeyList,
    [q, k, v]: [&[f32]; 3],
    bi: usize,
    qb: usize,
    out_blk: &mut [f32],
    lse: SharedOut,
) {
    let FlashDims { t, h, h_kv, d_qk, d_v, .. } = *dims;
    let gs = dims.group();
    let c = LOG2_E * (1.0 / (d_qk as f32).sqrt());
    let i0 = qb * BLOCK_Q;
    let tq = BLOCK_Q.min(t - i0);
    let kmax = keys.max_keys();
    with_scratch(kmax * (d_qk + d_v) + gs * kmax + gs + h * BLOCK_Q, |scratch| {
        let (k_sel, rest) = scratch.split_at_mut(kmax * d_qk);
        let (v_sel, rest) = rest.split_at_mut(kmax * d_v);
        let (p_buf, rest) = rest.split_at_mut(gs * kmax);
        let (inv_l, lse_blk) = rest.split_at_mut(gs);
        for i in 0..tq {
            let keys = keys.keys(bi, i0 + i);
            let n = keys.len();
            let (k_sel, v_sel, p) = (&mut k_sel[..n * d_qk], &mut v_sel[..n * d_v], &mut p_buf[..gs * n]);
            for g in 0..h_kv {
                gather_kv(dims, k, v, bi, g, keys, k_sel, v_sel);
                // The group's query heads are consecutive rows of q and out.
                let q_g = Strided::rows(q, dims.q_off(bi, i0 + i, g * gs, d_qk), d_qk);
                gemm_strided(gs, n, d_qk, q_g, Strided::rows(k_sel, 0, d_qk).t(), p, n, false);
                for (j, row) in p.chunks_exact_mut(n).enumerate() {
                    // exp base 2 with the scale folded in, as in the tiled core.
                    let m = math::max(row) * c;
                    row.iter_mut().for_each(|x| *x = math::exp2(*x * c - m));
                    let l = math::sum(row);
                    inv_l[j] = 1.0 / l;
                    lse_blk[(g * gs + j) * BLOCK_Q + i] = m * LN_2 + l.ln();
                }
                let o = &mut out_blk[(i * h + g * gs) * d_v..][..gs * d_v];
                gemm_strided(gs, d_v, n, Strided::rows(p, 0, n), Strided::rows(v_sel, 0, d_v), o, d_v, false);
                for (o_h, &il) in o.chunks_exact_mut(d_v).zip(&*inv_l) {
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

/// Gradients of [`forward`] given `dout`; overwrites `dq`, `dk`, `dv` (`grads`). Uses only
/// q, k, v, out, lse (`inputs`, in that order) and the key lists.
pub(crate) fn backward(
    dims: &FlashDims,
    keys: &impl KeyList,
    inputs: [&[f32]; 5],
    dout: &[f32],
    grads: [&mut [f32]; 3],
) {
    par_kv_groups(dims, grads, |bi, g, grads| {
        with_avx2(
            #[inline(always)]
            || backward_group(dims, keys, inputs, dout, bi, g, grads),
        )
    });
}

/// Backward for one (batch `bi`, kv head `g`): writes the `dq` rows of the group's query heads
/// and the `dk`, `dv` rows of the kv head (`grads = [dq, dk, dv]`). Per query, the listed k, v
/// rows are gathered and the group's heads processed together: `S = Q Kᵀ`, `dP = dO Vᵀ`
/// (`[group, n]`) and `dQ = dS K` by GEMMs; `dk`, `dv` are accumulated in `[t, d]` buffers, key by
/// key and head by head (queries in increasing order).
#[inline(always)]
fn backward_group(
    dims: &FlashDims,
    keys: &impl KeyList,
    [q, k, v, out, lse]: [&[f32]; 5],
    dout: &[f32],
    bi: usize,
    g: usize,
    [dq, dk, dv]: [SharedOut; 3],
) {
    let FlashDims { t, h, h_kv, d_qk, d_v, .. } = *dims;
    let gs = dims.group();
    let scale = 1.0 / (d_qk as f32).sqrt();
    let c = scale * LOG2_E;
    let kmax = keys.max_keys();
    with_scratch((t + kmax) * (d_qk + d_v) + 2 * gs * kmax + gs * d_qk, |scratch| {
        let (dk_acc, rest) = scratch.split_at_mut(t * d_qk);
        let (dv_acc, rest) = rest.split_at_mut(t * d_v);
        let (k_sel, rest) = rest.split_at_mut(kmax * d_qk);
        let (v_sel, rest) = rest.split_at_mut(kmax * d_v);
        let (p_buf, rest) = rest.split_at_mut(gs * kmax);
        let (ds_buf, dq_g) = rest.split_at_mut(gs * kmax);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        for i in 0..t {
            let keys = keys.keys(bi, i);
            let n = keys.len();
            let (k_sel, v_sel) = (&mut k_sel[..n * d_qk], &mut v_sel[..n * d_v]);
            let (p, ds) = (&mut p_buf[..gs * n], &mut ds_buf[..gs * n]);
            gather_kv(dims, k, v, bi, g, keys, k_sel, v_sel);
            // The group's query heads are consecutive rows of q, dq (width d_qk) and of dout, out
            // (width d_v).
            let (qo, oo) = (dims.q_off(bi, i, g * gs, d_qk), dims.q_off(bi, i, g * gs, d_v));
            let (q_g, do_g) = (&q[qo..][..gs * d_qk], &dout[oo..][..gs * d_v]);
            gemm_strided(gs, n, d_qk, Strided::rows(q_g, 0, d_qk), Strided::rows(k_sel, 0, d_qk).t(), p, n, false);
            gemm_strided(gs, n, d_v, Strided::rows(do_g, 0, d_v), Strided::rows(v_sel, 0, d_v).t(), ds, n, false);
            for (j, (p_row, ds_row)) in p.chunks_exact_mut(n).zip(ds.chunks_exact_mut(n)).enumerate() {
                let delta = math::dot(&do_g[j * d_v..][..d_v], &out[oo + j * d_v..][..d_v]);
                let lse2 = lse[(bi * h + g * gs + j) * t + i] * LOG2_E;
                for (pm, dsm) in p_row.iter_mut().zip(ds_row.iter_mut()) {
                    *pm = math::exp2(*pm * c - lse2);
                    *dsm = *pm * (*dsm - delta) * scale;
                }
            }
            gemm_strided(gs, d_qk, n, Strided::rows(ds, 0, n), Strided::rows(k_sel, 0, d_qk), dq_g, d_qk, false);
            // SAFETY: only this task writes the dq rows of the query heads of group g of batch bi.
            unsafe { dq.write(qo, dq_g) };
            for (m, &s) in keys.iter().enumerate() {
                let s = s as usize;
                for j in 0..gs {
                    axpy(&mut dk_acc[s * d_qk..][..d_qk], ds[j * n + m], &q_g[j * d_qk..][..d_qk]);
                    axpy(&mut dv_acc[s * d_v..][..d_v], p[j * n + m], &do_g[j * d_v..][..d_v]);
                }
            }
        }
        // SAFETY: only this task writes the dk, dv rows of kv head g of batch bi.
        unsafe {
            dk.write_rows(dims.kv_off(bi, 0, g, d_qk), h_kv * d_qk, dk_acc, d_qk);
            dv.write_rows(dims.kv_off(bi, 0, g, d_v), h_kv * d_v, dv_acc, d_v);
        }
    });
}
