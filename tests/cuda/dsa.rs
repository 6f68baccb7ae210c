//! CUDA parity tests of the `dsa` family against `cpu::dsa`.
//!
//! Tolerances (|gpu − cpu| ≤ atol + rtol·|cpu|), by what differs between the two:
//! - selection (`indexer_topk`): **identical** index sets. The indexer inputs are small
//!   integers (exact in bf16), so every product and partial sum of the scores is an exact
//!   integer in f32 on both sides whatever the summation order: the scores agree bit for bit,
//!   many of them tie, and the tie rule (the more recent key wins) is exercised for real;
//! - sparse attention: the GPU keeps P in f32 (no bf16 rounding before P·V), so only the bf16
//!   rounding of `out` (≤ 2⁻⁹ relative) and the summation order differ: out atol = rtol = 1e-2,
//!   lse 1e-4; the f32 gradients differ by summation order, the exp2 implementations (the
//!   CPU's polynomial vs the GPU's `exp2f`, both ~1e-7 relative) and the order of the atomic
//!   additions into dk, dv: atol = rtol = 5e-3. The CPU backward runs on the GPU's bf16 `out`
//!   so both use the same delta;
//! - indexer KL: f32 on both sides, same formulas; the loss is a sum of `p (ln p − ln r)` terms
//!   that partly cancel: atol 1e-5, rtol 1e-3; the gradients (of size ~1/(B·T)) atol 1e-3 × their
//!   largest magnitude, rtol 1e-3. The dense (warm-up) form has the same tolerances: the same
//!   terms over every earlier key, its lse_I from a running max and sum instead of one pass;
//! - decode (one new query per sequence, the caches holding the new token last): the selection
//!   must equal the CPU's last row **exactly** (integer indexer inputs, as above), and the
//!   attention's out and lse the CPU's last row at the sparse attention's tolerances (out 1e-2,
//!   lse 1e-4), for the same reasons.

use super::{assert_close, device, down, rand_bf16, up};
use half::bf16;
use nanoseek::backend::cpu;
use nanoseek::backend::cpu::dsa::{DsaDims, PAD};
use nanoseek::backend::cuda::{self, CudaBackend, DeviceBuffer};

#[allow(clippy::too_many_arguments)]
fn dd(
    b: usize,
    t: usize,
    h: usize,
    h_kv: usize,
    d: usize,
    hi: usize,
    di: usize,
    topk: usize,
    window: usize,
) -> DsaDims {
    DsaDims { b, t, h, h_kv, d, n_index_heads: hi, index_dim: di, topk, window }
}

/// Deterministic integers in [-amp, amp] (as f32, exact in bf16).
fn rand_int(seed: u64, n: usize, amp: i32) -> Vec<f32> {
    rand_bf16(seed, n, 1.0)
        .iter()
        .map(|&u| ((u + 1.0) * 0.5 * (2 * amp + 1) as f32).floor().min((2 * amp) as f32) - amp as f32)
        .collect()
}

fn cpu_select(dims: &DsaDims, qi: &[f32], ki: &[f32], wi: &[f32]) -> Vec<u32> {
    let mut sel = vec![7u32; dims.sel_len()];
    cpu::dsa::indexer_topk(dims, qi, ki, wi, &mut sel);
    sel
}

fn gpu_select(be: &CudaBackend, dims: &DsaDims, qi: &[f32], ki: &[f32], wi: &[f32], chunk: Option<usize>) -> Vec<u32> {
    let sel = DeviceBuffer::<u32>::from_host(be, &vec![7u32; dims.sel_len()]).unwrap();
    let (gqi, gki, gwi) = (up(be, qi), up(be, ki), up(be, wi));
    match chunk {
        None => cuda::dsa::indexer_topk(be, dims, &gqi, &gki, &gwi, &sel).unwrap(),
        Some(rows) => cuda::dsa::indexer_topk_chunked(be, dims, &gqi, &gki, &gwi, &sel, rows).unwrap(),
    }
    sel.to_host().unwrap()
}

