// Flash attention bodies shared by the attention families (attention.cu: dense
// causal; window_attention.cu: sliding window + global tokens). bf16 q/k/v/out,
// fp32 softmax statistics and accumulators, tensor cores (mma.sync m16n8k16) for
// both products, grouped-query (query head j uses kv head j / (h / h_kv)).
// Head shapes are a pair (DQ, DV) of template parameters: queries and keys DQ
// wide, values and outputs DV wide (GQA: DQ = DV in {64, 128}; MLA: d_qk =
// d_nope + d_rope and d_v, e.g. (96, 64) and (192, 128)); both multiples of 16
// with DQ / 4 a multiple of 8. Layouts: q [b, t, h, DQ], k [b, t, h_kv, DQ],
// v [b, t, h_kv, DV], out/dout [b, t, h, DV], lse/delta [b, h, t] (NsAttnParams
// in abi.h, whose d and dv are DQ and DV).
//
// Forward (flash_fwd_body): one block of 4 warps per (64-query tile,
// batch x head); each warp owns 16 query rows, keeps its Q fragments and the
// O accumulator in registers, and streams 64-key K/V tiles with an online
// softmax in the log2 domain (no T x T matrix anywhere).
//
// Backward (FlashAttention-2 order): flash_bwd_delta_body computes
// delta = rowsum(dout * out); flash_bwd_body runs one block per (64-key tile,
// batch x kv head), loops over the query heads of the group and the query
// tiles that can see the keys, keeps dK and dV in registers (so they are
// written once, without atomics) and adds dQ into an fp32 accumulator with
// atomics. dS is staged through shared memory for the dQ product.
//
// Which keys a query sees is the mask policy M, a small struct with
//   KeySegs segments(int q0, int q1) const: the key ranges [s0, e0) and
//       [s1, e1) (disjoint, each possibly empty, s <= e) that
//       hold every key a query row of q0..q1 sees; the forward loads only these,
//       in 64-key tiles starting at each range's start;
//   bool visible(int key, int qi) const: query row qi sees key (element mask);
//   int query_end(int k0, int t) const: no query row >= this sees a key of the
//       tile k0..k0+64 (the backward visits query tiles from k0 down-rounded up to it).
#pragma once
#include "common.cuh"

// Two key ranges [s0, e0) and [s1, e1) (returned by value: an array would live in local memory).
struct KeySegs {
    int s0, e0, s1, e1;
};

namespace ns_flash {  // named: an anonymous namespace would put a path hash into the PTX
constexpr float LOG2E = 1.4426950408889634f;
constexpr int KT = 64;       // keys per tile
constexpr int THREADS = 128;  // 4 warps

// rows [r0, r0 + R) of a tensor whose row i starts at base + i * row_stride (D contiguous),
// into shared [R][D + 8]; rows >= limit are zero-filled.
template <int R, int D>
NS_DEV void load_rows(bf16* s, const bf16* base, size_t row_stride, int r0, int limit) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < R * CH; c += THREADS) {
        const int r = c / CH, col = (c % CH) * 8;
        const bool ok = r0 + r < limit;
        const bf16* src = ok ? base + (size_t)(r0 + r) * row_stride + col : base;
        cp_async16(s + r * (D + 8) + col, src, ok ? 16 : 0);
    }
}

