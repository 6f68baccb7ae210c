//! Memory accounting: bytes held per category, current and peak, per thread.
//!
//! Everything big that the engine allocates registers here: parameters, their
//! gradients, optimizer state (RAII `Tracked` guards held by their owners), the
//! tape's activations and its gradient workspace (counted by the tape itself).
//! Counters are thread-local: one training loop runs on one thread (its kernels'
//! rayon workers only fill buffers the loop allocated), and tests running in
//! parallel threads do not see each other.

use serde::Serialize;
use std::cell::RefCell;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Parameters,
    Gradients,
    OptimizerState,
    /// Values the tape keeps for the backward (op outputs and saved state).
    Activations,
    /// Transient buffers: gradients flowing through the tape, recomputation scratch.
    Workspace,
}

pub const CATEGORIES: [Category; 5] =
    [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Activations, Category::Workspace];

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Parameters => "parameters",
            Category::Gradients => "gradients",
            Category::OptimizerState => "optimizer_state",
            Category::Activations => "activations",
            Category::Workspace => "workspace",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryReport {
    /// Bytes held now, by category (CATEGORIES order).
    pub current: [usize; 5],
    /// Highest bytes seen per category since the last `reset_peak`.
    pub peak: [usize; 5],
    /// Highest total seen (not the sum of the per-category peaks).
    pub peak_total: usize,
}

impl MemoryReport {
    pub fn current_total(&self) -> usize {
        self.current.iter().sum()
    }
}

#[derive(Default)]
struct State {
    report: MemoryReport,
    /// The per-category bytes at the moment of peak_total.
    at_peak: [usize; 5],
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

pub fn alloc(cat: Category, bytes: usize) {
    STATE.with(|s| {
        let s = &mut *s.borrow_mut();
        let i = cat as usize;
        s.report.current[i] += bytes;
        s.report.peak[i] = s.report.peak[i].max(s.report.current[i]);
        let total = s.report.current_total();
        if total > s.report.peak_total {
            s.report.peak_total = total;
            s.at_peak = s.report.current;
        }
    });
}

pub fn free(cat: Category, bytes: usize) {
    STATE.with(|s| {
        let cur = &mut s.borrow_mut().report.current[cat as usize];
        *cur = cur.checked_sub(bytes).expect("memory accounting: freed more than was allocated");
    });
}

pub fn report() -> MemoryReport {
    STATE.with(|s| s.borrow().report.clone())
}

/// Per-category bytes at the moment the total peaked.
pub fn at_peak() -> [usize; 5] {
    STATE.with(|s| s.borrow().at_peak)
}

/// Starts a new peak window from the current level.
pub fn reset_peak() {
    STATE.with(|s| {
        let s = &mut *s.borrow_mut();
        s.report.peak = s.report.current;
        s.report.peak_total = s.report.current_total();
        s.at_peak = s.report.current;
    });
}

/// Counts `bytes` under `cat` for as long as it lives.
#[derive(Debug)]
pub struct Tracked {
    cat: Category,
    bytes: usize,
}

impl Tracked {
    pub fn new(cat: Category, bytes: usize) -> Tracked {
        alloc(cat, bytes);
        Tracked { cat, bytes }
    }

    /// Tracks `floats` f32 values.
    pub fn floats(cat: Category, floats: usize) -> Tracked {
        Self::new(cat, floats * 4)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        free(self.cat, self.bytes);
    }
}

pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Memory the OS says is available for a new allocation (Linux `MemAvailable`), if known.
pub fn available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses, before anything is allocated, a run whose predicted peak exceeds the available
/// memory; the message names both sizes and what to change.
pub fn check_fits(predicted: usize, what: &str) -> anyhow::Result<()> {
    if let Some(avail) = available_bytes() {
        if predicted > avail {
            anyhow::bail!(
                "out of memory: {what} needs about {:.2} GiB (predicted by `nanoseek info`) but only {:.2} GiB is available; \
                 use a smaller --device-batch-size or --max-seq-len, or --grad-checkpoint 1",
                mib(predicted) / 1024.0,
                mib(avail) / 1024.0
            );
        }
    }
    Ok(())
}
