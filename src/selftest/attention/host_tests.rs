//! A bf16-faithful emulation of the flash kernels passes [`Tol::flash`] against the CPU twin,
//! and corrupted results (dq zero, dq halved, one dq tile zeroed, two heads swapped, the causal
//! mask off by one) fail it: the comparison tells a right kernel from a wrong one.

use super::super::compare::{compare, round_bf16, Stats, Tol};
use super::*;

/// Dense causal attention as the flash kernels compute it: P = exp(s − m) rounded to bf16
/// before P·V (l from the f32 P), out rounded to bf16; the backward recomputes P from lse in
/// f32 and rounds P (for dV) and dS (for dQ, dK) to bf16. `extra` > 0 lets query i also see
/// the keys up to i + extra (a mask off by one).
fn emulate(dims: &AttnDims, x: &[Vec<f32>; 4], extra: usize) -> (Vec<f32>, Vec<f32>, [Vec<f32>; 3]) {
    let AttnDims { b, t, h, h_kv, d } = *dims;
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v, dout) = (&x[0], &x[1], &x[2], &x[3]);
    let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
    let (mut dq, mut dk, mut dv) = (vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
    let qi = |bi: usize, i: usize, hh: usize| ((bi * t + i) * h + hh) * d;
    let ki = |bi: usize, j: usize, g: usize| ((bi * t + j) * h_kv + g) * d;
    let dot = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f32>();
    for bi in 0..b {
        for hh in 0..h {
            let g = hh / (h / h_kv);
            for i in 0..t {
                let last = (i + extra).min(t - 1);
                let qrow = &q[qi(bi, i, hh)..][..d];
                let s: Vec<f32> = (0..=last).map(|j| scale * dot(qrow, &k[ki(bi, j, g)..][..d])).collect();
                let m = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let p: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
                let l: f32 = p.iter().sum();
                let mut o = vec![0.0f32; d];
                for (j, &pj) in p.iter().enumerate() {
                    let pb = round_bf16(pj);
                    for (oc, vc) in o.iter_mut().zip(&v[ki(bi, j, g)..][..d]) {
                        *oc += pb * vc;
                    }
                }
                for (c, oc) in o.iter().enumerate() {
                    out[qi(bi, i, hh) + c] = round_bf16(oc / l);
                }
                lse[(bi * h + hh) * t + i] = m + l.ln();
            }
            for i in 0..t {
                let last = (i + extra).min(t - 1);
                let (qo, lse_i) = (qi(bi, i, hh), lse[(bi * h + hh) * t + i]);
                let delta = dot(&dout[qo..][..d], &out[qo..][..d]);
                for j in 0..=last {
                    let ko = ki(bi, j, g);
                    let p = (scale * dot(&q[qo..][..d], &k[ko..][..d]) - lse_i).exp();
                    let dp = dot(&dout[qo..][..d], &v[ko..][..d]);
                    let (pb, dsb) = (round_bf16(p), round_bf16(p * (dp - delta)));
                    for c in 0..d {
                        dv[ko + c] += pb * dout[qo + c];
                        dk[ko + c] += dsb * q[qo + c] * scale;
                        dq[qo + c] += dsb * k[ko + c] * scale;
                    }
                }
            }
        }
    }
    (out, lse, [dq, dk, dv])
}

fn check(got: &[f32], want: &[f32], tol: Tol) -> Stats {
    compare(got, want, tol)
}

#[test]
fn the_flash_emulation_passes_and_corruptions_fail() {
    for (dims, seed) in
        [(AttnDims { b: 2, t: 200, h: 4, h_kv: 2, d: 64 }, 5), (AttnDims { b: 1, t: 160, h: 2, h_kv: 1, d: 128 }, 9)]
    {
        let x = inputs(&dims, dims.d, seed);
        let (out, lse, grads) = emulate(&dims, &x, 0);
        let want = cpu_dense(&dims, dims.d, &x, &out);
        let s = check(&out, &want.0, Tol::flash(&want.0));
        eprintln!("emulated out: margin {:.3}, rel {:.2e}", s.margin, s.rel_err);
        assert!(s.pass && s.margin < 0.6 && s.rel_err < 0.6 * Tol::flash(&want.0).norm as f64, "out {dims:?}: {s:?}");
        let s = check(&lse, &want.1, Tol::lse());
        assert!(s.pass && s.margin < 0.5, "lse {dims:?}: {s:?}");
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let tol = Tol::flash(&want.2[i]);
            let s = check(&grads[i], &want.2[i], tol);
            eprintln!("emulated {name}: margin {:.3}, rel {:.2e}", s.margin, s.rel_err);
            assert!(s.pass && s.margin < 0.6 && s.rel_err < 0.6 * tol.norm as f64, "{name} {dims:?}: {s:?}");
        }

        // corruptions of dq
        let (AttnDims { t, h, d, .. }, dq) = (dims, &grads[0]);
        let tol = Tol::flash(&want.2[0]);
        let mut tile = dq.clone();
        for i in 64..128 {
            tile[(i * h + 1) * d..(i * h + 2) * d].fill(0.0); // rows 64..128 of head 1, batch 0
        }
        let mut swapped = dq.clone();
        for r in 0..dims.b * t {
            let (a, c) = (r * h * d, r * h * d + d);
            for j in 0..d {
                swapped.swap(a + j, c + j);
            }
        }
        let wrong: [(&str, Vec<f32>); 4] = [
            ("dq all zero", vec![0.0; dq.len()]),
            ("dq scaled by 0.5", dq.iter().map(|v| 0.5 * v).collect()),
            ("one 64-row dq tile zeroed", tile),
            ("dq heads 0 and 1 swapped", swapped),
        ];
        for (what, got) in &wrong {
            let s = check(got, &want.2[0], tol);
            assert!(!s.pass && s.rel_err > tol.norm as f64, "{what} {dims:?} must fail the norm: {s:?}");
        }
        // the former tolerance let an all-zero dq through on many elements: the norm does not
        let old = Tol::new(2e-2, 2e-2, f32::INFINITY);
        let zero = check(&vec![0.0; dq.len()], &want.2[0], old);
        let lets_through = want.2[0].iter().filter(|w| w.abs() <= 2e-2 / (1.0 - 2e-2)).count();
        eprintln!("old tolerance: an all-zero dq passes {lets_through} of {} elements", dq.len());
        assert!(lets_through > 0 || !zero.pass);

        // the causal mask off by one (query i also sees key i + 1)
        let (out_m, _, grads_m) = emulate(&dims, &x, 1);
        let s = check(&out_m, &want.0, Tol::flash(&want.0));
        assert!(!s.pass && s.rel_err > Tol::flash(&want.0).norm as f64, "mask off by one, out: {s:?}");
        let s = check(&grads_m[0], &want.2[0], tol);
        assert!(!s.pass, "mask off by one, dq: {s:?}");
    }
}
