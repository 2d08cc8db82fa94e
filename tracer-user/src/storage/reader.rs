//! The readers' side: everything readable in a data directory, with what could not be read.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::binding::Binding;

use super::segment::{self, FormatError, FrameAt, HEADER_LEN, Header, Record, Seal};
use super::{
    CoverageEvent, ReadProblem, SEALED_EXT, SEGMENTS_DIR, Snapshot, StorageError, error_chain,
    lock, parse_segment_name, segment_name,
};

/// Everything readable in a data directory.
///
/// Errors: directory missing ([`StorageError::NotFound`]), permission denied
/// ([`StorageError::PermissionDenied`]), other I/O on the directory. Corruption in one file is
/// not an error: it becomes a [`ReadProblem`] and reading continues with the rest of that file
/// where possible, and with the other files. An incomplete last frame of an `.open` segment
/// (being written, or torn by a crash and not yet recovered) is not a problem.
pub fn read_all(dir: &Path) -> Result<Snapshot, StorageError> {
    read_filtered(dir, |_| true)
}

/// [`read_all`] keeping only the bindings whose latest record satisfies `keep`, without
/// holding the others in memory. `keep` sees every binding record in write order.
pub fn read_filtered(
    dir: &Path,
    mut keep: impl FnMut(&Binding) -> bool,
) -> Result<Snapshot, StorageError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StorageError::NotFound {
                path: dir.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StorageError::NotFound {
                path: dir.to_owned(),
            });
        }
        Err(e) => return Err(StorageError::io("read", dir, e)),
    }
    let mut snap = Snapshot {
        agent_running: lock::is_locked(dir),
        ..Snapshot::default()
    };

    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut files = Vec::new();
    match fs::read_dir(&seg_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io("list", &seg_dir, e))?;
                if let Some((seq, sealed)) = entry.file_name().to_str().and_then(parse_segment_name)
                {
                    files.push((seq, sealed, entry.path()));
                }
            }
        }
        // Nothing was ever written here.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("list", &seg_dir, e)),
    }
    // By sequence number: the order records were written in.
    files.sort();

    let mut latest: HashMap<u64, Binding> = HashMap::new();
    let mut events = Vec::new();
    let mut done = HashSet::new();
    for (seq, sealed, path) in files {
        if !done.insert(seq) {
            continue;
        }
        let (path, sealed, data) = match read_segment(&path, sealed, seq, &seg_dir)? {
            Ok(found) => found,
            Err(None) => continue,
            Err(Some(problem)) => {
                snap.problems.push(problem);
                continue;
            }
        };
        snap.segments += 1;
        snap.bytes_on_disk += data.len() as u64;
        scan(&path, &data, sealed, seq, &mut snap.problems, |r| match r {
            Record::Binding(b) => {
                if keep(&b) {
                    latest.insert(b.id, b);
                } else {
                    latest.remove(&b.id);
                }
            }
            Record::Event(e) => events.push(e),
            Record::Seal(_) => {}
        });
    }

    let mut bindings: Vec<Binding> = latest.into_values().collect();
    bindings.sort_by_key(|b| (b.start_ns, b.id));
    snap.bindings = bindings;
    events.sort_by_key(CoverageEvent::t_ns);
    snap.events = events;
    Ok(snap)
}

type Found = (PathBuf, bool, Vec<u8>);

/// Reads a segment file. An `.open` file renamed to `.seg` since the directory was listed is
/// read under its new name. `Err(None)`: gone; `Err(Some(..))`: unreadable (not for lack of
/// permission, which is an error).
fn read_segment(
    path: &Path,
    sealed: bool,
    seq: u32,
    seg_dir: &Path,
) -> Result<Result<Found, Option<ReadProblem>>, StorageError> {
    let mut attempt = (path.to_owned(), sealed);
    loop {
        match fs::read(&attempt.0) {
            Ok(data) => return Ok(Ok((attempt.0, attempt.1, data))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if attempt.1 {
                    return Ok(Err(None));
                }
                attempt = (seg_dir.join(segment_name(seq, SEALED_EXT)), true);
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(StorageError::PermissionDenied { path: attempt.0 });
            }
            Err(e) => {
                return Ok(Err(Some(ReadProblem {
                    path: attempt.0,
                    offset: 0,
                    cause: format!("read error: {e}"),
                })));
            }
        }
    }
}

