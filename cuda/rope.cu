// Rotary position embedding of q and k in one pass (NeoX half-split layout),
// the twin of src/backend/cpu/rope.rs. For a head vector x of width d at
// position t, pairs (x_i, x_{i+d/2}) rotate by the angle t*f_i:
//   y_i = x_i cos - x_{i+d/2} sin,  y_{i+d/2} = x_i sin + x_{i+d/2} cos.
// The backward (inverse = 1) rotates by the negative angle. bf16 in and out,
// fp32 math, cos/sin from the same f32 table as the CPU (built in f64 there).
// One block per token row; each thread rotates 8 pairs with 16-byte accesses
// (d must be a multiple of 16; checked on the host).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) rope_bf16(NsRopeParams p) {
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const int half = p.d >> 1;
    const int pos = row % p.t;
    const float* cs = reinterpret_cast<const float*>(p.cos) + (size_t)pos * half;
    const float* sn = reinterpret_cast<const float*>(p.sin) + (size_t)pos * half;
    const float sign = p.inverse ? -1.0f : 1.0f;
    const int groups = half >> 3;  // 8-pair groups per head
    const int total = (p.h + p.h_kv) * groups;
    for (int w = threadIdx.x; w < total; w += blockDim.x) {
        const int head = w / groups, i0 = (w - head * groups) << 3;
        const bf16* src;
        bf16* dst;
        if (head < p.h) {
            const size_t off = ((size_t)row * p.h + head) * p.d;
            src = reinterpret_cast<const bf16*>(p.q_in) + off;
            dst = reinterpret_cast<bf16*>(p.q_out) + off;
        } else {
            const size_t off = ((size_t)row * p.h_kv + (head - p.h)) * p.d;
            src = reinterpret_cast<const bf16*>(p.k_in) + off;
            dst = reinterpret_cast<bf16*>(p.k_out) + off;
        }
        float x1[8], x2[8], y1[8], y2[8];
        load8(src + i0, x1);
        load8(src + half + i0, x2);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float c = __ldg(cs + i0 + j), s = sign * __ldg(sn + i0 + j);
            y1[j] = x1[j] * c - x2[j] * s;
            y2[j] = x1[j] * s + x2[j] * c;
        }
        store8(dst + i0, y1);
        store8(dst + half + i0, y2);
    }
}

// ---- QK-norm fused with RoPE: rope_qknorm_{fwd,bwd}_bf16 (NsRopeQkNormParams) ----
// Per head vector x of width d (the twin: rope_qknorm_* in src/backend/cpu/rope.rs):
//   forward:  r = 1/sqrt(mean(x^2) + eps), xh = x * r, y = rope(xh); r is kept (f32)
//   backward: dxh = rope^-1(dy), dx = r * (dxh - xh * mean(dxh * xh))
//                                   = r * (dxh - x * r^2 * mean(dxh * x))
// with the normalized head never rounded to bf16 in between (the unfused path rounds it).
// One warp per (token row, head): item w = row * (h + h_kv) + head, the q heads of a
// row first, then its k heads; QK_WARPS items per block. Lane l holds the pairs
// i, i + 1 with i = 2 * (l + 32 j), j < QK_MAXJ, of both halves (bf16x2 accesses; d a
// multiple of 16 keeps them and the float2 table reads aligned), so d/2 <= 64 * QK_MAXJ,
// i.e. d <= 512 (checked on the host). The per-head sums are warp shuffles: no shared
// memory, no __syncthreads; w is uniform over a warp, so whole warps exit together and
// the full-mask shuffles stay legal.
#define QK_WARPS 8
#define QK_MAXJ 4

NS_DEV float2 qk_ld2(const bf16* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); }
NS_DEV void qk_st2(bf16* p, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}

// This warp's item: false when past the end; else its token row, whether it is a q
// head, and the head's index among the q (or k) heads of the batch, which is both its
// rstd index and, times d, its element offset.
NS_DEV bool qk_item(const NsRopeQkNormParams& p, int& row, bool& is_q, size_t& head_index) {
    const int heads = p.h + p.h_kv;
    const long long w = (long long)blockIdx.x * QK_WARPS + (threadIdx.x >> 5);
    if (w >= (long long)p.rows * heads) return false;
    row = (int)(w / heads);
    const int head = (int)(w - (long long)row * heads);
    is_q = head < p.h;
    head_index = is_q ? (size_t)row * p.h + head : (size_t)row * p.h_kv + (head - p.h);
    return true;
}

