//! Bitwise preservation of the attention kernels across their move onto the shared core
//! ([`super::flash`], [`super::flash_gather`]): the public functions of [`super::attention`],
//! [`super::window_attention`] and [`super::dsa`] against verbatim copies of their previous
//! versions (the submodules here, test-only), compared as f32 bits on randomised shapes (several
//! b, t, h, h_kv, d, window, n_global, topk; t = 1, t not a multiple of the block, GQA).
//!
//! The copies include the block softmax (`blocks.rs`), so a change to the live one is caught too;
//! only `gemm` and `math` are shared. They are kept rather than golden hashes because the GEMM
//! crate picks its kernels by CPU model: golden bits would not travel between machines, the
//! comparison on the same machine does.

#![allow(dead_code)]

mod attention;
mod blocks;
mod dsa;
mod window_attention;

use super::attention::AttnDims;
use super::dsa::DsaDims;
use super::window_attention::WindowDims;
use crate::backend::cpu;

/// SplitMix64 step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-amp, amp).
fn rand_vec(n: usize, amp: f32, seed: &mut u64) -> Vec<f32> {
    (0..n).map(|_| ((splitmix64(seed) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Asserts that each pair of tensors is bitwise equal, naming the first that is not.
fn assert_bitwise(case: &str, pairs: &[(&str, &[f32], &[f32])]) {
    for &(name, new, old) in pairs {
        assert_eq!(new.len(), old.len(), "{case}: {name} lengths differ");
        if let Some(i) = new.iter().zip(old).position(|(a, b)| a.to_bits() != b.to_bits()) {
            panic!("{case}: {name}[{i}] new {} old {} (not bitwise equal)", new[i], old[i]);
        }
    }
}

/// q, k, v, dout for `b·t` tokens of `h` query and `h_kv` kv heads of width `d`.
fn qkv(b: usize, t: usize, h: usize, h_kv: usize, d: usize, seed: u64) -> [Vec<f32>; 4] {
    let mut s = seed;
    let (ql, kvl) = (b * t * h * d, b * t * h_kv * d);
    [rand_vec(ql, 2.0, &mut s), rand_vec(kvl, 2.0, &mut s), rand_vec(kvl, 1.0, &mut s), rand_vec(ql, 1.0, &mut s)]
}

/// (b, t, h, h_kv, d): t = 1, short, one block, one block + 1, a short last block, several
/// blocks; MHA and GQA (h_kv = 1 included); d = 16, 20 (a `dot` tail), 64.
const SHAPES: [(usize, usize, usize, usize, usize); 10] = [
    (1, 1, 1, 1, 16),
    (2, 1, 4, 2, 64),
    (2, 7, 4, 2, 16),
    (1, 64, 4, 4, 64),
    (1, 65, 2, 1, 20),
    (2, 100, 4, 2, 16),
    (1, 130, 4, 1, 64),
    (2, 130, 6, 3, 16),
    (1, 200, 3, 3, 16),
    (1, 257, 4, 2, 32),
];

#[test]
fn dense_attention_is_bitwise_unchanged() {
    for (n, &(b, t, h, h_kv, d)) in SHAPES.iter().enumerate() {
        let [q, k, v, dout] = qkv(b, t, h, h_kv, d, 1000 + n as u64);
        let dims = AttnDims { b, t, h, h_kv, d };
        let old = attention::AttnDims { b, t, h, h_kv, d };
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        let (mut out_o, mut lse_o) = (out.clone(), lse.clone());
        cpu::attention::attention_forward(&dims, &q, &k, &v, &mut out, &mut lse);
        attention::attention_forward(&old, &q, &k, &v, &mut out_o, &mut lse_o);
        let case = format!("dense {dims:?}");
        assert_bitwise(&case, &[("out", &out, &out_o), ("lse", &lse, &lse_o)]);
        let [mut dq, mut dk, mut dv] = [vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]];
        let [mut dq_o, mut dk_o, mut dv_o] = [dq.clone(), dk.clone(), dv.clone()];
        cpu::attention::attention_backward(&dims, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv);
        attention::attention_backward(&old, &q, &k, &v, &out, &lse, &dout, &mut dq_o, &mut dk_o, &mut dv_o);
        assert_bitwise(&case, &[("dq", &dq, &dq_o), ("dk", &dk, &dk_o), ("dv", &dv, &dv_o)]);
    }
}

#[test]
fn window_attention_is_bitwise_unchanged() {
    let mut n = 0u64;
    for &(b, t, h, h_kv, d) in &SHAPES {
        for (window, n_global) in [(1, 0), (16, 4), (64, 0), (65, 64), (100, 1), (300, 70), (3, 500)] {
            n += 1;
            let [q, k, v, dout] = qkv(b, t, h, h_kv, d, 2000 + n);
            let dims = WindowDims { b, t, h, h_kv, d, window, n_global };
            let old = window_attention::WindowDims { b, t, h, h_kv, d, window, n_global };
            let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
            let (mut out_o, mut lse_o) = (out.clone(), lse.clone());
            cpu::window_attention::window_attention_forward(&dims, &q, &k, &v, &mut out, &mut lse);
            window_attention::window_attention_forward(&old, &q, &k, &v, &mut out_o, &mut lse_o);
            let case = format!("window {dims:?}");
            assert_bitwise(&case, &[("out", &out, &out_o), ("lse", &lse, &lse_o)]);
            let [mut dq, mut dk, mut dv] =
                [vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]];
            let [mut dq_o, mut dk_o, mut dv_o] = [dq.clone(), dk.clone(), dv.clone()];
            let f = cpu::window_attention::window_attention_backward;
            f(&dims, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv);
            let f = window_attention::window_attention_backward;
            f(&old, &q, &k, &v, &out, &lse, &dout, &mut dq_o, &mut dk_o, &mut dv_o);
            assert_bitwise(&case, &[("dq", &dq, &dq_o), ("dk", &dk, &dk_o), ("dv", &dv, &dv_o)]);
        }
    }
}

/// Indexer inputs qi, ki, wi of `dims`. With `coarse`, integer-valued in [-2, 2] so that the
/// indexer scores tie often (exercising the tie rule).
fn indexer_inputs(dims: &DsaDims, coarse: bool, seed: u64) -> [Vec<f32>; 3] {
    let mut s = seed;
    let mut f = |n: usize, amp: f32| -> Vec<f32> {
        let x = rand_vec(n, amp, &mut s);
        if coarse {
            x.into_iter().map(|v| (v * 2.0).round()).collect()
        } else {
            x
        }
    };
    [f(dims.qi_len(), 1.0), f(dims.ki_len(), 1.0), f(dims.wi_len(), 0.5)]
}

fn old_dsa(d: &DsaDims) -> dsa::DsaDims {
    dsa::DsaDims::new(d.b, d.t, d.h, d.h_kv, d.d, d.n_index_heads, d.index_dim, d.topk, d.window)
}

#[test]
fn dsa_is_bitwise_unchanged() {
    let mut n = 0u64;
    for &(b, t, h, h_kv, d) in &SHAPES {
        for (n_index_heads, index_dim, topk, window) in [(1, 8, 1, 0), (2, 16, 4, 3), (4, 32, 64, 0), (3, 8, 20, 100)] {
            n += 1;
            let dims = DsaDims { b, t, h, h_kv, d, n_index_heads, index_dim, topk, window };
            let old = old_dsa(&dims);
            let case = format!("dsa {dims:?}");
            let [qi, ki, wi] = indexer_inputs(&dims, n % 2 == 0, 3000 + n);
            let [q, k, v, dout] = qkv(b, t, h, h_kv, d, 4000 + n);
            let (mut sel, mut sel_o) = (vec![0; dims.sel_len()], vec![0; dims.sel_len()]);
            cpu::dsa::indexer_topk(&dims, &qi, &ki, &wi, &mut sel);
            dsa::indexer_topk(&old, &qi, &ki, &wi, &mut sel_o);
            assert_eq!(sel, sel_o, "{case}: indexer_topk differs");
            let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
            let (mut out_o, mut lse_o) = (out.clone(), lse.clone());
            cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);
            dsa::dsa_attention_forward(&old, &q, &k, &v, &sel, &mut out_o, &mut lse_o);
            assert_bitwise(&case, &[("out", &out, &out_o), ("lse", &lse, &lse_o)]);
            let [mut dq, mut dk, mut dv] =
                [vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]];
            let [mut dq_o, mut dk_o, mut dv_o] = [dq.clone(), dk.clone(), dv.clone()];
            let f = cpu::dsa::dsa_attention_backward;
            f(&dims, &q, &k, &v, &sel, &out, &lse, &dout, &mut dq, &mut dk, &mut dv);
            let f = dsa::dsa_attention_backward;
            f(&old, &q, &k, &v, &sel, &out, &lse, &dout, &mut dq_o, &mut dk_o, &mut dv_o);
            assert_bitwise(&case, &[("dq", &dq, &dq_o), ("dk", &dk, &dk_o), ("dv", &dv, &dv_o)]);
            // The KL loss, sparse (over sel, with the sparse lse) and dense (the dense lse).
            let mut lse_dense = vec![0.0; dims.lse_len()];
            cpu::attention::attention_forward(&dims.attn(), &q, &k, &v, &mut out, &mut lse_dense);
            for (sel_arg, lse_arg) in [(Some(&sel[..]), &lse), (None, &lse_dense)] {
                let [mut dqi, mut dki, mut dwi] = [vec![0.0; qi.len()], vec![0.0; ki.len()], vec![0.0; wi.len()]];
                let [mut dqi_o, mut dki_o, mut dwi_o] = [dqi.clone(), dki.clone(), dwi.clone()];
                let f = cpu::dsa::indexer_kl;
                let l = f(&dims, &q, &k, lse_arg, &qi, &ki, &wi, sel_arg, &mut dqi, &mut dki, &mut dwi);
                let f = dsa::indexer_kl;
                let l_o = f(&old, &q, &k, lse_arg, &qi, &ki, &wi, sel_arg, &mut dqi_o, &mut dki_o, &mut dwi_o);
                let case = format!("{case} kl sparse={}", sel_arg.is_some());
                assert_bitwise(&case, &[("loss", &[l], &[l_o]), ("dqi", &dqi, &dqi_o)]);
                assert_bitwise(&case, &[("dki", &dki, &dki_o), ("dwi", &dwi, &dwi_o)]);
            }
        }
    }
}

