//! The window attention's shape rules on a device (its parity checks are the selftest group
//! `window`, run by `window_attention_matches_cpu` in tests/cuda.rs).

use half::bf16;
use nanoseek::backend::cpu::window_attention::WindowDims;
use nanoseek::backend::cuda::{self, DeviceBuffer};

#[test]
fn window_attention_rejects_bad_shapes() {
    let Some(be) = super::device("window_attention_shapes") else { return };
    let dims = WindowDims { b: 1, t: 8, h: 2, h_kv: 1, d: 64, window: 4, n_global: 0 };
    let q = DeviceBuffer::<bf16>::uninit(&be, dims.q_len()).unwrap();
    let kv = DeviceBuffer::<bf16>::uninit(&be, dims.kv_len()).unwrap();
    let lse = DeviceBuffer::<f32>::uninit(&be, dims.lse_len()).unwrap();
    let f = cuda::window_attention::window_attention_forward;
    assert!(f(&be, &WindowDims { window: 0, ..dims }, &q, &kv, &kv, &q, &lse).is_err());
    assert!(f(&be, &WindowDims { d: 32, ..dims }, &q, &kv, &kv, &q, &lse).is_err());
    assert!(f(&be, &WindowDims { h_kv: 3, ..dims }, &q, &kv, &kv, &q, &lse).is_err());
    assert!(f(&be, &dims, &kv, &kv, &kv, &q, &lse).is_err());
    assert!(f(&be, &dims, &q, &kv, &kv, &q, &lse).is_ok());
}
