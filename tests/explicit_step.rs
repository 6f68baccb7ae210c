//! The explicit training step (`train::step`, CPU implementation) against the tape and the
//! optimizer: same loss and gradients as `Model::loss` + `Tape::backward`, the same update as
//! `Optimizer::update`, and the same parameters after several full steps as `train::train_step`.
//!
//! Tolerances (f32 throughout; only the summation order differs, because the explicit step adds
//! a tensor's gradient contributions in its own order and the tape in the reverse-topological
//! order of its consumers):
//! - loss: relative 1e-5;
//! - gradients: |a − b| ≤ 1e-4·max|b| + 1e-3·|b| per parameter tensor;
//! - the optimizer update from identical gradients: bitwise (same kernels, same order);
//! - parameters after 3 full steps: |a − b| ≤ 1e-4·(1 + |b|) (Newton–Schulz normalizes each
//!   update, so gradient differences at 1e-6 stay at that scale).
//!
//! The same checks run for every layer kind: `WD` (window + global attention), `SD` (DSA: sparse
//! phase and dense warm-up; the indexer weights learn from the KL only), and MoE (E = 4, K = 2,
//! one shared expert, first layer dense, balance loss α > 0, non-zero selection biases); after the
//! full steps the MoE biases (auxiliary-loss-free update from the step's counts) must be equal
//! (they move by ±γ from integer counts, so any routing difference would show as a whole γ).

use nanoseek::autograd::Tape;
use nanoseek::data::Batch;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::step::DenseTrainer;
use nanoseek::train::step_cpu::CpuOps;
use nanoseek::train::step_cuda::check_cuda_shapes;
use nanoseek::train::train_step;

/// 3 layers, GQA (4 query heads over 2 kv heads), softcap on.
fn config() -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    m.vocab_size = 96;
    m.n_layer = 3;
    m.n_embd = 64;
    m.n_head = 4;
    m.n_kv_head = 2;
    m.head_dim = 16;
    m.ffn_hidden = 160;
    m.max_seq_len = 16;
    m.logit_softcap = 15.0;
    m
}

/// Random batches with a few ignored targets; c_proj and w_down get random values so every
/// path carries gradient from the first step.
fn batches(c: &ModelConfig, n: usize, b: usize) -> Vec<Batch> {
    let mut rng = Rng::new(7);
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..b * c.max_seq_len).map(|_| rng.below(c.vocab_size) as u32).collect();
            let targets =
                (0..b * c.max_seq_len).map(|i| if i % 11 == 3 { -1 } else { rng.below(c.vocab_size) as i32 }).collect();
            Batch { ids, targets }
        })
        .collect()
}

fn copy(b: &Batch) -> Batch {
    Batch { ids: b.ids.clone(), targets: b.targets.clone() }
}

fn model(c: &ModelConfig) -> Model {
    let mut m = Model::new(c, 3).unwrap();
    let mut rng = Rng::new(11);
    for p in m.params.iter_mut().filter(|p| p.name.contains("c_proj") || p.name.contains("w_down")) {
        for v in p.tensor.data.iter_mut() {
            *v = 0.05 * rng.normal() as f32;
        }
    }
    m
}

fn tape_grads(m: &Model, batch: &Batch, b: usize, seed: f32) -> (f32, Vec<Vec<f32>>) {
    let t = m.config.max_seq_len;
    let mut tape = Tape::new();
    let pv = m.params_on(&mut tape);
    let loss = m.loss(&mut tape, &pv, &batch.ids, &batch.targets, b, t).unwrap();
    let lv = tape.value(loss)[0];
    tape.backward(loss, seed);
    let g = pv.iter().zip(&m.params).map(|(&v, p)| tape.grad(v).map_or(vec![0.0; p.tensor.numel()], |g| g.to_vec()));
    (lv, g.collect())
}

/// `WD`: window 4 with 2 global tokens over 16 positions (the mask matters).
fn window_config() -> ModelConfig {
    let mut c = config();
    c.n_layer = 2;
    c.attn_pattern = "WD".into();
    c.dsa_window_size = 4;
    c.n_global = 2;
    c
}

