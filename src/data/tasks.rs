//! Synthetic long-range tasks with known answers: what sparse attention is for.
//!
//! Every sample is written in the embedded synthetic language's vocabulary (ids < 2031,
//! see `synthetic.rs`), so a model trained on the embedded data can be trained and
//! evaluated on them. A sample of exactly `len` tokens is
//!
//! ```text
//! <bos> FILLER … PIECE … FILLER QUERY ANSWER
//! ```
//!
//! FILLER is plain synthetic text (documents without their `<bos>`/`<eot>`, so the whole
//! sample is one document), cut to fit. The PIECE holding the information is inserted at
//! a chosen relative depth `d ∈ [0, 1]` of the region between `<bos>` and the query: with
//! `R = query_start − 1` context positions and a piece of `m` tokens, it starts at token
//! `1 + round(d · (R − m))`, so `d = 0` is right after `<bos>` and `d = 1` right before
//! the query. Other pieces (recall's distractor pairs) go to random free places.
//!
//! Names are split in two: the filler only uses half of them (a name of the other half in
//! a filler document is replaced by its neighbour), the tasks use the other half as keys
//! and markers, so a key never occurs in the filler and every answer is unambiguous.
//!
//! * **recall** (associative recall / key-value lookup): `RECALL_PAIRS` pairs
//!   `KEY is COLOR .` with distinct key names, at random places except the queried one,
//!   which is at depth `d`; the query is `what color is KEY ?` and the answer the color
//!   (one token; 12 colors, chance 1/12).
//! * **passkey** (retrieval at a chosen depth): the needle `Vaploo has N N N N N .`
//!   (`PASSKEY_DIGITS` random number words; the marker name `Vaploo` is fixed); the query
//!   is always `what does Vaploo have ?` and the answer the five number words (12⁵ keys).
//! * **needle** (single-token retrieval): the needle `Vaploo has NAME .` with NAME one of
//!   `NEEDLE_NAMES` task-half names (never in the filler, so it is the only such name in the
//!   sample); the query is passkey's `what does Vaploo have ?` and the answer NAME (one token;
//!   chance 1/16). Unlike passkey's five number words, which also occur in the filler
//!   and must be told apart by their place after the marker, the needle can be found by its
//!   content alone: the easiest long-range retrieval, the one a small model learns first.
//! * **copy**: the marker name `Plaglu` and a span of `COPY_SPAN` random words (any id but
//!   `<bos>`, `<eot>` and the marker); at the end the marker again, and the answer is the span.
//!
//! `generate(kind, 1, 48, 1, Some(&[0.4]))`, decoded (the answer is the last tokens):
//!
//! ```text
//! recall  (source 18..19, answer 47..48)
//! <bos> Plouplom is Kripo is brown. a taiplish Moothi is white. droodra. Plouplom Krorind
//! is green. likes Traipo. Traipo is a Mizo is brown. letre. Traipo has four boos. Traipo is
//! white. Traipo what color is Krorind? green
//! passkey (source 15..20, answer 43..48)
//! <bos> there is a keenaen hastosh named Duple. Duple has two vaiskoostus Vaploo has six two
//! ten four eight.. Duple is orange. Duple lives in the drigloork. the plegur bihils because
//! Duple vebaishes what does Vaploo have? six two ten four eight
//! copy    (source 14..22, answer 40..48)
//! <bos> Same is a meskoum. Same lives in the kifork. Same Plaglu Shouba meems traiglish haibis
//! shipu chihems kind skiks is yellow. Krego is a beedeer. the color of Krego is gray. Krego
//! likes Plaglu Shouba meems traiglish haibis shipu chihems kind skiks
//! ```
//!
//! Pieces are inserted at exact token positions, so they may split a filler sentence.
//!
//! [`TaskSample`] records `answer` (positions of the answer tokens, always the last ones),
//! `source` (positions of the tokens the answer copies: the color, the digits, the first
//! span; `tokens[source] == tokens[answer]`) and `depth` (the `d` the piece was placed at).
//!
//! # Scoring
//!
//! [`score`] is teacher-forced: answer token `p` counts as right when the model's argmax at
//! position `p − 1` equals `tokens[p]`; a sample is right when all its answer tokens are.
//! The JSON form of [`TaskReport`] has stable field names:
//! `{ depth_buckets, tasks: [{ task, n, correct, accuracy, answer_tokens, correct_tokens,
//! token_accuracy, by_depth: [{ lo, hi, n, correct, accuracy }] }] }`. Depth bucket `i` of
//! `B` holds depths in `[i/B, (i+1)/B)` (the last one also holds `d = 1`); `accuracy` is
//! `null` for an empty bucket. Tasks appear in the order recall, passkey, needle, copy.

