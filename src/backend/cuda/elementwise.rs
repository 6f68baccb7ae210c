//! Launch code of `cuda/elementwise.cu` (twin: `cpu::elementwise`): out = α·a + β·b on bf16.

use super::abi::NsElementwiseParams;
use super::{check, grid_for, CudaBackend, CudaResult, DeviceBuffer};
use cudarc::driver::sys;
use half::bf16;

/// out = α·a + β·b (`b` None: out = α·a), all bf16 of one length, f32 arithmetic; `out` may be
/// the same buffer as `a` or `b` (pass its reference twice).
pub fn axpby(
    be: &CudaBackend,
    alpha: f32,
    a: &DeviceBuffer<bf16>,
    beta: f32,
    b: Option<&DeviceBuffer<bf16>>,
    out: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let n = a.len();
    check(out.len() == n && b.is_none_or(|b| b.len() == n), || "axpby: length mismatch".into())?;
    if n == 0 {
        return Ok(());
    }
    let p = NsElementwiseParams { a: a.ptr(), b: b.map_or(0, |b| b.ptr()), out: out.ptr(), n: n as i64, alpha, beta };
    be.launch("elementwise", "axpby_bf16", (grid_for(n, 256 * 8), 1, 1), 256, 0, &p)
}

/// out = a + b (the residual add).
pub fn add(
    be: &CudaBackend,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    axpby(be, 1.0, a, 1.0, Some(b), out)
}

/// Copies a block of `rows × width` bf16 values between row-major matrices of other widths:
/// `dst[r·dst_cols + dst_off + c] = src[r·src_cols + src_off + c]` (the twin of
/// `cpu::elementwise::copy_cols`): one stream-ordered 2-D copy by the driver, no kernel.
pub fn copy_cols(
    be: &CudaBackend,
    src: &DeviceBuffer<bf16>,
    (src_cols, src_off): (usize, usize),
    dst: &DeviceBuffer<bf16>,
    (dst_cols, dst_off): (usize, usize),
    rows: usize,
    width: usize,
) -> CudaResult<()> {
    check(src_off + width <= src_cols && dst_off + width <= dst_cols, || "copy_cols: block outside a row".into())?;
    check(src.len() >= rows * src_cols && dst.len() >= rows * dst_cols, || "copy_cols: too few rows".into())?;
    if width == 0 || rows == 0 {
        return Ok(());
    }
    be.inner.bind()?;
    let e = std::mem::size_of::<bf16>();
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: src_off * e,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src.ptr(),
        srcArray: std::ptr::null_mut(),
        srcPitch: src_cols * e,
        dstXInBytes: dst_off * e,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst.ptr(),
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_cols * e,
        WidthInBytes: width * e,
        Height: rows,
    };
    // SAFETY: both blocks lie within their buffers (checked above); the copy is ordered on the
    // backend's stream like every launch.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, be.inner.stream) }.result().map_err(super::err("cuMemcpy2DAsync"))
}