/// Hand-made selections (keys out of order, fewer than `kmax` with padding, duplicates-free but
/// arbitrary) through the sparse attention, old and new.
#[test]
fn dsa_attention_on_arbitrary_selections_is_bitwise_unchanged() {
    let dims = DsaDims { b: 2, t: 77, h: 4, h_kv: 2, d: 24, n_index_heads: 1, index_dim: 1, topk: 9, window: 2 };
    let old = old_dsa(&dims);
    let kmax = dims.kmax();
    let mut s = 77u64;
    let mut sel = vec![cpu::dsa::PAD; dims.sel_len()];
    for (row, i) in sel.chunks_exact_mut(kmax).zip((0..dims.t).cycle()) {
        let n = 1 + (splitmix64(&mut s) as usize) % kmax.min(i + 1);
        let mut keys: Vec<u32> = (0..=i as u32).collect();
        for j in 0..n {
            let r = j + (splitmix64(&mut s) as usize) % (keys.len() - j);
            keys.swap(j, r);
        }
        row[..n].copy_from_slice(&keys[..n]);
    }
    let [q, k, v, dout] = qkv(dims.b, dims.t, dims.h, dims.h_kv, dims.d, 5);
    let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
    let (mut out_o, mut lse_o) = (out.clone(), lse.clone());
    cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);
    dsa::dsa_attention_forward(&old, &q, &k, &v, &sel, &mut out_o, &mut lse_o);
    assert_bitwise("arbitrary sel", &[("out", &out, &out_o), ("lse", &lse, &lse_o)]);
    let [mut dq, mut dk, mut dv] = [vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]];
    let [mut dq_o, mut dk_o, mut dv_o] = [dq.clone(), dk.clone(), dv.clone()];
    cpu::dsa::dsa_attention_backward(&dims, &q, &k, &v, &sel, &out, &lse, &dout, &mut dq, &mut dk, &mut dv);
    dsa::dsa_attention_backward(&old, &q, &k, &v, &sel, &out, &lse, &dout, &mut dq_o, &mut dk_o, &mut dv_o);
    assert_bitwise("arbitrary sel", &[("dq", &dq, &dq_o), ("dk", &dk, &dk_o), ("dv", &dv, &dv_o)]);
}

/// Bitwise equality does not depend on the thread count (the parallel split is the old one).
#[test]
fn bitwise_unchanged_with_one_and_three_threads() {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(dense_attention_is_bitwise_unchanged);
        pool.install(dsa_attention_on_arbitrary_selections_is_bitwise_unchanged);
    }
}
