//! DSA parity (`cuda/dsa.cu` against `cpu::dsa`).
//!
//! Tolerances, by what differs between the two sides:
//! - selection (`indexer_topk`, chunked, decode): **identical** index sets. The indexer inputs
//!   are small integers (exact in bf16), so every product and partial sum of the scores is an
//!   exact integer in f32 on both sides whatever the summation order: the scores agree bit for
//!   bit, many tie, and the tie rule (the more recent key wins) is exercised for real;
//! - sparse attention keeps P in f32: out is one bf16 rounding ([`Tol::bf16_once`]), lse f32
//!   (1e-4, norm 2e-5); the f32 gradients differ by summation order, the exp2 implementations
//!   and the order of the atomic additions into dk, dv: element-wise 5e-3, norm 5e-4 (f32
//!   noise is ~1e-6; the bound leaves room for exp2f's 2 ulp over many terms);
//! - indexer KL: f32 on both sides; a sum of p(ln p − ln r) terms that partly cancel: loss atol
//!   1e-5, rtol 1e-3; gradients atol 1e-3 × their largest magnitude, rtol 1e-3, norm 1e-3.
//!
//! The same sparse-attention rows run MLA's per-head shapes (d_qk, d_v) = (96, 64), (192, 128)
//! and V3.2's MQA over the latent (one key head of 576 columns, the values its first 512: dv is
//! added into dk, compared as d(kv) = dk + [dv | 0]) under the same tolerances: everything is
//! f32 but out, and the wider dot products (576 terms) add f32 rounding of ~576 · 2⁻²⁴ relative,
//! far inside 5e-3.
//!
//! Reruns: selections bitwise (the radix histogram's atomics count integers), forward bitwise,
//! dq bitwise, dk, dv and the KL's dk_I at f32 summation-order tolerance (atomics).

use super::compare::Tol;
use super::{atomics_rerun, down, down32, rand_bf16, up, Ctx};
use crate::backend::cpu;
use crate::backend::cpu::dsa::{DsaDims, PAD};
use crate::backend::cuda::{self, CudaBackend, DeviceBuffer};
use anyhow::Result;
use half::bf16;

fn tag(d: &DsaDims) -> String {
    format!(
        "b{} t{} h{}/{} d{} I{}x{} k{} w{}",
        d.b, d.t, d.h, d.h_kv, d.d, d.n_index_heads, d.index_dim, d.topk, d.window
    )
}

/// Deterministic integers in [-amp, amp] (as f32, exact in bf16).
fn rand_int(seed: u64, n: usize, amp: i32) -> Vec<f32> {
    rand_bf16(seed, n, 1.0)
        .iter()
        .map(|&u| ((u + 1.0) * 0.5 * (2 * amp + 1) as f32).floor().min((2 * amp) as f32) - amp as f32)
        .collect()
}

fn cpu_select(dims: &DsaDims, qi: &[f32], ki: &[f32], wi: &[f32]) -> Vec<u32> {
    let mut sel = vec![7u32; dims.sel_len()];
    cpu::dsa::indexer_topk(dims, qi, ki, wi, &mut sel);
    sel
}

fn gpu_select(be: &CudaBackend, dims: &DsaDims, x: [&[f32]; 3], chunk: Option<usize>) -> Result<Vec<u32>> {
    let sel = DeviceBuffer::<u32>::from_host(be, &vec![7u32; dims.sel_len()])?;
    let (gqi, gki, gwi) = (up(be, x[0])?, up(be, x[1])?, up(be, x[2])?);
    match chunk {
        None => cuda::dsa::indexer_topk(be, dims, &gqi, &gki, &gwi, &sel)?,
        Some(rows) => cuda::dsa::indexer_topk_chunked(be, dims, &gqi, &gki, &gwi, &sel, rows)?,
    }
    Ok(sel.to_host()?)
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    topk(ctx);
    attention(ctx);
    kl(ctx);
    decode(ctx);
    Ok(())
}

