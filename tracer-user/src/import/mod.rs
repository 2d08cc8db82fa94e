//! `nattrace import`: bindings from another tool's log written into a data directory.
//!
//! Two inputs: CSV with a header line ([`csv`], the columns of `nattrace query --format csv`,
//! so an export imports back unchanged) and the text of `conntrack -E -o timestamp,extended`
//! ([`conntrack`], NEW and DESTROY events merged into bindings). Both parsers take one line
//! (or record) at a time, never panic, and give bindings with id 0; [`execute`] gives each an
//! id from the [`Writer`] when it writes it. Bad lines are reported and counted, never fatal.
//!
//! Imported bindings have `start_source` [`StartSource::Import`]. No coverage events are
//! written: an import says nothing about when nattrace was capturing.

pub mod conntrack;
pub mod csv;

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::binding::{Binding, Endpoint, StartSource, Tuple, is_icmp};
use crate::exit::{Status, UserError};
use crate::storage::{SEALED_EXT, SEGMENTS_DIR, StorageError, Writer};

/// Records buffered in the writer between two flushes.
pub const FLUSH_EVERY: usize = 65_536;

/// Bad lines reported one by one on stderr; the rest are only counted.
pub const BAD_LINES_SHOWN: u64 = 10;

/// Input format of `nattrace import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Comma-separated values with a header line naming the columns (those of
    /// `nattrace query --format csv`, in any order).
    Csv,
    /// The text of `conntrack -E -o timestamp,extended` (NEW and DESTROY events are merged).
    Conntrack,
}

/// `nattrace import`: reads bindings from a CSV file or a `conntrack -E` log and writes them
/// into a data directory.
#[derive(Clone, Debug, clap::Args)]
pub struct ImportArgs {
    /// Data directory to write into; created if missing. It must not be in use by a running agent.
    #[arg(long, env = "NATTRACE_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Input format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: InputFormat,
    /// The file to read, or - for standard input.
    #[arg(value_name = "FILE|-")]
    pub input: PathBuf,
    /// Sign the checkpoints of the segments written with this private key
    /// [default: sign_key of DIR/nattrace.toml].
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
}

impl ImportArgs {
    /// The input is standard input (`-`).
    #[must_use]
    pub fn is_stdin(&self) -> bool {
        self.input.as_os_str() == "-"
    }

    /// The input's name in messages: the file name, or `<stdin>`.
    #[must_use]
    pub fn input_name(&self) -> String {
        if self.is_stdin() {
            "<stdin>".to_owned()
        } else {
            self.input.display().to_string()
        }
    }
}

/// Why one input line (or CSV record) could not be imported. The message names the field and
/// the value; the caller prefixes the line number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// The line is longer than the importer reads.
    #[error("line longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A CSV record with another number of fields than the header.
    #[error("{found} fields where the header line has {expected}")]
    FieldCount {
        /// Fields in the record.
        found: usize,
        /// Fields in the header line.
        expected: usize,
    },
    /// A required field is empty.
    #[error("{field} is empty")]
    Empty {
        /// The field (CSV column or conntrack key).
        field: &'static str,
    },
    /// A field that does not parse.
    #[error("{field}: invalid value '{value}': expected {expected}")]
    Invalid {
        /// The field (CSV column or conntrack key).
        field: &'static str,
        /// The value as read (cut at 64 characters).
        value: String,
        /// What would be valid.
        expected: &'static str,
    },
    /// One of two fields that go together is given without the other.
    #[error("{present} is given without {missing}")]
    Unpaired {
        /// The field given.
        present: &'static str,
        /// The field missing.
        missing: &'static str,
    },
    /// The end is before the start.
    #[error("end {end} is before start {start}")]
    EndBeforeStart {
        /// The start as read.
        start: String,
        /// The end as read.
        end: String,
    },
    /// Addresses of both IPv4 and IPv6 in one binding.
    #[error("addresses of different families (IPv4 and IPv6) in one binding")]
    MixedFamilies,
    /// ICMP echo has no destination port.
    #[error("destination_port is {port} but {proto} has no destination port (give 0 or nothing)")]
    IcmpDestinationPort {
        /// The port given.
        port: u16,
        /// "icmp" or "icmpv6".
        proto: &'static str,
    },
    /// A destination port without a destination address.
    #[error("destination_port is {port} but destination_ip is empty")]
    PortWithoutAddress {
        /// The port given.
        port: u16,
    },
    /// The CSV reader rejected the record.
    #[error("malformed CSV: {0}")]
    Csv(String),
    /// A conntrack event without the `[seconds.micros]` prefix of `-o timestamp`.
    #[error("no [timestamp] before the event: record with `conntrack -E -o timestamp,extended`")]
    NoTimestamp,
    /// Not a conntrack event line.
    #[error("not a conntrack event (expected [NEW], [UPDATE] or [DESTROY] after the timestamp)")]
    NotAnEvent,
    /// A conntrack event line that does not have the expected shape.
    #[error("malformed conntrack event: {0}")]
    Malformed(String),
}

