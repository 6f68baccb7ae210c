//! Argument checks of the device kernel API ([`super::cuda`]), on shapes and host values
//! alone: they need no device, so the unit tests below run everywhere. Each returns the
//! dimensions the launch needs, or a [`CudaError`] naming the function and what is wrong.
//! The CUDA-only limits (head dims 64/128, rows of 16 bytes, shared memory) are checked by
//! the launch code in `backend::cuda`, which also returns errors.

use crate::backend::cpu::attention::AttnDims;
use crate::backend::cpu::dsa::{DsaDims, PAD};
use crate::backend::cpu::moe::RouterConfig;
use crate::backend::cpu::window_attention::WindowDims;
use crate::backend::cuda::{CudaError, CudaResult};

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> CudaResult<()> {
    if cond {
        Ok(())
    } else {
        Err(CudaError(msg()))
    }
}

fn rank(f: &str, what: &str, shape: &[usize], n: usize, layout: &str) -> CudaResult<()> {
    ensure(shape.len() == n, || format!("{f}: {what} must be {layout}, got shape {shape:?}"))
}

/// matmul: a [m, k], b [k, n] → (m, n, k).
pub fn matmul(a: &[usize], b: &[usize]) -> CudaResult<(usize, usize, usize)> {
    rank("matmul", "a", a, 2, "[m, k]")?;
    rank("matmul", "b", b, 2, "[k, n]")?;
    ensure(a[1] == b[0], || format!("matmul: inner dimensions differ ({a:?} · {b:?})"))?;
    Ok((a[0], b[1], a[1]))
}

/// linear: x [..., k], w [n, k] → (rows m, n, k).
pub fn linear(x: &[usize], w: &[usize]) -> CudaResult<(usize, usize, usize)> {
    rank("linear", "w", w, 2, "[n, k]")?;
    let (n, k) = (w[0], w[1]);
    ensure(x.last() == Some(&k), || format!("linear: x {x:?} must end in k = {k} (w is {w:?})"))?;
    Ok((x[..x.len() - 1].iter().product(), n, k))
}

/// linear_residual / linear_swiglu: x [..., k], w [n, k] and `other` (the residual or the gate)
/// shaped like the output [..., n] → (rows m, n, k).
pub fn linear_fused(f: &str, x: &[usize], w: &[usize], other: (&str, &[usize])) -> CudaResult<(usize, usize, usize)> {
    let (m, n, k) = linear(x, w).map_err(|e| CudaError(e.0.replacen("linear", f, 1)))?;
    let mut out = x.to_vec();
    *out.last_mut().expect("checked: x ends in k") = n;
    ensure(other.1 == out, || format!("{f}: {} {:?} must have the output's shape {out:?}", other.0, other.1))?;
    Ok((m, n, k))
}

/// rmsnorm over groups of `dim` consecutive values → rows.
pub fn rmsnorm(x: &[usize], dim: usize) -> CudaResult<usize> {
    let n: usize = x.iter().product();
    ensure(dim > 0 && n % dim == 0, || format!("rmsnorm: dim {dim} must be > 0 and divide the {n} values of {x:?}"))?;
    Ok(n / dim)
}

/// layernorm of x [.., dim] with gamma, beta [dim] → (rows, dim).
pub fn layernorm(x: &[usize], gamma: &[usize], beta: &[usize]) -> CudaResult<(usize, usize)> {
    let dim = *x.last().unwrap_or(&0);
    ensure(dim > 0, || format!("layernorm: x {x:?} has no last dim"))?;
    ensure(gamma == [dim] && beta == [dim], || {
        format!("layernorm: gamma {gamma:?} and beta {beta:?} must be [{dim}] (x's last dim)")
    })?;
    Ok((x.iter().product::<usize>() / dim, dim))
}

