//! Causal flash attention on the CPU (forward and backward) with grouped-query attention.
//!
//! Notation for one (batch, query head) pair: `Q` is `[T, d]`, `K`, `V` are `[T, d]` (the kv head
//! the query head maps to), `scale = 1/sqrt(d)`, and the causal mask keeps key `s` for query `i`
//! only when `s <= i`.
//!
//! ```text
//! S    = Q Kᵀ · scale          (masked: S[i, s] = -inf for s > i)
//! P    = softmax_rows(S)       lse[i] = log Σ_s exp(S[i, s])  so  P = exp(S − lse)
//! O    = P V
//! ```
//!
//! **Tiling.** Queries are processed in blocks of [`BLOCK_Q`] rows `i0..i0+tq`. A block sees the
//! keys `0..end`, the key tiles of [`BLOCK_K`] rows up to and including the diagonal one, and one
//! GEMM gives all its scores, stored transposed: `Sᵀ = K Qᵀ` (`[end, tq]`, one key per row). In
//! this orientation the GEMMs read `K` and `V` in place from the strided `[b, t, h_kv, d]` inputs
//! and only repack the block's small `Q`. The softmax is then exact (no online rescaling) and
//! runs along the rows of `Sᵀ`, vectorised across the block's queries and skipping masked entries
//! (which become exact zeros of `P`): `m` = maximum over the visible keys, `P = exp(S·scale − m)`,
//! `l = Σ_s P` (summed per key tile, then over tiles), `lse = m + ln l`; a second GEMM gives
//! `O = (P V) / l`.
//!
//! **Backward.** With `D_i = rowsum(dO_i ∘ O_i)` (which equals `Σ_s P[i,s] dP[i,s]`), each query
//! block recomputes its scores and `P = exp(S·scale − lse)`, then (five GEMMs per block, also on
//! transposed blocks)
//!
//! ```text
//! dP = dO Vᵀ
//! dS = P ∘ (dP − D) · scale
//! dQ = dS K               dK += dSᵀ Q               dV += Pᵀ dO
//! ```
//!
//! With GQA, the `h / h_kv` query heads sharing a kv head add their `dK`, `dV` contributions.
//!
//! **Element-wise work.** `exp` is evaluated as `2^(z·log₂e)` by a branch-free polynomial, so the
//! loops vectorise; they are compiled for AVX2 where the CPU has it, with bitwise-identical
//! results (no operation is contracted or reassociated).
//!
//! **Parallelism, determinism, memory.** The forward runs one rayon task per (batch, query block),
//! covering all heads; the backward one task per (batch, kv head), which writes `dK`, `dV` of that
//! head and `dQ` of its query heads, and visits query heads and blocks in a fixed order. Each
//! output element is written by exactly one task, GEMMs are single-threaded inside the tasks
//! (their summation order depends only on the shapes), and no sum depends on scheduling, so
//! results are bitwise reproducible for any thread count. Per task there are at most two
//! `[t, BLOCK_Q]` score blocks and, in the backward, `[t, d]` `dK`/`dV` accumulators, held in a
//! per-thread scratch buffer reused across tasks and calls: nothing `T × T`.
//!
//! The loops live in [`super::flash`], the tiled core shared with the window kernel; this file
//! holds the shapes, their checks and the causal key set.

use super::flash::{self, FlashDims, KeySet};

