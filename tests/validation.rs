//! Bad input is refused before anything is written, with `error:` and a non-zero exit: never a
//! panic, a hang or a half-made folder; `--output` never replaces what is not a regular file.

mod common;

use nanoseek::data::shard::write_shard;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A one-layer model, 2 steps on the CPU, quietly.
fn model() -> Vec<&'static str> {
    let tail = ["--num-iterations", "2", "--sample-tokens", "0", "--quiet", "--device", "cpu"];
    [&["--n-layer", "1"][..], common::SMALL_MODEL_FLAGS, &tail].concat()
}

fn nanoseek(args: &[&str], cwd: &Path, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanoseek"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nanoseek");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn refused(o: &Output, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a refusal with '{needle}': {e}");
    assert!(e.contains("error:") && e.contains(needle), "expected 'error: …{needle}…' in: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

fn train(cwd: &Path, run: &str, extra: &[&str]) -> Output {
    let mut a = vec!["train", "--run", run];
    a.extend(model());
    a.extend_from_slice(extra);
    nanoseek(&a, cwd, b"")
}

#[test]
fn bad_train_input_is_refused_before_the_run_directory_exists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A shard whose held-out validation part is shorter than one batch.
    let ids: Vec<u32> = (0..200).map(|i| i % 50).collect();
    write_shard(&d.join("short.bin"), &ids, 64).unwrap();
    // A data folder whose tokenizer.json is garbage, and one whose tokenizer is too big for the model.
    std::fs::create_dir(d.join("badtok")).unwrap();
    let long: Vec<u32> = (0..20_000).map(|i| i % 50).collect();
    write_shard(&d.join("badtok/train.bin"), &long, 64).unwrap();
    std::fs::write(d.join("badtok/tokenizer.json"), b"{\"not\": \"a tokenizer\"").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--data", "short.bin", "--vocab-size", "64"], "validation data is shorter"),
        (&["--data", "badtok", "--vocab-size", "64"], "tokenizer"),
        (&["--device-batch-size", "4611686018427387904"], "device_batch_size"),
        (&["--device-batch-size", "288230376151711745"], "device_batch_size"),
        (&["--n-layer", "1099511627776"], "n_layer"),
        (&["--n-routed-experts", "4", "--expert-capacity-factor", "nan"], "expert_capacity_factor"),
        (&["--matrix-lr", "nan"], "matrix_lr"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let run = format!("r{i}");
        refused(&train(d, &run, extra), needle);
        assert!(!d.join("runs").join(&run).exists(), "{extra:?} left runs/{run} behind");
    }
    refused(&train(d, "", &[]), "--run");
    assert!(!d.join("runs").join(".lock").exists(), "--run '' must not write into the runs folder");
}

#[test]
fn resumed_settings_and_state_go_through_the_same_validation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train(d, "r", &["--save-every", "1", "--num-iterations", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = d.join("runs/r/config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    for (field, value, needle) in [("ns_steps", "1000000000", "ns_steps"), ("adam_eps", "0.0", "adam_eps")] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v["train"]["optim"][field] = serde_json::from_str(value).unwrap();
        std::fs::write(&config, v.to_string()).unwrap();
        refused(&nanoseek(&["train", "--run", "r", "--resume-from-step", "2", "--quiet"], d, b""), needle);
    }
    std::fs::write(&config, &original).unwrap();
    // state.json of step 2 copied into step 1's folder (checksums copied along, so they agree)
    let ck = |s: u64| nanoseek::train::checkpoint::checkpoint_dir(&d.join("runs/r"), s);
    for f in ["state.json", "checksums.json"] {
        std::fs::copy(ck(2).join(f), ck(1).join(f)).unwrap();
    }
    let o = nanoseek(&["train", "--run", "r", "--resume-from-step", "1", "--quiet"], d, b"");
    refused(&o, "does not match its folder");
}

#[test]
fn outputs_replace_only_regular_files_and_follow_links() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train(d, "r", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eval = |out: &str| {
        nanoseek(
            &["eval", "--model-path", "runs/r", "--eval-tokens", "64", "--batch-size", "1", "--output", out],
            d,
            b"",
        )
    };
    // a folder, a FIFO and a device are refused and left as they were
    std::fs::create_dir(d.join("folder")).unwrap();
    refused(&eval("folder"), "folder");
    assert!(d.join("folder").is_dir());
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    refused(&eval(fifo.to_str().unwrap()), "not a regular file");
    refused(&eval("/dev/null"), "not a regular file");
    // a symlink stays a link; its target gets the new content
    std::fs::write(d.join("target.json"), b"old").unwrap();
    std::os::unix::fs::symlink("target.json", d.join("link.json")).unwrap();
    let o = eval("link.json");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(d.join("link.json")).unwrap().file_type().is_symlink());
    assert!(std::fs::read_to_string(d.join("target.json")).unwrap().contains("\"loss\""));
}

#[test]
fn hangs_and_panics_of_the_other_commands_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train(d, "r", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    refused(&nanoseek(&["eval", "--model-path", "runs/r", "--batch-size", "0"], d, b""), "--batch-size");
    // ids at or past the model's vocabulary (0xFFFFFFFF as the last target included) are refused
    let mut ids: Vec<u32> = (0..400).map(|i| i % 50).collect();
    *ids.last_mut().unwrap() = u32::MAX;
    write_shard(&d.join("wide.bin"), &ids, 1 << 32).unwrap();
    refused(&nanoseek(&["eval", "--model-path", "runs/r", "--data", "wide.bin"], d, b""), "vocabulary");
    // the same ids under a header that declares the model's vocabulary: the id scan refuses them
    let mut raw = std::fs::read(d.join("wide.bin")).unwrap();
    raw[16..24].copy_from_slice(&4096u64.to_le_bytes());
    std::fs::write(d.join("bad-id.bin"), raw).unwrap();
    refused(&nanoseek(&["eval", "--model-path", "runs/r", "--data", "bad-id.bin"], d, b""), "out of range");
    let demo = |extra: &[&str], stdin: &[u8]| {
        let mut a = vec!["demo", "--model-path", "runs/r", "--max-new-tokens", "2"];
        a.extend_from_slice(extra);
        nanoseek(&a, d, stdin)
    };
    refused(&demo(&["--mode", "test", "--max-seq-len", "100000"], b""), "--max-seq-len");
    refused(&demo(&["--temperature", "nan"], b""), "--temperature");
    refused(&demo(&["--top-p", "nan"], b""), "--top-p");
    refused(&demo(&["--top-p", "0"], b""), "--top-p");
    // one line that is not UTF-8 is reported; the lines after it are still answered
    let o = demo(&["--mode", "batch"], b"the\n\xff\xfe\nthe\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[1]["error"].as_str().unwrap().contains("UTF-8"));
    let o = demo(&[], b"\xff\xfe\n/quit\n");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not valid UTF-8"));
    // info into a full device: an error, not a panic
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nanoseek")).arg("info").stdout(full).output().unwrap();
    refused(&o, "cannot write to standard output");
}
