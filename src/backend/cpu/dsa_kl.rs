//! The DSA indexer's KL distillation loss and its gradients (module doc of [`super`]).

use super::indexer::{index_x, weigh};
use super::{check_lens, relu, sel_row, DsaDims, BLOCK_K, BLOCK_Q, PAD};
use crate::backend::cpu::blocks::{with_avx2, with_scratch, SharedOut};
use crate::backend::cpu::gemm::{gemm_strided, Strided};
use crate::backend::cpu::math;
use rayon::prelude::*;
use std::f32::consts::LOG2_E;

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// KL distillation loss of the indexer and its gradients (module doc). `lse` is the attention's
/// log-sum-exp over the same key set: dense causal ([`super::attention::attention_forward`]) when
/// `sel` is `None` (`S(t)` = every `s ≤ t`), sparse ([`dsa_attention_forward`] on `sel`) when
/// `sel` is given (`S(t) = A(t)`). Overwrites `dqi`, `dki`, `dwi` with the gradients of the
/// returned loss `L` (the mean over the `b·t` queries); q, k and lse get none.
#[allow(clippy::too_many_arguments)]
pub fn indexer_kl(
    dims: &DsaDims,
    q: &[f32],
    k: &[f32],
    lse: &[f32],
    qi: &[f32],
    ki: &[f32],
    wi: &[f32],
    sel: Option<&[u32]>,
    dqi: &mut [f32],
    dki: &mut [f32],
    dwi: &mut [f32],
) -> f32 {
    dims.validate_attn();
    dims.validate_indexer();
    check_lens(
        dims,
        &[("q", q.len(), dims.q_len()), ("k", k.len(), dims.kv_len()), ("lse", lse.len(), dims.lse_len())],
    );
    let lens = [("qi", qi.len(), dims.qi_len()), ("ki", ki.len(), dims.ki_len()), ("wi", wi.len(), dims.wi_len())];
    check_lens(dims, &lens);
    let lens =
        [("dqi", dqi.len(), dims.qi_len()), ("dki", dki.len(), dims.ki_len()), ("dwi", dwi.len(), dims.wi_len())];
    check_lens(dims, &lens);
    if let Some(sel) = sel {
        check_lens(dims, &[("sel", sel.len(), dims.sel_len())]);
    }
    let DsaDims { b, t, .. } = *dims;
    if b == 0 || t == 0 {
        return 0.0;
    }
    let x = KlInputs { dims, q, k, lse, qi, ki, wi, inv_bt: 1.0 / (b * t) as f32 };
    let loss = match sel {
        None => kl_dense(&x, dqi, dki, dwi),
        Some(sel) => kl_sparse(&x, sel, dqi, dki, dwi),
    };
    (loss / (b * t) as f64) as f32
}

/// The read-only inputs of the KL kernels.
#[derive(Clone, Copy)]
struct KlInputs<'a> {
    dims: &'a DsaDims,
    q: &'a [f32],
    k: &'a [f32],
    lse: &'a [f32],
    qi: &'a [f32],
    ki: &'a [f32],
    wi: &'a [f32],
    inv_bt: f32,
}

/// One query row of the KL over its keys: `sc` holds `I`, `pt` the target's unnormalised head sum
/// `Σ_h exp(S_h − lse_h)`, `e` is scratch. Returns `(lse_I, 1/Z, Σ_s p (ln p − ln r))` and
/// overwrites `pt` with `G = (r − p)/(B·T)`.
#[inline(always)]
pub(super) fn kl_row(sc: &[f32], pt: &mut [f32], e: &mut [f32], inv_bt: f32) -> (f32, f32, f64) {
    let inv_z = 1.0 / math::sum(pt);
    let m = math::max(sc);
    e.iter_mut().zip(sc).for_each(|(ei, &x)| *ei = math::exp2((x - m) * LOG2_E));
    let lse_i = m + math::sum(e).ln();
    let mut loss = 0.0f64;
    for (&p, &x) in pt.iter().zip(sc) {
        let p = p * inv_z;
        if p > 0.0 {
            loss += f64::from(p * (p.ln() - (x - lse_i)));
        }
    }
    pt.iter_mut().zip(sc).for_each(|(p, &x)| *p = (math::exp2((x - lse_i) * LOG2_E) - *p * inv_z) * inv_bt);
    (lse_i, inv_z, loss)
}

