//! Byte-level BPE tokenizers: trained on the user's text with the `tokenizers` crate, or
//! loaded from any `tokenizer.json` (GPT-2's, DeepSeek's, one saved by Python `tokenizers`).
//!
//! A trained tokenizer is GPT-2-style byte-level BPE: no normalizer (text round-trips
//! exactly, combining marks and all), the `ByteLevel` pre-tokenizer (GPT-2 split regex, no
//! added prefix space) and decoder, all 256 bytes in the base alphabet (nothing is ever
//! unknown), and the special tokens [`BOS_TOKEN`] (id 0) and [`EOT_TOKEN`] (id 1) — the same
//! ids as the embedded synthetic language's `<bos>` and `<eot>`. The saved `tokenizer.json`
//! loads in Python with `tokenizers.Tokenizer.from_file`.
//!
//! Text is always encoded as plain text: a literal `<|endoftext|>` inside a document is
//! tokenized as its characters, never turned into the special token, so documents cannot
//! inject separators and every text byte is counted for bits per byte.

use super::codec::TextCodec;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

/// Beginning of a document.
pub const BOS_TOKEN: &str = "<|bos|>";
/// End of a document (GPT-2's name, so GPT-2 tokenizers work unchanged).
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// Other spellings recognized as beginning / end of sequence in loaded tokenizers.
const BOS_ALIASES: &[&str] = &[BOS_TOKEN, "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>"];
const EOT_ALIASES: &[&str] = &[EOT_TOKEN, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<eot>"];

pub struct BpeTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eot: Option<u32>,
    /// Source-text bytes each id stands for (0 for special tokens).
    bytes_of: Vec<u32>,
}

/// Checks that `bytes` are UTF-8; the error names `what` (a file) and the byte offset.
pub fn check_utf8<'a>(bytes: &'a [u8], what: &str, base_offset: u64) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = base_offset + e.valid_up_to() as u64;
        let bad: Vec<String> =
            bytes[e.valid_up_to()..].iter().take(e.error_len().unwrap_or(1)).map(|b| format!("{b:#04x}")).collect();
        anyhow!(
            "{what}: invalid UTF-8 at byte offset {at} (bytes {}); the data pipeline reads UTF-8 text only",
            bad.join(" ")
        )
    })
}

impl BpeTokenizer {
    /// Trains byte-level BPE with `vocab_size` ids (specials and the 256 byte symbols
    /// included) on `texts`. `progress` shows the crate's own progress bar.
    pub fn train<I, S>(texts: I, vocab_size: usize, progress: bool) -> Result<BpeTokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < 258 {
            bail!("tokenizer vocab size {vocab_size} is too small: byte-level BPE needs at least 256 byte symbols + 2 special tokens");
        }
        if vocab_size > u32::MAX as usize {
            bail!("tokenizer vocab size {vocab_size} is too large");
        }
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(progress)
            .special_tokens(vec![AddedToken::from(BOS_TOKEN, true), AddedToken::from(EOT_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::new(false, true, true)));
        tok.train(&mut TrainerWrapper::BpeTrainer(trainer), texts).map_err(|e| anyhow!("BPE training failed: {e}"))?;
        Self::from_tokenizer(tok, "the trained tokenizer")
    }

