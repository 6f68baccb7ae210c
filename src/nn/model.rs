//! The dense transformer (docs/model.md has the same math with the tensor names):
//!
//! x₀ = norm(wte[ids])
//! per block: x += c_proj(attn(rope(norm(q)), rope(norm(k)), v)),  q,k,v = c_q,c_k,c_v(norm(x))
//!            x += w_down(silu(w_gate(norm(x))) ∘ w_up(norm(x)))
//! logits = softcap(lm_head(norm(x))),  loss = mean cross-entropy
//! (+ λ/D · Σ_k CE_k of the multi-token prediction modules, `nn::mtp`)
//!
//! Every norm is the parameter-free RMSNorm; q and k are normalized per head (QK-norm).
//! With `attention = "mla"` the q, k, v projection is Multi-head Latent Attention (`nn::mla`).

use super::config::{AttnKind, ModelConfig};
use super::decode::{context_limit, KvCache};
use super::params::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::backend::{AttnDims, Backend, CpuOps, DsaDims, LayerCache, RopeKind, WindowDims};
use crate::memory::{Category, Tracked};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use std::rc::Rc;
use std::sync::Mutex;

/// Which optimizer group a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Token embedding (AdamW, embedding_lr).
    Embedding,
    /// Output projection (AdamW, unembedding_lr).
    Head,
    /// Hidden 2-D matrices inside blocks (Muon, matrix_lr).
    Matrix,
    /// A stack of routed-expert matrices [E, rows, cols] (Muon per expert, matrix_lr).
    Experts,
    /// The MoE router [E, n_embd] (AdamW, unembedding_lr).
    Router,
    /// A vector: a norm's gain (starts at 1) or bias (starts at 0), e.g. the v32 indexer's
    /// k_norm (AdamW, unembedding_lr, no weight decay).
    Vector,
}

impl ParamKind {
    pub fn uses_muon(self) -> bool {
        matches!(self, ParamKind::Matrix | ParamKind::Experts)
    }
}

pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub tensor: Tensor,
}

/// Matrices of one dense block, in checkpoint order.
pub const BLOCK_MATRICES: [&str; 7] =
    ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.w_gate", "mlp.w_up", "mlp.w_down"];

/// Routed-expert load of one MoE layer in the latest forward pass (see `Model::take_moe_loads`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeLoad {
    /// Kept assignments per expert.
    pub counts: Vec<usize>,
    /// Assignments dropped by the capacity limit.
    pub dropped: usize,
    /// Token·K assignments requested.
    pub assignments: usize,
    /// The sequence-wise balance loss (0 when α = 0).
    pub balance_loss: f32,
}

