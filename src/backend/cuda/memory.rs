//! Caching device allocator, its accounting by category, and typed device buffers.
//!
//! Blocks are rounded up to a size class (powers of two from 512 B to 1 MiB, then
//! multiples of 2 MiB) and returned to a free list when their buffer drops, so a
//! training step reuses the previous step's blocks instead of calling
//! cuMemAlloc/cuMemFree. All work runs on one stream, so a block freed while a
//! kernel still reads it is only reused by later work on the same stream.
//!
//! **Accounting.** Every live block is attributed to a [`Category`] (the CPU's enum:
//! parameters, gradients, optimizer state, activations, workspace), with current and
//! peak bytes per category and in total, the per-category split at the moment of the
//! total peak, and the cached (free, held) bytes ([`Accounting`], read through
//! [`CudaBackend::memory_by_category`]). A new allocation takes the backend's current
//! category: [`Category::Workspace`] unless a [`CudaBackend::scoped`] guard (or
//! [`CudaBackend::with_category`]) is alive, so callers that know nothing of categories
//! keep working. [`DeviceBuffer::uninit_in`] names the category explicitly, and
//! [`DeviceBuffer::set_category`] re-attributes a live buffer (for owners that learn what a
//! buffer is after it was made, like the trainer's uploaded state).
//!
//! **Out of memory.** When cuMemAlloc fails the cache is released and the allocation retried
//! once; if it fails again the error names the bytes asked for, the bytes in use by category,
//! the cache that was released, the device's free and total memory (cuMemGetInfo) and what to
//! change ([`oom_message`]). [`check_fits`] refuses a run before it starts when its predicted
//! bytes exceed what the device can give, with the same advice.
//!
//! The pool talks to the driver through [`Driver`], so the bookkeeping (free lists,
//! categories, peaks, the retry) is tested on the host with a fake device.

use super::{CudaBackend, CudaError, CudaResult, Inner};
use crate::memory::{mib, Category, MemoryReport, CATEGORIES};
use cudarc::driver::{result, sys};
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

/// Bytes held by live buffers now and at the peak, and bytes cached for reuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of the blocks backing live buffers (size classes, not requested lengths).
    pub current: usize,
    /// Highest `current` since the backend opened (or since `reset_peak`).
    pub peak: usize,
    /// Bytes of free blocks kept for reuse.
    pub cached: usize,
    /// Calls that reached the driver (cache misses).
    pub driver_allocs: usize,
}

/// Bytes of live blocks by category (current and peak, as on the CPU), the per-category
/// split at the moment of the total peak, and the cached bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CategoryStats {
    /// `current` and `peak` per category in `CATEGORIES` order, and `peak_total`.
    pub report: MemoryReport,
    /// Per-category bytes when the total peaked (sums to `report.peak_total`).
    pub at_peak: [usize; 5],
    /// Bytes of free blocks kept for reuse (held from the driver, in no category).
    pub cached: usize,
}

/// The allocator's counters, kept apart from the driver so they can be tested on the host.
/// Sizes are size classes (what the block really holds), not requested lengths.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accounting {
    current: [usize; 5],
    peak: [usize; 5],
    peak_total: usize,
    at_peak: [usize; 5],
    cached: usize,
    driver_allocs: usize,
}

impl Accounting {
    /// A block of `bytes` goes live under `cat`; `from_cache` when it came off a free list.
    pub fn on_alloc(&mut self, cat: Category, bytes: usize, from_cache: bool) {
        if from_cache {
            self.cached = self.cached.checked_sub(bytes).expect("device accounting: cache underflow");
        } else {
            self.driver_allocs += 1;
        }
        let i = cat as usize;
        self.current[i] += bytes;
        self.peak[i] = self.peak[i].max(self.current[i]);
        let total = self.current_total();
        if total > self.peak_total {
            self.peak_total = total;
            self.at_peak = self.current;
        }
    }

    /// A live block of `bytes` under `cat` goes back to the cache.
    pub fn on_free(&mut self, cat: Category, bytes: usize) {
        let cur = &mut self.current[cat as usize];
        *cur = cur.checked_sub(bytes).expect("device accounting: freed more than was allocated");
        self.cached += bytes;
    }