use super::synthetic::{SyntheticLanguage, BOS, EOT};
use crate::autograd::Tape;
use crate::nn::Model;
use crate::rng::Rng;
use anyhow::{bail, ensure, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::Range;

/// Key-value pairs in a recall sample (one is queried, the others are distractors).
pub const RECALL_PAIRS: usize = 4;
/// Number words in a passkey.
pub const PASSKEY_DIGITS: usize = 5;
/// Key names a needle is drawn from (chance level 1/16).
pub const NEEDLE_NAMES: usize = 16;
/// Tokens in a copy span.
pub const COPY_SPAN: usize = 8;
/// Tokens per forward pass when scoring (rows of equal length are batched up to this).
const SCORE_BATCH_TOKENS: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Recall,
    Passkey,
    Needle,
    Copy,
}

impl TaskKind {
    pub const ALL: [TaskKind; 4] = [TaskKind::Recall, TaskKind::Passkey, TaskKind::Needle, TaskKind::Copy];

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Recall => "recall",
            TaskKind::Passkey => "passkey",
            TaskKind::Needle => "needle",
            TaskKind::Copy => "copy",
        }
    }

    pub fn parse(s: &str) -> Result<TaskKind> {
        match TaskKind::ALL.into_iter().find(|k| k.name() == s) {
            Some(k) => Ok(k),
            None => bail!("unknown task '{s}': expected one of recall, passkey, needle, copy"),
        }
    }

    /// The shortest `len` a sample of this task can have (the pieces get at least as
    /// much filler as their own length, so they can always be placed).
    pub fn min_len(self) -> usize {
        let (pieces, tail) = match self {
            TaskKind::Recall => (RECALL_PAIRS * 4, 5 + 1),
            TaskKind::Passkey => (PASSKEY_DIGITS + 3, 5 + PASSKEY_DIGITS),
            TaskKind::Needle => (4, 5 + 1),
            TaskKind::Copy => (COPY_SPAN + 1, 1 + COPY_SPAN),
        };
        1 + 2 * pieces + tail
    }
}

/// One sample; see the module doc for the formats.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskSample {
    pub kind: TaskKind,
    /// Exactly `len` ids, starting with BOS; the answer tokens are the last ones.
    pub tokens: Vec<u32>,
    /// Positions of the answer tokens in `tokens`.
    pub answer: Range<usize>,
    /// The depth `d ∈ [0, 1]` the information piece was placed at.
    pub depth: f32,
    /// Positions of the information the answer repeats (`tokens[source] == tokens[answer]`).
    pub source: Range<usize>,
}

/// The vocabulary the tasks draw from (built once per call).
struct Words {
    lang: SyntheticLanguage,
    /// Filler remapping: a key-half name goes to its filler-half neighbour, others to themselves.
    remap: Vec<u32>,
    /// Key names for recall (excludes the two markers).
    keys: Vec<u32>,
    holder: u32,
    mark: u32,
    colors: Vec<u32>,
    numbers: Vec<u32>,
}

const COLORS: [&str; 12] =
    ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink", "silver"];
const NUMBERS: [&str; 12] =
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];

impl Words {
    fn new() -> Result<Words> {
        let lang = SyntheticLanguage::new();
        let v = lang.vocab_size() as u32;
        let names: Vec<u32> = (0..v)
            .filter(|&id| lang.word(id).is_some_and(|w| w.starts_with(|c: char| c.is_ascii_uppercase())))
            .collect();
        ensure!(names.len() >= 2 * (RECALL_PAIRS.max(NEEDLE_NAMES) + 2), "the synthetic language has too few names");
        let mut remap: Vec<u32> = (0..v).collect();
        let mut keys = Vec::new();
        for pair in names.chunks_exact(2) {
            remap[pair[1] as usize] = pair[0];
            keys.push(pair[1]);
        }
        let holder = keys.pop().unwrap();
        let mark = keys.pop().unwrap();
        let ids = |list: &[&str]| -> Result<Vec<u32>> {
            list.iter()
                .map(|w| lang.token(w).ok_or_else(|| anyhow::anyhow!("'{w}' is not in the synthetic vocabulary")))
                .collect()
        };
        let (colors, numbers) = (ids(&COLORS)?, ids(&NUMBERS)?);
        Ok(Words { lang, remap, keys, holder, mark, colors, numbers })
    }

    fn id(&self, w: &str) -> u32 {
        self.lang.token(w).expect("a word of the synthetic language")
    }

