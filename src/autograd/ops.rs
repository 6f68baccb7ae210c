//! The ops the tape knows: forward (as `Tape` methods, each one backend call) and backward.

use super::{Tape, Value, Var};
use crate::backend::{AttnDims, Backend, DsaDims, RopeKind, RouterConfig, WindowDims};
use anyhow::Result;
use std::rc::Rc;

/// The keys each query of a DSA layer attends to (`[b, t, kmax]` on the backend).
pub type Selection<B> = Rc<<B as Backend>::Sel>;

/// A function of tape variables that `Tape::checkpoint` can recompute.
pub type CheckpointFn<'p, B> = dyn Fn(&mut Tape<'p, B>, &[Var]) -> Result<Var> + 'p;

/// What each op's backward needs. Inputs are `Var`s; everything else is saved state.
pub enum Op<'p, B: Backend> {
    /// y[m,n] = x[m,k] · w[n,k]ᵀ (a bias-free linear layer, w in PyTorch's [out, in] layout).
    Linear {
        x: Var,
        w: Var,
        mkn: (usize, usize, usize),
    },
    /// resid + x·wᵀ (an output projection and the residual add, one GEMM epilogue).
    LinearResidual {
        x: Var,
        w: Var,
        resid: Var,
        mkn: (usize, usize, usize),
    },
    /// A dense FFN's up and down projections with the residual: resid + swiglu(gate, x·w_upᵀ)·w_downᵀ;
    /// keeps the up product and the activation. Its backward takes dgate and dup straight from
    /// dout·w_down (the SwiGLU backward in that GEMM's epilogue on CUDA).
    SwiGluFfn {
        x: Var,
        gate: Var,
        w_up: Var,
        w_down: Var,
        resid: Var,
        up: B::A,
        act: B::A,
        /// (tokens, model width, hidden width)
        mcf: (usize, usize, usize),
    },
    /// Router logits x·wᵀ in f32.
    RouterLinear {
        x: Var,
        w: Var,
        mkn: (usize, usize, usize),
    },
    Embedding {
        table: Var,
        ids: B::Ids,
        n: usize,
        dim: usize,
    },
    RmsNorm {
        x: Var,
        rstd: B::F,
        dim: usize,
    },
    /// Affine LayerNorm (`autograd::layernorm`); keeps (mean, 1/std) per row.
    LayerNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        stats: B::F,
        dim: usize,
    },
    Rope {
        x: Var,
        bth: (usize, usize, usize),
        kind: RopeKind,
    },
    /// QK-norm and RoPE of one of q or k (one kernel on CUDA); keeps the per-head rstd.
    QkNormRope {
        x: Var,
        rstd: B::F,
        bth: (usize, usize, usize),
    },
    /// Causal attention; the output and the log-sum-exp are all it keeps (O(T) per head).
    Attention {
        q: Var,
        k: Var,
        v: Var,
        lse: B::F,
        dims: AttnDims,
    },
    /// Sliding-window + global-token attention (same layouts and saved state as `Attention`).
    WindowAttention {
        q: Var,
        k: Var,
        v: Var,
        lse: B::F,
        dims: WindowDims,
    },
    /// DeepSeek Sparse Attention over the selection `sel` of the lightning indexer (None: dense
    /// causal attention, during the warm-up). Gradients reach q, k, v only.
    DsaAttention {
        q: Var,
        k: Var,
        v: Var,
        sel: Option<Selection<B>>,
        lse: Rc<B::F>,
        dims: DsaDims,
    },
    /// The indexer's KL distillation loss (a scalar). Its gradients (computed in the forward, for
    /// a unit output gradient) reach only the indexer inputs qi, ki and wi.
    IndexerKl {
        qi: Var,
        ki: Var,
        wi: Var,
        weight: f32,
        d: (B::A, B::A, B::A),
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
    /// Routed experts and their weighted combine: x [n, C], router `logits` [n, E], expert
    /// stacks w_gate, w_up [E, F, C], w_down [E, C, F]. The routing (selection with the bias) is
    /// fixed; gradients reach x, the logits (through the gates) and the experts.
    Moe {
        x: Var,
        logits: Var,
        w: [Var; 3],
        routing: Rc<B::Routing>,
        cache: B::MoeCache,
        cfg: RouterConfig,
        n: usize,
        cf: (usize, usize),
    },
    /// The sequence-wise balance loss of one MoE layer (a scalar); its gradient reaches the logits.
    MoeBalance {
        logits: Var,
        routing: Rc<B::Routing>,
        cfg: RouterConfig,
        d_scores: B::F,
    },
    Add {
        a: Var,
        b: Var,
    },
    /// [a | b]: the columns of a [n, ca] then those of b [n, cb].
    ConcatCols {
        a: Var,
        b: Var,
        n: usize,
        ca: usize,
        cb: usize,
    },
    /// Columns `off..off + width` of x [n, c].
    SliceCols {
        x: Var,
        n: usize,
        c: usize,
        off: usize,
        width: usize,
    },
    /// x [n, d] repeated h times along the columns: [n, h·d].
    RepeatHeads {
        x: Var,
        n: usize,
        d: usize,
        h: usize,
    },
    /// The same values with another shape.
    Reshape {
        x: Var,
    },
    /// Σ x ∘ w for a constant w (a scalar; used to probe gradients in tests).
    WeightedSum {
        x: Var,
        w: Vec<f32>,
    },
    /// A recomputed sub-graph: `f(inputs)` runs again in the backward (activation checkpointing).
    Checkpoint {
        inputs: Vec<Var>,
        f: Rc<CheckpointFn<'p, B>>,
    },
    /// `weight` times the mean softcapped cross-entropy over rows with target ≥ 0.
    CrossEntropy {
        logits: Var,
        targets: B::Tgt,
        vocab: usize,
        cap: f32,
        n_valid: usize,
        weight: f32,
        lse: B::F,
    },
}

