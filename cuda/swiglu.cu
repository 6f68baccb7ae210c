// SwiGLU gate, the twin of src/backend/cpu/swiglu.rs: y = silu(g) * u with
// silu(g) = g * sigmoid(g); backward du = dy * silu(g),
// dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g). bf16 in and out,
// fp32 math; grid-stride over 8-element groups with 16-byte accesses and a
// scalar tail (n need not be a multiple of 8, bases must be 16-byte aligned).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) swiglu_fwd_bf16(NsSwigluParams p) {
    const bf16* g = reinterpret_cast<const bf16*>(p.g);
    const bf16* u = reinterpret_cast<const bf16*>(p.u);
    bf16* y = reinterpret_cast<bf16*>(p.y);
    const long long groups = p.n >> 3, stride = (long long)gridDim.x * blockDim.x;
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < groups; w += stride) {
        float a[8], b[8];
        load8(g + 8 * w, a);
        load8(u + 8 * w, b);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = ns_swiglu(a[j], b[j]);
        store8(y + 8 * w, a);
    }
    const long long tail = (groups << 3) + blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < p.n) {
        const float a = bf2f(g[tail]);
        y[tail] = f2bf(ns_swiglu(a, bf2f(u[tail])));
    }
}

extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_bf16(NsSwigluParams p) {
    const bf16* g = reinterpret_cast<const bf16*>(p.g);
    const bf16* u = reinterpret_cast<const bf16*>(p.u);
    const bf16* dy = reinterpret_cast<const bf16*>(p.dy);
    bf16* dg = reinterpret_cast<bf16*>(p.dg);
    bf16* du = reinterpret_cast<bf16*>(p.du);
    const long long groups = p.n >> 3, stride = (long long)gridDim.x * blockDim.x;
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < groups; w += stride) {
        float a[8], b[8], d[8], og[8], ou[8];
        load8(g + 8 * w, a);
        load8(u + 8 * w, b);
        load8(dy + 8 * w, d);
#pragma unroll
        for (int j = 0; j < 8; j++) ns_swiglu_bwd(a[j], b[j], d[j], og[j], ou[j]);
        store8(dg + 8 * w, og);
        store8(du + 8 * w, ou);
    }
    const long long tail = (groups << 3) + blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.x == 0 && tail < p.n) {
        float og, ou;
        ns_swiglu_bwd(bf2f(g[tail]), bf2f(u[tail]), bf2f(dy[tail]), og, ou);
        dg[tail] = f2bf(og);
        du[tail] = f2bf(ou);
    }
}
