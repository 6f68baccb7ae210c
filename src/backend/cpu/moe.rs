//! DeepSeek-V3 mixture of experts on the CPU: routing, the expert SwiGLU FFNs on permuted rows,
//! the combine, their backward, the sequence-wise balance loss and the bias update of
//! auxiliary-loss-free balancing. This is the reference the CUDA kernels must match.
//!
//! Notation: `n` tokens `x` `[n, C]`, `E` routed experts, `K` experts per token, router weight
//! `R` `[E, C]`, per-expert bias `b` `[E]` (not trained; it only steers selection).
//!
//! ```text
//! logits = x Rᵀ                                  (by the caller, with gemm)
//! s      = σ(logits)  or  softmax_E(logits)      [n, E]
//! key    = s + b
//! groups (n_group > 1): E/n_group experts per group; group score = sum of the top-2 keys in the
//!        group (the top-1 when a group has one expert); keep the best topk_group groups
//! chosen = top-K keys among the kept groups' experts, slots in descending key order,
//!          ties to the lower index (groups likewise)
//! g_k    = s[chosen_k] / Σ_j s[chosen_j] · routed_scaling_factor       (s, never b)
//! cap    = ceil(cf · n·K / E) (in f64); (token, slot) pairs are admitted in token order and an
//!          expert's assignments beyond cap are dropped: their gate becomes 0 (the other gates of
//!          the token keep their value: the dropped score stays in the denominator)
//! y_p    = (silu(h W_gᵀ) ∘ (h W_uᵀ)) W_dᵀ    for each kept assignment p, h = x[token(p)]
//! out[t] = Σ_k g_k · y_{position(t, k)}     (kept slots, in slot order, starting from 0)
//! ```
//!
//! Softmax scores are renormalized over the chosen experts like sigmoid ones (DeepSeek-V3's
//! reference code renormalizes only sigmoid scores); the softmax denominator then cancels in the
//! gates, which equal a softmax over the chosen logits, but it still shapes selection and balance.
//!
//! **Dispatch.** Kept assignments are grouped by expert: `counts[e]`, exclusive prefix
//! `offsets[e]`, and `order[p] = token·K + slot` for each position `p` in expert-contiguous order,
//! tokens ascending within an expert; `position[token·K + slot]` is the inverse. The forward
//! gathers `x` rows into that order, so every expert runs GEMMs on one contiguous block of rows and
//! the work is proportional to the `n·K` active rows, never `n·E`.
//!
//! **Backward.** With `dy_p = g·dout[token(p)]`: `d_gates(t,k) = dout[t]·y_p` (0 when dropped),
//! `d_act = dy W_d`, the SwiGLU backward gives `dh_g`, `dh_u`, `dx_p = dh_g W_g + dh_u W_u`,
//! `dx[t] = Σ_k dx_{position(t,k)}` (slot order), `dW_g = dh_gᵀ h`, `dW_u = dh_uᵀ h`,
//! `dW_d = dyᵀ act` (per expert, over its rows). [`router_backward`] goes through the gate
//! normalization (`S = Σ_j s_j` over all K chosen, dropped included):
//! `ds_j += rsf/S · (dg_j − Σ_k dg_k s_k / S)`, then through σ (`ds·s(1−s)`) or the softmax
//! (`s ∘ (ds − ds·s)`). The caller finishes with `dx += d_logits R` and `dR = d_logitsᵀ x`.
//!
//! **Balance loss** of one sequence of `T` tokens: `L = α Σ_i f_i P_i`,
//! `f_i = E/(K·T) · #{t : i chosen for t}` (before capacity drops, a constant),
//! `P_i = 1/T Σ_t s(t,i)/Σ_j s(t,j)`; over several sequences the losses are averaged.
//!
//! **Parallelism and determinism.** Routing is parallel over tokens (the capacity and dispatch
//! pass is a sequential O(n·K) loop); the expert FFNs run one rayon task per block of at most
//! [`ROWS_PER_TASK`] rows of one expert, the weight gradients one task per block of at most
//! [`WEIGHT_ROWS_PER_TASK`] output rows of one expert's matrix (each a GEMM over all the expert's
//! rows); the combine and the `dx` scatter are parallel over tokens, each summing its K slots in
//! slot order. GEMMs inside tasks are single-threaded, blocks are fixed by the shapes, every output
//! element is written by one task: results are bitwise identical for any thread count.

use super::gemm::{gemm, gemm_strided, Layout, Strided};
use super::math::{self, dot, sigmoid};
use super::rows_per_task;
use rayon::prelude::*;

/// Rows of one expert per forward/backward task (one GEMM block).
pub const ROWS_PER_TASK: usize = 128;
/// Output rows of one expert's weight gradient per task.
pub const WEIGHT_ROWS_PER_TASK: usize = 128;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunc {
    /// s = σ(logit), independently per expert (DeepSeek-V3).
    Sigmoid,
    /// s = softmax over the experts of a token.
    Softmax,
}

/// Routing hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    /// E, the number of routed experts.
    pub n_experts: usize,
    /// K, experts per token.
    pub top_k: usize,
    /// Expert groups for group-limited routing (1: no group limit). Must divide `n_experts`.
    pub n_group: usize,
    /// Groups kept per token (ignored when `n_group` is 1).
    pub topk_group: usize,
    /// Multiplies the normalized gates.
    pub routed_scaling_factor: f32,
    pub score_func: ScoreFunc,
    /// Capacity factor cf: each expert takes at most ceil(cf·n·K/E) assignments. None: no limit.
    pub capacity_factor: Option<f32>,
}

impl RouterConfig {
    /// Panics unless the configuration is consistent.
    pub fn validate(&self) {
        let (e, k, g) = (self.n_experts, self.top_k, self.n_group);
        assert!(e >= 1 && e <= u32::MAX as usize, "moe: n_experts = {e} must be in 1..=u32::MAX");
        assert!(k >= 1 && k <= e, "moe: top_k = {k} must be in 1..={e}");
        assert!(g >= 1 && e % g == 0, "moe: n_group = {g} must divide n_experts = {e}");
        if g > 1 {
            let tg = self.topk_group;
            assert!(tg >= 1 && tg <= g, "moe: topk_group = {tg} must be in 1..={g}");
            assert!(k <= tg * (e / g), "moe: top_k = {k} exceeds the experts of {tg} groups of {}", e / g);
        }
        assert!(self.routed_scaling_factor.is_finite(), "moe: routed_scaling_factor must be finite");
        if let Some(cf) = self.capacity_factor {
            assert!(cf.is_finite() && cf > 0.0, "moe: capacity_factor = {cf} must be positive");
        }
    }

    /// Assignments each expert may take for a batch of `n_tokens` (None: unlimited):
    /// ceil(cf · n·K / E), computed in f64.
    pub fn capacity(&self, n_tokens: usize) -> Option<usize> {
        self.capacity_factor
            .map(|cf| (cf as f64 * (n_tokens * self.top_k) as f64 / self.n_experts as f64).ceil() as usize)
    }
}

/// The result of [`route`]. An assignment `a = token·K + slot` indexes the `[n, K]` arrays;
/// a position `p` indexes the expert-contiguous order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub n_tokens: usize,
    pub top_k: usize,
    /// s, `[n, E]`.
    pub scores: Vec<f32>,
    /// Chosen experts, `[n, K]`, in descending `s + b` per token (before capacity drops).
    pub experts: Vec<u32>,
    /// Gates, `[n, K]`; 0 for dropped assignments.
    pub gates: Vec<f32>,
    /// Whether each assignment survived the capacity limit, `[n, K]`.
    pub kept: Vec<bool>,
    /// Assignments per expert before capacity drops, `[E]`.
    pub demand: Vec<usize>,
    /// Kept assignments per expert, `[E]`.
    pub counts: Vec<usize>,
    /// Exclusive prefix sums of `counts`, `[E + 1]`.
    pub offsets: Vec<usize>,
    /// Position → assignment `token·K + slot`, `[Σ counts]`; tokens ascending within an expert.
    pub order: Vec<u32>,
    /// Assignment → position, `[n, K]`; `u32::MAX` for dropped assignments.
    pub position: Vec<u32>,
    /// Assignments dropped by the capacity limit.
    pub dropped: usize,
}

