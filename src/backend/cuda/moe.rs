//! Launch code of `cuda/moe.cu` (twin: `cpu::moe`): routing, the deterministic dispatch
//! (expert-contiguous permutation with capacity drops in token order), the expert SwiGLU FFNs
//! as grouped GEMMs over the variable-size expert segments, the combine, their backward, the
//! router backward, and the bias update and load statistics of auxiliary-loss-free balancing.
//!
//! Everything stays on the device: the number of kept rows `P` is only known there, so the
//! per-position buffers are sized for `n·K` rows and every kernel reads `P = offsets[E]` (the
//! grouped GEMMs read the expert segments and their 128-row tiles from `offsets` and
//! `tile_offsets`). Tensors: activations bf16, router math and gradients of weights f32.
//! Requirements checked here: C and F multiples of 8 (16-byte rows), E small enough for the
//! router's shared memory (`3E + 2·n_group ≤ 3072`), n·K < 2³¹.

use super::abi::{NsMoeDispatchParams, NsMoeGemmParams, NsMoeRouteParams, NsMoeRowsParams};
use super::memory::DeviceElem;
use super::{check, grid_for, int, CudaBackend, CudaResult, DeviceBuffer};
use crate::backend::cpu::moe::Routing;
pub use crate::backend::cpu::moe::{RouterConfig, ScoreFunc};
use half::bf16;

/// Tokens (warps) per block of the router kernels (`ROUTE_WARPS` in moe.cu).
const ROUTE_WARPS: usize = 4;
/// Assignments per warp of the dispatch kernels (`CHUNK`), and warps per block (`CHUNK_WARPS`).
const CHUNK: usize = 1024;
const CHUNK_WARPS: usize = 4;
/// Rows (warps) per block of the per-row kernels (`ROW_WARPS`).
const ROW_WARPS: usize = 4;
/// Tile of the grouped GEMMs (`BM` = `BN`).
const TILE: usize = 128;
/// Shared memory the kernels may take without opting in.
const SMEM_LIMIT: usize = 48 * 1024;
/// `position` of a dropped assignment.
pub const DROPPED: u32 = u32::MAX;

/// The routing on the device (the twin of [`Routing`]); `P = offsets[E]` kept assignments.
pub struct DeviceRouting {
    pub n_tokens: usize,
    pub top_k: usize,
    pub n_experts: usize,
    /// s, f32 `[n, E]`.
    pub scores: DeviceBuffer<f32>,
    /// Chosen experts, u32 `[n, K]`, descending `s + b` per token.
    pub experts: DeviceBuffer<u32>,
    /// Gates, f32 `[n, K]`; 0 for dropped assignments.
    pub gates: DeviceBuffer<f32>,
    /// Assignment → position, u32 `[n, K]`; [`DROPPED`] for dropped assignments.
    pub position: DeviceBuffer<u32>,
    /// Position → assignment `token·K + slot`, u32 `[n·K]`, the first `P` valid.
    pub order: DeviceBuffer<u32>,
    /// Assignments per expert before / after the capacity limit, u32 `[E]`.
    pub demand: DeviceBuffer<u32>,
    pub counts: DeviceBuffer<u32>,
    /// Exclusive prefix of `counts`, u32 `[E + 1]`.
    pub offsets: DeviceBuffer<u32>,
    /// Exclusive prefix of `ceil(counts / 128)`, u32 `[E + 1]` (row tiles of the grouped GEMMs).
    pub tile_offsets: DeviceBuffer<u32>,
}

impl DeviceRouting {
    /// Rows allocated per position buffer: `n·K` (an upper bound on `P`).
    pub fn max_rows(&self) -> usize {
        self.n_tokens * self.top_k
    }

