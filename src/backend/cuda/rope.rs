//! Launch code of `cuda/rope.cu` (twin: `cpu::rope`): q and k rotated in one pass.

use super::abi::NsRopeParams;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use half::bf16;

/// The cos/sin table on the device: the same f32 values as `cpu::rope::RopeTable`
/// (t·θ^(−2i/d) evaluated in f64, then rounded to f32).
pub struct RopeTableGpu {
    pub head_dim: usize,
    pub max_t: usize,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
}

impl RopeTableGpu {
    pub fn new(be: &CudaBackend, head_dim: usize, max_t: usize, theta: f64) -> CudaResult<Self> {
        check(head_dim % 16 == 0, || format!("rope: head_dim {head_dim} must be a multiple of 16 on CUDA"))?;
        let half = head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(max_t * half), Vec::with_capacity(max_t * half));
        for t in 0..max_t {
            for i in 0..half {
                let angle = t as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeTableGpu {
            head_dim,
            max_t,
            cos: DeviceBuffer::from_host(be, &cos)?,
            sin: DeviceBuffer::from_host(be, &sin)?,
        })
    }
}

/// Rotates q ([b, t, h, d]) into q_out and k ([b, t, h_kv, d]) into k_out; `inverse`
/// is the backward. Passing the same buffers as input and output is allowed only
/// through [`rope_inplace`].
#[allow(clippy::too_many_arguments)]
pub fn rope(
    be: &CudaBackend,
    table: &RopeTableGpu,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    q_out: &DeviceBuffer<bf16>,
    k_out: &DeviceBuffer<bf16>,
    (b, t, h, h_kv): (usize, usize, usize, usize),
    inverse: bool,
) -> CudaResult<()> {
    launch(
        be,
        table,
        [q.ptr(), k.ptr(), q_out.ptr(), k_out.ptr()],
        [q.len(), k.len(), q_out.len(), k_out.len()],
        (b, t, h, h_kv),
        inverse,
    )
}

/// [`rope`] in place on q and k.
pub fn rope_inplace(
    be: &CudaBackend,
    table: &RopeTableGpu,
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    dims: (usize, usize, usize, usize),
    inverse: bool,
) -> CudaResult<()> {
    launch(be, table, [q.ptr(), k.ptr(), q.ptr(), k.ptr()], [q.len(), k.len(), q.len(), k.len()], dims, inverse)
}

fn launch(
    be: &CudaBackend,
    table: &RopeTableGpu,
    ptrs: [u64; 4],
    lens: [usize; 4],
    (b, t, h, h_kv): (usize, usize, usize, usize),
    inverse: bool,
) -> CudaResult<()> {
    let d = table.head_dim;
    check(t <= table.max_t, || format!("rope: sequence length {t} exceeds the table's {}", table.max_t))?;
    check(lens[0] == b * t * h * d && lens[2] == lens[0], || "rope: q and q_out must be [b, t, h, d]".into())?;
    check(lens[1] == b * t * h_kv * d && lens[3] == lens[1], || "rope: k and k_out must be [b, t, h_kv, d]".into())?;
    if b * t == 0 {
        return Ok(());
    }
    let p = NsRopeParams {
        q_in: ptrs[0],
        k_in: ptrs[1],
        q_out: ptrs[2],
        k_out: ptrs[3],
        cos: table.cos.ptr(),
        sin: table.sin.ptr(),
        rows: int(b * t, "rope rows")?,
        t: int(t, "t")?,
        h: int(h, "h")?,
        h_kv: int(h_kv, "h_kv")?,
        d: int(d, "d")?,
        inverse: inverse as i32,
    };
    be.launch("rope", "rope_bf16", (p.rows as u32, 1, 1), 128, 0, &p)
}
