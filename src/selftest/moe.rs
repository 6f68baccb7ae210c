//! MoE parity (`cuda/moe.cu` against `cpu::moe`).
//!
//! The router logits are f32 (computed on the host from bf16 values, as the GEMM would), so both
//! sides route the very same numbers. Tolerances, by what the GPU rounds:
//! - routing: the kernel reproduces the CPU's f32 operations one by one (its polynomial exp, no
//!   fma contraction, the same summation orders): expert ids, kept flags, counts, offsets, order
//!   and position **equal**, ties included; scores and gates at rtol 1e-6 (norm 1e-6);
//! - the expert FFN: grouped GEMMs with f32 accumulation and bf16 hg, hu, act, y (dy, d_act, dh
//!   in the backward) between them where the CPU keeps f32. Each stage adds one rounding (RMS
//!   ≈ u/√3 ≈ 2.3e-3, independent): the forward caches and out chain up to four (norm 1e-2),
//!   the gradients up to eight (√8 · 2.3e-3 ≈ 6.5e-3: norm 2e-2); element-wise, as before,
//!   2e-2 × the reference's RMS plus 2e-2 relative;
//! - the router backward from the same f32 d_gates: f32 math, only the softmax's Σ ds·s order
//!   differs: 1e-6 × RMS, rtol 1e-4, norm 1e-4;
//! - the bias update is exact; the load statistics are f64 rounded to f32: rtol 1e-6.
//!
//! No MoE kernel adds with atomics (the dispatch ranks within warps): reruns are bitwise.

use super::compare::Tol;
use super::{down32, rand_bf16, up, Ctx};
use crate::backend::cpu;
use crate::backend::cpu::moe::{RouterConfig, Routing, ScoreFunc};
use crate::backend::cuda::moe as gpu;
use crate::backend::cuda::{CudaBackend, DeviceBuffer};
use anyhow::{ensure, Result};
use half::bf16;

fn config(e: usize, k: usize, groups: (usize, usize), func: ScoreFunc, cap: Option<f32>) -> RouterConfig {
    RouterConfig {
        n_experts: e,
        top_k: k,
        n_group: groups.0,
        topk_group: groups.1,
        routed_scaling_factor: 2.5,
        score_func: func,
        capacity_factor: cap,
    }
}

fn bf_rows(b: &DeviceBuffer<bf16>, len: usize) -> Result<Vec<f32>> {
    Ok(b.to_host()?[..len].iter().map(|x| x.to_f32()).collect())
}

/// The dispatch is a bijection between positions 0..P and the kept assignments, grouped by
/// expert with tokens ascending, and the tile offsets count 128-row tiles.
fn check_permutation(r: &Routing, tile_offsets: &[u32]) -> Result<()> {
    let (e, k) = (r.n_experts(), r.top_k);
    ensure!(r.order.len() == r.offsets[e], "order holds {} positions, offsets say {}", r.order.len(), r.offsets[e]);
    let mut seen = vec![false; r.n_tokens * k];
    for (pos, &a) in r.order.iter().enumerate() {
        let a = a as usize;
        ensure!(r.kept[a] && !seen[a], "position {pos}: assignment {a} dropped or repeated");
        seen[a] = true;
        ensure!(r.position[a] as usize == pos, "position is not the inverse of order at {pos}");
    }
    ensure!(seen == r.kept, "a kept assignment has no position");
    let mut tiles = 0;
    for (i, &tile_offset) in tile_offsets[..e].iter().enumerate() {
        ensure!(r.offsets[i + 1] - r.offsets[i] == r.counts[i] && r.counts[i] <= r.demand[i], "expert {i}: counts");
        let seg = &r.order[r.offsets[i]..r.offsets[i + 1]];
        ensure!(seg.iter().all(|&a| r.experts[a as usize] as usize == i), "expert {i}: foreign rows");
        ensure!(seg.windows(2).all(|w| w[0] / (k as u32) < w[1] / (k as u32)), "expert {i}: tokens not ascending");
        ensure!(tile_offset == tiles, "expert {i}: tile offset {tile_offset}, expected {tiles}");
        tiles += r.counts[i].div_ceil(128) as u32;
    }
    ensure!(tile_offsets[e] == tiles, "tile total");
    for (a, &kp) in r.kept.iter().enumerate() {
        ensure!(
            kp || (r.position[a] == u32::MAX && r.gates[a] == 0.0),
            "dropped assignment {a} has a position or gate"
        );
    }
    Ok(())
}

