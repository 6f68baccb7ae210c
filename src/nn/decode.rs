//! Inference with a key/value cache: the model's own layers (`Model::logits_cached`, the same
//! `Model::block` the training forward runs) over new tokens only, reading and extending
//! per-layer caches. A prompt is prefilled in one call, then generation feeds one token per step.
//! The cache and the attention over it are kernels (`backend::LayerCache`, the backend's
//! `attention_cached` / `dsa_attention_cached` / `rope_at`); this module holds a sequence's
//! caches, their sizes and the [`Decoder`] on the CPU backend.
//!
//! **What is cached.** For every layer, the keys after QK-norm and RoPE and the values, as
//! `[kv_dim]` rows (`kv_dim = n_kv_head · head_dim`), so a step computes only the new token's
//! projections and attends over stored rows:
//!
//! - **Dense (`D`) layers** keep every position: `len · kv_dim · 2` floats, growing with the
//!   context (the allocation grows by doubling, capped at `max_seq_len` rows).
//! - **Window (`W`) layers** see `A(t) = {s : t − W < s ≤ t} ∪ {s < G, s ≤ t}`, so they keep a
//!   ring buffer of the last `W = dsa_window_size` positions and, separately, the first
//!   `G = n_global` positions (the attention sinks): at most `(W + G) · kv_dim · 2` floats,
//!   whatever the context length, and a step costs `O(W + G)` per head.
//! - **DSA (`S`) layers** keep every position's keys and values plus the lightning indexer's key
//!   (`index_head_dim` floats): `len · (kv_dim · 2 + d_I)` floats. A step scores every cached
//!   indexer key (`O(T · H_I · d_I)`, narrow), picks the top `index_topk` (plus the local window)
//!   and attends to those rows only: `O(k)` per head instead of `O(T)`.
//! - **MoE FFNs** route each new row with the layer's bias (`Model::moe_ffn` in nn::ffn; the `n` rows of a
//!   call are one routing call, so a capacity limit applies per call), no cache.
//! - **MLA models** (`attention = "mla"`, `nn::mla_decode`) cache one latent row
//!   `[c_kv ; k_pe]` of `kv_lora_rank + qk_rope_head_dim` floats per position in place of the
//!   `2 · kv_dim` keys and values (a latent [`LayerCache`]; the value is the row's first
//!   `kv_lora_rank` floats), kept per layer kind as above; `wkv_b` is absorbed into the query and
//!   the output, so a step attends MQA-style over the latent rows.
//!
//! [`kv_bytes_per_layer`] predicts [`KvCache::layer_bytes`] exactly; [`kv_bytes_per_token`] is a
//! token's bytes over all layers (GQA against MLA).
//!
//! **Positions beyond `max_seq_len`.** A model with at least one dense layer stops with an
//! error ("context full") when a call would cache more than `max_seq_len` positions; callers
//! shift the context instead (see [`Decoder::sync`], which `crate::generate` uses: re-prefill a
//! tail of the context). A model whose layers are all window layers has no such limit: its memory
//! and step cost are constant, RoPE angles are computed for any position (by the same f64
//! formula as the training table, so identical values below `max_seq_len`), and decoding streams
//! on. The math is the model's at every position, but beyond `max_seq_len` the query–sink
//! distances exceed anything seen in training, so quality there is untested.
//!
//! **Numerics.** A prefill into an empty cache runs the training forward's ops (the tiled
//! attention kernels, RoPE angles equal to the table's), so [`Decoder::prefill_all`] of `ids`
//! ends with bitwise the logits of [`Model::next_token_logits`] of `ids` (a test checks it;
//! [`Decoder::prefill`] runs the head on the last row only, a GEMM of another shape). Later calls attend with per-query loops
//! over the cached rows (other summation orders): logits agree to about 1e-6 relative (the tests
//! allow 1e-4). MLA layers run the absorbed path on every cached call, a prefill included (same
//! scores and outputs as the training forward, summed in another order): within 1e-4 of the
//! uncached logits too (`tests/mla_decode.rs`).
//!
//! **Adding a layer kind.** A new attention variant adds a `backend::CacheKind`, its branch in
//! the backend's cached attention and in [`kv_bytes_per_layer`]; the model states the layer once
//! (MLA's cached attention is its own branch of `Model::block`, `Model::mla_attention_cached`).

use super::config::{AttnKind, ModelConfig};
use super::model::Model;
use crate::autograd::Tape;
use crate::backend::{math, CacheKind, CpuOps};
use anyhow::{ensure, Result};

pub use crate::backend::LayerCache;

