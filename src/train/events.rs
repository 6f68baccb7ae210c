//! TensorBoard event files: `events.out.tfevents.<unix time>.<host>` in the run directory,
//! one `Event` per `metrics.jsonl` line, readable by TensorBoard and by
//! `wandb sync --sync-tensorboard RUN_DIR`.
//!
//! The format is small enough to write by hand (no crate): a TFRecord stream, each record
//! `u64 length (LE) · u32 masked CRC32C of the length · data · u32 masked CRC32C of the data`,
//! whose data is an `Event` protobuf. Fields used (tensorflow/core/util/event.proto,
//! summary.proto): Event{1 wall_time: double, 2 step: int64, 3 file_version: string,
//! 5 summary: Summary, 7 session_log: SessionLog}; Summary{1 value: repeated Value};
//! Value{1 tag: string, 2 simple_value: float}; SessionLog{1 status: enum, START = 1}.

use crate::optim::OptimConfig;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotate right by 15, add a constant (so a CRC of CRCs is not trivial).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord frame around `data`.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// Protobuf wire format: a key varint (field << 3 | wire type), then the value.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// An `Event` protobuf: wall time, step, then a file version, scalars or a session-start mark.
pub enum EventBody<'a> {
    FileVersion,
    Scalars(&'a [(String, f32)]),
    SessionStart,
}

pub fn encode_event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut ev = Vec::new();
    varint(&mut ev, 1 << 3 | 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut ev, 2 << 3);
    varint(&mut ev, step as u64);
    match body {
        EventBody::FileVersion => bytes_field(&mut ev, 3, b"brain.Event:2"),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                varint(&mut value, 2 << 3 | 5);
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut ev, 5, &summary);
        }
        EventBody::SessionStart => bytes_field(&mut ev, 7, &[1 << 3, 1]),
    }
    ev
}

/// The scalars of one `metrics.jsonl` record, as (tag, value). Known fields get grouped tags
/// (`train/`, `val/`, `lr/`, `perf/`, `memory/`, `moe/`); any other number or boolean is kept
/// under `train/<field>` or, for `val_*` fields, `val/<rest>`, so fields added later appear too.
/// `base_lr` gives the effective learning rates (`lr/matrix` = `lr_mult` × matrix_lr, …).
pub fn scalars(record: &Value, base_lr: &OptimConfig) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let Some(fields) = record.as_object() else { return out };
    let num = |v: &Value| v.as_f64().or_else(|| v.as_bool().map(|b| if b { 1.0 } else { 0.0 }));
    for (key, v) in fields {
        match key.as_str() {
            "step" => {}
            "lr_mult" => {
                if let Some(m) = v.as_f64() {
                    out.push(("lr/multiplier".into(), m as f32));
                    out.push(("lr/matrix".into(), (m * base_lr.matrix_lr as f64) as f32));
                    out.push(("lr/embedding".into(), (m * base_lr.embedding_lr as f64) as f32));
                    out.push(("lr/unembedding".into(), (m * base_lr.unembedding_lr as f64) as f32));
                }
            }
            "tokens_per_s" | "step_time_s" | "elapsed_s" | "mfu" => {
                if let Some(x) = num(v) {
                    out.push((format!("perf/{key}"), x as f32));
                }
            }
            "peak_memory_mib" => {
                if let Some(x) = num(v) {
                    out.push(("memory/peak_mib".into(), x as f32));
                }
            }
            "peak_memory_by_category" => {
                for (cat, x) in v.as_object().into_iter().flatten() {
                    if let Some(x) = num(x) {
                        out.push((format!("memory/peak_{cat}_mib"), x as f32));
                    }
                }
            }
            "moe" => {
                for layer in v.as_array().into_iter().flatten() {
                    let Some(l) = layer["layer"].as_u64() else { continue };
                    for stat in ["max_mean", "cv", "dropped_frac", "balance_loss", "bias_min", "bias_max"] {
                        if let Some(x) = num(&layer[stat]) {
                            out.push((format!("moe/layer{l}/{stat}"), x as f32));
                        }
                    }
                    // the least-loaded expert relative to the mean (0 = an idle expert)
                    let loads = layer["load"].as_array().into_iter().flatten().filter_map(Value::as_f64);
                    if let Some(min) = loads.reduce(f64::min) {
                        out.push((format!("moe/layer{l}/min_load"), min as f32));
                    }
                }
            }
            _ => {
                if let Some(x) = num(v) {
                    let tag = match key.strip_prefix("val_") {
                        Some(rest) => format!("val/{rest}"),
                        None => format!("train/{key}"),
                    };
                    out.push((tag, x as f32));
                }
            }
        }
    }
    out
}

