//! `nanoseek bench`: the CUDA kernel suite, timed on the device and compared in the same
//! run with PyTorch (`scripts/torch_baselines.py` writes the baseline JSON; `scripts/gpu-check.sh
//! run` runs both) and with the machine's ceilings.
//!
//! Every case runs the engine's kernel at the shapes `torch_baselines.py` uses, so the two sides
//! do the same work; the ratio is taken between achieved rates (TFLOP/s or GB/s), which stays
//! meaningful when the engine's kernel does a little more (RoPE rotates q and k in one pass).
//! Every GEMM case runs twice, on the handwritten kernel and on cuBLASLt (when its library
//! loads), beside torch.matmul. The sparse cases mirror `sparse_baselines`: window + global
//! attention (vs flex_attention), dense attention at the same lengths (vs SDPA), the MoE layer
//! (vs a PyTorch loop over experts, torch._grouped_mm and a dense FFN of the same active FLOPs;
//! every matching baseline is listed, the fastest is the ratio). DSA (indexer top-k, sparse
//! attention forward + backward, indexer KL) does different work from dense attention, so its
//! rates are not compared: `speedup_vs_dense` is SDPA's time at the same [b, t, h, d] over DSA's
//! (and `speedup_vs_engine_dense` the same against the engine's own dense attention, timed at
//! every DSA length).
//! Timing: 3 warm-up calls, then `iters` calls queued back to back between two device
//! synchronizations, repeated 5 times; the median per-call time is reported (launch overhead is
//! hidden behind the queued work, as with PyTorch's CUDA events). The long sparse cases take one
//! warm-up call and as many calls per batch as fit in about 100 ms (at least 1, at most `iters`),
//! which keeps the whole suite near a minute on an H200.
//!
//! Ceilings: the copy bandwidth is measured in the same run (`cuMemcpyDtoD` of 256 MiB, bytes
//! read + written); the bf16 GEMM ceiling is cuBLAS's rate at 4096³ from the baseline file when
//! present, else [`GEMM_CEILING_TFLOPS`] (measured on the project's H200).
//!
//! Budgets and output: every case is written as soon as it finishes (a table row on stdout and,
//! with `--output`, one JSON line appended and flushed), so a run killed by a timeout keeps every
//! finished row. A case whose single warm-up call takes longer than `--row-budget-s` is recorded
//! as skipped (`"skipped": "over row budget"`), and so are the later, larger shapes of the same
//! case; once `--budget-s` has passed, every remaining case is recorded as skipped and the command
//! still exits 0. Slow calls get fewer calls per batch, so a row stays near its budget. Every
//! output every case wrote is copied back and checked: a NaN or infinity makes the row
//! `"finite": false` and the command exit non-zero once the suite is done.
//!
//! JSON lines (`--output`): first `{"type": "run", ...}` with the run's facts (device, copy
//! ceiling, GEMM engine and ceiling, budgets), then one `{"type": "row", ...}` per case (a [`Row`],
//! or kind / name / shape / `skipped` for a skipped case), last `{"type": "summary", ...}`.
//! The CPU kernels have criterion benches instead (`cargo bench`).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;

pub use record::{Budget, JsonLines};

/// bf16 GEMM through cuBLAS on the H200 the project measures on (../shared/docs/ENGINEERING.md).
pub const GEMM_CEILING_TFLOPS: f64 = 790.0;

/// Default `--row-budget-s` and `--budget-s`.
pub const ROW_BUDGET_S: f64 = 20.0;
pub const TOTAL_BUDGET_S: f64 = 200.0;

pub struct BenchOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Fewer and smaller cases (the same subset as `torch_baselines.py --quick`).
    pub quick: bool,
    /// `torch_baselines.py`'s JSON, for the ratio column.
    pub baseline: Option<PathBuf>,
    /// Calls per timed batch.
    pub iters: usize,
    /// The engine set for the engine's GEMM calls (`--gemm`); the GEMM cases time both.
    pub gemm: crate::kernels::launch::gemm::GemmEngine,
    /// Seconds a case's warm-up call may take before the case is skipped (`--row-budget-s`).
    pub row_budget_s: f64,
    /// Seconds after which every remaining case is skipped (`--budget-s`).
    pub budget_s: f64,
    /// Append each row here as a JSON line as it finishes (`--output`).
    pub output: Option<PathBuf>,
}

/// The engine's dense attention case that DSA is timed against in the same run.
const DENSE_ATTN: (&str, &str) = ("attention", "attn fwd+bwd");

