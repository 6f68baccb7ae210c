//! `--n-layer`-style overrides of a [`ModelConfig`] from the command line, applied so that a
//! value set in a config file is kept and derived shapes follow as they do from a file.

use super::config::ModelConfig;
use anyhow::Result;
use std::collections::BTreeSet;

/// `--n-layer`-style overrides from the command line; `None` keeps the value.
#[derive(Clone, Debug, Default)]
pub struct ConfigOverrides {
    pub vocab_size: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_embd: Option<usize>,
    pub n_head: Option<usize>,
    pub n_kv_head: Option<usize>,
    pub head_dim: Option<usize>,
    pub ffn_hidden: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub rope_theta: Option<f64>,
    pub logit_softcap: Option<f32>,
    pub attn_pattern: Option<String>,
    pub dsa_window_size: Option<usize>,
    pub n_global: Option<usize>,
    pub index_n_heads: Option<usize>,
    pub index_head_dim: Option<usize>,
    pub indexer: Option<String>,
    pub index_rope_dim: Option<usize>,
    pub index_topk: Option<usize>,
    pub index_local_window: Option<usize>,
    pub dsa_warmup_steps: Option<u64>,
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub moe_top_k: Option<usize>,
    pub moe_inter_dim: Option<usize>,
    pub first_k_dense: Option<usize>,
    pub score_func: Option<String>,
    pub routed_scaling_factor: Option<f32>,
    pub bias_update_speed: Option<f32>,
    pub seq_aux_alpha: Option<f32>,
    pub expert_capacity_factor: Option<f32>,
    pub mtp_depth: Option<usize>,
    pub mtp_lambda: Option<f32>,
    pub attention: Option<String>,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
}

impl ConfigOverrides {
    /// Applies the overrides. When n_embd or n_head change and head_dim / ffn_hidden
    /// are not given, those are re-derived so the shapes stay consistent.
    pub fn apply(&self, cfg: &mut ModelConfig) -> Result<()> {
        self.apply_keeping(cfg, &BTreeSet::new())
    }

    /// `apply` on a config read from a file that set the fields in `file_set`: a derived
    /// value never replaces one the user set, in the file or here.
    pub fn apply_keeping(&self, cfg: &mut ModelConfig, file_set: &BTreeSet<String>) -> Result<()> {
        if let Some(v) = self.vocab_size {
            cfg.vocab_size = v;
        }
        if let Some(v) = self.n_layer {
            cfg.n_layer = v;
        }
        if let Some(v) = self.n_embd {
            cfg.n_embd = v;
        }
        if let Some(v) = self.n_head {
            cfg.n_head = v;
        }
        let given = |k: &str| {
            file_set.contains(k)
                || match k {
                    "n_kv_head" => self.n_kv_head.is_some(),
                    "head_dim" => self.head_dim.is_some(),
                    "ffn_hidden" => self.ffn_hidden.is_some(),
                    "moe_inter_dim" => self.moe_inter_dim.is_some(),
                    _ => false,
                }
        };
        let shape_changed = self.n_embd.is_some() || self.n_head.is_some();
        cfg.rederive(shape_changed, self.n_head.is_some(), self.ffn_hidden.is_some(), &given);
        if let Some(v) = self.n_kv_head {
            cfg.n_kv_head = v;
        }
        if let Some(v) = self.head_dim {
            cfg.head_dim = v;
        }
        if let Some(v) = self.ffn_hidden {
            cfg.ffn_hidden = v;
        }
        if let Some(v) = self.max_seq_len {
            cfg.max_seq_len = v;
        }
        if let Some(v) = self.rope_theta {
            cfg.rope_theta = v;
        }
        if let Some(v) = self.logit_softcap {
            cfg.logit_softcap = v;
        }
        if let Some(v) = &self.attn_pattern {
            cfg.attn_pattern = v.clone();
        }
        if let Some(v) = self.dsa_window_size {
            cfg.dsa_window_size = v;
        }
        if let Some(v) = self.n_global {
            cfg.n_global = v;
        }
        if let Some(v) = self.index_n_heads {
            cfg.index_n_heads = v;
        }
        if let Some(v) = self.index_head_dim {
            cfg.index_head_dim = v;
        }
        if let Some(v) = self.index_topk {
            cfg.index_topk = v;
        }
        if let Some(v) = self.index_local_window {
            cfg.index_local_window = v;
        }
        if let Some(v) = self.dsa_warmup_steps {
            cfg.dsa_warmup_steps = v;
        }
        let m = &mut cfg.moe;
        if let Some(v) = self.n_routed_experts {
            m.n_routed_experts = v;
        }
        if let Some(v) = self.n_shared_experts {
            m.n_shared_experts = v;
        }
        if let Some(v) = self.moe_top_k {
            m.top_k = v;
        }
        if let Some(v) = self.moe_inter_dim {
            m.moe_inter_dim = v;
        }
        if let Some(v) = self.first_k_dense {
            m.first_k_dense = v;
        }
        if let Some(v) = &self.score_func {
            m.score_func = v.clone();
        }
        if let Some(v) = self.routed_scaling_factor {
            m.routed_scaling_factor = v;
        }
        if let Some(v) = self.bias_update_speed {
            m.bias_update_speed = v;
        }
        if let Some(v) = self.seq_aux_alpha {
            m.seq_aux_alpha = v;
        }
        if let Some(v) = self.expert_capacity_factor {
            // 0 = dropless; anything else (NaN or a negative included) goes to validate().
            m.expert_capacity_factor = if v == 0.0 { None } else { Some(v) };
        }
        if let Some(v) = self.mtp_depth {
            cfg.mtp_depth = v;
        }
        if let Some(v) = self.mtp_lambda {
            cfg.mtp_lambda = v;
        }
        if let Some(v) = &self.attention {
            cfg.attention = v.clone();
            // the attention picks its indexer unless one is given (MLA: v32, GQA: gqa)
            if self.indexer.is_none() && !file_set.contains("indexer") {
                cfg.indexer = super::indexer::indexer_for(v);
            }
        }
        if let Some(v) = &self.indexer {
            cfg.indexer = v.clone();
        }
        if let Some(v) = self.index_rope_dim {
            cfg.index_rope_dim = v;
        }
        for (field, v) in [
            (&mut cfg.q_lora_rank, self.q_lora_rank),
            (&mut cfg.kv_lora_rank, self.kv_lora_rank),
            (&mut cfg.qk_nope_head_dim, self.qk_nope_head_dim),
            (&mut cfg.qk_rope_head_dim, self.qk_rope_head_dim),
            (&mut cfg.v_head_dim, self.v_head_dim),
        ] {
            if let Some(v) = v {
                *field = v;
            }
        }
        cfg.derive_moe_inter_dim();
        cfg.derive_mla_dims();
        cfg.validate()
    }
}
