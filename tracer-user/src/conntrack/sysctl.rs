//! The per-network-namespace conntrack sysctls the agent needs.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::ConntrackError;

/// Where the conntrack sysctls of the calling thread's network namespace live.
const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

/// The sysctls switched on, and why:
/// * `nf_conntrack_events`: 1 reports the destruction of every entry; the default 2 only
///   of entries created while an event listener existed.
/// * `nf_conntrack_acct`: packet and byte counters (for entries created from then on).
/// * `nf_conntrack_timestamp`: start and stop times (for entries created from then on).
const WANTED: [&str; 3] = [
    "nf_conntrack_events",
    "nf_conntrack_acct",
    "nf_conntrack_timestamp",
];

/// A sysctl this guard changed, and what it held before. The file stays open: a
/// /proc/sys/net file opened in a network namespace keeps acting on that namespace, so
/// restoring works whichever namespace the restoring thread is in.
#[derive(Debug)]
struct Changed {
    path: PathBuf,
    file: File,
    old: String,
}

/// Switches on `net.netfilter.nf_conntrack_events`, `nf_conntrack_acct` and
/// `nf_conntrack_timestamp` in the current network namespace, remembering what they held.
/// [`restore`](Self::restore) (or dropping the guard) puts back exactly the values it
/// changed, unless something else changed them again meanwhile.
#[derive(Debug)]
pub struct ConntrackSysctls {
    changed: Vec<Changed>,
}

/// Reads a sysctl from the start of its open file.
fn read_value(file: &File, path: &Path) -> Result<String, ConntrackError> {
    let mut buf = [0u8; 64];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|source| ConntrackError::SysctlRead {
            path: path.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// Writes a sysctl at the start of its open file, as `echo value > file` does.
fn write_value(file: &File, path: &Path, value: &str) -> Result<(), ConntrackError> {
    let line = format!("{value}\n");
    match file.write_at(line.as_bytes(), 0) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("wrote {n} of {} bytes", line.len()),
        )),
        Err(e) => Err(e),
    }
    .map_err(|source| ConntrackError::SysctlWrite {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

impl ConntrackSysctls {
    /// Sets the three sysctls to 1. Fails, changing nothing, if one of them does not exist
    /// (nf_conntrack not loaded); on a later failure, puts back what it had already changed.
    pub fn enable() -> Result<Self, ConntrackError> {
        Self::enable_in(Path::new(SYSCTL_DIR))
    }

    fn enable_in(dir: &Path) -> Result<Self, ConntrackError> {
        let paths = WANTED.map(|name| dir.join(name));
        for path in &paths {
            if !path.exists() {
                return Err(ConntrackError::SysctlMissing { path: path.clone() });
            }
        }
        // On an early return, dropping `guard` restores what was already changed.
        let mut guard = Self {
            changed: Vec::new(),
        };
        for path in paths {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ConntrackError::SysctlMissing { path });
                }
                Err(source) => return Err(ConntrackError::SysctlRead { path, source }),
            };
            let old = read_value(&file, &path)?;
            if old != "1" {
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| ConntrackError::SysctlWrite {
                        path: path.clone(),
                        value: "1".to_owned(),
                        source,
                    })?;
                write_value(&file, &path, "1")?;
                log::info!("set {} to 1 (was {old})", path.display());
                guard.changed.push(Changed { path, file, old });
            }
        }
        Ok(guard)
    }

    /// Puts back the values this guard changed, in reverse order. A sysctl no longer 1 was
    /// changed by someone else since, and is left alone. Tries every sysctl and returns the
    /// first error.
    pub fn restore(mut self) -> Result<(), ConntrackError> {
        self.restore_changed()
    }

    fn restore_changed(&mut self) -> Result<(), ConntrackError> {
        let mut first_error = None;
        while let Some(Changed { path, file, old }) = self.changed.pop() {
            let result = read_value(&file, &path).and_then(|now| {
                if now == "1" {
                    write_value(&file, &path, &old)?;
                    log::info!("restored {} to {old}", path.display());
                } else {
                    log::warn!(
                        "left {} at {now}: changed by someone else since it was set to 1",
                        path.display()
                    );
                }
                Ok(())
            });
            if let Err(e) = result {
                log::warn!("{e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for ConntrackSysctls {
    fn drop(&mut self) {
        // Errors are logged by restore_changed; nothing else can be done with them here.
        let _ = self.restore_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throw-away directory standing in for /proc/sys/net/netfilter.
    struct FakeDir(PathBuf);

    impl FakeDir {
        fn new(tag: &str, values: &[(&str, &str)]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ctnl-sysctl-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            for (name, value) in values {
                fs::write(dir.join(name), format!("{value}\n")).unwrap();
            }
            Self(dir)
        }

        fn get(&self, name: &str) -> String {
            fs::read_to_string(self.0.join(name))
                .unwrap()
                .trim()
                .to_owned()
        }
    }

    impl Drop for FakeDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn enables_and_restores_only_what_it_changed() {
        let dir = FakeDir::new(
            "restore",
            &[
                ("nf_conntrack_events", "2"),
                ("nf_conntrack_acct", "1"),
                ("nf_conntrack_timestamp", "0"),
            ],
        );
        let guard = ConntrackSysctls::enable_in(&dir.0).unwrap();
        for name in WANTED {
            assert_eq!(dir.get(name), "1", "{name}");
        }
        assert_eq!(guard.changed.len(), 2);
        guard.restore().unwrap();
        assert_eq!(dir.get("nf_conntrack_events"), "2");
        assert_eq!(dir.get("nf_conntrack_acct"), "1");
        assert_eq!(dir.get("nf_conntrack_timestamp"), "0");
    }

    #[test]
    fn drop_restores_and_leaves_values_changed_by_others() {
        let dir = FakeDir::new(
            "drop",
            &[
                ("nf_conntrack_events", "0"),
                ("nf_conntrack_acct", "0"),
                ("nf_conntrack_timestamp", "0"),
            ],
        );
        let guard = ConntrackSysctls::enable_in(&dir.0).unwrap();
        fs::write(dir.0.join("nf_conntrack_acct"), "1\n").unwrap(); // still 1: restored
        fs::write(dir.0.join("nf_conntrack_timestamp"), "2\n").unwrap(); // someone else's
        drop(guard);
        assert_eq!(dir.get("nf_conntrack_events"), "0");
        assert_eq!(dir.get("nf_conntrack_acct"), "0");
        assert_eq!(dir.get("nf_conntrack_timestamp"), "2");
    }

    #[test]
    fn missing_sysctl_is_named_and_nothing_changes() {
        let dir = FakeDir::new(
            "missing",
            &[("nf_conntrack_events", "2"), ("nf_conntrack_acct", "0")],
        );
        let err = ConntrackSysctls::enable_in(&dir.0).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConntrackError::SysctlMissing { .. }));
        assert!(
            msg.contains("nf_conntrack_timestamp not found: is nf_conntrack loaded"),
            "{msg}"
        );
        assert_eq!(dir.get("nf_conntrack_events"), "2");
        assert_eq!(dir.get("nf_conntrack_acct"), "0");
    }
}
