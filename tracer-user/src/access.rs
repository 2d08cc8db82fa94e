//! How nattrace creates things in a data directory, in one place.
//!
//! Directories are made mode exactly 0750 and files exactly 0640, whatever the umask, and
//! given the group of the data directory's `group` setting (README.md, "Configuration") when
//! there is one: root (or the user running the agent) writes, members of that group read
//! (query, stats, coverage, verify), nobody else gets in.
//!
//! Every file or directory nattrace writes in a data directory goes through [`create_dir`],
//! [`create_dir_all`] or [`create_file`] (or [`secure_file`] for a file opened otherwise)
//! with the [`Access`] of that data directory, from [`Access::for_data_dir`]; a writer
//! starting on the directory calls [`adopt`] for what was written before a group was set. That reads the directory's
//! `nattrace.toml` the first time a process asks and remembers the answer for the life of the
//! process, so that a long-running agent keeps the setting it started with and the storage
//! code (sealing, the ledger, the lock) needs no [`Access`] passed down to it. A command that
//! has loaded the configuration already may record its answer with
//! [`Access::set_for_data_dir`].
//!
//! One file is the exception: with a group configured, the audit log `audit.log` is mode
//! [`AUDIT_LOG_MODE`] (0660), writable by the group; see there why.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, PoisonError};

use crate::config::{self, ConfigError, DataDirConfig};
use crate::storage::StorageError;

/// Mode of every directory nattrace creates in a data directory.
pub const DIR_MODE: u32 = 0o750;
/// Mode of every file nattrace creates in a data directory.
pub const FILE_MODE: u32 = 0o640;

/// Mode of the audit log, `audit.log`, when the data directory has a `group`: the one file
/// its members may write ([`create_audit_log`], [`let_group_append`]).
///
/// Why: every `nattrace query` and `nattrace export` appends its entry to the audit log before
/// it answers, and is refused when it cannot (README.md, "Audit"). The members of the group
/// are the people meant to ask those questions; with a log they could not write, none of them
/// could ask any. Nothing else is opened to them: the data directory stays 0750, so they
/// create, rename and remove nothing in it, and in particular cannot replace the log's head,
/// `audit.head`; they open the log that is there and append to it (`O_APPEND`, under flock).
///
/// Append-only by convention, not by permission: a member could rewrite the file. Its
/// integrity does not rest on its mode but on the hash chain of its entries (each carries the
/// hash of the one before) and on the head, written only by the owner and signed with the
/// host key: `nattrace audit --verify` finds any entry a head covers that was changed or
/// removed. The entries appended since the last head (a member's, until the owner's next
/// query or export rewrites the head) are reported as not covered by it: those are the only
/// ones that could be cut off the end unseen.
pub const AUDIT_LOG_MODE: u32 = 0o660;

/// Files directly in a data directory that nattrace writes (and [`adopt`] brings to the
/// data directory's access). The configuration and any key file are the administrator's and
/// never touched.
const OWN_FILES: [&str; 5] = ["LOCK", "WRITER_ID", "ledger", "audit.log", "audit.head"];

/// Who may read what nattrace creates in a data directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Group owner of created directories and files (`group` of the configuration);
    /// `None`: left as the creating process's group.
    pub gid: Option<u32>,
}

/// The access of each data directory this process has asked about, by the path it was given.
static BY_DATA_DIR: LazyLock<Mutex<HashMap<PathBuf, Access>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Access {
    /// The access a data directory's configuration asks for.
    #[must_use]
    pub fn from_config(config: &DataDirConfig) -> Self {
        Self {
            gid: config.group.as_ref().map(|g| g.gid),
        }
    }

    /// The access of data directory `dir`: from `dir/nattrace.toml` (a missing directory or
    /// file means the defaults) the first time this process asks about `dir`, remembered
    /// after that. Fails only when the configuration cannot be read or is invalid.
    pub fn for_data_dir(dir: &Path) -> Result<Self, ConfigError> {
        if let Some(a) = Self::remembered(dir) {
            return Ok(a);
        }
        let access = match config::load(dir) {
            Ok(c) => Self::from_config(&c),
            // A data directory not created yet has no configuration either.
            Err(ConfigError::Read { source, .. })
                if source.kind() == io::ErrorKind::NotADirectory =>
            {
                Self::default()
            }
            Err(e) => return Err(e),
        };
        Self::set_for_data_dir(dir, access);
        Ok(access)
    }

    /// Records `access` as data directory `dir`'s for the rest of this process (for a command
    /// that loaded the configuration itself, or a test).
    pub fn set_for_data_dir(dir: &Path, access: Self) {
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_owned(), access);
    }

    fn remembered(dir: &Path) -> Option<Self> {
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(dir)
            .copied()
    }
}

