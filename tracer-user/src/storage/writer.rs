//! The agent's side: appends bindings and coverage events to the active segment, rotates
//! and seals segments, and recovers the segment a crashed agent left unsealed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::access::{self, Access};
use crate::binding::Binding;

use foldhash::HashMap;

use super::checkpoint;
use super::columnar::{self, FileReader, SealedSegment};
use super::lock::{self, DirLock};
use super::merkle::Hash;
use super::seal::{Chain, read_log, round_times, seal_log, sync_dir};
use super::segment::{self, HEADER_LEN, Header, TARGET_PAYLOAD_LEN};
use super::{
    CoverageEvent, OPEN_EXT, SEALED_EXT, SEGMENTS_DIR, StorageError, parse_segment_name,
    segment_name,
};
use crate::signing::SignerKey;

/// Tunables of a [`Writer`]; [`Default`] gives the documented values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// Seal the active segment and start a new one once it is this large (default 64 MiB).
    pub max_segment_bytes: u64,
    /// Seal the active segment and start a new one once it holds this many binding records
    /// (default 2^21): bounds the memory sealing needs.
    pub max_segment_records: u64,
    /// Seal the active segment and start a new one once it is this old (default 1 hour).
    pub max_segment_age: Duration,
    /// Minimum time between two fsyncs of the active segment (default 1 second).
    pub fsync_interval: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_segment_bytes: 64 << 20,
            max_segment_records: 1 << 21,
            max_segment_age: Duration::from_secs(3600),
            fsync_interval: Duration::from_secs(1),
        }
    }
}

/// The writes the writer does to a segment file: a seam to inject I/O errors in tests.
pub(crate) trait SegmentFile: fmt::Debug + Send {
    /// Appends `buf` at the end of the file (all of it, or an error).
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// fdatasync.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// Creates a new segment file (it must not exist yet).
pub(crate) type Opener = Box<dyn FnMut(&Path) -> io::Result<Box<dyn SegmentFile>> + Send>;

#[derive(Debug)]
struct RealFile(File);

impl SegmentFile for RealFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// Creates segment files with mode 0640 and the group of `access`.
fn real_opener(access: Access) -> Opener {
    Box::new(move |path: &Path| {
        let f = access::create_file(
            path,
            OpenOptions::new().append(true).create_new(true),
            &access,
        )?;
        Ok(Box::new(RealFile(f)) as Box<dyn SegmentFile>)
    })
}

/// A record waiting for the next flush.
#[derive(Debug)]
enum Pending {
    Binding(Binding),
    Carried(Binding),
    Event(CoverageEvent),
}

/// The log being written.
#[derive(Debug)]
struct Active {
    seq: u32,
    path: PathBuf,
    file: Box<dyn SegmentFile>,
    /// Bytes of valid data in the file (header and complete frames).
    len: u64,
    created: Instant,
    binding_records: u64,
    /// Frames were written since the last fsync.
    unsynced: bool,
    /// A failed append may have left partial bytes past `len`; they must be cut first.
    dirty_tail: bool,
}

/// A log closed at rotation, being sealed on a background thread.
#[derive(Debug)]
struct Sealing {
    seq: u32,
    path: PathBuf,
    window_end_ns: i64,
    handle: std::thread::JoinHandle<Result<Hash, StorageError>>,
}

/// Writes one data directory. Exactly one `Writer` per directory at a time (flock on `DIR/LOCK`).
///
/// Records go to the active log (`NNNNNNNN.open`), a framed append log; at rotation the log
/// is closed, a new one begins with the bindings still open ("carried"), and the closed log
/// is sealed into a columnar segment (`NNNNNNNN.seg`) on a background thread.
pub struct Writer {
    seg_dir: PathBuf,
    options: WriterOptions,
    opener: Opener,
    active: Option<Active>,
    /// Sequence number of the next segment to create.
    next_seq: u32,
    /// Sequence number of the first segment this writer created.
    run: u32,
    id_hi: u32,
    id_lo: u64,
    /// Seal the active segment and start a new one before writing more.
    rotate_pending: bool,
    pending: Vec<Pending>,
    last_sync: Option<Instant>,
    /// Bindings open (no end) as last written, by id: carried into the next log.
    open: HashMap<u64, Binding>,
    /// The backend while capture is attached (from the events written): a new log begins
    /// with an `attached` event so that it tells its own coverage.
    attached: Option<String>,
    /// Where the next sealed segment links.
    chain: Chain,
    /// The previous log's seal, if still running.
    sealing: Option<Sealing>,
    /// Bindings the previous run left open, carried into this run's first log.
    inherited: Vec<Binding>,
    /// Signs each sealed segment's checkpoint ([`Writer::sign_with`]).
    signer: Option<Arc<SignerKey>>,
    _lock: DirLock,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("seg_dir", &self.seg_dir)
            .field("active", &self.active.as_ref().map(|a| &a.path))
            .field("pending", &self.pending.len())
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Signs the checkpoint of every segment sealed from now on with `signer`, and at once
    /// those of the sealed segments (format version 2) sealed before any was signed (a key
    /// configured for the first time). Returns how many were signed now.
    ///
    /// A segment without a checkpoint sealed after a signed one is not signed here: its
    /// checkpoint was lost or removed, and signing its present content would vouch for
    /// whatever it now holds. (Segments before a signed one need no such care: the signed
    /// checkpoint after them pins their root through the chain.) `nattrace verify --key`
    /// reports it.
    pub fn sign_with(&mut self, signer: Arc<SignerKey>) -> Result<usize, StorageError> {
        self.finish_sealing()?;
        let seqs = sealed_seqs(&self.seg_dir)?;
        let last_signed = seqs
            .iter()
            .rev()
            .find(|&&seq| checkpoint::checkpoint_path(&self.seg_dir, seq).exists())
            .copied();
        let mut signed = 0;
        for seq in seqs {
            if checkpoint::checkpoint_path(&self.seg_dir, seq).exists() {
                continue;
            }
            if last_signed.is_some_and(|last| seq > last) {
                log::error!(
                    "segment {seq} has no signed checkpoint although segment {} before it has: \
                     not signing it now (run nattrace verify --data-dir DIR --key PUBKEY)",
                    last_signed.unwrap_or_default()
                );
                continue;
            }
            let path = self.seg_dir.join(segment_name(seq, SEALED_EXT));
            let Ok(reader) = File::open(&path).and_then(FileReader::new) else {
                continue;
            };
            // Damaged or first-format segments are left to `nattrace verify`.
            let Ok(seg) = SealedSegment::open(&reader) else {
                continue;
            };
            if seg.version < 2 {
                continue;
            }
            let body = checkpoint::Checkpoint::of_segment(&seg).body();
            let note = crate::signing::sign(&body, &signer)
                .map_err(|e| StorageError::io("sign", &path, io::Error::other(e)))?;
            checkpoint::write_checkpoint(&self.seg_dir, seq, &note)?;
            signed += 1;
        }
        self.signer = Some(signer);
        Ok(signed)
    }

