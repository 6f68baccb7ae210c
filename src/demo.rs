//! `nanoseek demo`: talk to a trained model with the KV-cache decoder.
//!
//! - `interactive`: a prompt loop on stdin; the reply streams to stdout as it is sampled. The
//!   conversation is one growing context (each turn prefills only its new tokens; when the
//!   context fills, the oldest tokens are dropped). `/quit` ends, `/reset` clears the history.
//! - `batch`: one prompt per line (a file or stdin; blank lines skipped), each continued
//!   independently from a fresh cache with the same seed; one JSON object per prompt (JSONL) on
//!   stdout or in `--output`.
//! - `test`: prefill and decode throughput and the KV-cache memory (measured and predicted) at
//!   a chosen context length; the synthetic long-range task accuracies join this report.
//!
//! Text ⇄ ids go through the run's codec (`data::codec::codec_for_run`): its BPE
//! `tokenizer.json`, or the embedded synthetic language.

use crate::data::codec::{codec_for_run, TextCodec};
use crate::fsutil::write_output;
use crate::generate::{generate_with, sample_token, Generation, SampleOptions};
use crate::nn::decode::{cache_row_floats, kv_bytes, kv_bytes_per_layer, kv_bytes_per_token, Decoder};
use crate::nn::{AttnKind, Model, ModelConfig};
use crate::rng::Rng;
use crate::speculative::demo as speculative;
use crate::train::checkpoint;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Interactive,
    Batch,
    Test,
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// A run directory (its newest checkpoint is used) or a checkpoint directory.
    pub model_path: PathBuf,
    pub mode: Mode,
    /// Batch mode: prompts file (default stdin).
    pub prompts: Option<PathBuf>,
    /// Batch mode: JSONL output; test mode: JSON report (default stdout).
    pub output: Option<PathBuf>,
    /// Sampling; the stop token is the codec's end-of-text (batch and interactive).
    pub sample: SampleOptions,
    /// Test mode: the context length to measure at (default: the model's max_seq_len).
    pub max_seq_len: Option<usize>,
    /// Test mode: also time the uncached forward (`Model::next_token_logits`) at that context.
    pub compare_uncached: bool,
    /// `--speculative mtp`: the MTP modules draft, the model verifies (`crate::speculative`).
    pub speculative: bool,
    /// Drafts per round (default: every MTP module).
    pub speculative_depth: Option<usize>,
}

/// The checkpoint directory `path` names: itself when it holds `model.safetensors`, else the
/// newest checkpoint of the run directory `path`.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("model.safetensors").is_file() {
        return Ok(path.to_path_buf());
    }
    // A checkpoint's own file (model.safetensors, optim.safetensors, state.json): its folder.
    if path.is_file() {
        if let Some(dir) = path.parent().filter(|d| d.join("model.safetensors").is_file()) {
            return Ok(dir.to_path_buf());
        }
        bail!("{}: a file, not a checkpoint directory (no model.safetensors beside it)", path.display());
    }
    if !path.is_dir() {
        bail!("{}: no such directory", path.display());
    }
    match checkpoint::list_steps(path).last() {
        Some(&step) => Ok(checkpoint::checkpoint_dir(path, step)),
        None => bail!(
            "{}: neither a checkpoint (no model.safetensors) nor a run directory with checkpoints",
            path.display()
        ),
    }
}

/// Loads the model and the run's text codec.
pub fn load(path: &Path) -> Result<(Model, PathBuf, Box<dyn TextCodec>)> {
    let ckpt = resolve_checkpoint(path).context("--model-path")?;
    let config = checkpoint::read_config(&ckpt)?;
    let model = checkpoint::load_model(&ckpt, &config)?;
    let codec = codec_for_run(&ckpt)?;
    if codec.vocab_size() > config.vocab_size {
        bail!("the run's tokenizer has {} ids but the model's vocab_size is {}", codec.vocab_size(), config.vocab_size);
    }
    Ok((model, ckpt, codec))
}

