//! On-disk storage of bindings and coverage events: append-only segment files in a data
//! directory, written by one agent ([`Writer`]) and read by any number of readers
//! ([`read_all`]). The exact format is described in FORMAT.md at the repository root.
//!
//! Layout of a data directory:
//!
//! ```text
//! DIR/LOCK                    flock held by the running agent; holds its pid
//! DIR/segments/00000001.seg   sealed segments
//! DIR/segments/00000002.open  the active segment (at most one while an agent runs)
//! ```

pub mod checkpoint;
pub mod columnar;
pub mod filter;
mod lock;
pub mod merkle;
pub mod prove;
mod reader;
pub mod record;
pub mod retention;
pub mod seal;
pub mod segment;
pub mod verify;
mod writer;

use std::io;
use std::path::{Path, PathBuf};

use crate::binding::Binding;

pub use reader::{Search, read_all, read_events, search};
pub use writer::{Writer, WriterOptions};

/// Name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the directory holding the segment files inside a data directory.
pub const SEGMENTS_DIR: &str = "segments";
/// File name extension of the active (unsealed) segment.
pub const OPEN_EXT: &str = "open";
/// File name extension of a sealed segment.
pub const SEALED_EXT: &str = "seg";

/// Why events were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum LossCause {
    /// The eBPF ring buffer was full: binding starts were dropped in the kernel.
    RingFull = 1,
    /// The ctnetlink socket overran (ENOBUFS): conntrack events were dropped.
    NetlinkOverrun = 2,
    /// Writing to the data directory failed: records were dropped.
    DiskError = 3,
    /// The eBPF ring buffer was full: binding ends were dropped in the kernel (fentry and
    /// kprobe backends, which capture ends themselves).
    RingFullEnd = 4,
}

impl LossCause {
    /// All causes, in the order they are reported.
    pub const ALL: [Self; 4] = [
        Self::RingFull,
        Self::RingFullEnd,
        Self::NetlinkOverrun,
        Self::DiskError,
    ];

    /// Name as printed: "ring_full", "ring_full_end", "netlink_overrun", "disk_error".
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::RingFullEnd => "ring_full_end",
            Self::NetlinkOverrun => "netlink_overrun",
            Self::DiskError => "disk_error",
        }
    }

    /// The cause stored as `v` in a loss record.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::RingFull),
            2 => Some(Self::NetlinkOverrun),
            3 => Some(Self::DiskError),
            4 => Some(Self::RingFullEnd),
            _ => None,
        }
    }
}

/// An event about capture itself, telling when nattrace was (not) recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoverageEvent {
    /// The agent process started.
    AgentStart {
        /// Nanoseconds since the Unix epoch.
        t_ns: i64,
        /// Process id of the agent.
        pid: u32,
    },
    /// Capture is running from here on.
    Attached {
        /// Nanoseconds since the Unix epoch.
        t_ns: i64,
        /// Which capture backend (free text, at most 4096 bytes stored).
        backend: String,
    },
    /// The agent is alive and capturing (written with every flush, at least once a second).
    Heartbeat {
        /// Nanoseconds since the Unix epoch.
        t_ns: i64,
    },
    /// Capture stopped.
    Detached {
        /// Nanoseconds since the Unix epoch.
        t_ns: i64,
    },
    /// The agent process stopped in an orderly way.
    AgentStop {
        /// Nanoseconds since the Unix epoch.
        t_ns: i64,
    },
    /// Events were lost.
    Loss {
        /// Nanoseconds since the Unix epoch (when the loss was noticed).
        t_ns: i64,
        /// Why.
        cause: LossCause,
        /// How many events were lost.
        count: u64,
        /// Free text (at most 4096 bytes stored).
        detail: String,
    },
}

impl CoverageEvent {
    /// When the event happened, nanoseconds since the Unix epoch.
    #[must_use]
    pub fn t_ns(&self) -> i64 {
        match self {
            Self::AgentStart { t_ns, .. }
            | Self::Attached { t_ns, .. }
            | Self::Heartbeat { t_ns }
            | Self::Detached { t_ns }
            | Self::AgentStop { t_ns }
            | Self::Loss { t_ns, .. } => *t_ns,
        }
    }
}

/// Everything readable in a data directory.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The latest record of each binding id, by start time then id.
    pub bindings: Vec<Binding>,
    /// All coverage events, by time (events with equal times in the order written).
    pub events: Vec<CoverageEvent>,
    /// What could not be read.
    pub problems: Vec<ReadProblem>,
    /// Number of segment files.
    pub segments: usize,
    /// Total size of the segment files in bytes.
    pub bytes_on_disk: u64,
    /// `DIR/LOCK` is held by a live agent.
    pub agent_running: bool,
    /// Blocks of sealed segments read (each one read of the file).
    pub blocks_read: u64,
}

