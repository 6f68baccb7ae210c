//! A newcomer's first hour (issue 16): data, eval, resume and configuration do what a user
//! means, each shown through the binary where a user meets it.

use nanoseek::data::shard::{write_llmc_shard, write_shard, TokenShard};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const MODEL: &[&str] =
    &["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "2"];
const RUN: &[&str] = &["--num-iterations", "2", "--sample-tokens", "0", "--quiet", "--device", "cpu"];

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek")
}

fn ok(args: &[&str], cwd: &Path) -> Output {
    let o = nanoseek(args, cwd);
    assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn fails(args: &[&str], cwd: &Path, needle: &str) {
    let o = nanoseek(args, cwd);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(e.contains("error:") && e.contains(needle), "{args:?}: expected '{needle}' in {e}");
}

/// `train` of the micro model with `extra` flags.
fn train(cwd: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train"];
    args.extend(MODEL.iter().chain(RUN).chain(extra));
    ok(&args, cwd)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A nanoseek shard of `n` ids below 64 with a learnable pattern.
fn small_shard(path: &Path, n: usize) {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + i / 5) % 64).collect();
    write_shard(path, &ids, 64).unwrap();
}

#[test]
fn llmc_shard_builds_a_model_of_its_own_vocabulary_and_vocab_size_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<u16> = (0..3000u16).map(|i| (i * 13) % 300).collect(); // max id 299
    write_llmc_shard(&d.join("llmc.bin"), &ids).unwrap();
    train(d, &["--data", "llmc.bin", "--run", "derived"]);
    assert_eq!(json(&d.join("runs/derived/config.json"))["model"]["vocab_size"], 320); // 300 rounded up to 64
    train(d, &["--data", "llmc.bin", "--run", "given", "--vocab-size", "4096"]);
    assert_eq!(json(&d.join("runs/given/config.json"))["model"]["vocab_size"], 4096);
    fails(
        &["train", "--data", "llmc.bin", "--vocab-size", "256", "--num-iterations", "1", "--quiet"],
        d,
        "out of range",
    );
    // a headerless nanoGPT file gets a hint
    std::fs::write(d.join("raw.bin"), vec![1u8; 4096]).unwrap();
    fails(&["train", "--data", "raw.bin", "--quiet"], d, "headerless nanoGPT");
}

#[test]
fn eval_and_resume_follow_the_runs_own_data_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_shard(&d.join("s.bin"), 4000);
    train(d, &["--data", "s.bin", "--run", "r"]);
    let cfg = json(&d.join("runs/r/config.json"));
    let data = cfg["train"]["data"].as_str().unwrap().to_string();
    assert!(Path::new(&data).is_absolute(), "{data}");
    assert_eq!(Path::new(&data), std::fs::canonicalize(d.join("s.bin")).unwrap());

    // From another folder: eval with no --data scores the run's held-out tail, as --data s.bin does.
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = ok(&["eval", "--model-path", "../runs/r", "--batch-size", "2"], &elsewhere);
    assert!(String::from_utf8_lossy(&o.stderr).contains("the run's own data"));
    let default = stdout_json(&o);
    let o = ok(&["eval", "--model-path", "runs/r", "--data", "s.bin", "--batch-size", "2"], d);
    let explicit = stdout_json(&o);
    assert_eq!(Path::new(default["data"].as_str().unwrap()), std::fs::canonicalize(d.join("s.bin")).unwrap());
    assert_eq!((&default["loss"], &default["tokens"]), (&explicit["loss"], &explicit["tokens"]));
    // the tail train held out is 200 tokens (5% of 4000): three windows of 2 × 32, not the 95% trained on
    assert_eq!(explicit["tokens"], 192);

    // The checkpoint's own file names its checkpoint.
    let o = ok(
        &[
            "eval",
            "--model-path",
            "runs/r/checkpoints/step_000002/model.safetensors",
            "--data",
            "s.bin",
            "--batch-size",
            "2",
        ],
        d,
    );
    assert!(stdout_json(&o)["loss"].as_f64().unwrap().is_finite());

    // Resume from another folder; a --data given on resume is used (and recorded).
    std::fs::copy(d.join("s.bin"), d.join("moved.bin")).unwrap();
    ok(
        &[
            "train",
            "--run",
            "r",
            "--runs-dir",
            "../runs",
            "--resume-from-step",
            "2",
            "--num-iterations",
            "3",
            "--data",
            "../moved.bin",
            "--quiet",
            "--device",
            "cpu",
            "--sample-tokens",
            "0",
        ],
        &elsewhere,
    );
    let cfg = json(&d.join("runs/r/config.json"));
    assert_eq!(Path::new(cfg["train"]["data"].as_str().unwrap()), std::fs::canonicalize(d.join("moved.bin")).unwrap());

    // Data of a larger vocabulary than the model's is refused on resume, saying why.
    write_shard(&d.join("wide.bin"), &(0..4000u32).map(|i| i % 128).collect::<Vec<_>>(), 128).unwrap();
    fails(
        &["train", "--run", "r", "--resume-from-step", "3", "--num-iterations", "4", "--data", "wide.bin", "--quiet"],
        d,
        "data made with the run's tokenizer",
    );

    // Data the run no longer finds: a warning says what is scored instead.
    std::fs::remove_file(d.join("moved.bin")).unwrap();
    let o = nanoseek(&["eval", "--model-path", "runs/r"], d);
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: the run was trained on"));
}

