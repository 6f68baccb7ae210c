//! Model configuration: named presets, TOML/JSON files, command-line overrides.

use crate::backend::{RouterConfig, ScoreFunc};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// The architecture of a dense model (see docs/model.md for the math).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Key/value heads (grouped-query attention); must divide n_head.
    pub n_kv_head: usize,
    /// Width of one attention head; n_head·head_dim need not equal n_embd.
    pub head_dim: usize,
    /// Hidden width of the SwiGLU FFN.
    pub ffn_hidden: usize,
    /// Longest sequence the model is trained on (the RoPE table length).
    pub max_seq_len: usize,
    pub rope_theta: f64,
    /// Logits pass through cap·tanh(z/cap); 0 disables the cap.
    pub logit_softcap: f32,
    /// Attention kind per layer, repeated over the layers: `D` dense causal, `W` sliding
    /// window of `dsa_window_size` keys plus the first `n_global` tokens, `S` DeepSeek Sparse
    /// Attention (the lightning indexer's top `index_topk` keys). E.g. "WWWD" or "SSSD".
    #[serde(default = "dense_pattern")]
    pub attn_pattern: String,
    #[serde(default = "default_window")]
    pub dsa_window_size: usize,
    #[serde(default = "default_n_global")]
    pub n_global: usize,
    /// DSA (`S` layers): lightning-indexer query heads H_I.
    #[serde(default = "default_index_n_heads")]
    pub index_n_heads: usize,
    /// DSA: width d_I of the indexer's query heads and of its single key head.
    #[serde(default = "default_index_head_dim")]
    pub index_head_dim: usize,
    /// DSA: the lightning indexer's structure (`nn::indexer`): "gqa" (the query from the block
    /// input, RoPE on all d_I dims, no key norm; the default of configs that do not say) or
    /// "v32" (DeepSeek-V3.2's: the query from MLA's query latent, a LayerNorm on the key, RoPE
    /// on the first `index_rope_dim` dims only).
    #[serde(default = "super::indexer::default_indexer")]
    pub indexer: String,
    /// DSA, v32 indexer: the rotated leading dims of each indexer head (0 = derived: d_I / 2,
    /// even; DeepSeek-V3.2 rotates 64 of 128).
    #[serde(default)]
    pub index_rope_dim: usize,
    /// DSA: keys each query attends to (all earlier ones while fewer).
    #[serde(default = "default_index_topk")]
    pub index_topk: usize,
    /// DSA: the most recent keys are always attended to in addition to the top-k (0 = none).
    #[serde(default)]
    pub index_local_window: usize,
    /// DSA: optimizer steps of dense warm-up (dense attention; the indexer learns on every key).
    #[serde(default)]
    pub dsa_warmup_steps: u64,
    /// Mixture of experts (DeepSeekMoE); `n_routed_experts = 0` keeps every FFN dense.
    #[serde(default)]
    pub moe: MoeConfig,
    /// Multi-token prediction (DeepSeek-V3): D modules, module k predicting token i+k+1 from
    /// position i (0 = off; `nn::mtp`).
    #[serde(default)]
    pub mtp_depth: usize,
    /// λ: the MTP losses join the objective as λ/D · Σ_k CE_k.
    #[serde(default = "super::mtp::default_lambda")]
    pub mtp_lambda: f32,
    /// λ from `mtp_lambda_switch` (a fraction of the steps) on; None keeps λ (DeepSeek-V3: 0.3,
    /// then 0.1 for the last third).
    #[serde(default)]
    pub mtp_lambda_final: Option<f32>,
    #[serde(default = "super::mtp::default_switch")]
    pub mtp_lambda_switch: f32,
    /// The attention projection of every layer: "gqa" (c_q, c_k, c_v with QK-norm; the default)
    /// or "mla" (Multi-head Latent Attention, DeepSeek-V2/V3; `nn::mla`). MLA ignores n_kv_head
    /// and head_dim (each head has its own key and value, read from the shared latent).
    #[serde(default = "super::mla::default_attention")]
    pub attention: String,
    /// MLA: rank of the query latent (0 = a direct query projection `attn.wq`).
    #[serde(default)]
    pub q_lora_rank: usize,
    /// MLA: rank of the key/value latent c_kv (0 = derived: 4·head_dim).
    #[serde(default)]
    pub kv_lora_rank: usize,
    /// MLA: per-head query/key width without position (0 = derived: head_dim).
    #[serde(default)]
    pub qk_nope_head_dim: usize,
    /// MLA: width of the rotary part of queries and of the one shared rotary key (0 = derived: head_dim / 2, even).
    #[serde(default)]
    pub qk_rope_head_dim: usize,
    /// MLA: per-head value width (0 = derived: head_dim).
    #[serde(default)]
    pub v_head_dim: usize,
}