#[test]
fn dsa_topk_matches_cpu_exactly() {
    let Some(be) = device("dsa_topk") else { return };
    // (t, H_I, d_I, topk, window): several tiles, d_I not a multiple of the 32-wide chunk,
    // window only, top-k only, both, top-k larger than most rows.
    let cases = [
        (37, 2, 8, 5, 3),
        (200, 4, 40, 16, 8),
        (300, 3, 64, 40, 0),
        (130, 1, 16, 0, 7),
        (257, 8, 32, 100, 20),
        (520, 2, 24, 64, 16),
    ];
    for (n, &(t, hi, di, topk, window)) in cases.iter().enumerate() {
        let dims = dd(2, t, 1, 1, 64, hi, di, topk, window);
        let s = 100 + 3 * n as u64;
        let (qi, ki, wi) =
            (rand_int(s, dims.qi_len(), 2), rand_int(s + 1, dims.ki_len(), 2), rand_int(s + 2, dims.wi_len(), 2));
        let want = cpu_select(&dims, &qi, &ki, &wi);
        assert_eq!(gpu_select(&be, &dims, &qi, &ki, &wi, None), want, "sel {dims:?}");
        // chunks of 64 query rows: the workspace offsets q0 > 0
        assert_eq!(gpu_select(&be, &dims, &qi, &ki, &wi, Some(64)), want, "sel (chunks of 64) {dims:?}");
    }
}

#[test]
fn dsa_topk_ties_and_full_selection() {
    let Some(be) = device("dsa_topk_ties") else { return };
    let dims = dd(1, 150, 1, 1, 64, 2, 16, 10, 3);
    let ki = rand_int(7, dims.ki_len(), 3);
    let wi = rand_int(8, dims.wi_len(), 3);
    // Every score 0 (qi = 0): ties everywhere, the most recent keys win (a sliding window).
    let qi = vec![0.0; dims.qi_len()];
    let sel = gpu_select(&be, &dims, &qi, &ki, &wi, None);
    assert_eq!(sel, cpu_select(&dims, &qi, &ki, &wi));
    let kmax = dims.kmax();
    for i in 0..dims.t {
        let n = dims.n_selected(i);
        let want: Vec<u32> = (i + 1 - n..=i).map(|s| s as u32).collect();
        assert_eq!(&sel[i * kmax..][..n], &want[..], "t {i}");
        assert!(sel[i * kmax + n..(i + 1) * kmax].iter().all(|&s| s == PAD));
    }
    // One index key repeated: equal scores again, now non-zero (and some negative weights).
    let qi = rand_int(9, dims.qi_len(), 3);
    let same_ki = ki[..dims.index_dim].repeat(dims.t);
    assert_eq!(gpu_select(&be, &dims, &qi, &same_ki, &wi, None), cpu_select(&dims, &qi, &same_ki, &wi));
    // topk >= t: every key, in order (no scores needed), with and without a window.
    for window in [0, 5] {
        let full = dd(2, 90, 1, 1, 64, 2, 16, 90, window);
        let (qi, ki, wi) =
            (rand_int(10, full.qi_len(), 2), rand_int(11, full.ki_len(), 2), rand_int(12, full.wi_len(), 2));
        let sel = gpu_select(&be, &full, &qi, &ki, &wi, None);
        assert_eq!(sel, cpu_select(&full, &qi, &ki, &wi));
        for bi in 0..2 {
            for i in 0..full.t {
                let row = &sel[(bi * full.t + i) * full.kmax()..][..full.kmax()];
                assert!(
                    row[..=i].iter().enumerate().all(|(s, &x)| x == s as u32) && row[i + 1..].iter().all(|&x| x == PAD)
                );
            }
        }
    }
}