    /// Creates DIR if missing (0750), takes an exclusive flock on DIR/LOCK (error
    /// [`StorageError::Locked`] naming the holder's pid written in the file), seals any log a
    /// crashed agent left (a torn tail frame is dropped), and starts a new log that carries
    /// the bindings the newest sealed segment holds open ([`Writer::inherited`]).
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with_options(dir, WriterOptions::default())
    }

    /// [`Writer::open`] with other segment size, age and fsync limits.
    pub fn open_with_options(dir: &Path, options: WriterOptions) -> Result<Self, StorageError> {
        let access = access::of_data_dir(dir)?;
        Self::open_with(dir, options, real_opener(access))
    }

    /// [`Writer::open_with_options`] creating segment files through `opener`.
    pub(crate) fn open_with(
        dir: &Path,
        options: WriterOptions,
        opener: Opener,
    ) -> Result<Self, StorageError> {
        // Modes and group of everything created: `crate::access`, from DIR/nattrace.toml.
        let access = access::of_data_dir(dir)?;
        access::create_dir_all(dir, &access)
            .map_err(|e| StorageError::io("create directory", dir, e))?;
        let lock = lock::lock_exclusive(dir, &access)?;
        // What was written before a `group` was configured gets it now.
        access::adopt(dir, &access)
            .map_err(|(p, e)| StorageError::io("set the group of", &p, e))?;
        let seg_dir = dir.join(SEGMENTS_DIR);
        access::create_dir(&seg_dir, &access)
            .map_err(|e| StorageError::io("create directory", &seg_dir, e))?;
        let writer_id = writer_id(dir, &access)?;
        // With a group, its members query: each query appends to the audit log, which is
        // therefore theirs to append to (0660; `access::AUDIT_LOG_MODE` says why). Not a
        // reason to stop capturing: without it their queries are refused, as before.
        if let Err(e) = crate::audit::prepare_for_group(dir, &access) {
            log::warn!(
                "{}; members of the data directory's group cannot query until it is fixed",
                crate::storage::error_chain(&e)
            );
        }

        let mut max_seq = 0;
        let mut logs = Vec::new();
        let mut sealed = Vec::new();
        let entries = fs::read_dir(&seg_dir).map_err(|e| StorageError::io("list", &seg_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list", &seg_dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".seg.tmp") {
                // A seal that did not finish: its log is still there.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, is_sealed)) = parse_segment_name(name) else {
                continue;
            };
            max_seq = max_seq.max(seq);
            if is_sealed {
                sealed.push(seq);
            } else {
                logs.push((seq, entry.path()));
            }
        }
        logs.sort();
        sealed.sort_unstable();
        let mut chain = newest_chain_link(&seg_dir, &sealed, writer_id);
        for (seq, path) in &logs {
            if sealed.binary_search(seq).is_ok() {
                // Crashed after the rename, before removing the log.
                log::info!("{}: removing log already sealed", path.display());
                fs::remove_file(path).map_err(|e| StorageError::io("remove", path, e))?;
                continue;
            }
            if let Some(root) = recover(&seg_dir, *seq, path, &chain)? {
                chain.prev_seq = *seq;
                chain.prev_root = root;
                sealed.push(*seq);
            }
        }
        sealed.sort_unstable();
        let inherited = open_in_newest(&seg_dir, &sealed);
        let first = max_seq
            .checked_add(1)
            .ok_or_else(|| StorageError::SequenceExhausted {
                path: seg_dir.clone(),
            })?;

        let mut w = Self {
            seg_dir,
            options,
            opener,
            active: None,
            next_seq: first,
            run: first,
            id_hi: first,
            id_lo: 0,
            rotate_pending: false,
            pending: Vec::new(),
            last_sync: None,
            open: inherited.iter().map(|b| (b.id, b.clone())).collect(),
            attached: None,
            chain,
            sealing: None,
            inherited,
            signer: None,
            _lock: lock,
        };
        w.start_segment()?;
        Ok(w)
    }

