// Logit softcap fused with cross-entropy, the twin of src/backend/cpu/loss.rs.
// For a row of logits z and target y, with cap c (c = 0: no cap):
//   zc_j = c tanh(z_j / c),  lse = log sum_j exp(zc_j),  loss = lse - zc_y
//   dloss/dz_j = (exp(zc_j - lse) - [j = y]) * (1 - (zc_j / c)^2)
// One block per row; the vocabulary is streamed in 8-wide chunks with an
// online max/sum, so neither the capped logits nor the probabilities are ever
// stored in fp32. The backward recomputes zc and the softmax. Targets < 0 are
// ignored (loss and lse 0, zero gradient). vocab must be a multiple of 8.
#include "common.cuh"

NS_DEV float capped(float z, float cap, float inv_cap) { return cap > 0.0f ? cap * ns_tanh(z * inv_cap) : z; }

// Online (max, sum of exp(x - max)) pair merge.
NS_DEV void lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.0f : s * ns_exp(m - mx)) + (m2 == -INFINITY ? 0.0f : s2 * ns_exp(m2 - mx));
    m = mx;
}

extern "C" __global__ void __launch_bounds__(256) softcap_ce_fwd_bf16(NsLossParams p) {
    __shared__ float sm_m[32], sm_s[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const int tgt = reinterpret_cast<const int*>(p.targets)[row];
    float* losses = reinterpret_cast<float*>(p.losses);
    float* lse_out = reinterpret_cast<float*>(p.lse);
    if (tgt < 0) {
        if (threadIdx.x == 0) losses[row] = lse_out[row] = 0.0f;
        return;
    }
    const bf16* z = reinterpret_cast<const bf16*>(p.logits) + (size_t)row * p.vocab;
    const float inv_cap = p.cap > 0.0f ? 1.0f / p.cap : 0.0f;
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x * 8; i < p.vocab; i += blockDim.x * 8) {
        float v[8];
        load8(z + i, v);
        float cm = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            v[j] = capped(v[j], p.cap, inv_cap);
            cm = fmaxf(cm, v[j]);
        }
        float cs = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) cs += ns_exp(v[j] - cm);
        lse_merge(m, s, cm, cs);
    }
    // warp then block merge of the (max, sum) pairs
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sm_m[warp] = m;
        sm_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm_m[lane] : -INFINITY;
        s = lane < nw ? sm_s[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            lse_out[row] = l;
            losses[row] = l - capped(bf2f(z[tgt]), p.cap, inv_cap);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) softcap_ce_bwd_bf16(NsLossParams p) {
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const int tgt = reinterpret_cast<const int*>(p.targets)[row];
    const bf16* z = reinterpret_cast<const bf16*>(p.logits) + (size_t)row * p.vocab;
    bf16* dz = reinterpret_cast<bf16*>(p.dlogits) + (size_t)row * p.vocab;
    const float l = reinterpret_cast<const float*>(p.lse)[row];
    const float inv_cap = p.cap > 0.0f ? 1.0f / p.cap : 0.0f;
    for (int i = threadIdx.x * 8; i < p.vocab; i += blockDim.x * 8) {
        float v[8];
        if (tgt < 0) {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = 0.0f;
        } else {
            load8(z + i, v);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float c = capped(v[j], p.cap, inv_cap);
                const float dcap = 1.0f - (c * inv_cap) * (c * inv_cap);
                const float prob = ns_exp(c - l) - (i + j == tgt ? 1.0f : 0.0f);
                v[j] = prob * dcap * p.scale;
            }
        }
        store8(dz + i, v);
    }
}
