//! The CUDA kernels as launches on caller-owned device buffers: the same kernels as the tensor
//! functions of [`super::cuda`], but every output is a [`DeviceBuffer`] the caller allocated once
//! (no allocation and no host sync per call, except where a doc says so), the backward passes
//! are here too, and the GEMM engines can be named per call. This is what `nanoseek bench` times
//! (so a timing is the kernel's, not the allocator's), grouped by kernel family.
//!
//! Buffers are flat and row-major; each family's doc gives the shapes. Activations are bf16,
//! gradients of attention and the MoE are f32, statistics (lse, rstd, router logits, losses)
//! f32. Every call checks its buffers' lengths and the dimensions the kernels support and
//! returns a [`CudaError`] (never a panic) for a mismatch or a failed launch. Work is queued on
//! the backend's stream, in order; [`CudaBackend::synchronize`] waits for it.

/// The element types a [`DeviceBuffer`] holds (bf16, f32, u32, i32).
pub use crate::backend::cuda::memory::DeviceElem;
/// A CUDA device (context, stream, kernels and memory accounting); `CudaBackend::new(ordinal)`
/// is an error, not a panic, without a device.
pub use crate::backend::cuda::CudaBackend;
/// A device allocation of `len` elements (`zeros`, `uninit`, `from_host`, `to_host`).
pub use crate::backend::cuda::DeviceBuffer;
/// A failed CUDA call or a rejected argument, with its message.
pub use crate::backend::cuda::{CudaError, CudaResult};

/// dst = src, device to device: `cuMemcpyDtoDAsync` of `src.bytes()` bytes on the legacy default
/// stream (which every launch is ordered on), asynchronous. Both buffers must hold the same
/// number of elements. `nanoseek bench` times it as the copy-bandwidth ceiling.
pub fn copy<T: DeviceElem>(src: &DeviceBuffer<T>, dst: &DeviceBuffer<T>) -> CudaResult<()> {
    if src.len() != dst.len() {
        return Err(CudaError(format!("copy: src holds {} elements, dst {}", src.len(), dst.len())));
    }
    let stream = std::ptr::null_mut();
    // SAFETY: both allocations hold src.bytes() bytes. The copy is queued on the stream every
    // launch and copy of the backend uses, so it runs after the earlier work and before the later
    // work, and a block freed meanwhile is only reused by later work on that same stream (the
    // backend's caching allocator).
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst.ptr(), src.ptr(), src.bytes(), stream) }
        .map_err(|e| CudaError(format!("cuMemcpyDtoD: {e:?}")))
}

/// Dense bf16 GEMM with f32 accumulation: C[m, n] = α·A·B + β·C (β = 0 never reads C), C bf16 or
/// f32. A is [m, k] (`Layout::N`) or stored transposed [k, m] (`T`); B is [k, n] (`N`) or
/// [n, k] (`T`, the weight layout of x·wᵀ); `*_batched` runs `batch` independent products over
/// consecutive matrices. The contiguous dimension of each stored operand must be a multiple of 8
/// (k always, m when A is T, n when B is N). Engines ([`GemmEngine`](gemm::GemmEngine)): `gemm`
/// runs the one [`set_gemm_engine`](gemm::set_gemm_engine) selected for the process (the
/// trainer's `--gemm`); `native_gemm_batched` (the handwritten `cuda/gemm.cu`),
/// `wgmma_gemm_batched` (its sm_90a kernels, compute capability 9.0 only, small shapes falling
/// back to native) and [`cublaslt::gemm`] name theirs. Fused epilogues: `gemm_fused_on(be,
/// engine, m, n, k, x [m, k], w [n, k], epi)` is x·wᵀ finished in the kernel by an
/// [`Epilogue`](gemm::Epilogue): `Residual` (out = v + resid) or `SwiGlu` (act = silu(gate) ⊙ v,
/// v also stored to `up` when given); `gemm_swiglu_backward_on(be, engine, m, n, k, dy [m, k],
/// w [k, n], (gate, up), (dgate, dup))` fuses SwiGLU's backward into da = dy·w (da never stored).
/// cuBLASLt has no such epilogues: it runs the product, then one element-wise kernel.
pub mod gemm {
    /// The product on the selected engine.
    pub use crate::backend::cuda::gemm::gemm;
    /// What the fused GEMM does with each product value before it is stored (module doc).
    pub use crate::backend::cuda::gemm::Epilogue;
    /// native, cublaslt or wgmma (`"native".parse()`; `name()` for the reverse).
    pub use crate::backend::cuda::gemm::GemmEngine;
    /// How an operand is stored: `N` as written, `T` transposed.
    pub use crate::backend::cuda::gemm::Layout;
    /// The engine of every later engine-selected GEMM in the process; selecting cuBLASLt is an
    /// error (the engine unchanged) when its library cannot be loaded.
    pub use crate::backend::cuda::gemm::{gemm_engine, set_gemm_engine};
    /// The fused epilogues on a named engine.
    pub use crate::backend::cuda::gemm::{gemm_fused_on, gemm_swiglu_backward_on};
    /// The product on a named kernel, whatever the engine switch says.
    pub use crate::backend::cuda::gemm::{native_gemm_batched, wgmma_gemm_batched};
}

