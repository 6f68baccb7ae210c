// Embedding, the twin of src/backend/cpu/embedding.rs: out[i, :] = table[ids[i], :]
// (f32 master table -> bf16 activations); backward dtable[ids[i], :] += dout[i, :]
// in f32 with atomics (the order of additions to a repeated id is not fixed,
// unlike the CPU's sequential loop: results agree to f32 rounding).
// One block per token; ids are checked < vocab on the host.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) embedding_fwd_bf16(NsEmbeddingParams p) {
    const int i = blockIdx.x;
    if (i >= p.n) return;
    const unsigned id = reinterpret_cast<const unsigned*>(p.ids)[i];
    const float* src = reinterpret_cast<const float*>(p.table) + (size_t)id * p.dim;
    bf16* dst = reinterpret_cast<bf16*>(p.out) + (size_t)i * p.dim;
    for (int j = threadIdx.x; j < p.dim; j += blockDim.x) dst[j] = f2bf(src[j]);
}

extern "C" __global__ void __launch_bounds__(128) embedding_bwd_bf16(NsEmbeddingParams p) {
    const int i = blockIdx.x;
    if (i >= p.n) return;
    const unsigned id = reinterpret_cast<const unsigned*>(p.ids)[i];
    const bf16* src = reinterpret_cast<const bf16*>(p.dout) + (size_t)i * p.dim;
    float* dst = reinterpret_cast<float*>(p.dtable) + (size_t)id * p.dim;
    for (int j = threadIdx.x; j < p.dim; j += blockDim.x) atomicAdd(dst + j, bf2f(src[j]));
}
