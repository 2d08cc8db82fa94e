//! The readers' side: the query engine over a data directory (sealed columnar segments,
//! logs, and segments of the first format), with what could not be read.
//!
//! A search visits segments in sequence order. A sealed segment is read through its footer:
//! its time bounds, then its filters, then the fence pointers, and only the blocks that may
//! hold an answer are read. Logs and first-format segments are read whole. The latest record
//! of each binding id wins; an answer still open in a sealed segment is followed into the
//! segments after it (where it was carried) to find its end.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use foldhash::HashMap;

use crate::binding::Binding;

use super::columnar::{self, FileReader, ReadAt, SealedSegment};
use super::filter::{self, Fuse8};
use super::segment::{self, FormatError, FrameAt, HEADER_LEN, Header, Record, Seal};
use super::{
    CoverageEvent, ReadProblem, SEALED_EXT, SEGMENTS_DIR, Snapshot, StorageError, error_chain,
    lock, parse_segment_name, segment_name,
};

/// What to look for: every given condition must hold (no condition: every binding), and the
/// binding's interval `[start, end]` must overlap `[from_ns, to_ns]` (an open binding lasts
/// indefinitely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Search {
    /// External (public) address, and port if given.
    pub external: Option<(IpAddr, Option<u16>)>,
    /// Internal (subscriber) address, and port if given.
    pub internal: Option<(IpAddr, Option<u16>)>,
    /// Destination (remote peer) address, and port if given.
    pub destination: Option<(IpAddr, Option<u16>)>,
    /// IANA protocol number.
    pub proto: Option<u8>,
    /// Window start, ns since the epoch.
    pub from_ns: i64,
    /// Window end, ns since the epoch.
    pub to_ns: i64,
}

impl Search {
    /// Every binding, all of time.
    #[must_use]
    pub fn everything() -> Self {
        Self {
            external: None,
            internal: None,
            destination: None,
            proto: None,
            from_ns: i64::MIN,
            to_ns: i64::MAX,
        }
    }

    /// The binding is of the addresses (and ports, and protocol) looked for. This depends only
    /// on fields that do not change between the records of one binding id.
    #[must_use]
    pub fn matches_address(&self, b: &Binding) -> bool {
        let endpoint = |want: Option<(IpAddr, Option<u16>)>, (ip, port): (IpAddr, u16)| {
            want.is_none_or(|(wip, wport)| wip == ip && wport.is_none_or(|p| p == port))
        };
        self.proto.is_none_or(|p| p == b.proto)
            && endpoint(self.external, b.external())
            && endpoint(self.internal, b.internal())
            && endpoint(self.destination, b.destination())
    }

    /// The binding's interval overlaps the window (an open binding has no end).
    #[must_use]
    pub fn overlaps(&self, b: &Binding) -> bool {
        b.start_ns <= self.to_ns && b.end_ns.is_none_or(|e| e >= self.from_ns)
    }

    fn is_everything(&self) -> bool {
        *self == Self::everything()
    }
}

/// Everything readable in a data directory: [`search`] for [`Search::everything`].
///
/// Errors: directory missing ([`StorageError::NotFound`]), permission denied
/// ([`StorageError::PermissionDenied`]), other I/O on the directory. Corruption in one file is
/// not an error: it becomes a [`ReadProblem`] and reading continues with the rest of that file
/// where possible, and with the other files. An incomplete last frame of an `.open` log
/// (being written, or torn by a crash and not yet sealed) is not a problem.
pub fn read_all(dir: &Path) -> Result<Snapshot, StorageError> {
    search(dir, &Search::everything())
}

/// The coverage events of every segment, and the problems met reading them; no bindings
/// (sealed segments' blocks are not read).
pub fn read_events(dir: &Path) -> Result<Snapshot, StorageError> {
    search_inner(dir, &Search::everything(), false)
}

/// Whether a sealed segment's header has been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderState {
    Unread,
    Good,
    Bad,
}

/// One binding found, with the segment its record came from.
#[derive(Debug)]
struct Hit {
    binding: Binding,
    /// Index into the opened sealed segments when the record came from one.
    sealed: Option<usize>,
}

/// A sealed segment opened during a search, with what has been loaded of it.
struct Opened {
    path: PathBuf,
    reader: FileReader,
    seg: SealedSegment,
    header: HeaderState,
    fences: Option<Vec<columnar::Fence>>,
    ext_filter: Option<Fuse8>,
}

