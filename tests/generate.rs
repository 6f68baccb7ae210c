//! KV-cache inference and generation: the cached decoder computes the model's logits exactly
//! (against the training forward rerun on the whole prefix, `Model::next_token_logits`), caches
//! take the memory they should, sampling keeps what it should, and `nanoseek demo` works.
//!
//! Tolerance of every logit comparison, stated once: the decoder and the training forward
//! do the same f32 operations in different summation orders, so for each position
//! `max_i |cached_i − full_i| ≤ TOL · max(1, max_i |full_i|)` with `TOL = 1e-4`.

use nanoseek::generate::{candidates, generate, generate_stream, generate_uncached, sample_token, SampleOptions};
use nanoseek::nn::decode::{kv_bytes, kv_bytes_per_layer, Decoder};
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::rng::Rng;
use nanoseek::Tensor;
use std::path::Path;
use std::process::{Command, Output};

const TOL: f32 = 1e-4;

/// A small model with every weight random (a fresh model's blocks are the identity:
/// c_proj = w_down = 0), grouped-query attention (4 query heads, 2 kv heads).
fn model(pattern: &str, window: usize, n_global: usize, max_seq_len: usize, seed: u64) -> Model {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) = (53, 3, 32, 4, 2);
    (cfg.head_dim, cfg.ffn_hidden, cfg.max_seq_len) = (8, 64, max_seq_len);
    (cfg.attn_pattern, cfg.dsa_window_size, cfg.n_global) = (pattern.into(), window, n_global);
    let mut m = Model::new(&cfg, seed).unwrap();
    let mut rng = Rng::new(seed + 100);
    for p in &mut m.params {
        let fan_in = *p.tensor.shape.last().unwrap() as f32;
        p.tensor = Tensor::randn(&p.tensor.shape.clone(), 1.0 / fan_in.sqrt(), &mut rng);
    }
    m
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn assert_close(what: &str, cached: &[f32], full: &[f32]) {
    assert_eq!(cached.len(), full.len(), "{what}: lengths");
    let scale = full.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = cached.iter().zip(full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= TOL * scale, "{what}: max |cached − full| = {worst} > {TOL}·{scale}");
}

/// Prefill `prompt` tokens, then step one token at a time to `total`, comparing the logits
/// with the full recomputation at every position.
fn check_against_full(m: &Model, prompt: usize, total: usize) {
    let seq = ids(total, m.config.vocab_size, 9);
    let mut d = Decoder::new(m).unwrap();
    let name = &m.config.attn_pattern;
    let mut logits = d.prefill(&seq[..prompt]).unwrap();
    for t in prompt..=total {
        let full = m.next_token_logits(&seq[..t]).unwrap();
        assert_close(&format!("{name}: after {t} tokens"), &logits, &full);
        if t < total {
            logits = d.step(seq[t]).unwrap();
        }
    }
    assert_eq!(d.len(), total);
    // the prefill's per-position logits match too
    let mut d = Decoder::new(m).unwrap();
    let all = d.prefill_all(&seq).unwrap();
    let v = m.config.vocab_size;
    for t in [1, total / 2, total] {
        let full = m.next_token_logits(&seq[..t]).unwrap();
        assert_close(&format!("{name}: prefill row {t}"), &all[(t - 1) * v..t * v], &full);
    }
}

#[test]
fn cached_logits_equal_full_recomputation_dense() {
    check_against_full(&model("D", 8, 2, 48, 1), 5, 40);
}

#[test]
fn cached_logits_equal_full_recomputation_window() {
    // W = 8, G = 2, T = 40 ≫ W + G: the ring buffer wraps four times, the sinks stay visible
    check_against_full(&model("W", 8, 2, 48, 2), 5, 40);
    // a prompt longer than the window is prefilled in one call
    check_against_full(&model("W", 8, 2, 48, 3), 21, 40);
    // no sinks; and more sinks than the window
    check_against_full(&model("W", 8, 0, 48, 4), 3, 30);
    check_against_full(&model("W", 3, 7, 48, 5), 3, 30);
}

#[test]
fn cached_logits_equal_full_recomputation_mixed() {
    check_against_full(&model("WD", 8, 2, 48, 6), 5, 40);
    check_against_full(&model("DWW", 5, 1, 48, 7), 1, 33);
}

