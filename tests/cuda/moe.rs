//! CUDA parity tests of the `moe` family (`cuda/moe.cu`) against `cpu::moe`.
//!
//! Inputs are bf16-rounded first (`super::rand_bf16`); the router logits are f32 (computed on the
//! host from those values, as the GEMM would), so both sides route the very same numbers.
//! Tolerances, by what the GPU rounds:
//! - routing: the kernel reproduces the CPU's f32 operations one by one (its polynomial exp,
//!   no fma contraction, the same summation orders), so expert ids, kept flags, counts, offsets,
//!   order and position must be **equal**, ties included; scores and gates are expected to be
//!   bitwise equal too and are checked at rtol 1e-6 (a last-ulp slip would show there first);
//! - the expert FFN (grouped GEMMs with fp32 accumulation, bf16 hg/hu/act/y/dy/d_act/dh
//!   between them, where the CPU keeps f32): each bf16 rounding is ≤ 2⁻⁹ relative and a few
//!   chain up, so atol 2e-2 × the RMS of the reference and rtol 2e-2, for the cache, out,
//!   dx, the weight gradients and d_gates (a dot of dout with the bf16 y);
//! - the router backward from the same f32 d_gates: f32 math, only the softmax's Σ ds·s order
//!   differs: atol 1e-6 × RMS, rtol 1e-4;
//! - the bias update is exact (integer comparisons, one f32 add); the load statistics are f64
//!   rounded to f32: rtol 1e-6.

use super::{device, rand_bf16, up};
use half::bf16;
use nanoseek::backend::cpu;
use nanoseek::backend::cpu::moe::{RouterConfig, Routing, ScoreFunc};
use nanoseek::backend::cuda::moe as gpu;
use nanoseek::backend::cuda::{CudaBackend, DeviceBuffer};

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

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

/// |got − want| ≤ atol_rms·RMS(want) + rtol·|want|.
#[track_caller]
fn close_rms(what: &str, got: &[f32], want: &[f32], atol_rms: f32, rtol: f32) {
    super::assert_close(what, got, want, atol_rms * rms(want), rtol);
}

fn f32_down(b: &DeviceBuffer<f32>) -> Vec<f32> {
    b.to_host().unwrap()
}

fn bf_down_rows(b: &DeviceBuffer<bf16>, len: usize) -> Vec<f32> {
    b.to_host().unwrap()[..len].iter().map(|x| x.to_f32()).collect()
}

/// The dispatch is a bijection between positions 0..P and the kept assignments, grouped by
/// expert with tokens ascending, and the tile offsets count 128-row tiles.
fn check_permutation(r: &Routing, tile_offsets: &[u32]) {
    let (e, k) = (r.n_experts(), r.top_k);
    let p = r.offsets[e];
    assert_eq!(r.order.len(), p);
    let mut seen = vec![false; r.n_tokens * k];
    for (pos, &a) in r.order.iter().enumerate() {
        let a = a as usize;
        assert!(r.kept[a], "position {pos} holds the dropped assignment {a}");
        assert!(!seen[a], "assignment {a} appears twice");
        seen[a] = true;
        assert_eq!(r.position[a] as usize, pos, "position is not the inverse of order");
    }
    assert_eq!(seen, r.kept, "every kept assignment has a position");
    let mut tiles = 0;
    for (i, &tile_offset) in tile_offsets[..e].iter().enumerate() {
        assert_eq!(r.offsets[i + 1] - r.offsets[i], r.counts[i]);
        assert!(r.counts[i] <= r.demand[i]);
        let seg = &r.order[r.offsets[i]..r.offsets[i + 1]];
        assert!(seg.iter().all(|&a| r.experts[a as usize] as usize == i), "expert {i}: foreign rows");
        assert!(seg.windows(2).all(|w| w[0] / (k as u32) < w[1] / (k as u32)), "expert {i}: tokens not ascending");
        assert_eq!(tile_offset, tiles);
        tiles += r.counts[i].div_ceil(128) as u32;
    }
    assert_eq!(tile_offsets[e], tiles);
    for (a, &kp) in r.kept.iter().enumerate() {
        if !kp {
            assert_eq!(r.position[a], u32::MAX);
            assert_eq!(r.gates[a], 0.0);
        }
    }
}

