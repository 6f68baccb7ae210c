//! `nanoseek eval`: loss, perplexity and bits per byte of a checkpoint over sequential
//! windows of a token shard, a `nanoseek data` folder, or the embedded validation stream.
//!
//! Windows: tokens [i·T, i·T + T] for i = 0, 1, … (inputs are the first T, targets the
//! last T), batched `batch` at a time, until `max_tokens` targets have been scored. With
//! `bos_aligned`, each window starts at a document's BOS instead (see `data::loader`).
//!
//! # `eval_results.json` (format_version 1)
//!
//! Fields are only ever added; a field's meaning never changes within a format version.
//!
//! | field | meaning |
//! |---|---|
//! | `format_version` | 1 |
//! | `model_path` | the checkpoint directory evaluated |
//! | `data` | the shard scored (by default the run's own data, from its config.json), or `"embedded-validation"` |
//! | `split` | the split of a data folder scored (`val` by default), null for a shard file (its held-out last 5%, as `train` holds it out) or the embedded data |
//! | `tokenizer` | what turned ids into bytes: a tokenizer.json path, `"synthetic"`, or null (then `bits_per_byte` is null) |
//! | `seq_len`, `batch_size`, `bos_aligned` | window length T, windows per forward pass, document-aligned windows |
//! | `tokens` | target tokens scored (BOS/EOT targets included) |
//! | `bytes` | UTF-8 bytes of the scored targets' text (special tokens count 0); null without a tokenizer |
//! | `loss` | mean cross-entropy, nats per scored token |
//! | `perplexity` | exp(loss) |
//! | `bits_per_byte` | total nats / ln 2 / `bytes`: tokenizer-independent; null without a tokenizer |
//! | `tokens_per_s` | scored tokens per second of forward passes |
//! | `elapsed_s` | seconds spent scoring |
//! | `peak_memory_mib` | peak bytes held by the engine's accounted memory (weights, activations, workspace) during the evaluation, in MiB |
//! | `tasks` | per-task accuracy on synthetic long-range tasks, keyed by task name (empty when none were run) |
//!
//! Bits per byte counts every scored target: the nats of BOS/EOT targets are included in
//! the numerator while they add no bytes (the usual convention: predicting where a
//! document ends is part of modelling the text).

use crate::autograd::Tape;
use crate::data::codec::{codec_for_data, codec_for_run};
use crate::data::prepare::DataLocation;
use crate::data::tasks::{self, TaskKind};
use crate::data::{Loader, TextCodec, TokenSource};
use crate::fsutil::write_output;
use crate::memory;
use crate::nn::Model;
use crate::rng::Rng;
use crate::train::{checkpoint, held_out_tokens, open_checked_shard, open_data, TrainSettings};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const FORMAT_VERSION: u32 = 1;

/// Accuracy on one synthetic long-range task (filled in by the task evaluation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskAccuracy {
    pub samples: usize,
    pub correct: usize,
    /// correct / samples (a sample counts when every answer token is predicted).
    pub accuracy: f64,
    /// Answer tokens predicted right / answer tokens.
    #[serde(default)]
    pub token_accuracy: f64,
    /// Accuracy per context-depth bucket, keyed "lo-hi" (e.g. "0.25-0.50"; empty buckets omitted).
    #[serde(default)]
    pub by_depth: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub format_version: u32,
    pub model_path: PathBuf,
    /// The token shard, or "embedded-validation".
    pub data: String,
    pub split: Option<String>,
    pub tokenizer: Option<String>,
    pub seq_len: usize,
    pub batch_size: usize,
    pub bos_aligned: bool,
    pub tokens: usize,
    pub bytes: Option<u64>,
    /// Mean cross-entropy in nats per token.
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: Option<f64>,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub peak_memory_mib: f64,
    pub tasks: BTreeMap<String, TaskAccuracy>,
}

/// What `evaluate_windows` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// Sum of the targets' cross-entropies, nats.
    pub nats: f64,
    pub tokens: usize,
    /// UTF-8 bytes of the targets' text (when a codec was given).
    pub bytes: Option<u64>,
}

impl Scored {
    pub fn loss(&self) -> f64 {
        self.nats / self.tokens as f64
    }

    /// Bits per byte: nats / ln 2 / bytes.
    pub fn bits_per_byte(&self) -> Option<f64> {
        self.bytes.filter(|&b| b > 0).map(|b| bits_per_byte(self.nats, b))
    }
}

