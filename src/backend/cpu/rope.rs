//! Rotary position embedding, NeoX half-split layout.
//!
//! For a head vector x of width d and position t, with f_i = θ^(−2i/d) for
//! i < d/2, the pairs (x_i, x_{i+d/2}) are rotated by the angle t·f_i:
//!   y_i       = x_i cos − x_{i+d/2} sin
//!   y_{i+d/2} = x_i sin + x_{i+d/2} cos
//! The backward is the inverse rotation (angle −t·f_i).
//!
//! [`rope_qknorm_forward`] / [`rope_qknorm_backward`] fuse the model's QK-norm (parameter-free
//! RMSNorm of every q and k head, `norm::RMS_EPS`) with the rotation, per head:
//!   forward:  rstd = 1/sqrt(mean(x²) + eps), x̂ = x·rstd, y = rope(x̂)
//!   backward: dx̂ = rope⁻¹(dy), dx = rstd·(dx̂ − x̂·mean(dx̂ ∘ x̂))
//! in exactly the order of the unfused path (`norm::rmsnorm_forward`, then `rope_forward`;
//! `rope_backward`, then `norm::rmsnorm_backward`), through the same per-row helpers, so the
//! results are bitwise those of the three separate calls (a unit test below checks it).

use super::norm;
use super::rows_per_task;
use rayon::prelude::*;

/// cos/sin of t·f_i for t < max_t, i < d/2, computed in f64 and stored as f32.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub head_dim: usize,
    pub max_t: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, max_t: usize, theta: f64) -> RopeTable {
        assert!(head_dim % 2 == 0, "rope: head_dim must be even, got {head_dim}");
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_t * half);
        let mut sin = Vec::with_capacity(max_t * half);
        for t in 0..max_t {
            for i in 0..half {
                let angle = t as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { head_dim, max_t, cos, sin }
    }

    /// cos and sin of position `t < max_t` (`head_dim / 2` values each).
    pub fn angles(&self, t: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half])
    }
}

/// Rotates one head vector x (width d = 2·cs.len()) into y; `sign` −1 is the inverse rotation.
#[inline]
fn rotate_head(x: &[f32], y: &mut [f32], cs: &[f32], sn: &[f32], sign: f32) {
    let half = cs.len();
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        let s = sign * sn[i];
        y1[i] = x1[i] * cs[i] - x2[i] * s;
        y2[i] = x1[i] * s + x2[i] * cs[i];
    }
}

/// x, y: [b, t, h, d] with positions 0..t in each batch row. `inverse` applies the backward rotation.
#[allow(clippy::too_many_arguments)]
fn rotate(table: &RopeTable, x: &[f32], b: usize, t: usize, h: usize, y: &mut [f32], inverse: bool) {
    let d = table.head_dim;
    let half = d / 2;
    assert!(t <= table.max_t, "rope: sequence length {t} exceeds the table's {}", table.max_t);
    assert!(x.len() == b * t * h * d && y.len() == x.len(), "rope: x and y must be [b, t, h, d]");
    let sign = if inverse { -1.0 } else { 1.0 };
    let row = h * d; // one token
    let rpt = rows_per_task(row);
    y.par_chunks_mut(row * rpt).enumerate().for_each(|(c, yc)| {
        for (r, yt) in yc.chunks_exact_mut(row).enumerate() {
            let tok = c * rpt + r;
            let pos = tok % t;
            let (cs, sn) = (&table.cos[pos * half..(pos + 1) * half], &table.sin[pos * half..(pos + 1) * half]);
            let xt = &x[tok * row..(tok + 1) * row];
            for (xh, yh) in xt.chunks_exact(d).zip(yt.chunks_exact_mut(d)) {
                rotate_head(xh, yh, cs, sn, sign);
            }
        }
    });
}

pub fn rope_forward(table: &RopeTable, x: &[f32], b: usize, t: usize, h: usize, y: &mut [f32]) {
    rotate(table, x, b, t, h, y, false)
}

