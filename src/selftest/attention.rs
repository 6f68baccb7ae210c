//! Flash attention parity: the dense causal family (`cuda/attention.cu`) and the window family
//! (`cuda/window_attention.cu`, the same flash bodies with another mask) against
//! `cpu::attention` and `cpu::window_attention`.
//!
//! Tolerances: [`Tol::flash`] for out, dq, dk, dv (P and dS rounded to bf16 before their
//! products, out rounded), [`Tol::lse`] for lse. The CPU backward runs on the GPU's bf16 out so
//! both sides use the same delta = rowsum(dout ⊙ out). Each case runs twice: out, lse, dk and dv
//! bitwise (written once per tile, no atomics), dq at f32 summation-order tolerance (its tiles
//! are added with atomics in an unspecified order). Full mode reaches T ≥ 1024 (many 64-row
//! tiles), b = 2, d = 128 and grouped-query heads; the window's dense limits (W ≥ T, G ≥ T) must
//! equal the dense kernels. MLA's head shapes (d_qk, d_v) = (96, 64) and (192, 128) run the same
//! rows with values narrower than keys (the CPU's `_dv` twins): the error model is unchanged
//! (the same bf16 roundings of P, dS and out; each output element sums over keys, not over the
//! head width, and dq, dk sum d_v-long dO·V products rounded once in dS).

use super::compare::{Tol, U_BF16};
use super::{atomics_rerun, down, down32, rand_bf16, up, Ctx};
use crate::backend::cpu;
use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::window_attention::WindowDims;
use crate::backend::cuda::{self, CudaBackend, DeviceBuffer};
use anyhow::Result;
use half::bf16;

/// One GPU forward + backward: out, lse, [dq, dk, dv].
struct Flash {
    out: Vec<f32>,
    lse: Vec<f32>,
    grads: [Vec<f32>; 3],
}

/// q, k, v, dout of a problem with values `dv` wide: uniform in [-1, 1), bf16-exact.
fn inputs(dims: &AttnDims, dv: usize, seed: u64) -> [Vec<f32>; 4] {
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    let (ol, vl) = (ql / dims.d * dv, kl / dims.d * dv);
    [rand_bf16(seed, ql, 1.0), rand_bf16(seed + 1, kl, 1.0), rand_bf16(seed + 2, vl, 1.0), rand_bf16(seed + 3, ol, 1.0)]
}

/// The GPU buffers of one run: (q, k, v, dout), out, lse, and [dq, dk, dv] filled with garbage
/// (the backward must overwrite dk and dv, and zero dq itself).
type Bufs = ([DeviceBuffer<bf16>; 4], DeviceBuffer<bf16>, DeviceBuffer<f32>, [DeviceBuffer<f32>; 3]);

fn buffers(be: &CudaBackend, dims: &AttnDims, dv: usize, x: &[Vec<f32>; 4]) -> Result<Bufs> {
    let ins = [up(be, &x[0])?, up(be, &x[1])?, up(be, &x[2])?, up(be, &x[3])?];
    let go = DeviceBuffer::<bf16>::uninit(be, x[3].len())?;
    let gl = DeviceBuffer::<f32>::uninit(be, dims.lse_len())?;
    let gdq = DeviceBuffer::<f32>::from_host(be, &vec![f32::NAN; dims.q_len()])?;
    let gdk = DeviceBuffer::<f32>::from_host(be, &vec![7.0; dims.kv_len()])?;
    let gdv = DeviceBuffer::<f32>::from_host(be, &vec![-3.0; dims.kv_len() / dims.d * dv])?;
    Ok((ins, go, gl, [gdq, gdk, gdv]))
}

fn finish(go: &DeviceBuffer<bf16>, gl: &DeviceBuffer<f32>, g: &[DeviceBuffer<f32>; 3]) -> Result<Flash> {
    Ok(Flash { out: down(go)?, lse: down32(gl)?, grads: [down32(&g[0])?, down32(&g[1])?, down32(&g[2])?] })
}

fn run_dense(be: &CudaBackend, dims: &AttnDims, dv: usize, x: &[Vec<f32>; 4]) -> Result<Flash> {
    let ([gq, gk, gv, gdo], go, gl, g) = buffers(be, dims, dv, x)?;
    cuda::attention::attention_forward_dv(be, dims, dv, &gq, &gk, &gv, &go, &gl)?;
    cuda::attention::attention_backward_dv(be, dims, dv, &gq, &gk, &gv, &go, &gl, &gdo, [&g[0], &g[1], &g[2]])?;
    finish(&go, &gl, &g)
}

