//! The one interface between the autograd tape and the kernels: the coarse, fused ops a
//! training step and a forward pass need, implemented by the CPU kernels
//! (`cpu::ops::CpuOps`, f32 throughout) and by the CUDA kernels (`cuda::ops::CudaOps`: f32 master
//! weights, gradients and optimizer state; bf16 activations and GEMM operands).
//!
//! `F` holds f32 values (master weights, gradients, optimizer state, per-row statistics such as
//! rstd and lse, router logits and gate gradients); `A` holds activations and the GEMM-precision
//! copies of the weights. Shapes follow the CPU twins in `backend::cpu`: activations are
//! row-major `[tokens, features]`, weights `[out, in]`. Every op returns new buffers unless it
//! says it works in place, so the tape decides what lives and what is freed.

use super::LayerCache;
use super::{AbsorbDims, AbsorbSide, AdamWStep, AttnDims, DsaDims, LatentDims, RouterConfig, WindowDims};
use crate::memory::Category;
use anyhow::Result;

/// Which rotary table an op uses: the attention heads' (`head_dim`) or the DSA indexer's
/// (`index_head_dim`). A backend builds both from the model config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    Attention,
    Indexer,
}

pub trait Backend {
    type F;
    type A;
    /// Token ids (and targets) where the kernels read them.
    type Ids;
    type Tgt;
    /// A MoE layer's routing (`cpu::moe::Routing` or its device twin) and what the experts'
    /// backward needs from their forward.
    type Routing;
    type MoeCache;
    /// A DSA layer's top-k selection `[b, t, kmax]`.
    type Sel;

    /// Whether the tape reports its buffers to `crate::memory` (host memory). A device backend
    /// counts its own allocations (`memory_scope`) instead.
    const HOST_MEMORY: bool;

    /// Device memory allocated until the returned guard drops is counted under `cat` (the CUDA
    /// allocator's accounting); a no-op where memory is not tracked per allocation.
    fn memory_scope(&self, _cat: Category) -> Box<dyn std::any::Any> {
        Box::new(())
    }
    /// Counts `bufs` (allocated earlier) under `cat` until the guard drops: host memory for the
    /// CPU, the device allocator's category for CUDA.
    fn account(&self, bufs: &[&Self::F], cat: Category) -> Box<dyn std::any::Any>;

    /// The device's name for reports (None on the host).
    fn device_name(&self) -> Option<String> {
        None
    }
    /// Restarts the device allocator's peak window (a no-op on the host: `memory::reset_peak`).
    fn reset_peak(&self) {}
    /// The device allocator's peak bytes since `reset_peak` and the bytes per category at that
    /// peak (`memory::CATEGORIES` order); None on the host, where `crate::memory` reports.
    fn device_peak(&self) -> Option<(usize, [usize; 5])> {
        None
    }
    /// Before training: attributes the resident buffers (master weights, their copies: parameters)
    /// and checks that `predicted` bytes fit the device; the host checks with `memory::check_fits`.
    fn prepare_training(&self, _predicted: usize, _what: &str) -> Result<()> {
        Ok(())
    }

