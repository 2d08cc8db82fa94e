//! The canonical encoding of a stored record: what the Merkle trees of a sealed segment
//! (format version 2) hash, and what an evidence bundle carries. FORMAT.md, "Canonical
//! record encoding", is the description to reimplement it from.
//!
//! A binding row is exactly [`RECORD_LEN`] bytes, little-endian, every field at a fixed
//! offset, so that equal rows have equal encodings and nothing else does: reserved bytes,
//! absent counters and an absent end are zero, and an IPv4 address is IPv4-mapped with its
//! family bit clear. The coverage events of a segment are one further leaf: the type byte
//! [`EVENTS_TYPE`] followed by the events' log records.

use std::net::{IpAddr, Ipv6Addr};

use crate::binding::{Binding, Counters, StartSource, Tuple};

use super::columnar::Row;
use super::merkle::{self, Hash};
use super::{CoverageEvent, segment};

/// Length of a binding row's canonical encoding.
pub const RECORD_LEN: usize = 144;
/// First byte of a binding row's encoding.
pub const BINDING_TYPE: u8 = 0x01;
/// First byte of a segment's coverage-events leaf.
pub const EVENTS_TYPE: u8 = 0x02;

/// Bits of the flags byte (offset 2): bits 0 to 4 are those of the stored flags column
/// (`columnar::flag`), bit 5 says whether the binding has ended.
pub mod flag {
    pub use crate::storage::columnar::flag::{
        CARRIED, END_APPROXIMATE, ORIG_COUNTERS, REPLY_COUNTERS, START_APPROXIMATE,
    };
    /// The binding has ended (the end field holds its end).
    pub const ENDED: u8 = 1 << 5;
    /// All defined bits.
    pub const KNOWN: u8 = 0x3F;
}

/// Why bytes are not a canonical record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Not [`RECORD_LEN`] bytes.
    #[error("a record is {RECORD_LEN} bytes, found {0}")]
    Length(usize),
    /// A field holds a value the encoding never produces.
    #[error("not a canonical record: {0}")]
    NotCanonical(&'static str),
}