/// Target head sums `Σ_h exp(S_h − lse_h)` of the query rows `i0..i0 + tq` against keys
/// `s0..s0 + nk` into `pt` (row stride `ld`; 0 where `s > i`), one GEMM per head into `st`.
#[inline(always)]
fn target_block(
    x: &KlInputs,
    bi: usize,
    (i0, tq): (usize, usize),
    (s0, nk): (usize, usize),
    st: &mut [f32],
    pt: &mut [f32],
    ld: usize,
) {
    let DsaDims { t, h, h_kv, d, .. } = *x.dims;
    let c = LOG2_E / (d as f32).sqrt();
    (0..tq).for_each(|i| pt[i * ld..][..nk].fill(0.0));
    for hq in 0..h {
        let g = hq / x.dims.group();
        let q_blk = Strided::rows(x.q, x.dims.q_off(bi, i0, hq), h * d);
        let k_blk = Strided::rows(x.k, x.dims.kv_off(bi, s0, g), h_kv * d);
        gemm_strided(tq, nk, d, q_blk, k_blk.t(), st, nk, false);
        for i in 0..tq {
            let vis = (i0 + i + 1).saturating_sub(s0).min(nk);
            let lse2 = x.lse[(bi * h + hq) * t + i0 + i] * LOG2_E;
            for (p, &s) in pt[i * ld..][..vis].iter_mut().zip(&st[i * nk..][..vis]) {
                *p += math::exp2(s * c - lse2);
            }
        }
    }
}

/// Dense KL: pass 1 per (batch, query block) gives the loss, `dqi`, `dwi` and per-query
/// `(lse_I, 1/Z)`; pass 2 per (batch, key block) recomputes `G` against every later query block
/// and gives `dki`.
fn kl_dense(x: &KlInputs, dqi: &mut [f32], dki: &mut [f32], dwi: &mut [f32]) -> f64 {
    let DsaDims { b, t, .. } = *x.dims;
    let n_blocks = t.div_ceil(BLOCK_Q);
    let mut stats = vec![0.0f32; 2 * b * t];
    let outs = [SharedOut::new(dqi), SharedOut::new(dwi), SharedOut::new(&mut stats)];
    let losses: Vec<f64> = (0..b * n_blocks)
        .into_par_iter()
        .map(|task| {
            with_avx2(
                #[inline(always)]
                || kl_dense_queries(x, task / n_blocks, task % n_blocks, outs),
            )
        })
        .collect();
    let dki = SharedOut::new(dki);
    (0..b * n_blocks).into_par_iter().for_each(|task| {
        with_avx2(
            #[inline(always)]
            || kl_dense_keys(x, &stats, task / n_blocks, task % n_blocks, dki),
        )
    });
    losses.iter().sum()
}

