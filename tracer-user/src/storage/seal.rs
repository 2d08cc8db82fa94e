//! Sealing: turning a log (the row-format active segment) into a sealed columnar segment.
//!
//! The log's records are reduced to the latest record of each binding id, rounded to the
//! stored time unit, encoded by [`columnar::encode_segment`] into `NNNNNNNN.seg.tmp`, which
//! is fsynced and renamed to `NNNNNNNN.seg`; then the log is removed and the directory
//! fsynced. A crash at any point leaves either the log (sealed again at the next start) or
//! the sealed segment (a log left beside it is removed at the next start).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use foldhash::HashMap;

use crate::access;
use crate::binding::Binding;

use super::checkpoint::{self, Checkpoint};
use super::columnar::{self, Row, SegmentHeader};
use super::merkle::Hash;
use super::segment::{self, FrameAt, HEADER_LEN, Header, Record};
use super::{CoverageEvent, SEALED_EXT, StorageError, segment_name};
use crate::signing::{self, SignerKey};

/// Where the next sealed segment links in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The data directory's writer id.
    pub writer_id: [u8; 16],
    /// Sequence number of the newest sealed columnar segment (0: none).
    pub prev_seq: u32,
    /// Its root (zero when none).
    pub prev_root: Hash,
}

/// What a log holds, reduced.
#[derive(Debug, Default)]
pub struct LogContents {
    /// Creation time from the header.
    pub created_ns: i64,
    /// Latest record of each binding id, in order of first appearance; `true` if carried.
    pub bindings: Vec<(Binding, bool)>,
    /// Coverage events in write order.
    pub events: Vec<CoverageEvent>,
    /// Records and frames that could not be read (damage inside the log).
    pub damaged: u64,
    /// Offset of a torn tail (incomplete or unreadable last frame), if any.
    pub torn_at: Option<usize>,
    /// Time of the last event or binding start/end seen, ns (0 if none).
    pub last_t_ns: i64,
}

/// Reads a log (or a first-format segment): every complete frame, stopping at a torn tail.
pub fn read_log(data: &[u8]) -> Result<LogContents, segment::FormatError> {
    let header = Header::decode(data)?;
    let mut out = LogContents {
        created_ns: header.created_ns,
        ..LogContents::default()
    };
    let mut index: HashMap<u64, usize> = HashMap::default();
    let mut offset = HEADER_LEN;
    loop {
        match segment::frame_at(data, offset) {
            FrameAt::End => break,
            FrameAt::Good { payload, next } => {
                match segment::decompress(payload) {
                    Ok(payload) => segment::decode_records(
                        &payload,
                        |r| {
                            let (b, carried) = match r {
                                Record::Binding(b) => (b, false),
                                Record::Carried(b) => (b, true),
                                Record::Event(e) => {
                                    out.last_t_ns = out.last_t_ns.max(e.t_ns());
                                    out.events.push(e);
                                    return;
                                }
                                Record::Seal(_) => return,
                            };
                            out.last_t_ns = out.last_t_ns.max(b.end_ns.unwrap_or(b.start_ns));
                            match index.get(&b.id) {
                                Some(&i) => {
                                    let slot = &mut out.bindings[i];
                                    slot.1 |= carried;
                                    slot.0 = b;
                                }
                                None => {
                                    index.insert(b.id, out.bindings.len());
                                    out.bindings.push((b, carried));
                                }
                            }
                        },
                        |_| out.damaged += 1,
                    ),
                    Err(_) => out.damaged += 1,
                }
                offset = next;
            }
            FrameAt::BadChecksum { next, .. } if next < data.len() => {
                out.damaged += 1;
                offset = next;
            }
            FrameAt::BadChecksum { .. } | FrameAt::Incomplete(_) | FrameAt::BadLength(_) => {
                out.torn_at = Some(offset);
                break;
            }
        }
    }
    Ok(out)
}

/// The rows of a sealed segment from a log's contents (times rounded outward to the unit).
#[must_use]
pub fn rows_of(contents: &LogContents) -> Vec<Row> {
    contents
        .bindings
        .iter()
        .map(|(b, carried)| Row {
            binding: round_times(b.clone()),
            carried: *carried,
        })
        .collect()
}

pub use super::columnar::round_times;

