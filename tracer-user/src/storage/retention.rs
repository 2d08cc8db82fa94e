//! Retention: deleting whole sealed segments whose every record is older than a cutoff,
//! oldest first, and the ledger `DIR/ledger` that records each deletion so that the hash
//! chain of the remaining segments still verifies (FORMAT.md, "Retention ledger").
//!
//! Deletion of one segment is: append its ledger entry, fsync the ledger, unlink the segment,
//! fsync `DIR/segments`. A crash after the fsync of the ledger and before the unlink leaves an
//! entry for a segment still present: harmless (`verify` notes it, the next run deletes the
//! segment without writing the entry again). A crash in the middle of an append leaves a last
//! line without its newline: its segment was not deleted; `verify` notes it and the next run
//! cuts it off before appending.
//!
//! Retention only touches sealed segments, so it runs while an agent writes the directory
//! and takes no data directory lock. Runs exclude each other with an exclusive `flock(2)` on
//! the ledger file itself, and a segment that vanishes meanwhile is skipped.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::columnar::{self, FileReader, SealedSegment};
use super::merkle::Hash;
use super::segment::{self, FrameAt, Record};
use super::{ReadProblem, SEGMENTS_DIR, StorageError, parse_segment_name};
use crate::binding::Binding;

/// Name of the ledger file inside a data directory.
pub const LEDGER_FILE: &str = "ledger";
/// First field of every ledger entry this code writes and the only one it reads.
pub const LEDGER_VERSION: &str = "v1";

/// Which format a sealed segment is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFormat {
    /// Columnar, hashed and chained (magic `NATTRCOL`); `col` in the ledger.
    Columnar,
    /// The first, row-oriented format (magic `NATTRSEG`); `row` in the ledger.
    Row,
}

impl SegmentFormat {
    /// The ledger's name: `col` or `row`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Columnar => "col",
            Self::Row => "row",
        }
    }
}

/// A columnar segment's place in the hash chain, as its header and summary say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLink {
    /// The segment's Merkle root (`summary.root`).
    pub root: Hash,
    /// `header.prev_seq`.
    pub prev_seq: u32,
    /// `header.prev_root`.
    pub prev_root: Hash,
}

/// One line of the ledger: a deleted segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Sequence number of the deleted segment.
    pub seq: u32,
    /// The chain fields of a columnar segment; `None` for the row format.
    pub chain: Option<ChainLink>,
    /// The latest time the segment answered for, ns since the epoch.
    pub t_hi_ns: i64,
    /// When the entry was written (just before the unlink), ns since the epoch.
    pub deleted_at_ns: i64,
}

impl LedgerEntry {
    /// The segment's format.
    #[must_use]
    pub fn format(&self) -> SegmentFormat {
        if self.chain.is_some() {
            SegmentFormat::Columnar
        } else {
            SegmentFormat::Row
        }
    }

    /// The entry as one line, newline included:
    /// `v1 <seq> <col|row> <root> <prev_seq> <prev_root> <t_hi> <deleted_at> <crc>\n`.
    #[must_use]
    pub fn encode(&self) -> String {
        let (root, prev_seq, prev_root) = match &self.chain {
            Some(c) => (hex(&c.root), c.prev_seq.to_string(), hex(&c.prev_root)),
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        let body = format!(
            "{LEDGER_VERSION} {} {} {root} {prev_seq} {prev_root} {} {}",
            self.seq,
            self.format().as_str(),
            rfc3339(self.t_hi_ns),
            rfc3339(self.deleted_at_ns),
        );
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body} {crc:08x}\n")
    }

