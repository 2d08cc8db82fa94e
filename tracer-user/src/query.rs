//! The `query` subcommand: who held a public address and port at a time
//! (`--external IP:PORT --at TIME`), what a subscriber held in a window
//! (`--internal IP[:PORT] --from TIME --to TIME`), which subscribers reached a server
//! (`--destination IP[:PORT] --from TIME --to TIME`); conditions combine.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::audit::{COMMAND_QUERY, NewEntry};
use crate::binding::Binding;
use crate::cliparse::{self, ParseError};
use crate::coverage::Coverage;
use crate::exit::{Status, UserError};
use crate::output::{Format, format_time, proto_label, write_bindings};
use crate::proportionality;
use crate::storage::{self, ReadProblem, Search, Snapshot, StorageError};

/// Slack of `--external … --at` when `--slack` is not given.
pub const DEFAULT_SLACK: &str = "2s";

/// `nattrace query`: bindings by public address (and port) at a time, by subscriber, or by
/// destination, over a window. At least one of `--external`, `--internal` and
/// `--destination`; the conditions given must all hold.
#[derive(Clone, Debug, clap::Args)]
pub struct QueryArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The question: conditions and time.
    #[command(flatten)]
    pub question: Question,
    /// Case the question belongs to, recorded in the audit log (required when the data
    /// directory's nattrace.toml says require_case = true).
    #[arg(long, value_name = "ID")]
    pub case: Option<String>,
    /// Why the question is asked, recorded in the audit log (required for a window longer
    /// than the data directory's max_window, 24h by default).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// The question as flags, shared by `nattrace query` and `nattrace export`: at least one of
/// `--external`, `--internal` and `--destination` (all given must hold), and a time (`--at`
/// with `--slack`, or `--from` and `--to`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Question {
    /// Public address, with or without port (203.0.113.7:40123, 203.0.113.7, [2001:db8::1]:40123):
    /// who held it. Without a port: every binding of the address, and how many subscribers.
    #[arg(long, value_name = "IP[:PORT]", required_unless_present_any = ["internal", "destination"])]
    pub external: Option<String>,
    /// Subscriber address, with or without port (100.64.0.10, 100.64.0.10:40000, [2001:db8::10]:40000).
    #[arg(long, value_name = "IP[:PORT]")]
    pub internal: Option<String>,
    /// Remote peer (server) address, with or without port: which subscribers reached it.
    #[arg(long, value_name = "IP[:PORT]")]
    pub destination: Option<String>,
    /// Point in time: RFC 3339 (2026-11-02T10:14:07Z, any offset) or unix seconds (1793614447.25).
    #[arg(long, value_name = "TIME", conflicts_with_all = ["from", "to"], required_unless_present = "from")]
    pub at: Option<String>,
    /// Tolerance around --at (2s, 500ms, 1m) [default: 2s].
    #[arg(long, value_name = "DUR", requires = "at")]
    pub slack: Option<String>,
    /// Window start: RFC 3339 or unix seconds.
    #[arg(long, value_name = "TIME", requires = "to")]
    pub from: Option<String>,
    /// Window end: RFC 3339 or unix seconds.
    #[arg(long, value_name = "TIME", requires = "from")]
    pub to: Option<String>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, or a number.
    #[arg(long, value_name = "P")]
    pub proto: Option<String>,
}

/// A parsed query: bindings matching `search` whose interval overlaps its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// Conditions and window, as the storage engine takes them.
    pub search: Search,
}

impl Query {
    /// Checks the command-line values; errors name the flag and the value.
    pub fn from_args(args: &QueryArgs) -> Result<Self, UserError> {
        Self::from_question(&args.question)
    }

