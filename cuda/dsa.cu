// DeepSeek Sparse Attention, the twin of src/backend/cpu/dsa.rs (read its module
// doc for the math): the lightning indexer's scores and exact top-k selection,
// softmax attention over the selected keys (forward and backward, grouped-query)
// and the indexer's KL loss over the selected keys (sparse form) with its
// gradients. bf16 inputs, fp32 math and accumulators. Layouts as the CPU twin:
// q/out/dout [b, t, h, d], k/v [b, t, h_kv, d], lse [b, h, t], qi [b, t, H_I, d_I],
// ki [b, t, d_I], wi [b, t, H_I], sel u32 [b, t, kmax].
//
// Indexer (dsa_index_scores, dsa_index_select), one pair of launches per chunk
// of query rows q0 .. q0 + rows of one batch:
// - scores: one block of 256 threads per (64-query tile, 64-key tile) on or
//   below the diagonal; each thread owns 4 x 4 (query, key) scores. Per index
//   head j: X = q~(t, j) . k~(s) over d_I in chunks of 32 staged in shared
//   memory (fp32, summed in increasing d_I order), then I += w(t, j) ReLU(X)
//   (heads in increasing order from +0, unfused like the CPU). Writes the f32
//   workspace scores[t - q0][s] (row stride t).
// - select: one block per query row. The W most recent keys are always in; the
//   top k of the older keys s < old are found by an exact radix select on the
//   distinct 64-bit keys (order_key(I) << 32 | s): eight passes of 8-bit digits,
//   most significant first, each a shared-memory histogram of the candidates
//   that match the digits chosen so far, then one warp finds the digit where the
//   count from the top reaches the rank still wanted. The result is the exact
//   key tau of the k-th largest entry; {s : key(s) >= tau} has exactly k
//   elements (ties in I go to the larger s, as on the CPU). They are written in
//   increasing s by an ordered stream compaction (ballot + warp prefix counts),
//   so nothing needs sorting; then the window, then PAD up to kmax.
//
// Sparse attention (dsa_{fwd,bwd}_{d64,d128,q96v64,q192v128}: (d_qk, d_v) per
// head; dsa_{fwd,bwd}_latent_q576v512: MQA over MLA's latent, one key head of 576
// whose first 512 columns are the values): one block of 128 threads per (query
// t, batch x kv head), or per chunk of the group's heads when the host splits it
// to fit shared memory. The selected K and V rows of the kv head (the K rows
// only for the latent) are gathered 32 at a time into shared memory (bf16, rows
// padded to D + 2 so that lane m reading row m hits distinct banks) and shared
// by the block's query heads (warp w takes heads w, w + 4, ...). Lane m scores key m;
// online softmax in the log2 domain; each lane owns the output columns
// 2 lane + 64 c (float2), accumulated in shared memory. The backward computes
// P = exp2(S log2e - lse log2e) and dS = P (dO . v - delta) scale per key,
// keeps dq for the block's heads in shared memory (written once, f32), and
// scatter-adds dk = sum_j dS q_j and dv = sum_j P dO_j (summed over the group's
// heads first) into f32 buffers with atomics.
//
// KL (dsa_kl_sparse, dsa_kl_loss): one block of 256 threads per query row,
// four sweeps over its selected entries: (A) per 32-key tile, X and I from
// the gathered index keys and the target's head sum of exp(S_h - lse_h) from
// the gathered keys, kv head by kv head (I kept in g_sel, the target in pt);
// (B) lse_I; (C) the row's KL and G = (r - p) / (B T) into g_sel; (D) X
// recomputed bit-identically, dwi and dqi (registers) and dki (atomics).
// dsa_kl_loss sums the rows' KL in a fixed order (f64) and divides by B T.
// dsa_kl_dense (warm-up, every key s <= t, the dense attention's lse): the same
// block per query row and the same tiles, two sweeps over the keys 0 .. t with
// I and the target recomputed in each (nothing per key is stored): (1) running
// max / sum of exp(I) for lse_I and the target's total Z; (2) the row's KL, G
// and the gradients as (D).
//
// Decode (dsa_index_scores_decode, dsa_index_select_decode, dsa_fwd_decode_d*):
// one new query per sequence at position t - 1 of caches of t positions; the
// scores with the training kernel's arithmetic (same bits), the selection by
// the same select_row, the attention by the same dsa_fwd_body.
#include "common.cuh"

namespace ns_dsa {  // named: an anonymous namespace would put a path hash into the PTX
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr uint32_t PAD = 0xffffffffu;

// ---------------------------------------------------------------- indexer

constexpr int ST = 64;  // queries and keys per score tile
constexpr int SC = 32;  // index-dim chunk staged in shared memory
constexpr int SEL_THREADS = 256;

// Maps f32 onto u32 preserving order (-0 as +0; a NaN beyond +-inf by its sign), as the CPU.
NS_DEV uint32_t order_key(float x) {
    uint32_t b = __float_as_uint(x);
    if (b == 0x80000000u) b = 0;
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

NS_DEV uint64_t sel_key(float x, int s) { return ((uint64_t)order_key(x) << 32) | (uint32_t)s; }

NS_DEV void index_scores(const NsDsaParams& p) {
    __shared__ float Qs[ST][SC + 1];
    __shared__ float Ks[ST][SC + 1];
    const int qa = p.q0 + blockIdx.y * ST;  // first query of the tile
    const int ka = blockIdx.x * ST;         // first key of the tile
    if (ka > qa + ST - 1) return;           // above the diagonal: never read (uniform per block)
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int HI = p.n_index_heads, DI = p.index_dim;
    const bf16* qi = reinterpret_cast<const bf16*>(p.qi);
    const bf16* ki = reinterpret_cast<const bf16*>(p.ki);
    const bf16* wi = reinterpret_cast<const bf16*>(p.wi);
    const size_t tok0 = (size_t)p.bi * p.t;
    float sc[4][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < 4; c++) sc[a][c] = 0.0f;

    for (int j = 0; j < HI; j++) {
        float x[4][4];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int c = 0; c < 4; c++) x[a][c] = 0.0f;
        for (int c0 = 0; c0 < DI; c0 += SC) {
            __syncthreads();  // the previous chunk is no longer read
            for (int e = tid; e < ST * SC; e += 256) {
                const int r = e / SC, c = e % SC, i = qa + r, s = ka + r, col = c0 + c;
                const bool cok = col < DI;
                Qs[r][c] = (cok && i < p.t) ? bf2f(qi[((tok0 + i) * HI + j) * DI + col]) : 0.0f;
                Ks[r][c] = (cok && s < p.t) ? bf2f(ki[(tok0 + s) * DI + col]) : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int c = 0; c < SC; c++) {
                float qv[4], kv[4];
#pragma unroll
                for (int a = 0; a < 4; a++) qv[a] = Qs[ty + 16 * a][c];
#pragma unroll
                for (int b = 0; b < 4; b++) kv[b] = Ks[tx + 16 * b][c];
#pragma unroll
                for (int a = 0; a < 4; a++)
#pragma unroll
                    for (int b = 0; b < 4; b++) x[a][b] = fmaf(qv[a], kv[b], x[a][b]);
            }
        }
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const int i = qa + ty + 16 * a;
            const float w = i < p.t ? bf2f(wi[(tok0 + i) * HI + j]) : 0.0f;
#pragma unroll
            for (int b = 0; b < 4; b++) sc[a][b] = __fadd_rn(sc[a][b], __fmul_rn(w, fmaxf(x[a][b], 0.0f)));
        }
    }
    float* scores = reinterpret_cast<float*>(p.scores);
#pragma unroll
    for (int a = 0; a < 4; a++) {
        const int i = qa + ty + 16 * a;
        if (i >= p.t || i >= p.q0 + p.rows) continue;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const int s = ka + tx + 16 * b;
            if (s < p.t) scores[(size_t)(i - p.q0) * p.t + s] = sc[a][b];
        }
    }
}