fn topk(ctx: &mut Ctx) {
    // (t, H_I, d_I, topk, window): several tiles, d_I not a multiple of the 32-wide chunk,
    // window only, top-k only, both, top-k larger than most rows.
    let mut cases = vec![(37, 2, 8, 5, 3), (200, 4, 40, 16, 8), (130, 1, 16, 0, 7)];
    if !ctx.quick {
        cases.extend([(300, 3, 64, 40, 0), (257, 8, 32, 100, 20), (520, 2, 24, 64, 16), (2048, 4, 64, 256, 64)]);
    }
    for (n, &(t, hi, di, topk, window)) in cases.iter().enumerate() {
        let dims = DsaDims::new(2, t, 1, 1, 64, hi, di, topk, window);
        let shape = tag(&dims);
        ctx.case("dsa topk", &shape, |ctx| {
            let s = 100 + 3 * n as u64;
            let (qi, ki, wi) =
                (rand_int(s, dims.qi_len(), 2), rand_int(s + 1, dims.ki_len(), 2), rand_int(s + 2, dims.wi_len(), 2));
            let want = cpu_select(&dims, &qi, &ki, &wi);
            let got = gpu_select(ctx.be, &dims, [&qi, &ki, &wi], None)?;
            ctx.equal("dsa topk sel", &shape, &got, &want);
            // chunks of 64 query rows: the workspace offsets q0 > 0
            ctx.equal(
                "dsa topk sel (chunks of 64)",
                &shape,
                &gpu_select(ctx.be, &dims, [&qi, &ki, &wi], Some(64))?,
                &want,
            );
            ctx.equal(
                "dsa topk sel (rerun, bitwise)",
                &shape,
                &gpu_select(ctx.be, &dims, [&qi, &ki, &wi], None)?,
                &got,
            );
            Ok(())
        });
    }
    let dims = DsaDims::new(1, 150, 1, 1, 64, 2, 16, 10, 3);
    ctx.case("dsa topk ties", &tag(&dims), |ctx| {
        let shape = tag(&dims);
        let ki = rand_int(7, dims.ki_len(), 3);
        let wi = rand_int(8, dims.wi_len(), 3);
        // Every score 0 (qi = 0): ties everywhere, the most recent keys win (a sliding window).
        let qi = vec![0.0; dims.qi_len()];
        let sel = gpu_select(ctx.be, &dims, [&qi, &ki, &wi], None)?;
        ctx.equal("dsa topk all tied", &shape, &sel, &cpu_select(&dims, &qi, &ki, &wi));
        let kmax = dims.kmax();
        let window_ok = (0..dims.t).all(|i| {
            let n = dims.n_selected(i);
            let want: Vec<u32> = (i + 1 - n..=i).map(|s| s as u32).collect();
            sel[i * kmax..][..n] == want[..] && sel[i * kmax + n..(i + 1) * kmax].iter().all(|&s| s == PAD)
        });
        ctx.flag("dsa topk ties: the most recent keys", &shape, window_ok, "not a sliding window");
        // One index key repeated: equal scores again, now non-zero (and some negative weights).
        let qi = rand_int(9, dims.qi_len(), 3);
        let same_ki = ki[..dims.index_dim].repeat(dims.t);
        let got = gpu_select(ctx.be, &dims, [&qi, &same_ki, &wi], None)?;
        ctx.equal("dsa topk one key repeated", &shape, &got, &cpu_select(&dims, &qi, &same_ki, &wi));
        // topk >= t: every key, in order, with and without a window.
        for window in [0, 5] {
            let full = DsaDims::new(2, 90, 1, 1, 64, 2, 16, 90, window);
            let (qi, ki, wi) =
                (rand_int(10, full.qi_len(), 2), rand_int(11, full.ki_len(), 2), rand_int(12, full.wi_len(), 2));
            let sel = gpu_select(ctx.be, &full, [&qi, &ki, &wi], None)?;
            ctx.equal("dsa topk ≥ t", &tag(&full), &sel, &cpu_select(&full, &qi, &ki, &wi));
            let in_order = (0..2 * full.t).all(|r| {
                let (i, row) = (r % full.t, &sel[r * full.kmax()..][..full.kmax()]);
                row[..=i].iter().enumerate().all(|(s, &x)| x == s as u32) && row[i + 1..].iter().all(|&x| x == PAD)
            });
            ctx.flag("dsa topk ≥ t: every key in order", &tag(&full), in_order, "not every key in order");
        }
        Ok(())
    });
}

