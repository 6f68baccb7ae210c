/* Kernel ABI: the parameter struct of every kernel family, passed by value as
 * the kernel's single argument. This header is the one source of truth for the
 * layout: the CUDA kernels include it, and bindgen generates its Rust twin
 * (src/backend/cuda/abi.rs, committed; `scripts/gen-bindings.sh` regenerates
 * it and `--check` fails when it is stale).
 *
 * Conventions: device addresses are `ns_dptr` (a CUdeviceptr); tensors are
 * row-major and contiguous unless a leading dimension is given; `bf16` means
 * __nv_bfloat16 in memory, `f32` float. Shapes are written like the CPU twins in
 * src/backend/cpu/ (same names, same math). Only fixed-width C types are used,
 * so the C and Rust layouts agree field by field.
 */
#ifndef NANOSEEK_ABI_H
#define NANOSEEK_ABI_H

/** A device address (CUdeviceptr); 0 means "absent" where a field is optional. */
typedef unsigned long long ns_dptr;

/** rope.cu: rotary embedding of q and k in one pass (NeoX half-split layout).
 * q_in/q_out: bf16 [b, t, h, d]; k_in/k_out: bf16 [b, t, h_kv, d] (in == out is
 * allowed); cos/sin: f32 [max_t, d/2]. Token row r has position r % t.
 * inverse = 1 applies the backward (rotation by the negative angle). */
typedef struct NsRopeParams {
    ns_dptr q_in;
    ns_dptr q_out;
    ns_dptr k_in;
    ns_dptr k_out;
    ns_dptr cos;
    ns_dptr sin;
    int rows; /* b * t */
    int t;
    int h;
    int h_kv;
    int d;
    int inverse;
} NsRopeParams;

/** norm.cu: parameter-free RMSNorm over the last dimension.
 * Forward: x bf16 [rows, dim] -> y bf16 [rows, dim], rstd f32 [rows].
 * Backward: x, rstd, dy bf16 -> dx bf16 [rows, dim]. */
typedef struct NsNormParams {
    ns_dptr x;
    ns_dptr y;
    ns_dptr rstd;
    ns_dptr dy;
    ns_dptr dx;
    int rows;
    int dim;
    float eps;
    int pad_;
} NsNormParams;

/** norm.cu: affine LayerNorm over the last dimension (the DSA indexer's key norm).
 * Forward: x bf16 [rows, dim], gamma, beta bf16 [dim] -> y bf16 [rows, dim],
 * stats f32 [rows, 2] = (mean, 1/std). Backward: x, stats, gamma, dy -> dx bf16
 * [rows, dim] (one launch), dgamma, dbeta bf16 [dim] (another). */
typedef struct NsLayerNormParams {
    ns_dptr x;
    ns_dptr gamma;
    ns_dptr beta;
    ns_dptr y;
    ns_dptr stats;
    ns_dptr dy;
    ns_dptr dx;
    ns_dptr dgamma;
    ns_dptr dbeta;
    int rows;
    int dim;
    float eps;
    int pad_;
} NsLayerNormParams;

/** swiglu.cu: y = silu(g) * u and its backward; all bf16 [n]. */
typedef struct NsSwigluParams {
    ns_dptr g;
    ns_dptr u;
    ns_dptr y;
    ns_dptr dy;
    ns_dptr dg;
    ns_dptr du;
    long long n;
} NsSwigluParams;

/** embedding.cu: out[i, :] = table[ids[i], :] (f32 table -> bf16 out);
 * backward dtable[ids[i], :] += dout[i, :] (bf16 dout, f32 dtable, atomics).
 * ids: u32 [n], each < vocab (checked on the host). */
typedef struct NsEmbeddingParams {
    ns_dptr table;
    ns_dptr ids;
    ns_dptr out;
    ns_dptr dout;
    ns_dptr dtable;
    int n;
    int dim;
} NsEmbeddingParams;

/** loss.cu: logit softcap fused with cross-entropy, one row per block, the
 * vocabulary streamed in chunks (online max/sum: no fp32 logits kept).
 * logits bf16 [rows, vocab], targets i32 [rows] (< 0: ignored),
 * losses f32 [rows], lse f32 [rows]; backward writes dlogits bf16 [rows, vocab]
 * = scale * dloss/dlogits. cap = 0 disables the cap. */
