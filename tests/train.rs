//! Training end to end on the CPU: learning, bitwise resume, metrics and files.

use nanoseek::device::Device;
use nanoseek::nn::ModelConfig;
use nanoseek::train::{checkpoint, metrics, train, RunConfig, TrainRequest, TrainSettings};
use std::path::Path;

fn micro_config() -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    m.n_layer = 2;
    m.n_embd = 64;
    m.n_head = 2;
    m.n_kv_head = 1;
    m.head_dim = 32;
    m.ffn_hidden = 192;
    m.max_seq_len = 32;
    m
}

fn request(model: ModelConfig, steps: u64, dir: &Path) -> TrainRequest {
    let mut t = TrainSettings::for_model(&model);
    t.device_batch_size = 2;
    t.total_batch_size = 2 * 2 * model.max_seq_len; // two micro-batches: exercises accumulation
    t.num_iterations = steps;
    t.save_every = 3;
    t.eval_every = 3;
    t.eval_batches = 2;
    t.keep_checkpoints = 0;
    TrainRequest {
        run: RunConfig { model, train: t },
        run_dir: dir.to_path_buf(),
        resume_from_step: None,
        device: Device::Cpu,
        verbose: false,
        sample_tokens: 0,
    }
}

#[test]
fn tiny_loss_falls_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = ModelConfig::preset("tiny").unwrap();
    model.max_seq_len = 128;
    let mut req = request(model, 40, dir.path());
    req.run.train.device_batch_size = 4;
    req.run.train.total_batch_size = 4 * 128;
    req.run.train.save_every = 0;
    req.run.train.eval_every = 0;
    let s = train(req).unwrap();
    let first = s.losses[0].1;
    let last: f32 = s.losses[35..].iter().map(|l| l.1).sum::<f32>() / 5.0;
    println!("tiny: loss {first:.3} → {last:.3} (val {:?}) in 40 steps", s.val_loss);
    assert!((first - 4096f32.ln()).abs() < 0.1, "first loss {first} should be ≈ ln(4096)");
    assert!(last < first - 2.0, "loss should fall by more than 2 nats: {first} → {last}");
    assert!(s.val_loss.unwrap() < first - 2.0);
}

