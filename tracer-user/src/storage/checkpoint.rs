//! Checkpoints: one signed note per sealed segment, `DIR/segments/NNNNNNNN.checkpoint`,
//! stating the segment's Merkle root and its link in the chain, so that a holder of the
//! public key can check that the segment was not altered since it was sealed.
//!
//! The note's text (the body) is exactly six lines:
//!
//! ```text
//! nattrace/<writer id, 32 lowercase hex>
//! <tree size: rows + 1>
//! <base64 of the segment root>
//! segment <seq>
//! previous <prev_seq> <base64 of prev_root>
//! window <window_start_ns> <window_end_ns>
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::merkle::Hash;
use super::{StorageError, segment_name};
use crate::signing::Note;

/// File name extension of a checkpoint.
pub const CHECKPOINT_EXT: &str = "checkpoint";

/// Prefix of a checkpoint's origin line, before the writer id.
const ORIGIN_PREFIX: &str = "nattrace/";

/// What a checkpoint states about one sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The data directory's writer id.
    pub writer_id: [u8; 16],
    /// Number of leaves of the segment's tree: rows + 1.
    pub size: u64,
    /// Root of the segment's tree.
    pub root: Hash,
    /// Sequence number of the segment.
    pub seq: u32,
    /// Sequence number of the previous sealed segment (0: none).
    pub prev_seq: u32,
    /// Root of the previous sealed segment (zero when none).
    pub prev_root: Hash,
    /// Start of the time window the segment covers, ns since the Unix epoch.
    pub window_start_ns: i64,
    /// End of that window, ns since the Unix epoch.
    pub window_end_ns: i64,
}

/// Why a checkpoint body cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    /// The body does not have exactly six lines, each ending with a newline.
    #[error("checkpoint body has {found} lines, not 6 each ending with a newline")]
    LineCount {
        /// Number of lines found (a last line without newline counts).
        found: usize,
    },
    /// A line that is not what it must be.
    #[error("checkpoint line {line}: expected {expected}, found {found:?}")]
    Line {
        /// Line number, 1-based.
        line: usize,
        /// What the line must hold.
        expected: &'static str,
        /// The line (at most 100 characters of it).
        found: String,
    },
}

impl Checkpoint {
    /// The checkpoint of a sealed segment (format version 2; its header read).
    #[must_use]
    pub fn of_segment(seg: &super::columnar::SealedSegment) -> Self {
        Self::of_header(&seg.header, seg.summary.rows + 1, seg.summary.root)
    }

    /// The checkpoint of the segment with `header`, a tree of `size` leaves and `root`.
    #[must_use]
    pub fn of_header(header: &super::columnar::SegmentHeader, size: u64, root: Hash) -> Self {
        Self {
            writer_id: header.writer_id,
            size,
            root,
            seq: header.seq,
            prev_seq: header.prev_seq,
            prev_root: header.prev_root,
            window_start_ns: header.window_start_ns,
            window_end_ns: header.window_end_ns,
        }
    }

    /// The origin line: `nattrace/<writer id as 32 lowercase hex>`.
    #[must_use]
    pub fn origin(&self) -> String {
        Self::origin_of(&self.writer_id)
    }

    /// The origin of the log of writer `writer_id`.
    #[must_use]
    pub fn origin_of(writer_id: &[u8; 16]) -> String {
        format!("{ORIGIN_PREFIX}{}", super::retention::hex(writer_id))
    }

