//! Decoding MLA layers on the latent cache (docs/model.md, "Multi-head Latent Attention",
//! decoding): per position and layer the cache holds `[c_kv ; k_pe]` — the normalized key/value
//! latent and the rotated shared key, `kv_lora_rank + qk_rope_head_dim` floats — instead of every
//! head's keys and values (`2 · H · d`). The up-projections `wkv_b` are absorbed into the query
//! and the output (DeepSeek-V2 §2.1.3; the kernels are `backend::cpu::mla_decode`):
//!
//! ```text
//! q̃_h   = W_UK_hᵀ q_nope_h                                    (W_UK_h: head h's d_n rows of wkv_b)
//! o_lat_h = softmax_s((q̃_h·c_kv(s) + RoPE(q_pe_h)·k_pe(s)) / sqrt(d_n + d_r)) · c_kv(s)
//! o_h    = W_UV_h o_lat_h                                      (W_UV_h: its d_v rows)
//! x     += c_proj · [o_1 … o_H]
//! ```
//!
//! — MQA over the latent (one key head of width r_kv + d_r, values its first r_kv floats). The
//! scores are the training forward's, `q_h·k_h(s) / sqrt(d_n + d_r)`, computed in another order.
//! A DSA (`S`) layer's indexer reads what the training forward gives it (`Model::indexer_qkw` with
//! the normalized query latent, or h when `q_lora_rank = 0`) and its selected latent rows serve
//! every head. Window (`W`) layers keep their ring and sinks of latent rows.

use super::config::AttnKind;
use super::model::Model;
use crate::autograd::{Tape, Var};
use crate::backend::{AbsorbDims, AbsorbSide, Backend, LatentDims, LayerCache};
use anyhow::Result;

impl Model {
    /// The attention output `[n, H·d_v]` (before c_proj) of MLA layer `l` for the block's
    /// normalized input h `[n, C]` (one sequence, positions `cache.len()..`), attending over the
    /// latent `cache` and appending the new rows' latents; `w` = the block's parameters.
    pub(super) fn mla_attention_cached<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        h: Var,
        w: &[Var],
        cache: &mut LayerCache,
    ) -> Result<Var> {
        let c = &self.config;
        let (n, nh, p0) = (tape.shape(h)[0], c.n_head, Some(cache.len()));
        let (dn, dr, dv, rkv) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let na = c.n_attn_params();
        let (wkv_a, wkv_b) = (w[na - 3], w[na - 2]);
        // the training forward's query and latent (`Model::mla_query`, `mla_latent`), RoPE at the
        // cached positions; the query absorbs W_UK: [q̃_h ; RoPE(q_pe_h)] per head
        let (q_nope, q_pe, q_latent) = self.mla_query(tape, h, &w[..na - 1], (1, n), p0)?;
        let ad = AbsorbDims { n, h: nh, d_nope: dn, d_v: dv, rank: rkv };
        let q_abs = tape.mla_absorb(q_nope, wkv_b, ad, AbsorbSide::Query)?;
        let q_lat = tape.concat_cols(q_abs, q_pe)?; // [n, H, r_kv + d_r]
                                                    // the new latent rows [c_kv ; RoPE(k_pe)]
        let (c_kv, k_pe) = self.mla_latent(tape, h, wkv_a, (1, n), p0)?;
        let kv = tape.concat_cols(c_kv, k_pe)?;
        // the un-absorbed model's scale (the same dot products)
        let dims = LatentDims { t: n, h: nh, rank: rkv, rope: dr, scale: 1.0 / ((dn + dr) as f32).sqrt() };
        let o_lat = if c.attn_kind(l) == AttnKind::Sparse {
            let iw = &w[w.len() - c.n_indexer_params(l)..];
            let (qi, ki, wi) = self.indexer_qkw(tape, h, q_latent.unwrap_or(h), iw, (1, n), p0)?;
            let index = Some((qi, ki, wi, self.dsa_dims(1, n)));
            tape.latent_attention_cached(q_lat, kv, dims, index, self.dsa_dense_warmup, cache)?
        } else {
            tape.latent_attention_cached(q_lat, kv, dims, None, false, cache)?
        };
        let o = tape.mla_absorb(o_lat, wkv_b, ad, AbsorbSide::Output)?;
        tape.reshape(o, &[n, nh * dv])
    }
}