pub fn rope_backward(table: &RopeTable, dy: &[f32], b: usize, t: usize, h: usize, dx: &mut [f32]) {
    rotate(table, dy, b, t, h, dx, true)
}

/// One of q or k through the fused forward: x, y [b, t, h, d], rstd [b·t·h].
pub fn qknorm_forward(table: &RopeTable, x: &[f32], (b, t, h): (usize, usize, usize), y: &mut [f32], rstd: &mut [f32]) {
    let d = table.head_dim;
    let half = d / 2;
    assert!(t <= table.max_t, "rope_qknorm: sequence length {t} exceeds the table's {}", table.max_t);
    assert!(x.len() == b * t * h * d && y.len() == x.len(), "rope_qknorm_forward: x and y must be [b, t, h, d]");
    assert_eq!(rstd.len(), b * t * h, "rope_qknorm_forward: rstd must be [b·t·h]");
    if y.is_empty() {
        return;
    }
    let row = h * d; // one token
    let rpt = rows_per_task(row);
    y.par_chunks_mut(row * rpt).zip(rstd.par_chunks_mut(h * rpt)).enumerate().for_each(|(c, (yc, rc))| {
        let mut xn = vec![0.0f32; d]; // x̂ of one head
        for (r, (yt, rt)) in yc.chunks_exact_mut(row).zip(rc.chunks_exact_mut(h)).enumerate() {
            let tok = c * rpt + r;
            let pos = tok % t;
            let (cs, sn) = (&table.cos[pos * half..(pos + 1) * half], &table.sin[pos * half..(pos + 1) * half]);
            let xt = &x[tok * row..(tok + 1) * row];
            for ((xh, yh), rs) in xt.chunks_exact(d).zip(yt.chunks_exact_mut(d)).zip(rt.iter_mut()) {
                // rmsnorm_forward's row, then rope_forward's head
                let inv = norm::row_rstd(xh);
                *rs = inv;
                for (o, v) in xn.iter_mut().zip(xh) {
                    *o = v * inv;
                }
                rotate_head(&xn, yh, cs, sn, 1.0);
            }
        }
    });
}

/// One of q or k through the fused backward: x, dy, dx [b, t, h, d], rstd [b·t·h].
pub fn qknorm_backward(
    table: &RopeTable,
    x: &[f32],
    rstd: &[f32],
    dy: &[f32],
    (b, t, h): (usize, usize, usize),
    dx: &mut [f32],
) {
    let d = table.head_dim;
    let half = d / 2;
    assert!(t <= table.max_t, "rope_qknorm: sequence length {t} exceeds the table's {}", table.max_t);
    let n = b * t * h * d;
    assert!(x.len() == n && dy.len() == n && dx.len() == n, "rope_qknorm_backward: x, dy and dx must be [b, t, h, d]");
    assert_eq!(rstd.len(), b * t * h, "rope_qknorm_backward: rstd must be [b·t·h]");
    if dx.is_empty() {
        return;
    }
    let row = h * d;
    let rpt = rows_per_task(row);
    dx.par_chunks_mut(row * rpt).enumerate().for_each(|(c, dxc)| {
        let mut dxn = vec![0.0f32; d]; // ∂/∂x̂ of one head
        for (r, dxt) in dxc.chunks_exact_mut(row).enumerate() {
            let tok = c * rpt + r;
            let pos = tok % t;
            let (cs, sn) = (&table.cos[pos * half..(pos + 1) * half], &table.sin[pos * half..(pos + 1) * half]);
            for (j, dxh) in dxt.chunks_exact_mut(d).enumerate() {
                let off = (tok * h + j) * d;
                // rope_backward's head, then rmsnorm_backward's row
                rotate_head(&dy[off..off + d], &mut dxn, cs, sn, -1.0);
                norm::row_backward(&x[off..off + d], rstd[tok * h + j], &dxn, dxh);
            }
        }
    });
}

