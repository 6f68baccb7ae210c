// Mixed-precision GEMM, the twin of src/backend/cpu/gemm.rs:
//   C = alpha * op(A) op(B) + beta * C, batched over blockIdx.z,
// bf16 A and B, fp32 accumulation on the tensor cores (mma.sync m16n8k16,
// sm_80+), C in f32 or bf16. Every transpose the forward and backward need
// (NN, NT, TN, TT) is its own instantiation: tiles are copied to shared memory
// in their stored layout (16-byte cp.async, zero-filled outside the matrix) and
// ldmatrix (.trans where the stored layout is the other one) builds the mma
// fragments. Block tile 128x128x32, 8 warps of 64x32, two-stage pipeline,
// padded shared rows (no ldmatrix bank conflicts). This one runs on both
// targets; the sm_90a wgmma kernels (gemm_wgmma_*) follow at the end. Every
// kernel ends in the same store (gemm_store). The NT bf16 kernels also come with
// a fused epilogue (_residual, _swiglu: the bias-free residual add and SwiGLU,
// so x + y W^T and silu(g) * (h W_up^T) take no extra pass), and NN bf16 with
// SwiGLU's backward (_swiglu_bwd: dY W_down goes straight to dg and du).
#include "common.cuh"

namespace ns_gemm {  // named: an anonymous namespace would put a path hash into the PTX
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;
constexpr int PAD = 8;
// shared tile of one operand: [BM][BK+PAD] when k is contiguous, [BK][BM+PAD] otherwise
constexpr int TILE_ELEMS = (BM * (BK + PAD) > BK * (BM + PAD)) ? BM * (BK + PAD) : BK * (BM + PAD);

// The store of one output element at offset `off` of C, shared by every GEMM
// kernel: v = alpha*acc + beta*C, then the fused epilogue EPI (NsGemmParams):
// EPI_RESIDUAL adds resid; EPI_SWIGLU writes act = silu(gate) * v (and C = v
// only when c is present); EPI_SWIGLU_BWD takes v as the gradient of
// silu(gate) * up and writes the gate's (to C) and up's (to dup), as
// swiglu_bwd_bf16 does. The epilogue is a template parameter, so the plain
// kernels carry none of it.
enum { EPI_NONE = 0, EPI_RESIDUAL = 1, EPI_SWIGLU = 2, EPI_SWIGLU_BWD = 3 };
NS_DEV float out_get(const float* p, size_t off) { return p[off]; }
NS_DEV float out_get(const bf16* p, size_t off) { return bf2f(p[off]); }
NS_DEV void out_put(float* p, size_t off, float v) { p[off] = v; }
NS_DEV void out_put(bf16* p, size_t off, float v) { p[off] = f2bf(v); }
template <typename T, int EPI>
NS_DEV void gemm_store_as(const NsGemmParams& p, size_t off, float acc) {
    float v = p.alpha * acc;
    if (p.beta != 0.0f) v += p.beta * out_get(reinterpret_cast<const T*>(p.c), off);
    if (EPI == EPI_SWIGLU_BWD) {
        float dg, du;
        ns_swiglu_bwd(out_get(reinterpret_cast<const T*>(p.gate), off), out_get(reinterpret_cast<const T*>(p.up), off),
                      v, dg, du);
        out_put(reinterpret_cast<T*>(p.c), off, dg);
        out_put(reinterpret_cast<T*>(p.dup), off, du);
        return;
    }
    if (EPI == EPI_RESIDUAL) v += out_get(reinterpret_cast<const T*>(p.resid), off);
    if (EPI != EPI_SWIGLU || p.c) out_put(reinterpret_cast<T*>(p.c), off, v);
    if (EPI == EPI_SWIGLU) {
        out_put(reinterpret_cast<T*>(p.act), off, ns_swiglu(out_get(reinterpret_cast<const T*>(p.gate), off), v));
    }
}
template <bool OUT_BF16, int EPI>
NS_DEV void gemm_store(const NsGemmParams& p, size_t off, float acc) {
    if (OUT_BF16)
        gemm_store_as<bf16, EPI>(p, off, acc);
    else
        gemm_store_as<float, EPI>(p, off, acc);
}

// Copies one BMxBK (A) or BKxBN (B) tile in its stored layout. `kcontig`: the
// stored rows run along k (A not transposed, B transposed).
template <bool KCONTIG>
NS_DEV void load_tile(bf16* s, const bf16* g, int ld, int rows_total, int k_total, int r0, int k0) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int it = 0; it < 2; it++) {
        const int c = tid + it * THREADS;
        int r, k, soff;
        if (KCONTIG) {  // stored [row][k]: 128 rows x 4 chunks of 8
            r = r0 + (c >> 2);
            k = k0 + ((c & 3) << 3);
            soff = (c >> 2) * (BK + PAD) + ((c & 3) << 3);
        } else {  // stored [k][row]: 32 k-rows x 16 chunks of 8
            k = k0 + (c >> 4);
            r = r0 + ((c & 15) << 3);
            soff = (c >> 4) * (BM + PAD) + ((c & 15) << 3);
        }
        const bool ok = r < rows_total && k < k_total;
        const bf16* src = ok ? (KCONTIG ? g + (size_t)r * ld + k : g + (size_t)k * ld + r) : g;
        cp_async16(s + soff, src, ok ? 16 : 0);
    }
}