fn route_both(be: &CudaBackend, logits: &[f32], bias: &[f32], cfg: &RouterConfig) -> (Routing, gpu::DeviceRouting) {
    let want = cpu::moe::route(logits, bias, cfg);
    let gl = DeviceBuffer::from_host(be, logits).unwrap();
    let gb = DeviceBuffer::from_host(be, bias).unwrap();
    let got = gpu::route(be, &gl, &gb, cfg).unwrap();
    (want, got)
}

#[test]
fn moe_route_and_dispatch_match_cpu() {
    use ScoreFunc::*;
    let Some(be) = device("moe_route") else { return };
    let cases = [
        (config(8, 2, (1, 1), Sigmoid, None), 0.0),
        (config(16, 4, (8, 3), Sigmoid, None), 0.0), // group limit
        (config(12, 4, (3, 2), Softmax, None), 0.0),
        (config(6, 2, (6, 2), Sigmoid, None), 0.0), // one expert per group
        (config(64, 6, (8, 3), Softmax, Some(0.75)), 0.0), // E > 32: several experts per lane; drops
        (config(8, 2, (1, 1), Sigmoid, Some(1.0)), 1.0), // expert 0 favoured by its bias: drops
        (config(40, 3, (1, 1), Sigmoid, Some(1.5)), 0.5),
    ];
    let n = 1500; // n·K > 1024: several dispatch chunks
    for (ci, (cfg, skew)) in cases.iter().enumerate() {
        let e = cfg.n_experts;
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
        let (want, got) = route_both(&be, &logits, &bias, cfg);
        let tiles = got.tile_offsets.to_host().unwrap();
        let got = got.to_host().unwrap();
        let tag = format!("case {ci} {cfg:?}");
        assert_eq!(got.experts, want.experts, "{tag}: experts");
        assert_eq!(got.kept, want.kept, "{tag}: kept");
        assert_eq!(got.demand, want.demand, "{tag}: demand");
        assert_eq!(got.counts, want.counts, "{tag}: counts");
        assert_eq!(got.offsets, want.offsets, "{tag}: offsets");
        assert_eq!(got.order, want.order, "{tag}: order");
        assert_eq!(got.position, want.position, "{tag}: position");
        assert_eq!(got.dropped, want.dropped, "{tag}: dropped");
        assert_eq!(want.dropped > 0, cfg.capacity_factor.is_some(), "{tag}: the capacity cases must drop");
        super::assert_close(&format!("{tag}: scores"), &got.scores, &want.scores, 1e-7, 1e-6);
        super::assert_close(&format!("{tag}: gates"), &got.gates, &want.gates, 1e-7, 1e-6);
        check_permutation(&got, &tiles);
    }
    // complete ties go to the lowest indices (groups likewise), as on the CPU
    let (_, got) = route_both(&be, &[0.0; 3 * 8], &[0.0; 8], &config(8, 2, (1, 1), Sigmoid, None));
    let got = got.to_host().unwrap();
    assert_eq!(got.experts, [0, 1, 0, 1, 0, 1]);
    assert!(got.gates.iter().all(|&g| g == 1.25));
    let (_, got) = route_both(&be, &[0.0; 8], &[0.0; 8], &config(8, 2, (4, 2), Softmax, None));
    assert_eq!(got.to_host().unwrap().experts, [0, 1]);
    // empty batch
    let cfg = config(4, 2, (2, 1), Softmax, Some(1.0));
    let (want, got) = route_both(&be, &[], &[0.0; 4], &cfg);
    let got = got.to_host().unwrap();
    assert_eq!((got.n_kept(), got.offsets.clone()), (want.n_kept(), want.offsets.clone()));
}

/// A random MoE problem on bf16-exact values and its CPU reference.
struct Problem {
    n: usize,
    c: usize,
    f: usize,
    cfg: RouterConfig,
    x: Vec<f32>,
    logits: Vec<f32>,
    bias: Vec<f32>,
    wg: Vec<f32>,
    wu: Vec<f32>,
    wd: Vec<f32>,
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
        Problem {
            n,
            c,
            f,
            cfg,
            x,
            logits,
            bias: rand_bf16(seed + 2, e, 0.1),
            wg: rand_bf16(seed + 3, e * f * c, sc),
            wu: rand_bf16(seed + 4, e * f * c, sc),
            wd: rand_bf16(seed + 5, e * c * f, sf),
            dout: rand_bf16(seed + 6, n * c, 1.0),
        }
    }
}

