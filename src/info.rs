//! `nanoseek info`: exact parameter counts per component, beside the seed's claims.

use crate::nn::ModelConfig;

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// A human-readable report for one configuration.
pub fn report(name: &str, c: &ModelConfig) -> String {
    let (attn, ffn) = c.block_params();
    let emb = c.vocab_size * c.n_embd;
    let total = c.num_params();
    let mut s = String::new();
    s += &format!("model '{name}': {} layers, n_embd {}, {} heads ({} kv) × head_dim {}, ffn_hidden {}, vocab {}, max_seq_len {}\n", c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden, c.vocab_size, c.max_seq_len);
    if c.n_head * c.head_dim != c.n_embd {
        s += &format!(
            "  note: n_embd / n_head is not {}; heads are {} wide (q width {})\n",
            c.head_dim,
            c.head_dim,
            c.q_dim()
        );
    }
    let (blocks, active_blocks) = c.block_params_total();
    let m = &c.moe;
    if c.is_mla() {
        s += &format!(
            "  MLA: query latent {} ({}), kv latent {}, heads q/k {} + {} (rotary, one shared key), v {}\n",
            c.q_lora_rank,
            if c.q_lora_rank > 0 { "wq_a, wq_b" } else { "0: direct wq" },
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim
        );
    }
    let attn_name = match (c.is_mla(), c.q_lora_rank > 0) {
        (false, _) => "attention (c_q, c_k, c_v, c_proj) per layer",
        (true, true) => "attention (MLA: wq_a, wq_b, wkv_a, wkv_b, c_proj)",
        (true, false) => "attention (MLA: wq, wkv_a, wkv_b, c_proj)/layer",
    };
    let mut rows = vec![
        ("wte (embedding)".to_string(), emb),
        (attn_name.into(), attn),
        ("ffn (w_gate, w_up, w_down) per dense layer".into(), ffn),
    ];
    if m.enabled() {
        let moe_layers = (0..c.n_layer).filter(|&l| c.is_moe_layer(l)).count();
        let (moe_total, moe_active) = c.ffn_params(c.n_layer - 1);
        s += &format!(
            "  MoE in {moe_layers} of {} layers: {} routed experts (top-{}) + {} shared, expert width {}, {} routing\n",
            c.n_layer, m.n_routed_experts, m.top_k, m.n_shared_experts, m.moe_inter_dim, m.score_func
        );
        rows.push(("moe ffn (router, experts, shared) per MoE layer".into(), moe_total));
        rows.push(("  of which active per token".into(), moe_active));
    }
    rows.push(("all blocks".into(), blocks));
    rows.push(("lm_head".into(), emb));
    if c.mtp_depth > 0 {
        // not read by plain decoding: training and speculative drafting only
        let (mtp, mtp_active) = c.mtp_params();
        s += &format!(
            "  multi-token prediction: {} module(s) (projection [C, 2C] + one block each; layers {}..{}), λ {}\n",
            c.mtp_depth,
            c.n_layer,
            c.n_layer + c.mtp_depth - 1,
            c.mtp_lambda
        );
        rows.push(("MTP modules (training and drafting only)".into(), mtp));
        if mtp_active != mtp {
            rows.push(("  of which active per token".into(), mtp_active));
        }
    }
    rows.push(("total".into(), total));
    rows.push(("non-embedding (blocks)".into(), blocks));
    if m.enabled() {
        rows.push(("active per token (total)".into(), c.active_params()));
        rows.push(("active per token (non-embedding)".into(), active_blocks));
    }
    for (what, n) in rows {
        s += &format!("  {what:<48} {n:>16} ({})\n", human(n));
    }
    match ModelConfig::seed_claim(name) {
        Some(claim) => {
            s += &format!(
                "  seed's approximate size: {claim} (counts non-embedding parameters; ours: {})\n",
                human(blocks)
            )
        }
        None => s += "  seed's approximate size: (not in the seed's table)\n",
    }
    s += &format!("  training FLOPs per token at max_seq_len: {:.3e}\n", c.flops_per_token(c.max_seq_len));
    s
}

