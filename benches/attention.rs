//! Attention forward + backward on the CPU versus sequence length: dense causal and
//! sliding-window + global tokens (W = 256, G = 4), b = 1, h = 4, d = 64. Prints the ratio
//! to dense and the growth factor per doubling of T (dense ≈ 4×, window ≈ 2×).
//!
//! `cargo bench --bench attention`

use criterion::{BenchmarkId, Criterion};
use nanoseek::backend::cpu::attention::{attention_backward, attention_forward, AttnDims};
use nanoseek::backend::cpu::window_attention::{window_attention_backward, window_attention_forward, WindowDims};
use nanoseek::rng::Rng;
use std::time::Instant;

const H: usize = 4;
const D: usize = 64;
const W: usize = 256;
const G: usize = 4;

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn inputs(t: usize) -> Inputs {
    let mut r = Rng::new(t as u64);
    let mut f = || (0..t * H * D).map(|_| r.normal() as f32).collect::<Vec<f32>>();
    Inputs { q: f(), k: f(), v: f(), dout: f() }
}

fn dense(x: &Inputs, t: usize) {
    let dims = AttnDims { b: 1, t, h: H, h_kv: H, d: D };
    let (mut out, mut lse) = (vec![0.0; t * H * D], vec![0.0; H * t]);
    attention_forward(&dims, &x.q, &x.k, &x.v, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * H * D], vec![0.0; t * H * D], vec![0.0; t * H * D]);
    attention_backward(&dims, &x.q, &x.k, &x.v, &out, &lse, &x.dout, &mut dq, &mut dk, &mut dv);
}

fn window(x: &Inputs, t: usize) {
    let dims = WindowDims { b: 1, t, h: H, h_kv: H, d: D, window: W, n_global: G };
    let (mut out, mut lse) = (vec![0.0; t * H * D], vec![0.0; H * t]);
    window_attention_forward(&dims, &x.q, &x.k, &x.v, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * H * D], vec![0.0; t * H * D], vec![0.0; t * H * D]);
    window_attention_backward(&dims, &x.q, &x.k, &x.v, &out, &lse, &x.dout, &mut dq, &mut dk, &mut dv);
}

fn best_ms(reps: usize, f: impl Fn()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

const LENGTHS: [usize; 5] = [512, 1024, 2048, 4096, 8192];

fn main() {
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("attention_fwd_bwd");
    for t in [1024, 4096] {
        let x = inputs(t);
        g.bench_with_input(BenchmarkId::new("dense", t), &t, |b, &t| b.iter(|| dense(&x, t)));
        g.bench_with_input(BenchmarkId::new("window256_global4", t), &t, |b, &t| b.iter(|| window(&x, t)));
    }
    g.finish();

    println!("\nsummary (best of 3, forward + backward, b=1 h={H} d={D}; window W={W} G={G}):");
    println!("{:>6} {:>10} {:>8} {:>11} {:>8} {:>10}", "T", "dense ms", "growth", "window ms", "growth", "dense/win");
    let mut prev: Option<(f64, f64)> = None;
    for t in LENGTHS {
        let x = inputs(t);
        let (d, w) = (best_ms(3, || dense(&x, t)), best_ms(3, || window(&x, t)));
        let (gd, gw) =
            prev.map_or(("-".into(), "-".into()), |(pd, pw)| (format!("{:.2}x", d / pd), format!("{:.2}x", w / pw)));
        println!("{t:>6} {d:>10.1} {gd:>8} {w:>11.1} {gw:>8} {:>9.1}x", d / w);
        prev = Some((d, w));
    }
    c.final_summary();
}
