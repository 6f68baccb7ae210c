//! Optimizer update kernels: AdamW and Muon's Newton–Schulz orthogonalization.

use super::gemm::{gemm, Layout};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Hyper-parameters of one AdamW update. `step` counts from 1 (bias correction).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// Decoupled AdamW: p ← p(1 − lr·wd) − lr · m̂ / (√v̂ + eps).
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len(), "adamw_update: length mismatch");
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).enumerate().for_each(
        |(c, ((pc, mc), vc))| {
            let gc = &g[c * CHUNK..c * CHUNK + pc.len()];
            for i in 0..pc.len() {
                let gi = gc[i];
                mc[i] = h.beta1 * mc[i] + (1.0 - h.beta1) * gi;
                vc[i] = h.beta2 * vc[i] + (1.0 - h.beta2) * gi * gi;
                let denom = vc[i].sqrt() / bc2_sqrt + h.eps;
                pc[i] = pc[i] * decay - step_size * mc[i] / denom;
            }
        },
    );
}

/// Quintic Newton–Schulz coefficients (Keller Jordan's Muon): they push every
/// singular value of X quickly towards 1 without needing an SVD.
const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Approximately orthogonalizes G [rows, cols]: returns ≈ U·Vᵀ from G = U·S·Vᵀ.
/// X₀ = G/‖G‖_F, then `steps` times X ← aX + (bA + cA²)X with A = XXᵀ, working
/// on the wide orientation (rows ≤ cols) so A is the smaller Gram matrix.
pub fn newton_schulz(g: &[f32], rows: usize, cols: usize, steps: usize) -> Vec<f32> {
    assert_eq!(g.len(), rows * cols, "newton_schulz: G must be [rows, cols]");
    let transpose = rows > cols;
    let (r, c) = if transpose { (cols, rows) } else { (rows, cols) };
    let norm = (super::elementwise::sum_sq(g).sqrt() as f32) + 1e-7;
    let mut x: Vec<f32> = if transpose {
        let mut t = vec![0.0; g.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = g[i * cols + j] / norm;
            }
        }
        t
    } else {
        g.iter().map(|v| v / norm).collect()
    };
    let (a, b, cc) = NS_COEFFS;
    let mut gram = vec![0.0f32; r * r];
    let mut poly = vec![0.0f32; r * r];
    let mut next = vec![0.0f32; r * c];
    for _ in 0..steps {
        gemm(r, r, c, &x, Layout::N, &x, Layout::T, &mut gram, false); // A = X Xᵀ
        gemm(r, r, r, &gram, Layout::N, &gram, Layout::N, &mut poly, false); // A²
        for (p, g) in poly.iter_mut().zip(&gram) {
            *p = b * g + cc * *p; // B = bA + cA²
        }
        for (n, v) in next.iter_mut().zip(&x) {
            *n = a * v;
        }
        gemm(r, c, r, &poly, Layout::N, &x, Layout::N, &mut next, true); // aX + BX
        std::mem::swap(&mut x, &mut next);
    }
    if transpose {
        let mut t = vec![0.0; x.len()];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn newton_schulz_orthogonalizes() {
        // After 5 steps the singular values lie roughly in [0.7, 1.2] (the quintic
        // trades exactness for speed), so X Xᵀ is close to, not equal to, I.
        let mut rng = Rng::new(1);
        for &(rows, cols) in &[(16, 48), (48, 16), (32, 32)] {
            let g: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
            let x = newton_schulz(&g, rows, cols, 5);
            let k = rows.min(cols);
            let mut gram = vec![0.0; k * k];
            if rows <= cols {
                gemm(k, k, cols, &x, Layout::N, &x, Layout::T, &mut gram, false);
            } else {
                gemm(k, k, rows, &x, Layout::T, &x, Layout::N, &mut gram, false);
            }
            for i in 0..k {
                let d = gram[i * k + i];
                assert!((0.4..1.5).contains(&d), "{rows}x{cols}: diag {d}");
            }
        }
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let mut p = vec![1.0f32, -1.0];
        let g = [0.5f32, -2.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        let h = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-10, weight_decay: 0.0, step: 1 };
        adamw_update(&mut p, &g, &mut m, &mut v, h);
        // first bias-corrected step is lr·sign(g)
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6, "{p:?}");
    }
}
