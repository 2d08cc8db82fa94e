//! Sealed segment codec, format v1 (magic `NATTRCOL`): bindings stored by column in blocks
//! sorted by external address, port and start, with fence pointers, binary fuse filters and
//! an RFC 6962 Merkle root in the footer. FORMAT.md is the exact description; this module
//! is pure (bytes in, values out) except for [`ReadAt`], the seam through which readers fetch
//! byte ranges (and tests count block reads).

use std::cmp::Ordering;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use crate::binding::{Binding, Counters, StartSource, Tuple, is_icmp};

use super::CoverageEvent;
use super::filter::{self, Fuse8};
use super::merkle::{self, Hash};
use super::record;
use super::segment;

/// First eight bytes of a sealed segment, and last eight bytes of its trailer.
pub const MAGIC: [u8; 8] = *b"NATTRCOL";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// The oldest version this build reads (version 1 hashed whole blocks, not records).
pub const MIN_VERSION: u32 = 1;
/// Size of the header in bytes.
pub const HEADER_LEN: usize = 96;
/// Size of the trailer in bytes.
pub const TRAILER_LEN: usize = 16;
/// Size of the summary in bytes.
pub const SUMMARY_LEN: usize = 200;
/// Size of one fence pointer in bytes.
pub const FENCE_LEN: usize = 106;
/// Size of the fixed part of a block (before the column directory).
pub const BLOCK_HEADER_LEN: usize = 13;
/// Size of one column directory entry.
pub const COLUMN_ENTRY_LEN: usize = 10;
/// Rows per block the writer aims for (the last block of a segment holds the rest).
pub const BLOCK_ROWS: usize = 16_384;
/// Largest block (stored bytes), and largest total of its decoded columns, a reader accepts.
pub const MAX_BLOCK_LEN: usize = 64 << 20;
/// Unit of stored times: 1 ms. Starts are rounded down, ends up, so an interval only grows.
pub const TIME_UNIT_NS: i64 = 1_000_000;
/// zstd level of column data: level 3 is within 0.5 % of level 9's size on the benchmark
/// workload and about five times faster.
pub const ZSTD_LEVEL: i32 = 3;

/// Column ids (FORMAT.md, "Columns").
pub mod col {
    /// External addresses in first-use order (family byte, then 4 or 16 bytes).
    pub const EXT_DICT: u8 = 1;
    /// Runs of external addresses: (dictionary index, run length) varint pairs.
    pub const EXT_RUNS: u8 = 2;
    /// External ports: varint, the difference from the previous row's when the address is
    /// the same, else the port.
    pub const EXT_PORT: u8 = 3;
    /// Starts: zigzag varint, relative to the previous row's end (or start if open) when the
    /// external address and port are the same, else to the block's base.
    pub const START: u8 = 4;
    /// Durations: varint, 0 for open, else `end - start + 1`.
    pub const DURATION: u8 = 5;
    /// Internal addresses, most frequent first.
    pub const INT_DICT: u8 = 6;
    /// Internal address of each row: varint index into `INT_DICT`.
    pub const INT_IDX: u8 = 7;
    /// Internal port: zigzag varint of `internal_port - external_port`.
    pub const INT_PORT: u8 = 8;
    /// Destination addresses, most frequent first.
    pub const DST_DICT: u8 = 9;
    /// Destination address of each row: varint index into `DST_DICT`.
    pub const DST_IDX: u8 = 10;
    /// Destination port: varint.
    pub const DST_PORT: u8 = 11;
    /// IANA protocol number: one byte per row.
    pub const PROTO: u8 = 12;
    /// Flags: one byte per row.
    pub const FLAGS: u8 = 13;
    /// Start source: one byte per row.
    pub const SOURCE: u8 = 14;
    /// conntrack status bits: varint.
    pub const STATUS: u8 = 15;
    /// conntrack zone: varint.
    pub const ZONE: u8 = 16;
    /// conntrack mark: varint.
    pub const MARK: u8 = 17;
    /// Original-direction packets, rows with orig counters only: varint.
    pub const PACKETS_OUT: u8 = 18;
    /// Original-direction bytes, rows with orig counters only: varint.
    pub const BYTES_OUT: u8 = 19;
    /// Reply-direction packets, rows with reply counters only: varint.
    pub const PACKETS_IN: u8 = 20;
    /// Reply-direction bytes, rows with reply counters only: varint.
    pub const BYTES_IN: u8 = 21;
    /// Binding ids in start order: zigzag varint of the difference from the previous one.
    pub const ID: u8 = 22;
    /// Raw tuples of rows flagged raw, in row order: 76 bytes each.
    pub const RAW: u8 = 23;
    /// Number of columns; ids are `1..=COUNT`.
    pub const COUNT: u8 = 23;
}

/// Row flag bits (column [`col::FLAGS`]).
pub mod flag {
    /// The start is approximate.
    pub const START_APPROXIMATE: u8 = 1 << 0;
    /// The end is approximate.
    pub const END_APPROXIMATE: u8 = 1 << 1;
    /// Original-direction counters are present.
    pub const ORIG_COUNTERS: u8 = 1 << 2;
    /// Reply-direction counters are present.
    pub const REPLY_COUNTERS: u8 = 1 << 3;
    /// The binding was open when the segment began (copied from the previous segment).
    pub const CARRIED: u8 = 1 << 4;
    /// The tuples are not those derived from the columns: they are in column `RAW`.
    pub const RAW_TUPLES: u8 = 1 << 5;
    /// All defined bits.
    pub const KNOWN: u8 = 0x3F;
}

/// Column storage methods.
const METHOD_RAW: u8 = 0;
const METHOD_ZSTD: u8 = 1;

