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
    let blocks = c.n_layer * (attn + ffn);
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
    let rows = [
        ("wte (embedding)", emb),
        ("attention (c_q, c_k, c_v, c_proj) per layer", attn),
        ("ffn (w_gate, w_up, w_down) per layer", ffn),
        ("all blocks", blocks),
        ("lm_head", emb),
        ("total", total),
        ("non-embedding (blocks)", blocks),
    ];
    for (what, n) in rows {
        s += &format!("  {what:<46} {n:>16} ({})\n", human(n));
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
