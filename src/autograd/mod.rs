//! A thin reverse-mode tape over coarse, fused ops.
//!
//! Every op computes its forward with a CPU kernel, stores the output as a new
//! variable and records what its backward needs (`ops::Op`). `backward` walks
//! the records in reverse, calling the matching backward kernels and summing
//! gradients into each input. Kernels know nothing about the tape.
//!
//! Parameters enter the tape by reference (`Tape::param`), so a forward pass
//! never copies weights; their gradients are read back with `Tape::grad`.
//!
//! Activation checkpointing is one more kind of node (`Tape::checkpoint`): a
//! function runs on a sub-tape whose activations are dropped right away, and
//! runs again during the backward to get its gradients. The kernels are
//! deterministic, so a checkpointed run is bitwise equal to a plain one.
//!
//! Auxiliary losses (`Tape::add_aux_loss`, e.g. MoE balance losses) are scalars
//! that join the objective: `backward(out, seed)` differentiates
//! `seed·(out + Σ aux)`, including the aux losses inside checkpointed blocks.
//! A `Tape::inference` tape (eval, scoring, sampling) tells models to skip them.
//!
//! The tape reports the bytes it holds to `crate::memory`: its values and saved
//! state as activations, its gradient buffers as workspace.

mod ops;

pub use ops::{CheckpointFn, Op};

use crate::memory::{self, Category};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

/// Time and work of one op kind, summed over its calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpStat {
    pub forward_s: f64,
    pub backward_s: f64,
    pub calls: usize,
    /// Floating-point operations (multiply-adds count 2) of the matrix products; 0 for
    /// memory-bound ops.
    pub forward_flops: f64,
    pub backward_flops: f64,
}

impl OpStat {
    fn add(&mut self, o: &OpStat) {
        self.forward_s += o.forward_s;
        self.backward_s += o.backward_s;
        self.calls += o.calls;
        self.forward_flops += o.forward_flops;
        self.backward_flops += o.backward_flops;
    }
}

/// Wall time and work per op kind, forward and backward (when profiling is on).
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub by_op: BTreeMap<&'static str, OpStat>,
}

impl OpTimes {
    pub fn merge(&mut self, other: &OpTimes) {
        for (name, stat) in &other.by_op {
            self.by_op.entry(name).or_default().add(stat);
        }
    }
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
    ops: Vec<(Var, Op<'p>)>,
    grads: Vec<Option<Vec<f32>>>,
    /// Some when profiling: the per-op times, and when the last op finished.
    profile: Option<(OpTimes, Instant)>,
    /// Bytes reported to `memory` (freed when the tape drops).
    activation_bytes: usize,
    grad_bytes: usize,
    /// Auxiliary scalar losses on this tape, and the sum of every aux value recorded here or in
    /// checkpointed sub-tapes.
    aux: Vec<Var>,
    aux_total: f64,
    /// The gradient the aux losses are seeded with during a backward.
    aux_seed: f32,
    /// False on an inference tape: models skip their auxiliary losses (nothing differentiates them).
    aux_enabled: bool,
}

impl Default for Tape<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Tape<'_> {
    fn drop(&mut self) {
        memory::free(Category::Activations, self.activation_bytes);
        memory::free(Category::Workspace, self.grad_bytes);
    }
}

impl<'p> Tape<'p> {
    pub fn new() -> Self {
        Tape {
            values: Vec::new(),
            shapes: Vec::new(),
            ops: Vec::new(),
            grads: Vec::new(),
            profile: None,
            activation_bytes: 0,
            grad_bytes: 0,
            aux: Vec::new(),
            aux_total: 0.0,
            aux_seed: 0.0,
            aux_enabled: true,
        }
    }

    /// A tape for forward passes only (eval, scoring, sampling): auxiliary losses are not computed.
    pub fn inference() -> Self {
        let mut tape = Self::new();
        tape.aux_enabled = false;
        tape
    }

    /// Whether auxiliary losses are wanted (false on `Tape::inference`).
    pub fn aux_enabled(&self) -> bool {
        self.aux_enabled
    }

