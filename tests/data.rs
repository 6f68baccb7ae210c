//! The data pipeline: tokenizer, shards (nanoseek and llm.c), bits per byte, and the
//! `nanoseek data` → `train --data DIR` → `eval` path on a small corpus.

mod common;

use nanoseek::data::codec::codec_for_run;
use nanoseek::data::prepare::{Manifest, PrepareOptions};
use nanoseek::data::shard::{write_llmc_shard, write_shard, ShardFormat, TokenShard};
use nanoseek::data::tokenizer::BpeTokenizer;
use nanoseek::data::TextCodec;
use nanoseek::rng::Rng;
use std::path::Path;
use std::process::{Command, Output};

fn nanoseek(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoseek")).args(args).current_dir(cwd).output().expect("run nanoseek")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure; stdout: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(e.contains("error:"), "{e}");
    e
}

/// Random text mixing ASCII, accented Latin, CJK, emoji (with ZWJ and skin tones),
/// combining marks, RTL, control characters and the highest code points.
fn random_text(rng: &mut Rng, chars: usize) -> String {
    let ranges: &[(u32, u32)] = &[
        (0x20, 0x7e),
        (0x20, 0x7e),
        (0x20, 0x7e),
        (0x09, 0x0d),
        (0xc0, 0x17f),
        (0x300, 0x36f), // combining diacritics
        (0x4e00, 0x9fff),
        (0x3040, 0x30ff),
        (0xac00, 0xd7a3),
        (0x590, 0x6ff),
        (0x1f300, 0x1faff),
        (0x1f3fb, 0x1f3ff), // skin tones
        (0x200d, 0x200d),   // zero-width joiner
        (0xfe0f, 0xfe0f),
        (0x10fff0, 0x10ffff),
        (0x0, 0x1f),
    ];
    (0..chars)
        .map(|_| {
            let (a, b) = ranges[rng.below(ranges.len())];
            char::from_u32(a + rng.below((b - a + 1) as usize) as u32).unwrap_or('?')
        })
        .collect()
}

#[test]
fn tokenizer_round_trips_arbitrary_utf8() {
    let mut rng = Rng::new(7);
    let mut corpus: Vec<String> = (0..50).map(|_| random_text(&mut rng, 200)).collect();
    corpus
        .extend((0..50).map(|i| format!("The quick brown fox {i} jumps over the lazy dog. Über café naïve 東京 🦀\n")));
    let tok = BpeTokenizer::train(corpus.into_iter(), 600, false).unwrap();
    for case in 0..200 {
        let s = random_text(&mut rng, 1 + case % 97);
        let ids = tok.encode(&s).unwrap();
        assert_eq!(tok.decode(&ids), s, "case {case}");
        assert_eq!(tok.byte_len(&ids), s.len(), "case {case}");
    }
    // fixed cases: emoji sequences, CJK, combining marks (not normalized away), special-token look-alikes
    for s in [
        "👩🏽‍💻 🇯🇵 ❤️",
        "漢字・かな・カナ、한국어。",
        "e\u{301} vs \u{e9}; a\u{30a}\u{301}\u{323}",
        "<|endoftext|><|bos|>",
        "\r\n\t\u{0}",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids), s);
        assert_eq!(tok.byte_len(&ids), s.len());
    }
    // invalid UTF-8 is refused with the place
    let e = tok.encode_bytes(b"fine text \xc3\x28 broken", "notes.txt").unwrap_err().to_string();
    assert!(e.contains("notes.txt") && e.contains("invalid UTF-8") && e.contains("offset 10"), "{e}");
}

