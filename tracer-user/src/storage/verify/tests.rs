use std::fs;

use super::*;
use crate::storage::columnar::{Row, SegmentHeader, encode_segment};
use crate::storage::retention::{ChainLink, LEDGER_FILE};
use crate::storage::testutil::binding;
use crate::storage::{CoverageEvent, OPEN_EXT};

const DAY: i64 = 86_400_000_000_000;
const T0: i64 = 1_793_577_600_000_000_000; // 2026-11-02T00:00:00Z
const WRITER: [u8; 16] = [7; 16];

/// Rows of segment `seq`: `n` bindings on ports 40000.., starting in its window, most closed,
/// one carried and open.
fn rows(seq: u32, n: u64) -> Vec<Row> {
    let start = T0 + i64::from(seq) * DAY;
    (0..n)
        .map(|i| {
            let s = start + i as i64 * 1_000_000_000;
            let end = (i % 5 != 0).then_some(s + 30_000_000_000);
            Row {
                binding: binding(u64::from(seq) * 1000 + i, 40_000 + i as u16, s, end),
                carried: i == 0,
            }
        })
        .collect()
}

fn header(seq: u32, prev_seq: u32, prev_root: Hash) -> SegmentHeader {
    SegmentHeader {
        seq,
        writer_id: WRITER,
        prev_seq,
        prev_root,
        window_start_ns: T0 + i64::from(seq) * DAY,
        window_end_ns: T0 + i64::from(seq) * DAY + DAY / 2,
    }
}

fn events(seq: u32) -> Vec<CoverageEvent> {
    let t = T0 + i64::from(seq) * DAY;
    vec![
        CoverageEvent::Attached {
            t_ns: t,
            backend: "netfilter".into(),
        },
        CoverageEvent::Heartbeat { t_ns: t + 1 },
    ]
}

fn seg_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(SEGMENTS_DIR).join(segment_name(seq, SEALED_EXT))
}

/// Writes segment `h` with `rows(h.seq, n)`; returns its root.
fn write_segment(dir: &Path, h: &SegmentHeader, n: u64) -> Hash {
    fs::create_dir_all(dir.join(SEGMENTS_DIR)).unwrap();
    let (bytes, root) = encode_segment(h, rows(h.seq, n), &events(h.seq));
    fs::write(seg_path(dir, h.seq), bytes).unwrap();
    root
}

/// Segments `1..=count`, chained; returns their roots (index 0 is segment 1).
fn write_chain(dir: &Path, count: u32) -> Vec<Hash> {
    let mut roots = Vec::new();
    let mut prev = (0, [0u8; 32]);
    for seq in 1..=count {
        let root = write_segment(dir, &header(seq, prev.0, prev.1), 20);
        roots.push(root);
        prev = (seq, root);
    }
    roots
}

fn open_segment(dir: &Path, seq: u32) -> (Vec<u8>, SealedSegment) {
    let data = fs::read(seg_path(dir, seq)).unwrap();
    let seg = SealedSegment::open(&data).unwrap();
    (data, seg)
}

fn summary_offset(seg: &SealedSegment) -> u64 {
    seg.file_len - (SUMMARY_LEN + TRAILER_LEN) as u64
}

fn flip(dir: &Path, seq: u32, at: u64) {
    let path = seg_path(dir, seq);
    let mut data = fs::read(&path).unwrap();
    data[at as usize] ^= 0x20;
    fs::write(&path, data).unwrap();
}

/// The one problem of the report, checked to name `path` and `offset` and contain `cause`.
fn only_problem(r: &VerifyReport, path: &Path, offset: u64, cause: &str) {
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    let p = &r.problems[0];
    assert_eq!(p.path, path, "{p:?}");
    assert_eq!(p.offset, offset, "{p:?}");
    assert!(p.cause.contains(cause), "{:?} lacks {cause:?}", p.cause);
    assert!(!r.is_intact());
}

fn ledger_entry(seq: u32, root: Hash, prev_seq: u32, prev_root: Hash) -> LedgerEntry {
    LedgerEntry {
        seq,
        chain: Some(ChainLink {
            root,
            prev_seq,
            prev_root,
        }),
        t_hi_ns: T0,
        deleted_at_ns: T0 + 100 * DAY,
    }
}