/// Why bytes are not a valid sealed segment. Offsets are carried by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ColumnarError {
    /// The file is too short to hold a header and a trailer.
    #[error("file too short for a sealed segment ({len} bytes)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Wrong magic in header or trailer.
    #[error("bad magic in {what} (found {found:02x?})")]
    BadMagic {
        /// "header" or "trailer".
        what: &'static str,
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// The header names another version.
    #[error(
        "unsupported sealed segment format version {version} (this build reads {MIN_VERSION} to {VERSION})"
    )]
    UnsupportedVersion {
        /// Version found.
        version: u32,
    },
    /// A checksum failed.
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// What was checked.
        what: &'static str,
        /// Stored value.
        stored: u32,
        /// Computed value.
        computed: u32,
    },
    /// A section points outside the file or has an impossible size.
    #[error("{what} out of bounds (offset {offset}, length {len}, file {file_len} bytes)")]
    OutOfBounds {
        /// The section.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// A leaf hash or the root does not match the data.
    #[error("{what} hash mismatch")]
    Hash {
        /// What was hashed.
        what: &'static str,
    },
    /// The content of a block or section does not decode.
    #[error("{what}: {reason}")]
    Malformed {
        /// Where.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Reading the file failed.
    #[error("read failed")]
    Io(#[from] io::Error),
}

fn malformed(what: &'static str, reason: impl Into<String>) -> ColumnarError {
    ColumnarError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Reads byte ranges of one file: the seam readers use, so tests can count block reads.
pub trait ReadAt {
    /// Size of the file in bytes.
    fn size(&self) -> u64;
    /// Exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// A file read with `pread(2)`, counting reads.
#[derive(Debug)]
pub struct FileReader {
    file: File,
    len: u64,
    reads: AtomicU64,
}

impl FileReader {
    /// Wraps an open file.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            reads: AtomicU64::new(0),
        })
    }

    /// Number of `read_at` calls so far.
    #[must_use]
    pub fn reads(&self) -> u64 {
        self.reads.load(AtomicOrdering::Relaxed)
    }
}

impl ReadAt for FileReader {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.reads.fetch_add(1, AtomicOrdering::Relaxed);
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        self.get(start..start.saturating_add(len))
            .filter(|s| s.len() == len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

/// One stored binding: the binding (times rounded to [`TIME_UNIT_NS`]) and whether it was
/// carried over from the previous segment (open when this segment began).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The binding.
    pub binding: Binding,
    /// Open when the segment began, copied from the previous segment.
    pub carried: bool,
}

/// The segment's place in the chain and its time window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Sequence number (equals the file name's).
    pub seq: u32,
    /// Identifies the data directory's writer (random, fixed per data directory).
    pub writer_id: [u8; 16],
    /// Sequence number of the previous sealed segment in the chain; 0 when this one starts it.
    pub prev_seq: u32,
    /// Root of the previous segment (all zero when `prev_seq` is 0).
    pub prev_root: Hash,
    /// When the segment's log was created (start of its window), ns since the epoch.
    pub window_start_ns: i64,
    /// When the segment's log was closed (end of its window), ns since the epoch.
    pub window_end_ns: i64,
}

impl SegmentHeader {
    /// The header bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..32].copy_from_slice(&self.writer_id);
        h[32..36].copy_from_slice(&self.prev_seq.to_le_bytes());
        // 36..40 reserved, zero
        h[40..72].copy_from_slice(&self.prev_root);
        h[72..80].copy_from_slice(&self.window_start_ns.to_le_bytes());
        h[80..88].copy_from_slice(&self.window_end_ns.to_le_bytes());
        // 88..92 reserved, zero
        let crc = crc32c::crc32c(&h[0..92]);
        h[92..96].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks the header bytes (magic, version, checksum).
    pub fn decode(h: &[u8]) -> Result<Self, ColumnarError> {
        Self::decode_versioned(h).map(|(header, _)| header)
    }

    /// [`SegmentHeader::decode`], also giving the format version.
    pub fn decode_versioned(h: &[u8]) -> Result<(Self, u32), ColumnarError> {
        let h = h.get(..HEADER_LEN).ok_or(ColumnarError::TooShort {
            len: h.len() as u64,
        })?;
        let magic: [u8; 8] = h[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(ColumnarError::BadMagic {
                what: "header",
                found: magic,
            });
        }
        let version = u32_at(h, 8);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ColumnarError::UnsupportedVersion { version });
        }
        check_crc("header", &h[0..92], u32_at(h, 92))?;
        let header = Self {
            seq: u32_at(h, 12),
            writer_id: h[16..32].try_into().expect("16 bytes"),
            prev_seq: u32_at(h, 32),
            prev_root: h[40..72].try_into().expect("32 bytes"),
            window_start_ns: i64_at(h, 72),
            window_end_ns: i64_at(h, 80),
        };
        Ok((header, version))
    }
}

/// Where a section is and its checksum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Section {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// CRC-32C of the bytes.
    pub crc: u32,
}

/// The footer summary: counts, time bounds, root and where the other footer sections are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Rows (stored bindings).
    pub rows: u64,
    /// Rows carried over from the previous segment.
    pub carried_rows: u64,
    /// Rows without an end.
    pub open_rows: u64,
    /// Number of blocks.
    pub blocks: u32,
    /// Number of coverage events.
    pub events: u32,
    /// Earliest time any row answers for (see FORMAT.md "Time bounds"), ns.
    pub t_lo_ns: i64,
    /// Latest time any row answers for, ns.
    pub t_hi_ns: i64,
    /// Merkle root of the segment. Version 2: over every row's record leaf, in row order,
    /// then the events leaf. Version 1: over the blocks' leaf hashes and the events leaf.
    pub root: Hash,
    /// Leaf hash of the coverage events. Version 2: of their canonical encoding
    /// ([`record::events_data`]); version 1: of the stored (compressed) section.
    pub events_leaf: Hash,
    /// The fence pointers.
    pub fences: Section,
    /// The coverage events (zstd of log records).
    pub events_section: Section,
    /// Filter on (external address, port).
    pub ext_filter: Section,
    /// Filter on internal address.
    pub int_filter: Section,
    /// Copy of the header's `window_start_ns`.
    pub window_start_ns: i64,
    /// Copy of the header's `window_end_ns`.
    pub window_end_ns: i64,
}

impl Summary {
    fn encode(&self) -> [u8; SUMMARY_LEN] {
        let mut s = [0u8; SUMMARY_LEN];
        s[0..8].copy_from_slice(&self.rows.to_le_bytes());
        s[8..16].copy_from_slice(&self.carried_rows.to_le_bytes());
        s[16..24].copy_from_slice(&self.open_rows.to_le_bytes());
        s[24..28].copy_from_slice(&self.blocks.to_le_bytes());
        s[28..32].copy_from_slice(&self.events.to_le_bytes());
        s[32..40].copy_from_slice(&self.t_lo_ns.to_le_bytes());
        s[40..48].copy_from_slice(&self.t_hi_ns.to_le_bytes());
        s[48..80].copy_from_slice(&self.root);
        s[80..112].copy_from_slice(&self.events_leaf);
        for (i, sec) in [
            self.fences,
            self.events_section,
            self.ext_filter,
            self.int_filter,
        ]
        .iter()
        .enumerate()
        {
            let at = 112 + i * 16;
            s[at..at + 8].copy_from_slice(&sec.offset.to_le_bytes());
            s[at + 8..at + 12].copy_from_slice(&sec.len.to_le_bytes());
            s[at + 12..at + 16].copy_from_slice(&sec.crc.to_le_bytes());
        }
        s[176..184].copy_from_slice(&TIME_UNIT_NS.to_le_bytes());
        s[184..192].copy_from_slice(&self.window_start_ns.to_le_bytes());
        s[192..200].copy_from_slice(&self.window_end_ns.to_le_bytes());
        s
    }

    fn decode(s: &[u8]) -> Result<Self, ColumnarError> {
        if s.len() != SUMMARY_LEN {
            return Err(malformed("summary", format!("{} bytes", s.len())));
        }
        let sec = |i: usize| {
            let at = 112 + i * 16;
            Section {
                offset: u64_at(s, at),
                len: u32_at(s, at + 8),
                crc: u32_at(s, at + 12),
            }
        };
        let unit = i64_at(s, 176);
        if unit != TIME_UNIT_NS {
            return Err(malformed("summary", format!("time unit {unit} ns")));
        }
        Ok(Self {
            rows: u64_at(s, 0),
            carried_rows: u64_at(s, 8),
            open_rows: u64_at(s, 16),
            blocks: u32_at(s, 24),
            events: u32_at(s, 28),
            t_lo_ns: i64_at(s, 32),
            t_hi_ns: i64_at(s, 40),
            root: s[48..80].try_into().expect("32 bytes"),
            events_leaf: s[80..112].try_into().expect("32 bytes"),
            fences: sec(0),
            events_section: sec(1),
            ext_filter: sec(2),
            int_filter: sec(3),
            window_start_ns: i64_at(s, 184),
            window_end_ns: i64_at(s, 192),
        })
    }
}

/// An external address and port: the sort key of rows and the key range of fences.
pub type ExtKey = (IpAddr, u16);

/// A fence pointer: where a block is and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The block's bytes.
    pub block: Section,
    /// Rows in the block.
    pub rows: u32,
    /// Earliest time any row of the block answers for, ns.
    pub t_lo_ns: i64,
    /// Latest time any row of the block answers for, ns.
    pub t_hi_ns: i64,
    /// External key of the first row.
    pub key_lo: ExtKey,
    /// External key of the last row.
    pub key_hi: ExtKey,
    /// Version 2: the Merkle root over the block's record leaves (a subtree of the
    /// segment's tree when the block is full). Version 1: `SHA-256(0x00 || block bytes)`.
    pub leaf: Hash,
}