/// DeepSeekMoE settings (docs/model.md, "Mixture of experts"): the `moe` table of a config file,
/// whose keys may also be written at the top level. The seed's names work too: `moe_enabled`
/// (bool), `num_experts` (= n_routed_experts), `top_k`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MoeConfig {
    /// E, routed experts per MoE layer (0 = no MoE).
    pub n_routed_experts: usize,
    /// Experts every token uses; they are one SwiGLU of width n_shared_experts·moe_inter_dim.
    pub n_shared_experts: usize,
    /// K, routed experts per token.
    pub top_k: usize,
    /// Hidden width of one expert (0 = derived: ffn_hidden / (top_k + n_shared_experts), rounded up to 32).
    pub moe_inter_dim: usize,
    /// The first layers keep a dense FFN.
    pub first_k_dense: usize,
    /// "sigmoid" (DeepSeek-V3) or "softmax".
    pub score_func: String,
    pub routed_scaling_factor: f32,
    /// Group-limited routing: experts split into n_group groups, tokens keep topk_group of them.
    pub n_group: usize,
    pub topk_group: usize,
    /// γ of auxiliary-loss-free balancing (0 = bias stays 0).
    pub bias_update_speed: f32,
    /// α of the sequence-wise balance loss (0 = off).
    pub seq_aux_alpha: f32,
    /// Each expert takes at most ceil(cf · T·K / E) assignments of a batch; None = dropless.
    pub expert_capacity_factor: Option<f32>,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            n_routed_experts: 0,
            n_shared_experts: 1,
            top_k: 2,
            moe_inter_dim: 0,
            first_k_dense: 1,
            score_func: "sigmoid".into(),
            routed_scaling_factor: 1.0,
            n_group: 1,
            topk_group: 1,
            bias_update_speed: 0.001,
            seq_aux_alpha: 1e-4,
            expert_capacity_factor: None,
        }
    }
}

/// MoeConfig's fields, accepted at the top level of a config file.
const MOE_KEYS: &[&str] = &[
    "n_routed_experts",
    "n_shared_experts",
    "top_k",
    "moe_inter_dim",
    "first_k_dense",
    "score_func",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "bias_update_speed",
    "seq_aux_alpha",
    "expert_capacity_factor",
];

impl MoeConfig {
    pub fn enabled(&self) -> bool {
        self.n_routed_experts > 0
    }

    /// The routing kernel's settings.
    pub fn router(&self) -> RouterConfig {
        RouterConfig {
            n_experts: self.n_routed_experts,
            top_k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            routed_scaling_factor: self.routed_scaling_factor,
            score_func: if self.score_func == "softmax" { ScoreFunc::Softmax } else { ScoreFunc::Sigmoid },
            capacity_factor: self.expert_capacity_factor,
        }
    }

