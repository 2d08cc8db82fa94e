//! Types shared by the nattrace eBPF programs (kernel side) and the agent (user side).
//!
//! Everything here is `#[repr(C)]` without implicit padding: the eBPF program writes these
//! bytes into the ring buffer and the agent reads them back on the same machine.
#![no_std]

/// Bytes of one `struct nf_conntrack_tuple` copied into an event. The kernel's tuple is
/// 40 bytes on every Linux version nattrace supports; the agent checks the real size from
/// BTF at start-up and refuses to run if it is larger.
pub const TUPLE_BYTES: usize = 48;

/// Marks an offset the running kernel does not have (e.g. `nf_conn.mark` without
/// CONFIG_NF_CONNTRACK_MARK): the program then reports 0 for that field.
pub const OFFSET_ABSENT: u32 = u32::MAX;

/// One new NAT binding, as a capture program saw it set up (or, with [`EVENT_END`], the
/// first part of an [`EndEvent`]).
///
/// The tuples are raw copies of the kernel's `ct->tuplehash[dir].tuple`; the agent decodes
/// them with member offsets read from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatEvent {
    /// `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME) when the binding was seen (or destroyed).
    pub boot_ns: u64,
    /// `ct->status` (IPS_* bits).
    pub status: u32,
    /// `ct->mark`, 0 when the kernel has no conntrack marks.
    pub mark: u32,
    /// `ct->zone.id`, 0 when the kernel has no conntrack zones.
    pub zone: u16,
    /// `EVENT_*` bits saying what the record is (0: a complete binding's start).
    pub flags: u16,
    /// Reserved, zero.
    pub pad1: u32,
    /// Original-direction tuple bytes.
    pub orig: [u8; TUPLE_BYTES],
    /// Reply-direction tuple bytes (holds the translated external address and port).
    pub reply: [u8; TUPLE_BYTES],
}

const _: () = assert!(core::mem::size_of::<NatEvent>() == 24 + 2 * TUPLE_BYTES);

/// Kernel struct member offsets, in bytes, handed to the programs as a read-only global
/// (`.rodata`, frozen), so the verifier sees them as constants. Rust eBPF has no CO-RE:
/// the agent fills this from the running kernel's BTF before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramConfig {
    /// `offsetof(struct sk_buff, _nfct)`.
    pub skb_nfct: u32,
    /// `offsetof(struct nf_conn, status)`.
    pub ct_status: u32,
    /// Offset of the original-direction tuple: `offsetof(struct nf_conn, tuplehash[0].tuple)`.
    pub ct_tuple_orig: u32,
    /// Offset of the reply-direction tuple: `offsetof(struct nf_conn, tuplehash[1].tuple)`.
    pub ct_tuple_reply: u32,
    /// `offsetof(struct nf_conn, zone.id)` or [`OFFSET_ABSENT`].
    pub ct_zone_id: u32,
    /// `offsetof(struct nf_conn, mark)` or [`OFFSET_ABSENT`].
    pub ct_mark: u32,
    /// Wake the consumer only once this many bytes wait in the ring buffer; below that the
    /// record is submitted without a wakeup and the agent drains on its own timer.
    pub wakeup_bytes: u64,
    /// `offsetof(struct nf_conn, ct_net.net)`: the entry's network namespace.
    pub ct_net: u32,
    /// `offsetof(struct net, ns.inum)`: the namespace's inode number.
    pub net_ns_inum: u32,
    /// Report only entries of the network namespace with this inode number (the agent's);
    /// 0 reports every namespace. The tracing and kprobe programs fire for every namespace on
    /// the host; the netfilter program is linked to one and leaves this 0.
    pub netns_ino: u32,
    /// `offsetof(struct nf_conn, ext)`: the extension area (accounting, timestamps).
    pub ct_ext: u32,
    /// `offsetof(struct nf_ct_ext, offset) + NF_CT_EXT_ACCT`: the byte that locates the
    /// accounting extension inside `ext` (0 there: absent), or [`OFFSET_ABSENT`].
    pub ext_acct_slot: u32,
    /// `offsetof(struct nf_ct_ext, offset) + NF_CT_EXT_TSTAMP`, or [`OFFSET_ABSENT`].
    pub ext_tstamp_slot: u32,
}

const _: () = assert!(core::mem::size_of::<ProgramConfig>() == 56);

