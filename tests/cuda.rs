//! CUDA kernels against their CPU twins (`src/backend/cpu/`), forward and backward.
//!
//! Every test needs a CUDA device: without one it prints a loud
//! `SKIPPED: no CUDA device (reason)` line on stderr (not captured by the test
//! harness) and returns, so `cargo test` passes on machines without a GPU.
//!
//! Method: random inputs are rounded to bf16 first, the CPU reference runs in
//! f32 on exactly those values, and the GPU result (bf16 or f32) is compared
//! with |gpu − cpu| ≤ atol + rtol·|cpu|. Tolerances, by what the GPU rounds:
//! - bf16 outputs of element-wise kernels (rope, rmsnorm, swiglu, embedding,
//!   cross-entropy gradient): rtol 1e-2, atol 1e-2 × the typical magnitude
//!   (bf16 has an 8-bit mantissa: one rounding is ≤ 2⁻⁹ ≈ 2e-3 relative);
//! - f32 outputs from f32 math (loss, lse, AdamW, grad norm): rtol 1e-4, atol 1e-5;
//! - GEMM with f32 output: only the summation order differs: rtol 1e-3, atol 1e-3·√k
//!   (the same for cuBLASLt, `--gemm cublaslt`, and the sm_90a wgmma kernel, `--gemm wgmma`;
//!   bf16 output: rtol 1e-2); the fused epilogues (residual add, SwiGLU) round once more
//!   to bf16 and keep those tolerances; SwiGLU's backward multiplies the product by factors
//!   up to |u|·1.1 and |g| (amplitudes 2 and 3): atol 4e-3·√k;
//! - rope_qknorm (QK-norm fused with RoPE): bf16 q, k and dq_raw, dk_raw are one rounding of
//!   f32 math on O(1) values (raw heads of amplitude 2, so rstd ≈ 0.9 and the normalized,
//!   rotated heads and the gradients of amplitude-1 dq, dk are O(1)): atol = rtol = 1e-2, as the
//!   element-wise kernels; rstd is f32 math on both sides (rsqrtf vs 1/sqrt, a warp-shuffle
//!   sum vs the CPU's 8-lane dot): atol 1e-5, rtol 1e-4, as rmsnorm's;
//! - attention: P is rounded to bf16 before P·V (as in every flash kernel):
//!   atol 2e-2, rtol 2e-2 on out and the gradients, 1e-3 on lse.

use half::bf16;
use nanoseek::backend::cpu;
use nanoseek::backend::cuda::{self, CudaBackend, DeviceBuffer};
use std::io::Write;

// The sparse-attention and MoE families, one module each (they share the helpers below).
#[path = "cuda/dsa.rs"]
mod dsa;
#[path = "cuda/kernels_api.rs"]
mod kernels_api;
#[path = "cuda/moe.rs"]
mod moe;
#[path = "cuda/window_attention.rs"]
mod window_attention;

/// One write straight to stderr (the harness captures only the print macros).
fn skipped(why: &str, test: &str) {
    let line = format!("SKIPPED: no CUDA device ({why}) [{test}]\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn device(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(why) => {
            skipped(&why.0, test);
            None
        }
    }
}

/// Deterministic uniform values in [-amp, amp), already rounded to bf16.
fn rand_bf16(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32((2.0 * u - 1.0) * amp).to_f32()
        })
        .collect()
}

fn to_bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn up(be: &CudaBackend, v: &[f32]) -> DeviceBuffer<bf16> {
    DeviceBuffer::from_host(be, &to_bf(v)).unwrap()
}

fn down(b: &DeviceBuffer<bf16>) -> Vec<f32> {
    b.to_host().unwrap().iter().map(|x| x.to_f32()).collect()
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess.is_nan() || excess > worst {
            (worst, at) = (if excess.is_nan() { f32::INFINITY } else { excess }, i);
        }
    }
    assert!(worst <= 0.0, "{what}: element {at}: gpu {} vs cpu {} (atol {atol}, rtol {rtol})", got[at], want[at]);
}