/// A part of a segment file that could not be read. Reading went on past it where possible.
/// In JSON: `{"path": "...", "offset": n, "cause": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReadProblem {
    /// The segment file.
    #[serde(serialize_with = "display_path")]
    pub path: PathBuf,
    /// Byte offset in the file where the problem starts (a header or frame start).
    pub offset: u64,
    /// What is wrong, in words.
    pub cause: String,
}

/// A path as text (lossy for names that are not UTF-8), as every report prints it.
fn display_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&path.display())
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The data directory does not exist.
    #[error("{path}: no such directory")]
    NotFound {
        /// The data directory.
        path: PathBuf,
    },
    /// Reading or writing a file or directory of the data directory was refused.
    #[error("{path}: permission denied")]
    PermissionDenied {
        /// The file or directory refused.
        path: PathBuf,
    },
    /// Another agent holds the data directory's lock.
    #[error("{path} is held by another nattrace agent ({})", holder(*.pid))]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid as written in the lock file, if readable.
        pid: Option<u32>,
    },
    /// Any other I/O error.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done ("create", "write", "fsync", "rename", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A segment file is not valid (only where it cannot become a [`ReadProblem`]).
    #[error("{path}: offset {offset}: invalid segment")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        #[source]
        source: segment::FormatError,
    },
    /// All segment sequence numbers (32 bits) are used up.
    #[error("{path}: segment sequence numbers exhausted")]
    SequenceExhausted {
        /// The segments directory.
        path: PathBuf,
    },
}

fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"))
}

impl StorageError {
    /// Classifies an I/O error on `path`: permission and not-found errors get their variants.
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::PermissionDenied => Self::PermissionDenied {
                path: path.to_owned(),
            },
            _ => Self::Io {
                op,
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// Name of segment `seq` with extension `ext`.
pub(crate) fn segment_name(seq: u32, ext: &str) -> String {
    format!("{seq:08}.{ext}")
}

/// The sequence number and sealed-ness of a segment file name, or `None` for other files.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u32, bool)> {
    let (num, ext) = name.split_once('.')?;
    if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let seq = num.parse().ok()?;
    match ext {
        SEALED_EXT => Some((seq, true)),
        OPEN_EXT => Some((seq, false)),
        _ => None,
    }
}

/// The full text of an error and its causes, joined by ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the tests of the storage, query and coverage modules.

    use crate::binding::{Binding, Counters, IPPROTO_TCP, IPS_SRC_NAT, StartSource, Tuple};

    /// A TCP SNAT binding of `internal` (100.64.0.x:port) to 203.0.113.7:`ext_port`.
    pub(crate) fn binding(id: u64, ext_port: u16, start_ns: i64, end_ns: Option<i64>) -> Binding {
        Binding {
            id,
            proto: IPPROTO_TCP,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT,
            orig: Tuple {
                src: "100.64.0.10".parse().unwrap(),
                dst: "192.0.2.2".parse().unwrap(),
                src_port: 40000,
                dst_port: 443,
            },
            reply: Tuple {
                src: "192.0.2.2".parse().unwrap(),
                dst: "203.0.113.7".parse().unwrap(),
                src_port: 443,
                dst_port: ext_port,
            },
            start_ns,
            start_approximate: false,
            start_source: StartSource::Ring,
            end_ns,
            end_approximate: false,
            orig_counters: end_ns.map(|_| Counters {
                packets: 10,
                bytes: 1000,
            }),
            reply_counters: end_ns.map(|_| Counters {
                packets: 8,
                bytes: 9000,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(7, SEALED_EXT), "00000007.seg");
        assert_eq!(parse_segment_name("00000007.seg"), Some((7, true)));
        assert_eq!(
            parse_segment_name("4294967295.open"),
            Some((u32::MAX, false))
        );
        assert_eq!(parse_segment_name("4294967296.open"), None);
        assert_eq!(parse_segment_name("x0000007.seg"), None);
        assert_eq!(parse_segment_name("00000007.seg.tmp"), None);
        assert_eq!(parse_segment_name(".seg"), None);
    }

    #[test]
    fn locked_error_names_holder() {
        let e = StorageError::Locked {
            path: "/d/LOCK".into(),
            pid: Some(42),
        };
        assert_eq!(
            e.to_string(),
            "/d/LOCK is held by another nattrace agent (pid 42)"
        );
    }
}
