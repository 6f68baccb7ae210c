//! Whole training steps: the model's one statement on the tape over CUDA (`CudaOps`) against
//! the same tape over the CPU (`CpuOps`), on the same seeded model and batches, with activation
//! checkpointing off and on (every block recomputed in the backward).
//!
//! Checks: the loss and **every parameter's gradient** of one forward + backward (micro-batch
//! of 2 × 64 tokens, vocabulary 512), then three optimizer steps of two micro-batches (loss and
//! gradient norm per step), then the parameters back on the host, finite.
//!
//! Tolerances: bf16 activations and GEMM operands through the model, each stage one rounding
//! (RMS ≈ u/√3 ≈ 2.3e-3), a few dozen stages on the longest path, partly averaging out: a
//! gradient's relative error norm ≈ 1e-2. Bound per parameter: ‖g − w‖/‖w‖ ≤ 5e-2 (dense model),
//! 1e-1 with every layer kind (routing and top-k decisions near a tie may flip, moving the
//! gradients of the experts and the indexer at those tokens); element-wise only a sanity bound
//! (0.5 × RMS + 0.5 relative: single elements of a whole model's gradient are not modelled).
//! The loss within 2% (stated as rtol 2e-2), the gradient norm within 10%, as before. The rerun of
//! the same micro-batch: the loss bitwise (the forward has no atomics), the gradients within
//! norm 1e-2 (the embedding and attention backward add with atomics, and an f32 difference can
//! flip a later bf16 rounding).
//!
//! `--write-reference FILE` stores the dense model's CPU reference (loss, every gradient, the
//! three steps' losses and norms) as safetensors, the model config in its metadata;
//! `--reference FILE` compares with it instead of recomputing on the CPU.

use super::compare::Tol;
use super::{rand_bf16, Ctx};
use crate::backend::{Backend, CpuOps, CudaOps};
use crate::data::Batch;
use crate::nn::{Model, ModelConfig};
use crate::optim::{OptimConfig, Optimizer};
use crate::train::Trainer;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// What the CPU twin computes for the checks (and the file holds).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReference {
    /// Loss of the first micro-batch.
    pub loss: f32,
    /// ∂loss/∂θ of the first micro-batch, every parameter, in model order.
    pub grads: Vec<(String, Vec<f32>)>,
    /// (loss, gradient norm) of three optimizer steps.
    pub steps: Vec<(f32, f32)>,
}

/// The dense model of the `train_step` group.
pub fn dense_config() -> Result<ModelConfig> {
    let mut c = ModelConfig::preset("tiny")?;
    (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) = (512, 2, 128, 4, 2, 64);
    (c.ffn_hidden, c.max_seq_len, c.logit_softcap) = (384, 64, 15.0);
    Ok(c)
}

/// Every layer kind: `WSD` (window + global, DSA sparse, dense), MoE FFNs after the first layer
/// (E = 8, K = 2, one shared expert, balance loss on).
fn all_kinds_config() -> Result<ModelConfig> {
    let mut c = dense_config()?;
    c.n_layer = 3;
    c.attn_pattern = "WSD".into();
    (c.dsa_window_size, c.n_global) = (16, 4);
    (c.index_n_heads, c.index_head_dim, c.index_topk, c.index_local_window, c.dsa_warmup_steps) = (8, 32, 16, 8, 0);
    (c.moe.n_routed_experts, c.moe.top_k, c.moe.n_shared_experts, c.moe.moe_inter_dim) = (8, 2, 1, 64);
    (c.moe.first_k_dense, c.moe.seq_aux_alpha, c.moe.bias_update_speed) = (1, 1e-3, 1e-3);
    Ok(c)
}

/// The seeded model, with non-zero c_proj / w_down so every path carries gradient from the start.
pub(super) fn model(c: &ModelConfig) -> Result<Model> {
    let mut model = Model::new(c, 5)?;
    let mut s = 1u64;
    for p in model.params.iter_mut().filter(|p| p.name.contains("c_proj") || p.name.contains("w_down")) {
        s += 1;
        p.tensor.data = rand_bf16(900 + s, p.tensor.numel(), 0.05);
    }
    Ok(model)
}

/// Micro-batch `i`: 2 × 64 tokens of vocabulary 512.
fn batch(i: u64) -> Batch {
    let ids: Vec<u32> = rand_bf16(80 + i, 2 * 64, 1.0).iter().map(|x| ((x + 1.0) * 255.0) as u32 % 512).collect();
    let targets = ids.iter().map(|&x| ((x * 7 + 3) % 512) as i32).collect();
    Batch { ids, targets }
}

