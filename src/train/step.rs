//! The training step of a model as an explicit sequence of coarse ops, over a backend
//! trait ([`StepOps`]), so the same orchestration runs on the CPU (f32, `step_cpu`) and on CUDA
//! (f32 master weights, gradients and optimizer state; bf16 activations and GEMM operands;
//! `step_cuda`).
//!
//! It is the math of `nn::model` (forward and, written out by hand, its backward) and of
//! `optim::Optimizer::update` (Muon for the block matrices with the tall-matrix lr factor,
//! AdamW with the (n_embd/768)^-½ lr scale for wte and lm_head), nothing more: the forward keeps
//! what the backward needs per layer (`Saved`), the backward walks the layers in reverse and
//! accumulates the weight gradients (dW += dYᵀX) into f32 buffers over the micro-batches.
//! `tests/explicit_step.rs` proves the CPU version equal to the tape and to the optimizer.
//!
//! Every layer kind runs: dense (`D`), sliding-window + global (`W`) and DSA (`S`, with its
//! lightning indexer and KL loss, dense during the warm-up) attention; dense or MoE FFNs (router,
//! routed experts, shared experts, the sequence-wise balance loss, and the auxiliary-loss-free
//! bias update after each optimizer step, as `train::train_step`). The CUDA implementation adds
//! the shape rules of its kernels (`step_cuda::check_cuda_shapes`).

use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::dsa::DsaDims;
use crate::backend::cpu::moe::RouterConfig;
use crate::backend::cpu::optim::AdamWStep;
use crate::backend::cpu::window_attention::WindowDims;
use crate::nn::config::AttnKind;
use crate::nn::model::MoeLoad;
use crate::nn::{Model, ModelConfig, ParamKind};
use crate::optim::{OptimConfig, Optimizer, ParamState};
use anyhow::{bail, Result};

/// The coarse ops of a training step (every layer kind). `F` holds f32 values (master weights,
/// gradients, optimizer state, per-row statistics such as rstd and lse, router logits and gate
/// gradients); `A` holds activations and the
/// GEMM-precision copies of the weights (f32 on the CPU, bf16 on CUDA). Shapes follow the CPU
/// twins in `backend::cpu`: activations are row-major `[tokens, features]`, weights `[out, in]`.
pub trait StepOps {
    type F;
    type A;

    /// Device memory allocated until the returned guard drops is counted under `cat` (the CUDA
    /// allocator's accounting); a no-op where memory is not tracked per allocation.
    fn memory_scope(&self, _cat: crate::memory::Category) -> Box<dyn std::any::Any> {
        Box::new(())
    }
    /// Token ids (and targets) where the kernels read them.
    type Ids;
    type Tgt;
    /// A MoE layer's routing (`cpu::moe::Routing` or its device twin) and what the experts'
    /// backward needs from their forward.
    type Routing;
    type MoeCache;
    /// A DSA layer's top-k selection `[b, t, kmax]`.
    type Sel;

    fn f_from(&self, v: &[f32]) -> Result<Self::F>;
    fn f_zeros(&self, n: usize) -> Result<Self::F>;
    fn f_to_host(&self, x: &Self::F) -> Result<Vec<f32>>;
    fn f_fill_zero(&self, x: &mut Self::F) -> Result<()>;
    fn a_zeros(&self, n: usize) -> Result<Self::A>;
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
    /// dw[n,k] += dy[m,n]ᵀ·x[m,k] (f32 accumulation over micro-batches).
    fn linear_dw(&self, dy: &Self::A, x: &Self::A, dims: (usize, usize, usize), dw: &mut Self::F) -> Result<()>;