    /// Parses one line (without its newline). The error is the cause, in words.
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        let line = std::str::from_utf8(line).map_err(|_| "not UTF-8 text".to_owned())?;
        let (body, crc) = line
            .rsplit_once(' ')
            .ok_or_else(|| "not a ledger entry (no checksum field)".to_owned())?;
        let stored = (crc.len() == 8
            && crc.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u32::from_str_radix(crc, 16).ok())
        .flatten()
        .ok_or_else(|| format!("checksum field '{crc}' is not 8 lower-case hex digits"))?;
        let computed = crc32c::crc32c(body.as_bytes());
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let f: Vec<&str> = body.split(' ').collect();
        if f.first() != Some(&LEDGER_VERSION) {
            return Err(format!(
                "unsupported ledger entry version '{}' (this build reads {LEDGER_VERSION})",
                f.first().copied().unwrap_or("")
            ));
        }
        if f.len() != 8 {
            return Err(format!("{} fields, expected 9", f.len() + 1));
        }
        let seq: u32 =
            parse_decimal(f[1]).ok_or_else(|| format!("bad sequence number '{}'", f[1]))?;
        let chain = match f[2] {
            "col" => Some(ChainLink {
                root: parse_hash(f[3]).ok_or_else(|| format!("bad root '{}'", f[3]))?,
                prev_seq: parse_decimal(f[4]).ok_or_else(|| format!("bad prev_seq '{}'", f[4]))?,
                prev_root: parse_hash(f[5]).ok_or_else(|| format!("bad prev_root '{}'", f[5]))?,
            }),
            "row" if f[3..6] == ["-", "-", "-"] => None,
            "row" => return Err("a row-format entry has chain fields".to_owned()),
            other => return Err(format!("unknown segment format '{other}'")),
        };
        let t_hi_ns = parse_rfc3339(f[6]).ok_or_else(|| format!("bad time '{}'", f[6]))?;
        let deleted_at_ns = parse_rfc3339(f[7]).ok_or_else(|| format!("bad time '{}'", f[7]))?;
        Ok(Self {
            seq,
            chain,
            t_hi_ns,
            deleted_at_ns,
        })
    }
}

/// The ledger as read: the entries that passed their checks and what is wrong with the rest.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// The ledger file exists.
    pub present: bool,
    /// Valid entries in file order, with the byte offset of their line.
    pub entries: Vec<(u64, LedgerEntry)>,
    /// Lines that are not valid entries (each skipped).
    pub problems: Vec<ReadProblem>,
    /// Offset of a last line without its newline: an append cut short by a crash, whose
    /// segment was not deleted. Not a problem; ignored.
    pub torn_tail: Option<u64>,
}

/// Reads `DIR/ledger`. A missing ledger is an empty one.
pub fn read_ledger(dir: &Path) -> Result<Ledger, StorageError> {
    let path = dir.join(LEDGER_FILE);
    match fs::read(&path) {
        Ok(data) => Ok(parse_ledger(&path, &data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ledger::default()),
        Err(e) => Err(StorageError::io("read", &path, e)),
    }
}

/// Parses the bytes of a ledger file at `path` (the path only names problems).
#[must_use]
pub fn parse_ledger(path: &Path, data: &[u8]) -> Ledger {
    let mut ledger = Ledger {
        present: true,
        ..Ledger::default()
    };
    let mut at = 0usize;
    while at < data.len() {
        let Some(len) = data[at..].iter().position(|&b| b == b'\n') else {
            ledger.torn_tail = Some(at as u64);
            break;
        };
        let line = &data[at..at + len];
        let result = if line.is_empty() {
            Err("empty line".to_owned())
        } else {
            LedgerEntry::parse(line)
        };
        match result {
            Ok(e) => ledger.entries.push((at as u64, e)),
            Err(cause) => ledger.problems.push(ReadProblem {
                path: path.to_owned(),
                offset: at as u64,
                cause: format!("ledger entry: {cause}"),
            }),
        }
        at += len + 1;
    }
    ledger
}

/// Why retention stopped at a segment (it and every later one are kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// The newest sealed segment: binding ids continue from it.
    Newest,
    /// A log (`.open`): being written or awaiting recovery.
    Unsealed,
    /// It answers for times at or after the cutoff.
    Recent {
        /// The latest time it answers for, ns.
        t_hi_ns: i64,
    },
    /// Its age cannot be read (a problem is reported).
    Unreadable,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Newest => f.write_str("the newest sealed segment (binding ids continue from it)"),
            Self::Unsealed => f.write_str("unsealed (being written or awaiting recovery)"),
            Self::Recent { t_hi_ns } => write!(f, "holds records up to {}", short_time(*t_hi_ns)),
            Self::Unreadable => f.write_str("its age cannot be read"),
        }
    }
}

