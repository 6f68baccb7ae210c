//! The batch loader: windows of t+1 tokens from a token source, random (training) or
//! sequential (evaluation).
//!
//! Random mode's whole position is one RNG state, stored in checkpoints (`loader_rng`), so
//! a resumed run draws exactly the batches an uninterrupted run would; sequential mode is a
//! pure function of the batch number. For data parallelism every rank draws the same
//! world·b windows and keeps its own b of them. Shards stay memory-mapped: a batch copies
//! only its own b·(t+1) ids.
//!
//! BOS alignment (`align_to`): every window starts at a document's first token (its BOS),
//! so no sequence starts mid-document. Random windows move forward to the next BOS (or keep
//! their start when none is within reach); sequential windows start at the first BOS at or
//! after the previous window's end, so the tail of a document longer than a window is not
//! scored. The sequential starts are found once (one scan, 8 bytes per window).

use super::shard::TokenShard;
use crate::rng::Rng;
use anyhow::{bail, Result};

pub enum TokenSource {
    Memory {
        tokens: Vec<u32>,
        vocab_size: usize,
    },
    /// A range of a memory-mapped shard (no copy of the tokens is made).
    ShardRange {
        shard: std::sync::Arc<TokenShard>,
        start: usize,
        len: usize,
    },
}

impl TokenSource {
    pub fn len(&self) -> usize {
        match self {
            TokenSource::Memory { tokens, .. } => tokens.len(),
            TokenSource::ShardRange { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TokenSource::Memory { vocab_size, .. } => *vocab_size,
            TokenSource::ShardRange { shard, .. } => shard.vocab_size,
        }
    }

    fn copy_range(&self, start: usize, out: &mut [u32]) {
        match self {
            TokenSource::Memory { tokens, .. } => out.copy_from_slice(&tokens[start..start + out.len()]),
            TokenSource::ShardRange { shard, start: s0, .. } => shard.read_into(s0 + start, out),
        }
    }

    pub fn get(&self, i: usize) -> u32 {
        match self {
            TokenSource::Memory { tokens, .. } => tokens[i],
            TokenSource::ShardRange { shard, start, .. } => shard.get(start + i),
        }
    }
}

/// Inputs and next-token targets, both [b, t] row-major.
pub struct Batch {
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
}

pub struct Loader {
    pub source: TokenSource,
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub world: usize,
    pub rng: Rng,
    /// Set by `align_to`: the BOS id and the sequential window starts.
    align: Option<(u32, Vec<usize>)>,
}

impl Loader {
    pub fn new(
        source: TokenSource,
        batch: usize,
        seq_len: usize,
        rank: usize,
        world: usize,
        rng: Rng,
    ) -> Result<Loader> {
        if source.len() < seq_len + 1 {
            bail!("the data has {} tokens, fewer than one sequence of max_seq_len + 1 = {}", source.len(), seq_len + 1);
        }
        if rank >= world {
            bail!("rank {rank} must be below world size {world}");
        }
        Ok(Loader { source, batch, seq_len, rank, world, rng, align: None })
    }

    /// Starts every window at a document boundary (token `bos`); see the module doc.
    pub fn align_to(mut self, bos: u32) -> Loader {
        let (n, t) = (self.source.len(), self.seq_len);
        let mut starts = Vec::new();
        let mut i = 0;
        while i + t < n {
            match (i..n - t).find(|&j| self.source.get(j) == bos) {
                Some(s) => {
                    starts.push(s);
                    i = s + t;
                }
                None => break,
            }
        }
        self.align = Some((bos, starts));
        self
    }

    /// The next random batch (this rank's share).
    pub fn next_batch(&mut self) -> Batch {
        let span = self.source.len() - self.seq_len; // valid window starts
        let mut starts: Vec<usize> = (0..self.batch * self.world).map(|_| self.rng.below(span)).collect();
        if let Some((bos, _)) = &self.align {
            for s in &mut starts {
                // the next document start within one window's reach, if any
                if let Some(b) = (*s..span.min(*s + self.seq_len)).find(|&j| self.source.get(j) == *bos) {
                    *s = b;
                }
            }
        }
        self.windows(&starts[self.rank * self.batch..(self.rank + 1) * self.batch])
    }

