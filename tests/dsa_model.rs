//! DeepSeek Sparse Attention in the model: gradients (LM loss and indexer KL), the indexer's
//! isolation from the LM loss, the dense special cases, and training with the indexer loss.

mod common;

use nanoseek::autograd::Tape;
use nanoseek::device::Device;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::rng::Rng;
use nanoseek::train::{metrics, train, RunConfig, TrainRequest, TrainSettings};

/// Two layers, the first DSA ("SD"): each query keeps its 2 best keys plus the most recent one.
fn small_dsa() -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn_hidden: 24,
        max_seq_len: 8,
        attn_pattern: "SD".into(),
        index_n_heads: 2,
        index_head_dim: 4,
        index_topk: 2,
        index_local_window: 1,
        ..ModelConfig::preset("tiny").unwrap()
    }
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
    model
}

/// (LM loss, indexer KL) of one forward.
fn losses(model: &Model, ids: &[u32], targets: &[i32]) -> (f64, f64) {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, 2, 8).unwrap();
    (tape.value(l)[0] as f64, tape.aux_loss_total())
}

/// Analytic gradients of LM + KL (the indexer's input is detached, so LM parameters get only
/// LM gradients and indexer parameters only KL gradients).
fn gradients(model: &Model, ids: &[u32], targets: &[i32], with_kl: bool) -> Vec<Option<Vec<f32>>> {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, 2, 8).unwrap();
    if with_kl {
        tape.backward(l, 1.0).unwrap();
    } else {
        tape.backward_without_aux(l, 1.0).unwrap();
    }
    pv.iter().map(|&v| tape.grad(v).map(<[f32]>::to_vec)).collect()
}

fn fd_check(model: &mut Model, pi: usize, grad: &[f32], of: &dyn Fn(&Model) -> f64, r: &mut Rng) -> f64 {
    let eps = common::EPS;
    let mut worst = 0.0f64;
    for _ in 0..8 {
        let j = r.below(model.params[pi].tensor.numel());
        let orig = model.params[pi].tensor.data[j];
        model.params[pi].tensor.data[j] = orig + eps;
        let lp = of(model);
        model.params[pi].tensor.data[j] = orig - eps;
        let lm = of(model);
        model.params[pi].tensor.data[j] = orig;
        let (fd, an) = ((lp - lm) / (2.0 * eps as f64), grad[j] as f64);
        let bound = common::RTOL * an.abs().max(fd.abs()) + common::ATOL;
        assert!((an - fd).abs() <= bound, "{} [{j}]: analytic {an:.6} vs fd {fd:.6}", model.params[pi].name);
        worst = worst.max((an - fd).abs() / bound);
    }
    worst
}

/// LM-loss gradients through the sparse attention by finite differences, for every parameter
/// from the DSA layer's attention on (the selection reads the detached block input, which these
/// parameters do not change, so it stays fixed under the perturbations).
#[test]
fn sparse_model_lm_gradients_match_finite_differences() {
    let cfg = small_dsa();
    let mut model = randomized(&cfg, 2);
    let (ids, targets) = batch(cfg.vocab_size, 16, 3);
    let grads = gradients(&model, &ids, &targets, true);
    let mut r = Rng::new(4);
    let mut worst = 0.0f64;
    for (pi, grad) in grads.iter().enumerate() {
        let name = model.params[pi].name.clone();
        if name == "wte.weight" || name.contains("indexer") {
            continue;
        }
        let g = grad.clone().unwrap_or_else(|| panic!("{name} gets no gradient"));
        worst = worst.max(fd_check(&mut model, pi, &g, &|m| losses(m, &ids, &targets).0, &mut r));
    }
    println!("DSA model, LM loss: worst error / bound = {worst:.3}");
}

