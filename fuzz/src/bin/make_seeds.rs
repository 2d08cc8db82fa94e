//! Writes the seed inputs of fuzz targets into `DIR/TARGET/` (`make_seeds DIR [TARGET...]`,
//! all of them when none is named): valid inputs made by the encoders and the export code
//! themselves, so that the seeds follow the formats without binaries in the repository.
//!
//! `segment_decoder`: small valid files of every layout the decoders read:
//! - `sealed.seg`: a columnar segment (`NATTRCOL`) with IPv4, IPv6, ICMP, DNAT-only (raw
//!   tuples), open, carried and approximate rows, and one coverage event of each kind;
//! - `sealed-empty.seg`: a columnar segment without rows or events;
//! - `block.bin`: the block of `sealed.seg` alone (input of `columnar::decode_block`);
//! - `columns.bin`: the same block's columns, decompressed, as the target's column mode
//!   reads them (row count, then the columns separated by `|`);
//! - `legacy.seg`: a first-format segment (`NATTRSEG`) with a seal frame;
//! - `active.log`: a log (`NATTRLOG`) with a carried binding and no seal.
//!
//! `bundle_verify`: evidence bundles written by `evidence::export` from a data directory
//! made by `storage::Writer` (in a temporary directory), signed with the test key
//! `nattrace_fuzz::TEST_SIGNER_KEY`; each as the archive (`NAME.nattrace`) and in the files
//! form the target also reads (`NAME.files`, see `nattrace_fuzz::files_form`):
//! - `point`: a point query (`--external IP:PORT --at T`), one binding in one segment;
//! - `carried`: a window over a binding open across a rotation: its rows in two segments,
//!   two checkpoints chained;
//! - `internal-udp`: `--internal IP --proto udp` over a window with a loss of events, so the
//!   bundle's coverage has a gap; three segments.
//!
//! The checked-in copies in `fuzz/seeds/bundle_verify/` are refreshed with
//! `make_seeds fuzz/seeds bundle_verify` (a bundle holds the export time and user, and the
//! data directory's random writer id, so each run writes other bytes).
//!
//! Not a fuzz target: cargo-fuzz builds it with the targets (`cargo fuzz build`), and
//! `cargo xtask fuzz` runs it before fuzzing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracer_user::binding::{
    Binding, Counters, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_DST_NAT,
    IPS_SRC_NAT, StartSource, Tuple,
};
use tracer_user::evidence::Files;
use tracer_user::evidence::check::verify_bundle;
use tracer_user::evidence::export::{ExportArgs, export};
use tracer_user::query::Question;
use tracer_user::signing;
use tracer_user::storage::columnar::{self, Row, SegmentHeader};
use tracer_user::storage::segment::{self, Header, Seal};
use tracer_user::storage::{CoverageEvent, LossCause, Writer, WriterOptions};

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

