// DeepSeek-V3 mixture of experts, the twin of src/backend/cpu/moe.rs:
//   router      moe_route (scores, biased group-limited top-k, gates), moe_router_bwd
//   dispatch    moe_hist -> moe_offsets -> moe_scatter: the expert-contiguous
//               permutation with capacity drops in assignment order (deterministic)
//   experts     moe_gather, moe_gemm_rows_* / moe_gemm_experts_tn_f32 (grouped GEMMs
//               over the variable-size expert segments), moe_swiglu_{fwd,bwd}
//   combine     moe_combine, moe_combine_bwd, moe_scatter_dx
//   balancing   moe_balance (bias update and load statistics)
//
// The router reproduces the CPU bit for bit: its scores use the CPU's polynomial
// exp (cpu::math::exp) with every operation rounded separately (__fmul_rn and
// friends: nvcc would otherwise contract a*b+c into an fma, which rounds once),
// the softmax sum uses math::sum's order (eight strided partial sums, then the
// tail), and the selection, group scores, gate denominators and divisions are the
// same f32 operations in the same order. Selection is an exact warp argmax: the
// largest key, the lowest index among equal keys, as the CPU's scan.
//
// Dispatch needs, for each assignment a, its rank among the earlier assignments
// to the same expert (kept iff rank < capacity; position = offsets[e] + rank).
// One warp per chunk of 1024 assignments histograms its chunk (match_any groups
// equal experts of 32 consecutive assignments), one block turns the histograms
// into per-chunk bases with a prefix over chunks, and the chunk's warp then walks
// its assignments again in order, adding the within-warp rank. No atomics, so the
// permutation is the CPU's exactly.
#include "common.cuh"

namespace ns_moe {  // named: an anonymous namespace would put a path hash into the PTX
constexpr unsigned NONE = 0xffffffffu;
constexpr unsigned FULL = 0xffffffffu;
constexpr int ROUTE_WARPS = 4;  // tokens per block of moe_route / moe_router_bwd
constexpr int CHUNK = 1024;     // assignments per warp of moe_hist / moe_scatter
constexpr int CHUNK_WARPS = 4;  // chunks per block
constexpr int ROW_WARPS = 4;    // rows per block of the per-row kernels

// ---- router math, bitwise like src/backend/cpu/math.rs ----

// a * b + c with two roundings (never contracted into an fma).
NS_DEV float mul_add_rn(float a, float b, float c) { return __fadd_rn(__fmul_rn(a, b), c); }

// cpu::math::exp: x = n ln2 + r, e^r by a degree-6 Taylor polynomial, 2^n in the exponent bits.
NS_DEV float cpu_exp(float x) {
    const float LOG2E = 1.44269504088896340736f, LN2_HI = 0.69314575f, LN2_LO = 1.4286068e-6f;
    const float MAGIC = 12582912.0f;  // 1.5 * 2^23
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float shifted = mul_add_rn(x, LOG2E, MAGIC);
    const float n = __fsub_rn(shifted, MAGIC);
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float q = __fmul_rn(r, 1.0f / 720.0f);
    q = __fadd_rn(1.0f / 120.0f, q);
    q = mul_add_rn(r, q, 1.0f / 24.0f);
    q = mul_add_rn(r, q, 1.0f / 6.0f);
    q = mul_add_rn(r, q, 0.5f);
    q = mul_add_rn(r, q, 1.0f);
    q = mul_add_rn(r, q, 1.0f);
    const int e = __float_as_int(shifted) - __float_as_int(MAGIC);
    return __fmul_rn(q, __int_as_float((e + 127) << 23));
}

NS_DEV float cpu_sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, cpu_exp(-x))); }

