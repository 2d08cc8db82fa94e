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

/// One new NAT binding, as the netfilter program saw its first packet.
///
/// The tuples are raw copies of the kernel's `ct->tuplehash[dir].tuple`; the agent decodes
/// them with member offsets read from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NatEvent {
    /// `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME) when the packet was seen.
    pub boot_ns: u64,
    /// `ct->status` (IPS_* bits).
    pub status: u32,
    /// `ct->mark`, 0 when the kernel has no conntrack marks.
    pub mark: u32,
    /// `ct->zone.id`, 0 when the kernel has no conntrack zones.
    pub zone: u16,
    /// `EVENT_*` bits saying where the record comes from (0: the netfilter program, or the
    /// fexit program after the SRC manip, i.e. the complete binding).
    pub flags: u16,
    /// Reserved, zero.
    pub pad1: u32,
    /// Original-direction tuple bytes.
    pub orig: [u8; TUPLE_BYTES],
    /// Reply-direction tuple bytes (holds the translated external address and port).
    pub reply: [u8; TUPLE_BYTES],
}

const _: () = assert!(core::mem::size_of::<NatEvent>() == 24 + 2 * TUPLE_BYTES);

/// Kernel struct member offsets, in bytes, handed to the program as a read-only global
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
}

const _: () = assert!(core::mem::size_of::<ProgramConfig>() == 32);

/// [`NatEvent::flags`]: the record was taken at fexit of `nf_nat_setup_info` for the DST
/// manip (`NF_NAT_MANIP_DST`). The source translation may still follow, so the tuples are not
/// yet final; the SRC-manip record of the same entry (flag clear) is the complete binding.
pub const EVENT_DST_MANIP: u16 = 1;

/// One conntrack entry destroyed, as the fentry program on `nf_ct_destroy` saw it
/// (PROTOTYPE: the agent only counts these so far).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EndEvent {
    /// `bpf_ktime_get_boot_ns()` at destroy.
    pub boot_ns: u64,
    /// `ct->status`.
    pub status: u32,
    /// `ct->zone.id`, 0 without zones.
    pub zone: u16,
    /// [`END_HAS_ACCT`] when the accounting extension was present.
    pub flags: u16,
    /// Packets original, reply (from `struct nf_conn_acct`).
    pub packets: [u64; 2],
    /// Bytes original, reply.
    pub bytes: [u64; 2],
    /// Original-direction tuple bytes.
    pub orig: [u8; TUPLE_BYTES],
}

const _: () = assert!(core::mem::size_of::<EndEvent>() == 48 + TUPLE_BYTES);

/// [`EndEvent::flags`]: the counters come from the accounting extension.
pub const END_HAS_ACCT: u16 = 1;

/// Offsets the end program needs besides [`ProgramConfig`]'s; `.rodata`, frozen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EndConfig {
    /// `offsetof(struct nf_conn, ext)`.
    pub ct_ext: u32,
    /// `offsetof(struct nf_ct_ext, offset) + NF_CT_EXT_ACCT`: the u8 that locates the
    /// accounting extension inside `ext` (0: absent).
    pub ext_acct_slot: u32,
}

/// Index of the only slot of the per-CPU loss counter map.
pub const LOST_SLOT: u32 = 0;

/// Names of the maps and globals in the eBPF object, shared so the loader and the program
/// cannot disagree.
pub mod names {
    /// Ring buffer of [`super::NatEvent`].
    pub const EVENTS_MAP: &str = "NAT_EVENTS";
    /// Per-CPU array, one `u64`: ring-buffer reservations that failed (records lost).
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
    /// Ring buffer of [`super::EndEvent`].
    pub const ENDS_MAP: &str = "NAT_ENDS";
    /// The [`super::EndConfig`] global.
    pub const END_CONFIG_GLOBAL: &str = "END_CONFIG";
    /// The fentry program on `nf_ct_destroy`.
    pub const END_PROGRAM: &str = "ct_destroy_entry";
    /// The function it attaches to, and its module.
    pub const END_TARGET: &str = "nf_ct_destroy";
    pub const END_TARGET_MODULE: &str = "nf_conntrack";
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
