//! The lab and its two truth sources on their own, without nattrace: what the servers
//! observed must be what conntrack says the NAT did, and every flow must be seen to start and
//! end by the independent `conntrack -E` listener. If this fails, no other test's verdict
//! about nattrace means anything.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use nattrace_e2e::check::Tally;
use nattrace_e2e::conntrack_truth::{
    ConntrackListener, delete_chunked, evict_expired, flow_key, table_count,
};
use nattrace_e2e::lab::{Lab, LabConfig, NAT_UP_V6, POOL_FIRST, POOL_LAST, POOL_PORTS};
use nattrace_e2e::traffic::{
    FlowKind, IPPROTO_ICMP, IPPROTO_ICMPV6, Servers, TrafficPlan, generate,
};

#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn lab_truth_sources_agree() {
    let lab = Lab::new(LabConfig::default()).expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let listener = ConntrackListener::start(&lab).expect("starting conntrack -E");
    println!(
        "lab {}:\n{}\nconntrack -E event socket buffer: {} bytes",
        lab.prefix,
        lab.describe(),
        listener.rcvbuf
    );

    let t0 = Instant::now();
    let flows =
        generate(&lab, &servers, &TrafficPlan::everything(&lab, 2)).expect("generating traffic");
    println!("{} flows in {:.2?}", flows.len(), t0.elapsed());
    assert_eq!(flows.len(), 6 * 2 * lab.subscribers_v4.len());
    for kind in FlowKind::ALL {
        assert!(
            flows
                .iter()
                .any(|f| f.proto == kind.proto() && f.internal.is_ipv6() == kind.v6),
            "no flow of {kind:?}"
        );
    }

    // Let the NEW events arrive, then compare both truth sources flow by flow.
    std::thread::sleep(Duration::from_millis(500));
    let events = listener.events();
    let mut tally = Tally::default();
    for f in &flows {
        tally.check(
            "external in the NAT pool",
            match f.external.ip() {
                IpAddr::V4(ip) => {
                    let port_ok = f.proto == IPPROTO_ICMP || (POOL_PORTS.0..=POOL_PORTS.1).contains(&f.external.port());
                    if (POOL_FIRST..=POOL_LAST).contains(&ip) && port_ok {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!("{f:?}: external outside the pool {POOL_FIRST}-{POOL_LAST}:{POOL_PORTS:?}"))
                    }
                }
                IpAddr::V6(ip) if ip == NAT_UP_V6 => Ok(()),
                IpAddr::V6(_) => Err(anyhow::anyhow!("{f:?}: IPv6 external is not the masquerade address {NAT_UP_V6}")),
            },
        );
        let key = flow_key(f);
        let new = events.iter().find(|e| {
            e.kind == nattrace_e2e::conntrack_truth::CtEventKind::New && (e.proto, e.orig) == key
        });
        tally.check(
            "server peer = conntrack reply",
            match new.and_then(|e| e.reply) {
                None => Err(anyhow::anyhow!("no NEW event with a reply tuple for {f:?}")),
                Some(r) => {
                    let icmp = f.proto == IPPROTO_ICMP || f.proto == IPPROTO_ICMPV6;
                    let port = if icmp { r.sport } else { r.dport };
                    if r.dst == f.external.ip() && port == f.external.port() {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!(
                            "server saw {} but conntrack translated to {}:{port} ({f:?})",
                            f.external,
                            r.dst
                        ))
                    }
                }
            },
        );
        tally.check(
            "NEW close to first packet",
            match new {
                Some(e)
                    if nattrace_e2e::util::within(e.time, f.sent_at, Duration::from_secs(1)) =>
                {
                    Ok(())
                }
                Some(e) => Err(anyhow::anyhow!(
                    "NEW at {:?} far from first packet at {:?}",
                    e.time,
                    f.sent_at
                )),
                None => Err(anyhow::anyhow!("no NEW event for {f:?}")),
            },
        );
    }

    // Ends: let the timeouts pass, reap, force the rest a few dozen at a time.
    std::thread::sleep(nattrace_e2e::lab::expiry_wait(&lab));
    evict_expired(&lab).expect("conntrack -L");
    let mut sources = lab.subscribers(false);
    sources.extend(lab.subscribers(true));
    let deleted = delete_chunked(&lab, &sources, &[6, 17, 1, 58]).expect("chunked conntrack -D");
    let keys: Vec<_> = flows.iter().map(flow_key).collect();
    let first = flows
        .iter()
        .map(|f| f.sent_at)
        .min()
        .unwrap_or_else(SystemTime::now);
    let missing = listener.wait_for_destroys(&keys, first, Duration::from_secs(10));
    println!(
        "forced {deleted} stragglers; {} flows without a DESTROY",
        missing.len()
    );
    tally.check(
        "every flow destroyed",
        if missing.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "no DESTROY for {} flows, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ))
        },
    );
    tally.check(
        "conntrack table empty",
        match table_count(&lab) {
            Ok(0) => Ok(()),
            Ok(n) => Err(anyhow::anyhow!("{n} entries left")),
            Err(e) => Err(e),
        },
    );
    tally.check("listener lost nothing", listener.check_no_overrun());
    tally.check(
        "listener printed only events",
        if listener.unparsed().is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("unparsed lines: {:?}", listener.unparsed()))
        },
    );
    tally.finish("lab_truth_sources_agree");
}

/// A burst of a few thousand bindings created and deleted must reach the listener whole: the
/// conntrack-tools `--buffer-size` work-around is what makes `conntrack -E` usable as truth.
#[test]
#[ignore = "privileged end-to-end test: run as root with `cargo xtask test`"]
fn truth_listener_survives_a_burst() {
    let lab = Lab::new(LabConfig {
        conntrack_timeout_secs: 120,
        ..LabConfig::default()
    })
    .expect("building the lab");
    let servers = Servers::start(&lab).expect("starting the servers");
    let listener = ConntrackListener::start(&lab).expect("starting conntrack -E");
    let burst = nattrace_e2e::traffic::udp_burst(&lab, &servers, 3000, false).expect("burst");
    std::thread::sleep(Duration::from_secs(1));
    let index = listener.index();
    let news = index.count_new(
        17,
        &lab.subscribers(false),
        FlowKind {
            l4: nattrace_e2e::traffic::L4::Udp,
            v6: false,
        }
        .destination(),
        burst.started,
    );
    println!(
        "burst: {} sent, {} observed by the server, {} NEW events",
        burst.sent,
        burst.observed.len(),
        news
    );
    let before = table_count(&lab).expect("conntrack -C");
    // All at once, in the kernel: the harshest case for a listener.
    lab.exec_in(nattrace_e2e::lab::Ns::Nat, "conntrack", &["-F"])
        .expect("conntrack -F");
    let keys: Vec<_> = burst.observed.iter().map(flow_key).collect();
    let missing = listener.wait_for_destroys(&keys, burst.started, Duration::from_secs(10));
    listener.check_no_overrun().expect("listener overran");
    assert!(
        missing.is_empty(),
        "{} of {} observed flows have no DESTROY after conntrack -F",
        missing.len(),
        keys.len()
    );
    // Every datagram the server saw went through the NAT and made an entry (a datagram may be
    // dropped after the NAT, never before an entry exists).
    assert!(
        news >= burst.observed.len(),
        "{news} NEW events but the server saw {} flows ({before} entries in the table)",
        burst.observed.len()
    );
    assert!(
        burst.observed.len() * 100 >= burst.sent * 99,
        "the server saw only {} of {} datagrams",
        burst.observed.len(),
        burst.sent
    );
}