/// How a sparse-attention case reads its values: a tensor `dv` wide beside k (GQA: dv = d; MLA's
/// per-head shapes), or the first `dv` columns of the one key head (MQA over MLA's latent).
#[derive(Clone, Copy, PartialEq)]
enum Values {
    Tensor(usize),
    Latent(usize),
}

fn attention(ctx: &mut Ctx) {
    let (g, l) = (Values::Tensor, Values::Latent);
    let mut cases = vec![
        (DsaDims::new(2, 150, 4, 2, 64, 2, 16, 40, 16), g(64)),
        (DsaDims::new(1, 133, 6, 2, 128, 2, 16, 24, 8), g(128)),
        (DsaDims::new(1, 120, 2, 2, 96, 2, 16, 24, 8), g(64)),
        (DsaDims::new(1, 100, 2, 2, 192, 2, 16, 24, 8), g(128)),
        // V3.2's MQA over the latent: 16 heads share one 576-wide key row (2 blocks per token
        // in the backward, 1 in the forward)
        (DsaDims::new(1, 80, 16, 1, 576, 2, 16, 24, 8), l(512)),
    ];
    if !ctx.quick {
        cases.extend([
            (DsaDims::new(1, 70, 4, 1, 128, 1, 8, 70, 0), g(128)),
            (DsaDims::new(2, 1024, 8, 2, 128, 4, 32, 128, 64), g(128)),
            (DsaDims::new(2, 512, 4, 4, 192, 4, 32, 64, 32), g(128)),
            (DsaDims::new(2, 300, 20, 1, 576, 2, 16, 64, 16), l(512)), // uneven head chunks
        ]);
    }
    for (dims, values) in cases {
        let (dw, latent) = match values {
            Values::Tensor(dv) => (dv, false),
            Values::Latent(dv) => (dv, true),
        };
        let shape = format!("{} dv{dw}{}", tag(&dims), if latent { " latent" } else { "" });
        ctx.case("dsa attention", &shape, |ctx| {
            let be = ctx.be;
            let (qi, ki, wi) = (
                rand_bf16(30, dims.qi_len(), 1.0),
                rand_bf16(31, dims.ki_len(), 1.0),
                rand_bf16(32, dims.wi_len(), 1.0),
            );
            let sel = cpu_select(&dims, &qi, &ki, &wi);
            let (ql, kl, ol, vl) =
                (dims.q_len(), dims.kv_len(), dims.q_len() / dims.d * dw, dims.kv_len() / dims.d * dw);
            let q = rand_bf16(33, ql, 1.0);
            let k = rand_bf16(34, kl, 1.0);
            // the latent's values are its key rows' first dw columns
            let v =
                if latent { k.chunks(dims.d).flat_map(|r| r[..dw].to_vec()).collect() } else { rand_bf16(35, vl, 1.0) };
            let dout = rand_bf16(36, ol, 1.0);
            let (mut out, mut lse) = (vec![0.0; ol], vec![0.0; dims.lse_len()]);
            cpu::dsa::dsa_attention_forward_dv(&dims, dw, [&q, &k, &v], &sel, &mut out, &mut lse);

            let gsel = DeviceBuffer::from_host(be, &sel)?;
            let (gq, gk, gv, gdo) = (up(be, &q)?, up(be, &k)?, up(be, &v)?, up(be, &dout)?);
            let go = DeviceBuffer::<bf16>::uninit(be, ol)?;
            let gl = DeviceBuffer::<f32>::uninit(be, dims.lse_len())?;
            // (dq, dk, dv); the latent's dv is folded into dk (returned empty)
            let run = |go: &DeviceBuffer<bf16>, gl: &DeviceBuffer<f32>| -> Result<[Vec<f32>; 3]> {
                // garbage in the outputs: dq must be overwritten, dk and dv zeroed first
                let gdq = DeviceBuffer::from_host(be, &vec![f32::NAN; ql])?;
                let gdk = DeviceBuffer::from_host(be, &vec![3.0f32; kl])?;
                let gdv = DeviceBuffer::from_host(be, &vec![-2.0f32; vl])?;
                if latent {
                    cuda::dsa::dsa_attention_latent_forward(be, &dims, &gq, &gk, &gsel, go, gl)?;
                    cuda::dsa::dsa_attention_latent_backward(be, &dims, &gq, &gk, &gsel, go, gl, &gdo, [&gdq, &gdk])?;
                    return Ok([down32(&gdq)?, down32(&gdk)?, Vec::new()]);
                }
                cuda::dsa::dsa_attention_forward_dv(be, &dims, dw, &gq, &gk, &gv, &gsel, go, gl)?;
                let grads = [&gdq, &gdk, &gdv];
                cuda::dsa::dsa_attention_backward_dv(be, &dims, dw, &gq, &gk, &gv, &gsel, go, gl, &gdo, grads)?;
                Ok([down32(&gdq)?, down32(&gdk)?, down32(&gdv)?])
            };
            let grads = run(&go, &gl)?;
            let (gout, glse) = (down(&go)?, down32(&gl)?);
            ctx.close("dsa out", &shape, &gout, &out, Tol::bf16_once());
            ctx.close("dsa lse", &shape, &glse, &lse, Tol::new(1e-4, 1e-4, 2e-5));
            let (mut dq, mut dk, mut dv) = (vec![0.0; ql], vec![0.0; kl], vec![0.0; vl]);
            let ins: [&[f32]; 5] = [&q, &k, &v, &gout, &lse];
            cpu::dsa::dsa_attention_backward_dv(&dims, dw, ins, &sel, &dout, [&mut dq, &mut dk, &mut dv]);
            let mut want = vec![("dq", dq), ("dk", dk), ("dv", dv)];
            if latent {
                // d(kv) = dk + dv in the value columns
                let dv = want.pop().expect("dv").1;
                for (row, dvr) in want[1].1.chunks_mut(dims.d).zip(dv.chunks(dw)) {
                    row[..dw].iter_mut().zip(dvr).for_each(|(a, b)| *a += b);
                }
                want[1].0 = "dkv";
            }
            for (i, (name, want)) in want.iter().enumerate() {
                ctx.close(&format!("dsa {name}"), &shape, &grads[i], want, Tol::new(5e-3, 5e-3, 5e-4));
            }
            let (go2, gl2) = (DeviceBuffer::<bf16>::uninit(be, ol)?, DeviceBuffer::<f32>::uninit(be, dims.lse_len())?);
            let again = run(&go2, &gl2)?;
            ctx.repeat("dsa out", &shape, &down(&go2)?, &gout, None);
            ctx.repeat("dsa lse", &shape, &down32(&gl2)?, &glse, None);
            ctx.repeat("dsa dq", &shape, &again[0], &grads[0], None);
            ctx.repeat("dsa dk", &shape, &again[1], &grads[1], Some(atomics_rerun(&grads[1])));
            if !latent {
                ctx.repeat("dsa dv", &shape, &again[2], &grads[2], Some(atomics_rerun(&grads[2])));
            }
            Ok(())
        });
    }
}

