//! DeepSeekMoE in the model: gradients, the dense special case, the routing bias, checkpoints,
//! metrics and the effect of auxiliary-loss-free balancing.

mod common;

use nanoseek::autograd::Tape;
use nanoseek::device::Device;
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::rng::Rng;
use nanoseek::train::{checkpoint, metrics, train, RunConfig, TrainRequest, TrainSettings};
use std::path::Path;

/// 2 layers (the first dense), d 16, E = 4 routed experts of width 8, K = 2, one shared expert.
fn small_moe() -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn_hidden: 24,
        max_seq_len: 8,
        moe: MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 8, seq_aux_alpha: 0.1, ..MoeConfig::default() },
        ..ModelConfig::preset("tiny").unwrap()
    }
}

fn batch(vocab: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..n).map(|_| r.below(vocab) as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| r.below(vocab) as i32).collect();
    (ids, targets)
}

/// The training objective: cross-entropy plus the balance losses.
fn objective(model: &Model, ids: &[u32], targets: &[i32], b: usize, t: usize) -> f64 {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, b, t).unwrap();
    tape.value(l)[0] as f64 + tape.aux_loss_total()
}

/// Finite differences of CE + balance loss for every parameter of a 2-layer model whose second
/// FFN is MoE. The bias pins the selection to experts 0 and 1 (top-k is piecewise constant, so
/// differences across a selection change would be meaningless); gates, router, shared and routed
/// experts and the balance loss all stay differentiable.
#[test]
fn moe_model_gradients_match_finite_differences() {
    let cfg = small_moe();
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut r = Rng::new(2);
    for p in &mut model.params {
        for x in &mut p.tensor.data {
            *x = r.normal() as f32 * 0.5;
        }
    }
    model.moe_bias[1] = vec![20.0, 10.0, -10.0, -20.0];
    let (b, t) = (2, 8);
    let (ids, targets) = batch(cfg.vocab_size, b * t, 3);
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, &ids, &targets, b, t).unwrap();
    assert!(tape.aux_loss_total() > 0.0, "the balance loss is part of the objective");
    tape.backward(l, 1.0).unwrap();
    let grads: Vec<Option<Vec<f32>>> = pv.iter().map(|&v| tape.grad(v).map(<[f32]>::to_vec)).collect();
    drop(tape);
    let eps = common::EPS;
    let mut worst = 0.0f64;
    for (pi, grad) in grads.iter().enumerate() {
        let name = model.params[pi].name.clone();
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name} gets no gradient"));
        for s in 0..8 {
            let j = r.below(model.params[pi].tensor.numel());
            let orig = model.params[pi].tensor.data[j];
            model.params[pi].tensor.data[j] = orig + eps;
            let lp = objective(&model, &ids, &targets, b, t);
            model.params[pi].tensor.data[j] = orig - eps;
            let lm = objective(&model, &ids, &targets, b, t);
            model.params[pi].tensor.data[j] = orig;
            let fd = (lp - lm) / (2.0 * eps as f64);
            let an = grad[j] as f64;
            let bound = common::RTOL * an.abs().max(fd.abs()) + common::ATOL;
            worst = worst.max((an - fd).abs() / bound);
            assert!((an - fd).abs() <= bound, "{name} [{j}] (sample {s}): analytic {an:.6} vs fd {fd:.6}");
        }
    }
    println!("MoE model: worst error / bound = {worst:.3}");
}

