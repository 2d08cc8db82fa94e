//! The `stats` subcommand: what a data directory holds.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::binding::StartSource;
use crate::exit::Status;
use crate::output::{ReportFormat, format_time, format_time_ms, write_table};
use crate::query::{load, report_problems};
use crate::storage::{CoverageEvent, LossCause, Snapshot};

/// `nattrace stats`: counts of bindings, losses and segments of a data directory.
#[derive(Clone, Debug, clap::Args)]
pub struct StatsArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Sums of the counts of the loss events, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// [`LossCause::RingFull`].
    pub ring_full: u64,
    /// [`LossCause::RingFullEnd`].
    pub ring_full_end: u64,
    /// [`LossCause::NetlinkOverrun`].
    pub netlink_overrun: u64,
    /// [`LossCause::DiskError`].
    pub disk_error: u64,
}

impl Losses {
    /// The sum for `cause`.
    pub fn get_mut(&mut self, cause: LossCause) -> &mut u64 {
        match cause {
            LossCause::RingFull => &mut self.ring_full,
            LossCause::RingFullEnd => &mut self.ring_full_end,
            LossCause::NetlinkOverrun => &mut self.netlink_overrun,
            LossCause::DiskError => &mut self.disk_error,
        }
    }
}

/// What `stats` reports (also its JSON form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Bindings (distinct ids).
    pub bindings: u64,
    /// Bindings without an end.
    pub open_bindings: u64,
    /// Sum of loss counts by cause.
    pub losses: Losses,
    /// Bindings whose start did not come from the ring buffer (start_source != ring).
    pub starts_recovered: u64,
    /// Segment files.
    pub segments: usize,
    /// Size of the segment files in bytes.
    pub bytes_on_disk: u64,
    /// An agent holds the data directory's lock.
    pub agent_running: bool,
    /// Earliest binding start, RFC 3339.
    pub first_start: Option<String>,
    /// Latest binding end, RFC 3339.
    pub last_end: Option<String>,
}

impl Stats {
    /// Counts what `snap` holds.
    #[must_use]
    pub fn of(snap: &Snapshot) -> Self {
        let mut losses = Losses::default();
        for e in &snap.events {
            if let CoverageEvent::Loss { cause, count, .. } = e {
                let sum = losses.get_mut(*cause);
                *sum = sum.saturating_add(*count);
            }
        }
        let count = |f: &dyn Fn(&crate::binding::Binding) -> bool| {
            snap.bindings.iter().filter(|b| f(b)).count() as u64
        };
        Self {
            bindings: snap.bindings.len() as u64,
            open_bindings: count(&|b| b.end_ns.is_none()),
            losses,
            starts_recovered: count(&|b| b.start_source != StartSource::Ring),
            segments: snap.segments,
            bytes_on_disk: snap.bytes_on_disk,
            agent_running: snap.agent_running,
            first_start: snap
                .bindings
                .iter()
                .map(|b| b.start_ns)
                .min()
                .map(format_time),
            last_end: snap
                .bindings
                .iter()
                .filter_map(|b| b.end_ns)
                .max()
                .map(format_time),
        }
    }
}

/// Runs `nattrace stats`: exit status 0, or 3 when some data is unreadable.
pub fn run(args: &StatsArgs) -> anyhow::Result<Status> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    crate::query::ignore_broken_pipe(execute(args, &mut stdout.lock(), &mut stderr.lock()))
}

/// [`run`] with the output streams given.
pub fn execute(
    args: &StatsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let snap = load(&args.data_dir, &crate::storage::Search::everything())?;
    report_problems(err, &snap.problems)?;
    let stats = Stats::of(&snap);
    match args.format {
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out, &stats)?;
            out.write_all(b"\n")?;
        }
        ReportFormat::Table => {
            let first_start = snap.bindings.iter().map(|b| b.start_ns).min();
            let last_end = snap.bindings.iter().filter_map(|b| b.end_ns).max();
            let time = |t: Option<i64>| t.map_or_else(|| "-".to_owned(), format_time_ms);
            let l = &stats.losses;
            let losses = format!(
                "ring_full={} ring_full_end={} netlink_overrun={} disk_error={}",
                l.ring_full, l.ring_full_end, l.netlink_overrun, l.disk_error
            );
            let rows = [
                ("bindings", stats.bindings.to_string()),
                ("open bindings", stats.open_bindings.to_string()),
                ("starts recovered", stats.starts_recovered.to_string()),
                ("losses", losses),
                ("segments", stats.segments.to_string()),
                ("bytes on disk", stats.bytes_on_disk.to_string()),
                (
                    "agent running",
                    if stats.agent_running { "yes" } else { "no" }.to_owned(),
                ),
                ("first start", time(first_start)),
                ("last end", time(last_end)),
            ];
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(k, v)| vec![k.to_owned(), v])
                .collect();
            write_table(out, &["STAT", "VALUE"], &rows)?;
        }
    }
    out.flush()?;
    Ok(if snap.problems.is_empty() {
        Status::Ok
    } else {
        Status::Partial
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Writer;
    use crate::storage::testutil::binding;

    #[test]
    fn json_stats() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_binding(&binding(1, 1, 5_000_000_000, None));
        let mut b = binding(2, 1, 3_000_000_000, Some(4_000_000_000));
        b.start_source = StartSource::Destroy;
        w.append_binding(&b);
        w.append_event(CoverageEvent::Loss {
            t_ns: 1,
            cause: LossCause::RingFull,
            count: 12,
            detail: String::new(),
        });
        w.append_event(CoverageEvent::Loss {
            t_ns: 2,
            cause: LossCause::RingFull,
            count: 3,
            detail: String::new(),
        });
        w.flush().unwrap();
        let args = StatsArgs {
            data_dir: dir.path().to_owned(),
            format: ReportFormat::Json,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(execute(&args, &mut out, &mut err).unwrap(), Status::Ok);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "bindings": 2, "open_bindings": 1,
                "losses": {"ring_full": 15, "ring_full_end": 0, "netlink_overrun": 0, "disk_error": 0},
                "starts_recovered": 1, "segments": 1, "bytes_on_disk": v["bytes_on_disk"].as_u64().unwrap(),
                "agent_running": true,
                "first_start": "1970-01-01T00:00:03.000000000Z", "last_end": "1970-01-01T00:00:04.000000000Z"
            })
        );
        assert!(v["bytes_on_disk"].as_u64().unwrap() > 32);
        w.close().unwrap();

        let args = StatsArgs {
            data_dir: dir.path().to_owned(),
            format: ReportFormat::Table,
        };
        let mut out = Vec::new();
        assert_eq!(execute(&args, &mut out, &mut err).unwrap(), Status::Ok);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "losses            ring_full=15 ring_full_end=0 netlink_overrun=0 disk_error=0"
            ),
            "{text}"
        );
        assert!(text.contains("agent running     no"), "{text}");
    }
}
