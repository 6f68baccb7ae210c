//! Synthetic long-range tasks: answers are where the metadata says, depths are placed
//! exactly, generation is deterministic, bad arguments are refused, and scoring counts right.

use nanoseek::data::synthetic::{SyntheticLanguage, BOS, EOT};
use nanoseek::data::tasks::{
    generate, predict, score, score_predictions, task_stream, TaskKind, TaskSample, COPY_SPAN, NEEDLE_NAMES,
    PASSKEY_DIGITS, RECALL_PAIRS,
};
use nanoseek::nn::{Model, ModelConfig};

const COLORS: [&str; 12] =
    ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink", "silver"];

const NUMBERS: [&str; 12] =
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];

fn words(lang: &SyntheticLanguage, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&t| lang.word(t).unwrap().to_string()).collect()
}

fn count(tokens: &[u32], t: u32) -> usize {
    tokens.iter().filter(|&&x| x == t).count()
}

/// Invariants every sample must satisfy.
fn check_common(lang: &SyntheticLanguage, s: &TaskSample, len: usize) {
    assert_eq!(s.tokens.len(), len);
    assert_eq!(s.tokens[0], BOS);
    assert!(s.tokens[1..].iter().all(|&t| t != BOS && t != EOT), "no document boundary inside a sample");
    assert!(s.tokens.iter().all(|&t| (t as usize) < lang.vocab_size()));
    assert_eq!(s.answer.end, len, "the answer is the last tokens");
    assert_eq!(s.source.len(), s.answer.len());
    assert!(s.source.end <= s.answer.start);
    assert_eq!(s.tokens[s.source.clone()], s.tokens[s.answer.clone()], "source holds the answer");
    assert!((0.0..=1.0).contains(&s.depth));
}

#[test]
fn recall_answer_is_the_queried_keys_value() {
    let lang = SyntheticLanguage::new();
    for s in generate(TaskKind::Recall, 40, 300, 7, None).unwrap() {
        check_common(&lang, &s, 300);
        let w = words(&lang, &s.tokens);
        let a = s.answer.start;
        assert_eq!(s.answer.len(), 1);
        assert_eq!(w[a - 5..a - 2], ["what", "color", "is"]);
        assert_eq!(w[a - 1], "?");
        let key = s.tokens[a - 2];
        assert!(w[a - 2].starts_with(|c: char| c.is_ascii_uppercase()), "the key is a name");
        assert_eq!(count(&s.tokens, key), 2, "the key occurs once as a pair and once in the query");
        // The pair `KEY is COLOR .` sits at the source, and its color is the answer.
        let src = s.source.start;
        assert_eq!(s.tokens[src - 2], key);
        assert_eq!([w[src - 1].as_str(), w[src + 1].as_str()], ["is", "."]);
        assert!(COLORS.contains(&w[src].as_str()));
        assert_eq!(s.tokens[a], s.tokens[src]);
        // At least RECALL_PAIRS `NAME is COLOR .` sentences before the query (the filler may add some).
        let pairs = (1..a - 5)
            .filter(|&i| {
                w[i].starts_with(|c: char| c.is_ascii_uppercase())
                    && w[i + 1] == "is"
                    && COLORS.contains(&w[i + 2].as_str())
                    && w[i + 3] == "."
            })
            .count();
        assert!(pairs >= RECALL_PAIRS, "{pairs} pairs found");
    }
}

