//! The embedded default dataset: a small synthetic "language" generated in-process.
//!
//! `nanoseek train` with no arguments trains on documents produced here, so a run
//! needs no downloads. The language is word-level (one token id = one word or one
//! punctuation mark), deterministic (the vocabulary and grammar never change; only
//! the sampled documents depend on a seed), cheap to generate, and has structure at
//! several ranges, so that the loss curve and the generated samples say something
//! about what the model has learned.
//!
//! # Vocabulary (2031 ids)
//!
//! * `0` = `<bos>`, `1` = `<eot>`, then the punctuation `.` `,` `?`.
//! * English function words (`the a some every many very is are and but because when
//!   in near with what where who how does live lives has likes like have yes no
//!   color of there named`), twelve colors (`red blue ...`) and the numbers
//!   `one` ... `twelve`.
//! * Pronounceable pseudo-words built from syllables by a fixed-seed generator:
//!   240 creature nouns, 280 thing nouns (each with a singular and a plural token:
//!   `brako` / `brakos`), 90 place nouns (singular only), 210 verbs in three classes
//!   (intransitive, "creature acts on a thing", "creature acts on a creature"; each
//!   with a plural/base token and a 3rd-person-singular token: `dalim` / `dalims`),
//!   180 adjectives (stem + `-ish -y -ic -ous -ful -al -en`) and 240 capitalised
//!   names (`Zorla`).
//!
//! Within each class, word frequencies are Zipf-like (weight `1 / (rank + 2.7)^1.05`).
//! Every noun, verb and adjective belongs to one of 12 topics; each document draws a
//! topic, and nouns (p = 0.6), verbs (0.5) and adjectives (0.3) are drawn from that
//! topic's words instead of the whole class, so the first content words of a
//! document predict the rest.
//!
//! # Grammar
//!
//! ```text
//! DOC      := <bos> INTRO BODY <eot>
//! INTRO    := for each of 1..4 entities (distinct name, kind, color, place):
//!               KIND_S FACT_S{1..3}
//! KIND_S   := NAME is a [ADJ] KIND .  |  there is a [ADJ] KIND named NAME .
//! FACT_S   := NAME is COLOR .  |  the color of NAME is COLOR .
//!           | NAME lives in the PLACE .
//!           | NAME has NUMBER THING(number agrees) .
//!           | NAME likes NAME2 .
//! BODY     := 3..20 sentences (at least until the document has 50 tokens, at most
//!             ~360 tokens), each one of
//!               QUESTION ANSWER      (about a fact stated earlier in this document)
//!             | FACT_S               (a not-yet-stated fact of an entity)
//!             | CLAUSE [, and|but CLAUSE | because CLAUSE] .
//!             | when CLAUSE , CLAUSE .  |  in the PLACE , CLAUSE .
//! CLAUSE   := SUBJ(number n) VP(n)
//! SUBJ     := NP(creature) [near|with NP]      (the attractor NP has its own number)
//!           | NAME  (n = sg)  |  NAME and NAME2  (n = pl)
//! NP       := DET(n) [[very] ADJ] NOUN(n)      DET: the a every / the some many 2..6
//! VP(n)    := V_intr(n) [in the PLACE]  |  V_thing(n) NP(thing)
//!           | V_creature(n) (NP(creature) | NAME)  |  is|are [very] ADJ|COLOR
//! ```
//!
//! Verbs agree in number with the head of the subject (`the brako near the telis
//! dalims .`, `Zorla and Mibu dalim .`). Clauses about an entity prefer its own
//! home (`in the PLACE`) and its own things as objects.
//!
//! Questions and answers (always consistent with the facts stated earlier):
//!
//! ```text
//! what is NAME ? a KIND .                 what color is NAME ? COLOR .
//! is NAME COLOR ? yes .                   is NAME COLOR ? no , NAME is COLOR .
//! who is COLOR ? NAME .                   where does NAME live ? in the PLACE .
//! who lives in the PLACE ? NAME .         how many THINGS does NAME have ? NUMBER .
//! who does NAME like ? NAME2 .
//! ```
//!
//! Answering needs attention back to the introduction (often 100+ tokens earlier),
//! which is the long-range dependency the default run is meant to exercise. Names
//! are drawn uniformly, so any later mention of a name can only be predicted by
//! copying it from the context.

use crate::rng::Rng;
use std::collections::{HashMap, HashSet};

/// Begins every document.
pub const BOS: u32 = 0;
/// Ends every document.
pub const EOT: u32 = 1;

const N_TOPICS: usize = 12;
const N_CREATURES: usize = 240;
const N_THINGS: usize = 280;
const N_PLACES: usize = 90;
const N_V_INTR: usize = 60;
const N_V_THING: usize = 90;
const N_V_CREATURE: usize = 60;
const N_ADJ: usize = 180;
const N_NAMES: usize = 240;

const P_TOPIC_NOUN: f64 = 0.6;
const P_TOPIC_VERB: f64 = 0.5;
const P_TOPIC_ADJ: f64 = 0.3;

/// Fixed seed of the word generator: the vocabulary never changes.
const LEXICON_SEED: u64 = 0x5eed_1a46_0a6e_0f00;

/// Soft cap on document length, checked before each body sentence.
const BODY_CAP: usize = 360;
const MIN_DOC: usize = 50;

