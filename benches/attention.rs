//! Attention forward + backward on the CPU versus sequence length: dense causal,
//! sliding-window + global tokens (W = 256, G = 4) and DeepSeek Sparse Attention (top-k = 256
//! keys chosen by a lightning indexer with H_I = 4 heads of width d_I = 32), b = 1, h = 4,
//! d = 64. Prints the ratio to dense and the growth factor per doubling of T (dense ≈ 4×,
//! window ≈ 2×; DSA's attention ≈ 2×, its indexer is O(T²) but narrow), and DSA's indexer
//! (scores + top-k selection) separately.
//!
//! `cargo bench --bench attention`

use criterion::{BenchmarkId, Criterion};
use nanoseek::kernels::slices::attention::{attention_backward, attention_forward, AttnDims};
use nanoseek::kernels::slices::dsa::{dsa_attention_backward, dsa_attention_forward, indexer_topk, DsaDims};
use nanoseek::kernels::slices::window_attention::{window_attention_backward, window_attention_forward, WindowDims};
use nanoseek::rng::Rng;
use std::time::Instant;

const H: usize = 4;
const D: usize = 64;
const W: usize = 256;
const G: usize = 4;
const TOPK: usize = 256;
const H_I: usize = 4;
const D_I: usize = 32;

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    qi: Vec<f32>,
    ki: Vec<f32>,
    wi: Vec<f32>,
}

fn inputs(t: usize) -> Inputs {
    let mut r = Rng::new(t as u64);
    let mut f = |n: usize| (0..n).map(|_| r.normal() as f32).collect::<Vec<f32>>();
    let (q, k, v, dout) = (f(t * H * D), f(t * H * D), f(t * H * D), f(t * H * D));
    Inputs { q, k, v, dout, qi: f(t * H_I * D_I), ki: f(t * D_I), wi: f(t * H_I) }
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

fn dsa_dims(t: usize) -> DsaDims {
    DsaDims { b: 1, t, h: H, h_kv: H, d: D, n_index_heads: H_I, index_dim: D_I, topk: TOPK, window: 0 }
}

fn dsa_indexer(x: &Inputs, t: usize) -> Vec<u32> {
    let dims = dsa_dims(t);
    let mut sel = vec![0; dims.sel_len()];
    indexer_topk(&dims, &x.qi, &x.ki, &x.wi, &mut sel);
    sel
}

fn dsa_attention(x: &Inputs, t: usize, sel: &[u32]) {
    let dims = dsa_dims(t);
    let (mut out, mut lse) = (vec![0.0; t * H * D], vec![0.0; H * t]);
    dsa_attention_forward(&dims, &x.q, &x.k, &x.v, sel, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * H * D], vec![0.0; t * H * D], vec![0.0; t * H * D]);
    dsa_attention_backward(&dims, &x.q, &x.k, &x.v, sel, &out, &lse, &x.dout, &mut dq, &mut dk, &mut dv);
}

/// Indexer + sparse attention forward + backward (the indexer's KL loss is not included).
fn dsa(x: &Inputs, t: usize) {
    let sel = dsa_indexer(x, t);
    dsa_attention(x, t, &sel);
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

const LENGTHS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];

fn main() {
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("attention_fwd_bwd");
    for t in [1024, 4096] {
        let x = inputs(t);
        g.bench_with_input(BenchmarkId::new("dense", t), &t, |b, &t| b.iter(|| dense(&x, t)));
        g.bench_with_input(BenchmarkId::new("window256_global4", t), &t, |b, &t| b.iter(|| window(&x, t)));
        g.bench_with_input(BenchmarkId::new("dsa_top256", t), &t, |b, &t| b.iter(|| dsa(&x, t)));
    }
    g.finish();

    println!("\nsummary (best of 3, forward + backward, b=1 h={H} d={D}; window W={W} G={G};");
    println!(
        "dsa: top-k {TOPK}, indexer H_I={H_I} d_I={D_I}; dsa ms = indexer + sparse attention, idx ms = indexer alone,"
    );
    println!("attn ms = the sparse attention alone):");
    let growth = |now: f64, before: Option<f64>| before.map_or("-".to_string(), |b| format!("{:.2}x", now / b));
    println!(
        "{:>6} {:>10} {:>7} {:>10} {:>7} {:>9} {:>9} {:>7} {:>8} {:>7} {:>8} {:>7} {:>9}",
        "T",
        "dense ms",
        "growth",
        "window ms",
        "growth",
        "dense/win",
        "dsa ms",
        "growth",
        "idx ms",
        "growth",
        "attn ms",
        "growth",
        "dense/dsa"
    );
    let mut prev: Option<[f64; 5]> = None;
    for t in LENGTHS {
        let x = inputs(t);
        let (d, w) = (best_ms(3, || dense(&x, t)), best_ms(3, || window(&x, t)));
        let sel = dsa_indexer(&x, t);
        let (idx, attn) = (best_ms(3, || drop(dsa_indexer(&x, t))), best_ms(3, || dsa_attention(&x, t, &sel)));
        let s = idx + attn;
        let p = |i: usize| prev.map(|p| p[i]);
        println!(
            "{t:>6} {d:>10.1} {:>7} {w:>10.1} {:>7} {:>8.1}x {s:>9.1} {:>7} {idx:>8.1} {:>7} {attn:>8.1} {:>7} {:>8.1}x",
            growth(d, p(0)),
            growth(w, p(1)),
            d / w,
            growth(s, p(2)),
            growth(idx, p(3)),
            growth(attn, p(4)),
            d / s
        );
        prev = Some([d, w, s, idx, attn]);
    }
    c.final_summary();
}
