//! `nanoseek selftest`: every CUDA kernel family against its CPU twin (`backend::cpu`) on seeded
//! random inputs at several shapes, as a table of PASS/FAIL rows with margins, a JSON report and
//! an exit code. `tests/cuda*.rs` call the same groups (one copy of the parity logic).
//!
//! # Error model
//!
//! Inputs are rounded to bf16 first and the CPU twin runs in f32 on exactly those values, so the
//! two sides differ only by what the GPU rounds and by the order of f32 operations.
//! - bf16 (8 significant bits, round to nearest): one rounding moves a value by at most
//!   u = 2⁻⁸ ≈ 3.9e-3 of itself (the spacing at 1 is 2⁻⁷); as a random variable, the relative
//!   error δ of a rounding is roughly uniform, RMS ≈ u/√3 ≈ 2.3e-3. f32: u = 2⁻²⁴.
//! - A tensor rounded once has ‖g − w‖/‖w‖ ≤ u: element-wise kernels (rope, rmsnorm, layernorm, SwiGLU,
//!   embedding, cross-entropy gradient) get norm 2u (the f32 values before the rounding may
//!   differ in their last bits, so the rounding may land on the other neighbour).
//! - Sums in f32: products of bf16 values are exact in f32, so a GEMM (or a dot product) with
//!   f32 accumulation differs only by summation order: |error| ≤ γ_k Σ|a_i b_i| with
//!   γ_k ≈ k·u_f32 in the worst case, ≈ √k·u_f32 typically; norm k·2⁻²² (≥ 1e-5). A bf16 output
//!   adds one rounding (2u); fused epilogues one or two more (3u).
//! - Softmax: the flash kernels round P (forward; P and dS in the backward) to bf16 before the
//!   second product. Out = Σ_j p_j(1 + δ_j)v_j / l: the errors δ_j are independent, so the
//!   relative RMS of the error is ≈ u/√3 of the sum's own scale, whatever the number of keys;
//!   with out's own rounding ≈ 3e-3. dq, dk, dv likewise (the backward recomputes P in f32 from
//!   the saved lse). Norm 3u; element-wise 8u relative plus 12u × the tensor's RMS absolute
//!   (an element's error follows its row's scale, not its own value, which may be near 0).
//!   lse is f32 statistics: 1e-3 element-wise, norm 2e-5. The sparse (DSA) attention keeps P
//!   in f32: only out's rounding (2u) and summation order.
//! - Longer chains (MoE expert FFN: bf16 hg, hu, act, y, dy, d_act, dh between grouped GEMMs
//!   where the CPU keeps f32; a whole training step) add a rounding per stage; their bounds
//!   are stated where they are checked ([`moe`], [`train`]).
//!
//! Proven on the host (`attention::host_tests`, `gemm::host_tests`, run by `cargo test`): a
//! bf16-faithful emulation of the flash kernels (P and dS rounded to bf16, out rounded) passes
//! the attention tolerances, and corrupted results (dq all zero, dq × 0.5, one 64-row tile of
//! dq zeroed, two heads swapped, the causal mask off by one) fail them; the same for GEMM
//! (another summation order rounded to bf16 passes; zeros, × 0.5, a zeroed tile, the k tail
//! dropped, a transposed operand fail).
//!
//! Every kernel also runs twice on the same input: the results must be bitwise equal, except
//! where the kernel adds with atomics in an unspecified order (the flash backward's dq, the DSA
//! backward's dk and dv, the indexer KL's dk_I, the embedding backward), which are compared at
//! f32 summation-order tolerances.

pub mod command;
pub mod compare;

mod attention;
mod basic;
mod dsa;
mod gemm;
mod kernels_api;
mod moe;
mod nccl;
pub mod train;

use crate::backend::cuda::{CudaBackend, DeviceBuffer};
use anyhow::Result;
use compare::{compare, Tol};
use half::bf16;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

/// One group of checks (`--only` names, `--list` prints).
#[derive(Debug)]
pub struct Group {
    pub name: &'static str,
    pub about: &'static str,
    run: fn(&mut Ctx) -> Result<()>,
}

