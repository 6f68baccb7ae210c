//! The CPU kernels on caller-owned f32 slices: the same kernels as the tensor functions of
//! [`crate::kernels`], but every output is a `&mut [f32]` the caller allocated once (nothing is
//! allocated per call) and the backward passes are here too. This is what the criterion benches
//! (`benches/`) and `nanoseek profile` time, so a timing measures the kernel and not an allocator.
//!
//! Layouts are row-major; the shape of every slice is given in its family's doc. Each function
//! checks its slices' lengths against the dimensions it is given and panics on a mismatch
//! (a programming error, as with slice indexing). All math is f32; reductions accumulate in f32
//! unless a doc says otherwise.

/// Dense GEMM. `gemm(m, n, k, a, la, b, lb, c, accumulate)`: C[m, n] = A·B
/// (`accumulate` = false, C overwritten) or C += A·B (true), f32 with f32 accumulation.
/// A is [m, k] (`Layout::N`) or stored transposed [k, m] (`Layout::T`); B is [k, n] (`N`) or
/// [n, k] (`T`, the PyTorch weight layout of x·wᵀ). Parallel over output tiles, the reduction
/// over k sequential within a tile: results do not depend on the thread count.
pub mod gemm {
    /// C[m, n] = A·B or C += A·B (see the module doc for the layouts).
    pub use crate::backend::cpu::gemm::gemm;
    /// How an operand is stored: `N` as written, `T` transposed.
    pub use crate::backend::cpu::gemm::Layout;
}

/// SwiGLU's element-wise half. `swiglu_forward(g, u, y)`: y = silu(g) ⊙ u;
/// `swiglu_backward(g, u, dy, dg, du)`: dg = dy ⊙ u ⊙ silu'(g), du = dy ⊙ silu(g). Every
/// slice has the same length; outputs are overwritten.
pub mod swiglu {
    /// (dg, du) of [`swiglu_forward`] given dy, overwritten.
    pub use crate::backend::cpu::swiglu::swiglu_backward;
    /// y = silu(g) ⊙ u, element-wise (all slices one length).
    pub use crate::backend::cpu::swiglu::swiglu_forward;
}

/// Causal grouped-query attention, scale 1/√d, tiled with an online softmax (no T×T matrix).
/// q, out, dout, dq: [b, t, h, d]; k, v, dk, dv: [b, t, h_kv, d] (h a multiple of h_kv);
/// lse: [b, h, t], each row's natural log-sum-exp of its scaled scores.
/// `attention_forward(dims, q, k, v, out, lse)` overwrites out and lse;
/// `attention_backward(dims, q, k, v, out, lse, dout, dq, dk, dv)` overwrites dq, dk, dv from
/// the forward's out and lse (nothing T×T is saved). Twin of [`crate::kernels::causal_attention`].
pub mod attention {
    /// dq, dk, dv of causal attention (see the module doc).
    pub use crate::backend::cpu::attention::attention_backward;
    /// out and lse of causal attention (see the module doc).
    pub use crate::backend::cpu::attention::attention_forward;
    /// b, t, h, h_kv, d.
    pub use crate::backend::cpu::attention::AttnDims;
    /// The same with values `dv` wide (v [b, t, h_kv, dv], out [b, t, h, dv]; MLA's heads).
    pub use crate::backend::cpu::attention::{attention_backward_dv, attention_forward_dv};
}

/// Sliding-window causal attention with global tokens: as [`attention`], but query `i` sees only
/// the keys `{s : i − window < s ≤ i} ∪ {s < n_global, s ≤ i}` (`window` ≥ 1), and the work is
/// O(t·(window + n_global)). Same slices and argument order as [`attention`], with
/// [`WindowDims`](window_attention::WindowDims). Twin of [`crate::kernels::window_attention()`].
pub mod window_attention {
    /// dq, dk, dv of window attention.
    pub use crate::backend::cpu::window_attention::window_attention_backward;
    /// out and lse of window attention.
    pub use crate::backend::cpu::window_attention::window_attention_forward;
    /// b, t, h, h_kv, d, window, n_global.
    pub use crate::backend::cpu::window_attention::WindowDims;
    /// The same with values `dv` wide.
    pub use crate::backend::cpu::window_attention::{window_attention_backward_dv, window_attention_forward_dv};
}

