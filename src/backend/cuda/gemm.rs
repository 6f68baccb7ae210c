//! Launch code of `cuda/gemm.cu` (twin: `cpu::gemm`): C = α·op(A)·op(B) + β·C with bf16
//! operands, fp32 tensor-core accumulation and an f32 or bf16 C, batched.
//!
//! [`gemm`] and [`gemm_batched`] follow a process-wide engine switch ([`set_gemm_engine`],
//! `--gemm native|cublaslt|wgmma`): the handwritten mma.sync kernel (default), cuBLASLt
//! ([`super::cublaslt`]) or the handwritten Hopper wgmma kernel (compute capability 9.0 only;
//! [`wgmma_gemm_batched`]), so every caller, the trainer included, changes engine without changes.
//! [`gemm_fused`] adds the fused epilogues (the residual add, SwiGLU) on the same engines, and
//! [`gemm_swiglu_backward`] SwiGLU's backward.

use super::abi::{NsGemmParams, NsGemmTmaParams};
use super::memory::DeviceElem;
use super::{check, int, CudaBackend, CudaResult, DeviceBuffer};
pub use crate::backend::cpu::gemm::Layout;
use half::bf16;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation [`gemm`] and [`gemm_batched`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmEngine {
    /// The handwritten `cuda/gemm.cu`.
    Native,
    /// cuBLASLt, loaded at run time ([`super::cublaslt`]).
    Cublaslt,
    /// The handwritten sm_90a `gemm_wgmma_*` kernels of `cuda/gemm.cu` (compute capability 9.0;
    /// an error elsewhere), falling back to the native kernel for small shapes.
    Wgmma,
}

impl GemmEngine {
    pub fn name(self) -> &'static str {
        match self {
            GemmEngine::Native => "native",
            GemmEngine::Cublaslt => "cublaslt",
            GemmEngine::Wgmma => "wgmma",
        }
    }
}

impl std::str::FromStr for GemmEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(GemmEngine::Native),
            "cublaslt" => Ok(GemmEngine::Cublaslt),
            "wgmma" => Ok(GemmEngine::Wgmma),
            _ => Err(format!("unknown GEMM engine {s:?}: expected native, cublaslt or wgmma")),
        }
    }
}

static ENGINE: AtomicU8 = AtomicU8::new(0);

/// Selects the engine of every later [`gemm`] / [`gemm_batched`] call in the process. Selecting
/// cuBLASLt fails (and leaves the engine as it was) when its library cannot be loaded; wgmma is
/// checked per call (each GEMM on a device that is not compute capability 9.0 is an error).
pub fn set_gemm_engine(engine: GemmEngine) -> CudaResult<()> {
    if engine == GemmEngine::Cublaslt {
        super::cublaslt::available()?;
    }
    ENGINE.store(engine as u8, Ordering::Relaxed);
    Ok(())
}

/// The engine [`gemm`] and [`gemm_batched`] run now.
pub fn gemm_engine() -> GemmEngine {
    match ENGINE.load(Ordering::Relaxed) {
        x if x == GemmEngine::Cublaslt as u8 => GemmEngine::Cublaslt,
        x if x == GemmEngine::Wgmma as u8 => GemmEngine::Wgmma,
        _ => GemmEngine::Native,
    }
}

/// Output element types of the GEMM.
pub trait GemmOut: DeviceElem {
    const BF16: bool;
}
impl GemmOut for f32 {
    const BF16: bool = false;
}
impl GemmOut for bf16 {
    const BF16: bool = true;
}

const TILE: u32 = 128;

fn kernel(la: Layout, lb: Layout, bf16_out: bool) -> &'static str {
    use Layout::{N, T};
    match (la, lb, bf16_out) {
        (N, N, false) => "gemm_nn_f32",
        (N, T, false) => "gemm_nt_f32",
        (T, N, false) => "gemm_tn_f32",
        (T, T, false) => "gemm_tt_f32",
        (N, N, true) => "gemm_nn_bf16",
        (N, T, true) => "gemm_nt_bf16",
        (T, N, true) => "gemm_tn_bf16",
        (T, T, true) => "gemm_tt_bf16",
    }
}