extern "C" __global__ void __launch_bounds__(QK_WARPS * 32) rope_qknorm_fwd_bf16(NsRopeQkNormParams p) {
    int row;
    bool is_q;
    size_t hi;
    if (!qk_item(p, row, is_q, hi)) return;
    const int lane = threadIdx.x & 31, half = p.d >> 1;
    const size_t off = hi * p.d;
    const bf16* x = reinterpret_cast<const bf16*>(is_q ? p.q_raw : p.k_raw) + off;
    bf16* y = reinterpret_cast<bf16*>(is_q ? p.q : p.k) + off;
    const int pos = row % p.t;
    const float* cs = reinterpret_cast<const float*>(p.cos) + (size_t)pos * half;
    const float* sn = reinterpret_cast<const float*>(p.sin) + (size_t)pos * half;
    float2 x1[QK_MAXJ], x2[QK_MAXJ];  // (x_i, x_i+1) and (x_i+d/2, x_i+1+d/2)
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        const int i = 2 * (lane + 32 * j);
        x1[j] = x2[j] = make_float2(0.0f, 0.0f);
        if (i < half) {
            x1[j] = qk_ld2(x + i);
            x2[j] = qk_ld2(x + half + i);
            ss += x1[j].x * x1[j].x + x1[j].y * x1[j].y + x2[j].x * x2[j].x + x2[j].y * x2[j].y;
        }
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)p.d + p.eps);
    if (lane == 0) reinterpret_cast<float*>(is_q ? p.rstd_q : p.rstd_k)[hi] = inv;
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        const int i = 2 * (lane + 32 * j);
        if (i < half) {
            const float2 c = __ldg(reinterpret_cast<const float2*>(cs + i));
            const float2 s = __ldg(reinterpret_cast<const float2*>(sn + i));
            const float a0 = x1[j].x * inv, a1 = x1[j].y * inv;  // xh, first half
            const float b0 = x2[j].x * inv, b1 = x2[j].y * inv;  // xh, second half
            qk_st2(y + i, a0 * c.x - b0 * s.x, a1 * c.y - b1 * s.y);
            qk_st2(y + half + i, a0 * s.x + b0 * c.x, a1 * s.y + b1 * c.y);
        }
    }
}

extern "C" __global__ void __launch_bounds__(QK_WARPS * 32) rope_qknorm_bwd_bf16(NsRopeQkNormParams p) {
    int row;
    bool is_q;
    size_t hi;
    if (!qk_item(p, row, is_q, hi)) return;
    const int lane = threadIdx.x & 31, half = p.d >> 1;
    const size_t off = hi * p.d;
    const bf16* x = reinterpret_cast<const bf16*>(is_q ? p.q_raw : p.k_raw) + off;
    const bf16* dy = reinterpret_cast<const bf16*>(is_q ? p.dq : p.dk) + off;
    bf16* dx = reinterpret_cast<bf16*>(is_q ? p.dq_raw : p.dk_raw) + off;
    const float inv = __ldg(reinterpret_cast<const float*>(is_q ? p.rstd_q : p.rstd_k) + hi);
    const int pos = row % p.t;
    const float* cs = reinterpret_cast<const float*>(p.cos) + (size_t)pos * half;
    const float* sn = reinterpret_cast<const float*>(p.sin) + (size_t)pos * half;
    float2 x1[QK_MAXJ], x2[QK_MAXJ], g1[QK_MAXJ], g2[QK_MAXJ];  // x and dxh, both halves
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        const int i = 2 * (lane + 32 * j);
        x1[j] = x2[j] = g1[j] = g2[j] = make_float2(0.0f, 0.0f);
        if (i < half) {
            x1[j] = qk_ld2(x + i);
            x2[j] = qk_ld2(x + half + i);
            const float2 d1 = qk_ld2(dy + i), d2 = qk_ld2(dy + half + i);
            const float2 c = __ldg(reinterpret_cast<const float2*>(cs + i));
            float2 s = __ldg(reinterpret_cast<const float2*>(sn + i));
            s.x = -s.x;  // the inverse rotation: angle -t*f_i
            s.y = -s.y;
            g1[j] = make_float2(d1.x * c.x - d2.x * s.x, d1.y * c.y - d2.y * s.y);
            g2[j] = make_float2(d1.x * s.x + d2.x * c.x, d1.y * s.y + d2.y * c.y);
            dot += x1[j].x * g1[j].x + x1[j].y * g1[j].y + x2[j].x * g2[j].x + x2[j].y * g2[j].y;
        }
    }
    // mean(dxh * xh) = inv * mean(dxh * x)
    dot = warp_sum(dot) * inv / (float)p.d;
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        const int i = 2 * (lane + 32 * j);
        if (i < half) {
            qk_st2(dx + i, inv * (g1[j].x - x1[j].x * inv * dot), inv * (g1[j].y - x1[j].y * inv * dot));
            qk_st2(dx + half + i, inv * (g2[j].x - x2[j].x * inv * dot), inv * (g2[j].y - x2[j].y * inv * dot));
        }
    }
}
