//! GEMM: C[m,n] = A·B (or C += A·B), with either operand stored transposed.
//!
//! Backed by the `gemm` crate (AVX-512 kernels with the `x86-v4` feature,
//! picked at run time). Parallel over output tiles; the reduction over k is
//! sequential within a tile, so results do not depend on scheduling.
//! Called from inside a rayon task, a GEMM runs on that task's thread.

use gemm::Parallelism;

/// How an operand is stored: `N` as written ([m,k] for A, [k,n] for B), `T` transposed ([k,m] for A, [n,k] for B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    N,
    T,
}

/// C[m,n] = A·B (accumulate = false) or C += A·B (accumulate = true).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    c: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "gemm: A must hold m*k = {m}*{k} values");
    assert_eq!(b.len(), k * n, "gemm: B must hold k*n = {k}*{n} values");
    assert_eq!(c.len(), m * n, "gemm: C must hold m*n = {m}*{n} values");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // a linear layer on a few rows at decode shapes (a verify pass, a short prefill): the gemm
    // crate would pack the weights, which costs several times one row's product (`gemm_rows`).
    // Large weights: read each weight row once for all rows; smaller ones: one row at a time.
    if la == Layout::N && lb == Layout::T && !accumulate && (2..=super::gemm_rows::MAX_ROWS).contains(&m) {
        if n * k >= 1 << 20 {
            return super::gemm_rows::gemm_few_rows(m, n, k, a, b, c);
        }
        if n * k >= 1 << 16 {
            for (x, y) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)) {
                gemm(1, n, k, x, la, b, lb, y, false);
            }
            return;
        }
    }
    // (row stride, column stride) of each operand as the logical matrix.
    let (a_rs, a_cs) = match la {
        Layout::N => (k as isize, 1),
        Layout::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match lb {
        Layout::N => (n as isize, 1),
        Layout::T => (1, k as isize),
    };
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    // Small products, and products requested from inside a rayon task (which is
    // already one of several parallel jobs), run on the calling thread.
    let nested = rayon::current_thread_index().is_some();
    let par = if flops < 4.0e6 || nested { Parallelism::None } else { Parallelism::Rayon(0) };
    // SAFETY: the lengths were checked above and the strides address only inside each slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A fused epilogue of [`gemm_fused`], applied to each value v of the product x·wᵀ (the twin of
/// the epilogues of `cuda/gemm.cu`, `cuda::gemm::Epilogue`). Every slice holds m·n values laid
/// out like C.
pub enum Epilogue<'a> {
    /// out = v + resid: the bias-free residual add after an output projection.
    Residual { resid: &'a [f32], out: &'a mut [f32] },
    /// act = silu(gate) ⊙ v (SwiGLU with the product as its "up" half); `up`, when given, also
    /// receives v.
    SwiGlu { gate: &'a [f32], act: &'a mut [f32], up: Option<&'a mut [f32]> },
}

/// The linear layer x[m,k]·w[n,k]ᵀ finished by a fused [`Epilogue`]. The reference for the CUDA
/// kernels' epilogues: the product, then the same element-wise math as `elementwise::add` and
/// `swiglu::swiglu_forward`, so the result equals the unfused ops.
pub fn gemm_fused(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], epi: Epilogue) {
    let (a, la, b, lb) = (x, Layout::N, w, Layout::T);
    match epi {
        Epilogue::Residual { resid, out } => {
            assert_eq!(resid.len(), m * n, "gemm_fused: resid must hold m*n = {m}*{n} values");
            gemm(m, n, k, a, la, b, lb, out, false);
            super::elementwise::accumulate(out, resid); // v + resid == resid + v in f32
        }
        Epilogue::SwiGlu { gate, act, up } => {
            let mut scratch = Vec::new();
            let up = match up {
                Some(up) => up,
                None => {
                    scratch.resize(m * n, 0.0);
                    &mut scratch[..]
                }
            };
            gemm(m, n, k, a, la, b, lb, up, false);
            super::swiglu::swiglu_forward(gate, up, act);
        }
    }
}

/// SwiGLU's backward after the GEMM that produces its incoming gradient: da = dy[m,k]·w[k,n]
/// (both as stored), then (dgate, dup) = `swiglu::swiglu_backward(gate, up, da)`. The twin of
/// the CUDA `*_swiglu_bwd` kernels, which never store da.
#[allow(clippy::too_many_arguments)]
pub fn gemm_swiglu_backward(
    m: usize,
    n: usize,
    k: usize,
    dy: &[f32],
    w: &[f32],
    (gate, up): (&[f32], &[f32]),
    (dgate, dup): (&mut [f32], &mut [f32]),
) {
    let mut da = vec![0.0; m * n];
    gemm(m, n, k, dy, Layout::N, w, Layout::N, &mut da, false);
    super::swiglu::swiglu_backward(gate, up, &da, dgate, dup);
}

