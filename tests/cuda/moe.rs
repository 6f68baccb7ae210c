//! CUDA parity tests of the `moe` family against `cpu::moe`. Not written yet.
