//! The `keygen` subcommand: a new Ed25519 key pair for signing checkpoints.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::exit::{Status, UserError};
use crate::signing::{self, SignerKey, SigningError};

/// `nattrace keygen`: writes `DIR/nattrace.key` (private, mode 0600) and `DIR/nattrace.pub`.
#[derive(Clone, Debug, clap::Args)]
pub struct KeygenArgs {
    /// Directory for nattrace.key and nattrace.pub (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Name of the key, written in every signature it makes [default: this host's name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Runs `nattrace keygen`: exit status 0 when both files were written, 2 when a key file
/// already exists or the name cannot name a key, 4 when the directory cannot be written.
pub fn run(args: &KeygenArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    crate::query::ignore_broken_pipe(execute(args, &mut stdout.lock()))
}

/// [`run`] with the output stream given.
pub fn execute(args: &KeygenArgs, out: &mut dyn Write) -> anyhow::Result<Status> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => hostname()?,
    };
    if !signing::is_valid_name(&name) {
        return Err(UserError::bad_input(format!(
            "--name: {name:?} cannot name a key: it must be non-empty, without '+' or whitespace"
        ))
        .into());
    }
    let key = SignerKey::generate(&name)?;
    let (key_path, pub_path) =
        signing::write_key_pair(&args.out, &key).map_err(|e| write_error(&args.out, e))?;
    let key_path = std::path::absolute(&key_path).unwrap_or(key_path);
    let pub_path = std::path::absolute(&pub_path).unwrap_or(pub_path);
    let sign_key = toml_string(&key_path.display().to_string());
    writeln!(
        out,
        "private key: {} (mode 0600, keep it on this host)",
        key_path.display()
    )?;
    writeln!(out, "public key:  {}", pub_path.display())?;
    writeln!(out, "{}", key.verifier().to_text())?;
    writeln!(
        out,
        "next: set sign_key = {sign_key} in the data dir's nattrace.toml; give nattrace.pub to investigators"
    )?;
    out.flush()?;
    Ok(Status::Ok)
}

/// `s` as a TOML basic string, quoted and escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// This host's name, the default key name.
fn hostname() -> anyhow::Result<String> {
    const PATH: &str = "/proc/sys/kernel/hostname";
    let name = fs::read_to_string(PATH)
        .map_err(|e| UserError::environment(format!("cannot read {PATH} ({e}): give --name")))?;
    Ok(name.trim().to_owned())
}

/// A key pair that cannot be written: an existing key is the user's mistake (status 2), a
/// directory that cannot be written the environment's (status 4).
fn write_error(dir: &Path, e: SigningError) -> anyhow::Error {
    match e {
        SigningError::KeyExists { path } => UserError::bad_input(format!(
            "{} already exists: keygen never overwrites a key; remove it or choose another --out",
            path.display()
        ))
        .into(),
        SigningError::Io { op, path, source }
            if source.kind() == io::ErrorKind::PermissionDenied =>
        {
            UserError::environment(format!(
                "cannot {op} {}: permission denied; choose an --out you can write",
                path.display()
            ))
            .into()
        }
        e => anyhow::Error::new(e).context(format!("cannot write a key pair to {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;

    use super::*;
    use crate::signing::VerifierKey;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: KeygenArgs,
    }

    fn run_with(argv: &[&str]) -> (anyhow::Result<Status>, String) {
        let mut full = vec!["keygen"];
        full.extend_from_slice(argv);
        let args = Cli::try_parse_from(full).unwrap().args;
        let mut out = Vec::new();
        let r = execute(&args, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn writes_a_key_pair_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let (r, out) = run_with(&["--out", keys.to_str().unwrap(), "--name", "gw1.example"]);
        assert_eq!(r.unwrap(), Status::Ok);
        let key = SignerKey::load(&keys.join("nattrace.key")).unwrap();
        let vkey = VerifierKey::load(&keys.join("nattrace.pub")).unwrap();
        assert_eq!(key.name(), "gw1.example");
        assert_eq!(vkey, key.verifier());
        let lines: Vec<&str> = out.lines().collect();
        let kp = keys.join("nattrace.key");
        assert_eq!(
            lines,
            vec![
                format!(
                    "private key: {} (mode 0600, keep it on this host)",
                    kp.display()
                ),
                format!("public key:  {}", keys.join("nattrace.pub").display()),
                vkey.to_text(),
                format!(
                    "next: set sign_key = \"{}\" in the data dir's nattrace.toml; give nattrace.pub to investigators",
                    kp.display()
                ),
            ]
        );
        assert_eq!(
            fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Never overwrites.
        let (r, _) = run_with(&["--out", keys.to_str().unwrap(), "--name", "other"]);
        let e = r.unwrap_err();
        let user = e.downcast_ref::<UserError>().unwrap();
        assert_eq!(user.status, Status::BadInput);
        assert!(user.message.contains("already exists"), "{}", user.message);
        assert_eq!(
            SignerKey::load(&kp).unwrap().to_text(),
            key.to_text(),
            "key overwritten"
        );
    }

    #[test]
    fn hint_quotes_any_path_as_toml() {
        for path in [
            "/etc/nattrace/nattrace.key",
            "/a \"b\"\\c\u{7f}\u{1}d/é.key",
        ] {
            let doc = format!("sign_key = {}", toml_string(path));
            let table: toml::Table = toml::from_str(&doc).unwrap();
            assert_eq!(table["sign_key"].as_str(), Some(path), "{doc}");
        }
    }

    #[test]
    fn default_name_is_the_host_name_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = run_with(&["--out", dir.path().to_str().unwrap()]);
        assert_eq!(r.unwrap(), Status::Ok);
        let key = SignerKey::load(&dir.path().join("nattrace.key")).unwrap();
        assert_eq!(key.name(), hostname().unwrap());

        let (r, _) = run_with(&["--out", dir.path().to_str().unwrap(), "--name", "a b"]);
        let e = r.unwrap_err();
        assert_eq!(
            e.downcast_ref::<UserError>().unwrap().status,
            Status::BadInput
        );
    }
}