const F32_BYTES: usize = std::mem::size_of::<f32>();

/// An empty cache for layer `l` of `config` (`l ≥ n_layer`: an MTP module's virtual layer).
pub fn layer_cache(config: &ModelConfig, l: usize) -> LayerCache {
    let kind = match config.attn_kind(l) {
        AttnKind::Dense => CacheKind::Dense,
        AttnKind::Window => CacheKind::Window { window: config.dsa_window_size, n_global: config.n_global },
        AttnKind::Sparse => CacheKind::Sparse { index_dim: config.index_head_dim },
    };
    if config.is_mla() {
        LayerCache::latent(kind, config.kv_lora_rank, config.qk_rope_head_dim, config.max_seq_len)
    } else {
        LayerCache::new(kind, config.kv_dim(), config.max_seq_len)
    }
}

/// Per-layer key/value caches of one sequence, all holding positions `0..len()`.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> KvCache {
        KvCache { layers: (0..config.n_layer).map(|l| layer_cache(config, l)).collect(), len: 0 }
    }

    /// Positions processed so far (the next token gets position `len()`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Counts `n` positions that every layer has just appended (`Model::logits_cached`).
    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.layers.iter().all(|l| l.len() == self.len));
    }

    /// Bytes of the cached keys and values over all layers (see [`kv_bytes_per_layer`]).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Bytes of layer `l`'s cached keys and values.
    pub fn layer_bytes(&self, l: usize) -> usize {
        self.layers[l].bytes()
    }

    /// Bytes allocated by all layers (a growing dense layer may hold up to 2× its rows).
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::allocated_bytes).sum()
    }

    /// Forgets every position (keeps the allocations).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::clear);
        self.len = 0;
    }

    /// A cache whose window layers can roll back `slack + 1` positions (see
    /// [`KvCache::truncate`]); `slack = 0` is [`KvCache::new`].
    pub fn with_slack(config: &ModelConfig, slack: usize) -> KvCache {
        let layers = (0..config.n_layer).map(|l| layer_cache(config, l).with_slack(slack)).collect();
        KvCache { layers, len: 0 }
    }

    /// Forgets positions `len..` in every layer (rejected speculative tokens): the cache then
    /// computes exactly what a cache that only saw `0..len` would. A window layer rolls back at
    /// most `slack + 1` positions ([`KvCache::with_slack`]); beyond that this is an error and
    /// the cache is unchanged.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for layer in &self.layers {
            layer.check_truncate(len)?;
        }
        for layer in &mut self.layers {
            layer.truncate(len)?;
        }
        self.len = len;
        Ok(())
    }
}

/// Floats one position occupies in a layer's cache, the indexer key aside: `2 · kv_dim` (keys
/// and values) for GQA, `kv_lora_rank + qk_rope_head_dim` (the latent row) for MLA.
pub fn cache_row_floats(config: &ModelConfig) -> usize {
    if config.is_mla() {
        config.kv_lora_rank + config.qk_rope_head_dim
    } else {
        config.kv_dim() * 2
    }
}

/// Bytes of layer `layer`'s K/V cache after `context_len` positions (f32), with `row` =
/// [`cache_row_floats`] (`2 · kv_dim`, or MLA's `r_kv + d_r`): dense `T · row · 4`; window
/// `(min(T, W) + min(T, G)) · row · 4`; DSA (sparse) the dense rows plus the lightning indexer's
/// key per position, `T · (row + index_head_dim) · 4`.
pub fn kv_bytes_per_layer(config: &ModelConfig, layer: usize, context_len: usize) -> usize {
    let kv = cache_row_floats(config) * F32_BYTES;
    match config.attn_kind(layer) {
        AttnKind::Dense => context_len * kv,
        AttnKind::Window => (context_len.min(config.dsa_window_size) + context_len.min(config.n_global)) * kv,
        AttnKind::Sparse => context_len * (kv + config.index_head_dim * F32_BYTES),
    }
}

/// Bytes of the whole model's K/V cache after `context_len` positions.
pub fn kv_bytes(config: &ModelConfig, context_len: usize) -> usize {
    (0..config.n_layer).map(|l| kv_bytes_per_layer(config, l, context_len)).sum()
}

/// Bytes one more cached position costs, summed over the layers, as if every layer kept every
/// position (a dense-cache context; window layers stop growing at `W + G` positions): per layer
/// [`cache_row_floats`] plus, in DSA layers, the indexer key, times 4. The figure to compare GQA
/// with MLA by (e.g. V3's shapes: 576 floats per layer for MLA against 2 · H · d for GQA).
pub fn kv_bytes_per_token(config: &ModelConfig) -> usize {
    let index = |l| if config.attn_kind(l) == AttnKind::Sparse { config.index_head_dim } else { 0 };
    (0..config.n_layer).map(|l| (cache_row_floats(config) + index(l)) * F32_BYTES).sum()
}

