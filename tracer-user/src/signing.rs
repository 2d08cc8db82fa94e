//! Ed25519 signing keys and signed notes, in the format of Go's
//! `golang.org/x/mod/sumdb/note` (C2SP signed-note), so that a checkpoint written by nattrace
//! can be checked with any implementation of that format, and the other way round.
//!
//! - A key has a name (non-empty, no `+`, no whitespace) and a key id: the first 4 bytes of
//!   `SHA-256(name || "\n" || 0x01 || public key)`.
//! - Verifier (public) key text: `<name>+<key id, 8 hex>+<base64(0x01 || public key)>`.
//! - Signer (private) key text: `PRIVATE+KEY+<name>+<key id, 8 hex>+<base64(0x01 || seed)>`.
//! - A signed note is its text (UTF-8, ending in a newline, no control characters but newlines),
//!   an empty line, then one line per signature: `— <name> <base64(key id || signature)>`,
//!   where `—` is U+2014 and the signature is Ed25519 over the text's bytes.
//!
//! Signatures by other keys are kept in a [`Note`] and written back unchanged, so that a note
//! can gather signatures from several parties (`nattrace cosign`).

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// File name of the private (signer) key written by [`write_key_pair`].
pub const SIGNER_KEY_FILE: &str = "nattrace.key";
/// File name of the public (verifier) key written by [`write_key_pair`].
pub const VERIFIER_KEY_FILE: &str = "nattrace.pub";

/// Algorithm byte of an Ed25519 key in key texts.
const ALG_ED25519: u8 = 0x01;
/// Prefix of a signer key's text.
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";
/// Start of a signature line (U+2014 and a space).
const SIG_PREFIX: &str = "\u{2014} ";
/// Most signatures a note may carry (as Go's `note.Open`).
const MAX_SIGNATURES: usize = 100;
/// Largest key file read; a key text is about 100 bytes.
const MAX_KEY_FILE: u64 = 4096;

/// Result of this module's functions.
pub type Result<T, E = SigningError> = std::result::Result<T, E>;

/// Why a key or a signed note cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key name that is empty or contains `+` or whitespace.
    #[error("invalid key name {name:?}: it must be non-empty, without '+' or whitespace")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A key text without the expected fields (the text itself is not repeated: it may be
    /// a private key).
    #[error("malformed {kind} key: {reason}")]
    MalformedKey {
        /// "signer" or "verifier".
        kind: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A key of another algorithm than Ed25519.
    #[error("{kind} key {name}: unsupported algorithm {alg:#04x} (only Ed25519, 0x01)")]
    UnsupportedAlgorithm {
        /// "signer" or "verifier".
        kind: &'static str,
        /// The key's name.
        name: String,
        /// The algorithm byte.
        alg: u8,
    },
    /// The key id written in a key text is not the one of its key.
    #[error(
        "{kind} key {name}: key id {} does not match the key (its key id is {})",
        key_id_hex(stated),
        key_id_hex(computed)
    )]
    KeyIdMismatch {
        /// "signer" or "verifier".
        kind: &'static str,
        /// The key's name.
        name: String,
        /// The key id in the text.
        stated: [u8; 4],
        /// The key id of the key.
        computed: [u8; 4],
    },
    /// Text that is not a well-formed signed note, or note text that cannot be signed.
    #[error("malformed note: {reason}")]
    MalformedNote {
        /// What is wrong.
        reason: String,
    },
    /// A signature line whose signature is not Ed25519 (4 bytes of key id and 64 of
    /// signature); such notes are valid in the C2SP format but not supported here.
    #[error("signature by {name}: {len} bytes, not a key id and an Ed25519 signature (68 bytes)")]
    UnsupportedSignature {
        /// The signer's name.
        name: String,
        /// Length of the decoded signature, key id included.
        len: usize,
    },
    /// The note has no signature by the key.
    #[error(
        "no signature by key {name}+{}{}",
        key_id_hex(key_id),
        signed_by(signers)
    )]
    NotSigned {
        /// The key's name.
        name: String,
        /// The key's id.
        key_id: [u8; 4],
        /// The signatures present, as `name+keyid`.
        signers: Vec<String>,
    },
    /// A signature by the key that does not verify: the text or the signature was changed.
    #[error(
        "invalid signature by key {name}+{}: the note's text or signature was altered",
        key_id_hex(key_id)
    )]
    BadSignature {
        /// The key's name.
        name: String,
        /// The key's id.
        key_id: [u8; 4],
    },
    /// A private key file that group or others may access.
    #[error("{} is accessible by others (mode {mode:04o}): chmod 600 {}", path.display(), path.display())]
    KeyFileMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file whose content is not a usable key.
    #[error("{}: not a usable key", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<SigningError>,
    },
    /// A key file that already exists, and is never overwritten.
    #[error("{} already exists: refusing to overwrite a key", path.display())]
    KeyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing a key file or its directory failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done ("open", "read", "create", "write", "fsync", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The operating system gave no random bytes for a new key.
    #[error("cannot get random bytes for a new key")]
    Random {
        /// The error of the random source.
        #[source]
        source: io::Error,
    },
}

