//! The drop-in kernel API on the GPU: each CUDA kernel family as a function on device
//! tensors, named like its CPU twin in [`crate::kernels`] (which is its reference: the
//! parity tests in `tests/cuda/kernels_api.rs` compare the two).
//!
//! Activations are bf16 ([`DeviceTensor`], the default element type), accumulation is f32,
//! and statistics (log-sum-exp, router logits, embedding tables) are `DeviceTensor<f32>`.
//! Layouts are row-major. Every call checks its arguments first ([`super::checks`], which
//! needs no device) and returns a [`CudaError`] for a wrong shape, a dimension the CUDA
//! kernels do not support, or a failed launch; none panics on a user mistake. Work is
//! queued on the backend's stream; `to_host`/`to_vec` wait for it.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use nanoseek::backend::cuda::CudaBackend;
//! use nanoseek::kernels::{self, cuda::DeviceTensor};
//! use nanoseek::Tensor;
//! let be = CudaBackend::new(0)?;                     // an error, not a panic, without a GPU
//! let q = Tensor::zeros(&[1, 128, 4, 64]);           // [b, t, heads, head_dim]
//! let kv = Tensor::zeros(&[1, 128, 2, 64]);          // grouped-query: 2 kv heads
//! let (q_d, kv_d) = (DeviceTensor::from_host(&be, &q)?, DeviceTensor::from_host(&be, &kv)?);
//! let (out, lse) = kernels::cuda::causal_attention(&be, &q_d, &kv_d, &kv_d)?;
//! let (out, lse) = (out.to_host()?, lse.to_host()?); // bf16 → f32 Tensor, f32 Tensor
//! assert_eq!((out.shape, lse.shape), (vec![1, 128, 4, 64], vec![1, 4, 128]));
//! # Ok(())
//! # }
//! ```

use super::checks;
use super::Selection;
use crate::backend::cuda::memory::DeviceElem;
use crate::backend::cuda::{self as cu, CudaBackend, CudaError, CudaResult, DeviceBuffer};
use crate::tensor::Tensor;
use half::bf16;

pub use crate::backend::cpu::gemm::Layout;
pub use crate::backend::cuda::moe::DeviceRouting;
pub use crate::backend::cuda::rope::RopeTableGpu;

/// Element types that convert to and from the host's f32 tensors (bf16 rounds to nearest even).
pub trait FloatElem: DeviceElem {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl FloatElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl FloatElem for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// A row-major tensor in device memory: a shape and a buffer of exactly `shape.product()`
/// elements (an invariant every constructor checks). bf16 by default; `DeviceTensor<f32>` for
/// statistics and tables, `DeviceTensor<u32>` for indices.
pub struct DeviceTensor<T: DeviceElem = bf16> {
    shape: Vec<usize>,
    data: DeviceBuffer<T>,
}

impl<T: DeviceElem> DeviceTensor<T> {
    /// Wraps a buffer; fails unless it holds exactly `shape.product()` elements.
    pub fn from_parts(shape: &[usize], data: DeviceBuffer<T>) -> CudaResult<Self> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(CudaError(format!(
                "DeviceTensor: shape {shape:?} holds {n} values, the buffer {}",
                data.len()
            )));
        }
        Ok(DeviceTensor { shape: shape.to_vec(), data })
    }

    /// Uninitialized values (for outputs that a kernel overwrites).
    pub(crate) fn uninit(be: &CudaBackend, shape: &[usize]) -> CudaResult<Self> {
        Ok(DeviceTensor { shape: shape.to_vec(), data: DeviceBuffer::uninit(be, shape.iter().product())? })
    }

    /// All zero bits (0.0 for the float types).
    pub fn zeros(be: &CudaBackend, shape: &[usize]) -> CudaResult<Self> {
        Ok(DeviceTensor { shape: shape.to_vec(), data: DeviceBuffer::zeros(be, shape.iter().product())? })
    }

    /// Copy of host values of exactly this element type.
    pub fn from_slice(be: &CudaBackend, shape: &[usize], values: &[T]) -> CudaResult<Self> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(CudaError(format!("DeviceTensor: shape {shape:?} holds {n} values, got {}", values.len())));
        }
        Ok(DeviceTensor { shape: shape.to_vec(), data: DeviceBuffer::from_host(be, values)? })
    }

    /// The values on the host (waits for the queued work).
    pub fn to_vec(&self) -> CudaResult<Vec<T>> {
        self.data.to_host()
    }

    /// The same buffer under another shape with as many elements.
    pub fn reshape(self, shape: &[usize]) -> CudaResult<Self> {
        Self::from_parts(shape, self.data)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// The buffer, for the launch code in `backend::cuda`.
    pub fn data(&self) -> &DeviceBuffer<T> {
        &self.data
    }
    pub fn into_data(self) -> DeviceBuffer<T> {
        self.data
    }
}

