//! The drop-in kernel API: each kernel family as a function on tensors, no
//! autograd. The functions here run the CPU reference backend on f32 [`Tensor`]s;
//! [`cuda`] has the same functions, under the same names, on bf16 device tensors
//! ([`cuda::DeviceTensor`]), and each of them is tested against its twin here.
//! [`slices`] (CPU, f32 slices) and [`launch`] (CUDA, device buffers) hold the same kernels, and
//! their backward passes, on buffers the caller allocates once: what the benches time.
//! Above this layer nothing names `backend::cpu` or `backend::cuda` (`tests/layering.rs`).
//!
//! Layouts are row-major; "rows" means every dimension but the last.
//!
//! ```
//! use nanoseek::{kernels, Tensor};
//! // [batch, time, heads, head_dim]; 4 query heads share 2 key/value heads (GQA)
//! let q = Tensor::from_vec(&[1, 3, 4, 8], (0..96).map(|i| (i as f32 * 0.1).sin()).collect());
//! let kv = Tensor::from_vec(&[1, 3, 2, 8], (0..48).map(|i| (i as f32 * 0.2).cos()).collect());
//! let (out, lse) = kernels::causal_attention(&q, &kv, &kv);
//! assert_eq!(out.shape, vec![1, 3, 4, 8]);
//! assert_eq!(lse.shape, vec![1, 4, 3]);
//! // the first position can only attend to itself: its output is its own value row
//! assert!((out.data[0] - kv.data[0]).abs() < 1e-6);
//! ```

pub mod checks;
pub mod cuda;
pub mod launch;
pub mod slices;

use crate::backend::cpu::{attention, dsa, embedding, gemm, loss, moe, norm, rope, swiglu, window_attention};
use crate::tensor::Tensor;

pub use crate::backend::cpu::attention::AttnDims;
pub use crate::backend::cpu::dsa::{DsaDims, PAD};
pub use crate::backend::cpu::moe::{RouterConfig, Routing, ScoreFunc};
pub use crate::backend::cpu::rope::RopeTable;
pub use crate::backend::cpu::window_attention::WindowDims;

/// C = A·B for A [m,k] and B [k,n] (f32, fp32 accumulation).
pub fn matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let ((m, k), (k2, n)) = (a.dims2(), b.dims2());
    assert_eq!(k, k2, "matmul: inner dimensions differ ({k} vs {k2})");
    let mut c = Tensor::zeros(&[m, n]);
    gemm::gemm(m, n, k, &a.data, gemm::Layout::N, &b.data, gemm::Layout::N, &mut c.data, false);
    c
}

/// y = x·wᵀ for x [..., k] and w [n, k] (a bias-free linear layer, PyTorch weight layout).
pub fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    let (n, k) = w.dims2();
    assert_eq!(x.shape.last(), Some(&k), "linear: x's last dim must be {k}");
    let m = x.numel() / k;
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = n;
    let mut y = Tensor::zeros(&shape);
    gemm::gemm(m, n, k, &x.data, gemm::Layout::N, &w.data, gemm::Layout::T, &mut y.data, false);
    y
}

/// out = resid + x·wᵀ for x [..., k], w [n, k] and resid shaped like the output [..., n]: a
/// bias-free linear layer and the residual add after it (on CUDA, fused into the GEMM's epilogue).
pub fn linear_residual(x: &Tensor, w: &Tensor, resid: &Tensor) -> Tensor {
    let (m, n, k) = checks::linear_fused("linear_residual", &x.shape, &w.shape, ("resid", &resid.shape))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Tensor::zeros(&resid.shape);
    let epi = gemm::Epilogue::Residual { resid: &resid.data, out: &mut out.data };
    gemm::gemm_fused(m, n, k, &x.data, &w.data, epi);
    out
}

