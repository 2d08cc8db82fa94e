//! Row codec of logs: header, frames and records (FORMAT.md, "Log file"). The active
//! segment is a log (magic `NATTRLOG`); the first format's sealed segments (magic
//! `NATTRSEG`, read only) have the same layout plus a seal frame.
//!
//! Everything here is pure: it turns values into bytes and bytes into values, and never
//! touches a file. The writer and the reader do the I/O.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::binding::{Binding, Counters, StartSource, Tuple};

use super::{CoverageEvent, LossCause};

/// First eight bytes of a segment of the first (row) format, sealed or not: read only.
pub const MAGIC: [u8; 8] = *b"NATTRSEG";
/// First eight bytes of a log: the active segment, sealed into a columnar segment later.
pub const LOG_MAGIC: [u8; 8] = *b"NATTRLOG";
/// The version of both row layouts, the only one this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of the segment header in bytes.
pub const HEADER_LEN: usize = 32;
/// Size of a frame header (`len` and `crc32c`) in bytes.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest compressed payload a reader accepts in one frame.
pub const MAX_FRAME_LEN: u32 = 64 << 20;
/// Largest decompressed payload a reader accepts in one frame.
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
/// The writer starts a new frame once this many uncompressed payload bytes are collected.
pub const TARGET_PAYLOAD_LEN: usize = 4 << 20;
/// zstd level of frame payloads.
pub const ZSTD_LEVEL: i32 = 3;
/// Longest string (Attached backend, Loss detail) the writer stores, in bytes.
pub const MAX_STRING_LEN: usize = 4096;

/// Record kinds (first byte of a record).
pub const KIND_BINDING: u8 = 0x01;
/// Record kind of a binding carried over from the previous segment (open when this log
/// began); the body is a binding's. Logs only.
pub const KIND_CARRIED: u8 = 0x02;
/// Record kind of [`CoverageEvent::AgentStart`].
pub const KIND_AGENT_START: u8 = 0x10;
/// Record kind of [`CoverageEvent::Attached`].
pub const KIND_ATTACHED: u8 = 0x11;
/// Record kind of [`CoverageEvent::Heartbeat`].
pub const KIND_HEARTBEAT: u8 = 0x12;
/// Record kind of [`CoverageEvent::Detached`].
pub const KIND_DETACHED: u8 = 0x13;
/// Record kind of [`CoverageEvent::AgentStop`].
pub const KIND_AGENT_STOP: u8 = 0x14;
/// Record kind of [`CoverageEvent::Loss`].
pub const KIND_LOSS: u8 = 0x15;
/// Record kind of the seal record, alone in the last frame of a sealed segment.
pub const KIND_SEAL: u8 = 0x7F;

/// Size of a record header (`kind` and `len`).
pub const RECORD_HEADER_LEN: usize = 3;
/// Body length of a binding record.
pub const BINDING_BODY_LEN: usize = 145;
/// Body length of a seal record.
pub const SEAL_BODY_LEN: usize = 32;