/// Cuts a value quoted in a message to 64 characters.
pub(crate) fn quoted(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        value.to_owned()
    } else {
        let mut s: String = value.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

/// An [`LineError::Invalid`] for `value` of `field`.
pub(crate) fn invalid(field: &'static str, value: &str, expected: &'static str) -> LineError {
    LineError::Invalid {
        field,
        value: quoted(value),
        expected,
    }
}

/// The original and reply tuples of an SNAT conntrack entry whose investigator's view
/// ([`Binding::internal`], [`Binding::external`], [`Binding::destination`]) is the given
/// endpoints. `destination` `None` (a mapping-only record, RFC 6888 REQ-12) gives the
/// unspecified address of the internal address's family and port 0.
///
/// For ICMP and ICMPv6 the "ports" are echo identifiers: the original tuple holds the
/// internal identifier, the reply tuple the translated (external) one, both in `src_port`,
/// and the destination port is 0 (the kernel's convention, see [`Tuple`]).
#[must_use]
pub fn snat_tuples(
    proto: u8,
    internal: Endpoint,
    external: Endpoint,
    destination: Option<Endpoint>,
) -> (Tuple, Tuple) {
    let (dst_ip, dst_port) = destination.unwrap_or((unspecified_like(internal.0), 0));
    if is_icmp(proto) {
        (
            Tuple {
                src: internal.0,
                dst: dst_ip,
                src_port: internal.1,
                dst_port: 0,
            },
            Tuple {
                src: dst_ip,
                dst: external.0,
                src_port: external.1,
                dst_port: 0,
            },
        )
    } else {
        (
            Tuple {
                src: internal.0,
                dst: dst_ip,
                src_port: internal.1,
                dst_port,
            },
            Tuple {
                src: dst_ip,
                dst: external.0,
                src_port: dst_port,
                dst_port: external.1,
            },
        )
    }
}

/// 0.0.0.0 or ::, the family of `ip`.
#[must_use]
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// What an import did: the counts of the summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lines read (a CSV record with a quoted line break counts as several).
    pub lines: u64,
    /// Lines that were neither empty nor the CSV header.
    pub content_lines: u64,
    /// Bindings written.
    pub imported: u64,
    /// Of those, bindings without an end.
    pub open: u64,
    /// Lines that could not be imported.
    pub bad: u64,
    /// conntrack events without NAT.
    pub not_nat: u64,
    /// conntrack `[UPDATE]` events and conntrack's own messages.
    pub other_skipped: u64,
    /// Sealed segment files written; `None` if they could not be counted.
    pub segments: Option<u64>,
}

impl Summary {
    /// The exit status: 0 when bindings were imported or there was nothing to import, 1 when
    /// the input had lines but none gave a binding.
    #[must_use]
    pub fn status(&self) -> Status {
        if self.imported == 0 && self.content_lines > 0 {
            Status::NoResults
        } else {
            Status::Ok
        }
    }

    /// The summary line, without the `nattrace: ` prefix.
    #[must_use]
    pub fn line(&self) -> String {
        let plural = |n: u64, word: &str| {
            if n == 1 {
                format!("{n} {word}")
            } else {
                format!("{n} {word}s")
            }
        };
        let skipped = self.not_nat + self.other_skipped;
        let segments = self.segments.map_or_else(String::new, |n| {
            format!(", {} written", plural(n, "segment"))
        });
        format!(
            "import: {} read, {} imported ({} open), {}, {} skipped ({} not NAT, {} update or notice){segments}",
            plural(self.lines, "line"),
            plural(self.imported, "binding"),
            self.open,
            plural(self.bad, "bad line"),
            skipped,
            self.not_nat,
            self.other_skipped,
        )
    }
}

/// Runs `nattrace import`: exit status 0 when bindings were imported (or the input was
/// empty), 1 when the input had lines but none could be imported, 2 for bad input (no CSV
/// header, missing file), 4 when the data directory cannot be written or is in use.
pub fn run(args: &ImportArgs) -> anyhow::Result<Status> {
    let mut stderr = io::stderr();
    let tty = stderr.is_terminal();
    if args.is_stdin() {
        let progress = progress_bar(tty, None);
        let stdin = io::stdin();
        let mut input = stdin.lock();
        execute(args, &mut input, &mut stderr, &progress)
    } else {
        let file = File::open(&args.input).map_err(|e| input_error(args, &e))?;
        let len = file
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len());
        let progress = progress_bar(tty, len);
        let mut input = BufReader::with_capacity(256 << 10, file);
        execute(args, &mut input, &mut stderr, &progress)
    }
}

/// The user error for an input file that cannot be opened.
fn input_error(args: &ImportArgs, e: &io::Error) -> anyhow::Error {
    let name = args.input_name();
    match e.kind() {
        io::ErrorKind::NotFound => UserError::bad_input(format!("{name}: no such file")).into(),
        io::ErrorKind::PermissionDenied => {
            UserError::environment(format!("cannot read {name}: permission denied")).into()
        }
        _ => UserError::environment(format!("cannot read {name}: {e}")).into(),
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise): bytes of `len` (a
/// file), or bytes read so far (standard input), and lines in the message.
#[must_use]
pub fn progress_bar(tty: bool, len: Option<u64>) -> ProgressBar {
    if !tty {
        return ProgressBar::hidden();
    }
    match len {
        Some(len) => {
            let pb = ProgressBar::new(len);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} import [{bar:30}] {bytes}/{total_bytes} {msg} ({eta})",
            ) {
                pb.set_style(style.progress_chars("=> "));
            }
            pb
        }
        None => {
            let pb = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} import {bytes} read {msg}") {
                pb.set_style(style);
            }
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        }
    }
}

