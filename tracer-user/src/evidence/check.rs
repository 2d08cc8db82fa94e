//! Offline verification of an evidence bundle: `nattrace verify BUNDLE --key PUBKEY`.
//!
//! Needs nothing but the bundle and the producer's public key. Every check that fails adds
//! a problem naming the file, record, proof or signature that broke; the bundle verifies
//! only when there is none.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use serde::Serialize;

use super::{
    BUNDLE_FORMAT, CHECKPOINTS_DIR, Files, GUIDE, MANIFEST, Manifest, PRODUCER_KEY, PROOFS,
    ProofLine, RECORDS_CSV, RECORDS_JSONL, hex, merge_rows, render_records, sha256_hex, unhex,
};
use crate::binding::Binding;
use crate::coverage::Coverage;
use crate::output::format_time;
use crate::signing::{Note, VerifierKey};
use crate::storage::checkpoint::{self, Checkpoint};
use crate::storage::merkle::{self, Hash};
use crate::storage::segment::{self, Record};
use crate::storage::{CoverageEvent, record};

/// What verifying a bundle found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BundleReport {
    /// The case, from the signed manifest.
    pub case: Option<String>,
    /// The reason given for a long window.
    pub reason: Option<String>,
    /// The question.
    pub query: Option<String>,
    /// When and by whom it was exported.
    pub exported_at: Option<String>,
    /// The OS user who exported it.
    pub exported_by: Option<String>,
    /// The producer key's name and id (hex).
    pub producer: Option<String>,
    /// Segments whose checkpoint verified.
    pub segments: Vec<u32>,
    /// Checkpoints first signed at export.
    pub signed_at_export: Vec<u32>,
    /// Second signatures: (name, "verified" | "not checked: no key given").
    pub cosignatures: BTreeMap<String, String>,
    /// Records whose inclusion proof verified.
    pub records_verified: u64,
    /// Bindings (records merged by id).
    pub bindings: u64,
    /// Earliest start and latest end among the bindings, ns.
    pub span_ns: Option<(i64, Option<i64>)>,
    /// Coverage of the window from the proven events: `None` when complete.
    pub coverage_warning: Option<String>,
    /// Every problem found.
    pub problems: Vec<String>,
}