const FLAG_START_APPROXIMATE: u8 = 1 << 0;
const FLAG_END_APPROXIMATE: u8 = 1 << 1;
const FLAG_HAS_END: u8 = 1 << 2;
const FLAG_HAS_ORIG_COUNTERS: u8 = 1 << 3;
const FLAG_HAS_REPLY_COUNTERS: u8 = 1 << 4;
const KNOWN_FLAGS: u8 = 0x1F;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Why bytes of a segment file are not a valid version-1 segment. The path and file offset
/// are carried by whoever reports it (a `ReadProblem` or `StorageError::Corrupt`).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file is shorter than a segment header.
    #[error("file too short for a segment header ({len} bytes, need {HEADER_LEN})")]
    ShortHeader {
        /// Length of the file.
        len: u64,
    },
    /// The file does not start with the segment magic.
    #[error("not a nattrace segment (bad magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The header names a format version this build does not read.
    #[error("unsupported segment format version {version} (this build reads version {VERSION})")]
    UnsupportedVersion {
        /// The version found in the header.
        version: u32,
    },
    /// The header checksum does not match its contents.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// The checksum stored in the header.
        stored: u32,
        /// The checksum of the header bytes as read.
        computed: u32,
    },
    /// The sequence number in the header differs from the one in the file name.
    #[error("header sequence number {header} does not match file name sequence number {name}")]
    SequenceMismatch {
        /// From the header.
        header: u32,
        /// From the file name.
        name: u32,
    },
    /// Fewer bytes than a frame header remain at the end of the file.
    #[error("incomplete frame header ({available} bytes before end of file)")]
    IncompleteFrameHeader {
        /// Bytes left in the file.
        available: u64,
    },
    /// A frame length of zero or above the limit: the frame boundary is lost.
    #[error("invalid frame length {len} (must be 1..={MAX_FRAME_LEN}); rest of file skipped")]
    FrameLength {
        /// The length field read.
        len: u32,
    },
    /// The frame extends past the end of the file.
    #[error("truncated frame: needs {needed} bytes, {available} before end of file")]
    TruncatedFrame {
        /// Bytes the frame header announces (header included).
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The frame payload does not match its checksum.
    #[error(
        "frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); frame skipped"
    )]
    FrameChecksum {
        /// The checksum in the frame header.
        stored: u32,
        /// The checksum of the payload as read.
        computed: u32,
    },
    /// The payload passed its checksum but is not a valid zstd frame.
    #[error("frame payload does not decompress; frame skipped")]
    Decompress {
        /// The zstd error.
        #[source]
        source: io::Error,
    },
    /// A record header runs past the end of the payload.
    #[error(
        "record at payload offset {payload_offset} runs past the end of the frame; rest of frame skipped"
    )]
    RecordOverrun {
        /// Offset of the record inside the decompressed payload.
        payload_offset: usize,
    },
    /// A record of an unknown kind (skipped).
    #[error("unknown record kind {kind:#04x} at payload offset {payload_offset}; record skipped")]
    UnknownRecordKind {
        /// The kind byte.
        kind: u8,
        /// Offset of the record inside the decompressed payload.
        payload_offset: usize,
    },
    /// A record of a known kind with an invalid body (skipped).
    #[error("invalid {what} record at payload offset {payload_offset}: {reason}; record skipped")]
    BadRecord {
        /// The record kind, in words.
        what: &'static str,
        /// Offset of the record inside the decompressed payload.
        payload_offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A seal record in a frame with other records, or not in the last frame.
    #[error("misplaced seal record (a seal must be alone in the last frame)")]
    MisplacedSeal,
    /// A sealed (`.seg`) file ends without a seal frame.
    #[error("missing seal frame (file truncated?)")]
    MissingSeal,
    /// The counts in the seal record differ from what the file holds.
    #[error(
        "seal counts {sealed_bindings} binding and {sealed_events} event records in {sealed_frames} frames, \
         file holds {bindings}, {events} in {frames}"
    )]
    SealMismatch {
        /// Binding records according to the seal.
        sealed_bindings: u64,
        /// Event records according to the seal.
        sealed_events: u64,
        /// Data frames according to the seal.
        sealed_frames: u64,
        /// Binding records found.
        bindings: u64,
        /// Event records found.
        events: u64,
        /// Data frames found.
        frames: u64,
    },
}

/// The fixed-size header at the start of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `true` for a log (`NATTRLOG`), `false` for the first format (`NATTRSEG`).
    pub log: bool,
    /// Segment sequence number, equal to the number in the file name.
    pub seq: u32,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: i64,
    /// Sequence number of the first segment the writing agent process created.
    pub run: u32,
}

impl Header {
    /// The 32 header bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(if self.log { &LOG_MAGIC } else { &MAGIC });
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.created_ns.to_le_bytes());
        h[24..28].copy_from_slice(&self.run.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks (magic, then version, then checksum) the header at the start of `file`.
    pub fn decode(file: &[u8]) -> Result<Self, FormatError> {
        let Some(h) = file.get(..HEADER_LEN) else {
            return Err(FormatError::ShortHeader {
                len: file.len() as u64,
            });
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[0..8]);
        let log = match magic {
            LOG_MAGIC => true,
            MAGIC => false,
            _ => return Err(FormatError::BadMagic { found: magic }),
        };
        let version = u32_at(h, 8);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let stored = u32_at(h, 28);
        let computed = crc32c::crc32c(&h[0..28]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        Ok(Self {
            log,
            seq: u32_at(h, 12),
            created_ns: i64_at(h, 16),
            run: u32_at(h, 24),
        })
    }
}

/// The counts stored in the seal record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seal {
    /// Binding records in the segment.
    pub binding_records: u64,
    /// Coverage-event records in the segment.
    pub event_records: u64,
    /// Frames before the seal frame.
    pub data_frames: u64,
    /// When the segment was sealed, nanoseconds since the Unix epoch.
    pub sealed_ns: i64,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A binding record.
    Binding(Binding),
    /// A binding carried over from the previous segment.
    Carried(Binding),
    /// A coverage-event record.
    Event(CoverageEvent),
    /// The seal record.
    Seal(Seal),
}

