//! Where a data argument's shards are (a `nanoseek data` folder or one shard), the vocabulary
//! it implies, and its tokenizer's checks and copy into a run directory.

use super::prepare::{Manifest, MANIFEST, TOKENIZER};
use super::shard::TokenShard;
use crate::fsutil::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where a data argument's shards are: a data folder (manifest, or train.bin/val.bin) or one shard.
pub enum DataLocation {
    /// A folder written by `nanoseek data`: train and validation shards.
    Dir { dir: PathBuf, train: PathBuf, val: Option<PathBuf> },
    /// A single shard file (nanoseek or llm.c).
    Shard(PathBuf),
}

impl DataLocation {
    pub fn resolve(path: &Path) -> Result<DataLocation> {
        if !path.is_dir() {
            return Ok(DataLocation::Shard(path.to_path_buf()));
        }
        let (train, val) = if path.join(MANIFEST).exists() {
            let m = Manifest::read(path)?;
            let train = m
                .shard_path(path, "train")
                .ok_or_else(|| anyhow!("{} lists no train split", path.join(MANIFEST).display()))?;
            (train, m.shard_path(path, "val"))
        } else {
            let val = path.join("val.bin");
            (path.join("train.bin"), val.exists().then_some(val))
        };
        if !train.exists() {
            bail!(
                "{} is a folder without a train shard ({} not found); give a shard file or a folder written by `nanoseek data`",
                path.display(),
                train.display()
            );
        }
        Ok(DataLocation::Dir { dir: path.to_path_buf(), train, val })
    }

    /// The shard holding `split` ("train", "val", "test"); a single shard is every split.
    pub fn split(&self, split: &str) -> Result<PathBuf> {
        match self {
            DataLocation::Shard(p) => Ok(p.clone()),
            DataLocation::Dir { dir, train, val } => match split {
                "train" => Ok(train.clone()),
                "val" => val.clone().ok_or_else(|| anyhow!("{} has no validation shard", dir.display())),
                other => {
                    let m = Manifest::read(dir)?;
                    m.shard_path(dir, other).ok_or_else(|| anyhow!("{} has no '{other}' split", dir.display()))
                }
            },
        }
    }

    /// The tokenizer.json that wrote these shards, if there is one.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let dir = match self {
            DataLocation::Dir { dir, .. } => dir.clone(),
            DataLocation::Shard(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        Some(dir.join(TOKENIZER)).filter(|p| p.is_file())
    }
}

/// The vocabulary size of the data at `path` (a data folder or a shard): the one its header
/// declares, or for an llm.c shard (whose header declares none) the largest id + 1 rounded up
/// to a multiple of 64, so a shard of a 4096-id tokenizer does not build a 50,257-id model.
pub fn data_vocab_size(path: &Path) -> Result<usize> {
    let loc = DataLocation::resolve(path)?;
    let shard = TokenShard::open(&loc.split("train")?)?;
    Ok(match shard.declared_vocab() {
        Some(v) => v,
        None => (shard.max_id().map_or(0, |m| m as usize + 1)).div_ceil(64).max(1) * 64,
    })
}

/// Checks that the data's tokenizer.json (if any) parses and that its ids fit the model's vocab_size,
/// before a run copies it.
pub fn check_data_tokenizer(data: Option<&Path>, vocab_size: usize) -> Result<()> {
    let Some(data) = data else { return Ok(()) };
    if let Some(src) = DataLocation::resolve(data)?.tokenizer_json() {
        let tok = crate::data::tokenizer::BpeTokenizer::load(&src)?;
        let ids = tok.inner().get_vocab(true).values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if ids > vocab_size {
            bail!("{} has {ids} ids; the model's vocab_size is {vocab_size}", src.display());
        }
    }
    Ok(())
}

/// Copies the data's tokenizer.json (if any) into a run directory, so the run can decode.
pub fn copy_tokenizer_to_run(data: Option<&Path>, run_dir: &Path) -> Result<()> {
    let Some(data) = data else { return Ok(()) };
    if let Some(src) = DataLocation::resolve(data)?.tokenizer_json() {
        let bytes = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        write_atomic(&run_dir.join(TOKENIZER), &bytes)?;
    }
    Ok(())
}
