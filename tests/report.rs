//! TensorBoard event files and the run report, through the binary: the event files are read
//! back by an independent reader here (TFRecord framing, both CRCs, the Event protobuf) and,
//! where Python's `tensorboard` is installed, by TensorBoard itself; report.md has every
//! section and `nanoseek report` rebuilds it byte for byte.

mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Two layers (DSA, then an MoE FFN) so the MoE and indexer scalars are logged too.
fn model() -> Vec<&'static str> {
    let tail = ["--attn-pattern", "SD", "--index-topk", "8", "--n-routed-experts", "4"];
    [&["--n-layer", "2"][..], common::SMALL_MODEL_FLAGS, &tail].concat()
}

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek")
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "nanoseek failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// CRC-32C bit by bit (independent of the engine's table-driven one), and TFRecord's mask.
fn masked_crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    (!c).rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    /// (tag, simple_value)
    scalars: Vec<(String, f32)>,
    session_status: Option<u64>,
}

/// Protobuf fields of one message: (field number, wire type, varint value or payload bytes).
fn fields(mut b: &[u8]) -> Vec<(u64, u8, u64, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7F) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let (num, bytes) = match wire {
            0 => (varint(&mut b), Vec::new()),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let (v, rest) = b.split_at(n);
                b = rest;
                (0, v.to_vec())
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (v, rest) = b.split_at(n);
                b = rest;
                (0, v.to_vec())
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((field, wire, num, bytes));
    }
    out
}

fn decode_event(data: &[u8]) -> Event {
    let mut e = Event::default();
    for (f, wire, num, bytes) in fields(data) {
        match (f, wire) {
            (1, 1) => e.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
            (2, 0) => e.step = num as i64,
            (3, 2) => e.file_version = Some(String::from_utf8(bytes).unwrap()),
            (5, 2) => {
                for (vf, _, _, value) in fields(&bytes) {
                    assert_eq!(vf, 1, "Summary holds only values");
                    let (mut tag, mut x) = (None, None);
                    for (k, _, _, b) in fields(&value) {
                        match k {
                            1 => tag = Some(String::from_utf8(b).unwrap()),
                            2 => x = Some(f32::from_le_bytes(b.try_into().unwrap())),
                            k => panic!("unexpected Summary.Value field {k}"),
                        }
                    }
                    e.scalars.push((tag.expect("tag"), x.expect("simple_value")));
                }
            }
            (7, 2) => e.session_status = fields(&bytes).iter().find(|x| x.0 == 1).map(|x| x.2),
            (f, w) => panic!("unexpected Event field {f} (wire type {w})"),
        }
    }
    e
}

/// Every record of an event file, checking the framing and both CRCs of each.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 16, "truncated record in {}", path.display());
        let len_bytes = &rest[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(rest[8..12].try_into().unwrap()), masked_crc(len_bytes), "length CRC");
        let data = &rest[12..12 + len];
        assert_eq!(u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap()), masked_crc(data), "data CRC");
        out.push(decode_event(data));
        rest = &rest[16 + len..];
    }
    out
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .collect();
    files.sort();
    files
}

/// What TensorBoard shows: per tag, step → value, later files replacing steps from a restart on.
fn merged_scalars(run: &Path) -> BTreeMap<String, BTreeMap<i64, f32>> {
    let mut by_tag: BTreeMap<String, BTreeMap<i64, f32>> = BTreeMap::new();
    for (i, file) in event_files(run).iter().enumerate() {
        let events = read_events(file);
        assert_eq!(
            events[0].file_version.as_deref(),
            Some("brain.Event:2"),
            "{} starts with its version",
            file.display()
        );
        assert!(events[0].wall_time > 1.6e9, "wall time is seconds since 1970");
        for e in &events[1..] {
            if let Some(status) = e.session_status {
                assert_eq!(status, 1, "SessionLog.START");
                assert!(i > 0, "only a resumed run's file marks a restart");
                for steps in by_tag.values_mut() {
                    steps.retain(|&s, _| s < e.step);
                }
            }
            for (tag, x) in &e.scalars {
                assert!(
                    by_tag.entry(tag.clone()).or_default().insert(e.step, *x).is_none(),
                    "{tag} twice at {}",
                    e.step
                );
            }
        }
    }
    by_tag
}

