//! CUDA parity tests of the `dsa` family against `cpu::dsa`. Not written yet.