/// Seals log `seq` at `log_path` into `seq`'s `.seg`, linked to `chain`; the window ends at
/// `window_end_ns`. With `signer`, the segment's checkpoint is signed and stored beside it
/// before the log is removed. Returns the new root.
pub fn seal_log(
    seg_dir: &Path,
    seq: u32,
    log_path: &Path,
    chain: &Chain,
    window_end_ns: i64,
    signer: Option<&SignerKey>,
) -> Result<Hash, StorageError> {
    let data = fs::read(log_path).map_err(|e| StorageError::io("read", log_path, e))?;
    let contents = read_log(&data).map_err(|source| StorageError::Corrupt {
        path: log_path.to_owned(),
        offset: 0,
        source,
    })?;
    if let Some(at) = contents.torn_at {
        log::warn!(
            "{}: dropping {} bytes of torn tail at offset {at}",
            log_path.display(),
            data.len() - at
        );
    }
    if contents.damaged > 0 {
        log::warn!(
            "{}: {} damaged frames or records left out of the sealed segment",
            log_path.display(),
            contents.damaged
        );
    }
    // The window is when the log was written; it also spans its events' own times.
    let (mut lo, mut hi) = (contents.created_ns, window_end_ns.max(contents.created_ns));
    for e in &contents.events {
        lo = lo.min(e.t_ns());
        hi = hi.max(e.t_ns());
    }
    let header = SegmentHeader {
        seq,
        writer_id: chain.writer_id,
        prev_seq: chain.prev_seq,
        prev_root: chain.prev_root,
        window_start_ns: lo,
        window_end_ns: hi,
    };
    let rows = rows_of(&contents);
    let size = rows.len() as u64 + 1;
    let (bytes, root) = columnar::encode_segment(&header, rows, &contents.events);
    write_sealed(seg_dir, seq, &bytes)?;
    if let Some(signer) = signer {
        let body = Checkpoint::of_header(&header, size, root).body();
        // A checkpoint that cannot be written loses no record: the next start signs it.
        match signing::sign(&body, signer) {
            Ok(note) => {
                if let Err(e) = checkpoint::write_checkpoint(seg_dir, seq, &note) {
                    log::error!("segment {seq}: cannot store its signed checkpoint: {e}");
                }
            }
            Err(e) => log::error!("segment {seq}: cannot sign its checkpoint: {e}"),
        }
    }
    fs::remove_file(log_path).map_err(|e| StorageError::io("remove", log_path, e))?;
    sync_dir(seg_dir).map_err(|e| StorageError::io("fsync", seg_dir, e))?;
    Ok(root)
}

/// Writes a sealed segment: `.seg.tmp` (mode 0640, the data directory's group: see
/// [`crate::access`]), fsync, rename to `.seg`, fsync the directory.
pub fn write_sealed(seg_dir: &Path, seq: u32, bytes: &[u8]) -> Result<PathBuf, StorageError> {
    replace_file(seg_dir, &segment_name(seq, SEALED_EXT), bytes)
}

/// Writes `bytes` as `seg_dir/name` so that a reader sees the old file or the whole new one:
/// `name.tmp` (mode 0640 and the data directory's group, `crate::access`), fsync, rename over
/// `name`, fsync the directory. Without a configured group, a file replaced keeps its group
/// (best effort: only its owner in that group, or root, may give it).
pub fn replace_file(seg_dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, StorageError> {
    let path = seg_dir.join(name);
    let tmp = seg_dir.join(format!("{name}.tmp"));
    let old_gid = fs::metadata(&path).ok().map(|m| m.gid());
    let access = access::of_segments_dir(seg_dir)?;
    let mut f = access::create_file(
        &tmp,
        OpenOptions::new().write(true).create(true).truncate(true),
        &access,
    )
    .map_err(|e| StorageError::io("create", &tmp, e))?;
    if access.gid.is_none()
        && let Some(gid) = old_gid
    {
        let _ = std::os::unix::fs::fchown(&f, None, Some(gid));
    }
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| StorageError::io("write", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| StorageError::io("rename", &tmp, e))?;
    sync_dir(seg_dir).map_err(|e| StorageError::io("fsync", seg_dir, e))?;
    Ok(path)
}

/// fsyncs a directory (its entries).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
