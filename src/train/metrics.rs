//! `metrics.jsonl`: one JSON object per line, appended as training goes.
//! Train lines carry `loss`; evaluation lines carry `val_loss`; both carry `step`.
//! MoE runs add `moe` to train lines: one object per MoE layer (see [`moe_record`]).

use crate::fsutil::write_atomic;
use crate::kernels::slices::moe::load_stats;
use crate::nn::model::MoeLoad;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// TensorBoard events, one per line logged (see `super::events`).
    events: Option<super::events::EventWriter>,
}

impl MetricsLog {
    /// Opens for appending. When resuming from `keep_through_step`, lines of later
    /// steps (from the run that went past the checkpoint) are dropped first.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<MetricsLog> {
        if let Some(k) = keep_through_step {
            // The kept lines keep their original text (re-printing parsed floats could change digits).
            let old = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            let text: String = old
                .lines()
                .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["step"].as_u64().is_some_and(|s| s <= k)))
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { path: path.to_path_buf(), file, events: None })
    }

    /// Also writes every logged line as a TensorBoard event.
    pub fn with_events(mut self, events: super::events::EventWriter) -> MetricsLog {
        self.events = Some(events);
        self
    }

    pub fn log(&mut self, record: Value) -> Result<()> {
        writeln!(self.file, "{record}").with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush()?;
        if let Some(events) = &mut self.events {
            events.log(&record)?;
        }
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

/// The `moe` field of a train line: per MoE layer `{layer, max_mean, cv, dropped_frac, bias_min,
/// bias_max, balance_loss, load}`, where max_mean is the max/mean tokens per expert, cv their
/// coefficient of variation, and `load` each expert's share of the step's kept assignments
/// divided by the mean share (1 = perfectly balanced).
pub fn moe_record(loads: &[Option<MoeLoad>], biases: &[Vec<f32>]) -> Value {
    let layers: Vec<Value> = loads
        .iter()
        .zip(biases)
        .enumerate()
        .filter_map(|(l, (load, bias))| {
            let load = load.as_ref()?;
            let (max_mean, cv) = load_stats(&load.counts);
            let total: usize = load.counts.iter().sum();
            let mean = total as f64 / load.counts.len().max(1) as f64;
            let rel: Vec<f64> = load
                .counts
                .iter()
                .map(|&c| if mean > 0.0 { (c as f64 / mean * 1e3).round() / 1e3 } else { 0.0 })
                .collect();
            let bmin = bias.iter().copied().fold(f32::INFINITY, f32::min);
            let bmax = bias.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            Some(serde_json::json!({
                "layer": l,
                "max_mean": max_mean,
                "cv": cv,
                "dropped_frac": load.dropped as f64 / load.assignments.max(1) as f64,
                "bias_min": bmin,
                "bias_max": bmax,
                "balance_loss": load.balance_loss,
                "load": rel,
            }))
        })
        .collect();
    Value::Array(layers)
}

/// One MoE layer's expert loads over training: the layer and, per logged step, (step, load / mean).
pub type LoadHistory = (usize, Vec<(f64, Vec<f64>)>);

/// Per MoE layer: the steps and, for each, the experts' relative loads (from `moe` fields).
pub fn moe_load_history(records: &[Value]) -> Vec<LoadHistory> {
    let mut by_layer: std::collections::BTreeMap<usize, Vec<(f64, Vec<f64>)>> = Default::default();
    for r in records {
        let (Some(step), Some(layers)) = (r["step"].as_f64(), r["moe"].as_array()) else { continue };
        for layer in layers {
            let (Some(l), Some(load)) = (layer["layer"].as_u64(), layer["load"].as_array()) else { continue };
            let load = load.iter().filter_map(Value::as_f64).collect();
            by_layer.entry(l as usize).or_default().push((step, load));
        }
    }
    by_layer.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_keeps_the_kept_lines_text_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        // digits a parse-and-print round trip would not keep (f64 holds ~17 significant digits)
        let kept = "{\"step\":1,\"loss\":4.12345678901234567890123,\"lr_mult\":1e-7}\n{\"step\":2, \"loss\":3.0}\n";
        std::fs::write(&path, format!("{kept}{{\"step\":3,\"loss\":2.5}}\n{{\"step\":4,\"lo")).unwrap();
        let mut log = MetricsLog::open(&path, Some(2)).unwrap();
        log.log(serde_json::json!({"step": 3})).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{kept}{{\"step\":3}}\n"));
    }
}