    /// Adds the scalar `v` to the objective that `backward` differentiates.
    pub fn add_aux_loss(&mut self, v: Var) {
        assert_eq!(self.value(v).len(), 1, "add_aux_loss: the loss must be a scalar");
        self.aux_total += self.value(v)[0] as f64;
        self.aux.push(v);
    }

    /// Sum of the auxiliary losses recorded so far (checkpointed blocks included).
    pub fn aux_loss_total(&self) -> f64 {
        self.aux_total
    }

    /// A tape that times every op (forward: from the previous op's end to this op's record).
    pub fn with_profiling() -> Self {
        let mut tape = Self::new();
        tape.profile = Some((OpTimes::default(), Instant::now()));
        tape
    }

    pub fn op_times(&self) -> Option<&OpTimes> {
        self.profile.as_ref().map(|p| &p.0)
    }

    /// Restarts the forward clock (call after work that is not an op, e.g. before the first op).
    pub fn mark(&mut self) {
        if let Some((_, last)) = &mut self.profile {
            *last = Instant::now();
        }
    }

    fn track_activation(&mut self, bytes: usize) {
        memory::alloc(Category::Activations, bytes);
        self.activation_bytes += bytes;
    }

    fn push(&mut self, value: Value<'p>, shape: &[usize]) -> Var {
        debug_assert_eq!(value.as_slice().len(), shape.iter().product::<usize>());
        if let Value::Owned(d) = &value {
            self.track_activation(d.len() * 4);
        }
        self.values.push(value);
        self.shapes.push(shape.to_vec());
        self.grads.push(None);
        Var(self.values.len() - 1)
    }

    /// A parameter, borrowed for the life of the tape.
    pub fn param(&mut self, t: &'p Tensor) -> Var {
        self.push(Value::Borrowed(&t.data), &t.shape)
    }

    /// An owned leaf (an input whose gradient a test wants to read).
    pub fn leaf(&mut self, t: Tensor) -> Var {
        self.push(Value::Owned(t.data), &t.shape)
    }

