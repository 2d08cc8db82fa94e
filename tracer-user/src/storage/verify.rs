//! Complete integrity check of a data directory (`nattrace verify`): every byte of every
//! sealed columnar segment against its checksums, leaf hashes and Merkle root, every row
//! against its fence and the filters, the counts of the summary, and the hash chain across
//! segments with the retention ledger. Row-format segments and logs get the checks their
//! format allows (frame checksums, decoding).
//!
//! Reading only: no lock is taken, and files that appear, vanish or are renamed meanwhile (an
//! agent sealing its log, a retention run) are taken as found. The ledger is read last, so a
//! segment deleted while this runs is in it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::checkpoint::{self, Checkpoint};
use super::columnar::{
    self, ColumnarError, ExtKey, Fence, FileReader, HEADER_LEN, ReadAt, SUMMARY_LEN, SealedSegment,
    TRAILER_LEN,
};
use super::filter::{self, Fuse8};
use super::merkle::{self, Hash};
use super::record;
use super::retention::{self, LedgerEntry, list_segment_files, record_binding};
use super::segment::{self, FormatError, FrameAt, Record};
use super::{ReadProblem, SEALED_EXT, SEGMENTS_DIR, StorageError, error_chain, segment_name};
use crate::signing::VerifierKey;

/// What kind of file a segment file turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// A sealed columnar segment (`NATTRCOL`): checksummed, hashed and chained.
    Columnar,
    /// A sealed segment of the first, row-oriented format (`NATTRSEG`): checksummed only.
    Row,
    /// A log (`.open`, magic `NATTRLOG` or the first format's `NATTRSEG`): unsealed.
    Log,
    /// Unrecognisable (bad magic, too short, unreadable).
    Unknown,
}

/// How a columnar segment links to its predecessor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// `prev_seq` 0: it starts the chain.
    Start,
    /// Chained to this present segment.
    Segment(u32),
    /// Chained to this segment, deleted by retention and recorded in the ledger.
    Ledger(u32),
    /// Names this segment, which is present but too damaged to check the link.
    Unchecked(u32),
    /// Names this segment, which is neither present nor in the ledger.
    Missing(u32),
}

/// The outcome for one segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentReport {
    /// The file.
    pub path: PathBuf,
    /// Sequence number from the file name.
    pub seq: u32,
    /// What it is.
    pub kind: SegmentKind,
    /// Binding rows (records, in a log or row segment) that were checked.
    pub rows: u64,
    /// Rows the summary of a columnar segment counts (more than `rows` when blocks are
    /// unreadable).
    pub rows_expected: Option<u64>,
    /// Coverage events that were checked.
    pub events: u64,
    /// The Merkle root (columnar segments whose summary is readable).
    pub root: Option<Hash>,
    /// The link to the previous segment (columnar segments whose header is readable).
    pub link: Option<Link>,
    /// The writer id (columnar segments whose header is readable).
    pub writer_id: Option<[u8; 16]>,
    /// Number of problems found in or about this file (listed in [`VerifyReport::problems`]).
    pub problems: usize,
    /// Remarks that are not problems.
    pub notes: Vec<String>,
}

/// What the ledger held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerReport {
    /// `DIR/ledger`.
    pub path: PathBuf,
    /// The file exists.
    pub present: bool,
    /// Valid entries.
    pub entries: usize,
    /// Lowest and highest sequence number recorded as deleted.
    pub seq_range: Option<(u32, u32)>,
    /// Number of problems found in the ledger.
    pub problems: usize,
    /// Remarks that are not problems.
    pub notes: Vec<String>,
}

/// Everything [`verify_dir`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// One per segment file, by sequence number (`.open` before `.seg` of the same number).
    pub segments: Vec<SegmentReport>,
    /// The retention ledger.
    pub ledger: LedgerReport,
    /// Every problem, each naming a file and the byte offset where it is.
    pub problems: Vec<ReadProblem>,
    /// The segments' signed checkpoints ([`check_signatures`]).
    pub signatures: SignatureReport,
}

/// What [`check_signatures`] found about the sealed segments' checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignatureReport {
    /// The key checked against (verifier key text); `None`: signatures were not checked.
    pub key: Option<String>,
    /// Segments whose checkpoint describes them and verifies with the key (or, without a
    /// key, that have a checkpoint at all).
    pub signed: Vec<u32>,
    /// Sealed segments without a checkpoint.
    pub unsigned: Vec<u32>,
    /// Names of other signers seen on the checkpoints (cosignatures, not verified here).
    pub cosigners: Vec<String>,
}

