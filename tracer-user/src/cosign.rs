//! The `cosign` subcommand: adds a second party's signature to every checkpoint of a data
//! directory, so that altering a segment would need that party's key too.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::exit::{Status, UserError};
use crate::signing::{SignerKey, SigningError};
use crate::storage::checkpoint::{
    Checkpoint, checkpoint_path, list_checkpoints, read_checkpoint, write_checkpoint,
};
use crate::storage::columnar::{FileReader, SealedSegment};
use crate::storage::{SEALED_EXT, SEGMENTS_DIR, StorageError, error_chain, segment_name};

/// `nattrace cosign`: signs every checkpoint that has no signature by the key yet.
#[derive(Clone, Debug, clap::Args)]
pub struct CosignArgs {
    /// Data directory written by the agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Private key file from `nattrace keygen` (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Name of the key; must be the name in the key file, as a check against using the wrong
    /// key.
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

/// Runs `nattrace cosign`: exit status 0 when every checkpoint has a signature by the key,
/// 3 when some checkpoint could not be read or rewritten (the others are cosigned), 2 for a
/// wrong key or name, 4 when the data directory cannot be read or written.
pub fn run(args: &CosignArgs) -> anyhow::Result<Status> {
    let stdout = io::stdout();
    crate::query::ignore_broken_pipe(execute(args, &mut stdout.lock()))
}

/// [`run`] with the output stream given.
pub fn execute(args: &CosignArgs, out: &mut dyn Write) -> anyhow::Result<Status> {
    let key = SignerKey::load(&args.key).map_err(|e| key_error(&args.key, e))?;
    if key.name() != args.name {
        return Err(UserError::bad_input(format!(
            "--name {} does not match the name of the key in {}, {}",
            args.name,
            args.key.display(),
            key.name()
        ))
        .into());
    }
    let dir = &args.data_dir;
    if !dir.is_dir() {
        return Err(crate::verify::dir_error(
            dir,
            StorageError::NotFound {
                path: dir.to_owned(),
            },
        ));
    }
    let seg_dir = dir.join(SEGMENTS_DIR);
    let seqs = list_checkpoints(&seg_dir).map_err(|e| crate::verify::dir_error(dir, e))?;
    let (mut cosigned, mut already, mut failed, mut no_segment) = (0usize, 0usize, 0usize, 0usize);
    for seq in seqs {
        match cosign_one(&seg_dir, seq, &key) {
            Ok(Outcome::Cosigned) => cosigned += 1,
            Ok(Outcome::AlreadySigned) => already += 1,
            Ok(Outcome::Gone) => {}
            Ok(Outcome::NoSegment) => no_segment += 1,
            Err(Problem::Storage(StorageError::PermissionDenied { path })) => {
                return Err(UserError::environment(format!(
                    "cannot rewrite {}: permission denied; run as the owner of the data dir or as root",
                    path.display()
                ))
                .into());
            }
            Err(p) => {
                failed += 1;
                let cause = match p {
                    Problem::Storage(e) => error_chain(&e),
                    Problem::Other(cause) => cause,
                };
                writeln!(out, "{}: {cause}", checkpoint_path(&seg_dir, seq).display())?;
            }
        }
    }
    write!(
        out,
        "cosigned {cosigned} checkpoint{}, {already} already had a signature by {}",
        plural(cosigned),
        key.name()
    )?;
    if failed > 0 {
        write!(out, "; {failed} could not be cosigned")?;
    }
    if no_segment > 0 {
        write!(out, "; {no_segment} of deleted segments left as they are")?;
    }
    writeln!(out)?;
    out.flush()?;
    Ok(if failed == 0 {
        Status::Ok
    } else {
        Status::Partial
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// What became of one checkpoint.
enum Outcome {
    Cosigned,
    AlreadySigned,
    /// Removed since it was listed (by retention).
    Gone,
    /// Its segment was deleted (by retention): nothing to check it against, left unsigned.
    NoSegment,
}

/// Why one checkpoint was not cosigned.
enum Problem {
    Storage(StorageError),
    Other(String),
}

/// Adds `key`'s signature to checkpoint `seq` unless it has one by that name.
fn cosign_one(seg_dir: &Path, seq: u32, key: &SignerKey) -> Result<Outcome, Problem> {
    let Some(mut note) = read_checkpoint(seg_dir, seq).map_err(Problem::Storage)? else {
        return Ok(Outcome::Gone);
    };
    if note.has_signature_by(key.name()) {
        return Ok(Outcome::AlreadySigned);
    }
    let body = Checkpoint::parse_body(&note.text).map_err(|e| Problem::Other(e.to_string()))?;
    if body.seq != seq {
        return Err(Problem::Other(format!(
            "the checkpoint is for segment {}, not {seq}",
            body.seq
        )));
    }
    // A witness signs only what it checked: the checkpoint must describe the segment on disk.
    let seg_path = seg_dir.join(segment_name(seq, SEALED_EXT));
    let reader = match File::open(&seg_path) {
        Ok(f) => FileReader::new(f)
            .map_err(|e| Problem::Storage(StorageError::io("read", &seg_path, e)))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::NoSegment),
        Err(e) => return Err(Problem::Storage(StorageError::io("open", &seg_path, e))),
    };
    let seg = SealedSegment::open(&reader).map_err(|(at, e)| {
        Problem::Other(format!(
            "{}: offset {at}: {}",
            seg_path.display(),
            error_chain(&e)
        ))
    })?;
    if Checkpoint::of_segment(&seg).body() != note.text {
        return Err(Problem::Other(format!(
            "does not describe segment {seq} as it is on disk: not cosigned (run nattrace verify \
             --data-dir DIR --key PUBKEY)"
        )));
    }
    note.add_signature(key)
        .map_err(|e| Problem::Other(error_chain(&e)))?;
    write_checkpoint(seg_dir, seq, &note).map_err(Problem::Storage)?;
    Ok(Outcome::Cosigned)
}

/// A key that cannot be used: the user's mistake (status 2), unless it cannot be read for
/// lack of permission (status 4).
fn key_error(path: &Path, e: SigningError) -> anyhow::Error {
    match e {
        SigningError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            UserError::environment(format!(
                "--key: cannot read {}: permission denied",
                path.display()
            ))
            .into()
        }
        SigningError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            UserError::bad_input(format!("--key: {} does not exist", path.display())).into()
        }
        e @ SigningError::Io { .. } => anyhow::Error::new(e),
        e => UserError::bad_input(format!("--key: {}", error_chain(&e))).into(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use clap::Parser;

    use super::*;
    use crate::signing::{Note, sign, write_key_pair};

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: CosignArgs,
    }

    fn run_with(dir: &Path, key: &Path, name: &str) -> (anyhow::Result<Status>, String) {
        let argv = [
            "cosign",
            "--data-dir",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--name",
            name,
        ];
        let args = Cli::try_parse_from(argv).unwrap().args;
        let mut out = Vec::new();
        let r = execute(&args, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    /// Writes sealed segment `seq` (no rows) into `seg_dir`; its checkpoint body.
    fn body(seg_dir: &Path, seq: u32) -> String {
        let header = crate::storage::columnar::SegmentHeader {
            seq,
            writer_id: [1; 16],
            prev_seq: seq - 1,
            prev_root: [0; 32],
            window_start_ns: 10,
            window_end_ns: 20,
        };
        let (bytes, _) = crate::storage::columnar::encode_segment(&header, Vec::new(), &[]);
        crate::storage::seal::write_sealed(seg_dir, seq, &bytes).unwrap();
        let seg = SealedSegment::open(&bytes).unwrap();
        Checkpoint::of_segment(&seg).body()
    }

    /// A data dir with checkpoints 1..=count signed by a host key; returns (dir, host key).
    fn data_dir(count: u32) -> (tempfile::TempDir, SignerKey) {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        fs::create_dir(&seg_dir).unwrap();
        let host = SignerKey::generate("gw1").unwrap();
        for seq in 1..=count {
            write_checkpoint(&seg_dir, seq, &sign(&body(&seg_dir, seq), &host).unwrap()).unwrap();
        }
        (dir, host)
    }

    fn auditor_key(dir: &Path) -> (PathBuf, SignerKey) {
        let key = SignerKey::generate("auditor").unwrap();
        let (path, _) = write_key_pair(&dir.join("keys"), &key).unwrap();
        (path, key)
    }

    fn read(dir: &Path, seq: u32) -> Note {
        read_checkpoint(&dir.join(SEGMENTS_DIR), seq)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn cosigns_each_checkpoint_once() {
        let (dir, host) = data_dir(3);
        let keys = tempfile::tempdir().unwrap();
        let (key_path, auditor) = auditor_key(keys.path());
        let (r, out) = run_with(dir.path(), &key_path, "auditor");
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(
            out,
            "cosigned 3 checkpoints, 0 already had a signature by auditor\n"
        );
        for seq in 1..=3 {
            let note = read(dir.path(), seq);
            note.verify(&host.verifier()).unwrap();
            note.verify(&auditor.verifier()).unwrap();
            assert_eq!(note.signatures[0].name, "gw1");
        }

        // A new checkpoint since: only it is cosigned.
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        write_checkpoint(&seg_dir, 4, &sign(&body(&seg_dir, 4), &host).unwrap()).unwrap();
        let before = fs::read(checkpoint_path(&seg_dir, 1)).unwrap();
        let (r, out) = run_with(dir.path(), &key_path, "auditor");
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(
            out,
            "cosigned 1 checkpoint, 3 already had a signature by auditor\n"
        );
        assert_eq!(fs::read(checkpoint_path(&seg_dir, 1)).unwrap(), before);
        read(dir.path(), 4).verify(&auditor.verifier()).unwrap();
    }

    #[test]
    fn a_checkpoint_that_does_not_describe_its_segment_is_not_cosigned() {
        let (dir, host) = data_dir(3);
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        // Segment 2 replaced by other content (its checkpoint still names the old root);
        // segment 3 deleted by retention.
        let header = crate::storage::columnar::SegmentHeader {
            seq: 2,
            writer_id: [9; 16],
            prev_seq: 1,
            prev_root: [0; 32],
            window_start_ns: 10,
            window_end_ns: 20,
        };
        let (bytes, _) = crate::storage::columnar::encode_segment(&header, Vec::new(), &[]);
        crate::storage::seal::write_sealed(&seg_dir, 2, &bytes).unwrap();
        fs::remove_file(seg_dir.join(segment_name(3, SEALED_EXT))).unwrap();
        let keys = tempfile::tempdir().unwrap();
        let (key_path, auditor) = auditor_key(keys.path());
        let (r, out) = run_with(dir.path(), &key_path, "auditor");
        assert_eq!(r.unwrap(), Status::Partial, "{out}");
        assert!(
            out.contains("does not describe segment 2 as it is on disk"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "cosigned 1 checkpoint, 0 already had a signature by auditor; 1 could not be \
             cosigned; 1 of deleted segments left as they are\n"
            ),
            "{out}"
        );
        read(dir.path(), 1).verify(&auditor.verifier()).unwrap();
        assert!(read(dir.path(), 2).verify(&auditor.verifier()).is_err());
        read(dir.path(), 2).verify(&host.verifier()).unwrap();
    }

    #[test]
    fn unreadable_checkpoints_are_reported_and_the_others_cosigned() {
        let (dir, _) = data_dir(3);
        let seg_dir = dir.path().join(SEGMENTS_DIR);
        let bad = checkpoint_path(&seg_dir, 2);
        fs::write(&bad, "garbage\n").unwrap();
        // A signed note whose text is not a checkpoint.
        let wrong = checkpoint_path(&seg_dir, 3);
        let other = SignerKey::generate("gw1").unwrap();
        fs::write(
            &wrong,
            sign(&body(tempfile::tempdir().unwrap().path(), 5), &other)
                .unwrap()
                .encode(),
        )
        .unwrap();
        let keys = tempfile::tempdir().unwrap();
        let (key_path, auditor) = auditor_key(keys.path());
        let (r, out) = run_with(dir.path(), &key_path, "auditor");
        assert_eq!(r.unwrap(), Status::Partial);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                format!(
                    "{}: cannot parse {}: malformed note: no empty line before the signatures",
                    bad.display(),
                    bad.display()
                ),
                format!(
                    "{}: the checkpoint is for segment 5, not 3",
                    wrong.display()
                ),
                "cosigned 1 checkpoint, 0 already had a signature by auditor; 2 could not be cosigned"
                    .to_owned(),
            ]
        );
        read(dir.path(), 1).verify(&auditor.verifier()).unwrap();
        assert_eq!(fs::read_to_string(&bad).unwrap(), "garbage\n");
    }

    #[test]
    fn wrong_key_name_or_mode_is_refused() {
        let (dir, _) = data_dir(1);
        let keys = tempfile::tempdir().unwrap();
        let (key_path, _) = auditor_key(keys.path());
        let status = |r: anyhow::Result<Status>| {
            let e = r.unwrap_err();
            let u = e.downcast_ref::<UserError>().unwrap();
            (u.status, u.message.clone())
        };

        let (r, out) = run_with(dir.path(), &key_path, "gw1");
        let (s, msg) = status(r);
        assert_eq!(s, Status::BadInput);
        assert_eq!(
            msg,
            format!(
                "--name gw1 does not match the name of the key in {}, auditor",
                key_path.display()
            )
        );
        assert_eq!(out, "");
        assert_eq!(read(dir.path(), 1).signatures.len(), 1);

        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let (s, msg) = status(run_with(dir.path(), &key_path, "auditor").0);
        assert_eq!(s, Status::BadInput);
        assert!(msg.contains("chmod 600"), "{msg}");

        let (s, msg) = status(run_with(dir.path(), &keys.path().join("nope"), "auditor").0);
        assert_eq!(s, Status::BadInput);
        assert!(msg.contains("does not exist"), "{msg}");

        // The public key given as --key.
        let (s, msg) = status(
            run_with(
                dir.path(),
                &keys.path().join("keys/nattrace.pub"),
                "auditor",
            )
            .0,
        );
        assert_eq!(s, Status::BadInput);
        assert!(msg.contains("PRIVATE+KEY+"), "{msg}");
    }

    #[test]
    fn missing_data_dir_exits_4_and_empty_one_cosigns_nothing() {
        let keys = tempfile::tempdir().unwrap();
        let (key_path, _) = auditor_key(keys.path());
        let (r, _) = run_with(&keys.path().join("nope"), &key_path, "auditor");
        let e = r.unwrap_err();
        assert_eq!(
            e.downcast_ref::<UserError>().unwrap().status,
            Status::Environment
        );
        let empty = tempfile::tempdir().unwrap();
        let (r, out) = run_with(empty.path(), &key_path, "auditor");
        assert_eq!(r.unwrap(), Status::Ok);
        assert_eq!(
            out,
            "cosigned 0 checkpoints, 0 already had a signature by auditor\n"
        );
    }
}
