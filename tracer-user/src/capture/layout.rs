//! The one place that knows the kernel structures nattrace reads: `sk_buff._nfct`,
//! `nf_conn` and `nf_conntrack_tuple`. Offsets come from the running kernel's BTF.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use tracer_common::{
    EVENT_HAS_ACCT, EVENT_HAS_TSTAMP, EndEvent, NatEvent, OFFSET_ABSENT, ProgramConfig, TUPLE_BYTES,
};

use super::CapturedEnd;
use crate::{
    binding::{Counters, Tuple, is_icmp},
    btf::{Btf, BtfError},
    conntrack::CtEntry,
};

/// Module split BTF that describes `nf_conn` on kernels building conntrack as a module.
const NF_CONNTRACK_MODULE_BTF: &str = "/sys/kernel/btf/nf_conntrack";

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Errors deriving the kernel layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The BTF could not be read or lacks a needed member.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A struct is bigger than the event leaves room for.
    #[error("kernel struct nf_conntrack_tuple is {size} bytes, nattrace copies at most {max}")]
    TupleTooLarge { size: u32, max: usize },
    /// A member has a size the program does not expect.
    #[error("kernel member {member} is {size} bytes, expected {expected}")]
    UnexpectedSize {
        member: &'static str,
        size: u32,
        expected: u32,
    },
}

/// Byte offsets inside `struct nf_conntrack_tuple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleLayout {
    /// `src.u3`: source address (4 bytes for IPv4, 16 for IPv6).
    pub src_addr: usize,
    /// `src.u`: source port or ICMP echo id, network byte order.
    pub src_port: usize,
    /// `src.l3num`: address family, host byte order.
    pub l3num: usize,
    /// `dst.u3`: destination address.
    pub dst_addr: usize,
    /// `dst.u`: destination port (ICMP type and code), network byte order.
    pub dst_port: usize,
    /// `dst.protonum`: L4 protocol.
    pub protonum: usize,
    /// `sizeof(struct nf_conntrack_tuple)`.
    pub size: usize,
}

/// What the kernel layout tells the program (offsets) and the agent (how to decode tuples).
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    pub program: ProgramConfig,
    pub tuple: TupleLayout,
}

impl KernelLayout {
    /// The running kernel's layout, as every backend's check needs it: an error when the
    /// kernel publishes no BTF or the BTF lacks what the programs read.
    pub fn probe() -> Result<Self, super::CaptureError> {
        if !Path::new(crate::btf::VMLINUX_BTF).exists() {
            return Err(super::CaptureError::NoBtf {
                path: crate::btf::VMLINUX_BTF.to_owned(),
            });
        }
        Self::from_running_kernel().map_err(|source| super::CaptureError::Layout { source })
    }

    /// True when the programs can tell an entry's network namespace (the fentry and kprobe
    /// backends need it: their hooks fire for every namespace).
    #[must_use]
    pub fn has_netns_filter(&self) -> bool {
        self.program.ct_net != OFFSET_ABSENT && self.program.net_ns_inum != OFFSET_ABSENT
    }

    /// The programs' configuration: these offsets, wakeups batched for a ring of
    /// `ring_bytes`, and only entries of the network namespace `netns_ino` reported (0: all).
    #[must_use]
    pub fn config_for(&self, ring_bytes: u32, netns_ino: u32) -> ProgramConfig {
        let mut config = self.program;
        // Wake the agent once a quarter of the ring (at most 256 KiB) is waiting; below that
        // it drains on its own timer. A wakeup per record would halve the NAT's rate.
        config.wakeup_bytes = u64::from(ring_bytes / 4).min(256 * 1024);
        config.netns_ino = netns_ino;
        config
    }

    /// Reads the running kernel's BTF (and conntrack's module BTF when conntrack is a module).
    pub fn from_running_kernel() -> Result<Self, LayoutError> {
        let vmlinux = Btf::from_sys_fs()?;
        let module = Path::new(NF_CONNTRACK_MODULE_BTF);
        // The module's split BTF includes vmlinux's and adds what the module defines (on
        // distribution kernels: nf_conn, its extensions and their enum).
        let btf = if module.exists() {
            vmlinux.with_split_file(module)?
        } else {
            vmlinux
        };
        Self::from_btf(&btf)
    }

