//! The dense transformer (docs/model.md has the same math with the tensor names):
//!
//! x₀ = norm(wte[ids])
//! per block: x += c_proj(attn(rope(norm(q)), rope(norm(k)), v)),  q,k,v = c_q,c_k,c_v(norm(x))
//!            x += w_down(silu(w_gate(norm(x))) ∘ w_up(norm(x)))
//! logits = softcap(lm_head(norm(x))),  loss = mean cross-entropy
//!
//! Every norm is the parameter-free RMSNorm; q and k are normalized per head (QK-norm).

use super::config::{AttnKind, ModelConfig};
use crate::autograd::{Tape, Var};
use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cpu::window_attention::WindowDims;
use crate::memory::{Category, Tracked};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::rc::Rc;
use std::sync::Arc;

/// Which optimizer group a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Token embedding (AdamW, embedding_lr).
    Embedding,
    /// Output projection (AdamW, unembedding_lr).
    Head,
    /// Hidden 2-D matrices inside blocks (Muon, matrix_lr).
    Matrix,
}

pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub tensor: Tensor,
}

/// Matrices of one block, in checkpoint order.
pub const BLOCK_MATRICES: [&str; 7] =
    ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.w_gate", "mlp.w_up", "mlp.w_down"];

pub struct Model {
    pub config: ModelConfig,
    /// wte, then 7 matrices per block (BLOCK_MATRICES order), then lm_head.
    pub params: Vec<Param>,
    /// Activation checkpointing: recompute every n-th block in the backward (0 = off, 1 = all).
    pub checkpoint_every: usize,
    rope: Arc<RopeTable>,
    _memory: Tracked,
}

impl Model {
    /// Initialization (docs/model.md): wte ~ N(0, 1); c_q, c_k, c_v, w_gate, w_up ~ N(0, 1/n_embd);
    /// c_proj and w_down = 0 (each block starts as the identity); lm_head ~ N(0, 0.001²).
    pub fn new(config: &ModelConfig, seed: u64) -> Result<Model> {
        config.validate()?;
        let c = config;
        let mut rng = Rng::derive(seed, "init");
        let mut params = Vec::new();
        let mut add = |name: String, kind, t| params.push(Param { name, kind, tensor: t });
        add("wte.weight".into(), ParamKind::Embedding, Tensor::randn(&[c.vocab_size, c.n_embd], 1.0, &mut rng));
        let std = 1.0 / (c.n_embd as f32).sqrt();
        for l in 0..c.n_layer {
            for name in BLOCK_MATRICES {
                let shape = Self::matrix_shape(c, name);
                let t = if name.ends_with("c_proj") || name.ends_with("w_down") {
                    Tensor::zeros(&shape)
                } else {
                    Tensor::randn(&shape, std, &mut rng)
                };
                add(format!("blocks.{l}.{name}.weight"), ParamKind::Matrix, t);
            }
        }
        add("lm_head.weight".into(), ParamKind::Head, Tensor::randn(&[c.vocab_size, c.n_embd], 0.001, &mut rng));
        Ok(Model::from_params(config.clone(), params))
    }

    /// Assembles a model from parameters in checkpoint order (shapes are trusted; see `expected_shapes`).
    pub fn from_params(config: ModelConfig, params: Vec<Param>) -> Model {
        let rope = Arc::new(RopeTable::new(config.head_dim, config.max_seq_len, config.rope_theta));
        let floats = params.iter().map(|p| p.tensor.numel()).sum();
        Model { config, params, checkpoint_every: 0, rope, _memory: Tracked::floats(Category::Parameters, floats) }
    }

    /// [out, in] shape of a block matrix.
    fn matrix_shape(c: &ModelConfig, name: &str) -> Vec<usize> {
        match name {
            "attn.c_q" => vec![c.q_dim(), c.n_embd],
            "attn.c_k" | "attn.c_v" => vec![c.kv_dim(), c.n_embd],
            "attn.c_proj" => vec![c.n_embd, c.q_dim()],
            "mlp.w_gate" | "mlp.w_up" => vec![c.ffn_hidden, c.n_embd],
            "mlp.w_down" => vec![c.n_embd, c.ffn_hidden],
            _ => unreachable!("unknown block matrix {name}"),
        }
    }

