//! ZeRO-1 data parallelism for [`Trainer`]: every rank computes its share of the global batch;
//! each parameter's gradient is summed onto the one rank that owns the parameter; only the owner
//! keeps that parameter's optimizer state and updates it; the updated parameter is broadcast
//! from its owner. Ranks own WHOLE parameters, so Muon orthogonalizes whole matrices and whole
//! expert stacks exactly as one process does, and every sum happens in the order one process
//! adds its micro-batches in (see `dist::Collectives::reduce_to`).
//!
//! Ownership is a deterministic greedy balance of the update's cost: parameters by falling cost
//! (Newton–Schulz ≈ rows·cols·min(rows, cols) per matrix for Muon, ~10 flops per entry for
//! AdamW), each to the rank with the least cost so far.

use super::{PassStats, Trainer};
use crate::backend::{Backend, StateBuf};
use crate::dist::Collectives;
use crate::nn::model::MoeLoad;
use crate::nn::ParamKind;
use crate::optim::ParamState;
use anyhow::{bail, Result};

/// A rank's place in a ZeRO-1 job: the collectives and the owner of every parameter.
pub struct DataParallel<F> {
    pub comm: Box<dyn Collectives<F>>,
    /// The rank that owns (keeps the state of and updates) each parameter, in `specs` order.
    pub owner: Vec<usize>,
}

/// Relative cost of one parameter's optimizer update.
pub fn update_cost(kind: ParamKind, shape: &[usize]) -> u128 {
    let numel: usize = shape.iter().product();
    match (kind.uses_muon(), shape) {
        (true, [n_mat, rows, cols]) => (*n_mat * rows * cols * (*rows).min(*cols)) as u128,
        (true, [rows, cols]) => (rows * cols * (*rows).min(*cols)) as u128,
        _ => 10 * numel as u128,
    }
}

/// The owner of each parameter at `world` ranks (greedy balance of [`update_cost`]).
pub fn assign_owners(specs: &[(String, ParamKind, Vec<usize>)], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..specs.len()).collect();
    let cost = |i: usize| update_cost(specs[i].1, &specs[i].2);
    order.sort_by_key(|&i| std::cmp::Reverse(cost(i))); // stable: ties keep parameter order
    let mut load = vec![0u128; world.max(1)];
    let mut owner = vec![0usize; specs.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap();
        owner[i] = r;
        load[r] += cost(i);
    }
    owner
}

/// Optimizer-state floats each rank keeps at `world` ranks (Muon 1 per entry, AdamW 2).
pub fn state_floats_per_rank(specs: &[(String, ParamKind, Vec<usize>)], world: usize) -> Vec<usize> {
    let mut floats = vec![0usize; world.max(1)];
    for ((_, kind, shape), r) in specs.iter().zip(assign_owners(specs, world)) {
        floats[r] += shape.iter().product::<usize>() * if kind.uses_muon() { 1 } else { 2 };
    }
    floats
}

/// `nanoseek info --world-size N`: the optimizer state each rank keeps.
pub fn optimizer_report(c: &crate::nn::ModelConfig, world: usize) -> String {
    let specs = crate::nn::Model::expected_shapes(c);
    let per_rank = state_floats_per_rank(&specs, world);
    let bytes: Vec<String> = per_rank.iter().map(|f| (f * 4).to_string()).collect();
    let largest = per_rank.iter().max().copied().unwrap_or(0) * 4;
    let total: usize = per_rank.iter().sum::<usize>() * 4;
    format!(
        "data parallelism at world size {world} (ZeRO-1: each rank keeps the optimizer state of the parameters it owns)\n  \
         optimizer state per rank: {} bytes\n  largest rank: {:.2} MiB of {:.2} MiB in one process\n",
        bytes.join(" "),
        crate::memory::mib(largest),
        crate::memory::mib(total)
    )
}

impl<F> DataParallel<F> {
    pub fn new(comm: Box<dyn Collectives<F>>, specs: &[(String, ParamKind, Vec<usize>)]) -> DataParallel<F> {
        let owner = assign_owners(specs, comm.world());
        DataParallel { comm, owner }
    }

    pub fn owns(&self, i: usize) -> bool {
        self.owner[i] == self.comm.rank()
    }