#[test]
fn passkey_answer_is_the_needle_at_the_chosen_depth() {
    let lang = SyntheticLanguage::new();
    let depths = [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0];
    for len in [40, 257, 1000] {
        let samples = generate(TaskKind::Passkey, 14, len, 3, Some(&depths)).unwrap();
        for (i, s) in samples.iter().enumerate() {
            check_common(&lang, s, len);
            let w = words(&lang, &s.tokens);
            let a = s.answer.start;
            assert_eq!(s.answer.len(), PASSKEY_DIGITS);
            let holder = s.tokens[a - 3];
            assert_eq!([&w[a - 5], &w[a - 4], &w[a - 2], &w[a - 1]], ["what", "does", "have", "?"]);
            // Needle: HOLDER has N N N N N .
            let needle = s.source.start - 2;
            assert_eq!(s.tokens[needle], holder);
            assert_eq!(w[needle + 1], "has");
            assert_eq!(w[s.source.end], ".");
            assert_eq!(count(&s.tokens, holder), 2);
            assert!(w[s.source.clone()].iter().all(|d| NUMBERS.contains(&d.as_str())), "{:?}", &w[s.source.clone()]);
            // Depth: the needle starts at 1 + round(d·(R − m)), R = query start − 1, m = 8.
            assert_eq!(s.depth, depths[i % depths.len()]);
            let (r, m) = ((a - 5 - 1) as f64, (PASSKEY_DIGITS + 3) as f64);
            let want = 1.0 + s.depth as f64 * (r - m);
            assert!((needle as f64 - want).abs() <= 0.5, "len {len} d {}: needle at {needle}, want {want}", s.depth);
            // And relative to the whole sample, within the needle and query lengths.
            let slack = (m + 5.0 + PASSKEY_DIGITS as f64 + 1.0) / len as f64;
            assert!((needle as f64 / len as f64 - s.depth as f64).abs() <= slack);
        }
    }
}

#[test]
fn needle_is_the_only_key_name_in_the_sample() {
    let lang = SyntheticLanguage::new();
    let depths = [0.0, 0.3, 0.6, 1.0];
    for len in [15, 64, 500] {
        let samples = generate(TaskKind::Needle, 8, len, 5, Some(&depths)).unwrap();
        for s in &samples {
            check_common(&lang, s, len);
            let w = words(&lang, &s.tokens);
            let a = s.answer.start;
            assert_eq!(s.answer.len(), 1);
            assert_eq!([&w[a - 5], &w[a - 4], &w[a - 2], &w[a - 1]], ["what", "does", "have", "?"]);
            // Needle: HOLDER has NAME . with NAME a capitalized name found nowhere else.
            let (needle, name) = (s.source.start - 2, s.tokens[a]);
            assert_eq!(s.tokens[needle], s.tokens[a - 3]);
            assert_eq!((w[needle + 1].as_str(), w[needle + 3].as_str()), ("has", "."));
            assert!(w[a].starts_with(|c: char| c.is_ascii_uppercase()), "{}", w[a]);
            assert_eq!(count(&s.tokens, name), 2, "the name occurs in the needle and as the answer only");
            let (r, m) = ((a - 5 - 1) as f64, 4.0);
            assert!((needle as f64 - (1.0 + s.depth as f64 * (r - m))).abs() <= 0.5);
        }
        // Names vary across samples, among the NEEDLE_NAMES (chance 1/16, not 1/2).
        let names: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.tokens[s.answer.start]).collect();
        assert!(names.len() >= 4 && names.len() <= NEEDLE_NAMES, "{names:?}");
    }
}

#[test]
fn copy_answer_repeats_the_marked_span() {
    let lang = SyntheticLanguage::new();
    for s in generate(TaskKind::Copy, 30, 120, 11, Some(&[0.0, 0.5, 1.0])).unwrap() {
        check_common(&lang, &s, 120);
        assert_eq!(s.answer.len(), COPY_SPAN);
        let mark = s.tokens[s.answer.start - 1];
        assert_eq!(s.tokens[s.source.start - 1], mark);
        assert_eq!(count(&s.tokens, mark), 2, "the marker occurs only before the two spans");
    }
    let near = &generate(TaskKind::Copy, 1, 120, 11, Some(&[0.0])).unwrap()[0];
    assert_eq!(near.source.start, 2, "d = 0: the marker right after <bos>");
    let far = &generate(TaskKind::Copy, 1, 120, 11, Some(&[1.0])).unwrap()[0];
    assert_eq!(far.source.end, far.answer.start - 1, "d = 1: the span right before the final marker");
}

