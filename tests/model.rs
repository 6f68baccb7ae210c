//! The whole model: finite-difference gradients, determinism, learning.

mod common;

use nanoseek::autograd::Tape;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::rng::Rng;

fn small_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn_hidden: 24,
        max_seq_len: 8,
        rope_theta: 10_000.0,
        logit_softcap: 15.0,
        ..ModelConfig::preset("tiny").unwrap()
    }
}

fn batch(cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| r.below(cfg.vocab_size) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|_| r.below(cfg.vocab_size) as i32).collect();
    (ids, targets)
}

fn loss_of(model: &Model, ids: &[u32], targets: &[i32], b: usize, t: usize) -> f64 {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, b, t).unwrap();
    tape.value(l)[0] as f64
}

/// Finite differences through a whole 2-layer GQA model, for every parameter tensor
/// (zero-initialized projections are randomized first so every path is active); the
/// second run uses a window + global layer (W = 3, G = 1) before a dense one.
#[test]
fn two_layer_model_gradients_match_finite_differences() {
    two_layer_gradcheck(small_config());
    two_layer_gradcheck(ModelConfig { attn_pattern: "WD".into(), dsa_window_size: 3, n_global: 1, ..small_config() });
}

fn two_layer_gradcheck(cfg: ModelConfig) {
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut r = Rng::new(2);
    for p in &mut model.params {
        for x in &mut p.tensor.data {
            *x = r.normal() as f32 * 0.5;
        }
    }
    let (b, t) = (2, 8);
    let (ids, targets) = batch(&cfg, b, t, 3);
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, &ids, &targets, b, t).unwrap();
    tape.backward(l, 1.0).unwrap();
    let grads: Vec<Vec<f32>> =
        pv.iter().map(|&v| tape.grad(v).expect("every parameter gets a gradient").to_vec()).collect();
    drop(tape);
    let eps = common::EPS;
    let mut worst = 0.0f64;
    for (pi, grad) in grads.iter().enumerate() {
        for s in 0..6 {
            let j = r.below(model.params[pi].tensor.numel());
            let orig = model.params[pi].tensor.data[j];
            model.params[pi].tensor.data[j] = orig + eps;
            let lp = loss_of(&model, &ids, &targets, b, t);
            model.params[pi].tensor.data[j] = orig - eps;
            let lm = loss_of(&model, &ids, &targets, b, t);
            model.params[pi].tensor.data[j] = orig;
            let fd = (lp - lm) / (2.0 * eps as f64);
            let an = grad[j] as f64;
            let bound = common::RTOL * an.abs().max(fd.abs()) + common::ATOL;
            worst = worst.max((an - fd).abs() / bound);
            assert!(
                (an - fd).abs() <= bound,
                "{} [{j}] (sample {s}): analytic {an:.6} vs fd {fd:.6}",
                model.params[pi].name
            );
        }
    }
    println!("2-layer model: worst error / bound = {worst:.3}");
}

#[test]
fn same_seed_same_model_and_loss_bitwise() {
    let cfg = small_config();
    let (ids, targets) = batch(&cfg, 2, 8, 4);
    let a = Model::new(&cfg, 7).unwrap();
    let b = Model::new(&cfg, 7).unwrap();
    let c = Model::new(&cfg, 8).unwrap();
    assert!(a.params.iter().zip(&b.params).all(|(x, y)| x.tensor == y.tensor));
    assert!(a.params.iter().zip(&c.params).any(|(x, y)| x.tensor != y.tensor));
    assert_eq!(loss_of(&a, &ids, &targets, 2, 8).to_bits(), loss_of(&b, &ids, &targets, 2, 8).to_bits());
}

#[test]
fn initial_loss_is_near_uniform() {
    // lm_head starts at N(0, 0.001²), so the first loss is ≈ ln(vocab).
    let cfg = small_config();
    let (ids, targets) = batch(&cfg, 2, 8, 5);
    let l = loss_of(&Model::new(&cfg, 1).unwrap(), &ids, &targets, 2, 8);
    assert!((l - (cfg.vocab_size as f64).ln()).abs() < 0.05, "{l}");
}

#[test]
fn out_of_range_ids_are_rejected_with_a_clear_error() {
    let cfg = small_config();
    let model = Model::new(&cfg, 1).unwrap();
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let ids = vec![1, 2, 17, 3];
    let err = model.loss(&mut tape, &pv, &ids, &[0, 0, 0, 0], 1, 4).unwrap_err().to_string();
    assert!(err.contains("token id 17") && err.contains("vocab_size 17"), "{err}");
    let err = model.loss(&mut tape, &pv, &[0, 1, 2, 3], &[0, 0, 99, 0], 1, 4).unwrap_err().to_string();
    assert!(err.contains("99"), "{err}");
}

#[test]
fn window_layers_with_a_window_as_long_as_the_sequence_equal_dense() {
    let dense = small_config();
    let window =
        ModelConfig { attn_pattern: "W".into(), dsa_window_size: dense.max_seq_len, n_global: 2, ..small_config() };
    let (ids, targets) = batch(&dense, 2, 8, 6);
    let a = loss_of(&Model::new(&dense, 3).unwrap(), &ids, &targets, 2, 8);
    let b = loss_of(&Model::new(&window, 3).unwrap(), &ids, &targets, 2, 8);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "dense {a} vs window {b}");
    // a short window does change the result
    let short = ModelConfig { dsa_window_size: 2, n_global: 0, ..window };
    let mut m = Model::new(&short, 3).unwrap();
    let mut r = Rng::new(4);
    m.params.iter_mut().flat_map(|p| p.tensor.data.iter_mut()).for_each(|x| *x = r.normal() as f32 * 0.3);
    let mut d = Model::new(&dense, 3).unwrap();
    let mut r = Rng::new(4);
    d.params.iter_mut().flat_map(|p| p.tensor.data.iter_mut()).for_each(|x| *x = r.normal() as f32 * 0.3);
    assert_ne!(loss_of(&m, &ids, &targets, 2, 8), loss_of(&d, &ids, &targets, 2, 8));
}

#[test]
fn attention_pattern_is_validated_and_repeats() {
    let mut c = small_config();
    c.attn_pattern = "WWD".into();
    c.n_layer = 5;
    use nanoseek::nn::AttnKind::{Dense, Window};
    assert_eq!((0..5).map(|l| c.attn_kind(l)).collect::<Vec<_>>(), vec![Window, Window, Dense, Window, Window]);
    c.attn_pattern = "WX".into();
    assert!(c.validate().unwrap_err().to_string().contains("attn_pattern"));
}
