//! The cost of tracing, per backend: new NAT bindings per second through the lab's NAT
//! namespace without the tracer and with it attached, measured in interleaved rounds of the same
//! process and lab, and how much the ring buffer carried while it did.
//!
//! ```text
//! cargo build --release -p tracer-user
//! cargo test --release -p nattrace-e2e --test cost -- --ignored --nocapture
//! ```
//!
//! Environment:
//! * `NATTRACE_COST_BACKENDS`: comma-separated `--backend` values (default `netfilter`);
//! * `NATTRACE_COST_SECONDS`: seconds of flooding per round (default 5);
//! * `NATTRACE_COST_ROUNDS`: repetitions of the sequence (default 3);
//! * `NATTRACE_BIN`: the binary (default the workspace's release build).
//!
//! **Generator.** A UDP flood from 16 non-blocking sockets on each of the 20 IPv4 subscriber
//! addresses, each sending to successive destination ports of the server
//! ([`udp_flood`]): every datagram has a new 5-tuple, so every datagram is a new conntrack entry
//! and a new SNAT binding, for one `sendto` and no other syscall. That is the cheapest binding
//! there is: TCP costs a socket, a three-way handshake through the NAT in both directions and a
//! close per binding, UDP from fresh source ports a socket, a bind and a close. The loop is
//! closed by the machine itself: a veth transmit runs the receiving namespace's stack (the NAT,
//! then the server) in the softirq of the sending CPU, so a sender thread cannot run ahead of
//! what the NAT processes; sends the kernel refuses (`EAGAIN`) are not counted. The server
//! namespace counts and drops the datagrams ([`install_flood_sink`]): the rate is bindings that
//! made it through the NAT per second of flooding. Two sender threads, as the machine has two
//! cores; the agent, when attached, competes with them for the same CPUs, which is the cost an
//! operator pays on a busy box.
//!
//! **Rounds.** `without, with A, without, with B, …`, the whole sequence repeated
//! `NATTRACE_COST_ROUNDS` times, so slow drifts of the machine (other jobs, thermal) hit both
//! configurations alike. Each round starts on a flushed conntrack table (`conntrack -F` in the
//! NAT namespace) and, with a backend, a fresh agent on a fresh data directory, started before
//! the round's clock starts. The table holds `nf_conntrack_max` entries (global, 262144 here),
//! which this flood fills in well under a second; past that the kernel early-drops entries and
//! we would measure that instead of the NAT. So a round floods in chunks of at most 3/4 of the table,
//! flushing between chunks (not counted in the round's time), until it has flooded for the
//! round's duration. With an agent attached the flushes end its bindings (ctnetlink DESTROY),
//! as a real NAT's timeouts would.
//!
//! **Figures.** Per configuration the median over its rounds of bindings per second; the ratio
//! is the median with the backend over the median without. Ring throughput: starts the agent
//! recorded from the ring (`stats.bindings - stats.starts_recovered` of the round's data
//! directory) per second of flooding, and `losses.ring_full`. Truth independent of nattrace:
//! the server's counter of datagrams that went through the NAT (`created`), each a new conntrack
//! entry, next to the generator's own successful sends and the kernel's `conntrack -S` drop
//! counters (its `insert` counter is no longer incremented by current kernels, 6.18 included, so
//! it is shown only where it is non-zero). The agent's CPU (from `/proc/PID/stat`) and the
//! size of its data directory are printed per round, and the 1-minute load average, since other
//! work on the machine shows in the figures.
//!
//! **Failures.** Only real errors: a lab or agent failure, an agent that exits or fails to stop
//! cleanly, a configuration that made no binding. No ratio threshold (the figures depend on the
//! machine). And losses nattrace did not report: per backend, `stored + ring_full +
//! netlink_overrun + disk_error` must reach `created` less a margin of 0.1 % of `created` plus 10
//! ([`UNREPORTED_MARGIN`], [`UNREPORTED_MARGIN_ABS`]). A binding whose datagram reached the
//! server went through NAT setup, where its start is pushed into the ring or counted as
//! `ring_full`, and the agent drains its ring when it stops, so nothing legitimate falls short
//! (on this host every round so far had `stored == created` exactly); the margin is a guard
//! against the two vantage points (the NAT's hook, the server's counter) disagreeing by a
//! handful, not a tolerance for loss.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nattrace_e2e::agent::{Agent, Losses, nattrace_bin, require_bin};
use nattrace_e2e::lab::{Lab, LabConfig, Ns};
use nattrace_e2e::traffic::{FLOOD_PORTS, flood_sink_count, install_flood_sink, udp_flood};
use serde_json::Value;

