//! Multi-token prediction (`nn::mtp`): the new tape ops and whole models with MTP modules against
//! finite differences, λ = 0 training the model bitwise as without MTP, the targets each depth
//! predicts, checkpoints and resume, the metrics each depth logs.

mod common;

use common::{check_gradients, randn};
use nanoseek::autograd::Tape;
use nanoseek::device::Device;
use nanoseek::nn::mtp::shifted;
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::rng::Rng;
use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};
use std::path::Path;

fn small(depth: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn_hidden: 24,
        max_seq_len: 8,
        mtp_depth: depth,
        mtp_lambda: 0.5,
        ..ModelConfig::preset("tiny").unwrap()
    }
}

fn batch(vocab: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..n).map(|_| r.below(vocab) as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| r.below(vocab) as i32).collect();
    (ids, targets)
}

/// The training objective: the model's loss plus the auxiliary losses (λ/D-weighted MTP
/// cross-entropies, balance losses).
fn objective(model: &Model, ids: &[u32], targets: &[i32], b: usize, t: usize) -> f64 {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, b, t).unwrap();
    tape.value(l)[0] as f64 + tape.aux_loss_total()
}

#[test]
fn concat_and_weighted_cross_entropy_match_finite_differences() {
    check_gradients("concat_cols", &[randn(&[3, 4], 1), randn(&[3, 5], 2)], 40, &|t, v| {
        let c = t.concat_cols(v[0], v[1])?;
        t.scale(c, 1.5)
    });
    // a weighted cross-entropy: its value and gradient are the weight times the plain one's
    let (x, w) = (randn(&[4, 6], 3), randn(&[7, 6], 4));
    let targets = [3, -1, 0, 5];
    let grads = |weight: Option<f32>| {
        let ops = common::cpu_ops();
        let mut tape = Tape::new(&ops);
        let (xv, wv) = (tape.leaf(x.clone()), tape.leaf(w.clone()));
        let z = tape.linear(xv, wv).unwrap();
        let (l, n) = match weight {
            Some(s) => {
                let (l, n, mean) = tape.cross_entropy_weighted(z, &targets, 15.0, s).unwrap();
                assert_eq!(tape.value(l)[0], s * mean);
                (l, n)
            }
            None => tape.cross_entropy(z, &targets, 15.0).unwrap(),
        };
        assert_eq!(n, 3);
        let v = tape.value(l)[0];
        tape.backward(l, 1.0).unwrap();
        (v, tape.grad(xv).unwrap().to_vec(), tape.grad(wv).unwrap().to_vec())
    };
    let (plain, quarter) = (grads(None), grads(Some(0.25)));
    assert_eq!(quarter.0, 0.25 * plain.0);
    for (a, b) in plain.1.iter().chain(&plain.2).zip(quarter.1.iter().chain(&quarter.2)) {
        assert!((0.25 * a - b).abs() <= 1e-6 * a.abs() + 1e-9, "{a} vs {b}");
    }
}

/// Every parameter of a model with MTP (the modules' projections and blocks included) against
/// central finite differences of the whole objective; zero-initialized matrices are randomized
/// first so every path is active.
fn gradcheck(cfg: ModelConfig) {
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut r = Rng::new(2);
    for p in &mut model.params {
        for x in &mut p.tensor.data {
            *x = r.normal() as f32 * 0.5;
        }
    }
    let (b, t) = (2, cfg.max_seq_len);
    let (ids, targets) = batch(cfg.vocab_size, b * t, 3);
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, &ids, &targets, b, t).unwrap();
    assert!(tape.aux_loss_total() > 0.0, "the MTP losses join the objective");
    tape.backward(l, 1.0).unwrap();
    let grads: Vec<Vec<f32>> =
        pv.iter().map(|&v| tape.grad(v).expect("every parameter has a gradient").to_vec()).collect();
    drop(tape);
    assert!(model.params.iter().any(|p| p.name.starts_with(&format!("mtp.{}.", cfg.mtp_depth))));
    let eps = common::EPS;
    let mut worst = 0.0f64;
    for (pi, grad) in grads.iter().enumerate() {
        for _ in 0..4 {
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
            assert!((an - fd).abs() <= bound, "{} [{j}]: analytic {an:.6} vs fd {fd:.6}", model.params[pi].name);
        }
    }
    println!("MTP depth {} pattern {}: worst error / bound = {worst:.3}", cfg.mtp_depth, cfg.attn_pattern);
}

