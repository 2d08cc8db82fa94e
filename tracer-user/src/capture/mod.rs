//! Capture backends: where binding starts (and, for some, ends) come from.
//!
//! Every backend sits behind [`Capture`] and pushes the same records into one ring buffer:
//! * [`netfilter`]: a `BPF_PROG_TYPE_NETFILTER` program at POSTROUTING (Linux >= 6.4). Starts
//!   only; ends come from ctnetlink DESTROY events.
//! * [`fentry`]: fexit on `nf_nat_setup_info` for starts, fentry on `nf_ct_destroy` for ends
//!   with their counters (kernels that allow BPF trampolines on the conntrack modules).
//! * [`kprobe`]: kprobes on `__nf_conntrack_confirm` for starts and on the destroy path for
//!   ends (kernels without trampolines, or without module BTF).
//!
//! [`Backend::Auto`] takes the first of netfilter, fentry, kprobe that this kernel offers;
//! `nattrace probe` says which and why.

pub mod fentry;
pub mod kprobe;
pub mod layout;
pub(crate) mod loader;
pub mod netfilter;
mod ring;
pub(crate) mod sys;

use std::os::fd::BorrowedFd;

pub use layout::StartEvent;
pub use ring::RingCapture;

use crate::conntrack::CtEntry;

/// The tracer-ebpf object, built by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// The capture backends `nattrace run --backend` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The first of netfilter, fentry, kprobe this kernel offers.
    Auto,
    /// BPF netfilter link at POSTROUTING (Linux >= 6.4), ends from ctnetlink.
    Netfilter,
    /// fexit/fentry on the NAT set-up and conntrack destroy functions (BPF trampolines).
    Fentry,
    /// kprobes on the conntrack confirm and destroy functions.
    Kprobe,
}

impl Backend {
    /// The concrete backends, in the order `auto` tries them.
    pub const PREFERENCE: [Self; 3] = [Self::Netfilter, Self::Fentry, Self::Kprobe];

    /// Name as given on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Netfilter => "netfilter",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
        }
    }
}

/// A backend checked against the running kernel, not attached yet.
#[derive(Clone, Debug)]
pub enum Probed {
    Netfilter(layout::KernelLayout),
    Fentry(layout::KernelLayout, fentry::Target),
    Kprobe(layout::KernelLayout, kprobe::Target),
}

impl Probed {
    /// Checks, without loading anything, that `backend` can run here. `auto` is the first
    /// of [`Probed::candidates`].
    pub fn probe(backend: Backend) -> Result<Self, CaptureError> {
        match backend {
            Backend::Netfilter => Ok(Self::Netfilter(netfilter::probe()?)),
            Backend::Fentry => {
                let (layout, target) = fentry::probe()?;
                Ok(Self::Fentry(layout, target))
            }
            Backend::Kprobe => {
                let (layout, target) = kprobe::probe()?;
                Ok(Self::Kprobe(layout, target))
            }
            Backend::Auto => Ok(Self::candidates(backend)?.swap_remove(0)),
        }
    }

    /// The backends to try, best first: the one asked for, or for `auto` every one whose
    /// check passes on this kernel (why the others were ruled out is logged). Some refusals,
    /// e.g. of trampolines, show only when loading, so `auto` tries the next on those.
    pub fn candidates(backend: Backend) -> Result<Vec<Self>, CaptureError> {
        if backend != Backend::Auto {
            return Ok(vec![Self::probe(backend)?]);
        }
        let mut candidates = Vec::new();
        let mut reasons = Vec::new();
        for b in Backend::PREFERENCE {
            match Self::probe(b) {
                Ok(p) => candidates.push(p),
                Err(e) => {
                    log::info!("backend {}: ruled out: {e}", b.name());
                    reasons.push(format!("{}: {e}", b.name()));
                }
            }
        }
        if candidates.is_empty() {
            return Err(CaptureError::NoBackend { reasons });
        }
        Ok(candidates)
    }

    /// The backend this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        match self {
            Self::Netfilter(_) => Backend::Netfilter,
            Self::Fentry(..) => Backend::Fentry,
            Self::Kprobe(..) => Backend::Kprobe,
        }
    }

    /// Loads and attaches the backend with a ring buffer of `ring_bytes`.
    pub fn attach(&self, ring_bytes: u32) -> Result<RingCapture, CaptureError> {
        match self {
            Self::Netfilter(layout) => netfilter::attach(layout, ring_bytes),
            Self::Fentry(layout, target) => fentry::attach(layout, target, ring_bytes),
            Self::Kprobe(layout, target) => kprobe::attach(layout, target, ring_bytes),
        }
    }
}

