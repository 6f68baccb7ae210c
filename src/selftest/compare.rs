//! The comparison of a GPU result with its CPU twin, and the tolerances of the error model
//! (the model itself is written down in the [`crate::selftest`] module doc).
//!
//! Every comparison checks a whole tensor twice:
//! - element-wise: |g − w| ≤ atol + rtol·|w| for every element; the **margin** is the worst
//!   ratio |g − w| / (atol + rtol·|w|) (≤ 1 passes; printed even when it passes, so a first run
//!   on a GPU shows how much room each tolerance leaves);
//! - as a relative error norm: ‖g − w‖₂ / ‖w‖₂ ≤ `norm` (a wrong tile, a scaled or zeroed
//!   tensor moves the norm by a large fraction even where it slips under the element test).

/// Unit roundoff of bf16 with round-to-nearest: 8 significant bits (7 stored), so one rounding
/// moves a value by at most 2⁻⁸ of itself (half the spacing 2⁻⁷ at 1).
pub const U_BF16: f32 = 1.0 / 256.0;
/// Unit roundoff of f32 (24 significant bits).
pub const U_F32: f32 = 1.0 / 16_777_216.0;

/// Tolerances of one comparison.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Absolute part of the element-wise bound.
    pub atol: f32,
    /// Relative part of the element-wise bound.
    pub rtol: f32,
    /// Bound on ‖g − w‖₂ / ‖w‖₂.
    pub norm: f32,
}

impl Tol {
    pub const fn new(atol: f32, rtol: f32, norm: f32) -> Tol {
        Tol { atol, rtol, norm }
    }

    /// Bit-for-bit (integer results, copies, repeated deterministic kernels).
    pub const EXACT: Tol = Tol::new(0.0, 0.0, 0.0);

    /// Element-wise kernels with a bf16 output: f32 math on O(1) values, rounded once (≤ u), the
    /// f32 math itself differing by a few ulps: the former tests' atol = rtol = 1e-2 element-wise,
    /// norm 2u (the rounding may land on the other neighbour when the f32 values differ).
    pub const fn bf16_once() -> Tol {
        Tol::new(1e-2, 1e-2, 2.0 * U_BF16)
    }

    /// f32 outputs of f32 math (loss, lse, optimizer states): element-wise as given, the norm at
    /// the relative part (the two sides differ by summation order and exp/rsqrt implementations).
    pub const fn f32_math(atol: f32, rtol: f32) -> Tol {
        Tol::new(atol, rtol, rtol)
    }

    /// GEMM of bf16 operands with an f32 output: the products are exact in f32, the sums differ
    /// by their order; the norm at k·2⁻²² (four times the classical γ_k = k·u_f32 bound, which
    /// already assumes every rounding adds up), at least 1e-5.
    pub fn gemm_f32(k: usize) -> Tol {
        Tol::new(1e-3 * (k as f32).sqrt(), 1e-3, (k as f32 * 4.0 * U_F32).max(1e-5))
    }

    /// GEMM with a bf16 output: the f32 sum rounded once (norm 2u).
    pub fn gemm_bf16(k: usize) -> Tol {
        Tol::new(1e-3 * (k as f32).sqrt(), 1e-2, 2.0 * U_BF16)
    }

    /// Fused GEMM epilogues (residual add, SwiGLU forward and backward): the f32 product goes
    /// through one or two more roundings (the activation of a rounded operand): norm 3u.
    pub fn epilogue(atol: f32) -> Tol {
        Tol::new(atol, 1e-2, 3.0 * U_BF16)
    }

    /// Flash attention (dense and window) outputs out, dq, dk, dv: P (forward) and P, dS
    /// (backward) are rounded to bf16 before their products, out is rounded once more. Each
    /// rounding is a relative error δ with |δ| ≤ u and RMS ≈ u/√3 (uniform over the mantissa),
    /// independent across the terms of a sum, so a sum Σ p_j δ_j v_j has relative RMS ≈ u/√3
    /// of a sum of the same terms: ≈ 2e-3 from P, ≈ 3e-3 with out's rounding. Bound: norm 3u
    /// (1.2e-2); element-wise atol 12u·RMS(w) + rtol 8u (an element's error scales with the
    /// size of its sum's terms, not with the element, which may be near 0, so the absolute part
    /// follows the tensor's RMS; the key rows of dk, dv sum over up to T queries, a few times the
    /// typical row).
    pub fn flash(want: &[f32]) -> Tol {
        Tol::new(12.0 * U_BF16 * rms(want), 8.0 * U_BF16, 3.0 * U_BF16)
    }

    /// Softmax statistics (lse): f32 on both sides (exp2 vs exp, the online max): element-wise
    /// 1e-3 absolute and relative (the former tests'), norm 2e-5.
    pub const fn lse() -> Tol {
        Tol::new(1e-3, 1e-3, 2e-5)
    }

