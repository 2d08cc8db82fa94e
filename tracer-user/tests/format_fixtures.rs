//! Segment files written by earlier builds must keep reading the same.
//!
//! `tests/fixtures/` holds one small file of each on-disk layout, checked in as bytes:
//!
//! - `nattrcol-v1.seg`: a sealed columnar segment (`NATTRCOL`, version 1; frozen, read only);
//! - `nattrcol-v2.seg`: the same rows sealed in the current format (version 2);
//! - `nattrseg-v1.seg`: a sealed segment of the first, row-oriented format (`NATTRSEG`,
//!   version 1; FORMAT.md "Segment file"), which readers still read.
//!
//! The tests decode them and compare with the values written out below, which do not depend
//! on the encoder: a change to a decoder that reads an existing file differently fails here.
//! The files were made by [`regenerate_fixtures`] from the same values; regenerate them only
//! for a deliberate format change (a new version), never to make these tests pass:
//!
//! ```sh
//! NATTRACE_REGENERATE_FIXTURES=1 cargo test -p tracer-user --test format_fixtures -- --ignored
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use tracer_user::binding::{
    Binding, Counters, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_DST_NAT,
    IPS_SRC_NAT, StartSource, Tuple,
};
use tracer_user::storage::columnar::{self, Row, SealedSegment, SegmentHeader};
use tracer_user::storage::segment::{self, FrameAt, Header, Record, Seal};
use tracer_user::storage::{CoverageEvent, LossCause, filter, merkle, record};

const COLUMNAR: &str = "nattrcol-v1.seg";
/// The same rows and events sealed by the current encoder (format version 2). Version 1
/// files can no longer be written, so `nattrcol-v1.seg` is never regenerated.
const COLUMNAR_V2: &str = "nattrcol-v2.seg";
const FIRST_FORMAT: &str = "nattrseg-v1.seg";

/// 2026-11-02T10:14:07Z.
const T: i64 = 1_793_614_447_000_000_000;
const MS: i64 = 1_000_000;
const S: i64 = 1_000_000_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a valid address")
}