/// An entry's end, read in the kernel as the entry was destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedEnd {
    /// CLOCK_BOOTTIME nanoseconds at destruction.
    pub boot_ns: u64,
    /// The entry: tuples, zone, mark, status, counters when accounting was on, and
    /// `start_ns` and `stop_ns` from the timestamp extension when it was on (the kernel dates
    /// a timed-out entry's stop back to its expiry). Without them the agent takes `boot_ns`.
    pub entry: CtEntry,
}

/// Records the kernel side could not store (ring buffer full), since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    pub starts: u64,
    pub ends: u64,
}

/// A running capture: the kernel side is attached and pushing records.
pub trait Capture {
    /// Backend name, recorded in the coverage log.
    fn backend(&self) -> &'static str;
    /// True when the backend reports ends itself (in-kernel, with counters); the agent then
    /// needs no ctnetlink DESTROY listener.
    fn captures_ends(&self) -> bool;
    /// Becomes readable when the kernel side asks to be drained (it batches these wakeups;
    /// drain on a short timer too).
    fn wakeup_fd(&self) -> BorrowedFd<'_>;
    /// Moves every waiting record into `starts` and `ends`. Returns how many records could
    /// not be decoded.
    fn drain(&mut self, starts: &mut Vec<StartEvent>, ends: &mut Vec<CapturedEnd>) -> usize;
    /// Records the kernel side could not store since attach (ring buffer full).
    fn lost(&self) -> Result<Lost, CaptureError>;
    /// Detaches every hook: capture stops. Records still waiting can be drained after.
    fn detach(&mut self);
}

/// Why capture could not start. Every variant is an environment problem (exit status 4).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The kernel publishes no BTF, so struct offsets cannot be known.
    #[error(
        "kernel BTF {path} is missing: nattrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (or mount sysfs)"
    )]
    NoBtf { path: String },
    /// BTF exists but does not describe what the program needs.
    #[error("cannot derive conntrack struct offsets from kernel BTF")]
    Layout {
        #[source]
        source: layout::LayoutError,
    },
    /// The kernel lacks a feature the backend needs.
    #[error("this kernel lacks {feature}: {hint}")]
    Unsupported {
        feature: &'static str,
        hint: &'static str,
    },
    /// The embedded eBPF object is not what this build expects (a build problem).
    #[error("embedded eBPF object: {reason}")]
    Object { reason: String },
    /// `auto` found no backend: why each was ruled out, in preference order.
    #[error("no capture backend can run here: {}", .reasons.join("; "))]
    NoBackend { reasons: Vec<String> },
    /// A kernel call failed.
    #[error("{step} failed: {detail}")]
    Kernel {
        step: &'static str,
        /// The call's errno, when it was a system call.
        errno: Option<i32>,
        detail: String,
    },
}

impl CaptureError {
    /// A failed system call.
    pub(crate) fn os(step: &'static str, e: &std::io::Error) -> Self {
        Self::Kernel {
            step,
            errno: e.raw_os_error(),
            detail: e.to_string(),
        }
    }
}

/// The loader for the fentry and kprobe backends, whose hooks fire in every namespace: the
/// programs report only the calling thread's namespace.
pub(crate) fn loader_for_this_netns(
    layout: &layout::KernelLayout,
    ring_bytes: u32,
) -> Result<loader::Loader, CaptureError> {
    let config = layout.config_for(ring_bytes, current_netns_ino()?);
    loader::Loader::new(EBPF_OBJECT, &config, ring_bytes)
}

/// The inode number of the calling thread's network namespace, which the kernel calls
/// `net->ns.inum`: the fentry and kprobe programs fire for every namespace and report only
/// this one's entries.
pub(crate) fn current_netns_ino() -> Result<u32, CaptureError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| CaptureError::os("read this thread's network namespace", &e))?;
    u32::try_from(meta.ino()).map_err(|_| CaptureError::Kernel {
        step: "read this thread's network namespace",
        errno: None,
        detail: format!("inode {} does not fit 32 bits", meta.ino()),
    })
}
