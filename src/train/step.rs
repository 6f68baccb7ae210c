//! The training step of a dense model as an explicit sequence of coarse ops, over a backend
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
//! Only dense models (every layer `D`, dense FFN) are supported: [`check_dense`] says which layer
//! kinds are not.

use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::optim::AdamWStep;
use crate::nn::{Model, ModelConfig, ParamKind};
use crate::optim::{OptimConfig, Optimizer, ParamState};
use anyhow::{bail, Result};

/// The coarse ops of a dense training step. `F` holds f32 values (master weights, gradients,
/// optimizer state, per-row statistics such as rstd and lse); `A` holds activations and the
/// GEMM-precision copies of the weights (f32 on the CPU, bf16 on CUDA). Shapes follow the CPU
/// twins in `backend::cpu`: activations are row-major `[tokens, features]`, weights `[out, in]`.
pub trait StepOps {
    type F;
    type A;
    /// Token ids (and targets) where the kernels read them.
    type Ids;
    type Tgt;

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
    /// RoPE in place on q [b,t,h,d] and k [b,t,h_kv,d]; `inverse` is the backward.
    fn rope(&self, q: &mut Self::A, k: &mut Self::A, bthk: (usize, usize, usize, usize), inverse: bool) -> Result<()>;
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
    fn swiglu(&self, g: &Self::A, u: &Self::A) -> Result<Self::A>;
    /// (dg, du).
    fn swiglu_backward(&self, g: &Self::A, u: &Self::A, dy: &Self::A) -> Result<(Self::A, Self::A)>;
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
    /// w ← w·decay − lr·o, and its copy `wa`.
    fn muon_apply(&self, w: &mut Self::F, wa: &mut Self::A, o: &Self::A, decay: f32, lr: f32) -> Result<()>;
}

/// Errors unless every layer is dense attention with a dense FFN (what the explicit step runs).
pub fn check_dense(c: &ModelConfig) -> Result<()> {
    let mut other = Vec::new();
    for l in 0..c.n_layer {
        match c.attn_kind(l) {
            crate::nn::config::AttnKind::Dense => {}
            crate::nn::config::AttnKind::Window => other.push(format!("layer {l}: window attention (W)")),
            crate::nn::config::AttnKind::Sparse => other.push(format!("layer {l}: DSA sparse attention (S)")),
        }
        if c.is_moe_layer(l) {
            other.push(format!("layer {l}: MoE FFN"));
        }
    }
    if !other.is_empty() {
        bail!(
            "the explicit (GPU) training step runs dense models only (attn_pattern of D, no MoE); not on the GPU yet: {}",
            other.join(", ")
        );
    }
    Ok(())
}

/// Optimizer state of one parameter on the backend.
pub enum StateBuf<F> {
    AdamW { m: F, v: F },
    Muon { momentum: F },
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
    /// x after the attention residual, its norm h2 and rstd; the FFN's g, u and swiglu a.
    x_mid: O::A,
    h2: O::A,
    r2: O::F,
    g: O::A,
    u: O::A,
    a: O::A,
}

/// A dense model being trained on a backend: parameters (`Model::params` order), their
/// GEMM-precision copies, gradients and optimizer state, all on the backend.
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
}

impl<O: StepOps> DenseTrainer<O> {
    /// Uploads a model and its optimizer state (a fresh or a resumed run).
    pub fn new(ops: O, model: &Model, opt: &Optimizer) -> Result<Self> {
        check_dense(&model.config)?;
        let specs: Vec<_> = model.params.iter().map(|p| (p.name.clone(), p.kind, p.tensor.shape.clone())).collect();
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
        let adam_lr_scale = (model.config.n_embd as f32 / 768.0).powf(-0.5);
        Ok(DenseTrainer {
            ops,
            config: model.config.clone(),
            optim: opt.config.clone(),
            specs,
            params,
            weights,
            grads,
            state,
            step: opt.step,
            adam_lr_scale,
        })
    }

