//! Arbitrary bytes as an evidence bundle, through what `nattrace verify BUNDLE --key PUBKEY`
//! does with it: `evidence::check::verify_bundle` with the producer key of the seeds
//! (`nattrace_fuzz::TEST_SIGNER_KEY`), then the report printed as text and as JSON. Nothing
//! may panic, and a report without problems must hold up (see [`oracle`]).
//!
//! The same input is verified twice:
//! - as it is: the bytes an investigator would be handed;
//! - as a producer holding the key would make it of whatever it says: its files (the input
//!   read as a tar archive, or else in the files form of `nattrace_fuzz::parse_files_form`)
//!   with every proof, root, chain link, record list and file hash recomputed and every note
//!   signed again (see [`as_signed`]). A fuzzer cannot forge a signature nor a Merkle proof,
//!   so without this its mutations would stop at the first check; with it they reach the
//!   checks behind (records, merging, the question, coverage), and a bundle that verifies
//!   then says only what its signed manifest and its records say.
//!
//! Seeds: those `make_seeds` writes (real bundles from the export code, as archives and in
//! the files form), checked-in copies of them in fuzz/seeds/bundle_verify/, and there too
//! the inputs that once failed (`regress-*`).

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nattrace_fuzz::{FILES_FORM_MTIME, parse_files_form, test_signer};
use tracer_user::evidence::check::{BundleReport, verify_bundle, write_report};
use tracer_user::evidence::{
    CHECKPOINTS_DIR, Files, MANIFEST, Manifest, PROOFS, ProofLine, hex, merge_rows, sha256_hex,
    unhex,
};
use tracer_user::signing::{self, Note, SignerKey, VerifierKey};
use tracer_user::storage::checkpoint::Checkpoint;
use tracer_user::storage::merkle::{self, Hash};
use tracer_user::storage::record;

fn signer() -> &'static SignerKey {
    static KEY: OnceLock<SignerKey> = OnceLock::new();
    KEY.get_or_init(test_signer)
}

fn verifier() -> &'static VerifierKey {
    static KEY: OnceLock<VerifierKey> = OnceLock::new();
    KEY.get_or_init(|| signer().verifier())
}

fuzz_target!(|data: &[u8]| {
    verify(data);
    if let Some(bundle) = as_signed(data) {
        verify(&bundle);
    }
});

/// `nattrace verify BUNDLE --key PUBKEY` (both report formats), and the oracle when the
/// bundle verified.
fn verify(bundle: &[u8]) {
    let report = verify_bundle(bundle, verifier(), &[]);
    write_report(&mut std::io::sink(), "bundle", &report).expect("a sink takes any report");
    serde_json::to_writer(std::io::sink(), &report).expect("a report serialises");
    if report.is_verified() {
        oracle(bundle, &report);
    }
}

/// What a verified report implies, checked independently of the checker's own bookkeeping
/// (cheaply: no signature or proof is checked again).
fn oracle(bundle: &[u8], report: &BundleReport) {
    // The archive is canonical: the bytes are exactly what the export code writes of its
    // files.
    let (files, mtime) =
        Files::read_tar_with_mtime(bundle).expect("a verified bundle is a readable archive");
    let mut again = Vec::new();
    files
        .write_tar(&mut again, mtime)
        .expect("writes to memory");
    assert!(
        again == bundle,
        "a verified bundle is not in canonical form"
    );

    let manifest = files
        .get(MANIFEST)
        .expect("a verified bundle has a manifest");
    let note = Note::parse(std::str::from_utf8(manifest).expect("a verified manifest is text"))
        .expect("a verified manifest is a note");
    let m: Manifest = serde_json::from_str(&note.text).expect("a verified manifest parses");

    // Every record line was proven, and the signed manifest counts them all.
    let mut rows = Vec::new();
    for line in files.get(PROOFS).unwrap_or_default().split(|&c| c == b'\n') {
        if line.is_empty() {
            continue;
        }
        let p: ProofLine = serde_json::from_slice(line).expect("a verified proof line parses");
        if let Some(r) = &p.record {
            let bytes = unhex(r).expect("a verified record is hex");
            let row = record::decode(&bytes).expect("a verified record decodes");
            rows.push((p.segment, row.binding));
        }
    }
    let lines = rows.len() as u64;
    assert_eq!(
        report.records_verified, lines,
        "records verified vs record lines in {PROOFS}"
    );
    assert_eq!(
        m.records, lines,
        "the signed manifest's record count vs the record lines in {PROOFS} of a verified \
         bundle"
    );

    // Every binding disclosed answers the signed question.
    let merged = merge_rows(&rows);
    assert_eq!(report.bindings, merged.len() as u64, "bindings");
    assert_eq!(
        m.bindings,
        merged.len() as u64,
        "the signed manifest's bindings"
    );
    let q = m
        .search
        .to_search()
        .expect("a verified manifest's question parses");
    for b in &merged {
        assert!(
            q.matches_address(b) && q.overlaps(b),
            "binding {} of a verified bundle does not answer the signed question {:?}: {b:?}",
            b.id,
            m.search
        );
    }
}

