//! The element-wise families (rope, norm, swiglu, embedding, loss, elementwise) and the
//! optimizer kernels (AdamW, grad norm and clip, Muon), with the smoke test.
//!
//! Tolerances (module doc of [`crate::selftest`]): bf16 outputs of f32 math are one rounding
//! ([`Tol::bf16_once`]); f32 outputs of f32 math as the former tests' element bounds with the
//! norm at their relative part ([`Tol::f32_math`]); Newton–Schulz runs five bf16 GEMM rounds on
//! entries of an approximately orthogonal matrix (|o| ≲ 0.3): atol 3e-2 element-wise (the former
//! test's), norm 1e-1 (a few roundings per iteration, five iterations of a map that does not
//! contract errors in every direction: not modelled tighter; a zeroed or halved result is 0.5–1).

use super::compare::Tol;
use super::{atomics_rerun, down, down32, rand_bf16, up, Ctx};
use crate::backend::cpu;
use crate::backend::cuda::{self, DeviceBuffer};
use anyhow::Result;
use half::bf16;

/// axpby on 1K elements: the first kernel a new machine runs.
pub fn smoke(ctx: &mut Ctx) -> Result<()> {
    ctx.case("axpby", "n 1024", |ctx| {
        let be = ctx.be;
        let n = 1024;
        let (a, b) = (rand_bf16(1, n, 2.0), rand_bf16(2, n, 2.0));
        let (da, db) = (up(be, &a)?, up(be, &b)?);
        let out = DeviceBuffer::<bf16>::zeros(be, n)?;
        cuda::elementwise::axpby(be, 0.5, &da, -2.0, Some(&db), &out)?;
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 0.5 * x - 2.0 * y).collect();
        let got = down(&out)?;
        ctx.close("axpby", "n 1024", &got, &want, Tol::bf16_once());
        cuda::elementwise::axpby(be, 0.5, &da, -2.0, Some(&db), &out)?;
        ctx.repeat("axpby", "n 1024", &down(&out)?, &got, None);
        Ok(())
    });
    Ok(())
}

pub fn elementwise(ctx: &mut Ctx) -> Result<()> {
    let sizes: &[usize] = if ctx.quick { &[1008] } else { &[1008, 65_536 + 8, 1 << 20] };
    for &n in sizes {
        let shape = format!("n {n}");
        ctx.case("axpby", &shape, |ctx| {
            let be = ctx.be;
            let (a, b) = (rand_bf16(61, n, 2.0), rand_bf16(62, n, 2.0));
            let (da, db) = (up(be, &a)?, up(be, &b)?);
            let out = DeviceBuffer::<bf16>::zeros(be, n)?;
            cuda::elementwise::axpby(be, 0.5, &da, -2.0, Some(&db), &out)?;
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 0.5 * x - 2.0 * y).collect();
            let got = down(&out)?;
            ctx.close("axpby", &shape, &got, &want, Tol::bf16_once());
            cuda::elementwise::axpby(be, 0.5, &da, -2.0, Some(&db), &out)?;
            ctx.repeat("axpby", &shape, &down(&out)?, &got, None);
            // in place, as the residual add: a += b
            cuda::elementwise::add(be, &da, &db, &da)?;
            let mut want = a.clone();
            cpu::elementwise::accumulate(&mut want, &b);
            ctx.close("add in place", &shape, &down(&da)?, &want, Tol::bf16_once());
            Ok(())
        });
    }
    ctx.case("axpby (odd length)", "n 7", |ctx| {
        let be = ctx.be;
        let (a, b) = (rand_bf16(63, 7, 2.0), rand_bf16(64, 7, 2.0));
        let o7 = DeviceBuffer::<bf16>::zeros(be, 7)?;
        cuda::elementwise::axpby(be, 1.0, &up(be, &a)?, 1.0, Some(&up(be, &b)?), &o7)?;
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        ctx.close("add (odd length)", "n 7", &down(&o7)?, &want, Tol::bf16_once());
        Ok(())
    });
    // the column copy of the MTP concatenation and its split (a 2-D driver copy): exact
    ctx.case("copy_cols", "rows 37, 24 of 40 at 13 into 64 at 5", |ctx| {
        let be = ctx.be;
        let (rows, src_cols, dst_cols) = (37, 40, 64);
        let src = rand_bf16(65, rows * src_cols, 2.0);
        let dst0 = rand_bf16(66, rows * dst_cols, 2.0);
        let ddst = up(be, &dst0)?;
        cuda::elementwise::copy_cols(be, &up(be, &src)?, (src_cols, 13), &ddst, (dst_cols, 5), rows, 24)?;
        let mut want = dst0.clone();
        cpu::elementwise::copy_cols(&src, (src_cols, 13), &mut want, (dst_cols, 5), rows, 24);
        let got = down(&ddst)?;
        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        ctx.flag("copy_cols bitwise", "rows 37", same, "the copied block or its surroundings differ");
        Ok(())
    });
    Ok(())
}

