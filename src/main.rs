//! The `nanoseek` command line: parse, call the library, print.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nanoseek::backend::cuda::gemm::{set_gemm_engine, GemmEngine};
use nanoseek::device::Device;
use nanoseek::nn::{ConfigOverrides, ModelConfig};
use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "nanoseek", version, about = "Train DeepSeek-V3.2-style language models end to end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: `tiny` on the embedded synthetic language, a few minutes on a laptop CPU).
    Train(Box<TrainArgs>),
    /// Exact parameter counts per component and predicted memory for a model size or config.
    Info(InfoArgs),
    /// Loss, perplexity and bits per byte of a checkpoint (default data: the run's own validation split).
    Eval(EvalArgs),
    /// Prepare data: train (or load) a BPE tokenizer, write token shards, a train/val split and a manifest.
    Data(Box<DataArgs>),
    /// Time a few training steps per op, with FLOP/s, MFU and the memory breakdown.
    Profile(ProfileArgs),
    /// Talk to a trained model (KV-cache generation): interactive, batch (JSONL) or test (speed and memory).
    Demo(DemoArgs),
    /// Time the CUDA kernels at PyTorch's shapes: rates, fraction of the ceilings, ratio to a torch_baselines.py JSON.
    Bench(BenchArgs),
    /// Every CUDA kernel family against its CPU twin: a PASS/FAIL table with margins, exit 0/1 (77: no device).
    Selftest(nanoseek::selftest::command::Args),
    /// The run report (report.md) of a run directory, rebuilt from its files: written there and printed.
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// A run directory (runs/NAME).
    run_dir: PathBuf,
    /// Print only; do not write RUN_DIR/report.md.
    #[arg(long)]
    no_write: bool,
}

