//! Launch code of `cuda/rope.cu` (twin: `cpu::rope`): q and k rotated in one pass, and the
//! QK-norm fused with RoPE (`rope_qknorm_{fwd,bwd}_bf16`, twin: `cpu::rope::rope_qknorm_*`).

use super::abi::{NsRopeParams, NsRopeQkNormParams};
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
use crate::backend::cpu::norm::RMS_EPS;
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

/// [`rope`] of one tensor x [b, t, h, d] into `out` (the kernel with no k heads).
pub fn rope_one(
    be: &CudaBackend,
    table: &RopeTableGpu,
    x: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    (b, t, h): (usize, usize, usize),
    inverse: bool,
) -> CudaResult<()> {
    launch(be, table, [x.ptr(), 0, out.ptr(), 0], [x.len(), 0, out.len(), 0], (b, t, h, 0), inverse)
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

/// Warps (one (token row, head) each) per block of `rope_qknorm_{fwd,bwd}_bf16` (`QK_WARPS`).
const QK_WARPS: usize = 8;
/// The largest head dim of the fused kernels: d/2 ≤ 64·`QK_MAXJ` (`QK_MAXJ` = 4 in rope.cu).
pub const QKNORM_MAX_HEAD_DIM: usize = 512;

/// The parameters shared by both directions (every length checked) and the grid.
fn qknorm_params(
    table: &RopeTableGpu,
    (b, t, h, h_kv): (usize, usize, usize, usize),
    q_lens: [usize; 3],
    k_lens: [usize; 3],
    rstd_lens: [usize; 2],
) -> CudaResult<(NsRopeQkNormParams, u32)> {
    let d = table.head_dim;
    // RopeTableGpu::new already requires d % 16 == 0 (aligned bf16x2 and float2 accesses).
    check(d > 0 && d <= QKNORM_MAX_HEAD_DIM, || {
        format!("rope_qknorm: head_dim {d} must be in 16..={QKNORM_MAX_HEAD_DIM} on CUDA")
    })?;
    check(t <= table.max_t, || format!("rope_qknorm: sequence length {t} exceeds the table's {}", table.max_t))?;
    let (nq, nk) = (b * t * h * d, b * t * h_kv * d);
    check(q_lens.iter().all(|&l| l == nq), || {
        format!("rope_qknorm: the q tensors must be [b, t, h, d] = {nq} values")
    })?;
    check(k_lens.iter().all(|&l| l == nk), || {
        format!("rope_qknorm: the k tensors must be [b, t, h_kv, d] = {nk} values")
    })?;
    check(rstd_lens == [b * t * h, b * t * h_kv], || "rope_qknorm: rstd_q must be [b·t·h], rstd_k [b·t·h_kv]".into())?;
    // One warp per (row, head); the kernel indexes items in 64 bits, but their count must fit an int.
    let items = b * t * (h + h_kv);
    int(items, "rope_qknorm rows·(h + h_kv)")?;
    let p = NsRopeQkNormParams {
        cos: table.cos.ptr(),
        sin: table.sin.ptr(),
        rows: int(b * t, "rope_qknorm rows")?,
        t: int(t, "t")?,
        h: int(h, "h")?,
        h_kv: int(h_kv, "h_kv")?,
        d: int(d, "d")?,
        eps: RMS_EPS,
        ..Default::default()
    };
    Ok((p, items.div_ceil(QK_WARPS) as u32))
}

/// QK-norm fused with RoPE, forward: every head of q_raw [b, t, h, d] and k_raw [b, t, h_kv, d]
/// RMS-normalized (eps `RMS_EPS`, no weight) and rotated → q, k (bf16, same shapes), with the
/// per-head 1/rms in rstd_q [b·t·h] and rstd_k [b·t·h_kv] (f32) for the backward. One launch.
#[allow(clippy::too_many_arguments)]
pub fn rope_qknorm_forward(
    be: &CudaBackend,
    table: &RopeTableGpu,
    q_raw: &DeviceBuffer<bf16>,
    k_raw: &DeviceBuffer<bf16>,
    dims: (usize, usize, usize, usize),
    q: &DeviceBuffer<bf16>,
    k: &DeviceBuffer<bf16>,
    rstd_q: &DeviceBuffer<f32>,
    rstd_k: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (mut p, blocks) = qknorm_params(
        table,
        dims,
        [q_raw.len(), q.len(), q_raw.len()],
        [k_raw.len(), k.len(), k_raw.len()],
        [rstd_q.len(), rstd_k.len()],
    )?;
    (p.q_raw, p.k_raw, p.q, p.k, p.rstd_q, p.rstd_k) =
        (q_raw.ptr(), k_raw.ptr(), q.ptr(), k.ptr(), rstd_q.ptr(), rstd_k.ptr());
    if blocks == 0 {
        return Ok(());
    }
    be.launch("rope", "rope_qknorm_fwd_bf16", (blocks, 1, 1), (QK_WARPS * 32) as u32, 0, &p)
}

/// QK-norm fused with RoPE, backward: from q_raw, k_raw, the forward's rstd_q, rstd_k and dq, dk
/// (gradients with respect to the rotated q, k) → dq_raw, dk_raw (bf16, shapes of q_raw, k_raw).
/// One launch: the inverse rotation and the RMSNorm backward of every head.
#[allow(clippy::too_many_arguments)]
pub fn rope_qknorm_backward(
    be: &CudaBackend,
    table: &RopeTableGpu,
    q_raw: &DeviceBuffer<bf16>,
    k_raw: &DeviceBuffer<bf16>,
    rstd_q: &DeviceBuffer<f32>,
    rstd_k: &DeviceBuffer<f32>,
    dq: &DeviceBuffer<bf16>,
    dk: &DeviceBuffer<bf16>,
    dims: (usize, usize, usize, usize),
    dq_raw: &DeviceBuffer<bf16>,
    dk_raw: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let (mut p, blocks) = qknorm_params(
        table,
        dims,
        [q_raw.len(), dq.len(), dq_raw.len()],
        [k_raw.len(), dk.len(), dk_raw.len()],
        [rstd_q.len(), rstd_k.len()],
    )?;
    (p.q_raw, p.k_raw, p.rstd_q, p.rstd_k) = (q_raw.ptr(), k_raw.ptr(), rstd_q.ptr(), rstd_k.ptr());
    (p.dq, p.dk, p.dq_raw, p.dk_raw) = (dq.ptr(), dk.ptr(), dq_raw.ptr(), dk_raw.ptr());
    if blocks == 0 {
        return Ok(());
    }
    be.launch("rope", "rope_qknorm_bwd_bf16", (blocks, 1, 1), (QK_WARPS * 32) as u32, 0, &p)
}

/// [`rope_qknorm_forward`] of one tensor x [b, t, h, d] (no k heads): y and rstd [b·t·h].
pub fn rope_qknorm_one_forward(
    be: &CudaBackend,
    table: &RopeTableGpu,
    x: &DeviceBuffer<bf16>,
    (b, t, h): (usize, usize, usize),
    y: &DeviceBuffer<bf16>,
    rstd: &DeviceBuffer<f32>,
) -> CudaResult<()> {
    let (mut p, blocks) = qknorm_params(table, (b, t, h, 0), [x.len(), y.len(), x.len()], [0; 3], [rstd.len(), 0])?;
    (p.q_raw, p.q, p.rstd_q) = (x.ptr(), y.ptr(), rstd.ptr());
    if blocks == 0 {
        return Ok(());
    }
    be.launch("rope", "rope_qknorm_fwd_bf16", (blocks, 1, 1), (QK_WARPS * 32) as u32, 0, &p)
}

/// [`rope_qknorm_backward`] of one tensor: dx from x, its rstd and dy.
pub fn rope_qknorm_one_backward(
    be: &CudaBackend,
    table: &RopeTableGpu,
    x: &DeviceBuffer<bf16>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<bf16>,
    (b, t, h): (usize, usize, usize),
    dx: &DeviceBuffer<bf16>,
) -> CudaResult<()> {
    let (mut p, blocks) = qknorm_params(table, (b, t, h, 0), [x.len(), dy.len(), dx.len()], [0; 3], [rstd.len(), 0])?;
    (p.q_raw, p.rstd_q, p.dq, p.dq_raw) = (x.ptr(), rstd.ptr(), dy.ptr(), dx.ptr());
    if blocks == 0 {
        return Ok(());
    }
    be.launch("rope", "rope_qknorm_bwd_bf16", (blocks, 1, 1), (QK_WARPS * 32) as u32, 0, &p)
}