impl<T: FloatElem> DeviceTensor<T> {
    /// Copy of a host tensor, each value rounded to `T` (round to nearest even for bf16).
    pub fn from_host(be: &CudaBackend, t: &Tensor) -> CudaResult<Self> {
        let values: Vec<T> = t.data.iter().map(|&x| T::from_f32(x)).collect();
        Self::from_slice(be, &t.shape, &values)
    }

    /// The values as an f32 host tensor (exact: every bf16 is an f32).
    pub fn to_host(&self) -> CudaResult<Tensor> {
        let data = self.to_vec()?.into_iter().map(T::to_f32).collect();
        Ok(Tensor { shape: self.shape.clone(), data })
    }
}

/// C = A·B for A [m, k] and B [k, n], bf16 in and out, one f32 accumulation per output rounded
/// once (tensor cores, `gemm.cu`). CUDA needs k and n multiples of 8. Twin: [`super::matmul`].
pub fn matmul(be: &CudaBackend, a: &DeviceTensor, b: &DeviceTensor) -> CudaResult<DeviceTensor> {
    let (m, n, k) = checks::matmul(&a.shape, &b.shape)?;
    if k == 0 {
        return DeviceTensor::zeros(be, &[m, n]); // an empty sum
    }
    let c = DeviceTensor::uninit(be, &[m, n])?;
    cu::gemm::gemm(be, m, n, k, &a.data, Layout::N, &b.data, Layout::N, &c.data, 1.0, 0.0)?;
    Ok(c)
}

/// y = x·wᵀ for x [..., k] and w [n, k] (a bias-free linear layer, PyTorch weight layout) →
/// y [..., n], bf16, f32 accumulation. CUDA needs k a multiple of 8. Twin: [`super::linear`].
pub fn linear(be: &CudaBackend, x: &DeviceTensor, w: &DeviceTensor) -> CudaResult<DeviceTensor> {
    let (m, n, k) = checks::linear(&x.shape, &w.shape)?;
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked: x ends in k") = n;
    if k == 0 {
        return DeviceTensor::zeros(be, &shape); // an empty sum
    }
    let y = DeviceTensor::uninit(be, &shape)?;
    cu::gemm::gemm(be, m, n, k, &x.data, Layout::N, &w.data, Layout::T, &y.data, 1.0, 0.0)?;
    Ok(y)
}

/// out = resid + x·wᵀ for x [..., k], w [n, k] and resid shaped like the output [..., n], bf16,
/// the residual added to the f32 accumulator in the GEMM's epilogue and rounded once. CUDA needs
/// k a multiple of 8. Twin: [`super::linear_residual`].
pub fn linear_residual(
    be: &CudaBackend,
    x: &DeviceTensor,
    w: &DeviceTensor,
    resid: &DeviceTensor,
) -> CudaResult<DeviceTensor> {
    let (m, n, k) = checks::linear_fused("linear_residual", &x.shape, &w.shape, ("resid", &resid.shape))?;
    let out = DeviceTensor::uninit(be, &resid.shape)?;
    let epi = cu::gemm::Epilogue::Residual { resid: &resid.data, out: &out.data };
    cu::gemm::gemm_fused(be, m, n, k, &x.data, &w.data, epi)?;
    Ok(out)
}

/// silu(gate) ⊙ x·w_upᵀ for x [..., k], w_up [n, k] and gate shaped like the output [..., n],
/// bf16: the gate is applied to the f32 accumulator in the GEMM's epilogue (x·w_upᵀ is never
/// written) and the result rounded once. CUDA needs k a multiple of 8. Twin:
/// [`super::linear_swiglu`].
pub fn linear_swiglu(
    be: &CudaBackend,
    x: &DeviceTensor,
    w_up: &DeviceTensor,
    gate: &DeviceTensor,
) -> CudaResult<DeviceTensor> {
    let (m, n, k) = checks::linear_fused("linear_swiglu", &x.shape, &w_up.shape, ("gate", &gate.shape))?;
    let act = DeviceTensor::uninit(be, &gate.shape)?;
    let epi = cu::gemm::Epilogue::SwiGlu { gate: &gate.data, act: &act.data, up: None };
    cu::gemm::gemm_fused(be, m, n, k, &x.data, &w_up.data, epi)?;
    Ok(act)
}

