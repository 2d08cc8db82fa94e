//! Evidence bundles for investigators: the records that answer one question, each with its
//! inclusion proof up to a signed segment checkpoint, in one self-contained file that
//! `nattrace verify BUNDLE --key PUBKEY` checks offline. FORMAT.md, "Evidence bundle", is
//! the description of the container.
//!
//! [`export`] writes bundles from a data directory; [`check`] verifies them with nothing but
//! the bundle and the producer's public key.

pub mod check;
pub mod export;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::binding::Binding;
use crate::output::{self, Format};
use crate::storage::Search;

/// Version of the bundle layout ([`Manifest::bundle_format`]).
pub const BUNDLE_FORMAT: u32 = 1;
/// The signed manifest.
pub const MANIFEST: &str = "MANIFEST";
/// The plain-text guide.
pub const GUIDE: &str = "README.txt";
/// The producer's public key.
pub const PRODUCER_KEY: &str = "producer.pub";
/// The records and events with their proofs, one JSON object per line.
pub const PROOFS: &str = "proofs.jsonl";
/// The bindings as CSV.
pub const RECORDS_CSV: &str = "records.csv";
/// The bindings as JSON lines.
pub const RECORDS_JSONL: &str = "records.jsonl";
/// Directory of the checkpoints inside the bundle.
pub const CHECKPOINTS_DIR: &str = "checkpoints/";
/// The largest file a bundle may hold (a reader refuses larger ones).
pub const MAX_ENTRY_LEN: u64 = 1 << 30;

/// The manifest: what was asked, by whom, when, and the hash of everything disclosed. It is
/// the text of a signed note (the producer's key signs it at export).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`BUNDLE_FORMAT`].
    pub bundle_format: u32,
    /// The case (authorisation) the export was made for.
    pub case: String,
    /// Why a window longer than the data directory's `max_window` was needed, if given.
    pub reason: Option<String>,
    /// The question, as `nattrace query` flags.
    pub query: String,
    /// The question, field by field, so that a verifier can check every record against it.
    pub search: SearchSpec,
    /// When the export was made (RFC 3339, UTC).
    pub exported_at: String,
    /// The OS user who made it.
    pub exported_by: String,
    /// The producer key's name.
    pub producer: String,
    /// The log origin of the checkpoints (`nattrace/<writer id>`).
    pub origin: String,
    /// The segments the records and the coverage come from, by sequence number.
    pub segments: Vec<SegmentRef>,
    /// Number of record lines in `proofs.jsonl`.
    pub records: u64,
    /// Leaf hash (hex) of each record line of `proofs.jsonl`, in order.
    pub record_leaves: Vec<String>,
    /// Number of bindings (records merged by id) in `records.csv` and `records.jsonl`.
    pub bindings: u64,
    /// The coverage of the window as computed at export: `None` when complete, else the
    /// warning `nattrace query` prints.
    pub coverage_warning: Option<String>,
    /// SHA-256 (hex) of every other file of the bundle except the checkpoints (whose bodies
    /// are pinned by [`Manifest::segments`] and whose signatures are checked on their own).
    pub files: BTreeMap<String, String>,
}

/// One segment in a bundle: its checkpoint's body, pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// Sequence number.
    pub seq: u32,
    /// Leaves in its tree (rows + 1).
    pub tree_size: u64,
    /// Its root, hex.
    pub root: String,
    /// The checkpoint was first signed at this export (the segment was sealed before a
    /// signing key was configured).
    pub signed_at_export: bool,
}

/// A [`Search`] as the manifest holds it: addresses as `nattrace query` takes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchSpec {
    /// `--external`.
    pub external: Option<String>,
    /// `--internal`.
    pub internal: Option<String>,
    /// `--destination`.
    pub destination: Option<String>,
    /// `--proto`, as a number.
    pub proto: Option<u8>,
    /// Window start, ns since the epoch.
    pub from_ns: i64,
    /// Window end, ns since the epoch.
    pub to_ns: i64,
}

impl SearchSpec {
    /// The spec of `s`.
    #[must_use]
    pub fn of(s: &Search) -> Self {
        Self {
            external: s.external.map(crate::cliparse::format_endpoint),
            internal: s.internal.map(crate::cliparse::format_endpoint),
            destination: s.destination.map(crate::cliparse::format_endpoint),
            proto: s.proto,
            from_ns: s.from_ns,
            to_ns: s.to_ns,
        }
    }