fn signed_by(signers: &[String]) -> String {
    if signers.is_empty() {
        String::new()
    } else {
        format!(" (signed by {})", signers.join(", "))
    }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SigningError {
    move |source| SigningError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A key id as 8 lowercase hex digits.
#[must_use]
pub fn key_id_hex(key_id: &[u8; 4]) -> String {
    format!("{:08x}", u32::from_be_bytes(*key_id))
}

/// Whether `name` can name a key: non-empty, no `+`, no (Unicode) whitespace.
#[must_use]
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

fn check_name(name: &str) -> Result<()> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(SigningError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// The key id of an Ed25519 public key named `name`.
fn key_id_of(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// `<alg> || key` in base64.
fn encode_key(bytes: &[u8; 32]) -> String {
    let mut v = [0u8; 33];
    v[0] = ALG_ED25519;
    v[1..].copy_from_slice(bytes);
    BASE64.encode(v)
}

/// The fields after the name of a key text: key id and the 32 key bytes.
fn parse_key_fields(kind: &'static str, name: &str, rest: &str) -> Result<([u8; 4], [u8; 32])> {
    let malformed = |reason| SigningError::MalformedKey { kind, reason };
    check_name(name)?;
    let (hex, b64) = rest
        .split_once('+')
        .ok_or_else(|| malformed("missing key id or key"))?;
    let key_id = parse_key_id(hex).ok_or_else(|| malformed("key id is not 8 hex digits"))?;
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| malformed("key is not base64"))?;
    match bytes.split_first() {
        None => Err(malformed("empty key")),
        Some((&ALG_ED25519, key)) => key
            .try_into()
            .map(|k| (key_id, k))
            .map_err(|_| malformed("an Ed25519 key has 32 bytes")),
        Some((&alg, _)) => Err(SigningError::UnsupportedAlgorithm {
            kind,
            name: name.to_owned(),
            alg,
        }),
    }
}

fn parse_key_id(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(u32::to_be_bytes)
}

/// A private Ed25519 key with its name: signs checkpoints and other notes.
///
/// Its text form (see [`SignerKey::to_text`]) is secret; `Debug` shows only the name and id.
#[derive(Clone)]
pub struct SignerKey {
    name: String,
    key_id: [u8; 4],
    key: SigningKey,
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerKey")
            .field("name", &self.name)
            .field("key_id", &key_id_hex(&self.key_id))
            .finish_non_exhaustive()
    }
}

impl SignerKey {
    /// A new random key named `name` (the seed comes from the operating system).
    pub fn generate(name: &str) -> Result<Self> {
        check_name(name)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SigningError::Random {
            source: e.raw_os_error().map_or_else(
                || io::Error::other(e.to_string()),
                io::Error::from_raw_os_error,
            ),
        })?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(Self::from_key(name, key))
    }

    fn from_key(name: &str, key: SigningKey) -> Self {
        Self {
            name: name.to_owned(),
            key_id: key_id_of(name, &key.verifying_key()),
            key,
        }
    }

    /// Parses a signer key text, `PRIVATE+KEY+<name>+<key id>+<base64>`, checking that the
    /// key id is the one of the key. Errors never repeat the text.
    pub fn parse(text: &str) -> Result<Self> {
        const KIND: &str = "signer";
        let rest = text
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or(SigningError::MalformedKey {
                kind: KIND,
                reason: "it does not start with PRIVATE+KEY+ (a public key was given?)",
            })?;
        let (name, rest) = rest.split_once('+').ok_or(SigningError::MalformedKey {
            kind: KIND,
            reason: "missing key id or key",
        })?;
        let (stated, seed) = parse_key_fields(KIND, name, rest)?;
        let key = Self::from_key(name, SigningKey::from_bytes(&seed));
        if key.key_id != stated {
            return Err(SigningError::KeyIdMismatch {
                kind: KIND,
                name: name.to_owned(),
                stated,
                computed: key.key_id,
            });
        }
        Ok(key)
    }

    /// Reads a signer key from a file (its text, surrounding whitespace ignored). Refuses a
    /// file that group or others may access (`mode & 0o077 != 0`).
    pub fn load(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(io_error("open", path))?;
        let meta = f.metadata().map_err(io_error("stat", path))?;
        let text = read_key_file(&mut f, path)?;
        let text = text.trim();
        let key_file = |e| SigningError::KeyFile {
            path: path.to_owned(),
            source: Box::new(e),
        };
        // A public key given by mistake is named as such rather than refused for its mode.
        if !text.starts_with(PRIVATE_PREFIX) {
            return Err(key_file(Self::parse(text).unwrap_err()));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SigningError::KeyFileMode {
                path: path.to_owned(),
                mode,
            });
        }
        Self::parse(text).map_err(key_file)
    }

    /// The key's text, `PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>`. Secret.
    #[must_use]
    pub fn to_text(&self) -> String {
        format!(
            "{PRIVATE_PREFIX}{}+{}+{}",
            self.name,
            key_id_hex(&self.key_id),
            encode_key(self.key.as_bytes())
        )
    }

    /// The key's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id (first 4 bytes of SHA-256 of the name and the public key).
    #[must_use]
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The matching public key.
    #[must_use]
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// Signs note text `text` (which must end in a newline and hold no control characters but
    /// newlines).
    pub fn sign_text(&self, text: &str) -> Result<NoteSignature> {
        check_text(text)?;
        Ok(NoteSignature {
            name: self.name.clone(),
            key_id: self.key_id,
            signature: self.key.sign(text.as_bytes()).to_bytes(),
        })
    }
}