pub fn rope(ctx: &mut Ctx) -> Result<()> {
    let shapes: &[(usize, usize, usize, usize, usize)] =
        if ctx.quick { &[(2, 37, 4, 2, 64)] } else { &[(2, 37, 4, 2, 64), (2, 1024, 8, 2, 128)] };
    for &(b, t, h, h_kv, d) in shapes {
        let shape = format!("b{b} t{t} h{h}/{h_kv} d{d}");
        ctx.case("rope", &shape, |ctx| {
            let be = ctx.be;
            let q = rand_bf16(1, b * t * h * d, 1.0);
            let k = rand_bf16(2, b * t * h_kv * d, 1.0);
            let cpu_table = cpu::rope::RopeTable::new(d, t.max(64), 10000.0);
            let table = cuda::rope::RopeTableGpu::new(be, d, t.max(64), 10000.0)?;
            for inverse in [false, true] {
                let name = if inverse { "rope inverse" } else { "rope" };
                let (gq, gk) = (up(be, &q)?, up(be, &k)?);
                let (oq, ok) = (DeviceBuffer::uninit(be, q.len())?, DeviceBuffer::uninit(be, k.len())?);
                cuda::rope::rope(be, &table, &gq, &gk, &oq, &ok, (b, t, h, h_kv), inverse)?;
                let (mut wq, mut wk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
                let f = if inverse { cpu::rope::rope_backward } else { cpu::rope::rope_forward };
                f(&cpu_table, &q, b, t, h, &mut wq);
                f(&cpu_table, &k, b, t, h_kv, &mut wk);
                let got_q = down(&oq)?;
                ctx.close(&format!("{name} q"), &shape, &got_q, &wq, Tol::bf16_once());
                ctx.close(&format!("{name} k"), &shape, &down(&ok)?, &wk, Tol::bf16_once());
                cuda::rope::rope(be, &table, &gq, &gk, &oq, &ok, (b, t, h, h_kv), inverse)?;
                ctx.repeat(&format!("{name} q"), &shape, &down(&oq)?, &got_q, None);
                // one tensor (the tape's op: no k heads) gives the same
                let one = DeviceBuffer::uninit(be, q.len())?;
                cuda::rope::rope_one(be, &table, &gq, &one, (b, t, h), inverse)?;
                ctx.repeat(&format!("{name} q alone"), &shape, &down(&one)?, &got_q, None);
                // in place gives the same
                cuda::rope::rope_inplace(be, &table, &gq, &gk, (b, t, h, h_kv), inverse)?;
                ctx.repeat(&format!("{name} q in place"), &shape, &down(&gq)?, &got_q, None);
            }
            Ok(())
        });
    }
    // QK-norm fused with RoPE: GQA, odd t below the table's 64, both training head dims.
    let shapes: &[(usize, usize, usize, usize, usize)] =
        if ctx.quick { &[(2, 37, 4, 2, 64)] } else { &[(2, 37, 4, 2, 64), (3, 19, 6, 1, 128), (2, 512, 8, 2, 128)] };
    for &(b, t, h, h_kv, d) in shapes {
        let shape = format!("b{b} t{t} h{h}/{h_kv} d{d}");
        ctx.case("rope_qknorm", &shape, |ctx| rope_qknorm_case(ctx, &shape, (b, t, h, h_kv, d)));
    }
    Ok(())
}

fn rope_qknorm_case(ctx: &mut Ctx, shape: &str, (b, t, h, h_kv, d): (usize, usize, usize, usize, usize)) -> Result<()> {
    let be = ctx.be;
    let (nq, nk, nrq, nrk) = (b * t * h * d, b * t * h_kv * d, b * t * h, b * t * h_kv);
    let (q, k) = (rand_bf16(20, nq, 2.0), rand_bf16(21, nk, 2.0));
    let (dq, dk) = (rand_bf16(22, nq, 1.0), rand_bf16(23, nk, 1.0));
    let cpu_table = cpu::rope::RopeTable::new(d, t.max(64), 10000.0);
    let table = cuda::rope::RopeTableGpu::new(be, d, t.max(64), 10000.0)?;
    let dims = (b, t, h, h_kv);
    let (mut wq, mut wk, mut wrq, mut wrk) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nrq], vec![0.0; nrk]);
    cpu::rope::rope_qknorm_forward(&cpu_table, &q, &k, dims, &mut wq, &mut wk, &mut wrq, &mut wrk);
    let (mut wdq, mut wdk) = (vec![0.0; nq], vec![0.0; nk]);
    cpu::rope::rope_qknorm_backward(&cpu_table, &q, &k, &wrq, &wrk, &dq, &dk, dims, &mut wdq, &mut wdk);

    let (gq, gk) = (up(be, &q)?, up(be, &k)?);
    let (oq, ok) = (DeviceBuffer::uninit(be, nq)?, DeviceBuffer::uninit(be, nk)?);
    let (rq, rk) = (DeviceBuffer::<f32>::uninit(be, nrq)?, DeviceBuffer::<f32>::uninit(be, nrk)?);
    let (gdq, gdk) = (DeviceBuffer::uninit(be, nq)?, DeviceBuffer::uninit(be, nk)?);
    let (udq, udk) = (up(be, &dq)?, up(be, &dk)?);
    let mut first: Option<[Vec<f32>; 2]> = None;
    for _ in 0..2 {
        cuda::rope::rope_qknorm_forward(be, &table, &gq, &gk, dims, &oq, &ok, &rq, &rk)?;
        cuda::rope::rope_qknorm_backward(be, &table, &gq, &gk, &rq, &rk, &udq, &udk, dims, &gdq, &gdk)?;
        let (gotq, gotdq) = (down(&oq)?, down(&gdq)?);
        if let Some([q1, dq1]) = &first {
            ctx.repeat("rope_qknorm q", shape, &gotq, q1, None);
            ctx.repeat("rope_qknorm dq_raw", shape, &gotdq, dq1, None);
            break;
        }
        // q alone (the tape's op, no k heads) gives the same bits
        let (oq1, rq1, gdq1) =
            (DeviceBuffer::uninit(be, nq)?, DeviceBuffer::<f32>::uninit(be, nrq)?, DeviceBuffer::uninit(be, nq)?);
        cuda::rope::rope_qknorm_one_forward(be, &table, &gq, (b, t, h), &oq1, &rq1)?;
        cuda::rope::rope_qknorm_one_backward(be, &table, &gq, &rq1, &udq, (b, t, h), &gdq1)?;
        ctx.repeat("rope_qknorm q alone", shape, &down(&oq1)?, &gotq, None);
        ctx.repeat("rope_qknorm dq_raw alone", shape, &down(&gdq1)?, &gotdq, None);
        let rstd = Tol::f32_math(1e-5, 1e-4);
        ctx.close("rope_qknorm q", shape, &gotq, &wq, Tol::bf16_once());
        ctx.close("rope_qknorm k", shape, &down(&ok)?, &wk, Tol::bf16_once());
        ctx.close("rope_qknorm rstd_q", shape, &down32(&rq)?, &wrq, rstd);
        ctx.close("rope_qknorm rstd_k", shape, &down32(&rk)?, &wrk, rstd);
        ctx.close("rope_qknorm dq_raw", shape, &gotdq, &wdq, Tol::bf16_once());
        ctx.close("rope_qknorm dk_raw", shape, &down(&gdk)?, &wdk, Tol::bf16_once());
        first = Some([gotq, gotdq]);
    }
    Ok(())
}