/// The cuBLASLt engine, loaded at run time: `available()` says whether `libcublasLt` loads (or
/// why not); `gemm(be, m, n, k, a, la, b, lb, c, α, β)` has the contract of [`gemm`]'s product.
pub mod cublaslt {
    pub use crate::backend::cuda::cublaslt::{available, gemm};
}

/// Element-wise kernels, f32 arithmetic on buffers of one length: `add(be, a, b, out)`:
/// out = a + b (bf16, the residual add; `out` may be `a` or `b`); `cast_f32_bf16(be, x, out)`:
/// out = bf16(x), round to nearest even.
pub mod elementwise {
    pub use crate::backend::cuda::elementwise::add;
    pub use crate::backend::cuda::optim::cast_f32_bf16;
}

/// SwiGLU's element-wise half on bf16 buffers of one length: `swiglu_forward(be, g, u, y)`:
/// y = silu(g) ⊙ u; `swiglu_backward(be, g, u, dy, dg, du)`: dg = dy ⊙ u ⊙ silu'(g),
/// du = dy ⊙ silu(g). One launch each, f32 math, one rounding per output.
pub mod swiglu {
    pub use crate::backend::cuda::swiglu::{swiglu_backward, swiglu_forward};
}

/// Rotary embedding (NeoX half-split, positions 0..t) with an f32 cos/sin table
/// ([`RopeTableGpu`](rope::RopeTableGpu)`::new(be, head_dim, max_t, base)`, head_dim a multiple
/// of 16). `rope_inplace(be, table, q [b, t, h, d], k [b, t, h_kv, d], (b, t, h, h_kv),
/// inverse)` rotates q and k in one launch (`inverse` = the backward). QK-norm fused with RoPE,
/// one launch per direction: `rope_qknorm_forward(be, table, q_raw, k_raw, dims, q, k, rstd_q
/// [b·t·h], rstd_k [b·t·h_kv])` RMS-normalizes every head (no weight, f32) and rotates it;
/// `rope_qknorm_backward(be, table, q_raw, k_raw, rstd_q, rstd_k, dq, dk, dims, dq_raw, dk_raw)`
/// is its backward. Twins of [`super::cuda::rope_qk`] and [`super::cuda::rope_qknorm`].
pub mod rope {
    pub use crate::backend::cuda::rope::RopeTableGpu;
    pub use crate::backend::cuda::rope::{rope_inplace, rope_qknorm_backward, rope_qknorm_forward};
}

/// Parameter-free RMSNorm: `rmsnorm_forward(be, x [rows, dim] bf16, dim, y bf16, rstd [rows]
/// f32)` (rstd = 1/rms, kept for the backward); dim a multiple of 8. Twin of
/// [`super::cuda::rmsnorm`]. Affine LayerNorm: `layernorm_forward(be, x, (gamma, beta), dim, y,
/// stats [2·rows] f32)` and `layernorm_backward`; twins of [`super::cuda::layernorm`].
pub mod norm {
    pub use crate::backend::cuda::norm::{layernorm_backward, layernorm_forward, rmsnorm_forward};
}

/// Softcap cross-entropy: `softcap_cross_entropy_forward(be, logits [rows, vocab] bf16, vocab,
/// targets [rows] i32 (< 0 ignored), cap, losses [rows] f32, lse [rows] f32)`: each row's loss
/// in nats of cap·tanh(logits/cap) (cap 0 = none), one kernel per row streaming the vocabulary.
/// Twin of [`super::cuda::softcap_cross_entropy`] (which also averages the losses).
pub mod loss {
    pub use crate::backend::cuda::loss::softcap_cross_entropy_forward;
}

