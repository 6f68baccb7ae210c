//! The data a run trains on: the embedded synthetic language or a `--data` folder / shard,
//! its held-out validation part, and the checks that every id fits the model.

use super::{TrainSettings, EMBEDDED_TRAIN_SEED, EMBEDDED_TRAIN_TOKENS, EMBEDDED_VAL_SEED, EMBEDDED_VAL_TOKENS};
use crate::data::prepare::DataLocation;
use crate::data::synthetic::SyntheticLanguage;
use crate::data::{shard::TokenShard, TokenSource};
use crate::nn::ModelConfig;
use anyhow::{bail, Result};
use std::path::Path;

/// The training and validation token sources, and the embedded language (for decoding samples).
pub fn open_data(
    train: &TrainSettings,
    model: &ModelConfig,
) -> Result<(TokenSource, TokenSource, Option<SyntheticLanguage>)> {
    // A vocabulary the data declares (the embedded language's, a nanoseek shard's header); an
    // llm.c header declares none, and every id was checked against the model when opened.
    let mut declared_vocab = None;
    let (tr, va, lang) = match &train.data {
        None => {
            let lang = SyntheticLanguage::new();
            let v = lang.vocab_size();
            let tr =
                TokenSource::Memory { tokens: lang.stream(EMBEDDED_TRAIN_SEED, EMBEDDED_TRAIN_TOKENS), vocab_size: v };
            let va = TokenSource::Memory { tokens: lang.stream(EMBEDDED_VAL_SEED, EMBEDDED_VAL_TOKENS), vocab_size: v };
            (tr, va, Some(lang))
        }
        Some(path) => {
            // A `nanoseek data` folder: its train and validation shards (a validation shard
            // shorter than one batch falls back to holding out part of train).
            let (train_path, val_path) = match DataLocation::resolve(path)? {
                DataLocation::Dir { train, val, .. } => (train, val),
                DataLocation::Shard(p) => (p, None),
            };
            let shard = open_checked_shard(&train_path, model)?;
            declared_vocab = shard.declared_vocab();
            let val = val_path.map(|p| open_checked_shard(&p, model)).transpose()?;
            match val {
                Some(v) if v.len > train.device_batch_size * model.max_seq_len => {
                    if v.vocab_size != shard.vocab_size {
                        bail!(
                            "{} and {} have different vocabularies ({} and {} ids)",
                            train_path.display(),
                            v.path.display(),
                            shard.vocab_size,
                            v.vocab_size
                        );
                    }
                    (TokenSource::from_shard(shard), TokenSource::from_shard(v), None)
                }
                _ => {
                    let hold = held_out_tokens(shard.len, model.max_seq_len);
                    if shard.len < hold + model.max_seq_len + 1 {
                        bail!(
                            "token shard {} has {} tokens: too few for max_seq_len {} plus a validation split",
                            train_path.display(),
                            shard.len,
                            model.max_seq_len
                        );
                    }
                    let (tr, va) = TokenSource::split_shard(shard, hold);
                    (tr, va, None)
                }
            }
        }
    };
    if lang.is_some() {
        declared_vocab = Some(tr.vocab_size());
    }
    if let Some(v) = declared_vocab.filter(|&v| v > model.vocab_size) {
        return Err(vocab_too_small(v, model));
    }
    Ok((tr, va, lang))
}

/// The error for data whose declared vocabulary the model cannot hold.
fn vocab_too_small(data_vocab: usize, model: &ModelConfig) -> anyhow::Error {
    anyhow::anyhow!(
        "the data's vocabulary ({data_vocab} ids) exceeds the model's vocab_size {}; for a new run set \
         --vocab-size (or leave it unset to follow the data); to resume, give data made with the run's tokenizer",
        model.vocab_size
    )
}

/// Tokens a single training shard holds out for validation, at its end: the last 5%, at
/// least one sequence (`eval --data SHARD` scores the same tail).
pub fn held_out_tokens(shard_len: usize, max_seq_len: usize) -> usize {
    (shard_len / 20).max(max_seq_len + 1)
}

/// Opens a shard and scans it once, so a bad id is reported now, naming where it is, not mid-run.
pub fn open_checked_shard(path: &Path, model: &ModelConfig) -> Result<TokenShard> {
    let shard = TokenShard::open(path)?;
    if let Some(v) = shard.declared_vocab().filter(|&v| v > model.vocab_size) {
        return Err(vocab_too_small(v, model).context(format!("token shard {}", path.display())));
    }
    let limit = model.vocab_size.min(shard.vocab_size);
    let mut buf = vec![0u32; 1 << 16];
    for start in (0..shard.len).step_by(buf.len()) {
        let n = buf.len().min(shard.len - start);
        shard.read_into(start, &mut buf[..n]);
        if let Some(k) = buf[..n].iter().position(|&id| id as usize >= limit) {
            bail!(
                "token shard {}: token id {} at position {} is out of range (shard vocab {}, model vocab_size {})",
                path.display(),
                buf[k],
                start + k,
                shard.vocab_size,
                model.vocab_size
            );
        }
    }
    Ok(shard)
}