pub fn norm(ctx: &mut Ctx) -> Result<()> {
    let shapes: &[(usize, usize)] =
        if ctx.quick { &[(5, 64), (33, 768)] } else { &[(5, 64), (33, 768), (3, 4104), (4096, 1024)] };
    for &(rows, dim) in shapes {
        let shape = format!("{rows}x{dim}");
        ctx.case("rmsnorm", &shape, |ctx| {
            let be = ctx.be;
            let x = rand_bf16(3, rows * dim, 2.0);
            let dy = rand_bf16(4, rows * dim, 1.0);
            let (mut y, mut rstd, mut dx) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; x.len()]);
            cpu::norm::rmsnorm_forward(&x, dim, &mut y, &mut rstd);
            cpu::norm::rmsnorm_backward(&x, &rstd, &dy, dim, &mut dx);
            let gx = up(be, &x)?;
            let (gy, gr) = (DeviceBuffer::uninit(be, x.len())?, DeviceBuffer::<f32>::uninit(be, rows)?);
            let gdx = DeviceBuffer::uninit(be, x.len())?;
            let gdy = up(be, &dy)?;
            cuda::norm::rmsnorm_forward(be, &gx, dim, &gy, &gr)?;
            cuda::norm::rmsnorm_backward(be, &gx, &gr, &gdy, dim, &gdx)?;
            let (got_y, got_dx) = (down(&gy)?, down(&gdx)?);
            ctx.close("rmsnorm y", &shape, &got_y, &y, Tol::bf16_once());
            ctx.close("rmsnorm rstd", &shape, &down32(&gr)?, &rstd, Tol::f32_math(1e-5, 1e-4));
            ctx.close("rmsnorm dx", &shape, &got_dx, &dx, Tol::bf16_once());
            cuda::norm::rmsnorm_forward(be, &gx, dim, &gy, &gr)?;
            cuda::norm::rmsnorm_backward(be, &gx, &gr, &gdy, dim, &gdx)?;
            ctx.repeat("rmsnorm y", &shape, &down(&gy)?, &got_y, None);
            ctx.repeat("rmsnorm dx", &shape, &down(&gdx)?, &got_dx, None);
            Ok(())
        });
        ctx.case("layernorm", &shape, |ctx| layernorm_case(ctx, rows, dim));
    }
    Ok(())
}