/// Per-step statistics of the every-layer-kind model: (indexer KL, per layer (counts, assignments)).
type StepStats = (Option<f32>, Vec<Option<(Vec<usize>, usize)>>);

/// One trainer through the sequence the checks compare: the gradient of micro-batch 1, then
/// three steps of two micro-batches (2, 3), (4, 5), (6, 7).
pub(super) fn drive<B: Backend>(tr: &mut Trainer<B>, model: &mut Model) -> Result<(TrainReference, Vec<StepStats>)> {
    let b0 = batch(1);
    tr.zero_grads()?;
    let loss = tr.forward_backward(model, &b0.ids, &b0.targets, (2, 64), 1.0, false)?.0;
    let grads = tr.grads_to_host()?;
    let clip = OptimConfig::default().grad_clip;
    let (mut steps, mut stats) = (vec![], vec![]);
    for step in 0..3u64 {
        let mut i = 1 + 2 * step;
        let next = || {
            i += 1;
            batch(i)
        };
        let st = tr.train_step(model, next, (2, clip, 1.0), false)?;
        steps.push((st.loss, st.grad_norm));
        let loads = st.moe_loads.iter().map(|l| l.as_ref().map(|l| (l.counts.clone(), l.assignments)));
        stats.push((st.indexer_loss, loads.collect()));
    }
    Ok((TrainReference { loss, grads, steps }, stats))
}

/// A model and its trainer on `ops`, blocks checkpointed every `checkpoint_every` (0 = off).
fn trainer<B: Backend>(ops: B, c: &ModelConfig, checkpoint_every: usize) -> Result<(Trainer<B>, Model)> {
    let mut m = model(c)?;
    m.checkpoint_every = checkpoint_every;
    let mut opt = Optimizer::new(&m, OptimConfig::default());
    Ok((Trainer::new(ops, &mut m, &mut opt)?, m))
}

/// The dense model's CPU reference (what `--write-reference` stores).
pub fn reference_cpu() -> Result<TrainReference> {
    let c = dense_config()?;
    let (mut tr, mut m) = trainer(CpuOps::new(&c), &c, 0)?;
    Ok(drive(&mut tr, &mut m)?.0)
}