/// The scalars metrics.jsonl says each tag must have: (tag, step, value).
fn expected_scalars(run: &Path) -> Vec<(String, i64, f32)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let step = r["step"].as_i64().unwrap();
        let mut put = |tag: &str, v: Option<f64>| out.push((tag.to_string(), step, v.unwrap() as f32));
        if r.get("val_loss").is_some() {
            put("val/loss", r["val_loss"].as_f64());
            continue;
        }
        put("train/loss", r["loss"].as_f64());
        put("train/grad_norm", r["grad_norm"].as_f64());
        put("lr/multiplier", r["lr_mult"].as_f64());
        put("lr/matrix", r["lr_mult"].as_f64().map(|m| m * 0.02f32 as f64));
        put("perf/tokens_per_s", r["tokens_per_s"].as_f64());
        put("memory/peak_mib", r["peak_memory_mib"].as_f64());
        put("train/indexer_loss", r["indexer_loss"].as_f64());
        put("moe/layer1/max_mean", r["moe"][0]["max_mean"].as_f64());
    }
    out
}

fn check_events(run: &Path) {
    let merged = merged_scalars(run);
    let expected = expected_scalars(run);
    for (tag, step, value) in &expected {
        let got = merged.get(tag).and_then(|s| s.get(step)).unwrap_or_else(|| panic!("no {tag} at step {step}"));
        assert_eq!(got, value, "{tag} at step {step}");
    }
    // nothing beyond what metrics.jsonl has
    let steps: std::collections::BTreeSet<i64> = expected.iter().map(|e| e.1).collect();
    assert_eq!(merged["train/loss"].keys().copied().collect::<std::collections::BTreeSet<_>>(), steps);
    python_check(run, &expected);
}

/// TensorBoard's own reader, when Python has it.
fn python_check(run: &Path, expected: &[(String, i64, f32)]) {
    if !Command::new("python3").args(["-c", "import tensorboard"]).output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED the TensorBoard half: python3 cannot import tensorboard (pip install tensorboard)");
        return;
    }
    let script = "import sys, json\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
        print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))\n";
    let o = Command::new("python3").args(["-c", script]).arg(run).output().unwrap();
    assert!(o.status.success(), "TensorBoard could not read the run: {}", String::from_utf8_lossy(&o.stderr));
    let tb: BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
    for (tag, step, value) in expected {
        let points = &tb[tag];
        // (TensorBoard holds the f32 exactly; JSON text may round-trip its f64 to within an ulp)
        let hits: Vec<f32> = points.iter().filter(|p| p.0 == *step).map(|p| p.1 as f32).collect();
        assert_eq!(hits, vec![*value], "TensorBoard's {tag} at step {step}");
    }
    let train_steps = expected.iter().filter(|e| e.0 == "train/loss").count();
    assert_eq!(tb["train/loss"].len(), train_steps, "TensorBoard shows each step once");
}

fn section_titles() -> [&'static str; 9] {
    [
        "## Configuration",
        "## Parameters",
        "## Data",
        "## Hardware",
        "## Throughput",
        "## Memory",
        "## Loss",
        "## Final evaluation",
        "## Sample",
    ]
}

