//! DeepSeek-V3.2's lightning indexer (`indexer = "v32"`, `nn::indexer`) on MLA models: finite
//! differences through whole models (LM loss, and the indexer KL reaching wq_b / wq, wk, k_norm
//! and w_heads), the dense special case, the partial RoPE, parameters and counts, the config
//! rules (old configs load as the gqa indexer), training with a bitwise resume, and the
//! dense-to-sparse conversion with the frozen warm-up.

mod common;

use nanoseek::autograd::Tape;
use nanoseek::device::Device;
use nanoseek::nn::{ConfigOverrides, Model, ModelConfig, MoeConfig, ParamKind};
use nanoseek::rng::Rng;
use nanoseek::train::checkpoint::{checkpoint_dir, load_model, load_model_converting};
use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};

/// Two layers ("SD" etc.), MLA with 2 heads (d_n 4, d_r 4, d_v 6, r_kv 8), C = 16; the v32
/// indexer with 2 heads of d_I 8, 4 of them rotated, top-2 plus the latest key.
fn small(pattern: &str, q_lora_rank: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_kv_head: 2,
        head_dim: 8,
        ffn_hidden: 24,
        max_seq_len: 8,
        attn_pattern: pattern.into(),
        index_n_heads: 2,
        index_head_dim: 8,
        index_rope_dim: 4,
        index_topk: 2,
        index_local_window: 1,
        indexer: "v32".into(),
        attention: "mla".into(),
        q_lora_rank,
        kv_lora_rank: 8,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 6,
        ..ModelConfig::preset("tiny").unwrap()
    }
}

fn with_moe(c: ModelConfig) -> ModelConfig {
    // α = 0: the aux losses are the indexer KL alone
    let moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 8, seq_aux_alpha: 0.0, ..MoeConfig::default() };
    ModelConfig { moe, ..c }
}

fn batch(vocab: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..n).map(|_| r.below(vocab) as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| r.below(vocab) as i32).collect();
    (ids, targets)
}

fn randomized(cfg: &ModelConfig, seed: u64) -> Model {
    let mut model = Model::new(cfg, 1).unwrap();
    let mut r = Rng::new(seed);
    for p in &mut model.params {
        p.tensor.data.iter_mut().for_each(|x| *x = r.normal() as f32 * 0.5);
    }
    if cfg.moe.enabled() {
        model.moe_bias[1] = vec![20.0, 10.0, -10.0, -20.0]; // pins the routing under perturbations
    }
    model
}

/// (cross-entropy, indexer KL) of one training forward on a [2, 8] batch.
fn losses(model: &Model, ids: &[u32], targets: &[i32]) -> (f64, f64) {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, 2, 8).unwrap();
    (tape.value(l)[0] as f64, tape.aux_loss_total())
}

/// Finite differences against the analytic gradient of CE + KL for 8 coordinates of every
/// parameter `check` names; `objective` 0 = cross-entropy, 1 = the KL.
fn check(name: &str, model: &mut Model, objective: usize, check: &dyn Fn(&str) -> bool) -> usize {
    let (ids, targets) = batch(model.config.vocab_size, 16, 3);
    let grads: Vec<Option<Vec<f32>>> = {
        let mut tape = Tape::new(model.cpu());
        let pv = model.params_on(&mut tape);
        let l = model.loss(&mut tape, &pv, &ids, &targets, 2, 8).unwrap();
        tape.backward(l, 1.0).unwrap();
        pv.iter().map(|&v| tape.grad(v).map(<[f32]>::to_vec)).collect()
    };
    let of = |m: &Model| {
        let (ce, kl) = losses(m, &ids, &targets);
        [ce, kl][objective]
    };
    let (mut r, mut worst, mut checked) = (Rng::new(4), 0.0f64, 0);
    for (pi, grad) in grads.iter().enumerate() {
        let pname = model.params[pi].name.clone();
        if !check(&pname) {
            continue;
        }
        let g = grad.clone().unwrap_or_else(|| panic!("{name}: {pname} gets no gradient"));
        assert!(g.iter().any(|&x| x != 0.0), "{name}: {pname} gets a zero gradient");
        for _ in 0..8 {
            let j = r.below(g.len());
            let orig = model.params[pi].tensor.data[j];
            model.params[pi].tensor.data[j] = orig + common::EPS;
            let lp = of(model);
            model.params[pi].tensor.data[j] = orig - common::EPS;
            let lm = of(model);
            model.params[pi].tensor.data[j] = orig;
            let (fd, an) = ((lp - lm) / (2.0 * common::EPS as f64), g[j] as f64);
            let bound = common::RTOL * an.abs().max(fd.abs()) + common::ATOL;
            assert!((an - fd).abs() <= bound, "{name}: {pname} [{j}]: analytic {an:.6} vs fd {fd:.6}");
            worst = worst.max((an - fd).abs() / bound);
        }
        checked += 1;
    }
    println!("{name}: {checked} tensors match finite differences (worst error / bound = {worst:.3})");
    checked
}