    /// The bindings an earlier run left open (newest sealed segment), carried into this run's
    /// first log: the agent adopts them or ends them.
    #[must_use]
    pub fn inherited(&self) -> &[Binding] {
        &self.inherited
    }

    /// A binding id not used before in this data directory: the sequence number of a segment
    /// this writer creates, shifted left 32 bits, or'ed with a counter. Ids with high part `h`
    /// are only ever written to segments numbered `h` or above, so the next writer, which starts
    /// numbering above every segment on disk, cannot collide with them.
    pub fn next_binding_id(&mut self) -> u64 {
        let id = (u64::from(self.id_hi) << 32) | self.id_lo;
        self.id_lo += 1;
        if self.id_lo > u64::from(u32::MAX) {
            // Counter used up: continue in the namespace of the next segment, created before
            // any of these ids is written.
            self.id_hi = self.next_seq.max(self.id_hi.saturating_add(1));
            self.id_lo = 0;
            self.rotate_pending = true;
        }
        id
    }

    /// Buffers a binding record; a later record with the same id supersedes it (an open
    /// binding is written again when it ends). Times are stored rounded to the millisecond,
    /// the start down and the end up.
    pub fn append_binding(&mut self, b: &Binding) {
        let b = round_times(b.clone());
        if b.end_ns.is_none() {
            self.open.insert(b.id, b.clone());
        } else {
            self.open.remove(&b.id);
        }
        self.pending.push(Pending::Binding(b));
    }

    /// Buffers a coverage event record.
    pub fn append_event(&mut self, e: CoverageEvent) {
        match &e {
            CoverageEvent::Attached { backend, .. } => self.attached = Some(backend.clone()),
            CoverageEvent::Detached { .. }
            | CoverageEvent::AgentStart { .. }
            | CoverageEvent::AgentStop { .. } => self.attached = None,
            CoverageEvent::Heartbeat { .. } | CoverageEvent::Loss { .. } => {}
        }
        self.pending.push(Pending::Event(e));
    }

    /// Number of records waiting for [`Writer::flush`].
    #[must_use]
    pub fn buffered_records(&self) -> usize {
        self.pending.len()
    }

