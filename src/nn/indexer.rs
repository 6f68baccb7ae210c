//! The lightning indexer of DSA (`S`) layers, in two structures (`indexer` in the config;
//! docs/model.md, "V3.2 indexer"). With h the block's normalized input [n, C], H_I heads of
//! width d_I, r = `index_rope_width()`, both inputs detached (the language-model loss never
//! reaches the indexer; it learns from the KL loss only):
//!
//! ```text
//! gqa:  qi = RoPE(wq · h)                  ki = RoPE(wk · h)            (all d_I dims rotated)
//! v32:  qi = pRoPE(wq_b · c_q)             ki = pRoPE(LN(wk · h))       (c_q: MLA's normalized
//!       (wq · h when q_lora_rank = 0)                                     query latent)
//! both: wi = w_heads · h / sqrt(H_I · d_I),   score(s, j) = Σ_h wi[s, h] · ReLU(qi[s, h] · ki[j])
//! ```
//!
//! pRoPE rotates the first r dims of each head at the token's position (NeoX half-split, as the
//! model's RoPE) and passes the other d_I − r unchanged ([pe ; nope], DeepSeek-V3.2's order). LN
//! is an affine LayerNorm (γ starts at 1, β at 0, eps `cpu::norm::LN_EPS` = 1e-6, V3.2's).
//! DeepSeek-V3.2 also multiplies qi and ki by a Hadamard matrix before its FP8 cast; the matrix
//! is orthogonal, so qi·ki is unchanged and it is left out. On a GQA model the v32 indexer reads
//! its query from h (`attn.indexer.wq`), as an MLA model without a query latent does.

use super::config::ModelConfig;
use super::model::{Model, ParamKind};
use super::params::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::backend::{Backend, RopeKind};
use anyhow::{bail, Result};

pub(super) fn default_indexer() -> String {
    "gqa".into()
}

/// The indexer an attention projection implies when a config picks the attention but not the
/// indexer: "v32" for MLA, "gqa" for GQA.
pub fn indexer_for(attention: &str) -> String {
    if attention == "mla" { "v32" } else { "gqa" }.into()
}

impl ModelConfig {
    /// Whether DSA layers use DeepSeek-V3.2's indexer (`indexer = "v32"`).
    pub fn is_v32_indexer(&self) -> bool {
        self.indexer == "v32"
    }

    /// Whether the v32 indexer's query reads MLA's query latent (else the block input h).
    pub fn indexer_reads_q_latent(&self) -> bool {
        self.is_v32_indexer() && self.is_mla() && self.q_lora_rank > 0
    }

    /// The rotated dims of each indexer head (the indexer RoPE table's width): d_I for gqa;
    /// `index_rope_dim` for v32 (0 = d_I / 2, even).
    pub fn index_rope_width(&self) -> usize {
        match (self.is_v32_indexer(), self.index_rope_dim) {
            (false, _) => self.index_head_dim,
            (true, 0) => (self.index_head_dim / 2).max(2) / 2 * 2,
            (true, r) => r,
        }
    }

    pub(super) fn validate_indexer(&self) -> Result<()> {
        if self.indexer != "gqa" && self.indexer != "v32" {
            bail!("config: indexer must be \"gqa\" or \"v32\", got \"{}\"", self.indexer);
        }
        let (r, di) = (self.index_rope_dim, self.index_head_dim);
        if !self.is_v32_indexer() && r != 0 {
            bail!("config: index_rope_dim ({r}) applies to the v32 indexer only (the gqa indexer rotates all dims)");
        }
        if r % 2 != 0 {
            bail!("config: index_rope_dim ({r}) must be even for rotary embeddings");
        }
        if r > di {
            bail!("config: index_rope_dim ({r}) must be at most index_head_dim ({di})");
        }
        Ok(())
    }

    /// Floats per token the tape keeps for one v32 indexer (`Model::indexer_qkw` op by op,
    /// and the KL loss's saved gradients), beside the selection (`info::predict_training_bytes`).
    pub fn v32_indexer_activations_per_token(&self) -> usize {
        let (hi, di, r) = (self.index_n_heads, self.index_head_dim, self.index_rope_width());
        let latent = if self.indexer_reads_q_latent() { self.q_lora_rank } else { 0 };
        // detached h (and latent); q: product, reshape, the two slices, RoPE, concat, reshape
        let q = 5 * hi * di + hi * r;
        // k: product, LayerNorm (+ mean and 1/std), the two slices, RoPE, concat
        let k = 4 * di + 2 + r;
        // wi: product and scale; the KL's gradients of qi, ki, wi
        self.n_embd + latent + q + k + 2 * hi + (hi * di + di + hi)
    }
}