/// Decodes every readable record of one segment file into `sink`, in order; what cannot be
/// read goes to `problems`.
fn scan(
    path: &Path,
    data: &[u8],
    sealed: bool,
    name_seq: u32,
    problems: &mut Vec<ReadProblem>,
    mut sink: impl FnMut(Record),
) {
    let before = problems.len();
    let push = |problems: &mut Vec<ReadProblem>, offset: usize, e: FormatError| {
        problems.push(ReadProblem {
            path: path.to_owned(),
            offset: offset as u64,
            cause: error_chain(&e),
        });
    };
    match Header::decode(data) {
        // An .open file whose header is not written yet.
        Err(FormatError::ShortHeader { .. }) if !sealed => return,
        Err(e) => return push(problems, 0, e),
        Ok(h) if h.seq != name_seq => push(
            problems,
            0,
            FormatError::SequenceMismatch {
                header: h.seq,
                name: name_seq,
            },
        ),
        Ok(_) => {}
    }

    let mut found = Seal::default();
    let mut seal: Option<(usize, Seal)> = None;
    let mut offset = HEADER_LEN;
    let mut cut_short = false;
    loop {
        let next = match segment::frame_at(data, offset) {
            FrameAt::End => break,
            FrameAt::Good { payload, next } => {
                if seal.is_some() {
                    push(problems, offset, FormatError::MisplacedSeal);
                    break;
                }
                match segment::decompress(payload) {
                    Ok(payload) => {
                        let mut records = Vec::new();
                        segment::decode_records(
                            &payload,
                            |r| records.push(r),
                            |e| push(problems, offset, e),
                        );
                        match records.as_slice() {
                            [Record::Seal(s)] => seal = Some((offset, *s)),
                            _ => {
                                found.data_frames += 1;
                                for r in records {
                                    match r {
                                        Record::Binding(_) => found.binding_records += 1,
                                        Record::Event(_) => found.event_records += 1,
                                        Record::Seal(_) => {
                                            push(problems, offset, FormatError::MisplacedSeal);
                                            continue;
                                        }
                                    }
                                    sink(r);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        found.data_frames += 1;
                        push(problems, offset, e);
                    }
                }
                next
            }
            FrameAt::BadChecksum { next, .. } if !sealed && next == data.len() => {
                // The last frame of an .open file: a torn tail not yet recovered (recovery
                // cuts it the same way).
                cut_short = true;
                break;
            }
            FrameAt::BadChecksum { error, next } => {
                found.data_frames += 1;
                push(problems, offset, error);
                next
            }
            FrameAt::Incomplete(e) => {
                // The frame the agent is writing, or a torn tail not yet recovered.
                if sealed {
                    push(problems, offset, e);
                }
                cut_short = true;
                break;
            }
            FrameAt::BadLength(e) => {
                // A crashed agent's zero-filled tail (not yet recovered) is not a problem.
                if sealed || data[offset..].iter().any(|&b| b != 0) {
                    push(problems, offset, e);
                }
                cut_short = true;
                break;
            }
        };
        offset = next;
    }

    match seal {
        None if sealed && !cut_short => push(problems, data.len(), FormatError::MissingSeal),
        Some((at, s))
            if problems.len() == before
                && (s.binding_records, s.event_records, s.data_frames)
                    != (
                        found.binding_records,
                        found.event_records,
                        found.data_frames,
                    ) =>
        {
            push(
                problems,
                at,
                FormatError::SealMismatch {
                    sealed_bindings: s.binding_records,
                    sealed_events: s.event_records,
                    sealed_frames: s.data_frames,
                    bindings: found.binding_records,
                    events: found.event_records,
                    frames: found.data_frames,
                },
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;
    use crate::storage::testutil::binding;
    use crate::storage::{OPEN_EXT, Writer};

    /// Three sealed segments with one binding each (ids 1, 2, 3).
    fn three_segments(dir: &Path) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for id in 1..=3 {
            let mut w = Writer::open(dir).unwrap();
            w.append_binding(&binding(id, 1, id as i64, None));
            w.append_binding(&binding(id + 10, 1, id as i64, None));
            w.flush().unwrap();
            w.append_event(CoverageEvent::Heartbeat { t_ns: id as i64 });
            w.close().unwrap();
            paths.push(
                dir.join(SEGMENTS_DIR)
                    .join(segment_name(id as u32, SEALED_EXT)),
            );
        }
        paths
    }

    fn ids(snap: &Snapshot) -> Vec<u64> {
        let mut v: Vec<u64> = snap.bindings.iter().map(|b| b.id).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn flipped_byte_is_reported_with_offset_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let mut data = fs::read(&paths[1]).unwrap();
        // Flip a byte inside the first frame's payload.
        data[HEADER_LEN + 12] ^= 0x40;
        fs::write(&paths[1], &data).unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        let p = &snap.problems[0];
        assert_eq!(p.path, paths[1]);
        assert_eq!(p.offset, HEADER_LEN as u64);
        assert!(p.cause.contains("checksum mismatch"), "{}", p.cause);
        // Segment 2's bindings are lost, its second frame (the heartbeat) is still read.
        assert_eq!(ids(&snap), vec![1, 3, 11, 13]);
        assert_eq!(snap.events.len(), 3);
        assert_eq!(snap.segments, 3);
    }

    #[test]
    fn truncated_sealed_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let len = fs::metadata(&paths[0]).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&paths[0])
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert_eq!(snap.problems[0].path, paths[0]);
        assert!(
            snap.problems[0].cause.contains("truncated frame"),
            "{}",
            snap.problems[0].cause
        );
        assert!(snap.problems[0].offset > HEADER_LEN as u64);
        assert_eq!(ids(&snap), vec![1, 2, 3, 11, 12, 13]);

        // Cut exactly at a frame boundary: the seal is missing.
        let at = snap.problems[0].offset;
        OpenOptions::new()
            .write(true)
            .open(&paths[0])
            .unwrap()
            .set_len(at)
            .unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert_eq!(snap.problems[0].offset, at);
        assert!(
            snap.problems[0].cause.contains("missing seal"),
            "{}",
            snap.problems[0].cause
        );
    }

    #[test]
    fn wrong_magic_and_unknown_version_are_distinct_problems() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let mut data = fs::read(&paths[0]).unwrap();
        data[..8].copy_from_slice(b"GARBAGE!");
        fs::write(&paths[0], &data).unwrap();
        let mut data = fs::read(&paths[2]).unwrap();
        data[8..12].copy_from_slice(&9u32.to_le_bytes());
        fs::write(&paths[2], &data).unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 2, "{:?}", snap.problems);
        assert_eq!(
            (snap.problems[0].path.as_path(), snap.problems[0].offset),
            (paths[0].as_path(), 0)
        );
        assert!(
            snap.problems[0].cause.contains("bad magic"),
            "{}",
            snap.problems[0].cause
        );
        assert_eq!(
            (snap.problems[1].path.as_path(), snap.problems[1].offset),
            (paths[2].as_path(), 0)
        );
        assert!(
            snap.problems[1]
                .cause
                .contains("unsupported segment format version 9"),
            "{}",
            snap.problems[1].cause
        );
        assert_eq!(ids(&snap), vec![2, 12]);
    }

    #[test]
    fn seal_counts_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        // Drop the heartbeat frame of segment 1 (valid frames on both sides).
        let data = fs::read(&paths[0]).unwrap();
        let FrameAt::Good {
            next: first_end, ..
        } = segment::frame_at(&data, HEADER_LEN)
        else {
            panic!()
        };
        let FrameAt::Good {
            next: second_end, ..
        } = segment::frame_at(&data, first_end)
        else {
            panic!()
        };
        let mut cut = data[..first_end].to_vec();
        cut.extend_from_slice(&data[second_end..]);
        fs::write(&paths[0], &cut).unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert_eq!(snap.problems[0].offset, first_end as u64);
        assert!(
            snap.problems[0].cause.contains("seal counts"),
            "{}",
            snap.problems[0].cause
        );
    }

    #[test]
    fn missing_dir_and_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_all(&dir.path().join("nope")),
            Err(StorageError::NotFound { .. })
        ));
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(
            (snap.segments, snap.bindings.len(), snap.agent_running),
            (0, 0, false)
        );
    }

    #[test]
    fn filter_applies_to_the_latest_record_of_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_binding(&binding(1, 1, 10, None));
        w.append_binding(&binding(1, 1, 10, Some(20)));
        w.append_binding(&binding(2, 1, 10, Some(20)));
        w.append_binding(&binding(2, 1, 10, None));
        w.close().unwrap();
        let snap = read_filtered(dir.path(), |b| b.end_ns.is_none()).unwrap();
        assert_eq!(ids(&snap), vec![2]);
    }

    #[test]
    fn a_header_being_written_is_not_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        fs::write(
            dir.path()
                .join(SEGMENTS_DIR)
                .join(segment_name(4, OPEN_EXT)),
            b"NATT",
        )
        .unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.segments, 4);
    }

    #[test]
    fn every_flipped_byte_of_a_sealed_segment_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let original = fs::read(&paths[1]).unwrap();
        for at in 0..original.len() {
            let mut data = original.clone();
            data[at] ^= 0xff;
            fs::write(&paths[1], &data).unwrap();
            let snap = read_all(dir.path()).unwrap();
            assert!(!snap.problems.is_empty(), "flip at {at} not reported");
            assert!(
                snap.problems.iter().all(|p| p.path == paths[1]),
                "{:?}",
                snap.problems
            );
            let ids = ids(&snap);
            assert!(
                ids.contains(&1) && ids.contains(&13),
                "flip at {at}: {ids:?}"
            );
        }
    }

    #[test]
    fn every_truncation_of_an_open_segment_reads_and_recovers_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        let mut frame_ends = vec![HEADER_LEN];
        for id in 1..=3 {
            w.append_binding(&binding(id, 1, id as i64, None));
            w.flush().unwrap();
            let path = dir
                .path()
                .join(SEGMENTS_DIR)
                .join(segment_name(1, OPEN_EXT));
            frame_ends.push(fs::metadata(path).unwrap().len() as usize);
        }
        drop(w);
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        let original = fs::read(seg_dir.join(segment_name(1, OPEN_EXT))).unwrap();
        for cut in 0..=original.len() {
            let expected: Vec<u64> = (1..=3).filter(|&i| frame_ends[i as usize] <= cut).collect();
            for e in fs::read_dir(&seg_dir).unwrap() {
                fs::remove_file(e.unwrap().path()).unwrap();
            }
            fs::write(seg_dir.join(segment_name(1, OPEN_EXT)), &original[..cut]).unwrap();
            let snap = read_all(dir.path()).unwrap();
            assert_eq!(snap.problems, vec![], "cut at {cut}");
            assert_eq!(ids(&snap), expected, "cut at {cut}");
            Writer::open(dir.path()).unwrap().close().unwrap();
            let snap = read_all(dir.path()).unwrap();
            assert_eq!(snap.problems, vec![], "cut at {cut}, recovered");
            assert_eq!(ids(&snap), expected, "cut at {cut}, recovered");
        }
    }

    #[test]
    fn permission_denied_is_an_error() {
        use std::os::unix::fs::PermissionsExt;
        if unsafe { libc::geteuid() } == 0 {
            // root reads everything; nothing to test.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        fs::set_permissions(&seg_dir, fs::Permissions::from_mode(0o000)).unwrap();
        let r = read_all(dir.path());
        fs::set_permissions(&seg_dir, fs::Permissions::from_mode(0o750)).unwrap();
        assert!(
            matches!(r, Err(StorageError::PermissionDenied { .. })),
            "{r:?}"
        );
    }
}
