//! `nanoseek eval`: mean next-token loss and perplexity of a checkpoint over
//! sequential windows of a token shard (or the embedded validation stream).
//!
//! Windows: tokens [i·T, i·T + T] for i = 0, 1, … (inputs are the first T, targets the
//! last T), batched `batch` at a time, until `max_tokens` targets have been scored.

use crate::autograd::Tape;
use crate::data::{Loader, TokenSource};
use crate::fsutil::write_atomic;
use crate::nn::Model;
use crate::rng::Rng;
use crate::train::{checkpoint, open_data, TrainSettings};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct EvalResult {
    pub model_path: PathBuf,
    /// The token shard, or "embedded-validation".
    pub data: String,
    pub tokens: usize,
    /// Mean cross-entropy in nats per token.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens_per_s: f64,
}

/// Scores `source` with the checkpoint's model (batches of `batch` sequences of max_seq_len).
pub fn evaluate_source(model: &Model, source: TokenSource, batch: usize, max_tokens: usize) -> Result<(f64, usize)> {
    let t = model.config.max_seq_len;
    let loader = Loader::new(source, batch, t, 0, 1, Rng::new(0))?;
    let (mut nats, mut tokens) = (0.0f64, 0usize);
    let mut i = 0;
    while tokens < max_tokens {
        let Some(b) = loader.sequential_batch(i) else { break };
        let mut tape = Tape::new();
        let pv = model.params_on(&mut tape);
        let loss = model.loss(&mut tape, &pv, &b.ids, &b.targets, batch, t)?;
        nats += tape.value(loss)[0] as f64 * b.ids.len() as f64;
        tokens += b.ids.len();
        i += 1;
    }
    if tokens == 0 {
        bail!("the data holds fewer than one batch of {batch} × {t} tokens (+1)");
    }
    Ok((nats / tokens as f64, tokens))
}

pub fn run(
    model_path: &Path,
    data: Option<&Path>,
    batch: usize,
    max_tokens: usize,
    output: Option<&Path>,
) -> Result<EvalResult> {
    let config = checkpoint::read_config(model_path)?;
    let model = checkpoint::load_model(model_path, &config)?;
    let (source, name) = match data {
        Some(p) => {
            let shard = crate::data::shard::TokenShard::open(p)?;
            if shard.vocab_size > config.vocab_size {
                bail!(
                    "the shard's vocabulary ({}) exceeds the model's vocab_size {}",
                    shard.vocab_size,
                    config.vocab_size
                );
            }
            (TokenSource::from_shard(shard), p.display().to_string())
        }
        None => {
            let settings = TrainSettings::for_model(&config);
            (open_data(&settings, &config)?.1, "embedded-validation".to_string())
        }
    };
    let t0 = Instant::now();
    let (loss, tokens) = evaluate_source(&model, source, batch, max_tokens)?;
    let result = EvalResult {
        model_path: model_path.to_path_buf(),
        data: name,
        tokens,
        loss,
        perplexity: loss.exp(),
        tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    };
    if let Some(out) = output {
        write_atomic(out, serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    Ok(result)
}
