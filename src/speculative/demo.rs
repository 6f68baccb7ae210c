//! `nanoseek demo --speculative mtp`: generation with the MTP modules drafting, and the
//! measurement `demo --mode test` reports (acceptance per depth, tokens/s with and without
//! speculation on the same prompts and sampling options).

use super::{generate_speculative_stream, SpecStats};
use crate::data::codec::TextCodec;
use crate::generate::{generate_stream, Generation, SampleOptions};
use crate::nn::Model;
use anyhow::{bail, Result};
use serde::Serialize;

/// Prompts of the test mode's comparison when none are given: each that the codec can encode
/// (the synthetic language knows the first two), BOS first when the codec has one.
const DEFAULT_PROMPTS: &[&str] = &["the color of", "there is a", "Once upon a time", "The history of", "In the"];

/// The depth `--speculative mtp` drafts with: `requested` (at most the model's mtp_depth), or
/// every module.
pub fn depth_for(model: &Model, requested: Option<usize>) -> Result<usize> {
    let d = model.config.mtp_depth;
    if d == 0 {
        bail!("--speculative mtp needs a model trained with mtp_depth > 0");
    }
    match requested {
        Some(r) if r == 0 || r > d => bail!("--speculative-depth {r}: the model has {d} MTP modules (1..={d})"),
        Some(r) => Ok(r),
        None => Ok(d),
    }
}

/// The comparison's prompts as ids: `texts` (or [`DEFAULT_PROMPTS`]) that encode, BOS first.
pub fn prompt_ids(codec: &dyn TextCodec, texts: Option<&[String]>) -> Vec<Vec<u32>> {
    let defaults: Vec<String> = DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect();
    let texts = texts.unwrap_or(&defaults);
    let mut out: Vec<Vec<u32>> = texts
        .iter()
        .filter_map(|t| codec.encode(t).ok())
        .map(|ids| codec.bos().into_iter().chain(ids).collect::<Vec<u32>>())
        .filter(|ids| !ids.is_empty())
        .collect();
    if out.is_empty() {
        out.push(vec![codec.bos().unwrap_or(0)]);
    }
    out
}

/// Runs per prompt and decoder; the fastest is reported.
const TIMINGS: usize = 3;

/// Plain and speculative decoding of the same prompts, in `demo --mode test`'s report.
#[derive(Clone, Debug, Serialize)]
pub struct SpecReport {
    /// Drafts per round (MTP modules used).
    pub depth: usize,
    pub prompts: usize,
    pub temperature: f32,
    /// New tokens per prompt (no stop token, so both decoders produce this many).
    pub max_new_tokens: usize,
    /// Decode throughput (tokens after the first, over the time after the prefill; per prompt
    /// the fastest of 3 runs).
    pub plain_tokens_per_s: f64,
    pub speculative_tokens_per_s: f64,
    pub speedup: f64,
    /// Per depth, accepted / judged drafts (a draft is judged when the ones before it were accepted).
    pub acceptance: Vec<f64>,
    /// New tokens per main-model forward during decoding (1 without speculation).
    pub tokens_per_forward: f64,
    pub stats: SpecStats,
    /// At temperature 0: whether every prompt's tokens were identical (they must be).
    pub greedy_identical: Option<bool>,
}

impl SpecReport {
    pub fn summary(&self) -> String {
        let acc: Vec<String> = self.acceptance.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect();
        format!(
            "speculative (mtp, depth {}, {} prompts × {} tokens, temperature {}): acceptance per depth [{}], {:.2} \
             tokens per forward; decode {:.1} tokens/s vs {:.1} plain ({:.2}×){}\n",
            self.depth,
            self.prompts,
            self.max_new_tokens,
            self.temperature,
            acc.join(", "),
            self.tokens_per_forward,
            self.speculative_tokens_per_s,
            self.plain_tokens_per_s,
            self.speedup,
            match self.greedy_identical {
                Some(true) => ", greedy outputs identical",
                Some(false) => ", GREEDY OUTPUTS DIFFER",
                None => "",
            }
        )
    }
}

/// Decodes every prompt plainly and speculatively (`opts` without its stop token) and compares.
pub fn compare(model: &Model, prompts: &[Vec<u32>], opts: &SampleOptions, depth: usize) -> Result<SpecReport> {
    let opts = SampleOptions { stop_token: None, ..opts.clone() };
    let (mut plain, mut spec) = ((0usize, 0.0f64), (0usize, 0.0f64));
    let mut stats = SpecStats::default();
    let mut identical = true;
    let rate = |(n, s): (usize, f64)| if s > 0.0 { n as f64 / s } else { 0.0 };
    for p in prompts {
        // the same seed each time: the same tokens; the fastest of TIMINGS runs counts (a
        // machine busy with other work slows some runs, never speeds one up)
        let (mut a_s, mut b_s) = (f64::MAX, f64::MAX);
        let (mut a, mut b) = (Generation::default(), None);
        for _ in 0..TIMINGS {
            a = generate_stream(model, p, &opts, &mut |_| {})?;
            let g = generate_speculative_stream(model, p, &opts, depth, &mut |_| {})?;
            (a_s, b_s) = (a_s.min(a.decode_s), b_s.min(g.generation.decode_s));
            b = Some(g);
        }
        let b = b.expect("TIMINGS ≥ 1");
        plain = (plain.0 + a.decode_steps, plain.1 + a_s);
        spec = (spec.0 + b.generation.decode_steps, spec.1 + b_s);
        identical &= a.tokens == b.generation.tokens;
        stats.merge(&b.stats);
    }
    let (plain_tps, spec_tps) = (rate(plain), rate(spec));
    Ok(SpecReport {
        depth,
        prompts: prompts.len(),
        temperature: opts.temperature,
        max_new_tokens: opts.max_new_tokens,
        plain_tokens_per_s: plain_tps,
        speculative_tokens_per_s: spec_tps,
        speedup: if plain_tps > 0.0 { spec_tps / plain_tps } else { 0.0 },
        acceptance: stats.acceptance(),
        tokens_per_forward: if stats.rounds > 0 { spec.0 as f64 / stats.rounds as f64 } else { 0.0 },
        stats,
        greedy_identical: (opts.temperature <= 0.0).then_some(identical),
    })
}

/// Continues `ids` speculatively (fresh caches), streaming each token to `on_token`.
pub fn generate_ids(
    model: &Model,
    ids: &[u32],
    opts: &SampleOptions,
    depth: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    Ok(generate_speculative_stream(model, ids, opts, depth, on_token)?.generation)
}