/// `SD`: the indexer keeps 4 top-k keys plus a local window of 2 over 16 positions.
fn dsa_config() -> ModelConfig {
    let mut c = config();
    c.n_layer = 2;
    c.attn_pattern = "SD".into();
    c.index_n_heads = 2;
    c.index_head_dim = 16;
    c.index_topk = 4;
    c.index_local_window = 2;
    c
}

/// MoE: E = 4, K = 2, one shared expert, layer 0 dense, balance loss on.
fn moe_config() -> ModelConfig {
    let mut c = config();
    c.moe.n_routed_experts = 4;
    c.moe.top_k = 2;
    c.moe.n_shared_experts = 1;
    c.moe.moe_inter_dim = 32;
    c.moe.first_k_dense = 1;
    c.moe.seq_aux_alpha = 0.01;
    c.moe.bias_update_speed = 0.01;
    c
}

/// [`model`] with non-zero MoE selection biases and the DSA phase set.
fn model_for(c: &ModelConfig, warmup: bool) -> Model {
    let mut m = model(c);
    let mut rng = Rng::new(5);
    for b in m.moe_bias.iter_mut() {
        b.iter_mut().for_each(|v| *v = 0.02 * rng.normal() as f32);
    }
    m.dsa_dense_warmup = warmup;
    m
}

#[test]
fn loss_and_gradients_match_the_tape() {
    grads_match_the_tape(&config(), false);
}

#[test]
fn window_layers_match_the_tape() {
    let c = window_config();
    grads_match_the_tape(&c, false);
    steps_track_train_step(&c, false);
}

#[test]
fn dsa_layers_match_the_tape() {
    let c = dsa_config();
    grads_match_the_tape(&c, false);
    steps_track_train_step(&c, false);
}

#[test]
fn dsa_warmup_matches_the_tape() {
    let c = dsa_config();
    grads_match_the_tape(&c, true);
    steps_track_train_step(&c, true);
}

#[test]
fn moe_layers_match_the_tape() {
    let c = moe_config();
    grads_match_the_tape(&c, false);
    steps_track_train_step(&c, false);
}

fn grads_match_the_tape(c: &ModelConfig, warmup: bool) {
    let c = c.clone();
    let m = model_for(&c, warmup);
    let opt = Optimizer::new(&m, OptimConfig::default());
    let mut tr = DenseTrainer::new(CpuOps::new(&c), &m, &opt).unwrap();
    let bs = batches(&c, 3, 2);
    let mut want: Vec<Vec<f32>> = m.params.iter().map(|p| vec![0.0; p.tensor.numel()]).collect();
    for batch in &bs {
        // a few micro-batches with seed 1/3, summed, as train_step does
        let (lt, g) = tape_grads(&m, batch, 2, 1.0 / 3.0);
        let le = tr.forward_backward(&batch.ids, &batch.targets, 2, c.max_seq_len, 1.0 / 3.0).unwrap();
        assert!((le - lt).abs() <= 1e-5 * lt.abs(), "loss: explicit {le} vs tape {lt}");
        assert!(tr.loss(&batch.ids, &batch.targets, 2, c.max_seq_len).unwrap() == le, "loss() is the forward");
        for (w, g) in want.iter_mut().zip(g) {
            for (a, b) in w.iter_mut().zip(g) {
                *a += b;
            }
        }
    }
    for ((name, _, _), (got, want)) in tr.specs.iter().zip(tr.grads.iter().zip(&want)) {
        let scale = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        assert!(scale > 0.0, "{name}: no gradient reached it");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale + 1e-3 * b.abs(),
                "{name}[{i}]: explicit {a} vs tape {b} (max {scale})"
            );
        }
    }
}

