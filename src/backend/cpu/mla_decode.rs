//! Decoding MLA layers on the latent cache (`nn::mla_decode` has the model's side): the
//! absorbed up-projections and attention over the latent rows (DeepSeek-V2 §2.1.3). With H heads,
//! d_n = qk_nope_head_dim, d_v = v_head_dim, r = kv_lora_rank, d_r = qk_rope_head_dim and
//! `wkv_b [H·(d_n + d_v), r]` (per head h: rows `W_UK_h [d_n, r]`, then `W_UV_h [d_v, r]`):
//!
//! ```text
//! q̃_h   = W_UK_hᵀ q_nope_h                                  [r]      (absorb_query)
//! s_h(s) = (q̃_h·c_kv(s) + q_pe_h·k_pe(s)) · scale           scale = 1/sqrt(d_n + d_r)
//! o_lat_h = Σ_s softmax_s(s_h) c_kv(s)                       [r]      (latent_attention_cached)
//! o_h    = W_UV_h o_lat_h                                     [d_v]    (absorb_output)
//! ```
//!
//! Since `k_nope_h(s) = W_UK_h c_kv(s)` and `v_h(s) = W_UV_h c_kv(s)`, `q_nope_h·k_nope_h(s) =
//! q̃_h·c_kv(s)` and `Σ_s p_s v_h(s) = W_UV_h o_lat_h`: the same attention as the training
//! forward's, up to rounding, with one key head `[c_kv ; k_pe]` (r + d_r wide) shared by every
//! query head and values `c_kv` (the key row's first r floats): MQA over the latent. The scale
//! is the un-absorbed model's (the dot products are the same numbers), not 1/sqrt(r + d_r).
//! Inference only (no backward); the CUDA backend refuses these ops.

use super::attention::AttnDims;
use super::decode::{append_index_keys, attend, dsa_select, key_range, CacheKind, LayerCache};
use super::dsa::DsaDims;
use super::math;
use rayon::prelude::*;

/// The head shapes of the absorption products: `n` rows, `h` heads, `d_nope`, `d_v`, `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbsorbDims {
    pub n: usize,
    pub h: usize,
    pub d_nope: usize,
    pub d_v: usize,
    pub rank: usize,
}

/// Which side of the attention an up-projection is absorbed into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbsorbSide {
    /// `q̃_h = W_UK_hᵀ q_nope_h`: x `[n, h, d_nope]` → `[n, h, rank]`.
    Query,
    /// `o_h = W_UV_h o_lat_h`: x `[n, h, rank]` → `[n, h, d_v]`.
    Output,
}

/// The shapes of attention over a latent cache: `t` new rows, `h` query heads, latent `rank`,
/// rotary width `rope`, and the score `scale` (1/sqrt(d_nope + rope)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatentDims {
    pub t: usize,
    pub h: usize,
    pub rank: usize,
    pub rope: usize,
    pub scale: f32,
}

/// The absorbed up-projection of `side` (module doc) with `wkv_b [h·(d_nope + d_v), rank]`.
pub fn absorb(dims: &AbsorbDims, side: AbsorbSide, x: &[f32], wkv_b: &[f32]) -> Vec<f32> {
    let &AbsorbDims { n, h, d_nope, d_v, rank } = dims;
    let stride = (d_nope + d_v) * rank; // one head's rows of wkv_b
    assert_eq!(wkv_b.len(), h * stride, "mla absorb: wkv_b must be [{h}·({d_nope} + {d_v}), {rank}]");
    let (d_in, d_out) = match side {
        AbsorbSide::Query => (d_nope, rank),
        AbsorbSide::Output => (rank, d_v),
    };
    assert_eq!(x.len(), n * h * d_in, "mla absorb: x must be [{n}, {h}, {d_in}]");
    let mut y = vec![0.0f32; n * h * d_out];
    let one = |idx: usize, out: &mut [f32]| {
        let head = idx % h;
        let (xr, w) = (&x[idx * d_in..(idx + 1) * d_in], &wkv_b[head * stride..(head + 1) * stride]);
        match side {
            // Σ_i q_nope[i] · W_UK[i, :], row by row of W_UK
            AbsorbSide::Query => {
                for (i, &xi) in xr.iter().enumerate() {
                    out.iter_mut().zip(&w[i * rank..(i + 1) * rank]).for_each(|(o, &wv)| *o += xi * wv);
                }
            }
            // o[i] = W_UV[i, :] · o_lat
            AbsorbSide::Output => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = math::dot(&w[(d_nope + i) * rank..(d_nope + i + 1) * rank], xr);
                }
            }
        }
    };
    if n * h * d_in * d_out >= 1 << 16 {
        y.par_chunks_mut(d_out).enumerate().for_each(|(idx, out)| one(idx, out));
    } else {
        y.chunks_mut(d_out).enumerate().for_each(|(idx, out)| one(idx, out));
    }
    y
}