/// Parameter-free RMSNorm over consecutive groups of `dim` values (eps `norm::RMS_EPS`): bf16
/// in and out, the sum of squares and 1/rms in f32 (the kernel also writes rstd, dropped here).
/// CUDA needs dim a multiple of 8. Twin: [`super::rmsnorm`].
pub fn rmsnorm(be: &CudaBackend, x: &DeviceTensor, dim: usize) -> CudaResult<DeviceTensor> {
    let rows = checks::rmsnorm(&x.shape, dim)?;
    let y = DeviceTensor::uninit(be, &x.shape)?;
    let rstd = DeviceBuffer::<f32>::uninit(be, rows)?;
    cu::norm::rmsnorm_forward(be, &x.data, dim, &y.data, &rstd)?;
    Ok(y)
}

/// Affine LayerNorm of each row of x [.., dim] with γ, β [dim] (eps `norm::LN_EPS`): bf16 in
/// and out, mean, variance and 1/std in f32 (the kernel also writes them, dropped here). CUDA
/// needs dim a multiple of 8. Twin: [`super::layernorm`].
pub fn layernorm(
    be: &CudaBackend,
    x: &DeviceTensor,
    gamma: &DeviceTensor,
    beta: &DeviceTensor,
) -> CudaResult<DeviceTensor> {
    let (rows, dim) = checks::layernorm(&x.shape, &gamma.shape, &beta.shape)?;
    let y = DeviceTensor::uninit(be, &x.shape)?;
    let stats = DeviceBuffer::<f32>::uninit(be, 2 * rows)?;
    cu::norm::layernorm_forward(be, &x.data, (&gamma.data, &beta.data), dim, &y.data, &stats)?;
    Ok(y)
}

/// NeoX half-split rotary embedding of x [b, t, h, head_dim], positions 0..t, bf16 in and out,
/// f32 math with the same f32 cos/sin table as the CPU. CUDA needs head_dim a multiple of 16
/// (checked by [`RopeTableGpu::new`]). Twin: [`super::rope`].
pub fn rope(be: &CudaBackend, x: &DeviceTensor, table: &RopeTableGpu) -> CudaResult<DeviceTensor> {
    let (b, t, h) = checks::rope(&x.shape, table.head_dim, table.max_t)?;
    let y = DeviceTensor::uninit(be, &x.shape)?;
    // No k heads (h_kv = 0): the kernel rotates q only and never touches the empty k buffers.
    let none = DeviceBuffer::<bf16>::uninit(be, 0)?;
    cu::rope::rope(be, table, &x.data, &none, &y.data, &none, (b, t, h, 0), false)?;
    Ok(y)
}

/// [`rope`] of q [b, t, h, d] and k [b, t, h_kv, d] fused into one launch (one block per token
/// rotates all of its q and k heads) → (q', k'). Twin: [`super::rope`] on q and on k.
pub fn rope_qk(
    be: &CudaBackend,
    q: &DeviceTensor,
    k: &DeviceTensor,
    table: &RopeTableGpu,
) -> CudaResult<(DeviceTensor, DeviceTensor)> {
    let dims = checks::rope_qk(&q.shape, &k.shape, table.head_dim, table.max_t)?;
    let (qo, ko) = (DeviceTensor::uninit(be, &q.shape)?, DeviceTensor::uninit(be, &k.shape)?);
    cu::rope::rope(be, table, &q.data, &k.data, &qo.data, &ko.data, dims, false)?;
    Ok((qo, ko))
}