#[test]
fn update_matches_the_optimizer_bitwise() {
    let c = config();
    let mut m = model(&c);
    let mut opt = Optimizer::new(&m, OptimConfig { weight_decay: 0.1, ..OptimConfig::default() });
    let mut tr = DenseTrainer::new(CpuOps::new(&c), &m, &opt).unwrap();
    for (step, batch) in batches(&c, 3, 2).iter().enumerate() {
        let (_, g) = tape_grads(&m, batch, 2, 1.0);
        for (dst, src) in tr.grads.iter_mut().zip(&g) {
            dst.copy_from_slice(src);
        }
        let lr = 0.5 + 0.25 * step as f32;
        opt.update(&mut m, &g, lr);
        tr.update(lr).unwrap();
        for (p, got) in m.params.iter().zip(&tr.params) {
            assert!(p.tensor.data == *got, "{} differs after step {}", p.name, step + 1);
        }
    }
    // and the state copies back into a host optimizer unchanged
    let mut m2 = model(&c);
    let mut opt2 = Optimizer::new(&m2, opt.config.clone());
    tr.to_host(&mut m2, &mut opt2).unwrap();
    assert_eq!(opt2.step, opt.step);
    assert!(opt2.state == opt.state);
    assert!(m2.params.iter().zip(&m.params).all(|(a, b)| a.tensor.data == b.tensor.data));
}

#[test]
fn full_steps_track_train_step() {
    steps_track_train_step(&config(), false);
}

fn steps_track_train_step(c: &ModelConfig, warmup: bool) {
    let c = c.clone();
    let mut m = model_for(&c, warmup);
    let cfg = OptimConfig::default();
    let mut opt = Optimizer::new(&m, cfg.clone());
    let mut tr = DenseTrainer::new(CpuOps::new(&c), &m, &opt).unwrap();
    let bs = batches(&c, 6, 2);
    for step in 0..3 {
        let lr = nanoseek::optim::lr_multiplier(step as u64, 3, cfg.warmup_ratio, cfg.warmdown_ratio, 0.0);
        let mut it = bs[2 * step..2 * step + 2].iter().map(copy);
        let want = train_step(&mut m, &mut opt, || it.next().unwrap(), 2, cfg.grad_clip, lr, false).unwrap();
        let mut it = bs[2 * step..2 * step + 2].iter().map(copy);
        let (loss, norm) = tr.train_step(|| it.next().unwrap(), 2, cfg.grad_clip, lr).unwrap();
        assert!((loss - want.loss).abs() <= 1e-5 * want.loss, "step {step}: loss {loss} vs {}", want.loss);
        assert!(
            (norm - want.grad_norm).abs() <= 1e-4 * want.grad_norm,
            "step {step}: norm {norm} vs {}",
            want.grad_norm
        );
        if c.moe.enabled() {
            let got: Vec<_> = tr.last_step.moe_loads.iter().map(|l| l.as_ref().map(|l| l.counts.clone())).collect();
            let want: Vec<_> = want.moe_loads.iter().map(|l| l.as_ref().map(|l| l.counts.clone())).collect();
            assert_eq!(got, want, "step {step}: expert counts");
        }
        if c.attn_pattern.contains('S') {
            let (a, b) = (tr.last_step.indexer_loss.unwrap(), want.indexer_loss.unwrap());
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "step {step}: indexer loss {a} vs {b}");
        }
    }
    for (p, got) in m.params.iter().zip(&tr.params) {
        for (i, (&a, &b)) in got.iter().zip(&p.tensor.data).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{}[{i}]: explicit {a} vs train_step {b}", p.name);
        }
    }
    assert_eq!(tr.moe_bias, m.moe_bias, "MoE selection biases after the steps");
    assert!(m.moe_bias.iter().any(|b| !b.is_empty()) == c.moe.enabled());
}

#[test]
fn cuda_shape_rules_are_named() {
    assert!(check_cuda_shapes(&config()).unwrap_err().to_string().contains("head_dim 64 or 128"));
    let mut c = moe_config();
    c.head_dim = 64;
    c.n_embd = 256;
    let e = check_cuda_shapes(&c).unwrap_err().to_string();
    assert!(e.contains("n_routed_experts"), "{e}");
    c.moe.n_routed_experts = 8;
    assert!(check_cuda_shapes(&c).is_ok());
    let mut c = dsa_config();
    (c.head_dim, c.index_n_heads, c.dsa_warmup_steps) = (64, 8, 10);
    // the dense warm-up has its CUDA kernel (the dense indexer KL): no longer a rule
    assert!(check_cuda_shapes(&c).is_ok());
}
