//! Launch code of `cuda/elementwise.cu` (twin: `cpu::elementwise`): out = α·a + β·b on bf16.

use super::abi::NsElementwiseParams;
use super::{check, grid_for, CudaBackend, CudaResult, DeviceBuffer};
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