/// [`run`] with the input, the stream for messages and the progress bar given: reads
/// `input` in `args.format`, writes the bindings into `args.data_dir`, reports bad lines and
/// the summary on `err`.
pub fn execute(
    args: &ImportArgs,
    input: &mut dyn BufRead,
    err: &mut dyn Write,
    progress: &ProgressBar,
) -> anyhow::Result<Status> {
    let summary = import(args, input, err, progress, FLUSH_EVERY)?;
    progress.finish_and_clear();
    writeln!(err, "nattrace: {}", summary.line())?;
    Ok(summary.status())
}

/// Reads, parses and writes everything, flushing every `flush_every` records; the counts of
/// what happened.
fn import(
    args: &ImportArgs,
    input: &mut dyn BufRead,
    err: &mut dyn Write,
    progress: &ProgressBar,
    flush_every: usize,
) -> anyhow::Result<Summary> {
    let mut ctx = Context {
        sink: Sink::new(&args.data_dir, args.sign_key.as_deref(), flush_every),
        report: Reporter {
            err,
            name: args.input_name(),
            progress,
        },
        summary: Summary::default(),
        progress,
        bytes: 0,
    };
    let result = match args.format {
        InputFormat::Csv => csv::import(input, &mut ctx),
        InputFormat::Conntrack => conntrack::import(input, &mut ctx),
    };
    if let Err(e) = result {
        // Keep what was read before the error: seal it so the next agent need not recover it.
        let written = ctx.summary.imported;
        let _ = ctx.sink.close();
        return Err(if written > 0 && e.downcast_ref::<UserError>().is_none() {
            e.context(format!(
                "import stopped after writing {written} bindings into {}",
                args.data_dir.display()
            ))
        } else {
            e
        });
    }
    ctx.summary.segments = ctx.sink.close()?;
    let hidden = ctx.summary.bad.saturating_sub(BAD_LINES_SHOWN);
    if hidden > 0 {
        ctx.report
            .message(&format!("{hidden} more bad lines not shown"))?;
    }
    Ok(ctx.summary)
}

/// State shared by the format drivers: where bindings go, where messages go, the counts.
pub(crate) struct Context<'a> {
    sink: Sink<'a>,
    report: Reporter<'a>,
    pub(crate) summary: Summary,
    progress: &'a ProgressBar,
    bytes: u64,
}

impl Context<'_> {
    /// The input's name in messages.
    pub(crate) fn input_name(&self) -> &str {
        &self.report.name
    }

    /// Writes a binding (its id is assigned here).
    pub(crate) fn write(&mut self, b: Binding) -> anyhow::Result<()> {
        let open = b.end_ns.is_none();
        self.sink.write(b)?;
        self.summary.imported += 1;
        if open {
            self.summary.open += 1;
        }
        Ok(())
    }

    /// Opens the data directory for writing if not done yet (done at the first line that
    /// parses, so that a directory in use is reported early and garbage writes nothing).
    pub(crate) fn ready(&mut self) -> anyhow::Result<()> {
        self.sink.open()
    }

    /// Counts and reports a bad line.
    pub(crate) fn bad(&mut self, line: u64, e: &LineError) -> io::Result<()> {
        self.summary.bad += 1;
        if self.summary.bad <= BAD_LINES_SHOWN {
            self.report.line(line, &e.to_string())?;
        }
        Ok(())
    }

    /// Prints a warning about a line.
    pub(crate) fn warn(&mut self, line: u64, text: &str) -> io::Result<()> {
        self.report.line(line, &format!("warning: {text}"))
    }

    /// Advances the progress bar to `bytes` read and the current counts.
    pub(crate) fn progress(&mut self, bytes: u64) {
        if bytes.saturating_sub(self.bytes) >= 1 << 20 {
            self.bytes = bytes;
            self.progress.set_position(bytes);
            self.progress.set_message(format!(
                "{} lines, {} bindings",
                self.summary.lines, self.summary.imported
            ));
        }
    }
}

/// Where messages about lines go.
struct Reporter<'a> {
    err: &'a mut dyn Write,
    name: String,
    progress: &'a ProgressBar,
}

impl Reporter<'_> {
    fn line(&mut self, line: u64, text: &str) -> io::Result<()> {
        let (err, name) = (&mut self.err, &self.name);
        self.progress
            .suspend(|| writeln!(err, "nattrace: {name}:{line}: {text}"))
    }

    fn message(&mut self, text: &str) -> io::Result<()> {
        let (err, name) = (&mut self.err, &self.name);
        self.progress
            .suspend(|| writeln!(err, "nattrace: {name}: {text}"))
    }
}

/// The data directory being written, opened on first use.
struct Sink<'a> {
    dir: &'a Path,
    /// `--sign-key`.
    sign_key: Option<&'a Path>,
    writer: Option<Writer>,
    /// Sealed segment files present right after opening (not written by this import).
    sealed_before: Option<HashSet<OsString>>,
    buffered: usize,
    flush_every: usize,
}

impl<'a> Sink<'a> {
    fn new(dir: &'a Path, sign_key: Option<&'a Path>, flush_every: usize) -> Self {
        Self {
            dir,
            sign_key,
            writer: None,
            sealed_before: None,
            buffered: 0,
            flush_every,
        }
    }