/// The canonical encoding of `row`.
#[must_use]
pub fn encode(row: &Row) -> [u8; RECORD_LEN] {
    let b = &row.binding;
    let mut r = [0u8; RECORD_LEN];
    r[0] = BINDING_TYPE;
    r[1] = b.proto;
    let mut flags = 0;
    let mut set = |cond: bool, bit: u8| {
        if cond {
            flags |= bit;
        }
    };
    set(b.start_approximate, flag::START_APPROXIMATE);
    set(b.end_approximate, flag::END_APPROXIMATE);
    set(b.orig_counters.is_some(), flag::ORIG_COUNTERS);
    set(b.reply_counters.is_some(), flag::REPLY_COUNTERS);
    set(row.carried, flag::CARRIED);
    set(b.end_ns.is_some(), flag::ENDED);
    r[2] = flags;
    r[3] = b.start_source as u8;
    r[4..6].copy_from_slice(&b.zone.to_le_bytes());
    let mut families = 0u8;
    for (i, a) in [b.orig.src, b.orig.dst, b.reply.src, b.reply.dst]
        .into_iter()
        .enumerate()
    {
        if a.is_ipv6() {
            families |= 1 << i;
        }
    }
    r[6] = families;
    // 7: reserved, zero.
    r[8..12].copy_from_slice(&b.mark.to_le_bytes());
    r[12..16].copy_from_slice(&b.status.to_le_bytes());
    r[16..24].copy_from_slice(&b.id.to_le_bytes());
    r[24..32].copy_from_slice(&b.start_ns.to_le_bytes());
    r[32..40].copy_from_slice(&b.end_ns.unwrap_or(0).to_le_bytes());
    put_tuple(&mut r[40..76], &b.orig);
    put_tuple(&mut r[76..112], &b.reply);
    let c = |c: Option<Counters>| {
        c.unwrap_or(Counters {
            packets: 0,
            bytes: 0,
        })
    };
    let (o, p) = (c(b.orig_counters), c(b.reply_counters));
    for (at, v) in [
        (112, o.packets),
        (120, o.bytes),
        (128, p.packets),
        (136, p.bytes),
    ] {
        r[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    r
}

fn put_tuple(out: &mut [u8], t: &Tuple) {
    out[0..16].copy_from_slice(&mapped(t.src).octets());
    out[16..32].copy_from_slice(&mapped(t.dst).octets());
    out[32..34].copy_from_slice(&t.src_port.to_le_bytes());
    out[34..36].copy_from_slice(&t.dst_port.to_le_bytes());
}

fn mapped(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Decodes a canonical record; anything [`encode`] would not have produced is an error, so
/// that `encode(decode(b)) == b` for every accepted `b`.
pub fn decode(b: &[u8]) -> Result<Row, RecordError> {
    let b: &[u8; RECORD_LEN] = b.try_into().map_err(|_| RecordError::Length(b.len()))?;
    let bad = RecordError::NotCanonical;
    if b[0] != BINDING_TYPE {
        return Err(bad("type byte is not 0x01"));
    }
    let flags = b[2];
    if flags & !flag::KNOWN != 0 {
        return Err(bad("unknown flag bits"));
    }
    let start_source = StartSource::from_u8(b[3]).ok_or(bad("unknown start source"))?;
    if b[6] & !0x0F != 0 || b[7] != 0 {
        return Err(bad("reserved bits set"));
    }
    let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let addr = |at: usize, bit: u8| -> Result<IpAddr, RecordError> {
        let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).expect("16 bytes"));
        if b[6] & (1 << bit) != 0 {
            Ok(IpAddr::V6(v6))
        } else {
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .ok_or(bad("an IPv4 address is not IPv4-mapped"))
        }
    };
    let tuple = |at: usize, bit: u8| -> Result<Tuple, RecordError> {
        Ok(Tuple {
            src: addr(at, bit)?,
            dst: addr(at + 16, bit + 1)?,
            src_port: u16_at(at + 32),
            dst_port: u16_at(at + 34),
        })
    };
    let ended = flags & flag::ENDED != 0;
    let end = u64_at(32) as i64;
    if !ended && end != 0 {
        return Err(bad("an open binding with an end"));
    }
    let counters = |bit: u8, at: usize| -> Result<Option<Counters>, RecordError> {
        let c = Counters {
            packets: u64_at(at),
            bytes: u64_at(at + 8),
        };
        if flags & bit != 0 {
            Ok(Some(c))
        } else if c.packets == 0 && c.bytes == 0 {
            Ok(None)
        } else {
            Err(bad("absent counters that are not zero"))
        }
    };
    Ok(Row {
        binding: Binding {
            id: u64_at(16),
            proto: b[1],
            zone: u16_at(4),
            mark: u32_at(8),
            status: u32_at(12),
            orig: tuple(40, 0)?,
            reply: tuple(76, 2)?,
            start_ns: u64_at(24) as i64,
            start_approximate: flags & flag::START_APPROXIMATE != 0,
            start_source,
            end_ns: ended.then_some(end),
            end_approximate: flags & flag::END_APPROXIMATE != 0,
            orig_counters: counters(flag::ORIG_COUNTERS, 112)?,
            reply_counters: counters(flag::REPLY_COUNTERS, 128)?,
        },
        carried: flags & flag::CARRIED != 0,
    })
}

/// The Merkle leaf hash of `row`: `SHA-256(0x00 || encode(row))`.
#[must_use]
pub fn leaf(row: &Row) -> Hash {
    merkle::leaf_hash(&encode(row))
}

/// The events leaf's data: [`EVENTS_TYPE`], then each event's log record (FORMAT.md).
#[must_use]
pub fn events_data(events: &[CoverageEvent]) -> Vec<u8> {
    let mut out = vec![EVENTS_TYPE];
    for e in events {
        segment::encode_event(&mut out, e);
    }
    out
}

/// The events leaf hash over already-encoded event log records.
#[must_use]
pub fn events_leaf_of_records(records: &[u8]) -> Hash {
    let mut data = Vec::with_capacity(records.len() + 1);
    data.push(EVENTS_TYPE);
    data.extend_from_slice(records);
    merkle::leaf_hash(&data)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn row() -> Row {
        let b = Binding {
            id: 0x0102_0304_0506_0708,
            proto: 6,
            zone: 3,
            mark: 0xdead_beef,
            status: 0x1b8,
            orig: Tuple {
                src: Ipv4Addr::new(100, 64, 0, 10).into(),
                dst: Ipv4Addr::new(198, 51, 100, 20).into(),
                src_port: 40000,
                dst_port: 443,
            },
            reply: Tuple {
                src: Ipv4Addr::new(198, 51, 100, 20).into(),
                dst: Ipv4Addr::new(203, 0, 113, 7).into(),
                src_port: 443,
                dst_port: 40123,
            },
            start_ns: 1_793_614_447_000_000_000,
            end_ns: Some(1_793_614_450_000_000_000),
            orig_counters: Some(Counters {
                packets: 10,
                bytes: 1000,
            }),
            reply_counters: None,
            end_approximate: true,
            ..Binding::EMPTY
        };
        Row {
            binding: b,
            carried: true,
        }
    }

    #[test]
    fn fields_sit_at_their_documented_offsets() {
        let r = encode(&row());
        assert_eq!(r[0], BINDING_TYPE);
        assert_eq!(r[1], 6);
        assert_eq!(
            r[2],
            flag::END_APPROXIMATE | flag::ORIG_COUNTERS | flag::CARRIED | flag::ENDED
        );
        assert_eq!(r[3], 0);
        assert_eq!(&r[4..6], &3u16.to_le_bytes());
        assert_eq!(r[6], 0, "all four addresses IPv4");
        assert_eq!(&r[16..24], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(
            &r[40..56],
            &Ipv4Addr::new(100, 64, 0, 10).to_ipv6_mapped().octets()
        );
        assert_eq!(&r[72..74], &40000u16.to_le_bytes());
        assert_eq!(&r[108..110], &443u16.to_le_bytes());
        assert_eq!(&r[110..112], &40123u16.to_le_bytes());
        assert_eq!(&r[120..128], &1000u64.to_le_bytes());
        assert_eq!(&r[128..144], &[0u8; 16], "absent reply counters are zero");
    }

    #[test]
    fn round_trips_and_rejects_what_encode_never_writes() {
        let mut rows = vec![row()];
        let mut open = row();
        open.binding.end_ns = None;
        open.binding.end_approximate = false;
        open.carried = false;
        open.binding.orig.src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10).into();
        open.binding.reply_counters = Some(Counters {
            packets: 0,
            bytes: 0,
        });
        rows.push(open);
        for r in rows {
            let e = encode(&r);
            assert_eq!(decode(&e).unwrap(), r);
            assert_eq!(encode(&decode(&e).unwrap()), e);
        }
        let e = encode(&row());
        assert_eq!(decode(&e[..143]), Err(RecordError::Length(143)));
        for (at, v) in [(0usize, 0x02u8), (2, 0x40), (3, 9), (6, 0x10), (7, 1)] {
            let mut b = e;
            b[at] = v;
            assert!(decode(&b).is_err(), "byte {at} = {v:#x}");
        }
        let mut b = e;
        b[2] &= !flag::ENDED;
        assert!(decode(&b).is_err(), "an end without the ended flag");
        let mut b = e;
        b[130] = 1;
        assert!(decode(&b).is_err(), "counters without their flag");
        let mut b = e;
        b[40] = 1;
        assert!(decode(&b).is_err(), "an IPv4 address not IPv4-mapped");
    }

    /// The worked example of FORMAT.md, "Canonical record encoding", byte for byte.
    #[test]
    fn format_md_example() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let row = Row {
            binding: Binding {
                id: (41 << 32) | 7,
                proto: 6,
                status: 0x19e,
                orig: Tuple {
                    src: ip("100.64.3.17"),
                    dst: ip("198.51.100.20"),
                    src_port: 51234,
                    dst_port: 443,
                },
                reply: Tuple {
                    src: ip("198.51.100.20"),
                    dst: ip("203.0.113.7"),
                    src_port: 443,
                    dst_port: 40123,
                },
                start_ns: 1_793_614_445_123_000_000,
                end_ns: Some(1_793_614_604_871_000_000),
                orig_counters: Some(Counters {
                    packets: 12,
                    bytes: 1480,
                }),
                reply_counters: Some(Counters {
                    packets: 10,
                    bytes: 9020,
                }),
                ..Binding::EMPTY
            },
            carried: false,
        };
        let e = encode(&row);
        assert_eq!(&e[..4], &[0x01, 0x06, 0x2c, 0x00]);
        assert_eq!(
            &e[24..40],
            &[
                0xc0, 0xd6, 0x90, 0xb9, 0xd5, 0x32, 0xe4, 0x18, 0xc0, 0xdf, 0x49, 0xeb, 0xfa, 0x32,
                0xe4, 0x18
            ]
        );
        let hex: String = leaf(&row).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "c8280099ab7f1e1a06ebe1210c33570107cfc1012a3423f68bcfdad72294d7f4"
        );
    }

    #[test]
    fn events_leaf_is_typed() {
        let ev = [CoverageEvent::Heartbeat { t_ns: 5 }];
        let data = events_data(&ev);
        assert_eq!(data[0], EVENTS_TYPE);
        assert_eq!(events_leaf_of_records(&data[1..]), merkle::leaf_hash(&data));
    }
}