impl MoeLoad {
    /// Adds another micro-batch's load.
    pub fn merge(&mut self, o: &MoeLoad) {
        if self.counts.is_empty() {
            self.counts = vec![0; o.counts.len()];
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.dropped += o.dropped;
        self.assignments += o.assignments;
        self.balance_loss += o.balance_loss;
    }
}

pub struct Model {
    pub config: ModelConfig,
    /// wte, then each block's parameters (`block_param_specs` order), then lm_head, then each
    /// MTP module's projection and block.
    pub params: Vec<Param>,
    /// Activation checkpointing: recompute every n-th block in the backward (0 = off, 1 = all).
    pub checkpoint_every: usize,
    /// Per layer (the MTP modules' blocks after the model's, see [`ModelConfig::mtp_layer`]), the
    /// MoE router's selection bias b [E] (empty for dense FFNs). Not a trained parameter: the
    /// training loop updates it after each step (auxiliary-loss-free balancing).
    pub moe_bias: Vec<Vec<f32>>,
    /// Per layer, the routed load of the latest forward (a recomputed block overwrites its own).
    pub(super) moe_loads: Mutex<Vec<Option<MoeLoad>>>,
    /// DSA layers attend densely (the indexer's warm-up); the training loop sets it per step.
    pub dsa_dense_warmup: bool,
    /// Per layer, the indexer's KL loss in the latest forward (DSA layers).
    indexer_losses: Mutex<Vec<Option<f32>>>,
    /// λ of the MTP losses for the current step (the training loop follows the schedule).
    pub mtp_lambda_now: f32,
    /// Per MTP depth, its cross-entropy in the latest training forward.
    pub(super) mtp_losses: Mutex<Vec<Option<f32>>>,
    /// Index in `params` of each block's first parameter, plus one past the last block; then,
    /// per MTP module, the index of its projection (its block's parameters follow), plus the end.
    block_start: Vec<usize>,
    /// The CPU backend for this config (its RoPE tables), for forward passes on the host.
    cpu: CpuOps,
    _memory: Tracked,
}

impl Model {
    /// Initialization (docs/model.md): wte ~ N(0, 1); c_q, c_k, c_v, w_gate, w_up (dense, shared
    /// and routed experts), the router and MLA's projections ~ N(0, 1/fan_in) (fan_in = n_embd,
    /// or the latent rank for wq_b and wkv_b); c_proj and every w_down = 0 (each block
    /// starts as the identity); lm_head ~ N(0, 0.001²); routing biases 0.
    pub fn new(config: &ModelConfig, seed: u64) -> Result<Model> {
        config.validate()?;
        let c = config;
        let mut rng = Rng::derive(seed, "init");
        let mut params = Vec::new();
        let mut add = |name: String, kind, t| params.push(Param { name, kind, tensor: t });
        add("wte.weight".into(), ParamKind::Embedding, Tensor::randn(&[c.vocab_size, c.n_embd], 1.0, &mut rng));
        // N(0, 1/fan_in), fan_in the last dim (n_embd, or MLA's latent ranks for wq_b and wkv_b)
        let draw = |shape: &[usize], zero: bool, rng: &mut Rng| Self::init(&ParamSpec::matrix(shape, zero), rng);
        for l in 0..c.n_layer {
            for p in Self::block_param_specs(c, l) {
                add(format!("blocks.{l}.{}", p.tensor_name()), p.kind, Self::init(&p, &mut rng));
            }
        }
        add("lm_head.weight".into(), ParamKind::Head, Tensor::randn(&[c.vocab_size, c.n_embd], 0.001, &mut rng));
        // MTP modules last, so the main model's draws do not depend on mtp_depth.
        for k in 1..=c.mtp_depth {
            add(format!("mtp.{k}.proj.weight"), ParamKind::Matrix, draw(&[c.n_embd, 2 * c.n_embd], false, &mut rng));
            for p in Self::block_param_specs(c, c.mtp_layer(k)) {
                add(format!("mtp.{k}.block.{}", p.tensor_name()), p.kind, Self::init(&p, &mut rng));
            }
        }
        Ok(Model::from_params(config.clone(), params))
    }

    /// A block parameter's initial value: zero, a norm's gain of ones (`ParamKind::Vector`), or
    /// N(0, 1/fan_in) with fan_in the last dim.
    fn init(p: &ParamSpec, rng: &mut Rng) -> Tensor {
        match (p.zero, p.kind) {
            (true, _) => Tensor::zeros(&p.shape),
            (false, ParamKind::Vector) => Tensor { shape: p.shape.clone(), data: vec![1.0; p.shape.iter().product()] },
            (false, _) => Tensor::randn(&p.shape, 1.0 / (p.shape[p.shape.len() - 1] as f32).sqrt(), rng),
        }
    }

