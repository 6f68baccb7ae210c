//! Speculative decoding with the model's multi-token-prediction (MTP) modules as the draft
//! model (`--speculative mtp`): each round the modules draft up to `depth` tokens, one forward
//! of the main model verifies them, and the caches roll back what is rejected.
//!
//! - [`sampling`]: accept/reject so that the output is distributed exactly as the main model's
//!   (greedy: identical tokens);
//! - [`decoder`]: the caches and one round;
//! - [`generate_speculative`]: the loop of `crate::generate::generate_stream` (same prompt cut,
//!   same context shifts, same stop token and budget) with rounds instead of single steps.

pub mod decoder;
pub mod demo;
pub mod sampling;

use crate::generate::{sample_token, Generation, SampleOptions};
use crate::nn::decode::context_limit;
use crate::nn::Model;
use crate::rng::Rng;
use anyhow::{ensure, Result};
pub use decoder::{SpecDecoder, SpecStats};
use serde::Serialize;
use std::time::Instant;

/// A speculative generation: the tokens and timing (`generation.decode_steps` counts the tokens
/// after the first, so its tokens/s compare with plain decoding's), and the drafts' statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpecGeneration {
    pub generation: Generation,
    pub stats: SpecStats,
}

/// As [`crate::generate::generate`], drafting `depth` tokens per round with the MTP modules.
pub fn generate_speculative(model: &Model, prompt: &[u32], opts: &SampleOptions, depth: usize) -> Result<Vec<u32>> {
    Ok(generate_speculative_stream(model, prompt, opts, depth, &mut |_| {})?.generation.tokens)
}

/// As [`crate::generate::generate_stream`] (a fresh cache, the random stream
/// `Rng::derive(opts.seed, "sample")`), speculatively: at temperature 0 the tokens are those of
/// `generate_stream`; otherwise they have the same distribution (not the same draws).
pub fn generate_speculative_stream(
    model: &Model,
    prompt: &[u32],
    opts: &SampleOptions,
    depth: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<SpecGeneration> {
    ensure!(!prompt.is_empty(), "generate: the prompt must hold at least one token");
    let mut dec = SpecDecoder::new(model, depth)?;
    let mut rng = Rng::derive(opts.seed, "sample");
    let cap = context_limit(&model.config);
    let mut g = Generation::default();
    if opts.max_new_tokens == 0 {
        return Ok(SpecGeneration { generation: g, stats: dec.stats.clone() });
    }
    // the prompt cut and the context shift of `generate_with` / `Decoder::sync`: keep the tail
    // that leaves `reserve` positions free
    let tail = |ctx: &[u32], reserve: usize| -> usize {
        cap.map_or(ctx.len(), |c| ctx.len().min(c.saturating_sub(reserve).max(1)))
    };
    let t0 = Instant::now();
    let keep = tail(prompt, cap.map_or(0, |c| opts.max_new_tokens.min(c / 2)));
    let mut logits = dec.prefill(&prompt[prompt.len() - keep..])?;
    g.prefill_tokens = keep;
    g.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // emits one token; true when generation ends
    let mut emit = |g: &mut Generation, t: u32| {
        g.tokens.push(t);
        on_token(t);
        g.stopped = Some(t) == opts.stop_token;
        g.stopped || g.tokens.len() >= opts.max_new_tokens
    };
    'context: loop {
        let mut pending = sample_token(&logits, opts, &mut rng);
        if emit(&mut g, pending) {
            break;
        }
        loop {
            let len = dec.len();
            if let Some(c) = cap.filter(|&c| len + 1 > c) {
                // full: rebuild from the newest half, as plain decoding does
                g.context_shifts += 1;
                let mut ctx = dec.history().to_vec();
                ctx.push(pending);
                let keep = tail(&ctx, c / 2);
                logits = dec.prefill(&ctx[ctx.len() - keep..])?;
                continue 'context;
            }
            let left = opts.max_new_tokens - g.tokens.len();
            let room = cap.map_or(usize::MAX, |c| c - len - 1);
            let n = depth.min(left - 1).min(room).min(dec.draftable());
            let (accepted, next) = dec.round(pending, n, opts, &mut rng)?;
            for t in accepted.into_iter().chain([next]) {
                if emit(&mut g, t) {
                    break 'context;
                }
            }
            pending = next;
        }
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    g.decode_steps = g.tokens.len() - 1;
    Ok(SpecGeneration { generation: g, stats: dec.stats.clone() })
}