// The selection A(i) of query position i from its scores row[0 .. i] into out[0 .. kmax]
// (one block of SEL_THREADS threads; the caller's condition for calling is uniform per block).
NS_DEV void select_row(const float* row, uint32_t* out, int i, int topk, int window, int kmax) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t warp_cnt[SEL_THREADS / 32];
    __shared__ int s_digit;
    __shared__ uint32_t s_rem;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = i + 1;
    const int old = max(n - window, 0);  // keys 0 .. old compete, old .. n are the window
    const int n_top = min(topk, old);

    if (n_top == old) {
        for (int m = tid; m < old; m += SEL_THREADS) out[m] = (uint32_t)m;
    } else if (n_top > 0) {
        // Radix select of the n_top-th largest 64-bit key.
        uint64_t prefix = 0, mask = 0;
        uint32_t rem = (uint32_t)n_top;  // rank still wanted among the candidates matching prefix
        for (int shift = 56; shift >= 0; shift -= 8) {
            hist[tid] = 0;  // SEL_THREADS == 256 bins
            __syncthreads();
            for (int s = tid; s < old; s += SEL_THREADS) {
                const uint64_t key = sel_key(row[s], s);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
            }
            __syncthreads();
            if (warp == 0) {
                // lane owns bins 8 lane .. 8 lane + 7; suffix sums over lanes from the top
                uint32_t c[8], tot = 0;
#pragma unroll
                for (int b = 0; b < 8; b++) {
                    c[b] = hist[lane * 8 + b];
                    tot += c[b];
                }
                uint32_t suf = tot;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const uint32_t v = __shfl_down_sync(0xffffffffu, suf, o);
                    if (lane + o < 32) suf += v;
                }
                uint32_t above = suf - tot;  // candidates in the bins of higher lanes
                if (above < rem && rem <= suf) {
                    for (int b = 7; b >= 0; b--) {
                        if (above + c[b] >= rem) {
                            s_digit = lane * 8 + b;
                            s_rem = rem - above;
                            break;
                        }
                        above += c[b];
                    }
                }
            }
            __syncthreads();
            prefix |= (uint64_t)s_digit << shift;
            mask |= (uint64_t)0xff << shift;
            rem = s_rem;
            // s_digit and hist are next written after the first barrier of the next pass.
        }
        // Ordered compaction of {s : key(s) >= tau}: exactly n_top entries, increasing s.
        int base = 0;
        for (int s0 = 0; s0 < old; s0 += SEL_THREADS) {
            const int s = s0 + tid;
            const bool take = s < old && sel_key(row[s], s) >= prefix;
            const uint32_t ballot = __ballot_sync(0xffffffffu, take);
            if (lane == 0) warp_cnt[warp] = __popc(ballot);
            __syncthreads();
            int off = base, total = 0;
#pragma unroll
            for (int w = 0; w < SEL_THREADS / 32; w++) {
                if (w < warp) off += warp_cnt[w];
                total += warp_cnt[w];
            }
            if (take) out[off + __popc(ballot & ((1u << lane) - 1u))] = (uint32_t)s;
            base += total;
            __syncthreads();  // warp_cnt is rewritten by the next chunk
        }
    }
    for (int m = tid; m < n - old; m += SEL_THREADS) out[n_top + m] = (uint32_t)(old + m);
    for (int m = n_top + (n - old) + tid; m < kmax; m += SEL_THREADS) out[m] = PAD;
}

NS_DEV void index_select(const NsDsaParams& p) {
    const int r = blockIdx.x, i = p.q0 + r;
    if (i >= p.t) return;  // uniform per block
    uint32_t* out = reinterpret_cast<uint32_t*>(p.sel) + ((size_t)p.bi * p.t + i) * p.kmax;
    const float* row = reinterpret_cast<const float*>(p.scores) + (size_t)r * p.t;
    select_row(row, out, i, p.topk, p.window, p.kmax);
}

// ------------------------------------------------------------ sparse attention

constexpr int KT = 32;  // selected keys per tile (one per lane)
constexpr int ATT_THREADS = 128;
constexpr int ATT_WARPS = ATT_THREADS / 32;

// Number of entries of a sel row before its first PAD (kmax when none). Ends with a barrier.
NS_DEV int row_len(const uint32_t* sel, int kmax, int* n_s) {
    if (threadIdx.x == 0) *n_s = kmax;
    __syncthreads();
    for (int m = threadIdx.x; m < kmax; m += blockDim.x)
        if (sel[m] == PAD) atomicMin(n_s, m);
    __syncthreads();
    return *n_s;
}

// idx[r] = key of entry m0 + r, or -1 past the row or when not causal (never read then).
NS_DEV void load_idx(int* idx, const uint32_t* sel, int m0, int n, int i) {
    if (threadIdx.x < KT) {
        const int m = m0 + threadIdx.x;
        int s = -1;
        if (m < n) {
            const uint32_t e = sel[m];
            if (e <= (uint32_t)i) s = (int)e;
        }
        idx[threadIdx.x] = s;
    }
}

// KT gathered rows of `width` bf16 (even) into shared [KT][width + 2]; zeros where idx < 0.
NS_DEV void gather_rows(bf16* dst, const bf16* base, size_t row_stride, const int* idx, int width) {
    const int words = width / 2, ld = (width + 2) / 2;
    uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
    for (int e = threadIdx.x; e < KT * words; e += blockDim.x) {
        const int r = e / words, c = e % words, s = idx[r];
        d32[r * ld + c] = s >= 0 ? reinterpret_cast<const uint32_t*>(base + (size_t)s * row_stride)[c] : 0u;
    }
}

NS_DEV float2 ld_bf2(const bf16* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); }

// dot of two bf16 vectors of length n (even) in shared memory, fp32, increasing order.
NS_DEV float dot_bf(const bf16* a, const bf16* b, int n) {
    float acc = 0.0f;
    for (int c = 0; c < n; c += 2) {
        const float2 x = ld_bf2(a + c), y = ld_bf2(b + c);
        acc = fmaf(x.x, y.x, acc);
        acc = fmaf(x.y, y.y, acc);
    }
    return acc;
}

