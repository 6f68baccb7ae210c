//! The batch loader: random windows of t+1 tokens from a token source.
//!
//! Its whole position is one RNG state, stored in checkpoints, so a resumed run
//! draws exactly the batches an uninterrupted run would. For data parallelism
//! every rank draws the same world·b windows and keeps its own b of them.

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
            TokenSource::ShardRange { shard, start: s0, .. } => {
                out.iter_mut().enumerate().for_each(|(i, o)| *o = shard.get(s0 + start + i))
            }
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
        Ok(Loader { source, batch, seq_len, rank, world, rng })
    }

    /// The next random batch (this rank's share).
    pub fn next_batch(&mut self) -> Batch {
        let span = self.source.len() - self.seq_len; // valid window starts
        let starts: Vec<usize> = (0..self.batch * self.world).map(|_| self.rng.below(span)).collect();
        self.windows(&starts[self.rank * self.batch..(self.rank + 1) * self.batch])
    }

    /// Batch number `i` of a fixed, sequential pass (for evaluation); None past the end.
    pub fn sequential_batch(&self, i: usize) -> Option<Batch> {
        let per_batch = self.batch * self.seq_len;
        let first = (i * self.world + self.rank) * per_batch;
        if first + per_batch + 1 > self.source.len() {
            return None;
        }
        let starts: Vec<usize> = (0..self.batch).map(|j| first + j * self.seq_len).collect();
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