template <bool TA, bool TB, bool OUT_BF16, int EPI>
NS_DEV void gemm_body(const NsGemmParams& p) {
    __shared__ __align__(16) bf16 As[2][TILE_ELEMS];
    __shared__ __align__(16) bf16 Bs[2][TILE_ELEMS];
    const int bz = blockIdx.z;
    const bf16* A = reinterpret_cast<const bf16*>(p.a) + (size_t)bz * p.stride_a;
    const bf16* B = reinterpret_cast<const bf16*>(p.b) + (size_t)bz * p.stride_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    const int ktiles = (p.k + BK - 1) / BK;
    auto load_stage = [&](int stage, int k0) {
        load_tile<!TA>(As[stage], A, p.lda, p.m, p.k, m0, k0);
        load_tile<TB>(Bs[stage], B, p.ldb, p.n, p.k, n0, k0);
        cp_async_commit();
    };
    load_stage(0, 0);
    for (int kt = 0; kt < ktiles; kt++) {
        if (kt + 1 < ktiles) {
            load_stage((kt + 1) & 1, (kt + 1) * BK);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* as = As[kt & 1];
        const bf16* bs = Bs[kt & 1];
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bfr[4][2];
            const int i8 = lane >> 3, r8 = lane & 7;
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const int mb = wm + mi * 16;
                if (!TA) {
                    ldmatrix_x4(af[mi], as + (mb + (lane & 15)) * (BK + PAD) + kk + ((lane >> 4) << 3));
                } else {
                    ldmatrix_x4_trans(af[mi], as + (kk + ((i8 >> 1) << 3) + r8) * (BM + PAD) + mb + ((i8 & 1) << 3));
                }
            }
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                const int nb = wn + nj * 16;
                uint32_t r[4];
                if (TB) {
                    ldmatrix_x4(r, bs + (nb + ((i8 >> 1) << 3) + r8) * (BK + PAD) + kk + ((i8 & 1) << 3));
                } else {
                    ldmatrix_x4_trans(r, bs + (kk + ((i8 & 1) << 3) + r8) * (BN + PAD) + nb + ((i8 >> 1) << 3));
                }
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
        __syncthreads();
    }

    // epilogue (gemm_store), bounds-checked
    const int g = lane >> 2, c2 = (lane & 3) << 1;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = m0 + wm + mi * 16 + g + half * 8;
            if (row >= p.m) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = n0 + wn + ni * 8 + c2 + e;
                    if (col >= p.n) continue;
                    const size_t off = (size_t)bz * p.stride_c + (size_t)row * p.ldc + col;
                    gemm_store<OUT_BF16, EPI>(p, off, acc[mi][ni][half * 2 + e]);
                }
            }
        }
    }
}
}  // namespace ns_gemm
using namespace ns_gemm;

