//! Text ⇄ token ids. One trait, so eval (bits per byte), generation and the demo work the
//! same on the embedded synthetic language and on a trained BPE tokenizer (`tokenizer.json`).

use super::synthetic::{SyntheticLanguage, BOS, EOT};
use anyhow::{bail, Result};

pub trait TextCodec: Send + Sync {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The text of `ids` (special tokens rendered readably).
    fn decode(&self, ids: &[u32]) -> String;
    /// UTF-8 bytes the ids stand for in the source text (for bits per byte); special tokens count 0.
    fn byte_len(&self, ids: &[u32]) -> usize;
    fn vocab_size(&self) -> usize;
    fn bos(&self) -> Option<u32>;
    fn eot(&self) -> Option<u32>;
}

impl TextCodec for SyntheticLanguage {
    /// Words separated by whitespace; `.`, `,` and `?` are their own words even when attached.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for raw in text.split_whitespace() {
            let mut word = raw;
            let mut tail = Vec::new();
            while let Some(p) = word.strip_suffix(['.', ',', '?']) {
                tail.push(&word[p.len()..]);
                word = p;
            }
            if !word.is_empty() {
                match self.token(word) {
                    Some(id) => ids.push(id),
                    None => bail!("the word {word:?} is not in the synthetic language's vocabulary"),
                }
            }
            for p in tail.into_iter().rev() {
                ids.push(self.token(p).expect("punctuation is in the vocabulary"));
            }
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> String {
        SyntheticLanguage::decode(self, ids)
    }

    /// Each word's bytes plus one separating space (none for punctuation or special tokens).
    fn byte_len(&self, ids: &[u32]) -> usize {
        ids.iter()
            .map(|&id| match self.word(id) {
                _ if id == BOS || id == EOT => 0,
                Some(w) if matches!(w, "." | "," | "?") => w.len(),
                Some(w) => w.len() + 1,
                None => 0,
            })
            .sum()
    }

    fn vocab_size(&self) -> usize {
        SyntheticLanguage::vocab_size(self)
    }

    fn bos(&self) -> Option<u32> {
        Some(BOS)
    }

    fn eot(&self) -> Option<u32> {
        Some(EOT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_round_trip() {
        let lang = SyntheticLanguage::new();
        let ids = lang.document(&mut crate::rng::Rng::new(3));
        let body = &ids[1..ids.len() - 1];
        let text = TextCodec::decode(&lang, body);
        assert_eq!(lang.encode(&text).unwrap(), body);
        assert!(lang.encode("the zzzqqq").unwrap_err().to_string().contains("zzzqqq"));
    }
}