impl<B: Backend> Op<'_, B> {
    /// The variables the backward reads or sends gradients to.
    pub fn inputs(&self) -> Vec<Var> {
        match self {
            Op::Linear { x, w, .. } | Op::RouterLinear { x, w, .. } => vec![*x, *w],
            Op::LinearResidual { x, w, resid, .. } => vec![*x, *w, *resid],
            Op::SwiGluFfn { x, gate, w_up, w_down, resid, .. } => vec![*x, *gate, *w_up, *w_down, *resid],
            Op::Embedding { table, .. } => vec![*table],
            Op::RmsNorm { x, .. } | Op::Rope { x, .. } | Op::QkNormRope { x, .. } | Op::Scale { x, .. } => vec![*x],
            Op::SliceCols { x, .. } | Op::RepeatHeads { x, .. } | Op::Reshape { x } => vec![*x],
            Op::WeightedSum { x, .. } => vec![*x],
            Op::Attention { q, k, v, .. } | Op::WindowAttention { q, k, v, .. } | Op::DsaAttention { q, k, v, .. } => {
                vec![*q, *k, *v]
            }
            Op::IndexerKl { qi, ki, wi, .. } => vec![*qi, *ki, *wi],
            Op::Detach => Vec::new(),
            Op::SwiGlu { g, u } => vec![*g, *u],
            Op::Moe { x, logits, w, .. } => vec![*x, *logits, w[0], w[1], w[2]],
            Op::MoeBalance { logits, .. } => vec![*logits],
            Op::Add { a, b } | Op::ConcatCols { a, b, .. } => vec![*a, *b],
            Op::LayerNorm { x, gamma, beta, .. } => vec![*x, *gamma, *beta],
            Op::Checkpoint { inputs, .. } => inputs.clone(),
            Op::CrossEntropy { logits, .. } => vec![*logits],
        }
    }

    /// Whether the backward reads the op's own output (the attention kinds).
    pub fn reads_output(&self) -> bool {
        matches!(self, Op::Attention { .. } | Op::WindowAttention { .. } | Op::DsaAttention { .. })
    }

    /// Bytes of saved state beyond the op's output (counted as activations).
    pub fn saved_bytes(&self, be: &B) -> usize {
        let (fl, al) = (|f: &B::F| 4 * be.f_len(f), |a: &B::A| 4 * be.a_len(a));
        match self {
            Op::Embedding { n, .. } => 4 * n,
            Op::RmsNorm { rstd, .. } | Op::QkNormRope { rstd, .. } | Op::LayerNorm { stats: rstd, .. } => fl(rstd),
            Op::Attention { lse, .. } | Op::WindowAttention { lse, .. } => fl(lse),
            Op::DsaAttention { lse, sel, dims, .. } => fl(lse) + sel.as_ref().map_or(0, |_| 4 * dims.sel_len()),
            Op::SwiGluFfn { up, act, .. } => al(up) + al(act),
            Op::WeightedSum { w, .. } => 4 * w.len(),
            Op::Moe { cache, n, cfg, .. } => 4 * n * cfg.n_experts + be.moe_cache_bytes(cache),
            Op::MoeBalance { d_scores, .. } => fl(d_scores),
            Op::IndexerKl { d: (a, b, c), .. } => al(a) + al(b) + al(c),
            Op::CrossEntropy { lse, n_valid: _, .. } => 2 * fl(lse),
            _ => 0,
        }
    }

    /// (forward, backward) floating-point operations of the op's matrix products.
    pub fn flops(&self) -> (f64, f64) {
        match self {
            Op::Linear { mkn: (m, k, n), .. }
            | Op::LinearResidual { mkn: (m, k, n), .. }
            | Op::RouterLinear { mkn: (m, k, n), .. } => {
                let f = 2.0 * (*m * *k * *n) as f64;
                (f, 2.0 * f) // backward: dX and dW, one product each
            }
            Op::SwiGluFfn { mcf: (m, c, f), .. } => {
                let fl = 4.0 * (*m * *c * *f) as f64; // two products
                (fl, 2.0 * fl)
            }
            Op::Attention { dims: d, .. } => {
                // causal: about half of the T×T scores; QKᵀ and PV forward, four products backward
                let f = 2.0 * (d.b * d.h * d.t * d.t * d.d) as f64;
                (f, 2.0 * f)
            }
            _ => (0.0, 0.0),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::LinearResidual { .. } => "linear_residual",
            Op::SwiGluFfn { .. } => "swiglu_ffn",
            Op::RouterLinear { .. } => "router_linear",
            Op::Embedding { .. } => "embedding",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::LayerNorm { .. } => "layernorm",
            Op::Rope { .. } => "rope",
            Op::QkNormRope { .. } => "qk_norm_rope",
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
            Op::ConcatCols { .. } => "concat_cols",
            Op::SliceCols { .. } => "slice_cols",
            Op::RepeatHeads { .. } => "repeat_heads",
            Op::Reshape { .. } => "reshape",
            Op::WeightedSum { .. } => "weighted_sum",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Checkpoint { .. } => "checkpoint",
        }
    }
}