    /// Writes everything buffered as one frame (several above 4 MiB uncompressed) to the
    /// active log, visible to readers right after. fsyncs at most once per
    /// `fsync_interval` (1 s). Rotates to a new log past `max_segment_bytes` (64 MiB),
    /// `max_segment_records` or `max_segment_age` (1 h). On an I/O error the records not yet
    /// written stay buffered (nothing dropped) and the error is returned: call again later.
    ///
    /// If the write succeeded but the fsync or the rotation after it failed, the records are
    /// written (not buffered again, so not duplicated), the error is returned, and the next
    /// call starts a new log first.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        self.flush_inner(true)
    }

    /// Flushes, seals the active log into a sealed segment and releases the lock. On error
    /// the log stays `.open` and is sealed by the next [`Writer::open`]; records still
    /// buffered are lost.
    pub fn close(mut self) -> Result<(), StorageError> {
        self.flush_inner(false)?;
        self.finish_sealing()?;
        self.seal_active(false)
    }

    fn flush_inner(&mut self, rotate: bool) -> Result<(), StorageError> {
        self.prepare()?;
        if !self.pending.is_empty() {
            self.write_pending()?;
        }
        let active = self
            .active
            .as_mut()
            .expect("prepare() leaves an active segment");
        let due = self
            .last_sync
            .is_none_or(|t| t.elapsed() >= self.options.fsync_interval);
        if active.unsynced && due {
            if let Err(e) = active.file.sync() {
                // After a failed fsync the kernel may have dropped the pages: do not trust
                // this file any more.
                self.rotate_pending = true;
                return Err(StorageError::io("fsync", &active.path, e));
            }
            active.unsynced = false;
            self.last_sync = Some(Instant::now());
        }
        if rotate && self.rotation_due() {
            self.rotate_pending = true;
            self.prepare()?;
        }
        Ok(())
    }

    fn rotation_due(&self) -> bool {
        self.active.as_ref().is_some_and(|a| {
            a.len >= self.options.max_segment_bytes
                || a.binding_records >= self.options.max_segment_records
                || a.created.elapsed() >= self.options.max_segment_age
        })
    }

    /// Makes the active log writable: cuts a partial frame a failed write left, finishes
    /// a pending rotation, creates the active log if there is none.
    fn prepare(&mut self) -> Result<(), StorageError> {
        if let Some(a) = self.active.as_mut()
            && a.dirty_tail
        {
            a.file
                .truncate(a.len)
                .map_err(|e| StorageError::io("truncate", &a.path, e))?;
            a.dirty_tail = false;
        }
        if self.rotate_pending && self.active.is_some() {
            self.seal_active(true)?;
        }
        if self.active.is_none() {
            self.start_segment()?;
        }
        self.rotate_pending = false;
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), StorageError> {
        let active = self
            .active
            .as_mut()
            .expect("prepare() leaves an active segment");
        let mut bytes = Vec::new();
        let mut payload = Vec::new();
        let mut bindings = 0;
        let compress = |e| StorageError::Io {
            op: "compress a frame for",
            path: active.path.clone(),
            source: e,
        };
        for p in &self.pending {
            match p {
                Pending::Binding(b) => {
                    segment::encode_binding(&mut payload, b);
                    bindings += 1;
                }
                Pending::Carried(b) => {
                    segment::encode_carried(&mut payload, b);
                    bindings += 1;
                }
                Pending::Event(e) => segment::encode_event(&mut payload, e),
            }
            if payload.len() >= TARGET_PAYLOAD_LEN {
                segment::encode_frame(&mut bytes, &payload).map_err(compress)?;
                payload.clear();
            }
        }
        if !payload.is_empty() {
            segment::encode_frame(&mut bytes, &payload).map_err(compress)?;
        }
        if let Err(e) = active.file.append(&bytes) {
            // Cut what may have been written of it; if that fails too, the next flush retries.
            active.dirty_tail = active.file.truncate(active.len).is_err();
            return Err(StorageError::io("write", &active.path, e));
        }
        active.len += bytes.len() as u64;
        active.binding_records += bindings;
        active.unsynced = true;
        self.pending.clear();
        Ok(())
    }

    /// Creates the next log, writes and syncs its header, syncs the directory, and queues
    /// the carried bindings (and an `attached` event while capture runs) at its head.
    fn start_segment(&mut self) -> Result<(), StorageError> {
        let seq = self.next_seq.max(self.id_hi);
        self.next_seq = seq
            .checked_add(1)
            .ok_or_else(|| StorageError::SequenceExhausted {
                path: self.seg_dir.clone(),
            })?;
        let path = self.seg_dir.join(segment_name(seq, OPEN_EXT));
        let created_ns = now_ns();
        let header = Header {
            log: true,
            seq,
            created_ns,
            run: self.run,
        };
        let mut file = (self.opener)(&path).map_err(|e| StorageError::io("create", &path, e))?;
        let written = file.append(&header.encode()).and_then(|()| file.sync());
        if let Err(e) = written.and_then(|()| sync_dir(&self.seg_dir)) {
            // The file holds no records: remove it (a left-over is removed by the next open).
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(StorageError::io("create", &path, e));
        }
        self.last_sync = Some(Instant::now());
        self.active = Some(Active {
            seq,
            path,
            file,
            len: HEADER_LEN as u64,
            created: Instant::now(),
            binding_records: 0,
            unsynced: false,
            dirty_tail: false,
        });
        let mut head: Vec<Pending> = Vec::with_capacity(self.open.len() + 1);
        if let Some(backend) = &self.attached {
            head.push(Pending::Event(CoverageEvent::Attached {
                t_ns: created_ns,
                backend: backend.clone(),
            }));
        }
        // Open bindings not yet written are in `pending` already: not carried.
        let unwritten: foldhash::HashSet<u64> = self
            .pending
            .iter()
            .filter_map(|p| match p {
                Pending::Binding(b) => Some(b.id),
                _ => None,
            })
            .collect();
        let mut carried: Vec<&Binding> = self
            .open
            .values()
            .filter(|b| !unwritten.contains(&b.id))
            .collect();
        carried.sort_by_key(|b| b.id);
        head.extend(carried.into_iter().cloned().map(Pending::Carried));
        // Records buffered before the rotation belong after the carried state (they are newer).
        head.append(&mut self.pending);
        self.pending = head;
        Ok(())
    }

    /// Closes the active log (fsync) and seals it: on a background thread when
    /// `background`, else right here. One seal runs at a time, in sequence order, so each
    /// sealed segment links to the one before.
    fn seal_active(&mut self, background: bool) -> Result<(), StorageError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if a.dirty_tail {
            a.file
                .truncate(a.len)
                .map_err(|e| StorageError::io("truncate", &a.path, e))?;
            a.dirty_tail = false;
        }
        a.file
            .sync()
            .map_err(|e| StorageError::io("fsync", &a.path, e))?;
        let a = self.active.take().expect("checked above");
        drop(a.file);
        let window_end_ns = now_ns();
        self.finish_sealing()?;
        let (seg_dir, chain, seq, path) = (self.seg_dir.clone(), self.chain, a.seq, a.path);
        let signer = self.signer.clone();
        if background {
            let p = path.clone();
            let handle = std::thread::Builder::new()
                .name("nattrace-seal".into())
                .spawn(move || {
                    seal_log(&seg_dir, seq, &p, &chain, window_end_ns, signer.as_deref())
                })
                .map_err(|e| StorageError::io("start sealing", &path, e))?;
            self.sealing = Some(Sealing {
                seq,
                path,
                window_end_ns,
                handle,
            });
        } else {
            let root = seal_log(
                &seg_dir,
                seq,
                &path,
                &chain,
                window_end_ns,
                signer.as_deref(),
            )?;
            self.chain.prev_seq = seq;
            self.chain.prev_root = root;
        }
        Ok(())
    }

    /// Waits for the background seal, if any; on failure seals again here, once.
    fn finish_sealing(&mut self) -> Result<(), StorageError> {
        let Some(s) = self.sealing.take() else {
            return Ok(());
        };
        let result = s.handle.join().unwrap_or_else(|_| {
            Err(StorageError::io(
                "seal",
                &s.path,
                io::Error::other("sealing thread panicked"),
            ))
        });
        let root = match result {
            Ok(root) => root,
            Err(e) => {
                log::warn!("{}: sealing failed ({e}); retrying", s.path.display());
                seal_log(
                    &self.seg_dir,
                    s.seq,
                    &s.path,
                    &self.chain,
                    s.window_end_ns,
                    self.signer.as_deref(),
                )?
            }
        };
        self.chain.prev_seq = s.seq;
        self.chain.prev_root = root;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(s) = self.sealing.take() {
            let _ = s.handle.join();
        }
        if !self.pending.is_empty() {
            log::warn!(
                "{}: writer dropped with {} records not written",
                self.seg_dir.display(),
                self.pending.len()
            );
        }
    }
}