#[test]
fn dsa_attention_matches_cpu() {
    let Some(be) = device("dsa_attention") else { return };
    for dims in
        [dd(2, 150, 4, 2, 64, 2, 16, 40, 16), dd(1, 133, 6, 2, 128, 2, 16, 24, 8), dd(1, 70, 4, 1, 128, 1, 8, 70, 0)]
    {
        let (qi, ki, wi) =
            (rand_bf16(30, dims.qi_len(), 1.0), rand_bf16(31, dims.ki_len(), 1.0), rand_bf16(32, dims.wi_len(), 1.0));
        let sel = cpu_select(&dims, &qi, &ki, &wi);
        let q = rand_bf16(33, dims.q_len(), 1.0);
        let k = rand_bf16(34, dims.kv_len(), 1.0);
        let v = rand_bf16(35, dims.kv_len(), 1.0);
        let dout = rand_bf16(36, dims.q_len(), 1.0);
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);

        let gsel = DeviceBuffer::from_host(&be, &sel).unwrap();
        let (gq, gk, gv) = (up(&be, &q), up(&be, &k), up(&be, &v));
        let go = DeviceBuffer::<bf16>::uninit(&be, dims.q_len()).unwrap();
        let gl = DeviceBuffer::<f32>::uninit(&be, dims.lse_len()).unwrap();
        cuda::dsa::dsa_attention_forward(&be, &dims, &gq, &gk, &gv, &gsel, &go, &gl).unwrap();
        let gout = down(&go);
        assert_close(&format!("dsa out {dims:?}"), &gout, &out, 1e-2, 1e-2);
        assert_close(&format!("dsa lse {dims:?}"), &gl.to_host().unwrap(), &lse, 1e-4, 1e-4);

        let (mut dq, mut dk, mut dv) = (vec![0.0; dims.q_len()], vec![0.0; dims.kv_len()], vec![0.0; dims.kv_len()]);
        cpu::dsa::dsa_attention_backward(&dims, &q, &k, &v, &sel, &gout, &lse, &dout, &mut dq, &mut dk, &mut dv);
        // garbage in the outputs: dq must be overwritten, dk and dv zeroed first
        let gdq = DeviceBuffer::from_host(&be, &vec![f32::NAN; dims.q_len()]).unwrap();
        let gdk = DeviceBuffer::from_host(&be, &vec![3.0f32; dims.kv_len()]).unwrap();
        let gdv = DeviceBuffer::from_host(&be, &vec![-2.0f32; dims.kv_len()]).unwrap();
        cuda::dsa::dsa_attention_backward(
            &be,
            &dims,
            &gq,
            &gk,
            &gv,
            &gsel,
            &go,
            &gl,
            &up(&be, &dout),
            [&gdq, &gdk, &gdv],
        )
        .unwrap();
        assert_close(&format!("dsa dq {dims:?}"), &gdq.to_host().unwrap(), &dq, 5e-3, 5e-3);
        assert_close(&format!("dsa dk {dims:?}"), &gdk.to_host().unwrap(), &dk, 5e-3, 5e-3);
        assert_close(&format!("dsa dv {dims:?}"), &gdv.to_host().unwrap(), &dv, 5e-3, 5e-3);
    }
}

#[test]
fn dsa_indexer_kl_matches_cpu() {
    let Some(be) = device("dsa_indexer_kl") else { return };
    for dims in
        [dd(2, 130, 4, 2, 64, 4, 32, 24, 8), dd(1, 100, 2, 1, 128, 8, 64, 100, 0), dd(1, 77, 4, 4, 64, 3, 16, 5, 40)]
    {
        let (qi, ki, wi) =
            (rand_bf16(40, dims.qi_len(), 1.0), rand_bf16(41, dims.ki_len(), 1.0), rand_bf16(42, dims.wi_len(), 1.0));
        let sel = cpu_select(&dims, &qi, &ki, &wi);
        let q = rand_bf16(43, dims.q_len(), 2.0);
        let k = rand_bf16(44, dims.kv_len(), 2.0);
        let v = rand_bf16(45, dims.kv_len(), 1.0);
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);
        let (mut dqi, mut dki, mut dwi) =
            (vec![0.0; dims.qi_len()], vec![0.0; dims.ki_len()], vec![0.0; dims.wi_len()]);
        let loss = cpu::dsa::indexer_kl(&dims, &q, &k, &lse, &qi, &ki, &wi, Some(&sel), &mut dqi, &mut dki, &mut dwi);

        let gsel = DeviceBuffer::from_host(&be, &sel).unwrap();
        let gl = DeviceBuffer::from_host(&be, &lse).unwrap();
        let gdqi = DeviceBuffer::from_host(&be, &vec![f32::NAN; dims.qi_len()]).unwrap();
        let gdki = DeviceBuffer::from_host(&be, &vec![5.0f32; dims.ki_len()]).unwrap();
        let gdwi = DeviceBuffer::from_host(&be, &vec![f32::NAN; dims.wi_len()]).unwrap();
        let gloss = DeviceBuffer::<f32>::uninit(&be, 1).unwrap();
        let (gq, gk, gqi, gki, gwi) = (up(&be, &q), up(&be, &k), up(&be, &qi), up(&be, &ki), up(&be, &wi));
        cuda::dsa::indexer_kl(&be, &dims, &gq, &gk, &gl, &gqi, &gki, &gwi, Some(&gsel), [&gdqi, &gdki, &gdwi], &gloss)
            .unwrap();
        assert_close(&format!("kl loss {dims:?}"), &gloss.to_host().unwrap(), &[loss], 1e-5, 1e-3);
        for (name, got, want) in [("dqi", &gdqi, &dqi), ("dki", &gdki, &dki), ("dwi", &gdwi, &dwi)] {
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: the CPU gradient should not vanish");
            assert_close(&format!("kl {name} {dims:?}"), &got.to_host().unwrap(), want, 1e-3 * scale, 1e-3);
        }
    }
}

