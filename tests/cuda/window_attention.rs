//! CUDA parity tests of the `window_attention` family against `cpu::window_attention`.
//!
//! Same method and tolerances as the dense `attention` test in tests/cuda.rs, since the kernels
//! are the same flash bodies with another mask: P is rounded to bf16 before P·V (and P, dS
//! before the backward products), so out and the f32 gradients are compared at atol 2e-2,
//! rtol 2e-2, lse (f32 statistics only) at 1e-3. The CPU backward runs on the GPU's bf16 out
//! so both see the same delta.
//!
//! Cases: head dims 64 and 128, grouped-query, T not a multiple of the 64-row tile, W not a
//! multiple of it, G = 0 and G > 0 (with G also not a multiple), W = 1, and the dense limits
//! W ≥ T and G ≥ T, which must also match the dense GPU kernels (same tiles, same arithmetic,
//! expected bitwise equal but for the order of dQ's atomics: out within one bf16 rounding,
//! lse 1e-6, gradients 1e-5).

use super::{assert_close, down, rand_bf16, up};
use half::bf16;
use nanoseek::backend::cpu;
use nanoseek::backend::cpu::window_attention::WindowDims;
use nanoseek::backend::cuda::{self, CudaBackend, DeviceBuffer};

struct Gpu {
    out: Vec<f32>,
    lse: Vec<f32>,
    grads: [Vec<f32>; 3],
}

/// Forward and backward of the window kernels on (q, k, v, dout).
fn run_window(be: &CudaBackend, dims: &WindowDims, x: &[Vec<f32>; 4]) -> Gpu {
    let (gq, gk, gv, gdo) = (up(be, &x[0]), up(be, &x[1]), up(be, &x[2]), up(be, &x[3]));
    let go = DeviceBuffer::<bf16>::uninit(be, dims.q_len()).unwrap();
    let gl = DeviceBuffer::<f32>::uninit(be, dims.lse_len()).unwrap();
    cuda::window_attention::window_attention_forward(be, dims, &gq, &gk, &gv, &go, &gl).unwrap();
    // garbage-filled: the backward must overwrite dk and dv (and zero dq itself)
    let gdq = DeviceBuffer::from_host(be, &vec![f32::NAN; dims.q_len()]).unwrap();
    let gdk = DeviceBuffer::from_host(be, &vec![7.0f32; dims.kv_len()]).unwrap();
    let gdv = DeviceBuffer::from_host(be, &vec![-3.0f32; dims.kv_len()]).unwrap();
    cuda::window_attention::window_attention_backward(be, dims, &gq, &gk, &gv, &go, &gl, &gdo, [&gdq, &gdk, &gdv])
        .unwrap();
    Gpu {
        out: down(&go),
        lse: gl.to_host().unwrap(),
        grads: [gdq.to_host().unwrap(), gdk.to_host().unwrap(), gdv.to_host().unwrap()],
    }
}

fn inputs(dims: &WindowDims, seed: u64) -> [Vec<f32>; 4] {
    [
        rand_bf16(seed, dims.q_len(), 1.0),
        rand_bf16(seed + 1, dims.kv_len(), 1.0),
        rand_bf16(seed + 2, dims.kv_len(), 1.0),
        rand_bf16(seed + 3, dims.q_len(), 1.0),
    ]
}