/// Appends one binding record to `out`.
pub fn encode_binding(out: &mut Vec<u8>, b: &Binding) {
    encode_binding_kind(out, KIND_BINDING, b);
}

/// Appends one carried-binding record to `out`.
pub fn encode_carried(out: &mut Vec<u8>, b: &Binding) {
    encode_binding_kind(out, KIND_CARRIED, b);
}

fn encode_binding_kind(out: &mut Vec<u8>, kind: u8, b: &Binding) {
    let start = begin_record(out, kind);
    out.extend_from_slice(&b.id.to_le_bytes());
    out.push(b.proto);
    let mut flags = 0;
    if b.start_approximate {
        flags |= FLAG_START_APPROXIMATE;
    }
    if b.end_approximate {
        flags |= FLAG_END_APPROXIMATE;
    }
    if b.end_ns.is_some() {
        flags |= FLAG_HAS_END;
    }
    if b.orig_counters.is_some() {
        flags |= FLAG_HAS_ORIG_COUNTERS;
    }
    if b.reply_counters.is_some() {
        flags |= FLAG_HAS_REPLY_COUNTERS;
    }
    out.push(flags);
    out.push(b.start_source as u8);
    out.extend_from_slice(&b.zone.to_le_bytes());
    out.extend_from_slice(&b.mark.to_le_bytes());
    out.extend_from_slice(&b.status.to_le_bytes());
    out.extend_from_slice(&b.start_ns.to_le_bytes());
    out.extend_from_slice(&b.end_ns.unwrap_or(0).to_le_bytes());
    encode_tuple(out, &b.orig);
    encode_tuple(out, &b.reply);
    for c in [b.orig_counters, b.reply_counters] {
        let c = c.unwrap_or_default();
        out.extend_from_slice(&c.packets.to_le_bytes());
        out.extend_from_slice(&c.bytes.to_le_bytes());
    }
    end_record(out, start);
}

/// Appends one coverage-event record to `out`. Strings longer than [`MAX_STRING_LEN`] bytes
/// are cut at a character boundary.
pub fn encode_event(out: &mut Vec<u8>, e: &CoverageEvent) {
    match e {
        CoverageEvent::AgentStart { t_ns, pid } => {
            let start = begin_record(out, KIND_AGENT_START);
            out.extend_from_slice(&t_ns.to_le_bytes());
            out.extend_from_slice(&pid.to_le_bytes());
            end_record(out, start);
        }
        CoverageEvent::Attached { t_ns, backend } => {
            let start = begin_record(out, KIND_ATTACHED);
            out.extend_from_slice(&t_ns.to_le_bytes());
            out.extend_from_slice(clip(backend).as_bytes());
            end_record(out, start);
        }
        CoverageEvent::Heartbeat { t_ns } => time_only(out, KIND_HEARTBEAT, *t_ns),
        CoverageEvent::Detached { t_ns } => time_only(out, KIND_DETACHED, *t_ns),
        CoverageEvent::AgentStop { t_ns } => time_only(out, KIND_AGENT_STOP, *t_ns),
        CoverageEvent::Loss {
            t_ns,
            cause,
            count,
            detail,
        } => {
            let start = begin_record(out, KIND_LOSS);
            out.extend_from_slice(&t_ns.to_le_bytes());
            out.push(*cause as u8);
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(clip(detail).as_bytes());
            end_record(out, start);
        }
    }
}