/// silu(gate) ⊙ x·w_upᵀ for x [..., k], w_up [n, k] and gate shaped like the output [..., n]:
/// the up projection of a SwiGLU feed-forward layer with the gate applied to it (on CUDA, fused
/// into the GEMM's epilogue, so x·w_upᵀ is never stored).
pub fn linear_swiglu(x: &Tensor, w_up: &Tensor, gate: &Tensor) -> Tensor {
    let (m, n, k) = checks::linear_fused("linear_swiglu", &x.shape, &w_up.shape, ("gate", &gate.shape))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut act = Tensor::zeros(&gate.shape);
    let epi = gemm::Epilogue::SwiGlu { gate: &gate.data, act: &mut act.data, up: None };
    gemm::gemm_fused(m, n, k, &x.data, &w_up.data, epi);
    act
}

/// Parameter-free RMSNorm over consecutive groups of `dim` values (eps = `norm::RMS_EPS`).
pub fn rmsnorm(x: &Tensor, dim: usize) -> Tensor {
    let mut y = Tensor::zeros(&x.shape);
    let mut rstd = vec![0.0; x.numel() / dim];
    norm::rmsnorm_forward(&x.data, dim, &mut y.data, &mut rstd);
    y
}

/// Affine LayerNorm of each row of x [.., dim]: γ ∘ (x − mean)/sqrt(var + eps) + β with γ, β
/// [dim], the biased variance and eps = `norm::LN_EPS` (DeepSeek-V3.2's indexer key norm).
pub fn layernorm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    let (rows, dim) = checks::layernorm(&x.shape, &gamma.shape, &beta.shape).unwrap_or_else(|e| panic!("{e}"));
    let mut y = Tensor::zeros(&x.shape);
    let mut stats = vec![0.0; 2 * rows];
    norm::layernorm_forward(&x.data, &gamma.data, &beta.data, dim, &mut y.data, &mut stats);
    y
}

/// NeoX half-split rotary embedding of x [b, t, h, head_dim], positions 0..t.
pub fn rope(x: &Tensor, table: &RopeTable) -> Tensor {
    assert_eq!(x.shape.len(), 4, "rope: x must be [b, t, h, head_dim]");
    let mut y = Tensor::zeros(&x.shape);
    rope::rope_forward(table, &x.data, x.shape[0], x.shape[1], x.shape[2], &mut y.data);
    y
}

/// The model's QK-norm fused with RoPE: every head of q_raw [b, t, h, d] and k_raw
/// [b, t, h_kv, d] (d = the table's head_dim) RMS-normalized (parameter-free, eps
/// `norm::RMS_EPS`) and then rotated like [`rope`] → (q, k, rstd_q [b, t, h], rstd_k [b, t, h_kv]),
/// the rstd being each head's 1/sqrt(mean(x²) + eps). Equal to [`rmsnorm`] over groups of d
/// followed by [`rope`] (bitwise, in f32); on CUDA one launch does both.
pub fn rope_qknorm(q_raw: &Tensor, k_raw: &Tensor, table: &RopeTable) -> (Tensor, Tensor, Tensor, Tensor) {
    assert!(q_raw.shape.len() == 4 && k_raw.shape.len() == 4, "rope_qknorm: q_raw and k_raw must be [b, t, h, d]");
    let (b, t, h, h_kv) = (q_raw.shape[0], q_raw.shape[1], q_raw.shape[2], k_raw.shape[2]);
    assert!(k_raw.shape[..2] == [b, t], "rope_qknorm: q_raw and k_raw differ in b or t");
    let (mut q, mut k) = (Tensor::zeros(&q_raw.shape), Tensor::zeros(&k_raw.shape));
    let (mut rq, mut rk) = (Tensor::zeros(&[b, t, h]), Tensor::zeros(&[b, t, h_kv]));
    rope::rope_qknorm_forward(
        table,
        &q_raw.data,
        &k_raw.data,
        (b, t, h, h_kv),
        &mut q.data,
        &mut k.data,
        &mut rq.data,
        &mut rk.data,
    );
    (q, k, rq, rk)
}