/// A segment deleted by retention (or that would be, in a dry run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Sequence number.
    pub seq: u32,
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: SegmentFormat,
    /// The latest time it answered for, ns.
    pub t_hi_ns: i64,
}

/// Where retention stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Sequence number of the first segment kept.
    pub seq: u32,
    /// Its file.
    pub path: PathBuf,
    /// Why it is kept.
    pub reason: KeepReason,
}

/// What [`apply_retention`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments whose every record is older than this (ns) may be deleted.
    pub cutoff_ns: i64,
    /// Nothing was deleted or written.
    pub dry_run: bool,
    /// Segments deleted (would be deleted, in a dry run), oldest first.
    pub deleted: Vec<Expired>,
    /// The first segment kept, if any segment is left.
    pub stopped_at: Option<Stop>,
    /// Segments that could not be judged (retention stops at the first).
    pub problems: Vec<ReadProblem>,
}

/// Deletes the sealed segments of `dir` whose every record is older than `now_ns - keep`,
/// oldest first, stopping at the first segment that must be kept (so only a prefix of the
/// segments goes): one answering for any time at or after the cutoff, the newest sealed
/// segment, a log (`.open`), or one whose age cannot be read. Each deletion is recorded in
/// `DIR/ledger` (and the ledger fsynced) before the unlink; see the module documentation for
/// what a crash leaves. With `dry_run`, reports what would be deleted and changes nothing.
///
/// Safe while an agent writes `dir`. Errors: `dir` missing ([`StorageError::NotFound`]),
/// permission denied, and I/O errors on the ledger or an unlink.
pub fn apply_retention(
    dir: &Path,
    keep: Duration,
    now_ns: i64,
    dry_run: bool,
) -> Result<RetentionReport, StorageError> {
    check_dir(dir)?;
    let keep_ns = i64::try_from(keep.as_nanos()).unwrap_or(i64::MAX);
    let cutoff_ns = now_ns.saturating_sub(keep_ns);
    let mut report = RetentionReport {
        cutoff_ns,
        dry_run,
        deleted: Vec::new(),
        stopped_at: None,
        problems: Vec::new(),
    };
    // Taken before listing, so that a second run waits and then sees the first one's work.
    let mut ledger = if dry_run {
        None
    } else {
        Some(LedgerWriter::open(dir)?)
    };
    let seg_dir = dir.join(SEGMENTS_DIR);
    let files = list_segment_files(&seg_dir)?;
    let newest_sealed = files.iter().filter(|f| f.1).map(|f| f.0).max();
    for (seq, sealed, path) in files {
        let stop = |reason| Stop {
            seq,
            path: path.clone(),
            reason,
        };
        if !sealed {
            report.stopped_at = Some(stop(KeepReason::Unsealed));
            break;
        }
        if Some(seq) == newest_sealed {
            report.stopped_at = Some(stop(KeepReason::Newest));
            break;
        }
        let age = match segment_age(&path) {
            Ok(Some(age)) => age,
            // Deleted meanwhile (another tool): nothing to do.
            Ok(None) => continue,
            Err(problem) => {
                report.problems.push(problem);
                report.stopped_at = Some(stop(KeepReason::Unreadable));
                break;
            }
        };
        if age.t_hi_ns >= cutoff_ns {
            report.stopped_at = Some(stop(KeepReason::Recent {
                t_hi_ns: age.t_hi_ns,
            }));
            break;
        }
        if let Some(ledger) = ledger.as_mut() {
            let entry = LedgerEntry {
                seq,
                chain: age.chain,
                t_hi_ns: age.t_hi_ns,
                deleted_at_ns: now_ns,
            };
            ledger.record(&entry)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("delete", &path, e)),
            }
            sync_dir(&seg_dir)?;
        }
        report.deleted.push(Expired {
            seq,
            path,
            format: if age.chain.is_some() {
                SegmentFormat::Columnar
            } else {
                SegmentFormat::Row
            },
            t_hi_ns: age.t_hi_ns,
        });
    }
    Ok(report)
}

