//! When was nattrace recording? Capture intervals, gaps and losses from the coverage events,
//! and the `coverage` subcommand.
//!
//! Covered = inside an interval from `Attached` to the next `Detached`. An interval without
//! `Detached` (the agent crashed: the next event is an `AgentStart`, or there is none) ends at
//! its last `Heartbeat`; if the agent is running, the last interval extends to now.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::exit::Status;
use crate::output::{ReportFormat, format_time, format_time_ms, format_time_short, write_table};
use crate::query::{load_events, now_ns, report_problems, time_arg};
use crate::storage::{CoverageEvent, LossCause};

/// How a capture interval ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalEnd {
    /// With a `Detached` event.
    Detached,
    /// Without `Detached` (agent crashed or killed): at the last `Heartbeat`.
    LastHeartbeat,
    /// It has not ended: the agent is running (the interval ends now).
    Running,
}

impl IntervalEnd {
    /// Name as printed: "detached", "last_heartbeat", "running".
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Detached => "detached",
            Self::LastHeartbeat => "last_heartbeat",
            Self::Running => "running",
        }
    }
}

/// A time span during which capture was running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureInterval {
    /// `Attached` time, nanoseconds since the Unix epoch.
    pub start_ns: i64,
    /// End, nanoseconds since the Unix epoch.
    pub end_ns: i64,
    /// How it ended.
    pub end: IntervalEnd,
    /// The capture backend named by `Attached`.
    pub backend: String,
}

/// A loss event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    /// When the loss was noticed, nanoseconds since the Unix epoch.
    pub t_ns: i64,
    /// Why.
    pub cause: LossCause,
    /// How many events.
    pub count: u64,
    /// Free text from the agent.
    pub detail: String,
}

/// The capture intervals told by `events` (sorted by time). `agent_running`: the data
/// directory is locked by a live agent, so an interval still open at the end extends to `now_ns`.
#[must_use]
pub fn capture_intervals(
    events: &[CoverageEvent],
    agent_running: bool,
    now_ns: i64,
) -> Vec<CaptureInterval> {
    struct Open {
        start: i64,
        last_alive: i64,
        backend: String,
    }
    let mut out = Vec::new();
    let mut cur: Option<Open> = None;
    let close = |out: &mut Vec<CaptureInterval>, o: Open, end_ns: i64, end: IntervalEnd| {
        out.push(CaptureInterval {
            start_ns: o.start,
            end_ns: end_ns.max(o.start),
            end,
            backend: o.backend,
        });
    };
    for e in events {
        match e {
            CoverageEvent::Attached { t_ns, backend } => {
                if let Some(o) = cur.as_mut() {
                    // Written again at the head of every new segment while capture runs, so
                    // that each segment tells its own coverage: a continuation.
                    o.last_alive = o.last_alive.max(*t_ns);
                    continue;
                }
                cur = Some(Open {
                    start: *t_ns,
                    last_alive: *t_ns,
                    backend: backend.clone(),
                });
            }
            CoverageEvent::Heartbeat { t_ns } => {
                if let Some(o) = cur.as_mut() {
                    o.last_alive = o.last_alive.max(*t_ns);
                }
            }
            CoverageEvent::Detached { t_ns } => {
                if let Some(o) = cur.take() {
                    close(&mut out, o, *t_ns, IntervalEnd::Detached);
                }
            }
            CoverageEvent::AgentStart { .. } | CoverageEvent::AgentStop { .. } => {
                // Still attached: the previous agent ended without detaching.
                if let Some(o) = cur.take() {
                    let last = o.last_alive;
                    close(&mut out, o, last, IntervalEnd::LastHeartbeat);
                }
            }
            CoverageEvent::Loss { .. } => {}
        }
    }
    if let Some(o) = cur {
        if agent_running {
            let end = now_ns.max(o.last_alive);
            close(&mut out, o, end, IntervalEnd::Running);
        } else {
            let last = o.last_alive;
            close(&mut out, o, last, IntervalEnd::LastHeartbeat);
        }
    }
    out
}

/// Coverage of a time window `[from_ns, to_ns]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// Window start, nanoseconds since the Unix epoch.
    pub from_ns: i64,
    /// Window end, nanoseconds since the Unix epoch.
    pub to_ns: i64,
    /// Capture intervals overlapping the window (not clipped).
    pub intervals: Vec<CaptureInterval>,
    /// Parts of the window not covered by any interval, in order.
    pub gaps: Vec<(i64, i64)>,
    /// Loss events inside the window.
    pub losses: Vec<Loss>,
}