    /// Copies the routing to the host as a [`Routing`] (for tests and inspection).
    pub fn to_host(&self) -> CudaResult<Routing> {
        let us = |v: Vec<u32>| v.into_iter().map(|x| x as usize).collect::<Vec<usize>>();
        let position = self.position.to_host()?;
        let offsets = us(self.offsets.to_host()?);
        let mut order = self.order.to_host()?;
        order.truncate(offsets[self.n_experts]);
        let kept: Vec<bool> = position.iter().map(|&p| p != DROPPED).collect();
        let dropped = kept.iter().filter(|&&k| !k).count();
        Ok(Routing {
            n_tokens: self.n_tokens,
            top_k: self.top_k,
            scores: self.scores.to_host()?,
            experts: self.experts.to_host()?,
            gates: self.gates.to_host()?,
            kept,
            demand: us(self.demand.to_host()?),
            counts: us(self.counts.to_host()?),
            offsets,
            order,
            position,
            dropped,
        })
    }
}

fn route_params(cfg: &RouterConfig, n: usize) -> CudaResult<NsMoeRouteParams> {
    Ok(NsMoeRouteParams {
        n: int(n, "moe: n")?,
        n_experts: int(cfg.n_experts, "moe: n_experts")?,
        top_k: int(cfg.top_k, "moe: top_k")?,
        n_group: int(cfg.n_group, "moe: n_group")?,
        topk_group: int(cfg.topk_group, "moe: topk_group")?,
        softmax: (cfg.score_func == ScoreFunc::Softmax) as i32,
        routed_scaling_factor: cfg.routed_scaling_factor,
        ..Default::default()
    })
}

/// Routes `n = logits.len() / E` tokens like `cpu::moe::route` (bit for bit: the same expert
/// ids, scores, gates and permutation): `logits` f32 `[n, E]` (= x Rᵀ, from the GEMM), `bias`
/// f32 `[E]`. Runs the fused router (one warp per token) and the dispatch.
pub fn route(
    be: &CudaBackend,
    logits: &DeviceBuffer<f32>,
    bias: &DeviceBuffer<f32>,
    cfg: &RouterConfig,
) -> CudaResult<DeviceRouting> {
    cfg.validate();
    let (e, k, g) = (cfg.n_experts, cfg.top_k, cfg.n_group);
    check(logits.len() % e == 0, || format!("route: logits length {} is not a multiple of E = {e}", logits.len()))?;
    check(bias.len() == e, || format!("route: bias must hold E = {e} values"))?;
    let route_smem = ROUTE_WARPS * (3 * e + 2 * g) * 4;
    check(route_smem <= SMEM_LIMIT && CHUNK_WARPS * e * 4 <= SMEM_LIMIT, || {
        format!("route: E = {e}, n_group = {g} need more shared memory than the kernels have (3E + 2G ≤ 3072)")
    })?;
    let n = logits.len() / e;
    let a = n * k;
    let n_assign = int(a, "route: n·K")?;
    let n_chunks = a.div_ceil(CHUNK);
    let cap = cfg.capacity(n).map_or(u32::MAX, |c| c.min(a) as u32);
    let r = DeviceRouting {
        n_tokens: n,
        top_k: k,
        n_experts: e,
        scores: DeviceBuffer::uninit(be, n * e)?,
        experts: DeviceBuffer::uninit(be, a)?,
        gates: DeviceBuffer::uninit(be, a)?,
        position: DeviceBuffer::uninit(be, a)?,
        order: DeviceBuffer::uninit(be, a)?,
        demand: DeviceBuffer::uninit(be, e)?,
        counts: DeviceBuffer::uninit(be, e)?,
        offsets: DeviceBuffer::uninit(be, e + 1)?,
        tile_offsets: DeviceBuffer::uninit(be, e + 1)?,
    };
    let mut p = route_params(cfg, n)?;
    (p.logits, p.bias, p.scores, p.experts, p.gates) =
        (logits.ptr(), bias.ptr(), r.scores.ptr(), r.experts.ptr(), r.gates.ptr());
    if n > 0 {
        be.launch(
            "moe",
            "moe_route",
            (n.div_ceil(ROUTE_WARPS) as u32, 1, 1),
            32 * ROUTE_WARPS as u32,
            route_smem as u32,
            &p,
        )?;
    }
    let hist = DeviceBuffer::<u32>::uninit(be, n_chunks.max(1) * e)?;
    let d = NsMoeDispatchParams {
        experts: r.experts.ptr(),
        gates: r.gates.ptr(),
        chunk_hist: hist.ptr(),
        demand: r.demand.ptr(),
        counts: r.counts.ptr(),
        offsets: r.offsets.ptr(),
        tile_offsets: r.tile_offsets.ptr(),
        order: r.order.ptr(),
        position: r.position.ptr(),
        n_assign,
        n_experts: e as i32,
        n_chunks: int(n_chunks, "route: chunks")?,
        capacity: cap,
        ..Default::default()
    };
    let (blocks, smem) = (n_chunks.div_ceil(CHUNK_WARPS) as u32, (CHUNK_WARPS * e * 4) as u32);
    if n_chunks > 0 {
        be.launch("moe", "moe_hist", (blocks, 1, 1), 32 * CHUNK_WARPS as u32, smem, &d)?;
    }
    be.launch("moe", "moe_offsets", (1, 1, 1), 256, 0, &d)?;
    if n_chunks > 0 {
        be.launch("moe", "moe_scatter", (blocks, 1, 1), 32 * CHUNK_WARPS as u32, smem, &d)?;
    }
    Ok(r)
}

