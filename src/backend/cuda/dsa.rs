//! Launch code of `cuda/dsa.cu` (twin: `cpu::dsa`). Not written yet.
