//! The kprobe backend, for kernels that offer neither BPF netfilter links nor trampolines on
//! the conntrack modules (e.g. Debian bullseye's 5.10, which has no module BTF), and for any
//! kernel built with kprobes.
//!
//! * Starts: a kprobe on `__nf_conntrack_confirm(skb)`, which runs once for the first packet
//!   of every new conntrack entry, after every NAT hook. The program applies the netfilter
//!   program's own test to `skb->_nfct` (new, not yet confirmed, translated), so the record
//!   is the same, taken one hook later and on every path (forwarded, local output, local
//!   input).
//! * Ends: a kprobe on `nf_ct_destroy` (`destroy_conntrack` before Linux 5.19), with the
//!   accounting counters, like the fentry backend.
//!
//! Both kprobes fire for every network namespace; the programs report only the agent's.
//! Entry kprobes only: no kretprobe, whose instances can run out and miss calls silently.

use std::os::fd::AsFd as _;

use tracer_common::names;

use super::{CaptureError, RingCapture, layout::KernelLayout, loader_for_this_netns, sys};

/// Where the kernel lists its functions, modules' included.
const KALLSYMS: &str = "/proc/kallsyms";

/// The functions the two kprobes attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub start: &'static str,
    pub end: &'static str,
}

/// True when `kallsyms` lists `name` as a function (text symbol, `t`/`T`). The same name can
/// be data on some kernels: before 5.19 `nf_ct_destroy` is a function pointer.
fn is_function(kallsyms: &str, name: &str) -> bool {
    kallsyms.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_, kind, sym) = (fields.next(), fields.next(), fields.next());
        matches!(kind, Some("t" | "T")) && sym == Some(name)
    })
}

/// Picks the targets from a `/proc/kallsyms` listing.
pub fn targets(kallsyms: &str) -> Result<Target, CaptureError> {
    if !is_function(kallsyms, names::KPROBE_START_TARGET) {
        return Err(CaptureError::Unsupported {
            feature: "the function __nf_conntrack_confirm",
            hint: "conntrack is not loaded: load nf_conntrack (e.g. create a NAT rule) first",
        });
    }
    let end = names::KPROBE_END_TARGETS
        .into_iter()
        .find(|f| is_function(kallsyms, f))
        .ok_or(CaptureError::Unsupported {
            feature: "a conntrack destroy function to probe (nf_ct_destroy or destroy_conntrack)",
            hint: "this kernel's conntrack has neither; use another backend",
        })?;
    Ok(Target {
        start: names::KPROBE_START_TARGET,
        end,
    })
}

/// Checks, without loading anything, that kprobe events exist and both functions can be
/// probed, and that BTF gives the offsets.
pub fn probe() -> Result<(KernelLayout, Target), CaptureError> {
    if !sys::kprobe_pmu_available() {
        return Err(CaptureError::Unsupported {
            feature: "kprobe perf events",
            hint: "the kernel was built without CONFIG_KPROBE_EVENTS (or is older than 4.17)",
        });
    }
    let layout = KernelLayout::probe()?;
    if !layout.has_netns_filter() {
        return Err(CaptureError::Unsupported {
            feature: "BTF for nf_conn.ct_net and net.ns.inum",
            hint: "the kprobe backend must tell network namespaces apart",
        });
    }
    let kallsyms = std::fs::read_to_string(KALLSYMS)
        .map_err(|e| CaptureError::os("read /proc/kallsyms", &e))?;
    Ok((layout, targets(&kallsyms)?))
}

/// Loads both programs with `layout`'s offsets and attaches them.
pub fn attach(
    layout: &KernelLayout,
    target: &Target,
    ring_bytes: u32,
) -> Result<RingCapture, CaptureError> {
    let loader = loader_for_this_netns(layout, ring_bytes)?;
    let mut events = Vec::new();
    let mut progs = Vec::new();
    // The end probe first: once starts flow, every end must be seen.
    for (program, function, step) in [
        (
            names::KPROBE_END_PROGRAM,
            target.end,
            "load kprobe program (ends)",
        ),
        (
            names::KPROBE_START_PROGRAM,
            target.start,
            "load kprobe program (starts)",
        ),
    ] {
        let prog = loader.load(program, sys::ProgKind::Kprobe, step)?;
        let event =
            sys::attach_kprobe(prog.as_fd(), function).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::EINVAL) => CaptureError::Kernel {
                    step: "create kprobe",
                    errno: e.raw_os_error(),
                    detail: format!("{function}: {e} (not a probe-able function on this kernel)"),
                },
                _ => CaptureError::Kernel {
                    step: "create kprobe",
                    errno: e.raw_os_error(),
                    detail: format!("{function}: {e}"),
                },
            })?;
        events.push(event);
        progs.push(prog);
    }
    Ok(RingCapture::new(
        "kprobe",
        true,
        layout.tuple,
        loader.into_maps()?,
        events,
        progs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_6_12: &str = "\
ffffffffc0a01000 t __nf_conntrack_confirm\t[nf_conntrack]
ffffffffc0a02000 T nf_ct_destroy\t[nf_conntrack]
ffffffff81000000 T nf_conntrack_destroy
";
    const LINUX_5_10: &str = "\
ffffffffc0a01000 T __nf_conntrack_confirm\t[nf_conntrack]
ffffffffc0a02000 t destroy_conntrack\t[nf_conntrack]
ffffffff82000000 B nf_ct_destroy
ffffffff81000000 T nf_conntrack_destroy
";

    #[test]
    fn picks_nf_ct_destroy_where_it_is_a_function() {
        let t = targets(LINUX_6_12).unwrap();
        assert_eq!(
            (t.start, t.end),
            ("__nf_conntrack_confirm", "nf_ct_destroy")
        );
    }

    #[test]
    fn falls_back_to_destroy_conntrack_where_nf_ct_destroy_is_a_pointer() {
        let t = targets(LINUX_5_10).unwrap();
        assert_eq!(t.end, "destroy_conntrack");
    }

    #[test]
    fn conntrack_not_loaded_is_unsupported_with_a_hint() {
        let e = targets("ffffffff81000000 T nf_conntrack_destroy\n").unwrap_err();
        assert!(e.to_string().contains("load nf_conntrack"), "{e}");
    }

    #[test]
    fn a_name_as_a_substring_or_data_does_not_count() {
        assert!(!is_function(
            "0 T __nf_conntrack_confirm_x\n",
            "__nf_conntrack_confirm"
        ));
        assert!(!is_function(
            "0 D __nf_conntrack_confirm\n",
            "__nf_conntrack_confirm"
        ));
        assert!(is_function(
            "0 t __nf_conntrack_confirm [nf_conntrack]\n",
            "__nf_conntrack_confirm"
        ));
    }
}