/// C[m,n] = α·A·B + β·C (β = 0 never reads C). Layouts as `cpu::gemm`: A is [m,k] (N) or
/// [k,m] (T), B is [k,n] (N) or [n,k] (T). The contiguous dimension of each stored operand
/// must be a multiple of 8 (16-byte rows): k always, m when A is T, n when B is N.
#[allow(clippy::too_many_arguments)]
pub fn gemm<C: GemmOut>(
    be: &CudaBackend,
    m: usize,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
    alpha: f32,
    beta: f32,
) -> CudaResult<()> {
    gemm_batched(be, 1, m, n, k, a, la, b, lb, c, alpha, beta)
}

/// `batch` independent products over consecutive [m,k]/[k,n]/[m,n] matrices of a, b and c,
/// on the engine chosen by [`set_gemm_engine`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched<C: GemmOut>(
    be: &CudaBackend,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
    alpha: f32,
    beta: f32,
) -> CudaResult<()> {
    match gemm_engine() {
        GemmEngine::Native => native_gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
        GemmEngine::Cublaslt => super::cublaslt::gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
        GemmEngine::Wgmma => wgmma_gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta),
    }
}

/// The shape contract shared by both engines (see [`gemm`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_shapes<C: GemmOut>(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
) -> CudaResult<()> {
    check(c.len() == batch * m * n, || format!("gemm: C must hold batch*m*n = {batch}*{m}*{n} values"))?;
    check_operands(batch, m, n, k, (a, la), (b, lb))
}

/// The shape contract on A and B alone (see [`gemm`]).
fn check_operands(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    (a, la): (&DeviceBuffer<bf16>, Layout),
    (b, lb): (&DeviceBuffer<bf16>, Layout),
) -> CudaResult<()> {
    check(a.len() == batch * m * k, || format!("gemm: A must hold batch*m*k = {batch}*{m}*{k} values"))?;
    check(b.len() == batch * k * n, || format!("gemm: B must hold batch*k*n = {batch}*{k}*{n} values"))?;
    check(k % 8 == 0, || format!("gemm: k = {k} must be a multiple of 8 on CUDA"))?;
    check(la == Layout::N || m % 8 == 0, || format!("gemm: m = {m} must be a multiple of 8 when A is transposed"))?;
    check(lb == Layout::T || n % 8 == 0, || format!("gemm: n = {n} must be a multiple of 8 when B is not transposed"))
}

/// [`gemm_batched`] on the handwritten kernel, whatever the engine switch says (the bench times
/// both engines side by side).
#[allow(clippy::too_many_arguments)]
pub fn native_gemm_batched<C: GemmOut>(
    be: &CudaBackend,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
    alpha: f32,
    beta: f32,
) -> CudaResult<()> {
    check_shapes(batch, m, n, k, a, la, b, lb, c)?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let p = params((batch, m, n, k), (a, la), (b, lb), c.ptr(), (alpha, beta))?;
    launch_native(be, &p, kernel(la, lb, C::BF16))
}

/// The kernel parameters of a contiguous batched product (no fused epilogue: the `resid`,
/// `gate` and `act` fields are 0).
fn params(
    (batch, m, n, k): (usize, usize, usize, usize),
    (a, la): (&DeviceBuffer<bf16>, Layout),
    (b, lb): (&DeviceBuffer<bf16>, Layout),
    c: u64,
    (alpha, beta): (f32, f32),
) -> CudaResult<NsGemmParams> {
    Ok(NsGemmParams {
        a: a.ptr(),
        b: b.ptr(),
        c,
        m: int(m, "m")?,
        n: int(n, "n")?,
        k: int(k, "k")?,
        lda: int(if la == Layout::N { k } else { m }, "lda")?,
        ldb: int(if lb == Layout::N { n } else { k }, "ldb")?,
        ldc: int(n, "ldc")?,
        stride_a: (m * k) as i64,
        stride_b: (k * n) as i64,
        stride_c: (m * n) as i64,
        batch: int(batch, "batch")?,
        alpha,
        beta,
        ..Default::default()
    })
}

