//! Decoding MLA models on the latent cache (`nn::mla_decode`): cached decoding equals uncached
//! recomputation (D, W and S layers, with and without a query latent, with MoE, across a window
//! ring's wrap, the DSA warm-up's dense path), prefill in chunks equals one prefill, greedy
//! speculative decoding with MTP equals plain greedy, and the cache holds one latent row of
//! `kv_lora_rank + qk_rope_head_dim` floats per position and layer, the bytes `kv_bytes_per_layer`
//! predicts.
//!
//! **Tolerance.** The cached path computes the same scores in another order: `q̃_h·c_kv` sums
//! `r_kv` products of the absorbed query where the uncached forward sums `d_n` products of
//! `q_nope·k_nope`, and the output is `W_UV (Σ p c_kv)` instead of `Σ p (W_UV c_kv)`. Each is a
//! few f32 roundings (relative 1e-7 each) per layer; through two layers, the head and the
//! softcap the logits agree to about 1e-6 relative. The tests allow 1e-4 of the largest logit:
//! a wrong scale (1/sqrt(r_kv + d_r)), a head's wrong rows of wkv_b or a wrong RoPE position
//! moves logits by 1e-2 or more.

use nanoseek::generate::{generate, SampleOptions};
use nanoseek::nn::decode::{kv_bytes, kv_bytes_per_layer, kv_bytes_per_token, Decoder, KvCache};
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::rng::Rng;
use nanoseek::speculative::generate_speculative_stream;
use nanoseek::Tensor;

/// Two (or `pattern.len()`) layers of 3 heads, d_n 4 + d_r 4, d_v 6, latent rank 10, C = 24; a
/// window of 5 with 2 sinks; DSA with top-3 and a local window of 2. Every weight random (std
/// 1/√fan_in), MoE biases random.
fn mla_model(pattern: &str, q_lora_rank: usize, moe: bool, mtp_depth: usize, max_seq_len: usize) -> Model {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) = (41, pattern.len().max(2), 24, 3, 3);
    (cfg.head_dim, cfg.ffn_hidden, cfg.max_seq_len) = (8, 32, max_seq_len);
    (cfg.attn_pattern, cfg.dsa_window_size, cfg.n_global) = (pattern.into(), 5, 2);
    (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.index_local_window) = (2, 8, 3, 2);
    cfg.attention = "mla".into();
    (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) =
        (q_lora_rank, 10, 4, 4, 6);
    if moe {
        cfg.moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, ..Default::default() };
    }
    cfg.mtp_depth = mtp_depth;
    let mut m = Model::new(&cfg, 5).unwrap();
    let mut rng = Rng::new(11);
    for p in &mut m.params {
        let fan_in = *p.tensor.shape.last().unwrap() as f32;
        p.tensor = Tensor::randn(&p.tensor.shape.clone(), 1.0 / fan_in.sqrt(), &mut rng);
    }
    for b in &mut m.moe_bias {
        b.iter_mut().for_each(|x| *x = rng.normal() as f32 * 0.1);
    }
    m
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// `got` equals `want` to 1e-4 of the largest |logit| (module doc).
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f32, |a, x| a.max(x.abs()));
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert!((x - y).abs() <= 1e-4 * scale, "{what}: logit {i}: cached {x} vs uncached {y}");
    }
}

#[test]
fn cached_decoding_equals_recomputation() {
    // 26 positions: the window ring of 5 wraps four times; prefill 6, then one token per step
    let cases = [
        ("D", 0, false),
        ("W", 6, false),
        ("S", 0, false),
        ("DW", 6, true),
        ("SW", 6, false),
        ("WS", 0, true),
        ("DSW", 6, true),
    ];
    for (pattern, q_lora_rank, moe) in cases {
        let m = mla_model(pattern, q_lora_rank, moe, 0, 32);
        let what = format!("{pattern}, q_lora_rank {q_lora_rank}, moe {moe}");
        let seq = ids(26, m.config.vocab_size, 3);
        let mut d = Decoder::new(&m).unwrap();
        let mut logits = d.prefill(&seq[..6]).unwrap();
        for t in 6..=seq.len() {
            assert_close(&logits, &m.next_token_logits(&seq[..t]).unwrap(), &format!("{what}, {t} tokens"));
            if t < seq.len() {
                logits = d.step(seq[t]).unwrap();
            }
        }
        assert_eq!(d.cache().bytes(), kv_bytes(&m.config, seq.len()), "{what}: cache bytes");
    }
}

#[test]
fn cached_decoding_equals_recomputation_in_the_dsa_warmup() {
    // the indexer's warm-up: DSA layers attend to every earlier latent row
    let mut m = mla_model("SD", 6, false, 0, 32);
    m.dsa_dense_warmup = true;
    let seq = ids(14, m.config.vocab_size, 4);
    let mut d = Decoder::new(&m).unwrap();
    d.prefill(&seq[..3]).unwrap();
    for t in 3..seq.len() {
        let got = d.step(seq[t]).unwrap();
        assert_close(&got, &m.next_token_logits(&seq[..=t]).unwrap(), &format!("warm-up, {} tokens", t + 1));
    }
}

