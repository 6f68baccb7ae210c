//! A model being trained on a [`Backend`]: its parameters, their GEMM-precision copies (where the
//! backend needs them), gradients and optimizer state, all on the backend. The forward and the
//! backward are the model's one statement (`nn::Model::loss` on the tape); the optimizer is
//! `optim::Optimizer`'s math (Muon for the block matrices with the tall-matrix lr factor, AdamW
//! with the (n_embd/768)^-½ lr scale for wte, lm_head and the router) over the backend's ops.
//!
//! The host `Model` keeps the config, the MoE selection biases and the per-layer statistics; its
//! parameter tensors and the `Optimizer`'s state move into the trainer ([`Trainer::new`]) and back
//! ([`Trainer::restore`]); on the CPU both moves are free. [`Trainer::copy_to_host`] refreshes
//! them for checkpoints and sampling, [`Trainer::release_host`] drops that copy again.

use crate::autograd::{OpTimes, Tape, Var};
use crate::backend::{AdamWStep, Backend, StateBuf, UpdateSlot};
use crate::memory::{self, Category};
use crate::nn::model::MoeLoad;
use crate::nn::{Model, ParamKind};
use crate::optim::{OptimConfig, Optimizer, ParamState};
use crate::train::zero::DataParallel;
use anyhow::{bail, Result};
use std::time::Instant;

/// One optimizer step's figures (`train::train`'s metrics).
pub struct StepStats {
    /// Mean loss over the micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Seconds in the optimizer update.
    pub update_s: f64,
    /// Per-op times of the forward and backward passes, when asked for.
    pub op_times: Option<OpTimes>,
    /// Per layer, the routed load summed over the micro-batches (None for dense FFNs).
    pub moe_loads: Vec<Option<MoeLoad>>,
    /// The DSA indexers' KL loss, averaged over DSA layers and micro-batches (None without DSA).
    pub indexer_loss: Option<f32>,
    /// Per MTP depth, its cross-entropy averaged over the micro-batches (empty without MTP).
    pub mtp_losses: Vec<f32>,
    /// Seconds this rank spent in collectives during the step (None for one process).
    pub comm_s: Option<f64>,
}

/// Per-layer statistics of one pass: the MoE loads and the indexer KL.
#[derive(Clone, Debug, Default)]
pub struct PassStats {
    pub moe_loads: Vec<Option<MoeLoad>>,
    pub indexer_losses: Vec<Option<f32>>,
    pub mtp_losses: Vec<Option<f32>>,
}

pub struct Trainer<B: Backend> {
    pub ops: B,
    pub optim: OptimConfig,
    /// (name, kind, shape) of each parameter, in checkpoint order.
    pub specs: Vec<(String, ParamKind, Vec<usize>)>,
    pub params: Vec<B::F>,
    /// The GEMM-precision copy of each parameter, where the backend keeps one.
    pub(super) copies: Vec<Option<B::A>>,
    pub grads: Vec<B::F>,
    pub state: Vec<StateBuf<B::F>>,
    /// Optimizer steps taken so far.
    pub step: u64,
    adam_lr_scale: f32,
    _accounting: Vec<Box<dyn std::any::Any>>,
    /// Parameters that do not train this step (their gradients are zeroed before clipping and
    /// they get no update; the MoE biases stay too while any is frozen).
    pub frozen: Vec<bool>,
    /// The other ranks of a data-parallel job (`train::zero`); None for one process.
    pub(super) dp: Option<DataParallel<B::F>>,
}

impl<B: Backend> Trainer<B> {
    /// Moves `model`'s parameters and `opt`'s state onto the backend (a fresh or a resumed run);
    /// the host tensors are left empty until [`Trainer::copy_to_host`] or [`Trainer::restore`].
    pub fn new(ops: B, model: &mut Model, opt: &mut Optimizer) -> Result<Self> {
        Self::new_sharded(ops, model, opt, None)
    }

