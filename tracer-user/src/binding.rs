//! The NAT binding: what nattrace records, independent of how it was captured or stored.
//!
//! A binding is one conntrack entry on which NAT was applied, seen from the
//! investigator's side: which subscriber (internal address and port) held which
//! public (external) address and port, towards which destination, from when to when.

use std::net::IpAddr;

/// IANA protocol numbers nattrace names; any other number is kept as is.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// conntrack status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub const IPS_CONFIRMED: u32 = 1 << 3;
pub const IPS_SRC_NAT: u32 = 1 << 4;
pub const IPS_DST_NAT: u32 = 1 << 5;

/// True for the protocols whose "port" is an ICMP echo identifier.
#[must_use]
pub fn is_icmp(proto: u8) -> bool {
    proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6
}

/// Name of a protocol as printed and parsed by the CLI ("tcp", "udp", "icmp", "icmpv6"),
/// or `None` for protocols without a name.
#[must_use]
pub fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_ICMP => Some("icmp"),
        IPPROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

/// One direction of a conntrack entry, as the kernel keeps it.
///
/// For TCP and UDP the ports are the L4 ports. For ICMP and ICMPv6 echo,
/// `src_port` holds the echo identifier and `dst_port` is 0, in both directions
/// (the kernel keeps the identifier in `src.u.icmp.id` of both tuples).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    /// 0.0.0.0:0 to 0.0.0.0:0.
    pub const UNSPECIFIED: Tuple = Tuple {
        src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        src_port: 0,
        dst_port: 0,
    };
}

/// Identifies a live conntrack entry: L4 protocol, original-direction tuple and zone.
/// This is how an end (ctnetlink DESTROY) is matched to its start (ring buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConntrackKey {
    pub proto: u8,
    pub orig: Tuple,
    pub zone: u16,
}

/// Packet and byte counters of one direction (conntrack accounting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Where a binding's start came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StartSource {
    /// The eBPF program saw the binding's first packet: exact.
    Ring = 0,
    /// Only the ctnetlink DESTROY event was seen (the start was lost or never captured).
    Destroy = 1,
    /// Found alive in a dump of the conntrack table (pre-existing, or its start was lost).
    Dump = 2,
    /// Read by `nattrace import` from another tool's log (CSV or `conntrack -E` text).
    Import = 3,
}

impl StartSource {
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ring),
            1 => Some(Self::Destroy),
            2 => Some(Self::Dump),
            3 => Some(Self::Import),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::Destroy => "destroy",
            Self::Dump => "dump",
            Self::Import => "import",
        }
    }
}

/// A NAT binding: one conntrack entry with NAT applied, start to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Unique within a data directory; a later record with the same id supersedes an earlier one
    /// (an open binding is written once when seen, and again when it ends).
    pub id: u64,
    pub proto: u8,
    pub zone: u16,
    pub mark: u32,
    /// conntrack status bits at capture (IPS_SRC_NAT / IPS_DST_NAT tell the NAT kind).
    pub status: u32,
    pub orig: Tuple,
    pub reply: Tuple,
    /// Start, nanoseconds since the Unix epoch, UTC.
    pub start_ns: i64,
    pub start_approximate: bool,
    pub start_source: StartSource,
    /// End, nanoseconds since the Unix epoch, UTC; `None` while the binding is open.
    pub end_ns: Option<i64>,
    pub end_approximate: bool,
    /// Counters of the original direction (subscriber to destination for SNAT).
    pub orig_counters: Option<Counters>,
    /// Counters of the reply direction.
    pub reply_counters: Option<Counters>,
}

/// An address and port as the investigator sees them.
pub type Endpoint = (IpAddr, u16);

impl Binding {
    /// A binding with every field zero or empty, to build others from.
    pub const EMPTY: Binding = Binding {
        id: 0,
        proto: 0,
        zone: 0,
        mark: 0,
        status: 0,
        orig: Tuple::UNSPECIFIED,
        reply: Tuple::UNSPECIFIED,
        start_ns: 0,
        start_approximate: false,
        start_source: StartSource::Ring,
        end_ns: None,
        end_approximate: false,
        orig_counters: None,
        reply_counters: None,
    };

    #[must_use]
    pub fn key(&self) -> ConntrackKey {
        ConntrackKey {
            proto: self.proto,
            orig: self.orig,
            zone: self.zone,
        }
    }

    /// A binding is a destination NAT (port forward) when DNAT was applied and SNAT was not.
    #[must_use]
    pub fn is_dnat_only(&self) -> bool {
        self.status & IPS_DST_NAT != 0 && self.status & IPS_SRC_NAT == 0
    }