#[test]
fn rope_matches_cpu() {
    let Some(be) = device("rope") else { return };
    let (b, t, h, h_kv, d) = (2, 37, 4, 2, 64);
    let q = rand_bf16(1, b * t * h * d, 1.0);
    let k = rand_bf16(2, b * t * h_kv * d, 1.0);
    let cpu_table = cpu::rope::RopeTable::new(d, 64, 10000.0);
    let table = cuda::rope::RopeTableGpu::new(&be, d, 64, 10000.0).unwrap();
    for inverse in [false, true] {
        let (gq, gk) = (up(&be, &q), up(&be, &k));
        let (oq, ok) = (DeviceBuffer::uninit(&be, q.len()).unwrap(), DeviceBuffer::uninit(&be, k.len()).unwrap());
        cuda::rope::rope(&be, &table, &gq, &gk, &oq, &ok, (b, t, h, h_kv), inverse).unwrap();
        let (mut wq, mut wk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
        let f = if inverse { cpu::rope::rope_backward } else { cpu::rope::rope_forward };
        f(&cpu_table, &q, b, t, h, &mut wq);
        f(&cpu_table, &k, b, t, h_kv, &mut wk);
        assert_close("rope q", &down(&oq), &wq, 1e-2, 1e-2);
        assert_close("rope k", &down(&ok), &wk, 1e-2, 1e-2);
        // in place gives the same
        cuda::rope::rope_inplace(&be, &table, &gq, &gk, (b, t, h, h_kv), inverse).unwrap();
        assert_eq!(down(&gq), down(&oq));
    }
}

#[test]
fn rope_qknorm_matches_cpu() {
    let Some(be) = device("rope_qknorm") else { return };
    // GQA (h ≠ h_kv), odd t below the table's 64, both training head dims.
    for (b, t, h, h_kv, d) in [(2, 37, 4, 2, 64), (3, 19, 6, 1, 128)] {
        let (nq, nk, nrq, nrk) = (b * t * h * d, b * t * h_kv * d, b * t * h, b * t * h_kv);
        let (q, k) = (rand_bf16(20, nq, 2.0), rand_bf16(21, nk, 2.0));
        let (dq, dk) = (rand_bf16(22, nq, 1.0), rand_bf16(23, nk, 1.0));
        let cpu_table = cpu::rope::RopeTable::new(d, 64, 10000.0);
        let table = cuda::rope::RopeTableGpu::new(&be, d, 64, 10000.0).unwrap();
        let dims = (b, t, h, h_kv);
        let (mut wq, mut wk, mut wrq, mut wrk) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nrq], vec![0.0; nrk]);
        cpu::rope::rope_qknorm_forward(&cpu_table, &q, &k, dims, &mut wq, &mut wk, &mut wrq, &mut wrk);
        let (mut wdq, mut wdk) = (vec![0.0; nq], vec![0.0; nk]);
        cpu::rope::rope_qknorm_backward(&cpu_table, &q, &k, &wrq, &wrk, &dq, &dk, dims, &mut wdq, &mut wdk);

        let (gq, gk) = (up(&be, &q), up(&be, &k));
        let (oq, ok) = (DeviceBuffer::uninit(&be, nq).unwrap(), DeviceBuffer::uninit(&be, nk).unwrap());
        let (rq, rk) = (DeviceBuffer::<f32>::uninit(&be, nrq).unwrap(), DeviceBuffer::<f32>::uninit(&be, nrk).unwrap());
        cuda::rope::rope_qknorm_forward(&be, &table, &gq, &gk, dims, &oq, &ok, &rq, &rk).unwrap();
        let (gdq, gdk) = (DeviceBuffer::uninit(&be, nq).unwrap(), DeviceBuffer::uninit(&be, nk).unwrap());
        let (udq, udk) = (up(&be, &dq), up(&be, &dk));
        cuda::rope::rope_qknorm_backward(&be, &table, &gq, &gk, &rq, &rk, &udq, &udk, dims, &gdq, &gdk).unwrap();

        let tag = |what: &str| format!("rope_qknorm d {d} {what}");
        assert_close(&tag("q"), &down(&oq), &wq, 1e-2, 1e-2);
        assert_close(&tag("k"), &down(&ok), &wk, 1e-2, 1e-2);
        assert_close(&tag("rstd_q"), &rq.to_host().unwrap(), &wrq, 1e-5, 1e-4);
        assert_close(&tag("rstd_k"), &rk.to_host().unwrap(), &wrk, 1e-5, 1e-4);
        assert_close(&tag("dq_raw"), &down(&gdq), &wdq, 1e-2, 1e-2);
        assert_close(&tag("dk_raw"), &down(&gdk), &wdk, 1e-2, 1e-2);
    }
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(be) = device("rmsnorm") else { return };
    for &(rows, dim) in &[(5, 64), (33, 768), (3, 4104)] {
        let x = rand_bf16(3, rows * dim, 2.0);
        let dy = rand_bf16(4, rows * dim, 1.0);
        let (mut y, mut rstd, mut dx) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; x.len()]);
        cpu::norm::rmsnorm_forward(&x, dim, &mut y, &mut rstd);
        cpu::norm::rmsnorm_backward(&x, &rstd, &dy, dim, &mut dx);
        let gx = up(&be, &x);
        let (gy, gr) = (DeviceBuffer::uninit(&be, x.len()).unwrap(), DeviceBuffer::<f32>::uninit(&be, rows).unwrap());
        cuda::norm::rmsnorm_forward(&be, &gx, dim, &gy, &gr).unwrap();
        let gdx = DeviceBuffer::uninit(&be, x.len()).unwrap();
        cuda::norm::rmsnorm_backward(&be, &gx, &gr, &up(&be, &dy), dim, &gdx).unwrap();
        assert_close("rmsnorm y", &down(&gy), &y, 1e-2, 1e-2);
        assert_close("rmsnorm rstd", &gr.to_host().unwrap(), &rstd, 1e-5, 1e-4);
        assert_close("rmsnorm dx", &down(&gdx), &dx, 1e-2, 1e-2);
    }
}

#[test]
fn swiglu_matches_cpu() {
    let Some(be) = device("swiglu") else { return };
    let n = 4099; // not a multiple of 8: exercises the scalar tail
    let (g, u, dy) = (rand_bf16(5, n, 4.0), rand_bf16(6, n, 2.0), rand_bf16(7, n, 1.0));
    let (mut y, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    cpu::swiglu::swiglu_forward(&g, &u, &mut y);
    cpu::swiglu::swiglu_backward(&g, &u, &dy, &mut dg, &mut du);
    let (gg, gu) = (up(&be, &g), up(&be, &u));
    let gy = DeviceBuffer::uninit(&be, n).unwrap();
    cuda::swiglu::swiglu_forward(&be, &gg, &gu, &gy).unwrap();
    let (gdg, gdu) = (DeviceBuffer::uninit(&be, n).unwrap(), DeviceBuffer::uninit(&be, n).unwrap());
    cuda::swiglu::swiglu_backward(&be, &gg, &gu, &up(&be, &dy), &gdg, &gdu).unwrap();
    assert_close("swiglu y", &down(&gy), &y, 1e-2, 1e-2);
    assert_close("swiglu dg", &down(&gdg), &dg, 1e-2, 1e-2);
    assert_close("swiglu du", &down(&gdu), &du, 1e-2, 1e-2);
}

#[test]
fn embedding_matches_cpu() {
    let Some(be) = device("embedding") else { return };
    let (vocab, dim, n) = (50, 96, 200);
    let table = rand_bf16(8, vocab * dim, 1.0);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + i / 3) % vocab as u32).collect();
    let dout = rand_bf16(9, n * dim, 1.0);
    let mut out = vec![0.0; n * dim];
    let mut dtable = vec![0.0; vocab * dim];
    cpu::embedding::embedding_forward(&table, dim, &ids, &mut out);
    cpu::embedding::embedding_backward(&dout, dim, &ids, &mut dtable);
    let gt = DeviceBuffer::from_host(&be, &table).unwrap();
    let gi = DeviceBuffer::from_host(&be, &ids).unwrap();
    let go = DeviceBuffer::uninit(&be, n * dim).unwrap();
    cuda::embedding::embedding_forward(&be, &gt, dim, &gi, &go).unwrap();
    let gd = DeviceBuffer::<f32>::zeros(&be, vocab * dim).unwrap();
    cuda::embedding::embedding_backward(&be, &up(&be, &dout), dim, &gi, &gd).unwrap();
    assert_close("embedding out", &down(&go), &out, 0.0, 0.0); // the table values are bf16-exact
    assert_close("embedding dtable", &gd.to_host().unwrap(), &dtable, 1e-5, 1e-5);
}

#[test]
fn softcap_cross_entropy_matches_cpu() {
    let Some(be) = device("softcap_cross_entropy") else { return };
    let (rows, vocab) = (9, 4104);
    let z = rand_bf16(10, rows * vocab, 40.0);
    let targets: Vec<i32> = (0..rows as i32).map(|r| if r == 4 { -1 } else { (r * 977) % vocab as i32 }).collect();
    for cap in [0.0f32, 15.0] {
        let (mut loss, mut lse, mut dz) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; z.len()]);
        cpu::loss::softcap_cross_entropy_forward(&z, vocab, &targets, cap, &mut loss, &mut lse);
        cpu::loss::softcap_cross_entropy_backward(&z, vocab, &targets, cap, &lse, 0.125, &mut dz);
        let gz = up(&be, &z);
        let gt = DeviceBuffer::from_host(&be, &targets).unwrap();
        let (gl, gs) =
            (DeviceBuffer::<f32>::uninit(&be, rows).unwrap(), DeviceBuffer::<f32>::uninit(&be, rows).unwrap());
        cuda::loss::softcap_cross_entropy_forward(&be, &gz, vocab, &gt, cap, &gl, &gs).unwrap();
        let gdz = DeviceBuffer::uninit(&be, z.len()).unwrap();
        cuda::loss::softcap_cross_entropy_backward(&be, &gz, vocab, &gt, cap, &gs, 0.125, &gdz).unwrap();
        assert_close("ce loss", &gl.to_host().unwrap(), &loss, 1e-4, 1e-4);
        assert_close("ce lse", &gs.to_host().unwrap(), &lse, 1e-4, 1e-4);
        assert_close("ce dlogits", &down(&gdz), &dz, 1e-4, 1e-2);
    }
}

