//! Checkpoints: `<run>/checkpoints/step_NNNNNN/` holding
//!   model.safetensors  the weights and the MoE routing biases (F32, names from docs/model.md;
//!                      the model config as JSON in the safetensors metadata under "config")
//!   optim.safetensors  optimizer state (`<param>.adam_m`, `.adam_v`, `.muon_momentum`)
//!   state.json         step, data-loader RNG, format version
//!   checksums.json     the SHA-256 of each file above, written last and verified on load
//!
//! Crash safety: a checkpoint is written in `.tmp-step_NNNNNN-<pid>`, every file and the folder
//! fsynced, then renamed into place (over an existing step by an atomic exchange where the file
//! system has one), so a `step_*` folder is always complete. Only then are older checkpoints
//! pruned, each renamed to `.trash-*` before it is deleted. Temporaries of dead processes are
//! removed when the next writer takes the run's lock (see `run_dir`). Only finite model and
//! optimizer state is saved, and loading checks finiteness and checksums again.

use crate::fsutil::sync_dir;
use crate::nn::{Model, ModelConfig, Param};
use crate::optim::Optimizer;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::run_dir::fault_point;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const CHECKSUMS_FILE: &str = "checksums.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The training loader's RNG after the last batch of `step`.
    pub loader_rng: Rng,
}

/// `checksums.json`: the content hash of every other file of the checkpoint.
#[derive(Serialize, Deserialize)]
struct Checksums {
    algorithm: String,
    /// file name → lowercase hex digest
    files: BTreeMap<String, String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step_{step:06}"))
}

