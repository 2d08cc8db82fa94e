//! Checks shared by the fuzz targets.

use tracer_user::binding::{Binding, StartSource};
use tracer_user::storage::columnar::{self, Row, SealedSegment, SegmentHeader};
use tracer_user::storage::segment::{self, Record};

/// What `nattrace import` would write must be storable and read back unchanged: checks the
/// importer's invariants on each binding, then writes them as the writer does (log records,
/// then a sealed columnar segment with the times rounded as `storage::seal` rounds them) and
/// reads them back.
pub fn assert_storable(bindings: &[Binding]) {
    if bindings.is_empty() {
        return;
    }
    let mut payload = Vec::new();
    let mut rows = Vec::with_capacity(bindings.len());
    for (i, b) in bindings.iter().enumerate() {
        assert_eq!(b.id, 0, "importers leave ids to the writer: {b:?}");
        assert_eq!(b.start_source, StartSource::Import, "{b:?}");
        if let Some(end) = b.end_ns {
            assert!(end >= b.start_ns, "end before start: {b:?}");
        }
        assert_eq!(
            b.orig.src.is_ipv4(),
            b.reply.dst.is_ipv4(),
            "addresses of two families: {b:?}"
        );
        let _ = (b.internal(), b.external(), b.destination());
        let mut b = b.clone();
        b.id = i as u64 + 1;

        // The log record (what the writer appends) reads back as the same binding.
        payload.clear();
        segment::encode_binding(&mut payload, &b);
        let mut back = Vec::new();
        segment::decode_records(&payload, |r| back.push(r), |e| panic!("{e}: {b:?}"));
        assert_eq!(back, [Record::Binding(b.clone())], "log record");

        b.start_ns = columnar::floor_time(b.start_ns);
        b.end_ns = b.end_ns.map(|e| columnar::ceil_time(e).max(b.start_ns));
        rows.push(Row {
            binding: b,
            carried: false,
        });
    }

    // The sealed segment reads back as the same rows.
    let header = SegmentHeader {
        seq: 1,
        writer_id: [0; 16],
        prev_seq: 0,
        prev_root: [0; 32],
        window_start_ns: rows.iter().map(|r| r.binding.start_ns).min().unwrap_or(0),
        window_end_ns: rows
            .iter()
            .map(|r| r.binding.end_ns.unwrap_or(r.binding.start_ns))
            .max()
            .unwrap_or(0),
    };
    let (file, _) = columnar::encode_segment(&header, rows.clone(), &[]);
    let seg = SealedSegment::open(&file).expect("a segment just encoded opens");
    let mut back = Vec::new();
    for fence in seg.fences(&file).expect("fences") {
        back.extend(
            seg.read_block(&file, &fence)
                .expect("a block just encoded decodes"),
        );
    }
    rows.sort_by(|a, b| columnar::row_order(&a.binding, &b.binding));
    back.sort_by(|a, b| columnar::row_order(&a.binding, &b.binding));
    assert_eq!(back, rows, "sealed segment");
}

/// Formats an error as the importer reports it: that must not panic either.
pub fn shown(e: impl std::fmt::Display) {
    let _ = e.to_string();
}
