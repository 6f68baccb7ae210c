//! The training loop: data → micro-batches → tape → gradients → optimizer,
//! with evaluation, metrics, plots and checkpoints along the way.

pub mod checkpoint;
mod data;
pub mod events;
pub mod metrics;
pub mod plot;
mod run;
pub mod run_dir;
pub mod trainer;

pub use data::{held_out_tokens, open_checked_shard, open_data};
pub use trainer::{PassStats, StepStats, Trainer};

use crate::autograd::Tape;
use crate::backend::{check_cuda_shapes, CpuOps};
use crate::data::Loader;
use crate::device::Device;
use crate::fsutil::write_atomic;
use crate::memory;
use crate::nn::{Model, ModelConfig};
use crate::optim::{OptimConfig, Optimizer};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Tokens of the embedded synthetic corpus (train split; validation is a separate stream).
pub const EMBEDDED_TRAIN_TOKENS: usize = 2_000_000;
pub const EMBEDDED_VAL_TOKENS: usize = 131_072;
const EMBEDDED_TRAIN_SEED: u64 = 0x5EED_0001;
const EMBEDDED_VAL_SEED: u64 = 0x5EED_0002;

/// Everything about a run besides the model; saved as `config.json` with the model config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub device_batch_size: usize,
    /// Tokens per optimizer step, over all micro-batches (and ranks).
    pub total_batch_size: usize,
    pub num_iterations: u64,
    pub seed: u64,
    /// A token shard or a `nanoseek data` folder; None = the embedded synthetic language.
    pub data: Option<PathBuf>,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Evaluate validation loss every this many steps (0 = only at the end).
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Newest checkpoints to keep (0 = all).
    pub keep_checkpoints: usize,
    /// Activation checkpointing: recompute every n-th block in the backward (0 = off, 1 = all blocks).
    #[serde(default)]
    pub grad_checkpoint: usize,
    /// Start from these weights (a checkpoint directory) instead of a fresh initialization, with a
    /// fresh optimizer and schedule: fine-tuning, a curriculum, or context extension (the config
    /// may differ in anything that does not change a weight's shape, e.g. max_seq_len or data).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// `--wandb-project`: kept for `wandb sync` later (training itself never uses the network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_project: Option<String>,
    pub optim: OptimConfig,
}

impl TrainSettings {
    /// Defaults for a preset: `tiny` trains in about two minutes on two CPU cores.
    pub fn for_model(cfg: &ModelConfig) -> TrainSettings {
        TrainSettings {
            device_batch_size: 8,
            total_batch_size: 8 * cfg.max_seq_len,
            num_iterations: 250,
            seed: 42,
            data: None,
            init_from: None,
            save_every: 0,
            eval_every: 50,
            eval_batches: 4,
            keep_checkpoints: 3,
            grad_checkpoint: 0,
            wandb_project: None,
            optim: OptimConfig::default(),
        }
    }

    /// Micro-batches per optimizer step; a total that does not divide is an error.
    pub fn grad_accum_steps(&self, seq_len: usize, world: usize) -> Result<usize> {
        if self.device_batch_size == 0 || self.total_batch_size == 0 {
            bail!("device_batch_size and total_batch_size must be positive");
        }
        let per_micro = micro_batch_tokens(self.device_batch_size, seq_len)?
            .checked_mul(world)
            .filter(|&n| n <= MAX_BATCH_TOKENS)
            .ok_or_else(|| anyhow::anyhow!("device_batch_size × max_seq_len × world_size is too large"))?;
        if self.total_batch_size > MAX_BATCH_TOKENS {
            bail!("total_batch_size {} is above the supported maximum {MAX_BATCH_TOKENS}", self.total_batch_size);
        }
        if self.total_batch_size % per_micro != 0 {
            bail!(
                "total_batch_size {} is not a multiple of device_batch_size × max_seq_len × world_size = {} × {} × {} = {per_micro}",
                self.total_batch_size,
                self.device_batch_size,
                seq_len,
                world
            );
        }
        Ok(self.total_batch_size / per_micro)
    }
}

