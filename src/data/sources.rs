//! Reading `nanoseek data`'s inputs as documents: text files and folders, JSONL records and
//! WikiText articles, in UTF-8 pieces of bounded size, each with its split.

use super::tokenizer::check_utf8;
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Plain text is encoded in pieces of about this many bytes, cut at line ends.
const PIECE_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Jsonl,
    WikiText,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Jsonl => "jsonl",
            Kind::WikiText => "wikitext",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Split {
    Train,
    Val,
    Test,
    /// Decided per document by the validation fraction.
    Auto,
}

impl Split {
    pub(super) fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Auto => "auto",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Source {
    pub(super) path: PathBuf,
    pub(super) kind: Kind,
    pub(super) split: Split,
    pub(super) bytes: u64,
}

/// A run of one document's text; a document is one or more pieces.
pub(super) struct Piece {
    pub(super) text: String,
    pub(super) starts_doc: bool,
    pub(super) ends_doc: bool,
}

pub(super) fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("input {} not found", path.display()))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", path.display()))?;
    entries.sort();
    for e in entries {
        if e.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        collect_files(&e, out)?;
    }
    Ok(())
}

pub(super) fn sources_of(paths: &[PathBuf], split: Split) -> Result<Vec<Source>> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    files
        .into_iter()
        .map(|path| {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            let kind = if ext == "jsonl" || ext == "ndjson" { Kind::Jsonl } else { Kind::Text };
            let bytes = std::fs::metadata(&path)?.len();
            Ok(Source { path, kind, split, bytes })
        })
        .collect()
}

pub(super) fn wikitext_sources(dir: &Path) -> Result<(Vec<Source>, Option<String>)> {
    if !dir.is_dir() {
        bail!("--dataset wikitext needs --input DIR, a WikiText folder; {} is not a folder", dir.display());
    }
    let find = |names: &[&str]| names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
    let train = find(&["wiki.train.tokens", "wiki.train.raw", "train.txt"]);
    let val = find(&["wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "validation.txt"]);
    let test = find(&["wiki.test.tokens", "wiki.test.raw", "test.txt"]);
    let mut notice = None;
    let mut out = Vec::new();
    let mut add = |p: PathBuf, split| -> Result<()> {
        let bytes = std::fs::metadata(&p)?.len();
        out.push(Source { path: p, kind: Kind::WikiText, split, bytes });
        Ok(())
    };
    match (train, test) {
        (Some(tr), test) => {
            add(tr, Split::Train)?;
            if let Some(te) = test {
                add(te, Split::Test)?;
            }
        }
        (None, Some(te)) => {
            notice = Some(format!(
                "{} has no train split; training on {} (validation stays separate)",
                dir.display(),
                te.display()
            ));
            add(te, Split::Train)?;
        }
        (None, None) => bail!(
            "{} holds no WikiText split: expected wiki.train.tokens / train.txt (or test.txt) and wiki.valid.tokens / valid.txt",
            dir.display()
        ),
    }
    match val {
        Some(v) => add(v, Split::Val)?,
        None => notice = Some(format!("{} has no validation split; holding out documents instead", dir.display())),
    }
    Ok((out, notice))
}

/// Calls `sink` with every piece of `src`'s documents, in order.
pub(super) fn read_source(src: &Source, field: &str, sink: &mut dyn FnMut(Piece) -> Result<()>) -> Result<()> {
    let what = src.path.display().to_string();
    match src.kind {
        Kind::Jsonl => {
            let f = std::fs::File::open(&src.path).with_context(|| format!("cannot open {what}"))?;
            let mut r = std::io::BufReader::new(f);
            let (mut line, mut offset, mut lineno) = (Vec::new(), 0u64, 0usize);
            loop {
                line.clear();
                let n = r.read_until(b'\n', &mut line).with_context(|| format!("cannot read {what}"))?;
                if n == 0 {
                    break;
                }
                lineno += 1;
                let text = check_utf8(&line, &what, offset)?;
                let text = if offset == 0 { text.strip_prefix('\u{feff}').unwrap_or(text) } else { text };
                offset += n as u64;
                if text.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(text).with_context(|| format!("{what}:{lineno}: not a JSON object"))?;
                let doc = match v.get(field) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(_) => bail!("{what}:{lineno}: field '{field}' is not a string"),
                    None => bail!("{what}:{lineno}: no field '{field}' (choose the text field with --jsonl-field)"),
                };
                sink(Piece { text: doc, starts_doc: true, ends_doc: true })?;
            }
        }
        Kind::Text | Kind::WikiText => {
            let f = std::fs::File::open(&src.path).with_context(|| format!("cannot open {what}"))?;
            let mut r = std::io::BufReader::with_capacity(1 << 20, f);
            let (mut line, mut offset) = (Vec::new(), 0u64);
            let mut piece = String::new();
            let mut doc_open = false; // a piece of the current document was already sent
            let wiki = src.kind == Kind::WikiText;
            loop {
                line.clear();
                let n = r.read_until(b'\n', &mut line).with_context(|| format!("cannot read {what}"))?;
                let text = check_utf8(&line, &what, offset)?;
                // a byte-order mark is not text
                let text = if offset == 0 { text.strip_prefix('\u{feff}').unwrap_or(text) } else { text };
                offset += n as u64;
                let heading = wiki && is_wikitext_heading(text);
                if (n == 0 || heading) && (!piece.is_empty() || doc_open) {
                    if !piece.trim().is_empty() || doc_open {
                        sink(Piece { text: std::mem::take(&mut piece), starts_doc: !doc_open, ends_doc: true })?;
                    }
                    piece.clear();
                    doc_open = false;
                }
                if n == 0 {
                    break;
                }
                piece.push_str(text);
                if piece.len() >= PIECE_BYTES {
                    sink(Piece { text: std::mem::take(&mut piece), starts_doc: !doc_open, ends_doc: false })?;
                    doc_open = true;
                }
            }
        }
    }
    Ok(())
}

/// ` = Title = ` (a top-level WikiText heading; ` = = Section = = ` is not).
pub(super) fn is_wikitext_heading(line: &str) -> bool {
    let t = line.trim();
    t.len() > 4 && t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =")
}

/// Whether document number `i` goes to validation: floor((i+1)·f) > floor(i·f), so a
/// fraction f of documents, spread evenly.
pub(super) fn is_val_doc(i: u64, f: f64) -> bool {
    f > 0.0 && ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
}
