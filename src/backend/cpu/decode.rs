//! Inference over a key/value cache (KV-cache decoding of one sequence): the cache of one layer,
//! RoPE at arbitrary positions, and attention of new rows over cached plus new keys. The model
//! (`nn::model`) calls these through the tape when it runs with a cache (`nn::decode`).
//!
//! **What a layer caches.** Keys after QK-norm and RoPE, and values, as `[kv_dim]` rows:
//! - dense layers keep every position (row `s` is position `s`); the allocation grows by
//!   doubling, capped at `max_rows` rows;
//! - window layers see `A(t) = {s : t − W < s ≤ t} ∪ {s < G, s ≤ t}`, so they keep a ring of the
//!   last `R = W + slack` positions (position `s` in slot `s mod R`; `slack` = 0 unless the cache
//!   is made for rollback, [`LayerCache::with_slack`]) and, separately, the first `G` positions
//!   (the attention sinks; while a sink is still inside the window it is held twice);
//! - DSA layers keep every position's keys and values plus the lightning indexer's key
//!   (`index_dim` floats after RoPE).
//!
//! A **latent** cache ([`LayerCache::latent`], MLA layers, `cpu::mla_decode`) holds one row per
//! position, `[c_kv ; k_pe]` (`rank + rope` floats), and no value rows: a position's value is the
//! first `rank` floats of its key row. The layer kinds keep their positions as above; every call
//! on a latent cache, a prefill too, runs the per-query loops below.
//!
//! **Compute.** New rows into an empty cache (a prefill) run the training kernels (tiled
//! attention, `dsa::indexer_topk` and `dsa::dsa_attention_forward`), so a prefill computes what
//! the training forward computes. Later rows attend with per-query loops over the cached rows:
//! `O(T)` per head for a dense layer, `O(W + G)` for a window layer; a DSA row scores every cached
//! indexer key (`O(T · H_I · d_I)`, narrow) and attends to its top-k plus the local window only.
//!
//! **Rollback.** [`LayerCache::truncate`] forgets the newest positions (speculative decoding's
//! rejected drafts), leaving the cache as if it had never seen them. Dense and DSA caches drop
//! rows. A window cache's ring has overwritten older positions; it can roll back to `len` only
//! while it still holds every position the next query at `len` reads, `max(len + 1 − W, G)..len`:
//! with `slack` extra slots that is any rollback of at most `slack + 1` positions. Beyond that
//! `truncate` is an error, never an inexact cache.

use super::attention::{attention_forward, AttnDims};
use super::dsa::{dsa_attention_forward, indexer_topk, DsaDims};
use super::math;
use super::rope::RopeTable;
use super::window_attention::{window_attention_forward, WindowDims};
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

const F32_BYTES: usize = std::mem::size_of::<f32>();

/// Which attention a layer's cache serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    Dense,
    /// Sliding window of `window` positions plus the first `n_global` ones.
    Window {
        window: usize,
        n_global: usize,
    },
    /// DSA: dense keys and values plus the indexer key (`index_dim` floats) per position.
    Sparse {
        index_dim: usize,
    },
}

/// The key/value cache of one layer, holding positions `0..len()` (see the module doc).
#[derive(Clone, Debug)]
pub struct LayerCache {
    kind: CacheKind,
    kv_dim: usize,
    /// The most rows a growing (dense or DSA) cache allocates.
    max_rows: usize,
    len: usize,
    /// Dense and DSA: row `s` is position `s`. Window: the ring (slot `s mod window`).
    k: Vec<f32>,
    v: Vec<f32>,
    /// DSA: the indexer key of each position.
    ik: Vec<f32>,
    /// Window: ring slots beyond `window` (the ring holds `window + slack` positions).
    slack: usize,
    /// Window: the oldest position the ring still holds (older slots were overwritten).
    ring_start: usize,
    /// Window: row `s` is sink position `s < n_global`.
    global_k: Vec<f32>,
    global_v: Vec<f32>,
    /// A latent cache (MLA): values are the first `latent_rank` floats of each key row (`v` and
    /// `global_v` stay empty); None: values are rows of their own.
    latent_rank: Option<usize>,
}