/// Block tile 128x128 (grid x over n, y over m), batch on z: the grid of every GEMM kernel.
fn grid(p: &NsGemmParams) -> (u32, u32, u32) {
    ((p.n as u32).div_ceil(TILE), (p.m as u32).div_ceil(TILE), p.batch as u32)
}

fn launch_native(be: &CudaBackend, p: &NsGemmParams, name: &'static str) -> CudaResult<()> {
    be.launch("gemm", name, grid(p), 256, 0, p)
}

/// A fused epilogue of [`gemm_fused`]: what the GEMM kernels do with each value v of the
/// product x·wᵀ before it leaves the registers (the `resid`, `gate` and `act` fields of
/// `NsGemmParams`). Every buffer holds m·n bf16 values laid out like the product.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// out = v + resid: the bias-free residual add after an output projection. `resid` may be
    /// `out` itself (each element is read before it is written).
    Residual { resid: &'a DeviceBuffer<bf16>, out: &'a DeviceBuffer<bf16> },
    /// act = silu(gate) ⊙ v: SwiGLU with the product as its "up" half (v taken before rounding);
    /// `up`, when given, also receives v (the backward needs it, inference does not). `up`
    /// must not alias `gate` or `act`.
    SwiGlu { gate: &'a DeviceBuffer<bf16>, act: &'a DeviceBuffer<bf16>, up: Option<&'a DeviceBuffer<bf16>> },
}

impl Epilogue<'_> {
    /// The kernels (native, wgmma with TMA, wgmma with cp.async) that fuse this epilogue.
    fn kernels(&self) -> [&'static str; 3] {
        match self {
            Epilogue::Residual { .. } => {
                ["gemm_nt_bf16_residual", "gemm_wgmma_tma_nt_bf16_residual", "gemm_wgmma_nt_bf16_residual"]
            }
            Epilogue::SwiGlu { .. } => {
                ["gemm_nt_bf16_swiglu", "gemm_wgmma_tma_nt_bf16_swiglu", "gemm_wgmma_nt_bf16_swiglu"]
            }
        }
    }
}

/// The linear layer x[m,k]·w[n,k]ᵀ (bf16, f32 accumulation; k a multiple of 8, as [`gemm`]
/// requires of NT) finished by a fused [`Epilogue`] in the same kernel, on the engine of
/// [`set_gemm_engine`]: the native and wgmma kernels apply it in their epilogue; cuBLASLt (which
/// has no SwiGLU epilogue) runs the product and then one element-wise kernel. Twin:
/// `cpu::gemm::gemm_fused`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused(
    be: &CudaBackend,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<bf16>,
    w: &DeviceBuffer<bf16>,
    epi: Epilogue,
) -> CudaResult<()> {
    gemm_fused_on(be, gemm_engine(), m, n, k, x, w, epi)
}

/// [`gemm_fused`] on the given engine, whatever the engine switch says (the tests and the bench
/// run every engine side by side).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused_on(
    be: &CudaBackend,
    engine: GemmEngine,
    m: usize,
    n: usize,
    k: usize,
    x: &DeviceBuffer<bf16>,
    w: &DeviceBuffer<bf16>,
    epi: Epilogue,
) -> CudaResult<()> {
    let mn = m * n;
    let sized = |what: &str, buf: &DeviceBuffer<bf16>| {
        check(buf.len() == mn, || format!("gemm_fused: {what} must hold m*n = {m}*{n} values, not {}", buf.len()))
    };
    let (c, resid, gate, act) = match epi {
        Epilogue::Residual { resid, out } => {
            sized("resid", resid)?;
            sized("out", out)?;
            (out.ptr(), resid.ptr(), 0, 0)
        }
        Epilogue::SwiGlu { gate, act, up } => {
            sized("gate", gate)?;
            sized("act", act)?;
            if let Some(up) = up {
                sized("up", up)?;
                check(up.ptr() != gate.ptr() && up.ptr() != act.ptr(), || {
                    "gemm_fused: up must not alias gate or act".into()
                })?;
            }
            (up.map_or(0, |u| u.ptr()), 0, gate.ptr(), act.ptr())
        }
    };
    let (x, w) = ((x, Layout::N), (w, Layout::T));
    check_operands(1, m, n, k, x, w)?;
    if mn == 0 {
        return Ok(());
    }
    if engine == GemmEngine::Cublaslt {
        return cublaslt_fused(be, (m, n, k), x, w, epi);
    }
    let mut p = params((1, m, n, k), x, w, c, (1.0, 0.0))?;
    (p.resid, p.gate, p.act) = (resid, gate, act);
    let [native, tma_nt, wgmma_nt] = epi.kernels();
    if engine == GemmEngine::Wgmma {
        check_wgmma_device(be)?;
        if wgmma_handles(m, n, k) {
            return launch_wgmma(be, p, x, w, (tma_nt, wgmma_nt));
        }
    }
    launch_native(be, &p, native)
}