fn read_key_file(f: &mut File, path: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    let bad = |reason| SigningError::KeyFile {
        path: path.to_owned(),
        source: Box::new(SigningError::MalformedKey {
            kind: "key file",
            reason,
        }),
    };
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(bad("larger than 4096 bytes"));
    }
    String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))
}

/// A public Ed25519 key with its name: checks signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_id: [u8; 4],
    key: VerifyingKey,
}

impl VerifierKey {
    /// Parses a verifier key text, `<name>+<key id>+<base64(0x01 || key)>`, checking that the
    /// key id is the one of the key.
    pub fn parse(text: &str) -> Result<Self> {
        const KIND: &str = "verifier";
        if text.starts_with(PRIVATE_PREFIX) {
            return Err(SigningError::MalformedKey {
                kind: KIND,
                reason: "this is a private key: give the public key (nattrace.pub)",
            });
        }
        let (name, rest) = text.split_once('+').ok_or(SigningError::MalformedKey {
            kind: KIND,
            reason: "missing key id or key",
        })?;
        let (stated, bytes) = parse_key_fields(KIND, name, rest)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| SigningError::MalformedKey {
            kind: KIND,
            reason: "not an Ed25519 public key",
        })?;
        let computed = key_id_of(name, &key);
        if computed != stated {
            return Err(SigningError::KeyIdMismatch {
                kind: KIND,
                name: name.to_owned(),
                stated,
                computed,
            });
        }
        Ok(Self {
            name: name.to_owned(),
            key_id: computed,
            key,
        })
    }

    /// Reads a verifier key from a file holding its text (surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(io_error("open", path))?;
        let text = read_key_file(&mut f, path)?;
        Self::parse(text.trim()).map_err(|e| SigningError::KeyFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// The key's text, `<name>+<key id>+<base64(0x01 || key)>`.
    #[must_use]
    pub fn to_text(&self) -> String {
        format!(
            "{}+{}+{}",
            self.name,
            key_id_hex(&self.key_id),
            encode_key(self.key.as_bytes())
        )
    }

    /// The key's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id (first 4 bytes of SHA-256 of the name and the public key).
    #[must_use]
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// Checks that `signature` is this key's signature of `text`. A signature naming another
    /// key is [`SigningError::NotSigned`], one that does not verify
    /// [`SigningError::BadSignature`].
    pub fn verify_text(&self, text: &str, signature: &NoteSignature) -> Result<()> {
        if signature.name != self.name || signature.key_id != self.key_id {
            return Err(SigningError::NotSigned {
                name: self.name.clone(),
                key_id: self.key_id,
                signers: vec![signature.signer()],
            });
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.signature);
        self.key
            .verify_strict(text.as_bytes(), &sig)
            .map_err(|_| SigningError::BadSignature {
                name: self.name.clone(),
                key_id: self.key_id,
            })
    }
}

