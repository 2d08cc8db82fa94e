//! The sealed segment format (`storage::columnar`) on a synthetic CGNAT workload
//! (`tracer_user::workload`), each figure printed beside baselines measured in the same run:
//!
//! 1. **Size** per binding of our sealed segments, on a sample, for full records and for
//!    mapping-only records (RFC 6888: no destination, no counters), against zstd level 19 of
//!    (a) compact fixed-width binary rows in arrival order, (b) the same rows sorted as our
//!    segments are (external address, external port, start), (c) CSV of the same records.
//! 2. **Per-column cost** of our format: stored and raw bytes per binding and the order-0
//!    (byte) entropy of each raw column, in bits per binding.
//! 3. **Ingest** on one core: encode + compress + write + fsync of sealed segments, against
//!    writing compact rows through a zstd level 3 stream (+ fsync).
//! 4. **Point query** "who held external address:port at T" over a data directory of
//!    `--bindings` bindings written as segments, warm and cold page cache, against a scan
//!    that decodes every block of every segment.
//!
//! Run: `cargo bench -p tracer-user --bench segment_format -- [--bindings N] [--sample N]
//! [--dir DIR] [--smoke] [--queries N] [--cold N] [--scans N] [--seed N] [--public-ips N]
//! [--only size,ingest,query] [--keep]` (`--help` explains them). `--smoke` is the CI size; the default size (100M bindings, 2M
//! sample) takes a long time and ~2 GB of disk. Data goes to a temporary directory under
//! `--dir` (default `/var/tmp`), removed at the end unless `--keep`. Cold queries drop the
//! page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`) before each, so they need root and
//! are skipped otherwise. A wrong query answer fails the bench (exit status 1); a missed
//! goal is only reported.
//!
//! **Compact row** (the binary baselines): fields back to back, no padding, integers
//! little-endian, addresses in network byte order (4 bytes for IPv4, 16 for IPv6; the
//! workload is IPv4):
//!
//! ```text
//! full records (67 bytes for IPv4)         mapping-only (29 bytes for IPv4)
//!   proto            u8                      proto            u8
//!   internal ip      4 | 16 bytes            internal ip      4 | 16 bytes
//!   internal port    u16                     internal port    u16
//!   external ip      4 | 16 bytes            external ip      4 | 16 bytes
//!   external port    u16                     external port    u16
//!   destination ip   4 | 16 bytes            start            i64 ms since the epoch
//!   destination port u16                     end              i64 ms since the epoch
//!   start            i64 ms since the epoch
//!   end              i64 ms since the epoch
//!   packets_out      u64
//!   bytes_out        u64
//!   packets_in       u64
//!   bytes_in         u64
//! ```
//!
//! Mapping-only rows leave out destination and counters, which such records do not have.
//! Baselines are compressed in independent chunks of at most 64 MiB (whole rows or lines),
//! zstd level 19, single-threaded. CSV: header `proto,internal_ip,internal_port,external_ip,
//! external_port,destination_ip,destination_port,start,end,packets_out,bytes_out,packets_in,
//! bytes_in`, proto by name, RFC 3339 UTC times with milliseconds, empty fields for what a
//! mapping-only record lacks.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat};
use tracer_user::binding::{Binding, proto_name};
use tracer_user::storage::columnar::{
    self, BLOCK_HEADER_LEN, BLOCK_ROWS, COLUMN_ENTRY_LEN, FENCE_LEN, FileReader, ReadAt, Row,
    SealedSegment, SegmentHeader, ZSTD_LEVEL, col,
};
use tracer_user::storage::merkle::Hash;
use tracer_user::storage::{SEALED_EXT, SEGMENTS_DIR};
use tracer_user::workload::{Rng, Workload, WorkloadConfig};

// The point query goes through the real engine, at one call site (`query_once`).
use tracer_user::storage::{Search, Snapshot as Found, search};
// Evidence export and offline verification, as `nattrace export` and `verify BUNDLE` run them.
use tracer_user::cliparse::format_endpoint;
use tracer_user::evidence::check::verify_bundle;
use tracer_user::evidence::export::{ExportArgs, export};
use tracer_user::query::Question;
use tracer_user::signing::{SignerKey, write_key_pair};

/// Point questions also exported as evidence bundles.
const EXPORTS: usize = 20;
/// Rows per segment, as the agent splits them.
const SEGMENT_ROWS: usize = 1 << 21;
/// Largest chunk a baseline is compressed in.
const CHUNK_BYTES: usize = 64 << 20;
/// zstd level of the size baselines.
const BASELINE_LEVEL: i32 = 19;
/// zstd level of the ingest baseline.
const INGEST_BASELINE_LEVEL: i32 = 3;
/// Writer id of the benchmark's segments.
const WRITER_ID: [u8; 16] = *b"nattrace-bench-1";
/// Size goals: ours against the better of (a)/(b).
const GOAL_FULL: f64 = 1.8;
const GOAL_MAPPING: f64 = 2.2;
/// Ingest goal, bindings per second on one core.
const GOAL_INGEST: f64 = 2e6;