fn route_both(
    be: &CudaBackend,
    logits: &[f32],
    bias: &[f32],
    cfg: &RouterConfig,
) -> Result<(Routing, gpu::DeviceRouting)> {
    let want = cpu::moe::route(logits, bias, cfg);
    let gl = DeviceBuffer::from_host(be, logits)?;
    let gb = DeviceBuffer::from_host(be, bias)?;
    Ok((want, gpu::route(be, &gl, &gb, cfg)?))
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    routing(ctx);
    forward_backward(ctx);
    balance(ctx);
    Ok(())
}

fn routing(ctx: &mut Ctx) {
    use ScoreFunc::*;
    let mut cases = vec![
        (config(8, 2, (1, 1), Sigmoid, None), 0.0),
        (config(16, 4, (8, 3), Sigmoid, None), 0.0),       // group limit
        (config(64, 6, (8, 3), Softmax, Some(0.75)), 0.0), // E > 32: several experts per lane; drops
    ];
    if !ctx.quick {
        cases.extend([
            (config(12, 4, (3, 2), Softmax, None), 0.0),
            (config(6, 2, (6, 2), Sigmoid, None), 0.0), // one expert per group
            (config(8, 2, (1, 1), Sigmoid, Some(1.0)), 1.0), // expert 0 favoured by its bias: drops
            (config(40, 3, (1, 1), Sigmoid, Some(1.5)), 0.5),
        ]);
    }
    let n = 1500; // n·K > 1024: several dispatch chunks
    for (ci, (cfg, skew)) in cases.iter().enumerate() {
        let e = cfg.n_experts;
        let shape = format!(
            "n{n} E{e} K{} g{}/{} {:?} cap {:?}",
            cfg.top_k, cfg.n_group, cfg.topk_group, cfg.score_func, cfg.capacity_factor
        );
        ctx.case("moe route", &shape, |ctx| {
            let mut logits = rand_bf16(100 + ci as u64, n * e, 4.0);
            for t in 0..n {
                let row = &mut logits[t * e..(t + 1) * e];
                if t % 50 == 0 {
                    row.fill(0.0); // every expert ties: the lowest indices win
                } else if t % 7 == 0 {
                    for i in (0..e - 1).step_by(2) {
                        row[i + 1] = row[i]; // pairwise ties
                    }
                }
            }
            let mut bias = rand_bf16(200 + ci as u64, e, 0.3);
            for i in (0..e - 1).step_by(2) {
                bias[i + 1] = bias[i]; // so that tied logits give tied keys
            }
            bias[0] += skew;
            let (want, got) = route_both(ctx.be, &logits, &bias, cfg)?;
            let tiles = got.tile_offsets.to_host()?;
            let again = gpu::route(
                ctx.be,
                &DeviceBuffer::from_host(ctx.be, &logits)?,
                &DeviceBuffer::from_host(ctx.be, &bias)?,
                cfg,
            )?;
            let got = got.to_host()?;
            ctx.equal("moe experts", &shape, &got.experts, &want.experts);
            ctx.equal("moe kept", &shape, &got.kept, &want.kept);
            ctx.equal("moe demand", &shape, &got.demand, &want.demand);
            ctx.equal("moe counts", &shape, &got.counts, &want.counts);
            ctx.equal("moe offsets", &shape, &got.offsets, &want.offsets);
            ctx.equal("moe order", &shape, &got.order, &want.order);
            ctx.equal("moe position", &shape, &got.position, &want.position);
            ctx.equal("moe dropped", &shape, &[got.dropped], &[want.dropped]);
            ctx.flag(
                "moe capacity cases drop",
                &shape,
                (want.dropped > 0) == cfg.capacity_factor.is_some(),
                "test case",
            );
            ctx.close("moe scores", &shape, &got.scores, &want.scores, Tol::new(1e-7, 1e-6, 1e-6));
            ctx.close("moe gates", &shape, &got.gates, &want.gates, Tol::new(1e-7, 1e-6, 1e-6));
            let perm = check_permutation(&got, &tiles);
            ctx.flag("moe dispatch is a permutation", &shape, perm.is_ok(), format!("{perm:?}"));
            ctx.equal("moe order (rerun, bitwise)", &shape, &again.to_host()?.order, &got.order);
            Ok(())
        });
    }
    ctx.case("moe route ties", "-", |ctx| {
        // complete ties go to the lowest indices (groups likewise), as on the CPU
        let (_, got) = route_both(ctx.be, &[0.0; 3 * 8], &[0.0; 8], &config(8, 2, (1, 1), Sigmoid, None))?;
        let got = got.to_host()?;
        ctx.equal("moe all tied: lowest experts", "n3 E8 K2", &got.experts, &[0, 1, 0, 1, 0, 1]);
        ctx.flag(
            "moe all tied: gates 1.25",
            "n3 E8 K2",
            got.gates.iter().all(|&g| g == 1.25),
            format!("{:?}", got.gates),
        );
        let (_, got) = route_both(ctx.be, &[0.0; 8], &[0.0; 8], &config(8, 2, (4, 2), Softmax, None))?;
        ctx.equal("moe all tied, groups", "n1 E8 K2 g4/2", &got.to_host()?.experts, &[0, 1]);
        let cfg = config(4, 2, (2, 1), Softmax, Some(1.0));
        let (want, got) = route_both(ctx.be, &[], &[0.0; 4], &cfg)?;
        ctx.equal("moe empty batch offsets", "n0 E4", &got.to_host()?.offsets, &want.offsets);
        Ok(())
    });
}