typedef struct NsLossParams {
    ns_dptr logits;
    ns_dptr targets;
    ns_dptr losses;
    ns_dptr lse;
    ns_dptr dlogits;
    int rows;
    int vocab;
    float cap;
    float scale;
} NsLossParams;

/** optim.cu: decoupled AdamW on f32 master weights (the host precomputes the
 * bias corrections exactly as the CPU twin does):
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps).
 * p_bf16 (optional) receives a bf16 copy of the updated p. */
typedef struct NsAdamWParams {
    ns_dptr p;
    ns_dptr g;
    ns_dptr m;
    ns_dptr v;
    ns_dptr p_bf16;
    long long n;
    float beta1;
    float beta2;
    float eps;
    float decay;
    float step_size;
    float bc2_sqrt;
} NsAdamWParams;

/** optim.cu: gradient norm and clipping. sumsq: partials f32 [blocks] then
 * out f32 [1] = sum(x^2) in a fixed order (deterministic); scale: x *= *factor
 * (a device scalar, so clipping needs no host round trip). */
typedef struct NsReduceParams {
    ns_dptr x;
    ns_dptr partials;
    ns_dptr out;
    ns_dptr factor;
    long long n;
    int blocks;
    float max_norm;
} NsReduceParams;

/** gemm.cu: C = alpha * op(A) op(B) + beta * C for each of `batch` matrices,
 * bf16 A and B, fp32 accumulation, C f32 or bf16 (by kernel name). op(A) is
 * [m, k]: stored [m, k] (lda >= k) for N or [k, m] (lda >= m) for T; op(B) is
 * [k, n]: stored [k, n] (ldb >= n) for N or [n, k] (ldb >= k) for T. Batch i
 * uses A + i*stride_a etc. (in elements). Requirements checked on the host:
 * the contiguous dimension of each operand and lda, ldb multiples of 8,
 * 16-byte aligned bases. beta = 0 never reads C.
 * Fused epilogue (each pointer optional, 0 = absent; each of C's type and
 * layout, never read outside [m, n]): v = alpha * AB + beta * C + resid (the
 * bias-free residual add); C = v unless c is 0 (then beta must be 0); with a
 * gate, act = silu(gate) * v (SwiGLU with the product as its "up" half, v
 * unrounded). SwiGLU backward (kernels *_swiglu_bwd): v is the gradient of
 * act = silu(gate) * up; with s = sigmoid(gate) the kernel writes
 * C = v * up * s * (1 + gate * (1 - s)) (the gate's gradient) and
 * dup = v * gate * s (the up half's); gate, up, dup of C's type and layout. */
typedef struct NsGemmParams {
    ns_dptr a;
    ns_dptr b;
    ns_dptr c;
    int m;
    int n;
    int k;
    int lda;
    int ldb;
    int ldc;
    long long stride_a;
    long long stride_b;
    long long stride_c;
    int batch;
    float alpha;
    float beta;
    int pad_;
    ns_dptr resid;
    ns_dptr gate;
    ns_dptr act;
    ns_dptr up;
    ns_dptr dup;
} NsGemmParams;

/** attention.cu: causal softmax attention, scale = 1/sqrt(d) (passed),
 * grouped-query (query head j uses kv head j / (h / h_kv)).
 * q, dq: bf16 [b, t, h, d]; k, dk: [b, t, h_kv, d]; v, dv: [b, t, h_kv, dv];
 * out, dout: bf16 [b, t, h, dv]; lse, delta: f32 [b, h, t] (natural log of
 * the scaled scores, like the CPU). The backward's gradients are f32: dq_acc
 * [b, t, h, d] is accumulated with atomics (zeroed by the host first); dk_acc,
 * dv_acc are written once per key row (overwritten).
 * (d, dv) is (64, 64), (128, 128), (96, 64) or (192, 128) (kernel name). */
typedef struct NsAttnParams {
    ns_dptr q;
    ns_dptr k;
    ns_dptr v;
    ns_dptr out;
    ns_dptr lse;
    ns_dptr dout;
    ns_dptr delta;
    ns_dptr dq_acc;
    ns_dptr dk_acc;
    ns_dptr dv_acc;
    int b;
    int t;
    int h;
    int h_kv;
    int d;  /* query/key width d_qk */
    float scale;
    int dv; /* value/output width d_v (= d for GQA) */
    int pad_;
} NsAttnParams;