impl Routing {
    pub fn n_experts(&self) -> usize {
        self.counts.len()
    }

    /// Kept assignments, the rows the experts process.
    pub fn n_kept(&self) -> usize {
        self.order.len()
    }
}

/// Per-thread scratch of the selection.
struct SelectScratch {
    key: Vec<f32>,
    allowed: Vec<bool>,
    group_score: Vec<f32>,
    group_free: Vec<bool>,
}

/// Index of the largest `v[i]` with `allowed[i]`, the lowest index among equals.
fn argmax_allowed(v: &[f32], allowed: &[bool]) -> usize {
    let mut best = usize::MAX;
    for (i, (&x, &ok)) in v.iter().zip(allowed).enumerate() {
        if ok && (best == usize::MAX || x > v[best]) {
            best = i;
        }
    }
    assert!(best != usize::MAX, "moe: nothing left to select");
    best
}

/// Sum of the two largest values (the largest alone for a single value).
fn top2_sum(v: &[f32]) -> f32 {
    if v.len() == 1 {
        return v[0];
    }
    let (mut b1, mut b2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > b1 {
            b2 = b1;
            b1 = x;
        } else if x > b2 {
            b2 = x;
        }
    }
    b1 + b2
}

/// Scores of one token's logits, with the vectorizing `math` functions: σ(l) = 1/(1 + e^{−l}), or
/// e^{l − max} · (1/Σ) with Σ from `math::sum` (eight fixed-order partial sums).
fn score_row(logits: &[f32], func: ScoreFunc, s: &mut [f32]) {
    match func {
        ScoreFunc::Sigmoid => {
            for (o, &l) in s.iter_mut().zip(logits) {
                *o = sigmoid(l);
            }
        }
        ScoreFunc::Softmax => {
            let m = math::max(logits);
            for (o, &l) in s.iter_mut().zip(logits) {
                *o = math::exp(l - m);
            }
            let inv = 1.0 / math::sum(s);
            for o in s.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// Top-K experts of one token by s + b (group-limited when `n_group > 1`), into `out`.
fn select_row(s: &[f32], bias: &[f32], cfg: &RouterConfig, scr: &mut SelectScratch, out: &mut [u32]) {
    for ((k, &sv), &bv) in scr.key.iter_mut().zip(s).zip(bias) {
        *k = sv + bv;
    }
    if cfg.n_group > 1 {
        let gs = cfg.n_experts / cfg.n_group;
        for (g, gsc) in scr.group_score.iter_mut().enumerate() {
            *gsc = top2_sum(&scr.key[g * gs..(g + 1) * gs]);
        }
        scr.group_free.fill(true);
        scr.allowed.fill(false);
        for _ in 0..cfg.topk_group {
            let g = argmax_allowed(&scr.group_score, &scr.group_free);
            scr.group_free[g] = false;
            scr.allowed[g * gs..(g + 1) * gs].fill(true);
        }
    } else {
        scr.allowed.fill(true);
    }
    for o in out.iter_mut() {
        let i = argmax_allowed(&scr.key, &scr.allowed);
        scr.allowed[i] = false;
        *o = i as u32;
    }
}

/// Routes `n = logits.len() / E` tokens. `logits`: `[n, E]` (= x Rᵀ), `bias`: `[E]`.
/// Scores, selection and gates follow the module doc; the gate of a token's slot is
/// `s / S · rsf` with `S` summed in slot order. Dropped assignments get gate 0.
pub fn route(logits: &[f32], bias: &[f32], cfg: &RouterConfig) -> Routing {
    cfg.validate();
    let (e, k) = (cfg.n_experts, cfg.top_k);
    assert_eq!(logits.len() % e, 0, "route: logits length {} is not a multiple of E = {e}", logits.len());
    assert_eq!(bias.len(), e, "route: bias must hold E = {e} values");
    let n = logits.len() / e;
    assert!(n * k < u32::MAX as usize, "route: n·K = {} assignments overflow u32", n * k);

    let mut scores = vec![0.0f32; n * e];
    let mut experts = vec![0u32; n * k];
    let mut gates = vec![0.0f32; n * k];
    let rpt = rows_per_task(e * 4);
    let rsf = cfg.routed_scaling_factor;
    scores
        .par_chunks_mut(e * rpt)
        .zip(experts.par_chunks_mut(k * rpt))
        .zip(gates.par_chunks_mut(k * rpt))
        .enumerate()
        .for_each_init(
            || SelectScratch {
                key: vec![0.0; e],
                allowed: vec![false; e],
                group_score: vec![0.0; cfg.n_group],
                group_free: vec![false; cfg.n_group],
            },
            |scr, (chunk, ((sc, ec), gc))| {
                for (r, ((s, ex), g)) in
                    sc.chunks_exact_mut(e).zip(ec.chunks_exact_mut(k)).zip(gc.chunks_exact_mut(k)).enumerate()
                {
                    let t = chunk * rpt + r;
                    score_row(&logits[t * e..(t + 1) * e], cfg.score_func, s);
                    select_row(s, bias, cfg, scr, ex);
                    let mut den = 0.0f32;
                    for &i in ex.iter() {
                        den += s[i as usize];
                    }
                    for (gv, &i) in g.iter_mut().zip(ex.iter()) {
                        *gv = s[i as usize] / den * rsf;
                    }
                }
            },
        );

    // Capacity, in token order, then the expert-contiguous order.
    let cap = cfg.capacity(n).unwrap_or(usize::MAX);
    let (mut demand, mut counts) = (vec![0usize; e], vec![0usize; e]);
    let mut kept = vec![false; n * k];
    let mut dropped = 0;
    for (a, &ex) in experts.iter().enumerate() {
        let ex = ex as usize;
        demand[ex] += 1;
        if counts[ex] < cap {
            counts[ex] += 1;
            kept[a] = true;
        } else {
            gates[a] = 0.0;
            dropped += 1;
        }
    }
    let mut offsets = vec![0usize; e + 1];
    for i in 0..e {
        offsets[i + 1] = offsets[i] + counts[i];
    }
    let mut cursor = offsets[..e].to_vec();
    let mut order = vec![0u32; offsets[e]];
    let mut position = vec![u32::MAX; n * k];
    for (a, &ex) in experts.iter().enumerate() {
        if kept[a] {
            let cur = &mut cursor[ex as usize];
            order[*cur] = a as u32;
            position[a] = *cur as u32;
            *cur += 1;
        }
    }
    Routing { n_tokens: n, top_k: k, scores, experts, gates, kept, demand, counts, offsets, order, position, dropped }
}

/// What [`moe_backward`] needs from [`moe_forward`], all in position order (`P = n_kept` rows).
#[derive(Clone, Debug, Default)]
pub struct MoeCache {
    /// Gathered inputs h, `[P, C]`.
    pub xg: Vec<f32>,
    /// Gate pre-activations h W_gᵀ, `[P, F]`.
    pub hg: Vec<f32>,
    /// Up pre-activations h W_uᵀ, `[P, F]`.
    pub hu: Vec<f32>,
    /// Hidden silu(hg) ∘ hu, `[P, F]`.
    pub act: Vec<f32>,
    /// Expert outputs (before the gate), `[P, C]`.
    pub y: Vec<f32>,
}

/// Splits `len` floats off the front of `buf`.
fn take<'a>(buf: &mut &'a mut [f32], len: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(buf).split_at_mut(len);
    *buf = tail;
    head
}

/// (expert, first position, end position) of each row block: every expert's rows cut into
/// consecutive blocks of at most [`ROWS_PER_TASK`]; together they cover 0..P in order.
fn row_blocks(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut blocks = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        let mut p = w[0];
        while p < w[1] {
            let end = (p + ROWS_PER_TASK).min(w[1]);
            blocks.push((e, p, end));
            p = end;
        }
    }
    blocks
}

/// Sets the length (no zero fill of kept elements: the forward overwrites every one).
fn resize(v: &mut Vec<f32>, len: usize) {
    v.truncate(len);
    v.resize(len, 0.0);
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    name: &str,
    n: usize,
    c: usize,
    f: usize,
    routing: &Routing,
    w_gate: &[f32],
    w_up: &[f32],
    w_down: &[f32],
) {
    let e = routing.n_experts();
    assert_eq!(routing.n_tokens, n, "{name}: routing is for {} tokens, not n = {n}", routing.n_tokens);
    assert!(c > 0 && f > 0, "{name}: C and F must be positive");
    for (w, wn) in [(w_gate, "w_gate"), (w_up, "w_up"), (w_down, "w_down")] {
        assert_eq!(w.len(), e * f * c, "{name}: {wn} must hold E·F·C = {e}·{f}·{c} values");
    }
}

/// Runs the routed experts and the combine.
///
/// `x`: `[n, C]`; `w_gate`, `w_up`: `[E, F, C]`; `w_down`: `[E, C, F]`; `out`: `[n, C]`,
/// overwritten with `Σ_k g_k · expert_k(x)` over the kept slots (0 for a token with none).
/// `cache` is resized and filled for [`moe_backward`] (its allocations are reused across calls).
#[allow(clippy::too_many_arguments)]
pub fn moe_forward(
    x: &[f32],
    n: usize,
    c: usize,
    routing: &Routing,
    w_gate: &[f32],
    w_up: &[f32],
    w_down: &[f32],
    f: usize,
    out: &mut [f32],
    cache: &mut MoeCache,
) {
    check_shapes("moe_forward", n, c, f, routing, w_gate, w_up, w_down);
    assert!(x.len() == n * c && out.len() == n * c, "moe_forward: x and out must hold n·C = {n}·{c} values");
    let (k, p_all) = (routing.top_k, routing.n_kept());
    resize(&mut cache.xg, p_all * c);
    resize(&mut cache.hg, p_all * f);
    resize(&mut cache.hu, p_all * f);
    resize(&mut cache.act, p_all * f);
    resize(&mut cache.y, p_all * c);

    struct Rows<'a> {
        e: usize,
        p0: usize,
        xg: &'a mut [f32],
        hg: &'a mut [f32],
        hu: &'a mut [f32],
        act: &'a mut [f32],
        y: &'a mut [f32],
    }
    let blocks = row_blocks(&routing.offsets);
    let (mut xg, mut hg, mut hu, mut act, mut y) =
        (&mut cache.xg[..], &mut cache.hg[..], &mut cache.hu[..], &mut cache.act[..], &mut cache.y[..]);
    let tasks: Vec<Rows> = blocks
        .iter()
        .map(|&(e, p0, p1)| {
            let r = p1 - p0;
            Rows {
                e,
                p0,
                xg: take(&mut xg, r * c),
                hg: take(&mut hg, r * f),
                hu: take(&mut hu, r * f),
                act: take(&mut act, r * f),
                y: take(&mut y, r * c),
            }
        })
        .collect();
    tasks.into_par_iter().for_each(|t| {
        let r = t.xg.len() / c;
        for (i, row) in t.xg.chunks_exact_mut(c).enumerate() {
            let tok = routing.order[t.p0 + i] as usize / k;
            row.copy_from_slice(&x[tok * c..(tok + 1) * c]);
        }
        let w = t.e * f * c..(t.e + 1) * f * c;
        gemm(r, f, c, t.xg, Layout::N, &w_gate[w.clone()], Layout::T, t.hg, false);
        gemm(r, f, c, t.xg, Layout::N, &w_up[w.clone()], Layout::T, t.hu, false);
        for ((a, &g), &u) in t.act.iter_mut().zip(t.hg.iter()).zip(t.hu.iter()) {
            *a = g * sigmoid(g) * u;
        }
        gemm(r, c, f, t.act, Layout::N, &w_down[w], Layout::T, t.y, false);
    });

    // Combine: each token sums its kept slots in slot order.
    let rpt = rows_per_task(c);
    let y = &cache.y;
    out.par_chunks_mut(c * rpt).enumerate().for_each(|(chunk, oc)| {
        for (r, row) in oc.chunks_exact_mut(c).enumerate() {
            let t = chunk * rpt + r;
            row.fill(0.0);
            for a in t * k..(t + 1) * k {
                if routing.kept[a] {
                    let (g, p) = (routing.gates[a], routing.position[a] as usize);
                    for (o, &v) in row.iter_mut().zip(&y[p * c..(p + 1) * c]) {
                        *o += g * v;
                    }
                }
            }
        }
    });
}