/// The files of `data` as a producer holding the test key would sign them: `None` when the
/// input is neither an archive nor in the files form, or has no manifest to sign.
///
/// Of each segment's parsed proof lines a tree is built anew (its record lines' leaves in
/// order, then its events line's), every line given its index, the tree's size and its
/// audit path; the segment's checkpoint gets that size and root, the next checkpoint's
/// previous root follows, and each is signed again (beside the signatures by other names).
/// The manifest gets the segments' sizes and roots, the record leaves and the files' hashes,
/// and is signed. Everything else (the question, the counts, lines that do not parse, the
/// readable records, the checkpoints' other lines) is left as the input says.
fn as_signed(data: &[u8]) -> Option<Vec<u8>> {
    let (mut files, mtime) = match Files::read_tar_with_mtime(data) {
        Ok(f) => f,
        Err(_) => (parse_files_form(data)?, FILES_FORM_MTIME),
    };
    let mut m: Manifest = serde_json::from_str(&note_text(files.get(MANIFEST)?)).ok()?;

    // Proofs: one tree per segment.
    let proofs = files.get(PROOFS).unwrap_or_default().to_vec();
    let mut lines: Vec<Result<ProofLine, &[u8]>> = Vec::new();
    let mut leaves: BTreeMap<u32, (Vec<Hash>, Vec<Hash>)> = BTreeMap::new();
    for line in proofs.split_inclusive(|&c| c == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let parsed = serde_json::from_slice::<ProofLine>(text)
            .ok()
            .and_then(|p| {
                let leaf = match (&p.record, &p.events) {
                    (Some(r), None) => (true, merkle::leaf_hash(&unhex(r)?)),
                    (None, Some(e)) => (false, record::events_leaf_of_records(&unhex(e)?)),
                    _ => return None,
                };
                let tree = leaves.entry(p.segment).or_default();
                if leaf.0 { &mut tree.0 } else { &mut tree.1 }.push(leaf.1);
                Some(p)
            });
        lines.push(parsed.ok_or(line));
    }
    // Record lines take the first leaves of their segment's tree, events lines the last.
    let mut next: BTreeMap<u32, u64> = leaves.iter().map(|(&seq, _)| (seq, 0)).collect();
    let mut next_event: BTreeMap<u32, u64> = leaves
        .iter()
        .map(|(&seq, (records, _))| (seq, records.len() as u64))
        .collect();
    let trees: BTreeMap<u32, Vec<Hash>> = leaves
        .into_iter()
        .map(|(seq, (mut records, events))| {
            records.extend(events);
            (seq, records)
        })
        .collect();
    let mut record_leaves = Vec::new();
    let mut proofs = Vec::with_capacity(proofs.len());
    for line in &lines {
        let p = match line {
            Ok(p) => p,
            Err(raw) => {
                proofs.extend_from_slice(raw);
                continue;
            }
        };
        let tree = &trees[&p.segment];
        let counter = if p.record.is_some() {
            &mut next
        } else {
            &mut next_event
        };
        let i = counter
            .get_mut(&p.segment)
            .expect("every parsed line's segment has a tree");
        let index = *i;
        *i += 1;
        let leaf = tree[index as usize];
        if p.record.is_some() {
            record_leaves.push(hex(&leaf));
        }
        let size = tree.len() as u64;
        let path = merkle::inclusion_path(index, size, &mut |lo, hi| {
            Ok::<_, ()>(merkle::root(&tree[lo as usize..hi as usize]))
        })
        .ok()?;
        let line = ProofLine {
            leaf_index: index,
            tree_size: size,
            path: path.iter().map(|h| hex(h)).collect(),
            ..p.clone()
        };
        serde_json::to_writer(&mut proofs, &line).ok()?;
        proofs.push(b'\n');
    }
    set(&mut files, PROOFS, proofs);

    // Checkpoints: the new roots, chained, signed again.
    let mut checkpoints: BTreeMap<u32, (String, Note, Option<Checkpoint>)> = BTreeMap::new();
    for s in &m.segments {
        let name = checkpoint_entry(s.seq);
        let Some(data) = files.get(&name) else {
            continue;
        };
        let text = String::from_utf8_lossy(data);
        let note = Note::parse(&text).unwrap_or_else(|_| Note {
            text: text.into_owned(),
            signatures: Vec::new(),
        });
        let mut cp = Checkpoint::parse_body(&note.text).ok();
        if let (Some(cp), Some(tree)) = (&mut cp, trees.get(&s.seq)) {
            cp.size = tree.len() as u64;
            cp.root = merkle::root(tree);
        }
        checkpoints.insert(s.seq, (name, note, cp));
    }
    let roots: BTreeMap<u32, Hash> = checkpoints
        .iter()
        .filter_map(|(&seq, (_, _, cp))| Some((seq, cp.as_ref()?.root)))
        .collect();
    for (seq, (name, mut note, cp)) in checkpoints {
        if let Some(mut cp) = cp {
            if let Some(prev) = roots.get(&cp.prev_seq) {
                cp.prev_root = *prev;
            }
            for s in m.segments.iter_mut().filter(|s| s.seq == seq) {
                s.tree_size = cp.size;
                s.root = hex(&cp.root);
            }
            note.text = cp.body();
        }
        if note.add_signature(signer()).is_ok() {
            set(&mut files, &name, note.encode().into_bytes());
        }
    }

    // The manifest: what the files now are, signed.
    m.record_leaves = record_leaves;
    let pinned: Vec<String> = m.segments.iter().map(|s| checkpoint_entry(s.seq)).collect();
    m.files = files
        .entries
        .iter()
        .filter(|(n, _)| n != MANIFEST && !pinned.contains(n))
        .map(|(n, d)| (n.clone(), sha256_hex(d)))
        .collect();
    let text = format!("{}\n", serde_json::to_string_pretty(&m).ok()?);
    let note = signing::sign(&text, signer()).ok()?;
    set(&mut files, MANIFEST, note.encode().into_bytes());

    let mut out = Vec::new();
    files.write_tar(&mut out, mtime).ok()?;
    Some(out)
}

/// The text of a note, or the whole of `data` when it is not one (a manifest without its
/// signatures, say).
fn note_text(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    Note::parse(&text).map_or_else(|_| text.into_owned(), |n| n.text)
}

/// Replaces the contents of `name`.
fn set(files: &mut Files, name: &str, data: Vec<u8>) {
    if let Some(e) = files.entries.iter_mut().find(|(n, _)| n == name) {
        e.1 = data;
    }
}

/// The name of segment `seq`'s checkpoint in a bundle (as `evidence::export` names it).
fn checkpoint_entry(seq: u32) -> String {
    format!(
        "{CHECKPOINTS_DIR}{}",
        tracer_user::storage::checkpoint::checkpoint_path(std::path::Path::new(""), seq).display()
    )
}
