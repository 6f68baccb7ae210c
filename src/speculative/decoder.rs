//! The speculative decoder: the main model's KV cache, one cache per MTP module, and the hidden
//! rows each module still has to read.
//!
//! **Positions.** Module k at position i reads depth k − 1's hidden row at i (depth 0: the main
//! model's last block) and the token `x_{i+k}`, and its logits predict `x_{i+k+1}`. A round starts
//! with the main cache holding `x_0..=x_q` and the token `x_{q+1}` drawn but not yet run. Module
//! k runs its positions from its cache length up to q: position i uses the true token when
//! `i + k ≤ q + 1`, else a draft of this round; the last row (position q) drafts `d_k`, the token
//! `x_{q+1+k}`. Rows computed from drafts are temporaries: module k's cache is rolled back to its
//! true positions right after the call (at most k − 1 rows), and the true output rows are kept
//! for module k + 1. One main forward of `[x_{q+1}, d_1..d_n]` then gives `p_0..p_n`;
//! [`super::sampling::verify`] accepts `a` drafts and draws the next token; the main cache is
//! rolled back to `x_{q+1}, d_1..d_a` and those rows' hidden states join depth 0's.
//!
//! So every cached row of every module is the one a non-speculative MTP forward of the true
//! sequence computes (up to summation order), the drafts only decide what gets verified, and
//! the output is the main model's (exactly: [`super::sampling`]). The caches are made with
//! `slack = depth`, so window layers can roll back a whole round.
//!
//! **Limits.** A module whose layer is dense or DSA caches at most `max_seq_len` positions; on
//! a main model of window layers only (no context limit) it stops drafting there, and decoding
//! goes on with the modules before it (or none: one token per forward). With an expert capacity
//! limit (`expert_capacity_factor`) the rows of a verify call compete for capacity as a
//! prefill's rows do, so outputs can differ from one-token steps; dropless routing (the
//! default) routes every row as alone.

use super::sampling::{draw, verify};
use crate::autograd::Tape;
use crate::backend::{math, CpuOps, LayerCache};
use crate::generate::{candidates, SampleOptions};
use crate::nn::decode::{layer_cache, Decoder, KvCache};
use crate::nn::{AttnKind, Model};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use serde::Serialize;

/// Hidden rows of one depth at positions `start..start + rows`.
#[derive(Clone, Debug, Default)]
struct Rows {
    start: usize,
    data: Vec<f32>,
}

impl Rows {
    fn end(&self, c: usize) -> usize {
        self.start + self.data.len() / c
    }

    /// Rows of positions `from..self.end()`.
    fn from(&self, from: usize, c: usize) -> &[f32] {
        &self.data[(from - self.start) * c..]
    }

    /// Forgets the rows before position `pos`.
    fn drop_before(&mut self, pos: usize, c: usize) {
        let n = pos.saturating_sub(self.start).min(self.data.len() / c);
        self.data.drain(..n * c);
        self.start += n;
    }

    fn clear(&mut self) {
        (self.start, self.data) = (0, Vec::new());
    }
}

/// Draft and acceptance counts per depth (index k − 1 for module k).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpecStats {
    /// Main-model forwards after the prefill (one per round).
    pub rounds: usize,
    /// Drafts proposed at each depth.
    pub drafted: Vec<usize>,
    /// Drafts judged at each depth (every earlier draft of the round was accepted).
    pub verified: Vec<usize>,
    /// Drafts accepted at each depth.
    pub accepted: Vec<usize>,
}

impl SpecStats {
    fn new(depth: usize) -> SpecStats {
        SpecStats { rounds: 0, drafted: vec![0; depth], verified: vec![0; depth], accepted: vec![0; depth] }
    }

    /// Per depth, the fraction of judged drafts accepted (DeepSeek-V3's "acceptance rate").
    pub fn acceptance(&self) -> Vec<f64> {
        self.accepted
            .iter()
            .zip(&self.verified)
            .map(|(&a, &v)| if v == 0 { 0.0 } else { a as f64 / v as f64 })
            .collect()
    }