/// One signature line of a note: `— <name> <base64(key id || signature)>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteSignature {
    /// Name of the signing key.
    pub name: String,
    /// Id of the signing key.
    pub key_id: [u8; 4],
    /// Ed25519 signature of the note's text.
    pub signature: [u8; 64],
}

impl NoteSignature {
    /// `name+keyid`, as in messages.
    #[must_use]
    pub fn signer(&self) -> String {
        format!("{}+{}", self.name, key_id_hex(&self.key_id))
    }

    /// The signature line, without its newline.
    fn line(&self) -> String {
        let mut raw = [0u8; 68];
        raw[..4].copy_from_slice(&self.key_id);
        raw[4..].copy_from_slice(&self.signature);
        format!("{SIG_PREFIX}{} {}", self.name, BASE64.encode(raw))
    }

    /// Parses a signature line (without its newline).
    fn parse_line(line: &str, number: usize) -> Result<Self> {
        let malformed = |what: &str| SigningError::MalformedNote {
            reason: format!("signature line {number}: {what}"),
        };
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or_else(|| malformed("does not start with \"\u{2014} \""))?;
        let (name, b64) = rest.split_once(' ').unwrap_or((rest, ""));
        if !is_valid_name(name) {
            return Err(malformed("invalid key name"));
        }
        let raw = BASE64
            .decode(b64)
            .map_err(|_| malformed("signature is not base64"))?;
        if raw.len() < 5 {
            return Err(malformed("signature too short"));
        }
        if raw.len() != 68 {
            return Err(SigningError::UnsupportedSignature {
                name: name.to_owned(),
                len: raw.len(),
            });
        }
        let mut key_id = [0u8; 4];
        key_id.copy_from_slice(&raw[..4]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&raw[4..]);
        Ok(Self {
            name: name.to_owned(),
            key_id,
            signature,
        })
    }
}

/// Checks that `text` can be the text of a note: ends in a newline, no control characters
/// but newlines.
fn check_text(text: &str) -> Result<()> {
    if !text.ends_with('\n') {
        return Err(SigningError::MalformedNote {
            reason: "text does not end with a newline".to_owned(),
        });
    }
    if let Some(c) = text.chars().find(|&c| c < ' ' && c != '\n') {
        return Err(SigningError::MalformedNote {
            reason: format!("text has control character {:#04x}", u32::from(c)),
        });
    }
    Ok(())
}

/// A signed note: text and the signatures of it, in their order in the encoded note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The signed text, ending in a newline.
    pub text: String,
    /// The signatures, including those by keys not known here.
    pub signatures: Vec<NoteSignature>,
}

