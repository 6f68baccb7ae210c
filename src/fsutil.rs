//! Crash-safe file writes: write a temporary file in the same directory, fsync
//! it, rename it over the target, fsync the directory. A reader sees the old
//! file or the new one, never half of one.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A temporary sibling of `path`: `.name.tmp-<pid>`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Writes a user-named output file (`--output`): atomically (as `write_atomic`) when `path` is a
/// regular file or absent; through a symlink to its target (the link stays a link); devices,
/// FIFOs, sockets and folders are refused rather than replaced.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(&output_target(path)?, bytes)
}

/// The file a user-named output `path` writes: `path` itself when it is a regular file or absent,
/// the end of its chain of symlinks otherwise; devices, FIFOs, sockets and folders are refused.
/// For outputs written as they grow (`bench --output`, JSON lines) rather than atomically.
pub fn output_target(path: &Path) -> Result<std::path::PathBuf> {
    let mut target = path.to_path_buf();
    // Follow a chain of links (bounded: a loop is an error, not a hang).
    for _ in 0..40 {
        match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = fs::read_link(&target).with_context(|| format!("cannot read link {}", target.display()))?;
                target = target.parent().unwrap_or(Path::new("")).join(link);
            }
            Ok(m) if m.is_file() => return Ok(target),
            Ok(m) => {
                let kind = if m.is_dir() { "a folder" } else { "not a regular file (a device, FIFO or socket)" };
                anyhow::bail!("refusing to write {}: it is {kind}", path.display());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(target),
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", target.display())),
        }
    }
    anyhow::bail!("refusing to write {}: too many levels of symbolic links", path.display())
}
