//! Multi-token prediction (DeepSeek-V3, §2.2): D sequential modules after the model, module k
//! predicting the token k + 1 positions ahead. With h⁰ the last block's output (before the final
//! norm) and, at position i,
//!
//! hᵏᵢ = Blockₖ(Mₖ [norm(hᵏ⁻¹ᵢ); norm(wte[x_{i+k}])]),  Mₖ [C, 2C]
//! logitsᵏᵢ = lm_head(norm(hᵏᵢ))  predicts x_{i+k+1}
//!
//! sharing wte, the final norm and lm_head with the model. The objective is CE₀ + λ/D · Σₖ CEₖ,
//! each CEₖ the mean over the positions that have a target (i + k < t, and the target not
//! ignored). Module k's block is a block of the virtual layer `n_layer + k − 1` (its attention kind
//! and FFN follow `attn_pattern` and `first_k_dense` as if the model had more layers), with its
//! own MoE bias and statistics; its balance loss is weighted λ/D like its cross-entropy, so with
//! λ = 0 nothing of the modules reaches the model's gradients. Plain decoding ignores the modules;
//! speculative decoding uses them as the draft model (`Model::mtp_cached`).

use super::config::ModelConfig;
use super::model::Model;
use crate::autograd::{Tape, Var};
use crate::backend::{Backend, LayerCache};
use anyhow::{bail, ensure, Result};

/// DeepSeek-V3's λ for most of its training.
pub(super) fn default_lambda() -> f32 {
    0.3
}

/// The fraction of the steps after which `mtp_lambda_final` applies (DeepSeek-V3: 10 of 14.8T tokens).
pub(super) fn default_switch() -> f32 {
    2.0 / 3.0
}

/// The most MTP modules a config may ask for.
const MAX_DEPTH: usize = 16;

impl ModelConfig {
    pub(super) fn validate_mtp(&self) -> Result<()> {
        if self.mtp_depth > MAX_DEPTH {
            bail!("config: mtp_depth = {} is above the supported maximum {MAX_DEPTH}", self.mtp_depth);
        }
        if self.mtp_depth > 0 && self.mtp_depth + 1 >= self.max_seq_len {
            bail!(
                "config: mtp_depth ({}) must be below max_seq_len - 1 ({}): module k needs positions with a target k + 1 ahead",
                self.mtp_depth,
                self.max_seq_len.saturating_sub(1)
            );
        }
        for (name, v) in [("mtp_lambda", Some(self.mtp_lambda)), ("mtp_lambda_final", self.mtp_lambda_final)] {
            if let Some(v) = v.filter(|v| !v.is_finite() || *v < 0.0) {
                bail!("config: {name} must be a finite number ≥ 0, got {v}");
            }
        }
        if !(0.0..=1.0).contains(&self.mtp_lambda_switch) {
            bail!(
                "config: mtp_lambda_switch must be a fraction of the steps in [0, 1], got {}",
                self.mtp_lambda_switch
            );
        }
        Ok(())
    }

    /// The layer index of MTP module k's block (k = 1..=mtp_depth): `n_layer + k − 1`.
    pub fn mtp_layer(&self, k: usize) -> usize {
        self.n_layer + k - 1
    }

    /// Parameters of the MTP modules (total, active per token): per module the projection
    /// [C, 2C] and one block of its layer kind.
    pub fn mtp_params(&self) -> (usize, usize) {
        let (attn, _) = self.block_params();
        (1..=self.mtp_depth).fold((0, 0), |(t, a), k| {
            let l = self.mtp_layer(k);
            let (ft, fa) = self.ffn_params(l);
            let own = 2 * self.n_embd * self.n_embd + attn + self.indexer_params(l);
            (t + own + ft, a + own + fa)
        })
    }

    /// λ at optimizer step `step` of `total` (`mtp_lambda`, then `mtp_lambda_final` from
    /// `mtp_lambda_switch · total` on).
    pub fn mtp_lambda_at(&self, step: u64, total: u64) -> f32 {
        match self.mtp_lambda_final {
            Some(last) if step as f64 >= self.mtp_lambda_switch as f64 * total as f64 => last,
            _ => self.mtp_lambda,
        }
    }
}

/// Depth k's inputs and targets for a [b, t] batch: row (j, i) takes token `ids[j, i + k]` and
/// target `targets[j, i + k]`; rows with i + k ≥ t take the row's last token and no target (−1).
/// Causal attention keeps those rows from reaching earlier ones.
pub fn shifted(ids: &[u32], targets: &[i32], (b, t): (usize, usize), k: usize) -> (Vec<u32>, Vec<i32>) {
    let (mut sid, mut stg) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for j in 0..b {
        for i in 0..t {
            let (src, keep) = if i + k < t { (j * t + i + k, true) } else { (j * t + t - 1, false) };
            sid.push(ids[src]);
            stg.push(if keep { targets[src] } else { -1 });
        }
    }
    (sid, stg)
}

