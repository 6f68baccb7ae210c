//! The bench's bookkeeping that needs no device: the time budgets (per row and in total) and
//! which cases they skip, the JSON-lines writer that appends and flushes one line per row as
//! it finishes (so a run killed by a timeout keeps every finished row), and the finiteness
//! check of every case's outputs.

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a case was not timed.
pub const OVER_ROW_BUDGET: &str = "over row budget";
pub const OVER_TOTAL_BUDGET: &str = "over total budget";
pub const SMALLER_SHAPE_OVER_ROW_BUDGET: &str = "over row budget (a smaller shape of this case was)";

/// The time budgets: a case whose one warm-up call takes longer than `row_s` is skipped, and so
/// are the later (larger) shapes of the same case; once `total_s` has passed since the start,
/// every remaining case is skipped. Times are passed in, so the rules are testable without a clock.
#[derive(Clone, Debug)]
pub struct Budget {
    pub row_s: f64,
    pub total_s: f64,
    /// (kind, name) of the cases that went over the row budget.
    over: BTreeSet<(String, String)>,
}

impl Budget {
    pub fn new(row_s: f64, total_s: f64) -> Result<Budget> {
        for (v, flag) in [(row_s, "--row-budget-s"), (total_s, "--budget-s")] {
            if !(v.is_finite() && v > 0.0) {
                anyhow::bail!("{flag} must be a positive number of seconds, not {v}");
            }
        }
        Ok(Budget { row_s, total_s, over: BTreeSet::new() })
    }

    /// Whether case (kind, name) may start `elapsed_s` seconds into the run; `Err(reason)` if not.
    pub fn admit(&self, kind: &str, name: &str, elapsed_s: f64) -> Result<(), &'static str> {
        if elapsed_s >= self.total_s {
            Err(OVER_TOTAL_BUDGET)
        } else if self.over.contains(&(kind.to_string(), name.to_string())) {
            Err(SMALLER_SHAPE_OVER_ROW_BUDGET)
        } else {
            Ok(())
        }
    }

    /// Records the warm-up call of (kind, name): `Err` (and the case's later shapes skipped) when
    /// it alone took longer than the row budget.
    pub fn warmed_up(&mut self, kind: &str, name: &str, warmup_s: f64) -> Result<(), &'static str> {
        if warmup_s > self.row_s {
            self.over.insert((kind.to_string(), name.to_string()));
            Err(OVER_ROW_BUDGET)
        } else {
            Ok(())
        }
    }

    /// Calls per timed batch so that 5 batches of calls lasting `once_s` each stay within the row
    /// budget: `iters`, or fewer (at least 1) for slow calls.
    pub fn iters_within(&self, iters: usize, once_s: f64) -> usize {
        let fit = (self.row_s / (5.0 * once_s.max(1e-9))).floor();
        if fit >= iters as f64 {
            iters.max(1)
        } else {
            (fit as usize).max(1)
        }
    }
}

