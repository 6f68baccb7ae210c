//! Speculative sampling: accept or reject drafted tokens so that the emitted tokens are
//! distributed exactly as if the main model had sampled them one at a time.
//!
//! A round drafts `d_1..d_D` (draft `m` drawn from the draft distribution `q_m`), then one main
//! forward gives `p_0..p_D`: `p_{m-1}` is the main model's distribution at the position of
//! `d_m` and `p_D` the one after the last draft. For `m = 1, 2, …`: accept `d_m` with
//! probability `min(1, p_{m-1}(d_m) / q_m(d_m))`; at the first rejection emit a sample of the
//! residual `normalize(max(0, p_{m-1} − q_m))` and stop; when every draft is accepted emit a
//! bonus sample of `p_D`. Why this is exact: the token emitted at a position is `d` either by
//! accepting it, `q(d) · min(1, p(d)/q(d)) = min(q(d), p(d))`, or by rejecting and resampling,
//! `(1 − Σ_x min(q(x), p(x))) · (p(d) − min(q(d), p(d))) / Σ_x (p(x) − min(q(x), p(x)))`; both
//! normalizers equal `1 − Σ_x min(p, q)`, so the sum is `p(d)`. Induction over positions gives
//! the joint distribution of a whole round (and of the next rounds, which start from the
//! emitted prefix).
//!
//! Distributions are the sampler's ([`crate::generate::candidates`]: after temperature, top-k
//! and top-p), so speculation reproduces exactly what `generate` samples. At temperature 0 both
//! are point masses: a draft is accepted iff it is the main model's argmax, and the emitted
//! token is the argmax — greedy output, with no random numbers drawn. Random numbers are drawn
//! only where a choice is random (a ratio strictly between 0 and 1, a residual or bonus with
//! more than one token).

use crate::rng::Rng;

/// A sampling distribution: `(token, probability)` pairs, as [`crate::generate::candidates`]
/// returns them (probabilities summing to 1, tokens absent have probability 0).
pub type Dist = [(u32, f64)];

/// The outcome of verifying one round's drafts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Drafts accepted (a prefix of them).
    pub accepted: usize,
    /// The token emitted after the accepted drafts: the residual sample at the first
    /// rejection, or the bonus sample of `p_D`.
    pub token: u32,
}

/// Probability of `token` under `dist`.
pub fn prob(dist: &Dist, token: u32) -> f64 {
    dist.iter().find(|&&(t, _)| t == token).map_or(0.0, |&(_, p)| p)
}

/// Draws from a distribution (no random number when it has a single token).
pub fn draw(dist: &Dist, rng: &mut Rng) -> u32 {
    match dist {
        [] => panic!("speculative: an empty distribution"),
        [(t, _)] => *t,
        _ => {
            let w: Vec<f64> = dist.iter().map(|&(_, p)| p).collect();
            dist[rng.categorical(&w)].0
        }
    }
}

/// `normalize(max(0, p − q))`; `p` itself when that is zero everywhere (p ≤ q pointwise means
/// p = q, where a rejection has probability 0 and only rounding gets here).
pub fn residual(p: &Dist, q: &Dist) -> Vec<(u32, f64)> {
    let r: Vec<(u32, f64)> =
        p.iter().map(|&(t, pt)| (t, (pt - prob(q, t)).max(0.0))).filter(|&(_, w)| w > 0.0).collect();
    let total: f64 = r.iter().map(|&(_, w)| w).sum();
    if total > 0.0 {
        r.into_iter().map(|(t, w)| (t, w / total)).collect()
    } else {
        p.to_vec()
    }
}