/// [`Access::for_data_dir`] for the storage code: an invalid configuration becomes a
/// [`StorageError`] naming the file.
pub(crate) fn of_data_dir(dir: &Path) -> Result<Access, StorageError> {
    Access::for_data_dir(dir).map_err(|e| match e {
        ConfigError::Read { path, source } => StorageError::io("read", &path, source),
        other => StorageError::Io {
            op: "use",
            path: dir.join(config::CONFIG_FILE),
            source: io::Error::new(io::ErrorKind::InvalidData, other),
        },
    })
}

/// [`of_data_dir`] of the data directory holding segments directory `seg_dir`.
pub(crate) fn of_segments_dir(seg_dir: &Path) -> Result<Access, StorageError> {
    let data_dir = seg_dir
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    of_data_dir(data_dir)
}

/// Creates directory `path` and any missing parent: each one created gets mode exactly
/// [`DIR_MODE`] and `access`'s group. Directories already there are left as they are.
pub fn create_dir_all(path: &Path, access: &Access) -> io::Result<()> {
    // The missing ones, deepest first.
    let mut missing = Vec::new();
    let mut cur = path;
    loop {
        match fs::symlink_metadata(cur) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(cur);
                match cur.parent() {
                    Some(p) if !p.as_os_str().is_empty() => cur = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for dir in missing.into_iter().rev() {
        create_dir(dir, access)?;
    }
    if !fs::metadata(path)?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory",
        ));
    }
    Ok(())
}

/// Creates directory `path` (its parent must exist) with mode exactly [`DIR_MODE`] and
/// `access`'s group. Returns `false`, changing nothing, when a directory is there already.
pub fn create_dir(path: &Path, access: &Access) -> io::Result<bool> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => return Ok(false),
        Err(e) => return Err(e),
    }
    // The umask may have taken bits away; an error past this point leaves a directory no more
    // open than 0750.
    fs::set_permissions(path, Permissions::from_mode(DIR_MODE))?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(true)
}

/// Opens `path` with `options`, which must ask for creation (`create` or `create_new`, with
/// `write` or `append`). A file this call creates gets mode exactly [`FILE_MODE`] and
/// `access`'s group (see [`secure_file`]); a file already there is opened as `options` say
/// and left as it is (an administrator may have widened it, [`adopt`] deals with old files).
pub fn create_file(path: &Path, options: &OpenOptions, access: &Access) -> io::Result<File> {
    create_file_mode(path, options, access, FILE_MODE)
}

/// The mode of an audit log created with `access`: [`AUDIT_LOG_MODE`] with a group, else
/// [`FILE_MODE`] (no group to let in).
#[must_use]
pub fn audit_log_mode(access: &Access) -> u32 {
    if access.gid.is_some() {
        AUDIT_LOG_MODE
    } else {
        FILE_MODE
    }
}

/// [`create_file`] for the audit log: a log this call creates gets mode exactly
/// [`audit_log_mode`] and `access`'s group; a log already there is opened as `options` say
/// and left as it is.
pub fn create_audit_log(path: &Path, options: &OpenOptions, access: &Access) -> io::Result<File> {
    create_file_mode(path, options, access, audit_log_mode(access))
}

/// Lets the members of `access`'s group append to the audit log `path` nattrace created
/// before it did so: a regular file of mode exactly [`FILE_MODE`] that already belongs to the
/// group gets [`AUDIT_LOG_MODE`]. Nothing else is changed: no group, no file, a symbolic
/// link, another group, any other mode (an administrator's choice). Returns whether the mode
/// was changed.
pub fn let_group_append(path: &Path, access: &Access) -> io::Result<bool> {
    let Some(gid) = access.gid else {
        return Ok(false);
    };
    // Through a descriptor, so that what is checked is what is changed; never through a
    // symbolic link, and without waiting on a FIFO.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.gid() != gid || meta.mode() & 0o7777 != FILE_MODE {
        return Ok(false);
    }
    file.set_permissions(Permissions::from_mode(AUDIT_LOG_MODE))?;
    Ok(true)
}