impl LayerCache {
    pub fn new(kind: CacheKind, kv_dim: usize, max_rows: usize) -> LayerCache {
        let (k, v, ik, global_k, global_v) = Default::default();
        let latent_rank = None;
        LayerCache {
            kind,
            kv_dim,
            max_rows,
            len: 0,
            k,
            v,
            ik,
            slack: 0,
            ring_start: 0,
            global_k,
            global_v,
            latent_rank,
        }
    }

    /// An MLA layer's latent cache: one `[c_kv ; k_pe]` row of `rank + rope` floats per position,
    /// whose first `rank` floats are also the value (module doc).
    pub fn latent(kind: CacheKind, rank: usize, rope: usize, max_rows: usize) -> LayerCache {
        LayerCache { latent_rank: Some(rank), ..LayerCache::new(kind, rank + rope, max_rows) }
    }

    /// The value width of a latent cache (None: a key/value cache).
    pub fn latent_rank(&self) -> Option<usize> {
        self.latent_rank
    }

    /// Floats of one cached key row (`kv_dim`, or `rank + rope` for a latent cache).
    pub fn row_width(&self) -> usize {
        self.kv_dim
    }

    /// Floats of one cached value row: `kv_dim`, or 0 for a latent cache (values live in the keys).
    fn v_width(&self) -> usize {
        if self.latent_rank.is_some() {
            0
        } else {
            self.kv_dim
        }
    }

    /// A window cache whose ring keeps `slack` positions more than the window, so that
    /// [`Self::truncate`] can roll back up to `slack + 1` positions (no effect on other kinds).
    /// Costs `slack · kv_dim · 2` floats per window layer (`slack` latent rows for a latent cache).
    pub fn with_slack(mut self, slack: usize) -> LayerCache {
        assert!(self.is_empty(), "with_slack: the cache must be empty");
        self.slack = slack;
        self
    }

    /// Ring slots of a window cache (`window + slack`).
    fn ring(&self, window: usize) -> usize {
        window + self.slack
    }

    pub fn kind(&self) -> CacheKind {
        self.kind
    }