    /// Every parameter's name, kind and shape, in checkpoint order.
    pub fn expected_shapes(c: &ModelConfig) -> Vec<(String, ParamKind, Vec<usize>)> {
        let mut v = vec![("wte.weight".to_string(), ParamKind::Embedding, vec![c.vocab_size, c.n_embd])];
        for l in 0..c.n_layer {
            for name in BLOCK_MATRICES {
                v.push((format!("blocks.{l}.{name}.weight"), ParamKind::Matrix, Self::matrix_shape(c, name)));
            }
        }
        v.push(("lm_head.weight".to_string(), ParamKind::Head, vec![c.vocab_size, c.n_embd]));
        v
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

    /// Puts every parameter on the tape (in `params` order) and returns their handles.
    pub fn params_on<'p>(&'p self, tape: &mut Tape<'p>) -> Vec<Var> {
        self.params.iter().map(|p| tape.param(&p.tensor)).collect()
    }

    /// Raw logits [b·t, vocab] (before the softcap, which the loss applies)
    /// for `ids` viewed as [b, t]. `pv` are the handles from `params_on`.
    pub fn logits<'p>(&'p self, tape: &mut Tape<'p>, pv: &[Var], ids: &[u32], b: usize, t: usize) -> Result<Var> {
        let c = &self.config;
        if ids.len() != b * t {
            bail!("forward: {} ids do not form a [{b}, {t}] batch", ids.len());
        }
        if t > c.max_seq_len {
            bail!("forward: sequence length {t} exceeds max_seq_len {}", c.max_seq_len);
        }
        self.check_ids(ids)?;
        let x = tape.embedding(pv[0], ids);
        let mut x = tape.rmsnorm(x, c.n_embd);
        for l in 0..c.n_layer {
            let w = &pv[1 + 7 * l..1 + 7 * (l + 1)];
            x = if self.checkpoint_every > 0 && l % self.checkpoint_every == 0 {
                let inputs: Vec<Var> = std::iter::once(x).chain(w.iter().copied()).collect();
                tape.checkpoint(
                    &inputs,
                    Rc::new(move |tp: &mut Tape<'p>, v: &[Var]| self.block(tp, l, v[0], &v[1..], b, t)),
                )
            } else {
                self.block(tape, l, x, w, b, t)
            };
        }
        let x = tape.rmsnorm(x, c.n_embd);
        Ok(tape.linear(x, pv[pv.len() - 1]))
    }

    /// One block on x [b·t, n_embd] with its 7 matrices `w` (BLOCK_MATRICES order).
    fn block<'p>(&'p self, tape: &mut Tape<'p>, l: usize, x: Var, w: &[Var], b: usize, t: usize) -> Var {
        let c = &self.config;
        let dims = AttnDims { b, t, h: c.n_head, h_kv: c.n_kv_head, d: c.head_dim };
        let h = tape.rmsnorm(x, c.n_embd);
        let q = tape.linear(h, w[0]);
        let k = tape.linear(h, w[1]);
        let v = tape.linear(h, w[2]);
        // QK-norm per head, then RoPE (RoPE preserves the norm, so the order is immaterial).
        let q = tape.rmsnorm(q, c.head_dim);
        let k = tape.rmsnorm(k, c.head_dim);
        let q = tape.rope(q, b, t, c.n_head, &self.rope);
        let k = tape.rope(k, b, t, c.n_kv_head, &self.rope);
        let y = match c.attn_kind(l) {
            AttnKind::Dense => tape.attention(q, k, v, dims),
            AttnKind::Window => {
                let (window, n_global) = (c.dsa_window_size, c.n_global);
                let wd = WindowDims { b, t, h: c.n_head, h_kv: c.n_kv_head, d: c.head_dim, window, n_global };
                tape.window_attention(q, k, v, wd)
            }
        };
        let y = tape.linear(y, w[3]);
        let x = tape.add(x, y);
        let h = tape.rmsnorm(x, c.n_embd);
        let g = tape.linear(h, w[4]);
        let u = tape.linear(h, w[5]);
        let a = tape.swiglu(g, u);
        let y = tape.linear(a, w[6]);
        tape.add(x, y)
    }

    /// Mean cross-entropy of predicting `targets` (−1 = ignore) from `ids`, both [b, t].
    pub fn loss<'p>(
        &'p self,
        tape: &mut Tape<'p>,
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
        let logits = self.logits(tape, pv, ids, b, t)?;
        Ok(tape.cross_entropy(logits, targets, self.config.logit_softcap).0)
    }

    /// Softcapped logits of the last position of a single sequence (for sampling).
    pub fn next_token_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len().min(self.config.max_seq_len);
        let ids = &ids[ids.len() - t..];
        let mut tape = Tape::new();
        let pv = self.params_on(&mut tape);
        let logits = self.logits(&mut tape, &pv, ids, 1, t)?;
        let v = self.config.vocab_size;
        let cap = self.config.logit_softcap;
        let last = &tape.value(logits)[(t - 1) * v..t * v];
        Ok(last.iter().map(|&z| if cap > 0.0 { cap * crate::backend::cpu::math::tanh(z / cap) } else { z }).collect())
    }
}
