//! Elementwise helpers: the residual add and in-place accumulation.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// out = a + b.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(a.len() == b.len() && a.len() == out.len(), "add: length mismatch");
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let s = c * CHUNK;
        for (i, y) in o.iter_mut().enumerate() {
            *y = a[s + i] + b[s + i];
        }
    });
}

/// acc += x.
pub fn accumulate(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "accumulate: length mismatch");
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(a, b)| {
        for (y, v) in a.iter_mut().zip(b) {
            *y += v;
        }
    });
}

/// x *= s.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Σ x² in f64, deterministic (fixed chunking, chunk sums added in order).
pub fn sum_sq(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
    partial.iter().sum()
}

/// Copies a block of `rows × width` values between row-major matrices of other widths:
/// `dst[r·dst_cols + dst_off + c] = src[r·src_cols + src_off + c]` (concatenation of columns and
/// its backward, the split).
pub fn copy_cols(
    src: &[f32],
    (src_cols, src_off): (usize, usize),
    dst: &mut [f32],
    (dst_cols, dst_off): (usize, usize),
    rows: usize,
    width: usize,
) {
    assert!(src_off + width <= src_cols && dst_off + width <= dst_cols, "copy_cols: block outside a row");
    assert!(src.len() >= rows * src_cols && dst.len() >= rows * dst_cols, "copy_cols: too few rows");
    if width == 0 {
        return;
    }
    dst.par_chunks_mut(dst_cols).take(rows).enumerate().for_each(|(r, d)| {
        d[dst_off..dst_off + width].copy_from_slice(&src[r * src_cols + src_off..r * src_cols + src_off + width]);
    });
}