/// The most positions a cache of this model may hold: `max_seq_len` when any layer's cache grows
/// with the context, `None` (no limit) when every layer is a window layer.
pub fn context_limit(config: &ModelConfig) -> Option<usize> {
    let bounded = (0..config.n_layer).any(|l| match config.attn_kind(l) {
        AttnKind::Dense | AttnKind::Sparse => true,
        AttnKind::Window => false,
    });
    bounded.then_some(config.max_seq_len)
}

/// A model with its KV cache and the token ids it holds: prefill, then one token per step. Runs
/// the model's layers (`Model::logits_cached`) on inference tapes of the CPU backend.
pub struct Decoder<'m> {
    model: &'m Model,
    cache: KvCache,
    /// The ids whose keys and values are cached (`history.len() == cache.len()`).
    history: Vec<u32>,
    /// Softcapped logits after the last cached token.
    last_logits: Option<Vec<f32>>,
}

impl<'m> Decoder<'m> {
    /// Checks the model's parameters against `Model::expected_shapes`.
    pub fn new(model: &'m Model) -> Result<Decoder<'m>> {
        let expected = Model::expected_shapes(&model.config);
        ensure!(
            model.params.len() == expected.len(),
            "decode: the model has {} parameters, its config expects {}",
            model.params.len(),
            expected.len()
        );
        for (p, (name, _, shape)) in model.params.iter().zip(&expected) {
            ensure!(p.name == *name, "decode: parameter '{}' where '{name}' was expected", p.name);
            ensure!(p.tensor.shape == *shape, "decode: '{name}' has shape {:?}, expected {shape:?}", p.tensor.shape);
        }
        let cache = KvCache::new(&model.config);
        Ok(Decoder { model, cache, history: Vec::new(), last_logits: None })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// Positions cached (the next token's position).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The most positions this model can cache (`None`: unlimited; see [`context_limit`]).
    pub fn capacity(&self) -> Option<usize> {
        context_limit(&self.model.config)
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The token ids held in the cache, in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Empties the cache (keeps its allocations).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
        self.last_logits = None;
    }

    /// Runs `ids` through the model after the cached positions, extending the cache; returns the
    /// softcapped logits of every row (`all_rows`) or of the last one.
    fn run(&mut self, ids: &[u32], all_rows: bool) -> Result<Vec<f32>> {
        let model = self.model;
        let mut tape: Tape<'m, CpuOps> = Tape::inference(model.cpu());
        let pv = model.params_on(&mut tape);
        let out = match model.logits_cached(&mut tape, &pv, ids, &mut self.cache, all_rows) {
            Ok(out) => out,
            Err(e) => {
                // a kernel error after some layers appended leaves the caches out of step
                if self.cache.layers.iter().any(|l| l.len() != self.cache.len()) {
                    self.reset();
                }
                return Err(e);
            }
        };
        let cap = model.config.logit_softcap;
        let logits: Vec<f32> =
            tape.value(out).iter().map(|&z| if cap > 0.0 { cap * math::tanh(z / cap) } else { z }).collect();
        self.history.extend_from_slice(ids);
        // keep the last row's logits, so `sync` can answer without recomputing
        let v = model.config.vocab_size;
        self.last_logits = Some(logits[logits.len() - v..].to_vec());
        Ok(logits)
    }

    /// Appends `ids` (a prompt, any length that fits) in one pass; returns the softcapped logits
    /// `[vocab]` of the next token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.run(ids, false)
    }

    /// As [`Self::prefill`], returning the logits after every one of `ids` (`[ids.len(), vocab]`).
    pub fn prefill_all(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.run(ids, true)
    }

    /// Appends one token; returns the next token's softcapped logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.run(&[id], false)
    }

