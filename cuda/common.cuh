// Shared device helpers of the kernel families: bf16 conversion, warp and
// block reductions, 16-byte vector access, the SwiGLU formula, and the
// mma.sync / ldmatrix / cp.async wrappers of the tensor-core kernels, and the
// bounded spin-wait (ns_bounded_wait) every poll of shared state goes through.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include <cstdio>
#include "abi.h"

typedef __nv_bfloat16 bf16;

#define NS_DEV __device__ __forceinline__

NS_DEV float bf2f(bf16 x) { return __bfloat162float(x); }
NS_DEV bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// e^x and tanh with the fast hardware paths (relative error ~1e-7 class after
// the bf16 rounding of the inputs, far below the bf16 tolerances of the tests).
NS_DEV float ns_exp(float x) { return __expf(x); }
NS_DEV float ns_tanh(float x) { return 1.0f - 2.0f / (__expf(2.0f * x) + 1.0f); }
NS_DEV float ns_sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// SwiGLU, the one definition of swiglu.cu, the MoE experts and the fused GEMM
// epilogues: silu(g) * u, and its backward for the incoming gradient d:
// du = d * g * s, dg = d * u * s * (1 + g * (1 - s)) with s = sigmoid(g).
NS_DEV float ns_swiglu(float g, float u) { return g * ns_sigmoid(g) * u; }
NS_DEV void ns_swiglu_bwd(float g, float u, float d, float& dg, float& du) {
    const float s = ns_sigmoid(g);
    du = d * g * s;
    dg = d * u * s * (1.0f + g * (1.0f - s));
}

// ---- bounded spin-waits ----
// No kernel may wait forever on memory another thread, block or the TMA unit
// writes: a lost arrival would hang the process and every test after it. Each
// such poll goes through ns_bounded_wait, which gives up after
// NS_SPIN_LIMIT_NS of wall time (%globaltimer, nanoseconds); the caller then
// traps, so the launch fails (CUDA_ERROR_ILLEGAL_INSTRUCTION) instead of
// hanging. A legitimate wait (one TMA tile) lasts microseconds; 4 s leaves
// room for compute-sanitizer's slowdown.
//
// Kernels without wgmma trap through ns_spin_timeout, which first prints the
// wait, block, thread and stage. Kernels that issue wgmma trap with a bare
// __trap(): any call in them, printf's vprintf included, makes ptxas serialize
// their wgmma pipeline (C7510), so the host names the likely cause instead
// (backend::cuda::err adds it to an illegal-instruction error).
#define NS_SPIN_LIMIT_NS 4000000000ull

NS_DEV uint64_t ns_globaltimer() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}

// Polls ready() until it returns true (then true), or until the wait has
// lasted NS_SPIN_LIMIT_NS (then false). The clock is read every 64 polls only.
template <typename Ready>
NS_DEV bool ns_bounded_wait(Ready ready) {
    if (ready()) return true;
    const uint64_t t0 = ns_globaltimer();
    for (uint32_t polls = 1;; polls++) {
        if (ready()) return true;
        if ((polls & 63u) == 0 && ns_globaltimer() - t0 > NS_SPIN_LIMIT_NS) return false;
    }
}

// The expiry of a bounded wait in a kernel without wgmma: the message, then the
// trap. Out of line, so it costs the waiting kernel no registers.
__device__ __noinline__ void ns_spin_timeout(const char* what, int stage) {
    printf("nanoseek: %s: spin-wait expired after %llu ms (block %d,%d,%d, thread %d, stage %d); trapping\n", what,
           NS_SPIN_LIMIT_NS / 1000000ull, (int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z, (int)threadIdx.x, stage);
    __trap();
}

NS_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

NS_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. `scratch` holds 32 floats of shared memory.
NS_DEV float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// 8 bf16 <-> 8 floats through one 16-byte access.
struct alignas(16) bf16x8 {
    __nv_bfloat162 h[4];
};

NS_DEV void load8(const bf16* p, float* f) {
    bf16x8 v = *reinterpret_cast<const bf16x8*>(p);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(v.h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

NS_DEV void store8(bf16* p, const float* f) {
    bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; i++) v.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<bf16x8*>(p) = v;
}

// ---- tensor-core helpers (sm_80+) ----

NS_DEV uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (out-of-range tiles).
NS_DEV void cp_async16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
}
NS_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
NS_DEV void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

NS_DEV void ldmatrix_x4(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
NS_DEV void ldmatrix_x4_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Two 8x8 matrices transposed (addresses from lanes 0..15; the rest are ignored).
NS_DEV void ldmatrix_x2_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p)));
}

// D = A(16x16, row) * B(16x8, col) + D; bf16 inputs, fp32 accumulators.
NS_DEV void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats -> one register of two bf16 (low half = first).
NS_DEV uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