/// Predicted bytes of a CPU training step by `memory::Category` (CATEGORIES order),
/// mirroring what the engine allocates: f32 parameters, one gradient buffer, optimizer
/// state (Muon: 1 value per matrix entry; AdamW: 2), the tape's activations, and its
/// gradient workspace at its largest. `checkpoint_every` as in `Model::checkpoint_every`.
pub fn predict_training_bytes(c: &ModelConfig, batch: usize, seq: usize, checkpoint_every: usize) -> [usize; 5] {
    let (n, cc, f, v) = (batch * seq, c.n_embd, c.ffn_hidden, c.vocab_size);
    let (hd, kvd, h, hkv) = (c.q_dim(), c.kv_dim(), c.n_head, c.n_kv_head);
    let params = c.num_params();
    // the model's layers, then the MTP modules' blocks
    let layers = c.n_layer + c.mtp_depth;
    // Muon keeps one value per block matrix entry (routers are AdamW: two per entry).
    let routers = (0..layers).filter(|&l| c.is_moe_layer(l)).count() * c.moe.n_routed_experts * cc;
    // (and the v32 indexers' norm vectors, AdamW too)
    let vectors: usize = (0..layers).map(|l| c.vector_params(l)).sum();
    let matrices = c.block_params_total().0 + c.mtp_params().0 - routers - vectors;
    let optimizer = matrices + 2 * (params - matrices);
    // Values and saved state the tape keeps for one block (see Model::block): six [n, C]
    // tensors, three of the query width, three of the kv width, the FFN's, plus RMSNorm's
    // 1/rms per row and per head, and attention's log-sum-exp. A dense FFN keeps three
    // [n, ffn_hidden] tensors; a MoE FFN its router logits and scores [n, E] (and the balance
    // loss's score gradient), per kept assignment the gathered input, three hidden rows and the
    // expert output, and the shared experts' three hidden tensors plus two [n, C] sums.
    let m = &c.moe;
    let moe_ffn = m.n_routed_experts * (2 + usize::from(m.seq_aux_alpha > 0.0))
        + m.top_k * (2 * cc + 3 * m.moe_inter_dim)
        + if m.n_shared_experts > 0 { 3 * m.n_shared_experts * m.moe_inter_dim + 2 * cc } else { 0 };
    // A DSA layer also keeps the indexer's detached input [n, C], its projections before and after
    // RoPE/scaling (2·(H_I·d_I + d_I + H_I)), the selection (kmax ids) and the KL's saved gradients.
    let (hi, di) = (c.index_n_heads, c.index_head_dim);
    let kmax = (c.index_topk + c.index_local_window).min(seq);
    // (the v32 indexer: `ModelConfig::v32_indexer_activations_per_token`)
    let dsa =
        kmax + if c.is_v32_indexer() { c.v32_indexer_activations_per_token() } else { cc + 3 * (hi * di + di + hi) };
    // The attention projection: GQA's q, k, v, their QK-norm (+ rstd per head) and the attention
    // (+ lse); or MLA's latents, per-head pieces and attention (`ModelConfig::mla_activations_per_token`).
    let attn = if c.is_mla() { c.mla_activations_per_token() } else { 3 * hd + 3 * kvd + h + hkv + h };
    let block_of = |l: usize| {
        let ffn = if c.is_moe_layer(l) { moe_ffn } else { 3 * f };
        let index = if c.attn_kind(l) == crate::nn::AttnKind::Sparse { dsa } else { 0 };
        n * (6 * cc + attn + ffn + index + 2)
    };
    let block = (0..layers).map(block_of).max().unwrap_or(0);
    // embedding (+ids), its norm, the final norm, the logits, the loss's targets and lse
    let head = n * (cc + 1) + n * v + 2 * n + 1;
    let outer = n * (cc + 1) + n * (cc + 1) + head;
    // each MTP depth: the norm of its input rows, the shifted embedding (+ids) and its norm, the
    // concatenation [n, 2C] and the projection, then a head of its own (nn::mtp)
    let mtp = c.mtp_depth * (n * (cc + 1) + 2 * n * (cc + 1) + 2 * n * cc + n * cc + head);
    let checkpointed = if checkpoint_every == 0 { 0 } else { layers.div_ceil(checkpoint_every) };
    let all_blocks: usize = (0..layers).map(block_of).sum();
    let plain_blocks = if checkpoint_every == 0 {
        all_blocks
    } else {
        (0..layers).filter(|l| l % checkpoint_every != 0).map(block_of).sum()
    };
    // At the end of the forward: every kept value (a checkpointed block keeps only its output).
    let forward = outer + mtp + plain_blocks + checkpointed * n * cc;
    // The peak is the start of the backward: every activation of the forward alive, plus the
    // logits' gradient, or, once the logits are freed after the loss's backward, lm_head's
    // weight gradient before it is added into its buffer (the parameters' gradients accumulate
    // in place, so they are no workspace). From there on each value is freed once the last
    // backward that reads it ran. With checkpointing, a recomputed block's
    // activations (and a copy of its input, and the gradient flowing into it) exist once more,
    // after the head's logits and final norm are gone.
    let start = (forward, (n * v).max(v * cc));
    let recompute = (forward + block + n * cc - n * v - n * (cc + 1), n * cc);
    let (activations, workspace) =
        if checkpointed > 0 && recompute.0 + recompute.1 > start.0 + start.1 { recompute } else { start };
    [params, params, optimizer, activations, workspace].map(|floats| floats * 4)
}