/// Every group, in the order they run.
pub const GROUPS: &[Group] = &[
    Group { name: "smoke", about: "one tiny kernel: axpby on 1K elements", run: basic::smoke },
    Group { name: "gemm", about: "native GEMM, four layouts, f32 and bf16 output, batched", run: gemm::native },
    Group { name: "cublaslt", about: "cuBLASLt GEMM (--gemm cublaslt), four layouts", run: gemm::cublaslt },
    Group { name: "wgmma", about: "sm_90a wgmma GEMM (compute capability 9.0 only)", run: gemm::wgmma },
    Group {
        name: "epilogues",
        about: "fused residual / SwiGLU / SwiGLU-backward GEMMs, every engine",
        run: gemm::epilogues,
    },
    Group { name: "attention", about: "dense causal flash attention, forward and backward", run: attention::dense },
    Group {
        name: "window",
        about: "sliding-window + global-token attention, forward and backward",
        run: attention::window,
    },
    Group { name: "rope", about: "RoPE and the fused QK-norm + RoPE, forward and backward", run: basic::rope },
    Group { name: "norm", about: "RMSNorm and LayerNorm forward and backward", run: basic::norm },
    Group { name: "swiglu", about: "SwiGLU forward and backward", run: basic::swiglu },
    Group { name: "embedding", about: "embedding gather and scatter-add backward", run: basic::embedding },
    Group { name: "loss", about: "soft-capped cross-entropy, forward and backward", run: basic::loss },
    Group {
        name: "optim",
        about: "AdamW, grad norm and clip, Muon momentum, Newton–Schulz, muon_apply",
        run: basic::optim,
    },
    Group { name: "elementwise", about: "axpby, residual add, odd lengths", run: basic::elementwise },
    Group { name: "dsa", about: "DSA top-k selection, sparse attention, indexer KL, decode", run: dsa::run },
    Group { name: "moe", about: "MoE routing, dispatch, expert FFN forward/backward, bias update", run: moe::run },
    Group { name: "kernels_api", about: "the device kernel API (nanoseek::kernels::cuda)", run: kernels_api::run },
    Group { name: "train_step", about: "dense model: loss and every parameter's gradient, 3 steps", run: train::dense },
    Group {
        name: "train_step_all_kinds",
        about: "WSD + MoE model: every gradient, 3 steps, loads, biases",
        run: train::all_kinds,
    },
    Group {
        name: "train_step_mtp",
        about: "dense model with 2 MTP modules: depth losses, every gradient, 3 steps",
        run: train::mtp,
    },
    Group {
        name: "train_step_mla",
        about: "MLA (WSD, query latent): every gradient, indexer KL, 3 steps, with and without checkpointing",
        run: train::mla,
    },
    Group {
        name: "nccl_world1",
        about: "data-parallel (ZeRO-1) step over NCCL at world size 1 vs the single-process step",
        run: nccl::world1,
    },
];

/// The groups a model's training uses (`train --device cuda` runs their quick checks first).
pub fn groups_for_model(c: &crate::nn::ModelConfig) -> Vec<&'static str> {
    let mut g = vec!["smoke", "gemm", "epilogues", "attention", "rope", "norm", "swiglu", "embedding", "loss", "optim"];
    g.push("elementwise");
    if c.attn_pattern.contains('W') || c.attn_pattern.contains('S') {
        g.push("window");
    }
    if c.attn_pattern.contains('S') {
        g.push("dsa");
    }
    if c.moe.n_routed_experts > 0 {
        g.push("moe");
    }
    g
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub group: String,
    pub check: String,
    pub shape: String,
    /// Worst element error / its tolerance (None: not an element-wise comparison).
    pub margin: Option<f64>,
    /// ‖gpu − cpu‖₂ / ‖cpu‖₂ and its bound.
    pub rel_err: Option<f64>,
    pub rel_bound: Option<f64>,
    pub status: Status,
    /// The failure (or skip) in words; empty on a plain pass.
    pub note: String,
}

