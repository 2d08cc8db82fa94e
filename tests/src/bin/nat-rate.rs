//! nat-rate: how many new NAT bindings per second the lab's NAT makes, without the agent and
//! with the agent attached, in the same lab and process.
//!
//! A UDP flood from many source ports (sockets on every subscriber address) to successive
//! destination ports: every datagram is a new conntrack entry and binding. The rate is what
//! arrived at the server namespace (an nftables counter there, which then drops the packet),
//! divided by the flood's duration.
//!
//! The conntrack table of a namespace holds `nf_conntrack_max` entries (262144 here), less
//! than a second of flood; past that the kernel early-drops entries, which would measure the
//! table instead of the NAT. So each run floods in rounds of at most `--round-bindings`
//! (default 200000), flushing the table (and pausing a second) before each round, until the
//! rounds add up to `--seconds` of flooding.
//!
//! ```text
//! nat-rate [--seconds N] [--round-bindings N] [--sockets-per-subscriber N] [--threads N] [--nattrace PATH]
//! ```
//! Needs root. The binary is `--nattrace`, else `$NATTRACE_BIN`, else the workspace's
//! release build.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nattrace_e2e::agent::{Agent, Losses, nattrace_bin};
use nattrace_e2e::lab::{Lab, LabConfig, Ns};
use nattrace_e2e::traffic::{FLOOD_PORTS, flood_sink_count, install_flood_sink, udp_flood};

struct Options {
    seconds: f64,
    round_bindings: u64,
    sockets_per_subscriber: usize,
    threads: usize,
    bin: PathBuf,
}

fn options() -> Result<Options> {
    let mut o = Options {
        seconds: 3.0,
        round_bindings: 200_000,
        sockets_per_subscriber: 16,
        threads: 2,
        bin: nattrace_bin(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = value()?.parse().context("--seconds")?,
            "--round-bindings" => {
                o.round_bindings = value()?.parse().context("--round-bindings")?
            }
            "--sockets-per-subscriber" => {
                o.sockets_per_subscriber = value()?.parse().context("--sockets-per-subscriber")?
            }
            "--threads" => o.threads = value()?.parse().context("--threads")?,
            "--nattrace" => o.bin = value()?.into(),
            "-h" | "--help" => {
                println!(
                    "nat-rate [--seconds N] [--round-bindings N] [--sockets-per-subscriber N] [--threads N] [--nattrace PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if !o.seconds.is_finite() || o.seconds <= 0.0 {
        bail!("--seconds must be positive");
    }
    Ok(o)
}

/// Conntrack statistics of the NAT namespace summed over CPUs: (drop, early_drop, insert_failed).
fn conntrack_drops(lab: &Lab) -> Result<(u64, u64, u64)> {
    let out = lab.exec_in(Ns::Nat, "conntrack", &["-S"])?;
    let sum = |key: &str| -> u64 {
        out.split_whitespace()
            .filter_map(|t| t.strip_prefix(key))
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    };
    Ok((sum("drop="), sum("early_drop="), sum("insert_failed=")))
}

#[derive(Default)]
struct Rate {
    bindings: u64,
    sent: u64,
    elapsed: Duration,
    rounds: u32,
    drops: (u64, u64, u64),
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.bindings as f64 / self.elapsed.as_secs_f64()
    }
}

/// Floods in rounds (see the module documentation) until `--seconds` of flooding.
fn measure(lab: &Lab, o: &Options) -> Result<Rate> {
    let mut total = Rate::default();
    let wanted = Duration::from_secs_f64(o.seconds);
    while total.elapsed < wanted {
        lab.exec_in(Ns::Nat, "conntrack", &["-F"])?;
        std::thread::sleep(Duration::from_secs(1));
        let before = flood_sink_count(lab)?;
        let d0 = conntrack_drops(lab)?;
        let flood = udp_flood(
            lab,
            wanted - total.elapsed,
            o.round_bindings,
            o.sockets_per_subscriber,
            o.threads,
            FLOOD_PORTS.0,
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let after = flood_sink_count(lab)?;
        let d1 = conntrack_drops(lab)?;
        total.bindings += after - before;
        total.sent += flood.sent;
        total.elapsed += flood.elapsed;
        total.rounds += 1;
        total.drops = (
            total.drops.0 + d1.0 - d0.0,
            total.drops.1 + d1.1 - d0.1,
            total.drops.2 + d1.2 - d0.2,
        );
    }
    Ok(total)
}

fn print_rate(label: &str, r: &Rate) {
    println!(
        "{label:<14} {:>10.0} new bindings/s  ({} bindings at the server of {} datagrams sent in {:.2} s, {} round(s); \
         conntrack drop {} early_drop {} insert_failed {})",
        r.per_second(),
        r.bindings,
        r.sent,
        r.elapsed.as_secs_f64(),
        r.rounds,
        r.drops.0,
        r.drops.1,
        r.drops.2
    );
}

fn run() -> Result<()> {
    let o = options()?;
    nattrace_e2e::util::require_root()?;
    nattrace_e2e::agent::require_bin(&o.bin)?;
    let lab = Lab::new(LabConfig {
        subscribers: 20,
        conntrack_timeout_secs: 3,
    })?;
    install_flood_sink(&lab)?;
    println!(
        "lab {}: UDP flood from {} sockets on {} subscriber addresses, {} sender thread(s), {:.1} s per run",
        lab.prefix,
        o.sockets_per_subscriber * lab.subscribers_v4.len(),
        lab.subscribers_v4.len(),
        o.threads,
        o.seconds
    );

    let without = measure(&lab, &o)?;
    print_rate("without agent", &without);

    let data = tempfile::tempdir()?;
    let mut agent = Agent::start_with(&o.bin, &lab, data.path(), &[])?;
    let pid = agent.pid().context("agent has no pid")?;
    let (cpu_before, wall_before) = (cpu_seconds(pid)?, Instant::now());
    let with = measure(&lab, &o)?;
    let (cpu, wall) = (
        cpu_seconds(pid)? - cpu_before,
        wall_before.elapsed().as_secs_f64(),
    );
    print_rate("with agent", &with);
    // On a small machine the agent's own CPU comes out of what the flood and the NAT get.
    println!(
        "agent CPU: {cpu:.2} s over {wall:.2} s of measuring ({:.2} cores), {:.0} ns per binding",
        cpu / wall,
        cpu * 1e9 / with.bindings as f64
    );
    let stats = agent.cli.stats()?;
    agent.stop()?;
    let losses = Losses::from_stats(&stats)?;
    println!(
        "agent: {} bindings recorded, losses ring_full {} netlink_overrun {} disk_error {}",
        stats["bindings"], losses.ring_full, losses.netlink_overrun, losses.disk_error
    );
    println!(
        "ratio with/without: {:.3}",
        with.per_second() / without.per_second()
    );
    Ok(())
}

/// User plus system CPU time of a process so far, in seconds (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nat-rate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