pub fn run(o: &DemoOptions) -> Result<()> {
    o.sample.validate()?;
    let (model, ckpt, codec) = load(&o.model_path)?;
    let mut sample = o.sample.clone();
    sample.stop_token = codec.eot();
    let spec = o.speculative.then(|| speculative::depth_for(&model, o.speculative_depth)).transpose()?;
    match o.mode {
        Mode::Interactive => interactive(&model, &ckpt, codec.as_ref(), &sample, spec),
        Mode::Batch => batch(&model, codec.as_ref(), &sample, o.prompts.as_deref(), o.output.as_deref(), spec),
        Mode::Test => {
            let mut report = capability_test(&model, &ckpt, &o.sample, o.max_seq_len, o.compare_uncached)?;
            if let Some(depth) = spec {
                let prompts = speculative::prompt_ids(codec.as_ref(), None);
                report.speculative = Some(speculative::compare(&model, &prompts, &o.sample, depth)?);
            }
            let json = serde_json::to_string_pretty(&report)?;
            match &o.output {
                Some(p) => {
                    write_output(p, format!("{json}\n").as_bytes())?;
                    eprintln!("wrote {}", p.display());
                }
                None => println!("{json}"),
            }
            eprint!("{}", report.summary());
            Ok(())
        }
    }
}

/// Prints the text of a growing list of ids as it grows (holding back an incomplete UTF-8 tail).
struct Streamer<'c> {
    codec: &'c dyn TextCodec,
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer<'_> {
    fn push(&mut self, id: u32, out: &mut dyn Write) {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids);
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return;
        }
        let _ = out.write_all(&text.as_bytes()[self.printed..]);
        let _ = out.flush();
        self.printed = text.len();
    }
}

fn context_line(d: &Decoder) -> String {
    let cap = d.capacity().map_or("unlimited".to_string(), |c| c.to_string());
    format!("context {}/{cap}, KV cache {}", d.len(), human_bytes(d.cache().bytes()))
}

fn interactive(
    model: &Model,
    ckpt: &Path,
    codec: &dyn TextCodec,
    opts: &SampleOptions,
    spec: Option<usize>,
) -> Result<()> {
    let c = &model.config;
    eprintln!(
        "nanoseek demo: {} ({:.1}M parameters, context {}, attention {}); type a prompt, /reset to clear the \
         history, /quit to exit",
        ckpt.display(),
        model.num_params() as f64 / 1e6,
        c.max_seq_len,
        c.attn_pattern
    );
    let mut decoder = Decoder::new(model)?;
    let mut rng = Rng::derive(opts.seed, "sample");
    let start: Vec<u32> = codec.bos().into_iter().collect();
    let mut transcript = start.clone();
    let stdin = std::io::stdin();
    let mut raw = Vec::new();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        raw.clear();
        if stdin.lock().read_until(b'\n', &mut raw)? == 0 {
            println!();
            break;
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            eprintln!("error: that line is not valid UTF-8; skipped");
            continue;
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                transcript = start.clone();
                decoder.reset();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        let ids = match codec.encode(text) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        // a document that ended starts a new one
        if let (Some(eot), Some(bos)) = (codec.eot(), codec.bos()) {
            if transcript.last() == Some(&eot) {
                transcript.push(bos);
            }
        }
        transcript.extend(&ids);
        if transcript.is_empty() {
            continue;
        }
        let mut stream = Streamer { codec, ids: Vec::new(), printed: 0 };
        let stdout = std::io::stdout();
        let mut show = |id| {
            if Some(id) != opts.stop_token {
                stream.push(id, &mut stdout.lock());
            }
        };
        if let Some(depth) = spec {
            // fresh caches each turn (the whole transcript is prefilled)
            let g = speculative::generate_ids(model, &transcript, opts, depth, &mut show)?;
            println!();
            transcript.extend(&g.tokens);
            eprintln!("[{} tokens, speculative, decode {:.1} tokens/s]", g.tokens.len(), g.decode_tokens_per_s());
            continue;
        }
        let g = generate_with(&mut decoder, &transcript, opts, &mut rng, &mut show)?;
        println!();
        // the decoder holds the (possibly shifted) context and all new tokens but the last
        transcript = decoder.history().to_vec();
        transcript.extend(g.tokens.last());
        eprintln!(
            "[{} tokens{}, prefill {} tokens at {:.0} tokens/s, decode {:.1} tokens/s, {}]",
            g.tokens.len(),
            if g.stopped { ", end of text" } else { "" },
            g.prefill_tokens,
            g.prefill_tokens_per_s(),
            g.decode_tokens_per_s(),
            context_line(&decoder)
        );
    }
    Ok(())
}