/// One timed case of the engine.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Case {
    /// Kernel family (gemm, copy, attention, rope, rmsnorm, elementwise, loss, window, dsa, moe).
    pub kind: String,
    pub name: String,
    pub shape: Vec<usize>,
    /// Median milliseconds per call.
    pub ms: f64,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
    /// PyTorch case names this one is compared with (the fastest present is the baseline).
    #[serde(skip)]
    pub baseline_names: Vec<&'static str>,
    /// The baselines' kind when it is not `kind` (DSA is compared with dense attention).
    #[serde(skip)]
    pub baseline_kind: Option<&'static str>,
    /// Compared by time, not rate (the two sides do different work): fills `speedup_vs_dense`.
    #[serde(skip)]
    pub by_time: bool,
    /// Every output of the case was finite (no NaN, no infinity) after it was timed.
    pub finite: bool,
    /// The work per call, for the rates once the case is timed.
    #[serde(skip)]
    flops: Option<f64>,
    #[serde(skip)]
    bytes: Option<f64>,
}

impl Case {
    #[cfg(test)]
    fn new(kind: &str, name: &str, shape: &[usize], ms: f64, flops: Option<f64>, bytes: Option<f64>) -> Case {
        Case::spec(kind, name, shape, flops, bytes).timed(ms, 0)
    }
    /// A case not yet timed: what it is and its work per call.
    fn spec(kind: &str, name: &str, shape: &[usize], flops: Option<f64>, bytes: Option<f64>) -> Case {
        Case {
            kind: kind.into(),
            name: name.into(),
            shape: shape.to_vec(),
            ms: f64::NAN,
            tflops: None,
            gbps: None,
            baseline_names: Vec::new(),
            baseline_kind: None,
            by_time: false,
            finite: true,
            flops,
            bytes,
        }
    }
    /// The case timed at `ms` per call, with `non_finite` NaN or infinite output values.
    fn timed(mut self, ms: f64, non_finite: usize) -> Case {
        self.ms = ms;
        self.tflops = self.flops.map(|f| f / ms / 1e9);
        self.gbps = self.bytes.map(|b| b / ms / 1e6);
        self.finite = non_finite == 0;
        self
    }
    fn vs(mut self, names: &[&'static str]) -> Case {
        self.baseline_names = names.to_vec();
        self
    }
    /// Compared by time with the dense baselines `names` of kind `kind` (see `by_time`).
    fn vs_dense(mut self, kind: &'static str, names: &[&'static str]) -> Case {
        self.baseline_names = names.to_vec();
        self.baseline_kind = Some(kind);
        self.by_time = true;
        self
    }
    fn rate(&self) -> f64 {
        self.tflops.or(self.gbps).unwrap_or(0.0)
    }
}

/// One line of the report: the engine's case beside its ceiling and the PyTorch baseline.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    #[serde(flatten)]
    pub case: Case,
    /// Achieved rate over the ceiling (GEMM and attention: bf16 GEMM ceiling; others: copy).
    pub ceiling_fraction: Option<f64>,
    /// The PyTorch case compared with, its milliseconds and rate.
    pub baseline: Option<String>,
    pub baseline_ms: Option<f64>,
    pub baseline_rate: Option<f64>,
    /// Engine rate / PyTorch rate (> 1: the engine is faster); none for by-time cases.
    pub ratio: Option<f64>,
    /// Every matching baseline, the best first (the one above).
    pub baselines: Vec<BaselineRef>,
    /// By-time cases (DSA): the dense baseline's milliseconds / the engine's (> 1: DSA is faster).
    pub speedup_vs_dense: Option<f64>,
    /// By-time cases: the engine's own dense attention at the same shape in this run, ms / ms.
    pub speedup_vs_engine_dense: Option<f64>,
}

/// A baseline a case was compared with.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BaselineRef {
    pub name: String,
    pub ms: f64,
    /// > 1: the engine is faster (rate ratio; time ratio for by-time cases).
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    /// The engine of the engine's GEMM calls (`--gemm`); the GEMM cases ran on both.
    pub gemm_engine: String,
    pub copy_gbps: Option<f64>,
    pub gemm_ceiling_tflops: f64,
    pub gemm_ceiling_source: String,
    pub rows: Vec<Row>,
    /// The cases the budgets skipped, in run order.
    pub skipped: Vec<Skipped>,
}

impl Report {
    /// "kind name shape" of every row with a NaN or infinite output.
    pub fn non_finite(&self) -> Vec<String> {
        self.rows.iter().filter(|r| !r.case.finite).map(|r| label(&r.case)).collect()
    }
}

fn label(c: &Case) -> String {
    format!("{} {} {:?}", c.kind, c.name, c.shape)
}

