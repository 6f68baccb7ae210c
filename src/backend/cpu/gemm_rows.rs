//! The linear layer for a few rows, y[m,n] = x[m,k]·w[n,k]ᵀ with 2 ≤ m ≤ [`MAX_ROWS`]: what a
//! speculative verify pass or a short prefill computes. The `gemm` crate packs the whole weight
//! matrix when m > 1, so at decode shapes two rows cost about 7× one row (measured at k = 256,
//! n = 4096: 0.13 ms for m = 1, 0.94 ms for m = 2); here each weight row is read once for all m
//! rows, so m ≤ 8 rows cost about one row's memory traffic.
//!
//! Summation order: each output is 8 lane sums over k (lane l takes the indices ≡ l mod 8),
//! added in lane order, then the tail; it depends on neither m nor the thread count.

use rayon::prelude::*;

/// The most rows this kernel takes.
pub const MAX_ROWS: usize = 8;

const LANES: usize = 8;

/// Columns (weight rows) per parallel task.
const COLS_PER_TASK: usize = 64;

/// y[m,n] = x[m,k]·w[n,k]ᵀ (both row-major) for 1 ≤ m ≤ [`MAX_ROWS`].
pub fn gemm_few_rows(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!((1..=MAX_ROWS).contains(&m), "gemm_few_rows: m = {m} rows");
    assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n, "gemm_few_rows: shapes");
    // the transposed product [n, m], one task per block of columns, then scattered into y
    let mut yt = vec![0.0f32; n * m];
    let block = |(b, out): (usize, &mut [f32])| {
        let j0 = b * COLS_PER_TASK;
        for (jj, o) in out.chunks_exact_mut(m).enumerate() {
            dots(x, &w[(j0 + jj) * k..(j0 + jj + 1) * k], k, o);
        }
    };
    let nested = rayon::current_thread_index().is_some();
    if nested || m * n * k < 1 << 20 {
        yt.chunks_mut(COLS_PER_TASK * m).enumerate().for_each(block);
    } else {
        yt.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(block);
    }
    for (j, row) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
}

/// out[r] = x[r]·wr for each of the `out.len()` rows of x (row length k).
#[inline]
fn dots(x: &[f32], wr: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { dots_avx2(x, wr, k, out) };
        }
    }
    dots_body(x, wr, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f32], wr: &[f32], k: usize, out: &mut [f32]) {
    dots_body(x, wr, k, out)
}

/// The portable body (vectorized by the compiler for the enclosing target features): per row
/// of x, 8 lane accumulators over the chunks of 8, then the lanes in order, then the tail.
#[inline(always)]
fn dots_body(x: &[f32], wr: &[f32], k: usize, out: &mut [f32]) {
    let m = out.len();
    let mut acc = [[0.0f32; LANES]; MAX_ROWS];
    let full = k / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        let wv: &[f32; LANES] = wr[i..i + LANES].try_into().expect("a chunk of 8");
        for (r, a) in acc.iter_mut().enumerate().take(m) {
            let xv: &[f32; LANES] = x[r * k + i..r * k + i + LANES].try_into().expect("a chunk of 8");
            for l in 0..LANES {
                a[l] += xv[l] * wv[l];
            }
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let tail: f32 = (full..k).map(|i| x[r * k + i] * wr[i]).sum();
        *o = acc[r].iter().sum::<f32>() + tail;
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{gemm_naive, Layout};
    use super::*;

    #[test]
    fn few_rows_match_the_oracle_and_do_not_depend_on_m() {
        for (n, k) in [(5, 3), (70, 19), (300, 64), (4096, 256)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 41.0).collect();
            let x: Vec<f32> = (0..MAX_ROWS * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
            let mut want = vec![0.0f32; MAX_ROWS * n];
            gemm_naive(MAX_ROWS, n, k, &x, Layout::N, &w, Layout::T, &mut want, false);
            let mut all = vec![0.0f32; MAX_ROWS * n];
            gemm_few_rows(MAX_ROWS, n, k, &x, &w, &mut all);
            for (a, b) in all.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt(), "{n}×{k}: {a} vs {b}");
            }
            // each row is computed the same way whatever the number of rows
            for m in 1..MAX_ROWS {
                let mut some = vec![0.0f32; m * n];
                gemm_few_rows(m, n, k, &x[..m * k], &w, &mut some);
                assert_eq!(some[..], all[..m * n], "{n}×{k}, m = {m}");
            }
        }
    }
}