const PUNCT: [&str; 3] = [".", ",", "?"];
const FUNCTION_WORDS: [&str; 32] = [
    "the", "a", "some", "every", "many", "very", "is", "are", "and", "but", "because", "when", "in", "near", "with",
    "what", "where", "who", "how", "does", "live", "lives", "has", "likes", "like", "have", "yes", "no", "color", "of",
    "there", "named",
];
const COLORS: [&str; 12] =
    ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink", "silver"];
const NUMBERS: [&str; 12] =
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];

const ONSETS: [&str; 26] = [
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl", "sk",
    "st", "tr", "th", "sh", "ch",
];
const VOWELS: [&str; 13] = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ou", "ee", "oo"];
const CODAS: [&str; 10] = ["n", "r", "l", "m", "k", "s", "t", "sh", "nd", "rk"];
const ADJ_SUFFIXES: [&str; 7] = ["ish", "y", "ic", "ous", "ful", "al", "en"];

/// One word of an inflecting class: `sg` is the singular (noun) or 3rd-person
/// singular (verb) token, `pl` the plural / base form. Equal for uninflected words.
#[derive(Clone, Copy, Debug)]
struct Lex {
    sg: u32,
    pl: u32,
}

impl Lex {
    fn form(self, plural: bool) -> u32 {
        if plural {
            self.pl
        } else {
            self.sg
        }
    }
}

/// Zipf-weighted sampler over a list of indices (cumulative weights + binary search).
#[derive(Clone, Debug)]
struct Table {
    cum: Vec<f64>,
    items: Vec<usize>,
}

impl Table {
    fn zipf(items: Vec<usize>) -> Self {
        let mut cum = Vec::with_capacity(items.len());
        let mut total = 0.0;
        for r in 0..items.len() {
            total += 1.0 / (r as f64 + 2.7).powf(1.05);
            cum.push(total);
        }
        Table { cum, items }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let total = *self.cum.last().expect("empty table");
        let u = rng.uniform() * total;
        let i = self.cum.partition_point(|&c| c <= u);
        self.items[i.min(self.items.len() - 1)]
    }
}

/// A word class with a global Zipf table and one Zipf table per topic.
#[derive(Clone, Debug)]
struct Class {
    lex: Vec<Lex>,
    global: Table,
    by_topic: Vec<Table>,
}

impl Class {
    fn new(lex: Vec<Lex>) -> Self {
        let n = lex.len();
        let global = Table::zipf((0..n).collect());
        let by_topic = (0..N_TOPICS).map(|t| Table::zipf((t..n).step_by(N_TOPICS).collect())).collect();
        Class { lex, global, by_topic }
    }

    /// Index of a word, from the topic's table with probability `p_topic`.
    fn pick(&self, rng: &mut Rng, topic: usize, p_topic: f64) -> usize {
        if rng.uniform() < p_topic {
            self.by_topic[topic].sample(rng)
        } else {
            self.global.sample(rng)
        }
    }
}

/// Ids of the fixed (English) words.
#[derive(Clone, Copy, Debug)]
struct Fixed {
    period: u32,
    comma: u32,
    question: u32,
    the: u32,
    a: u32,
    some: u32,
    every: u32,
    many: u32,
    very: u32,
    is: u32,
    are: u32,
    and: u32,
    but: u32,
    because: u32,
    when: u32,
    in_: u32,
    near: u32,
    with: u32,
    what: u32,
    where_: u32,
    who: u32,
    how: u32,
    does: u32,
    live: u32,
    lives: u32,
    has: u32,
    likes: u32,
    like: u32,
    have: u32,
    yes: u32,
    no: u32,
    color: u32,
    of: u32,
    there: u32,
    named: u32,
}

/// The kinds of fact an entity can have stated about it (its kind is always stated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fact {
    Kind,
    Color,
    Place,
    Count,
    Likes,
}

/// A named entity of one document.
#[derive(Clone, Debug)]
struct Entity {
    name: u32,
    kind: usize,
    color: usize,
    place: usize,
    count: usize,
    thing: usize,
    likes: Option<usize>,
    stated: Vec<Fact>,
    unstated: Vec<Fact>,
}

/// The synthetic language: vocabulary and grammar tables.
#[derive(Clone, Debug)]
pub struct SyntheticLanguage {
    words: Vec<String>,
    index: HashMap<String, u32>,
    f: Fixed,
    colors: Vec<u32>,
    numbers: Vec<u32>,
    names: Vec<u32>,
    creatures: Class,
    things: Class,
    places: Class,
    v_intr: Class,
    v_thing: Class,
    v_creature: Class,
    adjs: Class,
}

/// Builds pronounceable pseudo-words, never repeating a string.
struct WordMaker {
    rng: Rng,
    used: HashSet<String>,
}

impl WordMaker {
    fn syllable(&mut self, s: &mut String) {
        s.push_str(ONSETS[self.rng.below(ONSETS.len())]);
        s.push_str(VOWELS[self.rng.below(VOWELS.len())]);
    }

    fn coda(&mut self, s: &mut String) {
        s.push_str(CODAS[self.rng.below(CODAS.len())]);
    }

    fn n_syllables(&mut self) -> usize {
        match self.rng.below(10) {
            0..=1 => 1,
            2..=8 => 2,
            _ => 3,
        }
    }

    /// Tries candidates from `make` until all of its forms are unused; reserves them.
    fn fresh(&mut self, make: impl Fn(&mut Self) -> Vec<String>) -> Vec<String> {
        loop {
            let forms = make(self);
            let distinct: HashSet<&String> = forms.iter().collect();
            if distinct.len() == forms.len() && forms.iter().all(|w| w.len() >= 3 && !self.used.contains(w)) {
                for w in &forms {
                    self.used.insert(w.clone());
                }
                return forms;
            }
        }
    }

