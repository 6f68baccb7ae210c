//! The device kernel API (`kernels::cuda`) against its CPU twins in `kernels`: every function on
//! the same bf16-exact inputs (uploaded with `DeviceTensor::from_host`), read back with
//! `to_host`. Tolerances as the launch-level groups: element-wise kernels [`Tol::bf16_once`]
//! (embedding exact), the GEMM entry points [`Tol::gemm_bf16`], cross-entropy f32 (1e-5, 1e-4),
//! dense and window attention [`Tol::flash`] / [`Tol::lse`], sparse attention bf16_once / f32,
//! dsa_topk and moe_route identical (scores and gates rtol 1e-6). The attention functions also
//! run MLA's narrower values ((d, dv) = (96, 64), (192, 128)) and the sparse latent MQA
//! (`sparse_attention_latent`, d 576, dv 512, one key head) under the same tolerances.

use super::compare::Tol;
use super::{rand_bf16, Ctx};
use crate::kernels::cuda::{self as gk, DeviceSelection, DeviceTensor, RopeTableGpu};
use crate::kernels::{self, RopeTable, RouterConfig, ScoreFunc};
use crate::Tensor;
use anyhow::Result;

fn rand_t(seed: u64, shape: &[usize], amp: f32) -> Tensor {
    Tensor::from_vec(shape, rand_bf16(seed, shape.iter().product(), amp))
}

/// Deterministic integers in [-amp, amp] (exact in bf16).
fn rand_int(seed: u64, shape: &[usize], amp: i32) -> Tensor {
    let v = rand_bf16(seed, shape.iter().product(), 1.0);
    Tensor::from_vec(shape, v.iter().map(|x| (x * amp as f32).round()).collect())
}

fn put(be: &crate::backend::cuda::CudaBackend, t: &Tensor) -> Result<DeviceTensor> {
    Ok(DeviceTensor::from_host(be, t)?)
}

fn same(ctx: &mut Ctx, what: &str, gpu: &Tensor, cpu: &Tensor, tol: Tol) {
    let shape = format!("{:?}", cpu.shape);
    if gpu.shape != cpu.shape {
        ctx.flag(what, &shape, false, format!("gpu shape {:?}", gpu.shape));
        return;
    }
    ctx.close(what, &shape, &gpu.data, &cpu.data, tol);
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.case("api gemms", "-", gemms);
    ctx.case("api elementwise", "-", elementwise);
    ctx.case("api attention", "-", attentions);
    ctx.case("api sparse attention", "-", sparse);
    ctx.case("api moe_route", "-", moe_route);
    Ok(())
}

fn gemms(ctx: &mut Ctx) -> Result<()> {
    let be = ctx.be;
    let tol = Tol::gemm_bf16(64);
    let (a, b) = (rand_t(1, &[37, 64], 1.0), rand_t(2, &[64, 72], 1.0));
    let c = gk::matmul(be, &put(be, &a)?, &put(be, &b)?)?.to_host()?;
    same(ctx, "api matmul", &c, &kernels::matmul(&a, &b), tol);
    let (x, w) = (rand_t(3, &[2, 19, 64], 1.0), rand_t(4, &[40, 64], 1.0));
    let (gx, gw) = (put(be, &x)?, put(be, &w)?);
    let y = gk::linear(be, &gx, &gw)?.to_host()?;
    same(ctx, "api linear", &y, &kernels::linear(&x, &w), tol);
    let (r, g) = (rand_t(5, &[2, 19, 40], 2.0), rand_t(6, &[2, 19, 40], 3.0));
    let y = gk::linear_residual(be, &gx, &gw, &put(be, &r)?)?.to_host()?;
    same(ctx, "api linear_residual", &y, &kernels::linear_residual(&x, &w, &r), Tol::epilogue(8e-3));
    let y = gk::linear_swiglu(be, &gx, &gw, &put(be, &g)?)?.to_host()?;
    same(ctx, "api linear_swiglu", &y, &kernels::linear_swiglu(&x, &w, &g), Tol::epilogue(8e-3));
    let e = gk::linear_swiglu(be, &gx, &gw, &put(be, &x)?);
    let ok = matches!(&e, Err(e) if e.0.contains("gate [2, 19, 64] must have the output's shape [2, 19, 40]"));
    ctx.flag("api linear_swiglu wrong gate is an error", "[2, 19, 64]", ok, "no or another error");
    Ok(())
}

