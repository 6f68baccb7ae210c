//! The `nanoseek` command line: parse, call the library, print.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nanoseek::kernels::launch::gemm::{set_gemm_engine, GemmEngine};
use nanoseek::train;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli {
    pub mod train;
}
use cli::train::{run_train, ModelArgs, TrainArgs};

#[derive(Parser)]
#[command(name = "nanoseek", version, about = "Train DeepSeek-V3.2-style language models end to end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: `tiny` on the embedded synthetic language, a few minutes on a laptop CPU).
    Train(Box<TrainArgs>),
    /// Exact parameter counts per component and predicted memory for a model size or config.
    Info(InfoArgs),
    /// Loss, perplexity and bits per byte of a checkpoint (default data: the run's own validation split).
    Eval(EvalArgs),
    /// Prepare data: train (or load) a BPE tokenizer, write token shards, a train/val split and a manifest.
    Data(Box<DataArgs>),
    /// Time a few training steps per op, with FLOP/s, MFU and the memory breakdown.
    Profile(ProfileArgs),
    /// Talk to a trained model (KV-cache generation): interactive, batch (JSONL) or test (speed and memory).
    Demo(DemoArgs),
    /// Time the CUDA kernels at PyTorch's shapes: rates, fraction of the ceilings, ratio to a torch_baselines.py JSON.
    Bench(BenchArgs),
    /// Every CUDA kernel family against its CPU twin: a PASS/FAIL table with margins, exit 0/1 (77: no device).
    Selftest(nanoseek::selftest::command::Args),
    /// The run report (report.md) of a run directory, rebuilt from its files: written there and printed.
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// A run directory (runs/NAME).
    run_dir: PathBuf,
    /// Print only; do not write RUN_DIR/report.md.
    #[arg(long)]
    no_write: bool,
}