/// SwiGLU's backward fused into the GEMM that produces its incoming gradient: da = dy[m,k]·w[k,n]
/// (both as stored: the `linear_dx` of a down projection, w_down [k = model width, n = hidden])
/// is never stored; each value goes straight to dgate = da ⊙ up ⊙ s(1 + gate(1 − s)) and
/// dup = da ⊙ gate ⊙ s with s = sigmoid(gate), the math of `swiglu::swiglu_backward`. Every
/// buffer holds m·n bf16 values; n must be a multiple of 8 (NN). On the engine of
/// [`set_gemm_engine`]; cuBLASLt runs the product, then the SwiGLU backward kernel. Twin:
/// `cpu::gemm::gemm_swiglu_backward`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_swiglu_backward(
    be: &CudaBackend,
    m: usize,
    n: usize,
    k: usize,
    dy: &DeviceBuffer<bf16>,
    w: &DeviceBuffer<bf16>,
    inputs: (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
    grads: (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
) -> CudaResult<()> {
    gemm_swiglu_backward_on(be, gemm_engine(), m, n, k, dy, w, inputs, grads)
}

/// [`gemm_swiglu_backward`] on the given engine, whatever the engine switch says.
#[allow(clippy::too_many_arguments)]
pub fn gemm_swiglu_backward_on(
    be: &CudaBackend,
    engine: GemmEngine,
    m: usize,
    n: usize,
    k: usize,
    dy: &DeviceBuffer<bf16>,
    w: &DeviceBuffer<bf16>,
    (gate, up): (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
    (dgate, dup): (&DeviceBuffer<bf16>, &DeviceBuffer<bf16>),
) -> CudaResult<()> {
    let mn = m * n;
    for (what, buf) in [("gate", gate), ("up", up), ("dgate", dgate), ("dup", dup)] {
        check(buf.len() == mn, || {
            format!("gemm_swiglu_backward: {what} must hold m*n = {m}*{n} values, not {}", buf.len())
        })?;
    }
    check(dgate.ptr() != dup.ptr(), || "gemm_swiglu_backward: dgate and dup must be different buffers".into())?;
    let (dy, w) = ((dy, Layout::N), (w, Layout::N));
    check_operands(1, m, n, k, dy, w)?;
    if mn == 0 {
        return Ok(());
    }
    if engine == GemmEngine::Cublaslt {
        let da = DeviceBuffer::uninit(be, mn)?;
        super::cublaslt::gemm(be, m, n, k, dy.0, dy.1, w.0, w.1, &da, 1.0, 0.0)?;
        return super::swiglu::swiglu_backward(be, gate, up, &da, dgate, dup);
    }
    let mut p = params((1, m, n, k), dy, w, dgate.ptr(), (1.0, 0.0))?;
    (p.gate, p.up, p.dup) = (gate.ptr(), up.ptr(), dup.ptr());
    if engine == GemmEngine::Wgmma {
        check_wgmma_device(be)?;
        if wgmma_handles(m, n, k) {
            let name = "gemm_wgmma_nn_bf16_swiglu_bwd"; // NN: never the TMA kernel
            return launch_wgmma(be, p, dy, w, (name, name));
        }
    }
    launch_native(be, &p, "gemm_nn_bf16_swiglu_bwd")
}

/// [`gemm_fused`] under cuBLASLt: the product, then the residual add or SwiGLU kernel.
fn cublaslt_fused(
    be: &CudaBackend,
    (m, n, k): (usize, usize, usize),
    (a, la): (&DeviceBuffer<bf16>, Layout),
    (b, lb): (&DeviceBuffer<bf16>, Layout),
    epi: Epilogue,
) -> CudaResult<()> {
    use super::{cublaslt, elementwise, swiglu};
    match epi {
        // out already holds the residual: accumulate onto it.
        Epilogue::Residual { resid, out } if resid.ptr() == out.ptr() => {
            cublaslt::gemm(be, m, n, k, a, la, b, lb, out, 1.0, 1.0)
        }
        Epilogue::Residual { resid, out } => {
            cublaslt::gemm(be, m, n, k, a, la, b, lb, out, 1.0, 0.0)?;
            elementwise::add(be, resid, out, out)
        }
        Epilogue::SwiGlu { gate, act, up } => {
            let scratch;
            let up = match up {
                Some(up) => up,
                None => {
                    scratch = DeviceBuffer::uninit(be, m * n)?;
                    &scratch
                }
            };
            cublaslt::gemm(be, m, n, k, a, la, b, lb, up, 1.0, 0.0)?;
            swiglu::swiglu_forward(be, gate, up, act)
        }
    }
}

fn wgmma_kernel(la: Layout, lb: Layout, bf16_out: bool) -> &'static str {
    use Layout::{N, T};
    match (la, lb, bf16_out) {
        (N, N, false) => "gemm_wgmma_nn_f32",
        (N, T, false) => "gemm_wgmma_nt_f32",
        (T, N, false) => "gemm_wgmma_tn_f32",
        (T, T, false) => "gemm_wgmma_tt_f32",
        (N, N, true) => "gemm_wgmma_nn_bf16",
        (N, T, true) => "gemm_wgmma_nt_bf16",
        (T, N, true) => "gemm_wgmma_tn_bf16",
        (T, T, true) => "gemm_wgmma_tt_bf16",
    }
}

/// Dynamic shared memory of the wgmma kernels: 3 stages x (A + B) x 128x64 bf16, plus 1 KiB to
/// align the base to the 1024-byte swizzle atom (`ns_wgmma::SMEM_BYTES` in `cuda/gemm.cu`).
pub const WGMMA_SMEM: u32 = 3 * 2 * 128 * 64 * 2 + 1024;

/// Whether [`wgmma_gemm_batched`] runs the wgmma kernel for this shape (otherwise it falls back to
/// the mma.sync kernel): every dimension at least 64, where one 128x128x64 tile is not mostly
/// zero padding. All four layouts are handled.
pub fn wgmma_handles(m: usize, n: usize, k: usize) -> bool {
    m >= 64 && n >= 64 && k >= 64
}

/// [`gemm_batched`] on the sm_90a wgmma kernel, whatever the engine switch says (the bench times
/// every engine side by side). An error on a device that is not compute capability 9.0; shapes
/// that [`wgmma_handles`] refuses run on [`native_gemm_batched`]. The shape contract is the
/// native one. NT (x·wᵀ) runs `gemm_wgmma_tma_nt_*` (tiles by TMA, [`tensor_map`]; the cp.async
/// `gemm_wgmma_nt_*` under `NANOSEEK_WGMMA_NO_TMA=1`), the other layouts `gemm_wgmma_{nn,tn,tt}_*`
/// (cp.async and register-transposed tiles).
#[allow(clippy::too_many_arguments)]
pub fn wgmma_gemm_batched<C: GemmOut>(
    be: &CudaBackend,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &DeviceBuffer<bf16>,
    la: Layout,
    b: &DeviceBuffer<bf16>,
    lb: Layout,
    c: &DeviceBuffer<C>,
    alpha: f32,
    beta: f32,
) -> CudaResult<()> {
    check_wgmma_device(be)?;
    check_shapes(batch, m, n, k, a, la, b, lb, c)?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    if !wgmma_handles(m, n, k) {
        return native_gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta);
    }
    let p = params((batch, m, n, k), (a, la), (b, lb), c.ptr(), (alpha, beta))?;
    let tma_nt = if C::BF16 { "gemm_wgmma_tma_nt_bf16" } else { "gemm_wgmma_tma_nt_f32" };
    launch_wgmma(be, p, (a, la), (b, lb), (tma_nt, wgmma_kernel(la, lb, C::BF16)))
}

