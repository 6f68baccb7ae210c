//! The training loop: data → micro-batches → tape → gradients → optimizer,
//! with evaluation, metrics, plots and checkpoints along the way.

pub mod checkpoint;
mod data;
pub mod events;
pub mod metrics;
pub mod plot;
pub mod run_dir;
pub mod step;
pub mod step_cpu;
pub mod step_cuda;

pub use data::{held_out_tokens, open_checked_shard, open_data};

use crate::autograd::Tape;
use crate::data::synthetic::{BOS, EOT};
use crate::data::Loader;
use crate::device::Device;
use crate::fsutil::write_atomic;
use crate::generate::{generate, SampleOptions};
use crate::memory::{self, Category, Tracked};
use crate::nn::{model::MoeLoad, Model, ModelConfig};
use crate::optim::{clip_grad_norm, lr_multiplier, OptimConfig, Optimizer};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use checkpoint::CheckpointState;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
        let mut tape = Tape::inference();
        let pv = model.params_on(&mut tape);
        let loss = model.loss(&mut tape, &pv, &batch.ids, &batch.targets, val.batch, val.seq_len)?;
        total += tape.value(loss)[0] as f64;
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

pub struct StepStats {
    /// Mean loss over the micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Seconds in the optimizer update.
    pub update_s: f64,
    /// Per-op times of the forward and backward passes, when asked for.
    pub op_times: Option<crate::autograd::OpTimes>,
    /// Per layer, the routed load summed over the micro-batches (None for dense FFNs).
    pub moe_loads: Vec<Option<MoeLoad>>,
    /// The DSA indexers' KL loss, averaged over DSA layers and micro-batches (None without DSA).
    pub indexer_loss: Option<f32>,
}

/// One optimizer step, exactly as `train` runs it: `accum` micro-batches from `next_batch`
/// (forward, backward seeded with 1/accum, gradients summed), clipping, then the update with
/// learning-rate multiplier `lr`, and the MoE routing-bias update from the step's load. The memory
/// peak window restarts at the step's start. `loss` is the language-model loss; the MoE balance
/// losses are differentiated with it but reported per layer in `moe_loads`.
pub fn train_step(
    model: &mut Model,
    opt: &mut Optimizer,
    mut next_batch: impl FnMut() -> crate::data::Batch,
    accum: usize,
    grad_clip: f32,
    lr: f32,
    profile: bool,
) -> Result<StepStats> {
    memory::reset_peak();
    let mut grads: Vec<Vec<f32>> = model.params.iter().map(|p| vec![0.0; p.tensor.numel()]).collect();
    let _grads_memory = Tracked::floats(Category::Gradients, model.num_params());
    let t = model.config.max_seq_len;
    let mut loss_sum = 0.0f64;
    let mut op_times: Option<crate::autograd::OpTimes> = profile.then(Default::default);
    let mut moe_loads: Vec<Option<MoeLoad>> = vec![None; model.config.n_layer];
    let (mut kl_sum, mut kl_n) = (0.0f64, 0usize);
    for micro in 0..accum {
        let batch = next_batch();
        let rows = batch.ids.len() / t;
        let mut tape = if profile { Tape::with_profiling() } else { Tape::new() };
        let pv = model.params_on(&mut tape);
        let loss = model.loss(&mut tape, &pv, &batch.ids, &batch.targets, rows, t)?;
        let lv = tape.value(loss)[0];
        if !lv.is_finite() {
            bail!("loss became {lv} (micro-batch {micro}). Try a lower learning rate.");
        }
        let aux = tape.aux_loss_total();
        if !aux.is_finite() {
            bail!("an auxiliary loss (MoE balance or DSA indexer) became {aux} (micro-batch {micro}). Try a lower learning rate.");
        }
        loss_sum += lv as f64;
        tape.backward(loss, 1.0 / accum as f32);
        for (g, &v) in grads.iter_mut().zip(&pv) {
            if let Some(d) = tape.grad(v) {
                crate::backend::cpu::elementwise::accumulate(g, d);
            }
        }
        if let (Some(all), Some(these)) = (&mut op_times, tape.op_times()) {
            all.merge(these);
        }
        for kl in model.take_indexer_losses().into_iter().flatten() {
            (kl_sum, kl_n) = (kl_sum + kl as f64, kl_n + 1);
        }
        for (sum, load) in moe_loads.iter_mut().zip(model.take_moe_loads()) {
            if let Some(load) = load {
                sum.get_or_insert_with(MoeLoad::default).merge(&load);
            }
        }
    }
    // Data parallelism would all-reduce `grads` here (the one place they are complete).
    let grad_norm = clip_grad_norm(&mut grads, grad_clip);
    if !grad_norm.is_finite() {
        bail!("gradient norm became {grad_norm}");
    }
    let t0 = Instant::now();
    opt.update(model, &grads, lr);
    model.update_moe_bias(&moe_loads);
    let update_s = t0.elapsed().as_secs_f64();
    for load in moe_loads.iter_mut().flatten() {
        load.balance_loss /= accum as f32;
    }
    let indexer_loss = (kl_n > 0).then(|| (kl_sum / kl_n as f64) as f32);
    Ok(StepStats { loss: (loss_sum / accum as f64) as f32, grad_norm, update_s, op_times, moe_loads, indexer_loss })
}