/// A case the budgets skipped.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Skipped {
    pub kind: String,
    pub name: String,
    pub shape: Vec<usize>,
    /// Why: "over row budget", "over row budget (a smaller shape of this case was)" or
    /// "over total budget".
    pub skipped: String,
}

/// The first JSON line: the run's facts.
#[derive(Clone, Debug, Serialize)]
pub struct RunFacts {
    pub device: String,
    pub gemm_engine: String,
    pub copy_gbps: Option<f64>,
    pub gemm_ceiling_tflops: f64,
    pub gemm_ceiling_source: String,
    pub quick: bool,
    pub iters: usize,
    pub row_budget_s: f64,
    pub budget_s: f64,
}

/// A case of `torch_baselines.py`'s JSON.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct BaselineCase {
    pub kind: String,
    pub name: String,
    pub shape: Vec<usize>,
    pub ms: f64,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
}

/// Reads the `cases` of a baseline file, naming the file in every error.
pub fn read_baseline(path: &std::path::Path) -> Result<Vec<BaselineCase>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the baseline {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let cases = v.get("cases").cloned().with_context(|| format!("{} has no \"cases\" list", path.display()))?;
    serde_json::from_value(cases).with_context(|| format!("{}: malformed cases", path.display()))
}

/// Pairs each case with its ceiling and the matching baselines: [`compare_one`] per case, with
/// the cases before it as the run's earlier cases.
pub fn compare(cases: Vec<Case>, baseline: &[BaselineCase], copy_gbps: Option<f64>, gemm_ceiling: f64) -> Vec<Row> {
    let mut done: Vec<Case> = Vec::new();
    let mut rows = Vec::new();
    for case in cases {
        rows.push(compare_one(case.clone(), &done, baseline, copy_gbps, gemm_ceiling));
        done.push(case);
    }
    rows
}

/// Pairs a case with its ceiling and the matching baselines (kind `baseline_kind` or the case's
/// own, same shape, name among `baseline_names`): rate cases take the fastest rate as the ratio,
/// by-time cases the shortest time as `speedup_vs_dense` (plus the engine's own dense attention at
/// the same shape, when one of the run's `earlier` cases has it).
pub fn compare_one(
    case: Case,
    earlier: &[Case],
    baseline: &[BaselineCase],
    copy_gbps: Option<f64>,
    gemm_ceiling: f64,
) -> Row {
    let ceiling_fraction = match (case.tflops, case.gbps) {
        (Some(t), _) => Some(t / gemm_ceiling),
        (None, Some(g)) => copy_gbps.map(|c| g / c),
        _ => None,
    };
    let kind = case.baseline_kind.unwrap_or(&case.kind);
    let mut matching: Vec<(&BaselineCase, Option<f64>)> = baseline
        .iter()
        .filter(|b| b.kind == kind && b.shape == case.shape && case.baseline_names.contains(&b.name.as_str()))
        .map(|b| {
            let ratio = if case.by_time { Some(b.ms / case.ms) } else { b.tflops.or(b.gbps).map(|r| case.rate() / r) };
            (b, ratio)
        })
        .filter(|(_, r)| r.is_some())
        .collect();
    // best first: the smallest ratio is the fastest baseline, by rate or by time
    matching.sort_by(|x, y| x.1.unwrap().total_cmp(&y.1.unwrap()));
    let baselines: Vec<BaselineRef> =
        matching.iter().map(|(b, r)| BaselineRef { name: b.name.clone(), ms: b.ms, ratio: *r }).collect();
    let best = matching.first();
    let (baseline, baseline_ms) = (best.map(|(b, _)| b.name.clone()), best.map(|(b, _)| b.ms));
    let baseline_rate = best.and_then(|(b, _)| b.tflops.or(b.gbps));
    let (ratio, speedup_vs_dense) = match best {
        Some((_, r)) if case.by_time => (None, *r),
        Some((_, r)) => (*r, None),
        None => (None, None),
    };
    let speedup_vs_engine_dense = if case.by_time {
        earlier
            .iter()
            .find(|c| (c.kind.as_str(), c.name.as_str()) == DENSE_ATTN && c.shape == case.shape)
            .map(|c| c.ms / case.ms)
    } else {
        None
    };
    Row {
        case,
        ceiling_fraction,
        baseline,
        baseline_ms,
        baseline_rate,
        ratio,
        baselines,
        speedup_vs_dense,
        speedup_vs_engine_dense,
    }
}

