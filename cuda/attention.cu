// Dense causal flash attention, the twin of src/backend/cpu/attention.rs:
//   out_t = sum_{s<=t} softmax_s(q_t . k_s * scale) v_s,  lse_t = log sum_s exp(q_t . k_s * scale)
// bf16 q/k/v/out, fp32 softmax statistics and accumulators, tensor cores
// (mma.sync m16n8k16) for both products, head dims 64 and 128, grouped-query
// (query head j uses kv head j / (h / h_kv)). Layouts as the CPU twin:
// q/out/dout [b, t, h, d], k/v [b, t, h_kv, d], lse/delta [b, h, t].
//
// The kernel bodies live in flash.cuh (shared with window_attention.cu); this
// file gives them the causal mask. Forward (attn_fwd_d{64,128}): one block of
// 4 warps per (64-query tile, batch x head), streaming the 64-key tiles up to
// the diagonal. Backward: attn_bwd_delta computes delta = rowsum(dout * out);
// attn_bwd_d{64,128} runs one block per (64-key tile, batch x kv head) over
// every query tile from the diagonal to the end.
#include "flash.cuh"

namespace ns_attn {  // named: an anonymous namespace would put a path hash into the PTX
// Causal: query qi sees keys 0..=qi; a query tile q0..q1 reads the single range 0..q1.
struct CausalMask {
    NS_DEV KeySegs segments(int, int q1) const { return KeySegs{0, q1, q1, q1}; }
    NS_DEV bool visible(int key, int qi) const { return key <= qi; }
    NS_DEV int query_end(int, int t) const { return t; }
};
}  // namespace ns_attn
using namespace ns_flash;
using namespace ns_attn;

extern "C" __global__ void __launch_bounds__(THREADS) attn_fwd_d64(NsAttnParams p) {
    flash_fwd_body<64>(p, CausalMask{});
}
extern "C" __global__ void __launch_bounds__(THREADS) attn_fwd_d128(NsAttnParams p) {
    flash_fwd_body<128>(p, CausalMask{});
}

extern "C" __global__ void __launch_bounds__(256) attn_bwd_delta(NsAttnParams p) { flash_bwd_delta_body(p); }

// Dynamic shared memory: (2*64*(D+8) + 2*BQ*(D+8) + 64*(BQ+8))*2 + 8*BQ bytes with
// BQ = 64 for d = 64 and 16 for d = 128 (mirrored in src/backend/cuda/attention.rs).
extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_d64(NsAttnParams p) {
    flash_bwd_body<64, 64>(p, CausalMask{});
}
extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_d128(NsAttnParams p) {
    flash_bwd_body<128, 16>(p, CausalMask{});
}

static_assert(bwd_smem<64, 64>() == 46592 && bwd_smem<128, 16>() == 46720, "update the host's smem sizes");
