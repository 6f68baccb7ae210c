//! Logit softcap fused with cross-entropy over the vocabulary.
//!
//! For a row of logits z and target y, with cap c (c = 0 disables the cap):
//!   ẑ_j = c·tanh(z_j / c),  loss = logsumexp(ẑ) − ẑ_y
//!   ∂loss/∂z_j = (softmax(ẑ)_j − [j = y]) · (1 − tanh²(z_j / c))
//! The capped logits and the softmax are recomputed in the backward, never stored.
//! Targets < 0 are ignored (no loss, zero gradient).

use rayon::prelude::*;

fn capped(z: f32, cap: f32) -> f32 {
    if cap > 0.0 {
        cap * (z / cap).tanh()
    } else {
        z
    }
}

/// Per-row loss in nats (0 for ignored rows). z: [rows, vocab].
pub fn softcap_cross_entropy_forward(
    z: &[f32],
    vocab: usize,
    targets: &[i32],
    cap: f32,
    losses: &mut [f32],
) {
    assert!(
        z.len() == targets.len() * vocab && losses.len() == targets.len(),
        "cross_entropy: bad sizes"
    );
    losses.par_iter_mut().enumerate().for_each(|(r, l)| {
        let tgt = targets[r];
        if tgt < 0 {
            *l = 0.0;
            return;
        }
        let row = &z[r * vocab..(r + 1) * vocab];
        let mx = row
            .iter()
            .map(|&v| capped(v, cap))
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&v| (capped(v, cap) - mx).exp()).sum();
        *l = mx + sum.ln() - capped(row[tgt as usize], cap);
    });
}

/// dz = scale · ∂loss_row/∂z for every row (scale is usually upstream / n_valid).
pub fn softcap_cross_entropy_backward(
    z: &[f32],
    vocab: usize,
    targets: &[i32],
    cap: f32,
    scale: f32,
    dz: &mut [f32],
) {
    assert!(
        z.len() == targets.len() * vocab && dz.len() == z.len(),
        "cross_entropy_backward: bad sizes"
    );
    dz.par_chunks_mut(vocab).enumerate().for_each(|(r, drow)| {
        let tgt = targets[r];
        if tgt < 0 {
            drow.fill(0.0);
            return;
        }
        let row = &z[r * vocab..(r + 1) * vocab];
        for (d, &v) in drow.iter_mut().zip(row) {
            *d = capped(v, cap);
        }
        let mx = drow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for d in drow.iter_mut() {
            *d = (*d - mx).exp();
            sum += *d;
        }
        let inv = 1.0 / sum;
        for (j, (d, &v)) in drow.iter_mut().zip(row).enumerate() {
            let p = *d * inv - if j == tgt as usize { 1.0 } else { 0.0 };
            let dcap = if cap > 0.0 {
                let th = (v / cap).tanh();
                1.0 - th * th
            } else {
                1.0
            };
            *d = p * dcap * scale;
        }
    });
}