// gemm_{ta}{tb}_{out}: ta/tb = n (as stored) or t (transposed), out = f32 or bf16.
// gemm_nt_bf16_{residual,swiglu}: x·wᵀ with a fused epilogue (NsGemmParams).
#define NS_GEMM(NAME, TA, TB, OB, EPI) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(NsGemmParams p) { gemm_body<TA, TB, OB, EPI>(p); }
NS_GEMM(gemm_nn_f32, false, false, false, EPI_NONE)
NS_GEMM(gemm_nt_f32, false, true, false, EPI_NONE)
NS_GEMM(gemm_tn_f32, true, false, false, EPI_NONE)
NS_GEMM(gemm_tt_f32, true, true, false, EPI_NONE)
NS_GEMM(gemm_nn_bf16, false, false, true, EPI_NONE)
NS_GEMM(gemm_nt_bf16, false, true, true, EPI_NONE)
NS_GEMM(gemm_tn_bf16, true, false, true, EPI_NONE)
NS_GEMM(gemm_tt_bf16, true, true, true, EPI_NONE)
NS_GEMM(gemm_nt_bf16_residual, false, true, true, EPI_RESIDUAL)
NS_GEMM(gemm_nt_bf16_swiglu, false, true, true, EPI_SWIGLU)
NS_GEMM(gemm_nn_bf16_swiglu_bwd, false, false, true, EPI_SWIGLU_BWD)

// ---------------------------------------------------------------------------
// Hopper (sm_90a) GEMM on wgmma.mma_async: gemm_wgmma_{ta}{tb}_{out}, the same
// contract and NsGemmParams as the kernels above (selected by `--gemm wgmma`,
// src/backend/cuda/gemm.rs, on compute capability 9.0 only).
//
// Tiling: block tile 128x128, BK = 64, 256 threads = 2 warpgroups; warpgroup w
// owns rows [64w, 64w+64) of the tile and issues four
// wgmma.m64n128k16.f32.bf16.bf16 per k tile (64 fp32 accumulators a thread).
//
// Shared layout: both operands are stored K-major (a row of 64 bf16 = 128 bytes
// per m or n index) with the 128-byte swizzle wgmma's descriptors understand:
// the 16-byte chunk c (k in [8c, 8c+8)) of row r sits at chunk position
// c ^ (r & 7) of that row, so 8 rows form a 1024-byte swizzle atom (tiles are
// 1024-byte aligned). Descriptor: start address = row 0 of the operand (+32
// bytes per k16 step inside the atom; the hardware applies the XOR to the
// final address), LBO unused (1) for swizzled K-major, SBO = 1024 bytes (next
// 8-row group), swizzle mode 1 (128B), base offset 0.
//
// Loads: K-major operands (A of N, B of T) go global -> shared with 16-byte
// cp.async straight into the swizzled position (zero-filled outside the
// matrix). MN-major operands (A of T, B of N) are read as 16-byte vectors
// along m/n through registers and written transposed (8 two-byte stores) into
// the same K-major layout; those loads are issued right after the current
// tile's wgmmas, so their latency overlaps the tensor-core work. NT (both
// operands K-major, the trainer's x w^T) has its own kernels,
// gemm_wgmma_tma_nt_*, that load the same layout by TMA (below); the host
// sends NT there.
//
// Pipeline: STAGES = 3 shared buffers. Tile kt+2 is loaded while tile kt is
// multiplied. Per k tile: wait for this thread's cp.async group of tile kt,
// fence.proxy.async (generic-proxy writes -> visible to wgmma's async proxy),
// __syncthreads (every thread's writes landed, and every warpgroup finished
// the wgmmas of tile kt-1, whose buffer is refilled next), wgmma x4 + commit,
// load tile kt+2 into buffer (kt+2)%3 = (kt-1)%3, wgmma.wait_group 0.
// The sm_80 build keeps the entry points but traps (wgmma needs sm_90a).
namespace ns_wgmma {
constexpr int BM = 128, BN = 128, BK = 64, THREADS = 256, STAGES = 3;
constexpr int TILE_BYTES = BM * BK * 2;            // 16 KiB per operand per stage (BM == BN)
constexpr int SMEM_BYTES = STAGES * 2 * TILE_BYTES + 1024;  // + slack to align the base to 1024
static_assert(BM == BN, "one tile size for both operands");
static_assert(SMEM_BYTES == 99328, "src/backend/cuda/gemm.rs passes this as the dynamic shared memory");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Byte offset of element (r, k) of a K-major 128B-swizzled tile (k < 64).
NS_DEV uint32_t swz(int r, int k) {
    return (uint32_t)(r * 128 + ((((k >> 3) ^ (r & 7))) << 4) + ((k & 7) << 1));
}

// One 128x64 tile of an operand (rows r0.., k0..) into `s` (shared address).
// KCONTIG: stored [row][k] (lda along rows); else stored [k][row].
template <bool KCONTIG>
NS_DEV void wg_load_tile(uint32_t s, const bf16* g, int ld, int rows_total, int k_total, int r0, int k0) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int it = 0; it < (BM * BK / 8) / THREADS; it++) {  // 1024 chunks of 8, 4 a thread
        const int c = tid + it * THREADS;
        if (KCONTIG) {  // 128 rows x 8 chunks along k
            const int rl = c >> 3, kl = (c & 7) << 3;
            const int r = r0 + rl, k = k0 + kl;
            const bool ok = r < rows_total && k < k_total;  // k_total % 8 == 0: whole chunks
            const bf16* src = ok ? g + (size_t)r * ld + k : g;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s + swz(rl, kl)), "l"(src),
                         "r"(ok ? 16 : 0));
        } else {  // 64 k-rows x 16 chunks along the row index
            // Lane bit 0 picks one of two adjacent row chunks (a full 32-byte sector per k row),
            // lane bits 1-4 sixteen consecutive k: the transposed 2-byte stores of a warp then hit
            // 8 words of each of 2 rows (2-way bank conflict, not 16-way as with rows along lanes).
            // c bits: 0 -> row chunk bit 0, 1-4 -> k bits 0-3, 5-6 -> k bits 4-5, 7-9 -> row chunk bits 1-3.
            const int kl = ((c >> 1) & 15) | (((c >> 5) & 3) << 4);
            const int rl = ((c & 1) | ((c >> 7) << 1)) << 3;
            const int r = r0 + rl, k = k0 + kl;
            uint4 v = make_uint4(0, 0, 0, 0);  // rows_total % 8 == 0 here (host check): whole chunks
            if (r < rows_total && k < k_total) v = *reinterpret_cast<const uint4*>(g + (size_t)k * ld + r);
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned short h = (unsigned short)(w[j >> 1] >> ((j & 1) * 16));
                asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(s + swz(rl + j, kl)), "h"(h));
            }
        }
    }
}

