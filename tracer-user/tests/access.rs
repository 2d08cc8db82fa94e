//! Who may read a data directory: what nattrace creates is 0750/0640 whatever the umask and
//! owned by the configured `group` (but for the audit log, 0660 so that members can be
//! audited); a user outside it gets a one-line "permission denied" naming the path, never a
//! panic. Runs the built `nattrace` binary as root and, dropping
//! privileges, as the unprivileged uid 65534; skipped (with the reason printed) when not root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NOBODY: u32 = 65534;

const CSV: &str = "\
proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,end,packets_out,bytes_out,packets_in,bytes_in
tcp,100.64.0.10,40000,203.0.113.7,40123,192.0.2.2,443,2024-05-01T10:00:00Z,2024-05-01T10:05:00Z,1,100,2,200
udp,100.64.0.11,5000,203.0.113.7,40124,192.0.2.3,53,2024-05-01T10:01:00Z,,,,,
";

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A group other than root's to give the data to: its name and id.
fn other_group() -> Option<(&'static str, u32)> {
    ["daemon", "adm", "nogroup", "users"]
        .into_iter()
        .find_map(|n| Some((n, tracer_user::config::group_id(n).ok()??)))
}

fn nattrace() -> Command {
    let mut c = Command::new(binary());
    c.env("RUST_BACKTRACE", "1").env_remove("NATTRACE_DATA_DIR");
    c
}

/// The binary under test, copied where uid 65534 can run it: the build tree may sit in a
/// directory only its owner can enter (a CI clone in a `mktemp -d`, mode 0700). One copy,
/// replaced by each run (written aside, then renamed over, so a running copy is not hit).
fn binary() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join("nattrace-access-test");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("nattrace");
        let aside = dir.join(format!("nattrace.{}", std::process::id()));
        fs::copy(env!("CARGO_BIN_EXE_nattrace"), &aside).unwrap();
        fs::set_permissions(&aside, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&aside, &bin).unwrap();
        bin
    })
    .clone()
}

/// `other_group()` when running as root; else `None`, with a printed reason (`why_root` says
/// what root is needed for, as a "skipped: needs root, …" line).
fn root_and_other_group(why_root: &str) -> Option<(&'static str, u32)> {
    if !is_root() {
        eprintln!("{why_root}");
        return None;
    }
    let found = other_group();
    if found.is_none() {
        eprintln!("skipped: none of daemon, adm, nogroup, users in the group database");
    }
    found
}

/// A scratch directory anyone may pass through (not list), holding `data`.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let data = tmp.path().join("data");
    (tmp, data)
}

/// `nattrace import` of [`CSV`] into `data`, as root, under `umask`.
fn import(data: &Path, umask: libc::mode_t) {
    let csv = tempfile::NamedTempFile::new().unwrap();
    fs::write(csv.path(), CSV).unwrap();
    let mut cmd = nattrace();
    cmd.args(["import", "--format", "csv", "--data-dir"])
        .arg(data)
        .arg(csv.path());
    // SAFETY: umask(2) is async-signal-safe and changes only the child's mask.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "import: {}", text(&out));
}

fn text(out: &Output) -> String {
    format!(
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The reading commands, each with its arguments after `--data-dir DIR`.
fn readers() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "query",
            vec![
                "--external",
                "203.0.113.7:40123",
                "--at",
                "2024-05-01T10:01:00Z",
            ],
        ),
        (
            "query",
            vec![
                "--internal",
                "100.64.0.10",
                "--from",
                "2024-05-01T00:00:00Z",
                "--to",
                "2024-05-02T00:00:00Z",
            ],
        ),
        ("stats", vec![]),
        (
            "coverage",
            vec![
                "--from",
                "2024-05-01T00:00:00Z",
                "--to",
                "2024-05-02T00:00:00Z",
            ],
        ),
        ("verify", vec![]),
        ("retention", vec!["--keep", "1d", "--dry-run"]),
    ]
}

/// Runs `nattrace <cmd> --data-dir data <args>` as uid 65534 with group `gid` only.
fn run_as(gid: u32, cmd: &str, data: &Path, args: &[&str]) -> Output {
    nattrace()
        .arg(cmd)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .uid(NOBODY)
        .gid(gid)
        .output()
        .unwrap()
}

/// Every directory and file under `dir`, with mode and group.
fn tree(dir: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
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

fn assert_denied(out: &Output, what: &str, data: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| c != 0 && c != 101),
        "{what}: expected a clean failure: {}",
        text(out)
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: {}",
        text(out)
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {}", text(out));
    let line = lines[0];
    assert!(
        line.contains(&data.display().to_string()),
        "{what}: the path is not named: {line}"
    );
    assert!(
        line.contains("permission denied"),
        "{what}: does not say permission denied: {line}"
    );
    assert!(
        line.contains("group") && line.contains("root"),
        "{what}: does not say who may read: {line}"
    );
}

