//! GEMM parity: the native kernel (through the process-wide engine switch, as the engine calls
//! it), cuBLASLt, the sm_90a wgmma kernel, and the fused epilogues on every engine, against
//! `cpu::gemm`. Tolerances: [`Tol::gemm_f32`] (C = α·A·B + β·C with f32 output: only the
//! summation order differs), [`Tol::gemm_bf16`] (one more rounding), [`Tol::epilogue`].
//!
//! Shapes: whole tiles, ragged m/n/k edges (partial 128×128 tiles, a k tail inside the last
//! k tile, k over several pipeline stages), batches; shapes under 64 fall back from wgmma to the
//! mma.sync kernel. Every GEMM runs twice: no kernel here adds with atomics, so bitwise.

use super::compare::Tol;
use super::{down, down32, rand_bf16, up, Ctx};
use crate::backend::cpu;
use crate::backend::cpu::gemm::Layout::{self, N, T};
use crate::backend::cuda::gemm::GemmOut;
use crate::backend::cuda::{self, CudaBackend, CudaResult, DeviceBuffer};
use anyhow::Result;
use half::bf16;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Engine {
    /// `cuda::gemm::gemm_batched`: the process-wide engine (native unless `--gemm` chose another).
    Switch,
    Cublaslt,
    Wgmma,
}

#[allow(clippy::too_many_arguments)]
fn call<C: GemmOut>(
    engine: Engine,
    be: &CudaBackend,
    (batch, m, n, k): (usize, usize, usize, usize),
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
    alpha: f32,
    beta: f32,
) -> CudaResult<()> {
    match engine {
        Engine::Switch => cuda::gemm::gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
        Engine::Cublaslt => cuda::cublaslt::gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
        Engine::Wgmma => cuda::gemm::wgmma_gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
    }
}

/// The CPU reference: (2·A·B + 0.5·C, A·B) per batch.
#[allow(clippy::too_many_arguments)]
fn reference(
    dims: (usize, usize, usize, usize),
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    c0: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (batch, m, n, k) = dims;
    let mut plain = vec![0.0; batch * m * n];
    for i in 0..batch {
        let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
        cpu::gemm::gemm(m, n, k, ai, la, bi, lb, &mut plain[i * m * n..(i + 1) * m * n], false);
    }
    let want = c0.iter().zip(&plain).map(|(&c, &p)| 0.5 * c + 2.0 * p).collect();
    (want, plain)
}

/// The four layouts of one engine over `shapes`, f32 output with α, β and bf16 output, twice.
fn layouts(ctx: &mut Ctx, engine: Engine, label: &str, shapes: &[(usize, usize, usize, usize)], seed: u64) {
    for &dims in shapes {
        let (batch, m, n, k) = dims;
        for la in [N, T] {
            for lb in [N, T] {
                let shape = format!("{batch}x{m}x{n}x{k} {la:?}{lb:?}");
                ctx.case(label, &shape, |ctx| {
                    let be = ctx.be;
                    let a = rand_bf16(seed, batch * m * k, 1.0);
                    let b = rand_bf16(seed + 1, batch * k * n, 1.0);
                    let c0 = rand_bf16(seed + 2, batch * m * n, 1.0);
                    let (want, plain) = reference(dims, &a, la, &b, lb, &c0);
                    let (ga, gb) = (up(be, &a)?, up(be, &b)?);
                    let gc = DeviceBuffer::from_host(be, &c0)?;
                    call(engine, be, dims, &ga, la, &gb, lb, &gc, 2.0, 0.5)?;
                    let got = down32(&gc)?;
                    ctx.close(&format!("{label} f32 α,β"), &shape, &got, &want, Tol::gemm_f32(k));
                    // the second call (cuBLASLt: on the cached plan)
                    let gc2 = DeviceBuffer::from_host(be, &c0)?;
                    call(engine, be, dims, &ga, la, &gb, lb, &gc2, 2.0, 0.5)?;
                    ctx.repeat(&format!("{label} f32"), &shape, &down32(&gc2)?, &got, None);
                    // bf16 output, β = 0: C is never read (left uninitialized)
                    let gcb = DeviceBuffer::<bf16>::uninit(be, batch * m * n)?;
                    call(engine, be, dims, &ga, la, &gb, lb, &gcb, 1.0, 0.0)?;
                    ctx.close(&format!("{label} bf16"), &shape, &down(&gcb)?, &plain, Tol::gemm_bf16(k));
                    Ok(())
                });
            }
        }
    }
}