    pub(crate) fn record(&mut self, data: Vec<f32>, shape: &[usize], op: Op<'p>) -> Var {
        let v = self.push(Value::Owned(data), shape);
        self.track_activation(op.saved_bytes());
        if let Some((times, last)) = &mut self.profile {
            let (fwd_flops, bwd_flops) = op.flops();
            let e = times.by_op.entry(op.name()).or_default();
            e.add(&OpStat {
                forward_s: last.elapsed().as_secs_f64(),
                calls: 1,
                forward_flops: fwd_flops,
                backward_flops: bwd_flops,
                backward_s: 0.0,
            });
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

    fn set_grad(&mut self, v: Var, g: Option<Vec<f32>>) -> Option<Vec<f32>> {
        let new_bytes = g.as_ref().map_or(0, |g| g.len() * 4);
        memory::alloc(Category::Workspace, new_bytes);
        let old = std::mem::replace(&mut self.grads[v.0], g);
        let old_bytes = old.as_ref().map_or(0, |g| g.len() * 4);
        memory::free(Category::Workspace, old_bytes);
        self.grad_bytes = self.grad_bytes + new_bytes - old_bytes;
        old
    }

    /// Moves the gradient of v out of the tape.
    pub fn take_grad(&mut self, v: Var) -> Option<Vec<f32>> {
        self.set_grad(v, None)
    }

    /// Back-propagates from the scalar `out` plus the aux losses, seeded with d(out) = d(aux) = seed.
    pub fn backward(&mut self, out: Var, seed: f32) {
        assert_eq!(self.value(out).len(), 1, "backward: the output must be a scalar");
        self.backward_with_aux(out, vec![seed], seed);
    }

    /// Back-propagates from `out` with the given output gradient (same length as its value);
    /// aux losses are not differentiated.
    pub fn backward_from(&mut self, out: Var, seed: Vec<f32>) {
        self.backward_with_aux(out, seed, 0.0);
    }

    fn backward_with_aux(&mut self, out: Var, seed: Vec<f32>, aux_seed: f32) {
        assert_eq!(seed.len(), self.value(out).len(), "backward: seed length differs from the output's");
        for i in 0..self.grads.len() {
            self.set_grad(Var(i), None);
        }
        self.aux_seed = aux_seed;
        if aux_seed != 0.0 {
            for a in self.aux.clone() {
                self.accumulate_grad(a, vec![aux_seed]);
            }
        }
        self.accumulate_grad(out, seed.clone());
        for i in (0..self.ops.len()).rev() {
            let v = self.ops[i].0;
            // Gradients of op outputs are dropped once used; leaves (parameters, inputs) keep theirs.
            let Some(dout) = self.take_grad(v) else {
                continue;
            };
            let input_grads = if let Op::Checkpoint { inputs, f } = &self.ops[i].1 {
                let (inputs, f) = (inputs.clone(), f.clone());
                self.checkpoint_backward(&inputs, &f, dout)
            } else {
                let t0 = Instant::now();
                let g = ops::backward(self, &self.ops[i].1, v, &dout);
                if let Some((times, _)) = &mut self.profile {
                    times.by_op.entry(self.ops[i].1.name()).or_default().backward_s += t0.elapsed().as_secs_f64();
                }
                g
            };
            for (input, g) in input_grads {
                self.accumulate_grad(input, g);
            }
        }
        // The output's own gradient is informative for tests; keep it.
        self.set_grad(out, Some(seed));
    }

    fn accumulate_grad(&mut self, v: Var, g: Vec<f32>) {
        match &mut self.grads[v.0] {
            Some(acc) => crate::backend::cpu::elementwise::accumulate(acc, &g),
            None => {
                self.set_grad(v, Some(g));
            }
        }
    }

    /// Runs `f` on `inputs` without keeping its intermediate activations: only the
    /// output stays on this tape, and the backward runs `f` again (activation checkpointing).
    pub fn checkpoint(&mut self, inputs: &[Var], f: Rc<CheckpointFn<'p>>) -> Var {
        let (sub, _, out) = self.run_sub(inputs, &f);
        let (data, shape) = (sub.value(out).to_vec(), sub.shape(out).to_vec());
        self.aux_total += sub.aux_total;
        self.merge_times(&sub);
        drop(sub);
        self.mark();
        self.record(data, &shape, Op::Checkpoint { inputs: inputs.to_vec(), f })
    }

    /// A sub-tape whose leaves mirror `inputs` (parameters stay borrowed), with `f` run on it.
    fn run_sub(&self, inputs: &[Var], f: &Rc<CheckpointFn<'p>>) -> (Tape<'p>, Vec<Var>, Var) {
        let mut sub = if self.profile.is_some() { Tape::with_profiling() } else { Tape::new() };
        sub.aux_enabled = self.aux_enabled;
        let vars: Vec<Var> = inputs
            .iter()
            .map(|&v| match &self.values[v.0] {
                Value::Borrowed(s) => sub.push(Value::Borrowed(s), &self.shapes[v.0]),
                Value::Owned(d) => sub.push(Value::Owned(d.clone()), &self.shapes[v.0]),
            })
            .collect();
        sub.mark();
        let out = f(&mut sub, &vars);
        (sub, vars, out)
    }

    fn checkpoint_backward(
        &mut self,
        inputs: &[Var],
        f: &Rc<CheckpointFn<'p>>,
        dout: Vec<f32>,
    ) -> Vec<(Var, Vec<f32>)> {
        let (mut sub, vars, out) = self.run_sub(inputs, f);
        sub.backward_with_aux(out, dout, self.aux_seed);
        let grads = inputs.iter().zip(&vars).filter_map(|(&input, &sv)| Some((input, sub.take_grad(sv)?))).collect();
        self.merge_times(&sub);
        grads
    }

    fn merge_times(&mut self, sub: &Tape) {
        if let (Some((times, _)), Some(sub_times)) = (&mut self.profile, sub.op_times()) {
            times.merge(sub_times);
        }
    }
}
