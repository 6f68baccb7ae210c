//! Launch code of `cuda/window_attention.cu` (twin: `cpu::window_attention`). Not written yet.
