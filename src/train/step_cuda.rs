//! [`super::step::StepOps`] on CUDA (filled in below).
