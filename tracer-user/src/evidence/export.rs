//! `nattrace export`: the answer to one question, for one case, as an evidence bundle.
//!
//! The question is answered exactly as `nattrace query` answers it. Then every sealed row
//! of each answering binding is located (a binding open when its segment was sealed has a
//! row in each later segment it was carried into), proven up to its segment's root, and
//! written with the checkpoints of those segments and of every segment whose window
//! overlaps the question's, for the coverage. Only matching bindings' rows are disclosed:
//! the proofs carry hashes of the other records, never the records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{
    BUNDLE_FORMAT, CHECKPOINTS_DIR, Files, GUIDE, MANIFEST, Manifest, PRODUCER_KEY, PROOFS,
    ProofLine, RECORDS_CSV, RECORDS_JSONL, SearchSpec, SegmentRef, guide, hex, merge_rows,
    render_records, sha256_hex,
};
use crate::binding::Binding;
use crate::config;
use crate::coverage::Coverage;
use crate::exit::{Status, UserError};
use crate::query::{self, Query, Question};
use crate::signing::{self, SignerKey};
use crate::storage::checkpoint::{self, Checkpoint};
use crate::storage::columnar::{self, FileReader, SealedSegment};
use crate::storage::prove::Prover;
use crate::storage::retention::list_segment_files;
use crate::storage::{self, SEGMENTS_DIR, record};

/// `nattrace export`: one case's answer as a signed, self-contained evidence bundle.
#[derive(Clone, Debug, clap::Args)]
pub struct ExportArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The case (authorisation) this export is made for; recorded in the bundle and the
    /// audit log.
    #[arg(long, value_name = "ID")]
    pub case: String,
    /// The bundle file to write (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Why a window longer than the data directory's max_window is needed.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// The producer's private key [default: sign_key of DIR/nattrace.toml].
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
    /// The question, as `nattrace query` takes it.
    #[command(flatten)]
    pub question: Question,
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    /// The bundle.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// The manifest.
    pub manifest: Manifest,
}

/// Runs `nattrace export`.
pub fn run(args: &ExportArgs) -> anyhow::Result<Status> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    execute(
        args,
        query::now_ns(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    )
}