/// Appends the seal record to `out`.
pub fn encode_seal(out: &mut Vec<u8>, s: &Seal) {
    let start = begin_record(out, KIND_SEAL);
    out.extend_from_slice(&s.binding_records.to_le_bytes());
    out.extend_from_slice(&s.event_records.to_le_bytes());
    out.extend_from_slice(&s.data_frames.to_le_bytes());
    out.extend_from_slice(&s.sealed_ns.to_le_bytes());
    end_record(out, start);
}

/// Compresses `payload` and appends the resulting frame (`len`, `crc32c`, zstd bytes) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, payload: &[u8]) -> io::Result<()> {
    let compressed = zstd::bulk::compress(payload, ZSTD_LEVEL)?;
    let len = u32::try_from(compressed.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or_else(|| io::Error::other("frame payload too large"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&compressed).to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(())
}

/// What is at a frame position of a segment file.
#[derive(Debug)]
pub enum FrameAt<'a> {
    /// The end of the file, exactly at a frame boundary.
    End,
    /// A complete frame whose checksum matches; `next` is the offset after it.
    Good {
        /// The compressed payload.
        payload: &'a [u8],
        /// Offset of the next frame.
        next: usize,
    },
    /// A complete frame whose checksum does not match; `next` is the offset after it.
    BadChecksum {
        /// The error to report.
        error: FormatError,
        /// Offset of the next frame (trusting the length field).
        next: usize,
    },
    /// The frame header or frame runs past the end of the file (a torn tail or truncation).
    Incomplete(FormatError),
    /// The length field is zero or too large: the frame boundary is lost.
    BadLength(FormatError),
}

/// Looks at the frame starting at `offset` of `file`.
#[must_use]
pub fn frame_at(file: &[u8], offset: usize) -> FrameAt<'_> {
    let available = file.len().saturating_sub(offset);
    if available == 0 {
        return FrameAt::End;
    }
    if available < FRAME_HEADER_LEN {
        return FrameAt::Incomplete(FormatError::IncompleteFrameHeader {
            available: available as u64,
        });
    }
    let len = u32_at(file, offset);
    if len == 0 || len > MAX_FRAME_LEN {
        return FrameAt::BadLength(FormatError::FrameLength { len });
    }
    let needed = FRAME_HEADER_LEN + len as usize;
    if needed > available {
        return FrameAt::Incomplete(FormatError::TruncatedFrame {
            needed: needed as u64,
            available: available as u64,
        });
    }
    let stored = u32_at(file, offset + 4);
    let payload = &file[offset + FRAME_HEADER_LEN..offset + needed];
    let computed = crc32c::crc32c(payload);
    let next = offset + needed;
    if stored == computed {
        FrameAt::Good { payload, next }
    } else {
        FrameAt::BadChecksum {
            error: FormatError::FrameChecksum { stored, computed },
            next,
        }
    }
}

/// Decompresses a frame payload that passed its checksum. The buffer is sized from the
/// content size in the zstd frame header (written by [`encode_frame`]), at most
/// [`MAX_PAYLOAD_LEN`].
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, FormatError> {
    let err = |msg: &str| FormatError::Decompress {
        source: io::Error::new(io::ErrorKind::InvalidData, msg),
    };
    let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n > MAX_PAYLOAD_LEN as u64 => return Err(err("content size above 64 MiB")),
        Ok(Some(n)) => n as usize,
        Ok(None) => MAX_PAYLOAD_LEN,
        Err(_) => return Err(err("not a zstd frame")),
    };
    zstd::bulk::decompress(payload, capacity).map_err(|source| FormatError::Decompress { source })
}

/// Decodes the records of a decompressed payload. Each record is passed to `on_record`;
/// each invalid record to `on_error` (a record of unknown kind or with a bad body is skipped,
/// a record running past the end of the payload ends decoding).
pub fn decode_records(
    payload: &[u8],
    mut on_record: impl FnMut(Record),
    mut on_error: impl FnMut(FormatError),
) {
    let mut at = 0;
    while at < payload.len() {
        if payload.len() - at < RECORD_HEADER_LEN {
            on_error(FormatError::RecordOverrun { payload_offset: at });
            return;
        }
        let kind = payload[at];
        let len = usize::from(u16::from_le_bytes([payload[at + 1], payload[at + 2]]));
        let body_start = at + RECORD_HEADER_LEN;
        let Some(body) = payload.get(body_start..body_start + len) else {
            on_error(FormatError::RecordOverrun { payload_offset: at });
            return;
        };
        match decode_record(kind, body) {
            Ok(r) => on_record(r),
            Err(Some((what, reason))) => {
                on_error(FormatError::BadRecord {
                    what,
                    payload_offset: at,
                    reason,
                });
            }
            Err(None) => on_error(FormatError::UnknownRecordKind {
                kind,
                payload_offset: at,
            }),
        }
        at = body_start + len;
    }
}

