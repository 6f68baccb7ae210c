//! The ops the tape knows: forward (as `Tape` methods) and backward.

use super::{Tape, Var};
use crate::backend::cpu::{
    attention::{attention_backward, attention_forward, AttnDims},
    dsa::{dsa_attention_backward, dsa_attention_forward, indexer_kl, indexer_topk, DsaDims},
    elementwise, embedding,
    gemm::{gemm, Layout},
    loss,
    moe::{balance_loss, moe_backward, moe_forward, route, router_backward, MoeCache, RouterConfig, Routing},
    norm,
    rope::{rope_backward, rope_forward, RopeTable},
    swiglu,
    window_attention::{window_attention_backward, window_attention_forward, WindowDims},
};
use std::rc::Rc;
use std::sync::Arc;

/// The keys each query of a DSA layer attends to (`backend::cpu::dsa` layout `[b, t, kmax]`).
pub type Selection = Rc<Vec<u32>>;

/// A function of tape variables that `Tape::checkpoint` can recompute.
pub type CheckpointFn<'p> = dyn Fn(&mut Tape<'p>, &[Var]) -> Var + 'p;

/// What each op's backward needs. Inputs are `Var`s; everything else is saved state.
pub enum Op<'p> {
    /// y[m,n] = x[m,k] · w[n,k]ᵀ (a bias-free linear layer, w in PyTorch's [out, in] layout).
    Linear {
        x: Var,
        w: Var,
        m: usize,
        k: usize,
        n: usize,
    },
    Embedding {
        table: Var,
        ids: Vec<u32>,
        dim: usize,
    },
    RmsNorm {
        x: Var,
        rstd: Vec<f32>,
        dim: usize,
    },
    Rope {
        x: Var,
        b: usize,
        t: usize,
        h: usize,
        table: Arc<RopeTable>,
    },
    /// Causal attention; the output and the log-sum-exp are all it keeps (O(T) per head).
    Attention {
        q: Var,
        k: Var,
        v: Var,
        lse: Vec<f32>,
        dims: AttnDims,
    },
    /// Sliding-window + global-token attention (same layouts and saved state as `Attention`).
    WindowAttention {
        q: Var,
        k: Var,
        v: Var,
        lse: Vec<f32>,
        dims: WindowDims,
    },
    /// DeepSeek Sparse Attention over the selection `sel` of the lightning indexer (None: dense
    /// causal attention, during the warm-up). Gradients reach q, k, v only.
    DsaAttention {
        q: Var,
        k: Var,
        v: Var,
        sel: Option<Selection>,
        lse: Rc<Vec<f32>>,
        dims: DsaDims,
    },
    /// The indexer's KL distillation loss (a scalar). Its gradients (computed in the forward, for a
    /// unit output gradient) reach only the indexer inputs qi, ki and wi.
    IndexerKl {
        qi: Var,
        ki: Var,
        wi: Var,
        dqi: Vec<f32>,
        dki: Vec<f32>,
        dwi: Vec<f32>,
    },
    /// A copy of x that gradients do not flow through.
    Detach,
    /// y = s·x for a constant s.
    Scale {
        x: Var,
        s: f32,
    },
    SwiGlu {
        g: Var,
        u: Var,
    },
    /// Routed experts and their weighted combine (`backend::cpu::moe`): x [n, C], router
    /// `logits` [n, E], expert stacks w_gate, w_up [E, F, C], w_down [E, C, F]. The routing
    /// (selection with the bias) is fixed; gradients reach x, the logits (through the gates) and
    /// the experts.
    Moe {
        x: Var,
        logits: Var,
        w_gate: Var,
        w_up: Var,
        w_down: Var,
        routing: Rc<Routing>,
        cache: MoeCache,
        cfg: RouterConfig,
        c: usize,
        f: usize,
    },
    /// The sequence-wise balance loss of one MoE layer (a scalar); its gradient reaches the logits.
    MoeBalance {
        logits: Var,
        routing: Rc<Routing>,
        cfg: RouterConfig,
        /// d(loss)/d(scores) [n, E].
        d_scores: Vec<f32>,
    },
    Add {
        a: Var,
        b: Var,
    },
    /// Σ x ∘ w for a constant w (a scalar; used to probe gradients in tests).
    WeightedSum {
        x: Var,
        w: Vec<f32>,
    },
    /// A recomputed sub-graph: `f(inputs)` runs again in the backward (activation checkpointing).
    Checkpoint {
        inputs: Vec<Var>,
        f: Rc<CheckpointFn<'p>>,
    },
    /// Mean softcapped cross-entropy over rows with target ≥ 0.
    CrossEntropy {
        logits: Var,
        targets: Vec<i32>,
        vocab: usize,
        cap: f32,
        n_valid: usize,
        /// Per-row log-sum-exp of the capped logits, from the forward.
        lse: Vec<f32>,
    },
}