impl BundleReport {
    /// Nothing failed.
    #[must_use]
    pub fn is_verified(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the bundle `bytes` against the producer key `key`; second signatures by any of
/// `witnesses` are verified too.
#[must_use]
pub fn verify_bundle(bytes: &[u8], key: &VerifierKey, witnesses: &[VerifierKey]) -> BundleReport {
    let mut r = BundleReport::default();
    let files = match Files::read_tar(bytes) {
        Ok(f) => f,
        Err(e) => {
            r.problems.push(format!("not a readable bundle: {e}"));
            return r;
        }
    };
    // The producer key in the bundle is informative; the key given is what counts.
    match files
        .get(PRODUCER_KEY)
        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
    {
        None => r.problems.push(format!("{PRODUCER_KEY}: missing")),
        Some(text) if text != key.to_text() => r.problems.push(format!(
            "{PRODUCER_KEY}: the bundle names the producer key '{text}', not the key given \
             ('{}')",
            key.to_text()
        )),
        Some(_) => {}
    }
    r.producer = Some(format!("{} (key id {})", key.name(), hex(&key.key_id())));

    // The manifest, signed by the producer.
    let Some(manifest_bytes) = files.get(MANIFEST) else {
        r.problems.push(format!("{MANIFEST}: missing"));
        return r;
    };
    let note = match std::str::from_utf8(manifest_bytes)
        .map_err(|e| e.to_string())
        .and_then(|t| Note::parse(t).map_err(|e| e.to_string()))
    {
        Ok(n) => n,
        Err(e) => {
            r.problems
                .push(format!("{MANIFEST}: not a signed note: {e}"));
            return r;
        }
    };
    if let Err(e) = note.verify(key) {
        r.problems
            .push(format!("{MANIFEST}: signature by the producer key: {e}"));
        return r;
    }
    let m: Manifest = match serde_json::from_str(&note.text) {
        Ok(m) => m,
        Err(e) => {
            r.problems.push(format!("{MANIFEST}: not a manifest: {e}"));
            return r;
        }
    };
    if m.bundle_format != BUNDLE_FORMAT {
        r.problems.push(format!(
            "{MANIFEST}: bundle format {} (this build reads {BUNDLE_FORMAT})",
            m.bundle_format
        ));
        return r;
    }
    r.case = Some(m.case.clone());
    r.reason = m.reason.clone();
    r.query = Some(m.query.clone());
    r.exported_at = Some(m.exported_at.clone());
    r.exported_by = Some(m.exported_by.clone());

    // The container is canonical: the files in the order export writes them, each stamped
    // with the export's time. Written again so, it must be the very same bytes, so that no
    // byte outside the files (headers, order, padding, trailing data) can change either,
    // and the bundle keeps the SHA-256 the audit log recorded.
    let mtime = chrono::DateTime::parse_from_rfc3339(&m.exported_at)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp()).ok());
    let mut canonical = Files::default();
    for name in [
        MANIFEST,
        GUIDE,
        PRODUCER_KEY,
        PROOFS,
        RECORDS_CSV,
        RECORDS_JSONL,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(m.segments.iter().map(|s| checkpoint_entry(s.seq)))
    {
        if let Some(data) = files.get(&name) {
            canonical.entries.push((name, data.to_vec()));
        }
    }
    let mut again = Vec::with_capacity(bytes.len());
    let same = mtime.is_some_and(|t| canonical.write_tar(&mut again, t).is_ok() && again == bytes);
    if !same {
        r.problems.push(
            "the archive was altered outside its files (tar headers, order, padding or trailing \
             bytes differ from the canonical form nattrace export writes)"
                .to_owned(),
        );
    }

    // Every file is one the manifest names, unaltered.
    let checkpoint_names: BTreeMap<String, u32> = m
        .segments
        .iter()
        .map(|s| (checkpoint_entry(s.seq), s.seq))
        .collect();
    for (name, data) in &files.entries {
        if name == MANIFEST || checkpoint_names.contains_key(name) {
            continue;
        }
        match m.files.get(name) {
            None => r
                .problems
                .push(format!("{name}: not listed in the signed manifest")),
            Some(want) if *want != sha256_hex(data) => r.problems.push(format!(
                "{name}: altered (its SHA-256 differs from the signed manifest's)"
            )),
            Some(_) => {}
        }
    }
    for name in m.files.keys().chain(checkpoint_names.keys()) {
        if files.get(name).is_none() {
            r.problems.push(format!("{name}: missing from the bundle"));
        }
    }

    // Checkpoints: signed by the producer, pinned by the manifest.
    let mut roots: BTreeMap<u32, Checkpoint> = BTreeMap::new();
    for s in &m.segments {
        let name = checkpoint_entry(s.seq);
        let Some(data) = files.get(&name) else {
            continue;
        };
        let note = match std::str::from_utf8(data)
            .map_err(|e| e.to_string())
            .and_then(|t| Note::parse(t).map_err(|e| e.to_string()))
        {
            Ok(n) => n,
            Err(e) => {
                r.problems.push(format!("{name}: not a signed note: {e}"));
                continue;
            }
        };
        if let Err(e) = note.verify(key) {
            r.problems
                .push(format!("{name}: signature by the producer key: {e}"));
            continue;
        }
        for sig in &note.signatures {
            if sig.name == key.name() {
                continue;
            }
            let status = match witnesses.iter().find(|w| w.name() == sig.name) {
                None => "not checked: no key given".to_owned(),
                Some(w) => match note.verify(w) {
                    Ok(()) => "verified".to_owned(),
                    Err(e) => {
                        r.problems
                            .push(format!("{name}: second signature by {}: {e}", sig.name));
                        "FAILED".to_owned()
                    }
                },
            };
            let entry = r
                .cosignatures
                .entry(sig.name.clone())
                .or_insert(status.clone());
            if status == "FAILED" || entry.starts_with("not checked") {
                *entry = status;
            }
        }
        let cp = match Checkpoint::parse_body(&note.text) {
            Ok(cp) => cp,
            Err(e) => {
                r.problems.push(format!("{name}: not a checkpoint: {e}"));
                continue;
            }
        };
        if cp.seq != s.seq
            || cp.size != s.tree_size
            || hex(&cp.root) != s.root
            || cp.origin() != m.origin
        {
            r.problems.push(format!(
                "{name}: does not match the segment the signed manifest names (segment {}, \
                 size {}, origin {})",
                s.seq, s.tree_size, m.origin
            ));
            continue;
        }
        if s.signed_at_export {
            r.signed_at_export.push(s.seq);
        }
        r.segments.push(s.seq);
        roots.insert(s.seq, cp);
    }
    // The chain: each segment names the one before it.
    let seqs: Vec<u32> = roots.keys().copied().collect();
    for w in seqs.windows(2) {
        let (a, b) = (&roots[&w[0]], &roots[&w[1]]);
        if b.prev_seq != a.seq || b.prev_root != a.root {
            r.problems.push(format!(
                "{}: names segment {} as the previous one, but the bundle's previous segment is \
                 {} with another root: a segment between them is missing or was replaced",
                checkpoint_entry(b.seq),
                b.prev_seq,
                a.seq
            ));
        }
    }

    // Records and events, each proven up to its checkpoint.
    let proofs = files.get(PROOFS).unwrap_or_default();
    let mut rows: Vec<(u32, Binding)> = Vec::new();
    let mut leaves = Vec::new();
    let mut events: Vec<CoverageEvent> = Vec::new();
    let mut events_seen = BTreeSet::new();
    let mut record_no = 0u64;
    for (line_no, line) in proofs.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let at = format!("{PROOFS} line {}", line_no + 1);
        let p: ProofLine = match serde_json::from_slice(line) {
            Ok(p) => p,
            Err(e) => {
                r.problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let what = match (&p.record, &p.events) {
            (Some(_), None) => {
                record_no += 1;
                format!(
                    "record {record_no} ({at}, segment {}, leaf {})",
                    p.segment, p.leaf_index
                )
            }
            (None, Some(_)) => format!("events of segment {} ({at})", p.segment),
            _ => {
                r.problems
                    .push(format!("{at}: neither one record nor one segment's events"));
                continue;
            }
        };
        let data = p.record.as_deref().or(p.events.as_deref()).unwrap_or("");
        let Some(bytes) = unhex(data) else {
            r.problems.push(format!("{what}: not lowercase hex"));
            continue;
        };
        let leaf = if p.record.is_some() {
            merkle::leaf_hash(&bytes)
        } else {
            record::events_leaf_of_records(&bytes)
        };
        if p.record.is_some() {
            leaves.push(hex(&leaf));
        }
        let Some(cp) = roots.get(&p.segment) else {
            r.problems.push(format!(
                "{what}: no verified checkpoint of segment {} in the bundle",
                p.segment
            ));
            continue;
        };
        let path: Option<Vec<Hash>> = p
            .path
            .iter()
            .map(|h| unhex(h).and_then(|b| <Hash>::try_from(b).ok()))
            .collect();
        let Some(path) = path else {
            r.problems.push(format!(
                "{what}: inclusion proof: a hash is not 32 bytes of hex"
            ));
            continue;
        };
        if p.tree_size != cp.size
            || !merkle::verify_inclusion(&leaf, p.leaf_index, cp.size, &path, &cp.root)
        {
            r.problems.push(format!(
                "{what}: inclusion proof does not lead to the root signed in {}",
                checkpoint_entry(p.segment)
            ));
            continue;
        }
        if p.record.is_some() {
            match record::decode(&bytes) {
                Ok(row) => {
                    if p.leaf_index + 1 >= cp.size {
                        r.problems.push(format!(
                            "{what}: the last leaf of a segment holds its events"
                        ));
                        continue;
                    }
                    r.records_verified += 1;
                    rows.push((p.segment, row.binding));
                }
                Err(e) => r.problems.push(format!("{what}: {e}")),
            }
        } else {
            if p.leaf_index + 1 != cp.size {
                r.problems
                    .push(format!("{what}: events are the last leaf of a segment"));
                continue;
            }
            events_seen.insert(p.segment);
            let mut not_events = 0;
            let mut errors = Vec::new();
            segment::decode_records(
                &bytes,
                |rec| match rec {
                    Record::Event(e) => events.push(e),
                    _ => not_events += 1,
                },
                |e| errors.push(e.to_string()),
            );
            if not_events > 0 {
                errors.push(format!("{not_events} records that are not events"));
            }
            if let Some(e) = errors.first() {
                r.problems.push(format!("{what}: {e}"));
            }
        }
    }
    if leaves.len() as u64 != m.records {
        r.problems.push(format!(
            "{PROOFS} holds {} records, the signed manifest counts {}",
            leaves.len(),
            m.records
        ));
    }
    if leaves != m.record_leaves {
        if leaves.len() == m.record_leaves.len() {
            let i = leaves
                .iter()
                .zip(&m.record_leaves)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            r.problems.push(format!(
                "record {}: differs from the record the signed manifest lists",
                i + 1
            ));
        } else {
            r.problems.push(format!(
                "{PROOFS} holds {} records, the signed manifest lists {}: records were added or \
                 removed",
                leaves.len(),
                m.record_leaves.len()
            ));
        }
    }
    for seq in &r.segments {
        if !events_seen.contains(seq) {
            r.problems
                .push(format!("segment {seq}: its events (coverage) are missing"));
        }
    }

    // What the readable files say is what the signed records say, and matches the question.
    let merged = merge_rows(&rows);
    r.bindings = merged.len() as u64;
    if merged.len() as u64 != m.bindings {
        r.problems.push(format!(
            "the records make {} bindings, the signed manifest says {}",
            merged.len(),
            m.bindings
        ));
    }
    let (csv, jsonl) = render_records(&merged);
    for (name, want) in [(RECORDS_CSV, csv), (RECORDS_JSONL, jsonl)] {
        if files.get(name).is_some_and(|got| got != want.as_slice()) {
            r.problems
                .push(format!("{name}: does not say what the signed records say"));
        }
    }
    match m.search.to_search() {
        None => r
            .problems
            .push(format!("{MANIFEST}: the question's addresses do not parse")),
        Some(q) => {
            for b in &merged {
                if !(q.matches_address(b) && q.overlaps(b)) {
                    r.problems.push(format!(
                        "binding {} does not match the question: it should not have been \
                         disclosed",
                        b.id
                    ));
                }
            }
            events.sort_by_key(CoverageEvent::t_ns);
            let end = roots
                .values()
                .map(|c| c.window_end_ns)
                .max()
                .unwrap_or(q.to_ns);
            r.coverage_warning =
                Coverage::compute(&events, false, end, q.from_ns, q.to_ns).warning();
        }
    }
    if !merged.is_empty() {
        let lo = merged.iter().map(|b| b.start_ns).min();
        let hi = if merged.iter().any(|b| b.end_ns.is_none()) {
            None
        } else {
            merged.iter().filter_map(|b| b.end_ns).max()
        };
        r.span_ns = lo.map(|lo| (lo, hi));
    }
    r
}

fn checkpoint_entry(seq: u32) -> String {
    format!(
        "{CHECKPOINTS_DIR}{}",
        checkpoint::checkpoint_path(std::path::Path::new(""), seq).display()
    )
}

/// Prints the report for people.
pub fn write_report(out: &mut dyn Write, bundle: &str, r: &BundleReport) -> std::io::Result<()> {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    writeln!(out, "bundle:      {bundle}")?;
    writeln!(out, "case:        {}", or(&r.case))?;
    if let Some(reason) = &r.reason {
        writeln!(out, "reason:      {reason}")?;
    }
    writeln!(out, "question:    nattrace query {}", or(&r.query))?;
    writeln!(
        out,
        "exported:    {} by {}",
        or(&r.exported_at),
        or(&r.exported_by)
    )?;
    writeln!(out, "producer:    {}", or(&r.producer))?;
    let segs = match (r.segments.first(), r.segments.last()) {
        (Some(a), Some(b)) if a != b => {
            format!("{} (segments {a} to {b}, chained)", r.segments.len())
        }
        (Some(a), _) => format!("1 (segment {a})"),
        _ => "0".to_owned(),
    };
    writeln!(out, "checkpoints: {segs}, signed by the producer")?;
    if !r.signed_at_export.is_empty() {
        writeln!(
            out,
            "             signed at export, not at seal: segments {:?}",
            r.signed_at_export
        )?;
    }
    for (name, status) in &r.cosignatures {
        writeln!(out, "cosigned:    {name}: {status}")?;
    }
    writeln!(
        out,
        "records:     {} verified by inclusion proof, {} binding{}",
        r.records_verified,
        r.bindings,
        if r.bindings == 1 { "" } else { "s" }
    )?;
    if let Some((lo, hi)) = r.span_ns {
        writeln!(
            out,
            "time span:   {} to {}",
            format_time(lo),
            hi.map_or_else(|| "open".to_owned(), format_time)
        )?;
    }
    writeln!(
        out,
        "coverage:    {}",
        r.coverage_warning
            .as_deref()
            .unwrap_or("the window was recorded completely, without loss")
    )?;
    if r.is_verified() {
        writeln!(out, "result:      VERIFIED")?;
    } else {
        for p in &r.problems {
            writeln!(out, "problem:     {p}")?;
        }
        writeln!(
            out,
            "result:      FAILED ({} problem{})",
            r.problems.len(),
            if r.problems.len() == 1 { "" } else { "s" }
        )?;
    }
    Ok(())
}
