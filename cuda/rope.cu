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