fn run_report(r: &ReportArgs) -> Result<()> {
    if r.no_write {
        print!("{}", nanoseek::report::render(&r.run_dir)?);
    } else {
        let path = nanoseek::report::write(&r.run_dir)?;
        print!("{}", std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?);
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    /// cuda or cuda:N (the CPU kernels have criterion benches: cargo bench).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The JSON written by scripts/torch_baselines.py in the same run, for the ratio column.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Fewer and smaller cases (as torch_baselines.py --quick).
    #[arg(long)]
    quick: bool,
    /// Calls per timed batch.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// GEMM engine of the engine's GEMM calls: native (cuda/gemm.cu), cublaslt or wgmma (the
    /// sm_90a kernel of cuda/gemm.cu, compute capability 9.0 only). The GEMM cases are timed on
    /// every engine either way (cuBLASLt when its library loads, wgmma on 9.0).
    #[arg(long, default_value = "native", value_parser = ["native", "cublaslt", "wgmma"])]
    gemm: String,
    /// Write the report here as JSON lines, appended and flushed as each case finishes: the run's
    /// facts, one line per case (timed or skipped), a summary.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Skip a case whose warm-up call alone takes longer than this, and its larger shapes.
    #[arg(long, default_value_t = nanoseek::bench::ROW_BUDGET_S)]
    row_budget_s: f64,
    /// Skip every case left once this many seconds have passed (the command still exits 0).
    #[arg(long, default_value_t = nanoseek::bench::TOTAL_BUDGET_S)]
    budget_s: f64,
}

#[derive(Args)]
struct DemoArgs {
    /// A run directory (its newest checkpoint) or a checkpoint directory.
    #[arg(long)]
    model_path: PathBuf,
    /// interactive: prompt loop with streaming output; batch: prompts one per line, JSONL out;
    /// test: prefill/decode tokens/s and KV-cache memory at --max-seq-len.
    #[arg(long, value_enum, default_value = "interactive")]
    mode: nanoseek::demo::Mode,
    /// Batch mode: file of prompts, one per line (default: stdin).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Batch mode: write the JSONL here; test mode: the JSON report (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample from the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the most likely tokens holding this much probability (1 = all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Most tokens per reply (test mode: tokens decoded).
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Test mode: context length to measure at (default: the model's max_seq_len).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Test mode: also time the uncached forward at the same context.
    #[arg(long)]
    compare_uncached: bool,
}

impl DemoArgs {
    fn options(self) -> nanoseek::demo::DemoOptions {
        nanoseek::demo::DemoOptions {
            model_path: self.model_path,
            mode: self.mode,
            prompts: self.prompts,
            output: self.output,
            sample: nanoseek::generate::SampleOptions {
                max_new_tokens: self.max_new_tokens,
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                stop_token: None,
                seed: self.seed,
            },
            max_seq_len: self.max_seq_len,
            compare_uncached: self.compare_uncached,
        }
    }
}

#[derive(Args)]
struct ProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Recompute every N-th block in the backward (0 = off).
    #[arg(long, default_value_t = 0)]
    grad_checkpoint: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Write the report as JSON here (and an SVG chart beside it, same name with .svg).
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per micro-batch for the memory prediction.
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Recompute every N-th block in the backward (0 = off), for the memory prediction.
    #[arg(long, default_value_t = 0)]
    grad_checkpoint: usize,
    /// Training precision; the CPU engine trains in f32 (bf16 arrives with the CUDA backend).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// One table for every preset (batch 1 at each preset's max_seq_len) beside the sizes the
    /// project's original specification claimed for them.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A run directory (its newest checkpoint) or a checkpoint directory (runs/NAME/checkpoints/step_NNNNNN).
    #[arg(long)]
    model_path: PathBuf,
    /// A `nanoseek data` folder (its val split), or a token shard, nanoseek or llm.c (its last 5%, as
    /// `train` holds it out); default: the run's own data (its config.json), else the embedded
    /// validation stream.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The split of a data folder to score: val (default), test or train.
    #[arg(long)]
    split: Option<String>,
    /// Start every window at a document's BOS (tails of documents longer than a window are not scored).
    #[arg(long)]
    bos_aligned: bool,
    /// Stop after the batch that brings the scored tokens to at least this many.
    #[arg(long, default_value_t = 65536)]
    eval_tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also score synthetic long-range tasks (comma-separated: recall, passkey, needle, copy), by context depth.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Samples per task.
    #[arg(long, default_value_t = 64)]
    task_samples: usize,
    /// Tokens per task sample (default: the model's max_seq_len).
    #[arg(long)]
    task_len: Option<usize>,
    /// Depth buckets of the task accuracy.
    #[arg(long, default_value_t = 4)]
    depth_buckets: usize,
}

/// Which model: a preset, an optional config file on top, then single-field overrides.
#[derive(Args)]
struct ModelArgs {
    /// Preset: tiny, small, medium, large, xlarge, full.
    #[arg(long, default_value = "tiny")]
    model_size: String,
    /// TOML or JSON file of model fields (may name its own `model_size`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Vocabulary size (every token id must be below it).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    n_layer: Option<usize>,
    /// Model width.
    #[arg(long)]
    n_embd: Option<usize>,
    /// Query heads.
    #[arg(long)]
    n_head: Option<usize>,
    /// Key/value heads (grouped-query attention; divides n_head).
    #[arg(long)]
    n_kv_head: Option<usize>,
    /// Width of one head (default n_embd / n_head, or 128 when that does not divide).
    #[arg(long)]
    head_dim: Option<usize>,
    /// SwiGLU hidden width (default 8/3·n_embd rounded up to a multiple of 64).
    #[arg(long)]
    ffn_hidden: Option<usize>,
    /// Training sequence length (also the model's context length).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// RoPE base.
    #[arg(long)]
    rope_theta: Option<f64>,
    /// Logits pass through cap·tanh(z/cap); 0 = off.
    #[arg(long)]
    logit_softcap: Option<f32>,
    /// Attention per layer, repeated: D dense, W sliding window + global tokens, S DSA (e.g. WWWD, SSSD).
    #[arg(long)]
    attn_pattern: Option<String>,
    /// Window W of the W layers (keys t−W < s ≤ t).
    #[arg(long)]
    dsa_window_size: Option<usize>,
    /// Leading tokens every query of a W layer can see (attention sinks).
    #[arg(long)]
    n_global: Option<usize>,
    /// DSA (S layers): lightning-indexer query heads.
    #[arg(long)]
    index_n_heads: Option<usize>,
    /// DSA: width of the indexer's heads.
    #[arg(long)]
    index_head_dim: Option<usize>,
    /// DSA: keys each query attends to.
    #[arg(long)]
    index_topk: Option<usize>,
    /// DSA: most recent keys always attended to besides the top-k (0 = none).
    #[arg(long)]
    index_local_window: Option<usize>,
    /// DSA: optimizer steps of dense warm-up before attention turns sparse.
    #[arg(long)]
    dsa_warmup_steps: Option<u64>,
    /// MoE: routed experts per MoE layer (0 = dense FFNs everywhere).
    #[arg(long, alias = "num-experts")]
    n_routed_experts: Option<usize>,
    /// MoE: shared experts (always active).
    #[arg(long)]
    n_shared_experts: Option<usize>,
    /// MoE: routed experts per token (K).
    #[arg(long)]
    moe_top_k: Option<usize>,
    /// MoE: hidden width of one expert (default ffn_hidden / (K + shared), rounded up to 32).
    #[arg(long)]
    moe_inter_dim: Option<usize>,
    /// MoE: the first layers keep a dense FFN.
    #[arg(long)]
    first_k_dense: Option<usize>,
    /// MoE: router scores, sigmoid or softmax.
    #[arg(long)]
    score_func: Option<String>,
    /// MoE: the normalized gates are multiplied by this.
    #[arg(long)]
    routed_scaling_factor: Option<f32>,
    /// MoE: γ of the auxiliary-loss-free bias update (0 = off).
    #[arg(long)]
    bias_update_speed: Option<f32>,
    /// MoE: α of the sequence-wise balance loss (0 = off).
    #[arg(long)]
    seq_aux_alpha: Option<f32>,
    /// MoE: expert capacity factor (0 = dropless, the default).
    #[arg(long)]
    expert_capacity_factor: Option<f32>,
}

impl ModelArgs {
    fn resolve(&self) -> Result<ModelConfig> {
        Ok(self.resolve_with_keys()?.0)
    }

    /// The model, and the fields its config file set (a set value is never re-derived).
    fn resolve_with_keys(&self) -> Result<(ModelConfig, BTreeSet<String>)> {
        let mut cfg = ModelConfig::preset(&self.model_size)?;
        let mut file_set = BTreeSet::new();
        if let Some(path) = &self.config {
            (cfg, file_set) = ModelConfig::from_file_with_keys(path, &cfg)?;
        }
        let o = ConfigOverrides {
            vocab_size: self.vocab_size,
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            ffn_hidden: self.ffn_hidden,
            max_seq_len: self.max_seq_len,
            rope_theta: self.rope_theta,
            logit_softcap: self.logit_softcap,
            attn_pattern: self.attn_pattern.clone(),
            dsa_window_size: self.dsa_window_size,
            n_global: self.n_global,
            index_n_heads: self.index_n_heads,
            index_head_dim: self.index_head_dim,
            index_topk: self.index_topk,
            index_local_window: self.index_local_window,
            dsa_warmup_steps: self.dsa_warmup_steps,
            n_routed_experts: self.n_routed_experts,
            n_shared_experts: self.n_shared_experts,
            moe_top_k: self.moe_top_k,
            moe_inter_dim: self.moe_inter_dim,
            first_k_dense: self.first_k_dense,
            score_func: self.score_func.clone(),
            routed_scaling_factor: self.routed_scaling_factor,
            bias_update_speed: self.bias_update_speed,
            seq_aux_alpha: self.seq_aux_alpha,
            expert_capacity_factor: self.expert_capacity_factor,
        };
        o.apply_keeping(&mut cfg, &file_set)?;
        Ok((cfg, file_set))
    }
}

#[derive(Args)]
#[command(args_override_self = true)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per micro-batch.
    #[arg(long)]
    device_batch_size: Option<usize>,
    /// Tokens per optimizer step (a multiple of device_batch_size × max_seq_len; the rest is gradient accumulation).
    #[arg(long)]
    total_batch_size: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    num_iterations: Option<u64>,
    /// Run name (a directory under --runs-dir); default: <model-size>-<UTC timestamp>.
    #[arg(long)]
    run: Option<String>,
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Resume the run named by --run from its checkpoint at this step (its saved config is used);
    /// 0 starts the saved run again from scratch.
    #[arg(long)]
    resume_from_step: Option<u64>,
    /// What to train on: a folder written by `nanoseek data` (its train/val shards and
    /// tokenizer), a nanoseek token shard, or an llm.c/nanoGPT `.bin` shard (the last 5% of a
    /// single shard is held out for validation); default: the embedded synthetic language.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation batches per evaluation (default 4).
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Start from the weights of this run (its newest checkpoint) or checkpoint, with a fresh
    /// optimizer and schedule (fine-tuning, curriculum, context extension); shapes must match.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Seed for initialization and data order (default 42).
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long)]
    save_every: Option<u64>,
    /// Validation loss every N steps (0 = only at the end).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Activation checkpointing: recompute every N-th block in the backward (1 = all blocks; 0 = off).
    #[arg(long)]
    grad_checkpoint: Option<usize>,
    /// Checkpoints to keep (0 = all).
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// AdamW learning rate of the token embedding (default 0.2).
    #[arg(long)]
    embedding_lr: Option<f32>,
    /// AdamW learning rate of lm_head (default 0.004).
    #[arg(long)]
    unembedding_lr: Option<f32>,
    /// Muon learning rate of the block matrices (default 0.02).
    #[arg(long)]
    matrix_lr: Option<f32>,
    /// Decoupled weight decay (default 0).
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Fraction of steps with linear warmup (default 0.1).
    #[arg(long)]
    warmup_ratio: Option<f32>,
    /// Fraction of final steps with linear decay to 0 (default 0.2).
    #[arg(long)]
    warmdown_ratio: Option<f32>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    grad_clip: Option<f32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// GEMM engine on CUDA: native (the handwritten cuda/gemm.cu), cublaslt (the library, loaded at
    /// run time) or wgmma (the handwritten Hopper kernel; compute capability 9.0 only, else an error).
    #[arg(long, default_value = "native", value_parser = ["native", "cublaslt", "wgmma"])]
    gemm: String,
    /// Tokens to sample from the trained model at the end (0 = none).
    #[arg(long, default_value_t = 60)]
    sample_tokens: usize,
    /// No progress bar or log lines.
    #[arg(long)]
    quiet: bool,
    /// On CUDA, start without the quick kernel selftest of the model's kernel families.
    #[arg(long)]
    skip_selftest: bool,
    /// Weights & Biases project, as the original scripts' flag: stored in config.json, and a hint
    /// is printed for `wandb sync` of the run's TensorBoard events (no network is used).
    #[arg(long)]
    wandb_project: Option<String>,
}