    fn validate(&self) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let (e, k, g) = (self.n_routed_experts, self.top_k, self.n_group);
        if k == 0 || k > e {
            bail!("config: top_k ({k}) must be in 1..=n_routed_experts ({e})");
        }
        if self.moe_inter_dim == 0 {
            bail!("config: moe_inter_dim must be positive");
        }
        if self.score_func != "sigmoid" && self.score_func != "softmax" {
            bail!("config: score_func must be \"sigmoid\" or \"softmax\", got \"{}\"", self.score_func);
        }
        if g == 0 || e % g != 0 {
            bail!("config: n_group ({g}) must divide n_routed_experts ({e})");
        }
        if g > 1 && (self.topk_group == 0 || self.topk_group > g || k > self.topk_group * (e / g)) {
            bail!(
                "config: topk_group ({}) must be in 1..=n_group ({g}) and keep at least top_k ({k}) experts",
                self.topk_group
            );
        }
        if !self.routed_scaling_factor.is_finite() || self.routed_scaling_factor <= 0.0 {
            bail!("config: routed_scaling_factor must be positive, got {}", self.routed_scaling_factor);
        }
        if !self.bias_update_speed.is_finite() || self.bias_update_speed < 0.0 {
            bail!("config: bias_update_speed must be ≥ 0, got {}", self.bias_update_speed);
        }
        if !self.seq_aux_alpha.is_finite() || self.seq_aux_alpha < 0.0 {
            bail!("config: seq_aux_alpha must be ≥ 0, got {}", self.seq_aux_alpha);
        }
        if let Some(cf) = self.expert_capacity_factor {
            if !cf.is_finite() || cf <= 0.0 {
                bail!("config: expert_capacity_factor must be positive (omit it for dropless routing), got {cf}");
            }
        }
        Ok(())
    }
}

/// Per-layer attention variant (see `ModelConfig::attn_pattern`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    Dense,
    Window,
    /// DeepSeek Sparse Attention.
    Sparse,
}

fn default_index_n_heads() -> usize {
    4
}

fn default_index_head_dim() -> usize {
    32
}

fn default_index_topk() -> usize {
    256
}

fn dense_pattern() -> String {
    "D".into()
}

fn default_window() -> usize {
    256
}

fn default_n_global() -> usize {
    4
}

/// The named sizes. `tiny` is the CPU default; the rest follow the seed's table.
pub const PRESETS: &[&str] = &["tiny", "small", "medium", "large", "xlarge", "full"];

/// SwiGLU hidden width: 8/3·n_embd (same parameter count as a 4× MLP), rounded up to a multiple of 64.
pub fn default_ffn_hidden(n_embd: usize) -> usize {
    (8 * n_embd).div_ceil(3).div_ceil(64) * 64
}

/// head_dim = n_embd / n_head when that divides, else 128 (e.g. xlarge: 4096/48).
pub fn default_head_dim(n_embd: usize, n_head: usize) -> usize {
    if n_head > 0 && n_embd % n_head == 0 {
        n_embd / n_head
    } else {
        128
    }
}

/// MLA's query-latent width for a preset of width n_embd: DeepSeek-V3's ratio 1536/7168 = 3/14,
/// rounded to the nearest multiple of 64 (medium 192, large 448, xlarge 896, full 1728).
pub fn default_q_lora_rank(n_embd: usize) -> usize {
    (3 * n_embd + 7 * 64) / (14 * 64) * 64
}

impl ModelConfig {
    fn shaped(vocab_size: usize, n_layer: usize, n_embd: usize, n_head: usize, max_seq_len: usize) -> ModelConfig {
        ModelConfig {
            vocab_size,
            n_layer,
            n_embd,
            n_head,
            n_kv_head: n_head,
            head_dim: default_head_dim(n_embd, n_head),
            ffn_hidden: default_ffn_hidden(n_embd),
            max_seq_len,
            rope_theta: 10_000.0,
            logit_softcap: 15.0,
            attn_pattern: dense_pattern(),
            dsa_window_size: default_window(),
            n_global: default_n_global(),
            index_n_heads: default_index_n_heads(),
            index_head_dim: default_index_head_dim(),
            indexer: super::indexer::default_indexer(),
            index_rope_dim: 0,
            index_topk: default_index_topk(),
            index_local_window: 0,
            dsa_warmup_steps: 0,
            moe: MoeConfig::default(),
            mtp_depth: 0,
            mtp_lambda: super::mtp::default_lambda(),
            mtp_lambda_final: None,
            mtp_lambda_switch: super::mtp::default_switch(),
            attention: super::mla::default_attention(),
            q_lora_rank: 0,
            kv_lora_rank: 0,
            qk_nope_head_dim: 0,
            qk_rope_head_dim: 0,
            v_head_dim: 0,
        }
    }

