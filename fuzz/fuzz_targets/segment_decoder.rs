//! Arbitrary bytes through every decoder of segment files. Nothing may panic, loop forever
//! or allocate without bound (`cargo xtask fuzz` runs with `-rss_limit_mb=2048`).
//!
//! The same input is read five ways:
//! - as a sealed columnar segment (`NATTRCOL`): open, fences, every block, events, filters;
//! - the same bytes with every checksum of that layout recomputed, so that mutations reach
//!   the decoders behind the CRC checks (a fuzzer rarely guesses a CRC-32C);
//! - as one block (`columnar::decode_block`);
//! - as the columns of one block, which the target puts together (see [`block_of_columns`]),
//!   so that mutations of column contents reach the row decoder;
//! - as a log or first-format segment (`NATTRLOG` / `NATTRSEG`): header, then the frames
//!   from offset 32, each payload decompressed and its records decoded (also for frames whose
//!   checksum does not match, for the same reason as above).
//!
//! Seeds: `make_seeds` (src/bin/make_seeds.rs) and the format fixtures of tracer-user.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::storage::columnar::{
    self, BLOCK_HEADER_LEN, COLUMN_ENTRY_LEN, FENCE_LEN, HEADER_LEN, SUMMARY_LEN, SealedSegment,
    TRAILER_LEN, col,
};
use tracer_user::storage::filter::{self, Fuse8};
use tracer_user::storage::segment::{self, FRAME_HEADER_LEN, FrameAt, Header};

fuzz_target!(|data: &[u8]| {
    let file = data.to_vec();
    sealed_segment(&file);
    if let Some(fixed) = with_columnar_checksums(data) {
        sealed_segment(&fixed);
    }
    block(data);
    if let Some(b) = block_of_columns(data) {
        block(&b);
    }
    log_file(data);
});

fn block(b: &[u8]) {
    match columnar::decode_block(b) {
        Ok(rows) => {
            assert!(!rows.is_empty(), "a block holds at least one row");
            // Building only some rows gives exactly those rows, ids included.
            let keep = |k: columnar::ExtKey, _: i64, _: Option<i64>| k.1.is_multiple_of(2);
            let some = columnar::decode_block_where(b, Some(&keep))
                .expect("a block that decodes whole decodes in part");
            let want: Vec<_> = rows
                .into_iter()
                .filter(|r| r.binding.external().1.is_multiple_of(2))
                .collect();
            assert_eq!(some, want);
        }
        Err(e) => shown(e),
    }
}

/// Separates the columns of a [`block_of_columns`] input.
const COLUMN_SEP: u8 = b'|';

/// The block whose columns the input holds: `rows (1 byte)`, then the contents of columns
/// 1, 2, … separated by [`COLUMN_SEP`] (an empty one is left out), each stored raw (method 0)
/// with a base time of 0. `None` for an empty input.
fn block_of_columns(data: &[u8]) -> Option<Vec<u8>> {
    let (&rows, rest) = data.split_first()?;
    let columns: Vec<(u8, &[u8])> = rest
        .split(|&c| c == COLUMN_SEP)
        .zip(1..=col::COUNT)
        .filter(|(c, _)| !c.is_empty())
        .map(|(c, id)| (id, c))
        .collect();
    let mut b =
        Vec::with_capacity(BLOCK_HEADER_LEN + data.len() + columns.len() * COLUMN_ENTRY_LEN);
    b.extend_from_slice(&u32::from(rows).to_le_bytes());
    b.extend_from_slice(&0i64.to_le_bytes());
    b.push(u8::try_from(columns.len()).ok()?);
    for (id, c) in &columns {
        let len = u32::try_from(c.len()).ok()?.to_le_bytes();
        b.extend_from_slice(&[*id, 0]);
        b.extend_from_slice(&len);
        b.extend_from_slice(&len);
    }
    for (_, c) in &columns {
        b.extend_from_slice(c);
    }
    Some(b)
}

