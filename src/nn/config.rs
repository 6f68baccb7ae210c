//! Model configuration: named presets, TOML/JSON files, command-line overrides.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
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
    /// window of `dsa_window_size` keys plus the first `n_global` tokens. E.g. "WWWD".
    #[serde(default = "dense_pattern")]
    pub attn_pattern: String,
    #[serde(default = "default_window")]
    pub dsa_window_size: usize,
    #[serde(default = "default_n_global")]
    pub n_global: usize,
}

/// Per-layer attention variant (see `ModelConfig::attn_pattern`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    Dense,
    Window,
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
        }
    }

    pub fn preset(name: &str) -> Result<ModelConfig> {
        Ok(match name {
            "tiny" => Self::shaped(4096, 4, 256, 4, 256),
            "small" => Self::shaped(65536, 12, 768, 12, 8192),
            "medium" => Self::shaped(65536, 24, 1024, 16, 16384),
            "large" => Self::shaped(65536, 32, 2048, 32, 32768),
            "xlarge" => Self::shaped(65536, 48, 4096, 48, 65536),
            "full" => Self::shaped(65536, 64, 8192, 64, 131072),
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
        let base = match fields.remove("model_size") {
            Some(serde_json::Value::String(name)) => ModelConfig::preset(&name)?,
            Some(other) => bail!("{}: model_size must be a string, got {other}", path.display()),
            None => base.clone(),
        };
        let mut merged = serde_json::to_value(&base)?;
        for (k, v) in fields {
            merged[k] = v;
        }
        let cfg: ModelConfig =
            serde_json::from_value(merged).with_context(|| format!("{}: bad model config", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
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
        if self.n_head % self.n_kv_head != 0 {
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
        if self.attn_pattern.is_empty() || self.attn_pattern.chars().any(|ch| ch != 'D' && ch != 'W') {
            bail!(
                "config: attn_pattern '{}' must be a non-empty string of D (dense) and W (window + global)",
                self.attn_pattern
            );
        }
        if self.dsa_window_size == 0 {
            bail!("config: dsa_window_size must be positive");
        }
        Ok(())
    }

    /// The attention variant of layer `l` (the pattern repeats over the layers).
    pub fn attn_kind(&self, l: usize) -> AttnKind {
        match self.attn_pattern.as_bytes()[l % self.attn_pattern.len()] {
            b'W' => AttnKind::Window,
            _ => AttnKind::Dense,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Parameters per block, by component: (attention, ffn).
    pub fn block_params(&self) -> (usize, usize) {
        let c = self.n_embd;
        let attn = c * self.q_dim() * 2 + c * self.kv_dim() * 2; // c_q, c_proj, c_k, c_v
        let ffn = 3 * c * self.ffn_hidden;
        (attn, ffn)
    }

    /// Total parameters: embedding + blocks + lm_head.
    pub fn num_params(&self) -> usize {
        let (a, f) = self.block_params();
        2 * self.vocab_size * self.n_embd + self.n_layer * (a + f)
    }

    /// Approximate training FLOPs per token: 6·(non-embedding matmul params + lm_head) + attention.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (a, f) = self.block_params();
        let matmul = (self.n_layer * (a + f) + self.vocab_size * self.n_embd) as f64;
        // causal attention: QKᵀ and PV, forward 2·2·(T/2)·head_dim per head, ×3 for fwd+bwd
        let attn = 6.0 * self.n_layer as f64 * self.n_head as f64 * self.head_dim as f64 * seq_len as f64;
        6.0 * matmul + attn
    }
}

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
}

impl ConfigOverrides {
    /// Applies the overrides. When n_embd or n_head change and head_dim / ffn_hidden
    /// are not given, those are re-derived so the shapes stay consistent.
    pub fn apply(&self, cfg: &mut ModelConfig) -> Result<()> {
        let shape_changed = self.n_embd.is_some() || self.n_head.is_some();
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
            if self.n_kv_head.is_none() {
                cfg.n_kv_head = v;
            }
        }
        if let Some(v) = self.n_kv_head {
            cfg.n_kv_head = v;
        }
        if shape_changed {
            cfg.head_dim = default_head_dim(cfg.n_embd, cfg.n_head);
            cfg.ffn_hidden = default_ffn_hidden(cfg.n_embd);
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
        cfg.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn overrides_rederive_shapes() {
        let mut c = ModelConfig::preset("tiny").unwrap();
        ConfigOverrides { n_embd: Some(128), n_head: Some(2), ..Default::default() }.apply(&mut c).unwrap();
        assert_eq!((c.head_dim, c.n_kv_head, c.ffn_hidden), (64, 2, 384));
        let bad = ConfigOverrides { n_kv_head: Some(3), ..Default::default() }.apply(&mut c);
        assert!(bad.unwrap_err().to_string().contains("n_kv_head"));
    }
}
