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

/// The producer key of the `bundle_verify` seeds and of the bundles that target signs.
///
/// A TEST KEY, public in this repository: nothing it signs proves anything. Never configure
/// it as a data directory's `sign_key`. (Made once with `nattrace keygen --name
/// nattrace-fuzz-test`; fixed so that the checked-in seeds verify with it.)
pub const TEST_SIGNER_KEY: &str =
    "PRIVATE+KEY+nattrace-fuzz-test+d0b62f3d+Admw42A1cFnI6lBAvNQ9PrzucD3dm+5InMkrUbNfaSJw";

/// [`TEST_SIGNER_KEY`], parsed.
#[must_use]
pub fn test_signer() -> tracer_user::signing::SignerKey {
    tracer_user::signing::SignerKey::parse(TEST_SIGNER_KEY).expect("the test key parses")
}

/// Modification time of the archives made from the files form ([`parse_files_form`]).
pub const FILES_FORM_MTIME: u64 = 1_793_700_000;

/// A bundle's files in the "files form" the `bundle_verify` target also reads: for each
/// file a NUL byte, its name, a newline, then its contents. Bundles hold text only, so the
/// fuzzer can insert and remove bytes in it without breaking the container (in a tar
/// archive any change of size also needs the header's size and checksum changed).
#[must_use]
pub fn files_form(files: &tracer_user::evidence::Files) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in &files.entries {
        out.push(0);
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(data);
    }
    out
}

/// The files of a [`files_form`] input (what precedes the first NUL is ignored); `None`
/// when it names none.
#[must_use]
pub fn parse_files_form(data: &[u8]) -> Option<tracer_user::evidence::Files> {
    let mut files = tracer_user::evidence::Files::default();
    for part in data.split(|&c| c == 0).skip(1) {
        let (name, contents) = match part.iter().position(|&c| c == b'\n') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &part[part.len()..]),
        };
        if !name.is_empty() {
            let name = String::from_utf8_lossy(name).into_owned();
            files.entries.push((name, contents.to_vec()));
        }
    }
    (!files.entries.is_empty()).then_some(files)
}