/// Decodes one record body; `Err(None)` for an unknown kind.
fn decode_record(kind: u8, body: &[u8]) -> Result<Record, Option<(&'static str, String)>> {
    let what = match kind {
        KIND_BINDING => "binding",
        KIND_CARRIED => "carried",
        KIND_AGENT_START => "agent_start",
        KIND_ATTACHED => "attached",
        KIND_HEARTBEAT => "heartbeat",
        KIND_DETACHED => "detached",
        KIND_AGENT_STOP => "agent_stop",
        KIND_LOSS => "loss",
        KIND_SEAL => "seal",
        _ => return Err(None),
    };
    decode_known(kind, body).map_err(|reason| Some((what, reason)))
}

fn decode_known(kind: u8, body: &[u8]) -> Result<Record, String> {
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(format!("body is {} bytes, expected {n}", body.len()))
        }
    };
    let at_least = |n: usize| {
        if body.len() >= n {
            Ok(())
        } else {
            Err(format!(
                "body is {} bytes, expected at least {n}",
                body.len()
            ))
        }
    };
    let text =
        |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_owned());
    Ok(match kind {
        KIND_BINDING => {
            exact(BINDING_BODY_LEN)?;
            Record::Binding(decode_binding(body)?)
        }
        KIND_CARRIED => {
            exact(BINDING_BODY_LEN)?;
            Record::Carried(decode_binding(body)?)
        }
        KIND_AGENT_START => {
            exact(12)?;
            Record::Event(CoverageEvent::AgentStart {
                t_ns: i64_at(body, 0),
                pid: u32_at(body, 8),
            })
        }
        KIND_ATTACHED => {
            at_least(8)?;
            Record::Event(CoverageEvent::Attached {
                t_ns: i64_at(body, 0),
                backend: text(&body[8..])?,
            })
        }
        KIND_HEARTBEAT => {
            exact(8)?;
            Record::Event(CoverageEvent::Heartbeat {
                t_ns: i64_at(body, 0),
            })
        }
        KIND_DETACHED => {
            exact(8)?;
            Record::Event(CoverageEvent::Detached {
                t_ns: i64_at(body, 0),
            })
        }
        KIND_AGENT_STOP => {
            exact(8)?;
            Record::Event(CoverageEvent::AgentStop {
                t_ns: i64_at(body, 0),
            })
        }
        KIND_LOSS => {
            at_least(17)?;
            let cause = LossCause::from_u8(body[8])
                .ok_or_else(|| format!("unknown loss cause {}", body[8]))?;
            Record::Event(CoverageEvent::Loss {
                t_ns: i64_at(body, 0),
                cause,
                count: u64_at(body, 9),
                detail: text(&body[17..])?,
            })
        }
        KIND_SEAL => {
            exact(SEAL_BODY_LEN)?;
            Record::Seal(Seal {
                binding_records: u64_at(body, 0),
                event_records: u64_at(body, 8),
                data_frames: u64_at(body, 16),
                sealed_ns: i64_at(body, 24),
            })
        }
        _ => unreachable!("decode_record only passes known kinds"),
    })
}

fn decode_binding(body: &[u8]) -> Result<Binding, String> {
    let flags = body[9];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(format!("unknown flag bits {flags:#04x}"));
    }
    let start_source = StartSource::from_u8(body[10])
        .ok_or_else(|| format!("unknown start source {}", body[10]))?;
    let counters = |at: usize, flag: u8| {
        (flags & flag != 0).then(|| Counters {
            packets: u64_at(body, at),
            bytes: u64_at(body, at + 8),
        })
    };
    Ok(Binding {
        id: u64_at(body, 0),
        proto: body[8],
        zone: u16_at(body, 11),
        mark: u32_at(body, 13),
        status: u32_at(body, 17),
        start_ns: i64_at(body, 21),
        start_approximate: flags & FLAG_START_APPROXIMATE != 0,
        start_source,
        end_ns: (flags & FLAG_HAS_END != 0).then(|| i64_at(body, 29)),
        end_approximate: flags & FLAG_END_APPROXIMATE != 0,
        orig: decode_tuple(&body[37..75])?,
        reply: decode_tuple(&body[75..113])?,
        orig_counters: counters(113, FLAG_HAS_ORIG_COUNTERS),
        reply_counters: counters(129, FLAG_HAS_REPLY_COUNTERS),
    })
}