/// Most tokens in one micro-batch or one optimizer step (2^30): far past what fits in memory, and
/// low enough that every activation-size product stays inside usize.
pub const MAX_BATCH_TOKENS: usize = 1 << 30;

/// Tokens of one micro-batch, `device_batch_size × max_seq_len`, or an error past [`MAX_BATCH_TOKENS`].
pub fn micro_batch_tokens(device_batch_size: usize, seq_len: usize) -> Result<usize> {
    device_batch_size.checked_mul(seq_len).filter(|&n| n > 0 && n <= MAX_BATCH_TOKENS).ok_or_else(|| {
        anyhow::anyhow!(
            "device_batch_size {device_batch_size} × max_seq_len {seq_len} must be between 1 and {MAX_BATCH_TOKENS} tokens"
        )
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainSettings,
}

pub struct TrainRequest {
    pub run: RunConfig,
    pub run_dir: PathBuf,
    pub resume_from_step: Option<u64>,
    pub device: Device,
    /// Progress bar and log lines on stderr.
    pub verbose: bool,
    /// Tokens to sample at the end (0 = none).
    pub sample_tokens: usize,
}

pub struct TrainSummary {
    /// (step, loss) of every step this invocation ran.
    pub losses: Vec<(u64, f32)>,
    pub val_loss: Option<f32>,
    pub tokens_per_s: f64,
    pub checkpoint: PathBuf,
    pub sample: Option<String>,
}

/// Data-parallel rank and world size from torchrun-style variables (a single process today).
fn rank_and_world() -> Result<(usize, usize)> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .map(|v| v.parse::<usize>().with_context(|| format!("{k}={v} is not a number")))
            .transpose()
    };
    let world = get("WORLD_SIZE")?.unwrap_or(1);
    let rank = get("RANK")?.unwrap_or(0);
    if world != 1 {
        bail!("WORLD_SIZE={world}: multi-process data-parallel training is not built yet; run one process");
    }
    Ok((rank, world))
}

/// Mean loss over the first `batches` sequential validation batches.
pub fn evaluate(model: &Model, val: &Loader, batches: usize) -> Result<f32> {
    let (mut total, mut n) = (0.0f64, 0usize);
    for i in 0..batches {
        let Some(batch) = val.sequential_batch(i) else {
            break;
        };
        let mut tape = Tape::inference(model.cpu());
        let pv = model.params_on(&mut tape);
        let loss = model.loss(&mut tape, &pv, &batch.ids, &batch.targets, val.batch, val.seq_len)?;
        total += tape.scalar(loss) as f64;
        n += 1;
    }
    if n == 0 {
        bail!("the validation data is shorter than one batch");
    }
    Ok((total / n as f64) as f32)
}

pub fn write_plot(run_dir: &Path) -> Result<()> {
    let records = metrics::read(&run_dir.join("metrics.jsonl"))?;
    let mut series = vec![
        plot::Series { name: "train loss".into(), points: metrics::series(&records, "loss") },
        plot::Series { name: "val loss".into(), points: metrics::series(&records, "val_loss") },
    ];
    for k in 1.. {
        let mtp = metrics::series(&records, &format!("mtp_loss_{k}"));
        if mtp.is_empty() {
            break;
        }
        series.push(plot::Series { name: format!("MTP depth {k} loss"), points: mtp });
    }
    let kl = metrics::series(&records, "indexer_loss");
    if !kl.is_empty() {
        series.push(plot::Series { name: "DSA indexer KL".into(), points: kl });
    }
    let svg = plot::line_chart_svg("nanoseek training loss", "step", "loss (nats/token)", &series, false);
    write_atomic(&run_dir.join("loss.svg"), svg.as_bytes())?;
    // MoE runs: expert load over training, one heat map row per expert, for each MoE layer.
    let heat = metrics::moe_load_history(&records);
    if !heat.is_empty() {
        write_atomic(&run_dir.join("moe_load.svg"), plot::moe_heatmap_svg(&heat).as_bytes())?;
    }
    Ok(())
}