    /// Back to a [`Search`]; `None` when an address does not parse.
    #[must_use]
    pub fn to_search(&self) -> Option<Search> {
        let ep = |v: &Option<String>| -> Option<Option<(IpAddr, Option<u16>)>> {
            match v {
                None => Some(None),
                Some(t) => crate::cliparse::parse_endpoint(t, false).ok().map(Some),
            }
        };
        Some(Search {
            external: ep(&self.external)?,
            internal: ep(&self.internal)?,
            destination: ep(&self.destination)?,
            proto: self.proto,
            from_ns: self.from_ns,
            to_ns: self.to_ns,
        })
    }
}

/// One line of `proofs.jsonl`: a record or a segment's events, with its audit path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofLine {
    /// The segment (its checkpoint is `checkpoints/<seq>.checkpoint`).
    pub segment: u32,
    /// Leaf index in the segment's tree.
    pub leaf_index: u64,
    /// Leaves in the segment's tree.
    pub tree_size: u64,
    /// A record's canonical encoding (hex), for a record line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// The segment's coverage events as log records (hex), for an events line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// The audit path, hex, leaf's sibling first.
    pub path: Vec<String>,
}

/// The files of a bundle by name, in archive order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Files {
    /// (name, contents).
    pub entries: Vec<(String, Vec<u8>)>,
}

impl Files {
    /// The contents of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
    }

    /// Writes the files as a POSIX ustar archive, each 0640 with modification time `mtime`.
    pub fn write_tar(&self, out: impl Write, mtime: u64) -> std::io::Result<()> {
        let mut b = tar::Builder::new(out);
        for (name, data) in &self.entries {
            let mut h = tar::Header::new_ustar();
            h.set_path(name)?;
            h.set_size(data.len() as u64);
            h.set_mode(0o640);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, data.as_slice())?;
        }
        b.into_inner()?.flush()
    }

    /// Reads an archive written by [`Files::write_tar`]: regular files only, no duplicate
    /// names, none larger than [`MAX_ENTRY_LEN`]. Also gives the first entry's modification
    /// time, with which [`Files::write_tar`] must give back the very same bytes.
    pub fn read_tar_with_mtime(input: impl Read) -> Result<(Self, u64), String> {
        let mut mtime = None;
        let files = Self::read_entries(input, &mut mtime)?;
        Ok((files, mtime.unwrap_or(0)))
    }

    /// [`Files::read_tar_with_mtime`] without the time.
    pub fn read_tar(input: impl Read) -> Result<Self, String> {
        Self::read_entries(input, &mut None)
    }

    fn read_entries(input: impl Read, mtime: &mut Option<u64>) -> Result<Self, String> {
        let mut a = tar::Archive::new(input);
        let mut files = Files::default();
        for entry in a.entries().map_err(|e| format!("not a tar archive: {e}"))? {
            let mut entry = entry.map_err(|e| format!("damaged archive: {e}"))?;
            let name = entry
                .path()
                .map_err(|e| format!("damaged archive: {e}"))?
                .to_string_lossy()
                .into_owned();
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(format!("{name}: not a regular file"));
            }
            let len = entry.header().size().map_err(|e| format!("{name}: {e}"))?;
            if len > MAX_ENTRY_LEN {
                return Err(format!("{name}: {len} bytes, more than a bundle holds"));
            }
            if mtime.is_none() {
                *mtime = Some(entry.header().mtime().map_err(|e| format!("{name}: {e}"))?);
            }
            if files.get(&name).is_some() {
                return Err(format!("{name}: appears twice"));
            }
            // The header's size is not trusted for an allocation: the bytes must be there.
            let mut data = Vec::with_capacity(len.min(64 << 10) as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("{name}: {e}"))?;
            files.entries.push((name, data));
        }
        Ok(files)
    }
}