    /// A preset with DSA in three of every four layers ("SSSD"): 2048 keys per query (DeepSeek-V3.2's
    /// k), an indexer of 8 heads × 64, and a dense warm-up of 1000 steps.
    fn with_dsa(mut self) -> ModelConfig {
        self.attn_pattern = "SSSD".into();
        (self.index_n_heads, self.index_head_dim, self.index_topk, self.dsa_warmup_steps) = (8, 64, 2048, 1000);
        self
    }

    /// A preset with MoE FFNs after the first dense layer: E routed experts of width
    /// ffn_hidden/4, top-2, one shared expert (docs/model.md says why).
    fn with_moe(mut self, n_routed_experts: usize) -> ModelConfig {
        self.moe = MoeConfig { n_routed_experts, top_k: 2, moe_inter_dim: self.ffn_hidden / 4, ..MoeConfig::default() };
        self
    }

    /// A preset with Multi-head Latent Attention in DeepSeek-V3's proportions scaled to its width:
    /// d_n = d_v = head_dim, d_r = head_dim/2, r_kv = 4·head_dim (`derive_mla_dims`; V3's 128, 64,
    /// 128, 512 at head_dim 128) and r_q = 3/14 of n_embd (`default_q_lora_rank`; V3: 1536 of
    /// 7168). docs/model.md ("Presets and MLA") says why medium and up use it.
    fn with_mla(mut self) -> ModelConfig {
        self.attention = "mla".into();
        self.indexer = super::indexer::indexer_for("mla");
        self.q_lora_rank = default_q_lora_rank(self.n_embd);
        self.derive_mla_dims();
        self
    }

    pub fn preset(name: &str) -> Result<ModelConfig> {
        Ok(match name {
            "tiny" => Self::shaped(4096, 4, 256, 4, 256),
            "small" => Self::shaped(65536, 12, 768, 12, 8192),
            "medium" => Self::shaped(65536, 24, 1024, 16, 16384).with_mla().with_dsa(),
            "large" => Self::shaped(65536, 32, 2048, 32, 32768).with_mla().with_dsa().with_moe(16),
            "xlarge" => Self::shaped(65536, 48, 4096, 48, 65536).with_mla().with_dsa().with_moe(32),
            "full" => Self::shaped(65536, 64, 8192, 64, 131072).with_mla().with_dsa().with_moe(64),
            other => bail!("unknown model size '{other}': expected one of {}", PRESETS.join(", ")),
        })
    }