/// The model's QK-norm fused with RoPE in one launch (one warp per token row and head): every
/// head of q_raw [b, t, h, d] and k_raw [b, t, h_kv, d] RMS-normalized (parameter-free, eps
/// `RMS_EPS`, f32 math, the normalized head not rounded before the rotation) and rotated like
/// [`rope`] → (q, k bf16, rstd_q f32 [b, t, h], rstd_k f32 [b, t, h_kv]). CUDA needs head_dim a
/// multiple of 16 (checked by [`RopeTableGpu::new`]) and at most 512. Twin: [`super::rope_qknorm`].
#[allow(clippy::type_complexity)]
pub fn rope_qknorm(
    be: &CudaBackend,
    q_raw: &DeviceTensor,
    k_raw: &DeviceTensor,
    table: &RopeTableGpu,
) -> CudaResult<(DeviceTensor, DeviceTensor, DeviceTensor<f32>, DeviceTensor<f32>)> {
    let (b, t, h, h_kv) = checks::rope_qknorm(&q_raw.shape, &k_raw.shape, table.head_dim, table.max_t)?;
    let (q, k) = (DeviceTensor::uninit(be, &q_raw.shape)?, DeviceTensor::uninit(be, &k_raw.shape)?);
    let (rq, rk) = (DeviceTensor::<f32>::uninit(be, &[b, t, h])?, DeviceTensor::<f32>::uninit(be, &[b, t, h_kv])?);
    cu::rope::rope_qknorm_forward(
        be,
        table,
        &q_raw.data,
        &k_raw.data,
        (b, t, h, h_kv),
        &q.data,
        &k.data,
        &rq.data,
        &rk.data,
    )?;
    Ok((q, k, rq, rk))
}

/// Causal grouped-query flash attention, scale 1/√d: q [b, t, h, d], k [b, t, h_kv, d] and v
/// [b, t, h_kv, dv] (h a multiple of h_kv) → (out bf16 [b, t, h, dv], lse f32 [b, h, t], the
/// natural log-sum-exp of each row's scaled scores). QKᵀ, the online softmax and P·V are fused:
/// no T×T matrix is formed; P is rounded to bf16 before P·V. CUDA has (d, dv) ∈ {(64, 64),
/// (128, 128), (96, 64), (192, 128)} (the last two: MLA's heads). Twin: [`super::causal_attention`].
pub fn causal_attention(
    be: &CudaBackend,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
) -> CudaResult<(DeviceTensor, DeviceTensor<f32>)> {
    let dims = checks::attention("causal_attention", &q.shape, &k.shape, &v.shape)?;
    let dv = v.shape[3];
    let out = DeviceTensor::uninit(be, &[dims.b, dims.t, dims.h, dv])?;
    let lse = DeviceTensor::<f32>::uninit(be, &[dims.b, dims.h, dims.t])?;
    cu::attention::attention_forward_dv(be, &dims, dv, &q.data, &k.data, &v.data, &out.data, &lse.data)?;
    Ok((out, lse))
}

/// Sliding-window causal attention with global tokens: as [`causal_attention`], but query `i`
/// sees only the keys `{s : i − window < s ≤ i} ∪ {s < n_global, s ≤ i}`, and only the key tiles
/// holding such keys are visited (O(t·(window + n_global)) work). `window` ≥ 1; head shapes as
/// [`causal_attention`]. Twin: [`super::window_attention`].
pub fn window_attention(
    be: &CudaBackend,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    window: usize,
    n_global: usize,
) -> CudaResult<(DeviceTensor, DeviceTensor<f32>)> {
    let dims = checks::window_attention(&q.shape, &k.shape, &v.shape, window, n_global)?;
    let dv = v.shape[3];
    let out = DeviceTensor::uninit(be, &[dims.b, dims.t, dims.h, dv])?;
    let lse = DeviceTensor::<f32>::uninit(be, &[dims.b, dims.h, dims.t])?;
    let (qd, kd, vd) = (&q.data, &k.data, &v.data);
    cu::window_attention::window_attention_forward_dv(be, &dims, dv, qd, kd, vd, &out.data, &lse.data)?;
    Ok((out, lse))
}

/// silu(g) ∘ u, elementwise on bf16 tensors of one shape (f32 math, one rounding).
/// Twin: [`super::swiglu`].
pub fn swiglu(be: &CudaBackend, g: &DeviceTensor, u: &DeviceTensor) -> CudaResult<DeviceTensor> {
    checks::swiglu(&g.shape, &u.shape)?;
    let y = DeviceTensor::uninit(be, &g.shape)?;
    cu::swiglu::swiglu_forward(be, &g.data, &u.data, &y.data)?;
    Ok(y)
}