// Index of the largest v[i] with ok[i] over 0..len, the lowest index among equals
// (the CPU's argmax_allowed); every lane gets it. INT_MAX when nothing is allowed.
NS_DEV int warp_argmax(const float* v, const int* ok, int len, int lane) {
    const int NO = 0x7fffffff;
    float best = 0.0f;
    int bi = NO;
    for (int i = lane; i < len; i += 32)
        if (ok[i] && (bi == NO || v[i] > best)) {
            best = v[i];
            bi = i;
        }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL, best, o);
        const int oi = __shfl_xor_sync(FULL, bi, o);
        // (value desc, index asc) is a total order: the butterfly gives every lane the same winner
        if (oi != NO && (bi == NO || ov > best || (ov == best && oi < bi))) {
            best = ov;
            bi = oi;
        }
    }
    return bi;
}

// ---- grouped GEMM tiles (the scheme of gemm.cu: 128x128x32 block tile, 8 warps of
// 64x32, two-stage cp.async pipeline, ldmatrix fragments, mma.sync m16n8k16) ----
constexpr int BM = 128, BN = 128, BK = 32, GT = 256, PAD = 8;
constexpr int TILE_ELEMS = (BM * (BK + PAD) > BK * (BM + PAD)) ? BM * (BK + PAD) : BK * (BM + PAD);

// One BMxBK (or BKxBN) tile in its stored layout; zero-filled outside rows_total x k_total.
// KCONTIG: stored [row][k] (needs k_total % 8 == 0), else [k][row] (rows_total % 8 == 0).
template <bool KCONTIG>
NS_DEV void load_tile(bf16* s, const bf16* g, int ld, int rows_total, int k_total, int r0, int k0) {
#pragma unroll
    for (int it = 0; it < 2; it++) {
        const int c = threadIdx.x + it * GT;
        int r, k, soff;
        if (KCONTIG) {  // 128 rows x 4 chunks of 8 k
            r = r0 + (c >> 2);
            k = k0 + ((c & 3) << 3);
            soff = (c >> 2) * (BK + PAD) + ((c & 3) << 3);
        } else {  // 32 k-rows x 16 chunks of 8 rows
            k = k0 + (c >> 4);
            r = r0 + ((c & 15) << 3);
            soff = (c >> 4) * (BM + PAD) + ((c & 15) << 3);
        }
        const bool ok = r < rows_total && k < k_total;
        const bf16* src = ok ? (KCONTIG ? g + (size_t)r * ld + k : g + (size_t)k * ld + r) : g;
        cp_async16(s + soff, src, ok ? 16 : 0);
    }
}

struct Smem {
    bf16 a[2][TILE_ELEMS];
    bf16 b[2][TILE_ELEMS];
};

// acc += op(A)[m0:m0+128, 0:k] op(B)[0:k, n0:n0+128], then the same with A2, B2 when
// A2 != nullptr (a second product summed into the same tile). op(A) is [m, k], stored
// [m, k] (!TA) or [k, m] (TA); op(B) is [k, n], stored [n, k] (TB) or [k, n] (!TB).
template <bool TA, bool TB>
NS_DEV void mma_tile(float (&acc)[4][4][4], Smem& sm, const bf16* A, const bf16* B, const bf16* A2,
                     const bf16* B2, int lda, int ldb, int m, int n, int k, int m0, int n0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int kt1 = (k + BK - 1) / BK;
    const int ktiles = A2 ? 2 * kt1 : kt1;
    if (ktiles == 0) return;  // uniform over the block
    auto load_stage = [&](int stage, int kt) {
        const bool second = kt >= kt1;
        const int k0 = (second ? kt - kt1 : kt) * BK;
        load_tile<!TA>(sm.a[stage], second ? A2 : A, lda, m, k, m0, k0);
        load_tile<TB>(sm.b[stage], second ? B2 : B, ldb, n, k, n0, k0);
        cp_async_commit();
    };
    load_stage(0, 0);
    for (int kt = 0; kt < ktiles; kt++) {
        if (kt + 1 < ktiles) {
            load_stage((kt + 1) & 1, kt + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* as = sm.a[kt & 1];
        const bf16* bs = sm.b[kt & 1];
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
        __syncthreads();  // the stage just read is the next one refilled
    }
}

// Writes the tile to C (ldc), rows < m and columns < n (n even: the pairs never straddle it).
template <bool OUT_BF16>
NS_DEV void store_tile(const float (&acc)[4][4][4], void* c, int ldc, int m, int n, int m0, int n0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int g = lane >> 2, c2 = (lane & 3) << 1;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = m0 + wm + mi * 16 + g + half * 8;
            if (row >= m) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int col = n0 + wn + ni * 8 + c2;
                if (col >= n) continue;
                const size_t off = (size_t)row * ldc + col;
                const float v0 = acc[mi][ni][half * 2], v1 = acc[mi][ni][half * 2 + 1];
                if (OUT_BF16) {
                    *reinterpret_cast<__nv_bfloat162*>(reinterpret_cast<bf16*>(c) + off) = __floats2bfloat162_rn(v0, v1);
                } else {
                    *reinterpret_cast<float2*>(reinterpret_cast<float*>(c) + off) = make_float2(v0, v1);
                }
            }
        }
    }
}