    /// Batch number `i` of a fixed, sequential pass (for evaluation); None past the end.
    pub fn sequential_batch(&self, i: usize) -> Option<Batch> {
        let first = (i * self.world + self.rank) * self.batch;
        let starts: Vec<usize> = match &self.align {
            Some((_, all)) => all.get(first..first + self.batch)?.to_vec(),
            None => {
                let per_batch = self.batch * self.seq_len;
                if first * self.seq_len + per_batch + 1 > self.source.len() {
                    return None;
                }
                (0..self.batch).map(|j| (first + j) * self.seq_len).collect()
            }
        };
        Some(self.windows(&starts))
    }

    fn windows(&self, starts: &[usize]) -> Batch {
        let t = self.seq_len;
        let mut ids = vec![0u32; starts.len() * t];
        let mut targets = vec![0i32; starts.len() * t];
        let mut buf = vec![0u32; t + 1];
        for (j, &s) in starts.iter().enumerate() {
            self.source.copy_range(s, &mut buf);
            ids[j * t..(j + 1) * t].copy_from_slice(&buf[..t]);
            for (o, &v) in targets[j * t..(j + 1) * t].iter_mut().zip(&buf[1..]) {
                *o = v as i32;
            }
        }
        Batch { ids, targets }
    }
}

impl TokenSource {
    /// All of a shard.
    pub fn from_shard(shard: TokenShard) -> TokenSource {
        let len = shard.len;
        TokenSource::ShardRange { shard: std::sync::Arc::new(shard), start: 0, len }
    }

    /// Splits a shard into (train, validation): the last `hold` tokens are validation.
    pub fn split_shard(shard: TokenShard, hold: usize) -> (TokenSource, TokenSource) {
        let shard = std::sync::Arc::new(shard);
        let n = shard.len - hold;
        (
            TokenSource::ShardRange { shard: shard.clone(), start: 0, len: n },
            TokenSource::ShardRange { shard, start: n, len: hold },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(docs: &[usize]) -> TokenSource {
        // documents of the given lengths: BOS (0), then ids 2.., then EOT (1)
        let mut tokens = Vec::new();
        for &n in docs {
            tokens.push(0);
            tokens.extend((0..n).map(|i| 2 + (i % 50) as u32));
            tokens.push(1);
        }
        TokenSource::Memory { tokens, vocab_size: 64 }
    }

    #[test]
    fn random_mode_resumes_from_its_rng_exactly() {
        let mut a = Loader::new(source(&[30; 40]), 3, 16, 0, 1, Rng::new(5)).unwrap().align_to(0);
        for _ in 0..4 {
            a.next_batch();
        }
        let mut b = Loader::new(source(&[30; 40]), 3, 16, 0, 1, a.rng.clone()).unwrap().align_to(0);
        for _ in 0..3 {
            assert_eq!(a.next_batch().ids, b.next_batch().ids);
        }
    }

    #[test]
    fn aligned_windows_start_at_bos() {
        let src = source(&[5, 40, 3, 3, 70, 10, 10, 10, 10]);
        let n = src.len();
        let l = Loader::new(src, 2, 16, 0, 1, Rng::new(1)).unwrap().align_to(0);
        let mut seen = 0;
        while let Some(b) = l.sequential_batch(seen) {
            for row in b.ids.chunks(16) {
                assert_eq!(row[0], 0, "{row:?}");
            }
            seen += 1;
        }
        assert!(seen >= 2 && seen * 2 * 16 <= n);
        // documents shorter than a window: every random window reaches a BOS
        let mut r = Loader::new(source(&[4; 30]), 4, 8, 0, 1, Rng::new(2)).unwrap().align_to(0);
        let b = r.next_batch();
        assert!(b.ids.chunks(8).all(|row| row[0] == 0), "{:?}", b.ids);
        // plain sequential windows are contiguous and cover the source in order
        let p = Loader::new(source(&[20; 30]), 2, 8, 0, 1, Rng::new(2)).unwrap();
        let (b0, b1) = (p.sequential_batch(0).unwrap(), p.sequential_batch(1).unwrap());
        assert_eq!(b0.targets[15], b1.ids[0] as i32);
    }
}
