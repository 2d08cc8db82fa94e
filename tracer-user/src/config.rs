//! The data directory's configuration file, `DIR/nattrace.toml` (README.md, "Configuration").
//!
//! Every key is optional and a missing file means the defaults. A key this version does not
//! know is an error naming the key, the file and the line, so that a misspelt or not yet
//! supported setting is never ignored silently.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::cliparse;

/// Name of the configuration file inside a data directory.
pub const CONFIG_FILE: &str = "nattrace.toml";

/// The keys this version knows, as listed in the message about an unknown one.
const KNOWN_KEYS: &str = "retention, sign_key, require_case, max_window, group";

/// Default of `max_window`: 24 hours.
pub const DEFAULT_MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The settings of a data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDirConfig {
    /// `retention = "90d"`: sealed segments whose every record is older than this are deleted
    /// (by the agent at start and hourly, or by `nattrace retention`). `None`: kept forever.
    pub retention: Option<Duration>,
    /// `sign_key = "/etc/nattrace/nattrace.key"`: the host's private key (from `nattrace
    /// keygen`), signing each sealed segment's checkpoint and the audit log's head. A relative
    /// path is taken from the data directory; it is stored here made absolute that way.
    /// `None`: checkpoints are written unsigned.
    pub sign_key: Option<PathBuf>,
    /// `require_case = true`: queries and exports must name a case (the reason recorded in
    /// the audit log). Default `false`.
    pub require_case: bool,
    /// `max_window = "24h"`: the longest time window one query or export may ask for.
    /// Default [`DEFAULT_MAX_WINDOW`]; always longer than 0.
    pub max_window: Duration,
    /// `group = "nattrace"`: the group owner of the data directory and of every file
    /// nattrace writes in it (see [`crate::access`]); its members can read the data.
    /// `None`: the writing process's group.
    pub group: Option<Group>,
}

impl Default for DataDirConfig {
    fn default() -> Self {
        Self {
            retention: None,
            sign_key: None,
            require_case: false,
            max_window: DEFAULT_MAX_WINDOW,
            group: None,
        }
    }
}

/// A group named in the configuration, resolved when the file was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Its name as written.
    pub name: String,
    /// Its id on this system.
    pub gid: u32,
}

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: {message}", at(path, *line))]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// Line of the error (1-based), when known.
        line: Option<usize>,
        /// What the TOML parser says.
        message: String,
    },
    /// A key this version does not know.
    #[error("{}: unknown key '{key}' {}", at(path, Some(*line)), known_keys())]
    UnknownKey {
        /// The configuration file.
        path: PathBuf,
        /// Line of the key (1-based).
        line: usize,
        /// The key.
        key: String,
    },
    /// A known key with a value it cannot take.
    #[error("{}: {key}: {reason}", at(path, Some(*line)))]
    InvalidValue {
        /// The configuration file.
        path: PathBuf,
        /// Line of the value (1-based).
        line: usize,
        /// The key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
}

fn at(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    }
}

fn known_keys() -> String {
    format!("(known keys: {KNOWN_KEYS})")
}

/// The id of group `name` in the system's group database (`getgrnam_r(3)`: /etc/group, or
/// whatever NSS is configured), `None` when there is no such group.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: all-zero is a valid `struct group` (null pointers, gid 0); it is only read
        // after getgrnam_r filled it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`'s
        // strings (none are read).
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &raw mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // "Not found" as some C libraries report it.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// A string value of `key`, or the error saying what `example` looks like.
fn string_of<'a>(
    value: &'a toml::Value,
    example: &str,
    invalid: &dyn Fn(String) -> ConfigError,
) -> Result<&'a str, ConfigError> {
    match value {
        toml::Value::String(s) => Ok(s),
        other => Err(invalid(format!(
            "expected {example}, found a value of type {}",
            other.type_str()
        ))),
    }
}

/// A duration of at least 1 ns written like `--keep` (`"90d"`).
fn duration_of(
    value: &toml::Value,
    example: &str,
    invalid: &dyn Fn(String) -> ConfigError,
) -> Result<Duration, ConfigError> {
    let s = string_of(value, example, invalid)?;
    let ns = cliparse::parse_duration(s).map_err(|e| invalid(e.to_string()))?;
    if ns <= 0 {
        return Err(invalid("must be longer than 0".to_owned()));
    }
    Ok(Duration::from_nanos(ns.unsigned_abs()))
}

impl DataDirConfig {
    /// The key that signs checkpoints: `flag` (`--sign-key`) when given, else `sign_key`;
    /// `None` when neither is set. A key file that others can read is refused.
    pub fn signer(
        &self,
        flag: Option<&Path>,
    ) -> Result<Option<crate::signing::SignerKey>, crate::signing::SigningError> {
        flag.or(self.sign_key.as_deref())
            .map(crate::signing::SignerKey::load)
            .transpose()
    }
}

