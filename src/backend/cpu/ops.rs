//! [`Backend`] on the CPU: f32 `Vec`s and the `backend::cpu` kernels. The reference every
//! other backend is checked against; the tape over it computes bit for bit what the tape of
//! the previous design computed with the kernels called directly. Temporaries of the
//! gradient ops (a weight gradient before it is added into its f32 buffer) count as workspace.

use super::{
    attention::{attention_backward_dv, attention_forward_dv, AttnDims},
    decode::{self, CacheKind, LayerCache},
    dsa::{self, DsaDims},
    elementwise, embedding,
    gemm::{gemm, gemm_fused, gemm_swiglu_backward, Epilogue, Layout},
    loss,
    mla_decode::{self, AbsorbDims, AbsorbSide, LatentDims},
    moe::{self, MoeCache, RouterConfig, Routing},
    norm,
    optim::{adamw_update, newton_schulz, AdamWStep},
    rope::{qknorm_backward, qknorm_forward, rope_backward, rope_forward, RopeTable},
    swiglu,
    window_attention::{window_attention_backward_dv, window_attention_forward_dv, WindowDims},
};
use crate::backend::ops::{Backend, RopeKind, UpdateSlot};
use crate::memory::{Category, Tracked};
use crate::nn::ModelConfig;
use anyhow::{bail, Result};
use rayon::prelude::*;

#[derive(Clone)]
pub struct CpuOps {
    rope: RopeTable,
    /// The DSA indexer's table (`ModelConfig::index_rope_width`), as `Model`'s.
    index_rope: RopeTable,
    /// θ of both tables (`rope_at` computes angles past their length).
    rope_theta: f64,
}

impl CpuOps {
    /// RoPE tables of the given head dims (attention, indexer) for positions below `max_t`.
    pub fn with_tables(head_dim: usize, index_head_dim: usize, max_t: usize, theta: f64) -> CpuOps {
        CpuOps {
            rope: RopeTable::new(head_dim, max_t, theta),
            index_rope: RopeTable::new(index_head_dim, max_t, theta),
            rope_theta: theta,
        }
    }

    pub fn new(c: &ModelConfig) -> CpuOps {
        CpuOps {
            // the attention heads' rotary width (MLA: qk_rope_head_dim)
            rope: RopeTable::new(c.rope_dim(), c.max_seq_len, c.rope_theta),
            // the indexer's rotary width (v32: index_rope_dim of the d_I dims)
            index_rope: RopeTable::new(c.index_rope_width(), c.max_seq_len, c.rope_theta),
            rope_theta: c.rope_theta,
        }
    }
}

/// RoPE (or its backward) of x [b, t, h, ·] with `table`, into a new buffer.
fn rope_with(table: &RopeTable, x: &[f32], (b, t, h): (usize, usize, usize), inverse: bool) -> Vec<f32> {
    let f: fn(&RopeTable, &[f32], usize, usize, usize, &mut [f32]) = if inverse { rope_backward } else { rope_forward };
    let mut y = vec![0.0; x.len()];
    f(table, x, b, t, h, &mut y);
    y
}

impl Backend for CpuOps {
    type F = Vec<f32>;
    type A = Vec<f32>;
    type Ids = Vec<u32>;
    type Tgt = Vec<i32>;
    type Routing = Routing;
    type MoeCache = MoeCache;
    type Sel = Vec<u32>;

    const HOST_MEMORY: bool = true;

    fn account(&self, bufs: &[&Vec<f32>], cat: Category) -> Box<dyn std::any::Any> {
        Box::new(Tracked::floats(cat, bufs.iter().map(|b| b.len()).sum()))
    }