pub(crate) fn now_ns() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Name of the file holding the data directory's writer id.
pub const WRITER_ID_FILE: &str = "WRITER_ID";

/// The data directory's writer id (32 hex digits in `DIR/WRITER_ID`), created on first use.
fn writer_id(dir: &Path, access: &Access) -> Result<[u8; 16], StorageError> {
    let path = dir.join(WRITER_ID_FILE);
    if let Ok(text) = fs::read_to_string(&path)
        && let Some(id) = parse_hex16(text.trim())
    {
        return Ok(id);
    }
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut id))
        .map_err(|e| StorageError::io("read", Path::new("/dev/urandom"), e))?;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = access::create_file(
        &path,
        OpenOptions::new().write(true).create(true).truncate(true),
        access,
    )
    .map_err(|e| StorageError::io("create", &path, e))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| StorageError::io("write", &path, e))?;
    Ok(id)
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The chain link of the newest readable columnar segment among `sealed` (sorted).
fn newest_chain_link(seg_dir: &Path, sealed: &[u32], writer_id: [u8; 16]) -> Chain {
    for &seq in sealed.iter().rev() {
        let path = seg_dir.join(segment_name(seq, SEALED_EXT));
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(reader) = FileReader::new(file) else {
            continue;
        };
        if let Ok(seg) = SealedSegment::open(&reader) {
            return Chain {
                writer_id,
                prev_seq: seq,
                prev_root: seg.summary.root,
            };
        }
    }
    Chain {
        writer_id,
        prev_seq: 0,
        prev_root: [0; 32],
    }
}

/// The bindings open in the newest readable sealed segment (columnar or first format).
fn open_in_newest(seg_dir: &Path, sealed: &[u32]) -> Vec<Binding> {
    for &seq in sealed.iter().rev() {
        let path = seg_dir.join(segment_name(seq, SEALED_EXT));
        let Ok(data) = fs::read(&path) else { continue };
        if data.starts_with(&columnar::MAGIC) {
            let Ok(seg) = SealedSegment::open(&data) else {
                log::warn!("{}: unreadable, open bindings not carried", path.display());
                continue;
            };
            let Ok(fences) = seg.fences(&data) else {
                continue;
            };
            let mut open = Vec::new();
            for f in &fences {
                match seg.read_block(&data, f) {
                    Ok(rows) => open.extend(
                        rows.into_iter()
                            .map(|r| r.binding)
                            .filter(|b| b.end_ns.is_none()),
                    ),
                    Err((at, e)) => log::warn!("{}: offset {at}: {e}", path.display()),
                }
            }
            open.sort_by_key(|b| b.id);
            return open;
        }
        if let Ok(contents) = read_log(&data) {
            let mut open: Vec<Binding> = contents
                .bindings
                .into_iter()
                .map(|(b, _)| round_times(b))
                .filter(|b| b.end_ns.is_none())
                .collect();
            open.sort_by_key(|b| b.id);
            return open;
        }
    }
    Vec::new()
}