/// (m, k, n) of x [.., k] times w [n, k]ᵀ, and the output shape.
fn linear_dims<B: Backend>(tape: &Tape<B>, x: Var, w: Var) -> ((usize, usize, usize), Vec<usize>) {
    let (xs, ws) = (tape.shape(x), tape.shape(w));
    let k = *xs.last().expect("linear: x has no dims");
    let m = xs.iter().product::<usize>() / k.max(1);
    assert!(ws.len() == 2 && ws[1] == k, "linear: w {ws:?} does not match x's last dim {k}");
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(ws[0]);
    ((m, k, ws[0]), shape)
}

impl<'p, B: Backend> Tape<'p, B> {
    pub(super) fn out(&mut self, a: B::A, shape: &[usize], op: Op<'p, B>) -> Var {
        self.record(Value::Owned(a), shape, op)
    }

    pub fn linear(&mut self, x: Var, w: Var) -> Result<Var> {
        let ((m, k, n), shape) = linear_dims(self, x, w);
        let y = self.backend().linear(self.get(x), self.get(w), m, k, n)?;
        Ok(self.out(y, &shape, Op::Linear { x, w, mkn: (m, k, n) }))
    }

    /// resid + x·wᵀ (resid shaped like the product).
    pub fn linear_residual(&mut self, x: Var, w: Var, resid: Var) -> Result<Var> {
        let ((m, k, n), shape) = linear_dims(self, x, w);
        assert_eq!(self.shape(resid), &shape[..], "linear_residual: resid is not shaped like the product");
        let y = self.backend().linear_residual(self.get(x), self.get(w), (m, k, n), self.get(resid))?;
        Ok(self.out(y, &shape, Op::LinearResidual { x, w, resid, mkn: (m, k, n) }))
    }