impl Model {
    /// λ/D of the current step: the weight of each MTP depth's losses (0 without MTP).
    pub fn mtp_weight(&self) -> f32 {
        match self.config.mtp_depth {
            0 => 0.0,
            d => self.mtp_lambda_now / d as f32,
        }
    }

    /// MTP module k on the previous depth's rows `h` [b·t, C] and the tokens `ids` (token i + k at
    /// row i): Mₖ [norm(h); norm(wte[ids])], then the module's block. With a `cache` (one
    /// sequence, b = 1) the rows are the module's positions `cache.len()..` (decoding).
    #[allow(clippy::too_many_arguments)]
    fn mtp_module<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        k: usize,
        h: Var,
        ids: &[u32],
        (b, t): (usize, usize),
        cache: Option<&mut LayerCache>,
    ) -> Result<Var> {
        let c = &self.config;
        let (proj, w) = self.mtp_params(pv, k);
        let hn = tape.rmsnorm(h, c.n_embd)?;
        let e = tape.embedding(pv[0], ids)?;
        let en = tape.rmsnorm(e, c.n_embd)?;
        let x = tape.concat_cols(hn, en)?;
        let x = tape.linear(x, proj)?;
        let l = c.mtp_layer(k);
        match cache {
            Some(cache) => self.block(tape, l, x, w, b, t, Some(cache)),
            None => self.block_or_checkpoint(tape, l, x, w, b, t),
        }
    }

    /// The training objective's MTP part: for each depth, CEₖ weighted λ/D joins the tape's
    /// auxiliary losses (so `Trainer` reports the model's own loss), and its unweighted value is
    /// recorded for the metrics ([`Self::take_mtp_losses`]). `h` is the last block's output.
    pub(super) fn mtp_losses<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        h: Var,
        ids: &[u32],
        targets: &[i32],
        (b, t): (usize, usize),
    ) -> Result<()> {
        let (weight, cap) = (self.mtp_weight(), self.config.logit_softcap);
        let mut h = h;
        for k in 1..=self.config.mtp_depth {
            let (sid, stg) = shifted(ids, targets, (b, t), k);
            h = self.mtp_module(tape, pv, k, h, &sid, (b, t), None)?;
            let logits = self.head(tape, pv, h)?;
            let (loss, n_valid, mean) = tape.cross_entropy_weighted(logits, &stg, cap, weight)?;
            if !mean.is_finite() {
                bail!("the MTP loss of depth {k} became {mean}");
            }
            let mut recorded = self.mtp_losses.lock().unwrap_or_else(|e| e.into_inner());
            recorded[k - 1] = (n_valid > 0).then_some(mean);
            drop(recorded);
            tape.add_aux_loss(loss);
        }
        Ok(())
    }

    /// Each MTP depth's cross-entropy in the latest training forward (None where no position had
    /// a target), clearing them.
    pub fn take_mtp_losses(&self) -> Vec<Option<f32>> {
        let mut losses = self.mtp_losses.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *losses, vec![None; self.config.mtp_depth])
    }

    /// MTP module k (1-based) on `n` rows of one sequence, its positions `cache.len()..` in the
    /// module's own `cache` (made for layer [`ModelConfig::mtp_layer`]`(k)`): `h_prev` [n, C] the
    /// previous depth's rows (k = 1: [`Model::hidden_cached`]'s), `ids` the tokens i + k. Returns
    /// the module's rows [n, C] (logits: [`Model::head`]); appends to `cache`. Inference tapes only.
    pub fn mtp_cached<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        pv: &[Var],
        k: usize,
        h_prev: Var,
        ids: &[u32],
        cache: &mut LayerCache,
    ) -> Result<Var> {
        ensure!(
            (1..=self.config.mtp_depth).contains(&k),
            "MTP module {k} does not exist (mtp_depth {})",
            self.config.mtp_depth
        );
        ensure!(!ids.is_empty(), "MTP: no tokens to process");
        self.check_ids(ids)?;
        let n = ids.len();
        if cache.len() + n > self.config.max_seq_len
            && !matches!(cache.kind(), crate::backend::CacheKind::Window { .. })
        {
            bail!("context full: MTP module {k} caches {} + {n} positions beyond max_seq_len", cache.len());
        }
        self.mtp_module(tape, pv, k, h_prev, ids, (1, n), Some(cache))
    }
}