impl Coverage {
    /// Computes the coverage of `[from_ns, to_ns]` from `events` (sorted by time).
    #[must_use]
    pub fn compute(
        events: &[CoverageEvent],
        agent_running: bool,
        now_ns: i64,
        from_ns: i64,
        to_ns: i64,
    ) -> Self {
        let intervals: Vec<CaptureInterval> = capture_intervals(events, agent_running, now_ns)
            .into_iter()
            .filter(|i| i.start_ns <= to_ns && i.end_ns >= from_ns)
            .collect();
        let gaps = gaps(&intervals, from_ns, to_ns);
        let losses = events
            .iter()
            .filter_map(|e| match e {
                CoverageEvent::Loss {
                    t_ns,
                    cause,
                    count,
                    detail,
                } if (from_ns..=to_ns).contains(t_ns) => Some(Loss {
                    t_ns: *t_ns,
                    cause: *cause,
                    count: *count,
                    detail: detail.clone(),
                }),
                _ => None,
            })
            .collect();
        Self {
            from_ns,
            to_ns,
            intervals,
            gaps,
            losses,
        }
    }

    /// The window was recorded from start to end, without loss.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.gaps.is_empty() && self.losses.is_empty()
    }

    /// The one-line warning (without the `nattrace: warning: ` prefix) when the window is
    /// not fully covered, e.g. `2026-11-02T10:14:05Z..2026-11-02T10:14:09Z is not fully covered
    /// by capture (not recording from 2026-11-02T10:14:06Z to 2026-11-02T10:14:09Z; 12 start
    /// events lost to ring_full at 2026-11-02T10:14:05.5Z)`.
    #[must_use]
    pub fn warning(&self) -> Option<String> {
        const SHOWN: usize = 3;
        if self.is_complete() {
            return None;
        }
        let mut parts = Vec::new();
        if !self.gaps.is_empty() {
            let mut spans: Vec<String> = self
                .gaps
                .iter()
                .take(SHOWN)
                .map(|&(a, b)| format!("from {} to {}", format_time_short(a), format_time_short(b)))
                .collect();
            if self.gaps.len() > SHOWN {
                spans.push(format!("and {} more gaps", self.gaps.len() - SHOWN));
            }
            parts.push(format!("not recording {}", spans.join(", ")));
        }
        for l in self.losses.iter().take(SHOWN) {
            parts.push(format!(
                "{} {} lost to {} at {}",
                l.count,
                loss_noun(l.cause),
                l.cause.as_str(),
                format_time_short(l.t_ns)
            ));
        }
        if self.losses.len() > SHOWN {
            parts.push(format!("{} more losses", self.losses.len() - SHOWN));
        }
        Some(format!(
            "{}..{} is not fully covered by capture ({})",
            format_time_short(self.from_ns),
            format_time_short(self.to_ns),
            parts.join("; ")
        ))
    }
}

/// What a loss count counts.
fn loss_noun(cause: LossCause) -> &'static str {
    match cause {
        LossCause::RingFull => "start events",
        LossCause::RingFullEnd => "end events",
        LossCause::NetlinkOverrun => "conntrack events",
        LossCause::DiskError => "records",
    }
}

/// The parts of `[from, to]` outside every interval. A window of one instant (`from == to`)
/// not inside an interval is one gap `(from, from)`.
fn gaps(intervals: &[CaptureInterval], from: i64, to: i64) -> Vec<(i64, i64)> {
    let mut spans: Vec<(i64, i64)> = intervals.iter().map(|i| (i.start_ns, i.end_ns)).collect();
    spans.sort_unstable();
    if from == to {
        let covered = spans.iter().any(|&(a, b)| a <= from && from <= b);
        return if covered {
            Vec::new()
        } else {
            vec![(from, to)]
        };
    }
    let mut out = Vec::new();
    let mut cursor = from;
    for (a, b) in spans {
        if cursor >= to {
            break;
        }
        if a > cursor {
            out.push((cursor, a.min(to)));
        }
        cursor = cursor.max(b);
    }
    if cursor < to {
        out.push((cursor, to));
    }
    out
}

/// `nattrace coverage`: capture intervals, gaps and losses overlapping a time window.
#[derive(Clone, Debug, clap::Args)]
pub struct CoverageArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Window start: RFC 3339 (2026-11-02T10:14:07Z, any offset) or unix seconds.
    #[arg(long, value_name = "TIME")]
    pub from: String,
    /// Window end: RFC 3339 or unix seconds.
    #[arg(long, value_name = "TIME")]
    pub to: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Runs `nattrace coverage`: exit status 0 when some capture interval overlaps the window,
/// 1 when none, 3 when some data is unreadable.
pub fn run(args: &CoverageArgs) -> anyhow::Result<Status> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    crate::query::ignore_broken_pipe(execute(
        args,
        now_ns(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    ))
}