/// The ledger opened for appending, locked against other retention runs until dropped.
struct LedgerWriter {
    file: File,
    path: PathBuf,
    /// The last valid entry (not written again when a run was interrupted before its unlink).
    last: Option<LedgerEntry>,
}

impl LedgerWriter {
    fn open(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.join(LEDGER_FILE);
        let created = !path.exists();
        // Mode 0640 and the data directory's group (`crate::access`).
        let access = crate::access::of_data_dir(dir)?;
        let mut file = crate::access::create_file(
            &path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            &access,
        )
        .map_err(|e| StorageError::io("open", &path, e))?;
        if created {
            // The ledger's directory entry must be durable before any segment goes.
            sync_dir(dir)?;
        }
        file.lock()
            .map_err(|e| StorageError::io("lock", &path, e))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| StorageError::io("read", &path, e))?;
        let parsed = parse_ledger(&path, &data);
        if let Some(at) = parsed.torn_tail {
            // An append cut short by a crash: its segment was not deleted.
            file.set_len(at)
                .and_then(|()| file.sync_data())
                .map_err(|e| StorageError::io("truncate", &path, e))?;
        }
        Ok(Self {
            last: parsed.entries.last().map(|(_, e)| *e),
            file,
            path,
        })
    }

    /// Appends `entry` and fsyncs, unless the last entry already records this segment.
    fn record(&mut self, entry: &LedgerEntry) -> Result<(), StorageError> {
        if self
            .last
            .is_some_and(|l| l.seq == entry.seq && l.chain == entry.chain)
        {
            return Ok(());
        }
        let io = |e| StorageError::io("write", &self.path, e);
        self.file.seek(SeekFrom::End(0)).map_err(io)?;
        self.file.write_all(entry.encode().as_bytes()).map_err(io)?;
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("fsync", &self.path, e))?;
        self.last = Some(*entry);
        Ok(())
    }
}

/// How old a sealed segment is and, for a columnar one, its chain fields.
#[derive(Clone, Copy, Debug)]
struct Age {
    t_hi_ns: i64,
    chain: Option<ChainLink>,
}

/// The age of the sealed segment at `path`: `Ok(None)` when it vanished, `Err` when it cannot
/// be told (permission problems included: the segment is then kept).
fn segment_age(path: &Path) -> Result<Option<Age>, ReadProblem> {
    let problem = |offset: u64, cause: String| ReadProblem {
        path: path.to_owned(),
        offset,
        cause,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(problem(0, format!("cannot open: {e}"))),
    };
    let mut magic = [0u8; 8];
    if let Err(e) = file.read_exact(&mut magic) {
        return Err(problem(0, format!("cannot read the magic: {e}")));
    }
    if magic == columnar::MAGIC {
        let reader = FileReader::new(file).map_err(|e| problem(0, format!("cannot read: {e}")))?;
        let seg =
            SealedSegment::open(&reader).map_err(|(at, e)| problem(at, super::error_chain(&e)))?;
        return Ok(Some(Age {
            t_hi_ns: seg.summary.t_hi_ns.max(seg.header.window_end_ns),
            chain: Some(ChainLink {
                root: seg.summary.root,
                prev_seq: seg.header.prev_seq,
                prev_root: seg.header.prev_root,
            }),
        }));
    }
    if magic == segment::MAGIC {
        let mut data = magic.to_vec();
        file.read_to_end(&mut data)
            .map_err(|e| problem(0, format!("cannot read: {e}")))?;
        return row_segment_age(&data)
            .map(|t_hi_ns| {
                Some(Age {
                    t_hi_ns,
                    chain: None,
                })
            })
            .map_err(|(at, cause)| problem(at, cause));
    }
    Err(problem(
        0,
        format!("not a sealed segment (magic {magic:02x?})"),
    ))
}