/// Gradient of the router logits like `cpu::moe::router_backward`: `d_logits` f32 `[n, E]`
/// (overwritten) from `d_gates` f32 `[n, K]` (dropped entries ignored) and optional extra score
/// gradients `d_scores_extra` f32 `[n, E]` (the balance loss).
pub fn router_backward(
    be: &CudaBackend,
    routing: &DeviceRouting,
    d_gates: &DeviceBuffer<f32>,
    d_scores_extra: Option<&DeviceBuffer<f32>>,
    cfg: &RouterConfig,
    d_logits: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (n, e, k) = (routing.n_tokens, cfg.n_experts, cfg.top_k);
    check(routing.n_experts == e && routing.top_k == k, || {
        "router_backward: routing does not match the config".into()
    })?;
    check(d_gates.len() == n * k, || "router_backward: d_gates must hold n·K values".into())?;
    check(d_logits.len() == n * e, || "router_backward: d_logits must hold n·E values".into())?;
    check(d_scores_extra.is_none_or(|x| x.len() == n * e), || {
        "router_backward: d_scores_extra must hold n·E values".into()
    })?;
    let mut p = route_params(cfg, n)?;
    (p.scores, p.experts, p.position, p.d_gates, p.d_logits) =
        (routing.scores.ptr(), routing.experts.ptr(), routing.position.ptr(), d_gates.ptr(), d_logits.ptr());
    p.d_scores_extra = d_scores_extra.map_or(0, |x| x.ptr());
    if n == 0 {
        return Ok(());
    }
    let smem = (ROUTE_WARPS * e * 4) as u32;
    be.launch("moe", "moe_router_bwd", (n.div_ceil(ROUTE_WARPS) as u32, 1, 1), 32 * ROUTE_WARPS as u32, smem, &p)
}

/// Auxiliary-loss-free balancing like `cpu::moe::update_bias`: `bias[e] −= gamma` when
/// `counts[e]` (u32 `[E]`, e.g. `routing.counts`) is above the mean, `+= gamma` when below.
pub fn update_bias(
    be: &CudaBackend,
    bias: &DeviceBuffer<f32>,
    counts: &DeviceBuffer<u32>,
    gamma: f32,
) -> CudaResult<()> {
    check(bias.len() == counts.len(), || "update_bias: bias and counts differ in length".into())?;
    let p = NsMoeDispatchParams {
        counts: counts.ptr(),
        bias: bias.ptr(),
        n_experts: int(counts.len(), "update_bias: E")?,
        gamma,
        ..Default::default()
    };
    be.launch("moe", "moe_balance", (1, 1, 1), 256, 0, &p)
}