    /// Every rank's micro-batch figures in the order one process would have them: rank r's
    /// micro-batch m is the single process's micro-batch m·world + r.
    pub fn gather_micro_stats(&self, local: Vec<(f32, PassStats)>) -> Result<Vec<(f32, PassStats)>> {
        let world = self.comm.world();
        let mut flat = Vec::new();
        for (loss, s) in &local {
            encode_micro(*loss, s, &mut flat);
        }
        let all = self.comm.all_gather_var(&flat)?;
        let mut per_rank: Vec<Vec<(f32, PassStats)>> = Vec::with_capacity(world);
        for (r, values) in all.iter().enumerate() {
            let mut it = values.iter().copied();
            let mut micros = Vec::new();
            while let Some(m) = decode_micro(&mut it)? {
                micros.push(m);
            }
            if micros.len() != local.len() {
                bail!("rank {r} reports {} micro-batches, this rank {}", micros.len(), local.len());
            }
            per_rank.push(micros);
        }
        let mut iters: Vec<_> = per_rank.into_iter().map(|v| v.into_iter()).collect();
        let mut out = Vec::with_capacity(world * local.len());
        for _ in 0..local.len() {
            for it in iters.iter_mut() {
                out.push(it.next().expect("counted above"));
            }
        }
        Ok(out)
    }
}

/// One micro-batch's figures as f64s: loss, then per layer (MoE load: present, E, counts,
/// dropped, assignments, balance loss), per layer (indexer KL: present, value) and per MTP depth
/// (its loss: present, value). Every value is exact.
fn encode_micro(loss: f32, s: &PassStats, out: &mut Vec<f64>) {
    out.push(loss as f64);
    out.push(s.moe_loads.len() as f64);
    for load in &s.moe_loads {
        match load {
            None => out.push(0.0),
            Some(l) => {
                out.extend([1.0, l.counts.len() as f64]);
                out.extend(l.counts.iter().map(|&c| c as f64));
                out.extend([l.dropped as f64, l.assignments as f64, l.balance_loss as f64]);
            }
        }
    }
    for losses in [&s.indexer_losses, &s.mtp_losses] {
        out.push(losses.len() as f64);
        for v in losses {
            out.extend(v.map_or([0.0, 0.0], |v| [1.0, v as f64]));
        }
    }
}

fn decode_micro(it: &mut impl Iterator<Item = f64>) -> Result<Option<(f32, PassStats)>> {
    let Some(loss) = it.next() else {
        return Ok(None);
    };
    let mut next = || it.next().ok_or_else(|| anyhow::anyhow!("a rank's step figures are truncated"));
    let mut s = PassStats::default();
    for _ in 0..next()? as usize {
        s.moe_loads.push(if next()? == 0.0 {
            None
        } else {
            let e = next()? as usize;
            let counts = (0..e).map(|_| next().map(|v| v as usize)).collect::<Result<Vec<_>>>()?;
            let (dropped, assignments, balance_loss) = (next()? as usize, next()? as usize, next()? as f32);
            Some(MoeLoad { counts, dropped, assignments, balance_loss })
        });
    }
    for losses in [&mut s.indexer_losses, &mut s.mtp_losses] {
        for _ in 0..next()? as usize {
            let (present, v) = (next()?, next()?);
            losses.push((present != 0.0).then_some(v as f32));
        }
    }
    Ok(Some((loss as f32, s)))
}

impl<B: Backend> Trainer<B> {
    /// Drops the optimizer state of the parameters other ranks own (empty buffers stay in their
    /// slots); returns the f32 values of state this rank keeps.
    pub(super) fn shard_state(&mut self) -> Result<usize> {
        let Some(dp) = &self.dp else {
            return Ok(0);
        };
        let mut kept = 0;
        for (i, st) in self.state.iter_mut().enumerate() {
            if dp.owns(i) {
                kept += match st {
                    StateBuf::AdamW { m, v } => self.ops.f_len(m) + self.ops.f_len(v),
                    StateBuf::Muon { momentum } => self.ops.f_len(momentum),
                };
                continue;
            }
            *st = match st {
                StateBuf::AdamW { .. } => StateBuf::AdamW { m: self.ops.f_zeros(0)?, v: self.ops.f_zeros(0)? },
                StateBuf::Muon { .. } => StateBuf::Muon { momentum: self.ops.f_zeros(0)? },
            };
        }
        Ok(kept)
    }

    /// Sums every parameter's gradient over the ranks onto its owner.
    pub(super) fn reduce_grads(&mut self) -> Result<()> {
        let Some(dp) = &self.dp else {
            return Ok(());
        };
        for (g, &owner) in self.grads.iter_mut().zip(&dp.owner) {
            dp.comm.reduce_to(g, owner)?;
        }
        Ok(())
    }