/// The bindings that satisfy `q` (latest record of each id; by start, then id), the coverage
/// events that bear on its window, and every problem met. Errors as for [`read_all`].
pub fn search(dir: &Path, q: &Search) -> Result<Snapshot, StorageError> {
    search_inner(dir, q, true)
}

fn search_inner(dir: &Path, q: &Search, want_bindings: bool) -> Result<Snapshot, StorageError> {
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
    let files = list(&seg_dir)?;
    let mut hits: HashMap<u64, Hit> = HashMap::default();
    let mut opened: Vec<Opened> = Vec::new();
    let mut events = Vec::new();
    let mut done = HashSet::new();
    for (seq, sealed, path) in files {
        if !done.insert(seq) {
            continue;
        }
        let (path, sealed, data) = match read_listed(path, sealed, seq, &seg_dir)? {
            Listed::Columnar(path) => (path, true, None),
            Listed::Rows(path, sealed, data) => (path, sealed, Some(data)),
            Listed::Gone => continue,
            Listed::Problem(problem) => {
                snap.problems.push(problem);
                continue;
            }
        };
        let Some(data) = data else {
            let Some(o) = open_sealed(&path, &mut snap)? else {
                continue;
            };
            let index = opened.len();
            opened.push(o);
            search_sealed(
                q,
                &mut opened[index],
                index,
                &mut hits,
                &mut events,
                &mut snap,
                want_bindings,
            );
            continue;
        };
        snap.segments += 1;
        snap.bytes_on_disk += data.len() as u64;
        scan(&path, &data, sealed, seq, &mut snap.problems, |r| match r {
            Record::Binding(b) | Record::Carried(b) => {
                if want_bindings && q.matches_address(&b) {
                    if q.overlaps(&b) {
                        hits.insert(
                            b.id,
                            Hit {
                                binding: b,
                                sealed: None,
                            },
                        );
                    } else {
                        hits.remove(&b.id);
                    }
                }
            }
            Record::Event(e) => events.push(e),
            Record::Seal(_) => {}
        });
    }
    follow_open_hits(q, &mut opened, &mut hits, &mut snap);
    let mut bindings: Vec<Binding> = hits.into_values().map(|h| h.binding).collect();
    bindings.sort_by_key(|b| (b.start_ns, b.id));
    snap.bindings = bindings;
    events.sort_by_key(CoverageEvent::t_ns);
    snap.events = events;
    Ok(snap)
}

/// The segment files, by sequence number; a sealed file before a log of the same number
/// (a log is removed right after its sealed segment is written).
fn list(seg_dir: &Path) -> Result<Vec<(u32, bool, PathBuf)>, StorageError> {
    let mut files = Vec::new();
    match fs::read_dir(seg_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io("list", seg_dir, e))?;
                if let Some((seq, sealed)) = entry.file_name().to_str().and_then(parse_segment_name)
                {
                    files.push((seq, sealed, entry.path()));
                }
            }
        }
        // Nothing was ever written here.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("list", seg_dir, e)),
    }
    files.sort_by_key(|(seq, sealed, _)| (*seq, !*sealed));
    Ok(files)
}

/// The file starts with the columnar magic. Unreadable files are left to the row reader,
/// which reports them.
fn is_columnar(path: &Path) -> Result<bool, StorageError> {
    let mut magic = [0u8; 8];
    match File::open(path).and_then(|f| {
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut magic, 0)
    }) {
        Ok(()) => Ok(magic == columnar::MAGIC),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(StorageError::PermissionDenied {
                path: path.to_owned(),
            })
        }
        Err(_) => Ok(false),
    }
}

fn problem(snap: &mut Snapshot, path: &Path, offset: u64, e: &columnar::ColumnarError) {
    snap.problems.push(ReadProblem {
        path: path.to_owned(),
        offset,
        cause: error_chain(e),
    });
}

/// Opens a sealed segment by its summary (one read of its last 216 bytes); the header is
/// read and checked only once the segment turns out to bear on the query.
fn open_sealed(path: &Path, snap: &mut Snapshot) -> Result<Option<Opened>, StorageError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", path, e)),
    };
    let reader = FileReader::new(file).map_err(|e| StorageError::io("read", path, e))?;
    snap.segments += 1;
    snap.bytes_on_disk += reader.size();
    match SealedSegment::read_summary(&reader) {
        Ok(summary) => Ok(Some(Opened {
            path: path.to_owned(),
            seg: SealedSegment::from_summary(summary, reader.size()),
            reader,
            header: HeaderState::Unread,
            fences: None,
            ext_filter: None,
        })),
        Err((at, e)) => {
            problem(snap, path, at, &e);
            Ok(None)
        }
    }
}

