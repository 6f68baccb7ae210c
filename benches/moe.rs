//! MoE FFN (router + dispatch + experts + combine, forward + backward) against a dense
//! SwiGLU FFN with the same active parameters (F_dense = K·F_expert), measured in the
//! same run; then how the MoE scales with E at fixed K. CPU backend, n = 2048 tokens.
//!
//! `cargo bench --bench moe`

use criterion::{BenchmarkId, Criterion};
use nanoseek::kernels::slices::gemm::{gemm, Layout};
use nanoseek::kernels::slices::moe::{self, MoeCache, RouterConfig, ScoreFunc};
use nanoseek::kernels::slices::swiglu;
use nanoseek::rng::Rng;
use std::time::Instant;

const N: usize = 2048;
const C: usize = 256;
const K: usize = 2;
const F: usize = 256; // per expert; the dense baseline has K·F

fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32 * std).collect()
}

struct Moe {
    cfg: RouterConfig,
    router: Vec<f32>,
    bias: Vec<f32>,
    wg: Vec<f32>,
    wu: Vec<f32>,
    wd: Vec<f32>,
    cache: MoeCache,
}

impl Moe {
    fn new(e: usize) -> Moe {
        let cfg = RouterConfig {
            n_experts: e,
            top_k: K,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            score_func: ScoreFunc::Sigmoid,
            capacity_factor: None,
        };
        let s = 1.0 / (C as f32).sqrt();
        Moe {
            cfg,
            router: randn(e * C, s, 1),
            bias: vec![0.0; e],
            wg: randn(e * F * C, s, 2),
            wu: randn(e * F * C, s, 3),
            wd: randn(e * C * F, s, 4),
            cache: MoeCache::default(),
        }
    }

    /// Forward and backward of the whole layer, including the router GEMMs.
    fn step(&mut self, x: &[f32], dout: &[f32]) -> f32 {
        let e = self.cfg.n_experts;
        let mut logits = vec![0.0; N * e];
        gemm(N, e, C, x, Layout::N, &self.router, Layout::T, &mut logits, false);
        let routing = moe::route(&logits, &self.bias, &self.cfg);
        let mut out = vec![0.0; N * C];
        moe::moe_forward(x, N, C, &routing, &self.wg, &self.wu, &self.wd, F, &mut out, &mut self.cache);
        let (mut dx, mut dwg, mut dwu, mut dwd) =
            (vec![0.0; N * C], vec![0.0; e * F * C], vec![0.0; e * F * C], vec![0.0; e * C * F]);
        let mut d_gates = vec![0.0; N * K];
        moe::moe_backward(
            dout,
            N,
            C,
            &routing,
            &self.wg,
            &self.wu,
            &self.wd,
            F,
            &self.cache,
            &mut dx,
            &mut dwg,
            &mut dwu,
            &mut dwd,
            &mut d_gates,
        );
        let mut d_logits = vec![0.0; N * e];
        moe::router_backward(&routing, &d_gates, None, &self.cfg, &mut d_logits);
        gemm(N, C, e, &d_logits, Layout::N, &self.router, Layout::N, &mut dx, true);
        let mut dr = vec![0.0; e * C];
        gemm(e, C, N, &d_logits, Layout::T, x, Layout::N, &mut dr, false);
        out[0] + dx[0] + dr[0]
    }
}

/// Dense SwiGLU FFN of width K·F, forward and backward (the same GEMMs the tape runs).
fn dense_step(x: &[f32], dout: &[f32], wg: &[f32], wu: &[f32], wd: &[f32]) -> f32 {
    let f = K * F;
    let (mut g, mut u, mut a, mut y) = (vec![0.0; N * f], vec![0.0; N * f], vec![0.0; N * f], vec![0.0; N * C]);
    gemm(N, f, C, x, Layout::N, wg, Layout::T, &mut g, false);
    gemm(N, f, C, x, Layout::N, wu, Layout::T, &mut u, false);
    swiglu::swiglu_forward(&g, &u, &mut a);
    gemm(N, C, f, &a, Layout::N, wd, Layout::T, &mut y, false);
    let (mut da, mut dwd) = (vec![0.0; N * f], vec![0.0; C * f]);
    gemm(N, f, C, dout, Layout::N, wd, Layout::N, &mut da, false);
    gemm(C, f, N, dout, Layout::T, &a, Layout::N, &mut dwd, false);
    let (mut dg, mut du) = (vec![0.0; N * f], vec![0.0; N * f]);
    swiglu::swiglu_backward(&g, &u, &da, &mut dg, &mut du);
    let (mut dx, mut dwg, mut dwu) = (vec![0.0; N * C], vec![0.0; f * C], vec![0.0; f * C]);
    gemm(N, C, f, &dg, Layout::N, wg, Layout::N, &mut dx, false);
    gemm(N, C, f, &du, Layout::N, wu, Layout::N, &mut dx, true);
    gemm(f, C, N, &dg, Layout::T, x, Layout::N, &mut dwg, false);
    gemm(f, C, N, &du, Layout::T, x, Layout::N, &mut dwu, false);
    y[0] + dx[0] + dwd[0] + dwg[0] + dwu[0]
}

fn best_ms(reps: usize, mut f: impl FnMut() -> f32) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let x = randn(N * C, 1.0, 10);
    let dout = randn(N * C, 1.0, 11);
    let s = 1.0 / (C as f32).sqrt();
    let (wg, wu, wd) = (randn(K * F * C, s, 12), randn(K * F * C, s, 13), randn(C * K * F, s, 14));
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("ffn_fwd_bwd");
    g.bench_function("dense_swiglu_F512", |b| b.iter(|| dense_step(&x, &dout, &wg, &wu, &wd)));
    for e in [8, 32] {
        let mut m = Moe::new(e);
        g.bench_with_input(BenchmarkId::new("moe_K2_F256", format!("E{e}")), &e, |b, _| b.iter(|| m.step(&x, &dout)));
    }
    g.finish();

    println!("\nsummary (best of 7; n = {N}, C = {C}, K = {K}, expert F = {F}; dense F = {}):", K * F);
    let dense = best_ms(7, || dense_step(&x, &dout, &wg, &wu, &wd));
    println!("{:<28} {:>9.1} ms", "dense SwiGLU (same active)", dense);
    for e in [4, 8, 16, 32, 64] {
        let mut m = Moe::new(e);
        let t = best_ms(7, || m.step(&x, &dout));
        println!("{:<28} {t:>9.1} ms  {:.2}x dense", format!("MoE E={e} K={K}"), t / dense);
    }
    c.final_summary();
}