    /// Positions held (the next row's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn vecs(&self) -> [&Vec<f32>; 5] {
        [&self.k, &self.v, &self.ik, &self.global_k, &self.global_v]
    }

    /// Bytes of the cached rows.
    pub fn bytes(&self) -> usize {
        self.vecs().iter().map(|v| v.len() * F32_BYTES).sum()
    }

    /// Bytes allocated (at least [`Self::bytes`]; a dense layer's buffers grow by doubling).
    pub fn allocated_bytes(&self) -> usize {
        self.vecs().iter().map(|v| v.capacity() * F32_BYTES).sum()
    }

    /// Forgets every position (keeps the allocations).
    pub fn clear(&mut self) {
        for buf in [&mut self.k, &mut self.v, &mut self.ik, &mut self.global_k, &mut self.global_v] {
            buf.clear();
        }
        self.len = 0;
        self.ring_start = 0;
    }

    /// Whether [`Self::truncate`] to `len` is possible (the error it would return).
    pub fn check_truncate(&self, len: usize) -> Result<()> {
        ensure!(len <= self.len, "truncate: cannot extend a cache of {} positions to {len}", self.len);
        if let CacheKind::Window { window, n_global } = self.kind {
            // the ring positions query `len` reads (older window positions are sinks)
            let need = (len + 1).saturating_sub(window).max(n_global).min(len);
            if len < self.len && need < self.ring_start {
                bail!(
                    "truncate: a window cache at {} positions cannot roll back to {len}: position {need} was \
                     overwritten (ring of {} = window {window} + slack {}; at most slack + 1 positions roll back)",
                    self.len,
                    self.ring(window),
                    self.slack
                );
            }
        }
        Ok(())
    }

    /// Forgets positions `len..` (must be at most [`Self::len`]): afterwards the cache computes
    /// exactly what a cache that only ever saw positions `0..len` computes. Errors, changing
    /// nothing, when a window ring no longer holds a position the next query would read.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.check_truncate(len)?;
        let (kv, vw) = (self.kv_dim, self.v_width());
        let rows = match self.kind {
            CacheKind::Dense => len,
            CacheKind::Sparse { index_dim } => {
                self.ik.truncate(len * index_dim);
                len
            }
            CacheKind::Window { window, n_global } => {
                self.global_k.truncate(len.min(n_global) * kv);
                self.global_v.truncate(len.min(n_global) * vw);
                // a ring that never filled is positions 0..: drop the tail; a full one keeps its
                // slots (those of positions ≥ len are overwritten before they are read)
                let ring = self.ring(window);
                if self.k.len() < ring * kv {
                    len
                } else {
                    ring
                }
            }
        };
        self.k.truncate(rows * kv);
        self.v.truncate(rows * vw);
        self.len = len;
        Ok(())
    }

    /// Key and value rows of cached position `s` (one the layer keeps: a window layer holds the
    /// last `window` positions and the first `n_global`); a latent cache's value is the head of
    /// its key row.
    #[inline]
    pub(super) fn row(&self, s: usize) -> (&[f32], &[f32]) {
        let kv = self.kv_dim;
        let (buf_k, buf_v, r) = match self.kind {
            CacheKind::Window { window, n_global } => {
                if s < n_global && (s + 1) * kv <= self.global_k.len() {
                    (&self.global_k, &self.global_v, s)
                } else {
                    debug_assert!(s >= self.ring_start, "window cache: position {s} was overwritten");
                    (&self.k, &self.v, s % self.ring(window))
                }
            }
            CacheKind::Dense | CacheKind::Sparse { .. } => (&self.k, &self.v, s),
        };
        let key = &buf_k[r * kv..(r + 1) * kv];
        match self.latent_rank {
            Some(rank) => (key, &key[..rank]),
            None => (key, &buf_v[r * kv..(r + 1) * kv]),
        }
    }

    /// Stores the rows of `k_new`, `v_new` as positions `len..len + n` (a latent cache: `v_new`
    /// is empty).
    pub(super) fn append(&mut self, k_new: &[f32], v_new: &[f32]) {
        let (kv, vw) = (self.kv_dim, self.v_width());
        let n = k_new.len() / kv;
        debug_assert_eq!(v_new.len(), n * vw);
        match self.kind {
            CacheKind::Dense | CacheKind::Sparse { .. } => {
                debug_assert_eq!(self.k.len(), self.len * kv);
                for (buf, width) in [(&mut self.k, kv), (&mut self.v, vw)] {
                    let need = buf.len() + n * width;
                    if buf.capacity() < need {
                        let doubled = (2 * buf.capacity()).max(need);
                        let target = doubled.min((self.max_rows * width).max(need));
                        buf.reserve_exact(target - buf.len());
                    }
                }
                self.k.extend_from_slice(k_new);
                self.v.extend_from_slice(v_new);
            }
            CacheKind::Window { window, n_global } => {
                let ring = self.ring(window);
                for i in 0..n {
                    let s = self.len + i;
                    let (kr, vr) = (&k_new[i * kv..(i + 1) * kv], &v_new[i * vw..(i + 1) * vw]);
                    if s < n_global {
                        self.global_k.extend_from_slice(kr);
                        self.global_v.extend_from_slice(vr);
                    }
                    let (slot, slot_v) = ((s % ring) * kv, (s % ring) * vw);
                    if slot < self.k.len() {
                        self.k[slot..slot + kv].copy_from_slice(kr);
                        self.v[slot_v..slot_v + vw].copy_from_slice(vr);
                    } else {
                        debug_assert_eq!(slot, self.k.len());
                        self.k.extend_from_slice(kr);
                        self.v.extend_from_slice(vr);
                    }
                    self.ring_start = self.ring_start.max((s + 1).saturating_sub(ring));
                }
            }
        }
        self.len += n;
    }
}

