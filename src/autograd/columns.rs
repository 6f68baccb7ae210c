//! Column ops on row-major `[rows, cols]` values: concatenation, slicing, repeating a head, and
//! reshaping. All are built on `Backend::copy_cols` (and `add`, `a_zeros`, `a_copy`), so they
//! run on every backend without kernels of their own. A value of shape `[n, h, d]` is `[n·h, d]`
//! to them: slicing or concatenating its last dim acts per head (how MLA splits and joins the
//! heads' no-position and rotary parts, `nn::mla`).

use super::ops::Op;
use super::{Tape, Var};
use crate::backend::Backend;
use anyhow::{ensure, Result};

/// (rows, last dim) of a shape: the product of the leading dims and the last one.
fn rows_cols(shape: &[usize], op: &str) -> (usize, usize) {
    let c = *shape.last().unwrap_or_else(|| panic!("{op}: a scalar has no columns"));
    (shape.iter().product::<usize>() / c.max(1), c)
}

impl<'p, B: Backend> Tape<'p, B> {
    /// [a | b] of a [n, ca] and b [n, cb] (rows side by side): [n, ca + cb]. Leading dims must
    /// agree (for [n, h, ·] values: per head).
    pub fn concat_cols(&mut self, a: Var, b: Var) -> Result<Var> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        let ((n, ca), (_, cb)) = (rows_cols(&sa, "concat_cols"), rows_cols(&sb, "concat_cols"));
        assert_eq!(sa[..sa.len() - 1], sb[..sb.len() - 1], "concat_cols: leading dims differ");
        let be = self.backend();
        let mut y = be.a_zeros(n * (ca + cb))?;
        be.copy_cols(self.get(a), (ca, 0), &mut y, (ca + cb, 0), n, ca)?;
        be.copy_cols(self.get(b), (cb, 0), &mut y, (ca + cb, ca), n, cb)?;
        let mut shape = sa;
        *shape.last_mut().expect("checked") = ca + cb;
        Ok(self.out(y, &shape, Op::ConcatCols { a, b, n, ca, cb }))
    }

    /// Columns `off..off + width` of x [n, c] (of each head for [n, h, c]): [n, width].
    /// Backward: the gradient scattered into zeros.
    pub fn slice_cols(&mut self, x: Var, off: usize, width: usize) -> Result<Var> {
        let mut shape = self.shape(x).to_vec();
        let (n, c) = rows_cols(&shape, "slice_cols");
        ensure!(width > 0 && off + width <= c, "slice_cols: columns {off}..{} of {c}", off + width);
        let be = self.backend();
        let mut y = be.a_zeros(n * width)?;
        be.copy_cols(self.get(x), (c, off), &mut y, (width, 0), n, width)?;
        *shape.last_mut().expect("checked") = width;
        Ok(self.out(y, &shape, Op::SliceCols { x, n, c, off, width }))
    }

    /// x [n, d] repeated for `h` heads: [n, h, d] (row i of every head is row i of x).
    /// Backward: the sum of the heads' gradients.
    pub fn repeat_heads(&mut self, x: Var, h: usize) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let (n, d) = rows_cols(&shape, "repeat_heads");
        ensure!(h > 0, "repeat_heads: no heads");
        let be = self.backend();
        let mut y = be.a_zeros(n * h * d)?;
        for j in 0..h {
            be.copy_cols(self.get(x), (d, 0), &mut y, (h * d, j * d), n, d)?;
        }
        let mut out_shape = shape[..shape.len() - 1].to_vec();
        out_shape.extend([h, d]);
        Ok(self.out(y, &out_shape, Op::RepeatHeads { x, n, d, h }))
    }

    /// The values of x with the shape `shape` (same number of elements; a copy).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let (from, to) = (self.shape(x).iter().product::<usize>(), shape.iter().product::<usize>());
        ensure!(from == to, "reshape: {:?} ({from} values) to {shape:?} ({to})", self.shape(x));
        let y = self.backend().a_copy(self.get(x))?;
        Ok(self.out(y, shape, Op::Reshape { x }))
    }
}

/// The input gradients of the column ops (`backward::backward` dispatches here).
pub(super) fn backward<B: Backend>(be: &B, op: Op<'_, B>, d: B::A) -> Result<Vec<(Var, B::A)>> {
    Ok(match op {
        Op::ConcatCols { a, b, n, ca, cb } => {
            let (mut da, mut db) = (be.a_zeros(n * ca)?, be.a_zeros(n * cb)?);
            be.copy_cols(&d, (ca + cb, 0), &mut da, (ca, 0), n, ca)?;
            be.copy_cols(&d, (ca + cb, ca), &mut db, (cb, 0), n, cb)?;
            vec![(a, da), (b, db)]
        }
        Op::SliceCols { x, n, c, off, width } => {
            let mut dx = be.a_zeros(n * c)?;
            be.copy_cols(&d, (width, 0), &mut dx, (c, off), n, width)?;
            vec![(x, dx)]
        }
        Op::RepeatHeads { x, n, d: dim, h } => {
            let mut dx = be.a_zeros(n * dim)?;
            be.copy_cols(&d, (h * dim, 0), &mut dx, (dim, 0), n, dim)?;
            if h > 1 {
                let mut head = be.a_zeros(n * dim)?;
                for j in 1..h {
                    be.copy_cols(&d, (h * dim, j * dim), &mut head, (dim, 0), n, dim)?;
                    be.add(&mut dx, &head)?;
                }
            }
            vec![(x, dx)]
        }
        Op::Reshape { x } => vec![(x, d)],
        _ => unreachable!("columns::backward: not a column op"),
    })
}