fn run_report(r: &ReportArgs) -> Result<()> {
    if r.no_write {
        print!("{}", nanoseek::report::render(&r.run_dir)?);
    } else {
        let path = nanoseek::report::write(&r.run_dir)?;
        print!("{}", std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?);
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    /// cuda or cuda:N (the CPU kernels have criterion benches: cargo bench).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The JSON written by scripts/torch_baselines.py in the same run, for the ratio column.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Fewer and smaller cases (as torch_baselines.py --quick).
    #[arg(long)]
    quick: bool,
    /// Calls per timed batch.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// GEMM engine of the engine's GEMM calls: native (cuda/gemm.cu), cublaslt or wgmma (the
    /// sm_90a kernel of cuda/gemm.cu, compute capability 9.0 only). The GEMM cases are timed on
    /// every engine either way (cuBLASLt when its library loads, wgmma on 9.0).
    #[arg(long, default_value = "native", value_parser = ["native", "cublaslt", "wgmma"])]
    gemm: String,
    /// Write the report here as JSON lines, appended and flushed as each case finishes: the run's
    /// facts, one line per case (timed or skipped), a summary.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Skip a case whose warm-up call alone takes longer than this, and its larger shapes.
    #[arg(long, default_value_t = nanoseek::bench::ROW_BUDGET_S)]
    row_budget_s: f64,
    /// Skip every case left once this many seconds have passed (the command still exits 0).
    #[arg(long, default_value_t = nanoseek::bench::TOTAL_BUDGET_S)]
    budget_s: f64,
}

#[derive(Args)]
struct DemoArgs {
    /// A run directory (its newest checkpoint) or a checkpoint directory.
    #[arg(long)]
    model_path: PathBuf,
    /// interactive: prompt loop with streaming output; batch: prompts one per line, JSONL out;
    /// test: prefill/decode tokens/s and KV-cache memory at --max-seq-len.
    #[arg(long, value_enum, default_value = "interactive")]
    mode: nanoseek::demo::Mode,
    /// Batch mode: file of prompts, one per line (default: stdin).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Batch mode: write the JSONL here; test mode: the JSON report (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample from the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the most likely tokens holding this much probability (1 = all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Most tokens per reply (test mode: tokens decoded).
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Test mode: context length to measure at (default: the model's max_seq_len).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Test mode: also time the uncached forward at the same context.
    #[arg(long)]
    compare_uncached: bool,
    /// Speculative decoding: `mtp` drafts with the model's multi-token-prediction modules
    /// (a model trained with mtp_depth > 0); the output keeps the model's distribution (greedy:
    /// the same tokens). Test mode adds the acceptance per depth and tokens/s with and without.
    #[arg(long, value_parser = ["mtp"])]
    speculative: Option<String>,
    /// Drafts per round with --speculative mtp (default: every MTP module).
    #[arg(long, requires = "speculative")]
    speculative_depth: Option<usize>,
}

impl DemoArgs {
    fn options(self) -> nanoseek::demo::DemoOptions {
        nanoseek::demo::DemoOptions {
            model_path: self.model_path,
            mode: self.mode,
            prompts: self.prompts,
            output: self.output,
            sample: nanoseek::generate::SampleOptions {
                max_new_tokens: self.max_new_tokens,
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                stop_token: None,
                seed: self.seed,
            },
            max_seq_len: self.max_seq_len,
            compare_uncached: self.compare_uncached,
            speculative: self.speculative.is_some(),
            speculative_depth: self.speculative_depth,
        }
    }
}

#[derive(Args)]
struct ProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Recompute every N-th block in the backward (0 = off).
    #[arg(long, default_value_t = 0)]
    grad_checkpoint: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Write the report as JSON here (and an SVG chart beside it, same name with .svg).
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per micro-batch for the memory prediction.
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Recompute every N-th block in the backward (0 = off), for the memory prediction.
    #[arg(long, default_value_t = 0)]
    grad_checkpoint: usize,
    /// Data-parallel ranks: also predict each rank's optimizer state (ZeRO-1 shards it).
    #[arg(long)]
    world_size: Option<usize>,
    /// Training precision; the CPU engine trains in f32 (bf16 arrives with the CUDA backend).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// One table for every preset (batch 1 at each preset's max_seq_len) beside the sizes the
    /// project's original specification claimed for them.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A run directory (its newest checkpoint) or a checkpoint directory (runs/NAME/checkpoints/step_NNNNNN).
    #[arg(long)]
    model_path: PathBuf,
    /// A `nanoseek data` folder (its val split), or a token shard, nanoseek or llm.c (its last 5%, as
    /// `train` holds it out); default: the run's own data (its config.json), else the embedded
    /// validation stream.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The split of a data folder to score: val (default), test or train.
    #[arg(long)]
    split: Option<String>,
    /// Start every window at a document's BOS (tails of documents longer than a window are not scored).
    #[arg(long)]
    bos_aligned: bool,
    /// Stop after the batch that brings the scored tokens to at least this many.
    #[arg(long, default_value_t = 65536)]
    eval_tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also score synthetic long-range tasks (comma-separated: recall, passkey, needle, copy), by context depth.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Samples per task.
    #[arg(long, default_value_t = 64)]
    task_samples: usize,
    /// Tokens per task sample (default: the model's max_seq_len).
    #[arg(long)]
    task_len: Option<usize>,
    /// Depth buckets of the task accuracy.
    #[arg(long, default_value_t = 4)]
    depth_buckets: usize,
}

/// Applies `--gemm` to every CUDA GEMM of the process (an error when cuBLASLt cannot be loaded).
fn select_gemm(name: &str) -> Result<GemmEngine> {
    let engine: GemmEngine = name.parse().map_err(|e: String| anyhow::anyhow!("--gemm: {e}"))?;
    set_gemm_engine(engine).map_err(|e| anyhow::anyhow!("--gemm {name}: {e}"))?;
    Ok(engine)
}

fn run_profile(p: &ProfileArgs) -> Result<()> {
    let cfg = p.model.resolve()?;
    let report = nanoseek::profile::run(&cfg, p.device_batch_size, p.grad_checkpoint, p.steps)?;
    print!("{}", report.table());
    if let Some(out) = &p.output {
        nanoseek::fsutil::write_output(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        let svg = out.with_extension("svg");
        nanoseek::fsutil::write_output(&svg, report.svg().as_bytes())?;
        println!("wrote {} and {}", out.display(), svg.display());
    }
    Ok(())
}

fn run_bench(b: &BenchArgs) -> Result<()> {
    let ordinal = match b.device.as_str() {
        "cuda" => 0,
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("--device {d}: nanoseek bench runs on cuda or cuda:N"),
        },
    };
    let gemm = select_gemm(&b.gemm)?;
    let opts = nanoseek::bench::BenchOptions {
        ordinal,
        quick: b.quick,
        baseline: b.baseline.clone(),
        iters: b.iters,
        gemm,
        row_budget_s: b.row_budget_s,
        budget_s: b.budget_s,
        output: b.output.clone(),
    };
    let report = nanoseek::bench::run(&opts)?;
    // The rows were printed as they finished; the whole table again, with the skipped cases last.
    println!("\nsummary: {} cases timed, {} skipped", report.rows.len(), report.skipped.len());
    print!("{}", nanoseek::bench::table(&report));
    if let Some(out) = &b.output {
        println!("wrote {}", out.display());
    }
    let bad = report.non_finite();
    if !bad.is_empty() {
        anyhow::bail!("{} case(s) wrote NaN or infinite outputs: {}", bad.len(), bad.join("; "));
    }
    Ok(())
}

fn run_info(i: &InfoArgs) -> Result<()> {
    if i.dtype != "f32" {
        anyhow::bail!("--dtype {}: the CPU engine trains in f32 only (bf16 arrives with the CUDA backend)", i.dtype);
    }
    if i.all {
        return write_stdout(&nanoseek::info::presets_table()?);
    }
    let cfg = i.model.resolve()?;
    train::micro_batch_tokens(i.device_batch_size, cfg.max_seq_len).context("--device-batch-size")?;
    write_stdout(&nanoseek::info::report(&i.model.model_size, &cfg))?;
    write_stdout(&nanoseek::info::memory_report(&cfg, i.device_batch_size, cfg.max_seq_len, i.grad_checkpoint))?;
    match i.world_size {
        Some(0) => anyhow::bail!("--world-size must be at least 1"),
        Some(n) => write_stdout(&train::zero::optimizer_report(&cfg, n)),
        None => Ok(()),
    }
}

/// Prints to stdout, reporting a failed write (a full disk, a closed pipe) as an error, not a panic.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("cannot write to standard output")
}

