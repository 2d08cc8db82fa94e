//! The agent's per-binding hot path, measured in one process next to its baselines:
//!
//! 1. decode only: raw ring-buffer records to start events (the floor);
//! 2. + merge: the tracker matching each start with its DESTROY;
//! 3. + store: the open and closed records encoded, compressed and written to a segment.
//!
//! Each binding ends 100,000 bindings after it started, so that many are open at once.
//! Run with `cargo bench -p tracer-user --bench agent_path` (or `cargo xtask bench`).
//! Needs the running kernel's BTF for the tuple layout, as the agent does.

use std::{
    hint::black_box,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tracer_common::{NatEvent, TUPLE_BYTES};
use tracer_user::{
    binding::{Counters, IPPROTO_UDP, IPS_CONFIRMED, IPS_SRC_NAT},
    capture::{StartEvent, layout::KernelLayout},
    conntrack::CtEntry,
    storage::Writer,
    tracker::Tracker,
};

const BINDINGS: usize = 500_000;
/// Bindings open at any time in the steady state.
const OPEN_AT_ONCE: usize = 100_000;
/// Records handed from the tracker to the writer at a time.
const BATCH: usize = 4096;
/// Bindings between two flushes (the agent flushes every 200 ms: 50,000 at 250,000/s).
const FLUSH_EVERY: usize = 50_000;

fn raw_tuple(
    layout: &KernelLayout,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> [u8; TUPLE_BYTES] {
    let mut raw = [0u8; TUPLE_BYTES];
    let o = &layout.tuple;
    raw[o.src_addr..o.src_addr + 4].copy_from_slice(&src.octets());
    raw[o.src_port..o.src_port + 2].copy_from_slice(&sport.to_be_bytes());
    raw[o.l3num..o.l3num + 2].copy_from_slice(&2u16.to_ne_bytes());
    raw[o.dst_addr..o.dst_addr + 4].copy_from_slice(&dst.octets());
    raw[o.dst_port..o.dst_port + 2].copy_from_slice(&dport.to_be_bytes());
    raw[o.protonum] = IPPROTO_UDP;
    raw
}

fn events(layout: &KernelLayout) -> Vec<NatEvent> {
    let server = Ipv4Addr::new(192, 0, 2, 2);
    (0..BINDINGS)
        .map(|i| {
            let sub = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i as u32 % 5000));
            let public = Ipv4Addr::new(203, 0, 113, 7 + (i % 3) as u8);
            let sport = 1024 + (i / 5000) as u16;
            let ext = 20000 + (i % 20000) as u16;
            NatEvent {
                boot_ns: i as u64 * 1000,
                status: IPS_SRC_NAT,
                mark: 0,
                zone: 0,
                flags: 0,
                pad1: 0,
                orig: raw_tuple(layout, sub, sport, server, 53),
                reply: raw_tuple(layout, server, 53, public, ext),
            }
        })
        .collect()
}

fn end_of(s: &StartEvent) -> CtEntry {
    CtEntry {
        proto: s.proto,
        orig: s.orig,
        reply: s.reply,
        zone: s.zone,
        mark: s.mark,
        status: s.status | IPS_CONFIRMED,
        orig_counters: Some(Counters {
            packets: 2,
            bytes: 120,
        }),
        reply_counters: Some(Counters {
            packets: 2,
            bytes: 300,
        }),
        start_ns: Some(1),
        stop_ns: Some(2),
    }
}

fn report(name: &str, elapsed: Duration, baseline: Option<Duration>) {
    let ns = elapsed.as_nanos() as f64 / BINDINGS as f64;
    let rate = BINDINGS as f64 / elapsed.as_secs_f64();
    match baseline {
        Some(b) => println!(
            "{name:<34} {ns:>8.0} ns/binding  {rate:>12.0} bindings/s  ({:.1}x decode only)",
            elapsed.as_secs_f64() / b.as_secs_f64()
        ),
        None => println!("{name:<34} {ns:>8.0} ns/binding  {rate:>12.0} bindings/s"),
    }
}

fn main() {
    let layout = KernelLayout::from_running_kernel().expect("running kernel BTF");
    let raw = events(&layout);
    println!("agent hot path, {BINDINGS} bindings, one core");

    let t = Instant::now();
    let starts: Vec<StartEvent> = raw
        .iter()
        .filter_map(|e| layout.tuple.decode_event(e))
        .collect();
    let decode = t.elapsed();
    assert_eq!(starts.len(), BINDINGS);
    report("decode only (baseline)", decode, None);

    // Steady state of a busy NAT: every binding ends OPEN_AT_ONCE bindings after it started,
    // so that many are open at any time, and records are handed on in batches as the agent does.
    let mut ids = 0u64;
    let mut alloc = || {
        ids += 1;
        ids
    };
    let mut out = Vec::with_capacity(2 * BATCH);
    let t = Instant::now();
    let mut tracker = Tracker::new();
    for (i, e) in raw.iter().enumerate() {
        let s = layout.tuple.decode_event(e).expect("decodes");
        tracker.on_start(&s, i as i64, &mut alloc, &mut out);
        if i >= OPEN_AT_ONCE {
            tracker.on_destroy(end_of(&starts[i - OPEN_AT_ONCE]), 0, &mut out);
        }
        if out.len() >= BATCH {
            black_box(&out);
            out.clear();
        }
    }
    for s in &starts[BINDINGS - OPEN_AT_ONCE..] {
        tracker.on_destroy(end_of(s), 0, &mut out);
    }
    let merge = t.elapsed();
    assert_eq!(tracker.open_count(), 0);
    report("decode + merge start and end", merge, Some(decode));

    let dir = tempfile::tempdir().expect("temp dir");
    let mut writer = Writer::open(dir.path()).expect("writer");
    out.clear();
    let t = Instant::now();
    let mut tracker = Tracker::new();
    for (i, e) in raw.iter().enumerate() {
        let s = layout.tuple.decode_event(e).expect("decodes");
        tracker.on_start(&s, i as i64, &mut || writer.next_binding_id(), &mut out);
        if i >= OPEN_AT_ONCE {
            tracker.on_destroy(end_of(&starts[i - OPEN_AT_ONCE]), 0, &mut out);
        }
        if out.len() >= BATCH {
            for b in out.drain(..) {
                writer.append_binding(&b);
            }
        }
        if i % FLUSH_EVERY == 0 {
            writer.flush().expect("flush");
        }
    }
    for s in &starts[BINDINGS - OPEN_AT_ONCE..] {
        tracker.on_destroy(end_of(s), 0, &mut out);
    }
    for b in out.drain(..) {
        writer.append_binding(&b);
    }
    writer.flush().expect("flush");
    let store = t.elapsed();
    report("decode + merge + store (segment)", store, Some(decode));
    writer.close().expect("close");
}
