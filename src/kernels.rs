//! The drop-in kernel API: each kernel family as a function on tensors, no
//! autograd. Today every call runs the CPU reference backend; device tensors
//! and the CUDA launches come with the CUDA backend under the same names.
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

use crate::backend::cpu::{attention, gemm, loss, norm, rope, swiglu};
use crate::tensor::Tensor;

pub use crate::backend::cpu::attention::AttnDims;
pub use crate::backend::cpu::rope::RopeTable;

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

/// Parameter-free RMSNorm over consecutive groups of `dim` values (eps = `norm::RMS_EPS`).
pub fn rmsnorm(x: &Tensor, dim: usize) -> Tensor {
    let mut y = Tensor::zeros(&x.shape);
    let mut rstd = vec![0.0; x.numel() / dim];
    norm::rmsnorm_forward(&x.data, dim, &mut y.data, &mut rstd);
    y
}

/// NeoX half-split rotary embedding of x [b, t, h, head_dim], positions 0..t.
pub fn rope(x: &Tensor, table: &RopeTable) -> Tensor {
    assert_eq!(x.shape.len(), 4, "rope: x must be [b, t, h, head_dim]");
    let mut y = Tensor::zeros(&x.shape);
    rope::rope_forward(table, &x.data, x.shape[0], x.shape[1], x.shape[2], &mut y.data);
    y
}

/// Causal (GQA) attention: q [b,t,h,d], k and v [b,t,h_kv,d] → (out [b,t,h,d], lse [b,h,t]).
/// Tiled with an online softmax: no T×T matrix is formed.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
    assert!(
        q.shape.len() == 4 && k.shape.len() == 4 && k.shape == v.shape,
        "attention: q, k, v must be 4-D, k and v alike"
    );
    let dims = AttnDims { b: q.shape[0], t: q.shape[1], h: q.shape[2], h_kv: k.shape[2], d: q.shape[3] };
    let mut out = Tensor::zeros(&q.shape);
    let mut lse = Tensor::zeros(&[dims.b, dims.h, dims.t]);
    attention::attention_forward(&dims, &q.data, &k.data, &v.data, &mut out.data, &mut lse.data);
    (out, lse)
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