/// The affine LayerNorm (the v32 indexer's key norm). y and dx are element-wise f32 math rounded
/// once to bf16 (`Tol::bf16_once`); mean and 1/std are f32 statistics; dγ and dβ are f32 sums
/// over the rows rounded once, the error model of a GEMM with a bf16 output over k = rows.
fn layernorm_case(ctx: &mut Ctx, rows: usize, dim: usize) -> Result<()> {
    let (be, shape) = (ctx.be, format!("{rows}x{dim}"));
    let (x, dy) = (rand_bf16(5, rows * dim, 2.0), rand_bf16(6, rows * dim, 1.0));
    let (gamma, beta) = (rand_bf16(7, dim, 1.0), rand_bf16(8, dim, 0.5));
    let (mut y, mut stats) = (vec![0.0; x.len()], vec![0.0; 2 * rows]);
    cpu::norm::layernorm_forward(&x, &gamma, &beta, dim, &mut y, &mut stats);
    let (dx, dg, db) = cpu::norm::layernorm_backward(&x, &stats, &gamma, &dy, dim);
    let (gx, gdy, gg, gb) = (up(be, &x)?, up(be, &dy)?, up(be, &gamma)?, up(be, &beta)?);
    let (gy, gs) = (DeviceBuffer::uninit(be, x.len())?, DeviceBuffer::<f32>::uninit(be, 2 * rows)?);
    let (gdx, gdg, gdb) =
        (DeviceBuffer::uninit(be, x.len())?, DeviceBuffer::uninit(be, dim)?, DeviceBuffer::uninit(be, dim)?);
    cuda::norm::layernorm_forward(be, &gx, (&gg, &gb), dim, &gy, &gs)?;
    cuda::norm::layernorm_backward(be, (&gx, &gs, &gg, &gdy), dim, &gdx, (&gdg, &gdb))?;
    let got_y = down(&gy)?;
    ctx.close("layernorm y", &shape, &got_y, &y, Tol::bf16_once());
    ctx.close("layernorm stats", &shape, &down32(&gs)?, &stats, Tol::f32_math(1e-5, 1e-4));
    ctx.close("layernorm dx", &shape, &down(&gdx)?, &dx, Tol::bf16_once());
    ctx.close("layernorm dgamma", &shape, &down(&gdg)?, &dg, Tol::gemm_bf16(rows));
    ctx.close("layernorm dbeta", &shape, &down(&gdb)?, &db, Tol::gemm_bf16(rows));
    cuda::norm::layernorm_forward(be, &gx, (&gg, &gb), dim, &gy, &gs)?;
    ctx.repeat("layernorm y", &shape, &down(&gy)?, &got_y, None);
    Ok(())
}