/// (max load / mean load, population std / mean) of `counts` (u32 `[E]`) like
/// `cpu::moe::load_stats`, computed on the device in f64 and returned through f32;
/// (0, 0) when nothing was routed.
pub fn load_stats(be: &CudaBackend, counts: &DeviceBuffer<u32>) -> CudaResult<(f32, f32)> {
    let stats = DeviceBuffer::<f32>::uninit(be, 2)?;
    let p = NsMoeDispatchParams {
        counts: counts.ptr(),
        stats: stats.ptr(),
        n_experts: int(counts.len(), "load_stats: E")?,
        ..Default::default()
    };
    be.launch("moe", "moe_balance", (1, 1, 1), 256, 0, &p)?;
    let s = stats.to_host()?;
    Ok((s[0], s[1]))
}

/// Layout of the per-expert weight operand of [`grouped_gemm_rows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `B_e` stored `[n, k]` (the product uses its transpose): `x Wᵀ`.
    T,
    /// `B_e` stored `[k, n]`: `dy W`.
    N,
}

/// Output element types of the grouped GEMMs (bf16 or f32).
pub trait MoeOut: DeviceElem {
    const BF16: bool;
}
impl MoeOut for f32 {
    const BF16: bool = false;
}
impl MoeOut for bf16 {
    const BF16: bool = true;
}

/// Row-grouped GEMM over the expert segments of the permuted rows: for each expert `e`,
/// `C[seg_e] = A[seg_e] op(B_e)` (+ `A2[seg_e] op(B2_e)` with `second = Some((A2, B2))`),
/// `A` bf16 `[n·K, k]`, `B_e` the e-th `[n, k]` (T) or `[k, n]` (N) matrix of `b` bf16 `[E, ·]`,
/// `C` `[n·K, n]` (rows past `P` untouched). Kernels: nt→bf16, nn→bf16, nn→f32.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_rows<C: MoeOut>(
    be: &CudaBackend,
    routing: &DeviceRouting,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    lb: WeightLayout,
    second: Option<(&DeviceBuffer<bf16>, &DeviceBuffer<bf16>)>,
    c: &DeviceBuffer<C>,
) -> CudaResult<()> {
    let (e, rows) = (routing.n_experts, routing.max_rows());
    check(n % 8 == 0 && k % 8 == 0, || format!("grouped_gemm_rows: n = {n} and k = {k} must be multiples of 8"))?;
    check(a.len() == rows * k && c.len() == rows * n, || {
        format!("grouped_gemm_rows: A must be [n·K, k] = [{rows}, {k}] and C [n·K, n] = [{rows}, {n}]")
    })?;
    check(b.len() == e * n * k, || format!("grouped_gemm_rows: B must hold E·n·k = {e}·{n}·{k} values"))?;
    if let Some((a2, b2)) = second {
        check(a2.len() == a.len() && b2.len() == b.len(), || "grouped_gemm_rows: A2/B2 must match A/B".into())?;
    }
    let name = match (lb, C::BF16) {
        (WeightLayout::T, true) => "moe_gemm_rows_nt_bf16",
        (WeightLayout::N, true) => "moe_gemm_rows_nn_bf16",
        (WeightLayout::N, false) => "moe_gemm_rows_nn_f32",
        (WeightLayout::T, false) => {
            return Err(super::CudaError("grouped_gemm_rows: no nt kernel with f32 output".into()))
        }
    };
    let p = NsMoeGemmParams {
        a: a.ptr(),
        b: b.ptr(),
        a2: second.map_or(0, |s| s.0.ptr()),
        b2: second.map_or(0, |s| s.1.ptr()),
        c: c.ptr(),
        offsets: routing.offsets.ptr(),
        tile_offsets: routing.tile_offsets.ptr(),
        stride_b: (n * k) as i64,
        stride_c: 0,
        n_experts: int(e, "E")?,
        m: 0,
        n: int(n, "n")?,
        k: int(k, "k")?,
        lda: int(k, "lda")?,
        ldb: int(if lb == WeightLayout::T { k } else { n }, "ldb")?,
        ldc: int(n, "ldc")?,
        pad_: 0,
    };
    if rows == 0 {
        return Ok(());
    }
    // Σ_e ceil(count_e / 128) < P/128 + E: an upper bound on the row tiles; the extra blocks exit.
    let row_tiles = rows.div_ceil(TILE) + e;
    check(row_tiles <= i32::MAX as usize && n.div_ceil(TILE) <= 65_535, || "grouped_gemm_rows: grid too large".into())?;
    be.launch("moe", name, (row_tiles as u32, n.div_ceil(TILE) as u32, 1), 256, 0, &p)
}

