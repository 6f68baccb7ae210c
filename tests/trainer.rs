//! The trainer and the tape's fused ops on the CPU.
//!
//! - The fused ops the blocks use (`linear_residual`, `swiglu_ffn`, `qk_norm_rope`) give bitwise the values
//!   and gradients of the unfused ops they replace (the product, then the add or the SwiGLU): the
//!   CPU twins run the same f32 arithmetic, which is what keeps CPU training bitwise equal to the
//!   design before the one-statement redesign (`scripts/compare-heads.sh` shows it end to end).
//! - Gradient accumulation over micro-batches: two micro-batches with seed ½ each equal, bit for
//!   bit, the half-sum of their separate gradients (f32 adds of two terms do not depend on order).
//! - The CUDA shape rules are named in their errors.

mod common;

use common::{cpu_ops, randn};
use nanoseek::autograd::{Tape, Var};
use nanoseek::backend::{check_cuda_shapes, RopeKind};
use nanoseek::data::Batch;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::Trainer;

/// Values and leaf gradients (as bits) of `build` on a fresh tape, objective Σ out ∘ w.
fn bits(inputs: &[nanoseek::Tensor], build: common::Build) -> (Vec<u32>, Vec<Vec<u32>>) {
    let ops = cpu_ops();
    let mut tape = Tape::new(&ops);
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let out = build(&mut tape, &vars).unwrap();
    let value: Vec<u32> = tape.value(out).iter().map(|x| x.to_bits()).collect();
    let w = randn(&[value.len()], 5);
    let obj = tape.weighted_sum(out, &w.data).unwrap();
    tape.backward(obj, 1.0).unwrap();
    let grads = vars.iter().map(|&v| tape.grad(v).unwrap().iter().map(|x| x.to_bits()).collect()).collect();
    (value, grads)
}

#[test]
fn fused_ops_equal_the_unfused_ones_bitwise() {
    let (x, w, r) = (randn(&[6, 16], 1), randn(&[12, 16], 2), randn(&[6, 12], 3));
    let inputs = [x, w, r];
    let fused = bits(&inputs, &|t, v| t.linear_residual(v[0], v[1], v[2]));
    let plain = bits(&inputs, &|t, v| {
        let y = t.linear(v[0], v[1])?;
        t.add(v[2], y)
    });
    assert!(fused == plain, "linear_residual differs from linear + add");
    // the dense FFN after its gate: resid + swiglu(g, h·w_upᵀ)·w_downᵀ
    let ffn = [randn(&[6, 16], 5), randn(&[6, 12], 6), randn(&[12, 16], 7), randn(&[16, 12], 8), randn(&[6, 16], 9)];
    let fused = bits(&ffn, &|t, v| t.swiglu_ffn(v[0], v[1], v[2], v[3], v[4]));
    let plain = bits(&ffn, &|t, v| {
        let u = t.linear(v[0], v[2])?;
        let a = t.swiglu(v[1], u)?;
        let y = t.linear(a, v[3])?;
        t.add(v[4], y)
    });
    assert!(fused == plain, "swiglu_ffn differs from linear + swiglu + linear + add");
    // QK-norm + RoPE of q or k: [b 2, t 5, h 3, d 8]
    let x = [randn(&[2, 5, 3, 8], 4)];
    let fused = bits(&x, &|t, v| t.qk_norm_rope(v[0], (2, 5, 3)));
    let plain = bits(&x, &|t, v| {
        let n = t.rmsnorm(v[0], 8)?;
        t.rope(n, (2, 5, 3), RopeKind::Attention)
    });
    assert!(fused == plain, "qk_norm_rope differs from rmsnorm + rope");
}

fn small_config(pattern: &str, moe: bool) -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) = (96, 3, 64, 4, 2, 16);
    (c.ffn_hidden, c.max_seq_len, c.logit_softcap) = (160, 16, 15.0);
    c.attn_pattern = pattern.into();
    (c.dsa_window_size, c.n_global) = (4, 1);
    (c.index_n_heads, c.index_head_dim, c.index_topk, c.index_local_window) = (2, 8, 4, 2);
    if moe {
        (c.moe.n_routed_experts, c.moe.top_k, c.moe.n_shared_experts, c.moe.moe_inter_dim) = (4, 2, 1, 32);
        (c.moe.first_k_dense, c.moe.seq_aux_alpha) = (1, 1e-2);
    }
    c
}

fn batch(c: &ModelConfig, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let n = 2 * c.max_seq_len;
    let ids = (0..n).map(|_| rng.below(c.vocab_size) as u32).collect();
    let targets = (0..n).map(|i| if i % 11 == 3 { -1 } else { rng.below(c.vocab_size) as i32 }).collect();
    Batch { ids, targets }
}

/// Gradients of the micro-batches `seeds` accumulated on one trainer, each with seed `s`.
fn accumulated(c: &ModelConfig, seeds: &[u64], s: f32) -> Vec<Vec<f32>> {
    let mut m = Model::new(c, 3).unwrap();
    // non-zero output projections, so every parameter gets a gradient
    let mut rng = Rng::new(11);
    for p in m.params.iter_mut().filter(|p| p.name.contains("c_proj") || p.name.contains("w_down")) {
        p.tensor.data.iter_mut().for_each(|v| *v = 0.05 * rng.normal() as f32);
    }
    let mut opt = Optimizer::new(&m, OptimConfig::default());
    let mut tr = Trainer::new(m.cpu().clone(), &mut m, &mut opt).unwrap();
    tr.zero_grads().unwrap();
    for &seed in seeds {
        let b = batch(c, seed);
        tr.forward_backward(&m, &b.ids, &b.targets, (2, c.max_seq_len), s, false).unwrap();
    }
    tr.grads_to_host().unwrap().into_iter().map(|(_, g)| g).collect()
}

#[test]
fn micro_batch_gradients_accumulate_in_place() {
    for (pattern, moe) in [("D", false), ("WSD", true)] {
        let c = small_config(pattern, moe);
        let both = accumulated(&c, &[1, 2], 0.5);
        let (a, b) = (accumulated(&c, &[1], 0.5), accumulated(&c, &[2], 0.5));
        for ((g, x), y) in both.iter().zip(&a).zip(&b) {
            let sum: Vec<f32> = x.iter().zip(y).map(|(p, q)| p + q).collect();
            assert!(g.iter().zip(&sum).all(|(p, q)| p.to_bits() == q.to_bits()), "{pattern}: accumulation differs");
        }
        assert!(both.iter().all(|g| g.iter().any(|&v| v != 0.0)), "{pattern}: every parameter gets a gradient");
    }
}

#[test]
fn cuda_shape_rules_are_named() {
    let c = small_config("D", false);
    assert!(check_cuda_shapes(&c).unwrap_err().to_string().contains("head_dim 64 or 128"));
    let mut c = small_config("D", true);
    c.head_dim = 64;
    c.n_embd = 256;
    let e = check_cuda_shapes(&c).unwrap_err().to_string();
    assert!(e.contains("n_routed_experts"), "{e}");
    c.moe.n_routed_experts = 8;
    assert!(check_cuda_shapes(&c).is_ok());
    let mut c = small_config("SD", false);
    (c.head_dim, c.index_n_heads, c.dsa_warmup_steps) = (64, 8, 10);
    c.index_head_dim = 16;
    // the dense warm-up has its CUDA kernel (the dense indexer KL): no longer a rule
    assert!(check_cuda_shapes(&c).is_ok());
}