/// Total nats over total bytes, in bits per byte.
pub fn bits_per_byte(nats: f64, bytes: u64) -> f64 {
    nats / std::f64::consts::LN_2 / bytes as f64
}

/// Scores sequential batches of `loader` until `max_tokens` targets are reached.
pub fn evaluate_windows(
    model: &Model,
    loader: &Loader,
    max_tokens: usize,
    codec: Option<&dyn TextCodec>,
) -> Result<Scored> {
    let t = loader.seq_len;
    let (mut nats, mut tokens, mut bytes) = (0.0f64, 0usize, 0u64);
    let mut i = 0;
    let mut ids = Vec::new();
    while tokens < max_tokens {
        let Some(b) = loader.sequential_batch(i) else { break };
        let rows = b.ids.len() / t;
        let mut tape = Tape::inference(model.cpu());
        let pv = model.params_on(&mut tape);
        let loss = model.loss(&mut tape, &pv, &b.ids, &b.targets, rows, t)?;
        nats += tape.value(loss)[0] as f64 * b.ids.len() as f64;
        tokens += b.ids.len();
        if let Some(c) = codec {
            ids.clear();
            ids.extend(b.targets.iter().map(|&x| x as u32));
            bytes += c.byte_len(&ids) as u64;
        }
        i += 1;
    }
    if tokens == 0 {
        bail!("the data holds fewer than one batch of {} × {t} tokens (+1)", loader.batch);
    }
    Ok(Scored { nats, tokens, bytes: codec.map(|_| bytes) })
}

/// Target tokens and their UTF-8 bytes over the first `batches` sequential batches of
/// `loader` (what `train::evaluate` scores), for validation bits per byte; None without bytes.
pub fn target_bytes(loader: &Loader, batches: usize, codec: &dyn TextCodec) -> Option<(usize, u64)> {
    let (mut tokens, mut bytes) = (0usize, 0u64);
    let mut ids = Vec::new();
    for i in 0..batches {
        let Some(b) = loader.sequential_batch(i) else { break };
        ids.clear();
        // scored targets only (a negative target is ignored by the loss)
        ids.extend(b.targets.iter().filter(|&&x| x >= 0).map(|&x| x as u32));
        bytes += codec.byte_len(&ids) as u64;
        tokens += ids.len();
    }
    (bytes > 0).then_some((tokens, bytes))
}

/// Scores `source` with the model (batches of `batch` sequences of max_seq_len); (mean loss, tokens).
pub fn evaluate_source(model: &Model, source: TokenSource, batch: usize, max_tokens: usize) -> Result<(f64, usize)> {
    let loader = Loader::new(source, batch, model.config.max_seq_len, 0, 1, Rng::new(0))?;
    let s = evaluate_windows(model, &loader, max_tokens, None)?;
    Ok((s.loss(), s.tokens))
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// A checkpoint directory.
    pub model_path: PathBuf,
    /// A shard, a `nanoseek data` folder, or None for the embedded validation stream.
    pub data: Option<PathBuf>,
    /// The split of a data folder (default "val").
    pub split: Option<String>,
    pub batch_size: usize,
    pub eval_tokens: usize,
    pub bos_aligned: bool,
    pub output: Option<PathBuf>,
    /// Synthetic long-range tasks to score (`recall`, `passkey`, `copy`); empty = none.
    pub tasks: Vec<String>,
    pub task_samples: usize,
    /// Tokens per task sample (None: the model's max_seq_len).
    pub task_len: Option<usize>,
    pub depth_buckets: usize,
}

impl EvalOptions {
    pub fn new(model_path: &Path) -> EvalOptions {
        EvalOptions {
            model_path: model_path.to_path_buf(),
            data: None,
            split: None,
            batch_size: 8,
            eval_tokens: 65536,
            bos_aligned: false,
            output: None,
            tasks: Vec::new(),
            task_samples: 64,
            task_len: None,
            depth_buckets: 4,
        }
    }
}

