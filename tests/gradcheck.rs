//! Every op's backward against central finite differences (tolerances in common/mod.rs).

mod common;

use common::{check_gradients, randn};
use nanoseek::backend::{AttnDims, RopeKind};

#[test]
fn linear() {
    check_gradients("linear", &[randn(&[5, 7], 1), randn(&[3, 7], 2)], 40, &|t, v| t.linear(v[0], v[1]));
}

#[test]
fn embedding() {
    let ids = [3u32, 0, 3, 5, 1];
    check_gradients("embedding", &[randn(&[6, 4], 1)], 30, &|t, v| t.embedding(v[0], &ids));
}

#[test]
fn rmsnorm() {
    check_gradients("rmsnorm", &[randn(&[4, 16], 3)], 64, &|t, v| t.rmsnorm(v[0], 16));
    // per-head normalization (QK-norm) groups of 8 inside rows of 16
    check_gradients("rmsnorm per head", &[randn(&[4, 16], 4)], 64, &|t, v| t.rmsnorm(v[0], 8));
}

/// The affine LayerNorm (the v32 indexer's key norm): x, γ and β, rows of 8 and of 5.
#[test]
fn layernorm() {
    for (rows, dim) in [(4, 8), (3, 5)] {
        let inputs = [randn(&[rows, dim], 51), randn(&[dim], 52), randn(&[dim], 53)];
        check_gradients("layernorm", &inputs, 60, &|t, v| t.layernorm(v[0], v[1], v[2]));
    }
}

#[test]
fn rope() {
    check_gradients("rope", &[randn(&[2, 5, 3, 8], 5)], 60, &|t, v| t.rope(v[0], (2, 5, 3), RopeKind::Attention));
}

#[test]
fn qk_norm_rope() {
    check_gradients("qk_norm_rope", &[randn(&[2, 5, 3, 8], 27)], 60, &|t, v| t.qk_norm_rope(v[0], (2, 5, 3)));
}

#[test]
fn attention_dense_and_gqa() {
    for (h, h_kv) in [(2, 2), (4, 2), (4, 1)] {
        let dims = AttnDims { b: 2, t: 9, h, h_kv, d: 8 };
        let q = randn(&[2, 9, h, 8], 6);
        let k = randn(&[2, 9, h_kv, 8], 7);
        let v = randn(&[2, 9, h_kv, 8], 8);
        check_gradients(&format!("attention h={h} h_kv={h_kv}"), &[q, k, v], 40, &|t, x| {
            t.attention(x[0], x[1], x[2], dims)
        });
    }
}

#[test]
fn window_attention() {
    use nanoseek::backend::WindowDims;
    for (window, n_global, h_kv) in [(3, 0, 2), (4, 2, 1), (20, 1, 2)] {
        let dims = WindowDims { b: 2, t: 11, h: 2, h_kv, d: 8, window, n_global };
        let (q, k, v) = (randn(&[2, 11, 2, 8], 16), randn(&[2, 11, h_kv, 8], 17), randn(&[2, 11, h_kv, 8], 18));
        let name = format!("window attention W={window} G={n_global} h_kv={h_kv}");
        check_gradients(&name, &[q, k, v], 40, &|t, x| t.window_attention(x[0], x[1], x[2], dims));
    }
}

#[test]
fn swiglu() {
    check_gradients("swiglu", &[randn(&[3, 10], 9), randn(&[3, 10], 10)], 30, &|t, v| t.swiglu(v[0], v[1]));
}

#[test]
fn add() {
    check_gradients("add", &[randn(&[3, 4], 11), randn(&[3, 4], 12)], 12, &|t, v| t.add(v[0], v[1]));
}

#[test]
fn softcapped_cross_entropy() {
    // logits scaled up so the cap (here 3) is active; one ignored row (-1)
    let mut z = randn(&[5, 11], 13);
    z.data.iter_mut().for_each(|x| *x *= 3.0);
    let targets = [2, 10, -1, 0, 7];
    for cap in [0.0, 3.0, 15.0] {
        check_gradients(&format!("cross-entropy cap {cap}"), &[z.clone()], 55, &|t, v| {
            Ok(t.cross_entropy(v[0], &targets, cap)?.0)
        });
    }
}

#[test]
fn composition_shares_inputs() {
    // x feeds two branches: gradients from both must add up
    check_gradients("shared input", &[randn(&[3, 6], 14), randn(&[6, 6], 15)], 30, &|t, v| {
        let a = t.linear(v[0], v[1])?;
        let b = t.rmsnorm(v[0], 6)?;
        let c = t.add(a, b)?;
        t.swiglu(c, a)
    });
}