    /// The global gradient norm and clipping of the owned gradients. The norm is one process's:
    /// each owner's f64 Σg² per parameter, gathered and added in parameter order.
    pub(super) fn clip_sharded(&mut self, max_norm: f32) -> Result<f32> {
        let dp = self.dp.as_ref().expect("sharded");
        let n = self.grads.len();
        let mut local = vec![0.0f64; n];
        for (i, g) in self.grads.iter().enumerate().filter(|(i, _)| dp.owns(*i)) {
            local[i] = self.ops.f_sum_sq(g)?;
        }
        let all = dp.comm.all_gather_f64(&local)?;
        let per_param: Vec<f64> = (0..n).map(|i| all[dp.owner[i] * n + i]).collect();
        let norm = per_param.iter().sum::<f64>().sqrt() as f32;
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            for (i, g) in self.grads.iter_mut().enumerate() {
                if dp.owns(i) {
                    self.ops.f_scale(g, s)?;
                }
            }
        }
        Ok(norm)
    }

    /// Every parameter from its owner to all ranks (and the GEMM-precision copies refreshed).
    pub(super) fn broadcast_params(&mut self) -> Result<()> {
        let Some(dp) = &self.dp else {
            return Ok(());
        };
        for (i, (p, copy)) in self.params.iter_mut().zip(self.copies.iter_mut()).enumerate() {
            dp.comm.broadcast(p, dp.owner[i])?;
            if let (Some(a), false) = (copy, dp.owns(i)) {
                self.ops.cast(p, a)?;
            }
        }
        Ok(())
    }

    /// The whole optimizer state on rank 0 (None on the other ranks), each parameter's sent by
    /// its owner: every rank must call this together.
    pub(super) fn gather_state_to_root(&self) -> Result<Option<Vec<ParamState>>> {
        let dp = self.dp.as_ref().expect("sharded");
        let (ops, root) = (&self.ops, dp.comm.rank() == 0);
        let mut out = Vec::new();
        for (i, (st, (_, _, shape))) in self.state.iter().zip(&self.specs).enumerate() {
            let owner = dp.owner[i];
            let numel = shape.iter().product::<usize>();
            let me = dp.comm.rank();
            let move_one = |buf: &B::F| -> Result<Vec<f32>> {
                if owner == 0 {
                    return if root { ops.f_to_host(buf) } else { Ok(Vec::new()) };
                }
                if me == owner {
                    let mut tmp = ops.f_from_vec(ops.f_to_host(buf)?)?;
                    dp.comm.send_to(&mut tmp, owner, 0)?;
                } else if root {
                    let mut tmp = ops.f_zeros(numel)?;
                    dp.comm.send_to(&mut tmp, owner, 0)?;
                    return ops.f_into_host(tmp);
                }
                Ok(Vec::new())
            };
            let host = match st {
                StateBuf::AdamW { m, v } => ParamState::AdamW { m: move_one(m)?, v: move_one(v)? },
                StateBuf::Muon { momentum } => ParamState::Muon { momentum: move_one(momentum)? },
            };
            out.push(host);
        }
        Ok(root.then_some(out))
    }
}

/// The setup's outcome, agreed by all ranks: an error on any rank is an error on every rank (so
/// none waits for a step the others never start).
pub fn agree_on_setup<F, T>(comm: Option<&dyn Collectives<F>>, result: Result<T>) -> Result<T> {
    let Some(comm) = comm else {
        return result;
    };
    match (comm.all_ok(result.is_ok())?, result) {
        (_, Err(e)) => Err(e),
        (false, Ok(_)) => {
            bail!("another rank failed to set up the run (its error is above); rank {} stops", comm.rank())
        }
        (true, ok) => ok,
    }
}

/// One rank's running totals for the job's throughput summary.
#[derive(Default)]
pub struct RankTotals {
    steps: usize,
    step_s: f64,
    comm_s: f64,
}

impl RankTotals {
    pub fn add_step(&mut self, comm_s: Option<f64>, step_s: f64) {
        self.steps += 1;
        self.step_s += step_s;
        self.comm_s += comm_s.unwrap_or(0.0);
    }