#[test]
fn shards_round_trip_and_bad_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<u32> = (0..5000).map(|i| (i * 31 % 4000) as u32).collect();
    write_shard(&d.join("a.bin"), &ids, 4000).unwrap();
    let s = TokenShard::open(&d.join("a.bin")).unwrap();
    assert_eq!((s.len, s.vocab_size, s.width, s.format), (5000, 4000, 2, ShardFormat::Nanoseek));
    assert!((0..5000).all(|i| s.get(i) == ids[i]));
    assert!(write_shard(&d.join("b.bin"), &[4000], 4000).unwrap_err().to_string().contains("out of range"));
    assert!(!d.join("b.bin").exists());

    let good = std::fs::read(d.join("a.bin")).unwrap();
    let check = |name: &str, bytes: &[u8], needle: &str| {
        std::fs::write(d.join(name), bytes).unwrap();
        let e = TokenShard::open(&d.join(name)).err().unwrap_or_else(|| panic!("{name} was accepted")).to_string();
        assert!(e.contains(needle) && e.contains(name), "{name}: {e}");
    };
    check("short.bin", &good[..20], "truncated");
    check("cut.bin", &good[..good.len() - 3], "truncated");
    let mut b = good.clone();
    b[0..8].copy_from_slice(b"NOTTOKEN");
    check("magic.bin", &b, "bad magic");
    let mut b = good.clone();
    b[12..16].copy_from_slice(&3u32.to_le_bytes());
    check("width.bin", &b, "token width 3");
    let mut b = good.clone();
    b[8..12].copy_from_slice(&9u32.to_le_bytes());
    check("version.bin", &b, "version 9");
    let mut b = good.clone();
    b[16..24].copy_from_slice(&100_000u64.to_le_bytes());
    check("vocab.bin", &b, "vocab size 100000");
    check("empty.bin", b"", "truncated");
}

#[test]
fn llmc_shards_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fineweb_val_000000.bin");
    let ids: Vec<u16> = (0..3000).map(|i| (i * 97 % 50257) as u16).collect();
    write_llmc_shard(&p, &ids).unwrap();
    // the layout, by hand: 256 little-endian i32, then u16 ids
    let raw = std::fs::read(&p).unwrap();
    assert_eq!(raw.len(), 1024 + 2 * 3000);
    assert_eq!(i32::from_le_bytes(raw[0..4].try_into().unwrap()), 20240520);
    assert_eq!(i32::from_le_bytes(raw[4..8].try_into().unwrap()), 1);
    assert_eq!(i32::from_le_bytes(raw[8..12].try_into().unwrap()), 3000);
    let s = TokenShard::open(&p).unwrap();
    assert_eq!((s.format, s.len, s.vocab_size, s.width), (ShardFormat::LlmC, 3000, 50257, 2));
    assert!((0..3000).all(|i| s.get(i) == ids[i] as u32));
    std::fs::write(&p, &raw[..raw.len() - 1]).unwrap();
    assert!(TokenShard::open(&p).err().unwrap().to_string().contains("truncated"));
    std::fs::write(&p, &raw[..100]).unwrap();
    assert!(TokenShard::open(&p).err().unwrap().to_string().contains("llm.c shard"));
}

#[test]
fn bits_per_byte_by_hand() {
    // A model that is uniform over V = 256 ids spends ln 256 nats = 8 bits per token. On
    // "héllo wörld" (13 UTF-8 bytes) tokenized by a tokenizer that merged nothing (one id
    // per byte: 13 ids), that is 8 bits per byte exactly.
    let tok = BpeTokenizer::train(["x"].into_iter(), 258, false).unwrap();
    let text = "héllo wörld";
    let ids = tok.encode(text).unwrap();
    assert_eq!((ids.len(), tok.byte_len(&ids)), (13, 13));
    let nats = ids.len() as f64 * 256f64.ln();
    assert!((nanoseek::eval::bits_per_byte(nats, tok.byte_len(&ids) as u64) - 8.0).abs() < 1e-12);
    // BOS/EOT add nats but no bytes
    assert_eq!(tok.byte_len(&[0, 1]), 0);
    // the synthetic language: "the brako ." is 3 + 1 + 5 + 1 + 1 bytes ("the " "brako " ".")
    let lang = nanoseek::data::synthetic::SyntheticLanguage::new();
    let w = lang.word(200).unwrap().to_string();
    let ids = lang.encode(&format!("the {w} .")).unwrap();
    assert_eq!(TextCodec::byte_len(&lang, &ids), 4 + w.len() + 1 + 1);
}