    fn noun(&mut self) -> (String, String) {
        let f = self.fresh(|m| {
            let mut s = String::new();
            for _ in 0..m.n_syllables() {
                m.syllable(&mut s);
            }
            if m.rng.uniform() < 0.4 {
                m.coda(&mut s);
            }
            let p = plural(&s);
            vec![s, p]
        });
        (f[0].clone(), f[1].clone())
    }

    fn place(&mut self) -> String {
        self.fresh(|m| {
            let mut s = String::new();
            for _ in 0..m.n_syllables().max(2) {
                m.syllable(&mut s);
            }
            m.coda(&mut s);
            vec![s]
        })
        .remove(0)
    }

    /// Returns (3rd person singular, base form).
    fn verb(&mut self) -> (String, String) {
        let f = self.fresh(|m| {
            let mut s = String::new();
            for _ in 0..m.n_syllables().min(2) {
                m.syllable(&mut s);
            }
            m.coda(&mut s);
            let sg = plural(&s);
            vec![sg, s]
        });
        (f[0].clone(), f[1].clone())
    }

    fn adjective(&mut self) -> String {
        self.fresh(|m| {
            let mut s = String::new();
            for _ in 0..m.n_syllables().min(2) {
                m.syllable(&mut s);
            }
            if s.ends_with(|c: char| "aeiou".contains(c)) {
                s.pop();
            }
            s.push_str(ADJ_SUFFIXES[m.rng.below(ADJ_SUFFIXES.len())]);
            vec![s]
        })
        .remove(0)
    }

    fn name(&mut self) -> String {
        self.fresh(|m| {
            let mut s = String::new();
            m.syllable(&mut s);
            m.syllable(&mut s);
            if m.rng.uniform() < 0.3 {
                m.coda(&mut s);
            }
            let mut c = s.chars();
            let first = c.next().unwrap().to_ascii_uppercase();
            vec![std::iter::once(first).chain(c).collect()]
        })
        .remove(0)
    }
}

/// English-like `-s` / `-es` suffix (noun plural, verb 3rd person singular).
fn plural(s: &str) -> String {
    if s.ends_with('s') || s.ends_with("sh") || s.ends_with("ch") {
        format!("{s}es")
    } else {
        format!("{s}s")
    }
}

impl Default for SyntheticLanguage {
    fn default() -> Self {
        Self::new()
    }
}

impl SyntheticLanguage {
    /// Deterministic: always the same vocabulary and grammar (no seed needed).
    pub fn new() -> Self {
        let mut words: Vec<String> = Vec::new();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut add = |w: &str, words: &mut Vec<String>| -> u32 {
            let id = words.len() as u32;
            assert!(index.insert(w.to_string(), id).is_none(), "duplicate word {w}");
            words.push(w.to_string());
            id
        };
        add("<bos>", &mut words);
        add("<eot>", &mut words);
        for w in PUNCT.iter().chain(FUNCTION_WORDS.iter()) {
            add(w, &mut words);
        }
        let colors: Vec<u32> = COLORS.iter().map(|w| add(w, &mut words)).collect();
        let numbers: Vec<u32> = NUMBERS.iter().map(|w| add(w, &mut words)).collect();

        let mut maker = WordMaker { rng: Rng::new(LEXICON_SEED), used: words.iter().cloned().collect() };
        let names: Vec<u32> = (0..N_NAMES)
            .map(|_| {
                let w = maker.name();
                add(&w, &mut words)
            })
            .collect();
        let mut nouns = |n: usize, words: &mut Vec<String>| -> Vec<Lex> {
            (0..n)
                .map(|_| {
                    let (sg, pl) = maker.noun();
                    Lex { sg: add(&sg, words), pl: add(&pl, words) }
                })
                .collect()
        };
        let creatures = nouns(N_CREATURES, &mut words);
        let things = nouns(N_THINGS, &mut words);
        let places: Vec<Lex> = (0..N_PLACES)
            .map(|_| {
                let id = add(&maker.place(), &mut words);
                Lex { sg: id, pl: id }
            })
            .collect();
        let mut verbs = |n: usize, words: &mut Vec<String>| -> Vec<Lex> {
            (0..n)
                .map(|_| {
                    let (sg, pl) = maker.verb();
                    Lex { sg: add(&sg, words), pl: add(&pl, words) }
                })
                .collect()
        };
        let v_intr = verbs(N_V_INTR, &mut words);
        let v_thing = verbs(N_V_THING, &mut words);
        let v_creature = verbs(N_V_CREATURE, &mut words);
        let adjs: Vec<Lex> = (0..N_ADJ)
            .map(|_| {
                let id = add(&maker.adjective(), &mut words);
                Lex { sg: id, pl: id }
            })
            .collect();

        let id = |w: &str| index[w];
        let f = Fixed {
            period: id("."),
            comma: id(","),
            question: id("?"),
            the: id("the"),
            a: id("a"),
            some: id("some"),
            every: id("every"),
            many: id("many"),
            very: id("very"),
            is: id("is"),
            are: id("are"),
            and: id("and"),
            but: id("but"),
            because: id("because"),
            when: id("when"),
            in_: id("in"),
            near: id("near"),
            with: id("with"),
            what: id("what"),
            where_: id("where"),
            who: id("who"),
            how: id("how"),
            does: id("does"),
            live: id("live"),
            lives: id("lives"),
            has: id("has"),
            likes: id("likes"),
            like: id("like"),
            have: id("have"),
            yes: id("yes"),
            no: id("no"),
            color: id("color"),
            of: id("of"),
            there: id("there"),
            named: id("named"),
        };
        assert!(words.len() <= 4096);
        SyntheticLanguage {
            words,
            index,
            f,
            colors,
            numbers,
            names,
            creatures: Class::new(creatures),
            things: Class::new(things),
            places: Class::new(places),
            v_intr: Class::new(v_intr),
            v_thing: Class::new(v_thing),
            v_creature: Class::new(v_creature),
            adjs: Class::new(adjs),
        }
    }