impl Model {
    /// The indexer's parameters at the end of a DSA block. gqa: `attn.indexer.wq [H_I·d_I, C]`,
    /// `wk [d_I, C]`, `w_heads [H_I, C]`. v32: `attn.indexer.wq_b [H_I·d_I, q_lora_rank]` (or
    /// `wq [H_I·d_I, C]` without a query latent), `wk [d_I, C]`, `k_norm.weight [d_I]` (ones),
    /// `k_norm.bias [d_I]` (zeros), `w_heads [H_I, C]`. Matrices are Muon's, the norm's vectors
    /// AdamW's (`ParamKind::Vector`).
    pub(super) fn indexer_param_specs(c: &ModelConfig, v: &mut Vec<ParamSpec>) {
        let (mx, vec) = (ParamKind::Matrix, ParamKind::Vector);
        let spec = |name, kind, shape: Vec<usize>, zero| ParamSpec { name, kind, shape, zero };
        let (hi, di, ce) = (c.index_n_heads, c.index_head_dim, c.n_embd);
        if c.indexer_reads_q_latent() {
            v.push(spec("attn.indexer.wq_b", mx, vec![hi * di, c.q_lora_rank], false));
        } else {
            v.push(spec("attn.indexer.wq", mx, vec![hi * di, ce], false));
        }
        v.push(spec("attn.indexer.wk", mx, vec![di, ce], false));
        if c.is_v32_indexer() {
            v.push(spec("attn.indexer.k_norm", vec, vec![di], false));
            v.push(spec("attn.indexer.k_norm.bias", vec, vec![di], true));
        }
        v.push(spec("attn.indexer.w_heads", mx, vec![hi, ce], false));
    }

    /// The indexer's qi `[n, H_I·d_I]`, ki `[n, d_I]`, wi `[n, H_I]` (module doc) from the block's
    /// normalized input h and the query source `q_src` (MLA's normalized query latent, else h);
    /// `w` as [`Self::indexer_param_specs`] orders them, `p0` the cached length when decoding. The
    /// gqa indexer is the v32 one without the LayerNorm and with every dim rotated.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn indexer_qkw<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        q_src: Var,
        w: &[Var],
        (b, t): (usize, usize),
        p0: Option<usize>,
    ) -> Result<(Var, Var, Var)> {
        let c = &self.config;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let hd = tape.detach(h)?;
        let qs = if c.indexer_reads_q_latent() { tape.detach(q_src)? } else { hd };
        let qi = tape.linear(qs, w[0])?;
        let qi = self.partial_rope(tape, qi, (b, t, hi), p0)?;
        let ki = tape.linear(hd, w[1])?;
        let ki = if c.is_v32_indexer() { tape.layernorm(ki, w[2], w[3])? } else { ki };
        let ki = self.partial_rope(tape, ki, (b, t, 1), p0)?;
        let wi = tape.linear(hd, w[w.len() - 1])?;
        let wi = tape.scale(wi, 1.0 / ((hi * di) as f32).sqrt())?;
        Ok((qi, ki, wi))
    }

    /// The indexer's (qi, ki, wi) of DSA layer `l` for one sequence of `t` rows at positions
    /// `p0..p0 + t`: h `[t, C]` the block's normalized input, `q_src` what the query reads (MLA's
    /// normalized query latent `[t, q_lora_rank]`, else h). On the CPU, for inspection and tests.
    pub fn indexer_projections(
        &self,
        l: usize,
        h: &crate::tensor::Tensor,
        q_src: &crate::tensor::Tensor,
        p0: usize,
    ) -> Result<[Vec<f32>; 3]> {
        let c = &self.config;
        anyhow::ensure!(c.attn_kind(l) == super::AttnKind::Sparse, "indexer_projections: layer {l} is not DSA");
        let t = h.shape[0];
        let mut tape: Tape<crate::backend::CpuOps> = Tape::inference(self.cpu());
        let pv = self.params_on(&mut tape);
        let end = self.block_start()[l + 1];
        let w = &pv[end - c.n_indexer_params(l)..end];
        let (hv, qv) = (tape.leaf(h.clone()), tape.leaf(q_src.clone()));
        let (qi, ki, wi) = self.indexer_qkw(&mut tape, hv, qv, w, (1, t), Some(p0))?;
        Ok([qi, ki, wi].map(|v| tape.value(v).to_vec()))
    }

    /// RoPE on the first r = `index_rope_width()` dims of each of the h heads of x [n, h·d_I]
    /// (positions `p0..` when decoding), the other d_I − r unchanged: [RoPE(x_pe) ; x_nope] per
    /// head (all of x when r = d_I, the gqa indexer).
    fn partial_rope<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        x: Var,
        (b, t, h): (usize, usize, usize),
        p0: Option<usize>,
    ) -> Result<Var> {
        let (di, r) = (self.config.index_head_dim, self.config.index_rope_width());
        if r == di {
            return tape.rope_at(x, (b, t, h), RopeKind::Indexer, p0);
        }
        // the column ops act on the last dim: view several heads as [n, h, d_I] (a copy)
        let x = if h > 1 { tape.reshape(x, &[b * t, h, di])? } else { x };
        let pe = tape.slice_cols(x, 0, r)?;
        let pe = tape.rope_at(pe, (b, t, h), RopeKind::Indexer, p0)?;
        let nope = tape.slice_cols(x, r, di - r)?;
        let y = tape.concat_cols(pe, nope)?;
        if h > 1 {
            tape.reshape(y, &[b * t, h * di])
        } else {
            Ok(y)
        }
    }
}