// Head shapes (DQ, DV, VK): queries and keys DQ wide, values DV wide; VK = the values are the
// first DV columns of the key rows (MQA over MLA's latent: one key row [c_kv | k_pe] per token,
// h_kv = 1, v = c_kv), so only the key rows are gathered and dv is added into dk's first DV
// columns. A block serves `hb` query heads of one kv group (hb = the group, or a chunk of it when
// the host splits the group across gridDim.y: every head of a chunk reads the same gathered rows).
// Dynamic shared memory in bytes for hb heads (mirrored in src/backend/cuda/dsa.rs).
template <int DQ, int DV, bool VK>
constexpr int fwd_smem(int hb) {
    return (hb * DV + 2 * hb + KT + 1) * 4 + ((VK ? 1 : 2) * KT * (DQ + 2) + hb * DQ) * 2 - (VK ? 0 : 2 * KT * (DQ - DV));
}
template <int DQ, int DV, bool VK>
constexpr int bwd_smem(int hb) {
    return (hb * DQ + 2 * hb + 2 * hb * KT + KT + 1) * 4 + ((VK ? 1 : 2) * KT * (DQ + 2) + hb * (DQ + DV)) * 2 -
           (VK ? 0 : 2 * KT * (DQ - DV));
}

// The heads of this block: blockIdx.y = (bi h_kv + g) nch + c (nch chunks per kv group, the
// host's choice); chunk c holds the group's heads j0 .. j0 + nh.
struct HeadChunk {
    int bi, g, j0, nh;
};
NS_DEV HeadChunk head_chunk(const NsDsaParams& p, int gs) {
    const int nch = gridDim.y / (p.b * p.h_kv), hb = (gs + nch - 1) / nch;
    const int c = blockIdx.y % nch, bg = blockIdx.y / nch;
    const int j0 = c * hb;
    return HeadChunk{bg / p.h_kv, bg % p.h_kv, j0, max(0, min(gs, j0 + hb) - j0)};
}

// The forward of one query row at causal position i against the keys of batch bi, kv head g, for
// the group's heads j0 .. j0 + nh: its q/out/sel row is `tok`, its lse of head hq at
// ((bi h + hq) lse_ld + lse_col).
template <int DQ, int DV, bool VK>
NS_DEV void dsa_fwd_body(const NsDsaParams& p, int i, HeadChunk hc, size_t tok, int lse_ld, int lse_col) {
    constexpr int LD = DQ + 2, LDV = VK ? LD : DV + 2, NP = DV / 64;  // NP: column pairs per lane
    static_assert(DV % 64 == 0 && DQ % 2 == 0 && DQ >= DV, "DV a multiple of 64, DQ even and >= DV");
    const int gs = p.h / p.h_kv, nh = hc.nh, bi = hc.bi, g = hc.g;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* Os = reinterpret_cast<float*>(smem_raw);  // [nh][DV]
    float* ml = Os + nh * DV;                        // [nh][2]: running max (log2 domain), sum
    int* idx = reinterpret_cast<int*>(ml + 2 * nh);  // [KT]
    int* n_s = idx + KT;
    bf16* Ks = reinterpret_cast<bf16*>(n_s + 1);      // [KT][LD]
    bf16* Vs = VK ? Ks : Ks + KT * LD;                // [KT][LDV] (the key rows for VK)
    bf16* Qs = VK ? Ks + KT * LD : Vs + KT * LDV;     // [nh][DQ]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t kv_stride = (size_t)p.h_kv * DQ, v_stride = (size_t)p.h_kv * DV;
    const uint32_t* sel = reinterpret_cast<const uint32_t*>(p.sel) + tok * p.kmax;
    const bf16* kb = reinterpret_cast<const bf16*>(p.k) + (size_t)bi * p.t * kv_stride + (size_t)g * DQ;
    const bf16* vb = reinterpret_cast<const bf16*>(p.v) + (size_t)bi * p.t * v_stride + (size_t)g * DV;
    const size_t h0 = tok * p.h + (size_t)g * gs + hc.j0;  // the chunk's heads are consecutive

    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const bf16*>(p.q) + h0 * DQ);
    for (int e = threadIdx.x; e < nh * DQ / 2; e += ATT_THREADS) reinterpret_cast<uint32_t*>(Qs)[e] = q32[e];
    for (int e = threadIdx.x; e < nh * DV; e += ATT_THREADS) Os[e] = 0.0f;
    for (int e = threadIdx.x; e < nh; e += ATT_THREADS) ml[2 * e] = -INFINITY, ml[2 * e + 1] = 0.0f;
    const int n = row_len(sel, p.kmax, n_s);  // ends with a barrier: Qs, Os, ml are ready
    const float sl2 = p.scale * LOG2E;

    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();  // the previous tile is no longer read
        load_idx(idx, sel, m0, n, i);
        __syncthreads();
        gather_rows(Ks, kb, kv_stride, idx, DQ);
        if (!VK) gather_rows(Vs, vb, v_stride, idx, DV);
        __syncthreads();
        const bool valid = idx[lane] >= 0;
        for (int j = warp; j < nh; j += ATT_WARPS) {
            const float x = valid ? dot_bf(Qs + j * DQ, Ks + lane * LD, DQ) * sl2 : -INFINITY;
            const float m_old = ml[2 * j], l_old = ml[2 * j + 1];
            const float m_new = fmaxf(m_old, warp_max(x));
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float pv = exp2f(x - m_use);  // 0 for masked keys
            const float alpha = m_old == -INFINITY ? 0.0f : exp2f(m_old - m_use);
            const float lsum = warp_sum(pv);
            float* o = Os + j * DV;
#pragma unroll
            for (int cc = 0; cc < NP; cc++) {
                const int col = 2 * lane + 64 * cc;
                float2 acc = *reinterpret_cast<float2*>(o + col);
                acc.x *= alpha;
                acc.y *= alpha;
#pragma unroll 8
                for (int mm = 0; mm < KT; mm++) {
                    const float pm = __shfl_sync(0xffffffffu, pv, mm);
                    const float2 vv = ld_bf2(Vs + mm * LDV + col);
                    acc.x = fmaf(pm, vv.x, acc.x);
                    acc.y = fmaf(pm, vv.y, acc.y);
                }
                *reinterpret_cast<float2*>(o + col) = acc;
            }
            __syncwarp();  // every lane has read ml[j] before lane 0 rewrites it
            if (lane == 0) ml[2 * j] = m_new, ml[2 * j + 1] = l_old * alpha + lsum;
        }
    }
    __syncwarp();  // a warp reads only its own heads' Os and ml below
    bf16* ob = reinterpret_cast<bf16*>(p.out) + h0 * DV;
    float* lse = reinterpret_cast<float*>(p.lse);
    for (int j = warp; j < nh; j += ATT_WARPS) {
        const float m = ml[2 * j], l = ml[2 * j + 1];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // l = 0 only for an empty row (the CPU rejects those)
#pragma unroll
        for (int cc = 0; cc < NP; cc++) {
            const int col = 2 * lane + 64 * cc;
            const float2 o = *reinterpret_cast<const float2*>(Os + j * DV + col);
            *reinterpret_cast<uint32_t*>(ob + (size_t)j * DV + col) = pack_bf16(o.x * inv, o.y * inv);
        }
        if (lane == 0)
            lse[((size_t)bi * p.h + (size_t)g * gs + hc.j0 + j) * lse_ld + lse_col] =
                l > 0.0f ? (m + log2f(l)) * LN2 : -INFINITY;
    }
}