    fn ids(&self, text: &str) -> Vec<u32> {
        text.split(' ').map(|w| self.id(w)).collect()
    }

    /// `n` tokens of plain synthetic text without BOS/EOT and without key-half names.
    fn filler(&self, rng: &mut Rng, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n + 400);
        while out.len() < n {
            let doc = self.lang.document(rng);
            out.extend(doc.iter().filter(|&&t| t != BOS && t != EOT).map(|&t| self.remap[t as usize]));
        }
        out.truncate(n);
        out
    }

    /// One sample of `kind` with `len` tokens and its information piece at depth `d`.
    fn sample(&self, kind: TaskKind, len: usize, d: f32, rng: &mut Rng) -> Result<TaskSample> {
        let pick = |rng: &mut Rng, from: &[u32]| from[rng.below(from.len())];
        // pieces[0] holds the information, starting `offset` tokens into it.
        let (pieces, offset, query, answer): (Vec<Vec<u32>>, usize, Vec<u32>, Vec<u32>) = match kind {
            TaskKind::Recall => {
                let mut pool = self.keys.clone();
                let pieces: Vec<Vec<u32>> = (0..RECALL_PAIRS)
                    .map(|_| {
                        let key = pool.swap_remove(rng.below(pool.len()));
                        vec![key, self.id("is"), pick(rng, &self.colors), self.id(".")]
                    })
                    .collect();
                let mut query = self.ids("what color is");
                query.extend([pieces[0][0], self.id("?")]);
                let answer = vec![pieces[0][2]];
                (pieces, 2, query, answer)
            }
            TaskKind::Passkey => {
                let digits: Vec<u32> = (0..PASSKEY_DIGITS).map(|_| pick(rng, &self.numbers)).collect();
                let mut needle = vec![self.holder, self.id("has")];
                needle.extend(&digits);
                needle.push(self.id("."));
                let query = vec![self.id("what"), self.id("does"), self.holder, self.id("have"), self.id("?")];
                (vec![needle], 2, query, digits)
            }
            TaskKind::Needle => {
                let name = pick(rng, &self.keys[..NEEDLE_NAMES]);
                let needle = vec![self.holder, self.id("has"), name, self.id(".")];
                let query = vec![self.id("what"), self.id("does"), self.holder, self.id("have"), self.id("?")];
                (vec![needle], 2, query, vec![name])
            }
            TaskKind::Copy => {
                let v = self.lang.vocab_size();
                let span: Vec<u32> = (0..COPY_SPAN)
                    .map(|_| loop {
                        let t = 2 + rng.below(v - 2) as u32;
                        if t != self.mark {
                            break t;
                        }
                    })
                    .collect();
                let piece: Vec<u32> = std::iter::once(self.mark).chain(span.iter().copied()).collect();
                (vec![piece], 1, vec![self.mark], span)
            }
        };
        let q_start = len - query.len() - answer.len();
        let r = q_start - 1;
        let starts = place(&pieces, r, d, rng)?;
        let fill = r - pieces.iter().map(Vec::len).sum::<usize>();
        let mut filler = self.filler(rng, fill).into_iter();
        let mut at: BTreeMap<usize, usize> = starts.iter().enumerate().map(|(j, &s)| (s, j)).collect();
        let mut tokens = Vec::with_capacity(len);
        tokens.push(BOS);
        while tokens.len() < q_start {
            match at.remove(&(tokens.len() - 1)) {
                Some(j) => tokens.extend(&pieces[j]),
                None => tokens.push(filler.next().expect("filler sized to the free cells")),
            }
        }
        tokens.extend(&query);
        tokens.extend(&answer);
        debug_assert_eq!(tokens.len(), len);
        let source = 1 + starts[0] + offset..1 + starts[0] + offset + answer.len();
        Ok(TaskSample { kind, tokens, answer: len - answer.len()..len, depth: d, source })
    }
}

/// Start offsets (within a region of `r` cells) of non-overlapping pieces: `pieces[0]` at
/// `round(d · (r − m₀))`, each other one uniformly among the places still free.
fn place(pieces: &[Vec<u32>], r: usize, d: f32, rng: &mut Rng) -> Result<Vec<usize>> {
    let mut used = vec![false; r];
    let mut starts = Vec::with_capacity(pieces.len());
    for (j, p) in pieces.iter().enumerate() {
        let m = p.len();
        ensure!(m <= r, "a piece of {m} tokens does not fit in {r} context positions");
        let s = if j == 0 {
            (d as f64 * (r - m) as f64).round() as usize
        } else {
            let free: Vec<usize> = (0..=r - m).filter(|&s| !used[s..s + m].iter().any(|&u| u)).collect();
            ensure!(!free.is_empty(), "no room left for a piece of {m} tokens among {r} positions");
            free[rng.below(free.len())]
        };
        used[s..s + m].iter_mut().for_each(|u| *u = true);
        starts.push(s);
    }
    Ok(starts)
}