fn run_window(be: &CudaBackend, dims: &WindowDims, dv: usize, x: &[Vec<f32>; 4]) -> Result<Flash> {
    let ad = AttnDims { b: dims.b, t: dims.t, h: dims.h, h_kv: dims.h_kv, d: dims.d };
    let ([gq, gk, gv, gdo], go, gl, g) = buffers(be, &ad, dv, x)?;
    cuda::window_attention::window_attention_forward_dv(be, dims, dv, &gq, &gk, &gv, &go, &gl)?;
    let gr = [&g[0], &g[1], &g[2]];
    cuda::window_attention::window_attention_backward_dv(be, dims, dv, &gq, &gk, &gv, &go, &gl, &gdo, gr)?;
    finish(&go, &gl, &g)
}

/// The CPU reference (forward, then the backward on `gpu_out`), as (out, lse, [dq, dk, dv]).
type CpuFlash = (Vec<f32>, Vec<f32>, [Vec<f32>; 3]);

fn cpu_dense(dims: &AttnDims, dw: usize, x: &[Vec<f32>; 4], gpu_out: &[f32]) -> CpuFlash {
    let (mut out, mut lse) = (vec![0.0; x[3].len()], vec![0.0; dims.lse_len()]);
    cpu::attention::attention_forward_dv(dims, dw, &x[0], &x[1], &x[2], &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; x[0].len()], vec![0.0; x[1].len()], vec![0.0; x[2].len()]);
    let ins: [&[f32]; 5] = [&x[0], &x[1], &x[2], gpu_out, &lse];
    cpu::attention::attention_backward_dv(dims, dw, ins, &x[3], [&mut dq, &mut dk, &mut dv]);
    (out, lse, [dq, dk, dv])
}

fn cpu_window(dims: &WindowDims, dw: usize, x: &[Vec<f32>; 4], gpu_out: &[f32]) -> CpuFlash {
    let (mut out, mut lse) = (vec![0.0; x[3].len()], vec![0.0; dims.lse_len()]);
    cpu::window_attention::window_attention_forward_dv(dims, dw, &x[0], &x[1], &x[2], &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; x[0].len()], vec![0.0; x[1].len()], vec![0.0; x[2].len()]);
    let ins: [&[f32]; 5] = [&x[0], &x[1], &x[2], gpu_out, &lse];
    cpu::window_attention::window_attention_backward_dv(dims, dw, ins, &x[3], [&mut dq, &mut dk, &mut dv]);
    (out, lse, [dq, dk, dv])
}

/// The rows of one flash case: GPU against CPU, then the rerun against the first run.
fn check_flash(ctx: &mut Ctx, label: &str, shape: &str, gpu: &Flash, rerun: &Flash, want: &CpuFlash) {
    ctx.close(&format!("{label} out"), shape, &gpu.out, &want.0, Tol::flash(&want.0));
    ctx.close(&format!("{label} lse"), shape, &gpu.lse, &want.1, Tol::lse());
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        ctx.close(&format!("{label} {name}"), shape, &gpu.grads[i], &want.2[i], Tol::flash(&want.2[i]));
    }
    ctx.repeat(&format!("{label} out"), shape, &rerun.out, &gpu.out, None);
    ctx.repeat(&format!("{label} lse"), shape, &rerun.lse, &gpu.lse, None);
    ctx.repeat(&format!("{label} dq"), shape, &rerun.grads[0], &gpu.grads[0], Some(atomics_rerun(&gpu.grads[0])));
    ctx.repeat(&format!("{label} dk"), shape, &rerun.grads[1], &gpu.grads[1], None);
    ctx.repeat(&format!("{label} dv"), shape, &rerun.grads[2], &gpu.grads[2], None);
}

pub fn dense(ctx: &mut Ctx) -> Result<()> {
    // (dims, d_v): GQA's d_v = d, and MLA's (96, 64) and (192, 128) (one key head per query head)
    let ad = |b, t, h, h_kv, d, dv| (AttnDims { b, t, h, h_kv, d }, dv);
    let mut cases = vec![
        ad(2, 100, 4, 2, 64, 64),
        ad(1, 130, 2, 1, 128, 128),
        ad(1, 64, 3, 3, 64, 64),
        ad(2, 100, 2, 2, 96, 64),
        ad(1, 130, 2, 2, 192, 128),
    ];
    if !ctx.quick {
        cases.extend([ad(2, 1024, 8, 2, 128, 128), ad(2, 1100, 4, 1, 64, 64), ad(1, 2048, 4, 2, 128, 128)]);
        cases.extend([ad(2, 1024, 4, 4, 96, 64), ad(1, 1100, 4, 4, 192, 128), ad(1, 300, 4, 2, 192, 128)]);
    }
    for (n, (dims, dv)) in cases.into_iter().enumerate() {
        let shape = format!("b{} t{} h{}/{} d{} dv{dv}", dims.b, dims.t, dims.h, dims.h_kv, dims.d);
        ctx.case("attention", &shape, |ctx| {
            let x = inputs(&dims, dv, 17 + 4 * n as u64);
            let gpu = run_dense(ctx.be, &dims, dv, &x)?;
            let rerun = run_dense(ctx.be, &dims, dv, &x)?;
            let want = cpu_dense(&dims, dv, &x, &gpu.out);
            check_flash(ctx, "attention", &shape, &gpu, &rerun, &want);
            Ok(())
        });
    }
    Ok(())
}