impl Note {
    /// Parses an encoded signed note, as strictly as Go's `note.Open`: no control characters
    /// but newlines, the text ends with a newline, an empty line, then only signature lines
    /// (at least one, at most 100), each ending with a newline. Signatures are not checked.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(c) = s.chars().find(|&c| c < ' ' && c != '\n') {
            return Err(SigningError::MalformedNote {
                reason: format!("control character {:#04x}", u32::from(c)),
            });
        }
        let split = s.rfind("\n\n").ok_or_else(|| SigningError::MalformedNote {
            reason: "no empty line before the signatures".to_owned(),
        })?;
        let (text, sigs) = (&s[..=split], &s[split + 2..]);
        let Some(sigs) = sigs.strip_suffix('\n') else {
            return Err(SigningError::MalformedNote {
                reason: if sigs.is_empty() {
                    "no signatures".to_owned()
                } else {
                    "last signature line does not end with a newline".to_owned()
                },
            });
        };
        let mut signatures = Vec::new();
        for (i, line) in sigs.split('\n').enumerate() {
            if i == MAX_SIGNATURES {
                return Err(SigningError::MalformedNote {
                    reason: format!("more than {MAX_SIGNATURES} signatures"),
                });
            }
            signatures.push(NoteSignature::parse_line(line, i + 1)?);
        }
        Ok(Self {
            text: text.to_owned(),
            signatures,
        })
    }

    /// The encoded note: the text, an empty line, and one line per signature. A note without
    /// signatures encodes as its text and an empty line (as Go's `note.Sign`), which
    /// [`Note::parse`] refuses.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(self.text.len() + 1 + 100 * self.signatures.len());
        s.push_str(&self.text);
        s.push('\n');
        for sig in &self.signatures {
            s.push_str(&sig.line());
            s.push('\n');
        }
        s
    }

    /// Checks that the note carries a valid signature by `key` (same name and key id):
    /// [`SigningError::NotSigned`] if there is none, [`SigningError::BadSignature`] if a
    /// signature claiming to be by `key` does not verify, [`SigningError::MalformedNote`] if the
    /// text could not have been signed.
    pub fn verify(&self, key: &VerifierKey) -> Result<()> {
        check_text(&self.text)?;
        let mut found = false;
        for sig in self
            .signatures
            .iter()
            .filter(|s| s.name == key.name && s.key_id == key.key_id)
        {
            key.verify_text(&self.text, sig)?;
            found = true;
        }
        if found {
            Ok(())
        } else {
            Err(SigningError::NotSigned {
                name: key.name.clone(),
                key_id: key.key_id,
                signers: self.signatures.iter().map(NoteSignature::signer).collect(),
            })
        }
    }

    /// Whether the note carries a signature (valid or not) by a key named `name`.
    #[must_use]
    pub fn has_signature_by(&self, name: &str) -> bool {
        self.signatures.iter().any(|s| s.name == name)
    }

    /// Signs the note with `key`, replacing any signature by the same key (name and id), after
    /// the other signatures.
    pub fn add_signature(&mut self, key: &SignerKey) -> Result<()> {
        let sig = key.sign_text(&self.text)?;
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(SigningError::MalformedNote {
                reason: format!("already {MAX_SIGNATURES} signatures"),
            });
        }
        self.signatures
            .retain(|s| s.name != sig.name || s.key_id != sig.key_id);
        self.signatures.push(sig);
        Ok(())
    }
}

/// A note with text `text` signed by `key`.
pub fn sign(text: &str, key: &SignerKey) -> Result<Note> {
    Ok(Note {
        text: text.to_owned(),
        signatures: vec![key.sign_text(text)?],
    })
}

