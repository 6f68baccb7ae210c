//! Launch code of `cuda/embedding.cu` (twin: `cpu::embedding`).

use super::abi::NsEmbeddingParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use half::bf16;

/// out[i, :] = table[ids[i], :]: table f32 [vocab, dim] → out bf16 [n, dim].
/// `ids` must already be checked to be < vocab (as for the CPU twin).
pub fn embedding_forward(
    be: &CudaBackend,
    table: &DeviceBuffer<f32>,
    dim: usize,
    ids: &DeviceBuffer<u32>,
    out: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    check(out.len() == ids.len() * dim && table.len() % dim.max(1) == 0, || "embedding_forward: bad sizes".into())?;
    let p = NsEmbeddingParams {
        table: table.ptr(),
        ids: ids.ptr(),
        out: out.ptr(),
        n: int(ids.len(), "n")?,
        dim: int(dim, "dim")?,
        ..Default::default()
    };
    if ids.is_empty() {
        return Ok(());
    }
    be.launch("embedding", "embedding_fwd_bf16", (p.n as u32, 1, 1), 128, 0, &p)
}

/// dtable[ids[i]] += dout[i] (f32 atomics; dtable is accumulated, not overwritten).
pub fn embedding_backward(
    be: &CudaBackend,
    dout: &DeviceBuffer<bf16>,
    dim: usize,
    ids: &DeviceBuffer<u32>,
    dtable: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    check(dout.len() == ids.len() * dim && dtable.len() % dim.max(1) == 0, || "embedding_backward: bad sizes".into())?;
    let p = NsEmbeddingParams {
        ids: ids.ptr(),
        dout: dout.ptr(),
        dtable: dtable.ptr(),
        n: int(ids.len(), "n")?,
        dim: int(dim, "dim")?,
        ..Default::default()
    };
    if ids.is_empty() {
        return Ok(());
    }
    be.launch("embedding", "embedding_bwd_bf16", (p.n as u32, 1, 1), 128, 0, &p)
}