fn encode_tuple(out: &mut Vec<u8>, t: &Tuple) {
    encode_addr(out, t.src);
    encode_addr(out, t.dst);
    out.extend_from_slice(&t.src_port.to_le_bytes());
    out.extend_from_slice(&t.dst_port.to_le_bytes());
}

fn decode_tuple(b: &[u8]) -> Result<Tuple, String> {
    Ok(Tuple {
        src: decode_addr(&b[0..17])?,
        dst: decode_addr(&b[17..34])?,
        src_port: u16_at(b, 34),
        dst_port: u16_at(b, 36),
    })
}

fn encode_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&v4.to_ipv6_mapped().octets());
        }
        IpAddr::V6(v6) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn decode_addr(b: &[u8]) -> Result<IpAddr, String> {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[1..17]);
    let v6 = Ipv6Addr::from(octets);
    match b[0] {
        FAMILY_V6 => Ok(IpAddr::V6(v6)),
        FAMILY_V4 => v6
            .to_ipv4_mapped()
            .map(|v4: Ipv4Addr| IpAddr::V4(v4))
            .ok_or_else(|| format!("IPv4 address {v6} is not IPv4-mapped")),
        f => Err(format!("unknown address family {f}")),
    }
}

fn time_only(out: &mut Vec<u8>, kind: u8, t_ns: i64) {
    let start = begin_record(out, kind);
    out.extend_from_slice(&t_ns.to_le_bytes());
    end_record(out, start);
}

/// Writes the record header with a placeholder length; returns where the body starts.
fn begin_record(out: &mut Vec<u8>, kind: u8) -> usize {
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.len()
}

/// Fills in the body length of the record whose body starts at `body_start`.
fn end_record(out: &mut [u8], body_start: usize) {
    let len = u16::try_from(out.len() - body_start).expect("record bodies are at most 4113 bytes");
    out[body_start - 2..body_start].copy_from_slice(&len.to_le_bytes());
}