/// A rough lower estimate of the CUDA trainer's device bytes, derived from the CPU prediction
/// (CATEGORIES order): f32 master weights plus their bf16 copies, f32 gradients and optimizer
/// state as on the CPU, and bf16 activations (half the CPU's f32). Workspace is left out: the
/// CUDA step's transient buffers are smaller than the tape's and are caught by the allocator's
/// own out-of-memory error. Used by the pre-flight check, which should only refuse a run that
/// cannot fit.
pub fn predict_cuda_training_bytes(c: &ModelConfig, batch: usize, seq: usize, checkpoint_every: usize) -> [usize; 5] {
    let [params, grads, optimizer, activations, _] = predict_training_bytes(c, batch, seq, checkpoint_every);
    [params + params / 2, grads, optimizer, activations / 2, 0]
}

/// Inference bytes: f32 parameters, and the KV cache at `context` tokens, summed over layers by
/// attention variant (`nn::decode::kv_bytes_per_layer`: dense K/V per token; window + global a
/// constant (W + G) rows; DSA K/V plus the indexer key per token).
pub fn predict_inference_bytes(c: &ModelConfig, context: usize) -> (usize, usize) {
    (c.num_params() * 4, crate::nn::decode::kv_bytes(c, context))
}

/// KV-cache lines of `info`: bytes per layer of each attention variant the model uses, at one
/// token and at `context` tokens.
fn kv_report(c: &ModelConfig, context: usize) -> String {
    use crate::nn::{decode::kv_bytes_per_layer, AttnKind};
    let mut s = String::new();
    for (kind, name) in
        [(AttnKind::Dense, "dense (D)"), (AttnKind::Window, "window+global (W)"), (AttnKind::Sparse, "DSA (S)")]
    {
        let layers: Vec<usize> = (0..c.n_layer).filter(|&l| c.attn_kind(l) == kind).collect();
        if let Some(&l) = layers.first() {
            let (one, full) = (kv_bytes_per_layer(c, l, 1), kv_bytes_per_layer(c, l, context));
            let per_token = if kind == AttnKind::Window {
                format!("constant {:.1} KiB once the context exceeds W + G", full as f64 / 1024.0)
            } else {
                format!("{:.2} KiB per token", one as f64 / 1024.0)
            };
            s += &format!(
                "  KV cache, {name}, {} layer(s): {per_token}; {:.1} MiB per layer at {context} tokens\n",
                layers.len(),
                crate::memory::mib(full)
            );
        }
    }
    let row = crate::nn::decode::cache_row_floats(c);
    let what = if c.is_mla() {
        format!("MLA's latent [c_kv ; k_pe], {} + {} floats", c.kv_lora_rank, c.qk_rope_head_dim)
    } else {
        format!("keys and values, 2 × {} floats", c.kv_dim())
    };
    let sparse = (0..c.n_layer).any(|l| c.attn_kind(l) == AttnKind::Sparse);
    let index = if sparse { format!(" (+ {} for a DSA layer's indexer key)", c.index_head_dim) } else { String::new() };
    s += &format!(
        "  KV cache row: {what} = {row} per position and layer{index}; {:.2} KiB per token over all layers \
         if every layer kept every position\n",
        crate::nn::decode::kv_bytes_per_token(c) as f64 / 1024.0
    );
    s
}

