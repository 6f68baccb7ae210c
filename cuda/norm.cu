// Parameter-free RMSNorm over the last dimension, the twin of
// src/backend/cpu/norm.rs: y = x * r with r = 1/sqrt(mean(x^2) + eps);
// backward dx = r * (dy - y * mean(dy * y)) = r * (dy - x * r^2 * mean(dy * x)).
// bf16 in and out, fp32 sums, rstd kept in f32. One block per row, 16-byte
// accesses (dim must be a multiple of 8; checked on the host); the second pass
// re-reads the row, which is still in L1/L2.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) rmsnorm_fwd_bf16(NsNormParams p) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + (size_t)row * p.dim;
    bf16* y = reinterpret_cast<bf16*>(p.y) + (size_t)row * p.dim;
    float ss = 0.0f;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float v[8];
        load8(x + i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) ss += v[j] * v[j];
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)p.dim + p.eps);
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.rstd)[row] = inv;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float v[8];
        load8(x + i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] *= inv;
        store8(y + i, v);
    }
}

extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_bf16(NsNormParams p) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const size_t off = (size_t)row * p.dim;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + off;
    const bf16* dy = reinterpret_cast<const bf16*>(p.dy) + off;
    bf16* dx = reinterpret_cast<bf16*>(p.dx) + off;
    const float inv = reinterpret_cast<const float*>(p.rstd)[row];
    float dot = 0.0f;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float a[8], g[8];
        load8(x + i, a);
        load8(dy + i, g);
#pragma unroll
        for (int j = 0; j < 8; j++) dot += a[j] * g[j];
    }
    // mean(dy * y) = inv * mean(dy * x)
    dot = block_sum(dot, scratch) * inv / (float)p.dim;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float a[8], g[8], o[8];
        load8(x + i, a);
        load8(dy + i, g);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = inv * (g[j] - a[j] * inv * dot);
        store8(dx + i, o);
    }
}