/// Writes `key` as `DIR/nattrace.key` (mode 0600) and its public key as `DIR/nattrace.pub`
/// (mode 0644), each its text and a newline, creating `DIR` (mode 0700) if missing. Never
/// overwrites: if either file exists, [`SigningError::KeyExists`] and nothing is written.
/// Returns the paths of the private and the public key.
pub fn write_key_pair(dir: &Path, key: &SignerKey) -> Result<(PathBuf, PathBuf)> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", dir))?;
    }
    let key_path = dir.join(SIGNER_KEY_FILE);
    let pub_path = dir.join(VERIFIER_KEY_FILE);
    for p in [&key_path, &pub_path] {
        if p.symlink_metadata().is_ok() {
            return Err(SigningError::KeyExists { path: p.clone() });
        }
    }
    write_new(&key_path, &key.to_text(), 0o600)?;
    if let Err(e) = write_new(&pub_path, &key.verifier().to_text(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync", dir))?;
    Ok((key_path, pub_path))
}

/// Creates `path` (never overwriting) with exactly `mode`, whatever the umask, and writes
/// `text` and a newline to it, durably.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                SigningError::KeyExists {
                    path: path.to_owned(),
                }
            } else {
                io_error("create", path)(e)
            }
        })?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error("chmod", path))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(io_error("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors of golang.org/x/mod/sumdb/note, note_test.go.
    const PETER_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                        then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";
    // The example of the C2SP signed-note specification.
    const C2SP_VKEY: &str = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
    const C2SP_NOTE: &str = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";

    fn peter_note() -> String {
        format!("{TEXT}\n{PETER_SIG}")
    }

    #[test]
    fn go_signer_key_signs_exactly_as_go() {
        let key = SignerKey::parse(PETER_SKEY).unwrap();
        assert_eq!(key.name(), "PeterNeumann");
        assert_eq!(key.key_id(), [0xc7, 0x4f, 0x20, 0xa3]);
        assert_eq!(key.to_text(), PETER_SKEY);
        assert_eq!(key.verifier().to_text(), PETER_VKEY);
        // Ed25519 is deterministic: the same signature as Go's note.Sign.
        let note = sign(TEXT, &key).unwrap();
        assert_eq!(note.encode(), peter_note());
    }

    #[test]
    fn go_signed_notes_verify() {
        let peter = VerifierKey::parse(PETER_VKEY).unwrap();
        let enoch = VerifierKey::parse(ENOCH_VKEY).unwrap();
        assert_eq!(peter.to_text(), PETER_VKEY);
        assert_eq!(enoch.to_text(), ENOCH_VKEY);
        let encoded = format!("{TEXT}\n{PETER_SIG}{ENOCH_SIG}");
        let note = Note::parse(&encoded).unwrap();
        assert_eq!(note.text, TEXT);
        assert_eq!(note.signatures.len(), 2);
        assert_eq!(note.signatures[1].signer(), "EnochRoot+af0cfe78");
        note.verify(&peter).unwrap();
        note.verify(&enoch).unwrap();
        assert_eq!(note.encode(), encoded);

        let c2sp = VerifierKey::parse(C2SP_VKEY).unwrap();
        let note = Note::parse(C2SP_NOTE).unwrap();
        note.verify(&c2sp).unwrap();
        assert_eq!(note.encode(), C2SP_NOTE);
    }

    #[test]
    fn generated_keys_round_trip() {
        let key = SignerKey::generate("nat-gw1.example.net").unwrap();
        let again = SignerKey::parse(&key.to_text()).unwrap();
        assert_eq!(again.to_text(), key.to_text());
        assert_eq!(again.key_id(), key.key_id());
        let vkey = VerifierKey::parse(&key.verifier().to_text()).unwrap();
        assert_eq!(vkey, key.verifier());
        assert_ne!(
            SignerKey::generate("nat-gw1.example.net")
                .unwrap()
                .to_text(),
            key.to_text()
        );

        let mut note = sign("nattrace/00\n1\n", &key).unwrap();
        let parsed = Note::parse(&note.encode()).unwrap();
        assert_eq!(parsed, note);
        parsed.verify(&vkey).unwrap();

        // A second signer; re-signing by the first replaces its signature, keeps the other.
        let other = SignerKey::generate("auditor").unwrap();
        note.add_signature(&other).unwrap();
        note.add_signature(&key).unwrap();
        assert_eq!(note.signatures.len(), 2);
        assert_eq!(note.signatures[0].name, "auditor");
        let parsed = Note::parse(&note.encode()).unwrap();
        parsed.verify(&vkey).unwrap();
        parsed.verify(&other.verifier()).unwrap();
        assert!(parsed.has_signature_by("auditor"));
        assert!(!parsed.has_signature_by("nobody"));
    }

    #[test]
    fn text_with_blank_lines_round_trips() {
        let key = SignerKey::generate("k").unwrap();
        for text in ["\n", "a\n\n", "a\n\nb\n", "a\n\n\n", "\u{2014} k x\n"] {
            let note = sign(text, &key).unwrap();
            let parsed = Note::parse(&note.encode()).unwrap();
            assert_eq!(parsed, note, "{text:?}");
            parsed.verify(&key.verifier()).unwrap();
        }
    }

    #[test]
    fn tampering_is_detected() {
        let peter = VerifierKey::parse(PETER_VKEY).unwrap();
        let good = Note::parse(&peter_note()).unwrap();

        let mut text = good.clone();
        text.text = text.text.replace("cryptography", "cryptograph");
        assert!(matches!(
            text.verify(&peter),
            Err(SigningError::BadSignature { .. })
        ));

        let mut sig = good.clone();
        sig.signatures[0].signature[10] ^= 1;
        let e = sig.verify(&peter).unwrap_err();
        assert!(matches!(e, SigningError::BadSignature { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "invalid signature by key PeterNeumann+c74f20a3: the note's text or signature was altered"
        );

        let mut id = good.clone();
        id.signatures[0].key_id[0] ^= 1;
        let e = id.verify(&peter).unwrap_err();
        assert!(matches!(e, SigningError::NotSigned { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "no signature by key PeterNeumann+c74f20a3 (signed by PeterNeumann+c64f20a3)"
        );

        let mut name = good.clone();
        name.signatures[0].name = "Peter".to_owned();
        assert!(matches!(
            name.verify(&peter),
            Err(SigningError::NotSigned { .. })
        ));

        // A valid signature by the key does not excuse an invalid one beside it.
        let mut dup = good.clone();
        dup.signatures.push(sig.signatures[0].clone());
        assert!(matches!(
            dup.verify(&peter),
            Err(SigningError::BadSignature { .. })
        ));

        // The signature of another key does not verify under this one's name and id.
        let key = SignerKey::generate("PeterNeumann").unwrap();
        let mut forged = sign(TEXT, &key).unwrap();
        forged.signatures[0].key_id = peter.key_id();
        assert!(matches!(
            forged.verify(&peter),
            Err(SigningError::BadSignature { .. })
        ));

        let mut unsigned = good;
        unsigned.signatures.clear();
        assert_eq!(
            unsigned.verify(&peter).unwrap_err().to_string(),
            "no signature by key PeterNeumann+c74f20a3"
        );
    }

    #[test]
    fn malformed_notes_are_refused() {
        let sig = PETER_SIG;
        let bad = [
            TEXT.to_owned(),
            format!("{TEXT}\n"),
            format!("{TEXT}\n{}", &sig[..sig.len() - 1]),
            format!("\x01{TEXT}\n{sig}"),
            format!("{TEXT}\r\n{sig}"),
            format!(
                "{TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
            ),
            format!("{TEXT}\n{sig}Unexpected line.\n"),
            format!("{TEXT}\n{sig}\n"),
            format!(
                "{TEXT}\n- PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
            ),
            format!("{TEXT}\n\u{2014} PeterNeumann\n"),
            format!("{TEXT}\n\u{2014} PeterNeumann AAAA\n"),
            format!("{TEXT}\n\u{2014} PeterNeumann x08go/ZJ kuBS9UG\n"),
            format!("{TEXT}\n{}", sig.repeat(101)),
        ];
        for s in &bad {
            let e = Note::parse(s).unwrap_err();
            assert!(
                matches!(e, SigningError::MalformedNote { .. }),
                "{s:?}: {e}"
            );
        }
        // 100 signatures are fine.
        Note::parse(&format!("{TEXT}\n{}", sig.repeat(100))).unwrap();
        // A valid C2SP signature that is not Ed25519 (here, 71 bytes) is named as such.
        let long = format!("{TEXT}\n{}ABCD{}", &sig[..60], &sig[60..]);
        assert!(matches!(
            Note::parse(&long),
            Err(SigningError::UnsupportedSignature { len: 71, .. })
        ));
        // Text that cannot be encoded is refused when signing.
        let key = SignerKey::parse(PETER_SKEY).unwrap();
        for text in ["", "no newline", "tab\there\n"] {
            assert!(matches!(
                sign(text, &key),
                Err(SigningError::MalformedNote { .. })
            ));
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        // As Go's TestNewVerifier / TestNewSigner: every strict substring and every
        // single-byte increment is refused.
        for text in [PETER_VKEY, PETER_SKEY] {
            let parse = |s: &str| {
                if text == PETER_SKEY {
                    SignerKey::parse(s).map(|_| ())
                } else {
                    VerifierKey::parse(s).map(|_| ())
                }
            };
            let b = text.as_bytes();
            for i in 0..=b.len() {
                for j in i + 1..=b.len() {
                    if (i, j) != (0, b.len()) {
                        assert!(parse(&text[i..j]).is_err(), "{}", &text[i..j]);
                    }
                }
            }
            for i in 0..b.len() {
                let mut m = b.to_vec();
                m[i] += 1;
                let s = String::from_utf8(m).unwrap();
                assert!(parse(&s).is_err(), "{s}");
            }
        }
        // Wrong length and unknown algorithm, with key ids adjusted.
        assert!(matches!(
            VerifierKey::parse(
                "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
            ),
            Err(SigningError::MalformedKey { .. })
        ));
        assert!(matches!(
            VerifierKey::parse(
                "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
            ),
            Err(SigningError::UnsupportedAlgorithm { alg: 0x65, .. })
        ));
        // Each kind of key given where the other is expected.
        let e = VerifierKey::parse(PETER_SKEY).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        let e = SignerKey::parse(PETER_VKEY).unwrap_err().to_string();
        assert!(e.contains("PRIVATE+KEY+"), "{e}");
        // Upper-case key ids are accepted, as by Go.
        VerifierKey::parse(&PETER_VKEY.replace("c74f20a3", "C74F20A3")).unwrap();
        // Errors about a private key never show its secret part.
        let e = SignerKey::parse(&PETER_SKEY.replace("c74f20a3", "c74f20a4")).unwrap_err();
        assert!(!e.to_string().contains("AYEKFALV"), "{e}");
        assert!(matches!(
            SignerKey::generate("a b"),
            Err(SigningError::InvalidName { .. })
        ));
        assert!(SignerKey::generate("a+b").is_err());
        assert!(SignerKey::generate("").is_err());
        assert!(SignerKey::generate("a\u{a0}b").is_err());
    }

    #[test]
    fn private_key_files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, format!("{PETER_SKEY}\n")).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o601] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let e = SignerKey::load(&path).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{p} is accessible by others (mode {mode:04o}): chmod 600 {p}",
                    p = path.display()
                )
            );
        }
        for mode in [0o600, 0o400, 0o700] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(SignerKey::load(&path).unwrap().to_text(), PETER_SKEY);
        }
    }

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys/sub");
        let key = SignerKey::generate("gw1").unwrap();
        let (kp, pp) = write_key_pair(&keys, &key).unwrap();
        assert_eq!(kp, keys.join("nattrace.key"));
        assert_eq!(pp, keys.join("nattrace.pub"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&kp), 0o600);
        assert_eq!(mode(&pp), 0o644);
        assert_eq!(mode(&keys), 0o700);
        assert_eq!(SignerKey::load(&kp).unwrap().to_text(), key.to_text());
        assert_eq!(VerifierKey::load(&pp).unwrap(), key.verifier());
        assert_eq!(
            fs::read_to_string(&pp).unwrap(),
            format!("{}\n", key.verifier().to_text())
        );
        // Never overwritten, whichever file exists.
        let e = write_key_pair(&keys, &SignerKey::generate("gw1").unwrap()).unwrap_err();
        assert!(matches!(e, SigningError::KeyExists { .. }), "{e}");
        assert_eq!(SignerKey::load(&kp).unwrap().to_text(), key.to_text());
        fs::remove_file(&kp).unwrap();
        let e = write_key_pair(&keys, &key).unwrap_err();
        assert!(matches!(e, SigningError::KeyExists { path } if path == pp));
        assert!(!kp.exists());
        // A public key file holding a private key is refused (and not echoed).
        fs::write(&pp, PETER_SKEY).unwrap();
        let e = VerifierKey::load(&pp).unwrap_err();
        assert!(matches!(e, SigningError::KeyFile { .. }), "{e}");
    }
}