/// rope on x [b, t, h, d] with a table of `head_dim`, `max_t` → (b, t, h).
pub fn rope(x: &[usize], head_dim: usize, max_t: usize) -> CudaResult<(usize, usize, usize)> {
    rank("rope", "x", x, 4, "[b, t, h, head_dim]")?;
    ensure(x[3] == head_dim, || format!("rope: x {x:?} must end in the table's head_dim {head_dim}"))?;
    ensure(x[1] <= max_t, || format!("rope: sequence length {} exceeds the table's {max_t}", x[1]))?;
    Ok((x[0], x[1], x[2]))
}

/// rope_qk on q [b, t, h, d] and k [b, t, h_kv, d] → (b, t, h, h_kv).
pub fn rope_qk(q: &[usize], k: &[usize], head_dim: usize, max_t: usize) -> CudaResult<(usize, usize, usize, usize)> {
    let (b, t, h) = rope(q, head_dim, max_t)?;
    rope(k, head_dim, max_t)?;
    ensure(k[0] == b && k[1] == t, || format!("rope_qk: q {q:?} and k {k:?} differ in b or t"))?;
    Ok((b, t, h, k[2]))
}

/// rope_qknorm on q_raw [b, t, h, d] and k_raw [b, t, h_kv, d] → (b, t, h, h_kv).
pub fn rope_qknorm(
    q: &[usize],
    k: &[usize],
    head_dim: usize,
    max_t: usize,
) -> CudaResult<(usize, usize, usize, usize)> {
    rank("rope_qknorm", "q_raw", q, 4, "[b, t, h, head_dim]")?;
    rank("rope_qknorm", "k_raw", k, 4, "[b, t, h_kv, head_dim]")?;
    ensure(q[3] == head_dim && k[3] == head_dim, || {
        format!("rope_qknorm: q_raw {q:?} and k_raw {k:?} must end in the table's head_dim {head_dim}")
    })?;
    ensure(k[0] == q[0] && k[1] == q[1], || format!("rope_qknorm: q_raw {q:?} and k_raw {k:?} differ in b or t"))?;
    ensure(q[1] <= max_t, || format!("rope_qknorm: sequence length {} exceeds the table's {max_t}", q[1]))?;
    Ok((q[0], q[1], q[2], k[2]))
}

/// Attention shapes: q [b, t, h, d], k and v [b, t, h_kv, d], h a multiple of h_kv.
/// v may be narrower than q and k (`[b, t, h_kv, dv]`, MLA's value width): read dv from v.
pub fn attention(f: &str, q: &[usize], k: &[usize], v: &[usize]) -> CudaResult<AttnDims> {
    rank(f, "q", q, 4, "[b, t, h, d]")?;
    rank(f, "k", k, 4, "[b, t, h_kv, d]")?;
    rank(f, "v", v, 4, "[b, t, h_kv, dv]")?;
    ensure(k[..3] == v[..3] && v[3] > 0, || format!("{f}: v {v:?} must be [b, t, h_kv, dv] for k {k:?}"))?;
    let dims = AttnDims { b: q[0], t: q[1], h: q[2], h_kv: k[2], d: q[3] };
    ensure(k[0] == dims.b && k[1] == dims.t && k[3] == dims.d, || {
        format!("{f}: k {k:?} must be [b, t, h_kv, d] for q {q:?}")
    })?;
    ensure(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || {
        format!("{f}: q's {} heads must be a multiple of k's {} heads", dims.h, dims.h_kv)
    })?;
    Ok(dims)
}

/// window_attention: attention shapes and a window ≥ 1.
pub fn window_attention(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    window: usize,
    n_global: usize,
) -> CudaResult<WindowDims> {
    let AttnDims { b, t, h, h_kv, d } = attention("window_attention", q, k, v)?;
    ensure(window >= 1, || "window_attention: window must be >= 1".into())?;
    Ok(WindowDims { b, t, h, h_kv, d, window, n_global })
}

/// swiglu: g and u alike.
pub fn swiglu(g: &[usize], u: &[usize]) -> CudaResult<()> {
    ensure(g == u, || format!("swiglu: g {g:?} and u {u:?} differ"))
}

