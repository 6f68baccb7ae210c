//! Inference without the tape: the model's forward pass (docs/model.md) over new tokens only,
//! reading and extending per-layer key/value caches. A prompt is prefilled in one call, then
//! generation feeds one token per step.
//!
//! **What is cached.** For every layer, the keys after QK-norm and RoPE and the values, as
//! `[kv_dim]` rows (`kv_dim = n_kv_head · head_dim`), so a step computes only the new token's
//! projections and attends over stored rows:
//!
//! - **Dense (`D`) layers** keep every position: `len · kv_dim · 2` floats, growing with the
//!   context (the allocation grows by doubling, capped at `max_seq_len` rows).
//! - **Window (`W`) layers** see `A(t) = {s : t − W < s ≤ t} ∪ {s < G, s ≤ t}`, so they keep a
//!   ring buffer of the last `W = dsa_window_size` positions (position `s` in slot `s mod W`)
//!   and, separately, the first `G = n_global` positions (the attention sinks; while a sink is
//!   still inside the window it is held twice). That is at most `(W + G) · kv_dim · 2` floats,
//!   whatever the context length, and a step costs `O(W + G)` per head.
//!
//! - **DSA (`S`) layers** keep every position's keys and values plus the lightning indexer's key
//!   (`index_head_dim` floats): `len · (kv_dim · 2 + d_I)` floats. A step scores every cached
//!   indexer key (`O(T · H_I · d_I)`, narrow), picks the top `index_topk` (plus the local window)
//!   and attends to those rows only: `O(k)` per head instead of `O(T)`.
//! - **MoE FFNs** route each new row with the layer's bias and run its K experts and the shared
//!   experts (no cache).
//!
//! [`kv_bytes_per_layer`] predicts [`KvCache::layer_bytes`] exactly.
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
//! **Compute.** A prefill into an empty cache runs the projections as GEMMs and the attention
//! with the backend's tiled kernels (as training does); later calls (a step, or a prompt appended
//! to a conversation) attend with per-query loops over the cached rows (`O(T)` per head for a
//! dense layer, `O(W + G)` for a window layer), split over threads when long. A step's
//! projections are matrix–vector products reading each weight row once.
//!
//! **Numerics.** The same operations as the training forward (parameter-free RMSNorm with
//! eps 1e-6, NeoX RoPE, softmax attention with scale `1/sqrt(d)`, SwiGLU with the backend's
//! `sigmoid`, softcap with its `tanh`), in f32, but partly with different summation orders:
//! logits agree with [`Model::next_token_logits`] to about 1e-6 relative (the tests allow 1e-4).
//!
//! **Adding a layer kind.** [`Net::attn_step`] and [`Net::ffn_step`] dispatch on the config
//! (`attn_kind(l)`); a new attention variant adds a [`LayerCache`] variant, a branch in
//! `attn_step` (and in [`kv_bytes_per_layer`]); an MoE FFN adds a branch in `ffn_step`.

use super::config::{AttnKind, ModelConfig};
use super::model::Model;
use crate::backend::cpu::attention::{attention_forward, AttnDims};
use crate::backend::cpu::dsa::{dsa_attention_forward, indexer_topk, DsaDims};
use crate::backend::cpu::gemm::{gemm, Layout};
use crate::backend::cpu::math;
use crate::backend::cpu::moe::{moe_forward, route, MoeCache};
use crate::backend::cpu::norm::RMS_EPS;
use crate::backend::cpu::window_attention::{window_attention_forward, WindowDims};
use anyhow::{anyhow, bail, ensure, Result};
use rayon::prelude::*;
use std::collections::HashMap;

const F32_BYTES: usize = std::mem::size_of::<f32>();