#[test]
fn prefill_in_chunks_equals_one_prefill() {
    // every row's logits: one call, three calls (across the ring's wrap), one token per call
    for (pattern, q_lora_rank) in [("DW", 0), ("SW", 6)] {
        let m = mla_model(pattern, q_lora_rank, false, 0, 32);
        let seq = ids(19, m.config.vocab_size, 5);
        let one = Decoder::new(&m).unwrap().prefill_all(&seq).unwrap();
        let mut d = Decoder::new(&m).unwrap();
        let chunks: Vec<f32> =
            [&seq[..4], &seq[4..13], &seq[13..]].iter().flat_map(|c| d.prefill_all(c).unwrap()).collect();
        assert_close(&chunks, &one, &format!("{pattern}: chunks"));
        let mut d = Decoder::new(&m).unwrap();
        let steps: Vec<f32> = seq.iter().flat_map(|&id| d.step(id).unwrap()).collect();
        assert_close(&steps, &one, &format!("{pattern}: steps"));
    }
}

#[test]
fn greedy_speculative_decoding_equals_greedy_for_mla() {
    // the MTP modules' blocks are MLA layers with latent caches of their own; random weights,
    // so most drafts are rejected and the caches roll back
    for (pattern, depth, moe) in [("D", 1, false), ("WS", 2, true)] {
        let m = mla_model(pattern, 6, moe, depth, 64);
        let what = format!("{pattern}, depth {depth}");
        let opts = SampleOptions { max_new_tokens: 30, temperature: 0.0, ..Default::default() };
        let prompt = ids(6, m.config.vocab_size, 6);
        let plain = generate(&m, &prompt, &opts).unwrap();
        let spec = generate_speculative_stream(&m, &prompt, &opts, depth, &mut |_| {}).unwrap();
        assert_eq!(spec.generation.tokens, plain, "{what}: speculative greedy differs from greedy");
        let s = &spec.stats;
        assert!(s.verified.iter().sum::<usize>() > 0, "{what}: no draft was verified");
    }
}

#[test]
fn latent_cache_bytes_are_the_predicted_latent_rows() {
    let m = mla_model("DWS", 6, false, 0, 32);
    let c = &m.config;
    let row = c.kv_lora_rank + c.qk_rope_head_dim;
    let mut d = Decoder::new(&m).unwrap();
    for (n, chunk) in [(3, &ids(3, 41, 7)), (17, &ids(14, 41, 8))] {
        d.prefill(chunk).unwrap();
        let cache: &KvCache = d.cache();
        for l in 0..c.n_layer {
            let layer = &cache.layers[l];
            assert_eq!((layer.row_width(), layer.latent_rank()), (row, Some(c.kv_lora_rank)), "layer {l}");
            assert_eq!(cache.layer_bytes(l), kv_bytes_per_layer(c, l, n), "layer {l} at {n} positions");
        }
        // D: n rows; W: min(n, 5) ring + min(n, 2) sinks; S: n rows + n indexer keys
        let want = n * row + (n.min(5) + n.min(2)) * row + n * (row + c.index_head_dim);
        assert_eq!(cache.bytes(), want * 4, "at {n} positions");
    }
    // per token: the latent row in every layer (+ the DSA layer's indexer key), against GQA's
    // keys and values of every head
    assert_eq!(kv_bytes_per_token(c), (3 * row + c.index_head_dim) * 4);
    let mut gqa = c.clone();
    gqa.attention = "gqa".into();
    assert_eq!(kv_bytes_per_token(&gqa), (3 * 2 * gqa.n_kv_head * gqa.head_dim + c.index_head_dim) * 4);
}

fn nanoseek(args: &[&str], cwd: &std::path::Path, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nanoseek"))
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nanoseek");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn train_sample_demo_and_info_run_mla_models() {
    // the closing sample decodes; demo's test mode measures the latent cache as predicted; the
    // interactive demo answers; info prints the latent row
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mla = ["--attention", "mla", "--kv-lora-rank", "16", "--qk-rope-head-dim", "8", "--q-lora-rank", "12"];
    let model =
        ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "2"];
    let mut args = vec!["train", "--run", "r", "--attn-pattern", "WS", "--dsa-window-size", "8", "--n-global", "2"];
    args.extend(mla.iter().chain(&model));
    args.extend(["--num-iterations", "2", "--sample-tokens", "6", "--quiet", "--device", "cpu"]);
    let o = nanoseek(&args, d, "");
    assert!(o.status.success(), "train: {}", String::from_utf8_lossy(&o.stderr));

    let test = ["demo", "--model-path", "runs/r", "--mode", "test", "--max-seq-len", "32", "--max-new-tokens", "8"];
    let o = nanoseek(&test, d, "");
    assert!(o.status.success(), "demo test: {}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["kv_cache_bytes"], r["predicted_kv_cache_bytes"]);
    assert_eq!(r["kv_row_floats"], 16 + 8);
    let n = r["context_len"].as_u64().unwrap();
    // layer 0 is a window layer: (8 + 2) latent rows; layer 1 a DSA layer: n rows + indexer keys
    assert_eq!(r["layers"][0]["kv_bytes"], (8 + 2) * 24 * 4);
    let index_dim = r["layers"][1]["kv_bytes"].as_u64().unwrap() / 4 / n - 24;
    assert_eq!(r["kv_bytes_per_token"], (2 * 24 + index_dim) * 4);

    let o = nanoseek(&["demo", "--model-path", "runs/r", "--max-new-tokens", "4"], d, "the color of\n/quit\n");
    assert!(o.status.success(), "demo interactive: {}", String::from_utf8_lossy(&o.stderr));

    let o = nanoseek(&["info", "--model-size", "tiny", "--attention", "mla"], d, "");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("MLA's latent [c_kv ; k_pe]"), "info: {out}");
}
