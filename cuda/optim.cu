// Optimizer kernels, the twins of src/backend/cpu/optim.rs and the gradient
// clipping of src/optim: decoupled AdamW on f32 master weights (optionally
// writing the bf16 copy the GEMMs read), and a deterministic sum of squares
// (fixed per-block partials, then one block adds them in order) with an
// in-place scale by a device scalar for clipping without a host round trip.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) adamw_f32(NsAdamWParams p) {
    float* w = reinterpret_cast<float*>(p.p);
    const float* g = reinterpret_cast<const float*>(p.g);
    float* m = reinterpret_cast<float*>(p.m);
    float* v = reinterpret_cast<float*>(p.v);
    bf16* wb = reinterpret_cast<bf16*>(p.p_bf16);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float gi = g[i];
        const float mi = p.beta1 * m[i] + (1.0f - p.beta1) * gi;
        const float vi = p.beta2 * v[i] + (1.0f - p.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / p.bc2_sqrt + p.eps;
        const float wi = w[i] * p.decay - p.step_size * mi / denom;
        w[i] = wi;
        if (wb) wb[i] = f2bf(wi);
    }
}

// Stage 1: partials[block] = sum of x^2 over the block's grid-stride elements.
extern "C" __global__ void __launch_bounds__(256) sumsq_partial_f32(NsReduceParams p) {
    __shared__ float scratch[32];
    const float* x = reinterpret_cast<const float*>(p.x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) s += x[i] * x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.partials)[blockIdx.x] = s;
}

// Stage 2 (one block): out[0] = sum of the partials; factor[0] (if set) = the
// clipping factor min(1, max_norm / (norm + 1e-6)) (max_norm <= 0: 1).
extern "C" __global__ void __launch_bounds__(256) sumsq_final_f32(NsReduceParams p) {
    __shared__ float scratch[32];
    const float* part = reinterpret_cast<const float*>(p.partials);
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.blocks; i += blockDim.x) s += part[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        reinterpret_cast<float*>(p.out)[0] = s;
        if (p.factor) {
            const float norm = sqrtf(s);
            reinterpret_cast<float*>(p.factor)[0] =
                (p.max_norm > 0.0f && norm > p.max_norm) ? p.max_norm / (norm + 1e-6f) : 1.0f;
        }
    }
}

// x *= factor[0].
extern "C" __global__ void __launch_bounds__(256) scale_f32(NsReduceParams p) {
    float* x = reinterpret_cast<float*>(p.x);
    const float f = reinterpret_cast<const float*>(p.factor)[0];
    if (f == 1.0f) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) x[i] *= f;
}

// Element-wise casts between the f32 master / accumulator tensors and bf16:
// x (f32 [n]) -> out (bf16 [n]) for cast_f32_bf16, partials used as the output.
extern "C" __global__ void __launch_bounds__(256) cast_f32_bf16(NsReduceParams p) {
    const float* x = reinterpret_cast<const float*>(p.x);
    bf16* y = reinterpret_cast<bf16*>(p.out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) y[i] = f2bf(x[i]);
}

// x (bf16 [n]) -> out (f32 [n]).
extern "C" __global__ void __launch_bounds__(256) cast_bf16_f32(NsReduceParams p) {
    const bf16* x = reinterpret_cast<const bf16*>(p.x);
    float* y = reinterpret_cast<float*>(p.out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) y[i] = bf2f(x[i]);
}

// ---- Muon (twin: the Muon branch of optim::Optimizer::update) ----
// Newton-Schulz itself runs as GEMMs (gemm.cu) and axpby_bf16 (elementwise.cu),
// launched from src/train/step_cuda.rs; these are the element-wise steps around it.

// Nesterov momentum in lerp form: buf <- mu*buf + (1-mu)*g, u = (1-mu)*g + mu*buf.
extern "C" __global__ void __launch_bounds__(256) muon_momentum_f32(NsMuonParams p) {
    float* buf = reinterpret_cast<float*>(p.buf);
    const float* g = reinterpret_cast<const float*>(p.g);
    float* u = reinterpret_cast<float*>(p.u);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float gi = g[i];
        const float bi = p.mu * buf[i] + (1.0f - p.mu) * gi;
        buf[i] = bi;
        u[i] = (1.0f - p.mu) * gi + p.mu * bi;
    }
}

// X0 = u / (||u||_F + 1e-7) in bf16, the norm from the device scalar sumsq[0].
extern "C" __global__ void __launch_bounds__(256) muon_normalize_bf16(NsMuonParams p) {
    const float* u = reinterpret_cast<const float*>(p.u);
    bf16* x = reinterpret_cast<bf16*>(p.x);
    const float inv = 1.0f / (sqrtf(reinterpret_cast<const float*>(p.sumsq)[0]) + 1e-7f);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride)
        x[i] = f2bf(u[i] * inv);
}

// w = w*decay - lr*o, and the bf16 copy the GEMMs read.
extern "C" __global__ void __launch_bounds__(256) muon_apply_f32(NsMuonParams p) {
    float* w = reinterpret_cast<float*>(p.w);
    const bf16* o = reinterpret_cast<const bf16*>(p.o);
    bf16* wb = reinterpret_cast<bf16*>(p.w_bf16);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float wi = w[i] * p.decay - p.lr * bf2f(o[i]);
        w[i] = wi;
        if (wb) wb[i] = f2bf(wi);
    }
}