/// One optimizer step on the CPU over the model's own tensors (tests, profiling): a
/// [`Trainer`] over `CpuOps` for the one step; the tensors move into it and back.
pub fn train_step(
    model: &mut Model,
    opt: &mut Optimizer,
    next_batch: impl FnMut() -> crate::data::Batch,
    accum: usize,
    grad_clip: f32,
    lr: f32,
    profile: bool,
) -> Result<StepStats> {
    let mut tr = Trainer::new(model.cpu().clone(), model, opt)?;
    let stats = tr.train_step(model, next_batch, (accum, grad_clip, lr), profile);
    tr.restore(model, opt)?;
    stats
}

/// Runs (or resumes) training as requested. Everything is validated before the
/// run directory is created, so bad input leaves no files behind.
pub fn train(req: TrainRequest) -> Result<TrainSummary> {
    let RunConfig { model: mcfg, train: ts } = &req.run;
    mcfg.validate()?;
    ts.optim.validate()?;
    if req.device != Device::Cpu {
        // The kernels' shape rules.
        check_cuda_shapes(mcfg).with_context(|| format!("--device {}", req.device))?;
    }
    let (rank, world) = rank_and_world()?;
    let seq = mcfg.max_seq_len;
    let accum = ts.grad_accum_steps(seq, world)?;
    if ts.num_iterations == 0 {
        bail!("num_iterations must be positive");
    }
    if ts.eval_batches == 0 {
        bail!("eval_batches must be positive");
    }
    let predicted: usize =
        crate::info::predict_training_bytes(mcfg, ts.device_batch_size, seq, ts.grad_checkpoint).iter().sum();
    // (the host-memory check applies to CPU training; the device allocator reports its own limit)
    if req.device == Device::Cpu {
        memory::check_fits(
            predicted,
            &format!("training this model at device_batch_size {} × max_seq_len {seq}", ts.device_batch_size),
        )?;
    }
    let (train_src, val_src, lang) = open_data(ts, mcfg)?;
    let loader = Loader::new(train_src, ts.device_batch_size, seq, rank, world, Rng::derive(ts.seed, "data"))?;
    let val = Loader::new(val_src, ts.device_batch_size, seq, rank, world, Rng::new(0))?;
    // Bits per byte of validation: the scored targets' tokens and text bytes (when a codec is known).
    let val_codec: Option<Box<dyn crate::data::TextCodec>> = match (&lang, &ts.data) {
        (Some(l), _) => Some(Box::new(l.clone())),
        (None, Some(p)) => crate::data::codec::codec_for_data(p).ok().flatten(),
        (None, None) => None,
    };
    let val_bytes = val_codec.and_then(|c| crate::eval::target_bytes(&val, ts.eval_batches, c.as_ref()));

    if val.sequential_batch(0).is_none() {
        bail!(
            "the validation data is shorter than one batch of device_batch_size {} × max_seq_len {seq} tokens",
            ts.device_batch_size
        );
    }
    crate::data::prepare::check_data_tokenizer(ts.data.as_deref(), mcfg.vocab_size)?;
    let data = RunData { loader, val, lang, val_bytes, accum };
    match req.device {
        Device::Cpu => run::run(&req, CpuOps::new(mcfg), data),
        Device::Cuda(i) => run::run(&req, crate::device::cuda_ops(i, mcfg)?, data),
    }
}

/// What `train` prepared before the run directory exists: the data and the micro-batch count.
struct RunData {
    loader: Loader,
    val: Loader,
    lang: Option<crate::data::synthetic::SyntheticLanguage>,
    /// (tokens, bytes) of the validation targets, for bits per byte.
    val_bytes: Option<(usize, u64)>,
    accum: usize,
}