/// Expert-grouped GEMM over the segments (the weight gradients): for each expert `e`,
/// `C_e [m, n] = A[seg_e]ᵀ B[seg_e]` with `A` bf16 `[n·K, m]`, `B` bf16 `[n·K, n]`, `C` f32
/// `[E, m, n]` overwritten (zero for experts without rows).
pub fn grouped_gemm_experts(
    be: &CudaBackend,
    routing: &DeviceRouting,
    m: usize,
    n: usize,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    c: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (e, rows) = (routing.n_experts, routing.max_rows());
    check(m % 8 == 0 && n % 8 == 0, || format!("grouped_gemm_experts: m = {m} and n = {n} must be multiples of 8"))?;
    check(a.len() == rows * m && b.len() == rows * n && c.len() == e * m * n, || {
        format!("grouped_gemm_experts: A must be [{rows}, {m}], B [{rows}, {n}], C [{e}, {m}, {n}]")
    })?;
    check(e <= 65_535 && m.div_ceil(TILE) <= 65_535, || "grouped_gemm_experts: grid too large".into())?;
    let p = NsMoeGemmParams {
        a: a.ptr(),
        b: b.ptr(),
        c: c.ptr(),
        offsets: routing.offsets.ptr(),
        tile_offsets: routing.tile_offsets.ptr(),
        stride_c: (m * n) as i64,
        n_experts: int(e, "E")?,
        m: int(m, "m")?,
        n: int(n, "n")?,
        lda: int(m, "lda")?,
        ldb: int(n, "ldb")?,
        ldc: int(n, "ldc")?,
        ..Default::default()
    };
    if m * n == 0 {
        return Ok(());
    }
    be.launch(
        "moe",
        "moe_gemm_experts_tn_f32",
        (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, e as u32),
        256,
        0,
        &p,
    )
}

/// What [`moe_backward`] needs from [`moe_forward`], in position order, bf16, `n·K` rows
/// allocated (the first `P` valid): `xg` `[·, C]`, `hg`, `hu`, `act` `[·, F]`, `y` `[·, C]`.
pub struct MoeCacheGpu {
    pub xg: DeviceBuffer<bf16>,
    pub hg: DeviceBuffer<bf16>,
    pub hu: DeviceBuffer<bf16>,
    pub act: DeviceBuffer<bf16>,
    pub y: DeviceBuffer<bf16>,
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    name: &str,
    n: usize,
    c: usize,
    f: usize,
    routing: &DeviceRouting,
    w_gate: &DeviceBuffer<bf16>,
    w_up: &DeviceBuffer<bf16>,
    w_down: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let e = routing.n_experts;
    check(routing.n_tokens == n, || format!("{name}: routing is for {} tokens, not n = {n}", routing.n_tokens))?;
    check(c > 0 && f > 0 && c % 8 == 0 && f % 8 == 0, || {
        format!("{name}: C = {c} and F = {f} must be positive multiples of 8")
    })?;
    for (w, wn) in [(w_gate, "w_gate"), (w_up, "w_up"), (w_down, "w_down")] {
        check(w.len() == e * f * c, || format!("{name}: {wn} must hold E·F·C = {e}·{f}·{c} values"))?;
    }
    Ok(())
}