impl Opened {
    /// Reads and checks the header once; `false` (and a problem) if it is bad.
    fn header_ok(&mut self, snap: &mut Snapshot) -> bool {
        if self.header == HeaderState::Unread {
            self.header = match SealedSegment::with_summary(&self.reader, self.seg.summary) {
                Ok(seg) => {
                    self.seg = seg;
                    HeaderState::Good
                }
                Err((at, e)) => {
                    problem(snap, &self.path, at, &e);
                    HeaderState::Bad
                }
            };
        }
        self.header == HeaderState::Good
    }

    fn fences(&mut self, snap: &mut Snapshot) -> Option<&[columnar::Fence]> {
        if self.fences.is_none() {
            match self.seg.fences(&self.reader) {
                Ok(f) => self.fences = Some(f),
                Err((at, e)) => {
                    problem(snap, &self.path, at, &e);
                    self.fences = Some(Vec::new());
                    return None;
                }
            }
        }
        self.fences.as_deref()
    }

    /// `false` when the external filter says the key is absent; damage answers "maybe".
    fn may_hold_external(&mut self, ip: IpAddr, port: u16, snap: &mut Snapshot) -> bool {
        if self.ext_filter.is_none() {
            match self.seg.ext_filter(&self.reader) {
                Ok(f) => self.ext_filter = Some(f),
                Err((at, e)) => {
                    problem(snap, &self.path, at, &e);
                    return true;
                }
            }
        }
        self.ext_filter
            .as_ref()
            .is_none_or(|f| f.contains(filter::key(ip, port)))
    }

    /// The block's rows with external key `key` (and, given, overlapping `[from, to]`): the
    /// other rows are stepped over, not built.
    fn read_block_of_key(
        &self,
        fence: &columnar::Fence,
        key: (IpAddr, u16),
        window: Option<(i64, i64)>,
        snap: &mut Snapshot,
    ) -> Vec<columnar::Row> {
        snap.blocks_read += 1;
        let keep = |k: (IpAddr, u16), start: i64, end: Option<i64>| {
            k == key && window.is_none_or(|(from, to)| start <= to && end.is_none_or(|e| e >= from))
        };
        match self.seg.read_block_where(&self.reader, fence, &keep) {
            Ok(rows) => rows,
            Err((at, e)) => {
                problem(snap, &self.path, at, &e);
                Vec::new()
            }
        }
    }

    fn read_block(&self, fence: &columnar::Fence, snap: &mut Snapshot) -> Vec<columnar::Row> {
        snap.blocks_read += 1;
        match self.seg.read_block(&self.reader, fence) {
            Ok(rows) => rows,
            Err((at, e)) => {
                problem(snap, &self.path, at, &e);
                Vec::new()
            }
        }
    }
}

fn search_sealed(
    q: &Search,
    o: &mut Opened,
    index: usize,
    hits: &mut HashMap<u64, Hit>,
    events: &mut Vec<CoverageEvent>,
    snap: &mut Snapshot,
    want_bindings: bool,
) {
    let s = o.seg.summary;
    // Coverage: the events of every segment whose window overlaps the query's.
    let wants_events =
        q.is_everything() || (s.window_start_ns <= q.to_ns && q.from_ns <= s.window_end_ns);
    let wants_rows = want_bindings && s.rows > 0 && s.t_lo_ns <= q.to_ns && q.from_ns <= s.t_hi_ns;
    if !(wants_events || wants_rows) || !o.header_ok(snap) {
        return;
    }
    if wants_events {
        match o.seg.events(&o.reader) {
            Ok(e) => events.extend(e),
            Err((at, e)) => problem(snap, &o.path, at, &e),
        }
    }
    if !wants_rows {
        return;
    }
    if let Some((ip, _)) = q.internal {
        match o.seg.int_filter(&o.reader) {
            Ok(f) if !f.contains(filter::key(ip, 0)) => return,
            Ok(_) => {}
            Err((at, e)) => problem(snap, &o.path, at, &e),
        }
    }
    let Some(fences) = o.fences(snap).map(<[columnar::Fence]>::to_vec) else {
        return;
    };
    let candidates: Vec<&columnar::Fence> = fences
        .iter()
        .filter(|f| f.overlaps(q.from_ns, q.to_ns))
        .filter(|f| match q.external {
            Some((ip, Some(port))) => f.may_hold_key((ip, port)),
            Some((ip, None)) => f.may_hold_ip(ip),
            None => true,
        })
        .collect();
    // The external filter costs about a byte per key of the segment, a block about a
    // dozen bytes per row: consult it only when it can save more than one block read.
    if candidates.len() > 1
        && let Some((ip, Some(port))) = q.external
        && !o.may_hold_external(ip, port, snap)
    {
        return;
    }
    for fence in candidates {
        let rows = match q.external {
            Some((ip, Some(port))) => {
                o.read_block_of_key(fence, (ip, port), Some((q.from_ns, q.to_ns)), snap)
            }
            _ => o.read_block(fence, snap),
        };
        for row in rows {
            let b = row.binding;
            if !q.matches_address(&b) {
                continue;
            }
            if q.overlaps(&b) {
                hits.insert(
                    b.id,
                    Hit {
                        binding: b,
                        sealed: Some(index),
                    },
                );
            } else {
                hits.remove(&b.id);
            }
        }
    }
}