template <int DQ, int DV, class M>
NS_DEV void flash_fwd_body(const NsAttnParams& p, const M& m) {
    static_assert(DQ % 16 == 0 && DV % 16 == 0, "head widths are multiples of 16");
    constexpr int LD = DQ + 8, LDV = DV + 8;
    __shared__ __align__(16) bf16 Ks[KT * LD];
    __shared__ __align__(16) bf16 Vs[KT * LDV];
    const int qt = blockIdx.x, bh = blockIdx.y;
    const int bi = bh / p.h, hq = bh % p.h, g = hq / (p.h / p.h_kv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i8 = lane >> 3, r8 = lane & 7, gr = lane >> 2, c2 = (lane & 3) << 1;
    const size_t q_stride = (size_t)p.h * DQ, kv_stride = (size_t)p.h_kv * DQ;
    const size_t o_stride = (size_t)p.h * DV, v_stride = (size_t)p.h_kv * DV;
    const bf16* qb = reinterpret_cast<const bf16*>(p.q) + (size_t)bi * p.t * q_stride + (size_t)hq * DQ;
    const bf16* kb = reinterpret_cast<const bf16*>(p.k) + (size_t)bi * p.t * kv_stride + (size_t)g * DQ;
    const bf16* vb = reinterpret_cast<const bf16*>(p.v) + (size_t)bi * p.t * v_stride + (size_t)g * DV;
    const int q0 = qt * KT;

    // Q tile through the K buffer into registers
    load_rows<KT, DQ>(Ks, qb, q_stride, q0, p.t);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[DQ / 16][4];
#pragma unroll
    for (int kk = 0; kk < DQ / 16; kk++)
        ldmatrix_x4(qf[kk], Ks + (warp * 16 + (lane & 15)) * LD + kk * 16 + ((lane >> 4) << 3));
    __syncthreads();

    float o[DV / 8][4];
#pragma unroll
    for (int j = 0; j < DV / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
    const float sl2 = p.scale * LOG2E;
    const int row_q0 = q0 + warp * 16 + gr;  // rows row_q0 and row_q0 + 8
    // The key ranges this tile reads, [s0, e0) then [s1, e1), each walked in tiles of KT keys
    // from its start (the last one partial, masked at the range's end): tile keys ks..ks + KT.
    const KeySegs sg = m.segments(q0, min(q0 + KT, p.t));
#pragma unroll 1
    for (int r = 0; r < 2; r++)  // (one loop body: the range r picks the bounds of the inner loop)
    for (int ks = r ? sg.s1 : sg.s0, ke = r ? sg.e1 : sg.e0; ks < ke; ks += KT) {
        load_rows<KT, DQ>(Ks, kb, kv_stride, ks, p.t);
        load_rows<KT, DV>(Vs, vb, v_stride, ks, p.t);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float s[KT / 8][4];
#pragma unroll
        for (int j = 0; j < KT / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DQ / 16; kk++) {
#pragma unroll
            for (int nj = 0; nj < KT / 16; nj++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ks + (nj * 16 + ((i8 >> 1) << 3) + r8) * LD + kk * 16 + ((i8 & 1) << 3));
                mma_bf16_16816(s[2 * nj], qf[kk], r);
                mma_bf16_16816(s[2 * nj + 1], qf[kk], r + 2);
            }
        }
        // mask, scale into the log2 domain, online softmax per row (rows gr and gr + 8)
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < KT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = ks + j * 8 + c2 + (e & 1), hr = e >> 1;
                const float v = (key < ke && m.visible(key, row_q0 + 8 * hr)) ? s[j][e] * sl2 : -INFINITY;
                s[j][e] = v;
                mx[hr] = fmaxf(mx[hr], v);
            }
        float alpha[2], m_use[2];
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
            mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
            const float m_new = fmaxf(m_run[hr], mx[hr]);
            m_use[hr] = m_new == -INFINITY ? 0.0f : m_new;
            alpha[hr] = m_run[hr] == -INFINITY ? 0.0f : exp2f(m_run[hr] - m_use[hr]);
            m_run[hr] = m_new;
            l_run[hr] *= alpha[hr];
        }
#pragma unroll
        for (int j = 0; j < KT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float pv = exp2f(s[j][e] - m_use[e >> 1]);
                s[j][e] = pv;
                l_run[e >> 1] += pv;
            }
#pragma unroll
        for (int j = 0; j < DV / 8; j++) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // O += P V (P from the accumulators, V [key][d] read transposed)
#pragma unroll
        for (int kq = 0; kq < KT / 16; kq++) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * kq][0], s[2 * kq][1]);
            a[1] = pack_bf16(s[2 * kq][2], s[2 * kq][3]);
            a[2] = pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]);
            a[3] = pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3]);
#pragma unroll
            for (int dj = 0; dj < DV / 16; dj++) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, Vs + (kq * 16 + ((i8 & 1) << 3) + r8) * LDV + dj * 16 + ((i8 >> 1) << 3));
                mma_bf16_16816(o[2 * dj], a, r);
                mma_bf16_16816(o[2 * dj + 1], a, r + 2);
            }
        }
        __syncthreads();
    }

    bf16* ob = reinterpret_cast<bf16*>(p.out) + (size_t)bi * p.t * o_stride + (size_t)hq * DV;
    float* lse = reinterpret_cast<float*>(p.lse) + ((size_t)bi * p.h + hq) * p.t;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float l = l_run[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int qi = row_q0 + 8 * hr;
        if (qi >= p.t) continue;
        const float inv = 1.0f / l;
#pragma unroll
        for (int j = 0; j < DV / 8; j++)
            *reinterpret_cast<uint32_t*>(ob + (size_t)qi * o_stride + j * 8 + c2) =
                pack_bf16(o[j][2 * hr] * inv, o[j][2 * hr + 1] * inv);
        if ((lane & 3) == 0) lse[qi] = (m_run[hr] + log2f(l)) * (1.0f / LOG2E);
    }
}

