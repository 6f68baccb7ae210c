// Element-wise kernels, the twin of src/backend/cpu/elementwise.rs: the
// residual add of the bf16 activation stream (and gradient sums), and the
// linear combinations of Muon's Newton-Schulz iteration, as one kernel
// out = alpha * a + beta * b (f32 arithmetic, one bf16 rounding).
#include "common.cuh"

// Grid-stride over n elements; 8 per thread per pass through one 16-byte access
// when the three pointers are 16-byte aligned and n is a multiple of 8, else
// one at a time (the host only checks lengths).
extern "C" __global__ void __launch_bounds__(256) axpby_bf16(NsElementwiseParams p) {
    const bf16* a = reinterpret_cast<const bf16*>(p.a);
    const bf16* b = reinterpret_cast<const bf16*>(p.b);
    bf16* out = reinterpret_cast<bf16*>(p.out);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = ((p.a | p.b | p.out) & 15ull) == 0 && (p.n & 7) == 0;
    if (vec) {
        const long long n8 = p.n >> 3;
        for (long long i = first; i < n8; i += stride) {
            float x[8], y[8];
            load8(a + 8 * i, x);
            if (b) {
                load8(b + 8 * i, y);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) y[j] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = p.alpha * x[j] + p.beta * y[j];
            store8(out + 8 * i, x);
        }
    } else {
        for (long long i = first; i < p.n; i += stride) {
            const float y = b ? bf2f(b[i]) : 0.0f;
            out[i] = f2bf(p.alpha * bf2f(a[i]) + p.beta * y);
        }
    }
}
