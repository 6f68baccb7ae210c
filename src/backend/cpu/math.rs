//! Scalar math written so that loops over slices auto-vectorize (SSE2 and up):
//! a branch-free exp, the functions built on it, and lane-parallel reductions.
//! Results are deterministic: the reduction order is fixed by the code.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2²³: adding and subtracting it rounds an f32 to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// 2ⁿ for the integer n held in `shifted = n + ROUND_MAGIC` (|n| ≤ 127), built
/// directly in the exponent bits (a bit cast, not a float→int conversion, so it vectorizes).
#[inline(always)]
fn pow2_from_shifted(shifted: f32) -> f32 {
    let n = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    f32::from_bits(((n + 127) << 23) as u32)
}

/// e^x with relative error below 3e-7 on [−87, 88] (measured max 2.4e-7); inputs
/// outside are clamped (so it returns ≈1e-38 instead of 0 and ≈1.7e38 instead of inf).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // x = n·ln2 + r with |r| ≤ ln2/2, e^x = 2ⁿ·e^r
    let shifted = x * LOG2E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // degree-6 Taylor polynomial of e^r (truncation < 1.2e-7 for |r| ≤ 0.347)
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * pow2_from_shifted(shifted)
}

/// 2^x for x ≤ 127 with relative error below 2.5e-7; x < −126 is clamped (result 2⁻¹²⁶).
/// x = n + f with |f| ≤ ½, 2^f from a degree-6 minimax polynomial (Cephes' coefficients).
/// The attention kernels use it with log2(e) folded into their score scale.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let x = if x < -126.0 { -126.0 } else { x };
    let shifted = x + ROUND_MAGIC;
    let f = x - (shifted - ROUND_MAGIC);
    let mut p = 1.535_336_2e-4;
    p = p * f + 1.339_887_4e-3;
    p = p * f + 9.618_437e-3;
    p = p * f + 5.550_332_4e-2;
    p = p * f + 2.402_264_8e-1;
    p = p * f + 6.931_472e-1;
    p = p * f + 1.0;
    p * pow2_from_shifted(shifted)
}

/// tanh(x) = 1 − 2/(e^{2x} + 1); absolute error below 3e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// σ(x) = 1/(1 + e^{−x}).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

const LANES: usize = 8;

/// Σ a·b with eight independent partial sums (vectorizes; order fixed).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Σ x (eight partial sums).
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let c = x.chunks_exact(LANES);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for i in 0..LANES {
            acc[i] += v[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// max x (−inf for an empty slice; NaN-free input assumed).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = x.chunks_exact(LANES);
    let tail = c.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in c {
        for i in 0..LANES {
            acc[i] = if v[i] > acc[i] { v[i] } else { acc[i] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_tanh_sigmoid_match_libm() {
        let mut worst = (0.0f64, 0.0f64);
        for i in -20000..=20000 {
            let x = i as f32 * 0.004; // [-80, 80]
            let e = exp(x) as f64;
            let want = (x as f64).exp();
            worst.0 = worst.0.max(((e - want) / want).abs());
            let t = tanh(x / 4.0) as f64;
            worst.1 = worst.1.max((t - ((x / 4.0) as f64).tanh()).abs());
            assert!((sigmoid(x) as f64 - 1.0 / (1.0 + (-(x as f64)).exp())).abs() < 3e-7);
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh absolute error {}", worst.1);
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
        assert!(exp(-200.0) < 1e-37 && exp(200.0) > 1e38);
    }

    #[test]
    fn exp2_accuracy() {
        let worst = (-1_260_000..=1_270_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| ((exp2(x) as f64 - (x as f64).exp2()) / (x as f64).exp2()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 2.5e-7, "exp2 relative error {worst:e}");
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(-3.0), 0.125);
        assert_eq!(exp2(f32::NEG_INFINITY), 2f32.powi(-126));
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.5).collect();
        assert_eq!(max(&x), 9.0);
        assert!((sum(&x) - x.iter().sum::<f32>()).abs() < 1e-5);
        assert!((dot(&x, &x) - x.iter().map(|v| v * v).sum::<f32>()).abs() < 1e-3);
    }
}
