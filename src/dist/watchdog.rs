//! The collective timeout: every collective runs under a [`CollectiveGuard`]; a watchdog thread
//! ends the whole job (MPI_Abort under MPI, a non-zero exit otherwise, which makes the launcher
//! end the other ranks) when one has not returned within the timeout, because a rank died or
//! stalled. Also the job-wide abort a rank calls when it fails on its own (a lone error must not
//! leave the other ranks waiting in a collective).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Default seconds a collective may take (`--collective-timeout`, NANOSEEK_COLLECTIVE_TIMEOUT).
pub const DEFAULT_TIMEOUT_S: u64 = 300;

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);
static ABORT_HOOK: OnceLock<Box<dyn Fn(i32) + Send + Sync>> = OnceLock::new();
/// (rank, collective name, start) of the collective in flight.
static CURRENT: Mutex<Option<(usize, &'static str, Instant)>> = Mutex::new(None);
static START: Once = Once::new();

/// Sets the timeout (seconds, > 0).
pub fn set_collective_timeout(seconds: f64) -> anyhow::Result<()> {
    if !(seconds.is_finite() && seconds > 0.0) {
        anyhow::bail!("--collective-timeout {seconds}: must be a positive number of seconds");
    }
    TIMEOUT_MS.store((seconds * 1000.0).ceil() as u64, Ordering::Relaxed);
    Ok(())
}

/// The timeout: the value set, else NANOSEEK_COLLECTIVE_TIMEOUT, else [`DEFAULT_TIMEOUT_S`].
pub fn collective_timeout() -> anyhow::Result<Duration> {
    let ms = TIMEOUT_MS.load(Ordering::Relaxed);
    if ms > 0 {
        return Ok(Duration::from_millis(ms));
    }
    match std::env::var("NANOSEEK_COLLECTIVE_TIMEOUT") {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => anyhow::bail!("NANOSEEK_COLLECTIVE_TIMEOUT={v:?} is not a positive number of seconds"),
        },
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_S)),
    }
}

/// How to end the whole job (MPI_Abort); set once by the communicator. Without one,
/// [`abort_job`] exits the process.
pub fn set_abort_hook(hook: Box<dyn Fn(i32) + Send + Sync>) {
    let _ = ABORT_HOOK.set(hook);
}

static FINALIZE_HOOK: OnceLock<Box<dyn Fn() + Send + Sync>> = OnceLock::new();

/// How to close the collectives at a successful end (MPI_Finalize); set once.
pub fn set_finalize_hook(hook: Box<dyn Fn() + Send + Sync>) {
    let _ = FINALIZE_HOOK.set(hook);
}

/// Closes the collectives after every rank succeeded (nothing without a hook).
pub fn finalize() {
    if let Some(hook) = FINALIZE_HOOK.get() {
        hook();
    }
}

/// Ends the whole job with exit code `code` (every rank, through the launcher).
pub fn abort_job(code: i32) -> ! {
    if let Some(hook) = ABORT_HOOK.get() {
        hook(code);
    }
    std::process::exit(code)
}

/// A collective in flight; dropping it marks it done.
pub struct CollectiveGuard(());

impl CollectiveGuard {
    /// Starts watching collective `name` of `rank`.
    pub fn start(rank: usize, name: &'static str) -> CollectiveGuard {
        START.call_once(|| {
            let timeout = collective_timeout().unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_S));
            std::thread::spawn(move || watch(timeout));
        });
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((rank, name, Instant::now()));
        CollectiveGuard(())
    }
}

impl Drop for CollectiveGuard {
    fn drop(&mut self) {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn watch(timeout: Duration) {
    let tick = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        std::thread::sleep(tick);
        let late = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).filter(|(_, _, t0)| t0.elapsed() > timeout);
        if let Some((rank, name, _)) = late {
            eprintln!(
                "error: rank {rank}: collective {name} did not complete within {} s (another rank died or stalled); ending the job",
                timeout.as_secs_f64()
            );
            abort_job(1);
        }
    }
}