/// DSA layers: the cached indexer keys pick each new token's top-k (+ local window) as the
/// training kernel does over the whole sequence; MoE layers route each new row with the bias.
#[test]
fn cached_logits_equal_full_recomputation_dsa_and_moe() {
    let with = |pattern: &str, seed: u64, edit: &dyn Fn(&mut ModelConfig)| {
        let mut cfg = model(pattern, 8, 2, 48, seed).config;
        (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.index_local_window) = (2, 8, 6, 2);
        edit(&mut cfg);
        let mut m = Model::new(&cfg, seed).unwrap();
        let mut rng = Rng::new(seed + 100);
        for p in &mut m.params {
            let fan_in = *p.tensor.shape.last().unwrap() as f32;
            p.tensor = Tensor::randn(&p.tensor.shape.clone(), 1.0 / fan_in.sqrt(), &mut rng);
        }
        for b in &mut m.moe_bias {
            b.iter_mut().for_each(|x| *x = rng.normal() as f32 * 0.1);
        }
        m
    };
    check_against_full(&with("SD", 11, &|_| {}), 5, 40);
    check_against_full(&with("S", 12, &|c| c.index_local_window = 0), 17, 40);
    let moe = |c: &mut ModelConfig| {
        c.moe = nanoseek::nn::MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, ..Default::default() };
    };
    check_against_full(&with("WD", 13, &moe), 5, 40);
    check_against_full(&with("SDW", 14, &moe), 9, 40);
}

#[test]
fn window_at_least_the_context_equals_dense() {
    let (w, d) = (model("W", 64, 0, 48, 8), model("D", 64, 0, 48, 8));
    let seq = ids(30, 53, 4);
    let a = Decoder::new(&w).unwrap().prefill(&seq).unwrap();
    let b = Decoder::new(&d).unwrap().prefill(&seq).unwrap();
    assert_close("W ≥ T vs D", &a, &b);
}

#[test]
fn greedy_cached_generation_equals_uncached() {
    for (pattern, seed) in [("D", 11), ("W", 12), ("WD", 13)] {
        let m = model(pattern, 8, 2, 48, seed);
        let prompt = ids(6, 53, seed);
        let opts = SampleOptions { max_new_tokens: 34, temperature: 0.0, ..Default::default() };
        let cached = generate(&m, &prompt, &opts).unwrap();
        assert_eq!(cached.len(), 34);
        assert_eq!(cached, generate_uncached(&m, &prompt, &opts).unwrap(), "{pattern}: greedy tokens differ");
        // sampling with the same seed draws the same tokens too
        let opts = SampleOptions { max_new_tokens: 20, temperature: 1.0, top_k: 20, top_p: 0.9, seed, ..opts };
        assert_eq!(generate(&m, &prompt, &opts).unwrap(), generate_uncached(&m, &prompt, &opts).unwrap());
    }
}