pub fn swiglu(ctx: &mut Ctx) -> Result<()> {
    // not a multiple of 8: exercises the scalar tail
    let sizes: &[usize] = if ctx.quick { &[4099] } else { &[4099, 1 << 20] };
    for &n in sizes {
        let shape = format!("n {n}");
        ctx.case("swiglu", &shape, |ctx| {
            let be = ctx.be;
            let (g, u, dy) = (rand_bf16(5, n, 4.0), rand_bf16(6, n, 2.0), rand_bf16(7, n, 1.0));
            let (mut y, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            cpu::swiglu::swiglu_forward(&g, &u, &mut y);
            cpu::swiglu::swiglu_backward(&g, &u, &dy, &mut dg, &mut du);
            let (gg, gu, gdy) = (up(be, &g)?, up(be, &u)?, up(be, &dy)?);
            let gy = DeviceBuffer::uninit(be, n)?;
            let (gdg, gdu) = (DeviceBuffer::uninit(be, n)?, DeviceBuffer::uninit(be, n)?);
            cuda::swiglu::swiglu_forward(be, &gg, &gu, &gy)?;
            cuda::swiglu::swiglu_backward(be, &gg, &gu, &gdy, &gdg, &gdu)?;
            let (got_y, got_dg) = (down(&gy)?, down(&gdg)?);
            ctx.close("swiglu y", &shape, &got_y, &y, Tol::bf16_once());
            ctx.close("swiglu dg", &shape, &got_dg, &dg, Tol::bf16_once());
            ctx.close("swiglu du", &shape, &down(&gdu)?, &du, Tol::bf16_once());
            cuda::swiglu::swiglu_forward(be, &gg, &gu, &gy)?;
            cuda::swiglu::swiglu_backward(be, &gg, &gu, &gdy, &gdg, &gdu)?;
            ctx.repeat("swiglu y", &shape, &down(&gy)?, &got_y, None);
            ctx.repeat("swiglu dg", &shape, &down(&gdg)?, &got_dg, None);
            Ok(())
        });
    }
    Ok(())
}

pub fn embedding(ctx: &mut Ctx) -> Result<()> {
    let shapes: &[(usize, usize, usize)] =
        if ctx.quick { &[(50, 96, 200)] } else { &[(50, 96, 200), (4096, 512, 8192)] };
    for &(vocab, dim, n) in shapes {
        let shape = format!("V{vocab} C{dim} n{n}");
        ctx.case("embedding", &shape, |ctx| {
            let be = ctx.be;
            let table = rand_bf16(8, vocab * dim, 1.0);
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + i / 3) % vocab as u32).collect();
            let dout = rand_bf16(9, n * dim, 1.0);
            let mut out = vec![0.0; n * dim];
            let mut dtable = vec![0.0; vocab * dim];
            cpu::embedding::embedding_forward(&table, dim, &ids, &mut out);
            cpu::embedding::embedding_backward(&dout, dim, &ids, &mut dtable);
            let gt = DeviceBuffer::from_host(be, &table)?;
            let gi = DeviceBuffer::from_host(be, &ids)?;
            let go = DeviceBuffer::uninit(be, n * dim)?;
            cuda::embedding::embedding_forward(be, &gt, dim, &gi, &go)?;
            // the table values are bf16-exact: the gather is exact
            ctx.close("embedding out", &shape, &down(&go)?, &out, Tol::EXACT);
            let gdout = up(be, &dout)?;
            let gd = DeviceBuffer::<f32>::zeros(be, vocab * dim)?;
            cuda::embedding::embedding_backward(be, &gdout, dim, &gi, &gd)?;
            let got = down32(&gd)?;
            // f32 sums of a few rows in atomics order
            ctx.close("embedding dtable", &shape, &got, &dtable, Tol::f32_math(1e-5, 1e-5));
            gd.fill_zero()?;
            cuda::embedding::embedding_backward(be, &gdout, dim, &gi, &gd)?;
            ctx.repeat("embedding dtable", &shape, &down32(&gd)?, &got, Some(atomics_rerun(&got)));
            Ok(())
        });
    }
    Ok(())
}

