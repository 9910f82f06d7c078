//! The state folder's lock: one server per `state_dir`.
//!
//! [`StateLock::acquire`] takes an exclusive OS lock (`flock` on Unix, `LockFileEx` on Windows,
//! through [`File::try_lock`]) on `state_dir/LOCK` and writes its holder into the file (pid,
//! host, start time). The lock belongs to the open file, so it lasts as long as the [`Store`]
//! that owns it, wherever the store moves (a blocking thread and back), and the OS releases it
//! when the store is dropped or the process dies: a stale `LOCK` file left by a crash holds
//! nothing, and its text is only overwritten by the next holder.
//!
//! [`Store`]: super::Store

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{io, StoreError};

/// The lock file's name in a store folder.
pub const LOCK_FILE: &str = "LOCK";

/// The lock on a state folder, held until dropped.
#[derive(Debug)]
pub(super) struct StateLock {
    path: PathBuf,
    /// The locked file: closing it releases the lock.
    _file: File,
}

impl StateLock {
    /// Locks `dir` for this process, or fails with [`StoreError::Locked`] naming the holder.
    pub(super) fn acquire(dir: &Path) -> Result<StateLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let mut options = OpenOptions::new();
        // Never truncate before holding the lock: the text names the current holder.
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, super::PRIVATE_FILE);
        let mut file = options.open(&path).map_err(io(&path))?;
        match lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = match file.read_to_string(&mut text) {
                    Ok(_) if !text.trim().is_empty() => text.trim().to_string(),
                    // The holder has the lock but has not written its name yet, or the text
                    // does not read: say so rather than guess.
                    Ok(_) => "a process that has not written its name yet".to_string(),
                    Err(e) => format!("unknown: {LOCK_FILE} does not read: {e}"),
                };
                return Err(StoreError::Locked { path, holder });
            }
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    file = %path.display(),
                    "this file system cannot lock files: nothing stops a second server on this state folder"
                );
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::Io { path, source: e }),
        }
        let holder = holder();
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(holder.as_bytes()))
            .and_then(|()| file.sync_data());
        written.map_err(io(&path))?;
        tracing::debug!(file = %path.display(), holder = holder.trim(), "state folder locked");
        Ok(StateLock { path, _file: file })
    }

    /// The lock file's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// `File::try_lock` is stable since Rust 1.89; the workspace's declared `rust-version` is older,
/// but the toolchain it is built with is not.
fn lock(file: &File) -> Result<(), TryLockError> {
    file.try_lock()
}

/// This process, as written into the lock file: `pid 4242 on host-a since 2026-05-01T12:00:00Z`.
fn holder() -> String {
    let since = humantime::format_rfc3339_seconds(SystemTime::now());
    match hostname() {
        Some(host) => format!("pid {} on {host} since {since}\n", std::process::id()),
        None => format!("pid {} since {since}\n", std::process::id()),
    }
}

/// The host's name, where it is cheap to learn (Linux's procfs, or `HOSTNAME`).
fn hostname() -> Option<String> {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let name = from_proc.or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}
