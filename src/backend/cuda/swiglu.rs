//! Launch code of `cuda/swiglu.cu` (twin: `cpu::swiglu`): y = silu(g) ∘ u and its backward.

use super::abi::NsSwigluParams;
use super::{check, grid_for, CudaBackend, CudaResult, DeviceBuffer};
use half::bf16;

pub fn swiglu_forward(
    be: &CudaBackend,
    g: &DeviceBuffer<bf16>,
    u: &DeviceBuffer<bf16>,
    y: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    check(g.len() == u.len() && y.len() == g.len(), || "swiglu_forward: length mismatch".into())?;
    let p = NsSwigluParams { g: g.ptr(), u: u.ptr(), y: y.ptr(), n: g.len() as i64, ..Default::default() };
    be.launch("swiglu", "swiglu_fwd_bf16", (grid_for(g.len(), 256 * 8), 1, 1), 256, 0, &p)
}

pub fn swiglu_backward(
    be: &CudaBackend,
    g: &DeviceBuffer<bf16>,
    u: &DeviceBuffer<bf16>,
    dy: &DeviceBuffer<bf16>,
    dg: &DeviceBuffer<bf16>,
    du: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let n = g.len();
    check(u.len() == n && dy.len() == n && dg.len() == n && du.len() == n, || {
        "swiglu_backward: length mismatch".into()
    })?;
    let p = NsSwigluParams {
        g: g.ptr(),
        u: u.ptr(),
        dy: dy.ptr(),
        dg: dg.ptr(),
        du: du.ptr(),
        n: n as i64,
        ..Default::default()
    };
    be.launch("swiglu", "swiglu_bwd_bf16", (grid_for(n, 256 * 8), 1, 1), 256, 0, &p)
}
