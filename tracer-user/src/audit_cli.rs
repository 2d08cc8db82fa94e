//! The `audit` subcommand: lists the data directory's audit log (who asked what, when and
//! why), or with `--verify` checks its hash chain and head.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::audit::{self, AUDIT_LOG, AuditError, AuditReport};
use crate::exit::{Status, UserError};
use crate::output::{ReportFormat, write_table};
use crate::signing::VerifierKey;
use crate::storage::error_chain;

/// `nattrace audit`: the audit log of a data directory.
#[derive(Clone, Debug, clap::Args)]
pub struct AuditArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Check the log's hash chain and its head instead of listing the entries; exit 0 only
    /// if intact.
    #[arg(long)]
    pub verify: bool,
    /// Public key (the .pub file of `nattrace keygen`) the head must carry a good signature
    /// of.
    #[arg(long, value_name = "PUBKEY", requires = "verify")]
    pub key: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Runs `nattrace audit`. Listing: exit status 0 with entries, 1 without, 3 when some line
/// is not a valid entry. With `--verify`: 0 when intact, 3 when any problem was found.
/// 2 for a missing data directory or a bad key file, 4 when the log cannot be read.
pub fn run(args: &AuditArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    let stderr = io::stderr();
    crate::query::ignore_broken_pipe(execute(args, &mut stdout.lock(), &mut stderr.lock()))
}

/// [`run`] with the output streams given.
pub fn execute(
    args: &AuditArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let dir = &args.data_dir;
    if !dir.is_dir() {
        return Err(UserError::bad_input(format!(
            "--data-dir: '{}' does not exist or is not a directory",
            dir.display()
        ))
        .into());
    }
    let status = if args.verify {
        let key = args
            .key
            .as_deref()
            .map(|p| {
                VerifierKey::load(p)
                    .map_err(|e| UserError::bad_input(format!("--key: {}", error_chain(&e))))
            })
            .transpose()?;
        let report = audit::verify(dir, key.as_ref()).map_err(|e| read_error(dir, e))?;
        match args.format {
            ReportFormat::Table => write_report(out, dir, &report)?,
            ReportFormat::Json => {
                serde_json::to_writer(&mut *out, &JsonReport::of(&report))?;
                out.write_all(b"\n")?;
            }
        }
        if report.is_intact() {
            Status::Ok
        } else {
            Status::Partial
        }
    } else {
        list(args, out, err)?
    };
    out.flush()?;
    Ok(status)
}

/// A log that cannot be read: exit status 4.
fn read_error(dir: &Path, e: AuditError) -> anyhow::Error {
    if e.io_kind() == Some(io::ErrorKind::PermissionDenied) {
        UserError::environment(format!(
            "cannot read {}: permission denied; run as a member of the data dir's group or as root",
            dir.join(AUDIT_LOG).display()
        ))
        .into()
    } else {
        UserError::environment(error_chain(&e)).into()
    }
}

fn list(args: &AuditArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<Status> {
    let dir = &args.data_dir;
    let (lines, torn) = audit::read_log(dir).map_err(|e| read_error(dir, e))?;
    let path = dir.join(AUDIT_LOG);
    let mut entries = Vec::new();
    let mut bad = 0usize;
    for l in &lines {
        match &l.entry {
            Ok(e) => entries.push(e),
            Err(e) => {
                bad += 1;
                writeln!(
                    err,
                    "nattrace: {}: line {}: not a valid audit entry: {e}",
                    path.display(),
                    l.line
                )?;
            }
        }
    }
    if torn {
        writeln!(
            err,
            "nattrace: {}: the last line has no newline (an interrupted append)",
            path.display()
        )?;
    }
    match args.format {
        ReportFormat::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        e.time.clone(),
                        e.user.clone(),
                        e.command.clone(),
                        e.case.clone().unwrap_or_else(|| "-".to_owned()),
                        e.results.to_string(),
                        e.query.clone(),
                        e.reason.clone().unwrap_or_else(|| "-".to_owned()),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                write_table(
                    out,
                    &[
                        "SEQ", "TIME", "USER", "COMMAND", "CASE", "RESULTS", "QUERY", "REASON",
                    ],
                    &rows,
                )?;
            }
        }
        ReportFormat::Json => {
            for e in &entries {
                serde_json::to_writer(&mut *out, e)?;
                out.write_all(b"\n")?;
            }
        }
    }
    Ok(if bad > 0 || torn {
        Status::Partial
    } else if entries.is_empty() {
        Status::NoResults
    } else {
        Status::Ok
    })
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn write_report(out: &mut dyn Write, dir: &Path, r: &AuditReport) -> io::Result<()> {
    writeln!(
        out,
        "{}: {}",
        dir.join(AUDIT_LOG).display(),
        plural(r.entries, "entry", "entries")
    )?;
    let head = dir.join(audit::AUDIT_HEAD);
    match r.head_entries {
        Some(n) => {
            let mut line = format!("{}: {}", head.display(), plural(n, "entry", "entries"));
            if r.signed_by.is_empty() {
                line.push_str(", unsigned");
            } else {
                line.push_str(&format!(", signed by {}", r.signed_by.join(", ")));
            }
            if let Some(k) = &r.verified_by {
                line.push_str(&format!(", signature by {k} verified"));
            }
            writeln!(out, "{line}")?;
        }
        None => writeln!(out, "{}: none", head.display())?,
    }
    for p in &r.problems {
        writeln!(out, "{p}")?;
    }
    for n in &r.notes {
        writeln!(out, "note: {n}")?;
    }
    if r.is_intact() {
        writeln!(out, "audit log intact")
    } else {
        writeln!(
            out,
            "audit log FAILED: {}",
            plural(r.problems.len() as u64, "problem", "problems")
        )
    }
}

