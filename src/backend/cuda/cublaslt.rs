//! cuBLASLt as a selectable GEMM (`--gemm cublaslt`, [`super::gemm::set_gemm_engine`]): the
//! side-by-side baseline for the handwritten `cuda/gemm.cu` in `nanoseek bench`, and the fallback
//! that keeps GPU training working while a native kernel is being proven. Same contract as
//! [`super::gemm::gemm_batched`]: C = α·op(A)·op(B) + β·C, bf16 A and B, fp32 accumulation
//! (`CUBLAS_COMPUTE_32F`, f32 α/β), f32 or bf16 C, the N/T layouts of `cpu::gemm::Layout`,
//! strided batches. The library is loaded at run time through cudarc (`libcublasLt.so`); without
//! it every call returns an error that says so (nothing CUDA is needed to build).
//!
//! Row-major ↔ column-major. cuBLAS reads matrices column-major, and a row-major [r, c] buffer
//! read column-major is its transpose, a c × r matrix with leading dimension c. Our product is
//! C = op(A)·op(B), C row-major [m, n]; read column-major, the C buffer is Cᵀ (n × m, ld n), and
//! Cᵀ = op(B)ᵀ·op(A)ᵀ. So cuBLAS computes with its first operand taken from our B and its second
//! from our A, and the transpose flags carry over unchanged:
//! - B, layout N (row-major [k, n]): the buffer read column-major is Bᵀ = op(B)ᵀ, n × k, ld n:
//!   cuBLAS op N. Layout T (row-major [n, k]): read column-major it is op(B), k × n, ld k, and
//!   op(B)ᵀ needs cuBLAS op T.
//! - A, layout N (row-major [m, k]): read column-major it is op(A)ᵀ, k × m, ld k: op N. Layout T
//!   (row-major [k, m]): read column-major it is op(A), m × k, ld m: op T.
//! - C: n × m, ld n; D (the output) is the same buffer with the same layout (in place, which
//!   cuBLASLt allows when C and D share a descriptor), so β·C reads the old C. With β = 0 cuBLAS
//!   does not read C (it may hold garbage, as with the native kernel).
//!
//! In short: a stored row-major [r, c] operand becomes a column-major layout of c rows, r columns,
//! ld c, and cuBLAS gets (B, A) with (op(lb), op(la)), giving an n × m column-major D.
//! Batches are strided (m·k, k·n, m·n elements), exactly the consecutive matrices of the native
//! GEMM.
//!
//! Descriptors and the heuristic's algorithm are cached per shape/layout/alignment ("plans"), so
//! a repeated GEMM (every training step, every bench iteration) costs one `cublasLtMatmul` call.

use super::gemm::{check_shapes, GemmOut, Layout};
use super::{err, CudaBackend, CudaError, CudaResult, DeviceBuffer, Inner};
use cudarc::cublaslt::{result, sys};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Whether `libcublasLt` can be loaded, or why not.
pub fn available() -> CudaResult<()> {
    // SAFETY: only tries to dlopen the library; no cuBLASLt call is made.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError(
            "cuBLASLt is not available: the library libcublasLt.so could not be loaded (install the CUDA \
             toolkit's cuBLAS or put it on LD_LIBRARY_PATH), use --gemm native"
                .into(),
        ))
    }
}

fn lt_err(what: &str) -> impl FnOnce(result::CublasError) -> CudaError + '_ {
    move |e| CudaError(format!("cuBLASLt {what}: {e:?}"))
}

/// What a plan depends on: layouts, output type, shape, batch and the operands' alignment.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    la: bool,
    lb: bool,
    bf16_out: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    /// Byte alignment (≤ 256) of A, B and C, batch strides included.
    align: [u32; 3],
}

/// Descriptors and the chosen algorithm of one GEMM shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLAS's A (our B), cuBLAS's B (our A), C = D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    /// Destroys the descriptors (null ones are skipped, so a half-built plan can be dropped).
    fn destroy(&mut self) {
        for l in self.layouts.iter_mut().filter(|l| !l.is_null()) {
            // SAFETY: created by `create_matrix_layout`, destroyed once (nulled below).
            let _ = unsafe { result::destroy_matrix_layout(*l) };
            *l = std::ptr::null_mut();
        }
        if !self.desc.is_null() {
            // SAFETY: created by `create_matmul_desc`, destroyed once.
            let _ = unsafe { result::destroy_matmul_desc(self.desc) };
            self.desc = std::ptr::null_mut();
        }
    }
}

/// One backend's cuBLASLt state: the handle, the workspace and the cached plans. Created on the
/// first cuBLASLt GEMM of a backend ([`CudaBackend`] holds it), destroyed with the backend.
pub(crate) struct Lt {
    inner: Arc<Inner>,
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer<u32>,
    plans: HashMap<Key, Plan>,
}
// SAFETY: the handle and descriptors are only used under the backend's `cublaslt` mutex, with the
// backend's context bound.
unsafe impl Send for Lt {}