    fn embedding(&self, table: &Self::F, dim: usize, ids: &Self::Ids, n: usize) -> Result<Self::A>;
    /// dtable[ids[i]] += dout[i].
    fn embedding_backward(&self, dout: &Self::A, dim: usize, ids: &Self::Ids, dtable: &mut Self::F) -> Result<()>;
    /// Parameter-free RMSNorm over groups of `dim`: (y, rstd).
    fn rmsnorm(&self, x: &Self::A, dim: usize) -> Result<(Self::A, Self::F)>;
    fn rmsnorm_backward(&self, x: &Self::A, rstd: &Self::F, dy: &Self::A, dim: usize) -> Result<Self::A>;
    /// QK-norm fused with RoPE: every head of q_raw [b,t,h,d] and k_raw [b,t,h_kv,d]
    /// RMS-normalized (parameter-free) and rotated → (q, k, rstd_q [b·t·h], rstd_k [b·t·h_kv]).
    #[allow(clippy::type_complexity)]
    fn rope_qknorm(
        &self,
        q_raw: &Self::A,
        k_raw: &Self::A,
        bthk: (usize, usize, usize, usize),
    ) -> Result<(Self::A, Self::A, Self::F, Self::F)>;
    /// Its backward: (dq_raw, dk_raw) from the raw inputs, their rstd and (dq, dk), the
    /// gradients with respect to the rotated q and k.
    fn rope_qknorm_backward(
        &self,
        raw: (&Self::A, &Self::A),
        rstd: (&Self::F, &Self::F),
        grads: (&Self::A, &Self::A),
        bthk: (usize, usize, usize, usize),
    ) -> Result<(Self::A, Self::A)>;
    /// Causal attention: (out, lse).
    fn attention(&self, dims: &AttnDims, q: &Self::A, k: &Self::A, v: &Self::A) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dims: &AttnDims,
        q: &Self::A,
        k: &Self::A,
        v: &Self::A,
        out: &Self::A,
        lse: &Self::F,
        dout: &Self::A,
    ) -> Result<(Self::A, Self::A, Self::A)>;
    /// Sliding-window + global attention (`W` layers): (out, lse).
    fn window_attention(&self, dims: &WindowDims, q: &Self::A, k: &Self::A, v: &Self::A) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv) of [`StepOps::window_attention`].
    #[allow(clippy::too_many_arguments)]
    fn window_attention_backward(
        &self,
        dims: &WindowDims,
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
    #[allow(clippy::too_many_arguments)]
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
    #[allow(clippy::too_many_arguments)]
    fn moe_forward(
        &self,
        x: &Self::A,
        ncf: (usize, usize, usize),
        r: &Self::Routing,
        w: [&Self::A; 3],
    ) -> Result<(Self::A, Self::MoeCache)>;
    /// Backward of [`StepOps::moe_forward`] (routing fixed): returns (dx, d_gates `[n, K]` f32)
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
    /// and the optional extra score gradients (`cpu::moe::router_backward`).
    fn router_backward(
        &self,
        r: &Self::Routing,
        d_gates: &Self::F,
        d_scores: Option<&Self::F>,
        cfg: &RouterConfig,
    ) -> Result<Self::A>;

    /// RoPE of the DSA indexer (table of `index_head_dim`) in place on qi [b,t,hi,di] and
    /// ki [b,t,1,di]; `inverse` is the backward.
    fn index_rope(&self, qi: &mut Self::A, ki: &mut Self::A, bth: (usize, usize, usize), inverse: bool) -> Result<()>;
    /// x ← s·x.
    fn scale(&self, x: &mut Self::A, s: f32) -> Result<()>;
    /// `cpu::dsa::indexer_topk`.
    fn indexer_topk(&self, dims: &DsaDims, qi: &Self::A, ki: &Self::A, wi: &Self::A) -> Result<Self::Sel>;
    /// Attention over the selected keys: (out, lse).
    fn dsa_attention(
        &self,
        dims: &DsaDims,
        qkv: (&Self::A, &Self::A, &Self::A),
        sel: &Self::Sel,
    ) -> Result<(Self::A, Self::F)>;
    /// (dq, dk, dv) of [`StepOps::dsa_attention`].
    #[allow(clippy::too_many_arguments)]
    fn dsa_attention_backward(
        &self,
        dims: &DsaDims,
        qkv: (&Self::A, &Self::A, &Self::A),
        sel: &Self::Sel,
        out: &Self::A,
        lse: &Self::F,
        dout: &Self::A,
    ) -> Result<(Self::A, Self::A, Self::A)>;
    /// The indexer's KL loss against the attention (`lse` over `sel`, or dense causal when None)
    /// and its gradients (dqi, dki, dwi) for a unit loss gradient (`cpu::dsa::indexer_kl`).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn indexer_kl(
        &self,
        dims: &DsaDims,
        q: &Self::A,
        k: &Self::A,
        lse: &Self::F,
        index: (&Self::A, &Self::A, &Self::A),
        sel: Option<&Self::Sel>,
    ) -> Result<(f32, Self::A, Self::A, Self::A)>;

    /// (dg, du) of a = swiglu(g, u) given da = dy[m,n]·w[n,k] (the down projection's `linear_dx`,
    /// dims as there), with the SwiGLU backward fused into that GEMM's epilogue (da is not kept).
    fn linear_dx_swiglu(
        &self,
        dy: &Self::A,
        w: &Self::A,
        dims: (usize, usize, usize),
        gu: (&Self::A, &Self::A),
    ) -> Result<(Self::A, Self::A)>;
    /// acc += x.
    fn add(&self, acc: &mut Self::A, x: &Self::A) -> Result<()>;
    /// Softcapped cross-entropy: (Σ of the per-row losses, in f64, and the per-row lse).
    fn cross_entropy(&self, logits: &Self::A, vocab: usize, tgt: &Self::Tgt, cap: f32) -> Result<(f64, Self::F)>;
    /// dlogits = scale · ∂loss/∂logits.
    #[allow(clippy::too_many_arguments)]
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
    /// AdamW on p (and its copy `pa`), `cpu::optim::adamw_update`.
    fn adamw(
        &self,
        p: &mut Self::F,
        pa: &mut Self::A,
        g: &Self::F,
        m: &mut Self::F,
        v: &mut Self::F,
        h: AdamWStep,
    ) -> Result<()>;
    /// Nesterov momentum in lerp form: buf ← μ·buf + (1−μ)·g; returns u = (1−μ)·g + μ·buf.
    fn muon_momentum(&self, buf: &mut Self::F, g: &Self::F, mu: f32) -> Result<Self::F>;
    /// ≈ U·Vᵀ of u [rows, cols] (`cpu::optim::newton_schulz`; GEMMs on CUDA).
    fn newton_schulz(&self, u: &Self::F, rows: usize, cols: usize, steps: usize) -> Result<Self::A>;
    /// [`StepOps::newton_schulz`] of each of the `n_mat` consecutive [rows, cols] matrices of u
    /// (an expert stack, orthogonalized one expert matrix at a time as `Optimizer::update` does).
    fn newton_schulz_stack(&self, u: &Self::F, n_mat: usize, rows: usize, cols: usize, steps: usize)
        -> Result<Self::A>;
    /// w ← w·decay − lr·o, and its copy `wa`.
    fn muon_apply(&self, w: &mut Self::F, wa: &mut Self::A, o: &Self::A, decay: f32, lr: f32) -> Result<()>;
}