    /// Assembles a model from parameters in checkpoint order (shapes are trusted; see `expected_shapes`).
    /// Routing biases start at 0 (a checkpoint loader sets them afterwards).
    pub fn from_params(config: ModelConfig, params: Vec<Param>) -> Model {
        let floats = params.iter().map(|p| p.tensor.numel()).sum();
        let mut block_start = vec![1];
        for l in 0..config.n_layer {
            block_start.push(block_start[l] + Self::block_param_specs(&config, l).len());
        }
        // lm_head, then per MTP module its projection and block
        for k in 1..=config.mtp_depth {
            let start = block_start[block_start.len() - 1];
            let n = if k == 1 { 1 } else { 1 + Self::block_param_specs(&config, config.mtp_layer(k - 1)).len() };
            block_start.push(start + n);
        }
        if config.mtp_depth > 0 {
            let start = block_start[block_start.len() - 1];
            block_start.push(start + 1 + Self::block_param_specs(&config, config.mtp_layer(config.mtp_depth)).len());
        }
        let layers = config.n_layer + config.mtp_depth;
        let moe_bias = (0..layers)
            .map(|l| if config.is_moe_layer(l) { vec![0.0; config.moe.n_routed_experts] } else { Vec::new() })
            .collect();
        let moe_loads = Mutex::new(vec![None; layers]);
        let indexer_losses = Mutex::new(vec![None; layers]);
        let mtp_losses = Mutex::new(vec![None; config.mtp_depth]);
        let mtp_lambda_now = config.mtp_lambda;
        let cpu = CpuOps::new(&config);
        let memory = Tracked::floats(Category::Parameters, floats);
        Model {
            config,
            params,
            checkpoint_every: 0,
            moe_bias,
            moe_loads,
            dsa_dense_warmup: false,
            indexer_losses,
            mtp_lambda_now,
            mtp_losses,
            block_start,
            cpu,
            _memory: memory,
        }
    }

    /// The routed load of each MoE layer in the latest forward (None for dense layers), clearing it.
    pub fn take_moe_loads(&self) -> Vec<Option<MoeLoad>> {
        let mut loads = self.moe_loads.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *loads, vec![None; self.n_layers_all()])
    }

    /// Layers including the MTP modules' blocks.
    pub fn n_layers_all(&self) -> usize {
        self.config.n_layer + self.config.mtp_depth
    }

    /// Index in `params` of lm_head.
    pub fn head_index(&self) -> usize {
        self.block_start[self.config.n_layer]
    }