/// Seals log `seq` at `path` that a crashed agent (or an older version) left: every complete
/// frame is kept, a torn tail (an incomplete last frame, a last frame failing its checksum,
/// or a frame length that cannot be right, and everything after it) is dropped. Returns the
/// new root, or `None` when nothing was sealed: a file too short for a header holds no
/// records and is removed; a file with a broken header is renamed to `.seg` as it is
/// (readers report it); a file of an unknown format version is left alone.
fn recover(
    seg_dir: &Path,
    seq: u32,
    path: &Path,
    chain: &Chain,
) -> Result<Option<Hash>, StorageError> {
    let io = |op, e| StorageError::io(op, path, e);
    let data = fs::read(path).map_err(|e| io("read", e))?;
    let sealed_path = seg_dir.join(segment_name(seq, SEALED_EXT));
    if data.len() < HEADER_LEN {
        log::warn!(
            "{}: removing log without records ({} bytes)",
            path.display(),
            data.len()
        );
        fs::remove_file(path).map_err(|e| io("remove", e))?;
        sync_dir(seg_dir).map_err(|e| StorageError::io("fsync", seg_dir, e))?;
        return Ok(None);
    }
    match Header::decode(&data) {
        Ok(_) => {}
        Err(e @ segment::FormatError::UnsupportedVersion { .. }) => {
            log::warn!("{}: not recovering: {e}", path.display());
            return Ok(None);
        }
        Err(e) => {
            log::warn!("{}: sealing as is, unreadable header: {e}", path.display());
            fs::rename(path, &sealed_path).map_err(|e| io("rename", e))?;
            sync_dir(seg_dir).map_err(|e| StorageError::io("fsync", seg_dir, e))?;
            return Ok(None);
        }
    }
    // The window ends now: open bindings answer for the time the agent was down, as
    // upper bounds, until the next run carries them on and ends or adopts them.
    // Not signed here: [`Writer::sign_with`] signs every unsigned segment at start.
    let root = seal_log(seg_dir, seq, path, chain, now_ns(), None)?;
    log::info!(
        "{}: sealed the log a previous run left",
        sealed_path.display()
    );
    Ok(Some(root))
}