#[test]
fn adamw_and_clip_match_cpu() {
    let Some(be) = device("adamw") else { return };
    let n = 10_001;
    let p0 = rand_bf16(11, n, 1.0);
    let g = rand_bf16(12, n, 0.1);
    let h = cpu::optim::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3 };
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.01f32; n], vec![0.001f32; n]);
    cpu::optim::adamw_update(&mut p, &g, &mut m, &mut v, h);
    let gp = DeviceBuffer::from_host(&be, &p0).unwrap();
    let gg = DeviceBuffer::from_host(&be, &g).unwrap();
    let gm = DeviceBuffer::from_host(&be, &vec![0.01f32; n]).unwrap();
    let gv = DeviceBuffer::from_host(&be, &vec![0.001f32; n]).unwrap();
    let gb = DeviceBuffer::<bf16>::uninit(&be, n).unwrap();
    cuda::optim::adamw_update(&be, &gp, &gg, &gm, &gv, Some(&gb), h).unwrap();
    assert_close("adamw p", &gp.to_host().unwrap(), &p, 1e-6, 1e-5);
    assert_close("adamw m", &gm.to_host().unwrap(), &m, 1e-7, 1e-5);
    assert_close("adamw v", &gv.to_host().unwrap(), &v, 1e-8, 1e-5);
    assert_close("adamw p_bf16", &down(&gb), &p, 1e-2, 1e-2);

    let mut grads = vec![g.clone(), rand_bf16(13, 777, 3.0)];
    let want = nanoseek::optim::clip_grad_norm(&mut grads, 1.0);
    let g1 = DeviceBuffer::from_host(&be, &g).unwrap();
    let g2 = DeviceBuffer::from_host(&be, &rand_bf16(13, 777, 3.0)).unwrap();
    let got = cuda::optim::clip_grad_norm(&be, &[&g1, &g2], 1.0).unwrap();
    assert!((got - want).abs() <= 1e-4 * want, "grad norm {got} vs {want}");
    assert_close("clipped grads", &g1.to_host().unwrap(), &grads[0], 1e-7, 1e-5);
    assert_close("clipped grads", &g2.to_host().unwrap(), &grads[1], 1e-7, 1e-5);
}

#[test]
fn gemm_matches_cpu_all_layouts() {
    use cpu::gemm::Layout::{N, T};
    let Some(be) = device("gemm") else { return };
    for &(batch, m, n, k) in &[(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520)] {
        for la in [N, T] {
            for lb in [N, T] {
                let a = rand_bf16(14, batch * m * k, 1.0);
                let b = rand_bf16(15, batch * k * n, 1.0);
                let c0 = rand_bf16(16, batch * m * n, 1.0);
                let mut want = c0.clone();
                for i in 0..batch {
                    let c = &mut want[i * m * n..(i + 1) * m * n];
                    for x in c.iter_mut() {
                        *x *= 0.5;
                    }
                    let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
                    let mut prod = vec![0.0; m * n];
                    cpu::gemm::gemm(m, n, k, ai, la, bi, lb, &mut prod, false);
                    for (x, p) in c.iter_mut().zip(prod) {
                        *x += 2.0 * p;
                    }
                }
                let (ga, gb) = (up(&be, &a), up(&be, &b));
                let gc = DeviceBuffer::from_host(&be, &c0).unwrap();
                cuda::gemm::gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gc, 2.0, 0.5).unwrap();
                let tol = 1e-3 * (k as f32).sqrt();
                assert_close(
                    &format!("gemm {la:?}{lb:?} {batch}x{m}x{n}x{k} f32"),
                    &gc.to_host().unwrap(),
                    &want,
                    tol,
                    1e-3,
                );
                let gcb = DeviceBuffer::<bf16>::uninit(&be, batch * m * n).unwrap();
                cuda::gemm::gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gcb, 1.0, 0.0).unwrap();
                let mut plain = vec![0.0; batch * m * n];
                for i in 0..batch {
                    let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
                    cpu::gemm::gemm(m, n, k, ai, la, bi, lb, &mut plain[i * m * n..(i + 1) * m * n], false);
                }
                assert_close(&format!("gemm {la:?}{lb:?} bf16"), &down(&gcb), &plain, tol, 1e-2);
            }
        }
    }
}

