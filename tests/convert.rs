//! Continued training from a trained checkpoint with a changed architecture (DeepSeek-V3.2's
//! dense-to-sparse recipe; MTP added to a trained model): the tensors the checkpoint holds carry
//! over exactly, the new ones (indexers, MTP modules) start as a fresh model would.

use nanoseek::device::Device;
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::train::checkpoint::{checkpoint_dir, load_model, load_model_converting};
use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};
use std::path::Path;

fn micro(pattern: &str) -> ModelConfig {
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (2, 32, 2, 1, 16, 64, 16);
    m.attn_pattern = pattern.into();
    (m.index_topk, m.index_n_heads, m.index_head_dim) = (4, 2, 8);
    m
}

fn request(model: ModelConfig, steps: u64, dir: &Path) -> TrainRequest {
    let mut t = TrainSettings::for_model(&model);
    t.device_batch_size = 2;
    t.total_batch_size = 2 * model.max_seq_len;
    (t.num_iterations, t.save_every, t.eval_every, t.eval_batches) = (steps, steps, steps, 1);
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
fn a_dense_checkpoint_converts_to_sparse_with_mtp() {
    let tmp = tempfile::tempdir().unwrap();
    train::train(request(micro("DD"), 3, tmp.path())).unwrap();
    let ckpt = checkpoint_dir(tmp.path(), 3);
    let dense = load_model(&ckpt, &micro("DD")).unwrap();
    let target = ModelConfig { mtp_depth: 1, ..micro("SD") };
    // without a fresh model the new tensors are missing
    let err = load_model(&ckpt, &target).err().expect("missing tensors are refused").to_string();
    assert!(err.contains("has no tensor 'blocks.0.attn.indexer.wq.weight'"), "{err}");
    let fresh = Model::new(&target, 7).unwrap();
    let (conv, added) = load_model_converting(&ckpt, &target, Some(&fresh)).unwrap();
    assert_eq!(added.len(), 3 + fresh.params.iter().filter(|p| p.name.starts_with("mtp.")).count());
    for p in &conv.params {
        let want = match dense.param(&p.name) {
            Some(t) => t,
            None => fresh.param(&p.name).unwrap(),
        };
        assert_eq!(p.tensor.data, want.data, "{}", p.name);
    }
    // a tensor of another shape is never replaced
    let wider = ModelConfig { n_embd: 48, ..micro("SD") };
    let fresh_wide = Model::new(&wider, 7).unwrap();
    let err = load_model_converting(&ckpt, &wider, Some(&fresh_wide)).err().expect("refused").to_string();
    assert!(err.contains("has shape"), "{err}");
}

/// DeepSeek-V3.2's recipe: from a dense checkpoint, a DSA model whose warm-up trains only the
/// new indexers (every other tensor stays bitwise the parent's, the MoE biases too), then sparse
/// training of everything.
#[test]
fn the_indexer_warm_up_freezes_the_main_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, child) = (tmp.path().join("parent"), tmp.path().join("child"));
    train::train(request(micro("DD"), 3, &parent)).unwrap();
    let dense = load_model(&checkpoint_dir(&parent, 3), &micro("DD")).unwrap();
    let cfg = ModelConfig { dsa_warmup_steps: 2, ..micro("SD") };
    let mut req = request(cfg.clone(), 4, &child);
    req.run.train.init_from = Some(checkpoint_dir(&parent, 3));
    req.run.train.save_every = 2;
    assert!(req.run.train.freezes_main_during_warmup(), "on by default for a conversion");
    train::train(req).unwrap();
    let warm = load_model(&checkpoint_dir(&child, 2), &cfg).unwrap();
    let done = load_model(&checkpoint_dir(&child, 4), &cfg).unwrap();
    for p in &warm.params {
        let moved =
            |m: &Model| m.param(&p.name).unwrap().data != Model::new(&cfg, 42).unwrap().param(&p.name).unwrap().data;
        match dense.param(&p.name) {
            Some(t) => {
                assert_eq!(p.tensor.data, t.data, "{} moved during the warm-up", p.name);
                assert_ne!(done.param(&p.name).unwrap().data, t.data, "{} did not train after it", p.name);
            }
            None => assert!(moved(&warm), "the indexer tensor {} did not train in the warm-up", p.name),
        }
    }
    let recs = train::metrics::read(&child.join("metrics.jsonl")).unwrap();
    let frozen: Vec<bool> = recs.iter().filter(|r| r["loss"].is_number()).map(|r| r["main_frozen"] == true).collect();
    assert_eq!(frozen, [true, true, false, false]);
}

/// Continuing a dense checkpoint with a dense model and a nonzero `dsa_warmup_steps`: the default
/// freeze has no indexer to train, so it does not apply (every tensor trains); asking for it
/// explicitly is refused by name before any step.
#[test]
fn the_warm_up_freeze_needs_an_indexer() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, child) = (tmp.path().join("parent"), tmp.path().join("child"));
    train::train(request(micro("DD"), 3, &parent)).unwrap();
    let dense = load_model(&checkpoint_dir(&parent, 3), &micro("DD")).unwrap();
    let cfg = ModelConfig { dsa_warmup_steps: 2, ..micro("DD") };
    let converting = |dir: &Path| {
        let mut req = request(cfg.clone(), 1, dir);
        req.run.train.init_from = Some(checkpoint_dir(&parent, 3));
        req
    };
    train::train(converting(&child)).unwrap();
    let done = load_model(&checkpoint_dir(&child, 1), &cfg).unwrap();
    for p in &done.params {
        assert_ne!(p.tensor.data, dense.param(&p.name).unwrap().data, "{} did not train", p.name);
    }
    let explicit = tmp.path().join("explicit");
    let mut req = converting(&explicit);
    req.run.train.freeze_main_during_warmup = Some(true);
    let err = format!("{:#}", train::train(req).err().expect("refused"));
    assert!(err.contains("no DSA (`S`) layer"), "{err}");
    assert!(!checkpoint_dir(&explicit, 1).exists());
}
