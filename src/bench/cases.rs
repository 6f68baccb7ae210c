//! The timed cases (shapes mirror `scripts/torch_baselines.py`).
use super::runner::{Output, Runner, Timing::Long, Timing::Short};
use super::{BenchOptions, Case};
use crate::kernels::launch::attention::AttnDims;
use crate::kernels::launch::dsa::DsaDims;
use crate::kernels::launch::moe::{RouterConfig, ScoreFunc};
use crate::kernels::launch::window_attention::WindowDims;
use crate::kernels::launch::{
    self, attention, cublaslt, dsa, elementwise, gemm, loss, moe, norm, rope, window_attention, CudaBackend,
    CudaResult, DeviceBuffer,
};
use anyhow::Result;
use half::bf16;

/// Device bf16 values uniform in [-1, 1) (a cheap xorshift; the values do not matter).
fn random_bf16(be: &CudaBackend, n: usize, seed: u64) -> CudaResult<DeviceBuffer<bf16>> {
    random_bf16_scaled(be, n, seed, 1.0)
}

/// Device bf16 values uniform in [-scale, scale).
fn random_bf16_scaled(be: &CudaBackend, n: usize, seed: u64, scale: f32) -> CudaResult<DeviceBuffer<bf16>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let host: Vec<bf16> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(scale * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0))
        })
        .collect();
    DeviceBuffer::from_host(be, &host)
}

