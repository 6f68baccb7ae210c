//! CPU GEMM at 2048³ (and the tiny model's shapes): nanoseek's `gemm` against the
//! peer library `matrixmultiply`, measured in the same run. Prints GFLOP/s and the ratio.
//!
//! `cargo bench --bench gemm`

use criterion::{BenchmarkId, Criterion, Throughput};
use nanoseek::kernels::slices::gemm::{gemm, Layout};
use nanoseek::rng::Rng;
use std::hint::black_box;
use std::time::Instant;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

fn ours(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm(m, n, k, a, Layout::N, b, Layout::N, c, false);
}

fn peer(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    // SAFETY: row-major strides inside the slices' bounds.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

type Gemm = fn(usize, usize, usize, &[f32], &[f32], &mut [f32]);

/// Best-of-`reps` GFLOP/s, for the printed summary.
fn gflops(f: Gemm, m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let (a, b, mut c) = (random(m * k, 1), random(k * n, 2), vec![0.0; m * n]);
    f(m, n, k, &a, &b, &mut c);
    let best = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f(m, n, k, &a, &b, &mut c);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (m * n * k) as f64 / best / 1e9
}

const SHAPES: [(usize, usize, usize); 3] = [(2048, 2048, 2048), (2048, 768, 256), (2048, 4096, 256)];

fn main() {
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut g = c.benchmark_group("gemm");
    for &(m, n, k) in &SHAPES {
        let (a, b, mut out) = (random(m * k, 1), random(k * n, 2), vec![0.0; m * n]);
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64)); // "elements" = FLOPs
        let id = format!("{m}x{n}x{k}");
        g.bench_with_input(BenchmarkId::new("nanoseek", &id), &(), |bch, _| {
            bch.iter(|| ours(m, n, k, black_box(&a), &b, &mut out))
        });
        g.bench_with_input(BenchmarkId::new("matrixmultiply", &id), &(), |bch, _| {
            bch.iter(|| peer(m, n, k, black_box(&a), &b, &mut out))
        });
    }
    g.finish();
    println!("\nsummary (best of 5, {} threads; criterion's 'elem/s' above are FLOP/s):", rayon::current_num_threads());
    println!("{:<16} {:>14} {:>18} {:>8}", "shape", "nanoseek GF/s", "matrixmultiply GF/s", "ratio");
    for &(m, n, k) in &SHAPES {
        let (x, y) = (gflops(ours, m, n, k, 5), gflops(peer, m, n, k, 5));
        println!("{:<16} {x:>14.1} {y:>18.1} {:>7.2}x", format!("{m}x{n}x{k}"), x / y);
    }
    c.final_summary();
}