NS_DEV void zero_acc(float (&acc)[4][4][4]) {
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
}

// Row-grouped: blockIdx.x is a global row tile; tile_offsets maps it to (expert, tile).
template <bool TB, bool OUT_BF16>
NS_DEV void gemm_rows_body(const NsMoeGemmParams& p) {
    __shared__ __align__(16) Smem sm;
    const unsigned* tiles = reinterpret_cast<const unsigned*>(p.tile_offsets);
    const unsigned* offs = reinterpret_cast<const unsigned*>(p.offsets);
    const int E = p.n_experts, y = blockIdx.x;
    if (y >= (int)tiles[E]) return;  // the grid is an upper bound on the tile count
    // the expert e with tiles[e] <= y < tiles[e + 1] (empty experts have tiles[e] == tiles[e + 1])
    int lo = 0, hi = E;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if ((int)tiles[mid] <= y) lo = mid;
        else hi = mid;
    }
    const int e = lo;
    const int row0 = offs[e], rows = offs[e + 1] - row0;
    const int m0 = (y - (int)tiles[e]) * BM, n0 = blockIdx.y * BN;
    const bf16* A = reinterpret_cast<const bf16*>(p.a) + (size_t)row0 * p.lda;
    const bf16* B = reinterpret_cast<const bf16*>(p.b) + (size_t)e * p.stride_b;
    const bf16* A2 = p.a2 ? reinterpret_cast<const bf16*>(p.a2) + (size_t)row0 * p.lda : nullptr;
    const bf16* B2 = p.a2 ? reinterpret_cast<const bf16*>(p.b2) + (size_t)e * p.stride_b : nullptr;
    float acc[4][4][4];
    zero_acc(acc);
    mma_tile<false, TB>(acc, sm, A, B, A2, B2, p.lda, p.ldb, rows, p.n, p.k, m0, n0);
    const size_t esize = OUT_BF16 ? 2 : 4;
    store_tile<OUT_BF16>(acc, reinterpret_cast<char*>(p.c) + (size_t)row0 * p.ldc * esize, p.ldc, rows, p.n, m0, n0);
}
}  // namespace ns_moe
using namespace ns_moe;

// ---------------------------------------------------------------- router

