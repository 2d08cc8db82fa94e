//! The data directory lock: `DIR/LOCK`, flock'ed exclusively by the one agent writing the
//! directory, holding its pid in decimal followed by a newline.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::{LOCK_FILE, StorageError};
use crate::access::{self, Access};

/// How often, and how far apart, taking the lock is tried before giving up: a reader probing
/// with a shared lock holds it for microseconds and must not make a starting agent fail.
const ATTEMPTS: u32 = 20;
const RETRY_DELAY: Duration = Duration::from_millis(25);

/// The exclusive lock of a data directory, released when dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    /// Kept open: closing the file releases the flock.
    _file: File,
}

/// Takes the exclusive lock on `dir/LOCK` (creating the file, mode 0640 and the group of
/// `access`) and writes our pid into it. Fails with [`StorageError::Locked`] naming the
/// holder's pid.
pub(crate) fn lock_exclusive(dir: &Path, access: &Access) -> Result<DirLock, StorageError> {
    let path = dir.join(LOCK_FILE);
    let mut file = access::create_file(
        &path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        access,
    )
    .map_err(|e| StorageError::io("open", &path, e))?;
    let mut attempt = 1;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if attempt < ATTEMPTS => {
                attempt += 1;
                thread::sleep(RETRY_DELAY);
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StorageError::Locked {
                    pid: read_pid(&mut file),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(StorageError::io("lock", &path, e)),
        }
    }
    write_pid(&mut file, &path)?;
    Ok(DirLock { _file: file })
}

/// True when `dir/LOCK` is held by a live agent, probed with a non-blocking shared flock.
/// A missing or unreadable lock file counts as not running.
pub(crate) fn is_locked(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            // Released at once (also by the close below) so a starting agent is not held up.
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

fn write_pid(file: &mut File, path: &Path) -> Result<(), StorageError> {
    let io = |e| StorageError::io("write", path, e);
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_naming_our_pid_and_probe_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_locked(dir.path()));
        let held = lock_exclusive(dir.path(), &Access::default()).unwrap();
        assert!(is_locked(dir.path()));
        match lock_exclusive(dir.path(), &Access::default()) {
            Err(StorageError::Locked { path, pid }) => {
                assert_eq!(path, dir.path().join("LOCK"));
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        assert!(!is_locked(dir.path()));
        let _again = lock_exclusive(dir.path(), &Access::default()).unwrap();
    }
}