/// Backward of [`moe_forward`] (the routing is treated as fixed; gates get `d_gates`).
///
/// `dout`: `[n, C]`; `cache`: from the forward with the same inputs. Overwrites
/// `dx` `[n, C]` (the expert paths only: the router's contribution is the caller's, see
/// [`router_backward`]), `dw_gate`, `dw_up` `[E, F, C]`, `dw_down` `[E, C, F]` (zero for experts
/// without rows) and `d_gates` `[n, K]` (`dout[t]·y`, 0 for dropped assignments).
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    dout: &[f32],
    n: usize,
    c: usize,
    routing: &Routing,
    w_gate: &[f32],
    w_up: &[f32],
    w_down: &[f32],
    f: usize,
    cache: &MoeCache,
    dx: &mut [f32],
    dw_gate: &mut [f32],
    dw_up: &mut [f32],
    dw_down: &mut [f32],
    d_gates: &mut [f32],
) {
    check_shapes("moe_backward", n, c, f, routing, w_gate, w_up, w_down);
    let (k, p_all) = (routing.top_k, routing.n_kept());
    assert!(dout.len() == n * c && dx.len() == n * c, "moe_backward: dout and dx must hold n·C values");
    assert!(
        dw_gate.len() == w_gate.len() && dw_up.len() == w_up.len() && dw_down.len() == w_down.len(),
        "moe_backward: weight gradients must match the weights"
    );
    assert_eq!(d_gates.len(), n * k, "moe_backward: d_gates must hold n·K values");
    assert!(
        cache.xg.len() == p_all * c
            && cache.y.len() == p_all * c
            && [&cache.hg, &cache.hu, &cache.act].iter().all(|v| v.len() == p_all * f),
        "moe_backward: cache does not match the routing (run moe_forward first)"
    );

    // Per position: dy = g·dout, dh_g and dh_u, dx contribution, and the gate gradient.
    let mut dy = vec![0.0f32; p_all * c];
    let mut dhg = vec![0.0f32; p_all * f];
    let mut dhu = vec![0.0f32; p_all * f];
    let mut dxg = vec![0.0f32; p_all * c];
    let mut dgp = vec![0.0f32; p_all];
    {
        struct Rows<'a> {
            e: usize,
            p0: usize,
            dy: &'a mut [f32],
            dhg: &'a mut [f32],
            dhu: &'a mut [f32],
            dxg: &'a mut [f32],
            dgp: &'a mut [f32],
        }
        let blocks = row_blocks(&routing.offsets);
        let (mut dy, mut dhg, mut dhu, mut dxg, mut dgp) =
            (&mut dy[..], &mut dhg[..], &mut dhu[..], &mut dxg[..], &mut dgp[..]);
        let tasks: Vec<Rows> = blocks
            .iter()
            .map(|&(e, p0, p1)| {
                let r = p1 - p0;
                Rows {
                    e,
                    p0,
                    dy: take(&mut dy, r * c),
                    dhg: take(&mut dhg, r * f),
                    dhu: take(&mut dhu, r * f),
                    dxg: take(&mut dxg, r * c),
                    dgp: take(&mut dgp, r),
                }
            })
            .collect();
        tasks.into_par_iter().for_each(|t| {
            let (r, p0) = (t.dgp.len(), t.p0);
            for i in 0..r {
                let p = p0 + i;
                let a = routing.order[p] as usize;
                let d = &dout[a / k * c..(a / k + 1) * c];
                t.dgp[i] = dot(d, &cache.y[p * c..(p + 1) * c]);
                let g = routing.gates[a];
                for (o, &v) in t.dy[i * c..(i + 1) * c].iter_mut().zip(d) {
                    *o = g * v;
                }
            }
            let w = t.e * f * c..(t.e + 1) * f * c;
            // d_act = dy W_d, held in dhu until the SwiGLU backward splits it.
            gemm(r, f, c, t.dy, Layout::N, &w_down[w.clone()], Layout::N, t.dhu, false);
            let (hg, hu) = (&cache.hg[p0 * f..(p0 + r) * f], &cache.hu[p0 * f..(p0 + r) * f]);
            for (((dg, du), &gv), &uv) in t.dhg.iter_mut().zip(t.dhu.iter_mut()).zip(hg).zip(hu) {
                let (da, sg) = (*du, sigmoid(gv));
                *du = da * gv * sg;
                *dg = da * uv * sg * (1.0 + gv * (1.0 - sg));
            }
            gemm(r, c, f, t.dhg, Layout::N, &w_gate[w.clone()], Layout::N, t.dxg, false);
            gemm(r, c, f, t.dhu, Layout::N, &w_up[w], Layout::N, t.dxg, true);
        });
    }

    // Scatter back to tokens, slot order.
    let rpt = rows_per_task(c);
    dx.par_chunks_mut(c * rpt).zip(d_gates.par_chunks_mut(k * rpt)).enumerate().for_each(|(chunk, (dxc, dgc))| {
        for (r, (row, dgr)) in dxc.chunks_exact_mut(c).zip(dgc.chunks_exact_mut(k)).enumerate() {
            let t = chunk * rpt + r;
            row.fill(0.0);
            for (slot, dg) in dgr.iter_mut().enumerate() {
                let a = t * k + slot;
                *dg = 0.0;
                if routing.kept[a] {
                    let p = routing.position[a] as usize;
                    *dg = dgp[p];
                    for (o, &v) in row.iter_mut().zip(&dxg[p * c..(p + 1) * c]) {
                        *o += v;
                    }
                }
            }
        }
    });

    // Weight gradients: one task per block of output rows of one expert's matrix.
    #[derive(Clone, Copy)]
    enum Kind {
        Gate,
        Up,
        Down,
    }
    let mut tasks: Vec<(Kind, usize, usize, &mut [f32])> = Vec::new();
    for (kind, dw, rows, cols) in [(Kind::Gate, dw_gate, f, c), (Kind::Up, dw_up, f, c), (Kind::Down, dw_down, c, f)] {
        for (e, we) in dw.chunks_mut(rows * cols).enumerate() {
            for (b, blk) in we.chunks_mut(WEIGHT_ROWS_PER_TASK * cols).enumerate() {
                tasks.push((kind, e, b * WEIGHT_ROWS_PER_TASK, blk));
            }
        }
    }
    tasks.into_par_iter().for_each(|(kind, e, r0, out)| {
        let (p0, cnt) = (routing.offsets[e], routing.counts[e]);
        // dW[r0.., :] = Σ_p dH[p, r0..]ᵀ ⊗ in[p, :] over the expert's positions p.
        let (dh, dh_w, inp, in_w) = match kind {
            Kind::Gate => (&dhg, f, &cache.xg, c),
            Kind::Up => (&dhu, f, &cache.xg, c),
            Kind::Down => (&dy, c, &cache.act, f),
        };
        let m = out.len() / in_w;
        if cnt == 0 {
            out.fill(0.0);
            return;
        }
        let a = Strided::new(&dh[p0 * dh_w + r0..], 1, dh_w);
        let b = Strided::rows(inp, p0 * in_w, in_w);
        assert_eq!(out.len(), m * in_w, "moe: matmul output size");
        gemm_strided(m, in_w, cnt, a, b, out, in_w, false);
    });
}