impl Op<'_> {
    /// Bytes of saved state beyond the op's output (counted as activations).
    pub fn saved_bytes(&self) -> usize {
        4 * match self {
            Op::Embedding { ids, .. } => ids.len(),
            Op::RmsNorm { rstd, .. } => rstd.len(),
            Op::Attention { lse, .. } | Op::WindowAttention { lse, .. } => lse.len(),
            Op::WeightedSum { w, .. } => w.len(),
            Op::Moe { routing, cache, .. } => {
                let c = cache;
                routing.scores.len() + c.xg.len() + c.hg.len() + c.hu.len() + c.act.len() + c.y.len()
            }
            Op::MoeBalance { d_scores, .. } => d_scores.len(),
            Op::DsaAttention { sel, lse, .. } => lse.len() + sel.as_ref().map_or(0, |s| s.len()),
            Op::IndexerKl { dqi, dki, dwi, .. } => dqi.len() + dki.len() + dwi.len(),
            Op::CrossEntropy { targets, lse, .. } => targets.len() + lse.len(),
            Op::Linear { .. }
            | Op::Rope { .. }
            | Op::SwiGlu { .. }
            | Op::Add { .. }
            | Op::Checkpoint { .. }
            | Op::Detach
            | Op::Scale { .. } => 0,
        }
    }

    /// (forward, backward) floating-point operations of the op's matrix products.
    pub fn flops(&self) -> (f64, f64) {
        match self {
            Op::Linear { m, k, n, .. } => {
                let f = 2.0 * (*m * *k * *n) as f64;
                (f, 2.0 * f) // backward: dX and dW, one product each
            }
            Op::Attention { dims, .. } => {
                // causal: T(T+1)/2 scores per head; forward QKᵀ and PV, backward five products
                let pairs = (dims.b * dims.h) as f64 * (dims.t * (dims.t + 1) / 2) as f64;
                let f = 4.0 * pairs * dims.d as f64;
                (f, 2.5 * f)
            }
            Op::WindowAttention { dims, .. } => {
                // visible keys per query: the window (or fewer near the start) plus globals before it
                let visible: usize = (0..dims.t)
                    .map(|t: usize| (t + 1).min(dims.window) + dims.n_global.min((t + 1).saturating_sub(dims.window)))
                    .sum();
                let f = 4.0 * (dims.b * dims.h) as f64 * visible as f64 * dims.d as f64;
                (f, 2.5 * f)
            }
            Op::DsaAttention { dims, .. } => {
                // selected keys per query, then as for dense attention
                let pairs = (dims.b * dims.h) as f64 * (0..dims.t).map(|i| dims.n_selected(i)).sum::<usize>() as f64;
                let f = 4.0 * pairs * dims.d as f64;
                (f, 2.5 * f)
            }
            Op::Moe { routing, c, f, .. } => {
                // three expert GEMMs per kept row; the backward does two products per GEMM
                let fl = 2.0 * 3.0 * (routing.n_kept() * c * f) as f64;
                (fl, 2.0 * fl)
            }
            _ => (0.0, 0.0),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Embedding { .. } => "embedding",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::WindowAttention { .. } => "window_attention",
            Op::SwiGlu { .. } => "swiglu",
            Op::Moe { .. } => "moe",
            Op::DsaAttention { .. } => "dsa_attention",
            Op::IndexerKl { .. } => "indexer_kl",
            Op::Detach => "detach",
            Op::Scale { .. } => "scale",
            Op::MoeBalance { .. } => "moe_balance",
            Op::Add { .. } => "add",
            Op::WeightedSum { .. } => "weighted_sum",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Checkpoint { .. } => "checkpoint",
        }
    }
}