impl Fence {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block.offset.to_le_bytes());
        out.extend_from_slice(&self.block.len.to_le_bytes());
        out.extend_from_slice(&self.block.crc.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.t_lo_ns.to_le_bytes());
        out.extend_from_slice(&self.t_hi_ns.to_le_bytes());
        encode_addr17(out, self.key_lo.0);
        out.extend_from_slice(&self.key_lo.1.to_le_bytes());
        encode_addr17(out, self.key_hi.0);
        out.extend_from_slice(&self.key_hi.1.to_le_bytes());
        out.extend_from_slice(&self.leaf);
    }

    fn decode(b: &[u8]) -> Result<Self, ColumnarError> {
        let addr = |at: usize| decode_addr17(&b[at..at + 17]).map_err(|r| malformed("fence", r));
        Ok(Self {
            block: Section {
                offset: u64_at(b, 0),
                len: u32_at(b, 8),
                crc: u32_at(b, 12),
            },
            rows: u32_at(b, 16),
            t_lo_ns: i64_at(b, 20),
            t_hi_ns: i64_at(b, 28),
            key_lo: (addr(36)?, u16_at(b, 53)),
            key_hi: (addr(55)?, u16_at(b, 72)),
            leaf: b[74..106].try_into().expect("32 bytes"),
        })
    }

    /// The block may hold rows of external key `key`.
    #[must_use]
    pub fn may_hold_key(&self, key: ExtKey) -> bool {
        self.key_lo <= key && key <= self.key_hi
    }

    /// The block may hold rows of external address `ip` (any port).
    #[must_use]
    pub fn may_hold_ip(&self, ip: IpAddr) -> bool {
        self.key_lo.0 <= ip && ip <= self.key_hi.0
    }

    /// The block's rows may answer for some time in `[from, to]`.
    #[must_use]
    pub fn overlaps(&self, from_ns: i64, to_ns: i64) -> bool {
        self.t_lo_ns <= to_ns && from_ns <= self.t_hi_ns
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// Rounds a start down to the stored unit.
#[must_use]
pub fn floor_time(ns: i64) -> i64 {
    ns.div_euclid(TIME_UNIT_NS) * TIME_UNIT_NS
}

/// Rounds an end up to the stored unit.
#[must_use]
pub fn ceil_time(ns: i64) -> i64 {
    let f = floor_time(ns);
    if f == ns {
        ns
    } else {
        f.saturating_add(TIME_UNIT_NS)
    }
}

/// The time interval a row answers for in its segment: from its start (or the window start
/// if carried) to its end (or the window end if open).
#[must_use]
pub fn answer_interval(row: &Row, window_start_ns: i64, window_end_ns: i64) -> (i64, i64) {
    let b = &row.binding;
    let lo = if row.carried {
        b.start_ns.max(window_start_ns)
    } else {
        b.start_ns
    };
    let hi = b.end_ns.unwrap_or(window_end_ns.max(b.start_ns));
    (lo, hi.max(lo))
}

/// The sealed segment file for `rows` and `events`: returns the bytes and the root.
/// Rows are sorted here, and their times rounded outward to the stored unit ([`floor_time`],
/// [`ceil_time`]) so that the record leaves hash exactly what a reader decodes.
#[must_use]
pub fn encode_segment(
    header: &SegmentHeader,
    rows: Vec<Row>,
    events: &[CoverageEvent],
) -> (Vec<u8>, Hash) {
    let rows = sort_rows(rows.into_iter().map(round_row).collect());
    let mut out = Vec::with_capacity(HEADER_LEN + rows.len() * 16 + 4096);
    out.extend_from_slice(&header.encode());
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd context");
    let mut fences = Vec::new();
    // Version 2: one leaf per row, in row order, then the events leaf.
    let mut leaves = Vec::with_capacity(rows.len() + 1);
    let (mut t_lo, mut t_hi) = (i64::MAX, i64::MIN);
    let mut ext_keys = Vec::with_capacity(rows.len());
    let mut int_keys = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(BLOCK_ROWS) {
        let block = encode_block(chunk, &mut compressor);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for r in chunk {
            let (a, b) = answer_interval(r, header.window_start_ns, header.window_end_ns);
            lo = lo.min(a);
            hi = hi.max(b);
            let (eip, eport) = r.binding.external();
            ext_keys.push(filter::key(eip, eport));
            int_keys.push(filter::key(r.binding.internal().0, 0));
        }
        t_lo = t_lo.min(lo);
        t_hi = t_hi.max(hi);
        let first = leaves.len();
        leaves.extend(chunk.iter().map(record::leaf));
        let leaf = merkle::root(&leaves[first..]);
        fences.push(Fence {
            block: Section {
                offset: out.len() as u64,
                len: u32::try_from(block.len()).expect("blocks are far below 4 GiB"),
                crc: crc32c::crc32c(&block),
            },
            rows: u32::try_from(chunk.len()).expect("BLOCK_ROWS fits u32"),
            t_lo_ns: lo,
            t_hi_ns: hi,
            key_lo: chunk[0].binding.external(),
            key_hi: chunk[chunk.len() - 1].binding.external(),
            leaf,
        });
        out.extend_from_slice(&block);
    }
    if rows.is_empty() {
        t_lo = header.window_start_ns;
        t_hi = header.window_end_ns;
    }
    // Events: the log records of the coverage events, zstd.
    let ev = record::events_data(events);
    let events_leaf = merkle::leaf_hash(&ev);
    let ev = compressor
        .compress(&ev[1..])
        .expect("zstd compresses in memory");
    leaves.push(events_leaf);
    let events_section = append_section(&mut out, &ev);
    let mut f = Vec::new();
    Fuse8::build(ext_keys).encode(&mut f);
    let ext_filter = append_section(&mut out, &f);
    f.clear();
    Fuse8::build(int_keys).encode(&mut f);
    let int_filter = append_section(&mut out, &f);
    let mut fb = Vec::with_capacity(fences.len() * FENCE_LEN);
    for fence in &fences {
        fence.encode(&mut fb);
    }
    let fences_section = append_section(&mut out, &fb);
    // The segment root, reusing each full block's root: a block of BLOCK_ROWS rows (a power
    // of two) starting at a multiple of BLOCK_ROWS is a subtree of the segment's tree.
    let root = merkle::subtree_root::<()>(
        0,
        leaves.len() as u64,
        &mut |lo, hi| {
            let block = lo as usize / BLOCK_ROWS;
            (hi - lo == BLOCK_ROWS as u64
                && (lo as usize).is_multiple_of(BLOCK_ROWS)
                && fences
                    .get(block)
                    .is_some_and(|f| f.rows as usize == BLOCK_ROWS))
            .then(|| fences[block].leaf)
        },
        &mut |i| Ok(leaves[i as usize]),
    )
    .expect("infallible");
    let summary = Summary {
        rows: rows.len() as u64,
        carried_rows: rows.iter().filter(|r| r.carried).count() as u64,
        open_rows: rows.iter().filter(|r| r.binding.end_ns.is_none()).count() as u64,
        blocks: u32::try_from(fences.len()).expect("fewer than 2^32 blocks"),
        events: u32::try_from(events.len()).unwrap_or(u32::MAX),
        t_lo_ns: t_lo,
        t_hi_ns: t_hi,
        root,
        events_leaf,
        fences: fences_section,
        events_section,
        ext_filter,
        int_filter,
        window_start_ns: header.window_start_ns,
        window_end_ns: header.window_end_ns,
    };
    let s = summary.encode();
    out.extend_from_slice(&s);
    out.extend_from_slice(&(SUMMARY_LEN as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&s).to_le_bytes());
    out.extend_from_slice(&MAGIC);
    (out, root)
}

/// `b` with its start rounded down and its end rounded up to the stored unit (1 ms).
#[must_use]
pub fn round_times(mut b: Binding) -> Binding {
    b.start_ns = floor_time(b.start_ns);
    b.end_ns = b.end_ns.map(|e| ceil_time(e).max(b.start_ns));
    b
}

fn round_row(row: Row) -> Row {
    Row {
        binding: round_times(row.binding),
        carried: row.carried,
    }
}

fn append_section(out: &mut Vec<u8>, bytes: &[u8]) -> Section {
    let s = Section {
        offset: out.len() as u64,
        len: u32::try_from(bytes.len()).expect("sections are far below 4 GiB"),
        crc: crc32c::crc32c(bytes),
    };
    out.extend_from_slice(bytes);
    s
}

/// `rows` in [`row_order`]: sorts compact keys, then moves each row once.
fn sort_rows(rows: Vec<Row>) -> Vec<Row> {
    let mut keys: Vec<(bool, u128, u16, i64, u64, u32)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (ip, port) = r.binding.external();
            let (v6, addr) = match ip {
                IpAddr::V4(a) => (false, u128::from(u32::from(a))),
                IpAddr::V6(a) => (true, u128::from(a)),
            };
            let i = u32::try_from(i).expect("fewer than 2^32 rows");
            (v6, addr, port, r.binding.start_ns, r.binding.id, i)
        })
        .collect();
    keys.sort_unstable();
    let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    keys.iter()
        .map(|k| slots[k.5 as usize].take().expect("each row once"))
        .collect()
}