    /// Number of distinct token ids used (≤ 4096); ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.words.len()
    }

    /// Token id of a word, if it exists.
    pub fn token(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// The word of a token id, if it exists.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// One document: BOS, sentences..., EOT. Length 50..=400 tokens.
    pub fn document(&self, rng: &mut Rng) -> Vec<u32> {
        let mut out = Vec::with_capacity(256);
        self.write_document(rng, &mut out);
        out
    }

    /// Concatenated documents until at least `n_tokens`, truncated to exactly
    /// `n_tokens`. Deterministic in `seed`.
    pub fn stream(&self, seed: u64, n_tokens: usize) -> Vec<u32> {
        let mut rng = Rng::derive(seed, "synthetic-stream");
        let mut out = Vec::with_capacity(n_tokens + 512);
        while out.len() < n_tokens {
            self.write_document(&mut rng, &mut out);
        }
        out.truncate(n_tokens);
        out
    }

    /// Human-readable text: words joined by spaces, no space before punctuation,
    /// `<bos>` shown as such, `<eot>` followed by a newline, unknown ids as `<unk:ID>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::with_capacity(ids.len() * 6);
        for &id in ids {
            let unk;
            let w: &str = match self.words.get(id as usize) {
                Some(w) => w,
                None => {
                    unk = format!("<unk:{id}>");
                    &unk
                }
            };
            let punct = matches!(w, "." | "," | "?");
            if !s.is_empty() && !s.ends_with('\n') && !punct {
                s.push(' ');
            }
            s.push_str(w);
            if id == EOT {
                s.push('\n');
            }
        }
        s
    }

    // ----- generation -------------------------------------------------------------

    fn write_document(&self, rng: &mut Rng, out: &mut Vec<u32>) {
        let start = out.len();
        out.push(BOS);
        let topic = rng.below(N_TOPICS);
        let n_ent = [1, 2, 2, 3, 3, 4][rng.below(6)];
        let mut ents = self.make_entities(rng, topic, n_ent);

        // Introduction: every entity's kind, then one to three more facts.
        for e in 0..ents.len() {
            self.state_fact(rng, &mut ents, e, Fact::Kind, out);
            let k = 1 + rng.below(3);
            for _ in 0..k {
                if ents[e].unstated.is_empty() {
                    break;
                }
                let i = rng.below(ents[e].unstated.len());
                let fact = ents[e].unstated.swap_remove(i);
                self.state_fact(rng, &mut ents, e, fact, out);
            }
        }

        // Body.
        let n_body = 3 + rng.below(18);
        let mut i = 0;
        while (i < n_body || out.len() - start < MIN_DOC) && out.len() - start < BODY_CAP {
            let r = rng.uniform();
            if r < 0.3 {
                let e = rng.below(ents.len());
                self.question(rng, &ents, e, out);
            } else if r < 0.36 {
                let e = rng.below(ents.len());
                if !ents[e].unstated.is_empty() {
                    let j = rng.below(ents[e].unstated.len());
                    let fact = ents[e].unstated.swap_remove(j);
                    self.state_fact(rng, &mut ents, e, fact, out);
                }
            } else {
                self.sentence(rng, topic, &ents, out);
            }
            i += 1;
        }
        out.push(EOT);
    }

    fn make_entities(&self, rng: &mut Rng, topic: usize, n: usize) -> Vec<Entity> {
        let mut ents: Vec<Entity> = Vec::with_capacity(n);
        for _ in 0..n {
            let name = loop {
                let c = self.names[rng.below(self.names.len())];
                if ents.iter().all(|e| e.name != c) {
                    break c;
                }
            };
            let kind = loop {
                let c = self.creatures.pick(rng, topic, 0.7);
                if ents.iter().all(|e| e.kind != c) {
                    break c;
                }
            };
            let color = loop {
                let c = rng.below(self.colors.len());
                if ents.iter().all(|e| e.color != c) {
                    break c;
                }
            };
            let place = loop {
                let c = self.places.pick(rng, topic, P_TOPIC_NOUN);
                if ents.iter().all(|e| e.place != c) {
                    break c;
                }
            };
            let count = 1 + rng.below(9);
            let thing = self.things.pick(rng, topic, P_TOPIC_NOUN);
            ents.push(Entity {
                name,
                kind,
                color,
                place,
                count,
                thing,
                likes: None,
                stated: Vec::new(),
                unstated: vec![Fact::Color, Fact::Place, Fact::Count],
            });
        }
        if n > 1 {
            for (e, ent) in ents.iter_mut().enumerate() {
                let other = (e + 1 + rng.below(n - 1)) % n;
                ent.likes = Some(other);
                ent.unstated.push(Fact::Likes);
            }
        }
        ents
    }

    fn state_fact(&self, rng: &mut Rng, ents: &mut [Entity], e: usize, fact: Fact, out: &mut Vec<u32>) {
        let f = &self.f;
        let ent = &ents[e];
        match fact {
            Fact::Kind => {
                let mut np = vec![f.a];
                if rng.uniform() < 0.4 {
                    np.push(self.adjs.lex[self.adjs.global.sample(rng)].sg);
                }
                np.push(self.creatures.lex[ent.kind].sg);
                if rng.uniform() < 0.5 {
                    out.extend_from_slice(&[ent.name, f.is]);
                    out.extend_from_slice(&np);
                } else {
                    out.extend_from_slice(&[f.there, f.is]);
                    out.extend_from_slice(&np);
                    out.extend_from_slice(&[f.named, ent.name]);
                }
            }
            Fact::Color => {
                let c = self.colors[ent.color];
                if rng.uniform() < 0.7 {
                    out.extend_from_slice(&[ent.name, f.is, c]);
                } else {
                    out.extend_from_slice(&[f.the, f.color, f.of, ent.name, f.is, c]);
                }
            }
            Fact::Place => {
                let p = self.places.lex[ent.place].sg;
                out.extend_from_slice(&[ent.name, f.lives, f.in_, f.the, p]);
            }
            Fact::Count => {
                let t = self.things.lex[ent.thing].form(ent.count > 1);
                out.extend_from_slice(&[ent.name, f.has, self.numbers[ent.count - 1], t]);
            }
            Fact::Likes => {
                let other = ents[ent.likes.expect("likes fact without a liked entity")].name;
                out.extend_from_slice(&[ent.name, f.likes, other]);
            }
        }
        out.push(f.period);
        ents[e].stated.push(fact);
    }

    fn question(&self, rng: &mut Rng, ents: &[Entity], e: usize, out: &mut Vec<u32>) {
        let f = &self.f;
        let ent = &ents[e];
        let fact = ent.stated[rng.below(ent.stated.len())];
        match fact {
            Fact::Kind => {
                let k = self.creatures.lex[ent.kind].sg;
                out.extend_from_slice(&[f.what, f.is, ent.name, f.question, f.a, k]);
            }
            Fact::Color => {
                let c = self.colors[ent.color];
                let r = rng.uniform();
                if r < 0.4 {
                    out.extend_from_slice(&[f.what, f.color, f.is, ent.name, f.question, c]);
                } else if r < 0.7 {
                    let asked = if rng.uniform() < 0.5 {
                        ent.color
                    } else {
                        (ent.color + 1 + rng.below(self.colors.len() - 1)) % self.colors.len()
                    };
                    out.extend_from_slice(&[f.is, ent.name, self.colors[asked], f.question]);
                    if asked == ent.color {
                        out.push(f.yes);
                    } else {
                        out.extend_from_slice(&[f.no, f.comma, ent.name, f.is, c]);
                    }
                } else {
                    out.extend_from_slice(&[f.who, f.is, c, f.question, ent.name]);
                }
            }
            Fact::Place => {
                let p = self.places.lex[ent.place].sg;
                if rng.uniform() < 0.6 {
                    out.extend_from_slice(&[f.where_, f.does, ent.name, f.live, f.question]);
                    out.extend_from_slice(&[f.in_, f.the, p]);
                } else {
                    out.extend_from_slice(&[f.who, f.lives, f.in_, f.the, p, f.question, ent.name]);
                }
            }
            Fact::Count => {
                let t = self.things.lex[ent.thing].pl;
                out.extend_from_slice(&[f.how, f.many, t, f.does, ent.name, f.have, f.question]);
                out.push(self.numbers[ent.count - 1]);
            }
            Fact::Likes => {
                let other = ents[ent.likes.expect("likes fact without a liked entity")].name;
                out.extend_from_slice(&[f.who, f.does, ent.name, f.like, f.question, other]);
            }
        }
        out.push(f.period);
    }

    fn sentence(&self, rng: &mut Rng, topic: usize, ents: &[Entity], out: &mut Vec<u32>) {
        let f = &self.f;
        let r = rng.uniform();
        if r < 0.08 {
            out.extend_from_slice(&[f.when]);
            self.clause(rng, topic, ents, out);
            out.push(f.comma);
            self.clause(rng, topic, ents, out);
        } else if r < 0.16 {
            let p = self.places.lex[self.places.pick(rng, topic, P_TOPIC_NOUN)].sg;
            out.extend_from_slice(&[f.in_, f.the, p, f.comma]);
            self.clause(rng, topic, ents, out);
        } else {
            self.clause(rng, topic, ents, out);
            let r = rng.uniform();
            if r < 0.12 {
                out.extend_from_slice(&[f.comma, if rng.uniform() < 0.6 { f.and } else { f.but }]);
                self.clause(rng, topic, ents, out);
            } else if r < 0.2 {
                out.push(f.because);
                self.clause(rng, topic, ents, out);
            }
        }
        out.push(f.period);
    }

    fn clause(&self, rng: &mut Rng, topic: usize, ents: &[Entity], out: &mut Vec<u32>) {
        if rng.uniform() < 0.35 {
            // About one or two of the document's entities.
            let e = rng.below(ents.len());
            if ents.len() > 1 && rng.uniform() < 0.25 {
                let e2 = (e + 1 + rng.below(ents.len() - 1)) % ents.len();
                out.extend_from_slice(&[ents[e].name, self.f.and, ents[e2].name]);
                self.vp(rng, topic, true, ents, &[e, e2], out);
            } else {
                out.push(ents[e].name);
                self.vp(rng, topic, false, ents, &[e], out);
            }
        } else {
            let plural = rng.uniform() < 0.4;
            self.np(rng, topic, &self.creatures, plural, out);
            if rng.uniform() < 0.15 {
                // An attractor noun between subject and verb, with its own number.
                out.push(if rng.uniform() < 0.5 { self.f.near } else { self.f.with });
                let class = if rng.uniform() < 0.5 { &self.things } else { &self.creatures };
                let attractor_plural = rng.uniform() < 0.5;
                self.np(rng, topic, class, attractor_plural, out);
            }
            self.vp(rng, topic, plural, ents, &[], out);
        }
    }

    fn np(&self, rng: &mut Rng, topic: usize, class: &Class, plural: bool, out: &mut Vec<u32>) {
        let f = &self.f;
        let r = rng.uniform();
        if plural {
            if r < 0.5 {
                out.push(f.the);
            } else if r < 0.75 {
                out.push(f.some);
            } else if r < 0.9 {
                out.push(f.many);
            } else {
                out.push(self.numbers[1 + rng.below(5)]);
            }
        } else if r < 0.6 {
            out.push(f.the);
        } else if r < 0.9 {
            out.push(f.a);
        } else {
            out.push(f.every);
        }
        if rng.uniform() < 0.25 {
            if rng.uniform() < 0.15 {
                out.push(f.very);
            }
            out.push(self.adjs.lex[self.adjs.pick(rng, topic, P_TOPIC_ADJ)].sg);
        }
        out.push(class.lex[class.pick(rng, topic, P_TOPIC_NOUN)].form(plural));
    }

    /// Verb phrase agreeing with a subject of the given number. `subj` are the
    /// entities the subject names (if any): the first one's home and things are
    /// preferred, and a named object is never one of the subjects.
    fn vp(&self, rng: &mut Rng, topic: usize, plural: bool, ents: &[Entity], subj: &[usize], out: &mut Vec<u32>) {
        let f = &self.f;
        let ent = subj.first().copied();
        let r = rng.uniform();
        if r < 0.3 {
            out.push(self.v_intr.lex[self.v_intr.pick(rng, topic, P_TOPIC_VERB)].form(plural));
            if rng.uniform() < 0.3 {
                let p = match ent {
                    Some(e) if rng.uniform() < 0.7 => ents[e].place,
                    _ => self.places.pick(rng, topic, P_TOPIC_NOUN),
                };
                out.extend_from_slice(&[f.in_, f.the, self.places.lex[p].sg]);
            }
        } else if r < 0.6 {
            out.push(self.v_thing.lex[self.v_thing.pick(rng, topic, P_TOPIC_VERB)].form(plural));
            match ent {
                Some(e) if rng.uniform() < 0.4 => {
                    let t = self.things.lex[ents[e].thing].form(ents[e].count > 1);
                    out.extend_from_slice(&[f.the, t]);
                }
                _ => {
                    let obj_plural = rng.uniform() < 0.4;
                    self.np(rng, topic, &self.things, obj_plural, out);
                }
            }
        } else if r < 0.8 {
            let v = self.v_creature.pick(rng, topic, P_TOPIC_VERB);
            out.push(self.v_creature.lex[v].form(plural));
            match ent {
                Some(_) if ents.len() > subj.len() && rng.uniform() < 0.5 => {
                    let o = loop {
                        let o = rng.below(ents.len());
                        if !subj.contains(&o) {
                            break o;
                        }
                    };
                    out.push(ents[o].name);
                }
                _ => {
                    let obj_plural = rng.uniform() < 0.4;
                    self.np(rng, topic, &self.creatures, obj_plural, out);
                }
            }
        } else {
            out.push(if plural { f.are } else { f.is });
            if ent.is_none() && rng.uniform() < 0.2 {
                out.push(self.colors[rng.below(self.colors.len())]);
            } else {
                if rng.uniform() < 0.2 {
                    out.push(f.very);
                }
                out.push(self.adjs.lex[self.adjs.pick(rng, topic, P_TOPIC_ADJ)].sg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index ranges of the complete documents (BOS..=EOT) in a stream.
    fn split_docs(stream: &[u32]) -> Vec<std::ops::RangeInclusive<usize>> {
        let mut docs = Vec::new();
        let mut start = None;
        for (i, &t) in stream.iter().enumerate() {
            if t == BOS {
                start = Some(i);
            } else if t == EOT {
                if let Some(s) = start.take() {
                    docs.push(s..=i);
                }
            }
        }
        docs
    }

    #[test]
    fn vocabulary_is_fixed_and_consistent() {
        let a = SyntheticLanguage::new();
        let b = SyntheticLanguage::default();
        assert_eq!(a.words, b.words);
        assert!(a.vocab_size() <= 4096);
        for (i, w) in a.words.iter().enumerate() {
            assert_eq!(a.token(w), Some(i as u32));
            assert!(!w.is_empty() && !w.contains(char::is_whitespace), "bad word {w:?}");
        }
        assert_eq!(a.token("<bos>"), Some(BOS));
        assert_eq!(a.token("<eot>"), Some(EOT));
        assert_eq!(a.token("red"), Some(a.colors[0]));
        assert_eq!(a.token("no-such-word"), None);
        println!("vocab size: {}", a.vocab_size());
    }

    #[test]
    fn stream_is_deterministic_in_seed() {
        let lang = SyntheticLanguage::new();
        let a = lang.stream(42, 10_000);
        let b = lang.stream(42, 10_000);
        let c = lang.stream(43, 10_000);
        assert_eq!(a.len(), 10_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(lang.stream(42, 0).len(), 0);
        assert_eq!(lang.stream(42, 1), vec![BOS]);
        let mut r1 = Rng::new(5);
        let mut r2 = Rng::new(5);
        assert_eq!(lang.document(&mut r1), lang.document(&mut r2));
    }

    #[test]
    fn ids_in_range_and_documents_framed() {
        let lang = SyntheticLanguage::new();
        let v = lang.vocab_size() as u32;
        let mut rng = Rng::new(1);
        let mut total = 0;
        for _ in 0..2000 {
            let d = lang.document(&mut rng);
            assert_eq!(d[0], BOS);
            assert_eq!(*d.last().unwrap(), EOT);
            assert!((MIN_DOC..=400).contains(&d.len()), "document length {}", d.len());
            assert!(d[1..d.len() - 1].iter().all(|&t| t != BOS && t != EOT));
            assert!(d.iter().all(|&t| t < v));
            total += d.len();
        }
        println!("mean document length: {:.1} tokens", total as f64 / 2000.0);
        let s = lang.stream(9, 50_000);
        assert!(s.iter().all(|&t| t < v));
        assert_eq!(s[0], BOS);
    }

    #[test]
    fn decode_is_readable() {
        let lang = SyntheticLanguage::new();
        let mut rng = Rng::new(3);
        let d = lang.document(&mut rng);
        let text = lang.decode(&d);
        println!("{text}");
        assert!(text.starts_with("<bos> "));
        assert!(text.ends_with("<eot>\n"));
        assert!(!text.contains(" ."));
        assert!(!text.contains(" ?"));
        assert!(!text.contains(" ,"));
        assert!(text.split_whitespace().count() > 20);
        let the = lang.token("the").unwrap();
        let red = lang.token("red").unwrap();
        let dot = lang.token(".").unwrap();
        assert_eq!(lang.decode(&[the, red, dot, 99_999]), "the red. <unk:99999>");
        assert_eq!(lang.decode(&[BOS, the, EOT, BOS]), "<bos> the <eot>\n<bos>");
        assert_eq!(lang.decode(&[]), "");
    }

    /// Known facts about the names of one document, gathered by parsing its text.
    #[derive(Default)]
    struct Facts<'a> {
        color: HashMap<&'a str, &'a str>,
        kind: HashMap<&'a str, &'a str>,
        place: HashMap<&'a str, &'a str>,
        count: HashMap<&'a str, (&'a str, &'a str)>,
        likes: HashMap<&'a str, &'a str>,
    }

    fn record<'a>(map: &mut HashMap<&'a str, &'a str>, k: &'a str, v: &'a str) {
        if let Some(old) = map.insert(k, v) {
            assert_eq!(old, v, "contradicting facts about {k}");
        }
    }

    /// Parses every document's statements and checks every answer against the facts
    /// stated earlier in the same document.
    #[test]
    fn answers_match_earlier_facts() {
        let lang = SyntheticLanguage::new();
        let is_color = |w: &str| COLORS.contains(&w);
        let is_name = |w: &str| w.starts_with(|c: char| c.is_ascii_uppercase());
        // plural -> singular for thing nouns, and numbers
        let mut singular: HashMap<&str, &str> = HashMap::new();
        for l in &lang.things.lex {
            singular.insert(&lang.words[l.pl as usize], &lang.words[l.sg as usize]);
            singular.insert(&lang.words[l.sg as usize], &lang.words[l.sg as usize]);
        }
        let stream = lang.stream(11, 300_000);
        let words: Vec<&str> = stream.iter().map(|&t| lang.words[t as usize].as_str()).collect();
        let mut checked: HashMap<&str, usize> = HashMap::new();
        let mut n_docs = 0;
        for doc in split_docs(&stream) {
            n_docs += 1;
            let w = &words[doc.start() + 1..*doc.end()];
            let mut facts = Facts::default();
            for sent in w.split(|&x| x == ".") {
                if sent.is_empty() {
                    continue;
                }
                let (statement, question, answer) = match sent.iter().position(|&x| x == "?") {
                    Some(q) => {
                        let ans = &sent[q + 1..];
                        // "no , NAME is COLOR" restates a fact: parse it as a statement.
                        let st: &[&str] = if ans.len() > 2 && ans[0] == "no" { &ans[2..] } else { &[] };
                        (st, Some(&sent[..q]), ans)
                    }
                    None => (sent, None, &[][..]),
                };
                match statement {
                    [n, "is", c] if is_name(n) && is_color(c) => record(&mut facts.color, n, c),
                    ["the", "color", "of", n, "is", c] => record(&mut facts.color, n, c),
                    [n, "is", "a", .., k] if is_name(n) => record(&mut facts.kind, n, k),
                    ["there", "is", "a", .., k, "named", n] => record(&mut facts.kind, n, k),
                    [n, "lives", "in", "the", p] => record(&mut facts.place, n, p),
                    [n, "has", num, t] if is_name(n) => {
                        let v = (*num, singular[t]);
                        if let Some(old) = facts.count.insert(n, v) {
                            assert_eq!(old, v);
                        }
                    }
                    [n, "likes", m] => record(&mut facts.likes, n, m),
                    _ => {}
                }
                let Some(q) = question else { continue };
                let kind = match (q, answer) {
                    (["what", "is", n], ["a", k]) => {
                        assert_eq!(facts.kind[n], *k);
                        "kind"
                    }
                    (["what", "color", "is", n], [c]) => {
                        assert_eq!(facts.color[n], *c);
                        "color"
                    }
                    (["is", n, c], ["yes"]) => {
                        assert_eq!(facts.color[n], *c);
                        "yes"
                    }
                    (["is", n, c], ["no", ",", n2, "is", c2]) => {
                        assert_ne!(facts.color[n], *c);
                        assert_eq!(n, n2);
                        assert_eq!(facts.color[n], *c2);
                        "no"
                    }
                    (["who", "is", c], [n]) => {
                        assert_eq!(facts.color[n], *c);
                        assert_eq!(facts.color.values().filter(|&&v| v == *c).count(), 1);
                        "who-color"
                    }
                    (["where", "does", n, "live"], ["in", "the", p]) => {
                        assert_eq!(facts.place[n], *p);
                        "place"
                    }
                    (["who", "lives", "in", "the", p], [n]) => {
                        assert_eq!(facts.place[n], *p);
                        "who-place"
                    }
                    (["how", "many", t, "does", n, "have"], [num]) => {
                        assert_eq!(facts.count[n], (*num, singular[t]));
                        "count"
                    }
                    (["who", "does", n, "like"], [m]) => {
                        assert_eq!(facts.likes[n], *m);
                        "likes"
                    }
                    _ => panic!("unparsed question {q:?} -> {answer:?}"),
                };
                *checked.entry(kind).or_default() += 1;
            }
        }
        println!("checked answers in {n_docs} documents: {checked:?}");
        for k in ["kind", "color", "yes", "no", "who-color", "place", "who-place", "count", "likes"] {
            assert!(checked.get(k).copied().unwrap_or(0) > 50, "too few {k} questions");
        }
    }

    #[test]
    fn subject_verb_agreement() {
        // Generic subjects "DET [very] [ADJ] NOUN [near|with DET [very] [ADJ] NOUN] VERB":
        // the verb agrees with the head noun, not with the attractor.
        let lang = SyntheticLanguage::new();
        let mut number: HashMap<u32, bool> = HashMap::new(); // creature/thing token -> plural
        for l in lang.creatures.lex.iter().chain(&lang.things.lex) {
            number.insert(l.sg, false);
            number.insert(l.pl, true);
        }
        let mut verb: HashMap<u32, bool> = HashMap::new();
        for c in [&lang.v_intr, &lang.v_thing, &lang.v_creature] {
            for l in &c.lex {
                verb.insert(l.sg, false);
                verb.insert(l.pl, true);
            }
        }
        let adj: HashSet<u32> = lang.adjs.lex.iter().map(|l| l.sg).collect();
        let f = lang.f;
        // Start of the noun phrase ending at `i` (the determiner's position).
        let np_start = |s: &[u32], mut i: usize| {
            i -= 1;
            while adj.contains(&s[i]) || s[i] == f.very {
                i -= 1;
            }
            i
        };
        let s = lang.stream(5, 200_000);
        let (mut plain, mut attracted, mut mismatched_attractor) = (0, 0, 0);
        for i in 8..s.len() {
            let (Some(&vp), Some(&np)) = (verb.get(&s[i]), number.get(&s[i - 1])) else {
                continue;
            };
            let d = np_start(&s, i - 1);
            if s[d - 1] == f.near || s[d - 1] == f.with {
                let head = number[&s[d - 2]];
                assert_eq!(head, vp, "agreement: {}", lang.decode(&s[i - 8..=i]));
                attracted += 1;
                mismatched_attractor += (np != vp) as usize;
            } else {
                assert_eq!(np, vp, "agreement: {}", lang.decode(&s[i - 2..=i]));
                plain += 1;
            }
        }
        println!(
            "agreement checked: {plain} plain, {attracted} with attractor ({mismatched_attractor} of different number)"
        );
        assert!(plain > 1000 && mismatched_attractor > 100);
    }

    fn entropy(counts: impl Iterator<Item = usize>, total: f64) -> f64 {
        counts
            .filter(|&c| c > 0)
            .map(|c| {
                let p = c as f64 / total;
                -p * p.ln()
            })
            .sum()
    }

    #[test]
    fn entropy_is_well_below_uniform() {
        let lang = SyntheticLanguage::new();
        let v = lang.vocab_size();
        let s = lang.stream(7, 200_000);
        let mut uni = vec![0usize; v];
        let mut bi: HashMap<(u32, u32), usize> = HashMap::new();
        let mut prev = vec![0usize; v];
        for &t in &s {
            uni[t as usize] += 1;
        }
        for w in s.windows(2) {
            *bi.entry((w[0], w[1])).or_default() += 1;
            prev[w[0] as usize] += 1;
        }
        let n = s.len() as f64;
        let h1 = entropy(uni.iter().copied(), n);
        let m = (s.len() - 1) as f64;
        let h_pair = entropy(bi.values().copied(), m);
        let h_prev = entropy(prev.iter().copied(), m);
        let h2 = h_pair - h_prev;
        let used = uni.iter().filter(|&&c| c > 0).count();
        println!(
            "vocab {v} (used in 200K tokens: {used}), ln(vocab) = {:.3} nats, unigram entropy = {h1:.3} nats/token, \
             bigram conditional entropy = {h2:.3} nats/token",
            (v as f64).ln()
        );
        assert!(h1 < (v as f64).ln() - 1.0);
        assert!(h2 < h1 - 1.0);
        assert!(used > v * 3 / 4, "most of the vocabulary should occur");
    }
}
