//! README.md stays true: every command block marked pasteable runs as is, and the tables and
//! figures copied from the program's output match what the program prints now.

use std::path::{Path, PathBuf};
use std::process::Command;

const MARKER: &str = "<!-- pasteable -->";

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The body of every ```bash block directly after a pasteable marker line, in order.
fn pasteable_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != MARKER {
            continue;
        }
        assert_eq!(lines.next().map(str::trim), Some("```bash"), "a pasteable marker must precede a ```bash block");
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

/// A folder holding `nanoseek`, a link to the binary under test, to put first on PATH.
fn bin_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_nanoseek"), bin.join("nanoseek")).unwrap();
    bin
}

#[test]
fn pasteable_blocks_run_as_is_in_an_empty_folder() {
    let text = readme();
    let blocks = pasteable_blocks(&text);
    assert!(blocks.len() >= 2, "README.md should mark its runnable examples {MARKER}");
    let root = tempfile::tempdir().unwrap();
    let bin = bin_dir(root.path());
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // The blocks run one after the other in the same folder, as a reader pastes them.
    for (i, block) in blocks.iter().enumerate() {
        let o = Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(&work)
            .env("PATH", &path)
            .output()
            .expect("run bash");
        assert!(
            o.status.success(),
            "pasteable block {} failed:\n{block}\nstdout:\n{}\nstderr:\n{}",
            i + 1,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(work.join("eval_results.json").is_file());
}

fn info_all() -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(["info", "--all"]).output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

/// Whitespace collapsed, so prose checks do not depend on line wrapping.
fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn info_all_table_and_the_memory_prose_match_the_program() {
    let text = readme();
    let table = info_all();
    assert!(text.contains(&table), "README.md's `info --all` block differs from the program's output:\n{table}");
    // preset → its row's columns
    let row = |name: &str| -> Vec<String> {
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap();
        line.split_whitespace().map(str::to_string).collect()
    };
    let (small, medium) = (row("small"), row("medium"));
    let prose = flat(&text);
    let claim = format!("`small` needs {} GiB ({} GiB with checkpointing", small[3], small[4]);
    assert!(prose.contains(&claim), "README.md should say: {claim}");
    let claim = format!("`medium` {} GiB with checkpointing", medium[4]);
    assert!(prose.contains(&claim), "README.md should say: {claim}");
    // The Presets table's total parameters are the program's.
    for name in ["tiny", "small", "medium", "large", "xlarge", "full"] {
        let readme_row = text.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap();
        let cells: Vec<&str> = readme_row.split('|').map(str::trim).collect();
        assert_eq!(cells[8], row(name)[1], "Presets table, {name}: params (total)");
    }
}

#[test]
fn train_help_says_what_data_takes() {
    let o = Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(["train", "--help"]).output().unwrap();
    let help = flat(&String::from_utf8_lossy(&o.stdout));
    for needle in ["folder written by `nanoseek data`", "nanoseek token shard", "llm.c"] {
        assert!(help.contains(needle), "train --help should mention {needle}: {help}");
    }
}