/// Gradient of the router logits, `d_logits` `[n, E]` (overwritten), from the gate gradients
/// `d_gates` `[n, K]` (entries of dropped assignments are ignored: those gates are constant 0)
/// plus optional extra score gradients `d_scores_extra` `[n, E]` (e.g. from [`balance_loss`]).
/// Uses the scores stored in `routing`; the bias gets no gradient.
pub fn router_backward(
    routing: &Routing,
    d_gates: &[f32],
    d_scores_extra: Option<&[f32]>,
    cfg: &RouterConfig,
    d_logits: &mut [f32],
) {
    let (n, e, k) = (routing.n_tokens, cfg.n_experts, cfg.top_k);
    assert!(routing.n_experts() == e && routing.top_k == k, "router_backward: routing does not match the config");
    assert_eq!(d_gates.len(), n * k, "router_backward: d_gates must hold n·K values");
    assert_eq!(d_logits.len(), n * e, "router_backward: d_logits must hold n·E values");
    if let Some(extra) = d_scores_extra {
        assert_eq!(extra.len(), n * e, "router_backward: d_scores_extra must hold n·E values");
    }
    let rsf = cfg.routed_scaling_factor;
    let rpt = rows_per_task(e * 4);
    d_logits.par_chunks_mut(e * rpt).enumerate().for_each(|(chunk, dc)| {
        for (r, ds) in dc.chunks_exact_mut(e).enumerate() {
            let t = chunk * rpt + r;
            let s = &routing.scores[t * e..(t + 1) * e];
            match d_scores_extra {
                Some(extra) => ds.copy_from_slice(&extra[t * e..(t + 1) * e]),
                None => ds.fill(0.0),
            }
            // Through g_k = rsf · s_k / S (S over all K chosen, slot order as in the forward).
            let ex = &routing.experts[t * k..(t + 1) * k];
            let dg = |slot: usize| if routing.kept[t * k + slot] { d_gates[t * k + slot] } else { 0.0 };
            let (mut den, mut gs) = (0.0f32, 0.0f32);
            for (slot, &i) in ex.iter().enumerate() {
                den += s[i as usize];
                gs += dg(slot) * s[i as usize];
            }
            let inv = 1.0 / den;
            let corr = gs * inv;
            for (slot, &i) in ex.iter().enumerate() {
                ds[i as usize] += rsf * inv * (dg(slot) - corr);
            }
            // Through the score function.
            match cfg.score_func {
                ScoreFunc::Sigmoid => {
                    for (d, &sv) in ds.iter_mut().zip(s) {
                        *d *= sv * (1.0 - sv);
                    }
                }
                ScoreFunc::Softmax => {
                    let sd = dot(ds, s);
                    for (d, &sv) in ds.iter_mut().zip(s) {
                        *d = sv * (*d - sd);
                    }
                }
            }
        }
    });
}