/// One line of batch output.
#[derive(Debug, Serialize)]
pub struct BatchRecord {
    /// 1-based line number in the prompts input.
    pub line: usize,
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// The new token ids (including the end-of-text token when drawn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
    /// "end_of_text" or "length".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_s: Option<f64>,
}

/// Continues one prompt from a fresh cache (BOS first when the codec has one); speculatively
/// with `spec = Some(depth)`.
pub fn complete(
    decoder: &mut Decoder,
    codec: &dyn TextCodec,
    prompt: &str,
    opts: &SampleOptions,
    spec: Option<usize>,
) -> Result<(Vec<u32>, Generation)> {
    let mut ids: Vec<u32> = codec.bos().into_iter().collect();
    ids.extend(codec.encode(prompt)?);
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    decoder.reset();
    let mut rng = Rng::derive(opts.seed, "sample");
    let g = match spec {
        Some(depth) => speculative::generate_ids(decoder.model(), &ids, opts, depth, &mut |_| {})?,
        None => generate_with(decoder, &ids, opts, &mut rng, &mut |_| {})?,
    };
    Ok((ids, g))
}

fn batch(
    model: &Model,
    codec: &dyn TextCodec,
    opts: &SampleOptions,
    prompts: Option<&Path>,
    output: Option<&Path>,
    spec: Option<usize>,
) -> Result<()> {
    let input: Box<dyn BufRead> = match prompts {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open prompts file {}", p.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut decoder = Decoder::new(model)?;
    let mut collected = String::new();
    let (mut n, mut errors, mut new_tokens, mut decode_s) = (0usize, 0usize, 0usize, 0.0f64);
    let stdout = std::io::stdout();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.context("cannot read the prompts")?;
        // a line that is not UTF-8 becomes an error record; the batch goes on
        let (line, bad_utf8) = match String::from_utf8(line) {
            Ok(s) => (s, false),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
        };
        let prompt = line.trim_end_matches(['\r', '\n']);
        if prompt.trim().is_empty() {
            continue;
        }
        n += 1;
        let attempt = if bad_utf8 {
            Err(anyhow::anyhow!("line {} is not valid UTF-8 (shown with replacement characters)", i + 1))
        } else {
            complete(&mut decoder, codec, prompt, opts, spec)
        };
        let rec = match attempt {
            Ok((ids, g)) => {
                new_tokens += g.tokens.len();
                decode_s += g.decode_s;
                let text_ids = match g.tokens.last() {
                    Some(&t) if g.stopped && Some(t) == opts.stop_token => &g.tokens[..g.tokens.len() - 1],
                    _ => &g.tokens[..],
                };
                BatchRecord {
                    line: i + 1,
                    prompt: prompt.to_string(),
                    error: None,
                    completion: Some(codec.decode(text_ids)),
                    prompt_tokens: Some(ids.len()),
                    finish_reason: Some(if g.stopped { "end_of_text" } else { "length" }),
                    prefill_tokens_per_s: Some(g.prefill_tokens_per_s()),
                    decode_tokens_per_s: Some(g.decode_tokens_per_s()),
                    tokens: Some(g.tokens),
                }
            }
            Err(e) => {
                errors += 1;
                BatchRecord {
                    line: i + 1,
                    prompt: prompt.to_string(),
                    error: Some(format!("{e:#}")),
                    completion: None,
                    tokens: None,
                    prompt_tokens: None,
                    finish_reason: None,
                    prefill_tokens_per_s: None,
                    decode_tokens_per_s: None,
                }
            }
        };
        let json = serde_json::to_string(&rec)?;
        if output.is_some() {
            collected.push_str(&json);
            collected.push('\n');
        } else {
            let mut out = stdout.lock();
            writeln!(out, "{json}")?;
            out.flush()?;
        }
    }
    if let Some(p) = output {
        write_output(p, collected.as_bytes())?;
    }
    eprintln!(
        "{n} prompts ({errors} errors), {new_tokens} new tokens, decode {:.1} tokens/s{}",
        if decode_s > 0.0 { new_tokens as f64 / decode_s } else { 0.0 },
        output.map_or(String::new(), |p| format!(", wrote {}", p.display()))
    );
    Ok(())
}

