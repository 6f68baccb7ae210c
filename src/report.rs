//! The run report (`report.md`), a report card in the manner of nanochat's: configuration,
//! parameter counts, data, hardware, throughput, memory, loss curves, final evaluation and a
//! sample. `nanoseek train` writes it at the end; `nanoseek report RUN_DIR` rebuilds it.
//!
//! It is made only from the run directory's files (config.json, metrics.jsonl, checkpoints/,
//! loss.svg, and the two files train writes for it: hardware.json and sample.txt), plus the
//! run's validation data for bits per byte, so rebuilding it gives the same text.

use crate::data::prepare::{DataLocation, Manifest};
use crate::data::Loader;
use crate::device::Device;
use crate::fsutil::write_atomic;
use crate::memory::{self, CATEGORIES};
use crate::rng::Rng;
use crate::train::{checkpoint, metrics, open_data, RunConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const REPORT: &str = "report.md";
/// Where the run trained (the latest invocation of `train` on the run).
pub const HARDWARE: &str = "hardware.json";
/// The end-of-training sample.
pub const SAMPLE: &str = "sample.txt";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name (CUDA runs).
    pub gpu: Option<String>,
    /// The CPU's model name (from /proc/cpuinfo where there is one).
    pub cpu: Option<String>,
    /// Worker threads of the CPU backend (rayon).
    pub threads: usize,
    pub host: String,
}