/// A random MoE problem on bf16-exact values: (n, C, F, router, x, logits, bias, wg, wu, wd, dout).
struct Problem {
    n: usize,
    c: usize,
    f: usize,
    cfg: RouterConfig,
    x: Vec<f32>,
    logits: Vec<f32>,
    bias: Vec<f32>,
    w: [Vec<f32>; 3],
    dout: Vec<f32>,
}

impl Problem {
    fn new(seed: u64, n: usize, c: usize, f: usize, cfg: RouterConfig) -> Problem {
        let e = cfg.n_experts;
        let (sc, sf) = ((3.0 / c as f32).sqrt(), (3.0 / f as f32).sqrt()); // uniform with std 1/√fan-in
        let x = rand_bf16(seed, n * c, 1.0);
        let r = rand_bf16(seed + 1, e * c, 2.0 * sc);
        let mut logits = vec![0.0; n * e];
        cpu::gemm::gemm(n, e, c, &x, cpu::gemm::Layout::N, &r, cpu::gemm::Layout::T, &mut logits, false);
        let w = [
            rand_bf16(seed + 3, e * f * c, sc),
            rand_bf16(seed + 4, e * f * c, sc),
            rand_bf16(seed + 5, e * c * f, sf),
        ];
        Problem { n, c, f, cfg, x, logits, bias: rand_bf16(seed + 2, e, 0.1), w, dout: rand_bf16(seed + 6, n * c, 1.0) }
    }
}

fn forward_backward(ctx: &mut Ctx) {
    use ScoreFunc::*;
    // ~150 rows per expert (two row tiles), F = 136 (two column tiles), capacity drops, expert 3
    // switched off by its bias: an empty segment.
    let mut p = Problem::new(31, 300, 72, 136, config(4, 2, (1, 1), Sigmoid, Some(0.9)));
    p.bias[3] = -100.0;
    let mut cases = vec![(p, Some(3))];
    if !ctx.quick {
        // Softmax scores, group-limited, K = 3, no capacity; ~375 rows per expert (three tiles).
        cases.push((Problem::new(41, 1000, 64, 96, config(8, 3, (4, 2), Softmax, None)), None));
        cases.push((Problem::new(51, 2048, 256, 512, config(16, 4, (4, 2), Sigmoid, Some(1.25))), None));
    }
    for (p, empty) in &cases {
        let shape = format!("n{} C{} F{} E{} K{}", p.n, p.c, p.f, p.cfg.n_experts, p.cfg.top_k);
        ctx.case("moe ffn", &shape, |ctx| ffn_case(ctx, p, *empty, &shape));
    }
}