fn elementwise(ctx: &mut Ctx) -> Result<()> {
    let be = ctx.be;
    let once = Tol::bf16_once();
    let x = rand_t(5, &[3, 7, 128], 2.0);
    let y = gk::rmsnorm(be, &put(be, &x)?, 64)?.to_host()?;
    same(ctx, "api rmsnorm", &y, &kernels::rmsnorm(&x, 64), once);
    let (gamma, beta) = (rand_t(15, &[128], 1.0), rand_t(16, &[128], 0.5));
    let y = gk::layernorm(be, &put(be, &x)?, &put(be, &gamma)?, &put(be, &beta)?)?.to_host()?;
    same(ctx, "api layernorm", &y, &kernels::layernorm(&x, &gamma, &beta), once);
    let (g, u) = (rand_t(6, &[5, 99], 4.0), rand_t(7, &[5, 99], 2.0));
    let y = gk::swiglu(be, &put(be, &g)?, &put(be, &u)?)?.to_host()?;
    same(ctx, "api swiglu", &y, &kernels::swiglu(&g, &u), once);
    let (q, k) = (rand_t(8, &[2, 21, 4, 64], 1.0), rand_t(9, &[2, 21, 2, 64], 1.0));
    let (table, gtable) = (RopeTable::new(64, 32, 10000.0), RopeTableGpu::new(be, 64, 32, 10000.0)?);
    let rq = gk::rope(be, &put(be, &q)?, &gtable)?.to_host()?;
    same(ctx, "api rope", &rq, &kernels::rope(&q, &table), once);
    let (fq, fk) = gk::rope_qk(be, &put(be, &q)?, &put(be, &k)?, &gtable)?;
    same(ctx, "api rope_qk q", &fq.to_host()?, &kernels::rope(&q, &table), once);
    same(ctx, "api rope_qk k", &fk.to_host()?, &kernels::rope(&k, &table), once);
    // QK-norm fused with RoPE: raw heads of amplitude 2 (normalized outputs are O(1))
    let (q, k) = (rand_t(12, &[2, 21, 4, 64], 2.0), rand_t(13, &[2, 21, 2, 64], 2.0));
    let (nq, nk, nrq, nrk) = gk::rope_qknorm(be, &put(be, &q)?, &put(be, &k)?, &gtable)?;
    let (wq, wk, wrq, wrk) = kernels::rope_qknorm(&q, &k, &table);
    same(ctx, "api rope_qknorm q", &nq.to_host()?, &wq, once);
    same(ctx, "api rope_qknorm k", &nk.to_host()?, &wk, once);
    same(ctx, "api rope_qknorm rstd_q", &nrq.to_host()?, &wrq, Tol::f32_math(1e-5, 1e-4));
    same(ctx, "api rope_qknorm rstd_k", &nrk.to_host()?, &wrk, Tol::f32_math(1e-5, 1e-4));
    let emb = rand_t(10, &[50, 24], 1.0);
    let ids = [3u32, 0, 49, 3, 17];
    let out = gk::embedding(be, &DeviceTensor::from_host(be, &emb)?, &ids)?;
    same(ctx, "api embedding", &out.to_host()?, &kernels::embedding(&emb, &ids), Tol::EXACT);
    let logits = rand_t(11, &[2, 9, 136], 6.0);
    let targets: Vec<i32> = (0..18).map(|i| if i % 5 == 4 { -1 } else { i * 31 % 136 }).collect();
    for cap in [0.0, 15.0] {
        let got = gk::softcap_cross_entropy(be, &put(be, &logits)?, &targets, cap)?;
        let want = kernels::softcap_cross_entropy(&logits, &targets, cap);
        ctx.close(&format!("api cross_entropy cap {cap}"), "[2, 9, 136]", &[got], &[want], Tol::f32_math(1e-5, 1e-4));
    }
    Ok(())
}

fn attentions(ctx: &mut Ctx) -> Result<()> {
    let be = ctx.be;
    for (d, dv) in [(64, 64), (128, 128), (96, 64), (192, 128)] {
        let (q, k, v) =
            (rand_t(12, &[2, 75, 4, d], 1.0), rand_t(13, &[2, 75, 2, d], 1.0), rand_t(14, &[2, 75, 2, dv], 1.0));
        let (gq, gk_, gv) = (put(be, &q)?, put(be, &k)?, put(be, &v)?);
        let (out, lse) = gk::causal_attention(be, &gq, &gk_, &gv)?;
        let (wo, wl) = kernels::causal_attention(&q, &k, &v);
        let d = format!("{d}/{dv}");
        same(ctx, &format!("api causal out d{d}"), &out.to_host()?, &wo, Tol::flash(&wo.data));
        same(ctx, &format!("api causal lse d{d}"), &lse.to_host()?, &wl, Tol::lse());
        for (w, g) in [(9, 0), (20, 3), (1, 70)] {
            let (out, lse) = gk::window_attention(be, &gq, &gk_, &gv, w, g)?;
            let (wo, wl) = kernels::window_attention(&q, &k, &v, w, g);
            same(ctx, &format!("api window out d{d} W{w} G{g}"), &out.to_host()?, &wo, Tol::flash(&wo.data));
            same(ctx, &format!("api window lse d{d} W{w} G{g}"), &lse.to_host()?, &wl, Tol::lse());
        }
    }
    Ok(())
}