    /// resid + swiglu(gate, x·w_upᵀ)·w_downᵀ: a dense FFN after its gate projection, fused.
    pub fn swiglu_ffn(&mut self, x: Var, gate: Var, w_up: Var, w_down: Var, resid: Var) -> Result<Var> {
        let ((m, c, f), _) = linear_dims(self, x, w_up);
        let (up, act) = self.backend().linear_swiglu(self.get(x), self.get(w_up), (m, c, f), self.get(gate))?;
        let shape = self.shape(resid).to_vec();
        let y = self.backend().linear_residual(&act, self.get(w_down), (m, f, c), self.get(resid))?;
        Ok(self.out(y, &shape, Op::SwiGluFfn { x, gate, w_up, w_down, resid, up, act, mcf: (m, c, f) }))
    }

    /// Router logits x·wᵀ, kept in f32 (routing decisions read them).
    pub fn router_logits(&mut self, x: Var, w: Var) -> Result<Var> {
        let ((m, k, n), shape) = linear_dims(self, x, w);
        let y = self.backend().router_logits(self.get(x), self.get(w), m, k, n)?;
        Ok(self.record(Value::Full(y), &shape, Op::RouterLinear { x, w, mkn: (m, k, n) }))
    }

    /// Rows of `table` [vocab, dim] (an f32 parameter) for each id. Ids must be < vocab (the
    /// model checks and reports).
    pub fn embedding(&mut self, table: Var, ids: &[u32]) -> Result<Var> {
        let dim = self.shape(table)[1];
        let be = self.backend();
        let dev_ids = be.ids(ids)?;
        let y = be.embedding(self.get_f(table), dim, &dev_ids, ids.len())?;
        Ok(self.out(y, &[ids.len(), dim], Op::Embedding { table, ids: dev_ids, n: ids.len(), dim }))
    }

    /// Parameter-free RMSNorm over groups of `dim` consecutive values (the last dim, or a head).
    pub fn rmsnorm(&mut self, x: Var, dim: usize) -> Result<Var> {
        let (y, rstd) = self.backend().rmsnorm(self.get(x), dim)?;
        let shape = self.shape(x).to_vec();
        Ok(self.out(y, &shape, Op::RmsNorm { x, rstd, dim }))
    }

