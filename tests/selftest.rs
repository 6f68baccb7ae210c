//! `nanoseek selftest` as a user (and scripts/gpu-check.sh) runs it: the exit codes (0 pass, 1 a
//! FAIL, 2 bad arguments, 77 no CUDA device), `--list`, the JSON report, `--write-reference`.

use std::path::Path;
use std::process::{Command, Output};

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn has_device() -> bool {
    nanoseek::backend::cuda::CudaBackend::new(0).is_ok()
}

#[test]
fn without_a_device_it_skips_with_77_and_still_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let o = nanoseek(&["selftest", "--quick", "--only", "smoke", "--output", "report.json"], dir.path());
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["quick"], true);
    assert_eq!(report["groups"], serde_json::json!(["smoke"]));
    if has_device() {
        assert_eq!(o.status.code(), Some(0), "smoke on a device: {out}{err}");
        let last = out.lines().last().unwrap_or_default();
        assert!(last.starts_with("selftest: ") && last.contains(" PASS, 0 FAIL, "), "{out}");
        assert_eq!(report["result"], "PASS");
        assert!(report["rows"].as_array().unwrap().iter().all(|r| r["status"] == "PASS"));
        return;
    }
    assert_eq!(o.status.code(), Some(77), "{out}{err}");
    let line = out.lines().find(|l| l.starts_with("selftest: SKIP: no CUDA device (")).expect(&out);
    assert!(line.ends_with(')'), "{line}");
    assert_eq!(out.lines().last(), Some(line), "the SKIP line is the last line on stdout");
    assert_eq!(report["result"], "SKIP");
    assert!(report["no_device"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(report["rows"], serde_json::json!([]));
    // no temporary file left beside the report
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["report.json"], "{names:?}");
    // the plain command, every group
    let o = nanoseek(&["selftest"], dir.path());
    assert_eq!(o.status.code(), Some(77));
    assert!(text(&o.stdout).starts_with("selftest: SKIP: no CUDA device ("), "{}", text(&o.stdout));
}

#[test]
fn list_prints_every_group_with_a_description() {
    let o = nanoseek(&["selftest", "--list"], Path::new("."));
    assert_eq!(o.status.code(), Some(0));
    let out = text(&o.stdout);
    let names: Vec<&str> = out.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    let want: Vec<&str> = nanoseek::selftest::GROUPS.iter().map(|g| g.name).collect();
    assert_eq!(names, want);
    for must in ["smoke", "gemm", "cublaslt", "wgmma", "epilogues", "attention", "window", "rope", "norm"] {
        assert!(names.contains(&must), "{must}");
    }
    for must in ["swiglu", "embedding", "loss", "optim", "elementwise", "dsa", "moe", "kernels_api"] {
        assert!(names.contains(&must), "{must}");
    }
    assert!(names.contains(&"train_step") && names.contains(&"train_step_all_kinds"));
    assert!(out.lines().all(|l| l.split_whitespace().count() > 2), "each line has a description:\n{out}");
}

#[test]
fn bad_arguments_exit_2_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (&["selftest", "--device", "cpu"][..], "cuda or cuda:N"),
        (&["selftest", "--device", "cuda:x"][..], "cuda or cuda:N"),
        (&["selftest", "--only", "gemm,nope"][..], "unknown group 'nope'"),
        (&["selftest", "--only", ""][..], "--only needs group names"),
        (&["selftest", "--only", "gemm,"][..], "--only needs group names"),
        (&["selftest", "--bogus"][..], "--bogus"),
        (&["selftest", "--quick=3"][..], "quick"),
    ] {
        let o = nanoseek(args, dir.path());
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "{args:?} wrote a file");
    }
}

#[test]
fn write_reference_needs_no_device_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let o = nanoseek(&["selftest", "--write-reference", "ref.safetensors"], dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("wrote the train_step reference"));
    let read = nanoseek::selftest::train::read_reference(&dir.path().join("ref.safetensors")).unwrap();
    assert_eq!(read, nanoseek::selftest::train::reference_cpu().unwrap(), "the file holds what the CPU computes");
    // an unwritable place is an error, not a panic
    let o = nanoseek(&["selftest", "--write-reference", "no/such/dir/ref.safetensors"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).starts_with("error:"), "{}", text(&o.stderr));
}