// One warp per token. Shared memory per warp: s[E], key[E], gscore[G] (f32),
// allowed[E], gfree[G] (int): ROUTE_WARPS * (3E + 2G) * 4 bytes.
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32) moe_route(NsMoeRouteParams p) {
    extern __shared__ float route_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= p.n) return;  // whole warps only; no block barrier below
    const int E = p.n_experts, G = p.n_group, K = p.top_k;
    float* s = route_smem + (size_t)warp * (3 * E + 2 * G);
    float* key = s + E;
    float* gscore = key + E;
    int* allowed = reinterpret_cast<int*>(gscore + G);
    int* gfree = allowed + E;
    const float* lg = reinterpret_cast<const float*>(p.logits) + (size_t)t * E;
    const float* bias = reinterpret_cast<const float*>(p.bias);

    if (!p.softmax) {
        for (int i = lane; i < E; i += 32) s[i] = cpu_sigmoid(lg[i]);
    } else {
        float m = -INFINITY;
        for (int i = lane; i < E; i += 32) m = fmaxf(m, lg[i]);
        m = warp_max(m);  // max is exact in any order
        for (int i = lane; i < E; i += 32) s[i] = cpu_exp(__fsub_rn(lg[i], m));
        __syncwarp();
        // math::sum: lanes 0..7 sum the strided whole chunks, then in lane order, then the tail
        const int whole = E / 8 * 8;
        float part = 0.0f;
        if (lane < 8)
            for (int i = lane; i < whole; i += 8) part = __fadd_rn(part, s[i]);
        float total = 0.0f;
        for (int j = 0; j < 8; j++) total = __fadd_rn(total, __shfl_sync(FULL, part, j));
        float tail = 0.0f;
        for (int i = whole; i < E; i++) tail = __fadd_rn(tail, s[i]);
        const float inv = __fdiv_rn(1.0f, __fadd_rn(total, tail));
        __syncwarp();  // every lane has read s before it is rescaled
        for (int i = lane; i < E; i += 32) s[i] = __fmul_rn(s[i], inv);
    }
    float* scores = reinterpret_cast<float*>(p.scores) + (size_t)t * E;
    for (int i = lane; i < E; i += 32) {
        scores[i] = s[i];
        key[i] = __fadd_rn(s[i], bias[i]);
    }
    __syncwarp();

    if (G > 1) {
        // group score: the sum of the group's top-2 keys (its key when it has one expert)
        const int gs = E / G;
        for (int g = lane; g < G; g += 32) {
            const float* kg = key + g * gs;
            float sc = kg[0];
            if (gs > 1) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int j = 0; j < gs; j++) {
                    const float x = kg[j];
                    if (x > b1) {
                        b2 = b1;
                        b1 = x;
                    } else if (x > b2) {
                        b2 = x;
                    }
                }
                sc = __fadd_rn(b1, b2);
            }
            gscore[g] = sc;
            gfree[g] = 1;
        }
        for (int i = lane; i < E; i += 32) allowed[i] = 0;
        __syncwarp();
        for (int r = 0; r < p.topk_group; r++) {
            const int g = warp_argmax(gscore, gfree, G, lane);
            __syncwarp();  // all lanes have read gfree
            if (lane == 0) gfree[g] = 0;
            for (int i = g * gs + lane; i < (g + 1) * gs; i += 32) allowed[i] = 1;
            __syncwarp();
        }
    } else {
        for (int i = lane; i < E; i += 32) allowed[i] = 1;
        __syncwarp();
    }

    unsigned* ex = reinterpret_cast<unsigned*>(p.experts) + (size_t)t * K;
    float den = 0.0f;  // Σ s over the chosen, in slot order (as the CPU)
    for (int k = 0; k < K; k++) {
        const int i = warp_argmax(key, allowed, E, lane);  // validate() guarantees one is left
        __syncwarp();
        if (lane == 0) {
            allowed[i] = 0;
            ex[k] = (unsigned)i;
        }
        den = __fadd_rn(den, s[i]);
        __syncwarp();
    }
    if (lane == 0) {  // reads back its own writes of ex
        float* gates = reinterpret_cast<float*>(p.gates) + (size_t)t * K;
        for (int k = 0; k < K; k++) gates[k] = __fmul_rn(__fdiv_rn(s[ex[k]], den), p.routed_scaling_factor);
    }
}

