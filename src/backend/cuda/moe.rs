//! Launch code of `cuda/moe.cu` (twin: `cpu::moe`). Not written yet.