/// Causal (GQA) attention: q [b,t,h,d], k [b,t,h_kv,d], v [b,t,h_kv,dv] → (out [b,t,h,dv],
/// lse [b,h,t]); scale 1/√d. dv = d for GQA; MLA's values may be narrower (e.g. d = 192 =
/// d_nope + d_rope, dv = 128). Tiled with an online softmax: no T×T matrix is formed.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
    let dv = value_width("attention", q, k, v);
    let dims = AttnDims { b: q.shape[0], t: q.shape[1], h: q.shape[2], h_kv: k.shape[2], d: q.shape[3] };
    let mut out = Tensor::zeros(&[dims.b, dims.t, dims.h, dv]);
    let mut lse = Tensor::zeros(&[dims.b, dims.h, dims.t]);
    attention::attention_forward_dv(&dims, dv, &q.data, &k.data, &v.data, &mut out.data, &mut lse.data);
    (out, lse)
}

/// The value width dv of 4-D q, k, v with v [b, t, h_kv, dv] beside k [b, t, h_kv, d].
fn value_width(f: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> usize {
    assert!(
        q.shape.len() == 4 && k.shape.len() == 4 && v.shape.len() == 4 && k.shape[..3] == v.shape[..3],
        "{f}: q, k, v must be 4-D, v [b, t, h_kv, dv] beside k [b, t, h_kv, d]"
    );
    v.shape[3]
}

/// silu(g) ∘ u, elementwise.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Tensor {
    assert_eq!(g.shape, u.shape, "swiglu: g and u differ in shape");
    let mut y = Tensor::zeros(&g.shape);
    swiglu::swiglu_forward(&g.data, &u.data, &mut y.data);
    y
}

/// Mean over rows with target ≥ 0 of cross-entropy(cap·tanh(logits/cap), target); cap 0 = no cap.
pub fn softcap_cross_entropy(logits: &Tensor, targets: &[i32], cap: f32) -> f32 {
    let vocab = *logits.shape.last().expect("cross_entropy: logits have no dims");
    let (mut losses, mut lse) = (vec![0.0; targets.len()], vec![0.0; targets.len()]);
    loss::softcap_cross_entropy_forward(&logits.data, vocab, targets, cap, &mut losses, &mut lse);
    let n = targets.iter().filter(|&&t| t >= 0).count().max(1);
    (losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32
}

/// out[i, :] = table[ids[i], :] for table [vocab, dim] → out [ids.len(), dim].
/// Panics if an id is ≥ vocab.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Tensor {
    let (vocab, dim) = table.dims2();
    assert!(ids.iter().all(|&i| (i as usize) < vocab), "embedding: an id is >= vocab = {vocab}");
    let mut out = Tensor::zeros(&[ids.len(), dim]);
    embedding::embedding_forward(&table.data, dim, ids, &mut out.data);
    out
}

/// Sliding-window causal attention with global tokens (GQA): query `i` sees the keys
/// `{s : i − window < s ≤ i} ∪ {s < n_global, s ≤ i}`. Shapes as [`causal_attention`]:
/// q [b,t,h,d], k [b,t,h_kv,d], v [b,t,h_kv,dv] → (out [b,t,h,dv], lse [b,h,t]). `window` ≥ 1.
pub fn window_attention(q: &Tensor, k: &Tensor, v: &Tensor, window: usize, n_global: usize) -> (Tensor, Tensor) {
    let dv = value_width("window_attention", q, k, v);
    let dims =
        WindowDims { b: q.shape[0], t: q.shape[1], h: q.shape[2], h_kv: k.shape[2], d: q.shape[3], window, n_global };
    let mut out = Tensor::zeros(&[dims.b, dims.t, dims.h, dv]);
    let mut lse = Tensor::zeros(&[dims.b, dims.h, dims.t]);
    window_attention::window_attention_forward_dv(&dims, dv, &q.data, &k.data, &v.data, &mut out.data, &mut lse.data);
    (out, lse)
}

