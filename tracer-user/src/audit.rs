//! The audit log of a data directory: who asked what, when, why, and how many bindings they
//! were given (README.md, "Audit").
//!
//! `DIR/audit.log` holds one JSON object per line, appended under an exclusive flock and
//! never rewritten. Each entry's `prev` is the lower-case hex SHA-256 of the previous line's
//! bytes (without its newline), the first entry's is 64 zeros, so changing or removing an
//! entry breaks the chain at the next one. `DIR/audit.head` records how many entries there
//! are and the hash of the last line, as the text of a signed note
//! (`nattrace-audit/<writer id>\n<entries>\n<base64 hash>\n`), signed with the host key when
//! one is configured: cutting entries off the end, or rewriting the log and its chain, then
//! shows against the head, and a rewritten head against its signature.
//!
//! A head is only replaced by an unsigned one when it was not signed itself: entries appended
//! by a user who cannot read the key stay after the last signed head, where [`verify`]
//! reports them as not covered by a signature.
//!
//! With a `group` configured, its members append to the log too: the writer makes it
//! group-writable ([`prepare_for_group`]; `crate::access::AUDIT_LOG_MODE` says why that is
//! safe). They cannot replace the head (that takes creating a file in the data directory,
//! which is not theirs), so their entries are chained at once and left after the head, where
//! [`verify`] reports them as not covered by it, until the owner's next query or export
//! rewrites the head over them ([`HeadUpdate::NotPermitted`]).

use std::ffi::CStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::access::{self, Access};
use crate::config::ConfigError;
use crate::output::format_time_ms;
use crate::signing::{self, Note, SignerKey, VerifierKey};
use crate::storage::retention::hex;

/// Name of the audit log inside a data directory.
pub const AUDIT_LOG: &str = "audit.log";
/// Name of the audit head (a signed note) inside a data directory.
pub const AUDIT_HEAD: &str = "audit.head";
/// `command` of an entry written by `nattrace query`.
pub const COMMAND_QUERY: &str = "query";
/// `command` of an entry written by `nattrace export`.
pub const COMMAND_EXPORT: &str = "export";
/// `prev` of the first entry.
pub const FIRST_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// First line of the head's text, followed by the writer id.
const HEAD_ORIGIN_PREFIX: &str = "nattrace-audit/";
/// Origin of a head written before the data directory had a writer id.
const UNKNOWN_ORIGIN: &str = "unknown";
/// Name of the file holding the data directory's writer id (see storage/writer.rs).
const WRITER_ID_FILE: &str = "WRITER_ID";
/// An entry longer than this is not one nattrace wrote.
const MAX_LINE: usize = 1 << 20;

/// One line of the audit log. Serialised with the fields in this order, every field present
/// (`null` when not given), so that a line's bytes are fixed once written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When the entry was written: RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Name of the user who asked (of the real uid), or "uid N" when it has none.
    pub user: String,
    /// Real uid of the user who asked.
    pub uid: u32,
    /// The command: [`COMMAND_QUERY`] or [`COMMAND_EXPORT`].
    pub command: String,
    /// The case the question belongs to (`--case`).
    pub case: Option<String>,
    /// Why the question was asked (`--reason`).
    pub reason: Option<String>,
    /// The question, as one canonical line (the normalized conditions and window).
    pub query: String,
    /// How many bindings the answer holds.
    pub results: u64,
    /// SHA-256 (lower-case hex) of the evidence bundle an export wrote.
    pub bundle_sha256: Option<String>,
    /// Lower-case hex SHA-256 of the previous line (without its newline); [`FIRST_PREV`] for
    /// the first entry.
    pub prev: String,
}

/// What a command records; [`append`] adds the position and the chain link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// User name of `uid`, or "uid N".
    pub user: String,
    /// Real uid.
    pub uid: u32,
    /// [`COMMAND_QUERY`] or [`COMMAND_EXPORT`].
    pub command: String,
    /// `--case`.
    pub case: Option<String>,
    /// `--reason`.
    pub reason: Option<String>,
    /// The question as one canonical line.
    pub query: String,
    /// How many bindings the answer holds.
    pub results: u64,
    /// SHA-256 (hex) of the bundle an export wrote.
    pub bundle_sha256: Option<String>,
}

impl NewEntry {
    /// An entry of `command` about `query` asked now by the real user of this process, with
    /// no case, reason, results or bundle yet.
    #[must_use]
    pub fn now(command: &str, query: impl Into<String>) -> Self {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        Self {
            time: format_time_ms(crate::query::now_ns()),
            user: user_name(uid),
            uid,
            command: command.to_owned(),
            case: None,
            reason: None,
            query: query.into(),
            results: 0,
            bundle_sha256: None,
        }
    }

    fn into_entry(self, seq: u64, prev: String) -> AuditEntry {
        AuditEntry {
            seq,
            time: self.time,
            user: self.user,
            uid: self.uid,
            command: self.command,
            case: self.case,
            reason: self.reason,
            query: self.query,
            results: self.results,
            bundle_sha256: self.bundle_sha256,
            prev,
        }
    }
}

/// Why the audit log cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done ("open", "lock", "write", …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The log's last entry cannot be read, so no entry can be chained to it.
    #[error("{}: {message}; not appending to a damaged audit log (check it with `nattrace audit --verify`)", path.display())]
    Damaged {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The data directory's configuration (its `group`) cannot be read.
    #[error(transparent)]
    Config(ConfigError),
    /// The head could not be signed.
    #[error("cannot sign {}", path.display())]
    Sign {
        /// The head.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AuditError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// The underlying I/O error kind, if this is an I/O failure (to tell "permission denied").
    #[must_use]
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// Name of the user `uid` from the password database, or "uid N" when it has none.
#[must_use]
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); getpwuid_r only
        // writes into `pwd` and `buf` (of the length given) and sets `result`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &raw mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return format!("uid {uid}");
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return name.to_string_lossy().into_owned();
    }
}

/// Lower-case hex SHA-256 of a line's bytes (without its newline): the next entry's `prev`.
#[must_use]
pub fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// The head's origin: the data directory's writer id (32 hex digits), or "unknown" before
/// an agent or import gave it one.
#[must_use]
pub fn origin(dir: &Path) -> String {
    for path in [
        dir.join(WRITER_ID_FILE),
        dir.join("segments").join(WRITER_ID_FILE),
    ] {
        if let Ok(text) = fs::read_to_string(&path) {
            let id = text.trim();
            if id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()) {
                return id.to_ascii_lowercase();
            }
        }
    }
    UNKNOWN_ORIGIN.to_owned()
}

