//! The storage engine answers every kind of query exactly as the query's meaning says
//! ([`Query::select`] over the final state of every binding, an in-memory model), whatever
//! the segment boundaries, carried bindings and ends written in later segments; and a point
//! query reads only the blocks that can hold its answer.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use tracer_user::binding::{
    Binding, Counters, IPPROTO_TCP, IPPROTO_UDP, IPS_SRC_NAT, StartSource, Tuple,
};
use tracer_user::query::Query;
use tracer_user::storage::columnar::{self, Row, SegmentHeader};
use tracer_user::storage::seal::{round_times, write_sealed};
use tracer_user::storage::{Search, Writer, WriterOptions, search};

const S: i64 = 1_000_000_000;
/// Far in the future of every generated time: open bindings last until then.
const NOW: i64 = 10_000 * S;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn externals() -> [IpAddr; 3] {
    [ip("203.0.113.7"), ip("203.0.113.8"), ip("2001:db8:1::7")]
}

/// A binding from small random choices, so that keys and times collide often.
#[derive(Clone, Debug)]
struct Spec {
    ext: usize,
    ext_port: u16,
    int: u8,
    keep_port: bool,
    dst: u8,
    dst_port: u16,
    udp: bool,
    start_ms: i64,
    dur_ms: Option<i64>,
    /// Write it open first, and its end only after this many later bindings (0: at once).
    end_after: usize,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..3usize,
        1..12u16,
        0..6u8,
        any::<bool>(),
        0..4u8,
        prop_oneof![Just(443u16), Just(53), Just(80)],
        any::<bool>(),
        0..100_000i64,
        prop::option::weighted(0.8, 0..40_000i64),
        prop_oneof![3 => Just(0usize), 1 => 1..40usize],
    )
        .prop_map(
            |(ext, ext_port, int, keep_port, dst, dst_port, udp, start_ms, dur_ms, end_after)| {
                Spec {
                    ext,
                    ext_port,
                    int,
                    keep_port,
                    dst,
                    dst_port,
                    udp,
                    start_ms,
                    dur_ms,
                    end_after,
                }
            },
        )
}

fn binding(id: u64, s: &Spec) -> Binding {
    let ext = externals()[s.ext];
    let v6 = ext.is_ipv6();
    let int = if v6 {
        ip(&format!("2001:db8::{}", s.int + 1))
    } else {
        ip(&format!("100.64.0.{}", s.int + 1))
    };
    let dst = if v6 {
        ip(&format!("2001:db8:2::{}", s.dst + 1))
    } else {
        ip(&format!("192.0.2.{}", s.dst + 1))
    };
    let int_port = if s.keep_port {
        s.ext_port
    } else {
        40_000 + s.ext_port
    };
    Binding {
        id,
        proto: if s.udp { IPPROTO_UDP } else { IPPROTO_TCP },
        zone: 0,
        mark: 0,
        status: IPS_SRC_NAT,
        orig: Tuple {
            src: int,
            dst,
            src_port: int_port,
            dst_port: s.dst_port,
        },
        reply: Tuple {
            src: dst,
            dst: ext,
            src_port: s.dst_port,
            dst_port: s.ext_port,
        },
        start_ns: s.start_ms * 1_000_000 + 1234,
        start_approximate: false,
        start_source: StartSource::Ring,
        end_ns: s.dur_ms.map(|d| (s.start_ms + d) * 1_000_000 + 999),
        end_approximate: false,
        orig_counters: s.dur_ms.map(|d| Counters {
            packets: d as u64,
            bytes: 100 * d as u64,
        }),
        reply_counters: None,
    }
}

#[derive(Clone, Debug)]
struct QuerySpec {
    ext: Option<(usize, Option<u16>)>,
    int: Option<(u8, Option<u16>)>,
    dst: Option<(u8, Option<u16>)>,
    udp: Option<bool>,
    from_ms: i64,
    len_ms: i64,
}

fn query_spec() -> impl Strategy<Value = QuerySpec> {
    (
        prop::option::of((0..3usize, prop::option::of(1..12u16))),
        prop::option::of((0..6u8, prop::option::of(1..12u16))),
        prop::option::of((
            0..4u8,
            prop::option::of(prop_oneof![Just(443u16), Just(53)]),
        )),
        prop::option::weighted(0.2, any::<bool>()),
        0..150_000i64,
        prop_oneof![Just(0i64), 0..5_000i64, 0..200_000i64],
    )
        .prop_map(|(ext, int, dst, udp, from_ms, len_ms)| QuerySpec {
            ext,
            int,
            dst,
            udp,
            from_ms,
            len_ms,
        })
}