/// What `selftest` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub device: Option<String>,
    pub compute_capability: Option<String>,
    pub commit: Option<String>,
    pub quick: bool,
    pub groups: Vec<String>,
    /// Set when no CUDA device could be opened (the whole run is a SKIP).
    pub no_device: Option<String>,
    pub rows: Vec<Row>,
    pub checks: usize,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Report {
    fn count(&mut self) {
        self.checks = self.rows.len();
        self.passed = self.rows.iter().filter(|r| r.status == Status::Pass).count();
        self.failed = self.rows.iter().filter(|r| r.status == Status::Fail).count();
        self.skipped = self.rows.iter().filter(|r| r.status == Status::Skip).count();
    }

    /// `selftest: N checks, P PASS, F FAIL, S SKIP`.
    pub fn summary_line(&self) -> String {
        format!("selftest: {} checks, {} PASS, {} FAIL, {} SKIP", self.checks, self.passed, self.failed, self.skipped)
    }
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub ordinal: usize,
    pub quick: bool,
    /// Group names (None: all); unknown names are an error of [`select`].
    pub only: Option<Vec<String>>,
    /// The train_step reference written by `--write-reference` (None: computed on the CPU).
    pub reference: Option<PathBuf>,
    /// Print each row as it is found (the command); tests collect silently.
    pub echo: bool,
}

/// The groups `only` names, in run order; an unknown name is an error listing the known ones.
pub fn select(only: Option<&[String]>) -> Result<Vec<&'static Group>, String> {
    let Some(only) = only else { return Ok(GROUPS.iter().collect()) };
    for name in only {
        if !GROUPS.iter().any(|g| g.name == name) {
            let known: Vec<&str> = GROUPS.iter().map(|g| g.name).collect();
            return Err(format!("unknown group '{name}' (known: {})", known.join(", ")));
        }
    }
    Ok(GROUPS.iter().filter(|g| only.iter().any(|n| n == g.name)).collect())
}

/// `git rev-parse --short HEAD` of the working directory, when there is one.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// Runs the selected groups on CUDA device `opts.ordinal`. No device is not an error: the
/// report says why in `no_device` (the command exits 77). Unknown group names are.
pub fn run(opts: &Options) -> Result<Report> {
    let groups = select(opts.only.as_deref()).map_err(anyhow::Error::msg)?;
    let mut report = Report {
        device: None,
        compute_capability: None,
        commit: commit(),
        quick: opts.quick,
        groups: groups.iter().map(|g| g.name.to_string()).collect(),
        no_device: None,
        rows: vec![],
        checks: 0,
        passed: 0,
        failed: 0,
        skipped: 0,
    };
    let be = match crate::backend::cuda::probe_devices().and_then(|_| CudaBackend::new(opts.ordinal).map_err(|e| e.0)) {
        Ok(be) => be,
        Err(why) => {
            report.no_device = Some(why);
            return Ok(report);
        }
    };
    let (major, minor) = be.compute_capability();
    report.device = Some(be.name().to_string());
    report.compute_capability = Some(format!("{major}.{minor}"));
    if opts.echo {
        println!(
            "selftest on {} (compute capability {major}.{minor}){}",
            be.name(),
            if opts.quick { ", quick" } else { "" }
        );
        println!("{}", header());
    }
    let mut ctx = Ctx {
        be: &be,
        quick: opts.quick,
        reference: opts.reference.clone(),
        ordinal: opts.ordinal,
        group: "",
        rows: vec![],
        echo: opts.echo,
    };
    for g in groups {
        ctx.group = g.name;
        ctx.case(g.name, "-", g.run);
    }
    report.rows = ctx.rows;
    report.count();
    Ok(report)
}

/// `train --device cuda`: the quick checks of the groups `model` uses, before training starts; an
/// error naming the failed checks if any fails (`--skip-selftest` bypasses it).
pub fn preflight(ordinal: usize, model: &crate::nn::ModelConfig) -> Result<()> {
    let only = groups_for_model(model).into_iter().map(String::from).collect();
    let opts = Options { ordinal, quick: true, only: Some(only), reference: None, echo: false };
    let report = run(&opts)?;
    if let Some(why) = report.no_device {
        anyhow::bail!("selftest: cannot open cuda:{ordinal}: {why}");
    }
    eprintln!("{} (quick, the model's kernel families)", report.summary_line());
    let failed: Vec<String> = report.rows.iter().filter(|r| r.status == Status::Fail).map(format_row).collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "the CUDA kernels fail their selftest on this device, refusing to train:\n{}\n(run `nanoseek selftest` for the full table; --skip-selftest trains anyway)",
            failed.join("\n")
        );
    }
    Ok(())
}