fn tuple(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Tuple {
    Tuple {
        src: ip(src),
        dst: ip(dst),
        src_port,
        dst_port,
    }
}

fn counters(packets: u64, bytes: u64) -> Option<Counters> {
    Some(Counters { packets, bytes })
}

/// A binding with the given identity and tuples; the rest as in most rows (closed TCP SNAT
/// from the ring, no counters), changed by the callers.
fn binding(id: u64, proto: u8, status: u32, orig: Tuple, reply: Tuple) -> Binding {
    Binding {
        id,
        proto,
        zone: 0,
        mark: 0,
        status,
        orig,
        reply,
        start_ns: 0,
        start_approximate: false,
        start_source: StartSource::Ring,
        end_ns: None,
        end_approximate: false,
        orig_counters: None,
        reply_counters: None,
    }
}

const SNAT: u32 = IPS_SRC_NAT | IPS_CONFIRMED;

// ---------------------------------------------------------------------------------------
// The columnar segment
// ---------------------------------------------------------------------------------------

fn columnar_header() -> SegmentHeader {
    SegmentHeader {
        seq: 2,
        writer_id: *b"fixture-writer-1",
        prev_seq: 1,
        prev_root: [0x11; 32],
        window_start_ns: T - 10 * S,
        window_end_ns: T + 3_600 * S,
    }
}

/// The rows of `nattrcol-v1.seg`, in stored order (external address, external port, start,
/// id), times in whole milliseconds (the stored unit).
fn columnar_rows() -> Vec<Row> {
    let row = |binding: Binding, carried: bool| Row { binding, carried };
    vec![
        // TCP SNAT, closed, both counters.
        row(
            Binding {
                start_ns: T + 250 * MS,
                end_ns: Some(T + 30_500 * MS),
                orig_counters: counters(10, 1_000),
                reply_counters: counters(8, 9_000),
                ..binding(
                    101,
                    IPPROTO_TCP,
                    SNAT,
                    tuple("100.64.0.10", 40_000, "192.0.2.2", 443),
                    tuple("192.0.2.2", 443, "203.0.113.7", 20_001),
                )
            },
            false,
        ),
        // The same external address and port again, later, still open.
        row(
            Binding {
                start_ns: T + 60 * S,
                ..binding(
                    105,
                    IPPROTO_TCP,
                    SNAT,
                    tuple("100.64.0.11", 40_001, "192.0.2.2", 443),
                    tuple("192.0.2.2", 443, "203.0.113.7", 20_001),
                )
            },
            false,
        ),
        // Carried over from the previous segment: started before the window, found by a dump.
        row(
            Binding {
                start_ns: T - 120 * S,
                start_approximate: true,
                start_source: StartSource::Dump,
                end_ns: Some(T + 5_001 * MS),
                orig_counters: counters(3, 180),
                ..binding(
                    90,
                    IPPROTO_UDP,
                    SNAT,
                    tuple("100.64.0.10", 5_353, "192.0.2.53", 53),
                    tuple("192.0.2.53", 53, "203.0.113.7", 20_002),
                )
            },
            true,
        ),
        // Mapping only (no destination), imported, open.
        row(
            Binding {
                start_ns: T + 20 * S,
                start_source: StartSource::Import,
                ..binding(
                    106,
                    IPPROTO_UDP,
                    SNAT,
                    tuple("100.64.0.13", 6_000, "0.0.0.0", 0),
                    tuple("0.0.0.0", 0, "203.0.113.7", 20_003),
                )
            },
            false,
        ),
        // ICMP echo: identifiers 7 (internal) and 9 (external), seen only at its end.
        row(
            Binding {
                start_ns: T + S,
                start_approximate: true,
                start_source: StartSource::Destroy,
                end_ns: Some(T + 2 * S),
                end_approximate: true,
                orig_counters: counters(1, 84),
                reply_counters: counters(1, 84),
                ..binding(
                    102,
                    IPPROTO_ICMP,
                    SNAT,
                    tuple("100.64.0.12", 7, "192.0.2.2", 0),
                    tuple("192.0.2.2", 9, "203.0.113.8", 0),
                )
            },
            false,
        ),
        // A port forward (DNAT only): 198.51.100.9 reached 203.0.113.9:8080, which is
        // 100.64.0.20:80 inside.
        row(
            Binding {
                start_ns: T + 3 * S,
                end_ns: Some(T + 4 * S),
                start_source: StartSource::Import,
                ..binding(
                    103,
                    IPPROTO_TCP,
                    IPS_DST_NAT | IPS_CONFIRMED,
                    tuple("198.51.100.9", 33_000, "203.0.113.9", 8_080),
                    tuple("100.64.0.20", 80, "198.51.100.9", 33_000),
                )
            },
            false,
        ),
        // SNAT and DNAT at once (hairpin): tuples that the columns cannot derive.
        row(
            Binding {
                start_ns: T + 30 * S,
                end_ns: Some(T + 31 * S),
                ..binding(
                    107,
                    IPPROTO_TCP,
                    IPS_SRC_NAT | IPS_DST_NAT | IPS_CONFIRMED,
                    tuple("100.64.0.30", 41_000, "203.0.113.10", 443),
                    tuple("100.64.0.40", 8_443, "203.0.113.10", 20_010),
                )
            },
            false,
        ),
        // IPv6 with a zone and a mark.
        row(
            Binding {
                zone: 3,
                mark: 0x2a,
                start_ns: T + 10 * S,
                end_ns: Some(T + 11_999 * MS),
                orig_counters: counters(4, 400),
                reply_counters: counters(3, 3_000),
                ..binding(
                    104,
                    IPPROTO_TCP,
                    SNAT,
                    tuple("2001:db8::10", 50_000, "2001:db8:1::1", 80),
                    tuple("2001:db8:1::1", 80, "2001:db8:ff::7", 61_000),
                )
            },
            false,
        ),
    ]
}

fn columnar_events() -> Vec<CoverageEvent> {
    vec![
        CoverageEvent::AgentStart {
            t_ns: T - 10 * S,
            pid: 4242,
        },
        CoverageEvent::Attached {
            t_ns: T - 9 * S,
            backend: "netfilter".to_owned(),
        },
        CoverageEvent::Heartbeat { t_ns: T },
        CoverageEvent::Loss {
            t_ns: T + 5 * S,
            cause: LossCause::NetlinkOverrun,
            count: 2,
            detail: "ENOBUFS".to_owned(),
        },
        CoverageEvent::Detached { t_ns: T + 100 * S },
        CoverageEvent::AgentStop { t_ns: T + 101 * S },
    ]
}

#[test]
fn columnar_v1_fixture_decodes_to_the_expected_rows() {
    let file = read_fixture(COLUMNAR);
    assert_eq!(&file[..8], b"NATTRCOL");
    assert_eq!(&file[8..12], &1u32.to_le_bytes(), "version 1");
    assert_eq!(&file[file.len() - 8..], b"NATTRCOL");

    let seg = SealedSegment::open(&file).expect("the fixture opens");
    assert_eq!(seg.header, columnar_header());
    assert_eq!(seg.file_len, file.len() as u64);
    let s = &seg.summary;
    assert_eq!((s.rows, s.carried_rows, s.open_rows), (8, 1, 2));
    assert_eq!((s.blocks, s.events), (1, 6));
    // The earliest answer is the carried row's, from the window start; the latest the open
    // rows', to the window end.
    assert_eq!((s.t_lo_ns, s.t_hi_ns), (T - 10 * S, T + 3_600 * S));

    let fences = seg.fences(&file).expect("fences");
    assert_eq!(fences.len(), 1);
    let fence = &fences[0];
    assert_eq!(fence.rows, 8);
    assert_eq!(fence.key_lo, (ip("203.0.113.7"), 20_001));
    assert_eq!(fence.key_hi, (ip("2001:db8:ff::7"), 61_000));
    let rows = seg.read_block(&file, fence).expect("the block decodes");
    assert_eq!(rows, columnar_rows());

    assert_eq!(seg.events(&file).expect("events"), columnar_events());

    // The filters hold every external (address, port) and internal address.
    let ext = seg.ext_filter(&file).expect("external filter");
    let int = seg.int_filter(&file).expect("internal filter");
    for r in &rows {
        let (eip, eport) = r.binding.external();
        assert!(ext.contains(filter::key(eip, eport)), "{eip}:{eport}");
        let iip = r.binding.internal().0;
        assert!(int.contains(filter::key(iip, 0)), "{iip}");
    }

    // The root covers the block and the events section as stored.
    let block = fence.block;
    let at = block.offset as usize;
    assert_eq!(
        fence.leaf,
        merkle::leaf_hash(&file[at..at + block.len as usize])
    );
    let ev = s.events_section;
    let at = ev.offset as usize;
    assert_eq!(
        s.events_leaf,
        merkle::leaf_hash(&file[at..at + ev.len as usize])
    );
    assert_eq!(s.root, merkle::root(&[fence.leaf, s.events_leaf]));
}

#[test]
fn columnar_v2_fixture_hashes_every_record() {
    let file = read_fixture(COLUMNAR_V2);
    assert_eq!(&file[8..12], &2u32.to_le_bytes(), "version 2");
    let seg = SealedSegment::open(&file).expect("the fixture opens");
    assert_eq!(seg.version, 2);
    assert_eq!(seg.header, columnar_header());
    let fences = seg.fences(&file).expect("fences");
    assert_eq!(fences.len(), 1);
    let rows = seg
        .read_block(&file, &fences[0])
        .expect("the block decodes");
    assert_eq!(rows, columnar_rows());
    assert_eq!(seg.events(&file).expect("events"), columnar_events());
    // The block's root is over its records' canonical encodings; the segment root over
    // every record, then the events (FORMAT.md, "Merkle trees").
    let mut leaves: Vec<merkle::Hash> = rows.iter().map(record::leaf).collect();
    assert_eq!(fences[0].leaf, merkle::root(&leaves));
    let events = record::events_data(&columnar_events());
    assert_eq!(seg.summary.events_leaf, merkle::leaf_hash(&events));
    leaves.push(seg.summary.events_leaf);
    assert_eq!(seg.summary.root, merkle::root(&leaves));
    // Byte-exact: the encoder still writes this fixture.
    let (again, _) =
        columnar::encode_segment(&columnar_header(), columnar_rows(), &columnar_events());
    assert_eq!(
        again, file,
        "the encoder's output changed: a format change needs a version"
    );
}

#[test]
fn columnar_v1_fixture_views_are_the_investigators() {
    // The same rows as an investigator reads them (Binding::internal/external/destination).
    let file = read_fixture(COLUMNAR);
    let seg = SealedSegment::open(&file).expect("the fixture opens");
    let fences = seg.fences(&file).expect("fences");
    let rows = seg
        .read_block(&file, &fences[0])
        .expect("the block decodes");
    let views: Vec<_> = rows
        .iter()
        .map(|r| {
            let b = &r.binding;
            (b.id, b.internal(), b.external(), b.destination())
        })
        .collect();
    let e = |a: &str, p: u16| (ip(a), p);
    assert_eq!(
        views,
        [
            (
                101,
                e("100.64.0.10", 40_000),
                e("203.0.113.7", 20_001),
                e("192.0.2.2", 443)
            ),
            (
                105,
                e("100.64.0.11", 40_001),
                e("203.0.113.7", 20_001),
                e("192.0.2.2", 443)
            ),
            (
                90,
                e("100.64.0.10", 5_353),
                e("203.0.113.7", 20_002),
                e("192.0.2.53", 53)
            ),
            (
                106,
                e("100.64.0.13", 6_000),
                e("203.0.113.7", 20_003),
                e("0.0.0.0", 0)
            ),
            (
                102,
                e("100.64.0.12", 7),
                e("203.0.113.8", 9),
                e("192.0.2.2", 0)
            ),
            (
                103,
                e("100.64.0.20", 80),
                e("203.0.113.9", 8_080),
                e("198.51.100.9", 33_000)
            ),
            (
                107,
                e("100.64.0.30", 41_000),
                e("203.0.113.10", 20_010),
                e("203.0.113.10", 443)
            ),
            (
                104,
                e("2001:db8::10", 50_000),
                e("2001:db8:ff::7", 61_000),
                e("2001:db8:1::1", 80)
            ),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// The first-format segment
// ---------------------------------------------------------------------------------------

fn first_format_header() -> Header {
    Header {
        log: false,
        seq: 1,
        created_ns: T - 3_600 * S,
        run: 1,
    }
}

/// The open binding of the first frame, superseded by its closed record in the second.
fn first_format_open() -> Binding {
    Binding {
        start_ns: T - 3_599 * S - 123_456_789,
        ..binding(
            1,
            IPPROTO_TCP,
            SNAT,
            tuple("100.64.0.10", 40_000, "192.0.2.2", 443),
            tuple("192.0.2.2", 443, "203.0.113.7", 20_001),
        )
    }
}

fn first_format_closed() -> Binding {
    Binding {
        end_ns: Some(T - 3_000 * S + 1),
        orig_counters: counters(12, 3_456),
        reply_counters: counters(10, 98_765),
        ..first_format_open()
    }
}

fn first_format_other() -> Binding {
    Binding {
        zone: 7,
        mark: 0xdead_beef,
        start_ns: T - 3_500 * S,
        start_approximate: true,
        start_source: StartSource::Destroy,
        end_ns: Some(T - 3_400 * S),
        end_approximate: true,
        reply_counters: counters(1, 60),
        ..binding(
            2,
            IPPROTO_UDP,
            SNAT,
            tuple("2001:db8::20", 5_000, "2001:db8:1::2", 53),
            tuple("2001:db8:1::2", 53, "2001:db8:ff::7", 61_001),
        )
    }
}

/// The records of `nattrseg-v1.seg`, frame by frame (the last frame is the seal).
fn first_format_frames() -> Vec<Vec<Record>> {
    vec![
        vec![
            Record::Event(CoverageEvent::AgentStart {
                t_ns: T - 3_600 * S,
                pid: 77,
            }),
            Record::Event(CoverageEvent::Attached {
                t_ns: T - 3_600 * S + 5,
                backend: "netfilter".to_owned(),
            }),
            Record::Binding(first_format_open()),
            Record::Binding(first_format_other()),
        ],
        vec![
            Record::Event(CoverageEvent::Heartbeat {
                t_ns: T - 3_001 * S,
            }),
            Record::Binding(first_format_closed()),
            Record::Event(CoverageEvent::Loss {
                t_ns: T - 3_000 * S,
                cause: LossCause::RingFull,
                count: 0,
                detail: "ring buffer full: 0 unknown".to_owned(),
            }),
        ],
        vec![Record::Seal(Seal {
            binding_records: 3,
            event_records: 4,
            data_frames: 2,
            sealed_ns: T - 2_999 * S,
        })],
    ]
}

#[test]
fn first_format_fixture_decodes_to_the_expected_records() {
    let file = read_fixture(FIRST_FORMAT);
    assert_eq!(&file[..8], b"NATTRSEG");
    assert_eq!(
        Header::decode(&file).expect("header"),
        first_format_header()
    );
    let mut frames = Vec::new();
    let mut offset = segment::HEADER_LEN;
    loop {
        match segment::frame_at(&file, offset) {
            FrameAt::End => break,
            FrameAt::Good { payload, next } => {
                let payload = segment::decompress(payload).expect("payload");
                let mut records = Vec::new();
                segment::decode_records(
                    &payload,
                    |r| records.push(r),
                    |e| panic!("frame at {offset}: {e}"),
                );
                frames.push(records);
                offset = next;
            }
            other => panic!("frame at {offset}: {other:?}"),
        }
    }
    assert_eq!(frames, first_format_frames());
}

// ---------------------------------------------------------------------------------------
// Both, in a data directory
// ---------------------------------------------------------------------------------------

#[test]
fn a_data_directory_of_both_fixtures_reads_whole() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let segments = dir.path().join("segments");
    std::fs::create_dir(&segments).expect("segments directory");
    std::fs::copy(fixture(FIRST_FORMAT), segments.join("00000001.seg")).expect("copy");
    std::fs::copy(fixture(COLUMNAR), segments.join("00000002.seg")).expect("copy");

    let snap = tracer_user::storage::read_all(dir.path()).expect("the directory reads");
    assert_eq!(snap.problems, []);
    assert_eq!(snap.segments, 2);

    // The latest record of each id (id 1 was closed in its second frame), by start then id.
    let mut bindings = vec![first_format_closed(), first_format_other()];
    bindings.extend(columnar_rows().into_iter().map(|r| r.binding));
    bindings.sort_by_key(|b| (b.start_ns, b.id));
    assert_eq!(snap.bindings, bindings);

    let mut events: Vec<CoverageEvent> = first_format_frames()
        .into_iter()
        .flatten()
        .filter_map(|r| match r {
            Record::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    events.extend(columnar_events());
    events.sort_by_key(CoverageEvent::t_ns);
    assert_eq!(snap.events, events);
}

// ---------------------------------------------------------------------------------------
// Making the fixtures
// ---------------------------------------------------------------------------------------

/// Writes the fixtures from the values above with the current encoders. Run only for a
/// deliberate format change (see the module documentation).
#[test]
#[ignore = "writes tests/fixtures: NATTRACE_REGENERATE_FIXTURES=1 cargo test -p tracer-user --test format_fixtures -- --ignored"]
fn regenerate_fixtures() {
    if std::env::var_os("NATTRACE_REGENERATE_FIXTURES").is_none_or(|v| v != "1") {
        eprintln!("NATTRACE_REGENERATE_FIXTURES is not 1: fixtures left alone");
        return;
    }
    std::fs::create_dir_all(fixture("")).expect("fixtures directory");

    let (file, _root) =
        columnar::encode_segment(&columnar_header(), columnar_rows(), &columnar_events());
    std::fs::write(fixture(COLUMNAR_V2), file).expect("write the columnar fixture");

    let mut file = first_format_header().encode().to_vec();
    let mut payload = Vec::new();
    for frame in first_format_frames() {
        payload.clear();
        for record in frame {
            match record {
                Record::Binding(b) => segment::encode_binding(&mut payload, &b),
                Record::Event(e) => segment::encode_event(&mut payload, &e),
                Record::Seal(s) => segment::encode_seal(&mut payload, &s),
                Record::Carried(_) => unreachable!("the first format has no carried records"),
            }
        }
        segment::encode_frame(&mut file, &payload).expect("frame");
    }
    std::fs::write(fixture(FIRST_FORMAT), file).expect("write the first-format fixture");
    eprintln!(
        "wrote {} and {}",
        fixture(COLUMNAR_V2).display(),
        fixture(FIRST_FORMAT).display()
    );
}