fn sparse(ctx: &mut Ctx) -> Result<()> {
    let be = ctx.be;
    let (b, t, hi, di) = (2, 90, 4, 32);
    let (qi, ki, wi) = (rand_int(15, &[b, t, hi, di], 3), rand_int(16, &[b, t, di], 3), rand_int(17, &[b, t, hi], 2));
    let (q, k, v) = (rand_t(18, &[b, t, 4, 64], 1.0), rand_t(19, &[b, t, 2, 64], 1.0), rand_t(20, &[b, t, 2, 64], 1.0));
    for (topk, window) in [(8, 4), (0, 5), (100, 0)] {
        let shape = format!("b{b} t{t} k{topk} w{window}");
        let want = kernels::dsa_topk(&qi, &ki, &wi, topk, window);
        let sel = gk::dsa_topk(be, &put(be, &qi)?, &put(be, &ki)?, &put(be, &wi)?, topk, window)?;
        let got = sel.to_host()?;
        ctx.equal("api dsa_topk", &shape, &got.sel, &want.sel);
        ctx.flag("api dsa_topk selection", &shape, got == want, "shape, topk or window differ");
        let (out, lse) = gk::sparse_attention(be, &put(be, &q)?, &put(be, &k)?, &put(be, &v)?, &sel)?;
        let (wo, wl) = kernels::sparse_attention(&q, &k, &v, &want);
        same(ctx, "api sparse out", &out.to_host()?, &wo, Tol::bf16_once());
        same(ctx, "api sparse lse", &lse.to_host()?, &wl, Tol::new(1e-4, 1e-4, 2e-5));
        // an uploaded host selection gives the same
        let uploaded = DeviceSelection::from_host(be, &want)?;
        let (out2, _) = gk::sparse_attention(be, &put(be, &q)?, &put(be, &k)?, &put(be, &v)?, &uploaded)?;
        ctx.repeat("api sparse out, uploaded selection", &shape, &out2.to_host()?.data, &out.to_host()?.data, None);
        // MLA's per-head shape (96, 64), and V3.2's MQA over the latent (576, 512)
        let (q96, k96, v64) =
            (rand_t(21, &[b, t, 2, 96], 1.0), rand_t(22, &[b, t, 2, 96], 1.0), rand_t(23, &[b, t, 2, 64], 1.0));
        let (out, lse) = gk::sparse_attention(be, &put(be, &q96)?, &put(be, &k96)?, &put(be, &v64)?, &sel)?;
        let (wo, wl) = kernels::sparse_attention(&q96, &k96, &v64, &want);
        same(ctx, "api sparse out d96/64", &out.to_host()?, &wo, Tol::bf16_once());
        same(ctx, "api sparse lse d96/64", &lse.to_host()?, &wl, Tol::new(1e-4, 1e-4, 2e-5));
        let (ql, kv) = (rand_t(24, &[b, t, 16, 576], 1.0), rand_t(25, &[b, t, 1, 576], 1.0));
        let (out, lse) = gk::sparse_attention_latent(be, &put(be, &ql)?, &put(be, &kv)?, &sel)?;
        let (wo, wl) = kernels::sparse_attention_latent(&ql, &kv, &want, 512);
        same(ctx, "api sparse_attention_latent out", &out.to_host()?, &wo, Tol::bf16_once());
        same(ctx, "api sparse_attention_latent lse", &lse.to_host()?, &wl, Tol::new(1e-4, 1e-4, 2e-5));
    }
    Ok(())
}

fn moe_route(ctx: &mut Ctx) -> Result<()> {
    let be = ctx.be;
    let cfg = RouterConfig {
        n_experts: 16,
        top_k: 4,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        score_func: ScoreFunc::Sigmoid,
        capacity_factor: Some(1.0),
    };
    let (logits, bias) = (rand_t(21, &[300, 16], 3.0), rand_t(22, &[16], 0.1));
    let want = kernels::moe_route(&logits, &bias, &cfg);
    let (gl, gb) = (DeviceTensor::from_host(be, &logits)?, DeviceTensor::from_host(be, &bias)?);
    let got = gk::moe_route(be, &gl, &gb, &cfg)?.to_host()?;
    let shape = "n300 E16 K4";
    ctx.equal("api moe experts", shape, &got.experts, &want.experts);
    ctx.equal("api moe kept", shape, &got.kept, &want.kept);
    ctx.equal("api moe order", shape, &got.order, &want.order);
    ctx.equal("api moe position", shape, &got.position, &want.position);
    ctx.equal("api moe counts", shape, &got.counts, &want.counts);
    ctx.equal("api moe offsets", shape, &got.offsets, &want.offsets);
    ctx.equal(
        "api moe demand, dropped",
        shape,
        &[(got.demand.clone(), got.dropped)],
        &[(want.demand.clone(), want.dropped)],
    );
    ctx.close("api moe scores", shape, &got.scores, &want.scores, Tol::new(0.0, 1e-6, 1e-6));
    ctx.close("api moe gates", shape, &got.gates, &want.gates, Tol::new(0.0, 1e-6, 1e-6));
    Ok(())
}
