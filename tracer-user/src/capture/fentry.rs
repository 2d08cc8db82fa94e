//! The fentry backend: fexit on `nf_nat_setup_info` for starts, fentry on `nf_ct_destroy`
//! for ends, for kernels without BPF netfilter links (< 6.4, e.g. Debian bookworm's 6.1)
//! that allow BPF trampolines.
//!
//! On distribution kernels both functions live in modules (`nf_nat`, `nf_conntrack`), so each
//! program is loaded with `attach_btf_obj_fd` = the module's BTF object and `attach_btf_id` =
//! the function's id in the module's split BTF (`/sys/kernel/btf/<module>` on top of
//! vmlinux). aya 0.14's `FEntry` cannot do that, hence our own loader.
//!
//! The start program pushes one record per entry after the SRC manip (the complete binding),
//! plus a record flagged [`tracer_common::EVENT_DST_MANIP`] after a real DNAT, which is
//! counted and not forwarded. The end program pushes every translated entry's end with its
//! accounting counters into the same ring buffer. Both fire for every network namespace and
//! report only the agent's.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use tracer_common::names;

use super::{CaptureError, RingCapture, layout::KernelLayout, loader_for_this_netns, sys};
use crate::btf::Btf;

/// A kernel function a tracing program attaches to: its BTF type id and, when it lives in a
/// module, that module's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: &'static str,
    pub btf_id: u32,
    pub module: Option<&'static str>,
}

/// Where the backend's two programs attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub start: Function,
    pub end: Function,
}

/// Finds `name` in vmlinux's BTF, else in `module`'s split BTF.
fn find_function(
    vmlinux: &Btf,
    name: &'static str,
    module: &'static str,
) -> Result<Function, CaptureError> {
    if let Some(btf_id) = vmlinux.func_id(name) {
        return Ok(Function {
            name,
            btf_id,
            module: None,
        });
    }
    let path = format!("/sys/kernel/btf/{module}");
    if !Path::new(&path).exists() {
        return Err(CaptureError::Unsupported {
            feature: "BTF for the conntrack/NAT module functions",
            hint: "fentry needs nf_conntrack and nf_nat built in or loaded with module BTF \
                   (CONFIG_DEBUG_INFO_BTF_MODULES, Linux >= 5.11); load them (e.g. create a NAT \
                   rule) or use --backend kprobe",
        });
    }
    let split = vmlinux
        .with_split_file(Path::new(&path))
        .map_err(|e| CaptureError::Layout {
            source: super::layout::LayoutError::Btf(e),
        })?;
    let btf_id = split.func_id(name).ok_or(CaptureError::Unsupported {
        feature: "BTF for the conntrack/NAT module functions",
        hint: "the module's BTF does not describe nf_nat_setup_info or nf_ct_destroy",
    })?;
    Ok(Function {
        name,
        btf_id,
        module: Some(module),
    })
}

/// Checks, without loading anything, that the struct offsets and both attach targets can be
/// found. Whether the kernel allows trampolines shows only at load time.
pub fn probe() -> Result<(KernelLayout, Target), CaptureError> {
    let layout = KernelLayout::probe()?;
    if !layout.has_netns_filter() {
        return Err(CaptureError::Unsupported {
            feature: "BTF for nf_conn.ct_net and net.ns.inum",
            hint: "the fentry backend must tell network namespaces apart",
        });
    }
    let vmlinux = Btf::from_sys_fs().map_err(|e| CaptureError::Layout {
        source: super::layout::LayoutError::Btf(e),
    })?;
    let start = find_function(&vmlinux, names::FEXIT_TARGET, names::FEXIT_TARGET_MODULE)?;
    let end = find_function(&vmlinux, names::END_TARGET, names::END_TARGET_MODULE)?;
    Ok((layout, Target { start, end }))
}

/// The module's BTF object, to load a program against one of its functions.
fn module_btf(module: Option<&str>) -> Result<Option<OwnedFd>, CaptureError> {
    let Some(module) = module else {
        return Ok(None);
    };
    sys::kernel_btf_fd_by_name(module)
        .map_err(|e| CaptureError::os("find the module's BTF object", &e))?
        .ok_or(CaptureError::Unsupported {
            feature: "a BTF object for the conntrack/NAT modules",
            hint: "needs Linux >= 5.11 with CONFIG_DEBUG_INFO_BTF_MODULES; use --backend kprobe",
        })
        .map(Some)
}

/// The kernel refuses tracing programs (lockdown, no trampolines on this build): it says so
/// with EPERM at load, or EPERM/EOPNOTSUPP/ENOTSUPP at attach.
fn refused(e: CaptureError) -> CaptureError {
    match e {
        // 524: the kernel's ENOTSUPP, not in libc.
        CaptureError::Kernel {
            errno: Some(libc::EPERM | libc::EOPNOTSUPP | 524),
            ..
        } => CaptureError::Unsupported {
            feature: "BPF trampolines (fentry/fexit)",
            hint: "the kernel refused to load or attach a tracing program; use the netfilter or kprobe backend",
        },
        e => e,
    }
}

/// Loads both programs with `layout`'s offsets and attaches them.
pub fn attach(
    layout: &KernelLayout,
    target: &Target,
    ring_bytes: u32,
) -> Result<RingCapture, CaptureError> {
    let loader = loader_for_this_netns(layout, ring_bytes)?;
    let mut held = Vec::new();
    let mut links = Vec::new();
    // The end program first: once starts flow, every end must be seen.
    for (function, program, attach_type, step) in [
        (
            &target.end,
            names::END_PROGRAM,
            sys::BPF_TRACE_FENTRY,
            "load fentry program on nf_ct_destroy",
        ),
        (
            &target.start,
            names::FEXIT_PROGRAM,
            sys::BPF_TRACE_FEXIT,
            "load fexit program on nf_nat_setup_info",
        ),
    ] {
        let btf_obj = module_btf(function.module)?;
        let prog = loader
            .load(
                program,
                sys::ProgKind::Tracing {
                    attach_type,
                    btf_id: function.btf_id,
                    btf_obj: btf_obj.as_ref().map(AsFd::as_fd),
                },
                step,
            )
            .map_err(refused)?;
        let link = sys::attach_tracing(prog.as_fd())
            .map_err(|e| refused(CaptureError::os("attach tracing program", &e)))?;
        links.push(link);
        held.push(prog);
        held.extend(btf_obj);
    }
    Ok(RingCapture::new(
        "fentry",
        true,
        layout.tuple,
        loader.into_maps()?,
        links,
        held,
    ))
}