fn forward_backward_case(be: &CudaBackend, p: &Problem, empty_expert: Option<usize>) {
    let (n, c, f, cfg) = (p.n, p.c, p.f, &p.cfg);
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let tag = format!("{cfg:?} n={n} C={c} F={f}");

    // CPU reference
    let (want_r, got_r) = route_both(be, &p.logits, &p.bias, cfg);
    assert_eq!(got_r.to_host().unwrap().experts, want_r.experts, "{tag}: routing");
    if let Some(i) = empty_expert {
        assert_eq!(want_r.counts[i], 0, "{tag}: expert {i} must get no rows");
    }
    let mut out = vec![0.0; n * c];
    let mut cache = cpu::moe::MoeCache::default();
    cpu::moe::moe_forward(&p.x, n, c, &want_r, &p.wg, &p.wu, &p.wd, f, &mut out, &mut cache);
    let mut dx = vec![0.0; n * c];
    let (mut dwg, mut dwu, mut dwd) = (vec![0.0; e * f * c], vec![0.0; e * f * c], vec![0.0; e * c * f]);
    let mut dg = vec![0.0; n * k];
    cpu::moe::moe_backward(
        &p.dout, n, c, &want_r, &p.wg, &p.wu, &p.wd, f, &cache, &mut dx, &mut dwg, &mut dwu, &mut dwd, &mut dg,
    );

    // GPU
    let (gwg, gwu, gwd) = (up(be, &p.wg), up(be, &p.wu), up(be, &p.wd));
    let gx = up(be, &p.x);
    let gout = DeviceBuffer::<bf16>::uninit(be, n * c).unwrap();
    let gcache = gpu::moe_forward(be, &gx, n, c, &got_r, &gwg, &gwu, &gwd, f, &gout).unwrap();
    let rows = want_r.n_kept();
    close_rms(&format!("{tag}: xg"), &bf_down_rows(&gcache.xg, rows * c), &cache.xg, 0.0, 0.0);
    close_rms(&format!("{tag}: hg (grouped GEMM, x W_gᵀ)"), &bf_down_rows(&gcache.hg, rows * f), &cache.hg, 2e-2, 2e-2);
    close_rms(&format!("{tag}: hu (grouped GEMM, x W_uᵀ)"), &bf_down_rows(&gcache.hu, rows * f), &cache.hu, 2e-2, 2e-2);
    close_rms(&format!("{tag}: act"), &bf_down_rows(&gcache.act, rows * f), &cache.act, 2e-2, 2e-2);
    close_rms(&format!("{tag}: y (grouped GEMM, act W_dᵀ)"), &bf_down_rows(&gcache.y, rows * c), &cache.y, 2e-2, 2e-2);
    close_rms(&format!("{tag}: out"), &bf_down_rows(&gout, n * c), &out, 2e-2, 2e-2);

    let gdx = DeviceBuffer::<f32>::uninit(be, n * c).unwrap();
    let gdwg = DeviceBuffer::<f32>::uninit(be, e * f * c).unwrap();
    let gdwu = DeviceBuffer::<f32>::uninit(be, e * f * c).unwrap();
    let gdwd = DeviceBuffer::<f32>::uninit(be, e * c * f).unwrap();
    let gdg = DeviceBuffer::<f32>::uninit(be, n * k).unwrap();
    let gdout = up(be, &p.dout);
    gpu::moe_backward(be, &gdout, n, c, &got_r, &gwg, &gwu, &gwd, f, &gcache, &gdx, [&gdwg, &gdwu, &gdwd], &gdg)
        .unwrap();
    close_rms(&format!("{tag}: d_gates"), &f32_down(&gdg), &dg, 2e-2, 2e-2);
    close_rms(&format!("{tag}: dx"), &f32_down(&gdx), &dx, 2e-2, 2e-2);
    close_rms(&format!("{tag}: dw_gate"), &f32_down(&gdwg), &dwg, 2e-2, 2e-2);
    close_rms(&format!("{tag}: dw_up"), &f32_down(&gdwu), &dwu, 2e-2, 2e-2);
    close_rms(&format!("{tag}: dw_down"), &f32_down(&gdwd), &dwd, 2e-2, 2e-2);
    if let Some(i) = empty_expert {
        let (wg_i, wd_i) = (f32_down(&gdwg), f32_down(&gdwd));
        assert!(wg_i[i * f * c..(i + 1) * f * c].iter().all(|&v| v == 0.0), "{tag}: empty expert dW_gate");
        assert!(wd_i[i * c * f..(i + 1) * c * f].iter().all(|&v| v == 0.0), "{tag}: empty expert dW_down");
    }

    // Router backward from the same (CPU) d_gates, with and without the balance-loss scores.
    let (_, extra) = cpu::moe::balance_loss(&want_r.scores, &want_r.experts, 2, n / 2, cfg, 0.1);
    let gdg_cpu = DeviceBuffer::from_host(be, &dg).unwrap();
    let gextra = DeviceBuffer::from_host(be, &extra).unwrap();
    for with_extra in [false, true] {
        let mut dl = vec![0.0; n * e];
        cpu::moe::router_backward(&want_r, &dg, with_extra.then_some(&extra[..]), cfg, &mut dl);
        let gdl = DeviceBuffer::<f32>::uninit(be, n * e).unwrap();
        gpu::router_backward(be, &got_r, &gdg_cpu, with_extra.then_some(&gextra), cfg, &gdl).unwrap();
        close_rms(&format!("{tag}: d_logits (extra {with_extra})"), &f32_down(&gdl), &dl, 1e-6, 1e-4);
    }
}