pub fn loss(ctx: &mut Ctx) -> Result<()> {
    let shapes: &[(usize, usize)] = if ctx.quick { &[(9, 4104)] } else { &[(9, 4104), (256, 32768)] };
    for &(rows, vocab) in shapes {
        for cap in [0.0f32, 15.0] {
            let shape = format!("{rows}x{vocab} cap {cap}");
            ctx.case("cross_entropy", &shape, |ctx| {
                let be = ctx.be;
                let z = rand_bf16(10, rows * vocab, 40.0);
                let targets: Vec<i32> =
                    (0..rows as i32).map(|r| if r == 4 { -1 } else { (r * 977) % vocab as i32 }).collect();
                let (mut loss, mut lse, mut dz) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; z.len()]);
                cpu::loss::softcap_cross_entropy_forward(&z, vocab, &targets, cap, &mut loss, &mut lse);
                cpu::loss::softcap_cross_entropy_backward(&z, vocab, &targets, cap, &lse, 0.125, &mut dz);
                let gz = up(be, &z)?;
                let gt = DeviceBuffer::from_host(be, &targets)?;
                let (gl, gs) = (DeviceBuffer::<f32>::uninit(be, rows)?, DeviceBuffer::<f32>::uninit(be, rows)?);
                let gdz = DeviceBuffer::uninit(be, z.len())?;
                cuda::loss::softcap_cross_entropy_forward(be, &gz, vocab, &gt, cap, &gl, &gs)?;
                cuda::loss::softcap_cross_entropy_backward(be, &gz, vocab, &gt, cap, &gs, 0.125, &gdz)?;
                let (got_l, got_dz) = (down32(&gl)?, down(&gdz)?);
                ctx.close("ce loss", &shape, &got_l, &loss, Tol::f32_math(1e-4, 1e-4));
                ctx.close("ce lse", &shape, &down32(&gs)?, &lse, Tol::f32_math(1e-4, 1e-4));
                // one bf16 rounding of softmax − onehot, scaled (values down to ~1e-20: atol tiny)
                ctx.close("ce dlogits", &shape, &got_dz, &dz, Tol::new(1e-4, 1e-2, 2.0 * super::compare::U_BF16));
                cuda::loss::softcap_cross_entropy_forward(be, &gz, vocab, &gt, cap, &gl, &gs)?;
                cuda::loss::softcap_cross_entropy_backward(be, &gz, vocab, &gt, cap, &gs, 0.125, &gdz)?;
                ctx.repeat("ce loss", &shape, &down32(&gl)?, &got_l, None);
                ctx.repeat("ce dlogits", &shape, &down(&gdz)?, &got_dz, None);
                Ok(())
            });
        }
    }
    Ok(())
}