fn rows_params(routing: &DeviceRouting, n: usize, c: usize, f: usize) -> CudaResult<NsMoeRowsParams> {
    Ok(NsMoeRowsParams {
        order: routing.order.ptr(),
        position: routing.position.ptr(),
        offsets: routing.offsets.ptr(),
        gates: routing.gates.ptr(),
        n: int(n, "n")?,
        c: int(c, "C")?,
        f: int(f, "F")?,
        top_k: int(routing.top_k, "K")?,
        n_experts: int(routing.n_experts, "E")?,
        p_max: int(routing.max_rows(), "n·K")?,
        ..Default::default()
    })
}

/// Grid of a one-warp-per-row kernel over `rows` rows.
fn row_grid(rows: usize) -> (u32, u32, u32) {
    (rows.div_ceil(ROW_WARPS).max(1) as u32, 1, 1)
}

/// The routed experts and the combine, like `cpu::moe::moe_forward`: `x` bf16 `[n, C]`,
/// `w_gate`, `w_up` bf16 `[E, F, C]`, `w_down` bf16 `[E, C, F]`; `out` bf16 `[n, C]` is
/// overwritten with `Σ_k g_k · expert_k(x)` over the kept slots (f32 sum in slot order).
/// Gather, gate and up grouped GEMMs, SwiGLU, down grouped GEMM, combine.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward(
    be: &CudaBackend,
    x: &DeviceBuffer<bf16>,
    n: usize,
    c: usize,
    routing: &DeviceRouting,
    w_gate: &DeviceBuffer<bf16>,
    w_up: &DeviceBuffer<bf16>,
    w_down: &DeviceBuffer<bf16>,
    f: usize,
    out: &DeviceBuffer<bf16>,
) -> CudaResult<MoeCacheGpu> {
    check_shapes("moe_forward", n, c, f, routing, w_gate, w_up, w_down)?;
    check(x.len() == n * c && out.len() == n * c, || format!("moe_forward: x and out must hold n·C = {n}·{c} values"))?;
    let rows = routing.max_rows();
    let cache = MoeCacheGpu {
        xg: DeviceBuffer::uninit(be, rows * c)?,
        hg: DeviceBuffer::uninit(be, rows * f)?,
        hu: DeviceBuffer::uninit(be, rows * f)?,
        act: DeviceBuffer::uninit(be, rows * f)?,
        y: DeviceBuffer::uninit(be, rows * c)?,
    };
    if n == 0 {
        return Ok(cache);
    }
    let mut p = rows_params(routing, n, c, f)?;
    (p.x, p.xg, p.hg, p.hu, p.act, p.y, p.out) =
        (x.ptr(), cache.xg.ptr(), cache.hg.ptr(), cache.hu.ptr(), cache.act.ptr(), cache.y.ptr(), out.ptr());
    be.launch("moe", "moe_gather", row_grid(rows), 32 * ROW_WARPS as u32, 0, &p)?;
    grouped_gemm_rows(be, routing, f, c, &cache.xg, w_gate, WeightLayout::T, None, &cache.hg)?;
    grouped_gemm_rows(be, routing, f, c, &cache.xg, w_up, WeightLayout::T, None, &cache.hu)?;
    be.launch("moe", "moe_swiglu_fwd", (grid_for(rows * f, 256 * 8), 1, 1), 256, 0, &p)?;
    grouped_gemm_rows(be, routing, c, f, &cache.act, w_down, WeightLayout::T, None, &cache.y)?;
    be.launch("moe", "moe_combine", row_grid(n), 32 * ROW_WARPS as u32, 0, &p)?;
    Ok(cache)
}