/// An answer open in sealed segment `k` may have ended later: it was carried into the next
/// segments, whose time bounds may lie outside the window. Follow it by id and external key
/// through the sealed segments after `k` until it ends or is not carried further.
fn follow_open_hits(
    q: &Search,
    opened: &mut [Opened],
    hits: &mut HashMap<u64, Hit>,
    snap: &mut Snapshot,
) {
    let open: Vec<(u64, usize)> = hits
        .iter()
        .filter_map(|(id, h)| match (h.binding.end_ns, h.sealed) {
            (None, Some(k)) => Some((*id, k)),
            _ => None,
        })
        .collect();
    for (id, k) in open {
        let (ip, port) = hits[&id].binding.external();
        let mut latest: Option<Binding> = None;
        for o in opened.iter_mut().skip(k + 1) {
            if !o.header_ok(snap) || !o.may_hold_external(ip, port, snap) {
                break;
            }
            let Some(fences) = o.fences(snap).map(<[columnar::Fence]>::to_vec) else {
                break;
            };
            let mut found = None;
            for fence in fences.iter().filter(|f| f.may_hold_key((ip, port))) {
                if let Some(r) = o
                    .read_block_of_key(fence, (ip, port), None, snap)
                    .into_iter()
                    .find(|r| r.binding.id == id)
                {
                    found = Some(r.binding);
                    break;
                }
            }
            match found {
                Some(b) => {
                    let ended = b.end_ns.is_some();
                    latest = Some(b);
                    if ended {
                        break;
                    }
                }
                None => break,
            }
        }
        if let Some(b) = latest {
            if q.overlaps(&b) {
                hits.insert(
                    id,
                    Hit {
                        binding: b,
                        sealed: None,
                    },
                );
            } else {
                hits.remove(&id);
            }
        }
    }
}

type Found = (PathBuf, bool, Vec<u8>);

/// A listed segment file, as it is when read.
#[derive(Debug)]
enum Listed {
    /// A sealed columnar segment, to open as such.
    Columnar(PathBuf),
    /// A log or a first-format segment (sealed or not), read whole.
    Rows(PathBuf, bool, Vec<u8>),
    /// Deleted since the listing.
    Gone,
    Problem(ReadProblem),
}