    /// Gathers every rank's figures and, on rank 0, writes `<run>/dist.json`: per rank its
    /// tokens/s, model FLOP/s, MFU against `peak_flops` (the rank's measured GEMM rate, when
    /// known), seconds in collectives and optimizer-state bytes; and the job's (MFU against the
    /// sum of the ranks' rates). Every rank calls it together.
    pub fn write_job_summary<F>(
        &self,
        comm: &dyn Collectives<F>,
        run_dir: &std::path::Path,
        cfg: &crate::nn::ModelConfig,
        (tokens_done, elapsed_s): (usize, f64),
        peak_flops: Option<f64>,
    ) -> Result<()> {
        let world = comm.world();
        let rank_tokens = tokens_done as f64 / world as f64;
        let opt_bytes = crate::memory::report().current[crate::memory::Category::OptimizerState as usize];
        let peak = peak_flops.unwrap_or(f64::NAN);
        let local = [rank_tokens / self.step_s.max(1e-9), self.comm_s, self.step_s, opt_bytes as f64, peak];
        let all = comm.all_gather_f64(&local)?;
        if comm.rank() != 0 {
            return Ok(());
        }
        let flops_per_token = cfg.flops_per_token(cfg.max_seq_len);
        let job_tok_s = tokens_done as f64 / elapsed_s.max(1e-9);
        let peak_sum: f64 = all.chunks(local.len()).map(|v| v[4]).sum();
        let job_mfu = peak_sum.is_finite().then(|| job_tok_s * flops_per_token / peak_sum);
        let ranks: Vec<serde_json::Value> = all
            .chunks(local.len())
            .enumerate()
            .map(|(r, v)| {
                let mfu = (v[4].is_finite()).then(|| v[0] * flops_per_token / v[4]);
                serde_json::json!({"rank": r, "tokens_per_s": v[0], "model_flops_per_s": v[0] * flops_per_token,
                    "peak_flops_per_s": v[4].is_finite().then_some(v[4]), "mfu": mfu,
                    "comm_s": v[1], "step_s": v[2], "comm_fraction": v[1] / v[2].max(1e-9),
                    "optimizer_state_bytes": v[3] as u64})
            })
            .collect();
        let summary = serde_json::json!({
            "world_size": world,
            "collectives": comm.name(),
            "steps": self.steps,
            "tokens_per_s": job_tok_s,
            "model_flops_per_s": job_tok_s * flops_per_token,
            "mfu": job_mfu,
            "mfu_note": "MFU = model FLOP/s / the GEMM rate measured at the end of the run (f32 1024³, each rank with its own threads; the job's against the ranks' sum); null where not measured (a GPU's peak)",
            "ranks": ranks,
        });
        crate::fsutil::write_atomic(&run_dir.join("dist.json"), serde_json::to_string_pretty(&summary)?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Model, ModelConfig};

    fn config() -> ModelConfig {
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.attn_pattern = "WSD".into();
        (c.moe.n_routed_experts, c.moe.top_k, c.moe.first_k_dense) = (4, 2, 1);
        c
    }

    #[test]
    fn owners_are_deterministic_balanced_and_cover_the_state() {
        let c = config();
        let specs = Model::expected_shapes(&c);
        let predicted = crate::info::predict_training_bytes(&c, 1, c.max_seq_len, 0)[2];
        for world in [1, 2, 3, 4, 8] {
            let owners = assign_owners(&specs, world);
            assert_eq!(owners, assign_owners(&specs, world), "deterministic");
            assert!(owners.iter().all(|&r| r < world));
            // the state the ranks keep adds up to one process's, as info predicts it
            assert_eq!(state_floats_per_rank(&specs, world).iter().sum::<usize>() * 4, predicted);
            // greedy balance: no rank exceeds the mean by more than the costliest parameter
            let mut load = vec![0u128; world];
            for ((_, kind, shape), &r) in specs.iter().zip(&owners) {
                load[r] += update_cost(*kind, shape);
            }
            let max_one = specs.iter().map(|(_, k, s)| update_cost(*k, s)).max().unwrap();
            let mean = load.iter().sum::<u128>() / world as u128;
            assert!(load.iter().all(|&l| l <= mean + max_one), "world {world}: {load:?}");
        }
    }

    #[test]
    fn micro_figures_round_trip_exactly() {
        let s = PassStats {
            moe_loads: vec![
                None,
                Some(MoeLoad { counts: vec![3, 0, 7], dropped: 1, assignments: 10, balance_loss: 0.1234567 }),
            ],
            indexer_losses: vec![Some(1.0e-7), None],
            mtp_losses: vec![None, Some(2.75)],
        };
        let mut flat = Vec::new();
        encode_micro(2.5, &s, &mut flat);
        encode_micro(3.5, &PassStats::default(), &mut flat);
        let mut it = flat.into_iter();
        let (l, back) = decode_micro(&mut it).unwrap().unwrap();
        assert_eq!(l, 2.5);
        assert_eq!(back.indexer_losses, s.indexer_losses);
        assert_eq!(back.mtp_losses, s.mtp_losses);
        let (a, b) = (back.moe_loads[1].as_ref().unwrap(), s.moe_loads[1].as_ref().unwrap());
        assert_eq!((&a.counts, a.dropped, a.assignments), (&b.counts, b.dropped, b.assignments));
        assert_eq!(a.balance_loss.to_bits(), b.balance_loss.to_bits());
        assert!(back.moe_loads[0].is_none());
        assert_eq!(decode_micro(&mut it).unwrap().unwrap().0, 3.5);
        assert!(decode_micro(&mut it).unwrap().is_none());
    }
}