/// The key/value cache of one layer (rows of `kv_dim` floats).
#[derive(Clone, Debug)]
pub enum LayerCache {
    /// Every cached position: row `s` of `k` and `v` is position `s`.
    Dense { k: Vec<f32>, v: Vec<f32> },
    /// DSA: every position's keys and values (as `Dense`) and the lightning indexer's key
    /// (`index_head_dim` floats, after RoPE) per position.
    Sparse { k: Vec<f32>, v: Vec<f32>, ik: Vec<f32> },
    /// The last `window` positions in a ring (position `s` in slot `s mod window`) and the first
    /// `n_global` positions in `global_k`/`global_v` (row `s` is position `s`).
    Window {
        window: usize,
        n_global: usize,
        ring_k: Vec<f32>,
        ring_v: Vec<f32>,
        global_k: Vec<f32>,
        global_v: Vec<f32>,
    },
}

impl LayerCache {
    fn new(config: &ModelConfig, l: usize) -> LayerCache {
        match config.attn_kind(l) {
            AttnKind::Dense => LayerCache::Dense { k: Vec::new(), v: Vec::new() },
            AttnKind::Sparse => LayerCache::Sparse { k: Vec::new(), v: Vec::new(), ik: Vec::new() },
            AttnKind::Window => LayerCache::Window {
                window: config.dsa_window_size,
                n_global: config.n_global,
                ring_k: Vec::new(),
                ring_v: Vec::new(),
                global_k: Vec::new(),
                global_v: Vec::new(),
            },
        }
    }

    fn vecs(&self) -> Vec<&Vec<f32>> {
        match self {
            LayerCache::Dense { k, v } => vec![k, v],
            LayerCache::Sparse { k, v, ik } => vec![k, v, ik],
            LayerCache::Window { ring_k, ring_v, global_k, global_v, .. } => vec![ring_k, ring_v, global_k, global_v],
        }
    }

    /// Bytes of the cached rows.
    pub fn bytes(&self) -> usize {
        self.vecs().iter().map(|v| v.len() * F32_BYTES).sum()
    }

    /// Bytes allocated (at least [`Self::bytes`]; a dense layer's buffers grow by doubling).
    pub fn allocated_bytes(&self) -> usize {
        self.vecs().iter().map(|v| v.capacity() * F32_BYTES).sum()
    }

    fn clear(&mut self) {
        match self {
            LayerCache::Dense { k, v } => {
                k.clear();
                v.clear();
            }
            LayerCache::Sparse { k, v, ik } => {
                k.clear();
                v.clear();
                ik.clear();
            }
            LayerCache::Window { ring_k, ring_v, global_k, global_v, .. } => {
                ring_k.clear();
                ring_v.clear();
                global_k.clear();
                global_v.clear();
            }
        }
    }

    /// Key and value rows (`kv_dim` floats each) of cached position `s`. The caller asks only for
    /// positions the layer keeps (a window layer: the last `window` ones and the first `n_global`).
    #[inline]
    fn row(&self, s: usize, kv_dim: usize) -> (&[f32], &[f32]) {
        fn at(buf: &[f32], r: usize, kv_dim: usize) -> &[f32] {
            &buf[r * kv_dim..(r + 1) * kv_dim]
        }
        match self {
            LayerCache::Dense { k, v } | LayerCache::Sparse { k, v, .. } => (at(k, s, kv_dim), at(v, s, kv_dim)),
            LayerCache::Window { window, n_global, ring_k, ring_v, global_k, global_v } => {
                if s < *n_global && (s + 1) * kv_dim <= global_k.len() {
                    (at(global_k, s, kv_dim), at(global_v, s, kv_dim))
                } else {
                    (at(ring_k, s % window, kv_dim), at(ring_v, s % window, kv_dim))
                }
            }
        }
    }