/// `--data` as an absolute path without `.`/`..`/links, so a run's config.json names it
/// wherever a later command runs from.
fn canonical_data(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("--data {}: not found", path.display()))
}

/// YYYYmmdd-HHMMSS in UTC, for default run names.
fn utc_stamp() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil-from-days (proleptic Gregorian)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Applies `--gemm` to every CUDA GEMM of the process (an error when cuBLASLt cannot be loaded).
fn select_gemm(name: &str) -> Result<GemmEngine> {
    let engine: GemmEngine = name.parse().map_err(|e: String| anyhow::anyhow!("--gemm: {e}"))?;
    set_gemm_engine(engine).map_err(|e| anyhow::anyhow!("--gemm {name}: {e}"))?;
    Ok(engine)
}

fn run_train(a: TrainArgs) -> Result<()> {
    if a.init_from.is_some() && a.resume_from_step.is_some() {
        anyhow::bail!("--init-from starts a new run; it cannot be combined with --resume-from-step");
    }
    if a.eval_batches == Some(0) {
        anyhow::bail!("--eval-batches must be at least 1");
    }
    let device = Device::resolve(&a.device)?;
    select_gemm(&a.gemm)?;
    let (run_name, run) = match a.resume_from_step {
        Some(_) => {
            let name = a.run.clone().context("--resume-from-step needs --run NAME (the run to resume)")?;
            let path = a.runs_dir.join(&name).join("config.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot resume: {} not found", path.display()))?;
            let mut run: RunConfig =
                serde_json::from_str(&text).with_context(|| format!("{} is not a valid run config", path.display()))?;
            if let Some(n) = a.num_iterations {
                run.train.num_iterations = n;
            }
            if a.wandb_project.is_some() {
                run.train.wandb_project.clone_from(&a.wandb_project);
            }
            if let Some(n) = a.eval_batches {
                run.train.eval_batches = n;
            }
            if let Some(d) = &a.data {
                // The same data moved elsewhere, or new data of the same vocabulary; a
                // vocabulary the model cannot hold is refused when the data is opened.
                let d = canonical_data(d)?;
                if run.train.data.as_ref() != Some(&d) {
                    eprintln!(
                        "resuming on --data {} (the run's config named {})",
                        d.display(),
                        run.train.data.as_ref().map_or("the embedded data".into(), |p| p.display().to_string())
                    );
                }
                run.train.data = Some(d);
            }
            eprintln!("resuming run '{name}' with its saved config ({})", path.display());
            (name, run)
        }
        None => {
            let (mut model, file_set) = a.model.resolve_with_keys()?;
            let data = a.data.as_deref().map(canonical_data).transpose()?;
            if let (Some(data), None, false) = (&data, a.model.vocab_size, file_set.contains("vocab_size")) {
                // Unless set (in a config file or by --vocab-size), the model's vocabulary is
                // the data's (its tokenizer's, or for an llm.c shard the ids it holds).
                model.vocab_size = nanoseek::data::prepare::data_vocab_size(data)?;
                model.validate()?;
            }
            let mut t = TrainSettings::for_model(&model);
            let batch_given = a.device_batch_size.is_some();
            t.device_batch_size = a.device_batch_size.unwrap_or(t.device_batch_size);
            t.total_batch_size = a.total_batch_size.unwrap_or(if batch_given {
                t.device_batch_size.saturating_mul(model.max_seq_len)
            } else {
                t.total_batch_size
            });
            t.num_iterations = a.num_iterations.unwrap_or(t.num_iterations);
            t.seed = a.seed.unwrap_or(t.seed);
            t.data = data;
            t.eval_batches = a.eval_batches.unwrap_or(t.eval_batches);
            t.init_from =
                a.init_from.as_deref().map(nanoseek::demo::resolve_checkpoint).transpose().context("--init-from")?;
            t.save_every = a.save_every.unwrap_or(t.save_every);
            t.eval_every = a.eval_every.unwrap_or(t.eval_every);
            t.keep_checkpoints = a.keep_checkpoints.unwrap_or(t.keep_checkpoints);
            t.grad_checkpoint = a.grad_checkpoint.unwrap_or(t.grad_checkpoint);
            t.wandb_project.clone_from(&a.wandb_project);
            let o = &mut t.optim;
            o.embedding_lr = a.embedding_lr.unwrap_or(o.embedding_lr);
            o.unembedding_lr = a.unembedding_lr.unwrap_or(o.unembedding_lr);
            o.matrix_lr = a.matrix_lr.unwrap_or(o.matrix_lr);
            o.weight_decay = a.weight_decay.unwrap_or(o.weight_decay);
            o.warmup_ratio = a.warmup_ratio.unwrap_or(o.warmup_ratio);
            o.warmdown_ratio = a.warmdown_ratio.unwrap_or(o.warmdown_ratio);
            o.grad_clip = a.grad_clip.unwrap_or(o.grad_clip);
            let name = a.run.clone().unwrap_or_else(|| format!("{}-{}", a.model.model_size, utc_stamp()));
            (name, RunConfig { model, train: t })
        }
    };
    if run_name.is_empty() || run_name == "." || run_name == ".." {
        anyhow::bail!("--run '{run_name}' does not name a run directory");
    }
    let device = device.for_model(&a.device, &run.model);
    if let (Device::Cuda(ordinal), false) = (device, a.skip_selftest) {
        nanoseek::selftest::preflight(ordinal, &run.model)?;
    }
    let run_dir = a.runs_dir.join(&run_name);
    if let Some(project) = &run.train.wandb_project {
        eprintln!(
            "wandb: no network at run time; sync this run later with: wandb sync --sync-tensorboard -p {project} {}",
            run_dir.display()
        );
    }
    let summary = train::train(TrainRequest {
        run,
        run_dir: run_dir.clone(),
        resume_from_step: a.resume_from_step,
        device,
        verbose: !a.quiet,
        sample_tokens: a.sample_tokens,
    })?;
    let first = summary.losses.first().map(|l| l.1).unwrap_or(f32::NAN);
    let last = summary.losses.last().map(|l| l.1).unwrap_or(f32::NAN);
    println!(
        "done: loss {first:.4} → {last:.4}, val loss {}, {:.0} tokens/s",
        summary.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        summary.tokens_per_s
    );
    println!("run directory: {}", run_dir.display());
    println!("  checkpoint:  {}", summary.checkpoint.display());
    println!("  metrics:     {}", run_dir.join("metrics.jsonl").display());
    println!("  plot:        {}", run_dir.join("loss.svg").display());
    println!(
        "  events:      {} (tensorboard --logdir {})",
        run_dir.join("events.out.tfevents.*").display(),
        run_dir.display()
    );
    println!("  report:      {}", run_dir.join(nanoseek::report::REPORT).display());
    if let Some(s) = summary.sample {
        println!("sample:\n{s}");
    }
    Ok(())
}