/** window_attention.cu: sliding-window causal attention with global tokens.
 * Query i sees key s iff s <= i and (i - s < window or s < n_global). `attn`
 * holds the tensors and shapes exactly as for attention.cu (same layouts, dtypes,
 * lse convention, dq_acc zeroed by the host, dk_acc/dv_acc overwritten).
 * window (W >= 1) and n_global (G >= 0) are clamped to t by the host (W >= t is
 * dense causal attention, as is G >= t). */
typedef struct NsWindowAttnParams {
    NsAttnParams attn;
    int window;
    int n_global;
} NsWindowAttnParams;

/** dsa.cu: DeepSeek Sparse Attention (twin: src/backend/cpu/dsa.rs).
 * Attention: q, out, dout bf16 [b, t, h, d]; k, v bf16 [b, t, h_kv, d];
 * lse f32 [b, h, t] (natural log of the scaled scores); dq f32 [b, t, h, d]
 * (overwritten); dk, dv f32 [b, t, h_kv, d] (scatter-added with atomics: the
 * host zeroes them first). d is 64 or 128 (kernel name).
 * Indexer: qi bf16 [b, t, n_index_heads, index_dim], ki bf16 [b, t, index_dim],
 * wi bf16 [b, t, n_index_heads]; sel u32 [b, t, kmax] (each row ascending, then
 * 0xffffffff); dqi f32 like qi, dwi f32 like wi (overwritten), dki f32 like ki
 * (atomics, zeroed by the host).
 * Workspaces: scores f32 [rows, t] (indexer scores of the query rows
 * q0 .. q0 + rows of batch bi, one launch per such chunk); g_sel, pt f32
 * [b, t, kmax] (KL: per selected entry); loss_rows f32 [b, t]; loss f32 [1]
 * (the mean KL over the b * t queries).
 * topk and window are clamped to t by the host (same selection). */
typedef struct NsDsaParams {
    ns_dptr q;
    ns_dptr k;
    ns_dptr v;
    ns_dptr out;
    ns_dptr lse;
    ns_dptr dout;
    ns_dptr dq;
    ns_dptr dk;
    ns_dptr dv;
    ns_dptr qi;
    ns_dptr ki;
    ns_dptr wi;
    ns_dptr sel;
    ns_dptr scores;
    ns_dptr dqi;
    ns_dptr dki;
    ns_dptr dwi;
    ns_dptr g_sel;
    ns_dptr pt;
    ns_dptr loss_rows;
    ns_dptr loss;
    int b;
    int t;
    int h;
    int h_kv;
    int d;
    int n_index_heads;
    int index_dim;
    int topk;
    int window;
    int kmax;
    int q0;   /* indexer: first query row of this launch's chunk */
    int rows; /* indexer: query rows of this chunk */
    int bi;   /* indexer: batch of this chunk */
    float scale; /* 1 / sqrt(d) */
    float inv_bt; /* 1 / (b * t) */
    int pad_;
} NsDsaParams;

/** moe.cu: DeepSeek-V3 mixture-of-experts routing (the twin of
 * src/backend/cpu/moe.rs; n tokens, E experts, K experts per token, G groups).
 * Router (moe_route, one warp per token): logits f32 [n, E] and bias f32 [E]
 * -> scores f32 [n, E], experts u32 [n, K] (descending s + b, ties to the
 * lower index), gates f32 [n, K] (before capacity drops). softmax = 0 is
 * sigmoid scores, 1 softmax. Router backward (moe_router_bwd): scores,
 * experts, position (u32 [n, K], 0xffffffff = dropped), d_gates f32 [n, K] and
 * optional d_scores_extra f32 [n, E] -> d_logits f32 [n, E] (overwritten). */
typedef struct NsMoeRouteParams {
    ns_dptr logits;
    ns_dptr bias;
    ns_dptr scores;
    ns_dptr experts;
    ns_dptr gates;
    ns_dptr position;
    ns_dptr d_gates;
    ns_dptr d_scores_extra;
    ns_dptr d_logits;
    int n;
    int n_experts;
    int top_k;
    int n_group;
    int topk_group;
    int softmax;
    float routed_scaling_factor;
    int pad_;
} NsMoeRouteParams;