    /// Stores positions `p0..p0 + n` (rows of `k_new`, `v_new`); `len_cap` bounds a dense
    /// layer's allocation (rows).
    fn append(&mut self, p0: usize, k_new: &[f32], v_new: &[f32], kv_dim: usize, len_cap: Option<usize>) {
        let n = k_new.len() / kv_dim;
        match self {
            LayerCache::Dense { k, v } | LayerCache::Sparse { k, v, .. } => {
                debug_assert_eq!(k.len(), p0 * kv_dim);
                for buf in [&mut *k, &mut *v] {
                    let need = buf.len() + n * kv_dim;
                    if buf.capacity() < need {
                        let doubled = (2 * buf.capacity()).max(need);
                        let target = len_cap.map_or(doubled, |c| doubled.min((c * kv_dim).max(need)));
                        buf.reserve_exact(target - buf.len());
                    }
                }
                k.extend_from_slice(k_new);
                v.extend_from_slice(v_new);
            }
            LayerCache::Window { window, n_global, ring_k, ring_v, global_k, global_v } => {
                for i in 0..n {
                    let s = p0 + i;
                    let (kr, vr) = (&k_new[i * kv_dim..(i + 1) * kv_dim], &v_new[i * kv_dim..(i + 1) * kv_dim]);
                    if s < *n_global {
                        debug_assert_eq!(global_k.len(), s * kv_dim);
                        global_k.extend_from_slice(kr);
                        global_v.extend_from_slice(vr);
                    }
                    if s < *window {
                        debug_assert_eq!(ring_k.len(), s * kv_dim);
                        ring_k.extend_from_slice(kr);
                        ring_v.extend_from_slice(vr);
                    } else {
                        let slot = (s % *window) * kv_dim;
                        ring_k[slot..slot + kv_dim].copy_from_slice(kr);
                        ring_v[slot..slot + kv_dim].copy_from_slice(vr);
                    }
                }
            }
        }
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
        KvCache { layers: (0..config.n_layer).map(|l| LayerCache::new(config, l)).collect(), len: 0 }
    }

    /// Positions processed so far (the next token gets position `len()`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
}

/// Bytes of layer `layer`'s K/V cache after `context_len` positions (f32): dense
/// `T · kv_dim · 2 · 4`; window `(min(T, W) + min(T, G)) · kv_dim · 2 · 4`; DSA (sparse) the
/// dense K/V plus the lightning indexer's key per position, `T · (kv_dim · 2 + index_head_dim) · 4`.
pub fn kv_bytes_per_layer(config: &ModelConfig, layer: usize, context_len: usize) -> usize {
    let kv = config.kv_dim() * 2 * F32_BYTES;
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

/// The most positions a cache of this model may hold: `max_seq_len` when any layer's cache grows
/// with the context, `None` (no limit) when every layer is a window layer.
pub fn context_limit(config: &ModelConfig) -> Option<usize> {
    let bounded = (0..config.n_layer).any(|l| match config.attn_kind(l) {
        AttnKind::Dense | AttnKind::Sparse => true,
        AttnKind::Window => false,
    });
    bounded.then_some(config.max_seq_len)
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    None,
    Last,
    All,
}

/// The weights (borrowed from the model) and the math of the forward pass, without state.
pub struct Net<'m> {
    pub config: &'m ModelConfig,
    weights: HashMap<String, &'m [f32]>,
    /// θ_i = rope_theta^(−2i/d), i < d/2 (the training table's expression, in f64).
    inv_freq: Vec<f64>,
    /// The same for the DSA indexer's width d_I.
    index_inv_freq: Vec<f64>,
    /// Per layer, the MoE routing bias (empty for dense FFNs).
    moe_bias: &'m [Vec<f32>],
}

impl<'m> Net<'m> {
    /// Resolves every parameter of `Model::expected_shapes` by name (`Model::param`).
    pub fn new(model: &'m Model) -> Result<Net<'m>> {
        let config = &model.config;
        let mut weights = HashMap::new();
        for (name, _, shape) in Model::expected_shapes(config) {
            let t = model.param(&name).ok_or_else(|| anyhow!("decode: the model has no parameter '{name}'"))?;
            ensure!(t.shape == shape, "decode: '{name}' has shape {:?}, expected {shape:?}", t.shape);
            weights.insert(name, t.data.as_slice());
        }
        let freqs = |d: usize| (0..d / 2).map(|i| config.rope_theta.powf(-2.0 * i as f64 / d as f64)).collect();
        let (inv_freq, index_inv_freq) = (freqs(config.head_dim), freqs(config.index_head_dim));
        Ok(Net { config, weights, inv_freq, index_inv_freq, moe_bias: &model.moe_bias })
    }

    /// A weight by its checkpoint name without the `.weight` suffix, e.g. `blocks.0.attn.c_q`.
    fn w(&self, name: &str) -> &'m [f32] {
        self.weights.get(&format!("{name}.weight")).unwrap_or_else(|| panic!("decode: no weight '{name}'"))
    }