/// Mean over the rows with target ≥ 0 of cross-entropy(cap·tanh(logits/cap), target), in nats;
/// cap 0 = no cap. logits bf16 [..., vocab], `targets` one per row on the host (each < vocab,
/// checked before the upload; negative = ignored). The softcap, the log-sum-exp (vocabulary
/// streamed with an online max/sum) and the loss are one kernel per row, in f32; the per-row
/// losses are then copied back and averaged in f64 (a host sync). CUDA needs vocab a multiple
/// of 8. Twin: [`super::softcap_cross_entropy`].
pub fn softcap_cross_entropy(be: &CudaBackend, logits: &DeviceTensor, targets: &[i32], cap: f32) -> CudaResult<f32> {
    let (rows, vocab) = checks::cross_entropy(&logits.shape, targets, cap)?;
    let tg = DeviceBuffer::from_host(be, targets)?;
    let (losses, lse) = (DeviceBuffer::<f32>::uninit(be, rows)?, DeviceBuffer::<f32>::uninit(be, rows)?);
    cu::loss::softcap_cross_entropy_forward(be, &logits.data, vocab, &tg, cap, &losses, &lse)?;
    let n = targets.iter().filter(|&&t| t >= 0).count().max(1);
    let sum: f64 = losses.to_host()?.iter().map(|&l| l as f64).sum();
    Ok((sum / n as f64) as f32)
}

/// out[i, :] = table[ids[i], :]: table f32 [vocab, dim] (master weights) → out bf16
/// [ids.len(), dim]. The ids are checked (< vocab) on the host, then uploaded.
/// Twin: [`super::embedding`].
pub fn embedding(be: &CudaBackend, table: &DeviceTensor<f32>, ids: &[u32]) -> CudaResult<DeviceTensor> {
    let (_, dim) = checks::embedding(&table.shape, ids)?;
    let out = DeviceTensor::uninit(be, &[ids.len(), dim])?;
    let ids_d = DeviceBuffer::from_host(be, ids)?;
    cu::embedding::embedding_forward(be, &table.data, dim, &ids_d, &out.data)?;
    Ok(out)
}

/// The keys each query of a sparse attention reads, on the device: u32 `[b, t, kmax]`,
/// `kmax = min(topk + window, t)`, each row the selected key indices (ascending, each ≤ its
/// query) then [`super::PAD`]. Made by [`dsa_topk`] or checked by [`DeviceSelection::from_host`],
/// so every selection a kernel reads is valid.
pub struct DeviceSelection {
    sel: DeviceTensor<u32>,
    topk: usize,
    window: usize,
}

impl DeviceSelection {
    /// Uploads a host selection after checking its shape and that every row is non-empty and causal.
    pub fn from_host(be: &CudaBackend, s: &Selection) -> CudaResult<Self> {
        checks::selection_shape(s.shape, s.topk, s.window)?;
        checks::selection_rows(s.shape, &s.sel)?;
        Ok(DeviceSelection { sel: DeviceTensor::from_slice(be, &s.shape, &s.sel)?, topk: s.topk, window: s.window })
    }

    pub fn to_host(&self) -> CudaResult<Selection> {
        let shape = [self.sel.shape[0], self.sel.shape[1], self.sel.shape[2]];
        Ok(Selection { shape, sel: self.sel.to_vec()?, topk: self.topk, window: self.window })
    }

    /// `[b, t, kmax]`.
    pub fn shape(&self) -> &[usize] {
        &self.sel.shape
    }
    pub fn topk(&self) -> usize {
        self.topk
    }
    pub fn window(&self) -> usize {
        self.window
    }
}

/// The lightning indexer's exact top-k (DeepSeek sparse attention): qi bf16 [b, t, H_I, d_I],
/// ki bf16 [b, t, d_I], wi bf16 [b, t, H_I] → the selection of each query: its `window` most
/// recent keys plus the `topk` older keys with the largest scores Σ_j wi_j·relu(qi_j·ki) (ties
/// to the more recent key, exactly the CPU's set). Scores go to an f32 workspace per chunk of
/// queries (at most 256 MiB); the selection is a radix select on (score, index) keys.
/// Twin: [`super::dsa_topk`].
pub fn dsa_topk(
    be: &CudaBackend,
    qi: &DeviceTensor,
    ki: &DeviceTensor,
    wi: &DeviceTensor,
    topk: usize,
    window: usize,
) -> CudaResult<DeviceSelection> {
    let dims = checks::dsa_topk(&qi.shape, &ki.shape, &wi.shape, topk, window)?;
    let sel = DeviceTensor::<u32>::uninit(be, &[dims.b, dims.t, dims.kmax()])?;
    cu::dsa::indexer_topk(be, &dims, &qi.data, &ki.data, &wi.data, &sel.data)?;
    Ok(DeviceSelection { sel, topk, window })
}