// Twin of cpu::moe::router_backward, one warp per token; shared memory ROUTE_WARPS * E floats.
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32) moe_router_bwd(NsMoeRouteParams p) {
    extern __shared__ float rbwd_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= p.n) return;
    const int E = p.n_experts, K = p.top_k;
    float* ds = rbwd_smem + (size_t)warp * E;
    const float* s = reinterpret_cast<const float*>(p.scores) + (size_t)t * E;
    const float* extra = reinterpret_cast<const float*>(p.d_scores_extra);
    for (int i = lane; i < E; i += 32) ds[i] = extra ? extra[(size_t)t * E + i] : 0.0f;
    __syncwarp();
    if (lane == 0) {
        // through g_k = rsf * s_k / S, S over all K chosen (dropped included); dropped slots have dg = 0
        const unsigned* ex = reinterpret_cast<const unsigned*>(p.experts) + (size_t)t * K;
        const unsigned* pos = reinterpret_cast<const unsigned*>(p.position) + (size_t)t * K;
        const float* dgv = reinterpret_cast<const float*>(p.d_gates) + (size_t)t * K;
        float den = 0.0f, gs = 0.0f;
        for (int k = 0; k < K; k++) {
            const float sv = s[ex[k]], dg = pos[k] != NONE ? dgv[k] : 0.0f;
            den += sv;
            gs += dg * sv;
        }
        const float inv = 1.0f / den, corr = gs * inv;
        for (int k = 0; k < K; k++) {
            const float dg = pos[k] != NONE ? dgv[k] : 0.0f;
            ds[ex[k]] += p.routed_scaling_factor * inv * (dg - corr);
        }
    }
    __syncwarp();
    float* dl = reinterpret_cast<float*>(p.d_logits) + (size_t)t * E;
    if (!p.softmax) {
        for (int i = lane; i < E; i += 32) dl[i] = ds[i] * s[i] * (1.0f - s[i]);
    } else {
        float sd = 0.0f;
        for (int i = lane; i < E; i += 32) sd += ds[i] * s[i];
        sd = warp_sum(sd);
        for (int i = lane; i < E; i += 32) dl[i] = s[i] * (ds[i] - sd);
    }
}

// ---------------------------------------------------------------- dispatch

// Histogram of the experts of each chunk of CHUNK assignments, one warp per chunk.
// Shared memory: CHUNK_WARPS * E u32.
extern "C" __global__ void __launch_bounds__(CHUNK_WARPS * 32) moe_hist(NsMoeDispatchParams p) {
    extern __shared__ unsigned hist_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * CHUNK_WARPS + warp;
    if (c >= p.n_chunks) return;
    const int E = p.n_experts;
    unsigned* cnt = hist_smem + (size_t)warp * E;
    for (int e = lane; e < E; e += 32) cnt[e] = 0;
    __syncwarp();
    const unsigned* experts = reinterpret_cast<const unsigned*>(p.experts);
    const int a0 = c * CHUNK, a1 = min(a0 + CHUNK, p.n_assign);
    for (int base = a0; base < a1; base += 32) {
        const int a = base + lane;
        const bool valid = a < a1;
        const unsigned e = valid ? experts[a] : NONE;
        const unsigned same = __match_any_sync(FULL, e);
        // the lowest lane of each group of equal experts adds the group (distinct addresses)
        if (valid && (same & ((1u << lane) - 1)) == 0) cnt[e] += __popc(same);
        __syncwarp();
    }
    unsigned* out = reinterpret_cast<unsigned*>(p.chunk_hist) + (size_t)c * E;
    for (int e = lane; e < E; e += 32) out[e] = cnt[e];
}

// One block: chunk histograms -> per-chunk bases (exclusive prefix over chunks, in
// place), demand, counts = min(demand, capacity), offsets and tile_offsets.
extern "C" __global__ void __launch_bounds__(256) moe_offsets(NsMoeDispatchParams p) {
    const int E = p.n_experts;
    unsigned* hist = reinterpret_cast<unsigned*>(p.chunk_hist);
    unsigned* demand = reinterpret_cast<unsigned*>(p.demand);
    unsigned* counts = reinterpret_cast<unsigned*>(p.counts);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        unsigned run = 0;
        for (int c = 0; c < p.n_chunks; c++) {
            const size_t i = (size_t)c * E + e;
            const unsigned h = hist[i];
            hist[i] = run;
            run += h;
        }
        demand[e] = run;
        counts[e] = min(run, p.capacity);
    }
    __syncthreads();  // counts (global) visible to thread 0
    if (threadIdx.x == 0) {
        unsigned* offs = reinterpret_cast<unsigned*>(p.offsets);
        unsigned* tiles = reinterpret_cast<unsigned*>(p.tile_offsets);
        unsigned off = 0, tl = 0;
        for (int e = 0; e < E; e++) {
            offs[e] = off;
            tiles[e] = tl;
            off += counts[e];
            tl += (counts[e] + BM - 1) / BM;
        }
        offs[E] = off;
        tiles[E] = tl;
    }
}