    pub fn merge(&mut self, o: &SpecStats) {
        self.rounds += o.rounds;
        for (a, b) in
            [(&mut self.drafted, &o.drafted), (&mut self.verified, &o.verified), (&mut self.accepted, &o.accepted)]
        {
            a.resize(a.len().max(b.len()), 0);
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
}

/// A model with MTP modules decoding one sequence speculatively (see the module doc).
pub struct SpecDecoder<'m> {
    model: &'m Model,
    depth: usize,
    cache: KvCache,
    /// The ids in the main cache (`history.len() == cache.len()`).
    history: Vec<u32>,
    /// Module k's cache at index k − 1: its true positions.
    modules: Vec<LayerCache>,
    /// Depth j's true hidden rows (0: the main model) that module j + 1 has not cached yet:
    /// positions `modules[j].len()..`.
    hidden: Vec<Rows>,
    /// The last round's drafts and, per depth, the softcapped logits they were drawn from.
    drafts: (Vec<u32>, Vec<Vec<f32>>),
    pub stats: SpecStats,
}

/// Softcapped logits (as the sampler sees them) of raw logit rows.
fn softcap(model: &Model, raw: &[f32]) -> Vec<f32> {
    let cap = model.config.logit_softcap;
    raw.iter().map(|&z| if cap > 0.0 { cap * math::tanh(z / cap) } else { z }).collect()
}

impl<'m> SpecDecoder<'m> {
    /// Drafts `depth` tokens per round with the model's first `depth` MTP modules
    /// (1 ≤ depth ≤ mtp_depth).
    pub fn new(model: &'m Model, depth: usize) -> Result<SpecDecoder<'m>> {
        let c = &model.config;
        ensure!(c.mtp_depth > 0, "speculative decoding needs a model trained with mtp_depth > 0");
        ensure!((1..=c.mtp_depth).contains(&depth), "speculative depth {depth} is not in 1..={}", c.mtp_depth);
        drop(Decoder::new(model)?); // checks the parameters against the config
        let modules = (1..=depth).map(|k| layer_cache(c, c.mtp_layer(k)).with_slack(depth)).collect();
        Ok(SpecDecoder {
            model,
            depth,
            cache: KvCache::with_slack(c, depth),
            history: Vec::new(),
            modules,
            hidden: vec![Rows::default(); depth],
            drafts: Default::default(),
            stats: SpecStats::new(depth),
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Positions in the main cache.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The ids in the main cache, in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// How many modules can draft now: module k caches the main cache's positions, so one with
    /// a bounded (dense or DSA) cache stops at `max_seq_len` positions (see the module doc).
    pub fn draftable(&self) -> usize {
        let c = &self.model.config;
        let fits = |k: &usize| c.attn_kind(c.mtp_layer(*k)) == AttnKind::Window || self.len() <= c.max_seq_len;
        (1..=self.depth).take_while(fits).count()
    }

    /// The last round's drafts and the softcapped logits each was drawn from (diagnostics).
    pub fn last_drafts(&self) -> (&[u32], &[Vec<f32>]) {
        (&self.drafts.0, &self.drafts.1)
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
        self.modules.iter_mut().for_each(LayerCache::clear);
        self.hidden.iter_mut().for_each(Rows::clear);
    }

    fn tape(&self) -> (Tape<'m, CpuOps>, Vec<crate::autograd::Var>) {
        let mut tape = Tape::inference(self.model.cpu());
        let pv = self.model.params_on(&mut tape);
        (tape, pv)
    }

    /// Empties the caches and runs `ids` (one pass, as `Decoder::prefill`); returns the
    /// softcapped logits of the next token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        let model = self.model;
        let (mut tape, pv) = self.tape();
        let h = model.hidden_cached(&mut tape, &pv, ids, &mut self.cache);
        let h = h.inspect_err(|_| self.reset())?;
        let last = tape.last_rows(h, 1)?;
        let logits = model.head(&mut tape, &pv, last)?;
        self.hidden[0].data = tape.value(h).to_vec();
        self.history.extend_from_slice(ids);
        Ok(softcap(model, tape.value(logits)))
    }

    /// One round: `pending` is the token drawn after the cached ones; drafts `n ≤ depth` tokens,
    /// verifies them with one main forward of `[pending, drafts]` and keeps what is accepted.
    /// Returns the accepted drafts and the token drawn after them (the next `pending`). The
    /// main cache must have room for `n + 1` more positions.
    pub fn round(&mut self, pending: u32, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<(Vec<u32>, u32)> {
        ensure!(!self.history.is_empty(), "speculative: prefill before the first round");
        ensure!(n <= self.draftable(), "speculative: {n} drafts from {} usable modules", self.draftable());
        let out = self.try_round(pending, n, opts, rng);
        if out.is_err() {
            self.reset(); // a failed kernel may leave the caches out of step
        }
        out
    }

    fn try_round(&mut self, pending: u32, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<(Vec<u32>, u32)> {
        let (model, c) = (self.model, self.model.config.n_embd);
        let dist = |logits: &[f32]| candidates(logits, opts.temperature, opts.top_k, opts.top_p);
        let q = self.cache.len() - 1;
        debug_assert_eq!(self.hidden[0].end(c), q + 1, "depth 0's rows reach the main cache's end");
        let (mut tape, pv) = self.tape();
        let (mut drafts, mut qs): (Vec<u32>, Vec<Vec<(u32, f64)>>) = (Vec::new(), Vec::new());
        self.drafts.1.clear();
        // depth k − 1's rows computed this round from drafts (positions past its true ones)
        let mut temporary: Vec<f32> = Vec::new();
        for k in 1..=n {
            let from = self.modules[k - 1].len();
            let mut h = self.hidden[k - 1].from(from, c).to_vec();
            h.extend_from_slice(&temporary);
            let rows = q + 1 - from;
            debug_assert_eq!(h.len(), rows * c, "module {k}: its inputs cover positions {from}..={q}");
            // x_{i+k}: cached, the pending token, or this round's drafts
            let token = |j: usize| match j.cmp(&(q + 1)) {
                std::cmp::Ordering::Less => self.history[j],
                std::cmp::Ordering::Equal => pending,
                std::cmp::Ordering::Greater => drafts[j - q - 2],
            };
            let ids: Vec<u32> = (from..=q).map(|i| token(i + k)).collect();
            let hv = tape.leaf(Tensor::from_vec(&[rows, c], h));
            let out = model.mtp_cached(&mut tape, &pv, k, hv, &ids, &mut self.modules[k - 1])?;
            let last = tape.last_rows(out, 1)?;
            let logits = model.head(&mut tape, &pv, last)?;
            let logits = softcap(model, tape.value(logits));
            let qk = dist(&logits);
            self.drafts.1.push(logits);
            drafts.push(draw(&qk, rng));
            qs.push(qk);
            // positions i < q + 2 − k used true tokens only: keep them, roll back the rest
            let true_end = (q + 2).saturating_sub(k).max(from);
            self.modules[k - 1].truncate(true_end)?;
            let out_rows = tape.value(out);
            let (kept, temp) = out_rows.split_at((true_end - from) * c);
            if k < self.depth {
                self.hidden[k].data.extend_from_slice(kept);
            }
            temporary = temp.to_vec();
            self.hidden[k - 1].drop_before(true_end, c);
        }
        // verify: p_0..p_n from one forward of [pending, d_1..d_n]
        let ids: Vec<u32> = std::iter::once(pending).chain(drafts.iter().copied()).collect();
        let h = model.hidden_cached(&mut tape, &pv, &ids, &mut self.cache)?;
        let logits = model.head(&mut tape, &pv, h)?;
        let v = model.config.vocab_size;
        let ps: Vec<Vec<(u32, f64)>> =
            tape.value(logits).chunks_exact(v).map(|row| dist(&softcap(model, row))).collect();
        let verdict = verify(&ps, &qs, &drafts, rng);
        let a = verdict.accepted;
        self.cache.truncate(q + 2 + a)?;
        self.hidden[0].data.extend_from_slice(&tape.value(h)[..(a + 1) * c]);
        self.history.push(pending);
        self.history.extend_from_slice(&drafts[..a]);
        let s = &mut self.stats;
        s.rounds += 1;
        for k in 0..n {
            s.drafted[k] += 1;
            s.verified[k] += usize::from(k <= a);
            s.accepted[k] += usize::from(k < a);
        }
        self.drafts.0 = drafts.clone();
        // a module whose cache is full never drafts again (only a reset shortens the main
        // cache): stop keeping its inputs
        for k in self.draftable() + 1..=self.depth {
            self.hidden[k - 1].clear();
        }
        drafts.truncate(a);
        Ok((drafts, verdict.token))
    }
}
