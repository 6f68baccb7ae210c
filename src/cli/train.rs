//! `nanoseek train`: its flags (the model's, shared with `profile` and `info`, and the run's)
//! and `run_train`, which resolves them into a run and calls the library. Part of the binary.

use crate::select_gemm;
use anyhow::{Context, Result};
use clap::Args;
use nanoseek::device::Device;
use nanoseek::nn::{ConfigOverrides, ModelConfig};
use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which model: a preset, an optional config file on top, then single-field overrides.
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Preset: tiny, small, medium, large, xlarge, full.
    #[arg(long, default_value = "tiny")]
    pub(crate) model_size: String,
    /// TOML or JSON file of model fields (may name its own `model_size`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Vocabulary size (every token id must be below it).
    #[arg(long)]
    pub(crate) vocab_size: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    pub(crate) n_layer: Option<usize>,
    /// Model width.
    #[arg(long)]
    pub(crate) n_embd: Option<usize>,
    /// Query heads.
    #[arg(long)]
    pub(crate) n_head: Option<usize>,
    /// Key/value heads (grouped-query attention; divides n_head).
    #[arg(long)]
    pub(crate) n_kv_head: Option<usize>,
    /// Width of one head (default n_embd / n_head, or 128 when that does not divide).
    #[arg(long)]
    pub(crate) head_dim: Option<usize>,
    /// SwiGLU hidden width (default 8/3·n_embd rounded up to a multiple of 64).
    #[arg(long)]
    pub(crate) ffn_hidden: Option<usize>,
    /// Training sequence length (also the model's context length).
    #[arg(long)]
    pub(crate) max_seq_len: Option<usize>,
    /// RoPE base.
    #[arg(long)]
    pub(crate) rope_theta: Option<f64>,
    /// Logits pass through cap·tanh(z/cap); 0 = off.
    #[arg(long)]
    pub(crate) logit_softcap: Option<f32>,
    /// Attention per layer, repeated: D dense, W sliding window + global tokens, S DSA (e.g. WWWD, SSSD).
    #[arg(long)]
    pub(crate) attn_pattern: Option<String>,
    /// Window W of the W layers (keys t−W < s ≤ t).
    #[arg(long)]
    pub(crate) dsa_window_size: Option<usize>,
    /// Leading tokens every query of a W layer can see (attention sinks).
    #[arg(long)]
    pub(crate) n_global: Option<usize>,
    /// DSA (S layers): lightning-indexer query heads.
    #[arg(long)]
    pub(crate) index_n_heads: Option<usize>,
    /// DSA: width of the indexer's heads.
    #[arg(long)]
    pub(crate) index_head_dim: Option<usize>,
    /// DSA: keys each query attends to.
    #[arg(long)]
    pub(crate) index_topk: Option<usize>,
    /// DSA: most recent keys always attended to besides the top-k (0 = none).
    #[arg(long)]
    pub(crate) index_local_window: Option<usize>,
    /// DSA: optimizer steps of dense warm-up before attention turns sparse.
    #[arg(long)]
    pub(crate) dsa_warmup_steps: Option<u64>,
    /// MoE: routed experts per MoE layer (0 = dense FFNs everywhere).
    #[arg(long, alias = "num-experts")]
    pub(crate) n_routed_experts: Option<usize>,
    /// MoE: shared experts (always active).
    #[arg(long)]
    pub(crate) n_shared_experts: Option<usize>,
    /// MoE: routed experts per token (K).
    #[arg(long)]
    pub(crate) moe_top_k: Option<usize>,
    /// MoE: hidden width of one expert (default ffn_hidden / (K + shared), rounded up to 32).
    #[arg(long)]
    pub(crate) moe_inter_dim: Option<usize>,
    /// MoE: the first layers keep a dense FFN.
    #[arg(long)]
    pub(crate) first_k_dense: Option<usize>,
    /// MoE: router scores, sigmoid or softmax.
    #[arg(long)]
    pub(crate) score_func: Option<String>,
    /// MoE: the normalized gates are multiplied by this.
    #[arg(long)]
    pub(crate) routed_scaling_factor: Option<f32>,
    /// MoE: γ of the auxiliary-loss-free bias update (0 = off).
    #[arg(long)]
    pub(crate) bias_update_speed: Option<f32>,
    /// MoE: α of the sequence-wise balance loss (0 = off).
    #[arg(long)]
    pub(crate) seq_aux_alpha: Option<f32>,
    /// MoE: expert capacity factor (0 = dropless, the default).
    #[arg(long)]
    pub(crate) expert_capacity_factor: Option<f32>,
    /// Multi-token prediction: D extra modules, module k predicting the token k+1 ahead (0 = off).
    #[arg(long)]
    pub(crate) mtp_depth: Option<usize>,
    /// Multi-token prediction: λ, the weight of the mean MTP loss (λ/D · Σ_k CE_k).
    #[arg(long)]
    pub(crate) mtp_lambda: Option<f32>,
    /// Attention projection: gqa (default) or mla (Multi-head Latent Attention).
    #[arg(long)]
    pub(crate) attention: Option<String>,
    /// DSA: the lightning indexer, gqa or v32 (DeepSeek-V3.2's; the default with --attention mla).
    #[arg(long)]
    pub(crate) indexer: Option<String>,
    /// DSA, v32 indexer: rotated dims of each indexer head (0 = index_head_dim / 2).
    #[arg(long)]
    pub(crate) index_rope_dim: Option<usize>,
    /// MLA: rank of the query latent (0 = a direct query projection).
    #[arg(long)]
    pub(crate) q_lora_rank: Option<usize>,
    /// MLA: rank of the key/value latent (0 = 4·head_dim).
    #[arg(long)]
    pub(crate) kv_lora_rank: Option<usize>,
    /// MLA: per-head query/key width without position (0 = head_dim).
    #[arg(long)]
    pub(crate) qk_nope_head_dim: Option<usize>,
    /// MLA: width of the rotary part of queries and of the shared rotary key (0 = head_dim / 2).
    #[arg(long)]
    pub(crate) qk_rope_head_dim: Option<usize>,
    /// MLA: per-head value width (0 = head_dim).
    #[arg(long)]
    pub(crate) v_head_dim: Option<usize>,
}

