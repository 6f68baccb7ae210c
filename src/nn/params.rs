//! The parameters: each block's tensors in checkpoint order (names, shapes, optimizer groups,
//! which start at zero) and the exact counts `info`, the report and the memory prediction use.

use super::config::{AttnKind, ModelConfig};
use super::model::{Model, ParamKind};

/// One parameter of a block: name suffix, kind, shape, and whether it starts at zero (else
/// N(0, 1/fan_in), or 1 for a norm's gain, `ParamKind::Vector`).
pub(super) struct ParamSpec {
    pub(super) name: &'static str,
    pub(super) kind: ParamKind,
    pub(super) shape: Vec<usize>,
    pub(super) zero: bool,
}

impl ParamSpec {
    /// An unnamed matrix (its initialization only).
    pub(super) fn matrix(shape: &[usize], zero: bool) -> ParamSpec {
        ParamSpec { name: "", kind: ParamKind::Matrix, shape: shape.to_vec(), zero }
    }

    /// The tensor's name in the block: `{name}.weight`, or the name itself for a bias
    /// (`….bias`).
    pub(super) fn tensor_name(&self) -> String {
        if self.name.ends_with(".bias") {
            self.name.to_string()
        } else {
            format!("{}.weight", self.name)
        }
    }
}

impl Model {
    /// The parameters of block `l`, in checkpoint order: attention (c_q, c_k, c_v, c_proj; MLA's
    /// are in `nn::mla`, c_proj last too), then
    /// the dense FFN (w_gate, w_up, w_down) or the MoE FFN (router, routed expert stacks, shared
    /// experts), then for DSA layers the lightning indexer (wq, wk, w_heads). Shapes are
    /// [out, in]; expert stacks [E, out, in].
    pub(super) fn block_param_specs(c: &ModelConfig, l: usize) -> Vec<ParamSpec> {
        let mx = ParamKind::Matrix;
        let spec = |name, kind, shape: Vec<usize>, zero| ParamSpec { name, kind, shape, zero };
        let ce = c.n_embd;
        let mut v = if c.is_mla() {
            Self::mla_param_specs(c)
        } else {
            vec![
                spec("attn.c_q", mx, vec![c.q_dim(), ce], false),
                spec("attn.c_k", mx, vec![c.kv_dim(), ce], false),
                spec("attn.c_v", mx, vec![c.kv_dim(), ce], false),
                spec("attn.c_proj", mx, vec![ce, c.q_dim()], true),
            ]
        };
        if !c.is_moe_layer(l) {
            let f = c.ffn_hidden;
            v.push(spec("mlp.w_gate", mx, vec![f, ce], false));
            v.push(spec("mlp.w_up", mx, vec![f, ce], false));
            v.push(spec("mlp.w_down", mx, vec![ce, f], true));
        } else {
            Self::moe_param_specs(c, &mut v);
        }
        if c.attn_kind(l) == AttnKind::Sparse {
            Self::indexer_param_specs(c, &mut v);
        }
        v
    }

    fn moe_param_specs(c: &ModelConfig, v: &mut Vec<ParamSpec>) {
        let (mx, ex) = (ParamKind::Matrix, ParamKind::Experts);
        let spec = |name, kind, shape: Vec<usize>, zero| ParamSpec { name, kind, shape, zero };
        let ce = c.n_embd;
        let (e, f) = (c.moe.n_routed_experts, c.moe.moe_inter_dim);
        v.push(spec("mlp.router", ParamKind::Router, vec![e, ce], false));
        v.push(spec("mlp.experts.w_gate", ex, vec![e, f, ce], false));
        v.push(spec("mlp.experts.w_up", ex, vec![e, f, ce], false));
        v.push(spec("mlp.experts.w_down", ex, vec![e, ce, f], true));
        if c.moe.n_shared_experts > 0 {
            let fs = c.moe.n_shared_experts * f;
            v.push(spec("mlp.shared.w_gate", mx, vec![fs, ce], false));
            v.push(spec("mlp.shared.w_up", mx, vec![fs, ce], false));
            v.push(spec("mlp.shared.w_down", mx, vec![ce, fs], true));
        }
    }

    /// Every parameter's name, kind and shape, in checkpoint order.
    pub fn expected_shapes(c: &ModelConfig) -> Vec<(String, ParamKind, Vec<usize>)> {
        let mut v = vec![("wte.weight".to_string(), ParamKind::Embedding, vec![c.vocab_size, c.n_embd])];
        for l in 0..c.n_layer {
            for p in Self::block_param_specs(c, l) {
                v.push((format!("blocks.{l}.{}", p.tensor_name()), p.kind, p.shape));
            }
        }
        v.push(("lm_head.weight".to_string(), ParamKind::Head, vec![c.vocab_size, c.n_embd]));
        for k in 1..=c.mtp_depth {
            v.push((format!("mtp.{k}.proj.weight"), ParamKind::Matrix, vec![c.n_embd, 2 * c.n_embd]));
            for p in Self::block_param_specs(c, c.mtp_layer(k)) {
                v.push((format!("mtp.{k}.block.{}", p.tensor_name()), p.kind, p.shape));
            }
        }
        v
    }

