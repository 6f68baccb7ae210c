//! Tests of the two attention cores ([`super`], the tiled one, and [`super::super::flash_gather`])
//! with query/key width `d_qk` different from the value width `d_v` (as Multi-head Latent Attention
//! needs; the kernel families today use `d_qk = d_v`): forward and backward against a masked f64
//! reference, for the causal, window + global and explicit-list key sets.

use super::*;
use crate::backend::cpu::attention::Causal;
use crate::backend::cpu::flash_gather::{self, KeyList};
use crate::backend::cpu::window_attention::WindowDims;

/// SplitMix64 step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-amp, amp).
fn rand_vec(n: usize, amp: f32, seed: &mut u64) -> Vec<f32> {
    (0..n).map(|_| ((splitmix64(seed) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp).collect()
}

/// Explicit key lists: query `i` sees every third key before it and itself, listed newest first.
struct EveryThird {
    t: usize,
    rows: Vec<Vec<u32>>,
}

impl EveryThird {
    fn new(t: usize) -> Self {
        let rows = (0..t).map(|i| (0..=i as u32).rev().filter(|&s| s as usize == i || s % 3 == 0).collect()).collect();
        EveryThird { t, rows }
    }
}

impl KeyList for EveryThird {
    fn max_keys(&self) -> usize {
        self.rows.iter().map(Vec::len).max().unwrap_or(0)
    }

    fn keys(&self, bi: usize, i: usize) -> &[u32] {
        let _ = bi;
        &self.rows[i % self.t]
    }
}

/// Masked f64 reference: (out, lse, [dq, dk, dv]) for the key sets `allowed(i)`.
#[allow(clippy::type_complexity)]
fn naive(
    dims: &FlashDims,
    x: &[Vec<f32>; 4],
    allowed: &dyn Fn(usize) -> Vec<usize>,
) -> (Vec<f64>, Vec<f64>, [Vec<f64>; 3]) {
    let FlashDims { b, t, h, d_qk, d_v, .. } = *dims;
    let [q, k, v, dout] = x;
    let scale = 1.0 / (d_qk as f64).sqrt();
    let dot = |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    let (mut out, mut lse) = (vec![0.0; b * t * h * d_v], vec![0.0; b * h * t]);
    let mut grads = [vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]];
    for bi in 0..b {
        for hq in 0..h {
            let g = hq / dims.group();
            for i in 0..t {
                let (qo, oo) = (dims.q_off(bi, i, hq, d_qk), dims.q_off(bi, i, hq, d_v));
                let keys = allowed(i);
                let ko = |s: usize| dims.kv_off(bi, s, g, d_qk);
                let vo = |s: usize| dims.kv_off(bi, s, g, d_v);
                let sc: Vec<f64> = keys.iter().map(|&s| dot(&q[qo..][..d_qk], &k[ko(s)..][..d_qk]) * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|z| (z - m).exp()).sum();
                lse[(bi * h + hq) * t + i] = m + l.ln();
                let p: Vec<f64> = sc.iter().map(|z| (z - m).exp() / l).collect();
                let dp: Vec<f64> = keys.iter().map(|&s| dot(&dout[oo..][..d_v], &v[vo(s)..][..d_v])).collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                for (n, &s) in keys.iter().enumerate() {
                    let ds = p[n] * (dp[n] - delta) * scale;
                    for c in 0..d_v {
                        out[oo + c] += p[n] * v[vo(s) + c] as f64;
                        grads[2][vo(s) + c] += p[n] * dout[oo + c] as f64;
                    }
                    for c in 0..d_qk {
                        grads[0][qo + c] += ds * k[ko(s) + c] as f64;
                        grads[1][ko(s) + c] += ds * q[qo + c] as f64;
                    }
                }
            }
        }
    }
    (out, lse, grads)
}

fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

/// A core's forward on `[q, k, v, dout]`, writing `out` and `lse`.
type Forward<'a> = dyn Fn(&[Vec<f32>; 4], &mut [f32], &mut [f32]) + 'a;
/// A core's backward on `[q, k, v, dout]` and `[out, lse]`, writing `[dq, dk, dv]`.
type Backward<'a> = dyn Fn(&[Vec<f32>; 4], [&[f32]; 2], [&mut [f32]; 3]) + 'a;

/// Runs `fwd` and `bwd` (one of the cores with its key set) on random inputs and checks them
/// against [`naive`] over `allowed`: out, lse within 1e-5, gradients within 5e-5 (the kernels'
/// own tolerances).
fn check(dims: &FlashDims, seed: u64, allowed: &dyn Fn(usize) -> Vec<usize>, fwd: &Forward, bwd: &Backward) {
    let FlashDims { b, t, h, h_kv, d_qk, d_v } = *dims;
    let mut s = seed;
    let x = [
        rand_vec(b * t * h * d_qk, 2.0, &mut s),
        rand_vec(b * t * h_kv * d_qk, 2.0, &mut s),
        rand_vec(b * t * h_kv * d_v, 1.0, &mut s),
        rand_vec(b * t * h * d_v, 1.0, &mut s),
    ];
    let (mut out, mut lse) = (vec![f32::NAN; b * t * h * d_v], vec![f32::NAN; b * h * t]);
    fwd(&x, &mut out, &mut lse);
    let mut g = [vec![f32::NAN; x[0].len()], vec![7.0; x[1].len()], vec![-3.0; x[2].len()]];
    let [dq, dk, dv] = &mut g;
    bwd(&x, [&out, &lse], [dq, dk, dv]);
    let (out_ref, lse_ref, g_ref) = naive(dims, &x, allowed);
    let (e_out, e_lse) = (max_abs_err(&out, &out_ref), max_abs_err(&lse, &lse_ref));
    assert!(e_out <= 1e-5 && e_lse <= 1e-5, "{dims:?}: out err {e_out:e}, lse err {e_lse:e}");
    for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&g_ref)) {
        let e = max_abs_err(got, want);
        assert!(e <= 5e-5, "{dims:?}: {name} max abs err {e:e}");
    }
}