    /// Affine LayerNorm of each row of x [.., dim] with γ, β [dim] (`Backend::layernorm`).
    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let dim = *shape.last().expect("layernorm: x has no dims");
        anyhow::ensure!(
            self.shape(gamma) == [dim] && self.shape(beta) == [dim],
            "layernorm: gamma {:?} and beta {:?} must be [{dim}]",
            self.shape(gamma),
            self.shape(beta)
        );
        let (y, stats) = self.backend().layernorm(self.get(x), self.get(gamma), self.get(beta), dim)?;
        Ok(self.out(y, &shape, Op::LayerNorm { x, gamma, beta, stats, dim }))
    }

    /// Rotary embedding on x viewed as [b, t, h, head_dim] with the `kind` table.
    pub fn rope(&mut self, x: Var, bth: (usize, usize, usize), kind: RopeKind) -> Result<Var> {
        let y = self.backend().rope(self.get(x), bth, kind, false)?;
        let shape = self.shape(x).to_vec();
        Ok(self.out(y, &shape, Op::Rope { x, bth, kind }))
    }

    /// Per-head RMSNorm then RoPE (attention table) of x viewed as [b, t, h, head_dim], fused.
    pub fn qk_norm_rope(&mut self, x: Var, bth: (usize, usize, usize)) -> Result<Var> {
        let (y, rstd) = self.backend().qk_norm_rope(self.get(x), bth)?;
        let shape = self.shape(x).to_vec();
        Ok(self.out(y, &shape, Op::QkNormRope { x, rstd, bth }))
    }

    /// The value width dv of an attention call (v holds `b·t·h_kv` rows of dv values; dv = d
    /// for GQA, MLA's v_head_dim) and the output's shape: q's, its last dim `h·d` → `h·dv` (or
    /// `d` → `dv` for q shaped `[.., h, d]`).
    pub(super) fn value_width(&self, q: Var, v: Var, dims: &AttnDims) -> (usize, Vec<usize>) {
        let rows = dims.b * dims.t * dims.h_kv;
        let dv = self.shape(v).iter().product::<usize>() / rows.max(1);
        let mut shape = self.shape(q).to_vec();
        if let Some(last) = shape.last_mut() {
            *last = *last / dims.d.max(1) * dv;
        }
        (dv, shape)
    }

    /// Causal attention of q `[.., h·d]`, k `[.., h_kv·d]` and v `[.., h_kv·dv]` (the value width
    /// from v's size): `[.., h·dv]`.
    pub fn attention(&mut self, q: Var, k: Var, v: Var, dims: AttnDims) -> Result<Var> {
        let (dv, shape) = self.value_width(q, v, &dims);
        let (out, lse) = self.backend().attention(&dims, dv, self.get(q), self.get(k), self.get(v))?;
        Ok(self.out(out, &shape, Op::Attention { q, k, v, lse, dims }))
    }

    /// Window + global attention, shaped as [`Tape::attention`].
    pub fn window_attention(&mut self, q: Var, k: Var, v: Var, dims: WindowDims) -> Result<Var> {
        let (dv, shape) = self.value_width(q, v, &dims.attn());
        let (out, lse) = self.backend().window_attention(&dims, dv, self.get(q), self.get(k), self.get(v))?;
        Ok(self.out(out, &shape, Op::WindowAttention { q, k, v, lse, dims }))
    }

    pub fn swiglu(&mut self, g: Var, u: Var) -> Result<Var> {
        let y = self.backend().swiglu(self.get(g), self.get(u))?;
        let shape = self.shape(g).to_vec();
        Ok(self.out(y, &shape, Op::SwiGlu { g, u }))
    }

    /// A copy of x that is a leaf for the backward (no gradient reaches x through it).
    pub fn detach(&mut self, x: Var) -> Result<Var> {
        let y = self.backend().a_copy(self.get(x))?;
        let shape = self.shape(x).to_vec();
        Ok(self.out(y, &shape, Op::Detach))
    }

    /// s·x for a constant s.
    pub fn scale(&mut self, x: Var, s: f32) -> Result<Var> {
        let mut y = self.backend().a_copy(self.get(x))?;
        self.backend().scale(&mut y, s)?;
        let shape = self.shape(x).to_vec();
        Ok(self.out(y, &shape, Op::Scale { x, s }))
    }

    /// DSA: selects each query's keys with the indexer (qi, ki, wi: see `backend::cpu::dsa`; wi
    /// already scaled), then attends over them; `dense` skips the selection (warm-up). Returns the
    /// output, the selection (None when dense) and the attention's log-sum-exp, for `indexer_kl`.
    #[allow(clippy::type_complexity)]
    pub fn dsa_attention(
        &mut self,
        (q, k, v): (Var, Var, Var),
        (qi, ki, wi): (Var, Var, Var),
        dims: DsaDims,
        dense: bool,
    ) -> Result<(Var, Option<Selection<B>>, Rc<B::F>)> {
        let be = self.backend();
        let (dv, shape) = self.value_width(q, v, &dims.attn());
        let (qv, kv, vv) = (self.get(q), self.get(k), self.get(v));
        let (out, lse, sel) = if dense {
            let (out, lse) = be.attention(&dims.attn(), dv, qv, kv, vv)?;
            (out, lse, None)
        } else {
            let sel = be.indexer_topk(&dims, self.get(qi), self.get(ki), self.get(wi))?;
            let (out, lse) = be.dsa_attention(&dims, dv, (qv, kv, vv), &sel)?;
            (out, lse, Some(Rc::new(sel)))
        };
        let lse = Rc::new(lse);
        let op = Op::DsaAttention { q, k, v, sel: sel.clone(), lse: lse.clone(), dims };
        Ok((self.out(out, &shape, op), sel, lse))
    }

    /// The indexer's KL loss against the attention of q, k (constants here) over the same keys
    /// (`sel`, or every earlier key when None); see `backend::cpu::dsa::indexer_kl`.
    pub fn indexer_kl(
        &mut self,
        (q, k): (Var, Var),
        lse: &B::F,
        (qi, ki, wi): (Var, Var, Var),
        sel: Option<&B::Sel>,
        dims: DsaDims,
        weight: f32,
    ) -> Result<(Var, f32)> {
        let index = (self.get(qi), self.get(ki), self.get(wi));
        let (loss, dqi, dki, dwi) = self.backend().indexer_kl(&dims, self.get(q), self.get(k), lse, index, sel)?;
        let value = if weight == 1.0 { loss } else { weight * loss };
        let op = Op::IndexerKl { qi, ki, wi, weight, d: (dqi, dki, dwi) };
        Ok((self.record(Value::Scalar(value), &[], op), loss))
    }

    /// Routes x by `logits` (f32, from `router_logits`) + `bias` and runs the routed experts;
    /// returns [n, C] and the routing.
    pub fn moe(
        &mut self,
        x: Var,
        logits: Var,
        w: [Var; 3],
        bias: &[f32],
        cfg: RouterConfig,
    ) -> Result<(Var, Rc<B::Routing>)> {
        let (ws, xs) = (self.shape(w[0]).to_vec(), self.shape(x).to_vec());
        assert!(ws.len() == 3 && ws[0] == cfg.n_experts, "moe: w_gate {ws:?} is not [E, F, C]");
        let (f, c) = (ws[1], ws[2]);
        let n = xs.iter().product::<usize>() / c;
        let be = self.backend();
        let routing = Rc::new(be.route(self.get_f(logits), bias, &cfg)?);
        let (out, cache) =
            be.moe_forward(self.get(x), (n, c, f), &routing, [self.get(w[0]), self.get(w[1]), self.get(w[2])])?;
        let op = Op::Moe { x, logits, w, routing: routing.clone(), cache, cfg, n, cf: (c, f) };
        Ok((self.out(out, &xs, op), routing))
    }

    /// α·Σ_i f_i·P_i averaged over the `n_seqs` sequences of `seq_len` tokens (a scalar).
    pub fn moe_balance(
        &mut self,
        logits: Var,
        routing: Rc<B::Routing>,
        cfg: RouterConfig,
        (n_seqs, seq_len): (usize, usize),
        alpha: f32,
    ) -> Result<Var> {
        let (loss, d_scores) = self.backend().balance_loss(&routing, n_seqs, seq_len, &cfg, alpha, 1.0)?;
        Ok(self.record(Value::Scalar(loss), &[], Op::MoeBalance { logits, routing, cfg, d_scores }))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        assert_eq!(self.shape(a), self.shape(b), "add: shapes differ");
        let mut y = self.backend().a_copy(self.get(a))?;
        self.backend().add(&mut y, self.get(b))?;
        let shape = self.shape(a).to_vec();
        Ok(self.out(y, &shape, Op::Add { a, b }))
    }

    /// Σ x ∘ w for a constant w of the same length (accumulated in f64, on the host).
    pub fn weighted_sum(&mut self, x: Var, w: &[f32]) -> Result<Var> {
        let xv = self.to_host(x)?;
        assert_eq!(xv.len(), w.len(), "weighted_sum: length mismatch");
        let s: f64 = xv.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
        Ok(self.record(Value::Scalar(s as f32), &[], Op::WeightedSum { x, w: w.to_vec() }))
    }

    /// Mean over rows with target ≥ 0 of the softcapped cross-entropy (a scalar).
    /// Also returns the number of rows that counted.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[i32], cap: f32) -> Result<(Var, usize)> {
        let (loss, n_valid, _) = self.cross_entropy_weighted(logits, targets, cap, 1.0)?;
        Ok((loss, n_valid))
    }

    /// `weight` × the mean cross-entropy (a scalar whose backward is scaled by `weight`, e.g. an
    /// MTP depth's λ/D), the number of rows that counted and the unweighted mean.
    pub fn cross_entropy_weighted(
        &mut self,
        logits: Var,
        targets: &[i32],
        cap: f32,
        weight: f32,
    ) -> Result<(Var, usize, f32)> {
        let vocab = *self.shape(logits).last().expect("cross_entropy: logits have no dims");
        let be = self.backend();
        let tgt = be.targets(targets)?;
        let (total, lse) = be.cross_entropy(self.get(logits), vocab, &tgt, cap)?;
        let n_valid = targets.iter().filter(|&&t| t >= 0).count();
        let mean = if n_valid > 0 { (total / n_valid as f64) as f32 } else { 0.0 };
        let value = if weight == 1.0 { mean } else { weight * mean };
        let op = Op::CrossEntropy { logits, targets: tgt, vocab, cap, n_valid, weight, lse };
        Ok((self.record(Value::Scalar(value), &[], op), n_valid, mean))
    }
}