/// One layer's KV cache in the test report.
#[derive(Debug, Serialize)]
pub struct LayerMemory {
    pub layer: usize,
    /// "dense", "window" or "sparse".
    pub attention: String,
    pub kv_bytes: usize,
    pub predicted_kv_bytes: usize,
}

/// `demo --mode test`.
#[derive(Debug, Serialize)]
pub struct TestReport {
    pub model_path: PathBuf,
    pub attn_pattern: String,
    /// The context the measurement ran at.
    pub context_len: usize,
    /// The model's training context (beyond it the test measures speed and memory only).
    pub trained_max_seq_len: usize,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_s: f64,
    pub decode_tokens_per_s: f64,
    /// Tokens per second of the uncached forward (whole context per token) at the same context.
    pub uncached_tokens_per_s: Option<f64>,
    pub weights_bytes: usize,
    /// K/V cache bytes after `context_len` positions, measured and predicted (`kv_bytes`).
    pub kv_cache_bytes: usize,
    pub predicted_kv_cache_bytes: usize,
    /// What a dense-attention model of the same shape would cache.
    pub dense_kv_cache_bytes: usize,
    /// Floats one position occupies in a layer's cache: 2 · kv_dim (GQA keys and values) or
    /// kv_lora_rank + qk_rope_head_dim (MLA's latent row); a DSA layer adds its indexer key.
    pub kv_row_floats: usize,
    /// Bytes one more position costs over all layers if each kept every position
    /// (`decode::kv_bytes_per_token`).
    pub kv_bytes_per_token: usize,
    pub layers: Vec<LayerMemory>,
    /// Accuracy on the synthetic long-range tasks (associative recall, passkey, needle, copy).
    pub tasks: Option<serde_json::Value>,
    /// Why `tasks` is null, when it is (e.g. a model trained on other text than the tasks').
    pub tasks_skipped: Option<String>,
    /// `--speculative mtp`: plain vs speculative decoding of the same prompts.
    pub speculative: Option<speculative::SpecReport>,
}

impl TestReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "context {} ({}): prefill {} tokens at {:.0} tokens/s, decode {} tokens at {:.1} tokens/s",
            self.context_len,
            self.attn_pattern,
            self.prefill_tokens,
            self.prefill_tokens_per_s,
            self.decode_tokens,
            self.decode_tokens_per_s
        );
        if let Some(u) = self.uncached_tokens_per_s {
            s += &format!(" (uncached {u:.2} tokens/s, {:.1}× slower)", self.decode_tokens_per_s / u.max(1e-12));
        }
        s += &format!(
            "\nweights {}, KV cache {} (predicted {}; dense attention would need {})\n",
            human_bytes(self.weights_bytes),
            human_bytes(self.kv_cache_bytes),
            human_bytes(self.predicted_kv_cache_bytes),
            human_bytes(self.dense_kv_cache_bytes)
        );
        s += &self.speculative.as_ref().map_or(String::new(), speculative::SpecReport::summary);
        s
    }
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The synthetic long-range tasks (associative recall, passkey retrieval, needle retrieval, copying): 16 samples
/// each at `context_len` tokens (at most the trained context), depths spread over [0, 1], scored
/// teacher-forced by `data::tasks::score` (accuracy per task and per depth quarter). `None` when the
/// model cannot read them: the tasks use the embedded synthetic language's ids.
fn long_range_tasks(model: &Model, context_len: usize) -> Result<Option<serde_json::Value>> {
    use crate::data::tasks::{generate, score, TaskKind};
    let len = context_len.min(model.config.max_seq_len);
    let vocab = crate::data::synthetic::SyntheticLanguage::new().vocab_size();
    if model.config.vocab_size < vocab {
        return Ok(None);
    }
    let depths: Vec<f32> = (0..16).map(|i| i as f32 / 15.0).collect();
    let mut samples = Vec::new();
    for kind in TaskKind::ALL {
        if len >= kind.min_len() {
            samples.extend(generate(kind, 16, len, 0x7A5C, Some(&depths))?);
        }
    }
    if samples.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::to_value(score(model, &samples, 4)?)?))
}

/// Prefill a context of `context_len − decode` random tokens (`decode` = `max_new_tokens`),
/// decode `decode` more (one cached step each, sampling included), and report
/// throughput and memory. A `context_len` above the model's max_seq_len runs the same weights
/// with a longer RoPE range (speed and memory only: the model never trained there).
/// How far past its training context the test mode measures a model (speed and memory only).
pub const MAX_CONTEXT_STRETCH: usize = 8;

