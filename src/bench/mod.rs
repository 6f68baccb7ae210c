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
//! The CPU kernels have criterion benches instead (`cargo bench`).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;

/// bf16 GEMM through cuBLAS on the H200 the project measures on (../shared/docs/ENGINEERING.md).
pub const GEMM_CEILING_TFLOPS: f64 = 790.0;

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
    pub gemm: crate::backend::cuda::gemm::GemmEngine,
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
}

impl Case {
    fn new(kind: &str, name: &str, shape: &[usize], ms: f64, flops: Option<f64>, bytes: Option<f64>) -> Case {
        Case {
            kind: kind.into(),
            name: name.into(),
            shape: shape.to_vec(),
            ms,
            tflops: flops.map(|f| f / ms / 1e9),
            gbps: bytes.map(|b| b / ms / 1e6),
            baseline_names: Vec::new(),
            baseline_kind: None,
            by_time: false,
        }
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

/// Pairs each case with its ceiling and the matching baselines (kind `baseline_kind` or the case's
/// own, same shape, name among `baseline_names`): rate cases take the fastest rate as the ratio,
/// by-time cases the shortest time as `speedup_vs_dense` (plus the engine's own dense attention at
/// the same shape, when the run has it).
pub fn compare(cases: Vec<Case>, baseline: &[BaselineCase], copy_gbps: Option<f64>, gemm_ceiling: f64) -> Vec<Row> {
    let engine_dense: Vec<(Vec<usize>, f64)> = cases
        .iter()
        .filter(|c| (c.kind.as_str(), c.name.as_str()) == DENSE_ATTN)
        .map(|c| (c.shape.clone(), c.ms))
        .collect();
    cases
        .into_iter()
        .map(|case| {
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
                    let ratio =
                        if case.by_time { Some(b.ms / case.ms) } else { b.tflops.or(b.gbps).map(|r| case.rate() / r) };
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
                engine_dense.iter().find(|(shape, _)| *shape == case.shape).map(|(_, ms)| ms / case.ms)
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
        })
        .collect()
}

/// The report as a fixed-width table.
pub fn table(report: &Report) -> String {
    let mut s = format!(
        "device: {}; --gemm {}; copy ceiling {}; bf16 GEMM ceiling {:.0} TFLOP/s ({})\n",
        report.device,
        report.gemm_engine,
        report.copy_gbps.map_or("n/a".into(), |g| format!("{g:.0} GB/s")),
        report.gemm_ceiling_tflops,
        report.gemm_ceiling_source
    );
    s += &format!(
        "{:<10} {:<31} {:<30} {:>9} {:>16} {:>8} {:>30} {:>7} {:>13}\n",
        "kind", "case", "shape", "ms", "rate", "ceiling", "torch", "ratio", "vs dense"
    );
    for r in &report.rows {
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
            (t, e) => format!(
                "{}/{}",
                t.map_or("-".into(), |x| format!("{x:.2}x")),
                e.map_or("-".into(), |x| format!("{x:.2}x"))
            ),
        };
        s += &format!(
            "{:<10} {:<31} {:<30} {:>9.3} {:>16} {:>8} {:>30} {:>7} {:>13}\n",
            c.kind,
            c.name,
            format!("{:?}", c.shape),
            c.ms,
            rate,
            r.ceiling_fraction.map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
            torch,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            dense,
        );
        // the other matching baselines, one line each
        for b in r.baselines.iter().skip(1) {
            let ratio = b.ratio.map_or("-".into(), |x| format!("{x:.2}x"));
            s += &format!("{:>100} {:>30} {:>7}\n", "also:", format!("{} {:.3}", b.name, b.ms), ratio);
        }
    }
    s
}

/// Runs the suite on CUDA device `opts.ordinal` and compares it with the baseline file.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    let baseline = match &opts.baseline {
        Some(p) => read_baseline(p)?,
        None => Vec::new(),
    };
    let be = crate::backend::cuda::CudaBackend::new(opts.ordinal).map_err(|e| {
        anyhow::anyhow!(
            "nanoseek bench times the CUDA kernels and needs a CUDA device: {e} (the CPU kernels have criterion benches: cargo bench)"
        )
    })?;
    if opts.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let (cases, copy_gbps) = cuda_cases::all(&be, opts)?;
    let torch_gemm = baseline
        .iter()
        .find(|b| b.kind == "gemm" && b.shape == [4096, 4096, 4096] && b.name == "torch.matmul")
        .and_then(|b| b.tflops);
    let (gemm_ceiling, source) = match torch_gemm {
        Some(t) => (t, "torch.matmul at 4096³ in this run".to_string()),
        None => (GEMM_CEILING_TFLOPS, "cuBLAS on the project's H200, not measured in this run".to_string()),
    };
    let rows = compare(cases, &baseline, copy_gbps, gemm_ceiling);
    Ok(Report {
        device: format!("{} (cc {}.{})", be.name(), be.compute_capability().0, be.compute_capability().1),
        gemm_engine: opts.gemm.name().into(),
        copy_gbps,
        gemm_ceiling_tflops: gemm_ceiling,
        gemm_ceiling_source: source,
        rows,
    })
}