fn run_profile(p: &ProfileArgs) -> Result<()> {
    let cfg = p.model.resolve()?;
    let report = nanoseek::profile::run(&cfg, p.device_batch_size, p.grad_checkpoint, p.steps)?;
    print!("{}", report.table());
    if let Some(out) = &p.output {
        nanoseek::fsutil::write_output(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        let svg = out.with_extension("svg");
        nanoseek::fsutil::write_output(&svg, report.svg().as_bytes())?;
        println!("wrote {} and {}", out.display(), svg.display());
    }
    Ok(())
}

fn run_bench(b: &BenchArgs) -> Result<()> {
    let ordinal = match b.device.as_str() {
        "cuda" => 0,
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("--device {d}: nanoseek bench runs on cuda or cuda:N"),
        },
    };
    let gemm = select_gemm(&b.gemm)?;
    let opts = nanoseek::bench::BenchOptions {
        ordinal,
        quick: b.quick,
        baseline: b.baseline.clone(),
        iters: b.iters,
        gemm,
        row_budget_s: b.row_budget_s,
        budget_s: b.budget_s,
        output: b.output.clone(),
    };
    let report = nanoseek::bench::run(&opts)?;
    // The rows were printed as they finished; the whole table again, with the skipped cases last.
    println!("\nsummary: {} cases timed, {} skipped", report.rows.len(), report.skipped.len());
    print!("{}", nanoseek::bench::table(&report));
    if let Some(out) = &b.output {
        println!("wrote {}", out.display());
    }
    let bad = report.non_finite();
    if !bad.is_empty() {
        anyhow::bail!("{} case(s) wrote NaN or infinite outputs: {}", bad.len(), bad.join("; "));
    }
    Ok(())
}