/// The keys each query of a DeepSeek sparse attention reads: `sel` holds, per (batch, query `i`),
/// `kmax = min(topk + window, t)` entries: the selected key indices (each ≤ i), then [`PAD`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// `[b, t, kmax]`.
    pub shape: [usize; 3],
    pub sel: Vec<u32>,
    /// Top-k keys chosen by the indexer among those older than the window.
    pub topk: usize,
    /// The most recent `window` keys, always selected.
    pub window: usize,
}

/// The lightning indexer's top-k: qi [b,t,H_I,d_I], ki [b,t,d_I], wi [b,t,H_I] → the
/// [`Selection`] of each query (the `window` most recent keys plus the `topk` older keys
/// with the largest index scores Σ_j wi_j·relu(qi_j·ki); ties go to the more recent key).
pub fn dsa_topk(qi: &Tensor, ki: &Tensor, wi: &Tensor, topk: usize, window: usize) -> Selection {
    assert!(qi.shape.len() == 4, "dsa_topk: qi must be [b, t, n_index_heads, index_dim]");
    let dims = DsaDims {
        b: qi.shape[0],
        t: qi.shape[1],
        h: 0,
        h_kv: 0,
        d: 0,
        n_index_heads: qi.shape[2],
        index_dim: qi.shape[3],
        topk,
        window,
    };
    assert!(ki.shape == [dims.b, dims.t, dims.index_dim], "dsa_topk: ki must be [b, t, index_dim]");
    assert!(wi.shape == [dims.b, dims.t, dims.n_index_heads], "dsa_topk: wi must be [b, t, n_index_heads]");
    let mut sel = vec![0; dims.sel_len()];
    dsa::indexer_topk(&dims, &qi.data, &ki.data, &wi.data, &mut sel);
    Selection { shape: [dims.b, dims.t, dims.kmax()], sel, topk, window }
}

/// Softmax attention of each query over its selected keys only (GQA): q [b,t,h,d], k
/// [b,t,h_kv,d], v [b,t,h_kv,dv], `sel` from [`dsa_topk`] → (out [b,t,h,dv], lse [b,h,t]).
pub fn sparse_attention(q: &Tensor, k: &Tensor, v: &Tensor, sel: &Selection) -> (Tensor, Tensor) {
    let dv = value_width("sparse_attention", q, k, v);
    let dims = DsaDims {
        b: q.shape[0],
        t: q.shape[1],
        h: q.shape[2],
        h_kv: k.shape[2],
        d: q.shape[3],
        n_index_heads: 0,
        index_dim: 0,
        topk: sel.topk,
        window: sel.window,
    };
    assert!(sel.shape == [dims.b, dims.t, dims.kmax()], "sparse_attention: sel must be [b, t, kmax]");
    let mut out = Tensor::zeros(&[dims.b, dims.t, dims.h, dv]);
    let mut lse = Tensor::zeros(&[dims.b, dims.h, dims.t]);
    dsa::dsa_attention_forward_dv(&dims, dv, [&q.data, &k.data, &v.data], &sel.sel, &mut out.data, &mut lse.data);
    (out, lse)
}

/// DeepSeek-V3.2's sparse attention in MQA mode over MLA's latent: every query head reads the
/// same selected rows of one key head kv [b,t,1,d] (`[c_kv | k_pe]`, d = kv_lora_rank + d_rope),
/// whose first `dv` columns (`c_kv`) are the values: q [b,t,h,d] → (out [b,t,h,dv], lse [b,h,t]),
/// scale 1/√d. Equal to [`sparse_attention`] with v = kv[.., ..dv]. CUDA has d = 576, dv = 512
/// (`cuda::sparse_attention_latent`).
pub fn sparse_attention_latent(q: &Tensor, kv: &Tensor, sel: &Selection, dv: usize) -> (Tensor, Tensor) {
    assert!(kv.shape.len() == 4 && kv.shape[2] == 1, "sparse_attention_latent: kv must be [b, t, 1, d]");
    let d = kv.shape[3];
    assert!(dv > 0 && dv <= d, "sparse_attention_latent: dv = {dv} must be in 1..={d}");
    let rows = kv.numel() / d;
    let v: Vec<f32> = (0..rows).flat_map(|r| kv.data[r * d..r * d + dv].iter().copied()).collect();
    let v = Tensor::from_vec(&[kv.shape[0], kv.shape[1], 1, dv], v);
    sparse_attention(q, kv, &v, sel)
}