// Ranks in assignment order, one warp per chunk (shared memory as moe_hist): kept iff
// rank < capacity; position/order of the kept, gate 0 and position NONE for the dropped.
extern "C" __global__ void __launch_bounds__(CHUNK_WARPS * 32) moe_scatter(NsMoeDispatchParams p) {
    extern __shared__ unsigned scat_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * CHUNK_WARPS + warp;
    if (c >= p.n_chunks) return;
    const int E = p.n_experts;
    unsigned* cnt = scat_smem + (size_t)warp * E;
    const unsigned* base_in = reinterpret_cast<const unsigned*>(p.chunk_hist) + (size_t)c * E;
    for (int e = lane; e < E; e += 32) cnt[e] = base_in[e];  // assignments to e before this chunk
    __syncwarp();
    const unsigned* experts = reinterpret_cast<const unsigned*>(p.experts);
    const unsigned* offs = reinterpret_cast<const unsigned*>(p.offsets);
    unsigned* order = reinterpret_cast<unsigned*>(p.order);
    unsigned* position = reinterpret_cast<unsigned*>(p.position);
    float* gates = reinterpret_cast<float*>(p.gates);
    const int a0 = c * CHUNK, a1 = min(a0 + CHUNK, p.n_assign);
    for (int base = a0; base < a1; base += 32) {
        const int a = base + lane;
        const bool valid = a < a1;
        const unsigned e = valid ? experts[a] : NONE;
        const unsigned same = __match_any_sync(FULL, e);
        const unsigned before = same & ((1u << lane) - 1);
        if (valid) {
            const unsigned rank = cnt[e] + __popc(before);
            if (rank < p.capacity) {
                const unsigned pos = offs[e] + rank;
                position[a] = pos;
                order[pos] = (unsigned)a;
            } else {
                position[a] = NONE;
                gates[a] = 0.0f;
            }
        }
        __syncwarp();  // every lane has read cnt
        if (valid && before == 0) cnt[e] += __popc(same);
        __syncwarp();
    }
}

// Auxiliary-loss-free balancing (one block): bias[e] -= gamma when counts[e] > mean, += gamma
// when below (compared exactly in integers), and stats = (max/mean, std/mean) in f64 then f32.
extern "C" __global__ void __launch_bounds__(256) moe_balance(NsMoeDispatchParams p) {
    __shared__ unsigned long long total_s;
    const int E = p.n_experts;
    const unsigned* counts = reinterpret_cast<const unsigned*>(p.counts);
    if (threadIdx.x == 0) {
        unsigned long long total = 0;
        unsigned mx = 0;
        for (int e = 0; e < E; e++) {
            total += counts[e];
            mx = max(mx, counts[e]);
        }
        total_s = total;
        if (p.stats) {
            float* st = reinterpret_cast<float*>(p.stats);
            if (total == 0) {
                st[0] = 0.0f;
                st[1] = 0.0f;
            } else {
                const double mean = (double)total / E;
                double var = 0.0;
                for (int e = 0; e < E; e++) var += ((double)counts[e] - mean) * ((double)counts[e] - mean);
                var /= E;
                st[0] = (float)((double)mx / mean);
                st[1] = (float)(sqrt(var) / mean);
            }
        }
    }
    __syncthreads();
    if (!p.bias) return;
    float* bias = reinterpret_cast<float*>(p.bias);
    const unsigned long long total = total_s;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const unsigned long long scaled = (unsigned long long)counts[e] * (unsigned long long)E;
        if (scaled > total) bias[e] -= p.gamma;
        else if (scaled < total) bias[e] += p.gamma;
    }
}

// ---------------------------------------------------------------- expert FFN rows

NS_DEV unsigned kept_rows(const NsMoeRowsParams& p) { return reinterpret_cast<const unsigned*>(p.offsets)[p.n_experts]; }

