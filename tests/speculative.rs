//! Speculative decoding with the MTP modules as the draft model: greedy speculative output is
//! plain greedy output token for token (dense, window, DSA and MoE layers; depths 1 and 2; across
//! a context shift), on models whose drafts are mostly rejected (random weights) and on models
//! whose drafts are mostly or always accepted, counting both paths. (The sampling rule's
//! distribution test is `speculative::sampling`'s unit test; the caches' rollback is
//! `nn::decode`'s.)

use nanoseek::generate::{candidates, generate, generate_stream, SampleOptions};
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::rng::Rng;
use nanoseek::speculative::{generate_speculative, generate_speculative_stream, SpecDecoder};
use nanoseek::Tensor;

/// A small model with `depth` MTP modules and every weight random (std 1/√fan_in). `blend`
/// makes the MTP modules agree with the main model: every block's output projections (attn
/// c_proj, every w_down) are scaled by `blend` and each module's projection reads only the
/// token's embedding, so at `blend = 0` the main model and every module compute
/// `lm_head(norm(norm(wte[x])))` of their input token x, a bigram model whose drafts the main
/// model always accepts; small `blend` > 0 lets context change some predictions.
fn model(pattern: &str, depth: usize, max_seq_len: usize, seed: u64, edit: Edit) -> Model {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) = (53, 2, 32, 4, 2);
    (cfg.head_dim, cfg.ffn_hidden, cfg.max_seq_len) = (8, 64, max_seq_len);
    (cfg.attn_pattern, cfg.dsa_window_size, cfg.n_global) = (pattern.into(), 6, 2);
    (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.index_local_window) = (2, 8, 5, 2);
    cfg.mtp_depth = depth;
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
}

/// A config edit (e.g. [`moe`]).
type Edit<'a> = &'a dyn Fn(&mut ModelConfig);

fn moe(c: &mut ModelConfig) {
    c.moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, ..Default::default() };
}