/// Attributes the CUDA trainer's resident buffers (uploaded under the allocator's default
/// category, workspace) to gradients, optimizer state and, for the rest (f32 master weights,
/// their bf16 copies, the RoPE table), parameters; then checks the predicted device bytes
/// against what the device can give, before the run directory is created.
fn cuda_memory_setup(
    tr: &step::DenseTrainer<step_cuda::CudaOps>,
    mcfg: &ModelConfig,
    ts: &TrainSettings,
) -> Result<()> {
    let be = &tr.ops.be;
    be.recategorize(Category::Workspace, Category::Parameters);
    for g in &tr.grads {
        g.set_category(Category::Gradients);
    }
    for s in &tr.state {
        match s {
            step::StateBuf::AdamW { m, v } => {
                m.set_category(Category::OptimizerState);
                v.set_category(Category::OptimizerState);
            }
            step::StateBuf::Muon { momentum } => momentum.set_category(Category::OptimizerState),
        }
    }
    let (batch, seq) = (ts.device_batch_size, mcfg.max_seq_len);
    let predicted: usize = crate::info::predict_cuda_training_bytes(mcfg, batch, seq).iter().sum();
    let what = format!("training this model at device_batch_size {batch} × max_seq_len {seq}");
    Ok(crate::backend::cuda::check_fits(be, predicted, &what)?)
}