// Dynamic shared memory of the backward, in bytes (the host sets the attribute).
template <int DQ, int DV, int BQ>
constexpr int bwd_smem() {
    return ((KT + BQ) * (DQ + 8) + (KT + BQ) * (DV + 8) + KT * (BQ + 8)) * 2 + 2 * BQ * 4;
}

template <int DQ, int DV, int BQ, class M>
NS_DEV void flash_bwd_body(const NsAttnParams& p, const M& m) {
    static_assert(DQ % 16 == 0 && DV % 16 == 0 && (DQ / 4) % 8 == 0, "DQ, DV multiples of 16, DQ / 4 of 8");
    constexpr int LD = DQ + 8, LDV = DV + 8, LDS = BQ + 8, DW = DQ / 4;  // DW: dQ columns per warp
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
    bf16* Vs = Ks + KT * LD;
    bf16* Qs = Vs + KT * LDV;
    bf16* dOs = Qs + BQ * LD;
    bf16* dSt = dOs + BQ * LDV;  // [key][query]
    float* lse_s = reinterpret_cast<float*>(dSt + KT * LDS);
    float* delta_s = lse_s + BQ;

    const int kt = blockIdx.x, bg = blockIdx.y;
    const int bi = bg / p.h_kv, g = bg % p.h_kv, rep = p.h / p.h_kv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i8 = lane >> 3, r8 = lane & 7, gr = lane >> 2, c2 = (lane & 3) << 1;
    const size_t q_stride = (size_t)p.h * DQ, kv_stride = (size_t)p.h_kv * DQ;
    const size_t o_stride = (size_t)p.h * DV, v_stride = (size_t)p.h_kv * DV;
    const size_t kv_off = (size_t)bi * p.t * kv_stride + (size_t)g * DQ;
    const size_t v_off = (size_t)bi * p.t * v_stride + (size_t)g * DV;
    const int k0 = kt * KT, kw = warp * 16;
    const float sl2 = p.scale * LOG2E;

    load_rows<KT, DQ>(Ks, reinterpret_cast<const bf16*>(p.k) + kv_off, kv_stride, k0, p.t);
    load_rows<KT, DV>(Vs, reinterpret_cast<const bf16*>(p.v) + v_off, v_stride, k0, p.t);
    cp_async_commit();

    float dk[DQ / 8][4], dv[DV / 8][4];
#pragma unroll
    for (int j = 0; j < DQ / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[j][e] = 0.0f;
#pragma unroll
    for (int j = 0; j < DV / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dv[j][e] = 0.0f;
    const int key_row[2] = {k0 + kw + gr, k0 + kw + gr + 8};
    const int q_end = m.query_end(k0, p.t);  // no query row >= q_end sees a key of this tile

    for (int hh = 0; hh < rep; hh++) {
        const int hq = g * rep + hh;
        const size_t q_off = (size_t)bi * p.t * q_stride + (size_t)hq * DQ;
        const size_t o_off = (size_t)bi * p.t * o_stride + (size_t)hq * DV;
        const float* lse_g = reinterpret_cast<const float*>(p.lse) + ((size_t)bi * p.h + hq) * p.t;
        const float* delta_g = reinterpret_cast<const float*>(p.delta) + ((size_t)bi * p.h + hq) * p.t;
        float* dq = reinterpret_cast<float*>(p.dq_acc) + q_off;
        for (int q0 = (k0 / BQ) * BQ; q0 < q_end; q0 += BQ) {
            __syncthreads();  // the previous tile's Qs, dOs, dSt are no longer read
            load_rows<BQ, DQ>(Qs, reinterpret_cast<const bf16*>(p.q) + q_off, q_stride, q0, p.t);
            load_rows<BQ, DV>(dOs, reinterpret_cast<const bf16*>(p.dout) + o_off, o_stride, q0, p.t);
            cp_async_commit();
            for (int i = threadIdx.x; i < BQ; i += THREADS) {
                const bool ok = q0 + i < p.t;
                lse_s[i] = ok ? lse_g[q0 + i] : 0.0f;
                delta_s[i] = ok ? delta_g[q0 + i] : 0.0f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BQ queries
            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int j = 0; j < BQ / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[j][e] = dpt[j][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DQ / 16; kk++) {
                uint32_t ka[4];
                ldmatrix_x4(ka, Ks + (kw + (lane & 15)) * LD + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
                for (int nj = 0; nj < BQ / 16; nj++) {
                    uint32_t r[4];
                    ldmatrix_x4(r, Qs + (nj * 16 + ((i8 >> 1) << 3) + r8) * LD + kk * 16 + ((i8 & 1) << 3));
                    mma_bf16_16816(st[2 * nj], ka, r);
                    mma_bf16_16816(st[2 * nj + 1], ka, r + 2);
                }
            }
#pragma unroll
            for (int kk = 0; kk < DV / 16; kk++) {
                uint32_t va[4];
                ldmatrix_x4(va, Vs + (kw + (lane & 15)) * LDV + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
                for (int nj = 0; nj < BQ / 16; nj++) {
                    uint32_t r[4];
                    ldmatrix_x4(r, dOs + (nj * 16 + ((i8 >> 1) << 3) + r8) * LDV + kk * 16 + ((i8 & 1) << 3));
                    mma_bf16_16816(dpt[2 * nj], va, r);
                    mma_bf16_16816(dpt[2 * nj + 1], va, r + 2);
                }
            }
            // P^T = exp(S^T scale - lse) (masked), dS^T = P^T (dP^T - delta)
#pragma unroll
            for (int j = 0; j < BQ / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int col = j * 8 + c2 + (e & 1), qi = q0 + col, key = key_row[e >> 1];
                    const bool ok = qi < p.t && m.visible(key, qi);
                    const float pv = ok ? exp2f(st[j][e] * sl2 - lse_s[col] * LOG2E) : 0.0f;
                    st[j][e] = pv;
                    dpt[j][e] = pv * (dpt[j][e] - delta_s[col]);
                }
            // dV += P^T dO and dK += dS^T Q (B operands [query][d] read transposed)
#pragma unroll
            for (int kq = 0; kq < BQ / 16; kq++) {
                uint32_t pa[4], sa[4];
                pa[0] = pack_bf16(st[2 * kq][0], st[2 * kq][1]);
                pa[1] = pack_bf16(st[2 * kq][2], st[2 * kq][3]);
                pa[2] = pack_bf16(st[2 * kq + 1][0], st[2 * kq + 1][1]);
                pa[3] = pack_bf16(st[2 * kq + 1][2], st[2 * kq + 1][3]);
                sa[0] = pack_bf16(dpt[2 * kq][0], dpt[2 * kq][1]);
                sa[1] = pack_bf16(dpt[2 * kq][2], dpt[2 * kq][3]);
                sa[2] = pack_bf16(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
                sa[3] = pack_bf16(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
                // dS^T to shared (keys x queries) for the dQ product
                *reinterpret_cast<uint32_t*>(dSt + (kw + gr) * LDS + kq * 16 + c2) = sa[0];
                *reinterpret_cast<uint32_t*>(dSt + (kw + gr + 8) * LDS + kq * 16 + c2) = sa[1];
                *reinterpret_cast<uint32_t*>(dSt + (kw + gr) * LDS + kq * 16 + 8 + c2) = sa[2];
                *reinterpret_cast<uint32_t*>(dSt + (kw + gr + 8) * LDS + kq * 16 + 8 + c2) = sa[3];
#pragma unroll
                for (int dj = 0; dj < DV / 16; dj++) {
                    uint32_t r[4];
                    ldmatrix_x4_trans(r, dOs + (kq * 16 + ((i8 & 1) << 3) + r8) * LDV + dj * 16 + ((i8 >> 1) << 3));
                    mma_bf16_16816(dv[2 * dj], pa, r);
                    mma_bf16_16816(dv[2 * dj + 1], pa, r + 2);
                }
#pragma unroll
                for (int dj = 0; dj < DQ / 16; dj++) {
                    uint32_t r[4];
                    ldmatrix_x4_trans(r, Qs + (kq * 16 + ((i8 & 1) << 3) + r8) * LD + dj * 16 + ((i8 >> 1) << 3));
                    mma_bf16_16816(dk[2 * dj], sa, r);
                    mma_bf16_16816(dk[2 * dj + 1], sa, r + 2);
                }
            }
            __syncthreads();
            // dQ[BQ, DQ] += scale * dS K: warp w owns columns [w*DW, (w+1)*DW), in passes of DWC
            // columns (two passes when DW > 32, DQ = 192: fewer live registers beside dK and dV)
            constexpr int DWC = DW > 32 ? DW / 2 : DW;
#pragma unroll 1
            for (int c0 = warp * DW; c0 < (warp + 1) * DW; c0 += DWC) {
                float dqa[BQ / 16][DWC / 8][4];
#pragma unroll
                for (int mi = 0; mi < BQ / 16; mi++)
#pragma unroll
                    for (int nj = 0; nj < DWC / 8; nj++)
#pragma unroll
                        for (int e = 0; e < 4; e++) dqa[mi][nj][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KT / 16; kk++) {
                    uint32_t kb[DWC / 8][2];
#pragma unroll
                    for (int nj = 0; nj < DWC / 16; nj++) {
                        uint32_t r[4];
                        ldmatrix_x4_trans(r, Ks + (kk * 16 + ((i8 & 1) << 3) + r8) * LD + c0 + nj * 16 + ((i8 >> 1) << 3));
                        kb[2 * nj][0] = r[0];
                        kb[2 * nj][1] = r[1];
                        kb[2 * nj + 1][0] = r[2];
                        kb[2 * nj + 1][1] = r[3];
                    }
                    if constexpr (DWC % 16 == 8) {  // the last 8 columns (DWC = 24): two matrices
                        ldmatrix_x2_trans(kb[DWC / 8 - 1], Ks + (kk * 16 + ((i8 & 1) << 3) + r8) * LD + c0 + (DWC / 16) * 16);
                    }
#pragma unroll
                    for (int mi = 0; mi < BQ / 16; mi++) {
                        uint32_t a[4];
                        ldmatrix_x4_trans(a, dSt + (kk * 16 + ((i8 >> 1) << 3) + r8) * LDS + mi * 16 + ((i8 & 1) << 3));
#pragma unroll
                        for (int nj = 0; nj < DWC / 8; nj++) mma_bf16_16816(dqa[mi][nj], a, kb[nj]);
                    }
                }
#pragma unroll
                for (int mi = 0; mi < BQ / 16; mi++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int qi = q0 + mi * 16 + gr + (e >> 1) * 8;
                        if (qi >= p.t) continue;
#pragma unroll
                        for (int nj = 0; nj < DWC / 8; nj++)
                            atomicAdd(dq + (size_t)qi * q_stride + c0 + nj * 8 + c2 + (e & 1), p.scale * dqa[mi][nj][e]);
                    }
            }
        }
    }
    // dK (scaled) and dV, written once per key row
    float* dkb = reinterpret_cast<float*>(p.dk_acc) + kv_off;
    float* dvb = reinterpret_cast<float*>(p.dv_acc) + v_off;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int key = key_row[hr];
        if (key >= p.t) continue;
#pragma unroll
        for (int j = 0; j < DQ / 8; j++) {
            const size_t off = (size_t)key * kv_stride + j * 8 + c2;
            *reinterpret_cast<float2*>(dkb + off) = make_float2(p.scale * dk[j][2 * hr], p.scale * dk[j][2 * hr + 1]);
        }
#pragma unroll
        for (int j = 0; j < DV / 8; j++) {
            const size_t off = (size_t)key * v_stride + j * 8 + c2;
            *reinterpret_cast<float2*>(dvb + off) = make_float2(dv[j][2 * hr], dv[j][2 * hr + 1]);
        }
    }
}

// delta[b, h, i] = sum_d dout * out over the dv value columns: one warp per (token, head) row,
// 8 rows per block of 256.
NS_DEV void flash_bwd_delta_body(const NsAttnParams& p) {
    const long long rows = (long long)p.b * p.t * p.h;
    const long long r = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (r >= rows) return;
    const int lane = threadIdx.x & 31;
    const bf16* o = reinterpret_cast<const bf16*>(p.out) + r * p.dv;
    const bf16* d = reinterpret_cast<const bf16*>(p.dout) + r * p.dv;
    float s = 0.0f;
    for (int i = lane; i < p.dv; i += 32) s += bf2f(o[i]) * bf2f(d[i]);
    s = warp_sum(s);
    if (lane == 0) {
        const long long tok = r / p.h, bi = tok / p.t, i = tok % p.t, hq = r % p.h;
        reinterpret_cast<float*>(p.delta)[(bi * p.h + hq) * p.t + i] = s;
    }
}
}  // namespace ns_flash
