//! Rotary position embedding, NeoX half-split layout.
//!
//! For a head vector x of width d and position t, with f_i = θ^(−2i/d) for
//! i < d/2, the pairs (x_i, x_{i+d/2}) are rotated by the angle t·f_i:
//!   y_i       = x_i cos − x_{i+d/2} sin
//!   y_{i+d/2} = x_i sin + x_{i+d/2} cos
//! The backward is the inverse rotation (angle −t·f_i).

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
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let s = sign * sn[i];
                    y1[i] = x1[i] * cs[i] - x2[i] * s;
                    y2[i] = x1[i] * s + x2[i] * cs[i];
                }
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
