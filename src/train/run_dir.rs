//! One writer per run directory, and the cleanup of what dead writers left behind.
//!
//! `train` holds an exclusive `flock(2)` on `<run>/.lock` for its whole life; the lock file holds
//! the holder's PID for the message a second writer gets. The kernel drops the lock when the
//! process exits or dies (even by `kill -9`), so a stale lock file is harmless: the next writer
//! simply locks it again. While the lock is held nobody else writes the run, so any temporary
//! (`checkpoints/.tmp-step_*`, `checkpoints/.trash-*`, `.<file>.tmp-<pid>`) belongs to a dead process
//! and is removed.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run directory; dropping it (or the process dying) releases it.
pub struct RunLock {
    dir: PathBuf,
    _file: File,
    /// This process created the run directory (so a failed setup may remove it again).
    pub created: bool,
}

#[cfg(unix)]
fn try_flock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_flock(_file: &File) -> std::io::Result<bool> {
    Ok(true) // no advisory lock on this platform: one writer per run is the user's care
}

/// The lock file we hold is still the one at `path` (a remover may have unlinked it between
/// our open and our lock; then we would hold a lock nobody else can see).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, _path: &Path) -> bool {
    true
}

impl RunLock {
    /// Creates the run directory if needed and takes its lock, or fails naming the holder.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let created = match fs::create_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => false,
            Err(e) => return Err(e).with_context(|| format!("cannot create run directory {}", dir.display())),
        };
        let path = dir.join(LOCK_FILE);
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot open the run lock {}", path.display()))?;
            if !try_flock(&file).with_context(|| format!("cannot lock {}", path.display()))? {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("PID {pid}"),
                    Err(_) => "PID not yet written".to_string(),
                };
                bail!(
                    "run directory {} is in use by another nanoseek process ({holder}); wait for it to end or pick another --run",
                    dir.display()
                );
            }
            if !same_file(&file, &path) {
                continue; // the directory was removed under us; lock the new file
            }
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id()).with_context(|| format!("cannot write {}", path.display()))?;
            let lock = RunLock { dir: dir.to_path_buf(), _file: file, created };
            lock.remove_dead_temporaries();
            return Ok(lock);
        }
        bail!("cannot lock {}: it keeps being replaced", path.display())
    }

    /// Passes `result` through; on an error, removes the run directory if this process created it
    /// (a failed start leaves nothing behind).
    pub fn undo_if_failed<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() && self.created {
            let _ = fs::remove_dir_all(&self.dir);
        }
        result
    }

    /// Temporaries of dead writers: half-written checkpoints, checkpoints half-way through removal,
    /// atomic-write temporaries. Failures are warnings: they cost disk space, not correctness.
    fn remove_dead_temporaries(&self) {
        let ckpts = self.dir.join("checkpoints");
        for (folder, is_temp) in [
            (&ckpts, (|n: &str| n.starts_with(".tmp-step_") || n.starts_with(".trash-")) as fn(&str) -> bool),
            (&self.dir, |n: &str| n.starts_with('.') && n.contains(".tmp-")),
        ] {
            for entry in fs::read_dir(folder).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !is_temp(&name) {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                if let Err(e) = removed {
                    eprintln!("warning: cannot remove the leftover temporary {}: {e}", path.display());
                }
            }
        }
    }
}

/// Test-only fault injection: when `NANOSEEK_FAULT` names `point` (e.g. `save:after_model`), the
/// process aborts there, as a crash would. Unset (always, outside the crash tests) it costs one
/// environment lookup per checkpoint.
pub fn fault_point(point: &str) {
    if std::env::var_os("NANOSEEK_FAULT").is_some_and(|v| v == point) {
        eprintln!("NANOSEEK_FAULT: aborting at {point}");
        std::process::abort();
    }
}