template <int DQ, int DV, bool VK>
NS_DEV void dsa_bwd_body(const NsDsaParams& p) {
    constexpr int LD = DQ + 2, LDV = VK ? LD : DV + 2, NP = DV / 64, NPQ = (DQ / 2 + 31) / 32;
    static_assert(DV % 64 == 0 && DQ % 2 == 0 && DQ >= DV, "DV a multiple of 64, DQ even and >= DV");
    const int gs = p.h / p.h_kv;
    const HeadChunk hc = head_chunk(p, gs);
    const int nh = hc.nh, bi = hc.bi, g = hc.g;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* dQ = reinterpret_cast<float*>(smem_raw);  // [nh][DQ]
    float* delta = dQ + nh * DQ;                     // [nh]
    float* lse2 = delta + nh;                        // [nh]: lse * log2e
    float* P = lse2 + nh;                            // [nh][KT]
    float* dS = P + nh * KT;                         // [nh][KT]
    int* idx = reinterpret_cast<int*>(dS + nh * KT);  // [KT]
    int* n_s = idx + KT;
    bf16* Ks = reinterpret_cast<bf16*>(n_s + 1);   // [KT][LD]
    bf16* Vs = VK ? Ks : Ks + KT * LD;             // [KT][LDV]
    bf16* Qs = VK ? Ks + KT * LD : Vs + KT * LDV;  // [nh][DQ]
    bf16* dOs = Qs + nh * DQ;                      // [nh][DV]

    const int i = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t kv_stride = (size_t)p.h_kv * DQ, v_stride = (size_t)p.h_kv * DV;
    const size_t tok = (size_t)bi * p.t + i;
    const uint32_t* sel = reinterpret_cast<const uint32_t*>(p.sel) + tok * p.kmax;
    const size_t k_base = (size_t)bi * p.t * kv_stride + (size_t)g * DQ;
    const size_t v_base = (size_t)bi * p.t * v_stride + (size_t)g * DV;
    const bf16* kb = reinterpret_cast<const bf16*>(p.k) + k_base;
    const bf16* vb = reinterpret_cast<const bf16*>(p.v) + v_base;
    float* dkb = reinterpret_cast<float*>(p.dk) + k_base;
    // VK: dv goes into dk's first DV columns (the values are those columns of the key rows)
    float* dvb = VK ? dkb : reinterpret_cast<float*>(p.dv) + v_base;
    const size_t dv_stride = VK ? kv_stride : v_stride;
    const size_t h0 = tok * p.h + (size_t)g * gs + hc.j0;

    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const bf16*>(p.q) + h0 * DQ);
    const uint32_t* do32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const bf16*>(p.dout) + h0 * DV);
    for (int e = threadIdx.x; e < nh * DQ / 2; e += ATT_THREADS) reinterpret_cast<uint32_t*>(Qs)[e] = q32[e];
    for (int e = threadIdx.x; e < nh * DV / 2; e += ATT_THREADS) reinterpret_cast<uint32_t*>(dOs)[e] = do32[e];
    for (int e = threadIdx.x; e < nh * DQ; e += ATT_THREADS) dQ[e] = 0.0f;
    // delta_j = dout_j . out_j (from global), one warp per head
    const bf16* ob = reinterpret_cast<const bf16*>(p.out) + h0 * DV;
    const bf16* dob = reinterpret_cast<const bf16*>(p.dout) + h0 * DV;
    for (int j = warp; j < nh; j += ATT_WARPS) {
        float s = 0.0f;
#pragma unroll
        for (int cc = 0; cc < NP; cc++) {
            const int col = 2 * lane + 64 * cc;
            const float2 o = ld_bf2(ob + (size_t)j * DV + col), d = ld_bf2(dob + (size_t)j * DV + col);
            s += o.x * d.x + o.y * d.y;
        }
        s = warp_sum(s);
        if (lane == 0) {
            delta[j] = s;
            lse2[j] =
                reinterpret_cast<const float*>(p.lse)[((size_t)bi * p.h + (size_t)g * gs + hc.j0 + j) * p.t + i] * LOG2E;
        }
    }
    const int n = row_len(sel, p.kmax, n_s);  // ends with a barrier
    const float sl2 = p.scale * LOG2E;

    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();  // the previous tile (Ks, Vs, idx, P, dS) is no longer read
        load_idx(idx, sel, m0, n, i);
        __syncthreads();
        gather_rows(Ks, kb, kv_stride, idx, DQ);
        if (!VK) gather_rows(Vs, vb, v_stride, idx, DV);
        __syncthreads();
        const bool valid = idx[lane] >= 0;
        for (int j = warp; j < nh; j += ATT_WARPS) {
            float pv = 0.0f, ds = 0.0f;
            if (valid) {
                const float sdot = dot_bf(Qs + j * DQ, Ks + lane * LD, DQ);
                const float dpdot = dot_bf(dOs + j * DV, Vs + lane * LDV, DV);
                pv = exp2f(sdot * sl2 - lse2[j]);
                ds = pv * (dpdot - delta[j]) * p.scale;
            }
            P[j * KT + lane] = pv;
            dS[j * KT + lane] = ds;
            float* dq = dQ + j * DQ;
#pragma unroll
            for (int cc = 0; cc < NPQ; cc++) {
                const int col = 2 * lane + 64 * cc;
                const bool on = col < DQ;  // (uniform shuffles: every lane takes part)
                float2 acc = on ? *reinterpret_cast<float2*>(dq + col) : make_float2(0.0f, 0.0f);
#pragma unroll 8
                for (int mm = 0; mm < KT; mm++) {
                    const float dsm = __shfl_sync(0xffffffffu, ds, mm);
                    if (on) {
                        const float2 kk = ld_bf2(Ks + mm * LD + col);
                        acc.x = fmaf(dsm, kk.x, acc.x);
                        acc.y = fmaf(dsm, kk.y, acc.y);
                    }
                }
                if (on) *reinterpret_cast<float2*>(dq + col) = acc;
            }
        }
        __syncthreads();  // P, dS of every head are ready
        // dk[s] += sum_j dS[j][m] q_j (DQ columns), dv[s] += sum_j P[j][m] dO_j (DV columns):
        // one column pair per thread, summed over the block's heads before the atomics
        for (int e = threadIdx.x; e < KT * (DQ / 2); e += ATT_THREADS) {
            const int r = e / (DQ / 2), col = 2 * (e % (DQ / 2)), s = idx[r];
            if (s < 0) continue;
            float2 dk = make_float2(0.0f, 0.0f);
            for (int j = 0; j < nh; j++) {
                const float a = dS[j * KT + r];
                const float2 qv = ld_bf2(Qs + j * DQ + col);
                dk.x = fmaf(a, qv.x, dk.x);
                dk.y = fmaf(a, qv.y, dk.y);
            }
            const size_t off = (size_t)s * kv_stride + col;
            atomicAdd(dkb + off, dk.x);
            atomicAdd(dkb + off + 1, dk.y);
        }
        for (int e = threadIdx.x; e < KT * (DV / 2); e += ATT_THREADS) {
            const int r = e / (DV / 2), col = 2 * (e % (DV / 2)), s = idx[r];
            if (s < 0) continue;
            float2 dv = make_float2(0.0f, 0.0f);
            for (int j = 0; j < nh; j++) {
                const float b = P[j * KT + r];
                const float2 dov = ld_bf2(dOs + j * DV + col);
                dv.x = fmaf(b, dov.x, dv.x);
                dv.y = fmaf(b, dov.y, dv.y);
            }
            const size_t off = (size_t)s * dv_stride + col;
            atomicAdd(dvb + off, dv.x);
            atomicAdd(dvb + off + 1, dv.y);
        }
    }
    __syncthreads();
    float* dqg = reinterpret_cast<float*>(p.dq) + h0 * DQ;
    for (int e = threadIdx.x; e < nh * DQ; e += ATT_THREADS) dqg[e] = dQ[e];
}