    fn open(&mut self) -> anyhow::Result<()> {
        if self.writer.is_none() {
            let config = crate::proportionality::load_config(self.dir)?;
            let signer = config.signer(self.sign_key).map_err(|e| {
                UserError::environment(format!("signing key: {}", crate::storage::error_chain(&e)))
            })?;
            let mut w = open_writer(self.dir)?;
            if let Some(key) = signer {
                w.sign_with(std::sync::Arc::new(key))
                    .map_err(|e| write_error(self.dir, e))?;
            }
            self.sealed_before = sealed_segments(self.dir);
            self.writer = Some(w);
        }
        Ok(())
    }

    fn write(&mut self, mut b: Binding) -> anyhow::Result<()> {
        self.open()?;
        let w = self.writer.as_mut().expect("opened above");
        b.id = w.next_binding_id();
        b.start_source = StartSource::Import;
        w.append_binding(&b);
        self.buffered += 1;
        if self.buffered >= self.flush_every {
            w.flush().map_err(|e| write_error(self.dir, e))?;
            self.buffered = 0;
        }
        Ok(())
    }

    /// Flushes and seals; the number of sealed segments this import wrote (0 when nothing was
    /// written, `None` when they cannot be counted).
    fn close(&mut self) -> anyhow::Result<Option<u64>> {
        let Some(w) = self.writer.take() else {
            return Ok(Some(0));
        };
        w.close().map_err(|e| write_error(self.dir, e))?;
        let before = self.sealed_before.take();
        Ok(before
            .zip(sealed_segments(self.dir))
            .map(|(before, after)| after.iter().filter(|n| !before.contains(*n)).count() as u64))
    }
}

/// Opens the data directory for writing; a directory in use or not writable is a one-line
/// user error (exit status 4).
fn open_writer(dir: &Path) -> anyhow::Result<Writer> {
    Writer::open(dir).map_err(|e| match e {
        StorageError::Locked { pid, .. } => UserError::environment(format!(
            "{} is in use by a running nattrace agent ({}): stop it, or import into another data directory",
            dir.display(),
            pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"))
        ))
        .into(),
        StorageError::PermissionDenied { path } => UserError::environment(format!(
            "cannot write {}: permission denied; run as the data directory's owner or as root",
            path.display()
        ))
        .into(),
        e => anyhow::Error::new(e).context(format!("cannot open {} for writing", dir.display())),
    })
}

fn write_error(dir: &Path, e: StorageError) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot write into {}", dir.display()))
}

/// Names of the sealed segment files of `dir`, or `None` if they cannot be listed.
fn sealed_segments(dir: &Path) -> Option<HashSet<OsString>> {
    let entries = std::fs::read_dir(dir.join(SEGMENTS_DIR)).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| Path::new(n).extension().is_some_and(|x| x == SEALED_EXT))
            .collect(),
    )
}

/// A reader that counts the bytes and line ends passing through it, and tells the line
/// number of a byte offset not yet asked about (the CSV reader's record positions count
/// lines from the end of the previous record, before a CRLF's `\n` and blank lines).
pub(crate) struct Counted<R> {
    inner: R,
    /// Bytes read.
    pub(crate) bytes: u64,
    /// `\n` read.
    pub(crate) newlines: u64,
    /// The last byte read was not `\n`.
    pub(crate) partial: bool,
    /// Offsets of the `\r` and `\n` read (true for `\n`) past the last offset asked about.
    ends: VecDeque<(u64, bool)>,
    /// `\n` before the last offset asked about.
    newlines_before: u64,
}