/// Optimizer state of one parameter on the backend.
pub enum StateBuf<F> {
    AdamW { m: F, v: F },
    Muon { momentum: F },
}

/// What the backward of a layer's attention needs beyond q, k, v, out and lse.
enum AttnSaved<O: StepOps> {
    Dense,
    Window(WindowDims),
    /// DSA: the selection (None during the dense warm-up) and, from the indexer's KL, the
    /// gradients of the indexer projections' outputs (seeded, through the RoPE backward and the
    /// w_heads scale): ∂/∂(h·wqᵀ), ∂/∂(h·wkᵀ), ∂/∂(h·w_headsᵀ).
    Sparse {
        dims: DsaDims,
        sel: Option<O::Sel>,
        d_index: (O::A, O::A, O::A),
    },
}

/// What the backward of a layer's FFN needs.
enum FfnSaved<O: StepOps> {
    /// g, u and swiglu(g, u).
    Dense { g: O::A, u: O::A, a: O::A },
    /// The routing, the experts' cache, seed·∂balance/∂scores (α > 0) and the shared experts'
    /// g, u, a.
    Moe { routing: O::Routing, cache: O::MoeCache, d_scores: Option<O::F>, shared: Option<(O::A, O::A, O::A)> },
}

/// Per-layer activations kept from the forward for the backward.
struct Saved<O: StepOps> {
    /// Block input x, its norm h1 and rstd.
    x: O::A,
    h1: O::A,
    r1: O::F,
    /// q, k before QK-norm and their rstd; q, k after norm and RoPE; v; attention out and lse.
    q_raw: O::A,
    k_raw: O::A,
    rq: O::F,
    rk: O::F,
    q: O::A,
    k: O::A,
    v: O::A,
    y: O::A,
    lse: O::F,
    attn: AttnSaved<O>,
    /// x after the attention residual, its norm h2 and rstd; the FFN's state.
    x_mid: O::A,
    h2: O::A,
    r2: O::F,
    ffn: FfnSaved<O>,
}

/// Per-layer statistics of one pass (`train::StepStats`): the MoE loads and the indexer KL.
#[derive(Clone, Debug, Default)]
pub struct PassStats {
    pub moe_loads: Vec<Option<MoeLoad>>,
    pub indexer_losses: Vec<Option<f32>>,
}

/// What one optimizer step of [`DenseTrainer::train_step`] logs besides loss and grad norm:
/// the MoE loads (summed over micro-batches, balance loss averaged; the bias update uses the
/// counts) and the indexer KL averaged over DSA layers and micro-batches.
#[derive(Clone, Debug, Default)]
pub struct StepExtras {
    pub moe_loads: Vec<Option<MoeLoad>>,
    pub indexer_loss: Option<f32>,
}

/// A model being trained on a backend (the name is historical: every layer kind): parameters (`Model::params` order), their
/// GEMM-precision copies, gradients and optimizer state, all on the backend; the MoE selection
/// biases on the host (E floats per layer; the device kernels get them per forward).
pub struct DenseTrainer<O: StepOps> {
    pub ops: O,
    pub config: ModelConfig,
    pub optim: OptimConfig,
    /// (name, kind, shape) of each parameter, in checkpoint order.
    pub specs: Vec<(String, ParamKind, Vec<usize>)>,
    pub params: Vec<O::F>,
    weights: Vec<O::A>,
    pub grads: Vec<O::F>,
    pub state: Vec<StateBuf<O::F>>,
    /// Optimizer steps taken so far.
    pub step: u64,
    adam_lr_scale: f32,
    /// Index in `params` of each block's first parameter, plus one past the last block.
    block_start: Vec<usize>,
    /// Per layer, the MoE router's selection bias (`Model::moe_bias`; empty for dense FFNs).
    pub moe_bias: Vec<Vec<f32>>,
    /// DSA layers attend densely (the indexer's warm-up); the training loop sets it per step.
    pub dsa_dense_warmup: bool,
    /// The statistics of the latest [`DenseTrainer::train_step`].
    pub last_step: StepExtras,
}