fn ffn_case(ctx: &mut Ctx, p: &Problem, empty_expert: Option<usize>, shape: &str) -> Result<()> {
    let be = ctx.be;
    let (n, c, f, cfg) = (p.n, p.c, p.f, &p.cfg);
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let (want_r, got_r) = route_both(be, &p.logits, &p.bias, cfg)?;
    ctx.equal("moe ffn routing", shape, &got_r.to_host()?.experts, &want_r.experts);
    if let Some(i) = empty_expert {
        ctx.flag("moe ffn empty expert", shape, want_r.counts[i] == 0, format!("expert {i} got rows"));
    }
    let mut out = vec![0.0; n * c];
    let mut cache = cpu::moe::MoeCache::default();
    let [wg, wu, wd] = &p.w;
    cpu::moe::moe_forward(&p.x, n, c, &want_r, wg, wu, wd, f, &mut out, &mut cache);
    let mut dx = vec![0.0; n * c];
    let (mut dwg, mut dwu, mut dwd) = (vec![0.0; e * f * c], vec![0.0; e * f * c], vec![0.0; e * c * f]);
    let mut dg = vec![0.0; n * k];
    cpu::moe::moe_backward(
        &p.dout, n, c, &want_r, wg, wu, wd, f, &cache, &mut dx, &mut dwg, &mut dwu, &mut dwd, &mut dg,
    );

    let (gwg, gwu, gwd) = (up(be, wg)?, up(be, wu)?, up(be, wd)?);
    let (gx, gdout) = (up(be, &p.x)?, up(be, &p.dout)?);
    let rows = want_r.n_kept();
    let fwd = Tol::new(2e-2, 2e-2, 1e-2);
    let bwd = Tol::new(2e-2, 2e-2, 2e-2);
    let mut first: Option<[Vec<f32>; 2]> = None;
    for _ in 0..2 {
        let gout = DeviceBuffer::<bf16>::uninit(be, n * c)?;
        let gcache = gpu::moe_forward(be, &gx, n, c, &got_r, &gwg, &gwu, &gwd, f, &gout)?;
        let gdx = DeviceBuffer::<f32>::uninit(be, n * c)?;
        let gdw = [
            DeviceBuffer::<f32>::uninit(be, e * f * c)?,
            DeviceBuffer::<f32>::uninit(be, e * f * c)?,
            DeviceBuffer::<f32>::uninit(be, e * c * f)?,
        ];
        let gdg = DeviceBuffer::<f32>::uninit(be, n * k)?;
        gpu::moe_backward(
            be,
            &gdout,
            n,
            c,
            &got_r,
            &gwg,
            &gwu,
            &gwd,
            f,
            &gcache,
            &gdx,
            [&gdw[0], &gdw[1], &gdw[2]],
            &gdg,
        )?;
        let (got_out, got_dx) = (bf_rows(&gout, n * c)?, down32(&gdx)?);
        if let Some([out1, dx1]) = &first {
            ctx.repeat("moe out", shape, &got_out, out1, None);
            ctx.repeat("moe dx", shape, &got_dx, dx1, None);
            break;
        }
        ctx.close("moe xg", shape, &bf_rows(&gcache.xg, rows * c)?, &cache.xg, Tol::EXACT);
        ctx.close("moe hg (x W_gᵀ)", shape, &bf_rows(&gcache.hg, rows * f)?, &cache.hg, fwd.rms_scaled(&cache.hg));
        ctx.close("moe hu (x W_uᵀ)", shape, &bf_rows(&gcache.hu, rows * f)?, &cache.hu, fwd.rms_scaled(&cache.hu));
        ctx.close("moe act", shape, &bf_rows(&gcache.act, rows * f)?, &cache.act, fwd.rms_scaled(&cache.act));
        ctx.close("moe y (act W_dᵀ)", shape, &bf_rows(&gcache.y, rows * c)?, &cache.y, fwd.rms_scaled(&cache.y));
        ctx.close("moe out", shape, &got_out, &out, fwd.rms_scaled(&out));
        ctx.close("moe d_gates", shape, &down32(&gdg)?, &dg, bwd.rms_scaled(&dg));
        ctx.close("moe dx", shape, &got_dx, &dx, bwd.rms_scaled(&dx));
        let dws = [down32(&gdw[0])?, down32(&gdw[1])?, down32(&gdw[2])?];
        for (name, got, want) in [("dw_gate", &dws[0], &dwg), ("dw_up", &dws[1], &dwu), ("dw_down", &dws[2], &dwd)] {
            ctx.close(&format!("moe {name}"), shape, got, want, bwd.rms_scaled(want));
        }
        if let Some(i) = empty_expert {
            let zero = dws[0][i * f * c..(i + 1) * f * c].iter().all(|&v| v == 0.0)
                && dws[2][i * c * f..(i + 1) * c * f].iter().all(|&v| v == 0.0);
            ctx.flag("moe empty expert has zero dW", shape, zero, "dW of the empty expert is not zero");
        }
        first = Some([got_out, got_dx]);
    }

    // Router backward from the same (CPU) d_gates, with and without the balance-loss scores.
    let (_, extra) = cpu::moe::balance_loss(&want_r.scores, &want_r.experts, 2, n / 2, cfg, 0.1);
    let gdg_cpu = DeviceBuffer::from_host(be, &dg)?;
    let gextra = DeviceBuffer::from_host(be, &extra)?;
    for with_extra in [false, true] {
        let mut dl = vec![0.0; n * e];
        cpu::moe::router_backward(&want_r, &dg, with_extra.then_some(&extra[..]), cfg, &mut dl);
        let gdl = DeviceBuffer::<f32>::uninit(be, n * e)?;
        gpu::router_backward(be, &got_r, &gdg_cpu, with_extra.then_some(&gextra), cfg, &gdl)?;
        let tol = Tol::new(1e-6, 1e-4, 1e-4).rms_scaled(&dl);
        ctx.close(&format!("moe d_logits (balance {with_extra})"), shape, &down32(&gdl)?, &dl, tol);
    }
    Ok(())
}

