//! Caching device allocator and typed device buffers.
//!
//! Blocks are rounded up to a size class (powers of two from 512 B to 1 MiB, then
//! multiples of 2 MiB) and returned to a free list when their buffer drops, so a
//! training step reuses the previous step's blocks instead of calling
//! cuMemAlloc/cuMemFree. All work runs on one stream, so a block freed while a
//! kernel still reads it is only reused by later work on the same stream. When the
//! driver is out of memory the cache is released and the allocation retried once.

use super::{err, CudaBackend, CudaError, CudaResult, Inner};
use cudarc::driver::{result, sys};
use std::collections::BTreeMap;
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

#[derive(Default)]
pub(crate) struct Pool {
    free: BTreeMap<usize, Vec<sys::CUdeviceptr>>,
    pub(crate) current: usize,
    pub(crate) peak: usize,
    cached: usize,
    driver_allocs: usize,
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

impl Pool {
    pub(crate) fn stats(&self) -> MemoryStats {
        MemoryStats { current: self.current, peak: self.peak, cached: self.cached, driver_allocs: self.driver_allocs }
    }

    fn alloc(&mut self, class: usize) -> CudaResult<sys::CUdeviceptr> {
        let ptr = match self.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(p) => {
                self.cached -= class;
                p
            }
            None => {
                self.driver_allocs += 1;
                // SAFETY: plain allocation in the current context (bound by the caller).
                match unsafe { result::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        self.release_cached()?;
                        // SAFETY: as above.
                        unsafe { result::malloc_sync(class) }
                            .map_err(|e| CudaError(format!("cuMemAlloc of {class} bytes: {e:?}")))?
                    }
                }
            }
        };
        self.current += class;
        self.peak = self.peak.max(self.current);
        Ok(ptr)
    }

    fn free(&mut self, ptr: sys::CUdeviceptr, class: usize) {
        self.current -= class;
        self.cached += class;
        self.free.entry(class).or_default().push(ptr);
    }

    pub(crate) fn release_cached(&mut self) -> CudaResult<()> {
        for (_, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                // SAFETY: a block of this pool that no live buffer owns.
                unsafe { result::free_sync(p) }.map_err(err("cuMemFree"))?;
            }
        }
        self.cached = 0;
        Ok(())
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
    class: usize,
    inner: Arc<Inner>,
    _t: PhantomData<T>,
}

impl<T: DeviceElem> DeviceBuffer<T> {
    /// Uninitialized buffer of `len` elements.
    pub fn uninit(be: &CudaBackend, len: usize) -> CudaResult<Self> {
        be.inner.bind()?;
        let class = size_class(len * std::mem::size_of::<T>());
        let ptr = be.inner.pool.lock().unwrap().alloc(class)?;
        Ok(DeviceBuffer { ptr, len, class, inner: be.inner.clone(), _t: PhantomData })
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
            unsafe { result::memcpy_htod_sync(b.ptr, data) }.map_err(err("cuMemcpyHtoD"))?;
        }
        Ok(b)
    }

    /// Copies the buffer to the host (waits for the queued work that writes it).
    pub fn to_host(&self) -> CudaResult<Vec<T>> {
        self.inner.bind()?;
        let mut out = vec![T::default(); self.len];
        if self.len > 0 {
            // SAFETY: out holds exactly len elements; the copy is synchronous on the default stream.
            unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }.map_err(err("cuMemcpyDtoH"))?;
        }
        Ok(out)
    }

    /// Sets every byte to zero (stream-ordered).
    pub fn fill_zero(&self) -> CudaResult<()> {
        self.inner.bind()?;
        if self.len > 0 {
            // SAFETY: within the block.
            unsafe { result::memset_d8_async(self.ptr, 0, self.bytes(), self.inner.stream) }
                .map_err(err("cuMemsetD8"))?;
        }
        Ok(())
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
        self.inner.pool.lock().unwrap().free(self.ptr, self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }
}