    /// The seed's approximate parameter counts for its presets (non-embedding).
    pub fn seed_claim(name: &str) -> Option<&'static str> {
        match name {
            "small" => Some("85M"),
            "medium" => Some("250M"),
            "large" => Some("1.2B"),
            "xlarge" => Some("7B"),
            "full" => Some("35B"),
            _ => None,
        }
    }

    /// Reads a TOML (`.toml`) or JSON file. Missing fields come from `base`
    /// (or from the preset named by a `model_size` key in the file).
    pub fn from_file(path: &Path, base: &ModelConfig) -> Result<ModelConfig> {
        Ok(Self::from_file_with_keys(path, base)?.0)
    }

    /// `from_file`, and the names of the fields the file set (MoE fields by their `MoeConfig`
    /// name). Shapes the file changes re-derive what it does not set, exactly as the same
    /// values on the command line do (`ConfigOverrides::apply_keeping`). A run's own
    /// `config.json` (`{"model": {...}, "train": {...}}`) is read through its `model` table.
    pub fn from_file_with_keys(path: &Path, base: &ModelConfig) -> Result<(ModelConfig, BTreeSet<String>)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
            let v: toml::Value =
                toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
            serde_json::to_value(v)?
        } else {
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
        };
        let serde_json::Value::Object(mut fields) = value else {
            bail!("{}: expected a table of config fields", path.display());
        };
        // A run directory's config.json: the model table is the model config.
        let mut is_run_config = false;
        if let (Some(serde_json::Value::Object(model)), true) = (fields.get("model"), fields.contains_key("train")) {
            fields = model.clone();
            is_run_config = true;
        }
        let base = match fields.remove("model_size") {
            Some(serde_json::Value::String(name)) => ModelConfig::preset(&name)?,
            Some(other) => bail!("{}: model_size must be a string, got {other}", path.display()),
            None => base.clone(),
        };
        let moe_enabled = match fields.remove("moe_enabled") {
            Some(serde_json::Value::Bool(b)) => Some(b),
            Some(other) => bail!("{}: moe_enabled must be true or false, got {other}", path.display()),
            None => None,
        };
        let mut merged = serde_json::to_value(&base)?;
        let mut set = BTreeSet::new();
        for (k, v) in fields {
            match k.as_str() {
                "moe" => {
                    let serde_json::Value::Object(table) = v else {
                        bail!("{}: moe must be a table of MoE settings", path.display());
                    };
                    for (mk, mv) in table {
                        let name = if mk == "num_experts" { "n_routed_experts" } else { mk.as_str() };
                        set.insert(name.to_string());
                        merged["moe"][name] = mv;
                    }
                }
                "num_experts" => {
                    set.insert("n_routed_experts".to_string());
                    merged["moe"]["n_routed_experts"] = v
                }
                _ if MOE_KEYS.contains(&k.as_str()) => {
                    set.insert(k.clone());
                    merged["moe"][k] = v
                }
                _ => {
                    set.insert(k.clone());
                    merged[k] = v
                }
            }
        }
        let mut cfg: ModelConfig =
            serde_json::from_value(merged).with_context(|| format!("{}: bad model config", path.display()))?;
        let has = |k: &str| set.contains(k);
        cfg.rederive(has("n_embd") || has("n_head"), has("n_head"), has("ffn_hidden"), &has);
        match moe_enabled {
            Some(false) => cfg.moe.n_routed_experts = 0,
            Some(true) if !cfg.moe.enabled() => cfg.moe.n_routed_experts = 8,
            _ => {}
        }
        // a user's file that picks the attention picks its indexer too (a run's config.json is
        // read as written: one from before the v32 indexer keeps "gqa")
        if !is_run_config && has("attention") && !has("indexer") {
            cfg.indexer = super::indexer::indexer_for(&cfg.attention);
        }
        cfg.derive_moe_inter_dim();
        cfg.derive_mla_dims();
        cfg.validate()?;
        Ok((cfg, set))
    }

    /// Re-derives the shapes that follow n_embd/n_head (head_dim, ffn_hidden, n_kv_head,
    /// moe_inter_dim) after a change, skipping every field the user set (`kept`).
    pub(crate) fn rederive(
        &mut self,
        shape_changed: bool,
        n_head_changed: bool,
        ffn_changed: bool,
        kept: &dyn Fn(&str) -> bool,
    ) {
        if n_head_changed && !kept("n_kv_head") {
            self.n_kv_head = self.n_head;
        }
        if shape_changed {
            if !kept("head_dim") {
                self.head_dim = default_head_dim(self.n_embd, self.n_head);
            }
            if !kept("ffn_hidden") {
                self.ffn_hidden = default_ffn_hidden(self.n_embd);
            }
        }
        if (shape_changed || ffn_changed) && !kept("moe_inter_dim") {
            self.moe.moe_inter_dim = 0; // derive_moe_inter_dim fills it from ffn_hidden
        }
        if shape_changed && self.is_mla() {
            // MLA's widths follow head_dim (derive_mla_dims fills the zeros); a query latent in
            // use follows n_embd
            for (name, field) in [
                ("qk_nope_head_dim", &mut self.qk_nope_head_dim),
                ("qk_rope_head_dim", &mut self.qk_rope_head_dim),
                ("v_head_dim", &mut self.v_head_dim),
                ("kv_lora_rank", &mut self.kv_lora_rank),
            ] {
                if !kept(name) {
                    *field = 0;
                }
            }
            if self.q_lora_rank > 0 && !kept("q_lora_rank") {
                self.q_lora_rank = default_q_lora_rank(self.n_embd);
            }
        }
    }

    /// Checks that the shapes fit together; every message names the field.
    pub fn validate(&self) -> Result<()> {
        let pos = [
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("ffn_hidden", self.ffn_hidden),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in pos {
            if v == 0 {
                bail!("config: {name} must be positive");
            }
        }
        // Upper bounds far past any real model keep every size product (parameters, activations,
        // memory predictions) well inside usize.
        for (name, v, max) in [
            ("n_layer", self.n_layer, 1 << 12),
            ("n_embd", self.n_embd, 1 << 16),
            ("n_head", self.n_head, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            ("ffn_hidden", self.ffn_hidden, 1 << 20),
            ("max_seq_len", self.max_seq_len, 1 << 24),
            ("n_routed_experts", self.moe.n_routed_experts, 1 << 12),
            ("moe_inter_dim", self.moe.moe_inter_dim, 1 << 20),
            ("n_shared_experts", self.moe.n_shared_experts, 1 << 8),
            ("index_n_heads", self.index_n_heads, 1 << 12),
            ("index_head_dim", self.index_head_dim, 1 << 12),
        ] {
            if v > max {
                bail!("config: {name} = {v} is above the supported maximum {max}");
            }
        }
        // (MLA has a key and a value per head and ignores n_kv_head)
        if self.n_head % self.n_kv_head != 0 && !self.is_mla() {
            bail!("config: n_head ({}) must be a multiple of n_kv_head ({})", self.n_head, self.n_kv_head);
        }
        if self.head_dim % 2 != 0 {
            bail!("config: head_dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        if self.vocab_size > u32::MAX as usize {
            bail!("config: vocab_size {} does not fit in u32 token ids", self.vocab_size);
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 {
            bail!("config: rope_theta must be a finite number > 1, got {}", self.rope_theta);
        }
        if !self.logit_softcap.is_finite() || self.logit_softcap < 0.0 {
            bail!("config: logit_softcap must be ≥ 0 (0 = off), got {}", self.logit_softcap);
        }
        if self.attn_pattern.is_empty() || self.attn_pattern.chars().any(|ch| !matches!(ch, 'D' | 'W' | 'S')) {
            bail!(
                "config: attn_pattern '{}' must be a non-empty string of D (dense), W (window + global) and S (DSA)",
                self.attn_pattern
            );
        }
        if self.attn_pattern.contains('S') {
            for (name, v) in [
                ("index_n_heads", self.index_n_heads),
                ("index_head_dim", self.index_head_dim),
                ("index_topk + index_local_window", self.index_topk + self.index_local_window),
            ] {
                if v == 0 {
                    bail!("config: {name} must be positive for DSA (S) layers");
                }
            }
            if self.index_head_dim % 2 != 0 {
                bail!("config: index_head_dim ({}) must be even for rotary embeddings", self.index_head_dim);
            }
        }
        if self.dsa_window_size == 0 {
            bail!("config: dsa_window_size must be positive");
        }
        self.validate_mtp()?;
        self.validate_mla()?;
        self.validate_indexer()?;
        self.moe.validate()
    }

    /// Fills moe_inter_dim when MoE is on and it is 0: ffn_hidden / (top_k + n_shared), rounded up to 32.
    pub fn derive_moe_inter_dim(&mut self) {
        let m = &mut self.moe;
        if m.enabled() && m.moe_inter_dim == 0 {
            m.moe_inter_dim = (self.ffn_hidden / (m.top_k + m.n_shared_experts).max(1)).div_ceil(32).max(1) * 32;
        }
    }

    /// Whether layer `l`'s FFN is a mixture of experts.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.enabled() && l >= self.moe.first_k_dense
    }

    /// The attention variant of layer `l` (the pattern repeats over the layers).
    pub fn attn_kind(&self, l: usize) -> AttnKind {
        match self.attn_pattern.as_bytes()[l % self.attn_pattern.len()] {
            b'W' => AttnKind::Window,
            b'S' => AttnKind::Sparse,
            _ => AttnKind::Dense,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ConfigOverrides;

    #[test]
    fn presets_are_valid_and_small_matches_the_seed() {
        for p in PRESETS {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        let s = ModelConfig::preset("small").unwrap();
        let (a, f) = s.block_params();
        let non_emb = s.n_layer * (a + f);
        assert!((80_000_000..90_000_000).contains(&non_emb), "{non_emb}");
        assert_eq!(ModelConfig::preset("xlarge").unwrap().head_dim, 128);
        assert!(ModelConfig::preset("huge").unwrap_err().to_string().contains("unknown model size"));
    }

    /// `info`'s counts (ModelConfig's count functions) equal the element counts of the parameter
    /// list the model allocates (`Model::expected_shapes`, shapes only), for every preset as it is
    /// and with an MTP module; medium and up are MLA, tiny and small GQA.
    #[test]
    fn preset_parameter_counts_equal_the_parameter_shapes() {
        use crate::nn::Model;
        for p in PRESETS {
            let base = ModelConfig::preset(p).unwrap();
            assert_eq!(base.is_mla(), !matches!(*p, "tiny" | "small"), "{p}: MLA from medium up");
            assert_eq!(base.is_v32_indexer(), base.is_mla(), "{p}: MLA presets use the V3.2 indexer");
            for mtp_depth in [0, 1] {
                let c = ModelConfig { mtp_depth, ..base.clone() };
                let shapes = Model::expected_shapes(&c);
                let elements: usize = shapes.iter().map(|(_, _, s)| s.iter().product::<usize>()).sum();
                assert_eq!(c.num_params(), elements, "{p}, mtp_depth {mtp_depth}");
            }
        }
        // V3's proportions at the presets' widths (head_dim 64 for medium/large, 128 above)
        let dims = |p: &str| {
            let c = ModelConfig::preset(p).unwrap();
            (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        };
        assert_eq!(dims("medium"), (192, 256, 64, 32, 64));
        assert_eq!(dims("xlarge"), (896, 512, 128, 64, 128));
        assert_eq!(dims("full"), (1728, 512, 128, 64, 128));
        assert_eq!(default_q_lora_rank(7168), 1536, "DeepSeek-V3's own width");
    }

    #[test]
    fn mla_widths_follow_a_changed_shape() {
        let mut c = ModelConfig::preset("medium").unwrap();
        ConfigOverrides { n_embd: Some(2048), n_head: Some(16), ..Default::default() }.apply(&mut c).unwrap();
        assert_eq!((c.head_dim, c.qk_nope_head_dim, c.kv_lora_rank, c.q_lora_rank), (128, 128, 512, 448));
        let mut c = ModelConfig::preset("medium").unwrap();
        let o = ConfigOverrides { n_embd: Some(512), kv_lora_rank: Some(96), ..Default::default() };
        o.apply(&mut c).unwrap();
        assert_eq!((c.head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.q_lora_rank), (32, 16, 96, 128));
    }

    #[test]
    fn overrides_rederive_shapes() {
        let mut c = ModelConfig::preset("tiny").unwrap();
        ConfigOverrides { n_embd: Some(128), n_head: Some(2), ..Default::default() }.apply(&mut c).unwrap();
        assert_eq!((c.head_dim, c.n_kv_head, c.ffn_hidden), (64, 2, 384));
        let bad = ConfigOverrides { n_kv_head: Some(3), ..Default::default() }.apply(&mut c);
        assert!(bad.unwrap_err().to_string().contains("n_kv_head"));
    }
}
