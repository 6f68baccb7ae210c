//! A thin reverse-mode tape over the coarse, fused ops of one [`Backend`].
//!
//! Every op computes its forward with the backend, stores the output as a new variable and
//! records what its backward needs (`ops::Op`). `backward` walks the records in reverse, calling
//! the backend's backward ops and summing gradients into each input; an op's output and saved
//! state are freed as soon as its backward has run. Kernels know nothing about the tape, and the
//! tape knows nothing about devices: the same model code trains on the CPU (`CpuOps`, f32) and on
//! CUDA (`CudaOps`, bf16 activations and f32 gradients).
//!
//! Parameters enter the tape by reference (`Tape::param_a` for GEMM operands, `Tape::param_f`
//! for f32 tables), each with a slot: `backward_into` adds their gradients in place into the
//! caller's f32 buffers (`grads[slot]`), which is how gradients accumulate over micro-batches.
//! Leaves (parameters and `Tape::leaf` inputs) have f32 gradients; other variables have
//! activation-precision ones.
//!
//! Activation checkpointing is one more kind of node (`Tape::checkpoint`): a function runs on a
//! sub-tape whose activations are dropped right away, and runs again during the backward to get
//! its gradients. The kernels are deterministic, so a checkpointed run is bitwise equal to a
//! plain one.
//!
//! Auxiliary losses (`Tape::add_aux_loss`, e.g. MoE balance losses) are scalars that join the
//! objective: `backward(out, seed)` differentiates `seed·(out + Σ aux)`, including the aux losses
//! inside checkpointed blocks. A `Tape::inference` tape (eval, scoring, sampling) tells models
//! to skip them.
//!
//! On a host backend the tape reports the bytes it holds to `crate::memory`: its values and
//! saved state as activations, its gradient buffers as workspace.

mod backward;
mod cached;
mod columns;
mod cpu;
mod ops;

pub use ops::{CheckpointFn, Op, Selection};

use crate::backend::Backend;
use crate::memory::{self, Category};
use anyhow::Result;
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

/// A value on the tape.
enum Value<'p, B: Backend> {
    /// A parameter in GEMM precision (borrowed).
    ParamA(&'p B::A),
    /// A parameter in f32 (borrowed; the embedding table).
    ParamF(&'p B::F),
    /// An op's output or an owned leaf.
    Owned(B::A),
    /// An op's f32 output (router logits).
    Full(B::F),
    Scalar(f32),
    /// Freed after its backward ran.
    Freed,
}

/// The gradient of a non-leaf variable.
enum Grad<A> {
    A(A),
    Scalar(f32),
}

/// Where the f32 gradients of the leaves go during a backward.
enum LeafGrads<'g, F> {
    Own(Vec<Option<F>>),
    External(&'g mut [F]),
}

impl<F> LeafGrads<'_, F> {
    fn get<B: Backend<F = F>>(&mut self, ops: &B, slot: usize, len: usize) -> Result<&mut F> {
        Ok(match self {
            LeafGrads::Own(own) => {
                if own[slot].is_none() {
                    own[slot] = Some(ops.f_zeros(len)?);
                }
                own[slot].as_mut().expect("allocated above")
            }
            LeafGrads::External(ext) => &mut ext[slot],
        })
    }

    /// Three different slots at once (the expert stacks of a MoE layer).
    fn get3<B: Backend<F = F>>(&mut self, ops: &B, slots: [usize; 3], lens: [usize; 3]) -> Result<[&mut F; 3]> {
        Ok(match self {
            LeafGrads::Own(own) => {
                for (&s, &n) in slots.iter().zip(&lens) {
                    if own[s].is_none() {
                        own[s] = Some(ops.f_zeros(n)?);
                    }
                }
                pick3(own, slots)?.map(|g| g.as_mut().expect("allocated above"))
            }
            LeafGrads::External(ext) => pick3(ext, slots)?,
        })
    }
}