/// GPU against `cpu::window_attention` (forward, then backward on the GPU's out).
fn check_against_cpu(be: &CudaBackend, dims: &WindowDims, seed: u64) -> Gpu {
    let x = inputs(dims, seed);
    let gpu = run_window(be, dims, &x);
    let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
    cpu::window_attention::window_attention_forward(dims, &x[0], &x[1], &x[2], &mut out, &mut lse);
    assert_close(&format!("window out {dims:?}"), &gpu.out, &out, 2e-2, 2e-2);
    assert_close(&format!("window lse {dims:?}"), &gpu.lse, &lse, 1e-3, 1e-3);
    let (mut dq, mut dk, mut dv) = (vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
    cpu::window_attention::window_attention_backward(
        dims, &x[0], &x[1], &x[2], &gpu.out, &lse, &x[3], &mut dq, &mut dk, &mut dv,
    );
    for (name, got, want) in [("dq", &gpu.grads[0], &dq), ("dk", &gpu.grads[1], &dk), ("dv", &gpu.grads[2], &dv)] {
        assert_close(&format!("window {name} {dims:?}"), got, want, 2e-2, 2e-2);
    }
    gpu
}

#[test]
fn window_attention_matches_cpu() {
    let Some(be) = super::device("window_attention") else { return };
    let wd = |b, t, h, h_kv, d, window, n_global| WindowDims { b, t, h, h_kv, d, window, n_global };
    for (n, dims) in [
        wd(2, 200, 4, 2, 64, 48, 0),   // GQA, G = 0, W and T not multiples of 64
        wd(1, 300, 2, 1, 64, 100, 70), // separate prefix and window ranges, both partial tiles
        wd(1, 333, 2, 2, 64, 1, 1),    // each query sees itself and token 0
        wd(1, 520, 2, 1, 64, 64, 64),  // tile-aligned W and G
        wd(1, 130, 2, 1, 128, 64, 16), // d = 128
        wd(2, 257, 4, 1, 128, 17, 3),  // d = 128, GQA 4:1, small W and G
        wd(1, 400, 2, 1, 128, 150, 0), // d = 128, window across three key tiles
    ]
    .into_iter()
    .enumerate()
    {
        check_against_cpu(&be, &dims, 30 + 4 * n as u64);
    }
}

#[test]
fn window_attention_full_window_equals_dense() {
    use cpu::attention::AttnDims;
    let Some(be) = super::device("window_attention_full_window") else { return };
    // W >= T and G >= T both make every causal key visible
    for (n, (t, d, window, n_global)) in
        [(100, 64, 100, 0), (130, 128, 1000, 0), (150, 64, 3, 150), (70, 128, 1, 5000)].into_iter().enumerate()
    {
        let dims = WindowDims { b: 1, t, h: 4, h_kv: 2, d, window, n_global };
        let gpu = check_against_cpu(&be, &dims, 60 + 4 * n as u64);
        let x = inputs(&dims, 60 + 4 * n as u64);
        let ad = AttnDims { b: dims.b, t, h: dims.h, h_kv: dims.h_kv, d };
        let (gq, gk, gv, gdo) = (up(&be, &x[0]), up(&be, &x[1]), up(&be, &x[2]), up(&be, &x[3]));
        let go = DeviceBuffer::<bf16>::uninit(&be, ad.q_len()).unwrap();
        let gl = DeviceBuffer::<f32>::uninit(&be, ad.lse_len()).unwrap();
        cuda::attention::attention_forward(&be, &ad, &gq, &gk, &gv, &go, &gl).unwrap();
        let gdq = DeviceBuffer::<f32>::uninit(&be, ad.q_len()).unwrap();
        let gdk = DeviceBuffer::<f32>::uninit(&be, ad.kv_len()).unwrap();
        let gdv = DeviceBuffer::<f32>::uninit(&be, ad.kv_len()).unwrap();
        cuda::attention::attention_backward(&be, &ad, &gq, &gk, &gv, &go, &gl, &gdo, [&gdq, &gdk, &gdv]).unwrap();
        // expected bitwise equal; allowed one bf16 rounding of out and f32 noise elsewhere
        assert_close(&format!("full window out vs dense {dims:?}"), &gpu.out, &down(&go), 1e-6, 1.0 / 256.0);
        assert_close(&format!("full window lse vs dense {dims:?}"), &gpu.lse, &gl.to_host().unwrap(), 1e-6, 1e-6);
        let dense = [gdq.to_host().unwrap(), gdk.to_host().unwrap(), gdv.to_host().unwrap()];
        for ((name, got), want) in ["dq", "dk", "dv"].iter().zip(&gpu.grads).zip(&dense) {
            assert_close(&format!("full window {name} vs dense {dims:?}"), got, want, 1e-5, 1e-5);
        }
    }
}

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