    fn bw(&self, l: usize, name: &str) -> &'m [f32] {
        self.w(&format!("blocks.{l}.{name}"))
    }

    /// The forward pass over `ids` at positions `cache.len()..`, extending `cache`; returns
    /// softcapped logits (`[vocab]` for `Want::Last`, `[n, vocab]` for `Want::All`).
    fn forward(&self, ids: &[u32], cache: &mut KvCache, want: Want) -> Result<Vec<f32>> {
        let c = self.config;
        let n = ids.len();
        let p0 = cache.len;
        ensure!(n > 0, "decode: no tokens to process");
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= c.vocab_size) {
            bail!("token id {id} at position {pos} is out of range for vocab_size {}", c.vocab_size);
        }
        if let Some(limit) = context_limit(c) {
            if p0 + n > limit {
                bail!(
                    "context full: {} cached + {n} new positions exceed max_seq_len {limit} (a model with dense \
                     layers cannot attend beyond its training context; shift the context and prefill again)",
                    p0
                );
            }
        }
        let dim = c.n_embd;
        let wte = self.w("wte");
        let mut x = Vec::with_capacity(n * dim);
        for &id in ids {
            x.extend_from_slice(&wte[id as usize * dim..(id as usize + 1) * dim]);
        }
        rmsnorm_rows(&mut x, dim);
        let (cos, sin) = self.rope_angles(p0, n);
        for l in 0..c.n_layer {
            let mut h = x.clone();
            rmsnorm_rows(&mut h, dim);
            let y = self.attn_step(l, &h, n, p0, (&cos, &sin), &mut cache.layers[l]);
            add_into(&mut x, &y);
            let mut h = x.clone();
            rmsnorm_rows(&mut h, dim);
            let y = self.ffn_step(l, &h, n);
            add_into(&mut x, &y);
        }
        cache.len = p0 + n;
        let rows = match want {
            Want::None => return Ok(Vec::new()),
            Want::Last => &mut x[(n - 1) * dim..],
            Want::All => &mut x[..],
        };
        rmsnorm_rows(rows, dim);
        let mut logits = linear(rows, self.w("lm_head"), c.vocab_size);
        let cap = c.logit_softcap;
        if cap > 0.0 {
            logits.iter_mut().for_each(|z| *z = cap * math::tanh(*z / cap));
        }
        Ok(logits)
    }

    /// cos and sin of position·θ_i for positions `p0..p0 + n` (`[n, d/2]` each), computed as the
    /// training RoPE table computes them (f64 angle, rounded to f32).
    fn rope_angles(&self, p0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        angles(&self.inv_freq, p0, n)
    }

    /// Attention sub-layer of block `l` on the normed input `h` (`[n, n_embd]`, positions
    /// `p0..p0 + n`): projections, QK-norm, RoPE, attention over the cache and the new rows, output
    /// projection. Appends the new keys and values to `cache`. Returns `[n, n_embd]`.
    fn attn_step(
        &self,
        l: usize,
        h: &[f32],
        n: usize,
        p0: usize,
        rope: (&[f32], &[f32]),
        cache: &mut LayerCache,
    ) -> Vec<f32> {
        let c = self.config;
        let (d, hq, hkv) = (c.head_dim, c.n_head, c.n_kv_head);
        let mut q = linear(h, self.bw(l, "attn.c_q"), c.q_dim());
        let mut k = linear(h, self.bw(l, "attn.c_k"), c.kv_dim());
        let v = linear(h, self.bw(l, "attn.c_v"), c.kv_dim());
        rmsnorm_rows(&mut q, d);
        rmsnorm_rows(&mut k, d);
        apply_rope(&mut q, hq, d, rope);
        apply_rope(&mut k, hkv, d, rope);
        let keys: &(dyn Fn(usize) -> KeyRange + Sync) = match c.attn_kind(l) {
            AttnKind::Dense => &|t| KeyRange { sinks: 0, lo: 0, hi: t + 1 },
            AttnKind::Window => {
                let (w, g) = (c.dsa_window_size, c.n_global);
                &move |t| {
                    let lo = (t + 1).saturating_sub(w);
                    KeyRange { sinks: g.min(lo), lo, hi: t + 1 }
                }
            }
            AttnKind::Sparse => {
                let y = self.sparse_attention(l, h, (&q, &k, &v), n, p0, cache);
                cache.append(p0, &k, &v, c.kv_dim(), Some(c.max_seq_len));
                return linear(&y, self.bw(l, "attn.c_proj"), c.n_embd);
            }
        };
        let y = if p0 == 0 && n > 1 {
            // a prefill into an empty cache is the training forward's attention: the tiled kernels
            fresh_attention(c.attn_kind(l), c, &q, &k, &v, n)
        } else {
            attend(&q, &k, &v, n, p0, (hq, hkv, d), cache, keys)
        };
        cache.append(p0, &k, &v, c.kv_dim(), Some(c.max_seq_len));
        linear(&y, self.bw(l, "attn.c_proj"), c.n_embd)
    }

    /// DSA attention of the new rows: the lightning indexer (the layer's wq, wk, w_heads on the same
    /// normed input; RoPE on its queries and key) scores every earlier position, each query attends
    /// to its selection (`backend::cpu::dsa`: the local window plus the top-k older keys, ties to the
    /// more recent key). A prefill into an empty cache runs the training kernels; later rows score
    /// the cached indexer keys (`O(T·H_I·d_I)` per row) and attend to at most k + window rows.
    /// Appends the new indexer keys to the cache (the caller appends k and v).
    fn sparse_attention(
        &self,
        l: usize,
        h: &[f32],
        (q, k, v): (&[f32], &[f32], &[f32]),
        n: usize,
        p0: usize,
        cache: &mut LayerCache,
    ) -> Vec<f32> {
        let c = self.config;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let mut qi = linear(h, self.bw(l, "attn.indexer.wq"), hi * di);
        let mut ki = linear(h, self.bw(l, "attn.indexer.wk"), di);
        let scale = 1.0 / ((hi * di) as f32).sqrt();
        let wi: Vec<f32> = linear(h, self.bw(l, "attn.indexer.w_heads"), hi).iter().map(|w| w * scale).collect();
        let (cos, sin) = angles(&self.index_inv_freq, p0, n);
        apply_rope(&mut qi, hi, di, (&cos, &sin));
        apply_rope(&mut ki, 1, di, (&cos, &sin));
        let (hq, hkv, d) = (c.n_head, c.n_kv_head, c.head_dim);
        let LayerCache::Sparse { ik, .. } = cache else { unreachable!("a DSA layer has a sparse cache") };
        let y = if p0 == 0 && n > 1 {
            let dims = DsaDims {
                b: 1,
                t: n,
                h: hq,
                h_kv: hkv,
                d,
                n_index_heads: hi,
                index_dim: di,
                topk: c.index_topk,
                window: c.index_local_window,
            };
            let mut sel = vec![0u32; dims.sel_len()];
            indexer_topk(&dims, &qi, &ki, &wi, &mut sel);
            let (mut out, mut lse) = (vec![0.0f32; n * hq * d], vec![0.0f32; n * hq]);
            dsa_attention_forward(&dims, q, k, v, &sel, &mut out, &mut lse);
            out
        } else {
            let key =
                |s: usize| if s >= p0 { &ki[(s - p0) * di..(s - p0 + 1) * di] } else { &ik[s * di..(s + 1) * di] };
            let (topk, window) = (c.index_topk, c.index_local_window);
            let sels: Vec<Vec<usize>> = (0..n)
                .map(|i| {
                    let t = p0 + i;
                    let (qr, wr) = (&qi[i * hi * di..(i + 1) * hi * di], &wi[i * hi..(i + 1) * hi]);
                    let old = (t + 1).saturating_sub(window); // keys s < old compete; s ≥ old are the window
                    let mut scored: Vec<(f32, usize)> = (0..old)
                        .map(|s| {
                            let kr = key(s);
                            let score = (0..hi).map(|j| wr[j] * math::dot(&qr[j * di..(j + 1) * di], kr).max(0.0));
                            (score.fold(0.0f32, |a, b| a + b), s)
                        })
                        .collect();
                    // larger score first, then the more recent key
                    scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
                    let mut sel: Vec<usize> = scored.iter().take(topk).map(|&(_, s)| s).chain(old..=t).collect();
                    sel.sort_unstable();
                    sel
                })
                .collect();
            attend_positions(q, k, v, n, p0, (hq, hkv, d), cache, &sels)
        };
        let LayerCache::Sparse { ik, .. } = cache else { unreachable!() };
        ik.extend_from_slice(&ki);
        y
    }

    /// FFN sub-layer of block `l` on the normed input `h` (`[n, n_embd]`): SwiGLU
    /// `w_down(silu(w_gate h) ∘ w_up h)`, or for MoE layers the routed experts (routing with the
    /// layer's bias, as in training: the `n` rows are one routing call, so a capacity limit applies
    /// per call) plus the shared experts. Returns `[n, n_embd]`.
    fn ffn_step(&self, l: usize, h: &[f32], n: usize) -> Vec<f32> {
        let c = self.config;
        let swiglu = |prefix: &str, width: usize| {
            let g = linear(h, self.bw(l, &format!("{prefix}w_gate")), width);
            let u = linear(h, self.bw(l, &format!("{prefix}w_up")), width);
            let a: Vec<f32> = g.iter().zip(&u).map(|(&gv, &uv)| gv * math::sigmoid(gv) * uv).collect();
            linear(&a, self.bw(l, &format!("{prefix}w_down")), c.n_embd)
        };
        if !c.is_moe_layer(l) {
            return swiglu("mlp.", c.ffn_hidden);
        }
        let m = &c.moe;
        let cfg = m.router();
        let logits = linear(h, self.bw(l, "mlp.router"), m.n_routed_experts);
        let routing = route(&logits, &self.moe_bias[l], &cfg);
        let (mut y, mut moe_cache) = (vec![0.0f32; n * c.n_embd], MoeCache::default());
        let (wg, wu, wd) =
            (self.bw(l, "mlp.experts.w_gate"), self.bw(l, "mlp.experts.w_up"), self.bw(l, "mlp.experts.w_down"));
        moe_forward(h, n, c.n_embd, &routing, wg, wu, wd, m.moe_inter_dim, &mut y, &mut moe_cache);
        if m.n_shared_experts > 0 {
            add_into(&mut y, &swiglu("mlp.shared.", m.n_shared_experts * m.moe_inter_dim));
        }
        y
    }
}