#[test]
fn intact_chain_verifies_with_counts_roots_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 3);
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert_eq!(r.segments.len(), 3);
    for (i, s) in r.segments.iter().enumerate() {
        assert_eq!(s.kind, SegmentKind::Columnar);
        assert_eq!(s.rows, 20);
        assert_eq!(s.events, 2);
        assert_eq!(s.root, Some(roots[i]));
        assert_eq!(s.problems, 0);
        assert!(s.notes.is_empty(), "{:?}", s.notes);
    }
    assert_eq!(r.segments[0].link, Some(Link::Start));
    assert_eq!(r.segments[1].link, Some(Link::Segment(1)));
    assert_eq!(r.segments[2].link, Some(Link::Segment(2)));
    assert!(!r.ledger.present);
}

#[test]
fn empty_and_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact() && r.segments.is_empty());
    assert!(matches!(
        verify_dir(&dir.path().join("nope")),
        Err(StorageError::NotFound { .. })
    ));
}

#[test]
fn flipped_byte_in_a_block_names_the_block() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 3);
    let (data, seg) = open_segment(dir.path(), 2);
    let fence = seg.fences(&data).unwrap()[0];
    flip(dir.path(), 2, fence.block.offset + 20);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 2),
        fence.block.offset,
        "block 0: checksum mismatch",
    );
    assert_eq!(r.segments[1].problems, 1);
    assert_eq!(
        (r.segments[1].rows, r.segments[1].rows_expected),
        (0, Some(20))
    );
    // The chain is still checked through the stored root.
    assert_eq!(r.segments[2].link, Some(Link::Segment(2)));
}

#[test]
fn flipped_byte_in_the_events_section() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 2);
    let (_, seg) = open_segment(dir.path(), 1);
    let at = seg.summary.events_section.offset;
    flip(dir.path(), 1, at + 3);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 1),
        at,
        "events section checksum mismatch",
    );
}

#[test]
fn flipped_byte_in_a_filter() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 2);
    let (_, seg) = open_segment(dir.path(), 2);
    let at = seg.summary.int_filter.offset;
    flip(
        dir.path(),
        2,
        at + u64::from(seg.summary.int_filter.len) - 1,
    );
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 2),
        at,
        "internal filter: internal filter checksum mismatch",
    );
}

#[test]
fn flipped_byte_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 3);
    flip(dir.path(), 2, 20);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(&r, &seg_path(dir.path(), 2), 0, "header checksum mismatch");
    // Its successor's link cannot be checked, and is not a second problem.
    assert_eq!(r.segments[2].link, Some(Link::Unchecked(2)));
}

#[test]
fn flipped_byte_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 3);
    let (_, seg) = open_segment(dir.path(), 2);
    let at = summary_offset(&seg);
    flip(dir.path(), 2, at + 50);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 2),
        at,
        "summary checksum mismatch",
    );
    // The header is still read: segment 2's own link is checked, 3's cannot be.
    assert_eq!(r.segments[1].link, Some(Link::Segment(1)));
    assert_eq!(r.segments[2].link, Some(Link::Unchecked(2)));
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 2);
    let path = seg_path(dir.path(), 2);
    let data = fs::read(&path).unwrap();
    let len = data.len() - 100;
    fs::write(&path, &data[..len]).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &path,
        (len - TRAILER_LEN) as u64,
        "bad magic in trailer",
    );
    assert!(r.problems[0].cause.contains("truncated"));
    fs::write(&path, &data[..50]).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(&r, &path, 0, "file too short");
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 3);
    let path = seg_path(dir.path(), 2);
    let mut data = fs::read(&path).unwrap();
    data[..8].copy_from_slice(b"GARBAGE!");
    fs::write(&path, data).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(&r, &path, 0, "not a nattrace segment (bad magic");
    assert_eq!(r.segments[1].kind, SegmentKind::Unknown);
    assert_eq!(r.segments[2].link, Some(Link::Unchecked(2)));
}

#[test]
fn wrong_prev_root_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 2);
    let mut wrong = roots[1];
    wrong[0] ^= 1;
    write_segment(dir.path(), &header(3, 2, wrong), 20);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_ROOT_OFFSET,
        "does not match the root",
    );
}