/// The text of a head: origin, number of entries, base64 of the last line's SHA-256.
fn head_body(origin: &str, entries: u64, last_line: &[u8]) -> String {
    format!(
        "{HEAD_ORIGIN_PREFIX}{origin}\n{entries}\n{}\n",
        BASE64.encode(Sha256::digest(last_line))
    )
}

/// What [`append_entry`] did with `audit.head`. Whatever it is,
/// the entry itself is in the log; a head left as it was only means that [`verify`] reports
/// the entries after it as not covered by it until a later head is written.
#[derive(Debug)]
pub enum HeadUpdate {
    /// Rewritten to cover the new entry.
    Written,
    /// Left as it was: it carries signatures and no key was given to sign a new one.
    KeptSigned,
    /// Left as it was: this user may not create or replace files in the data directory (a
    /// member of its group). Nothing is left behind.
    NotPermitted,
    /// Left as it was: rewriting it failed (no temporary file is left behind).
    Failed(AuditError),
}

/// An entry appended by [`append_entry`], and what became of the head.
#[derive(Debug)]
pub struct Appended {
    /// The entry as written, with its position and chain link.
    pub entry: AuditEntry,
    /// The head.
    pub head: HeadUpdate,
}

/// [`append_entry`], for a caller with nothing to say about the head.
pub fn append(
    dir: &Path,
    entry: NewEntry,
    signer: Option<&SignerKey>,
) -> Result<AuditEntry, AuditError> {
    append_entry(dir, entry, signer).map(|a| a.entry)
}

/// Appends `entry` to `dir/audit.log` and rewrites `dir/audit.head` to cover it, signed with
/// `signer` when given. A log this creates gets mode 0640, or 0660 and the group with a
/// `group` configured (`crate::access::create_audit_log`); an existing one is opened as it
/// is, which is all a member of the group needs. Holds an exclusive flock on the log
/// throughout, so concurrent commands append one after the other. The entry is on disk
/// (fsync'ed) when this returns; it is returned with its position and chain link.
///
/// Only a failure to append the entry is an error. The head may be left as it was (see
/// [`HeadUpdate`]): without `signer`, a head that carries signatures is kept rather than
/// replaced by an unsigned one; a user who may not replace files in `dir` (a member of its
/// group) leaves it to the owner's next append; a failure to rewrite it is returned as
/// [`HeadUpdate::Failed`]. [`verify`] then reports the new entry as not covered by the head.
///
/// A last line without its newline (an append interrupted by a crash, never covered by the
/// head) is cut off first.
pub fn append_entry(
    dir: &Path,
    entry: NewEntry,
    signer: Option<&SignerKey>,
) -> Result<Appended, AuditError> {
    let log_path = dir.join(AUDIT_LOG);
    let access = Access::for_data_dir(dir).map_err(AuditError::Config)?;
    let mut log = access::create_audit_log(
        &log_path,
        OpenOptions::new().read(true).append(true).create(true),
        &access,
    )
    .map_err(|e| AuditError::io("open", &log_path, e))?;
    log.lock()
        .map_err(|e| AuditError::io("lock", &log_path, e))?;
    let tail = read_last_line(&mut log).map_err(|e| AuditError::io("read", &log_path, e))?;
    if tail.complete_len < tail.file_len {
        log.set_len(tail.complete_len)
            .map_err(|e| AuditError::io("truncate the interrupted last line of", &log_path, e))?;
    }
    let (seq, prev) = match &tail.line {
        None => (1, FIRST_PREV.to_owned()),
        Some(line) => {
            let last: AuditEntry =
                serde_json::from_slice(line).map_err(|e| AuditError::Damaged {
                    path: log_path.clone(),
                    message: format!("the last entry is not valid ({e})"),
                })?;
            (last.seq + 1, line_hash(line))
        }
    };
    let entry = entry.into_entry(seq, prev);
    let mut line = serde_json::to_vec(&entry).expect("an audit entry serialises");
    line.push(b'\n');
    log.write_all(&line)
        .and_then(|()| log.sync_data())
        .map_err(|e| AuditError::io("write", &log_path, e))?;
    line.pop();
    let head = write_head(dir, seq, &line, signer, &access);
    // The flock is released when `log` is closed, after the head is in place.
    drop(log);
    Ok(Appended { entry, head })
}

/// Signs a new head over the entries appended since the last one (by members of the data
/// dir's group, who may not rewrite the head, or by users who could not read the key), so
/// that a later truncation of them is detected. The agent calls it hourly. Nothing is
/// signed over a log that does not verify (a changed, removed or truncated entry): that is
/// an error naming the first problem. Returns the number of entries newly covered (0 when
/// the head already covered them all, or there is no log).
pub fn sign_head(dir: &Path, signer: &SignerKey) -> Result<u64, AuditError> {
    let log_path = dir.join(AUDIT_LOG);
    let mut log = match OpenOptions::new().read(true).write(true).open(&log_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(AuditError::io("open", &log_path, e)),
    };
    // Appends wait meanwhile, so the head signed is that of the log checked.
    log.lock()
        .map_err(|e| AuditError::io("lock", &log_path, e))?;
    let report = verify(dir, None)?;
    if let Some(p) = report.problems.first() {
        return Err(AuditError::Damaged {
            path: log_path,
            message: format!("not signing its head: {p}"),
        });
    }
    let Some((from, to)) = report.uncovered else {
        return Ok(0);
    };
    let tail = read_last_line(&mut log).map_err(|e| AuditError::io("read", &log_path, e))?;
    let Some(line) = tail.line else {
        return Ok(0);
    };
    let access = Access::for_data_dir(dir).map_err(AuditError::Config)?;
    match write_head(dir, to, &line, Some(signer), &access) {
        HeadUpdate::Written => Ok(to + 1 - from),
        HeadUpdate::Failed(e) => Err(e),
        HeadUpdate::NotPermitted | HeadUpdate::KeptSigned => Ok(0),
    }
}