/** moe.cu: dispatch (the expert-contiguous permutation with capacity drops in
 * assignment order a = token * K + slot) and the balancing statistics.
 * experts u32 [n_assign]; gates f32 [n_assign] (dropped ones set to 0);
 * chunk_hist u32 [n_chunks, E] (per-chunk histograms of 1024 assignments,
 * replaced by their exclusive prefix over chunks); demand, counts u32 [E]
 * (before / after the capacity cap); offsets, tile_offsets u32 [E + 1]
 * (exclusive prefix of counts and of ceil(counts / 128), the grouped GEMM's
 * row tiles); order u32 [n_assign] (position -> assignment, the first
 * offsets[E] valid); position u32 [n_assign] (0xffffffff = dropped).
 * moe_balance: bias f32 [E] (optional) += gamma * sign(mean - counts[e]);
 * stats f32 [2] (optional) = (max / mean, std / mean) of counts. */
typedef struct NsMoeDispatchParams {
    ns_dptr experts;
    ns_dptr gates;
    ns_dptr chunk_hist;
    ns_dptr demand;
    ns_dptr counts;
    ns_dptr offsets;
    ns_dptr tile_offsets;
    ns_dptr order;
    ns_dptr position;
    ns_dptr bias;
    ns_dptr stats;
    int n_assign;
    int n_experts;
    int n_chunks;
    unsigned int capacity;
    float gamma;
    int pad_;
} NsMoeDispatchParams;

/** moe.cu: grouped GEMMs over the expert segments of the permuted rows (bf16
 * operands, fp32 accumulation). offsets, tile_offsets: u32 [E + 1] from the
 * dispatch. Row-grouped (moe_gemm_rows_*): for each expert e, C[seg] = A[seg]
 * op(B_e) (+ A2[seg] op(B2_e) when a2 != 0), seg = rows offsets[e]..offsets[e+1]
 * of A [P, k] (lda) and C [P, n] (ldc); B_e = b + e * stride_b, stored [n, k]
 * (nt) or [k, n] (nn), ldb. Expert-grouped (moe_gemm_experts_tn_f32): for
 * each expert e (blockIdx.z), C_e [m, n] = A[seg]^T B[seg], A [P, m] (lda),
 * B [P, n] (ldb), C_e = c + e * stride_c (ldc), overwritten (0 for an empty
 * segment). m, n, lda, ldb multiples of 8; k a multiple of 8 (row-grouped). */
typedef struct NsMoeGemmParams {
    ns_dptr a;
    ns_dptr b;
    ns_dptr a2;
    ns_dptr b2;
    ns_dptr c;
    ns_dptr offsets;
    ns_dptr tile_offsets;
    long long stride_b;
    long long stride_c;
    int n_experts;
    int m;
    int n;
    int k;
    int lda;
    int ldb;
    int ldc;
    int pad_;
} NsMoeGemmParams;

/** moe.cu: the per-row kernels of the expert FFN, all over the P = offsets[E]
 * kept positions (p_max = n * K rows allocated) or the n tokens.
 * x, out, dout bf16 [n, c]; xg, y, dy bf16 [p_max, c]; hg, hu, act, d_act,
 * dhg, dhu bf16 [p_max, f]; dxg f32 [p_max, c]; dx f32 [n, c];
 * order, position, offsets u32 and gates, d_gates f32 as in NsMoeDispatchParams.
 * gather: xg[p] = x[order[p] / K]; combine: out[t] = sum over kept slots of
 * gates * y[position]; combine backward: d_gates[order[p]] = dout[t] . y[p],
 * dy[p] = gate * dout[t]; dx[t] = sum over kept slots of dxg[position];
 * SwiGLU: act = silu(hg) * hu and its backward from d_act. */
typedef struct NsMoeRowsParams {
    ns_dptr x;
    ns_dptr xg;
    ns_dptr order;
    ns_dptr position;
    ns_dptr offsets;
    ns_dptr gates;
    ns_dptr y;
    ns_dptr out;
    ns_dptr dout;
    ns_dptr dy;
    ns_dptr d_gates;
    ns_dptr dxg;
    ns_dptr dx;
    ns_dptr hg;
    ns_dptr hu;
    ns_dptr act;
    ns_dptr d_act;
    ns_dptr dhg;
    ns_dptr dhu;
    int n;
    int c;
    int f;
    int top_k;
    int n_experts;
    int p_max;
} NsMoeRowsParams;