// ---------------------------------------------------------------- indexer KL

constexpr int KL_THREADS = 256;
constexpr int KL_MAXE = 32;  // dqi elements per thread: n_index_heads * index_dim <= 8192

// Dynamic shared memory in bytes (mirrored in src/backend/cuda/dsa.rs).
constexpr int kl_smem(int hi, int di, int d, int h, int gs) {
    return (hi * KT + gs * KT + h + hi + KT + 32 + KT + 1) * 4 + (hi * di + KT * (di + 2) + KT * (d + 2)) * 2;
}

NS_DEV float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// X[j][m] = q~(t, j) . k~(s_m) for the tile (zeros for invalid keys), thread mapping fixed so
// that sweeps A and D compute bit-identical values.
NS_DEV void index_x_tile(float* X, const bf16* qi_s, const bf16* kit, int HI, int DI) {
    for (int e = threadIdx.x; e < HI * KT; e += KL_THREADS) {
        const int j = e / KT, m = e % KT;
        X[e] = dot_bf(qi_s + j * DI, kit + m * (DI + 2), DI);
    }
}

NS_DEV void kl_sparse(const NsDsaParams& p) {
    const int HI = p.n_index_heads, DI = p.index_dim, D = p.d, H = p.h, gs = p.h / p.h_kv;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* X = reinterpret_cast<float*>(smem_raw);  // [HI][KT]
    float* E = X + HI * KT;                         // [gs][KT]: exp(S_h - lse_h) of one kv group
    float* lse2 = E + gs * KT;                      // [H]
    float* w_s = lse2 + H;                          // [HI]
    float* G_s = w_s + HI;                          // [KT]
    float* red = G_s + KT;                          // [32]
    int* idx = reinterpret_cast<int*>(red + 32);    // [KT]
    int* n_s = idx + KT;
    bf16* qi_s = reinterpret_cast<bf16*>(n_s + 1);  // [HI][DI]
    bf16* kit = qi_s + HI * DI;                     // [KT][DI + 2]
    bf16* kt = kit + KT * (DI + 2);                 // [KT][D + 2]

    const int i = blockIdx.x, bi = blockIdx.y, tid = threadIdx.x;
    const size_t tok = (size_t)bi * p.t + i;
    const uint32_t* sel = reinterpret_cast<const uint32_t*>(p.sel) + tok * p.kmax;
    float* gsel = reinterpret_cast<float*>(p.g_sel) + tok * p.kmax;
    float* pts = reinterpret_cast<float*>(p.pt) + tok * p.kmax;
    const bf16* kib = reinterpret_cast<const bf16*>(p.ki) + (size_t)bi * p.t * DI;
    const bf16* qrow = reinterpret_cast<const bf16*>(p.q) + tok * H * D;
    const size_t kv_stride = (size_t)p.h_kv * D;
    const bf16* kb = reinterpret_cast<const bf16*>(p.k) + (size_t)bi * p.t * kv_stride;

    const uint32_t* qi32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const bf16*>(p.qi) + tok * HI * DI);
    for (int e = tid; e < HI * DI / 2; e += KL_THREADS) reinterpret_cast<uint32_t*>(qi_s)[e] = qi32[e];
    for (int e = tid; e < H; e += KL_THREADS)
        lse2[e] = reinterpret_cast<const float*>(p.lse)[((size_t)bi * H + e) * p.t + i] * LOG2E;
    for (int e = tid; e < HI; e += KL_THREADS) w_s[e] = bf2f(reinterpret_cast<const bf16*>(p.wi)[tok * HI + e]);
    const int n = row_len(sel, p.kmax, n_s);  // ends with a barrier
    const float c = p.scale * LOG2E;

    // (A) I and the target's head sum per selected entry
    float mx = -INFINITY, psum = 0.0f;
    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();
        load_idx(idx, sel, m0, n, i);
        __syncthreads();
        gather_rows(kit, kib, DI, idx, DI);
        __syncthreads();
        index_x_tile(X, qi_s, kit, HI, DI);
        float pt_acc = 0.0f;  // thread m < KT: heads added in increasing order, as the CPU
        for (int g = 0; g < p.h_kv; g++) {
            __syncthreads();  // kt and E are free
            gather_rows(kt, kb + (size_t)g * D, kv_stride, idx, D);
            __syncthreads();
            for (int e = tid; e < gs * KT; e += KL_THREADS) {
                const int jj = e / KT, m = e % KT, hq = g * gs + jj;
                float v = 0.0f;
                if (idx[m] >= 0) {
                    // q row from global: every lane of a warp reads the same head (a broadcast)
                    float acc = 0.0f;
                    const bf16* qh = qrow + (size_t)hq * D;
                    const bf16* kr = kt + m * (D + 2);
                    for (int cc = 0; cc < D; cc += 2) {
                        const float2 x = ld_bf2(qh + cc), y = ld_bf2(kr + cc);
                        acc = fmaf(x.x, y.x, acc);
                        acc = fmaf(x.y, y.y, acc);
                    }
                    v = exp2f(acc * c - lse2[hq]);
                }
                E[e] = v;
            }
            __syncthreads();
            if (tid < KT)
                for (int jj = 0; jj < gs; jj++) pt_acc += E[jj * KT + tid];
        }
        // X was written before the kv-head loop's barriers
        if (tid < KT && m0 + tid < n) {
            float sc = 0.0f;
            for (int j = 0; j < HI; j++) sc = __fadd_rn(sc, __fmul_rn(w_s[j], fmaxf(X[j * KT + tid], 0.0f)));
            if (idx[tid] < 0) sc = -INFINITY, pt_acc = 0.0f;  // a non-causal entry (the CPU rejects those)
            gsel[m0 + tid] = sc;
            pts[m0 + tid] = pt_acc;
            mx = fmaxf(mx, sc);
            psum += pt_acc;
        }
    }
    mx = block_max(mx, red);
    const float inv_z = 1.0f / block_sum(psum, red);
    // (B) lse_I
    float es = 0.0f;
    for (int m = tid; m < n; m += KL_THREADS) es += exp2f((gsel[m] - mx) * LOG2E);
    const float lse_i = mx + logf(block_sum(es, red));
    // (C) KL of the row and G = (r - p) / (B T)
    float loss = 0.0f;
    for (int m = tid; m < n; m += KL_THREADS) {
        const float sc = gsel[m], pm = pts[m] * inv_z;
        if (pm > 0.0f) loss += pm * (logf(pm) - (sc - lse_i));
        gsel[m] = (exp2f((sc - lse_i) * LOG2E) - pm) * p.inv_bt;
    }
    loss = block_sum(loss, red);  // its barriers also publish gsel to the block
    if (tid == 0) reinterpret_cast<float*>(p.loss_rows)[tok] = loss;

    // (D) dwi = sum G ReLU(X), dqi = sum [X > 0] G w k~, dki(s) += sum_j [X > 0] G w q~_j
    float acc[KL_MAXE];
