//! CUDA runtime: device discovery that never panics without a driver (cudarc is
//! built with dynamic loading, so nothing CUDA is needed at build time), one
//! context and one stream per [`CudaBackend`], lazy loading of the embedded kernel
//! images ([`embedded`]: the `sm_90a` SASS on compute capability 9.0, no JIT, with the
//! `sm_90a` PTX as its fallback; the portable `sm_80` PTX elsewhere), a caching allocator that reports current and peak bytes per memory
//! category and turns out-of-memory into an error that says what to change
//! ([`memory`]), and typed launch wrappers per kernel family, each named like its
//! CPU twin in `src/backend/cpu/` and its kernels in `cuda/<family>.cu`.
//!
//! The kernel parameter structs come from `cuda/abi.h` through bindgen ([`abi`]).
//! Activations are bf16 (`half::bf16`), master weights and optimizer state f32.

#[allow(clippy::all)]
pub mod abi;
pub mod attention;
pub mod cublaslt;
pub mod dsa;
pub mod elementwise;
pub mod embedded;
pub mod embedding;
pub mod gemm;
pub mod loss;
pub mod memory;
pub mod moe;
pub mod nccl;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod rope;
pub mod swiglu;
pub mod window_attention;

use cudarc::driver::{result, sys, CudaContext};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use crate::memory::Category;
pub use memory::{check_fits, CategoryScope, CategoryStats, DeviceBuffer, MemoryStats};

pub use embedded::{
    check_cuda_elf, cubin_target, embedded_cubin, embedded_ptx, ptx_target, EMBEDDED_CUBIN, EMBEDDED_PTX,
    KERNEL_FAMILIES, PTX_SOURCE,
};

/// Number of CUDA devices visible through the driver, or an explanation of why none are.
pub fn probe_devices() -> Result<usize, String> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made when it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda) found".into());
    }
    let count = std::panic::catch_unwind(|| {
        cudarc::driver::result::init().map_err(|e| format!("CUDA driver failed to initialize: {e:?}"))?;
        cudarc::driver::result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))
    })
    .map_err(|_| "the CUDA driver library could not be loaded".to_string())??;
    if count <= 0 {
        return Err("the CUDA driver reports no devices".into());
    }
    Ok(count as usize)
}

/// A CUDA error with what was being done.
#[derive(Debug)]
pub struct CudaError(pub String);

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for CudaError {}

pub type CudaResult<T> = Result<T, CudaError>;

pub(crate) fn err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> CudaError + '_ {
    move |e| {
        let detail = format!("{e:?}");
        CudaError(format!("{what}: {detail}{}", trap_hint(&detail)))
    }
}

/// What an illegal-instruction error (a kernel's `trap`, reported at the next synchronizing
/// call, not necessarily by the launch that trapped) most likely means in this crate.
pub fn trap_hint(driver_error: &str) -> &'static str {
    if driver_error.contains("CUDA_ERROR_ILLEGAL_INSTRUCTION") {
        " (a kernel trapped: a bounded spin-wait expired, such as the TMA mbarrier wait of \
         gemm_wgmma_tma_nt_* (try NANOSEEK_WGMMA_NO_TMA=1), or a kernel ran on a target it was not built for; \
         kernels without wgmma print the expired wait on stdout)"
    } else {
        ""
    }
}

/// Raw module / function handles (owned by the context, which outlives them).
#[derive(Clone, Copy)]
struct Handle(*mut c_void);
// SAFETY: CUDA module and function handles may be used from any thread once the context is current.
unsafe impl Send for Handle {}

pub(crate) struct Inner {
    pub(crate) ctx: Arc<CudaContext>,
    /// The legacy default stream: every launch and copy is ordered on it.
    pub(crate) stream: sys::CUstream,
    pub(crate) pool: Mutex<memory::Pool>,
}
// SAFETY: the stream handle is the null (default) stream; all access binds the context first.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Inner {
    pub(crate) fn bind(&self) -> CudaResult<()> {
        self.ctx.bind_to_thread().map_err(err("cuCtxSetCurrent"))
    }
}

/// One CUDA device: context, stream, lazily loaded kernel modules and the caching allocator.
pub struct CudaBackend {
    pub(crate) inner: Arc<Inner>,
    ordinal: usize,
    cc: (i32, i32),
    name: String,
    target: &'static str,
    modules: Mutex<HashMap<&'static str, Handle>>,
    functions: Mutex<HashMap<&'static str, Handle>>,
    /// cuBLASLt handle, workspace and plans, made by the first cuBLASLt GEMM ([`cublaslt`]).
    pub(crate) cublaslt: Mutex<Option<cublaslt::Lt>>,
}

