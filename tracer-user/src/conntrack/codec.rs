//! Decoding of netlink datagrams and ctnetlink conntrack messages.
//!
//! Netlink headers and attribute headers are in host byte order; ctnetlink attribute
//! values are big-endian (include/uapi/linux/netfilter/nfnetlink_conntrack.h). Decoding
//! never panics: anything truncated or inconsistent yields [`ConntrackError::Malformed`].
//! Unknown attributes are skipped, so newer kernels adding attributes keep working.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{ConntrackError, CtEntry};
use crate::binding::{Counters, Tuple, is_icmp};

/// Size of `struct nlmsghdr`.
pub(super) const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nfgenmsg`, which starts every nfnetlink payload.
pub(super) const NFGENMSG_LEN: usize = 4;

/// `NLMSG_NOOP`, `NLMSG_ERROR`, `NLMSG_DONE`, `NLMSG_OVERRUN` (linux/netlink.h).
pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLMSG_OVERRUN: u16 = 4;

/// `NFNL_SUBSYS_CTNETLINK`: the subsystem in the high byte of nfnetlink message types.
pub(super) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// ctnetlink message types (enum cntl_msg_types).
pub(super) const IPCTNL_MSG_CT_NEW: u16 = 0;
pub(super) const IPCTNL_MSG_CT_GET: u16 = 1;
pub(super) const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// Full netlink message type of a ctnetlink message.
pub(super) const fn ctnl_msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ZONE: u16 = 18;
const CTA_TIMESTAMP: u16 = 20;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_TUPLE_ZONE: u16 = 3;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;
// enum ctattr_tstamp
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;

/// Attribute type bits that are flags, not part of the type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_HDRLEN: usize = 4;

fn malformed(reason: impl Into<String>) -> ConntrackError {
    ConntrackError::Malformed {
        reason: reason.into(),
    }
}

/// Rounds up to the 4-byte netlink alignment.
const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug)]
pub(super) struct NlMsg<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// The bytes after the netlink header.
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages of one received datagram.
pub(super) struct NlMsgs<'a> {
    rest: &'a [u8],
}

impl<'a> NlMsgs<'a> {
    pub(super) fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl<'a> Iterator for NlMsgs<'a> {
    type Item = Result<NlMsg<'a>, ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        if buf.len() < NLMSG_HDRLEN {
            self.rest = &[];
            return Some(Err(malformed(format!(
                "{} trailing bytes, shorter than a netlink header",
                buf.len()
            ))));
        }
        let len = ne_u32(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(malformed(format!(
                "netlink message length {len} with {} bytes left in the datagram",
                buf.len()
            ))));
        }
        self.rest = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(NlMsg {
            kind: ne_u16(buf, 4),
            flags: ne_u16(buf, 6),
            seq: ne_u32(buf, 8),
            payload: &buf[NLMSG_HDRLEN..len],
        }))
    }
}

/// The error code of an `NLMSG_ERROR` message (0 for an acknowledgement, else -errno).
pub(super) fn decode_error_code(payload: &[u8]) -> Result<i32, ConntrackError> {
    match payload.get(..4) {
        Some(b) => Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(malformed(format!(
            "NLMSG_ERROR payload of {} bytes",
            payload.len()
        ))),
    }
}

/// The status of an `NLMSG_DONE` message: 0, or -errno if the dump failed. Some
/// subsystems send it without a payload, which means 0.
pub(super) fn decode_done_status(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Iterates over the attributes in `buf`, yielding (type without flags, value).
struct Attrs<'a> {
    rest: &'a [u8],
    /// Name of the enclosing attribute, for error messages.
    within: &'static str,
}

fn attrs<'a>(buf: &'a [u8], within: &'static str) -> Attrs<'a> {
    Attrs { rest: buf, within }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        if buf.len() < NLA_HDRLEN {
            self.rest = &[];
            return Some(Err(malformed(format!(
                "{} stray bytes after the attributes of {}",
                buf.len(),
                self.within
            ))));
        }
        let len = usize::from(ne_u16(buf, 0));
        let kind = ne_u16(buf, 2) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(malformed(format!(
                "attribute {kind} of {} has length {len} with {} bytes left",
                self.within,
                buf.len()
            ))));
        }
        self.rest = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((kind, &buf[NLA_HDRLEN..len])))
    }
}

fn be_u16(v: &[u8], what: &str) -> Result<u16, ConntrackError> {
    <[u8; 2]>::try_from(v)
        .map(u16::from_be_bytes)
        .map_err(|_| malformed(format!("{what} is {} bytes, expected 2", v.len())))
}

fn be_u32(v: &[u8], what: &str) -> Result<u32, ConntrackError> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| malformed(format!("{what} is {} bytes, expected 4", v.len())))
}

fn be_u64(v: &[u8], what: &str) -> Result<u64, ConntrackError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| malformed(format!("{what} is {} bytes, expected 8", v.len())))
}

fn ipv4(v: &[u8], what: &str) -> Result<IpAddr, ConntrackError> {
    <[u8; 4]>::try_from(v)
        .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
        .map_err(|_| malformed(format!("{what} is {} bytes, expected 4", v.len())))
}

fn ipv6(v: &[u8], what: &str) -> Result<IpAddr, ConntrackError> {
    <[u8; 16]>::try_from(v)
        .map(|o| IpAddr::V6(Ipv6Addr::from(o)))
        .map_err(|_| malformed(format!("{what} is {} bytes, expected 16", v.len())))
}

/// A tuple as found in the message, before the protocol-dependent port convention.
#[derive(Default)]
struct RawTuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    icmp_id: Option<u16>,
    zone: Option<u16>,
}

fn decode_tuple(buf: &[u8], name: &'static str) -> Result<RawTuple, ConntrackError> {
    let mut t = RawTuple::default();
    for attr in attrs(buf, name) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_IP => {
                for attr in attrs(value, "CTA_TUPLE_IP") {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_IP_V4_SRC => t.src = Some(ipv4(value, "CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => t.dst = Some(ipv4(value, "CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => t.src = Some(ipv6(value, "CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => t.dst = Some(ipv6(value, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attr in attrs(value, "CTA_TUPLE_PROTO") {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_PROTO_NUM => match value {
                            [p] => t.proto = Some(*p),
                            _ => {
                                return Err(malformed(format!(
                                    "CTA_PROTO_NUM is {} bytes, expected 1",
                                    value.len()
                                )));
                            }
                        },
                        CTA_PROTO_SRC_PORT => {
                            t.src_port = Some(be_u16(value, "CTA_PROTO_SRC_PORT")?);
                        }
                        CTA_PROTO_DST_PORT => {
                            t.dst_port = Some(be_u16(value, "CTA_PROTO_DST_PORT")?);
                        }
                        CTA_PROTO_ICMP_ID => {
                            t.icmp_id = Some(be_u16(value, "CTA_PROTO_ICMP_ID")?);
                        }
                        CTA_PROTO_ICMPV6_ID => {
                            t.icmp_id = Some(be_u16(value, "CTA_PROTO_ICMPV6_ID")?);
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => t.zone = Some(be_u16(value, "CTA_TUPLE_ZONE")?),
            _ => {}
        }
    }
    Ok(t)
}

/// Applies the port convention of [`Tuple`]: for ICMP and ICMPv6 the echo identifier goes
/// in `src_port` and `dst_port` is 0.
fn finish_tuple(raw: &RawTuple, proto: u8, name: &str) -> Result<Tuple, ConntrackError> {
    let (Some(src), Some(dst)) = (raw.src, raw.dst) else {
        return Err(malformed(format!(
            "{name} lacks a source or destination address"
        )));
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(malformed(format!("{name} mixes IPv4 and IPv6 addresses")));
    }
    let (src_port, dst_port) = if is_icmp(proto) {
        (raw.icmp_id.unwrap_or(0), 0)
    } else {
        (raw.src_port.unwrap_or(0), raw.dst_port.unwrap_or(0))
    };
    Ok(Tuple {
        src,
        dst,
        src_port,
        dst_port,
    })
}

fn decode_counters(buf: &[u8], name: &'static str) -> Result<Counters, ConntrackError> {
    let mut c = Counters::default();
    for attr in attrs(buf, name) {
        let (kind, value) = attr?;
        match kind {
            CTA_COUNTERS_PACKETS => c.packets = be_u64(value, "CTA_COUNTERS_PACKETS")?,
            CTA_COUNTERS_BYTES => c.bytes = be_u64(value, "CTA_COUNTERS_BYTES")?,
            CTA_COUNTERS32_PACKETS => {
                c.packets = u64::from(be_u32(value, "CTA_COUNTERS32_PACKETS")?);
            }
            CTA_COUNTERS32_BYTES => c.bytes = u64::from(be_u32(value, "CTA_COUNTERS32_BYTES")?),
            _ => {}
        }
    }
    Ok(c)
}

/// A timestamp in ns since the epoch; 0 (never set) reads as `None`.
fn timestamp(value: &[u8], what: &str) -> Result<Option<i64>, ConntrackError> {
    let ns = be_u64(value, what)?;
    if ns == 0 {
        return Ok(None);
    }
    i64::try_from(ns)
        .map(Some)
        .map_err(|_| malformed(format!("{what} {ns} is beyond the year 2262")))
}

/// Decodes the payload of a ctnetlink conntrack message (`IPCTNL_MSG_CT_NEW` as sent in
/// dumps, `IPCTNL_MSG_CT_DELETE` as sent in destroy events): the `nfgenmsg` header, then
/// the attributes.
pub(super) fn decode_entry(payload: &[u8]) -> Result<CtEntry, ConntrackError> {
    let Some(attributes) = payload.get(NFGENMSG_LEN..) else {
        return Err(malformed(format!(
            "ctnetlink payload of {} bytes, shorter than the nfgenmsg header",
            payload.len()
        )));
    };
    let mut orig = None;
    let mut reply = None;
    let mut entry = CtEntry {
        proto: 0,
        orig: Tuple {
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            src_port: 0,
            dst_port: 0,
        },
        reply: Tuple {
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            src_port: 0,
            dst_port: 0,
        },
        zone: 0,
        mark: 0,
        status: 0,
        orig_counters: None,
        reply_counters: None,
        start_ns: None,
        stop_ns: None,
    };
    let mut zone = None;
    for attr in attrs(attributes, "the conntrack message") {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(decode_tuple(value, "CTA_TUPLE_ORIG")?),
            CTA_TUPLE_REPLY => reply = Some(decode_tuple(value, "CTA_TUPLE_REPLY")?),
            CTA_STATUS => entry.status = be_u32(value, "CTA_STATUS")?,
            CTA_MARK => entry.mark = be_u32(value, "CTA_MARK")?,
            CTA_ZONE => zone = Some(be_u16(value, "CTA_ZONE")?),
            CTA_COUNTERS_ORIG => {
                entry.orig_counters = Some(decode_counters(value, "CTA_COUNTERS_ORIG")?);
            }
            CTA_COUNTERS_REPLY => {
                entry.reply_counters = Some(decode_counters(value, "CTA_COUNTERS_REPLY")?);
            }
            CTA_TIMESTAMP => {
                for attr in attrs(value, "CTA_TIMESTAMP") {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_TIMESTAMP_START => {
                            entry.start_ns = timestamp(value, "CTA_TIMESTAMP_START")?;
                        }
                        CTA_TIMESTAMP_STOP => {
                            entry.stop_ns = timestamp(value, "CTA_TIMESTAMP_STOP")?;
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let Some(orig) = orig else {
        return Err(malformed("no CTA_TUPLE_ORIG"));
    };
    let Some(reply) = reply else {
        return Err(malformed("no CTA_TUPLE_REPLY"));
    };
    let Some(proto) = orig.proto.or(reply.proto) else {
        return Err(malformed("no CTA_PROTO_NUM in the tuples"));
    };
    entry.proto = proto;
    entry.orig = finish_tuple(&orig, proto, "CTA_TUPLE_ORIG")?;
    entry.reply = finish_tuple(&reply, proto, "CTA_TUPLE_REPLY")?;
    // A zone that applies to both directions comes as CTA_ZONE; a directional one only in
    // the tuple of its direction. Either way it is the entry's zone id (ct->zone.id).
    entry.zone = zone.or(orig.zone).or(reply.zone).unwrap_or(0);
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPS_SRC_NAT};
    use netlink_packet_core::{DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status,
        Tuple as NlTuple,
    };
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A nested attribute built by hand (type gets NLA_F_NESTED like the kernel's).
    fn nest(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = children.concat();
        attr(kind | 0x8000, &body)
    }

    /// A plain attribute with its padding.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(NLA_HDRLEN + value.len()).unwrap();
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        v.resize(align4(v.len()), 0);
        v
    }

    fn counters(kind: u16, packets: u64, bytes: u64) -> Vec<u8> {
        nest(
            kind,
            &[
                attr(CTA_COUNTERS_PACKETS, &packets.to_be_bytes()),
                attr(CTA_COUNTERS_BYTES, &bytes.to_be_bytes()),
            ],
        )
    }

    /// Emits a whole netlink datagram with netlink-packet-netfilter, as the kernel would
    /// send it (the library only knows tuples, status and mark; the rest goes in `Other`).
    fn emit(msg: ConntrackMessage, family: NetfilterProtoFamily) -> Vec<u8> {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                msg,
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    fn nl_tuple(src: &str, dst: &str, proto: u8, ports: &[ProtoTuple]) -> Vec<NlTuple> {
        let mut p = vec![ProtoTuple::Protocol(Protocol::from(proto))];
        p.extend_from_slice(ports);
        vec![
            NlTuple::Ip(vec![
                IPTuple::SourceAddress(ip(src)),
                IPTuple::DestinationAddress(ip(dst)),
            ]),
            NlTuple::Proto(p),
        ]
    }

    fn other(nla: Vec<u8>) -> ConntrackAttribute {
        // Re-parse the hand-built bytes as a DefaultNla so the library emits them verbatim.
        let kind = ne_u16(&nla, 2);
        let len = usize::from(ne_u16(&nla, 0));
        ConntrackAttribute::Other(DefaultNla::new(kind, nla[NLA_HDRLEN..len].to_vec()))
    }

    /// Decodes the single message of a datagram.
    fn decode_one(datagram: &[u8]) -> Result<(u16, CtEntry), ConntrackError> {
        let mut msgs = NlMsgs::new(datagram);
        let msg = msgs.next().expect("one message")?;
        assert!(msgs.next().is_none());
        Ok((msg.kind, decode_entry(msg.payload)?))
    }

    fn tcp_v4_message(with_extras: bool) -> Vec<u8> {
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(nl_tuple(
                "100.64.0.10",
                "192.0.2.2",
                IPPROTO_TCP,
                &[
                    ProtoTuple::SourcePort(40000),
                    ProtoTuple::DestinationPort(80),
                ],
            )),
            ConntrackAttribute::CtaTupleReply(nl_tuple(
                "192.0.2.2",
                "203.0.113.7",
                IPPROTO_TCP,
                &[
                    ProtoTuple::SourcePort(80),
                    ProtoTuple::DestinationPort(20001),
                ],
            )),
            ConntrackAttribute::CtaStatus(Status::from_bits_retain(IPS_SRC_NAT | 0x8 | 0x2)),
        ];
        if with_extras {
            attrs.push(ConntrackAttribute::CtaMark(42));
            attrs.push(other(counters(CTA_COUNTERS_ORIG, 10, 1500)));
            attrs.push(other(counters(CTA_COUNTERS_REPLY, 8, 9000)));
            attrs.push(other(attr(CTA_ZONE, &7u16.to_be_bytes())));
            attrs.push(other(nest(
                CTA_TIMESTAMP,
                &[
                    attr(
                        CTA_TIMESTAMP_START,
                        &1_700_000_000_123_456_789u64.to_be_bytes(),
                    ),
                    attr(
                        CTA_TIMESTAMP_STOP,
                        &1_700_000_060_000_000_000u64.to_be_bytes(),
                    ),
                ],
            )));
            // An attribute this decoder does not know (CTA_ID) is skipped.
            attrs.push(other(attr(12, &0xdead_beefu32.to_be_bytes())));
        }
        emit(ConntrackMessage::Delete(attrs), NetfilterProtoFamily::IPv4)
    }

    #[test]
    fn decodes_ipv4_tcp_destroy_with_counters_zone_timestamps() {
        let (kind, e) = decode_one(&tcp_v4_message(true)).unwrap();
        assert_eq!(kind, ctnl_msg_type(IPCTNL_MSG_CT_DELETE));
        assert_eq!(e.proto, IPPROTO_TCP);
        assert_eq!(
            e.orig,
            Tuple {
                src: ip("100.64.0.10"),
                dst: ip("192.0.2.2"),
                src_port: 40000,
                dst_port: 80
            }
        );
        assert_eq!(
            e.reply,
            Tuple {
                src: ip("192.0.2.2"),
                dst: ip("203.0.113.7"),
                src_port: 80,
                dst_port: 20001
            }
        );
        assert_eq!(e.zone, 7);
        assert_eq!(e.mark, 42);
        assert_eq!(e.status, IPS_SRC_NAT | 0x8 | 0x2);
        assert!(e.is_nat());
        assert_eq!(
            e.orig_counters,
            Some(Counters {
                packets: 10,
                bytes: 1500
            })
        );
        assert_eq!(
            e.reply_counters,
            Some(Counters {
                packets: 8,
                bytes: 9000
            })
        );
        assert_eq!(e.start_ns, Some(1_700_000_000_123_456_789));
        assert_eq!(e.stop_ns, Some(1_700_000_060_000_000_000));
        assert_eq!(e.key().zone, 7);
        assert_eq!(e.key().orig, e.orig);
    }

    #[test]
    fn optional_attributes_absent_read_as_defaults() {
        let (_, e) = decode_one(&tcp_v4_message(false)).unwrap();
        assert_eq!((e.zone, e.mark), (0, 0));
        assert_eq!((e.orig_counters, e.reply_counters), (None, None));
        assert_eq!((e.start_ns, e.stop_ns), (None, None));
    }

    #[test]
    fn decodes_ipv6_udp_dump_entry() {
        let msg = emit(
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(nl_tuple(
                    "fd00::1",
                    "2001:db8::2",
                    IPPROTO_UDP,
                    &[
                        ProtoTuple::SourcePort(5000),
                        ProtoTuple::DestinationPort(53),
                    ],
                )),
                ConntrackAttribute::CtaTupleReply(nl_tuple(
                    "2001:db8::2",
                    "fd00::1",
                    IPPROTO_UDP,
                    &[
                        ProtoTuple::SourcePort(53),
                        ProtoTuple::DestinationPort(5000),
                    ],
                )),
                ConntrackAttribute::CtaStatus(Status::from_bits_retain(0x8)),
                other(nest(
                    CTA_TIMESTAMP,
                    &[attr(CTA_TIMESTAMP_START, &5u64.to_be_bytes())],
                )),
            ]),
            NetfilterProtoFamily::IPv6,
        );
        let (kind, e) = decode_one(&msg).unwrap();
        assert_eq!(kind, ctnl_msg_type(IPCTNL_MSG_CT_NEW));
        assert_eq!(e.proto, IPPROTO_UDP);
        assert_eq!(
            e.orig,
            Tuple {
                src: ip("fd00::1"),
                dst: ip("2001:db8::2"),
                src_port: 5000,
                dst_port: 53
            }
        );
        assert_eq!(
            e.reply,
            Tuple {
                src: ip("2001:db8::2"),
                dst: ip("fd00::1"),
                src_port: 53,
                dst_port: 5000
            }
        );
        assert!(!e.is_nat());
        assert_eq!((e.start_ns, e.stop_ns), (Some(5), None));
    }

    /// ICMP echo, hand-written bytes exactly as ctnetlink lays them out (little-endian host).
    #[test]
    fn decodes_hand_written_icmp_echo_with_id() {
        #[rustfmt::skip]
        let tuple_orig: &[u8] = &[
            0x34, 0x00, 0x01, 0x80,                  // CTA_TUPLE_ORIG, nested, len 52
              0x14, 0x00, 0x01, 0x80,                // CTA_TUPLE_IP, nested, len 20
                0x08, 0x00, 0x01, 0x00, 100, 64, 0, 10,   // CTA_IP_V4_SRC
                0x08, 0x00, 0x02, 0x00, 192, 0, 2, 2,     // CTA_IP_V4_DST
              0x1c, 0x00, 0x02, 0x80,                // CTA_TUPLE_PROTO, nested, len 28
                0x05, 0x00, 0x01, 0x00, 1, 0, 0, 0,       // CTA_PROTO_NUM = 1 (+pad)
                0x06, 0x00, 0x04, 0x00, 0x04, 0xd2, 0, 0, // CTA_PROTO_ICMP_ID = 1234 (+pad)
                0x05, 0x00, 0x05, 0x00, 8, 0, 0, 0,       // CTA_PROTO_ICMP_TYPE = 8 (+pad)
        ];
        #[rustfmt::skip]
        let tuple_reply: &[u8] = &[
            0x34, 0x00, 0x02, 0x80,                  // CTA_TUPLE_REPLY
              0x14, 0x00, 0x01, 0x80,
                0x08, 0x00, 0x01, 0x00, 192, 0, 2, 2,
                0x08, 0x00, 0x02, 0x00, 203, 0, 113, 7,
              0x1c, 0x00, 0x02, 0x80,
                0x05, 0x00, 0x01, 0x00, 1, 0, 0, 0,
                0x06, 0x00, 0x04, 0x00, 0x10, 0x01, 0, 0, // translated id 4097
                0x05, 0x00, 0x05, 0x00, 0, 0, 0, 0,       // echo reply
        ];
        #[rustfmt::skip]
        // CTA_STATUS = IPS_SRC_NAT | IPS_CONFIRMED | IPS_SEEN_REPLY
        let status: &[u8] = &[0x08, 0x00, 0x03, 0x00, 0, 0, 0, 0x1a];
        let payload: Vec<u8> = [&[2u8, 0, 0, 0][..], tuple_orig, tuple_reply, status].concat();
        let mut datagram = Vec::new();
        let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap();
        datagram.extend_from_slice(&len.to_ne_bytes());
        datagram.extend_from_slice(&ctnl_msg_type(IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        datagram.extend_from_slice(&0u16.to_ne_bytes());
        datagram.extend_from_slice(&[0; 8]);
        datagram.extend_from_slice(&payload);

        let (_, e) = decode_one(&datagram).unwrap();
        assert_eq!(e.proto, IPPROTO_ICMP);
        assert_eq!(
            e.orig,
            Tuple {
                src: ip("100.64.0.10"),
                dst: ip("192.0.2.2"),
                src_port: 1234,
                dst_port: 0
            }
        );
        assert_eq!(
            e.reply,
            Tuple {
                src: ip("192.0.2.2"),
                dst: ip("203.0.113.7"),
                src_port: 4097,
                dst_port: 0
            }
        );
        assert_eq!(e.status, 0x1a);
        assert!(e.is_nat());
    }

    #[test]
    fn icmpv6_id_and_directional_tuple_zone() {
        let icmp6 = |kind: u16, src: &str, dst: &str, ty: u8, zone: Option<u16>| {
            let mut children = vec![
                nest(
                    CTA_TUPLE_IP,
                    &[
                        attr(CTA_IP_V6_SRC, &src.parse::<Ipv6Addr>().unwrap().octets()),
                        attr(CTA_IP_V6_DST, &dst.parse::<Ipv6Addr>().unwrap().octets()),
                    ],
                ),
                nest(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[IPPROTO_ICMPV6]),
                        attr(CTA_PROTO_ICMPV6_ID, &77u16.to_be_bytes()),
                        attr(8, &[ty]), // CTA_PROTO_ICMPV6_TYPE
                    ],
                ),
            ];
            if let Some(z) = zone {
                children.push(attr(CTA_TUPLE_ZONE, &z.to_be_bytes()));
            }
            nest(kind, &children)
        };
        // Only the original direction is zoned: no CTA_ZONE, a CTA_TUPLE_ZONE in the original.
        let payload = [
            vec![10, 0, 0, 0],
            icmp6(CTA_TUPLE_ORIG, "fd00::1", "2001:db8::2", 128, Some(3)),
            icmp6(CTA_TUPLE_REPLY, "2001:db8::2", "fd00::1", 129, None),
        ]
        .concat();
        let e = decode_entry(&payload).unwrap();
        assert_eq!(e.proto, IPPROTO_ICMPV6);
        assert_eq!(
            e.orig,
            Tuple {
                src: ip("fd00::1"),
                dst: ip("2001:db8::2"),
                src_port: 77,
                dst_port: 0
            }
        );
        assert_eq!(
            e.reply,
            Tuple {
                src: ip("2001:db8::2"),
                dst: ip("fd00::1"),
                src_port: 77,
                dst_port: 0
            }
        );
        assert_eq!(e.zone, 3);
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut datagram = tcp_v4_message(false);
        datagram.extend_from_slice(&tcp_v4_message(true));
        let entries: Vec<CtEntry> = NlMsgs::new(&datagram)
            .map(|m| decode_entry(m.unwrap().payload).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].mark, 0);
        assert_eq!(entries[1].mark, 42);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tcp_v4_message(true);
        for cut in 0..full.len() {
            let short = &full[..cut];
            let result: Result<Vec<CtEntry>, ConntrackError> = NlMsgs::new(short)
                .map(|m| decode_entry(m?.payload))
                .collect();
            match result {
                // Only the empty datagram decodes (to nothing).
                Ok(v) => assert!(cut == 0 && v.is_empty(), "cut at {cut} decoded {v:?}"),
                Err(ConntrackError::Malformed { .. }) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }

    #[test]
    fn truncated_payload_with_consistent_lengths_is_an_error() {
        // Cut the payload, then fix up the netlink length so only the attributes are short.
        let full = tcp_v4_message(true);
        let (_, whole) = decode_one(&full).unwrap();
        for cut in NLMSG_HDRLEN..full.len() {
            let mut short = full[..cut].to_vec();
            let len = u32::try_from(cut).unwrap();
            short[..4].copy_from_slice(&len.to_ne_bytes());
            match decode_entry(NlMsgs::new(&short).next().unwrap().unwrap().payload) {
                // A cut between top-level attributes after both tuples loses only the
                // attributes after it; any other cut must be reported.
                Ok(e) => {
                    assert_eq!((e.orig, e.reply), (whole.orig, whole.reply), "cut at {cut}");
                }
                Err(ConntrackError::Malformed { .. }) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // Deterministic pseudo-random bytes (xorshift), as payloads and as whole datagrams.
        let mut x: u32 = 0x1234_5678;
        for round in 0..2000 {
            let len = round % 200;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = decode_entry(&bytes);
            for m in NlMsgs::new(&bytes).flatten() {
                let _ = decode_entry(m.payload);
            }
        }
        // Specific bad shapes.
        let bad_status = [vec![2, 0, 0, 0], attr(CTA_STATUS, &[1, 2])].concat();
        assert!(matches!(
            decode_entry(&bad_status),
            Err(ConntrackError::Malformed { .. })
        ));
        let zero_len_attr = [vec![2, 0, 0, 0], vec![0, 0, 1, 0, 0, 0, 0, 0]].concat();
        assert!(matches!(
            decode_entry(&zero_len_attr),
            Err(ConntrackError::Malformed { .. })
        ));
        assert!(matches!(
            decode_entry(&[2, 0]),
            Err(ConntrackError::Malformed { .. })
        ));
        let no_tuples = [vec![2, 0, 0, 0], attr(CTA_MARK, &[0, 0, 0, 1])].concat();
        assert!(matches!(
            decode_entry(&no_tuples),
            Err(ConntrackError::Malformed { .. })
        ));
        let zero_len_msg = [0u8; 16];
        assert!(NlMsgs::new(&zero_len_msg).next().unwrap().is_err());
    }

    #[test]
    fn bad_address_length_is_an_error() {
        let t = nest(
            CTA_TUPLE_ORIG,
            &[nest(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &[1, 2, 3])])],
        );
        let payload = [vec![2, 0, 0, 0], t].concat();
        let err = decode_entry(&payload).unwrap_err();
        assert!(err.to_string().contains("CTA_IP_V4_SRC"), "{err}");
    }

    #[test]
    fn error_and_done_codes() {
        assert_eq!(decode_error_code(&(-1i32).to_ne_bytes()).unwrap(), -1);
        assert!(decode_error_code(&[1, 2]).is_err());
        assert_eq!(decode_done_status(&[]), 0);
        assert_eq!(decode_done_status(&(-4i32).to_ne_bytes()), -4);
    }
}