/// Sequence numbers of the sealed segments in `seg_dir`, ascending.
fn sealed_seqs(seg_dir: &Path) -> Result<Vec<u32>, StorageError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(seg_dir).map_err(|e| StorageError::io("list", seg_dir, e))? {
        let entry = entry.map_err(|e| StorageError::io("list", seg_dir, e))?;
        if let Some((seq, true)) = entry.file_name().to_str().and_then(parse_segment_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;
    use crate::storage::testutil::binding;
    use crate::storage::{ReadProblem, read_all};

    /// The bindings as stored: times in whole milliseconds.
    fn stored(bs: &[Binding]) -> Vec<Binding> {
        bs.iter().cloned().map(round_times).collect()
    }

    fn heartbeat(t_ns: i64) -> CoverageEvent {
        CoverageEvent::Heartbeat { t_ns }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join(SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip_through_writer_and_read_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        let mut written = Vec::new();
        for i in 0..100 {
            let id = w.next_binding_id();
            let mut b = binding(
                id,
                1000 + i,
                i64::from(i) * 1_000_000_000,
                Some(i64::from(i) * 1_000_000_000 + 5),
            );
            if i % 2 == 0 {
                b.orig.src = "2001:db8::10".parse().unwrap();
                b.end_ns = None;
            }
            w.append_binding(&b);
            written.push(b);
        }
        let events = vec![
            CoverageEvent::AgentStart { t_ns: 1, pid: 7 },
            CoverageEvent::Attached {
                t_ns: 2,
                backend: "ebpf".into(),
            },
            heartbeat(3),
        ];
        for e in &events {
            w.append_event(e.clone());
        }
        assert_eq!(w.buffered_records(), 103);
        w.flush().unwrap();
        assert_eq!(w.buffered_records(), 0);

        // Visible while the agent runs, from the .open segment.
        let live = read_all(dir.path()).unwrap();
        assert!(live.agent_running);
        assert_eq!(live.bindings, stored(&written));
        assert_eq!(live.problems, vec![]);

        w.close().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg"]);
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.bindings, stored(&written));
        assert_eq!(snap.events, events);
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.segments, 1);
        assert!(!snap.agent_running);
        assert_eq!(
            snap.bytes_on_disk,
            fs::metadata(dir.path().join("segments/00000001.seg"))
                .unwrap()
                .len()
        );
    }

    #[test]
    fn open_binding_is_superseded_by_its_end_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        let id = w.next_binding_id();
        let other = w.next_binding_id();
        w.append_binding(&binding(id, 1, 10, None));
        w.append_binding(&binding(other, 2, 20, None));
        w.close().unwrap();

        let mut w = Writer::open(dir.path()).unwrap();
        assert_eq!(
            w.inherited(),
            [binding(id, 1, 0, None), binding(other, 2, 0, None)]
        );
        let mut ended = binding(id, 1, 10, Some(30));
        ended.end_approximate = true;
        w.append_binding(&ended);
        w.flush().unwrap();
        let snap = read_all(dir.path()).unwrap();
        // Times are stored in whole milliseconds, starts rounded down and ends up.
        let mut want = ended.clone();
        want.start_ns = 0;
        want.end_ns = Some(1_000_000);
        assert_eq!(snap.bindings, vec![want, binding(other, 2, 0, None)]);
        drop(w);
    }

    #[test]
    fn ids_are_unique_across_runs_and_counter_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        let a = w.next_binding_id();
        assert_eq!(a, 1 << 32);
        w.id_lo = u64::from(u32::MAX);
        let last = w.next_binding_id();
        let b = w.next_binding_id();
        assert_eq!(last, (1 << 32) | u64::from(u32::MAX));
        assert_eq!(b, 2 << 32);
        w.append_binding(&binding(b, 1, 1, None));
        w.flush().unwrap();
        // The id with high part 2 went to segment 2, segment 1 was sealed first.
        w.finish_sealing().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg", "00000002.open"]);
        drop(w);
        let mut w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.next_binding_id(), 3 << 32);
        w.close().unwrap();
        assert_eq!(
            files(dir.path()),
            vec!["00000001.seg", "00000002.seg", "00000003.seg"]
        );
    }

    #[test]
    fn second_writer_fails_with_locked() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(dir.path()).unwrap();
        match Writer::open(dir.path()) {
            Err(StorageError::Locked { path, pid }) => {
                assert_eq!(path, dir.path().join("LOCK"));
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        w.close().unwrap();
        Writer::open(dir.path()).unwrap().close().unwrap();
    }

    /// Every directory and file in `data` (recursively) with its mode and group.
    fn modes(data: &Path) -> Vec<(PathBuf, u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut todo = vec![data.to_owned()];
        while let Some(p) = todo.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
            out.push((p, m.mode() & 0o7777, m.gid()));
        }
        out.sort();
        out
    }

    #[test]
    fn creates_dirs_0750_and_files_0640() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        let mut w = Writer::open(&data).unwrap();
        let id = w.next_binding_id();
        w.append_binding(&binding(id, 1, 1, None));
        w.flush().unwrap();
        let open = modes(&data);
        w.close().unwrap();
        let closed = modes(&data);
        // DIR, LOCK, WRITER_ID, segments, then the .open log or the .seg.
        assert_eq!((open.len(), closed.len()), (5, 5), "{open:?} {closed:?}");
        for (p, mode, _) in open.into_iter().chain(closed) {
            let want = if p.is_dir() { 0o750 } else { 0o640 };
            assert_eq!(mode, want, "{} mode {mode:o}", p.display());
        }
        let parent = fs::metadata(dir.path().join("a")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&parent.permissions()) & 0o7777,
            0o750
        );
    }

    #[test]
    fn configured_group_owns_everything_written() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root, cannot give files to another group");
            return;
        }
        let Some((name, gid)) = ["daemon", "adm", "nogroup"]
            .into_iter()
            .find_map(|n| Some((n, crate::config::group_id(n).ok()??)))
        else {
            eprintln!("skipped: none of daemon, adm, nogroup in the group database");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        // A directory written before the group was configured...
        Writer::open(data).unwrap().close().unwrap();
        fs::set_permissions(data, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(
            data.join(crate::config::CONFIG_FILE),
            format!("group = \"{name}\"\n"),
        )
        .unwrap();
        // ...is brought to it by the next writer, and so is what that one writes. (Through
        // another name: this process remembers the access of `data` it first found.)
        let again = dir.path().with_extension("again");
        std::os::unix::fs::symlink(data, &again).unwrap();
        let mut w = Writer::open(&again).unwrap();
        let id = w.next_binding_id();
        w.append_binding(&binding(id, 1, 1, None));
        w.flush().unwrap();
        let mut all = modes(data);
        w.close().unwrap();
        all.extend(modes(data));
        fs::remove_file(&again).unwrap();
        // DIR, LOCK, WRITER_ID, nattrace.toml, audit.log, audit.head, segments, 1.seg, then
        // 2.open or 2.seg.
        assert_eq!(all.len(), 18, "{all:?}");
        for (p, mode, g) in all {
            if p.ends_with(crate::config::CONFIG_FILE) {
                continue;
            }
            // The audit log, which the group's members append to.
            let want = if p.is_dir() {
                0o750
            } else if p.ends_with(crate::audit::AUDIT_LOG) {
                0o660
            } else {
                0o640
            };
            assert_eq!((mode, g), (want, gid), "{} mode {mode:o}", p.display());
        }
    }

    #[test]
    fn rotates_by_size_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_segment_bytes: 100,
            ..WriterOptions::default()
        };
        let mut w = Writer::open_with_options(dir.path(), opts).unwrap();
        for i in 0..3 {
            let id = w.next_binding_id();
            w.append_binding(&binding(id, i, 1, None));
            w.flush().unwrap();
        }
        w.close().unwrap();
        assert_eq!(
            files(dir.path()),
            vec![
                "00000001.seg",
                "00000002.seg",
                "00000003.seg",
                "00000004.seg"
            ]
        );
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.bindings.len(), 3);
        assert_eq!(snap.problems, vec![]);

        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_segment_age: Duration::ZERO,
            ..WriterOptions::default()
        };
        let mut w = Writer::open_with_options(dir.path(), opts).unwrap();
        w.append_event(heartbeat(1));
        w.flush().unwrap();
        w.append_event(heartbeat(2));
        w.close().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg", "00000002.seg"]);
        assert_eq!(
            read_all(dir.path()).unwrap().events,
            vec![heartbeat(1), heartbeat(2)]
        );
    }

    /// Fault modes of [`FaultyFile`].
    const OK: u8 = 0;
    const FAIL_WRITE: u8 = 1;
    const PARTIAL_WRITE: u8 = 2;
    const FAIL_SYNC: u8 = 3;

    #[derive(Debug)]
    struct FaultyFile {
        inner: Box<dyn SegmentFile>,
        mode: Arc<AtomicU8>,
    }

    impl SegmentFile for FaultyFile {
        fn append(&mut self, buf: &[u8]) -> io::Result<()> {
            match self.mode.load(Ordering::SeqCst) {
                FAIL_WRITE => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                PARTIAL_WRITE => {
                    self.inner.append(&buf[..buf.len() / 2])?;
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
                _ => self.inner.append(buf),
            }
        }

        fn sync(&mut self) -> io::Result<()> {
            if self.mode.load(Ordering::SeqCst) == FAIL_SYNC {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.sync()
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.inner.truncate(len)
        }
    }

    /// An opener whose files fail as `mode` says.
    fn faulty(mode: &Arc<AtomicU8>) -> Opener {
        let mode = Arc::clone(mode);
        let mut real = real_opener(Access::default());
        Box::new(move |path: &Path| {
            let inner = real(path)?;
            Ok(Box::new(FaultyFile {
                inner,
                mode: Arc::clone(&mode),
            }) as Box<dyn SegmentFile>)
        })
    }

    #[test]
    fn failed_writes_keep_records_buffered_and_leave_no_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mode = Arc::new(AtomicU8::new(OK));
        let mut w = Writer::open_with(dir.path(), WriterOptions::default(), faulty(&mode)).unwrap();
        w.append_binding(&binding(1, 1, 1, None));
        w.flush().unwrap();

        mode.store(FAIL_WRITE, Ordering::SeqCst);
        w.append_binding(&binding(2, 2, 2, None));
        let err = w.flush().unwrap_err();
        assert!(
            matches!(err, StorageError::Io { op: "write", .. }),
            "{err:?}"
        );
        assert_eq!(w.buffered_records(), 1);

        mode.store(PARTIAL_WRITE, Ordering::SeqCst);
        w.append_binding(&binding(3, 3, 3, None));
        assert!(w.flush().is_err());
        assert_eq!(w.buffered_records(), 2);

        mode.store(OK, Ordering::SeqCst);
        w.flush().unwrap();
        assert_eq!(w.buffered_records(), 0);
        w.close().unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, Vec::<ReadProblem>::new());
        let ids: Vec<u64> = snap.bindings.iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn failed_fsync_returns_error_and_moves_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mode = Arc::new(AtomicU8::new(OK));
        let opts = WriterOptions {
            fsync_interval: Duration::ZERO,
            ..WriterOptions::default()
        };
        let mut w = Writer::open_with(dir.path(), opts, faulty(&mode)).unwrap();
        mode.store(FAIL_SYNC, Ordering::SeqCst);
        w.append_binding(&binding(1, 1, 1, None));
        assert!(matches!(
            w.flush(),
            Err(StorageError::Io { op: "fsync", .. })
        ));
        assert_eq!(
            w.buffered_records(),
            0,
            "written records are not buffered again"
        );
        mode.store(OK, Ordering::SeqCst);
        w.append_binding(&binding(2, 2, 2, None));
        w.flush().unwrap();
        w.finish_sealing().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg", "00000002.open"]);
        w.close().unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.bindings.len(), 2);
        assert_eq!(snap.problems, vec![]);
    }

    /// Leaves an unsealed segment as a crashed agent would: flushed frames, no seal.
    fn crash(dir: &Path, bindings: &[Binding]) -> PathBuf {
        let mut w = Writer::open(dir).unwrap();
        for b in bindings {
            w.append_binding(b);
            w.flush().unwrap();
        }
        let path = w.active.as_ref().unwrap().path.clone();
        drop(w);
        path
    }

    #[test]
    fn torn_tail_of_open_segment_is_cut_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let bs: Vec<Binding> = (1..=3).map(|i| binding(i, 1, 1, None)).collect();
        let path = crash(dir.path(), &bs);
        let original = fs::read(&path).unwrap();
        let full = original.len() as u64;
        // Tear the last frame: keep only 5 bytes of it.
        let mut last = Vec::new();
        segment::encode_binding(&mut last, &bs[2]);
        let mut frame = Vec::new();
        segment::encode_frame(&mut frame, &last).unwrap();
        let torn_at = full - frame.len() as u64;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(torn_at + 5)
            .unwrap();

        // Readers ignore the torn tail of an .open file.
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.bindings, stored(&bs[..2]));

        Writer::open(dir.path()).unwrap().close().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg", "00000002.seg"]);
        let sealed = fs::read(dir.path().join("segments/00000001.seg")).unwrap();
        assert!(sealed.starts_with(&columnar::MAGIC));
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.bindings, stored(&bs[..2]));
    }

    #[test]
    fn recovery_handles_zeroed_tail_and_headerless_files() {
        let dir = tempfile::tempdir().unwrap();
        let bs = vec![binding(1, 1, 1, None)];
        let path = crash(dir.path(), &bs);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        fs::write(dir.path().join("segments/00000002.open"), b"NATT").unwrap();
        Writer::open(dir.path()).unwrap().close().unwrap();
        assert_eq!(files(dir.path()), vec!["00000001.seg", "00000003.seg"]);
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.bindings, stored(&bs));
    }

    #[test]
    fn recovery_finishes_a_seal_interrupted_before_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append_binding(&binding(1, 1, 1, None));
        w.close().unwrap();
        fs::rename(
            dir.path().join("segments/00000001.seg"),
            dir.path().join("segments/00000001.open"),
        )
        .unwrap();
        Writer::open(dir.path()).unwrap().close().unwrap();
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(snap.bindings.len(), 1);
    }
}