/// Three distinct elements of `v`, mutably (`get_disjoint_mut` is newer than the crate's MSRV).
fn pick3<T>(v: &mut [T], idx: [usize; 3]) -> Result<[&mut T; 3]> {
    let mut out: [Option<&mut T>; 3] = [None, None, None];
    for (i, x) in v.iter_mut().enumerate() {
        if let Some(k) = idx.iter().position(|&j| j == i) {
            out[k] = Some(x);
        }
    }
    match out {
        [Some(a), Some(b), Some(c)] => Ok([a, b, c]),
        _ => anyhow::bail!("moe: the expert stacks' gradient slots {idx:?} are not three distinct slots"),
    }
}

pub struct Tape<'p, B: Backend> {
    ops_be: &'p B,
    values: Vec<Value<'p, B>>,
    shapes: Vec<Vec<usize>>,
    /// The gradient slot of each leaf (None for op outputs).
    slots: Vec<Option<usize>>,
    /// Per variable, the first op whose backward reads it (usize::MAX: none), and whether its
    /// producer's backward reads it: after that op's backward the value can go.
    first_use: Vec<usize>,
    kept_for_producer: Vec<bool>,
    ops: Vec<Option<(Var, Op<'p, B>)>>,
    grads: Vec<Option<Grad<B::A>>>,
    /// Leaf gradients of the latest `backward` (not `backward_into`), by slot.
    leaf_grads: Vec<Option<B::F>>,
    n_slots: usize,
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

impl<B: Backend> Drop for Tape<'_, B> {
    fn drop(&mut self) {
        memory::free(Category::Activations, self.activation_bytes);
        memory::free(Category::Workspace, self.grad_bytes);
    }
}