/// Dense pass 1 for (batch `bi`, query block `qb`): returns the block's summed KL and writes its
/// rows of `dqi`, `dwi` and `stats` (`[lse_I, 1/Z]` per query).
#[inline(always)]
fn kl_dense_queries(x: &KlInputs, bi: usize, qb: usize, [dqi, dwi, stats]: [SharedOut; 3]) -> f64 {
    let dims = x.dims;
    let (hi, di) = (dims.n_index_heads, dims.index_dim);
    let (i0, tq) = dims.q_block(qb);
    let i1 = i0 + tq;
    let len = 2 * tq * i1 + i1 + tq * hi * BLOCK_K + tq * BLOCK_K + tq * hi * di + tq * hi + 2 * tq;
    with_scratch(len, |scratch| {
        let (scores, rest) = scratch.split_at_mut(tq * i1);
        let (pt, rest) = rest.split_at_mut(tq * i1);
        let (e, rest) = rest.split_at_mut(i1);
        let (xs, rest) = rest.split_at_mut(tq * hi * BLOCK_K);
        let (st, rest) = rest.split_at_mut(tq * BLOCK_K);
        let (dq_blk, rest) = rest.split_at_mut(tq * hi * di);
        let (dw_blk, st_blk) = rest.split_at_mut(tq * hi);
        for s0 in (0..i1).step_by(BLOCK_K) {
            let nk = BLOCK_K.min(i1 - s0);
            index_x(dims, x.qi, x.ki, bi, (i0, tq), (s0, nk), xs);
            weigh(dims, x.wi, bi, i0, tq, nk, xs, &mut scores[s0..], i1);
            target_block(x, bi, (i0, tq), (s0, nk), st, &mut pt[s0..], i1);
        }
        let mut loss = 0.0;
        for i in 0..tq {
            let n = i0 + i + 1;
            let pt_row = &mut pt[i * i1..][..i1];
            let (lse_i, inv_z, l) = kl_row(&scores[i * i1..][..n], &mut pt_row[..n], &mut e[..n], x.inv_bt);
            pt_row[n..].fill(0.0);
            st_blk[2 * i..][..2].copy_from_slice(&[lse_i, inv_z]);
            loss += l;
        }
        // pt now holds G (0 beyond the diagonal): dw = Σ_s G ReLU(X), dX = G w [X > 0], dq̃ = dX K̃.
        dq_blk.fill(0.0);
        dw_blk.fill(0.0);
        for s0 in (0..i1).step_by(BLOCK_K) {
            let nk = BLOCK_K.min(i1 - s0);
            index_x(dims, x.qi, x.ki, bi, (i0, tq), (s0, nk), xs);
            for i in 0..tq {
                let g_row = &pt[i * i1 + s0..][..nk];
                for j in 0..hi {
                    let w = x.wi[dims.wi_off(bi, i0 + i) + j];
                    let x_row = &mut xs[(i * hi + j) * nk..][..nk];
                    x_row.iter_mut().for_each(|v| *v = relu(*v));
                    dw_blk[i * hi + j] += math::dot(g_row, x_row);
                    x_row.iter_mut().zip(g_row).for_each(|(v, &gv)| *v = if *v > 0.0 { gv * w } else { 0.0 });
                }
            }
            let k_blk = Strided::rows(x.ki, dims.ki_off(bi, s0), di);
            gemm_strided(tq * hi, di, nk, Strided::rows(xs, 0, nk), k_blk, dq_blk, di, true);
        }
        // SAFETY: only this task writes these rows of dqi, dwi and stats (query block qb of bi).
        unsafe {
            dqi.write(dims.qi_off(bi, i0), dq_blk);
            dwi.write(dims.wi_off(bi, i0), dw_blk);
            stats.write(2 * (bi * dims.t + i0), st_blk);
        }
        loss
    })
}

/// Dense pass 2 for (batch `bi`, key block `kb` of [`BLOCK_Q`] keys): `dk̃(s) = Σ_{t,j} dX q̃(t, j)`
/// over the query blocks `kb..`, `G` recomputed from the saved `(lse_I, 1/Z)`.
#[inline(always)]
fn kl_dense_keys(x: &KlInputs, stats: &[f32], bi: usize, kb: usize, dki: SharedOut) {
    let dims = x.dims;
    let (hi, di) = (dims.n_index_heads, dims.index_dim);
    let (s0, nk) = dims.q_block(kb);
    let bq = BLOCK_Q;
    with_scratch(bq * hi * nk + 3 * bq * nk + nk * di, |scratch| {
        let (xs, rest) = scratch.split_at_mut(bq * hi * nk);
        let (scores, rest) = rest.split_at_mut(bq * nk);
        let (pt, rest) = rest.split_at_mut(bq * nk);
        let (st, acc) = rest.split_at_mut(bq * nk);
        acc.fill(0.0);
        for qb in kb..dims.t.div_ceil(BLOCK_Q) {
            let (i0, tq) = dims.q_block(qb);
            index_x(dims, x.qi, x.ki, bi, (i0, tq), (s0, nk), xs);
            weigh(dims, x.wi, bi, i0, tq, nk, xs, scores, nk);
            target_block(x, bi, (i0, tq), (s0, nk), st, pt, nk);
            for i in 0..tq {
                let vis = (i0 + i + 1 - s0).min(nk);
                let (lse_i, inv_z) = (stats[2 * (bi * dims.t + i0 + i)], stats[2 * (bi * dims.t + i0 + i) + 1]);
                let g_row = &mut pt[i * nk..][..nk];
                for (gv, &sv) in g_row[..vis].iter_mut().zip(&scores[i * nk..][..vis]) {
                    *gv = (math::exp2((sv - lse_i) * LOG2_E) - *gv * inv_z) * x.inv_bt;
                }
                g_row[vis..].fill(0.0);
                for j in 0..hi {
                    let w = x.wi[dims.wi_off(bi, i0 + i) + j];
                    let x_row = &mut xs[(i * hi + j) * nk..][..nk];
                    x_row.iter_mut().zip(&*g_row).for_each(|(v, &gv)| *v = if *v > 0.0 { gv * w } else { 0.0 });
                }
            }
            // acc [nk, d_I] += dXᵀ Q̃ (dX is [tq·H_I, nk]).
            let q_blk = Strided::rows(x.qi, dims.qi_off(bi, i0), di);
            gemm_strided(nk, di, tq * hi, Strided::new(xs, 1, nk), q_blk, acc, di, true);
        }
        // SAFETY: only this task writes the dki rows of key block kb of batch bi.
        unsafe { dki.write(dims.ki_off(bi, s0), acc) };
    });
}