    /// A live block of `bytes` moves from `from` to `to` (the total is unchanged).
    pub fn on_move(&mut self, from: Category, to: Category, bytes: usize) {
        let cur = &mut self.current[from as usize];
        *cur = cur.checked_sub(bytes).expect("device accounting: moved more than was allocated");
        self.current[to as usize] += bytes;
        self.peak[to as usize] = self.peak[to as usize].max(self.current[to as usize]);
    }

    /// `bytes` of cached blocks went back to the driver.
    pub fn on_release(&mut self, bytes: usize) {
        self.cached = self.cached.checked_sub(bytes).expect("device accounting: released more than was cached");
    }

    pub fn current_total(&self) -> usize {
        self.current.iter().sum()
    }

    /// Starts a new peak window from the current level.
    pub fn reset_peak(&mut self) {
        self.peak = self.current;
        self.peak_total = self.current_total();
        self.at_peak = self.current;
    }

    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            current: self.current_total(),
            peak: self.peak_total,
            cached: self.cached,
            driver_allocs: self.driver_allocs,
        }
    }

    pub fn by_category(&self) -> CategoryStats {
        CategoryStats {
            report: MemoryReport { current: self.current, peak: self.peak, peak_total: self.peak_total },
            at_peak: self.at_peak,
            cached: self.cached,
        }
    }
}

/// The device calls the pool makes; [`CudaDriver`] on a device, a fake in the host tests.
pub(crate) trait Driver {
    /// A new block of `bytes`, or the driver's error.
    fn malloc(&mut self, bytes: usize) -> Result<u64, String>;
    fn free(&mut self, ptr: u64) -> Result<(), String>;
    /// (free, total) bytes of the device, if the driver can tell.
    fn mem_info(&mut self) -> Option<(usize, usize)>;
}

/// The real driver, in the context the caller has bound.
pub(crate) struct CudaDriver;

impl Driver for CudaDriver {
    fn malloc(&mut self, bytes: usize) -> Result<u64, String> {
        // SAFETY: plain allocation in the current context (bound by the caller).
        unsafe { result::malloc_sync(bytes) }.map_err(|e| format!("{e:?}"))
    }
    fn free(&mut self, ptr: sys::CUdeviceptr) -> Result<(), String> {
        // SAFETY: a block of the pool that no live buffer owns.
        unsafe { result::free_sync(ptr) }.map_err(|e| format!("{e:?}"))
    }
    fn mem_info(&mut self) -> Option<(usize, usize)> {
        result::mem_get_info().ok()
    }
}

/// Free lists by size class, the category of every live block, the counters, and the
/// category new allocations take.
pub(crate) struct Pool {
    free: BTreeMap<usize, Vec<u64>>,
    /// Live blocks: address → (size class, category).
    live: HashMap<u64, (usize, Category)>,
    pub(crate) acct: Accounting,
    /// The category of allocations that do not name one (see [`CudaBackend::scoped`]).
    pub(crate) scope: Category,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool { free: BTreeMap::new(), live: HashMap::new(), acct: Accounting::default(), scope: Category::Workspace }
    }
}

/// The size class of a request of `bytes`.
pub fn size_class(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    if bytes <= MIB {
        bytes.max(512).next_power_of_two()
    } else {
        bytes.div_ceil(2 * MIB) * 2 * MIB
    }
}

/// Bytes as MiB below 1 GiB and GiB above, for messages.
pub fn human_bytes(bytes: usize) -> String {
    let m = mib(bytes);
    if m >= 1024.0 {
        format!("{:.2} GiB", m / 1024.0)
    } else {
        format!("{m:.1} MiB")
    }
}

/// What to change when a run does not fit (shared by the pre-flight check and the OOM error).
pub const OOM_ADVICE: &str =
    "use a smaller --device-batch-size, a shorter --max-seq-len, or --grad-checkpoint 1 (activation checkpointing: recompute each block in the backward)";

