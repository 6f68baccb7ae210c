//! [`Backend`] on CUDA through the launch wrappers of `backend::cuda`: f32 master weights,
//! gradients (accumulated by the weight-gradient GEMMs with β = 1) and optimizer state; bf16
//! activations, bf16 weight copies (refreshed by the AdamW and Muon kernels) and bf16 GEMM
//! operands with fp32 accumulation; f32 rstd, lse, router logits and reductions. Muon's
//! Newton–Schulz runs as bf16 GEMMs (see [`CudaOps::newton_schulz`]).
//!
//! Window (`W`) layers run `window_attention.cu`; DSA (`S`) layers the indexer GEMMs, RoPE,
//! `dsa.cu`'s exact top-k, gathered-KV attention and sparse KL (its f32 gradients cast to bf16
//! for the weight-gradient GEMMs); MoE layers an f32 router GEMM, `moe.cu`'s routing, dispatch,
//! grouped expert GEMMs, combine and router backward.
//!
//! Done on the host, from small tensors: the sequence-wise balance loss and its score gradient
//! (`cpu::moe::balance_loss` on the downloaded scores `[n, E]` and experts `[n, K]`, α > 0 only,
//! and its scaling by the backward's seed, [`Backend::f_scale`]), the expert counts (E values per
//! layer and micro-batch) and the auxiliary-loss-free bias update (E floats per layer, uploaded
//! to each routing), and Muon's per-expert split of an expert stack (`newton_schulz_stack`: the
//! stack goes to the host and each expert matrix back for its Newton–Schulz; correct, but a
//! transfer per stack per step). The experts' weight gradients (f32, overwritten by
//! `moe_backward`) and every other activation-precision gradient of an f32 leaf are added into
//! the f32 gradients through a bf16 copy (`muon_apply` with decay 1 and lr −1), a bf16 rounding
//! of that micro-batch's contribution. During the DSA dense warm-up the S layers run the dense
//! attention and `dsa.cu`'s dense indexer KL (every earlier key, the dense attention's lse).
//!
//! Shape rules of the kernels ([`check_cuda_shapes`], checked once by [`CudaOps::new`]):
//! GQA: head_dim 64 or 128, n_embd, q_dim, kv_dim, ffn_hidden and vocab_size multiples of 8;
//! MLA: the head shape (d_qk, d_v) one of `attention::FLASH_SHAPES` ((96, 64) and (192, 128) are
//! MLA's head_dim 64 and 128 under `derive_mla_dims`), qk_rope_head_dim a multiple of 16, and
//! n_embd, the projections' widths, kv_lora_rank (+ qk_rope_head_dim), q_lora_rank (when > 0),
//! ffn_hidden and vocab_size multiples of 8; MoE:
//! n_routed_experts and moe_inter_dim multiples of 8; DSA: index_n_heads a multiple of 8 and
//! index_head_dim of 16; and, per batch, b·t a multiple of 8 (the GEMMs' contiguous dimensions).

use super::gemm::{gemm, gemm_fused, gemm_swiglu_backward, Epilogue, Layout};
use super::moe::{DeviceRouting, MoeCacheGpu};
use super::rope::RopeTableGpu;
use super::{
    attention, dsa, elementwise, embedding, loss, moe, norm, optim, rope, swiglu, window_attention, CudaBackend,
    DeviceBuffer,
};
use crate::backend::ops::{Backend, RopeKind};
use crate::backend::{
    AbsorbDims, AbsorbSide, AdamWStep, AttnDims, DsaDims, LatentDims, LayerCache, RouterConfig, WindowDims,
};
use crate::memory::Category;
use crate::nn::config::AttnKind;
use crate::nn::ModelConfig;
use anyhow::{bail, Result};
use half::bf16;

type F = DeviceBuffer<f32>;
type A = DeviceBuffer<bf16>;