/// The indexer KL, sparse (over the selection, lse of the sparse attention) and dense (the
/// warm-up: every key s ≤ t, lse of the dense attention).
fn kl(ctx: &mut Ctx) {
    let mut cases = vec![DsaDims::new(2, 130, 4, 2, 64, 4, 32, 24, 8), DsaDims::new(1, 77, 4, 4, 64, 3, 16, 5, 40)];
    if !ctx.quick {
        cases
            .extend([DsaDims::new(1, 100, 2, 1, 128, 8, 64, 100, 0), DsaDims::new(2, 1024, 4, 2, 128, 4, 64, 128, 64)]);
    }
    for dense in [false, true] {
        for dims in &cases {
            let (shape, label) = (tag(dims), if dense { "dsa kl dense" } else { "dsa kl" });
            ctx.case(label, &shape, |ctx| kl_case(ctx, dims, dense, label, &shape));
        }
    }
}

fn kl_case(ctx: &mut Ctx, dims: &DsaDims, dense: bool, label: &str, shape: &str) -> Result<()> {
    let be = ctx.be;
    let s = if dense { 50 } else { 40 };
    let (qi, ki, wi) =
        (rand_bf16(s, dims.qi_len(), 1.0), rand_bf16(s + 1, dims.ki_len(), 1.0), rand_bf16(s + 2, dims.wi_len(), 1.0));
    let sel = cpu_select(dims, &qi, &ki, &wi);
    let q = rand_bf16(s + 3, dims.q_len(), 2.0);
    let k = rand_bf16(s + 4, dims.kv_len(), 2.0);
    let v = rand_bf16(s + 5, dims.kv_len(), 1.0);
    let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
    if dense {
        cpu::attention::attention_forward(&dims.attn(), &q, &k, &v, &mut out, &mut lse);
    } else {
        cpu::dsa::dsa_attention_forward(dims, &q, &k, &v, &sel, &mut out, &mut lse);
    }
    let (mut dqi, mut dki, mut dwi) = (vec![0.0; dims.qi_len()], vec![0.0; dims.ki_len()], vec![0.0; dims.wi_len()]);
    let sel_arg = (!dense).then_some(&sel[..]);
    let loss = cpu::dsa::indexer_kl(dims, &q, &k, &lse, &qi, &ki, &wi, sel_arg, &mut dqi, &mut dki, &mut dwi);

    let gsel = DeviceBuffer::from_host(be, &sel)?;
    let gl = DeviceBuffer::from_host(be, &lse)?;
    let (gq, gk, gqi, gki, gwi) = (up(be, &q)?, up(be, &k)?, up(be, &qi)?, up(be, &ki)?, up(be, &wi)?);
    let run = || -> Result<[Vec<f32>; 4]> {
        let gdqi = DeviceBuffer::from_host(be, &vec![f32::NAN; dims.qi_len()])?;
        let gdki = DeviceBuffer::from_host(be, &vec![5.0f32; dims.ki_len()])?;
        let gdwi = DeviceBuffer::from_host(be, &vec![f32::NAN; dims.wi_len()])?;
        let gloss = DeviceBuffer::<f32>::uninit(be, 1)?;
        let gs = (!dense).then_some(&gsel);
        cuda::dsa::indexer_kl(be, dims, &gq, &gk, &gl, &gqi, &gki, &gwi, gs, [&gdqi, &gdki, &gdwi], &gloss)?;
        Ok([down32(&gloss)?, down32(&gdqi)?, down32(&gdki)?, down32(&gdwi)?])
    };
    let got = run()?;
    ctx.close(&format!("{label} loss"), shape, &got[0], &[loss], Tol::new(1e-5, 1e-3, 1e-3));
    for (i, (name, want)) in [("dqi", &dqi), ("dki", &dki), ("dwi", &dwi)].into_iter().enumerate() {
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        ctx.flag(&format!("{label} {name} does not vanish"), shape, scale > 0.0, "the CPU gradient is zero");
        ctx.close(&format!("{label} {name}"), shape, &got[i + 1], want, Tol::new(1e-3 * scale, 1e-3, 1e-3));
    }
    let again = run()?;
    ctx.repeat(&format!("{label} loss"), shape, &again[0], &got[0], None);
    ctx.repeat(&format!("{label} dqi"), shape, &again[1], &got[1], None);
    ctx.repeat(&format!("{label} dki"), shape, &again[2], &got[2], Some(atomics_rerun(&got[2])));
    Ok(())
}

