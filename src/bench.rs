//! `nanoseek bench`: the CUDA kernel suite, timed on the device and compared in the same
//! run with PyTorch (`scripts/torch_baselines.py` writes the baseline JSON; `scripts/gpu-check.sh
//! run` runs both) and with the machine's ceilings.
//!
//! Every case runs the engine's kernel at the shapes `torch_baselines.py` uses, so the two sides
//! do the same work; the ratio is taken between achieved rates (TFLOP/s or GB/s), which stays
//! meaningful when the engine's kernel does a little more (RoPE rotates q and k in one pass).
//! Timing: 3 warm-up calls, then `iters` calls queued back to back between two device
//! synchronizations, repeated 5 times; the median per-call time is reported (launch overhead is
//! hidden behind the queued work, as with PyTorch's CUDA events).
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
}

/// One timed case of the engine.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Case {
    /// Kernel family (gemm, copy, attention, rope, rmsnorm, loss).
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
        }
    }
    fn vs(mut self, names: &[&'static str]) -> Case {
        self.baseline_names = names.to_vec();
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
    /// Engine rate / PyTorch rate (> 1: the engine is faster).
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
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

/// Pairs each case with its ceiling and the fastest matching baseline (same kind and shape,
/// name among `baseline_names`).
pub fn compare(cases: Vec<Case>, baseline: &[BaselineCase], copy_gbps: Option<f64>, gemm_ceiling: f64) -> Vec<Row> {
    cases
        .into_iter()
        .map(|case| {
            let ceiling_fraction = match (case.tflops, case.gbps) {
                (Some(t), _) => Some(t / gemm_ceiling),
                (None, Some(g)) => copy_gbps.map(|c| g / c),
                _ => None,
            };
            let best = baseline
                .iter()
                .filter(|b| {
                    b.kind == case.kind && b.shape == case.shape && case.baseline_names.contains(&b.name.as_str())
                })
                .filter_map(|b| b.tflops.or(b.gbps).map(|r| (b, r)))
                .max_by(|x, y| x.1.total_cmp(&y.1));
            let (baseline, baseline_ms, baseline_rate, ratio) = match best {
                Some((b, r)) => (Some(b.name.clone()), Some(b.ms), Some(r), Some(case.rate() / r)),
                None => (None, None, None, None),
            };
            Row { case, ceiling_fraction, baseline, baseline_ms, baseline_rate, ratio }
        })
        .collect()
}

/// The report as a fixed-width table.
pub fn table(report: &Report) -> String {
    let mut s = format!(
        "device: {}; copy ceiling {}; bf16 GEMM ceiling {:.0} TFLOP/s ({})\n",
        report.device,
        report.copy_gbps.map_or("n/a".into(), |g| format!("{g:.0} GB/s")),
        report.gemm_ceiling_tflops,
        report.gemm_ceiling_source
    );
    s += &format!(
        "{:<10} {:<22} {:<24} {:>9} {:>16} {:>8} {:>22} {:>7}\n",
        "kind", "case", "shape", "ms", "rate", "ceiling", "torch", "ratio"
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
        s += &format!(
            "{:<10} {:<22} {:<24} {:>9.3} {:>16} {:>8} {:>22} {:>7}\n",
            c.kind,
            c.name,
            format!("{:?}", c.shape),
            c.ms,
            rate,
            r.ceiling_fraction.map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
            torch,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        );
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
    use crate::backend::cuda::{attention, gemm, loss, norm, rope, CudaBackend, CudaError, CudaResult, DeviceBuffer};
    use anyhow::Result;
    use half::bf16;
    use std::time::Instant;

    /// Median milliseconds per call of `f` (see the module doc).
    fn time(be: &CudaBackend, iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        be.synchronize()?;
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

    /// Device bf16 values uniform in [-1, 1) (a cheap xorshift; the values do not matter).
    fn random_bf16(be: &CudaBackend, n: usize, seed: u64) -> CudaResult<DeviceBuffer<bf16>> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let host: Vec<bf16> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect();
        DeviceBuffer::from_host(be, &host)
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
        for &(m, nn, k) in if o.quick { &gemms[..2] } else { &gemms[..] } {
            let (a, b) = (random_bf16(be, m * k, 1)?, random_bf16(be, k * nn, 2)?);
            let c = DeviceBuffer::<bf16>::zeros(be, m * nn)?;
            let ms = time(be, it, || gemm::gemm(be, m, nn, k, &a, gemm::Layout::N, &b, gemm::Layout::N, &c, 1.0, 0.0))?;
            let flops = 2.0 * (m * nn * k) as f64;
            cases.push(Case::new("gemm", "gemm_nn_bf16", &[m, nn, k], ms, Some(flops), None).vs(&["torch.matmul"]));
        }

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

        // RMSNorm [8192, 768].
        let (rows, dim) = (8192, 768);
        let (x, y) = (random_bf16(be, rows * dim, 9)?, DeviceBuffer::<bf16>::zeros(be, rows * dim)?);
        let rstd = DeviceBuffer::<f32>::zeros(be, rows)?;
        let ms = time(be, it, || norm::rmsnorm_forward(be, &x, dim, &y, &rstd))?;
        let bytes = 2.0 * 2.0 * (rows * dim) as f64;
        let names = ["rmsnorm eager", "rmsnorm compiled"];
        cases.push(Case::new("rmsnorm", "rmsnorm fwd", &[rows, dim], ms, None, Some(bytes)).vs(&names));

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
        Ok((cases, copy_gbps))
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
            copy_gbps: Some(4.0),
            gemm_ceiling_tflops: 8.0,
            gemm_ceiling_source: "test".into(),
            rows,
        });
        assert!(t.contains("0.50x") && t.contains("rope compiled 0.500"), "{t}");
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