fn run_info(i: &InfoArgs) -> Result<()> {
    if i.dtype != "f32" {
        anyhow::bail!("--dtype {}: the CPU engine trains in f32 only (bf16 arrives with the CUDA backend)", i.dtype);
    }
    if i.all {
        return write_stdout(&nanoseek::info::presets_table()?);
    }
    let cfg = i.model.resolve()?;
    train::micro_batch_tokens(i.device_batch_size, cfg.max_seq_len).context("--device-batch-size")?;
    write_stdout(&nanoseek::info::report(&i.model.model_size, &cfg))?;
    write_stdout(&nanoseek::info::memory_report(&cfg, i.device_batch_size, cfg.max_seq_len, i.grad_checkpoint))
}

/// Prints to stdout, reporting a failed write (a full disk, a closed pipe) as an error, not a panic.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("cannot write to standard output")
}

#[derive(Args)]
struct DataArgs {
    /// Text or JSONL (.jsonl) files or folders; with --dataset wikitext, the WikiText folder.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Validation text or JSONL files or folders (default: hold out --val-fraction of the documents).
    #[arg(long, num_args = 1..)]
    val_input: Vec<PathBuf>,
    /// A known dataset layout: wikitext (wiki.train.tokens … or train.txt/valid.txt/test.txt).
    #[arg(long)]
    dataset: Option<String>,
    /// The string field holding the text in JSONL records.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// Documents of the embedded synthetic language instead of text (no tokenizer).
    #[arg(long)]
    synthetic: bool,
    /// With --synthetic: documents to generate.
    #[arg(long, default_value_t = 10000)]
    num_samples: usize,
    /// With --synthetic: tokens per document at most.
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    /// With --synthetic: long-range task samples of exactly --max-seq-len tokens (comma-separated:
    /// recall, passkey, needle, copy; depths uniform in [0, 1]) instead of plain documents.
    #[arg(long, value_delimiter = ',')]
    task: Vec<String>,
    /// Use this tokenizer.json (GPT-2's, DeepSeek's, …) instead of training one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained BPE tokenizer (256 bytes and the special tokens included).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Train the tokenizer on at most this many bytes of text.
    #[arg(long, default_value_t = 1 << 30)]
    tokenizer_train_bytes: u64,
    /// Fraction of documents held out for validation (without --val-input).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Seed (for --synthetic).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder (tokenizer.json, train.bin, val.bin, manifest.json).
    #[arg(long, short, default_value = "data")]
    output: PathBuf,
    /// No progress bars or messages.
    #[arg(long)]
    quiet: bool,
    /// Write into --output even when it already holds files (they are replaced).
    #[arg(long)]
    force: bool,
}

