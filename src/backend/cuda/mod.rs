//! CUDA runtime. Today: driver discovery that never panics when no driver is
//! installed (cudarc is built with dynamic loading, so nothing CUDA is needed
//! at build time). The kernels, allocator and launch code for the dense model
//! arrive with the CUDA backend issue; until then training runs on the CPU.

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

// The PTX committed in `ptx/`, embedded by build.rs (empty until the CUDA kernels land).
include!(concat!(env!("OUT_DIR"), "/embedded_ptx.rs"));
