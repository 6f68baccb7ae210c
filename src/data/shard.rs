//! Token shards, read zero-copy with memmap2: nanoseek's own format and llm.c/nanoGPT's.
//!
//! nanoseek shard (`NSEEKTOK`): a 32-byte header, then little-endian token ids.
//!
//! ```text
//!   0..8   magic  b"NSEEKTOK"
//!   8..12  version (u32) = 1
//!   12..16 token width in bytes (u32): 2 (u16 ids) or 4 (u32 ids)
//!   16..24 vocab size (u64): every id is below it
//!   24..32 token count (u64)
//! ```
//!
//! llm.c shard (`.bin` from llm.c / nanoGPT-style preprocessing): 256 little-endian i32
//! (1024 bytes): `[0]` magic 20240520, `[1]` version (1: u16 GPT-2 ids; 2: u32 ids, as llm.c
//! writes for Llama 3), `[2]` token count; then the ids. The header holds no vocab size, so
//! version 1 is taken as GPT-2's 50257 and version 2 as Llama 3's 128256.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"NSEEKTOK";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
/// llm.c's shard magic and header size.
pub const LLMC_MAGIC: i32 = 20240520;
pub const LLMC_HEADER_BYTES: usize = 256 * 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardFormat {
    Nanoseek,
    LlmC,
}

pub struct TokenShard {
    pub path: PathBuf,
    pub vocab_size: usize,
    /// Bytes per id: 2 or 4.
    pub width: usize,
    pub len: usize,
    pub format: ShardFormat,
    /// Byte offset of the first id.
    offset: usize,
    map: Mmap,
}

impl TokenShard {
    /// Opens and validates a nanoseek or llm.c shard (told apart by the magic).
    pub fn open(path: &Path) -> Result<TokenShard> {
        if path.is_dir() {
            bail!("{} is a directory, not a token shard", path.display());
        }
        let file = File::open(path).with_context(|| format!("cannot open token shard {}", path.display()))?;
        // SAFETY: the map is read-only; a shard changed underneath a run is the user's error, as with any reader.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let p = path.display();
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let (format, offset, width, vocab_size, len) = if map.len() >= 4 && u32_at(0) as i32 == LLMC_MAGIC {
            if map.len() < LLMC_HEADER_BYTES {
                bail!(
                    "llm.c shard {p} is truncated: {} bytes, shorter than its {LLMC_HEADER_BYTES}-byte header",
                    map.len()
                );
            }
            let (width, vocab) = match u32_at(4) {
                1 => (2, 50257),
                2 => (4, 128256),
                v => bail!("llm.c shard {p} has version {v}; this build reads versions 1 (u16 ids) and 2 (u32 ids)"),
            };
            (ShardFormat::LlmC, LLMC_HEADER_BYTES, width, vocab, u32_at(8) as usize)
        } else {
            if map.len() < HEADER_BYTES {
                bail!("token shard {p} is truncated: {} bytes, shorter than its {HEADER_BYTES}-byte header", map.len());
            }
            if &map[0..8] != MAGIC {
                bail!(
                    "{p} is not a nanoseek token shard (bad magic {:?}) nor an llm.c .bin shard (magic {LLMC_MAGIC}); \
                     a headerless nanoGPT .bin (raw uint16 ids, as its prepare.py writes) needs llm.c's 1024-byte \
                     header in front (256 little-endian i32: 20240520, 1, the token count, then zeros), \
                     or re-tokenize the text with `nanoseek data`",
                    String::from_utf8_lossy(&map[0..8])
                );
            }
            let version = u32_at(8);
            if version != VERSION {
                bail!("token shard {p} has format version {version}; this build reads version {VERSION}");
            }
            let width = u32_at(12) as usize;
            if width != 2 && width != 4 {
                bail!("token shard {p} declares token width {width}; expected 2 or 4 bytes");
            }
            let vocab_size = u64_at(16) as usize;
            if vocab_size == 0 || (width == 2 && vocab_size > 1 << 16) {
                bail!("token shard {p} declares vocab size {vocab_size}, impossible with {width}-byte ids");
            }
            (ShardFormat::Nanoseek, HEADER_BYTES, width, vocab_size, u64_at(24) as usize)
        };
        let want = len.checked_mul(width).and_then(|b| b.checked_add(offset));
        if want != Some(map.len()) {
            bail!(
                "token shard {p} is truncated or padded: header says {len} tokens ({} bytes) but the file has {} bytes",
                want.map_or("overflowing".into(), |w| w.to_string()),
                map.len()
            );
        }
        Ok(TokenShard { path: path.to_path_buf(), vocab_size, width, len, format, offset, map })
    }

    pub fn get(&self, i: usize) -> u32 {
        let o = self.offset + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
    }