impl<'p, B: Backend> Tape<'p, B> {
    pub fn new(ops: &'p B) -> Self {
        Tape {
            ops_be: ops,
            values: Vec::new(),
            shapes: Vec::new(),
            slots: Vec::new(),
            first_use: Vec::new(),
            kept_for_producer: Vec::new(),
            ops: Vec::new(),
            grads: Vec::new(),
            leaf_grads: Vec::new(),
            n_slots: 0,
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
    pub fn inference(ops: &'p B) -> Self {
        let mut tape = Self::new(ops);
        tape.aux_enabled = false;
        tape
    }

    /// A tape that times every op (forward: from the previous op's end to this op's record).
    pub fn with_profiling(ops: &'p B) -> Self {
        let mut tape = Self::new(ops);
        tape.profile = Some((OpTimes::default(), Instant::now()));
        tape
    }

    /// The backend the ops run on.
    pub fn backend(&self) -> &'p B {
        self.ops_be
    }

    /// Whether auxiliary losses are wanted (false on `Tape::inference`).
    pub fn aux_enabled(&self) -> bool {
        self.aux_enabled
    }

    /// Adds the scalar `v` to the objective that `backward` differentiates.
    pub fn add_aux_loss(&mut self, v: Var) {
        self.aux_total += self.scalar(v) as f64;
        self.aux.push(v);
    }

    /// Sum of the auxiliary losses recorded so far (checkpointed blocks included).
    pub fn aux_loss_total(&self) -> f64 {
        self.aux_total
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

    fn track(&mut self, cat: Category, bytes: usize) {
        if B::HOST_MEMORY {
            memory::alloc(cat, bytes);
            match cat {
                Category::Activations => self.activation_bytes += bytes,
                _ => self.grad_bytes += bytes,
            }
        }
    }

    fn untrack(&mut self, cat: Category, bytes: usize) {
        if B::HOST_MEMORY {
            memory::free(cat, bytes);
            match cat {
                Category::Activations => self.activation_bytes -= bytes,
                _ => self.grad_bytes -= bytes,
            }
        }
    }

    fn value_bytes(&self, v: &Value<'p, B>) -> usize {
        match v {
            Value::Owned(a) => 4 * self.ops_be.a_len(a),
            Value::Full(f) => 4 * self.ops_be.f_len(f),
            _ => 0,
        }
    }

    fn push(&mut self, value: Value<'p, B>, shape: &[usize], slot: Option<usize>) -> Var {
        let bytes = self.value_bytes(&value);
        self.track(Category::Activations, bytes);
        self.values.push(value);
        self.shapes.push(shape.to_vec());
        self.slots.push(slot);
        self.first_use.push(usize::MAX);
        self.kept_for_producer.push(false);
        self.grads.push(None);
        Var(self.values.len() - 1)
    }

    fn new_slot(&mut self, slot: Option<usize>) -> usize {
        let s = slot.unwrap_or(self.n_slots);
        self.n_slots = self.n_slots.max(s + 1);
        s
    }

    /// A parameter in GEMM precision, borrowed for the life of the tape; its gradient goes to
    /// `slot` (None: the next free one).
    pub fn param_a(&mut self, a: &'p B::A, shape: &[usize], slot: Option<usize>) -> Var {
        let s = self.new_slot(slot);
        self.push(Value::ParamA(a), shape, Some(s))
    }

    /// An f32 parameter (the embedding table), borrowed; see [`Tape::param_a`].
    pub fn param_f(&mut self, f: &'p B::F, shape: &[usize], slot: Option<usize>) -> Var {
        let s = self.new_slot(slot);
        self.push(Value::ParamF(f), shape, Some(s))
    }

    /// An owned leaf with a gradient slot (an input whose gradient a test wants to read).
    pub fn leaf_a(&mut self, a: B::A, shape: &[usize]) -> Var {
        let s = self.new_slot(None);
        self.push(Value::Owned(a), shape, Some(s))
    }

    /// An owned input that needs no gradient (e.g. a block's input on a checkpoint sub-tape).
    fn input_a(&mut self, a: B::A, shape: &[usize]) -> Var {
        self.push(Value::Owned(a), shape, None)
    }

    fn record(&mut self, value: Value<'p, B>, shape: &[usize], op: Op<'p, B>) -> Var {
        let v = self.push(value, shape, None);
        let index = self.ops.len();
        for input in op.inputs() {
            self.first_use[input.0] = self.first_use[input.0].min(index);
        }
        self.kept_for_producer[v.0] = op.reads_output();
        let saved = op.saved_bytes(self.ops_be);
        self.track(Category::Activations, saved);
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
        self.ops.push(Some((v, op)));
        v
    }

    /// The activation-precision value of v (a parameter, an input or an op's output).
    pub fn get(&self, v: Var) -> &B::A {
        match &self.values[v.0] {
            Value::ParamA(a) => a,
            Value::Owned(a) => a,
            Value::ParamF(f) => self.ops_be.f_as_a(f).expect("an f32 value used as an activation"),
            Value::Full(f) => self.ops_be.f_as_a(f).expect("an f32 value used as an activation"),
            Value::Scalar(_) => panic!("a scalar used as a tensor"),
            Value::Freed => panic!("a value used after its backward freed it"),
        }
    }

    /// The f32 value of v (a table parameter, router logits).
    pub fn get_f(&self, v: Var) -> &B::F {
        match &self.values[v.0] {
            Value::ParamF(f) => f,
            Value::Full(f) => f,
            Value::ParamA(a) => self.ops_be.a_as_f(a).expect("a GEMM-precision parameter used as f32"),
            Value::Owned(a) => self.ops_be.a_as_f(a).expect("an activation used as f32"),
            Value::Scalar(_) => panic!("a scalar used as a tensor"),
            Value::Freed => panic!("a value used after its backward freed it"),
        }
    }

    /// The value of a scalar (a loss).
    pub fn scalar(&self, v: Var) -> f32 {
        match &self.values[v.0] {
            Value::Scalar(s) => *s,
            _ => panic!("scalar: the variable is a tensor"),
        }
    }

    /// The value of v on the host (f32), whatever its precision.
    pub fn to_host(&self, v: Var) -> Result<Vec<f32>> {
        match &self.values[v.0] {
            Value::Scalar(s) => Ok(vec![*s]),
            Value::ParamF(f) => self.ops_be.f_to_host(f),
            Value::Full(f) => self.ops_be.f_to_host(f),
            _ => self.ops_be.a_to_host(self.get(v)),
        }
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        &self.shapes[v.0]
    }

    /// The f32 gradient of a leaf after [`Tape::backward`] (None if it did not influence the
    /// output).
    pub fn leaf_grad(&self, v: Var) -> Option<&B::F> {
        self.slots[v.0].and_then(|s| self.leaf_grads.get(s)?.as_ref())
    }

    fn set_grad(&mut self, v: Var, g: Option<Grad<B::A>>) -> Option<Grad<B::A>> {
        let bytes = |g: &Option<Grad<B::A>>| match g {
            Some(Grad::A(a)) => 4 * self.ops_be.a_len(a),
            _ => 0,
        };
        let new_bytes = bytes(&g);
        let old = std::mem::replace(&mut self.grads[v.0], g);
        let old_bytes = bytes(&old);
        self.track(Category::Workspace, new_bytes);
        self.untrack(Category::Workspace, old_bytes);
        old
    }

    /// Back-propagates from the scalar `out` plus the aux losses, seeded with d(out) = d(aux) =
    /// seed; the leaves' gradients are then read with [`Tape::leaf_grad`].
    pub fn backward(&mut self, out: Var, seed: f32) -> Result<()> {
        self.backward_own(out, Grad::Scalar(seed), seed)
    }

    /// [`Tape::backward`] adding the leaves' gradients into `grads[slot]` (f32, in place).
    pub fn backward_into(&mut self, out: Var, seed: f32, grads: &mut [B::F]) -> Result<()> {
        assert!(grads.len() >= self.n_slots, "backward_into: {} buffers for {} slots", grads.len(), self.n_slots);
        self.backward_with_aux(out, Grad::Scalar(seed), seed, &mut LeafGrads::External(grads))
    }

    /// Back-propagates from the scalar `out` alone (the aux losses are not differentiated).
    pub fn backward_without_aux(&mut self, out: Var, seed: f32) -> Result<()> {
        self.backward_own(out, Grad::Scalar(seed), 0.0)
    }

    /// Back-propagates from the tensor `out` with the given output gradient; aux losses are not
    /// differentiated.
    pub fn backward_from(&mut self, out: Var, seed: B::A) -> Result<()> {
        self.backward_own(out, Grad::A(seed), 0.0)
    }

    /// A backward whose leaf gradients stay on the tape.
    fn backward_own(&mut self, out: Var, seed: Grad<B::A>, aux_seed: f32) -> Result<()> {
        let mut leaf = LeafGrads::Own((0..self.n_slots).map(|_| None).collect());
        self.backward_with_aux(out, seed, aux_seed, &mut leaf)?;
        if let LeafGrads::Own(own) = leaf {
            self.leaf_grads = own;
        }
        Ok(())
    }

    fn backward_with_aux(
        &mut self,
        out: Var,
        seed: Grad<B::A>,
        aux_seed: f32,
        leaf: &mut LeafGrads<'_, B::F>,
    ) -> Result<()> {
        for i in 0..self.grads.len() {
            self.set_grad(Var(i), None);
        }
        self.aux_seed = aux_seed;
        if aux_seed != 0.0 {
            for a in self.aux.clone() {
                self.accumulate(a, Grad::Scalar(aux_seed), leaf)?;
            }
        }
        self.accumulate(out, seed, leaf)?;
        for i in (0..self.ops.len()).rev() {
            let Some((v, op)) = self.ops[i].take() else { continue };
            self.untrack(Category::Activations, op.saved_bytes(self.ops_be));
            let inputs = op.inputs();
            // Gradients of op outputs are dropped once used, and so are the outputs themselves.
            let dout = self.set_grad(v, None);
            if let Some(dout) = dout {
                let input_grads = if let Op::Checkpoint { inputs, f } = &op {
                    self.checkpoint_backward(inputs, f, dout, leaf)?
                } else {
                    let (t0, name) = (Instant::now(), op.name());
                    let g = backward::backward(self, op, v, dout, leaf)?;
                    if let Some((times, _)) = &mut self.profile {
                        times.by_op.entry(name).or_default().backward_s += t0.elapsed().as_secs_f64();
                    }
                    g
                };
                for (input, g) in input_grads {
                    self.accumulate(input, g, leaf)?;
                }
            }
            // The output, and every input no earlier op's backward reads, are no longer needed.
            self.free(v);
            for input in inputs {
                if self.first_use[input.0] == i && self.slots[input.0].is_none() && !self.kept_for_producer[input.0] {
                    self.free(input);
                }
            }
        }
        Ok(())
    }

    /// Drops the tensor value of v (scalars stay: they are the losses callers read).
    fn free(&mut self, v: Var) {
        if !matches!(self.values[v.0], Value::Scalar(_)) {
            let freed = std::mem::replace(&mut self.values[v.0], Value::Freed);
            let bytes = self.value_bytes(&freed);
            self.untrack(Category::Activations, bytes);
        }
    }

    /// Adds g into v's gradient: a leaf's f32 buffer, or the variable's own.
    fn accumulate(&mut self, v: Var, g: Grad<B::A>, leaf: &mut LeafGrads<'_, B::F>) -> Result<()> {
        if let Some(slot) = self.slots[v.0] {
            let Grad::A(a) = g else { return Ok(()) }; // a scalar leaf: nothing to keep
            let n = self.ops_be.a_len(&a);
            return self.ops_be.f_accumulate(leaf.get(self.ops_be, slot, n)?, &a);
        }
        let ops = self.ops_be;
        match (self.grads[v.0].as_mut(), g) {
            (Some(Grad::A(acc)), Grad::A(a)) => ops.add(acc, &a)?,
            (Some(Grad::Scalar(acc)), Grad::Scalar(s)) => *acc += s,
            (None, g) => {
                self.set_grad(v, Some(g));
            }
            _ => panic!("accumulate: a tensor and a scalar gradient for one variable"),
        }
        Ok(())
    }

    /// Runs `f` on `inputs` without keeping its intermediate activations: only the
    /// output stays on this tape, and the backward runs `f` again (activation checkpointing).
    pub fn checkpoint(&mut self, inputs: &[Var], f: Rc<CheckpointFn<'p, B>>) -> Result<Var> {
        let (sub, _, out) = self.run_sub(inputs, &f)?;
        let data = self.ops_be.a_copy(sub.get(out))?;
        let shape = sub.shape(out).to_vec();
        self.aux_total += sub.aux_total;
        self.merge_times(&sub);
        drop(sub);
        self.mark();
        Ok(self.record(Value::Owned(data), &shape, Op::Checkpoint { inputs: inputs.to_vec(), f }))
    }

    /// A sub-tape whose variables mirror `inputs` (parameters stay borrowed, with their slots),
    /// with `f` run on it.
    fn run_sub(&self, inputs: &[Var], f: &Rc<CheckpointFn<'p, B>>) -> Result<(Tape<'p, B>, Vec<Var>, Var)> {
        let mut sub = if self.profile.is_some() { Tape::with_profiling(self.ops_be) } else { Tape::new(self.ops_be) };
        sub.aux_enabled = self.aux_enabled;
        sub.n_slots = self.n_slots;
        let mut vars = Vec::with_capacity(inputs.len());
        for &v in inputs {
            let shape = &self.shapes[v.0];
            let var = match &self.values[v.0] {
                Value::ParamA(a) => sub.push(Value::ParamA(*a), shape, self.slots[v.0]),
                Value::ParamF(x) => sub.push(Value::ParamF(*x), shape, self.slots[v.0]),
                Value::Owned(a) => sub.input_a(self.ops_be.a_copy(a)?, shape),
                _ => panic!("checkpoint: inputs must be tensors"),
            };
            vars.push(var);
        }
        sub.mark();
        let out = f(&mut sub, &vars)?;
        Ok((sub, vars, out))
    }

    fn checkpoint_backward(
        &mut self,
        inputs: &[Var],
        f: &Rc<CheckpointFn<'p, B>>,
        dout: Grad<B::A>,
        leaf: &mut LeafGrads<'_, B::F>,
    ) -> Result<Vec<(Var, Grad<B::A>)>> {
        let (mut sub, vars, out) = self.run_sub(inputs, f)?;
        // The sub-tape's parameters add their gradients straight into this tape's leaf buffers.
        sub.backward_with_aux(out, dout, self.aux_seed, leaf)?;
        // (parameters mirrored on the sub-tape wrote theirs into `leaf` already)
        let mut grads = Vec::new();
        for (&input, &sv) in inputs.iter().zip(&vars) {
            if let Some(g) = sub.set_grad(sv, None) {
                grads.push((input, g));
            }
        }
        self.merge_times(&sub);
        Ok(grads)
    }

    fn merge_times(&mut self, sub: &Tape<'p, B>) {
        if let (Some((times, _)), Some(sub_times)) = (&mut self.profile, sub.op_times()) {
            times.merge(sub_times);
        }
    }
}
