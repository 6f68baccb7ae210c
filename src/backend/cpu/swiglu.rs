//! SwiGLU gate: y = silu(g) ∘ u, silu(g) = g·σ(g).
//! Backward: du = dy ∘ silu(g); dg = dy ∘ u ∘ σ(g)(1 + g(1 − σ(g))).

use super::math::sigmoid;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn swiglu_forward(g: &[f32], u: &[f32], y: &mut [f32]) {
    assert!(g.len() == u.len() && y.len() == g.len(), "swiglu_forward: length mismatch");
    y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, yc)| {
        let s = c * CHUNK;
        for (i, o) in yc.iter_mut().enumerate() {
            let gv = g[s + i];
            *o = gv * sigmoid(gv) * u[s + i];
        }
    });
}

pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    assert!(
        g.len() == u.len() && dy.len() == g.len() && dg.len() == g.len() && du.len() == g.len(),
        "swiglu_backward: length mismatch"
    );
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dgc, duc))| {
        let s = c * CHUNK;
        for i in 0..dgc.len() {
            let (gv, uv, dyv) = (g[s + i], u[s + i], dy[s + i]);
            let sg = sigmoid(gv);
            duc[i] = dyv * gv * sg;
            dgc[i] = dyv * uv * sg * (1.0 + gv * (1.0 - sg));
        }
    });
}