#[test]
fn gemm_fused_epilogues_match_cpu_on_every_engine() {
    use cuda::gemm::{gemm_fused_on, gemm_swiglu_backward_on, Epilogue, GemmEngine};
    let Some(be) = device("gemm_fused") else { return };
    let mut engines = vec![GemmEngine::Native];
    if be.compute_capability() == (9, 0) {
        engines.push(GemmEngine::Wgmma);
    } else {
        skipped("compute capability is not 9.0: the wgmma epilogues are not run", "gemm_fused");
    }
    match cuda::cublaslt::available() {
        Ok(()) => engines.push(GemmEngine::Cublaslt),
        Err(e) => skipped(&e.0, "gemm_fused (cuBLASLt composition)"),
    }
    // The last shape is below wgmma's 64 and falls back to the native kernel.
    for engine in engines {
        for &(m, n, k) in &[(128, 128, 64), (72, 200, 136), (264, 136, 520), (40, 96, 72)] {
            let what = format!("gemm_fused {} {m}x{n}x{k}", engine.name());
            let (x, w) = (rand_bf16(31, m * k, 1.0), rand_bf16(32, n * k, 1.0));
            let (resid, gate) = (rand_bf16(33, m * n, 2.0), rand_bf16(34, m * n, 3.0));
            let mut want = vec![0.0; m * n];
            cpu::gemm::gemm_fused(m, n, k, &x, &w, cpu::gemm::Epilogue::Residual { resid: &resid, out: &mut want });
            let (mut want_act, mut want_up) = (vec![0.0; m * n], vec![0.0; m * n]);
            let epi = cpu::gemm::Epilogue::SwiGlu { gate: &gate, act: &mut want_act, up: Some(&mut want_up) };
            cpu::gemm::gemm_fused(m, n, k, &x, &w, epi);
            let tol = 1e-3 * (k as f32).sqrt();

            let (gx, gw, gr, gg) = (up(&be, &x), up(&be, &w), up(&be, &resid), up(&be, &gate));
            let out = DeviceBuffer::<bf16>::uninit(&be, m * n).unwrap();
            gemm_fused_on(&be, engine, m, n, k, &gx, &gw, Epilogue::Residual { resid: &gr, out: &out }).unwrap();
            assert_close(&format!("{what} residual"), &down(&out), &want, tol, 1e-2);
            // in place: the residual stream itself receives the product
            gemm_fused_on(&be, engine, m, n, k, &gx, &gw, Epilogue::Residual { resid: &gr, out: &gr }).unwrap();
            assert_close(&format!("{what} residual in place"), &down(&gr), &want, tol, 1e-2);

            let (act, upb) = (DeviceBuffer::uninit(&be, m * n).unwrap(), DeviceBuffer::uninit(&be, m * n).unwrap());
            let epi = Epilogue::SwiGlu { gate: &gg, act: &act, up: Some(&upb) };
            gemm_fused_on(&be, engine, m, n, k, &gx, &gw, epi).unwrap();
            assert_close(&format!("{what} swiglu act"), &down(&act), &want_act, tol, 1e-2);
            assert_close(&format!("{what} swiglu up"), &down(&upb), &want_up, tol, 1e-2);
            act.fill_zero().unwrap();
            gemm_fused_on(&be, engine, m, n, k, &gx, &gw, Epilogue::SwiGlu { gate: &gg, act: &act, up: None }).unwrap();
            assert_close(&format!("{what} swiglu act (no up)"), &down(&act), &want_act, tol, 1e-2);

            // SwiGLU's backward: da = dy[m,n]·w_down[n,k] (NN) straight into (dg, du), [m, k]
            let (dy, wd) = (rand_bf16(35, m * n, 1.0), rand_bf16(36, n * k, 1.0));
            let (g2, u2) = (rand_bf16(37, m * k, 3.0), rand_bf16(38, m * k, 2.0));
            let (mut want_dg, mut want_du) = (vec![0.0; m * k], vec![0.0; m * k]);
            cpu::gemm::gemm_swiglu_backward(m, k, n, &dy, &wd, (&g2, &u2), (&mut want_dg, &mut want_du));
            let (gdy, gwd, gg2, gu2) = (up(&be, &dy), up(&be, &wd), up(&be, &g2), up(&be, &u2));
            let (dg, du) = (DeviceBuffer::uninit(&be, m * k).unwrap(), DeviceBuffer::uninit(&be, m * k).unwrap());
            gemm_swiglu_backward_on(&be, engine, m, k, n, &gdy, &gwd, (&gg2, &gu2), (&dg, &du)).unwrap();
            // |∂act/∂g| ≤ 1.1·|u| and |∂act/∂u| ≤ |g|: the GEMM's error scaled by a few
            let tol_bwd = 4.0 * 1e-3 * (n as f32).sqrt();
            assert_close(&format!("{what} swiglu bwd dg"), &down(&dg), &want_dg, tol_bwd, 1e-2);
            assert_close(&format!("{what} swiglu bwd du"), &down(&du), &want_du, tol_bwd, 1e-2);
        }
    }
    // Wrong sizes are errors, not launches.
    let (gx, small) = (up(&be, &[0.0; 64]), up(&be, &[0.0; 8]));
    let epi = Epilogue::Residual { resid: &small, out: &small };
    let e = gemm_fused_on(&be, GemmEngine::Native, 8, 8, 8, &gx, &gx, epi).unwrap_err();
    assert!(e.0.contains("resid must hold m*n"), "{e}");
}

