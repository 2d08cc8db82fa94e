//! The netfilter program that reports every new NAT binding.
//!
//! Attached at NF_INET_POST_ROUTING for IPv4 and IPv6 at priority `INT_MAX - 1`: after every
//! NAT hook (srcnat is 100) and before conntrack confirm (`INT_MAX`). At that point the first
//! packet of a new connection carries `ctinfo == IP_CT_NEW` on a conntrack entry not yet
//! CONFIRMED, and `ct->tuplehash[IP_CT_DIR_REPLY]` already holds the translated address and
//! port. Every other packet costs a few loads and a compare.
//!
//! The section name is `classifier/…` only because aya-obj does not know netfilter sections;
//! the agent's own loader loads it as `BPF_PROG_TYPE_NETFILTER`.
//!
//! The same records come from the other backends' programs, for kernels without BPF
//! netfilter links (< 6.4), into the same ring buffer:
//! * fentry backend: fexit on `nf_nat_setup_info(ct, range, maniptype)` for starts, fentry
//!   on `nf_ct_destroy(nfct)` for ends;
//! * kprobe backend: kprobe on `__nf_conntrack_confirm(skb)` for starts (the netfilter
//!   program's own test, one hook later), kprobe on `nf_ct_destroy` (or `destroy_conntrack`
//!   on older kernels) for ends.
//!
//! Ends ([`EndEvent`], flagged [`EVENT_END`]) carry the accounting extension's packet and
//! byte counters, read in the kernel as the entry is freed, so an end cannot be lost to a
//! netlink overrun. The agent loads one backend's programs, never two backends.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::ProbeContext,
};
use tracer_common::{
    EVENT_DST_MANIP, EVENT_END, EVENT_HAS_ACCT, EVENT_HAS_TSTAMP, EndEvent, LOST_END_SLOT,
    LOST_SLOT, NatEvent, OFFSET_ABSENT, ProgramConfig,
};

/// Verdict: let the packet through. The program only observes.
const NF_ACCEPT: i32 = 1;
/// `skb->_nfct` keeps `enum ip_conntrack_info` in its low 3 bits.
const NFCT_INFOMASK: u64 = 7;
/// `IP_CT_NEW`.
const IP_CT_NEW: u64 = 2;
const IPS_CONFIRMED: u64 = 1 << 3;
const IPS_NAT_MASK: u64 = (1 << 4) | (1 << 5); // IPS_SRC_NAT | IPS_DST_NAT
/// `enum nf_nat_manip_type`: `NF_NAT_MANIP_SRC`.
const NF_NAT_MANIP_SRC: u64 = 0;
/// `NF_DROP`: what `nf_nat_setup_info` returns when it could not set the binding up.
const NF_DROP: u64 = 0;

#[map(name = "NAT_EVENTS")]
static NAT_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Failed reservations: starts at `LOST_SLOT`, ends at `LOST_END_SLOT`.
#[map(name = "NAT_EVENTS_LOST")]
static NAT_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Filled by the agent from the running kernel's BTF; `.rodata`, frozen before load.
#[unsafe(no_mangle)]
static NAT_CONFIG: ProgramConfig = ProgramConfig {
    skb_nfct: 0,
    ct_status: 0,
    ct_tuple_orig: 0,
    ct_tuple_reply: 0,
    ct_zone_id: OFFSET_ABSENT,
    ct_mark: OFFSET_ABSENT,
    wakeup_bytes: 0,
    ct_net: 0,
    net_ns_inum: 0,
    netns_ino: 0,
    ct_ext: 0,
    ext_acct_slot: OFFSET_ABSENT,
    ext_tstamp_slot: OFFSET_ABSENT,
};