/// MoE routing of `n` tokens: router logits [n, E] (= x·Rᵀ) and the balancing bias [E] → the
/// chosen experts, gates and the expert-contiguous dispatch order ([`Routing`]).
pub fn moe_route(logits: &Tensor, bias: &Tensor, cfg: &RouterConfig) -> Routing {
    moe::route(&logits.data, &bias.data, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(shape: &[usize], f: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|i| (i as f32 * f).sin()).collect())
    }

    #[test]
    fn window_and_sparse_attention_reduce_to_dense() {
        let (q, k, v) = (wave(&[2, 11, 4, 8], 0.37), wave(&[2, 11, 2, 8], 0.21), wave(&[2, 11, 2, 8], 0.13));
        let (out, lse) = causal_attention(&q, &k, &v);
        let close = |a: &Tensor, b: &Tensor| a.data.iter().zip(&b.data).all(|(x, y)| (x - y).abs() < 1e-5);
        let (wo, wl) = window_attention(&q, &k, &v, 11, 0);
        assert!(close(&wo, &out) && close(&wl, &lse));
        let (qi, ki, wi) = (wave(&[2, 11, 3, 4], 0.5), wave(&[2, 11, 4], 0.3), wave(&[2, 11, 3], 0.7));
        let sel = dsa_topk(&qi, &ki, &wi, 11, 0);
        assert_eq!(sel.shape, [2, 11, 11]);
        let (so, sl) = sparse_attention(&q, &k, &v, &sel);
        assert!(close(&so, &out) && close(&sl, &lse));
        // narrower values (MLA): the output is dv wide and equals the full-width run's columns
        let vw = wave(&[2, 11, 2, 12], 0.13);
        let v5: Vec<f32> = vw.data.chunks(12).flat_map(|r| r[..5].to_vec()).collect();
        let v5 = Tensor::from_vec(&[2, 11, 2, 5], v5);
        let (kw, qw) = (wave(&[2, 11, 2, 12], 0.21), wave(&[2, 11, 4, 12], 0.37));
        let (full, _) = causal_attention(&qw, &kw, &vw);
        let (narrow, _) = causal_attention(&qw, &kw, &v5);
        assert_eq!(narrow.shape, vec![2, 11, 4, 5]);
        let cut: Vec<f32> = full.data.chunks(12).flat_map(|r| r[..5].to_vec()).collect();
        assert!(narrow.data.iter().zip(&cut).all(|(x, y)| (x - y).abs() < 1e-6));
        // MQA over a latent: the values are the key rows' first columns
        let (ql, kvl) = (wave(&[2, 11, 4, 12], 0.3), wave(&[2, 11, 1, 12], 0.11));
        let (lo, ll) = sparse_attention_latent(&ql, &kvl, &sel, 5);
        let vl: Vec<f32> = kvl.data.chunks(12).flat_map(|r| r[..5].to_vec()).collect();
        let (so5, sl5) = sparse_attention(&ql, &kvl, &Tensor::from_vec(&[2, 11, 1, 5], vl), &sel);
        assert!(close(&lo, &so5) && close(&ll, &sl5) && lo.shape == vec![2, 11, 4, 5]);
        // a window of one: each query reads only its own key
        let one = dsa_topk(&qi, &ki, &wi, 0, 1);
        assert_eq!(&one.sel[..3], &[0, 1, 2]);
    }

    #[test]
    fn embedding_picks_rows() {
        let table = wave(&[5, 3], 1.0);
        let out = embedding(&table, &[4, 0]);
        assert_eq!(out.shape, vec![2, 3]);
        assert_eq!(&out.data[..3], &table.data[12..15]);
        assert_eq!(&out.data[3..], &table.data[..3]);
    }
}