    /// The note text of the checkpoint (six lines, each ending with a newline).
    #[must_use]
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\nsegment {}\nprevious {} {}\nwindow {} {}\n",
            self.origin(),
            self.size,
            BASE64.encode(self.root),
            self.seq,
            self.prev_seq,
            BASE64.encode(self.prev_root),
            self.window_start_ns,
            self.window_end_ns
        )
    }

    /// Parses a checkpoint body, strictly: exactly the six lines of [`Checkpoint::body`],
    /// canonical base64 and decimal numbers without leading zeros (or `+`, or `-0`), so that
    /// `parse_body(b).body() == b` for every body accepted.
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let Some(inner) = body.strip_suffix('\n') else {
            return Err(CheckpointError::LineCount {
                found: body.split('\n').count() - usize::from(body.is_empty()),
            });
        };
        let lines: Vec<&str> = inner.split('\n').collect();
        let [origin, size, root, segment, previous, window] = lines[..] else {
            return Err(CheckpointError::LineCount { found: lines.len() });
        };
        let bad = |line: usize, expected: &'static str, found: &str| CheckpointError::Line {
            line,
            expected,
            found: found.chars().take(100).collect(),
        };

        const ORIGIN: &str = "nattrace/ and a writer id of 32 lowercase hex digits";
        let writer_id = origin
            .strip_prefix(ORIGIN_PREFIX)
            .and_then(parse_hex16)
            .ok_or_else(|| bad(1, ORIGIN, origin))?;

        const SIZE: &str = "the tree size in decimal";
        let size = parse_u64(size).ok_or_else(|| bad(2, SIZE, size))?;

        const ROOT: &str = "the base64 of a 32-byte root";
        let root = parse_hash(root).ok_or_else(|| bad(3, ROOT, root))?;

        const SEGMENT: &str = "\"segment <seq>\"";
        let seq = segment
            .strip_prefix("segment ")
            .and_then(parse_u32)
            .ok_or_else(|| bad(4, SEGMENT, segment))?;

        const PREVIOUS: &str = "\"previous <seq> <base64 root>\"";
        let (prev_seq, prev_root) = previous
            .strip_prefix("previous ")
            .and_then(|r| r.split_once(' '))
            .and_then(|(s, h)| Some((parse_u32(s)?, parse_hash(h)?)))
            .ok_or_else(|| bad(5, PREVIOUS, previous))?;

        const WINDOW: &str = "\"window <start ns> <end ns>\"";
        let (window_start_ns, window_end_ns) = window
            .strip_prefix("window ")
            .and_then(|r| r.split_once(' '))
            .and_then(|(a, b)| Some((parse_i64(a)?, parse_i64(b)?)))
            .ok_or_else(|| bad(6, WINDOW, window))?;

        Ok(Self {
            writer_id,
            size,
            root,
            seq,
            prev_seq,
            prev_root,
            window_start_ns,
            window_end_ns,
        })
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Canonical decimal digits: "0" or a non-zero digit followed by digits.
fn is_canonical_decimal(s: &str) -> bool {
    match s.as_bytes() {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    is_canonical_decimal(s).then(|| s.parse().ok()).flatten()
}

fn parse_u32(s: &str) -> Option<u32> {
    is_canonical_decimal(s).then(|| s.parse().ok()).flatten()
}

fn parse_i64(s: &str) -> Option<i64> {
    match s.strip_prefix('-') {
        Some("0") => None,
        Some(digits) if is_canonical_decimal(digits) => s.parse().ok(),
        Some(_) => None,
        None => is_canonical_decimal(s).then(|| s.parse().ok()).flatten(),
    }
}

/// Base64 of exactly 32 bytes, in its one canonical form.
fn parse_hash(s: &str) -> Option<Hash> {
    let bytes = BASE64.decode(s).ok()?;
    let hash: Hash = bytes.try_into().ok()?;
    (BASE64.encode(hash) == s).then_some(hash)
}

/// Path of segment `seq`'s checkpoint in segments directory `seg_dir`.
#[must_use]
pub fn checkpoint_path(seg_dir: &Path, seq: u32) -> PathBuf {
    seg_dir.join(segment_name(seq, CHECKPOINT_EXT))
}

/// Writes segment `seq`'s checkpoint: `.checkpoint.tmp`, fsync, rename to `.checkpoint`,
/// fsync the directory. The file has mode 0640 (whatever the umask); a checkpoint that is
/// replaced (by `nattrace cosign`) keeps its group where the caller may set it.
pub fn write_checkpoint(seg_dir: &Path, seq: u32, note: &Note) -> Result<PathBuf, StorageError> {
    super::seal::replace_file(
        seg_dir,
        &segment_name(seq, CHECKPOINT_EXT),
        note.encode().as_bytes(),
    )
}

/// Reads segment `seq`'s checkpoint: `None` if there is none. A file that is not a signed
/// note is an error (`StorageError::Io` with op "parse" and kind `InvalidData`, whose message
/// says what is wrong). Signatures are not checked.
pub fn read_checkpoint(seg_dir: &Path, seq: u32) -> Result<Option<Note>, StorageError> {
    let path = checkpoint_path(seg_dir, seq);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("read", &path, e)),
    };
    let invalid = |e: Box<dyn std::error::Error + Send + Sync>| StorageError::Io {
        op: "parse",
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    };
    let text = String::from_utf8(bytes).map_err(|e| invalid(e.into()))?;
    Note::parse(&text).map(Some).map_err(|e| invalid(e.into()))
}