/// The indexer learns only from its KL loss: the LM loss gives its weights no gradient, and the
/// KL's gradient matches finite differences (checked in the dense warm-up, where the KL runs
/// over every earlier key and is smooth in the indexer weights).
#[test]
fn indexer_learns_only_from_its_kl_loss() {
    let cfg = small_dsa();
    let mut model = randomized(&cfg, 5);
    let (ids, targets) = batch(cfg.vocab_size, 16, 6);
    let lm_only = gradients(&model, &ids, &targets, false);
    for (p, g) in model.params.iter().zip(&lm_only) {
        if p.name.contains("indexer") {
            assert!(g.as_ref().is_none_or(|g| g.iter().all(|&x| x == 0.0)), "{} gets an LM gradient", p.name);
        }
    }
    model.dsa_dense_warmup = true;
    let grads = gradients(&model, &ids, &targets, true);
    let mut r = Rng::new(7);
    for (pi, grad) in grads.iter().enumerate() {
        if model.params[pi].name.contains("indexer") {
            let g = grad.clone().expect("the KL reaches the indexer");
            assert!(g.iter().any(|&x| x != 0.0));
            fd_check(&mut model, pi, &g, &|m| losses(m, &ids, &targets).1, &mut r);
        }
    }
}

/// With index_topk ≥ T the DSA layer is dense causal attention; so is the warm-up.
#[test]
fn full_topk_and_warmup_equal_the_dense_model() {
    let (ids, targets) = batch(17, 16, 8);
    let dense_cfg = ModelConfig { attn_pattern: "D".into(), ..small_dsa() };
    let dense = randomized(&dense_cfg, 9);
    let with = |cfg: &ModelConfig| {
        let mut m = Model::new(cfg, 1).unwrap();
        for p in &mut m.params {
            if let Some(src) = dense.param(&p.name) {
                p.tensor.data.copy_from_slice(&src.data);
            }
        }
        m
    };
    let reference = losses(&dense, &ids, &targets).0;
    let full = with(&ModelConfig { index_topk: 8, index_local_window: 0, ..small_dsa() });
    let (l, kl) = losses(&full, &ids, &targets);
    // Same math, different summation order (gathered rows): 1e-5 relative.
    assert!((l - reference).abs() <= 1e-5 * reference, "topk ≥ T: {l} vs dense {reference}");
    assert!(kl.is_finite() && kl >= -1e-6, "KL ≥ 0, got {kl}");
    let mut warm = with(&small_dsa());
    warm.dsa_dense_warmup = true;
    assert_eq!(losses(&warm, &ids, &targets).0.to_bits(), reference.to_bits(), "warm-up is dense attention");
    warm.dsa_dense_warmup = false;
    assert_ne!(losses(&warm, &ids, &targets).0, reference, "top-2 + 1 of 8 keys is not dense");
}

/// A short run: the indexer loss is logged every step and falls while the LM trains, across the
/// switch from the dense warm-up to sparse attention.
#[test]
fn training_logs_a_falling_indexer_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (2, 64, 2, 1, 32, 192, 64);
    (m.attn_pattern, m.index_topk, m.index_n_heads, m.index_head_dim, m.dsa_warmup_steps) =
        ("SD".into(), 16, 2, 16, 10);
    let mut t = TrainSettings::for_model(&m);
    (t.device_batch_size, t.total_batch_size, t.num_iterations) = (4, 4 * 64, 40);
    (t.save_every, t.eval_every, t.eval_batches) = (0, 0, 1);
    let req = TrainRequest {
        run: RunConfig { model: m, train: t },
        run_dir: dir.path().to_path_buf(),
        resume_from_step: None,
        device: Device::Cpu,
        verbose: false,
        sample_tokens: 0,
    };
    let s = train(req).unwrap();
    let recs = metrics::read(&dir.path().join("metrics.jsonl")).unwrap();
    let kl: Vec<f64> = recs.iter().filter_map(|r| r["indexer_loss"].as_f64()).collect();
    let warm: Vec<bool> = recs.iter().filter_map(|r| r["dsa_dense_warmup"].as_bool()).collect();
    assert_eq!(kl.len(), 40);
    assert_eq!(warm.iter().filter(|&&w| w).count(), 10, "the first 10 steps are the dense warm-up");
    let (early, late) = (kl[..5].iter().sum::<f64>() / 5.0, kl[35..].iter().sum::<f64>() / 5.0);
    println!("indexer KL {early:.4} → {late:.4}; LM loss {:.3} → {:.3}", s.losses[0].1, s.losses[39].1);
    assert!(late < early, "the indexer should learn: KL {early} → {late}");
    assert!(s.losses[39].1 < s.losses[0].1 - 1.0);
}