    /// The parameters of MTP module k (1-based): its projection, then its block's.
    pub(super) fn mtp_params<'a>(&self, pv: &'a [Var], k: usize) -> (Var, &'a [Var]) {
        let (start, end) = (self.block_start[self.config.n_layer + k], self.block_start[self.config.n_layer + k + 1]);
        (pv[start], &pv[start + 1..end])
    }

    /// The indexer KL loss of each DSA layer in the latest forward (None elsewhere), clearing it.
    pub fn take_indexer_losses(&self) -> Vec<Option<f32>> {
        let mut losses = self.indexer_losses.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *losses, vec![None; self.n_layers_all()])
    }

    /// Auxiliary-loss-free balancing after an optimizer step: each MoE layer's bias moves by
    /// ∓γ for experts above/below the mean load of the step (`loads` from `take_moe_loads`, summed).
    pub fn update_moe_bias(&mut self, loads: &[Option<MoeLoad>]) {
        let gamma = self.config.moe.bias_update_speed;
        for (bias, load) in self.moe_bias.iter_mut().zip(loads) {
            if let (Some(load), false) = (load, bias.is_empty()) {
                crate::backend::update_bias(bias, &load.counts, gamma);
            }
        }
    }

    /// A parameter by its checkpoint name (e.g. `blocks.0.attn.c_q.weight`).
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|p| p.name == name).map(|p| &p.tensor)
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }

    /// Every id must be < vocab_size; the error names the first bad one.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.config.vocab_size) {
            bail!("token id {id} at position {pos} is out of range for vocab_size {}", self.config.vocab_size);
        }
        Ok(())
    }

    /// The CPU backend of this model's config (RoPE tables), for tapes on the host.
    pub fn cpu(&self) -> &CpuOps {
        &self.cpu
    }

    /// Index in `params` of each block's first parameter, plus one past the last block (the
    /// index of lm_head).
    pub fn block_start(&self) -> &[usize] {
        &self.block_start[..=self.config.n_layer]
    }

    /// Puts every parameter on a CPU tape (in `params` order, slot i for parameter i) and
    /// returns their handles.
    pub fn params_on<'p>(&'p self, tape: &mut Tape<'p, CpuOps>) -> Vec<Var> {
        self.params.iter().map(|p| tape.param(&p.tensor)).collect()
    }

    /// Raw logits [b·t, vocab] (before the softcap, which the loss applies) for `ids` viewed as
    /// [b, t], on any backend. `pv` are the parameters' handles in `params` order (the embedding
    /// table readable as f32, the rest as GEMM operands).
    pub fn logits<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        let x = self.hidden(tape, pv, ids, b, t)?;
        self.head(tape, pv, x)
    }

    /// Raw logits lm_head(norm(x)) of hidden rows x [n, n_embd] (the softcap is the loss's).
    pub fn head<'p, B: Backend>(&'p self, tape: &mut Tape<'p, B>, pv: &[Var], x: Var) -> Result<Var> {
        let x = tape.rmsnorm(x, self.config.n_embd)?;
        tape.linear(x, pv[self.head_index()])
    }

    /// The last block's output rows [b·t, n_embd] (before the final norm) for `ids` viewed as
    /// [b, t]: what the head and the first MTP module read.
    pub fn hidden<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        let c = &self.config;
        if ids.len() != b * t {
            bail!("forward: {} ids do not form a [{b}, {t}] batch", ids.len());
        }
        if t > c.max_seq_len {
            bail!("forward: sequence length {t} exceeds max_seq_len {}", c.max_seq_len);
        }
        self.check_ids(ids)?;
        let x = tape.embedding(pv[0], ids)?;
        let mut x = tape.rmsnorm(x, c.n_embd)?;
        for l in 0..c.n_layer {
            let w = &pv[self.block_start[l]..self.block_start[l + 1]];
            x = self.block_or_checkpoint(tape, l, x, w, b, t)?;
        }
        Ok(x)
    }

    /// [`Self::block`] on a training forward, recomputed in the backward when activation
    /// checkpointing covers layer `l` (every `checkpoint_every`-th layer, counting the MTP blocks).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_or_checkpoint<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        x: Var,
        w: &[Var],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        if self.checkpoint_every > 0 && l % self.checkpoint_every == 0 {
            let inputs: Vec<Var> = std::iter::once(x).chain(w.iter().copied()).collect();
            let f = move |tp: &mut Tape<'p, B>, v: &[Var]| self.block(tp, l, v[0], &v[1..], b, t, None);
            tape.checkpoint(&inputs, Rc::new(f))
        } else {
            self.block(tape, l, x, w, b, t, None)
        }
    }

    /// Raw logits (before the softcap) of `ids`, one sequence continuing the one `cache` holds:
    /// the same layers as [`Model::logits`], the rows at positions `cache.len()..`, attention over
    /// the cached keys too; appends every layer's new keys and values (`nn::decode`). All rows'
    /// logits `[n, vocab]`, or the last row's `[1, vocab]`. Runs on a `Tape::inference` tape.
    pub fn logits_cached<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        ids: &[u32],
        cache: &mut KvCache,
        all_rows: bool,
    ) -> Result<Var> {
        let x = self.hidden_cached(tape, pv, ids, cache)?;
        let x = if all_rows { x } else { tape.last_rows(x, 1)? };
        self.head(tape, pv, x)
    }

    /// The last block's output rows [n, n_embd] (before the final norm) of `ids`, one sequence
    /// continuing the one `cache` holds (as [`Self::logits_cached`], which applies the head).
    pub fn hidden_cached<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        ids: &[u32],
        cache: &mut KvCache,
    ) -> Result<Var> {
        let (c, n, p0) = (&self.config, ids.len(), cache.len());
        ensure!(n > 0, "decode: no tokens to process");
        self.check_ids(ids)?;
        if let Some(limit) = context_limit(c) {
            if p0 + n > limit {
                bail!(
                    "context full: {p0} cached + {n} new positions exceed max_seq_len {limit} (a model with dense \
                     layers cannot attend beyond its training context; shift the context and prefill again)"
                );
            }
        }
        let x = tape.embedding(pv[0], ids)?;
        let mut x = tape.rmsnorm(x, c.n_embd)?;
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            let w = &pv[self.block_start[l]..self.block_start[l + 1]];
            x = self.block(tape, l, x, w, 1, n, Some(layer))?;
        }
        cache.advance(n);
        Ok(x)
    }

    /// One block on x [b·t, n_embd] with its parameters `w` (`block_param_specs` order). With a
    /// `cache` (one sequence, b = 1), the rows are positions `cache.len()..` and attention also
    /// sees the cached keys; the new keys and values are appended (inference only).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        x: Var,
        w: &[Var],
        b: usize,
        t: usize,
        mut cache: Option<&mut LayerCache>,
    ) -> Result<Var> {
        let c = &self.config;
        let (h_kv, d, dv) = c.attn_heads();
        let dims = AttnDims { b, t, h: c.n_head, h_kv, d };
        let p0 = cache.as_ref().map(|c| c.len());
        let na = c.n_attn_params(); // the attention's parameters, c_proj last
        let h = tape.rmsnorm(x, c.n_embd)?;
        if let (true, Some(layer)) = (c.is_mla(), cache.as_deref_mut()) {
            // MLA with a cache: the latent cache and absorbed up-projections (`nn::mla_decode`)
            let y = self.mla_attention_cached(tape, l, h, w, layer)?;
            let x = tape.linear_residual(y, w[na - 1], x)?;
            return self.block_ffn(tape, l, x, w, b, t);
        }
        // the projection: GQA's, or MLA's (`nn::mla`; training and uncached forwards)
        // `q_src`: what the lightning indexer's query reads (h, or MLA's normalized query latent)
        let (q, k, v, q_src) = if c.is_mla() {
            let (q, k, v, q_latent) = self.mla_qkv(tape, h, &w[..na - 1], (b, t))?;
            (q, k, v, q_latent.unwrap_or(h))
        } else {
            let (q, k, v) = self.gqa_qkv(tape, h, &w[..3], (b, t), p0)?;
            (q, k, v, h)
        };
        let y = match c.attn_kind(l) {
            AttnKind::Dense | AttnKind::Window if cache.is_some() => {
                tape.attention_cached(q, k, v, dims, cache.as_deref_mut().expect("checked"))?
            }
            AttnKind::Dense => tape.attention(q, k, v, dims)?,
            AttnKind::Window => {
                let (window, n_global) = (c.dsa_window_size, c.n_global);
                let wd = WindowDims { b, t, h: c.n_head, h_kv, d, window, n_global };
                tape.window_attention(q, k, v, wd)?
            }
            AttnKind::Sparse => {
                let iw = &w[w.len() - c.n_indexer_params(l)..];
                self.sparse_attention(tape, l, (h, q_src), (q, k, v), iw, (b, t), cache)?
            }
        };
        // MLA's heads [n, H, d_v] side by side for c_proj
        let y = if c.is_mla() { tape.reshape(y, &[b * t, c.n_head * dv])? } else { y };
        // x + c_proj(y): the residual add in the projection's epilogue.
        let x = tape.linear_residual(y, w[na - 1], x)?;
        self.block_ffn(tape, l, x, w, b, t)
    }

    /// Grouped-query attention's q [n, H·d], k, v [n, Hkv·d] from h = norm(x) with c_q, c_k, c_v:
    /// QK-norm per head, then RoPE (RoPE preserves the norm, so the order is immaterial), one fused
    /// op each for training; a cached forward (`p0`: the cached length) rotates at the cached
    /// positions instead.
    fn gqa_qkv<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        w: &[Var],
        (b, t): (usize, usize),
        p0: Option<usize>,
    ) -> Result<(Var, Var, Var)> {
        let c = &self.config;
        let q = tape.linear(h, w[0])?;
        let k = tape.linear(h, w[1])?;
        let v = tape.linear(h, w[2])?;
        let (q, k) = match p0 {
            None => (tape.qk_norm_rope(q, (b, t, c.n_head))?, tape.qk_norm_rope(k, (b, t, c.n_kv_head))?),
            Some(_) => {
                let (q, k) = (tape.rmsnorm(q, c.head_dim)?, tape.rmsnorm(k, c.head_dim)?);
                let q = tape.rope_at(q, (b, t, c.n_head), RopeKind::Attention, p0)?;
                (q, tape.rope_at(k, (b, t, c.n_kv_head), RopeKind::Attention, p0)?)
            }
        };
        Ok((q, k, v))
    }

    /// The shapes of layer attention calls on a [b, t] batch for DSA.
    pub fn dsa_dims(&self, b: usize, t: usize) -> DsaDims {
        let c = &self.config;
        let (h_kv, d, _) = c.attn_heads();
        DsaDims {
            b,
            t,
            h: c.n_head,
            h_kv,
            d,
            n_index_heads: c.index_n_heads,
            index_dim: c.index_head_dim,
            topk: c.index_topk,
            window: c.index_local_window,
        }
    }

    /// DeepSeek Sparse Attention: the lightning indexer (`nn::indexer`'s `indexer_qkw`, on detached inputs) scores
    /// earlier keys, and each query attends to its top-k; the indexer learns from the KL to the
    /// attention distribution (an aux loss). `(h, q_src)`: the block's normalized input and what the
    /// indexer's query reads; `w` = the indexer's parameters. With a `cache`, the indexer scores
    /// the cached keys too (no KL loss).
    #[allow(clippy::too_many_arguments)]
    fn sparse_attention<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        (h, q_src): (Var, Var),
        qkv: (Var, Var, Var),
        w: &[Var],
        (b, t): (usize, usize),
        cache: Option<&mut LayerCache>,
    ) -> Result<Var> {
        let p0 = cache.as_ref().map(|c| c.len());
        let (qi, ki, wi) = self.indexer_qkw(tape, h, q_src, w, (b, t), p0)?;
        let c = &self.config;
        let dims = self.dsa_dims(b, t);
        if let Some(cache) = cache {
            return tape.dsa_attention_cached(qkv, (qi, ki, wi), dims, self.dsa_dense_warmup, cache);
        }
        let (y, sel, lse) = tape.dsa_attention(qkv, (qi, ki, wi), dims, self.dsa_dense_warmup)?;
        if tape.aux_enabled() {
            // an MTP module's indexer loss is weighted as its cross-entropy (λ/D)
            let weight = if l < c.n_layer { 1.0 } else { self.mtp_weight() };
            let (kl, value) = tape.indexer_kl((qkv.0, qkv.1), &lse, (qi, ki, wi), sel.as_deref(), dims, weight)?;
            self.indexer_losses.lock().unwrap_or_else(|e| e.into_inner())[l] = Some(value);
            tape.add_aux_loss(kl);
        }
        Ok(y)
    }

    /// Mean cross-entropy of predicting `targets` (−1 = ignore) from `ids`, both [b, t].
    pub fn loss<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        ids: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        if targets.len() != ids.len() {
            bail!("loss: {} targets for {} ids", targets.len(), ids.len());
        }
        if let Some(&bad) = targets.iter().find(|&&y| y >= 0 && y as usize >= self.config.vocab_size) {
            bail!("target token id {bad} is out of range for vocab_size {}", self.config.vocab_size);
        }
        let h = self.hidden(tape, pv, ids, b, t)?;
        let logits = self.head(tape, pv, h)?;
        let loss = tape.cross_entropy(logits, targets, self.config.logit_softcap)?.0;
        if self.config.mtp_depth > 0 && tape.aux_enabled() {
            self.mtp_losses(tape, pv, h, ids, targets, (b, t))?;
        }
        Ok(loss)
    }

    /// Softcapped logits of the last position of a single sequence (for sampling).
    pub fn next_token_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len().min(self.config.max_seq_len);
        let ids = &ids[ids.len() - t..];
        let mut tape = Tape::inference(&self.cpu);
        let pv = self.params_on(&mut tape);
        let logits = self.logits(&mut tape, &pv, ids, 1, t)?;
        let v = self.config.vocab_size;
        let cap = self.config.logit_softcap;
        let last = &tape.value(logits)[(t - 1) * v..t * v];
        Ok(last.iter().map(|&z| if cap > 0.0 { cap * crate::backend::math::tanh(z / cap) } else { z }).collect())
    }
}