/// The wgmma kernel for `p` (the shape checked and accepted by [`wgmma_handles`]); block tile
/// 128x128 (two warpgroups of 64 rows), batch on z, as the native kernel.
fn launch_wgmma(
    be: &CudaBackend,
    p: NsGemmParams,
    (a, la): (&DeviceBuffer<bf16>, Layout),
    (b, lb): (&DeviceBuffer<bf16>, Layout),
    (tma_nt, other): (&'static str, &'static str),
) -> CudaResult<()> {
    let (m, n, k, batch) = (p.m as usize, p.n as usize, p.k as usize, p.batch as usize);
    if la == Layout::N && lb == Layout::T && !no_tma() {
        // x·wᵀ: both operands K-major, tiles by TMA.
        let t = NsGemmTmaParams { tmap_a: tensor_map(a, k, m, batch)?, tmap_b: tensor_map(b, k, n, batch)?, g: p };
        return be.launch("gemm", tma_nt, grid(&p), 256, WGMMA_SMEM, &t);
    }
    be.launch("gemm", other, grid(&p), 256, WGMMA_SMEM, &p)
}

fn check_wgmma_device(be: &CudaBackend) -> CudaResult<()> {
    let cc = be.compute_capability();
    check(cc == (9, 0), || {
        format!("--gemm wgmma needs compute capability 9.0 (sm_90a); {} is {}.{}", be.name(), cc.0, cc.1)
    })
}

