//! Activation checkpointing and memory accounting.

use nanoseek::autograd::Tape;
use nanoseek::data::Batch;
use nanoseek::info::predict_training_bytes;
use nanoseek::memory::{self, mib};
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::train_step;

fn config() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden, c.max_seq_len) = (3, 64, 4, 2, 16, 128, 32);
    c
}

fn batch(c: &ModelConfig, rows: usize, seed: u64) -> Batch {
    let mut r = Rng::new(seed);
    let n = rows * c.max_seq_len;
    Batch {
        ids: (0..n).map(|_| r.below(c.vocab_size) as u32).collect(),
        targets: (0..n).map(|_| r.below(c.vocab_size) as i32).collect(),
    }
}

/// Loss bits and every parameter gradient's bits, with blocks checkpointed every `every`.
fn loss_and_grads(model: &mut Model, every: usize, b: &Batch) -> (u32, Vec<Vec<u32>>) {
    model.checkpoint_every = every;
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, &b.ids, &b.targets, 2, model.config.max_seq_len).unwrap();
    tape.backward(l, 1.0).unwrap();
    let grads = pv.iter().map(|&v| tape.grad(v).unwrap().iter().map(|x| x.to_bits()).collect()).collect();
    (tape.value(l)[0].to_bits(), grads)
}

#[test]
fn checkpointed_and_plain_give_bitwise_equal_losses_and_gradients() {
    let c = config();
    let mut model = Model::new(&c, 1).unwrap();
    let mut r = Rng::new(9); // randomize the zero-initialized projections so every path matters
    model.params.iter_mut().flat_map(|p| p.tensor.data.iter_mut()).for_each(|x| *x = r.normal() as f32 * 0.3);
    let b = batch(&c, 2, 3);
    let plain = loss_and_grads(&mut model, 0, &b);
    for every in [1, 2, 3] {
        assert!(loss_and_grads(&mut model, every, &b) == plain, "checkpoint every {every} differs from plain");
    }
}

