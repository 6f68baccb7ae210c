//! Runs one bench case at a time under the time budgets: the warm-up call is timed first (a
//! case over the row budget is skipped, with its later shapes), then the timed batches, then
//! every output the case wrote is checked for NaN and infinity; each outcome goes straight to
//! the [`Reporter`](super::Reporter), which writes and prints it.

use super::record::{count_non_finite, Budget, MaybeFinite};
use super::{Case, Reporter};
use crate::kernels::launch::{CudaBackend, CudaResult, DeviceBuffer, DeviceElem};
use anyhow::Result;
use std::time::Instant;

/// How a case is timed (see the module doc of `bench`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Timing {
    /// 3 warm-up calls, then 5 batches of `iters` calls.
    Short,
    /// 1 warm-up call, then 5 batches of as many calls as fit in about 100 ms (1..=iters).
    Long,
}

/// A device buffer a case writes, checked for finiteness after the case (copied to the host).
pub(super) trait Output {
    fn non_finite(&self) -> CudaResult<usize>;
}
impl<T: DeviceElem + MaybeFinite> Output for DeviceBuffer<T> {
    fn non_finite(&self) -> CudaResult<usize> {
        Ok(count_non_finite(&self.to_host()?))
    }
}

pub(super) struct Runner<'a> {
    pub be: &'a CudaBackend,
    pub iters: usize,
    pub budget: Budget,
    start: Instant,
    pub reporter: &'a mut Reporter,
}

impl<'a> Runner<'a> {
    pub fn new(be: &'a CudaBackend, iters: usize, budget: Budget, reporter: &'a mut Reporter) -> Runner<'a> {
        Runner { be, iters, budget, start: Instant::now(), reporter }
    }

    fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Whether `spec` may start now; if not it is reported as skipped. Call it before allocating
    /// a large case's buffers; [`Self::case`] calls it too.
    pub fn admit(&mut self, spec: &Case) -> Result<bool> {
        match self.budget.admit(&spec.kind, &spec.name, self.elapsed_s()) {
            Ok(()) => Ok(true),
            Err(reason) => {
                self.reporter.skipped(spec, reason)?;
                Ok(false)
            }
        }
    }

    /// Whether any of `specs` may start now; if none may, each is reported as skipped (so a
    /// caller can skip allocating their buffers).
    pub fn any_admitted(&mut self, specs: &[&Case]) -> Result<bool> {
        let now = self.elapsed_s();
        if specs.iter().any(|s| self.budget.admit(&s.kind, &s.name, now).is_ok()) {
            return Ok(true);
        }
        for s in specs {
            self.admit(s)?;
        }
        Ok(false)
    }

    /// Times `f` as `spec` (built with [`Case::spec`]) unless the budget skips it, checks
    /// `outputs`, and reports the result.
    pub fn case(
        &mut self,
        spec: Case,
        timing: Timing,
        outputs: &[&dyn Output],
        mut f: impl FnMut() -> CudaResult<()>,
    ) -> Result<()> {
        if !self.admit(&spec)? {
            return Ok(());
        }
        let be = self.be;
        let t0 = Instant::now();
        f()?;
        be.synchronize()?;
        let warmup_s = t0.elapsed().as_secs_f64();
        if let Err(reason) = self.budget.warmed_up(&spec.kind, &spec.name, warmup_s) {
            return self.reporter.skipped(&spec, reason);
        }
        let iters = match timing {
            Timing::Short => {
                for _ in 0..2 {
                    f()?;
                }
                be.synchronize()?;
                self.budget.iters_within(self.iters, warmup_s)
            }
            Timing::Long => {
                let t0 = Instant::now();
                f()?;
                be.synchronize()?;
                let once = t0.elapsed().as_secs_f64();
                let fit = ((0.1 / once.max(1e-6)) as usize).clamp(1, self.iters.max(1));
                fit.min(self.budget.iters_within(self.iters, once))
            }
        };
        let ms = time_batches(be, iters, f)?;
        let mut bad = 0;
        for out in outputs {
            bad += out.non_finite()?;
        }
        self.reporter.timed(spec.timed(ms, bad))
    }
}

/// The median over 5 batches of `iters` queued calls, per call, in milliseconds (the caller
/// warmed up).
fn time_batches(be: &CudaBackend, iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> Result<f64> {
    let mut per_call = Vec::with_capacity(5);
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        be.synchronize()?;
        per_call.push(t0.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    per_call.sort_by(f64::total_cmp);
    Ok(per_call[per_call.len() / 2])
}
