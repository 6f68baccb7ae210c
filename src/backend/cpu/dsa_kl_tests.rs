//! Tests of the DSA indexer KL loss, and those that run every DSA function (child of
//! `dsa_tests.rs`, whose helpers they use).

use super::*;

/// The KL loss and its gradients against the f64 reference (analytic), dense and sparse, on
/// shapes with one and several query blocks and key chunks: loss within 1e-6 relative + 1e-7,
/// gradients within 1e-5 of the largest gradient of the tensor (observed: loss 1.5e-7,
/// gradients 6e-7).
#[test]
fn kl_matches_naive() {
    let cases = [
        DsaDims::new(2, 37, 4, 2, 8, 2, 8, 5, 3),
        DsaDims::new(1, 300, 4, 1, 16, 3, 8, 20, 4),
        DsaDims::new(2, 150, 2, 2, 8, 2, 5, 0, 9),
    ];
    for (n, dm) in cases.iter().enumerate() {
        let x = inputs(dm, 400 + n as u64);
        let sel = select(dm, &x);
        let (_, sparse_lse) = forward(dm, &x, &sel);
        let dense_sets: Vec<Vec<usize>> = (0..dm.b * dm.t).map(|r| (0..=r % dm.t).collect()).collect();
        let ind = [f64s(&x.qi), f64s(&x.ki), f64s(&x.wi)];
        for (mode, lse, s, sets) in [
            ("dense", dense_lse(dm, &x), None, dense_sets),
            ("sparse", sparse_lse.clone(), Some(&sel[..]), rows(dm, &sel)),
        ] {
            let (loss, grads) = kl(dm, &x, &lse, s);
            let (loss_ref, grads_ref) = naive_kl(dm, &x, [&ind[0], &ind[1], &ind[2]], &sets);
            let e_loss = (loss as f64 - loss_ref).abs() / loss_ref;
            assert!(e_loss <= 1e-6 + 1e-7 / loss_ref, "{mode} {dm:?}: loss {loss} vs {loss_ref}");
            let mut errs = vec![e_loss];
            for (name, (g, w)) in ["dqi", "dki", "dwi"].iter().zip(grads.iter().zip(&grads_ref)) {
                let e = max_abs_err(g, w) / max_abs(w);
                assert!(e <= 1e-5, "{mode} {dm:?}: {name} max abs err / max |grad| = {e:e}");
                errs.push(e);
            }
            println!(
                "{mode} t {}: loss {loss:.4} rel err {:.1e}; grad err / max: {:.1e} {:.1e} {:.1e}",
                dm.t, errs[0], errs[1], errs[2], errs[3]
            );
        }
    }
}

/// Central finite differences (f64 reference loss, eps = 1e-5 on qi, ki, wi) against the
/// kernel's gradients, dense and sparse, at 50 coordinates per tensor; |fd − an| ≤ 1e-4·|fd| +
/// 1e-6·max|an| (eps is small enough that no ReLU kink is crossed at these coordinates).
/// Observed: at most 6% of that bound.
#[test]
fn kl_finite_differences() {
    let dm = DsaDims::new(2, 37, 4, 2, 8, 2, 8, 5, 3);
    let x = inputs(&dm, 17);
    let sel = select(&dm, &x);
    let (_, sparse_lse) = forward(&dm, &x, &sel);
    let dense_sets: Vec<Vec<usize>> = (0..dm.b * dm.t).map(|r| (0..=r % dm.t).collect()).collect();
    for (lse, s, sets) in [(dense_lse(&dm, &x), None, dense_sets), (sparse_lse, Some(&sel[..]), rows(&dm, &sel))] {
        let (_, grads) = kl(&dm, &x, &lse, s);
        let mut rng = 777u64;
        let mut worst = 0.0f64;
        for which in 0..3 {
            let mut ind = [f64s(&x.qi), f64s(&x.ki), f64s(&x.wi)];
            let scale = grads[which].iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
            for _ in 0..50 {
                let idx = (splitmix64(&mut rng) % ind[which].len() as u64) as usize;
                let orig = ind[which][idx];
                let eps = 1e-5;
                ind[which][idx] = orig + eps;
                let lp = naive_kl(&dm, &x, [&ind[0], &ind[1], &ind[2]], &sets).0;
                ind[which][idx] = orig - eps;
                let lm = naive_kl(&dm, &x, [&ind[0], &ind[1], &ind[2]], &sets).0;
                ind[which][idx] = orig;
                let (fd, an) = ((lp - lm) / (2.0 * eps), grads[which][idx] as f64);
                let bound = 1e-4 * fd.abs() + 1e-6 * scale;
                assert!((fd - an).abs() <= bound, "sparse {} tensor {which} idx {idx}: fd {fd} vs {an}", s.is_some());
                worst = worst.max((fd - an).abs() / bound);
            }
        }
        println!("sparse {}: worst |fd - an| / bound = {worst:.3}", s.is_some());
    }
}