/// Default seconds of flooding per round.
const DEFAULT_SECONDS: f64 = 5.0;
/// Default repetitions of the `without, with A, without, with B, …` sequence.
const DEFAULT_ROUNDS: usize = 3;
/// Default backends.
const DEFAULT_BACKENDS: &str = "netfilter";
/// Flood sockets on each subscriber address (distinct source ports).
const SOCKETS_PER_SUBSCRIBER: usize = 16;
/// Flood sender threads.
const SENDER_THREADS: usize = 2;
/// Subscriber addresses of the lab.
const SUBSCRIBERS: usize = 20;
/// Pause after a flush, so its work (and, with an agent, its DESTROY events) is not billed to
/// the next chunk.
const SETTLE_AFTER_FLUSH: Duration = Duration::from_millis(300);
/// Pause after a chunk before reading the server's counter (datagrams still in backlogs).
const DRAIN_AFTER_CHUNK: Duration = Duration::from_millis(100);
/// Time the agent gets after the last chunk to drain its ring and write out (it drains every
/// 100 ms and writes every 200 ms, and again when it stops).
const AGENT_CATCH_UP: Duration = Duration::from_millis(1000);
/// Bindings created but neither stored nor reported lost that are tolerated, per mille of the
/// bindings created (plus [`UNREPORTED_MARGIN_ABS`]); see the module documentation.
const UNREPORTED_MARGIN: u64 = 1;
/// Absolute part of the margin.
const UNREPORTED_MARGIN_ABS: u64 = 10;

/// What the environment asks for.
#[derive(Debug)]
struct Settings {
    seconds: f64,
    rounds: usize,
    backends: Vec<String>,
}

fn settings() -> Result<Settings> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let seconds = match var("NATTRACE_COST_SECONDS") {
        Some(v) => v
            .trim()
            .parse::<f64>()
            .with_context(|| format!("NATTRACE_COST_SECONDS={v:?}"))?,
        None => DEFAULT_SECONDS,
    };
    ensure!(
        seconds.is_finite() && seconds > 0.0,
        "NATTRACE_COST_SECONDS must be a positive number of seconds"
    );
    let rounds = match var("NATTRACE_COST_ROUNDS") {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .with_context(|| format!("NATTRACE_COST_ROUNDS={v:?}"))?,
        None => DEFAULT_ROUNDS,
    };
    ensure!(rounds > 0, "NATTRACE_COST_ROUNDS must be at least 1");
    let backends: Vec<String> = var("NATTRACE_COST_BACKENDS")
        .unwrap_or_else(|| DEFAULT_BACKENDS.to_owned())
        .split(',')
        .map(|b| b.trim().to_owned())
        .filter(|b| !b.is_empty())
        .collect();
    ensure!(
        !backends.is_empty(),
        "NATTRACE_COST_BACKENDS names no backend"
    );
    Ok(Settings {
        seconds,
        rounds,
        backends,
    })
}

/// Counters of `conntrack -S` in the NAT namespace, summed over CPUs.
#[derive(Clone, Copy, Debug, Default)]
struct CtCounters {
    insert: u64,
    insert_failed: u64,
    drop: u64,
    early_drop: u64,
}

