//! CUDA kernels against their CPU twins (`src/backend/cpu/`), forward and backward: thin
//! wrappers over `nanoseek::selftest` (the library module behind `nanoseek selftest`, which holds
//! the one copy of the parity checks), one test per group, each asserting that every row of its
//! group passed; plus the tests of the device API that are not parity (allocator, out of memory,
//! the embedded PTX, the kernel-name guard, opening a device).
//!
//! Every test needs a CUDA device: without one it prints a loud
//! `SKIPPED: no CUDA device (reason)` line on stderr (not captured by the test
//! harness) and returns, so `cargo test` passes on machines without a GPU.
//!
//! Method and tolerances: the error model in the `nanoseek::selftest` module doc. Inputs are
//! rounded to bf16 first, the CPU reference runs in f32 on exactly those values, and every GPU
//! tensor is compared element-wise (|gpu − cpu| ≤ atol + rtol·|cpu|) **and** by its relative
//! error norm (‖gpu − cpu‖₂/‖cpu‖₂ ≤ a bound from the bf16 unit roundoff u = 2⁻⁸: one rounding
//! 2u, the flash attention's rounded P and dS 3u, f32 math by its summation order); every kernel
//! runs twice on the same input (bitwise equal, or at f32 tolerance where it adds with atomics);
//! the training steps compare every parameter's gradient. The host tests in the module prove
//! that these tolerances pass a bf16-faithful emulation of the kernels and fail corrupted
//! results (all-zero or halved dq, a zeroed tile, swapped heads, an off-by-one mask).

use half::bf16;
use nanoseek::backend::cuda::{self, CudaBackend, DeviceBuffer};
use nanoseek::selftest::{self, Options, Status};
use std::io::Write;

// The API tests of the window and kernel-API families (their parity checks are selftest groups).
#[path = "cuda/kernels_api.rs"]
mod kernels_api;
#[path = "cuda/window_attention.rs"]
mod window_attention;

/// One write straight to stderr (the harness captures only the print macros).
fn skipped(why: &str, test: &str) {
    let line = format!("SKIPPED: no CUDA device ({why}) [{test}]\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn device(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(why) => {
            skipped(&why.0, test);
            None
        }
    }
}

/// Runs selftest group `name` (full shapes) on device 0 and asserts that no row failed; the
/// table goes to stderr (shown with `--nocapture` or on failure).
fn group_passes(name: &str) {
    let opts = Options { only: Some(vec![name.to_string()]), ..Options::default() };
    let report = selftest::run(&opts).unwrap();
    if let Some(why) = &report.no_device {
        skipped(why, name);
        return;
    }
    eprintln!("{}", selftest::header());
    for row in &report.rows {
        eprintln!("{}", selftest::format_row(row));
    }
    eprintln!("{}", report.summary_line());
    let failed: Vec<String> =
        report.rows.iter().filter(|r| r.status == Status::Fail).map(selftest::format_row).collect();
    assert!(failed.is_empty(), "selftest group {name}: {} failed:\n{}", failed.len(), failed.join("\n"));
    assert!(report.checks > 0, "selftest group {name} ran no check");
}

macro_rules! group_tests {
    ($($test:ident => $group:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                group_passes($group);
            }
        )*
    };
}

group_tests! {
    smoke_axpby_matches_cpu => "smoke",
    gemm_matches_cpu_all_layouts => "gemm",
    cublaslt_gemm_matches_cpu_all_layouts => "cublaslt",
    wgmma_gemm_matches_cpu_all_layouts => "wgmma",
    gemm_fused_epilogues_match_cpu_on_every_engine => "epilogues",
    attention_matches_cpu => "attention",
    window_attention_matches_cpu => "window",
    rope_and_rope_qknorm_match_cpu => "rope",
    rmsnorm_matches_cpu => "norm",
    swiglu_matches_cpu => "swiglu",
    embedding_matches_cpu => "embedding",
    softcap_cross_entropy_matches_cpu => "loss",
    adamw_clip_and_muon_match_cpu => "optim",
    axpby_matches_cpu => "elementwise",
    dsa_matches_cpu => "dsa",
    moe_matches_cpu => "moe",
    kernels_api_matches_cpu => "kernels_api",
    cuda_tape_tracks_the_cpu_tape_dense_with_and_without_checkpointing => "train_step",
    cuda_tape_tracks_the_cpu_tape_on_every_layer_kind_with_and_without_checkpointing => "train_step_all_kinds",
    cuda_tape_tracks_the_cpu_tape_with_mtp_modules => "train_step_mtp",
    cuda_tape_tracks_the_cpu_tape_with_mla_on_every_attention_kind => "train_step_mla",
    zero1_step_over_nccl_at_world_size_1_tracks_the_single_process_step => "nccl_world1",
}