/// Quintic Newton–Schulz coefficients (the CPU twin's).
const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// The shape rules of the CUDA kernels (module doc).
pub fn check_cuda_shapes(c: &ModelConfig) -> Result<()> {
    let mut widths = if c.is_mla() {
        let (_, dqk, dv) = c.attn_heads();
        if !attention::FLASH_SHAPES.contains(&(dqk, dv)) {
            bail!(
                "CUDA training of MLA needs its head shape (d_qk = qk_nope_head_dim + qk_rope_head_dim, \
                 d_v = v_head_dim) to be one the attention kernels are built for, {:?}; got ({dqk}, {dv}) \
                 (train it on the CPU with --device cpu)",
                attention::FLASH_SHAPES
            );
        }
        if c.qk_rope_head_dim % 16 != 0 {
            bail!("CUDA training needs qk_rope_head_dim to be a multiple of 16 (RoPE), got {}", c.qk_rope_head_dim);
        }
        let (h, rq) = (c.n_head, c.q_lora_rank);
        let mut w = vec![
            ("n_embd", c.n_embd),
            ("n_head·(d_qk)", h * dqk),
            ("n_head·(qk_nope_head_dim + v_head_dim)", h * (c.qk_nope_head_dim + dv)),
            ("n_head·v_head_dim", h * dv),
            ("kv_lora_rank", c.kv_lora_rank),
            ("kv_lora_rank + qk_rope_head_dim", c.kv_lora_rank + c.qk_rope_head_dim),
            ("ffn_hidden", c.ffn_hidden),
            ("vocab_size", c.vocab_size),
        ];
        if rq > 0 {
            w.push(("q_lora_rank", rq));
        }
        w
    } else {
        if c.head_dim != 64 && c.head_dim != 128 {
            bail!("CUDA training needs head_dim 64 or 128 (the attention kernels), got {}", c.head_dim);
        }
        vec![
            ("n_embd", c.n_embd),
            ("n_head·head_dim", c.q_dim()),
            ("n_kv_head·head_dim", c.kv_dim()),
            ("ffn_hidden", c.ffn_hidden),
            ("vocab_size", c.vocab_size),
        ]
    };
    let moe = (0..c.n_layer).any(|l| c.is_moe_layer(l));
    let dsa = (0..c.n_layer).any(|l| c.attn_kind(l) == AttnKind::Sparse);
    if moe {
        widths.push(("moe.n_routed_experts (the router GEMMs)", c.moe.n_routed_experts));
        widths.push(("moe.moe_inter_dim", c.moe.moe_inter_dim));
    }
    if dsa {
        widths.push(("index_n_heads (the indexer GEMMs)", c.index_n_heads));
    }
    for (what, v) in widths {
        if v % 8 != 0 {
            bail!("CUDA training needs {what} to be a multiple of 8, got {v}");
        }
    }
    if dsa && c.index_head_dim % 16 != 0 {
        bail!("CUDA training needs index_head_dim to be a multiple of 16 (RoPE), got {}", c.index_head_dim);
    }
    if dsa && c.index_rope_width() % 16 != 0 {
        bail!("CUDA training needs index_rope_dim to be a multiple of 16 (RoPE), got {}", c.index_rope_width());
    }
    Ok(())
}

pub struct CudaOps {
    pub be: CudaBackend,
    rope: RopeTableGpu,
    /// The DSA indexer's RoPE table (`ModelConfig::index_rope_width`), when the model has DSA layers.
    index_rope: Option<RopeTableGpu>,
}

impl CudaOps {
    /// Checks the model's shapes against the kernels' rules and builds the RoPE tables.
    pub fn new(be: CudaBackend, c: &ModelConfig) -> Result<CudaOps> {
        check_cuda_shapes(c)?;
        // MLA rotates only its decoupled part (qk_rope_head_dim columns of each head)
        let rope = RopeTableGpu::new(&be, c.rope_dim(), c.max_seq_len, c.rope_theta)?;
        let index_rope = if (0..c.n_layer).any(|l| c.attn_kind(l) == AttnKind::Sparse) {
            Some(RopeTableGpu::new(&be, c.index_rope_width(), c.max_seq_len, c.rope_theta)?)
        } else {
            None
        };
        Ok(CudaOps { be, rope, index_rope })
    }

    /// bf16 copy of an f32 buffer.
    fn to_bf16(&self, x: &F) -> Result<A> {
        let y = self.uninit(x.len())?;
        optim::cast_f32_bf16(&self.be, x, &y)?;
        Ok(y)
    }

    fn uninit<T: crate::backend::cuda::memory::DeviceElem>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        Ok(DeviceBuffer::uninit(&self.be, n)?)
    }
}