impl CtCounters {
    fn read(lab: &Lab) -> Result<CtCounters> {
        let out = lab.exec_in(Ns::Nat, "conntrack", &["-S"])?;
        let sum = |key: &str| -> u64 {
            out.split_whitespace()
                .filter_map(|t| t.strip_prefix(key))
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        };
        Ok(CtCounters {
            insert: sum("insert="),
            insert_failed: sum("insert_failed="),
            drop: sum("drop="),
            early_drop: sum("early_drop="),
        })
    }

    fn since(self, before: CtCounters) -> CtCounters {
        CtCounters {
            insert: self.insert.saturating_sub(before.insert),
            insert_failed: self.insert_failed.saturating_sub(before.insert_failed),
            drop: self.drop.saturating_sub(before.drop),
            early_drop: self.early_drop.saturating_sub(before.early_drop),
        }
    }

    fn add(&mut self, other: CtCounters) {
        self.insert += other.insert;
        self.insert_failed += other.insert_failed;
        self.drop += other.drop;
        self.early_drop += other.early_drop;
    }
}

/// What the agent of one round reported.
#[derive(Clone, Copy, Debug, Default)]
struct AgentFigures {
    /// `stats.bindings`: bindings stored.
    stored: u64,
    /// `stats.bindings - stats.starts_recovered`: starts that came through the ring.
    ring_starts: u64,
    losses: Losses,
    /// CPU seconds the agent used from the first chunk to the end of the last.
    cpu_seconds: f64,
    /// Wall seconds of that window (flushes between chunks included).
    cpu_window: f64,
    /// Size of the data directory after the agent stopped.
    bytes_on_disk: u64,
}

/// One round of one configuration.
#[derive(Clone, Debug)]
struct Round {
    /// `None`: no tracer.
    backend: Option<String>,
    /// Datagrams through the NAT, counted at the server: bindings created.
    created: u64,
    /// Datagrams the generator handed to the kernel.
    sent: u64,
    ct: CtCounters,
    /// Seconds of flooding (flushes between chunks excluded).
    flooding: Duration,
    chunks: u32,
    /// Wall time of the whole round (flushes, agent start and stop, stats included).
    wall: Duration,
    /// Time spent in `conntrack -F` (between chunks).
    flushing: Duration,
    /// The 1-minute load average at the end of the round (other work on the machine shows).
    load: String,
    agent: Option<AgentFigures>,
}

impl Round {
    /// A round not yet run, with (`Some`) or without (`None`) a tracer.
    fn new(backend: Option<String>) -> Self {
        Self {
            backend,
            created: 0,
            sent: 0,
            ct: CtCounters::default(),
            flooding: Duration::ZERO,
            chunks: 0,
            wall: Duration::ZERO,
            flushing: Duration::ZERO,
            load: String::new(),
            agent: None,
        }
    }

    fn rate(&self) -> f64 {
        self.created as f64 / self.flooding.as_secs_f64()
    }
}

/// The lab, its flood sink and the chunk size.
struct Bench {
    lab: Lab,
    chunk_cap: u64,
    seconds: f64,
}

impl Bench {
    /// Flushes the NAT namespace's conntrack table and pauses; returns the time `conntrack -F`
    /// took.
    fn flush(&self) -> Result<Duration> {
        let t = Instant::now();
        self.lab.exec_in(Ns::Nat, "conntrack", &["-F"])?;
        let took = t.elapsed();
        std::thread::sleep(SETTLE_AFTER_FLUSH);
        Ok(took)
    }

