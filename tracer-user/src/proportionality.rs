//! What a question asked of a data directory must carry, and its record: the data
//! directory's `require_case` and `max_window` settings checked before a query or export
//! reads anything ([`check`]), and the audit entry appended after it has its answer and
//! before it shows any of it ([`record`]). A question that cannot be recorded is not answered.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use crate::audit::{self, AUDIT_HEAD, AUDIT_LOG, AuditEntry, HeadUpdate, NewEntry};
use crate::config::{self, CONFIG_FILE, ConfigError, DataDirConfig};
use crate::exit::UserError;
use crate::signing::SignerKey;
use crate::storage::error_chain;

/// Reads the data directory's configuration for a query or export: an invalid file is bad
/// input (exit 2), an unreadable one an environment problem (exit 4).
pub fn load_config(dir: &Path) -> Result<DataDirConfig, UserError> {
    match config::load(dir) {
        Ok(c) => Ok(c),
        Err(ConfigError::Read { path, source })
            if source.kind() == io::ErrorKind::PermissionDenied =>
        {
            Err(UserError::environment(format!(
                "cannot read {}: permission denied; run as a member of the data dir's group or as root",
                path.display()
            )))
        }
        // A data directory that is not there: the search that follows says so.
        Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotADirectory => {
            Ok(DataDirConfig::default())
        }
        Err(e) => Err(UserError::bad_input(error_chain(&e))),
    }
}

/// Checks `--case` and `--reason` and the length of the time window asked for (`window_ns`,
/// from its start to its end) against the data directory's settings: a case is required
/// when `require_case = true`, a reason when the window is longer than `max_window`. Both
/// must be one line of text when given. Errors are bad input (exit 2) that say what to add.
pub fn check(
    config: &DataDirConfig,
    case: Option<&str>,
    reason: Option<&str>,
    window_ns: i64,
) -> Result<(), UserError> {
    let case = text_arg("--case", case)?;
    let reason = text_arg("--reason", reason)?;
    if config.require_case && case.is_none() {
        return Err(UserError::bad_input(format!(
            "this data directory requires a case id (require_case = true in its {CONFIG_FILE}): \
             give --case ID naming the case the question belongs to"
        )));
    }
    let window = Duration::from_nanos(window_ns.max(0).unsigned_abs());
    if window > config.max_window && reason.is_none() {
        return Err(UserError::bad_input(format!(
            "the window of {} is longer than this data directory's limit of {} (max_window in \
             its {CONFIG_FILE}): give --reason TEXT saying why so long a window is needed \
             (it is recorded in the audit log), or ask for a shorter window",
            duration_text(window),
            duration_text(config.max_window)
        )));
    }
    Ok(())
}

/// A `--case` or `--reason` value: `None` when not given; refused when blank or not one line.
fn text_arg<'a>(flag: &str, value: Option<&'a str>) -> Result<Option<&'a str>, UserError> {
    let Some(v) = value else { return Ok(None) };
    if v.trim().is_empty() {
        return Err(UserError::bad_input(format!("{flag}: empty")));
    }
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(UserError::bad_input(format!(
            "{flag}: '{}' holds control character {:#04x}: give one line of text",
            v.escape_debug(),
            u32::from(c)
        )));
    }
    Ok(Some(v))
}