// xg[p] = x[token(order[p])], one warp per position.
extern "C" __global__ void __launch_bounds__(ROW_WARPS * 32) moe_gather(NsMoeRowsParams p) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (r >= (int)kept_rows(p)) return;
    const unsigned t = reinterpret_cast<const unsigned*>(p.order)[r] / p.top_k;
    const bf16x8* src = reinterpret_cast<const bf16x8*>(reinterpret_cast<const bf16*>(p.x) + (size_t)t * p.c);
    bf16x8* dst = reinterpret_cast<bf16x8*>(reinterpret_cast<bf16*>(p.xg) + (size_t)r * p.c);
    for (int j = lane; j < p.c / 8; j += 32) dst[j] = src[j];
}

// act = silu(hg) * hu over the P kept rows (F % 8 == 0: 8-element groups never straddle rows).
extern "C" __global__ void __launch_bounds__(256) moe_swiglu_fwd(NsMoeRowsParams p) {
    const bf16* hg = reinterpret_cast<const bf16*>(p.hg);
    const bf16* hu = reinterpret_cast<const bf16*>(p.hu);
    bf16* act = reinterpret_cast<bf16*>(p.act);
    const long long groups = (long long)kept_rows(p) * p.f / 8, stride = (long long)gridDim.x * blockDim.x;
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < groups; w += stride) {
        float a[8], b[8];
        load8(hg + 8 * w, a);
        load8(hu + 8 * w, b);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = ns_swiglu(a[j], b[j]);
        store8(act + 8 * w, a);
    }
}

// (dhg, dhu) = ns_swiglu_bwd(hg, hu, d_act).
extern "C" __global__ void __launch_bounds__(256) moe_swiglu_bwd(NsMoeRowsParams p) {
    const bf16* hg = reinterpret_cast<const bf16*>(p.hg);
    const bf16* hu = reinterpret_cast<const bf16*>(p.hu);
    const bf16* da = reinterpret_cast<const bf16*>(p.d_act);
    bf16* dhg = reinterpret_cast<bf16*>(p.dhg);
    bf16* dhu = reinterpret_cast<bf16*>(p.dhu);
    const long long groups = (long long)kept_rows(p) * p.f / 8, stride = (long long)gridDim.x * blockDim.x;
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < groups; w += stride) {
        float g[8], u[8], d[8], og[8], ou[8];
        load8(hg + 8 * w, g);
        load8(hu + 8 * w, u);
        load8(da + 8 * w, d);
#pragma unroll
        for (int j = 0; j < 8; j++) ns_swiglu_bwd(g[j], u[j], d[j], og[j], ou[j]);
        store8(dhg + 8 * w, og);
        store8(dhu + 8 * w, ou);
    }
}

// out[t] = Σ_k gate · y[position(t, k)] over the kept slots in slot order (f32), one warp per token.
extern "C" __global__ void __launch_bounds__(ROW_WARPS * 32) moe_combine(NsMoeRowsParams p) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (t >= p.n) return;
    const unsigned* pos = reinterpret_cast<const unsigned*>(p.position) + (size_t)t * p.top_k;
    const float* gates = reinterpret_cast<const float*>(p.gates) + (size_t)t * p.top_k;
    const bf16* y = reinterpret_cast<const bf16*>(p.y);
    bf16* out = reinterpret_cast<bf16*>(p.out) + (size_t)t * p.c;
    for (int j = lane; j < p.c / 8; j += 32) {
        float o[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v[8];
        for (int k = 0; k < p.top_k; k++) {
            if (pos[k] == NONE) continue;
            load8(y + (size_t)pos[k] * p.c + 8 * j, v);
            const float g = gates[k];
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] += g * v[i];
        }
        store8(out + 8 * j, o);
    }
}