mod cuda_cases {
    //! The timed cases (shapes mirror `scripts/torch_baselines.py`).
    use super::{BenchOptions, Case};
    use crate::backend::cpu::attention::AttnDims;
    use crate::backend::cpu::dsa::DsaDims;
    use crate::backend::cpu::moe::{RouterConfig, ScoreFunc};
    use crate::backend::cpu::window_attention::WindowDims;
    use crate::backend::cuda::{
        attention, cublaslt, dsa, elementwise, gemm, loss, moe, norm, optim, rope, window_attention, CudaBackend,
        CudaError, CudaResult, DeviceBuffer,
    };
    use anyhow::Result;
    use half::bf16;
    use std::time::Instant;

    /// Median milliseconds per call of `f` (see the module doc).
    fn time(be: &CudaBackend, iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        be.synchronize()?;
        time_batches(be, iters, f)
    }

    /// The median over 5 batches of `iters` queued calls, per call (the caller warmed up).
    fn time_batches(be: &CudaBackend, iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> Result<f64> {
        let mut per_call = Vec::with_capacity(5);
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            be.synchronize()?;
            per_call.push(t0.elapsed().as_secs_f64() * 1e3 / iters as f64);
        }
        per_call.sort_by(f64::total_cmp);
        Ok(per_call[per_call.len() / 2])
    }

