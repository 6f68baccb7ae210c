//! DeepSeek Sparse Attention through the public kernel API (`nanoseek::backend::cpu::dsa`): the
//! indexer trained by its KL loss alone learns to pick the keys the attention attends to, and the
//! sparse pipeline (top-k, forward, backward, sparse KL) runs end to end. The kernels' exact
//! checks (naive references, finite differences, determinism) are unit tests in the module.

use nanoseek::backend::cpu::attention::attention_forward;
use nanoseek::backend::cpu::dsa::{
    dsa_attention_backward, dsa_attention_forward, indexer_kl, indexer_topk, DsaDims, PAD,
};
use nanoseek::rng::Rng;

fn randn(n: usize, std: f32, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * std).collect()
}

fn dims() -> DsaDims {
    DsaDims { b: 2, t: 96, h: 4, h_kv: 2, d: 16, n_index_heads: 4, index_dim: 16, topk: 12, window: 2 }
}

/// Per query, the fraction of the `topk` keys (outside the window) carrying the most target mass
/// (the head-averaged dense attention) that the indexer selected, averaged over queries with more
/// candidates than `topk`.
fn recall(dm: &DsaDims, q: &[f32], k: &[f32], sel: &[u32]) -> f64 {
    let scale = 1.0 / (dm.d as f64).sqrt();
    let (mut hit, mut n) = (0.0, 0usize);
    for bi in 0..dm.b {
        for i in dm.topk + dm.window..dm.t {
            let old = i + 1 - dm.window;
            let mut mass = vec![0.0f64; old];
            for hq in 0..dm.h {
                let qo = ((bi * dm.t + i) * dm.h + hq) * dm.d;
                let ko = |s: usize| ((bi * dm.t + s) * dm.h_kv + hq / (dm.h / dm.h_kv)) * dm.d;
                let sc: Vec<f64> = (0..=i)
                    .map(|s| (0..dm.d).map(|c| q[qo + c] as f64 * k[ko(s) + c] as f64).sum::<f64>() * scale)
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                mass.iter_mut().zip(&sc).for_each(|(m, v)| *m += (v - mx).exp() / z);
            }
            let mut order: Vec<usize> = (0..old).collect();
            order.sort_by(|&a, &b| mass[b].partial_cmp(&mass[a]).unwrap());
            let row = &sel[(bi * dm.t + i) * dm.kmax()..][..dm.kmax()];
            hit += order[..dm.topk].iter().filter(|&&s| row.contains(&(s as u32))).count() as f64 / dm.topk as f64;
            n += 1;
        }
    }
    hit / n as f64
}