    /// Floods for the round's duration, in chunks (see the module documentation). The table
    /// was flushed just before.
    fn flood(&self, round: &mut Round, mut agent: Option<&mut Agent>) -> Result<()> {
        let wanted = Duration::from_secs_f64(self.seconds);
        let mut first_port = FLOOD_PORTS.0;
        while round.flooding < wanted {
            if round.chunks > 0 {
                round.flushing += self.flush()?;
            }
            let before = flood_sink_count(&self.lab)?;
            let ct_before = CtCounters::read(&self.lab)?;
            let flood = udp_flood(
                &self.lab,
                wanted - round.flooding,
                self.chunk_cap,
                SOCKETS_PER_SUBSCRIBER,
                SENDER_THREADS,
                first_port,
            )?;
            std::thread::sleep(DRAIN_AFTER_CHUNK);
            let after = flood_sink_count(&self.lab)?;
            round.ct.add(CtCounters::read(&self.lab)?.since(ct_before));
            round.created += after.saturating_sub(before);
            round.sent += flood.sent;
            round.flooding += flood.elapsed;
            round.chunks += 1;
            // Other destination ports in the next chunk, for good measure (the flush already
            // made every tuple new again).
            first_port = first_port.wrapping_add(7919);
            if first_port < FLOOD_PORTS.0 || first_port > FLOOD_PORTS.1 {
                first_port = FLOOD_PORTS.0;
            }
            if let Some(agent) = agent.as_deref_mut() {
                ensure!(
                    agent.is_running(),
                    "the agent exited during the round; stderr:\n{}",
                    agent.stderr()
                );
            }
        }
        Ok(())
    }

    fn round_without(&self) -> Result<Round> {
        let mut round = Round::new(None);
        let t = Instant::now();
        self.flush()?;
        self.flood(&mut round, None)?;
        round.wall = t.elapsed();
        round.load = load_average();
        Ok(round)
    }

    fn round_with(&self, backend: &str, bin: &Path) -> Result<Round> {
        let mut round = Round::new(Some(backend.to_owned()));
        let t = Instant::now();
        self.flush()?;
        let data = tempfile::tempdir().context("temp data dir")?;
        let mut agent = Agent::start_with(bin, &self.lab, data.path(), &["--backend", backend])
            .with_context(|| format!("starting the agent with --backend {backend}"))?;
        let pid = agent.pid().context("the agent has no pid")?;
        let (cpu_before, window) = (cpu_seconds(pid)?, Instant::now());
        self.flood(&mut round, Some(&mut agent))?;
        let (cpu, window) = (
            cpu_seconds(pid)? - cpu_before,
            window.elapsed().as_secs_f64(),
        );
        std::thread::sleep(AGENT_CATCH_UP);
        ensure!(
            agent.is_running(),
            "the agent exited during the round; stderr:\n{}",
            agent.stderr()
        );
        agent.stop().context("stopping the agent")?;
        let stats = agent.cli.stats().context("nattrace stats")?;
        let mut figures = agent_figures(&stats, cpu, window)?;
        figures.bytes_on_disk = dir_size(data.path())?;
        round.agent = Some(figures);
        round.wall = t.elapsed();
        round.load = load_average();
        Ok(round)
    }
}

fn agent_figures(stats: &Value, cpu_seconds: f64, cpu_window: f64) -> Result<AgentFigures> {
    let get = |k: &str| {
        stats[k]
            .as_u64()
            .with_context(|| format!("stats.{k} missing or not a number in {stats}"))
    };
    let stored = get("bindings")?;
    let recovered = get("starts_recovered")?;
    Ok(AgentFigures {
        stored,
        ring_starts: stored.saturating_sub(recovered),
        losses: Losses::from_stats(stats)?,
        cpu_seconds,
        cpu_window,
        bytes_on_disk: 0,
    })
}

/// User plus system CPU time of a process so far, in seconds (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the parenthesised command name; utime and stime are fields 14 and 15 of the line.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    ensure!(fields.len() > 12, "short /proc/{pid}/stat");
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Bytes of the regular files under `dir`.
fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// The 1-minute load average, as text.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `nf_conntrack_max` as the NAT namespace sees it.
fn conntrack_max(lab: &Lab) -> Result<u64> {
    let out = lab.exec_in(Ns::Nat, "sysctl", &["-n", "net.netfilter.nf_conntrack_max"])?;
    out.trim()
        .parse()
        .with_context(|| format!("nf_conntrack_max is {out:?}"))
}