/// NeoX RoPE of x = `[n, heads, d]` whose row `i` is position `p0 + i`: the training `table`'s
/// angles below its length, and past it the angles computed as `RopeTable` computes them
/// (`t · θ^(−2j/d)` in f64, rounded to f32), so decoding can continue beyond `max_seq_len`.
pub fn rope_at(table: &RopeTable, x: &[f32], heads: usize, p0: usize, theta: f64) -> Vec<f32> {
    let d = table.head_dim;
    let half = d / 2;
    assert!(x.len() % (heads * d) == 0, "rope_at: x must be [n, {heads}, {d}]");
    let inv_freq: Vec<f64> = (0..half).map(|j| theta.powf(-2.0 * j as f64 / d as f64)).collect();
    let (mut cs, mut sn) = (vec![0.0f32; half], vec![0.0f32; half]);
    let mut y = vec![0.0f32; x.len()];
    for (i, (xt, yt)) in x.chunks_exact(heads * d).zip(y.chunks_exact_mut(heads * d)).enumerate() {
        let t = p0 + i;
        let (cs, sn) = if t < table.max_t {
            table.angles(t)
        } else {
            for (j, &f) in inv_freq.iter().enumerate() {
                let angle = t as f64 * f;
                cs[j] = angle.cos() as f32;
                sn[j] = angle.sin() as f32;
            }
            (&cs[..], &sn[..])
        };
        for (xh, yh) in xt.chunks_exact(d).zip(yt.chunks_exact_mut(d)) {
            let ((x1, x2), (y1, y2)) = (xh.split_at(half), yh.split_at_mut(half));
            for j in 0..half {
                y1[j] = x1[j] * cs[j] - x2[j] * sn[j];
                y2[j] = x1[j] * sn[j] + x2[j] * cs[j];
            }
        }
    }
    y
}

/// The keys query position `t` attends to: `0..sinks` then `lo..hi` (disjoint, increasing).
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyRange {
    pub(super) sinks: usize,
    pub(super) lo: usize,
    pub(super) hi: usize,
}

/// The causal key range of a dense layer, or a window layer's window and sinks.
pub(super) fn key_range(kind: CacheKind, t: usize) -> KeyRange {
    match kind {
        CacheKind::Window { window, n_global } => {
            let lo = (t + 1).saturating_sub(window);
            KeyRange { sinks: n_global.min(lo), lo, hi: t + 1 }
        }
        CacheKind::Dense | CacheKind::Sparse { .. } => KeyRange { sinks: 0, lo: 0, hi: t + 1 },
    }
}

/// Causal (dense or window) attention of the `dims.t` new rows q, k, v (`[n, h, d]`, `[n, h_kv, d]`,
/// positions `cache.len()..`) over the cached and new keys; appends k and v. Returns `[n, h, d]`.
pub fn attention_cached(dims: &AttnDims, q: &[f32], k: &[f32], v: &[f32], cache: &mut LayerCache) -> Vec<f32> {
    let (n, p0) = (dims.t, cache.len);
    assert!(dims.b == 1 && dims.h_kv * dims.d == cache.kv_dim, "attention_cached: one sequence of kv_dim rows");
    let y = if p0 == 0 && n > 1 {
        fresh_attention(dims, cache.kind, q, k, v)
    } else {
        let kind = cache.kind;
        let r = key_range(kind, p0 + n - 1);
        let work = n * dims.h * (r.sinks + r.hi - r.lo) * dims.d;
        let scale = 1.0 / (dims.d as f32).sqrt();
        attend((q, k, v), dims, (dims.d, scale), cache, work, &|t| {
            let r = key_range(kind, t);
            (0..r.sinks).chain(r.lo..r.hi)
        })
    };
    cache.append(k, v);
    y
}