/// Gradient descent on the indexer inputs (qi, ki, wi taken as free parameters) with the dense
/// KL (warm-up) then the sparse KL: both losses fall, and the top-k recall of the keys with the
/// most attention mass rises well above its random-indexer level.
#[test]
fn indexer_distillation_learns_the_attended_keys() {
    let dm = dims();
    let mut rng = Rng::new(3);
    // Attention logits with std ~2 and a few strongly attended keys per query.
    let (q, k, v) =
        (randn(dm.q_len(), 1.5, &mut rng), randn(dm.kv_len(), 1.5, &mut rng), randn(dm.kv_len(), 1.0, &mut rng));
    let (mut qi, mut ki, mut wi) =
        (randn(dm.qi_len(), 0.5, &mut rng), randn(dm.ki_len(), 0.5, &mut rng), randn(dm.wi_len(), 0.5, &mut rng));
    let (mut out, mut dense_lse) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
    attention_forward(&dm.attn(), &q, &k, &v, &mut out, &mut dense_lse);
    let mut sel = vec![0u32; dm.sel_len()];
    indexer_topk(&dm, &qi, &ki, &wi, &mut sel);
    let recall_before = recall(&dm, &q, &k, &sel);

    let (mut dqi, mut dki, mut dwi) = (vec![0.0; dm.qi_len()], vec![0.0; dm.ki_len()], vec![0.0; dm.wi_len()]);
    // The loss is a mean over b·t queries: scale the step back up.
    let lr = 0.5 * (dm.b * dm.t) as f32;
    let mut step = |qi: &mut Vec<f32>, ki: &mut Vec<f32>, wi: &mut Vec<f32>, lse: &[f32], sel: Option<&[u32]>| -> f32 {
        let loss = indexer_kl(&dm, &q, &k, lse, qi, ki, wi, sel, &mut dqi, &mut dki, &mut dwi);
        for (p, g) in [(qi, &dqi), (ki, &dki), (wi, &dwi)] {
            p.iter_mut().zip(g.iter()).for_each(|(x, gx)| *x -= lr * gx);
        }
        loss
    };
    let dense: Vec<f32> = (0..150).map(|_| step(&mut qi, &mut ki, &mut wi, &dense_lse, None)).collect();
    println!("dense KL: {:.4} -> {:.4}", dense[0], dense[dense.len() - 1]);
    assert!(dense[dense.len() - 1] < 0.5 * dense[0], "dense KL did not fall: {dense:?}");

    indexer_topk(&dm, &qi, &ki, &wi, &mut sel);
    let recall_after = recall(&dm, &q, &k, &sel);
    println!("top-{} recall of the most attended keys: {recall_before:.3} -> {recall_after:.3}", dm.topk);
    assert!(recall_after > recall_before + 0.2 && recall_after > 0.6, "{recall_before} -> {recall_after}");

    // Sparse stage: the selection and the sparse lse are fixed for a few steps.
    let mut sparse_lse = vec![0.0; dm.lse_len()];
    dsa_attention_forward(&dm, &q, &k, &v, &sel, &mut out, &mut sparse_lse);
    let sparse: Vec<f32> = (0..30).map(|_| step(&mut qi, &mut ki, &mut wi, &sparse_lse, Some(&sel))).collect();
    println!("sparse KL: {:.4} -> {:.4}", sparse[0], sparse[sparse.len() - 1]);
    assert!(sparse[sparse.len() - 1] < sparse[0], "sparse KL did not fall: {sparse:?}");
}

/// The selection rule seen from outside: row lengths, order, padding, the window always in.
#[test]
fn selection_rows_are_sorted_padded_and_contain_the_window() {
    let dm = dims();
    let mut rng = Rng::new(8);
    let (qi, ki, wi) =
        (randn(dm.qi_len(), 1.0, &mut rng), randn(dm.ki_len(), 1.0, &mut rng), randn(dm.wi_len(), 1.0, &mut rng));
    let mut sel = vec![0u32; dm.sel_len()];
    indexer_topk(&dm, &qi, &ki, &wi, &mut sel);
    assert_eq!(dm.kmax(), dm.topk + dm.window);
    for (r, row) in sel.chunks_exact(dm.kmax()).enumerate() {
        let i = r % dm.t;
        let n = dm.n_selected(i);
        assert_eq!(n, (i + 1).min(dm.kmax()));
        assert!(row[..n].windows(2).all(|p| p[0] < p[1]) && row[n - 1] as usize <= i, "row {r}: {row:?}");
        assert!(row[n..].iter().all(|&s| s == PAD), "row {r}: {row:?}");
        assert!(((i + 1).saturating_sub(dm.window)..=i).all(|s| row[..n].contains(&(s as u32))), "row {r}");
    }
    // And the attention runs on it, with finite outputs and gradients.
    let (q, k, v) =
        (randn(dm.q_len(), 1.0, &mut rng), randn(dm.kv_len(), 1.0, &mut rng), randn(dm.kv_len(), 1.0, &mut rng));
    let (mut out, mut lse) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
    dsa_attention_forward(&dm, &q, &k, &v, &sel, &mut out, &mut lse);
    let dout = randn(dm.q_len(), 1.0, &mut rng);
    let (mut dq, mut dk, mut dv) = (vec![0.0; dm.q_len()], vec![0.0; dm.kv_len()], vec![0.0; dm.kv_len()]);
    dsa_attention_backward(&dm, &q, &k, &v, &sel, &out, &lse, &dout, &mut dq, &mut dk, &mut dv);
    assert!(out.iter().chain(&lse).chain(&dq).chain(&dk).chain(&dv).all(|x| x.is_finite()));
}