impl VerifyReport {
    /// Nothing is wrong: every check passed.
    #[must_use]
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Offset of `prev_seq` in a columnar header.
const PREV_SEQ_OFFSET: u64 = 32;
/// Offset of `prev_root` in a columnar header.
const PREV_ROOT_OFFSET: u64 = 40;

/// Checks every segment file of `dir` and the chain they form with the retention ledger.
///
/// Errors only for the directory itself: missing ([`StorageError::NotFound`]), permission
/// denied (also on a segment file or the ledger), or failing to list. Everything wrong inside
/// the files is a problem in the report.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, StorageError> {
    retention::check_dir(dir)?;
    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut report = VerifyReport::default();
    let mut chain = Vec::new();
    for (seq, sealed, path) in list_segment_files(&seg_dir)? {
        let mut f = FileCheck::new(path, seq);
        let Some(found) = f.check(sealed, &seg_dir)? else {
            continue;
        };
        if report.segments.iter().any(|s| s.path == f.report.path) {
            // An `.open` renamed to its `.seg`, which was listed too: checked once.
            continue;
        }
        if let Some(node) = found {
            chain.push(node);
        }
        f.report.problems = f.problems.len();
        report.problems.append(&mut f.problems);
        report.segments.push(f.report);
    }
    // Last: whatever retention deleted while the segments were read is in it by now.
    let ledger_path = dir.join(retention::LEDGER_FILE);
    let ledger = retention::read_ledger(dir)?;
    report.ledger = LedgerReport {
        path: ledger_path.clone(),
        present: ledger.present,
        entries: ledger.entries.len(),
        seq_range: ledger
            .entries
            .iter()
            .map(|(_, e)| e.seq)
            .min()
            .zip(ledger.entries.iter().map(|(_, e)| e.seq).max()),
        problems: ledger.problems.len(),
        notes: Vec::new(),
    };
    report.problems.extend(ledger.problems);
    if let Some(at) = ledger.torn_tail {
        report.ledger.notes.push(format!(
            "offset {at}: last line incomplete (a retention run was cut short before deleting \
             its segment); ignored"
        ));
    }
    check_chain(&mut report, chain, &ledger.entries, &ledger_path);
    Ok(report)
}

/// A columnar segment or a ledger entry, as a link of the chain.
#[derive(Clone, Debug)]
struct Node {
    seq: u32,
    /// `None`: the file's header or summary is too damaged to know.
    link: Option<NodeLink>,
    writer_id: Option<[u8; 16]>,
    /// Index into `report.segments`, or `None` for a ledger entry.
    segment: Option<usize>,
    /// Where problems about this node are reported.
    path: PathBuf,
    /// Offset of the ledger line (ledger entries), else 0.
    offset: u64,
}

#[derive(Clone, Copy, Debug)]
struct NodeLink {
    /// `None` when the summary is unreadable (the header alone is known).
    root: Option<Hash>,
    prev_seq: u32,
    prev_root: Hash,
}

/// One file being checked: its report and problems.
struct FileCheck {
    report: SegmentReport,
    problems: Vec<ReadProblem>,
}

/// An opened file and its first bytes (`None` if unreadable), or `None` if it vanished.
type Opened = Option<(Option<File>, Vec<u8>)>;

/// A chain node for a columnar segment (`Some`) or nothing (`None`), or the file vanished.
type Checked = Option<Option<Node>>;