    /// Loads a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<BpeTokenizer> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let tok = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        Self::from_tokenizer(tok, &path.display().to_string())
    }

    /// Wraps a tokenizer: finds its BOS/EOT ids and the byte length of every id.
    pub fn from_tokenizer(mut inner: Tokenizer, what: &str) -> Result<BpeTokenizer> {
        inner.set_encode_special_tokens(true);
        let vocab = inner.get_vocab(true);
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n == 0 {
            bail!("{what} has an empty vocabulary");
        }
        let find = |names: &[&str]| names.iter().find_map(|s| vocab.get(*s).copied());
        let (bos, eot) = (find(BOS_ALIASES), find(EOT_ALIASES));
        let specials: std::collections::HashSet<u32> = inner
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let alphabet = ByteLevel::alphabet();
        let by_id: HashMap<u32, &String> = vocab.iter().map(|(s, &i)| (i, s)).collect();
        let bytes_of = (0..n as u32)
            .map(|id| {
                let Some(tok) = by_id.get(&id) else { return 0 };
                if specials.contains(&id) {
                    0
                } else if byte_level {
                    // Each alphabet char stands for one byte; anything else (an added
                    // plain-text token) for its own UTF-8 bytes.
                    tok.chars().map(|c| if alphabet.contains(&c) { 1 } else { c.len_utf8() as u32 }).sum()
                } else if tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
                    1 // SentencePiece byte fallback
                } else {
                    inner.decode(&[id], false).map(|s| s.len() as u32).unwrap_or(tok.len() as u32)
                }
            })
            .collect();
        Ok(BpeTokenizer { inner, bos, eot, bytes_of })
    }

    /// Saves as `tokenizer.json` (atomically; loadable by Python `tokenizers`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?;
        crate::fsutil::write_atomic(path, json.as_bytes())
    }

    /// Ids of many texts at once (in parallel), in order.
    pub fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let enc = self.inner.encode_batch_fast(texts, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Ids of raw bytes, which must be UTF-8 (the error names `what` and the byte offset).
    pub fn encode_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<u32>> {
        self.encode(check_utf8(bytes, what, 0)?)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

impl TextCodec for BpeTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_else(|e| format!("<undecodable ids: {e}>"))
    }

    fn byte_len(&self, ids: &[u32]) -> usize {
        ids.iter().map(|&i| self.bytes_of.get(i as usize).copied().unwrap_or(0) as usize).sum()
    }

    fn vocab_size(&self) -> usize {
        self.bytes_of.len()
    }

    fn bos(&self) -> Option<u32> {
        self.bos
    }

    fn eot(&self) -> Option<u32> {
        self.eot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = [
            "the quick brown fox jumps over the lazy dog. ",
            "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. ",
            "東京は日本の首都です。北京是中国的首都。 ",
            "emoji: 🦀🚀👩‍👩‍👧 and combining e\u{301} a\u{30a} ",
            "def f(x):\n    return x * 2\n\n",
        ];
        (0..40).map(|i| base[i % base.len()].repeat(1 + i % 3)).collect()
    }

    #[test]
    fn trains_round_trips_and_counts_bytes() {
        let tok = BpeTokenizer::train(corpus().into_iter(), 400, false).unwrap();
        assert_eq!(tok.bos(), Some(0));
        assert_eq!(tok.eot(), Some(1));
        assert!(tok.vocab_size() <= 400 && tok.vocab_size() > 258, "{}", tok.vocab_size());
        for s in [
            "",
            "hello world",
            "  leading and trailing spaces \n\n\t",
            "🦀 crabs 🦀🦀, CJK 漢字かなカナ한국어, combining: e\u{301}\u{302} o\u{308}",
            "unseen: ∮ E⋅da = Q,  n → ∞, ∑ f(i) = ∏ g(i) \u{10FFFF} \u{0}",
            "literal <|endoftext|> and <|bos|> stay text",
        ] {
            let ids = tok.encode(s).unwrap();
            assert_eq!(tok.decode(&ids), s, "round trip of {s:?}");
            assert_eq!(tok.byte_len(&ids), s.len(), "byte_len of {s:?}");
            assert!(!ids.contains(&0) && !ids.contains(&1), "no special ids from plain text: {ids:?}");
        }
        assert_eq!(tok.byte_len(&[0, 1]), 0);
        // the saved file loads back to the same tokenizer
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        tok.save(&p).unwrap();
        let back = BpeTokenizer::load(&p).unwrap();
        let s = "東京 the lazy 🦀";
        assert_eq!(back.encode(s).unwrap(), tok.encode(s).unwrap());
        assert_eq!(back.vocab_size(), tok.vocab_size());
    }

    #[test]
    fn invalid_utf8_is_rejected_with_its_offset() {
        let e = check_utf8(b"abc\xff\xfedef", "corpus.txt", 100).unwrap_err().to_string();
        assert!(e.contains("corpus.txt") && e.contains("offset 103") && e.contains("0xff"), "{e}");
        let tok = BpeTokenizer::train(corpus().into_iter(), 300, false).unwrap();
        let e = tok.encode_bytes(b"ok \xe6\x9d", "x.txt").unwrap_err().to_string();
        assert!(e.contains("x.txt") && e.contains("offset 3"), "{e}");
        assert!(BpeTokenizer::train(corpus().into_iter(), 100, false).is_err());
    }
}