#[test]
fn a_run_writes_tensorboard_events_and_a_report_that_report_rebuilds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["train"];
    args.extend(model());
    args.extend_from_slice(&[
        "--num-iterations",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "0",
        "--sample-tokens",
        "12",
        "--run",
        "r",
        "--device",
        "cpu",
        "--quiet",
        "--wandb-project",
        "nanoseek-test",
    ]);
    let o = ok(nanoseek(&args, tmp.path()));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("wandb sync --sync-tensorboard -p nanoseek-test runs/r"), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let run = tmp.path().join("runs/r");
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("\"wandb_project\": \"nanoseek-test\""), "{config}");
    assert_eq!(event_files(&run).len(), 1);
    check_events(&run);

    // the report: every section, the parameter count `info` gives, the sample train printed
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    for title in section_titles() {
        assert!(report.contains(&format!("\n{title}\n")), "report.md lacks {title}:\n{report}");
    }
    let mut info_args = vec!["info"];
    info_args.extend(model());
    let info = String::from_utf8(ok(nanoseek(&info_args, tmp.path())).stdout).unwrap();
    let total = info.lines().find(|l| l.trim_start().starts_with("total ")).unwrap().split_whitespace().nth(1).unwrap();
    assert!(report.contains(&format!("| total | {total} (")), "total parameters {total}:\n{report}");
    let sample = stdout.split_once("sample:\n").expect("train printed a sample").1.trim_end();
    assert!(!sample.is_empty() && report.contains(&format!("```text\n{sample}\n```")), "sample:\n{report}");
    assert!(report.contains("![training and validation loss](loss.svg)"));
    assert!(report.contains("- validation loss at step 4: "));
    let bpb = report.lines().find_map(|l| l.strip_prefix("- bits per byte: ")).expect("bits per byte");
    assert!(bpb.split(' ').next().unwrap().parse::<f64>().is_ok_and(|x| x > 0.0), "{bpb}");
    assert!(report.contains("- device: cpu"));

    // `nanoseek report` reproduces it (printed and written) from the run's files
    std::fs::remove_file(run.join("report.md")).unwrap();
    let o = ok(nanoseek(&["report", "runs/r"], tmp.path()));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), report);
    assert_eq!(std::fs::read_to_string(run.join("report.md")).unwrap(), report);

    // resume from step 2: a second event file, whose restart mark hides the first file's steps 3–4
    ok(nanoseek(&["train", "--run", "r", "--resume-from-step", "2", "--device", "cpu", "--quiet"], tmp.path()));
    let files = event_files(&run);
    assert_eq!(files.len(), 2);
    let second = read_events(&files[1]);
    assert_eq!((second[1].session_status, second[1].step), (Some(1), 3));
    check_events(&run);
    let resumed = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert_eq!(
        String::from_utf8(ok(nanoseek(&["report", "runs/r", "--no-write"], tmp.path())).stdout).unwrap(),
        resumed
    );
}

#[test]
fn report_refuses_what_is_not_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("file.txt"), "x").unwrap();
    for (dir, needle) in
        [("missing", "is not a directory"), ("empty", "has no config.json"), ("file.txt", "is not a directory")]
    {
        let o = nanoseek(&["report", dir], tmp.path());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "report {dir} should fail");
        assert!(e.starts_with("error:") && e.contains(needle), "report {dir}: {e}");
    }
    assert!(!tmp.path().join("empty/report.md").exists());
    // a run without the wandb flag keeps its config.json free of it
    let mut args = vec!["train", "--n-layer", "2"];
    args.extend_from_slice(common::SMALL_MODEL_FLAGS);
    args.extend_from_slice(&[
        "--num-iterations",
        "1",
        "--sample-tokens",
        "0",
        "--run",
        "d",
        "--device",
        "cpu",
        "--quiet",
    ]);
    ok(nanoseek(&args, tmp.path()));
    let config = std::fs::read_to_string(tmp.path().join("runs/d/config.json")).unwrap();
    assert!(!config.contains("wandb"), "{config}");
    let report = std::fs::read_to_string(tmp.path().join("runs/d/report.md")).unwrap();
    assert!(report.contains("No sample recorded"), "{report}");
}
