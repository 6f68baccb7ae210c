//! Compute backends. `cpu` is the f32 reference every other backend is checked
//! against; `cuda` holds the GPU runtime (device discovery today, kernels next).
//! Each kernel family has the same name in `cuda/*.cu`, in `cpu/` and in the
//! launch code, so `grep rope` finds all of them.

pub mod cpu;
pub mod cuda;
