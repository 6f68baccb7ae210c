//! Sampling from a model with the KV-cache decoder (`nn::decode`): the prompt is prefilled in
//! one pass, then each new token costs one cached step. Temperature, top-k and top-p (nucleus)
//! over the softcapped logits, a seed, a stop token, a token budget, a streaming callback, and
//! prefill / decode throughput.
//!
//! Context: a model with dense layers can cache at most `max_seq_len` positions. A prompt that
//! does not leave room for the new tokens is cut to its tail (room kept for
//! `min(max_new_tokens, max_seq_len / 2)` tokens), and when decoding fills the context the cache is
//! rebuilt from the last `max_seq_len / 2` tokens (a context shift, counted in
//! [`Generation::context_shifts`]). All-window models have no limit and never shift.
//! [`generate_uncached`] (every step reruns `Model::next_token_logits` on the whole context) is
//! the reference the tests compare against.

use crate::nn::decode::Decoder;
use crate::nn::Model;
use crate::rng::Rng;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`
    /// (after temperature and top-k); 1 = all.
    pub top_p: f32,
    /// Generation ends after drawing this token (it is returned).
    pub stop_token: Option<u32>,
    pub seed: u64,
}

impl SampleOptions {
    /// Temperature a finite number ≥ 0, top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            anyhow::bail!("--temperature must be a finite number ≥ 0 (0 = greedy), got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("--top-p must lie in (0, 1] (1 = all tokens), got {}", self.top_p);
        }
        Ok(())
    }
}

impl Default for SampleOptions {
    /// 64 tokens, plain sampling at temperature 1 (no top-k, no top-p), no stop token, seed 0.
    fn default() -> Self {
        SampleOptions { max_new_tokens: 64, temperature: 1.0, top_k: 0, top_p: 1.0, stop_token: None, seed: 0 }
    }
}

/// The sampling distribution after temperature, top-k and top-p: `(token, probability)` pairs,
/// most likely first (ties: lower id first), probabilities summing to 1. Temperature ≤ 0 gives
/// the argmax alone.
pub fn candidates(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<(u32, f64)> {
    if temperature <= 0.0 || logits.len() <= 1 {
        return vec![(argmax(logits), 1.0)];
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if top_k > 0 && top_k < idx.len() {
        idx.select_nth_unstable_by(top_k - 1, desc);
        idx.truncate(top_k);
    }
    let mx = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
    let weight = |i: usize| (((logits[i] - mx) / temperature) as f64).exp();
    let total: f64 = idx.iter().map(|&i| weight(i)).sum();
    let keep = if top_p < 1.0 {
        // the nucleus: the shortest most-likely-first prefix whose mass reaches top_p; sort
        // only a growing head of the candidates (the nucleus is usually small)
        let target = top_p.max(0.0) as f64 * total;
        let mut head = 64.min(idx.len());
        loop {
            if head < idx.len() {
                idx.select_nth_unstable_by(head - 1, desc);
            }
            idx[..head].sort_unstable_by(desc);
            let mut cum = 0.0;
            let found = idx[..head].iter().position(|&i| {
                cum += weight(i);
                cum >= target
            });
            match found {
                Some(p) => break p + 1,
                None if head == idx.len() => break head,
                None => head = (2 * head).min(idx.len()),
            }
        }
    } else {
        idx.sort_unstable_by(desc);
        idx.len()
    };
    idx.truncate(keep);
    let kept: f64 = idx.iter().map(|&i| weight(i)).sum();
    idx.into_iter().map(|i| (i as u32, weight(i) / kept)).collect()
}

/// Draws one token id from softcapped logits with the options' temperature, top-k and top-p.
pub fn sample_token(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let c = candidates(logits, opts.temperature, opts.top_k, opts.top_p);
    let w: Vec<f64> = c.iter().map(|&(_, p)| p).collect();
    c[rng.categorical(&w)].0
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

/// The new tokens of one generation and how long it took.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Generation {
    /// New tokens only (ending with the stop token when it was drawn).
    pub tokens: Vec<u32>,
    /// Whether generation ended on the stop token.
    pub stopped: bool,
    /// Tokens run through the model before the first new one (the part of the context that
    /// was not already cached).
    pub prefill_tokens: usize,
    /// Context tokens found already in the cache (a conversation's earlier turns).
    pub reused_tokens: usize,
    pub prefill_s: f64,
    /// Cached steps (each feeds one new token and yields the next one's logits).
    pub decode_steps: usize,
    /// Time of the steps, sampling and any context shift.
    pub decode_s: f64,
    /// Times the context was full and the cache was rebuilt from its tail.
    pub context_shifts: usize,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_s)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// Continues `prompt` with a fresh cache; returns only the new tokens (ending at the stop token,
/// if drawn). The random stream is `Rng::derive(opts.seed, "sample")`.
pub fn generate(model: &Model, prompt: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
    Ok(generate_stream(model, prompt, opts, &mut |_| {})?.tokens)
}

/// As [`generate`], calling `on_token` with each new token as soon as it is drawn, and
/// returning the timing.
pub fn generate_stream(
    model: &Model,
    prompt: &[u32],
    opts: &SampleOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    let mut decoder = Decoder::new(model)?;
    let mut rng = Rng::derive(opts.seed, "sample");
    generate_with(&mut decoder, prompt, opts, &mut rng, on_token)
}

/// Continues `context` on an existing decoder: the cached prefix of `context` is reused (so a
/// conversation prefills only its new turn), the rest is prefilled, then one cached step per
/// token. Draws from `rng` (`opts.seed` is not used here). The decoder is left holding
/// `context` and every new token but the last.
pub fn generate_with(
    decoder: &mut Decoder,
    context: &[u32],
    opts: &SampleOptions,
    rng: &mut Rng,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    anyhow::ensure!(!context.is_empty(), "generate: the prompt must hold at least one token");
    let cap = decoder.capacity();
    // room kept for new tokens when the context has to be cut
    let reserve = |left: usize| cap.map_or(0, |c| left.min(c / 2));
    let mut g = Generation::default();
    if opts.max_new_tokens == 0 {
        return Ok(g);
    }
    let t0 = Instant::now();
    let cached = decoder.history().len();
    let common = decoder.history().iter().zip(context).take_while(|(a, b)| a == b).count();
    let mut logits = decoder.sync(context, reserve(opts.max_new_tokens))?;
    // sync keeps the cached prefix only when the context extends it and still fits
    g.reused_tokens = if decoder.history().len() == context.len() && common == cached { cached } else { 0 };
    g.prefill_tokens = decoder.history().len() - g.reused_tokens;
    g.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut ctx = decoder.history().to_vec();
    loop {
        let next = sample_token(&logits, opts, rng);
        g.tokens.push(next);
        on_token(next);
        if Some(next) == opts.stop_token {
            g.stopped = true;
            break;
        }
        if g.tokens.len() >= opts.max_new_tokens {
            break;
        }
        ctx.push(next);
        logits = if cap.is_some_and(|c| decoder.len() + 1 > c) {
            g.context_shifts += 1;
            // keep the newest half of the context
            let l = decoder.sync(&ctx, cap.unwrap_or(0) / 2)?;
            ctx = decoder.history().to_vec();
            l
        } else {
            g.decode_steps += 1;
            decoder.step(next)?
        };
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}

/// The reference: every step reruns the full forward (`Model::next_token_logits`, which keeps
/// the last `max_seq_len` tokens) on the whole context. Same sampling and random stream as
/// [`generate`].
pub fn generate_uncached(model: &Model, prompt: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
    anyhow::ensure!(!prompt.is_empty(), "generate: the prompt must hold at least one token");
    model.check_ids(prompt)?;
    let mut rng = Rng::derive(opts.seed, "sample");
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..opts.max_new_tokens {
        let logits = model.next_token_logits(&ids)?;
        let next = sample_token(&logits, opts, &mut rng);
        ids.push(next);
        out.push(next);
        if Some(next) == opts.stop_token {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_k() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(argmax(&logits), 1);
        assert_eq!(candidates(&logits, 0.0, 0, 1.0), vec![(1, 1.0)]);
        let c = candidates(&logits, 1.0, 3, 1.0);
        let ids: Vec<u32> = c.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        assert!((c.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
