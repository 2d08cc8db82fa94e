//! Capture backends: where binding starts come from.
//!
//! Every backend sits behind [`Capture`]: [`netfilter`], a `BPF_PROG_TYPE_NETFILTER`
//! program at POSTROUTING (Linux >= 6.4, the default), and [`fentry`] (prototype), an fexit
//! program on `nf_nat_setup_info` for distribution kernels. The kprobe backend comes later
//! behind the same trait.

pub mod fentry;
pub mod layout;
pub mod netfilter;

use std::os::fd::BorrowedFd;

pub use layout::StartEvent;

/// A running capture: the kernel side is attached and pushing records.
pub trait Capture {
    /// Backend name, recorded in the coverage log.
    fn backend(&self) -> &'static str;
    /// Becomes readable when the kernel side asks to be drained (it batches these wakeups;
    /// drain on a short timer too).
    fn wakeup_fd(&self) -> BorrowedFd<'_>;
    /// Moves every waiting record into `out`. Returns how many records could not be decoded.
    fn drain(&mut self, out: &mut Vec<StartEvent>) -> usize;
    /// Records the kernel side could not store since attach (ring buffer full).
    fn lost(&self) -> Result<u64, CaptureError>;
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
    /// A kernel call failed.
    #[error("{step} failed: {detail}")]
    Kernel { step: &'static str, detail: String },
}
