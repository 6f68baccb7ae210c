//! A seeded mutation test of every loader: checkpoint files (with and without their checksums
//! recomputed, so the parsers behind the checksum are reached too), state.json, checksums.json,
//! config.json, model config files, token shards, tokenizer.json, and the numbers of the command
//! line. Each input must be accepted or refused with an error: never a panic (caught per case),
//! a hang (each case under a timeout) or, for the binary, a partial run directory.

use nanoseek::data::shard::{write_shard, TokenShard};
use nanoseek::data::tokenizer::BpeTokenizer;
use nanoseek::device::Device;
use nanoseek::nn::ModelConfig;
use nanoseek::rng::Rng;
use nanoseek::train::{checkpoint, open_checked_shard, train, RunConfig, TrainRequest, TrainSettings};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Numbers that break careless arithmetic.
const INTERESTING: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "1099511627776",
    "4611686018427387904",
    "18446744073709551615",
    "18446744073709551616",
    "1e38",
    "-1e38",
    "1e400",
    "nan",
    "NaN",
    "inf",
    "0.5",
    "-0.0",
    "\"x\"",
    "null",
    "",
];

fn micro_config() -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (1, 32, 2, 1, 16, 64, 16);
    m
}

/// One mutation of `bytes`: a bit flip, a random byte, a truncation, an insertion, a deleted or
/// duplicated chunk, or (in text) a number replaced by an interesting one.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = b.len().max(1);
    match rng.below(7) {
        0 => {
            let i = rng.below(n).min(b.len().saturating_sub(1));
            if !b.is_empty() {
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            if !b.is_empty() {
                let i = rng.below(b.len());
                b[i] = rng.below(256) as u8;
            }
        }
        2 => b.truncate(rng.below(n)),
        3 => {
            let at = rng.below(n + 1).min(b.len());
            let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.below(256) as u8).collect();
            b.splice(at..at, extra);
        }
        4 => {
            let at = rng.below(n).min(b.len());
            let end = (at + 1 + rng.below(64)).min(b.len());
            b.drain(at..end);
        }
        5 => {
            let at = rng.below(n).min(b.len());
            let end = (at + 1 + rng.below(64)).min(b.len());
            let chunk = b[at..end].to_vec();
            b.splice(at..at, chunk);
        }
        _ => {
            // the k-th run of digits becomes an interesting number
            let runs: Vec<(usize, usize)> = {
                let mut v = Vec::new();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() {
                        let s = i;
                        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                            i += 1;
                        }
                        v.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                v
            };
            if !runs.is_empty() {
                let (s, e) = runs[rng.below(runs.len())];
                let with = INTERESTING[rng.below(INTERESTING.len())].as_bytes().to_vec();
                b.splice(s..e, with);
            }
        }
    }
    b
}