impl ModelArgs {
    pub(crate) fn resolve(&self) -> Result<ModelConfig> {
        Ok(self.resolve_with_keys()?.0)
    }

    /// The model, and the fields its config file set (a set value is never re-derived).
    pub(crate) fn resolve_with_keys(&self) -> Result<(ModelConfig, BTreeSet<String>)> {
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
            indexer: self.indexer.clone(),
            index_rope_dim: self.index_rope_dim,
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
            mtp_depth: self.mtp_depth,
            mtp_lambda: self.mtp_lambda,
            attention: self.attention.clone(),
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
        };
        o.apply_keeping(&mut cfg, &file_set)?;
        Ok((cfg, file_set))
    }
}

#[derive(Args)]
#[command(args_override_self = true)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub(crate) device_batch_size: Option<usize>,
    /// Tokens per optimizer step (a multiple of device_batch_size × max_seq_len; the rest is gradient accumulation).
    #[arg(long)]
    pub(crate) total_batch_size: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub(crate) num_iterations: Option<u64>,
    /// Run name (a directory under --runs-dir); default: <model-size>-<UTC timestamp>.
    #[arg(long)]
    pub(crate) run: Option<String>,
    #[arg(long, default_value = "runs")]
    pub(crate) runs_dir: PathBuf,
    /// Resume the run named by --run from its checkpoint at this step (its saved config is used);
    /// 0 starts the saved run again from scratch.
    #[arg(long)]
    pub(crate) resume_from_step: Option<u64>,
    /// What to train on: a folder written by `nanoseek data` (its train/val shards and
    /// tokenizer), a nanoseek token shard, or an llm.c/nanoGPT `.bin` shard (the last 5% of a
    /// single shard is held out for validation); default: the embedded synthetic language.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Validation batches per evaluation (default 4).
    #[arg(long)]
    pub(crate) eval_batches: Option<usize>,
    /// Start from the weights of this run (its newest checkpoint) or checkpoint, with a fresh
    /// optimizer and schedule (fine-tuning, curriculum, context extension); shapes must match.
    #[arg(long)]
    pub(crate) init_from: Option<PathBuf>,
    /// During the DSA warm-up (--dsa-warmup-steps) train only the lightning indexers, every other
    /// parameter frozen (DeepSeek-V3.2's recipe; default: true with --init-from, else false).
    #[arg(long)]
    pub(crate) freeze_main_during_warmup: Option<bool>,
    /// Seed for initialization and data order (default 42).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long)]
    pub(crate) save_every: Option<u64>,
    /// Validation loss every N steps (0 = only at the end).
    #[arg(long)]
    pub(crate) eval_every: Option<u64>,
    /// Activation checkpointing: recompute every N-th block in the backward (1 = all blocks; 0 = off).
    #[arg(long)]
    pub(crate) grad_checkpoint: Option<usize>,
    /// Checkpoints to keep (0 = all).
    #[arg(long)]
    pub(crate) keep_checkpoints: Option<usize>,
    /// AdamW learning rate of the token embedding (default 0.2).
    #[arg(long)]
    pub(crate) embedding_lr: Option<f32>,
    /// AdamW learning rate of lm_head (default 0.004).
    #[arg(long)]
    pub(crate) unembedding_lr: Option<f32>,
    /// Muon learning rate of the block matrices (default 0.02).
    #[arg(long)]
    pub(crate) matrix_lr: Option<f32>,
    /// Decoupled weight decay (default 0).
    #[arg(long)]
    pub(crate) weight_decay: Option<f32>,
    /// Fraction of steps with linear warmup (default 0.1).
    #[arg(long)]
    pub(crate) warmup_ratio: Option<f32>,
    /// Fraction of final steps with linear decay to 0 (default 0.2).
    #[arg(long)]
    pub(crate) warmdown_ratio: Option<f32>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    pub(crate) grad_clip: Option<f32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// GEMM engine on CUDA: native (the handwritten cuda/gemm.cu), cublaslt (the library, loaded at
    /// run time) or wgmma (the handwritten Hopper kernel; compute capability 9.0 only, else an error).
    #[arg(long, default_value = "native", value_parser = ["native", "cublaslt", "wgmma"])]
    pub(crate) gemm: String,
    /// Tokens to sample from the trained model at the end (0 = none).
    #[arg(long, default_value_t = 60)]
    pub(crate) sample_tokens: usize,
    /// No progress bar or log lines.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// On CUDA, start without the quick kernel selftest of the model's kernel families.
    #[arg(long)]
    pub(crate) skip_selftest: bool,
    /// Data-parallel jobs (torchrun, mpirun, srun): seconds a collective may take before the
    /// job ends with an error (a rank died or stalled); default NANOSEEK_COLLECTIVE_TIMEOUT or 300.
    /// Keep it above rank 0's evaluation and checkpoint writing, which the other ranks wait for.
    #[arg(long)]
    pub(crate) collective_timeout: Option<f64>,
    /// Weights & Biases project, as the original scripts' flag: stored in config.json, and a hint
    /// is printed for `wandb sync` of the run's TensorBoard events (no network is used).
    #[arg(long)]
    pub(crate) wandb_project: Option<String>,
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

pub(crate) fn run_train(a: TrainArgs) -> Result<()> {
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
            t.freeze_main_during_warmup = a.freeze_main_during_warmup.or(t.freeze_main_during_warmup);
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
        // a rank of a launched job checks the GPU it trains on, LOCAL_RANK
        let launch = nanoseek::dist::Launch::from_env()?;
        let launched = launch.launcher != nanoseek::dist::Launcher::Single;
        nanoseek::selftest::preflight(if launched { launch.local_rank } else { ordinal }, &run.model)?;
    }
    let run_dir = a.runs_dir.join(&run_name);
    if let Some(project) = &run.train.wandb_project {
        eprintln!(
            "wandb: no network at run time; sync this run later with: wandb sync --sync-tensorboard -p {project} {}",
            run_dir.display()
        );
    }
    let sample_tokens = a.sample_tokens;
    if let Some(t) = a.collective_timeout {
        nanoseek::dist::set_collective_timeout(t)?;
    }
    let summary = train::train(TrainRequest {
        run,
        run_dir: run_dir.clone(),
        resume_from_step: a.resume_from_step,
        device,
        verbose: !a.quiet,
        sample_tokens,
    })?;
    if summary.rank != 0 {
        return Ok(()); // rank 0 reports for the job
    }
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