    fn f_from(&self, v: &[f32]) -> Result<Self::F>;
    /// [`Backend::f_from`] taking ownership (the CPU keeps the vector).
    fn f_from_vec(&self, v: Vec<f32>) -> Result<Self::F> {
        self.f_from(&v)
    }
    fn f_zeros(&self, n: usize) -> Result<Self::F>;
    fn f_to_host(&self, x: &Self::F) -> Result<Vec<f32>>;
    /// [`Backend::f_to_host`] consuming the buffer (the CPU hands the vector back).
    fn f_into_host(&self, x: Self::F) -> Result<Vec<f32>> {
        self.f_to_host(&x)
    }
    fn f_fill_zero(&self, x: &mut Self::F) -> Result<()>;
    fn f_len(&self, x: &Self::F) -> usize;
    /// x ← s·x.
    fn f_scale(&self, x: &mut Self::F, s: f32) -> Result<()>;
    /// acc += x (an activation-precision gradient into an f32 one).
    fn f_accumulate(&self, acc: &mut Self::F, x: &Self::A) -> Result<()>;
    fn a_from(&self, v: &[f32]) -> Result<Self::A>;
    fn a_to_host(&self, x: &Self::A) -> Result<Vec<f32>>;
    fn a_zeros(&self, n: usize) -> Result<Self::A>;
    fn a_copy(&self, x: &Self::A) -> Result<Self::A>;
    fn a_len(&self, x: &Self::A) -> usize;
    /// The master weights themselves when they already have the GEMM precision (the CPU), so no
    /// copy is kept; None where a copy is needed (CUDA's bf16).
    fn f_as_a<'a>(&self, _x: &'a Self::F) -> Option<&'a Self::A> {
        None
    }
    /// The other direction of [`Backend::f_as_a`] (an activation read as f32 values).
    fn a_as_f<'a>(&self, _x: &'a Self::A) -> Option<&'a Self::F> {
        None
    }
    fn ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    fn targets(&self, t: &[i32]) -> Result<Self::Tgt>;
    /// out = the activation-precision copy of w (a bf16 cast on CUDA).
    fn cast(&self, w: &Self::F, out: &mut Self::A) -> Result<()>;

    /// y[m,n] = x[m,k]·w[n,k]ᵀ.
    fn linear(&self, x: &Self::A, w: &Self::A, m: usize, k: usize, n: usize) -> Result<Self::A>;
    /// resid[m,n] + x[m,k]·w[n,k]ᵀ (the residual add after c_proj and w_down), a new buffer.
    fn linear_residual(
        &self,
        x: &Self::A,
        w: &Self::A,
        dims: (usize, usize, usize),
        resid: &Self::A,
    ) -> Result<Self::A>;
    /// (u, swiglu(gate, u)) for u = x[m,k]·w[n,k]ᵀ: the up projection of a feed-forward layer with
    /// the SwiGLU fused into its epilogue (new buffers; the backward needs both).
    fn linear_swiglu(
        &self,
        x: &Self::A,
        w: &Self::A,
        dims: (usize, usize, usize),
        gate: &Self::A,
    ) -> Result<(Self::A, Self::A)>;
    /// dx[m,k] = dy[m,n]·w[n,k] (or dx += … when `accumulate`).
    fn linear_dx(
        &self,
        dy: &Self::A,
        w: &Self::A,
        dims: (usize, usize, usize),
        dx: &mut Self::A,
        accumulate: bool,
    ) -> Result<()>;
    /// (dg, du) of a = swiglu(g, u) given da = dy[m,n]·w[n,k] (the down projection's `linear_dx`,
    /// dims as there), with the SwiGLU backward fused into that GEMM's epilogue (da is not kept).
    fn linear_dx_swiglu(
        &self,
        dy: &Self::A,
        w: &Self::A,
        dims: (usize, usize, usize),
        gu: (&Self::A, &Self::A),
    ) -> Result<(Self::A, Self::A)>;
    /// dw[n,k] += dy[m,n]ᵀ·x[m,k] (f32 accumulation over micro-batches).
    fn linear_dw(&self, dy: &Self::A, x: &Self::A, dims: (usize, usize, usize), dw: &mut Self::F) -> Result<()>;

    /// Rows of the f32 table (`[vocab, dim]`) for each id, in activation precision.
    fn embedding(&self, table: &Self::F, dim: usize, ids: &Self::Ids, n: usize) -> Result<Self::A>;
    /// dtable[ids[i]] += dout[i].
    fn embedding_backward(&self, dout: &Self::A, dim: usize, ids: &Self::Ids, dtable: &mut Self::F) -> Result<()>;
    /// Parameter-free RMSNorm over groups of `dim`: (y, rstd).
    fn rmsnorm(&self, x: &Self::A, dim: usize) -> Result<(Self::A, Self::F)>;
    fn rmsnorm_backward(&self, x: &Self::A, rstd: &Self::F, dy: &Self::A, dim: usize) -> Result<Self::A>;
    /// Affine LayerNorm over groups of `dim` (γ, β: [dim], eps `cpu::norm::LN_EPS`): (y, stats),
    /// stats = (mean, 1/std) per row in f32 for the backward.
    fn layernorm(&self, x: &Self::A, gamma: &Self::A, beta: &Self::A, dim: usize) -> Result<(Self::A, Self::F)>;
    /// Its backward: (dx, dγ, dβ).
    fn layernorm_backward(
        &self,
        x: &Self::A,
        stats: &Self::F,
        gamma: &Self::A,
        dy: &Self::A,
        dim: usize,
    ) -> Result<(Self::A, Self::A, Self::A)>;
    /// Rotary embedding of x viewed as [b, t, h, d] with the `kind` table (d its head dim);
    /// `inverse` rotates back (the backward).
    fn rope(&self, x: &Self::A, bth: (usize, usize, usize), kind: RopeKind, inverse: bool) -> Result<Self::A>;
    /// QK-norm fused with RoPE on one of q or k, x [b, t, h, head_dim]: every head
    /// RMS-normalized (parameter-free) and rotated with the attention table → (y, rstd [b·t·h]);
    /// bitwise `rmsnorm` over groups of head_dim, then `rope`, on the CPU.
    fn qk_norm_rope(&self, x: &Self::A, bth: (usize, usize, usize)) -> Result<(Self::A, Self::F)>;
    /// Its backward: dx from the raw input, its rstd and dy (the gradient of the rotated output).
    fn qk_norm_rope_backward(
        &self,
        x: &Self::A,
        rstd: &Self::F,
        dy: &Self::A,
        bth: (usize, usize, usize),
    ) -> Result<Self::A>;
    /// silu(g) ∘ u.
    fn swiglu(&self, g: &Self::A, u: &Self::A) -> Result<Self::A>;
    /// (dg, du).
    fn swiglu_backward(&self, g: &Self::A, u: &Self::A, dy: &Self::A) -> Result<(Self::A, Self::A)>;
    /// Causal attention: (out, lse). The attention ops take the value width `dv` beside the dims
    /// (q, k `[.., h·d]`; v `[.., h_kv·dv]`, out `[.., h·dv]`): `dv = d` for GQA, MLA's
    /// `v_head_dim` with `d = qk_nope_head_dim + qk_rope_head_dim`.
    fn attention(
        &self,
        dims: &AttnDims,
        dv: usize,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
    ) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dims: &AttnDims,
        dv: usize,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
        out: &Self::A,
        lse: &Self::F,
        dout: &Self::A,
    ) -> Result<(Self::A, Self::A, Self::A)>;
    /// Sliding-window + global attention (`W` layers): (out, lse).
    fn window_attention(
        &self,
        dims: &WindowDims,
        dv: usize,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
    ) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv) of [`Backend::window_attention`].
    #[allow(clippy::too_many_arguments)]
    fn window_attention_backward(
        &self,
        dims: &WindowDims,
        dv: usize,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
        out: &Self::A,
        lse: &Self::F,
        dout: &Self::A,
    ) -> Result<(Self::A, Self::A, Self::A)>;

    /// Router logits in f32: x[n,c]·w[e,c]ᵀ.
    fn router_logits(&self, x: &Self::A, w: &Self::A, n: usize, c: usize, e: usize) -> Result<Self::F>;
    /// `cpu::moe::route` of the logits with the layer's selection bias (host, `[E]`).
    fn route(&self, logits: &Self::F, bias: &[f32], cfg: &RouterConfig) -> Result<Self::Routing>;
    /// Kept assignments per expert and the number dropped by the capacity limit, on the host.
    fn routing_counts(&self, r: &Self::Routing) -> Result<(Vec<usize>, usize)>;
    /// The sequence-wise balance loss (`cpu::moe::balance_loss`) and seed·∂loss/∂scores `[n, E]`.
    fn balance_loss(
        &self,
        r: &Self::Routing,
        n_seqs: usize,
        seq_len: usize,
        cfg: &RouterConfig,
        alpha: f32,
        seed: f32,
    ) -> Result<(f32, Self::F)>;
    /// The routed experts and their weighted combine, `[n, c]` (`cpu::moe::moe_forward`).
    fn moe_forward(
        &self,
        x: &Self::A,
        ncf: (usize, usize, usize),
        r: &Self::Routing,
        w: [&Self::A; 3],
    ) -> Result<(Self::A, Self::MoeCache)>;
    /// Bytes the experts' cache holds (reported as activations).
    fn moe_cache_bytes(&self, cache: &Self::MoeCache) -> usize;
    /// Backward of [`Backend::moe_forward`] (routing fixed): returns (dx, d_gates `[n, K]` f32)
    /// and adds the expert stacks' gradients into `dw` (w_gate, w_up, w_down).
    #[allow(clippy::too_many_arguments)]
    fn moe_backward(
        &self,
        dout: &Self::A,
        ncf: (usize, usize, usize),
        r: &Self::Routing,
        w: [&Self::A; 3],
        cache: &Self::MoeCache,
        dw: [&mut Self::F; 3],
    ) -> Result<(Self::A, Self::F)>;
    /// ∂/∂logits `[n, E]` (activation precision, for the router's GEMMs) from the gate gradients
    /// (None: zero) and the optional extra score gradients (`cpu::moe::router_backward`).
    fn router_backward(
        &self,
        r: &Self::Routing,
        d_gates: Option<&Self::F>,
        d_scores: Option<&Self::F>,
        cfg: &RouterConfig,
    ) -> Result<Self::A>;

    /// x ← s·x.
    fn scale(&self, x: &mut Self::A, s: f32) -> Result<()>;
    /// `cpu::dsa::indexer_topk`.
    fn indexer_topk(&self, dims: &DsaDims, qi: &Self::A, ki: &Self::A, wi: &Self::A) -> Result<Self::Sel>;
    /// Attention over the selected keys: (out, lse).
    fn dsa_attention(
        &self,
        dims: &DsaDims,
        dv: usize,
        qkv: (&Self::A, &Self::A, &Self::A),
        sel: &Self::Sel,
    ) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv) of [`Backend::dsa_attention`].
    #[allow(clippy::too_many_arguments)]
    fn dsa_attention_backward(
        &self,
        dims: &DsaDims,
        dv: usize,
        qkv: (&Self::A, &Self::A, &Self::A),
        sel: &Self::Sel,
        out: &Self::A,
        lse: &Self::F,
        dout: &Self::A,
    ) -> Result<(Self::A, Self::A, Self::A)>;
    /// The indexer's KL loss against the attention (`lse` over `sel`, or dense causal when None)
    /// and its gradients (dqi, dki, dwi) for a unit loss gradient (`cpu::dsa::indexer_kl`).
    #[allow(clippy::type_complexity)]
    fn indexer_kl(
        &self,
        dims: &DsaDims,
        q: &Self::A,
        k: &Self::A,
        lse: &Self::F,
        index: (&Self::A, &Self::A, &Self::A),
        sel: Option<&Self::Sel>,
    ) -> Result<(f32, Self::A, Self::A, Self::A)>;

    // Inference with a key/value cache (`cpu::decode`): one sequence whose new rows are positions
    // `cache.len()..`; forward only. The cache lives in host memory.

    /// [`Backend::rope`] of x `[n, h, d]` (`nh` = (n, h)) whose row `i` is position `p0 + i` (any
    /// position: the angles are computed as the table's, so they equal it below `max_seq_len`).
    fn rope_at(&self, x: &Self::A, nh: (usize, usize), p0: usize, kind: RopeKind) -> Result<Self::A>;
    /// Dense or window attention (the cache's kind) of the `dims.t` new rows over the cached and
    /// new keys; appends k and v to the cache.
    fn attention_cached(
        &self,
        dims: &AttnDims,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
        cache: &mut LayerCache,
    ) -> Result<Self::A>;
    /// DSA attention of the new rows: each query's top-k by the indexer over the cached and new
    /// indexer keys plus the local window (every earlier key when `dense`); appends k, v and ki.
    fn dsa_attention_cached(
        &self,
        dims: &DsaDims,
        qkv: (&Self::A, &Self::A, &Self::A),
        index: (&Self::A, &Self::A, &Self::A),
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Self::A>;
    /// MLA decoding (`cpu::mla_decode`): an up-projection of `wkv_b` absorbed into the query
    /// (`W_UK_hᵀ q_nope_h`) or the output (`W_UV_h o_lat_h`), per head.
    fn mla_absorb(&self, dims: &AbsorbDims, side: AbsorbSide, x: &Self::A, wkv_b: &Self::A) -> Result<Self::A>;
    /// MLA decoding: attention of the new rows' absorbed queries over a latent cache and the new
    /// latent rows `kv`, in the cache kind's key set (a DSA layer: `index` = the indexer's shapes
    /// and qi, ki, wi; every earlier key when `dense`); appends kv (and ki). Returns `o_lat`.
    #[allow(clippy::type_complexity)]
    fn latent_attention_cached(
        &self,
        dims: &LatentDims,
        q: &Self::A,
        kv: &Self::A,
        index: Option<(&DsaDims, (&Self::A, &Self::A, &Self::A))>,
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Self::A>;

    /// acc += x.
    fn add(&self, acc: &mut Self::A, x: &Self::A) -> Result<()>;
    /// `dst[r, dst_off + c] = src[r, src_off + c]` for `rows × width` values of row-major
    /// matrices `src [rows, src_cols]` and `dst [rows, dst_cols]` (column concatenation and split).
    fn copy_cols(
        &self,
        src: &Self::A,
        src_cols_off: (usize, usize),
        dst: &mut Self::A,
        dst_cols_off: (usize, usize),
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// Softcapped cross-entropy: (Σ of the per-row losses over rows that count, in f64, and the
    /// per-row lse).
    fn cross_entropy(&self, logits: &Self::A, vocab: usize, tgt: &Self::Tgt, cap: f32) -> Result<(f64, Self::F)>;
    /// dlogits = scale · ∂loss/∂logits.
    fn cross_entropy_backward(
        &self,
        logits: &Self::A,
        vocab: usize,
        tgt: &Self::Tgt,
        cap: f32,
        lse: &Self::F,
        scale: f32,
    ) -> Result<Self::A>;

    /// Scales the gradients so their global norm is at most `max_norm` (0 = off); returns the
    /// norm before clipping (`optim::clip_grad_norm`).
    fn clip_grad_norm(&self, grads: &mut [Self::F], max_norm: f32) -> Result<f32>;
    /// Σx² of one gradient in f64, as the CPU's `clip_grad_norm` sums each parameter (a
    /// data-parallel rank's share of the global norm); by default through the host.
    fn f_sum_sq(&self, x: &Self::F) -> Result<f64> {
        Ok(super::cpu::elementwise::sum_sq(&self.f_to_host(x)?))
    }
    /// AdamW on p (and its copy `pa`, when kept), `cpu::optim::adamw_update`.
    fn adamw(
        &self,
        p: &mut Self::F,
        pa: Option<&mut Self::A>,
        g: &Self::F,
        m: &mut Self::F,
        v: &mut Self::F,
        h: AdamWStep,
    ) -> Result<()>;
    /// Nesterov momentum in lerp form: buf ← μ·buf + (1−μ)·g; returns u = (1−μ)·g + μ·buf.
    fn muon_momentum(&self, buf: &mut Self::F, g: &Self::F, mu: f32) -> Result<Self::F>;
    /// ≈ U·Vᵀ of u [rows, cols] (`cpu::optim::newton_schulz`; GEMMs on CUDA).
    fn newton_schulz(&self, u: &Self::F, rows: usize, cols: usize, steps: usize) -> Result<Self::A>;
    /// [`Backend::newton_schulz`] of each of the `n_mat` consecutive [rows, cols] matrices of u
    /// (an expert stack, orthogonalized one expert matrix at a time).
    fn newton_schulz_stack(&self, u: &Self::F, n_mat: usize, rows: usize, cols: usize, steps: usize)
        -> Result<Self::A>;
    /// w ← w·decay − lr·o, and its copy `wa` when kept.
    fn muon_apply(&self, w: &mut Self::F, wa: Option<&mut Self::A>, o: &Self::A, decay: f32, lr: f32) -> Result<()>;
    /// Runs `update` on every slot (the optimizer's per-parameter updates). Slots are
    /// independent, so a backend may run them in parallel (the CPU does, one task per
    /// parameter); the result must not depend on the order.
    fn for_each_update(
        &self,
        slots: Vec<UpdateSlot<'_, Self>>,
        update: &(dyn Fn(&Self, UpdateSlot<'_, Self>) -> Result<()> + Sync),
    ) -> Result<()>
    where
        Self: Sized,
    {
        slots.into_iter().try_for_each(|s| update(self, s))
    }
}

/// Optimizer state of one parameter on a backend (`optim::ParamState` on the host).
#[derive(Clone, Debug, PartialEq)]
pub enum StateBuf<F> {
    AdamW { m: F, v: F },
    Muon { momentum: F },
}

/// One parameter's optimizer update: its index (`Model::params` order), master weights, their
/// GEMM-precision copy (when kept), gradient and state.
pub struct UpdateSlot<'a, B: Backend> {
    pub index: usize,
    pub p: &'a mut B::F,
    pub copy: Option<&'a mut B::A>,
    pub g: &'a B::F,
    pub state: &'a mut StateBuf<B::F>,
}
