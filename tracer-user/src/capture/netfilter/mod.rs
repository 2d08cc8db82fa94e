//! The netfilter backend: a `BPF_PROG_TYPE_NETFILTER` program linked at NF_INET_POST_ROUTING
//! for IPv4 and IPv6 in the agent's network namespace (Linux >= 6.4).

pub(crate) mod loader;
pub(crate) mod sys;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::ProgramType,
};
use tracer_common::{LOST_SLOT, NatEvent};

use super::{
    Capture, CaptureError, StartEvent,
    layout::{KernelLayout, TupleLayout},
};

/// The tracer-ebpf object, built by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Hook priority: after every NAT hook (srcnat = 100, and any operator chain) and before
/// conntrack confirm (`INT_MAX`), where a new binding is translated but not yet confirmed.
pub const HOOK_PRIORITY: i32 = i32::MAX - 1;

/// Options of the netfilter backend.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Ring-buffer size in bytes: a power-of-two multiple of the page size.
    pub ring_bytes: u32,
}

/// Checks, without attaching anything, that this kernel can run the netfilter backend:
/// BTF for the struct offsets, and the netfilter program type. Returns the kernel layout.
pub fn probe() -> Result<KernelLayout, CaptureError> {
    if !std::path::Path::new(crate::btf::VMLINUX_BTF).exists() {
        return Err(CaptureError::NoBtf {
            path: crate::btf::VMLINUX_BTF.to_owned(),
        });
    }
    let layout =
        KernelLayout::from_running_kernel().map_err(|source| CaptureError::Layout { source })?;
    match aya::sys::is_program_supported(ProgramType::Netfilter) {
        Ok(true) => Ok(layout),
        Ok(false) => Err(CaptureError::Unsupported {
            feature: "BPF netfilter programs (BPF_PROG_TYPE_NETFILTER)",
            hint: "the netfilter backend needs Linux >= 6.4; backends for older kernels are not available yet",
        }),
        Err(e) => Err(CaptureError::Kernel {
            step: "probe for BPF netfilter programs",
            detail: e.to_string(),
        }),
    }
}

/// The attached netfilter backend.
pub struct NetfilterCapture {
    tuple: TupleLayout,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    links: Vec<OwnedFd>,
    _prog: OwnedFd,
}

impl NetfilterCapture {
    /// Loads the program with `layout`'s offsets and links it for IPv4 and IPv6.
    pub fn attach(layout: &KernelLayout, options: Options) -> Result<Self, CaptureError> {
        let mut config = layout.program;
        // Wake the agent once a quarter of the ring (at most 256 KiB) is waiting; below that
        // it drains on its own timer. A wakeup per record would halve the NAT's rate.
        config.wakeup_bytes = u64::from(options.ring_bytes / 4).min(256 * 1024);
        let loaded = loader::load(
            EBPF_OBJECT,
            &config,
            options.ring_bytes,
            tracer_common::names::PROGRAM,
            sys::ProgKind::Netfilter,
            &loader::EndSpec::default(),
        )?;
        let mut links = Vec::with_capacity(2);
        for pf in [sys::NFPROTO_IPV4, sys::NFPROTO_IPV6] {
            let link = sys::link_netfilter(
                loaded.prog.as_fd(),
                pf,
                sys::NF_INET_POST_ROUTING,
                HOOK_PRIORITY,
            )
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL | libc::EOPNOTSUPP) => CaptureError::Unsupported {
                    feature: "BPF netfilter links",
                    hint: "the netfilter backend needs Linux >= 6.4 with CONFIG_NETFILTER_BPF_LINK",
                },
                _ => CaptureError::Kernel {
                    step: "link netfilter program",
                    detail: e.to_string(),
                },
            })?;
            links.push(link);
        }
        Ok(Self {
            tuple: layout.tuple,
            events: loaded.events,
            lost: loaded.lost,
            links,
            _prog: loaded.prog,
        })
    }
}

impl Capture for NetfilterCapture {
    fn backend(&self) -> &'static str {
        "netfilter"
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the ring buffer's fd lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.events.as_raw_fd()) }
    }

    fn drain(&mut self, out: &mut Vec<StartEvent>) -> usize {
        drain_ring(&mut self.events, &self.tuple, |ev, _flags| out.push(ev))
    }

    fn lost(&self) -> Result<u64, CaptureError> {
        read_lost(&self.lost)
    }

    fn detach(&mut self) {
        self.links.clear();
    }
}

/// Decodes every waiting ring-buffer record and hands it to `sink` with its `NatEvent::flags`. Returns how many records
/// could not be decoded. Shared by the backends that push `NatEvent`s.
pub(crate) fn drain_ring(
    events: &mut RingBuf<MapData>,
    tuple: &TupleLayout,
    mut sink: impl FnMut(StartEvent, u16),
) -> usize {
    let mut bad = 0;
    while let Some(item) = events.next() {
        if item.len() < size_of::<NatEvent>() {
            bad += 1;
            continue;
        }
        // SAFETY: the program writes exactly one `NatEvent` per record; read unaligned
        // because ring-buffer records are only 8-byte aligned by contract.
        let ev = unsafe { item.as_ptr().cast::<NatEvent>().read_unaligned() };
        match tuple.decode_event(&ev) {
            Some(start) => sink(start, ev.flags),
            None => bad += 1,
        }
    }
    bad
}

/// Sums the per-CPU loss counter.
pub(crate) fn read_lost(lost: &PerCpuArray<MapData, u64>) -> Result<u64, CaptureError> {
    let per_cpu = lost.get(&LOST_SLOT, 0).map_err(|e| CaptureError::Kernel {
        step: "read loss counter",
        detail: e.to_string(),
    })?;
    Ok(per_cpu.iter().sum())
}
