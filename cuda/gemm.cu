// Mixed-precision GEMM, the twin of src/backend/cpu/gemm.rs:
//   C = alpha * op(A) op(B) + beta * C, batched over blockIdx.z,
// bf16 A and B, fp32 accumulation on the tensor cores (mma.sync m16n8k16,
// sm_80+), C in f32 or bf16. Every transpose the forward and backward need
// (NN, NT, TN, TT) is its own instantiation: tiles are copied to shared memory
// in their stored layout (16-byte cp.async, zero-filled outside the matrix) and
// ldmatrix (.trans where the stored layout is the other one) builds the mma
// fragments. Block tile 128x128x32, 8 warps of 64x32, two-stage pipeline,
// padded shared rows (no ldmatrix bank conflicts). The wgmma/TMA path for
// sm_90a is the next step; this one runs on both targets.
#include "common.cuh"

namespace ns_gemm {  // named: an anonymous namespace would put a path hash into the PTX
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;
constexpr int PAD = 8;
// shared tile of one operand: [BM][BK+PAD] when k is contiguous, [BK][BM+PAD] otherwise
constexpr int TILE_ELEMS = (BM * (BK + PAD) > BK * (BM + PAD)) ? BM * (BK + PAD) : BK * (BM + PAD);

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

template <bool TA, bool TB, bool OUT_BF16>
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

    // epilogue: alpha * acc + beta * C, bounds-checked
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
                    float v = p.alpha * acc[mi][ni][half * 2 + e];
                    if (OUT_BF16) {
                        bf16* C = reinterpret_cast<bf16*>(p.c);
                        if (p.beta != 0.0f) v += p.beta * bf2f(C[off]);
                        C[off] = f2bf(v);
                    } else {
                        float* C = reinterpret_cast<float*>(p.c);
                        if (p.beta != 0.0f) v += p.beta * C[off];
                        C[off] = v;
                    }
                }
            }
        }
    }
}
}  // namespace ns_gemm
using namespace ns_gemm;

// gemm_{ta}{tb}_{out}: ta/tb = n (as stored) or t (transposed), out = f32 or bf16.
#define NS_GEMM(NAME, TA, TB, OB) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(NsGemmParams p) { gemm_body<TA, TB, OB>(p); }
NS_GEMM(gemm_nn_f32, false, false, false)
NS_GEMM(gemm_nt_f32, false, true, false)
NS_GEMM(gemm_tn_f32, true, false, false)
NS_GEMM(gemm_tt_f32, true, true, false)
NS_GEMM(gemm_nn_bf16, false, false, true)
NS_GEMM(gemm_nt_bf16, false, true, true)
NS_GEMM(gemm_tn_bf16, true, false, true)
NS_GEMM(gemm_tt_bf16, true, true, true)