#[test]
fn attention_matches_cpu() {
    use cpu::attention::AttnDims;
    let Some(be) = device("attention") else { return };
    for dims in [
        AttnDims { b: 2, t: 100, h: 4, h_kv: 2, d: 64 },
        AttnDims { b: 1, t: 130, h: 2, h_kv: 1, d: 128 },
        AttnDims { b: 1, t: 64, h: 3, h_kv: 3, d: 64 },
    ] {
        let q = rand_bf16(17, dims.q_len(), 1.0);
        let k = rand_bf16(18, dims.kv_len(), 1.0);
        let v = rand_bf16(19, dims.kv_len(), 1.0);
        let dout = rand_bf16(20, dims.q_len(), 1.0);
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        cpu::attention::attention_forward(&dims, &q, &k, &v, &mut out, &mut lse);
        let (gq, gk, gv) = (up(&be, &q), up(&be, &k), up(&be, &v));
        let go = DeviceBuffer::uninit(&be, dims.q_len()).unwrap();
        let gl = DeviceBuffer::<f32>::uninit(&be, dims.lse_len()).unwrap();
        cuda::attention::attention_forward(&be, &dims, &gq, &gk, &gv, &go, &gl).unwrap();
        let gout = down(&go);
        assert_close(&format!("attention out {dims:?}"), &gout, &out, 2e-2, 2e-2);
        assert_close(&format!("attention lse {dims:?}"), &gl.to_host().unwrap(), &lse, 1e-3, 1e-3);

        // the CPU backward on the GPU's (bf16) out, so both see the same delta
        let (mut dq, mut dk, mut dv) = (vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
        cpu::attention::attention_backward(&dims, &q, &k, &v, &gout, &lse, &dout, &mut dq, &mut dk, &mut dv);
        let gdq = DeviceBuffer::<f32>::uninit(&be, dims.q_len()).unwrap();
        let gdk = DeviceBuffer::<f32>::uninit(&be, dims.kv_len()).unwrap();
        let gdv = DeviceBuffer::<f32>::uninit(&be, dims.kv_len()).unwrap();
        cuda::attention::attention_backward(&be, &dims, &gq, &gk, &gv, &go, &gl, &up(&be, &dout), [&gdq, &gdk, &gdv])
            .unwrap();
        assert_close(&format!("attention dq {dims:?}"), &gdq.to_host().unwrap(), &dq, 2e-2, 2e-2);
        assert_close(&format!("attention dk {dims:?}"), &gdk.to_host().unwrap(), &dk, 2e-2, 2e-2);
        assert_close(&format!("attention dv {dims:?}"), &gdv.to_host().unwrap(), &dv, 2e-2, 2e-2);
    }
}

#[test]
fn allocator_reuses_blocks_and_tracks_peak() {
    let Some(be) = device("allocator") else { return };
    let before = be.memory_stats();
    {
        let _a = DeviceBuffer::<f32>::uninit(&be, 1 << 20).unwrap();
        let _b = DeviceBuffer::<f32>::uninit(&be, 1000).unwrap();
        assert_eq!(be.memory_stats().current, before.current + (4 << 20) + 4096);
    }
    let mid = be.memory_stats();
    assert_eq!(mid.current, before.current);
    assert!(mid.peak >= before.current + (4 << 20) + 4096);
    let _c = DeviceBuffer::<f32>::uninit(&be, 1 << 20).unwrap();
    assert_eq!(be.memory_stats().driver_allocs, mid.driver_allocs, "the cached block is reused");
}

#[test]
fn allocator_counts_by_category() {
    use nanoseek::memory::Category;
    let Some(be) = device("allocator_categories") else { return };
    let at = |c: Category| be.memory_by_category().report.current[c as usize];
    let base = be.memory_by_category().report.current;
    let w = DeviceBuffer::<f32>::uninit_in(&be, 1 << 20, Category::Parameters).unwrap();
    let a = be.with_category(Category::Activations, || DeviceBuffer::<bf16>::uninit(&be, 1000).unwrap());
    let t = DeviceBuffer::<f32>::uninit(&be, 100).unwrap(); // no scope: workspace
    assert_eq!(at(Category::Parameters), base[0] + (4 << 20));
    assert_eq!(at(Category::Activations), base[3] + 2048);
    assert_eq!(at(Category::Workspace), base[4] + 512);
    {
        let _g = be.scoped(Category::OptimizerState);
        let _s = DeviceBuffer::<f32>::zeros(&be, 10).unwrap();
        assert_eq!(at(Category::OptimizerState), base[2] + 512);
    }
    assert_eq!(at(Category::OptimizerState), base[2], "the scope's buffer dropped");
    a.set_category(Category::Gradients);
    assert_eq!((at(Category::Activations), at(Category::Gradients)), (base[3], base[1] + 2048));
    let peak = be.memory_by_category();
    assert!(peak.report.peak_total >= peak.report.current_total());
    drop((w, a, t));
    assert_eq!(be.memory_by_category().report.current, base, "everything went back");
}

#[test]
fn out_of_memory_is_an_error_not_a_crash() {
    let Some(be) = device("out_of_memory") else { return };
    // 64 TiB: more than any device holds; the allocator releases its cache, retries, and explains.
    let e = DeviceBuffer::<f32>::uninit(&be, 1 << 44).err().expect("a 64 TiB allocation must fail").to_string();
    for part in [
        "CUDA out of memory",
        "allocating 65536.00 GiB",
        "in use",
        "free of",
        "--device-batch-size",
        "--grad-checkpoint",
    ] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    // The backend still works afterwards.
    let b = DeviceBuffer::<f32>::from_host(&be, &[1.0, 2.0]).unwrap();
    assert_eq!(b.to_host().unwrap(), vec![1.0, 2.0]);
    // And the pre-flight check refuses a run that cannot fit, with the same advice.
    let e = cuda::check_fits(&be, 1 << 50, "a test run").unwrap_err().to_string();
    assert!(e.contains("a test run") && e.contains("--device-batch-size"), "{e}");
    cuda::check_fits(&be, 1 << 20, "a small run").unwrap();
}

#[test]
fn every_family_has_ptx_for_both_targets() {
    // Runs everywhere: the embedded PTX list is complete.
    let families = [
        "attention",
        "dsa",
        "elementwise",
        "embedding",
        "gemm",
        "loss",
        "moe",
        "norm",
        "optim",
        "rope",
        "swiglu",
        "window_attention",
    ];
    for fam in families {
        for target in ["sm_90a", "sm_80"] {
            let text = cuda::embedded_ptx(fam, target).unwrap_or_else(|e| panic!("{e}"));
            assert!(text.contains(&format!(".target {target}")), "{fam}: wrong target");
            assert!(text.contains(".version 9.0"), "{fam}: PTX ISA must be 9.0 (CUDA 13.0 driver)");
        }
    }
    assert_eq!(cuda::ptx_target((9, 0)), "sm_90a");
    assert_eq!(cuda::ptx_target((8, 9)), "sm_80");
    assert_eq!(cuda::ptx_target((10, 0)), "sm_80");
}

/// The kernel names the launch code asks for, checked against the embedded PTX on the host (a
/// misspelt name would otherwise only show on a GPU): in each `src/backend/cuda/<family>.rs`,
/// every string literal that looks like a kernel name (a `_f32`, `_bf16`, `_d64`, `_d128`,
/// `_fwd`, `_bwd` or `_decode` part, and not the name of one of the module's Rust functions,
/// which its error messages quote) must be an `.entry` of that family's PTX for both targets,
/// and every `.entry` of the family must be named there.
#[test]
fn every_launched_kernel_name_is_in_the_ptx() {
    // The launch modules are read at compile time, so the test runs where the source tree is absent.
    let mut listed: Vec<&str> = LAUNCH_MODULE_SOURCES.iter().map(|(fam, _)| *fam).collect();
    listed.sort();
    let mut built: Vec<&str> = cuda::KERNEL_FAMILIES.to_vec();
    built.sort();
    assert_eq!(listed, built, "LAUNCH_MODULE_SOURCES must name every cuda/*.cu family");
    for &(fam, src) in LAUNCH_MODULE_SOURCES {
        let literals: std::collections::BTreeSet<&str> = src
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .collect();
        // the launch module's own function names appear in its error messages, not as kernels
        let rust_fns: std::collections::BTreeSet<&str> =
            src.split("fn ").skip(1).filter_map(|rest| rest.split(['(', '<']).next()).collect();
        let kernel_like = |l: &str| {
            !rust_fns.contains(l)
                && l.split('_').any(|p| ["f32", "bf16", "d64", "d128", "fwd", "bwd", "decode"].contains(&p))
        };
        for target in ["sm_90a", "sm_80"] {
            let ptx = cuda::embedded_ptx(fam, target).unwrap();
            let entries: std::collections::BTreeSet<&str> = ptx
                .split(".entry ")
                .skip(1)
                .map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap())
                .collect();
            assert!(!entries.is_empty(), "{fam} {target}: no .entry in the PTX");
            for l in literals.iter().filter(|l| kernel_like(l) || entries.contains(*l)) {
                assert!(entries.contains(l), "src/backend/cuda/{fam}.rs names {l:?}, not a kernel of {fam} ({target})");
            }
            for e in &entries {
                assert!(
                    literals.contains(e),
                    "{fam} ({target}) has kernel {e} that src/backend/cuda/{fam}.rs never names"
                );
            }
        }
    }
}

