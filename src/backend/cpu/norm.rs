//! Parameter-free RMSNorm over the last dimension: y = x / sqrt(mean(x²) + eps).
//!
//! Backward, with r = 1/sqrt(mean(x²)+eps) and y = x·r:
//! dx = r · (dy − y · mean(dy ∘ y)).

use super::{math, rows_per_task};
use rayon::prelude::*;

pub const RMS_EPS: f32 = 1e-6;

/// x, y: [rows, dim]; rstd: [rows] (saved for backward).
pub fn rmsnorm_forward(x: &[f32], dim: usize, y: &mut [f32], rstd: &mut [f32]) {
    assert_eq!(x.len() % dim, 0, "rmsnorm: length not a multiple of dim");
    assert!(y.len() == x.len() && rstd.len() == x.len() / dim, "rmsnorm_forward: bad output sizes");
    let rpt = rows_per_task(dim);
    y.par_chunks_mut(dim * rpt).zip(rstd.par_chunks_mut(rpt)).enumerate().for_each(|(c, (yc, rc))| {
        let x = &x[c * dim * rpt..];
        for (r, (yr, rs)) in yc.chunks_exact_mut(dim).zip(rc.iter_mut()).enumerate() {
            let xr = &x[r * dim..(r + 1) * dim];
            let inv = row_rstd(xr);
            *rs = inv;
            for (o, v) in yr.iter_mut().zip(xr) {
                *o = v * inv;
            }
        }
    });
}

pub fn rmsnorm_backward(x: &[f32], rstd: &[f32], dy: &[f32], dim: usize, dx: &mut [f32]) {
    assert!(dy.len() == x.len() && dx.len() == x.len() && rstd.len() == x.len() / dim, "rmsnorm_backward: bad sizes");
    let rpt = rows_per_task(dim);
    dx.par_chunks_mut(dim * rpt).enumerate().for_each(|(c, dxc)| {
        for (r, dxr) in dxc.chunks_exact_mut(dim).enumerate() {
            let row = c * rpt + r;
            let (xr, dyr) = (&x[row * dim..(row + 1) * dim], &dy[row * dim..(row + 1) * dim]);
            row_backward(xr, rstd[row], dyr, dxr);
        }
    });
}

/// 1/sqrt(mean(x²) + eps) of one row: the forward's rstd (shared with `rope::rope_qknorm_forward`).
pub(crate) fn row_rstd(x: &[f32]) -> f32 {
    let ms = math::dot(x, x) / x.len() as f32;
    1.0 / (ms + RMS_EPS).sqrt()
}

/// dx of one row from x, its rstd `inv` and dy (shared with `rope::rope_qknorm_backward`).
pub(crate) fn row_backward(x: &[f32], inv: f32, dy: &[f32], dx: &mut [f32]) {
    // mean(dy ∘ y) = inv · mean(dy ∘ x)
    let dot = math::dot(x, dy) * inv / x.len() as f32;
    for ((o, xv), g) in dx.iter_mut().zip(x).zip(dy) {
        *o = inv * (g - xv * inv * dot);
    }
}