/// E = 1, K = 1, no shared expert, expert width = ffn_hidden: the MoE FFN is the dense FFN.
#[test]
fn one_expert_top1_equals_the_dense_model() {
    let dense_cfg = ModelConfig { moe: MoeConfig::default(), ..small_moe() };
    let moe_cfg = ModelConfig {
        moe: MoeConfig {
            n_routed_experts: 1,
            top_k: 1,
            n_shared_experts: 0,
            moe_inter_dim: dense_cfg.ffn_hidden,
            first_k_dense: 0,
            seq_aux_alpha: 0.0,
            ..MoeConfig::default()
        },
        ..dense_cfg.clone()
    };
    let dense = Model::new(&dense_cfg, 5).unwrap();
    let mut moe = Model::new(&moe_cfg, 6).unwrap();
    for p in &mut moe.params {
        let from = p.name.replace("mlp.experts.", "mlp.");
        if let Some(src) = dense.param(&from) {
            p.tensor.data.copy_from_slice(&src.data);
        } else {
            assert!(p.name.ends_with("mlp.router.weight"), "unmatched {}", p.name);
        }
    }
    // Random w_down so the FFN path is not zero.
    let mut r = Rng::new(9);
    let mut dense = dense;
    for (pd, pm) in dense.params.iter_mut().zip(moe.params.iter_mut().filter(|p| !p.name.contains("router"))) {
        if pd.name.ends_with("w_down.weight") {
            for (a, b) in pd.tensor.data.iter_mut().zip(pm.tensor.data.iter_mut()) {
                *a = r.normal() as f32 * 0.3;
                *b = *a;
            }
        }
    }
    let (b, t) = (2, 8);
    let (ids, targets) = batch(dense_cfg.vocab_size, b * t, 4);
    let run = |m: &Model| {
        let mut tape = Tape::new(m.cpu());
        let pv = m.params_on(&mut tape);
        let l = m.loss(&mut tape, &pv, &ids, &targets, b, t).unwrap();
        tape.backward(l, 1.0).unwrap();
        let grads: Vec<(String, Vec<f32>)> = m
            .params
            .iter()
            .zip(&pv)
            .map(|(p, &v)| (p.name.replace("mlp.experts.", "mlp."), tape.grad(v).unwrap().to_vec()))
            .collect();
        (tape.value(l)[0], grads)
    };
    let (ld, gd) = run(&dense);
    let (lm, gm) = run(&moe);
    // Tolerance: the same math in a different summation order (f32): 1e-5 relative.
    assert!((ld - lm).abs() <= 1e-5 * ld.abs(), "loss: dense {ld} vs MoE {lm}");
    for (name, g) in &gd {
        let (_, h) = gm.iter().find(|(n, _)| n == name).unwrap();
        let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = g.iter().zip(h).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{name}: max gradient difference {err} (scale {scale})");
    }
    let (_, router) = gm.iter().find(|(n, _)| n.contains("router")).unwrap();
    // One expert: g = s/s ≡ 1, so the router's gradient is zero up to f32 rounding of s·(1/s).
    let rmax = router.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(rmax < 1e-6, "one expert, gate ≡ 1: the router gets no gradient, got {rmax}");
}

/// The bias steers selection but never the gates: a bias equal for all experts changes nothing
/// (bitwise), a skewed one moves the load; the routing bias is not a parameter (no gradient).
#[test]
fn bias_changes_selection_not_gates() {
    let cfg = ModelConfig { moe: MoeConfig { seq_aux_alpha: 0.0, ..small_moe().moe }, ..small_moe() };
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut r = Rng::new(3);
    for p in model.params.iter_mut().filter(|p| p.name.contains("w_down")) {
        p.tensor.data.iter_mut().for_each(|x| *x = r.normal() as f32 * 0.3);
    }
    let (ids, targets) = batch(cfg.vocab_size, 16, 5);
    let base = objective(&model, &ids, &targets, 2, 8);
    let load0 = model.take_moe_loads()[1].clone().unwrap();
    model.moe_bias[1] = vec![0.7; 4];
    assert_eq!(objective(&model, &ids, &targets, 2, 8).to_bits(), base.to_bits());
    model.moe_bias[1] = vec![5.0, 5.0, 0.0, 0.0];
    let skewed = objective(&model, &ids, &targets, 2, 8);
    let load1 = model.take_moe_loads()[1].clone().unwrap();
    assert_eq!(load1.counts, vec![16, 16, 0, 0], "every token picks the two boosted experts");
    assert_ne!(load0.counts, load1.counts);
    assert_ne!(skewed, base);
    assert!(model.params.iter().all(|p| !p.name.contains("bias")), "the bias is a buffer, not a parameter");
}

fn micro_moe() -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    m.n_layer = 2;
    m.n_embd = 64;
    m.n_head = 2;
    m.n_kv_head = 1;
    m.head_dim = 32;
    m.ffn_hidden = 192;
    m.max_seq_len = 32;
    m.moe = MoeConfig { n_routed_experts: 8, top_k: 2, moe_inter_dim: 32, first_k_dense: 0, ..MoeConfig::default() };
    m
}

fn request(model: ModelConfig, steps: u64, dir: &Path) -> TrainRequest {
    let mut t = TrainSettings::for_model(&model);
    t.device_batch_size = 2;
    t.total_batch_size = 2 * 2 * model.max_seq_len;
    t.num_iterations = steps;
    t.save_every = 3;
    t.eval_every = 3;
    t.eval_batches = 1;
    t.keep_checkpoints = 0;
    TrainRequest {
        run: RunConfig { model, train: t },
        run_dir: dir.to_path_buf(),
        resume_from_step: None,
        device: Device::Cpu,
        verbose: false,
        sample_tokens: 0,
    }
}