/// Each kernel family's launch module (src/backend/cuda/<family>.rs), embedded at compile time.
const LAUNCH_MODULE_SOURCES: &[(&str, &str)] = &[
    ("attention", include_str!("../src/backend/cuda/attention.rs")),
    ("dsa", include_str!("../src/backend/cuda/dsa.rs")),
    ("elementwise", include_str!("../src/backend/cuda/elementwise.rs")),
    ("embedding", include_str!("../src/backend/cuda/embedding.rs")),
    ("gemm", include_str!("../src/backend/cuda/gemm.rs")),
    ("loss", include_str!("../src/backend/cuda/loss.rs")),
    ("moe", include_str!("../src/backend/cuda/moe.rs")),
    ("norm", include_str!("../src/backend/cuda/norm.rs")),
    ("optim", include_str!("../src/backend/cuda/optim.rs")),
    ("rope", include_str!("../src/backend/cuda/rope.rs")),
    ("swiglu", include_str!("../src/backend/cuda/swiglu.rs")),
    ("window_attention", include_str!("../src/backend/cuda/window_attention.rs")),
];

#[test]
fn no_device_is_an_error_not_a_panic() {
    // With a device this opens it; without one it must return the reason.
    match CudaBackend::new(0) {
        Ok(be) => assert!(be.compute_capability().0 >= 8),
        Err(why) => {
            skipped(&why.0, "open");
            assert!(!why.0.is_empty());
        }
    }
    assert!(CudaBackend::new(1 << 20).is_err());
}

// ---- elementwise.cu, Muon (optim.cu) and the CUDA training step (src/train/step_cuda.rs) ----
// Tolerances: axpby is one bf16 rounding of an f32 result (rtol 1e-2, atol 1e-2); the Muon
// momentum is f32 math (rtol 1e-5, atol 1e-6); Newton–Schulz runs in bf16 GEMMs, so its output
// (entries of an approximately orthogonal matrix, |o| ≲ 0.3 here) is compared at atol 3e-2;
// the training step's losses track the CPU explicit step at 2e-2 relative per step (bf16
// activations, ≈ 2⁻⁹ per rounding, through a 2-layer model and three optimizer updates).

#[test]
fn axpby_matches_cpu() {
    let Some(be) = device("axpby") else { return };
    let n = 1000 + 8;
    let (a, b) = (rand_bf16(61, n, 2.0), rand_bf16(62, n, 2.0));
    let (da, db) = (up(&be, &a), up(&be, &b));
    let out = DeviceBuffer::<bf16>::zeros(&be, n).unwrap();
    cuda::elementwise::axpby(&be, 0.5, &da, -2.0, Some(&db), &out).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 0.5 * x - 2.0 * y).collect();
    assert_close("axpby", &down(&out), &want, 1e-2, 1e-2);
    // in place, as the residual add: a += b
    cuda::elementwise::add(&be, &da, &db, &da).unwrap();
    let mut want = a.clone();
    cpu::elementwise::accumulate(&mut want, &b);
    assert_close("add in place", &down(&da), &want, 1e-2, 1e-2);
    // odd length: the scalar path
    let (a7, b7) = (up(&be, &a[..7]), up(&be, &b[..7]));
    let o7 = DeviceBuffer::<bf16>::zeros(&be, 7).unwrap();
    cuda::elementwise::axpby(&be, 1.0, &a7, 1.0, Some(&b7), &o7).unwrap();
    let want: Vec<f32> = a[..7].iter().zip(&b[..7]).map(|(x, y)| x + y).collect();
    assert_close("add (odd length)", &down(&o7), &want, 1e-2, 1e-2);
}

#[test]
fn muon_steps_match_cpu() {
    use nanoseek::train::step::StepOps;
    let Some(be) = device("muon") else { return };
    let cfg = {
        let mut m = nanoseek::nn::ModelConfig::preset("tiny").unwrap();
        m.head_dim = 64;
        m
    };
    let ops = nanoseek::train::step_cuda::CudaOps::new(be, &cfg).unwrap();
    let cpu_ops = nanoseek::train::step_cpu::CpuOps::new(&cfg);
    for &(rows, cols) in &[(64, 192), (192, 64), (128, 128)] {
        let n = rows * cols;
        let (g, buf) = (rand_bf16(71, n, 1.0), rand_bf16(72, n, 1.0));
        let (mut gbuf, gg) = (ops.f_from(&buf).unwrap(), ops.f_from(&g).unwrap());
        let u = ops.muon_momentum(&mut gbuf, &gg, 0.95).unwrap();
        let mut cbuf = buf.clone();
        let cu = cpu_ops.muon_momentum(&mut cbuf, &g, 0.95).unwrap();
        assert_close("momentum buf", &gbuf.to_host().unwrap(), &cbuf, 1e-6, 1e-5);
        assert_close("momentum u", &u.to_host().unwrap(), &cu, 1e-6, 1e-5);
        let o = ops.newton_schulz(&u, rows, cols, 5).unwrap();
        let co = cpu::optim::newton_schulz(&cu, rows, cols, 5);
        assert_close(&format!("newton_schulz {rows}x{cols}"), &down(&o), &co, 3e-2, 0.0);
        let w = rand_bf16(73, n, 0.1);
        let (mut gw, mut gwa) = (ops.f_from(&w).unwrap(), DeviceBuffer::<bf16>::zeros(&ops.be, n).unwrap());
        ops.muon_apply(&mut gw, &mut gwa, &o, 0.99, 0.02).unwrap();
        let want: Vec<f32> = w.iter().zip(down(&o)).map(|(x, oi)| x * 0.99 - 0.02 * oi).collect();
        assert_close("muon_apply", &gw.to_host().unwrap(), &want, 1e-6, 1e-5);
        assert_close("muon_apply bf16 copy", &down(&gwa), &want, 1e-3, 1e-2);
    }
}

type GpuTrainer = nanoseek::train::step::DenseTrainer<nanoseek::train::step_cuda::CudaOps>;
type CpuTrainer = nanoseek::train::step::DenseTrainer<nanoseek::train::step_cpu::CpuOps>;

/// A CUDA and a CPU explicit-step trainer of the same model, with the default optimizer.
fn trainer_pair(
    be: CudaBackend,
    c: &nanoseek::nn::ModelConfig,
    model: &nanoseek::nn::Model,
) -> (GpuTrainer, CpuTrainer) {
    let opt = nanoseek::optim::Optimizer::new(model, nanoseek::optim::OptimConfig::default());
    let ops = nanoseek::train::step_cuda::CudaOps::new(be, c).unwrap();
    let gpu = GpuTrainer::new(ops, model, &opt).unwrap();
    let cpu_tr = CpuTrainer::new(nanoseek::train::step_cpu::CpuOps::new(c), model, &opt).unwrap();
    (gpu, cpu_tr)
}