/// Appends one JSON object per line to a file, flushing after each, so that whatever was
/// written survives the process being killed. The file is truncated when opened.
pub struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonLines {
    /// Opens `path` as `--output` names it: a regular file, absent, or a symlink to one (written
    /// through); a folder, device or FIFO is refused (`fsutil::output_target`).
    pub fn create(path: &Path) -> Result<JsonLines> {
        let target = crate::fsutil::output_target(path)?;
        let file = std::fs::File::create(&target).with_context(|| format!("creating {}", path.display()))?;
        Ok(JsonLines { path: path.to_path_buf(), file })
    }

    /// Writes `value` with a leading `"type": kind` field as one line, and flushes it.
    pub fn write<T: Serialize>(&mut self, kind: &str, value: &T) -> Result<()> {
        let mut obj = match serde_json::to_value(value)? {
            serde_json::Value::Object(m) => m,
            other => anyhow::bail!("a JSON-lines record must be an object, not {other}"),
        };
        let mut line = serde_json::Map::new();
        line.insert("type".into(), kind.into());
        line.append(&mut obj);
        let mut text = serde_json::to_string(&serde_json::Value::Object(line))?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A value type whose finiteness can be checked (the bench's outputs are bf16 or f32).
pub trait MaybeFinite: Copy {
    fn is_finite_value(self) -> bool;
}
impl MaybeFinite for f32 {
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
}
impl MaybeFinite for half::bf16 {
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
}

/// The number of NaN or infinite values in `values`.
pub fn count_non_finite<T: MaybeFinite>(values: &[T]) -> usize {
    values.iter().filter(|v| !v.is_finite_value()).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn a_slow_warmup_skips_the_case_and_its_larger_shapes_only() {
        let mut b = Budget::new(20.0, 200.0).unwrap();
        assert_eq!(b.admit("window", "wattn fwd+bwd", 0.0), Ok(()));
        assert_eq!(b.warmed_up("window", "wattn fwd+bwd", 5.0), Ok(()));
        assert_eq!(b.warmed_up("window", "wattn fwd+bwd", 25.0), Err(OVER_ROW_BUDGET));
        assert_eq!(b.admit("window", "wattn fwd+bwd", 30.0), Err(SMALLER_SHAPE_OVER_ROW_BUDGET));
        // another case, even of the same kind, still runs
        assert_eq!(b.admit("window", "other", 30.0), Ok(()));
        assert_eq!(b.admit("attention", "attn fwd+bwd", 30.0), Ok(()));
    }

    #[test]
    fn once_the_total_budget_is_spent_everything_is_skipped() {
        let b = Budget::new(20.0, 200.0).unwrap();
        assert_eq!(b.admit("gemm", "gemm_nn_bf16", 199.9), Ok(()));
        assert_eq!(b.admit("gemm", "gemm_nn_bf16", 200.0), Err(OVER_TOTAL_BUDGET));
        assert_eq!(b.admit("copy", "cuMemcpyDtoD", 1e9), Err(OVER_TOTAL_BUDGET));
    }

    #[test]
    fn batches_shrink_for_slow_calls() {
        let b = Budget::new(20.0, 200.0).unwrap();
        assert_eq!(b.iters_within(20, 1e-3), 20);
        assert_eq!(b.iters_within(20, 0.5), 8); // 5 batches x 8 x 0.5 s = the 20 s budget
        assert_eq!(b.iters_within(20, 30.0), 1);
        assert_eq!(b.iters_within(0, 1e-3), 1);
    }

    #[test]
    fn budgets_must_be_positive() {
        for (row, total) in [(0.0, 1.0), (1.0, -1.0), (f64::NAN, 1.0), (1.0, f64::INFINITY)] {
            let e = Budget::new(row, total).unwrap_err().to_string();
            assert!(e.contains("must be a positive number"), "{e}");
        }
    }

    #[test]
    fn json_lines_are_flushed_one_object_per_line() {
        let dir = std::env::temp_dir().join(format!("nanoseek-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bench.jsonl");
        let mut w = JsonLines::create(&p).unwrap();
        #[derive(Serialize)]
        struct R {
            name: &'static str,
            ms: f64,
        }
        w.write("run", &serde_json::json!({"device": "x"})).unwrap();
        w.write("row", &R { name: "a", ms: 1.5 }).unwrap();
        // readable before the writer is dropped: each line is flushed as written
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "run");
        assert_eq!(
            (lines[1]["type"].as_str(), lines[1]["name"].as_str(), lines[1]["ms"].as_f64()),
            (Some("row"), Some("a"), Some(1.5))
        );
        assert!(w.write("row", &[1, 2]).is_err(), "a non-object record");
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_values_are_counted() {
        assert_eq!(count_non_finite(&[1.0f32, -2.0, 0.0]), 0);
        assert_eq!(count_non_finite(&[1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]), 3);
        let h = [bf16::from_f32(1.0), bf16::NAN, bf16::INFINITY, bf16::from_f32(-3e38)];
        assert_eq!(count_non_finite(&h), 2);
        assert_eq!(count_non_finite::<f32>(&[]), 0);
    }
}