pub fn optim(ctx: &mut Ctx) -> Result<()> {
    let n = if ctx.quick { 10_001 } else { 1_000_003 };
    let shape = format!("n {n}");
    ctx.case("adamw", &shape, |ctx| {
        let be = ctx.be;
        let p0 = rand_bf16(11, n, 1.0);
        let g = rand_bf16(12, n, 0.1);
        let h = cpu::optim::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3 };
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.01f32; n], vec![0.001f32; n]);
        cpu::optim::adamw_update(&mut p, &g, &mut m, &mut v, h);
        let run = |be| -> Result<[Vec<f32>; 4]> {
            let gp = DeviceBuffer::from_host(be, &p0)?;
            let gg = DeviceBuffer::from_host(be, &g)?;
            let gm = DeviceBuffer::from_host(be, &vec![0.01f32; n])?;
            let gv = DeviceBuffer::from_host(be, &vec![0.001f32; n])?;
            let gb = DeviceBuffer::<bf16>::uninit(be, n)?;
            cuda::optim::adamw_update(be, &gp, &gg, &gm, &gv, Some(&gb), h)?;
            Ok([down32(&gp)?, down32(&gm)?, down32(&gv)?, down(&gb)?])
        };
        let got = run(be)?;
        ctx.close("adamw p", &shape, &got[0], &p, Tol::f32_math(1e-6, 1e-5));
        ctx.close("adamw m", &shape, &got[1], &m, Tol::f32_math(1e-7, 1e-5));
        ctx.close("adamw v", &shape, &got[2], &v, Tol::f32_math(1e-8, 1e-5));
        ctx.close("adamw p_bf16", &shape, &got[3], &p, Tol::bf16_once());
        ctx.repeat("adamw p", &shape, &run(be)?[0], &got[0], None);
        Ok(())
    });
    ctx.case("clip_grad_norm", &shape, |ctx| {
        let be = ctx.be;
        let (g, g2) = (rand_bf16(12, n, 0.1), rand_bf16(13, 777, 3.0));
        let mut grads = vec![g.clone(), g2.clone()];
        let cpu_ops = crate::backend::CpuOps::new(&crate::nn::ModelConfig::preset("tiny")?);
        let want = crate::backend::Backend::clip_grad_norm(&cpu_ops, &mut grads, 1.0)?;
        let g1d = DeviceBuffer::from_host(be, &g)?;
        let g2d = DeviceBuffer::from_host(be, &g2)?;
        let got = cuda::optim::clip_grad_norm(be, &[&g1d, &g2d], 1.0)?;
        ctx.close("grad norm", &shape, &[got], &[want], Tol::f32_math(0.0, 1e-4));
        ctx.close("clipped grads", &shape, &down32(&g1d)?, &grads[0], Tol::f32_math(1e-7, 1e-5));
        ctx.close("clipped grads (2nd)", "n 777", &down32(&g2d)?, &grads[1], Tol::f32_math(1e-7, 1e-5));
        Ok(())
    });
    let shapes: &[(usize, usize)] =
        if ctx.quick { &[(64, 192)] } else { &[(64, 192), (192, 64), (128, 128), (768, 2048)] };
    let cfg = {
        let mut m = crate::nn::ModelConfig::preset("tiny")?;
        m.head_dim = 64;
        m
    };
    let mut ops = None;
    ctx.case("muon engine", "-", |ctx| {
        ops = Some(crate::backend::CudaOps::new(ctx.open()?, &cfg)?);
        Ok(())
    });
    let Some(ops) = ops else { return Ok(()) };
    let cpu_ops = crate::backend::CpuOps::new(&cfg);
    for &(rows, cols) in shapes {
        let shape = format!("{rows}x{cols}");
        ctx.case("muon", &shape, |ctx| muon_case(ctx, (&ops, &cpu_ops), &shape, rows, cols));
    }
    Ok(())
}

type MuonOps<'a> = (&'a crate::backend::CudaOps, &'a crate::backend::CpuOps);

fn muon_case(ctx: &mut Ctx, (ops, cpu_ops): MuonOps, shape: &str, rows: usize, cols: usize) -> Result<()> {
    use crate::backend::Backend;
    let n = rows * cols;
    let (g, buf) = (rand_bf16(71, n, 1.0), rand_bf16(72, n, 1.0));
    let (mut gbuf, gg) = (ops.f_from(&buf)?, ops.f_from(&g)?);
    let u = ops.muon_momentum(&mut gbuf, &gg, 0.95)?;
    let mut cbuf = buf.clone();
    let cu = cpu_ops.muon_momentum(&mut cbuf, &g, 0.95)?;
    ctx.close("muon momentum buf", shape, &gbuf.to_host()?, &cbuf, Tol::f32_math(1e-6, 1e-5));
    ctx.close("muon momentum u", shape, &u.to_host()?, &cu, Tol::f32_math(1e-6, 1e-5));
    let o = ops.newton_schulz(&u, rows, cols, 5)?;
    let co = cpu::optim::newton_schulz(&cu, rows, cols, 5);
    let got_o = down(&o)?;
    ctx.close("newton_schulz", shape, &got_o, &co, Tol::new(3e-2, 0.0, 1e-1));
    ctx.repeat("newton_schulz", shape, &down(&ops.newton_schulz(&u, rows, cols, 5)?)?, &got_o, None);
    let w = rand_bf16(73, n, 0.1);
    let (mut gw, mut gwa) = (ops.f_from(&w)?, DeviceBuffer::<bf16>::zeros(&ops.be, n)?);
    ops.muon_apply(&mut gw, Some(&mut gwa), &o, 0.99, 0.02)?;
    let want: Vec<f32> = w.iter().zip(&got_o).map(|(x, oi)| x * 0.99 - 0.02 * oi).collect();
    ctx.close("muon_apply", shape, &gw.to_host()?, &want, Tol::f32_math(1e-6, 1e-5));
    ctx.close("muon_apply bf16 copy", shape, &down(&gwa)?, &want, Tol::new(1e-3, 1e-2, 2.0 * super::compare::U_BF16));
    Ok(())
}