    /// [`Query::from_args`] for the question alone.
    pub fn from_question(args: &Question) -> Result<Self, UserError> {
        let proto = args
            .proto
            .as_deref()
            .map(|p| flag("--proto", cliparse::parse_proto(p)))
            .transpose()?;
        let endpoint = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|v| flag(name, cliparse::parse_endpoint(v, false)))
                .transpose()
        };
        let external = endpoint("--external", &args.external)?;
        let internal = endpoint("--internal", &args.internal)?;
        let destination = endpoint("--destination", &args.destination)?;
        if external.is_none() && internal.is_none() && destination.is_none() {
            return Err(UserError::bad_input(
                "give at least one of --external, --internal and --destination",
            ));
        }
        let (from_ns, to_ns) = match (&args.at, &args.from, &args.to) {
            (Some(at), None, None) => {
                let at = time_arg("--at", at)?;
                let slack = flag(
                    "--slack",
                    cliparse::parse_duration(args.slack.as_deref().unwrap_or(DEFAULT_SLACK)),
                )?;
                (at.saturating_sub(slack), at.saturating_add(slack))
            }
            (None, Some(_), Some(_)) if args.slack.is_some() => {
                return Err(UserError::bad_input("--slack: only with --at"));
            }
            (None, Some(from_s), Some(to_s)) => {
                let from = time_arg("--from", from_s)?;
                let to = time_arg("--to", to_s)?;
                if to < from {
                    return Err(UserError::bad_input(format!(
                        "--to: '{to_s}' is before --from '{from_s}'"
                    )));
                }
                (from, to)
            }
            _ => {
                return Err(UserError::bad_input(
                    "give either --at TIME or both --from TIME and --to TIME",
                ));
            }
        };
        Ok(Self {
            search: Search {
                external,
                internal,
                destination,
                proto,
                from_ns,
                to_ns,
            },
        })
    }

    /// Length of the window, in nanoseconds: twice the slack of `--at`, or `--to` minus
    /// `--from`.
    #[must_use]
    pub fn window_ns(&self) -> i64 {
        self.search.to_ns.saturating_sub(self.search.from_ns)
    }

    /// The question as one canonical line, as recorded in the audit log (see
    /// [`describe_search`]).
    #[must_use]
    pub fn describe(&self) -> String {
        describe_search(&self.search)
    }

    /// The binding is of the addresses (and ports, and protocol) looked for.
    #[must_use]
    pub fn matches_address(&self, b: &Binding) -> bool {
        self.search.matches_address(b)
    }

    /// The binding's interval `[start, end]` overlaps the window; an open binding lasts until `now_ns`.
    #[must_use]
    pub fn overlaps(&self, b: &Binding, now_ns: i64) -> bool {
        let end = b.end_ns.unwrap_or(now_ns.max(b.start_ns));
        b.start_ns <= self.search.to_ns && end >= self.search.from_ns
    }

    /// The bindings of `bindings` the query selects, by start time (then id): the meaning of
    /// a query, which the storage engine must reproduce.
    #[must_use]
    pub fn select(&self, bindings: &[Binding], now_ns: i64) -> Vec<Binding> {
        let mut out: Vec<Binding> = bindings
            .iter()
            .filter(|b| self.matches_address(b) && self.overlaps(b, now_ns))
            .cloned()
            .collect();
        out.sort_by_key(|b| (b.start_ns, b.id));
        out
    }
}

/// A search as one canonical line of normalized flags, the form the audit log records:
/// `--external 203.0.113.7:40123 --proto tcp --from 2026-11-02T10:14:05.000000000Z --to …`
/// (conditions in the order external, internal, destination, proto; times in UTC with 9
/// fraction digits; `--at` and `--slack` given as the window they make).
#[must_use]
pub fn describe_search(search: &Search) -> String {
    let endpoint = cliparse::format_endpoint;
    let mut parts = Vec::new();
    for (name, value) in [
        ("--external", search.external),
        ("--internal", search.internal),
        ("--destination", search.destination),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name} {}", endpoint(v)));
        }
    }
    if let Some(p) = search.proto {
        parts.push(format!("--proto {}", proto_label(p)));
    }
    parts.push(format!(
        "--from {} --to {}",
        format_time(search.from_ns),
        format_time(search.to_ns)
    ));
    parts.join(" ")
}