/// Sequence-wise balance loss, averaged over `n_seqs` sequences of `seq_len` tokens
/// (`scores` `[n, E]`, `experts` `[n, K]` before capacity drops, `n = n_seqs·seq_len`, tokens of
/// a sequence contiguous). Returns the loss and its gradient with respect to the scores
/// (`[n, E]`, to pass to [`router_backward`] as `d_scores_extra`; `f` is held constant).
pub fn balance_loss(
    scores: &[f32],
    experts: &[u32],
    n_seqs: usize,
    seq_len: usize,
    cfg: &RouterConfig,
    alpha: f32,
) -> (f32, Vec<f32>) {
    let (e, k, t_len) = (cfg.n_experts, cfg.top_k, seq_len);
    let n = n_seqs * t_len;
    assert!(scores.len() == n * e && experts.len() == n * k, "balance_loss: expected [n, E] scores and [n, K] experts");
    let mut d_scores = vec![0.0f32; n * e];
    if n == 0 {
        return (0.0, d_scores);
    }
    let f_scale = e as f32 / (k * t_len) as f32;
    let a_scale = alpha / n_seqs as f32 / t_len as f32;
    let mut losses = vec![0.0f32; n_seqs];
    d_scores.par_chunks_mut(t_len * e).zip(losses.par_iter_mut()).enumerate().for_each(|(q, (dq, loss))| {
        let s = &scores[q * t_len * e..(q + 1) * t_len * e];
        let mut fv = vec![0.0f32; e];
        for &i in &experts[q * t_len * k..(q + 1) * t_len * k] {
            fv[i as usize] += 1.0;
        }
        for v in fv.iter_mut() {
            *v *= f_scale;
        }
        let mut pv = vec![0.0f32; e];
        for row in s.chunks_exact(e) {
            let inv = 1.0 / math::sum(row);
            for (p, &sv) in pv.iter_mut().zip(row) {
                *p += sv * inv;
            }
        }
        let inv_t = 1.0 / t_len as f32;
        *loss = fv.iter().zip(&pv).map(|(&fi, &pi)| fi * (pi * inv_t)).fold(0.0, |acc, v| acc + v);
        // dL/ds'(t, i) = a_i; ds(t, j) = (a_j − Σ_i a_i s'(t, i)) / Σ_i s(t, i).
        let a: Vec<f32> = fv.iter().map(|&fi| a_scale * fi).collect();
        for (row, drow) in s.chunks_exact(e).zip(dq.chunks_exact_mut(e)) {
            let inv = 1.0 / math::sum(row);
            let corr = dot(&a, row) * inv;
            for (d, &ai) in drow.iter_mut().zip(&a) {
                *d = (ai - corr) * inv;
            }
        }
    });
    let total = losses.iter().fold(0.0f32, |acc, &l| acc + l);
    (alpha * total / n_seqs as f32, d_scores)
}

/// Auxiliary-loss-free balancing: `bias[i] −= gamma` when expert i's load is above the mean load,
/// `+= gamma` when below, unchanged when equal (compared exactly, in integers).
pub fn update_bias(bias: &mut [f32], counts: &[usize], gamma: f32) {
    assert_eq!(bias.len(), counts.len(), "update_bias: bias and counts differ in length");
    let e = counts.len() as u128;
    let total: u128 = counts.iter().map(|&c| c as u128).sum();
    for (b, &c) in bias.iter_mut().zip(counts) {
        // load > mean  ⇔  c·E > total
        let scaled = c as u128 * e;
        if scaled > total {
            *b -= gamma;
        } else if scaled < total {
            *b += gamma;
        }
    }
}

