//! `nanoseek data`: raw text → tokenizer + token shards + manifest.
//!
//! Inputs (any mix of files and folders; folders are walked recursively in name order,
//! hidden files skipped):
//! * plain text (any extension but the ones below): one file = one document;
//! * JSONL (`.jsonl`, `.ndjson`): one record = one document, its string field `--jsonl-field`;
//! * `--dataset wikitext --input DIR`: a WikiText folder (`wiki.{train,valid,test}.tokens`
//!   or `{train,valid,test}.txt`); one article (from a ` = Title = ` heading to the next)
//!   = one document, and the folder's own splits are kept (no train split: `test` trains);
//! * `--synthetic --num-samples N --max-seq-len L`: N documents of the embedded synthetic
//!   language, each cut to at most L tokens (no tokenizer.json: the language is word-level).
//!
//! Output folder:
//! ```text
//!   tokenizer.json  the BPE tokenizer (trained here, or a copy of --tokenizer)
//!   train.bin       nanoseek token shard (see shard.rs)
//!   val.bin         validation shard
//!   test.bin        test shard (WikiText with a test split only)
//!   manifest.json   token counts, bytes, bytes per token, sources, tokenizer
//! ```
//! Every document is written `BOS ids EOT` (a tokenizer without one of them leaves it
//! out; GPT-2's has only `<|endoftext|>`). Without explicit validation inputs, every
//! ⌈1/f⌉-th document goes to validation (f = `--val-fraction`, spread evenly over the
//! corpus); a corpus with too few documents for that is split at the token level instead
//! (the last f of the tokens, from a document start when there is one). The tokenizer is
//! trained on the train split only (in that fallback, on all of it).
//!
//! Text must be UTF-8 (a leading byte-order mark is dropped; so is whitespace-only text
//! outside documents): anything else stops the run with the file and byte offset. Files
//! are read in chunks (a large plain-text file is one document encoded in ~1 MiB pieces
//! cut at line ends), so memory stays bounded. Every output is written atomically.

use super::codec::TextCodec;
use super::shard::{ShardWriter, TokenShard};
use super::synthetic::SyntheticLanguage;
use super::tasks::TaskKind;
use super::tokenizer::BpeTokenizer;
use crate::fsutil::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use super::location::{check_data_tokenizer, copy_tokenizer_to_run, data_vocab_size, DataLocation};
use super::sources::*;

pub const MANIFEST: &str = "manifest.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const MANIFEST_VERSION: u32 = 1;
/// Pieces handed to the tokenizer at once (encoded in parallel).
const BATCH_BYTES: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Text/JSONL files or folders (or the WikiText folder with `dataset`).
    pub inputs: Vec<PathBuf>,
    /// Explicit validation inputs (then `val_fraction` is not used).
    pub val_inputs: Vec<PathBuf>,
    /// `Some("wikitext")`: `inputs` is one WikiText folder.
    pub dataset: Option<String>,
    pub jsonl_field: String,
    /// N synthetic-language documents of at most `max_seq_len` tokens instead of inputs.
    pub synthetic: Option<(usize, usize)>,
    /// With `synthetic`: long-range task samples of exactly `max_seq_len` tokens, cycling over
    /// these kinds, instead of plain documents (see `data::tasks`).
    pub tasks: Vec<TaskKind>,
    /// An existing tokenizer.json to use instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer (special tokens and 256 bytes included).
    pub vocab_size: usize,
    /// Stop feeding the tokenizer trainer after this many bytes.
    pub tokenizer_train_bytes: u64,
    pub val_fraction: f64,
    pub seed: u64,
    pub output: PathBuf,
    pub progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            inputs: vec![],
            val_inputs: vec![],
            dataset: None,
            jsonl_field: "text".into(),
            synthetic: None,
            tasks: Vec::new(),
            tokenizer: None,
            vocab_size: 4096,
            tokenizer_train_bytes: 1 << 30,
            val_fraction: 0.05,
            seed: 42,
            output: PathBuf::from("data"),
            progress: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// The shard file, relative to the manifest.
    pub file: String,
    /// Tokens in the shard, BOS/EOT included.
    pub tokens: u64,
    pub documents: u64,
    /// UTF-8 bytes of the source text.
    pub bytes: u64,
    /// Tokens of text (BOS/EOT excluded).
    pub text_tokens: u64,
    /// bytes / text_tokens: the tokenizer's compression on this split.
    pub bytes_per_token: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    /// `text`, `jsonl`, `wikitext` or `synthetic`.
    pub kind: String,
    /// `train`, `val`, `test`, or `auto` (split by document).
    pub split: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `bpe` (tokenizer.json beside the manifest) or `synthetic` (the embedded language).
    pub kind: String,
    /// `tokenizer.json`, or null for the synthetic language.
    pub file: Option<String>,
    /// `trained` or the path it was copied from.
    pub origin: String,
    pub vocab_size: usize,
    pub bos: Option<u32>,
    pub eot: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub tokenizer: TokenizerInfo,
    /// The shards' vocabulary size (every id is below it).
    pub vocab_size: usize,
    /// Bytes per token id in the shards (2 or 4).
    pub token_width: usize,
    /// `train`, `val` and (WikiText with a test split) `test`.
    pub splits: BTreeMap<String, SplitStats>,
    /// How validation was chosen: `inputs`, `documents` or `token-tail`.
    pub val_split: String,
    pub val_fraction: f64,
    pub sources: Vec<SourceInfo>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid nanoseek data manifest", p.display()))
    }

    /// The shard of `split` (e.g. "train", "val").
    pub fn shard_path(&self, dir: &Path, split: &str) -> Option<PathBuf> {
        self.splits.get(split).map(|s| dir.join(&s.file))
    }
}