/// Accepts a prefix of `drafts` (`drafts[m-1]` drawn from `q[m-1]`) against the main
/// distributions `p` (`drafts.len() + 1` of them) and draws the token that follows it (see
/// the module doc).
pub fn verify<P: AsRef<Dist>, Q: AsRef<Dist>>(p: &[P], q: &[Q], drafts: &[u32], rng: &mut Rng) -> Verdict {
    assert!(q.len() == drafts.len() && p.len() == drafts.len() + 1, "speculative: p, q and drafts disagree");
    for (m, &d) in drafts.iter().enumerate() {
        let (pm, qm) = (p[m].as_ref(), q[m].as_ref());
        let (pd, qd) = (prob(pm, d), prob(qm, d));
        let accept = if pd >= qd {
            true
        } else if pd <= 0.0 {
            false
        } else {
            rng.uniform() * qd < pd
        };
        if !accept {
            return Verdict { accepted: m, token: draw(&residual(pm, qm), rng) };
        }
    }
    Verdict { accepted: drafts.len(), token: draw(p[drafts.len()].as_ref(), rng) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy order-1 Markov "model" over `V` tokens: the first token's distribution and each
    /// token's successor distribution.
    struct Markov {
        first: Vec<(u32, f64)>,
        next: Vec<Vec<(u32, f64)>>,
    }

    impl Markov {
        fn new(v: usize, seed: u64, peaked: f64) -> Markov {
            let mut rng = Rng::new(seed);
            let mut dist = || -> Vec<(u32, f64)> {
                let w: Vec<f64> = (0..v).map(|_| (peaked * rng.normal()).exp()).collect();
                let s: f64 = w.iter().sum();
                // one token left out, so supports differ between the models
                let skip = rng.below(v);
                let kept: f64 = s - w[skip];
                (0..v).filter(|&i| i != skip).map(|i| (i as u32, w[i] / kept)).collect()
            };
            let first = dist();
            Markov { first, next: (0..v).map(|_| dist()).collect() }
        }

        fn dist(&self, prev: Option<u32>) -> &Dist {
            prev.map_or(&self.first, |t| &self.next[t as usize])
        }
    }

    /// The first `n` tokens of a speculative generation with `depth` drafts per round: drafts
    /// from `draft`, verified against `main`; `exact = false` resamples from `p` instead of the
    /// residual (a wrong algorithm the test must catch).
    fn speculate(main: &Markov, draft: &Markov, depth: usize, n: usize, exact: bool, rng: &mut Rng) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        while out.len() < n {
            let (mut drafts, mut q) = (Vec::new(), Vec::new());
            for _ in 0..depth {
                let prev = drafts.last().or(out.last()).copied();
                q.push(draft.dist(prev).to_vec());
                drafts.push(draw(q.last().unwrap(), rng));
            }
            let p: Vec<&Dist> = (0..=depth)
                .map(|m| main.dist(if m == 0 { out.last().copied() } else { Some(drafts[m - 1]) }))
                .collect();
            let mut v = verify(&p, &q, &drafts, rng);
            if !exact && v.accepted < depth {
                v.token = draw(p[v.accepted], rng);
            }
            out.extend(&drafts[..v.accepted]);
            out.push(v.token);
        }
        out.truncate(n);
        out
    }

    /// Pearson's χ² of observed counts against expected probabilities (cells of probability 0
    /// must stay empty).
    fn chi_square(counts: &[usize], expected: &[f64], n: usize) -> f64 {
        counts
            .iter()
            .zip(expected)
            .map(|(&c, &e)| {
                if e == 0.0 {
                    assert_eq!(c, 0, "a token of probability 0 was emitted");
                    0.0
                } else {
                    let d = c as f64 - e * n as f64;
                    d * d / (e * n as f64)
                }
            })
            .sum()
    }

    /// χ² statistics of the first token (V − 1 cells of nonzero probability) and of the first
    /// two tokens jointly, over `n` speculative generations.
    fn statistics(depth: usize, exact: bool, n: usize) -> (f64, f64) {
        const V: usize = 5;
        let (main, draft) = (Markov::new(V, 1, 1.0), Markov::new(V, 2, 1.5));
        let mut rng = Rng::new(42 + depth as u64);
        let (mut one, mut two) = (vec![0usize; V], vec![0usize; V * V]);
        for _ in 0..n {
            let t = speculate(&main, &draft, depth, 2, exact, &mut rng);
            one[t[0] as usize] += 1;
            two[t[0] as usize * V + t[1] as usize] += 1;
        }
        let p1: Vec<f64> = (0..V as u32).map(|a| prob(&main.first, a)).collect();
        let p2: Vec<f64> = (0..V * V).map(|i| p1[i / V] * prob(&main.next[i / V], (i % V) as u32)).collect();
        (chi_square(&one, &p1, n), chi_square(&two, &p2, n))
    }

    #[test]
    fn speculative_sampling_reproduces_the_main_distribution() {
        // 200k generations at vocabulary 5 (each distribution has 4 tokens of nonzero
        // probability, the draft's support differs from the main's). Under the null hypothesis
        // (emitted ~ main) Pearson's χ² has 3 degrees of freedom for the first token and at most
        // 15 for the pair (4·4 nonzero cells − 1); the critical values at significance 10⁻⁴ are
        // 21.1 and 44.3. The seed is fixed, so the test is deterministic; it passes at a level
        // where a wrong sampler fails by orders of magnitude (below).
        for depth in [1, 2, 3] {
            let (c1, c2) = statistics(depth, true, 200_000);
            eprintln!("depth {depth}: χ² first token {c1:.2} (3 dof), first two tokens {c2:.2} (15 dof)");
            assert!(c1 < 21.1 && c2 < 44.3, "depth {depth}: χ² first token {c1:.1}, pair {c2:.1}");
        }
        // the same test catches a sampler that resamples from p instead of the residual
        let (c1, c2) = statistics(1, false, 200_000);
        eprintln!("resampling from p instead of the residual: χ² {c1:.0}, {c2:.0}");
        assert!(c1 > 1000.0 && c2 > 1000.0, "a wrong sampler went unnoticed: χ² {c1:.1}, {c2:.1}");
    }

    #[test]
    fn greedy_accepts_the_argmax_and_draws_nothing() {
        let point = |t: u32| vec![(t, 1.0)];
        let mut rng = Rng::new(5);
        let before = rng.clone().next_u64();
        // p argmaxes 3, 4, 1; drafts 3, 4, 2: two accepted, then the argmax 1
        let v =
            verify(&[point(3), point(4), point(1), point(0)], &[point(3), point(4), point(2)], &[3, 4, 2], &mut rng);
        assert_eq!(v, Verdict { accepted: 2, token: 1 });
        let v = verify(&[point(3), point(4)], &[point(3)], &[3], &mut rng);
        assert_eq!(v, Verdict { accepted: 1, token: 4 }, "all accepted: the bonus token");
        assert_eq!(rng.next_u64(), before, "greedy verification draws no random numbers");
    }

    #[test]
    fn residual_is_the_positive_part() {
        let p = [(0, 0.5), (1, 0.3), (2, 0.2)];
        let q = [(0, 0.7), (2, 0.1), (3, 0.2)];
        let r = residual(&p, &q);
        // max(0, p − q) = (0, 0.3, 0.1, 0) → normalized (0.75, 0.25)
        assert_eq!(r.len(), 2);
        assert!((prob(&r, 1) - 0.75).abs() < 1e-12 && (prob(&r, 2) - 0.25).abs() < 1e-12);
        assert_eq!(residual(&p, &p), p.to_vec(), "p = q: the residual falls back to p");
    }
}
