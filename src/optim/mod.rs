//! Optimizers: Muon for the hidden matrices, AdamW for everything else,
//! the learning-rate schedule and gradient clipping.

mod schedule;

pub use schedule::lr_multiplier;

use crate::nn::{Model, ParamKind};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub embedding_lr: f32,
    pub unembedding_lr: f32,
    pub matrix_lr: f32,
    pub weight_decay: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    pub muon_momentum: f32,
    pub ns_steps: usize,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f32,
    pub warmup_ratio: f32,
    pub warmdown_ratio: f32,
    /// Learning-rate multiplier reached at the end of the warmdown.
    pub final_lr_frac: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            embedding_lr: 0.2,
            unembedding_lr: 0.004,
            matrix_lr: 0.02,
            weight_decay: 0.0,
            adam_beta1: 0.8,
            adam_beta2: 0.95,
            adam_eps: 1e-10,
            muon_momentum: 0.95,
            ns_steps: 5,
            grad_clip: 1.0,
            warmup_ratio: 0.1,
            warmdown_ratio: 0.2,
            final_lr_frac: 0.0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("embedding_lr", self.embedding_lr),
            ("unembedding_lr", self.unembedding_lr),
            ("matrix_lr", self.matrix_lr),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} must be a finite number ≥ 0, got {v}");
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio)
            || !(0.0..=1.0).contains(&self.warmdown_ratio)
            || self.warmup_ratio + self.warmdown_ratio > 1.0
        {
            bail!(
                "warmup_ratio ({}) and warmdown_ratio ({}) must lie in [0, 1] and sum to at most 1",
                self.warmup_ratio,
                self.warmdown_ratio
            );
        }
        if !self.grad_clip.is_finite() || self.grad_clip < 0.0 {
            bail!("grad_clip must be ≥ 0 (0 = off), got {}", self.grad_clip);
        }
        // The rest come from a saved config.json (resume) rather than flags; checked all the same.
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            bail!("weight_decay must be a finite number ≥ 0, got {}", self.weight_decay);
        }
        for (name, v) in
            [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2), ("muon_momentum", self.muon_momentum)]
        {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} must lie in [0, 1), got {v}");
            }
        }
        if !self.adam_eps.is_finite() || self.adam_eps <= 0.0 {
            bail!("adam_eps must be a finite number > 0, got {}", self.adam_eps);
        }
        if !(1..=64).contains(&self.ns_steps) {
            bail!("ns_steps (Newton-Schulz iterations of Muon) must be in 1..=64, got {}", self.ns_steps);
        }
        if !(0.0..=1.0).contains(&self.final_lr_frac) {
            bail!("final_lr_frac must lie in [0, 1], got {}", self.final_lr_frac);
        }
        Ok(())
    }
}

/// Per-parameter optimizer state.
/// Optimizer state of one parameter on the host (the trainer's `StateBuf` over `Vec<f32>`).
pub type ParamState = crate::backend::StateBuf<Vec<f32>>;

pub struct Optimizer {
    pub config: OptimConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub state: Vec<ParamState>,
    /// AdamW learning rates are scaled by (n_embd/768)^-½ (nanochat's convention), so the
    /// defaults tuned at width 768 transfer to other widths.
    _memory: crate::memory::Tracked,
}

impl Optimizer {
    pub fn new(model: &Model, config: OptimConfig) -> Optimizer {
        let state = model
            .params
            .iter()
            .map(|p| match p.kind {
                ParamKind::Matrix | ParamKind::Experts => ParamState::Muon { momentum: vec![0.0; p.tensor.numel()] },
                _ => ParamState::AdamW { m: vec![0.0; p.tensor.numel()], v: vec![0.0; p.tensor.numel()] },
            })
            .collect();
        let floats = model.params.iter().map(|p| if p.kind.uses_muon() { 1 } else { 2 } * p.tensor.numel()).sum();
        let _memory = crate::memory::Tracked::floats(crate::memory::Category::OptimizerState, floats);
        Optimizer { config, step: 0, state, _memory }
    }

    /// Counts `floats` values of state in host memory from now on, instead of every parameter's
    /// (a data-parallel rank keeps only the state of the parameters it owns).
    pub fn track_state_floats(&mut self, floats: usize) {
        self._memory = crate::memory::Tracked::floats(crate::memory::Category::OptimizerState, floats);
    }

    /// One update of every parameter from `grads` (same order as `model.params`),
    /// with every learning rate multiplied by `lr_mult` (the schedule).
    pub fn state_tensors(&self, model: &Model) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (p, st) in model.params.iter().zip(&self.state) {
            let shape = &p.tensor.shape;
            match st {
                ParamState::AdamW { m, v } => {
                    out.push((format!("{}.adam_m", p.name), Tensor::from_vec(shape, m.clone())));
                    out.push((format!("{}.adam_v", p.name), Tensor::from_vec(shape, v.clone())));
                }
                ParamState::Muon { momentum } => {
                    out.push((format!("{}.muon_momentum", p.name), Tensor::from_vec(shape, momentum.clone())))
                }
            }
        }
        out
    }

    /// Restores state written by `state_tensors`; `get` looks a tensor up by name.
    pub fn load_state_tensors(
        &mut self,
        model: &Model,
        step: u64,
        mut get: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        for (p, st) in model.params.iter().zip(&mut self.state) {
            let shape = &p.tensor.shape;
            match st {
                ParamState::AdamW { m, v } => {
                    *m = get(&format!("{}.adam_m", p.name), shape)?;
                    *v = get(&format!("{}.adam_v", p.name), shape)?;
                }
                ParamState::Muon { momentum } => *momentum = get(&format!("{}.muon_momentum", p.name), shape)?,
            }
        }
        self.step = step;
        Ok(())
    }
}