/// Runs the suite on CUDA device `opts.ordinal`, reporting each case as it finishes (see the
/// module doc), and returns the whole report.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    let baseline = match &opts.baseline {
        Some(p) => read_baseline(p)?,
        None => Vec::new(),
    };
    if opts.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let budget = record::Budget::new(opts.row_budget_s, opts.budget_s)?;
    let be = crate::kernels::launch::CudaBackend::new(opts.ordinal).map_err(|e| {
        anyhow::anyhow!(
            "nanoseek bench times the CUDA kernels and needs a CUDA device: {e} (the CPU kernels have criterion benches: cargo bench)"
        )
    })?;
    let torch_gemm = baseline
        .iter()
        .find(|b| b.kind == "gemm" && b.shape == [4096, 4096, 4096] && b.name == "torch.matmul")
        .and_then(|b| b.tflops);
    let (gemm_ceiling, source) = match torch_gemm {
        Some(t) => (t, "torch.matmul at 4096³ in this run".to_string()),
        None => (GEMM_CEILING_TFLOPS, "cuBLAS on the project's H200, not measured in this run".to_string()),
    };
    let facts = RunFacts {
        device: format!("{} (cc {}.{})", be.name(), be.compute_capability().0, be.compute_capability().1),
        gemm_engine: opts.gemm.name().into(),
        copy_gbps: None,
        gemm_ceiling_tflops: gemm_ceiling,
        gemm_ceiling_source: source,
        quick: opts.quick,
        iters: opts.iters,
        row_budget_s: opts.row_budget_s,
        budget_s: opts.budget_s,
    };
    let sink = opts.output.as_deref().map(record::JsonLines::create).transpose()?;
    let mut reporter = Reporter::new(facts, baseline, sink, true);
    let start = std::time::Instant::now();
    let mut runner = runner::Runner::new(&be, opts.iters, budget, &mut reporter);
    cases::all(&mut runner, opts)?;
    reporter.finish(start.elapsed().as_secs_f64())
}

mod cases;
pub mod record;
mod report;
mod runner;