/// Scales the output projections by `blend` and makes each MTP projection [0 | I] (see `model`).
fn agree(m: &mut Model, blend: f32) {
    let c = m.config.n_embd;
    for p in &mut m.params {
        if p.name.contains("c_proj") || p.name.contains("w_down") {
            p.tensor.data.iter_mut().for_each(|x| *x *= blend);
        }
        if p.name.starts_with("mtp.") && p.name.ends_with(".proj.weight") {
            let mut w = vec![0.0f32; c * 2 * c];
            (0..c).for_each(|j| w[j * 2 * c + c + j] = 1.0);
            p.tensor = Tensor::from_vec(&[c, 2 * c], w);
        }
    }
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// Greedy speculative tokens (depth = mtp_depth) equal plain greedy tokens; returns
/// (drafts judged, drafts accepted) over all depths.
fn check_greedy(m: &Model, prompt: &[u32], n: usize, what: &str) -> (usize, usize) {
    let opts = SampleOptions { max_new_tokens: n, temperature: 0.0, ..Default::default() };
    let plain = generate(m, prompt, &opts).unwrap();
    let spec = generate_speculative_stream(m, prompt, &opts, m.config.mtp_depth, &mut |_| {}).unwrap();
    assert_eq!(spec.generation.tokens, plain, "{what}: speculative greedy tokens differ from plain greedy");
    let s = &spec.stats;
    assert!(s.rounds < n, "{what}: {} rounds for {n} tokens", s.rounds);
    (s.verified.iter().sum(), s.accepted.iter().sum())
}

#[test]
fn greedy_speculative_equals_greedy_on_random_models() {
    // random weights: the modules guess badly, most drafts are rejected and rolled back
    let cases: [(&str, Edit); 5] = [("D", &|_| {}), ("W", &|_| {}), ("S", &|_| {}), ("WD", &moe), ("SDW", &moe)];
    for (pattern, edit) in cases {
        for depth in [1, 2] {
            let m = model(pattern, depth, 64, 3 + depth as u64, edit);
            let what = format!("{pattern}, depth {depth}");
            let (verified, accepted) = check_greedy(&m, &ids(7, 53, 1), 40, &what);
            assert!(verified > accepted, "{what}: no draft was rejected ({accepted} of {verified})");
            eprintln!("{what}: {accepted} of {verified} drafts accepted");
        }
    }
}

#[test]
fn greedy_speculative_equals_greedy_when_drafts_are_accepted() {
    let cases: [(&str, Edit); 4] = [("D", &|_| {}), ("W", &|_| {}), ("S", &|_| {}), ("WD", &moe)];
    for (pattern, edit) in cases {
        for depth in [1, 2] {
            // blend 0: the modules are the main model's bigram, every draft is accepted
            let mut m = model(pattern, depth, 64, 20 + depth as u64, edit);
            agree(&mut m, 0.0);
            let what = format!("{pattern}, depth {depth}, blend 0");
            let (verified, accepted) = check_greedy(&m, &ids(5, 53, 2), 40, &what);
            assert!(verified > 0 && accepted == verified, "{what}: {accepted} of {verified} accepted");
            // blend 0.3: context changes some predictions, both paths run within one generation
            let mut m = model(pattern, depth, 64, 20 + depth as u64, edit);
            agree(&mut m, 0.3);
            let what = format!("{pattern}, depth {depth}, blend 0.3");
            let (verified, accepted) = check_greedy(&m, &ids(5, 53, 2), 40, &what);
            assert!(accepted > 0 && accepted < verified, "{what}: {accepted} of {verified} accepted");
            eprintln!("{what}: {accepted} of {verified} drafts accepted");
        }
    }
}

#[test]
fn greedy_speculative_shifts_the_context_as_plain_decoding() {
    // max_seq_len 20: the prompt is cut and the context shifts several times in 50 tokens;
    // drafts are limited by the room left, and the shifts happen where plain decoding's do
    for (pattern, blend) in [("D", 0.0), ("WD", 0.5), ("S", 1.0)] {
        let mut m = model(pattern, 2, 20, 31, &|_| {});
        agree(&mut m, blend);
        let opts = SampleOptions { max_new_tokens: 50, temperature: 0.0, ..Default::default() };
        let prompt = ids(25, 53, 3);
        let plain = generate_stream(&m, &prompt, &opts, &mut |_| {}).unwrap();
        let spec = generate_speculative_stream(&m, &prompt, &opts, 2, &mut |_| {}).unwrap();
        assert_eq!(spec.generation.tokens, plain.tokens, "{pattern}: tokens");
        assert_eq!(spec.generation.context_shifts, plain.context_shifts, "{pattern}: shifts");
        assert_eq!(spec.generation.prefill_tokens, plain.prefill_tokens, "{pattern}: the prompt cut");
        assert!(plain.context_shifts >= 2, "{pattern}: {plain:?}");
    }
}

#[test]
fn window_model_decodes_past_max_seq_len_with_bounded_modules() {
    // main model: one window layer (no context limit); module 1 is a dense layer (stops at
    // max_seq_len 16 positions), module 2 a window layer (never stops)
    let mut m = model("WD", 2, 16, 61, &|c| c.n_layer = 1);
    agree(&mut m, 0.3);
    let opts = SampleOptions { max_new_tokens: 40, temperature: 0.0, ..Default::default() };
    let prompt = ids(5, 53, 6);
    let plain = generate_stream(&m, &prompt, &opts, &mut |_| {}).unwrap();
    let spec = generate_speculative_stream(&m, &prompt, &opts, 2, &mut |_| {}).unwrap();
    assert_eq!(spec.generation.tokens, plain.tokens);
    assert_eq!((plain.context_shifts, spec.generation.context_shifts), (0, 0));
    let s = &spec.stats;
    assert!(s.drafted[0] > 0 && s.rounds > s.drafted[0], "drafting stopped at the limit: {s:?}");
}

#[test]
fn speculative_generation_stops_and_samples() {
    let mut m = model("WD", 2, 64, 41, &|_| {});
    agree(&mut m, 0.3);
    let prompt = ids(6, 53, 4);
    let greedy = SampleOptions { max_new_tokens: 30, temperature: 0.0, ..Default::default() };
    let plain = generate(&m, &prompt, &greedy).unwrap();
    // a stop token ends generation where plain decoding ends it, even inside accepted drafts
    let stop = plain[10];
    let first = plain.iter().position(|&t| t == stop).unwrap();
    let opts = SampleOptions { stop_token: Some(stop), ..greedy.clone() };
    let mut streamed = Vec::new();
    let s = generate_speculative_stream(&m, &prompt, &opts, 2, &mut |t| streamed.push(t)).unwrap();
    assert_eq!(s.generation.tokens, plain[..=first], "stop token");
    assert!(s.generation.stopped);
    assert_eq!(streamed, s.generation.tokens, "the callback sees every token, in order");
    // depth 1 on a depth-2 model; every budget is met exactly
    for n in [1, 2, 3, 7] {
        let o = SampleOptions { max_new_tokens: n, ..greedy.clone() };
        assert_eq!(generate_speculative(&m, &prompt, &o, 1).unwrap(), plain[..n], "budget {n}");
    }
    // sampling: reproducible for a seed, and within the top-k
    let sample = SampleOptions { max_new_tokens: 30, temperature: 0.9, top_k: 5, top_p: 0.95, seed: 7, ..greedy };
    let a = generate_speculative(&m, &prompt, &sample, 2).unwrap();
    assert_eq!(a.len(), 30);
    assert_eq!(a, generate_speculative(&m, &prompt, &sample, 2).unwrap());
}

#[test]
fn speculative_decoding_needs_mtp_modules() {
    let m = model("D", 0, 32, 5, &|_| {});
    let e = SpecDecoder::new(&m, 1).err().unwrap().to_string();
    assert!(e.contains("mtp_depth > 0"), "{e}");
    let m = model("D", 1, 32, 5, &|_| {});
    let e = SpecDecoder::new(&m, 2).err().unwrap().to_string();
    assert!(e.contains("depth 2"), "{e}");
    // MLA layers decode on their latent caches, speculatively too (more in tests/mla_decode.rs)
    let mla = model("D", 1, 32, 5, &|c| {
        c.attention = "mla".into();
        (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) = (8, 4, 4, 6);
    });
    let opts = SampleOptions { max_new_tokens: 4, temperature: 0.0, ..Default::default() };
    let spec = generate_speculative(&mla, &[1, 2], &opts, 1).unwrap();
    assert_eq!(spec, generate(&mla, &[1, 2], &opts).unwrap());
}

// ---- `nanoseek demo --speculative mtp` on tiny trained checkpoints ----

fn nanoseek(args: &[&str], cwd: &std::path::Path, stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanoseek"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nanoseek");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn demo_speculative_mtp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = |run: &str, mtp: &str| {
        let o = nanoseek(
            &[
                "train",
                "--run",
                run,
                "--attn-pattern",
                "WD",
                "--dsa-window-size",
                "8",
                "--n-global",
                "2",
                "--n-layer",
                "1",
                "--n-embd",
                "32",
                "--n-head",
                "2",
                "--max-seq-len",
                "32",
                "--device-batch-size",
                "2",
                "--num-iterations",
                "2",
                "--sample-tokens",
                "0",
                "--quiet",
                "--device",
                "cpu",
                "--mtp-depth",
                mtp,
            ],
            d,
            "",
        );
        assert!(o.status.success(), "train: {}", String::from_utf8_lossy(&o.stderr));
    };
    train("m", "2");
    train("plain", "0");

    // test mode: acceptance per depth and both throughputs, greedy outputs identical
    let test = ["demo", "--model-path", "runs/m", "--mode", "test", "--max-new-tokens", "12", "--temperature", "0"];
    let o = nanoseek(&[&test[..], &["--speculative", "mtp"]].concat(), d, "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = &r["speculative"];
    assert_eq!(s["depth"], 2, "{s}");
    assert_eq!(s["acceptance"].as_array().unwrap().len(), 2, "{s}");
    assert!(s["plain_tokens_per_s"].as_f64().unwrap() > 0.0 && s["speculative_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(s["greedy_identical"], true, "{s}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("acceptance per depth"));
    // without the flag the report says null; depth 1 of 2 is allowed
    let o = nanoseek(&test, d, "");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["speculative"].is_null());
    let o = nanoseek(&[&test[..], &["--speculative", "mtp", "--speculative-depth", "1"]].concat(), d, "");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["speculative"]["depth"], 1);

    // batch mode: greedy tokens as without speculation
    let batch = ["demo", "--model-path", "runs/m", "--mode", "batch", "--max-new-tokens", "10", "--temperature", "0"];
    let prompts = "the color of\nthere is a\n";
    let plain = nanoseek(&batch, d, prompts);
    let spec = nanoseek(&[&batch[..], &["--speculative", "mtp"]].concat(), d, prompts);
    assert!(spec.status.success(), "{}", String::from_utf8_lossy(&spec.stderr));
    let tokens = |o: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens"].clone())
            .collect()
    };
    assert_eq!(tokens(&spec), tokens(&plain));
    assert_eq!(tokens(&spec).len(), 2);

    // a model without MTP modules
    let o = nanoseek(&["demo", "--model-path", "runs/plain", "--mode", "test", "--speculative", "mtp"], d, "");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error: --speculative mtp needs a model trained with mtp_depth > 0"), "{err}");
}

