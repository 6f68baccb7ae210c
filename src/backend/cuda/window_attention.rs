//! Launch code of `cuda/window_attention.cu` (twin: `cpu::window_attention`): sliding-window
//! causal flash attention with global tokens, grouped-query, scale 1/√d_qk, head shapes
//! (d_qk, d_v) ∈ [`FLASH_SHAPES`] (the `_dv` functions take d_v; the others are d_v = d_qk).
//! Query `i` sees the keys `{s : i − W < s ≤ i} ∪ {s < G, s ≤ i}`; layouts and the lse
//! convention are those of [`super::attention`].
//!
//! The kernels are the dense ones of `cuda/flash.cuh` with a window mask, and they skip every
//! key tile no query of a tile can see: [`forward_key_tiles`] and [`backward_query_tiles`] list,
//! in Rust, exactly the tiles the kernels visit (they mirror `WindowMask` in the .cu file), so
//! the unit tests below can check on any machine that the visited work is `O(T·(W + G))` and
//! covers every visible (query, key) pair.

use super::abi::{NsAttnParams, NsWindowAttnParams};
use super::attention::{bwd_smem, flash_shape};
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
pub use crate::backend::cpu::window_attention::WindowDims;
use half::bf16;
use std::ops::Range;

/// Query rows per forward block, keys per tile, keys per backward block (`KT` in flash.cuh).
pub const TILE: usize = 64;

/// Query rows per tile of the backward's loop (`BQ` of the kernel for head shape (d, dv)).
pub fn backward_query_tile(d: usize, dv: usize) -> usize {
    flash_shape("window_attention", d, dv).map_or(16, |(_, bq)| bq)
}

/// (W, G) as the kernels get them: clamped to `t`, which changes no query's keys.
fn clamped(dims: &WindowDims) -> (usize, usize) {
    (dims.window.min(dims.t), dims.n_global.min(dims.t))
}

/// `WindowMask::segments` of window_attention.cu: the key ranges query rows `q0..q1` read,
/// the global prefix and the window, merged when they touch (= `cpu::window_attention::key_segments`).
fn segments(w: usize, g: usize, q0: usize, q1: usize) -> [Range<usize>; 2] {
    let lo = (q0 + 1).saturating_sub(w);
    let gl = g.min(q1);
    if gl >= lo {
        [0..q1, q1..q1]
    } else {
        [0..gl, lo..q1]
    }
}

/// The key tiles the forward kernel reads for query tile `qt` (rows `qt·64..min(qt·64 + 64, t)`):
/// each of [`segments`]'s ranges in tiles of [`TILE`] keys from its start, the last one cut at
/// the range's end (the kernel loads it whole and masks the rest). Mirrors the tile loop of
/// `flash_fwd_body`.
pub fn forward_key_tiles(dims: &WindowDims, qt: usize) -> Vec<Range<usize>> {
    let (w, g) = clamped(dims);
    let q0 = qt * TILE;
    segments(w, g, q0, (q0 + TILE).min(dims.t))
        .into_iter()
        .flat_map(|seg| seg.clone().step_by(TILE).map(move |ks| ks..(ks + TILE).min(seg.end)))
        .collect()
}

/// The query tiles the backward kernel visits for key tile `kt` (keys `kt·64..`, values as wide
/// as keys; [`backward_query_tiles_dv`] for others): tiles of [`backward_query_tile`] rows from the one holding key `kt·64` up to `WindowMask::query_end`
/// (the end of the sequence for a tile holding a global key, else `kt·64 + 64 + W − 1`, past
/// the last query any of its keys reaches). Mirrors the query loop of `flash_bwd_body`.
pub fn backward_query_tiles(dims: &WindowDims, kt: usize) -> Vec<Range<usize>> {
    backward_query_tiles_dv(dims, dims.d, kt)
}