/// Runs `nanoseek eval` (and writes `output` when given).
pub fn evaluate(o: &EvalOptions) -> Result<EvalResult> {
    let config = checkpoint::read_config(&o.model_path)?;
    crate::train::micro_batch_tokens(o.batch_size, config.max_seq_len)
        .map_err(|e| anyhow::anyhow!("--batch-size: {e}"))?;
    let model = checkpoint::load_model(&o.model_path, &config)?;
    let task_kinds = o.tasks.iter().map(|t| TaskKind::parse(t)).collect::<Result<Vec<_>>>()?;
    let (source, name, split, codec, tok_name): (TokenSource, String, Option<String>, Option<Box<dyn TextCodec>>, _) =
        match o.data.clone().or_else(|| run_data(&o.model_path)).as_ref() {
            Some(p) => {
                let loc = DataLocation::resolve(p)?;
                let split = match &loc {
                    DataLocation::Dir { .. } => Some(o.split.clone().unwrap_or_else(|| "val".into())),
                    DataLocation::Shard(_) => {
                        if o.split.is_some() {
                            bail!("--split needs a data folder written by `nanoseek data`; {} is a shard", p.display());
                        }
                        None
                    }
                };
                let path = loc.split(split.as_deref().unwrap_or("val"))?;
                // scanned once: a declared vocabulary over the model's, or an id it cannot embed,
                // is an error naming it (an llm.c header declares none: its ids are checked)
                let shard = open_checked_shard(&path, &config)?;
                // The data's own tokenizer defines its bytes; the run's must agree with it.
                let data_tok = loc.tokenizer_json();
                let (codec, tok_name) = match &data_tok {
                    Some(t) => {
                        check_same_tokenizer(t, &o.model_path)?;
                        (codec_for_data(p)?, Some(t.display().to_string()))
                    }
                    None => match codec_for_data(p)? {
                        Some(c) => (Some(c), Some("synthetic".to_string())),
                        None => match run_tokenizer(&o.model_path) {
                            Some(t) => (codec_for_run(&o.model_path).ok(), Some(t.display().to_string())),
                            None => (None, None),
                        },
                    },
                };
                let source = match loc {
                    // A single shard: the tail `train --data SHARD` held out, not what it trained on.
                    DataLocation::Shard(_) if shard.len > held_out_tokens(shard.len, config.max_seq_len) => {
                        let hold = held_out_tokens(shard.len, config.max_seq_len);
                        TokenSource::split_shard(shard, hold).1
                    }
                    _ => TokenSource::from_shard(shard),
                };
                (source, path.display().to_string(), split, codec, tok_name)
            }
            None => {
                let settings = TrainSettings::for_model(&config);
                let lang: Box<dyn TextCodec> = Box::new(crate::data::synthetic::SyntheticLanguage::new());
                let src = open_data(&settings, &config)?.1;
                (src, "embedded-validation".to_string(), None, Some(lang), Some("synthetic".to_string()))
            }
        };
    let mut loader = Loader::new(source, o.batch_size, config.max_seq_len, 0, 1, Rng::new(0))?;
    if o.bos_aligned {
        let Some(bos) = codec.as_ref().and_then(|c| c.bos().or(c.eot())) else {
            bail!("--bos-aligned needs to know the BOS id: no tokenizer found for this data");
        };
        // A tokenizer without BOS (GPT-2's) starts documents after each EOT instead.
        loader = loader.align_to(bos);
    }
    memory::reset_peak();
    let base = memory::report().current_total();
    let t0 = Instant::now();
    let scored = evaluate_windows(&model, &loader, o.eval_tokens, codec.as_deref())?;
    let elapsed = t0.elapsed().as_secs_f64();
    let peak = memory::report().peak_total.max(base);
    let loss = scored.loss();
    let result = EvalResult {
        format_version: FORMAT_VERSION,
        model_path: o.model_path.clone(),
        data: name,
        split,
        tokenizer: tok_name,
        seq_len: config.max_seq_len,
        batch_size: o.batch_size,
        bos_aligned: o.bos_aligned,
        tokens: scored.tokens,
        bytes: scored.bytes,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: scored.bits_per_byte(),
        tokens_per_s: scored.tokens as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        peak_memory_mib: memory::mib(peak),
        tasks: score_tasks(&model, &task_kinds, o)?,
    };
    if let Some(out) = &o.output {
        write_output(out, serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    Ok(result)
}

/// Accuracy on each synthetic long-range task: `task_samples` samples of `task_len` tokens at
/// depths spread evenly over [0, 1], teacher-forced (`data::tasks::score`).
fn score_tasks(model: &Model, kinds: &[TaskKind], o: &EvalOptions) -> Result<BTreeMap<String, TaskAccuracy>> {
    let len = o.task_len.unwrap_or(model.config.max_seq_len);
    let n = o.task_samples.max(1);
    let depths: Vec<f32> = (0..n).map(|i| if n == 1 { 0.5 } else { i as f32 / (n - 1) as f32 }).collect();
    let mut out = BTreeMap::new();
    if !kinds.is_empty() && !crate::data::codec::run_is_synthetic(&o.model_path) {
        eprintln!(
            "warning: the tasks are written in the embedded synthetic language, which this model was not trained on; expect chance-level accuracy"
        );
    }
    for &kind in kinds {
        let samples = tasks::generate(kind, n, len, 0x7A5C, Some(&depths))?;
        let report = tasks::score(model, &samples, o.depth_buckets)?;
        for t in report.tasks {
            let by_depth =
                t.by_depth.iter().filter_map(|b| Some((format!("{:.2}-{:.2}", b.lo, b.hi), b.accuracy?))).collect();
            out.insert(
                t.task.clone(),
                TaskAccuracy {
                    samples: t.n,
                    correct: t.correct,
                    accuracy: t.accuracy,
                    token_accuracy: t.token_accuracy,
                    by_depth,
                },
            );
        }
    }
    Ok(out)
}

/// The data the run holding `ckpt` was trained on (its config.json's `train.data`), so `eval`
/// without `--data` scores the run's own validation split. None, with a warning on stderr
/// where the embedded synthetic stream is a fallback rather than the run's data.
fn run_data(ckpt: &Path) -> Option<PathBuf> {
    let Some(config) = ckpt.ancestors().take(4).map(|d| d.join("config.json")).find(|p| p.is_file()) else {
        eprintln!(
            "warning: no run config.json above {}; scoring the embedded synthetic validation stream (give --data for the model's own data)",
            ckpt.display()
        );
        return None;
    };
    let value: Option<serde_json::Value> =
        std::fs::read_to_string(&config).ok().and_then(|t| serde_json::from_str(&t).ok());
    let data = value.as_ref().map(|v| v.pointer("/train/data").and_then(|d| d.as_str()).map(PathBuf::from));
    match data {
        Some(None) => None, // trained on the embedded synthetic language
        Some(Some(p)) if p.exists() => {
            eprintln!("scoring the run's own data, {} (its held-out validation part)", p.display());
            Some(p)
        }
        Some(Some(p)) => {
            eprintln!(
                "warning: the run was trained on {}, which is not there; scoring the embedded synthetic validation stream instead (give --data)",
                p.display()
            );
            None
        }
        None => {
            eprintln!(
                "warning: {} is not a run config; scoring the embedded synthetic validation stream",
                config.display()
            );
            None
        }
    }
}

/// The tokenizer.json of the run holding `ckpt` (checkpoint → checkpoints → run dir).
fn run_tokenizer(ckpt: &Path) -> Option<PathBuf> {
    ckpt.ancestors().take(4).map(|d| d.join(crate::data::prepare::TOKENIZER)).find(|p| p.is_file())
}

/// Refuses data tokenized differently from the run (their loss would be meaningless).
fn check_same_tokenizer(data_tok: &Path, ckpt: &Path) -> Result<()> {
    if let Some(run_tok) = run_tokenizer(ckpt) {
        if std::fs::read(&run_tok).ok() != std::fs::read(data_tok).ok() {
            bail!(
                "the data was tokenized with {} but the model was trained with {}; evaluate on data made with the model's tokenizer (nanoseek data --tokenizer {})",
                data_tok.display(),
                run_tok.display(),
                run_tok.display()
            );
        }
    }
    Ok(())
}

/// The old entry point: `evaluate` with the given settings.
pub fn run(
    model_path: &Path,
    data: Option<&Path>,
    batch: usize,
    max_tokens: usize,
    output: Option<&Path>,
) -> Result<EvalResult> {
    let mut o = EvalOptions::new(model_path);
    o.data = data.map(Path::to_path_buf);
    o.batch_size = batch;
    o.eval_tokens = max_tokens;
    o.output = output.map(Path::to_path_buf);
    evaluate(&o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_byte_by_hand() {
        // 4 tokens of 2 bytes each, each predicted with probability 1/4: 4 · ln 4 nats = 8 bits over 8 bytes
        assert!((bits_per_byte(4.0 * 4f64.ln(), 8) - 1.0).abs() < 1e-12);
        let s = Scored { nats: 2.0 * std::f64::consts::LN_2, tokens: 2, bytes: Some(4) };
        assert!((s.bits_per_byte().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(Scored { bytes: None, ..s.clone() }.bits_per_byte(), None);
        assert!((s.loss() - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
