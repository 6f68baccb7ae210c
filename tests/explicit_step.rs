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

use nanoseek::autograd::Tape;
use nanoseek::data::Batch;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::step::{check_dense, DenseTrainer};
use nanoseek::train::step_cpu::CpuOps;
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

#[test]
fn loss_and_gradients_match_the_tape() {
    let c = config();
    let m = model(&c);
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
    let c = config();
    let mut m = model(&c);
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
    }
    for (p, got) in m.params.iter().zip(&tr.params) {
        for (i, (&a, &b)) in got.iter().zip(&p.tensor.data).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{}[{i}]: explicit {a} vs train_step {b}", p.name);
        }
    }
}

#[test]
fn non_dense_configs_are_refused_by_name() {
    let mut c = config();
    assert!(check_dense(&c).is_ok());
    c.attn_pattern = "DW".into();
    let e = check_dense(&c).unwrap_err().to_string();
    assert!(e.contains("layer 1: window attention"), "{e}");
    let mut c = config();
    c.moe.n_routed_experts = 4;
    c.moe.top_k = 2;
    c.moe.moe_inter_dim = 32;
    c.moe.first_k_dense = 1;
    let e = check_dense(&c).unwrap_err().to_string();
    assert!(e.contains("layer 1: MoE FFN") && !e.contains("layer 0"), "{e}");
}