// Shared-memory matrix descriptor: K-major, 128B swizzle, SBO 1024 bytes.
NS_DEV uint64_t wg_desc(uint32_t addr) {
    uint64_t d = 0;
    d |= (uint64_t)((addr & 0x3FFFF) >> 4);  // start address >> 4, 14 bits
    d |= (uint64_t)1 << 16;                   // LBO (unused for swizzled K-major)
    d |= (uint64_t)(1024 >> 4) << 32;         // SBO
    d |= (uint64_t)1 << 62;                   // 128-byte swizzle
    return d;
}

// acc += A(64x16, K-major desc) * B(16x128, K-major desc), fp32 accumulators.
NS_DEV void wgmma_m64n128k16(float* d, uint64_t da, uint64_t db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"  // scale-d: D = A*B + D
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
}

template <bool OUT_BF16, int EPI>
NS_DEV void wg_epilogue(const NsGemmParams& p, const float* acc, int m0, int n0, int bz, int wg) {
    // Epilogue. Accumulator layout of m64nNk16 (per warp of the warpgroup, like
    // mma.sync m16n8 repeated over N/8 column blocks): acc[4j + 2h + e] is
    // row 16*warp + lane/4 + 8h, column 8j + 2*(lane%4) + e.
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = m0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
        if (row >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 16; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = n0 + 8 * j + 2 * (lane & 3) + e;
                if (col >= p.n) continue;
                const size_t off = (size_t)bz * p.stride_c + (size_t)row * p.ldc + col;
                ns_gemm::gemm_store<OUT_BF16, EPI>(p, off, acc[4 * j + 2 * h + e]);
            }
        }
    }
}