/// The dense (warm-up) KL: every key s ≤ t, `lse` the dense attention's (the CPU's
/// `attention_forward`), one and several key tiles per row, GQA and not.
#[test]
fn dsa_indexer_kl_dense_matches_cpu() {
    let Some(be) = device("dsa_indexer_kl_dense") else { return };
    for dims in
        [dd(2, 130, 4, 2, 64, 4, 32, 24, 8), dd(1, 100, 2, 1, 128, 8, 64, 100, 0), dd(1, 77, 4, 4, 64, 3, 16, 5, 40)]
    {
        let (qi, ki, wi) =
            (rand_bf16(50, dims.qi_len(), 1.0), rand_bf16(51, dims.ki_len(), 1.0), rand_bf16(52, dims.wi_len(), 1.0));
        let q = rand_bf16(53, dims.q_len(), 2.0);
        let k = rand_bf16(54, dims.kv_len(), 2.0);
        let v = rand_bf16(55, dims.kv_len(), 1.0);
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        cpu::attention::attention_forward(&dims.attn(), &q, &k, &v, &mut out, &mut lse);
        let (mut dqi, mut dki, mut dwi) =
            (vec![0.0; dims.qi_len()], vec![0.0; dims.ki_len()], vec![0.0; dims.wi_len()]);
        let loss = cpu::dsa::indexer_kl(&dims, &q, &k, &lse, &qi, &ki, &wi, None, &mut dqi, &mut dki, &mut dwi);

        let gl = DeviceBuffer::from_host(&be, &lse).unwrap();
        let gdqi = DeviceBuffer::from_host(&be, &vec![f32::NAN; dims.qi_len()]).unwrap();
        let gdki = DeviceBuffer::from_host(&be, &vec![5.0f32; dims.ki_len()]).unwrap();
        let gdwi = DeviceBuffer::from_host(&be, &vec![f32::NAN; dims.wi_len()]).unwrap();
        let gloss = DeviceBuffer::<f32>::uninit(&be, 1).unwrap();
        let (gq, gk, gqi, gki, gwi) = (up(&be, &q), up(&be, &k), up(&be, &qi), up(&be, &ki), up(&be, &wi));
        cuda::dsa::indexer_kl(&be, &dims, &gq, &gk, &gl, &gqi, &gki, &gwi, None, [&gdqi, &gdki, &gdwi], &gloss)
            .unwrap();
        assert_close(&format!("dense kl loss {dims:?}"), &gloss.to_host().unwrap(), &[loss], 1e-5, 1e-3);
        for (name, got, want) in [("dqi", &gdqi, &dqi), ("dki", &gdki, &dki), ("dwi", &gdwi, &dwi)] {
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: the CPU gradient should not vanish");
            assert_close(&format!("dense kl {name} {dims:?}"), &got.to_host().unwrap(), want, 1e-3 * scale, 1e-3);
        }
    }
}

/// The last token's rows of a `[b, t, width]` tensor: `[b, width]`.
fn last_rows(x: &[f32], dims: &DsaDims, width: usize) -> Vec<f32> {
    (0..dims.b).flat_map(|bi| x[(bi * dims.t + dims.t - 1) * width..][..width].iter().copied()).collect()
}

