//! What the agent cannot see directly it finds by reconciling with the conntrack table:
//! (a) bindings that existed before it started, (b) ends whose DESTROY event it lost to a
//! netlink overrun.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail};
use nattrace_e2e::agent::{Agent, Losses};
use nattrace_e2e::check::{Tally, TimeArg, end_matches, who_held};
use nattrace_e2e::conntrack_truth::{
    ConntrackListener, delete_chunked, evict_expired, flow_key, table_count,
};
use nattrace_e2e::lab::{Lab, LabConfig, Ns, expiry_wait};
use nattrace_e2e::traffic::{FlowKind, L4, LongLivedUdp, Servers, TrafficPlan, generate};
use nattrace_e2e::util::{rfc3339, secs_between};

const RECONCILE: Duration = Duration::from_secs(2);
const RECONCILE_ARG: &str = "2s";

/// (a) Long-lived UDP flows opened before the agent starts are found, with an approximate
/// start, while they are alive; and they end when they stop.
#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn bindings_from_before_the_agent_are_found() {
    let lab = Lab::new(LabConfig::default()).expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let listener = ConntrackListener::start(&lab).expect("starting conntrack -E");
    let mut long = LongLivedUdp::open(&lab, &servers, &[false, true], 2, Duration::from_secs(1))
        .expect("long-lived UDP flows");
    println!(
        "{} long-lived UDP flows opened before the agent",
        long.flows.len()
    );
    std::thread::sleep(Duration::from_millis(1500));

    let data = tempfile::tempdir().expect("temp data dir");
    let mut agent = Agent::start(&lab, data.path(), &["--reconcile-interval", RECONCILE_ARG])
        .expect("starting the agent");
    let cli = agent.cli.clone();
    let mut tally = Tally::default();

    // The agent may find them at start or at its first reconciliation.
    let deadline = Instant::now() + RECONCILE + Duration::from_secs(2);
    for f in &long.flows {
        let record = loop {
            let at = SystemTime::now();
            match who_held(&cli, f, at, TimeArg::Rfc3339) {
                Ok(r) => break Ok((r, at)),
                Err(e) if Instant::now() >= deadline => {
                    break Err(e.context("pre-existing binding not found"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let Ok((r, at)) = record else {
            tally.check("found while alive", record.map(drop));
            continue;
        };
        tally.check("found while alive", Ok(()));
        tally.check(
            "start approximate",
            if r.start_approximate {
                Ok(())
            } else {
                Err(anyhow!(
                    "start_approximate false for a binding older than the agent: {}",
                    r.raw
                ))
            },
        );
        tally.check(
            "start_source dump",
            if r.start_source == "dump" {
                Ok(())
            } else {
                Err(anyhow!("start_source {}: {}", r.start_source, r.raw))
            },
        );
        tally.check(
            "start not after the question",
            if r.start <= at {
                Ok(())
            } else {
                Err(anyhow!(
                    "start {} after the time asked {}: {}",
                    rfc3339(r.start),
                    rfc3339(at),
                    r.raw
                ))
            },
        );
        tally.check(
            "still open",
            if r.end.is_none() {
                Ok(())
            } else {
                Err(anyhow!("has an end while alive: {}", r.raw))
            },
        );
    }

    // Stop them; they end by timeout (DESTROY seen by the agent and by conntrack -E).
    long.close();
    std::thread::sleep(expiry_wait(&lab));
    evict_expired(&lab).expect("conntrack -L");
    let mut sources = lab.subscribers(false);
    sources.extend(lab.subscribers(true));
    delete_chunked(&lab, &sources, &[17]).expect("chunked conntrack -D");
    let keys: Vec<_> = long.flows.iter().map(flow_key).collect();
    let first = long.flows.iter().map(|f| f.sent_at).min().expect("flows");
    let missing = listener.wait_for_destroys(&keys, first, Duration::from_secs(15));
    assert!(
        missing.is_empty(),
        "lab truth incomplete: no DESTROY for {} flows",
        missing.len()
    );
    std::thread::sleep(Duration::from_millis(1500));
    agent.stop().expect("stopping the agent");

    let index = listener.index();
    for f in &long.flows {
        let result =
            who_held(&cli, f, f.seen_at + Duration::from_secs(2), TimeArg::Unix).and_then(|r| {
                let destroyed = index
                    .destroy_of(f)
                    .ok_or_else(|| anyhow!("no DESTROY for {f:?}"))?;
                end_matches(&r, f, destroyed, Duration::from_secs(1))
            });
        tally.check("end within 1 s of DESTROY", result);
    }
    tally.finish("bindings_from_before_the_agent_are_found");
}

/// (b) With a tiny netlink buffer and every binding deleted at once, the agent overruns, counts
/// it, and still gives every binding an end: exact where it got the DESTROY, approximate (and
/// between the last moment the binding was known alive and the next reconciliation) where not.
#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn lost_ends_are_reconciled() {
    // Long timeouts: the only ends are the deletion.
    let lab = Lab::new(LabConfig {
        conntrack_timeout_secs: 600,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let listener = ConntrackListener::start(&lab).expect("starting conntrack -E");
    let data = tempfile::tempdir().expect("temp data dir");
    let mut agent = Agent::start(
        &lab,
        data.path(),
        &[
            "--netlink-rcvbuf",
            "4096",
            "--reconcile-interval",
            RECONCILE_ARG,
        ],
    )
    .expect("starting the agent");
    let cli = agent.cli.clone();

    let plan = TrafficPlan {
        kinds: vec![
            FlowKind {
                l4: L4::Udp,
                v6: false,
            },
            FlowKind {
                l4: L4::Udp,
                v6: true,
            },
        ],
        subscribers: (0..lab.subscribers_v4.len()).collect(),
        flows_per_kind: 25,
        threads: 4,
    };
    let flows = generate(&lab, &servers, &plan).expect("generating traffic");
    // At least one reconciliation sees them all alive.
    std::thread::sleep(RECONCILE + Duration::from_millis(500));
    let alive = table_count(&lab).expect("conntrack -C");
    assert!(
        alive >= flows.len(),
        "{alive} conntrack entries for {} flows before the deletion",
        flows.len()
    );

    // Everything at once, in the kernel.
    let deleted_from = SystemTime::now();
    lab.exec_in(Ns::Nat, "conntrack", &["-F"])
        .expect("conntrack -F");
    let deleted_to = SystemTime::now();
    println!(
        "{} bindings deleted at once in {:.1} ms",
        flows.len(),
        secs_between(deleted_from, deleted_to) * 1000.0
    );
    // Two reconciliations later every end must be known.
    std::thread::sleep(2 * RECONCILE + Duration::from_secs(1));
    let stats = cli.stats().expect("nattrace stats");
    println!("stats: {stats}");
    agent.stop().expect("stopping the agent");

    let losses = Losses::from_stats(&stats).expect("stats losses");
    assert!(
        losses.netlink_overrun > 0,
        "the agent's netlink socket never overran (netlink_overrun = 0): the test proved nothing; {stats}"
    );
    let index = listener.index();
    let truth_complete = !listener.overrun();
    let mut tally = Tally::default();
    let latest = deleted_to + RECONCILE + Duration::from_secs(1);
    let earliest = deleted_from - RECONCILE - Duration::from_millis(500);
    for f in &flows {
        let result = who_held(&cli, f, f.seen_at, TimeArg::Unix).and_then(|r| {
            let Some(end) = r.end else { bail!("no end after deletion and two reconciliations: {}", r.raw) };
            if r.end_approximate {
                let lower = earliest.max(f.seen_at);
                if end < lower || end > latest {
                    bail!(
                        "approximate end {} outside [{}, {}] (last known alive .. next reconciliation): {}",
                        rfc3339(end),
                        rfc3339(lower),
                        rfc3339(latest),
                        r.raw
                    );
                }
                Ok(true)
            } else {
                match index.destroy_of(f) {
                    Some(t) => end_matches(&r, f, t, Duration::from_secs(1))?,
                    None if truth_complete => bail!("exact end but conntrack -E saw no DESTROY: {}", r.raw),
                    None if end >= deleted_from - Duration::from_secs(1) && end <= deleted_to + Duration::from_secs(1) => {}
                    None => bail!("exact end {} outside the deletion: {}", rfc3339(end), r.raw),
                }
                Ok(false)
            }
        });
        match result {
            Ok(true) => tally.check("approximate end in bounds", Ok(())),
            Ok(false) => tally.check("exact end within 1 s of DESTROY", Ok(())),
            Err(e) => tally.check("end", Err(e)),
        }
    }
    tally.check(
        "some ends approximate",
        if tally.count("approximate end in bounds") > 0 {
            Ok(())
        } else {
            Err(anyhow!("netlink_overrun = {} but no end is approximate: lost DESTROYs cannot give exact ends", losses.netlink_overrun))
        },
    );
    tally.finish("lost_ends_are_reconciled");
}