impl<'p> Tape<'p> {
    pub fn linear(&mut self, x: Var, w: Var) -> Var {
        let (xs, ws) = (self.shape(x), self.shape(w));
        let k = *xs.last().expect("linear: x has no dims");
        let m = self.value(x).len() / k;
        assert!(ws.len() == 2 && ws[1] == k, "linear: w {ws:?} does not match x's last dim {k}");
        let n = ws[0];
        let mut y = vec![0.0; m * n];
        gemm(m, n, k, self.value(x), Layout::N, self.value(w), Layout::T, &mut y, false);
        let mut shape = xs[..xs.len() - 1].to_vec();
        shape.push(n);
        self.record(y, &shape, Op::Linear { x, w, m, k, n })
    }

    /// Rows of `table` [vocab, dim] for each id. Ids must be < vocab (the model checks and reports).
    pub fn embedding(&mut self, table: Var, ids: &[u32]) -> Var {
        let dim = self.shape(table)[1];
        let mut y = vec![0.0; ids.len() * dim];
        embedding::embedding_forward(self.value(table), dim, ids, &mut y);
        self.record(y, &[ids.len(), dim], Op::Embedding { table, ids: ids.to_vec(), dim })
    }

    /// Parameter-free RMSNorm over groups of `dim` consecutive values (the last dim, or a head).
    pub fn rmsnorm(&mut self, x: Var, dim: usize) -> Var {
        let n = self.value(x).len();
        let (mut y, mut rstd) = (vec![0.0; n], vec![0.0; n / dim]);
        norm::rmsnorm_forward(self.value(x), dim, &mut y, &mut rstd);
        let shape = self.shape(x).to_vec();
        self.record(y, &shape, Op::RmsNorm { x, rstd, dim })
    }

    /// Rotary embedding on x viewed as [b, t, h, head_dim].
    pub fn rope(&mut self, x: Var, b: usize, t: usize, h: usize, table: &Arc<RopeTable>) -> Var {
        let mut y = vec![0.0; self.value(x).len()];
        rope_forward(table, self.value(x), b, t, h, &mut y);
        let shape = self.shape(x).to_vec();
        self.record(y, &shape, Op::Rope { x, b, t, h, table: table.clone() })
    }

    pub fn attention(&mut self, q: Var, k: Var, v: Var, dims: AttnDims) -> Var {
        let mut out = vec![0.0; self.value(q).len()];
        let mut lse = vec![0.0; dims.b * dims.h * dims.t];
        attention_forward(&dims, self.value(q), self.value(k), self.value(v), &mut out, &mut lse);
        let shape = self.shape(q).to_vec();
        self.record(out, &shape, Op::Attention { q, k, v, lse, dims })
    }

    pub fn window_attention(&mut self, q: Var, k: Var, v: Var, dims: WindowDims) -> Var {
        let mut out = vec![0.0; self.value(q).len()];
        let mut lse = vec![0.0; dims.b * dims.h * dims.t];
        window_attention_forward(&dims, self.value(q), self.value(k), self.value(v), &mut out, &mut lse);
        let shape = self.shape(q).to_vec();
        self.record(out, &shape, Op::WindowAttention { q, k, v, lse, dims })
    }

    pub fn swiglu(&mut self, g: Var, u: Var) -> Var {
        let mut y = vec![0.0; self.value(g).len()];
        swiglu::swiglu_forward(self.value(g), self.value(u), &mut y);
        let shape = self.shape(g).to_vec();
        self.record(y, &shape, Op::SwiGlu { g, u })
    }

    /// A copy of x that is a leaf for the backward (no gradient reaches x through it).
    pub fn detach(&mut self, x: Var) -> Var {
        let (data, shape) = (self.value(x).to_vec(), self.shape(x).to_vec());
        self.record(data, &shape, Op::Detach)
    }

    /// s·x for a constant s.
    pub fn scale(&mut self, x: Var, s: f32) -> Var {
        let (data, shape) = (self.value(x).iter().map(|v| v * s).collect(), self.shape(x).to_vec());
        self.record(data, &shape, Op::Scale { x, s })
    }

