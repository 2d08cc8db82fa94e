//! The fentry backend: an fexit program on `nf_nat_setup_info` (PROTOTYPE).
//!
//! For kernels without BPF netfilter links (< 6.4, e.g. Debian bookworm's 6.1) and any kernel
//! that allows BPF trampolines. `nf_nat_setup_info` lives in the `nf_nat` module on
//! distribution kernels, so the program is loaded with `attach_btf_obj_fd` = the module's
//! BTF object and `attach_btf_id` = the function's id in the module's split BTF
//! (`/sys/kernel/btf/nf_nat` on top of vmlinux). aya 0.14's `FEntry` cannot do that, hence the
//! same hand-made loader as the netfilter backend.
//!
//! The program pushes the netfilter program's record into the same ring buffer, once per
//! entry after the SRC manip (the complete binding), plus a record flagged
//! [`tracer_common::EVENT_DST_MANIP`] after a real DNAT, which is counted and not forwarded.
//!
//! Not done yet: ends through fentry on `nf_ct_destroy` (ends still come from ctnetlink),
//! the kprobe fallback, and `probe` integration.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use tracer_common::{EVENT_DST_MANIP, names};

use super::{
    Capture, CaptureError, StartEvent,
    layout::{KernelLayout, TupleLayout},
    netfilter::{EBPF_OBJECT, drain_ring, loader, read_lost, sys},
};
use crate::btf::{Btf, VMLINUX_BTF};

/// Options of the fentry backend.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Ring-buffer size in bytes: a power-of-two multiple of the page size.
    pub ring_bytes: u32,
}

/// Where the fexit program attaches: the function's BTF type id and, when the function lives
/// in a module, that module's name.
#[derive(Clone, Debug)]
pub struct Target {
    pub btf_id: u32,
    pub module: Option<String>,
}

/// Checks, without attaching anything, that the struct offsets and the attach target can be
/// found. Returns the layout and the target.
pub fn probe() -> Result<(KernelLayout, Target), CaptureError> {
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(CaptureError::NoBtf {
            path: VMLINUX_BTF.to_owned(),
        });
    }
    let layout =
        KernelLayout::from_running_kernel().map_err(|source| CaptureError::Layout { source })?;
    let layout_err = |e| CaptureError::Layout {
        source: super::layout::LayoutError::Btf(e),
    };
    let vmlinux = Btf::from_sys_fs().map_err(layout_err)?;
    let target = if let Some(btf_id) = vmlinux.func_id(names::FEXIT_TARGET) {
        Target {
            btf_id,
            module: None,
        }
    } else {
        let path = format!("/sys/kernel/btf/{}", names::FEXIT_TARGET_MODULE);
        if !Path::new(&path).exists() {
            return Err(CaptureError::Unsupported {
                feature: "BTF for nf_nat_setup_info",
                hint: "the fentry backend needs nf_nat built in or loaded as a module with BTF \
                       (CONFIG_DEBUG_INFO_BTF_MODULES); load nf_nat (e.g. create a NAT rule) first",
            });
        }
        let split = vmlinux
            .with_split_file(Path::new(&path))
            .map_err(layout_err)?;
        let btf_id = split
            .func_id(names::FEXIT_TARGET)
            .ok_or(CaptureError::Unsupported {
                feature: "nf_nat_setup_info in the nf_nat module's BTF",
                hint: "this kernel's nf_nat does not describe nf_nat_setup_info",
            })?;
        Target {
            btf_id,
            module: Some(names::FEXIT_TARGET_MODULE.to_owned()),
        }
    };
    Ok((layout, target))
}

/// The attached fentry backend.
pub struct FentryCapture {
    tuple: TupleLayout,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    link: Option<OwnedFd>,
    /// Records taken after a DST manip (flagged), counted and not forwarded.
    dst_records: u64,
    _prog: OwnedFd,
    _btf_obj: Option<OwnedFd>,
}

impl FentryCapture {
    /// Loads the fexit program with `layout`'s offsets against `target` and attaches it.
    pub fn attach(
        layout: &KernelLayout,
        target: &Target,
        options: Options,
    ) -> Result<Self, CaptureError> {
        let mut config = layout.program;
        config.wakeup_bytes = u64::from(options.ring_bytes / 4).min(256 * 1024);
        let btf_obj = match &target.module {
            None => None,
            Some(module) => Some(
                sys::kernel_btf_fd_by_name(module)
                    .map_err(|e| CaptureError::Kernel {
                        step: "find the module's BTF object",
                        detail: format!("{module}: {e}"),
                    })?
                    .ok_or(CaptureError::Unsupported {
                        feature: "a BTF object for the nf_nat module",
                        hint: "the kernel lists no BTF object named nf_nat (needs Linux >= 5.11 with CONFIG_DEBUG_INFO_BTF_MODULES)",
                    })?,
            ),
        };
        let loaded = loader::load(
            EBPF_OBJECT,
            &config,
            options.ring_bytes,
            names::FEXIT_PROGRAM,
            sys::ProgKind::Tracing {
                attach_type: sys::BPF_TRACE_FEXIT,
                btf_id: target.btf_id,
                btf_obj: btf_obj.as_ref().map(AsFd::as_fd),
            },
        )
        .map_err(|e| match e {
            // Kernels that refuse tracing programs (e.g. lockdown, or no trampolines) say EPERM
            // at load time, before any verifier log.
            // TODO: carry the errno in CaptureError::Kernel instead of matching the text.
            CaptureError::Kernel { detail, .. }
                if detail.starts_with("Operation not permitted") =>
            {
                CaptureError::Unsupported {
                    feature: "BPF trampolines (fentry/fexit)",
                    hint: "the kernel refused to load an fexit program (EPERM); use the netfilter backend",
                }
            }
            e => e,
        })?;
        let link =
            sys::attach_tracing(loaded.prog.as_fd()).map_err(|e| match e.raw_os_error() {
                // 524: the kernel's ENOTSUPP (no trampoline support on this arch/config).
                Some(libc::EPERM | libc::EOPNOTSUPP | 524) => CaptureError::Unsupported {
                    feature: "BPF trampolines (fentry/fexit)",
                    hint: "the kernel refused to attach an fexit program",
                },
                _ => CaptureError::Kernel {
                    step: "attach fexit program",
                    detail: e.to_string(),
                },
            })?;
        Ok(Self {
            tuple: layout.tuple,
            events: loaded.events,
            lost: loaded.lost,
            link: Some(link),
            dst_records: 0,
            _prog: loaded.prog,
            _btf_obj: btf_obj,
        })
    }

    /// Records seen after a DST manip (real DNAT), which are not forwarded as starts.
    #[must_use]
    pub fn dst_records(&self) -> u64 {
        self.dst_records
    }
}

impl Capture for FentryCapture {
    fn backend(&self) -> &'static str {
        "fentry"
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the ring buffer's fd lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.events.as_raw_fd()) }
    }

    fn drain(&mut self, out: &mut Vec<StartEvent>) -> usize {
        let dst = &mut self.dst_records;
        drain_ring(&mut self.events, &self.tuple, |ev, flags| {
            if flags & EVENT_DST_MANIP != 0 {
                *dst += 1;
            } else {
                out.push(ev);
            }
        })
    }

    fn lost(&self) -> Result<u64, CaptureError> {
        read_lost(&self.lost)
    }

    fn detach(&mut self) {
        if self.link.take().is_some() {
            log::info!(
                "fentry: {} records after a DST manip (DNAT) were seen and not forwarded",
                self.dst_records
            );
        }
    }
}
