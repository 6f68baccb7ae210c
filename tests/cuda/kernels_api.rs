//! The device kernel API (`nanoseek::kernels::cuda`) against its CPU twins in `nanoseek::kernels`:
//! every function on the same bf16-exact inputs (uploaded with `DeviceTensor::from_host`, so the
//! rounding to bf16 is a no-op), the GPU result read back with `to_host`, and wrong arguments
//! answered with errors on a device too.
//!
//! Tolerances (|gpu − cpu| ≤ atol + rtol·|cpu|), by what the GPU rounds (as in `tests/cuda.rs`):
//! - bf16 outputs of element-wise kernels (rmsnorm, rope, rope_qknorm, swiglu, embedding):
//!   atol = rtol = 1e-2 (one bf16 rounding is ≤ 2⁻⁹ ≈ 2e-3 relative; embedding is exact, rounded
//!   once); rope_qknorm's rstd (f32 math on both sides, rsqrtf and the summation order differ):
//!   atol 1e-5, rtol 1e-4;
//! - matmul, linear, linear_residual and linear_swiglu, bf16 output: one rounding of an f32 sum
//!   whose order differs: rtol 1e-2, atol 1e-3·√k;
//! - cross-entropy: f32 math on both sides, the mean in f64: rtol 1e-4, atol 1e-5;
//! - dense and window attention: P is rounded to bf16 before P·V: out atol = rtol = 2e-2, lse
//!   1e-3; sparse attention keeps P in f32: out atol = rtol = 1e-2, lse 1e-4;
//! - dsa_topk: identical selections (integer indexer inputs: every score is an exact integer in
//!   f32 on both sides, whatever the summation order, so even the ties agree);
//! - moe_route: identical experts, order, positions and counts; scores and gates at rtol 1e-6
//!   (the router reproduces the CPU's f32 operations one by one).

use super::{assert_close, device, rand_bf16};
use nanoseek::kernels::cuda::{self as gk, DeviceSelection, DeviceTensor, RopeTableGpu};
use nanoseek::kernels::{self, RopeTable, RouterConfig, ScoreFunc, Selection, PAD};
use nanoseek::Tensor;

fn rand_t(seed: u64, shape: &[usize], amp: f32) -> Tensor {
    Tensor::from_vec(shape, rand_bf16(seed, shape.iter().product(), amp))
}

/// Deterministic integers in [-amp, amp] (exact in bf16).
fn rand_int(seed: u64, shape: &[usize], amp: i32) -> Tensor {
    let v = rand_bf16(seed, shape.iter().product(), 1.0);
    Tensor::from_vec(shape, v.iter().map(|x| (x * amp as f32).round()).collect())
}

fn put(be: &nanoseek::backend::cuda::CudaBackend, t: &Tensor) -> DeviceTensor {
    DeviceTensor::from_host(be, t).unwrap()
}

#[track_caller]
fn same(what: &str, gpu: &Tensor, cpu: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(gpu.shape, cpu.shape, "{what}: shapes");
    assert_close(what, &gpu.data, &cpu.data, atol, rtol);
}

#[test]
fn tensors_round_trip() {
    let Some(be) = device("kernels_api tensors") else { return };
    let t = Tensor::from_vec(&[2, 3], vec![1.0, -2.5, 0.1, 3.0, 1e-3, 7.0]);
    let b = DeviceTensor::<half::bf16>::from_host(&be, &t).unwrap();
    assert_eq!(b.shape(), &[2, 3]);
    assert_eq!(b.to_host().unwrap(), Tensor::from_bf16(&[2, 3], &t.to_bf16()));
    let f = DeviceTensor::<f32>::from_host(&be, &t).unwrap();
    assert_eq!(f.to_host().unwrap(), t);
    assert_eq!(DeviceTensor::<f32>::zeros(&be, &[4]).unwrap().to_vec().unwrap(), vec![0.0; 4]);
    let r = f.reshape(&[3, 2]).unwrap();
    assert_eq!(r.shape(), &[3, 2]);
    assert!(r.reshape(&[4, 2]).is_err());
    assert!(DeviceTensor::<u32>::from_slice(&be, &[2, 2], &[1, 2, 3]).is_err());
}

