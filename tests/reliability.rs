//! Nothing lost, nothing hung: one writer per run, only finite checkpoints, checksums, and crash
//! safety under injected faults and `kill -9` at seeded random moments. Every check ends by
//! resuming and comparing with an uninterrupted run bit for bit.

mod common;

use nanoseek::rng::Rng;
use nanoseek::train::{checkpoint, RunConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A one-layer model: a step takes milliseconds, a checkpoint ~3 MB.
fn model() -> Vec<&'static str> {
    let tail = ["--sample-tokens", "0", "--quiet", "--device", "cpu"];
    [&["--n-layer", "1"][..], common::SMALL_MODEL_FLAGS, &tail].concat()
}

const STEPS: u64 = 8;

fn command(cwd: &Path, args: &[&str], fault: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nanoseek"));
    c.args(args).current_dir(cwd).stdout(Stdio::null()).stderr(Stdio::piped());
    match fault {
        Some(f) => c.env("NANOSEEK_FAULT", f),
        None => c.env_remove("NANOSEEK_FAULT"),
    };
    c
}

/// `train --run NAME` of the test model, `STEPS` steps, a checkpoint every step, the newest 3 kept.
fn train_args<'a>(run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--run", run, "--num-iterations", "8", "--save-every", "1", "--keep-checkpoints", "3"];
    a.extend(model());
    a.extend_from_slice(extra);
    a
}