#[test]
fn prepare_splits_documents_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("corpus/sub")).unwrap();
    for i in 0..30 {
        std::fs::write(d.join(format!("corpus/doc{i:02}.txt")), format!("Document {i}: the cat sat on the mat. 🐈\n"))
            .unwrap();
    }
    std::fs::write(d.join("corpus/sub/more.jsonl"), "{\"text\": \"json one\"}\n\n{\"text\": \"json two ünï\"}\n")
        .unwrap();
    std::fs::write(d.join("corpus/.hidden"), b"\xff\xff").unwrap();
    let mut o = PrepareOptions { inputs: vec![d.join("corpus")], vocab_size: 300, ..Default::default() };
    o.output = d.join("out");
    o.val_fraction = 0.1;
    let m = nanoseek::data::prepare::prepare(&o).unwrap();
    assert_eq!(m.sources.len(), 31, "the hidden file is skipped");
    let (tr, va) = (&m.splits["train"], &m.splits["val"]);
    assert_eq!(tr.documents + va.documents, 32);
    assert_eq!(va.documents, 3);
    assert_eq!(m, Manifest::read(&d.join("out")).unwrap());
    let tok = BpeTokenizer::load(&d.join("out/tokenizer.json")).unwrap();
    let s = TokenShard::open(&d.join("out/train.bin")).unwrap();
    assert_eq!(s.len as u64, tr.tokens);
    let ids: Vec<u32> = (0..s.len).map(|i| s.get(i)).collect();
    assert_eq!(ids[0], 0, "documents start with BOS");
    assert_eq!(*ids.last().unwrap(), 1, "and end with EOT");
    assert_eq!(ids.iter().filter(|&&t| t == 0).count() as u64, tr.documents);
    assert_eq!(tok.byte_len(&ids) as u64, tr.bytes);
    let text = tok.decode(&ids);
    assert!(text.contains("Document 0: the cat sat on the mat. 🐈") && text.contains("json two ünï"), "{text}");

    // invalid UTF-8: the file and offset, and no folder, shard or manifest left behind
    std::fs::write(d.join("corpus/doc05.txt"), b"ok so far \xe2\x28\xa1 then broken").unwrap();
    o.output = d.join("bad");
    let e = format!("{:#}", nanoseek::data::prepare::prepare(&o).unwrap_err());
    assert!(e.contains("doc05.txt") && e.contains("offset 10"), "{e}");
    assert!(!d.join("bad").exists(), "the output folder it created is removed again");
    // JSONL without the field
    o.inputs = vec![d.join("corpus/sub/more.jsonl")];
    o.jsonl_field = "content".into();
    let e = format!("{:#}", nanoseek::data::prepare::prepare(&o).unwrap_err());
    assert!(e.contains("more.jsonl:1") && e.contains("'content'"), "{e}");
}

#[test]
fn one_document_corpus_is_split_by_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = (0..400).map(|i| format!("line {i} of the only document\n")).collect();
    std::fs::write(d.join("book.txt"), &text).unwrap();
    let o = PrepareOptions {
        inputs: vec![d.join("book.txt")],
        vocab_size: 300,
        output: d.join("out"),
        ..Default::default()
    };
    let m = nanoseek::data::prepare::prepare(&o).unwrap();
    assert_eq!(m.val_split, "token-tail");
    let (tr, va) = (&m.splits["train"], &m.splits["val"]);
    let total = tr.tokens + va.tokens;
    assert!(va.tokens > 0 && (va.tokens as f64 - 0.05 * total as f64).abs() <= 1.0, "{tr:?} {va:?}");
    assert_eq!(tr.bytes + va.bytes, text.len() as u64);
    assert_eq!(TokenShard::open(&d.join("out/val.bin")).unwrap().len as u64, va.tokens);
}