/// The out-of-memory error: the request, what is in use by category, the cache that was
/// released before the retry, the device's free/total memory when known, and what to change.
pub fn oom_message(
    asked: usize,
    driver_error: &str,
    acct: &Accounting,
    released: usize,
    device: Option<(usize, usize)>,
) -> String {
    let by_cat: Vec<String> =
        CATEGORIES.iter().map(|c| format!("{} {}", c.name(), human_bytes(acct.current[*c as usize]))).collect();
    let dev = match device {
        Some((free, total)) => format!("the device has {} free of {}", human_bytes(free), human_bytes(total)),
        None => "the device's free memory is unknown".into(),
    };
    format!(
        "CUDA out of memory: allocating {} failed ({driver_error}) even after releasing {} of cached blocks; \
         in use: {} ({}), cached {}; {dev}. To fit, {OOM_ADVICE}",
        human_bytes(asked),
        human_bytes(released),
        human_bytes(acct.current_total()),
        by_cat.join(", "),
        human_bytes(acct.cached),
    )
}

/// The pre-flight refusal, or None when `predicted` bytes fit in `available` (the device's free
/// memory plus what this backend already holds, live or cached).
pub fn fits_message(predicted: usize, what: &str, available: usize, total: usize) -> Option<String> {
    (predicted > available).then(|| {
        format!(
            "CUDA out of memory (predicted): {what} needs about {} on the device but only {} of its {} is available; \
             to fit, {OOM_ADVICE}",
            human_bytes(predicted),
            human_bytes(available),
            human_bytes(total),
        )
    })
}

/// Refuses, before training starts, a run whose predicted device bytes exceed what the device
/// can give: its free memory plus the bytes this backend already holds (live or cached, so it
/// may be called after the model is uploaded). Does nothing when cuMemGetInfo fails.
pub fn check_fits(be: &CudaBackend, predicted: usize, what: &str) -> CudaResult<()> {
    be.inner.bind()?;
    let Some((free, total)) = CudaDriver.mem_info() else { return Ok(()) };
    let s = be.memory_stats();
    match fits_message(predicted, what, free + s.current + s.cached, total) {
        Some(m) => Err(CudaError(m)),
        None => Ok(()),
    }
}

impl Pool {
    pub(crate) fn stats(&self) -> MemoryStats {
        self.acct.stats()
    }

    /// A block of size class `class` under `cat`: from the free list, else from the driver; when
    /// the driver is out of memory the cache is released and the allocation retried once.
    pub(crate) fn alloc(&mut self, class: usize, cat: Category, drv: &mut impl Driver) -> CudaResult<u64> {
        let (ptr, from_cache) = match self.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(p) => (p, true),
            None => match drv.malloc(class) {
                Ok(p) => (p, false),
                Err(_) => {
                    let released = self.release_cached(drv)?;
                    match drv.malloc(class) {
                        Ok(p) => (p, false),
                        Err(e) => {
                            let device = drv.mem_info();
                            return Err(CudaError(oom_message(class, &e, &self.acct, released, device)));
                        }
                    }
                }
            },
        };
        self.acct.on_alloc(cat, class, from_cache);
        self.live.insert(ptr, (class, cat));
        Ok(ptr)
    }

    /// Returns a live block to its free list.
    pub(crate) fn free(&mut self, ptr: u64) {
        let (class, cat) = self.live.remove(&ptr).expect("device accounting: freeing a block that is not live");
        self.acct.on_free(cat, class);
        self.free.entry(class).or_default().push(ptr);
    }

    /// Re-attributes a live block to `cat`.
    pub(crate) fn set_category(&mut self, ptr: u64, cat: Category) {
        let e = self.live.get_mut(&ptr).expect("device accounting: re-categorizing a block that is not live");
        self.acct.on_move(e.1, cat, e.0);
        e.1 = cat;
    }

    /// Moves every live block of category `from` to `to`.
    pub(crate) fn recategorize(&mut self, from: Category, to: Category) {
        for e in self.live.values_mut().filter(|e| e.1 == from) {
            self.acct.on_move(from, to, e.0);
            e.1 = to;
        }
    }

    /// Frees every cached block back to the driver; returns the bytes released.
    pub(crate) fn release_cached(&mut self, drv: &mut impl Driver) -> CudaResult<usize> {
        let mut released = 0;
        for (class, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                drv.free(p).map_err(|e| CudaError(format!("cuMemFree: {e}")))?;
                self.acct.on_release(class);
                released += class;
            }
        }
        Ok(released)
    }
}