    /// The subscriber side: the original source for SNAT, the forwarded-to host for DNAT.
    #[must_use]
    pub fn internal(&self) -> Endpoint {
        if self.is_dnat_only() {
            (self.reply.src, reply_port(self.proto, &self.reply, true))
        } else {
            (self.orig.src, self.orig.src_port)
        }
    }

    /// The public side: the translated source for SNAT, the address the peer dialled for DNAT.
    #[must_use]
    pub fn external(&self) -> Endpoint {
        if self.is_dnat_only() {
            (self.orig.dst, orig_dst_port(self.proto, &self.orig))
        } else {
            (self.reply.dst, reply_port(self.proto, &self.reply, false))
        }
    }

    /// The remote peer: the server the subscriber reached (SNAT) or the client that reached
    /// the forwarded port (DNAT). For ICMP echo the port is 0.
    #[must_use]
    pub fn destination(&self) -> Endpoint {
        if self.is_dnat_only() {
            (self.orig.src, self.orig.src_port)
        } else {
            (self.orig.dst, orig_dst_port(self.proto, &self.orig))
        }
    }
}

/// The destination port of an original tuple (0 for ICMP echo).
fn orig_dst_port(proto: u8, t: &Tuple) -> u16 {
    if is_icmp(proto) { 0 } else { t.dst_port }
}

/// A port of the reply tuple: the reply source port (`src = true`) or destination port.
/// For ICMP echo both sides share the (possibly translated) identifier in `src_port`.
fn reply_port(proto: u8, t: &Tuple, src: bool) -> u16 {
    if is_icmp(proto) || src {
        t.src_port
    } else {
        t.dst_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn snat_view_takes_internal_from_original_and_external_from_reply() {
        let b = Binding {
            id: 1,
            proto: IPPROTO_TCP,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT | IPS_CONFIRMED,
            orig: Tuple {
                src: v4("100.64.0.10"),
                dst: v4("192.0.2.2"),
                src_port: 40000,
                dst_port: 80,
            },
            reply: Tuple {
                src: v4("192.0.2.2"),
                dst: v4("203.0.113.7"),
                src_port: 80,
                dst_port: 20001,
            },
            start_ns: 0,
            start_approximate: false,
            start_source: StartSource::Ring,
            end_ns: None,
            end_approximate: false,
            orig_counters: None,
            reply_counters: None,
        };
        assert_eq!(b.internal(), (v4("100.64.0.10"), 40000));
        assert_eq!(b.external(), (v4("203.0.113.7"), 20001));
        assert_eq!(b.destination(), (v4("192.0.2.2"), 80));
    }

    #[test]
    fn icmp_view_uses_echo_identifier_as_port() {
        let b = Binding {
            id: 1,
            proto: IPPROTO_ICMP,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT,
            orig: Tuple {
                src: v4("100.64.0.10"),
                dst: v4("192.0.2.2"),
                src_port: 7,
                dst_port: 0,
            },
            reply: Tuple {
                src: v4("192.0.2.2"),
                dst: v4("203.0.113.7"),
                src_port: 9,
                dst_port: 0,
            },
            start_ns: 0,
            start_approximate: false,
            start_source: StartSource::Ring,
            end_ns: None,
            end_approximate: false,
            orig_counters: None,
            reply_counters: None,
        };
        assert_eq!(b.internal(), (v4("100.64.0.10"), 7));
        assert_eq!(b.external(), (v4("203.0.113.7"), 9));
        assert_eq!(b.destination(), (v4("192.0.2.2"), 0));
    }

    #[test]
    fn dnat_view_takes_internal_from_reply_source() {
        let b = Binding {
            id: 1,
            proto: IPPROTO_TCP,
            zone: 0,
            mark: 0,
            status: IPS_DST_NAT,
            orig: Tuple {
                src: v4("198.51.100.9"),
                dst: v4("203.0.113.7"),
                src_port: 5555,
                dst_port: 8080,
            },
            reply: Tuple {
                src: v4("100.64.0.10"),
                dst: v4("198.51.100.9"),
                src_port: 80,
                dst_port: 5555,
            },
            start_ns: 0,
            start_approximate: false,
            start_source: StartSource::Ring,
            end_ns: None,
            end_approximate: false,
            orig_counters: None,
            reply_counters: None,
        };
        assert_eq!(b.internal(), (v4("100.64.0.10"), 80));
        assert_eq!(b.external(), (v4("203.0.113.7"), 8080));
        assert_eq!(b.destination(), (v4("198.51.100.9"), 5555));
    }
}