/// Reads `dir/nattrace.toml`; a missing file gives the defaults.
pub fn load(dir: &Path) -> Result<DataDirConfig, ConfigError> {
    let path = dir.join(CONFIG_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DataDirConfig::default()),
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// Parses the text of a configuration file (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<DataDirConfig, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(s.start)),
            message: e.message().trim_end().replace('\n', " "),
        })?;
    let mut config = DataDirConfig::default();
    // In file order, so the first wrong key is the one reported.
    let mut keys: Vec<_> = table.iter().collect();
    keys.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in keys {
        let line = line_of(value.span().start);
        let invalid = |reason: String| ConfigError::InvalidValue {
            path: path.to_owned(),
            line,
            key: key.get_ref().clone(),
            reason,
        };
        let value = value.get_ref();
        match key.get_ref().as_str() {
            "retention" => {
                config.retention = Some(duration_of(
                    value,
                    "a duration in quotes (retention = \"90d\")",
                    &invalid,
                )?);
            }
            "max_window" => {
                config.max_window = duration_of(
                    value,
                    "a duration in quotes (max_window = \"24h\")",
                    &invalid,
                )?;
            }
            "require_case" => {
                let toml::Value::Boolean(b) = value else {
                    return Err(invalid(format!(
                        "expected true or false (require_case = true), found a value of type {}",
                        value.type_str()
                    )));
                };
                config.require_case = *b;
            }
            "sign_key" => {
                let s = string_of(
                    value,
                    "a file name in quotes (sign_key = \"/etc/nattrace/nattrace.key\")",
                    &invalid,
                )?;
                if s.is_empty() {
                    return Err(invalid(
                        "empty: name the private key file from nattrace keygen".to_owned(),
                    ));
                }
                let dir = path.parent().unwrap_or_else(|| Path::new(""));
                config.sign_key = Some(dir.join(s));
            }
            "group" => {
                let name = string_of(
                    value,
                    "a group name in quotes (group = \"nattrace\")",
                    &invalid,
                )?;
                if name.is_empty() {
                    return Err(invalid(
                        "empty: name the group whose members may read the data".to_owned(),
                    ));
                }
                let gid = match group_id(name) {
                    Ok(Some(gid)) => gid,
                    Ok(None) => {
                        return Err(invalid(format!(
                            "no group '{name}' on this system (create it with `groupadd {name}`, \
                             or name an existing group)"
                        )));
                    }
                    Err(e) => {
                        return Err(invalid(format!("cannot look up group '{name}': {e}")));
                    }
                };
                config.group = Some(Group {
                    name: name.to_owned(),
                    gid,
                });
            }
            other => {
                return Err(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    line: line_of(key.span().start),
                    key: other.to_owned(),
                });
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<DataDirConfig, ConfigError> {
        parse(Path::new("/d/nattrace.toml"), text)
    }

    #[test]
    fn missing_file_and_empty_file_are_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), DataDirConfig::default());
        fs::write(dir.path().join(CONFIG_FILE), "# nothing\n").unwrap();
        assert_eq!(load(dir.path()).unwrap(), DataDirConfig::default());
    }

    #[test]
    fn retention_takes_durations() {
        let day = 86_400;
        for (text, secs) in [
            ("90d", 90 * day),
            ("2160h", 90 * day),
            ("2w", 14 * day),
            ("30m", 1800),
            ("45s", 45),
            ("1d 12h", day + day / 2),
        ] {
            let c = p(&format!("retention = \"{text}\"\n")).unwrap();
            assert_eq!(c.retention, Some(Duration::from_secs(secs)), "{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CONFIG_FILE), "retention = \"90d\"\n").unwrap();
        assert_eq!(
            load(dir.path()).unwrap().retention,
            Some(Duration::from_secs(90 * day))
        );
    }

    #[test]
    fn unknown_keys_name_key_file_and_line() {
        let e = p("retention = \"90d\"\n\nretension = \"1d\"\n").unwrap_err();
        assert!(matches!(&e, ConfigError::UnknownKey { key, line: 3, .. } if key == "retension"));
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:3: unknown key 'retension' (known keys: retention, sign_key, \
             require_case, max_window, group)"
        );
        let e = p("# comment\nsign_keys = \"x\"\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, line: 2, .. } if key == "sign_keys"),
            "{e}"
        );
        let e = p("[retention]\ndays = 3\n").unwrap_err();
        assert!(
            e.to_string().contains("retention: expected a duration"),
            "{e}"
        );
        let e = p("[extra]\nx = 1\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, line: 1, .. } if key == "extra"),
            "{e}"
        );
    }

    #[test]
    fn defaults() {
        let c = DataDirConfig::default();
        assert_eq!(c.retention, None);
        assert_eq!(c.sign_key, None);
        assert!(!c.require_case);
        assert_eq!(c.max_window, Duration::from_secs(86_400));
        assert_eq!(c.group, None);
        assert_eq!(p("").unwrap(), c);
    }

    #[test]
    fn all_keys_together() {
        let c = p(
            "retention = \"90d\"\nsign_key = \"/etc/nattrace/nattrace.key\"\n\
                   require_case = true\nmax_window = \"7d\"\ngroup = \"root\"\n",
        )
        .unwrap();
        assert_eq!(
            c,
            DataDirConfig {
                retention: Some(Duration::from_secs(90 * 86_400)),
                sign_key: Some(PathBuf::from("/etc/nattrace/nattrace.key")),
                require_case: true,
                max_window: Duration::from_secs(7 * 86_400),
                group: Some(Group {
                    name: "root".to_owned(),
                    gid: 0
                }),
            }
        );
    }

    #[test]
    fn sign_key_relative_to_the_data_dir() {
        let c = p("sign_key = \"nattrace.key\"\n").unwrap();
        assert_eq!(c.sign_key, Some(PathBuf::from("/d/nattrace.key")));
        let c = p("sign_key = \"keys/host.key\"\n").unwrap();
        assert_eq!(c.sign_key, Some(PathBuf::from("/d/keys/host.key")));
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CONFIG_FILE), "sign_key = \"k\"\n").unwrap();
        assert_eq!(
            load(dir.path()).unwrap().sign_key,
            Some(dir.path().join("k"))
        );

        let e = p("sign_key = \"\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/d/nattrace.toml:1: sign_key: empty"),
            "{e}"
        );
        let e = p("\nsign_key = true\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:2: sign_key: expected a file name in quotes (sign_key = \
             \"/etc/nattrace/nattrace.key\"), found a value of type boolean"
        );
    }

    #[test]
    fn require_case_is_a_boolean() {
        assert!(p("require_case = true\n").unwrap().require_case);
        assert!(!p("require_case = false\n").unwrap().require_case);
        for bad in ["\"true\"", "1", "\"yes\""] {
            let e = p(&format!("require_case = {bad}\n")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::InvalidValue { key, line: 1, .. } if key == "require_case"),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("require_case: expected true or false"),
                "{e}"
            );
        }
    }

    #[test]
    fn max_window_is_a_positive_duration() {
        assert_eq!(
            p("max_window = \"24h\"\n").unwrap().max_window,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            p("max_window = \"90m\"\n").unwrap().max_window,
            Duration::from_secs(5400)
        );
        let e = p("max_window = \"0h\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:1: max_window: must be longer than 0"
        );
        let e = p("max_window = 24\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:1: max_window: expected a duration in quotes (max_window = \
             \"24h\"), found a value of type integer"
        );
        let e = p("max_window = \"a day\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/d/nattrace.toml:1: max_window: invalid duration 'a day'"),
            "{e}"
        );
    }

    #[test]
    fn group_is_resolved_to_its_id() {
        let c = p("group = \"root\"\n").unwrap();
        assert_eq!(
            c.group,
            Some(Group {
                name: "root".to_owned(),
                gid: 0
            })
        );
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-nattrace").unwrap(), None);
        assert_eq!(group_id("nul\0byte").unwrap(), None);

        let e = p("\ngroup = \"no-such-group-nattrace\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:2: group: no group 'no-such-group-nattrace' on this system \
             (create it with `groupadd no-such-group-nattrace`, or name an existing group)"
        );
        let e = p("group = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:1: group: expected a group name in quotes (group = \"nattrace\"), \
             found a value of type integer"
        );
        let e = p("group = \"\"\n").unwrap_err();
        assert!(e.to_string().contains(":1: group: empty"), "{e}");
    }

    #[test]
    fn bad_values_and_syntax_are_errors_with_lines() {
        let e = p("\nretention = 90\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:2: retention: expected a duration in quotes (retention = \"90d\"), \
             found a value of type integer"
        );
        let e = p("retention = \"ninety days\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/d/nattrace.toml:1: retention: invalid duration 'ninety days'"),
            "{e}"
        );
        let e = p("retention = \"0s\"\n").unwrap_err();
        assert!(e.to_string().contains("must be longer than 0"), "{e}");
        let e = p("a = 1\nretention = \n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { line: Some(2), .. }),
            "{e:?}"
        );
        let e = p("retention = \"1d\"\nretention = \"2d\"\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { line: Some(2), .. }),
            "{e:?}"
        );
    }
}