#[test]
fn gemms_match_cpu() {
    let Some(be) = device("kernels_api gemms") else { return };
    let (a, b) = (rand_t(1, &[37, 64], 1.0), rand_t(2, &[64, 72], 1.0));
    let c = gk::matmul(&be, &put(&be, &a), &put(&be, &b)).unwrap().to_host().unwrap();
    same("matmul", &c, &kernels::matmul(&a, &b), 1e-3 * 8.0, 1e-2);
    let (x, w) = (rand_t(3, &[2, 19, 64], 1.0), rand_t(4, &[40, 64], 1.0));
    let y = gk::linear(&be, &put(&be, &x), &put(&be, &w)).unwrap().to_host().unwrap();
    same("linear", &y, &kernels::linear(&x, &w), 1e-3 * 8.0, 1e-2);
    let (r, g) = (rand_t(5, &[2, 19, 40], 2.0), rand_t(6, &[2, 19, 40], 3.0));
    let (gx, gw) = (put(&be, &x), put(&be, &w));
    let y = gk::linear_residual(&be, &gx, &gw, &put(&be, &r)).unwrap().to_host().unwrap();
    same("linear_residual", &y, &kernels::linear_residual(&x, &w, &r), 1e-3 * 8.0, 1e-2);
    let y = gk::linear_swiglu(&be, &gx, &gw, &put(&be, &g)).unwrap().to_host().unwrap();
    same("linear_swiglu", &y, &kernels::linear_swiglu(&x, &w, &g), 1e-3 * 8.0, 1e-2);
    let Err(e) = gk::linear_swiglu(&be, &gx, &gw, &put(&be, &x)) else { panic!("a gate of the wrong shape") };
    assert!(e.0.contains("gate [2, 19, 64] must have the output's shape [2, 19, 40]"), "{e}");
}

#[test]
fn elementwise_families_match_cpu() {
    let Some(be) = device("kernels_api elementwise") else { return };
    let x = rand_t(5, &[3, 7, 128], 2.0);
    let y = gk::rmsnorm(&be, &put(&be, &x), 64).unwrap().to_host().unwrap();
    same("rmsnorm", &y, &kernels::rmsnorm(&x, 64), 1e-2, 1e-2);

    let (g, u) = (rand_t(6, &[5, 99], 4.0), rand_t(7, &[5, 99], 2.0));
    let y = gk::swiglu(&be, &put(&be, &g), &put(&be, &u)).unwrap().to_host().unwrap();
    same("swiglu", &y, &kernels::swiglu(&g, &u), 1e-2, 1e-2);

    let (q, k) = (rand_t(8, &[2, 21, 4, 64], 1.0), rand_t(9, &[2, 21, 2, 64], 1.0));
    let (table, gtable) = (RopeTable::new(64, 32, 10000.0), RopeTableGpu::new(&be, 64, 32, 10000.0).unwrap());
    let rq = gk::rope(&be, &put(&be, &q), &gtable).unwrap().to_host().unwrap();
    same("rope", &rq, &kernels::rope(&q, &table), 1e-2, 1e-2);
    let (fq, fk) = gk::rope_qk(&be, &put(&be, &q), &put(&be, &k), &gtable).unwrap();
    same("rope_qk q", &fq.to_host().unwrap(), &kernels::rope(&q, &table), 1e-2, 1e-2);
    same("rope_qk k", &fk.to_host().unwrap(), &kernels::rope(&k, &table), 1e-2, 1e-2);
    // QK-norm fused with RoPE: raw heads of amplitude 2 (normalized outputs are O(1))
    let (q, k) = (rand_t(12, &[2, 21, 4, 64], 2.0), rand_t(13, &[2, 21, 2, 64], 2.0));
    let (nq, nk, nrq, nrk) = gk::rope_qknorm(&be, &put(&be, &q), &put(&be, &k), &gtable).unwrap();
    let (wq, wk, wrq, wrk) = kernels::rope_qknorm(&q, &k, &table);
    same("rope_qknorm q", &nq.to_host().unwrap(), &wq, 1e-2, 1e-2);
    same("rope_qknorm k", &nk.to_host().unwrap(), &wk, 1e-2, 1e-2);
    same("rope_qknorm rstd_q", &nrq.to_host().unwrap(), &wrq, 1e-5, 1e-4);
    same("rope_qknorm rstd_k", &nrk.to_host().unwrap(), &wrk, 1e-5, 1e-4);

    let emb = rand_t(10, &[50, 24], 1.0);
    let ids = [3u32, 0, 49, 3, 17];
    let out = gk::embedding(&be, &DeviceTensor::from_host(&be, &emb).unwrap(), &ids).unwrap();
    same("embedding", &out.to_host().unwrap(), &kernels::embedding(&emb, &ids), 1e-2, 1e-2);

    let logits = rand_t(11, &[2, 9, 136], 6.0);
    let targets: Vec<i32> = (0..18).map(|i| if i % 5 == 4 { -1 } else { i * 31 % 136 }).collect();
    for cap in [0.0, 15.0] {
        let got = gk::softcap_cross_entropy(&be, &put(&be, &logits), &targets, cap).unwrap();
        let want = kernels::softcap_cross_entropy(&logits, &targets, cap);
        assert_close(&format!("cross_entropy cap {cap}"), &[got], &[want], 1e-5, 1e-4);
    }
}

