//! Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1): the attention projection of
//! a layer when `attention = "mla"` (docs/model.md, "Multi-head Latent Attention"). With h the
//! block's normalized input [n, C], H heads, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim,
//! d_v = v_head_dim, r_q = q_lora_rank, r_kv = kv_lora_rank:
//!
//! ```text
//! q            = wq_b · norm(wq_a · h)          (r_q > 0)   or   wq · h    [n, H·(d_n + d_r)]
//! [c_kv ; k_r] = wkv_a · h                                                 [n, r_kv + d_r]
//! [k_n ; v]    = wkv_b · norm(c_kv)   per head                             [n, H·(d_n + d_v)]
//! q_h = [q_n,h ; RoPE(q_r,h)]    k_h = [k_n,h ; RoPE(k_r)]   (one rotary key shared by all heads)
//! o_h = softmax(q_h·k_hᵀ / sqrt(d_n + d_r)) · v_h      (causal, window or DSA: the layer's kind)
//! x  += c_proj · [o_1 … o_H]                                               c_proj [C, H·d_v]
//! ```
//!
//! The norms are this model's parameter-free RMSNorm (DeepSeek's carry learned weights). There is
//! no QK-norm: the latents are normalized instead. The ops are the tape's column ops (slice,
//! concatenate per head, repeat the shared rotary key) around the existing linear, RMSNorm, RoPE
//! and attention ops, so MLA needs no kernel of its own; the attention kernels take the value
//! width d_v ≠ d_qk. Cached decoding keeps only `[norm(c_kv) ; RoPE(k_r)]` per position and
//! absorbs wkv_b into the query and the output (`nn::mla_decode`).

use super::config::ModelConfig;
use super::model::{Model, ParamKind};
use super::params::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::backend::{Backend, RopeKind};
use anyhow::{bail, Result};

pub(super) fn default_attention() -> String {
    "gqa".into()
}

impl ModelConfig {
    /// Whether the layers use Multi-head Latent Attention (`attention = "mla"`).
    pub fn is_mla(&self) -> bool {
        self.attention == "mla"
    }

    /// The attention kernels' head shapes: (key/value heads, query/key width, value width) —
    /// (n_kv_head, head_dim, head_dim) for GQA; (n_head, d_n + d_r, d_v) for MLA.
    pub fn attn_heads(&self) -> (usize, usize, usize) {
        if self.is_mla() {
            (self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim)
        } else {
            (self.n_kv_head, self.head_dim, self.head_dim)
        }
    }

    /// Width of the attention RoPE table: head_dim (GQA), qk_rope_head_dim (MLA).
    pub fn rope_dim(&self) -> usize {
        if self.is_mla() {
            self.qk_rope_head_dim
        } else {
            self.head_dim
        }
    }

    /// Attention parameters of a block (c_proj last): 4 for GQA (c_q, c_k, c_v, c_proj); for MLA
    /// 5 with a query latent (wq_a, wq_b, wkv_a, wkv_b, c_proj), else 4 (wq, …).
    pub fn n_attn_params(&self) -> usize {
        if self.is_mla() && self.q_lora_rank > 0 {
            5
        } else {
            4
        }
    }

    /// Fills MLA's widths left at 0 (when `attention = "mla"`): d_n = d_v = head_dim,
    /// d_r = head_dim / 2 (even), r_kv = 4·head_dim (DeepSeek-V3: 128, 64, 128 and 512).
    pub fn derive_mla_dims(&mut self) {
        if !self.is_mla() {
            return;
        }
        let hd = self.head_dim;
        for (field, value) in [
            (&mut self.qk_nope_head_dim, hd),
            (&mut self.qk_rope_head_dim, (hd / 2).max(2) / 2 * 2),
            (&mut self.v_head_dim, hd),
            (&mut self.kv_lora_rank, 4 * hd),
        ] {
            if *field == 0 {
                *field = value;
            }
        }
    }