/// Causal grouped-query flash attention, scale 1/√d, d ∈ {64, 128}: q, out, dout bf16
/// [b, t, h, d]; k, v bf16 [b, t, h_kv, d]; lse f32 [b, h, t]. The `_dv` forms take values
/// `dv` wide (v [b, t, h_kv, dv], out and dout [b, t, h, dv]), (d, dv) ∈ `FLASH_SHAPES`:
/// MLA's (96, 64) and (192, 128) besides (64, 64) and (128, 128). `attention_forward(be, dims, q,
/// k, v, out, lse)`; `attention_backward(be, dims, q, k, v, out, lse, dout, [dq, dk, dv])`
/// overwrites the f32 gradients from the forward's out and lse (nothing T×T stored). Twin of
/// [`super::cuda::causal_attention`].
pub mod attention {
    pub use crate::backend::cuda::attention::AttnDims;
    pub use crate::backend::cuda::attention::{
        attention_backward, attention_backward_dv, attention_forward, attention_forward_dv, FLASH_SHAPES,
    };
}

/// Sliding-window attention with global tokens: as [`attention`] (same buffers and argument
/// order, with [`WindowDims`](window_attention::WindowDims)), query `i` seeing only the keys
/// `{s : i − window < s ≤ i} ∪ {s < n_global, s ≤ i}`; only the key tiles holding such keys are
/// visited. Twin of [`super::cuda::window_attention`].
pub mod window_attention {
    pub use crate::backend::cuda::window_attention::WindowDims;
    pub use crate::backend::cuda::window_attention::{
        window_attention_backward, window_attention_backward_dv, window_attention_forward, window_attention_forward_dv,
    };
}

/// DeepSeek sparse attention ([`DsaDims`](dsa::DsaDims); its `*_len` methods give every
/// buffer's length). `indexer_topk(be, dims, qi, ki, wi, sel)`: the lightning indexer's exact
/// top-k into sel u32 [b, t, kmax] (allocates an f32 score workspace of at most 256 MiB).
/// `dsa_attention_forward(be, dims, q, k, v, sel, out, lse)` and `dsa_attention_backward(be,
/// dims, q, k, v, sel, out, lse, dout, [dq, dk, dv])`: attention over the selected keys only
/// (buffers as [`attention`]; dk, dv scatter-added with atomics). `indexer_kl(be, dims, q, k, lse,
/// qi, ki, wi, Some(sel), [dqi, dki, dwi], loss)`: the indexer's KL distillation loss (a device
/// f32 scalar) and its f32 gradients. The `_dv` attention forms take values `dv` wide ((d, dv) ∈
/// `DSA_SHAPES`); `dsa_attention_latent_{forward,backward}` are V3.2's MQA over MLA's latent
/// (`LATENT_SHAPE`: q [b, t, h, 576], one key head kv [b, t, 1, 576] whose first 512 columns are
/// the values, out [b, t, h, 512]; the backward returns dq and d(kv)). Twins of
/// [`super::cuda::dsa_topk`], [`super::cuda::sparse_attention`] and
/// [`super::cuda::sparse_attention_latent`].
pub mod dsa {
    pub use crate::backend::cuda::dsa::DsaDims;
    pub use crate::backend::cuda::dsa::{
        dsa_attention_backward, dsa_attention_backward_dv, dsa_attention_forward, dsa_attention_forward_dv,
        dsa_attention_latent_backward, dsa_attention_latent_forward, indexer_kl, indexer_topk, DSA_SHAPES,
        LATENT_SHAPE,
    };
}

/// The routed experts of a mixture-of-experts layer (n tokens of width C, E experts of hidden
/// width F, top-K). `route(be, logits [n, E] f32, bias [E] f32, cfg)` → a
/// [`DeviceRouting`](moe::DeviceRouting) bit for bit the CPU's. `moe_forward(be, x [n, C] bf16,
/// n, C, routing, w_gate [E, F, C], w_up [E, F, C], w_down [E, C, F], F, out [n, C] bf16)` →
/// the [`MoeCacheGpu`](moe::MoeCacheGpu) its backward needs (gather, grouped GEMMs, SwiGLU,
/// combine). `moe_backward(be, dout, n, C, routing, w_gate, w_up, w_down, F, cache, dx [n, C]
/// f32, [dw_gate, dw_up, dw_down] f32, d_gates [n, K] f32)` overwrites the expert paths'
/// gradients; `router_backward(be, routing, d_gates, d_scores_extra, cfg, d_logits [n, E] f32)`
/// the router logits'. Twin of [`super::cuda::moe_route`].
pub mod moe {
    pub use crate::backend::cuda::moe::{moe_backward, moe_forward, route, router_backward};
    pub use crate::backend::cuda::moe::{DeviceRouting, MoeCacheGpu, RouterConfig, ScoreFunc};
}