/// [`backward_query_tiles`] for values `dv` wide (the tile BQ depends on the head shape).
pub fn backward_query_tiles_dv(dims: &WindowDims, dv: usize, kt: usize) -> Vec<Range<usize>> {
    let (w, g) = clamped(dims);
    let (t, k0, bq) = (dims.t, kt * TILE, backward_query_tile(dims.d, dv));
    let end = if k0 < g { t } else { t.min(k0 + TILE + w - 1) };
    (k0 / bq * bq..end).step_by(bq).map(|q0| q0..(q0 + bq).min(t)).collect()
}

fn params(dims: &WindowDims, dv: usize) -> CudaResult<(NsWindowAttnParams, usize, usize)> {
    let (shape, bq) = flash_shape("window_attention", dims.d, dv)?;
    check(dims.h_kv > 0 && dims.h % dims.h_kv == 0, || {
        format!("window_attention: h must be a multiple of h_kv ({dims:?})")
    })?;
    check(dims.window >= 1, || format!("window_attention: window must be >= 1 ({dims:?})"))?;
    let (w, g) = clamped(dims);
    let attn = NsAttnParams {
        b: int(dims.b, "b")?,
        t: int(dims.t, "t")?,
        h: int(dims.h, "h")?,
        h_kv: int(dims.h_kv, "h_kv")?,
        d: int(dims.d, "d")?,
        dv: int(dv, "dv")?,
        scale: 1.0 / (dims.d as f32).sqrt(),
        ..Default::default()
    };
    Ok((NsWindowAttnParams { attn, window: int(w, "window")?, n_global: int(g, "n_global")? }, shape, bq))
}

/// out (bf16 [b,t,h,d]) and lse (f32 [b,h,t], natural log of the scaled scores); d_v = d.
pub fn window_attention_forward(
    be: &CudaBackend,
    dims: &WindowDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    window_attention_forward_dv(be, dims, dims.d, q, k, v, out, lse)
}

/// [`window_attention_forward`] with values `dv` wide (v [b,t,h_kv,dv], out [b,t,h,dv]).
#[allow(clippy::too_many_arguments)]
pub fn window_attention_forward_dv(
    be: &CudaBackend,
    dims: &WindowDims,
    dv: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (mut p, shape, _) = params(dims, dv)?;
    let (ol, vl) = (dims.q_len() / dims.d * dv, dims.kv_len() / dims.d * dv);
    check(q.len() == dims.q_len() && out.len() == ol, || {
        "window_attention: q/out must be [b,t,h,d]/[b,t,h,dv]".into()
    })?;
    check(k.len() == dims.kv_len() && v.len() == vl, || {
        "window_attention: k/v must be [b,t,h_kv,d]/[b,t,h_kv,dv]".into()
    })?;
    check(lse.len() == dims.lse_len(), || "window_attention: lse must be [b,h,t]".into())?;
    let a = &mut p.attn;
    (a.q, a.k, a.v, a.out, a.lse) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    let name = ["wattn_fwd_d64", "wattn_fwd_d128", "wattn_fwd_q96v64", "wattn_fwd_q192v128"][shape];
    let grid = ((dims.t as u32).div_ceil(TILE as u32), (dims.b * dims.h) as u32, 1);
    be.launch("window_attention", name, grid, 128, 0, &p)
}

/// Gradients in f32 (dq [b,t,h,d], dk and dv [b,t,h_kv,d]; overwritten, not accumulated),
/// from q, k, v, out, lse and dout. Cast them to bf16 with `optim::cast_f32_bf16` when needed.
#[allow(clippy::too_many_arguments)]
pub fn window_attention_backward(
    be: &CudaBackend,
    dims: &WindowDims,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    grads: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    window_attention_backward_dv(be, dims, dims.d, q, k, v, out, lse, dout, grads)
}

