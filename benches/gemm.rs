//! CPU GEMM at 2048³ (and the tiny model's shapes): nanoseek's `gemm` against the
//! peer library `matrixmultiply`, measured in the same run. Prints GFLOP/s and the ratio.
//! Then the few-row linear layer (`y = x·wᵀ` with 2–8 rows, a speculative verify pass or a short
//! prefill; `backend::cpu::gemm_rows`): nanoseek's `gemm` against `matrixmultiply` on the same
//! transposed operand and against m separate one-row products, the path it replaces.
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
    few_rows_summary();
    c.final_summary();
}

/// y[m,n] = x[m,k]·w[n,k]ᵀ, nanoseek's dispatch (the few-row kernel for large weights).
fn ours_t(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    gemm(m, n, k, x, Layout::N, w, Layout::T, y, false);
}

/// The same product as m one-row calls (what a decode step does per row).
fn one_row_each(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)).take(m) {
        gemm(1, n, k, xr, Layout::N, w, Layout::T, yr, false);
    }
}

fn peer_t(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    // SAFETY: w is [n, k] row-major, read as its transpose [k, n] through the strides (1, k).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// (n, k): the tiny model's head (4096 × 256) and a 2048² hidden matrix.
const FEW_ROW_WEIGHTS: [(usize, usize); 2] = [(4096, 256), (2048, 2048)];

fn few_rows_summary() {
    println!("\nfew-row linear y = x·wᵀ (best of 20, hot cache; ratios = other / nanoseek time):");
    println!("{:<14} {:>12} {:>16} {:>16}", "m x n x k", "nanoseek µs", "m one-row calls", "matrixmultiply");
    for &(n, k) in &FEW_ROW_WEIGHTS {
        for m in [2, 4, 8] {
            let (x, w, mut y) = (random(m * k, 3), random(n * k, 4), vec![0.0; m * n]);
            let time = |f: Gemm, y: &mut [f32]| {
                f(m, n, k, &x, &w, y);
                (0..20)
                    .map(|_| {
                        let t = Instant::now();
                        f(m, n, k, black_box(&x), &w, y);
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let (a, b, p) = (time(ours_t, &mut y), time(one_row_each, &mut y), time(peer_t, &mut y));
            println!("{:<14} {:>12.1} {:>15.2}x {:>15.2}x", format!("{m}x{n}x{k}"), a * 1e6, b / a, p / a);
        }
    }
}
