//! One training step of the `tiny` preset (8×256 tokens: forward, backward, Muon/AdamW
//! update) on the CPU. Prints tokens/s and the model FLOP/s as a fraction of the GEMM
//! rate measured in the same run at the model's largest shape.
//!
//! `cargo bench --bench train_step`

use criterion::{Criterion, Throughput};
use nanoseek::data::Batch;
use nanoseek::kernels::slices::gemm::{gemm, Layout};
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::train_step;
use std::time::Instant;

const B: usize = 8;

fn step(model: &mut Model, opt: &mut Optimizer, ids: &[u32], targets: &[i32]) -> f32 {
    let batch = || Batch { ids: ids.to_vec(), targets: targets.to_vec() };
    train_step(model, opt, batch, 1, 1.0, 1.0, false).unwrap().loss
}

fn main() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let t = cfg.max_seq_len;
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut opt = Optimizer::new(&model, OptimConfig::default());
    let mut r = Rng::new(3);
    let ids: Vec<u32> = (0..B * t).map(|_| r.below(cfg.vocab_size) as u32).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| ((i + 1) % cfg.vocab_size as u32) as i32).collect();

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements((B * t) as u64)); // "elements" = tokens
    g.bench_function("tiny_8x256", |b| b.iter(|| step(&mut model, &mut opt, &ids, &targets)));
    g.finish();

    // Summary from plain timings in this run.
    let reps = 5;
    let t0 = Instant::now();
    for _ in 0..reps {
        step(&mut model, &mut opt, &ids, &targets);
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let tok_s = (B * t) as f64 / dt;
    let model_gflops = cfg.flops_per_token(t) * tok_s / 1e9;
    let (m, n, k) = (B * t, cfg.vocab_size, cfg.n_embd);
    let (a, bm, mut out) = (vec![0.5f32; m * k], vec![0.25f32; k * n], vec![0.0f32; m * n]);
    let t1 = Instant::now();
    for _ in 0..reps {
        gemm(m, n, k, &a, Layout::N, &bm, Layout::T, &mut out, false);
    }
    let gemm_gflops = 2.0 * (m * n * k) as f64 * reps as f64 / t1.elapsed().as_secs_f64() / 1e9;
    println!("\nsummary: tiny step {:.0} ms, {tok_s:.0} tokens/s, {model_gflops:.1} model GFLOP/s = {:.2}x the GEMM rate ({gemm_gflops:.1} GFLOP/s at {m}x{n}x{k}) measured in this run", dt * 1e3, model_gflops / gemm_gflops);
    c.final_summary();
}