/// [`run`] at time `now` with the output streams given.
pub fn execute(
    args: &ExportArgs,
    now: i64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let e = export(args, now, err)?;
    writeln!(
        out,
        "wrote {} ({} bytes, sha256 {}): case {}, {} binding{}, {} signed record{}, {} segment{}",
        e.path.display(),
        e.bytes,
        e.sha256,
        e.manifest.case,
        e.manifest.bindings,
        plural(e.manifest.bindings),
        e.manifest.records,
        plural(e.manifest.records),
        e.manifest.segments.len(),
        plural(e.manifest.segments.len() as u64),
    )?;
    out.flush()?;
    Ok(if e.manifest.bindings == 0 {
        Status::NoResults
    } else {
        Status::Ok
    })
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Writes the bundle; returns what it holds.
pub fn export(args: &ExportArgs, now: i64, err: &mut dyn Write) -> anyhow::Result<Exported> {
    if args.case.trim().is_empty() {
        return Err(UserError::bad_input("--case: give the case id this export is for").into());
    }
    let dir = &args.data_dir;
    let cfg = crate::proportionality::load_config(dir)?;
    let query = Query::from_question(&args.question)?;
    let q = query.search;
    crate::proportionality::check(
        &cfg,
        Some(&args.case),
        args.reason.as_deref(),
        q.to_ns.saturating_sub(q.from_ns),
    )?;
    let key_path = args
        .sign_key
        .clone()
        .or_else(|| cfg.sign_key.clone())
        .ok_or_else(|| {
            UserError::bad_input(format!(
                "export signs its manifest with the producer's key: set sign_key in {} or give \
                 --sign-key (make one with nattrace keygen)",
                dir.join(config::CONFIG_FILE).display()
            ))
        })?;
    let signer = SignerKey::load(&key_path)
        .map_err(|e| UserError::environment(format!("{}: {e}", key_path.display())))?;
    if args.out.exists() {
        return Err(UserError::bad_input(format!(
            "--out: {} exists; a bundle is never overwritten",
            args.out.display()
        ))
        .into());
    }

    // The answer, exactly as `nattrace query` gives it.
    let snap = storage::search(dir, &q).map_err(|e| crate::verify::dir_error(dir, e))?;
    if !snap.problems.is_empty() {
        query::report_problems(err, &snap.problems)?;
        return Err(UserError::partial(format!(
            "{} problem{} reading the data directory: an export must be complete, so none was \
             written (nattrace verify --data-dir {} lists them)",
            snap.problems.len(),
            plural(snap.problems.len() as u64),
            dir.display()
        ))
        .into());
    }
    let found = query.select(&snap.bindings, now);
    let coverage_warning =
        Coverage::compute(&snap.events, snap.agent_running, now, q.from_ns, q.to_ns).warning();

    // Every sealed row of the answer, and the segments that bear on the window.
    let located = locate(dir, &found, (q.from_ns, q.to_ns))?;
    let merged = merge_rows(
        &located
            .rows
            .iter()
            .map(|r| (r.seq, r.binding.clone()))
            .collect::<Vec<_>>(),
    );
    if merged != found {
        let sealed: BTreeSet<(u64, Option<i64>)> =
            merged.iter().map(|b| (b.id, b.end_ns)).collect();
        let missing: Vec<String> = found
            .iter()
            .filter(|b| !sealed.contains(&(b.id, b.end_ns)))
            .map(|b| b.id.to_string())
            .collect();
        return Err(UserError::partial(format!(
            "{} of the {} matching bindings (ids {}) are not yet in a sealed segment, or only in \
             one of a format older than version 2: their records cannot be proven. The agent \
             seals its log hourly and when it stops; export again after that",
            missing.len(),
            found.len(),
            missing.join(", ")
        ))
        .into());
    }

    // Proofs, per segment.
    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut proof_lines = Vec::new();
    let mut record_leaves = Vec::new();
    let mut segments = Vec::new();
    let mut checkpoints = Vec::new();
    let mut writer_id = None;
    for (&seq, path) in &located.segments {
        let reader = open_reader(path)?;
        let seg = SealedSegment::open(&reader)
            .map_err(|(at, e)| anyhow::anyhow!("{}: offset {at}: {e}", path.display()))?;
        writer_id.get_or_insert(seg.header.writer_id);
        let mut prover =
            Prover::new(&seg, &reader).with_context(|| format!("segment {}", path.display()))?;
        for r in located.rows.iter().filter(|r| r.seq == seq) {
            let proof = prover
                .prove(r.leaf_index)
                .with_context(|| format!("segment {}", path.display()))?;
            let enc = record::encode(&columnar::Row {
                binding: r.binding.clone(),
                carried: r.carried,
            });
            record_leaves.push(hex(&storage::merkle::leaf_hash(&enc)));
            proof_lines.push(ProofLine {
                segment: seq,
                leaf_index: proof.index,
                tree_size: proof.tree_size,
                record: Some(hex(&enc)),
                events: None,
                path: proof.path.iter().map(|h| hex(h)).collect(),
            });
        }
        let events = seg
            .events(&reader)
            .map_err(|(at, e)| anyhow::anyhow!("{}: offset {at}: {e}", path.display()))?;
        let events_proof = prover
            .prove(seg.summary.rows)
            .with_context(|| format!("segment {}", path.display()))?;
        proof_lines.push(ProofLine {
            segment: seq,
            leaf_index: events_proof.index,
            tree_size: events_proof.tree_size,
            record: None,
            events: Some(hex(&record::events_data(&events)[1..])),
            path: events_proof.path.iter().map(|h| hex(h)).collect(),
        });
        let body = Checkpoint::of_segment(&seg).body();
        let verifier = signer.verifier();
        let (note, signed_at_export) = match checkpoint::read_checkpoint(&seg_dir, seq)? {
            Some(note) if note.text == body && note.verify(&verifier).is_ok() => (note, false),
            Some(mut note) if note.text == body => {
                // Signed by another key (an earlier host key, say): the bundle is verified
                // with this one, which signs it now, beside the others.
                note.add_signature(&signer)?;
                checkpoint::write_checkpoint(&seg_dir, seq, &note)?;
                (note, true)
            }
            Some(_) => {
                return Err(UserError::partial(format!(
                    "{}: the stored checkpoint does not describe segment {seq} (run nattrace \
                     verify --data-dir {})",
                    checkpoint::checkpoint_path(&seg_dir, seq).display(),
                    dir.display()
                ))
                .into());
            }
            None => {
                // Sealed before a key was configured: sign it now, and keep it.
                let note = signing::sign(&body, &signer)?;
                checkpoint::write_checkpoint(&seg_dir, seq, &note)?;
                (note, true)
            }
        };
        segments.push(SegmentRef {
            seq,
            tree_size: seg.summary.rows + 1,
            root: hex(&seg.summary.root),
            signed_at_export,
        });
        checkpoints.push((seq, note));
    }

    let (csv, jsonl) = render_records(&merged);
    let producer_key = format!("{}\n", signer.verifier().to_text());
    let mut proofs = Vec::new();
    for line in &proof_lines {
        serde_json::to_writer(&mut proofs, line)?;
        proofs.push(b'\n');
    }
    let exported_at = crate::output::format_time(now);
    let mut manifest = Manifest {
        bundle_format: BUNDLE_FORMAT,
        case: args.case.clone(),
        reason: args.reason.clone(),
        query: query.describe(),
        search: SearchSpec::of(&q),
        exported_at,
        // SAFETY: getuid has no preconditions and cannot fail.
        exported_by: crate::audit::user_name(unsafe { libc::getuid() }),
        producer: signer.name().to_owned(),
        origin: writer_id.map_or_else(String::new, |w| Checkpoint::origin_of(&w)),
        segments,
        records: record_leaves.len() as u64,
        record_leaves,
        bindings: merged.len() as u64,
        coverage_warning,
        files: BTreeMap::new(),
    };
    let guide_text = guide(&manifest);
    let mut files = Files::default();
    for (name, data) in [
        (GUIDE, guide_text.into_bytes()),
        (PRODUCER_KEY, producer_key.into_bytes()),
        (PROOFS, proofs),
        (RECORDS_CSV, csv),
        (RECORDS_JSONL, jsonl),
    ] {
        manifest.files.insert(name.to_owned(), sha256_hex(&data));
        files.entries.push((name.to_owned(), data));
    }
    let manifest_text = format!("{}\n", serde_json::to_string_pretty(&manifest)?);
    let manifest_note = signing::sign(&manifest_text, &signer)?;
    files.entries.insert(
        0,
        (MANIFEST.to_owned(), manifest_note.encode().into_bytes()),
    );
    for (seq, note) in &checkpoints {
        files.entries.push((
            format!("{CHECKPOINTS_DIR}{}", storage_name(*seq)),
            note.encode().into_bytes(),
        ));
    }

    // Write beside the destination, audit, then make it appear.
    let mut bytes = Vec::new();
    files.write_tar(&mut bytes, (now / 1_000_000_000).max(0) as u64)?;
    let sha256 = sha256_hex(&bytes);
    let tmp = tmp_path(&args.out);
    write_new(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let mut entry = crate::audit::NewEntry::now("export", manifest.query.clone());
    entry.case = Some(args.case.clone());
    entry.reason.clone_from(&args.reason);
    entry.results = merged.len() as u64;
    entry.bundle_sha256 = Some(sha256.clone());
    let audited = crate::proportionality::record(dir, &cfg, entry, err);
    if let Err(e) = audited {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &args.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), args.out.display()))?;
    Ok(Exported {
        path: args.out.clone(),
        bytes: bytes.len() as u64,
        sha256,
        manifest,
    })
}

