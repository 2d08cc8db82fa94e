//! Writes the seed inputs of the `segment_decoder` fuzz target into `DIR/segment_decoder/`
//! (`make_seeds DIR`): small valid files of every layout the decoders read, made by the
//! encoders themselves, so the seeds follow the format without binaries in the repository.
//!
//! - `sealed.seg`: a columnar segment (`NATTRCOL`) with IPv4, IPv6, ICMP, DNAT-only (raw
//!   tuples), open, carried and approximate rows, and one coverage event of each kind;
//! - `sealed-empty.seg`: a columnar segment without rows or events;
//! - `block.bin`: the block of `sealed.seg` alone (input of `columnar::decode_block`);
//! - `columns.bin`: the same block's columns, decompressed, as the target's column mode
//!   reads them (row count, then the columns separated by `|`);
//! - `legacy.seg`: a first-format segment (`NATTRSEG`) with a seal frame;
//! - `active.log`: a log (`NATTRLOG`) with a carried binding and no seal.
//!
//! Not a fuzz target: cargo-fuzz builds it with the targets (`cargo fuzz build`), and
//! `cargo xtask fuzz` runs it before fuzzing.

use std::net::IpAddr;
use std::path::PathBuf;

use tracer_user::binding::{
    Binding, Counters, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_DST_NAT,
    IPS_SRC_NAT, StartSource, Tuple,
};
use tracer_user::storage::columnar::{self, Row, SegmentHeader};
use tracer_user::storage::segment::{self, Header, Seal};
use tracer_user::storage::{CoverageEvent, LossCause};

const T0: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z
const S: i64 = 1_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a valid address")
}

/// An SNAT binding of `internal` behind `external` towards `destination` (ports of TCP/UDP).
fn snat(id: u64, proto: u8, int: (&str, u16), ext: (&str, u16), dst: (&str, u16)) -> Binding {
    Binding {
        id,
        proto,
        zone: 0,
        mark: 0,
        status: IPS_SRC_NAT | IPS_CONFIRMED,
        orig: Tuple {
            src: ip(int.0),
            dst: ip(dst.0),
            src_port: int.1,
            dst_port: dst.1,
        },
        reply: Tuple {
            src: ip(dst.0),
            dst: ip(ext.0),
            src_port: dst.1,
            dst_port: ext.1,
        },
        start_ns: T0 + id as i64 * S,
        start_approximate: false,
        start_source: StartSource::Ring,
        end_ns: Some(T0 + id as i64 * S + 30 * S),
        end_approximate: false,
        orig_counters: Some(Counters {
            packets: 10,
            bytes: 1_000,
        }),
        reply_counters: Some(Counters {
            packets: 8,
            bytes: 9_000,
        }),
    }
}

fn bindings() -> Vec<Binding> {
    let tcp = snat(
        1,
        IPPROTO_TCP,
        ("100.64.0.10", 40_000),
        ("203.0.113.7", 20_001),
        ("192.0.2.2", 443),
    );
    let mut udp = snat(
        2,
        IPPROTO_UDP,
        ("100.64.0.11", 5_353),
        ("203.0.113.7", 20_002),
        ("192.0.2.53", 53),
    );
    udp.end_ns = None;
    udp.orig_counters = None;
    udp.reply_counters = None;
    udp.start_source = StartSource::Dump;
    udp.start_approximate = true;
    let mut icmp = snat(
        3,
        IPPROTO_ICMP,
        ("100.64.0.12", 7),
        ("203.0.113.8", 9),
        ("192.0.2.2", 0),
    );
    // ICMP echo: both identifiers in src_port, no destination port.
    icmp.orig.dst_port = 0;
    icmp.reply.src_port = 9;
    icmp.reply.dst_port = 0;
    icmp.start_source = StartSource::Destroy;
    icmp.end_approximate = true;
    let mut v6 = snat(
        4,
        IPPROTO_TCP,
        ("2001:db8::10", 50_000),
        ("2001:db8:ff::7", 61_000),
        ("2001:db8:1::1", 80),
    );
    v6.zone = 3;
    v6.mark = 0x2a;
    v6.start_source = StartSource::Import;
    // A port forward: DNAT only, internal and external from the other tuple.
    let mut dnat = snat(
        5,
        IPPROTO_TCP,
        ("198.51.100.9", 33_000),
        ("203.0.113.9", 8_080),
        ("100.64.0.20", 80),
    );
    dnat.status = IPS_DST_NAT | IPS_CONFIRMED;
    vec![tcp, udp, icmp, v6, dnat]
}