    /// Median milliseconds per call of a long `f`: one warm-up call, then as many calls per batch
    /// as fit in about 100 ms (at least 1, at most `max_iters`), 5 batches.
    fn time_long(be: &CudaBackend, max_iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> Result<f64> {
        f()?;
        be.synchronize()?;
        let t0 = Instant::now();
        f()?;
        be.synchronize()?;
        let once = t0.elapsed().as_secs_f64() * 1e3;
        let iters = ((100.0 / once.max(1e-3)) as usize).clamp(1, max_iters.max(1));
        time_batches(be, iters, f)
    }

    /// Device bf16 values uniform in [-1, 1) (a cheap xorshift; the values do not matter).
    fn random_bf16(be: &CudaBackend, n: usize, seed: u64) -> CudaResult<DeviceBuffer<bf16>> {
        random_bf16_scaled(be, n, seed, 1.0)
    }

    /// Device bf16 values uniform in [-scale, scale).
    fn random_bf16_scaled(be: &CudaBackend, n: usize, seed: u64, scale: f32) -> CudaResult<DeviceBuffer<bf16>> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let host: Vec<bf16> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32(scale * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0))
            })
            .collect();
        DeviceBuffer::from_host(be, &host)
    }

    /// The fused GEMM epilogues at the `small` model's feed-forward shapes (x·wᵀ, tokens × out ×
    /// in): the residual add after w_down and SwiGLU after w_up (the up product kept, as in
    /// training), and SwiGLU's backward after dY·w_down, on every engine, beside the unfused product + element-wise kernel on the native
    /// one (cuBLASLt's rows are that composition: it has no SwiGLU epilogue). Rates count the
    /// GEMM's FLOPs on both sides, as PyTorch's rows do.
    fn epilogue_cases(be: &CudaBackend, it: usize, lt: bool, cases: &mut Vec<Case>) -> Result<()> {
        use crate::backend::cuda::gemm::{gemm_fused_on, gemm_swiglu_backward_on, Epilogue, GemmEngine};
        use crate::backend::cuda::swiglu;
        let (nn_, t_) = (gemm::Layout::N, gemm::Layout::T);
        let (m, f, c) = (16384, 3072, 768);
        let mut engines = vec![GemmEngine::Native];
        if lt {
            engines.push(GemmEngine::Cublaslt);
        }
        if be.compute_capability() == (9, 0) {
            engines.push(GemmEngine::Wgmma);
        }
        // residual: out[m, c] = r + a[m, f]·w_down[c, f]ᵀ
        let (a, w, r) = (random_bf16(be, m * f, 11)?, random_bf16(be, c * f, 12)?, random_bf16(be, m * c, 13)?);
        let out = DeviceBuffer::<bf16>::zeros(be, m * c)?;
        let (shape, flops) = ([m, c, f], 2.0 * (m * c * f) as f64);
        for &e in &engines {
            let epi = Epilogue::Residual { resid: &r, out: &out };
            let ms = time(be, it, || gemm_fused_on(be, e, m, c, f, &a, &w, epi))?;
            let name = format!("linear+residual {}", e.name());
            cases.push(Case::new("gemm", &name, &shape, ms, Some(flops), None).vs(&["torch addmm residual"]));
        }
        let y = DeviceBuffer::<bf16>::zeros(be, m * c)?;
        let ms = time(be, it, || {
            gemm::native_gemm_batched(be, 1, m, c, f, &a, nn_, &w, t_, &y, 1.0, 0.0)?;
            elementwise::add(be, &r, &y, &out)
        })?;
        let case = Case::new("gemm", "linear+residual native unfused", &shape, ms, Some(flops), None);
        cases.push(case.vs(&["torch addmm residual"]));
        drop((a, w, r, out, y));

        // SwiGLU: act[m, f] = silu(g) ⊙ up, up = h[m, c]·w_up[f, c]ᵀ
        let (h, w, g) = (random_bf16(be, m * c, 14)?, random_bf16(be, f * c, 15)?, random_bf16(be, m * f, 16)?);
        let (up, act) = (DeviceBuffer::<bf16>::zeros(be, m * f)?, DeviceBuffer::<bf16>::zeros(be, m * f)?);
        let (shape, flops) = ([m, f, c], 2.0 * (m * f * c) as f64);
        let torch = ["torch linear+swiglu eager", "torch linear+swiglu compiled"];
        for &e in &engines {
            let epi = Epilogue::SwiGlu { gate: &g, act: &act, up: Some(&up) };
            let ms = time(be, it, || gemm_fused_on(be, e, m, f, c, &h, &w, epi))?;
            let name = format!("linear+swiglu {}", e.name());
            cases.push(Case::new("gemm", &name, &shape, ms, Some(flops), None).vs(&torch));
        }
        let ms = time(be, it, || {
            gemm::native_gemm_batched(be, 1, m, f, c, &h, nn_, &w, t_, &up, 1.0, 0.0)?;
            swiglu::swiglu_forward(be, &g, &up, &act)
        })?;
        cases.push(Case::new("gemm", "linear+swiglu native unfused", &shape, ms, Some(flops), None).vs(&torch));

        // SwiGLU's backward: (dg, du) from da = dy[m, c]·w_down[c, f] (NN), with g, u [m, f]
        let (dy, wd) = (random_bf16(be, m * c, 19)?, random_bf16(be, c * f, 20)?);
        let (dg, du) = (DeviceBuffer::<bf16>::zeros(be, m * f)?, DeviceBuffer::<bf16>::zeros(be, m * f)?);
        let torch = ["torch matmul+swiglu bwd eager", "torch matmul+swiglu bwd compiled"];
        for &e in &engines {
            let ms = time(be, it, || gemm_swiglu_backward_on(be, e, m, f, c, &dy, &wd, (&g, &up), (&dg, &du)))?;
            let name = format!("dy·w+swiglu bwd {}", e.name());
            cases.push(Case::new("gemm", &name, &shape, ms, Some(flops), None).vs(&torch));
        }
        let ms = time(be, it, || {
            gemm::native_gemm_batched(be, 1, m, f, c, &dy, nn_, &wd, nn_, &act, 1.0, 0.0)?;
            swiglu::swiglu_backward(be, &g, &up, &act, &dg, &du)
        })?;
        cases.push(Case::new("gemm", "dy·w+swiglu bwd native unfused", &shape, ms, Some(flops), None).vs(&torch));
        Ok(())
    }

    pub fn all(be: &CudaBackend, o: &BenchOptions) -> Result<(Vec<Case>, Option<f64>)> {
        let mut cases = Vec::new();
        let it = o.iters;
        // Copy ceiling: 256 MiB device to device, bytes read + written.
        let n = 1usize << 28;
        let (src, dst) = (DeviceBuffer::<f32>::zeros(be, n / 4)?, DeviceBuffer::<f32>::zeros(be, n / 4)?);
        let stream = std::ptr::null_mut(); // the legacy default stream every launch is ordered on
                                           // SAFETY: both blocks hold n bytes and stay alive until the synchronization in `time`.
        let copy = || unsafe { cudarc::driver::result::memcpy_dtod_async(dst.ptr(), src.ptr(), n, stream) };
        let ms = time(be, it, || copy().map_err(|e| CudaError(format!("cuMemcpyDtoD: {e:?}"))))?;
        let copy = Case::new("copy", "cuMemcpyDtoD", &[n], ms, None, Some(2.0 * n as f64)).vs(&["copy_"]);
        let copy_gbps = copy.gbps;
        cases.push(copy);
        drop((src, dst));

        // GEMM, bf16 in, bf16 out, fp32 accumulation: C[m,n] = A[m,k]·B[k,n].
        let gemms = [(4096, 4096, 4096), (16384, 768, 3072), (16384, 3072, 768), (16384, 1024, 4096)];
        // Every engine, whatever --gemm says: the handwritten kernel, cuBLASLt, then the sm_90a
        // wgmma kernel (compute capability 9.0 only).
        let lt = match cublaslt::available() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("nanoseek bench: no cuBLASLt rows: {e}");
                false
            }
        };
        let nn_ = gemm::Layout::N;
        for &(m, nn, k) in if o.quick { &gemms[..2] } else { &gemms[..] } {
            let (a, b) = (random_bf16(be, m * k, 1)?, random_bf16(be, k * nn, 2)?);
            let c = DeviceBuffer::<bf16>::zeros(be, m * nn)?;
            let flops = 2.0 * (m * nn * k) as f64;
            let ms = time(be, it, || gemm::native_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0))?;
            cases.push(Case::new("gemm", "gemm_nn_bf16", &[m, nn, k], ms, Some(flops), None).vs(&["torch.matmul"]));
            if lt {
                let ms = time(be, it, || cublaslt::gemm(be, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0))?;
                let case = Case::new("gemm", "cublaslt_nn_bf16", &[m, nn, k], ms, Some(flops), None);
                cases.push(case.vs(&["torch.matmul"]));
            }
            if be.compute_capability() == (9, 0) {
                let ms = time(be, it, || gemm::wgmma_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0))?;
                let case = Case::new("gemm", "gemm_wgmma_nn_bf16", &[m, nn, k], ms, Some(flops), None);
                cases.push(case.vs(&["torch.matmul"]));
                // x·wᵀ, the trainer's forward layout (both operands K-major: the TMA kernel).
                let ms = time(be, it, || {
                    gemm::wgmma_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, gemm::Layout::T, &c, 1.0, 0.0)
                })?;
                let case = Case::new("gemm", "gemm_wgmma_tma_nt_bf16", &[m, nn, k], ms, Some(flops), None);
                cases.push(case.vs(&["torch.matmul"]));
            }
        }

        epilogue_cases(be, it, lt, &mut cases)?;

        // Causal flash attention (h_kv = h, as SDPA's), forward and forward + backward.
        for (b, t, h, d) in [(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 8192, 16, 128)] {
            let dims = AttnDims { b, t, h, h_kv: h, d };
            let len = b * t * h * d;
            let (q, k, v) = (random_bf16(be, len, 3)?, random_bf16(be, len, 4)?, random_bf16(be, len, 5)?);
            let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, len)?, random_bf16(be, len, 6)?);
            let lse = DeviceBuffer::<f32>::zeros(be, b * h * t)?;
            let grads =
                [DeviceBuffer::<f32>::zeros(be, len)?, DeviceBuffer::zeros(be, len)?, DeviceBuffer::zeros(be, len)?];
            let flops = 4.0 * (b * h * t * t * d) as f64 / 2.0;
            let fwd = || attention::attention_forward(be, &dims, &q, &k, &v, &out, &lse);
            let ms = time(be, it, fwd)?;
            cases.push(Case::new("attention", "attn fwd", &[b, t, h, d], ms, Some(flops), None).vs(&["sdpa fwd"]));
            let ms = time(be, it, || {
                fwd()?;
                attention::attention_backward(
                    be,
                    &dims,
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    &dout,
                    [&grads[0], &grads[1], &grads[2]],
                )
            })?;
            let name = "attn fwd+bwd";
            cases.push(Case::new("attention", name, &[b, t, h, d], ms, Some(3.5 * flops), None).vs(&["sdpa fwd+bwd"]));
        }

        // RoPE on q and k [8, 1024, 12, 64] in one pass: 2 tensors read and written.
        let (b, t, h, d) = (8, 1024, 12, 64);
        let table = rope::RopeTableGpu::new(be, d, t, 10000.0)?;
        let (q, k) = (random_bf16(be, b * t * h * d, 7)?, random_bf16(be, b * t * h * d, 8)?);
        let ms = time(be, it, || rope::rope_inplace(be, &table, &q, &k, (b, t, h, h), false))?;
        let bytes = 2.0 * 2.0 * 2.0 * (b * t * h * d) as f64;
        cases.push(
            Case::new("rope", "rope q+k", &[b, t, h, d], ms, None, Some(bytes)).vs(&["rope eager", "rope compiled"]),
        );
        // QK-norm fused with RoPE on the same q and k (h_kv = h), one launch per direction. The
        // forward reads q_raw, k_raw and writes q, k (bf16) and one f32 rstd per head; the backward
        // reads q_raw, k_raw, dq, dk (bf16) and the rstd, and writes dq_raw, dk_raw (bf16).
        let (elems, heads) = (2.0 * (b * t * h * d) as f64, 2.0 * (b * t * h) as f64);
        let (qo, ko) =
            (DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?, DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?);
        let (rq, rk) = (DeviceBuffer::<f32>::zeros(be, b * t * h)?, DeviceBuffer::<f32>::zeros(be, b * t * h)?);
        let dims = (b, t, h, h);
        let ms = time(be, it, || rope::rope_qknorm_forward(be, &table, &q, &k, dims, &qo, &ko, &rq, &rk))?;
        let bytes = 2.0 * 2.0 * elems + 4.0 * heads;
        let names = ["rope+qknorm eager", "rope+qknorm compiled"];
        cases.push(Case::new("rope", "rope+qknorm fwd", &[b, t, h, d], ms, None, Some(bytes)).vs(&names));
        let (dqr, dkr) =
            (DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?, DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?);
        let ms = time(be, it, || rope::rope_qknorm_backward(be, &table, &q, &k, &rq, &rk, &qo, &ko, dims, &dqr, &dkr))?;
        let bytes = 3.0 * 2.0 * elems + 4.0 * heads;
        cases.push(Case::new("rope", "rope+qknorm bwd", &[b, t, h, d], ms, None, Some(bytes)));
        drop((q, k, qo, ko, rq, rk, dqr, dkr));

        // RMSNorm [8192, 768].
        let (rows, dim) = (8192, 768);
        let (x, y) = (random_bf16(be, rows * dim, 9)?, DeviceBuffer::<bf16>::zeros(be, rows * dim)?);
        let rstd = DeviceBuffer::<f32>::zeros(be, rows)?;
        let ms = time(be, it, || norm::rmsnorm_forward(be, &x, dim, &y, &rstd))?;
        let bytes = 2.0 * 2.0 * (rows * dim) as f64;
        let names = ["rmsnorm eager", "rmsnorm compiled"];
        cases.push(Case::new("rmsnorm", "rmsnorm fwd", &[rows, dim], ms, None, Some(bytes)).vs(&names));

        // The residual add (axpby: out = a + b) over 2^26 bf16 values: 2 read, 1 written.
        let n = 1usize << 26;
        let (a, b2, out) = (random_bf16(be, n, 17)?, random_bf16(be, n, 18)?, DeviceBuffer::<bf16>::zeros(be, n)?);
        let ms = time(be, it, || elementwise::add(be, &a, &b2, &out))?;
        let case = Case::new("elementwise", "axpby (a + b)", &[n], ms, None, Some(3.0 * 2.0 * n as f64));
        cases.push(case.vs(&["add eager"]));
        drop((a, b2, out));

        // Softcap cross-entropy forward over [8192, V] bf16 logits (V = 65536, quick 8192).
        let (rows, vocab) = (8192, if o.quick { 8192 } else { 65536 });
        let z = random_bf16(be, rows * vocab, 10)?;
        let targets: Vec<i32> = (0..rows).map(|i| ((i * 7919) % vocab) as i32).collect();
        let targets = DeviceBuffer::from_host(be, &targets)?;
        let (losses, lse) = (DeviceBuffer::<f32>::zeros(be, rows)?, DeviceBuffer::<f32>::zeros(be, rows)?);
        let ms = time(be, it, || loss::softcap_cross_entropy_forward(be, &z, vocab, &targets, 15.0, &losses, &lse))?;
        let bytes = 2.0 * (rows * vocab) as f64;
        let names = ["softcap_ce eager", "softcap_ce compiled"];
        cases.push(Case::new("loss", "softcap_ce fwd", &[rows, vocab], ms, None, Some(bytes)).vs(&names));
        drop((z, targets, losses, lse));

        sparse(be, o, &mut cases)?;
        Ok((cases, copy_gbps))
    }

    /// Causal score entries (query, key ≤ query) query `i` of `t` sees with at most `keys` keys each
    /// (the `keys` most recent, or its top-k).
    pub(super) fn visible_capped(t: usize, keys: usize) -> usize {
        (0..t).map(|i| (i + 1).min(keys)).sum()
    }

    /// Score entries of window + global attention, as `torch_baselines.py` counts them: a window
    /// of `w` keys plus the global prefix of `g` keys outside it.
    pub(super) fn visible_window(t: usize, w: usize, g: usize) -> usize {
        (0..t).map(|i| (i + 1).min(w) + g.min((i + 1).saturating_sub(w))).sum()
    }

    /// The cases of `sparse_baselines` in `torch_baselines.py` (same shapes and names), plus DSA.
    fn sparse(be: &CudaBackend, o: &BenchOptions, cases: &mut Vec<Case>) -> Result<()> {
        let it = o.iters;
        // Window + global attention and dense attention, fwd + bwd, b 1, 16 heads of 128.
        let (b, h, d, window, n_global) = (1, 16, 128, 1024, 64);
        let lengths: &[usize] = if o.quick { &[4096, 16384] } else { &[4096, 16384, 65536] };
        for &t in lengths {
            let len = b * t * h * d;
            let (q, k, v) = (random_bf16(be, len, 11)?, random_bf16(be, len, 12)?, random_bf16(be, len, 13)?);
            let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, len)?, random_bf16(be, len, 14)?);
            let lse = DeviceBuffer::<f32>::zeros(be, b * h * t)?;
            let g =
                [DeviceBuffer::<f32>::zeros(be, len)?, DeviceBuffer::zeros(be, len)?, DeviceBuffer::zeros(be, len)?];
            let grads = [&g[0], &g[1], &g[2]];

            let wd = WindowDims { b, t, h, h_kv: h, d, window, n_global };
            let flops = 3.5 * 4.0 * (b * h * visible_window(t, window, n_global) * d) as f64;
            let ms = time_long(be, it, || {
                window_attention::window_attention_forward(be, &wd, &q, &k, &v, &out, &lse)?;
                window_attention::window_attention_backward(be, &wd, &q, &k, &v, &out, &lse, &dout, grads)
            })?;
            let shape = [b, t, h, d, window, n_global];
            let names = ["flex_attention fwd+bwd"];
            cases.push(Case::new("window", "wattn fwd+bwd", &shape, ms, Some(flops), None).vs(&names));

            let ad = AttnDims { b, t, h, h_kv: h, d };
            let flops = 3.5 * 4.0 * (b * h * visible_capped(t, t) * d) as f64;
            let ms = time_long(be, it, || {
                attention::attention_forward(be, &ad, &q, &k, &v, &out, &lse)?;
                attention::attention_backward(be, &ad, &q, &k, &v, &out, &lse, &dout, grads)
            })?;
            let (kind, name) = super::DENSE_ATTN;
            cases.push(Case::new(kind, name, &[b, t, h, d], ms, Some(flops), None).vs(&["sdpa fwd+bwd"]));
        }

        // DSA fwd + bwd at 8K/32K/64K keys, top-k 2048 (no local window): the indexer's top-k,
        // sparse attention forward + backward and the sparse indexer KL (with its gradients).
        // Indexer: 16 heads of 64. The rate counts the sparse attention only (3.5 × 4·h·d per
        // selected (query, key) pair); the comparison with dense attention is by time.
        let topk = 2048;
        let dsa_lengths: &[usize] = if o.quick { &[8192] } else { &[8192, 32768, 65536] };
        for &t in dsa_lengths {
            let dims = DsaDims { b, t, h, h_kv: h, d, n_index_heads: 16, index_dim: 64, topk, window: 0 };
            let (ql, kl) = (dims.q_len(), dims.kv_len());
            let (q, k, v) = (random_bf16(be, ql, 21)?, random_bf16(be, kl, 22)?, random_bf16(be, kl, 23)?);
            let (qi, ki, wi) = (
                random_bf16(be, dims.qi_len(), 24)?,
                random_bf16(be, dims.ki_len(), 25)?,
                random_bf16(be, dims.wi_len(), 26)?,
            );
            let sel = DeviceBuffer::<u32>::zeros(be, dims.sel_len())?;
            let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, ql)?, random_bf16(be, ql, 27)?);
            let lse = DeviceBuffer::<f32>::zeros(be, dims.lse_len())?;
            let g = [DeviceBuffer::<f32>::zeros(be, ql)?, DeviceBuffer::zeros(be, kl)?, DeviceBuffer::zeros(be, kl)?];
            let gi = [
                DeviceBuffer::<f32>::zeros(be, dims.qi_len())?,
                DeviceBuffer::zeros(be, dims.ki_len())?,
                DeviceBuffer::zeros(be, dims.wi_len())?,
            ];
            let kl_loss = DeviceBuffer::<f32>::zeros(be, 1)?;
            // The engine's dense attention at this length too, when no case above has it (32K),
            // for `speedup_vs_engine_dense`.
            let (kind, name) = super::DENSE_ATTN;
            if !cases.iter().any(|c| c.kind == kind && c.name == name && c.shape == [b, t, h, d]) {
                let ad = AttnDims { b, t, h, h_kv: h, d };
                let grads = [&g[0], &g[1], &g[2]];
                let ms = time_long(be, it, || {
                    attention::attention_forward(be, &ad, &q, &k, &v, &out, &lse)?;
                    attention::attention_backward(be, &ad, &q, &k, &v, &out, &lse, &dout, grads)
                })?;
                let flops = 3.5 * 4.0 * (b * h * visible_capped(t, t) * d) as f64;
                cases.push(Case::new(kind, name, &[b, t, h, d], ms, Some(flops), None).vs(&["sdpa fwd+bwd"]));
            }
            let flops = 3.5 * 4.0 * (b * h * visible_capped(t, topk) * d) as f64;
            let ms = time_long(be, it, || {
                dsa::indexer_topk(be, &dims, &qi, &ki, &wi, &sel)?;
                dsa::dsa_attention_forward(be, &dims, &q, &k, &v, &sel, &out, &lse)?;
                dsa::dsa_attention_backward(be, &dims, &q, &k, &v, &sel, &out, &lse, &dout, [&g[0], &g[1], &g[2]])?;
                dsa::indexer_kl(be, &dims, &q, &k, &lse, &qi, &ki, &wi, Some(&sel), [&gi[0], &gi[1], &gi[2]], &kl_loss)
            })?;
            let case = Case::new("dsa", "dsa fwd+bwd", &[b, t, h, d], ms, Some(flops), None);
            cases.push(case.vs_dense("attention", &["sdpa fwd+bwd"]));
        }

        // MoE layer fwd + bwd: router GEMM (follows --gemm), routing, experts, combine, their
        // backward, the router backward and its dx GEMM; weights scaled by 1/√fan-in like torch's.
        let (n, c, e, f, topk) = if o.quick { (8192, 1024, 16, 512, 2) } else { (16384, 2048, 64, 704, 2) };
        let cfg = RouterConfig {
            n_experts: e,
            top_k: topk,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            score_func: ScoreFunc::Sigmoid,
            capacity_factor: None,
        };
        let (sc, sf) = (1.0 / (c as f32).sqrt(), 1.0 / (f as f32).sqrt());
        let x = random_bf16(be, n * c, 31)?;
        let wr = random_bf16_scaled(be, e * c, 32, sc)?;
        let (wg, wu) = (random_bf16_scaled(be, e * f * c, 33, sc)?, random_bf16_scaled(be, e * f * c, 34, sc)?);
        let wdn = random_bf16_scaled(be, e * c * f, 35, sf)?;
        let bias = DeviceBuffer::<f32>::zeros(be, e)?;
        let (logits, d_logits) = (DeviceBuffer::<f32>::zeros(be, n * e)?, DeviceBuffer::<f32>::zeros(be, n * e)?);
        let d_logits_bf = DeviceBuffer::<bf16>::zeros(be, n * e)?;
        let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, n * c)?, random_bf16(be, n * c, 36)?);
        let dx = DeviceBuffer::<f32>::zeros(be, n * c)?;
        let dw = [
            DeviceBuffer::<f32>::zeros(be, e * f * c)?,
            DeviceBuffer::zeros(be, e * f * c)?,
            DeviceBuffer::zeros(be, e * c * f)?,
        ];
        let d_gates = DeviceBuffer::<f32>::zeros(be, n * topk)?;
        let (nn_, tt_) = (gemm::Layout::N, gemm::Layout::T);
        let ms = time_long(be, it, || {
            gemm::gemm(be, n, e, c, &x, nn_, &wr, tt_, &logits, 1.0, 0.0)?; // x Rᵀ, R [E, C]
            let routing = moe::route(be, &logits, &bias, &cfg)?;
            let cache = moe::moe_forward(be, &x, n, c, &routing, &wg, &wu, &wdn, f, &out)?;
            moe::moe_backward(
                be,
                &dout,
                n,
                c,
                &routing,
                &wg,
                &wu,
                &wdn,
                f,
                &cache,
                &dx,
                [&dw[0], &dw[1], &dw[2]],
                &d_gates,
            )?;
            moe::router_backward(be, &routing, &d_gates, None, &cfg, &d_logits)?;
            optim::cast_f32_bf16(be, &d_logits, &d_logits_bf)?;
            gemm::gemm(be, n, c, e, &d_logits_bf, nn_, &wr, nn_, &dx, 1.0, 1.0) // dx += dlogits R
        })?;
        let flops = (2 * 3 * n * topk * c * f * 3) as f64; // torch_baselines.py's active FLOPs
        let names = ["torch loop fwd+bwd", "torch grouped_mm fwd+bwd", "dense ffn fwd+bwd"];
        cases.push(Case::new("moe", "moe fwd+bwd", &[n, c, e, f, topk], ms, Some(flops), None).vs(&names));
        Ok(())
    }
}

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
        });
        assert!(t.contains("--gemm cublaslt"), "{t}");
        assert!(t.contains("grouped 2.000") && t.contains("loop 8.000") && t.contains("4.00x"), "{t}");
        assert!(t.contains("2.00x/4.00x"), "{t}");
        assert_eq!(t.matches("also:").count(), 2, "{t}");
    }

    #[test]
    fn visible_entries_match_torch_baselines_counts() {
        use super::cuda_cases::{visible_capped, visible_window};
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