/// Writes `r` as safetensors (tensors `loss` [1], `steps` [3, 2], `grad.<name>`), the dense
/// model config as JSON in the metadata; atomically.
pub fn write_reference(path: &Path, r: &TrainReference) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        ("loss".into(), vec![1], r.loss.to_le_bytes().to_vec()),
        (
            "steps".into(),
            vec![r.steps.len(), 2],
            r.steps.iter().flat_map(|(l, n)| [*l, *n]).flat_map(f32::to_le_bytes).collect(),
        ),
    ];
    for (name, g) in &r.grads {
        tensors.push((format!("grad.{name}"), vec![g.len()], g.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let views = tensors
        .iter()
        .map(|(n, shape, b)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("config".to_string(), serde_json::to_string(&dense_config()?)?)]);
    crate::fsutil::write_atomic(path, &safetensors::serialize(views, Some(meta))?)
}

/// Reads a reference written by [`write_reference`] for this very model (else an error).
pub fn read_reference(path: &Path) -> Result<TrainReference> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the reference {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{} is not a safetensors reference: {e}", path.display()))?;
    let meta = SafeTensors::read_metadata(&bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default();
    if meta.get("config") != Some(&serde_json::to_string(&dense_config()?)?) {
        bail!("{} was written for another model (rewrite it with selftest --write-reference)", path.display());
    }
    let get = |name: &str| -> Result<Vec<f32>> {
        let v = st.tensor(name).map_err(|_| anyhow!("{} has no tensor '{name}'", path.display()))?;
        if v.dtype() != Dtype::F32 {
            bail!("{}: '{name}' is not F32", path.display());
        }
        Ok(v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let c = dense_config()?;
    let names: Vec<String> = Model::new(&c, 5)?.params.iter().map(|p| p.name.clone()).collect();
    let grads = names.into_iter().map(|n| Ok((n.clone(), get(&format!("grad.{n}"))?))).collect::<Result<Vec<_>>>()?;
    let (loss, steps) = (get("loss")?, get("steps")?);
    let [loss] = loss[..] else { bail!("{}: 'loss' must hold one value", path.display()) };
    Ok(TrainReference { loss, grads, steps: steps.chunks_exact(2).map(|p| (p[0], p[1])).collect() })
}

/// The GPU trainer, driven through the same sequence, plus the rerun of the first micro-batch:
/// (result, step stats, rerun loss, rerun gradients, trainer, its host model).
type GpuRun = (TrainReference, Vec<StepStats>, f32, Vec<(String, Vec<f32>)>, Trainer<CudaOps>, Model);

fn gpu_run(ctx: &Ctx, c: &ModelConfig, checkpoint_every: usize) -> Result<GpuRun> {
    let ops = CudaOps::new(ctx.open()?, c)?;
    let (mut tr, mut m) = trainer(ops, c, checkpoint_every)?;
    let b0 = batch(1);
    tr.zero_grads()?;
    let rerun_loss = tr.forward_backward(&m, &b0.ids, &b0.targets, (2, 64), 1.0, false)?.0;
    let rerun_grads = tr.grads_to_host()?;
    let (r, stats) = drive(&mut tr, &mut m)?;
    Ok((r, stats, rerun_loss, rerun_grads, tr, m))
}

/// The rows comparing a GPU run with the reference.
fn compare_runs(ctx: &mut Ctx, label: &str, gpu: &GpuRun, want: &TrainReference, norm: f32) {
    let shape = "b2 t64 V512";
    let (got, _, rerun_loss, rerun_grads, _, _) = gpu;
    ctx.close(&format!("{label} loss"), shape, &[got.loss], &[want.loss], Tol::new(0.0, 2e-2, 2e-2));
    ctx.repeat(&format!("{label} loss"), shape, &[*rerun_loss], &[got.loss], None);
    ctx.flag(&format!("{label} parameter count"), shape, got.grads.len() == want.grads.len(), "the models differ");
    for ((name, g), (wname, w)) in got.grads.iter().zip(&want.grads) {
        if name != wname {
            ctx.flag(&format!("{label} grad {name}"), shape, false, format!("reference has {wname} here"));
            continue;
        }
        let tol = Tol::new(0.5, 0.5, norm).rms_scaled(w);
        ctx.close(&format!("{label} grad {name}"), &format!("[{}]", w.len()), g, w, tol);
    }
    for ((name, g), (_, first)) in rerun_grads.iter().zip(&got.grads) {
        let tol = Tol::new(0.5, 0.5, 1e-2).rms_scaled(first);
        ctx.repeat(&format!("{label} grad {name}"), &format!("[{}]", first.len()), g, first, Some(tol));
    }
    for (step, ((lg, ng), (lc, nc))) in got.steps.iter().zip(&want.steps).enumerate() {
        ctx.close(&format!("{label} step {step} loss"), shape, &[*lg], &[*lc], Tol::new(0.0, 2e-2, 2e-2));
        ctx.close(&format!("{label} step {step} grad norm"), shape, &[*ng], &[*nc], Tol::new(0.0, 1e-1, 1e-1));
    }
}

/// The trained parameters (and MoE biases) come back to the host after 3 steps, finite.
fn back_on_host(ctx: &mut Ctx, label: &str, gpu: &GpuRun, c: &ModelConfig) -> Result<()> {
    let (tr, trained) = (&gpu.4, &gpu.5);
    let mut m2 = Model::new(c, 5)?;
    let mut o2 = Optimizer::new(&m2, OptimConfig::default());
    tr.copy_to_host(&mut m2, &mut o2)?;
    let finite = m2.params.iter().all(|p| p.tensor.data.iter().all(|v| v.is_finite()));
    let ok = o2.step == 3 && trained.moe_bias.iter().all(|b| b.iter().all(|v| v.is_finite())) && finite;
    ctx.flag(&format!("{label} parameters back on the host"), "-", ok, format!("step {}, finite {finite}", o2.step));
    Ok(())
}

pub fn dense(ctx: &mut Ctx) -> Result<()> {
    ctx.case("train_step", "-", |ctx| {
        let c = dense_config()?;
        let want = match ctx.reference.clone() {
            Some(path) => read_reference(&path)?,
            None => reference_cpu()?,
        };
        for (every, label) in [(0, "dense"), (1, "dense checkpointed")] {
            let gpu = gpu_run(ctx, &c, every)?;
            compare_runs(ctx, label, &gpu, &want, 5e-2);
            back_on_host(ctx, label, &gpu, &c)?;
        }
        Ok(())
    });
    Ok(())
}

/// Every layer kind, and with them: the mean indexer KL (rtol 1e-1, +1e-3), expert counts within
/// 10% of the layer's assignments (Σ|gpu − cpu|), MoE biases that moved and agree with the CPU's
/// on at least half of the experts (a count flipping across the mean load moves a bias by γ for
/// good, so exact agreement is not expected).
pub fn all_kinds(ctx: &mut Ctx) -> Result<()> {
    ctx.case("train_step_all_kinds", "-", |ctx| {
        let c = all_kinds_config()?;
        let (mut cpu_tr, mut cpu_model) = trainer(CpuOps::new(&c), &c, 0)?;
        let (want, want_stats) = drive(&mut cpu_tr, &mut cpu_model)?;
        for (every, label) in [(0, "all kinds"), (1, "all kinds checkpointed")] {
            let gpu = gpu_run(ctx, &c, every)?;
            all_kinds_rows(ctx, label, &gpu, (&want, &want_stats), &cpu_model)?;
        }
        Ok(())
    });
    Ok(())
}

/// The dense model with two MTP modules (λ 0.3; the modules' blocks dense).
fn mtp_config() -> Result<ModelConfig> {
    let mut c = dense_config()?;
    (c.mtp_depth, c.mtp_lambda) = (2, 0.3);
    Ok(c)
}

/// Each MTP depth's loss of micro-batch 1 (the trainer's gradients are zeroed first).
fn depth_losses<B: Backend>(tr: &mut Trainer<B>, m: &Model) -> Result<Vec<f32>> {
    let b0 = batch(1);
    tr.zero_grads()?;
    let (_, stats, _) = tr.forward_backward(m, &b0.ids, &b0.targets, (2, 64), 1.0, false)?;
    Ok(stats.mtp_losses.iter().map(|l| l.unwrap_or(f32::NAN)).collect())
}

/// Multi-token prediction: each depth's loss (rtol 2e-2, as the model's loss), every gradient
/// (the modules' projections and blocks included; norm bound 1e-1 as for every layer kind: the
/// path through the modules is two blocks and two heads longer), three steps, with and without
/// checkpointing (the modules' blocks are recomputed too).
pub fn mtp(ctx: &mut Ctx) -> Result<()> {
    ctx.case("train_step_mtp", "-", |ctx| {
        let c = mtp_config()?;
        let (mut cpu_tr, mut cpu_model) = trainer(CpuOps::new(&c), &c, 0)?;
        let want_depths = depth_losses(&mut cpu_tr, &cpu_model)?;
        let (want, _) = drive(&mut cpu_tr, &mut cpu_model)?;
        for (every, label) in [(0, "mtp"), (1, "mtp checkpointed")] {
            let (mut tr, m) = trainer(CudaOps::new(ctx.open()?, &c)?, &c, every)?;
            let got_depths = depth_losses(&mut tr, &m)?;
            ctx.close(&format!("{label} depth losses"), "D 2", &got_depths, &want_depths, Tol::new(0.0, 2e-2, 2e-2));
            drop(tr);
            let gpu = gpu_run(ctx, &c, every)?;
            compare_runs(ctx, label, &gpu, &want, 1e-1);
            back_on_host(ctx, label, &gpu, &c)?;
        }
        Ok(())
    });
    Ok(())
}

/// MLA on every attention kind (`WSD`), with a query latent (q_lora_rank 64) and MLA's widths
/// from head_dim 64: (d_qk, d_v) = (96, 64), d_rope 32, kv_lora_rank 256; DSA as the all-kinds
/// model's with MLA's default indexer, DeepSeek-V3.2's (query from the query latent, LayerNorm'd
/// key, RoPE on half the index dims); dense FFNs.
fn mla_config() -> Result<ModelConfig> {
    let mut c = all_kinds_config()?;
    c.moe.n_routed_experts = 0;
    (c.attention, c.q_lora_rank) = ("mla".into(), 64);
    c.indexer = crate::nn::indexer::indexer_for("mla");
    c.derive_mla_dims();
    c.validate()?;
    Ok(c)
}

/// MLA: the loss, every gradient (the query latent, wkv_a / wkv_b and the indexer included) and
/// three steps against the CPU tape, with and without checkpointing. Tolerances as for every
/// layer kind (norm 1e-1, the indexer KL rtol 1e-1): MLA adds two bf16 GEMMs and two RMSNorms on
/// the q and kv paths (a few more roundings of the same size) and top-k decisions near a tie may
/// flip as there.
pub fn mla(ctx: &mut Ctx) -> Result<()> {
    ctx.case("train_step_mla", "-", |ctx| {
        let c = mla_config()?;
        let (mut cpu_tr, mut cpu_model) = trainer(CpuOps::new(&c), &c, 0)?;
        let (want, want_stats) = drive(&mut cpu_tr, &mut cpu_model)?;
        for (every, label) in [(0, "mla"), (1, "mla checkpointed")] {
            let gpu = gpu_run(ctx, &c, every)?;
            compare_runs(ctx, label, &gpu, &want, 1e-1);
            for (step, ((kg, _), (kc, _))) in gpu.1.iter().zip(&want_stats).enumerate() {
                let (kg, kc) = (kg.unwrap_or(f32::NAN), kc.unwrap_or(f32::NAN));
                ctx.close(&format!("{label} step {step} indexer KL"), "-", &[kg], &[kc], Tol::new(1e-3, 1e-1, 1e-1));
            }
            back_on_host(ctx, label, &gpu, &c)?;
        }
        Ok(())
    });
    Ok(())
}

/// The rows of one all-kinds GPU run against the CPU's.
fn all_kinds_rows(
    ctx: &mut Ctx,
    label: &str,
    gpu: &GpuRun,
    (want, want_stats): (&TrainReference, &[StepStats]),
    cpu_model: &Model,
) -> Result<()> {
    let c = all_kinds_config()?;
    {
        compare_runs(ctx, label, gpu, want, 1e-1);
        for (step, ((kg, lg), (kc, lc))) in gpu.1.iter().zip(want_stats).enumerate() {
            let (kg, kc) = (kg.unwrap_or(f32::NAN), kc.unwrap_or(f32::NAN));
            ctx.close(&format!("{label} step {step} indexer KL"), "-", &[kg], &[kc], Tol::new(1e-3, 1e-1, 1e-1));
            for (l, (a, b)) in lg.iter().zip(lc).enumerate() {
                let shape = format!("layer {l}");
                let present = a.is_some() == (b.is_some() && l >= 1);
                ctx.flag(&format!("{label} step {step} MoE loads present"), &shape, present, "MoE layers differ");
                if let (Some((ca, na)), Some((cb, nb))) = (a, b) {
                    let diff: usize = ca.iter().zip(cb).map(|(&x, &y)| x.abs_diff(y)).sum();
                    let why = format!("counts gpu {ca:?} cpu {cb:?}");
                    ctx.flag(
                        &format!("{label} step {step} expert counts within 10%"),
                        &shape,
                        diff * 10 <= *nb && na == nb,
                        why,
                    );
                }
            }
        }
        for (l, (a, b)) in gpu.5.moe_bias.iter().zip(&cpu_model.moe_bias).enumerate().skip(1) {
            let same = a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() <= 1e-6).count();
            let ok = a.iter().any(|&x| x != 0.0) && 2 * same >= a.len();
            let why = format!("gpu {a:?} cpu {b:?}");
            ctx.flag(&format!("{label} MoE bias moved and agrees"), &format!("layer {l}"), ok, why);
        }
    }
    back_on_host(ctx, label, gpu, &c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference through the file equals the one computed (CPU against CPU), and a file for
    /// another model is refused.
    /// The MLA group's model is one the CUDA kernels take (checked without a GPU).
    #[test]
    fn mla_model_passes_the_cuda_shape_rules() {
        let c = mla_config().unwrap();
        assert_eq!(c.attn_heads(), (c.n_head, 96, 64));
        crate::backend::check_cuda_shapes(&c).unwrap();
        assert!(c.attn_pattern.contains('S') && c.attn_pattern.contains('W') && c.q_lora_rank > 0);
        assert!(c.is_v32_indexer(), "MLA's default indexer");
    }

    #[test]
    fn reference_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        let computed = reference_cpu().unwrap();
        assert_eq!(computed.grads.len(), Model::new(&dense_config().unwrap(), 5).unwrap().params.len());
        assert!(computed.grads.iter().all(|(_, g)| g.iter().any(|&x| x != 0.0)), "every gradient carries signal");
        assert_eq!(computed.steps.len(), 3);
        write_reference(&path, &computed).unwrap();
        let read = read_reference(&path).unwrap();
        assert_eq!(read, computed);
        // computed again: deterministic on the CPU
        assert_eq!(reference_cpu().unwrap(), read);
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(read_reference(&path).unwrap_err().to_string().contains("not a safetensors reference"));
    }
}