#[test]
fn models_with_mtp_match_finite_differences() {
    gradcheck(small(1));
    // depth 2; the modules' blocks continue the pattern: layer 2 window, layer 3 dense
    gradcheck(ModelConfig { attn_pattern: "WD".into(), dsa_window_size: 3, n_global: 1, ..small(2) });
    // MoE everywhere after the first layer, the modules' blocks included, with the balance loss
    let moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 8, seq_aux_alpha: 0.1, ..MoeConfig::default() };
    gradcheck(ModelConfig { moe, ..small(2) });
}

#[test]
fn each_depth_predicts_further_ahead() {
    let ids: Vec<u32> = (0..8).collect();
    let targets: Vec<i32> = (1..9).collect();
    let (sid, stg) = shifted(&ids, &targets, (2, 4), 2);
    // row i of each sequence: the token i + 2 and its target (token i + 3); no target past the end
    assert_eq!(sid, [2, 3, 3, 3, 6, 7, 7, 7]);
    assert_eq!(stg, [3, 4, -1, -1, 7, 8, -1, -1]);
    let bad = ModelConfig { mtp_depth: 7, ..small(0) }.validate().unwrap_err().to_string();
    assert!(bad.contains("mtp_depth"), "{bad}");
    let bad = ModelConfig { mtp_lambda: f32::NAN, ..small(1) }.validate().unwrap_err().to_string();
    assert!(bad.contains("mtp_lambda"), "{bad}");
}

#[test]
fn parameters_are_counted_and_named() {
    let cfg = ModelConfig { attn_pattern: "DS".into(), index_topk: 4, ..small(2) };
    let model = Model::new(&cfg, 1).unwrap();
    assert_eq!(model.num_params(), cfg.num_params());
    let mtp: usize = model.params.iter().filter(|p| p.name.starts_with("mtp.")).map(|p| p.tensor.numel()).sum();
    assert_eq!(mtp, cfg.mtp_params().0);
    // module 2's block is layer 3 of the pattern "DS": a DSA block with its indexer
    assert!(model.param("mtp.2.block.attn.indexer.wq.weight").is_some());
    assert!(model.param("mtp.1.block.attn.indexer.wq.weight").is_none());
    assert_eq!(model.param("mtp.1.proj.weight").unwrap().shape, [16, 32]);
    // the model's own parameters are drawn first: the same as without MTP
    let plain = Model::new(&ModelConfig { mtp_depth: 0, ..cfg.clone() }, 1).unwrap();
    for p in &plain.params {
        assert_eq!(model.param(&p.name).unwrap().data, p.tensor.data, "{}", p.name);
    }
}

fn micro(depth: usize, lambda: f32, pattern: &str, moe: bool) -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (2, 32, 2, 1, 16, 64, 16);
    m.attn_pattern = pattern.into();
    (m.dsa_window_size, m.n_global, m.index_topk, m.index_n_heads, m.index_head_dim) = (4, 1, 4, 2, 8);
    if moe {
        m.moe =
            MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, first_k_dense: 1, ..MoeConfig::default() };
    }
    (m.mtp_depth, m.mtp_lambda) = (depth, lambda);
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

fn final_weights(dir: &Path, cfg: &ModelConfig, steps: u64) -> Model {
    train::checkpoint::load_model(&train::checkpoint::checkpoint_dir(dir, steps), cfg).unwrap()
}