/// Resuming restores weights, optimizer state and routing biases: the continuation is bitwise equal.
#[test]
fn resume_restores_the_routing_bias_bitwise() {
    let a = tempfile::tempdir().unwrap();
    let full = train(request(micro_moe(), 6, a.path())).unwrap();
    let b = tempfile::tempdir().unwrap();
    let (src, dst) = (checkpoint::checkpoint_dir(a.path(), 3), checkpoint::checkpoint_dir(b.path(), 3));
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optim.safetensors", "state.json", "checksums.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut req = request(micro_moe(), 6, b.path());
    req.resume_from_step = Some(3);
    let resumed = train(req).unwrap();
    let bits = |l: &[(u64, f32)]| l.iter().map(|&(s, v)| (s, v.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&full.losses[3..]), bits(&resumed.losses));
    let m3 = checkpoint::load_model(&src, &micro_moe()).unwrap();
    assert!(m3.moe_bias.iter().flatten().any(|&v| v != 0.0), "three steps moved the bias");
    let wa = std::fs::read(checkpoint::checkpoint_dir(a.path(), 6).join("model.safetensors")).unwrap();
    let wb = std::fs::read(checkpoint::checkpoint_dir(b.path(), 6).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights and biases must be bitwise equal");
    // Every train line carries the per-layer MoE record, and the run draws the load heat map.
    let recs = metrics::read(&a.path().join("metrics.jsonl")).unwrap();
    let moe: Vec<_> = recs.iter().filter(|r| r.get("loss").is_some()).map(|r| r["moe"].clone()).collect();
    assert_eq!(moe.len(), 6);
    for m in &moe {
        assert_eq!(m.as_array().unwrap().len(), 2, "both layers are MoE");
        assert!(m[0]["max_mean"].as_f64().unwrap() >= 1.0);
        assert_eq!(m[0]["load"].as_array().unwrap().len(), 8);
    }
    assert!(a.path().join("moe_load.svg").exists());
}

/// Max/mean load of the last steps of a run, averaged over layers and steps.
fn late_imbalance(dir: &Path, last: usize) -> f64 {
    let recs = metrics::read(&dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<_> = recs.iter().filter(|r| r.get("moe").is_some()).collect();
    let vals: Vec<f64> = lines[lines.len() - last..]
        .iter()
        .flat_map(|r| r["moe"].as_array().unwrap().iter().map(|l| l["max_mean"].as_f64().unwrap()))
        .collect();
    vals.iter().sum::<f64>() / vals.len() as f64
}

/// With the bias update on (γ = 0.01 for this 40-step run), the late load is more balanced than
/// with it off, everything else equal.
#[test]
fn bias_update_improves_balance() {
    let run = |gamma: f32| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = micro_moe();
        cfg.moe.bias_update_speed = gamma;
        cfg.moe.seq_aux_alpha = 0.0;
        let mut req = request(cfg, 40, dir.path());
        req.run.train.save_every = 0;
        req.run.train.eval_every = 0;
        train(req).unwrap();
        late_imbalance(dir.path(), 10)
    };
    let (off, on) = (run(0.0), run(0.01));
    println!("max/mean load over the last 10 steps: γ = 0: {off:.3}, γ = 0.01: {on:.3}");
    assert!(on < off, "bias update should balance the load: on {on} vs off {off}");
}

#[test]
fn config_aliases_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("moe.toml");
    std::fs::write(&p, "model_size = \"tiny\"\nmoe_enabled = true\nnum_experts = 16\ntop_k = 4\n").unwrap();
    let c = ModelConfig::from_file(&p, &ModelConfig::preset("tiny").unwrap()).unwrap();
    assert_eq!((c.moe.n_routed_experts, c.moe.top_k, c.moe.n_shared_experts), (16, 4, 1));
    assert_eq!(c.moe.moe_inter_dim, 160, "derived: ffn_hidden 704 / (4 + 1) rounded up to 32");
    assert!(c.is_moe_layer(1) && !c.is_moe_layer(0));
    assert!(c.active_params() < c.num_params());
    std::fs::write(&p, "[moe]\nn_routed_experts = 4\ntop_k = 5\n").unwrap();
    let e = ModelConfig::from_file(&p, &ModelConfig::preset("tiny").unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("top_k"), "{e:#}");
    std::fs::write(&p, "moe_enabled = false\n").unwrap();
    let c = ModelConfig::from_file(&p, &ModelConfig::preset("large").unwrap()).unwrap();
    assert!(!c.moe.enabled());
    for name in ["large", "xlarge", "full"] {
        assert!(ModelConfig::preset(name).unwrap().moe.enabled(), "{name} uses MoE");
    }
}