// ---------------------------------------------------------------------------------------
// The pipeline

struct Out {
    writer: ShardWriter,
    stats: SplitStats,
}

/// Runs `nanoseek data`. Returns the manifest it wrote.
pub fn prepare(o: &PrepareOptions) -> Result<Manifest> {
    // A failed run leaves nothing behind: an output folder it created is removed again.
    let existed = o.output.exists();
    let result = prepare_files(o);
    if result.is_err() && !existed && o.output.is_dir() {
        let _ = std::fs::remove_dir_all(&o.output);
    }
    result
}

fn prepare_files(o: &PrepareOptions) -> Result<Manifest> {
    if !(0.0..1.0).contains(&o.val_fraction) {
        bail!("--val-fraction {} must be in [0, 1)", o.val_fraction);
    }
    let say = |s: String| {
        if o.progress {
            eprintln!("{s}");
        }
    };
    // Sources, validated before anything is written.
    let mut sources = Vec::new();
    if !o.tasks.is_empty() && o.synthetic.is_none() {
        bail!("--task needs --synthetic (task samples use the synthetic language's vocabulary)");
    }
    match (o.synthetic, o.dataset.as_deref()) {
        (Some(_), _) if !o.inputs.is_empty() || o.dataset.is_some() => {
            bail!("--synthetic generates its own documents; drop --input/--dataset")
        }
        (Some(_), _) => {}
        (None, Some("wikitext")) => {
            let [dir] = o.inputs.as_slice() else { bail!("--dataset wikitext needs exactly one --input DIR") };
            let (s, notice) = wikitext_sources(dir)?;
            if let Some(n) = notice {
                say(n);
            }
            sources = s;
        }
        (None, Some(other)) => bail!("unknown --dataset '{other}'; known: wikitext (or give text/JSONL with --input)"),
        (None, None) => {
            if o.inputs.is_empty() {
                bail!("no input: give --input FILE_OR_DIR (text or JSONL), --dataset wikitext --input DIR, or --synthetic");
            }
            sources = sources_of(&o.inputs, Split::Auto)?;
            sources.extend(sources_of(&o.val_inputs, Split::Val)?);
        }
    }
    if o.synthetic.is_none() && sources.is_empty() {
        bail!("the inputs hold no files");
    }
    let has_val_source = sources.iter().any(|s| s.split == Split::Val);
    std::fs::create_dir_all(&o.output)
        .with_context(|| format!("cannot create output folder {}", o.output.display()))?;

    if let Some((n, max_len)) = o.synthetic {
        return prepare_synthetic(o, n, max_len);
    }

    let total_bytes: u64 = sources.iter().map(|s| s.bytes).sum();
    let bar = |msg: &str, len: u64| {
        let pb = if o.progress { ProgressBar::new(len) } else { ProgressBar::hidden() };
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>22} [{elapsed_precise}] {bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap(),
        );
        pb.set_message(msg.to_string());
        pb
    };

    // 1. The tokenizer: loaded, or trained on the train split.
    let (tok, origin) = match &o.tokenizer {
        Some(p) => (BpeTokenizer::load(p)?, p.display().to_string()),
        None => {
            let pb = bar("training tokenizer", total_bytes);
            let tok = train_tokenizer(o, &sources, has_val_source, &pb)?;
            pb.finish_and_clear();
            (tok, "trained".to_string())
        }
    };
    let vocab = tok.vocab_size();
    tok.save(&o.output.join(TOKENIZER))?;
    say(format!("tokenizer: {vocab} ids ({origin}), saved to {}", o.output.join(TOKENIZER).display()));

    // 2. Encode into shards.
    let mut outs: BTreeMap<&'static str, Out> = BTreeMap::new();
    let pb = bar("tokenizing", total_bytes);
    let mut doc_index = 0u64;
    let mut doc_split = Split::Train;
    let mut batch: Vec<(Split, Piece)> = Vec::new();
    let mut batch_bytes = 0usize;
    let (bos, eot) = (tok.bos(), tok.eot());
    let flush = |batch: &mut Vec<(Split, Piece)>, outs: &mut BTreeMap<&'static str, Out>| -> Result<()> {
        let texts: Vec<String> = batch.iter_mut().map(|(_, p)| std::mem::take(&mut p.text)).collect();
        let lens: Vec<usize> = texts.iter().map(String::len).collect();
        let ids = tok.encode_batch(texts)?;
        for (((split, p), ids), len) in batch.drain(..).zip(ids).zip(lens) {
            let name = split.name();
            let out = match outs.get_mut(name) {
                Some(out) => out,
                None => {
                    let file = format!("{name}.bin");
                    let writer = ShardWriter::create(&o.output.join(&file), vocab)?;
                    outs.entry(name).or_insert(Out { writer, stats: SplitStats { file, ..Default::default() } })
                }
            };
            let mut row = Vec::with_capacity(ids.len() + 2);
            if p.starts_doc {
                row.extend(bos);
                out.stats.documents += 1;
            }
            row.extend_from_slice(&ids);
            if p.ends_doc {
                row.extend(eot);
            }
            out.writer.push(&row)?;
            out.stats.tokens += row.len() as u64;
            out.stats.text_tokens += ids.len() as u64;
            out.stats.bytes += len as u64;
        }
        Ok(())
    };
    for src in &sources {
        let mut read = 0u64;
        read_source(src, &o.jsonl_field, &mut |p: Piece| {
            if p.starts_doc {
                doc_split = match src.split {
                    Split::Auto if !has_val_source && is_val_doc(doc_index, o.val_fraction) => Split::Val,
                    Split::Auto => Split::Train,
                    s => s,
                };
                doc_index += 1;
            }
            read += p.text.len() as u64;
            pb.set_position(pb.position() + p.text.len() as u64);
            batch_bytes += p.text.len();
            batch.push((doc_split, p));
            if batch_bytes >= BATCH_BYTES {
                flush(&mut batch, &mut outs)?;
                batch_bytes = 0;
            }
            Ok(())
        })?;
        let _ = read;
    }
    flush(&mut batch, &mut outs)?;
    pb.finish_and_clear();

    let Some(train) = outs.remove("train") else {
        bail!("the inputs hold no training text (every document went to validation or test)")
    };
    let mut val_split = if has_val_source { "inputs" } else { "documents" }.to_string();
    let mut splits = BTreeMap::new();
    if !outs.contains_key("val") && o.val_fraction > 0.0 {
        // Too few documents to hold whole ones out: split the train tokens instead.
        val_split = "token-tail".into();
        let (tr, va) = split_tail(train, o, &tok)?;
        splits.insert("train".to_string(), tr);
        splits.insert("val".to_string(), va);
    } else {
        train.writer.finish()?;
        splits.insert("train".to_string(), train.stats);
    }
    for (name, out) in outs {
        out.writer.finish()?;
        splits.insert(name.to_string(), out.stats);
    }
    for s in splits.values_mut() {
        s.bytes_per_token = s.bytes as f64 / s.text_tokens.max(1) as f64;
    }
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        created_by: format!("nanoseek {}", env!("CARGO_PKG_VERSION")),
        tokenizer: TokenizerInfo {
            kind: "bpe".into(),
            file: Some(TOKENIZER.into()),
            origin,
            vocab_size: vocab,
            bos,
            eot,
        },
        vocab_size: vocab,
        token_width: if vocab <= 1 << 16 { 2 } else { 4 },
        splits,
        val_split,
        val_fraction: o.val_fraction,
        sources: sources
            .iter()
            .map(|s| SourceInfo {
                path: s.path.display().to_string(),
                kind: s.kind.name().into(),
                split: s.split.name().into(),
                bytes: s.bytes,
            })
            .collect(),
    };
    finish_output(o, &manifest)?;
    Ok(manifest)
}