/// While alive, allocations that name no category are counted under the scope's category;
/// dropping it restores the previous one (scopes nest). Made by [`CudaBackend::scoped`].
#[must_use = "the category applies only while the guard lives"]
pub struct CategoryScope {
    inner: Arc<Inner>,
    prev: Category,
}

impl CategoryScope {
    pub(crate) fn new(be: &CudaBackend, cat: Category) -> CategoryScope {
        let prev = std::mem::replace(&mut be.inner.pool.lock().unwrap().scope, cat);
        CategoryScope { inner: be.inner.clone(), prev }
    }
}

impl Drop for CategoryScope {
    fn drop(&mut self) {
        self.inner.pool.lock().unwrap().scope = self.prev;
    }
}

/// Element types a device buffer can hold.
pub trait DeviceElem: Copy + Default + 'static {}
impl DeviceElem for f32 {}
impl DeviceElem for half::bf16 {}
impl DeviceElem for u32 {}
impl DeviceElem for i32 {}

/// `len` elements of `T` in device memory, from the backend's caching allocator.
pub struct DeviceBuffer<T: DeviceElem> {
    ptr: sys::CUdeviceptr,
    len: usize,
    inner: Arc<Inner>,
    _t: PhantomData<T>,
}

impl<T: DeviceElem> DeviceBuffer<T> {
    /// Uninitialized buffer of `len` elements, counted under the backend's current category
    /// (`Workspace` unless a [`CudaBackend::scoped`] guard says otherwise).
    pub fn uninit(be: &CudaBackend, len: usize) -> CudaResult<Self> {
        Self::alloc(be, len, None)
    }

    /// Uninitialized buffer of `len` elements, counted under `cat`.
    pub fn uninit_in(be: &CudaBackend, len: usize, cat: Category) -> CudaResult<Self> {
        Self::alloc(be, len, Some(cat))
    }