pub fn capability_test(
    model: &Model,
    ckpt: &Path,
    opts: &SampleOptions,
    context_len: Option<usize>,
    compare_uncached: bool,
) -> Result<TestReport> {
    let trained = model.config.max_seq_len;
    let len = context_len.unwrap_or(trained);
    if len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    if len > trained.saturating_mul(MAX_CONTEXT_STRETCH) {
        bail!(
            "--max-seq-len {len}: at most {MAX_CONTEXT_STRETCH} × the model's training context {trained} = {}",
            trained.saturating_mul(MAX_CONTEXT_STRETCH)
        );
    }
    let longer;
    let model = if len > trained {
        let mut cfg: ModelConfig = model.config.clone();
        cfg.max_seq_len = len;
        longer = Model::from_params(cfg, model.params.iter().map(clone_param).collect());
        eprintln!(
            "note: context {len} exceeds the model's training context {trained}; measuring speed and memory only"
        );
        &longer
    } else {
        model
    };
    let c = &model.config;
    let decode = opts.max_new_tokens.clamp(1, len - 1);
    let mut rng = Rng::derive(opts.seed, "demo-test");
    let prompt: Vec<u32> = (0..len - decode).map(|_| rng.below(c.vocab_size) as u32).collect();
    let mut decoder = Decoder::new(model)?;
    let mut srng = Rng::derive(opts.seed, "sample");
    let t0 = Instant::now();
    let mut logits = decoder.prefill(&prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..decode {
        let next = sample_token(&logits, opts, &mut srng);
        logits = decoder.step(next)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let uncached_tokens_per_s = if compare_uncached {
        let ctx = decoder.history().to_vec();
        let reps = 2;
        let t0 = Instant::now();
        for _ in 0..reps {
            model.next_token_logits(&ctx)?;
        }
        Some(reps as f64 / t0.elapsed().as_secs_f64())
    } else {
        None
    };
    let cache = decoder.cache();
    let layers = (0..c.n_layer)
        .map(|l| LayerMemory {
            layer: l,
            attention: match c.attn_kind(l) {
                AttnKind::Dense => "dense".into(),
                AttnKind::Window => "window".into(),
                AttnKind::Sparse => "sparse".into(),
            },
            kv_bytes: cache.layer_bytes(l),
            predicted_kv_bytes: kv_bytes_per_layer(c, l, decoder.len()),
        })
        .collect();
    let mut dense = c.clone();
    dense.attn_pattern = "D".into();
    // The tasks are written in the synthetic language: on a model of other text they would
    // only ever score 0%, which says nothing about its long-range ability.
    let (tasks, tasks_skipped) = if crate::data::codec::run_is_synthetic(ckpt) {
        let t = long_range_tasks(model, len)?;
        let why = t.is_none().then(|| "the model's vocabulary or context is too small for the tasks".to_string());
        (t, why)
    } else {
        let why = "the model was not trained on the embedded synthetic language the long-range tasks are written in";
        eprintln!("note: long-range tasks skipped: {why}");
        (None, Some(why.to_string()))
    };
    Ok(TestReport {
        model_path: ckpt.to_path_buf(),
        attn_pattern: c.attn_pattern.clone(),
        context_len: decoder.len(),
        trained_max_seq_len: trained,
        prefill_tokens: prompt.len(),
        prefill_s,
        prefill_tokens_per_s: prompt.len() as f64 / prefill_s.max(1e-12),
        decode_tokens: decode,
        decode_s,
        decode_tokens_per_s: decode as f64 / decode_s.max(1e-12),
        uncached_tokens_per_s,
        weights_bytes: model.num_params() * 4,
        kv_cache_bytes: cache.bytes(),
        predicted_kv_cache_bytes: kv_bytes(c, decoder.len()),
        dense_kv_cache_bytes: kv_bytes(&dense, decoder.len()),
        kv_row_floats: cache_row_floats(c),
        kv_bytes_per_token: kv_bytes_per_token(c),
        layers,
        tasks,
        tasks_skipped,
        speculative: None,
    })
}

fn clone_param(p: &crate::nn::Param) -> crate::nn::Param {
    crate::nn::Param { name: p.name.clone(), kind: p.kind, tensor: p.tensor.clone() }
}