#pragma unroll
    for (int r = 0; r < KL_MAXE; r++) acc[r] = 0.0f;
    float dw = 0.0f;
    float* dkib = reinterpret_cast<float*>(p.dki) + (size_t)bi * p.t * DI;
    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();
        load_idx(idx, sel, m0, n, i);
        if (tid < KT) G_s[tid] = m0 + tid < n ? gsel[m0 + tid] : 0.0f;
        __syncthreads();
        gather_rows(kit, kib, DI, idx, DI);
        __syncthreads();
        index_x_tile(X, qi_s, kit, HI, DI);
        __syncthreads();
        if (tid < HI)
            for (int m = 0; m < KT; m++) {
                const float xv = X[tid * KT + m];
                if (xv > 0.0f && idx[m] >= 0) dw += G_s[m] * xv;
            }
#pragma unroll
        for (int r = 0; r < KL_MAXE; r++) {
            const int e = tid + r * KL_THREADS;
            if (e < HI * DI) {
                const int j = e / DI, cc = e % DI;
                const float wj = w_s[j];
                for (int m = 0; m < KT; m++)
                    if (X[j * KT + m] > 0.0f && idx[m] >= 0)
                        acc[r] = fmaf(G_s[m] * wj, bf2f(kit[m * (DI + 2) + cc]), acc[r]);
            }
        }
        for (int e = tid; e < KT * DI; e += KL_THREADS) {
            const int m = e / DI, cc = e % DI, s = idx[m];
            if (s < 0) continue;
            float v = 0.0f;
            for (int j = 0; j < HI; j++)
                if (X[j * KT + m] > 0.0f) v = fmaf(G_s[m] * w_s[j], bf2f(qi_s[j * DI + cc]), v);
            atomicAdd(dkib + (size_t)s * DI + cc, v);
        }
    }
    float* dqi = reinterpret_cast<float*>(p.dqi) + tok * HI * DI;
#pragma unroll
    for (int r = 0; r < KL_MAXE; r++) {
        const int e = tid + r * KL_THREADS;
        if (e < HI * DI) dqi[e] = acc[r];
    }
    if (tid < HI) reinterpret_cast<float*>(p.dwi)[tok * HI + tid] = dw;
}

// The dense row i's tile of keys m0 .. m0 + KT: idx = the key, or -1 past i.
NS_DEV void load_idx_dense(int* idx, int m0, int i) {
    if (threadIdx.x < KT) {
        const int s = m0 + threadIdx.x;
        idx[threadIdx.x] = s <= i ? s : -1;
    }
}

// Shared memory of the KL kernels (both forms; sizes in kl_smem).
struct KlSmem {
    float *X, *E, *lse2, *w_s, *G_s, *red;
    int *idx, *n_s;
    bf16 *qi_s, *kit, *kt;
};

NS_DEV KlSmem kl_smem_carve(unsigned char* raw, int HI, int DI, int gs, int H) {
    KlSmem m;
    m.X = reinterpret_cast<float*>(raw);  // [HI][KT]
    m.E = m.X + HI * KT;                  // [gs][KT]: exp(S_h - lse_h) of one kv group
    m.lse2 = m.E + gs * KT;               // [H]
    m.w_s = m.lse2 + H;                   // [HI]
    m.G_s = m.w_s + HI;                   // [KT]
    m.red = m.G_s + KT;                   // [32]
    m.idx = reinterpret_cast<int*>(m.red + 32);  // [KT]
    m.n_s = m.idx + KT;
    m.qi_s = reinterpret_cast<bf16*>(m.n_s + 1);  // [HI][DI]
    m.kit = m.qi_s + HI * DI;                     // [KT][DI + 2]
    m.kt = m.kit + KT * (DI + 2);                 // [KT][D + 2]
    return m;
}

// One tile of the dense KL (idx published by a barrier): gathers the index keys into kit and
// computes X (kept for the caller), then the target's head sum kv head by kv head, as sweep (A)
// of kl_sparse. Returns, in threads tid < KT with idx[tid] >= 0, (I, head sum) of key idx[tid]
// (the same bits on every call for the same key). Ends after a barrier that follows the X writes.
NS_DEV float2 kl_dense_tile(const NsDsaParams& p, KlSmem m, const bf16* kib, const bf16* kb,
                            const bf16* qrow, float c) {
    const int HI = p.n_index_heads, DI = p.index_dim, D = p.d, gs = p.h / p.h_kv, tid = threadIdx.x;
    const size_t kv_stride = (size_t)p.h_kv * D;
    gather_rows(m.kit, kib, DI, m.idx, DI);
    __syncthreads();
    index_x_tile(m.X, m.qi_s, m.kit, HI, DI);
    float pt_acc = 0.0f;  // thread tid < KT: heads added in increasing order, as the CPU
    for (int g = 0; g < p.h_kv; g++) {
        __syncthreads();  // kt and E are free
        gather_rows(m.kt, kb + (size_t)g * D, kv_stride, m.idx, D);
        __syncthreads();
        for (int e = tid; e < gs * KT; e += KL_THREADS) {
            const int jj = e / KT, mm = e % KT, hq = g * gs + jj;
            float v = 0.0f;
            if (m.idx[mm] >= 0) {
                float acc = 0.0f;
                const bf16* qh = qrow + (size_t)hq * D;
                const bf16* kr = m.kt + mm * (D + 2);
                for (int cc = 0; cc < D; cc += 2) {
                    const float2 x = ld_bf2(qh + cc), y = ld_bf2(kr + cc);
                    acc = fmaf(x.x, y.x, acc);
                    acc = fmaf(x.y, y.y, acc);
                }
                v = exp2f(acc * c - m.lse2[hq]);
            }
            m.E[e] = v;
        }
        __syncthreads();
        if (tid < KT)
            for (int jj = 0; jj < gs; jj++) pt_acc += m.E[jj * KT + tid];
    }
    float sc = 0.0f;
    if (tid < KT)  // X was written before the kv-head loop's barriers (h_kv >= 1)
        for (int j = 0; j < HI; j++) sc = __fadd_rn(sc, __fmul_rn(m.w_s[j], fmaxf(m.X[j * KT + tid], 0.0f)));
    return make_float2(sc, pt_acc);
}