template <bool TA, bool TB, bool OUT_BF16, int EPI>
NS_DEV void wgmma_body(const NsGemmParams& p) {
    extern __shared__ uint8_t wg_smem_raw[];
    // stage s: A at base + s*2*TILE_BYTES, B right after it; base 1024-aligned
    const uint32_t base = (smem_addr(wg_smem_raw) + 1023u) & ~1023u;
    const int bz = blockIdx.z;
    const bf16* A = reinterpret_cast<const bf16*>(p.a) + (size_t)bz * p.stride_a;
    const bf16* B = reinterpret_cast<const bf16*>(p.b) + (size_t)bz * p.stride_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wg = threadIdx.x >> 7;  // warpgroup: rows [64 wg, 64 wg + 64) of the tile

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;

    const int ktiles = (p.k + BK - 1) / BK;
    auto load_stage = [&](int kt) {
        if (kt < ktiles) {
            const uint32_t sa = base + (kt % STAGES) * 2 * TILE_BYTES;
            wg_load_tile<!TA>(sa, A, p.lda, p.m, p.k, m0, kt * BK);
            wg_load_tile<TB>(sa + TILE_BYTES, B, p.ldb, p.n, p.k, n0, kt * BK);
        }
        cp_async_commit();  // always one group per call (possibly empty): keeps the wait count exact
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) load_stage(s);

    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();  // groups committed: STAGES-1+kt; tile kt's is done
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const uint32_t sa = base + (kt % STAGES) * 2 * TILE_BYTES;
        const uint32_t sb = sa + TILE_BYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            // +32 bytes per k16 step inside the 128-byte swizzled row
            const uint64_t da = wg_desc(sa + wg * 64 * 128 + kk * 32);
            const uint64_t db = wg_desc(sb + kk * 32);
            wgmma_m64n128k16(acc, da, db);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        load_stage(kt + STAGES - 1);  // buffer (kt-1)%3: its wgmmas finished before the barrier
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }

    wg_epilogue<OUT_BF16, EPI>(p, acc, m0, n0, bz, wg);
}

// ---- TMA variant for NT (x w^T, both operands K-major) ----
// Same tiling, shared layout and epilogue; the tiles come from
// cp.async.bulk.tensor (TMA) with the 128-byte swizzle, which writes exactly
// the layout the descriptors above read. Pipeline: one mbarrier per stage
// ("full"); thread 0 arms it with the stage's byte count (2 x 16 KiB, the whole
// box is credited even where it is zero-filled out of bounds) and issues both
// copies; every thread waits on the barrier's phase parity (kt / 3) & 1. The
// buffer refilled at step kt is (kt-1)%3, free once the __syncthreads after the
// wait has seen every warpgroup finish (wait_group 0) the wgmmas of step kt-1.
// One non-blocking probe of the barrier's phase (try_wait may suspend the thread
// for a hardware-chosen while before it answers false).
NS_DEV bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred P;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2;\n"
        "selp.u32 %0, 1, 0, P;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

// Waits for a stage's tiles; a TMA copy that never completes traps after
// NS_SPIN_LIMIT_NS instead of hanging the process. A bare trap, no message:
// a printf call here would serialize the kernel's wgmma pipeline (common.cuh).
NS_DEV void mbar_wait(uint32_t bar, uint32_t parity) {
    if (!ns_bounded_wait([&] { return mbar_try_wait(bar, parity); })) __trap();
}