/// [`window_attention_backward`] with values `dv` wide (v, dv [b,t,h_kv,dv]; out, dout [b,t,h,dv]).
#[allow(clippy::too_many_arguments)]
pub fn window_attention_backward_dv(
    be: &CudaBackend,
    dims: &WindowDims,
    dv_width: usize,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    v: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<bf16>,
    [dq, dk, dv]: [&DeviceBuffer<f32>; 3],
) -> CudaResult<()> {
    let (mut p, shape, bq) = params(dims, dv_width)?;
    let (ql, kl) = (dims.q_len(), dims.kv_len());
    let (ol, vl) = (ql / dims.d * dv_width, kl / dims.d * dv_width);
    check(q.len() == ql && dq.len() == ql && out.len() == ol && dout.len() == ol, || {
        "window_attention_backward: q/dq must be [b,t,h,d], out/dout [b,t,h,dv]".into()
    })?;
    check(k.len() == kl && dk.len() == kl && v.len() == vl && dv.len() == vl, || {
        "window_attention_backward: k/dk must be [b,t,h_kv,d], v/dv [b,t,h_kv,dv]".into()
    })?;
    check(lse.len() == dims.lse_len(), || "window_attention_backward: lse must be [b,h,t]".into())?;
    if dims.b * dims.t * dims.h == 0 {
        return Ok(());
    }
    let delta = DeviceBuffer::<f32>::uninit(be, dims.lse_len())?;
    // dK and dV rows are written once by their key tile's block; dQ is accumulated with atomics.
    dq.fill_zero()?;
    let a = &mut p.attn;
    (a.q, a.k, a.v, a.out, a.lse, a.dout, a.delta) =
        (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr(), dout.ptr(), delta.ptr());
    (a.dq_acc, a.dk_acc, a.dv_acc) = (dq.ptr(), dk.ptr(), dv.ptr());
    let rows = dims.b * dims.t * dims.h;
    be.launch("window_attention", "wattn_bwd_delta", (rows.div_ceil(8) as u32, 1, 1), 256, 0, &p)?;
    let name = ["wattn_bwd_d64", "wattn_bwd_d128", "wattn_bwd_q96v64", "wattn_bwd_q192v128"][shape];
    let grid = ((dims.t as u32).div_ceil(TILE as u32), (dims.b * dims.h_kv) as u32, 1);
    be.launch("window_attention", name, grid, 128, bwd_smem(dims.d, dv_width, bq), &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::window_attention::key_segments;
    use crate::backend::cuda::attention::FLASH_SHAPES;

    fn dims(t: usize, d: usize, window: usize, n_global: usize) -> WindowDims {
        WindowDims { b: 1, t, h: 2, h_kv: 1, d, window, n_global }
    }

    /// Query `i` sees key `s` (the definition, unclamped).
    fn sees(dims: &WindowDims, i: usize, s: usize) -> bool {
        s <= i && (i - s < dims.window || s < dims.n_global)
    }

    const CASES: [(usize, usize, usize); 12] = [
        // (t, W, G)
        (1, 1, 0),
        (64, 64, 0),
        (65, 1, 0),
        (200, 48, 0),
        (200, 100, 70),
        (257, 1, 3),
        (300, 64, 64),
        (130, 1000, 0),
        (130, 5, 1000),
        (513, 130, 65),
        (700, 200, 129),
        (333, 17, 1),
    ];

    #[test]
    fn forward_tiles_are_exactly_the_key_segments() {
        for (t, w, g) in CASES {
            let dims = dims(t, 64, w, g);
            for qt in 0..t.div_ceil(TILE) {
                let (i0, i1) = (qt * TILE, (qt * TILE + TILE).min(t));
                let tiles = forward_key_tiles(&dims, qt);
                let want: Vec<usize> = key_segments(&dims, i0, i1).into_iter().flatten().collect();
                let got: Vec<usize> = tiles.iter().cloned().flatten().collect();
                assert_eq!(got, want, "{dims:?} query tile {qt}: visited keys");
                assert!(tiles.iter().all(|r| !r.is_empty() && r.len() <= TILE), "{dims:?}: {tiles:?}");
                // every key a row of the tile sees is visited (key_segments' own promise, rechecked)
                for i in i0..i1 {
                    for s in (0..t).filter(|&s| sees(&dims, i, s)) {
                        assert!(tiles.iter().any(|r| r.contains(&s)), "{dims:?}: query {i} key {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn forward_work_is_constant_in_t() {
        for (w, g) in [(1usize, 0usize), (48, 0), (100, 70), (64, 64), (300, 5), (17, 200)] {
            // at most ⌈G/64⌉ tiles of the prefix and ⌈(W + 63)/64⌉ of the window
            let bound = g.div_ceil(TILE) + (w + TILE - 1).div_ceil(TILE);
            let worst = |t: usize| {
                let dims = dims(t, 64, w, g);
                (0..t.div_ceil(TILE)).map(|qt| forward_key_tiles(&dims, qt).len()).max().unwrap()
            };
            let (short, long) = (worst(2048), worst(16384));
            assert_eq!(short, long, "W {w} G {g}: tiles per query tile grow with T");
            assert!(long <= bound, "W {w} G {g}: {long} tiles > {bound}");
        }
    }

    #[test]
    fn backward_tiles_cover_every_query_that_sees_the_keys() {
        for (d, dv) in FLASH_SHAPES {
            let bq = backward_query_tile(d, dv);
            for (t, w, g) in CASES {
                let dims = dims(t, d, w, g);
                for kt in 0..t.div_ceil(TILE) {
                    let tiles = backward_query_tiles_dv(&dims, dv, kt);
                    let keys = kt * TILE..(kt * TILE + TILE).min(t);
                    for i in 0..t {
                        let needed = keys.clone().any(|s| sees(&dims, i, s));
                        let visited = tiles.iter().any(|r| r.contains(&i));
                        assert!(!needed || visited, "{dims:?} key tile {kt}: query {i} not visited");
                    }
                    // contiguous whole tiles of bq rows, starting at the one holding the first key
                    assert!(tiles.iter().all(|r| r.start % bq == 0 && r.start < r.end && r.end <= t));
                    assert!(tiles.windows(2).all(|p| p[0].end == p[1].start));
                    assert_eq!(tiles.first().map(|r| r.start), Some(kt * TILE / bq * bq));
                    // a window-only key tile visits the queries at most W + 63 past its start
                    if kt * TILE >= g {
                        assert!(tiles.len() <= (TILE + w - 1).div_ceil(bq) + 1, "{dims:?} key tile {kt}");
                    }
                }
            }
        }
    }

    #[test]
    fn backward_work_is_o_t_times_w_plus_g() {
        // (key tile, query tile) pairs: a constant per window key tile, T / BQ per global one
        for (d, dv) in FLASH_SHAPES {
            let bq = backward_query_tile(d, dv);
            for (w, g) in [(1usize, 0usize), (48, 0), (100, 70), (17, 200)] {
                for t in [1000, 4096, 10_000] {
                    let dims = dims(t, d, w, g);
                    let n = t.div_ceil(TILE);
                    let pairs: usize = (0..n).map(|kt| backward_query_tiles_dv(&dims, dv, kt).len()).sum();
                    let bound = n * ((TILE + w - 1).div_ceil(bq) + 1) + g.div_ceil(TILE) * t.div_ceil(bq);
                    assert!(pairs <= bound, "{dims:?}: {pairs} pairs > {bound}");
                }
            }
        }
    }

    #[test]
    fn params_validate_and_clamp() {
        let p = params(&dims(100, 128, 1000, 7), 128).unwrap().0;
        assert_eq!((p.window, p.n_global, p.attn.t, p.attn.d, p.attn.dv), (100, 7, 100, 128, 128));
        let p = params(&dims(100, 64, 5, usize::MAX), 64).unwrap().0;
        assert_eq!((p.window, p.n_global), (5, 100));
        let (p, shape, bq) = params(&dims(100, 192, 5, 0), 128).unwrap();
        assert_eq!((p.attn.d, p.attn.dv, shape, bq), (192, 128, 3, 16));
        assert!(params(&dims(100, 32, 5, 0), 32).is_err());
        assert!(params(&dims(100, 96, 5, 0), 96).is_err());
        assert!(params(&dims(100, 64, 0, 0), 64).is_err());
        assert!(params(&WindowDims { b: 1, t: 8, h: 3, h_kv: 2, d: 64, window: 4, n_global: 0 }, 64).is_err());
    }
}