fn train_tokenizer(o: &PrepareOptions, sources: &[Source], has_val: bool, pb: &ProgressBar) -> Result<BpeTokenizer> {
    // A reader thread feeds the trainer through a bounded channel (the trainer wants an
    // iterator; reading may fail, and its error is returned after training).
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(64);
    let budget = o.tokenizer_train_bytes;
    let sources = sources.to_vec();
    let (field, f) = (o.jsonl_field.clone(), o.val_fraction);
    let pb2 = pb.clone();
    let reader = std::thread::spawn(move || -> Result<()> {
        let (mut fed, mut doc, mut is_val) = (0u64, 0u64, false);
        for src in sources.iter().filter(|s| matches!(s.split, Split::Train | Split::Auto)) {
            let r = read_source(src, &field, &mut |p: Piece| {
                if p.starts_doc {
                    is_val = src.split == Split::Auto && !has_val && is_val_doc(doc, f);
                    doc += 1;
                }
                pb2.inc(p.text.len() as u64);
                if is_val || fed >= budget {
                    return Ok(());
                }
                fed += p.text.len() as u64;
                tx.send(p.text).map_err(|_| anyhow!("the tokenizer trainer stopped"))
            });
            r?;
        }
        Ok(())
    });
    let trained = BpeTokenizer::train(rx.into_iter(), o.vocab_size, false);
    let read = reader.join().map_err(|_| anyhow!("the reader thread panicked"))?;
    let tok = trained?;
    read?;
    Ok(tok)
}