NS_DEV void tma_load_3d(uint32_t dst, const void* tmap, int c0, int c1, int c2, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

template <bool OUT_BF16, int EPI>
NS_DEV void wgmma_tma_nt_body(const NsGemmTmaParams& pt) {
    const NsGemmParams& p = pt.g;
    extern __shared__ uint8_t wg_smem_raw[];
    __shared__ __align__(8) uint64_t full[STAGES];
    const uint32_t base = (smem_addr(wg_smem_raw) + 1023u) & ~1023u;
    const uint32_t bar0 = smem_addr(full);
    const int bz = blockIdx.z;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wg = threadIdx.x >> 7;
    const int ktiles = (p.k + BK - 1) / BK;

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar0 + 8 * s));
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA unit
    }
    __syncthreads();

    auto issue = [&](int kt) {  // thread 0 only
        if (kt >= ktiles) return;
        const uint32_t bar = bar0 + 8 * (kt % STAGES);
        const uint32_t sa = base + (kt % STAGES) * 2 * TILE_BYTES;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(2 * TILE_BYTES)
                     : "memory");
        tma_load_3d(sa, pt.tmap_a, kt * BK, m0, bz, bar);
        tma_load_3d(sa + TILE_BYTES, pt.tmap_b, kt * BK, n0, bz, bar);
    };
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) issue(s);
    }

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;

    for (int kt = 0; kt < ktiles; kt++) {
        mbar_wait(bar0 + 8 * (kt % STAGES), (uint32_t)((kt / STAGES) & 1));
        __syncthreads();
        const uint32_t sa = base + (kt % STAGES) * 2 * TILE_BYTES;
        const uint32_t sb = sa + TILE_BYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++)
            wgmma_m64n128k16(acc, wg_desc(sa + wg * 64 * 128 + kk * 32), wg_desc(sb + kk * 32));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        if (threadIdx.x == 0) issue(kt + STAGES - 1);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    wg_epilogue<OUT_BF16, EPI>(p, acc, m0, n0, bz, wg);
}
#endif
}  // namespace ns_wgmma

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NS_WGMMA_BODY(TA, TB, OB, EPI) ns_wgmma::wgmma_body<TA, TB, OB, EPI>(p);
#else
#define NS_WGMMA_BODY(TA, TB, OB, EPI) __trap();
#endif
// gemm_wgmma_{ta}{tb}_{out}[_{epilogue}]: dynamic shared memory ns_wgmma::SMEM_BYTES (99328).
#define NS_GEMM_WGMMA(NAME, TA, TB, OB, EPI)                                                     \
    extern "C" __global__ void __launch_bounds__(ns_wgmma::THREADS, 1) NAME(NsGemmParams p) { \
        NS_WGMMA_BODY(TA, TB, OB, EPI)                                                            \
    }
NS_GEMM_WGMMA(gemm_wgmma_nn_f32, false, false, false, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_nt_f32, false, true, false, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_tn_f32, true, false, false, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_tt_f32, true, true, false, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_nn_bf16, false, false, true, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_nt_bf16, false, true, true, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_tn_bf16, true, false, true, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_tt_bf16, true, true, true, EPI_NONE)
NS_GEMM_WGMMA(gemm_wgmma_nt_bf16_residual, false, true, true, EPI_RESIDUAL)
NS_GEMM_WGMMA(gemm_wgmma_nt_bf16_swiglu, false, true, true, EPI_SWIGLU)
NS_GEMM_WGMMA(gemm_wgmma_nn_bf16_swiglu_bwd, false, false, true, EPI_SWIGLU_BWD)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NS_WGMMA_TMA_BODY(OB, EPI) ns_wgmma::wgmma_tma_nt_body<OB, EPI>(p);
#else
#define NS_WGMMA_TMA_BODY(OB, EPI) __trap();
#endif
static_assert(sizeof(NsGemmTmaParams) == 384, "src/backend/cuda/abi.rs layout");
// gemm_wgmma_tma_nt_{out}[_{epilogue}]: NT only, dynamic shared memory ns_wgmma::SMEM_BYTES.
#define NS_GEMM_WGMMA_TMA(NAME, OB, EPI)                                                    \
    extern "C" __global__ void __launch_bounds__(ns_wgmma::THREADS, 1)                    \
        NAME(const __grid_constant__ NsGemmTmaParams p) {                                 \
        NS_WGMMA_TMA_BODY(OB, EPI)                                                          \
    }
NS_GEMM_WGMMA_TMA(gemm_wgmma_tma_nt_f32, false, EPI_NONE)
NS_GEMM_WGMMA_TMA(gemm_wgmma_tma_nt_bf16, true, EPI_NONE)
NS_GEMM_WGMMA_TMA(gemm_wgmma_tma_nt_bf16_residual, true, EPI_RESIDUAL)
NS_GEMM_WGMMA_TMA(gemm_wgmma_tma_nt_bf16_swiglu, true, EPI_SWIGLU)
