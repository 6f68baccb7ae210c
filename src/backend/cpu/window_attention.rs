//! Sliding-window causal attention with global tokens (attention sinks), forward and backward,
//! with grouped-query attention. Same layouts, notation and numerics as [`super::attention`].
//!
//! Query `i` sees the keys `A(i) = {s : i − W < s ≤ i} ∪ {s < G, s ≤ i}`: the `W = window` most
//! recent ones (itself included) and the first `G = n_global` tokens. Scale `1/sqrt(d)`, softmax
//! over `A(i)`; `lse[i] = log Σ_{s∈A(i)} exp(S[i, s])`.
//!
//! **Visited keys.** Queries are processed in blocks of [`BLOCK_Q`] rows `i0..i1`. A block reads
//! only the key rows of [`key_segments`]: the global prefix `0..min(G, i1)` and the window range
//! `i0 + 1 − W..i1` (clamped at 0), merged into `0..i1` when they touch. That is at most
//! `W + G + BLOCK_Q − 1` keys per block, whatever `T`, so the cost is `O(T·(W + G)·d)` per head;
//! keys outside the segments are never loaded. The block's transposed scores `Sᵀ` (`[nk, tq]`,
//! one visited key per row, the rows of the first segment then those of the second) come from one
//! GEMM per segment reading `K` in place; `P·V` and the backward products are likewise split per
//! segment (accumulating into the same output).
//!
//! **Mask.** Key `s` is visible to the block rows `i0 + j` with `j` in the contiguous range of
//! `WindowDims::visible` (causal lower end; upper end `s + W`, or none for a global key). The
//! softmax is exact, as in the dense kernel: row maximum over the visible entries, `exp` base 2
//! with the scale folded in, masked entries set to exact zeros, denominators summed per
//! [`BLOCK_K`] rows of `Sᵀ` and then over those tiles.
//!
//! **Backward.** Recompute `P = exp(S·scale − lse)` per block, `D = rowsum(dO ∘ O)`,
//! `dS = P ∘ (dO Vᵀ − D)·scale`, `dQ = dS K`, `dK += dSᵀ Q`, `dV += Pᵀ dO`.
//!
//! **Parallelism, determinism, memory.** Forward: one rayon task per (batch, query block), all
//! heads. Backward: one task per (batch, kv head), visiting its query heads and blocks in a fixed
//! order and accumulating `dK`, `dV` in `[t, d]` buffers. Every output element is written by one
//! task, GEMMs are single-threaded inside tasks, so results are bitwise reproducible for any
//! thread count. Per thread: at most two `[W + G + BLOCK_Q, BLOCK_Q]` score blocks (plus the
//! backward's `dK`/`dV` accumulators) in a reused scratch buffer; nothing `T × T`.
//!
//! The loops live in [`super::flash`], the tiled core shared with the dense kernel; this file
//! holds the shapes, their checks and the window + global key set ([`key_segments`]).

use super::attention::AttnDims;
use super::flash::{self, FlashDims, KeySet};
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

    fn flash(&self, dv: usize) -> FlashDims {
        self.attn().flash(dv)
    }

    fn validate(&self) {
        assert!(self.d > 0, "window_attention: head dim d must be > 0 (got {self:?})");
        assert!(self.h > 0 && self.h_kv > 0, "window_attention: h and h_kv must be > 0 (got {self:?})");
        assert!(self.h % self.h_kv == 0, "window_attention: h ({}) must be a multiple of h_kv ({})", self.h, self.h_kv);
        assert!(self.window > 0, "window_attention: window must be >= 1 (got {self:?})");
    }

    /// Query block `qb`: (first row `i0`, rows `tq`, [`key_segments`] of its rows).
    #[cfg(test)]
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

    #[cfg(test)]
    fn q_off(&self, bi: usize, i: usize, hq: usize) -> usize {
        ((bi * self.t + i) * self.h + hq) * self.d
    }

    /// Offset of key row `s` of (batch `bi`, kv head `g`) in k-shaped tensors.
    #[cfg(test)]
    fn kv_off(&self, bi: usize, s: usize, g: usize) -> usize {
        ((bi * self.t + s) * self.h_kv + g) * self.d
    }
}