#[test]
fn allocator_reuses_blocks_and_tracks_peak() {
    let Some(be) = device("allocator") else { return };
    let before = be.memory_stats();
    {
        let _a = DeviceBuffer::<f32>::uninit(&be, 1 << 20).unwrap();
        let _b = DeviceBuffer::<f32>::uninit(&be, 1000).unwrap();
        assert_eq!(be.memory_stats().current, before.current + (4 << 20) + 4096);
    }
    let mid = be.memory_stats();
    assert_eq!(mid.current, before.current);
    assert!(mid.peak >= before.current + (4 << 20) + 4096);
    let _c = DeviceBuffer::<f32>::uninit(&be, 1 << 20).unwrap();
    assert_eq!(be.memory_stats().driver_allocs, mid.driver_allocs, "the cached block is reused");
}

#[test]
fn allocator_counts_by_category() {
    use nanoseek::memory::Category;
    let Some(be) = device("allocator_categories") else { return };
    let at = |c: Category| be.memory_by_category().report.current[c as usize];
    let base = be.memory_by_category().report.current;
    let w = DeviceBuffer::<f32>::uninit_in(&be, 1 << 20, Category::Parameters).unwrap();
    let a = be.with_category(Category::Activations, || DeviceBuffer::<bf16>::uninit(&be, 1000).unwrap());
    let t = DeviceBuffer::<f32>::uninit(&be, 100).unwrap(); // no scope: workspace
    assert_eq!(at(Category::Parameters), base[0] + (4 << 20));
    assert_eq!(at(Category::Activations), base[3] + 2048);
    assert_eq!(at(Category::Workspace), base[4] + 512);
    {
        let _g = be.scoped(Category::OptimizerState);
        let _s = DeviceBuffer::<f32>::zeros(&be, 10).unwrap();
        assert_eq!(at(Category::OptimizerState), base[2] + 512);
    }
    assert_eq!(at(Category::OptimizerState), base[2], "the scope's buffer dropped");
    a.set_category(Category::Gradients);
    assert_eq!((at(Category::Activations), at(Category::Gradients)), (base[3], base[1] + 2048));
    let peak = be.memory_by_category();
    assert!(peak.report.peak_total >= peak.report.current_total());
    drop((w, a, t));
    assert_eq!(be.memory_by_category().report.current, base, "everything went back");
}

#[test]
fn out_of_memory_is_an_error_not_a_crash() {
    let Some(be) = device("out_of_memory") else { return };
    // 64 TiB: more than any device holds; the allocator releases its cache, retries, and explains.
    let e = DeviceBuffer::<f32>::uninit(&be, 1 << 44).err().expect("a 64 TiB allocation must fail").to_string();
    for part in [
        "CUDA out of memory",
        "allocating 65536.00 GiB",
        "in use",
        "free of",
        "--device-batch-size",
        "--grad-checkpoint",
    ] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    // The backend still works afterwards.
    let b = DeviceBuffer::<f32>::from_host(&be, &[1.0, 2.0]).unwrap();
    assert_eq!(b.to_host().unwrap(), vec![1.0, 2.0]);
    // And the pre-flight check refuses a run that cannot fit, with the same advice.
    let e = cuda::check_fits(&be, 1 << 50, "a test run").unwrap_err().to_string();
    assert!(e.contains("a test run") && e.contains("--device-batch-size"), "{e}");
    cuda::check_fits(&be, 1 << 20, "a small run").unwrap();
}

#[test]
fn every_family_has_ptx_for_both_targets() {
    // Runs everywhere: the embedded PTX list is complete.
    let families = [
        "attention",
        "dsa",
        "elementwise",
        "embedding",
        "gemm",
        "loss",
        "moe",
        "norm",
        "optim",
        "rope",
        "swiglu",
        "window_attention",
    ];
    for fam in families {
        for target in ["sm_90a", "sm_80"] {
            let text = cuda::embedded_ptx(fam, target).unwrap_or_else(|e| panic!("{e}"));
            assert!(text.contains(&format!(".target {target}")), "{fam}: wrong target");
            assert!(text.contains(".version 9.0"), "{fam}: PTX ISA must be 9.0 (CUDA 13.0 driver)");
        }
    }
    assert_eq!(cuda::ptx_target((9, 0)), "sm_90a");
    assert_eq!(cuda::ptx_target((8, 9)), "sm_80");
    assert_eq!(cuda::ptx_target((10, 0)), "sm_80");
}

