//! Shared test helpers: random tensors, central finite differences, small-model flags.
#![allow(dead_code)]

use nanoseek::autograd::{Tape, Var};
use nanoseek::backend::CpuOps;
use nanoseek::rng::Rng;
use nanoseek::Tensor;

/// The command-line flags the small models of the binary's tests share: 32 wide, 2 heads, a
/// 32-token context, 2 sequences a step. Each test adds `--n-layer` and its own flags.
pub const SMALL_MODEL_FLAGS: &[&str] =
    &["--n-embd", "32", "--n-head", "2", "--max-seq-len", "32", "--device-batch-size", "2"];

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed))
}

/// Finite-difference tolerance for f32 kernels, stated once for every check:
/// step EPS = 1e-2 (central differences, truncation error O(EPS²)), and an
/// analytic gradient g passes against the estimate f when
/// |g − f| ≤ RTOL·max(|g|, |f|) + ATOL.
pub const EPS: f32 = 1e-2;
pub const RTOL: f64 = 2e-2;
pub const ATOL: f64 = 2e-3;

/// Checks d(objective)/d(inputs[i]) at up to `samples` coordinates of each input.
/// `build` puts the computation on a tape from the input leaves and returns a
/// non-scalar output; the objective is Σ out ∘ w for a fixed random w, evaluated in f64.
/// A computation on a CPU tape from its input leaves.
pub type Build<'a> = &'a dyn for<'p> Fn(&mut Tape<'p, CpuOps>, &[Var]) -> anyhow::Result<Var>;

/// The CPU backend of the checks: RoPE tables of head dim 8 (attention and indexer) up to 64
/// positions.
pub fn cpu_ops() -> CpuOps {
    CpuOps::with_tables(8, 8, 64, 10_000.0)
}

pub fn check_gradients(name: &str, inputs: &[Tensor], samples: usize, build: Build) {
    let ops = cpu_ops();
    let probe = |inputs: &[Tensor]| -> (f64, usize) {
        let mut tape = Tape::new(&ops);
        let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
        let out = build(&mut tape, &vars).unwrap();
        let w = randn(&[tape.value(out).len()], 999);
        (tape.value(out).iter().zip(&w.data).map(|(&a, &b)| a as f64 * b as f64).sum(), tape.value(out).len())
    };
    // analytic gradients
    let mut tape = Tape::new(&ops);
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let out = build(&mut tape, &vars).unwrap();
    let w = randn(&[tape.value(out).len()], 999);
    let obj = tape.weighted_sum(out, &w.data).unwrap();
    tape.backward(obj, 1.0).unwrap();
    let mut rng = Rng::new(5);
    let mut worst = 0.0f64;
    for (i, x) in inputs.iter().enumerate() {
        let g = tape.grad(vars[i]).unwrap_or_else(|| panic!("{name}: input {i} got no gradient")).to_vec();
        let coords: Vec<usize> = if x.numel() <= samples {
            (0..x.numel()).collect()
        } else {
            (0..samples).map(|_| rng.below(x.numel())).collect()
        };
        for j in coords {
            let mut plus = inputs.to_vec();
            plus[i].data[j] += EPS;
            let mut minus = inputs.to_vec();
            minus[i].data[j] -= EPS;
            let fd = (probe(&plus).0 - probe(&minus).0) / (2.0 * EPS as f64);
            let an = g[j] as f64;
            let err = (an - fd).abs();
            let bound = RTOL * an.abs().max(fd.abs()) + ATOL;
            worst = worst.max(err / bound);
            assert!(err <= bound, "{name}: input {i} coord {j}: analytic {an:.6} vs finite difference {fd:.6}");
        }
    }
    println!("{name}: gradients match finite differences (worst error / bound = {worst:.3})");
}
