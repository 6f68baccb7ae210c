//! `metrics.jsonl`: one JSON object per line, appended as training goes.
//! Train lines carry `loss`; evaluation lines carry `val_loss`; both carry `step`.

use crate::fsutil::write_atomic;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens for appending. When resuming from `keep_through_step`, lines of later
    /// steps (from the run that went past the checkpoint) are dropped first.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<MetricsLog> {
        if let Some(k) = keep_through_step {
            let kept: Vec<Value> =
                read(path)?.into_iter().filter(|v| v["step"].as_u64().is_some_and(|s| s <= k)).collect();
            let text: String = kept.iter().map(|v| format!("{v}\n")).collect();
            write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn log(&mut self, record: Value) -> Result<()> {
        writeln!(self.file, "{record}").with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

/// All records of a metrics file (empty if it does not exist). Torn last lines are skipped.
pub fn read(path: &Path) -> Result<Vec<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// (step, value) pairs of one field across the records that have it.
pub fn series(records: &[Value], field: &str) -> Vec<(f64, f64)> {
    records.iter().filter_map(|r| Some((r["step"].as_f64()?, r[field].as_f64()?))).collect()
}