impl FileCheck {
    fn new(path: PathBuf, seq: u32) -> Self {
        Self {
            report: SegmentReport {
                path,
                seq,
                kind: SegmentKind::Unknown,
                rows: 0,
                rows_expected: None,
                events: 0,
                root: None,
                link: None,
                writer_id: None,
                problems: 0,
                notes: Vec::new(),
            },
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, offset: u64, cause: impl Into<String>) {
        self.problems.push(ReadProblem {
            path: self.report.path.clone(),
            offset,
            cause: cause.into(),
        });
    }

    fn columnar_problem(&mut self, (offset, e): (u64, ColumnarError)) {
        let mut cause = error_chain(&e);
        if matches!(
            e,
            ColumnarError::BadMagic {
                what: "trailer",
                ..
            }
        ) {
            cause.push_str(" (file truncated, or not completely written?)");
        }
        self.problem(offset, cause);
    }

    /// Checks the file. `Ok(None)`: it vanished before it could be read.
    fn check(&mut self, sealed: bool, seg_dir: &Path) -> Result<Checked, StorageError> {
        let (file, magic) = match self.open(sealed, seg_dir)? {
            Some(found) => found,
            None => return Ok(None),
        };
        let Some(file) = file else {
            return Ok(Some(self.unknown_node(sealed)));
        };
        let sealed = self
            .report
            .path
            .extension()
            .is_some_and(|e| e == SEALED_EXT);
        match (&magic, sealed) {
            (m, true) if *m == columnar::MAGIC => {
                self.report.kind = SegmentKind::Columnar;
                let reader = FileReader::new(file)
                    .map_err(|e| StorageError::io("read", &self.report.path, e))?;
                Ok(Some(Some(self.check_columnar(&reader))))
            }
            (m, _) if *m == segment::MAGIC || *m == segment::LOG_MAGIC => {
                let data = read_rest(file, &magic, &self.report.path)?;
                if *m == segment::LOG_MAGIC {
                    if sealed {
                        self.problem(
                            0,
                            "a log (magic NATTRLOG) under a sealed segment's name (.seg)",
                        );
                    }
                    self.report.kind = SegmentKind::Log;
                    self.check_rows(&data, false);
                } else {
                    self.report.kind = if sealed {
                        SegmentKind::Row
                    } else {
                        SegmentKind::Log
                    };
                    self.check_rows(&data, sealed);
                }
                Ok(Some(None))
            }
            (m, false) if *m == columnar::MAGIC => {
                self.problem(
                    0,
                    "a sealed columnar segment (magic NATTRCOL) under a log's name (.open)",
                );
                Ok(Some(None))
            }
            _ if !sealed && magic.len() < 8 => {
                // A log whose header is not completely written yet.
                self.report.kind = SegmentKind::Log;
                self.report.notes.push("header not written yet".to_owned());
                Ok(Some(None))
            }
            _ => {
                let cause = if magic.len() < 8 {
                    format!("file too short for a segment ({} bytes)", magic.len())
                } else {
                    format!("not a nattrace segment (bad magic {magic:02x?})")
                };
                self.problem(0, cause);
                Ok(Some(self.unknown_node(sealed)))
            }
        }
    }

    /// A damaged sealed file still takes a place in the chain (its links are not checked).
    fn unknown_node(&self, sealed: bool) -> Option<Node> {
        sealed.then(|| Node {
            seq: self.report.seq,
            link: None,
            writer_id: None,
            segment: None,
            path: self.report.path.clone(),
            offset: 0,
        })
    }

    /// Opens the file and reads its magic (up to 8 bytes). An `.open` file renamed to `.seg`
    /// since the listing is taken under its new name. `None`: vanished; `Some((None, _))`:
    /// unreadable (a problem is recorded).
    fn open(&mut self, sealed: bool, seg_dir: &Path) -> Result<Opened, StorageError> {
        let mut file = match File::open(&self.report.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !sealed => {
                let renamed = seg_dir.join(segment_name(self.report.seq, SEALED_EXT));
                match File::open(&renamed) {
                    Ok(f) => {
                        self.report.path = renamed;
                        f
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return self.open_error(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return self.open_error(e),
        };
        let mut magic = Vec::with_capacity(8);
        if let Err(e) = (&mut file).take(8).read_to_end(&mut magic) {
            return self.open_error(e);
        }
        Ok(Some((Some(file), magic)))
    }

    fn open_error(&mut self, e: io::Error) -> Result<Opened, StorageError> {
        if e.kind() == io::ErrorKind::PermissionDenied {
            return Err(StorageError::PermissionDenied {
                path: self.report.path.clone(),
            });
        }
        self.problem(0, format!("read error: {e}"));
        Ok(Some((None, Vec::new())))
    }

    // ----------------------------------------------------------------------------------
    // Columnar segments
    // ----------------------------------------------------------------------------------

    fn check_columnar(&mut self, src: &dyn ReadAt) -> Node {
        let mut node = Node {
            seq: self.report.seq,
            link: None,
            writer_id: None,
            segment: None,
            path: self.report.path.clone(),
            offset: 0,
        };
        let seg = match SealedSegment::open(src) {
            Ok(seg) => seg,
            Err(e) => {
                // The header alone may still tell the chain fields.
                if e.0 != 0
                    && let Ok(h) = src
                        .read_at(0, HEADER_LEN)
                        .map_err(ColumnarError::from)
                        .and_then(|b| columnar::SegmentHeader::decode(&b))
                {
                    node.link = Some(NodeLink {
                        root: None,
                        prev_seq: h.prev_seq,
                        prev_root: h.prev_root,
                    });
                    node.writer_id = Some(h.writer_id);
                    self.report.writer_id = Some(h.writer_id);
                }
                self.columnar_problem(e);
                return node;
            }
        };
        let h = seg.header;
        let s = seg.summary;
        self.report.root = Some(s.root);
        self.report.rows_expected = Some(s.rows);
        self.report.writer_id = Some(h.writer_id);
        node.writer_id = Some(h.writer_id);
        node.link = Some(NodeLink {
            root: Some(s.root),
            prev_seq: h.prev_seq,
            prev_root: h.prev_root,
        });
        let summary_at = seg.file_len - (SUMMARY_LEN + TRAILER_LEN) as u64;
        if h.seq != self.report.seq {
            self.problem(
                12,
                format!(
                    "header sequence number {} does not match the file name's {}",
                    h.seq, self.report.seq
                ),
            );
        }
        if h.window_end_ns < h.window_start_ns {
            self.problem(72, "window ends before it starts");
        }
        if s.t_lo_ns > s.t_hi_ns {
            self.problem(summary_at, "summary time bounds reversed (t_lo after t_hi)");
        }

        // Filters first, so that every row's keys can be looked up as its block is decoded.
        let ext_filter = self.load_filter(seg.ext_filter(src), "external", s.ext_filter.offset);
        let int_filter = self.load_filter(seg.int_filter(src), "internal", s.int_filter.offset);

        // Events: checksum, leaf hash, decoding, count.
        let ev = s.events_section;
        match src.read_at(ev.offset, ev.len as usize) {
            Err(e) => self.problem(ev.offset, format!("events section: read error: {e}")),
            Ok(bytes) => {
                let crc = crc32c::crc32c(&bytes);
                if crc != ev.crc {
                    self.problem(
                        ev.offset,
                        format!(
                            "events section checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                            ev.crc
                        ),
                    );
                } else if !events_leaf_matches(seg.version, &bytes, &s.events_leaf) {
                    self.problem(
                        ev.offset,
                        "events section leaf hash does not match the summary's",
                    );
                } else {
                    match seg.events(src) {
                        Ok(events) => {
                            self.report.events = events.len() as u64;
                            if events.len() as u64 != u64::from(s.events) {
                                self.problem(
                                    summary_at,
                                    format!(
                                        "summary counts {} coverage events, the events section holds {}",
                                        s.events,
                                        events.len()
                                    ),
                                );
                            }
                        }
                        Err(e) => self.columnar_problem(e),
                    }
                }
            }
        }

        // Blocks.
        let fences = match seg.fences(src) {
            Ok(f) => f,
            Err(e) => {
                self.columnar_problem(e);
                return node;
            }
        };
        self.check_layout(&seg, &fences);
        let mut counts = Counts::default();
        let mut ext_misses = Misses::default();
        let mut int_misses = Misses::default();
        let mut prev_hi: Option<ExtKey> = None;
        // Version 2: every row's record leaf, for the segment root.
        let mut record_leaves: Option<Vec<Hash>> =
            (seg.version >= 2).then(|| Vec::with_capacity(s.rows.min(1 << 24) as usize + 1));
        for (i, fence) in fences.iter().enumerate() {
            if prev_hi.is_some_and(|p| p > fence.key_lo) {
                self.problem(
                    fence.block.offset,
                    format!("block {i}: key range starts before the previous block's ends"),
                );
            }
            prev_hi = Some(fence.key_hi);
            if fence.t_lo_ns < s.t_lo_ns || fence.t_hi_ns > s.t_hi_ns {
                self.problem(
                    fence.block.offset,
                    format!("block {i}: time range outside the summary's"),
                );
            }
            if seg.version >= 2
                && i + 1 < fences.len()
                && fence.rows as usize != columnar::BLOCK_ROWS
            {
                self.problem(
                    fence.block.offset,
                    format!(
                        "block {i}: {} rows; every block but the last holds {}",
                        fence.rows,
                        columnar::BLOCK_ROWS
                    ),
                );
            }
            let Some(rows) = self.check_block(
                src,
                seg.version,
                i,
                fence,
                (h.window_start_ns, h.window_end_ns),
            ) else {
                counts.unknown = true;
                record_leaves = None;
                continue;
            };
            if let Some(leaves) = record_leaves.as_mut() {
                leaves.extend(rows.iter().map(record::leaf));
            }
            for (j, r) in rows.iter().enumerate() {
                let (ip, port) = r.binding.external();
                if let Some(f) = &ext_filter {
                    ext_misses.check(f, filter::key(ip, port), || (i, j, ip, Some(port)));
                }
                let (iip, _) = r.binding.internal();
                if let Some(f) = &int_filter {
                    int_misses.check(f, filter::key(iip, 0), || (i, j, iip, None));
                }
                counts.rows += 1;
                counts.carried += u64::from(r.carried);
                counts.open += u64::from(r.binding.end_ns.is_none());
            }
        }
        self.report.rows = counts.rows;
        ext_misses.report(self, "external", s.ext_filter.offset);
        int_misses.report(self, "internal", s.int_filter.offset);
        if !counts.unknown
            && (counts.rows, counts.carried, counts.open) != (s.rows, s.carried_rows, s.open_rows)
        {
            self.problem(
                summary_at,
                format!(
                    "summary counts {} rows ({} carried, {} open), the blocks hold {} ({}, {})",
                    s.rows, s.carried_rows, s.open_rows, counts.rows, counts.carried, counts.open
                ),
            );
        }
        if seg.version >= 2 {
            // The root over every row's record leaf (recomputed from the decoded rows) and
            // the events leaf (checked against the events above). Unknown when a block
            // could not be decoded; that block's problem is already reported.
            if let Some(mut leaves) = record_leaves {
                leaves.push(s.events_leaf);
                if merkle::root(&leaves) != s.root {
                    self.problem(
                        summary_at,
                        "Merkle root does not match the records' and the events' leaf hashes",
                    );
                }
            }
        } else {
            // Version 1: the root over the fences' leaf hashes (each checked against its
            // block's bytes) and the events leaf (checked against the events bytes).
            let mut leaves: Vec<Hash> = fences.iter().map(|f| f.leaf).collect();
            leaves.push(s.events_leaf);
            if merkle::root(&leaves) != s.root {
                self.problem(
                    summary_at,
                    "Merkle root does not match the blocks' and the events' leaf hashes",
                );
            }
        }
        node
    }

    fn load_filter(
        &mut self,
        r: Result<Fuse8, (u64, ColumnarError)>,
        what: &str,
        offset: u64,
    ) -> Option<Fuse8> {
        match r {
            Ok(f) => Some(f),
            Err(e) => {
                let (at, e) = e;
                self.problem(
                    at.max(offset),
                    format!("{what} filter: {}", error_chain(&e)),
                );
                None
            }
        }
    }

    /// Reads, authenticates and decodes block `i`; checks its rows against the fence.
    /// `None` when the block cannot be decoded (a problem is recorded).
    fn check_block(
        &mut self,
        src: &dyn ReadAt,
        version: u32,
        i: usize,
        fence: &Fence,
        window: (i64, i64),
    ) -> Option<Vec<columnar::Row>> {
        let at = fence.block.offset;
        if fence.block.len as usize > columnar::MAX_BLOCK_LEN {
            self.problem(
                at,
                format!("block {i}: length {} too large", fence.block.len),
            );
            return None;
        }
        let bytes = match src.read_at(at, fence.block.len as usize) {
            Ok(b) => b,
            Err(e) => {
                self.problem(at, format!("block {i}: read error: {e}"));
                return None;
            }
        };
        let crc = crc32c::crc32c(&bytes);
        if crc != fence.block.crc {
            self.problem(
                at,
                format!(
                    "block {i}: checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                    fence.block.crc
                ),
            );
            return None;
        }
        if version < 2 && merkle::leaf_hash(&bytes) != fence.leaf {
            self.problem(
                at,
                format!("block {i}: leaf hash does not match its fence's"),
            );
            return None;
        }
        let rows = match columnar::decode_block(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.problem(at, format!("block {i}: {}", error_chain(&e)));
                return None;
            }
        };
        if version >= 2 {
            let leaves: Vec<Hash> = rows.iter().map(record::leaf).collect();
            if merkle::root(&leaves) != fence.leaf {
                self.problem(
                    at,
                    format!("block {i}: the root over its records does not match its fence's"),
                );
            }
        }
        if rows.len() != fence.rows as usize {
            self.problem(
                at,
                format!(
                    "block {i}: {} rows, its fence says {}",
                    rows.len(),
                    fence.rows
                ),
            );
        }
        let first = rows.first().map(|r| r.binding.external());
        let last = rows.last().map(|r| r.binding.external());
        if first != Some(fence.key_lo) || last != Some(fence.key_hi) {
            self.problem(
                at,
                format!(
                    "block {i}: first and last keys {} .. {} differ from its fence's {} .. {}",
                    key_text(first),
                    key_text(last),
                    key_text(Some(fence.key_lo)),
                    key_text(Some(fence.key_hi))
                ),
            );
        }
        if let Some(j) = rows
            .windows(2)
            .position(|w| columnar::row_order(&w[0].binding, &w[1].binding).is_gt())
        {
            self.problem(at, format!("block {i}: row {} is out of order", j + 1));
        }
        if let Some((j, (lo, hi))) = rows
            .iter()
            .map(|r| columnar::answer_interval(r, window.0, window.1))
            .enumerate()
            .find(|(_, (lo, hi))| *lo < fence.t_lo_ns || *hi > fence.t_hi_ns)
        {
            self.problem(
                at,
                format!(
                    "block {i}: row {j} answers for {lo} .. {hi} ns, outside its fence's time \
                     range {} .. {} ns",
                    fence.t_lo_ns, fence.t_hi_ns
                ),
            );
        }
        Some(rows)
    }

    /// The header, the blocks, the sections and the summary with its trailer must cover the
    /// file exactly: no byte outside them escapes the checksums.
    fn check_layout(&mut self, seg: &SealedSegment, fences: &[Fence]) {
        let s = &seg.summary;
        let mut parts: Vec<(u64, u64, String)> = vec![(0, HEADER_LEN as u64, "header".into())];
        for (i, f) in fences.iter().enumerate() {
            parts.push((f.block.offset, u64::from(f.block.len), format!("block {i}")));
        }
        for (what, sec) in [
            ("events section", s.events_section),
            ("external filter", s.ext_filter),
            ("internal filter", s.int_filter),
            ("fences", s.fences),
        ] {
            parts.push((sec.offset, u64::from(sec.len), what.into()));
        }
        let tail = (SUMMARY_LEN + TRAILER_LEN) as u64;
        parts.push((seg.file_len - tail, tail, "summary".into()));
        parts.sort();
        let mut end = 0u64;
        let mut prev = String::new();
        for (offset, len, what) in parts {
            if offset > end {
                self.problem(
                    end,
                    format!(
                        "{} bytes after the {prev} belong to no section",
                        offset - end
                    ),
                );
            } else if offset < end {
                self.problem(offset, format!("the {what} overlaps the {prev}"));
            }
            end = end.max(offset.saturating_add(len));
            prev = what;
        }
    }

    // ----------------------------------------------------------------------------------
    // Row-format segments and logs
    // ----------------------------------------------------------------------------------

    /// Checks a row-format sealed segment (`sealed`) or a log: header, every frame's checksum,
    /// decompression and records; for a sealed one the seal frame and its counts. In a log an
    /// incomplete or torn last frame (being written, or left by a crash) is not a problem.
    fn check_rows(&mut self, data: &[u8], sealed: bool) {
        let before = self.problems.len();
        match segment::Header::decode(data) {
            Err(FormatError::ShortHeader { .. }) if !sealed => {
                self.report.notes.push("header not written yet".to_owned());
                return;
            }
            Err(e) => return self.problem(0, error_chain(&e)),
            Ok(h) if h.seq != self.report.seq => self.problem(
                0,
                error_chain(&FormatError::SequenceMismatch {
                    header: h.seq,
                    name: self.report.seq,
                }),
            ),
            Ok(_) => {}
        }
        let mut found = segment::Seal::default();
        let mut seal: Option<(usize, segment::Seal)> = None;
        let mut offset = segment::HEADER_LEN;
        let mut cut_short = false;
        loop {
            let next = match segment::frame_at(data, offset) {
                FrameAt::End => break,
                FrameAt::Good { payload, next } => {
                    if seal.is_some() {
                        self.problem(offset as u64, error_chain(&FormatError::MisplacedSeal));
                    }
                    found.data_frames += 1;
                    match segment::decompress(payload) {
                        Ok(payload) => {
                            let mut records = Vec::new();
                            let mut errors = Vec::new();
                            segment::decode_records(
                                &payload,
                                |r| records.push(r),
                                |e| errors.push(e),
                            );
                            for e in errors {
                                self.problem(offset as u64, error_chain(&e));
                            }
                            if let [Record::Seal(s)] = records.as_slice() {
                                found.data_frames -= 1;
                                seal = Some((offset, *s));
                            } else {
                                for r in &records {
                                    match r {
                                        Record::Seal(_) => self.problem(
                                            offset as u64,
                                            error_chain(&FormatError::MisplacedSeal),
                                        ),
                                        Record::Event(_) => found.event_records += 1,
                                        other => {
                                            if record_binding(other).is_some() {
                                                found.binding_records += 1;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        Err(e) => self.problem(offset as u64, error_chain(&e)),
                    }
                    next
                }
                FrameAt::BadChecksum { next, .. } if !sealed && next == data.len() => {
                    self.report.notes.push(format!(
                        "offset {offset}: torn last frame (fails its checksum); recovery cuts it"
                    ));
                    cut_short = true;
                    break;
                }
                FrameAt::BadChecksum { error, next } => {
                    found.data_frames += 1;
                    self.problem(offset as u64, error_chain(&error));
                    next
                }
                FrameAt::Incomplete(e) => {
                    if sealed {
                        self.problem(offset as u64, error_chain(&e));
                    } else {
                        self.report.notes.push(format!(
                            "offset {offset}: incomplete last frame (being written, or torn by a crash)"
                        ));
                    }
                    cut_short = true;
                    break;
                }
                FrameAt::BadLength(e) => {
                    if sealed || data[offset..].iter().any(|&b| b != 0) {
                        self.problem(offset as u64, error_chain(&e));
                    } else {
                        self.report.notes.push(format!(
                            "offset {offset}: zero-filled tail (left by a crash); recovery cuts it"
                        ));
                    }
                    cut_short = true;
                    break;
                }
            };
            offset = next;
        }
        self.report.rows = found.binding_records;
        self.report.events = found.event_records;
        match seal {
            None if sealed && !cut_short => {
                self.problem(data.len() as u64, error_chain(&FormatError::MissingSeal));
            }
            Some((at, _)) if !sealed => self.report.notes.push(format!(
                "offset {at}: holds a seal frame (sealed, not yet renamed: a crash; recovery \
                 renames it)"
            )),
            Some((at, s))
                if self.problems.len() == before
                    && (s.binding_records, s.event_records, s.data_frames)
                        != (
                            found.binding_records,
                            found.event_records,
                            found.data_frames,
                        ) =>
            {
                self.problem(
                    at as u64,
                    error_chain(&FormatError::SealMismatch {
                        sealed_bindings: s.binding_records,
                        sealed_events: s.event_records,
                        sealed_frames: s.data_frames,
                        bindings: found.binding_records,
                        events: found.event_records,
                        frames: found.data_frames,
                    }),
                );
            }
            _ => {}
        }
    }
}

/// The rest of a file whose first bytes (`head`) were read.
fn read_rest(mut file: File, head: &[u8], path: &Path) -> Result<Vec<u8>, StorageError> {
    let mut data = head.to_vec();
    file.read_to_end(&mut data)
        .map_err(|e| StorageError::io("read", path, e))?;
    Ok(data)
}

#[derive(Default)]
struct Counts {
    rows: u64,
    carried: u64,
    open: u64,
    /// Some block could not be decoded: the counts are incomplete.
    unknown: bool,
}

/// Keys a filter does not contain: how many, and the first.
#[derive(Default)]
struct Misses {
    checked: u64,
    missed: u64,
    first: Option<(usize, usize, IpAddr, Option<u16>)>,
}

impl Misses {
    fn check(
        &mut self,
        f: &Fuse8,
        key: u64,
        which: impl FnOnce() -> (usize, usize, IpAddr, Option<u16>),
    ) {
        self.checked += 1;
        if !f.contains(key) {
            self.missed += 1;
            self.first.get_or_insert_with(which);
        }
    }

    fn report(&self, f: &mut FileCheck, what: &str, offset: u64) {
        if let Some((block, row, ip, port)) = self.first {
            let key = match port {
                Some(p) => key_text(Some((ip, p))),
                None => ip.to_string(),
            };
            f.problem(
                offset,
                format!(
                    "{what} filter lacks {} of {} row keys (first: {key}, block {block} row {row})",
                    self.missed, self.checked
                ),
            );
        }
    }
}

fn key_text(k: Option<ExtKey>) -> String {
    match k {
        Some((IpAddr::V6(ip), port)) => format!("[{ip}]:{port}"),
        Some((ip, port)) => format!("{ip}:{port}"),
        None => "-".to_owned(),
    }
}

/// The chain: in sequence order, each columnar segment (and each segment the ledger records
/// as deleted) must name the one before it, with that one's root.
fn check_chain(
    report: &mut VerifyReport,
    mut nodes: Vec<Node>,
    ledger: &[(u64, LedgerEntry)],
    ledger_path: &Path,
) {
    // Index of each segment report by path, to attach links, notes and problem counts.
    let index: HashMap<PathBuf, usize> = report
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.path.clone(), i))
        .collect();
    for n in &mut nodes {
        n.segment = index.get(&n.path).copied();
    }
    let mut problems: Vec<(Option<usize>, ReadProblem)> = Vec::new();
    let mut problem = |seg: Option<usize>, path: &Path, offset: u64, cause: String| {
        problems.push((
            seg,
            ReadProblem {
                path: path.to_owned(),
                offset,
                cause,
            },
        ));
    };
    let min_present = report
        .segments
        .iter()
        .filter(|s| s.kind != SegmentKind::Log)
        .map(|s| s.seq)
        .min();
    let mut by_seq: BTreeMap<u32, Node> = BTreeMap::new();
    for n in nodes {
        by_seq.entry(n.seq).or_insert(n);
    }
    // Ledger entries of columnar segments join the chain; one still present must agree.
    let mut last_ledger: Option<u32> = None;
    for (offset, e) in ledger {
        if last_ledger.is_some_and(|l| e.seq <= l) {
            problem(
                None,
                ledger_path,
                *offset,
                format!(
                    "ledger entry for segment {} after one for segment {} (retention deletes \
                     oldest first)",
                    seq_name(e.seq),
                    seq_name(last_ledger.unwrap_or(0))
                ),
            );
            continue;
        }
        last_ledger = Some(e.seq);
        let still_present = report
            .segments
            .iter()
            .any(|s| s.seq == e.seq && s.kind != SegmentKind::Log);
        if !still_present && let Some(m) = min_present.filter(|m| *m < e.seq) {
            // Not retention's doing (it deletes oldest first), but recorded: the chain
            // still verifies through the entry.
            report.ledger.notes.push(format!(
                "offset {offset}: records segment {} as deleted although older segment {} is \
                 kept (not deleted by retention, which deletes oldest first)",
                seq_name(e.seq),
                seq_name(m)
            ));
        }
        let Some(c) = e.chain else {
            if let Some(s) = report
                .segments
                .iter_mut()
                .find(|s| s.seq == e.seq && s.kind == SegmentKind::Row)
            {
                s.notes.push(format!(
                    "recorded as deleted in the ledger (offset {offset}) but still present: a \
                     retention run was interrupted; the next one deletes it"
                ));
            }
            continue;
        };
        let ledger_root = c.root;
        match by_seq.get(&e.seq) {
            Some(present) => {
                let (seg, path) = (present.segment, present.path.clone());
                match present.link {
                    Some(l) if l.root.is_some_and(|r| r != ledger_root) => problem(
                        seg,
                        &path,
                        0,
                        format!(
                            "root differs from the one the ledger recorded at offset {offset} \
                             when deleting segment {}",
                            seq_name(e.seq)
                        ),
                    ),
                    _ => {
                        if let Some(i) = seg {
                            report.segments[i].notes.push(format!(
                                "recorded as deleted in the ledger (offset {offset}) but still \
                                 present: a retention run was interrupted; the next one deletes it"
                            ));
                        }
                    }
                }
            }
            None => {
                by_seq.insert(
                    e.seq,
                    Node {
                        seq: e.seq,
                        link: Some(NodeLink {
                            root: Some(c.root),
                            prev_seq: c.prev_seq,
                            prev_root: c.prev_root,
                        }),
                        writer_id: None,
                        segment: None,
                        path: ledger_path.to_owned(),
                        offset: *offset,
                    },
                );
            }
        }
    }

    let mut claimed: HashMap<u32, u32> = HashMap::new();
    let mut previous: Option<&Node> = None;
    let mut previous_writer: Option<[u8; 16]> = None;
    for n in by_seq.values() {
        let Some(l) = n.link else {
            // Too damaged to know its links; it is reported already.
            previous = Some(n);
            continue;
        };
        // The node before this one, unless too damaged to tell what it was.
        let known_previous = previous.filter(|p| p.link.is_some());
        let from_ledger = n.segment.is_none();
        let (seq_at, root_at) = if from_ledger {
            (n.offset, n.offset)
        } else {
            (PREV_SEQ_OFFSET, PREV_ROOT_OFFSET)
        };
        let what = if from_ledger {
            format!("ledger entry for segment {}: ", seq_name(n.seq))
        } else {
            String::new()
        };
        let link = if l.prev_seq == 0 {
            if l.prev_root != [0; 32] {
                problem(
                    n.segment,
                    &n.path,
                    root_at,
                    format!("{what}prev_seq is 0 but prev_root is not all zero"),
                );
            }
            if let Some(p) = known_previous {
                problem(
                    n.segment,
                    &n.path,
                    seq_at,
                    format!(
                        "{what}starts a new chain (prev_seq 0), but segment {} comes before it{}",
                        seq_name(p.seq),
                        if p.segment.is_none() {
                            " (deleted, in the ledger)"
                        } else {
                            ""
                        }
                    ),
                );
            }
            Link::Start
        } else if l.prev_seq >= n.seq {
            problem(
                n.segment,
                &n.path,
                seq_at,
                format!(
                    "{what}names segment {} as its predecessor, not an older one",
                    seq_name(l.prev_seq)
                ),
            );
            Link::Missing(l.prev_seq)
        } else {
            match by_seq.get(&l.prev_seq) {
                None => {
                    problem(
                        n.segment,
                        &n.path,
                        seq_at,
                        format!(
                            "{what}segment {} missing: not in the retention ledger",
                            seq_name(l.prev_seq)
                        ),
                    );
                    Link::Missing(l.prev_seq)
                }
                Some(p) => {
                    let link = if p.link.is_none_or(|pl| pl.root.is_none()) {
                        Link::Unchecked(p.seq)
                    } else if p.segment.is_none() {
                        Link::Ledger(p.seq)
                    } else {
                        Link::Segment(p.seq)
                    };
                    if let Some(other) = claimed.insert(p.seq, n.seq) {
                        problem(
                            n.segment,
                            &n.path,
                            seq_at,
                            format!(
                                "{what}names segment {} as its predecessor, as segment {} does \
                                 (the chain forks)",
                                seq_name(p.seq),
                                seq_name(other)
                            ),
                        );
                    } else if let Some(q) = known_previous.filter(|q| q.seq != p.seq) {
                        problem(
                            n.segment,
                            &n.path,
                            seq_at,
                            format!(
                                "{what}names segment {} as its predecessor, skipping segment {}",
                                seq_name(p.seq),
                                seq_name(q.seq)
                            ),
                        );
                    }
                    if let Some(root) = p.link.and_then(|pl| pl.root)
                        && root != l.prev_root
                    {
                        problem(
                            n.segment,
                            &n.path,
                            root_at,
                            format!(
                                "{what}prev_root {} does not match the root {} of segment {}{}",
                                short_hex(&l.prev_root),
                                short_hex(&root),
                                seq_name(p.seq),
                                if p.segment.is_none() {
                                    " (as recorded in the ledger)"
                                } else {
                                    ""
                                }
                            ),
                        );
                    }
                    link
                }
            }
        };
        if let Some(i) = n.segment {
            report.segments[i].link = Some(link);
            if let (Some(w), Some(pw)) = (n.writer_id, previous_writer)
                && w != pw
            {
                report.segments[i].notes.push(format!(
                    "writer id changed from {} to {} (another writer: the data directory was \
                     moved, restored or re-created)",
                    retention::hex(&pw),
                    retention::hex(&w)
                ));
            }
            if n.writer_id.is_some() {
                previous_writer = n.writer_id;
            }
        }
        previous = Some(n);
    }
    for (seg, p) in problems {
        match seg {
            Some(i) => report.segments[i].problems += 1,
            None if p.path == ledger_path => report.ledger.problems += 1,
            None => {}
        }
        report.problems.push(p);
    }
}

/// The file name stem of segment `seq`: `00000003`.
#[must_use]
pub fn seq_name(seq: u32) -> String {
    format!("{seq:08}")
}

/// The first 8 hex digits of a hash and an ellipsis: `1a2b3c4d…`.
#[must_use]
pub fn short_hex(h: &Hash) -> String {
    format!("{}…", &retention::hex(&h[..4]))
}

#[cfg(test)]
mod tests;

/// The events leaf of a segment of format `version` matches its stored events section.
fn events_leaf_matches(version: u32, stored: &[u8], leaf: &Hash) -> bool {
    if version < 2 {
        return merkle::leaf_hash(stored) == *leaf;
    }
    segment::decompress(stored).is_ok_and(|raw| record::events_leaf_of_records(&raw) == *leaf)
}

/// Checks the signed checkpoint of every intact sealed columnar segment of `report` (from
/// [`verify_dir`] on `dir`): with `key`, each must exist, describe its segment exactly
/// (origin, size, root, previous root, window) and carry a valid signature by `key`, else a
/// problem is added; without `key`, the checkpoints are only counted and their bodies
/// compared. Segments of format version 1 (sealed before signing existed) are noted, not
/// required to be signed.
pub fn check_signatures(dir: &Path, key: Option<&VerifierKey>, report: &mut VerifyReport) {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut sig = SignatureReport {
        key: key.map(VerifierKey::to_text),
        ..SignatureReport::default()
    };
    let mut problems = Vec::new();
    for s in &report.segments {
        if s.kind != SegmentKind::Columnar || s.problems > 0 {
            continue;
        }
        let seg = match std::fs::File::open(&s.path)
            .and_then(columnar::FileReader::new)
            .map_err(|e| e.to_string())
            .and_then(|r| SealedSegment::open(&r).map_err(|(_, e)| e.to_string()))
        {
            Ok(seg) => seg,
            Err(e) => {
                problems.push(ReadProblem {
                    path: s.path.clone(),
                    offset: 0,
                    cause: format!("cannot reopen to check its checkpoint: {e}"),
                });
                continue;
            }
        };
        let path = checkpoint::checkpoint_path(&seg_dir, s.seq);
        let mut problem = |cause: String| {
            problems.push(ReadProblem {
                path: path.clone(),
                offset: 0,
                cause,
            });
        };
        let note = match checkpoint::read_checkpoint(&seg_dir, s.seq) {
            Ok(Some(n)) => n,
            Ok(None) => {
                sig.unsigned.push(s.seq);
                if key.is_some() && seg.version >= 2 {
                    problem(format!(
                        "missing: segment {} has no signed checkpoint",
                        seq_name(s.seq)
                    ));
                }
                continue;
            }
            Err(e) => {
                problem(error_chain(&e));
                continue;
            }
        };
        if note.text != Checkpoint::of_segment(&seg).body() {
            problem(format!(
                "does not describe segment {} (its size, root, previous root or window differ)",
                seq_name(s.seq)
            ));
            continue;
        }
        for other in &note.signatures {
            if key.is_none_or(|k| k.name() != other.name) && !sig.cosigners.contains(&other.name) {
                sig.cosigners.push(other.name.clone());
            }
        }
        if let Some(k) = key
            && let Err(e) = note.verify(k)
        {
            problem(format!("signature by {}: {e}", k.name()));
            continue;
        }
        sig.signed.push(s.seq);
    }
    report.problems.extend(problems);
    report.signatures = sig;
}
