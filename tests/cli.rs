//! The `nanoseek` binary: bad input gives a clear error, a non-zero exit and no partial files.

use std::path::Path;
use std::process::{Command, Output};

/// A one-layer model small enough that every command finishes in a moment.
const MODEL: &[&str] =
    &["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "2"];
const RUN: &[&str] = &["--num-iterations", "2", "--sample-tokens", "0", "--quiet", "--device", "cpu"];

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `train` with `extra` flags and expects failure with `needle` in the message.
fn fails(dir: &Path, extra: &[&str], needle: &str) -> String {
    let mut args = vec!["train"];
    args.extend_from_slice(extra);
    let o = nanoseek(&args, dir);
    let e = stderr(&o);
    assert!(!o.status.success(), "expected failure for {extra:?}");
    assert!(e.contains(needle), "for {extra:?} expected '{needle}' in: {e}");
    assert!(e.starts_with("error:") || e.contains("\nerror:"), "message should start with 'error:': {e}");
    e
}

fn micro(extra: &[&str]) -> Vec<String> {
    MODEL.iter().chain(RUN).chain(extra).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[test]
fn info_prints_parameter_counts() {
    let dir = tempfile::tempdir().unwrap();
    let o = nanoseek(&["info", "--model-size", "small"], dir.path());
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("total") && out.contains("85M"), "{out}");
}

#[test]
fn bad_configuration_is_rejected_before_any_file_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(d, &["--model-size", "huge"], "unknown model size 'huge'");
    fails(d, &strs(&micro(&["--total-batch-size", "100"])), "not a multiple");
    fails(d, &strs(&micro(&["--n-kv-head", "3"])), "n_kv_head");
    fails(d, &strs(&micro(&["--warmup-ratio", "0.9", "--warmdown-ratio", "0.5"])), "warmup_ratio");
    fails(d, &strs(&micro(&["--device", "tpu"])), "unknown device");
    fails(d, &strs(&micro(&["--device", "cuda"])), "--device cuda");
    std::fs::write(d.join("bad.toml"), "n_layer = \"four\"\n").unwrap();
    fails(d, &strs(&micro(&["--config", "bad.toml"])), "bad.toml");
    std::fs::write(d.join("unknown.json"), "{\"n_layers\": 4}").unwrap();
    fails(d, &strs(&micro(&["--config", "unknown.json"])), "n_layers");
    fails(d, &strs(&micro(&["--resume-from-step", "5"])), "--run");
    // a model far larger than this machine: refused before anything is allocated
    let e = fails(d, &["--model-size", "full", "--quiet"], "out of memory");
    assert!(e.contains("GiB") && e.contains("--grad-checkpoint"), "{e}");
    assert!(!d.join("runs").exists(), "no run directory may be created for bad input");
}