fn to_query(q: &QuerySpec) -> Query {
    // Addresses of either family: a v6 subscriber under a v4 query simply matches nothing.
    let fam = |v6: bool, v4s: String, v6s: String| if v6 { ip(&v6s) } else { ip(&v4s) };
    let v6 = q.ext.is_some_and(|(e, _)| externals()[e].is_ipv6());
    Query {
        search: Search {
            external: q.ext.map(|(e, p)| (externals()[e], p)),
            internal: q.int.map(|(i, p)| {
                let a = fam(
                    v6,
                    format!("100.64.0.{}", i + 1),
                    format!("2001:db8::{}", i + 1),
                );
                (a, p.map(|p| if p % 2 == 0 { p } else { 40_000 + p }))
            }),
            destination: q.dst.map(|(d, p)| {
                (
                    fam(
                        v6,
                        format!("192.0.2.{}", d + 1),
                        format!("2001:db8:2::{}", d + 1),
                    ),
                    p,
                )
            }),
            proto: q.udp.map(|u| if u { IPPROTO_UDP } else { IPPROTO_TCP }),
            from_ns: q.from_ms * 1_000_000,
            to_ns: (q.from_ms + q.len_ms) * 1_000_000,
        },
    }
}

/// Writes the bindings through the agent's writer: several runs, frequent rotations, some
/// ends written long after their start (so in later segments, after being carried).
/// Returns the final state of every binding, as stored.
fn write(dir: &Path, specs: &[Spec], rotate_every: u64, runs: usize) -> Vec<Binding> {
    let options = WriterOptions {
        max_segment_records: rotate_every,
        ..WriterOptions::default()
    };
    let per_run = specs.len().div_ceil(runs.max(1)).max(1);
    let mut finals: Vec<Binding> = Vec::new();
    // (due at index, binding with its end)
    let mut late: Vec<(usize, Binding)> = Vec::new();
    let mut w = Writer::open_with_options(dir, options).unwrap();
    for (i, s) in specs.iter().enumerate() {
        if i > 0 && i % per_run == 0 {
            w.close().unwrap();
            w = Writer::open_with_options(dir, options).unwrap();
        }
        let id = w.next_binding_id();
        let b = binding(id, s);
        if s.end_after > 0 && b.end_ns.is_some() {
            let mut open = b.clone();
            open.end_ns = None;
            w.append_binding(&open);
            late.push((i + s.end_after, b.clone()));
        } else {
            w.append_binding(&b);
        }
        finals.push(b);
        let (due, rest): (Vec<_>, Vec<_>) = late.into_iter().partition(|(at, _)| *at <= i);
        late = rest;
        for (_, b) in due {
            w.append_binding(&b);
        }
        w.flush().unwrap();
    }
    for (_, b) in late {
        w.append_binding(&b);
    }
    w.close().unwrap();
    finals.into_iter().map(round_times).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(
        specs in prop::collection::vec(spec(), 1..120),
        rotate_every in 3..40u64,
        runs in 1..4usize,
        queries in prop::collection::vec(query_spec(), 1..25),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let model = write(dir.path(), &specs, rotate_every, runs);
        for qs in &queries {
            let q = to_query(qs);
            if q.search.external.is_none() && q.search.internal.is_none() && q.search.destination.is_none() {
                continue;
            }
            let want = q.select(&model, NOW);
            let snap = search(dir.path(), &q.search).unwrap();
            prop_assert!(snap.problems.is_empty(), "{:?}", snap.problems);
            let got = q.select(&snap.bindings, NOW);
            prop_assert_eq!(got, want, "query {:?}", qs);
        }
    }
}

/// One sealed segment of 100 000 bindings in 7 blocks: a point query reads one block, a key
/// that is not there reads none, and the answer is the one binding.
#[test]
fn point_query_reads_only_candidate_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let seg_dir = dir.path().join("segments");
    std::fs::create_dir_all(&seg_dir).unwrap();
    let mut rows = Vec::new();
    for i in 0..100_000u64 {
        let s = Spec {
            ext: (i % 2) as usize,
            ext_port: 1024 + (i / 2 % 60_000) as u16,
            int: (i % 6) as u8,
            keep_port: true,
            dst: (i % 4) as u8,
            dst_port: 443,
            udp: false,
            start_ms: (i / 120_000) as i64 * 200_000 + (i as i64 % 1000) * 90,
            dur_ms: Some(30_000),
            end_after: 0,
        };
        rows.push(Row {
            binding: round_times(binding(i + 1, &s)),
            carried: false,
        });
    }
    let target = rows[77_777].binding.clone();
    let header = SegmentHeader {
        seq: 1,
        writer_id: [1; 16],
        prev_seq: 0,
        prev_root: [0; 32],
        window_start_ns: 0,
        window_end_ns: 200 * S,
    };
    let (bytes, _) = columnar::encode_segment(&header, rows, &[]);
    write_sealed(&seg_dir, 1, &bytes).unwrap();

    let (eip, eport) = target.external();
    let at = target.start_ns + S;
    let q = Search {
        external: Some((eip, Some(eport))),
        internal: None,
        destination: None,
        proto: None,
        from_ns: at - 2 * S,
        to_ns: at + 2 * S,
    };
    let snap = search(dir.path(), &q).unwrap();
    assert_eq!(snap.bindings, vec![target]);
    assert_eq!(
        snap.blocks_read, 1,
        "a point query reads one block of seven"
    );

    let absent = Search {
        external: Some((ip("203.0.113.7"), Some(7))),
        ..q
    };
    let snap = search(dir.path(), &absent).unwrap();
    assert!(snap.bindings.is_empty());
    assert_eq!(snap.blocks_read, 0, "no block can hold it");

    let _ = Duration::ZERO;
}