/// Whole MLA models with a v32 DSA layer, q_lora_rank 0 and 6, dense and MoE FFNs. The LM
/// loss's gradient in sparse mode reaches every parameter but wte, the query latent's wq_a
/// (both feed the selection, which must stay fixed under the perturbations) and the indexer's;
/// in the dense warm-up it also reaches wq_a; the KL's gradient reaches every indexer tensor.
#[test]
fn v32_models_match_finite_differences() {
    for rq in [0, 6] {
        for moe in [false, true] {
            let cfg = if moe { with_moe(small("SD", rq)) } else { small("SD", rq) };
            let name = format!("v32 q_lora_rank {rq} moe {moe}");
            let mut model = randomized(&cfg, 6);
            let main = |n: &str| n != "wte.weight" && !n.contains("indexer") && !n.contains("wq_a");
            check(&format!("{name}, sparse, LM"), &mut model, 0, &main);
            model.dsa_dense_warmup = true;
            check(&format!("{name}, warm-up, LM"), &mut model, 0, &|n| n.contains("wq_a"));
            let n = check(&format!("{name}, warm-up, KL"), &mut model, 1, &|n| n.contains("indexer"));
            assert_eq!(n, 5, "wq(_b), wk, k_norm weight and bias, w_heads");
        }
    }
}

/// With index_topk ≥ T the v32 DSA layer is the dense MLA layer (the same weights).
#[test]
fn full_topk_equals_the_dense_model() {
    let (ids, targets) = batch(17, 16, 8);
    for rq in [0, 6] {
        let dense = randomized(&small("DD", rq), 9);
        let mut full = Model::new(&ModelConfig { index_topk: 8, index_local_window: 0, ..small("SD", rq) }, 1).unwrap();
        for p in &mut full.params {
            if let Some(src) = dense.param(&p.name) {
                p.tensor.data.copy_from_slice(&src.data);
            }
        }
        let (want, (got, kl)) = (losses(&dense, &ids, &targets).0, losses(&full, &ids, &targets));
        assert!((got - want).abs() <= 1e-5 * want, "topk ≥ T: {got} vs dense {want}");
        assert!(kl.is_finite() && kl >= -1e-6, "KL ≥ 0, got {kl}");
    }
}