/// The table's header line.
pub fn header() -> String {
    format!("{:<12} {:<44} {:<26} {:>9} {:>21} {:<6}", "group", "check", "shape", "margin", "rel.err ≤ bound", "status")
}

/// One table line.
pub fn format_row(r: &Row) -> String {
    let margin = r.margin.map_or("-".to_string(), |m| format!("{m:.3}"));
    let rel = match (r.rel_err, r.rel_bound) {
        (Some(e), Some(b)) => format!("{e:.2e} ≤ {b:.1e}"),
        _ => "-".to_string(),
    };
    let status = match r.status {
        Status::Pass => "PASS",
        Status::Fail => "FAIL",
        Status::Skip => "SKIP",
    };
    let mut line = format!("{:<12} {:<44} {:<26} {:>9} {:>21} {status}", r.group, r.check, r.shape, margin, rel);
    if !r.note.is_empty() {
        line.push_str(&format!("  {}", r.note));
    }
    line
}

/// The running state of a selftest: the device, the options and the rows found so far.
pub struct Ctx<'a> {
    pub be: &'a CudaBackend,
    pub quick: bool,
    pub reference: Option<PathBuf>,
    ordinal: usize,
    group: &'static str,
    rows: Vec<Row>,
    echo: bool,
}

impl Ctx<'_> {
    /// A second backend on the same device, for the engines that own theirs (`CudaOps`).
    pub fn open(&self) -> Result<CudaBackend> {
        Ok(CudaBackend::new(self.ordinal)?)
    }

    fn push(&mut self, row: Row) {
        if self.echo {
            println!("{}", format_row(&row));
            let _ = std::io::stdout().flush();
        }
        self.rows.push(row);
    }

    fn row(&self, check: &str, shape: &str, status: Status, note: String) -> Row {
        Row {
            group: self.group.into(),
            check: check.into(),
            shape: shape.into(),
            margin: None,
            rel_err: None,
            rel_bound: None,
            status,
            note,
        }
    }

    /// Runs one case; an error (a CUDA error, a failed launch) or a panic inside it becomes a FAIL
    /// row with its message, and the selftest goes on with the next case.
    pub fn case(&mut self, check: &str, shape: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        let why = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                format!("panic: {}", msg.unwrap_or_default())
            }
        };
        let row = self.row(check, shape, Status::Fail, why);
        self.push(row);
    }

    /// Compares a GPU result with the CPU's (element-wise and by the relative error norm).
    pub fn close(&mut self, check: &str, shape: &str, got: &[f32], want: &[f32], tol: Tol) -> bool {
        let s = compare(got, want, tol);
        let mut row = self.row(check, shape, if s.pass { Status::Pass } else { Status::Fail }, s.detail);
        (row.margin, row.rel_err, row.rel_bound) = (Some(s.margin), Some(s.rel_err), Some(tol.norm as f64));
        self.push(row);
        s.pass
    }

    /// Exact equality of integer (or otherwise discrete) results.
    pub fn equal<T: PartialEq + std::fmt::Debug>(&mut self, check: &str, shape: &str, got: &[T], want: &[T]) -> bool {
        let differ = got.iter().zip(want).filter(|(g, w)| g != w).count() + got.len().abs_diff(want.len());
        let note = match got.iter().zip(want).position(|(g, w)| g != w) {
            _ if got.len() != want.len() => format!("{} elements, expected {}", got.len(), want.len()),
            Some(i) => {
                format!("{differ} of {} differ; first at {i}: gpu {:?} vs cpu {:?}", want.len(), got[i], want[i])
            }
            None => String::new(),
        };
        let mut row = self.row(check, shape, if differ == 0 { Status::Pass } else { Status::Fail }, note);
        row.margin = Some(if differ == 0 { 0.0 } else { f64::INFINITY });
        self.push(row);
        differ == 0
    }

    /// A yes/no property (an error message's wording, a bias that moved).
    pub fn flag(&mut self, check: &str, shape: &str, ok: bool, why_not: impl Into<String>) -> bool {
        let row = self.row(
            check,
            shape,
            if ok { Status::Pass } else { Status::Fail },
            if ok { String::new() } else { why_not.into() },
        );
        self.push(row);
        ok
    }

    /// A check that cannot run here (and why).
    pub fn skip(&mut self, check: &str, why: &str) {
        let row = self.row(check, "-", Status::Skip, why.into());
        self.push(row);
    }

    /// The second run of a kernel on the same input against the first: bitwise (`None`) or at a
    /// tolerance (atomics).
    pub fn repeat(&mut self, check: &str, shape: &str, second: &[f32], first: &[f32], tol: Option<Tol>) -> bool {
        match tol {
            None => {
                let (a, b): (Vec<u32>, Vec<u32>) =
                    (second.iter().map(|x| x.to_bits()).collect(), first.iter().map(|x| x.to_bits()).collect());
                self.equal(&format!("{check} (rerun, bitwise)"), shape, &a, &b)
            }
            Some(t) => self.close(&format!("{check} (rerun)"), shape, second, first, t),
        }
    }
}