    /// Copies the parameters and optimizer state back into a host model and optimizer (for
    /// checkpoints, evaluation on the CPU, sampling).
    pub fn to_host(&self, model: &mut Model, opt: &mut Optimizer) -> Result<()> {
        for (p, f) in model.params.iter_mut().zip(&self.params) {
            p.tensor.data = self.ops.f_to_host(f)?;
        }
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

    /// Mean loss of one batch without a backward (validation).
    pub fn loss(&self, ids: &[u32], targets: &[i32], b: usize, t: usize) -> Result<f32> {
        self.check_batch(ids, targets, b, t)?;
        step_pass(&self.ops, &self.config, &self.params[0], &self.weights, None, (ids, targets, b, t))
    }

    /// Forward and backward of one micro-batch, adding seed·∂loss/∂θ into `grads`; returns the
    /// mean loss (the tape's `Model::loss` then `backward(loss, seed)`).
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[i32], b: usize, t: usize, seed: f32) -> Result<f32> {
        self.check_batch(ids, targets, b, t)?;
        let grads = Some((&mut self.grads[..], seed));
        step_pass(&self.ops, &self.config, &self.params[0], &self.weights, grads, (ids, targets, b, t))
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
    /// (`Optimizer::update`, same order and math).
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
                    let (rows, cols) = (shape[0], shape[1]);
                    let u = ops.muon_momentum(momentum, g, c.muon_momentum)?;
                    let o = ops.newton_schulz(&u, rows, cols, c.ns_steps)?;
                    // Tall matrices get a larger step so the update's RMS per entry stays comparable.
                    let lr = c.matrix_lr * lr_mult * (rows as f32 / cols as f32).max(1.0).sqrt();
                    let decay = 1.0 - c.matrix_lr * lr_mult * c.weight_decay;
                    ops.muon_apply(p, pa, &o, decay, lr)?;
                }
            }
        }
        Ok(())
    }

    /// One optimizer step as `train::train_step` runs it: `accum` micro-batches (seed 1/accum,
    /// gradients summed), the NaN checks, clipping, the update. Returns (mean loss, grad norm).
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
        for micro in 0..accum {
            let batch = next_batch();
            let rows = batch.ids.len() / t;
            let lv = self.forward_backward(&batch.ids, &batch.targets, rows, t, 1.0 / accum as f32)?;
            if !lv.is_finite() {
                bail!("loss became {lv} (micro-batch {micro}). Try a lower learning rate.");
            }
            loss_sum += lv as f64;
        }
        let grad_norm = self.ops.clip_grad_norm(&mut self.grads, grad_clip)?;
        if !grad_norm.is_finite() {
            bail!("gradient norm became {grad_norm}");
        }
        self.update(lr)?;
        Ok(((loss_sum / accum as f64) as f32, grad_norm))
    }
}