impl CudaBackend {
    /// Opens device `ordinal`. Never panics: without a driver or device it returns the reason.
    pub fn new(ordinal: usize) -> CudaResult<CudaBackend> {
        let n = probe_devices().map_err(CudaError)?;
        if ordinal >= n {
            return Err(CudaError(format!("cuda:{ordinal} requested, {n} device(s) present")));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CudaError("creating the CUDA context panicked".into()))?
            .map_err(err("cuDevicePrimaryCtxRetain"))?;
        let cc = ctx.compute_capability().map_err(err("compute capability"))?;
        if cc.0 < 8 {
            return Err(CudaError(format!("compute capability {}.{} < 8.0 (bf16 tensor cores needed)", cc.0, cc.1)));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let inner = Arc::new(Inner { ctx, stream: std::ptr::null_mut(), pool: Mutex::new(memory::Pool::default()) });
        Ok(CudaBackend {
            inner,
            ordinal,
            cc,
            name,
            target: ptx_target(cc),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            cublaslt: Mutex::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The PTX target this device loads (`sm_90a` or `sm_80`).
    pub fn target(&self) -> &'static str {
        self.target
    }

    /// Current, peak and cached bytes of the caching allocator.
    pub fn memory_stats(&self) -> MemoryStats {
        self.inner.pool.lock().unwrap().stats()
    }

    /// Current and peak bytes per [`Category`], the split at the total's peak, and cached bytes.
    pub fn memory_by_category(&self) -> CategoryStats {
        self.inner.pool.lock().unwrap().acct.by_category()
    }

    /// Starts a new peak window (total and per category) from the current usage.
    pub fn reset_peak(&self) {
        self.inner.pool.lock().unwrap().acct.reset_peak();
    }

    /// Until the guard drops, allocations that name no category count under `cat`
    /// (the default is [`Category::Workspace`]). Guards nest; drop them in reverse order.
    pub fn scoped(&self, cat: Category) -> CategoryScope {
        CategoryScope::new(self, cat)
    }

    /// Counts every live buffer of category `from` under `to` from now on (for owners that
    /// allocated through code that names no category, like the trainer's upload).
    pub fn recategorize(&self, from: Category, to: Category) {
        self.inner.pool.lock().unwrap().recategorize(from, to);
    }

    /// Runs `f` with allocations that name no category counted under `cat`.
    pub fn with_category<R>(&self, cat: Category, f: impl FnOnce() -> R) -> R {
        let _scope = self.scoped(cat);
        f()
    }

    /// Frees every cached (unused) block back to the driver.
    pub fn empty_cache(&self) -> CudaResult<()> {
        self.inner.bind()?;
        self.inner.pool.lock().unwrap().release_cached(&mut memory::CudaDriver).map(|_| ())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.inner.bind()?;
        self.inner.ctx.synchronize().map_err(err("cuCtxSynchronize"))
    }

    /// The kernel `name` of `family`, loading the family's module on first use.
    fn function(&self, family: &'static str, name: &'static str) -> CudaResult<sys::CUfunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.0 as sys::CUfunction);
        }
        self.inner.bind()?;
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(family) {
                Some(m) => m.0 as sys::CUmodule,
                None => {
                    let m = self.load_module(family)?;
                    mods.insert(family, Handle(m as *mut c_void));
                    m
                }
            }
        };
        let cname = CString::new(name).unwrap();
        // SAFETY: the module was loaded above and is never unloaded while the backend lives.
        let f = unsafe { result::module::get_function(module, cname) }.map_err(err(name))?;
        self.functions.lock().unwrap().insert(name, Handle(f as *mut c_void));
        Ok(f)
    }

    /// Loads `family`'s module: its embedded cubin where this device has one (no JIT), else, or
    /// when the driver rejects the cubin (one line on stderr), its PTX for [`Self::target`].
    fn load_module(&self, family: &str) -> CudaResult<sys::CUmodule> {
        if let Some(target) = cubin_target(self.compute_capability()) {
            let loaded = embedded_cubin(family, target).and_then(|image| {
                // SAFETY: a complete ELF image (checked header) that outlives the call; the driver copies it.
                unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                    .map_err(err(&format!("loading the {family} cubin ({target})")))
            });
            match loaded {
                Ok(m) => return Ok(m),
                Err(e) => eprintln!("nanoseek: {e}; falling back to the {family} PTX ({}), JIT-compiled", self.target),
            }
        }
        let ptx = embedded_ptx(family, self.target)?;
        let src = CString::new(ptx).map_err(err("PTX text"))?;
        // SAFETY: a NUL-terminated PTX string; the module lives as long as the context.
        unsafe { result::module::load_data(src.as_ptr() as *const c_void) }
            .map_err(err(&format!("loading the {family} PTX ({})", self.target)))
    }

    /// Launches `family::name` with the single by-value parameter struct `params`.
    pub(crate) fn launch<P: Copy>(
        &self,
        family: &'static str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        params: &P,
    ) -> CudaResult<()> {
        let f = self.function(family, name)?;
        self.inner.bind()?;
        if smem > 48 * 1024 {
            // Dynamic shared memory above 48 KiB must be opted into per function.
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            // SAFETY: `f` is a function of a loaded module; the driver checks the size against the device.
            unsafe { result::function::set_function_attribute(f, attr, smem as i32) }.map_err(err(name))?;
        }
        let mut p = *params;
        let mut args = [&mut p as *mut P as *mut c_void];
        // SAFETY: the kernel takes exactly one parameter of type P (cuda/abi.h, checked by bindgen's
        // layout tests), and every device address in it was checked by the typed wrapper.
        unsafe { result::launch_kernel(f, grid, (block, 1, 1), smem, self.inner.stream, &mut args) }.map_err(err(name))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.inner.bind().is_ok() {
            let _ = self.inner.ctx.synchronize();
            for (_, m) in self.modules.lock().unwrap().drain() {
                // SAFETY: loaded by `function`, no launch can use it any more.
                let _ = unsafe { result::module::unload(m.0 as sys::CUmodule) };
            }
        }
    }
}

/// Blocks for a grid-stride kernel over n elements (at most 8 per SM-ish, capped).
pub(crate) fn grid_for(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).clamp(1, 65_535) as u32
}

/// Checks a dimension fits the kernels' 32-bit int fields.
pub(crate) fn int(v: usize, what: &str) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| CudaError(format!("{what} = {v} does not fit in 32 bits")))
}

pub(crate) fn check(cond: bool, msg: impl FnOnce() -> String) -> CudaResult<()> {
    if cond {
        Ok(())
    } else {
        Err(CudaError(msg()))
    }
}
