//! The training loop of `train::train` on one backend: the run directory's setup, then per step
//! the trainer's step, metrics, evaluation and checkpoints, then the sample and the report.

use super::checkpoint::{self, CheckpointState};
use super::{events, metrics, run_dir, write_plot, RunData, TrainRequest, TrainSummary, Trainer};
use crate::backend::Backend;
use crate::data::synthetic::{BOS, EOT};
use crate::dist::Collectives;
use crate::fsutil::write_atomic;
use crate::generate::{generate, SampleOptions};
use crate::memory;
use crate::nn::Model;
use crate::optim::{lr_multiplier, Optimizer};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::time::Instant;

/// Runs (or resumes) the requested training on `ops`; with `comm`, as one rank of a
/// data-parallel job, where rank 0 alone writes the run directory.
pub(super) fn run<B: Backend>(
    req: &TrainRequest,
    ops: B,
    data: RunData,
    comm: Option<Box<dyn Collectives<B::F>>>,
) -> Result<TrainSummary> {
    let super::RunConfig { model: mcfg, train: ts } = &req.run;
    let RunData { mut loader, val, lang, val_bytes, accum } = data;
    let seq = mcfg.max_seq_len;
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    let root = rank == 0;
    // From here on this process (rank 0) is the run's only writer; if the setup fails (on any
    // rank: they agree before going on), a run directory it created is removed again.
    let run_lock = root.then(|| run_dir::RunLock::acquire(&req.run_dir));
    let loaded = (|| {
        if let Some(Err(e)) = &run_lock {
            bail!("{e:#}");
        }
        let (mut model, opt, start) = match req.resume_from_step {
            // Step 0: the saved run again from scratch (e.g. its first checkpoint never completed).
            Some(step) if step > 0 => {
                let dir = checkpoint::checkpoint_dir(&req.run_dir, step);
                let (model, opt, state) = checkpoint::load(&dir, mcfg, ts.optim.clone())?;
                if state.step >= ts.num_iterations {
                    bail!("checkpoint step {} is already at or past num_iterations {}", state.step, ts.num_iterations);
                }
                loader.rng = state.loader_rng;
                (model, opt, state.step)
            }
            _ => {
                if req.resume_from_step.is_none() && !checkpoint::list_steps(&req.run_dir).is_empty() {
                    bail!(
                        "run directory {} already holds checkpoints; resume with --resume-from-step or pick another --run",
                        req.run_dir.display()
                    );
                }
                let model = match &ts.init_from {
                    Some(dir) => {
                        // a conversion: new indexers and MTP modules start as a fresh model's
                        let fresh = Model::new(mcfg, ts.seed)?;
                        let (model, added) =
                            checkpoint::load_model_converting(dir, mcfg, Some(&fresh)).with_context(|| {
                                format!("--init-from {}: its weights do not fit this model", dir.display())
                            })?;
                        if !added.is_empty() && req.verbose && rank == 0 {
                            eprintln!(
                                "--init-from: {} tensor(s) start fresh (new indexers or MTP modules)",
                                added.len()
                            );
                        }
                        model
                    }
                    None => Model::new(mcfg, ts.seed)?,
                };
                let opt = Optimizer::new(&model, ts.optim.clone());
                (model, opt, 0)
            }
        };
        model.checkpoint_every = ts.grad_checkpoint;
        Ok((model, opt, start))
    })();
    let loaded = super::zero::agree_on_setup(comm.as_deref(), loaded);
    let run_lock = run_lock.transpose()?;
    let setup = loaded.and_then(|(mut model, mut opt, start)| {
        // The parameters and the optimizer state move onto the backend; the host model keeps
        // the config, the MoE biases and the statistics, and gets its tensors back for
        // checkpoints and sampling.
        let tr = Trainer::new_sharded(ops, &mut model, &mut opt, comm)?;
        if !B::HOST_MEMORY {
            let (batch, seq) = (ts.device_batch_size, mcfg.max_seq_len);
            let predicted: usize =
                crate::info::predict_cuda_training_bytes(mcfg, batch, seq, ts.grad_checkpoint).iter().sum();
            let what = format!("training this model at device_batch_size {batch} × max_seq_len {seq}");
            tr.ops.prepare_training(predicted, &what)?;
        }
        if !root {
            return Ok((model, opt, start, tr, None));
        }
        write_atomic(&req.run_dir.join("config.json"), serde_json::to_string_pretty(&req.run)?.as_bytes())?;
        crate::data::prepare::copy_tokenizer_to_run(ts.data.as_deref(), &req.run_dir)?;
        crate::report::Hardware::detect(req.device, tr.ops.device_name()).write(&req.run_dir)?;
        let events = events::EventWriter::create(&req.run_dir, &ts.optim, req.resume_from_step)?;
        let log = metrics::MetricsLog::open(&req.run_dir.join("metrics.jsonl"), Some(start))?.with_events(events);
        Ok((model, opt, start, tr, Some(log)))
    });
    let (mut model, mut opt, start, mut tr, mut log) = match &run_lock {
        Some(lock) => lock.undo_if_failed(setup)?,
        None => setup?,
    };
    let mut ranks = super::zero::RankTotals::default();

    let total = ts.num_iterations;
    let pb = if req.verbose && root { ProgressBar::new(total) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}")
            .unwrap(),
    );
    pb.set_position(start);
    let say = |s: String| {
        if req.verbose && root {
            if pb.is_hidden() {
                eprintln!("{s}");
            } else {
                pb.println(s);
            }
        }
    };
    say(format!(
        "training {} params ({} layers, d {}) on {}: {} steps × {} tokens ({} micro-batch(es) of {}×{}), run dir {}",
        model.num_params(),
        mcfg.n_layer,
        mcfg.n_embd,
        req.device,
        total,
        ts.total_batch_size,
        accum,
        ts.device_batch_size,
        seq,
        req.run_dir.display()
    ));
    let log_every = (total / 10).max(1);
    let mut losses = Vec::new();
    let mut val_loss = None;
    // The last good checkpoint of this trajectory: the one resumed from (newer ones on disk may
    // be from a run that went further, and a fresh start has none).
    let mut last_ckpt = req.resume_from_step.filter(|&s| s > 0).map(|s| checkpoint::checkpoint_dir(&req.run_dir, s));
    let t0 = Instant::now();
    let mut tokens_done = 0usize;
    // The indexer warm-up freezes everything but the lightning indexers: without any (no `S`
    // layer) it would train nothing, so the default skips it and an explicit request is refused.
    let has_indexer = tr.specs.iter().any(|(name, ..)| name.contains(".attn.indexer."));
    if !has_indexer && mcfg.dsa_warmup_steps > 0 && ts.freeze_main_during_warmup == Some(true) {
        bail!(
            "--freeze-main-during-warmup: the model has no DSA (`S`) layer, so its {} warm-up steps would \
             train no parameter (use an S layer in --attn-pattern, or --freeze-main-during-warmup false)",
            mcfg.dsa_warmup_steps
        );
    }
    for step in start..total {
        let ts_step = Instant::now();
        let lr = lr_multiplier(step, total, ts.optim.warmup_ratio, ts.optim.warmdown_ratio, ts.optim.final_lr_frac);
        model.dsa_dense_warmup = step < mcfg.dsa_warmup_steps;
        model.mtp_lambda_now = mcfg.mtp_lambda_at(step, total);
        // V3.2's indexer warm-up: only the lightning indexers train
        let freeze = model.dsa_dense_warmup && ts.freezes_main_during_warmup() && has_indexer;
        for (f, (name, ..)) in tr.frozen.iter_mut().zip(&tr.specs) {
            *f = freeze && !name.contains(".attn.indexer.");
        }
        tr.ops.reset_peak(); // the device's peak window is the step, as on the host
        let stats =
            tr.train_step(&mut model, || loader.next_batch(), (accum, ts.optim.grad_clip, lr), false).map_err(|e| {
                let last = last_ckpt.as_ref().map_or("none".into(), |p| p.display().to_string());
                e.context(format!("step {} failed; nothing was saved for it (last good checkpoint: {last})", step + 1))
            })?;
        let (loss, grad_norm) = (stats.loss, stats.grad_norm);
        let done = step + 1;
        losses.push((done, loss));
        tokens_done += ts.total_batch_size;
        let dt = ts_step.elapsed().as_secs_f64();
        let tok_s = ts.total_batch_size as f64 / dt;
        ranks.add_step(stats.comm_s, dt);
        // On CUDA the peak is the device allocator's (live blocks, by category at the peak).
        let (peak_mib, device_at_peak) = match tr.ops.device_peak() {
            Some((peak, at_peak)) => (memory::mib(peak), Some(at_peak)),
            None => (memory::mib(memory::report().peak_total), None),
        };
        let mut record = json!({"step": done, "loss": loss, "lr_mult": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "step_time_s": dt, "elapsed_s": t0.elapsed().as_secs_f64(), "peak_memory_mib": peak_mib});
        if let Some(at_peak) = device_at_peak {
            let by_cat: serde_json::Map<String, serde_json::Value> = memory::CATEGORIES
                .iter()
                .map(|c| (c.name().to_string(), json!(memory::mib(at_peak[*c as usize]))))
                .collect();
            record["peak_memory_by_category"] = serde_json::Value::Object(by_cat);
        }
        if mcfg.moe.enabled() {
            record["moe"] = metrics::moe_record(&stats.moe_loads, &model.moe_bias);
        }
        if let Some(kl) = stats.indexer_loss {
            record["indexer_loss"] = json!(kl);
            record["dsa_dense_warmup"] = json!(model.dsa_dense_warmup);
            if tr.frozen.contains(&true) {
                record["main_frozen"] = json!(true);
            }
        }
        if !stats.mtp_losses.is_empty() {
            // each depth's cross-entropy (unweighted), beside the model's own loss
            for (k, l) in stats.mtp_losses.iter().enumerate() {
                record[format!("mtp_loss_{}", k + 1)] = json!(l);
            }
            record["mtp_lambda"] = json!(model.mtp_lambda_now);
        }
        if let (Some(c), true) = (stats.comm_s, world > 1) {
            record["comm_s"] = json!(c); // rank 0's seconds in collectives during the step
        }
        if let Some(log) = &mut log {
            log.log(record)?;
        }
        pb.set_position(done);
        pb.set_message(format!("loss {loss:.4} | {tok_s:.0} tok/s | peak {peak_mib:.0} MiB"));
        let is_last = done == total;
        if root && ((ts.eval_every > 0 && done % ts.eval_every == 0) || is_last) {
            // (rank 0 alone evaluates the whole validation set, exactly as one process does)
            let v = tr.evaluate(&model, &val, ts.eval_batches)?;
            val_loss = Some(v);
            let mut record = json!({"step": done, "val_loss": v});
            if let Some((tokens, bytes)) = val_bytes {
                // evaluate() averages equal-sized batches, so v × tokens is the total nats
                record["val_bpb"] = json!(crate::eval::bits_per_byte(v as f64 * tokens as f64, bytes));
            }
            if let Some(log) = &mut log {
                log.log(record)?;
            }
        }
        if done % log_every == 0 || is_last {
            let vl = val_loss.map_or(String::new(), |v| format!(" | val {v:.4}"));
            let by_cat = device_at_peak.map_or(String::new(), |a| {
                let parts: Vec<String> = memory::CATEGORIES
                    .iter()
                    .map(|c| format!("{} {:.0}", c.name(), memory::mib(a[*c as usize])))
                    .collect();
                format!(" on the device ({})", parts.join(", "))
            });
            let mtp: String =
                stats.mtp_losses.iter().enumerate().map(|(k, l)| format!(" | mtp{} {l:.4}", k + 1)).collect();
            say(format!("step {done:>5}/{total} | loss {loss:.4}{mtp}{vl} | lr ×{lr:.3} | grad norm {grad_norm:.3} | {tok_s:.0} tok/s | peak mem {peak_mib:.0} MiB{by_cat}"));
        }
        if (ts.save_every > 0 && done % ts.save_every == 0) || is_last {
            tr.copy_to_host(&mut model, &mut opt)?; // (every rank: the state is gathered to rank 0)
            if !root {
                last_ckpt = Some(checkpoint::checkpoint_dir(&req.run_dir, done));
                if !is_last {
                    tr.release_host(&mut model, &mut opt);
                }
                continue;
            }
            let state = CheckpointState {
                format_version: checkpoint::FORMAT_VERSION,
                step: done,
                loader_rng: loader.rng.clone(),
            };
            let saved = checkpoint::save(&req.run_dir, &model, &opt, &state, ts.keep_checkpoints).map_err(|e| {
                let last = last_ckpt.as_ref().map_or("none".into(), |p| p.display().to_string());
                e.context(format!(
                    "step {done}: no checkpoint written (last good checkpoint: {last}); if the values diverged, try a lower learning rate"
                ))
            })?;
            last_ckpt = Some(saved);
            write_plot(&req.run_dir)?;
            if !is_last {
                tr.release_host(&mut model, &mut opt); // the backend holds the live values
            }
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let tokens_per_s = tokens_done as f64 / elapsed.max(1e-9);
    if let Some(dp) = &tr.dp {
        // MFU against each rank's own GEMM rate, measured now with the threads it trained with
        // (on the CPU; a GPU's peak is not measured here)
        let peak = B::HOST_MEMORY.then(|| crate::profile::measure_peak_gflops() * 1e9);
        ranks.write_job_summary(dp.comm.as_ref(), &req.run_dir, mcfg, (tokens_done, elapsed), peak)?;
    }
    let sample = match (req.sample_tokens, &lang) {
        _ if !root => None,
        (0, _) => None,
        (n, lang) => {
            let opts = SampleOptions {
                max_new_tokens: n,
                temperature: 0.8,
                top_k: 40,
                top_p: 1.0,
                stop_token: Some(EOT),
                seed: ts.seed,
            };
            let out = generate(&model, &[BOS], &opts)?;
            Some(match (lang, crate::data::codec::codec_for_run(&req.run_dir)) {
                (Some(l), _) => l.decode(&out),
                (None, Ok(codec)) => codec.decode(&out),
                (None, Err(_)) => format!("{out:?}"),
            })
        }
    };
    if root {
        crate::report::finish_run(&req.run_dir, sample.as_deref())?;
    }
    Ok(TrainSummary {
        rank,
        losses,
        val_loss,
        tokens_per_s,
        checkpoint: last_ckpt.expect("the last step always saves"),
        sample,
    })
}