    /// Makes the cache hold `context` and returns the logits after its last token, reusing the
    /// cached prefix when `context` extends the history. When `context` plus `reserve` more
    /// tokens would not fit the model's context limit, the cache is rebuilt from the tail of
    /// `context` that leaves `reserve` positions free (at least one token is kept): the oldest
    /// tokens are dropped and positions restart at 0 (a context shift).
    pub fn sync(&mut self, context: &[u32], reserve: usize) -> Result<Vec<f32>> {
        ensure!(!context.is_empty(), "decode: the context must hold at least one token");
        let fits = |len: usize| self.capacity().is_none_or(|c| len + reserve <= c);
        let extends = context.len() >= self.history.len() && context[..self.history.len()] == self.history[..];
        if extends && fits(context.len()) && !self.history.is_empty() {
            if context.len() == self.history.len() {
                if let Some(l) = &self.last_logits {
                    return Ok(l.clone());
                }
            } else {
                let new = &context[self.history.len()..];
                return self.prefill(new);
            }
        }
        self.reset();
        let keep = match self.capacity() {
            Some(c) => context.len().min(c.saturating_sub(reserve).max(1)),
            None => context.len(),
        };
        self.prefill(&context[context.len() - keep..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::tensor::Tensor;

    fn model(pattern: &str, window: usize, n_global: usize, max_seq_len: usize) -> Model {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) = (61, 2, 32, 4, 2);
        (cfg.head_dim, cfg.ffn_hidden, cfg.max_seq_len) = (8, 64, max_seq_len);
        (cfg.attn_pattern, cfg.dsa_window_size, cfg.n_global) = (pattern.into(), window, n_global);
        let mut m = Model::new(&cfg, 1).unwrap();
        let mut rng = Rng::new(7);
        for p in &mut m.params {
            let std = 1.0 / (*p.tensor.shape.last().unwrap() as f32).sqrt();
            p.tensor = Tensor::randn(&p.tensor.shape.clone(), std, &mut rng);
        }
        m
    }

    #[test]
    fn decode_prefill_in_chunks_equals_one_pass() {
        // splitting a prompt across calls (and across the ring's wrap) gives the same logits
        for pattern in ["D", "W", "WD"] {
            let m = model(pattern, 5, 2, 64);
            let ids: Vec<u32> = (0..23).map(|i| (i * 7 % 61) as u32).collect();
            let mut a = Decoder::new(&m).unwrap();
            let one = a.prefill(&ids).unwrap();
            let mut b = Decoder::new(&m).unwrap();
            b.prefill(&ids[..4]).unwrap();
            b.prefill(&ids[4..17]).unwrap();
            let two = b.prefill(&ids[17..]).unwrap();
            for (x, y) in one.iter().zip(&two) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{pattern}: {x} vs {y}");
            }
            assert_eq!(a.cache().bytes(), b.cache().bytes());
        }
    }

    #[test]
    fn decode_prefill_is_the_training_forward_bitwise() {
        // the same layers, the same ops: a prefill's rows equal the uncached forward's exactly
        for (pattern, moe) in [("D", false), ("W", false), ("WD", false), ("SD", false), ("WD", true)] {
            let mut m = model(pattern, 5, 2, 64);
            if moe {
                let mut cfg = m.config.clone();
                cfg.moe =
                    crate::nn::MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, ..Default::default() };
                m = Model::new(&cfg, 3).unwrap();
                let mut rng = Rng::new(9);
                for p in &mut m.params {
                    let std = 1.0 / (*p.tensor.shape.last().unwrap() as f32).sqrt();
                    p.tensor = Tensor::randn(&p.tensor.shape.clone(), std, &mut rng);
                }
            }
            let ids: Vec<u32> = (0..19).map(|i| (i * 5 % 61) as u32).collect();
            let v = m.config.vocab_size;
            for t in [2, 7, 19] {
                let all = Decoder::new(&m).unwrap().prefill_all(&ids[..t]).unwrap();
                assert_eq!(&all[(t - 1) * v..], &m.next_token_logits(&ids[..t]).unwrap()[..], "{pattern} at {t}");
            }
        }
    }

    #[test]
    fn cached_forward_refuses_a_training_tape() {
        let m = model("D", 5, 2, 64);
        let mut tape = Tape::new(m.cpu());
        let pv = m.params_on(&mut tape);
        let mut cache = KvCache::new(&m.config);
        let e = m.logits_cached(&mut tape, &pv, &[1, 2], &mut cache, false).unwrap_err().to_string();
        assert!(e.contains("Tape::inference"), "{e}");
    }