/// Cross-entropy: logits [..., vocab] with one target per row, each < vocab or negative
/// (ignored) → (rows, vocab).
pub fn cross_entropy(logits: &[usize], targets: &[i32], cap: f32) -> CudaResult<(usize, usize)> {
    let f = "softcap_cross_entropy";
    let vocab = *logits.last().ok_or_else(|| CudaError(format!("{f}: logits have no dimensions")))?;
    ensure(vocab > 0, || format!("{f}: vocab (the last dim of {logits:?}) must be > 0"))?;
    let rows = logits.iter().product::<usize>() / vocab;
    ensure(targets.len() == rows, || format!("{f}: {} targets for {rows} rows of logits {logits:?}", targets.len()))?;
    ensure(cap.is_finite() && cap >= 0.0, || format!("{f}: cap {cap} must be finite and >= 0 (0: no cap)"))?;
    if let Some(t) = targets.iter().find(|&&t| t >= 0 && t as usize >= vocab) {
        return Err(CudaError(format!("{f}: target {t} is >= vocab = {vocab}")));
    }
    Ok((rows, vocab))
}

/// embedding: table [vocab, dim], every id < vocab → (vocab, dim).
pub fn embedding(table: &[usize], ids: &[u32]) -> CudaResult<(usize, usize)> {
    rank("embedding", "table", table, 2, "[vocab, dim]")?;
    let (vocab, dim) = (table[0], table[1]);
    if let Some(i) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(CudaError(format!("embedding: id {i} is >= vocab = {vocab}")));
    }
    Ok((vocab, dim))
}

/// dsa_topk: qi [b, t, H_I, d_I], ki [b, t, d_I], wi [b, t, H_I], topk + window ≥ 1.
pub fn dsa_topk(qi: &[usize], ki: &[usize], wi: &[usize], topk: usize, window: usize) -> CudaResult<DsaDims> {
    rank("dsa_topk", "qi", qi, 4, "[b, t, n_index_heads, index_dim]")?;
    let (b, t, n_index_heads, index_dim) = (qi[0], qi[1], qi[2], qi[3]);
    ensure(ki == [b, t, index_dim], || format!("dsa_topk: ki {ki:?} must be [b, t, index_dim] for qi {qi:?}"))?;
    ensure(wi == [b, t, n_index_heads], || format!("dsa_topk: wi {wi:?} must be [b, t, n_index_heads] for qi {qi:?}"))?;
    ensure(n_index_heads > 0 && index_dim > 0, || format!("dsa_topk: qi {qi:?} has no index heads or dims"))?;
    ensure(topk.saturating_add(window) >= 1, || "dsa_topk: topk + window must be >= 1".into())?;
    ensure(t < PAD as usize, || format!("dsa_topk: t = {t} must be < 2^32 - 1"))?;
    Ok(DsaDims { b, t, h: 0, h_kv: 0, d: 0, n_index_heads, index_dim, topk, window })
}

/// A selection's shape `[b, t, kmax]` must be what `topk` and `window` give: kmax = min(topk + window, t).
pub fn selection_shape(shape: [usize; 3], topk: usize, window: usize) -> CudaResult<()> {
    let [_, t, kmax] = shape;
    ensure(topk.saturating_add(window) >= 1 && t < PAD as usize, || {
        format!("selection: topk + window must be >= 1 and t < 2^32 - 1 (t = {t})")
    })?;
    let want = topk.saturating_add(window).min(t);
    ensure(kmax == want, || format!("selection: kmax {kmax} must be min(topk + window, t) = {want}"))
}

/// Each row `i` of a selection `[b, t, kmax]` (when kmax > 0) must be non-empty and causal: the
/// entries before its first [`PAD`] are key indices ≤ i, and there is at least one.
pub fn selection_rows(shape: [usize; 3], sel: &[u32]) -> CudaResult<()> {
    let [b, t, kmax] = shape;
    ensure(sel.len() == b * t * kmax, || format!("selection: {} entries for shape {shape:?}", sel.len()))?;
    if kmax == 0 {
        return Ok(());
    }
    for (r, row) in sel.chunks_exact(kmax).enumerate() {
        let i = r % t;
        let n = row.iter().position(|&s| s == PAD).unwrap_or(kmax);
        ensure(n > 0, || format!("selection: row {r} (query {i}) selects no key"))?;
        if let Some(s) = row[..n].iter().find(|&&s| s as usize > i) {
            return Err(CudaError(format!("selection: row {r} selects key {s} after its query {i}")));
        }
    }
    Ok(())
}