/// DeepSeek sparse attention. The lightning indexer `indexer_topk(dims, qi, ki, wi, sel)`:
/// qi [b, t, H_I, d_I], ki [b, t, d_I], wi [b, t, H_I] → sel u32 [b, t, kmax],
/// kmax = min(topk + window, t): per query its `window` most recent keys and the `topk` older
/// keys with the largest Σ_j wi_j·relu(qi_j·ki) (ties to the more recent key), ascending, then
/// [`PAD`](dsa::PAD). `dsa_attention_forward(dims, q, k, v, sel, out, lse)` and
/// `dsa_attention_backward(dims, q, k, v, sel, out, lse, dout, dq, dk, dv)`: attention (slices
/// as [`attention`]) of each query over its selected keys only. Twins of
/// [`crate::kernels::dsa_topk`] and [`crate::kernels::sparse_attention`].
pub mod dsa {
    /// dq, dk, dv of sparse attention over `sel`.
    pub use crate::backend::cpu::dsa::dsa_attention_backward;
    /// out and lse of sparse attention over `sel`.
    pub use crate::backend::cpu::dsa::dsa_attention_forward;
    /// sel of the lightning indexer (see the module doc).
    pub use crate::backend::cpu::dsa::indexer_topk;
    /// b, t, h, h_kv, d, n_index_heads (H_I), index_dim (d_I), topk, window; the `*_len`
    /// methods give each slice's length.
    pub use crate::backend::cpu::dsa::DsaDims;
    /// The filler after a query's selected keys in `sel`.
    pub use crate::backend::cpu::dsa::PAD;
    /// The same with values `dv` wide.
    pub use crate::backend::cpu::dsa::{dsa_attention_backward_dv, dsa_attention_forward_dv};
}

/// The routed experts of a mixture-of-experts layer, for n tokens of width C and E experts of
/// hidden width F. `route(logits [n, E], bias [E], cfg)` → [`Routing`](moe::Routing) (scores,
/// chosen experts by score + bias, gates, the expert-contiguous dispatch order with capacity
/// drops in token order). `moe_forward(x [n, C], n, C, routing, w_gate [E, F, C],
/// w_up [E, F, C], w_down [E, C, F], F, out [n, C], cache)`: out = Σ_k gate_k·expert_k(x), each
/// expert a SwiGLU FFN; `cache` (reused across calls) keeps what the backward needs.
/// `moe_backward(dout, n, C, routing, w_gate, w_up, w_down, F, cache, dx, dw_gate, dw_up,
/// dw_down, d_gates [n, K])` overwrites the expert paths' gradients (the router's share of dx is
/// the caller's); `router_backward(routing, d_gates, d_scores_extra, cfg, d_logits [n, E])`
/// gives the router logits' gradient. Twin of [`crate::kernels::moe_route`].
pub mod moe {
    /// (max load / mean load, population std / mean) of per-expert token counts; (0, 0) when
    /// no token was routed. Host arithmetic, no kernel: the metrics log's load balance.
    pub use crate::backend::cpu::moe::load_stats;
    /// The routed experts' backward (expert paths and gate gradients).
    pub use crate::backend::cpu::moe::moe_backward;
    /// The routed experts and their gated combine, forward.
    pub use crate::backend::cpu::moe::moe_forward;
    /// Routing of n tokens from their router logits and the balancing bias.
    pub use crate::backend::cpu::moe::route;
    /// The router logits' gradient from the gate gradients.
    pub use crate::backend::cpu::moe::router_backward;
    /// What [`moe_forward`] keeps for [`moe_backward`]; `MoeCache::default()` to start.
    pub use crate::backend::cpu::moe::MoeCache;
    /// The routing of n tokens (see the module doc).
    pub use crate::backend::cpu::moe::Routing;
    /// The router's settings: experts, top-k, groups, scaling, score function, capacity.
    pub use crate::backend::cpu::moe::{RouterConfig, ScoreFunc};
}