// One warp per kept position p: d_gates[order[p]] = dout[t] · y[p], dy[p] = gate · dout[t].
// (d_gates of dropped assignments: zeroed by the host.)
extern "C" __global__ void __launch_bounds__(ROW_WARPS * 32) moe_combine_bwd(NsMoeRowsParams p) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (r >= (int)kept_rows(p)) return;
    const unsigned a = reinterpret_cast<const unsigned*>(p.order)[r];
    const unsigned t = a / p.top_k;
    const float g = reinterpret_cast<const float*>(p.gates)[a];
    const bf16* d = reinterpret_cast<const bf16*>(p.dout) + (size_t)t * p.c;
    const bf16* y = reinterpret_cast<const bf16*>(p.y) + (size_t)r * p.c;
    bf16* dy = reinterpret_cast<bf16*>(p.dy) + (size_t)r * p.c;
    float dot = 0.0f;
    for (int j = lane; j < p.c / 8; j += 32) {
        float dv[8], yv[8];
        load8(d + 8 * j, dv);
        load8(y + 8 * j, yv);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            dot += dv[i] * yv[i];
            dv[i] *= g;
        }
        store8(dy + 8 * j, dv);
    }
    dot = warp_sum(dot);
    if (lane == 0) reinterpret_cast<float*>(p.d_gates)[a] = dot;
}

// dx[t] = Σ_k dxg[position(t, k)] over the kept slots in slot order (f32), one warp per token.
extern "C" __global__ void __launch_bounds__(ROW_WARPS * 32) moe_scatter_dx(NsMoeRowsParams p) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (t >= p.n) return;
    const unsigned* pos = reinterpret_cast<const unsigned*>(p.position) + (size_t)t * p.top_k;
    const float4* dxg = reinterpret_cast<const float4*>(p.dxg);
    float4* dx = reinterpret_cast<float4*>(reinterpret_cast<float*>(p.dx) + (size_t)t * p.c);
    const int c4 = p.c / 4;
    for (int j = lane; j < c4; j += 32) {
        float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int k = 0; k < p.top_k; k++) {
            if (pos[k] == NONE) continue;
            const float4 v = dxg[(size_t)pos[k] * c4 + j];
            o.x += v.x;
            o.y += v.y;
            o.z += v.z;
            o.w += v.w;
        }
        dx[j] = o;
    }
}

// ---------------------------------------------------------------- grouped GEMMs

// moe_gemm_rows_{tb}_{out}: C[seg] = A[seg] op(B_e) (+ A2[seg] op(B2_e)); grid (row tiles
// upper bound, ceil(n / 128)), 256 threads; tb = nt (B_e stored [n, k]) or nn ([k, n]).
#define NS_MOE_ROWS(NAME, TB, OB) \
    extern "C" __global__ void __launch_bounds__(GT) NAME(NsMoeGemmParams p) { gemm_rows_body<TB, OB>(p); }
NS_MOE_ROWS(moe_gemm_rows_nt_bf16, true, true)
NS_MOE_ROWS(moe_gemm_rows_nn_bf16, false, true)
NS_MOE_ROWS(moe_gemm_rows_nn_f32, false, false)

// C_e [m, n] = A[seg]^T B[seg] per expert (the weight gradients): grid (ceil(n / 128),
// ceil(m / 128), E), 256 threads; f32 C overwritten.
extern "C" __global__ void __launch_bounds__(GT) moe_gemm_experts_tn_f32(NsMoeGemmParams p) {
    __shared__ __align__(16) Smem sm;
    const unsigned* offs = reinterpret_cast<const unsigned*>(p.offsets);
    const int e = blockIdx.z;
    const int row0 = offs[e], rows = offs[e + 1] - row0;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const bf16* A = reinterpret_cast<const bf16*>(p.a) + (size_t)row0 * p.lda;
    const bf16* B = reinterpret_cast<const bf16*>(p.b) + (size_t)row0 * p.ldb;
    float acc[4][4][4];
    zero_acc(acc);
    mma_tile<true, false>(acc, sm, A, B, nullptr, nullptr, p.lda, p.ldb, p.m, p.n, rows, m0, n0);
    store_tile<false>(acc, reinterpret_cast<float*>(p.c) + (size_t)e * p.stride_c, p.ldc, p.m, p.n, m0, n0);
}