impl Hardware {
    pub fn detect(device: Device, gpu: Option<String>) -> Hardware {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        });
        Hardware {
            device: device.to_string(),
            gpu,
            cpu,
            threads: rayon::current_num_threads(),
            host: crate::train::events::host_name(),
        }
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_atomic(&run_dir.join(HARDWARE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// The end of `train`: records the sample (removing an earlier invocation's, which is not this
/// model's), then writes report.md. The report only summarizes files already written, so
/// failing to build it is a warning, not a failed run.
pub fn finish_run(run_dir: &Path, sample: Option<&str>) -> Result<()> {
    let sample_path = run_dir.join(SAMPLE);
    match sample {
        Some(text) => write_atomic(&sample_path, format!("{text}\n").as_bytes())?,
        None => match std::fs::remove_file(&sample_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", sample_path.display()))
            }
            _ => {}
        },
    }
    if let Err(e) = write(run_dir) {
        eprintln!("warning: {REPORT} not written: {e:#}");
    }
    Ok(())
}

/// Builds the report from `run_dir` and writes it there as report.md.
pub fn write(run_dir: &Path) -> Result<PathBuf> {
    let text = render(run_dir)?;
    let path = run_dir.join(REPORT);
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

fn human(n: f64) -> String {
    match n.abs() {
        a if a >= 1e12 => format!("{:.2}T", n / 1e12),
        a if a >= 1e9 => format!("{:.2}G", n / 1e9),
        a if a >= 1e6 => format!("{:.2}M", n / 1e6),
        a if a >= 1e3 => format!("{:.1}K", n / 1e3),
        _ => format!("{n:.0}"),
    }
}

/// The report's markdown. Fails (naming the folder) when `run_dir` is not a run directory.
pub fn render(run_dir: &Path) -> Result<String> {
    if !run_dir.is_dir() {
        bail!("{} is not a directory (expected a run directory, e.g. runs/NAME)", run_dir.display());
    }
    let config_path = run_dir.join("config.json");
    if !config_path.is_file() {
        bail!("{} is not a run directory: it has no config.json", run_dir.display());
    }
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let run: RunConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid run config", config_path.display()))?;
    let records = metrics::read(&run_dir.join("metrics.jsonl"))?;
    let train: Vec<&Value> = records.iter().filter(|r| r["loss"].is_number()).collect();
    let vals: Vec<&Value> = records.iter().filter(|r| r["val_loss"].is_number()).collect();
    let hardware: Option<Hardware> =
        std::fs::read_to_string(run_dir.join(HARDWARE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let name = run_dir.file_name().map_or_else(|| run_dir.display().to_string(), |n| n.to_string_lossy().into());
    let (m, t) = (&run.model, &run.train);
    let last_step = train.iter().filter_map(|r| r["step"].as_u64()).max().unwrap_or(0);

    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "# nanoseek run report: {name}\n")?;
    writeln!(
        w,
        "Built from the run directory's files (config.json, metrics.jsonl, checkpoints/, {HARDWARE}, {SAMPLE}); \
         `nanoseek report {}` rebuilds it.\n",
        run_dir.display()
    )?;
    let ckpts = checkpoint::list_steps(run_dir);
    writeln!(
        w,
        "Steps trained: {last_step} of {}; checkpoints: {}.\n",
        t.num_iterations,
        if ckpts.is_empty() {
            "none".to_string()
        } else {
            ckpts.iter().map(|s| format!("step {s}")).collect::<Vec<_>>().join(", ")
        }
    )?;

    writeln!(w, "## Configuration\n\n| setting | value |\n|---|---|")?;
    let mut row = |k: &str, v: String| writeln!(w, "| {k} | {v} |");
    row("layers × width", format!("{} × n_embd {}", m.n_layer, m.n_embd))?;
    if m.is_mla() {
        let (rq, rkv) = (m.q_lora_rank, m.kv_lora_rank);
        let widths = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim);
        row(
            "heads (MLA)",
            format!("{}; q/k {} + {} rotary, v {}; latents q {rq}, kv {rkv}", m.n_head, widths.0, widths.1, widths.2),
        )?;
    } else {
        row("heads", format!("{} query, {} key/value, head_dim {}", m.n_head, m.n_kv_head, m.head_dim))?;
    }
    row("ffn_hidden", m.ffn_hidden.to_string())?;
    row("vocab_size, max_seq_len", format!("{}, {}", m.vocab_size, m.max_seq_len))?;
    row("attention pattern", format!("`{}` (window {}, global {})", m.attn_pattern, m.dsa_window_size, m.n_global))?;
    if m.attn_pattern.contains('S') {
        row(
            "DSA indexer",
            format!(
                "{} ({} of {} dims rotated), {} heads × {}, top-{}, local window {}, dense warm-up {} steps",
                m.indexer,
                m.index_rope_width(),
                m.index_head_dim,
                m.index_n_heads,
                m.index_head_dim,
                m.index_topk,
                m.index_local_window,
                m.dsa_warmup_steps
            ),
        )?;
    }
    if m.moe.enabled() {
        let e = &m.moe;
        row(
            "MoE",
            format!(
                "{} routed experts (top-{}) + {} shared, width {}, first {} layers dense, {} routing",
                e.n_routed_experts, e.top_k, e.n_shared_experts, e.moe_inter_dim, e.first_k_dense, e.score_func
            ),
        )?;
    }
    if m.mtp_depth > 0 {
        let last = m
            .mtp_lambda_final
            .map_or(String::new(), |f| format!(", then {f} from {} of the steps", m.mtp_lambda_switch));
        row("multi-token prediction", format!("{} module(s), λ {}{last}", m.mtp_depth, m.mtp_lambda))?;
    }
    row("rope_theta, logit_softcap", format!("{}, {}", m.rope_theta, m.logit_softcap))?;
    let accum = t.total_batch_size / (t.device_batch_size * m.max_seq_len).max(1);
    row(
        "batch",
        format!(
            "{} tokens per step = {accum} micro-batch(es) × {} sequences × {}",
            t.total_batch_size, t.device_batch_size, m.max_seq_len
        ),
    )?;
    row("iterations, seed", format!("{}, {}", t.num_iterations, t.seed))?;
    let o = &t.optim;
    row(
        "learning rates",
        format!("matrix (Muon) {}, embedding {}, unembedding {}", o.matrix_lr, o.embedding_lr, o.unembedding_lr),
    )?;
    row(
        "schedule",
        format!(
            "warmup {}, warmdown {}, final lr × {}, weight decay {}, grad clip {}",
            o.warmup_ratio, o.warmdown_ratio, o.final_lr_frac, o.weight_decay, o.grad_clip
        ),
    )?;
    row("evaluation", format!("every {} steps (0 = at the end), {} batches", t.eval_every, t.eval_batches))?;
    row(
        "activation checkpointing",
        if t.grad_checkpoint == 0 { "off".into() } else { format!("every {} block(s)", t.grad_checkpoint) },
    )?;
    if let Some(init) = &t.init_from {
        row("initialized from", format!("`{}`", init.display()))?;
    }
    if let Some(p) = &t.wandb_project {
        row("wandb project", format!("{p} (`wandb sync --sync-tensorboard -p {p} {}`)", run_dir.display()))?;
    }

    let (blocks, active_blocks) = m.block_params_total();
    writeln!(w, "\n## Parameters\n\n| count | parameters |\n|---|---|")?;
    writeln!(w, "| total | {} ({}) |", m.num_params(), human(m.num_params() as f64))?;
    writeln!(w, "| non-embedding (blocks) | {blocks} ({}) |", human(blocks as f64))?;
    writeln!(w, "| active per token | {} ({}) |", m.active_params(), human(m.active_params() as f64))?;
    writeln!(w, "| active per token, non-embedding | {active_blocks} ({}) |", human(active_blocks as f64))?;
    if m.mtp_depth > 0 {
        let mtp = m.mtp_params().0;
        writeln!(w, "| of the total: MTP modules (training and drafting only) | {mtp} ({}) |", human(mtp as f64))?;
    }
    let flops_per_token = m.flops_per_token(m.max_seq_len);
    writeln!(w, "| training FLOPs per token at max_seq_len | {flops_per_token:.3e} |")?;

    writeln!(w, "\n## Data\n")?;
    let tokens_seen = last_step as f64 * t.total_batch_size as f64;
    let manifest = t.data.as_deref().and_then(|d| match DataLocation::resolve(d).ok()? {
        DataLocation::Dir { dir, .. } => Manifest::read(&dir).ok(),
        DataLocation::Shard(_) => None,
    });
    match &t.data {
        None => writeln!(w, "- source: the embedded synthetic language (generated in-process)")?,
        Some(d) => writeln!(w, "- source: `{}`", d.display())?,
    }
    let tokenizer = match (&t.data, &manifest) {
        (None, _) => "the synthetic language's own word vocabulary".to_string(),
        (_, Some(man)) => format!("{} ({})", man.tokenizer.kind, man.tokenizer.origin),
        _ if run_dir.join(crate::data::prepare::TOKENIZER).is_file() => "tokenizer.json in the run directory".into(),
        _ => "none known (token ids only)".into(),
    };
    writeln!(w, "- tokenizer: {tokenizer}; model vocab_size {}", m.vocab_size)?;
    writeln!(w, "- tokens seen: {} ({last_step} steps × {} tokens)", tokens_seen as u64, t.total_batch_size)?;
    match manifest.as_ref().and_then(|man| man.splits.get("train")).filter(|s| s.bytes_per_token > 0.0) {
        Some(split) => writeln!(
            w,
            "- bytes seen: about {} (tokens × the train split's {:.3} bytes per token, manifest.json)",
            human(tokens_seen * split.bytes_per_token),
            split.bytes_per_token
        )?,
        None => writeln!(w, "- bytes seen: unknown (no `nanoseek data` manifest with bytes per token)")?,
    }

    writeln!(w, "\n## Hardware\n")?;
    match &hardware {
        Some(h) => {
            writeln!(w, "- device: {}", h.device)?;
            if let Some(g) = &h.gpu {
                writeln!(w, "- GPU: {g}")?;
            }
            writeln!(w, "- CPU: {}", h.cpu.as_deref().unwrap_or("unknown"))?;
            writeln!(w, "- CPU threads: {}", h.threads)?;
            writeln!(w, "- host: {}", h.host)?;
        }
        None => writeln!(w, "- unknown: the run has no {HARDWARE} (written by train since this report existed)")?,
    }

    writeln!(w, "\n## Throughput\n")?;
    let mut tok_s: Vec<f64> = train.iter().filter_map(|r| r["tokens_per_s"].as_f64()).collect();
    tok_s.sort_by(f64::total_cmp);
    let train_s: f64 = train.iter().filter_map(|r| r["step_time_s"].as_f64()).sum();
    if let Some(&median) = tok_s.get(tok_s.len() / 2) {
        writeln!(
            w,
            "- tokens/s: {median:.0} (median over steps; min {:.0}, max {:.0})",
            tok_s[0],
            tok_s[tok_s.len() - 1]
        )?;
        writeln!(w, "- training time: {train_s:.2} s in steps (evaluation and checkpoints excluded)")?;
        writeln!(w, "- model FLOP/s: {} (FLOPs per token × median tokens/s)", human(flops_per_token * median))?;
    } else {
        writeln!(w, "- no training steps logged")?;
    }
    let mfu: Vec<f64> = train.iter().filter_map(|r| r["mfu"].as_f64()).collect();
    match mfu.last() {
        Some(x) => writeln!(w, "- MFU: {:.1}% (last step)", 100.0 * x)?,
        None => writeln!(
            w,
            "- MFU: not measured (train does not know the device's peak rate; `nanoseek profile` measures MFU \
             against the GEMM rate it measures)"
        )?,
    }

    writeln!(w, "\n## Memory\n")?;
    let peak = train.iter().max_by(|a, b| {
        a["peak_memory_mib"].as_f64().unwrap_or(0.0).total_cmp(&b["peak_memory_mib"].as_f64().unwrap_or(0.0))
    });
    let on_cuda = hardware.as_ref().is_some_and(|h| h.device.starts_with("cuda"));
    let predicted = if on_cuda {
        crate::info::predict_cuda_training_bytes(m, t.device_batch_size, m.max_seq_len, t.grad_checkpoint)
    } else {
        crate::info::predict_training_bytes(m, t.device_batch_size, m.max_seq_len, t.grad_checkpoint)
    };
    let measured = peak.map(|r| &r["peak_memory_by_category"]).filter(|v| v.is_object());
    writeln!(w, "| category | predicted MiB | measured at the peak, MiB |\n|---|---|---|")?;
    for c in CATEGORIES {
        let got = measured.and_then(|v| v[c.name()].as_f64()).map_or("-".into(), |x| format!("{x:.1}"));
        writeln!(w, "| {} | {:.1} | {got} |", c.name(), memory::mib(predicted[c as usize]))?;
    }
    let peak_total = peak.and_then(|r| r["peak_memory_mib"].as_f64()).map_or("-".into(), |x| format!("{x:.1}"));
    writeln!(w, "| **total** | {:.1} | {peak_total} |", memory::mib(predicted.iter().sum()))?;
    writeln!(
        w,
        "\nPredicted: `nanoseek info`'s model of a {} training step. Measured: the largest step peak in metrics.jsonl{}.",
        if on_cuda { "CUDA" } else { "CPU" },
        if measured.is_some() { " (by category on the device)" } else { " (its total; categories are logged on CUDA)" }
    )?;

    writeln!(w, "\n## Loss\n")?;
    if run_dir.join("loss.svg").is_file() {
        writeln!(w, "![training and validation loss](loss.svg)\n")?;
    }
    write_loss_table(w, &train, &vals)?;

    writeln!(w, "\n## Final evaluation\n")?;
    match vals.last() {
        Some(v) => {
            let (step, loss) = (v["step"].as_u64().unwrap_or(0), v["val_loss"].as_f64().unwrap_or(f64::NAN));
            writeln!(w, "- validation loss at step {step}: {loss:.4} nats/token ({} batches)", t.eval_batches)?;
            writeln!(w, "- perplexity: {:.3}", loss.exp())?;
            let logged = ["val_bpb", "val_bits_per_byte"].iter().find_map(|k| v[*k].as_f64());
            match logged {
                Some(bpb) => writeln!(w, "- bits per byte: {bpb:.4} (metrics.jsonl)")?,
                None => match validation_bytes(run_dir, &run) {
                    Ok((tokens, bytes)) if bytes > 0 => writeln!(
                        w,
                        "- bits per byte: {:.4} (the same {tokens} validation tokens: {bytes} bytes of text)",
                        crate::eval::bits_per_byte(loss * tokens as f64, bytes)
                    )?,
                    Ok(_) => writeln!(w, "- bits per byte: unknown (the validation tokens decode to no text)")?,
                    Err(e) => writeln!(w, "- bits per byte: unknown ({e:#})")?,
                },
            }
        }
        None => writeln!(w, "- no validation loss logged")?,
    }
    writeln!(
        w,
        "- task accuracy: not measured by train; `nanoseek eval --model-path {} --tasks recall,passkey,needle,copy` \
         scores the long-range tasks",
        run_dir.display()
    )?;

    writeln!(w, "\n## Sample\n")?;
    match std::fs::read_to_string(run_dir.join(SAMPLE)) {
        Ok(sample) => writeln!(w, "The end-of-training sample:\n\n```text\n{}\n```", sample.trim_end())?,
        Err(_) => writeln!(w, "No sample recorded (train writes {SAMPLE} unless `--sample-tokens 0`).")?,
    }
    Ok(s)
}

/// Rows at a few train steps (first, last and between) and at every evaluation (at most 8).
fn write_loss_table(w: &mut String, train: &[&Value], vals: &[&Value]) -> std::fmt::Result {
    let pick = |n: usize, k: usize| -> Vec<usize> {
        if n <= k {
            (0..n).collect()
        } else {
            (0..k).map(|i| i * (n - 1) / (k - 1)).collect()
        }
    };
    let step = |r: &Value| r["step"].as_u64().unwrap_or(0);
    let mut steps: Vec<u64> = pick(train.len(), 6).into_iter().map(|i| step(train[i])).collect();
    steps.extend(pick(vals.len(), 8).into_iter().map(|i| step(vals[i])));
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() {
        return writeln!(w, "No losses logged.");
    }
    // MTP runs: each depth's loss beside the model's own
    let depths = (1..).take_while(|k| train.iter().any(|r| r[format!("mtp_loss_{k}")].is_number())).count();
    let mtp_head: String = (1..=depths).map(|k| format!(" MTP depth {k} loss |")).collect();
    writeln!(w, "| step | train loss | validation loss |{mtp_head}\n|---|---|---|{}", "---|".repeat(depths))?;
    for s in steps {
        let find = |rs: &[&Value], k: &str| {
            rs.iter().rev().find(|r| step(r) == s).and_then(|r| r[k].as_f64()).map_or("-".into(), |x| format!("{x:.4}"))
        };
        let mtp: String = (1..=depths).map(|k| format!(" {} |", find(train, &format!("mtp_loss_{k}")))).collect();
        writeln!(w, "| {s} | {} | {} |{mtp}", find(train, "loss"), find(vals, "val_loss"))?;
    }
    Ok(())
}

/// Targets and their bytes of text in the validation batches train scores (the first
/// `eval_batches` sequential batches), for bits per byte from the logged validation loss.
fn validation_bytes(run_dir: &Path, run: &RunConfig) -> Result<(usize, u64)> {
    let codec = crate::data::codec::codec_for_run(run_dir)?;
    let (_, val, _) = open_data(&run.train, &run.model)?;
    let val = Loader::new(val, run.train.device_batch_size, run.model.max_seq_len, 0, 1, Rng::new(0))?;
    Ok(crate::eval::target_bytes(&val, run.train.eval_batches, codec.as_ref()).unwrap_or((0, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ModelConfig;
    use crate::train::TrainSettings;

    /// A CUDA run's files (no GPU needed): the GPU line, the measured memory by category and a
    /// logged MFU and bits per byte reach the report; steps without validation show "-".
    #[test]
    fn a_cuda_runs_files_fill_the_hardware_memory_and_evaluation_sections() {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelConfig::preset("tiny").unwrap();
        let run = RunConfig { train: TrainSettings::for_model(&model), model };
        std::fs::write(dir.path().join("config.json"), serde_json::to_string(&run).unwrap()).unwrap();
        let hw = Hardware {
            device: "cuda:0".into(),
            gpu: Some("NVIDIA H100".into()),
            cpu: None,
            threads: 16,
            host: "h".into(),
        };
        hw.write(dir.path()).unwrap();
        let by_cat = serde_json::json!({"parameters": 1.5, "gradients": 2.0, "optimizer_state": 3.0,
            "activations": 40.0, "workspace": 5.0});
        let lines = [
            serde_json::json!({"step": 1, "loss": 8.0, "tokens_per_s": 1000.0, "step_time_s": 0.5, "mfu": 0.25,
                "peak_memory_mib": 51.5, "peak_memory_by_category": by_cat}),
            serde_json::json!({"step": 2, "loss": 7.0, "tokens_per_s": 3000.0, "step_time_s": 0.25,
                "peak_memory_mib": 10.0}),
            serde_json::json!({"step": 2, "val_loss": 6.5, "val_bpb": 1.875}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let r = render(dir.path()).unwrap();
        assert!(r.contains("- GPU: NVIDIA H100") && r.contains("- CPU threads: 16"), "{r}");
        assert!(r.contains("| activations | ") && r.contains(" | 40.0 |"), "{r}");
        assert!(r.contains("| **total** | ") && r.contains(" | 51.5 |"), "{r}");
        assert!(r.contains("model of a CUDA training step"), "{r}");
        assert!(r.contains("- MFU: 25.0% (last step)"), "{r}");
        assert!(r.contains("- tokens/s: 3000 (median over steps; min 1000, max 3000)"), "{r}");
        assert!(r.contains("| 1 | 8.0000 | - |") && r.contains("| 2 | 7.0000 | 6.5000 |"), "{r}");
        assert!(r.contains(&format!("- perplexity: {:.3}", 6.5f64.exp())), "{r}");
        assert!(r.contains("- bits per byte: 1.8750 (metrics.jsonl)"), "{r}");
        assert!(r.contains("No sample recorded"), "{r}");
        assert_eq!(render(dir.path()).unwrap(), r, "the same files give the same report");
    }
}