/// `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; }`.
#[repr(C)]
struct BpfNfCtx {
    state: *const c_void,
    skb: *const u8,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier/nf_nat")]
pub extern "C" fn nat_binding(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a valid `struct bpf_nf_ctx`; every kernel memory access
    // below goes through bpf_probe_read_kernel.
    unsafe { try_nat_binding(ctx.cast::<BpfNfCtx>()) };
    NF_ACCEPT
}

#[inline(always)]
unsafe fn try_nat_binding(ctx: *const BpfNfCtx) -> Option<()> {
    // SAFETY: the context's skb pointer; the skb is read through bpf_probe_read_kernel.
    unsafe { on_new_packet((*ctx).skb) }
}

/// The start test of the netfilter and kprobe programs: the packet's conntrack entry is new,
/// not yet confirmed, and translated.
#[inline(always)]
unsafe fn on_new_packet(skb: *const u8) -> Option<()> {
    // SAFETY: read through a volatile load so the compiler keeps the (frozen) global.
    let cfg = unsafe { core::ptr::read_volatile(&raw const NAT_CONFIG) };
    if skb.is_null() {
        return None;
    }
    let nfct: u64 = unsafe { bpf_probe_read_kernel(skb.add(cfg.skb_nfct as usize).cast()) }.ok()?;
    // Hot path: all but the first packet of each connection stop here.
    if nfct & NFCT_INFOMASK != IP_CT_NEW {
        return None;
    }
    let ct = (nfct & !NFCT_INFOMASK) as *const u8;
    if ct.is_null() {
        return None;
    }
    let status: u64 =
        unsafe { bpf_probe_read_kernel(ct.add(cfg.ct_status as usize).cast()) }.ok()?;
    if status & IPS_CONFIRMED != 0 || status & IPS_NAT_MASK == 0 {
        return None;
    }
    if !in_our_netns(&cfg, ct) {
        return None;
    }
    report(&cfg, ct, status, 0)
}

/// kprobe on `int __nf_conntrack_confirm(struct sk_buff *skb)`: called once for the first
/// packet of every new conntrack entry, after every NAT hook (confirm runs last, at
/// POSTROUTING or INPUT), so the reply tuple is final. The same test as the netfilter
/// program.
#[unsafe(no_mangle)]
#[unsafe(link_section = "kprobe/__nf_conntrack_confirm")]
pub extern "C" fn ct_confirm_entry(ctx: *mut c_void) -> u32 {
    let skb: Option<*const u8> = ProbeContext::new(ctx).arg(0);
    if let Some(skb) = skb {
        // SAFETY: kernel memory is read through bpf_probe_read_kernel only.
        unsafe { on_new_packet(skb) };
    }
    0
}

/// kprobe on the conntrack destroy path: `void nf_ct_destroy(struct nf_conntrack *)` (or
/// `destroy_conntrack` on older kernels); the argument is the `nf_conn`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "kprobe/nf_ct_destroy")]
pub extern "C" fn ct_destroy_kprobe(ctx: *mut c_void) -> u32 {
    let ct: Option<*const u8> = ProbeContext::new(ctx).arg(0);
    if let Some(ct) = ct {
        // SAFETY: as above.
        unsafe { on_destroy(ct) };
    }
    0
}

/// True when the agent asked for no namespace filter, or `ct` belongs to its namespace.
#[inline(always)]
fn in_our_netns(cfg: &ProgramConfig, ct: *const u8) -> bool {
    if cfg.netns_ino == 0 {
        return true;
    }
    // SAFETY: kernel memory read through bpf_probe_read_kernel.
    let net: u64 = match unsafe { bpf_probe_read_kernel(ct.add(cfg.ct_net as usize).cast()) } {
        Ok(n) => n,
        Err(_) => return false,
    };
    if net == 0 {
        return false;
    }
    let inum: u32 = match unsafe {
        bpf_probe_read_kernel((net as *const u8).add(cfg.net_ns_inum as usize).cast())
    } {
        Ok(i) => i,
        Err(_) => return false,
    };
    inum == cfg.netns_ino
}

/// fexit on `unsigned int nf_nat_setup_info(struct nf_conn *ct,
/// const struct nf_nat_range2 *range, enum nf_nat_manip_type maniptype)`.
///
/// It runs once per manip type for every new conntrack entry that passes a NAT hook (the
/// hook sets up a null binding when no rule matches): DST first (PREROUTING / OUTPUT), then
/// SRC (POSTROUTING / INPUT). After the SRC manip the reply tuple is final, so that record,
/// if the entry has any translation, is the binding. The DST record is pushed only when a
/// real DNAT happened and is flagged [`EVENT_DST_MANIP`].
///
/// The tracing context is an array of u64: the three arguments, then the return value.
#[unsafe(no_mangle)]
#[unsafe(link_section = "fexit/nf_nat_setup_info")]
pub extern "C" fn nat_setup_exit(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes the arguments and return value as u64 slots; every kernel
    // memory access goes through bpf_probe_read_kernel.
    unsafe { try_nat_setup_exit(ctx.cast::<u64>()) };
    0
}

#[inline(always)]
unsafe fn try_nat_setup_exit(ctx: *const u64) -> Option<()> {
    // SAFETY: slots 0..=3 exist for a 3-argument function's fexit program.
    let (ct, maniptype, ret) = unsafe {
        (
            core::ptr::read_volatile(ctx) as *const u8,
            core::ptr::read_volatile(ctx.add(2)),
            core::ptr::read_volatile(ctx.add(3)),
        )
    };
    if ct.is_null() || ret & 0xffff_ffff == NF_DROP {
        return None;
    }
    // SAFETY: as above.
    let cfg = unsafe { core::ptr::read_volatile(&raw const NAT_CONFIG) };
    let status: u64 =
        unsafe { bpf_probe_read_kernel(ct.add(cfg.ct_status as usize).cast()) }.ok()?;
    if status & IPS_NAT_MASK == 0 || !in_our_netns(&cfg, ct) {
        return None;
    }
    if maniptype & 0xffff_ffff == NF_NAT_MANIP_SRC {
        report(&cfg, ct, status, 0)
    } else {
        // IPS_DST_NAT: a real destination translation, not the null binding.
        if status & (1 << 5) == 0 {
            return None;
        }
        report(&cfg, ct, status, EVENT_DST_MANIP)
    }
}

/// fentry on `void nf_ct_destroy(struct nf_conntrack *nfct)`: every conntrack entry freed;
/// `nfct` is the first member of `struct nf_conn`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "fentry/nf_ct_destroy")]
pub extern "C" fn ct_destroy_entry(ctx: *mut c_void) -> i32 {
    // SAFETY: slot 0 is the argument; kernel memory is read through bpf_probe_read_kernel.
    unsafe { on_destroy(core::ptr::read_volatile(ctx.cast::<u64>()) as *const u8) };
    0
}

/// Reports the end of a translated entry of our namespace, with its counters.
#[inline(always)]
unsafe fn on_destroy(ct: *const u8) -> Option<()> {
    if ct.is_null() {
        return None;
    }
    // SAFETY: volatile read of the frozen global; kernel memory through probe reads.
    let cfg = unsafe { core::ptr::read_volatile(&raw const NAT_CONFIG) };
    let status: u64 =
        unsafe { bpf_probe_read_kernel(ct.add(cfg.ct_status as usize).cast()) }.ok()?;
    if status & IPS_NAT_MASK == 0 || !in_our_netns(&cfg, ct) {
        return None;
    }
    let Some(mut entry) = NAT_EVENTS.reserve::<EndEvent>(0) else {
        count_lost(LOST_END_SLOT);
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is a reserved, exclusively owned slot; kernel memory through probe reads.
    unsafe {
        if !fill(&cfg, ct, status, EVENT_END, &raw mut (*ev).common) {
            entry.discard(0);
            return None;
        }
        (*ev).packets = [0; 2];
        (*ev).bytes = [0; 2];
        (*ev).tstamp_start_ns = 0;
        (*ev).tstamp_stop_ns = 0;
        let ext: u64 = bpf_probe_read_kernel(ct.add(cfg.ct_ext as usize).cast()).unwrap_or(0);
        if ext != 0 {
            let ext = ext as *const u8;
            if cfg.ext_acct_slot != OFFSET_ABSENT {
                let off: u8 =
                    bpf_probe_read_kernel(ext.add(cfg.ext_acct_slot as usize)).unwrap_or(0);
                if off != 0 {
                    // struct nf_conn_acct { struct nf_conn_counter { atomic64_t packets, bytes; } counter[2]; }
                    let acct = ext.add(off as usize).cast::<u64>();
                    (*ev).packets[0] = bpf_probe_read_kernel(acct).unwrap_or(0);
                    (*ev).bytes[0] = bpf_probe_read_kernel(acct.add(1)).unwrap_or(0);
                    (*ev).packets[1] = bpf_probe_read_kernel(acct.add(2)).unwrap_or(0);
                    (*ev).bytes[1] = bpf_probe_read_kernel(acct.add(3)).unwrap_or(0);
                    (*ev).common.flags |= EVENT_HAS_ACCT;
                }
            }
            if cfg.ext_tstamp_slot != OFFSET_ABSENT {
                let off: u8 =
                    bpf_probe_read_kernel(ext.add(cfg.ext_tstamp_slot as usize)).unwrap_or(0);
                if off != 0 {
                    // struct nf_conn_tstamp { u64 start; u64 stop; }
                    let tstamp = ext.add(off as usize).cast::<u64>();
                    let start: u64 = bpf_probe_read_kernel(tstamp).unwrap_or(0);
                    if start != 0 {
                        (*ev).tstamp_start_ns = start;
                        (*ev).tstamp_stop_ns = bpf_probe_read_kernel(tstamp.add(1)).unwrap_or(0);
                        (*ev).common.flags |= EVENT_HAS_TSTAMP;
                    }
                }
            }
        }
    }
    let wake = wake_flag(&cfg);
    entry.submit(wake);
    Some(())
}

#[inline(always)]
fn count_lost(slot: u32) {
    if let Some(lost) = NAT_EVENTS_LOST.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *lost += 1 };
    }
}

