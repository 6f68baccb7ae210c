//! Sampling from a model: temperature and top-k over the softcapped logits.
//! (Uncached: every step reruns the forward over the whole context. The
//! KV-cache decoder arrives with the generation issue.)

use crate::nn::Model;
use crate::rng::Rng;
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = all.
    pub top_k: usize,
    pub stop_token: Option<u32>,
    pub seed: u64,
}

/// Draws one token id from logits.
pub fn sample_token(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < idx.len() {
        idx.select_nth_unstable_by(top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(top_k);
        idx.sort_unstable();
    }
    let mx = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = idx.iter().map(|&i| (((logits[i] - mx) / temperature) as f64).exp()).collect();
    idx[rng.categorical(&w)] as u32
}

fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

/// Continues `prompt`; returns only the new tokens (ending at the stop token, if drawn).
pub fn generate(model: &Model, prompt: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
    anyhow::ensure!(!prompt.is_empty(), "generate: the prompt must hold at least one token");
    model.check_ids(prompt)?;
    let mut rng = Rng::derive(opts.seed, "sample");
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..opts.max_new_tokens {
        let logits = model.next_token_logits(&ids)?;
        let next = sample_token(&logits, opts.temperature, opts.top_k, &mut rng);
        ids.push(next);
        out.push(next);
        if Some(next) == opts.stop_token {
            break;
        }
    }
    Ok(out)
}