/// The order of rows in a segment: external address, external port, start, id.
#[must_use]
pub fn row_order(a: &Binding, b: &Binding) -> Ordering {
    a.external()
        .cmp(&b.external())
        .then(a.start_ns.cmp(&b.start_ns))
        .then(a.id.cmp(&b.id))
}

/// The tuples the columns imply for a binding with these derived values (FORMAT.md,
/// "Tuples"). When they differ from the binding's own, the row stores its tuples raw.
fn derived_tuples(
    proto: u8,
    status: u32,
    int: (IpAddr, u16),
    ext: (IpAddr, u16),
    dst: (IpAddr, u16),
) -> (Tuple, Tuple) {
    let icmp = is_icmp(proto);
    let dnat_only =
        status & crate::binding::IPS_DST_NAT != 0 && status & crate::binding::IPS_SRC_NAT == 0;
    if dnat_only {
        (
            Tuple {
                src: dst.0,
                dst: ext.0,
                src_port: dst.1,
                dst_port: if icmp { 0 } else { ext.1 },
            },
            Tuple {
                src: int.0,
                dst: dst.0,
                src_port: int.1,
                dst_port: if icmp { 0 } else { dst.1 },
            },
        )
    } else {
        (
            Tuple {
                src: int.0,
                dst: dst.0,
                src_port: int.1,
                dst_port: if icmp { 0 } else { dst.1 },
            },
            Tuple {
                src: dst.0,
                dst: ext.0,
                src_port: if icmp { ext.1 } else { dst.1 },
                dst_port: if icmp { 0 } else { ext.1 },
            },
        )
    }
}

/// A dictionary of addresses: most frequent first (ties by address).
fn frequency_dict(
    addrs: impl Iterator<Item = IpAddr>,
) -> (Vec<IpAddr>, foldhash::HashMap<IpAddr, u64>) {
    let mut counts: foldhash::HashMap<IpAddr, u64> = foldhash::HashMap::default();
    for a in addrs {
        *counts.entry(a).or_default() += 1;
    }
    let mut dict: Vec<IpAddr> = counts.keys().copied().collect();
    dict.sort_by(|a, b| counts[b].cmp(&counts[a]).then(a.cmp(b)));
    let index = dict
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i as u64))
        .collect();
    (dict, index)
}