/// Attention of rows at positions `0..n` (nothing cached) with the tiled training kernels.
fn fresh_attention(dims: &AttnDims, kind: CacheKind, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (mut out, mut lse) = (vec![0.0f32; dims.q_len()], vec![0.0f32; dims.b * dims.t * dims.h]);
    let &AttnDims { b, t, h, h_kv, d } = dims;
    match kind {
        CacheKind::Window { window, n_global } => {
            let wd = WindowDims { b, t, h, h_kv, d, window, n_global };
            window_attention_forward(&wd, q, k, v, &mut out, &mut lse)
        }
        CacheKind::Dense | CacheKind::Sparse { .. } => attention_forward(dims, q, k, v, &mut out, &mut lse),
    }
    out
}

/// DSA attention of the new rows (`dims.t` of them, positions `cache.len()..`): each query attends
/// to the local window plus the top-k older keys by the indexer's score over the cached and new
/// indexer keys (`ki`, after RoPE; ties to the more recent key), as `dsa::indexer_topk` selects
/// over a whole sequence; `dense` attends to every earlier key instead (the warm-up). Appends
/// k, v and ki. Returns `[n, h, d]`.
pub fn dsa_attention_cached(
    dims: &DsaDims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (qi, ki, wi): (&[f32], &[f32], &[f32]),
    dense: bool,
    cache: &mut LayerCache,
) -> Vec<f32> {
    let (n, p0, ad, di) = (dims.t, cache.len, dims.attn(), dims.index_dim);
    assert!(dims.b == 1 && matches!(cache.kind, CacheKind::Sparse { index_dim } if index_dim == di));
    let y = if dense {
        attention_cached_rows(&ad, (q, k, v), cache)
    } else if p0 == 0 && n > 1 {
        let mut sel = vec![0u32; dims.sel_len()];
        indexer_topk(dims, qi, ki, wi, &mut sel);
        let (mut out, mut lse) = (vec![0.0f32; ad.q_len()], vec![0.0f32; n * dims.h]);
        dsa_attention_forward(dims, q, k, v, &sel, &mut out, &mut lse);
        out
    } else {
        let sels = dsa_select(dims, (qi, ki, wi), cache);
        let work = sels.iter().map(Vec::len).sum::<usize>() * dims.h * dims.d;
        let scale = 1.0 / (dims.d as f32).sqrt();
        attend((q, k, v), &ad, (dims.d, scale), cache, work, &|t| sels[t - p0].iter().copied())
    };
    cache.ik.extend_from_slice(ki);
    cache.append(k, v);
    y
}

/// The keys each new row `i` of a DSA layer attends to (increasing): the local window plus the
/// top-k older keys by the indexer's score over the cached (`cache`'s) and new indexer keys `ki`
/// (ties to the more recent key), as `dsa::indexer_topk` selects over a whole sequence.
pub(super) fn dsa_select(
    dims: &DsaDims,
    (qi, ki, wi): (&[f32], &[f32], &[f32]),
    cache: &LayerCache,
) -> Vec<Vec<usize>> {
    let (n, p0, ik) = (dims.t, cache.len, &cache.ik);
    let (hi, di) = (dims.n_index_heads, dims.index_dim);
    let key = |s: usize| if s >= p0 { &ki[(s - p0) * di..(s - p0 + 1) * di] } else { &ik[s * di..(s + 1) * di] };
    let select = |i: usize| {
        let t = p0 + i;
        let (qr, wr) = (&qi[i * hi * di..(i + 1) * hi * di], &wi[i * hi..(i + 1) * hi]);
        let old = (t + 1).saturating_sub(dims.window); // keys s < old compete; s ≥ old are the window
        let mut scored: Vec<(f32, usize)> = (0..old)
            .map(|s| {
                let kr = key(s);
                let score = (0..hi).map(|j| wr[j] * math::dot(&qr[j * di..(j + 1) * di], kr).max(0.0));
                (score.fold(0.0f32, |a, b| a + b), s)
            })
            .collect();
        // larger score first, then the more recent key
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        let mut sel: Vec<usize> = scored.iter().take(dims.topk).map(|&(_, s)| s).chain(old..=t).collect();
        sel.sort_unstable();
        sel
    };
    // a step (one row) stays on this thread; rows of a longer call are scored in parallel
    if n > 1 {
        (0..n).into_par_iter().map(select).collect()
    } else {
        (0..n).map(select).collect()
    }
}