// Dense KL (warm-up; S(t) = every s <= t): one block of 256 threads per query row, two sweeps
// over its keys in tiles of KT, nothing kept per key. (1) I and the target's head sum per key:
// a running (max, sum of exp) per thread for lse_I and the sum Z. (2) The same values
// recomputed bit-identically, then the row's KL terms p (ln p - (I - lse_I)), G = (r - p) / (B T),
// and dwi, dqi (registers) and dki (atomics) exactly as sweep (D) of kl_sparse.
NS_DEV void kl_dense(const NsDsaParams& p) {
    const int HI = p.n_index_heads, DI = p.index_dim, D = p.d, H = p.h, gs = p.h / p.h_kv;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const KlSmem m = kl_smem_carve(smem_raw, HI, DI, gs, H);
    const int i = blockIdx.x, bi = blockIdx.y, tid = threadIdx.x;
    const size_t tok = (size_t)bi * p.t + i;
    const bf16* kib = reinterpret_cast<const bf16*>(p.ki) + (size_t)bi * p.t * DI;
    const bf16* qrow = reinterpret_cast<const bf16*>(p.q) + tok * H * D;
    const bf16* kb = reinterpret_cast<const bf16*>(p.k) + (size_t)bi * p.t * p.h_kv * D;

    const uint32_t* qi32 = reinterpret_cast<const uint32_t*>(reinterpret_cast<const bf16*>(p.qi) + tok * HI * DI);
    for (int e = tid; e < HI * DI / 2; e += KL_THREADS) reinterpret_cast<uint32_t*>(m.qi_s)[e] = qi32[e];
    for (int e = tid; e < H; e += KL_THREADS)
        m.lse2[e] = reinterpret_cast<const float*>(p.lse)[((size_t)bi * H + e) * p.t + i] * LOG2E;
    for (int e = tid; e < HI; e += KL_THREADS) m.w_s[e] = bf2f(reinterpret_cast<const bf16*>(p.wi)[tok * HI + e]);
    // (the first tile's barriers publish qi_s, lse2, w_s)
    const int n = i + 1;
    const float c = p.scale * LOG2E;

    // (1) online max and sum of exp(I) per thread, and the target's total
    float mx = -INFINITY, es = 0.0f, psum = 0.0f;
    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();  // the previous tile's idx, kit, X, E are no longer read
        load_idx_dense(m.idx, m0, i);
        __syncthreads();
        const float2 r = kl_dense_tile(p, m, kib, kb, qrow, c);
        if (tid < KT && m.idx[tid] >= 0) {
            const float sc = r.x;
            if (sc > mx) {
                es = es * exp2f((mx - sc) * LOG2E) + 1.0f;  // exp2f(-inf) = 0 for the first key
                mx = sc;
            } else {
                es += exp2f((sc - mx) * LOG2E);
            }
            psum += r.y;
        }
    }
    const float gmx = block_max(mx, m.red);
    const float lse_i = gmx + logf(block_sum(mx == -INFINITY ? 0.0f : es * exp2f((mx - gmx) * LOG2E), m.red));
    const float inv_z = 1.0f / block_sum(psum, m.red);

    // (2) the row's KL, G, and the gradients
    float acc[KL_MAXE];
#pragma unroll
    for (int r = 0; r < KL_MAXE; r++) acc[r] = 0.0f;
    float dw = 0.0f, loss = 0.0f;
    float* dkib = reinterpret_cast<float*>(p.dki) + (size_t)bi * p.t * DI;
    for (int m0 = 0; m0 < n; m0 += KT) {
        __syncthreads();  // the previous tile (idx, kit, X, G_s) is no longer read
        load_idx_dense(m.idx, m0, i);
        __syncthreads();
        const float2 r = kl_dense_tile(p, m, kib, kb, qrow, c);
        if (tid < KT) {
            float gv = 0.0f;
            if (m.idx[tid] >= 0) {
                const float sc = r.x, pm = r.y * inv_z;
                if (pm > 0.0f) loss += pm * (logf(pm) - (sc - lse_i));
                gv = (exp2f((sc - lse_i) * LOG2E) - pm) * p.inv_bt;
            }
            m.G_s[tid] = gv;
        }
        __syncthreads();  // G_s is ready (X, kit are still this tile's)
        if (tid < HI)
            for (int mm = 0; mm < KT; mm++) {
                const float xv = m.X[tid * KT + mm];
                if (xv > 0.0f && m.idx[mm] >= 0) dw += m.G_s[mm] * xv;
            }
#pragma unroll
        for (int r2 = 0; r2 < KL_MAXE; r2++) {
            const int e = tid + r2 * KL_THREADS;
            if (e < HI * DI) {
                const int j = e / DI, cc = e % DI;
                const float wj = m.w_s[j];
                for (int mm = 0; mm < KT; mm++)
                    if (m.X[j * KT + mm] > 0.0f && m.idx[mm] >= 0)
                        acc[r2] = fmaf(m.G_s[mm] * wj, bf2f(m.kit[mm * (DI + 2) + cc]), acc[r2]);
            }
        }
        for (int e = tid; e < KT * DI; e += KL_THREADS) {
            const int mm = e / DI, cc = e % DI, s = m.idx[mm];
            if (s < 0) continue;
            float v = 0.0f;
            for (int j = 0; j < HI; j++)
                if (m.X[j * KT + mm] > 0.0f) v = fmaf(m.G_s[mm] * m.w_s[j], bf2f(m.qi_s[j * DI + cc]), v);
            atomicAdd(dkib + (size_t)s * DI + cc, v);
        }
    }
    loss = block_sum(loss, m.red);
    if (tid == 0) reinterpret_cast<float*>(p.loss_rows)[tok] = loss;
    float* dqi = reinterpret_cast<float*>(p.dqi) + tok * HI * DI;
#pragma unroll
    for (int r = 0; r < KL_MAXE; r++) {
        const int e = tid + r * KL_THREADS;
        if (e < HI * DI) dqi[e] = acc[r];
    }
    if (tid < HI) reinterpret_cast<float*>(p.dwi)[tok * HI + tid] = dw;
}

// ------------------------------------------------------------ decode (one new query per sequence)
// The new token is the last of t cached positions (i = t - 1); q, out [b, h, d], lse [b, h],
// qi [b, H_I, d_I], wi [b, H_I], sel [b, kmax], scores [b, t]; k, v [b, t, h_kv, d], ki [b, t, d_I].

constexpr int DEC_KEYS = 64;  // keys per block (one per thread) of dsa_index_scores_decode

// Dynamic shared memory in bytes (mirrored in src/backend/cuda/dsa.rs).
constexpr int dec_scores_smem(int hi, int di) { return hi * 4 + (hi * di + DEC_KEYS * (di + 2)) * 2; }