/** elementwise.cu: out = alpha * a + beta * b, all bf16 [n], computed in f32
 * (b = 0: out = alpha * a). out may alias a or b (each element is read, then
 * written, by one thread). The residual add (alpha = beta = 1) and the
 * combinations of Muon's Newton-Schulz step. */
typedef struct NsElementwiseParams {
    ns_dptr a;
    ns_dptr b;
    ns_dptr out;
    long long n;
    float alpha;
    float beta;
} NsElementwiseParams;

/** optim.cu, Muon (twins: the Muon branch of optim::Optimizer::update and the
 * normalization of cpu::optim::newton_schulz); f32 [n] unless noted:
 * muon_momentum_f32:  buf = mu * buf + (1 - mu) * g; u = (1 - mu) * g + mu * buf;
 * muon_normalize_bf16: x (bf16 [n]) = u / (sqrt(sumsq[0]) + 1e-7), sumsq f32 [1]
 *                      on the device (from sumsq_partial_f32 / sumsq_final_f32);
 * muon_apply_f32:     w = w * decay - lr * o (o bf16 [n]); w_bf16 (bf16 [n],
 *                      optional) = the bf16 copy of the new w. */
typedef struct NsMuonParams {
    ns_dptr buf;
    ns_dptr g;
    ns_dptr u;
    ns_dptr sumsq;
    ns_dptr x;
    ns_dptr w;
    ns_dptr o;
    ns_dptr w_bf16;
    long long n;
    float mu;
    float decay;
    float lr;
    int pad_;
} NsMuonParams;

/** gemm.cu, gemm_wgmma_tma_nt_{f32,bf16} (sm_90a, C = alpha * A B^T + beta * C,
 * A [batch, m, k], B [batch, n, k]): the GEMM parameters `g` (NsGemmParams,
 * lda = ldb = k) plus one TMA descriptor per operand (a CUtensorMap: 128 opaque
 * bytes, 64-byte aligned, made on the host by cuTensorMapEncodeTiled over the
 * same buffers as g.a / g.b): bf16, rank 3 with dimensions (k, rows, batch)
 * innermost first, byte strides (2k, 2 rows k), box 64 x 128 x 1, 128-byte
 * swizzle, out-of-bounds elements read as zero. The kernel takes this struct as
 * a `const __grid_constant__` parameter (the descriptors must stay in
 * parameter space). */
typedef struct NsGemmTmaParams {
    unsigned long long tmap_a[16] __attribute__((aligned(64)));
    unsigned long long tmap_b[16];
    NsGemmParams g;
} NsGemmTmaParams;

/** rope.cu, rope_qknorm_{fwd,bwd}_bf16: QK-norm (parameter-free RMSNorm of every
 * head, eps) fused with the rotary embedding of NsRopeParams, per head vector x of
 * width d: forward rstd = 1/sqrt(mean(x^2) + eps), y = rope(x * rstd); backward
 * dxh = rope^-1(dy), dx = rstd * (dxh - xh * mean(dxh * xh)) with xh = x * rstd.
 * q_raw: bf16 [b, t, h, d]; k_raw: bf16 [b, t, h_kv, d]; cos/sin: f32 [max_t, d/2];
 * token row r has position r % t. Forward writes q, k (bf16, shapes of q_raw,
 * k_raw) and rstd_q f32 [b*t*h], rstd_k f32 [b*t*h_kv]. Backward reads q_raw,
 * k_raw, rstd_q, rstd_k and dq, dk (bf16, gradients w.r.t. the rotated q, k) and
 * writes dq_raw, dk_raw (bf16, shapes of q_raw, k_raw). Fields a direction does
 * not use are 0. d is a multiple of 16, 16 <= d <= 512 (checked on the host). */
typedef struct NsRopeQkNormParams {
    ns_dptr q_raw;
    ns_dptr k_raw;
    ns_dptr q;
    ns_dptr k;
    ns_dptr rstd_q;
    ns_dptr rstd_k;
    ns_dptr dq;
    ns_dptr dk;
    ns_dptr dq_raw;
    ns_dptr dk_raw;
    ns_dptr cos;
    ns_dptr sin;
    int rows; /* b * t */
    int t;
    int h;
    int h_kv;
    int d;
    float eps;
} NsRopeQkNormParams;

#endif /* NANOSEEK_ABI_H */