impl Backend for CudaOps {
    type F = F;
    type A = A;
    type Ids = DeviceBuffer<u32>;
    /// The targets on the device, and on the host (to sum only the rows that count).
    type Tgt = (DeviceBuffer<i32>, Vec<i32>);
    type Routing = DeviceRouting;
    type MoeCache = MoeCacheGpu;
    type Sel = DeviceBuffer<u32>;

    const HOST_MEMORY: bool = false;

    fn memory_scope(&self, cat: Category) -> Box<dyn std::any::Any> {
        Box::new(self.be.scoped(cat))
    }
    fn device_name(&self) -> Option<String> {
        Some(self.be.name().to_string())
    }
    fn reset_peak(&self) {
        self.be.reset_peak();
    }
    fn device_peak(&self) -> Option<(usize, [usize; 5])> {
        let m = self.be.memory_by_category();
        Some((m.report.peak_total, m.at_peak))
    }
    /// Every buffer allocated so far under the default category (workspace) that is not a
    /// gradient or optimizer state (the trainer attributes those) is a parameter: the f32 master
    /// weights, their bf16 copies, the RoPE tables.
    fn prepare_training(&self, predicted: usize, what: &str) -> Result<()> {
        self.be.recategorize(Category::Workspace, Category::Parameters);
        Ok(super::check_fits(&self.be, predicted, what)?)
    }
    fn account(&self, bufs: &[&F], cat: Category) -> Box<dyn std::any::Any> {
        for b in bufs {
            b.set_category(cat);
        }
        Box::new(())
    }

    fn f_from(&self, v: &[f32]) -> Result<F> {
        Ok(DeviceBuffer::from_host(&self.be, v)?)
    }
    fn f_zeros(&self, n: usize) -> Result<F> {
        Ok(DeviceBuffer::zeros(&self.be, n)?)
    }
    fn f_to_host(&self, x: &F) -> Result<Vec<f32>> {
        Ok(x.to_host()?)
    }
    fn f_fill_zero(&self, x: &mut F) -> Result<()> {
        Ok(x.fill_zero()?)
    }
    fn f_len(&self, x: &F) -> usize {
        x.len()
    }
    /// On the host: only the balance loss's score gradient ([n, E]) is scaled this way.
    fn f_scale(&self, x: &mut F, s: f32) -> Result<()> {
        let v: Vec<f32> = x.to_host()?.into_iter().map(|v| v * s).collect();
        *x = DeviceBuffer::from_host(&self.be, &v)?;
        Ok(())
    }
    /// acc ← acc·1 − (−1)·x with `optim::muon_apply` (f32 accumulation of a bf16 value).
    fn f_accumulate(&self, acc: &mut F, x: &A) -> Result<()> {
        Ok(optim::muon_apply(&self.be, acc, x, None, 1.0, -1.0)?)
    }
    fn a_from(&self, v: &[f32]) -> Result<A> {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(DeviceBuffer::from_host(&self.be, &h)?)
    }
    fn a_to_host(&self, x: &A) -> Result<Vec<f32>> {
        Ok(x.to_host()?.into_iter().map(f32::from).collect())
    }
    fn a_zeros(&self, n: usize) -> Result<A> {
        Ok(DeviceBuffer::zeros(&self.be, n)?)
    }
    fn a_copy(&self, x: &A) -> Result<A> {
        let y = self.uninit(x.len())?;
        elementwise::axpby(&self.be, 1.0, x, 0.0, None, &y)?;
        Ok(y)
    }
    fn a_len(&self, x: &A) -> usize {
        x.len()
    }
    fn ids(&self, ids: &[u32]) -> Result<DeviceBuffer<u32>> {
        if ids.len() % 8 != 0 {
            bail!("CUDA training needs batch·seq_len = {} to be a multiple of 8", ids.len());
        }
        Ok(DeviceBuffer::from_host(&self.be, ids)?)
    }
    fn targets(&self, t: &[i32]) -> Result<Self::Tgt> {
        Ok((DeviceBuffer::from_host(&self.be, t)?, t.to_vec()))
    }
    fn cast(&self, w: &F, out: &mut A) -> Result<()> {
        Ok(optim::cast_f32_bf16(&self.be, w, out)?)
    }