/// The latest time of a row-format (`NATTRSEG`) sealed segment: its seal time, or a record's
/// time if later. Without a readable seal record its age is unknown.
fn row_segment_age(data: &[u8]) -> Result<i64, (u64, String)> {
    let header = segment::Header::decode(data).map_err(|e| (0, super::error_chain(&e)))?;
    let mut latest = header.created_ns;
    let mut sealed = None;
    let mut offset = segment::HEADER_LEN;
    loop {
        let (payload, next) = match segment::frame_at(data, offset) {
            FrameAt::Good { payload, next } => (Some(payload), next),
            FrameAt::BadChecksum { next, .. } => (None, next),
            FrameAt::End | FrameAt::Incomplete(_) | FrameAt::BadLength(_) => break,
        };
        if let Some(payload) = payload.and_then(|p| segment::decompress(p).ok()) {
            segment::decode_records(
                &payload,
                |r| match r {
                    Record::Seal(s) => sealed = Some(s.sealed_ns),
                    Record::Event(e) => latest = latest.max(e.t_ns()),
                    other => {
                        if let Some(b) = record_binding(&other) {
                            latest = latest.max(b.end_ns.unwrap_or(b.start_ns));
                        }
                    }
                },
                |_| {},
            );
        }
        offset = next;
    }
    sealed.map(|s| s.max(latest)).ok_or_else(|| {
        (
            data.len() as u64,
            "no readable seal record: age unknown".to_owned(),
        )
    })
}

/// The binding of a binding record (carried or not).
pub(crate) fn record_binding(r: &Record) -> Option<&Binding> {
    match r {
        Record::Binding(b) | Record::Carried(b) => Some(b),
        _ => None,
    }
}

/// The segment files of `seg_dir` as (sequence number, sealed, path), by sequence number then
/// `.open` before `.seg`. A missing directory holds none.
pub(crate) fn list_segment_files(
    seg_dir: &Path,
) -> Result<Vec<(u32, bool, PathBuf)>, StorageError> {
    let mut files = Vec::new();
    match fs::read_dir(seg_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io("list", seg_dir, e))?;
                if let Some((seq, sealed)) = entry.file_name().to_str().and_then(parse_segment_name)
                {
                    files.push((seq, sealed, entry.path()));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("list", seg_dir, e)),
    }
    files.sort();
    Ok(files)
}