/// The forward of one batch, returning the mean loss; with `grads` = (gradients, seed) it keeps
/// the activations and runs the backward, adding seed·∂loss/∂θ into the gradients. `wte` is the
/// f32 embedding table, `w` the GEMM-precision copies of every parameter (`Model::params` order).
fn step_pass<O: StepOps>(
    ops: &O,
    c: &ModelConfig,
    wte: &O::F,
    w: &[O::A],
    grads: Option<(&mut [O::F], f32)>,
    (ids, targets, b, t): (&[u32], &[i32], usize, usize),
) -> Result<f32> {
    let (n, ce, hd, v) = (b * t, c.n_embd, c.head_dim, c.vocab_size);
    let (qd, kvd, f) = (c.q_dim(), c.kv_dim(), c.ffn_hidden);
    let dims = AttnDims { b, t, h: c.n_head, h_kv: c.n_kv_head, d: hd };
    let bthk = (b, t, c.n_head, c.n_kv_head);
    let keep = grads.is_some();
    let dev_ids = ops.ids(ids)?;
    let tgt = ops.targets(targets)?;
    let n_valid = targets.iter().filter(|&&y| y >= 0).count();
    // x₀ = norm(wte[ids])
    let e = ops.embedding(wte, ce, &dev_ids, n)?;
    let (mut x, r0) = ops.rmsnorm(&e, ce)?;
    let mut saved: Vec<Saved<O>> = Vec::new();
    for l in 0..c.n_layer {
        let wl = &w[1 + 7 * l..1 + 7 * (l + 1)];
        let (h1, r1) = ops.rmsnorm(&x, ce)?;
        let q_raw = ops.linear(&h1, &wl[0], n, ce, qd)?;
        let k_raw = ops.linear(&h1, &wl[1], n, ce, kvd)?;
        let vv = ops.linear(&h1, &wl[2], n, ce, kvd)?;
        // QK-norm per head, then RoPE.
        let (mut q, rq) = ops.rmsnorm(&q_raw, hd)?;
        let (mut k, rk) = ops.rmsnorm(&k_raw, hd)?;
        ops.rope(&mut q, &mut k, bthk, false)?;
        let (y, lse) = ops.attention(&dims, &q, &k, &vv)?;
        let x_mid = ops.linear_residual(&y, &wl[3], (n, qd, ce), &x)?;
        let (h2, r2) = ops.rmsnorm(&x_mid, ce)?;
        let g = ops.linear(&h2, &wl[4], n, ce, f)?;
        let u = ops.linear(&h2, &wl[5], n, ce, f)?;
        let a = ops.swiglu(&g, &u)?;
        let x_next = ops.linear_residual(&a, &wl[6], (n, f, ce), &x_mid)?;
        let x_in = std::mem::replace(&mut x, x_next);
        if keep {
            let (x, v) = (x_in, vv);
            saved.push(Saved { x, h1, r1, q_raw, k_raw, rq, rk, q, k, v, y, lse, x_mid, h2, r2, g, u, a });
        }
    }
    let (hf, rf) = ops.rmsnorm(&x, ce)?;
    let head = &w[w.len() - 1];
    let logits = ops.linear(&hf, head, n, ce, v)?;
    let (total, lse_ce) = ops.cross_entropy(&logits, v, &tgt, c.logit_softcap)?;
    let loss = if n_valid > 0 { (total / n_valid as f64) as f32 } else { 0.0 };
    // A backward through a non-finite loss would only spread it; the caller reports it.
    let Some((grads, seed)) = grads.filter(|_| loss.is_finite()) else { return Ok(loss) };

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
        let wl = &w[1 + 7 * l..1 + 7 * (l + 1)];
        let gl = &mut grads[1 + 7 * l..1 + 7 * (l + 1)];
        // FFN: x_next = x_mid + w_down(swiglu(w_gate h2, w_up h2)), h2 = norm(x_mid)
        let mut da = ops.a_zeros(n * f)?;
        ops.linear_dx(&dx, &wl[6], (n, f, ce), &mut da, false)?;
        ops.linear_dw(&dx, &s.a, (n, f, ce), &mut gl[6])?;
        let (dg, du) = ops.swiglu_backward(&s.g, &s.u, &da)?;
        let mut dh2 = ops.a_zeros(n * ce)?;
        ops.linear_dx(&dg, &wl[4], (n, ce, f), &mut dh2, false)?;
        ops.linear_dx(&du, &wl[5], (n, ce, f), &mut dh2, true)?;
        ops.linear_dw(&dg, &s.h2, (n, ce, f), &mut gl[4])?;
        ops.linear_dw(&du, &s.h2, (n, ce, f), &mut gl[5])?;
        let dxn = ops.rmsnorm_backward(&s.x_mid, &s.r2, &dh2, ce)?;
        ops.add(&mut dx, &dxn)?; // dx is now ∂/∂x_mid
                                 // attention: x_mid = x + c_proj(attn(rope(norm(q)), rope(norm(k)), v)), q, k, v from h1 = norm(x)
        let mut dy = ops.a_zeros(n * qd)?;
        ops.linear_dx(&dx, &wl[3], (n, qd, ce), &mut dy, false)?;
        ops.linear_dw(&dx, &s.y, (n, qd, ce), &mut gl[3])?;
        let (mut dq, mut dk, dv) = ops.attention_backward(&dims, &s.q, &s.k, &s.v, &s.y, &s.lse, &dy)?;
        ops.rope(&mut dq, &mut dk, bthk, true)?;
        let dq_raw = ops.rmsnorm_backward(&s.q_raw, &s.rq, &dq, hd)?;
        let dk_raw = ops.rmsnorm_backward(&s.k_raw, &s.rk, &dk, hd)?;
        let mut dh1 = ops.a_zeros(n * ce)?;
        ops.linear_dx(&dq_raw, &wl[0], (n, ce, qd), &mut dh1, false)?;
        ops.linear_dx(&dk_raw, &wl[1], (n, ce, kvd), &mut dh1, true)?;
        ops.linear_dx(&dv, &wl[2], (n, ce, kvd), &mut dh1, true)?;
        ops.linear_dw(&dq_raw, &s.h1, (n, ce, qd), &mut gl[0])?;
        ops.linear_dw(&dk_raw, &s.h1, (n, ce, kvd), &mut gl[1])?;
        ops.linear_dw(&dv, &s.h1, (n, ce, kvd), &mut gl[2])?;
        let dxn = ops.rmsnorm_backward(&s.x, &s.r1, &dh1, ce)?;
        ops.add(&mut dx, &dxn)?; // ∂/∂x (block input)
    }
    let de = ops.rmsnorm_backward(&e, &r0, &dx, ce)?;
    ops.embedding_backward(&de, ce, &dev_ids, &mut grads[0])?;
    Ok(loss)
}