/// The keys query position `t` attends to: `0..sinks` then `lo..hi` (disjoint, increasing).
#[derive(Clone, Copy, Debug)]
struct KeyRange {
    sinks: usize,
    lo: usize,
    hi: usize,
}

/// Softmax attention of the new queries `q` (`[n, hq, d]`, positions `p0..p0 + n`) over the keys
/// `keys(t)` names: rows of the new `k`, `v` (`[n, hkv, d]`) for positions `≥ p0`, else rows of
/// `cache` (which holds positions `< p0`). Returns `[n, hq, d]`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    p0: usize,
    (hq, hkv, d): (usize, usize, usize),
    cache: &LayerCache,
    keys: &(dyn Fn(usize) -> KeyRange + Sync),
) -> Vec<f32> {
    let kv_dim = hkv * d;
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let row = |s: usize, g: usize| -> (&[f32], &[f32]) {
        if s >= p0 {
            let o = (s - p0) * kv_dim + g * d;
            (&k[o..o + d], &v[o..o + d])
        } else {
            let (kr, vr) = cache.row(s, kv_dim);
            (&kr[g * d..(g + 1) * d], &vr[g * d..(g + 1) * d])
        }
    };
    let one = |idx: usize, out: &mut [f32]| {
        let (i, j) = (idx / hq, idx % hq);
        let t = p0 + i;
        let g = j / group;
        let qr = &q[(i * hq + j) * d..(i * hq + j + 1) * d];
        let r = keys(t);
        softmax_attend(qr, (0..r.sinks).chain(r.lo..r.hi), |s| row(s, g), scale, out);
    };
    let mut y = vec![0.0f32; n * hq * d];
    // work per (row, head) task: ~2·keys·d flops; go parallel only when it pays
    let r = keys(p0 + n - 1);
    let work = n * hq * (r.sinks + r.hi - r.lo) * d;
    if work >= 1 << 16 {
        y.par_chunks_mut(d).enumerate().for_each(|(idx, out)| one(idx, out));
    } else {
        y.chunks_mut(d).enumerate().for_each(|(idx, out)| one(idx, out));
    }
    y
}

