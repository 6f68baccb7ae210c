// Dense causal flash attention, the twin of src/backend/cpu/attention.rs:
//   out_t = sum_{s<=t} softmax_s(q_t . k_s * scale) v_s,  lse_t = log sum_s exp(q_t . k_s * scale)
// bf16 q/k/v/out, fp32 softmax statistics and accumulators, tensor cores
// (mma.sync m16n8k16) for both products, grouped-query (query head j uses kv
// head j / (h / h_kv)), head shapes (d, dv) = (64, 64), (128, 128) and MLA's
// (96, 64), (192, 128). Layouts as the CPU twin (attention_forward_dv):
// q [b, t, h, d], k [b, t, h_kv, d], v [b, t, h_kv, dv], out/dout [b, t, h, dv],
// lse/delta [b, h, t].
//
// The kernel bodies live in flash.cuh (shared with window_attention.cu); this
// file gives them the causal mask. Forward (attn_fwd_*): one block of
// 4 warps per (64-query tile, batch x head), streaming the 64-key tiles up to
// the diagonal. Backward: attn_bwd_delta computes delta = rowsum(dout * out);
// attn_bwd_* runs one block per (64-key tile, batch x kv head) over
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

// (d, dv) pairs and the backward's query tile BQ (registers and shared memory per kernel in
// cuda/README.md): GQA (64, 64) and (128, 128); MLA (d_nope + d_rope, d_v) = (96, 64), (192, 128).
#define NS_FLASH_KERNELS(NAME, DQ, DV, BQ)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) attn_fwd_##NAME(NsAttnParams p) {              \
        flash_fwd_body<DQ, DV>(p, CausalMask{});                                                         \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_##NAME(NsAttnParams p) {              \
        flash_bwd_body<DQ, DV, BQ>(p, CausalMask{});                                                     \
    }
NS_FLASH_KERNELS(d64, 64, 64, 64)
NS_FLASH_KERNELS(d128, 128, 128, 16)
NS_FLASH_KERNELS(q96v64, 96, 64, 32)
NS_FLASH_KERNELS(q192v128, 192, 128, 16)

extern "C" __global__ void __launch_bounds__(256) attn_bwd_delta(NsAttnParams p) { flash_bwd_delta_body(p); }

// Dynamic shared memory of the backwards (mirrored in src/backend/cuda/attention.rs)
static_assert(bwd_smem<64, 64, 64>() == 46592 && bwd_smem<128, 128, 16>() == 46720 &&
                  bwd_smem<96, 64, 32>() == 39168 && bwd_smem<192, 128, 16>() == 56960,
              "update the host's smem sizes");