    /// Derives the layout from parsed BTF.
    pub fn from_btf(btf: &Btf) -> Result<Self, LayoutError> {
        let nfct = btf.member("sk_buff", &["_nfct"])?;
        expect_size("sk_buff._nfct", nfct.size, 8)?;
        let status = btf.member("nf_conn", &["status"])?;
        expect_size("nf_conn.status", status.size, 8)?;
        let orig = btf.member("nf_conn", &["tuplehash[0]", "tuple"])?;
        let reply = btf.member("nf_conn", &["tuplehash[1]", "tuple"])?;
        // Zones and marks are optional kernel features (CONFIG_NF_CONNTRACK_ZONES / _MARK).
        let zone = btf
            .member("nf_conn", &["zone", "id"])
            .map_or(OFFSET_ABSENT, |m| m.offset);
        let mark = btf
            .member("nf_conn", &["mark"])
            .map_or(OFFSET_ABSENT, |m| m.offset);
        // For the programs that fire in every namespace (fentry, kprobe): which namespace an
        // entry belongs to. Every distribution kernel has CONFIG_NET_NS.
        // Absent offsets are checked by the backends that need them (`has_netns_filter`).
        let ct_net = btf
            .member("nf_conn", &["ct_net", "net"])
            .ok()
            .filter(|m| m.size == 8)
            .map_or(OFFSET_ABSENT, |m| m.offset);
        let ns_inum = btf
            .member("net", &["ns", "inum"])
            .ok()
            .filter(|m| m.size == 4)
            .map_or(OFFSET_ABSENT, |m| m.offset);
        // For the end programs: the accounting and timestamp extensions. Their slots are the
        // enumerators of `enum nf_ct_ext_id`, which depend on the kernel's configuration.
        let ext = btf.member("nf_conn", &["ext"]).ok().filter(|m| m.size == 8);
        let ext_offset = btf.member("nf_ct_ext", &["offset"]).ok();
        let slot = |name: &str| match (ext, ext_offset, btf.enumerator(name)) {
            (Some(_), Some(o), Some(v)) => u32::try_from(v).map_or(OFFSET_ABSENT, |v| o.offset + v),
            _ => OFFSET_ABSENT,
        };

        let t = "nf_conntrack_tuple";
        let size = btf.struct_size(t)?;
        if size as usize > TUPLE_BYTES {
            return Err(LayoutError::TupleTooLarge {
                size,
                max: TUPLE_BYTES,
            });
        }
        let off = |path: &[&str]| btf.member(t, path).map(|m| m.offset as usize);
        let tuple = TupleLayout {
            src_addr: off(&["src", "u3"])?,
            src_port: off(&["src", "u"])?,
            l3num: off(&["src", "l3num"])?,
            dst_addr: off(&["dst", "u3"])?,
            dst_port: off(&["dst", "u"])?,
            protonum: off(&["dst", "protonum"])?,
            size: size as usize,
        };
        Ok(Self {
            program: ProgramConfig {
                skb_nfct: nfct.offset,
                ct_status: status.offset,
                ct_tuple_orig: orig.offset,
                ct_tuple_reply: reply.offset,
                ct_zone_id: zone,
                ct_mark: mark,
                wakeup_bytes: 0,
                ct_net,
                net_ns_inum: ns_inum,
                netns_ino: 0,
                ct_ext: ext.map_or(0, |m| m.offset),
                ext_acct_slot: slot("NF_CT_EXT_ACCT"),
                ext_tstamp_slot: slot("NF_CT_EXT_TSTAMP"),
            },
            tuple,
        })
    }
}

fn expect_size(member: &'static str, size: u32, expected: u32) -> Result<(), LayoutError> {
    if size == expected {
        Ok(())
    } else {
        Err(LayoutError::UnexpectedSize {
            member,
            size,
            expected,
        })
    }
}

/// A decoded new-binding event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartEvent {
    pub proto: u8,
    pub orig: Tuple,
    pub reply: Tuple,
    pub zone: u16,
    pub mark: u32,
    pub status: u32,
    /// CLOCK_BOOTTIME nanoseconds when the first packet was seen.
    pub boot_ns: u64,
}