/// SHA-256 of `data`, hex.
#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex.
#[must_use]
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from lowercase hex; `None` if not exactly that.
#[must_use]
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.bytes().any(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// `records.csv` and `records.jsonl` for `bindings`, exactly as `nattrace query` prints them.
#[must_use]
pub fn render_records(bindings: &[Binding]) -> (Vec<u8>, Vec<u8>) {
    let mut csv = Vec::new();
    let mut jsonl = Vec::new();
    output::write_bindings(&mut csv, Format::Csv, bindings).expect("writes to memory");
    output::write_bindings(&mut jsonl, Format::Json, bindings).expect("writes to memory");
    (csv, jsonl)
}

/// The bindings of `rows` (segment, binding) merged by id: the row of the latest segment
/// wins (a binding open when one segment was sealed ends in a later one). By start, then id.
#[must_use]
pub fn merge_rows(rows: &[(u32, Binding)]) -> Vec<Binding> {
    let mut latest: BTreeMap<u64, (u32, &Binding)> = BTreeMap::new();
    for (seq, b) in rows {
        match latest.get(&b.id) {
            Some((s, _)) if *s >= *seq => {}
            _ => {
                latest.insert(b.id, (*seq, b));
            }
        }
    }
    let mut out: Vec<Binding> = latest.into_values().map(|(_, b)| b.clone()).collect();
    out.sort_by_key(|b| (b.start_ns, b.id));
    out
}

/// The plain-text guide placed in every bundle.
#[must_use]
pub fn guide(m: &Manifest) -> String {
    format!(
        "nattrace evidence bundle
========================

Case:        {case}
Question:    nattrace query {query}
Exported:    {at} by {by}
Producer:    {producer} (public key in producer.pub)
Bindings:    {bindings} ({records} signed records)

What is here
------------
records.csv, records.jsonl   the answer, one binding per line, as `nattrace query` prints it
proofs.jsonl                 each record in its canonical encoding with its Merkle inclusion
                             proof (RFC 9162) up to the root of the segment that holds it, and
                             each segment's capture events (when recording ran, what was lost)
checkpoints/                 one signed checkpoint (C2SP signed note) per segment: origin, tree
                             size, root, the previous segment's root, the segment's time window
MANIFEST                     the case, the question, the export time, the hash of every record
                             and file, signed by the producer's key at export
producer.pub                 the producer's public key (Ed25519, signed-note verifier key)

How to verify
-------------
Obtain the producer's public key through a channel you trust (not from this bundle), then:

    nattrace verify THIS-BUNDLE --key producer.pub

It needs nothing but this file and the key. It checks the manifest's signature, every
checkpoint's signature, every record's inclusion proof, that no record was added, removed or
changed, that records.csv and records.jsonl say exactly what the signed records say, and that
every record matches the question. It prints a report and exits 0 only if all of it holds.

The formats are described in FORMAT.md of nattrace (\"Canonical record encoding\",
\"Merkle trees\", \"Checkpoints and signatures\", \"Evidence bundle\"), precisely enough to
check this bundle with other tools.
",
        case = m.case,
        query = m.query,
        at = m.exported_at,
        by = m.exported_by,
        producer = m.producer,
        bindings = m.bindings,
        records = m.records,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_uppercase_and_odd_lengths() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("AB").is_none());
        assert!(unhex("abc").is_none());
    }

    #[test]
    fn tar_round_trips_and_refuses_duplicates() {
        let files = Files {
            entries: vec![
                ("a".to_owned(), b"one".to_vec()),
                ("checkpoints/00000001.checkpoint".to_owned(), vec![7; 700]),
            ],
        };
        let mut buf = Vec::new();
        files.write_tar(&mut buf, 1).unwrap();
        assert_eq!(Files::read_tar(buf.as_slice()).unwrap(), files);
        let twice = Files {
            entries: vec![
                ("a".to_owned(), b"one".to_vec()),
                ("a".to_owned(), b"two".to_vec()),
            ],
        };
        let mut buf = Vec::new();
        twice.write_tar(&mut buf, 1).unwrap();
        assert!(
            Files::read_tar(buf.as_slice())
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn search_spec_round_trips() {
        let s = Search {
            external: Some(("203.0.113.7".parse().unwrap(), Some(40123))),
            internal: Some(("2001:db8::10".parse().unwrap(), Some(5))),
            destination: Some(("198.51.100.1".parse().unwrap(), None)),
            proto: Some(6),
            from_ns: -5,
            to_ns: 99,
        };
        assert_eq!(SearchSpec::of(&s).to_search(), Some(s));
    }
}