/// The partial RoPE: the last d_I − r dims of qi and ki are the unrotated projections (wq_b ·
/// c_q, and LN(wk · h) with γ = 1, β = 0 as initialized), bitwise the same at every position;
/// and the scores qi_s · ki_j depend on the positions only through s − j.
#[test]
fn partial_rope_rotates_the_first_dims_only_and_is_shift_equivariant() {
    let cfg = small("SD", 6);
    let model = Model::new(&cfg, 3).unwrap();
    let (t, hi, di, r) = (3, 2, 8, 4);
    let h = common::randn(&[t, 16], 11);
    let cq = common::randn(&[t, 6], 12);
    let [q0, k0, w0] = model.indexer_projections(0, &h, &cq, 0).unwrap();
    let [q5, k5, w5] = model.indexer_projections(0, &h, &cq, 5).unwrap();
    assert_eq!(w0, w5, "the head weights are position-free");
    // the unrotated parts
    let wq_b = model.param("blocks.0.attn.indexer.wq_b.weight").unwrap();
    let wk = model.param("blocks.0.attn.indexer.wk.weight").unwrap();
    for s in 0..t {
        let k_raw: Vec<f64> =
            (0..di).map(|o| (0..16).map(|i| (wk.data[o * 16 + i] * h.data[s * 16 + i]) as f64).sum()).collect();
        let mean = k_raw.iter().sum::<f64>() / di as f64;
        let var = k_raw.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / di as f64;
        for d in r..di {
            let ln = (k_raw[d] - mean) / (var + 1e-6).sqrt();
            assert!((k0[s * di + d] as f64 - ln).abs() < 1e-4, "ki[{s}, {d}] = LN(wk·h)");
            assert_eq!(k0[s * di + d].to_bits(), k5[s * di + d].to_bits());
            for head in 0..hi {
                let o = head * di + d;
                let q: f64 = (0..6).map(|i| (wq_b.data[o * 6 + i] * cq.data[s * 6 + i]) as f64).sum();
                assert!((q0[s * hi * di + o] as f64 - q).abs() < 1e-4, "qi[{s}, {head}, {d}] = wq_b·c_q");
                assert_eq!(q0[s * hi * di + o].to_bits(), q5[s * hi * di + o].to_bits());
            }
        }
    }
    // the rotated parts move with the position, the scores only with the distance
    assert_ne!(q0[..r], q5[..r], "the first r dims are rotated");
    for (s, j) in [(2, 0), (2, 1), (1, 0), (2, 2)] {
        for head in 0..hi {
            let dot = |q: &[f32], k: &[f32]| -> f64 {
                (0..di).map(|d| (q[s * hi * di + head * di + d] * k[j * di + d]) as f64).sum()
            };
            let (a, b) = (dot(&q0, &k0), dot(&q5, &k5));
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "score ({s}, {j}) head {head}: {a} vs {b}");
        }
    }
}

/// Names, shapes, optimizer groups, initialization and the exact counts `info` reports.
#[test]
fn v32_parameters_and_counts() {
    for rq in [0, 6] {
        let cfg = small("SD", rq);
        let model = Model::new(&cfg, 1).unwrap();
        let names: Vec<&str> =
            model.params.iter().map(|p| p.name.as_str()).filter(|n| n.starts_with("blocks.0.attn.indexer.")).collect();
        let wq = if rq > 0 { "wq_b.weight" } else { "wq.weight" };
        let want: Vec<String> = [wq, "wk.weight", "k_norm.weight", "k_norm.bias", "w_heads.weight"]
            .iter()
            .map(|w| format!("blocks.0.attn.indexer.{w}"))
            .collect();
        assert_eq!(names, want);
        assert_eq!(model.num_params(), cfg.num_params(), "counts are exact");
        let p = |n: &str| model.params.iter().find(|p| p.name == format!("blocks.0.attn.indexer.{n}")).unwrap();
        assert_eq!(p(wq).tensor.shape, [2 * 8, if rq > 0 { rq } else { 16 }]);
        assert_eq!(
            (p("wk.weight").tensor.shape.clone(), p("w_heads.weight").tensor.shape.clone()),
            (vec![8, 16], vec![2, 16])
        );
        assert!(p("k_norm.weight").tensor.data.iter().all(|&x| x == 1.0), "γ starts at 1");
        assert!(p("k_norm.bias").tensor.data.iter().all(|&x| x == 0.0), "β starts at 0");
        assert_eq!(p("k_norm.weight").kind, ParamKind::Vector);
        assert!(!ParamKind::Vector.uses_muon(), "the norm's vectors are AdamW's");
        assert_eq!((cfg.n_indexer_params(0), cfg.n_indexer_params(1)), (5, 0));
        assert_eq!(cfg.index_rope_width(), 4);
    }
}

