//! Logit softcap fused with cross-entropy over the vocabulary.
//!
//! For a row of logits z and target y, with cap c (c = 0 disables the cap):
//!   ẑ_j = c·tanh(z_j / c),  lse = log Σ_j e^{ẑ_j},  loss = lse − ẑ_y
//!   ∂loss/∂z_j = (e^{ẑ_j − lse} − [j = y]) · (1 − (ẑ_j / c)²)
//! The forward keeps only lse per row; the backward recomputes ẑ and the
//! softmax row by row, so no capped-logit or probability matrix is stored.
//! Targets < 0 are ignored (no loss, zero gradient).

use super::math;
use rayon::prelude::*;

/// ẑ = cap·tanh(z/cap) (or z itself when cap is 0), written into `out`.
fn capped_row(z: &[f32], cap: f32, out: &mut [f32]) {
    if cap > 0.0 {
        let inv = 1.0 / cap;
        for (o, &v) in out.iter_mut().zip(z) {
            *o = cap * math::tanh(v * inv);
        }
    } else {
        out.copy_from_slice(z);
    }
}

/// Per-row loss in nats and log-sum-exp (both 0 for ignored rows). z: [rows, vocab].
pub fn softcap_cross_entropy_forward(
    z: &[f32],
    vocab: usize,
    targets: &[i32],
    cap: f32,
    losses: &mut [f32],
    lse: &mut [f32],
) {
    let rows = targets.len();
    assert!(z.len() == rows * vocab && losses.len() == rows && lse.len() == rows, "cross_entropy: bad sizes");
    losses.par_iter_mut().zip(lse.par_iter_mut()).enumerate().for_each_init(
        || vec![0.0f32; vocab],
        |c, (r, (l, s))| {
            let tgt = targets[r];
            if tgt < 0 {
                (*l, *s) = (0.0, 0.0);
                return;
            }
            capped_row(&z[r * vocab..(r + 1) * vocab], cap, c);
            let mx = math::max(c);
            for v in c.iter_mut() {
                *v = math::exp(*v - mx);
            }
            *s = mx + math::sum(c).ln();
            let zt = z[r * vocab + tgt as usize];
            let ct = if cap > 0.0 { cap * math::tanh(zt / cap) } else { zt };
            *l = *s - ct;
        },
    );
}

/// dz = scale · ∂loss_row/∂z for every row (scale is usually upstream / n_valid); lse from the forward.
pub fn softcap_cross_entropy_backward(
    z: &[f32],
    vocab: usize,
    targets: &[i32],
    cap: f32,
    lse: &[f32],
    scale: f32,
    dz: &mut [f32],
) {
    assert!(
        z.len() == targets.len() * vocab && dz.len() == z.len() && lse.len() == targets.len(),
        "cross_entropy_backward: bad sizes"
    );
    dz.par_chunks_mut(vocab).enumerate().for_each(|(r, drow)| {
        let tgt = targets[r];
        if tgt < 0 {
            drow.fill(0.0);
            return;
        }
        capped_row(&z[r * vocab..(r + 1) * vocab], cap, drow);
        let (s, inv_cap) = (lse[r], if cap > 0.0 { 1.0 / cap } else { 0.0 });
        for d in drow.iter_mut() {
            let c = *d;
            let dcap = 1.0 - (c * inv_cap) * (c * inv_cap); // 1 − tanh², or 1 without a cap
            *d = math::exp(c - s) * dcap * scale;
        }
        // the −[j = y] term, with the same dcap as above
        let t = tgt as usize;
        let ct = if cap > 0.0 { cap * math::tanh(z[r * vocab + t] * inv_cap) } else { z[r * vocab + t] };
        drow[t] -= (1.0 - (ct * inv_cap) * (ct * inv_cap)) * scale;
    });
}