#[test]
fn attentions_match_cpu() {
    let Some(be) = device("kernels_api attention") else { return };
    for d in [64, 128] {
        let (q, k, v) =
            (rand_t(12, &[2, 75, 4, d], 1.0), rand_t(13, &[2, 75, 2, d], 1.0), rand_t(14, &[2, 75, 2, d], 1.0));
        let (gq, gk_, gv) = (put(&be, &q), put(&be, &k), put(&be, &v));
        let (out, lse) = gk::causal_attention(&be, &gq, &gk_, &gv).unwrap();
        let (wo, wl) = kernels::causal_attention(&q, &k, &v);
        same(&format!("causal out d{d}"), &out.to_host().unwrap(), &wo, 2e-2, 2e-2);
        same(&format!("causal lse d{d}"), &lse.to_host().unwrap(), &wl, 1e-3, 1e-3);
        for (w, g) in [(9, 0), (20, 3), (1, 70)] {
            let (out, lse) = gk::window_attention(&be, &gq, &gk_, &gv, w, g).unwrap();
            let (wo, wl) = kernels::window_attention(&q, &k, &v, w, g);
            same(&format!("window out d{d} W{w} G{g}"), &out.to_host().unwrap(), &wo, 2e-2, 2e-2);
            same(&format!("window lse d{d} W{w} G{g}"), &lse.to_host().unwrap(), &wl, 1e-3, 1e-3);
        }
    }
}

#[test]
fn sparse_attention_matches_cpu() {
    let Some(be) = device("kernels_api dsa") else { return };
    let (b, t, hi, di) = (2, 90, 4, 32);
    let (qi, ki, wi) = (rand_int(15, &[b, t, hi, di], 3), rand_int(16, &[b, t, di], 3), rand_int(17, &[b, t, hi], 2));
    let (q, k, v) = (rand_t(18, &[b, t, 4, 64], 1.0), rand_t(19, &[b, t, 2, 64], 1.0), rand_t(20, &[b, t, 2, 64], 1.0));
    for (topk, window) in [(8, 4), (0, 5), (100, 0)] {
        let want = kernels::dsa_topk(&qi, &ki, &wi, topk, window);
        let sel = gk::dsa_topk(&be, &put(&be, &qi), &put(&be, &ki), &put(&be, &wi), topk, window).unwrap();
        assert_eq!(sel.to_host().unwrap(), want, "dsa_topk topk {topk} window {window}");
        let (out, lse) = gk::sparse_attention(&be, &put(&be, &q), &put(&be, &k), &put(&be, &v), &sel).unwrap();
        let (wo, wl) = kernels::sparse_attention(&q, &k, &v, &want);
        same("sparse out", &out.to_host().unwrap(), &wo, 1e-2, 1e-2);
        same("sparse lse", &lse.to_host().unwrap(), &wl, 1e-4, 1e-4);
        // an uploaded host selection gives the same
        let up = DeviceSelection::from_host(&be, &want).unwrap();
        let (out2, _) = gk::sparse_attention(&be, &put(&be, &q), &put(&be, &k), &put(&be, &v), &up).unwrap();
        assert_eq!(out2.to_vec().unwrap(), out.to_vec().unwrap());
    }
}