#[test]
fn deleted_middle_segment_is_a_problem_unless_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 3);
    fs::remove_file(seg_path(dir.path(), 2)).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_SEQ_OFFSET,
        "segment 00000002 missing: not in the retention ledger",
    );
    assert_eq!(r.segments[1].link, Some(Link::Missing(2)));

    let entry = ledger_entry(2, roots[1], 1, roots[0]);
    fs::write(dir.path().join(LEDGER_FILE), entry.encode()).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert_eq!(r.segments[1].link, Some(Link::Ledger(2)));
    assert_eq!(r.ledger.entries, 1);
    assert_eq!(
        r.ledger.notes.len(),
        1,
        "not retention's oldest-first order"
    );

    // A ledger entry with another root does not account for the deletion.
    let mut bad_root = roots[1];
    bad_root[5] ^= 1;
    let entry = ledger_entry(2, bad_root, 1, roots[0]);
    fs::write(dir.path().join(LEDGER_FILE), entry.encode()).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_ROOT_OFFSET,
        "(as recorded in the ledger)",
    );
}

#[test]
fn deleted_prefix_verifies_through_the_ledger_and_the_ledger_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 4);
    fs::remove_file(seg_path(dir.path(), 1)).unwrap();
    fs::remove_file(seg_path(dir.path(), 2)).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_SEQ_OFFSET,
        "segment 00000002 missing",
    );

    let e1 = ledger_entry(1, roots[0], 0, [0; 32]).encode();
    let e2 = ledger_entry(2, roots[1], 1, roots[0]).encode();
    let ledger = dir.path().join(LEDGER_FILE);
    fs::write(&ledger, format!("{e1}{e2}")).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert!(r.ledger.notes.is_empty(), "{:?}", r.ledger.notes);
    assert_eq!(r.ledger.seq_range, Some((1, 2)));
    assert_eq!(r.segments[0].link, Some(Link::Ledger(2)));

    // A flipped byte in a ledger line: that line is a problem (and its deletion unrecorded).
    let mut bytes = format!("{e1}{e2}").into_bytes();
    bytes[e1.len() + 5] ^= 1;
    fs::write(&ledger, &bytes).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    let p = &r.problems[0];
    assert_eq!(
        (p.path.as_path(), p.offset),
        (ledger.as_path(), e1.len() as u64)
    );
    assert!(p.cause.contains("checksum mismatch"), "{}", p.cause);
    assert_eq!(r.ledger.problems, 1);

    // Ledger lines must chain: entry 2 naming another root for segment 1.
    let mut other = roots[0];
    other[0] ^= 1;
    let e2_bad = ledger_entry(2, roots[1], 1, other).encode();
    fs::write(&ledger, format!("{e1}{e2_bad}")).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(&r, &ledger, e1.len() as u64, "prev_root");
    assert!(
        r.problems[0]
            .cause
            .starts_with("ledger entry for segment 00000002")
    );

    // A torn last line (a retention run cut short) is only a note.
    fs::write(&ledger, format!("{e1}{e2}v1 3 col 12")).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert_eq!(r.ledger.notes.len(), 1);
}

#[test]
fn interrupted_retention_leaves_a_ledger_entry_for_a_present_segment() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 2);
    let e1 = ledger_entry(1, roots[0], 0, [0; 32]).encode();
    fs::write(dir.path().join(LEDGER_FILE), e1).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert!(r.segments[0].notes[0].contains("still present"));
    assert_eq!(r.segments[1].link, Some(Link::Segment(1)));
}

#[test]
fn forks_restarts_and_writer_changes() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_chain(dir.path(), 2);
    write_segment(dir.path(), &header(3, 1, roots[0]), 5);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_SEQ_OFFSET,
        "as segment 00000002 does (the chain forks)",
    );

    write_segment(dir.path(), &header(3, 0, [0; 32]), 5);
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &seg_path(dir.path(), 3),
        PREV_SEQ_OFFSET,
        "starts a new chain (prev_seq 0), but segment 00000002 comes before it",
    );

    // Numbers may be skipped; another writer id is only a note.
    let mut h = header(7, 2, roots[1]);
    h.writer_id = [8; 16];
    fs::remove_file(seg_path(dir.path(), 3)).unwrap();
    write_segment(dir.path(), &h, 5);
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert!(r.segments[2].notes[0].starts_with("writer id changed"));
}