/// Backward of [`moe_forward`] like `cpu::moe::moe_backward` (routing fixed): from `dout` bf16
/// `[n, C]`, overwrites `dx` f32 `[n, C]` (the expert paths only), `dw_gate`, `dw_up` f32
/// `[E, F, C]`, `dw_down` f32 `[E, C, F]` (zero for experts without rows) and `d_gates` f32
/// `[n, K]` (`dout[t]·y`, 0 for dropped assignments).
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    be: &CudaBackend,
    dout: &DeviceBuffer<bf16>,
    n: usize,
    c: usize,
    routing: &DeviceRouting,
    w_gate: &DeviceBuffer<bf16>,
    w_up: &DeviceBuffer<bf16>,
    w_down: &DeviceBuffer<bf16>,
    f: usize,
    cache: &MoeCacheGpu,
    dx: &DeviceBuffer<f32>,
    [dw_gate, dw_up, dw_down]: [&DeviceBuffer<f32>; 3],
    d_gates: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    check_shapes("moe_backward", n, c, f, routing, w_gate, w_up, w_down)?;
    let (e, k, rows) = (routing.n_experts, routing.top_k, routing.max_rows());
    check(dout.len() == n * c && dx.len() == n * c, || "moe_backward: dout and dx must hold n·C values".into())?;
    check(dw_gate.len() == e * f * c && dw_up.len() == e * f * c && dw_down.len() == e * c * f, || {
        "moe_backward: weight gradients must match the weights".into()
    })?;
    check(d_gates.len() == n * k, || "moe_backward: d_gates must hold n·K values".into())?;
    check(
        cache.xg.len() == rows * c
            && cache.y.len() == rows * c
            && [&cache.hg, &cache.hu, &cache.act].iter().all(|v| v.len() == rows * f),
        || "moe_backward: cache does not match the routing (run moe_forward first)".into(),
    )?;
    d_gates.fill_zero()?; // dropped assignments keep 0
    if n == 0 {
        for w in [dw_gate, dw_up, dw_down] {
            w.fill_zero()?;
        }
        return Ok(());
    }
    let dy = DeviceBuffer::<bf16>::uninit(be, rows * c)?;
    let d_act = DeviceBuffer::<bf16>::uninit(be, rows * f)?;
    let dhg = DeviceBuffer::<bf16>::uninit(be, rows * f)?;
    let dhu = DeviceBuffer::<bf16>::uninit(be, rows * f)?;
    let dxg = DeviceBuffer::<f32>::uninit(be, rows * c)?;
    let mut p = rows_params(routing, n, c, f)?;
    (p.y, p.dout, p.dy, p.d_gates) = (cache.y.ptr(), dout.ptr(), dy.ptr(), d_gates.ptr());
    (p.hg, p.hu, p.d_act, p.dhg, p.dhu, p.dxg, p.dx) =
        (cache.hg.ptr(), cache.hu.ptr(), d_act.ptr(), dhg.ptr(), dhu.ptr(), dxg.ptr(), dx.ptr());
    be.launch("moe", "moe_combine_bwd", row_grid(rows), 32 * ROW_WARPS as u32, 0, &p)?;
    // d_act = dy W_d (W_d[e] stored [C, F] = [k, n])
    grouped_gemm_rows(be, routing, f, c, &dy, w_down, WeightLayout::N, None, &d_act)?;
    be.launch("moe", "moe_swiglu_bwd", (grid_for(rows * f, 256 * 8), 1, 1), 256, 0, &p)?;
    // dxg = dh_g W_g + dh_u W_u (W[e] stored [F, C] = [k, n]), one launch, f32
    grouped_gemm_rows(be, routing, c, f, &dhg, w_gate, WeightLayout::N, Some((&dhu, w_up)), &dxg)?;
    be.launch("moe", "moe_scatter_dx", row_grid(n), 32 * ROW_WARPS as u32, 0, &p)?;
    // dW_g = dh_gᵀ xg, dW_u = dh_uᵀ xg, dW_d = dyᵀ act, per expert over its rows
    grouped_gemm_experts(be, routing, f, c, &dhg, &cache.xg, dw_gate)?;
    grouped_gemm_experts(be, routing, f, c, &dhu, &cache.xg, dw_up)?;
    grouped_gemm_experts(be, routing, c, f, &dy, &cache.act, dw_down)
}