/// The targets `make_seeds` writes seeds for.
const TARGETS: &[&str] = &["segment_decoder", "bundle_verify"];

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: make_seeds DIR [TARGET...] (writes DIR/TARGET/*; targets: {TARGETS:?})");
        std::process::exit(2);
    };
    let only: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    if let Some(t) = only.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        eprintln!("make_seeds: no seeds for {t:?}; the targets are {TARGETS:?}");
        std::process::exit(2);
    }
    for target in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        let dir = dir.join(target);
        std::fs::create_dir_all(&dir)?;
        let seeds = match *target {
            "segment_decoder" => segment_decoder_seeds(),
            _ => bundle_verify_seeds()?,
        };
        let n = seeds.len();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        eprintln!("make_seeds: wrote {n} seeds into {}", dir.display());
    }
    Ok(())
}

fn segment_decoder_seeds() -> Vec<(String, Vec<u8>)> {
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
    seeds
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), bytes))
        .collect()
}

/// 2026-11-02T10:00:00Z: the bundle seeds' bindings start from here.
const B0: i64 = 1_793_613_600 * S;

/// Binding `i` of the bundle seeds' data directory: subscriber 100.64.0.(i % 3 + 1), public
/// 203.0.113.(i % 2 + 1) port 20000 + i % 5, starting at B0 + 10 i s, lasting 4 s; UDP for
/// i = 6, TCP otherwise.
fn lab_binding(id: u64, i: u64) -> Binding {
    let start = B0 + i as i64 * 10 * S;
    let udp = i == 6;
    let dst = ip("198.51.100.20");
    let dst_port = if udp { 53 } else { 443 };
    let ext = ip(&format!("203.0.113.{}", i % 2 + 1));
    Binding {
        id,
        proto: if udp { IPPROTO_UDP } else { IPPROTO_TCP },
        status: IPS_SRC_NAT | IPS_CONFIRMED,
        orig: Tuple {
            src: ip(&format!("100.64.0.{}", i % 3 + 1)),
            dst,
            src_port: 40_000 + i as u16,
            dst_port,
        },
        reply: Tuple {
            src: dst,
            dst: ext,
            src_port: dst_port,
            dst_port: 20_000 + (i % 5) as u16,
        },
        start_ns: start,
        end_ns: Some(start + 4 * S),
        orig_counters: Some(Counters {
            packets: 10 + i,
            bytes: 1_000 + i,
        }),
        reply_counters: Some(Counters {
            packets: 8,
            bytes: 800,
        }),
        ..Binding::EMPTY
    }
}

/// A data directory in `dir`: ten bindings through the agent's writer, four binding records
/// a segment, binding 3 written open and ended 25 s later (carried over a rotation), a loss
/// of events at B0 + 75 s; every segment sealed and signed with the test key.
fn lab(dir: &Path) -> Result<()> {
    let options = WriterOptions {
        max_segment_records: 4,
        ..WriterOptions::default()
    };
    let mut w = Writer::open_with_options(dir, options)?;
    w.sign_with(Arc::new(nattrace_fuzz::test_signer()))?;
    w.append_event(CoverageEvent::AgentStart {
        t_ns: B0 - 5 * S,
        pid: 4242,
    });
    w.append_event(CoverageEvent::Attached {
        t_ns: B0 - 4 * S,
        backend: "netfilter".to_owned(),
    });
    let mut carried = None;
    for i in 0..10 {
        let id = w.next_binding_id();
        let mut b = lab_binding(id, i);
        if i == 3 {
            let mut open = b.clone();
            open.end_ns = None;
            w.append_binding(&open);
            b.end_ns = Some(b.start_ns + 25 * S);
            carried = Some(b);
        } else {
            w.append_binding(&b);
        }
        if i == 5
            && let Some(c) = carried.take()
        {
            w.append_binding(&c);
        }
        if i == 7 {
            w.append_event(CoverageEvent::Loss {
                t_ns: B0 + 75 * S,
                cause: LossCause::RingFull,
                count: 2,
                detail: "ring buffer full".to_owned(),
            });
        }
        w.append_event(CoverageEvent::Heartbeat {
            t_ns: B0 + i as i64 * 10 * S + 5 * S,
        });
        w.flush()?;
    }
    w.append_event(CoverageEvent::Detached { t_ns: B0 + 100 * S });
    w.append_event(CoverageEvent::AgentStop { t_ns: B0 + 101 * S });
    w.close()?;
    Ok(())
}

/// Seconds since the epoch of B0 + `plus_s`, as `--at`, `--from` and `--to` take them.
fn lab_time(plus_s: i64) -> String {
    ((B0 + plus_s * S) / S).to_string()
}

fn bundle_verify_seeds() -> Result<Vec<(String, Vec<u8>)>> {
    let tmp = std::env::temp_dir().join(format!("nattrace-make-seeds-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let result = bundle_seeds_in(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn bundle_seeds_in(tmp: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let data = tmp.join("data");
    lab(&data)?;
    let (key_file, _) = signing::write_key_pair(&tmp.join("keys"), &nattrace_fuzz::test_signer())?;
    let now = B0 + 86_400 * S;
    let export_args = |name: &str, question: Question| ExportArgs {
        data_dir: data.clone(),
        case: format!("FUZZ-SEED-{name}"),
        out: tmp.join(format!("{name}.nattrace")),
        reason: None,
        sign_key: Some(key_file.clone()),
        question,
    };
    let point = export_args(
        "point",
        Question {
            external: Some("203.0.113.2:20001".to_owned()),
            at: Some(lab_time(11)),
            slack: Some("2s".to_owned()),
            ..Question::default()
        },
    );
    let carried = export_args(
        "carried",
        Question {
            external: Some("203.0.113.2".to_owned()),
            from: Some(lab_time(30)),
            to: Some(lab_time(40)),
            ..Question::default()
        },
    );
    let internal_udp = export_args(
        "internal-udp",
        Question {
            internal: Some("100.64.0.1".to_owned()),
            proto: Some("udp".to_owned()),
            from: Some(lab_time(60)),
            to: Some(lab_time(90)),
            ..Question::default()
        },
    );
    let mut seeds = Vec::new();
    for args in [point, carried, internal_udp] {
        let mut err = Vec::new();
        let e = export(&args, now, &mut err).map_err(|e| {
            format!(
                "export of {}: {e:#} ({})",
                args.out.display(),
                String::from_utf8_lossy(&err).trim()
            )
        })?;
        let bundle = std::fs::read(&e.path)?;
        let report = verify_bundle(&bundle, &nattrace_fuzz::test_signer().verifier(), &[]);
        if !report.is_verified() || e.manifest.bindings == 0 {
            return Err(format!(
                "{}: {} bindings, problems {:?}",
                e.path.display(),
                e.manifest.bindings,
                report.problems
            )
            .into());
        }
        let name = e
            .path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let files = Files::read_tar(bundle.as_slice())?;
        eprintln!(
            "make_seeds: {name}: {} bytes, {} bindings, {} records, {} segments",
            bundle.len(),
            e.manifest.bindings,
            e.manifest.records,
            e.manifest.segments.len()
        );
        seeds.push((format!("{name}.files"), nattrace_fuzz::files_form(&files)));
        seeds.push((format!("{name}.nattrace"), bundle));
    }
    Ok(seeds)
}
