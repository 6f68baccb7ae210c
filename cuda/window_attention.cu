// Sliding-window causal flash attention with global tokens, the twin of
// src/backend/cpu/window_attention.rs: query i sees the keys
//   A(i) = {s : i - W < s <= i} U {s < G, s <= i}
// (the W most recent, itself included, and the first G tokens); softmax over
// A(i), scale 1/sqrt(d), lse_i = log sum_{s in A(i)} exp(q_i . k_s * scale).
// Same layouts, GQA, tiling and numerics as attention.cu: the kernel bodies are
// flash.cuh's, given the window mask below.
//
// Work is O(T (W + G)): key tiles that no query of a tile can see are never
// loaded. Forward (wattn_fwd_*, the same four head shapes): one block per (64-query tile q0..q1,
// batch x head) reads only the key ranges of `key_segments` on the CPU, the
// global prefix 0..min(G, q1) and the window q0 + 1 - W..q1 (clamped at 0),
// merged into 0..q1 when they touch, each in 64-key tiles from its start
// (forward_key_tiles in src/backend/cuda/window_attention.rs lists the same
// tiles). Backward (wattn_bwd_*, one block per 64-key tile k0..k0+64):
// the query tiles from k0 to the end when the tile holds a global key (k0 < G),
// else only those before k0 + 64 + W - 1 (the last query a window key reaches
// is its position + W - 1). Partial tiles are masked element by element.
#include "flash.cuh"

namespace ns_wattn {  // named: an anonymous namespace would put a path hash into the PTX
// w = W >= 1 and g = G >= 0, both clamped to t by the host.
struct WindowMask {
    int w, g;
    NS_DEV KeySegs segments(int q0, int q1) const {
        const int lo = max(0, q0 + 1 - w), gl = min(g, q1);
        return gl >= lo ? KeySegs{0, q1, q1, q1} : KeySegs{0, gl, lo, q1};
    }
    NS_DEV bool visible(int key, int qi) const { return key <= qi && (qi - key < w || key < g); }
    NS_DEV int query_end(int k0, int t) const {
        return k0 < g ? t : (int)min((long long)t, (long long)k0 + ns_flash::KT + w - 1);
    }
};
}  // namespace ns_wattn
using namespace ns_flash;
using namespace ns_wattn;

// (d, dv) pairs and the backward's query tile BQ (registers and shared memory per kernel in
// cuda/README.md): GQA (64, 64) and (128, 128); MLA (d_nope + d_rope, d_v) = (96, 64), (192, 128).
#define NS_FLASH_KERNELS(NAME, DQ, DV, BQ)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) wattn_fwd_##NAME(NsWindowAttnParams p) {       \
        flash_fwd_body<DQ, DV>(p.attn, WindowMask{p.window, p.n_global});                                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) wattn_bwd_##NAME(NsWindowAttnParams p) {       \
        flash_bwd_body<DQ, DV, BQ>(p.attn, WindowMask{p.window, p.n_global});                            \
    }
NS_FLASH_KERNELS(d64, 64, 64, 64)
NS_FLASH_KERNELS(d128, 128, 128, 16)
NS_FLASH_KERNELS(q96v64, 96, 64, 32)
NS_FLASH_KERNELS(q192v128, 192, 128, 16)

extern "C" __global__ void __launch_bounds__(256) wattn_bwd_delta(NsWindowAttnParams p) { flash_bwd_delta_body(p.attn); }

// Dynamic shared memory of the backwards (mirrored in src/backend/cuda/attention.rs)
static_assert(bwd_smem<64, 64, 64>() == 46592 && bwd_smem<128, 128, 16>() == 46720 &&
                  bwd_smem<96, 64, 32>() == 39168 && bwd_smem<192, 128, 16>() == 56960,
              "update the host's smem sizes");