impl Lt {
    fn new(be: &CudaBackend) -> CudaResult<Lt> {
        available()?;
        be.inner.bind()?;
        // cudarc panics when a symbol is missing from the library: report it as an error.
        let handle = std::panic::catch_unwind(result::create_handle)
            .map_err(|_| CudaError("cuBLASLt: the library lacks the cublasLtCreate symbol".into()))?
            .map_err(lt_err("cublasLtCreate"))?;
        // NVIDIA's recommended workspace: 32 MiB on Hopper and newer, 4 MiB before.
        let bytes = if be.compute_capability().0 >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = match DeviceBuffer::<u32>::uninit(be, bytes / 4) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above, not used anywhere else.
                let _ = unsafe { result::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Lt { inner: be.inner.clone(), handle, workspace, plans: HashMap::new() })
    }

    /// The cached plan for `key`, made on first use.
    fn plan(&mut self, key: Key) -> CudaResult<&Plan> {
        if !self.plans.contains_key(&key) {
            let mut plan = Plan {
                desc: std::ptr::null_mut(),
                layouts: [std::ptr::null_mut(); 3],
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            };
            match self.make_plan(key, &mut plan) {
                Ok(()) => {
                    self.plans.insert(key, plan);
                }
                Err(e) => {
                    plan.destroy();
                    return Err(e);
                }
            }
        }
        Ok(&self.plans[&key])
    }

    fn make_plan(&self, key: Key, plan: &mut Plan) -> CudaResult<()> {
        use sys::cublasLtMatmulDescAttributes_t::{CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB};
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        let Key { la, lb, bf16_out, batch, m, n, k, align } = key;
        plan.desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // cuBLAS's A is our B with op(lb), its B our A with op(la) (see the module doc);
        // cublasOperation_t: 0 = N, 1 = T, an int32 attribute.
        for (attr, transposed) in [(CUBLASLT_MATMUL_DESC_TRANSA, lb), (CUBLASLT_MATMUL_DESC_TRANSB, la)] {
            let op = transposed as i32;
            // SAFETY: a live descriptor and a 4-byte value of the attribute's type.
            unsafe { result::set_matmul_desc_attribute(plan.desc, attr, &op as *const i32 as *const c_void, 4) }
                .map_err(lt_err("cublasLtMatmulDescSetAttribute"))?;
        }
        // Row-major [r, c] read column-major: c rows, r columns, ld c.
        let (b_rows, b_cols) = if lb { (k, n) } else { (n, k) }; // B: [n,k] (T) or [k,n] (N)
        let (a_rows, a_cols) = if la { (m, k) } else { (k, m) }; // A: [k,m] (T) or [m,k] (N)
        let c_type = if bf16_out { CUDA_R_16BF } else { CUDA_R_32F };
        let specs = [
            (CUDA_R_16BF, b_rows, b_cols, (k * n) as i64),
            (CUDA_R_16BF, a_rows, a_cols, (m * k) as i64),
            (c_type, n, m, (m * n) as i64),
        ];
        for (slot, (ty, rows, cols, stride)) in specs.into_iter().enumerate() {
            plan.layouts[slot] = result::create_matrix_layout(ty, rows as u64, cols as u64, rows as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            if batch > 1 {
                use sys::cublasLtMatrixLayoutAttribute_t::{
                    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                };
                // checked to fit by the caller
                let count = batch as i32;
                // SAFETY: a live layout; int32 batch count and int64 stride, as the attributes require.
                unsafe {
                    result::set_matrix_layout_attribute(
                        plan.layouts[slot],
                        CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .and_then(|()| {
                        result::set_matrix_layout_attribute(
                            plan.layouts[slot],
                            CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const i64 as *const c_void,
                            8,
                        )
                    })
                }
                .map_err(lt_err("cublasLtMatrixLayoutSetAttribute"))?;
            }
        }
        // Heuristic: the fastest algorithm that fits the workspace and the operands' alignment
        // (the default preference assumes 256-byte aligned pointers).
        let pref = result::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
        let ws = self.workspace.bytes() as u64;
        // cuBLAS's A/B/C/D are our B/A/C/C.
        let aligns = [align[1], align[0], align[2], align[2]];
        // SAFETY: a live preference, descriptor and layouts (made above).
        let r = unsafe { heuristic(self.handle, plan, pref, ws, aligns) };
        // SAFETY: created above, not used after this.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        let heuristic = r.map_err(|e| {
            CudaError(format!(
                "cuBLASLt found no algorithm for batch {batch} × [{m}, {n}, {k}] ({}{}, {} out): {e:?}",
                if la { "T" } else { "N" },
                if lb { "T" } else { "N" },
                if bf16_out { "bf16" } else { "f32" }
            ))
        })?;
        plan.algo = heuristic.algo;
        Ok(())
    }
}