/// The nucleus by brute force: sort by probability, keep the shortest prefix reaching p.
fn nucleus(logits: &[f32], temperature: f32, p: f64) -> Vec<u32> {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits.iter().map(|&z| (((z - mx) / temperature) as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mut cum = 0.0;
    let mut out = Vec::new();
    for i in order {
        out.push(i as u32);
        cum += w[i];
        if cum >= p * total {
            break;
        }
    }
    out
}

#[test]
fn top_p_keeps_exactly_the_nucleus() {
    // a hand-checkable case: probabilities 0.4, 0.3, 0.2, 0.1 (ids 2, 0, 3, 1)
    let logits: Vec<f32> = [0.3f32, 0.1, 0.4, 0.2].iter().map(|p| p.ln()).collect();
    let ids_of = |c: Vec<(u32, f64)>| c.into_iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(ids_of(candidates(&logits, 1.0, 0, 0.65)), vec![2, 0]);
    assert_eq!(ids_of(candidates(&logits, 1.0, 0, 0.75)), vec![2, 0, 3]);
    assert_eq!(ids_of(candidates(&logits, 1.0, 0, 0.1)), vec![2]);
    assert_eq!(ids_of(candidates(&logits, 1.0, 0, 1.0)), vec![2, 0, 3, 1]);
    let c = candidates(&logits, 1.0, 0, 0.75);
    assert!((c[0].1 - 0.4 / 0.9).abs() < 1e-6, "renormalized over the nucleus: {c:?}");
    // top-k first, then top-p within the k
    assert_eq!(ids_of(candidates(&logits, 1.0, 2, 0.9)), vec![2, 0]);
    // random logits, small and large vocabularies (a nucleus of hundreds of tokens), temperatures
    let mut rng = Rng::new(3);
    for (v, temp, p) in [(10, 1.0, 0.5), (50, 0.7, 0.9), (1000, 2.0, 0.95), (5000, 1.0, 0.3)] {
        let logits: Vec<f32> = (0..v).map(|_| rng.normal() as f32).collect();
        let want = nucleus(&logits, temp, p as f64);
        assert_eq!(ids_of(candidates(&logits, temp, 0, p)), want, "V={v} T={temp} p={p}");
        // sampling draws only nucleus tokens, and (for a small nucleus) every one of them
        let opts = SampleOptions { temperature: temp, top_p: p, ..Default::default() };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let t = sample_token(&logits, &opts, &mut rng);
            assert!(want.contains(&t), "V={v}: drew {t} outside the nucleus");
            seen.insert(t);
        }
        if want.len() <= 20 {
            assert_eq!(seen.len(), want.len(), "V={v}: every nucleus token is drawn in 2000 samples");
        }
    }
}

#[test]
fn window_cache_memory_is_constant_as_the_context_grows() {
    let (w, g) = (8, 2);
    let m = model("WD", w, g, 200, 21);
    let c = &m.config;
    let mut d = Decoder::new(&m).unwrap();
    let seq = ids(180, 53, 5);
    d.prefill(&seq[..1]).unwrap();
    let mut window_bytes = Vec::new();
    for (t, &id) in seq.iter().enumerate().skip(1) {
        d.step(id).unwrap();
        let len = t + 1;
        assert_eq!(d.len(), len);
        for l in 0..c.n_layer {
            assert_eq!(d.cache().layer_bytes(l), kv_bytes_per_layer(c, l, len), "layer {l} at {len}");
        }
        window_bytes.push(d.cache().layer_bytes(0));
    }
    // layer 0 (W): (W + G) rows of K and V once the context passes W; layer 1 (D) keeps growing
    let full = (w + g) * c.kv_dim() * 2 * 4;
    assert!(window_bytes[w..].iter().all(|&b| b == full), "window cache must stay at {full} bytes");
    assert_eq!(d.cache().layer_bytes(1), 180 * c.kv_dim() * 2 * 4);
    assert_eq!(d.cache().bytes(), kv_bytes(c, 180));
}

#[test]
fn all_window_model_decodes_beyond_max_seq_len() {
    // same weights, max_seq_len 16 vs 64: the all-window decoder streams past 16 positions
    // (RoPE angles computed for any position) and equals the full forward of the longer model
    let short = model("W", 6, 2, 16, 31);
    let mut long_cfg = short.config.clone();
    long_cfg.max_seq_len = 64;
    let long = Model::from_params(
        long_cfg,
        short
            .params
            .iter()
            .map(|p| nanoseek::nn::Param { name: p.name.clone(), kind: p.kind, tensor: p.tensor.clone() })
            .collect(),
    );
    let seq = ids(50, 53, 6);
    let mut d = Decoder::new(&short).unwrap();
    assert_eq!(d.capacity(), None);
    let mut logits = d.prefill(&seq[..4]).unwrap();
    let bytes_at_16 = kv_bytes(&short.config, 16);
    for t in 4..50 {
        if t % 9 == 0 {
            assert_close(&format!("position {t}"), &logits, &long.next_token_logits(&seq[..t]).unwrap());
        }
        logits = d.step(seq[t]).unwrap();
        if d.len() >= 16 {
            assert_eq!(d.cache().bytes(), bytes_at_16);
        }
    }
    // a model with a dense layer refuses instead, naming the limit
    let dense = model("WD", 6, 2, 16, 32);
    let mut d = Decoder::new(&dense).unwrap();
    d.prefill(&seq[..16]).unwrap();
    let e = d.step(seq[16]).unwrap_err().to_string();
    assert!(e.contains("context full") && e.contains("max_seq_len 16"), "{e}");
}

#[test]
fn generation_shifts_the_context_when_it_fills() {
    let m = model("D", 8, 2, 24, 41);
    let prompt = ids(30, 53, 7); // longer than the context: cut to its tail
    let opts = SampleOptions { max_new_tokens: 40, temperature: 0.0, ..Default::default() };
    let mut streamed = Vec::new();
    let g = generate_stream(&m, &prompt, &opts, &mut |t| streamed.push(t)).unwrap();
    assert_eq!(g.tokens.len(), 40);
    assert_eq!(streamed, g.tokens, "the callback sees every token, in order");
    assert!(g.context_shifts >= 1, "{g:?}");
    assert_eq!(g.prefill_tokens, 24 - 12, "the prompt keeps room for min(40, 24/2) new tokens");
    // the first steps, before any shift, match the uncached reference on the same tail
    let tail = &prompt[prompt.len() - 12..];
    let reference = generate_uncached(&m, tail, &SampleOptions { max_new_tokens: 12, ..opts.clone() }).unwrap();
    assert_eq!(&g.tokens[..12], &reference[..]);
    // a stop token ends generation and is returned
    let stop = g.tokens[3];
    let first = g.tokens.iter().position(|&t| t == stop).unwrap();
    let s = generate(&m, &prompt, &SampleOptions { stop_token: Some(stop), ..opts }).unwrap();
    assert_eq!(s, g.tokens[..=first]);
}

// ---- the `nanoseek demo` command on a tiny trained checkpoint ----

const MODEL: &[&str] =
    &["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "2"];
const RUN: &[&str] = &["--num-iterations", "2", "--sample-tokens", "0", "--quiet", "--device", "cpu"];

fn nanoseek(args: &[&str], cwd: &Path, stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanoseek"))
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nanoseek");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn demo_batch_interactive_and_test_modes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = vec!["train", "--run", "r", "--attn-pattern", "WD", "--dsa-window-size", "8", "--n-global", "2"];
    args.extend(MODEL.iter().chain(RUN));
    let o = nanoseek(&args, d, None);
    assert!(o.status.success(), "train: {}", String::from_utf8_lossy(&o.stderr));

    // batch: two prompts in the synthetic language, a blank line, one with an unknown word
    std::fs::write(d.join("prompts.txt"), "the color of\n\nthere is a\nthe zzzqqq\n").unwrap();
    let batch =
        ["demo", "--model-path", "runs/r", "--mode", "batch", "--prompts", "prompts.txt", "--max-new-tokens", "12"];
    let o = nanoseek(&batch, d, None);
    assert!(o.status.success(), "demo batch: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    assert_eq!(rows.iter().map(|r| r["line"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 3, 4]);
    for r in &rows[..2] {
        let toks = r["tokens"].as_array().unwrap();
        assert!(!toks.is_empty() && toks.len() <= 12, "{r}");
        assert!(r["completion"].is_string() && r["prompt_tokens"].as_u64().unwrap() >= 3, "{r}");
        let reason = r["finish_reason"].as_str().unwrap();
        assert!(reason == "length" && toks.len() == 12 || reason == "end_of_text", "{r}");
    }
    assert!(rows[2]["error"].as_str().unwrap().contains("zzzqqq"), "{}", rows[2]);
    // same seed, same output; prompts from stdin and --output give the same records
    let o2 = nanoseek(
        &["demo", "--model-path", "runs/r", "--mode", "batch", "--max-new-tokens", "12", "--output", "out.jsonl"],
        d,
        Some("the color of\n"),
    );
    assert!(o2.status.success(), "{}", String::from_utf8_lossy(&o2.stderr));
    let file = std::fs::read_to_string(d.join("out.jsonl")).unwrap();
    let again: serde_json::Value = serde_json::from_str(file.lines().next().unwrap()).unwrap();
    assert_eq!(again["tokens"], rows[0]["tokens"]);

    // interactive: two turns (history kept), then /quit
    let o = nanoseek(
        &["demo", "--model-path", "runs/r/checkpoints/step_000002", "--max-new-tokens", "5"],
        d,
        Some("the color of\nthere is a\n/quit\n"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let turns: Vec<&str> = err.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(turns.len(), 2, "{err}");
    // the second turn prefills only its new tokens (the history stays cached)
    assert!(turns[0].contains("prefill 4 tokens") && turns[0].contains("context 8/"), "{err}");
    assert!(turns[1].contains("prefill 4 tokens") && turns[1].contains("context 16/"), "{err}");

    // test mode: throughput and the cache memory, measured = predicted
    let o = nanoseek(
        &["demo", "--model-path", "runs/r", "--mode", "test", "--max-seq-len", "64", "--max-new-tokens", "8"],
        d,
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["context_len"], 64);
    assert_eq!(r["decode_tokens"], 8);
    assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["kv_cache_bytes"], r["predicted_kv_cache_bytes"]);
    // layer 0 is a window layer: (8 + 2) rows of K and V of kv_dim 32
    assert_eq!(r["layers"][0]["kv_bytes"], (8 + 2) * 32 * 2 * 4);
}
