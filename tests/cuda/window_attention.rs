//! CUDA parity tests of the `window_attention` family against `cpu::window_attention`. Not written yet.
