//! The netfilter backend: a `BPF_PROG_TYPE_NETFILTER` program linked at NF_INET_POST_ROUTING
//! for IPv4 and IPv6 in the agent's network namespace (Linux >= 6.4). It reports starts;
//! the agent takes ends from ctnetlink DESTROY events.

use std::os::fd::AsFd as _;

use aya::programs::ProgramType;

use super::{CaptureError, EBPF_OBJECT, RingCapture, layout::KernelLayout, loader::Loader, sys};

/// Hook priority: after every NAT hook (srcnat = 100, and any operator chain) and before
/// conntrack confirm (`INT_MAX`), where a new binding is translated but not yet confirmed.
pub const HOOK_PRIORITY: i32 = i32::MAX - 1;

/// Checks, without attaching anything, that this kernel can run the netfilter backend:
/// BTF for the struct offsets, and the netfilter program type. Returns the kernel layout.
pub fn probe() -> Result<KernelLayout, CaptureError> {
    let layout = KernelLayout::probe()?;
    match aya::sys::is_program_supported(ProgramType::Netfilter) {
        Ok(true) => Ok(layout),
        Ok(false) => Err(CaptureError::Unsupported {
            feature: "BPF netfilter programs (BPF_PROG_TYPE_NETFILTER)",
            hint: "the netfilter backend needs Linux >= 6.4; use --backend fentry or kprobe (or auto)",
        }),
        Err(e) => Err(CaptureError::Kernel {
            step: "probe for BPF netfilter programs",
            errno: None,
            detail: e.to_string(),
        }),
    }
}

/// Loads the program with `layout`'s offsets and links it for IPv4 and IPv6.
pub fn attach(layout: &KernelLayout, ring_bytes: u32) -> Result<RingCapture, CaptureError> {
    let config = layout.config_for(ring_bytes, 0);
    let loader = Loader::new(EBPF_OBJECT, &config, ring_bytes)?;
    let prog = loader.load(
        tracer_common::names::PROGRAM,
        sys::ProgKind::Netfilter,
        "load netfilter program",
    )?;
    let mut links = Vec::with_capacity(2);
    for pf in [sys::NFPROTO_IPV4, sys::NFPROTO_IPV6] {
        let link = sys::link_netfilter(prog.as_fd(), pf, sys::NF_INET_POST_ROUTING, HOOK_PRIORITY)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL | libc::EOPNOTSUPP) => CaptureError::Unsupported {
                    feature: "BPF netfilter links",
                    hint: "the netfilter backend needs Linux >= 6.4 with CONFIG_NETFILTER_BPF_LINK",
                },
                // Another program holds this hook and priority in this namespace: another
                // agent (the kernel allows one netfilter link per priority and hook).
                Some(libc::EBUSY) => CaptureError::Kernel {
                    step: "link netfilter program",
                    errno: Some(libc::EBUSY),
                    detail: format!(
                        "{e}: the hook's priority {HOOK_PRIORITY} is taken in this network namespace; \
                         is another nattrace agent already running here?"
                    ),
                },
                _ => CaptureError::os("link netfilter program", &e),
            })?;
        links.push(link);
    }
    Ok(RingCapture::new(
        "netfilter",
        false,
        layout.tuple,
        loader.into_maps()?,
        links,
        vec![prog],
    ))
}