/// KL ≥ 0, and ≈ 0 when the indexer reproduces the target: h = 2 identical query heads on one
/// kv head, one index head with q̃ = [q/sqrt(d), 20], k̃ = [k, 1], w = 1, so that
/// I = q·k/sqrt(d) + 20 > 0 is the attention logit up to a constant.
#[test]
fn kl_is_zero_when_indexer_matches_target() {
    let dm = DsaDims::new(2, 70, 2, 1, 8, 1, 9, 6, 2);
    let mut x = inputs(&dm, 21);
    for row in x.q.chunks_exact_mut(2 * dm.d) {
        let (a, b) = row.split_at_mut(dm.d);
        b.copy_from_slice(a);
    }
    let scale = 1.0 / (dm.d as f32).sqrt();
    x.qi = x.q.chunks_exact(2 * dm.d).flat_map(|r| r[..dm.d].iter().map(|v| v * scale).chain([20.0])).collect();
    x.ki = x.k.chunks_exact(dm.d).flat_map(|r| r.iter().copied().chain([1.0])).collect();
    x.wi.fill(1.0);
    let sel = select(&dm, &x);
    let (_, sparse_lse) = forward(&dm, &x, &sel);
    let (dense, _) = kl(&dm, &x, &dense_lse(&dm, &x), None);
    let (sparse, _) = kl(&dm, &x, &sparse_lse, Some(&sel));
    assert!(dense.abs() <= 1e-6 && sparse.abs() <= 1e-6, "dense {dense:e}, sparse {sparse:e}");
    println!("matching indexer: KL dense {dense:e}, sparse {sparse:e}");
    let y = inputs(&dm, 22);
    let sel = select(&dm, &y);
    let (_, sparse_lse) = forward(&dm, &y, &sel);
    let (dense, _) = kl(&dm, &y, &dense_lse(&dm, &y), None);
    let (sparse, _) = kl(&dm, &y, &sparse_lse, Some(&sel));
    assert!(dense > 0.01 && sparse > 0.01, "dense {dense}, sparse {sparse}");
    println!("random indexer: KL dense {dense}, sparse {sparse}");
}

/// Every function is bitwise reproducible across calls and thread counts.
#[test]
fn deterministic() {
    let dm = DsaDims::new(2, 300, 4, 2, 16, 4, 16, 20, 8);
    let x = inputs(&dm, 99);
    let run = || {
        let sel = select(&dm, &x);
        let (out, lse) = forward(&dm, &x, &sel);
        let g = backward(&dm, &x, &sel, &out, &lse);
        let (l_dense, gd) = kl(&dm, &x, &dense_lse(&dm, &x), None);
        let (l_sparse, gs) = kl(&dm, &x, &lse, Some(&sel));
        let mut r = vec![sel, bits(&out), bits(&lse), vec![l_dense.to_bits(), l_sparse.to_bits()]];
        r.extend(g.iter().chain(&gd).chain(&gs).map(|v| bits(v)));
        r
    };
    let first = run();
    assert_eq!(first, run());
    for threads in [1, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert_eq!(first, pool.install(run), "differs with {threads} threads");
    }
}