/// A config written before the v32 indexer (no `indexer`) loads as the gqa indexer, through
/// serde and through a run's config.json; a user's file or the CLI picking MLA gets v32; the
/// validation errors name the field.
#[test]
fn config_rules_and_old_configs() {
    let mut old = serde_json::to_value(small("SD", 6)).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("indexer");
    obj.remove("index_rope_dim");
    let c: ModelConfig = serde_json::from_value(old.clone()).unwrap();
    assert_eq!((c.indexer.as_str(), c.index_rope_width()), ("gqa", 8), "old configs keep the gqa indexer");
    let names: Vec<String> = Model::expected_shapes(&c).into_iter().map(|s| s.0).collect();
    assert!(names.contains(&"blocks.0.attn.indexer.wq.weight".to_string()));
    assert_eq!(Model::new(&c, 1).unwrap().num_params(), c.num_params());
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("config.json");
    std::fs::write(&run, serde_json::json!({"model": old, "train": {}}).to_string()).unwrap();
    let tiny = ModelConfig::preset("tiny").unwrap();
    assert_eq!(ModelConfig::from_file(&run, &tiny).unwrap().indexer, "gqa", "a run's config.json is read as written");
    let user = dir.path().join("m.toml");
    std::fs::write(&user, "attention = \"mla\"\nattn_pattern = \"SD\"\n").unwrap();
    let c = ModelConfig::from_file(&user, &tiny).unwrap();
    assert_eq!((c.indexer.as_str(), c.index_rope_width()), ("v32", 16), "d_I 32 → 16 rotated");
    std::fs::write(&user, "attention = \"mla\"\nindexer = \"gqa\"\n").unwrap();
    assert_eq!(ModelConfig::from_file(&user, &tiny).unwrap().indexer, "gqa");
    let mut c = tiny.clone();
    ConfigOverrides { attention: Some("mla".into()), ..Default::default() }.apply(&mut c).unwrap();
    assert_eq!(c.indexer, "v32", "--attention mla picks the v32 indexer");
    let mut c = tiny.clone();
    ConfigOverrides { indexer: Some("v32".into()), attn_pattern: Some("SD".into()), ..Default::default() }
        .apply(&mut c)
        .unwrap();
    assert!(Model::new(&c, 1).unwrap().param("blocks.0.attn.indexer.wq.weight").is_some(), "v32 on GQA reads h");
    let bad = |f: &dyn Fn(&mut ModelConfig)| {
        let mut c = small("SD", 6);
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    assert!(bad(&|c| c.index_rope_dim = 3).contains("index_rope_dim (3) must be even"));
    assert!(bad(&|c| c.index_rope_dim = 10).contains("index_rope_dim (10) must be at most index_head_dim"));
    assert!(bad(&|c| c.indexer = "v3".into()).contains("indexer must be"));
    assert!(bad(&|c| (c.indexer, c.index_rope_dim) = ("gqa".into(), 4)).contains("index_rope_dim"));
}

fn micro(pattern: &str) -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (2, 32, 2, 16, 64, 16);
    (m.attn_pattern, m.index_topk, m.index_n_heads, m.index_head_dim) = (pattern.into(), 4, 2, 8);
    (m.attention, m.indexer, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) =
        ("mla".into(), "v32".into(), 16, 24, 8, 8, 12);
    m
}

fn request(model: ModelConfig, steps: u64, save_every: u64, dir: &std::path::Path) -> TrainRequest {
    let mut t = TrainSettings::for_model(&model);
    (t.device_batch_size, t.total_batch_size) = (2, 2 * model.max_seq_len);
    (t.num_iterations, t.save_every, t.eval_every, t.eval_batches, t.keep_checkpoints) = (steps, save_every, 0, 1, 0);
    TrainRequest {
        run: RunConfig { model, train: t },
        run_dir: dir.to_path_buf(),
        resume_from_step: None,
        device: Device::Cpu,
        verbose: false,
        sample_tokens: 0,
    }
}