fn encode_block(rows: &[Row], compressor: &mut zstd::bulk::Compressor<'_>) -> Vec<u8> {
    let n = rows.len();
    let base_ms = rows
        .iter()
        .map(|r| r.binding.start_ns.div_euclid(TIME_UNIT_NS))
        .min()
        .unwrap_or(0);
    let mut cols: Vec<Vec<u8>> = vec![Vec::new(); usize::from(col::COUNT) + 1];
    // External addresses: dictionary in first-use order, runs.
    let mut ext_dict: Vec<IpAddr> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let (int_dict, int_index) = frequency_dict(rows.iter().map(|r| r.binding.internal().0));
    let (dst_dict, dst_index) = frequency_dict(rows.iter().map(|r| r.binding.destination().0));
    let mut prev: Option<&Row> = None;
    for r in rows {
        let b = &r.binding;
        let ext = b.external();
        let int = b.internal();
        let dst = b.destination();
        let same_ip = prev.is_some_and(|p| p.binding.external().0 == ext.0);
        let same_key = prev.is_some_and(|p| p.binding.external() == ext);
        if !same_ip {
            if let Some((i, len)) = run.take() {
                put_varint(&mut cols[usize::from(col::EXT_RUNS)], i);
                put_varint(&mut cols[usize::from(col::EXT_RUNS)], len);
            }
            ext_dict.push(ext.0);
            run = Some((ext_dict.len() as u64 - 1, 0));
        }
        if let Some((_, len)) = run.as_mut() {
            *len += 1;
        }
        let port = u64::from(ext.1);
        let port_val = match prev {
            Some(p) if same_ip => port - u64::from(p.binding.external().1),
            _ => port,
        };
        put_varint(&mut cols[usize::from(col::EXT_PORT)], port_val);
        let start_ms = b.start_ns.div_euclid(TIME_UNIT_NS);
        let reference = match prev {
            Some(p) if same_key => p
                .binding
                .end_ns
                .unwrap_or(p.binding.start_ns)
                .div_euclid(TIME_UNIT_NS),
            _ => base_ms,
        };
        put_varint(
            &mut cols[usize::from(col::START)],
            zigzag(start_ms - reference),
        );
        let dur = b.end_ns.map_or(0, |e| {
            u64::try_from(e.div_euclid(TIME_UNIT_NS) - start_ms).unwrap_or(0) + 1
        });
        put_varint(&mut cols[usize::from(col::DURATION)], dur);
        put_varint(&mut cols[usize::from(col::INT_IDX)], int_index[&int.0]);
        put_varint(
            &mut cols[usize::from(col::INT_PORT)],
            zigzag(i64::from(int.1) - i64::from(ext.1)),
        );
        put_varint(&mut cols[usize::from(col::DST_IDX)], dst_index[&dst.0]);
        put_varint(&mut cols[usize::from(col::DST_PORT)], u64::from(dst.1));
        cols[usize::from(col::PROTO)].push(b.proto);
        let raw = derived_tuples(b.proto, b.status, int, ext, dst) != (b.orig, b.reply);
        let mut flags = 0u8;
        flags |= if b.start_approximate {
            flag::START_APPROXIMATE
        } else {
            0
        };
        flags |= if b.end_approximate {
            flag::END_APPROXIMATE
        } else {
            0
        };
        flags |= if b.orig_counters.is_some() {
            flag::ORIG_COUNTERS
        } else {
            0
        };
        flags |= if b.reply_counters.is_some() {
            flag::REPLY_COUNTERS
        } else {
            0
        };
        flags |= if r.carried { flag::CARRIED } else { 0 };
        flags |= if raw { flag::RAW_TUPLES } else { 0 };
        cols[usize::from(col::FLAGS)].push(flags);
        cols[usize::from(col::SOURCE)].push(b.start_source as u8);
        put_varint(&mut cols[usize::from(col::STATUS)], u64::from(b.status));
        put_varint(&mut cols[usize::from(col::ZONE)], u64::from(b.zone));
        put_varint(&mut cols[usize::from(col::MARK)], u64::from(b.mark));
        if let Some(c) = b.orig_counters {
            put_varint(&mut cols[usize::from(col::PACKETS_OUT)], c.packets);
            put_varint(&mut cols[usize::from(col::BYTES_OUT)], c.bytes);
        }
        if let Some(c) = b.reply_counters {
            put_varint(&mut cols[usize::from(col::PACKETS_IN)], c.packets);
            put_varint(&mut cols[usize::from(col::BYTES_IN)], c.bytes);
        }
        if raw {
            let out = &mut cols[usize::from(col::RAW)];
            for t in [&b.orig, &b.reply] {
                encode_addr17(out, t.src);
                encode_addr17(out, t.dst);
                out.extend_from_slice(&t.src_port.to_le_bytes());
                out.extend_from_slice(&t.dst_port.to_le_bytes());
            }
        }
        prev = Some(r);
    }
    if let Some((i, len)) = run {
        put_varint(&mut cols[usize::from(col::EXT_RUNS)], i);
        put_varint(&mut cols[usize::from(col::EXT_RUNS)], len);
    }
    for a in &ext_dict {
        encode_addr_compact(&mut cols[usize::from(col::EXT_DICT)], *a);
    }
    for a in &int_dict {
        encode_addr_compact(&mut cols[usize::from(col::INT_DICT)], *a);
    }
    for a in &dst_dict {
        encode_addr_compact(&mut cols[usize::from(col::DST_DICT)], *a);
    }
    // Ids in start order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (rows[i].binding.start_ns.div_euclid(TIME_UNIT_NS), i));
    let mut prev_id = 0u64;
    for &i in &order {
        let id = rows[i].binding.id;
        put_varint(
            &mut cols[usize::from(col::ID)],
            zigzag(id.wrapping_sub(prev_id) as i64),
        );
        prev_id = id;
    }
    // Assemble: header, directory, data.
    let mut stored: Vec<(u8, u8, Vec<u8>, usize)> = Vec::with_capacity(usize::from(col::COUNT));
    for id in 1..=col::COUNT {
        let raw = &cols[usize::from(id)];
        if raw.is_empty() {
            continue;
        }
        let z = compressor.compress(raw).expect("zstd compresses in memory");
        if z.len() < raw.len() {
            stored.push((id, METHOD_ZSTD, z, raw.len()));
        } else {
            stored.push((id, METHOD_RAW, raw.clone(), raw.len()));
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(n).expect("BLOCK_ROWS fits u32").to_le_bytes());
    out.extend_from_slice(&(base_ms * TIME_UNIT_NS).to_le_bytes());
    out.push(u8::try_from(stored.len()).expect("at most 23 columns"));
    for (id, method, data, raw_len) in &stored {
        out.push(*id);
        out.push(*method);
        out.extend_from_slice(
            &u32::try_from(data.len())
                .expect("column < 4 GiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(
            &u32::try_from(*raw_len)
                .expect("column < 4 GiB")
                .to_le_bytes(),
        );
    }
    for (_, _, data, _) in &stored {
        out.extend_from_slice(data);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// A sealed segment opened for reading: header and summary checked.
#[derive(Clone, Debug)]
pub struct SealedSegment {
    /// The header.
    pub header: SegmentHeader,
    /// Format version from the header ([`VERSION`] until the header is read).
    pub version: u32,
    /// The footer summary.
    pub summary: Summary,
    /// File length.
    pub file_len: u64,
}

impl SealedSegment {
    /// Reads and checks header, trailer and summary (two reads).
    pub fn open(src: &dyn ReadAt) -> Result<Self, (u64, ColumnarError)> {
        let summary = Self::read_summary(src)?;
        Self::with_summary(src, summary)
    }

    /// Reads and checks the header of a segment whose summary was read by
    /// [`SealedSegment::read_summary`] (one read).
    pub fn with_summary(src: &dyn ReadAt, summary: Summary) -> Result<Self, (u64, ColumnarError)> {
        let file_len = src.size();
        let header = src.read_at(0, HEADER_LEN).map_err(|e| (0, e.into()))?;
        let (header, version) = SegmentHeader::decode_versioned(&header).map_err(|e| (0, e))?;
        let tail_at = file_len - (SUMMARY_LEN + TRAILER_LEN) as u64;
        if (header.window_start_ns, header.window_end_ns)
            != (summary.window_start_ns, summary.window_end_ns)
        {
            return Err((
                tail_at,
                malformed("summary", "window differs from the header's"),
            ));
        }
        Ok(Self {
            header,
            version,
            summary,
            file_len,
        })
    }

    /// A segment known by its summary alone, its header not read: `header` holds only the
    /// window (copied in the summary), the rest zero. For readers that need the sections
    /// only; [`SealedSegment::with_summary`] checks the header.
    #[must_use]
    pub fn from_summary(summary: Summary, file_len: u64) -> Self {
        Self {
            header: SegmentHeader {
                seq: 0,
                writer_id: [0; 16],
                prev_seq: 0,
                prev_root: [0; 32],
                window_start_ns: summary.window_start_ns,
                window_end_ns: summary.window_end_ns,
            },
            version: VERSION,
            summary,
            file_len,
        }
    }

    /// Reads and checks the trailer and the summary only (one read of the last 216 bytes):
    /// enough to tell whether the segment can hold an answer.
    pub fn read_summary(src: &dyn ReadAt) -> Result<Summary, (u64, ColumnarError)> {
        let file_len = src.size();
        let min = (HEADER_LEN + SUMMARY_LEN + TRAILER_LEN) as u64;
        if file_len < min {
            return Err((0, ColumnarError::TooShort { len: file_len }));
        }
        let tail_at = file_len - (SUMMARY_LEN + TRAILER_LEN) as u64;
        let tail = src
            .read_at(tail_at, SUMMARY_LEN + TRAILER_LEN)
            .map_err(|e| (tail_at, e.into()))?;
        let trailer_at = file_len - TRAILER_LEN as u64;
        let trailer = &tail[SUMMARY_LEN..];
        let magic: [u8; 8] = trailer[8..16].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err((
                trailer_at,
                ColumnarError::BadMagic {
                    what: "trailer",
                    found: magic,
                },
            ));
        }
        let len = u32_at(trailer, 0) as usize;
        if len != SUMMARY_LEN {
            return Err((
                trailer_at,
                malformed(
                    "trailer",
                    format!("summary length {len}, expected {SUMMARY_LEN}"),
                ),
            ));
        }
        let s = &tail[..SUMMARY_LEN];
        check_crc("summary", s, u32_at(trailer, 4)).map_err(|e| (tail_at, e))?;
        let summary = Summary::decode(s).map_err(|e| (tail_at, e))?;
        let limit = file_len - (SUMMARY_LEN + TRAILER_LEN) as u64;
        for (what, sec) in sections(&summary) {
            check_bounds(what, sec, limit, file_len).map_err(|e| (tail_at, e))?;
        }
        Ok(summary)
    }

    fn check_bounds(&self, what: &'static str, s: Section) -> Result<(), ColumnarError> {
        let limit = self.file_len - (SUMMARY_LEN + TRAILER_LEN) as u64;
        check_bounds(what, s, limit, self.file_len)
    }

    /// Reads a section and checks its CRC. Errors carry the section's offset.
    fn read_section(
        &self,
        src: &dyn ReadAt,
        what: &'static str,
        s: Section,
    ) -> Result<Vec<u8>, (u64, ColumnarError)> {
        self.check_bounds(what, s).map_err(|e| (s.offset, e))?;
        let b = src
            .read_at(s.offset, s.len as usize)
            .map_err(|e| (s.offset, e.into()))?;
        check_crc(what, &b, s.crc).map_err(|e| (s.offset, e))?;
        Ok(b)
    }

    /// The fence pointers, one per block.
    pub fn fences(&self, src: &dyn ReadAt) -> Result<Vec<Fence>, (u64, ColumnarError)> {
        let s = self.summary.fences;
        let b = self.read_section(src, "fences", s)?;
        let n = self.summary.blocks as usize;
        if b.len() != n * FENCE_LEN {
            return Err((
                s.offset,
                malformed("fences", format!("{} bytes for {n} blocks", b.len())),
            ));
        }
        b.chunks_exact(FENCE_LEN)
            .map(|c| Fence::decode(c).map_err(|e| (s.offset, e)))
            .collect()
    }

    /// The filter on (external address, port).
    pub fn ext_filter(&self, src: &dyn ReadAt) -> Result<Fuse8, (u64, ColumnarError)> {
        self.filter(src, "external filter", self.summary.ext_filter)
    }

    /// The filter on internal address.
    pub fn int_filter(&self, src: &dyn ReadAt) -> Result<Fuse8, (u64, ColumnarError)> {
        self.filter(src, "internal filter", self.summary.int_filter)
    }

    fn filter(
        &self,
        src: &dyn ReadAt,
        what: &'static str,
        s: Section,
    ) -> Result<Fuse8, (u64, ColumnarError)> {
        let b = self.read_section(src, what, s)?;
        Fuse8::decode(&b).ok_or_else(|| (s.offset, malformed(what, "lengths do not add up")))
    }

    /// The coverage events.
    pub fn events(&self, src: &dyn ReadAt) -> Result<Vec<CoverageEvent>, (u64, ColumnarError)> {
        let s = self.summary.events_section;
        let b = self.read_section(src, "events", s)?;
        let raw =
            segment::decompress(&b).map_err(|e| (s.offset, malformed("events", e.to_string())))?;
        let mut records = Vec::new();
        let mut errors = Vec::new();
        segment::decode_records(&raw, |r| records.push(r), |e| errors.push(e.to_string()));
        let mut events = Vec::new();
        let mut bad = errors.into_iter().next();
        for r in records {
            match r {
                segment::Record::Event(e) => events.push(e),
                _ => {
                    bad.get_or_insert_with(|| "a record that is not a coverage event".to_owned());
                }
            }
        }
        match bad {
            Some(reason) => Err((s.offset, malformed("events", reason))),
            None => Ok(events),
        }
    }

    /// [`SealedSegment::read_block`] building only the rows `keep` accepts.
    pub fn read_block_where(
        &self,
        src: &dyn ReadAt,
        fence: &Fence,
        keep: RowFilter<'_>,
    ) -> Result<Vec<Row>, (u64, ColumnarError)> {
        self.read_rows(src, fence, Some(keep))
    }

    fn read_rows(
        &self,
        src: &dyn ReadAt,
        fence: &Fence,
        keep: Option<RowFilter<'_>>,
    ) -> Result<Vec<Row>, (u64, ColumnarError)> {
        let s = fence.block;
        if s.len as usize > MAX_BLOCK_LEN {
            return Err((s.offset, malformed("block", format!("length {}", s.len))));
        }
        let b = self.read_section(src, "block", s)?;
        decode_block_where(&b, keep).map_err(|e| (s.offset, e))
    }

    /// Reads one block (one read), checks its CRC and decodes its rows.
    pub fn read_block(
        &self,
        src: &dyn ReadAt,
        fence: &Fence,
    ) -> Result<Vec<Row>, (u64, ColumnarError)> {
        self.read_rows(src, fence, None)
    }
}

/// Name of column `id` as FORMAT.md and the benchmarks print it.
#[must_use]
pub fn column_name(id: u8) -> &'static str {
    const NAMES: [&str; col::COUNT as usize] = [
        "ext_dict",
        "ext_runs",
        "ext_port",
        "start",
        "duration",
        "int_dict",
        "int_idx",
        "int_port",
        "dst_dict",
        "dst_idx",
        "dst_port",
        "proto",
        "flags",
        "source",
        "status",
        "zone",
        "mark",
        "packets_out",
        "bytes_out",
        "packets_in",
        "bytes_in",
        "id",
        "raw",
    ];
    id.checked_sub(1)
        .and_then(|i| NAMES.get(usize::from(i)))
        .copied()
        .unwrap_or("unknown")
}

/// A block's parts: row count, base time and each column as stored and decompressed.
#[derive(Clone, Debug, Default)]
pub struct BlockColumns {
    /// Rows in the block.
    pub rows: usize,
    /// Base time (the smallest start, rounded), ns.
    pub base_ns: i64,
    /// Per column id (index 0 unused): bytes as stored (possibly zstd) and decompressed.
    pub stored_len: Vec<usize>,
    /// Decompressed column bytes, by column id (index 0 unused; empty when absent).
    pub raw: Vec<Vec<u8>>,
}

/// Splits a block into its columns and decompresses them.
pub fn block_columns(b: &[u8]) -> Result<BlockColumns, ColumnarError> {
    if b.len() < BLOCK_HEADER_LEN {
        return Err(malformed("block", "shorter than its header"));
    }
    let n = u32_at(b, 0) as usize;
    if n == 0 || n > BLOCK_ROWS * 16 {
        return Err(malformed("block", format!("{n} rows")));
    }
    let base_ns = i64_at(b, 4);
    let ncols = usize::from(b[12]);
    let dir_end = BLOCK_HEADER_LEN + ncols * COLUMN_ENTRY_LEN;
    if b.len() < dir_end {
        return Err(malformed("block", "column directory past the end"));
    }
    let mut cols: Vec<Vec<u8>> = vec![Vec::new(); usize::from(col::COUNT) + 1];
    let mut stored_len = vec![0usize; usize::from(col::COUNT) + 1];
    let mut total_raw = 0usize;
    let mut at = dir_end;
    for c in 0..ncols {
        let e = &b[BLOCK_HEADER_LEN + c * COLUMN_ENTRY_LEN..];
        let id = e[0];
        let method = e[1];
        let len = u32_at(e, 2) as usize;
        let raw_len = u32_at(e, 6) as usize;
        if id == 0 || id > col::COUNT || stored_len[usize::from(id)] != 0 {
            return Err(malformed(
                "block",
                format!("column id {id} unknown or repeated"),
            ));
        }
        total_raw = total_raw.saturating_add(raw_len);
        if raw_len > MAX_BLOCK_LEN || total_raw > MAX_BLOCK_LEN || len == 0 {
            return Err(malformed(
                "block",
                format!("column {id}: {len} bytes stored, {raw_len} raw"),
            ));
        }
        let data = b
            .get(at..at.saturating_add(len))
            .ok_or_else(|| malformed("block", format!("column {id} past the end")))?;
        at += len;
        let raw = match method {
            METHOD_RAW => data.to_vec(),
            METHOD_ZSTD => zstd::bulk::decompress(data, raw_len)
                .map_err(|e| malformed("block", format!("column {id}: {e}")))?,
            m => return Err(malformed("block", format!("column {id}: method {m}"))),
        };
        if raw.len() != raw_len {
            return Err(malformed(
                "block",
                format!("column {id}: {} bytes, expected {raw_len}", raw.len()),
            ));
        }
        stored_len[usize::from(id)] = len;
        cols[usize::from(id)] = raw;
    }
    if at != b.len() {
        return Err(malformed(
            "block",
            format!("{} bytes after the last column", b.len() - at),
        ));
    }
    Ok(BlockColumns {
        rows: n,
        base_ns,
        stored_len,
        raw: cols,
    })
}

/// The sections the summary points to, with their names.
fn sections(summary: &Summary) -> [(&'static str, Section); 4] {
    [
        ("fences", summary.fences),
        ("events", summary.events_section),
        ("external filter", summary.ext_filter),
        ("internal filter", summary.int_filter),
    ]
}

/// A section lies between the header and `limit` (the summary's offset).
fn check_bounds(
    what: &'static str,
    s: Section,
    limit: u64,
    file_len: u64,
) -> Result<(), ColumnarError> {
    let end = s.offset.checked_add(u64::from(s.len));
    if s.offset < HEADER_LEN as u64 || end.is_none_or(|e| e > limit) {
        return Err(ColumnarError::OutOfBounds {
            what,
            offset: s.offset,
            len: u64::from(s.len),
            file_len,
        });
    }
    Ok(())
}

/// Decodes a block's bytes into rows (in stored order).
pub fn decode_block(b: &[u8]) -> Result<Vec<Row>, ColumnarError> {
    decode_block_where(b, None)
}

/// [`decode_block`] building only the rows `keep` accepts (all when `None`): a point query
/// looks at every row's key and time but builds only the one or two it asked for.
pub fn decode_block_where(
    b: &[u8],
    keep: Option<RowFilter<'_>>,
) -> Result<Vec<Row>, ColumnarError> {
    let c = block_columns(b)?;
    decode_rows(c.rows, c.base_ns, &c.raw, keep).map_err(|(id, reason)| ColumnarError::Malformed {
        what: "block",
        reason: format!("column {}: {reason}", column_name(id)),
    })
}

/// A reader of one column's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    id: u8,
}

impl<'a> Cursor<'a> {
    fn new(cols: &'a [Vec<u8>], id: u8) -> Self {
        Self {
            b: &cols[usize::from(id)],
            at: 0,
            id,
        }
    }

    fn varint(&mut self) -> Result<u64, (u8, String)> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .b
                .get(self.at)
                .ok_or_else(|| (self.id, "ends early".to_owned()))?;
            self.at += 1;
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err((self.id, "varint longer than 10 bytes".to_owned()))
    }

    fn byte(&mut self) -> Result<u8, (u8, String)> {
        let v = *self
            .b
            .get(self.at)
            .ok_or_else(|| (self.id, "ends early".to_owned()))?;
        self.at += 1;
        Ok(v)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], (u8, String)> {
        let v = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| (self.id, "ends early".to_owned()))?;
        self.at += n;
        Ok(v)
    }

    fn addr(&mut self) -> Result<IpAddr, (u8, String)> {
        match self.byte()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.bytes(4)?).expect("4 bytes"),
            ))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(self.bytes(16)?).expect("16 bytes"),
            ))),
            f => Err((self.id, format!("address family {f}"))),
        }
    }

    fn u16(&mut self, v: u64) -> Result<u16, (u8, String)> {
        u16::try_from(v).map_err(|_| (self.id, format!("{v} is not a port")))
    }

    fn done(&self) -> Result<(), (u8, String)> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err((
                self.id,
                format!("{} bytes left over", self.b.len() - self.at),
            ))
        }
    }
}

