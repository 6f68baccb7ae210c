//! The linear layer for a few rows, y[m,n] = x[m,k]·w[n,k]ᵀ with 2 ≤ m ≤ [`MAX_ROWS`]: what a
//! speculative verify pass or a short prefill computes. The `gemm` crate packs the whole weight
//! matrix when m > 1, so at decode shapes two rows cost about 7× one row (measured at k = 256,
//! n = 4096: 0.13 ms for m = 1, 0.94 ms for m = 2); here each weight row is read once for all m
//! rows (AVX2 FMAs when the CPU has them): at k = 256, n = 4096 (a tiny model's head), 2 rows
//! cost about one row of the crate's (0.07 ms each, hot cache) and 3 rows 1.3×. For smaller
//! weights the crate's one-row product is faster, so `gemm::gemm` uses this kernel for weights
//! of at least 2²⁰ values and runs smaller ones one row at a time.
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
        let cols = out.len() / m;
        columns(x, &w[j0 * k..(j0 + cols) * k], k, out);
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

/// For each weight row j of `w` (row length k) and each row r of x: out[j·m + r] = x[r]·w[j]
/// (m = the rows of x).
fn columns(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { columns_avx2(x, w, k, out) };
        }
    }
    columns_body(x, w, k, out)
}

/// [`columns_body`] with AVX2 FMAs (one fused multiply-add per lane, so the sums can differ
/// from the portable body's in the last bit), the row count a constant so the accumulators stay
/// in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    match x.len() / k {
        1 => columns_avx2_m::<1>(x, w, k, out),
        2 => columns_avx2_m::<2>(x, w, k, out),
        3 => columns_avx2_m::<3>(x, w, k, out),
        4 => columns_avx2_m::<4>(x, w, k, out),
        5 => columns_avx2_m::<5>(x, w, k, out),
        6 => columns_avx2_m::<6>(x, w, k, out),
        7 => columns_avx2_m::<7>(x, w, k, out),
        _ => columns_avx2_m::<8>(x, w, k, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2_m<const M: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps};
    assert!(x.len() == M * k && w.len() % k == 0 && out.len() == w.len() / k * M);
    let full = k / LANES * LANES;
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(M)) {
        let mut acc = [_mm256_setzero_ps(); M];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 ≤ k, so every load reads inside wr and inside row r of x
            let wv = _mm256_loadu_ps(wr.as_ptr().add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(r * k + i)), wv, *a);
            }
            i += LANES;
        }
        for (r, v) in o.iter_mut().enumerate() {
            let mut lanes = [0.0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            let tail: f32 = (full..k).map(|i| x[r * k + i] * wr[i]).sum();
            *v = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// The portable body (vectorized by the compiler for the enclosing target features): per row
/// of x, 8 lane accumulators over the chunks of 8, then the lanes in order, then the tail.
#[inline(always)]
fn columns_body(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let m = x.len() / k;
    let full = k / LANES * LANES;
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        let mut acc = [[0.0f32; LANES]; MAX_ROWS];
        for i in (0..full).step_by(LANES) {
            let wv: &[f32; LANES] = wr[i..i + LANES].try_into().expect("a chunk of 8");
            for (r, a) in acc.iter_mut().enumerate().take(m) {
                let xv: &[f32; LANES] = x[r * k + i..r * k + i + LANES].try_into().expect("a chunk of 8");
                for l in 0..LANES {
                    a[l] += xv[l] * wv[l];
                }
            }
        }
        for (r, v) in o.iter_mut().enumerate() {
            let tail: f32 = (full..k).map(|i| x[r * k + i] * wr[i]).sum();
            *v = acc[r].iter().sum::<f32>() + tail;
        }
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

    #[test]
    fn gemm_of_a_few_rows_is_row_by_row_below_the_kernel_size() {
        // gemm's dispatch: weights of 2¹⁶..2²⁰ values run one row at a time, so every row equals
        // the one-row product bitwise; from 2²⁰ on, this kernel (rows equal across m, above)
        use super::super::gemm::gemm;
        for (n, k) in [(300, 256), (4096, 256)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 41.0).collect();
            let x: Vec<f32> = (0..3 * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
            let mut three = vec![0.0f32; 3 * n];
            gemm(3, n, k, &x, Layout::N, &w, Layout::T, &mut three, false);
            let mut want = vec![0.0f32; 3 * n];
            gemm_naive(3, n, k, &x, Layout::N, &w, Layout::T, &mut want, false);
            for (a, b) in three.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt(), "{n}×{k}: {a} vs {b}");
            }
            if n * k < 1 << 20 {
                for r in 0..3 {
                    let mut one = vec![0.0f32; n];
                    gemm(1, n, k, &x[r * k..(r + 1) * k], Layout::N, &w, Layout::T, &mut one, false);
                    assert_eq!(one[..], three[r * n..(r + 1) * n], "row {r}");
                }
            }
        }
    }
}