/// Runs `nattrace query`: exit status 0 with results, 1 without, 2 for bad input, 3 when
/// some data is unreadable (results still printed), 4 when the data dir is not readable.
pub fn run(args: &QueryArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    let stderr = io::stderr();
    ignore_broken_pipe(execute(
        args,
        now_ns(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    ))
}

/// [`run`] with the current time and output streams given.
pub fn execute(
    args: &QueryArgs,
    now: i64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Status> {
    let query = Query::from_args(args)?;
    let config = proportionality::load_config(&args.data_dir)?;
    proportionality::check(
        &config,
        args.case.as_deref(),
        args.reason.as_deref(),
        query.window_ns(),
    )?;
    let snap = load(&args.data_dir, &query.search)?;
    let found = query.select(&snap.bindings, now);
    // Recorded before anything of the answer is shown; not shown when it cannot be.
    let mut entry = NewEntry::now(COMMAND_QUERY, query.describe());
    entry.case.clone_from(&args.case);
    entry.reason.clone_from(&args.reason);
    entry.results = found.len() as u64;
    proportionality::record(&args.data_dir, &config, entry, err)?;
    report_problems(err, &snap.problems)?;
    let q = &query.search;
    if let Some(w) =
        Coverage::compute(&snap.events, snap.agent_running, now, q.from_ns, q.to_ns).warning()
    {
        writeln!(err, "nattrace: warning: {w}")?;
    }
    if let Some((ip, None)) = q.external {
        let subscribers: HashSet<IpAddr> = found.iter().map(|b| b.internal().0).collect();
        writeln!(
            err,
            "nattrace: {ip}: {} binding{} of {} subscriber{} (distinct internal addresses) in the window",
            found.len(),
            if found.len() == 1 { "" } else { "s" },
            subscribers.len(),
            if subscribers.len() == 1 { "" } else { "s" },
        )?;
    }
    write_bindings(out, args.format, &found)?;
    out.flush()?;
    Ok(if !snap.problems.is_empty() {
        Status::Partial
    } else if found.is_empty() {
        Status::NoResults
    } else {
        Status::Ok
    })
}

/// Nanoseconds since the Unix epoch, now.
#[must_use]
pub fn now_ns() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Parses the TIME value of `flag`.
pub(crate) fn time_arg(flag_name: &str, value: &str) -> Result<i64, UserError> {
    flag(flag_name, cliparse::parse_time(value))
}

fn flag<T>(flag_name: &str, r: Result<T, ParseError>) -> Result<T, UserError> {
    r.map_err(|e| UserError::bad_input(format!("{flag_name}: {e}")))
}

/// Searches the data directory (`None`: coverage events only), turning a missing or
/// unreadable directory into the user errors of exit status 2 and 4.
pub(crate) fn load(data_dir: &Path, search: &Search) -> anyhow::Result<Snapshot> {
    load_with(data_dir, || storage::search(data_dir, search))
}

/// [`load`] of the coverage events alone.
pub(crate) fn load_events(data_dir: &Path) -> anyhow::Result<Snapshot> {
    load_with(data_dir, || storage::read_events(data_dir))
}

fn load_with(
    data_dir: &Path,
    read: impl FnOnce() -> Result<Snapshot, StorageError>,
) -> anyhow::Result<Snapshot> {
    match read() {
        Ok(s) => Ok(s),
        Err(StorageError::NotFound { .. }) => Err(UserError::bad_input(format!(
            "--data-dir: '{}' does not exist or is not a directory",
            data_dir.display()
        ))
        .into()),
        Err(StorageError::PermissionDenied { .. }) => Err(UserError::environment(format!(
            "cannot read {}: permission denied; run as a member of the data dir's group or as root",
            data_dir.display()
        ))
        .into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", data_dir.display()))),
    }
}

/// Prints each problem as `nattrace: <path>: offset <n>: <cause>`.
pub(crate) fn report_problems(err: &mut dyn Write, problems: &[ReadProblem]) -> io::Result<()> {
    for p in problems {
        writeln!(
            err,
            "nattrace: {}: offset {}: {}",
            p.path.display(),
            p.offset,
            p.cause
        )?;
    }
    Ok(())
}

/// A closed stdout (`nattrace query … | head`) ends the command quietly.
pub(crate) fn ignore_broken_pipe(r: anyhow::Result<Status>) -> anyhow::Result<Status> {
    match r {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(Status::Ok)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::binding::{IPPROTO_UDP, IPS_DST_NAT, Tuple};
    use crate::storage::testutil::binding;
    use crate::storage::{CoverageEvent, Writer};

    const T: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z
    const S: i64 = 1_000_000_000;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: QueryArgs,
    }

    fn parse(argv: &[&str]) -> Result<QueryArgs, clap::Error> {
        let mut full = vec!["nattrace-query", "--data-dir", "/nonexistent"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map(|c| c.args)
    }

    fn query(argv: &[&str]) -> Result<Query, UserError> {
        Query::from_args(&parse(argv).unwrap())
    }

    #[test]
    fn clap_requires_exactly_one_of_external_and_internal() {
        assert!(parse(&["--external", "203.0.113.7:1", "--at", "0"]).is_ok());
        assert!(parse(&["--internal", "100.64.0.10", "--from", "0", "--to", "1"]).is_ok());
        assert!(parse(&[]).is_err());
        assert!(
            parse(&["--external", "203.0.113.7:1"]).is_err(),
            "--at missing"
        );
        assert!(
            parse(&["--internal", "100.64.0.10", "--from", "0"]).is_err(),
            "--to missing"
        );
        // Conditions combine.
        assert!(
            parse(&[
                "--external",
                "203.0.113.7:1",
                "--at",
                "0",
                "--internal",
                "100.64.0.10"
            ])
            .is_ok()
        );
        assert!(parse(&["--destination", "192.0.2.2:443", "--from", "0", "--to", "1"]).is_ok());
        assert!(
            query(&[
                "--internal",
                "1.2.3.4",
                "--from",
                "0",
                "--to",
                "1",
                "--slack",
                "1s"
            ])
            .is_err(),
            "--slack needs --at"
        );
        assert!(parse(&["--external", "203.0.113.7:1", "--at", "0", "--from", "0"]).is_err());
        let a = parse(&[
            "--external",
            "203.0.113.7:1",
            "--at",
            "0",
            "--format",
            "csv",
        ])
        .unwrap();
        assert_eq!(a.format, Format::Csv);
        assert!(
            parse(&[
                "--external",
                "203.0.113.7:1",
                "--at",
                "0",
                "--format",
                "xml"
            ])
            .is_err()
        );
    }

    #[test]
    fn window_from_at_and_slack() {
        let q = query(&[
            "--external",
            "[2001:db8::7]:40123",
            "--at",
            "2026-11-02T11:14:07+01:00",
        ])
        .unwrap();
        assert_eq!(
            q.search.external,
            Some(("2001:db8::7".parse().unwrap(), Some(40123)))
        );
        assert_eq!((q.search.from_ns, q.search.to_ns), (T - 2 * S, T + 2 * S));
        let q = query(&[
            "--external",
            "203.0.113.7:1",
            "--at",
            "1793614447.5",
            "--slack",
            "500ms",
            "--proto",
            "udp",
        ])
        .unwrap();
        assert_eq!((q.search.from_ns, q.search.to_ns), (T, T + S));
        assert_eq!(q.search.proto, Some(IPPROTO_UDP));
    }

    #[test]
    fn bad_input_names_flag_and_value() {
        let msg = |argv: &[&str]| query(argv).unwrap_err().message;
        assert!(
            msg(&["--external", "203.0.113.7:70000", "--at", "0"])
                .starts_with("--external: port 70000 in '203.0.113.7:70000'")
        );
        assert!(msg(&["--destination", "192.0.2.2:x", "--at", "0"]).starts_with("--destination:"));
        assert!(
            msg(&["--external", "203.0.113.7:1", "--at", "tomorrow"])
                .starts_with("--at: invalid time 'tomorrow'")
        );
        assert!(
            msg(&["--external", "203.0.113.7:1", "--at", "0", "--slack", "2x"])
                .starts_with("--slack: invalid duration '2x'")
        );
        assert!(
            msg(&[
                "--external",
                "203.0.113.7:1",
                "--at",
                "0",
                "--proto",
                "sctpish"
            ])
            .starts_with("--proto: unknown protocol 'sctpish'")
        );
        assert_eq!(
            msg(&[
                "--internal",
                "100.64.0.10",
                "--from",
                "2026-11-02T10:00:00Z",
                "--to",
                "2026-11-02T09:00:00Z"
            ]),
            "--to: '2026-11-02T09:00:00Z' is before --from '2026-11-02T10:00:00Z'"
        );
        let e = query(&["--internal", "100.64.0.10:x", "--from", "0", "--to", "1"]).unwrap_err();
        assert_eq!(e.status, Status::BadInput);
    }

    #[test]
    fn external_overlap_slack_and_proto() {
        let q = query(&["--external", "203.0.113.7:40123", "--at", "1793614447"]).unwrap();
        let mut udp = binding(6, 40123, T - 10 * S, Some(T + 10 * S));
        udp.proto = IPPROTO_UDP;
        let bs = vec![
            binding(1, 40123, T - 10 * S, Some(T - 3 * S)), // ended before the window
            binding(2, 40123, T - 10 * S, Some(T - 2 * S)), // ends at the window start: in
            binding(3, 40123, T + 2 * S, None),             // starts at the window end: in
            binding(4, 40123, T + 3 * S, None),             // starts after
            binding(5, 40124, T - 10 * S, None),            // other port
            udp,
            binding(7, 40123, T - 100 * S, None), // open: lasts until now
        ];
        let ids = |q: &Query, now| q.select(&bs, now).iter().map(|b| b.id).collect::<Vec<_>>();
        assert_eq!(ids(&q, T + 100 * S), vec![7, 2, 6, 3]);
        // An open binding only lasts until now.
        assert_eq!(ids(&q, T - 50 * S), vec![2, 6, 3]);
        let q = query(&[
            "--external",
            "203.0.113.7:40123",
            "--at",
            "1793614447",
            "--proto",
            "tcp",
            "--slack",
            "0s",
        ])
        .unwrap();
        assert_eq!(ids(&q, T + 100 * S), vec![7]);
    }

    #[test]
    fn internal_with_and_without_port_and_dnat() {
        let mut other_port = binding(2, 1, T, Some(T + S));
        other_port.orig.src_port = 5555;
        let mut dnat = binding(3, 1, T, Some(T + S));
        dnat.status = IPS_DST_NAT;
        dnat.orig = Tuple {
            src: "198.51.100.9".parse().unwrap(),
            dst: "203.0.113.7".parse().unwrap(),
            src_port: 5555,
            dst_port: 8080,
        };
        dnat.reply = Tuple {
            src: "100.64.0.10".parse().unwrap(),
            dst: "198.51.100.9".parse().unwrap(),
            src_port: 80,
            dst_port: 5555,
        };
        let bs = vec![binding(1, 1, T, Some(T + S)), other_port, dnat];
        let ids = |argv: &[&str]| {
            query(argv)
                .unwrap()
                .select(&bs, T)
                .iter()
                .map(|b| b.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&[
                "--internal",
                "100.64.0.10",
                "--from",
                "1793614447",
                "--to",
                "1793614448"
            ]),
            vec![1, 2, 3]
        );
        assert_eq!(
            ids(&[
                "--internal",
                "100.64.0.10:40000",
                "--from",
                "1793614447",
                "--to",
                "1793614448"
            ]),
            vec![1]
        );
        assert_eq!(
            ids(&[
                "--internal",
                "100.64.0.10:80",
                "--from",
                "1793614447",
                "--to",
                "1793614448"
            ]),
            vec![3]
        );
        assert_eq!(
            ids(&[
                "--internal",
                "100.64.0.11",
                "--from",
                "1793614447",
                "--to",
                "1793614448"
            ]),
            Vec::<u64>::new()
        );
        assert_eq!(
            ids(&[
                "--internal",
                "100.64.0.10",
                "--from",
                "1793614449",
                "--to",
                "1793614450"
            ]),
            Vec::<u64>::new()
        );
    }

    fn run_in(dir: &Path, argv: &[&str], now: i64) -> (anyhow::Result<Status>, String, String) {
        let mut full = vec!["nattrace-query", "--data-dir", dir.to_str().unwrap()];
        full.extend_from_slice(argv);
        let args = Cli::try_parse_from(full).unwrap().args;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = execute(&args, now, &mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn address_without_port_destination_and_combined_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_event(CoverageEvent::Attached {
            t_ns: T - 100 * S,
            backend: "ebpf".into(),
        });
        // Three subscribers share 203.0.113.7 at T; one of them reaches 198.51.100.20:443.
        for (id, port, sub, dst) in [
            (1, 40001, "100.64.0.1", "192.0.2.2"),
            (2, 40002, "100.64.0.2", "192.0.2.2"),
            (3, 40003, "100.64.0.3", "198.51.100.20"),
            (4, 40004, "100.64.0.3", "192.0.2.2"),
        ] {
            let mut b = binding(id, port, T - 5 * S, Some(T + 5 * S));
            b.orig.src = sub.parse().unwrap();
            b.orig.dst = dst.parse().unwrap();
            b.reply.src = b.orig.dst;
            w.append_binding(&b);
        }
        // Same address, another time: not in the window.
        w.append_binding(&binding(5, 40005, T - 100 * S, Some(T - 50 * S)));
        w.append_event(CoverageEvent::Detached { t_ns: T + 100 * S });
        w.close().unwrap();
        let ids = |out: &str| {
            out.lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap().parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        };
        let at = "2026-11-02T10:14:07Z";
        let (r, out, err) = run_in(
            dir.path(),
            &["--external", "203.0.113.7", "--at", at, "--format", "csv"],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(ids(&out), vec![1, 2, 3, 4]);
        assert_eq!(
            err,
            "nattrace: 203.0.113.7: 4 bindings of 3 subscribers (distinct internal addresses) in the window\n"
        );
        let (r, out, _) = run_in(
            dir.path(),
            &[
                "--external",
                "203.0.113.7",
                "--destination",
                "198.51.100.20:443",
                "--at",
                at,
                "--format",
                "csv",
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(ids(&out), vec![3]);
        let (r, out, err) = run_in(
            dir.path(),
            &[
                "--destination",
                "198.51.100.20",
                "--from",
                "2026-11-02T10:00:00Z",
                "--to",
                "2026-11-02T11:00:00Z",
                "--format",
                "csv",
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(ids(&out), vec![3]);
        assert!(!err.contains("subscribers"), "{err}");
        let (r, _, _) = run_in(
            dir.path(),
            &[
                "--internal",
                "100.64.0.3",
                "--destination",
                "192.0.2.2",
                "--at",
                at,
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
    }

    #[test]
    fn running_agent_covers_until_now() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_event(CoverageEvent::Attached {
            t_ns: T - 10 * S,
            backend: "ebpf".into(),
        });
        w.append_binding(&binding(1, 40123, T - 5 * S, None));
        w.append_event(CoverageEvent::Heartbeat { t_ns: T - S });
        w.flush().unwrap();
        let argv = [
            "--external",
            "203.0.113.7:40123",
            "--at",
            "1793614447",
            "--format",
            "csv",
        ];
        let (r, out, err) = run_in(dir.path(), &argv, T + 5 * S);
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(err, "");
        assert_eq!(out.lines().count(), 2);
        // Once the agent is gone without detaching, coverage ends at its last heartbeat.
        drop(w);
        let (r, _, err) = run_in(dir.path(), &argv, T + 5 * S);
        assert_eq!(r.unwrap(), Status::Ok);
        assert!(
            err.contains("not recording from 2026-11-02T10:14:06Z to 2026-11-02T10:14:09Z"),
            "{err}"
        );
    }

    #[test]
    fn end_to_end_statuses_warning_and_problems() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_event(CoverageEvent::AgentStart {
            t_ns: T - 100 * S,
            pid: 1,
        });
        w.append_event(CoverageEvent::Attached {
            t_ns: T - 100 * S,
            backend: "ebpf".into(),
        });
        w.append_binding(&binding(1, 40123, T - 5 * S, Some(T + 5 * S)));
        w.append_event(CoverageEvent::Detached { t_ns: T + S });
        w.close().unwrap();

        let (r, out, err) = run_in(
            dir.path(),
            &[
                "--external",
                "203.0.113.7:40123",
                "--at",
                "2026-11-02T10:14:07Z",
                "--format",
                "json",
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(out.lines().count(), 1);
        assert!(out.contains("\"id\":1"));
        assert_eq!(
            err,
            "nattrace: warning: 2026-11-02T10:14:05Z..2026-11-02T10:14:09Z is not fully covered by capture \
             (not recording from 2026-11-02T10:14:08Z to 2026-11-02T10:14:09Z)\n"
        );

        let (r, out, err) = run_in(
            dir.path(),
            &[
                "--external",
                "203.0.113.7:40124",
                "--at",
                "2026-11-02T10:13:07Z",
            ],
            T,
        );
        assert_eq!(r.unwrap(), Status::NoResults);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));

        // Corrupt the sealed segment's header: partial.
        let seg = dir.path().join("segments/00000001.seg");
        let mut data = std::fs::read(&seg).unwrap();
        data[40] ^= 0xff;
        std::fs::write(&seg, data).unwrap();
        let (r, _, err) = run_in(
            dir.path(),
            &[
                "--external",
                "203.0.113.7:40123",
                "--at",
                "2026-11-02T10:14:07Z",
            ],
            T,
        );
        assert_eq!(r.unwrap(), Status::Partial);
        assert!(
            err.starts_with(&format!(
                "nattrace: {}: offset 0: header checksum mismatch",
                seg.display()
            )),
            "{err}"
        );

        let (r, _, _) = run_in(
            &dir.path().join("missing"),
            &["--external", "203.0.113.7:40123", "--at", "0"],
            T,
        );
        let e = r.unwrap_err();
        let ue = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(ue.status, Status::BadInput);
        assert!(ue.message.starts_with("--data-dir: '"), "{}", ue.message);
    }

    /// A data dir with bindings 1 and 2 at T (both on 203.0.113.7, subscriber 100.64.0.1),
    /// its configuration `config`.
    fn audited_dir(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::config::CONFIG_FILE), config).unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_event(CoverageEvent::Attached {
            t_ns: T - 100 * S,
            backend: "ebpf".into(),
        });
        for (id, port) in [(1, 40001), (2, 40002)] {
            let mut b = binding(id, port, T - 5 * S, Some(T + 5 * S));
            b.orig.src = "100.64.0.1".parse().unwrap();
            w.append_binding(&b);
        }
        w.append_event(CoverageEvent::Detached { t_ns: T + 100 * S });
        w.close().unwrap();
        dir
    }

    fn audit_entries(dir: &Path) -> Vec<crate::audit::AuditEntry> {
        crate::audit::read_log(dir)
            .unwrap()
            .0
            .into_iter()
            .map(|l| l.entry.unwrap())
            .collect()
    }

    fn refusal(r: anyhow::Result<Status>) -> UserError {
        let e = r.unwrap_err();
        let ue = e.downcast_ref::<UserError>().unwrap();
        UserError {
            status: ue.status,
            message: ue.message.clone(),
        }
    }

    #[test]
    fn required_case_is_refused_without_case_and_recorded_with_it() {
        let dir = audited_dir("require_case = true\n");
        let argv = ["--internal", "100.64.0.1", "--at", "1793614447"];
        let (r, out, err) = run_in(dir.path(), &argv, T + 1000 * S);
        let e = refusal(r);
        assert_eq!(e.status, Status::BadInput);
        assert!(e.message.contains("requires a case id"), "{}", e.message);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
        assert!(audit_entries(dir.path()).is_empty());

        let mut with_case = argv.to_vec();
        with_case.extend(["--case", "CASE-17", "--format", "csv"]);
        let (r, out, _) = run_in(dir.path(), &with_case, T + 1000 * S);
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(out.lines().count(), 3);
        let entries = audit_entries(dir.path());
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].case.as_deref(), Some("CASE-17"));
        assert_eq!(entries[0].reason, None);
        assert_eq!(entries[0].command, "query");
    }

    #[test]
    fn long_window_needs_a_reason() {
        let dir = audited_dir("");
        let two_days = [
            "--internal",
            "100.64.0.1",
            "--from",
            "2026-11-01T10:00:00Z",
            "--to",
            "2026-11-03T10:00:00Z",
        ];
        let (r, out, err) = run_in(dir.path(), &two_days, T + 1000 * S);
        let e = refusal(r);
        assert_eq!(e.status, Status::BadInput);
        assert!(
            e.message.starts_with(
                "the window of 2days is longer than this data directory's limit of 1day"
            ),
            "{}",
            e.message
        );
        assert!(e.message.contains("--reason"), "{}", e.message);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
        // --at with --slack: twice the slack.
        let (r, _, _) = run_in(
            dir.path(),
            &[
                "--internal",
                "100.64.0.1",
                "--at",
                "1793614447",
                "--slack",
                "13h",
            ],
            T + 1000 * S,
        );
        assert!(
            refusal(r)
                .message
                .starts_with("the window of 1day 2h is longer")
        );
        let (r, _, _) = run_in(
            dir.path(),
            &[
                "--internal",
                "100.64.0.1",
                "--at",
                "1793614447",
                "--slack",
                "12h",
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert!(audit_entries(dir.path()).len() == 1);

        let mut with_reason = two_days.to_vec();
        with_reason.extend(["--reason", "abuse report 4711 spans two days"]);
        let (r, _, _) = run_in(dir.path(), &with_reason, T + 1000 * S);
        assert_eq!(r.unwrap(), Status::Ok);
        let entries = audit_entries(dir.path());
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1].reason.as_deref(),
            Some("abuse report 4711 spans two days")
        );
        assert_eq!(
            entries[1].query,
            "--internal 100.64.0.1 --from 2026-11-01T10:00:00.000000000Z \
             --to 2026-11-03T10:00:00.000000000Z"
        );

        // A data directory's own limit.
        let dir = audited_dir("max_window = \"1h\"\n");
        let (r, _, _) = run_in(
            dir.path(),
            &["--internal", "100.64.0.1", "--from", "0", "--to", "3601"],
            T,
        );
        assert!(
            refusal(r).message.starts_with(
                "the window of 1h 1s is longer than this data directory's limit of 1h"
            ),
        );
    }

    #[test]
    fn every_answer_is_audited_with_its_results_before_it_is_shown() {
        let dir = audited_dir("");
        let at = ["--at", "2026-11-02T10:14:07Z"];
        for (argv, results, status) in [
            (vec!["--external", "203.0.113.7"], 2, Status::Ok),
            (
                vec!["--external", "[2001:db8::1]:40001", "--proto", "udp"],
                0,
                Status::NoResults,
            ),
            (
                vec![
                    "--external",
                    "203.0.113.7:40002",
                    "--internal",
                    "100.64.0.1",
                ],
                1,
                Status::Ok,
            ),
        ] {
            let mut full = argv.clone();
            full.extend(at);
            let (r, _, _) = run_in(dir.path(), &full, T + 1000 * S);
            assert_eq!(r.unwrap(), status, "{argv:?}");
            let last = audit_entries(dir.path()).pop().unwrap();
            assert_eq!(last.results, results, "{argv:?}");
        }
        let entries = audit_entries(dir.path());
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            entries[1].query,
            "--external [2001:db8::1]:40001 --proto udp --from 2026-11-02T10:14:05.000000000Z \
             --to 2026-11-02T10:14:09.000000000Z"
        );
        assert_eq!(
            entries[2].query,
            "--external 203.0.113.7:40002 --internal 100.64.0.1 \
             --from 2026-11-02T10:14:05.000000000Z --to 2026-11-02T10:14:09.000000000Z"
        );
        assert!(crate::audit::verify(dir.path(), None).unwrap().is_intact());

        // When the entry cannot be written, nothing is shown.
        std::fs::remove_file(dir.path().join(crate::audit::AUDIT_LOG)).unwrap();
        std::fs::create_dir(dir.path().join(crate::audit::AUDIT_LOG)).unwrap();
        let (r, out, err) = run_in(
            dir.path(),
            &["--external", "203.0.113.7", "--at", "2026-11-02T10:14:07Z"],
            T + 1000 * S,
        );
        let e = refusal(r);
        assert_eq!(e.status, Status::Environment);
        assert!(
            e.message
                .ends_with("queries are refused when they cannot be audited"),
            "{}",
            e.message
        );
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
    }

    #[test]
    fn unreadable_signing_key_warns_and_records_unsigned() {
        let dir = audited_dir("sign_key = \"missing.key\"\n");
        let (r, out, err) = run_in(
            dir.path(),
            &[
                "--external",
                "203.0.113.7:40001",
                "--at",
                "2026-11-02T10:14:07Z",
                "--format",
                "csv",
            ],
            T + 1000 * S,
        );
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(out.lines().count(), 2);
        assert!(
            err.starts_with("nattrace: warning: cannot read the signing key ")
                && err.ends_with("audit entry 1 recorded without a signature\n")
                && err.lines().count() == 1,
            "{err}"
        );
    }
}