/// `dir` exists and is a directory.
pub(crate) fn check_dir(dir: &Path) -> Result<(), StorageError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(StorageError::NotFound {
            path: dir.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound {
            path: dir.to_owned(),
        }),
        Err(e) => Err(StorageError::io("read", dir, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("fsync", dir, e))
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(h)
}

/// A decimal number without sign or leading zeros (other than "0").
fn parse_decimal(s: &str) -> Option<u32> {
    let canonical =
        !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// RFC 3339, UTC, nine fraction digits: `2026-11-02T10:14:07.000000000Z`.
fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// RFC 3339, UTC, fraction digits only as needed: `2026-11-02T10:14:05.5Z`.
fn short_time(ns: i64) -> String {
    let s = rfc3339(ns);
    let main = s
        .trim_end_matches('Z')
        .trim_end_matches('0')
        .trim_end_matches('.');
    format!("{main}Z")
}

/// Parses what [`rfc3339`] writes (exactly that form).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let ns = chrono::DateTime::parse_from_rfc3339(s)
        .ok()?
        .timestamp_nanos_opt()?;
    (rfc3339(ns) == s).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::columnar::{Row, SegmentHeader, encode_segment};
    use crate::storage::testutil::binding;
    use crate::storage::verify::{Link, verify_dir};
    use crate::storage::{OPEN_EXT, SEALED_EXT, segment_name};

    const DAY: i64 = 86_400_000_000_000;
    const T0: i64 = 1_793_577_600_000_000_000; // 2026-11-02T00:00:00Z

    fn seg_path(dir: &Path, seq: u32) -> PathBuf {
        dir.join(SEGMENTS_DIR).join(segment_name(seq, SEALED_EXT))
    }

    /// Columnar segments `1..=count`, chained, segment `n` covering day `n` after T0
    /// (window and bindings within `[T0 + n days, T0 + n days + 12 h]`). Returns the roots.
    fn write_chain(dir: &Path, count: u32) -> Vec<Hash> {
        fs::create_dir_all(dir.join(SEGMENTS_DIR)).unwrap();
        let mut prev = (0, [0u8; 32]);
        let mut roots = Vec::new();
        for seq in 1..=count {
            let start = T0 + i64::from(seq) * DAY;
            let h = SegmentHeader {
                seq,
                writer_id: [1; 16],
                prev_seq: prev.0,
                prev_root: prev.1,
                window_start_ns: start,
                window_end_ns: start + DAY / 2,
            };
            let rows = (0..5)
                .map(|i| Row {
                    binding: binding(
                        u64::from(seq) * 10 + i,
                        40_000,
                        start + i as i64,
                        Some(start + 1_000_000_000),
                    ),
                    carried: false,
                })
                .collect();
            let (bytes, root) = encode_segment(&h, rows, &[]);
            fs::write(seg_path(dir, seq), bytes).unwrap();
            roots.push(root);
            prev = (seq, root);
        }
        roots
    }

    fn present(dir: &Path) -> Vec<u32> {
        list_segment_files(&dir.join(SEGMENTS_DIR))
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect()
    }

    fn keep_days(d: u64) -> Duration {
        Duration::from_secs(d * 86_400)
    }

    #[test]
    fn ledger_line_format_is_exact_and_round_trips() {
        let e = LedgerEntry {
            seq: 3,
            chain: Some(ChainLink {
                root: [0xab; 32],
                prev_seq: 2,
                prev_root: [0x01; 32],
            }),
            t_hi_ns: T0 + 5,
            deleted_at_ns: T0 + DAY,
        };
        let line = e.encode();
        let body = format!(
            "v1 3 col {} 2 {} 2026-11-02T00:00:00.000000005Z 2026-11-03T00:00:00.000000000Z",
            "ab".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(
            line,
            format!("{body} {:08x}\n", crc32c::crc32c(body.as_bytes()))
        );
        assert_eq!(LedgerEntry::parse(line.trim_end().as_bytes()), Ok(e));
        let row = LedgerEntry {
            seq: 1,
            chain: None,
            t_hi_ns: T0,
            deleted_at_ns: T0,
        };
        assert!(
            row.encode()
                .starts_with("v1 1 row - - - 2026-11-02T00:00:00.000000000Z ")
        );
        assert_eq!(
            LedgerEntry::parse(row.encode().trim_end().as_bytes()),
            Ok(row)
        );
        // Any changed byte fails the checksum; other versions are refused.
        let mut bad = line.trim_end().to_owned().into_bytes();
        bad[3] = b'4';
        assert!(
            LedgerEntry::parse(&bad)
                .unwrap_err()
                .contains("checksum mismatch")
        );
        let v2 = "v2 1 row - - - x y";
        let v2 = format!("{v2} {:08x}", crc32c::crc32c(v2.as_bytes()));
        assert!(
            LedgerEntry::parse(v2.as_bytes())
                .unwrap_err()
                .contains("unsupported ledger entry version 'v2'")
        );
    }

    #[test]
    fn deletes_the_expired_prefix_and_the_chain_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let roots = write_chain(dir.path(), 5);
        // Now: day 10. Keep 7 days: cutoff day 3; segments 1 and 2 end before it.
        let now = T0 + 10 * DAY;
        let r = apply_retention(dir.path(), keep_days(7), now, false).unwrap();
        assert_eq!(r.cutoff_ns, T0 + 3 * DAY);
        assert_eq!(
            r.deleted.iter().map(|d| d.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(r.deleted[0].t_hi_ns, T0 + DAY + DAY / 2);
        assert_eq!(r.deleted[0].format, SegmentFormat::Columnar);
        let stop = r.stopped_at.unwrap();
        assert_eq!(stop.seq, 3);
        assert_eq!(
            stop.reason,
            KeepReason::Recent {
                t_hi_ns: T0 + 3 * DAY + DAY / 2
            }
        );
        assert!(r.problems.is_empty());
        assert_eq!(present(dir.path()), vec![3, 4, 5]);

        let ledger = read_ledger(dir.path()).unwrap();
        assert!(ledger.problems.is_empty() && ledger.torn_tail.is_none());
        let entries: Vec<LedgerEntry> = ledger.entries.iter().map(|e| e.1).collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].chain.unwrap().root, roots[0]);
        assert_eq!(entries[1].chain.unwrap().prev_root, roots[0]);
        assert_eq!(entries[1].deleted_at_ns, now);

        let v = verify_dir(dir.path()).unwrap();
        assert!(v.is_intact(), "{:#?}", v.problems);
        assert_eq!(v.segments[0].link, Some(Link::Ledger(2)));
        assert!(v.ledger.notes.is_empty(), "{:?}", v.ledger.notes);

        // Again, later: the ledger grows and still chains.
        let r = apply_retention(dir.path(), keep_days(7), now + DAY, false).unwrap();
        assert_eq!(r.deleted.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(read_ledger(dir.path()).unwrap().entries.len(), 3);
        assert!(verify_dir(dir.path()).unwrap().is_intact());
    }

    #[test]
    fn never_deletes_the_newest_sealed_segment_nor_past_a_log() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 3);
        let far = T0 + 1000 * DAY;
        let r = apply_retention(dir.path(), Duration::from_secs(1), far, false).unwrap();
        assert_eq!(r.deleted.len(), 2);
        assert_eq!(r.stopped_at.unwrap().reason, KeepReason::Newest);
        assert_eq!(present(dir.path()), vec![3]);

        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 4);
        fs::remove_file(seg_path(dir.path(), 2)).unwrap();
        fs::write(
            dir.path()
                .join(SEGMENTS_DIR)
                .join(segment_name(2, OPEN_EXT)),
            b"",
        )
        .unwrap();
        let r = apply_retention(dir.path(), Duration::from_secs(1), far, false).unwrap();
        assert_eq!(r.deleted.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(r.stopped_at.unwrap().reason, KeepReason::Unsealed);
    }

    #[test]
    fn dry_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 3);
        let r = apply_retention(dir.path(), Duration::from_secs(1), T0 + 1000 * DAY, true).unwrap();
        assert!(r.dry_run);
        assert_eq!(r.deleted.len(), 2);
        assert_eq!(present(dir.path()), vec![1, 2, 3]);
        assert!(!dir.path().join(LEDGER_FILE).exists());
    }

    #[test]
    fn unreadable_segment_stops_retention_with_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 3);
        let path = seg_path(dir.path(), 2);
        let mut data = fs::read(&path).unwrap();
        data[20] ^= 1;
        fs::write(&path, data).unwrap();
        let r =
            apply_retention(dir.path(), Duration::from_secs(1), T0 + 1000 * DAY, false).unwrap();
        assert_eq!(r.deleted.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(r.stopped_at.unwrap().reason, KeepReason::Unreadable);
        assert_eq!(r.problems.len(), 1);
        assert_eq!(
            (r.problems[0].path.as_path(), r.problems[0].offset),
            (path.as_path(), 0)
        );
    }

    #[test]
    fn interrupted_runs_are_completed_without_duplicate_entries() {
        let dir = tempfile::tempdir().unwrap();
        let roots = write_chain(dir.path(), 3);
        let ledger_path = dir.path().join(LEDGER_FILE);
        // A run that wrote the entry for segment 1 and crashed before the unlink, and one that
        // crashed in the middle of the entry for segment 2.
        let e1 = LedgerEntry {
            seq: 1,
            chain: Some(ChainLink {
                root: roots[0],
                prev_seq: 0,
                prev_root: [0; 32],
            }),
            t_hi_ns: T0 + DAY + DAY / 2,
            deleted_at_ns: T0 + 500 * DAY,
        };
        fs::write(&ledger_path, format!("{}v1 2 col 1f", e1.encode())).unwrap();
        let v = verify_dir(dir.path()).unwrap();
        assert!(v.is_intact(), "{:#?}", v.problems);
        assert_eq!(v.ledger.notes.len(), 1);
        assert!(v.segments[0].notes[0].contains("still present"));

        let r =
            apply_retention(dir.path(), Duration::from_secs(1), T0 + 1000 * DAY, false).unwrap();
        assert_eq!(r.deleted.len(), 2);
        let ledger = read_ledger(dir.path()).unwrap();
        assert!(ledger.torn_tail.is_none() && ledger.problems.is_empty());
        assert_eq!(
            ledger.entries.iter().map(|e| e.1.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(ledger.entries[0].1, e1);
        assert!(verify_dir(dir.path()).unwrap().is_intact());
    }

    #[test]
    fn row_segments_expire_by_their_seal_time() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(SEGMENTS_DIR)).unwrap();
        for seq in 1..=3u32 {
            let t = T0 + i64::from(seq) * DAY;
            let mut out = segment::Header {
                log: false,
                seq,
                created_ns: t,
                run: 1,
            }
            .encode()
            .to_vec();
            let mut p = Vec::new();
            segment::encode_binding(&mut p, &binding(u64::from(seq), 1, t, None));
            segment::encode_frame(&mut out, &p).unwrap();
            p.clear();
            segment::encode_seal(
                &mut p,
                &segment::Seal {
                    binding_records: 1,
                    event_records: 0,
                    data_frames: 1,
                    sealed_ns: t + DAY / 2,
                },
            );
            segment::encode_frame(&mut out, &p).unwrap();
            fs::write(seg_path(dir.path(), seq), out).unwrap();
        }
        // Cutoff exactly at segment 2's seal time: it is kept (its records are not older).
        let now = T0 + 2 * DAY + DAY / 2 + 7 * DAY;
        let r = apply_retention(dir.path(), keep_days(7), now, false).unwrap();
        assert_eq!(r.deleted.len(), 1);
        assert_eq!(r.deleted[0].format, SegmentFormat::Row);
        assert_eq!(r.deleted[0].t_hi_ns, T0 + DAY + DAY / 2);
        assert_eq!(r.stopped_at.unwrap().seq, 2);
        let ledger = read_ledger(dir.path()).unwrap();
        assert_eq!(ledger.entries[0].1.chain, None);
        assert!(verify_dir(dir.path()).unwrap().is_intact());
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            apply_retention(&dir.path().join("x"), Duration::from_secs(1), T0, false),
            Err(StorageError::NotFound { .. })
        ));
        // A directory without segments is fine.
        let r = apply_retention(dir.path(), Duration::from_secs(1), T0, false).unwrap();
        assert!(r.deleted.is_empty() && r.stopped_at.is_none());
    }
}