    /// Checkpoint name prefix of layer `l`: `blocks.{l}`, or `mtp.{k}.block` for the block of
    /// MTP module k (layer `n_layer + k − 1`).
    pub fn layer_name(c: &ModelConfig, l: usize) -> String {
        if l < c.n_layer {
            format!("blocks.{l}")
        } else {
            format!("mtp.{}.block", l - c.n_layer + 1)
        }
    }

    /// Checkpoint name of layer `l`'s routing bias (a buffer saved beside the weights).
    pub fn moe_bias_name(c: &ModelConfig, l: usize) -> String {
        format!("{}.mlp.router.bias", Self::layer_name(c, l))
    }
}

impl ModelConfig {
    /// Parameters of a dense block, by component: (attention, ffn).
    pub fn block_params(&self) -> (usize, usize) {
        let c = self.n_embd;
        let attn = if self.is_mla() {
            self.mla_attn_params()
        } else {
            c * self.q_dim() * 2 + c * self.kv_dim() * 2 // c_q, c_proj, c_k, c_v
        };
        let ffn = 3 * c * self.ffn_hidden;
        (attn, ffn)
    }

    /// FFN parameters of layer `l`: (total, active per token). A MoE layer holds the router
    /// [E, C], E routed experts and the shared experts; a token uses the shared experts, K
    /// routed experts and the router.
    pub fn ffn_params(&self, l: usize) -> (usize, usize) {
        if !self.is_moe_layer(l) {
            let f = 3 * self.n_embd * self.ffn_hidden;
            return (f, f);
        }
        let m = &self.moe;
        let expert = 3 * self.n_embd * m.moe_inter_dim;
        let router = m.n_routed_experts * self.n_embd;
        let shared = m.n_shared_experts * expert;
        (router + shared + m.n_routed_experts * expert, router + shared + m.top_k * expert)
    }

    /// Number of lightning-indexer tensors at the end of block `l`'s parameters (0 unless DSA):
    /// 3 for the gqa indexer, 5 for v32 (`Model::indexer_param_specs`).
    pub fn n_indexer_params(&self, l: usize) -> usize {
        match (self.attn_kind(l), self.is_v32_indexer()) {
            (AttnKind::Sparse, false) => 3,
            (AttnKind::Sparse, true) => 5,
            _ => 0,
        }
    }

    /// Lightning-indexer parameters of layer `l` (0 unless DSA). gqa: wq [H_I·d_I, C], wk
    /// [d_I, C], w_heads [H_I, C]. v32: wq_b [H_I·d_I, q_lora_rank] (or wq [H_I·d_I, C]), wk,
    /// k_norm's weight and bias [d_I], w_heads.
    pub fn indexer_params(&self, l: usize) -> usize {
        if self.attn_kind(l) != AttnKind::Sparse {
            return 0;
        }
        let (hi, di, c) = (self.index_n_heads, self.index_head_dim, self.n_embd);
        let q_in = if self.indexer_reads_q_latent() { self.q_lora_rank } else { c };
        let norm = if self.is_v32_indexer() { 2 * di } else { 0 };
        hi * di * q_in + di * c + norm + hi * c
    }

    /// Vector parameters (AdamW) of layer `l`: the v32 indexer's k_norm weight and bias.
    pub fn vector_params(&self, l: usize) -> usize {
        if self.attn_kind(l) == AttnKind::Sparse && self.is_v32_indexer() {
            2 * self.index_head_dim
        } else {
            0
        }
    }

    /// Non-embedding parameters of all blocks: (total, active per token).
    pub fn block_params_total(&self) -> (usize, usize) {
        let (a, _) = self.block_params();
        (0..self.n_layer).fold((0, 0), |(t, ac), l| {
            let ((ft, fa), i) = (self.ffn_params(l), self.indexer_params(l));
            (t + a + i + ft, ac + a + i + fa)
        })
    }

    /// Total parameters: embedding + blocks + lm_head + the MTP modules (`mtp_params`).
    pub fn num_params(&self) -> usize {
        2 * self.vocab_size * self.n_embd + self.block_params_total().0 + self.mtp_params().0
    }

    /// Parameters a token uses in training (MoE layers count K routed experts; the MTP modules
    /// count); equals num_params for dense models.
    pub fn active_params(&self) -> usize {
        2 * self.vocab_size * self.n_embd + self.block_params_total().1 + self.mtp_params().1
    }

    /// Approximate training FLOPs per token: 6·(active non-embedding matmul params + lm_head, once
    /// per MTP depth too) + attention (the MTP blocks' included).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let heads = (1 + self.mtp_depth) * self.vocab_size * self.n_embd;
        let matmul = (self.block_params_total().1 + self.mtp_params().1 + heads) as f64;
        // causal attention: QKᵀ and PV, forward 2·(T/2)·(d_qk + d_v) per head, ×3 for fwd+bwd
        let layers = (self.n_layer + self.mtp_depth) as f64;
        let (_, d_qk, d_v) = self.attn_heads();
        let attn = 3.0 * layers * self.n_head as f64 * (d_qk + d_v) as f64 * seq_len as f64;
        6.0 * matmul + attn
    }
}