/// A v32 model trains (the loss falls, the indexer KL is logged) and a run resumed from its
/// step-6 checkpoint continues bitwise.
#[test]
fn v32_trains_and_resumes_bitwise() {
    let m = ModelConfig { dsa_warmup_steps: 3, ..micro("SD") };
    let tmp = tempfile::tempdir().unwrap();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let a = train::train(request(m.clone(), 12, 6, &full)).unwrap();
    let (first, last) = (a.losses[0].1, a.losses[11].1);
    println!("v32 training: loss {first:.3} → {last:.3}");
    assert!(last < first - 0.3, "the loss should fall: {first} → {last}");
    let recs = train::metrics::read(&full.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.iter().filter(|r| r["indexer_loss"].is_number()).count(), 12);
    let (src, dst) = (checkpoint_dir(&full, 6), checkpoint_dir(&part, 6));
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optim.safetensors", "state.json", "checksums.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut req = request(m, 12, 6, &part);
    req.resume_from_step = Some(6);
    let b = train::train(req).unwrap();
    let bits = |l: &[(u64, f32)]| l.iter().map(|&(s, v)| (s, v.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses[6..]), bits(&b.losses), "resume continues bitwise");
    let wa = std::fs::read(checkpoint_dir(&full, 12).join("model.safetensors")).unwrap();
    let wb = std::fs::read(checkpoint_dir(&part, 12).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights are bitwise equal");
}

/// DeepSeek-V3.2's recipe on MLA: a dense MLA checkpoint converts to a v32 DSA model (the five
/// indexer tensors start fresh, k_norm's γ at 1), the warm-up trains only them (k_norm
/// included; everything else stays bitwise the parent's), then everything trains.
#[test]
fn a_dense_mla_checkpoint_converts_and_warms_up_only_the_v32_indexer() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, child) = (tmp.path().join("parent"), tmp.path().join("child"));
    train::train(request(micro("DD"), 3, 3, &parent)).unwrap();
    let dense = load_model(&checkpoint_dir(&parent, 3), &micro("DD")).unwrap();
    let cfg = ModelConfig { dsa_warmup_steps: 2, ..micro("SD") };
    let fresh = Model::new(&cfg, 7).unwrap();
    let (conv, added) = load_model_converting(&checkpoint_dir(&parent, 3), &cfg, Some(&fresh)).unwrap();
    assert_eq!(added.len(), 5, "{added:?}");
    for p in &conv.params {
        let want = dense.param(&p.name).or_else(|| fresh.param(&p.name)).unwrap();
        assert_eq!(p.tensor.data, want.data, "{}", p.name);
    }
    assert!(conv.param("blocks.0.attn.indexer.k_norm.weight").unwrap().data.iter().all(|&x| x == 1.0));
    let mut req = request(cfg.clone(), 4, 2, &child);
    req.run.train.init_from = Some(checkpoint_dir(&parent, 3));
    assert!(req.run.train.freezes_main_during_warmup());
    train::train(req).unwrap();
    let warm = load_model(&checkpoint_dir(&child, 2), &cfg).unwrap();
    let done = load_model(&checkpoint_dir(&child, 4), &cfg).unwrap();
    let init = Model::new(&cfg, 42).unwrap();
    for p in &warm.params {
        match dense.param(&p.name) {
            Some(t) => {
                assert_eq!(p.tensor.data, t.data, "{} moved during the warm-up", p.name);
                assert_ne!(done.param(&p.name).unwrap().data, t.data, "{} did not train after it", p.name);
            }
            None => assert_ne!(p.tensor.data, init.param(&p.name).unwrap().data, "{} did not train", p.name),
        }
    }
}
