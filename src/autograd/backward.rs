//! The backward of every op but `Checkpoint` (which the tape runs itself).

use super::ops::Op;
use super::{Grad, LeafGrads, Tape, Value, Var};
use crate::backend::Backend;
use anyhow::{bail, Result};

/// The gradient of a leaf's f32 buffer, or an error naming the op (its weight is not a parameter).
fn leaf_slot<B: Backend>(tape: &Tape<B>, v: Var, op: &str) -> Result<usize> {
    match tape.slots[v.0] {
        Some(s) => Ok(s),
        None => bail!("{op}: the weight must be a parameter or a leaf (its gradient is accumulated in f32)"),
    }
}

/// Gradients of the op's inputs given the gradient `dout` of its output `out`; gradients of
/// parameters go straight into their f32 buffers in `leaf`.
pub(super) fn backward<'p, B: Backend>(
    tape: &Tape<'p, B>,
    op: Op<'p, B>,
    out: Var,
    dout: Grad<B::A>,
    leaf: &mut LeafGrads<'_, B::F>,
) -> Result<Vec<(Var, Grad<B::A>)>> {
    let be = tape.backend();
    let a = Grad::A;
    // The weight gradient dW += doutᵀ·x of a linear op, and dX = dout·W.
    let linear_back = |leaf: &mut LeafGrads<'_, B::F>, dout: &B::A, x: Var, w: Var, mkn: (usize, usize, usize)| {
        let (m, k, n) = mkn;
        let slot = leaf_slot(tape, w, "linear")?;
        be.linear_dw(dout, tape.get(x), mkn, leaf.get(be, slot, n * k)?)?;
        let mut dx = be.a_zeros(m * k)?;
        be.linear_dx(dout, tape.get(w), mkn, &mut dx, false)?;
        Ok::<_, anyhow::Error>(dx)
    };
    let scalar = |g: &Grad<B::A>| match g {
        Grad::Scalar(s) => *s,
        Grad::A(_) => panic!("a scalar op got a tensor gradient"),
    };
    let tensor = |g: Grad<B::A>| match g {
        Grad::A(t) => t,
        Grad::Scalar(_) => panic!("a tensor op got a scalar gradient"),
    };
    Ok(match op {
        Op::Linear { x, w, mkn } | Op::RouterLinear { x, w, mkn } => {
            let dout = tensor(dout);
            let dx = linear_back(leaf, &dout, x, w, mkn)?;
            vec![(x, a(dx))]
        }
        Op::LinearResidual { x, w, resid, mkn } => {
            let dout = tensor(dout);
            let dx = linear_back(leaf, &dout, x, w, mkn)?;
            vec![(resid, a(dout)), (x, a(dx))]
        }
        Op::SwiGluFfn { x, gate, w_up, w_down, resid, up, act, mcf: (m, c, f) } => {
            let dout = tensor(dout);
            let slot = leaf_slot(tape, w_down, "swiglu_ffn")?;
            be.linear_dw(&dout, &act, (m, f, c), leaf.get(be, slot, c * f)?)?;
            drop(act);
            let (dg, du) = be.linear_dx_swiglu(&dout, tape.get(w_down), (m, f, c), (tape.get(gate), &up))?;
            drop(up);
            let dx = linear_back(leaf, &du, x, w_up, (m, c, f))?;
            vec![(resid, a(dout)), (x, a(dx)), (gate, a(dg))]
        }
        Op::Embedding { table, ids, dim, .. } => {
            let slot = leaf_slot(tape, table, "embedding")?;
            let n = tape.shape(table).iter().product();
            be.embedding_backward(&tensor(dout), dim, &ids, leaf.get(be, slot, n)?)?;
            Vec::new()
        }
        Op::RmsNorm { x, rstd, dim } => vec![(x, a(be.rmsnorm_backward(tape.get(x), &rstd, &tensor(dout), dim)?))],
        Op::LayerNorm { x, gamma, beta, stats, dim } => {
            let (dx, dg, db) = be.layernorm_backward(tape.get(x), &stats, tape.get(gamma), &tensor(dout), dim)?;
            vec![(x, a(dx)), (gamma, a(dg)), (beta, a(db))]
        }
        Op::Rope { x, bth, kind } => vec![(x, a(be.rope(&tensor(dout), bth, kind, true)?))],
        Op::QkNormRope { x, rstd, bth } => {
            vec![(x, a(be.qk_norm_rope_backward(tape.get(x), &rstd, &tensor(dout), bth)?))]
        }
        Op::Attention { q, k, v, lse, dims } => {
            let (qv, kv, vv, o) = (tape.get(q), tape.get(k), tape.get(v), tape.get(out));
            let w = tape.value_width(q, v, &dims).0;
            let (dq, dk, dv) = be.attention_backward(&dims, w, qv, kv, vv, o, &lse, &tensor(dout))?;
            vec![(q, a(dq)), (k, a(dk)), (v, a(dv))]
        }
        Op::WindowAttention { q, k, v, lse, dims } => {
            let (qv, kv, vv, o) = (tape.get(q), tape.get(k), tape.get(v), tape.get(out));
            let w = tape.value_width(q, v, &dims.attn()).0;
            let (dq, dk, dv) = be.window_attention_backward(&dims, w, qv, kv, vv, o, &lse, &tensor(dout))?;
            vec![(q, a(dq)), (k, a(dk)), (v, a(dv))]
        }
        Op::DsaAttention { q, k, v, sel, lse, dims } => {
            let (qv, kv, vv, o) = (tape.get(q), tape.get(k), tape.get(v), tape.get(out));
            let (dout, w) = (tensor(dout), tape.value_width(q, v, &dims.attn()).0);
            let (dq, dk, dv) = match sel {
                None => be.attention_backward(&dims.attn(), w, qv, kv, vv, o, &lse, &dout)?,
                Some(sel) => be.dsa_attention_backward(&dims, w, (qv, kv, vv), &sel, o, &lse, &dout)?,
            };
            vec![(q, a(dq)), (k, a(dk)), (v, a(dv))]
        }
        Op::IndexerKl { qi, ki, wi, weight, d: (dqi, dki, dwi) } => {
            let s = if weight == 1.0 { scalar(&dout) } else { weight * scalar(&dout) };
            let mut out = Vec::new();
            for (var, mut g) in [(qi, dqi), (ki, dki), (wi, dwi)] {
                be.scale(&mut g, s)?;
                out.push((var, a(g)));
            }
            out
        }
        Op::Detach => Vec::new(),
        Op::Scale { x, s } => {
            let mut g = tensor(dout);
            be.scale(&mut g, s)?;
            vec![(x, a(g))]
        }
        Op::SwiGlu { g, u } => {
            let (dg, du) = be.swiglu_backward(tape.get(g), tape.get(u), &tensor(dout))?;
            vec![(g, a(dg)), (u, a(du))]
        }
        Op::Moe { x, logits, w, routing, cache, cfg, n, cf: (c, f) } => {
            let slots = [leaf_slot(tape, w[0], "moe")?, leaf_slot(tape, w[1], "moe")?, leaf_slot(tape, w[2], "moe")?];
            let lens = w.map(|v| tape.shape(v).iter().product::<usize>());
            let dw = leaf.get3(be, slots, lens)?;
            let ws = [tape.get(w[0]), tape.get(w[1]), tape.get(w[2])];
            let (dx, d_gates) = be.moe_backward(&tensor(dout), (n, c, f), &routing, ws, &cache, dw)?;
            drop(cache);
            let d_logits = be.router_backward(&routing, Some(&d_gates), None, &cfg)?;
            vec![(x, a(dx)), (logits, a(d_logits))]
        }
        Op::MoeBalance { logits, routing, cfg, mut d_scores } => {
            be.f_scale(&mut d_scores, scalar(&dout))?;
            vec![(logits, a(be.router_backward(&routing, None, Some(&d_scores), &cfg)?))]
        }
        Op::WeightedSum { x, w } => {
            let s = scalar(&dout);
            let g: Vec<f32> = w.iter().map(|v| v * s).collect();
            match tape.values[x.0] {
                Value::Scalar(_) => vec![(x, Grad::Scalar(g[0]))],
                _ => vec![(x, a(be.a_from(&g)?))],
            }
        }
        Op::Add { a: x, b: y } => {
            let g = tensor(dout);
            vec![(x, a(be.a_copy(&g)?)), (y, a(g))]
        }
        Op::Checkpoint { .. } => unreachable!("the tape runs checkpoint backwards itself"),
        op @ (Op::ConcatCols { .. } | Op::SliceCols { .. } | Op::RepeatHeads { .. } | Op::Reshape { .. }) => {
            super::columns::backward(be, op, tensor(dout))?.into_iter().map(|(v, g)| (v, a(g))).collect()
        }
        Op::CrossEntropy { logits, targets, vocab, cap, n_valid, weight, lse } => {
            let scale = if n_valid > 0 { weight * scalar(&dout) / n_valid as f32 } else { 0.0 };
            vec![(logits, a(be.cross_entropy_backward(tape.get(logits), vocab, &targets, cap, &lse, scale)?))]
        }
    })
}