    pub(super) fn validate_mla(&self) -> Result<()> {
        if self.attention != "gqa" && self.attention != "mla" {
            bail!("config: attention must be \"gqa\" or \"mla\", got \"{}\"", self.attention);
        }
        if !self.is_mla() {
            return Ok(());
        }
        for (name, v) in [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                bail!("config: {name} must be positive for MLA (attention = \"mla\")");
            }
            if v > 1 << 12 {
                bail!("config: {name} = {v} is above the supported maximum {}", 1 << 12);
            }
        }
        if self.q_lora_rank > 1 << 16 {
            bail!("config: q_lora_rank = {} is above the supported maximum {}", self.q_lora_rank, 1 << 16);
        }
        if self.qk_rope_head_dim % 2 != 0 {
            bail!("config: qk_rope_head_dim ({}) must be even for rotary embeddings", self.qk_rope_head_dim);
        }
        Ok(())
    }

    /// Floats per token the tape keeps for an MLA projection and its attention (`Model::mla_qkv`
    /// op by op, then the attention's output and log-sum-exp and the reshaped output), in place
    /// of GQA's q, k, v, their QK-norm and the attention (`info::predict_training_bytes`).
    pub fn mla_activations_per_token(&self) -> usize {
        let h = self.n_head;
        let (dn, dr, dv, rq, rkv) =
            (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.q_lora_rank, self.kv_lora_rank);
        let dqk = dn + dr;
        // q: the query latent and its norm (+ rstd); q, its reshape, the two slices, RoPE, concat
        let q = if rq > 0 { 2 * rq + 1 } else { 0 } + 3 * h * dqk + h * dn + 2 * h * dr;
        // [c_kv ; k_pe], c_kv's slice and norm (+ rstd), k_pe's slice and RoPE
        let kv_a = (rkv + dr) + 2 * rkv + 1 + 2 * dr;
        // wkv_b's product and reshape, k_nope, v, the repeated k_pe, the concatenated k
        let kv = 2 * h * (dn + dv) + h * dn + h * dv + h * dr + h * dqk;
        // the attention's output (+ lse) and its reshape for c_proj
        let attn = 2 * h * dv + h;
        q + kv_a + kv + attn
    }

    /// Attention parameters of one MLA block (see [`Model::mla_param_specs`]).
    pub fn mla_attn_params(&self) -> usize {
        let (c, h) = (self.n_embd, self.n_head);
        let (dn, dr, dv, rq, rkv) =
            (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.q_lora_rank, self.kv_lora_rank);
        let q = if rq > 0 { rq * c + h * (dn + dr) * rq } else { h * (dn + dr) * c };
        q + (rkv + dr) * c + h * (dn + dv) * rkv + c * h * dv
    }
}

impl Model {
    /// MLA's attention parameters in checkpoint order: `attn.wq_a [r_q, C]`, `attn.wq_b
    /// [H·(d_n + d_r), r_q]` (or `attn.wq [H·(d_n + d_r), C]` when r_q = 0), `attn.wkv_a
    /// [r_kv + d_r, C]`, `attn.wkv_b [H·(d_n + d_v), r_kv]`, `attn.c_proj [C, H·d_v]` (zero).
    /// All are hidden matrices (Muon).
    pub(super) fn mla_param_specs(c: &ModelConfig) -> Vec<ParamSpec> {
        let mx = ParamKind::Matrix;
        let spec = |name, shape: Vec<usize>, zero| ParamSpec { name, kind: mx, shape, zero };
        let (ce, h) = (c.n_embd, c.n_head);
        let (dn, dr, dv, rq, rkv) =
            (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank, c.kv_lora_rank);
        let mut v = if rq > 0 {
            vec![spec("attn.wq_a", vec![rq, ce], false), spec("attn.wq_b", vec![h * (dn + dr), rq], false)]
        } else {
            vec![spec("attn.wq", vec![h * (dn + dr), ce], false)]
        };
        v.push(spec("attn.wkv_a", vec![rkv + dr, ce], false));
        v.push(spec("attn.wkv_b", vec![h * (dn + dv), rkv], false));
        v.push(spec("attn.c_proj", vec![ce, h * dv], true));
        v
    }

