//! Test-only verbatim copy of the pre-`flash` `cpu/blocks.rs` (`super::math` made absolute), so
//! that the legacy kernels share nothing with the live ones but GEMM and `math`.
//!
//! Building blocks shared by the blocked CPU kernels ([`super::attention`],
//! [`super::window_attention`], [`super::moe`]): AVX2 dispatch, a per-thread scratch buffer,
//! disjoint-range output writes from rayon tasks, and the exact block softmax (forward and
//! gradient) on transposed score blocks.

use super::attention::{BLOCK_K, BLOCK_Q};
use crate::backend::cpu::math;
use std::cell::Cell;
use std::f32::consts::{LN_2, LOG2_E};
use std::marker::PhantomData;

/// Runs `f` compiled for AVX2 where the CPU has it (the element-wise loops inlined into it then
/// vectorise 8 wide instead of 4). Those loops contain no contractible or reassociable operation,
/// so both builds give bitwise-identical results (checked by the kernels' tests).
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { run(f) };
    }
    f()
}

/// Per-thread scratch, reused across tasks and calls so that the large blocks of a task are not
/// allocated (and page-faulted in) each time. Its contents on entry are arbitrary.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local!(static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) });
    // Taken out while in use, so a nested call would just get a fresh buffer.
    let mut buf = SCRATCH.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.set(buf);
    r
}

/// An output tensor that parallel tasks write through at disjoint element ranges.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: it only hands out writes (`write`), whose callers guarantee that no two threads touch the
// same elements; the tensor itself stays mutably borrowed for `'a`.
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(x: &'a mut [f32]) -> Self {
        SharedOut { ptr: x.as_mut_ptr(), len: x.len(), _borrow: PhantomData }
    }

    /// Copies `src` to the elements `offset..offset + src.len()`.
    ///
    /// # Safety
    /// No other thread accesses these elements during the call.
    pub(crate) unsafe fn write(self, offset: usize, src: &[f32]) {
        assert!(offset <= self.len && src.len() <= self.len - offset, "SharedOut: write out of bounds");
        // SAFETY: in bounds (checked above); exclusive access is the caller's guarantee.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) };
    }

    /// Copies row `i` of `src` (rows of `width` elements, `src.len()` a multiple of `width`) to
    /// `offset + i * stride..`, through [`SharedOut::write`].
    ///
    /// # Safety
    /// No other thread accesses these elements during the call.
    pub(crate) unsafe fn write_rows(self, offset: usize, stride: usize, src: &[f32], width: usize) {
        for (i, row) in src.chunks_exact(width).enumerate() {
            // SAFETY: exclusive access to the rows is the caller's guarantee; `write` checks bounds.
            unsafe { self.write(offset + i * stride, row) };
        }
    }
}

/// The backward's `D_i = dO_i · O_i` (`D = rowsum(dO ∘ O)`) for the `tq <= BLOCK_Q` query rows
/// of a block: row `i` is `offset + i * stride..` (`d` elements) of `dout` and `out`. Entries
/// from `tq` on are 0.
pub(crate) fn row_dots(dout: &[f32], out: &[f32], offset: usize, stride: usize, d: usize, tq: usize) -> [f32; BLOCK_Q] {
    let mut delta = [0.0f32; BLOCK_Q];
    for (ii, di) in delta[..tq].iter_mut().enumerate() {
        let row = offset + ii * stride;
        *di = math::dot(&dout[row..][..d], &out[row..][..d]);
    }
    delta
}

/// Forward softmax on a transposed score block `st` (`[nk, tq]`, unscaled `Sᵀ`, one key per row,
/// `tq <= BLOCK_Q` queries per row): row `r` is visible to the queries `lo..hi` given by
/// `visible(r)`. Overwrites `st` with `Pᵀ = exp(S·scale − m)` (unnormalised, exact zeros where
/// masked) and returns the sums `l` of the rows of `P` and `lse = m + ln l`, `m` being the row
/// maximum of the visible `S·scale`. Denominators are summed per [`BLOCK_K`] rows of `Sᵀ`, then
/// over those tiles. Exponentials are taken base 2 (`exp(z) = 2^(z·log₂e)`, the factor folded
/// into the scale).
#[inline(always)]
pub(crate) fn softmax_t(
    st: &mut [f32],
    tq: usize,
    scale: f32,
    visible: impl Fn(usize) -> (usize, usize),
) -> ([f32; BLOCK_Q], [f32; BLOCK_Q]) {
    let c = scale * LOG2_E;
    let mut m = [f32::NEG_INFINITY; BLOCK_Q];
    for (r, row) in st.chunks_exact(tq).enumerate() {
        let (lo, hi) = visible(r);
        for (mi, &x) in m[lo..hi].iter_mut().zip(&row[lo..hi]) {
            *mi = if x > *mi { x } else { *mi };
        }
    }
    // Scaling is monotonic, so this is also the maximum of the scaled scores.
    m.iter_mut().for_each(|mi| *mi *= c);
    let mut l = [0.0f32; BLOCK_Q];
    for (kt, tile) in st.chunks_mut(BLOCK_K * tq).enumerate() {
        let mut part = [0.0f32; BLOCK_Q];
        for (r, row) in (kt * BLOCK_K..).zip(tile.chunks_exact_mut(tq)) {
            let (lo, hi) = visible(r);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            for ((x, &mi), pi) in row[lo..hi].iter_mut().zip(&m[lo..hi]).zip(&mut part[lo..hi]) {
                *x = math::exp2(*x * c - mi);
                *pi += *x;
            }
        }
        l.iter_mut().zip(part).for_each(|(li, pi)| *li += pi);
    }
    let mut lse = [0.0f32; BLOCK_Q];
    for ((lse_i, &mi), &li) in lse.iter_mut().zip(&m).zip(&l).take(tq) {
        *lse_i = mi * LN_2 + li.ln();
    }
    (l, lse)
}

/// Backward element-wise step on transposed blocks (`[nk, tq]`, visibility as in [`softmax_t`]):
/// `p` holds the unscaled `Sᵀ` and becomes `Pᵀ = exp(S·scale − lse)`, `ds` holds `dPᵀ` and
/// becomes `dSᵀ = P ∘ (dP − D) · scale` (both exact zeros where masked).
#[inline(always)]
pub(crate) fn grad_t(
    p: &mut [f32],
    ds: &mut [f32],
    tq: usize,
    scale: f32,
    lse: &[f32],
    delta: &[f32],
    visible: impl Fn(usize) -> (usize, usize),
) {
    let c = scale * LOG2_E;
    let mut lse2 = [0.0f32; BLOCK_Q];
    lse2.iter_mut().zip(lse).for_each(|(l2, &l)| *l2 = l * LOG2_E);
    for (r, (p_row, ds_row)) in p.chunks_exact_mut(tq).zip(ds.chunks_exact_mut(tq)).enumerate() {
        let (lo, hi) = visible(r);
        for row in [&mut *p_row, &mut *ds_row] {
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
        }
        let rows = p_row[lo..hi].iter_mut().zip(&mut ds_row[lo..hi]);
        for ((x, y), (&lse_i, &delta_i)) in rows.zip(lse2[lo..hi].iter().zip(&delta[lo..hi])) {
            *x = math::exp2(*x * c - lse_i);
            *y = *x * (*y - delta_i) * scale;
        }
    }
}