fn print_round(i: usize, r: &Round) {
    let name = r.backend.as_deref().unwrap_or("without");
    let mut line = format!(
        "round {i:>2} {name:<10} {:>9.0} bindings/s  created {:>8} sent {:>8} in {:.2} s ({} chunk(s), \
         round {:.1} s, conntrack -F {:.2} s, load {}); conntrack -S:{} insert_failed {} drop {} early_drop {}",
        r.rate(),
        r.created,
        r.sent,
        r.flooding.as_secs_f64(),
        r.chunks,
        r.wall.as_secs_f64(),
        r.flushing.as_secs_f64(),
        r.load,
        // Kernels since 5.x no longer count inserts: show it only where it means something.
        if r.ct.insert > 0 {
            format!(" insert {}", r.ct.insert)
        } else {
            String::new()
        },
        r.ct.insert_failed,
        r.ct.drop,
        r.ct.early_drop
    );
    if let Some(a) = &r.agent {
        line += &format!(
            "; agent: stored {} (ring {}), ring_full {} netlink_overrun {} disk_error {}, CPU {:.2} s ({:.2} cores), data dir {:.1} MB",
            a.stored,
            a.ring_starts,
            a.losses.ring_full,
            a.losses.netlink_overrun,
            a.losses.disk_error,
            a.cpu_seconds,
            a.cpu_seconds / a.cpu_window,
            a.bytes_on_disk as f64 / 1e6
        );
    }
    println!("{line}");
}

/// Per-backend summary.
struct Summary {
    backend: String,
    without: f64,
    with: f64,
    paired: f64,
    ring_records_per_s: f64,
    ring_lost: u64,
    stored: u64,
    created: u64,
    sent: u64,
    reported_losses: u64,
    agent_cores: f64,
}

fn summarise(rounds: &[Round], backend: &str) -> Summary {
    let without: Vec<f64> = rounds
        .iter()
        .filter(|r| r.backend.is_none())
        .map(Round::rate)
        .collect();
    let with: Vec<&Round> = rounds
        .iter()
        .filter(|r| r.backend.as_deref() == Some(backend))
        .collect();
    // Each with-round against the without-round just before it.
    let paired: Vec<f64> = rounds
        .windows(2)
        .filter(|w| w[0].backend.is_none() && w[1].backend.as_deref() == Some(backend))
        .map(|w| w[1].rate() / w[0].rate())
        .collect();
    let flooding: f64 = with.iter().map(|r| r.flooding.as_secs_f64()).sum();
    let agents: Vec<AgentFigures> = with.iter().filter_map(|r| r.agent).collect();
    let ring_starts: u64 = agents.iter().map(|a| a.ring_starts).sum();
    let cpu: f64 = agents.iter().map(|a| a.cpu_seconds).sum();
    let cpu_window: f64 = agents.iter().map(|a| a.cpu_window).sum();
    Summary {
        backend: backend.to_owned(),
        without: median(&without),
        with: median(&with.iter().map(|r| r.rate()).collect::<Vec<_>>()),
        paired: median(&paired),
        ring_records_per_s: ring_starts as f64 / flooding,
        ring_lost: agents.iter().map(|a| a.losses.ring_full).sum(),
        stored: agents.iter().map(|a| a.stored).sum(),
        created: with.iter().map(|r| r.created).sum(),
        sent: with.iter().map(|r| r.sent).sum(),
        reported_losses: agents
            .iter()
            .map(|a| a.losses.ring_full + a.losses.netlink_overrun + a.losses.disk_error)
            .sum(),
        agent_cores: cpu / cpu_window,
    }
}