/// (b, t, h, h_kv, d_qk, d_v) with d_qk ≠ d_v both ways, GQA, t = 1 and t not a block multiple.
const SHAPES: [(usize, usize, usize, usize, usize, usize); 4] =
    [(1, 1, 2, 1, 24, 16), (2, 70, 4, 2, 24, 16), (1, 130, 4, 1, 16, 40), (2, 100, 3, 3, 20, 8)];

fn flash_dims((b, t, h, h_kv, d_qk, d_v): (usize, usize, usize, usize, usize, usize)) -> FlashDims {
    FlashDims { b, t, h, h_kv, d_qk, d_v }
}

#[test]
fn tiled_causal_with_distinct_widths_matches_naive() {
    for (n, &shape) in SHAPES.iter().enumerate() {
        let dims = flash_dims(shape);
        let keys = Causal { t: dims.t };
        check(
            &dims,
            10 + n as u64,
            &|i| (0..=i).collect(),
            &|x, out, lse| forward(&dims, &keys, &x[0], &x[1], &x[2], out, lse),
            &|x, [out, lse], grads| backward(&dims, &keys, [&x[0], &x[1], &x[2], out, lse], &x[3], grads),
        );
    }
}

#[test]
fn tiled_window_with_distinct_widths_matches_naive() {
    for (n, &shape) in SHAPES.iter().enumerate() {
        let dims = flash_dims(shape);
        let (window, n_global) = (17, 3);
        // Only the key-set fields of WindowDims matter to the core (d is unused).
        let keys = WindowDims { b: dims.b, t: dims.t, h: dims.h, h_kv: dims.h_kv, d: 0, window, n_global };
        check(
            &dims,
            20 + n as u64,
            &|i| (0..=i).filter(|&s| s + window > i || s < n_global).collect(),
            &|x, out, lse| forward(&dims, &keys, &x[0], &x[1], &x[2], out, lse),
            &|x, [out, lse], grads| backward(&dims, &keys, [&x[0], &x[1], &x[2], out, lse], &x[3], grads),
        );
    }
}

#[test]
fn gathered_with_distinct_widths_matches_naive() {
    for (n, &shape) in SHAPES.iter().enumerate() {
        let dims = flash_dims(shape);
        let keys = EveryThird::new(dims.t);
        check(
            &dims,
            30 + n as u64,
            &|i| keys.rows[i].iter().map(|&s| s as usize).collect(),
            &|x, out, lse| flash_gather::forward(&dims, &keys, &x[0], &x[1], &x[2], out, lse),
            &|x, [out, lse], grads| flash_gather::backward(&dims, &keys, [&x[0], &x[1], &x[2], out, lse], &x[3], grads),
        );
    }
}