    fn f_from(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn f_from_vec(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }
    fn f_into_host(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }
    fn f_zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn f_to_host(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn f_fill_zero(&self, x: &mut Vec<f32>) -> Result<()> {
        x.fill(0.0);
        Ok(())
    }
    fn f_len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }
    fn f_scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        self.scale(x, s)
    }
    fn f_accumulate(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        self.add(acc, x)
    }
    fn a_from(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn a_to_host(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn a_zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn a_copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn a_len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }
    fn f_as_a<'a>(&self, x: &'a Vec<f32>) -> Option<&'a Vec<f32>> {
        Some(x)
    }
    fn a_as_f<'a>(&self, x: &'a Vec<f32>) -> Option<&'a Vec<f32>> {
        Some(x)
    }
    fn ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
    fn targets(&self, t: &[i32]) -> Result<Vec<i32>> {
        Ok(t.to_vec())
    }
    fn cast(&self, w: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        out.copy_from_slice(w);
        Ok(())
    }

    fn linear(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0; m * n];
        gemm(m, n, k, x, Layout::N, w, Layout::T, &mut y, false);
        Ok(y)
    }
    fn linear_residual(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        resid: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        // As the tape: the product, then the residual add (the same f32 sum).
        let mut out = vec![0.0; m * n];
        gemm_fused(m, n, k, x, w, Epilogue::Residual { resid, out: &mut out });
        Ok(out)
    }
    fn linear_swiglu(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        gate: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut u, mut act) = (vec![0.0; m * n], vec![0.0; m * n]);
        gemm_fused(m, n, k, x, w, Epilogue::SwiGlu { gate, act: &mut act, up: Some(&mut u) });
        Ok((u, act))
    }
    fn linear_dx(
        &self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if accumulate {
            // The tape adds each consumer's gradient separately; so does this.
            let _held = Tracked::floats(Category::Workspace, m * k);
            let mut t = vec![0.0; m * k];
            gemm(m, k, n, dy, Layout::N, w, Layout::N, &mut t, false);
            elementwise::accumulate(dx, &t);
        } else {
            gemm(m, k, n, dy, Layout::N, w, Layout::N, dx, false);
        }
        Ok(())
    }
    fn linear_dx_swiglu(
        &self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        (g, u): (&Vec<f32>, &Vec<f32>),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        gemm_swiglu_backward(m, k, n, dy, w, (g, u), (&mut dg, &mut du));
        Ok((dg, du))
    }
    fn linear_dw(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        let _held = Tracked::floats(Category::Workspace, n * k);
        let mut t = vec![0.0; n * k];
        gemm(n, k, m, dy, Layout::T, x, Layout::N, &mut t, false);
        elementwise::accumulate(dw, &t);
        Ok(())
    }

    fn embedding(&self, table: &Vec<f32>, dim: usize, ids: &Vec<u32>, n: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0; n * dim];
        embedding::embedding_forward(table, dim, ids, &mut y);
        Ok(y)
    }
    fn embedding_backward(&self, dout: &Vec<f32>, dim: usize, ids: &Vec<u32>, dtable: &mut Vec<f32>) -> Result<()> {
        let _held = Tracked::floats(Category::Workspace, dtable.len());
        let mut t = vec![0.0; dtable.len()];
        embedding::embedding_backward(dout, dim, ids, &mut t);
        elementwise::accumulate(dtable, &t);
        Ok(())
    }
    fn rmsnorm(&self, x: &Vec<f32>, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; x.len() / dim]);
        norm::rmsnorm_forward(x, dim, &mut y, &mut rstd);
        Ok((y, rstd))
    }
    fn rmsnorm_backward(&self, x: &Vec<f32>, rstd: &Vec<f32>, dy: &Vec<f32>, dim: usize) -> Result<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        norm::rmsnorm_backward(x, rstd, dy, dim, &mut dx);
        Ok(dx)
    }
    fn layernorm(&self, x: &Vec<f32>, gamma: &Vec<f32>, beta: &Vec<f32>, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut stats) = (vec![0.0; x.len()], vec![0.0; 2 * (x.len() / dim)]);
        norm::layernorm_forward(x, gamma, beta, dim, &mut y, &mut stats);
        Ok((y, stats))
    }
    fn layernorm_backward(
        &self,
        x: &Vec<f32>,
        stats: &Vec<f32>,
        gamma: &Vec<f32>,
        dy: &Vec<f32>,
        dim: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok(norm::layernorm_backward(x, stats, gamma, dy, dim))
    }
    fn rope(&self, x: &Vec<f32>, bth: (usize, usize, usize), kind: RopeKind, inverse: bool) -> Result<Vec<f32>> {
        let table = match kind {
            RopeKind::Attention => &self.rope,
            RopeKind::Indexer => &self.index_rope,
        };
        Ok(rope_with(table, x, bth, inverse))
    }
    fn qk_norm_rope(&self, x: &Vec<f32>, bth: (usize, usize, usize)) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; bth.0 * bth.1 * bth.2]);
        qknorm_forward(&self.rope, x, bth, &mut y, &mut rstd);
        Ok((y, rstd))
    }
    fn qk_norm_rope_backward(
        &self,
        x: &Vec<f32>,
        rstd: &Vec<f32>,
        dy: &Vec<f32>,
        bth: (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        qknorm_backward(&self.rope, x, rstd, dy, bth, &mut dx);
        Ok(dx)
    }
    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = vec![0.0; g.len()];
        swiglu::swiglu_forward(g, u, &mut y);
        Ok(y)
    }
    fn swiglu_backward(&self, g: &Vec<f32>, u: &Vec<f32>, dy: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        swiglu::swiglu_backward(g, u, dy, &mut dg, &mut du);
        Ok((dg, du))
    }
    fn attention(
        &self,
        dims: &AttnDims,
        dv: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut out, mut lse) = (vec![0.0; dims.out_len(dv)], vec![0.0; dims.lse_len()]);
        attention_forward_dv(dims, dv, q, k, v, &mut out, &mut lse);
        Ok((out, lse))
    }
    fn attention_backward(
        &self,
        dims: &AttnDims,
        dv_width: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward_dv(dims, dv_width, [q, k, v, out, lse], dout, [&mut dq, &mut dk, &mut dv]);
        Ok((dq, dk, dv))
    }
    fn window_attention(
        &self,
        dims: &WindowDims,
        dv: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut out, mut lse) = (vec![0.0; dims.q_len() / dims.d * dv], vec![0.0; dims.lse_len()]);
        window_attention_forward_dv(dims, dv, q, k, v, &mut out, &mut lse);
        Ok((out, lse))
    }
    fn window_attention_backward(
        &self,
        dims: &WindowDims,
        dv_width: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        window_attention_backward_dv(dims, dv_width, [q, k, v, out, lse], dout, [&mut dq, &mut dk, &mut dv]);
        Ok((dq, dk, dv))
    }

    fn router_logits(&self, x: &Vec<f32>, w: &Vec<f32>, n: usize, c: usize, e: usize) -> Result<Vec<f32>> {
        self.linear(x, w, n, c, e)
    }
    fn route(&self, logits: &Vec<f32>, bias: &[f32], cfg: &RouterConfig) -> Result<Routing> {
        Ok(moe::route(logits, bias, cfg))
    }
    fn routing_counts(&self, r: &Routing) -> Result<(Vec<usize>, usize)> {
        Ok((r.counts.clone(), r.dropped))
    }
    fn balance_loss(
        &self,
        r: &Routing,
        n_seqs: usize,
        seq_len: usize,
        cfg: &RouterConfig,
        alpha: f32,
        seed: f32,
    ) -> Result<(f32, Vec<f32>)> {
        let (loss, mut ds) = moe::balance_loss(&r.scores, &r.experts, n_seqs, seq_len, cfg, alpha);
        ds.iter_mut().for_each(|d| *d *= seed);
        Ok((loss, ds))
    }
    fn moe_forward(
        &self,
        x: &Vec<f32>,
        (n, c, f): (usize, usize, usize),
        r: &Routing,
        [wg, wu, wd]: [&Vec<f32>; 3],
    ) -> Result<(Vec<f32>, MoeCache)> {
        let (mut out, mut cache) = (vec![0.0; n * c], MoeCache::default());
        moe::moe_forward(x, n, c, r, wg, wu, wd, f, &mut out, &mut cache);
        Ok((out, cache))
    }
    fn moe_cache_bytes(&self, c: &MoeCache) -> usize {
        4 * (c.xg.len() + c.hg.len() + c.hu.len() + c.act.len() + c.y.len())
    }
    fn moe_backward(
        &self,
        dout: &Vec<f32>,
        (n, c, f): (usize, usize, usize),
        r: &Routing,
        [wg, wu, wd]: [&Vec<f32>; 3],
        cache: &MoeCache,
        dw: [&mut Vec<f32>; 3],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut dx = vec![0.0; n * c];
        let _held = Tracked::floats(Category::Workspace, wg.len() + wu.len() + wd.len());
        let mut t = [vec![0.0; wg.len()], vec![0.0; wu.len()], vec![0.0; wd.len()]];
        let mut d_gates = vec![0.0; n * r.top_k];
        let [tg, tu, td] = &mut t;
        moe::moe_backward(dout, n, c, r, wg, wu, wd, f, cache, &mut dx, tg, tu, td, &mut d_gates);
        for (acc, tmp) in dw.into_iter().zip(&t) {
            elementwise::accumulate(acc, tmp);
        }
        Ok((dx, d_gates))
    }
    fn router_backward(
        &self,
        r: &Routing,
        d_gates: Option<&Vec<f32>>,
        d_scores: Option<&Vec<f32>>,
        cfg: &RouterConfig,
    ) -> Result<Vec<f32>> {
        let mut d_logits = vec![0.0; r.n_tokens * cfg.n_experts];
        let zero;
        let d_gates = match d_gates {
            Some(d) => d,
            None => {
                zero = vec![0.0; r.n_tokens * cfg.top_k];
                &zero
            }
        };
        moe::router_backward(r, d_gates, d_scores.map(|v| v.as_slice()), cfg, &mut d_logits);
        Ok(d_logits)
    }

    fn copy_cols(
        &self,
        src: &Vec<f32>,
        src_cols_off: (usize, usize),
        dst: &mut Vec<f32>,
        dst_cols_off: (usize, usize),
        rows: usize,
        width: usize,
    ) -> Result<()> {
        elementwise::copy_cols(src, src_cols_off, dst, dst_cols_off, rows, width);
        Ok(())
    }
    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        x.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn indexer_topk(&self, dims: &DsaDims, qi: &Vec<f32>, ki: &Vec<f32>, wi: &Vec<f32>) -> Result<Vec<u32>> {
        let mut sel = vec![0u32; dims.sel_len()];
        dsa::indexer_topk(dims, qi, ki, wi, &mut sel);
        Ok(sel)
    }
    fn dsa_attention(
        &self,
        dims: &DsaDims,
        dv: usize,
        (q, k, v): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        sel: &Vec<u32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut out, mut lse) = (vec![0.0; dims.attn().out_len(dv)], vec![0.0; dims.lse_len()]);
        dsa::dsa_attention_forward_dv(dims, dv, [q, k, v], sel, &mut out, &mut lse);
        Ok((out, lse))
    }
    fn dsa_attention_backward(
        &self,
        dims: &DsaDims,
        dv_width: usize,
        (q, k, v): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        sel: &Vec<u32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let grads = [&mut dq[..], &mut dk[..], &mut dv[..]];
        dsa::dsa_attention_backward_dv(dims, dv_width, [q, k, v, out, lse], sel, dout, grads);
        Ok((dq, dk, dv))
    }
    fn indexer_kl(
        &self,
        dims: &DsaDims,
        q: &Vec<f32>,
        k: &Vec<f32>,
        lse: &Vec<f32>,
        (qi, ki, wi): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        sel: Option<&Vec<u32>>,
    ) -> Result<(f32, Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dqi, mut dki, mut dwi) = (vec![0.0; qi.len()], vec![0.0; ki.len()], vec![0.0; wi.len()]);
        let sel = sel.map(|s| s.as_slice());
        let loss = dsa::indexer_kl(dims, q, k, lse, qi, ki, wi, sel, &mut dqi, &mut dki, &mut dwi);
        Ok((loss, dqi, dki, dwi))
    }

    fn rope_at(&self, x: &Vec<f32>, (_, h): (usize, usize), p0: usize, kind: RopeKind) -> Result<Vec<f32>> {
        let table = match kind {
            RopeKind::Attention => &self.rope,
            RopeKind::Indexer => &self.index_rope,
        };
        Ok(decode::rope_at(table, x, h, p0, self.rope_theta))
    }
    fn attention_cached(
        &self,
        dims: &AttnDims,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cache: &mut LayerCache,
    ) -> Result<Vec<f32>> {
        if matches!(cache.kind(), CacheKind::Sparse { .. }) {
            bail!("attention_cached: a DSA layer's cache is filled by dsa_attention_cached");
        }
        if cache.latent_rank().is_some() {
            bail!("attention_cached: a latent (MLA) cache is filled by latent_attention_cached");
        }
        Ok(decode::attention_cached(dims, q, k, v, cache))
    }
    fn dsa_attention_cached(
        &self,
        dims: &DsaDims,
        (q, k, v): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        (qi, ki, wi): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Vec<f32>> {
        if !matches!(cache.kind(), CacheKind::Sparse { .. }) || cache.latent_rank().is_some() {
            bail!("dsa_attention_cached: the layer's cache is not a (key/value) DSA cache");
        }
        Ok(decode::dsa_attention_cached(dims, (q, k, v), (qi, ki, wi), dense, cache))
    }
    fn mla_absorb(&self, dims: &AbsorbDims, side: AbsorbSide, x: &Vec<f32>, wkv_b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(mla_decode::absorb(dims, side, x, wkv_b))
    }
    fn latent_attention_cached(
        &self,
        dims: &LatentDims,
        q: &Vec<f32>,
        kv: &Vec<f32>,
        index: Option<(&DsaDims, (&Vec<f32>, &Vec<f32>, &Vec<f32>))>,
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Vec<f32>> {
        if cache.latent_rank() != Some(dims.rank) || cache.row_width() != dims.rank + dims.rope {
            bail!("latent_attention_cached: the layer's cache is not a latent cache of rank {}", dims.rank);
        }
        let sparse = matches!(cache.kind(), CacheKind::Sparse { .. });
        if sparse != index.is_some() {
            bail!("latent_attention_cached: a DSA layer's cache needs the indexer, other layers take none");
        }
        let index = index.map(|(d, (qi, ki, wi))| (d, (qi.as_slice(), ki.as_slice(), wi.as_slice())));
        Ok(mla_decode::latent_attention_cached(dims, q, kv, index, dense, cache))
    }

    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        elementwise::accumulate(acc, x);
        Ok(())
    }
    fn cross_entropy(&self, logits: &Vec<f32>, vocab: usize, tgt: &Vec<i32>, cap: f32) -> Result<(f64, Vec<f32>)> {
        let (mut losses, mut lse) = (vec![0.0; tgt.len()], vec![0.0; tgt.len()]);
        loss::softcap_cross_entropy_forward(logits, vocab, tgt, cap, &mut losses, &mut lse);
        Ok((losses.iter().map(|&l| l as f64).sum(), lse))
    }
    fn cross_entropy_backward(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        tgt: &Vec<i32>,
        cap: f32,
        lse: &Vec<f32>,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let mut dz = vec![0.0; logits.len()];
        loss::softcap_cross_entropy_backward(logits, vocab, tgt, cap, lse, scale, &mut dz);
        Ok(dz)
    }

    fn clip_grad_norm(&self, grads: &mut [Vec<f32>], max_norm: f32) -> Result<f32> {
        let norm = grads.iter().map(|g| elementwise::sum_sq(g)).sum::<f64>().sqrt() as f32;
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            for g in grads.iter_mut() {
                elementwise::scale(g, s);
            }
        }
        Ok(norm)
    }
    fn adamw(
        &self,
        p: &mut Vec<f32>,
        pa: Option<&mut Vec<f32>>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: AdamWStep,
    ) -> Result<()> {
        adamw_update(p, g, m, v, h);
        if let Some(pa) = pa {
            pa.copy_from_slice(p);
        }
        Ok(())
    }
    fn muon_momentum(&self, buf: &mut Vec<f32>, g: &Vec<f32>, mu: f32) -> Result<Vec<f32>> {
        let mut u = vec![0.0f32; g.len()];
        for ((b, &gi), ui) in buf.iter_mut().zip(g).zip(u.iter_mut()) {
            *b = mu * *b + (1.0 - mu) * gi;
            *ui = (1.0 - mu) * gi + mu * *b;
        }
        Ok(u)
    }
    fn newton_schulz(&self, u: &Vec<f32>, rows: usize, cols: usize, steps: usize) -> Result<Vec<f32>> {
        Ok(newton_schulz(u, rows, cols, steps))
    }
    fn newton_schulz_stack(
        &self,
        u: &Vec<f32>,
        n_mat: usize,
        rows: usize,
        cols: usize,
        steps: usize,
    ) -> Result<Vec<f32>> {
        debug_assert_eq!(u.len(), n_mat * rows * cols);
        Ok(u.chunks_exact(rows * cols).flat_map(|m| newton_schulz(m, rows, cols, steps)).collect())
    }
    fn muon_apply(&self, w: &mut Vec<f32>, wa: Option<&mut Vec<f32>>, o: &Vec<f32>, decay: f32, lr: f32) -> Result<()> {
        for (wi, oi) in w.iter_mut().zip(o) {
            *wi = *wi * decay - lr * oi;
        }
        if let Some(wa) = wa {
            wa.copy_from_slice(w);
        }
        Ok(())
    }
    /// One rayon task per parameter (each one's GEMMs then stay on its thread); the result does
    /// not depend on scheduling.
    fn for_each_update(
        &self,
        slots: Vec<UpdateSlot<'_, Self>>,
        update: &(dyn Fn(&Self, UpdateSlot<'_, Self>) -> Result<()> + Sync),
    ) -> Result<()> {
        slots.into_par_iter().try_for_each(|s| update(self, s))
    }
}