// I(t - 1, s) for the keys s of this block: the query's index heads and the block's index keys
// staged in shared memory (bf16); each thread scores one key with the training kernel's
// arithmetic (X summed over d_I in increasing order, then heads in increasing order from +0), so
// the scores, hence the selection, are bit-identical to the last row of dsa_index_scores.
NS_DEV void index_scores_decode(const NsDsaParams& p) {
    const int HI = p.n_index_heads, DI = p.index_dim;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* w_s = reinterpret_cast<float*>(smem_raw);  // [HI]
    bf16* qi_s = reinterpret_cast<bf16*>(w_s + HI);    // [HI][DI]
    bf16* kis = qi_s + HI * DI;                        // [DEC_KEYS][DI + 2]
    const int bi = blockIdx.y, s0 = blockIdx.x * DEC_KEYS, tid = threadIdx.x;
    const bf16* qi = reinterpret_cast<const bf16*>(p.qi) + (size_t)bi * HI * DI;
    const bf16* wi = reinterpret_cast<const bf16*>(p.wi) + (size_t)bi * HI;
    const bf16* ki = reinterpret_cast<const bf16*>(p.ki) + (size_t)bi * p.t * DI;
    for (int e = tid; e < HI; e += DEC_KEYS) w_s[e] = bf2f(wi[e]);
    for (int e = tid; e < HI * DI; e += DEC_KEYS) qi_s[e] = qi[e];
    for (int e = tid; e < DEC_KEYS * DI; e += DEC_KEYS) {
        const int r = e / DI, cc = e % DI, s = s0 + r;
        kis[r * (DI + 2) + cc] = s < p.t ? ki[(size_t)s * DI + cc] : __float2bfloat16(0.0f);
    }
    __syncthreads();
    const int s = s0 + tid;
    if (s >= p.t) return;  // no barrier follows
    const bf16* kr = kis + tid * (DI + 2);
    float sc = 0.0f;
    for (int j = 0; j < HI; j++) {
        const bf16* qj = qi_s + j * DI;
        float x = 0.0f;
        for (int cc = 0; cc < DI; cc++) x = fmaf(bf2f(qj[cc]), bf2f(kr[cc]), x);
        sc = __fadd_rn(sc, __fmul_rn(w_s[j], fmaxf(x, 0.0f)));
    }
    reinterpret_cast<float*>(p.scores)[(size_t)bi * p.t + s] = sc;
}

NS_DEV void index_select_decode(const NsDsaParams& p) {
    const int bi = blockIdx.x;
    const float* row = reinterpret_cast<const float*>(p.scores) + (size_t)bi * p.t;
    uint32_t* out = reinterpret_cast<uint32_t*>(p.sel) + (size_t)bi * p.kmax;
    select_row(row, out, p.t - 1, p.topk, p.window, p.kmax);
}

// loss = sum of the rows' KL (fixed order, f64) / (b t): one block of 256 threads.
NS_DEV void kl_loss(const NsDsaParams& p) {
    __shared__ double part[256];
    const long long rows = (long long)p.b * p.t;
    const float* lr = reinterpret_cast<const float*>(p.loss_rows);
    double s = 0.0;
    for (long long r = threadIdx.x; r < rows; r += 256) s += (double)lr[r];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = 128; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.loss)[0] = (float)(part[0] / (double)rows);
}
}  // namespace ns_dsa
using namespace ns_dsa;

// grid (ceil((q0 + rows) / 64), ceil(rows / 64)), 256 threads, static shared memory.
extern "C" __global__ void __launch_bounds__(256) dsa_index_scores(NsDsaParams p) { index_scores(p); }
// grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(SEL_THREADS) dsa_index_select(NsDsaParams p) { index_select(p); }

// grid (t, b * h_kv * nch), 128 threads, dynamic shared memory fwd_smem / bwd_smem of
// ceil(gs / nch) heads (nch = 1 unless the host splits a group to fit shared memory).
template <int DQ, int DV, bool VK>
NS_DEV void dsa_fwd_train(const NsDsaParams& p) {
    const HeadChunk hc = head_chunk(p, p.h / p.h_kv);
    const int i = blockIdx.x;
    dsa_fwd_body<DQ, DV, VK>(p, i, hc, (size_t)hc.bi * p.t + i, p.t, i);
}
// decode: the query of batch bi is row bi of q/out/sel and column 0 of lse [b, h, 1]
template <int D>
NS_DEV void dsa_fwd_decode(const NsDsaParams& p) {
    const HeadChunk hc = head_chunk(p, p.h / p.h_kv);
    dsa_fwd_body<D, D, false>(p, p.t - 1, hc, (size_t)hc.bi, 1, 0);
}
// (d, dv) pairs: GQA (64, 64), (128, 128); MLA's per-head shapes (96, 64), (192, 128); and MQA over
// the latent, (576, 512) with h_kv = 1 and the values the key rows' first 512 columns (VK).
#define NS_DSA_ATTN(NAME, DQ, DV, VK)                                                                    \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) dsa_fwd_##NAME(NsDsaParams p) {            \
        dsa_fwd_train<DQ, DV, VK>(p);                                                                    \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) dsa_bwd_##NAME(NsDsaParams p) {            \
        dsa_bwd_body<DQ, DV, VK>(p);                                                                     \
    }
NS_DSA_ATTN(d64, 64, 64, false)
NS_DSA_ATTN(d128, 128, 128, false)
NS_DSA_ATTN(q96v64, 96, 64, false)
NS_DSA_ATTN(q192v128, 192, 128, false)
NS_DSA_ATTN(latent_q576v512, 576, 512, true)

// grid (t, b), 256 threads, dynamic shared memory kl_smem; then dsa_kl_loss on one block.
extern "C" __global__ void __launch_bounds__(KL_THREADS) dsa_kl_sparse(NsDsaParams p) { kl_sparse(p); }
// grid (t, b), 256 threads, dynamic shared memory kl_smem (as dsa_kl_sparse); then dsa_kl_loss.
extern "C" __global__ void __launch_bounds__(KL_THREADS, 1) dsa_kl_dense(NsDsaParams p) { kl_dense(p); }
extern "C" __global__ void __launch_bounds__(256) dsa_kl_loss(NsDsaParams p) { kl_loss(p); }

// Decode (t = cached positions, the new token last): grid (ceil(t / 64), b), 64 threads,
// dynamic shared memory dec_scores_smem; then grid (b), 256 threads; then the attention on
// grid (1, b * h_kv * nch), 128 threads, dynamic shared memory fwd_smem.
extern "C" __global__ void __launch_bounds__(DEC_KEYS) dsa_index_scores_decode(NsDsaParams p) {
    index_scores_decode(p);
}
extern "C" __global__ void __launch_bounds__(SEL_THREADS) dsa_index_select_decode(NsDsaParams p) {
    index_select_decode(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) dsa_fwd_decode_d64(NsDsaParams p) { dsa_fwd_decode<64>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) dsa_fwd_decode_d128(NsDsaParams p) {
    dsa_fwd_decode<128>(p);
}

static_assert(SEL_THREADS == 256, "one histogram bin per thread");
static_assert(dec_scores_smem(64, 128) == 33280, "update the host's smem sizes");
static_assert(fwd_smem<64, 64, false>(4) == 10148 && bwd_smem<128, 128, false>(4) == 21924 && kl_smem(64, 128, 128, 16, 2) == 42180,
              "update the host's smem sizes");
