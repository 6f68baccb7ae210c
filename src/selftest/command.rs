//! The `nanoseek selftest` command: arguments to [`super::Options`], the table, the summary line,
//! the JSON report and the exit code (0 all pass, 1 a FAIL, 2 bad arguments, 77 no CUDA device).

use super::{format_row, Report, GROUPS};
use std::path::PathBuf;

/// Exit code when no CUDA device can be opened (the automake convention for a skipped test).
pub const EXIT_SKIP: u8 = 77;
/// Exit code for bad arguments (as clap's).
pub const EXIT_USAGE: u8 = 2;

/// The command's arguments (`nanoseek selftest --help`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Args {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Fewer and smaller shapes (seconds on a GPU).
    #[arg(long)]
    pub quick: bool,
    /// Only these groups, comma-separated (names from --list).
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Print the groups, one per line with a description, and exit.
    #[arg(long)]
    pub list: bool,
    /// Write the report (every row, the device, the commit) as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The train_step CPU reference written by --write-reference (default: computed here).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Compute the train_step CPU reference, write it here (safetensors) and exit; needs no GPU.
    #[arg(long)]
    pub write_reference: Option<PathBuf>,
}

/// `cuda` → 0, `cuda:N` → N.
pub fn parse_device(spec: &str) -> Result<usize, String> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "cuda" => Ok(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(n),
            _ => Err(format!("--device {spec}: selftest runs on cuda or cuda:N")),
        },
    }
}

/// `--list`: one group per line, its name then a one-line description.
pub fn list() -> String {
    GROUPS.iter().map(|g| format!("{:<22} {}\n", g.name, g.about)).collect()
}

/// Runs the command; returns the process exit code.
pub fn run(a: &Args) -> u8 {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        EXIT_USAGE
    };
    let ordinal = match parse_device(&a.device) {
        Ok(n) => n,
        Err(e) => return usage(e),
    };
    let only: Option<Vec<String>> = a.only.as_ref().map(|v| v.iter().map(|n| n.trim().to_string()).collect());
    if let Some(only) = &only {
        if only.is_empty() || only.iter().any(|n| n.trim().is_empty()) {
            return usage("--only needs group names, comma-separated (see --list)".into());
        }
        if let Err(e) = super::select(Some(only)) {
            return usage(format!("--only: {e}"));
        }
    }
    if a.list {
        print!("{}", list());
        return 0;
    }
    if let Some(path) = &a.write_reference {
        // CPU only: the reference is computed here and carried to the GPU machine.
        let written = super::train::reference_cpu().and_then(|r| super::train::write_reference(path, &r));
        return match written {
            Ok(()) => {
                println!("selftest: wrote the train_step reference to {}", path.display());
                0
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        };
    }
    let mut reference = a.reference.clone();
    if let Some(path) = &reference {
        if !path.exists() {
            eprintln!("selftest: reference {} not found; train_step computes it on the CPU", path.display());
            reference = None;
        }
    }
    let opts = super::Options { ordinal, quick: a.quick, only, reference, echo: true };
    let report = match super::run(&opts) {
        Ok(r) => r,
        Err(e) => return usage(format!("{e:#}")),
    };
    // the report first, so that the summary (or SKIP) line is the last line on stdout
    if let Some(out) = &a.output {
        if let Err(e) = write_json(out, &report) {
            eprintln!("error: {e:#}");
            return 1;
        }
        eprintln!("selftest: wrote {}", out.display());
    }
    if let Some(why) = &report.no_device {
        println!("selftest: SKIP: no CUDA device ({why})");
        return EXIT_SKIP;
    }
    for r in report.rows.iter().filter(|r| r.status == super::Status::Fail) {
        eprintln!("FAIL: {}", format_row(r));
    }
    println!("{}", report.summary_line());
    u8::from(report.failed > 0)
}

/// The report as JSON, written atomically (a temporary file renamed into place).
pub fn write_json(path: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    let result = match (&report.no_device, report.failed) {
        (Some(_), _) => "SKIP",
        (None, 0) => "PASS",
        _ => "FAIL",
    };
    let mut value = serde_json::to_value(report)?;
    value["result"] = result.into();
    crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&value)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cuda"), Ok(0));
        assert_eq!(parse_device("cuda:3"), Ok(3));
        assert!(parse_device("cpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }

    #[test]
    fn list_names_every_group_once_per_line() {
        let text = list();
        assert_eq!(text.lines().count(), GROUPS.len());
        for (line, g) in text.lines().zip(GROUPS) {
            assert!(line.starts_with(g.name) && line.len() > g.name.len() + 5, "{line}");
        }
    }
}