/// Decode selection: the new token (the last of `t` cached positions) against the index key
/// cache equals the CPU's full-sequence selection's last row exactly: several key blocks, d_I
/// odd and even, window only, top-k only, ties (qi = 0: the most recent keys), topk ≥ t.
#[test]
fn dsa_topk_decode_matches_cpu_exactly() {
    let Some(be) = device("dsa_topk_decode") else { return };
    let cases = [
        (37, 2, 8, 5, 3, false),
        (200, 4, 40, 16, 8, false),
        (300, 3, 63, 40, 0, false),
        (130, 1, 16, 0, 7, false),
        (520, 8, 32, 100, 20, false),
        (150, 2, 16, 10, 3, true),
        (90, 2, 16, 90, 5, false),
    ];
    for (n, &(t, hi, di, topk, window, zero_q)) in cases.iter().enumerate() {
        let dims = dd(3, t, 1, 1, 64, hi, di, topk, window);
        let s = 200 + 3 * n as u64;
        let mut qi = rand_int(s, dims.qi_len(), 2);
        if zero_q {
            qi.fill(0.0);
        }
        let (ki, wi) = (rand_int(s + 1, dims.ki_len(), 2), rand_int(s + 2, dims.wi_len(), 2));
        let kmax = dims.kmax();
        let full = cpu_select(&dims, &qi, &ki, &wi);
        let want: Vec<u32> = (0..dims.b).flat_map(|bi| full[(bi * t + t - 1) * kmax..][..kmax].to_vec()).collect();
        let (qi_l, wi_l) = (last_rows(&qi, &dims, hi * di), last_rows(&wi, &dims, hi));
        let sel = DeviceBuffer::<u32>::from_host(&be, &vec![7u32; dims.b * kmax]).unwrap();
        cuda::dsa::indexer_topk_decode(&be, &dims, &up(&be, &qi_l), &up(&be, &ki), &up(&be, &wi_l), &sel).unwrap();
        assert_eq!(sel.to_host().unwrap(), want, "decode sel {dims:?}");
    }
}

/// Decode attention: the new token's query over its selection of the K/V caches equals the
/// CPU's full-sequence sparse attention's last row (out and lse), GQA and not, d 64 and 128.
#[test]
fn dsa_attention_decode_matches_cpu() {
    let Some(be) = device("dsa_attention_decode") else { return };
    for dims in
        [dd(2, 150, 4, 2, 64, 2, 16, 40, 16), dd(3, 133, 6, 2, 128, 2, 16, 24, 8), dd(1, 70, 4, 1, 128, 1, 8, 70, 0)]
    {
        let (qi, ki, wi) =
            (rand_bf16(60, dims.qi_len(), 1.0), rand_bf16(61, dims.ki_len(), 1.0), rand_bf16(62, dims.wi_len(), 1.0));
        let sel = cpu_select(&dims, &qi, &ki, &wi);
        let q = rand_bf16(63, dims.q_len(), 1.0);
        let k = rand_bf16(64, dims.kv_len(), 1.0);
        let v = rand_bf16(65, dims.kv_len(), 1.0);
        let (mut out, mut lse) = (vec![0.0; dims.q_len()], vec![0.0; dims.lse_len()]);
        cpu::dsa::dsa_attention_forward(&dims, &q, &k, &v, &sel, &mut out, &mut lse);
        let (h, d, kmax) = (dims.h, dims.d, dims.kmax());
        let out_l = last_rows(&out, &dims, h * d);
        // lse [b, h, t] → [b, h] at t - 1
        let lse_l: Vec<f32> = (0..dims.b * h).map(|r| lse[r * dims.t + dims.t - 1]).collect();
        let sel_l: Vec<u32> =
            (0..dims.b).flat_map(|bi| sel[(bi * dims.t + dims.t - 1) * kmax..][..kmax].to_vec()).collect();

        let gsel = DeviceBuffer::from_host(&be, &sel_l).unwrap();
        let go = DeviceBuffer::<bf16>::uninit(&be, dims.b * h * d).unwrap();
        let gl = DeviceBuffer::<f32>::uninit(&be, dims.b * h).unwrap();
        let gq = up(&be, &last_rows(&q, &dims, h * d));
        cuda::dsa::dsa_attention_decode(&be, &dims, &gq, &up(&be, &k), &up(&be, &v), &gsel, &go, &gl).unwrap();
        assert_close(&format!("decode out {dims:?}"), &down(&go), &out_l, 1e-2, 1e-2);
        assert_close(&format!("decode lse {dims:?}"), &gl.to_host().unwrap(), &lse_l, 1e-4, 1e-4);
    }
}