pub fn native(ctx: &mut Ctx) -> Result<()> {
    let shapes: &[(usize, usize, usize, usize)] = if ctx.quick {
        &[(1, 128, 128, 64), (2, 72, 200, 136)]
    } else {
        &[(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520), (2, 1024, 768, 1024)]
    };
    let label = format!("gemm ({})", cuda::gemm::gemm_engine().name());
    layouts(ctx, Engine::Switch, &label, shapes, 14);
    Ok(())
}

pub fn cublaslt(ctx: &mut Ctx) -> Result<()> {
    if let Err(e) = cuda::cublaslt::available() {
        ctx.skip("cublaslt", &e.0);
        return Ok(());
    }
    let shapes: &[(usize, usize, usize, usize)] = if ctx.quick {
        &[(1, 128, 128, 64), (3, 40, 24, 8)]
    } else {
        &[(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520), (3, 40, 24, 8), (2, 1024, 768, 1024)]
    };
    layouts(ctx, Engine::Cublaslt, "cublaslt", shapes, 17);
    ctx.case("cublaslt shape error", "3x3x4", |ctx| {
        let be = ctx.be;
        let (ga, gb) = (up(be, &rand_bf16(20, 12, 1.0))?, up(be, &rand_bf16(21, 12, 1.0))?);
        let gc = DeviceBuffer::<f32>::uninit(be, 9)?;
        let e = cuda::cublaslt::gemm(be, 3, 3, 4, &ga, N, &gb, T, &gc, 1.0, 0.0);
        let ok = matches!(&e, Err(e) if e.0.contains("multiple of 8"));
        ctx.flag("cublaslt k not a multiple of 8 is an error", "3x3x4", ok, format!("{e:?}"));
        Ok(())
    });
    Ok(())
}

pub fn wgmma(ctx: &mut Ctx) -> Result<()> {
    let (major, minor) = ctx.be.compute_capability();
    if (major, minor) != (9, 0) {
        ctx.skip("wgmma", &format!("compute capability {major}.{minor}, wgmma needs 9.0"));
        ctx.case("wgmma refuses", "-", |ctx| {
            let be = ctx.be;
            let (ga, gb) = (up(be, &[0.0; 64])?, up(be, &[0.0; 64])?);
            let gc = DeviceBuffer::<f32>::zeros(be, 64)?;
            let e = cuda::gemm::wgmma_gemm_batched(be, 1, 8, 8, 8, &ga, N, &gb, T, &gc, 1.0, 0.0);
            let ok = matches!(&e, Err(e) if e.0.contains("compute capability 9.0"));
            ctx.flag("wgmma off 9.0 is an error", "1x8x8x8", ok, format!("{e:?}"));
            Ok(())
        });
        return Ok(());
    }
    let shapes: &[(usize, usize, usize, usize)] = if ctx.quick {
        &[(1, 128, 128, 64), (2, 72, 200, 136), (2, 40, 96, 72)]
    } else {
        &[(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520), (3, 256, 384, 1024), (2, 40, 96, 72)]
    };
    let tma = if std::env::var_os("NANOSEEK_WGMMA_NO_TMA").is_some_and(|v| v == "1") { "no TMA" } else { "TMA" };
    for &(_, m, n, k) in shapes {
        let falls_back = !cuda::gemm::wgmma_handles(m, n, k);
        ctx.flag(
            "wgmma_handles",
            &format!("{m}x{n}x{k}"),
            falls_back == (m < 64),
            "the shapes under 64 must fall back",
        );
    }
    layouts(ctx, Engine::Wgmma, &format!("wgmma ({tma})"), shapes, 24);
    Ok(())
}

pub fn epilogues(ctx: &mut Ctx) -> Result<()> {
    use cuda::gemm::GemmEngine;
    let mut engines = vec![GemmEngine::Native];
    if ctx.be.compute_capability() == (9, 0) {
        engines.push(GemmEngine::Wgmma);
    } else {
        ctx.skip("epilogues wgmma", "compute capability is not 9.0");
    }
    match cuda::cublaslt::available() {
        Ok(()) => engines.push(GemmEngine::Cublaslt),
        Err(e) => ctx.skip("epilogues cublaslt", &e.0),
    }
    // The last shape is below wgmma's 64 and falls back to the native kernel.
    let shapes: &[(usize, usize, usize)] = if ctx.quick {
        &[(128, 128, 64), (40, 96, 72)]
    } else {
        &[(128, 128, 64), (72, 200, 136), (264, 136, 520), (40, 96, 72), (1024, 768, 512)]
    };
    for engine in engines {
        for &(m, n, k) in shapes {
            let shape = format!("{m}x{n}x{k}");
            ctx.case(&format!("epilogues {}", engine.name()), &shape, |ctx| epilogue_case(ctx, engine, m, n, k));
        }
    }
    ctx.case("epilogue size error", "8x8x8", |ctx| {
        let be = ctx.be;
        let (gx, small) = (up(be, &[0.0; 64])?, up(be, &[0.0; 8])?);
        let epi = cuda::gemm::Epilogue::Residual { resid: &small, out: &small };
        let e = cuda::gemm::gemm_fused_on(be, GemmEngine::Native, 8, 8, 8, &gx, &gx, epi);
        let ok = matches!(&e, Err(e) if e.0.contains("resid must hold m*n"));
        ctx.flag("epilogue wrong sizes are errors", "8x8x8", ok, format!("{e:?}"));
        Ok(())
    });
    Ok(())
}