/// A read-only strided matrix for [`gemm_strided`]: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// Element `(i, j)` at `data[i * rs + j * cs]`.
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Strided { data, rs, cs }
    }

    /// Rows of `data` starting at `offset`, `stride` elements apart (unit column stride).
    pub fn rows(data: &'a [f32], offset: usize, stride: usize) -> Self {
        Strided { data: &data[offset..], rs: stride, cs: 1 }
    }

    /// The transposed view (strides swapped; no data moves).
    pub fn t(self) -> Self {
        Strided { rs: self.cs, cs: self.rs, ..self }
    }

    /// Whether a `[rows, cols]` matrix (both > 0) lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `C = A·B` (`accumulate = false`) or `C += A·B` (`accumulate = true`) for strided views
/// `A: [m, k]` and `B: [k, n]`, and `C: [m, n]` row-major with row stride `ldc >= n` (elements
/// between the rows are left untouched). `m = 0` or `n = 0` does nothing; `k = 0` zeroes `C`
/// (or leaves it, when accumulating).
///
/// Always single-threaded, like [`gemm`] inside a rayon task: it is meant to run inside such
/// tasks, and its summation order then depends only on the shapes (results are bitwise
/// reproducible for any thread count).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(n <= ldc, "gemm_strided: ldc ({ldc}) must be >= n ({n})");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n <= c.len(), "gemm_strided: C out of bounds");
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    assert!(a.fits(m, k), "gemm_strided: A view out of bounds");
    assert!(b.fits(k, n), "gemm_strided: B view out of bounds");
    // SAFETY: the checks above keep every address inside its slice, and `c` (a `&mut`) cannot
    // alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The test and benchmark oracle: a plain triple loop in f64 (slow; small sizes only).
#[allow(clippy::too_many_arguments)]
pub fn gemm_naive(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    c: &mut [f32],
    accumulate: bool,
) {
    let at = |i: usize, p: usize| {
        if la == Layout::N {
            a[i * k + p]
        } else {
            a[p * m + i]
        }
    };
    let bt = |p: usize, j: usize| {
        if lb == Layout::N {
            b[p * n + j]
        } else {
            b[j * k + p]
        }
    };
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += at(i, p) as f64 * bt(p, j) as f64;
            }
            let base = if accumulate { c[i * n + j] } else { 0.0 };
            c[i * n + j] = base + s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn fused_epilogues_equal_the_unfused_ops() {
        let mut rng = Rng::new(5);
        let (m, n, k) = (37, 24, 40);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
        let (a, b, r, g) = (rand(m * k), rand(n * k), rand(m * n), rand(m * n));
        let mut p = vec![0.0; m * n];
        gemm(m, n, k, &a, Layout::N, &b, Layout::T, &mut p, false);

        let mut out = vec![0.0; m * n];
        gemm_fused(m, n, k, &a, &b, Epilogue::Residual { resid: &r, out: &mut out });
        let mut want = vec![0.0; m * n];
        super::super::elementwise::add(&r, &p, &mut want);
        assert_eq!(out, want, "residual epilogue: bitwise the product then the add");

        let mut want = vec![0.0; m * n];
        super::super::swiglu::swiglu_forward(&g, &p, &mut want);
        let (mut act, mut up) = (vec![0.0; m * n], vec![0.0; m * n]);
        let epi = Epilogue::SwiGlu { gate: &g, act: &mut act, up: Some(&mut up) };
        gemm_fused(m, n, k, &a, &b, epi);
        assert_eq!((&act, &up), (&want, &p), "SwiGLU epilogue: bitwise swiglu(gate, product)");
        let mut act2 = vec![0.0; m * n];
        gemm_fused(m, n, k, &a, &b, Epilogue::SwiGlu { gate: &g, act: &mut act2, up: None });
        assert_eq!(act2, want, "SwiGLU epilogue without the up output");

        // backward: da = dy[m,n]·w[n,k] (NN), then the SwiGLU backward
        let (dy, wd, u) = (rand(m * n), rand(n * k), rand(m * k));
        let g2 = rand(m * k);
        let mut da = vec![0.0; m * k];
        gemm(m, k, n, &dy, Layout::N, &wd, Layout::N, &mut da, false);
        let (mut want_dg, mut want_du) = (vec![0.0; m * k], vec![0.0; m * k]);
        super::super::swiglu::swiglu_backward(&g2, &u, &da, &mut want_dg, &mut want_du);
        let (mut dg, mut du) = (vec![0.0; m * k], vec![0.0; m * k]);
        gemm_swiglu_backward(m, k, n, &dy, &wd, (&g2, &u), (&mut dg, &mut du));
        assert_eq!((dg, du), (want_dg, want_du), "SwiGLU backward: bitwise the product then swiglu_backward");
    }

    #[test]
    fn matches_naive_for_all_layouts() {
        let mut rng = Rng::new(3);
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (33, 65, 17), (128, 96, 200)] {
            for la in [Layout::N, Layout::T] {
                for lb in [Layout::N, Layout::T] {
                    for acc in [false, true] {
                        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                        let c0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
                        let (mut c1, mut c2) = (c0.clone(), c0.clone());
                        gemm(m, n, k, &a, la, &b, lb, &mut c1, acc);
                        gemm_naive(m, n, k, &a, la, &b, lb, &mut c2, acc);
                        // f32 accumulation of k products of unit normals: error ~ sqrt(k)·2^-24·|terms|.
                        let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                        for (x, y) in c1.iter().zip(&c2) {
                            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{m}x{n}x{k} {la:?}{lb:?}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }
}