    /// [`Trainer::new`] for one rank of a data-parallel job (`dp`), which keeps only the
    /// optimizer state of the parameters it owns.
    pub fn new_sharded(
        ops: B,
        model: &mut Model,
        opt: &mut Optimizer,
        dp: Option<Box<dyn crate::dist::Collectives<B::F>>>,
    ) -> Result<Self> {
        let c = &model.config;
        let specs: Vec<_> = model.params.iter().map(|p| (p.name.clone(), p.kind, p.tensor.shape.clone())).collect();
        if Model::expected_shapes(c).len() != specs.len() {
            bail!(
                "the model's parameters are not wte, the blocks, lm_head, the MTP modules (as Model::new makes them)"
            );
        }
        let (mut params, mut copies, mut grads) = (Vec::new(), Vec::new(), Vec::new());
        for p in model.params.iter_mut() {
            let n = p.tensor.numel();
            let f = ops.f_from_vec(std::mem::take(&mut p.tensor.data))?;
            // The embedding table is read in f32 (no copy); the rest are GEMM operands.
            let copy = match (p.kind, ops.f_as_a(&f)) {
                (ParamKind::Embedding, _) | (_, Some(_)) => None,
                (_, None) => {
                    let mut a = ops.a_zeros(n)?;
                    ops.cast(&f, &mut a)?;
                    Some(a)
                }
            };
            params.push(f);
            copies.push(copy);
            grads.push(ops.f_zeros(n)?);
        }
        let state = std::mem::take(&mut opt.state)
            .into_iter()
            .map(|st| {
                Ok(match st {
                    ParamState::AdamW { m, v } => StateBuf::AdamW { m: ops.f_from_vec(m)?, v: ops.f_from_vec(v)? },
                    ParamState::Muon { momentum } => StateBuf::Muon { momentum: ops.f_from_vec(momentum)? },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adam_lr_scale = (c.n_embd as f32 / 768.0).powf(-0.5);
        let n_params = params.len();
        let dp = dp.map(|comm| DataParallel::new(comm, &specs));
        let mut tr = Trainer {
            ops,
            optim: opt.config.clone(),
            specs,
            params,
            copies,
            grads,
            state,
            step: opt.step,
            adam_lr_scale,
            _accounting: Vec::new(),
            frozen: vec![false; n_params],
            dp,
        };
        if tr.dp.is_some() {
            let kept = tr.shard_state()?;
            opt.track_state_floats(kept); // the host's count, where the state lives on the host
        }
        let (ops, grads, state) = (&tr.ops, &tr.grads, &tr.state);
        let grad_refs: Vec<&B::F> = grads.iter().collect();
        let state_refs: Vec<&B::F> = state
            .iter()
            .flat_map(|s| match s {
                StateBuf::AdamW { m, v } => vec![m, v],
                StateBuf::Muon { momentum } => vec![momentum],
            })
            .collect();
        // (on the host the `Optimizer` already counts its state, which moved here)
        let mut _accounting = vec![ops.account(&grad_refs, Category::Gradients)];
        if !B::HOST_MEMORY {
            _accounting.push(ops.account(&state_refs, Category::OptimizerState));
        }
        drop((grad_refs, state_refs));
        tr._accounting = _accounting;
        Ok(tr)
    }

    /// Copies the parameters and the optimizer state into the host model and optimizer (for
    /// checkpoints, evaluation on the host, sampling).
    /// In a data-parallel job every rank calls it; only rank 0 receives the whole state.
    pub fn copy_to_host(&self, model: &mut Model, opt: &mut Optimizer) -> Result<()> {
        for (p, f) in model.params.iter_mut().zip(&self.params) {
            p.tensor.data = self.ops.f_to_host(f)?;
        }
        if self.dp.is_some() {
            opt.state = self.gather_state_to_root()?.unwrap_or_default();
            opt.step = self.step;
            return Ok(());
        }
        opt.state = self
            .state
            .iter()
            .map(|s| {
                Ok(match s {
                    StateBuf::AdamW { m, v } => {
                        ParamState::AdamW { m: self.ops.f_to_host(m)?, v: self.ops.f_to_host(v)? }
                    }
                    StateBuf::Muon { momentum } => ParamState::Muon { momentum: self.ops.f_to_host(momentum)? },
                })
            })
            .collect::<Result<_>>()?;
        opt.step = self.step;
        Ok(())
    }

    /// Empties the host copies again (after a checkpoint was written from them).
    pub fn release_host(&self, model: &mut Model, opt: &mut Optimizer) {
        for p in model.params.iter_mut() {
            p.tensor.data = Vec::new();
        }
        opt.state.clear();
    }

    /// Moves everything back into the host model and optimizer, ending the trainer.
    pub fn restore(self, model: &mut Model, opt: &mut Optimizer) -> Result<()> {
        let ops = &self.ops;
        for (p, f) in model.params.iter_mut().zip(self.params) {
            p.tensor.data = ops.f_into_host(f)?;
        }
        opt.state = self
            .state
            .into_iter()
            .map(|s| {
                Ok(match s {
                    StateBuf::AdamW { m, v } => ParamState::AdamW { m: ops.f_into_host(m)?, v: ops.f_into_host(v)? },
                    StateBuf::Muon { momentum } => ParamState::Muon { momentum: ops.f_into_host(momentum)? },
                })
            })
            .collect::<Result<_>>()?;
        opt.step = self.step;
        Ok(())
    }

    /// Every parameter's gradient on the host, as (name, values) in `specs` order.
    pub fn grads_to_host(&self) -> Result<Vec<(String, Vec<f32>)>> {
        self.specs.iter().zip(&self.grads).map(|((name, ..), g)| Ok((name.clone(), self.ops.f_to_host(g)?))).collect()
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) -> Result<()> {
        for g in &mut self.grads {
            self.ops.f_fill_zero(g)?;
        }
        Ok(())
    }

    /// Mean loss of one batch without a backward (validation; no auxiliary losses).
    pub fn loss(&self, model: &Model, ids: &[u32], targets: &[i32], b: usize, t: usize) -> Result<f32> {
        let _scope = self.ops.memory_scope(Category::Activations);
        let view = BindView { ops: &self.ops, params: &self.params, copies: &self.copies, specs: &self.specs };
        let mut tape = Tape::inference(&self.ops);
        let pv = view.bind(&mut tape);
        let loss = model.loss(&mut tape, &pv, ids, targets, b, t)?;
        Ok(tape.scalar(loss))
    }

    /// Forward and backward of one micro-batch, adding seed·∂(loss + aux losses)/∂θ into `grads`;
    /// returns the mean loss, the layers' statistics and (when `profile`) the per-op times.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        model: &Model,
        ids: &[u32],
        targets: &[i32],
        (b, t): (usize, usize),
        seed: f32,
        profile: bool,
    ) -> Result<(f32, PassStats, Option<OpTimes>)> {
        // everything a pass allocates (saved activations, the backward's temporaries) is activations
        let _scope = self.ops.memory_scope(Category::Activations);
        let Trainer { ops, params, copies, specs, grads, .. } = self;
        let view = BindView { ops, params, copies, specs };
        let mut tape = if profile { Tape::with_profiling(ops) } else { Tape::new(ops) };
        let pv = view.bind(&mut tape);
        let loss = model.loss(&mut tape, &pv, ids, targets, b, t)?;
        let lv = tape.scalar(loss);
        let stats = PassStats {
            moe_loads: model.take_moe_loads(),
            indexer_losses: model.take_indexer_losses(),
            mtp_losses: model.take_mtp_losses(),
        };
        if !lv.is_finite() {
            bail!("loss became {lv}");
        }
        let aux = tape.aux_loss_total();
        if !aux.is_finite() {
            bail!("an auxiliary loss (MoE balance, DSA indexer or MTP) became {aux}");
        }
        tape.backward_into(loss, seed, grads)?;
        let times = tape.op_times().cloned();
        Ok((lv, stats, times))
    }

    /// Mean loss over the first `batches` sequential validation batches (`train::evaluate`).
    pub fn evaluate(&self, model: &Model, val: &crate::data::Loader, batches: usize) -> Result<f32> {
        let (mut total, mut n) = (0.0f64, 0usize);
        for i in 0..batches {
            let Some(batch) = val.sequential_batch(i) else {
                break;
            };
            total += self.loss(model, &batch.ids, &batch.targets, val.batch, val.seq_len)? as f64;
            n += 1;
        }
        if n == 0 {
            bail!("the validation data is shorter than one batch");
        }
        Ok((total / n as f64) as f32)
    }

    /// One optimizer update from `grads` with every learning rate multiplied by `lr_mult`
    /// (expert stacks [E, rows, cols] get Muon one expert matrix at a time).
    pub fn update(&mut self, lr_mult: f32) -> Result<()> {
        self.step += 1;
        let (c, step, scale) = (&self.optim, self.step, self.adam_lr_scale);
        let slots: Vec<UpdateSlot<'_, B>> = self
            .params
            .iter_mut()
            .zip(self.copies.iter_mut())
            .zip(&self.grads)
            .zip(self.state.iter_mut())
            .enumerate()
            .filter(|(index, _)| self.dp.as_ref().is_none_or(|dp| dp.owns(*index)) && !self.frozen[*index])
            .map(|(index, (((p, copy), g), state))| UpdateSlot { index, p, copy: copy.as_mut(), g, state })
            .collect();
        let specs = &self.specs;
        self.ops.for_each_update(slots, &|ops, s| {
            let spec = &specs[s.index];
            update_one(ops, s, spec, c, step, scale, lr_mult)
        })
    }

    /// One optimizer step as `train::train` runs it: `accum` micro-batches per rank (seed
    /// 1/(accum·world), gradients summed), the NaN checks, clipping, the update and the MoE bias update. The
    /// memory peak window restarts at the step's start.
    pub fn train_step(
        &mut self,
        model: &mut Model,
        mut next_batch: impl FnMut() -> crate::data::Batch,
        (accum, grad_clip, lr): (usize, f32, f32),
        profile: bool,
    ) -> Result<StepStats> {
        memory::reset_peak();
        self.zero_grads()?;
        let t = model.config.max_seq_len;
        let world = self.dp.as_ref().map_or(1, |dp| dp.comm.world());
        // every micro-batch of every rank counts 1/(accum·world) of the step's loss
        let n_micro = accum * world;
        let mut op_times: Option<OpTimes> = profile.then(Default::default);
        let mut micros = Vec::with_capacity(accum);
        for micro in 0..accum {
            let batch = next_batch();
            let rows = batch.ids.len() / t;
            let (lv, stats, times) = self
                .forward_backward(model, &batch.ids, &batch.targets, (rows, t), 1.0 / n_micro as f32, profile)
                .map_err(|e| e.context(format!("micro-batch {micro}. Try a lower learning rate.")))?;
            if let (Some(all), Some(these)) = (&mut op_times, &times) {
                all.merge(these);
            }
            micros.push((lv, stats));
        }
        // Data parallelism: every rank's figures in one process's order, the gradients summed
        // onto their owners, the norm from the owners' sums.
        if let Some(dp) = &self.dp {
            micros = dp.gather_micro_stats(micros)?;
        }
        let mut loss_sum = 0.0f64;
        let mut moe_loads: Vec<Option<MoeLoad>> = vec![None; model.n_layers_all()];
        let (mut kl_sum, mut kl_n) = (0.0f64, 0usize);
        let mut mtp_sums = vec![(0.0f64, 0usize); model.config.mtp_depth];
        for (lv, stats) in micros {
            loss_sum += lv as f64;
            for kl in stats.indexer_losses.into_iter().flatten() {
                (kl_sum, kl_n) = (kl_sum + kl as f64, kl_n + 1);
            }
            for ((sum, n), loss) in mtp_sums.iter_mut().zip(stats.mtp_losses) {
                if let Some(loss) = loss {
                    (*sum, *n) = (*sum + loss as f64, *n + 1);
                }
            }
            for (sum, load) in moe_loads.iter_mut().zip(stats.moe_loads) {
                if let Some(load) = load {
                    sum.get_or_insert_with(MoeLoad::default).merge(&load);
                }
            }
        }
        self.reduce_grads()?;
        for (g, _) in self.grads.iter_mut().zip(&self.frozen).filter(|(_, &f)| f) {
            self.ops.f_fill_zero(g)?;
        }
        let grad_norm = match &self.dp {
            Some(dp) if dp.comm.world() > 1 => self.clip_sharded(grad_clip)?,
            _ => self.ops.clip_grad_norm(&mut self.grads, grad_clip)?,
        };
        if !grad_norm.is_finite() {
            bail!("gradient norm became {grad_norm}");
        }
        let t0 = Instant::now();
        self.update(lr)?;
        self.broadcast_params()?;
        if !self.frozen.contains(&true) {
            model.update_moe_bias(&moe_loads);
        }
        let update_s = t0.elapsed().as_secs_f64();
        for load in moe_loads.iter_mut().flatten() {
            load.balance_loss /= n_micro as f32;
        }
        let indexer_loss = (kl_n > 0).then(|| (kl_sum / kl_n as f64) as f32);
        let mtp_losses = mtp_sums.iter().map(|&(s, n)| if n > 0 { (s / n as f64) as f32 } else { f32::NAN }).collect();
        let loss = (loss_sum / n_micro as f64) as f32;
        let comm_s = self.dp.as_ref().map(|dp| dp.comm.take_comm_seconds());
        Ok(StepStats { loss, grad_norm, update_s, op_times, moe_loads, indexer_loss, mtp_losses, comm_s })
    }
}

/// The trainer's parameters, for binding them on a tape (slot i for parameter i: the embedding
/// table as f32, the rest in GEMM precision) while its gradients are borrowed mutably.
struct BindView<'a, B: Backend> {
    ops: &'a B,
    params: &'a [B::F],
    copies: &'a [Option<B::A>],
    specs: &'a [(String, ParamKind, Vec<usize>)],
}

impl<'a, B: Backend> BindView<'a, B> {
    fn bind(&self, tape: &mut Tape<'a, B>) -> Vec<Var> {
        let it = self.specs.iter().zip(self.params).zip(self.copies).enumerate();
        it.map(|(i, (((_, kind, shape), f), copy))| match (kind, copy) {
            (ParamKind::Embedding, _) => tape.param_f(f, shape, Some(i)),
            (_, Some(a)) => tape.param_a(a, shape, Some(i)),
            (_, None) => tape.param_a(self.ops.f_as_a(f).expect("f32 weights are GEMM operands"), shape, Some(i)),
        })
        .collect()
    }
}

/// One parameter's update: AdamW (wte with embedding_lr, the rest with unembedding_lr) or Muon
/// (momentum, Newton–Schulz per matrix, decoupled weight decay).
fn update_one<B: Backend>(
    ops: &B,
    s: UpdateSlot<'_, B>,
    (name, kind, shape): &(String, ParamKind, Vec<usize>),
    c: &OptimConfig,
    step: u64,
    adam_lr_scale: f32,
    lr_mult: f32,
) -> Result<()> {
    match s.state {
        StateBuf::AdamW { m, v } => {
            let base = if *kind == ParamKind::Embedding { c.embedding_lr } else { c.unembedding_lr };
            let h = AdamWStep {
                lr: base * adam_lr_scale * lr_mult,
                beta1: c.adam_beta1,
                beta2: c.adam_beta2,
                eps: c.adam_eps,
                // a norm's gain and bias are not decayed toward 0
                weight_decay: if *kind == ParamKind::Vector { 0.0 } else { c.weight_decay },
                step,
            };
            ops.adamw(s.p, s.copy, s.g, m, v, h)
        }
        StateBuf::Muon { momentum } => {
            let u = ops.muon_momentum(momentum, s.g, c.muon_momentum)?;
            let (rows, cols, o) = match shape[..] {
                [n_mat, rows, cols] => (rows, cols, ops.newton_schulz_stack(&u, n_mat, rows, cols, c.ns_steps)?),
                [rows, cols] => (rows, cols, ops.newton_schulz(&u, rows, cols, c.ns_steps)?),
                _ => bail!("{name}: a Muon parameter must be 2-D or an expert stack"),
            };
            // Tall matrices get a larger step so the update's RMS per entry stays comparable.
            let lr = c.matrix_lr * lr_mult * (rows as f32 / cols as f32).max(1.0).sqrt();
            let decay = 1.0 - c.matrix_lr * lr_mult * c.weight_decay;
            ops.muon_apply(s.p, s.copy, &o, decay, lr)
        }
    }
}