/// Step `step` of both trainers on the same two micro-batches of 2 × 64 tokens (vocabulary 512):
/// the loss within 2% and the gradient norm within 10% of the CPU's.
fn step_both(gpu: &mut GpuTrainer, cpu_tr: &mut CpuTrainer, step: u64) {
    let clip = nanoseek::optim::OptimConfig::default().grad_clip;
    let next = |i: &mut u64| {
        *i += 1;
        let ids: Vec<u32> = rand_bf16(80 + *i, 2 * 64, 1.0).iter().map(|x| ((x + 1.0) * 255.0) as u32 % 512).collect();
        let targets = ids.iter().map(|&x| ((x * 7 + 3) % 512) as i32).collect();
        nanoseek::data::Batch { ids, targets }
    };
    let mut i = 2 * step;
    let (lg, ng) = gpu.train_step(|| next(&mut i), 2, clip, 1.0).unwrap();
    let mut i = 2 * step;
    let (lc, nc) = cpu_tr.train_step(|| next(&mut i), 2, clip, 1.0).unwrap();
    eprintln!("step {step}: loss gpu {lg:.5} cpu {lc:.5}, grad norm gpu {ng:.4} cpu {nc:.4}");
    assert!((lg - lc).abs() <= 2e-2 * lc, "step {step}: loss gpu {lg} vs cpu {lc}");
    assert!((ng - nc).abs() <= 1e-1 * nc, "step {step}: grad norm gpu {ng} vs cpu {nc}");
}

/// The trained parameters (and MoE biases) come back to the host, as for a checkpoint, after 3
/// steps, and are finite.
fn assert_back_on_host(gpu: &GpuTrainer, c: &nanoseek::nn::ModelConfig, model: &nanoseek::nn::Model) {
    let mut m2 = nanoseek::nn::Model::new(c, 5).unwrap();
    let mut o2 = nanoseek::optim::Optimizer::new(model, nanoseek::optim::OptimConfig::default());
    gpu.to_host(&mut m2, &mut o2).unwrap();
    assert_eq!(o2.step, 3);
    assert_eq!(m2.moe_bias, gpu.moe_bias);
    assert!(m2.params.iter().all(|p| p.tensor.data.iter().all(|v| v.is_finite())));
}

#[test]
fn cuda_training_step_tracks_the_cpu_explicit_step() {
    let Some(be) = device("train step") else { return };
    let mut c = nanoseek::nn::ModelConfig::preset("tiny").unwrap();
    (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) = (512, 2, 128, 4, 2, 64);
    (c.ffn_hidden, c.max_seq_len, c.logit_softcap) = (384, 64, 15.0);
    let model = nanoseek::nn::Model::new(&c, 5).unwrap();
    let (mut gpu, mut cpu_tr) = trainer_pair(be, &c, &model);
    for step in 0..3u64 {
        step_both(&mut gpu, &mut cpu_tr, step);
    }
    assert_back_on_host(&gpu, &c, &model);
}

/// cuBLASLt (`--gemm cublaslt`) against the CPU GEMM: the four layouts, f32 output with α and β
/// (C read) and bf16 output with β = 0 (C left uninitialized), batched; the native GEMM's shapes
/// and tolerances (`gemm_matches_cpu_all_layouts`: only the summation order differs). Calls
/// `cuda::cublaslt` directly, so the process-wide engine switch (and the other tests) stay native.
#[test]
fn cublaslt_gemm_matches_cpu_all_layouts() {
    use cpu::gemm::Layout::{N, T};
    let Some(be) = device("cublaslt_gemm") else { return };
    if let Err(e) = cuda::cublaslt::available() {
        skipped(&e.0, "cublaslt_gemm");
        return;
    }
    for &(batch, m, n, k) in &[(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520), (3, 40, 24, 8)] {
        for la in [N, T] {
            for lb in [N, T] {
                let what = format!("cublaslt {la:?}{lb:?} {batch}x{m}x{n}x{k}");
                let a = rand_bf16(17, batch * m * k, 1.0);
                let b = rand_bf16(18, batch * k * n, 1.0);
                let c0 = rand_bf16(19, batch * m * n, 1.0);
                let mut plain = vec![0.0; batch * m * n];
                for i in 0..batch {
                    let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
                    cpu::gemm::gemm(m, n, k, ai, la, bi, lb, &mut plain[i * m * n..(i + 1) * m * n], false);
                }
                let want: Vec<f32> = c0.iter().zip(&plain).map(|(&c, &p)| 0.5 * c + 2.0 * p).collect();
                let (ga, gb) = (up(&be, &a), up(&be, &b));
                let tol = 1e-3 * (k as f32).sqrt();
                let gc = DeviceBuffer::from_host(&be, &c0).unwrap();
                cuda::cublaslt::gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gc, 2.0, 0.5).unwrap();
                assert_close(&format!("{what} f32"), &gc.to_host().unwrap(), &want, tol, 1e-3);
                // the second call of a shape runs on the cached plan
                let gc2 = DeviceBuffer::from_host(&be, &c0).unwrap();
                cuda::cublaslt::gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gc2, 2.0, 0.5).unwrap();
                assert_close(&format!("{what} f32, cached plan"), &gc2.to_host().unwrap(), &want, tol, 1e-3);
                let gcb = DeviceBuffer::<bf16>::uninit(&be, batch * m * n).unwrap();
                cuda::cublaslt::gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gcb, 1.0, 0.0).unwrap();
                assert_close(&format!("{what} bf16"), &down(&gcb), &plain, tol, 1e-2);
            }
        }
    }
    // the same shape checks as the native GEMM
    let (ga, gb) = (up(&be, &rand_bf16(20, 12, 1.0)), up(&be, &rand_bf16(21, 12, 1.0)));
    let gc = DeviceBuffer::<f32>::uninit(&be, 9).unwrap();
    let e = cuda::cublaslt::gemm(&be, 3, 3, 4, &ga, N, &gb, T, &gc, 1.0, 0.0).unwrap_err();
    assert!(e.0.contains("multiple of 8"), "{e}");
}

