//! End to end on WikiText-2 (`../shared/data/wikitext-2`, relative to the crate; skipped
//! with a message when absent): `nanoseek data --dataset wikitext` trains a 1024-id BPE
//! tokenizer on test.txt (the folder has no train split) and writes the shards, a short
//! `tiny`-shaped training run (2 layers, width 64, context 64) trains on them, and
//! `nanoseek eval` scores valid.txt into `eval_results.json`.
//!
//! The bar: finite loss, and bits per byte below the unigram baseline. The baseline is the
//! cross-entropy of a unigram model of the training shard's tokens with add-one smoothing,
//! p(t) = (count(t) + 1) / (N + V), on exactly the validation targets eval scored, over
//! their UTF-8 bytes: Σ −log₂ p(target) / bytes — i.e. the training distribution's
//! entropy-like cost in bits per token, times tokens per byte on valid. A model that has
//! learned nothing beyond token frequencies scores about this; anything using context
//! scores below it.

use nanoseek::data::shard::TokenShard;
use nanoseek::data::tokenizer::BpeTokenizer;
use nanoseek::data::TextCodec;
use std::path::Path;
use std::process::{Command, Output};

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek");
    assert!(o.status.success(), "nanoseek {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn wikitext2_data_train_eval_beats_unigram() {
    let wt = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/wikitext-2");
    if !wt.join("test.txt").is_file() || !wt.join("valid.txt").is_file() {
        println!("SKIPPED: {} absent (needs test.txt and valid.txt)", wt.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wt = wt.canonicalize().unwrap();
    let o = nanoseek(
        &[
            "data",
            "--dataset",
            "wikitext",
            "--input",
            wt.to_str().unwrap(),
            "-o",
            "wt2",
            "--vocab-size",
            "1024",
            "--quiet",
        ],
        d,
    );
    println!("{}", String::from_utf8_lossy(&o.stdout));
    let m = nanoseek::data::prepare::Manifest::read(&d.join("wt2")).unwrap();
    let (tr, va) = (&m.splits["train"], &m.splits["val"]);
    // test.txt's bytes, less its byte-order mark and the blank line before the first article
    assert!(tr.bytes <= 1_256_448 && tr.bytes > 1_256_448 - 16, "{tr:?}");
    assert!(tr.documents > 50 && va.documents > 50, "{tr:?} {va:?}");
    assert!(tr.bytes_per_token > 2.5, "a 1024-id BPE compresses English text: {tr:?}");

    let run = [
        "train",
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--n-head",
        "2",
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "16",
        "--num-iterations",
        "150",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--quiet",
        "--device",
        "cpu",
        "--data",
        "wt2",
        "--run",
        "wt",
    ];
    nanoseek(&run, d);
    let ckpt = d.join("runs/wt/checkpoints/step_000150");
    nanoseek(
        &[
            "eval",
            "--model-path",
            ckpt.to_str().unwrap(),
            "--data",
            "wt2",
            "--eval-tokens",
            "65536",
            "--output",
            "eval_results.json",
        ],
        d,
    );
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("eval_results.json")).unwrap()).unwrap();
    let (loss, bpb) = (e["loss"].as_f64().unwrap(), e["bits_per_byte"].as_f64().unwrap());
    assert!(loss.is_finite() && bpb.is_finite(), "{e}");

    // the unigram baseline on the same targets (val tokens 1..=n: eval's windows are contiguous)
    let train = TokenShard::open(&d.join("wt2/train.bin")).unwrap();
    let val = TokenShard::open(&d.join("wt2/val.bin")).unwrap();
    let v = train.vocab_size;
    let mut counts = vec![1.0f64; v];
    (0..train.len).for_each(|i| counts[train.get(i) as usize] += 1.0);
    let total = (train.len + v) as f64;
    let n = e["tokens"].as_u64().unwrap() as usize;
    let targets: Vec<u32> = (1..=n).map(|i| val.get(i)).collect();
    let bits: f64 = targets.iter().map(|&t| -(counts[t as usize] / total).log2()).sum();
    let tok = BpeTokenizer::load(&d.join("wt2/tokenizer.json")).unwrap();
    let bytes = tok.byte_len(&targets);
    assert_eq!(bytes as u64, e["bytes"].as_u64().unwrap(), "eval's byte count is the targets' bytes");
    let unigram_bpb = bits / bytes as f64;
    println!(
        "wikitext-2: train {} tokens ({:.2} bytes/token), val {} tokens; eval on {n} tokens: loss {loss:.3} nats/token, \
         {bpb:.3} bits/byte vs unigram {unigram_bpb:.3} bits/byte",
        tr.tokens, tr.bytes_per_token, va.tokens
    );
    assert!(bpb < unigram_bpb, "bits per byte {bpb} is not below the unigram baseline {unigram_bpb}");
}
