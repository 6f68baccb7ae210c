// Sliding-window causal flash attention with global tokens, the twin of
// src/backend/cpu/window_attention.rs: query i sees the keys
//   A(i) = {s : i - W < s <= i} U {s < G, s <= i}
// (the W most recent, itself included, and the first G tokens); softmax over
// A(i), scale 1/sqrt(d), lse_i = log sum_{s in A(i)} exp(q_i . k_s * scale).
// Same layouts, GQA, tiling and numerics as attention.cu: the kernel bodies are
// flash.cuh's, given the window mask below.
//
// Work is O(T (W + G)): key tiles that no query of a tile can see are never
// loaded. Forward (wattn_fwd_d{64,128}): one block per (64-query tile q0..q1,
// batch x head) reads only the key ranges of `key_segments` on the CPU, the
// global prefix 0..min(G, q1) and the window q0 + 1 - W..q1 (clamped at 0),
// merged into 0..q1 when they touch, each in 64-key tiles from its start
// (forward_key_tiles in src/backend/cuda/window_attention.rs lists the same
// tiles). Backward (wattn_bwd_d{64,128}, one block per 64-key tile k0..k0+64):
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

extern "C" __global__ void __launch_bounds__(THREADS) wattn_fwd_d64(NsWindowAttnParams p) {
    flash_fwd_body<64>(p.attn, WindowMask{p.window, p.n_global});
}
extern "C" __global__ void __launch_bounds__(THREADS) wattn_fwd_d128(NsWindowAttnParams p) {
    flash_fwd_body<128>(p.attn, WindowMask{p.window, p.n_global});
}

extern "C" __global__ void __launch_bounds__(256) wattn_bwd_delta(NsWindowAttnParams p) {
    flash_bwd_delta_body(p.attn);
}

// Dynamic shared memory as attention.cu's backward: bwd_smem<64, 64>() for d = 64 and
// bwd_smem<128, 16>() for d = 128 (mirrored in src/backend/cuda/window_attention.rs).
extern "C" __global__ void __launch_bounds__(THREADS) wattn_bwd_d64(NsWindowAttnParams p) {
    flash_bwd_body<64, 64>(p.attn, WindowMask{p.window, p.n_global});
}
extern "C" __global__ void __launch_bounds__(THREADS) wattn_bwd_d128(NsWindowAttnParams p) {
    flash_bwd_body<128, 16>(p.attn, WindowMask{p.window, p.n_global});
}

static_assert(bwd_smem<64, 64>() == 46592 && bwd_smem<128, 16>() == 46720, "update the host's smem sizes");