fn balance(ctx: &mut Ctx) {
    let all: Vec<Vec<usize>> =
        vec![vec![4, 2, 2, 0], vec![1, 2], vec![3, 3, 3], vec![0, 0], (0..64).map(|i| (i * 37) % 11).collect()];
    for counts in all {
        let shape = format!("E{}", counts.len());
        ctx.case("moe bias update", &shape, |ctx| {
            let be = ctx.be;
            let e = counts.len();
            let bias0 = rand_bf16(7, e, 0.5);
            let mut want = bias0.clone();
            cpu::moe::update_bias(&mut want, &counts, 0.125);
            let gb = DeviceBuffer::from_host(be, &bias0)?;
            let gc = DeviceBuffer::from_host(be, &counts.iter().map(|&c| c as u32).collect::<Vec<_>>())?;
            gpu::update_bias(be, &gb, &gc, 0.125)?;
            ctx.close("moe bias update", &shape, &down32(&gb)?, &want, Tol::EXACT);
            let (ratio, cv) = cpu::moe::load_stats(&counts);
            let (gr, gcv) = gpu::load_stats(be, &gc)?;
            ctx.close(
                "moe load max/mean, cv",
                &shape,
                &[gr, gcv],
                &[ratio as f32, cv as f32],
                Tol::new(0.0, 1e-6, 1e-6),
            );
            Ok(())
        });
    }
    ctx.case("moe bias update from routing", "n400 E16", |ctx| {
        let be = ctx.be;
        let cfg = config(16, 2, (1, 1), ScoreFunc::Sigmoid, Some(1.0));
        let (logits, bias) = (rand_bf16(9, 400 * 16, 3.0), rand_bf16(10, 16, 0.2));
        let (want_r, got_r) = route_both(be, &logits, &bias, &cfg)?;
        let gb = DeviceBuffer::from_host(be, &bias)?;
        gpu::update_bias(be, &gb, &got_r.counts, 0.01)?;
        let mut want = bias.clone();
        cpu::moe::update_bias(&mut want, &want_r.counts, 0.01);
        ctx.close("moe bias update on the device's counts", "n400 E16", &down32(&gb)?, &want, Tol::EXACT);
        Ok(())
    });
}