fn run(cwd: &Path, args: &[&str], fault: Option<&str>) -> Output {
    command(cwd, args, fault).output().expect("run nanoseek")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, needle: &str) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "expected a failure with '{needle}': {e}");
    assert!(e.contains("error:") && e.contains(needle), "expected 'error: …{needle}…' in: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Every `step_*` folder of the run loads whole (checksums, shapes, finiteness); returns the steps.
fn check_every_checkpoint_complete(run_dir: &Path) -> Vec<u64> {
    let steps = checkpoint::list_steps(run_dir);
    if steps.is_empty() {
        return steps;
    }
    let text = std::fs::read_to_string(run_dir.join("config.json")).expect("a checkpoint implies config.json");
    let cfg: RunConfig = serde_json::from_str(&text).unwrap();
    for &s in &steps {
        let dir = checkpoint::checkpoint_dir(run_dir, s);
        if let Err(e) = checkpoint::load(&dir, &cfg.model, cfg.train.optim.clone()) {
            panic!("checkpoint {} on disk is not complete: {e:#}", dir.display());
        }
    }
    steps
}

/// Brings an interrupted run to its end as a user would: resume from the newest checkpoint, from
/// scratch (`--resume-from-step 0`) when none completed, or start it again when not even its
/// config was written. Returns whether a process ran (it removed the dead one's temporaries).
fn finish(cwd: &Path, run_name: &str) -> bool {
    let run_dir = cwd.join("runs").join(run_name);
    let steps = check_every_checkpoint_complete(&run_dir);
    if steps.last() == Some(&STEPS) {
        return false; // killed after its last save (e.g. while pruning): nothing to finish
    }
    let from = steps.last().copied().unwrap_or(0).to_string();
    let o = if run_dir.join("config.json").exists() {
        run(cwd, &["train", "--run", run_name, "--resume-from-step", &from, "--quiet", "--sample-tokens", "0"], None)
    } else {
        run(cwd, &train_args(run_name, &[]), None)
    };
    assert!(o.status.success(), "finishing {run_name} from step {from} failed: {}", stderr(&o));
    true
}

/// (step, loss bits) of the train lines of a run's metrics.
fn losses(run_dir: &Path) -> Vec<(u64, u64)> {
    nanoseek::train::metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

fn final_bytes(run_dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let d = checkpoint::checkpoint_dir(run_dir, STEPS);
    (std::fs::read(d.join("model.safetensors")).unwrap(), std::fs::read(d.join("optim.safetensors")).unwrap())
}

/// The uninterrupted reference run.
fn reference(cwd: &Path) -> PathBuf {
    let o = run(cwd, &train_args("reference", &[]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    cwd.join("runs/reference")
}

/// `cleaned`: a writer ran after the crash, so no temporary of the dead process may remain.
fn assert_same_as_reference(reference: &Path, run_dir: &Path, what: &str, cleaned: bool) {
    assert_eq!(losses(run_dir), losses(reference), "{what}: losses differ from the uninterrupted run");
    assert!(final_bytes(run_dir) == final_bytes(reference), "{what}: final weights or optimizer state differ");
    let leftovers: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(!cleaned || leftovers.is_empty(), "{what}: temporaries of the dead process remain: {leftovers:?}");
}

/// A long-running child that must not outlive a failing test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut first =
        KillOnDrop(command(d, &train_args("shared", &["--num-iterations", "100000"]), None).spawn().expect("spawn"));
    let run_dir = d.join("runs/shared");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !checkpoint::checkpoint_dir(&run_dir, 1).exists() {
        assert!(Instant::now() < deadline, "the first writer never saved a checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = format!("PID {}", first.0.id());
    let e = assert_refused(&run(d, &train_args("shared", &[]), None), "in use by another nanoseek process");
    assert!(e.contains(&pid), "the message should name {pid}: {e}");
    let e = assert_refused(
        &run(d, &["train", "--run", "shared", "--resume-from-step", "1", "--quiet", "--sample-tokens", "0"], None),
        "in use",
    );
    assert!(e.contains(&pid), "{e}");
    // kill -9: the kernel releases the lock, and the run resumes from its newest checkpoint.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let steps = check_every_checkpoint_complete(&run_dir);
    let newest = *steps.last().unwrap();
    let (from, to) = (newest.to_string(), (newest + 1).to_string());
    let o = run(
        d,
        &[
            "train",
            "--run",
            "shared",
            "--resume-from-step",
            &from,
            "--num-iterations",
            &to,
            "--quiet",
            "--sample-tokens",
            "0",
        ],
        None,
    );
    assert!(o.status.success(), "after the holder died the run must resume: {}", stderr(&o));
}

#[test]
fn non_finite_state_is_never_saved_and_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An update that overflows to infinity at step 1: nothing is saved, the error says so.
    let o = run(d, &train_args("diverged", &["--embedding-lr", "1e38", "--matrix-lr", "1e38"]), None);
    let e = assert_refused(&o, "non-finite");
    assert!(e.contains("last good checkpoint: none"), "{e}");
    assert!(checkpoint::list_steps(&d.join("runs/diverged")).is_empty());

    // A NaN written into a checkpoint's optimizer state (checksum recomputed, so only the
    // finiteness check can catch it) is refused on resume.
    let o = run(d, &train_args("poisoned", &["--num-iterations", "2"]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = checkpoint::checkpoint_dir(&d.join("runs/poisoned"), 1);
    let path = ck.join("optim.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..12 + header].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    rewrite_checksum(&ck, "optim.safetensors");
    let o = run(d, &["train", "--run", "poisoned", "--resume-from-step", "1", "--quiet"], None);
    assert_refused(&o, "non-finite optimizer state");
}

/// Records `name`'s current SHA-256 in the checkpoint's checksums.json.
fn rewrite_checksum(ck: &Path, name: &str) {
    use sha2::Digest;
    let sums_path = ck.join("checksums.json");
    let mut sums: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sums_path).unwrap()).unwrap();
    let hex: String =
        sha2::Sha256::digest(std::fs::read(ck.join(name)).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    sums["files"][name] = serde_json::Value::String(hex);
    std::fs::write(&sums_path, sums.to_string()).unwrap();
}

#[test]
fn a_bit_flip_in_any_checkpoint_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = run(d, &train_args("flipped", &["--num-iterations", "2"]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = checkpoint::checkpoint_dir(&d.join("runs/flipped"), 1);
    let mut rng = Rng::new(15);
    for name in ["model.safetensors", "optim.safetensors", "state.json"] {
        let path = ck.join(name);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let at = rng.below(bytes.len());
        bytes[at] ^= 1 << rng.below(8);
        std::fs::write(&path, &bytes).unwrap();
        let o = run(d, &["train", "--run", "flipped", "--resume-from-step", "1", "--quiet"], None);
        let e = assert_refused(&o, "SHA-256");
        assert!(e.contains(name), "the error should name {name}: {e}");
        std::fs::write(&path, original).unwrap();
    }
}

#[test]
fn a_fault_between_the_steps_of_a_save_or_a_prune_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reference = reference(d);
    for (i, fault) in
        ["save:after_model", "save:after_optim", "save:after_state", "save:before_install", "prune:after_rename"]
            .iter()
            .enumerate()
    {
        let name = format!("fault{i}");
        let o = run(d, &train_args(&name, &[]), Some(fault));
        assert!(!o.status.success() && stderr(&o).contains(fault), "{fault} was not reached: {}", stderr(&o));
        let run_dir = d.join("runs").join(&name);
        check_every_checkpoint_complete(&run_dir);
        let cleaned = finish(d, &name);
        assert_same_as_reference(&reference, &run_dir, fault, cleaned);
    }
    // Replacing a newer checkpoint when resuming from an older step: a crash after the new one is
    // in place (the old one not yet deleted) leaves both steps whole.
    let run_dir = d.join("runs/fault-replace");
    let o = run(d, &train_args("fault-replace", &["--keep-checkpoints", "0"]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let args = ["train", "--run", "fault-replace", "--resume-from-step", "2", "--quiet", "--sample-tokens", "0"];
    let o = run(d, &args, Some("save:after_install"));
    assert!(!o.status.success() && stderr(&o).contains("save:after_install"), "{}", stderr(&o));
    assert_eq!(check_every_checkpoint_complete(&run_dir), (1..=STEPS).collect::<Vec<_>>());
    let o = run(d, &args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_as_reference(&reference, &run_dir, "save:after_install", true);
}

/// kill -9 at seeded random moments of a run that saves every step: every checkpoint left is
/// complete, and finishing the run gives the uninterrupted run's losses and final state bit for bit.
#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t0 = Instant::now();
    let reference = reference(d);
    let span = t0.elapsed().as_micros() as usize + 1;
    let mut rng = Rng::new(0x9_1115);
    const KILLS: usize = 24;
    let (mut killed_mid_run, mut killed_mid_save) = (0, 0);
    for i in 0..KILLS {
        let name = format!("killed{i}");
        let mut child = command(d, &train_args(&name, &[]), None).spawn().expect("spawn");
        std::thread::sleep(Duration::from_micros(rng.below(span) as u64));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
        let ckpts = d.join("runs").join(&name).join("checkpoints");
        if std::fs::read_dir(&ckpts)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with('.'))
        {
            killed_mid_save += 1; // a temporary or trash folder: the kill landed inside a save or a prune
        }
        let cleaned = finish(d, &name);
        assert_same_as_reference(&reference, &d.join("runs").join(&name), &format!("kill {i}"), cleaned);
    }
    eprintln!(
        "{killed_mid_run} of {KILLS} kills landed while the run was going, {killed_mid_save} inside a save or prune"
    );
    assert!(killed_mid_run > 0, "no kill landed during a run");
}
