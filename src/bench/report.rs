//! The bench's output: the table (its head, one row per case, the skipped cases) and the
//! [`Reporter`], which receives each case as it finishes, compares it with the PyTorch baselines,
//! prints its row and appends its JSON line.

use super::{compare_one, record, BaselineCase, Case, Report, Row, RunFacts, Skipped};
use anyhow::Result;

/// The table's first lines: the run's facts and the column heads.
pub fn table_head(f: &RunFacts) -> String {
    let mut s = format!(
        "device: {}; --gemm {}; copy ceiling {}; bf16 GEMM ceiling {:.0} TFLOP/s ({})\n",
        f.device,
        f.gemm_engine,
        f.copy_gbps.map_or("n/a".into(), |g| format!("{g:.0} GB/s")),
        f.gemm_ceiling_tflops,
        f.gemm_ceiling_source
    );
    s += &format!(
        "{:<10} {:<31} {:<30} {:>9} {:>16} {:>8} {:>30} {:>7} {:>13}\n",
        "kind", "case", "shape", "ms", "rate", "ceiling", "torch", "ratio", "vs dense"
    );
    s
}

/// One row of the table (and a line per further matching baseline).
pub fn table_row(r: &Row) -> String {
    let c = &r.case;
    let rate = match (c.tflops, c.gbps) {
        (Some(t), _) => format!("{t:.1} TFLOP/s"),
        (None, Some(g)) => format!("{g:.0} GB/s"),
        _ => "-".into(),
    };
    let torch = match (&r.baseline, r.baseline_ms) {
        (Some(n), Some(ms)) => format!("{n} {ms:.3}"),
        _ => "-".into(),
    };
    // speedup over torch's dense attention (and, after the slash, the engine's own)
    let dense = match (r.speedup_vs_dense, r.speedup_vs_engine_dense) {
        (None, None) => "-".into(),
        (t, e) => {
            format!("{}/{}", t.map_or("-".into(), |x| format!("{x:.2}x")), e.map_or("-".into(), |x| format!("{x:.2}x")))
        }
    };
    let mut s = format!(
        "{:<10} {:<31} {:<30} {:>9.3} {:>16} {:>8} {:>30} {:>7} {:>13}{}\n",
        c.kind,
        c.name,
        format!("{:?}", c.shape),
        c.ms,
        rate,
        r.ceiling_fraction.map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
        torch,
        r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        dense,
        if c.finite { "" } else { "  NON-FINITE OUTPUT" },
    );
    // the other matching baselines, one line each
    for b in r.baselines.iter().skip(1) {
        let ratio = b.ratio.map_or("-".into(), |x| format!("{x:.2}x"));
        s += &format!("{:>100} {:>30} {:>7}\n", "also:", format!("{} {:.3}", b.name, b.ms), ratio);
    }
    s
}

/// The table line of a skipped case.
pub fn table_skipped(k: &Skipped) -> String {
    format!("{:<10} {:<31} {:<30} skipped: {}\n", k.kind, k.name, format!("{:?}", k.shape), k.skipped)
}

/// The report as a fixed-width table: the facts, every row, then the skipped cases.
pub fn table(report: &Report) -> String {
    let facts = RunFacts {
        device: report.device.clone(),
        gemm_engine: report.gemm_engine.clone(),
        copy_gbps: report.copy_gbps,
        gemm_ceiling_tflops: report.gemm_ceiling_tflops,
        gemm_ceiling_source: report.gemm_ceiling_source.clone(),
        quick: false,
        iters: 0,
        row_budget_s: 0.0,
        budget_s: 0.0,
    };
    let mut s = table_head(&facts);
    for r in &report.rows {
        s += &table_row(r);
    }
    for k in &report.skipped {
        s += &table_skipped(k);
    }
    s
}

/// Receives each case as it finishes: compares it with the baselines, prints its table row and
/// appends its JSON line (the run's facts line first, once the copy ceiling is known).
pub struct Reporter {
    facts: RunFacts,
    baseline: Vec<BaselineCase>,
    sink: Option<record::JsonLines>,
    head_written: bool,
    /// Print each table row to stdout as it finishes.
    print: bool,
    cases: Vec<Case>,
    rows: Vec<Row>,
    skipped: Vec<Skipped>,
}

impl Reporter {
    /// `sink`: where the JSON lines go (none: only the table).
    pub fn new(facts: RunFacts, baseline: Vec<BaselineCase>, sink: Option<record::JsonLines>, print: bool) -> Reporter {
        Reporter {
            facts,
            baseline,
            sink,
            head_written: false,
            print,
            cases: Vec::new(),
            rows: Vec::new(),
            skipped: Vec::new(),
        }
    }

    fn head(&mut self) -> Result<()> {
        if !self.head_written {
            self.head_written = true;
            if let Some(sink) = &mut self.sink {
                sink.write("run", &self.facts)?;
            }
            if self.print {
                print!("{}", table_head(&self.facts));
            }
        }
        Ok(())
    }

