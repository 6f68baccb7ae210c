//! Parameter-free RMSNorm over the last dimension: y = x / sqrt(mean(x²) + eps); and the affine
//! LayerNorm (`layernorm_forward`, DeepSeek-V3.2's indexer key norm).
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

/// eps of the affine LayerNorm (DeepSeek-V3.2's indexer key norm uses 1e-6).
pub const LN_EPS: f32 = 1e-6;

/// Affine LayerNorm over the last dimension: with μ, σ² the row's mean and (biased) variance,
/// r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = γ ∘ x̂ + β. x, y: [rows, dim]; gamma, beta: [dim];
/// stats: [rows, 2] = (μ, r) per row, saved for the backward.
pub fn layernorm_forward(x: &[f32], gamma: &[f32], beta: &[f32], dim: usize, y: &mut [f32], stats: &mut [f32]) {
    assert!(dim > 0 && x.len() % dim == 0, "layernorm: length not a multiple of dim");
    assert!(gamma.len() == dim && beta.len() == dim, "layernorm_forward: gamma and beta must be [dim]");
    assert!(y.len() == x.len() && stats.len() == 2 * (x.len() / dim), "layernorm_forward: bad output sizes");
    let rpt = rows_per_task(dim);
    y.par_chunks_mut(dim * rpt).zip(stats.par_chunks_mut(2 * rpt)).enumerate().for_each(|(c, (yc, sc))| {
        let x = &x[c * dim * rpt..];
        for (r, (yr, st)) in yc.chunks_exact_mut(dim).zip(sc.chunks_exact_mut(2)).enumerate() {
            let xr = &x[r * dim..(r + 1) * dim];
            let mean = xr.iter().sum::<f32>() / dim as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            let inv = 1.0 / (var + LN_EPS).sqrt();
            (st[0], st[1]) = (mean, inv);
            for (((o, v), g), b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (v - mean) * inv * g + b;
            }
        }
    });
}

/// The backward of [`layernorm_forward`]: with g = γ ∘ dy,
/// dx = r · (g − mean(g) − x̂ · mean(g ∘ x̂)), dγ = Σ_rows dy ∘ x̂, dβ = Σ_rows dy.
/// Returns (dx [rows, dim], dγ [dim], dβ [dim]).
pub fn layernorm_backward(
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / dim;
    assert!(dy.len() == x.len() && stats.len() == 2 * rows && gamma.len() == dim, "layernorm_backward: bad sizes");
    let mut dx = vec![0.0; x.len()];
    dx.par_chunks_mut(dim).enumerate().for_each(|(row, dxr)| {
        let (xr, dyr) = (&x[row * dim..(row + 1) * dim], &dy[row * dim..(row + 1) * dim]);
        let (mean, inv) = (stats[2 * row], stats[2 * row + 1]);
        let (mut sg, mut sgx) = (0.0f32, 0.0f32);
        for ((v, d), g) in xr.iter().zip(dyr).zip(gamma) {
            sg += d * g;
            sgx += d * g * (v - mean) * inv;
        }
        let (mg, mgx) = (sg / dim as f32, sgx / dim as f32);
        for (((o, v), d), g) in dxr.iter_mut().zip(xr).zip(dyr).zip(gamma) {
            *o = inv * (d * g - mg - (v - mean) * inv * mgx);
        }
    });
    // the parameter gradients: column sums over the rows, in row order
    let (mut dgamma, mut dbeta) = (vec![0.0; dim], vec![0.0; dim]);
    for row in 0..rows {
        let (mean, inv) = (stats[2 * row], stats[2 * row + 1]);
        let (xr, dyr) = (&x[row * dim..(row + 1) * dim], &dy[row * dim..(row + 1) * dim]);
        for j in 0..dim {
            dgamma[j] += dyr[j] * (xr[j] - mean) * inv;
            dbeta[j] += dyr[j];
        }
    }
    (dx, dgamma, dbeta)
}
