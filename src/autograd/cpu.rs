//! Host conveniences of the tape on the CPU backend, where every value is an f32 slice: reading
//! values and gradients as slices, and putting `Tensor`s on the tape (tests, eval, sampling).

use super::{Grad, Tape, Value, Var};
use crate::backend::CpuOps;
use crate::tensor::Tensor;

impl<'p> Tape<'p, CpuOps> {
    /// A parameter borrowed from a host tensor; its gradient slot is the next free one.
    pub fn param(&mut self, t: &'p Tensor) -> Var {
        self.param_a(&t.data, &t.shape, None)
    }

    /// An owned leaf (an input whose gradient a test wants to read).
    pub fn leaf(&mut self, t: Tensor) -> Var {
        self.leaf_a(t.data, &t.shape)
    }

    /// The value of v as f32 values (a scalar is one value).
    pub fn value(&self, v: Var) -> &[f32] {
        match &self.values[v.0] {
            Value::Scalar(s) => std::slice::from_ref(s),
            Value::ParamF(f) => f,
            Value::Full(f) => f,
            _ => self.get(v),
        }
    }

    /// The gradient of the last backward with respect to v (None if v did not influence the
    /// output, or its gradient was freed: only leaves and scalars keep theirs).
    pub fn grad(&self, v: Var) -> Option<&[f32]> {
        if self.slots[v.0].is_some() {
            return self.leaf_grad(v).map(|g| g.as_slice());
        }
        match self.grads[v.0].as_ref()? {
            Grad::A(a) => Some(a),
            Grad::Scalar(s) => Some(std::slice::from_ref(s)),
        }
    }
}