/// Tolerance of a rerun of an f32 result summed with atomics: the order of f32 additions only.
pub fn atomics_rerun(want: &[f32]) -> Tol {
    Tol::new(1e-5 * compare::rms(want), 1e-5, 1e-5)
}

/// Deterministic uniform values in [-amp, amp), already rounded to bf16 (xorshift64).
pub fn rand_bf16(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32((2.0 * u - 1.0) * amp).to_f32()
        })
        .collect()
}

pub(crate) fn to_bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Uploads f32 values as bf16.
pub(crate) fn up(be: &CudaBackend, v: &[f32]) -> Result<DeviceBuffer<bf16>> {
    Ok(DeviceBuffer::from_host(be, &to_bf(v))?)
}

/// Downloads bf16 values as f32.
pub(crate) fn down(b: &DeviceBuffer<bf16>) -> Result<Vec<f32>> {
    Ok(b.to_host()?.iter().map(|x| x.to_f32()).collect())
}

/// Downloads f32 values.
pub(crate) fn down32(b: &DeviceBuffer<f32>) -> Result<Vec<f32>> {
    Ok(b.to_host()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_unique_and_select_checks_them() {
        let mut names: Vec<&str> = GROUPS.iter().map(|g| g.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), GROUPS.len());
        assert_eq!(select(None).unwrap().len(), GROUPS.len());
        let two = select(Some(&["moe".into(), "gemm".into()])).unwrap();
        assert_eq!(two.iter().map(|g| g.name).collect::<Vec<_>>(), ["gemm", "moe"], "run order");
        assert!(select(Some(&["nope".into()])).unwrap_err().contains("unknown group 'nope'"));
    }

    #[test]
    fn every_model_group_exists() {
        let mut c = crate::nn::ModelConfig::preset("tiny").unwrap();
        c.attn_pattern = "WSD".into();
        c.moe.n_routed_experts = 8;
        for g in groups_for_model(&c) {
            assert!(GROUPS.iter().any(|x| x.name == g), "{g}");
        }
    }

    #[test]
    fn summary_line_counts_rows() {
        let row = |s| Row {
            group: "g".into(),
            check: "c".into(),
            shape: "-".into(),
            margin: None,
            rel_err: None,
            rel_bound: None,
            status: s,
            note: String::new(),
        };
        let mut r = Report {
            device: None,
            compute_capability: None,
            commit: None,
            quick: true,
            groups: vec![],
            no_device: None,
            rows: vec![row(Status::Pass), row(Status::Fail), row(Status::Skip), row(Status::Pass)],
            checks: 0,
            passed: 0,
            failed: 0,
            skipped: 0,
        };
        r.count();
        assert_eq!(r.summary_line(), "selftest: 4 checks, 2 PASS, 1 FAIL, 1 SKIP");
        assert!(format_row(&r.rows[1]).contains("FAIL"));
    }
}