#[test]
fn moe_forward_backward_match_cpu() {
    use ScoreFunc::*;
    let Some(be) = device("moe_forward_backward") else { return };
    // ~150 rows per expert (two row tiles), F = 136 (two column tiles, and two row tiles of
    // dW_gate), capacity drops, expert 3 switched off by its bias: an empty segment.
    let mut p = Problem::new(31, 300, 72, 136, config(4, 2, (1, 1), Sigmoid, Some(0.9)));
    p.bias[3] = -100.0;
    forward_backward_case(&be, &p, Some(3));
    // Softmax scores, group-limited, K = 3, no capacity; ~375 rows per expert (three tiles).
    let p = Problem::new(41, 1000, 64, 96, config(8, 3, (4, 2), Softmax, None));
    forward_backward_case(&be, &p, None);
}

#[test]
fn moe_bias_update_and_load_stats_match_cpu() {
    let Some(be) = device("moe_balance") else { return };
    for counts in
        [vec![4usize, 2, 2, 0], vec![1, 2], vec![3, 3, 3], vec![0, 0], (0..64).map(|i| (i * 37) % 11).collect()]
    {
        let e = counts.len();
        let bias0 = rand_bf16(7, e, 0.5);
        let mut want = bias0.clone();
        cpu::moe::update_bias(&mut want, &counts, 0.125);
        let gb = DeviceBuffer::from_host(&be, &bias0).unwrap();
        let gc = DeviceBuffer::from_host(&be, &counts.iter().map(|&c| c as u32).collect::<Vec<_>>()).unwrap();
        gpu::update_bias(&be, &gb, &gc, 0.125).unwrap();
        assert_eq!(f32_down(&gb), want, "bias update for counts {counts:?}");
        let (ratio, cv) = cpu::moe::load_stats(&counts);
        let (gr, gcv) = gpu::load_stats(&be, &gc).unwrap();
        assert!((gr as f64 - ratio).abs() <= 1e-6 * ratio, "max/mean {gr} vs {ratio} for {counts:?}");
        assert!((gcv as f64 - cv).abs() <= 1e-6 * cv, "cv {gcv} vs {cv} for {counts:?}");
    }
    // with the routing's counts, on the device end to end
    let cfg = config(16, 2, (1, 1), ScoreFunc::Sigmoid, Some(1.0));
    let logits = rand_bf16(9, 400 * 16, 3.0);
    let bias = rand_bf16(10, 16, 0.2);
    let (want_r, got_r) = route_both(&be, &logits, &bias, &cfg);
    let gb = DeviceBuffer::from_host(&be, &bias).unwrap();
    gpu::update_bias(&be, &gb, &got_r.counts, 0.01).unwrap();
    let mut want = bias.clone();
    cpu::moe::update_bias(&mut want, &want_r.counts, 0.01);
    assert_eq!(f32_down(&gb), want);
}
