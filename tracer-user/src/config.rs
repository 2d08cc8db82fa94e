//! The data directory's configuration file, `DIR/nattrace.toml` (README.md, "Configuration").
//!
//! Every key is optional and a missing file means the defaults. A key this version does not
//! know is an error naming the key, the file and the line, so that a misspelt or not yet
//! supported setting is never ignored silently.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::cliparse;

/// Name of the configuration file inside a data directory.
pub const CONFIG_FILE: &str = "nattrace.toml";

/// Keys reserved for settings of a later version: refused for now, with a message that says so.
const RESERVED_KEYS: [&str; 3] = ["require_case", "max_window", "sign_key"];

/// The settings of a data directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataDirConfig {
    /// `retention = "90d"`: sealed segments whose every record is older than this are deleted
    /// (by the agent at start and hourly, or by `nattrace retention`). `None`: kept forever.
    pub retention: Option<Duration>,
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
    #[error("{}: unknown key '{key}'{}", at(path, Some(*line)), hint(key))]
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

fn hint(key: &str) -> String {
    if RESERVED_KEYS.contains(&key) {
        " (reserved for a later version of nattrace, not supported by this one)".to_owned()
    } else {
        " (known keys: retention)".to_owned()
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
        match key.get_ref().as_str() {
            "retention" => {
                let toml::Value::String(s) = value.get_ref() else {
                    return Err(invalid(format!(
                        "expected a duration in quotes (retention = \"90d\"), found a value of type {}",
                        value.get_ref().type_str()
                    )));
                };
                let ns = cliparse::parse_duration(s).map_err(|e| invalid(e.to_string()))?;
                if ns <= 0 {
                    return Err(invalid("must be longer than 0".to_owned()));
                }
                config.retention = Some(Duration::from_nanos(ns.unsigned_abs()));
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
    fn unknown_and_reserved_keys_name_key_file_and_line() {
        let e = p("retention = \"90d\"\n\nretension = \"1d\"\n").unwrap_err();
        assert!(matches!(&e, ConfigError::UnknownKey { key, line: 3, .. } if key == "retension"));
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:3: unknown key 'retension' (known keys: retention)"
        );
        let e = p("# comment\nsign_key = \"x\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/d/nattrace.toml:2: unknown key 'sign_key' (reserved for a later version of \
             nattrace, not supported by this one)"
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
