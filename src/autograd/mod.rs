//! A thin reverse-mode tape over coarse, fused ops.
//!
//! Every op computes its forward with a CPU kernel, stores the output as a new
//! variable and records what its backward needs (`ops::Op`). `backward` walks
//! the records in reverse, calling the matching backward kernels and summing
//! gradients into each input. Kernels know nothing about the tape.
//!
//! Parameters enter the tape by reference (`Tape::param`), so a forward pass
//! never copies weights; their gradients are read back with `Tape::grad`.

mod ops;

pub use ops::Op;

use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

/// Wall time spent per op kind, forward and backward (when profiling is on).
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    /// op name → (forward seconds, backward seconds, calls)
    pub by_op: BTreeMap<&'static str, (f64, f64, usize)>,
}

/// A handle to a value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(pub(crate) usize);

enum Value<'p> {
    Borrowed(&'p [f32]),
    Owned(Vec<f32>),
}

impl Value<'_> {
    fn as_slice(&self) -> &[f32] {
        match self {
            Value::Borrowed(s) => s,
            Value::Owned(v) => v,
        }
    }
}

pub struct Tape<'p> {
    values: Vec<Value<'p>>,
    shapes: Vec<Vec<usize>>,
    ops: Vec<(Var, Op)>,
    grads: Vec<Option<Vec<f32>>>,
    /// Some when profiling: the per-op times, and when the last op finished.
    profile: Option<(OpTimes, Instant)>,
}

impl Default for Tape<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'p> Tape<'p> {
    pub fn new() -> Self {
        Tape { values: Vec::new(), shapes: Vec::new(), ops: Vec::new(), grads: Vec::new(), profile: None }
    }

    /// A tape that times every op (forward: from the previous op's end to this op's record).
    pub fn with_profiling() -> Self {
        Tape { profile: Some((OpTimes::default(), Instant::now())), ..Self::new() }
    }

    pub fn op_times(&self) -> Option<&OpTimes> {
        self.profile.as_ref().map(|p| &p.0)
    }

    fn push(&mut self, value: Value<'p>, shape: &[usize]) -> Var {
        debug_assert_eq!(value.as_slice().len(), shape.iter().product::<usize>());
        self.values.push(value);
        self.shapes.push(shape.to_vec());
        self.grads.push(None);
        Var(self.values.len() - 1)
    }

    /// A parameter, borrowed for the life of the tape.
    /// Restarts the forward clock (call after work that is not an op, e.g. before the first op).
    pub fn mark(&mut self) {
        if let Some((_, last)) = &mut self.profile {
            *last = Instant::now();
        }
    }

    pub fn param(&mut self, t: &'p Tensor) -> Var {
        self.push(Value::Borrowed(&t.data), &t.shape)
    }

    /// An owned leaf (an input whose gradient a test wants to read).
    pub fn leaf(&mut self, t: Tensor) -> Var {
        self.push(Value::Owned(t.data), &t.shape)
    }

    pub(crate) fn record(&mut self, data: Vec<f32>, shape: &[usize], op: Op) -> Var {
        let v = self.push(Value::Owned(data), shape);
        if let Some((times, last)) = &mut self.profile {
            let e = times.by_op.entry(op.name()).or_default();
            e.0 += last.elapsed().as_secs_f64();
            e.2 += 1;
            *last = Instant::now();
        }
        self.ops.push((v, op));
        v
    }

    pub fn value(&self, v: Var) -> &[f32] {
        self.values[v.0].as_slice()
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        &self.shapes[v.0]
    }

    /// The gradient of the last `backward` with respect to v (None if v did not influence the output).
    pub fn grad(&self, v: Var) -> Option<&[f32]> {
        self.grads[v.0].as_deref()
    }

    /// Number of f32 values held by the tape's owned activations (for memory reports).
    pub fn activation_floats(&self) -> usize {
        self.values.iter().map(|v| if let Value::Owned(d) = v { d.len() } else { 0 }).sum()
    }

    /// Back-propagates from the scalar `out`, seeded with d(out) = seed.
    pub fn backward(&mut self, out: Var, seed: f32) {
        assert_eq!(self.value(out).len(), 1, "backward: the output must be a scalar");
        for g in &mut self.grads {
            *g = None;
        }
        self.grads[out.0] = Some(vec![seed]);
        for i in (0..self.ops.len()).rev() {
            let v = self.ops[i].0;
            // Gradients of op outputs are dropped once used; leaves (parameters, inputs) keep theirs.
            let Some(dout) = self.grads[v.0].take() else {
                continue;
            };
            let t0 = Instant::now();
            let input_grads = ops::backward(self, &self.ops[i].1, v, &dout);
            if let Some((times, _)) = &mut self.profile {
                times.by_op.entry(self.ops[i].1.name()).or_default().1 += t0.elapsed().as_secs_f64();
            }
            for (input, g) in input_grads {
                self.accumulate_grad(input, g);
            }
        }
        // The output's own gradient is informative for tests; keep it.
        self.grads[out.0] = Some(vec![seed]);
    }

    fn accumulate_grad(&mut self, v: Var, g: Vec<f32>) {
        match &mut self.grads[v.0] {
            Some(acc) => crate::backend::cpu::elementwise::accumulate(acc, &g),
            slot @ None => *slot = Some(g),
        }
    }
}
