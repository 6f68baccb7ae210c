//! The learning-rate schedule: linear warmup, flat, linear warmdown.

/// Multiplier for optimizer step `step` (0-based) of `total`:
/// rises linearly to 1 over the first warmup_ratio·total steps, stays at 1,
/// then falls linearly to `final_frac` over the last warmdown_ratio·total steps.
pub fn lr_multiplier(step: u64, total: u64, warmup_ratio: f32, warmdown_ratio: f32, final_frac: f32) -> f32 {
    let warmup = (warmup_ratio as f64 * total as f64).round() as u64;
    let warmdown = (warmdown_ratio as f64 * total as f64).round() as u64;
    if step < warmup {
        (step + 1) as f32 / warmup as f32
    } else if step + warmdown >= total && warmdown > 0 {
        // progress through the warmdown, 0 at its first step … 1 after the last
        let left = total.saturating_sub(step) as f32 / warmdown as f32;
        final_frac + (1.0 - final_frac) * left
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_of_the_schedule() {
        let m = |s| lr_multiplier(s, 100, 0.1, 0.2, 0.0);
        assert!((m(0) - 0.1).abs() < 1e-6);
        assert!((m(9) - 1.0).abs() < 1e-6);
        assert_eq!(m(50), 1.0);
        assert_eq!(m(79), 1.0);
        assert!((m(80) - 1.0).abs() < 1e-6);
        assert!((m(99) - 0.05).abs() < 1e-6);
        assert!(m(90) < m(85));
        assert_eq!(lr_multiplier(0, 10, 0.0, 0.0, 0.0), 1.0);
    }
}