/// The JSON form of a check of the audit log.
#[derive(Serialize)]
struct JsonReport<'a> {
    intact: bool,
    #[serde(flatten)]
    report: &'a AuditReport,
}

impl<'a> JsonReport<'a> {
    fn of(report: &'a AuditReport) -> Self {
        Self {
            intact: report.is_intact(),
            report,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use clap::Parser;

    use super::*;
    use crate::audit::{COMMAND_QUERY, NewEntry, append};
    use crate::signing::{SignerKey, write_key_pair};

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: AuditArgs,
    }

    fn run_in(dir: &Path, argv: &[&str]) -> (anyhow::Result<Status>, String, String) {
        let mut full = vec!["nattrace-audit", "--data-dir", dir.to_str().unwrap()];
        full.extend_from_slice(argv);
        let args = Cli::try_parse_from(full).unwrap().args;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = execute(&args, &mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn fill(dir: &Path, key: Option<&SignerKey>) {
        let mut e = NewEntry::now(
            COMMAND_QUERY,
            "--external 203.0.113.7:40123 --from a --to b",
        );
        e.results = 2;
        append(dir, e, key).unwrap();
        let mut e = NewEntry::now(COMMAND_QUERY, "--internal 100.64.0.1 --from a --to b");
        e.case = Some("C-17".to_owned());
        e.reason = Some("court order".to_owned());
        append(dir, e, key).unwrap();
    }

    #[test]
    fn lists_entries_as_table_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let (r, out, _) = run_in(dir.path(), &[]);
        assert_eq!(r.unwrap(), Status::NoResults);
        assert_eq!(out, "");
        fill(dir.path(), None);
        let (r, out, err) = run_in(dir.path(), &[]);
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(err, "");
        let lines: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0], "SEQ TIME USER COMMAND CASE RESULTS QUERY REASON",
            "{out}"
        );
        assert!(
            lines[1].contains(" query - 2 --external 203.0.113.7:40123 --from a --to b -"),
            "{out}"
        );
        assert!(
            lines[2].ends_with(" query C-17 0 --internal 100.64.0.1 --from a --to b court order"),
            "{out}"
        );

        let (r, out, _) = run_in(dir.path(), &["--format", "json"]);
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(out, fs::read_to_string(dir.path().join(AUDIT_LOG)).unwrap());

        // A damaged line is named on stderr: exit 3.
        let mut text = fs::read_to_string(dir.path().join(AUDIT_LOG)).unwrap();
        text.push_str("junk\n");
        fs::write(dir.path().join(AUDIT_LOG), text).unwrap();
        let (r, out, err) = run_in(dir.path(), &[]);
        assert_eq!(r.unwrap(), Status::Partial);
        assert_eq!(out.lines().count(), 3);
        assert!(
            err.contains("audit.log: line 3: not a valid audit entry"),
            "{err}"
        );
    }

    #[test]
    fn verify_reports_intact_and_broken_logs() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        let (_, pubkey) = write_key_pair(&dir.path().join("keys"), &key).unwrap();
        let pubkey = pubkey.to_str().unwrap();
        fill(dir.path(), Some(&key));
        let (r, out, _) = run_in(dir.path(), &["--verify", "--key", pubkey]);
        assert_eq!(r.unwrap(), Status::Ok, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("audit.log: 2 entries"), "{out}");
        assert!(
            lines[1].contains("audit.head: 2 entries, signed by host-a+"),
            "{out}"
        );
        assert!(
            lines[1].ends_with(", signature by host-a verified"),
            "{out}"
        );
        assert_eq!(lines.last(), Some(&"audit log intact"));

        let (r, out, _) = run_in(dir.path(), &["--verify", "--format", "json"]);
        assert_eq!(r.unwrap(), Status::Ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["intact"], true);
        assert_eq!(v["entries"], 2);

        // Change the first entry.
        let text = fs::read_to_string(dir.path().join(AUDIT_LOG)).unwrap();
        fs::write(
            dir.path().join(AUDIT_LOG),
            text.replacen("\"results\":2", "\"results\":1", 1),
        )
        .unwrap();
        let (r, out, _) = run_in(dir.path(), &["--verify", "--key", pubkey]);
        assert_eq!(r.unwrap(), Status::Partial);
        assert!(
            out.lines().any(|l| l.ends_with(
                "audit.log: line 1: entry 1 (line 1) was changed: its hash no longer matches \
                 the prev of entry 2 (line 2)"
            )),
            "{out}"
        );
        assert_eq!(out.lines().last(), Some("audit log FAILED: 1 problem"));
        let (r, out, _) = run_in(dir.path(), &["--verify", "--format", "json"]);
        assert_eq!(r.unwrap(), Status::Partial);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["intact"], false);
        assert_eq!(v["problems"][0]["seq"], 1);
        assert_eq!(v["problems"][0]["line"], 1);
    }

    #[test]
    fn bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _, _) = run_in(&dir.path().join("missing"), &[]);
        let e = r.unwrap_err();
        assert_eq!(
            e.downcast_ref::<UserError>().unwrap().status,
            Status::BadInput
        );
        let (r, _, _) = run_in(dir.path(), &["--verify", "--key", "/nonexistent.pub"]);
        let e = r.unwrap_err();
        let ue = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(ue.status, Status::BadInput);
        assert!(ue.message.starts_with("--key: "), "{}", ue.message);
        assert!(
            Cli::try_parse_from(["nattrace-audit", "--data-dir", "/d", "--key", "k.pub"]).is_err(),
            "--key needs --verify"
        );
    }
}
