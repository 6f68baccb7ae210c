//! Tests of [`super`] (DSA: indexer top-k, sparse attention); those of the KL loss and the
//! cross-cutting ones are in `dsa_kl_tests.rs`.

use super::indexer::{order_key, weigh};
use super::kl::kl_row;
use super::*;
use crate::backend::cpu::attention::{attention_backward, attention_forward};
use crate::backend::cpu::blocks::with_avx2;

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

/// Integers in [-amp, amp]: every indexer score is then an exact small integer (no rounding in
/// any summation order) and ties are frequent.
fn int_vec(n: usize, amp: u64, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n).map(|_| (splitmix64(&mut s) % (2 * amp + 1)) as f32 - amp as f32).collect()
}

#[derive(Clone)]
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    qi: Vec<f32>,
    ki: Vec<f32>,
    wi: Vec<f32>,
}

fn inputs(dims: &DsaDims, seed: u64) -> Inputs {
    // q, k in [-2, 2): scaled scores with std ~1.3 (for d = 8..16), softmax neither flat nor
    // one-hot; indexer logits of a few units.
    Inputs {
        q: rand_vec(dims.q_len(), 2.0, seed ^ 0x11),
        k: rand_vec(dims.kv_len(), 2.0, seed ^ 0x22),
        v: rand_vec(dims.kv_len(), 1.0, seed ^ 0x33),
        dout: rand_vec(dims.q_len(), 1.0, seed ^ 0x44),
        qi: rand_vec(dims.qi_len(), 1.0, seed ^ 0x55),
        ki: rand_vec(dims.ki_len(), 1.0, seed ^ 0x66),
        wi: rand_vec(dims.wi_len(), 1.0, seed ^ 0x77),
    }
}

fn select(dims: &DsaDims, x: &Inputs) -> Vec<u32> {
    let mut sel = vec![7u32; dims.sel_len()];
    indexer_topk(dims, &x.qi, &x.ki, &x.wi, &mut sel);
    sel
}

fn forward(dims: &DsaDims, x: &Inputs, sel: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut lse) = (vec![f32::NAN; dims.q_len()], vec![f32::NAN; dims.lse_len()]);
    dsa_attention_forward(dims, &x.q, &x.k, &x.v, sel, &mut out, &mut lse);
    (out, lse)
}

fn backward(dims: &DsaDims, x: &Inputs, sel: &[u32], out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
    // Garbage-filled: outputs must be overwritten, not accumulated.
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; dims.q_len()], vec![7.0; dims.kv_len()], vec![-3.0; dims.kv_len()]);
    dsa_attention_backward(dims, &x.q, &x.k, &x.v, sel, out, lse, &x.dout, &mut dq, &mut dk, &mut dv);
    [dq, dk, dv]
}

/// (loss, [dqi, dki, dwi]) of `indexer_kl` with the indexer inputs `(qi, ki, wi)`.
fn kl(dims: &DsaDims, x: &Inputs, lse: &[f32], sel: Option<&[u32]>) -> (f32, [Vec<f32>; 3]) {
    let mut g = [vec![f32::NAN; dims.qi_len()], vec![5.0; dims.ki_len()], vec![-1.0; dims.wi_len()]];
    let [dqi, dki, dwi] = &mut g;
    let loss = indexer_kl(dims, &x.q, &x.k, lse, &x.qi, &x.ki, &x.wi, sel, dqi, dki, dwi);
    (loss, g)
}

/// Dense causal lse from the dense kernel.
fn dense_lse(dims: &DsaDims, x: &Inputs) -> Vec<f32> {
    let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
    attention_forward(&dims.attn(), &x.q, &x.k, &x.v, &mut out, &mut lse);
    lse
}

/// `I(i, 0..=i)` of batch `bi` in f64, straight from the definition.
fn naive_scores(dims: &DsaDims, qi: &[f64], ki: &[f64], wi: &[f64], bi: usize, i: usize) -> Vec<f64> {
    let (hi, di) = (dims.n_index_heads, dims.index_dim);
    (0..=i)
        .map(|s| {
            (0..hi)
                .map(|j| {
                    let x: f64 =
                        (0..di).map(|c| qi[dims.qi_off(bi, i) + j * di + c] * ki[dims.ki_off(bi, s) + c]).sum();
                    wi[dims.wi_off(bi, i) + j] * x.max(0.0)
                })
                .sum()
        })
        .collect()
}