    /// A timed case: the copy case sets the copy ceiling of every later row.
    pub fn timed(&mut self, case: Case) -> Result<()> {
        if case.kind == "copy" && self.facts.copy_gbps.is_none() {
            self.facts.copy_gbps = case.gbps;
        }
        self.head()?;
        let row = compare_one(
            case.clone(),
            &self.cases,
            &self.baseline,
            self.facts.copy_gbps,
            self.facts.gemm_ceiling_tflops,
        );
        if let Some(sink) = &mut self.sink {
            sink.write("row", &row)?;
        }
        if self.print {
            print!("{}", table_row(&row));
            use std::io::Write as _;
            std::io::stdout().flush().ok();
        }
        self.cases.push(case);
        self.rows.push(row);
        Ok(())
    }

    /// Whether the run already has `spec`'s case at its shape, timed or skipped.
    pub fn has(&self, spec: &Case) -> bool {
        let same =
            |kind: &str, name: &str, shape: &[usize]| kind == spec.kind && name == spec.name && shape == spec.shape;
        self.cases.iter().any(|c| same(&c.kind, &c.name, &c.shape))
            || self.skipped.iter().any(|k| same(&k.kind, &k.name, &k.shape))
    }

    /// A case the budgets skipped.
    pub fn skipped(&mut self, spec: &Case, reason: &str) -> Result<()> {
        self.head()?;
        let k = Skipped {
            kind: spec.kind.clone(),
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            skipped: reason.into(),
        };
        if let Some(sink) = &mut self.sink {
            sink.write("row", &k)?;
        }
        if self.print {
            print!("{}", table_skipped(&k));
        }
        self.skipped.push(k);
        Ok(())
    }

    /// The report of everything received; with a sink, the summary line is its last line.
    pub fn finish(mut self, elapsed_s: f64) -> Result<Report> {
        self.head()?;
        let report = Report {
            device: self.facts.device,
            gemm_engine: self.facts.gemm_engine,
            copy_gbps: self.facts.copy_gbps,
            gemm_ceiling_tflops: self.facts.gemm_ceiling_tflops,
            gemm_ceiling_source: self.facts.gemm_ceiling_source,
            rows: self.rows,
            skipped: self.skipped,
        };
        if let Some(sink) = &mut self.sink {
            let summary = serde_json::json!({
                "rows": report.rows.len(),
                "skipped": report.skipped.len(),
                "non_finite": report.non_finite(),
                "elapsed_s": elapsed_s,
            });
            sink.write("summary", &summary)?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> RunFacts {
        RunFacts {
            device: "test".into(),
            gemm_engine: "native".into(),
            copy_gbps: None,
            gemm_ceiling_tflops: 8.0,
            gemm_ceiling_source: "test".into(),
            quick: true,
            iters: 2,
            row_budget_s: 20.0,
            budget_s: 200.0,
        }
    }

    #[test]
    fn each_case_is_a_json_line_as_it_finishes_and_the_summary_names_non_finite_rows() {
        let dir = std::env::temp_dir().join(format!("nanoseek-reporter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.jsonl");
        let sink = record::JsonLines::create(&path).unwrap();
        let mut rep = Reporter::new(facts(), Vec::new(), Some(sink), false);
        let lines = || -> Vec<serde_json::Value> {
            let text = std::fs::read_to_string(&path).unwrap();
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        // the copy case comes first and sets the copy ceiling of the facts line and later rows
        rep.timed(Case::spec("copy", "cuMemcpyDtoD", &[8], None, Some(8e6)).timed(1.0, 0)).unwrap();
        let so_far = lines();
        assert_eq!(so_far.len(), 2, "the facts and the copy row, written before the next case runs");
        assert_eq!((so_far[0]["type"].as_str(), so_far[0]["copy_gbps"].as_f64()), (Some("run"), Some(8.0)));
        assert_eq!((so_far[1]["type"].as_str(), so_far[1]["finite"].as_bool()), (Some("row"), Some(true)));
        rep.timed(Case::spec("rmsnorm", "rmsnorm fwd", &[4, 4], None, Some(2e6)).timed(1.0, 0)).unwrap();
        rep.timed(Case::spec("gemm", "gemm_nn_bf16", &[8, 8, 8], Some(8e9), None).timed(2.0, 3)).unwrap();
        let spec = Case::spec("dsa", "dsa fwd+bwd", &[1, 65536, 16, 128], Some(1.0), None);
        rep.skipped(&spec, record::OVER_TOTAL_BUDGET).unwrap();
        assert!(rep.has(&spec) && !rep.has(&Case::spec("dsa", "dsa fwd+bwd", &[1, 8, 16, 128], None, None)));
        let report = rep.finish(12.5).unwrap();
        let all = lines();
        assert_eq!(all.len(), 6);
        assert_eq!(all[2]["ceiling_fraction"].as_f64(), Some(0.25), "2 GB/s of the 8 GB/s copy ceiling");
        assert_eq!(all[3]["finite"].as_bool(), Some(false));
        assert_eq!((all[4]["skipped"].as_str(), all[4]["ms"].as_f64()), (Some("over total budget"), None));
        let summary = &all[5];
        assert_eq!(
            (summary["type"].as_str(), summary["rows"].as_u64(), summary["skipped"].as_u64()),
            (Some("summary"), Some(3), Some(1))
        );
        assert_eq!(summary["non_finite"][0].as_str(), Some("gemm gemm_nn_bf16 [8, 8, 8]"));
        assert_eq!(report.non_finite(), ["gemm gemm_nn_bf16 [8, 8, 8]"]);
        let t = table(&report);
        assert!(t.contains("NON-FINITE OUTPUT") && t.contains("skipped: over total budget"), "{t}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