/// Each round's drafts come from the logits a non-speculative MTP forward computes: the main
/// model's hidden rows of the whole history, then module 1, …, k over every position from
/// scratch (fresh caches), on the true tokens followed by the round's pending token and
/// earlier drafts. Tolerance as the decoder's tests: 1e-4 · max(1, max |logit|).
#[test]
fn drafts_are_the_mtp_forward_of_the_true_sequence() {
    use nanoseek::autograd::Tape;
    use nanoseek::nn::decode::{layer_cache, KvCache};
    let cases: [(&str, Edit); 4] = [("D", &|_| {}), ("W", &|_| {}), ("S", &|_| {}), ("SDW", &moe)];
    for (pattern, edit) in cases {
        let mut m = model(pattern, 2, 64, 51, edit);
        agree(&mut m, 0.3);
        let v = m.config.vocab_size;
        let opts = SampleOptions { temperature: 0.0, ..Default::default() };
        let mut rng = Rng::new(1);
        let mut dec = SpecDecoder::new(&m, 2).unwrap();
        let logits = dec.prefill(&ids(5, 53, 9)).unwrap();
        let mut pending = nanoseek::generate::argmax(&logits);
        let mut checked = 0;
        while dec.len() < 40 {
            let before = dec.history().to_vec();
            let (accepted, next) = dec.round(pending, 2, &opts, &mut rng).unwrap();
            let (drafts, draft_logits) = dec.last_drafts();
            let seq: Vec<u32> = before.iter().copied().chain([pending]).chain(drafts.iter().copied()).collect();
            let q = before.len() - 1;
            // the reference: one pass of everything over positions 0..=q
            let mut tape = Tape::inference(m.cpu());
            let pv = m.params_on(&mut tape);
            let mut h = m.hidden_cached(&mut tape, &pv, &before, &mut KvCache::new(&m.config)).unwrap();
            for k in 1..=2 {
                let mut cache = layer_cache(&m.config, m.config.mtp_layer(k));
                let toks: Vec<u32> = (0..=q).map(|i| seq[i + k]).collect();
                h = m.mtp_cached(&mut tape, &pv, k, h, &toks, &mut cache).unwrap();
                let last = tape.last_rows(h, 1).unwrap();
                let raw = m.head(&mut tape, &pv, last).unwrap();
                let cap = m.config.logit_softcap;
                let want: Vec<f32> =
                    tape.value(raw).iter().map(|&z| if cap > 0.0 { cap * (z / cap).tanh() } else { z }).collect();
                let got = &draft_logits[k - 1];
                assert_eq!(got.len(), v);
                let scale = want.iter().fold(1.0f32, |a, x| a.max(x.abs()));
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 1e-4 * scale, "{pattern}: depth {k} at position {q}: {worst} > 1e-4·{scale}");
                checked += 1;
            }
            assert_eq!(dec.history().len(), before.len() + 1 + accepted.len());
            pending = next;
        }
        assert!(checked >= 20, "{pattern}: {checked}");
    }
}

