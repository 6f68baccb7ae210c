//! `nanoseek profile`: a few training steps of a configuration on the embedded data,
//! timed per op (forward, backward) and for the optimizer update, with achieved FLOP/s,
//! tokens/s, MFU against the GEMM rate measured in the same run, and the memory
//! breakdown at the step's peak.

use crate::data::Loader;
use crate::kernels::slices::gemm::{gemm, Layout};
use crate::memory::{self, mib, CATEGORIES};
use crate::nn::{Model, ModelConfig};
use crate::optim::{OptimConfig, Optimizer};
use crate::rng::Rng;
use crate::train::{open_data, train_step, TrainSettings};
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct OpRow {
    pub op: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Share of the whole step's time.
    pub share: f64,
    /// Achieved GFLOP/s of the op's matrix products (null for memory-bound ops).
    pub gflops: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ProfileReport {
    pub model: ModelConfig,
    pub device: String,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_checkpoint: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub model_gflops: f64,
    /// GEMM rate at 1024³ measured in this run: the device's practical peak.
    pub peak_gflops: f64,
    pub mfu: f64,
    /// Per op kind, per step; the optimizer update is the row "update (Muon+AdamW)".
    pub ops: Vec<OpRow>,
    pub peak_memory_mib: f64,
    /// Bytes per category at the peak, in MiB.
    pub memory_at_peak_mib: Vec<(String, f64)>,
}

/// The best of three f32 GEMMs at 1024³ on the CPU (this process's threads), in GFLOP/s: the
/// practical peak MFU is measured against.
pub fn measure_peak_gflops() -> f64 {
    let n = 1024;
    let (a, b, mut c) = (vec![0.5f32; n * n], vec![0.25f32; n * n], vec![0.0f32; n * n]);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            gemm(n, n, n, &a, Layout::N, &b, Layout::N, &mut c, false);
            2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Runs one warm-up step and `steps` measured steps.
pub fn run(model_cfg: &ModelConfig, batch: usize, grad_checkpoint: usize, steps: usize) -> Result<ProfileReport> {
    if steps == 0 || batch == 0 {
        bail!("profile: --steps and --device-batch-size must be positive");
    }
    let seq = model_cfg.max_seq_len;
    let predicted: usize = crate::info::predict_training_bytes(model_cfg, batch, seq, grad_checkpoint).iter().sum();
    memory::check_fits(predicted, &format!("profiling this model at batch {batch} × seq {seq}"))?;
    let settings = TrainSettings {
        device_batch_size: batch,
        total_batch_size: batch * seq,
        ..TrainSettings::for_model(model_cfg)
    };
    let (train_src, _, _) = open_data(&settings, model_cfg)?;
    let mut loader = Loader::new(train_src, batch, seq, 0, 1, Rng::derive(settings.seed, "data"))?;
    let mut model = Model::new(model_cfg, settings.seed)?;
    model.checkpoint_every = grad_checkpoint;
    let mut opt = Optimizer::new(&model, OptimConfig::default());
    train_step(&mut model, &mut opt, || loader.next_batch(), 1, 1.0, 1.0, false)?; // warm-up
    let mut times = crate::autograd::OpTimes::default();
    let (mut update_s, mut peak, mut at_peak) = (0.0, 0usize, [0usize; 5]);
    let t0 = Instant::now();
    for _ in 0..steps {
        let st = train_step(&mut model, &mut opt, || loader.next_batch(), 1, 1.0, 1.0, true)?;
        times.merge(st.op_times.as_ref().expect("profiled"));
        update_s += st.update_s;
        let r = memory::report();
        if r.peak_total > peak {
            (peak, at_peak) = (r.peak_total, memory::at_peak());
        }
    }
    let step_s = t0.elapsed().as_secs_f64() / steps as f64;
    let per_step = |x: f64| x / steps as f64;
    let mut ops: Vec<OpRow> = times
        .by_op
        .iter()
        .filter(|(_, s)| s.forward_s + s.backward_s > 0.0) // the checkpoint node itself does no work
        .map(|(name, s)| {
            let secs = s.forward_s + s.backward_s;
            let flops = s.forward_flops + s.backward_flops;
            OpRow {
                op: name.to_string(),
                forward_ms: per_step(s.forward_s) * 1e3,
                backward_ms: per_step(s.backward_s) * 1e3,
                share: per_step(secs) / step_s,
                gflops: (flops > 0.0 && secs > 0.0).then(|| flops / secs / 1e9),
            }
        })
        .collect();
    ops.push(OpRow {
        op: "update (Muon+AdamW)".into(),
        forward_ms: per_step(update_s) * 1e3,
        backward_ms: 0.0,
        share: per_step(update_s) / step_s,
        gflops: None,
    });
    ops.sort_by(|a, b| (b.forward_ms + b.backward_ms).total_cmp(&(a.forward_ms + a.backward_ms)));
    let tokens_per_s = (batch * seq) as f64 / step_s;
    let model_gflops = model_cfg.flops_per_token(seq) * tokens_per_s / 1e9;
    let peak_gflops = measure_peak_gflops();
    Ok(ProfileReport {
        model: model_cfg.clone(),
        device: "cpu".into(),
        batch,
        seq_len: seq,
        grad_checkpoint,
        steps,
        step_ms: step_s * 1e3,
        tokens_per_s,
        model_gflops,
        peak_gflops,
        mfu: model_gflops / peak_gflops,
        ops,
        peak_memory_mib: mib(peak),
        memory_at_peak_mib: CATEGORIES.iter().zip(at_peak).map(|(c, b)| (c.name().to_string(), mib(b))).collect(),
    })
}

impl ProfileReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "profile: {} steps of batch {} × seq {} (grad checkpoint {}), {:.0} ms/step, {:.0} tokens/s\n",
            self.steps, self.batch, self.seq_len, self.grad_checkpoint, self.step_ms, self.tokens_per_s
        );
        s += &format!("{:<22} {:>11} {:>12} {:>7} {:>10}\n", "op", "forward ms", "backward ms", "share", "GFLOP/s");
        for r in &self.ops {
            let g = r.gflops.map_or("-".to_string(), |g| format!("{g:.1}"));
            s += &format!(
                "{:<22} {:>11.1} {:>12.1} {:>6.1}% {:>10}\n",
                r.op,
                r.forward_ms,
                r.backward_ms,
                r.share * 100.0,
                g
            );
        }
        s += &format!(
            "model {:.1} GFLOP/s; MFU {:.1}% of the {:.1} GFLOP/s GEMM rate measured in this run\n",
            self.model_gflops,
            self.mfu * 100.0,
            self.peak_gflops
        );
        s += &format!("peak memory {:.1} MiB:", self.peak_memory_mib);
        for (c, m) in &self.memory_at_peak_mib {
            s += &format!(" {c} {m:.1}");
        }
        s + "\n"
    }

    pub fn svg(&self) -> String {
        let bars: Vec<(String, f64)> = self.ops.iter().map(|r| (r.op.clone(), r.forward_ms + r.backward_ms)).collect();
        crate::train::plot::bar_chart_svg(
            &format!("nanoseek profile: {:.0} ms/step, {:.0} tokens/s", self.step_ms, self.tokens_per_s),
            "ms per step (forward + backward)",
            &bars,
        )
    }
}
