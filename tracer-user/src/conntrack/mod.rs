//! The ctnetlink (conntrack netlink) side of the agent.
//!
//! * [`ConntrackSysctls`] switches on the per-namespace sysctls the agent relies on
//!   (destroy events for every entry, accounting, timestamps) and puts them back.
//! * [`DestroyListener`] receives the `DESTROY` event of every conntrack entry that ends,
//!   on a non-blocking socket the agent polls (e.g. with tokio's `AsyncFd`).
//! * [`dump_table`] lists every entry alive in the conntrack table, to start from a known
//!   state and to resynchronise after events were lost ([`RecvOutcome::Overrun`]).
//!
//! Everything acts on the network namespace of the calling thread at the time of the call
//! (sockets stay bound to the namespace they were opened in).

mod codec;
mod socket;
mod sysctl;

#[cfg(test)]
mod live_tests;

use std::io;
use std::path::PathBuf;

use crate::binding::{ConntrackKey, Counters, IPS_DST_NAT, IPS_SRC_NAT, Tuple};

pub use socket::{DestroyListener, RecvOutcome, dump_table};
pub use sysctl::ConntrackSysctls;

/// One conntrack entry as ctnetlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// L4 protocol number (IPPROTO_*).
    pub proto: u8,
    /// Original-direction tuple. For ICMP and ICMPv6 echo, `src_port` is the echo identifier
    /// (`CTA_PROTO_ICMP_ID` / `CTA_PROTO_ICMPV6_ID`) and `dst_port` is 0.
    pub orig: Tuple,
    /// Reply-direction tuple, same convention (the identifier is in `src_port` here too).
    pub reply: Tuple,
    /// Conntrack zone: `CTA_ZONE`; for a zone that applies to one direction only, the
    /// `CTA_TUPLE_ZONE` of the original (else reply) tuple; 0 when there is none.
    pub zone: u16,
    /// Connection mark (`CTA_MARK`), 0 when absent.
    pub mark: u32,
    /// Status bits (`CTA_STATUS`, IPS_*), 0 when absent.
    pub status: u32,
    /// Counters of the original direction (`CTA_COUNTERS_ORIG`); present only for entries
    /// created while `nf_conntrack_acct` was on.
    pub orig_counters: Option<Counters>,
    /// Counters of the reply direction (`CTA_COUNTERS_REPLY`).
    pub reply_counters: Option<Counters>,
    /// Creation time, nanoseconds since the Unix epoch (`CTA_TIMESTAMP_START`, the kernel's
    /// wall clock); present only for entries created while `nf_conntrack_timestamp` was on.
    pub start_ns: Option<i64>,
    /// End time, nanoseconds since the Unix epoch (`CTA_TIMESTAMP_STOP`); set in `DESTROY`
    /// events of timestamped entries, absent for live entries.
    pub stop_ns: Option<i64>,
}

impl CtEntry {
    /// The key that matches this entry to the start the eBPF side recorded.
    #[must_use]
    pub fn key(&self) -> ConntrackKey {
        ConntrackKey {
            proto: self.proto,
            orig: self.orig,
            zone: self.zone,
        }
    }

    /// True when source or destination NAT was applied (`IPS_SRC_NAT` or `IPS_DST_NAT`).
    #[must_use]
    pub fn is_nat(&self) -> bool {
        self.status & (IPS_SRC_NAT | IPS_DST_NAT) != 0
    }
}

/// Everything that can go wrong talking to conntrack.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// A conntrack sysctl does not exist in the current network namespace.
    #[error(
        "conntrack sysctl {} not found: is nf_conntrack loaded (modprobe nf_conntrack), \
         with event support (CONFIG_NF_CONNTRACK_EVENTS)?",
        path.display()
    )]
    SysctlMissing {
        /// The missing file under /proc/sys/net/netfilter.
        path: PathBuf,
    },

    /// A conntrack sysctl exists but could not be read.
    #[error(
        "cannot read conntrack sysctl {}: check that /proc is mounted and readable",
        path.display()
    )]
    SysctlRead {
        /// The sysctl file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },

    /// A conntrack sysctl could not be written (switching it on, or restoring it).
    #[error(
        "cannot set conntrack sysctl {} to {value}: run as root (CAP_NET_ADMIN in this network \
         namespace) with /proc/sys mounted read-write",
        path.display()
    )]
    SysctlWrite {
        /// The sysctl file.
        path: PathBuf,
        /// The value that could not be written.
        value: String,
        /// Why writing failed.
        #[source]
        source: io::Error,
    },

    /// Opening or configuring a ctnetlink socket failed.
    #[error(
        "cannot {action} on a ctnetlink socket: run as root (CAP_NET_ADMIN) on a kernel with \
         nf_conntrack_netlink (modprobe nf_conntrack_netlink)"
    )]
    Socket {
        /// What was being done, e.g. "subscribe to conntrack destroy events".
        action: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },

    /// Sending the dump request failed.
    #[error("cannot send the conntrack dump request: is nf_conntrack_netlink available?")]
    Send {
        /// The system error.
        #[source]
        source: io::Error,
    },

    /// Receiving from a ctnetlink socket failed.
    #[error(
        "cannot receive from the ctnetlink socket: check the kernel log; restarting the agent \
         reopens it"
    )]
    Recv {
        /// The system error.
        #[source]
        source: io::Error,
    },

    /// The kernel answered the dump request with an error.
    #[error(
        "the kernel refused to dump the conntrack table: run as root (CAP_NET_ADMIN) with \
         nf_conntrack_netlink available (modprobe nf_conntrack_netlink)"
    )]
    DumpRefused {
        /// The error the kernel reported.
        #[source]
        source: io::Error,
    },

    /// The dump was interrupted (table changed under it, or messages lost) on every attempt.
    #[error(
        "the conntrack table dump was interrupted {attempts} times in a row: the table changes \
         too fast or memory is short; retry later"
    )]
    DumpInterrupted {
        /// How many dumps were tried.
        attempts: u32,
    },

    /// The kernel stopped sending dump messages before the end of the dump.
    #[error(
        "the kernel sent nothing for {secs} s in the middle of a conntrack table dump: retry; \
         check the kernel log"
    )]
    DumpTimeout {
        /// How long we waited for the next message.
        secs: u64,
    },

    /// A message from the kernel could not be decoded.
    #[error(
        "malformed ctnetlink message ({reason}): unexpected kernel format or a bug in nattrace; \
         please report it with the kernel version"
    )]
    Malformed {
        /// What is wrong with the message.
        reason: String,
    },
}