impl TupleLayout {
    /// Decodes one raw `nf_conntrack_tuple`; returns the L4 protocol and the tuple, or `None`
    /// for an address family other than IPv4/IPv6.
    #[must_use]
    pub fn decode(&self, raw: &[u8; TUPLE_BYTES]) -> Option<(u8, Tuple)> {
        let l3num = u16::from_ne_bytes([raw[self.l3num], raw[self.l3num + 1]]);
        let addr = |at: usize| -> Option<IpAddr> {
            match l3num {
                AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                    raw[at],
                    raw[at + 1],
                    raw[at + 2],
                    raw[at + 3],
                ))),
                AF_INET6 => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&raw[at..at + 16]);
                    Some(IpAddr::V6(Ipv6Addr::from(b)))
                }
                _ => None,
            }
        };
        let proto = raw[self.protonum];
        // Ports and the ICMP echo id are kept in network byte order.
        let be16 = |at: usize| u16::from_be_bytes([raw[at], raw[at + 1]]);
        let (src_port, dst_port) = if is_icmp(proto) {
            (be16(self.src_port), 0)
        } else {
            (be16(self.src_port), be16(self.dst_port))
        };
        Some((
            proto,
            Tuple {
                src: addr(self.src_addr)?,
                dst: addr(self.dst_addr)?,
                src_port,
                dst_port,
            },
        ))
    }

    /// Decodes a ring-buffer record.
    #[must_use]
    pub fn decode_event(&self, ev: &NatEvent) -> Option<StartEvent> {
        let (proto, orig) = self.decode(&ev.orig)?;
        let (_, reply) = self.decode(&ev.reply)?;
        Some(StartEvent {
            proto,
            orig,
            reply,
            zone: ev.zone,
            mark: ev.mark,
            status: ev.status,
            boot_ns: ev.boot_ns,
        })
    }

    /// Decodes an end record (flagged `EVENT_END`).
    #[must_use]
    pub fn decode_end(&self, ev: &EndEvent) -> Option<CapturedEnd> {
        let c = &ev.common;
        let (proto, orig) = self.decode(&c.orig)?;
        let (_, reply) = self.decode(&c.reply)?;
        let acct = c.flags & EVENT_HAS_ACCT != 0;
        let tstamp = |ns: u64| {
            (c.flags & EVENT_HAS_TSTAMP != 0 && ns != 0)
                .then(|| i64::try_from(ns).ok())
                .flatten()
        };
        let counters = |dir: usize| {
            acct.then_some(Counters {
                packets: ev.packets[dir],
                bytes: ev.bytes[dir],
            })
        };
        Some(CapturedEnd {
            boot_ns: c.boot_ns,
            entry: CtEntry {
                proto,
                orig,
                reply,
                zone: c.zone,
                mark: c.mark,
                status: c.status,
                orig_counters: counters(0),
                reply_counters: counters(1),
                start_ns: tstamp(ev.tstamp_start_ns),
                stop_ns: tstamp(ev.tstamp_stop_ns),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of Linux 6.x on x86_64, as a fixture independent of the running kernel.
    fn linux6_layout() -> TupleLayout {
        TupleLayout {
            src_addr: 0,
            src_port: 16,
            l3num: 18,
            dst_addr: 20,
            dst_port: 36,
            protonum: 38,
            size: 40,
        }
    }

    fn raw_v4(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> [u8; TUPLE_BYTES] {
        let mut r = [0u8; TUPLE_BYTES];
        r[0..4].copy_from_slice(&src);
        r[16..18].copy_from_slice(&sport.to_be_bytes());
        r[18..20].copy_from_slice(&AF_INET.to_ne_bytes());
        r[20..24].copy_from_slice(&dst);
        r[36..38].copy_from_slice(&dport.to_be_bytes());
        r[38] = proto;
        r
    }

    #[test]
    fn decodes_ipv4_tcp_event() {
        let l = linux6_layout();
        let ev = NatEvent {
            boot_ns: 42,
            status: 0x1b0,
            mark: 7,
            zone: 3,
            flags: 0,
            pad1: 0,
            orig: raw_v4(6, [100, 64, 0, 10], 40000, [192, 0, 2, 2], 80),
            reply: raw_v4(6, [192, 0, 2, 2], 80, [203, 0, 113, 7], 20001),
        };
        let s = l.decode_event(&ev).unwrap();
        assert_eq!(s.proto, 6);
        assert_eq!(s.orig.src, "100.64.0.10".parse::<IpAddr>().unwrap());
        assert_eq!((s.orig.src_port, s.orig.dst_port), (40000, 80));
        assert_eq!(s.reply.dst, "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(s.reply.dst_port, 20001);
        assert_eq!((s.zone, s.mark, s.boot_ns), (3, 7, 42));
    }

    #[test]
    fn decodes_ipv6_icmp_echo_id_as_source_port() {
        let l = linux6_layout();
        let mut r = [0u8; TUPLE_BYTES];
        let src: Ipv6Addr = "fd00:64::10".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        r[0..16].copy_from_slice(&src.octets());
        r[16..18].copy_from_slice(&0x1234u16.to_be_bytes());
        r[18..20].copy_from_slice(&AF_INET6.to_ne_bytes());
        r[20..36].copy_from_slice(&dst.octets());
        r[36] = 128; // echo request type, code 0
        r[38] = 58;
        let (proto, t) = l.decode(&r).unwrap();
        assert_eq!(proto, 58);
        assert_eq!(
            (t.src, t.dst, t.src_port, t.dst_port),
            (IpAddr::V6(src), IpAddr::V6(dst), 0x1234, 0)
        );
    }

    #[test]
    fn decodes_an_end_with_counters_and_timestamp_only_when_flagged() {
        let common = NatEvent {
            boot_ns: 42,
            status: 0x1b8,
            mark: 7,
            zone: 3,
            flags: tracer_common::EVENT_END | EVENT_HAS_ACCT,
            pad1: 0,
            orig: raw_v4(17, [100, 64, 0, 2], 4000, [203, 0, 113, 2], 53),
            reply: raw_v4(17, [203, 0, 113, 2], 53, [203, 0, 113, 1], 61000),
        };
        let mut ev = EndEvent {
            common,
            packets: [2, 1],
            bytes: [120, 80],
            tstamp_start_ns: 1_700_000_000_000_000_000,
            tstamp_stop_ns: 1_700_000_000_500_000_000,
        };
        let end = linux6_layout().decode_end(&ev).unwrap();
        assert_eq!(end.boot_ns, 42);
        let e = &end.entry;
        assert_eq!((e.proto, e.zone, e.mark, e.status), (17, 3, 7, 0x1b8));
        assert_eq!((e.orig.src_port, e.reply.dst_port), (4000, 61000));
        assert_eq!(
            (e.orig_counters, e.reply_counters),
            (
                Some(Counters {
                    packets: 2,
                    bytes: 120
                }),
                Some(Counters {
                    packets: 1,
                    bytes: 80
                })
            )
        );
        // The timestamp flag is clear: no start time, whatever the field holds.
        assert_eq!((e.start_ns, e.stop_ns), (None, None));
        ev.common.flags = tracer_common::EVENT_END | EVENT_HAS_TSTAMP;
        let e = linux6_layout().decode_end(&ev).unwrap().entry;
        assert_eq!(e.orig_counters, None);
        assert_eq!(e.start_ns, Some(1_700_000_000_000_000_000));
        assert_eq!(e.stop_ns, Some(1_700_000_000_500_000_000));
        ev.tstamp_stop_ns = 0;
        let e = linux6_layout().decode_end(&ev).unwrap().entry;
        assert_eq!(
            e.stop_ns, None,
            "stop not set by the kernel: the agent uses the hook's time"
        );
    }

    #[test]
    fn unknown_family_is_rejected() {
        let mut r = raw_v4(6, [1, 2, 3, 4], 1, [5, 6, 7, 8], 2);
        r[18..20].copy_from_slice(&7u16.to_ne_bytes());
        assert!(linux6_layout().decode(&r).is_none());
    }

    #[test]
    fn running_kernel_layout_matches_linux6_fixture() {
        let k = KernelLayout::from_running_kernel()
            .expect("running kernel BTF must describe conntrack");
        assert_eq!(k.tuple, linux6_layout());
        assert_ne!(k.program.skb_nfct, 0);
        assert!(k.program.ct_tuple_reply > k.program.ct_tuple_orig);
        // What the fentry and kprobe programs need besides.
        assert_ne!(k.program.ct_net, 0);
        assert_ne!(k.program.ct_ext, 0);
        assert_ne!(k.program.ext_acct_slot, OFFSET_ABSENT);
        assert_ne!(k.program.ext_tstamp_slot, OFFSET_ABSENT);
    }
}