#[test]
fn deterministic_in_the_seed() {
    for kind in TaskKind::ALL {
        let a = generate(kind, 6, 200, 5, None).unwrap();
        assert_eq!(a, generate(kind, 6, 200, 5, None).unwrap());
        assert_eq!(a[..3], generate(kind, 3, 200, 5, None).unwrap()[..], "prefix-stable in n");
        assert_ne!(a, generate(kind, 6, 200, 6, None).unwrap());
    }
    let kinds = TaskKind::ALL;
    let s = task_stream(&kinds, 100, 9, 1050).unwrap();
    assert_eq!(s, task_stream(&kinds, 100, 9, 1050).unwrap());
    assert_ne!(s, task_stream(&kinds, 100, 10, 1050).unwrap());
}

#[test]
fn task_stream_concatenates_bos_separated_samples() {
    let lang = SyntheticLanguage::new();
    let kinds = [TaskKind::Passkey, TaskKind::Copy];
    let s = task_stream(&kinds, 64, 1, 1000).unwrap();
    assert_eq!(s.len(), 1000);
    let starts: Vec<usize> = (0..s.len()).filter(|&i| s[i] == BOS).collect();
    assert_eq!(starts, (0..1000).step_by(64).collect::<Vec<_>>());
    assert!(s.iter().all(|&t| (t as usize) < lang.vocab_size()));
    assert_eq!(lang.word(s[64 - PASSKEY_DIGITS - 2]).unwrap(), "have", "sample 0 is a passkey sample");
    assert!(task_stream(&[], 64, 1, 10).is_err());
    assert!(task_stream(&kinds, 10, 1, 100).is_err());
}

#[test]
fn bad_arguments_are_refused_with_clear_errors() {
    let err = |r: anyhow::Result<Vec<TaskSample>>| r.unwrap_err().to_string();
    let e = err(generate(TaskKind::Recall, 1, 20, 0, None));
    assert!(e.contains("too short") && e.contains("recall") && e.contains(&TaskKind::Recall.min_len().to_string()));
    assert!(err(generate(TaskKind::Passkey, 1, 100, 0, Some(&[1.5]))).contains("outside [0, 1]"));
    assert!(err(generate(TaskKind::Passkey, 1, 100, 0, Some(&[f32::NAN]))).contains("outside [0, 1]"));
    assert!(err(generate(TaskKind::Copy, 1, 100, 0, Some(&[]))).contains("empty"));
    assert!(TaskKind::parse("haystack").unwrap_err().to_string().contains("recall, passkey, needle, copy"));
    for k in TaskKind::ALL {
        assert_eq!(TaskKind::parse(k.name()).unwrap(), k);
        assert!(generate(k, 2, k.min_len(), 0, None).is_ok());
    }
    let samples = generate(TaskKind::Copy, 2, 50, 0, None).unwrap();
    assert!(score_predictions(&samples, &[vec![0; COPY_SPAN]], 4).unwrap_err().to_string().contains("1 predictions"));
    assert!(score_predictions(&samples, &[vec![0; COPY_SPAN], vec![0; 3]], 4).is_err());
    assert!(score_predictions(&samples, &[vec![0; COPY_SPAN], vec![0; COPY_SPAN]], 0).is_err());
}