/// Moves the last `val_fraction` of the train tokens (from a BOS when there is one) to val.
/// The moved tokens' text bytes are counted from the tokenizer, so each split's bytes (and
/// bits per byte computed from them) are exact.
fn split_tail(train: Out, o: &PrepareOptions, tok: &BpeTokenizer) -> Result<(SplitStats, SplitStats)> {
    let (vocab, bos) = (tok.vocab_size(), tok.bos());
    let special = [tok.bos(), tok.eot()];
    let Out { writer, stats } = train;
    let final_path = o.output.join(&stats.file);
    writer.finish()?;
    // The finished shard stays mapped while its replacement is renamed over it.
    let result = (|| {
        let shard = TokenShard::open(&final_path)?;
        let n = shard.len;
        let mut cut = n - ((n as f64 * o.val_fraction).ceil() as usize).clamp(1, n.saturating_sub(1).max(1));
        if let Some(b) = bos {
            if let Some(at) = shard.find(b, cut, n) {
                if at > 0 && n - at >= 2 {
                    cut = at;
                }
            }
        }
        let mut tr = ShardWriter::create(&final_path, vocab)?;
        let mut va = ShardWriter::create(&o.output.join("val.bin"), vocab)?;
        let mut buf = vec![0u32; 1 << 16];
        let mut i = 0;
        let (mut val_bytes, mut val_text_tokens) = (0u64, 0u64);
        while i < n {
            let m = buf.len().min(n - i);
            shard.read_into(i, &mut buf[..m]);
            let (a, b) = buf[..m].split_at(cut.saturating_sub(i).min(m));
            tr.push(a)?;
            va.push(b)?;
            val_bytes += TextCodec::byte_len(tok, b) as u64;
            val_text_tokens += b.iter().filter(|&&id| !special.contains(&Some(id))).count() as u64;
            i += m;
        }
        let (nt, nv) = (tr.len(), va.len());
        tr.finish()?;
        va.finish()?;
        let val = SplitStats {
            file: "val.bin".into(),
            tokens: nv,
            documents: 0,
            bytes: val_bytes.min(stats.bytes),
            text_tokens: val_text_tokens,
            bytes_per_token: 0.0,
        };
        let train = SplitStats {
            file: stats.file.clone(),
            tokens: nt,
            documents: stats.documents,
            bytes: stats.bytes - val.bytes,
            text_tokens: stats.text_tokens - val.text_tokens,
            bytes_per_token: 0.0,
        };
        Ok((train, val))
    })();
    result
}