/// (max load / mean load, coefficient of variation = population std / mean) of per-expert
/// counts; (0, 0) when no token was routed.
pub fn load_stats(counts: &[usize]) -> (f64, f64) {
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    if counts.is_empty() || total == 0.0 {
        return (0.0, 0.0);
    }
    let mean = total / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let var = counts.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / counts.len() as f64;
    (max / mean, var.sqrt() / mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::swiglu::swiglu_forward;
    use crate::rng::Rng;

    fn randn(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32 * scale).collect()
    }

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

    /// A random problem: inputs, router, bias, expert weights, and loss weights `w` (dout).
    #[derive(Clone)]
    struct Problem {
        n: usize,
        c: usize,
        f: usize,
        e: usize,
        x: Vec<f32>,
        r: Vec<f32>,
        bias: Vec<f32>,
        wg: Vec<f32>,
        wu: Vec<f32>,
        wd: Vec<f32>,
        w: Vec<f32>,
    }

    impl Problem {
        fn new(seed: u64, n: usize, c: usize, f: usize, e: usize) -> Self {
            let mut rng = Rng::new(seed);
            let (sc, sf) = (1.0 / (c as f32).sqrt(), 1.0 / (f as f32).sqrt());
            Problem {
                n,
                c,
                f,
                e,
                x: randn(&mut rng, n * c, 1.0),
                r: randn(&mut rng, e * c, 2.0 * sc),
                bias: randn(&mut rng, e, 0.1),
                wg: randn(&mut rng, e * f * c, sc),
                wu: randn(&mut rng, e * f * c, sc),
                wd: randn(&mut rng, e * c * f, sf),
                w: randn(&mut rng, n * c, 1.0),
            }
        }

        fn logits(&self) -> Vec<f32> {
            let mut l = vec![0.0; self.n * self.e];
            gemm(self.n, self.e, self.c, &self.x, Layout::N, &self.r, Layout::T, &mut l, false);
            l
        }

        fn forward(&self, cfg: &RouterConfig) -> (Routing, Vec<f32>, MoeCache) {
            let routing = route(&self.logits(), &self.bias, cfg);
            let mut out = vec![0.0; self.n * self.c];
            let mut cache = MoeCache::default();
            let (n, c, f) = (self.n, self.c, self.f);
            moe_forward(&self.x, n, c, &routing, &self.wg, &self.wu, &self.wd, f, &mut out, &mut cache);
            (routing, out, cache)
        }

        /// Σ w∘out (+ the balance loss over `bal = (n_seqs, alpha)`), in f64.
        fn loss(&self, cfg: &RouterConfig, bal: Option<(usize, f32)>) -> (f64, Routing) {
            let (routing, out, _) = self.forward(cfg);
            let mut l: f64 = out.iter().zip(&self.w).map(|(&o, &w)| o as f64 * w as f64).sum();
            if let Some((seqs, alpha)) = bal {
                l += balance_loss(&routing.scores, &routing.experts, seqs, self.n / seqs, cfg, alpha).0 as f64;
            }
            (l, routing)
        }

        /// Every gradient of `loss`: [dx, dR, dW_gate, dW_up, dW_down], and the routing.
        fn grads(&self, cfg: &RouterConfig, bal: Option<(usize, f32)>) -> (Routing, [Vec<f32>; 5], Vec<f32>) {
            let (n, c, f, e, k) = (self.n, self.c, self.f, self.e, cfg.top_k);
            let (routing, _, cache) = self.forward(cfg);
            let mut dx = vec![0.0; n * c];
            let (mut dwg, mut dwu, mut dwd) = (vec![0.0; e * f * c], vec![0.0; e * f * c], vec![0.0; e * c * f]);
            let mut dg = vec![0.0; n * k];
            moe_backward(
                &self.w, n, c, &routing, &self.wg, &self.wu, &self.wd, f, &cache, &mut dx, &mut dwg, &mut dwu,
                &mut dwd, &mut dg,
            );
            let extra =
                bal.map(|(seqs, alpha)| balance_loss(&routing.scores, &routing.experts, seqs, n / seqs, cfg, alpha).1);
            let mut dl = vec![0.0; n * e];
            router_backward(&routing, &dg, extra.as_deref(), cfg, &mut dl);
            gemm(n, c, e, &dl, Layout::N, &self.r, Layout::N, &mut dx, true);
            let mut dr = vec![0.0; e * c];
            gemm(e, c, n, &dl, Layout::T, &self.x, Layout::N, &mut dr, false);
            (routing, [dx, dr, dwg, dwu, dwd], dl)
        }
    }

    /// The reference routing, per token: scores in f64; selection by sorting (key desc, index asc)
    /// the kernel's f32 keys (after checking its scores); gates in f64.
    fn naive_route(logits: &[f32], kernel_scores: &[f32], bias: &[f32], cfg: &RouterConfig) -> (Vec<u32>, Vec<f64>) {
        let (e, k) = (cfg.n_experts, cfg.top_k);
        let n = logits.len() / e;
        let (mut experts, mut gates) = (Vec::new(), Vec::new());
        for t in 0..n {
            let l: Vec<f64> = logits[t * e..(t + 1) * e].iter().map(|&v| v as f64).collect();
            let s: Vec<f64> = match cfg.score_func {
                ScoreFunc::Sigmoid => l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
                ScoreFunc::Softmax => {
                    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
                    l.iter().map(|v| (v - m).exp() / z).collect()
                }
            };
            let ks = &kernel_scores[t * e..(t + 1) * e];
            for (a, b) in s.iter().zip(ks) {
                // f32 sigmoid/softmax with the polynomial exp: relative error ~3e-7.
                assert!((a - *b as f64).abs() <= 1e-6, "score {b} vs {a}");
            }
            let key: Vec<f32> = ks.iter().zip(bias).map(|(s, b)| s + b).collect();
            let desc = |v: &[f32], idx: &mut Vec<usize>| {
                idx.sort_by(|&i, &j| v[j].partial_cmp(&v[i]).unwrap().then(i.cmp(&j)))
            };
            let mut allowed: Vec<usize> = (0..e).collect();
            if cfg.n_group > 1 {
                let gs = e / cfg.n_group;
                let gscore: Vec<f32> = (0..cfg.n_group)
                    .map(|g| {
                        let mut idx: Vec<usize> = (g * gs..(g + 1) * gs).collect();
                        desc(&key, &mut idx);
                        idx.iter().take(2).fold(0.0f32, |acc, &i| if acc == 0.0 { key[i] } else { acc + key[i] })
                    })
                    .collect();
                let mut gidx: Vec<usize> = (0..cfg.n_group).collect();
                desc(&gscore, &mut gidx);
                allowed = gidx[..cfg.topk_group].iter().flat_map(|&g| g * gs..(g + 1) * gs).collect();
            }
            desc(&key, &mut allowed);
            let chosen = &allowed[..k];
            let den: f64 = chosen.iter().map(|&i| s[i]).sum();
            for &i in chosen {
                experts.push(i as u32);
                gates.push(s[i] / den * cfg.routed_scaling_factor as f64);
            }
        }
        (experts, gates)
    }

    /// counts/offsets/order/position/kept/demand/dropped are mutually consistent.
    fn check_dispatch(r: &Routing) {
        let (e, k) = (r.n_experts(), r.top_k);
        assert_eq!(r.offsets[0], 0);
        for i in 0..e {
            assert_eq!(r.offsets[i + 1] - r.offsets[i], r.counts[i]);
            let slice = &r.order[r.offsets[i]..r.offsets[i + 1]];
            assert!(slice.iter().all(|&a| r.experts[a as usize] as usize == i && r.kept[a as usize]));
            assert!(
                slice.windows(2).all(|w| w[0] / (k as u32) < w[1] / (k as u32)),
                "tokens ascending within an expert"
            );
        }
        for (p, &a) in r.order.iter().enumerate() {
            assert_eq!(r.position[a as usize] as usize, p);
        }
        let n_kept = r.kept.iter().filter(|&&b| b).count();
        assert_eq!(n_kept, r.order.len());
        assert_eq!(r.dropped, r.n_tokens * k - n_kept);
        assert_eq!(r.demand.iter().sum::<usize>(), r.n_tokens * k);
        for (a, &kp) in r.kept.iter().enumerate() {
            assert_eq!(kp, r.position[a] != u32::MAX);
            if !kp {
                assert_eq!(r.gates[a], 0.0);
            }
        }
    }

    #[test]
    fn route_matches_naive() {
        use ScoreFunc::*;
        let cases = [
            config(8, 2, (1, 1), Sigmoid, None),
            config(8, 3, (4, 2), Sigmoid, None),
            config(12, 4, (3, 2), Softmax, None),
            config(6, 1, (1, 1), Softmax, None),
            config(16, 4, (8, 3), Sigmoid, None),
            config(6, 2, (6, 2), Sigmoid, None), // one expert per group
        ];
        let mut rng = Rng::new(11);
        for cfg in &cases {
            let n = 50;
            let logits = randn(&mut rng, n * cfg.n_experts, 2.0);
            let bias = randn(&mut rng, cfg.n_experts, 0.3);
            let r = route(&logits, &bias, cfg);
            check_dispatch(&r);
            assert_eq!(r.dropped, 0);
            let (experts, gates) = naive_route(&logits, &r.scores, &bias, cfg);
            assert_eq!(r.experts, experts, "{cfg:?}");
            let rsf = cfg.routed_scaling_factor;
            for t in 0..n {
                let g = &r.gates[t * cfg.top_k..(t + 1) * cfg.top_k];
                for (a, b) in g.iter().zip(&gates[t * cfg.top_k..]) {
                    // f32 scores (rel. error 3e-7) through one division: 1e-6 of rsf.
                    assert!((*a as f64 - b).abs() <= 1e-6 * rsf as f64, "{cfg:?}: gate {a} vs {b}");
                }
                // gates sum to rsf (f32 rounding of K terms: 1e-6 relative)
                let sum: f32 = g.iter().sum();
                assert!((sum - rsf).abs() <= 1e-6 * rsf, "{cfg:?}: gates sum to {sum}");
                if cfg.n_group > 1 {
                    let gs = cfg.n_experts / cfg.n_group;
                    let mut groups: Vec<u32> =
                        r.experts[t * cfg.top_k..(t + 1) * cfg.top_k].iter().map(|&i| i / gs as u32).collect();
                    groups.sort();
                    groups.dedup();
                    assert!(groups.len() <= cfg.topk_group);
                }
            }
        }
    }

    #[test]
    fn bias_changes_selection_not_gates() {
        let cfg = config(8, 2, (1, 1), ScoreFunc::Sigmoid, None);
        let mut rng = Rng::new(5);
        let logits = randn(&mut rng, 40 * 8, 1.0);
        let plain = route(&logits, &[0.0; 8], &cfg);
        let mut bias = [0.0f32; 8];
        bias[3] = 10.0;
        let biased = route(&logits, &bias, &cfg);
        assert_eq!(plain.scores, biased.scores);
        assert_ne!(plain.experts, biased.experts);
        for t in 0..40 {
            assert_eq!(biased.experts[t * 2], 3, "the boosted expert takes slot 0");
            let s = &biased.scores[t * 8..(t + 1) * 8];
            let ex = &biased.experts[t * 2..t * 2 + 2];
            let den = s[ex[0] as usize] + s[ex[1] as usize];
            for (slot, &i) in ex.iter().enumerate() {
                // the same formula in the same order: bitwise equal, and the bias is absent
                assert_eq!(biased.gates[t * 2 + slot], s[i as usize] / den * 2.5);
            }
        }
        // ties go to the lower index; equal scores give equal gates
        let tied = route(&[0.0; 3 * 8], &[0.0; 8], &cfg);
        assert_eq!(tied.experts, [0, 1, 0, 1, 0, 1]);
        assert!(tied.gates.iter().all(|&g| g == 1.25));
        let grouped = route(&[0.0; 8], &[0.0; 8], &config(8, 2, (4, 2), ScoreFunc::Softmax, None));
        assert_eq!(grouped.experts, [0, 1]);
    }

    #[test]
    fn capacity_drops_overflow_in_token_order() {
        // Tokens 0..7 prefer expert 0, tokens 7..10 expert 1; cap = ceil(1.0·10·1/4) = 3.
        let cfg = config(4, 1, (1, 1), ScoreFunc::Sigmoid, Some(1.0));
        let mut logits = vec![0.0f32; 10 * 4];
        for t in 0..10 {
            logits[t * 4 + if t < 7 { 0 } else { 1 }] = 3.0;
        }
        let r = route(&logits, &[0.0; 4], &cfg);
        check_dispatch(&r);
        assert_eq!(cfg.capacity(10), Some(3));
        assert_eq!(r.demand, [7, 3, 0, 0]);
        assert_eq!(r.counts, [3, 3, 0, 0]);
        assert_eq!(r.offsets, [0, 3, 6, 6, 6]);
        assert_eq!(r.dropped, 4);
        assert_eq!(r.order, [0, 1, 2, 7, 8, 9]);
        assert_eq!(r.kept, [true, true, true, false, false, false, false, true, true, true]);
        assert!(r.gates.iter().enumerate().all(|(t, &g)| g == if (3..7).contains(&t) { 0.0 } else { 2.5 }));

        // Random K = 2 against a simulation; kept gates keep their uncapped values.
        let cfg = config(6, 2, (3, 2), ScoreFunc::Softmax, Some(0.75));
        let mut rng = Rng::new(9);
        let logits = randn(&mut rng, 60 * 6, 2.0);
        let bias = randn(&mut rng, 6, 0.5);
        let capped = route(&logits, &bias, &cfg);
        let free = route(&logits, &bias, &RouterConfig { capacity_factor: None, ..cfg });
        check_dispatch(&capped);
        let cap = cfg.capacity(60).unwrap();
        assert_eq!(cap, 15); // ceil(0.75·120/6)
        let mut load = [0usize; 6];
        let mut dropped = 0;
        for a in 0..120 {
            let ex = free.experts[a] as usize;
            let keep = load[ex] < cap;
            load[ex] += keep as usize;
            dropped += !keep as usize;
            assert_eq!(capped.kept[a], keep);
            assert_eq!(capped.gates[a], if keep { free.gates[a] } else { 0.0 });
        }
        assert!(dropped > 0);
        assert_eq!(capped.dropped, dropped);
        assert_eq!(capped.counts, load);
        assert_eq!(capped.demand, free.counts);
        assert_eq!(capped.experts, free.experts);
    }

    /// Gate and up pre-activations of hidden unit j of expert e for one row, in f64.
    fn naive_pre(p: &Problem, e: usize, j: usize, x: &[f32]) -> (f64, f64) {
        let row = (e * p.f + j) * p.c..(e * p.f + j + 1) * p.c;
        let dotf = |w: &[f32]| x.iter().zip(&w[row.clone()]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
        (dotf(&p.wg), dotf(&p.wu))
    }

    /// One expert's FFN on one row, in f64.
    fn naive_ffn(p: &Problem, e: usize, x: &[f32]) -> Vec<f64> {
        let (c, f) = (p.c, p.f);
        let mut act = vec![0.0f64; f];
        for (j, a) in act.iter_mut().enumerate() {
            let (g, u) = naive_pre(p, e, j, x);
            *a = g / (1.0 + (-g).exp()) * u;
        }
        (0..c).map(|i| (0..f).map(|j| act[j] * p.wd[(e * c + i) * f + j] as f64).sum()).collect()
    }

    #[test]
    fn forward_matches_naive() {
        // ~150 rows per expert: several row blocks per expert.
        let p = Problem::new(21, 300, 24, 40, 4);
        for cap in [None, Some(0.8)] {
            let cfg = config(4, 2, (2, 1), ScoreFunc::Sigmoid, cap);
            let (r, out, _) = p.forward(&cfg);
            assert_eq!(r.dropped > 0, cap.is_some());
            for t in 0..p.n {
                let mut want = vec![0.0f64; p.c];
                for slot in 0..2 {
                    let a = t * 2 + slot;
                    if r.kept[a] {
                        let y = naive_ffn(&p, r.experts[a] as usize, &p.x[t * p.c..(t + 1) * p.c]);
                        for (w, v) in want.iter_mut().zip(y) {
                            *w += r.gates[a] as f64 * v;
                        }
                    }
                }
                for (o, w) in out[t * p.c..(t + 1) * p.c].iter().zip(&want) {
                    // f32 GEMMs over 24 and 40 terms of O(1) values: 2e-5 absolute + relative.
                    assert!((*o as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()), "token {t}: {o} vs {w}");
                }
            }
        }
    }

    #[test]
    fn backward_matches_naive() {
        // F = 80 and C = 72 give two weight-gradient blocks each; expert 3 gets no rows.
        let mut p = Problem::new(4, 200, 72, 80, 4);
        p.bias[3] = -100.0;
        let cfg = config(4, 2, (1, 1), ScoreFunc::Sigmoid, Some(0.9));
        let (n, c, f, e) = (p.n, p.c, p.f, p.e);
        let (r, _, cache) = p.forward(&cfg);
        assert!(r.dropped > 0 && r.counts[3] == 0);
        let mut dx = vec![0.0; n * c];
        let (mut dwg, mut dwu, mut dwd) = (vec![1.0; e * f * c], vec![1.0; e * f * c], vec![1.0; e * c * f]);
        let mut dg = vec![1.0; n * 2];
        moe_backward(&p.w, n, c, &r, &p.wg, &p.wu, &p.wd, f, &cache, &mut dx, &mut dwg, &mut dwu, &mut dwd, &mut dg);

        let (mut wdx, mut wdg) = (vec![0.0f64; n * c], vec![0.0f64; n * 2]);
        let (mut wwg, mut wwu, mut wwd) = (vec![0.0f64; e * f * c], vec![0.0f64; e * f * c], vec![0.0f64; e * c * f]);
        for t in 0..n {
            let xt = &p.x[t * c..(t + 1) * c];
            let dout = &p.w[t * c..(t + 1) * c];
            for slot in 0..2 {
                let a = t * 2 + slot;
                if !r.kept[a] {
                    continue;
                }
                let ex = r.experts[a] as usize;
                let gate = r.gates[a] as f64;
                let y = naive_ffn(&p, ex, xt);
                wdg[a] = y.iter().zip(dout).map(|(y, &d)| y * d as f64).sum();
                let dy: Vec<f64> = dout.iter().map(|&d| gate * d as f64).collect();
                for j in 0..f {
                    let (g, u) = naive_pre(&p, ex, j, xt);
                    let sg = 1.0 / (1.0 + (-g).exp());
                    let act = g * sg * u;
                    let mut da = 0.0;
                    for i in 0..c {
                        da += dy[i] * p.wd[(ex * c + i) * f + j] as f64;
                        wwd[(ex * c + i) * f + j] += dy[i] * act;
                    }
                    let (dgv, duv) = (da * u * sg * (1.0 + g * (1.0 - sg)), da * g * sg);
                    for i in 0..c {
                        wwg[(ex * f + j) * c + i] += dgv * xt[i] as f64;
                        wwu[(ex * f + j) * c + i] += duv * xt[i] as f64;
                        wdx[t * c + i] +=
                            dgv * p.wg[(ex * f + j) * c + i] as f64 + duv * p.wu[(ex * f + j) * c + i] as f64;
                    }
                }
            }
        }
        // f32 GEMMs: reductions over up to ~150 rows (weights) or 72/80 terms; 1e-4·(1 + |ref|).
        for (name, got, want) in [
            ("dx", &dx, &wdx),
            ("d_gates", &dg, &wdg),
            ("dw_gate", &dwg, &wwg),
            ("dw_up", &dwu, &wwu),
            ("dw_down", &dwd, &wwd),
        ] {
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{name}[{i}]: {g} vs {w}");
            }
        }
        assert!(dwg[3 * f * c..].iter().chain(&dwd[3 * c * f..]).all(|&v| v == 0.0));
    }

    #[test]
    fn single_expert_top1_equals_dense_swiglu() {
        let p = Problem::new(8, 150, 32, 48, 1);
        let cfg = RouterConfig { routed_scaling_factor: 1.0, ..config(1, 1, (1, 1), ScoreFunc::Sigmoid, None) };
        let (r, out, _) = p.forward(&cfg);
        assert!(r.gates.iter().all(|&g| g == 1.0));
        let (n, c, f) = (p.n, p.c, p.f);
        let (mut hg, mut hu, mut act, mut y) = (vec![0.0; n * f], vec![0.0; n * f], vec![0.0; n * f], vec![0.0; n * c]);
        gemm(n, f, c, &p.x, Layout::N, &p.wg, Layout::T, &mut hg, false);
        gemm(n, f, c, &p.x, Layout::N, &p.wu, Layout::T, &mut hu, false);
        swiglu_forward(&hg, &hu, &mut act);
        gemm(n, c, f, &act, Layout::N, &p.wd, Layout::T, &mut y, false);
        for (a, b) in out.iter().zip(&y) {
            // same math in f32; only the GEMM blocking differs: 1e-6·(1 + |y|)
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Central differences (eps 1e-2 in f32, loss in f64) of every parameter against the analytic
    /// gradients; coordinates whose perturbation changes the selection or the drops are skipped.
    fn finite_difference_check(cfg: &RouterConfig, bal: Option<(usize, f32)>) {
        let base = Problem::new(17, 12, 8, 5, cfg.n_experts);
        let (r0, grads, _) = base.grads(cfg, bal);
        let eps = 1e-2f32;
        let names = ["x", "router", "w_gate", "w_up", "w_down"];
        for (which, analytic) in grads.iter().enumerate() {
            let (mut checked, mut skipped) = (0, 0);
            for i in 0..analytic.len() {
                let eval = |delta: f32| {
                    let mut p = base.clone();
                    let params = [&mut p.x, &mut p.r, &mut p.wg, &mut p.wu, &mut p.wd];
                    params[which][i] += delta;
                    p.loss(cfg, bal)
                };
                let ((lp, rp), (lm, rm)) = (eval(eps), eval(-eps));
                if [&rp, &rm].iter().any(|r| r.experts != r0.experts || r.kept != r0.kept) {
                    skipped += 1;
                    continue;
                }
                checked += 1;
                let fd = (lp - lm) / (2.0 * eps as f64);
                let an = analytic[i] as f64;
                let err = (fd - an).abs();
                // f32 rounding of the loss (~1e-6) over 2·eps, plus O(eps²) truncation:
                // atol 3e-4 + rtol 3e-3 (the worst error seen is about a quarter of that).
                assert!(err <= 3e-4 + 3e-3 * an.abs(), "{cfg:?} {}[{i}]: fd {fd} vs analytic {an}", names[which]);
            }
            assert!(checked >= analytic.len() * 3 / 4, "{}: too many skipped ({skipped})", names[which]);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        use ScoreFunc::*;
        finite_difference_check(&config(6, 2, (1, 1), Sigmoid, None), None);
        finite_difference_check(&config(6, 2, (3, 2), Sigmoid, Some(1.0)), Some((2, 0.3)));
        finite_difference_check(&config(6, 2, (1, 1), Softmax, Some(1.0)), None);
        finite_difference_check(&config(6, 3, (3, 2), Softmax, None), Some((3, 0.3)));
        // capacity must actually drop something in the configs that set it
        let p = Problem::new(17, 12, 8, 5, 6);
        assert!(p.forward(&config(6, 2, (3, 2), Sigmoid, Some(1.0))).0.dropped > 0);
        assert!(p.forward(&config(6, 2, (1, 1), Softmax, Some(1.0))).0.dropped > 0);
    }

    #[test]
    fn balance_loss_value_and_gradient() {
        let cfg = config(5, 2, (1, 1), ScoreFunc::Sigmoid, None);
        let (seqs, len, alpha) = (3, 7, 0.2f32);
        let mut rng = Rng::new(2);
        let logits = randn(&mut rng, seqs * len * 5, 1.5);
        let r = route(&logits, &[0.0; 5], &cfg);
        let (loss, ds) = balance_loss(&r.scores, &r.experts, seqs, len, &cfg, alpha);
        // value against the formula in f64
        let mut want = 0.0f64;
        for q in 0..seqs {
            for i in 0..5 {
                let (mut cnt, mut pi) = (0.0f64, 0.0f64);
                for t in q * len..(q + 1) * len {
                    cnt += r.experts[t * 2..t * 2 + 2].iter().filter(|&&x| x as usize == i).count() as f64;
                    let z: f64 = r.scores[t * 5..(t + 1) * 5].iter().map(|&v| v as f64).sum();
                    pi += r.scores[t * 5 + i] as f64 / z / len as f64;
                }
                want += 5.0 / (2.0 * len as f64) * cnt * pi;
            }
        }
        want *= alpha as f64 / seqs as f64;
        assert!((loss as f64 - want).abs() <= 1e-6 * want.abs(), "{loss} vs {want}");
        // gradient w.r.t. the scores (experts fixed), central differences, eps 1e-2:
        // the loss is a ratio of sums, smooth; f32 rounding ~1e-7·loss / 2e-2 → atol 1e-5, rtol 1e-3.
        let eps = 1e-2f32;
        for i in 0..ds.len() {
            let at = |d: f32| {
                let mut s = r.scores.clone();
                s[i] += d;
                balance_loss(&s, &r.experts, seqs, len, &cfg, alpha).0 as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            assert!((fd - ds[i] as f64).abs() <= 1e-5 + 1e-3 * fd.abs(), "d_scores[{i}]: fd {fd} vs {}", ds[i]);
        }
        // a perfectly balanced batch with uniform scores has loss α (f_i = 1, P_i = 1/E)
        let uniform = vec![0.5f32; 4 * 2];
        let cfg1 = config(2, 1, (1, 1), ScoreFunc::Sigmoid, None);
        let (l, _) = balance_loss(&uniform, &[0, 1, 0, 1], 1, 4, &cfg1, 0.5);
        assert!((l - 0.5).abs() < 1e-7);
    }

    #[test]
    fn deterministic_across_calls_and_thread_counts() {
        let p = Problem::new(31, 500, 32, 48, 8);
        let cfg = config(8, 2, (4, 2), ScoreFunc::Sigmoid, Some(1.1));
        let run = || {
            let (r, out, _) = p.forward(&cfg);
            let (_, grads, dl) = p.grads(&cfg, Some((5, 0.1)));
            let mut bits: Vec<u32> = r.gates.iter().chain(&out).chain(&dl).map(|v| v.to_bits()).collect();
            bits.extend(grads.iter().flatten().map(|v| v.to_bits()));
            bits.extend(&r.order);
            bits
        };
        let first = run();
        assert_eq!(first, run());
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert!(first == pool.install(run), "differs with {threads} threads");
        }
    }

    #[test]
    fn empty_batch() {
        let cfg = config(4, 2, (2, 1), ScoreFunc::Softmax, Some(1.0));
        let r = route(&[], &[0.0; 4], &cfg);
        assert_eq!((r.n_tokens, r.n_kept(), r.dropped), (0, 0, 0));
        let mut cache = MoeCache::default();
        let w = vec![0.0; 4 * 3 * 2];
        moe_forward(&[], 0, 2, &r, &w, &w, &w, 3, &mut [], &mut cache);
        let mut dw = [vec![1.0; 24], vec![1.0; 24], vec![1.0; 24]];
        let [a, b, c] = &mut dw;
        moe_backward(&[], 0, 2, &r, &w, &w, &w, 3, &cache, &mut [], a, b, c, &mut []);
        assert!(dw.iter().flatten().all(|&v| v == 0.0));
        assert_eq!(balance_loss(&[], &[], 0, 8, &cfg, 1.0).0, 0.0);
    }

    #[test]
    fn update_bias_and_load_stats_by_hand() {
        let mut bias = [0.0f32, 0.5, 0.0, -0.5];
        update_bias(&mut bias, &[4, 2, 2, 0], 0.1); // mean 2: above, equal, equal, below
        assert_eq!(bias, [-0.1, 0.5, 0.0, -0.4]);
        let mut bias = [0.0f32; 2];
        update_bias(&mut bias, &[1, 2], 0.25); // mean 1.5
        assert_eq!(bias, [0.25, -0.25]);
        let (ratio, cv) = load_stats(&[4, 2, 2, 0]); // mean 2, variance (4 + 0 + 0 + 4)/4 = 2
        assert_eq!(ratio, 2.0);
        assert!((cv - 2f64.sqrt() / 2.0).abs() < 1e-15);
        assert_eq!(load_stats(&[3, 3, 3]), (1.0, 0.0));
        assert_eq!(load_stats(&[0, 0]), (0.0, 0.0));
    }
}