/// Attention of the `dims.t` new rows (positions `cache.len()..`) over a latent cache: queries
/// `q [n, h, rank + rope]` = `[q̃ ; RoPE(q_pe)]`, new latent rows `kv [n, rank + rope]` =
/// `[c_kv ; RoPE(k_pe)]`. Dense and window layers see the cache kind's causal key range; a DSA
/// layer (`index` = its shapes and the indexer's qi, ki, wi) the local window plus the indexer's
/// top-k over cached and new indexer keys, the same rows for every head (every key earlier
/// than the query when `dense`: the warm-up). Appends kv (and ki). Returns `o_lat [n, h, rank]`.
#[allow(clippy::type_complexity)]
pub fn latent_attention_cached(
    dims: &LatentDims,
    q: &[f32],
    kv: &[f32],
    index: Option<(&DsaDims, (&[f32], &[f32], &[f32]))>,
    dense: bool,
    cache: &mut LayerCache,
) -> Vec<f32> {
    let &LatentDims { t: n, h, rank, rope, scale } = dims;
    let (width, p0) = (rank + rope, cache.len());
    assert!(
        cache.latent_rank() == Some(rank) && cache.row_width() == width,
        "latent attention: the cache is not a latent cache of rank {rank} + rope {rope}"
    );
    assert!(q.len() == n * h * width && kv.len() == n * width, "latent attention: q [n, h, r + d_r], kv [n, r + d_r]");
    // MQA: one key head; the new rows' values are their first `rank` floats
    let ad = AttnDims { b: 1, t: n, h, h_kv: 1, d: width };
    let v: Vec<f32> = kv.chunks_exact(width).flat_map(|r| &r[..rank]).copied().collect();
    let y = match (cache.kind(), index) {
        (CacheKind::Sparse { .. }, Some((ds, (qi, ki, wi)))) => {
            assert!(ds.t == n && ds.b == 1, "latent attention: the indexer's shapes are not the query's");
            let y = if dense {
                attend((q, kv, &v), &ad, (rank, scale), cache, n * h * (p0 + n) * width, &|t| 0..t + 1)
            } else {
                let sels = dsa_select(ds, (qi, ki, wi), cache);
                let work = sels.iter().map(Vec::len).sum::<usize>() * h * width;
                attend((q, kv, &v), &ad, (rank, scale), cache, work, &|t| sels[t - p0].iter().copied())
            };
            append_index_keys(cache, ki);
            y
        }
        (CacheKind::Sparse { .. }, None) => panic!("latent attention: a DSA layer needs its indexer"),
        (kind, _) => {
            let r = key_range(kind, p0 + n - 1);
            let work = n * h * (r.sinks + r.hi - r.lo) * width;
            attend((q, kv, &v), &ad, (rank, scale), cache, work, &|t| {
                let r = key_range(kind, t);
                (0..r.sinks).chain(r.lo..r.hi)
            })
        }
    };
    cache.append(kv, &[]);
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 29.0).collect()
    }

    #[test]
    fn absorption_products_equal_the_per_head_matrix_products() {
        // a naive f64 reference of W_UK_hᵀ q and W_UV_h o for every row and head
        let dims = AbsorbDims { n: 3, h: 2, d_nope: 4, d_v: 5, rank: 6 };
        let AbsorbDims { n, h, d_nope, d_v, rank } = dims;
        let w = values(h * (d_nope + d_v) * rank, 1);
        let wat = |head: usize, row: usize, j: usize| w[(head * (d_nope + d_v) + row) * rank + j] as f64;
        let xq = values(n * h * d_nope, 2);
        let q = absorb(&dims, AbsorbSide::Query, &xq, &w);
        let xo = values(n * h * rank, 3);
        let o = absorb(&dims, AbsorbSide::Output, &xo, &w);
        for i in 0..n {
            for hd in 0..h {
                for j in 0..rank {
                    let want: f64 = (0..d_nope).map(|a| xq[(i * h + hd) * d_nope + a] as f64 * wat(hd, a, j)).sum();
                    assert!((q[(i * h + hd) * rank + j] as f64 - want).abs() < 1e-5, "query {i} {hd} {j}");
                }
                for a in 0..d_v {
                    let want: f64 =
                        (0..rank).map(|j| xo[(i * h + hd) * rank + j] as f64 * wat(hd, d_nope + a, j)).sum();
                    assert!((o[(i * h + hd) * d_v + a] as f64 - want).abs() < 1e-5, "output {i} {hd} {a}");
                }
            }
        }
    }

    #[test]
    fn latent_attention_equals_naive_softmax_over_the_latent_rows() {
        // two calls (3 rows, then 2) into a dense latent cache against an f64 reference
        let (h, rank, rope) = (3, 5, 2);
        let width = rank + rope;
        let scale = 1.0 / 3.0f32.sqrt();
        let mut cache = LayerCache::latent(CacheKind::Dense, rank, rope, 16);
        let kv = values(5 * width, 4);
        let q = values(5 * h * width, 5);
        let mut got = Vec::new();
        for (a, b) in [(0, 3), (3, 5)] {
            let dims = LatentDims { t: b - a, h, rank, rope, scale };
            got.extend(latent_attention_cached(
                &dims,
                &q[a * h * width..b * h * width],
                &kv[a * width..b * width],
                None,
                false,
                &mut cache,
            ));
        }
        assert_eq!(cache.bytes(), 5 * width * 4, "one latent row per position, no value rows");
        for t in 0..5 {
            for hd in 0..h {
                let qr = &q[(t * h + hd) * width..(t * h + hd + 1) * width];
                let s: Vec<f64> = (0..=t)
                    .map(|s| {
                        let kr = &kv[s * width..(s + 1) * width];
                        qr.iter().zip(kr).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for j in 0..rank {
                    let want: f64 = (0..=t).map(|u| (s[u] - m).exp() / z * kv[u * width + j] as f64).sum();
                    let g = got[(t * h + hd) * rank + j] as f64;
                    assert!((g - want).abs() < 1e-5, "row {t} head {hd} col {j}: {g} vs {want}");
                }
            }
        }
    }
}