/// `A(i)` from the scores `I(i, 0..=i)`: full sort by (score, index) descending.
fn naive_select(dims: &DsaDims, scores: &[f64]) -> Vec<u32> {
    let n = scores.len();
    let old = n.saturating_sub(dims.window);
    let mut cand: Vec<usize> = (0..old).collect();
    cand.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(b.cmp(&a)));
    let mut set: Vec<u32> =
        cand[..dims.topk.min(old)].iter().chain(&(old..n).collect::<Vec<_>>()).map(|&s| s as u32).collect();
    set.sort_unstable();
    set
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn rows(dims: &DsaDims, sel: &[u32]) -> Vec<Vec<usize>> {
    sel.chunks_exact(dims.kmax()).map(|r| r.iter().take_while(|&&s| s != PAD).map(|&s| s as usize).collect()).collect()
}

/// Softmax attention over explicit key sets (`sets[bi * t + i]`) in f64: (out, lse, [dq, dk, dv]).
#[allow(clippy::type_complexity)]
fn naive_attention(dims: &DsaDims, x: &Inputs, sets: &[Vec<usize>]) -> (Vec<f64>, Vec<f64>, [Vec<f64>; 3]) {
    let DsaDims { b, t, h, d, .. } = *dims;
    let scale = 1.0 / (d as f64).sqrt();
    let dotf = |a: &[f32], ia: usize, c: &[f32], ic: usize| -> f64 {
        (0..d).map(|j| a[ia + j] as f64 * c[ic + j] as f64).sum()
    };
    let (mut out, mut lse) = (vec![0.0f64; dims.q_len()], vec![0.0f64; dims.lse_len()]);
    let (mut dq, mut dk, mut dv) = (vec![0.0f64; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
    for bi in 0..b {
        for hq in 0..h {
            let g = hq / dims.group();
            for i in 0..t {
                let (vis, qo) = (&sets[bi * t + i], dims.q_off(bi, i, hq));
                let sc: Vec<f64> = vis.iter().map(|&s| dotf(&x.q, qo, &x.k, dims.kv_off(bi, s, g)) * scale).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = sc.iter().map(|z| (z - mx).exp()).sum();
                lse[(bi * h + hq) * t + i] = mx + sum.ln();
                let p: Vec<f64> = sc.iter().map(|z| (z - mx).exp() / sum).collect();
                let dp: Vec<f64> = vis.iter().map(|&s| dotf(&x.dout, qo, &x.v, dims.kv_off(bi, s, g))).collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                for (n, &s) in vis.iter().enumerate() {
                    let (ds, ko) = (p[n] * (dp[n] - delta) * scale, dims.kv_off(bi, s, g));
                    for c in 0..d {
                        out[qo + c] += p[n] * x.v[ko + c] as f64;
                        dv[ko + c] += p[n] * x.dout[qo + c] as f64;
                        dq[qo + c] += ds * x.k[ko + c] as f64;
                        dk[ko + c] += ds * x.q[qo + c] as f64;
                    }
                }
            }
        }
    }
    (out, lse, [dq, dk, dv])
}

/// The indexer KL over explicit key sets in f64 (target: mean over heads of each head's softmax
/// over the set), with its analytic gradients [dqi, dki, dwi].
fn naive_kl(dims: &DsaDims, x: &Inputs, ind: [&[f64]; 3], sets: &[Vec<usize>]) -> (f64, [Vec<f64>; 3]) {
    let DsaDims { b, t, h, d, n_index_heads: hi, index_dim: di, .. } = *dims;
    let [qi, ki, wi] = ind;
    let scale = 1.0 / (d as f64).sqrt();
    let bt = (b * t) as f64;
    let (mut loss, mut dqi, mut dki, mut dwi) = (0.0, vec![0.0; qi.len()], vec![0.0; ki.len()], vec![0.0; wi.len()]);
    let softmax = |z: &[f64]| -> Vec<f64> {
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    for bi in 0..b {
        for i in 0..t {
            let set = &sets[bi * t + i];
            let mut p = vec![0.0; set.len()];
            for hq in 0..h {
                let (qo, g) = (dims.q_off(bi, i, hq), hq / dims.group());
                let sc: Vec<f64> = set
                    .iter()
                    .map(|&s| {
                        (0..d).map(|c| x.q[qo + c] as f64 * x.k[dims.kv_off(bi, s, g) + c] as f64).sum::<f64>() * scale
                    })
                    .collect();
                softmax(&sc).iter().zip(&mut p).for_each(|(a, pv)| *pv += a / h as f64);
            }
            let xs: Vec<Vec<f64>> = set
                .iter()
                .map(|&s| {
                    (0..hi)
                        .map(|j| {
                            (0..di).map(|c| qi[dims.qi_off(bi, i) + j * di + c] * ki[dims.ki_off(bi, s) + c]).sum()
                        })
                        .collect()
                })
                .collect();
            let w = &wi[dims.wi_off(bi, i)..][..hi];
            let ii: Vec<f64> = xs.iter().map(|xr| xr.iter().zip(w).map(|(xv, wv)| wv * xv.max(0.0)).sum()).collect();
            let r = softmax(&ii);
            for (n, &s) in set.iter().enumerate() {
                if p[n] > 0.0 {
                    loss += p[n] * (p[n].ln() - r[n].ln()) / bt;
                }
                let gv = (r[n] - p[n]) / bt;
                for j in 0..hi {
                    let xv = xs[n][j];
                    dwi[dims.wi_off(bi, i) + j] += gv * xv.max(0.0);
                    if xv > 0.0 {
                        for c in 0..di {
                            dqi[dims.qi_off(bi, i) + j * di + c] += gv * w[j] * ki[dims.ki_off(bi, s) + c];
                            dki[dims.ki_off(bi, s) + c] += gv * w[j] * qi[dims.qi_off(bi, i) + j * di + c];
                        }
                    }
                }
            }
        }
    }
    (loss, [dqi, dki, dwi])
}

fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// (topk, window) combinations: window only, top-k only, both, degenerate, covering everything.
const SELECTIONS: [(usize, usize); 8] = [(5, 0), (5, 3), (0, 4), (1, 1), (40, 0), (3, 100), (16, 16), (0, 1)];

/// With integer inputs every score is an exact small integer in both the kernel and the f64
/// reference, and many of them tie: the selected sets must be identical, ties included.
#[test]
fn topk_matches_naive_exactly_with_ties() {
    let mut n_ties = 0;
    for (n, &(topk, window)) in SELECTIONS.iter().enumerate() {
        for t in [37, 130, 300] {
            let dm = DsaDims::new(2, t, 1, 1, 1, 3, [8, 5][n % 2], topk, window);
            let mut x = inputs(&dm, n as u64);
            (x.qi, x.ki, x.wi) =
                (int_vec(dm.qi_len(), 2, 1 + n as u64), int_vec(dm.ki_len(), 2, 2), int_vec(dm.wi_len(), 2, 3));
            let sel = select(&dm, &x);
            let (qi, ki, wi) = (f64s(&x.qi), f64s(&x.ki), f64s(&x.wi));
            for bi in 0..dm.b {
                for i in 0..t {
                    let scores = naive_scores(&dm, &qi, &ki, &wi, bi, i);
                    let want = naive_select(&dm, &scores);
                    let row = &sel[(bi * t + i) * dm.kmax()..][..dm.kmax()];
                    assert_eq!(want.len(), dm.n_selected(i));
                    assert_eq!(&row[..want.len()], &want[..], "{dm:?} b {bi} t {i}");
                    assert!(row[want.len()..].iter().all(|&s| s == PAD));
                    let lowest = want.iter().map(|&s| scores[s as usize]).fold(f64::INFINITY, f64::min);
                    n_ties += (scores.iter().filter(|&&v| v == lowest).count() > want.len()) as usize;
                }
            }
        }
    }
    assert!(n_ties > 100, "the inputs should produce ties at the selection boundary (got {n_ties})");
}

/// Random real inputs: the window is always in; every other selected key scores at least as
/// much as every unselected one (1e-5 slack against the f64 scores for f32 rounding).
#[test]
fn topk_selects_the_largest_scores() {
    for (n, &(topk, window)) in SELECTIONS.iter().enumerate() {
        let dm = DsaDims::new(2, 300, 1, 1, 1, 4, 16, topk, window);
        let x = inputs(&dm, 50 + n as u64);
        let sel = select(&dm, &x);
        let (qi, ki, wi) = (f64s(&x.qi), f64s(&x.ki), f64s(&x.wi));
        for bi in 0..dm.b {
            for i in 0..dm.t {
                let scores = naive_scores(&dm, &qi, &ki, &wi, bi, i);
                let row: Vec<usize> = rows(&dm, &sel[(bi * dm.t + i) * dm.kmax()..][..dm.kmax()]).remove(0);
                assert_eq!(row.len(), dm.n_selected(i));
                assert!(row.windows(2).all(|p| p[0] < p[1]) && *row.last().unwrap() <= i);
                let old = (i + 1).saturating_sub(window);
                assert!((old..=i).all(|s| row.contains(&s)), "{dm:?}: window missing at t {i}");
                let top_min = row.iter().filter(|&&s| s < old).map(|&s| scores[s]).fold(f64::INFINITY, f64::min);
                let rest_max =
                    (0..old).filter(|s| !row.contains(s)).map(|s| scores[s]).fold(f64::NEG_INFINITY, f64::max);
                assert!(top_min >= rest_max - 1e-5, "{dm:?} t {i}: selected {top_min} < unselected {rest_max}");
            }
        }
    }
}

/// Equal scores go to the more recent keys: with all scores equal (w = 0, or every index key
/// the same), A(t) is the last `min(t + 1, topk + window)` keys.
#[test]
fn ties_prefer_recent_keys() {
    let dm = DsaDims::new(1, 150, 1, 1, 1, 2, 4, 10, 3);
    let mut x = inputs(&dm, 9);
    let mut zero_w = x.clone();
    zero_w.wi.fill(0.0);
    x.ki = x.ki[..4].repeat(dm.t);
    for x in [&x, &zero_w] {
        let sel = select(&dm, x);
        for (i, row) in rows(&dm, &sel).iter().enumerate() {
            let want: Vec<usize> = (i + 1 - dm.n_selected(i)..=i).collect();
            assert_eq!(row, &want, "t {i}");
        }
    }
    // The order of scores: monotone over a sorted list, −0 = +0.
    let vals = [f32::NEG_INFINITY, -3e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 2.0, 3e38, f32::INFINITY];
    for p in vals.windows(2) {
        let (a, b) = (order_key(p[0]), order_key(p[1]));
        assert!(if p[0] == p[1] { a == b } else { a < b }, "{} vs {}", p[0], p[1]);
    }
}

/// Attention shapes: t with a short last block and several blocks, MHA and GQA (h_kv = 1, 2),
/// d = 20 (a `dot` tail), b = 2, and the selections of `SELECTIONS`.
fn shapes() -> Vec<DsaDims> {
    let mut v = Vec::new();
    for (n, &(topk, window)) in SELECTIONS.iter().enumerate() {
        let (t, h_kv, d) = [(37, 2, 8), (130, 1, 16), (70, 4, 20), (200, 2, 8)][n % 4];
        v.push(DsaDims::new(1 + n % 2, t, 4, h_kv, d, 2, 8, topk, window));
    }
    v
}

// Tolerances against the f64 reference (q, k ∈ [-2, 2), v, dout ∈ [-1, 1)): max abs err of out
// and lse ≤ 1e-5, of dq, dk, dv ≤ 5e-5, as for the dense kernel. Observed maxima over these
// shapes: out 2.7e-7, lse 7.6e-7, dq 2.7e-7, dk 1.8e-6, dv 4e-6.
const OUT_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 5e-5;

#[test]
fn forward_backward_match_naive() {
    let mut worst = [0.0f64; 5];
    for (n, dm) in shapes().iter().enumerate() {
        let x = inputs(dm, 100 + n as u64);
        let sel = select(dm, &x);
        let (out, lse) = forward(dm, &x, &sel);
        let (out_ref, lse_ref, grads_ref) = naive_attention(dm, &x, &rows(dm, &sel));
        let (e_out, e_lse) = (max_abs_err(&out, &out_ref), max_abs_err(&lse, &lse_ref));
        assert!(e_out <= OUT_TOL && e_lse <= OUT_TOL, "{dm:?}: out err {e_out:e}, lse err {e_lse:e}");
        let grads = backward(dm, &x, &sel, &out, &lse);
        let mut errs = vec![e_out, e_lse];
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&grads_ref)) {
            let e = max_abs_err(g, w);
            assert!(e <= GRAD_TOL, "{dm:?}: {name} max abs err {e:e}");
            errs.push(e);
        }
        worst.iter_mut().zip(errs).for_each(|(w, e)| *w = w.max(e));
    }
    println!(
        "max abs errors: out {:.1e} lse {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
}

/// Central finite differences of the forward, L = Σ w ∘ out (accumulated in f64), against the
/// backward with dout = w, the selection fixed; eps = 1e-2 (the step is the f32 difference
/// (x+eps) − (x−eps)). Tolerance |fd − an| ≤ 3e-4 + 3e-3·|an|, as for the dense kernel.
#[test]
fn attention_finite_differences() {
    let dm = DsaDims::new(2, 37, 4, 2, 8, 2, 8, 5, 3);
    let x = inputs(&dm, 7);
    let sel = select(&dm, &x);
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let (mut out, mut lse) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
        dsa_attention_forward(&dm, q, k, v, &sel, &mut out, &mut lse);
        out.iter().zip(&x.dout).map(|(&o, &w)| o as f64 * w as f64).sum()
    };
    let (out, lse) = forward(&dm, &x, &sel);
    let grads = backward(&dm, &x, &sel, &out, &lse);
    let eps = 1e-2f32;
    let mut rng = 12345u64;
    for which in 0..3 {
        let mut xs = [x.q.clone(), x.k.clone(), x.v.clone()];
        for _ in 0..60 {
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

/// topk + window ≥ t selects every key: the result is dense causal attention, equal to
/// `attention_forward` / `attention_backward` within 1e-5 (out, lse) and 5e-5 (dq, dk, dv).
#[test]
fn full_selection_equals_dense_kernel() {
    let cases = [
        DsaDims::new(2, 100, 4, 2, 16, 2, 8, 100, 0),
        DsaDims::new(1, 130, 4, 1, 64, 2, 8, 1000, 0),
        DsaDims::new(2, 70, 4, 4, 8, 1, 4, 0, 70),
    ];
    for (n, dm) in cases.iter().enumerate() {
        let x = inputs(dm, 300 + n as u64);
        let sel = select(dm, &x);
        assert!(rows(dm, &sel).iter().enumerate().all(|(r, row)| *row == (0..=r % dm.t).collect::<Vec<_>>()));
        let (out, lse) = forward(dm, &x, &sel);
        let grads = backward(dm, &x, &sel, &out, &lse);
        let ad = dm.attn();
        let (mut out_d, mut lse_d) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
        attention_forward(&ad, &x.q, &x.k, &x.v, &mut out_d, &mut lse_d);
        let mut gd = [vec![0.0; dm.q_len()], vec![0.0; dm.kv_len()], vec![0.0; dm.kv_len()]];
        let [dq, dk, dv] = &mut gd;
        attention_backward(&ad, &x.q, &x.k, &x.v, &out_d, &lse_d, &x.dout, dq, dk, dv);
        let err = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let (e_out, e_lse) = (err(&out, &out_d), err(&lse, &lse_d));
        assert!(e_out <= 1e-5 && e_lse <= 1e-5, "{dm:?}: forward differs ({e_out:e}, {e_lse:e})");
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&gd)) {
            let e = err(g, w);
            assert!(e <= 5e-5, "{dm:?}: {name} differs from dense by {e:e}");
        }
    }
}

#[path = "dsa_kl_tests.rs"]
mod kl_tests;