fn events() -> Vec<CoverageEvent> {
    vec![
        CoverageEvent::AgentStart {
            t_ns: T0 - 2 * S,
            pid: 4242,
        },
        CoverageEvent::Attached {
            t_ns: T0 - S,
            backend: "netfilter".to_owned(),
        },
        CoverageEvent::Heartbeat { t_ns: T0 },
        CoverageEvent::Loss {
            t_ns: T0 + 5 * S,
            cause: LossCause::RingFull,
            count: 3,
            detail: "ring buffer full".to_owned(),
        },
        CoverageEvent::Detached { t_ns: T0 + 60 * S },
        CoverageEvent::AgentStop { t_ns: T0 + 61 * S },
    ]
}

fn sealed(bindings: &[Binding], events: &[CoverageEvent]) -> Vec<u8> {
    let header = SegmentHeader {
        seq: 2,
        writer_id: *b"nattrace-fuzz-01",
        prev_seq: 1,
        prev_root: [7; 32],
        window_start_ns: T0 - 10 * S,
        window_end_ns: T0 + 3_600 * S,
    };
    let rows = bindings
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut b = b.clone();
            b.start_ns = columnar::floor_time(b.start_ns);
            b.end_ns = b.end_ns.map(|e| columnar::ceil_time(e).max(b.start_ns));
            Row {
                binding: b,
                carried: i == 1,
            }
        })
        .collect();
    columnar::encode_segment(&header, rows, events).0
}

fn log(log: bool, bindings: &[Binding], events: &[CoverageEvent]) -> Vec<u8> {
    let mut out = Header {
        log,
        seq: 1,
        created_ns: T0 - 10 * S,
        run: 1,
    }
    .encode()
    .to_vec();
    let mut payload = Vec::new();
    for (i, b) in bindings.iter().enumerate() {
        if log && i == 0 {
            segment::encode_carried(&mut payload, b);
        } else {
            segment::encode_binding(&mut payload, b);
        }
    }
    segment::encode_frame(&mut out, &payload).expect("frame");
    payload.clear();
    for e in events {
        segment::encode_event(&mut payload, e);
    }
    segment::encode_frame(&mut out, &payload).expect("frame");
    if !log {
        payload.clear();
        segment::encode_seal(
            &mut payload,
            &Seal {
                binding_records: bindings.len() as u64,
                event_records: events.len() as u64,
                data_frames: 2,
                sealed_ns: T0 + 3_600 * S,
            },
        );
        segment::encode_frame(&mut out, &payload).expect("frame");
    }
    out
}

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: make_seeds DIR (writes DIR/segment_decoder/*)");
        std::process::exit(2);
    };
    let dir = dir.join("segment_decoder");
    std::fs::create_dir_all(&dir)?;
    let (bindings, events) = (bindings(), events());
    let file = sealed(&bindings, &events);
    let seg = columnar::SealedSegment::open(&file).expect("the encoder's segment opens");
    let fences = seg.fences(&file).expect("fences");
    let block = &fences[0].block;
    let start = usize::try_from(block.offset).expect("offset");
    let block = file[start..start + block.len as usize].to_vec();
    let parts = columnar::block_columns(&block).expect("the encoder's block splits");
    let mut columns = vec![u8::try_from(parts.rows).expect("fewer than 256 rows")];
    for (i, c) in parts.raw.iter().skip(1).enumerate() {
        if i > 0 {
            columns.push(b'|');
        }
        if c.contains(&b'|') {
            eprintln!(
                "make_seeds: column {} holds a '|': columns.bin will not decode",
                i + 1
            );
        }
        columns.extend_from_slice(c);
    }
    let seeds = [
        ("sealed.seg", file.clone()),
        ("sealed-empty.seg", sealed(&[], &[])),
        ("block.bin", block),
        ("columns.bin", columns),
        ("legacy.seg", log(false, &bindings, &events)),
        ("active.log", log(true, &bindings[..2], &events[..2])),
    ];
    let n = seeds.len();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    eprintln!("make_seeds: wrote {n} seeds into {}", dir.display());
    Ok(())
}