impl<O: StepOps> DenseTrainer<O> {
    /// Uploads a model and its optimizer state (a fresh or a resumed run).
    pub fn new(ops: O, model: &Model, opt: &Optimizer) -> Result<Self> {
        let c = &model.config;
        let specs: Vec<_> = model.params.iter().map(|p| (p.name.clone(), p.kind, p.tensor.shape.clone())).collect();
        let mut block_start = vec![1];
        for l in 0..c.n_layer {
            let prefix = format!("blocks.{l}.");
            let n = specs.iter().filter(|s| s.0.starts_with(&prefix)).count();
            block_start.push(block_start[l] + n);
        }
        if block_start[c.n_layer] + 1 != specs.len() {
            bail!("the model's parameters are not wte, the blocks, lm_head (as Model::new makes them)");
        }
        let mut params = Vec::new();
        let mut weights = Vec::new();
        let mut grads = Vec::new();
        for p in &model.params {
            let f = ops.f_from(&p.tensor.data)?;
            let mut a = ops.a_zeros(p.tensor.numel())?;
            ops.cast(&f, &mut a)?;
            params.push(f);
            weights.push(a);
            grads.push(ops.f_zeros(p.tensor.numel())?);
        }
        let state = opt
            .state
            .iter()
            .map(|st| {
                Ok(match st {
                    ParamState::AdamW { m, v } => StateBuf::AdamW { m: ops.f_from(m)?, v: ops.f_from(v)? },
                    ParamState::Muon { momentum } => StateBuf::Muon { momentum: ops.f_from(momentum)? },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adam_lr_scale = (c.n_embd as f32 / 768.0).powf(-0.5);
        Ok(DenseTrainer {
            ops,
            config: c.clone(),
            optim: opt.config.clone(),
            specs,
            params,
            weights,
            grads,
            state,
            step: opt.step,
            adam_lr_scale,
            block_start,
            moe_bias: model.moe_bias.clone(),
            dsa_dense_warmup: model.dsa_dense_warmup,
            last_step: StepExtras::default(),
        })
    }

    /// Copies the parameters, the MoE biases and the optimizer state back into a host model and
    /// optimizer (for checkpoints, evaluation on the CPU, sampling).
    pub fn to_host(&self, model: &mut Model, opt: &mut Optimizer) -> Result<()> {
        for (p, f) in model.params.iter_mut().zip(&self.params) {
            p.tensor.data = self.ops.f_to_host(f)?;
        }
        model.moe_bias.clone_from(&self.moe_bias);
        for (st, s) in opt.state.iter_mut().zip(&self.state) {
            match (st, s) {
                (ParamState::AdamW { m, v }, StateBuf::AdamW { m: dm, v: dv }) => {
                    *m = self.ops.f_to_host(dm)?;
                    *v = self.ops.f_to_host(dv)?;
                }
                (ParamState::Muon { momentum }, StateBuf::Muon { momentum: dm }) => {
                    *momentum = self.ops.f_to_host(dm)?
                }
                _ => bail!("optimizer state kinds differ between the host and the trainer"),
            }
        }
        opt.step = self.step;
        Ok(())
    }

    /// Every parameter's gradient on the host, as (name, values) in `specs` order (the
    /// selftest compares them with the CPU twin's).
    pub fn grads_to_host(&self) -> Result<Vec<(String, Vec<f32>)>> {
        self.specs.iter().zip(&self.grads).map(|((name, ..), g)| Ok((name.clone(), self.ops.f_to_host(g)?))).collect()
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) -> Result<()> {
        for g in &mut self.grads {
            self.ops.f_fill_zero(g)?;
        }
        Ok(())
    }

    fn check_batch(&self, ids: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let c = &self.config;
        if ids.len() != b * t || targets.len() != ids.len() {
            bail!("step: {} ids / {} targets do not form a [{b}, {t}] batch", ids.len(), targets.len());
        }
        if t > c.max_seq_len {
            bail!("step: sequence length {t} exceeds max_seq_len {}", c.max_seq_len);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} is out of range for vocab_size {}", c.vocab_size);
        }
        if let Some(&bad) = targets.iter().find(|&&y| y >= 0 && y as usize >= c.vocab_size) {
            bail!("target token id {bad} is out of range for vocab_size {}", c.vocab_size);
        }
        Ok(())
    }

    fn pass(&self) -> Pass<'_, O> {
        Pass {
            ops: &self.ops,
            c: &self.config,
            block_start: &self.block_start,
            moe_bias: &self.moe_bias,
            dense_warmup: self.dsa_dense_warmup,
        }
    }

    /// Mean loss of one batch without a backward (validation; no auxiliary losses).
    pub fn loss(&self, ids: &[u32], targets: &[i32], b: usize, t: usize) -> Result<f32> {
        self.check_batch(ids, targets, b, t)?;
        let _scope = self.ops.memory_scope(crate::memory::Category::Activations);
        Ok(self.pass().run(&self.params[0], &self.weights, None, (ids, targets, b, t))?.0)
    }

    /// Forward and backward of one micro-batch, adding seed·∂(loss + aux losses)/∂θ into `grads`;
    /// returns the mean loss and the layers' statistics (the tape's `Model::loss` then
    /// `backward(loss, seed)`, which seeds the MoE balance and DSA indexer losses with `seed` too).
    pub fn forward_backward_stats(
        &mut self,
        ids: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        seed: f32,
    ) -> Result<(f32, PassStats)> {
        self.check_batch(ids, targets, b, t)?;
        let pass = Pass {
            ops: &self.ops,
            c: &self.config,
            block_start: &self.block_start,
            moe_bias: &self.moe_bias,
            dense_warmup: self.dsa_dense_warmup,
        };
        // everything a pass allocates (saved activations, the backward's temporaries) is activations
        let _scope = self.ops.memory_scope(crate::memory::Category::Activations);
        pass.run(&self.params[0], &self.weights, Some((&mut self.grads[..], seed)), (ids, targets, b, t))
    }

    /// [`DenseTrainer::forward_backward_stats`] without the statistics.
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[i32], b: usize, t: usize, seed: f32) -> Result<f32> {
        Ok(self.forward_backward_stats(ids, targets, b, t, seed)?.0)
    }

    /// Mean loss over the first `batches` sequential validation batches (`train::evaluate`).
    pub fn evaluate(&self, val: &crate::data::Loader, batches: usize) -> Result<f32> {
        let (mut total, mut n) = (0.0f64, 0usize);
        for i in 0..batches {
            let Some(batch) = val.sequential_batch(i) else {
                break;
            };
            total += self.loss(&batch.ids, &batch.targets, val.batch, val.seq_len)? as f64;
            n += 1;
        }
        if n == 0 {
            bail!("the validation data is shorter than one batch");
        }
        Ok((total / n as f64) as f32)
    }

    /// One optimizer update from `grads` with every learning rate multiplied by `lr_mult`
    /// (`Optimizer::update`, same order and math; expert stacks [E, rows, cols] get Muon one
    /// expert matrix at a time).
    pub fn update(&mut self, lr_mult: f32) -> Result<()> {
        self.step += 1;
        let (c, step, ops) = (&self.optim, self.step, &self.ops);
        for (i, (name_kind_shape, st)) in self.specs.iter().zip(self.state.iter_mut()).enumerate() {
            let (_, kind, shape) = name_kind_shape;
            let (p, pa, g) = (&mut self.params[i], &mut self.weights[i], &self.grads[i]);
            match st {
                StateBuf::AdamW { m, v } => {
                    let base = if *kind == ParamKind::Embedding { c.embedding_lr } else { c.unembedding_lr };
                    let h = AdamWStep {
                        lr: base * self.adam_lr_scale * lr_mult,
                        beta1: c.adam_beta1,
                        beta2: c.adam_beta2,
                        eps: c.adam_eps,
                        weight_decay: c.weight_decay,
                        step,
                    };
                    ops.adamw(p, pa, g, m, v, h)?;
                }
                StateBuf::Muon { momentum } => {
                    let u = ops.muon_momentum(momentum, g, c.muon_momentum)?;
                    let (rows, cols, o) = match shape[..] {
                        [n_mat, rows, cols] => {
                            (rows, cols, ops.newton_schulz_stack(&u, n_mat, rows, cols, c.ns_steps)?)
                        }
                        [rows, cols] => (rows, cols, ops.newton_schulz(&u, rows, cols, c.ns_steps)?),
                        _ => bail!("{}: a Muon parameter must be 2-D or an expert stack", name_kind_shape.0),
                    };
                    // Tall matrices get a larger step so the update's RMS per entry stays comparable.
                    let lr = c.matrix_lr * lr_mult * (rows as f32 / cols as f32).max(1.0).sqrt();
                    let decay = 1.0 - c.matrix_lr * lr_mult * c.weight_decay;
                    ops.muon_apply(p, pa, &o, decay, lr)?;
                }
            }
        }
        Ok(())
    }

    /// Auxiliary-loss-free balancing after an optimizer step (`Model::update_moe_bias`): each MoE
    /// layer's bias moves by ∓γ for experts above/below the step's mean load.
    pub fn update_moe_bias(&mut self, loads: &[Option<MoeLoad>]) {
        let gamma = self.config.moe.bias_update_speed;
        for (bias, load) in self.moe_bias.iter_mut().zip(loads) {
            if let (Some(load), false) = (load, bias.is_empty()) {
                crate::backend::cpu::moe::update_bias(bias, &load.counts, gamma);
            }
        }
    }

    /// One optimizer step as `train::train_step` runs it: `accum` micro-batches (seed 1/accum,
    /// gradients summed), the NaN checks, clipping, the update, the MoE bias update. Returns
    /// (mean loss, grad norm); the loads and the indexer loss are in `last_step`.
    pub fn train_step(
        &mut self,
        mut next_batch: impl FnMut() -> crate::data::Batch,
        accum: usize,
        grad_clip: f32,
        lr: f32,
    ) -> Result<(f32, f32)> {
        self.zero_grads()?;
        let t = self.config.max_seq_len;
        let mut loss_sum = 0.0f64;
        let mut moe_loads: Vec<Option<MoeLoad>> = vec![None; self.config.n_layer];
        let (mut kl_sum, mut kl_n) = (0.0f64, 0usize);
        for micro in 0..accum {
            let batch = next_batch();
            let rows = batch.ids.len() / t;
            let (lv, stats) = self.forward_backward_stats(&batch.ids, &batch.targets, rows, t, 1.0 / accum as f32)?;
            if !lv.is_finite() {
                bail!("loss became {lv} (micro-batch {micro}). Try a lower learning rate.");
            }
            let aux: f64 = stats.indexer_losses.iter().flatten().map(|&v| v as f64).sum::<f64>()
                + stats.moe_loads.iter().flatten().map(|l| l.balance_loss as f64).sum::<f64>();
            if !aux.is_finite() {
                bail!("an auxiliary loss (MoE balance or DSA indexer) became {aux} (micro-batch {micro}). Try a lower learning rate.");
            }
            loss_sum += lv as f64;
            for kl in stats.indexer_losses.into_iter().flatten() {
                (kl_sum, kl_n) = (kl_sum + kl as f64, kl_n + 1);
            }
            for (sum, load) in moe_loads.iter_mut().zip(stats.moe_loads) {
                if let Some(load) = load {
                    sum.get_or_insert_with(MoeLoad::default).merge(&load);
                }
            }
        }
        let grad_norm = self.ops.clip_grad_norm(&mut self.grads, grad_clip)?;
        if !grad_norm.is_finite() {
            bail!("gradient norm became {grad_norm}");
        }
        self.update(lr)?;
        self.update_moe_bias(&moe_loads);
        for load in moe_loads.iter_mut().flatten() {
            load.balance_loss /= accum as f32;
        }
        let indexer_loss = (kl_n > 0).then(|| (kl_sum / kl_n as f64) as f32);
        self.last_step = StepExtras { moe_loads, indexer_loss };
        Ok(((loss_sum / accum as f64) as f32, grad_norm))
    }
}

/// One forward (and optionally backward) pass over a batch.
struct Pass<'a, O: StepOps> {
    ops: &'a O,
    c: &'a ModelConfig,
    block_start: &'a [usize],
    moe_bias: &'a [Vec<f32>],
    dense_warmup: bool,
}

