//! [`StepOps`] on CUDA through the launch wrappers of `backend::cuda`: f32 master weights,
//! gradients (accumulated by the weight-gradient GEMMs with β = 1) and optimizer state; bf16
//! activations, bf16 weight copies (refreshed by the AdamW and Muon kernels) and bf16 GEMM
//! operands with fp32 accumulation; f32 rstd, lse and reductions. Muon's Newton–Schulz runs as
//! bf16 GEMMs (see [`CudaOps::newton_schulz`]).
//!
//! Shape rules of the kernels (checked once by [`CudaOps::new`]): head_dim 64 or 128; n_embd,
//! q_dim, kv_dim, ffn_hidden and vocab_size multiples of 8; and, per batch, b·t a multiple of 8
//! (the GEMMs' contiguous dimensions).

use super::step::{check_dense, DenseTrainer, StepOps};
use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::optim::AdamWStep;
use crate::backend::cuda::gemm::{gemm, Layout};
use crate::backend::cuda::rope::RopeTableGpu;
use crate::backend::cuda::{
    attention, elementwise, embedding, loss, norm, optim, rope, swiglu, CudaBackend, DeviceBuffer,
};
use crate::nn::{Model, ModelConfig};
use crate::optim::Optimizer;
use anyhow::{bail, Result};
use half::bf16;

type F = DeviceBuffer<f32>;
type A = DeviceBuffer<bf16>;

/// Quintic Newton–Schulz coefficients (the CPU twin's).
const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// The CUDA trainer of `model` (and its optimizer state) on device `ordinal`; a non-dense model
/// is refused first, naming the layer kinds that are not on the GPU yet.
pub fn cuda_trainer(ordinal: usize, model: &Model, opt: &Optimizer) -> Result<DenseTrainer<CudaOps>> {
    check_dense(&model.config)?;
    let be = CudaBackend::new(ordinal)?;
    DenseTrainer::new(CudaOps::new(be, &model.config)?, model, opt)
}

pub struct CudaOps {
    pub be: CudaBackend,
    rope: RopeTableGpu,
}

impl CudaOps {
    /// Checks the model's shapes against the kernels' rules and builds the RoPE table.
    pub fn new(be: CudaBackend, c: &ModelConfig) -> Result<CudaOps> {
        if c.head_dim != 64 && c.head_dim != 128 {
            bail!("CUDA training needs head_dim 64 or 128 (the attention kernels), got {}", c.head_dim);
        }
        for (what, v) in [
            ("n_embd", c.n_embd),
            ("n_head·head_dim", c.q_dim()),
            ("n_kv_head·head_dim", c.kv_dim()),
            ("ffn_hidden", c.ffn_hidden),
            ("vocab_size", c.vocab_size),
        ] {
            if v % 8 != 0 {
                bail!("CUDA training needs {what} to be a multiple of 8, got {v}");
            }
        }
        let rope = RopeTableGpu::new(&be, c.head_dim, c.max_seq_len, c.rope_theta)?;
        Ok(CudaOps { be, rope })
    }

    fn uninit<T: crate::backend::cuda::memory::DeviceElem>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        Ok(DeviceBuffer::uninit(&self.be, n)?)
    }
}

impl StepOps for CudaOps {
    type F = F;
    type A = A;
    type Ids = DeviceBuffer<u32>;
    /// The targets on the device, and on the host (to sum only the rows that count).
    type Tgt = (DeviceBuffer<i32>, Vec<i32>);

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
    fn a_zeros(&self, n: usize) -> Result<A> {
        Ok(DeviceBuffer::zeros(&self.be, n)?)
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
        let y = self.linear(x, w, m, k, n)?;
        let out = self.uninit(m * n)?;
        elementwise::add(&self.be, resid, &y, &out)?;
        Ok(out)
    }
    fn linear_dx(&self, dy: &A, w: &A, (m, k, n): (usize, usize, usize), dx: &mut A, accumulate: bool) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        Ok(gemm(&self.be, m, k, n, dy, Layout::N, w, Layout::N, dx, 1.0, beta)?)
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
    fn rope(&self, q: &mut A, k: &mut A, bthk: (usize, usize, usize, usize), inverse: bool) -> Result<()> {
        Ok(rope::rope_inplace(&self.be, &self.rope, q, k, bthk, inverse)?)
    }
    fn attention(&self, dims: &AttnDims, q: &A, k: &A, v: &A) -> Result<(A, F)> {
        let (out, lse) = (self.uninit(dims.q_len())?, self.uninit(dims.lse_len())?);
        attention::attention_forward(&self.be, dims, q, k, v, &out, &lse)?;
        Ok((out, lse))
    }
    fn attention_backward(
        &self,
        dims: &AttnDims,
        q: &A,
        k: &A,
        v: &A,
        out: &A,
        lse: &F,
        dout: &A,
    ) -> Result<(A, A, A)> {
        let (ql, kl) = (dims.q_len(), dims.kv_len());
        let (dq, dk, dv): (F, F, F) = (self.uninit(ql)?, self.uninit(kl)?, self.uninit(kl)?);
        attention::attention_backward(&self.be, dims, q, k, v, out, lse, dout, [&dq, &dk, &dv])?;
        let (bq, bk, bv): (A, A, A) = (self.uninit(ql)?, self.uninit(kl)?, self.uninit(kl)?);
        optim::cast_f32_bf16(&self.be, &dq, &bq)?;
        optim::cast_f32_bf16(&self.be, &dk, &bk)?;
        optim::cast_f32_bf16(&self.be, &dv, &bv)?;
        Ok((bq, bk, bv))
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
    fn add(&self, acc: &mut A, x: &A) -> Result<()> {
        Ok(elementwise::add(&self.be, acc, x, acc)?)
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
    fn adamw(&self, p: &mut F, pa: &mut A, g: &F, m: &mut F, v: &mut F, h: AdamWStep) -> Result<()> {
        Ok(optim::adamw_update(&self.be, p, g, m, v, Some(pa), h)?)
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
    fn muon_apply(&self, w: &mut F, wa: &mut A, o: &A, decay: f32, lr: f32) -> Result<()> {
        Ok(optim::muon_apply(&self.be, w, o, Some(wa), decay, lr)?)
    }
}