/// Sequence numbers of the checkpoints in `seg_dir`, ascending (none if `seg_dir` does not
/// exist).
pub fn list_checkpoints(seg_dir: &Path) -> Result<Vec<u32>, StorageError> {
    let mut seqs = Vec::new();
    match fs::read_dir(seg_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io("list", seg_dir, e))?;
                if let Some(seq) = entry.file_name().to_str().and_then(parse_checkpoint_name) {
                    seqs.push(seq);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("list", seg_dir, e)),
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// The sequence number of a checkpoint file name, `NNNNNNNN.checkpoint`.
fn parse_checkpoint_name(name: &str) -> Option<u32> {
    let num = name.strip_suffix(CHECKPOINT_EXT)?.strip_suffix('.')?;
    if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    num.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{SignerKey, sign};
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> Checkpoint {
        Checkpoint {
            writer_id: [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ],
            size: 1001,
            root: [7; 32],
            seq: 12,
            prev_seq: 11,
            prev_root: [0xfe; 32],
            window_start_ns: 1_793_577_600_000_000_000,
            window_end_ns: 1_793_581_200_000_000_000,
        }
    }

    #[test]
    fn body_is_the_documented_text() {
        let c = sample();
        assert_eq!(c.origin(), "nattrace/00112233445566778899aabbccddeeff");
        assert_eq!(
            c.body(),
            "nattrace/00112233445566778899aabbccddeeff\n\
             1001\n\
             BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n\
             segment 12\n\
             previous 11 /v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4=\n\
             window 1793577600000000000 1793581200000000000\n"
        );
        assert_eq!(Checkpoint::parse_body(&c.body()), Ok(c));
        let first = Checkpoint {
            prev_seq: 0,
            prev_root: [0; 32],
            window_start_ns: -5,
            window_end_ns: 0,
            size: 1,
            ..c
        };
        assert_eq!(Checkpoint::parse_body(&first.body()), Ok(first));
    }

    #[test]
    fn parse_body_is_strict() {
        let good = sample().body();
        let lines: Vec<&str> = good.lines().collect();
        let with = |i: usize, line: &str| {
            let mut l = lines.clone();
            l[i] = line;
            format!("{}\n", l.join("\n"))
        };
        let bad_lines = [
            (0, "nattrace/00112233445566778899AABBCCDDEEFF"),
            (0, "nattrace/00112233445566778899aabbccddee"),
            (0, "natrace/00112233445566778899aabbccddeeff"),
            (0, "nattrace/00112233445566778899aabbccddeeff "),
            (1, "01001"),
            (1, "+1001"),
            (1, "-1"),
            (1, "18446744073709551616"),
            (1, ""),
            (2, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"),
            (2, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwd="),
            (2, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw=="),
            (3, "segment 012"),
            (3, "segment  12"),
            (3, "segment 4294967296"),
            (3, "Segment 12"),
            (4, "previous 11"),
            (
                4,
                "previous 11 /v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4= ",
            ),
            (
                4,
                "previous 11  /v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4=",
            ),
            (5, "window -0 1"),
            (5, "window 1 01"),
            (5, "window 1"),
            (5, "window 1 2 3"),
            (5, "window 9223372036854775808 1"),
        ];
        for (i, line) in bad_lines {
            let e = Checkpoint::parse_body(&with(i, line)).unwrap_err();
            assert!(
                matches!(e, CheckpointError::Line { line, .. } if line == i + 1),
                "{line:?}: {e}"
            );
        }
        assert_eq!(
            Checkpoint::parse_body(good.trim_end()),
            Err(CheckpointError::LineCount { found: 6 })
        );
        assert_eq!(
            Checkpoint::parse_body(&format!("{good}\n")),
            Err(CheckpointError::LineCount { found: 7 })
        );
        assert_eq!(
            Checkpoint::parse_body(&format!("{good}extra\n")),
            Err(CheckpointError::LineCount { found: 7 })
        );
        assert_eq!(
            Checkpoint::parse_body(""),
            Err(CheckpointError::LineCount { found: 0 })
        );
        let e = Checkpoint::parse_body(&with(1, "01001")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "checkpoint line 2: expected the tree size in decimal, found \"01001\""
        );
        // Extremes parse back.
        let c = Checkpoint {
            size: u64::MAX,
            seq: u32::MAX,
            window_start_ns: i64::MIN,
            window_end_ns: i64::MAX,
            ..sample()
        };
        assert_eq!(Checkpoint::parse_body(&c.body()), Ok(c));
    }

    #[test]
    fn files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join("segments");
        assert_eq!(list_checkpoints(&seg_dir).unwrap(), Vec::<u32>::new());
        fs::create_dir(&seg_dir).unwrap();
        assert_eq!(read_checkpoint(&seg_dir, 3).unwrap(), None);

        let key = SignerKey::generate("gw1").unwrap();
        let note = sign(&sample().body(), &key).unwrap();
        let path = write_checkpoint(&seg_dir, 12, &note).unwrap();
        assert_eq!(path, seg_dir.join("00000012.checkpoint"));
        assert_eq!(checkpoint_path(&seg_dir, 12), path);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        write_checkpoint(&seg_dir, 3, &note).unwrap();
        for other in [
            "00000004.seg",
            "00000005.checkpoint.tmp",
            "x.checkpoint",
            ".checkpoint",
        ] {
            fs::write(seg_dir.join(other), "").unwrap();
        }
        assert_eq!(list_checkpoints(&seg_dir).unwrap(), vec![3, 12]);

        let read = read_checkpoint(&seg_dir, 12).unwrap().unwrap();
        assert_eq!(read, note);
        read.verify(&key.verifier()).unwrap();
        assert_eq!(Checkpoint::parse_body(&read.text), Ok(sample()));

        // Rewriting replaces the file whole.
        let mut cosigned = read;
        cosigned
            .add_signature(&SignerKey::generate("auditor").unwrap())
            .unwrap();
        write_checkpoint(&seg_dir, 12, &cosigned).unwrap();
        assert_eq!(read_checkpoint(&seg_dir, 12).unwrap().unwrap(), cosigned);
        assert!(!seg_dir.join("00000012.checkpoint.tmp").exists());

        fs::write(checkpoint_path(&seg_dir, 3), "not a note\n").unwrap();
        let e = read_checkpoint(&seg_dir, 3).unwrap_err();
        let msg = crate::storage::error_chain(&e);
        assert!(msg.starts_with("cannot parse "), "{msg}");
        assert!(
            msg.ends_with("malformed note: no empty line before the signatures"),
            "{msg}"
        );
    }
}