/// sparse_attention: attention shapes and a selection `[b, t, kmax]` of the same b and t.
pub fn sparse_attention(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    sel: [usize; 3],
    topk: usize,
    window: usize,
) -> CudaResult<DsaDims> {
    let AttnDims { b, t, h, h_kv, d } = attention("sparse_attention", q, k, v)?;
    ensure(sel[0] == b && sel[1] == t, || {
        format!("sparse_attention: selection {sel:?} is not [b, t, kmax] for q {q:?}")
    })?;
    selection_shape(sel, topk, window)?;
    Ok(DsaDims { b, t, h, h_kv, d, n_index_heads: 0, index_dim: 0, topk, window })
}

/// The conditions of `RouterConfig::validate`, as an error instead of a panic.
pub fn router_config(cfg: &RouterConfig) -> CudaResult<()> {
    let (e, k, g, tg) = (cfg.n_experts, cfg.top_k, cfg.n_group, cfg.topk_group);
    let f = "moe_route";
    ensure(e >= 1 && e <= u32::MAX as usize, || format!("{f}: n_experts = {e} must be in 1..=u32::MAX"))?;
    ensure(k >= 1 && k <= e, || format!("{f}: top_k = {k} must be in 1..={e}"))?;
    ensure(g >= 1 && e % g == 0, || format!("{f}: n_group = {g} must divide n_experts = {e}"))?;
    if g > 1 {
        ensure(tg >= 1 && tg <= g, || format!("{f}: topk_group = {tg} must be in 1..={g}"))?;
        ensure(k <= tg * (e / g), || format!("{f}: top_k = {k} exceeds the experts of {tg} groups of {}", e / g))?;
    }
    ensure(cfg.routed_scaling_factor.is_finite(), || format!("{f}: routed_scaling_factor must be finite"))?;
    ensure(cfg.capacity_factor.is_none_or(|cf| cf.is_finite() && cf > 0.0), || {
        format!("{f}: capacity_factor must be positive")
    })
}