/// The last token's rows of a `[b, t, width]` tensor: `[b, width]`.
fn last_rows(x: &[f32], dims: &DsaDims, width: usize) -> Vec<f32> {
    (0..dims.b).flat_map(|bi| x[(bi * dims.t + dims.t - 1) * width..][..width].iter().copied()).collect()
}

/// Decode: the new token (the last of `t` cached positions) against the caches equals the CPU's
/// full-sequence last row: the selection exactly, the attention at the sparse tolerances.
fn decode(ctx: &mut Ctx) {
    let mut cases = vec![(37, 2, 8, 5, 3, false), (150, 2, 16, 10, 3, true)];
    if !ctx.quick {
        cases.extend([(200, 4, 40, 16, 8, false), (300, 3, 63, 40, 0, false), (130, 1, 16, 0, 7, false)]);
        cases.extend([(520, 8, 32, 100, 20, false), (90, 2, 16, 90, 5, false)]);
    }
    for (n, &(t, hi, di, topk, window, zero_q)) in cases.iter().enumerate() {
        let dims = DsaDims::new(3, t, 1, 1, 64, hi, di, topk, window);
        let shape = tag(&dims);
        ctx.case("dsa topk decode", &shape, |ctx| {
            let be = ctx.be;
            let s = 200 + 3 * n as u64;
            let mut qi = rand_int(s, dims.qi_len(), 2);
            if zero_q {
                qi.fill(0.0);
            }
            let (ki, wi) = (rand_int(s + 1, dims.ki_len(), 2), rand_int(s + 2, dims.wi_len(), 2));
            let kmax = dims.kmax();
            let full = cpu_select(&dims, &qi, &ki, &wi);
            let want: Vec<u32> = (0..dims.b).flat_map(|bi| full[(bi * t + t - 1) * kmax..][..kmax].to_vec()).collect();
            let (qi_l, wi_l) = (last_rows(&qi, &dims, hi * di), last_rows(&wi, &dims, hi));
            let sel = DeviceBuffer::<u32>::from_host(be, &vec![7u32; dims.b * kmax])?;
            cuda::dsa::indexer_topk_decode(be, &dims, &up(be, &qi_l)?, &up(be, &ki)?, &up(be, &wi_l)?, &sel)?;
            ctx.equal("dsa decode sel", &shape, &sel.to_host()?, &want);
            Ok(())
        });
    }
    let mut cases = vec![DsaDims::new(2, 150, 4, 2, 64, 2, 16, 40, 16)];
    if !ctx.quick {
        cases.extend([DsaDims::new(3, 133, 6, 2, 128, 2, 16, 24, 8), DsaDims::new(1, 70, 4, 1, 128, 1, 8, 70, 0)]);
    }
    for dims in cases {
        let shape = tag(&dims);
        ctx.case("dsa attention decode", &shape, |ctx| {
            let be = ctx.be;
            let (qi, ki, wi) = (
                rand_bf16(60, dims.qi_len(), 1.0),
                rand_bf16(61, dims.ki_len(), 1.0),
                rand_bf16(62, dims.wi_len(), 1.0),
            );
            let sel = cpu_select(&dims, &qi, &ki, &wi);
            let (q, k, v) = (
                rand_bf16(63, dims.q_len(), 1.0),
                rand_bf16(64, dims.kv_len(), 1.0),
                rand_bf16(65, dims.kv_len(), 1.0),
            );
            let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
            cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);
            let (h, d, kmax) = (dims.h, dims.d, dims.kmax());
            let out_l = last_rows(&out, &dims, h * d);
            // lse [b, h, t] → [b, h] at t - 1
            let lse_l: Vec<f32> = (0..dims.b * h).map(|r| lse[r * dims.t + dims.t - 1]).collect();
            let sel_l: Vec<u32> =
                (0..dims.b).flat_map(|bi| sel[(bi * dims.t + dims.t - 1) * kmax..][..kmax].to_vec()).collect();
            let gsel = DeviceBuffer::from_host(be, &sel_l)?;
            let go = DeviceBuffer::<bf16>::uninit(be, dims.b * h * d)?;
            let gl = DeviceBuffer::<f32>::uninit(be, dims.b * h)?;
            let gq = up(be, &last_rows(&q, &dims, h * d))?;
            cuda::dsa::dsa_attention_decode(be, &dims, &gq, &up(be, &k)?, &up(be, &v)?, &gsel, &go, &gl)?;
            ctx.close("dsa decode out", &shape, &down(&go)?, &out_l, Tol::bf16_once());
            ctx.close("dsa decode lse", &shape, &down32(&gl)?, &lse_l, Tol::new(1e-4, 1e-4, 2e-5));
            Ok(())
        });
    }
}