/// Sets up the audit log of data directory `dir` for the members of `access`'s group, so
/// that their queries can be audited (the writer calls it when it opens `dir`: the agent and
/// `nattrace import`). Does nothing without a group. A missing `dir/audit.log` is created
/// empty, mode exactly `crate::access::AUDIT_LOG_MODE` (0660) and the group; a log nattrace
/// created 0640 before is widened to 0660 (`crate::access::let_group_append`); nothing else
/// about an existing log is changed. An empty log without a head gets one recording no
/// entries, signed with the configuration's `sign_key` when this process can read it, so
/// that the entries members append before the owner's first query or export are reported as
/// not covered by a head rather than the head as missing.
pub fn prepare_for_group(dir: &Path, access: &Access) -> Result<(), AuditError> {
    if access.gid.is_none() {
        return Ok(());
    }
    let log_path = dir.join(AUDIT_LOG);
    access::let_group_append(&log_path, access)
        .map_err(|e| AuditError::io("let the group append to", &log_path, e))?;
    let log = access::create_audit_log(
        &log_path,
        OpenOptions::new().read(true).append(true).create(true),
        access,
    )
    .map_err(|e| AuditError::io("open", &log_path, e))?;
    log.lock()
        .map_err(|e| AuditError::io("lock", &log_path, e))?;
    let empty = log
        .metadata()
        .map_err(|e| AuditError::io("read", &log_path, e))?
        .len()
        == 0;
    let head_path = dir.join(AUDIT_HEAD);
    let head_missing = match fs::symlink_metadata(&head_path) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(AuditError::io("read", &head_path, e)),
    };
    if empty && head_missing {
        let signer = head_signer(dir);
        match write_head(dir, 0, b"", signer.as_ref(), access) {
            HeadUpdate::Failed(e) => return Err(e),
            HeadUpdate::Written | HeadUpdate::KeptSigned | HeadUpdate::NotPermitted => {}
        }
    }
    drop(log);
    Ok(())
}

/// The key of `sign_key` in `dir`'s configuration, when there is one this process can read.
fn head_signer(dir: &Path) -> Option<SignerKey> {
    let path = crate::config::load(dir).ok()?.sign_key?;
    match SignerKey::load(&path) {
        Ok(k) => Some(k),
        Err(e) => {
            log::warn!(
                "cannot read the signing key {} ({}): the audit head of {} is written unsigned",
                path.display(),
                crate::storage::error_chain(&e),
                dir.display()
            );
            None
        }
    }
}

/// Whether this process may create, rename and remove files in directory `dir` (by its
/// effective ids): `false` only when the system says no; any other doubt is left to the
/// operations themselves.
fn may_replace_files_in(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_dir) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: `c_dir` is a NUL-terminated path; faccessat only reads it.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_dir.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    rc == 0
        || !matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES | libc::EPERM)
        )
}

/// Writes the head for a log whose last entry is `seq` with bytes `last_line` (0 and empty
/// for an empty log), through `dir/audit.head.tmp` renamed over it. Nothing is tried when
/// this process may not replace files in `dir`; a temporary file left by an interrupted
/// rewrite is removed first, and the one this call makes is removed again when anything
/// fails, so that only a complete head is ever left (the log's flock, held by the caller,
/// keeps other nattrace processes out meanwhile).
fn write_head(
    dir: &Path,
    seq: u64,
    last_line: &[u8],
    signer: Option<&SignerKey>,
    access: &Access,
) -> HeadUpdate {
    if !may_replace_files_in(dir) {
        return HeadUpdate::NotPermitted;
    }
    let path = dir.join(AUDIT_HEAD);
    let body = head_body(&origin(dir), seq, last_line);
    let text = match signer {
        Some(key) => match signing::sign(&body, key) {
            Ok(note) => note.encode(),
            Err(e) => {
                return HeadUpdate::Failed(AuditError::Sign {
                    path,
                    source: Box::new(e),
                });
            }
        },
        None => match fs::read_to_string(&path) {
            Ok(old) if split_head(&old).1.is_some() => return HeadUpdate::KeptSigned,
            // Not a head nattrace wrote (not UTF-8): replaced.
            Ok(_) => body,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                body
            }
            // A head that cannot be read may be signed: never replaced by an unsigned one.
            Err(e) => return HeadUpdate::Failed(AuditError::io("read", &path, e)),
        },
    };
    let tmp = dir.join(format!("{AUDIT_HEAD}.tmp"));
    let failed = |action: &'static str, e: io::Error| {
        // Only ever ours: the stale one was removed, the log's flock keeps others out.
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::PermissionDenied && action == "create" {
            HeadUpdate::NotPermitted
        } else {
            HeadUpdate::Failed(AuditError::io(action, &tmp, e))
        }
    };
    // Removed, never written through: it might be anything, a symbolic link even.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return HeadUpdate::Failed(AuditError::io("remove", &tmp, e)),
    }
    let mut f = match access::create_file(
        &tmp,
        OpenOptions::new().write(true).create_new(true),
        access,
    ) {
        Ok(f) => f,
        Err(e) => return failed("create", e),
    };
    if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.sync_all()) {
        return failed("write", e);
    }
    drop(f);
    if let Err(e) = fs::rename(&tmp, &path) {
        return failed("rename", e);
    }
    match File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => HeadUpdate::Written,
        Err(e) => HeadUpdate::Failed(AuditError::io("fsync", dir, e)),
    }
}

/// The end of the log as [`append`] needs it.
struct Tail {
    /// The last complete line, without its newline; `None` for an empty log.
    line: Option<Vec<u8>>,
    /// Length of the log up to and including the last newline.
    complete_len: u64,
    /// Length of the log.
    file_len: u64,
}

/// Reads the last complete line of `file` backwards from its end, without reading the rest.
fn read_last_line(file: &mut File) -> io::Result<Tail> {
    const CHUNK: u64 = 8192;
    let file_len = file.seek(SeekFrom::End(0))?;
    // `buf` holds the file's bytes from `pos` to `file_len`.
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = file_len;
    let mut last_newline: Option<u64> = None;
    loop {
        if let Some(end) = last_newline {
            // The line ends at `end`; it starts after the newline before it.
            let in_buf = usize::try_from(end - pos).expect("buffer fits in memory");
            if let Some(i) = buf[..in_buf].iter().rposition(|&b| b == b'\n') {
                return Ok(Tail {
                    line: Some(buf[i + 1..in_buf].to_vec()),
                    complete_len: end + 1,
                    file_len,
                });
            }
            if pos == 0 {
                return Ok(Tail {
                    line: Some(buf[..in_buf].to_vec()),
                    complete_len: end + 1,
                    file_len,
                });
            }
        } else if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            last_newline = Some(pos + i as u64);
            continue;
        } else if pos == 0 {
            // No newline at all: nothing complete.
            return Ok(Tail {
                line: None,
                complete_len: 0,
                file_len,
            });
        }
        if buf.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the last line is longer than {MAX_LINE} bytes: not an audit log"),
            ));
        }
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; usize::try_from(pos - start).expect("chunk size")];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        pos = start;
    }
}