#[test]
fn outsiders_get_permission_denied_not_a_panic() {
    if !is_root() {
        eprintln!("skipped: needs root, to make a root-only data dir and run as uid {NOBODY}");
        return;
    }
    let (_tmp, data) = scratch();
    import(&data, 0o022);
    let meta = fs::metadata(&data).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o750, 0, 0)
    );
    for (cmd, args) in readers() {
        let out = run_as(NOBODY, cmd, &data, &args);
        assert_denied(&out, &format!("{cmd} {args:?}"), &data);
    }
    // The data dir readable, its contents not.
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    for (cmd, args) in readers() {
        if cmd == "retention" {
            // Keeps the newest segment without reading it: nothing it needs is refused.
            continue;
        }
        let out = run_as(NOBODY, cmd, &data, &args);
        assert_denied(&out, &format!("{cmd} {args:?} (segments refused)"), &data);
    }
}

#[test]
fn modes_are_exact_whatever_the_umask() {
    if !is_root() {
        eprintln!("skipped: needs root, as the other tests of this file");
        return;
    }
    for umask in [0o077, 0o002] {
        let (_tmp, data) = scratch();
        import(&data.join("nested"), umask);
        let all = tree(&data);
        assert!(all.len() >= 6, "{all:?}");
        for (p, mode, _) in all {
            let want = if p.is_dir() { 0o750 } else { 0o640 };
            assert_eq!(mode, want, "umask {umask:03o}: {} is {mode:o}", p.display());
        }
    }
}

#[test]
fn configured_group_owns_the_data_and_its_members_read_it() {
    let Some((group, gid)) =
        root_and_other_group("skipped: needs root, to give files to another group")
    else {
        return;
    };
    let (_tmp, data) = scratch();
    // Made by a cautious administrator before nattrace ran: the group is let in.
    fs::create_dir(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        data.join("nattrace.toml"),
        format!("group = \"{group}\"\nretention = \"3650d\"\n"),
    )
    .unwrap();
    import(&data, 0o077);
    for (p, mode, g) in tree(&data) {
        if p.ends_with("nattrace.toml") {
            continue;
        }
        // The audit log is the one file the group writes: its members append to it.
        let want = if p.is_dir() {
            0o750
        } else if p.ends_with("audit.log") {
            0o660
        } else {
            0o640
        };
        assert_eq!(
            (mode, g),
            (want, gid),
            "{} is {mode:o} group {g}",
            p.display()
        );
    }
    // A member of the group reads; anyone else is refused.
    for cmd in ["stats", "verify"] {
        let out = run_as(gid, cmd, &data, &[]);
        assert!(out.status.success(), "{cmd} as a member: {}", text(&out));
        let out = run_as(NOBODY, cmd, &data, &[]);
        assert_denied(&out, cmd, &data);
    }

    // An unknown group is refused before anything is written.
    let (_tmp2, data2) = scratch();
    fs::create_dir(&data2).unwrap();
    fs::write(
        data2.join("nattrace.toml"),
        "group = \"no-such-group-nattrace\"\n",
    )
    .unwrap();
    let csv = data2.with_extension("csv");
    fs::write(&csv, CSV).unwrap();
    let out = nattrace()
        .args(["import", "--format", "csv", "--data-dir"])
        .arg(&data2)
        .arg(&csv)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nattrace.toml:1: group: no group 'no-such-group-nattrace'"),
        "{err}"
    );
    assert!(!data2.join("segments").exists());
}