/// With λ = 0 the modules run (and log their losses) but send nothing into the model: its losses
/// and weights are bitwise those of the run without MTP, for dense, window, DSA and MoE layers
/// (gradient accumulation over two micro-batches included).
#[test]
fn lambda_zero_trains_the_model_bitwise_as_without_mtp() {
    for (pattern, moe) in [("D", false), ("WD", false), ("SD", false), ("D", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let (plain, with) = (tmp.path().join("plain"), tmp.path().join("mtp"));
        let a = train::train(request(micro(0, 0.3, pattern, moe), 6, &plain)).unwrap();
        let b = train::train(request(micro(2, 0.0, pattern, moe), 6, &with)).unwrap();
        let bits = |s: &train::TrainSummary| s.losses.iter().map(|(_, l)| l.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{pattern} moe {moe}: losses differ");
        let (ma, mb) = (
            final_weights(&plain, &micro(0, 0.3, pattern, moe), 6),
            final_weights(&with, &micro(2, 0.0, pattern, moe), 6),
        );
        for p in &ma.params {
            let q = mb.param(&p.name).unwrap();
            assert!(p.tensor.data.iter().zip(&q.data).all(|(x, y)| x == y), "{pattern} moe {moe}: {} differs", p.name);
        }
        let recs = train::metrics::read(&with.join("metrics.jsonl")).unwrap();
        let logged = recs.iter().filter(|r| r["mtp_loss_2"].is_number()).count();
        assert_eq!(logged, 6, "each step logs each depth's loss");
    }
}

/// MTP with λ > 0: both depths' losses fall, the run resumes bitwise, the report and the plot
/// name the depths.
#[test]
fn mtp_trains_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let cfg = micro(2, 0.3, "WD", true);
    let a = train::train(request(cfg.clone(), 6, &full)).unwrap();
    let (src, dst) = (train::checkpoint::checkpoint_dir(&full, 3), train::checkpoint::checkpoint_dir(&part, 3));
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optim.safetensors", "state.json", "checksums.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut resumed = request(cfg.clone(), 6, &part);
    resumed.resume_from_step = Some(3);
    let b = train::train(resumed).unwrap();
    let bits = |l: &[(u64, f32)]| l.iter().map(|&(s, v)| (s, v.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses[3..]), bits(&b.losses), "resume continues bitwise");
    let wa = std::fs::read(train::checkpoint::checkpoint_dir(&full, 6).join("model.safetensors")).unwrap();
    let wb = std::fs::read(train::checkpoint::checkpoint_dir(&part, 6).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights (MTP modules and their routing biases included) are bitwise equal");
    let recs = train::metrics::read(&full.join("metrics.jsonl")).unwrap();
    let depth1: Vec<f64> = recs.iter().filter_map(|r| r["mtp_loss_1"].as_f64()).collect();
    assert_eq!(depth1.len(), 6);
    let report = nanoseek::report::render(&full).unwrap();
    assert!(report.contains("MTP depth 2 loss"), "{report}");
    let svg = std::fs::read_to_string(full.join("loss.svg")).unwrap();
    assert!(svg.contains("MTP depth 1 loss"));
    // the TensorBoard event files carry each depth's loss as a scalar of its own
    let events: Vec<u8> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents"))
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    for tag in ["train/mtp_loss_1", "train/mtp_loss_2"] {
        assert!(events.windows(tag.len()).any(|w| w == tag.as_bytes()), "no {tag} in the event files");
    }
}

/// Activation checkpointing recomputes the modules' blocks too: loss, aux losses and every
/// gradient bitwise equal to the plain backward, for every recompute period.
#[test]
fn checkpointed_mtp_equals_plain_bitwise() {
    let moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 8, seq_aux_alpha: 0.1, ..MoeConfig::default() };
    let cfg = ModelConfig { attn_pattern: "WD".into(), dsa_window_size: 3, n_global: 1, moe, ..small(2) };
    let mut model = Model::new(&cfg, 1).unwrap();
    let mut r = Rng::new(9);
    model.params.iter_mut().flat_map(|p| p.tensor.data.iter_mut()).for_each(|x| *x = r.normal() as f32 * 0.3);
    let (ids, targets) = batch(cfg.vocab_size, 2 * cfg.max_seq_len, 4);
    let mut run = |every: usize| {
        model.checkpoint_every = every;
        let mut tape = Tape::new(model.cpu());
        let pv = model.params_on(&mut tape);
        let l = model.loss(&mut tape, &pv, &ids, &targets, 2, cfg.max_seq_len).unwrap();
        let aux = tape.aux_loss_total().to_bits();
        tape.backward(l, 1.0).unwrap();
        let grads: Vec<Vec<u32>> =
            pv.iter().map(|&v| tape.grad(v).unwrap().iter().map(|x| x.to_bits()).collect()).collect();
        (tape.value(l)[0].to_bits(), aux, grads)
    };
    let plain = run(0);
    for every in [1, 2, 3] {
        assert!(run(every) == plain, "checkpoint every {every} differs from plain");
    }
}