/// One line of the log as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Line number, from 1.
    pub line: u64,
    /// Lower-case hex SHA-256 of the line's bytes.
    pub hash: String,
    /// The entry, or why the line is not one.
    pub entry: Result<AuditEntry, String>,
}

/// Every line of `dir/audit.log` (none when there is no log), and whether the last one lacks
/// its newline (an interrupted append).
pub fn read_log(dir: &Path) -> Result<(Vec<LogLine>, bool), AuditError> {
    let path = dir.join(AUDIT_LOG);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(AuditError::io("read", &path, e)),
    };
    let torn = !data.is_empty() && !data.ends_with(b"\n");
    let body = data.strip_suffix(b"\n").unwrap_or(&data);
    let mut lines = Vec::new();
    if !data.is_empty() {
        for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
            let entry = serde_json::from_slice::<AuditEntry>(raw).map_err(|e| e.to_string());
            lines.push(LogLine {
                line: i as u64 + 1,
                hash: line_hash(raw),
                entry,
            });
        }
    }
    Ok((lines, torn))
}

/// Splits a head file into its text and, when signed, the whole signed note.
fn split_head(text: &str) -> (&str, Option<&str>) {
    match text.find("\n\n") {
        Some(i) => (&text[..=i], Some(text)),
        None => (text, None),
    }
}

/// A head's text, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HeadBody {
    origin: String,
    entries: u64,
    last_hash: String,
}

fn parse_head_body(text: &str) -> Result<HeadBody, String> {
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    let [first, entries, hash] = lines[..] else {
        return Err(format!("expected 3 lines, found {}", lines.len()));
    };
    let origin = first.strip_prefix(HEAD_ORIGIN_PREFIX).ok_or_else(|| {
        format!("first line '{first}' does not start with '{HEAD_ORIGIN_PREFIX}'")
    })?;
    let entries = entries
        .parse()
        .map_err(|_| format!("'{entries}' is not a number of entries"))?;
    let last_hash = BASE64
        .decode(hash)
        .ok()
        .filter(|h| h.len() == 32)
        .map(|h| hex(&h))
        .ok_or_else(|| format!("'{hash}' is not the base64 of a SHA-256 hash"))?;
    Ok(HeadBody {
        origin: origin.to_owned(),
        entries,
        last_hash,
    })
}

/// One thing wrong with the audit log or its head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditProblem {
    /// The file: the log or the head.
    pub path: PathBuf,
    /// Line of the log the problem is at, when it is at one.
    pub line: Option<u64>,
    /// Entry (`seq`) concerned, when known.
    pub seq: Option<u64>,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Lines in the log.
    pub entries: u64,
    /// Entries the head records, when it is readable.
    pub head_entries: Option<u64>,
    /// Names of the keys that signed the head.
    pub signed_by: Vec<String>,
    /// The key whose signature was checked and is good.
    pub verified_by: Option<String>,
    /// Entries after the ones the head covers (seq from, seq to).
    pub uncovered: Option<(u64, u64)>,
    /// Everything wrong; none when the log is intact.
    pub problems: Vec<AuditProblem>,
    /// Things worth saying that are not problems (unsigned head, entries not covered).
    pub notes: Vec<String>,
}

impl AuditReport {
    /// No problem found.
    #[must_use]
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `dir/audit.log` and `dir/audit.head`: every entry chained to the one before it, no
/// entry missing, the head's count and hash those of the log, and, with `key`, the head
/// signed by that key. Problems name the entry and line.
pub fn verify(dir: &Path, key: Option<&VerifierKey>) -> Result<AuditReport, AuditError> {
    let log_path = dir.join(AUDIT_LOG);
    let head_path = dir.join(AUDIT_HEAD);
    let (lines, torn) = read_log(dir)?;
    let mut report = AuditReport {
        entries: lines.len() as u64,
        ..AuditReport::default()
    };
    let problem = |line: Option<u64>, seq: Option<u64>, message: String| AuditProblem {
        path: log_path.clone(),
        line,
        seq,
        message,
    };
    let mut problems = Vec::new();
    check_chain(&lines, &mut |line, seq, message| {
        problems.push(problem(line, seq, message));
    });
    if torn {
        let n = lines.len() as u64;
        problems.push(problem(
            Some(n),
            None,
            "the last line has no newline: an append was interrupted, or the log was cut"
                .to_owned(),
        ));
    }

    let head_text = match fs::read_to_string(&head_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            problems.push(AuditProblem {
                path: head_path.clone(),
                line: None,
                seq: None,
                message: "not UTF-8 text: not an audit head".to_owned(),
            });
            report.problems = problems;
            return Ok(report);
        }
        Err(e) => return Err(AuditError::io("read", &head_path, e)),
    };
    let head_problem = |seq: Option<u64>, message: String| AuditProblem {
        path: head_path.clone(),
        line: None,
        seq,
        message,
    };
    let Some(head_text) = head_text else {
        if !lines.is_empty() {
            problems.push(head_problem(
                None,
                format!(
                    "missing, but the log has {} entr{}: it cannot be checked for entries removed from its end",
                    lines.len(),
                    if lines.len() == 1 { "y" } else { "ies" }
                ),
            ));
        }
        if key.is_some() && !lines.is_empty() {
            report
                .notes
                .push("no entry is covered by a signature".to_owned());
        }
        report.problems = problems;
        return Ok(report);
    };

    // The signed text is what counts: parse the note first.
    let (mut body, signed) = split_head(&head_text);
    let note = match signed.map(Note::parse) {
        None => None,
        Some(Ok(note)) => Some(note),
        Some(Err(e)) => {
            problems.push(head_problem(
                None,
                format!(
                    "not a valid signed note: {}",
                    crate::storage::error_chain(&e)
                ),
            ));
            None
        }
    };
    if let Some(note) = &note {
        body = &note.text;
    }
    let head = match parse_head_body(body) {
        Ok(h) => h,
        Err(e) => {
            problems.push(head_problem(None, format!("not an audit head: {e}")));
            report.problems = problems;
            return Ok(report);
        }
    };
    report.head_entries = Some(head.entries);
    let own_origin = origin(dir);
    if head.origin != UNKNOWN_ORIGIN && own_origin != UNKNOWN_ORIGIN && head.origin != own_origin {
        problems.push(head_problem(
            None,
            format!(
                "written for data directory {}, but this one is {own_origin}",
                head.origin
            ),
        ));
    }