/// A DSA layer's indexer keys `ki` (`[n, index_dim]`) join its cache (before [`LayerCache::append`]).
pub(super) fn append_index_keys(cache: &mut LayerCache, ki: &[f32]) {
    cache.ik.extend_from_slice(ki);
}

/// Dense causal attention over the cache without appending (the DSA warm-up's path).
fn attention_cached_rows(dims: &AttnDims, (q, k, v): (&[f32], &[f32], &[f32]), cache: &LayerCache) -> Vec<f32> {
    let (n, p0) = (dims.t, cache.len);
    if p0 == 0 && n > 1 {
        return fresh_attention(dims, CacheKind::Dense, q, k, v);
    }
    let work = n * dims.h * (p0 + n) * dims.d;
    let scale = 1.0 / (dims.d as f32).sqrt();
    attend((q, k, v), dims, (dims.d, scale), cache, work, &|t| 0..t + 1)
}

/// Softmax attention of the new queries `q` (`[n, h, d]`, positions `p0..p0 + n` with
/// `p0 = cache.len()`) over the keys `keys(t)` lists (increasing): rows of the new `k`
/// (`[n, h_kv, d]`) and `v` (`[n, h_kv, dv]`) for positions `≥ p0`, else rows of `cache`;
/// scores `q·k · scale`. Parallel over (row, head) when the `work` (about the flops) pays for
/// it. Returns `[n, h, dv]`.
pub(super) fn attend<I: Iterator<Item = usize> + Clone>(
    (q, k, v): (&[f32], &[f32], &[f32]),
    dims: &AttnDims,
    (dv, scale): (usize, f32),
    cache: &LayerCache,
    work: usize,
    keys: &(dyn Fn(usize) -> I + Sync),
) -> Vec<f32> {
    let (hq, d, p0) = (dims.h, dims.d, cache.len);
    let group = dims.h / dims.h_kv;
    let row = |s: usize, g: usize| -> (&[f32], &[f32]) {
        if s >= p0 {
            let (o, ov) = (((s - p0) * dims.h_kv + g) * d, ((s - p0) * dims.h_kv + g) * dv);
            (&k[o..o + d], &v[ov..ov + dv])
        } else {
            let (kr, vr) = cache.row(s);
            (&kr[g * d..(g + 1) * d], &vr[g * dv..(g + 1) * dv])
        }
    };
    let one = |idx: usize, out: &mut [f32]| {
        let (i, j) = (idx / hq, idx % hq);
        let qr = &q[(i * hq + j) * d..(i * hq + j + 1) * d];
        softmax_attend(qr, keys(p0 + i), |s| row(s, j / group), scale, out);
    };
    let mut y = vec![0.0f32; dims.t * hq * dv];
    if work >= 1 << 16 {
        y.par_chunks_mut(dv).enumerate().for_each(|(idx, out)| one(idx, out));
    } else {
        y.chunks_mut(dv).enumerate().for_each(|(idx, out)| one(idx, out));
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

#[cfg(test)]
mod tests {
    use super::super::rope::rope_forward;
    use super::*;

    #[test]
    fn rope_at_equals_the_training_table_bitwise() {
        let (heads, d, t, theta) = (3, 8, 11, 10000.0);
        let x: Vec<f32> = (0..t * heads * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let mut want = vec![0.0; x.len()];
        rope_forward(&RopeTable::new(d, t, theta), &x, 1, t, heads, &mut want);
        // from the table, and past a shorter table's end (angles computed)
        for table in [RopeTable::new(d, t, theta), RopeTable::new(d, 3, theta)] {
            assert_eq!(rope_at(&table, &x, heads, 0, theta), want);
            // a suffix rotated from its own start position
            let row = heads * d;
            assert_eq!(rope_at(&table, &x[4 * row..], heads, 4, theta), want[4 * row..]);
        }
    }
}