fn run_data(d: DataArgs) -> Result<()> {
    if !d.force {
        if let Ok(mut entries) = std::fs::read_dir(&d.output) {
            if entries.next().is_some() {
                anyhow::bail!(
                    "--output {} already holds files (runs may point to it); choose another folder or add --force to replace them",
                    d.output.display()
                );
            }
        }
    }
    use nanoseek::data::prepare::{prepare, PrepareOptions};
    let o = PrepareOptions {
        inputs: d.input,
        val_inputs: d.val_input,
        dataset: d.dataset,
        jsonl_field: d.jsonl_field,
        synthetic: d.synthetic.then_some((d.num_samples, d.max_seq_len)),
        tasks: d.task.iter().map(|t| nanoseek::data::tasks::TaskKind::parse(t)).collect::<Result<_>>()?,
        tokenizer: d.tokenizer,
        vocab_size: d.vocab_size,
        tokenizer_train_bytes: d.tokenizer_train_bytes,
        val_fraction: d.val_fraction,
        seed: d.seed,
        output: d.output.clone(),
        progress: !d.quiet,
    };
    let m = prepare(&o)?;
    println!("wrote {} (tokenizer: {}, {} ids)", d.output.display(), m.tokenizer.kind, m.vocab_size);
    for (name, s) in &m.splits {
        println!(
            "  {name:<5} {:>12} tokens {:>8} documents {:>13} bytes  {:.2} bytes/token  {}",
            s.tokens,
            s.documents,
            s.bytes,
            s.bytes_per_token,
            d.output.join(&s.file).display()
        );
    }
    println!("train on it: nanoseek train --data {}", d.output.display());
    Ok(())
}

fn run_eval(e: EvalArgs) -> Result<()> {
    let o = nanoseek::eval::EvalOptions {
        model_path: nanoseek::demo::resolve_checkpoint(&e.model_path).context("--model-path")?,
        data: e.data,
        split: e.split,
        batch_size: e.batch_size,
        eval_tokens: e.eval_tokens,
        bos_aligned: e.bos_aligned,
        output: e.output,
        tasks: e.tasks,
        task_samples: e.task_samples,
        task_len: e.task_len,
        depth_buckets: e.depth_buckets,
    };
    let r = nanoseek::eval::evaluate(&o)?;
    write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => run_train(*a),
        Command::Eval(e) => run_eval(e),
        Command::Data(d) => run_data(*d),
        Command::Info(i) => run_info(&i),
        Command::Profile(p) => run_profile(&p),
        Command::Demo(d) => nanoseek::demo::run(&d.options()),
        Command::Bench(b) => run_bench(&b),
        Command::Report(r) => run_report(&r),
        Command::Selftest(s) => return ExitCode::from(nanoseek::selftest::command::run(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