/// Sets the workspace and alignment preferences and asks for the fastest algorithm.
///
/// # Safety
/// `handle`, `pref` and the plan's descriptors must be live.
unsafe fn heuristic(
    handle: sys::cublasLtHandle_t,
    plan: &Plan,
    pref: sys::cublasLtMatmulPreference_t,
    ws: u64,
    aligns: [u32; 4],
) -> Result<sys::cublasLtMatmulHeuristicResult_t, result::CublasError> {
    use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
    // u64 workspace bytes and u32 alignments, as the attributes are documented.
    result::set_matmul_pref_attribute(
        pref,
        Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
        &ws as *const u64 as *const c_void,
        8,
    )?;
    let attrs = [
        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    ];
    for (attr, a) in attrs.into_iter().zip(aligns) {
        result::set_matmul_pref_attribute(pref, attr, &a as *const u32 as *const c_void, 4)?;
    }
    let [la, lb, lc] = plan.layouts;
    result::get_matmul_algo_heuristic(handle, plan.desc, la, lb, lc, lc, pref)
}

impl Drop for Lt {
    fn drop(&mut self) {
        if self.inner.bind().is_ok() {
            // The workspace goes back to the pool when this drops: let queued GEMMs finish first.
            let _ = self.inner.ctx.synchronize();
        }
        for (_, mut p) in self.plans.drain() {
            p.destroy();
        }
        // SAFETY: created in `Lt::new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// Byte alignment (capped at 256, the heuristic's default assumption) of an operand at `ptr`
/// whose batch matrices lie `stride_bytes` apart.
fn alignment(ptr: u64, stride_bytes: u64, batch: usize) -> u32 {
    let bits = ptr | 256 | if batch > 1 { stride_bytes } else { 0 };
    1 << bits.trailing_zeros()
}

/// C[m,n] = α·op(A)·op(B) + β·C through cuBLASLt; the contract of [`super::gemm::gemm`].
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

/// `batch` independent products over consecutive [m,k]/[k,n]/[m,n] matrices of a, b and c
/// through cuBLASLt; the contract (and the shape checks) of [`super::gemm::gemm_batched`].
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
    check_shapes(batch, m, n, k, a, la, b, lb, c)?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    // cuBLASLt takes u64 rows/cols but int32 batch counts; keep the native kernel's 32-bit limits
    // on every dimension so both engines accept the same shapes.
    for (v, what) in [(batch, "batch"), (m, "m"), (n, "n"), (k, "k")] {
        super::int(v, what)?;
    }
    if k == 0 {
        // No products: C = β·C. cuBLASLt rejects k = 0; the native kernel handles it.
        return super::gemm::native_gemm_batched(be, batch, m, n, k, a, la, b, lb, c, alpha, beta);
    }
    let es = std::mem::size_of::<C>() as u64;
    let key = Key {
        la: la == Layout::T,
        lb: lb == Layout::T,
        bf16_out: C::BF16,
        batch,
        m,
        n,
        k,
        align: [
            alignment(a.ptr(), 2 * (m * k) as u64, batch),
            alignment(b.ptr(), 2 * (k * n) as u64, batch),
            alignment(c.ptr(), es * (m * n) as u64, batch),
        ],
    };
    let mut slot = be.cublaslt.lock().unwrap();
    if slot.is_none() {
        *slot = Some(Lt::new(be)?);
    }
    let lt = slot.as_mut().unwrap();
    lt.inner.bind()?;
    let (handle, ws, ws_bytes, stream) =
        (lt.handle, lt.workspace.ptr(), lt.workspace.bytes(), lt.inner.stream as sys::cudaStream_t);
    let plan = lt.plan(key)?;
    let [lay_a, lay_b, lay_c] = plan.layouts;
    // SAFETY: descriptors from `plan` (live until the backend drops); the device pointers hold
    // batch·(m·k | k·n | m·n) elements (checked above); α and β are host f32 (the default pointer
    // mode, scale type f32); the workspace holds ws_bytes. Queued on the backend's stream.
    unsafe {
        result::matmul(
            handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            b.ptr() as *const c_void,
            lay_a,
            a.ptr() as *const c_void,
            lay_b,
            c.ptr() as *const c_void,
            lay_c,
            c.ptr() as *mut c_void,
            lay_c,
            &plan.algo,
            ws as *mut c_void,
            ws_bytes,
            stream,
        )
    }
    .map_err(err("cublasLtMatmul"))
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_lowest_set_bit_capped_at_256() {
        assert_eq!(alignment(0x7f00_0000_0000, 0, 1), 256);
        assert_eq!(alignment(0x7f00_0000_0010, 0, 1), 16);
        // batch strides count only when there is more than one matrix
        assert_eq!(alignment(0x7f00_0000_0000, 24, 1), 256);
        assert_eq!(alignment(0x7f00_0000_0000, 24, 2), 8);
        assert_eq!(alignment(0x7f00_0000_0002, 4096, 3), 2);
    }
}