fn prepare_synthetic(o: &PrepareOptions, n: usize, max_len: usize) -> Result<Manifest> {
    if n == 0 || max_len < 2 {
        bail!("--synthetic needs --num-samples ≥ 1 and --max-seq-len ≥ 2");
    }
    let lang = SyntheticLanguage::new();
    let vocab = lang.vocab_size();
    let mut rng = crate::rng::Rng::derive(o.seed, "nanoseek-data-synthetic");
    let mut outs: BTreeMap<&str, Out> = BTreeMap::new();
    // Task samples, one run of n/len(tasks) per kind (uniform depths), interleaved.
    let per_kind = n.div_ceil(o.tasks.len().max(1));
    let task_samples = o
        .tasks
        .iter()
        .map(|&k| super::tasks::generate(k, per_kind, max_len, o.seed, None))
        .collect::<Result<Vec<_>>>()?;
    let pb = if o.progress { ProgressBar::new(n as u64) } else { ProgressBar::hidden() };
    for i in 0..n {
        let mut doc = if task_samples.is_empty() {
            lang.document(&mut rng)
        } else {
            task_samples[i % task_samples.len()][i / task_samples.len()].tokens.clone()
        };
        doc.truncate(max_len);
        let name = if is_val_doc(i as u64, o.val_fraction) { "val" } else { "train" };
        let out = match outs.get_mut(name) {
            Some(out) => out,
            None => {
                let file = format!("{name}.bin");
                let writer = ShardWriter::create(&o.output.join(&file), vocab)?;
                outs.entry(name).or_insert(Out { writer, stats: SplitStats { file, ..Default::default() } })
            }
        };
        out.writer.push(&doc)?;
        out.stats.tokens += doc.len() as u64;
        out.stats.documents += 1;
        out.stats.bytes += TextCodec::byte_len(&lang, &doc) as u64;
        out.stats.text_tokens +=
            doc.iter().filter(|&&t| t != lang.bos().unwrap() && t != lang.eot().unwrap()).count() as u64;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut splits = BTreeMap::new();
    for (name, out) in outs {
        out.writer.finish()?;
        let mut s = out.stats;
        s.bytes_per_token = s.bytes as f64 / s.text_tokens.max(1) as f64;
        splits.insert(name.to_string(), s);
    }
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        created_by: format!("nanoseek {}", env!("CARGO_PKG_VERSION")),
        tokenizer: TokenizerInfo {
            kind: "synthetic".into(),
            file: None,
            origin: "embedded synthetic language".into(),
            vocab_size: vocab,
            bos: lang.bos(),
            eot: lang.eot(),
        },
        vocab_size: vocab,
        token_width: 2,
        splits,
        val_split: "documents".into(),
        val_fraction: o.val_fraction,
        sources: vec![SourceInfo {
            path: if o.tasks.is_empty() {
                format!("synthetic:{n}x{max_len}:seed{}", o.seed)
            } else {
                let names: Vec<&str> = o.tasks.iter().map(|k| k.name()).collect();
                format!("synthetic-tasks:{}:{n}x{max_len}:seed{}", names.join("+"), o.seed)
            },
            kind: "synthetic".into(),
            split: "auto".into(),
            bytes: 0,
        }],
    };
    finish_output(o, &manifest)?;
    Ok(manifest)
}

/// Writes the manifest and removes outputs of an earlier run that this one did not write.
fn finish_output(o: &PrepareOptions, m: &Manifest) -> Result<()> {
    let mut keep: Vec<String> = m.splits.values().map(|s| s.file.clone()).collect();
    keep.extend(m.tokenizer.file.clone());
    for stale in ["train.bin", "val.bin", "test.bin", TOKENIZER] {
        let p = o.output.join(stale);
        if !keep.iter().any(|k| k == stale) && p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove stale {}", p.display()))?;
        }
    }
    write_atomic(&o.output.join(MANIFEST), serde_json::to_string_pretty(m)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_documents_are_spread_evenly() {
        let picked: Vec<u64> = (0..100).filter(|&i| is_val_doc(i, 0.05)).collect();
        assert_eq!(picked, vec![19, 39, 59, 79, 99]);
        assert!(!(0..100).any(|i| is_val_doc(i, 0.0)));
    }

    #[test]
    fn wikitext_headings() {
        assert!(is_wikitext_heading(" = Robert Boulter = \n"));
        assert!(!is_wikitext_heading(" = = Career = = \n"));
        assert!(!is_wikitext_heading(" a = b = c\n"));
    }
}