/// [`run`] with the current time and output streams given.
pub fn execute(
    args: &CoverageArgs,
    now: i64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let from = time_arg("--from", &args.from)?;
    let to = time_arg("--to", &args.to)?;
    if to < from {
        return Err(crate::exit::UserError::bad_input(format!(
            "--to: '{}' is before --from '{}'",
            args.to, args.from
        ))
        .into());
    }
    let snap = load_events(&args.data_dir)?;
    report_problems(err, &snap.problems)?;
    let cov = Coverage::compute(&snap.events, snap.agent_running, now, from, to);
    match args.format {
        ReportFormat::Json => write_json(out, &cov)?,
        ReportFormat::Table => write_text(out, &cov)?,
    }
    Ok(if !snap.problems.is_empty() {
        Status::Partial
    } else if cov.intervals.is_empty() {
        Status::NoResults
    } else {
        Status::Ok
    })
}

/// Rows by time: (start, kind, json, table cells).
fn rows(cov: &Coverage) -> Vec<(i64, serde_json::Value, Vec<String>)> {
    let mut rows = Vec::new();
    for i in &cov.intervals {
        rows.push((
            i.start_ns,
            json!({"kind": "capture", "start": format_time(i.start_ns), "end": format_time(i.end_ns),
                   "end_reason": i.end.as_str(), "backend": i.backend}),
            vec![
                "capture".to_owned(),
                format_time_ms(i.start_ns),
                format_time_ms(i.end_ns),
                format!("backend {}, end: {}", i.backend, i.end.as_str()),
            ],
        ));
    }
    for &(a, b) in &cov.gaps {
        rows.push((
            a,
            json!({"kind": "gap", "start": format_time(a), "end": format_time(b)}),
            vec![
                "gap".to_owned(),
                format_time_ms(a),
                format_time_ms(b),
                "not recording".to_owned(),
            ],
        ));
    }
    for l in &cov.losses {
        rows.push((
            l.t_ns,
            json!({"kind": "loss", "time": format_time(l.t_ns), "cause": l.cause.as_str(),
                   "count": l.count, "detail": l.detail}),
            vec![
                "loss".to_owned(),
                format_time_ms(l.t_ns),
                String::new(),
                format!(
                    "{} {} {}{}",
                    l.count,
                    loss_noun(l.cause),
                    l.cause.as_str(),
                    if l.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", l.detail)
                    }
                ),
            ],
        ));
    }
    rows.sort_by_key(|r| r.0);
    rows
}