#[test]
fn moe_route_matches_cpu() {
    let Some(be) = device("kernels_api moe") else { return };
    let cfg = RouterConfig {
        n_experts: 16,
        top_k: 4,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        score_func: ScoreFunc::Sigmoid,
        capacity_factor: Some(1.0),
    };
    let (logits, bias) = (rand_t(21, &[300, 16], 3.0), rand_t(22, &[16], 0.1));
    let want = kernels::moe_route(&logits, &bias, &cfg);
    let (gl, gb) = (DeviceTensor::from_host(&be, &logits).unwrap(), DeviceTensor::from_host(&be, &bias).unwrap());
    let got = gk::moe_route(&be, &gl, &gb, &cfg).unwrap().to_host().unwrap();
    assert_eq!(
        (&got.experts, &got.kept, &got.order, &got.position),
        (&want.experts, &want.kept, &want.order, &want.position)
    );
    assert_eq!(
        (&got.demand, &got.counts, &got.offsets, got.dropped),
        (&want.demand, &want.counts, &want.offsets, want.dropped)
    );
    assert_close("moe scores", &got.scores, &want.scores, 0.0, 1e-6);
    assert_close("moe gates", &got.gates, &want.gates, 0.0, 1e-6);
}

#[test]
fn wrong_arguments_are_errors_on_the_device() {
    let Some(be) = device("kernels_api errors") else { return };
    let z = |shape: &[usize]| DeviceTensor::zeros(&be, shape).unwrap();
    assert!(gk::matmul(&be, &z(&[4, 8]), &z(&[16, 8])).is_err());
    assert!(gk::matmul(&be, &z(&[4, 12]), &z(&[12, 8])).is_err(), "k = 12 is not a multiple of 8");
    assert!(gk::linear(&be, &z(&[4, 8]), &z(&[8, 16])).is_err());
    assert!(gk::rmsnorm(&be, &z(&[4, 12]), 12).is_err(), "dim 12 is not a multiple of 8");
    assert!(gk::swiglu(&be, &z(&[4, 8]), &z(&[8, 4])).is_err());
    let (q, kv) = (z(&[1, 8, 2, 32]), z(&[1, 8, 1, 32]));
    assert!(gk::causal_attention(&be, &q, &kv, &kv).is_err(), "head dim 32");
    let (q, kv) = (z(&[1, 8, 3, 64]), z(&[1, 8, 2, 64]));
    assert!(gk::causal_attention(&be, &q, &kv, &kv).is_err(), "3 heads over 2");
    assert!(gk::window_attention(&be, &z(&[1, 8, 2, 64]), &kv, &kv, 0, 0).is_err());
    assert!(gk::softcap_cross_entropy(&be, &z(&[2, 16]), &[0, 16], 0.0).is_err());
    assert!(gk::embedding(&be, &DeviceTensor::<f32>::zeros(&be, &[10, 8]).unwrap(), &[10]).is_err());
    let table = RopeTableGpu::new(&be, 64, 8, 10000.0).unwrap();
    assert!(gk::rope(&be, &z(&[1, 9, 2, 64]), &table).is_err(), "t past the table");
    assert!(gk::rope_qknorm(&be, &z(&[1, 9, 2, 64]), &z(&[1, 9, 1, 64]), &table).is_err(), "t past the table");
    assert!(gk::rope_qknorm(&be, &z(&[1, 8, 2, 64]), &z(&[1, 7, 1, 64]), &table).is_err(), "k's t differs");
    let wide = RopeTableGpu::new(&be, 1024, 8, 10000.0).unwrap();
    assert!(gk::rope_qknorm(&be, &z(&[1, 8, 1, 1024]), &z(&[1, 8, 1, 1024]), &wide).is_err(), "head_dim > 512");
    let bad = Selection { shape: [1, 2, 1], sel: vec![1, 0], topk: 1, window: 0 };
    assert!(DeviceSelection::from_host(&be, &bad).is_err(), "row 0 selects key 1");
    let pad = Selection { shape: [1, 2, 1], sel: vec![0, PAD], topk: 1, window: 0 };
    assert!(DeviceSelection::from_host(&be, &pad).is_err(), "row 1 is empty");
    let cfg = RouterConfig {
        n_experts: 8,
        top_k: 9,
        n_group: 1,
        topk_group: 1,
        routed_scaling_factor: 1.0,
        score_func: ScoreFunc::Softmax,
        capacity_factor: None,
    };
    let (l, b) = (DeviceTensor::<f32>::zeros(&be, &[3, 8]).unwrap(), DeviceTensor::<f32>::zeros(&be, &[8]).unwrap());
    assert!(gk::moe_route(&be, &l, &b, &cfg).is_err(), "top_k > E");
}