/// The element-wise loops give bitwise-identical results in their AVX2 and generic builds.
#[test]
fn avx2_matches_generic() {
    let dm = DsaDims::new(1, 100, 1, 1, 1, 3, 4, 5, 0);
    let (nk, tq) = (70, 30);
    let (x, wi) = (rand_vec(tq * 3 * nk, 2.0, 1), rand_vec(dm.wi_len(), 1.0, 2));
    let (mut a, mut b) = (vec![0.0; tq * nk], vec![0.0; tq * nk]);
    with_avx2(
        #[inline(always)]
        || weigh(&dm, &wi, 0, 10, tq, nk, &x, &mut a, nk),
    );
    weigh(&dm, &wi, 0, 10, tq, nk, &x, &mut b, nk);
    assert_eq!(bits(&a), bits(&b));
    let sc = rand_vec(77, 5.0, 3);
    let pt: Vec<f32> = rand_vec(77, 1.0, 4).iter().map(|v| v.abs()).collect();
    let (mut pa, mut pb, mut e) = (pt.clone(), pt, vec![0.0; 77]);
    let ra = with_avx2(
        #[inline(always)]
        || kl_row(&sc, &mut pa, &mut e, 0.01),
    );
    let rb = kl_row(&sc, &mut pb, &mut e, 0.01);
    assert_eq!(
        (bits(&pa), ra.0.to_bits(), ra.1.to_bits(), ra.2.to_bits()),
        (bits(&pb), rb.0.to_bits(), rb.1.to_bits(), rb.2.to_bits())
    );
}

#[test]
fn empty_inputs_are_noops() {
    for dm in [DsaDims::new(0, 5, 2, 1, 8, 2, 4, 3, 1), DsaDims::new(2, 0, 2, 1, 8, 2, 4, 3, 1)] {
        indexer_topk(&dm, &[], &[], &[], &mut []);
        dsa_attention_forward(&dm, &[], &[], &[], &[], &mut [], &mut []);
        dsa_attention_backward(&dm, &[], &[], &[], &[], &[], &[], &[], &mut [], &mut [], &mut []);
        assert_eq!(indexer_kl(&dm, &[], &[], &[], &[], &[], &[], None, &mut [], &mut [], &mut []), 0.0);
    }
}

#[test]
#[should_panic(expected = "entries <= 3")]
fn rejects_non_causal_selection() {
    let dm = DsaDims::new(1, 6, 2, 1, 8, 1, 4, 2, 0);
    let x = inputs(&dm, 1);
    let mut sel = select(&dm, &x);
    sel[3 * dm.kmax()] = 4;
    forward(&dm, &x, &sel);
}

#[test]
#[should_panic(expected = "must be non-empty")]
fn rejects_empty_selection_row() {
    let dm = DsaDims::new(1, 6, 2, 1, 8, 1, 4, 2, 0);
    let x = inputs(&dm, 1);
    let mut sel = select(&dm, &x);
    sel[2 * dm.kmax()..3 * dm.kmax()].fill(PAD);
    let (out, lse) = (vec![0.0; dm.q_len()], vec![0.0; dm.lse_len()]);
    backward(&dm, &x, &sel, &out, &lse);
}

#[test]
#[should_panic(expected = "topk + window must be >= 1")]
fn rejects_empty_selection_rule() {
    let dm = DsaDims::new(1, 6, 2, 1, 8, 1, 4, 0, 0);
    select(&dm, &inputs(&dm, 1));
}

#[test]
#[should_panic(expected = "`dwi` has length")]
fn rejects_bad_length() {
    let dm = DsaDims::new(1, 6, 2, 1, 8, 2, 4, 2, 0);
    let x = inputs(&dm, 1);
    let (mut dqi, mut dki, mut dwi) = (vec![0.0; dm.qi_len()], vec![0.0; dm.ki_len()], vec![0.0; 3]);
    indexer_kl(&dm, &x.q, &x.k, &vec![0.0; dm.lse_len()], &x.qi, &x.ki, &x.wi, None, &mut dqi, &mut dki, &mut dwi);
}