pub fn window(ctx: &mut Ctx) -> Result<()> {
    let wd = |b, t, h, h_kv, d, window, n_global| (WindowDims { b, t, h, h_kv, d, window, n_global }, d);
    let mla = |b, t, h, d, dv, window, n_global| (WindowDims { b, t, h, h_kv: h, d, window, n_global }, dv);
    let mut cases = vec![
        wd(2, 200, 4, 2, 64, 48, 0),     // GQA, G = 0, W and T not multiples of 64
        wd(1, 300, 2, 1, 64, 100, 70),   // separate prefix and window ranges, both partial tiles
        wd(1, 130, 2, 1, 128, 64, 16),   // d = 128
        mla(1, 300, 2, 96, 64, 100, 70), // MLA head_dim 64: (d_qk, d_v) = (96, 64)
        mla(1, 200, 2, 192, 128, 48, 3), // MLA head_dim 128: (192, 128)
    ];
    if !ctx.quick {
        cases.extend([
            wd(1, 333, 2, 2, 64, 1, 1),      // each query sees itself and token 0
            wd(1, 520, 2, 1, 64, 64, 64),    // tile-aligned W and G
            wd(2, 257, 4, 1, 128, 17, 3),    // d = 128, GQA 4:1, small W and G
            wd(1, 400, 2, 1, 128, 150, 0),   // d = 128, window across three key tiles
            wd(2, 1024, 8, 2, 128, 300, 64), // T ≥ 1024, b > 1, d = 128, GQA
            wd(2, 1100, 4, 1, 64, 256, 0),
            mla(2, 1024, 4, 96, 64, 300, 64),
            mla(1, 1100, 2, 192, 128, 256, 0),
        ]);
    }
    for (n, (dims, dv)) in cases.into_iter().enumerate() {
        let shape = format!(
            "b{} t{} h{}/{} d{} dv{dv} W{} G{}",
            dims.b, dims.t, dims.h, dims.h_kv, dims.d, dims.window, dims.n_global
        );
        ctx.case("window", &shape, |ctx| {
            let ad = AttnDims { b: dims.b, t: dims.t, h: dims.h, h_kv: dims.h_kv, d: dims.d };
            let x = inputs(&ad, dv, 30 + 4 * n as u64);
            let gpu = run_window(ctx.be, &dims, dv, &x)?;
            let rerun = run_window(ctx.be, &dims, dv, &x)?;
            let want = cpu_window(&dims, dv, &x, &gpu.out);
            check_flash(ctx, "window", &shape, &gpu, &rerun, &want);
            Ok(())
        });
    }
    // W ≥ T and G ≥ T both make every causal key visible: the dense kernels' results (same
    // tiles, same arithmetic: bitwise but for dq's atomics order).
    let limits: &[(usize, usize, usize, usize)] = if ctx.quick {
        &[(100, 64, 100, 0)]
    } else {
        &[(100, 64, 100, 0), (130, 128, 1000, 0), (150, 64, 3, 150), (70, 128, 1, 5000)]
    };
    for (n, &(t, d, window, n_global)) in limits.iter().enumerate() {
        let dims = WindowDims { b: 1, t, h: 4, h_kv: 2, d, window, n_global };
        let shape = format!("b1 t{t} h4/2 d{d} W{window} G{n_global}");
        ctx.case("window = dense", &shape, |ctx| {
            let ad = AttnDims { b: 1, t, h: 4, h_kv: 2, d };
            let x = inputs(&ad, d, 60 + 4 * n as u64);
            let gpu = run_window(ctx.be, &dims, d, &x)?;
            let dense = run_dense(ctx.be, &ad, d, &x)?;
            // expected bitwise equal; allowed one bf16 rounding of out and f32 noise elsewhere
            let (out_tol, f32_tol) = (Tol::new(1e-6, U_BF16, U_BF16), Tol::new(1e-5, 1e-5, 1e-5));
            ctx.close("full window out vs dense", &shape, &gpu.out, &dense.out, out_tol);
            ctx.close("full window lse vs dense", &shape, &gpu.lse, &dense.lse, Tol::new(1e-6, 1e-6, 1e-6));
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let what = format!("full window {name} vs dense");
                ctx.close(&what, &shape, &gpu.grads[i], &dense.grads[i], f32_tol);
            }
            Ok(())
        });
    }
    Ok(())
}

/// The flash tolerances tell a right kernel from a wrong one, on the host.
#[cfg(test)]
mod host_tests;