#[derive(Clone, Debug)]
struct Args {
    bindings: u64,
    sample: usize,
    dir: PathBuf,
    smoke: bool,
    queries: usize,
    cold: usize,
    scans: usize,
    seed: u64,
    keep: bool,
    public_ips: u32,
    /// Sections to run: size (with the per-column table), ingest, query.
    only: Vec<String>,
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

const USAGE: &str = "usage: cargo bench -p tracer-user --bench segment_format -- [options]
  --bindings N  bindings in the point-query data directory (default 100M; smoke 200k)
  --sample N    bindings of the size and ingest sample (default 2M; smoke 20k)
  --dir DIR     where the temporary data directory goes (default /var/tmp)
  --smoke       small sizes for CI
  --queries N   warm point queries (default 2000; smoke 20)
  --cold N      cold point queries, root only (default 150; smoke 5)
  --scans N     full-scan baseline queries (default 5; smoke 3)
  --seed N      workload seed (default 1)
  --public-ips N  public addresses of the workload (default 8)
  --only LIST   run only these sections, comma-separated: size, ingest, query
  --keep        keep the data directory
Numbers take a k, M or G suffix (powers of ten) and underscores.";

fn parse_num(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    let s = v.replace('_', "");
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('M') => (&s[..s.len() - 1], 1_000_000),
        Some('G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (&s[..], 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{flag}: {v:?} is not a number"))
}

fn parse_args() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let (mut bindings, mut sample, mut queries, mut cold, mut scans) =
        (None, None, None, None, None);
    let (mut dir, mut smoke, mut seed, mut keep) = (PathBuf::from("/var/tmp"), false, 1, false);
    let (mut public_ips, mut only) = (WorkloadConfig::default().public_ips, Vec::new());
    while let Some(a) = raw.next() {
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--smoke" => smoke = true,
            "--keep" => keep = true,
            "--bindings" => bindings = Some(parse_num(&a, raw.next())?),
            "--sample" => sample = Some(parse_num(&a, raw.next())? as usize),
            "--queries" => queries = Some(parse_num(&a, raw.next())? as usize),
            "--cold" => cold = Some(parse_num(&a, raw.next())? as usize),
            "--scans" => scans = Some(parse_num(&a, raw.next())? as usize),
            "--seed" => seed = parse_num(&a, raw.next())?,
            "--dir" => dir = PathBuf::from(raw.next().ok_or("--dir needs a value")?),
            "--public-ips" => {
                public_ips = u32::try_from(parse_num(&a, raw.next())?)
                    .ok()
                    .filter(|n| (1..=254).contains(n))
                    .ok_or("--public-ips must be 1 to 254")?;
            }
            "--only" => {
                let list = raw.next().ok_or("--only needs a value")?;
                for s in list.split(',') {
                    if !["size", "ingest", "query"].contains(&s) {
                        return Err(format!(
                            "--only: unknown section {s:?} (size, ingest, query)"
                        ));
                    }
                    only.push(s.to_owned());
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let args = Args {
        bindings: bindings.unwrap_or(if smoke { 200_000 } else { 100_000_000 }),
        sample: sample.unwrap_or(if smoke { 20_000 } else { 2_000_000 }),
        dir,
        smoke,
        queries: queries.unwrap_or(if smoke { 20 } else { 2000 }),
        cold: cold.unwrap_or(if smoke { 5 } else { 150 }),
        scans: scans.unwrap_or(if smoke { 3 } else { 5 }),
        seed,
        keep,
        public_ips,
        only,
    };
    if args.bindings == 0 || args.sample == 0 || args.queries == 0 {
        return Err("--bindings, --sample and --queries must be positive".to_owned());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("segment_format: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segment_format: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workload_config(args: &Args, full: bool) -> WorkloadConfig {
    WorkloadConfig {
        seed: args.seed,
        full_records: full,
        public_ips: args.public_ips,
        ..WorkloadConfig::default()
    }
}

fn run(args: &Args) -> Result<(), String> {
    let root = is_root();
    let tmp = tempfile::Builder::new()
        .prefix("nattrace-bench-")
        .tempdir_in(&args.dir)
        .map_err(|e| format!("cannot create a directory in {}: {e}", args.dir.display()))?;
    let work = tmp.path().to_owned();
    let argv: Vec<String> = std::env::args().collect();
    let user_args: Vec<&str> = argv
        .iter()
        .skip(1)
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let cfg = workload_config(args, true);
    println!("nattrace sealed segment format benchmark");
    println!(
        "command:    cargo bench -p tracer-user --bench segment_format -- {}",
        user_args.join(" ")
    );
    println!("argv:       {}", argv.join(" "));
    println!(
        "parameters: bindings={} sample={} queries={} cold={} scans={} seed={} smoke={} dir={}{}",
        args.bindings,
        args.sample,
        args.queries,
        if root { args.cold } else { 0 },
        args.scans,
        args.seed,
        args.smoke,
        work.display(),
        if args.keep {
            " (kept)"
        } else {
            " (removed at the end)"
        },
    );
    println!(
        "workload:   subscribers={} public_ips={} mean_rate={}/s diurnal peak/trough={} destinations={} zipf_s={} keep_port_share={} reuse_guard={} ms start={}",
        cfg.subscribers,
        cfg.public_ips,
        cfg.mean_rate,
        cfg.diurnal_peak_to_trough,
        cfg.destinations,
        cfg.zipf_s,
        cfg.keep_port_share,
        cfg.reuse_guard_ms,
        rfc3339(cfg.start_ns),
    );
    println!(
        "codec:      blocks of {BLOCK_ROWS} rows, segments of up to {SEGMENT_ROWS} rows, column zstd level {ZSTD_LEVEL}; baselines zstd level {BASELINE_LEVEL} in chunks of up to {} MiB, single-threaded",
        CHUNK_BYTES >> 20
    );
    println!(
        "machine:    {} cores, {}, load average {} at start (timings are wall clock; ingest also gives CPU time)",
        std::thread::available_parallelism().map_or(0, usize::from),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".to_owned(), |s| format!("Linux {}", s.trim())),
        load_average(),
    );

    if !args.only.is_empty() {
        println!("sections:   {}", args.only.join(", "));
    }

    let mut goals: Vec<String> = Vec::new();
    let need_sample = args.runs("size") || args.runs("ingest");
    let full = if need_sample {
        sample(args, true)
    } else {
        Vec::new()
    };
    // 1 and 2: size and per-column cost.
    if args.runs("size") {
        let mapping = sample(args, false);
        println!();
        println!(
            "== 1. Size: sample of {} bindings (the stream's first ones, {} of traffic)",
            args.sample,
            span(&full)
        );
        println!(
            "   workload: {:.1} % of bindings kept their internal port, {} sessions dropped for want of a port, {} subscribers, {} destinations",
            100.0
                * full
                    .iter()
                    .filter(|b| b.internal().1 == b.external().1)
                    .count() as f64
                / full.len() as f64,
            dropped(args),
            distinct(full.iter().map(|b| b.internal().0)),
            distinct(full.iter().map(|b| b.destination().0)),
        );
        let full_size = size_report("full records", &full, true);
        let map_size = size_report("mapping-only", &mapping, false);
        println!();
        println!(
            "== 2. Per-column cost of our format (sample above; stored = as written, raw = before zstd, H0 = order-0 byte entropy of each block's raw column, summed)"
        );
        column_report(&full_size, &map_size);
        for (what, r, goal) in [
            ("full records", &full_size, GOAL_FULL),
            ("mapping-only", &map_size, GOAL_MAPPING),
        ] {
            goals.push(format!(
                "size, {what:<13} {:>6.2} B/binding, {:.2}x smaller than the better binary baseline (goal >= {goal}x): {}",
                r.ours as f64 / r.rows as f64,
                r.ratio(),
                met(r.ratio() >= goal)
            ));
        }
    }

    // 3. Ingest.
    if args.runs("ingest") {
        println!();
        let rate = ingest_report(&full, &work)?;
        goals.push(format!(
            "ingest, full records   {:.2} M bindings/s per core (goal >= {:.1} M): {}",
            rate / 1e6,
            GOAL_INGEST / 1e6,
            met(rate >= GOAL_INGEST)
        ));
    }
    drop(full);

    // 4. Point queries.
    if args.runs("query") {
        println!();
        goals.push(query_report(args, root, &work)?);
    }

    println!();
    println!("summary:");
    for g in &goals {
        println!("  {g}");
    }
    if args.keep {
        let kept = tmp.keep();
        println!("data kept in {}", kept.display());
    }
    Ok(())
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn sample(args: &Args, full: bool) -> Vec<Binding> {
    Workload::new(workload_config(args, full))
        .take(args.sample)
        .collect()
}

fn dropped(args: &Args) -> u64 {
    let mut w = Workload::new(workload_config(args, false));
    w.by_ref().take(args.sample).for_each(drop);
    w.stats().dropped
}

fn distinct(it: impl Iterator<Item = IpAddr>) -> usize {
    let mut v: Vec<IpAddr> = it.collect();
    v.sort_unstable();
    v.dedup();
    v.len()
}

fn span(b: &[Binding]) -> String {
    let s = b.last().map_or(0, |l| l.start_ns) - b.first().map_or(0, |f| f.start_ns);
    human_duration(Duration::from_nanos(s.max(0) as u64))
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn rfc3339(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------------------
// Our segments
// ---------------------------------------------------------------------------------------

/// Encodes consecutive bindings (in start order) as the next segment of a chain.
struct Chain {
    seq: u32,
    prev_root: Hash,
}

impl Chain {
    fn new() -> Self {
        Self {
            seq: 0,
            prev_root: [0; 32],
        }
    }

    fn header(&mut self, rows: &[Row]) -> SegmentHeader {
        self.seq += 1;
        SegmentHeader {
            seq: self.seq,
            writer_id: WRITER_ID,
            prev_seq: self.seq - 1,
            prev_root: self.prev_root,
            window_start_ns: rows.first().map_or(0, |r| r.binding.start_ns),
            window_end_ns: rows.last().map_or(0, |r| r.binding.start_ns),
        }
    }

    fn encode(&mut self, rows: Vec<Row>) -> Vec<u8> {
        let header = self.header(&rows);
        let (bytes, root) = columnar::encode_segment(&header, rows, &[]);
        self.prev_root = root;
        bytes
    }
}

impl Chain {
    /// The next segment of the chain for `rows` over `window` (start, end).
    fn encode_window(&mut self, rows: Vec<Row>, window: (i64, i64)) -> Vec<u8> {
        self.seq += 1;
        let header = SegmentHeader {
            seq: self.seq,
            writer_id: WRITER_ID,
            prev_seq: self.seq - 1,
            prev_root: self.prev_root,
            window_start_ns: window.0,
            window_end_ns: window.1,
        };
        let (bytes, root) = columnar::encode_segment(&header, rows, &[]);
        self.prev_root = root;
        bytes
    }
}

/// Cuts a stream of finished bindings (in start order) into segments as the agent would
/// have written them: windows of an hour (or [`SEGMENT_ROWS`] rows), bindings alive at a
/// window's end stored open and carried into the next window.
#[derive(Default)]
struct AgentLayout {
    window_start: Option<i64>,
    /// Final state of every binding in the current window, and whether it was carried in.
    batch: Vec<(Binding, bool)>,
}

impl AgentLayout {
    const WINDOW_NS: i64 = 3600 * 1_000_000_000;

    /// Adds `b`; returns the rows and window of a segment that closed before it.
    fn push(&mut self, b: Binding) -> Option<(Vec<Row>, (i64, i64))> {
        let start = *self.window_start.get_or_insert(b.start_ns);
        let closed = (b.start_ns >= start + Self::WINDOW_NS || self.batch.len() >= SEGMENT_ROWS)
            .then(|| self.close(b.start_ns));
        self.batch.push((b, false));
        closed
    }

    /// Closes the window at `end`: rows as stored, and the survivors carried on.
    fn close(&mut self, end: i64) -> (Vec<Row>, (i64, i64)) {
        let start = self.window_start.replace(end).unwrap_or(end);
        let batch = std::mem::take(&mut self.batch);
        let mut rows = Vec::with_capacity(batch.len());
        for (b, carried) in batch {
            let alive = b.end_ns.is_none_or(|e| e > end);
            let mut stored = b.clone();
            if alive {
                stored.end_ns = None;
                stored.orig_counters = None;
                stored.reply_counters = None;
                self.batch.push((b, true));
            }
            rows.push(Row {
                binding: stored,
                carried,
            });
        }
        (rows, (start, end))
    }

    /// The last window, closed after its last end.
    fn finish(mut self) -> (Vec<Row>, (i64, i64)) {
        let end = self
            .batch
            .iter()
            .map(|(b, _)| b.end_ns.unwrap_or(b.start_ns))
            .max()
            .unwrap_or(0);
        let start = self.window_start.unwrap_or(end);
        let rows = std::mem::take(&mut self.batch)
            .into_iter()
            .map(|(binding, carried)| Row { binding, carried })
            .collect();
        (rows, (start, end))
    }
}

fn rows(b: &[Binding]) -> Vec<Row> {
    b.iter()
        .map(|b| Row {
            binding: b.clone(),
            carried: false,
        })
        .collect()
}

fn segment_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(SEGMENTS_DIR)
        .join(format!("{seq:08}.{SEALED_EXT}"))
}

// ---------------------------------------------------------------------------------------
// 1. Size
// ---------------------------------------------------------------------------------------

/// Sizes of one sample and the per-column accounting of our segments.
struct SizeResult {
    rows: u64,
    ours: u64,
    compact_arrival: u64,
    compact_sorted: u64,
    columns: ColumnStats,
}

impl SizeResult {
    fn ratio(&self) -> f64 {
        self.compact_arrival.min(self.compact_sorted) as f64 / self.ours as f64
    }
}

#[derive(Default)]
struct ColumnStats {
    stored: Vec<u64>,
    raw: Vec<u64>,
    entropy_bits: Vec<f64>,
    /// Block headers and column directories.
    block_headers: u64,
    fences: u64,
    ext_filter: u64,
    int_filter: u64,
    /// Segment header, summary, trailer and the (empty) events section.
    other: u64,
    blocks: u64,
    segments: u64,
}

fn compact_width(b: &Binding, full: bool) -> usize {
    let a = |ip: IpAddr| if ip.is_ipv4() { 4 } else { 16 };
    let base = 1 + a(b.internal().0) + 2 + a(b.external().0) + 2 + 16;
    if full {
        base + a(b.destination().0) + 2 + 32
    } else {
        base
    }
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v) => out.extend_from_slice(&v.octets()),
        IpAddr::V6(v) => out.extend_from_slice(&v.octets()),
    }
}

/// Appends the compact row of `b` (see the module documentation).
fn compact_row(out: &mut Vec<u8>, b: &Binding, full: bool) {
    const MS: i64 = 1_000_000;
    let (ip, port) = b.internal();
    out.push(b.proto);
    put_ip(out, ip);
    out.extend_from_slice(&port.to_le_bytes());
    let (ip, port) = b.external();
    put_ip(out, ip);
    out.extend_from_slice(&port.to_le_bytes());
    if full {
        let (ip, port) = b.destination();
        put_ip(out, ip);
        out.extend_from_slice(&port.to_le_bytes());
    }
    out.extend_from_slice(&b.start_ns.div_euclid(MS).to_le_bytes());
    out.extend_from_slice(
        &b.end_ns
            .map_or(i64::MIN, |e| e.div_euclid(MS))
            .to_le_bytes(),
    );
    if full {
        let o = b.orig_counters.unwrap_or_default();
        let r = b.reply_counters.unwrap_or_default();
        for v in [o.packets, o.bytes, r.packets, r.bytes] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn csv_line(out: &mut String, b: &Binding, full: bool) {
    let proto = proto_name(b.proto).map_or_else(|| b.proto.to_string(), str::to_owned);
    let (iip, iport) = b.internal();
    let (eip, eport) = b.external();
    let _ = write!(out, "{proto},{iip},{iport},{eip},{eport},");
    if full {
        let (dip, dport) = b.destination();
        let _ = write!(out, "{dip},{dport},");
    } else {
        out.push_str(",,");
    }
    let _ = write!(out, "{},", rfc3339(b.start_ns));
    if let Some(e) = b.end_ns {
        out.push_str(&rfc3339(e));
    }
    match (full, b.orig_counters, b.reply_counters) {
        (true, Some(o), Some(r)) => {
            let _ = writeln!(out, ",{},{},{},{}", o.packets, o.bytes, r.packets, r.bytes);
        }
        _ => out.push_str(",,,,\n"),
    }
}

/// zstd level 19 of `data` in independent chunks of at most [`CHUNK_BYTES`], cut after a
/// `unit`-byte row or, with `unit == 0`, after a newline.
fn zstd19_chunked(data: &[u8], unit: usize) -> u64 {
    let mut c = zstd::bulk::Compressor::new(BASELINE_LEVEL).expect("zstd context");
    let mut total = 0u64;
    let mut rest = data;
    while !rest.is_empty() {
        let mut cut = rest.len().min(CHUNK_BYTES);
        if cut < rest.len() {
            // Whole rows, or (unit 0) whole lines.
            cut = match cut.checked_div(unit) {
                Some(rows) => rows * unit,
                None => rest[..cut]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(cut, |i| i + 1),
            };
        }
        total += c
            .compress(&rest[..cut])
            .expect("zstd compresses in memory")
            .len() as u64;
        rest = &rest[cut..];
    }
    total
}

fn size_report(label: &str, bindings: &[Binding], full: bool) -> SizeResult {
    let n = bindings.len() as u64;
    let per = |b: u64| b as f64 / n as f64;
    // Ours.
    let t = Instant::now();
    let mut chain = Chain::new();
    let segments: Vec<Vec<u8>> = bindings
        .chunks(SEGMENT_ROWS)
        .map(|c| chain.encode(rows(c)))
        .collect();
    let ours: u64 = segments.iter().map(|s| s.len() as u64).sum();
    let ours_time = t.elapsed();
    let columns = column_stats(&segments);
    // (a), (b): compact rows.
    let width = compact_width(&bindings[0], full);
    let mut arrival = Vec::with_capacity(bindings.len() * width);
    for b in bindings {
        compact_row(&mut arrival, b, full);
    }
    let mut sorted_refs: Vec<&Binding> = bindings.iter().collect();
    sorted_refs.sort_by(|a, b| columnar::row_order(a, b));
    let mut sorted = Vec::with_capacity(arrival.len());
    for b in sorted_refs {
        compact_row(&mut sorted, b, full);
    }
    let t = Instant::now();
    let a = zstd19_chunked(&arrival, width);
    let b = zstd19_chunked(&sorted, width);
    let compact_time = t.elapsed() / 2;
    // (c): CSV.
    let mut csv = String::from(
        "proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,end,packets_out,bytes_out,packets_in,bytes_in\n",
    );
    for b in bindings {
        csv_line(&mut csv, b, full);
    }
    let t = Instant::now();
    let c = zstd19_chunked(csv.as_bytes(), 0);
    let csv_time = t.elapsed();
    let best = a.min(b);
    println!("{label}:");
    println!(
        "  ours, sealed segments                               {:>7.2} B/binding  ({} bytes, {} segment(s), {} blocks, encoded in {:.2} s)",
        per(ours),
        ours,
        segments.len(),
        columns.blocks,
        ours_time.as_secs_f64()
    );
    println!(
        "  (a) compact rows ({width} B), arrival order, zstd-19   {:>7.2} B/binding  ours is {:.2}x smaller  ({:.1} s per pass)",
        per(a),
        a as f64 / ours as f64,
        compact_time.as_secs_f64()
    );
    println!(
        "  (b) compact rows ({width} B), our order, zstd-19       {:>7.2} B/binding  ours is {:.2}x smaller",
        per(b),
        b as f64 / ours as f64
    );
    println!(
        "  (c) CSV ({:.1} B/line), zstd-19                      {:>7.2} B/binding  ours is {:.2}x smaller  ({:.1} s)",
        per(csv.len() as u64),
        per(c),
        c as f64 / ours as f64,
        csv_time.as_secs_f64()
    );
    let goal = if full { GOAL_FULL } else { GOAL_MAPPING };
    let ratio = best as f64 / ours as f64;
    println!(
        "  ours vs the better of (a)/(b) = {}: {ratio:.2}x (goal >= {goal}x: {})",
        if a <= b { "(a)" } else { "(b)" },
        met(ratio >= goal)
    );
    SizeResult {
        rows: n,
        ours,
        compact_arrival: a,
        compact_sorted: b,
        columns,
    }
}

// ---------------------------------------------------------------------------------------
// 2. Per-column cost
// ---------------------------------------------------------------------------------------

fn entropy_bits(hist: &[u64; 256]) -> f64 {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let nf = n as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / nf;
            -(c as f64) * p.log2()
        })
        .sum()
}

fn column_stats(segments: &[Vec<u8>]) -> ColumnStats {
    let ncol = usize::from(col::COUNT) + 1;
    let mut s = ColumnStats {
        stored: vec![0; ncol],
        raw: vec![0; ncol],
        entropy_bits: vec![0.0; ncol],
        ..ColumnStats::default()
    };
    for seg in segments {
        let sealed = SealedSegment::open(seg).expect("our segment opens");
        let fences = sealed.fences(seg).expect("fences");
        s.segments += 1;
        s.fences += (fences.len() * FENCE_LEN) as u64;
        s.ext_filter += u64::from(sealed.summary.ext_filter.len);
        s.int_filter += u64::from(sealed.summary.int_filter.len);
        let mut blocks_len = 0u64;
        for f in &fences {
            let bytes = seg
                .read_at(f.block.offset, f.block.len as usize)
                .expect("block in bounds");
            blocks_len += bytes.len() as u64;
            let c = columnar::block_columns(&bytes).expect("block decodes");
            s.blocks += 1;
            let present = (1..ncol).filter(|&id| c.stored_len[id] > 0).count();
            s.block_headers += (BLOCK_HEADER_LEN + present * COLUMN_ENTRY_LEN) as u64;
            for id in 1..ncol {
                s.stored[id] += c.stored_len[id] as u64;
                s.raw[id] += c.raw[id].len() as u64;
                let mut hist = [0u64; 256];
                for &b in &c.raw[id] {
                    hist[usize::from(b)] += 1;
                }
                s.entropy_bits[id] += entropy_bits(&hist);
            }
        }
        let sections = (fences.len() * FENCE_LEN) as u64
            + u64::from(sealed.summary.ext_filter.len)
            + u64::from(sealed.summary.int_filter.len);
        s.other += seg.len() as u64 - blocks_len - sections;
    }
    s
}

fn column_report(full: &SizeResult, map: &SizeResult) {
    println!(
        "  {:<22} {:>9} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>9} {:>7}",
        "column (B/binding)",
        "stored",
        "raw",
        "H0 bits",
        "share",
        "stored",
        "raw",
        "H0 bits",
        "share"
    );
    println!(
        "  {:<22} {:-^40}   {:-^40}",
        "", " full records ", " mapping-only "
    );
    let cell = |r: &SizeResult, id: usize| {
        let n = r.rows as f64;
        let c = &r.columns;
        if c.raw[id] == 0 {
            format!("{:>9} {:>9} {:>9} {:>7}", "-", "-", "-", "-")
        } else {
            format!(
                "{:>9.3} {:>9.3} {:>9.2} {:>6.1}%",
                c.stored[id] as f64 / n,
                c.raw[id] as f64 / n,
                c.entropy_bits[id] / n,
                100.0 * c.stored[id] as f64 / r.ours as f64
            )
        }
    };
    for id in 1..=usize::from(col::COUNT) {
        if full.columns.raw[id] == 0 && map.columns.raw[id] == 0 {
            continue;
        }
        println!(
            "  {:<22} {}   {}",
            columnar::column_name(id as u8),
            cell(full, id),
            cell(map, id)
        );
    }
    let extra = |r: &SizeResult, v: u64| {
        format!(
            "{:>9.3} {:>9} {:>9} {:>6.1}%",
            v as f64 / r.rows as f64,
            "",
            "",
            100.0 * v as f64 / r.ours as f64
        )
    };
    type Pick = fn(&ColumnStats) -> u64;
    let rows: [(&str, Pick); 5] = [
        ("(block headers+dirs)", |c| c.block_headers),
        ("(fences)", |c| c.fences),
        ("(ext filter)", |c| c.ext_filter),
        ("(int filter)", |c| c.int_filter),
        ("(header, footer, ev.)", |c| c.other),
    ];
    for (name, f) in rows {
        println!(
            "  {:<22} {}   {}",
            name,
            extra(full, f(&full.columns)),
            extra(map, f(&map.columns))
        );
    }
    println!(
        "  {:<22} {}   {}",
        "total",
        extra(full, full.ours),
        extra(map, map.ours)
    );
}

// ---------------------------------------------------------------------------------------
// 3. Ingest
// ---------------------------------------------------------------------------------------

/// Returns our ingest rate (bindings per CPU second).
fn ingest_report(bindings: &[Binding], work: &Path) -> Result<f64, String> {
    let dir = work.join("ingest");
    fs::create_dir_all(dir.join(SEGMENTS_DIR))
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let n = bindings.len() as f64;
    println!(
        "== 3. Ingest on one core: {} full-record bindings generated beforehand, timing encode + compress + write + fsync",
        bindings.len()
    );
    // Ours: the rows are prepared before the clock starts; encode_segment sorts them.
    let prepared: Vec<Vec<Row>> = bindings.chunks(SEGMENT_ROWS).map(rows).collect();
    let mut chain = Chain::new();
    let mut written = 0u64;
    let (t, c) = (Instant::now(), thread_cpu());
    for r in prepared {
        let bytes = chain.encode(r);
        let path = segment_path(&dir, chain.seq);
        let mut f = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        f.write_all(&bytes)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        f.sync_all()
            .map_err(|e| format!("fsync {}: {e}", path.display()))?;
        written += bytes.len() as u64;
    }
    let (ours, ours_cpu) = (t.elapsed(), thread_cpu() - c);
    // Baseline: compact rows through a zstd level 3 stream.
    let path = dir.join("baseline.zst");
    let (t, c) = (Instant::now(), thread_cpu());
    let f = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut z = zstd::stream::Encoder::new(f, INGEST_BASELINE_LEVEL).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1 << 20);
    for chunk in bindings.chunks(8192) {
        buf.clear();
        for b in chunk {
            compact_row(&mut buf, b, true);
        }
        z.write_all(&buf)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let f = z
        .finish()
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    let (base, base_cpu) = (t.elapsed(), thread_cpu() - c);
    let base_len = fs::metadata(&path).map_or(0, |m| m.len());
    let rate = |d: Duration| n / d.as_secs_f64() / 1e6;
    println!(
        "  {:<58} {:>6.2} M bindings/s wall, {:>6.2} M/s CPU  ({:.2} s wall, {:.2} s CPU, {:.2} B/binding)",
        format!("ours: sealed segments (sort, columns, zstd-{ZSTD_LEVEL}, filters, Merkle)"),
        rate(ours),
        rate(ours_cpu),
        ours.as_secs_f64(),
        ours_cpu.as_secs_f64(),
        written as f64 / n
    );
    println!(
        "  {:<58} {:>6.2} M bindings/s wall, {:>6.2} M/s CPU  ({:.2} s wall, {:.2} s CPU, {:.2} B/binding)",
        format!(
            "baseline: {}-byte compact rows -> zstd-{INGEST_BASELINE_LEVEL} stream -> file",
            compact_width(&bindings[0], true)
        ),
        rate(base),
        rate(base_cpu),
        base.as_secs_f64(),
        base_cpu.as_secs_f64(),
        base_len as f64 / n,
    );
    println!(
        "  ours runs at {:.2}x the baseline's speed (CPU); goal >= {:.1} M bindings/s per core (CPU time of the writing thread, fsync wait excluded): {}",
        rate(ours_cpu) / rate(base_cpu),
        GOAL_INGEST / 1e6,
        met(rate(ours_cpu) * 1e6 >= GOAL_INGEST)
    );
    fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    Ok(rate(ours_cpu) * 1e6)
}

// ---------------------------------------------------------------------------------------
// 4. Point queries
// ---------------------------------------------------------------------------------------

/// A binding known to be in the data directory, and a time inside it.
#[derive(Clone, Copy, Debug)]
struct Known {
    id: u64,
    external: (IpAddr, u16),
    at_ns: i64,
}

/// Returns the summary line.
fn query_report(args: &Args, root: bool, work: &Path) -> Result<String, String> {
    let dir = work.join("data");
    fs::create_dir_all(dir.join(SEGMENTS_DIR))
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    println!(
        "== 4. Point query over {} full-record bindings in {}",
        args.bindings,
        dir.display()
    );
    // Write the data directory while generating; keep a reservoir of known bindings.
    let want = args.queries + args.cold + args.scans;
    let mut reservoir: Vec<Known> = Vec::with_capacity(want);
    let mut rng = Rng::new(args.seed ^ 0x5EED_0F0B_E5E5);
    let mut chain = Chain::new();
    // Laid out as the agent writes: a segment per hour of traffic (or 2^21 rows); a binding
    // still open when its segment closes is stored open there and carried into the next
    // segments until the one in whose window it ends.
    let mut layout = AgentLayout::default();
    let (mut bytes, mut first, mut last) = (0u64, i64::MAX, i64::MIN);
    let t = Instant::now();
    let flush = |rows: Vec<Row>, window: (i64, i64), chain: &mut Chain| -> Result<u64, String> {
        let seg = chain.encode_window(rows, window);
        let path = segment_path(&dir, chain.seq);
        fs::write(&path, &seg).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(seg.len() as u64)
    };
    for (i, b) in Workload::new(workload_config(args, true))
        .take(args.bindings as usize)
        .enumerate()
    {
        let end = b.end_ns.expect("finished");
        first = first.min(b.start_ns);
        last = last.max(b.start_ns);
        let slot = if reservoir.len() < want {
            Some(reservoir.len())
        } else {
            let j = rng.below(i as u64 + 1) as usize;
            (j < want).then_some(j)
        };
        if let Some(j) = slot {
            let k = Known {
                id: b.id,
                external: b.external(),
                at_ns: b.start_ns + rng.below((end - b.start_ns) as u64 + 1) as i64,
            };
            if j == reservoir.len() {
                reservoir.push(k);
            } else {
                reservoir[j] = k;
            }
        }
        if let Some((rows, window)) = layout.push(b) {
            bytes += flush(rows, window, &mut chain)?;
        }
    }
    let (rows, window) = layout.finish();
    bytes += flush(rows, window, &mut chain)?;
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let gen_time = t.elapsed();
    println!(
        "  data: {} segments, {} bytes ({:.2} B/binding), {} of traffic (first to last start); generated and written in {:.1} s",
        chain.seq,
        bytes,
        bytes as f64 / args.bindings as f64,
        human_duration(Duration::from_nanos((last - first).max(0) as u64)),
        gen_time.as_secs_f64()
    );
    // Shuffle so warm, cold and scan queries are independent draws.
    for i in (1..reservoir.len()).rev() {
        reservoir.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let warm_set = &reservoir[..args.queries.min(reservoir.len())];
    let rest = &reservoir[warm_set.len()..];
    let cold_set = &rest[..args.cold.min(rest.len())];
    let scan_set = &rest[cold_set.len()..];

    // Warm: each query once to cache what it touches, then timed.
    let mut warm = Vec::with_capacity(warm_set.len());
    let mut blocks = 0u64;
    let io0 = proc_io();
    for k in warm_set {
        query_once(&dir, k)?;
        let (d, found) = query_once(&dir, k)?;
        warm.push(d);
        blocks += found.blocks_read;
    }
    let io1 = proc_io();
    let warm_reads = (io1.0 - io0.0) as f64 / (2 * warm_set.len()) as f64;
    let (warm50, warm99) = (pct(&mut warm, 50.0), pct(&mut warm, 99.0));
    println!(
        "  warm point query (search)       p50 {:>9}  p99 {:>9}  ({} queries, {:.2} blocks read per query, {:.0} KiB read() per query)",
        fmt_dur(warm50),
        fmt_dur(warm99),
        warm.len(),
        blocks as f64 / warm_set.len() as f64,
        warm_reads / 1024.0
    );
    let mut summary = format!(
        "point query, {} bindings: warm p50 {} p99 {}",
        args.bindings,
        fmt_dur(warm50),
        fmt_dur(warm99)
    );
    if let Some(line) = export_report(&dir, work, &warm_set[..warm_set.len().min(EXPORTS)], warm50)?
    {
        let _ = write!(summary, "; {line}");
    }

    // Cold: drop the page cache before each.
    if !root {
        println!("  cold point query                skipped (dropping the page cache needs root)");
    } else if cold_set.is_empty() {
        println!("  cold point query                skipped (--cold 0)");
    } else {
        let mut cold = Vec::with_capacity(cold_set.len());
        let mut disk = 0u64;
        for k in cold_set {
            drop_caches()?;
            let io0 = proc_io();
            let (d, _) = query_once(&dir, k)?;
            disk += proc_io().1 - io0.1;
            cold.push(d);
        }
        let (cold50, cold99) = (pct(&mut cold, 50.0), pct(&mut cold, 99.0));
        println!(
            "  cold point query (search)       p50 {:>9}  p99 {:>9}  ({} queries, page cache dropped before each, {:.0} KiB from disk per query)",
            fmt_dur(cold50),
            fmt_dur(cold99),
            cold.len(),
            disk as f64 / cold.len() as f64 / 1024.0
        );
        let _ = write!(
            summary,
            "; cold p50 {} p99 {}",
            fmt_dur(cold50),
            fmt_dur(cold99)
        );
    }

    // Baseline: decode every block of every segment, the files cached first.
    if !scan_set.is_empty() {
        for path in segment_files(&dir)? {
            std::io::copy(
                &mut File::open(&path).map_err(|e| e.to_string())?,
                &mut std::io::sink(),
            )
            .map_err(|e| e.to_string())?;
        }
    }
    let mut scans = Vec::with_capacity(scan_set.len());
    for k in scan_set {
        let t = Instant::now();
        let found = scan(&dir, k)?;
        scans.push(t.elapsed());
        check(k, &found, "scan")?;
    }
    if scans.is_empty() {
        println!("  baseline: full scan             skipped (--scans 0)");
    } else {
        let p50 = pct(&mut scans, 50.0);
        println!(
            "  baseline: full scan (warm)      p50 {:>9}                ({} queries, every block of every segment decoded); search p50 warm is {:.0}x faster",
            fmt_dur(p50),
            scans.len(),
            p50.as_secs_f64() / warm50.as_secs_f64()
        );
        let _ = write!(summary, "; full scan p50 {}", fmt_dur(p50));
    }
    Ok(summary)
}

/// The same point questions exported as evidence bundles (`nattrace export`'s code: the
/// answer through the same engine, then an inclusion proof for each of its rows, signed
/// manifest, audit entry) and each bundle verified offline; beside the warm search.
fn export_report(
    dir: &Path,
    work: &Path,
    known: &[Known],
    search_p50: Duration,
) -> Result<Option<String>, String> {
    if known.is_empty() {
        return Ok(None);
    }
    let key = SignerKey::generate("bench").map_err(|e| e.to_string())?;
    let (key_file, _) = write_key_pair(&work.join("keys"), &key).map_err(|e| e.to_string())?;
    let verifier = key.verifier();
    let now = tracer_user::query::now_ns();
    let (mut exports, mut verifies, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    for (i, k) in known.iter().enumerate() {
        let at = format!(
            "{}.{:09}",
            k.at_ns.div_euclid(1_000_000_000),
            k.at_ns.rem_euclid(1_000_000_000)
        );
        let out = work.join(format!("bundle-{i}.nattrace"));
        let args = ExportArgs {
            data_dir: dir.to_owned(),
            case: "BENCH-1".to_owned(),
            out: out.clone(),
            reason: None,
            sign_key: Some(key_file.clone()),
            question: Question {
                external: Some(format_endpoint((k.external.0, Some(k.external.1)))),
                from: Some(at.clone()),
                to: Some(at),
                ..Question::default()
            },
        };
        // Once to cache and to sign the checkpoints it needs (the benchmark's segments have
        // none), then timed.
        for timed in [false, true] {
            let t = Instant::now();
            let e = export(&args, now, &mut Vec::new()).map_err(|e| format!("export: {e:#}"))?;
            let d = t.elapsed();
            let bundle = fs::read(&out).map_err(|e| e.to_string())?;
            fs::remove_file(&out).map_err(|e| e.to_string())?;
            if e.manifest.bindings == 0 {
                return Err(format!("export found nothing for {:?}", k.external));
            }
            let t = Instant::now();
            let report = verify_bundle(&bundle, &verifier, &[]);
            let v = t.elapsed();
            if !report.is_verified() {
                return Err(format!("bundle does not verify: {:?}", report.problems));
            }
            if timed {
                exports.push(d);
                verifies.push(v);
                sizes.push(bundle.len());
            }
        }
    }
    sizes.sort_unstable();
    let size = sizes[sizes.len() / 2];
    let (e50, e99) = (pct(&mut exports, 50.0), pct(&mut exports, 99.0));
    let v50 = pct(&mut verifies, 50.0);
    println!(
        "  evidence export (warm)          p50 {:>9}  p99 {:>9}  ({} exports; bundle {} bytes median; offline verify p50 {}); {:.1}x the warm search",
        fmt_dur(e50),
        fmt_dur(e99),
        exports.len(),
        size,
        fmt_dur(v50),
        e50.as_secs_f64() / search_p50.as_secs_f64()
    );
    Ok(Some(format!(
        "export p50 {} (bundle {size} B, verify {})",
        fmt_dur(e50),
        fmt_dur(v50)
    )))
}

/// The one call site of the query engine: "who held `k.external` at `k.at_ns`".
fn query_once(dir: &Path, k: &Known) -> Result<(Duration, Found), String> {
    let q = Search {
        external: Some((k.external.0, Some(k.external.1))),
        internal: None,
        destination: None,
        proto: None,
        from_ns: k.at_ns,
        to_ns: k.at_ns,
    };
    let t = Instant::now();
    let found = search(dir, &q).map_err(|e| format!("search: {e}"))?;
    let d = t.elapsed();
    if !found.problems.is_empty() {
        return Err(format!("search reported problems: {:?}", found.problems));
    }
    check(k, &found.bindings, "search")?;
    Ok((d, found))
}

/// The answer holds the expected binding, and only bindings that match the question.
fn check(k: &Known, found: &[Binding], what: &str) -> Result<(), String> {
    if !found.iter().any(|b| b.id == k.id) {
        return Err(format!(
            "{what}: wrong answer for {}:{} at {}: binding {:#x} missing ({} found: {:?})",
            k.external.0,
            k.external.1,
            rfc3339(k.at_ns),
            k.id,
            found.len(),
            found.iter().map(|b| b.id).collect::<Vec<_>>()
        ));
    }
    for b in found {
        let end = b.end_ns.unwrap_or(i64::MAX);
        if b.external() != k.external || b.start_ns > k.at_ns || end < k.at_ns {
            return Err(format!(
                "{what}: wrong answer for {}:{} at {}: binding {:#x} ({:?}, {}..{}) does not match",
                k.external.0,
                k.external.1,
                rfc3339(k.at_ns),
                b.id,
                b.external(),
                rfc3339(b.start_ns),
                rfc3339(end)
            ));
        }
    }
    Ok(())
}

/// The baseline: read and decode every block of every segment, keep the matching rows.
fn scan(dir: &Path, k: &Known) -> Result<Vec<Binding>, String> {
    let mut out = Vec::new();
    for path in segment_files(dir)? {
        let src = FileReader::new(File::open(&path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let seg =
            SealedSegment::open(&src).map_err(|(o, e)| format!("{}: {o}: {e}", path.display()))?;
        for f in seg
            .fences(&src)
            .map_err(|(o, e)| format!("{}: {o}: {e}", path.display()))?
        {
            for r in seg
                .read_block(&src, &f)
                .map_err(|(o, e)| format!("{}: {o}: {e}", path.display()))?
            {
                let b = r.binding;
                if b.external() == k.external
                    && b.start_ns <= k.at_ns
                    && b.end_ns.is_none_or(|e| e >= k.at_ns)
                {
                    out.push(b);
                }
            }
        }
    }
    Ok(out)
}

/// The sealed segment files of a data directory, by sequence number.
fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut v: Vec<PathBuf> = fs::read_dir(&seg_dir)
        .map_err(|e| format!("list {}: {e}", seg_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == SEALED_EXT))
        .collect();
    v.sort();
    Ok(v)
}

fn drop_caches() -> Result<(), String> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n").map_err(|e| format!("drop caches: {e}"))
}

/// This process's (rchar, read_bytes) from /proc/self/io: bytes asked of read calls, and
/// bytes fetched from storage.
fn proc_io() -> (u64, u64) {
    let s = fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("rchar:"), field("read_bytes:"))
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}