fn run() -> Result<()> {
    let s = settings()?;
    let bin = nattrace_bin();
    require_bin(&bin)?;
    let started = Instant::now();
    let lab = Lab::new(LabConfig {
        subscribers: SUBSCRIBERS,
        conntrack_timeout_secs: 3,
    })
    .context("building the lab")?;
    install_flood_sink(&lab)?;
    let max = conntrack_max(&lab)?;
    let bench = Bench {
        chunk_cap: max / 4 * 3,
        lab,
        seconds: s.seconds,
    };
    let kernel = kernel_release();
    println!(
        "cost: kernel {kernel}, binary {}, backends {:?}, {} round(s) of {:.1} s flooding per configuration; \
         lab {}: UDP flood from {} sockets on {} subscriber addresses, {SENDER_THREADS} sender threads, \
         chunks of at most {} bindings (nf_conntrack_max {max})",
        bin.display(),
        s.backends,
        s.rounds,
        s.seconds,
        bench.lab.prefix,
        SOCKETS_PER_SUBSCRIBER * SUBSCRIBERS,
        SUBSCRIBERS,
        bench.chunk_cap,
    );

    let mut rounds = Vec::new();
    for _ in 0..s.rounds {
        for backend in &s.backends {
            let r = bench.round_without()?;
            print_round(rounds.len(), &r);
            rounds.push(r);
            let r = bench.round_with(backend, &bin)?;
            print_round(rounds.len(), &r);
            rounds.push(r);
        }
    }
    bench.lab.exec_in(Ns::Nat, "conntrack", &["-F"])?;

    for r in &rounds {
        ensure!(
            r.created > 0,
            "a round {} the tracer made no binding at all (sent {}): lab problem",
            r.backend
                .as_deref()
                .map_or("without".to_owned(), |b| format!("with {b}")),
            r.sent
        );
    }

    let summaries: Vec<Summary> = s.backends.iter().map(|b| summarise(&rounds, b)).collect();
    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>7} {:>7} {:>12} {:>9} {:>10} {:>10} {:>10} {:>6}",
        "backend",
        "without/s",
        "with/s",
        "ratio",
        "paired",
        "ring rec/s",
        "ring lost",
        "stored",
        "created",
        "sent",
        "cores"
    );
    for m in &summaries {
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>7.3} {:>7.3} {:>12.0} {:>9} {:>10} {:>10} {:>10} {:>6.2}",
            m.backend,
            m.without,
            m.with,
            m.with / m.without,
            m.paired,
            m.ring_records_per_s,
            m.ring_lost,
            m.stored,
            m.created,
            m.sent,
            m.agent_cores
        );
    }
    println!(
        "(medians over {} round(s) per configuration; paired: median of each with-round over the \
         without-round just before it; created: datagrams through the NAT counted at the server; \
         cores: agent CPU seconds per second of the rounds' flooding phases, flushes included)",
        s.rounds
    );
    println!();
    for m in &summaries {
        println!(
            "NATTRACE-COST backend={} kernel={kernel} without={:.0}/s with={:.0}/s ratio={:.3} \
             ring_records_per_s={:.0} ring_lost={} stored={} created={}",
            m.backend,
            m.without,
            m.with,
            m.with / m.without,
            m.ring_records_per_s,
            m.ring_lost,
            m.stored,
            m.created
        );
    }
    println!("cost: done in {:.1} s", started.elapsed().as_secs_f64());

    let mut unreported = Vec::new();
    for m in &summaries {
        let margin = m.created * UNREPORTED_MARGIN / 1000 + UNREPORTED_MARGIN_ABS;
        if m.stored + m.reported_losses + margin < m.created {
            unreported.push(format!(
                "{}: {} bindings created (at the server) but only {} stored + {} reported lost \
                 (margin {margin})",
                m.backend, m.created, m.stored, m.reported_losses
            ));
        }
    }
    if !unreported.is_empty() {
        bail!(
            "the tracer lost bindings without reporting them:\n{}",
            unreported.join("\n")
        );
    }
    Ok(())
}

#[test]
#[ignore = "privileged measurement: run as root with `cargo test --release -p nattrace-e2e --test cost -- --ignored --nocapture`"]
fn cost_of_tracing() {
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

#[test]
fn medians() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(median(&[]).is_nan());
}