#[test]
fn checkpointed_training_matches_plain_training_bitwise() {
    let c = config();
    let run = |every: usize| {
        let mut model = Model::new(&c, 5).unwrap();
        model.checkpoint_every = every;
        let mut opt = Optimizer::new(&model, OptimConfig::default());
        (0..4)
            .map(|s| {
                let mut k = 0;
                let st = train_step(
                    &mut model,
                    &mut opt,
                    || {
                        k += 1;
                        batch(&c, 2, 100 * s + k)
                    },
                    2,
                    1.0,
                    1.0,
                    false,
                )
                .unwrap();
                (st.loss.to_bits(), st.grad_norm.to_bits())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(0), run(1));
}

#[test]
fn accounting_returns_to_its_baseline_after_a_step() {
    let c = config();
    let base = memory::report().current;
    {
        let mut model = Model::new(&c, 1).unwrap();
        let mut opt = Optimizer::new(&model, OptimConfig::default());
        let with_model = memory::report().current;
        for every in [0, 1] {
            model.checkpoint_every = every;
            train_step(&mut model, &mut opt, || batch(&c, 2, 7), 1, 1.0, 1.0, false).unwrap();
            assert_eq!(memory::report().current, with_model, "a step must release everything it allocated");
            let peak = memory::report().peak;
            assert!(
                peak[3] > 0 && peak[4] > 0 && peak[1] > 0,
                "activations, workspace and gradients were counted: {peak:?}"
            );
        }
    }
    assert_eq!(memory::report().current, base, "dropping model and optimizer returns to the baseline");
}

/// Measured peak of one training step against `nanoseek info`'s prediction.
fn measured_vs_predicted(c: &ModelConfig, rows: usize, every: usize) -> (usize, usize) {
    let mut model = Model::new(c, 1).unwrap();
    model.checkpoint_every = every;
    // One Newton–Schulz iteration instead of five: same memory, a much shorter update for `small`.
    let mut opt = Optimizer::new(&model, OptimConfig { ns_steps: 1, ..OptimConfig::default() });
    train_step(&mut model, &mut opt, || batch(c, rows, 1), 1, 1.0, 1.0, false).unwrap();
    let measured = memory::report().peak_total;
    let predicted: usize = predict_training_bytes(c, rows, c.max_seq_len, every).iter().sum();
    (measured, predicted)
}

#[test]
fn info_predicts_the_measured_peak_within_ten_percent() {
    let mut cases = Vec::new();
    for (preset, seqs, rows) in [("tiny", [128, 256], 8), ("small", [64, 128], 1)] {
        for seq in seqs {
            for every in [0, 1] {
                let mut c = ModelConfig::preset(preset).unwrap();
                c.max_seq_len = seq;
                cases.push((preset, seq, rows, every, c));
            }
        }
    }
    for every in [0, 1] {
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.max_seq_len = 128;
        c.moe = MoeConfig { n_routed_experts: 8, top_k: 2, moe_inter_dim: 176, ..MoeConfig::default() };
        cases.push(("tiny+moe", 128, 8, every, c));
    }
    for every in [0, 1] {
        // two MTP modules (their blocks dense, then MoE)
        let mut c = ModelConfig::preset("tiny").unwrap();
        (c.max_seq_len, c.mtp_depth, c.n_layer) = (128, 2, 3);
        c.moe =
            MoeConfig { n_routed_experts: 8, top_k: 2, moe_inter_dim: 176, first_k_dense: 4, ..MoeConfig::default() };
        cases.push(("tiny+mtp2", 128, 8, every, c));
    }
    for (every, rq) in [(0, 0), (1, 0), (0, 96)] {
        // MLA (tiny's width, V3's proportions scaled down), dense FFNs; a query latent in one case
        let mut c = ModelConfig::preset("tiny").unwrap();
        (c.max_seq_len, c.attention, c.q_lora_rank) = (128, "mla".into(), rq);
        (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) = (128, 64, 32, 64);
        cases.push(("tiny+mla", 128, 8, every, c));
    }
    for (preset, seq, rows, every, c) in cases {
        let (m, p) = measured_vs_predicted(&c, rows, every);
        let err = (p as f64 - m as f64) / m as f64;
        println!(
            "{preset} seq {seq} batch {rows} ckpt {every}: measured {:.1} MiB, predicted {:.1} MiB ({:+.1}%)",
            mib(m),
            mib(p),
            err * 100.0
        );
        assert!(err.abs() <= 0.10, "{preset} seq {seq} ckpt {every}: prediction off by {:.1}%", err * 100.0);
    }
}

#[test]
fn info_predicts_the_measured_peak_of_dsa_layers_within_ten_percent() {
    let mut c = ModelConfig::preset("tiny").unwrap();
    (c.max_seq_len, c.attn_pattern, c.index_topk) = (128, "SSD".into(), 32);
    // and the v32 indexer on MLA with a query latent (its query reads the latent)
    let mut v32 = c.clone();
    (v32.attention, v32.indexer, v32.q_lora_rank) = ("mla".into(), "v32".into(), 96);
    (v32.kv_lora_rank, v32.qk_nope_head_dim, v32.qk_rope_head_dim, v32.v_head_dim) = (128, 64, 32, 64);
    for (name, c) in [("tiny SSD", c), ("tiny+mla SSD v32", v32)] {
        let (m, p) = measured_vs_predicted(&c, 8, 0);
        let err = (p as f64 - m as f64) / m as f64;
        println!(
            "{name} seq 128 batch 8: measured {:.1} MiB, predicted {:.1} MiB ({:+.1}%)",
            mib(m),
            mib(p),
            err * 100.0
        );
        assert!(err.abs() <= 0.10, "{name}: DSA prediction off by {:.1}%", err * 100.0);
    }
}
