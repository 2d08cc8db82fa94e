//! The `verify` subcommand: a complete integrity check of a data directory.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::evidence::check;
use crate::exit::{Status, UserError};
use crate::output::ReportFormat;
use crate::signing::VerifierKey;
use crate::storage::StorageError;
use crate::storage::retention::hex;
use crate::storage::verify::{
    Link, SegmentKind, SegmentReport, SignatureReport, VerifyReport, check_signatures, seq_name,
    short_hex, verify_dir,
};

/// `nattrace verify`: checks a data directory (every segment, the hash chain, the retention
/// ledger, and with `--key` every checkpoint's signature), or an evidence bundle offline.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// An evidence bundle written by `nattrace export`, to verify offline with --key.
    #[arg(value_name = "BUNDLE", required_unless_present = "data_dir")]
    pub bundle: Option<PathBuf>,
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The producer's public key (nattrace.pub). Required for a bundle; for a data directory,
    /// every sealed segment must then have a checkpoint signed by it.
    #[arg(long, value_name = "PUBKEY", required_unless_present = "data_dir")]
    pub key: Option<PathBuf>,
    /// A witness's public key: second signatures by it are verified too (repeatable).
    #[arg(long, value_name = "PUBKEY")]
    pub witness: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Runs `nattrace verify`: exit status 0 when everything is intact, 3 when any problem was
/// found, 4 when the data directory is missing or unreadable, 2 for an unusable key.
pub fn run(args: &VerifyArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    crate::query::ignore_broken_pipe(execute(args, &mut stdout.lock()))
}

fn load_key(path: &Path) -> anyhow::Result<VerifierKey> {
    VerifierKey::load(path).map_err(|e| UserError::bad_input(format!("--key: {e}")).into())
}