/// Query rows per block.
pub const BLOCK_Q: usize = flash::BLOCK_Q;
/// Key rows per tile: a query block's scores span the key tiles up to and including the diagonal,
/// and softmax denominators are summed per key tile, then over tiles.
pub const BLOCK_K: usize = flash::BLOCK_K;

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

    /// Number of elements of `v`, `dv` of value width `dv`: `b * t * h_kv * dv`.
    pub fn v_len(&self, dv: usize) -> usize {
        checked_len(&[self.b, self.t, self.h_kv, dv])
    }

    /// Number of elements of `out`, `dout` of value width `dv`: `b * t * h * dv`.
    pub fn out_len(&self, dv: usize) -> usize {
        checked_len(&[self.b, self.t, self.h, dv])
    }

    /// The core's head shapes: queries and keys `d` wide, values `dv` (MLA's `d_qk ≠ d_v`).
    pub(crate) fn flash(&self, dv: usize) -> FlashDims {
        FlashDims { b: self.b, t: self.t, h: self.h, h_kv: self.h_kv, d_qk: self.d, d_v: dv }
    }

    fn validate(&self) {
        assert!(self.d > 0, "attention: head dim d must be > 0 (got {self:?})");
        assert!(self.h > 0, "attention: h must be > 0 (got {self:?})");
        assert!(self.h_kv > 0, "attention: h_kv must be > 0 (got {self:?})");
        assert!(self.h % self.h_kv == 0, "attention: h ({}) must be a multiple of h_kv ({})", self.h, self.h_kv);
    }
}

fn checked_len(factors: &[usize]) -> usize {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f)).expect("attention: tensor size overflows usize")
}

fn check_len(name: &str, got: usize, want: usize, dims: &AttnDims) {
    assert_eq!(got, want, "attention: `{name}` has length {got}, expected {want} for {dims:?}");
}

/// The causal key set of `t` tokens: a query block `i0..i1` reads the keys `0..end`, the key tiles
/// up to and including the diagonal one (one segment), and key `s` is visible to rows `i >= s`.
pub(crate) struct Causal {
    pub t: usize,
}

impl KeySet for Causal {
    #[inline(always)]
    fn segments(&self, _i0: usize, i1: usize) -> [std::ops::Range<usize>; 2] {
        let end = (i1.div_ceil(BLOCK_K) * BLOCK_K).min(self.t);
        [0..end, end..end]
    }

    #[inline(always)]
    fn visible(&self, s: usize, i0: usize, tq: usize) -> (usize, usize) {
        (s.saturating_sub(i0).min(tq), tq)
    }
}

/// Causal softmax attention, scale 1/sqrt(d): `out[t] = sum_{s<=t} softmax_s(q_t·k_s * scale) v_s`.
/// Writes out and the per-row log-sum-exp (natural log, of the scaled scores) into lse.
pub fn attention_forward(dims: &AttnDims, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    attention_forward_dv(dims, dims.d, q, k, v, out, lse)
}

/// [`attention_forward`] with values (and outputs) `dv` wide: v `[b, t, h_kv, dv]`, out
/// `[b, t, h, dv]`; q and k stay `d` wide and the scale 1/sqrt(d) (MLA's head shapes).
pub fn attention_forward_dv(
    dims: &AttnDims,
    dv: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    dims.validate();
    assert!(dv > 0, "attention: value width dv must be > 0 (got {dims:?})");
    check_len("q", q.len(), dims.q_len(), dims);
    check_len("k", k.len(), dims.kv_len(), dims);
    check_len("v", v.len(), dims.v_len(dv), dims);
    check_len("out", out.len(), dims.out_len(dv), dims);
    check_len("lse", lse.len(), dims.lse_len(), dims);
    flash::forward(&dims.flash(dv), &Causal { t: dims.t }, q, k, v, out, lse);
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
    attention_backward_dv(dims, dims.d, [q, k, v, out, lse], dout, [dq, dk, dv])
}