/// Batch wakeups: a wakeup per record halves the NAT's new-binding rate. Wake the agent
/// only when enough is waiting; otherwise it drains on its own short timer.
#[inline(always)]
fn wake_flag(cfg: &ProgramConfig) -> u64 {
    if NAT_EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= cfg.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Fills the common part of a record from `ct`. False when a tuple could not be read.
#[inline(always)]
unsafe fn fill(
    cfg: &ProgramConfig,
    ct: *const u8,
    status: u64,
    flags: u16,
    ev: *mut NatEvent,
) -> bool {
    // SAFETY: `ev` is a reserved ring-buffer slot; kernel memory through probe reads.
    unsafe {
        (*ev).boot_ns = bpf_ktime_get_boot_ns();
        (*ev).status = status as u32;
        (*ev).flags = flags;
        (*ev).pad1 = 0;
        (*ev).zone = if cfg.ct_zone_id == OFFSET_ABSENT {
            0
        } else {
            bpf_probe_read_kernel(ct.add(cfg.ct_zone_id as usize).cast::<u16>()).unwrap_or(0)
        };
        (*ev).mark = if cfg.ct_mark == OFFSET_ABSENT {
            0
        } else {
            bpf_probe_read_kernel(ct.add(cfg.ct_mark as usize).cast::<u32>()).unwrap_or(0)
        };
        let orig_ok =
            bpf_probe_read_kernel_buf(ct.add(cfg.ct_tuple_orig as usize), &mut (*ev).orig);
        let reply_ok =
            bpf_probe_read_kernel_buf(ct.add(cfg.ct_tuple_reply as usize), &mut (*ev).reply);
        orig_ok.is_ok() && reply_ok.is_ok()
    }
}

#[inline(always)]
fn report(cfg: &ProgramConfig, ct: *const u8, status: u64, flags: u16) -> Option<()> {
    let Some(mut entry) = NAT_EVENTS.reserve::<NatEvent>(0) else {
        count_lost(LOST_SLOT);
        return None;
    };
    // SAFETY: `entry` is a reserved, exclusively owned ring-buffer slot.
    if !unsafe { fill(cfg, ct, status, flags, entry.as_mut_ptr()) } {
        entry.discard(0);
        return None;
    }
    entry.submit(wake_flag(cfg));
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