/// The fused GEMM epilogues at the `small` model's feed-forward shapes (x·wᵀ, tokens × out ×
/// in): the residual add after w_down and SwiGLU after w_up (the up product kept, as in
/// training), and SwiGLU's backward after dY·w_down, on every engine, beside the unfused product + element-wise kernel on the native
/// one (cuBLASLt's rows are that composition: it has no SwiGLU epilogue). Rates count the
/// GEMM's FLOPs on both sides, as PyTorch's rows do.
fn epilogue_cases(r: &mut Runner, lt: bool) -> Result<()> {
    let be = r.be;
    use crate::kernels::launch::gemm::{gemm_fused_on, gemm_swiglu_backward_on, Epilogue, GemmEngine};
    use crate::kernels::launch::swiglu;
    let (nn_, t_) = (gemm::Layout::N, gemm::Layout::T);
    let (m, f, c) = (16384, 3072, 768);
    let mut engines = vec![GemmEngine::Native];
    if lt {
        engines.push(GemmEngine::Cublaslt);
    }
    if be.compute_capability() == (9, 0) {
        engines.push(GemmEngine::Wgmma);
    }
    // residual: out[m, c] = r + a[m, f]·w_down[c, f]ᵀ
    let (a, w, res) = (random_bf16(be, m * f, 11)?, random_bf16(be, c * f, 12)?, random_bf16(be, m * c, 13)?);
    let out = DeviceBuffer::<bf16>::zeros(be, m * c)?;
    let (shape, flops) = ([m, c, f], 2.0 * (m * c * f) as f64);
    for &e in &engines {
        let epi = Epilogue::Residual { resid: &res, out: &out };
        let name = format!("linear+residual {}", e.name());
        let spec = Case::spec("gemm", &name, &shape, Some(flops), None).vs(&["torch addmm residual"]);
        r.case(spec, Short, &[&out], || gemm_fused_on(be, e, m, c, f, &a, &w, epi))?;
    }
    let y = DeviceBuffer::<bf16>::zeros(be, m * c)?;
    let spec = Case::spec("gemm", "linear+residual native unfused", &shape, Some(flops), None);
    r.case(spec.vs(&["torch addmm residual"]), Short, &[&out, &y], || {
        gemm::native_gemm_batched(be, 1, m, c, f, &a, nn_, &w, t_, &y, 1.0, 0.0)?;
        elementwise::add(be, &res, &y, &out)
    })?;
    drop((a, w, res, out, y));

    // SwiGLU: act[m, f] = silu(g) ⊙ up, up = h[m, c]·w_up[f, c]ᵀ
    let (h, w, g) = (random_bf16(be, m * c, 14)?, random_bf16(be, f * c, 15)?, random_bf16(be, m * f, 16)?);
    let (up, act) = (DeviceBuffer::<bf16>::zeros(be, m * f)?, DeviceBuffer::<bf16>::zeros(be, m * f)?);
    let (shape, flops) = ([m, f, c], 2.0 * (m * f * c) as f64);
    let torch = ["torch linear+swiglu eager", "torch linear+swiglu compiled"];
    for &e in &engines {
        let epi = Epilogue::SwiGlu { gate: &g, act: &act, up: Some(&up) };
        let name = format!("linear+swiglu {}", e.name());
        let spec = Case::spec("gemm", &name, &shape, Some(flops), None).vs(&torch);
        r.case(spec, Short, &[&act, &up], || gemm_fused_on(be, e, m, f, c, &h, &w, epi))?;
    }
    let spec = Case::spec("gemm", "linear+swiglu native unfused", &shape, Some(flops), None).vs(&torch);
    r.case(spec, Short, &[&act, &up], || {
        gemm::native_gemm_batched(be, 1, m, f, c, &h, nn_, &w, t_, &up, 1.0, 0.0)?;
        swiglu::swiglu_forward(be, &g, &up, &act)
    })?;

    // SwiGLU's backward: (dg, du) from da = dy[m, c]·w_down[c, f] (NN), with g, u [m, f]
    let (dy, wd) = (random_bf16(be, m * c, 19)?, random_bf16(be, c * f, 20)?);
    let (dg, du) = (DeviceBuffer::<bf16>::zeros(be, m * f)?, DeviceBuffer::<bf16>::zeros(be, m * f)?);
    let torch = ["torch matmul+swiglu bwd eager", "torch matmul+swiglu bwd compiled"];
    for &e in &engines {
        let name = format!("dy·w+swiglu bwd {}", e.name());
        let spec = Case::spec("gemm", &name, &shape, Some(flops), None).vs(&torch);
        r.case(spec, Short, &[&dg, &du], || gemm_swiglu_backward_on(be, e, m, f, c, &dy, &wd, (&g, &up), (&dg, &du)))?;
    }
    let spec = Case::spec("gemm", "dy·w+swiglu bwd native unfused", &shape, Some(flops), None).vs(&torch);
    r.case(spec, Short, &[&dg, &du, &act], || {
        gemm::native_gemm_batched(be, 1, m, f, c, &dy, nn_, &wd, nn_, &act, 1.0, 0.0)?;
        swiglu::swiglu_backward(be, &g, &up, &act, &dg, &du)
    })?;
    Ok(())
}

