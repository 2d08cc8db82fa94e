//! The `retention` subcommand: deletes sealed segments older than a retention period,
//! recording each deletion in the data directory's ledger.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, CONFIG_FILE};
use crate::exit::{Status, UserError};
use crate::output::{ReportFormat, format_time, format_time_short};
use crate::storage::retention::{KeepReason, RetentionReport, apply_retention};

/// `nattrace retention`: deletes whole sealed segments whose every record is older than
/// now minus `--keep`, oldest first.
#[derive(Clone, Debug, clap::Args)]
pub struct RetentionArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// How long to keep records (90d, 2160h, 12w, 6months); default: `retention` in
    /// DIR/nattrace.toml.
    #[arg(long, value_name = "DUR")]
    pub keep: Option<String>,
    /// Only list what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Runs `nattrace retention`: exit status 0, 2 for bad input (no or bad period, bad config
/// file), 3 when a segment could not be judged (retention stopped there), 4 when the data
/// directory is missing or cannot be written.
pub fn run(args: &RetentionArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    let stderr = io::stderr();
    crate::query::ignore_broken_pipe(execute(
        args,
        crate::query::now_ns(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    ))
}

/// [`run`] with the current time and output streams given.
pub fn execute(
    args: &RetentionArgs,
    now_ns: i64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let keep = keep_period(args)?;
    let report = apply_retention(&args.data_dir, keep, now_ns, args.dry_run)
        .map_err(|e| crate::verify::dir_error(&args.data_dir, e))?;
    crate::query::report_problems(err, &report.problems)?;
    match args.format {
        ReportFormat::Table => write_text(out, &report, keep)?,
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out, &JsonReport::of(&report, keep))?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(if report.problems.is_empty() {
        Status::Ok
    } else {
        Status::Partial
    })
}

/// `--keep`, else the configuration file's `retention`.
fn keep_period(args: &RetentionArgs) -> Result<Duration, UserError> {
    if let Some(keep) = &args.keep {
        let ns = crate::cliparse::parse_duration(keep)
            .map_err(|e| UserError::bad_input(format!("--keep: {e}")))?;
        if ns <= 0 {
            return Err(UserError::bad_input(format!(
                "--keep: '{keep}' must be longer than 0"
            )));
        }
        return Ok(Duration::from_nanos(ns.unsigned_abs()));
    }
    match config::load(&args.data_dir) {
        Ok(c) => c.retention.ok_or_else(|| {
            UserError::bad_input(format!(
                "no retention period: give --keep DUR or set retention = \"90d\" in {}",
                args.data_dir.join(CONFIG_FILE).display()
            ))
        }),
        Err(e) => Err(UserError::bad_input(crate::storage::error_chain(&e))),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn write_text(out: &mut dyn Write, r: &RetentionReport, keep: Duration) -> io::Result<()> {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    for d in &r.deleted {
        writeln!(
            out,
            "{verb} {}  records up to {}",
            file_name(&d.path),
            format_time_short(d.t_hi_ns)
        )?;
    }
    if let Some(s) = &r.stopped_at {
        writeln!(out, "kept {} and later: {}", file_name(&s.path), s.reason)?;
    }
    writeln!(
        out,
        "retention: {verb} {} segment{} with records only before {} (keep {})",
        r.deleted.len(),
        if r.deleted.len() == 1 { "" } else { "s" },
        format_time_short(r.cutoff_ns),
        duration_text(keep)
    )
}

/// A duration in the largest of d, h, m, s that divides it (`90d`, `36h`), else humantime's.
fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    let (n, unit) = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")]
        .into_iter()
        .find(|(u, _)| secs.is_multiple_of(*u))
        .unwrap_or((1, "s"));
    format!("{}{unit}", secs / n)
}

#[derive(Debug, Serialize)]
struct JsonReport {
    dry_run: bool,
    keep_seconds: u64,
    cutoff: String,
    deleted: Vec<JsonDeleted>,
    kept_from: Option<JsonKept>,
    problems: Vec<crate::storage::ReadProblem>,
}

#[derive(Debug, Serialize)]
struct JsonDeleted {
    path: String,
    seq: u32,
    /// "col" or "row".
    format: &'static str,
    records_up_to: String,
}

#[derive(Debug, Serialize)]
struct JsonKept {
    path: String,
    seq: u32,
    /// "newest", "unsealed", "recent", "unreadable".
    reason: &'static str,
    detail: String,
}

impl JsonReport {
    fn of(r: &RetentionReport, keep: Duration) -> Self {
        Self {
            dry_run: r.dry_run,
            keep_seconds: keep.as_secs(),
            cutoff: format_time(r.cutoff_ns),
            deleted: r
                .deleted
                .iter()
                .map(|d| JsonDeleted {
                    path: d.path.display().to_string(),
                    seq: d.seq,
                    format: d.format.as_str(),
                    records_up_to: format_time(d.t_hi_ns),
                })
                .collect(),
            kept_from: r.stopped_at.as_ref().map(|s| JsonKept {
                path: s.path.display().to_string(),
                seq: s.seq,
                reason: match s.reason {
                    KeepReason::Newest => "newest",
                    KeepReason::Unsealed => "unsealed",
                    KeepReason::Recent { .. } => "recent",
                    KeepReason::Unreadable => "unreadable",
                },
                detail: s.reason.to_string(),
            }),
            problems: r.problems.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use clap::Parser;

    use super::*;
    use crate::verify::tests::{DAY, T0, write_chain};

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: RetentionArgs,
    }

    fn run_in(dir: &Path, extra: &[&str], now: i64) -> (anyhow::Result<Status>, String, String) {
        let mut argv = vec!["retention", "--data-dir", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).unwrap().args;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = execute(&args, now, &mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn bad_input(r: anyhow::Result<Status>) -> String {
        let e = r.unwrap_err();
        let user = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(user.status, Status::BadInput, "{}", user.message);
        user.message.clone()
    }

    #[test]
    fn keep_flag_dry_run_then_delete() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 4);
        let now = T0 + 10 * DAY;
        let (r, out, err) = run_in(dir.path(), &["--keep", "7d", "--dry-run"], now);
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(err, "");
        assert_eq!(
            out,
            "would delete 00000001.seg  records up to 2026-11-03T12:00:00Z\n\
             would delete 00000002.seg  records up to 2026-11-04T12:00:00Z\n\
             kept 00000003.seg and later: holds records up to 2026-11-05T12:00:00Z\n\
             retention: would delete 2 segments with records only before 2026-11-05T00:00:00Z (keep 7d)\n"
        );
        assert!(dir.path().join("segments/00000001.seg").exists());
        let (r, out, _) = run_in(dir.path(), &["--keep", "168h", "--format", "json"], now);
        assert_eq!(r.unwrap(), Status::Ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["deleted"].as_array().unwrap().len(), 2);
        assert_eq!(v["kept_from"]["reason"], "recent");
        assert!(!dir.path().join("segments/00000001.seg").exists());
        assert!(
            crate::storage::verify::verify_dir(dir.path())
                .unwrap()
                .is_intact()
        );
    }

    #[test]
    fn period_comes_from_the_config_file_else_is_required() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), 3);
        let now = T0 + 10 * DAY;
        let msg = bad_input(run_in(dir.path(), &[], now).0);
        assert!(
            msg.starts_with("no retention period: give --keep DUR"),
            "{msg}"
        );
        let config = dir.path().join("nattrace.toml");
        fs::write(&config, "retention = \"8d\"\n").unwrap();
        let (r, out, _) = run_in(dir.path(), &["--dry-run"], now);
        assert_eq!(r.unwrap(), Status::Ok);
        assert!(out.contains("would delete 1 segment "), "{out}");
        // --keep wins over the file.
        let (_, out, _) = run_in(dir.path(), &["--dry-run", "--keep", "1s"], now);
        assert!(out.contains("would delete 2 segments "), "{out}");
        fs::write(&config, "retention = \"8d\"\nretension = \"1d\"\n").unwrap();
        let msg = bad_input(run_in(dir.path(), &["--dry-run"], now).0);
        assert!(
            msg.contains("nattrace.toml:2: unknown key 'retension'"),
            "{msg}"
        );
        let msg = bad_input(run_in(dir.path(), &["--keep", "soon"], now).0);
        assert!(msg.starts_with("--keep: invalid duration 'soon'"), "{msg}");
    }
}