fn check_len(kind: TaskKind, len: usize) -> Result<()> {
    ensure!(
        len >= kind.min_len(),
        "len {len} is too short for the {} task: it needs at least {} tokens",
        kind.name(),
        kind.min_len()
    );
    Ok(())
}

/// `n` samples of `kind`, each exactly `len` tokens. Sample `i` is placed at depth
/// `depths[i % depths.len()]`, or at a uniform random depth when `depths` is None.
/// Deterministic in `seed`; the first k samples do not depend on `n`.
pub fn generate(kind: TaskKind, n: usize, len: usize, seed: u64, depths: Option<&[f32]>) -> Result<Vec<TaskSample>> {
    check_len(kind, len)?;
    if let Some(ds) = depths {
        ensure!(!ds.is_empty(), "depths must not be empty (pass None for random depths)");
        if let Some(d) = ds.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            bail!("depth {d} is outside [0, 1]");
        }
    }
    let words = Words::new()?;
    let mut rng = Rng::derive(seed, &format!("tasks/{}", kind.name()));
    (0..n)
        .map(|i| {
            let d = match depths {
                Some(ds) => ds[i % ds.len()],
                None => rng.uniform() as f32,
            };
            words.sample(kind, len, d, &mut rng)
        })
        .collect()
}

/// A training stream of exactly `n_tokens` ids: samples of `len` tokens (kinds in turn,
/// random depths) concatenated, so every sample starts with BOS; the last one is cut.
/// Use `len` well below the training sequence length so most windows hold whole samples.
pub fn task_stream(kinds: &[TaskKind], len: usize, seed: u64, n_tokens: usize) -> Result<Vec<u32>> {
    ensure!(!kinds.is_empty(), "task_stream needs at least one task kind");
    for &k in kinds {
        check_len(k, len)?;
    }
    let words = Words::new()?;
    let mut rng = Rng::derive(seed, "tasks/stream");
    let mut out = Vec::with_capacity(n_tokens + len);
    for i in 0.. {
        if out.len() >= n_tokens {
            break;
        }
        let d = rng.uniform() as f32;
        out.extend(words.sample(kinds[i % kinds.len()], len, d, &mut rng)?.tokens);
    }
    out.truncate(n_tokens);
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DepthBucket {
    /// Depths in `[lo, hi)` (the last bucket also holds `hi = 1`).
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
    pub correct: usize,
    /// `correct / n`, `null` when the bucket is empty.
    pub accuracy: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskScore {
    /// `recall`, `passkey` or `copy`.
    pub task: String,
    /// Samples scored.
    pub n: usize,
    /// Samples with every answer token predicted right.
    pub correct: usize,
    pub accuracy: f64,
    pub answer_tokens: usize,
    pub correct_tokens: usize,
    pub token_accuracy: f64,
    pub by_depth: Vec<DepthBucket>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskReport {
    pub depth_buckets: usize,
    /// One entry per task present in the samples (order: recall, passkey, needle, copy).
    pub tasks: Vec<TaskScore>,
}

/// The bucket of depth `d` among `buckets` equal buckets of [0, 1].
pub fn depth_bucket(d: f32, buckets: usize) -> usize {
    ((d.clamp(0.0, 1.0) as f64 * buckets as f64) as usize).min(buckets - 1)
}

/// Scores given predictions: `predictions[i][j]` is the token predicted for
/// `samples[i].tokens[answer.start + j]` (from position `answer.start + j − 1`).
pub fn score_predictions(samples: &[TaskSample], predictions: &[Vec<u32>], depth_buckets: usize) -> Result<TaskReport> {
    ensure!(depth_buckets >= 1, "depth_buckets must be at least 1");
    ensure!(predictions.len() == samples.len(), "{} predictions for {} samples", predictions.len(), samples.len());
    let mut per: BTreeMap<TaskKind, TaskScore> = BTreeMap::new();
    for (i, (s, pred)) in samples.iter().zip(predictions).enumerate() {
        ensure!(
            pred.len() == s.answer.len(),
            "sample {i}: {} predictions for {} answer tokens",
            pred.len(),
            s.answer.len()
        );
        let e = per.entry(s.kind).or_insert_with(|| TaskScore {
            task: s.kind.name().to_string(),
            n: 0,
            correct: 0,
            accuracy: 0.0,
            answer_tokens: 0,
            correct_tokens: 0,
            token_accuracy: 0.0,
            by_depth: (0..depth_buckets)
                .map(|b| DepthBucket {
                    lo: b as f64 / depth_buckets as f64,
                    hi: (b + 1) as f64 / depth_buckets as f64,
                    n: 0,
                    correct: 0,
                    accuracy: None,
                })
                .collect(),
        });
        let right = pred.iter().zip(&s.tokens[s.answer.clone()]).filter(|(p, t)| p == t).count();
        let ok = right == s.answer.len();
        e.n += 1;
        e.correct += ok as usize;
        e.answer_tokens += s.answer.len();
        e.correct_tokens += right;
        let bucket = &mut e.by_depth[depth_bucket(s.depth, depth_buckets)];
        bucket.n += 1;
        bucket.correct += ok as usize;
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let tasks = per
        .into_values()
        .map(|mut t| {
            t.accuracy = ratio(t.correct, t.n);
            t.token_accuracy = ratio(t.correct_tokens, t.answer_tokens);
            for b in &mut t.by_depth {
                b.accuracy = (b.n > 0).then(|| ratio(b.correct, b.n));
            }
            t
        })
        .collect();
    Ok(TaskReport { depth_buckets, tasks })
}

/// The model's teacher-forced argmax predictions for every sample's answer tokens.
/// Samples of equal length run together, up to `SCORE_BATCH_TOKENS` tokens per pass.
pub fn predict(model: &Model, samples: &[TaskSample]) -> Result<Vec<Vec<u32>>> {
    let v = model.config.vocab_size;
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        ensure!(
            s.answer.start >= 1 && s.answer.start <= s.answer.end && s.answer.end <= s.tokens.len(),
            "sample {i}: answer range {:?} does not fit its {} tokens",
            s.answer,
            s.tokens.len()
        );
        by_len.entry(s.tokens.len()).or_default().push(i);
    }
    let mut preds = vec![Vec::new(); samples.len()];
    for (t, idx) in by_len {
        for chunk in idx.chunks((SCORE_BATCH_TOKENS / t).max(1)) {
            let ids: Vec<u32> = chunk.iter().flat_map(|&i| samples[i].tokens.iter().copied()).collect();
            let mut tape = Tape::inference(model.cpu());
            let pv = model.params_on(&mut tape);
            let logits = model.logits(&mut tape, &pv, &ids, chunk.len(), t)?;
            let z = tape.value(logits);
            for (row, &i) in chunk.iter().enumerate() {
                preds[i] =
                    samples[i].answer.clone().map(|p| argmax(&z[(row * t + p - 1) * v..(row * t + p) * v])).collect();
            }
        }
    }
    Ok(preds)
}

/// Teacher-forced accuracy of `model` on `samples`, per task and per depth bucket.
/// Raw logits suffice: the softcap is monotonic, so the argmax is the same.
pub fn score(model: &Model, samples: &[TaskSample], depth_buckets: usize) -> Result<TaskReport> {
    ensure!(depth_buckets >= 1, "depth_buckets must be at least 1");
    score_predictions(samples, &predict(model, samples)?, depth_buckets)
}

/// Index of the largest value (the first on ties; NaN never wins).
fn argmax(z: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in z.iter().enumerate() {
        if x > z[best] || z[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_never_uses_task_names() {
        let w = Words::new().unwrap();
        let fill = w.filler(&mut Rng::new(1), 5000);
        assert_eq!(fill.len(), 5000);
        assert!(fill.iter().all(|t| !w.keys.contains(t) && *t != w.holder && *t != w.mark && *t != BOS && *t != EOT));
        assert!(w.keys.len() >= RECALL_PAIRS && w.colors.len() == 12 && w.numbers.len() == 12);
        // The markers the module doc names.
        assert_eq!((w.lang.word(w.holder), w.lang.word(w.mark)), (Some("Vaploo"), Some("Plaglu")));
    }

    #[test]
    fn pieces_fit_at_the_minimum_length() {
        for kind in TaskKind::ALL {
            for seed in 0..50 {
                let s = generate(kind, 3, kind.min_len(), seed, None).unwrap();
                assert!(s.iter().all(|s| s.tokens.len() == kind.min_len()));
            }
            assert!(generate(kind, 1, kind.min_len() - 1, 0, None).is_err());
        }
    }

    #[test]
    fn buckets_and_argmax() {
        assert_eq!([0.0, 0.249, 0.25, 0.99, 1.0].map(|d| depth_bucket(d, 4)), [0, 0, 1, 3, 3]);
        assert_eq!(depth_bucket(0.7, 1), 0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }
}