#[derive(Args)]
struct DataArgs {
    /// Text or JSONL (.jsonl) files or folders; with --dataset wikitext, the WikiText folder.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Validation text or JSONL files or folders (default: hold out --val-fraction of the documents).
    #[arg(long, num_args = 1..)]
    val_input: Vec<PathBuf>,
    /// A known dataset layout: wikitext (wiki.train.tokens … or train.txt/valid.txt/test.txt).
    #[arg(long)]
    dataset: Option<String>,
    /// The string field holding the text in JSONL records.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// Documents of the embedded synthetic language instead of text (no tokenizer).
    #[arg(long)]
    synthetic: bool,
    /// With --synthetic: documents to generate.
    #[arg(long, default_value_t = 10000)]
    num_samples: usize,
    /// With --synthetic: tokens per document at most.
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    /// With --synthetic: long-range task samples of exactly --max-seq-len tokens (comma-separated:
    /// recall, passkey, needle, copy; depths uniform in [0, 1]) instead of plain documents.
    #[arg(long, value_delimiter = ',')]
    task: Vec<String>,
    /// Use this tokenizer.json (GPT-2's, DeepSeek's, …) instead of training one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained BPE tokenizer (256 bytes and the special tokens included).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Train the tokenizer on at most this many bytes of text.
    #[arg(long, default_value_t = 1 << 30)]
    tokenizer_train_bytes: u64,
    /// Fraction of documents held out for validation (without --val-input).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Seed (for --synthetic).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder (tokenizer.json, train.bin, val.bin, manifest.json).
    #[arg(long, short, default_value = "data")]
    output: PathBuf,
    /// No progress bars or messages.
    #[arg(long)]
    quiet: bool,
    /// Write into --output even when it already holds files (they are replaced).
    #[arg(long)]
    force: bool,
}

fn run_data(d: DataArgs) -> Result<()> {
    if !d.force {
        if let Ok(mut entries) = std::fs::read_dir(&d.output) {
            if entries.next().is_some() {
                anyhow::bail!(
                    "--output {} already holds files (runs may point to it); choose another folder or add --force to replace them",
                    d.output.display()
                );
            }
        }
    }
    use nanoseek::data::prepare::{prepare, PrepareOptions};
    let o = PrepareOptions {
        inputs: d.input,
        val_inputs: d.val_input,
        dataset: d.dataset,
        jsonl_field: d.jsonl_field,
        synthetic: d.synthetic.then_some((d.num_samples, d.max_seq_len)),
        tasks: d.task.iter().map(|t| nanoseek::data::tasks::TaskKind::parse(t)).collect::<Result<_>>()?,
        tokenizer: d.tokenizer,
        vocab_size: d.vocab_size,
        tokenizer_train_bytes: d.tokenizer_train_bytes,
        val_fraction: d.val_fraction,
        seed: d.seed,
        output: d.output.clone(),
        progress: !d.quiet,
    };
    let m = prepare(&o)?;
    println!("wrote {} (tokenizer: {}, {} ids)", d.output.display(), m.tokenizer.kind, m.vocab_size);
    for (name, s) in &m.splits {
        println!(
            "  {name:<5} {:>12} tokens {:>8} documents {:>13} bytes  {:.2} bytes/token  {}",
            s.tokens,
            s.documents,
            s.bytes,
            s.bytes_per_token,
            d.output.join(&s.file).display()
        );
    }
    println!("train on it: nanoseek train --data {}", d.output.display());
    Ok(())
}

fn run_eval(e: EvalArgs) -> Result<()> {
    let o = nanoseek::eval::EvalOptions {
        model_path: nanoseek::demo::resolve_checkpoint(&e.model_path).context("--model-path")?,
        data: e.data,
        split: e.split,
        batch_size: e.batch_size,
        eval_tokens: e.eval_tokens,
        bos_aligned: e.bos_aligned,
        output: e.output,
        tasks: e.tasks,
        task_samples: e.task_samples,
        task_len: e.task_len,
        depth_buckets: e.depth_buckets,
    };
    let r = nanoseek::eval::evaluate(&o)?;
    write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => run_train(*a),
        Command::Eval(e) => run_eval(e),
        Command::Data(d) => run_data(*d),
        Command::Info(i) => run_info(&i),
        Command::Profile(p) => run_profile(&p),
        Command::Demo(d) => nanoseek::demo::run(&d.options()),
        Command::Bench(b) => run_bench(&b),
        Command::Report(r) => run_report(&r),
        Command::Selftest(s) => return ExitCode::from(nanoseek::selftest::command::run(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