/// Steps with a checkpoint folder in the run, ascending.
pub fn list_steps(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
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

/// The name of the first tensor holding a NaN or an infinity.
fn first_non_finite(tensors: &[(String, Tensor)]) -> Option<&str> {
    tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())).map(|(n, _)| n.as_str())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`); false where unsupported.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (CString::new(a.as_os_str().as_bytes()), CString::new(b.as_os_str().as_bytes())) else {
        return false;
    };
    // SAFETY: two NUL-terminated paths that outlive the call.
    unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> bool {
    false
}

/// Moves the complete checkpoint `tmp` to `final_dir`. An existing `final_dir` (resuming from an
/// older step) stays in place until the new one is: exchanged atomically where possible, else
/// renamed aside first. The old one ends in `tmp`'s place and is then deleted.
fn install(tmp: &Path, final_dir: &Path) -> Result<()> {
    let parent = final_dir.parent().expect("a checkpoint folder has a parent");
    if final_dir.exists() {
        if !exchange(tmp, final_dir) {
            let aside = parent.join(format!(".trash-replaced-{}", std::process::id()));
            fs::rename(final_dir, &aside).with_context(|| format!("cannot replace {}", final_dir.display()))?;
            fs::rename(tmp, final_dir)
                .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
            fs::rename(&aside, tmp)?;
        }
        sync_dir(parent)?;
        fault_point("save:after_install");
        if let Err(e) = fs::remove_dir_all(tmp) {
            eprintln!("warning: cannot remove the replaced checkpoint (now {}): {e}", tmp.display());
        }
        return Ok(());
    }
    fs::rename(tmp, final_dir).with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    sync_dir(parent)
}

/// Writes the checkpoint for `state.step` and keeps only the newest `keep` (0 = keep all).
/// Refuses (writing nothing) when the model or the optimizer state is not finite.
pub fn save(run_dir: &Path, model: &Model, opt: &Optimizer, state: &CheckpointState, keep: usize) -> Result<PathBuf> {
    let mut weights: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    for (l, bias) in model.moe_bias.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
        weights.push((Model::moe_bias_name(&model.config, l), Tensor::from_vec(&[bias.len()], bias.clone())));
    }
    let optim = opt.state_tensors(model);
    for (what, tensors) in [("weights", &weights), ("optimizer state", &optim)] {
        if let Some(name) = first_non_finite(tensors) {
            bail!("the {what} hold non-finite values (first in '{name}'); step {} was not saved", state.step);
        }
    }
    let final_dir = checkpoint_dir(run_dir, state.step);
    let parent = final_dir.parent().unwrap();
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-step_{:06}-{}", state.step, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        // One metadata key: safetensors writes a HashMap in arbitrary order, and one key keeps files byte-reproducible.
        let meta = HashMap::from([("config".to_string(), serde_json::to_string(&model.config)?)]);
        let files = [
            ("model.safetensors", safetensors_bytes(&weights, Some(meta))?),
            ("optim.safetensors", safetensors_bytes(&optim, None)?),
            ("state.json", serde_json::to_string_pretty(state)?.into_bytes()),
        ];
        let mut sums = Checksums { algorithm: "sha256".into(), files: BTreeMap::new() };
        for (name, bytes) in &files {
            write_synced(&tmp.join(name), bytes)?;
            sums.files.insert(name.to_string(), sha256_hex(bytes));
            fault_point(&format!("save:after_{}", name.split('.').next().unwrap()));
        }
        write_synced(&tmp.join(CHECKSUMS_FILE), serde_json::to_string_pretty(&sums)?.as_bytes())?;
        sync_dir(&tmp)?;
        fault_point("save:before_install");
        install(&tmp, &final_dir)
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(run_dir, keep, state.step);
    Ok(final_dir)
}

/// Keeps the newest `keep` checkpoints (0 = all) and always `just_saved`. Each pruned folder is
/// renamed to `.trash-*` first, so no `step_*` folder is ever half-deleted. A failure is a
/// warning: the new checkpoint is safely in place.
fn prune(run_dir: &Path, keep: usize, just_saved: u64) {
    if keep == 0 {
        return;
    }
    let steps = list_steps(run_dir);
    for &old in steps.iter().take(steps.len().saturating_sub(keep)).filter(|&&s| s != just_saved) {
        let dir = checkpoint_dir(run_dir, old);
        let trash = dir.with_file_name(format!(".trash-step_{old:06}-{}", std::process::id()));
        let removed = fs::rename(&dir, &trash).and_then(|()| {
            fault_point("prune:after_rename");
            fs::remove_dir_all(&trash)
        });
        if let Err(e) = removed {
            eprintln!("warning: cannot prune checkpoint step {old} ({}): {e}", dir.display());
        }
    }
}

/// The bytes of checkpoint file `name`, verified against the checkpoint's `checksums.json`.
fn read_verified(ckpt_dir: &Path, name: &str) -> Result<Vec<u8>> {
    let sums_path = ckpt_dir.join(CHECKSUMS_FILE);
    let text = fs::read_to_string(&sums_path).with_context(|| {
        format!("cannot read {} (a checkpoint without it is incomplete or predates checksums)", sums_path.display())
    })?;
    let sums: Checksums =
        serde_json::from_str(&text).map_err(|e| anyhow!("corrupt checkpoint file {}: {e}", sums_path.display()))?;
    if sums.algorithm != "sha256" {
        bail!("corrupt checkpoint file {}: unknown algorithm '{}'", sums_path.display(), sums.algorithm);
    }
    let path = ckpt_dir.join(name);
    let expected = sums.files.get(name).ok_or_else(|| anyhow!("{} does not list {name}", sums_path.display()))?;
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let found = sha256_hex(&bytes);
    if &found != expected {
        bail!(
            "corrupt checkpoint file {}: its SHA-256 {found} differs from {expected} recorded in {CHECKSUMS_FILE}",
            path.display()
        );
    }
    Ok(bytes)
}

/// A parsed safetensors file and its path, for error messages.
struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    fn read(ckpt_dir: &Path, name: &str) -> Result<TensorFile> {
        let path = ckpt_dir.join(name);
        let bytes = read_verified(ckpt_dir, name)?;
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("corrupt checkpoint file {}: {e}", path.display()))?;
        Ok(TensorFile { path, bytes })
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
    let file = TensorFile::read(ckpt_dir, "model.safetensors")?;
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
    Ok(load_model_converting(ckpt_dir, config, None)?.0)
}

/// Whether a tensor a checkpoint lacks may start fresh in a conversion: a DSA layer's lightning
/// indexer (a dense layer turned sparse) or an MTP module (MTP added to a trained model).
pub fn conversion_adds(name: &str) -> bool {
    name.contains(".attn.indexer.") || name.starts_with("mtp.")
}

/// [`load_model`], or with `fresh` (a model of `config`, e.g. `Model::new(config, seed)`) a
/// conversion of a trained model: every tensor the checkpoint holds must fit, and the tensors it
/// lacks are taken from `fresh` where [`conversion_adds`] allows (the indexers of layers turned
/// from D or W into S, MTP modules and their routing biases). Returns the model and the names
/// taken fresh.
pub fn load_model_converting(
    ckpt_dir: &Path,
    config: &ModelConfig,
    fresh: Option<&Model>,
) -> Result<(Model, Vec<String>)> {
    let file = TensorFile::read(ckpt_dir, "model.safetensors")?;
    let held: std::collections::HashSet<String> = file.parsed().names().into_iter().map(String::from).collect();
    let mut added = Vec::new();
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        match fresh {
            Some(m) if !held.contains(name) && conversion_adds(name) => {
                added.push(name.to_string());
                let from_params = m.param(name).map(|t| t.data.clone());
                let from_bias = (0..m.moe_bias.len()).find(|&l| Model::moe_bias_name(config, l) == name);
                from_params
                    .or_else(|| from_bias.map(|l| m.moe_bias[l].clone()))
                    .ok_or_else(|| anyhow!("conversion: the fresh model has no tensor '{name}'"))
            }
            _ => file.get(name, shape),
        }
    };
    let mut params = Vec::new();
    for (name, kind, shape) in Model::expected_shapes(config) {
        params.push(Param { tensor: Tensor::from_vec(&shape, take(&name, &shape)?), name, kind });
    }
    let mut biases = Vec::new();
    for (l, n) in (0..config.n_layer + config.mtp_depth).map(|l| (l, config.is_moe_layer(l))) {
        biases.push(if n {
            Some(take(&Model::moe_bias_name(config, l), &[config.moe.n_routed_experts])?)
        } else {
            None
        });
    }
    let mut model = Model::from_params(config.clone(), params);
    if let Some(p) = model.params.iter().find(|p| p.tensor.data.iter().any(|v| !v.is_finite())) {
        bail!("checkpoint {} holds non-finite values in '{}'", ckpt_dir.display(), p.name);
    }
    for (l, (bias, loaded)) in model.moe_bias.iter_mut().zip(biases).enumerate() {
        let Some(loaded) = loaded else { continue };
        let name = Model::moe_bias_name(config, l);
        *bias = loaded;
        if bias.iter().any(|v| !v.is_finite()) {
            bail!("checkpoint {} holds non-finite values in '{name}'", ckpt_dir.display());
        }
    }
    Ok((model, added))
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
    let text = read_verified(ckpt_dir, "state.json")?;
    let state: CheckpointState =
        serde_json::from_slice(&text).map_err(|e| anyhow!("corrupt checkpoint file {}: {e}", state_path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {} has format version {}; this build reads {FORMAT_VERSION}",
            ckpt_dir.display(),
            state.format_version
        );
    }
    let folder_step = ckpt_dir.file_name().and_then(|n| n.to_str()?.strip_prefix("step_")?.parse::<u64>().ok());
    if folder_step.is_some_and(|s| s != state.step) {
        bail!("corrupt checkpoint file {}: step {} does not match its folder", state_path.display(), state.step);
    }
    let model = load_model(ckpt_dir, config)?;
    let mut opt = Optimizer::new(&model, opt_config);
    let file = TensorFile::read(ckpt_dir, "optim.safetensors")?;
    opt.load_state_tensors(&model, state.step, |name, shape| {
        let values = file.get(name, shape)?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!("checkpoint {} holds non-finite optimizer state in '{name}'", ckpt_dir.display());
        }
        Ok(values)
    })?;
    Ok((model, opt, state))
}