    /// Copies ids `start..start + out.len()` into `out`.
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        let w = self.width;
        let bytes = &self.map[self.offset + start * w..self.offset + (start + out.len()) * w];
        if w == 2 {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([c[0], c[1]]) as u32;
            }
        } else {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    /// The vocabulary the file itself declares: a nanoseek shard's header field. An llm.c
    /// header holds none (`vocab_size` is then GPT-2's or Llama 3's, a guess), so None.
    pub fn declared_vocab(&self) -> Option<usize> {
        (self.format == ShardFormat::Nanoseek).then_some(self.vocab_size)
    }

    /// The largest id in the shard (one scan); None when it is empty.
    pub fn max_id(&self) -> Option<u32> {
        let mut buf = vec![0u32; 1 << 16];
        let mut max = None;
        for start in (0..self.len).step_by(buf.len()) {
            let n = buf.len().min(self.len - start);
            self.read_into(start, &mut buf[..n]);
            max = max.max(buf[..n].iter().copied().max());
        }
        max
    }

    /// The first id at or after `from` (below `end`) equal to `id`.
    pub fn find(&self, id: u32, from: usize, end: usize) -> Option<usize> {
        (from..end.min(self.len)).find(|&i| self.get(i) == id)
    }
}

/// Streams ids into a new nanoseek shard: written under a temporary name, the header
/// completed at `finish`, fsynced and renamed into place (all or nothing).
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    vocab_size: usize,
    width: usize,
    len: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, vocab_size: usize) -> Result<ShardWriter> {
        if vocab_size == 0 || vocab_size > u32::MAX as usize + 1 {
            bail!("vocab size {vocab_size} cannot be stored in a token shard");
        }
        let tmp = crate::fsutil::temp_sibling(path);
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let width = if vocab_size <= 1 << 16 { 2 } else { 4 };
        let mut w =
            ShardWriter { path: path.to_path_buf(), tmp, out: std::io::BufWriter::new(f), vocab_size, width, len: 0 };
        let header = w.header();
        w.out.write_all(&header).with_context(|| format!("cannot write {}", w.tmp.display()))?;
        Ok(w)
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_BYTES);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(self.width as u32).to_le_bytes());
        h.extend_from_slice(&(self.vocab_size as u64).to_le_bytes());
        h.extend_from_slice(&self.len.to_le_bytes());
        h
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            bail!("token id {bad} is out of range for vocab_size {}", self.vocab_size);
        }
        let mut buf = Vec::with_capacity(tokens.len() * self.width);
        for &t in tokens {
            if self.width == 2 {
                buf.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.out.write_all(&buf).with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.len += tokens.len() as u64;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        let result = (|| -> Result<()> {
            let header = self.header();
            self.out.flush()?;
            let f = self.out.get_mut();
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)?;
            f.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            crate::fsutil::sync_dir(self.path.parent().unwrap_or(Path::new(".")))
        })()
        .with_context(|| format!("cannot write token shard {}", self.path.display()));
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for ShardWriter {
    /// An unfinished writer leaves nothing behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes a shard atomically; the width is 2 when every id fits in u16.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let mut w = ShardWriter::create(path, vocab_size)?;
    w.push(tokens)?;
    w.finish()
}

/// Writes an llm.c shard (version 1, u16 ids): for interoperability and tests.
pub fn write_llmc_shard(path: &Path, tokens: &[u16]) -> Result<()> {
    let mut b = Vec::with_capacity(LLMC_HEADER_BYTES + 2 * tokens.len());
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC;
    header[1] = 1;
    header[2] = i32::try_from(tokens.len()).context("too many tokens for an llm.c shard")?;
    header.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    tokens.iter().for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
    crate::fsutil::write_atomic(path, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_shard_round_trips_in_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [300usize, 70_000] {
            let p = dir.path().join(format!("s{vocab}.bin"));
            let mut w = ShardWriter::create(&p, vocab).unwrap();
            let ids: Vec<u32> = (0..1000).map(|i| (i * 7919) % vocab as u32).collect();
            w.push(&ids[..10]).unwrap();
            w.push(&ids[10..]).unwrap();
            assert!(w.push(&[vocab as u32]).is_err());
            w.finish().unwrap();
            let s = TokenShard::open(&p).unwrap();
            assert_eq!((s.len, s.vocab_size, s.width), (1000, vocab, if vocab > 65536 { 4 } else { 2 }));
            let mut back = vec![0; 1000];
            s.read_into(0, &mut back);
            assert_eq!(back, ids);
            assert_eq!(s.get(999), ids[999]);
        }
        // an abandoned writer leaves no file
        let p = dir.path().join("abandoned.bin");
        drop(ShardWriter::create(&p, 10).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