fn epilogue_case(ctx: &mut Ctx, engine: cuda::gemm::GemmEngine, m: usize, n: usize, k: usize) -> Result<()> {
    use cuda::gemm::{gemm_fused_on, gemm_swiglu_backward_on, Epilogue};
    let be = ctx.be;
    let (shape, name) = (format!("{m}x{n}x{k}"), engine.name());
    let (x, w) = (rand_bf16(31, m * k, 1.0), rand_bf16(32, n * k, 1.0));
    let (resid, gate) = (rand_bf16(33, m * n, 2.0), rand_bf16(34, m * n, 3.0));
    let mut want = vec![0.0; m * n];
    cpu::gemm::gemm_fused(m, n, k, &x, &w, cpu::gemm::Epilogue::Residual { resid: &resid, out: &mut want });
    let (mut want_act, mut want_up) = (vec![0.0; m * n], vec![0.0; m * n]);
    let epi = cpu::gemm::Epilogue::SwiGlu { gate: &gate, act: &mut want_act, up: Some(&mut want_up) };
    cpu::gemm::gemm_fused(m, n, k, &x, &w, epi);
    let tol = Tol::epilogue(1e-3 * (k as f32).sqrt());

    let (gx, gw, gr, gg) = (up(be, &x)?, up(be, &w)?, up(be, &resid)?, up(be, &gate)?);
    let out = DeviceBuffer::<bf16>::uninit(be, m * n)?;
    gemm_fused_on(be, engine, m, n, k, &gx, &gw, Epilogue::Residual { resid: &gr, out: &out })?;
    let got = down(&out)?;
    ctx.close(&format!("{name} residual"), &shape, &got, &want, tol);
    gemm_fused_on(be, engine, m, n, k, &gx, &gw, Epilogue::Residual { resid: &gr, out: &out })?;
    ctx.repeat(&format!("{name} residual"), &shape, &down(&out)?, &got, None);
    // in place: the residual stream itself receives the product
    gemm_fused_on(be, engine, m, n, k, &gx, &gw, Epilogue::Residual { resid: &gr, out: &gr })?;
    ctx.close(&format!("{name} residual in place"), &shape, &down(&gr)?, &want, tol);

    let (act, upb) = (DeviceBuffer::uninit(be, m * n)?, DeviceBuffer::uninit(be, m * n)?);
    gemm_fused_on(be, engine, m, n, k, &gx, &gw, Epilogue::SwiGlu { gate: &gg, act: &act, up: Some(&upb) })?;
    let got_act = down(&act)?;
    ctx.close(&format!("{name} swiglu act"), &shape, &got_act, &want_act, tol);
    ctx.close(&format!("{name} swiglu up"), &shape, &down(&upb)?, &want_up, tol);
    act.fill_zero()?;
    gemm_fused_on(be, engine, m, n, k, &gx, &gw, Epilogue::SwiGlu { gate: &gg, act: &act, up: None })?;
    ctx.repeat(&format!("{name} swiglu act (no up)"), &shape, &down(&act)?, &got_act, None);

    // SwiGLU's backward: da = dy[m,n]·w_down[n,k] (NN) straight into (dg, du), [m, k]
    let (dy, wd) = (rand_bf16(35, m * n, 1.0), rand_bf16(36, n * k, 1.0));
    let (g2, u2) = (rand_bf16(37, m * k, 3.0), rand_bf16(38, m * k, 2.0));
    let (mut want_dg, mut want_du) = (vec![0.0; m * k], vec![0.0; m * k]);
    cpu::gemm::gemm_swiglu_backward(m, k, n, &dy, &wd, (&g2, &u2), (&mut want_dg, &mut want_du));
    let (gdy, gwd, gg2, gu2) = (up(be, &dy)?, up(be, &wd)?, up(be, &g2)?, up(be, &u2)?);
    let (dg, du) = (DeviceBuffer::uninit(be, m * k)?, DeviceBuffer::uninit(be, m * k)?);
    gemm_swiglu_backward_on(be, engine, m, k, n, &gdy, &gwd, (&gg2, &gu2), (&dg, &du))?;
    // |∂act/∂g| ≤ 1.1·|u| and |∂act/∂u| ≤ |g| (amplitudes 2 and 3): the GEMM's error scaled by a few
    let tol_bwd = Tol::epilogue(4.0 * 1e-3 * (n as f32).sqrt());
    let got_dg = down(&dg)?;
    ctx.close(&format!("{name} swiglu bwd dg"), &shape, &got_dg, &want_dg, tol_bwd);
    ctx.close(&format!("{name} swiglu bwd du"), &shape, &down(&du)?, &want_du, tol_bwd);
    gemm_swiglu_backward_on(be, engine, m, k, n, &gdy, &gwd, (&gg2, &gu2), (&dg, &du))?;
    ctx.repeat(&format!("{name} swiglu bwd dg"), &shape, &down(&dg)?, &got_dg, None);
    Ok(())
}