/// [`create_file`] giving a file it creates mode exactly `mode`.
fn create_file_mode(
    path: &Path,
    options: &OpenOptions,
    access: &Access,
    mode: u32,
) -> io::Result<File> {
    let mut new = options.clone();
    new.create_new(true).mode(mode);
    loop {
        match new.open(path) {
            Ok(file) => {
                secure_file_mode(&file, access, mode)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // There already: as the caller asked (a `create_new` caller gets AlreadyExists).
        // Removed meanwhile: create it after all.
        match options.clone().create(false).open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
    }
}

/// Gives an open file mode exactly [`FILE_MODE`] and `access`'s group, through its
/// descriptor (for a file created otherwise than by [`create_file`]); a file already so is
/// not changed.
pub fn secure_file(file: &File, access: &Access) -> io::Result<()> {
    secure_file_mode(file, access, FILE_MODE)
}

/// [`secure_file`] to mode `mode`.
fn secure_file_mode(file: &File, access: &Access, mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.mode() & 0o7777 != mode {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    if let Some(gid) = access.gid
        && meta.gid() != gid
    {
        std::os::unix::fs::fchown(file, None, Some(gid))?;
    }
    Ok(())
}

/// Lets the configured group read what nattrace wrote in data directory `dir` before it was
/// configured: gives `dir`, `dir/segments`, nattrace's own files in `dir` and every file in
/// `dir/segments` `access`'s group, and adds the group's read (and for directories search)
/// permission where missing; no permission is taken away. Does nothing without a group.
/// Entries already right, symbolic links inside `dir`, the configuration, keys and any other
/// file are left alone. Errors name the path.
pub fn adopt(dir: &Path, access: &Access) -> Result<(), (PathBuf, io::Error)> {
    let Some(gid) = access.gid else {
        return Ok(());
    };
    let fix = |path: &Path, want_dir: bool| -> Result<(), (PathBuf, io::Error)> {
        let err = |e| (path.to_owned(), e);
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let (is_kind, group_bits) = if want_dir {
            (meta.is_dir(), 0o050)
        } else {
            (meta.is_file(), 0o040)
        };
        if !is_kind {
            return Ok(());
        }
        if meta.gid() != gid {
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(err)?;
        }
        let mode = meta.mode() & 0o7777;
        if mode & group_bits != group_bits {
            fs::set_permissions(path, Permissions::from_mode(mode | group_bits)).map_err(err)?;
        }
        Ok(())
    };
    // The data directory may be a symbolic link (to another file system): what it names.
    let dir = &fs::canonicalize(dir).map_err(|e| (dir.to_owned(), e))?;
    fix(dir, true)?;
    for name in OWN_FILES {
        fix(&dir.join(name), false)?;
    }
    let seg_dir = dir.join(crate::storage::SEGMENTS_DIR);
    fix(&seg_dir, true)?;
    let entries = match fs::read_dir(&seg_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err((seg_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| (seg_dir.clone(), e))?;
        fix(&entry.path(), false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set (to an octal umask) in the environment of the child test process of
    /// [`modes_are_exact_whatever_the_umask`].
    const UMASK_CHILD: &str = "NATTRACE_TEST_UMASK_CHILD";

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn new_file() -> OpenOptions {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        o
    }

    /// A group other than ours that exists here, when we may give files to it (root).
    fn other_group() -> Option<u32> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root, cannot give files to another group");
            return None;
        }
        let name = ["daemon", "adm", "nogroup", "users"]
            .into_iter()
            .find(|n| config::group_id(n).ok().flatten().is_some());
        let Some(name) = name else {
            eprintln!("skipped: none of daemon, adm, nogroup, users in /etc/group");
            return None;
        };
        config::group_id(name).unwrap()
    }

    /// The umask is the whole process's: each one is tried in a child process running only
    /// [`umask_child`], so that no other test creates files under it meanwhile.
    #[test]
    fn modes_are_exact_whatever_the_umask() {
        for mask in ["077", "002", "022", "000", "777"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "access::tests::umask_child", "--nocapture"])
                .env(UMASK_CHILD, mask)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("umask child done"),
                "umask {mask}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The body of [`modes_are_exact_whatever_the_umask`]; does nothing in the test run itself.
    #[test]
    fn umask_child() {
        let Ok(mask) = std::env::var(UMASK_CHILD) else {
            return;
        };
        let mask = libc::mode_t::from_str_radix(&mask, 8).unwrap();
        // SAFETY: umask(2) only sets the file mode creation mask of this process, which runs
        // this test alone.
        unsafe { libc::umask(mask) };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let file = dir.join("f");
        create_dir_all(&dir, &Access::default()).unwrap();
        create_file(&file, &new_file(), &Access::default()).unwrap();
        assert_eq!(mode(&tmp.path().join("a")), 0o750, "umask {mask:o}");
        assert_eq!(mode(&dir), 0o750, "umask {mask:o}");
        assert_eq!(mode(&file), 0o640, "umask {mask:o}");
        println!("umask child done");
    }

    #[test]
    fn existing_dirs_and_files_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        assert!(!create_dir(&dir, &Access::default()).unwrap());
        create_dir_all(&dir, &Access::default()).unwrap();
        assert_eq!(mode(&dir), 0o755);

        // A file already there is opened as asked and keeps its mode.
        let f = dir.join("f");
        fs::write(&f, "x").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o660)).unwrap();
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        create_file(&f, &o, &Access::default()).unwrap();
        assert_eq!((mode(&f), fs::read(&f).unwrap()), (0o660, b"x".to_vec()));
        o.truncate(true);
        create_file(&f, &o, &Access::default()).unwrap();
        assert_eq!((mode(&f), fs::read(&f).unwrap()), (0o660, vec![]));
        let e = create_file(&f, &new_file(), &Access::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        // secure_file brings it to 0640.
        secure_file(&File::open(&f).unwrap(), &Access::default()).unwrap();
        assert_eq!(mode(&f), 0o640);

        fs::write(dir.join("plain"), "").unwrap();
        let e = create_dir_all(&dir.join("plain"), &Access::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
    }

    #[test]
    fn group_is_given_to_what_is_created() {
        let Some(gid) = other_group() else { return };
        let access = Access { gid: Some(gid) };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x/y");
        create_dir_all(&dir, &access).unwrap();
        create_file(&dir.join("f"), &new_file(), &access).unwrap();
        for p in [tmp.path().join("x"), dir.clone(), dir.join("f")] {
            assert_eq!(fs::metadata(&p).unwrap().gid(), gid, "{}", p.display());
        }
        assert_eq!(mode(&dir.join("f")), 0o640);
        assert_ne!(
            fs::metadata(tmp.path()).unwrap().gid(),
            gid,
            "parent untouched"
        );
    }

    #[test]
    fn adopt_brings_earlier_files_to_the_group() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let seg = dir.join("segments");
        fs::create_dir(&seg).unwrap();
        for p in [
            seg.join("00000001.seg"),
            dir.join("LOCK"),
            dir.join("nattrace.key"),
        ] {
            fs::write(&p, "").unwrap();
            fs::set_permissions(&p, Permissions::from_mode(0o600)).unwrap();
        }
        fs::write(dir.join("audit.log"), "").unwrap();
        fs::set_permissions(dir.join("audit.log"), Permissions::from_mode(0o660)).unwrap();
        fs::set_permissions(&seg, Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(dir, Permissions::from_mode(0o700)).unwrap();
        adopt(dir, &Access::default()).unwrap();
        assert_eq!(mode(&seg), 0o700, "no group: nothing changed");

        let Some(gid) = other_group() else { return };
        adopt(dir, &Access { gid: Some(gid) }).unwrap();
        for (p, m) in [
            (dir.to_owned(), 0o750),
            (seg.clone(), 0o750),
            (seg.join("00000001.seg"), 0o640),
            (dir.join("LOCK"), 0o640),
            (dir.join("audit.log"), 0o660),
        ] {
            assert_eq!(mode(&p), m, "{}", p.display());
            assert_eq!(fs::metadata(&p).unwrap().gid(), gid, "{}", p.display());
        }
        let key = dir.join("nattrace.key");
        assert_eq!(mode(&key), 0o600, "a key is never touched");
        assert_ne!(fs::metadata(&key).unwrap().gid(), gid);
    }

    #[test]
    fn data_dir_access_comes_from_its_configuration_once() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("not-yet");
        assert_eq!(Access::for_data_dir(&missing).unwrap(), Access::default());

        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(config::CONFIG_FILE), "group = \"root\"\n").unwrap();
        assert_eq!(Access::for_data_dir(&dir).unwrap(), Access { gid: Some(0) });
        // Remembered: a later change of the file does not change a running process.
        fs::write(dir.join(config::CONFIG_FILE), "group = 7\n").unwrap();
        assert_eq!(Access::for_data_dir(&dir).unwrap(), Access { gid: Some(0) });

        let bad = tmp.path().join("bad");
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join(config::CONFIG_FILE), "group = 7\n").unwrap();
        assert!(Access::for_data_dir(&bad).is_err());
        Access::set_for_data_dir(&bad, Access { gid: Some(3) });
        assert_eq!(Access::for_data_dir(&bad).unwrap(), Access { gid: Some(3) });
    }
}