/// [`attention_backward`] with values `dv_width` wide (see [`attention_forward_dv`]).
pub fn attention_backward_dv(
    dims: &AttnDims,
    dv_width: usize,
    [q, k, v, out, lse]: [&[f32]; 5],
    dout: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    dims.validate();
    let (vl, ol) = (dims.v_len(dv_width), dims.out_len(dv_width));
    check_len("q", q.len(), dims.q_len(), dims);
    check_len("k", k.len(), dims.kv_len(), dims);
    check_len("v", v.len(), vl, dims);
    check_len("out", out.len(), ol, dims);
    check_len("lse", lse.len(), dims.lse_len(), dims);
    check_len("dout", dout.len(), ol, dims);
    check_len("dq", dq.len(), dims.q_len(), dims);
    check_len("dk", dk.len(), dims.kv_len(), dims);
    check_len("dv", dv.len(), vl, dims);
    flash::backward(&dims.flash(dv_width), &Causal { t: dims.t }, [q, k, v, out, lse], dout, [dq, dk, dv]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::blocks::with_avx2;

    #[inline(always)]
    fn softmax_t(st: &mut [f32], i0: usize, tq: usize, scale: f32) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
        let (t, segs) = (i0 + tq, [0..st.len() / tq, 0..0]);
        flash::softmax_t(&Causal { t }, st, &segs, i0, tq, scale)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn grad_t(p: &mut [f32], ds: &mut [f32], i0: usize, tq: usize, scale: f32, lse: &[f32], delta: &[f32]) {
        let (t, segs) = (i0 + tq, [0..p.len() / tq, 0..0]);
        flash::grad_t(&Causal { t }, p, ds, &segs, i0, tq, scale, lse, delta)
    }

    /// SplitMix64 step.
    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-amp, amp).
    fn rand_vec(n: usize, amp: f32, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let u = (splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * amp
            })
            .collect()
    }

    struct Inputs {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
    }

    fn inputs(dims: &AttnDims, seed: u64) -> Inputs {
        // q, k in [-2, 2) give scaled scores with std ~1.3: softmax neither flat nor one-hot.
        Inputs {
            q: rand_vec(dims.q_len(), 2.0, seed ^ 0x11),
            k: rand_vec(dims.kv_len(), 2.0, seed ^ 0x22),
            v: rand_vec(dims.kv_len(), 1.0, seed ^ 0x33),
            dout: rand_vec(dims.q_len(), 1.0, seed ^ 0x44),
        }
    }

    fn forward(dims: &AttnDims, x: &Inputs) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; dims.q_len()];
        let mut lse = vec![0.0; dims.lse_len()];
        attention_forward(dims, &x.q, &x.k, &x.v, &mut out, &mut lse);
        (out, lse)
    }

    fn backward(dims: &AttnDims, x: &Inputs, out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
        // Pre-fill with garbage to check that outputs are overwritten, not accumulated.
        let mut dq = vec![f32::NAN; dims.q_len()];
        let mut dk = vec![7.0; dims.kv_len()];
        let mut dv = vec![-3.0; dims.kv_len()];
        attention_backward(dims, &x.q, &x.k, &x.v, out, lse, &x.dout, &mut dq, &mut dk, &mut dv);
        [dq, dk, dv]
    }

    /// Full masked T×T reference in f64: returns (out, lse).
    fn attention_naive(dims: &AttnDims, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let AttnDims { b, t, h, h_kv, d } = *dims;
        let rep = h / h_kv;
        let scale = 1.0 / (d as f64).sqrt();
        let qi = |bi: usize, i: usize, hq: usize| ((bi * t + i) * h + hq) * d;
        let ki = |bi: usize, s: usize, g: usize| ((bi * t + s) * h_kv + g) * d;
        let mut out = vec![0.0f64; dims.q_len()];
        let mut lse = vec![0.0f64; dims.lse_len()];
        for bi in 0..b {
            for hq in 0..h {
                let g = hq / rep;
                let mut scores = vec![f64::NEG_INFINITY; t * t];
                for i in 0..t {
                    for s in 0..=i {
                        let mut acc = 0.0f64;
                        for c in 0..d {
                            acc += q[qi(bi, i, hq) + c] as f64 * k[ki(bi, s, g) + c] as f64;
                        }
                        scores[i * t + s] = acc * scale;
                    }
                }
                for i in 0..t {
                    let srow = &scores[i * t..(i + 1) * t];
                    let mx = srow.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = srow.iter().map(|x| (x - mx).exp()).sum();
                    lse[(bi * h + hq) * t + i] = mx + sum.ln();
                    for s in 0..t {
                        let p = (srow[s] - mx).exp() / sum;
                        if p == 0.0 {
                            continue;
                        }
                        for c in 0..d {
                            out[qi(bi, i, hq) + c] += p * v[ki(bi, s, g) + c] as f64;
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// Naive f64 backward from the full probability matrix: returns [dq, dk, dv].
    fn attention_backward_naive(dims: &AttnDims, x: &Inputs) -> [Vec<f64>; 3] {
        let AttnDims { b, t, h, h_kv, d } = *dims;
        let rep = h / h_kv;
        let scale = 1.0 / (d as f64).sqrt();
        let qi = |bi: usize, i: usize, hq: usize| ((bi * t + i) * h + hq) * d;
        let ki = |bi: usize, s: usize, g: usize| ((bi * t + s) * h_kv + g) * d;
        let f = |a: &[f32], ia: usize, bb: &[f32], ib: usize| -> f64 {
            (0..d).map(|c| a[ia + c] as f64 * bb[ib + c] as f64).sum()
        };
        let mut dq = vec![0.0f64; dims.q_len()];
        let mut dk = vec![0.0f64; dims.kv_len()];
        let mut dv = vec![0.0f64; dims.kv_len()];
        for bi in 0..b {
            for hq in 0..h {
                let g = hq / rep;
                for i in 0..t {
                    let sc: Vec<f64> = (0..=i).map(|s| f(&x.q, qi(bi, i, hq), &x.k, ki(bi, s, g)) * scale).collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / sum).collect();
                    let dp: Vec<f64> = (0..=i).map(|s| f(&x.dout, qi(bi, i, hq), &x.v, ki(bi, s, g))).collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for s in 0..=i {
                        let ds = p[s] * (dp[s] - delta);
                        for c in 0..d {
                            dv[ki(bi, s, g) + c] += p[s] * x.dout[qi(bi, i, hq) + c] as f64;
                            dq[qi(bi, i, hq) + c] += ds * scale * x.k[ki(bi, s, g) + c] as f64;
                            dk[ki(bi, s, g) + c] += ds * scale * x.q[qi(bi, i, hq) + c] as f64;
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
    }

    fn dims(b: usize, t: usize, h: usize, h_kv: usize, d: usize) -> AttnDims {
        AttnDims { b, t, h, h_kv, d }
    }

    /// Shapes covering t not a multiple of the tile, several tiles, d = 16/64 (and 20, which
    /// exercises the non-multiple-of-LANES tail of `dot`), MHA and GQA, b = 2.
    fn shapes() -> Vec<AttnDims> {
        vec![
            dims(1, 1, 1, 1, 16),
            dims(2, 1, 4, 2, 64),
            dims(2, 7, 4, 2, 16),
            dims(1, 7, 4, 1, 64),
            dims(2, 64, 4, 4, 64),
            dims(2, 100, 4, 2, 16),
            dims(1, 100, 4, 1, 64),
            dims(2, 130, 4, 2, 64),
            dims(2, 130, 4, 1, 16),
            dims(1, 65, 2, 1, 20),
            dims(1, 200, 3, 3, 16),
        ]
    }

    // Tolerances against the f64 reference (inputs: q, k ∈ [-2, 2), v, dout ∈ [-1, 1)):
    //   forward: max abs err of out ≤ 1e-5, of lse ≤ 1e-5;
    //   backward: max abs err of dq, dk, dv ≤ 5e-5 (gradients reach magnitudes of a few units,
    //   dk/dv sum up to t·h/h_kv terms).
    // Observed maxima over these shapes: out 5e-7, lse 1.2e-6, dq 4e-7, dk 8e-7, dv 1.5e-6.
    const OUT_TOL: f64 = 1e-5;
    const LSE_TOL: f64 = 1e-5;
    const GRAD_TOL: f64 = 5e-5;

    #[test]
    fn forward_matches_naive() {
        for (n, dm) in shapes().iter().enumerate() {
            let x = inputs(dm, 100 + n as u64);
            let (out, lse) = forward(dm, &x);
            let (out_ref, lse_ref) = attention_naive(dm, &x.q, &x.k, &x.v);
            let e_out = max_abs_err(&out, &out_ref);
            let e_lse = max_abs_err(&lse, &lse_ref);
            assert!(e_out <= OUT_TOL, "{dm:?}: out max abs err {e_out:e}");
            assert!(e_lse <= LSE_TOL, "{dm:?}: lse max abs err {e_lse:e}");
        }
    }

    #[test]
    fn backward_matches_naive() {
        for (n, dm) in shapes().iter().enumerate() {
            let x = inputs(dm, 200 + n as u64);
            let (out, lse) = forward(dm, &x);
            let got = backward(dm, &x, &out, &lse);
            let want = attention_backward_naive(dm, &x);
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let e = max_abs_err(g, w);
                assert!(e <= GRAD_TOL, "{dm:?}: {name} max abs err {e:e}");
            }
        }
    }

    /// Central finite differences of the tiled forward, L = Σ w ∘ out (accumulated in f64),
    /// against the tiled backward with dout = w. eps = 1e-2 (f32); the actual step is taken as
    /// the f32 difference (x+eps) − (x−eps). Tolerance: |fd − an| ≤ 3e-4 + 3e-3·|an|
    /// (observed: at most ~15% of that bound).
    #[test]
    fn finite_differences() {
        let dm = dims(2, 70, 4, 2, 16);
        let x = inputs(&dm, 7);
        let w = &x.dout;
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let mut out = vec![0.0; dm.q_len()];
            let mut lse = vec![0.0; dm.lse_len()];
            attention_forward(&dm, q, k, v, &mut out, &mut lse);
            out.iter().zip(w).map(|(&o, &wi)| o as f64 * wi as f64).sum()
        };
        let (out, lse) = forward(&dm, &x);
        let grads = backward(&dm, &x, &out, &lse);

        let eps = 1e-2f32;
        let mut rng = 12345u64;
        for which in 0..3 {
            let mut xs = [x.q.clone(), x.k.clone(), x.v.clone()];
            for _ in 0..40 {
                let idx = (splitmix64(&mut rng) % xs[which].len() as u64) as usize;
                let orig = xs[which][idx];
                let (plus, minus) = (orig + eps, orig - eps);
                xs[which][idx] = plus;
                let lp = loss(&xs[0], &xs[1], &xs[2]);
                xs[which][idx] = minus;
                let lm = loss(&xs[0], &xs[1], &xs[2]);
                xs[which][idx] = orig;
                let fd = (lp - lm) / (plus as f64 - minus as f64);
                let an = grads[which][idx] as f64;
                let err = (fd - an).abs();
                let tol = 3e-4 + 3e-3 * an.abs();
                assert!(err <= tol, "tensor {which} idx {idx}: finite diff {fd} vs analytic {an}");
            }
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Forward and backward are bitwise reproducible across calls and thread counts.
    #[test]
    fn deterministic() {
        let dm = dims(3, 150, 4, 2, 64);
        let x = inputs(&dm, 99);
        let run = || {
            let (out, lse) = forward(&dm, &x);
            let g = backward(&dm, &x, &out, &lse);
            [bits(&out), bits(&lse), bits(&g[0]), bits(&g[1]), bits(&g[2])]
        };
        let first = run();
        assert_eq!(first, run());
        for threads in [1, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert_eq!(first, pool.install(run), "differs with {threads} threads");
        }
    }

    /// GQA with h_kv < h equals MHA with each kv head repeated for its query heads.
    #[test]
    fn gqa_equals_repeated_kv() {
        let gqa = dims(2, 90, 4, 2, 16);
        let mha = AttnDims { h_kv: 4, ..gqa };
        let x = inputs(&gqa, 5);
        let repeat = |src: &[f32]| -> Vec<f32> {
            let mut r = Vec::with_capacity(mha.kv_len());
            for row in src.chunks_exact(gqa.d * gqa.h_kv) {
                for hq in 0..gqa.h {
                    let g = hq / 2;
                    r.extend_from_slice(&row[g * gqa.d..(g + 1) * gqa.d]);
                }
            }
            r
        };
        let xm = Inputs { q: x.q.clone(), k: repeat(&x.k), v: repeat(&x.v), dout: x.dout.clone() };
        let (og, lg) = forward(&gqa, &x);
        let (om, lm) = forward(&mha, &xm);
        assert_eq!(bits(&og), bits(&om));
        assert_eq!(bits(&lg), bits(&lm));
        let gg = backward(&gqa, &x, &og, &lg);
        let gm = backward(&mha, &xm, &om, &lm);
        assert_eq!(bits(&gg[0]), bits(&gm[0]));
        // dk/dv of a shared kv head = sum over its query heads of the repeated heads' grads.
        for which in 1..3 {
            for (row_g, row_m) in gg[which].chunks_exact(gqa.d * gqa.h_kv).zip(gm[which].chunks_exact(gqa.d * mha.h_kv))
            {
                for g in 0..gqa.h_kv {
                    for c in 0..gqa.d {
                        let a = row_m[(2 * g) * gqa.d + c] as f64 + row_m[(2 * g + 1) * gqa.d + c] as f64;
                        let e = (row_g[g * gqa.d + c] as f64 - a).abs();
                        assert!(e <= 1e-5, "grad {which}: {e:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn empty_batch_is_noop() {
        let dm = dims(0, 5, 2, 1, 8);
        attention_forward(&dm, &[], &[], &[], &mut [], &mut []);
        attention_backward(&dm, &[], &[], &[], &[], &[], &[], &mut [], &mut [], &mut []);
    }

    #[test]
    #[should_panic(expected = "multiple of h_kv")]
    fn rejects_bad_group() {
        let dm = dims(1, 4, 3, 2, 8);
        let x = inputs(&dm, 1);
        forward(&dm, &x);
    }

    #[test]
    #[should_panic(expected = "d must be > 0")]
    fn rejects_zero_d() {
        let dm = dims(1, 4, 2, 2, 0);
        attention_forward(&dm, &[], &[], &[], &mut [], &mut [0.0; 8]);
    }

    #[test]
    #[should_panic(expected = "`k` has length")]
    fn rejects_bad_length() {
        let dm = dims(1, 4, 2, 1, 8);
        let q = vec![0.0; dm.q_len()];
        let k = vec![0.0; dm.kv_len() - 1];
        let v = vec![0.0; dm.kv_len()];
        let mut out = vec![0.0; dm.q_len()];
        let mut lse = vec![0.0; dm.lse_len()];
        attention_forward(&dm, &q, &k, &v, &mut out, &mut lse);
    }

    /// The element-wise kernels give bitwise-identical results in their AVX2 and generic builds,
    /// on a full block and on a short last block (`tq` < `BLOCK_Q`, `end` not a tile multiple).
    #[test]
    fn avx2_matches_generic() {
        for (i0, tq, end) in [(128, 64, 192), (192, 37, 229)] {
            let st = rand_vec(end * tq, 30.0, 1);
            let (lse, delta) = (rand_vec(tq, 5.0, 2), rand_vec(tq, 1.0, 3));
            let dp = rand_vec(end * tq, 1.0, 4);
            let (mut a, mut b) = (st.clone(), st.clone());
            let ra = with_avx2(
                #[inline(always)]
                || softmax_t(&mut a, i0, tq, 0.125),
            );
            let rb = softmax_t(&mut b, i0, tq, 0.125);
            assert_eq!((bits(&a), bits(&ra.0), bits(&ra.1)), (bits(&b), bits(&rb.0), bits(&rb.1)));
            let (mut pa, mut pb, mut da, mut db) = (st.clone(), st, dp.clone(), dp);
            with_avx2(
                #[inline(always)]
                || grad_t(&mut pa, &mut da, i0, tq, 0.125, &lse, &delta),
            );
            grad_t(&mut pb, &mut db, i0, tq, 0.125, &lse, &delta);
            assert_eq!((bits(&pa), bits(&da)), (bits(&pb), bits(&db)));
        }
    }
}