    // Signatures.
    if let Some(note) = &note {
        report.signed_by = note.signatures.iter().map(|s| s.signer()).collect();
    }
    match (&note, key) {
        (Some(note), Some(key)) => match note.verify(key) {
            Ok(()) => report.verified_by = Some(key.name().to_owned()),
            Err(e) => problems.push(head_problem(
                None,
                format!(
                    "signature check with key {} failed: {}",
                    key.name(),
                    crate::storage::error_chain(&e)
                ),
            )),
        },
        (Some(_), None) => report.notes.push(format!(
            "{} is signed by {}; give --key to check the signature",
            head_path.display(),
            report.signed_by.join(", ")
        )),
        (None, Some(_)) if signed.is_none() => problems.push(head_problem(
            None,
            "not signed, but a key was given to check its signature".to_owned(),
        )),
        (None, None) if signed.is_none() => report.notes.push(format!(
            "{} is not signed (no signing key was configured or readable when it was written)",
            head_path.display()
        )),
        (None, _) => {}
    }

    // The head against the log.
    let last_seq = lines
        .iter()
        .rev()
        .find_map(|l| l.entry.as_ref().ok().map(|e| e.seq));
    let covered = lines
        .iter()
        .find(|l| l.entry.as_ref().is_ok_and(|e| e.seq == head.entries));
    let n = lines.len() as u64;
    if head.entries == 0 {
        if let Some(last) = last_seq {
            report.uncovered = Some((1, last));
        }
    } else if let Some(c) = covered {
        if c.hash != head.last_hash {
            let message = if c.line == n {
                format!(
                    "entry {} (line {}, the last one) differs from the one the head records: it was changed",
                    head.entries, c.line
                )
            } else {
                format!(
                    "entry {} (line {}), the last one the head covers, differs from the one it records: it was changed",
                    head.entries, c.line
                )
            };
            problems.push(problem(Some(c.line), Some(head.entries), message));
        } else if let Some(last) = last_seq.filter(|&s| s > head.entries) {
            report.uncovered = Some((head.entries + 1, last));
        }
    } else if last_seq.is_none_or(|s| s < head.entries) {
        problems.push(problem(
            None,
            None,
            format!(
                "truncated: the head records {} entr{}, the log ends {}: entries were removed from its end",
                head.entries,
                if head.entries == 1 { "y" } else { "ies" },
                match last_seq {
                    Some(s) => format!("at entry {s} (line {n})"),
                    None if n == 0 => "empty".to_owned(),
                    None => format!("at line {n} without a readable entry"),
                }
            ),
        ));
    } else {
        problems.push(problem(
            None,
            Some(head.entries),
            format!(
                "entry {}, the last one the head covers, is missing from the log",
                head.entries
            ),
        ));
    }
    if let Some((from, to)) = report.uncovered {
        let what = if report.signed_by.is_empty() {
            "not covered by the head (appended by a user who could not rewrite it, such as a \
             member of the data directory's group; the owner's next query or export covers \
             them)"
        } else {
            "not covered by a signature (appended after the last signed head, by a user who \
             could not read the signing key or rewrite the head, such as a member of the data \
             directory's group; the next query or export by root covers them)"
        };
        let range = if from == to {
            format!("entry {from} is")
        } else {
            format!("entries {from} to {to} are")
        };
        report.notes.push(format!("{range} {what}"));
    }
    report.problems = problems;
    Ok(report)
}