/// `NANOSEEK_WGMMA_NO_TMA=1` (read once) sends NT to the cp.async kernel `gemm_wgmma_nt_*`
/// instead of the TMA one: a diagnostic, to tell a TMA fault from a wgmma one on a GPU run.
fn no_tma() -> bool {
    static NO_TMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NO_TMA.get_or_init(|| std::env::var_os("NANOSEEK_WGMMA_NO_TMA").is_some_and(|v| v == "1"))
}

/// The TMA descriptor of a K-major bf16 operand [batch, rows, k] as `NsGemmTmaParams` documents
/// it (cuda/abi.h): dimensions (k, rows, batch), box 64 x 128 x 1 (one k tile of one operand of
/// the wgmma kernel), 128-byte swizzle, zero fill out of bounds.
fn tensor_map(buf: &DeviceBuffer<bf16>, k: usize, rows: usize, batch: usize) -> CudaResult<[u64; 16]> {
    use cudarc::driver::sys;
    let dims = [k as u64, rows as u64, batch as u64];
    // byte strides of dimensions 1 and 2 (multiples of 16: k % 8 == 0 is checked)
    let strides = [2 * k as u64, 2 * (rows * k) as u64];
    let boxes = [64u32, 128, 1];
    let unit = [1u32, 1, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length (strides: rank - 1), `buf` is a live device
    // allocation of batch*rows*k bf16 (checked by `check_shapes`), the map is written in place.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            buf.ptr() as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(super::err("cuTensorMapEncodeTiled"))?;
    Ok(map.opaque)
}

#[cfg(test)]
mod tests {
    use super::GemmEngine;

    #[test]
    fn engine_names_parse_and_round_trip() {
        for e in [GemmEngine::Native, GemmEngine::Cublaslt, GemmEngine::Wgmma] {
            assert_eq!(e.name().parse::<GemmEngine>(), Ok(e));
        }
        let e = "cublas".parse::<GemmEngine>().unwrap_err();
        assert!(e.contains("native, cublaslt or wgmma"), "{e}");
    }

    #[test]
    fn wgmma_shape_rule_and_smem() {
        assert_eq!(super::WGMMA_SMEM, 99_328); // static_assert in cuda/gemm.cu
        assert!(super::wgmma_handles(64, 64, 64));
        assert!(!super::wgmma_handles(8, 4096, 4096));
        assert!(!super::wgmma_handles(4096, 4096, 32));
    }
}