    fn linear(&self, x: &A, w: &A, m: usize, k: usize, n: usize) -> Result<A> {
        let y = self.uninit(m * n)?;
        gemm(&self.be, m, n, k, x, Layout::N, w, Layout::T, &y, 1.0, 0.0)?;
        Ok(y)
    }
    fn linear_residual(&self, x: &A, w: &A, (m, k, n): (usize, usize, usize), resid: &A) -> Result<A> {
        let out = self.uninit(m * n)?;
        gemm_fused(&self.be, m, n, k, x, w, Epilogue::Residual { resid, out: &out })?;
        Ok(out)
    }
    fn linear_swiglu(&self, x: &A, w: &A, (m, k, n): (usize, usize, usize), gate: &A) -> Result<(A, A)> {
        let (up, act) = (self.uninit(m * n)?, self.uninit(m * n)?);
        gemm_fused(&self.be, m, n, k, x, w, Epilogue::SwiGlu { gate, act: &act, up: Some(&up) })?;
        Ok((up, act))
    }
    fn linear_dx(&self, dy: &A, w: &A, (m, k, n): (usize, usize, usize), dx: &mut A, accumulate: bool) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        Ok(gemm(&self.be, m, k, n, dy, Layout::N, w, Layout::N, dx, 1.0, beta)?)
    }
    fn linear_dx_swiglu(&self, dy: &A, w: &A, (m, k, n): (usize, usize, usize), (g, u): (&A, &A)) -> Result<(A, A)> {
        let (dg, du) = (self.uninit(g.len())?, self.uninit(g.len())?);
        gemm_swiglu_backward(&self.be, m, k, n, dy, w, (g, u), (&dg, &du))?;
        Ok((dg, du))
    }
    fn linear_dw(&self, dy: &A, x: &A, (m, k, n): (usize, usize, usize), dw: &mut F) -> Result<()> {
        // dW[n,k] += dYᵀ X: A operand dY stored [m, n] (T), B operand X stored [m, k] (N), f32 C.
        Ok(gemm(&self.be, n, k, m, dy, Layout::T, x, Layout::N, dw, 1.0, 1.0)?)
    }

    fn embedding(&self, table: &F, dim: usize, ids: &DeviceBuffer<u32>, n: usize) -> Result<A> {
        let out = self.uninit(n * dim)?;
        embedding::embedding_forward(&self.be, table, dim, ids, &out)?;
        Ok(out)
    }
    fn embedding_backward(&self, dout: &A, dim: usize, ids: &DeviceBuffer<u32>, dtable: &mut F) -> Result<()> {
        Ok(embedding::embedding_backward(&self.be, dout, dim, ids, dtable)?)
    }
    fn rmsnorm(&self, x: &A, dim: usize) -> Result<(A, F)> {
        let (y, rstd) = (self.uninit(x.len())?, self.uninit(x.len() / dim)?);
        norm::rmsnorm_forward(&self.be, x, dim, &y, &rstd)?;
        Ok((y, rstd))
    }
    fn rmsnorm_backward(&self, x: &A, rstd: &F, dy: &A, dim: usize) -> Result<A> {
        let dx = self.uninit(x.len())?;
        norm::rmsnorm_backward(&self.be, x, rstd, dy, dim, &dx)?;
        Ok(dx)
    }
    fn layernorm(&self, x: &A, gamma: &A, beta: &A, dim: usize) -> Result<(A, F)> {
        let (y, stats) = (self.uninit(x.len())?, self.uninit(2 * (x.len() / dim.max(1)))?);
        norm::layernorm_forward(&self.be, x, (gamma, beta), dim, &y, &stats)?;
        Ok((y, stats))
    }
    fn layernorm_backward(&self, x: &A, stats: &F, gamma: &A, dy: &A, dim: usize) -> Result<(A, A, A)> {
        let (dx, dg, db) = (self.uninit(x.len())?, self.uninit(dim)?, self.uninit(dim)?);
        norm::layernorm_backward(&self.be, (x, stats, gamma, dy), dim, &dx, (&dg, &db))?;
        Ok((dx, dg, db))
    }
    fn rope(&self, x: &A, (b, t, h): (usize, usize, usize), kind: RopeKind, inverse: bool) -> Result<A> {
        let table = match kind {
            RopeKind::Attention => &self.rope,
            RopeKind::Indexer => match &self.index_rope {
                Some(table) => table,
                None => bail!("rope: the model has no DSA layers (no indexer table)"),
            },
        };
        let y = self.uninit(x.len())?;
        rope::rope_one(&self.be, table, x, &y, (b, t, h), inverse)?;
        Ok(y)
    }
    fn qk_norm_rope(&self, x: &A, (b, t, h): (usize, usize, usize)) -> Result<(A, F)> {
        let (y, rstd) = (self.uninit(x.len())?, self.uninit(b * t * h)?);
        rope::rope_qknorm_one_forward(&self.be, &self.rope, x, (b, t, h), &y, &rstd)?;
        Ok((y, rstd))
    }
    fn qk_norm_rope_backward(&self, x: &A, rstd: &F, dy: &A, bth: (usize, usize, usize)) -> Result<A> {
        let dx = self.uninit(x.len())?;
        rope::rope_qknorm_one_backward(&self.be, &self.rope, x, rstd, dy, bth, &dx)?;
        Ok(dx)
    }
    fn swiglu(&self, g: &A, u: &A) -> Result<A> {
        let y = self.uninit(g.len())?;
        swiglu::swiglu_forward(&self.be, g, u, &y)?;
        Ok(y)
    }
    fn swiglu_backward(&self, g: &A, u: &A, dy: &A) -> Result<(A, A)> {
        let (dg, du) = (self.uninit(g.len())?, self.uninit(g.len())?);
        swiglu::swiglu_backward(&self.be, g, u, dy, &dg, &du)?;
        Ok((dg, du))
    }
    fn attention(&self, dims: &AttnDims, dv: usize, q: &A, k: &A, v: &A) -> Result<(A, F)> {
        let (out, lse) = (self.uninit(dims.q_len() / dims.d * dv)?, self.uninit(dims.lse_len())?);
        attention::attention_forward_dv(&self.be, dims, dv, q, k, v, &out, &lse)?;
        Ok((out, lse))
    }
    fn attention_backward(
        &self,
        dims: &AttnDims,
        dv: usize,
        q: &A,
        k: &A,
        v: &A,
        out: &A,
        lse: &F,
        dout: &A,
    ) -> Result<(A, A, A)> {
        let (ql, kl, vl) = (dims.q_len(), dims.kv_len(), dims.kv_len() / dims.d * dv);
        let (dq, dk, dvg): (F, F, F) = (self.uninit(ql)?, self.uninit(kl)?, self.uninit(vl)?);
        attention::attention_backward_dv(&self.be, dims, dv, q, k, v, out, lse, dout, [&dq, &dk, &dvg])?;
        Ok((self.to_bf16(&dq)?, self.to_bf16(&dk)?, self.to_bf16(&dvg)?))
    }
    fn window_attention(&self, dims: &WindowDims, dv: usize, q: &A, k: &A, v: &A) -> Result<(A, F)> {
        let (out, lse) = (self.uninit(dims.q_len() / dims.d * dv)?, self.uninit(dims.lse_len())?);
        window_attention::window_attention_forward_dv(&self.be, dims, dv, q, k, v, &out, &lse)?;
        Ok((out, lse))
    }
    fn window_attention_backward(
        &self,
        dims: &WindowDims,
        dv: usize,
        q: &A,
        k: &A,
        v: &A,
        out: &A,
        lse: &F,
        dout: &A,
    ) -> Result<(A, A, A)> {
        let (ql, kl, vl) = (dims.q_len(), dims.kv_len(), dims.kv_len() / dims.d * dv);
        let (dq, dk, dvg): (F, F, F) = (self.uninit(ql)?, self.uninit(kl)?, self.uninit(vl)?);
        window_attention::window_attention_backward_dv(&self.be, dims, dv, q, k, v, out, lse, dout, [&dq, &dk, &dvg])?;
        Ok((self.to_bf16(&dq)?, self.to_bf16(&dk)?, self.to_bf16(&dvg)?))
    }

    fn router_logits(&self, x: &A, w: &A, n: usize, c: usize, e: usize) -> Result<F> {
        let y: F = self.uninit(n * e)?;
        gemm(&self.be, n, e, c, x, Layout::N, w, Layout::T, &y, 1.0, 0.0)?;
        Ok(y)
    }
    fn route(&self, logits: &F, bias: &[f32], cfg: &RouterConfig) -> Result<DeviceRouting> {
        let bias = DeviceBuffer::from_host(&self.be, bias)?;
        Ok(moe::route(&self.be, logits, &bias, cfg)?)
    }
    fn routing_counts(&self, r: &DeviceRouting) -> Result<(Vec<usize>, usize)> {
        let counts: Vec<usize> = r.counts.to_host()?.into_iter().map(|c| c as usize).collect();
        let kept: usize = counts.iter().sum();
        Ok((counts, r.max_rows() - kept))
    }
    /// On the host: the scores and experts come down, `cpu::moe::balance_loss` runs, and
    /// seed·∂/∂scores goes up (n·E floats).
    fn balance_loss(
        &self,
        r: &DeviceRouting,
        n_seqs: usize,
        seq_len: usize,
        cfg: &RouterConfig,
        alpha: f32,
        seed: f32,
    ) -> Result<(f32, F)> {
        let (scores, experts) = (r.scores.to_host()?, r.experts.to_host()?);
        let (loss, mut ds) = crate::backend::cpu::moe::balance_loss(&scores, &experts, n_seqs, seq_len, cfg, alpha);
        ds.iter_mut().for_each(|d| *d *= seed);
        Ok((loss, DeviceBuffer::from_host(&self.be, &ds)?))
    }
    fn moe_forward(
        &self,
        x: &A,
        (n, c, f): (usize, usize, usize),
        r: &DeviceRouting,
        [wg, wu, wd]: [&A; 3],
    ) -> Result<(A, MoeCacheGpu)> {
        let out = self.uninit(n * c)?;
        let cache = moe::moe_forward(&self.be, x, n, c, r, wg, wu, wd, f, &out)?;
        Ok((out, cache))
    }
    fn moe_cache_bytes(&self, c: &MoeCacheGpu) -> usize {
        [&c.xg, &c.hg, &c.hu, &c.act, &c.y].iter().map(|b| b.bytes()).sum()
    }
    fn moe_backward(
        &self,
        dout: &A,
        (n, c, f): (usize, usize, usize),
        r: &DeviceRouting,
        [wg, wu, wd]: [&A; 3],
        cache: &MoeCacheGpu,
        dw: [&mut F; 3],
    ) -> Result<(A, F)> {
        let dx: F = self.uninit(n * c)?;
        let t: [F; 3] = [self.uninit(wg.len())?, self.uninit(wu.len())?, self.uninit(wd.len())?];
        let d_gates: F = self.uninit(n * r.top_k)?;
        moe::moe_backward(&self.be, dout, n, c, r, wg, wu, wd, f, cache, &dx, [&t[0], &t[1], &t[2]], &d_gates)?;
        // dw += t (moe_backward overwrites its outputs): through a bf16 copy of t, as
        // w ← w·1 − (−1)·o.
        for (acc, tmp) in dw.into_iter().zip(&t) {
            let tb = self.to_bf16(tmp)?;
            optim::muon_apply(&self.be, acc, &tb, None, 1.0, -1.0)?;
        }
        Ok((self.to_bf16(&dx)?, d_gates))
    }
    fn router_backward(
        &self,
        r: &DeviceRouting,
        d_gates: Option<&F>,
        d_scores: Option<&F>,
        cfg: &RouterConfig,
    ) -> Result<A> {
        let d_logits: F = self.uninit(r.n_tokens * cfg.n_experts)?;
        let zero: F;
        let d_gates = match d_gates {
            Some(d) => d,
            None => {
                zero = DeviceBuffer::zeros(&self.be, r.n_tokens * cfg.top_k)?;
                &zero
            }
        };
        moe::router_backward(&self.be, r, d_gates, d_scores, cfg, &d_logits)?;
        self.to_bf16(&d_logits)
    }

    fn scale(&self, x: &mut A, s: f32) -> Result<()> {
        Ok(elementwise::axpby(&self.be, s, x, 0.0, None, x)?)
    }
    fn indexer_topk(&self, dims: &DsaDims, qi: &A, ki: &A, wi: &A) -> Result<DeviceBuffer<u32>> {
        let sel = self.uninit(dims.sel_len())?;
        dsa::indexer_topk(&self.be, dims, qi, ki, wi, &sel)?;
        Ok(sel)
    }
    fn dsa_attention(
        &self,
        dims: &DsaDims,
        dv: usize,
        (q, k, v): (&A, &A, &A),
        sel: &DeviceBuffer<u32>,
    ) -> Result<(A, F)> {
        let (out, lse) = (self.uninit(dims.q_len() / dims.d * dv)?, self.uninit(dims.lse_len())?);
        dsa::dsa_attention_forward_dv(&self.be, dims, dv, q, k, v, sel, &out, &lse)?;
        Ok((out, lse))
    }
    fn dsa_attention_backward(
        &self,
        dims: &DsaDims,
        dv: usize,
        (q, k, v): (&A, &A, &A),
        sel: &DeviceBuffer<u32>,
        out: &A,
        lse: &F,
        dout: &A,
    ) -> Result<(A, A, A)> {
        let (ql, kl, vl) = (dims.q_len(), dims.kv_len(), dims.kv_len() / dims.d * dv);
        let (dq, dk, dvg): (F, F, F) = (self.uninit(ql)?, self.uninit(kl)?, self.uninit(vl)?);
        dsa::dsa_attention_backward_dv(&self.be, dims, dv, q, k, v, sel, out, lse, dout, [&dq, &dk, &dvg])?;
        Ok((self.to_bf16(&dq)?, self.to_bf16(&dk)?, self.to_bf16(&dvg)?))
    }
    fn indexer_kl(
        &self,
        dims: &DsaDims,
        q: &A,
        k: &A,
        lse: &F,
        (qi, ki, wi): (&A, &A, &A),
        sel: Option<&DeviceBuffer<u32>>,
    ) -> Result<(f32, A, A, A)> {
        let (dqi, dki, dwi): (F, F, F) =
            (self.uninit(dims.qi_len())?, self.uninit(dims.ki_len())?, self.uninit(dims.wi_len())?);
        let loss: F = self.uninit(1)?;
        dsa::indexer_kl(&self.be, dims, q, k, lse, qi, ki, wi, sel, [&dqi, &dki, &dwi], &loss)?;
        let kl = loss.to_host()?[0];
        Ok((kl, self.to_bf16(&dqi)?, self.to_bf16(&dki)?, self.to_bf16(&dwi)?))
    }

    fn rope_at(&self, _: &A, _: (usize, usize), _: usize, _: RopeKind) -> Result<A> {
        bail!("cached decoding runs on the CPU backend")
    }
    fn attention_cached(&self, _: &AttnDims, _: &A, _: &A, _: &A, _: &mut LayerCache) -> Result<A> {
        bail!("cached decoding runs on the CPU backend")
    }
    fn dsa_attention_cached(
        &self,
        _: &DsaDims,
        _: (&A, &A, &A),
        _: (&A, &A, &A),
        _: bool,
        _: &mut LayerCache,
    ) -> Result<A> {
        bail!("cached decoding runs on the CPU backend")
    }
    fn mla_absorb(&self, _: &AbsorbDims, _: AbsorbSide, _: &A, _: &A) -> Result<A> {
        bail!("cached decoding (MLA's absorbed up-projections) runs on the CPU backend")
    }
    fn latent_attention_cached(
        &self,
        _: &LatentDims,
        _: &A,
        _: &A,
        _: Option<(&DsaDims, (&A, &A, &A))>,
        _: bool,
        _: &mut LayerCache,
    ) -> Result<A> {
        bail!("cached decoding (MLA's latent cache) runs on the CPU backend")
    }

    fn add(&self, acc: &mut A, x: &A) -> Result<()> {
        Ok(elementwise::add(&self.be, acc, x, acc)?)
    }
    fn copy_cols(
        &self,
        src: &A,
        src_cols_off: (usize, usize),
        dst: &mut A,
        dst_cols_off: (usize, usize),
        rows: usize,
        width: usize,
    ) -> Result<()> {
        Ok(elementwise::copy_cols(&self.be, src, src_cols_off, dst, dst_cols_off, rows, width)?)
    }
    fn cross_entropy(&self, logits: &A, vocab: usize, (tgt, host): &Self::Tgt, cap: f32) -> Result<(f64, F)> {
        let (losses, lse): (F, F) = (self.uninit(tgt.len())?, self.uninit(tgt.len())?);
        loss::softcap_cross_entropy_forward(&self.be, logits, vocab, tgt, cap, &losses, &lse)?;
        let l = losses.to_host()?;
        Ok((l.iter().zip(host).filter(|(_, &y)| y >= 0).map(|(&x, _)| x as f64).sum(), lse))
    }
    fn cross_entropy_backward(
        &self,
        logits: &A,
        vocab: usize,
        (tgt, _): &Self::Tgt,
        cap: f32,
        lse: &F,
        scale: f32,
    ) -> Result<A> {
        let d = self.uninit(logits.len())?;
        loss::softcap_cross_entropy_backward(&self.be, logits, vocab, tgt, cap, lse, scale, &d)?;
        Ok(d)
    }

    fn clip_grad_norm(&self, grads: &mut [F], max_norm: f32) -> Result<f32> {
        let refs: Vec<&F> = grads.iter().collect();
        Ok(optim::clip_grad_norm(&self.be, &refs, max_norm)?)
    }
    fn adamw(&self, p: &mut F, pa: Option<&mut A>, g: &F, m: &mut F, v: &mut F, h: AdamWStep) -> Result<()> {
        Ok(optim::adamw_update(&self.be, p, g, m, v, pa.map(|a| &*a), h)?)
    }
    fn muon_momentum(&self, buf: &mut F, g: &F, mu: f32) -> Result<F> {
        let u = self.uninit(g.len())?;
        optim::muon_momentum(&self.be, buf, g, &u, mu)?;
        Ok(u)
    }

    /// X₀ = u/‖u‖ in bf16, then `steps` times X ← aX + (bA + cA²)X with A = XXᵀ, on the wide
    /// orientation like the CPU twin. A tall u [rows > cols] is never transposed: it is kept as
    /// G = Xᵀ, with A = GᵀG and the update G ← aG + G·Bᵀ (= (BX)ᵀ), which are GEMM layouts.
    fn newton_schulz(&self, u: &F, rows: usize, cols: usize, steps: usize) -> Result<A> {
        let be = &self.be;
        let (a, b, c) = NS_COEFFS;
        let sumsq: F = self.uninit(1)?;
        optim::sum_sq(be, u, &sumsq)?;
        let x: A = self.uninit(rows * cols)?;
        optim::muon_normalize(be, u, &sumsq, &x)?;
        let tall = rows > cols;
        let r = rows.min(cols);
        let (gram, sq, poly): (A, A, A) = (self.uninit(r * r)?, self.uninit(r * r)?, self.uninit(r * r)?);
        let y: A = self.uninit(rows * cols)?;
        for _ in 0..steps {
            if tall {
                gemm(be, r, r, rows, &x, Layout::T, &x, Layout::N, &gram, 1.0, 0.0)?;
            // A = GᵀG
            } else {
                gemm(be, r, r, cols, &x, Layout::N, &x, Layout::T, &gram, 1.0, 0.0)?;
                // A = XXᵀ
            }
            gemm(be, r, r, r, &gram, Layout::N, &gram, Layout::N, &sq, 1.0, 0.0)?; // A²
            elementwise::axpby(be, b, &gram, c, Some(&sq), &poly)?; // B = bA + cA²
            if tall {
                gemm(be, rows, cols, cols, &x, Layout::N, &poly, Layout::T, &y, 1.0, 0.0)?;
            // G·Bᵀ
            } else {
                gemm(be, rows, cols, rows, &poly, Layout::N, &x, Layout::N, &y, 1.0, 0.0)?;
                // B·X
            }
            elementwise::axpby(be, a, &x, 1.0, Some(&y), &x)?; // X ← aX + BX
        }
        Ok(x)
    }
    /// Each expert matrix through the host: the stack comes down, each matrix goes up for its
    /// [`CudaOps::newton_schulz`] and its bf16 result comes back, and the stack goes up again.
    fn newton_schulz_stack(&self, u: &F, n_mat: usize, rows: usize, cols: usize, steps: usize) -> Result<A> {
        if u.len() != n_mat * rows * cols {
            bail!("newton_schulz_stack: {} values are not {n_mat} [{rows}, {cols}] matrices", u.len());
        }
        let host = u.to_host()?;
        let mut out: Vec<bf16> = Vec::with_capacity(host.len());
        for m in host.chunks_exact(rows * cols) {
            let mu: F = DeviceBuffer::from_host(&self.be, m)?;
            out.extend(self.newton_schulz(&mu, rows, cols, steps)?.to_host()?);
        }
        Ok(DeviceBuffer::from_host(&self.be, &out)?)
    }
    fn muon_apply(&self, w: &mut F, wa: Option<&mut A>, o: &A, decay: f32, lr: f32) -> Result<()> {
        Ok(optim::muon_apply(&self.be, w, o, wa.map(|a| &*a), decay, lr)?)
    }
}