/// End to end with sampling: the first three new tokens of speculative generation (at depth 1
/// and 2, temperature 1, a vocabulary of 5, drafts of every depth partly accepted) follow the main model's
/// joint distribution p(t1) p(t2 | t1) p(t3 | t1, t2), computed exactly with the uncached
/// forward. Pearson's χ² over the 125 cells of 30,000 generations (different seeds) has at most
/// 124 degrees of freedom; its 10⁻⁴ critical value is about 191 (Wilson–Hilferty).
#[test]
fn speculative_sampling_follows_the_model_end_to_end() {
    let mut m = model("WD", 2, 32, 71, &|c| c.vocab_size = 5);
    agree(&mut m, 0.3);
    let prompt = [1u32, 3, 0, 2];
    let v = 5usize;
    let dist = |ctx: &[u32]| -> Vec<f64> {
        let c = candidates(&m.next_token_logits(ctx).unwrap(), 1.0, 0, 1.0);
        (0..v as u32).map(|t| c.iter().find(|x| x.0 == t).map_or(0.0, |x| x.1)).collect()
    };
    let mut want = vec![0.0f64; v * v * v];
    let p1 = dist(&prompt);
    for a in 0..v {
        let p2 = dist(&[&prompt[..], &[a as u32]].concat());
        for b in 0..v {
            let p3 = dist(&[&prompt[..], &[a as u32, b as u32]].concat());
            for c in 0..v {
                want[(a * v + b) * v + c] = p1[a] * p2[b] * p3[c];
            }
        }
    }
    let n = 30_000;
    for depth in [1, 2] {
        let mut counts = vec![0usize; v * v * v];
        let (mut accepted, mut deepest) = (0, 0);
        for seed in 0..n {
            // 4 tokens so that depth 2 drafts two (a round drafts at most the tokens still wanted − 1)
            let opts = SampleOptions { max_new_tokens: 4, temperature: 1.0, seed, ..Default::default() };
            let g = generate_speculative_stream(&m, &prompt, &opts, depth, &mut |_| {}).unwrap();
            let t = &g.generation.tokens;
            counts[(t[0] as usize * v + t[1] as usize) * v + t[2] as usize] += 1;
            accepted += g.stats.accepted.iter().sum::<usize>();
            deepest += g.stats.accepted[depth - 1];
        }
        let chi2: f64 = counts
            .iter()
            .zip(&want)
            .filter(|(_, &e)| e > 0.0)
            .map(|(&c, &e)| (c as f64 - e * n as f64).powi(2) / (e * n as f64))
            .sum();
        eprintln!("depth {depth}: χ² {chi2:.1} over 125 cells, {accepted} drafts accepted in {n} generations");
        assert!(chi2 < 191.0, "depth {depth}: χ² = {chi2:.1}");
        assert!(deepest > n as usize / 10, "depth {depth}: depth {depth}'s drafts accepted {deepest} times");
    }
}