/// The kernel names the launch code asks for, checked against the embedded PTX on the host (a
/// misspelt name would otherwise only show on a GPU): in each `src/backend/cuda/<family>.rs`,
/// every string literal that looks like a kernel name (a `_f32`, `_bf16`, `_d64`, `_d128`,
/// `_fwd`, `_bwd` or `_decode` part, and not the name of one of the module's Rust functions,
/// which its error messages quote) must be an `.entry` of that family's PTX for both targets,
/// and every `.entry` of the family must be named there.
#[test]
fn every_launched_kernel_name_is_in_the_ptx() {
    // The launch modules are read at compile time, so the test runs where the source tree is absent.
    let mut listed: Vec<&str> = LAUNCH_MODULE_SOURCES.iter().map(|(fam, _)| *fam).collect();
    listed.sort();
    let mut built: Vec<&str> = cuda::KERNEL_FAMILIES.to_vec();
    built.sort();
    assert_eq!(listed, built, "LAUNCH_MODULE_SOURCES must name every cuda/*.cu family");
    for &(fam, src) in LAUNCH_MODULE_SOURCES {
        let literals: std::collections::BTreeSet<&str> = src
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .collect();
        // the launch module's own function names appear in its error messages, not as kernels
        let rust_fns: std::collections::BTreeSet<&str> =
            src.split("fn ").skip(1).filter_map(|rest| rest.split(['(', '<']).next()).collect();
        let kernel_like = |l: &str| {
            !rust_fns.contains(l)
                && l.split('_').any(|p| ["f32", "bf16", "d64", "d128", "fwd", "bwd", "decode"].contains(&p))
        };
        for target in ["sm_90a", "sm_80"] {
            let ptx = cuda::embedded_ptx(fam, target).unwrap();
            let entries: std::collections::BTreeSet<&str> = ptx
                .split(".entry ")
                .skip(1)
                .map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap())
                .collect();
            assert!(!entries.is_empty(), "{fam} {target}: no .entry in the PTX");
            for l in literals.iter().filter(|l| kernel_like(l) || entries.contains(*l)) {
                assert!(entries.contains(l), "src/backend/cuda/{fam}.rs names {l:?}, not a kernel of {fam} ({target})");
            }
            for e in &entries {
                assert!(
                    literals.contains(e),
                    "{fam} ({target}) has kernel {e} that src/backend/cuda/{fam}.rs never names"
                );
            }
        }
    }
}

/// Each kernel family's launch module (src/backend/cuda/<family>.rs), embedded at compile time.
const LAUNCH_MODULE_SOURCES: &[(&str, &str)] = &[
    ("attention", include_str!("../src/backend/cuda/attention.rs")),
    ("dsa", include_str!("../src/backend/cuda/dsa.rs")),
    ("elementwise", include_str!("../src/backend/cuda/elementwise.rs")),
    ("embedding", include_str!("../src/backend/cuda/embedding.rs")),
    ("gemm", include_str!("../src/backend/cuda/gemm.rs")),
    ("loss", include_str!("../src/backend/cuda/loss.rs")),
    ("moe", include_str!("../src/backend/cuda/moe.rs")),
    ("norm", include_str!("../src/backend/cuda/norm.rs")),
    ("optim", include_str!("../src/backend/cuda/optim.rs")),
    ("rope", include_str!("../src/backend/cuda/rope.rs")),
    ("swiglu", include_str!("../src/backend/cuda/swiglu.rs")),
    ("window_attention", include_str!("../src/backend/cuda/window_attention.rs")),
];

#[test]
fn no_device_is_an_error_not_a_panic() {
    // With a device this opens it; without one it must return the reason.
    match CudaBackend::new(0) {
        Ok(be) => assert!(be.compute_capability().0 >= 8),
        Err(why) => {
            skipped(&why.0, "open");
            assert!(!why.0.is_empty());
        }
    }
    assert!(CudaBackend::new(1 << 20).is_err());
}