/// Sparse KL (`S(t) = A(t)`): pass 1 per (batch, query block) gives the loss, `dqi`, `dwi` and `G`
/// per selected entry; pass 2 per (batch, key block) gathers `dki` over the transposed selection.
fn kl_sparse(x: &KlInputs, sel: &[u32], dqi: &mut [f32], dki: &mut [f32], dwi: &mut [f32]) -> f64 {
    let dims = x.dims;
    let DsaDims { b, t, .. } = *dims;
    let n_blocks = t.div_ceil(BLOCK_Q);
    let mut g_sel = vec![0.0f32; dims.sel_len()];
    let outs = [SharedOut::new(dqi), SharedOut::new(dwi), SharedOut::new(&mut g_sel)];
    let losses: Vec<f64> = (0..b * n_blocks)
        .into_par_iter()
        .map(|task| {
            with_avx2(
                #[inline(always)]
                || kl_sparse_queries(x, sel, task / n_blocks, task % n_blocks, outs),
            )
        })
        .collect();
    let transposed: Vec<(Vec<usize>, Vec<u32>)> = (0..b).into_par_iter().map(|bi| transpose(dims, sel, bi)).collect();
    let dki = SharedOut::new(dki);
    (0..b * n_blocks).into_par_iter().for_each(|task| {
        let (bi, kb) = (task / n_blocks, task % n_blocks);
        with_avx2(
            #[inline(always)]
            || kl_sparse_keys(x, &g_sel, &transposed[bi], bi, kb, dki),
        )
    });
    losses.iter().sum()
}

/// The selection of batch `bi` by key: key `s` is selected by the entries
/// `entries[starts[s]..starts[s + 1]]` (each `i·kmax + m`: query `i`, slot `m`), `i` increasing.
fn transpose(dims: &DsaDims, sel: &[u32], bi: usize) -> (Vec<usize>, Vec<u32>) {
    let (t, kmax) = (dims.t, dims.kmax());
    assert!(t * kmax < PAD as usize, "dsa: t * kmax must be < 2^32 - 1 for the sparse KL ({dims:?})");
    let mut starts = vec![0usize; t + 1];
    for i in 0..t {
        sel_row(dims, sel, bi, i).iter().for_each(|&s| starts[s as usize + 1] += 1);
    }
    for s in 0..t {
        starts[s + 1] += starts[s];
    }
    let mut fill = starts.clone();
    let mut entries = vec![0u32; starts[t]];
    for i in 0..t {
        for (m, &s) in sel_row(dims, sel, bi, i).iter().enumerate() {
            entries[fill[s as usize]] = (i * kmax + m) as u32;
            fill[s as usize] += 1;
        }
    }
    (starts, entries)
}