/// Everything a reader does with a sealed segment.
fn sealed_segment(file: &Vec<u8>) {
    let seg = match SealedSegment::open(file) {
        Ok(seg) => seg,
        Err((_, e)) => return shown(e),
    };
    match seg.fences(file) {
        Ok(fences) => {
            for fence in &fences {
                match seg.read_block(file, fence) {
                    Ok(rows) => {
                        for r in &rows {
                            // The derived views must not panic either.
                            let b = &r.binding;
                            let _ = (b.internal(), b.external(), b.destination());
                            let _ = fence.may_hold_key(b.external());
                        }
                    }
                    Err((_, e)) => shown(e),
                }
            }
        }
        Err((_, e)) => shown(e),
    }
    if let Err((_, e)) = seg.events(file) {
        shown(e);
    }
    for f in [seg.ext_filter(file), seg.int_filter(file)] {
        match f {
            Ok(f) => probe(&f),
            Err((_, e)) => shown(e),
        }
    }
}

/// Formats an error as a reader reports it: that must not panic either.
fn shown(e: impl std::fmt::Display) {
    let _ = e.to_string();
}

/// Lookups in a decoded filter (its descriptor is whatever the input said).
fn probe(f: &Fuse8) {
    for key in [
        0,
        u64::MAX,
        filter::key("203.0.113.7".parse().expect("address"), 20001),
        filter::key("2001:db8::7".parse().expect("address"), 0),
        f.seed,
    ] {
        let _ = f.contains(key);
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn put_crc(b: &mut [u8], at: usize, range: std::ops::Range<usize>) {
    let crc = crc32c::crc32c(&b[range]);
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes `offset .. offset + len` of a file of `file_len` bytes, if inside.
fn range(offset: u64, len: u32, file_len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len as usize)?;
    (end <= file_len).then_some(start..end)
}

/// A copy of `data` with the checksums of the columnar layout (FORMAT.md) made right: the
/// header's, each block's in its fence, each footer section's in the summary, and the
/// summary's in the trailer. `None` when the input is too short to have a summary.
fn with_columnar_checksums(data: &[u8]) -> Option<Vec<u8>> {
    let mut b = data.to_vec();
    let len = b.len();
    if len < HEADER_LEN + SUMMARY_LEN + TRAILER_LEN {
        return None;
    }
    put_crc(&mut b, HEADER_LEN - 4, 0..HEADER_LEN - 4);
    let summary = len - SUMMARY_LEN - TRAILER_LEN;
    let section = |b: &[u8], i: usize| {
        let at = summary + 112 + i * 16;
        Some((at, u64_at(b, at)?, u32_at(b, at + 8)?))
    };
    // Blocks first (their checksums are inside the fences section), then the sections.
    if let Some((_, offset, fences_len)) = section(&b, 0)
        && let Some(fences) = range(offset, fences_len, len)
    {
        for fence in fences.clone().step_by(FENCE_LEN) {
            if fence + FENCE_LEN > fences.end {
                break;
            }
            let (Some(offset), Some(block_len)) = (u64_at(&b, fence), u32_at(&b, fence + 8)) else {
                break;
            };
            if let Some(block) = range(offset, block_len, len) {
                put_crc(&mut b, fence + 12, block);
            }
        }
    }
    for i in 0..4 {
        if let Some((at, offset, sec_len)) = section(&b, i)
            && let Some(sec) = range(offset, sec_len, len)
        {
            put_crc(&mut b, at + 12, sec);
        }
    }
    put_crc(
        &mut b,
        len - TRAILER_LEN + 4,
        summary..summary + SUMMARY_LEN,
    );
    Some(b)
}

/// Everything a reader does with a log or a first-format segment.
fn log_file(data: &[u8]) {
    if let Err(e) = Header::decode(data) {
        shown(e);
    }
    let mut offset = segment::HEADER_LEN;
    loop {
        let (payload, next) = match segment::frame_at(data, offset) {
            FrameAt::End => break,
            FrameAt::Good { payload, next } => (payload, next),
            FrameAt::BadChecksum { error, next } => {
                shown(error);
                (&data[offset + FRAME_HEADER_LEN..next], next)
            }
            FrameAt::Incomplete(e) | FrameAt::BadLength(e) => {
                shown(e);
                break;
            }
        };
        assert!(
            next > offset && next <= data.len(),
            "frame at {offset} says the next is at {next} (file {} bytes)",
            data.len()
        );
        match segment::decompress(payload) {
            Ok(raw) => {
                assert!(raw.len() <= segment::MAX_PAYLOAD_LEN);
                segment::decode_records(&raw, drop, shown);
            }
            Err(e) => shown(e),
        }
        offset = next;
    }
}