fn write_json(out: &mut dyn Write, cov: &Coverage) -> std::io::Result<()> {
    for (_, v, _) in rows(cov) {
        serde_json::to_writer(&mut *out, &v)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn write_text(out: &mut dyn Write, cov: &Coverage) -> std::io::Result<()> {
    let cells: Vec<Vec<String>> = rows(cov).into_iter().map(|r| r.2).collect();
    write_table(out, &["KIND", "START", "END", "DETAIL"], &cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn attached(t: i64) -> CoverageEvent {
        CoverageEvent::Attached {
            t_ns: t * S,
            backend: "ebpf".into(),
        }
    }
    fn hb(t: i64) -> CoverageEvent {
        CoverageEvent::Heartbeat { t_ns: t * S }
    }
    fn detached(t: i64) -> CoverageEvent {
        CoverageEvent::Detached { t_ns: t * S }
    }
    fn start(t: i64) -> CoverageEvent {
        CoverageEvent::AgentStart {
            t_ns: t * S,
            pid: 1,
        }
    }
    fn stop(t: i64) -> CoverageEvent {
        CoverageEvent::AgentStop { t_ns: t * S }
    }
    fn spans(iv: &[CaptureInterval]) -> Vec<(i64, i64, IntervalEnd)> {
        iv.iter()
            .map(|i| (i.start_ns / S, i.end_ns / S, i.end))
            .collect()
    }

    #[test]
    fn gap_between_detached_and_next_attach() {
        let ev = [
            start(0),
            attached(1),
            hb(2),
            detached(3),
            stop(4),
            start(10),
            attached(11),
            hb(12),
            detached(13),
        ];
        let iv = capture_intervals(&ev, false, 100 * S);
        assert_eq!(
            spans(&iv),
            vec![
                (1, 3, IntervalEnd::Detached),
                (11, 13, IntervalEnd::Detached)
            ]
        );
        let cov = Coverage::compute(&ev, false, 100 * S, 2 * S, 12 * S);
        assert_eq!(cov.gaps, vec![(3 * S, 11 * S)]);
        let w = cov.warning().unwrap();
        assert_eq!(
            w,
            "1970-01-01T00:00:02Z..1970-01-01T00:00:12Z is not fully covered by capture \
             (not recording from 1970-01-01T00:00:03Z to 1970-01-01T00:00:11Z)"
        );
        assert!(
            Coverage::compute(&ev, false, 100 * S, 11 * S, 13 * S)
                .warning()
                .is_none()
        );
    }

    #[test]
    fn crash_without_detached_ends_at_last_heartbeat() {
        let ev = [
            start(0),
            attached(1),
            hb(2),
            hb(5),
            start(20),
            attached(21),
            hb(22),
        ];
        let iv = capture_intervals(&ev, false, 100 * S);
        assert_eq!(
            spans(&iv),
            vec![
                (1, 5, IntervalEnd::LastHeartbeat),
                (21, 22, IntervalEnd::LastHeartbeat)
            ]
        );
        let cov = Coverage::compute(&ev, false, 100 * S, 4 * S, 30 * S);
        assert_eq!(cov.gaps, vec![(5 * S, 21 * S), (22 * S, 30 * S)]);
        // A crash right after attaching covers only the attach instant.
        let iv = capture_intervals(&[attached(1)], false, 100 * S);
        assert_eq!(spans(&iv), vec![(1, 1, IntervalEnd::LastHeartbeat)]);
    }

    #[test]
    fn running_agent_extends_last_interval_to_now() {
        let ev = [start(0), attached(1), hb(2)];
        let iv = capture_intervals(&ev, true, 50 * S);
        assert_eq!(spans(&iv), vec![(1, 50, IntervalEnd::Running)]);
        assert!(Coverage::compute(&ev, true, 50 * S, 40 * S, 50 * S).is_complete());
        assert!(!Coverage::compute(&ev, true, 50 * S, 40 * S, 51 * S).is_complete());
        // Detached while running: nothing extends.
        let ev = [start(0), attached(1), detached(2)];
        assert_eq!(
            spans(&capture_intervals(&ev, true, 50 * S)),
            vec![(1, 2, IntervalEnd::Detached)]
        );
    }

    #[test]
    fn nothing_recorded_and_point_windows() {
        let cov = Coverage::compute(&[], false, 0, 5 * S, 9 * S);
        assert_eq!(cov.gaps, vec![(5 * S, 9 * S)]);
        let ev = [attached(1), detached(3)];
        assert!(Coverage::compute(&ev, false, 0, 3 * S, 3 * S).is_complete());
        assert_eq!(
            Coverage::compute(&ev, false, 0, 4 * S, 4 * S).gaps,
            vec![(4 * S, 4 * S)]
        );
    }

    #[test]
    fn losses_in_window_are_mentioned() {
        let loss = |t: i64, n: u64| CoverageEvent::Loss {
            t_ns: t * S + S / 2,
            cause: LossCause::RingFull,
            count: n,
            detail: String::new(),
        };
        let ev = [attached(1), loss(2, 12), loss(30, 1), detached(40)];
        let cov = Coverage::compute(&ev, false, 0, 2 * S, 6 * S);
        assert_eq!(cov.losses.len(), 1);
        assert_eq!(
            cov.warning().unwrap(),
            "1970-01-01T00:00:02Z..1970-01-01T00:00:06Z is not fully covered by capture \
             (12 start events lost to ring_full at 1970-01-01T00:00:02.5Z)"
        );
    }

    #[test]
    fn subcommand_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let run = |from: &str, to: &str| {
            let args = CoverageArgs {
                data_dir: dir.path().to_owned(),
                from: from.into(),
                to: to.into(),
                format: ReportFormat::Table,
            };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            execute(&args, 100 * S, &mut out, &mut err)
        };
        let e = run("10", "5").unwrap_err();
        let e = e.downcast_ref::<crate::exit::UserError>().unwrap();
        assert_eq!(e.status, Status::BadInput);
        assert_eq!(e.message, "--to: '5' is before --from '10'");
        assert_eq!(run("0", "5").unwrap(), Status::NoResults);
        let mut w = crate::storage::Writer::open(dir.path()).unwrap();
        w.append_event(attached(1));
        w.append_event(hb(2));
        w.flush().unwrap();
        // The agent is running: capture extends to now.
        assert_eq!(run("0", "5").unwrap(), Status::Ok);
        drop(w);
    }

    #[test]
    fn json_and_table_output() {
        let ev = [
            attached(1),
            CoverageEvent::Loss {
                t_ns: 2 * S,
                cause: LossCause::DiskError,
                count: 3,
                detail: "ENOSPC".into(),
            },
            detached(3),
        ];
        let cov = Coverage::compute(&ev, false, 0, 0, 5 * S);
        let mut out = Vec::new();
        write_json(&mut out, &cov).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = lines.iter().map(|v| v["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, vec!["gap", "capture", "loss", "gap"]);
        assert_eq!(lines[1]["end_reason"], "detached");
        assert_eq!(lines[2]["cause"], "disk_error");
        assert_eq!(lines[2]["count"], 3);
        let mut out = Vec::new();
        write_text(&mut out, &cov).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("loss     1970-01-01T00:00:02.000Z                            3 records disk_error: ENOSPC"), "{text}");
    }
}