fn storage_name(seq: u32) -> String {
    checkpoint::checkpoint_path(Path::new(""), seq)
        .to_string_lossy()
        .into_owned()
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    out.with_file_name(name)
}

fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn open_reader(path: &Path) -> anyhow::Result<FileReader> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    FileReader::new(file).with_context(|| format!("reading {}", path.display()))
}

/// A sealed row of an answering binding.
#[derive(Clone, Debug)]
struct LocatedRow {
    seq: u32,
    leaf_index: u64,
    binding: Binding,
    carried: bool,
}

/// The located rows (by segment, then leaf index) and the segments the bundle names.
struct Located {
    rows: Vec<LocatedRow>,
    segments: BTreeMap<u32, PathBuf>,
}

/// Finds every row of `found` in the sealed version-2 segments, and the segments whose
/// window overlaps `window` or that hold such a row (with those in between, so that the
/// bundle's chain has no holes).
fn locate(dir: &Path, found: &[Binding], window: (i64, i64)) -> anyhow::Result<Located> {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let wanted: HashMap<u64, &Binding> = found.iter().map(|b| (b.id, b)).collect();
    let mut rows = Vec::new();
    let mut involved: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut all: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for (seq, sealed, path) in list_segment_files(&seg_dir)? {
        if !sealed || !is_columnar(&path) {
            continue;
        }
        let reader = open_reader(&path)?;
        let seg = SealedSegment::open(&reader)
            .map_err(|(at, e)| anyhow::anyhow!("{}: offset {at}: {e}", path.display()))?;
        if seg.version < 2 {
            // Its records and events cannot be proven one by one: an answer found only there
            // makes the export fail below (the answer and the proven rows differ); its
            // coverage is in the manifest's warning, computed from every segment.
            continue;
        }
        all.insert(seq, path.clone());
        let s = seg.summary;
        if s.window_start_ns <= window.1 && window.0 <= s.window_end_ns {
            involved.insert(seq, path.clone());
        }
        // A row answers for [start, end] clipped to the segment's window
        // (`columnar::answer_interval`); a row carried in with an end earlier than the
        // window's start answers for that start alone.
        let answer_hi = |b: &Binding| b.end_ns.map_or(i64::MAX, |e| e.max(s.window_start_ns));
        if !found
            .iter()
            .any(|b| s.rows > 0 && s.t_lo_ns <= answer_hi(b) && b.start_ns <= s.t_hi_ns)
        {
            continue;
        }
        let mut prover = Prover::new(&seg, &reader)?;
        let fences = prover.fences().to_vec();
        for (i, fence) in fences.iter().enumerate() {
            let may_hold = found.iter().any(|b| {
                fence.may_hold_key(b.external()) && fence.overlaps(b.start_ns, answer_hi(b))
            });
            if !may_hold {
                continue;
            }
            for (j, row) in prover.rows(i)?.into_iter().enumerate() {
                let Some(b) = wanted.get(&row.binding.id) else {
                    continue;
                };
                if b.external() != row.binding.external() {
                    continue;
                }
                involved.insert(seq, path.clone());
                rows.push(LocatedRow {
                    seq,
                    leaf_index: prover.leaf_index(i, j),
                    binding: row.binding,
                    carried: row.carried,
                });
            }
        }
    }
    // Fill the holes between the first and the last segment named.
    if let (Some(&lo), Some(&hi)) = (involved.keys().next(), involved.keys().next_back()) {
        for (seq, path) in all.range(lo..=hi) {
            involved.entry(*seq).or_insert_with(|| path.clone());
        }
    }
    rows.sort_by_key(|r| (r.seq, r.leaf_index));
    Ok(Located {
        rows,
        segments: involved,
    })
}

fn is_columnar(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 0))
        .is_ok_and(|()| magic == columnar::MAGIC)
}
