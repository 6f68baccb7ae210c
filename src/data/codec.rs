//! Text ⇄ token ids. One trait, so eval (bits per byte), generation and the demo work the
//! same on the embedded synthetic language and on a trained BPE tokenizer (`tokenizer.json`).

use super::prepare::{DataLocation, Manifest, TOKENIZER};
use super::synthetic::{SyntheticLanguage, BOS, EOT};
use super::tokenizer::BpeTokenizer;
use anyhow::{bail, Context, Result};
use std::path::Path;

pub trait TextCodec: Send + Sync {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The text of `ids` (special tokens rendered readably).
    fn decode(&self, ids: &[u32]) -> String;
    /// UTF-8 bytes the ids stand for in the source text (for bits per byte); special tokens count 0.
    fn byte_len(&self, ids: &[u32]) -> usize;
    fn vocab_size(&self) -> usize;
    fn bos(&self) -> Option<u32>;
    fn eot(&self) -> Option<u32>;
}

impl TextCodec for SyntheticLanguage {
    /// Words separated by whitespace; `.`, `,` and `?` are their own words even when attached.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for raw in text.split_whitespace() {
            let mut word = raw;
            let mut tail = Vec::new();
            while let Some(p) = word.strip_suffix(['.', ',', '?']) {
                tail.push(&word[p.len()..]);
                word = p;
            }
            if !word.is_empty() {
                match self.token(word) {
                    Some(id) => ids.push(id),
                    None => bail!("the word {word:?} is not in the synthetic language's vocabulary"),
                }
            }
            for p in tail.into_iter().rev() {
                ids.push(self.token(p).expect("punctuation is in the vocabulary"));
            }
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> String {
        SyntheticLanguage::decode(self, ids)
    }

    /// Each word's bytes plus one separating space (none for punctuation or special tokens).
    fn byte_len(&self, ids: &[u32]) -> usize {
        ids.iter()
            .map(|&id| match self.word(id) {
                _ if id == BOS || id == EOT => 0,
                Some(w) if matches!(w, "." | "," | "?") => w.len(),
                Some(w) => w.len() + 1,
                None => 0,
            })
            .sum()
    }

    fn vocab_size(&self) -> usize {
        SyntheticLanguage::vocab_size(self)
    }

    fn bos(&self) -> Option<u32> {
        Some(BOS)
    }

    fn eot(&self) -> Option<u32> {
        Some(EOT)
    }
}

/// The codec of a run, from a checkpoint directory (`runs/NAME/checkpoints/step_N`), a run
/// directory or anything inside one: the `tokenizer.json` found in `path` or the folders
/// above it up to the run directory (the one holding `config.json`; `nanoseek train` copies
/// the data's tokenizer there), else the tokenizer of the data named in the run's
/// `config.json`, else — for runs on the embedded data, or a bare checkpoint — the
/// synthetic language. A run trained on shards without a tokenizer is an error: its ids
/// cannot be turned into text.
pub fn codec_for_run(path: &Path) -> Result<Box<dyn TextCodec>> {
    for dir in path.ancestors().take(4) {
        let tok = dir.join(TOKENIZER);
        if tok.is_file() {
            return Ok(Box::new(BpeTokenizer::load(&tok)?));
        }
        let config = dir.join("config.json");
        if config.is_file() {
            let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config.display()))?;
            return match v.pointer("/train/data").and_then(|d| d.as_str()) {
                None => Ok(Box::new(SyntheticLanguage::new())),
                Some(data) => codec_for_data(Path::new(data))?.with_context(|| {
                    format!(
                        "run {} was trained on {data}, which has no tokenizer.json: its ids cannot be decoded",
                        dir.display()
                    )
                }),
            };
        }
    }
    Ok(Box::new(SyntheticLanguage::new()))
}

/// Whether the run holding `path` (a checkpoint, a run directory) was trained on the embedded
/// synthetic language, the language the long-range tasks are written in: on the embedded
/// stream or on `nanoseek data --synthetic` data. A bare checkpoint (no run config above it)
/// counts as synthetic, as in `codec_for_run`.
pub fn run_is_synthetic(path: &Path) -> bool {
    for dir in path.ancestors().take(4) {
        if dir.join(TOKENIZER).is_file() {
            return false;
        }
        let config = dir.join("config.json");
        if config.is_file() {
            let v: Option<serde_json::Value> =
                std::fs::read_to_string(&config).ok().and_then(|t| serde_json::from_str(&t).ok());
            let Some(data) = v.as_ref().and_then(|v| v.pointer("/train/data")) else { return true };
            let Some(data) = data.as_str().map(Path::new) else { return true }; // null: embedded
            let folder = if data.is_dir() { Some(data) } else { data.parent() };
            return folder.and_then(|d| Manifest::read(d).ok()).is_some_and(|m| m.tokenizer.kind == "synthetic");
        }
    }
    true
}

/// The codec that wrote the data at `path` (a `nanoseek data` folder or a shard file):
/// its tokenizer.json, the synthetic language when the manifest says so, else None.
pub fn codec_for_data(path: &Path) -> Result<Option<Box<dyn TextCodec>>> {
    let loc = DataLocation::resolve(path)?;
    if let Some(tok) = loc.tokenizer_json() {
        return Ok(Some(Box::new(BpeTokenizer::load(&tok)?)));
    }
    if let DataLocation::Dir { dir, .. } = &loc {
        if dir.join(super::prepare::MANIFEST).is_file() && Manifest::read(dir)?.tokenizer.kind == "synthetic" {
            return Ok(Some(Box::new(SyntheticLanguage::new())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_round_trip() {
        let lang = SyntheticLanguage::new();
        let ids = lang.document(&mut crate::rng::Rng::new(3));
        let body = &ids[1..ids.len() - 1];
        let text = TextCodec::decode(&lang, body);
        assert_eq!(lang.encode(&text).unwrap(), body);
        assert!(lang.encode("the zzzqqq").unwrap_err().to_string().contains("zzzqqq"));
    }
}