    #[test]
    fn decode_context_limit_and_sync() {
        let m = model("WD", 4, 1, 10);
        let mut d = Decoder::new(&m).unwrap();
        assert_eq!(d.capacity(), Some(10));
        d.prefill(&[1; 8]).unwrap();
        let e = d.prefill(&[1; 3]).unwrap_err().to_string();
        assert!(e.contains("context full") && e.contains("max_seq_len 10"), "{e}");
        // sync reuses the prefix, then shifts when the reserve does not fit
        let ctx: Vec<u32> = (0..9).collect();
        let mut d = Decoder::new(&m).unwrap();
        d.prefill(&ctx[..5]).unwrap();
        d.sync(&ctx, 1).unwrap();
        assert_eq!(d.history(), &ctx[..]);
        d.sync(&ctx, 4).unwrap();
        assert_eq!(d.history(), &ctx[3..]);
        // an all-window model has no limit
        let w = model("W", 4, 1, 10);
        let mut d = Decoder::new(&w).unwrap();
        assert_eq!(d.capacity(), None);
        d.prefill(&[2; 30]).unwrap();
        assert_eq!(d.cache().bytes(), kv_bytes(&w.config, 30));
    }

    /// Logits of `ids` appended to `cache` (all rows).
    fn run(m: &Model, cache: &mut KvCache, ids: &[u32]) -> Vec<f32> {
        let mut tape = Tape::inference(m.cpu());
        let pv = m.params_on(&mut tape);
        let out = m.logits_cached(&mut tape, &pv, ids, cache, true).unwrap();
        tape.value(out).to_vec()
    }

    #[test]
    fn truncated_cache_equals_one_that_never_saw_the_rows() {
        // dense, window (ring of 5 + slack 2 wrapping many times, 2 sinks) and DSA (top-3 of
        // the indexer): each round appends the true rows, then rejected rows, and rolls those
        // back; the next round's logits equal (bitwise) those of a cache that only ever saw
        // the true rows, so the rolled-back cache holds exactly what it would have held
        for pattern in ["D", "W", "S", "WS"] {
            let mut m = model(pattern, 5, 2, 96);
            (m.config.index_topk, m.config.index_local_window) = (3, 2);
            let (slack, v) = (2, m.config.vocab_size);
            let seq: Vec<u32> = (0..60).map(|i| (i * 13 % 61) as u32).collect();
            let (mut spec, mut plain) = (KvCache::with_slack(&m.config, slack), KvCache::new(&m.config));
            let (mut at, mut round) = (0, 0);
            while at < seq.len() {
                let keep = (if round == 0 { 7 } else { 1 + round % 3 }).min(seq.len() - at);
                let (rejected, true_rows) = (round % (slack + 2), &seq[at..at + keep]);
                let junk: Vec<u32> = (0..rejected).map(|j| ((round * 7 + j * 11 + 5) % 61) as u32).collect();
                // a verify pass: true and rejected rows in one call agree with the true rows
                // alone to rounding (another GEMM shape), and roll back as well
                let mut joint = spec.clone();
                let joint_rows = run(&m, &mut joint, &[true_rows, &junk].concat());
                joint.truncate(at + keep).unwrap();
                let plain_rows = run(&m, &mut plain, true_rows);
                let scale = plain_rows.iter().fold(1.0f32, |a, x| a.max(x.abs()));
                for (x, y) in joint_rows[..keep * v].iter().zip(&plain_rows) {
                    assert!((x - y).abs() <= 1e-4 * scale, "{pattern}: round {round}: {x} vs {y}");
                }
                assert_eq!(run(&m, &mut spec, true_rows), plain_rows, "{pattern}: round {round}");
                if !junk.is_empty() {
                    run(&m, &mut spec, &junk);
                    spec.truncate(at + keep).unwrap();
                }
                assert_eq!((spec.len(), joint.len()), (plain.len(), plain.len()));
                (at, round) = (at + keep, round + 1);
            }
        }
    }

    #[test]
    fn window_rollback_beyond_the_slack_is_an_error() {
        let m = model("WD", 4, 1, 64);
        let mut cache = KvCache::with_slack(&m.config, 1);
        run(&m, &mut cache, &[3; 20]);
        // a ring of 4 + 1 slots at 20 positions holds 15..20; rolling back to 17 needs 14..17
        let e = cache.truncate(17).unwrap_err().to_string();
        assert!(e.contains("cannot roll back to 17") && e.contains("slack 1"), "{e}");
        assert_eq!(cache.len(), 20, "a refused truncation changes nothing");
        assert!(cache.layers.iter().all(|l| l.len() == 20));
        cache.truncate(18).unwrap();
        assert!(cache.truncate(19).is_err(), "truncate cannot extend");
        // rolling back to the sinks only, or everything, is always possible
        let mut short = KvCache::new(&m.config);
        run(&m, &mut short, &[3; 3]);
        short.truncate(1).unwrap();
        short.truncate(0).unwrap();
        assert!(short.is_empty() && short.bytes() == 0);
    }
}
