//! A block's FFN half (docs/model.md): the SwiGLU FFN, or DeepSeekMoE's routed and shared
//! experts with the balance loss and the per-layer load the bias update reads.

use super::model::{Model, MoeLoad};
use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use anyhow::Result;

impl Model {
    /// The FFN half of block `l`: x + ffn(norm(x)), `w` = the block's parameters.
    pub(super) fn block_ffn<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        x: Var,
        w: &[Var],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        let c = &self.config;
        let h = tape.rmsnorm(x, c.n_embd)?;
        let ffn_w = &w[c.n_attn_params()..w.len() - c.n_indexer_params(l)];
        if c.is_moe_layer(l) {
            let y = self.moe_ffn(tape, l, h, ffn_w, b, t)?;
            tape.add(x, y)
        } else {
            self.dense_ffn(tape, h, ffn_w, x)
        }
    }

    /// SwiGLU FFN with the residual: resid + w_down(silu(w_gate h) ∘ w_up h).
    pub(super) fn dense_ffn<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        h: Var,
        w: &[Var],
        resid: Var,
    ) -> Result<Var> {
        let g = tape.linear(h, w[0])?;
        tape.swiglu_ffn(h, g, w[1], w[2], resid)
    }

    /// DeepSeekMoE FFN on h [b·t, C]: Σ_k g_k·expert_k(h) over the routed experts plus the shared
    /// experts; `w` = router, expert stacks (w_gate, w_up, w_down), then the shared experts' three
    /// matrices if any. The balance loss (α > 0) joins the objective as an aux loss; the layer's load
    /// is recorded for the bias update and the metrics.
    pub(super) fn moe_ffn<'p, B: Backend>(
        &'p self,
        tape: &mut Tape<'p, B>,
        l: usize,
        h: Var,
        w: &[Var],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        let m = &self.config.moe;
        let cfg = m.router();
        let logits = tape.router_logits(h, w[0])?;
        let (mut y, routing) = tape.moe(h, logits, [w[1], w[2], w[3]], &self.moe_bias[l], cfg)?;
        let mut balance_loss = 0.0;
        // an MTP module's balance loss is weighted as its cross-entropy (λ/D)
        let alpha = if l < self.config.n_layer { m.seq_aux_alpha } else { m.seq_aux_alpha * self.mtp_weight() };
        if alpha > 0.0 && tape.aux_enabled() {
            let bal = tape.moe_balance(logits, routing.clone(), cfg, (b, t), alpha)?;
            balance_loss = tape.scalar(bal);
            tape.add_aux_loss(bal);
        }
        if w.len() > 4 {
            y = self.dense_ffn(tape, h, &w[4..7], y)?; // routed + shared
        }
        let (counts, dropped) = tape.backend().routing_counts(&routing)?;
        let load = MoeLoad { counts, dropped, assignments: b * t * cfg.top_k, balance_loss };
        self.moe_loads.lock().unwrap_or_else(|e| e.into_inner())[l] = Some(load);
        Ok(y)
    }
}