/// One query row against the key/value rows of `positions` (`row(s)` gives position s's k, v):
/// `out = Σ_s softmax_s(q·k_s·scale) v_s`.
fn softmax_attend<'a>(
    qr: &[f32],
    positions: impl Iterator<Item = usize> + Clone,
    row: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    out: &mut [f32],
) {
    let mut scores: Vec<f32> = positions.clone().map(|s| math::dot(qr, row(s).0) * scale).collect();
    let m = math::max(&scores);
    scores.iter_mut().for_each(|x| *x = math::exp(*x - m));
    let inv = 1.0 / math::sum(&scores);
    out.fill(0.0);
    for (s, &p) in positions.zip(&scores) {
        out.iter_mut().zip(row(s).1).for_each(|(o, &vv)| *o += p * vv);
    }
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Attention of `n` new positions starting at 0 (nothing cached) with the CPU backend's tiled
/// kernels (`[n, hq, d]` out).
fn fresh_attention(kind: AttnKind, c: &ModelConfig, q: &[f32], k: &[f32], v: &[f32], n: usize) -> Vec<f32> {
    let (h, h_kv, d) = (c.n_head, c.n_kv_head, c.head_dim);
    let mut out = vec![0.0f32; n * h * d];
    let mut lse = vec![0.0f32; n * h];
    match kind {
        AttnKind::Dense => attention_forward(&AttnDims { b: 1, t: n, h, h_kv, d }, q, k, v, &mut out, &mut lse),
        AttnKind::Window => {
            let dims = WindowDims { b: 1, t: n, h, h_kv, d, window: c.dsa_window_size, n_global: c.n_global };
            window_attention_forward(&dims, q, k, v, &mut out, &mut lse)
        }
        AttnKind::Sparse => unreachable!("DSA layers attend in Net::sparse_attention"),
    }
    out
}

/// cos and sin of position·θ_i for positions `p0..p0 + n` and frequencies `inv_freq` (`[n, len]`).
fn angles(inv_freq: &[f64], p0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::with_capacity(n * inv_freq.len()), Vec::with_capacity(n * inv_freq.len()));
    for t in p0..p0 + n {
        for &f in inv_freq {
            let angle = t as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Softmax attention of the new queries (positions `p0..p0 + n`) over the positions `sels[i]`
/// (increasing) of each: rows of the new `k`, `v` for positions `≥ p0`, else of `cache`.
#[allow(clippy::too_many_arguments)]
fn attend_positions(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    p0: usize,
    (hq, hkv, d): (usize, usize, usize),
    cache: &LayerCache,
    sels: &[Vec<usize>],
) -> Vec<f32> {
    let kv_dim = hkv * d;
    let scale = 1.0 / (d as f32).sqrt();
    let row = |s: usize, g: usize| -> (&[f32], &[f32]) {
        if s >= p0 {
            let o = (s - p0) * kv_dim + g * d;
            (&k[o..o + d], &v[o..o + d])
        } else {
            let (kr, vr) = cache.row(s, kv_dim);
            (&kr[g * d..(g + 1) * d], &vr[g * d..(g + 1) * d])
        }
    };
    let mut y = vec![0.0f32; n * hq * d];
    y.par_chunks_mut(d).enumerate().for_each(|(idx, out)| {
        let (i, j) = (idx / hq, idx % hq);
        let g = j / (hq / hkv);
        let qr = &q[(i * hq + j) * d..(i * hq + j + 1) * d];
        softmax_attend(qr, sels[i].iter().copied(), |s| row(s, g), scale, out);
    });
    y
}

/// `x · wᵀ` for `x` = `[n, in]` and `w` = `[out, in]` (a PyTorch `nn.Linear` weight). A decode
/// step (`n` = 1) is a matrix–vector product, bound by reading `w` once: one dot product per
/// weight row, rows split over threads (a GEMM would repack `w` first); prefill uses the GEMM.
fn linear(x: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let inp = w.len() / out;
    let n = x.len() / inp;
    let mut y = vec![0.0f32; n * out];
    if n == 1 {
        const ROWS: usize = 64;
        let rows = |(c, yc): (usize, &mut [f32])| {
            for (r, o) in yc.iter_mut().enumerate() {
                let row = c * ROWS + r;
                *o = math::dot(&w[row * inp..(row + 1) * inp], x);
            }
        };
        if w.len() >= 1 << 18 {
            y.par_chunks_mut(ROWS).enumerate().for_each(rows);
        } else {
            y.chunks_mut(ROWS).enumerate().for_each(rows);
        }
    } else {
        gemm(n, out, inp, x, Layout::N, w, Layout::T, &mut y, false);
    }
    y
}

/// In-place parameter-free RMSNorm of each `dim`-wide row (as `backend::cpu::norm`).
fn rmsnorm_rows(x: &mut [f32], dim: usize) {
    for r in x.chunks_exact_mut(dim) {
        let ms = math::dot(r, r) / dim as f32;
        let inv = 1.0 / (ms + RMS_EPS).sqrt();
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

/// NeoX RoPE in place on `x` = `[n, heads, d]`, row `i` rotated by angles `cos/sin[i]` (`[n, d/2]`).
fn apply_rope(x: &mut [f32], heads: usize, d: usize, (cos, sin): (&[f32], &[f32])) {
    let half = d / 2;
    for (i, tok) in x.chunks_exact_mut(heads * d).enumerate() {
        let (cs, sn) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        for hd in tok.chunks_exact_mut(d) {
            let (x1, x2) = hd.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * cs[j] - b * sn[j];
                x2[j] = a * sn[j] + b * cs[j];
            }
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// A model with its KV cache and the token ids it holds: prefill, then one token per step.
pub struct Decoder<'m> {
    pub net: Net<'m>,
    cache: KvCache,
    /// The ids whose keys and values are cached (`history.len() == cache.len()`).
    history: Vec<u32>,
    /// Softcapped logits after the last cached token.
    last_logits: Option<Vec<f32>>,
}

impl<'m> Decoder<'m> {
    pub fn new(model: &'m Model) -> Result<Decoder<'m>> {
        let cache = KvCache::new(&model.config);
        Ok(Decoder { net: Net::new(model)?, cache, history: Vec::new(), last_logits: None })
    }

    pub fn config(&self) -> &ModelConfig {
        self.net.config
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
        context_limit(self.net.config)
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

    fn run(&mut self, ids: &[u32], want: Want) -> Result<Vec<f32>> {
        // always compute the last row's logits, so `sync` can answer without recomputing
        let w = if want == Want::None { Want::Last } else { want };
        let logits = self.net.forward(ids, &mut self.cache, w)?;
        self.history.extend_from_slice(ids);
        let v = self.net.config.vocab_size;
        self.last_logits = Some(logits[logits.len() - v..].to_vec());
        Ok(if want == Want::None { Vec::new() } else { logits })
    }

    /// Appends `ids` (a prompt, any length that fits) in one pass; returns the softcapped logits
    /// `[vocab]` of the next token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.run(ids, Want::Last)
    }

    /// As [`Self::prefill`], returning the logits after every one of `ids` (`[ids.len(), vocab]`).
    pub fn prefill_all(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.run(ids, Want::All)
    }

    /// Appends one token; returns the next token's softcapped logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.run(&[id], Want::Last)
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
}