#[test]
fn resume_is_bitwise_identical_to_an_uninterrupted_run() {
    let a = tempfile::tempdir().unwrap();
    let full = train(request(micro_config(), 6, a.path())).unwrap();
    assert_eq!(checkpoint::list_steps(a.path()), vec![3, 6]);

    // A second run directory holding only what existed at step 3: config and the step-3 checkpoint.
    let b = tempfile::tempdir().unwrap();
    let src = checkpoint::checkpoint_dir(a.path(), 3);
    let dst = checkpoint::checkpoint_dir(b.path(), 3);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optim.safetensors", "state.json", "checksums.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let kept: String = std::fs::read_to_string(a.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"step\":1,") || l.contains("\"step\":2,") || l.contains("\"step\":3,"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(b.path().join("metrics.jsonl"), kept).unwrap();
    let mut req = request(micro_config(), 6, b.path());
    req.resume_from_step = Some(3);
    let resumed = train(req).unwrap();

    let tail: Vec<(u64, u32)> = full.losses[3..].iter().map(|&(s, l)| (s, l.to_bits())).collect();
    let again: Vec<(u64, u32)> = resumed.losses.iter().map(|&(s, l)| (s, l.to_bits())).collect();
    assert_eq!(tail, again, "losses after resuming must be bitwise equal");
    let wa = std::fs::read(checkpoint::checkpoint_dir(a.path(), 6).join("model.safetensors")).unwrap();
    let wb = std::fs::read(checkpoint::checkpoint_dir(b.path(), 6).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights must be bitwise equal");
    let oa = std::fs::read(checkpoint::checkpoint_dir(a.path(), 6).join("optim.safetensors")).unwrap();
    let ob = std::fs::read(checkpoint::checkpoint_dir(b.path(), 6).join("optim.safetensors")).unwrap();
    assert!(oa == ob, "final optimizer state must be bitwise equal");

    // metrics: each step exactly once
    let steps: Vec<u64> = metrics::read(&b.path().join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn init_from_starts_a_new_run_from_a_checkpoints_weights() {
    let a = tempfile::tempdir().unwrap();
    train(request(micro_config(), 3, a.path())).unwrap();
    let ckpt = checkpoint::checkpoint_dir(a.path(), 3);
    let trained = checkpoint::load_model(&ckpt, &micro_config()).unwrap();

    // A new run at another context length, initialized from it, with every learning rate 0:
    // its weights stay exactly the loaded ones.
    let b = tempfile::tempdir().unwrap();
    let mut longer = micro_config();
    longer.max_seq_len = 64;
    let mut req = request(longer.clone(), 2, b.path());
    req.run.train.init_from = Some(ckpt.clone());
    let o = &mut req.run.train.optim;
    (o.embedding_lr, o.unembedding_lr, o.matrix_lr) = (0.0, 0.0, 0.0);
    let s = train(req).unwrap();
    assert_eq!(s.losses.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2], "a fresh schedule from step 1");
    let after = checkpoint::load_model(&checkpoint::checkpoint_dir(b.path(), 2), &longer).unwrap();
    for (p, q) in trained.params.iter().zip(&after.params) {
        assert!(p.tensor.data == q.tensor.data, "{} differs from the checkpoint it was initialized from", p.name);
    }
    // and the loss is the trained model's, not a fresh one's (≈ ln(vocab))
    assert!(s.losses[0].1 < (longer.vocab_size as f32).ln() - 0.5, "{:?}", s.losses);
    let saved = std::fs::read_to_string(b.path().join("config.json")).unwrap();
    assert!(saved.contains("init_from"), "the run's config records where it started");

    // Weights of another shape are refused before anything is written.
    let c = tempfile::tempdir().unwrap();
    let mut wider = micro_config();
    wider.n_embd = 96;
    wider.ffn_hidden = 256;
    let mut req = request(wider, 2, &c.path().join("run"));
    req.run.train.init_from = Some(ckpt);
    let e = format!("{:#}", train(req).err().expect("a shape mismatch must fail"));
    assert!(e.contains("--init-from") && e.contains("wte.weight"), "{e}");
    assert!(!c.path().join("run").exists(), "no run directory is left behind");
}

/// Activation checkpointing is a tape node, so it runs on CUDA as on the CPU: it is no longer
/// refused. Without a device the run fails on the device, leaving nothing behind; with one it
/// trains.
#[test]
fn grad_checkpoint_on_cuda_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = micro_config();
    cfg.head_dim = 64; // the CUDA shape rules pass
    cfg.n_head = 1;
    let mut req = request(cfg, 2, &dir.path().join("run"));
    req.device = Device::Cuda(0);
    req.run.train.grad_checkpoint = 1;
    match train(req) {
        Ok(_) => assert!(checkpoint::list_steps(&dir.path().join("run")) == vec![2]),
        Err(e) => {
            let e = format!("{e:#}");
            println!("SKIPPED: no CUDA device ({e})");
            assert!(!e.contains("--grad-checkpoint"), "checkpointing must not be the reason: {e}");
            assert!(!dir.path().join("run").exists());
        }
    }
}

#[test]
fn run_directory_holds_checkpoint_metrics_plot_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(micro_config(), 4, dir.path());
    req.run.train.keep_checkpoints = 1;
    req.sample_tokens = 5;
    let s = train(req).unwrap();
    assert_eq!(checkpoint::list_steps(dir.path()), vec![4], "only the newest checkpoint is kept");
    assert!(s.sample.is_some_and(|t| !t.is_empty()));
    for f in ["config.json", "metrics.jsonl", "loss.svg"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("train loss"));
    // the stored config reloads, and the checkpoint loads into it
    let cfg = checkpoint::read_config(&s.checkpoint).unwrap();
    assert_eq!(cfg, micro_config());
    checkpoint::load_model(&s.checkpoint, &cfg).unwrap();
    // no temporary files are left behind
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .skip(1)
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // a new run into the same directory refuses to overwrite it
    let err = train(request(micro_config(), 4, dir.path())).err().expect("must refuse").to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    // 2 micro-batches of 2 sequences vs 1 batch of 4: same data, same update up to float rounding.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut ra = request(micro_config(), 3, a.path());
    let mut rb = request(micro_config(), 3, b.path());
    ra.run.train.device_batch_size = 2;
    rb.run.train.device_batch_size = 4;
    for r in [&mut ra, &mut rb] {
        r.run.train.total_batch_size = 4 * 32;
    }
    let (la, lb) = (train(ra).unwrap().losses, train(rb).unwrap().losses);
    for ((_, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-3, "accumulated {x} vs single batch {y}");
    }
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}