#[test]
fn inconsistent_fences_and_counts_are_found() {
    // A segment whose summary claims other counts: re-encode the summary with a valid CRC.
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 1);
    let path = seg_path(dir.path(), 1);
    let mut data = fs::read(&path).unwrap();
    let at = data.len() - SUMMARY_LEN - TRAILER_LEN;
    data[at] ^= 1; // rows
    let crc = crc32c::crc32c(&data[at..at + SUMMARY_LEN]);
    let crc_at = data.len() - TRAILER_LEN + 4;
    data[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &data).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &path,
        at as u64,
        "summary counts 21 rows (1 carried, 4 open), the blocks hold 20",
    );
}

/// A row-format (`NATTRSEG`) file: header, one frame of records, and a seal frame if `seal`.
fn row_file(seq: u32, log: bool, seal: bool) -> Vec<u8> {
    let mut out = segment::Header {
        log,
        seq,
        created_ns: T0,
        run: 1,
    }
    .encode()
    .to_vec();
    let mut payload = Vec::new();
    segment::encode_binding(&mut payload, &binding(1, 40_000, T0, Some(T0 + 5)));
    segment::encode_binding(&mut payload, &binding(2, 40_001, T0, None));
    segment::encode_event(&mut payload, &CoverageEvent::Heartbeat { t_ns: T0 });
    segment::encode_frame(&mut out, &payload).unwrap();
    if seal {
        let mut s = Vec::new();
        segment::encode_seal(
            &mut s,
            &segment::Seal {
                binding_records: 2,
                event_records: 1,
                data_frames: 1,
                sealed_ns: T0 + DAY,
            },
        );
        segment::encode_frame(&mut out, &s).unwrap();
    }
    out
}

#[test]
fn legacy_row_segments_are_checksummed_only() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join(SEGMENTS_DIR)).unwrap();
    let path = seg_path(dir.path(), 1);
    let data = row_file(1, false, true);
    fs::write(&path, &data).unwrap();
    // The first columnar segment starts the chain.
    write_segment(dir.path(), &header(2, 0, [0; 32]), 5);
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    assert_eq!(r.segments[0].kind, SegmentKind::Row);
    assert_eq!((r.segments[0].rows, r.segments[0].events), (2, 1));
    assert_eq!(r.segments[1].link, Some(Link::Start));

    let mut bad = data.clone();
    bad[segment::HEADER_LEN + 20] ^= 1;
    fs::write(&path, &bad).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &path,
        segment::HEADER_LEN as u64,
        "frame checksum mismatch",
    );

    fs::write(&path, row_file(1, false, false)).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &path,
        row_file(1, false, false).len() as u64,
        "missing seal frame",
    );
}

#[test]
fn logs_may_end_in_a_torn_frame() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), 1);
    let path = dir
        .path()
        .join(SEGMENTS_DIR)
        .join(segment_name(2, OPEN_EXT));
    let mut data = row_file(2, true, false);
    let good_len = data.len();
    data.extend_from_slice(&row_file(2, true, false)[segment::HEADER_LEN..][..30]);
    fs::write(&path, &data).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    assert!(r.is_intact(), "{:#?}", r.problems);
    let log = &r.segments[1];
    assert_eq!(log.kind, SegmentKind::Log);
    assert_eq!(log.rows, 2);
    assert!(log.notes[0].contains(&format!("offset {good_len}: incomplete last frame")));

    // A damaged frame before the end is a problem in a log too.
    data[segment::HEADER_LEN + 20] ^= 1;
    fs::write(&path, &data).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(
        &r,
        &path,
        segment::HEADER_LEN as u64,
        "frame checksum mismatch",
    );

    // A header not written yet is fine; a log under a sealed name is not.
    fs::write(&path, b"NATTR").unwrap();
    assert!(verify_dir(dir.path()).unwrap().is_intact());
    fs::remove_file(&path).unwrap();
    fs::write(seg_path(dir.path(), 2), row_file(2, true, false)).unwrap();
    let r = verify_dir(dir.path()).unwrap();
    only_problem(&r, &seg_path(dir.path(), 2), 0, "a log (magic NATTRLOG)");
}