/// [`run`] with the output stream given.
pub fn execute(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<Status> {
    let key = args.key.as_deref().map(load_key).transpose()?;
    if let Some(bundle) = &args.bundle {
        let key = key.ok_or_else(|| {
            UserError::bad_input("--key: give the producer's public key to verify a bundle")
        })?;
        let witnesses = args
            .witness
            .iter()
            .map(|p| load_key(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bytes = std::fs::read(bundle).map_err(|e| {
            UserError::environment(format!("cannot read {}: {e}", bundle.display()))
        })?;
        let report = check::verify_bundle(&bytes, &key, &witnesses);
        match args.format {
            ReportFormat::Table => {
                check::write_report(out, &bundle.display().to_string(), &report)?
            }
            ReportFormat::Json => {
                serde_json::to_writer(&mut *out, &report)?;
                out.write_all(b"\n")?;
            }
        }
        out.flush()?;
        return Ok(if report.is_verified() {
            Status::Ok
        } else {
            Status::Partial
        });
    }
    let dir = args
        .data_dir
        .as_deref()
        .ok_or_else(|| UserError::bad_input("give --data-dir DIR or a BUNDLE"))?;
    let mut report = verify_dir(dir).map_err(|e| dir_error(dir, e))?;
    check_signatures(dir, key.as_ref(), &mut report);
    match args.format {
        ReportFormat::Table => write_text(out, &report)?,
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out, &JsonReport::of(&report))?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(if report.is_intact() {
        Status::Ok
    } else {
        Status::Partial
    })
}

/// A data directory that cannot be checked at all: exit status 4.
pub(crate) fn dir_error(dir: &Path, e: StorageError) -> anyhow::Error {
    match e {
        StorageError::NotFound { .. } => UserError::environment(format!(
            "--data-dir: '{}' does not exist or is not a directory",
            dir.display()
        ))
        .into(),
        StorageError::PermissionDenied { path } => UserError::environment(format!(
            "cannot read {}: permission denied; run as a member of the data dir's group or as root",
            path.display()
        ))
        .into(),
        e => anyhow::Error::new(e).context(format!("cannot read {}", dir.display())),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// What a segment line says after the status: rows, root, chain or kind.
fn describe(s: &SegmentReport) -> String {
    let mut parts = Vec::new();
    match s.rows_expected {
        Some(n) if n != s.rows => parts.push(format!("rows {} of {n} readable", s.rows)),
        _ if s.kind != SegmentKind::Unknown => parts.push(format!("rows {}", s.rows)),
        _ => {}
    }
    match s.kind {
        SegmentKind::Columnar => {
            if let Some(root) = &s.root {
                parts.push(format!("root {}", short_hex(root)));
            }
            match s.link {
                Some(Link::Start) => parts.push("starts the chain".to_owned()),
                Some(Link::Segment(p)) => parts.push(format!("chained to {}", seq_name(p))),
                Some(Link::Ledger(p)) => parts.push(format!(
                    "chained to {} (deleted, in the ledger)",
                    seq_name(p)
                )),
                Some(Link::Unchecked(p)) => {
                    parts.push(format!("names {} (damaged: link not checked)", seq_name(p)))
                }
                Some(Link::Missing(p)) => parts.push(format!("names {} (missing)", seq_name(p))),
                None => {}
            }
        }
        SegmentKind::Row => {
            parts.push("legacy row format: checksummed, not hashed or chained".to_owned());
        }
        SegmentKind::Log => {
            parts.push("unsealed (being written or awaiting recovery)".to_owned());
        }
        SegmentKind::Unknown => {}
    }
    parts.join("  ")
}

fn write_text(out: &mut dyn Write, report: &VerifyReport) -> io::Result<()> {
    let width = report
        .segments
        .iter()
        .map(|s| file_name(&s.path).len())
        .max()
        .unwrap_or(0);
    let mut listed = Vec::new();
    for s in &report.segments {
        let status = if s.problems == 0 { "ok" } else { "FAILED" };
        let name = file_name(&s.path);
        writeln!(out, "{name:<width$}  {status:<6}  {}", describe(s))?;
        for n in &s.notes {
            writeln!(out, "{}: note: {n}", s.path.display())?;
        }
        for p in report.problems.iter().filter(|p| p.path == s.path) {
            writeln!(
                out,
                "{}: offset {}: {}",
                p.path.display(),
                p.offset,
                p.cause
            )?;
        }
        listed.push(&s.path);
    }
    let l = &report.ledger;
    for n in &l.notes {
        writeln!(out, "{}: note: {n}", l.path.display())?;
    }
    for p in report
        .problems
        .iter()
        .filter(|p| !listed.contains(&&p.path))
    {
        writeln!(
            out,
            "{}: offset {}: {}",
            p.path.display(),
            p.offset,
            p.cause
        )?;
    }
    let ledger = match (l.present, l.seq_range) {
        (false, _) => "no retention ledger".to_owned(),
        (true, None) => "retention ledger empty".to_owned(),
        (true, Some((a, b))) => format!(
            "retention ledger: {} deleted segment{} ({} to {})",
            l.entries,
            plural(l.entries),
            seq_name(a),
            seq_name(b)
        ),
    };
    let sig = &report.signatures;
    let signed = sig.signed.len();
    match &sig.key {
        Some(_) => writeln!(
            out,
            "signatures: {signed} checkpoint{} verified with the key{}",
            plural(signed),
            cosigners(sig)
        )?,
        None if signed + sig.unsigned.len() == 0 => {}
        None if signed == 0 => writeln!(
            out,
            "signatures: segments are unsigned (no sign_key was configured when they were sealed)"
        )?,
        None => writeln!(
            out,
            "signatures: {signed} checkpoint{} not checked (give --key PUBKEY), {} segment{} unsigned{}",
            plural(signed),
            sig.unsigned.len(),
            plural(sig.unsigned.len()),
            cosigners(sig)
        )?,
    }
    let failed = report.segments.iter().filter(|s| s.problems > 0).count();
    let n = report.segments.len();
    if report.is_intact() {
        writeln!(out, "verify: {n} segment{} intact; {ledger}", plural(n))?;
    } else {
        writeln!(
            out,
            "verify: {} problem{} in {failed} of {n} segment{}{}; {ledger}",
            report.problems.len(),
            plural(report.problems.len()),
            plural(n),
            if l.problems > 0 {
                format!(" and {} in the ledger", l.problems)
            } else {
                String::new()
            }
        )?;
    }
    Ok(())
}

fn cosigners(sig: &SignatureReport) -> String {
    if sig.cosigners.is_empty() {
        String::new()
    } else {
        format!("; also signed by {}", sig.cosigners.join(", "))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `--format json`: one object.
#[derive(Debug, Serialize)]
struct JsonReport {
    intact: bool,
    segments: Vec<JsonSegment>,
    ledger: JsonLedger,
    problems: Vec<crate::storage::ReadProblem>,
}

#[derive(Debug, Serialize)]
struct JsonSegment {
    path: String,
    seq: u32,
    /// "columnar", "row", "log" or "unknown".
    kind: &'static str,
    ok: bool,
    rows: u64,
    rows_expected: Option<u64>,
    events: u64,
    root: Option<String>,
    writer_id: Option<String>,
    /// "start", "segment", "ledger", "unchecked", "missing".
    link: Option<&'static str>,
    prev_seq: Option<u32>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct JsonLedger {
    path: String,
    present: bool,
    entries: usize,
    first_seq: Option<u32>,
    last_seq: Option<u32>,
    notes: Vec<String>,
}

impl JsonReport {
    fn of(r: &VerifyReport) -> Self {
        Self {
            intact: r.is_intact(),
            segments: r
                .segments
                .iter()
                .map(|s| {
                    let (link, prev_seq) = match s.link {
                        None => (None, None),
                        Some(Link::Start) => (Some("start"), None),
                        Some(Link::Segment(p)) => (Some("segment"), Some(p)),
                        Some(Link::Ledger(p)) => (Some("ledger"), Some(p)),
                        Some(Link::Unchecked(p)) => (Some("unchecked"), Some(p)),
                        Some(Link::Missing(p)) => (Some("missing"), Some(p)),
                    };
                    JsonSegment {
                        path: s.path.display().to_string(),
                        seq: s.seq,
                        kind: match s.kind {
                            SegmentKind::Columnar => "columnar",
                            SegmentKind::Row => "row",
                            SegmentKind::Log => "log",
                            SegmentKind::Unknown => "unknown",
                        },
                        ok: s.problems == 0,
                        rows: s.rows,
                        rows_expected: s.rows_expected,
                        events: s.events,
                        root: s.root.as_ref().map(|h| hex(h)),
                        writer_id: s.writer_id.as_ref().map(|w| hex(w)),
                        link,
                        prev_seq,
                        notes: s.notes.clone(),
                    }
                })
                .collect(),
            ledger: JsonLedger {
                path: r.ledger.path.display().to_string(),
                present: r.ledger.present,
                entries: r.ledger.entries,
                first_seq: r.ledger.seq_range.map(|r| r.0),
                last_seq: r.ledger.seq_range.map(|r| r.1),
                notes: r.ledger.notes.clone(),
            },
            problems: r.problems.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;

    use clap::Parser;

    use super::*;
    use crate::storage::columnar::{Row, SegmentHeader, encode_segment};
    use crate::storage::merkle::Hash;
    use crate::storage::testutil::binding;

    pub(crate) const DAY: i64 = 86_400_000_000_000;
    pub(crate) const T0: i64 = 1_793_577_600_000_000_000; // 2026-11-02T00:00:00Z

    /// Columnar segments `1..=count` in `dir`, chained, segment `n` covering half of day `n`
    /// after T0, with 3 bindings each. Returns their roots.
    pub(crate) fn write_chain(dir: &Path, count: u32) -> Vec<Hash> {
        let seg_dir = dir.join("segments");
        fs::create_dir_all(&seg_dir).unwrap();
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
            let rows = (0..3)
                .map(|i| Row {
                    binding: binding(u64::from(seq) * 10 + i, 40_000 + i as u16, start, None),
                    carried: false,
                })
                .collect();
            let (bytes, root) = encode_segment(&h, rows, &[]);
            fs::write(seg_dir.join(format!("{seq:08}.seg")), bytes).unwrap();
            roots.push(root);
            prev = (seq, root);
        }
        roots
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: VerifyArgs,
    }

    fn run_in(dir: &Path, extra: &[&str]) -> (anyhow::Result<Status>, String) {
        let mut argv = vec!["verify", "--data-dir", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).unwrap().args;
        let mut out = Vec::new();
        let r = execute(&args, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn intact_directory_prints_one_line_per_segment_and_exits_0() {
        let dir = tempfile::tempdir().unwrap();
        let roots = write_chain(dir.path(), 2);
        let (r, out) = run_in(dir.path(), &[]);
        assert_eq!(r.unwrap(), Status::Ok);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                format!(
                    "00000001.seg  ok      rows 3  root {}  starts the chain",
                    short_hex(&roots[0])
                ),
                format!(
                    "00000002.seg  ok      rows 3  root {}  chained to 00000001",
                    short_hex(&roots[1])
                ),
                "signatures: segments are unsigned (no sign_key was configured when they were sealed)"
                    .to_owned(),
                "verify: 2 segments intact; no retention ledger".to_owned(),
            ]
        );
        let (r, out) = run_in(dir.path(), &["--format", "json"]);
        assert_eq!(r.unwrap(), Status::Ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["intact"], true);
        assert_eq!(v["segments"][1]["link"], "segment");
        assert_eq!(v["segments"][1]["prev_seq"], 1);
        assert_eq!(v["segments"][0]["root"], hex(&roots[0]));
    }

    #[test]
    fn problems_name_file_offset_and_cause_and_exit_3() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 3);
        let path = dir.path().join("segments/00000002.seg");
        fs::remove_file(&path).unwrap();
        let (r, out) = run_in(dir.path(), &[]);
        assert_eq!(r.unwrap(), Status::Partial);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[1].starts_with("00000003.seg  FAILED  rows 3  root "),
            "{out}"
        );
        assert!(lines[1].ends_with("  names 00000002 (missing)"), "{out}");
        assert_eq!(
            lines[2],
            format!(
                "{}: offset 32: segment 00000002 missing: not in the retention ledger",
                dir.path().join("segments/00000003.seg").display()
            )
        );
        assert_eq!(
            lines[4],
            "verify: 1 problem in 1 of 2 segments; no retention ledger"
        );
    }

    #[test]
    fn missing_directory_exits_4() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = run_in(&dir.path().join("nope"), &[]);
        let e = r.unwrap_err();
        let user = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(user.status, Status::Environment);
        assert!(user.message.contains("does not exist"), "{}", user.message);
    }
}