/// Sparse pass 1 for (batch `bi`, query block `qb`): returns the block's summed KL and writes its
/// rows of `dqi`, `dwi` and of `g_sel` (`G` per selected entry).
#[inline(always)]
fn kl_sparse_queries(x: &KlInputs, sel: &[u32], bi: usize, qb: usize, [dqi, dwi, g_sel]: [SharedOut; 3]) -> f64 {
    let dims = x.dims;
    let DsaDims { t, h, d, n_index_heads: hi, index_dim: di, .. } = *dims;
    let c = LOG2_E / (d as f32).sqrt();
    let (i0, tq) = dims.q_block(qb);
    let kmax = dims.kmax();
    with_scratch(kmax * (hi + 3) + hi * di + hi + h, |scratch| {
        let (xs, rest) = scratch.split_at_mut(kmax * hi);
        let (sc, rest) = rest.split_at_mut(kmax);
        let (pt, rest) = rest.split_at_mut(kmax);
        let (e, rest) = rest.split_at_mut(kmax);
        let (dq_row, rest) = rest.split_at_mut(hi * di);
        let (dw_row, lse2) = rest.split_at_mut(hi);
        let mut loss = 0.0;
        for i in i0..i0 + tq {
            let keys = sel_row(dims, sel, bi, i);
            let n = keys.len();
            let qi_row = &x.qi[dims.qi_off(bi, i)..][..hi * di];
            let w = &x.wi[dims.wi_off(bi, i)..][..hi];
            lse2.iter_mut().enumerate().for_each(|(hq, l)| *l = x.lse[(bi * h + hq) * t + i] * LOG2_E);
            for (m, &s) in keys.iter().enumerate() {
                let s = s as usize;
                let k_row = &x.ki[dims.ki_off(bi, s)..][..di];
                // Same order of operations as `weigh` and `target_block`.
                let mut score = 0.0;
                for (j, &wj) in w.iter().enumerate() {
                    xs[m * hi + j] = math::dot(&qi_row[j * di..][..di], k_row);
                    score += wj * relu(xs[m * hi + j]);
                }
                sc[m] = score;
                let mut p = 0.0;
                for (hq, &l2) in lse2.iter().enumerate() {
                    let dot = math::dot(
                        &x.q[dims.q_off(bi, i, hq)..][..d],
                        &x.k[dims.kv_off(bi, s, hq / dims.group())..][..d],
                    );
                    p += math::exp2(dot * c - l2);
                }
                pt[m] = p;
            }
            loss += kl_row(&sc[..n], &mut pt[..n], &mut e[..n], x.inv_bt).2;
            dq_row.fill(0.0);
            dw_row.fill(0.0);
            for (m, &s) in keys.iter().enumerate() {
                let k_row = &x.ki[dims.ki_off(bi, s as usize)..][..di];
                for (j, &wj) in w.iter().enumerate() {
                    let xv = xs[m * hi + j];
                    if xv > 0.0 {
                        dw_row[j] += pt[m] * xv;
                        axpy(&mut dq_row[j * di..][..di], pt[m] * wj, k_row);
                    }
                }
            }
            // SAFETY: only this task writes query i's rows of dqi, dwi and g_sel.
            unsafe {
                dqi.write(dims.qi_off(bi, i), dq_row);
                dwi.write(dims.wi_off(bi, i), dw_row);
                g_sel.write((bi * t + i) * kmax, &pt[..n]);
            }
        }
        loss
    })
}

/// Sparse pass 2 for (batch `bi`, key block `kb`): `dk̃(s) = Σ G·w·[X > 0]·q̃` over the queries
/// that selected `s`, in increasing order, `X` recomputed exactly as in pass 1.
#[inline(always)]
fn kl_sparse_keys(
    x: &KlInputs,
    g_sel: &[f32],
    (starts, entries): &(Vec<usize>, Vec<u32>),
    bi: usize,
    kb: usize,
    dki: SharedOut,
) {
    let dims = x.dims;
    let (hi, di, kmax) = (dims.n_index_heads, dims.index_dim, dims.kmax());
    let (s0, nk) = dims.q_block(kb);
    with_scratch(nk * di, |acc| {
        acc.fill(0.0);
        for (s, acc_row) in (s0..s0 + nk).zip(acc.chunks_exact_mut(di)) {
            let k_row = &x.ki[dims.ki_off(bi, s)..][..di];
            for &entry in &entries[starts[s]..starts[s + 1]] {
                let (i, m) = (entry as usize / kmax, entry as usize % kmax);
                let g = g_sel[(bi * dims.t + i) * kmax + m];
                let qi_row = &x.qi[dims.qi_off(bi, i)..][..hi * di];
                for (j, &wj) in x.wi[dims.wi_off(bi, i)..][..hi].iter().enumerate() {
                    let q_row = &qi_row[j * di..][..di];
                    if math::dot(q_row, k_row) > 0.0 {
                        axpy(acc_row, g * wj, q_row);
                    }
                }
            }
        }
        // SAFETY: only this task writes the dki rows of key block kb of batch bi.
        unsafe { dki.write(dims.ki_off(bi, s0), acc) };
    });
}