/// [`NatEvent::flags`]: the record was taken at fexit of `nf_nat_setup_info` for the DST
/// manip (`NF_NAT_MANIP_DST`). The source translation may still follow, so the tuples are not
/// yet final; the SRC-manip record of the same entry (flag clear) is the complete binding.
pub const EVENT_DST_MANIP: u16 = 1;
/// [`NatEvent::flags`]: the record is an [`EndEvent`] (the entry was destroyed).
pub const EVENT_END: u16 = 2;
/// [`NatEvent::flags`] of an end: the counters come from the accounting extension.
pub const EVENT_HAS_ACCT: u16 = 4;
/// [`NatEvent::flags`] of an end: `tstamp_start_ns` and `tstamp_stop_ns` come from the
/// timestamp extension.
pub const EVENT_HAS_TSTAMP: u16 = 8;

/// One conntrack entry with a translation destroyed, as the programs on the conntrack destroy
/// path (`nf_ct_destroy`) saw it. Pushed into the same ring buffer as the starts, so an
/// entry's end always follows its start there.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EndEvent {
    /// Time of destruction, status, zone, mark and both tuples; `flags` has [`EVENT_END`].
    pub common: NatEvent,
    /// Packets original, reply (from `struct nf_conn_acct`), when [`EVENT_HAS_ACCT`].
    pub packets: [u64; 2],
    /// Bytes original, reply, when [`EVENT_HAS_ACCT`].
    pub bytes: [u64; 2],
    /// `struct nf_conn_tstamp.start` (CLOCK_REALTIME ns) when [`EVENT_HAS_TSTAMP`].
    pub tstamp_start_ns: u64,
    /// `struct nf_conn_tstamp.stop` (CLOCK_REALTIME ns) when [`EVENT_HAS_TSTAMP`], 0 when not
    /// set. The kernel sets it when it deletes the entry, dated back to the moment a timed-out
    /// entry expired (its garbage collection can come much later); the agent prefers it to
    /// the time of the destroy hook.
    pub tstamp_stop_ns: u64,
}

const _: () = assert!(core::mem::size_of::<EndEvent>() == core::mem::size_of::<NatEvent>() + 48);

/// Slot of the per-CPU loss counter map counting starts that found the ring buffer full.
pub const LOST_SLOT: u32 = 0;
/// Slot counting ends that found the ring buffer full.
pub const LOST_END_SLOT: u32 = 1;

/// Names of the maps and globals in the eBPF object, shared so the loader and the program
/// cannot disagree.
pub mod names {
    /// Ring buffer of [`super::NatEvent`].
    pub const EVENTS_MAP: &str = "NAT_EVENTS";
    /// Per-CPU array of `u64`: ring-buffer reservations that failed (records lost), starts
    /// at [`super::LOST_SLOT`], ends at [`super::LOST_END_SLOT`].
    pub const LOST_MAP: &str = "NAT_EVENTS_LOST";
    /// The [`super::ProgramConfig`] global.
    pub const CONFIG_GLOBAL: &str = "NAT_CONFIG";
    /// The netfilter program.
    pub const PROGRAM: &str = "nat_binding";
    /// The fexit program on `nf_nat_setup_info` (the fentry backend).
    pub const FEXIT_PROGRAM: &str = "nat_setup_exit";
    /// The kernel function the fexit program attaches to.
    pub const FEXIT_TARGET: &str = "nf_nat_setup_info";
    /// The kernel module that holds [`FEXIT_TARGET`] on distribution kernels.
    pub const FEXIT_TARGET_MODULE: &str = "nf_nat";
    /// The fentry program on `nf_ct_destroy`.
    pub const END_PROGRAM: &str = "ct_destroy_entry";
    /// The function it attaches to, and its module.
    pub const END_TARGET: &str = "nf_ct_destroy";
    pub const END_TARGET_MODULE: &str = "nf_conntrack";
    /// The kprobe program on `__nf_conntrack_confirm(skb)` (the kprobe backend's starts).
    pub const KPROBE_START_PROGRAM: &str = "ct_confirm_entry";
    /// The function it probes.
    pub const KPROBE_START_TARGET: &str = "__nf_conntrack_confirm";
    /// The kprobe program on the destroy path (the kprobe backend's ends).
    pub const KPROBE_END_PROGRAM: &str = "ct_destroy_kprobe";
    /// Functions the end kprobe can probe, best first: `nf_ct_destroy` (Linux >= 5.19),
    /// `destroy_conntrack` (older kernels, called through the `nf_ct_destroy` hook).
    pub const KPROBE_END_TARGETS: [&str; 2] = ["nf_ct_destroy", "destroy_conntrack"];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::NatEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProgramConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndEvent {}
}