/// Checks each entry against the one before it: positions from 1 without gaps, `prev` the
/// hash of the previous line. Calls `problem(line, seq, message)` for each break.
fn check_chain(lines: &[LogLine], problem: &mut dyn FnMut(Option<u64>, Option<u64>, String)) {
    let mut before: Option<&LogLine> = None;
    for l in lines {
        let entry = match &l.entry {
            Ok(e) => e,
            Err(e) => {
                problem(
                    Some(l.line),
                    None,
                    format!("not a valid audit entry (changed or damaged): {e}"),
                );
                before = Some(l);
                continue;
            }
        };
        match before {
            None => {
                if entry.seq > 1 {
                    problem(
                        Some(l.line),
                        Some(entry.seq),
                        format!(
                            "the log starts at entry {}: {} removed from its start",
                            entry.seq,
                            range_text(1, entry.seq - 1)
                        ),
                    );
                } else if entry.seq == 0 {
                    problem(
                        Some(l.line),
                        Some(0),
                        "entry 0: positions start at 1 (changed)".to_owned(),
                    );
                } else if entry.prev != FIRST_PREV {
                    problem(
                        Some(l.line),
                        Some(entry.seq),
                        "entry 1 does not start the chain (its prev is not 64 zeros): it was changed"
                            .to_owned(),
                    );
                }
            }
            Some(b) => {
                let b_seq = b.entry.as_ref().ok().map(|e| e.seq);
                match b_seq {
                    Some(s) if entry.seq > s + 1 => problem(
                        Some(l.line),
                        Some(entry.seq),
                        format!(
                            "{} removed between line {} and line {}",
                            range_text(s + 1, entry.seq - 1),
                            b.line,
                            l.line
                        ),
                    ),
                    Some(s) if entry.seq <= s => problem(
                        Some(l.line),
                        Some(entry.seq),
                        format!(
                            "entry {} follows entry {s}: out of order or repeated",
                            entry.seq
                        ),
                    ),
                    _ if entry.prev != b.hash => {
                        let which = match b_seq {
                            Some(s) => format!("entry {s} (line {})", b.line),
                            None => format!("line {}", b.line),
                        };
                        problem(
                            Some(b.line),
                            b_seq,
                            format!(
                                "{which} was changed: its hash no longer matches the prev of entry {} (line {})",
                                entry.seq, l.line
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
        before = Some(l);
    }
}

fn range_text(from: u64, to: u64) -> String {
    if from == to {
        format!("entry {from} was")
    } else {
        format!("entries {from} to {to} were")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn entry(n: u64) -> NewEntry {
        let mut e = NewEntry::now(COMMAND_QUERY, format!("--external 203.0.113.7:{n}"));
        e.results = n;
        e
    }

    fn append_n(dir: &Path, n: u64, signer: Option<&SignerKey>) -> Vec<AuditEntry> {
        (1..=n)
            .map(|i| append(dir, entry(i), signer).unwrap())
            .collect()
    }

    fn log_lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join(AUDIT_LOG))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(dir: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(dir.join(AUDIT_LOG), text).unwrap();
    }

    fn messages(r: &AuditReport) -> Vec<String> {
        r.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn entries_are_chained_json_lines_with_fixed_field_order() {
        let dir = tempfile::tempdir().unwrap();
        let written = append_n(dir.path(), 3, None);
        assert_eq!(
            written.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let lines = log_lines(dir.path());
        assert_eq!(lines.len(), 3);
        assert_eq!(written[0].prev, FIRST_PREV);
        assert_eq!(written[1].prev, line_hash(lines[0].as_bytes()));
        assert_eq!(written[2].prev, line_hash(lines[1].as_bytes()));
        let keys: Vec<String> = serde_json::from_str::<serde_json::Value>(&lines[0])
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(
            lines[0].starts_with("{\"seq\":1,\"time\":\""),
            "{}",
            lines[0]
        );
        // serde_json's map sorts keys: compare the order in the text instead.
        let pos = |k: &str| lines[0].find(&format!("\"{k}\":")).unwrap();
        let order = [
            "seq",
            "time",
            "user",
            "uid",
            "command",
            "case",
            "reason",
            "query",
            "results",
            "bundle_sha256",
            "prev",
        ];
        assert_eq!(keys.len(), order.len());
        assert!(
            order.windows(2).all(|w| pos(w[0]) < pos(w[1])),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("\"case\":null,\"reason\":null"));
        let e: AuditEntry = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(e, written[2]);
        assert_eq!(e.command, "query");
        assert_eq!(e.results, 3);
        // RFC 3339, UTC, milliseconds.
        assert_eq!(e.time.len(), "2026-11-02T10:14:07.000Z".len(), "{}", e.time);
        assert!(e.time.ends_with('Z'));
        // SAFETY: getuid cannot fail.
        assert_eq!(e.uid, unsafe { libc::getuid() });
        assert!(!e.user.is_empty());

        let mode = |name: &str| {
            fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(AUDIT_LOG), 0o640);
        assert_eq!(mode(AUDIT_HEAD), 0o640);
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        assert_eq!(
            head,
            format!(
                "nattrace-audit/unknown\n3\n{}\n",
                BASE64.encode(Sha256::digest(lines[2].as_bytes()))
            )
        );
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{:?}", r.problems);
        assert_eq!((r.entries, r.head_entries), (3, Some(3)));
        assert_eq!(r.uncovered, None);
        assert!(r.notes[0].contains("is not signed"), "{:?}", r.notes);
    }

    #[test]
    fn user_name_of_root_and_of_an_unknown_uid() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(4_000_000_123), "uid 4000000123");
    }

    #[test]
    fn head_names_the_writer_id() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("WRITER_ID"),
            "00112233445566778899AABBCCDDEEFF\n",
        )
        .unwrap();
        append_n(dir.path(), 1, None);
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        assert!(
            head.starts_with("nattrace-audit/00112233445566778899aabbccddeeff\n1\n"),
            "{head}"
        );
        assert!(verify(dir.path(), None).unwrap().is_intact());
        // A head of another data directory.
        fs::write(
            dir.path().join("WRITER_ID"),
            "ffffffffffffffffffffffffffffffff\n",
        )
        .unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert!(
            messages(&r)[0].contains("written for data directory 0011"),
            "{r:?}"
        );
    }

    #[test]
    fn long_log_is_appended_to_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        // Lines longer than one read chunk, and enough of them to span many.
        for i in 1..=40 {
            let mut e = entry(i);
            e.reason = Some("x".repeat(usize::try_from(i).unwrap() * 500));
            append(dir.path(), e, None).unwrap();
        }
        let lines = log_lines(dir.path());
        let e = append(dir.path(), entry(41), None).unwrap();
        assert_eq!(e.seq, 41);
        assert_eq!(e.prev, line_hash(lines[39].as_bytes()));
        assert!(verify(dir.path(), None).unwrap().is_intact());
    }

    #[test]
    fn concurrent_appends_are_serialised() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| append_n(dir.path(), 10, None));
            }
        });
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{:?}", r.problems);
        assert_eq!((r.entries, r.head_entries), (40, Some(40)));
    }

    #[test]
    fn changed_entry_is_named_by_seq_and_line() {
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 4, None);
        let mut lines = log_lines(dir.path());
        lines[1] = lines[1].replace("\"results\":2", "\"results\":0");
        write_lines(dir.path(), &lines);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!(
            messages(&r),
            vec![format!(
                "{}: line 2: entry 2 (line 2) was changed: its hash no longer matches the prev \
                 of entry 3 (line 3)",
                dir.path().join(AUDIT_LOG).display()
            )]
        );
        assert_eq!((r.problems[0].seq, r.problems[0].line), (Some(2), Some(2)));

        // The last entry, which only the head covers.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 3, None);
        let mut lines = log_lines(dir.path());
        lines[2] = lines[2].replace("203.0.113.7:3", "203.0.113.8:3");
        write_lines(dir.path(), &lines);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            messages(&r)[0].contains(
                "line 3: entry 3 (line 3, the last one) differs from the one the head records"
            ),
            "{r:?}"
        );

        // A line that is no entry at all.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 3, None);
        let mut lines = log_lines(dir.path());
        lines[0] = "garbage".to_owned();
        write_lines(dir.path(), &lines);
        let r = verify(dir.path(), None).unwrap();
        let m = messages(&r);
        assert!(m[0].contains("line 1: not a valid audit entry"), "{m:?}");
        assert!(m[1].contains("line 1 was changed"), "{m:?}");
    }

    #[test]
    fn removed_entries_are_found() {
        // From the middle: a gap in the positions.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 5, None);
        let mut lines = log_lines(dir.path());
        lines.drain(1..3);
        write_lines(dir.path(), &lines);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            messages(&r)[0]
                .ends_with("line 2: entries 2 to 3 were removed between line 1 and line 2"),
            "{r:?}"
        );

        // From the start.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 3, None);
        let lines = log_lines(dir.path());
        write_lines(dir.path(), &lines[1..]);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            messages(&r)[0]
                .ends_with("line 1: the log starts at entry 2: entry 1 was removed from its start"),
            "{r:?}"
        );

        // Removed and the rest renumbered: the chain breaks where the removed entry was.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 3, None);
        let mut lines = log_lines(dir.path());
        lines.remove(1);
        lines[1] = lines[1].replace("\"seq\":3", "\"seq\":2");
        write_lines(dir.path(), &lines);
        let r = verify(dir.path(), None).unwrap();
        let m = messages(&r);
        assert!(m[0].contains("entry 1 (line 1) was changed"), "{m:?}");
        assert!(m.iter().any(|p| p.contains("truncated")), "{m:?}");
    }

    #[test]
    fn truncated_log_is_found_against_the_head() {
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 4, None);
        let lines = log_lines(dir.path());
        write_lines(dir.path(), &lines[..2]);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!(
            messages(&r),
            vec![format!(
                "{}: truncated: the head records 4 entries, the log ends at entry 2 (line 2): \
                 entries were removed from its end",
                dir.path().join(AUDIT_LOG).display()
            )]
        );
        // Emptied entirely.
        fs::write(dir.path().join(AUDIT_LOG), "").unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert!(messages(&r)[0].contains("the log ends empty"), "{r:?}");
        fs::remove_file(dir.path().join(AUDIT_LOG)).unwrap();
        assert!(!verify(dir.path(), None).unwrap().is_intact());
        // A head removed with the log still there.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 2, None);
        fs::remove_file(dir.path().join(AUDIT_HEAD)).unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert!(messages(&r)[0].contains("audit.head: missing"), "{r:?}");
        // No audit log at all: nothing to say.
        let dir = tempfile::tempdir().unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact() && r.entries == 0, "{r:?}");
    }

    #[test]
    fn signed_head_is_checked_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        let verifier = key.verifier();
        append_n(dir.path(), 3, Some(&key));
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        assert!(head.contains("\n\n\u{2014} host-a "), "{head}");
        let r = verify(dir.path(), Some(&verifier)).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.verified_by.as_deref(), Some("host-a"));
        assert_eq!(r.signed_by.len(), 1);
        assert!(r.signed_by[0].starts_with("host-a+"));
        assert!(r.notes.is_empty(), "{r:?}");
        // Without a key: said, not a problem.
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact());
        assert!(r.notes[0].contains("give --key"), "{r:?}");

        // Another key.
        let other = SignerKey::generate("host-b").unwrap().verifier();
        let r = verify(dir.path(), Some(&other)).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            messages(&r)[0].contains("signature check with key host-b failed"),
            "{r:?}"
        );

        // The log rewritten, head recomputed, old signature kept: the signature fails.
        let mut lines = log_lines(dir.path());
        lines.pop();
        write_lines(dir.path(), &lines);
        let forged = head_body(&origin(dir.path()), 2, lines[1].as_bytes());
        let sigs = head.split_once("\n\n").unwrap().1;
        fs::write(dir.path().join(AUDIT_HEAD), format!("{forged}\n{sigs}")).unwrap();
        let r = verify(dir.path(), Some(&verifier)).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            messages(&r)[0].contains("signature check with key host-a failed"),
            "{r:?}"
        );

        // An unsigned head when a key is given.
        fs::write(dir.path().join(AUDIT_HEAD), forged).unwrap();
        let r = verify(dir.path(), Some(&verifier)).unwrap();
        assert_eq!(
            messages(&r),
            vec![format!(
                "{}: not signed, but a key was given to check its signature",
                dir.path().join(AUDIT_HEAD).display()
            )]
        );
    }

    #[test]
    fn sign_head_covers_unsigned_appends_and_refuses_a_broken_log() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        assert_eq!(sign_head(dir.path(), &key).unwrap(), 0, "no log yet");
        append_n(dir.path(), 2, Some(&key));
        append_n(dir.path(), 3, None);
        assert_eq!(sign_head(dir.path(), &key).unwrap(), 3);
        let r = verify(dir.path(), Some(&key.verifier())).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!((r.head_entries, r.uncovered), (Some(5), None));
        assert_eq!(sign_head(dir.path(), &key).unwrap(), 0, "nothing new");
        // Never over a changed entry.
        append_n(dir.path(), 1, None);
        let mut lines = log_lines(dir.path());
        lines[1] = lines[1].replace("\"results\":2", "\"results\":9");
        write_lines(dir.path(), &lines);
        let e = sign_head(dir.path(), &key).unwrap_err().to_string();
        assert!(e.contains("not signing its head"), "{e}");
        assert_eq!(verify(dir.path(), None).unwrap().head_entries, Some(5));
    }

    #[test]
    fn unsigned_appends_keep_the_signed_head_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        append_n(dir.path(), 2, Some(&key));
        let signed = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        append_n(dir.path(), 3, None);
        assert_eq!(
            fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap(),
            signed
        );
        let r = verify(dir.path(), Some(&key.verifier())).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!((r.entries, r.head_entries), (5, Some(2)));
        assert_eq!(r.uncovered, Some((3, 5)));
        assert!(
            r.notes
                .iter()
                .any(|n| n.starts_with("entries 3 to 5 are not covered by a signature")),
            "{r:?}"
        );
        // The uncovered tail is still chained: a change in it is found.
        let mut lines = log_lines(dir.path());
        lines[2] = lines[2].replace("\"results\":1", "\"results\":9");
        write_lines(dir.path(), &lines);
        assert!(
            messages(&verify(dir.path(), None).unwrap())[0]
                .contains("entry 3 (line 3) was changed")
        );

        // The next signed append covers them all again.
        let dir2 = tempfile::tempdir().unwrap();
        append_n(dir2.path(), 1, Some(&key));
        append_n(dir2.path(), 1, None);
        append_n(dir2.path(), 1, Some(&key));
        let r = verify(dir2.path(), Some(&key.verifier())).unwrap();
        assert!(
            r.is_intact() && r.uncovered.is_none() && r.notes.is_empty(),
            "{r:?}"
        );
    }

    #[test]
    fn interrupted_append_is_reported_then_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 2, None);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_LOG))
            .unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        drop(f);
        let r = verify(dir.path(), None).unwrap();
        assert!(
            messages(&r)
                .iter()
                .any(|m| m.contains("line 3: the last line has no newline")),
            "{r:?}"
        );
        assert_eq!(r.uncovered, None, "{r:?}");
        let e = append(dir.path(), entry(3), None).unwrap();
        assert_eq!(e.seq, 3);
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.entries, 3);
    }

    #[test]
    fn damaged_last_entry_stops_appends() {
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 1, None);
        fs::write(dir.path().join(AUDIT_LOG), "not json\n").unwrap();
        let e = append(dir.path(), entry(2), None).unwrap_err();
        assert!(matches!(e, AuditError::Damaged { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("not appending to a damaged audit log"),
            "{e}"
        );
    }

    #[test]
    fn unwritable_log_is_an_io_error() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return; // root writes anyway
        }
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 1, None);
        fs::set_permissions(
            dir.path().join(AUDIT_LOG),
            fs::Permissions::from_mode(0o440),
        )
        .unwrap();
        let e = append(dir.path(), entry(2), None).unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::PermissionDenied), "{e:?}");
    }

    /// Our own effective group: one we may give files to without being root.
    fn own_group() -> Access {
        // SAFETY: getegid cannot fail.
        Access {
            gid: Some(unsafe { libc::getegid() }),
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Names in `dir` (to see that nothing is left behind).
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn prepare_for_group_makes_a_group_writable_log_with_an_empty_head() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Without a group: nothing.
        prepare_for_group(dir.path(), &Access::default()).unwrap();
        assert!(names(dir.path()).is_empty());

        let access = own_group();
        Access::set_for_data_dir(dir.path(), access);
        prepare_for_group(dir.path(), &access).unwrap();
        assert_eq!(names(dir.path()), vec![AUDIT_HEAD, AUDIT_LOG]);
        let log = dir.path().join(AUDIT_LOG);
        assert_eq!(mode_of(&log), 0o660);
        assert_eq!(fs::metadata(&log).unwrap().gid(), access.gid.unwrap());
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(mode_of(&dir.path().join(AUDIT_HEAD)), 0o640);
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!((r.entries, r.head_entries, r.uncovered), (0, Some(0), None));

        // Entries a member appends without rewriting the head: not covered, not a problem.
        fs::write(
            &log,
            format!(
                "{}\n",
                serde_json::to_string(&entry(1).into_entry(1, FIRST_PREV.to_owned())).unwrap()
            ),
        )
        .unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.uncovered, Some((1, 1)));
        assert!(
            r.notes
                .iter()
                .any(|n| n.starts_with("entry 1 is not covered by the head")),
            "{r:?}"
        );
        // Appending keeps the log's mode; a later setup leaves log and head alone.
        append(dir.path(), entry(2), None).unwrap();
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        prepare_for_group(dir.path(), &access).unwrap();
        assert_eq!(mode_of(&log), 0o660);
        assert_eq!(
            fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap(),
            head
        );
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact() && r.uncovered.is_none(), "{r:?}");

        // A log appended to before, with a head: widened from 0640, head untouched.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 2, None);
        let log = dir.path().join(AUDIT_LOG);
        assert_eq!(mode_of(&log), 0o640);
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        prepare_for_group(dir.path(), &access).unwrap();
        assert_eq!(mode_of(&log), 0o660);
        assert_eq!(
            fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap(),
            head
        );
        // Any other mode is the administrator's.
        fs::set_permissions(&log, fs::Permissions::from_mode(0o600)).unwrap();
        prepare_for_group(dir.path(), &access).unwrap();
        assert_eq!(mode_of(&log), 0o600);

        // A log with entries but no head is not given one: that is for verify to report.
        fs::remove_file(dir.path().join(AUDIT_HEAD)).unwrap();
        prepare_for_group(dir.path(), &access).unwrap();
        assert!(!dir.path().join(AUDIT_HEAD).exists());

        // Something else in the log's place: an error, and nothing made.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(AUDIT_LOG)).unwrap();
        let e = prepare_for_group(dir.path(), &access).unwrap_err();
        assert!(e.to_string().contains("audit.log"), "{e}");
        assert_eq!(names(dir.path()), vec![AUDIT_LOG]);
    }

    #[test]
    fn prepare_for_group_signs_the_empty_head_with_the_configured_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        let (key_file, _) = signing::write_key_pair(&dir.path().join("keys"), &key).unwrap();
        fs::write(
            dir.path().join(crate::config::CONFIG_FILE),
            format!("sign_key = \"{}\"\n", key_file.display()),
        )
        .unwrap();
        prepare_for_group(dir.path(), &own_group()).unwrap();
        let r = verify(dir.path(), Some(&key.verifier())).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.verified_by.as_deref(), Some("host-a"));
        assert_eq!(r.head_entries, Some(0));
    }

    #[test]
    fn a_head_that_cannot_be_rewritten_leaves_the_entry_and_no_garbage() {
        // The temporary file cannot be created (a directory is in its place).
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 1, None);
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        let tmp = dir.path().join(format!("{AUDIT_HEAD}.tmp"));
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("x"), "").unwrap();
        let a = append_entry(dir.path(), entry(2), None).unwrap();
        assert_eq!(a.entry.seq, 2);
        assert!(matches!(a.head, HeadUpdate::Failed(_)), "{:?}", a.head);
        assert_eq!(
            fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap(),
            head
        );
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!((r.entries, r.uncovered), (2, Some((2, 2))));
        fs::remove_dir_all(&tmp).unwrap();

        // A stale temporary file (an interrupted rewrite), even a symbolic link: replaced,
        // never written through.
        let target = dir.path().join("elsewhere");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        let a = append_entry(dir.path(), entry(3), None).unwrap();
        assert!(matches!(a.head, HeadUpdate::Written), "{:?}", a.head);
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(names(dir.path()), vec![AUDIT_HEAD, AUDIT_LOG, "elsewhere"]);
        let r = verify(dir.path(), None).unwrap();
        assert!(r.is_intact() && r.uncovered.is_none(), "{r:?}");

        // The head cannot be replaced (a directory is in its place): the temporary file
        // written for it is removed again.
        let dir = tempfile::tempdir().unwrap();
        append_n(dir.path(), 1, None);
        fs::remove_file(dir.path().join(AUDIT_HEAD)).unwrap();
        fs::create_dir(dir.path().join(AUDIT_HEAD)).unwrap();
        fs::write(dir.path().join(AUDIT_HEAD).join("x"), "").unwrap();
        let a = append_entry(dir.path(), entry(2), None).unwrap();
        assert_eq!(a.entry.seq, 2);
        match &a.head {
            HeadUpdate::Failed(e) => assert!(e.to_string().contains("cannot read"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Signed, the old head is not read: the rename fails.
        let key = SignerKey::generate("host-a").unwrap();
        let a = append_entry(dir.path(), entry(3), Some(&key)).unwrap();
        assert_eq!(a.entry.seq, 3);
        match &a.head {
            HeadUpdate::Failed(e) => assert!(e.to_string().contains("cannot rename"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(names(dir.path()), vec![AUDIT_HEAD, AUDIT_LOG]);
        assert_eq!(log_lines(dir.path()).len(), 3);
    }
}
