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

// Affine LayerNorm, the twin of cpu::norm::layernorm_forward / layernorm_backward:
// r = 1/sqrt(var(x) + eps), xh = (x - mean) * r, y = gamma * xh + beta; backward with
// g = gamma * dy: dx = r * (g - mean(g) - xh * mean(g * xh)), dgamma = sum_rows dy * xh,
// dbeta = sum_rows dy. Mean and variance in two passes (fp32), one block per row.
extern "C" __global__ void __launch_bounds__(256) layernorm_fwd_bf16(NsLayerNormParams p) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + (size_t)row * p.dim;
    const bf16* gamma = reinterpret_cast<const bf16*>(p.gamma);
    const bf16* beta = reinterpret_cast<const bf16*>(p.beta);
    bf16* y = reinterpret_cast<bf16*>(p.y) + (size_t)row * p.dim;
    float s = 0.0f;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float v[8];
        load8(x + i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) s += v[j];
    }
    const float mean = block_sum(s, scratch) / (float)p.dim;
    float ss = 0.0f;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float v[8];
        load8(x + i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) ss += (v[j] - mean) * (v[j] - mean);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)p.dim + p.eps);
    if (threadIdx.x == 0) {
        reinterpret_cast<float*>(p.stats)[2 * row] = mean;
        reinterpret_cast<float*>(p.stats)[2 * row + 1] = inv;
    }
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float v[8], g[8], b[8];
        load8(x + i, v);
        load8(gamma + i, g);
        load8(beta + i, b);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = (v[j] - mean) * inv * g[j] + b[j];
        store8(y + i, v);
    }
}

extern "C" __global__ void __launch_bounds__(256) layernorm_bwd_dx_bf16(NsLayerNormParams p) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const size_t off = (size_t)row * p.dim;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + off;
    const bf16* dy = reinterpret_cast<const bf16*>(p.dy) + off;
    const bf16* gamma = reinterpret_cast<const bf16*>(p.gamma);
    bf16* dx = reinterpret_cast<bf16*>(p.dx) + off;
    const float mean = reinterpret_cast<const float*>(p.stats)[2 * row];
    const float inv = reinterpret_cast<const float*>(p.stats)[2 * row + 1];
    float sg = 0.0f, sgx = 0.0f;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float a[8], d[8], g[8];
        load8(x + i, a);
        load8(dy + i, d);
        load8(gamma + i, g);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            sg += d[j] * g[j];
            sgx += d[j] * g[j] * (a[j] - mean) * inv;
        }
    }
    const float mg = block_sum(sg, scratch) / (float)p.dim;
    const float mgx = block_sum(sgx, scratch) / (float)p.dim;
    for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
        float a[8], d[8], g[8], o[8];
        load8(x + i, a);
        load8(dy + i, d);
        load8(gamma + i, g);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = inv * (d[j] * g[j] - mg - (a[j] - mean) * inv * mgx);
        store8(dx + i, o);
    }
}

// One thread per column: the row sums of dy * xh and dy in fp32, rounded to bf16 once.
extern "C" __global__ void __launch_bounds__(256) layernorm_bwd_params_bf16(NsLayerNormParams p) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= p.dim) return;
    const bf16* x = reinterpret_cast<const bf16*>(p.x);
    const bf16* dy = reinterpret_cast<const bf16*>(p.dy);
    const float* stats = reinterpret_cast<const float*>(p.stats);
    float dg = 0.0f, db = 0.0f;
    for (int r = 0; r < p.rows; r++) {
        const size_t i = (size_t)r * p.dim + col;
        const float d = bf2f(dy[i]);
        dg += d * (bf2f(x[i]) - stats[2 * r]) * stats[2 * r + 1];
        db += d;
    }
    reinterpret_cast<bf16*>(p.dgamma)[col] = f2bf(dg);
    reinterpret_cast<bf16*>(p.dbeta)[col] = f2bf(db);
}