#[test]
fn demo_test_says_why_it_skips_synthetic_tasks_on_a_model_of_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = (0..300).map(|i| format!("line {i} of a small corpus, word{}.\n", i % 17)).collect();
    std::fs::write(d.join("one.txt"), text).unwrap();
    ok(&["data", "--input", "one.txt", "--output", "txt", "--vocab-size", "300", "--quiet"], d);
    // vocab 4096 would hold the synthetic tasks' ids: only the data says they do not apply
    train(d, &["--data", "txt", "--run", "r", "--vocab-size", "4096"]);
    let o = ok(&["demo", "--model-path", "runs/r", "--mode", "test", "--max-new-tokens", "4"], d);
    let r = stdout_json(&o);
    assert!(r["tasks"].is_null(), "{r}");
    assert!(r["tasks_skipped"].as_str().unwrap().contains("synthetic language"), "{r}");
}

#[test]
fn config_file_values_are_kept_and_derived_like_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = |run: &str| json(&d.join("runs").join(run).join("config.json"))["model"].clone();
    let base = ["--n-layer", "2", "--max-seq-len", "32", "--device-batch-size", "2"];
    let go = |run: &str, extra: &[&str]| {
        let mut args = vec!["train", "--run", run];
        args.extend(base.iter().chain(RUN).chain(extra));
        ok(&args, d);
    };
    // values set in the file survive --n-embd / --n-head
    std::fs::write(d.join("set.toml"), "ffn_hidden = 96\n[moe]\nn_routed_experts = 4\nmoe_inter_dim = 32\n").unwrap();
    go("set", &["--config", "set.toml", "--n-embd", "64", "--n-head", "2"]);
    let m = model("set");
    assert_eq!((m["ffn_hidden"].as_u64(), m["moe"]["moe_inter_dim"].as_u64()), (Some(96), Some(32)), "{m}");
    assert_eq!(m["head_dim"], 32);
    // n_embd in a file derives exactly what --n-embd derives
    std::fs::write(d.join("shape.toml"), "n_embd = 64\nn_head = 2\n").unwrap();
    go("file", &["--config", "shape.toml"]);
    go("cli", &["--n-embd", "64", "--n-head", "2"]);
    assert_eq!(model("file"), model("cli"));
    assert_eq!((model("file")["ffn_hidden"].as_u64(), model("file")["head_dim"].as_u64()), (Some(192), Some(32)));
    // --config with --data: the data's vocabulary when the file has none
    small_shard(&d.join("s.bin"), 4000);
    go("data", &["--config", "shape.toml", "--data", "s.bin"]);
    assert_eq!(model("data")["vocab_size"], 64);
    // a run's own config.json is a valid --config
    go("again", &["--config", "runs/set/config.json"]);
    assert_eq!(model("again"), model("set"));
}

#[test]
fn data_output_is_not_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = ["data", "--synthetic", "--num-samples", "40", "--max-seq-len", "16", "--quiet", "--output", "syn"];
    ok(&args, d);
    fails(&args, d, "--force");
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&forced, d);
}

#[test]
fn token_tail_split_states_real_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // one document: too few to hold whole ones out, so the last 5% of tokens become val
    let text: String = (0..400).map(|i| format!("line {i} of a small corpus, word{} and more.\n", i % 17)).collect();
    std::fs::write(d.join("one.txt"), &text).unwrap();
    ok(&["data", "--input", "one.txt", "--output", "out", "--vocab-size", "300", "--quiet"], d);
    let m = json(&d.join("out/manifest.json"));
    assert_eq!(m["val_split"], "token-tail");
    let tok = nanoseek::data::tokenizer::BpeTokenizer::load(&d.join("out/tokenizer.json")).unwrap();
    let val = TokenShard::open(&d.join("out/val.bin")).unwrap();
    let mut ids = vec![0u32; val.len];
    val.read_into(0, &mut ids);
    let real = nanoseek::data::TextCodec::byte_len(&tok, &ids) as u64;
    assert_eq!(m["splits"]["val"]["bytes"].as_u64(), Some(real));
    let total = m["splits"]["train"]["bytes"].as_u64().unwrap() + real;
    assert_eq!(total, text.len() as u64);
}

#[test]
fn eval_batches_flag_and_validation_bits_per_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(&["train", "--eval-batches", "0"], d, "--eval-batches");
    train(d, &["--run", "r", "--eval-batches", "1"]);
    assert_eq!(json(&d.join("runs/r/config.json"))["train"]["eval_batches"], 1);
    let metrics = std::fs::read_to_string(d.join("runs/r/metrics.jsonl")).unwrap();
    let val: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("val_loss").is_some())
        .collect();
    assert!(!val.is_empty());
    for v in val {
        let (loss, bpb) = (v["val_loss"].as_f64().unwrap(), v["val_bpb"].as_f64().unwrap());
        assert!(bpb > 0.0 && bpb < loss * 2.0, "{v}");
    }
}
