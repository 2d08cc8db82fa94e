//! The investigator's walk-through shown by `cargo xtask demo`: a CGNAT lab, the agent, real
//! subscriber traffic, then the questions an investigator asks, with external addresses and
//! times taken from what the server saw, and each answer compared with the lab's truth.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::agent::{Agent, Cli, require_bin};
use crate::check::{TimeArg, export_and_verify, keygen, who_held};
use crate::conntrack_truth::evict_expired;
use crate::lab::{Lab, LabConfig, Ns, expiry_wait};
use crate::traffic::{FlowKind, FlowTruth, L4, Servers, TrafficPlan, generate};
use crate::util::{require_root, rfc3339, rfc3339_millis};

/// The subscriber whose timeline the demo shows (index into the lab's subscribers).
const TIMELINE_SUBSCRIBER: usize = 2;

fn heading(n: u32, title: &str) {
    println!("\n== {n}. {title} ==");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Prints a `nattrace query … --format table` and its outcome.
fn show_query(cli: &Cli, args: &[&str]) -> Result<()> {
    println!(
        "$ nattrace query --data-dir {} {} --format table",
        cli.data_dir.display(),
        args.join(" ")
    );
    let f = cli.query_table(args)?;
    print!("{}", indent(&f.stdout));
    if !f.stderr.trim().is_empty() {
        print!("{}", indent(f.stderr.trim_end()));
    }
    match f.status {
        Some(0) => Ok(()),
        Some(1) => {
            println!("    (exit 1: no binding found)");
            Ok(())
        }
        other => bail!("nattrace query exited with {other:?}: {}", f.stderr.trim()),
    }
}

/// Runs the demo with the given `nattrace` binary: builds the lab (20 subscribers), starts
/// the agent in the NAT namespace, generates TCP, UDP and ICMP traffic over IPv4 and IPv6,
/// asks "who held external X:P at T" for a few flows the server saw, shows one subscriber's
/// timeline and `nattrace stats`, then stops the agent and tears the lab down. Fails if a
/// step fails or an answer differs from the lab's truth.
pub fn run(nattrace_bin: &Path) -> Result<()> {
    require_root()?;
    require_bin(nattrace_bin)?;

    heading(1, "Building the CGNAT lab");
    let lab = Lab::new(LabConfig::default())?;
    println!("{}", lab.describe());
    let servers = Servers::start(&lab)?;

    heading(2, "Starting the nattrace agent in the NAT namespace");
    let data = tempfile::Builder::new()
        .prefix("nattrace-demo-")
        .tempdir()?;
    println!(
        "$ nattrace keygen --out KEYS; ip netns exec {} nattrace run --data-dir {} --sign-key KEYS/nattrace.key",
        lab.ns(Ns::Nat),
        data.path().display()
    );
    let started = SystemTime::now();
    // The producer's key: the agent signs each segment's checkpoint as it seals it.
    let keys_dir = tempfile::tempdir()?;
    let keys = keys_dir.path().join("keys");
    keygen(nattrace_bin, &keys)?;
    let key_file = keys.join("nattrace.key");
    let mut agent = Agent::start_with(
        nattrace_bin,
        &lab,
        data.path(),
        &["--sign-key", key_file.to_str().context("key path")?],
    )?;
    let cli = agent.cli.clone();
    println!(
        "agent ready after {:.2} s",
        agent
            .ready_at
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64()
    );
    // Queries look ±2 s around the asked time (clock skew between the requester's log and
    // ours); start the traffic a little later so those windows lie inside the recording and
    // nattrace has no reason to warn that it was not capturing.
    std::thread::sleep(std::time::Duration::from_secs(3));

    heading(
        3,
        "Subscribers open connections: TCP, UDP and ICMP echo, over IPv4 and IPv6",
    );
    let flows = generate(&lab, &servers, &TrafficPlan::everything(&lab, 2))?;
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for f in &flows {
        let family = if f.internal.is_ipv6() { "IPv6" } else { "IPv4" };
        *per_kind
            .entry(format!("{} over {family}", f.proto_name()))
            .or_default() += 1;
    }
    println!(
        "{} flows from {} subscribers:",
        flows.len(),
        lab.subscribers_v4.len()
    );
    for (kind, n) in &per_kind {
        println!("    {kind:<16} {n}");
    }

    heading(
        4,
        "What the server logged (it only ever sees the public side)",
    );
    let picks: Vec<&FlowTruth> = [
        FlowKind {
            l4: L4::Tcp,
            v6: false,
        },
        FlowKind {
            l4: L4::Udp,
            v6: true,
        },
        FlowKind {
            l4: L4::Icmp,
            v6: false,
        },
    ]
    .iter()
    .filter_map(|k| {
        flows
            .iter()
            .rev()
            .find(|f| f.proto == k.proto() && f.internal.is_ipv6() == k.v6)
    })
    .collect();
    for f in &picks {
        println!(
            "    {}  {:<6} from {:<26} to {}",
            rfc3339_millis(f.seen_at),
            f.proto_name(),
            f.external.to_string(),
            f.destination
        );
    }

    heading(5, "Letting the bindings end");
    println!(
        "conntrack timeouts in the lab are {} s; waiting, then dumping the table once so the kernel\n\
         reaps expired entries now rather than at its next garbage collection",
        lab.config.conntrack_timeout_secs
    );
    std::thread::sleep(expiry_wait(&lab));
    evict_expired(&lab)?;
    std::thread::sleep(Duration::from_millis(1500));

    heading(6, "Who held this public address and port at that time?");
    let mut wrong = 0;
    for f in &picks {
        println!(
            "\nThe server logged a {} request from {} at {}. Which subscriber was it?",
            f.proto_name(),
            f.external,
            rfc3339_millis(f.seen_at)
        );
        let external = f.external.to_string();
        let at = rfc3339(f.seen_at);
        show_query(
            &cli,
            &[
                "--external",
                &external,
                "--at",
                &at,
                "--proto",
                f.proto_name(),
            ],
        )?;
        match who_held(&cli, f, f.seen_at, TimeArg::Rfc3339) {
            Ok(r) => println!(
                "    ✓ the lab's truth agrees: subscriber {} (from the subscriber's own socket), destination {}{}",
                r.internal,
                r.destination,
                r.end
                    .map(|e| format!(", ended {}", rfc3339_millis(e)))
                    .unwrap_or_default()
            ),
            Err(e) => {
                wrong += 1;
                println!(
                    "    ✗ differs from the lab's truth (subscriber {}): {e:#}",
                    f.internal
                );
            }
        }
    }

    heading(7, "Timeline of one subscriber");
    let subscriber = lab.subscribers_v4[TIMELINE_SUBSCRIBER].to_string();
    let from = flows.iter().map(|f| f.sent_at).min().context("no flows")? - Duration::from_secs(1);
    let (from, to) = (rfc3339_millis(from), rfc3339_millis(SystemTime::now()));
    show_query(
        &cli,
        &["--internal", &subscriber, "--from", &from, "--to", &to],
    )?;

    heading(8, "nattrace stats");
    println!(
        "$ nattrace stats --data-dir {} --format json",
        cli.data_dir.display()
    );
    let stats = cli.stats()?;
    print!("{}", indent(&serde_json::to_string_pretty(&stats)?));

    heading(9, "Stopping the agent: it seals its log");
    agent.stop()?;
    println!("agent stopped (SIGTERM, exit 0)");

    heading(
        10,
        "Evidence for a case: export one answer, verify it offline",
    );
    let f = &picks[0];
    println!(
        "$ nattrace export --data-dir {} --case DEMO-1 --external {} --at {} --proto {} --sign-key KEYS/nattrace.key --out case.nattrace\n\
         $ nattrace verify RECEIVED-COPY --key KEYS/nattrace.pub",
        cli.data_dir.display(),
        f.external,
        rfc3339(f.seen_at),
        f.proto_name()
    );
    match export_and_verify(&cli.bin, &cli.data_dir, f, "DEMO-1", &keys) {
        Ok(report) => {
            print!("{}", indent(&report));
            println!(
                "    ✓ verified from the bundle and the public key alone; it names the subscriber the lab's socket had"
            );
        }
        Err(e) => {
            wrong += 1;
            println!("    ✗ {e:#}");
        }
    }

    heading(11, "Tearing the lab down");
    drop(servers);
    let prefix = lab.prefix.clone();
    drop(lab);
    println!(
        "namespaces {prefix}-* deleted; data directory {} removed",
        data.path().display()
    );
    if wrong > 0 {
        bail!(
            "{wrong} of {} answers differed from the lab's truth",
            picks.len()
        );
    }
    Ok(())
}