/// moe_route: logits [n, E], bias [E] for a valid config → n.
pub fn moe_route(logits: &[usize], bias: &[usize], cfg: &RouterConfig) -> CudaResult<usize> {
    router_config(cfg)?;
    let e = cfg.n_experts;
    ensure(logits.len() == 2 && logits[1] == e, || format!("moe_route: logits {logits:?} must be [n, E = {e}]"))?;
    ensure(bias == [e], || format!("moe_route: bias {bias:?} must be [E = {e}]"))?;
    Ok(logits[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::moe::ScoreFunc;

    #[test]
    fn gemm_shapes() {
        assert_eq!(matmul(&[3, 8], &[8, 16]).unwrap(), (3, 16, 8));
        assert!(matmul(&[3, 8], &[4, 16]).is_err());
        assert!(matmul(&[3, 8, 1], &[8, 16]).is_err());
        assert_eq!(linear(&[2, 5, 8], &[16, 8]).unwrap(), (10, 16, 8));
        assert!(linear(&[2, 5, 8], &[8, 16]).unwrap_err().0.contains("must end in k = 16"));
        assert!(linear(&[], &[16, 8]).is_err());
        assert_eq!(linear(&[3, 0], &[16, 0]).unwrap(), (3, 16, 0));
        assert_eq!(linear_fused("linear_residual", &[2, 5, 8], &[16, 8], ("resid", &[2, 5, 16])).unwrap(), (10, 16, 8));
        let e = linear_fused("linear_swiglu", &[2, 5, 8], &[16, 8], ("gate", &[10, 16])).unwrap_err();
        assert!(e.0.contains("linear_swiglu: gate [10, 16] must have the output's shape [2, 5, 16]"), "{e}");
        let e = linear_fused("linear_swiglu", &[2, 5, 8], &[8, 16], ("gate", &[2, 5, 8])).unwrap_err();
        assert!(e.0.starts_with("linear_swiglu: x"), "{e}");
    }

    #[test]
    fn elementwise_shapes() {
        assert_eq!(rmsnorm(&[4, 64], 64).unwrap(), 4);
        assert_eq!(rmsnorm(&[4, 64], 32).unwrap(), 8);
        assert!(rmsnorm(&[4, 64], 0).is_err());
        assert!(rmsnorm(&[4, 64], 48).is_err());
        assert!(swiglu(&[2, 8], &[2, 8]).is_ok());
        assert!(swiglu(&[2, 8], &[8, 2]).is_err());
        assert_eq!(rope(&[2, 10, 4, 64], 64, 16).unwrap(), (2, 10, 4));
        assert!(rope(&[2, 10, 4, 32], 64, 16).is_err());
        assert!(rope(&[2, 17, 4, 64], 64, 16).unwrap_err().0.contains("exceeds"));
        assert!(rope(&[20, 4, 64], 64, 16).is_err());
        assert_eq!(rope_qk(&[2, 10, 4, 64], &[2, 10, 1, 64], 64, 16).unwrap(), (2, 10, 4, 1));
        assert!(rope_qk(&[2, 10, 4, 64], &[1, 10, 1, 64], 64, 16).is_err());
        assert_eq!(rope_qknorm(&[2, 10, 4, 64], &[2, 10, 1, 64], 64, 16).unwrap(), (2, 10, 4, 1));
        assert!(rope_qknorm(&[2, 10, 4, 64], &[2, 9, 1, 64], 64, 16).is_err());
        assert!(rope_qknorm(&[2, 10, 4, 64], &[2, 10, 1, 32], 64, 16).is_err());
        assert!(rope_qknorm(&[2, 17, 4, 64], &[2, 17, 1, 64], 64, 16).unwrap_err().0.contains("exceeds"));
        assert!(rope_qknorm(&[2, 10, 256], &[2, 10, 1, 64], 64, 16).is_err());
    }

    #[test]
    fn loss_and_embedding_arguments() {
        assert_eq!(cross_entropy(&[2, 3, 16], &[0, 15, -1, 2, 3, -100], 30.0).unwrap(), (6, 16));
        assert!(cross_entropy(&[2, 3, 16], &[0; 5], 0.0).is_err());
        assert!(cross_entropy(&[2, 16], &[0, 16], 0.0).unwrap_err().0.contains("target 16"));
        assert!(cross_entropy(&[2, 16], &[0, 1], -1.0).is_err());
        assert!(cross_entropy(&[2, 16], &[0, 1], f32::NAN).is_err());
        assert!(cross_entropy(&[2, 0], &[], 0.0).is_err());
        assert!(cross_entropy(&[], &[], 0.0).is_err());
        assert_eq!(embedding(&[10, 8], &[0, 9, 3]).unwrap(), (10, 8));
        assert!(embedding(&[10, 8], &[10]).unwrap_err().0.contains("id 10"));
        assert!(embedding(&[80], &[1]).is_err());
    }

    #[test]
    fn attention_shapes() {
        let d = attention("a", &[2, 9, 4, 64], &[2, 9, 2, 64], &[2, 9, 2, 64]).unwrap();
        assert_eq!(d, AttnDims { b: 2, t: 9, h: 4, h_kv: 2, d: 64 });
        assert!(attention("a", &[2, 9, 4, 64], &[2, 9, 3, 64], &[2, 9, 3, 64]).is_err());
        assert!(attention("a", &[2, 9, 4, 64], &[2, 9, 0, 64], &[2, 9, 0, 64]).is_err());
        assert!(attention("a", &[2, 9, 4, 64], &[2, 9, 2, 64], &[2, 9, 1, 64]).is_err());
        assert!(attention("a", &[2, 9, 4, 64], &[2, 8, 2, 64], &[2, 8, 2, 64]).is_err());
        assert!(attention("a", &[2, 9, 4, 64], &[2, 9, 2, 32], &[2, 9, 2, 32]).is_err());
        assert!(attention("a", &[9, 4, 64], &[9, 2, 64], &[9, 2, 64]).is_err());
        assert_eq!(window_attention(&[1, 5, 2, 64], &[1, 5, 1, 64], &[1, 5, 1, 64], 3, 1).unwrap().window, 3);
        assert!(window_attention(&[1, 5, 2, 64], &[1, 5, 1, 64], &[1, 5, 1, 64], 0, 1).is_err());
    }

    #[test]
    fn dsa_arguments() {
        let dims = dsa_topk(&[2, 9, 4, 32], &[2, 9, 32], &[2, 9, 4], 3, 2).unwrap();
        assert_eq!((dims.kmax(), dims.n_index_heads, dims.index_dim), (5, 4, 32));
        assert!(dsa_topk(&[2, 9, 4, 32], &[2, 9, 16], &[2, 9, 4], 3, 2).is_err());
        assert!(dsa_topk(&[2, 9, 4, 32], &[2, 9, 32], &[2, 9, 3], 3, 2).is_err());
        assert!(dsa_topk(&[2, 9, 4, 32], &[2, 9, 32], &[2, 9, 4], 0, 0).is_err());
        assert!(dsa_topk(&[2, 9, 0, 32], &[2, 9, 32], &[2, 9, 0], 1, 0).is_err());
        let (q, kv) = ([2, 9, 4, 64], [2, 9, 2, 64]);
        assert_eq!(sparse_attention(&q, &kv, &kv, [2, 9, 5], 3, 2).unwrap().kmax(), 5);
        assert!(sparse_attention(&q, &kv, &kv, [2, 9, 4], 3, 2).is_err());
        assert!(sparse_attention(&q, &kv, &kv, [1, 9, 5], 3, 2).is_err());
        assert_eq!(sparse_attention(&q, &kv, &kv, [2, 9, 9], 100, 2).unwrap().kmax(), 9);
        // rows: non-empty and causal
        let shape = [1, 3, 2];
        assert!(selection_rows(shape, &[0, PAD, 0, 1, 2, 0]).is_ok());
        assert!(selection_rows(shape, &[PAD, PAD, 0, 1, 2, 0]).unwrap_err().0.contains("no key"));
        assert!(selection_rows(shape, &[1, PAD, 0, 1, 2, 0]).unwrap_err().0.contains("after its query 0"));
        assert!(selection_rows(shape, &[0, PAD, 0, 1, 2]).is_err());
    }

    #[test]
    fn router_arguments() {
        let cfg = RouterConfig {
            n_experts: 8,
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            score_func: ScoreFunc::Sigmoid,
            capacity_factor: Some(1.25),
        };
        assert_eq!(moe_route(&[5, 8], &[8], &cfg).unwrap(), 5);
        assert!(moe_route(&[5, 7], &[8], &cfg).is_err());
        assert!(moe_route(&[5, 8], &[7], &cfg).is_err());
        assert!(moe_route(&[40], &[8], &cfg).is_err());
        for bad in [
            RouterConfig { top_k: 0, ..cfg },
            RouterConfig { top_k: 9, ..cfg },
            RouterConfig { n_group: 3, ..cfg },
            RouterConfig { topk_group: 3, ..cfg },
            RouterConfig { top_k: 5, ..cfg },
            RouterConfig { routed_scaling_factor: f32::INFINITY, ..cfg },
            RouterConfig { capacity_factor: Some(0.0), ..cfg },
        ] {
            assert!(router_config(&bad).is_err(), "{bad:?}");
            // the same configs make the CPU's validate panic: the two must agree
            assert!(std::panic::catch_unwind(|| bad.validate()).is_err(), "{bad:?}");
        }
        cfg.validate();
    }
}