pub use report::{table, table_head, table_row, table_skipped, Reporter};

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: &str, name: &str, shape: &[usize], ms: f64, tflops: Option<f64>, gbps: Option<f64>) -> BaselineCase {
        BaselineCase { kind: kind.into(), name: name.into(), shape: shape.to_vec(), ms, tflops, gbps }
    }

    #[test]
    fn compare_takes_the_fastest_matching_baseline_and_rate_ratios() {
        let cases = vec![
            Case::new("gemm", "gemm_nn_bf16", &[8, 8, 8], 2.0, Some(8e9), None).vs(&["torch.matmul"]),
            Case::new("rope", "rope q+k", &[1, 2], 1.0, None, Some(2e6)).vs(&["rope eager", "rope compiled"]),
            Case::new("rmsnorm", "rmsnorm fwd", &[4, 4], 1.0, None, Some(1e6)).vs(&["rmsnorm eager"]),
        ];
        let baseline = vec![
            base("gemm", "torch.matmul", &[8, 8, 8], 1.0, Some(8.0), None),
            base("gemm", "torch.matmul", &[9, 9, 9], 1.0, Some(100.0), None),
            base("rope", "rope eager", &[1, 2], 1.0, None, Some(1.0)),
            base("rope", "rope compiled", &[1, 2], 0.5, None, Some(4.0)),
        ];
        let rows = compare(cases, &baseline, Some(4.0), 8.0);
        // gemm: 8e9 flop in 2 ms = 4 TFLOP/s; torch 8 TFLOP/s at the same shape -> 0.5x, 50% of 8.
        assert_eq!(rows[0].case.tflops, Some(4.0));
        assert_eq!(rows[0].ratio, Some(0.5));
        assert_eq!(rows[0].ceiling_fraction, Some(0.5));
        // rope: 2 GB/s vs the faster (compiled, 4 GB/s) baseline; copy ceiling 4 GB/s.
        assert_eq!(rows[1].baseline.as_deref(), Some("rope compiled"));
        assert_eq!(rows[1].ratio, Some(0.5));
        assert_eq!(rows[1].ceiling_fraction, Some(0.5));
        // no baseline with that shape: no ratio, still a ceiling fraction
        assert_eq!((rows[2].ratio, rows[2].ceiling_fraction), (None, Some(0.25)));
        let t = table(&Report {
            device: "test".into(),
            gemm_engine: "native".into(),
            copy_gbps: Some(4.0),
            gemm_ceiling_tflops: 8.0,
            gemm_ceiling_source: "test".into(),
            rows,
            skipped: Vec::new(),
        });
        assert!(t.contains("0.50x") && t.contains("rope compiled 0.500"), "{t}");
    }

    #[test]
    fn moe_lists_every_baseline_and_dsa_compares_by_time() {
        let cases = vec![
            Case::new("moe", "moe fwd+bwd", &[4, 8], 2.0, Some(8e9), None).vs(&["loop", "grouped", "dense"]),
            Case::new("attention", "attn fwd+bwd", &[1, 64, 2, 8], 8.0, Some(8e9), None).vs(&["sdpa fwd+bwd"]),
            Case::new("dsa", "dsa fwd+bwd", &[1, 64, 2, 8], 2.0, Some(2e9), None)
                .vs_dense("attention", &["sdpa fwd+bwd"]),
            Case::new("dsa", "dsa fwd+bwd", &[1, 128, 2, 8], 2.0, Some(2e9), None)
                .vs_dense("attention", &["sdpa fwd+bwd"]),
        ];
        let baseline = vec![
            base("moe", "loop", &[4, 8], 8.0, Some(1.0), None),
            base("moe", "dense", &[4, 8], 1.0, Some(8.0), None),
            base("moe", "grouped", &[4, 8], 2.0, Some(4.0), None),
            base("moe", "other", &[4, 8], 0.1, Some(80.0), None),
            base("attention", "sdpa fwd+bwd", &[1, 64, 2, 8], 4.0, Some(2.0), None),
        ];
        let rows = compare(cases, &baseline, None, 8.0);
        // moe: 4 TFLOP/s; the fastest named baseline (dense, 8) is the ratio; all three listed, best first
        assert_eq!((rows[0].baseline.as_deref(), rows[0].ratio), (Some("dense"), Some(0.5)));
        let listed: Vec<(&str, Option<f64>)> = rows[0].baselines.iter().map(|b| (b.name.as_str(), b.ratio)).collect();
        assert_eq!(listed, [("dense", Some(0.5)), ("grouped", Some(1.0)), ("loop", Some(4.0))]);
        assert_eq!(rows[0].speedup_vs_dense, None);
        // dsa: by time against sdpa (4 ms / 2 ms) and the engine's dense case (8 ms / 2 ms); no rate ratio
        assert_eq!(rows[2].ratio, None);
        assert_eq!(rows[2].baseline.as_deref(), Some("sdpa fwd+bwd"));
        assert_eq!((rows[2].speedup_vs_dense, rows[2].speedup_vs_engine_dense), (Some(2.0), Some(4.0)));
        // a dense case is not compared with itself by time; a length without dense cases has neither
        assert_eq!((rows[1].speedup_vs_engine_dense, rows[1].ratio), (None, Some(0.5)));
        assert_eq!((rows[3].speedup_vs_dense, rows[3].speedup_vs_engine_dense), (None, None));
        let t = table(&Report {
            device: "test".into(),
            gemm_engine: "cublaslt".into(),
            copy_gbps: None,
            gemm_ceiling_tflops: 8.0,
            gemm_ceiling_source: "test".into(),
            rows,
            skipped: Vec::new(),
        });
        assert!(t.contains("--gemm cublaslt"), "{t}");
        assert!(t.contains("grouped 2.000") && t.contains("loop 8.000") && t.contains("4.00x"), "{t}");
        assert!(t.contains("2.00x/4.00x"), "{t}");
        assert_eq!(t.matches("also:").count(), 2, "{t}");
    }

    #[test]
    fn visible_entries_match_torch_baselines_counts() {
        use super::cases::{visible_capped, visible_window};
        // causal: t(t+1)/2; capped at k keys per query
        assert_eq!(visible_capped(5, 5), 15);
        assert_eq!(visible_capped(5, 2), 1 + 2 + 2 + 2 + 2);
        // window 2, 1 global key: query i sees min(i+1, 2) keys, plus key 0 once it left the window
        assert_eq!(visible_window(5, 2, 1), 1 + 2 + 3 + 3 + 3);
        // a window as long as the sequence is dense causal attention
        assert_eq!(visible_window(7, 7, 3), visible_capped(7, 7));
    }

    #[test]
    fn baseline_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("nanoseek-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.json");
        std::fs::write(&p, "{\"device\": \"x\"}").unwrap();
        let e = format!("{:#}", read_baseline(&p).unwrap_err());
        assert!(e.contains("b.json") && e.contains("cases"), "{e}");
        std::fs::write(&p, "{\"cases\": [{\"kind\": \"gemm\", \"name\": \"m\", \"shape\": [1], \"ms\": 1.0}]}")
            .unwrap();
        assert_eq!(read_baseline(&p).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
