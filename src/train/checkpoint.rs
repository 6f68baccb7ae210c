//! Checkpoints: `<run>/checkpoints/step_NNNNNN/` holding
//!   model.safetensors  the weights and the MoE routing biases (F32, names from docs/model.md;
//!                      the model config as JSON in the safetensors metadata under "config")
//!   optim.safetensors  optimizer state (`<param>.adam_m`, `.adam_v`, `.muon_momentum`)
//!   state.json         step, data-loader RNG, format version
//! A checkpoint directory is written under a temporary name, every file fsynced,
//! then renamed into place: it either exists whole or not at all.

use crate::fsutil::{sync_dir, write_atomic};
use crate::nn::{Model, ModelConfig, Param};
use crate::optim::Optimizer;
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The training loader's RNG after the last batch of `step`.
    pub loader_rng: Rng,
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step_{step:06}"))
}

/// Steps with a complete checkpoint in the run, ascending.
pub fn list_steps(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step_")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| t.to_le_bytes()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| Ok((name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

/// Writes the checkpoint for `state.step` and keeps only the newest `keep` (0 = keep all).
pub fn save(run_dir: &Path, model: &Model, opt: &Optimizer, state: &CheckpointState, keep: usize) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(run_dir, state.step);
    let parent = final_dir.parent().unwrap();
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-step_{:06}-{}", state.step, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut weights: Vec<(String, Tensor)> =
            model.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
        for (l, bias) in model.moe_bias.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            weights.push((Model::moe_bias_name(l), Tensor::from_vec(&[bias.len()], bias.clone())));
        }
        // One metadata key: safetensors writes a HashMap in arbitrary order, and one key keeps files byte-reproducible.
        let meta = HashMap::from([("config".to_string(), serde_json::to_string(&model.config)?)]);
        write_atomic(&tmp.join("model.safetensors"), &safetensors_bytes(&weights, Some(meta))?)?;
        write_atomic(&tmp.join("optim.safetensors"), &safetensors_bytes(&opt.state_tensors(model), None)?)?;
        write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).with_context(|| format!("cannot replace {}", final_dir.display()))?;
        }
        fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
        sync_dir(parent)
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if keep > 0 {
        let steps = list_steps(run_dir);
        for &old in steps.iter().take(steps.len().saturating_sub(keep)) {
            fs::remove_dir_all(checkpoint_dir(run_dir, old))
                .with_context(|| format!("cannot prune checkpoint step {old}"))?;
        }
    }
    Ok(final_dir)
}

/// A parsed safetensors file and its path, for error messages.
struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    fn read(path: &Path) -> Result<TensorFile> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("corrupt checkpoint file {}: {e}", path.display()))?;
        Ok(TensorFile { path: path.to_path_buf(), bytes })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in read")
    }

    fn metadata(&self) -> Option<HashMap<String, String>> {
        SafeTensors::read_metadata(&self.bytes).ok().and_then(|(_, m)| m.metadata().clone())
    }

    /// The F32 tensor `name`, which must have exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let st = self.parsed();
        let view =
            st.tensor(name).map_err(|_| anyhow!("checkpoint file {} has no tensor '{name}'", self.path.display()))?;
        if view.dtype() != Dtype::F32 {
            bail!("checkpoint tensor '{name}' in {} has dtype {:?}; expected F32", self.path.display(), view.dtype());
        }
        if view.shape() != shape {
            bail!(
                "checkpoint tensor '{name}' in {} has shape {:?}; the model expects {shape:?}",
                self.path.display(),
                view.shape()
            );
        }
        Ok(Tensor::from_le_bytes(shape, view.data()).data)
    }
}

/// Reads the model config stored in a checkpoint's weights.
pub fn read_config(ckpt_dir: &Path) -> Result<ModelConfig> {
    let file = TensorFile::read(&ckpt_dir.join("model.safetensors"))?;
    let meta = file.metadata().unwrap_or_default();
    let text =
        meta.get("config").ok_or_else(|| anyhow!("{} has no model config in its metadata", file.path.display()))?;
    let cfg: ModelConfig =
        serde_json::from_str(text).with_context(|| format!("{}: bad model config in metadata", file.path.display()))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Loads the weights of a checkpoint into a new model with `config`.
pub fn load_model(ckpt_dir: &Path, config: &ModelConfig) -> Result<Model> {
    let file = TensorFile::read(&ckpt_dir.join("model.safetensors"))?;
    let params = Model::expected_shapes(config)
        .into_iter()
        .map(|(name, kind, shape)| Ok(Param { tensor: Tensor::from_vec(&shape, file.get(&name, &shape)?), name, kind }))
        .collect::<Result<Vec<_>>>()?;
    let mut model = Model::from_params(config.clone(), params);
    if let Some(p) = model.params.iter().find(|p| p.tensor.data.iter().any(|v| !v.is_finite())) {
        bail!("checkpoint {} holds non-finite values in '{}'", ckpt_dir.display(), p.name);
    }
    for (l, bias) in model.moe_bias.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()) {
        let name = Model::moe_bias_name(l);
        *bias = file.get(&name, &[bias.len()])?;
        if bias.iter().any(|v| !v.is_finite()) {
            bail!("checkpoint {} holds non-finite values in '{name}'", ckpt_dir.display());
        }
    }
    Ok(model)
}

/// Loads a whole training checkpoint: weights, optimizer state, loader state.
pub fn load(
    ckpt_dir: &Path,
    config: &ModelConfig,
    opt_config: crate::optim::OptimConfig,
) -> Result<(Model, Optimizer, CheckpointState)> {
    if !ckpt_dir.is_dir() {
        bail!("no checkpoint at {}", ckpt_dir.display());
    }
    let state_path = ckpt_dir.join("state.json");
    let text = fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| anyhow!("corrupt checkpoint file {}: {e}", state_path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {} has format version {}; this build reads {FORMAT_VERSION}",
            ckpt_dir.display(),
            state.format_version
        );
    }
    let model = load_model(ckpt_dir, config)?;
    let mut opt = Optimizer::new(&model, opt_config);
    let file = TensorFile::read(&ckpt_dir.join("optim.safetensors"))?;
    opt.load_state_tensors(&model, state.step, |name, shape| file.get(name, shape))?;
    Ok((model, opt, state))
}