/// Writes a nanoseek token shard by hand (so it can hold ids the writer would refuse).
fn raw_shard(path: &Path, vocab: u64, tokens: &[u16]) {
    let mut b = b"NSEEKTOK".to_vec();
    b.extend(1u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    b.extend(vocab.to_le_bytes());
    b.extend((tokens.len() as u64).to_le_bytes());
    tokens.iter().for_each(|t| b.extend(t.to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

#[test]
fn bad_data_is_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good: Vec<u16> = (0..4000).map(|i| (i % 100) as u16).collect();
    raw_shard(&d.join("big_vocab.bin"), 5000, &good);
    fails(d, &strs(&micro(&["--data", "big_vocab.bin", "--vocab-size", "128"])), "exceeds the model's vocab_size 128");
    let mut bad = good.clone();
    bad[1234] = 200;
    raw_shard(&d.join("bad_id.bin"), 128, &bad);
    fails(d, &strs(&micro(&["--data", "bad_id.bin", "--vocab-size", "128"])), "token id 200 at position 1234");
    raw_shard(&d.join("ok.bin"), 128, &good);
    let mut bytes = std::fs::read(d.join("ok.bin")).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(d.join("truncated.bin"), &bytes).unwrap();
    fails(d, &strs(&micro(&["--data", "truncated.bin", "--vocab-size", "128"])), "truncated");
    std::fs::write(d.join("magic.bin"), b"GARBAGE!0000000000000000000000000000").unwrap();
    fails(d, &strs(&micro(&["--data", "magic.bin"])), "not a nanoseek token shard");
    fails(d, &strs(&micro(&["--data", "missing.bin"])), "missing.bin");
    assert!(!d.join("runs").exists(), "no run directory may be created for bad data");
    // and the good shard trains
    let o = nanoseek(
        &["train", &micro(&["--data", "ok.bin", "--vocab-size", "128", "--run", "ok"]).join(" ")]
            .join(" ")
            .split(' ')
            .collect::<Vec<_>>(),
        d,
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn corrupt_or_truncated_checkpoints_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = nanoseek(
        &strs(
            &[vec!["train".to_string()], micro(&["--run", "r", "--num-iterations", "4", "--save-every", "2"])].concat(),
        ),
        d,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = d.join("runs/r/checkpoints/step_000002");
    let weights = ck.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();

    std::fs::write(&weights, &original[..original.len() / 2]).unwrap();
    let e = fails(d, &["--run", "r", "--resume-from-step", "2", "--quiet"], "corrupt checkpoint");
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
    fails(d, &["--run", "r", "--resume-from-step", "2", "--quiet"], "corrupt checkpoint");
    std::fs::write(&weights, &original).unwrap();
    std::fs::write(ck.join("state.json"), "{\"step\": ").unwrap();
    fails(d, &["--run", "r", "--resume-from-step", "2", "--quiet"], "state.json");
    fails(d, &["--run", "r", "--resume-from-step", "3", "--quiet"], "no checkpoint");
    // the failed resumes wrote nothing: the newest checkpoint and metrics are untouched
    let steps: Vec<_> = std::fs::read_dir(d.join("runs/r/checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let mut steps = steps;
    steps.sort();
    assert_eq!(steps, vec!["step_000002", "step_000004"]);
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_no_half_written_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = fails(
        d,
        &strs(&micro(&[
            "--run",
            "nan",
            "--num-iterations",
            "6",
            "--embedding-lr",
            "1e30",
            "--matrix-lr",
            "1e30",
            "--grad-clip",
            "0",
        ])),
        "became",
    );
    assert!(e.contains("step"), "{e}");
    let ck = d.join("runs/nan/checkpoints");
    assert!(
        !ck.exists() || std::fs::read_dir(&ck).unwrap().count() == 0,
        "no checkpoint may be written for a diverged run"
    );
}

#[test]
fn profile_and_info_report_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = vec!["profile"];
    args.extend_from_slice(MODEL);
    args.extend_from_slice(&["--steps", "1", "--grad-checkpoint", "1", "--output", "p.json"]);
    let o = nanoseek(&args, d);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("linear")
            && out.contains("update (Muon+AdamW)")
            && out.contains("MFU")
            && out.contains("peak memory"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("p.json")).unwrap()).unwrap();
    assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0 && json["peak_memory_mib"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(d.join("p.svg")).unwrap().starts_with("<svg"));
    let o = nanoseek(&["info", "--model-size", "tiny", "--device-batch-size", "4", "--grad-checkpoint", "1"], d);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("activations") && out.contains("KV cache"), "{out}");
    let o = nanoseek(&["info", "--all"], d);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("xlarge"));
}

#[test]
fn gemm_engine_flag_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(d, &strs(&micro(&["--gemm", "cublas"])), "invalid value 'cublas'");
    // selecting cuBLASLt where its library cannot be loaded is a clear error (elsewhere it trains)
    if nanoseek::backend::cuda::cublaslt::available().is_err() {
        fails(d, &strs(&micro(&["--gemm", "cublaslt"])), "cuBLASLt is not available");
        assert!(std::fs::read_dir(d).unwrap().next().is_none(), "no files before the error");
    }
}