    /// `atol` multiplied by the RMS of the reference (tensors whose scale is not O(1)).
    pub fn rms_scaled(self, want: &[f32]) -> Tol {
        Tol { atol: self.atol * rms(want), ..self }
    }
}

/// Root mean square (0 for an empty slice).
pub fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

/// What one comparison found.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Worst |g − w| / (atol + rtol·|w|); +∞ for a NaN or a mismatch where the bound is 0.
    pub margin: f64,
    /// The element where the margin was found.
    pub worst_at: usize,
    /// ‖g − w‖₂ / ‖w‖₂ (0 when both are zero, +∞ when only w is).
    pub rel_err: f64,
    pub pass: bool,
    /// Why it failed in words (lengths, the worst element), empty when it passed.
    pub detail: String,
}

/// Compares `got` with `want` element-wise and by the relative error norm.
pub fn compare(got: &[f32], want: &[f32], tol: Tol) -> Stats {
    if got.len() != want.len() {
        let detail = format!("{} elements, expected {}", got.len(), want.len());
        return Stats { margin: f64::INFINITY, worst_at: 0, rel_err: f64::INFINITY, pass: false, detail };
    }
    let (mut margin, mut worst_at) = (0.0f64, 0usize);
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g as f64 - w as f64).abs();
        let bound = tol.atol as f64 + tol.rtol as f64 * (w as f64).abs();
        let ratio = if diff.is_nan() || !g.is_finite() && g != w {
            f64::INFINITY
        } else if diff == 0.0 {
            0.0
        } else if bound > 0.0 {
            diff / bound
        } else {
            f64::INFINITY
        };
        if ratio > margin {
            (margin, worst_at) = (ratio, i);
        }
        err2 += if diff.is_nan() { f64::INFINITY } else { diff * diff };
        ref2 += w as f64 * w as f64;
    }
    let rel_err = if err2 == 0.0 {
        0.0
    } else if ref2 == 0.0 || err2.is_nan() {
        f64::INFINITY
    } else {
        (err2 / ref2).sqrt()
    };
    let pass = margin <= 1.0 && rel_err <= tol.norm as f64;
    let detail = if pass {
        String::new()
    } else {
        let (g, w) = (got.get(worst_at).copied().unwrap_or(0.0), want.get(worst_at).copied().unwrap_or(0.0));
        format!("element {worst_at}: gpu {g} vs cpu {w} (atol {:.3e}, rtol {:.3e})", tol.atol, tol.rtol)
    };
    Stats { margin, worst_at, rel_err, pass, detail }
}

/// Rounds to bf16 (round to nearest even) and back.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_tensors_pass_with_zero_margin() {
        let w = vec![1.0, -2.0, 0.0, 3.5];
        let s = compare(&w, &w, Tol::EXACT);
        assert!(s.pass && s.margin == 0.0 && s.rel_err == 0.0, "{s:?}");
    }

    #[test]
    fn nan_length_and_zero_reference_fail() {
        let w = vec![1.0, 2.0];
        assert!(!compare(&[1.0, f32::NAN], &w, Tol::new(1.0, 1.0, 1.0)).pass);
        assert!(!compare(&[1.0], &w, Tol::new(1.0, 1.0, 1.0)).pass);
        let s = compare(&[1e-9, 0.0], &[0.0, 0.0], Tol::new(1e-3, 0.0, 1e-3));
        assert!(!s.pass && s.rel_err.is_infinite(), "a non-zero result against an all-zero reference: {s:?}");
        assert!(compare(&[0.0, 0.0], &[0.0, 0.0], Tol::new(0.0, 0.0, 0.0)).pass);
    }

    #[test]
    fn the_norm_catches_what_the_element_test_lets_through() {
        // half the elements small: zeroing everything passes atol 2e-2 there but not the norm
        let w: Vec<f32> = (0..1000).map(|i| if i % 2 == 0 { 0.01 } else { 1.0 }).collect();
        let zero = vec![0.0; 1000];
        let s = compare(&zero, &w, Tol::new(2e-2, 2e-2, 1e-2));
        assert!(!s.pass && (s.rel_err - 1.0).abs() < 1e-9, "{s:?}");
        let loose = Tol::new(1.0, 1.0, 1.0);
        assert!(!compare(&zero, &w, Tol { norm: 0.5, ..loose }).pass, "the norm alone fails it");
        // margin is the worst ratio
        let s = compare(&[1.5, 2.0], &[1.0, 2.0], Tol::new(1.0, 0.0, 1.0));
        assert_eq!((s.margin, s.worst_at), (0.5, 0));
    }
}