/// `s` cut to at most [`MAX_STRING_LEN`] bytes at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{IPPROTO_TCP, IPPROTO_UDP};

    pub(crate) fn sample(id: u64) -> Binding {
        Binding {
            id,
            proto: IPPROTO_TCP,
            zone: 3,
            mark: 0xdead_beef,
            status: crate::binding::IPS_SRC_NAT,
            orig: Tuple {
                src: "100.64.0.10".parse().unwrap(),
                dst: "2001:db8::2".parse().unwrap(),
                src_port: 40000,
                dst_port: 443,
            },
            reply: Tuple {
                src: "::ffff:192.0.2.2".parse().unwrap(),
                dst: "203.0.113.7".parse().unwrap(),
                src_port: 443,
                dst_port: 40123,
            },
            start_ns: -5,
            start_approximate: true,
            start_source: StartSource::Dump,
            end_ns: Some(i64::MAX),
            end_approximate: false,
            orig_counters: Some(Counters {
                packets: 1,
                bytes: u64::MAX,
            }),
            reply_counters: None,
        }
    }

    fn decode_all(payload: &[u8]) -> (Vec<Record>, Vec<String>) {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        decode_records(payload, |r| records.push(r), |e| errors.push(e.to_string()));
        (records, errors)
    }

    #[test]
    fn binding_record_is_exact_size_and_round_trips() {
        let mut b = sample(7);
        let mut out = Vec::new();
        encode_binding(&mut out, &b);
        assert_eq!(out.len(), RECORD_HEADER_LEN + BINDING_BODY_LEN);
        b.proto = IPPROTO_UDP;
        b.end_ns = None;
        b.orig_counters = None;
        b.reply_counters = Some(Counters {
            packets: 9,
            bytes: 10,
        });
        encode_binding(&mut out, &b);
        let (records, errors) = decode_all(&out);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            records,
            vec![Record::Binding(sample(7)), Record::Binding(b)]
        );
    }

    #[test]
    fn ipv4_and_mapped_ipv6_addresses_stay_distinct() {
        let b = sample(1);
        let mut out = Vec::new();
        encode_binding(&mut out, &b);
        let (records, _) = decode_all(&out);
        let Record::Binding(d) = &records[0] else {
            panic!("not a binding")
        };
        assert!(d.orig.src.is_ipv4());
        assert!(d.reply.src.is_ipv6());
    }

    #[test]
    fn event_records_round_trip_and_long_strings_are_clipped() {
        let events = vec![
            CoverageEvent::AgentStart { t_ns: 1, pid: 42 },
            CoverageEvent::Attached {
                t_ns: 2,
                backend: "ebpf".into(),
            },
            CoverageEvent::Heartbeat { t_ns: 3 },
            CoverageEvent::Detached { t_ns: 4 },
            CoverageEvent::AgentStop { t_ns: 5 },
            CoverageEvent::Loss {
                t_ns: 6,
                cause: LossCause::NetlinkOverrun,
                count: 12,
                detail: "é".repeat(3000),
            },
        ];
        let mut out = Vec::new();
        for e in &events {
            encode_event(&mut out, e);
        }
        let (records, errors) = decode_all(&out);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(records.len(), events.len());
        for (r, e) in records.iter().zip(&events).take(5) {
            assert_eq!(r, &Record::Event(e.clone()));
        }
        let Record::Event(CoverageEvent::Loss { detail, .. }) = &records[5] else {
            panic!("not a loss")
        };
        assert_eq!(detail.len(), MAX_STRING_LEN);
    }

    #[test]
    fn unknown_kinds_and_bad_bodies_are_skipped_overruns_stop() {
        let mut out = vec![0x42, 1, 0, 0xff];
        out.extend_from_slice(&[KIND_HEARTBEAT, 2, 0, 1, 2]);
        encode_event(&mut out, &CoverageEvent::Heartbeat { t_ns: 9 });
        out.extend_from_slice(&[KIND_HEARTBEAT, 200, 0, 1]);
        let (records, errors) = decode_all(&out);
        assert_eq!(
            records,
            vec![Record::Event(CoverageEvent::Heartbeat { t_ns: 9 })]
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("unknown record kind 0x42"));
        assert!(errors[1].contains("invalid heartbeat record at payload offset 4"));
        assert!(errors[2].contains("runs past the end"));
    }

    #[test]
    fn header_checks_magic_then_version_then_checksum() {
        let h = Header {
            log: false,
            seq: 5,
            created_ns: 77,
            run: 3,
        };
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bad = bytes;
        bad[8] = 2;
        assert!(matches!(
            Header::decode(&bad),
            Err(FormatError::UnsupportedVersion { version: 2 })
        ));
        let mut bad = bytes;
        bad[20] ^= 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(FormatError::HeaderChecksum { .. })
        ));
        assert!(matches!(
            Header::decode(&bytes[..31]),
            Err(FormatError::ShortHeader { len: 31 })
        ));
    }

    #[test]
    fn frames_are_checked() {
        let mut file = Vec::new();
        encode_frame(&mut file, b"\x12\x08\x00abcdefgh").unwrap();
        let FrameAt::Good { payload, next } = frame_at(&file, 0) else {
            panic!("not good")
        };
        assert_eq!(next, file.len());
        assert_eq!(decompress(payload).unwrap(), b"\x12\x08\x00abcdefgh");
        assert!(matches!(frame_at(&file, file.len()), FrameAt::End));
        assert!(matches!(
            frame_at(&file[..file.len() - 1], 0),
            FrameAt::Incomplete(_)
        ));
        assert!(matches!(frame_at(&file[..5], 0), FrameAt::Incomplete(_)));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 0x10;
        assert!(matches!(frame_at(&flipped, 0), FrameAt::BadChecksum { .. }));
        assert!(matches!(frame_at(&[0u8; 16], 0), FrameAt::BadLength(_)));
    }
}