/// The window + global key set: [`key_segments`] and [`WindowDims::visible`].
impl KeySet for WindowDims {
    #[inline(always)]
    fn segments(&self, i0: usize, i1: usize) -> [Range<usize>; 2] {
        key_segments(self, i0, i1)
    }

    #[inline(always)]
    fn visible(&self, s: usize, i0: usize, tq: usize) -> (usize, usize) {
        WindowDims::visible(self, s, i0, tq)
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

fn check_lens(dims: &WindowDims, tensors: &[(&str, usize, usize)]) {
    for &(name, got, want) in tensors {
        assert_eq!(got, want, "window_attention: `{name}` has length {got}, expected {want} for {dims:?}");
    }
}

/// Sliding-window + global-token causal softmax attention (see the module doc). Writes `out` and
/// the per-row log-sum-exp of the scaled scores (natural log) into `lse`.
pub fn window_attention_forward(dims: &WindowDims, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    window_attention_forward_dv(dims, dims.d, q, k, v, out, lse)
}

/// [`window_attention_forward`] with values (and outputs) `dv` wide; q and k stay `d` wide
/// (as `attention::attention_forward_dv`).
pub fn window_attention_forward_dv(
    dims: &WindowDims,
    dv: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    dims.validate();
    assert!(dv > 0, "window_attention: value width dv must be > 0 (got {dims:?})");
    let (ql, kvl, a) = (dims.q_len(), dims.kv_len(), dims.attn());
    let lens =
        [("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), a.v_len(dv)), ("out", out.len(), a.out_len(dv))];
    check_lens(dims, &lens);
    check_lens(dims, &[("lse", lse.len(), dims.lse_len())]);
    flash::forward(&dims.flash(dv), dims, q, k, v, out, lse);
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
    window_attention_backward_dv(dims, dims.d, [q, k, v, out, lse], dout, [dq, dk, dv])
}

/// [`window_attention_backward`] with values `dv_width` wide.
pub fn window_attention_backward_dv(
    dims: &WindowDims,
    dv_width: usize,
    [q, k, v, out, lse]: [&[f32]; 5],
    dout: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    dims.validate();
    let (ql, kvl, a) = (dims.q_len(), dims.kv_len(), dims.attn());
    let (vl, ol) = (a.v_len(dv_width), a.out_len(dv_width));
    let lens = [("q", q.len(), ql), ("k", k.len(), kvl), ("v", v.len(), vl), ("out", out.len(), ol)];
    check_lens(dims, &lens);
    let lens = [("lse", lse.len(), dims.lse_len()), ("dout", dout.len(), ol), ("dq", dq.len(), ql)];
    check_lens(dims, &lens);
    check_lens(dims, &[("dk", dk.len(), kvl), ("dv", dv.len(), vl)]);
    flash::backward(&dims.flash(dv_width), dims, [q, k, v, out, lse], dout, [dq, dk, dv]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::attention::{attention_backward, attention_forward};
    use crate::backend::cpu::blocks::with_avx2;

    #[inline(always)]
    fn softmax_t(
        dims: &WindowDims,
        st: &mut [f32],
        segs: &[Range<usize>; 2],
        i0: usize,
        tq: usize,
        scale: f32,
    ) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
        flash::softmax_t(dims, st, segs, i0, tq, scale)
    }

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
        flash::grad_t(dims, p, ds, segs, i0, tq, scale, lse, delta)
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
        (0..n).map(|_| ((splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp).collect()
    }

    #[derive(Clone)]
    struct Inputs {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
    }

    fn inputs(dims: &WindowDims, seed: u64) -> Inputs {
        // q, k in [-2, 2): scaled scores with std ~1.3, softmax neither flat nor one-hot.
        Inputs {
            q: rand_vec(dims.q_len(), 2.0, seed ^ 0x11),
            k: rand_vec(dims.kv_len(), 2.0, seed ^ 0x22),
            v: rand_vec(dims.kv_len(), 1.0, seed ^ 0x33),
            dout: rand_vec(dims.q_len(), 1.0, seed ^ 0x44),
        }
    }

    fn forward(dims: &WindowDims, x: &Inputs) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; dims.q_len()];
        let mut lse = vec![f32::NAN; dims.lse_len()];
        window_attention_forward(dims, &x.q, &x.k, &x.v, &mut out, &mut lse);
        (out, lse)
    }

    fn backward(dims: &WindowDims, x: &Inputs, out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
        // Garbage-filled: outputs must be overwritten, not accumulated.
        let (mut dq, mut dk, mut dv) =
            (vec![f32::NAN; dims.q_len()], vec![7.0; dims.kv_len()], vec![-3.0; dims.kv_len()]);
        window_attention_backward(dims, &x.q, &x.k, &x.v, out, lse, &x.dout, &mut dq, &mut dk, &mut dv);
        [dq, dk, dv]
    }

    /// The full T×T mask, straight from the definition of A(i).
    fn mask(dims: &WindowDims) -> Vec<bool> {
        let (t, w, g) = (dims.t as i64, dims.window as i64, dims.n_global as i64);
        let in_window = |i: i64, s: i64| i - w < s && s <= i;
        let in_global = |i: i64, s: i64| s < g && s <= i;
        (0..t * t).map(|n| (n / t, n % t)).map(|(i, s)| in_window(i, s) || in_global(i, s)).collect()
    }

    /// Masked dense reference in f64: (out, lse, [dq, dk, dv]) with dout = x.dout.
    #[allow(clippy::type_complexity)]
    fn naive(dims: &WindowDims, x: &Inputs) -> (Vec<f64>, Vec<f64>, [Vec<f64>; 3]) {
        let WindowDims { b, t, h, h_kv, d, .. } = *dims;
        let scale = 1.0 / (d as f64).sqrt();
        let mask = mask(dims);
        let qi = |bi: usize, i: usize, hq: usize| ((bi * t + i) * h + hq) * d;
        let ki = |bi: usize, s: usize, g: usize| ((bi * t + s) * h_kv + g) * d;
        let dotf = |a: &[f32], ia: usize, c: &[f32], ic: usize| -> f64 {
            (0..d).map(|j| a[ia + j] as f64 * c[ic + j] as f64).sum()
        };
        let (mut out, mut lse) = (vec![0.0f64; dims.q_len()], vec![0.0f64; dims.lse_len()]);
        let (mut dq, mut dk, mut dv) = (vec![0.0f64; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
        for bi in 0..b {
            for hq in 0..h {
                let g = hq / (h / h_kv);
                for i in 0..t {
                    let vis: Vec<usize> = (0..t).filter(|&s| mask[i * t + s]).collect();
                    let sc: Vec<f64> =
                        vis.iter().map(|&s| dotf(&x.q, qi(bi, i, hq), &x.k, ki(bi, s, g)) * scale).collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = sc.iter().map(|z| (z - mx).exp()).sum();
                    lse[(bi * h + hq) * t + i] = mx + sum.ln();
                    let p: Vec<f64> = sc.iter().map(|z| (z - mx).exp() / sum).collect();
                    let dp: Vec<f64> = vis.iter().map(|&s| dotf(&x.dout, qi(bi, i, hq), &x.v, ki(bi, s, g))).collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                    for (n, &s) in vis.iter().enumerate() {
                        let ds = p[n] * (dp[n] - delta) * scale;
                        for c in 0..d {
                            out[qi(bi, i, hq) + c] += p[n] * x.v[ki(bi, s, g) + c] as f64;
                            dv[ki(bi, s, g) + c] += p[n] * x.dout[qi(bi, i, hq) + c] as f64;
                            dq[qi(bi, i, hq) + c] += ds * x.k[ki(bi, s, g) + c] as f64;
                            dk[ki(bi, s, g) + c] += ds * x.q[qi(bi, i, hq) + c] as f64;
                        }
                    }
                }
            }
        }
        (out, lse, [dq, dk, dv])
    }

    fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn wd(b: usize, t: usize, h: usize, h_kv: usize, d: usize, window: usize, n_global: usize) -> WindowDims {
        WindowDims { b, t, h, h_kv, d, window, n_global }
    }

    /// Every (t, W, G) of t ∈ {1, 7, 64, 100, 200}, W ∈ {1, 16, 64, 300}, G ∈ {0, 1, 4, 70}, with
    /// d ∈ {16, 64}, h = 4, h_kv ∈ {4, 2, 1}, b ∈ {1, 2} cycled; plus d = 20 (a `dot` tail), t = 130
    /// (short last block), W = 65 and G = 64 (block boundaries), G ≥ t.
    fn shapes() -> Vec<WindowDims> {
        let mut v = Vec::new();
        for t in [1, 7, 64, 100, 200] {
            for w in [1, 16, 64, 300] {
                for g in [0, 1, 4, 70] {
                    let n = v.len();
                    v.push(wd(1 + (n / 2) % 2, t, 4, [4, 2, 1][n % 3], [16, 64][n % 2], w, g));
                }
            }
        }
        v.extend([wd(2, 130, 4, 2, 20, 65, 64), wd(1, 130, 2, 1, 64, 63, 3), wd(1, 150, 4, 1, 16, 2, 200)]);
        v
    }

    // Tolerances against the f64 reference (q, k ∈ [-2, 2), v, dout ∈ [-1, 1)): max abs err of
    // out and lse ≤ 1e-5, of dq, dk, dv ≤ 5e-5 (as for the dense kernel). Observed maxima over
    // these shapes: out 6e-7, lse 1.3e-6, dq 6.5e-7, dk 4e-6, dv 1.2e-5 (t = 200, h_kv = 1, W = 1,
    // G = 1: the sink's dv sums 800 terms and reaches 35, a relative error of 3.4e-7).
    const OUT_TOL: f64 = 1e-5;
    const GRAD_TOL: f64 = 5e-5;

    #[test]
    fn matches_naive_masked_reference() {
        for (n, dm) in shapes().iter().enumerate() {
            let x = inputs(dm, 100 + n as u64);
            let (out, lse) = forward(dm, &x);
            let (out_ref, lse_ref, grads_ref) = naive(dm, &x);
            let e_out = max_abs_err(&out, &out_ref);
            let e_lse = max_abs_err(&lse, &lse_ref);
            assert!(e_out <= OUT_TOL && e_lse <= OUT_TOL, "{dm:?}: out err {e_out:e}, lse err {e_lse:e}");
            let grads = backward(dm, &x, &out, &lse);
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&grads_ref)) {
                let e = max_abs_err(g, w);
                assert!(e <= GRAD_TOL, "{dm:?}: {name} max abs err {e:e}");
            }
        }
    }

    /// W ≥ T (any G) is dense causal attention: equal to `attention_forward` / `attention_backward`
    /// within 1e-5 (out, lse) and 5e-5 (dq, dk, dv) max abs error. So is G ≥ T with any W.
    /// (Observed: bitwise equal on these shapes, as the dense kernel's extra masked keys add zeros.)
    #[test]
    fn full_window_equals_dense_kernel() {
        let cases = [
            wd(2, 100, 4, 2, 16, 100, 0),
            wd(1, 200, 4, 1, 64, 300, 4),
            wd(2, 130, 4, 4, 16, 1000, 70),
            wd(1, 7, 4, 2, 64, 7, 1),
            wd(1, 150, 4, 2, 16, 3, 150),
        ];
        for (n, dm) in cases.iter().enumerate() {
            let x = inputs(dm, 300 + n as u64);
            let (out, lse) = forward(dm, &x);
            let grads = backward(dm, &x, &out, &lse);
            let ad = dm.attn();
            let (mut out_d, mut lse_d) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
            attention_forward(&ad, &x.q, &x.k, &x.v, &mut out_d, &mut lse_d);
            let mut gd = [vec![0.0; dm.q_len()], vec![0.0; dm.kv_len()], vec![0.0; dm.kv_len()]];
            let [dq, dk, dv] = &mut gd;
            attention_backward(&ad, &x.q, &x.k, &x.v, &out_d, &lse_d, &x.dout, dq, dk, dv);
            let err = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(err(&out, &out_d) <= 1e-5 && err(&lse, &lse_d) <= 1e-5, "{dm:?}: forward differs");
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&gd)) {
                let e = err(g, w);
                assert!(e <= 5e-5, "{dm:?}: {name} differs from dense by {e:e}");
            }
        }
    }

    /// Central finite differences of the forward, L = Σ w ∘ out (accumulated in f64), against the
    /// backward with dout = w; eps = 1e-2 (the step is the f32 difference (x+eps) − (x−eps)).
    /// Tolerance |fd − an| ≤ 3e-4 + 3e-3·|an| (observed: at most 11% of that bound).
    #[test]
    fn finite_differences() {
        let dm = wd(2, 150, 4, 2, 16, 20, 4);
        let x = inputs(&dm, 7);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let (mut out, mut lse) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
            window_attention_forward(&dm, q, k, v, &mut out, &mut lse);
            out.iter().zip(&x.dout).map(|(&o, &w)| o as f64 * w as f64).sum()
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
                assert!((fd - an).abs() <= 3e-4 + 3e-3 * an.abs(), "tensor {which} idx {idx}: fd {fd} vs {an}");
            }
        }
    }

    /// Forward and backward are bitwise reproducible across calls and thread counts.
    #[test]
    fn deterministic() {
        let dm = wd(3, 300, 4, 2, 64, 70, 5);
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

    /// The key segments of every block are disjoint, increasing, causal, cover A(i) for each of its
    /// rows, and hold at most W + G + BLOCK_Q − 1 keys; so the keys visited (summed over blocks)
    /// grow linearly in T: exactly proportional to T once T is a multiple of BLOCK_Q and ≥ W + G.
    #[test]
    fn visited_keys_are_bounded_and_cover_the_window() {
        for (w, g) in [(1, 0), (16, 4), (64, 70), (100, 1), (300, 0), (5, 200)] {
            for t in [1, 7, 64, 130, 333] {
                let dm = wd(1, t, 1, 1, 1, w, g);
                let mask = mask(&dm);
                for qb in 0..t.div_ceil(BLOCK_Q) {
                    let (i0, tq, segs) = dm.block(qb);
                    assert_eq!(segs[0].start, 0);
                    assert!(segs[0].end <= segs[1].start && segs[1].end <= i0 + tq);
                    assert!(segs[0].len() + segs[1].len() < w + g + BLOCK_Q);
                    for i in i0..i0 + tq {
                        for s in 0..t {
                            let read = segs.iter().any(|r| r.contains(&s));
                            assert!(!mask[i * t + s] || read, "{dm:?}: key {s} of query {i} not read");
                            let (lo, hi) = dm.visible(s, i0, tq);
                            assert_eq!(read && (lo..hi).contains(&(i - i0)), mask[i * t + s], "{dm:?} i {i} s {s}");
                        }
                    }
                }
            }
        }
        let visited = |t: usize| -> usize {
            let dm = wd(1, t, 4, 4, 64, 256, 4);
            (0..t.div_ceil(BLOCK_Q)).map(|qb| dm.block(qb).2.iter().map(|r| r.len()).sum::<usize>()).sum()
        };
        let base = visited(1024);
        assert!(base <= 1024 / BLOCK_Q * (256 + 4 + BLOCK_Q - 1));
        for t in [2048, 4096, 8192] {
            // Each extra block past the first W + G keys visits the same number of keys.
            assert_eq!(visited(t) - base, (t - 1024) / BLOCK_Q * (256 + 4 + BLOCK_Q - 1), "t = {t}");
        }
    }

    /// The kernels read no key outside the segments of a block: with every other row of k and v set
    /// to NaN, that block's out, lse (forward) and dq (backward, given clean out and lse) are
    /// bitwise unchanged. Block 3 of t = 400 with W = 40, G = 4 has keys skipped before, between
    /// and after its two segments.
    #[test]
    fn reads_only_the_block_key_segments() {
        let dm = wd(1, 400, 4, 2, 16, 40, 4);
        let x = inputs(&dm, 3);
        let (out, lse) = forward(&dm, &x);
        let grads = backward(&dm, &x, &out, &lse);
        let (i0, tq, segs) = dm.block(3);
        assert!(segs[0] == (0..4) && segs[1] == (i0 + 1 - 40..i0 + tq));
        let mut poisoned = x.clone();
        for s in (0..dm.t).filter(|s| !segs.iter().any(|r| r.contains(s))) {
            for g in 0..dm.h_kv {
                let off = dm.kv_off(0, s, g);
                poisoned.k[off..off + dm.d].fill(f32::NAN);
                poisoned.v[off..off + dm.d].fill(f32::NAN);
            }
        }
        let (out_p, lse_p) = forward(&dm, &poisoned);
        let [dq_p, _, _] = backward(&dm, &poisoned, &out, &lse);
        let rows = dm.q_off(0, i0, 0)..dm.q_off(0, i0 + tq, 0);
        assert_eq!(bits(&out_p[rows.clone()]), bits(&out[rows.clone()]));
        assert_eq!(bits(&dq_p[rows.clone()]), bits(&grads[0][rows]));
        for hq in 0..dm.h {
            let r = hq * dm.t + i0..hq * dm.t + i0 + tq;
            assert_eq!(bits(&lse_p[r.clone()]), bits(&lse[r]));
        }
    }

    /// The element-wise kernels give bitwise-identical results in their AVX2 and generic builds.
    #[test]
    fn avx2_matches_generic() {
        let dm = wd(1, 300, 1, 1, 16, 30, 3);
        for qb in [2, 4] {
            let (i0, tq, segs) = dm.block(qb);
            let nk = segs[0].len() + segs[1].len();
            let st = rand_vec(nk * tq, 30.0, 1);
            let (lse, delta, dp) = (rand_vec(tq, 5.0, 2), rand_vec(tq, 1.0, 3), rand_vec(nk * tq, 1.0, 4));
            let (mut a, mut b) = (st.clone(), st.clone());
            let ra = with_avx2(
                #[inline(always)]
                || softmax_t(&dm, &mut a, &segs, i0, tq, 0.25),
            );
            let rb = softmax_t(&dm, &mut b, &segs, i0, tq, 0.25);
            assert_eq!((bits(&a), bits(&ra.0), bits(&ra.1)), (bits(&b), bits(&rb.0), bits(&rb.1)));
            let (mut pa, mut pb, mut da, mut db) = (st.clone(), st, dp.clone(), dp);
            with_avx2(
                #[inline(always)]
                || grad_t(&dm, &mut pa, &mut da, &segs, i0, tq, 0.25, &lse, &delta),
            );
            grad_t(&dm, &mut pb, &mut db, &segs, i0, tq, 0.25, &lse, &delta);
            assert_eq!((bits(&pa), bits(&da)), (bits(&pb), bits(&db)));
        }
    }

    #[test]
    fn empty_inputs_are_noops() {
        for dm in [wd(0, 5, 2, 1, 8, 3, 1), wd(2, 0, 2, 1, 8, 3, 1)] {
            window_attention_forward(&dm, &[], &[], &[], &mut [], &mut []);
            window_attention_backward(&dm, &[], &[], &[], &[], &[], &[], &mut [], &mut [], &mut []);
        }
    }

    #[test]
    #[should_panic(expected = "window must be >= 1")]
    fn rejects_zero_window() {
        let dm = wd(1, 4, 2, 2, 8, 0, 2);
        forward(&dm, &inputs(&dm, 1));
    }

    #[test]
    #[should_panic(expected = "multiple of h_kv")]
    fn rejects_bad_group() {
        let dm = wd(1, 4, 3, 2, 8, 2, 0);
        forward(&dm, &inputs(&dm, 1));
    }

    #[test]
    #[should_panic(expected = "`dv` has length")]
    fn rejects_bad_length() {
        let dm = wd(1, 4, 2, 1, 8, 2, 0);
        let x = inputs(&dm, 1);
        let (out, lse) = forward(&dm, &x);
        let (mut dq, mut dk, mut dv) = (vec![0.0; dm.q_len()], vec![0.0; dm.kv_len()], vec![0.0; 3]);
        window_attention_backward(&dm, &x.q, &x.k, &x.v, &out, &lse, &x.dout, &mut dq, &mut dk, &mut dv);
    }
}