#[test]
fn fused_linear_epilogues() {
    // resid + x·wᵀ, and swiglu(gate, x·wᵀ): the fused ops the blocks use
    let (x, w, r) = (randn(&[4, 6], 21), randn(&[5, 6], 22), randn(&[4, 5], 23));
    check_gradients("linear_residual", &[x, w, r], 40, &|t, v| t.linear_residual(v[0], v[1], v[2]));
    let ffn = [randn(&[4, 6], 28), randn(&[4, 5], 29), randn(&[5, 6], 30), randn(&[6, 5], 31), randn(&[4, 6], 32)];
    check_gradients("swiglu_ffn", &ffn, 40, &|t, v| t.swiglu_ffn(v[0], v[1], v[2], v[3], v[4]));
}

#[test]
fn router_logits_scale_and_indexer_rope() {
    check_gradients("router_logits", &[randn(&[4, 6], 24), randn(&[3, 6], 25)], 30, &|t, v| {
        let z = t.router_logits(v[0], v[1])?;
        t.scale(z, 0.5)
    });
    check_gradients("indexer rope", &[randn(&[2, 5, 1, 8], 26)], 40, &|t, v| {
        t.rope(v[0], (2, 5, 1), RopeKind::Indexer)
    });
}

/// The column ops MLA is built of (`autograd::columns`): a slice of the last dim (of a 2-D value
/// and per head of a [n, h, d] value), a head broadcast, a per-head concatenation, a reshape.
#[test]
fn column_ops() {
    check_gradients("slice_cols", &[randn(&[5, 9], 41)], 45, &|t, v| t.slice_cols(v[0], 2, 4));
    check_gradients("slice_cols per head", &[randn(&[4, 3, 6], 42)], 72, &|t, v| t.slice_cols(v[0], 4, 2));
    check_gradients("repeat_heads", &[randn(&[5, 4], 43)], 20, &|t, v| t.repeat_heads(v[0], 3));
    check_gradients("concat_cols per head", &[randn(&[4, 3, 2], 44), randn(&[4, 3, 5], 45)], 60, &|t, v| {
        t.concat_cols(v[0], v[1])
    });
    // a composition: the pieces of one value taken apart and joined in another order
    check_gradients("slice, repeat, concat, reshape", &[randn(&[6, 10], 46)], 60, &|t, v| {
        let x = t.reshape(v[0], &[6, 2, 5])?;
        let (a, b) = (t.slice_cols(x, 0, 3)?, t.slice_cols(x, 3, 2)?);
        let shared = t.slice_cols(v[0], 8, 2)?;
        let shared = t.repeat_heads(shared, 2)?;
        let y = t.concat_cols(b, a)?;
        let y = t.concat_cols(y, shared)?;
        t.reshape(y, &[6, 14])
    });
}

/// Attention whose values are narrower or wider than queries and keys (MLA's d_v ≠ d_qk), dense,
/// window and DSA (dense warm-up and sparse), with one kv head per query head as MLA has.
#[test]
fn attention_with_another_value_width() {
    use nanoseek::backend::{DsaDims, WindowDims};
    for dv in [3, 8, 12] {
        let dims = AttnDims { b: 2, t: 9, h: 2, h_kv: 2, d: 8 };
        let (q, k, v) = (randn(&[2, 9, 2, 8], 51), randn(&[2, 9, 2, 8], 52), randn(&[2, 9, 2, dv], 53));
        let inputs = [q, k, v];
        check_gradients(&format!("attention d_v={dv}"), &inputs, 40, &|t, x| t.attention(x[0], x[1], x[2], dims));
        let wd = WindowDims { b: 2, t: 9, h: 2, h_kv: 2, d: 8, window: 3, n_global: 1 };
        check_gradients(&format!("window attention d_v={dv}"), &inputs, 40, &|t, x| {
            t.window_attention(x[0], x[1], x[2], wd)
        });
        let dd = DsaDims::new(2, 9, 2, 2, 8, 2, 8, 3, 1);
        let index = [randn(&[2, 9, 2, 8], 54), randn(&[2, 9, 1, 8], 55), randn(&[2, 9, 2], 56)];
        for dense in [true, false] {
            // the indexer's inputs are constants here (its selection does not move with q, k, v)
            check_gradients(&format!("dsa attention d_v={dv} dense={dense}"), &inputs, 40, &|t, x| {
                let [qi, ki, wi] = index.clone().map(|i| t.leaf(i));
                Ok(t.dsa_attention((x[0], x[1], x[2]), (qi, ki, wi), dd, dense)?.0)
            });
        }
    }
}