/// Every layer kind on CUDA: a `WSD` model (window + global, DSA sparse phase, dense) with MoE
/// FFNs after the first layer (E = 8, K = 2, one shared expert, balance loss on), 3 optimizer
/// steps of 2 micro-batches, the CUDA explicit step against the CPU one. Tolerances (bf16
/// activations and GEMM operands, a bf16 Newton–Schulz; routing decisions near a tie may flip):
/// loss rtol 2e-2, grad norm rtol 1e-1, mean indexer KL rtol 1e-1 (+1e-3), expert counts within
/// 10% of the layer's assignments (Σ|gpu − cpu|); the biases of the MoE layers have moved (the
/// auxiliary-loss-free update ran on the device's counts) and agree with the CPU's on at least
/// half of the experts (a count flipping across the mean load moves an expert's bias by γ for
/// good, so exact agreement is not expected).
#[test]
fn cuda_training_step_tracks_the_cpu_explicit_step_on_every_layer_kind() {
    let Some(be) = device("train step, W/S/MoE") else { return };
    let mut c = nanoseek::nn::ModelConfig::preset("tiny").unwrap();
    (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) = (512, 3, 128, 4, 2, 64);
    (c.ffn_hidden, c.max_seq_len, c.logit_softcap) = (384, 64, 15.0);
    c.attn_pattern = "WSD".into();
    (c.dsa_window_size, c.n_global) = (16, 4);
    (c.index_n_heads, c.index_head_dim, c.index_topk, c.index_local_window, c.dsa_warmup_steps) = (8, 32, 16, 8, 0);
    (c.moe.n_routed_experts, c.moe.top_k, c.moe.n_shared_experts, c.moe.moe_inter_dim) = (8, 2, 1, 64);
    (c.moe.first_k_dense, c.moe.seq_aux_alpha, c.moe.bias_update_speed) = (1, 1e-3, 1e-3);
    let mut model = nanoseek::nn::Model::new(&c, 5).unwrap();
    // non-zero c_proj / w_down so every path carries gradient from the first step
    let mut s = 1u64;
    for p in model.params.iter_mut().filter(|p| p.name.contains("c_proj") || p.name.contains("w_down")) {
        s += 1;
        p.tensor.data = rand_bf16(900 + s, p.tensor.numel(), 0.05);
    }
    let (mut gpu, mut cpu_tr) = trainer_pair(be, &c, &model);
    for step in 0..3u64 {
        step_both(&mut gpu, &mut cpu_tr, step);
        let (kg, kc) = (gpu.last_step.indexer_loss.unwrap(), cpu_tr.last_step.indexer_loss.unwrap());
        eprintln!("  indexer KL gpu {kg:.5} cpu {kc:.5}");
        assert!((kg - kc).abs() <= 1e-1 * kc + 1e-3, "step {step}: indexer KL gpu {kg} vs cpu {kc}");
        for (l, (a, b)) in gpu.last_step.moe_loads.iter().zip(&cpu_tr.last_step.moe_loads).enumerate() {
            assert_eq!(a.is_some(), b.is_some() && l >= 1, "layer {l}: MoE loads");
            if let (Some(a), Some(b)) = (a, b) {
                let diff: usize = a.counts.iter().zip(&b.counts).map(|(&x, &y)| x.abs_diff(y)).sum();
                eprintln!("  layer {l}: counts gpu {:?} cpu {:?}", a.counts, b.counts);
                assert!(
                    diff * 10 <= b.assignments,
                    "layer {l}: expert counts gpu {:?} vs cpu {:?}",
                    a.counts,
                    b.counts
                );
                assert_eq!(a.assignments, b.assignments);
            }
        }
    }
    for (l, (a, b)) in gpu.moe_bias.iter().zip(&cpu_tr.moe_bias).enumerate().skip(1) {
        eprintln!("  layer {l}: bias gpu {a:?} cpu {b:?}");
        assert!(a.iter().any(|&x| x != 0.0), "layer {l}: the bias never moved");
        let same = a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() <= 1e-6).count();
        assert!(2 * same >= a.len(), "layer {l}: biases {a:?} vs {b:?}");
    }
    assert_back_on_host(&gpu, &c, &model);
}

/// The sm_90a wgmma GEMM (`--gemm wgmma`) against the CPU GEMM: the four layouts, f32 output with
/// α and β (C read) and bf16 output with β = 0, batched, the native GEMM's tolerances (only the
/// summation order differs: rtol 1e-3, atol 1e-3·√k for f32; rtol 1e-2 for bf16). Shapes: whole
/// tiles, ragged m/n/k edges (partial 128x128 tiles, a k tail inside the last 64-wide k tile, k
/// over several pipeline stages), and shapes under 64 that must fall back to the mma.sync kernel
/// (`gemm::wgmma_handles`). NT exercises the TMA kernel (`gemm_wgmma_tma_nt_*`: boxes out of
/// bounds in m, n and k, per batch; `NANOSEEK_WGMMA_NO_TMA=1` runs the cp.async NT kernel
/// instead), the others the cp.async/register one. Calls
/// `cuda::gemm::wgmma_gemm_batched` directly, so the process-wide engine switch stays native;
/// skips with a notice on devices that are not compute capability 9.0.
#[test]
fn wgmma_gemm_matches_cpu_all_layouts() {
    use cpu::gemm::Layout::{N, T};
    let Some(be) = device("wgmma_gemm") else { return };
    if be.compute_capability() != (9, 0) {
        let (a, b) = be.compute_capability();
        skipped(&format!("compute capability {a}.{b}, wgmma needs 9.0"), "wgmma_gemm");
        let (ga, gb) = (up(&be, &[0.0; 64]), up(&be, &[0.0; 64]));
        let gc = DeviceBuffer::<f32>::zeros(&be, 64).unwrap();
        let e = cuda::gemm::wgmma_gemm_batched(&be, 1, 8, 8, 8, &ga, N, &gb, T, &gc, 1.0, 0.0).unwrap_err();
        assert!(e.0.contains("compute capability 9.0"), "{e}");
        return;
    }
    let shapes = [(1, 128, 128, 64), (2, 72, 200, 136), (1, 264, 136, 520), (3, 256, 384, 1024), (2, 40, 96, 72)];
    for &(batch, m, n, k) in &shapes {
        assert_eq!(cuda::gemm::wgmma_handles(m, n, k), m >= 64, "the last shape must fall back");
        for la in [N, T] {
            for lb in [N, T] {
                let a = rand_bf16(24, batch * m * k, 1.0);
                let b = rand_bf16(25, batch * k * n, 1.0);
                let c0 = rand_bf16(26, batch * m * n, 1.0);
                let mut plain = vec![0.0; batch * m * n];
                for i in 0..batch {
                    let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
                    cpu::gemm::gemm(m, n, k, ai, la, bi, lb, &mut plain[i * m * n..(i + 1) * m * n], false);
                }
                let want: Vec<f32> = c0.iter().zip(&plain).map(|(c, p)| 0.5 * c + 2.0 * p).collect();
                let (ga, gb) = (up(&be, &a), up(&be, &b));
                let gc = DeviceBuffer::from_host(&be, &c0).unwrap();
                cuda::gemm::wgmma_gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gc, 2.0, 0.5).unwrap();
                let tol = 1e-3 * (k as f32).sqrt();
                let what = format!("wgmma gemm {la:?}{lb:?} {batch}x{m}x{n}x{k}");
                assert_close(&format!("{what} f32"), &gc.to_host().unwrap(), &want, tol, 1e-3);
                let gcb = DeviceBuffer::<bf16>::uninit(&be, batch * m * n).unwrap();
                cuda::gemm::wgmma_gemm_batched(&be, batch, m, n, k, &ga, la, &gb, lb, &gcb, 1.0, 0.0).unwrap();
                assert_close(&format!("{what} bf16"), &down(&gcb), &plain, tol, 1e-2);
            }
        }
    }
}