/// Every case, in order (the copy case first: it sets the copy ceiling), each reported to the
/// runner's reporter as it finishes.
pub fn all(r: &mut Runner, o: &BenchOptions) -> Result<()> {
    let be = r.be;
    // Copy ceiling: 256 MiB device to device, bytes read + written.
    let n = 1usize << 28;
    let (src, dst) = (DeviceBuffer::<f32>::zeros(be, n / 4)?, DeviceBuffer::<f32>::zeros(be, n / 4)?);
    let spec = Case::spec("copy", "cuMemcpyDtoD", &[n], None, Some(2.0 * n as f64)).vs(&["copy_"]);
    r.case(spec, Short, &[&dst], || launch::copy(&src, &dst))?;
    drop((src, dst));

    // GEMM, bf16 in, bf16 out, fp32 accumulation: C[m,n] = A[m,k]·B[k,n].
    let gemms = [(4096, 4096, 4096), (16384, 768, 3072), (16384, 3072, 768), (16384, 1024, 4096)];
    // Every engine, whatever --gemm says: the handwritten kernel, cuBLASLt, then the sm_90a
    // wgmma kernel (compute capability 9.0 only).
    let lt = match cublaslt::available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("nanoseek bench: no cuBLASLt rows: {e}");
            false
        }
    };
    let nn_ = gemm::Layout::N;
    for &(m, nn, k) in if o.quick { &gemms[..2] } else { &gemms[..] } {
        let (a, b) = (random_bf16(be, m * k, 1)?, random_bf16(be, k * nn, 2)?);
        let c = DeviceBuffer::<bf16>::zeros(be, m * nn)?;
        let flops = 2.0 * (m * nn * k) as f64;
        let spec = |name: &str| Case::spec("gemm", name, &[m, nn, k], Some(flops), None).vs(&["torch.matmul"]);
        r.case(spec("gemm_nn_bf16"), Short, &[&c], || {
            gemm::native_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0)
        })?;
        if lt {
            r.case(spec("cublaslt_nn_bf16"), Short, &[&c], || {
                cublaslt::gemm(be, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0)
            })?;
        }
        if be.compute_capability() == (9, 0) {
            r.case(spec("gemm_wgmma_nn_bf16"), Short, &[&c], || {
                gemm::wgmma_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, nn_, &c, 1.0, 0.0)
            })?;
            // x·wᵀ, the trainer's forward layout (both operands K-major: the TMA kernel).
            r.case(spec("gemm_wgmma_tma_nt_bf16"), Short, &[&c], || {
                gemm::wgmma_gemm_batched(be, 1, m, nn, k, &a, nn_, &b, gemm::Layout::T, &c, 1.0, 0.0)
            })?;
        }
    }

    epilogue_cases(r, lt)?;

    // Causal flash attention (h_kv = h, as SDPA's), forward and forward + backward.
    for &(b, t, h, d) in ATTN_SHAPES {
        let dims = AttnDims { b, t, h, h_kv: h, d };
        let len = b * t * h * d;
        let (q, k, v) = (random_bf16(be, len, 3)?, random_bf16(be, len, 4)?, random_bf16(be, len, 5)?);
        let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, len)?, random_bf16(be, len, 6)?);
        let lse = DeviceBuffer::<f32>::zeros(be, b * h * t)?;
        let grads =
            [DeviceBuffer::<f32>::zeros(be, len)?, DeviceBuffer::zeros(be, len)?, DeviceBuffer::zeros(be, len)?];
        let flops = 4.0 * (b * h * t * t * d) as f64 / 2.0;
        let fwd = || attention::attention_forward(be, &dims, &q, &k, &v, &out, &lse);
        let spec = Case::spec("attention", "attn fwd", &[b, t, h, d], Some(flops), None).vs(&["sdpa fwd"]);
        r.case(spec, Short, &[&out, &lse], fwd)?;
        let spec = Case::spec("attention", "attn fwd+bwd", &[b, t, h, d], Some(3.5 * flops), None);
        let outputs: [&dyn Output; 5] = [&out, &lse, &grads[0], &grads[1], &grads[2]];
        r.case(spec.vs(&["sdpa fwd+bwd"]), Short, &outputs, || {
            fwd()?;
            attention::attention_backward(be, &dims, &q, &k, &v, &out, &lse, &dout, [&grads[0], &grads[1], &grads[2]])
        })?;
    }

    // RoPE on q and k [8, 1024, 12, 64] in one pass: 2 tensors read and written.
    let (b, t, h, d) = (8, 1024, 12, 64);
    let table = rope::RopeTableGpu::new(be, d, t, 10000.0)?;
    let (q, k) = (random_bf16(be, b * t * h * d, 7)?, random_bf16(be, b * t * h * d, 8)?);
    let bytes = 2.0 * 2.0 * 2.0 * (b * t * h * d) as f64;
    let spec = Case::spec("rope", "rope q+k", &[b, t, h, d], None, Some(bytes)).vs(&["rope eager", "rope compiled"]);
    r.case(spec, Short, &[&q, &k], || rope::rope_inplace(be, &table, &q, &k, (b, t, h, h), false))?;
    // QK-norm fused with RoPE on the same q and k (h_kv = h), one launch per direction. The
    // forward reads q_raw, k_raw and writes q, k (bf16) and one f32 rstd per head; the backward
    // reads q_raw, k_raw, dq, dk (bf16) and the rstd, and writes dq_raw, dk_raw (bf16).
    let (elems, heads) = (2.0 * (b * t * h * d) as f64, 2.0 * (b * t * h) as f64);
    let (qo, ko) = (DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?, DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?);
    let (rq, rk) = (DeviceBuffer::<f32>::zeros(be, b * t * h)?, DeviceBuffer::<f32>::zeros(be, b * t * h)?);
    let dims = (b, t, h, h);
    let bytes = 2.0 * 2.0 * elems + 4.0 * heads;
    let names = ["rope+qknorm eager", "rope+qknorm compiled"];
    let spec = Case::spec("rope", "rope+qknorm fwd", &[b, t, h, d], None, Some(bytes)).vs(&names);
    r.case(spec, Short, &[&qo, &ko, &rq, &rk], || {
        rope::rope_qknorm_forward(be, &table, &q, &k, dims, &qo, &ko, &rq, &rk)
    })?;
    let (dqr, dkr) = (DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?, DeviceBuffer::<bf16>::zeros(be, b * t * h * d)?);
    let bytes = 3.0 * 2.0 * elems + 4.0 * heads;
    let spec = Case::spec("rope", "rope+qknorm bwd", &[b, t, h, d], None, Some(bytes));
    r.case(spec, Short, &[&dqr, &dkr], || {
        rope::rope_qknorm_backward(be, &table, &q, &k, &rq, &rk, &qo, &ko, dims, &dqr, &dkr)
    })?;
    drop((q, k, qo, ko, rq, rk, dqr, dkr));

    // RMSNorm [8192, 768].
    let (rows, dim) = (8192, 768);
    let (x, y) = (random_bf16(be, rows * dim, 9)?, DeviceBuffer::<bf16>::zeros(be, rows * dim)?);
    let rstd = DeviceBuffer::<f32>::zeros(be, rows)?;
    let bytes = 2.0 * 2.0 * (rows * dim) as f64;
    let names = ["rmsnorm eager", "rmsnorm compiled"];
    let spec = Case::spec("rmsnorm", "rmsnorm fwd", &[rows, dim], None, Some(bytes)).vs(&names);
    r.case(spec, Short, &[&y, &rstd], || norm::rmsnorm_forward(be, &x, dim, &y, &rstd))?;
    // LayerNorm (affine; the V3.2 indexer's key norm) on the same [8192, 768]: x read, y written
    let (gamma, beta) = (random_bf16(be, dim, 10)?, random_bf16(be, dim, 11)?);
    let stats = DeviceBuffer::<f32>::zeros(be, 2 * rows)?;
    let names = ["layernorm eager", "layernorm compiled"];
    let spec = Case::spec("layernorm", "layernorm fwd", &[rows, dim], None, Some(bytes)).vs(&names);
    r.case(spec, Short, &[&y, &stats], || norm::layernorm_forward(be, &x, (&gamma, &beta), dim, &y, &stats))?;

    // The residual add (axpby: out = a + b) over 2^26 bf16 values: 2 read, 1 written.
    let n = 1usize << 26;
    let (a, b2, out) = (random_bf16(be, n, 17)?, random_bf16(be, n, 18)?, DeviceBuffer::<bf16>::zeros(be, n)?);
    let spec = Case::spec("elementwise", "axpby (a + b)", &[n], None, Some(3.0 * 2.0 * n as f64));
    r.case(spec.vs(&["add eager"]), Short, &[&out], || elementwise::add(be, &a, &b2, &out))?;
    drop((a, b2, out));

    // Softcap cross-entropy forward over [8192, V] bf16 logits (V = 65536, quick 8192).
    let (rows, vocab) = (8192, if o.quick { 8192 } else { 65536 });
    let z = random_bf16(be, rows * vocab, 10)?;
    let targets: Vec<i32> = (0..rows).map(|i| ((i * 7919) % vocab) as i32).collect();
    let targets = DeviceBuffer::from_host(be, &targets)?;
    let (losses, lse) = (DeviceBuffer::<f32>::zeros(be, rows)?, DeviceBuffer::<f32>::zeros(be, rows)?);
    let bytes = 2.0 * (rows * vocab) as f64;
    let names = ["softcap_ce eager", "softcap_ce compiled"];
    let spec = Case::spec("loss", "softcap_ce fwd", &[rows, vocab], None, Some(bytes)).vs(&names);
    r.case(spec, Short, &[&losses, &lse], || {
        loss::softcap_cross_entropy_forward(be, &z, vocab, &targets, 15.0, &losses, &lse)
    })?;
    drop((z, targets, losses, lse));

    sparse(r, o)
}