/// Runs `case` on a thread: it must return (Ok or Err) within the timeout and never panic.
fn check_case(what: String, case: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => {
            assert!(!format!("{e:#}").is_empty(), "{what}: an empty error");
            false
        }
        Ok(Err(_)) => panic!("{what}: the loader panicked"),
        Err(_) => panic!("{what}: no answer within {CASE_TIMEOUT:?} (a hang)"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    run: RunConfig,
    ckpt: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = micro_config();
    let mut t = TrainSettings::for_model(&model);
    (t.device_batch_size, t.total_batch_size, t.num_iterations, t.save_every) = (2, 32, 2, 1);
    (t.eval_every, t.eval_batches, t.keep_checkpoints) = (0, 1, 0);
    let run = RunConfig { model, train: t };
    let req = TrainRequest {
        run: run.clone(),
        run_dir: root.join("runs/r"),
        resume_from_step: None,
        device: Device::Cpu,
        verbose: false,
        sample_tokens: 0,
    };
    let ckpt = train(req).unwrap().checkpoint;
    let ids: Vec<u32> = (0..2000).map(|i| (i * 7) % 300).collect();
    write_shard(&root.join("shard.bin"), &ids, 300).unwrap();
    let texts = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot"];
    BpeTokenizer::train(texts.iter().cycle().take(60), 300, false).unwrap().save(&root.join("tokenizer.json")).unwrap();
    std::fs::write(root.join("model.toml"), "n_layer = 1\nn_embd = 32\nn_head = 2\nmax_seq_len = 16\n").unwrap();
    Fixture { _dir: dir, root, run, ckpt }
}

/// A copy of the checkpoint with `name` replaced by `bytes` (checksum recomputed when asked).
fn mutated_checkpoint(f: &Fixture, case: usize, name: &str, bytes: &[u8], fix_checksum: bool) -> PathBuf {
    let dst = f.root.join(format!("cases/{case}/step_000002"));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&f.ckpt).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::write(dst.join(name), bytes).unwrap();
    if fix_checksum && name != checkpoint::CHECKSUMS_FILE {
        let p = dst.join(checkpoint::CHECKSUMS_FILE);
        let mut sums: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        sums["files"][name] = sha256_hex(bytes).into();
        std::fs::write(&p, sums.to_string()).unwrap();
    }
    dst
}