/// QK-norm fused with RoPE, forward: q_raw [b, t, h, d] and k_raw [b, t, h_kv, d] (d = the
/// table's head_dim) → q_out, k_out (same shapes): each head RMS-normalized (eps `RMS_EPS`, no
/// weight) and rotated at position `row % t`; rstd_q [b·t·h] and rstd_k [b·t·h_kv] keep
/// 1/sqrt(mean(x²) + eps) per head for the backward. Bitwise `rmsnorm_forward` over groups of d,
/// then [`rope_forward`].
#[allow(clippy::too_many_arguments)]
pub fn rope_qknorm_forward(
    table: &RopeTable,
    q_raw: &[f32],
    k_raw: &[f32],
    (b, t, h, h_kv): (usize, usize, usize, usize),
    q_out: &mut [f32],
    k_out: &mut [f32],
    rstd_q: &mut [f32],
    rstd_k: &mut [f32],
) {
    qknorm_forward(table, q_raw, (b, t, h), q_out, rstd_q);
    qknorm_forward(table, k_raw, (b, t, h_kv), k_out, rstd_k);
}

/// QK-norm fused with RoPE, backward: from the raw inputs, the forward's rstd and dq, dk (the
/// gradients with respect to the rotated outputs) → dq_raw, dk_raw. Bitwise [`rope_backward`],
/// then `rmsnorm_backward` over groups of d.
#[allow(clippy::too_many_arguments)]
pub fn rope_qknorm_backward(
    table: &RopeTable,
    q_raw: &[f32],
    k_raw: &[f32],
    rstd_q: &[f32],
    rstd_k: &[f32],
    dq: &[f32],
    dk: &[f32],
    (b, t, h, h_kv): (usize, usize, usize, usize),
    dq_raw_out: &mut [f32],
    dk_raw_out: &mut [f32],
) {
    qknorm_backward(table, q_raw, rstd_q, dq, (b, t, h), dq_raw_out);
    qknorm_backward(table, k_raw, rstd_k, dk, (b, t, h_kv), dk_raw_out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::norm::{rmsnorm_backward, rmsnorm_forward, RMS_EPS};

    /// Uniform values in [-1, 1).
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| (2.0 * rng.uniform() - 1.0) as f32).collect()
    }

    #[test]
    fn qknorm_fused_equals_unfused_bitwise() {
        // GQA (h ≠ h_kv), t that divides nothing nice, two head dims.
        for (b, t, h, h_kv, d) in [(2, 7, 3, 1, 16), (3, 13, 4, 2, 64)] {
            let table = RopeTable::new(d, 16, 10000.0);
            let (q, k) = (rand_vec(b * t * h * d, 1), rand_vec(b * t * h_kv * d, 2));
            let (dq, dk) = (rand_vec(q.len(), 3), rand_vec(k.len(), 4));
            let (mut fq, mut fk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
            let (mut frq, mut frk) = (vec![0.0; b * t * h], vec![0.0; b * t * h_kv]);
            rope_qknorm_forward(&table, &q, &k, (b, t, h, h_kv), &mut fq, &mut fk, &mut frq, &mut frk);
            let (mut gq, mut gk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
            rope_qknorm_backward(&table, &q, &k, &frq, &frk, &dq, &dk, (b, t, h, h_kv), &mut gq, &mut gk);
            // the unfused path of the training step: rmsnorm q, rmsnorm k, rope; rope⁻¹, rmsnorm⁻¹ ×2
            for (x, dy, hh, (y, rstd, dx)) in [(&q, &dq, h, (&fq, &frq, &gq)), (&k, &dk, h_kv, (&fk, &frk, &gk))] {
                let (mut xn, mut r) = (vec![0.0; x.len()], vec![0.0; x.len() / d]);
                rmsnorm_forward(x, d, &mut xn, &mut r);
                let mut want = vec![0.0; x.len()];
                rope_forward(&table, &xn, b, t, hh, &mut want);
                assert_eq!(&want, y, "forward, d {d}");
                assert_eq!(&r, rstd, "rstd, d {d}");
                let mut dxn = vec![0.0; x.len()];
                rope_backward(&table, dy, b, t, hh, &mut dxn);
                let mut want_dx = vec![0.0; x.len()];
                rmsnorm_backward(x, &r, &dxn, d, &mut want_dx);
                assert_eq!(&want_dx, dx, "backward, d {d}");
            }
        }
    }

    /// The fused forward in f64 from the same f32 table: one head vector → rotated x̂.
    fn head_f64(table: &RopeTable, x: &[f64], pos: usize) -> Vec<f64> {
        let (d, half) = (x.len(), x.len() / 2);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + RMS_EPS as f64).sqrt();
        let (c, s) = (&table.cos[pos * half..], &table.sin[pos * half..]);
        let mut y = vec![0.0; d];
        for i in 0..half {
            let (x1, x2, c, s) = (x[i] * r, x[i + half] * r, c[i] as f64, s[i] as f64);
            y[i] = x1 * c - x2 * s;
            y[i + half] = x1 * s + x2 * c;
        }
        y
    }

    /// Σ w ∘ forward(x) in f64 over every head of x [b, t, h, d].
    fn objective(table: &RopeTable, x: &[f64], w: &[f32], t: usize, d: usize, h: usize) -> f64 {
        let mut total = 0.0;
        for (hd, (xh, wh)) in x.chunks_exact(d).zip(w.chunks_exact(d)).enumerate() {
            let pos = (hd / h) % t;
            total += head_f64(table, xh, pos).iter().zip(wh).map(|(y, &w)| y * w as f64).sum::<f64>();
        }
        total
    }

    #[test]
    fn qknorm_backward_matches_finite_differences() {
        // Central differences in f64 (step 1e-4: truncation ~1e-8, rounding ~1e-12) of
        // L = Σ wq ∘ q_out + Σ wk ∘ k_out against the f32 backward with dq = wq, dk = wk; it
        // passes when |g − fd| ≤ 1e-4·max(|g|, |fd|) + 1e-5 (f32 rounding of O(1) gradients).
        // The f32 forward is checked against the same f64 forward (|Δ| ≤ 1e-5).
        let (b, t, h, h_kv, d) = (2, 5, 3, 1, 8);
        let table = RopeTable::new(d, 8, 10000.0);
        let (q, k) = (rand_vec(b * t * h * d, 5), rand_vec(b * t * h_kv * d, 6));
        let (wq, wk) = (rand_vec(q.len(), 7), rand_vec(k.len(), 8));
        let (mut yq, mut yk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
        let (mut rq, mut rk) = (vec![0.0; b * t * h], vec![0.0; b * t * h_kv]);
        rope_qknorm_forward(&table, &q, &k, (b, t, h, h_kv), &mut yq, &mut yk, &mut rq, &mut rk);
        let (mut gq, mut gk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
        rope_qknorm_backward(&table, &q, &k, &rq, &rk, &wq, &wk, (b, t, h, h_kv), &mut gq, &mut gk);
        let step = 1e-4;
        for (x, y, w, g, hh) in [(&q, &yq, &wq, &gq, h), (&k, &yk, &wk, &gk, h_kv)] {
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for (hd, (xh, yh)) in x64.chunks_exact(d).zip(y.chunks_exact(d)).enumerate() {
                let want = head_f64(&table, xh, (hd / hh) % t);
                for (a, b) in yh.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() <= 1e-5, "forward {a} vs f64 {b}");
                }
            }
            for j in 0..x.len() {
                let (mut plus, mut minus) = (x64.clone(), x64.clone());
                plus[j] += step;
                minus[j] -= step;
                let fd =
                    (objective(&table, &plus, w, t, d, hh) - objective(&table, &minus, w, t, d, hh)) / (2.0 * step);
                let an = g[j] as f64;
                let bound = 1e-4 * an.abs().max(fd.abs()) + 1e-5;
                assert!((an - fd).abs() <= bound, "coord {j}: analytic {an} vs finite difference {fd}");
            }
        }
    }
}