    /// DSA: selects each query's keys with the indexer (qi, ki, wi: see `backend::cpu::dsa`; wi
    /// already scaled), then attends over them; `dense` skips the selection (warm-up). Returns the
    /// output, the selection (None when dense) and the attention's log-sum-exp, for `indexer_kl`.
    #[allow(clippy::too_many_arguments)]
    pub fn dsa_attention(
        &mut self,
        q: Var,
        k: Var,
        v: Var,
        index: (Var, Var, Var),
        dims: DsaDims,
        dense: bool,
    ) -> (Var, Option<Selection>, Rc<Vec<f32>>) {
        let mut out = vec![0.0; self.value(q).len()];
        let mut lse = vec![0.0; dims.lse_len()];
        let (qv, kv, vv) = (self.value(q), self.value(k), self.value(v));
        let sel = if dense {
            attention_forward(&dims.attn(), qv, kv, vv, &mut out, &mut lse);
            None
        } else {
            let mut sel = vec![0u32; dims.sel_len()];
            indexer_topk(&dims, self.value(index.0), self.value(index.1), self.value(index.2), &mut sel);
            dsa_attention_forward(&dims, qv, kv, vv, &sel, &mut out, &mut lse);
            Some(Rc::new(sel))
        };
        let (lse, shape) = (Rc::new(lse), self.shape(q).to_vec());
        let op = Op::DsaAttention { q, k, v, sel: sel.clone(), lse: lse.clone(), dims };
        (self.record(out, &shape, op), sel, lse)
    }

    /// The indexer's KL loss against the attention of q, k (detached) over the same keys
    /// (`sel`, or every earlier key when None); see `backend::cpu::dsa::indexer_kl`.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_kl(
        &mut self,
        q: Var,
        k: Var,
        lse: &[f32],
        (qi, ki, wi): (Var, Var, Var),
        sel: Option<&[u32]>,
        dims: DsaDims,
    ) -> Var {
        let (mut dqi, mut dki, mut dwi) =
            (vec![0.0; dims.qi_len()], vec![0.0; dims.ki_len()], vec![0.0; dims.wi_len()]);
        let (qv, kv) = (self.value(q), self.value(k));
        let (qiv, kiv, wiv) = (self.value(qi), self.value(ki), self.value(wi));
        let loss = indexer_kl(&dims, qv, kv, lse, qiv, kiv, wiv, sel, &mut dqi, &mut dki, &mut dwi);
        self.record(vec![loss], &[], Op::IndexerKl { qi, ki, wi, dqi, dki, dwi })
    }

    /// Routes x by `logits` + `bias` and runs the routed experts; returns [n, C] and the routing.
    #[allow(clippy::too_many_arguments)]
    pub fn moe(
        &mut self,
        x: Var,
        logits: Var,
        w_gate: Var,
        w_up: Var,
        w_down: Var,
        bias: &[f32],
        cfg: RouterConfig,
    ) -> (Var, Rc<Routing>) {
        let (ws, xs) = (self.shape(w_gate).to_vec(), self.shape(x).to_vec());
        assert!(ws.len() == 3 && ws[0] == cfg.n_experts, "moe: w_gate {ws:?} is not [E, F, C]");
        let (f, c) = (ws[1], ws[2]);
        let n = self.value(x).len() / c;
        let routing = Rc::new(route(self.value(logits), bias, &cfg));
        let (mut out, mut cache) = (vec![0.0; n * c], MoeCache::default());
        let (wg, wu, wd) = (self.value(w_gate), self.value(w_up), self.value(w_down));
        moe_forward(self.value(x), n, c, &routing, wg, wu, wd, f, &mut out, &mut cache);
        let op = Op::Moe { x, logits, w_gate, w_up, w_down, routing: routing.clone(), cache, cfg, c, f };
        (self.record(out, &xs, op), routing)
    }

    /// α·Σ_i f_i·P_i averaged over the `n_seqs` sequences of `seq_len` tokens (a scalar).
    pub fn moe_balance(
        &mut self,
        logits: Var,
        routing: Rc<Routing>,
        cfg: RouterConfig,
        n_seqs: usize,
        seq_len: usize,
        alpha: f32,
    ) -> Var {
        let (loss, d_scores) = balance_loss(&routing.scores, &routing.experts, n_seqs, seq_len, &cfg, alpha);
        self.record(vec![loss], &[], Op::MoeBalance { logits, routing, cfg, d_scores })
    }

    pub fn add(&mut self, a: Var, b: Var) -> Var {
        assert_eq!(self.shape(a), self.shape(b), "add: shapes differ");
        let mut y = vec![0.0; self.value(a).len()];
        elementwise::add(self.value(a), self.value(b), &mut y);
        let shape = self.shape(a).to_vec();
        self.record(y, &shape, Op::Add { a, b })
    }

    /// Σ x ∘ w for a constant w of the same length (accumulated in f64).
    pub fn weighted_sum(&mut self, x: Var, w: &[f32]) -> Var {
        assert_eq!(self.value(x).len(), w.len(), "weighted_sum: length mismatch");
        let s: f64 = self.value(x).iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
        self.record(vec![s as f32], &[], Op::WeightedSum { x, w: w.to_vec() })
    }

    /// Mean over rows with target ≥ 0 of the softcapped cross-entropy (a scalar).
    /// Also returns the number of rows that counted.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[i32], cap: f32) -> (Var, usize) {
        let vocab = *self.shape(logits).last().expect("cross_entropy: logits have no dims");
        let (mut losses, mut lse) = (vec![0.0; targets.len()], vec![0.0; targets.len()]);
        loss::softcap_cross_entropy_forward(self.value(logits), vocab, targets, cap, &mut losses, &mut lse);
        let n_valid = targets.iter().filter(|&&t| t >= 0).count();
        let total: f64 = losses.iter().map(|&l| l as f64).sum();
        let mean = if n_valid > 0 { (total / n_valid as f64) as f32 } else { 0.0 };
        let op = Op::CrossEntropy { logits, targets: targets.to_vec(), vocab, cap, n_valid, lse };
        (self.record(vec![mean], &[], op), n_valid)
    }
}