/// A duration as in messages: "24h", "2days 1h", "4s", "1s 500ms".
fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Appends `entry` to the data directory's audit log, signing the log's head with the
/// configured `sign_key` when this user can read it; when it is configured but cannot be
/// read (not root, say), the entry is appended unsigned and a one-line warning goes to
/// `err`. Call it once the answer is known and before any of it is printed or written:
/// when the entry cannot be appended the error (exit 4) says that the command is refused,
/// and the command must then show nothing.
///
/// A member of the data directory's group appends its entry but cannot rewrite the head
/// (see `audit::HeadUpdate::NotPermitted`): that is how it is meant to work, and nothing is
/// said. Any other failure to rewrite the head, after the entry is safely in the log, is a
/// one-line warning on `err`, not a refusal.
pub fn record(
    dir: &Path,
    config: &DataDirConfig,
    entry: NewEntry,
    err: &mut dyn Write,
) -> anyhow::Result<AuditEntry> {
    let (signer, key_problem) = match &config.sign_key {
        None => (None, None),
        Some(path) => match SignerKey::load(path) {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some((path, e))),
        },
    };
    let command = entry.command.clone();
    let plural = match command.as_str() {
        "query" => "queries".to_owned(),
        c => format!("{c}s"),
    };
    let appended = audit::append_entry(dir, entry, signer.as_ref()).map_err(|e| {
        let cause = match e.io_kind() {
            Some(io::ErrorKind::PermissionDenied) => {
                "permission denied (run as root, or as a member of the data dir's group once \
                 the agent or `nattrace import` has made the log writable by it)"
                    .to_owned()
            }
            _ => error_chain(&e),
        };
        UserError::environment(format!(
            "cannot record this {command} in the audit log {}: {cause}; {plural} are refused \
             when they cannot be audited",
            dir.join(AUDIT_LOG).display()
        ))
    })?;
    let written = appended.entry;
    match appended.head {
        HeadUpdate::Written | HeadUpdate::KeptSigned => {
            if let Some((path, e)) = key_problem {
                writeln!(
                    err,
                    "nattrace: warning: cannot read the signing key {} ({}): audit entry {} \
                     recorded without a signature",
                    path.display(),
                    error_chain(&e),
                    written.seq
                )?;
            }
        }
        // A member of the group: the owner's next query or export covers the entry.
        HeadUpdate::NotPermitted => {}
        HeadUpdate::Failed(e) => writeln!(
            err,
            "nattrace: warning: audit entry {} recorded, but the head {} was not updated ({}): \
             the entry is chained but not covered by the head until the next one is written",
            written.seq,
            dir.join(AUDIT_HEAD).display(),
            error_chain(&e)
        )?,
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::{COMMAND_EXPORT, COMMAND_QUERY, read_log};
    use crate::exit::Status;

    const H: i64 = 3_600_000_000_000;

    fn config(require_case: bool, max_window_h: u64) -> DataDirConfig {
        DataDirConfig {
            require_case,
            max_window: Duration::from_secs(max_window_h * 3600),
            ..DataDirConfig::default()
        }
    }

    #[test]
    fn defaults_take_a_day_without_case_or_reason() {
        let c = DataDirConfig::default();
        assert_eq!(c.max_window, Duration::from_secs(86_400));
        check(&c, None, None, 0).unwrap();
        check(&c, None, None, 24 * H).unwrap();
        let e = check(&c, None, None, 24 * H + 1).unwrap_err();
        assert_eq!(e.status, Status::BadInput);
        assert_eq!(
            e.message,
            "the window of 1day 1ns is longer than this data directory's limit of 1day \
             (max_window in its nattrace.toml): give --reason TEXT saying why so long a window \
             is needed (it is recorded in the audit log), or ask for a shorter window"
        );
        check(&c, None, Some("court order 17/2026"), 24 * H + 1).unwrap();
        check(&c, Some("C-1"), Some("court order"), 1000 * H).unwrap();
    }

    #[test]
    fn required_case_and_configured_window() {
        let c = config(true, 2);
        let e = check(&c, None, Some("why"), H).unwrap_err();
        assert_eq!(e.status, Status::BadInput);
        assert!(
            e.message
                .starts_with("this data directory requires a case id"),
            "{}",
            e.message
        );
        assert!(e.message.contains("--case ID"), "{}", e.message);
        check(&c, Some("CASE-2026-17"), None, 2 * H).unwrap();
        let e = check(&c, Some("CASE-2026-17"), None, 3 * H).unwrap_err();
        assert!(
            e.message
                .starts_with("the window of 3h is longer than this data directory's limit of 2h"),
            "{}",
            e.message
        );
    }

    #[test]
    fn case_and_reason_must_be_one_line_of_text() {
        let c = DataDirConfig::default();
        let e = check(&c, Some("  "), None, 0).unwrap_err();
        assert_eq!(e.message, "--case: empty");
        let e = check(&c, None, Some(""), 0).unwrap_err();
        assert_eq!(e.message, "--reason: empty");
        // An empty reason is no reason for a long window either.
        assert!(check(&c, None, Some(" "), 48 * H).is_err());
        let e = check(&c, None, Some("a\nb"), 0).unwrap_err();
        assert!(
            e.message
                .starts_with("--reason: 'a\\nb' holds control character 0x0a"),
            "{}",
            e.message
        );
    }

    #[test]
    fn config_errors_are_bad_input_and_a_missing_dir_is_left_to_the_search() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CONFIG_FILE), "require_case = 1\n").unwrap();
        let e = load_config(dir.path()).unwrap_err();
        assert_eq!(e.status, Status::BadInput);
        assert!(
            e.message.contains("require_case: expected true or false"),
            "{}",
            e.message
        );
        assert_eq!(
            load_config(&dir.path().join("missing")).unwrap(),
            DataDirConfig::default()
        );
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert_eq!(load_config(&file).unwrap(), DataDirConfig::default());
    }

    #[test]
    fn record_signs_when_it_can_and_warns_when_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("host-a").unwrap();
        let (key_file, _) = crate::signing::write_key_pair(&dir.path().join("keys"), &key).unwrap();
        let mut c = DataDirConfig {
            sign_key: Some(key_file),
            ..DataDirConfig::default()
        };
        let mut err = Vec::new();
        let mut e = NewEntry::now(COMMAND_EXPORT, "--internal 100.64.0.10");
        e.results = 7;
        e.bundle_sha256 = Some("ab".repeat(32));
        let written = record(dir.path(), &c, e, &mut err).unwrap();
        assert_eq!(written.seq, 1);
        assert!(err.is_empty());
        let head = fs::read_to_string(dir.path().join(AUDIT_HEAD)).unwrap();
        assert!(head.contains("\u{2014} host-a "), "{head}");

        c.sign_key = Some(dir.path().join("no-such.key"));
        let written = record(dir.path(), &c, NewEntry::now(COMMAND_QUERY, "q"), &mut err).unwrap();
        assert_eq!(written.seq, 2);
        let err = String::from_utf8(err).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!(
                "nattrace: warning: cannot read the signing key {}",
                dir.path().join("no-such.key").display()
            )),
            "{err}"
        );
        assert!(
            err.ends_with("audit entry 2 recorded without a signature\n"),
            "{err}"
        );
        let (lines, _) = read_log(dir.path()).unwrap();
        let first = lines[0].entry.as_ref().unwrap();
        assert_eq!(first.command, "export");
        assert_eq!(
            first.bundle_sha256.as_deref(),
            Some("ab".repeat(32).as_str())
        );
        assert_eq!(first.results, 7);
        let r = crate::audit::verify(dir.path(), Some(&key.verifier())).unwrap();
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.uncovered, Some((2, 2)));
    }

    #[test]
    fn head_failure_is_a_warning_not_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let mut err = Vec::new();
        let c = DataDirConfig::default();
        record(dir.path(), &c, NewEntry::now(COMMAND_QUERY, "q"), &mut err).unwrap();
        assert!(err.is_empty());
        // The head cannot be read, so cannot be replaced.
        fs::remove_file(dir.path().join(AUDIT_HEAD)).unwrap();
        fs::create_dir_all(dir.path().join(AUDIT_HEAD).join("x")).unwrap();
        let written = record(dir.path(), &c, NewEntry::now(COMMAND_QUERY, "q"), &mut err).unwrap();
        assert_eq!(written.seq, 2);
        let err = String::from_utf8(err).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!(
                "nattrace: warning: audit entry 2 recorded, but the head {} was not updated (",
                dir.path().join(AUDIT_HEAD).display()
            )),
            "{err}"
        );
        assert_eq!(read_log(dir.path()).unwrap().0.len(), 2);
    }

    #[test]
    fn unrecordable_question_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Something that cannot be opened as a file, even by root.
        fs::create_dir(dir.path().join(AUDIT_LOG)).unwrap();
        let mut err = Vec::new();
        let e = record(
            dir.path(),
            &DataDirConfig::default(),
            NewEntry::now(COMMAND_QUERY, "q"),
            &mut err,
        )
        .unwrap_err();
        let ue = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(ue.status, Status::Environment);
        assert!(
            ue.message.starts_with(&format!(
                "cannot record this query in the audit log {}: ",
                dir.path().join(AUDIT_LOG).display()
            )),
            "{}",
            ue.message
        );
        assert!(
            ue.message
                .ends_with("; queries are refused when they cannot be audited"),
            "{}",
            ue.message
        );
        assert!(err.is_empty());
    }
}