/// Dense attention's [b, t, h, d] (h_kv = h), as `torch_baselines.py`'s SDPA cases.
const ATTN_SHAPES: &[(usize, usize, usize, usize)] = &[(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 8192, 16, 128)];

/// Causal score entries (query, key ≤ query) query `i` of `t` sees with at most `keys` keys each
/// (the `keys` most recent, or its top-k).
pub(super) fn visible_capped(t: usize, keys: usize) -> usize {
    (0..t).map(|i| (i + 1).min(keys)).sum()
}

/// Score entries of window + global attention, as `torch_baselines.py` counts them: a window
/// of `w` keys plus the global prefix of `g` keys outside it.
pub(super) fn visible_window(t: usize, w: usize, g: usize) -> usize {
    (0..t).map(|i| (i + 1).min(w) + g.min((i + 1).saturating_sub(w))).sum()
}

/// The cases of `sparse_baselines` in `torch_baselines.py` (same shapes and names), plus DSA.
fn sparse(r: &mut Runner, o: &BenchOptions) -> Result<()> {
    let be = r.be;
    // Window + global attention and dense attention, fwd + bwd, b 1, 16 heads of 128.
    let (b, h, d, window, n_global) = (1, 16, 128, 1024, 64);
    let lengths: &[usize] = if o.quick { &[4096, 16384] } else { &[4096, 16384, 65536] };
    for &t in lengths {
        let wflops = 3.5 * 4.0 * (b * h * visible_window(t, window, n_global) * d) as f64;
        let wshape = [b, t, h, d, window, n_global];
        let wspec = Case::spec("window", "wattn fwd+bwd", &wshape, Some(wflops), None).vs(&["flex_attention fwd+bwd"]);
        let (kind, name) = super::DENSE_ATTN;
        let dflops = 3.5 * 4.0 * (b * h * visible_capped(t, t) * d) as f64;
        let dspec = Case::spec(kind, name, &[b, t, h, d], Some(dflops), None).vs(&["sdpa fwd+bwd"]);
        if !r.any_admitted(&[&wspec, &dspec])? {
            continue; // both reported skipped; nothing allocated
        }
        let len = b * t * h * d;
        let (q, k, v) = (random_bf16(be, len, 11)?, random_bf16(be, len, 12)?, random_bf16(be, len, 13)?);
        let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, len)?, random_bf16(be, len, 14)?);
        let lse = DeviceBuffer::<f32>::zeros(be, b * h * t)?;
        let g = [DeviceBuffer::<f32>::zeros(be, len)?, DeviceBuffer::zeros(be, len)?, DeviceBuffer::zeros(be, len)?];
        let grads = [&g[0], &g[1], &g[2]];

        let outputs: [&dyn Output; 5] = [&out, &lse, &g[0], &g[1], &g[2]];

        let wd = WindowDims { b, t, h, h_kv: h, d, window, n_global };
        r.case(wspec, Long, &outputs, || {
            window_attention::window_attention_forward(be, &wd, &q, &k, &v, &out, &lse)?;
            window_attention::window_attention_backward(be, &wd, &q, &k, &v, &out, &lse, &dout, grads)
        })?;

        let ad = AttnDims { b, t, h, h_kv: h, d };
        r.case(dspec, Long, &outputs, || {
            attention::attention_forward(be, &ad, &q, &k, &v, &out, &lse)?;
            attention::attention_backward(be, &ad, &q, &k, &v, &out, &lse, &dout, grads)
        })?;
    }

    // DSA fwd + bwd at 8K/32K/64K keys, top-k 2048 (no local window): the indexer's top-k,
    // sparse attention forward + backward and the sparse indexer KL (with its gradients).
    // Indexer: 16 heads of 64. The rate counts the sparse attention only (3.5 × 4·h·d per
    // selected (query, key) pair); the comparison with dense attention is by time.
    let topk = 2048;
    let dsa_lengths: &[usize] = if o.quick { &[8192] } else { &[8192, 32768, 65536] };
    for &t in dsa_lengths {
        let flops = 3.5 * 4.0 * (b * h * visible_capped(t, topk) * d) as f64;
        let spec = Case::spec("dsa", "dsa fwd+bwd", &[b, t, h, d], Some(flops), None);
        let spec = spec.vs_dense("attention", &["sdpa fwd+bwd"]);
        let (kind, name) = super::DENSE_ATTN;
        // The engine's dense attention at this length too, when no case above has it (32K),
        // for `speedup_vs_engine_dense`.
        let dense_flops = 3.5 * 4.0 * (b * h * visible_capped(t, t) * d) as f64;
        let dense = Case::spec(kind, name, &[b, t, h, d], Some(dense_flops), None).vs(&["sdpa fwd+bwd"]);
        let dense = (!r.reporter.has(&dense)).then_some(dense);
        let specs: Vec<&Case> = std::iter::once(&spec).chain(dense.as_ref()).collect();
        if !r.any_admitted(&specs)? {
            continue;
        }
        let dims = DsaDims { b, t, h, h_kv: h, d, n_index_heads: 16, index_dim: 64, topk, window: 0 };
        let (ql, kl) = (dims.q_len(), dims.kv_len());
        let (q, k, v) = (random_bf16(be, ql, 21)?, random_bf16(be, kl, 22)?, random_bf16(be, kl, 23)?);
        let (qi, ki, wi) = (
            random_bf16(be, dims.qi_len(), 24)?,
            random_bf16(be, dims.ki_len(), 25)?,
            random_bf16(be, dims.wi_len(), 26)?,
        );
        let sel = DeviceBuffer::<u32>::zeros(be, dims.sel_len())?;
        let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, ql)?, random_bf16(be, ql, 27)?);
        let lse = DeviceBuffer::<f32>::zeros(be, dims.lse_len())?;
        let g = [DeviceBuffer::<f32>::zeros(be, ql)?, DeviceBuffer::zeros(be, kl)?, DeviceBuffer::zeros(be, kl)?];
        let gi = [
            DeviceBuffer::<f32>::zeros(be, dims.qi_len())?,
            DeviceBuffer::zeros(be, dims.ki_len())?,
            DeviceBuffer::zeros(be, dims.wi_len())?,
        ];
        let kl_loss = DeviceBuffer::<f32>::zeros(be, 1)?;
        if let Some(dense) = dense {
            let ad = AttnDims { b, t, h, h_kv: h, d };
            let grads = [&g[0], &g[1], &g[2]];
            let outputs: [&dyn Output; 5] = [&out, &lse, &g[0], &g[1], &g[2]];
            r.case(dense, Long, &outputs, || {
                attention::attention_forward(be, &ad, &q, &k, &v, &out, &lse)?;
                attention::attention_backward(be, &ad, &q, &k, &v, &out, &lse, &dout, grads)
            })?;
        }
        let outputs: [&dyn Output; 9] = [&out, &lse, &g[0], &g[1], &g[2], &gi[0], &gi[1], &gi[2], &kl_loss];
        r.case(spec, Long, &outputs, || {
            dsa::indexer_topk(be, &dims, &qi, &ki, &wi, &sel)?;
            dsa::dsa_attention_forward(be, &dims, &q, &k, &v, &sel, &out, &lse)?;
            dsa::dsa_attention_backward(be, &dims, &q, &k, &v, &sel, &out, &lse, &dout, [&g[0], &g[1], &g[2]])?;
            dsa::indexer_kl(be, &dims, &q, &k, &lse, &qi, &ki, &wi, Some(&sel), [&gi[0], &gi[1], &gi[2]], &kl_loss)
        })?;
    }

    // MoE layer fwd + bwd: router GEMM (follows --gemm), routing, experts, combine, their
    // backward, the router backward and its dx GEMM; weights scaled by 1/√fan-in like torch's.
    let (n, c, e, f, topk) = if o.quick { (8192, 1024, 16, 512, 2) } else { (16384, 2048, 64, 704, 2) };
    let flops = (2 * 3 * n * topk * c * f * 3) as f64; // torch_baselines.py's active FLOPs
    let names = ["torch loop fwd+bwd", "torch grouped_mm fwd+bwd", "dense ffn fwd+bwd"];
    let spec = Case::spec("moe", "moe fwd+bwd", &[n, c, e, f, topk], Some(flops), None).vs(&names);
    if !r.any_admitted(&[&spec])? {
        return Ok(());
    }
    let cfg = RouterConfig {
        n_experts: e,
        top_k: topk,
        n_group: 1,
        topk_group: 1,
        routed_scaling_factor: 1.0,
        score_func: ScoreFunc::Sigmoid,
        capacity_factor: None,
    };
    let (sc, sf) = (1.0 / (c as f32).sqrt(), 1.0 / (f as f32).sqrt());
    let x = random_bf16(be, n * c, 31)?;
    let wr = random_bf16_scaled(be, e * c, 32, sc)?;
    let (wg, wu) = (random_bf16_scaled(be, e * f * c, 33, sc)?, random_bf16_scaled(be, e * f * c, 34, sc)?);
    let wdn = random_bf16_scaled(be, e * c * f, 35, sf)?;
    let bias = DeviceBuffer::<f32>::zeros(be, e)?;
    let (logits, d_logits) = (DeviceBuffer::<f32>::zeros(be, n * e)?, DeviceBuffer::<f32>::zeros(be, n * e)?);
    let d_logits_bf = DeviceBuffer::<bf16>::zeros(be, n * e)?;
    let (out, dout) = (DeviceBuffer::<bf16>::zeros(be, n * c)?, random_bf16(be, n * c, 36)?);
    let dx = DeviceBuffer::<f32>::zeros(be, n * c)?;
    let dw = [
        DeviceBuffer::<f32>::zeros(be, e * f * c)?,
        DeviceBuffer::zeros(be, e * f * c)?,
        DeviceBuffer::zeros(be, e * c * f)?,
    ];
    let d_gates = DeviceBuffer::<f32>::zeros(be, n * topk)?;
    let (nn_, tt_) = (gemm::Layout::N, gemm::Layout::T);
    let outputs: [&dyn Output; 5] = [&out, &dx, &dw[0], &dw[1], &dw[2]];
    r.case(spec, Long, &outputs, || {
        gemm::gemm(be, n, e, c, &x, nn_, &wr, tt_, &logits, 1.0, 0.0)?; // x Rᵀ, R [E, C]
        let routing = moe::route(be, &logits, &bias, &cfg)?;
        let cache = moe::moe_forward(be, &x, n, c, &routing, &wg, &wu, &wdn, f, &out)?;
        moe::moe_backward(
            be,
            &dout,
            n,
            c,
            &routing,
            &wg,
            &wu,
            &wdn,
            f,
            &cache,
            &dx,
            [&dw[0], &dw[1], &dw[2]],
            &d_gates,
        )?;
        moe::router_backward(be, &routing, &d_gates, None, &cfg, &d_logits)?;
        elementwise::cast_f32_bf16(be, &d_logits, &d_logits_bf)?;
        gemm::gemm(be, n, c, e, &d_logits_bf, nn_, &wr, nn_, &dx, 1.0, 1.0) // dx += dlogits R
    })
}