/// Gradients of the op's inputs given the gradient `dout` of its output `out`.
pub(super) fn backward(tape: &Tape, op: &Op, out: Var, dout: &[f32]) -> Vec<(Var, Vec<f32>)> {
    match op {
        &Op::Linear { x, w, m, k, n } => {
            let mut dx = vec![0.0; m * k];
            gemm(m, k, n, dout, Layout::N, tape.value(w), Layout::N, &mut dx, false); // dX = dY·W
            let mut dw = vec![0.0; n * k];
            gemm(n, k, m, dout, Layout::T, tape.value(x), Layout::N, &mut dw, false); // dW = dYᵀ·X
            vec![(x, dx), (w, dw)]
        }
        Op::Embedding { table, ids, dim } => {
            let mut dt = vec![0.0; tape.value(*table).len()];
            embedding::embedding_backward(dout, *dim, ids, &mut dt);
            vec![(*table, dt)]
        }
        Op::RmsNorm { x, rstd, dim } => {
            let mut dx = vec![0.0; dout.len()];
            norm::rmsnorm_backward(tape.value(*x), rstd, dout, *dim, &mut dx);
            vec![(*x, dx)]
        }
        Op::Rope { x, b, t, h, table } => {
            let mut dx = vec![0.0; dout.len()];
            rope_backward(table, dout, *b, *t, *h, &mut dx);
            vec![(*x, dx)]
        }
        Op::Attention { q, k, v, lse, dims } => {
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; dout.len()], vec![0.0; tape.value(*k).len()], vec![0.0; tape.value(*v).len()]);
            let (qv, kv, vv) = (tape.value(*q), tape.value(*k), tape.value(*v));
            attention_backward(dims, qv, kv, vv, tape.value(out), lse, dout, &mut dq, &mut dk, &mut dv);
            vec![(*q, dq), (*k, dk), (*v, dv)]
        }
        Op::WindowAttention { q, k, v, lse, dims } => {
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; dout.len()], vec![0.0; tape.value(*k).len()], vec![0.0; tape.value(*v).len()]);
            let (qv, kv, vv) = (tape.value(*q), tape.value(*k), tape.value(*v));
            window_attention_backward(dims, qv, kv, vv, tape.value(out), lse, dout, &mut dq, &mut dk, &mut dv);
            vec![(*q, dq), (*k, dk), (*v, dv)]
        }
        Op::SwiGlu { g, u } => {
            let (mut dg, mut du) = (vec![0.0; dout.len()], vec![0.0; dout.len()]);
            swiglu::swiglu_backward(tape.value(*g), tape.value(*u), dout, &mut dg, &mut du);
            vec![(*g, dg), (*u, du)]
        }
        Op::DsaAttention { q, k, v, sel, lse, dims } => {
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; dout.len()], vec![0.0; tape.value(*k).len()], vec![0.0; tape.value(*v).len()]);
            let (qv, kv, vv, o) = (tape.value(*q), tape.value(*k), tape.value(*v), tape.value(out));
            match sel {
                None => attention_backward(&dims.attn(), qv, kv, vv, o, lse, dout, &mut dq, &mut dk, &mut dv),
                Some(sel) => dsa_attention_backward(dims, qv, kv, vv, sel, o, lse, dout, &mut dq, &mut dk, &mut dv),
            }
            vec![(*q, dq), (*k, dk), (*v, dv)]
        }
        Op::IndexerKl { qi, ki, wi, dqi, dki, dwi } => {
            let scaled = |g: &[f32]| g.iter().map(|x| x * dout[0]).collect::<Vec<f32>>();
            vec![(*qi, scaled(dqi)), (*ki, scaled(dki)), (*wi, scaled(dwi))]
        }
        Op::Detach => Vec::new(),
        Op::Scale { x, s } => vec![(*x, dout.iter().map(|v| v * s).collect())],
        Op::Moe { x, logits, w_gate, w_up, w_down, routing, cache, cfg, c, f } => {
            let (n, c, k) = (routing.n_tokens, *c, cfg.top_k);
            let (wg, wu, wd) = (tape.value(*w_gate), tape.value(*w_up), tape.value(*w_down));
            let (mut dx, mut dwg, mut dwu, mut dwd) =
                (vec![0.0; n * c], vec![0.0; wg.len()], vec![0.0; wu.len()], vec![0.0; wd.len()]);
            let mut d_gates = vec![0.0; n * k];
            moe_backward(
                dout,
                n,
                c,
                routing,
                wg,
                wu,
                wd,
                *f,
                cache,
                &mut dx,
                &mut dwg,
                &mut dwu,
                &mut dwd,
                &mut d_gates,
            );
            let mut d_logits = vec![0.0; n * cfg.n_experts];
            router_backward(routing, &d_gates, None, cfg, &mut d_logits);
            vec![(*x, dx), (*logits, d_logits), (*w_gate, dwg), (*w_up, dwu), (*w_down, dwd)]
        }
        Op::MoeBalance { logits, routing, cfg, d_scores } => {
            let ds: Vec<f32> = d_scores.iter().map(|v| v * dout[0]).collect();
            let zero_gates = vec![0.0; routing.n_tokens * cfg.top_k];
            let mut d_logits = vec![0.0; routing.n_tokens * cfg.n_experts];
            router_backward(routing, &zero_gates, Some(&ds), cfg, &mut d_logits);
            vec![(*logits, d_logits)]
        }
        Op::WeightedSum { x, w } => vec![(*x, w.iter().map(|v| v * dout[0]).collect())],
        Op::Add { a, b } => vec![(*a, dout.to_vec()), (*b, dout.to_vec())],
        Op::Checkpoint { .. } => unreachable!("the tape runs checkpoint backwards itself"),
        Op::CrossEntropy { logits, targets, vocab, cap, n_valid, lse } => {
            let mut dz = vec![0.0; tape.value(*logits).len()];
            let scale = if *n_valid > 0 { dout[0] / *n_valid as f32 } else { 0.0 };
            loss::softcap_cross_entropy_backward(tape.value(*logits), *vocab, targets, *cap, lse, scale, &mut dz);
            vec![(*logits, dz)]
        }
    }
}