impl<O: StepOps> Pass<'_, O> {
    /// The forward of one batch, returning the mean loss; with `grads` = (gradients, seed) it
    /// keeps the activations, computes the auxiliary losses and runs the backward, adding
    /// seed·∂(loss + aux)/∂θ into the gradients. `wte` is the f32 embedding table, `w` the
    /// GEMM-precision copies of every parameter (`Model::params` order).
    fn run(
        &self,
        wte: &O::F,
        w: &[O::A],
        grads: Option<(&mut [O::F], f32)>,
        (ids, targets, b, t): (&[u32], &[i32], usize, usize),
    ) -> Result<(f32, PassStats)> {
        let (ops, c) = (self.ops, self.c);
        let (n, ce, hd, v) = (b * t, c.n_embd, c.head_dim, c.vocab_size);
        let (qd, kvd, f) = (c.q_dim(), c.kv_dim(), c.ffn_hidden);
        let dims = AttnDims { b, t, h: c.n_head, h_kv: c.n_kv_head, d: hd };
        let bthk = (b, t, c.n_head, c.n_kv_head);
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let seed = grads.as_ref().map(|g| g.1);
        let dev_ids = ops.ids(ids)?;
        let tgt = ops.targets(targets)?;
        let n_valid = targets.iter().filter(|&&y| y >= 0).count();
        let mut stats = PassStats { moe_loads: vec![None; c.n_layer], indexer_losses: vec![None; c.n_layer] };
        let cfg = c.moe.router();
        // x₀ = norm(wte[ids])
        let e = ops.embedding(wte, ce, &dev_ids, n)?;
        let (mut x, r0) = ops.rmsnorm(&e, ce)?;
        let mut saved: Vec<Saved<O>> = Vec::new();
        for l in 0..c.n_layer {
            let wl = &w[self.block_start[l]..self.block_start[l + 1]];
            let kind = c.attn_kind(l);
            let (h1, r1) = ops.rmsnorm(&x, ce)?;
            let q_raw = ops.linear(&h1, &wl[0], n, ce, qd)?;
            let k_raw = ops.linear(&h1, &wl[1], n, ce, kvd)?;
            let vv = ops.linear(&h1, &wl[2], n, ce, kvd)?;
            // QK-norm per head, then RoPE (one fused op).
            let (q, k, rq, rk) = ops.rope_qknorm(&q_raw, &k_raw, bthk)?;
            let (y, lse, attn) = match kind {
                AttnKind::Dense => {
                    let (y, lse) = ops.attention(&dims, &q, &k, &vv)?;
                    (y, lse, AttnSaved::Dense)
                }
                AttnKind::Window => {
                    let wd = WindowDims {
                        b,
                        t,
                        h: c.n_head,
                        h_kv: c.n_kv_head,
                        d: hd,
                        window: c.dsa_window_size,
                        n_global: c.n_global,
                    };
                    let (y, lse) = ops.window_attention(&wd, &q, &k, &vv)?;
                    (y, lse, AttnSaved::Window(wd))
                }
                AttnKind::Sparse => {
                    // The lightning indexer reads h1 detached: no LM gradient reaches it.
                    let wi_ = &wl[wl.len() - 3..];
                    let ddims = DsaDims {
                        b,
                        t,
                        h: c.n_head,
                        h_kv: c.n_kv_head,
                        d: hd,
                        n_index_heads: hi,
                        index_dim: di,
                        topk: c.index_topk,
                        window: c.index_local_window,
                    };
                    let mut qi = ops.linear(&h1, &wi_[0], n, ce, hi * di)?;
                    let mut ki = ops.linear(&h1, &wi_[1], n, ce, di)?;
                    ops.index_rope(&mut qi, &mut ki, (b, t, hi), false)?;
                    let mut wi = ops.linear(&h1, &wi_[2], n, ce, hi)?;
                    let w_scale = 1.0 / ((hi * di) as f32).sqrt();
                    ops.scale(&mut wi, w_scale)?;
                    let (y, lse, sel) = if self.dense_warmup {
                        let (y, lse) = ops.attention(&dims, &q, &k, &vv)?;
                        (y, lse, None)
                    } else {
                        let sel = ops.indexer_topk(&ddims, &qi, &ki, &wi)?;
                        let (y, lse) = ops.dsa_attention(&ddims, (&q, &k, &vv), &sel)?;
                        (y, lse, Some(sel))
                    };
                    match seed {
                        // The KL is an auxiliary loss (seeded like the LM loss); only its
                        // gradients into the indexer are kept (q, k and lse are constants).
                        Some(seed) => {
                            let (kl, mut dqi, mut dki, mut dwi) =
                                ops.indexer_kl(&ddims, &q, &k, &lse, (&qi, &ki, &wi), sel.as_ref())?;
                            stats.indexer_losses[l] = Some(kl);
                            ops.scale(&mut dqi, seed)?;
                            ops.scale(&mut dki, seed)?;
                            ops.index_rope(&mut dqi, &mut dki, (b, t, hi), true)?;
                            ops.scale(&mut dwi, seed * w_scale)?;
                            (y, lse, AttnSaved::Sparse { dims: ddims, sel, d_index: (dqi, dki, dwi) })
                        }
                        None => (y, lse, AttnSaved::Dense),
                    }
                }
            };
            let x_mid = ops.linear_residual(&y, &wl[3], (n, qd, ce), &x)?;
            let (h2, r2) = ops.rmsnorm(&x_mid, ce)?;
            let n_index = if kind == AttnKind::Sparse { 3 } else { 0 };
            let wf = &wl[4..wl.len() - n_index];
            let (x_next, ffn) = if c.is_moe_layer(l) {
                let (ne, k_top, fm) = (cfg.n_experts, cfg.top_k, c.moe.moe_inter_dim);
                let logits = ops.router_logits(&h2, &wf[0], n, ce, ne)?;
                let routing = ops.route(&logits, &self.moe_bias[l], &cfg)?;
                drop(logits);
                let (mut y, cache) = ops.moe_forward(&h2, (n, ce, fm), &routing, [&wf[1], &wf[2], &wf[3]])?;
                let (mut balance, mut d_scores) = (0.0, None);
                if let (Some(seed), true) = (seed, c.moe.seq_aux_alpha > 0.0) {
                    let (bl, ds) = ops.balance_loss(&routing, b, t, &cfg, c.moe.seq_aux_alpha, seed)?;
                    (balance, d_scores) = (bl, Some(ds));
                }
                let shared = if wf.len() > 4 {
                    let fs = c.moe.n_shared_experts * fm;
                    let g = ops.linear(&h2, &wf[4], n, ce, fs)?;
                    let (u, a) = ops.linear_swiglu(&h2, &wf[5], (n, ce, fs), &g)?;
                    y = ops.linear_residual(&a, &wf[6], (n, fs, ce), &y)?; // routed + shared
                    Some((g, u, a))
                } else {
                    None
                };
                ops.add(&mut y, &x_mid)?; // x_next = x_mid + (routed + shared)
                let (counts, dropped) = ops.routing_counts(&routing)?;
                stats.moe_loads[l] = Some(MoeLoad { counts, dropped, assignments: n * k_top, balance_loss: balance });
                (y, FfnSaved::Moe { routing, cache, d_scores, shared })
            } else {
                let g = ops.linear(&h2, &wf[0], n, ce, f)?;
                let (u, a) = ops.linear_swiglu(&h2, &wf[1], (n, ce, f), &g)?;
                let x_next = ops.linear_residual(&a, &wf[2], (n, f, ce), &x_mid)?;
                (x_next, FfnSaved::Dense { g, u, a })
            };
            let x_in = std::mem::replace(&mut x, x_next);
            if seed.is_some() {
                let (x, v) = (x_in, vv);
                saved.push(Saved { x, h1, r1, q_raw, k_raw, rq, rk, q, k, v, y, lse, attn, x_mid, h2, r2, ffn });
            }
        }
        let (hf, rf) = ops.rmsnorm(&x, ce)?;
        let head = &w[w.len() - 1];
        let logits = ops.linear(&hf, head, n, ce, v)?;
        let (total, lse_ce) = ops.cross_entropy(&logits, v, &tgt, c.logit_softcap)?;
        let loss = if n_valid > 0 { (total / n_valid as f64) as f32 } else { 0.0 };
        // A backward through a non-finite loss would only spread it; the caller reports it.
        let Some((grads, seed)) = grads.filter(|_| loss.is_finite()) else { return Ok((loss, stats)) };

        // ---- backward ----
        let scale = if n_valid > 0 { seed / n_valid as f32 } else { 0.0 };
        let dlogits = ops.cross_entropy_backward(&logits, v, &tgt, c.logit_softcap, &lse_ce, scale)?;
        drop(logits);
        let last = grads.len() - 1;
        ops.linear_dw(&dlogits, &hf, (n, ce, v), &mut grads[last])?;
        let mut dhf = ops.a_zeros(n * ce)?;
        ops.linear_dx(&dlogits, head, (n, ce, v), &mut dhf, false)?;
        drop(dlogits);
        let mut dx = ops.rmsnorm_backward(&x, &rf, &dhf, ce)?;
        for l in (0..c.n_layer).rev() {
            let s = saved.pop().expect("one saved entry per layer");
            let wl = &w[self.block_start[l]..self.block_start[l + 1]];
            let gl = &mut grads[self.block_start[l]..self.block_start[l + 1]];
            let n_index = if c.attn_kind(l) == AttnKind::Sparse { 3 } else { 0 };
            let (ga, gi) = gl.split_at_mut(gl.len() - n_index);
            let (ga, gf) = ga.split_at_mut(4);
            let wf = &wl[4..wl.len() - n_index];
            // FFN: x_next = x_mid + ffn(h2), h2 = norm(x_mid); dx is ∂/∂x_next.
            let dh2 = match &s.ffn {
                FfnSaved::Dense { g, u, a } => {
                    let (dg, du) = ops.linear_dx_swiglu(&dx, &wf[2], (n, f, ce), (g, u))?;
                    ops.linear_dw(&dx, a, (n, f, ce), &mut gf[2])?;
                    let mut dh2 = ops.a_zeros(n * ce)?;
                    ops.linear_dx(&dg, &wf[0], (n, ce, f), &mut dh2, false)?;
                    ops.linear_dx(&du, &wf[1], (n, ce, f), &mut dh2, true)?;
                    ops.linear_dw(&dg, &s.h2, (n, ce, f), &mut gf[0])?;
                    ops.linear_dw(&du, &s.h2, (n, ce, f), &mut gf[1])?;
                    dh2
                }
                FfnSaved::Moe { routing, cache, d_scores, shared } => {
                    let (ne, fm) = (cfg.n_experts, c.moe.moe_inter_dim);
                    let [g_router, g_gate, g_up, g_down, g_shared @ ..] = gf else {
                        bail!("layer {l}: the MoE parameters are not router, w_gate, w_up, w_down[, shared]")
                    };
                    let experts = [&wf[1], &wf[2], &wf[3]];
                    let (mut dh2, d_gates) =
                        ops.moe_backward(&dx, (n, ce, fm), routing, experts, cache, [g_gate, g_up, g_down])?;
                    // the router: logits = h2·Rᵀ, through the gates (and the balance loss's scores)
                    let d_logits = ops.router_backward(routing, &d_gates, d_scores.as_ref(), &cfg)?;
                    ops.linear_dx(&d_logits, &wf[0], (n, ce, ne), &mut dh2, true)?;
                    ops.linear_dw(&d_logits, &s.h2, (n, ce, ne), g_router)?;
                    if let Some((g, u, a)) = shared {
                        let fs = c.moe.n_shared_experts * fm;
                        let (dg, du) = ops.linear_dx_swiglu(&dx, &wf[6], (n, fs, ce), (g, u))?;
                        ops.linear_dw(&dx, a, (n, fs, ce), &mut g_shared[2])?;
                        ops.linear_dx(&dg, &wf[4], (n, ce, fs), &mut dh2, true)?;
                        ops.linear_dx(&du, &wf[5], (n, ce, fs), &mut dh2, true)?;
                        ops.linear_dw(&dg, &s.h2, (n, ce, fs), &mut g_shared[0])?;
                        ops.linear_dw(&du, &s.h2, (n, ce, fs), &mut g_shared[1])?;
                    }
                    dh2
                }
            };
            let dxn = ops.rmsnorm_backward(&s.x_mid, &s.r2, &dh2, ce)?;
            ops.add(&mut dx, &dxn)?; // dx is now ∂/∂x_mid
                                     // attention: x_mid = x + c_proj(attn(rope(norm(q)), rope(norm(k)), v)), q, k, v from h1 = norm(x)
            let mut dy = ops.a_zeros(n * qd)?;
            ops.linear_dx(&dx, &wl[3], (n, qd, ce), &mut dy, false)?;
            ops.linear_dw(&dx, &s.y, (n, qd, ce), &mut ga[3])?;
            let (dq, dk, dv) = match &s.attn {
                AttnSaved::Dense | AttnSaved::Sparse { sel: None, .. } => {
                    ops.attention_backward(&dims, &s.q, &s.k, &s.v, &s.y, &s.lse, &dy)?
                }
                AttnSaved::Window(wd) => ops.window_attention_backward(wd, &s.q, &s.k, &s.v, &s.y, &s.lse, &dy)?,
                AttnSaved::Sparse { dims: dd, sel: Some(sel), .. } => {
                    ops.dsa_attention_backward(dd, (&s.q, &s.k, &s.v), sel, &s.y, &s.lse, &dy)?
                }
            };
            let (dq_raw, dk_raw) = ops.rope_qknorm_backward((&s.q_raw, &s.k_raw), (&s.rq, &s.rk), (&dq, &dk), bthk)?;
            drop((dq, dk));
            let mut dh1 = ops.a_zeros(n * ce)?;
            ops.linear_dx(&dq_raw, &wl[0], (n, ce, qd), &mut dh1, false)?;
            ops.linear_dx(&dk_raw, &wl[1], (n, ce, kvd), &mut dh1, true)?;
            ops.linear_dx(&dv, &wl[2], (n, ce, kvd), &mut dh1, true)?;
            ops.linear_dw(&dq_raw, &s.h1, (n, ce, qd), &mut ga[0])?;
            ops.linear_dw(&dk_raw, &s.h1, (n, ce, kvd), &mut ga[1])?;
            ops.linear_dw(&dv, &s.h1, (n, ce, kvd), &mut ga[2])?;
            // The indexer's weights learn from the KL only (their input h1 is detached).
            if let AttnSaved::Sparse { d_index: (dqi, dki, dwi), .. } = &s.attn {
                ops.linear_dw(dqi, &s.h1, (n, ce, hi * di), &mut gi[0])?;
                ops.linear_dw(dki, &s.h1, (n, ce, di), &mut gi[1])?;
                ops.linear_dw(dwi, &s.h1, (n, ce, hi), &mut gi[2])?;
            }
            let dxn = ops.rmsnorm_backward(&s.x, &s.r1, &dh1, ce)?;
            ops.add(&mut dx, &dxn)?; // ∂/∂x (block input)
        }
        let de = ops.rmsnorm_backward(&e, &r0, &dx, ce)?;
        ops.embedding_backward(&de, ce, &dev_ids, &mut grads[0])?;
        Ok((loss, stats))
    }
}