#[test]
fn every_loader_accepts_or_refuses_mutated_input_without_panic_or_hang() {
    let f = fixture();
    let mut rng = Rng::new(0x15_0000);
    let t0 = Instant::now();
    let (cases, accepted) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    let count = |ok: bool| {
        cases.set(cases.get() + 1);
        accepted.set(accepted.get() + ok as usize);
    };
    // Checkpoint files, loaded whole (state, weights, optimizer state) as a resume does.
    for (name, n) in
        [("model.safetensors", 120), ("optim.safetensors", 60), ("state.json", 80), (checkpoint::CHECKSUMS_FILE, 40)]
    {
        let original = std::fs::read(f.ckpt.join(name)).unwrap();
        for i in 0..n {
            let bytes = mutate(&original, &mut rng);
            let dir = mutated_checkpoint(&f, cases.get(), name, &bytes, i % 4 != 0);
            let (model, optim) = (f.run.model.clone(), f.run.train.optim.clone());
            count(check_case(format!("{name} case {i}"), move || {
                let cfg = checkpoint::read_config(&dir)?;
                checkpoint::load(&dir, &cfg, optim.clone())?;
                checkpoint::load(&dir, &model, optim).map(|_| ())
            }));
            let _ = std::fs::remove_dir_all(f.root.join(format!("cases/{}", cases.get() - 1)));
        }
    }
    // config.json of a run, through the checks a resume applies.
    let config = serde_json::to_vec_pretty(&f.run).unwrap();
    for i in 0..100 {
        let bytes = mutate(&config, &mut rng);
        count(check_case(format!("config.json case {i}"), move || {
            let run: RunConfig = serde_json::from_slice(&bytes)?;
            run.model.validate()?;
            run.train.optim.validate()?;
            run.train.grad_accum_steps(run.model.max_seq_len, 1)?;
            nanoseek::info::predict_training_bytes(&run.model, run.train.device_batch_size, run.model.max_seq_len, 0);
            Ok(())
        }));
    }
    // Model config files (--config).
    let toml = std::fs::read(f.root.join("model.toml")).unwrap();
    for i in 0..50 {
        let path = f.root.join(format!("m{i}.toml"));
        std::fs::write(&path, mutate(&toml, &mut rng)).unwrap();
        count(check_case(format!("model.toml case {i}"), move || {
            let cfg = ModelConfig::from_file(&path, &ModelConfig::preset("tiny")?)?;
            nanoseek::info::predict_training_bytes(&cfg, 1, cfg.max_seq_len, 0);
            Ok(())
        }));
    }
    // Token shards: opened, scanned against the model, read.
    let shard = std::fs::read(f.root.join("shard.bin")).unwrap();
    for i in 0..80 {
        let mut bytes = shard.clone();
        // most mutations land in the 32-byte header, where the parsing is
        if i % 2 == 0 {
            let head = mutate(&bytes[..32], &mut rng);
            bytes.splice(..32, head);
        } else {
            bytes = mutate(&bytes, &mut rng);
        }
        let path = f.root.join(format!("s{i}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let model = f.run.model.clone();
        count(check_case(format!("shard case {i}"), move || {
            let s = TokenShard::open(&path)?;
            if s.len > 0 {
                s.get(s.len - 1);
            }
            open_checked_shard(&path, &model).map(|_| ())
        }));
    }
    // tokenizer.json
    let tok = std::fs::read(f.root.join("tokenizer.json")).unwrap();
    for i in 0..60 {
        let path = f.root.join(format!("t{i}.json"));
        std::fs::write(&path, mutate(&tok, &mut rng)).unwrap();
        count(check_case(format!("tokenizer case {i}"), move || {
            let t = BpeTokenizer::load(&path)?;
            t.encode_bytes(b"the cat sat", "probe")?;
            Ok(())
        }));
    }
    let (in_process, accepted) = (cases.get(), accepted.get());
    // The binary: interesting numbers in the flags of info, eval, demo and train.
    // a new one-layer run (16-token context) for the train flags, with and without the batch size
    let train_new = [
        "train",
        "--run",
        "new",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--max-seq-len",
        "16",
        "--num-iterations",
        "1",
        "--quiet",
        "--sample-tokens",
        "0",
    ];
    let train_new_batch_1 = [&train_new[..], &["--device-batch-size", "1"]].concat();
    let flags: &[(&[&str], &str)] = &[
        (&["info"], "--n-layer"),
        (&["info"], "--n-embd"),
        (&["info"], "--max-seq-len"),
        (&["info"], "--device-batch-size"),
        (&["info"], "--vocab-size"),
        (&["eval", "--model-path", "runs/r", "--eval-tokens", "32"], "--batch-size"),
        (&["eval", "--model-path", "runs/r", "--batch-size", "1"], "--eval-tokens"),
        (&["demo", "--model-path", "runs/r", "--mode", "test", "--max-new-tokens", "2"], "--max-seq-len"),
        (&["demo", "--model-path", "runs/r", "--mode", "batch", "--max-new-tokens", "2"], "--temperature"),
        (&["demo", "--model-path", "runs/r", "--mode", "batch", "--max-new-tokens", "2"], "--top-p"),
        (&train_new, "--device-batch-size"),
        (&train_new_batch_1, "--matrix-lr"),
    ];
    let mut binary_cases = 0;
    for (base, flag) in flags {
        for _ in 0..5 {
            let value = INTERESTING[rng.below(INTERESTING.len())];
            let _ = std::fs::remove_dir_all(f.root.join("runs/new"));
            run_binary(&f.root, base, flag, value);
            binary_cases += 1;
        }
    }
    eprintln!(
        "mutation: {in_process} in-process cases ({accepted} accepted, the rest refused) and {binary_cases} binary cases in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(in_process >= 500);
}

/// Runs the binary with `flag value`: success, or a non-zero exit with `error:`; no panic, no hang,
/// and a refused `train` leaves no run directory.
fn run_binary(cwd: &Path, base: &[&str], flag: &str, value: &str) {
    let what = format!("{base:?} {flag} {value}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanoseek"))
        .args(base)
        .arg(format!("{flag}={value}"))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CASE_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: no answer within {CASE_TIMEOUT:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!e.contains("panicked"), "{what}: {e}");
    if !o.status.success() {
        assert!(e.contains("error"), "{what}: a failure without an error message: {e}");
        if base[0] == "train" {
            assert!(!cwd.join("runs/new").exists(), "{what}: a refused train left runs/new behind");
        }
    }
}
