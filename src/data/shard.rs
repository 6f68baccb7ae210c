//! Token shards: a 32-byte header and little-endian token ids, read zero-copy
//! with memmap2.
//!
//! Header (all little-endian):
//!   0..8   magic  b"NSEEKTOK"
//!   8..12  version (u32) = 1
//!   12..16 token width in bytes (u32): 2 (u16 ids) or 4 (u32 ids)
//!   16..24 vocab size (u64): every id is below it
//!   24..32 token count (u64)

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"NSEEKTOK";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;

pub struct TokenShard {
    pub path: PathBuf,
    pub vocab_size: usize,
    pub width: usize,
    pub len: usize,
    map: Mmap,
}

impl TokenShard {
    pub fn open(path: &Path) -> Result<TokenShard> {
        let file = File::open(path).with_context(|| format!("cannot open token shard {}", path.display()))?;
        // SAFETY: the map is read-only; a shard changed underneath a run is the user's error, as with any reader.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let p = path.display();
        if map.len() < HEADER_BYTES {
            bail!("token shard {p} is truncated: {} bytes, shorter than its {HEADER_BYTES}-byte header", map.len());
        }
        if &map[0..8] != MAGIC {
            bail!("{p} is not a nanoseek token shard (bad magic {:?})", String::from_utf8_lossy(&map[0..8]));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            bail!("token shard {p} has format version {version}; this build reads version {VERSION}");
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            bail!("token shard {p} declares token width {width}; expected 2 or 4 bytes");
        }
        let vocab_size = u64_at(16) as usize;
        let len = u64_at(24) as usize;
        let want = len.checked_mul(width).and_then(|b| b.checked_add(HEADER_BYTES));
        if want != Some(map.len()) {
            bail!(
                "token shard {p} is truncated or padded: header says {len} tokens ({} bytes) but the file has {} bytes",
                want.map_or("overflowing".into(), |w| w.to_string()),
                map.len()
            );
        }
        Ok(TokenShard { path: path.to_path_buf(), vocab_size, width, len, map })
    }

    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER_BYTES + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
    }
}

/// Writes a shard atomically; the width is 2 when every id fits in u16.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        bail!("token id {bad} is out of range for vocab_size {vocab_size}");
    }
    let width = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * width);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(width as u32).to_le_bytes());
    bytes.extend_from_slice(&(vocab_size as u64).to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        if width == 2 {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::fsutil::write_atomic(path, &bytes)
}