#[test]
fn data_train_eval_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("corpus")).unwrap();
    let lang = nanoseek::data::synthetic::SyntheticLanguage::new();
    let mut rng = Rng::new(3);
    // 300 documents of readable synthetic-language text, as plain text files
    for i in 0..300 {
        let doc = lang.document(&mut rng);
        std::fs::write(d.join(format!("corpus/{i:03}.txt")), TextCodec::decode(&lang, &doc[1..doc.len() - 1])).unwrap();
    }
    let out =
        ok(&nanoseek(&["data", "--input", "corpus", "--output", "prepared", "--vocab-size", "512", "--quiet"], d));
    assert!(out.contains("train") && out.contains("bytes/token"), "{out}");
    let m = Manifest::read(&d.join("prepared")).unwrap();
    assert_eq!((m.tokenizer.kind.as_str(), m.tokenizer.vocab_size, m.splits["val"].documents), ("bpe", 512, 15));
    assert!(m.splits["train"].bytes_per_token > 2.0, "{:?}", m.splits["train"]);

    // train on the folder: the vocabulary follows the tokenizer, the run keeps the tokenizer
    let mut run = vec!["train", "--n-layer", "1"];
    run.extend_from_slice(common::SMALL_MODEL_FLAGS);
    run.extend_from_slice(&[
        "--num-iterations",
        "3",
        "--sample-tokens",
        "0",
        "--quiet",
        "--device",
        "cpu",
        "--data",
        "prepared",
        "--run",
        "r",
    ]);
    ok(&nanoseek(&run, d));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("runs/r/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["vocab_size"], 512);
    assert_eq!(
        std::fs::read(d.join("runs/r/tokenizer.json")).unwrap(),
        std::fs::read(d.join("prepared/tokenizer.json")).unwrap()
    );
    let ckpt = d.join("runs/r/checkpoints/step_000003");
    let codec = codec_for_run(&ckpt).unwrap();
    assert_eq!(codec.vocab_size(), 512);
    assert_eq!(codec.decode(&codec.encode("Zorla likes Mibu .").unwrap()), "Zorla likes Mibu .");

    // eval: finite loss and bits per byte, in the documented fields
    let ck = ckpt.to_str().unwrap();
    let o =
        nanoseek(&["eval", "--model-path", ck, "--data", "prepared", "--eval-tokens", "256", "--output", "e.json"], d);
    ok(&o);
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("e.json")).unwrap()).unwrap();
    for k in ["loss", "perplexity", "bits_per_byte", "tokens_per_s", "peak_memory_mib", "elapsed_s"] {
        assert!(e[k].as_f64().is_some_and(f64::is_finite), "{k}: {e}");
    }
    assert_eq!(e["format_version"], 1);
    assert_eq!(e["split"], "val");
    assert!(e["tokens"].as_u64().unwrap() >= 256 && e["bytes"].as_u64().unwrap() > 256, "{e}");
    assert!(e["tasks"].as_object().unwrap().is_empty());
    let bpb = e["loss"].as_f64().unwrap() * e["tokens"].as_f64().unwrap() / 2f64.ln() / e["bytes"].as_f64().unwrap();
    assert!((bpb - e["bits_per_byte"].as_f64().unwrap()).abs() < 1e-9);
    // BOS-aligned windows
    let o = nanoseek(&["eval", "--model-path", ck, "--data", "prepared", "--eval-tokens", "128", "--bos-aligned"], d);
    assert!(ok(&o).contains("\"bos_aligned\": true"));
    // data made with another tokenizer is refused
    ok(&nanoseek(&["data", "--input", "corpus", "--output", "other", "--vocab-size", "400", "--quiet"], d));
    let e = failed(&nanoseek(&["eval", "--model-path", ck, "--data", "other"], d));
    assert!(e.contains("tokenized with"), "{e}");
    // bring your own tokenizer: the copied one gives identical shards
    ok(&nanoseek(
        &["data", "--input", "corpus", "--tokenizer", "prepared/tokenizer.json", "-o", "again", "--quiet"],
        d,
    ));
    assert_eq!(std::fs::read(d.join("again/train.bin")).unwrap(), std::fs::read(d.join("prepared/train.bin")).unwrap());

    // bad input: clear errors, non-zero exit
    std::fs::write(d.join("bad.txt"), b"abc\n\xffdef").unwrap();
    let e = failed(&nanoseek(&["data", "--input", "bad.txt", "-o", "x", "--quiet"], d));
    assert!(e.contains("bad.txt") && e.contains("offset 4"), "{e}");
    let e = failed(&nanoseek(&["data", "--input", "nope", "-o", "x", "--quiet"], d));
    assert!(e.contains("nope"), "{e}");
    let e = failed(&nanoseek(&["data", "--dataset", "wikitext", "--input", "corpus", "-o", "x", "--quiet"], d));
    assert!(e.contains("WikiText"), "{e}");
    let e = failed(&nanoseek(&["data", "--input", "corpus", "--vocab-size", "100", "-o", "x", "--quiet"], d));
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn synthetic_and_wikitext_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&nanoseek(&["data", "--synthetic", "--num-samples", "200", "--max-seq-len", "64", "-o", "syn", "--quiet"], d));
    let m = Manifest::read(&d.join("syn")).unwrap();
    assert_eq!(m.tokenizer.kind, "synthetic");
    assert!(!d.join("syn/tokenizer.json").exists());
    assert_eq!(m.splits["train"].documents + m.splits["val"].documents, 200);
    let s = TokenShard::open(&d.join("syn/train.bin")).unwrap();
    assert!(s.len <= 190 * 64 && s.get(0) == 0);

    // a miniature WikiText folder: articles are documents, the folder's splits are kept
    std::fs::create_dir(d.join("wt")).unwrap();
    let article =
        |t: &str| format!(" \n = {t} = \n \n {t} is a thing . \n \n = = History = = \n \n It was made in 1900 . \n");
    std::fs::write(d.join("wt/wiki.train.tokens"), [article("Alpha"), article("Beta"), article("Gamma")].concat())
        .unwrap();
    std::fs::write(d.join("wt/wiki.valid.tokens"), article("Delta")).unwrap();
    std::fs::write(d.join("wt/wiki.test.tokens"), [article("Eps"), article("Zeta")].concat()).unwrap();
    ok(&nanoseek(
        &["data", "--dataset", "wikitext", "--input", "wt", "-o", "wtd", "--vocab-size", "300", "--quiet"],
        d,
    ));
    let m = Manifest::read(&d.join("wtd")).unwrap();
    let docs: Vec<u64> = ["train", "val", "test"].iter().map(|s| m.splits[*s].documents).collect();
    assert_eq!(docs, vec![3, 1, 2]);
    assert_eq!(m.val_split, "inputs");
    // a second run into the same folder replaces what it does not write again
    ok(&nanoseek(&["data", "--synthetic", "--num-samples", "50", "-o", "wtd", "--quiet", "--force"], d));
    assert!(!d.join("wtd/test.bin").exists() && !d.join("wtd/tokenizer.json").exists());
}

#[test]
fn python_tokenizers_loads_the_saved_file() {
    let ok_py = Command::new("python3").args(["-c", "import tokenizers"]).output().is_ok_and(|o| o.status.success());
    if !ok_py {
        println!("SKIPPED: python3 with the tokenizers package absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let texts = (0..30).map(|i| format!("Python and Rust agree {i}: naïve café 🦀 東京.\n"));
    let tok = BpeTokenizer::train(texts, 320, false).unwrap();
    let p = dir.path().join("tokenizer.json");
    tok.save(&p).unwrap();
    let s = "Python and Rust agree: naïve 🦀 東京?";
    let script = format!(
        "import tokenizers, json; t = tokenizers.Tokenizer.from_file({:?}); print(json.dumps(t.encode({:?}, add_special_tokens=False).ids))",
        p.to_str().unwrap(),
        s
    );
    let o = Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids, tok.encode(s).unwrap());
}