#[test]
fn oracle_predictions_are_counted_right() {
    let mut samples = generate(TaskKind::Passkey, 4, 60, 2, Some(&[0.1, 0.3, 0.6, 1.0])).unwrap();
    samples.extend(generate(TaskKind::Recall, 2, 60, 2, Some(&[0.9])).unwrap());
    let perfect: Vec<Vec<u32>> = samples.iter().map(|s| s.tokens[s.answer.clone()].to_vec()).collect();
    let r = score_predictions(&samples, &perfect, 2).unwrap();
    assert_eq!(r.tasks.iter().map(|t| t.task.as_str()).collect::<Vec<_>>(), ["recall", "passkey"]);
    assert!(r.tasks.iter().all(|t| t.accuracy == 1.0 && t.token_accuracy == 1.0));

    // Passkey: one wrong digit in sample 1 (depth 0.3), all wrong in sample 3 (depth 1.0).
    let mut preds = perfect.clone();
    preds[1][2] += 1;
    preds[3].iter_mut().for_each(|t| *t += 1);
    let r = score_predictions(&samples, &preds, 2).unwrap();
    let p = &r.tasks[1];
    assert_eq!((p.n, p.correct, p.answer_tokens, p.correct_tokens), (4, 2, 4 * PASSKEY_DIGITS, 4 * PASSKEY_DIGITS - 6));
    assert_eq!(p.accuracy, 0.5);
    assert_eq!((p.by_depth[0].lo, p.by_depth[0].hi, p.by_depth[1].hi), (0.0, 0.5, 1.0));
    assert_eq!((p.by_depth[0].n, p.by_depth[0].correct, p.by_depth[0].accuracy), (2, 1, Some(0.5)));
    assert_eq!((p.by_depth[1].n, p.by_depth[1].correct, p.by_depth[1].accuracy), (2, 1, Some(0.5)));
    let rc = &r.tasks[0];
    assert_eq!((rc.by_depth[0].n, rc.by_depth[0].accuracy, rc.by_depth[1].n), (0, None, 2));

    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["depth_buckets"], 2);
    assert_eq!(json["tasks"][1]["task"], "passkey");
    assert_eq!(json["tasks"][0]["by_depth"][0]["accuracy"], serde_json::Value::Null);
    for key in ["n", "correct", "accuracy", "answer_tokens", "correct_tokens", "token_accuracy", "by_depth"] {
        assert!(json["tasks"][1].get(key).is_some(), "field {key}");
    }
}

fn tiny_model() -> Model {
    let cfg = ModelConfig {
        n_layer: 1,
        n_embd: 64,
        n_head: 2,
        n_kv_head: 2,
        head_dim: 32,
        ffn_hidden: 128,
        max_seq_len: 64,
        ..ModelConfig::preset("tiny").unwrap()
    };
    Model::new(&cfg, 1).unwrap()
}

#[test]
fn score_runs_on_an_untrained_model_and_matches_unbatched_argmax() {
    let model = tiny_model();
    let mut samples = Vec::new();
    for (k, len) in [(TaskKind::Recall, 64), (TaskKind::Passkey, 48), (TaskKind::Copy, 64)] {
        samples.extend(generate(k, 3, len, 4, None).unwrap());
    }
    let r = score(&model, &samples, 4).unwrap();
    assert_eq!(r.tasks.len(), 3);
    for t in &r.tasks {
        assert_eq!(t.n, 3);
        assert!((0.0..=1.0).contains(&t.accuracy) && (0.0..=1.0).contains(&t.token_accuracy));
        assert_eq!(t.by_depth.iter().map(|b| b.n).sum::<usize>(), 3);
    }
    // Batched predictions equal one-sequence-at-a-time argmax of the softcapped logits.
    let preds = predict(&model, &samples).unwrap();
    for (s, p) in samples.iter().zip(&preds).step_by(2) {
        for (j, pos) in s.answer.clone().enumerate() {
            let z = model.next_token_logits(&s.tokens[..pos]).unwrap();
            let best = (0..z.len()).fold(0, |b, i| if z[i] > z[b] { i } else { b });
            assert_eq!(p[j], best as u32, "{:?} answer token {j}", s.kind);
        }
    }
    let long = generate(TaskKind::Copy, 1, 100, 0, None).unwrap();
    assert!(score(&model, &long, 4).unwrap_err().to_string().contains("max_seq_len"));
}