/// The audit log's entries, parsed.
fn audit_entries(data: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `nattrace audit --verify` as root: its exit code and output.
fn audit_verify(data: &Path) -> (Option<i32>, String) {
    let out = nattrace()
        .args(["audit", "--verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    (out.status.code(), text(&out))
}

#[test]
fn group_members_query_and_are_audited() {
    let Some((group, gid)) = root_and_other_group(&format!(
        "skipped: needs root, to give files to another group and run as uid {NOBODY}"
    )) else {
        return;
    };
    let (_tmp, data) = scratch();
    fs::create_dir(&data).unwrap();
    fs::write(
        data.join("nattrace.toml"),
        format!("group = \"{group}\"\nretention = \"3650d\"\n"),
    )
    .unwrap();
    import(&data, 0o022);
    // The import made the audit log, for the group to append to, and an empty head.
    let log = fs::metadata(data.join("audit.log")).unwrap();
    assert_eq!(
        (log.mode() & 0o7777, log.uid(), log.gid(), log.len()),
        (0o660, 0, gid, 0)
    );
    let head = fs::read_to_string(data.join("audit.head")).unwrap();
    let query = [
        "--external",
        "203.0.113.7:40123",
        "--at",
        "2024-05-01T10:01:00Z",
    ];

    // A member queries: answered, recorded, nothing alarming said.
    let out = run_as(gid, "query", &data, &query);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "query as a member: {}",
        text(&out)
    );
    // (Imported data is not covered by capture: that warning is not about the audit.)
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("audit") && !err.contains("head") && !err.contains("key"),
        "query as a member: {}",
        text(&out)
    );
    let entries = audit_entries(&data);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let user = entries[0]["user"].as_str().unwrap();
    assert!(user == "nobody" || user == "uid 65534", "{entries:?}");
    assert_eq!(entries[0]["uid"], NOBODY);
    assert_eq!(entries[0]["command"], "query");
    // The head is the owner's: left as it was, nothing left behind in the directory.
    assert_eq!(fs::read_to_string(data.join("audit.head")).unwrap(), head);
    assert!(!data.join("audit.head.tmp").exists());
    let log = fs::metadata(data.join("audit.log")).unwrap();
    assert_eq!((log.mode() & 0o7777, log.gid()), (0o660, gid));

    // Someone outside the group is refused, and records nothing.
    let out = run_as(NOBODY, "query", &data, &query);
    assert_denied(&out, "query outside the group", &data);
    assert_eq!(audit_entries(&data).len(), 1);

    // A second member query chains to the first.
    let out = run_as(gid, "query", &data, &query);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    assert_eq!(audit_entries(&data).len(), 2);

    // The members' entries are chained, not yet covered by the head: intact, and said.
    let (code, out) = audit_verify(&data);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("entries 1 to 2 are not covered by the head"),
        "{out}"
    );
    assert!(out.contains("audit log intact"), "{out}");

    // The next query by root rewrites the head over all of them.
    let out = nattrace()
        .arg("query")
        .arg("--data-dir")
        .arg(&data)
        .args(query)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let (code, out) = audit_verify(&data);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit.head: 3 entries"), "{out}");
    assert!(!out.contains("not covered"), "{out}");
}

#[test]
fn an_audit_log_made_before_the_group_is_opened_to_it() {
    let Some((group, gid)) = root_and_other_group(&format!(
        "skipped: needs root, to give files to another group and run as uid {NOBODY}"
    )) else {
        return;
    };
    let (_tmp, data) = scratch();
    import(&data, 0o022);
    // Root queried before the group was set: a 0640 log with its head.
    let out = nattrace()
        .args(["query", "--data-dir"])
        .arg(&data)
        .args(["--internal", "100.64.0.10", "--at", "2024-05-01T10:01:00Z"])
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let mode = |p: &str| fs::metadata(data.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("audit.log"), 0o640);
    fs::write(data.join("nattrace.toml"), format!("group = \"{group}\"\n")).unwrap();
    // The next writer (here an import) lets the group in, and widens the log (only it).
    import(&data, 0o022);
    assert_eq!((mode("audit.log"), mode("audit.head")), (0o660, 0o640));
    assert_eq!(fs::metadata(data.join("audit.log")).unwrap().gid(), gid);
    let out = run_as(
        gid,
        "query",
        &data,
        &["--internal", "100.64.0.10", "--at", "2024-05-01T10:01:00Z"],
    );
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    assert_eq!(audit_entries(&data).len(), 2);
    let (code, out) = audit_verify(&data);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("entry 2 is not covered by the head"), "{out}");
}

#[test]
fn with_a_signing_key_members_entries_wait_for_the_next_signed_head() {
    let Some((group, gid)) = root_and_other_group(&format!(
        "skipped: needs root, to give files to another group and run as uid {NOBODY}"
    )) else {
        return;
    };
    let (tmp, data) = scratch();
    let keys = tmp.path().join("keys");
    let out = nattrace()
        .args(["keygen", "--name", "host-a", "--out"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen: {}", text(&out));
    fs::create_dir(&data).unwrap();
    fs::write(
        data.join("nattrace.toml"),
        format!(
            "group = \"{group}\"\nsign_key = \"{}\"\n",
            keys.join("nattrace.key").display()
        ),
    )
    .unwrap();
    import(&data, 0o022);
    let query = ["--internal", "100.64.0.10", "--at", "2024-05-01T10:01:00Z"];
    let verify = || {
        let out = nattrace()
            .args(["audit", "--verify", "--data-dir"])
            .arg(&data)
            .arg("--key")
            .arg(keys.join("nattrace.pub"))
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    // The empty head the import wrote is signed.
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("signature by host-a verified"), "{out}");

    // A member cannot read the key, nor rewrite the head: neither is worth a warning.
    let out = run_as(gid, "query", &data, &query);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("audit") && !err.contains("key"),
        "{}",
        text(&out)
    );
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("entry 1 is not covered by a signature"),
        "{out}"
    );

    // Root's next query signs a head over it.
    let out = nattrace()
        .args(["query", "--data-dir"])
        .arg(&data)
        .args(query)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit.head: 2 entries"), "{out}");
    assert!(!out.contains("not covered"), "{out}");
}