/// The memory part of `nanoseek info`.
pub fn memory_report(c: &ModelConfig, batch: usize, seq: usize, checkpoint_every: usize) -> String {
    use crate::memory::{mib, CATEGORIES};
    let train = predict_training_bytes(c, batch, seq, checkpoint_every);
    let mut s = format!(
        "predicted CPU training memory (f32) at device_batch_size {batch} × seq {seq}{}:\n",
        if checkpoint_every > 0 { format!(", grad checkpoint every {checkpoint_every}") } else { String::new() }
    );
    for (cat, bytes) in CATEGORIES.iter().zip(train) {
        s += &format!("  {:<16} {:>12.1} MiB\n", cat.name(), mib(bytes));
    }
    s += &format!("  {:<16} {:>12.1} MiB\n", "total", mib(train.iter().sum()));
    let (weights, kv) = predict_inference_bytes(c, seq);
    s += &format!(
        "predicted inference memory (f32): weights {:.1} MiB + KV cache {:.1} MiB at {seq} tokens\n",
        mib(weights),
        mib(kv)
    );
    s += &kv_report(c, seq);
    s
}

/// The seed's hardware table: GPU memory it says each preset needs.
fn seed_memory_claim(name: &str) -> &'static str {
    match name {
        "small" => "8 GB",
        "medium" => "16 GB",
        "large" => "32 GB",
        "xlarge" => "80 GB",
        "full" => "multi-GPU",
        _ => "-",
    }
}

/// Every preset: parameters and predicted f32 training memory for one sequence at its
/// max_seq_len, plain and with every block checkpointed, beside the seed's claims.
pub fn presets_table() -> anyhow::Result<String> {
    use crate::memory::mib;
    let gib = |b: usize| mib(b) / 1024.0;
    let mut s = format!(
        "{:<8} {:>10} {:>9} {:>14} {:>16} {:>12} {:>16}\n",
        "preset", "params", "context", "train (GiB)", "train+ckpt (GiB)", "seed claim", "weights+KV (GiB)"
    );
    for name in crate::nn::config::PRESETS {
        let c = ModelConfig::preset(name)?;
        let plain: usize = predict_training_bytes(&c, 1, c.max_seq_len, 0).iter().sum();
        let ckpt: usize = predict_training_bytes(&c, 1, c.max_seq_len, 1).iter().sum();
        let (w, kv) = predict_inference_bytes(&c, c.max_seq_len);
        s += &format!(
            "{:<8} {:>10} {:>9} {:>14.1} {:>16.1} {:>12} {:>16.1}\n",
            name,
            human(c.num_params()),
            c.max_seq_len,
            gib(plain),
            gib(ckpt),
            seed_memory_claim(name),
            gib(w + kv)
        );
    }
    s += "train: f32 weights, gradients, Muon/AdamW state, activations and workspace for batch 1 × context.\n";
    Ok(s)
}