fn dict(cols: &[Vec<u8>], id: u8) -> Result<Vec<IpAddr>, (u8, String)> {
    let mut c = Cursor::new(cols, id);
    let mut d = Vec::new();
    while c.at < c.b.len() {
        d.push(c.addr()?);
    }
    Ok(d)
}

fn lookup(d: &[IpAddr], i: u64, id: u8) -> Result<IpAddr, (u8, String)> {
    usize::try_from(i)
        .ok()
        .and_then(|i| d.get(i).copied())
        .ok_or_else(|| {
            (
                id,
                format!("index {i} past the dictionary ({} entries)", d.len()),
            )
        })
}

/// Which rows of a block to build: given a row's external key, start and end (ns), `true`
/// keeps it. The others are only stepped over (their values are not checked).
pub type RowFilter<'a> = &'a dyn Fn(ExtKey, i64, Option<i64>) -> bool;

fn decode_rows(
    n: usize,
    base_ns: i64,
    cols: &[Vec<u8>],
    keep: Option<RowFilter<'_>>,
) -> Result<Vec<Row>, (u8, String)> {
    let ext_dict = dict(cols, col::EXT_DICT)?;
    let int_dict = dict(cols, col::INT_DICT)?;
    let dst_dict = dict(cols, col::DST_DICT)?;
    let mut runs = Cursor::new(cols, col::EXT_RUNS);
    let mut ext_port = Cursor::new(cols, col::EXT_PORT);
    let mut start = Cursor::new(cols, col::START);
    let mut duration = Cursor::new(cols, col::DURATION);
    let mut int_idx = Cursor::new(cols, col::INT_IDX);
    let mut int_port = Cursor::new(cols, col::INT_PORT);
    let mut dst_idx = Cursor::new(cols, col::DST_IDX);
    let mut dst_port = Cursor::new(cols, col::DST_PORT);
    let mut proto = Cursor::new(cols, col::PROTO);
    let mut flags = Cursor::new(cols, col::FLAGS);
    let mut source = Cursor::new(cols, col::SOURCE);
    let mut status = Cursor::new(cols, col::STATUS);
    let mut zone = Cursor::new(cols, col::ZONE);
    let mut mark = Cursor::new(cols, col::MARK);
    let mut pkts_out = Cursor::new(cols, col::PACKETS_OUT);
    let mut bytes_out = Cursor::new(cols, col::BYTES_OUT);
    let mut pkts_in = Cursor::new(cols, col::PACKETS_IN);
    let mut bytes_in = Cursor::new(cols, col::BYTES_IN);
    let mut ids = Cursor::new(cols, col::ID);
    let mut raw = Cursor::new(cols, col::RAW);
    let base_ms = base_ns.div_euclid(TIME_UNIT_NS);
    let mut rows: Vec<Row> = Vec::with_capacity(if keep.is_some() { 4 } else { n });
    // Start (ms) of every row, and the row index of every row built.
    let mut starts: Vec<i64> = Vec::with_capacity(n);
    let mut built: Vec<usize> = Vec::with_capacity(if keep.is_some() { 4 } else { n });
    let mut run_left = 0u64;
    let mut ext_ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut new_ip;
    let mut prev_port = 0u16;
    let mut prev_ref_ms = 0i64;
    for i in 0..n {
        new_ip = false;
        if run_left == 0 {
            ext_ip = lookup(&ext_dict, runs.varint()?, col::EXT_DICT)?;
            run_left = runs.varint()?;
            if run_left == 0 {
                return Err((col::EXT_RUNS, "run of length 0".to_owned()));
            }
            new_ip = true;
        }
        run_left -= 1;
        let pv = ext_port.varint()?;
        let port = if new_ip {
            ext_port.u16(pv)?
        } else {
            ext_port.u16(u64::from(prev_port).saturating_add(pv))?
        };
        let same_key = !new_ip && port == prev_port && i > 0;
        let reference = if same_key { prev_ref_ms } else { base_ms };
        let start_ms = reference
            .checked_add(unzigzag(start.varint()?))
            .ok_or_else(|| (col::START, "overflow".to_owned()))?;
        let d = duration.varint()?;
        let end_ms = if d == 0 {
            None
        } else {
            Some(
                i64::try_from(d - 1)
                    .ok()
                    .and_then(|d| start_ms.checked_add(d))
                    .ok_or_else(|| (col::DURATION, "overflow".to_owned()))?,
            )
        };
        prev_ref_ms = end_ms.unwrap_or(start_ms);
        prev_port = port;
        starts.push(start_ms);
        if let Some(keep) = keep {
            let ns = |ms: i64| ms.saturating_mul(TIME_UNIT_NS);
            if !keep((ext_ip, port), ns(start_ms), end_ms.map(ns)) {
                // Step over the row's other values.
                for c in [
                    &mut int_idx,
                    &mut int_port,
                    &mut dst_idx,
                    &mut dst_port,
                    &mut status,
                    &mut zone,
                    &mut mark,
                ] {
                    c.varint()?;
                }
                proto.byte()?;
                source.byte()?;
                let f = flags.byte()?;
                if f & flag::ORIG_COUNTERS != 0 {
                    pkts_out.varint()?;
                    bytes_out.varint()?;
                }
                if f & flag::REPLY_COUNTERS != 0 {
                    pkts_in.varint()?;
                    bytes_in.varint()?;
                }
                if f & flag::RAW_TUPLES != 0 {
                    raw.bytes(76)?;
                }
                continue;
            }
        }
        built.push(i);
        let int_ip = lookup(&int_dict, int_idx.varint()?, col::INT_DICT)?;
        let ip_delta = unzigzag(int_port.varint()?);
        let iport = u16::try_from(i64::from(port).saturating_add(ip_delta))
            .map_err(|_| (col::INT_PORT, "port out of range".to_owned()))?;
        let dst_ip = lookup(&dst_dict, dst_idx.varint()?, col::DST_DICT)?;
        let dport = dst_port.varint()?;
        let dport = dst_port.u16(dport)?;
        let p = proto.byte()?;
        let f = flags.byte()?;
        if f & !flag::KNOWN != 0 {
            return Err((col::FLAGS, format!("unknown flag bits {f:#04x}")));
        }
        let src = source.byte()?;
        let start_source = StartSource::from_u8(src)
            .ok_or_else(|| (col::SOURCE, format!("start source {src}")))?;
        let st =
            u32::try_from(status.varint()?).map_err(|_| (col::STATUS, "too large".to_owned()))?;
        let z = u16::try_from(zone.varint()?).map_err(|_| (col::ZONE, "too large".to_owned()))?;
        let m = u32::try_from(mark.varint()?).map_err(|_| (col::MARK, "too large".to_owned()))?;
        let orig_counters = if f & flag::ORIG_COUNTERS != 0 {
            Some(Counters {
                packets: pkts_out.varint()?,
                bytes: bytes_out.varint()?,
            })
        } else {
            None
        };
        let reply_counters = if f & flag::REPLY_COUNTERS != 0 {
            Some(Counters {
                packets: pkts_in.varint()?,
                bytes: bytes_in.varint()?,
            })
        } else {
            None
        };
        let (orig, reply) = if f & flag::RAW_TUPLES != 0 {
            let mut t = || -> Result<Tuple, (u8, String)> {
                let src = decode_addr17(raw.bytes(17)?).map_err(|r| (col::RAW, r))?;
                let dst = decode_addr17(raw.bytes(17)?).map_err(|r| (col::RAW, r))?;
                let sp = raw.bytes(2)?;
                let dp = raw.bytes(2)?;
                Ok(Tuple {
                    src,
                    dst,
                    src_port: u16::from_le_bytes([sp[0], sp[1]]),
                    dst_port: u16::from_le_bytes([dp[0], dp[1]]),
                })
            };
            (t()?, t()?)
        } else {
            derived_tuples(p, st, (int_ip, iport), (ext_ip, port), (dst_ip, dport))
        };
        // The tuples must give back the row's own addresses, which queries select on (a
        // crafted row could say otherwise, e.g. an external port on a DNAT-only ICMP row).
        let view = Binding {
            proto: p,
            status: st,
            orig,
            reply,
            ..Binding::EMPTY
        };
        if (view.internal(), view.external(), view.destination())
            != ((int_ip, iport), (ext_ip, port), (dst_ip, dport))
        {
            return Err((
                col::RAW,
                "tuples disagree with the row's addresses".to_owned(),
            ));
        }
        rows.push(Row {
            binding: Binding {
                id: 0,
                proto: p,
                zone: z,
                mark: m,
                status: st,
                orig,
                reply,
                start_ns: start_ms
                    .checked_mul(TIME_UNIT_NS)
                    .ok_or_else(|| (col::START, "overflow".to_owned()))?,
                start_approximate: f & flag::START_APPROXIMATE != 0,
                start_source,
                end_ns: end_ms
                    .map(|e| e.checked_mul(TIME_UNIT_NS))
                    .map(|e| e.ok_or_else(|| (col::DURATION, "overflow".to_owned())))
                    .transpose()?,
                end_approximate: f & flag::END_APPROXIMATE != 0,
                orig_counters,
                reply_counters,
            },
            carried: f & flag::CARRIED != 0,
        });
    }
    if run_left != 0 {
        return Err((col::EXT_RUNS, "runs longer than the block".to_owned()));
    }
    // Ids are stored in start order: find each built row's rank in it (a sort of all rows,
    // or for a few rows a count of the rows before each), then walk the deltas once.
    let mut wanted: Vec<(usize, usize)> = if built.len() > 64 {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (starts[i], i));
        let mut rank_of = vec![0usize; n];
        for (r, &i) in order.iter().enumerate() {
            rank_of[i] = r;
        }
        built
            .iter()
            .enumerate()
            .map(|(pos, &i)| (rank_of[i], pos))
            .collect()
    } else {
        built
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                let me = (starts[i], i);
                let rank = starts
                    .iter()
                    .enumerate()
                    .filter(|&(j, &s)| (s, j) < me)
                    .count();
                (rank, pos)
            })
            .collect()
    };
    wanted.sort_unstable();
    let mut next = wanted.iter().peekable();
    let mut id = 0u64;
    for r in 0..n {
        id = id.wrapping_add(unzigzag(ids.varint()?) as u64);
        while let Some(&&(rank, pos)) = next.peek() {
            if rank != r {
                break;
            }
            rows[pos].binding.id = id;
            next.next();
        }
    }
    for c in [
        &runs, &ext_port, &start, &duration, &int_idx, &int_port, &dst_idx, &dst_port, &proto,
        &flags, &source, &status, &zone, &mark, &pkts_out, &bytes_out, &pkts_in, &bytes_in, &ids,
        &raw,
    ] {
        c.done()?;
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// Small encodings
// ---------------------------------------------------------------------------------------

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Zigzag: 0, -1, 1, -2, ... to 0, 1, 2, 3, ...
#[must_use]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[must_use]
pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Family byte and 4 (IPv4) or 16 (IPv6) address bytes.
fn encode_addr_compact(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// The 17-byte address of the log format: family byte, 16 bytes (IPv4 as `::ffff:a.b.c.d`).
fn encode_addr17(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.to_ipv6_mapped().octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn decode_addr17(b: &[u8]) -> Result<IpAddr, String> {
    let octets: [u8; 16] = b[1..17].try_into().expect("16 bytes");
    let v6 = Ipv6Addr::from(octets);
    match b[0] {
        6 => Ok(IpAddr::V6(v6)),
        4 => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .ok_or_else(|| format!("IPv4 address {v6} is not IPv4-mapped")),
        f => Err(format!("unknown address family {f}")),
    }
}

fn check_crc(what: &'static str, b: &[u8], stored: u32) -> Result<(), ColumnarError> {
    let computed = crc32c::crc32c(b);
    if computed == stored {
        Ok(())
    } else {
        Err(ColumnarError::Checksum {
            what,
            stored,
            computed,
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