/// Appends events to one new event file; every record is written with one `write_all`
/// (no buffering), so a killed run keeps every event written before it died.
pub struct EventWriter {
    path: PathBuf,
    file: File,
    base_lr: OptimConfig,
}

fn unix_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The host name for the file name (letters, digits, `-` and `_` only).
pub(crate) fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

impl EventWriter {
    /// A new event file in `run_dir` (never an existing one: a resumed run adds a file, and
    /// TensorBoard reads a folder's files in name order, i.e. by time). `resume_after` is the
    /// checkpoint step a resumed run restarts from: a session-start event at the next step makes
    /// TensorBoard drop the old file's events past the checkpoint, as metrics.jsonl does.
    pub fn create(run_dir: &Path, base_lr: &OptimConfig, resume_after: Option<u64>) -> Result<EventWriter> {
        let now = unix_time();
        let stem = format!("events.out.tfevents.{}.{}", now as u64, host_name());
        let mut n = 0;
        let (path, file) = loop {
            let path = run_dir.join(if n == 0 { stem.clone() } else { format!("{stem}.{n}") });
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        };
        let mut w = EventWriter { path, file, base_lr: base_lr.clone() };
        w.write(&encode_event(now, 0, EventBody::FileVersion))?;
        if let Some(k) = resume_after {
            w.write(&encode_event(now, k as i64 + 1, EventBody::SessionStart))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file.write_all(&tfrecord(event)).with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// One event holding the scalars of a metrics record (nothing for a record without `step`).
    pub fn log(&mut self, record: &Value) -> Result<()> {
        let Some(step) = record["step"].as_u64() else { return Ok(()) };
        let values = scalars(record, &self.base_lr);
        if values.is_empty() {
            return Ok(());
        }
        self.write(&encode_event(unix_time(), step as i64, EventBody::Scalars(&values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, iSCSI).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_scalar_tags() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let rec = serde_json::json!({"step": 3, "loss": 2.5, "lr_mult": 0.5, "val_bpb": 1.25, "dsa_dense_warmup": true,
            "moe": [{"layer": 1, "max_mean": 1.5, "load": [0.5, 1.5]}]});
        let s = scalars(&rec, &OptimConfig::default());
        let get = |t: &str| s.iter().find(|(k, _)| k == t).map(|p| p.1);
        assert_eq!(get("train/loss"), Some(2.5));
        assert_eq!(get("lr/multiplier"), Some(0.5));
        assert_eq!(get("lr/matrix"), Some(0.5 * OptimConfig::default().matrix_lr));
        assert_eq!(get("val/bpb"), Some(1.25));
        assert_eq!(get("train/dsa_dense_warmup"), Some(1.0));
        assert_eq!(get("moe/layer1/max_mean"), Some(1.5));
        assert_eq!(get("moe/layer1/min_load"), Some(0.5));
        assert!(get("step").is_none() && get("train/step").is_none());
        let cuda =
            serde_json::json!({"step": 1, "peak_memory_mib": 9.5, "peak_memory_by_category": {"activations": 4.0}});
        let s = scalars(&cuda, &OptimConfig::default());
        assert_eq!(s, [("memory/peak_activations_mib".to_string(), 4.0), ("memory/peak_mib".to_string(), 9.5)]);
    }
}