/// Reads what the listing named. The active log may have been sealed since the listing: its
/// sealed, columnar file is then opened instead (`read_segment` follows the rename).
fn read_listed(
    path: PathBuf,
    sealed: bool,
    seq: u32,
    seg_dir: &Path,
) -> Result<Listed, StorageError> {
    if sealed && is_columnar(&path)? {
        return Ok(Listed::Columnar(path));
    }
    Ok(match read_segment(&path, sealed, seq, seg_dir)? {
        Ok((path, true, data)) if data.starts_with(&columnar::MAGIC) => Listed::Columnar(path),
        Ok((path, sealed, data)) => Listed::Rows(path, sealed, data),
        Err(None) => Listed::Gone,
        Err(Some(problem)) => Listed::Problem(problem),
    })
}

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
                                        Record::Binding(_) | Record::Carried(_) => {
                                            found.binding_records += 1;
                                        }
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

    use super::*;
    use crate::storage::columnar::SealedSegment;
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

    /// Rewrites `path` with `f` applied to its bytes.
    fn damage(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut data = fs::read(path).unwrap();
        f(&mut data);
        fs::write(path, &data).unwrap();
    }

    /// The listing saw the active log; the agent sealed it before it was read (vm-test met
    /// this under qemu: `stats` reported the sealed file as a log with a bad magic).
    #[test]
    fn a_log_sealed_after_the_listing_is_read_as_its_sealed_segment() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        let listed_log = seg_dir.join(segment_name(2, OPEN_EXT));
        assert!(!listed_log.exists());
        match read_listed(listed_log, false, 2, &seg_dir).unwrap() {
            Listed::Columnar(path) => assert_eq!(path, paths[1]),
            other => panic!("expected the sealed segment, got {other:?}"),
        }
        let gone = seg_dir.join(segment_name(9, OPEN_EXT));
        assert!(matches!(
            read_listed(gone, false, 9, &seg_dir).unwrap(),
            Listed::Gone
        ));
    }

    #[test]
    fn damaged_block_is_reported_with_offset_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let seg = SealedSegment::open(&fs::read(&paths[1]).unwrap()).unwrap();
        let data = fs::read(&paths[1]).unwrap();
        let fence = seg.fences(&data).unwrap()[0];
        damage(&paths[1], |d| d[fence.block.offset as usize + 20] ^= 0x40);
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        let p = &snap.problems[0];
        assert_eq!(p.path, paths[1]);
        assert_eq!(p.offset, fence.block.offset);
        assert!(p.cause.contains("block checksum mismatch"), "{}", p.cause);
        // Segment 2's block is lost; 1 and 3 (and the bindings carried into 3) are read.
        assert_eq!(ids(&snap), vec![1, 2, 3, 11, 12, 13]);
        assert_eq!(snap.events.len(), 3);
        assert_eq!(snap.segments, 3);
    }

    #[test]
    fn truncated_file_and_wrong_magic_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = three_segments(dir.path());
        let len = fs::metadata(&paths[0]).unwrap().len();
        damage(&paths[0], |d| d.truncate(d.len() - 3));
        damage(&paths[2], |d| d[0..8].copy_from_slice(b"NOTASEGM"));
        let snap = read_all(dir.path()).unwrap();
        let mut causes: Vec<(PathBuf, u64, String)> = snap
            .problems
            .iter()
            .map(|p| (p.path.clone(), p.offset, p.cause.clone()))
            .collect();
        causes.sort();
        assert_eq!(causes.len(), 2, "{causes:?}");
        assert_eq!(causes[0].0, paths[0]);
        assert_eq!(causes[0].1, len - 3 - 16);
        assert!(causes[0].2.contains("trailer"), "{}", causes[0].2);
        assert_eq!(causes[1].0, paths[2]);
        assert_eq!(causes[1].1, 0);
        assert!(causes[1].2.contains("bad magic"), "{}", causes[1].2);
        // Segment 2 still answers: its own bindings and those carried from 1.
        assert_eq!(ids(&snap), vec![1, 2, 11, 12]);
    }

    #[test]
    fn first_format_segments_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        fs::create_dir_all(&seg_dir).unwrap();
        let header = Header {
            log: false,
            seq: 1,
            created_ns: 5,
            run: 1,
        };
        let mut file = header.encode().to_vec();
        let mut payload = Vec::new();
        segment::encode_binding(&mut payload, &binding(7, 1, 1_000_000, Some(9_000_000)));
        segment::encode_event(&mut payload, &CoverageEvent::Heartbeat { t_ns: 6 });
        segment::encode_frame(&mut file, &payload).unwrap();
        let mut seal = Vec::new();
        segment::encode_seal(
            &mut seal,
            &Seal {
                binding_records: 1,
                event_records: 1,
                data_frames: 1,
                sealed_ns: 7,
            },
        );
        segment::encode_frame(&mut file, &seal).unwrap();
        fs::write(seg_dir.join(segment_name(1, SEALED_EXT)), &file).unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(
            snap.bindings,
            vec![binding(7, 1, 1_000_000, Some(9_000_000))]
        );
        // A writer starts after it, and carries nothing (the binding ended).
        let w = Writer::open(dir.path()).unwrap();
        assert!(w.inherited().is_empty());
        w.close().unwrap();
        assert_eq!(read_all(dir.path()).unwrap().bindings.len(), 1);
    }

    #[test]
    fn missing_dir_and_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_all(&dir.path().join("nope")),
            Err(StorageError::NotFound { .. })
        ));
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.segments, 0);
        assert!(snap.bindings.is_empty());
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