/// Softmax attention of each query over its selected keys only (GQA, scale 1/√d): q [b, t, h, d],
/// k [b, t, h_kv, d], v [b, t, h_kv, dv], `sel` [b, t, kmax] → (out bf16 [b, t, h, dv], lse f32
/// [b, h, t]). The selected k/v rows are gathered per query and kv head and the group of query
/// heads is processed at once (SIMT f32; a group whose shared memory passes 96 KiB is split over
/// a few blocks). CUDA has (d, dv) ∈ {(64, 64), (128, 128), (96, 64), (192, 128)}; MQA over MLA's
/// latent is [`sparse_attention_latent`]. Twin: [`super::sparse_attention`].
pub fn sparse_attention(
    be: &CudaBackend,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    sel: &DeviceSelection,
) -> CudaResult<(DeviceTensor, DeviceTensor<f32>)> {
    let s = &sel.sel.shape;
    let dims = checks::sparse_attention(&q.shape, &k.shape, &v.shape, [s[0], s[1], s[2]], sel.topk, sel.window)?;
    let dv = v.shape[3];
    let out = DeviceTensor::uninit(be, &[dims.b, dims.t, dims.h, dv])?;
    let lse = DeviceTensor::<f32>::uninit(be, &[dims.b, dims.h, dims.t])?;
    let (qd, kd, vd) = (&q.data, &k.data, &v.data);
    cu::dsa::dsa_attention_forward_dv(be, &dims, dv, qd, kd, vd, &sel.sel.data, &out.data, &lse.data)?;
    Ok((out, lse))
}

/// DeepSeek-V3.2's sparse attention in MQA mode over MLA's latent: q [b, t, h, 576] (the
/// absorbed queries), one shared key head kv [b, t, 1, 576] (`[c_kv | k_pe]`) whose first 512
/// columns are the values, `sel` [b, t, kmax] → (out bf16 [b, t, h, 512], lse f32 [b, h, t]).
/// Each block gathers a selected latent row once into shared memory and serves up to 16 query
/// heads of the token from it (more heads: ceil(h / 16) blocks per token). Twin:
/// [`super::sparse_attention_latent`] with dv = 512.
pub fn sparse_attention_latent(
    be: &CudaBackend,
    q: &DeviceTensor,
    kv: &DeviceTensor,
    sel: &DeviceSelection,
) -> CudaResult<(DeviceTensor, DeviceTensor<f32>)> {
    let s = &sel.sel.shape;
    let dims = checks::sparse_attention(&q.shape, &kv.shape, &kv.shape, [s[0], s[1], s[2]], sel.topk, sel.window)?;
    let dv = cu::dsa::LATENT_SHAPE.1;
    let out = DeviceTensor::uninit(be, &[dims.b, dims.t, dims.h, dv])?;
    let lse = DeviceTensor::<f32>::uninit(be, &[dims.b, dims.h, dims.t])?;
    cu::dsa::dsa_attention_latent_forward(be, &dims, &q.data, &kv.data, &sel.sel.data, &out.data, &lse.data)?;
    Ok((out, lse))
}

/// MoE routing of n tokens: router logits f32 [n, E] (= x·Rᵀ) and the balancing bias f32 [E] →
/// the routing on the device: scores, the chosen experts (by score + bias, group-limited),
/// gates, and the expert-contiguous dispatch order with capacity drops in token order, bit for
/// bit the CPU's. The router is one fused kernel (a warp per token); the dispatch needs no
/// atomics and no host sync. Twin: [`super::moe_route`] (compare with [`DeviceRouting::to_host`]).
pub fn moe_route(
    be: &CudaBackend,
    logits: &DeviceTensor<f32>,
    bias: &DeviceTensor<f32>,
    cfg: &super::RouterConfig,
) -> CudaResult<DeviceRouting> {
    checks::moe_route(&logits.shape, &bias.shape, cfg)?;
    cu::moe::route(be, &logits.data, &bias.data, cfg)
}

#[cfg(test)]
mod tests {
    /// The README's CUDA example is this module's doc example (compiled by `cargo test --doc`):
    /// every line of the README block must be a line of the doc example.
    #[test]
    fn readme_example_is_the_doc_example() {
        let readme = include_str!("../../README.md");
        let start = readme.find("use nanoseek::backend::cuda::CudaBackend;").expect("README: the CUDA example");
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let doc: Vec<&str> = include_str!("cuda.rs").lines().filter_map(|l| l.strip_prefix("//! ")).collect();
        for line in block.lines().filter(|l| !l.trim().is_empty()) {
            assert!(doc.contains(&line), "README line not in the doc example of kernels::cuda: {line}");
        }
    }
}