/// Runs (or resumes) training as requested. Everything is validated before the
/// run directory is created, so bad input leaves no files behind.
pub fn train(req: TrainRequest) -> Result<TrainSummary> {
    let RunConfig { model: mcfg, train: ts } = &req.run;
    mcfg.validate()?;
    ts.optim.validate()?;
    if req.device != Device::Cpu {
        // The kernels' shape rules.
        step_cuda::check_cuda_shapes(mcfg).with_context(|| format!("--device {}", req.device))?;
        if ts.grad_checkpoint > 0 {
            bail!(
                "--device {}: activation checkpointing (--grad-checkpoint {}) is CPU-only so far; \
                 drop it or train on the CPU",
                req.device,
                ts.grad_checkpoint
            );
        }
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
    let mut loader = Loader::new(train_src, ts.device_batch_size, seq, rank, world, Rng::derive(ts.seed, "data"))?;
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

    // From here on this process is the run's only writer; if the setup fails, a run directory it
    // created is removed again.
    let run_lock = run_dir::RunLock::acquire(&req.run_dir)?;
    let setup = (|| {
        let (mut model, opt, start) = match req.resume_from_step {
            // Step 0: the saved run again from scratch (e.g. its first checkpoint never completed).
            Some(step) if step > 0 => {
                let dir = checkpoint::checkpoint_dir(&req.run_dir, step);
                let (model, opt, state) = checkpoint::load(&dir, mcfg, ts.optim.clone())?;
                if state.step >= ts.num_iterations {
                    bail!("checkpoint step {} is already at or past num_iterations {}", state.step, ts.num_iterations);
                }
                loader.rng = state.loader_rng;
                (model, opt, state.step)
            }
            _ => {
                if req.resume_from_step.is_none() && !checkpoint::list_steps(&req.run_dir).is_empty() {
                    bail!(
                        "run directory {} already holds checkpoints; resume with --resume-from-step or pick another --run",
                        req.run_dir.display()
                    );
                }
                let model = match &ts.init_from {
                    Some(dir) => checkpoint::load_model(dir, mcfg)
                        .with_context(|| format!("--init-from {}: its weights do not fit this model", dir.display()))?,
                    None => Model::new(mcfg, ts.seed)?,
                };
                let opt = Optimizer::new(&model, ts.optim.clone());
                (model, opt, 0)
            }
        };
        model.checkpoint_every = ts.grad_checkpoint;
        // On CUDA: the explicit step (train::step) on the device; the host model (with its MoE
        // biases) and optimizer are refreshed from it for checkpoints and sampling.
        let gpu = match req.device {
            Device::Cpu => None,
            Device::Cuda(i) => Some(step_cuda::cuda_trainer(i, &model, &opt)?),
        };
        if let Some(tr) = &gpu {
            cuda_memory_setup(tr, mcfg, ts)?;
        }
        write_atomic(&req.run_dir.join("config.json"), serde_json::to_string_pretty(&req.run)?.as_bytes())?;
        crate::data::prepare::copy_tokenizer_to_run(ts.data.as_deref(), &req.run_dir)?;
        let gpu_name = gpu.as_ref().map(|tr| tr.ops.be.name().to_string());
        crate::report::Hardware::detect(req.device, gpu_name).write(&req.run_dir)?;
        let events = events::EventWriter::create(&req.run_dir, &ts.optim, req.resume_from_step)?;
        let log = metrics::MetricsLog::open(&req.run_dir.join("metrics.jsonl"), Some(start))?.with_events(events);
        Ok((model, opt, start, gpu, log))
    })();
    let (mut model, mut opt, start, mut gpu, mut log) = run_lock.undo_if_failed(setup)?;

    let total = ts.num_iterations;
    let pb = if req.verbose { ProgressBar::new(total) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}")
            .unwrap(),
    );
    pb.set_position(start);
    let say = |s: String| {
        if req.verbose {
            if pb.is_hidden() {
                eprintln!("{s}");
            } else {
                pb.println(s);
            }
        }
    };
    say(format!(
        "training {} params ({} layers, d {}) on {}: {} steps × {} tokens ({} micro-batch(es) of {}×{}), run dir {}",
        model.num_params(),
        mcfg.n_layer,
        mcfg.n_embd,
        req.device,
        total,
        ts.total_batch_size,
        accum,
        ts.device_batch_size,
        seq,
        req.run_dir.display()
    ));
    let log_every = (total / 10).max(1);
    let mut losses = Vec::new();
    let mut val_loss = None;
    // The last good checkpoint of this trajectory: the one resumed from (newer ones on disk may
    // be from a run that went further, and a fresh start has none).
    let mut last_ckpt = req.resume_from_step.filter(|&s| s > 0).map(|s| checkpoint::checkpoint_dir(&req.run_dir, s));
    let t0 = Instant::now();
    let mut tokens_done = 0usize;
    for step in start..total {
        let ts_step = Instant::now();
        let lr = lr_multiplier(step, total, ts.optim.warmup_ratio, ts.optim.warmdown_ratio, ts.optim.final_lr_frac);
        model.dsa_dense_warmup = step < mcfg.dsa_warmup_steps;
        if let Some(tr) = &gpu {
            tr.ops.be.reset_peak(); // the device's peak window is the step, as on the CPU
        }
        let stats = match &mut gpu {
            Some(tr) => {
                tr.dsa_dense_warmup = model.dsa_dense_warmup;
                tr.train_step(|| loader.next_batch(), accum, ts.optim.grad_clip, lr).map(|(loss, grad_norm)| {
                    // the metrics read the biases from the host model
                    model.moe_bias.clone_from(&tr.moe_bias);
                    let step::StepExtras { moe_loads, indexer_loss } = std::mem::take(&mut tr.last_step);
                    StepStats { loss, grad_norm, update_s: 0.0, op_times: None, moe_loads, indexer_loss }
                })
            }
            None => train_step(&mut model, &mut opt, || loader.next_batch(), accum, ts.optim.grad_clip, lr, false),
        }
        .map_err(|e| {
            let last = last_ckpt.as_ref().map_or("none".into(), |p| p.display().to_string());
            e.context(format!("step {} failed; nothing was saved for it (last good checkpoint: {last})", step + 1))
        })?;
        let (loss, grad_norm) = (stats.loss, stats.grad_norm);
        let done = step + 1;
        losses.push((done, loss));
        tokens_done += ts.total_batch_size;
        let dt = ts_step.elapsed().as_secs_f64();
        let tok_s = ts.total_batch_size as f64 / dt;
        // On CUDA the peak is the device allocator's (live blocks, by category at the peak).
        let (peak_mib, device_at_peak) = match &gpu {
            Some(tr) => {
                let m = tr.ops.be.memory_by_category();
                (memory::mib(m.report.peak_total), Some(m.at_peak))
            }
            None => (memory::mib(memory::report().peak_total), None),
        };
        let mut record = json!({"step": done, "loss": loss, "lr_mult": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "step_time_s": dt, "elapsed_s": t0.elapsed().as_secs_f64(), "peak_memory_mib": peak_mib});
        if let Some(at_peak) = device_at_peak {
            let by_cat: serde_json::Map<String, serde_json::Value> = memory::CATEGORIES
                .iter()
                .map(|c| (c.name().to_string(), json!(memory::mib(at_peak[*c as usize]))))
                .collect();
            record["peak_memory_by_category"] = serde_json::Value::Object(by_cat);
        }
        if mcfg.moe.enabled() {
            record["moe"] = metrics::moe_record(&stats.moe_loads, &model.moe_bias);
        }
        if let Some(kl) = stats.indexer_loss {
            record["indexer_loss"] = json!(kl);
            record["dsa_dense_warmup"] = json!(model.dsa_dense_warmup);
        }
        log.log(record)?;
        pb.set_position(done);
        pb.set_message(format!("loss {loss:.4} | {tok_s:.0} tok/s | peak {peak_mib:.0} MiB"));
        let is_last = done == total;
        if (ts.eval_every > 0 && done % ts.eval_every == 0) || is_last {
            let v = match &gpu {
                Some(tr) => tr.evaluate(&val, ts.eval_batches)?,
                None => evaluate(&model, &val, ts.eval_batches)?,
            };
            val_loss = Some(v);
            let mut record = json!({"step": done, "val_loss": v});
            if let Some((tokens, bytes)) = val_bytes {
                // evaluate() averages equal-sized batches, so v × tokens is the total nats
                record["val_bpb"] = json!(crate::eval::bits_per_byte(v as f64 * tokens as f64, bytes));
            }
            log.log(record)?;
        }
        if done % log_every == 0 || is_last {
            let vl = val_loss.map_or(String::new(), |v| format!(" | val {v:.4}"));
            let by_cat = device_at_peak.map_or(String::new(), |a| {
                let parts: Vec<String> = memory::CATEGORIES
                    .iter()
                    .map(|c| format!("{} {:.0}", c.name(), memory::mib(a[*c as usize])))
                    .collect();
                format!(" on the device ({})", parts.join(", "))
            });
            say(format!("step {done:>5}/{total} | loss {loss:.4}{vl} | lr ×{lr:.3} | grad norm {grad_norm:.3} | {tok_s:.0} tok/s | peak mem {peak_mib:.0} MiB{by_cat}"));
        }
        if (ts.save_every > 0 && done % ts.save_every == 0) || is_last {
            if let Some(tr) = &gpu {
                tr.to_host(&mut model, &mut opt)?;
            }
            let state = CheckpointState {
                format_version: checkpoint::FORMAT_VERSION,
                step: done,
                loader_rng: loader.rng.clone(),
            };
            let saved = checkpoint::save(&req.run_dir, &model, &opt, &state, ts.keep_checkpoints).map_err(|e| {
                let last = last_ckpt.as_ref().map_or("none".into(), |p| p.display().to_string());
                e.context(format!(
                    "step {done}: no checkpoint written (last good checkpoint: {last}); if the values diverged, try a lower learning rate"
                ))
            })?;
            last_ckpt = Some(saved);
            write_plot(&req.run_dir)?;
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let tokens_per_s = tokens_done as f64 / elapsed.max(1e-9);
    let sample = match (req.sample_tokens, &lang) {
        (0, _) => None,
        (n, lang) => {
            let opts = SampleOptions {
                max_new_tokens: n,
                temperature: 0.8,
                top_k: 40,
                top_p: 1.0,
                stop_token: Some(EOT),
                seed: ts.seed,
            };
            let out = generate(&model, &[BOS], &opts)?;
            Some(match (lang, crate::data::codec::codec_for_run(&req.run_dir)) {
                (Some(l), _) => l.decode(&out),
                (None, Ok(codec)) => codec.decode(&out),
                (None, Err(_)) => format!("{out:?}"),
            })
        }
    };
    crate::report::finish_run(&req.run_dir, sample.as_deref())?;
    Ok(TrainSummary {
        losses,
        val_loss,
        tokens_per_s,
        checkpoint: last_ckpt.expect("the last step always saves"),
        sample,
    })
}