impl<R: Read> Counted<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            bytes: 0,
            newlines: 0,
            partial: false,
            ends: VecDeque::new(),
            newlines_before: 0,
        }
    }

    /// Lines read so far (a last line without `\n` counts).
    pub(crate) fn lines(&self) -> u64 {
        self.newlines + u64::from(self.partial)
    }

    /// The 1-based line of the first byte at or after `offset` that is not a line end.
    /// Offsets must be asked about in increasing order.
    pub(crate) fn line_of_record_at(&mut self, mut offset: u64) -> u64 {
        while let Some(&(at, newline)) = self.ends.front() {
            if at > offset {
                break;
            }
            if at == offset {
                offset += 1; // a line end where the record is said to start: skip it
            }
            self.newlines_before += u64::from(newline);
            self.ends.pop_front();
        }
        self.newlines_before + 1
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = &buf[..n];
        for (i, &c) in got.iter().enumerate() {
            if c == b'\n' || c == b'\r' {
                self.ends.push_back((self.bytes + i as u64, c == b'\n'));
            }
        }
        self.bytes += n as u64;
        self.newlines += got.iter().filter(|&&c| c == b'\n').count() as u64;
        if let Some(&last) = got.last() {
            self.partial = last != b'\n';
        }
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::binding::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_SRC_NAT,
    };

    pub(crate) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// `rounds` byte-level mutations of `seed` (flip, insert, delete, duplicate a span),
    /// deterministic: a poor man's fuzzing for parsers that must never panic.
    pub(crate) fn mutations(seed: &[u8], rounds: usize, mut f: impl FnMut(&[u8])) {
        const INTERESTING: &[u8] = b" \t\r\n[]=.,:\"0123456789-x\xff\xc3";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % (n.max(1) as u64)).unwrap_or(0)
        };
        let mut input = seed.to_vec();
        for round in 0..rounds {
            if round % 64 == 0 {
                input = seed.to_vec();
            }
            let at = next(input.len() + 1);
            match next(4) {
                0 if at < input.len() => input[at] = INTERESTING[next(INTERESTING.len())],
                1 => input.insert(at.min(input.len()), INTERESTING[next(INTERESTING.len())]),
                2 if at < input.len() => {
                    input.remove(at);
                }
                _ => {
                    let end = (at + next(16)).min(input.len());
                    let span = input[at.min(end)..end].to_vec();
                    let to = next(input.len() + 1);
                    input.splice(to..to, span);
                }
            }
            f(&input);
        }
    }

    /// A binding with the given tuples and nothing else.
    pub(crate) fn with_tuples(proto: u8, (orig, reply): (Tuple, Tuple)) -> Binding {
        Binding {
            id: 0,
            proto,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT | IPS_CONFIRMED,
            orig,
            reply,
            start_ns: 0,
            start_approximate: false,
            start_source: StartSource::Import,
            end_ns: None,
            end_approximate: false,
            orig_counters: None,
            reply_counters: None,
        }
    }

    #[test]
    fn snat_tuples_give_back_the_imported_view_for_tcp_udp_and_icmp() {
        for (proto, iport, eport, dport) in [
            (IPPROTO_TCP, 40000, 20001, 443),
            (IPPROTO_UDP, 5353, 61000, 53),
            (IPPROTO_ICMP, 7, 9, 0),
            (132, 1000, 2000, 3000),
        ] {
            let internal = (ip("100.64.0.10"), iport);
            let external = (ip("203.0.113.7"), eport);
            let destination = (ip("192.0.2.2"), dport);
            let b = with_tuples(
                proto,
                snat_tuples(proto, internal, external, Some(destination)),
            );
            assert_eq!(b.internal(), internal, "proto {proto}");
            assert_eq!(b.external(), external, "proto {proto}");
            assert_eq!(b.destination(), destination, "proto {proto}");
        }
        // ICMP: the kernel keeps both identifiers in src_port, dst_port 0.
        let (o, r) = snat_tuples(
            IPPROTO_ICMPV6,
            (ip("2001:db8::10"), 7),
            (ip("2001:db8:ff::7"), 9),
            Some((ip("2001:db8:1::1"), 0)),
        );
        assert_eq!(
            (o.src_port, o.dst_port, r.src_port, r.dst_port),
            (7, 0, 9, 0)
        );
    }

    #[test]
    fn mapping_only_has_the_unspecified_destination_of_the_family() {
        let b = with_tuples(
            IPPROTO_UDP,
            snat_tuples(
                IPPROTO_UDP,
                (ip("100.64.0.10"), 1),
                (ip("203.0.113.7"), 2),
                None,
            ),
        );
        assert_eq!(b.destination(), (ip("0.0.0.0"), 0));
        assert_eq!(b.internal(), (ip("100.64.0.10"), 1));
        assert_eq!(b.external(), (ip("203.0.113.7"), 2));
        let b = with_tuples(
            IPPROTO_TCP,
            snat_tuples(
                IPPROTO_TCP,
                (ip("2001:db8::10"), 1),
                (ip("2001:db8::7"), 2),
                None,
            ),
        );
        assert_eq!(b.destination(), (ip("::"), 0));
    }

    #[test]
    fn summary_line_and_status() {
        let mut s = Summary {
            lines: 12,
            content_lines: 11,
            imported: 1,
            open: 1,
            bad: 2,
            not_nat: 3,
            other_skipped: 4,
            segments: Some(1),
        };
        assert_eq!(
            s.line(),
            "import: 12 lines read, 1 binding imported (1 open), 2 bad lines, 7 skipped (3 not NAT, 4 update or notice), 1 segment written"
        );
        assert_eq!(s.status(), Status::Ok);
        s.imported = 0;
        assert_eq!(s.status(), Status::NoResults);
        assert_eq!(Summary::default().status(), Status::Ok);
    }

    #[test]
    fn line_numbers_of_csv_records() {
        for (input, lines) in [
            ("h\r\na\r\nb\r\nc\r\n", vec![1, 2, 3, 4]),
            ("h\na\nb\nc", vec![1, 2, 3, 4]),
            ("h\n\na\n\"x\ny\"\n\r\n\nc\n", vec![1, 3, 4, 8]),
        ] {
            let mut r = ::csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(Counted::new(input.as_bytes()));
            let mut rec = ::csv::ByteRecord::new();
            let mut got = Vec::new();
            while r.read_byte_record(&mut rec).unwrap() {
                let at = rec.position().unwrap().byte();
                got.push(r.get_mut().line_of_record_at(at));
            }
            assert_eq!(got, lines, "{input:?}");
        }
    }

    #[test]
    fn counted_reader_counts_lines() {
        let mut r = Counted::new(&b"a\nb\r\nc"[..]);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!((r.bytes, r.lines()), (6, 3));
        let mut r = Counted::new(&b"a\n"[..]);
        r.read_to_string(&mut s).unwrap();
        assert_eq!(r.lines(), 1);
    }

    // ---- execute() against a data directory, read back with storage::read_all ----

    use crate::binding::{Counters, IPS_DST_NAT};
    use crate::output::{Format, write_bindings};
    use crate::storage::read_all;

    const T: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z
    const S: i64 = 1_000_000_000;
    const MS: i64 = 1_000_000;
    const HEADER: &str = "proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,end,packets_out,bytes_out,packets_in,bytes_in";

    fn args(dir: &Path, format: InputFormat) -> ImportArgs {
        ImportArgs {
            sign_key: None,
            data_dir: dir.to_owned(),
            format,
            input: PathBuf::from("-"),
        }
    }

    /// Runs `execute` on `input`; the status (or the error) and what was printed on stderr.
    fn exec(args: &ImportArgs, input: &[u8]) -> (anyhow::Result<Status>, String) {
        let mut err = Vec::new();
        let status = execute(args, &mut &input[..], &mut err, &ProgressBar::hidden());
        (status, String::from_utf8(err).unwrap())
    }

    fn user_error(r: anyhow::Result<Status>) -> UserError {
        let e = r.unwrap_err();
        let u = e
            .chain()
            .find_map(|c| c.downcast_ref::<UserError>())
            .unwrap_or_else(|| panic!("not a user error: {e:#}"));
        UserError {
            status: u.status,
            message: u.message.clone(),
        }
    }

    fn sample_bindings() -> Vec<Binding> {
        let tuple = |src: &str, dst: &str, sp, dp| Tuple {
            src: ip(src),
            dst: ip(dst),
            src_port: sp,
            dst_port: dp,
        };
        let mut tcp = with_tuples(
            IPPROTO_TCP,
            (
                tuple("100.64.0.10", "192.0.2.2", 40000, 443),
                tuple("192.0.2.2", "203.0.113.7", 443, 20001),
            ),
        );
        tcp.id = 4;
        tcp.start_ns = T;
        tcp.end_ns = Some(T + 5 * S + MS);
        tcp.end_approximate = true;
        tcp.zone = 3;
        tcp.mark = 0xffff_ffff;
        tcp.start_source = StartSource::Ring;
        tcp.orig_counters = Some(Counters {
            packets: 10,
            bytes: 1000,
        });
        tcp.reply_counters = Some(Counters {
            packets: 8,
            bytes: 9000,
        });
        let mut icmp = with_tuples(
            IPPROTO_ICMPV6,
            (
                tuple("2001:db8::10", "2001:db8:1::1", 7, 0),
                tuple("2001:db8:1::1", "2001:db8:ff::7", 9, 0),
            ),
        );
        icmp.start_ns = T + MS;
        icmp.start_approximate = true;
        icmp.start_source = StartSource::Dump;
        let mut dnat = with_tuples(
            IPPROTO_UDP,
            (
                tuple("198.51.100.9", "203.0.113.7", 5555, 8080),
                tuple("100.64.0.10", "198.51.100.9", 80, 5555),
            ),
        );
        dnat.status = IPS_DST_NAT;
        dnat.start_ns = T + 2 * MS;
        dnat.end_ns = Some(T + 3 * MS);
        let mut mapping = with_tuples(
            IPPROTO_UDP,
            snat_tuples(
                IPPROTO_UDP,
                (ip("100.64.0.11"), 1),
                (ip("203.0.113.8"), 2),
                None,
            ),
        );
        mapping.start_ns = T + 4 * MS;
        vec![tcp, icmp, dnat, mapping]
    }

    /// Asserts that `stored` (read back from a data directory) holds `expected`, in any order,
    /// ids aside, times to the millisecond (what the on-disk format keeps may be coarser than
    /// nanoseconds).
    fn assert_stored(stored: &[Binding], expected: &[Binding]) {
        let sorted = |v: &[Binding]| {
            let mut v = v.to_vec();
            v.sort_by_key(|b| (b.key(), b.start_ns));
            v
        };
        let (stored, expected) = (sorted(stored), sorted(expected));
        assert_eq!(stored.len(), expected.len(), "{stored:#?}");
        for (s, e) in stored.iter().zip(&expected) {
            assert!((s.start_ns - e.start_ns).abs() < MS, "start {s:?} {e:?}");
            match (s.end_ns, e.end_ns) {
                (Some(a), Some(b)) => assert!((a - b).abs() < MS, "end {s:?} {e:?}"),
                (a, b) => assert_eq!(a, b),
            }
            let untimed = |b: &Binding| Binding {
                id: 0,
                start_ns: 0,
                end_ns: b.end_ns.map(|_| 0),
                ..b.clone()
            };
            assert_eq!(untimed(s), untimed(e));
        }
    }

    fn csv_of(bindings: &[Binding]) -> String {
        let mut out = Vec::new();
        write_bindings(&mut out, Format::Csv, bindings).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The CSV of `bindings` without the columns an import does not keep (id, start_source).
    fn kept_columns(bindings: &[Binding]) -> Vec<String> {
        csv_of(bindings)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                [&f[1..12], &f[13..]].concat().join(",")
            })
            .collect()
    }

    #[test]
    fn query_csv_output_imports_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("new-dir");
        let original = sample_bindings();
        let (status, err) = exec(&args(&data, InputFormat::Csv), csv_of(&original).as_bytes());
        assert_eq!(status.unwrap(), Status::Ok, "{err}");
        assert_eq!(
            err,
            "nattrace: import: 5 lines read, 4 bindings imported (2 open), 0 bad lines, 0 skipped (0 not NAT, 0 update or notice), 1 segment written\n"
        );
        let snap = read_all(&data).unwrap();
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert!(snap.events.is_empty(), "no coverage events");
        let imported = snap.bindings;
        assert_eq!(imported.len(), 4);
        assert!(
            imported
                .iter()
                .all(|b| b.start_source == StartSource::Import)
        );
        let mut ids: Vec<u64> = imported.iter().map(|b| b.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), 4, "fresh distinct ids");
        assert_eq!(kept_columns(&imported), kept_columns(&original));
        // The raw records of SNAT bindings are as captured, but for the start source.
        let snat: Vec<Binding> = original
            .iter()
            .filter(|b| !b.is_dnat_only())
            .map(|b| Binding {
                start_source: StartSource::Import,
                ..b.clone()
            })
            .collect();
        let imported_snat: Vec<Binding> = imported
            .iter()
            .filter(|b| b.proto != IPPROTO_UDP || b.internal().1 != 80)
            .cloned()
            .collect();
        assert_stored(&imported_snat, &snat);
    }

    #[test]
    fn bad_lines_are_reported_with_their_numbers_then_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut input = format!("{HEADER}\r\n");
        input.push_str(
            "tcp,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,2026-11-02T10:14:07Z,,,,,\r\n",
        );
        for i in 0..12 {
            input.push_str(&format!(
                "tcp,100.64.0.10,{},203.0.113.7,20001,192.0.2.2,443,0,,,,,\r\n",
                70000 + i
            ));
        }
        input.push_str("\"udp\",\"100.64.0.11\",1,203.0.113.7,2,,,1793614447,1793614448,1,2,3,4");
        let (status, err) = exec(&args(dir.path(), InputFormat::Csv), input.as_bytes());
        assert_eq!(status.unwrap(), Status::Ok);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 12, "{err}");
        assert_eq!(
            lines[0],
            "nattrace: <stdin>:3: internal_port: invalid value '70000': expected a port 0-65535"
        );
        assert!(lines[9].starts_with("nattrace: <stdin>:12: internal_port: invalid value '70009'"));
        assert_eq!(lines[10], "nattrace: <stdin>: 2 more bad lines not shown");
        assert_eq!(
            lines[11],
            "nattrace: import: 15 lines read, 2 bindings imported (1 open), 12 bad lines, 0 skipped (0 not NAT, 0 update or notice), 1 segment written"
        );
        let snap = read_all(dir.path()).unwrap();
        assert_eq!(snap.bindings.len(), 2);
        let udp = snap
            .bindings
            .iter()
            .find(|b| b.proto == IPPROTO_UDP)
            .unwrap();
        assert_eq!(udp.internal(), (ip("100.64.0.11"), 1));
        assert_eq!(udp.destination(), (ip("0.0.0.0"), 0));
        assert_eq!(
            udp.reply_counters,
            Some(Counters {
                packets: 3,
                bytes: 4
            })
        );
    }

    #[test]
    fn missing_header_columns_are_bad_input_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        let (status, err) = exec(
            &args(&data, InputFormat::Csv),
            b"tcp,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,\n",
        );
        let e = user_error(status);
        assert_eq!(e.status, Status::BadInput);
        assert!(
            e.message.starts_with(
                "<stdin>: the first line is not a CSV header line: it must name the columns, at least proto,internal_ip,"
            ),
            "{}",
            e.message
        );
        assert!(err.is_empty(), "{err}");
        assert!(!data.exists(), "nothing written");
    }

    #[test]
    fn exit_statuses_for_empty_header_only_and_all_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        for format in [InputFormat::Csv, InputFormat::Conntrack] {
            let (status, err) = exec(&args(&data, format), b"");
            assert_eq!(status.unwrap(), Status::Ok);
            assert_eq!(
                err,
                "nattrace: import: 0 lines read, 0 bindings imported (0 open), 0 bad lines, 0 skipped (0 not NAT, 0 update or notice), 0 segments written\n"
            );
        }
        let (status, _) = exec(&args(&data, InputFormat::Conntrack), b"\n\n");
        assert_eq!(status.unwrap(), Status::Ok, "blank lines only");
        let (status, _) = exec(
            &args(&data, InputFormat::Csv),
            format!("{HEADER}\n").as_bytes(),
        );
        assert_eq!(status.unwrap(), Status::Ok, "header only");
        assert!(!data.exists(), "nothing to write, nothing created");
        let (status, err) = exec(
            &args(&data, InputFormat::Csv),
            format!("{HEADER}\nx\n").as_bytes(),
        );
        assert_eq!(status.unwrap(), Status::NoResults);
        assert!(
            err.contains("<stdin>:2: 1 fields where the header line has 13"),
            "{err}"
        );
        let (status, _) = exec(&args(&data, InputFormat::Conntrack), b"garbage\n");
        assert_eq!(status.unwrap(), Status::NoResults);
        let (status, _) = exec(
            &args(&data, InputFormat::Conntrack),
            b"[1.5] [UPDATE] ipv4 2 tcp 6 60 src=1.2.3.4\n",
        );
        assert_eq!(status.unwrap(), Status::NoResults, "nothing importable");
    }

    #[test]
    fn a_directory_in_use_by_an_agent_is_an_environment_error() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Writer::open(dir.path()).unwrap();
        let input =
            format!("{HEADER}\ntcp,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,\n");
        let (status, _) = exec(&args(dir.path(), InputFormat::Csv), input.as_bytes());
        let e = user_error(status);
        assert_eq!(e.status, Status::Environment);
        assert!(
            e.message
                .contains("is in use by a running nattrace agent (pid "),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'));
        agent.close().unwrap();
    }

    #[test]
    fn records_are_flushed_as_they_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut input = format!("{HEADER}\n");
        for port in 1..=10 {
            input.push_str(&format!(
                "udp,100.64.0.10,{port},203.0.113.7,{port},192.0.2.2,53,{port},,,,,\n"
            ));
        }
        let summary = import(
            &args(dir.path(), InputFormat::Csv),
            &mut input.as_bytes(),
            &mut Vec::new(),
            &ProgressBar::hidden(),
            3,
        )
        .unwrap();
        assert_eq!((summary.imported, summary.lines), (10, 11));
        let snap = read_all(dir.path()).unwrap();
        let ports: Vec<u16> = snap.bindings.iter().map(|b| b.internal().1).collect();
        assert_eq!(ports, (1..=10).collect::<Vec<u16>>());
    }

    #[test]
    fn conntrack_log_of_a_lab_imports_its_nat_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let log = include_bytes!("testdata/conntrack-e.txt");
        let (status, err) = exec(&args(dir.path(), InputFormat::Conntrack), log);
        assert_eq!(status.unwrap(), Status::Ok);
        assert_eq!(
            err,
            "nattrace: import: 36 lines read, 7 bindings imported (0 open), 0 bad lines, 22 skipped (2 not NAT, 20 update or notice), 1 segment written\n"
        );
        // The bindings as merged (exact times), in the order they were completed.
        let mut merger = conntrack::Merger::new();
        let mut merged = Vec::new();
        for line in log.split(|&c| c == b'\n') {
            if let Ok(conntrack::CtLine::Event(e)) = conntrack::parse_conntrack_line(line) {
                merger.push(e, &mut merged);
            }
        }
        merger.finish(&mut merged);
        let view: Vec<String> = merged
            .iter()
            .map(|b| {
                format!(
                    "{} {:?} {:?} {:?} {}..{} zone={} mark={}",
                    b.proto,
                    b.internal(),
                    b.external(),
                    b.destination(),
                    b.start_ns,
                    b.end_ns.unwrap(),
                    b.zone,
                    b.mark
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                "17 (100.64.0.10, 58813) (203.0.113.7, 20098) (203.0.113.2, 5000) 1795365323542748000..1795365327723451000 zone=3 mark=0",
                "6 (100.64.0.10, 80) (203.0.113.7, 8080) (203.0.113.2, 49896) 1795365323697137000..1795365327723555000 zone=0 mark=0",
                "6 (100.64.0.10, 54326) (203.0.113.7, 20059) (203.0.113.2, 443) 1795365323542490000..1795365327723565000 zone=0 mark=7",
                "1 (100.64.0.10, 4242) (203.0.113.7, 4242) (203.0.113.2, 0) 1795365323543307000..1795365327723569000 zone=0 mark=0",
                "6 (fd00:64::10, 56700) (2001:db8:1::1, 20013) (2001:db8:1::2, 443) 1795365323542878000..1795365327723572000 zone=0 mark=7",
                "17 (fd00:64::10, 48140) (2001:db8:1::1, 20022) (2001:db8:1::2, 5000) 1795365323542995000..1795365327723577000 zone=3 mark=0",
                "58 (fd00:64::10, 4343) (2001:db8:1::1, 4343) (2001:db8:1::2, 0) 1795365323543319000..1795365327730046000 zone=0 mark=0",
            ]
        );
        assert!(merged.iter().all(|b| !b.start_approximate
            && b.orig_counters.is_some()
            && b.reply_counters.is_some()
            && b.start_source == StartSource::Import));
        assert!(merged[1].is_dnat_only());
        let snap = read_all(dir.path()).unwrap();
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert_stored(&snap.bindings, &merged);
    }

    #[test]
    fn conntrack_bad_lines_and_lost_events_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = b"[1795365323.542490]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=100.64.0.10 dst=203.0.113.2 sport=54326 dport=443 [UNREPLIED] src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20059\n\
WARNING: We have hit ENOBUFS! We are losing events.\n\
    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=100.64.0.10 dst=203.0.113.2 sport=54327 dport=443 [UNREPLIED] src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20060\n";
        let (status, err) = exec(&args(dir.path(), InputFormat::Conntrack), log);
        assert_eq!(status.unwrap(), Status::Ok);
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines[0].starts_with(
                "nattrace: <stdin>:2: warning: conntrack reported lost events (ENOBUFS)"
            ),
            "{err}"
        );
        assert_eq!(
            lines[1],
            "nattrace: <stdin>:3: no [timestamp] before the event: record with `conntrack -E -o timestamp,extended`"
        );
        assert_eq!(
            lines[2],
            "nattrace: import: 3 lines read, 1 binding imported (1 open), 1 bad line, 1 skipped (0 not NAT, 1 update or notice), 1 segment written"
        );
    }

    #[test]
    fn quoted_values_are_cut() {
        assert_eq!(quoted("abc"), "abc");
        let long = "x".repeat(100);
        assert_eq!(quoted(&long).chars().count(), 65);
    }
}