    /// Queries `[n, H, d_n + d_r]`, keys `[n, H, d_n + d_r]` and values `[n, H, d_v]` of an MLA
    /// layer (module doc) from h = norm(x) `[n, C]` of a `[b, t]` batch, and the normalized query
    /// latent `[n, r_q]` (None when r_q = 0); `w` = the projections before c_proj, in checkpoint
    /// order.
    pub(super) fn mla_qkv<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        w: &[Var],
        (b, t): (usize, usize),
    ) -> Result<(Var, Var, Var, Option<Var>)> {
        let c = &self.config;
        let (n, nh) = (b * t, c.n_head);
        let (dn, dv) = (c.qk_nope_head_dim, c.v_head_dim);
        let (q_nope, q_pe, q_latent) = self.mla_query(tape, h, w, (b, t), None)?;
        let q = tape.concat_cols(q_nope, q_pe)?;
        let (wkv_a, wkv_b) = (w[w.len() - 2], w[w.len() - 1]);
        let (c_kv, k_pe) = self.mla_latent(tape, h, wkv_a, (b, t), None)?;
        // per head: [k_nope ; v] from the latent, k = [k_nope ; k_pe]
        let kv = tape.linear(c_kv, wkv_b)?;
        let kv = tape.reshape(kv, &[n, nh, dn + dv])?;
        let k_nope = tape.slice_cols(kv, 0, dn)?;
        let v = tape.slice_cols(kv, dn, dv)?;
        let k_pe = tape.repeat_heads(k_pe, nh)?;
        let k = tape.concat_cols(k_nope, k_pe)?;
        Ok((q, k, v, q_latent))
    }

    /// MLA's query from h `[n, C]` of a `[b, t]` batch, per head: q_nope `[n, H, d_n]` and the
    /// rotated q_pe `[n, H, d_r]` (RoPE at positions `p0..` when decoding), with the normalized
    /// query latent `[n, r_q]` (None when r_q = 0); `w` = the projections before c_proj. Training
    /// ([`Self::mla_qkv`]) and latent decoding (`nn::mla_decode`) share it.
    pub(super) fn mla_query<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        w: &[Var],
        (b, t): (usize, usize),
        p0: Option<usize>,
    ) -> Result<(Var, Var, Option<Var>)> {
        let c = &self.config;
        let (dn, dr, nh) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.n_head);
        let (q, q_latent) = if c.q_lora_rank > 0 {
            let cq = tape.linear(h, w[0])?;
            let cq = tape.rmsnorm(cq, c.q_lora_rank)?;
            (tape.linear(cq, w[1])?, Some(cq))
        } else {
            (tape.linear(h, w[0])?, None)
        };
        let q = tape.reshape(q, &[b * t, nh, dn + dr])?;
        let q_nope = tape.slice_cols(q, 0, dn)?;
        let q_pe = tape.slice_cols(q, dn, dr)?;
        let q_pe = tape.rope_at(q_pe, (b, t, nh), RopeKind::Attention, p0)?;
        Ok((q_nope, q_pe, q_latent))
    }

    /// MLA's per-token latent from h `[n, C]`: the normalized c_kv `[n, r_kv]` and the rotated
    /// key shared by all heads, k_pe `[n, d_r]` (RoPE at positions `p0..` when decoding): what the
    /// latent cache holds.
    pub(super) fn mla_latent<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        wkv_a: Var,
        (b, t): (usize, usize),
        p0: Option<usize>,
    ) -> Result<(Var, Var)> {
        let (rkv, dr) = (self.config.kv_lora_rank, self.config.qk_rope_head_dim);
        let kv_a = tape.linear(h, wkv_a)?;
        let c_kv = tape.slice_cols(kv_a, 0, rkv)?;
        let c_kv = tape.rmsnorm(c_kv, rkv)?;
        let k_pe = tape.slice_cols(kv_a, rkv, dr)?;
        let k_pe = tape.rope_at(k_pe, (b, t, 1), RopeKind::Attention, p0)?;
        Ok((c_kv, k_pe))
    }
}
