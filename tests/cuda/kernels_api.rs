//! The device kernel API (`nanoseek::kernels::cuda`) beyond parity: tensors round-trip, and wrong
//! arguments are answered with errors on a device too. Its parity checks against the CPU twins in
//! `nanoseek::kernels` are the selftest group `kernels_api` (`kernels_api_matches_cpu` in
//! tests/cuda.rs).

use super::device;
use nanoseek::kernels::cuda::{self as gk, DeviceSelection, DeviceTensor, RopeTableGpu};
use nanoseek::kernels::{RouterConfig, ScoreFunc, Selection, PAD};
use nanoseek::Tensor;

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