/// The GEMM tolerances tell a right kernel from a wrong one, on the host.
#[cfg(test)]
mod host_tests {
    use super::super::compare::{compare, round_bf16, Tol};
    use super::*;

    /// A GEMM as a GPU kernel computes it: exact products, summed in another order (k descending,
    /// in two interleaved f32 partial sums), the bf16 output rounded once.
    fn emulate(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s0, mut s1) = (0.0f32, 0.0f32);
                for p in (0..k).rev() {
                    let v = a[i * k + p] * b[p * n + j];
                    if p % 2 == 0 {
                        s0 += v
                    } else {
                        s1 += v
                    }
                }
                c[i * n + j] = s0 + s1;
            }
        }
        c
    }

    #[test]
    fn right_gemms_pass_and_wrong_ones_fail() {
        let (m, n, k) = (192, 160, 520);
        let (a, b) = (rand_bf16(1, m * k, 1.0), rand_bf16(2, k * n, 1.0));
        let (want, _) = reference((1, m, n, k), &a, N, &b, N, &vec![0.0; m * n]);
        let want: Vec<f32> = want.iter().map(|x| x / 2.0).collect();
        let f32_out = emulate(m, n, k, &a, &b);
        let s = compare(&f32_out, &want, Tol::gemm_f32(k));
        assert!(s.pass && s.margin < 0.5, "f32 emulation: {s:?}");
        let bf16_out: Vec<f32> = f32_out.iter().map(|&x| round_bf16(x)).collect();
        let s = compare(&bf16_out, &want, Tol::gemm_bf16(k));
        assert!(s.pass && s.rel_err < 0.5 * Tol::gemm_bf16(k).norm as f64, "bf16 emulation: {s:?}");

        let mut wrong: Vec<(&str, Vec<f32>)> = vec![
            ("all zero", vec![0.0; m * n]),
            ("scaled by 0.5", bf16_out.iter().map(|x| 0.5 * x).collect()),
            ("one 64x64 tile zeroed", {
                let mut c = bf16_out.clone();
                for i in 64..128 {
                    c[i * n + 64..i * n + 128].fill(0.0);
                }
                c
            }),
            ("k tail dropped", {
                let (a2, b2): (Vec<f32>, Vec<f32>) =
                    ((0..m * k).map(|i| if i % k == k - 1 { 0.0 } else { a[i] }).collect(), b.clone());
                emulate(m, n, k, &a2, &b2).iter().map(|&x| round_bf16(x)).collect()
            }),
        ];
        // B read as transposed (a layout bug), on a square problem
        let (sq, aa, bb) = (128, rand_bf16(3, 128 * 128, 1.0), rand_bf16(4, 128 * 128, 1.0));
        let (want_sq, _) = reference((1, sq, sq, sq), &aa, N, &bb, N, &vec![0.0; sq * sq]);
        let want_sq: Vec<f32> = want_sq.iter().map(|x| x / 2.0).collect();
        let (_, transposed) = reference((1, sq, sq, sq), &aa, N, &bb, T, &vec![0.0; sq * sq]);
        let s = compare(&transposed, &want_sq, Tol::gemm_bf16(sq));
        assert!(!s.pass, "transposed B must fail: {s:?}");
        for (what, got) in wrong.drain(..) {
            let s = compare(&got, &want, Tol::gemm_bf16(k));
            assert!(!s.pass, "{what} must fail: {s:?}");
            assert!(s.rel_err > 2.0 * Tol::gemm_bf16(k).norm as f64, "{what}: the norm alone catches it: {s:?}");
        }
    }
}