    fn alloc(be: &CudaBackend, len: usize, cat: Option<Category>) -> CudaResult<Self> {
        be.inner.bind()?;
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| CudaError(format!("a device buffer of {len} elements overflows usize")))?;
        let class = size_class(bytes);
        let mut pool = be.inner.pool.lock().unwrap();
        let cat = cat.unwrap_or(pool.scope);
        let ptr = pool.alloc(class, cat, &mut CudaDriver)?;
        Ok(DeviceBuffer { ptr, len, inner: be.inner.clone(), _t: PhantomData })
    }

    /// Buffer of `len` zero bytes.
    pub fn zeros(be: &CudaBackend, len: usize) -> CudaResult<Self> {
        let b = Self::uninit(be, len)?;
        b.fill_zero()?;
        Ok(b)
    }

    /// Copy of a host slice.
    pub fn from_host(be: &CudaBackend, data: &[T]) -> CudaResult<Self> {
        let b = Self::uninit(be, data.len())?;
        if !data.is_empty() {
            // SAFETY: the block holds at least data.len() elements; the copy is synchronous.
            unsafe { result::memcpy_htod_sync(b.ptr, data) }.map_err(super::err("cuMemcpyHtoD"))?;
        }
        Ok(b)
    }

    /// Copies the buffer to the host (waits for the queued work that writes it).
    pub fn to_host(&self) -> CudaResult<Vec<T>> {
        self.inner.bind()?;
        let mut out = vec![T::default(); self.len];
        if self.len > 0 {
            // SAFETY: out holds exactly len elements; the copy is synchronous on the default stream.
            unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }.map_err(super::err("cuMemcpyDtoH"))?;
        }
        Ok(out)
    }

    /// Sets every byte to zero (stream-ordered).
    pub fn fill_zero(&self) -> CudaResult<()> {
        self.inner.bind()?;
        if self.len > 0 {
            // SAFETY: within the block.
            unsafe { result::memset_d8_async(self.ptr, 0, self.bytes(), self.inner.stream) }
                .map_err(super::err("cuMemsetD8"))?;
        }
        Ok(())
    }

    /// Counts this buffer under `cat` from now on (its block moves between categories).
    pub fn set_category(&self, cat: Category) {
        self.inner.pool.lock().unwrap().set_category(self.ptr, cat);
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// The device address (for the kernel parameter structs).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl<T: DeviceElem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        self.inner.pool.lock().unwrap().free(self.ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }

    /// A device of `capacity` bytes that hands out increasing addresses.
    struct FakeDevice {
        capacity: usize,
        used: usize,
        next: u64,
        blocks: HashMap<u64, usize>,
        mallocs: usize,
    }

    impl FakeDevice {
        fn new(capacity: usize) -> FakeDevice {
            FakeDevice { capacity, used: 0, next: 1 << 20, blocks: HashMap::new(), mallocs: 0 }
        }
    }

    impl Driver for FakeDevice {
        fn malloc(&mut self, bytes: usize) -> Result<u64, String> {
            self.mallocs += 1;
            if self.used + bytes > self.capacity {
                return Err("CUDA_ERROR_OUT_OF_MEMORY".into());
            }
            self.used += bytes;
            let p = self.next;
            self.next += bytes as u64;
            self.blocks.insert(p, bytes);
            Ok(p)
        }
        fn free(&mut self, ptr: u64) -> Result<(), String> {
            let b = self.blocks.remove(&ptr).ok_or("double free")?;
            self.used -= b;
            Ok(())
        }
        fn mem_info(&mut self) -> Option<(usize, usize)> {
            Some((self.capacity - self.used, self.capacity))
        }
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn categories_peaks_and_cache() {
        let (mut pool, mut dev) = (Pool::default(), FakeDevice::new(1 << 30));
        let w = pool.alloc(4 * MIB, Category::Parameters, &mut dev).unwrap();
        let g = pool.alloc(4 * MIB, Category::Gradients, &mut dev).unwrap();
        let a = pool.alloc(2 * MIB, Category::Activations, &mut dev).unwrap();
        let b = pool.alloc(2 * MIB, Category::Activations, &mut dev).unwrap();
        let s = pool.acct.by_category();
        assert_eq!(s.report.current, [4 * MIB, 4 * MIB, 0, 4 * MIB, 0]);
        assert_eq!(s.report.peak_total, 12 * MIB);
        pool.free(a);
        let x = pool.alloc(2 * MIB, Category::Workspace, &mut dev).unwrap();
        assert_eq!(x, a, "the freed block of the same class is reused");
        assert_eq!(dev.mallocs, 4);
        let s = pool.acct.by_category();
        assert_eq!(s.report.current, [4 * MIB, 4 * MIB, 0, 2 * MIB, 2 * MIB]);
        assert_eq!(s.report.peak, [4 * MIB, 4 * MIB, 0, 4 * MIB, 2 * MIB]);
        assert_eq!(s.report.peak_total, 12 * MIB, "the total never exceeded 12 MiB");
        assert_eq!(s.at_peak, [4 * MIB, 4 * MIB, 0, 4 * MIB, 0]);
        assert_eq!(s.cached, 0);
        pool.free(b);
        pool.free(x);
        assert_eq!(pool.acct.by_category().cached, 4 * MIB);
        pool.set_category(g, Category::OptimizerState);
        assert_eq!(pool.acct.by_category().report.current, [4 * MIB, 0, 4 * MIB, 0, 0]);
        let t = pool.alloc(512, Category::Workspace, &mut dev).unwrap();
        pool.recategorize(Category::Workspace, Category::Parameters);
        assert_eq!(pool.acct.by_category().report.current, [4 * MIB + 512, 0, 4 * MIB, 0, 0]);
        pool.free(t);
        assert_eq!(pool.acct.stats().current, 8 * MIB);
        assert_eq!(pool.release_cached(&mut dev).unwrap(), 4 * MIB + 512, "the 2 MiB blocks and the 512 B one");
        assert_eq!((pool.acct.stats().cached, dev.used), (0, 8 * MIB));
        pool.free(w);
        pool.free(g);
        assert_eq!(pool.acct.stats().current, 0);
    }

    /// A simulated training loop: persistent state, then steps that allocate activations and
    /// workspace and free them all; every step ends at the baseline, reuses the first step's
    /// blocks, and has the same per-step peak.
    #[test]
    fn steps_return_to_baseline() {
        let (mut pool, mut dev) = (Pool::default(), FakeDevice::new(1 << 30));
        let params = pool.alloc(8 * MIB, Category::Parameters, &mut dev).unwrap();
        let opt = pool.alloc(16 * MIB, Category::OptimizerState, &mut dev).unwrap();
        let baseline = pool.acct.by_category().report.current;
        let mut first: Option<(CategoryStats, usize)> = None;
        for _step in 0..3 {
            pool.acct.reset_peak();
            let mut acts = Vec::new();
            for l in 0..4 {
                acts.push(pool.alloc(MIB << (l % 2), Category::Activations, &mut dev).unwrap());
            }
            let mut ws = Vec::new();
            while let Some(p) = acts.pop() {
                ws.push(pool.alloc(size_class(3000), Category::Workspace, &mut dev).unwrap());
                pool.free(p);
            }
            let grads = pool.alloc(8 * MIB, Category::Gradients, &mut dev).unwrap();
            ws.into_iter().for_each(|p| pool.free(p));
            pool.free(grads);
            let s = pool.acct.by_category();
            assert_eq!(s.report.current, baseline, "a step leaks nothing");
            match &first {
                None => first = Some((s, dev.mallocs)),
                Some((f, mallocs)) => {
                    assert_eq!(&s, f, "every step has the same peaks");
                    assert_eq!(dev.mallocs, *mallocs, "later steps only reuse cached blocks");
                }
            }
        }
        let (s, _) = first.unwrap();
        // The peak is when the gradients arrive: every activation freed, four workspace blocks live.
        assert_eq!(s.report.peak_total, 24 * MIB + 8 * MIB + 4 * 4096);
        assert_eq!(s.at_peak, [8 * MIB, 8 * MIB, 16 * MIB, 0, 4 * 4096]);
        assert_eq!(s.report.peak[Category::Activations as usize], 6 * MIB);
        pool.free(params);
        pool.free(opt);
        pool.release_cached(&mut dev).unwrap();
        let end = pool.acct.stats();
        assert_eq!((end.current, end.cached, end.driver_allocs, dev.used), (0, 0, dev.mallocs, 0));
    }

    #[test]
    fn out_of_memory_releases_the_cache_then_names_the_sizes() {
        let (mut pool, mut dev) = (Pool::default(), FakeDevice::new(10 * MIB));
        let keep = pool.alloc(4 * MIB, Category::Parameters, &mut dev).unwrap();
        let tmp = pool.alloc(4 * MIB, Category::Activations, &mut dev).unwrap();
        pool.free(tmp);
        // 6 MiB does not fit beside 4 live + 4 cached, but does once the cache is released.
        let big = pool.alloc(6 * MIB, Category::Activations, &mut dev).unwrap();
        assert_eq!((pool.acct.stats().cached, dev.used), (0, 10 * MIB));
        pool.free(big);
        // 8 MiB cannot fit even then: a clear error, and the pool is still consistent.
        let e = pool.alloc(8 * MIB, Category::Workspace, &mut dev).unwrap_err().0;
        for part in [
            "CUDA out of memory",
            "allocating 8.0 MiB",
            "CUDA_ERROR_OUT_OF_MEMORY",
            "releasing 6.0 MiB of cached blocks",
            "in use: 4.0 MiB (parameters 4.0 MiB, gradients 0.0 MiB, optimizer_state 0.0 MiB, activations 0.0 MiB, workspace 0.0 MiB)",
            "cached 0.0 MiB",
            "6.0 MiB free of 10.0 MiB",
            "--device-batch-size",
            "--max-seq-len",
            "--grad-checkpoint",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        assert_eq!(pool.acct.stats().current, 4 * MIB);
        pool.free(keep);
        assert_eq!(pool.acct.stats().current, 0);
    }

    #[test]
    fn preflight_message() {
        assert_eq!(fits_message(MIB, "x", 2 * MIB, 4 * MIB), None);
        let m = fits_message(3 << 30, "training small at device_batch_size 8 × max_seq_len 1024", 1 << 30, 2 << 30)
            .unwrap();
        for part in [
            "needs about 3.00 GiB",
            "only 1.00 GiB of its 2.00 GiB is available",
            "device_batch_size 8",
            "--device-batch-size",
            "--grad-checkpoint",
        ] {
            assert!(m.contains(part), "{part:?} missing from: {m}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512 * 1024), "0.5 MiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
