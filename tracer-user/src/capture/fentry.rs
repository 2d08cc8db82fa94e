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
use tracer_common::{END_HAS_ACCT, EVENT_DST_MANIP, EndConfig, EndEvent, names};

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
    /// The end hook (fentry on nf_ct_destroy), when its target and offsets were found.
    pub end: Option<EndTarget>,
}

/// PROTOTYPE: where the end program attaches and the offsets it needs.
#[derive(Clone, Debug)]
pub struct EndTarget {
    pub btf_id: u32,
    pub module: Option<String>,
    pub config: EndConfig,
}

/// `NF_CT_EXT_ACCT` in `enum nf_ct_ext_id`: 3 on 5.10, 6.1 and 6.12 (spike, from BTF).
/// TODO: read the enumerator from BTF (btf.rs does not parse enum values yet).
const NF_CT_EXT_ACCT: u32 = 3;

fn probe_end(vmlinux: &Btf) -> Result<EndTarget, String> {
    let (btf, module) = match vmlinux.func_id(names::END_TARGET) {
        Some(_) => (vmlinux.clone(), None),
        None => {
            let path = format!("/sys/kernel/btf/{}", names::END_TARGET_MODULE);
            let split = vmlinux
                .with_split_file(Path::new(&path))
                .map_err(|e| format!("{path}: {e}"))?;
            (split, Some(names::END_TARGET_MODULE.to_owned()))
        }
    };
    let btf_id = btf
        .func_id(names::END_TARGET)
        .ok_or_else(|| format!("no BTF for {}", names::END_TARGET))?;
    let ct_ext = btf
        .member("nf_conn", &["ext"])
        .map_err(|e| e.to_string())?
        .offset;
    let slot = btf
        .member("nf_ct_ext", &["offset"])
        .map_err(|e| e.to_string())?
        .offset;
    Ok(EndTarget {
        btf_id,
        module,
        config: EndConfig {
            ct_ext,
            ext_acct_slot: slot + NF_CT_EXT_ACCT,
        },
    })
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
    let end = probe_end(&vmlinux)
        .map_err(|e| log::warn!("fentry: no end hook on {}: {e}", names::END_TARGET))
        .ok();
    let target = if let Some(btf_id) = vmlinux.func_id(names::FEXIT_TARGET) {
        Target {
            btf_id,
            module: None,
            end,
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
            end,
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
    end: Option<EndHook>,
}

/// PROTOTYPE: the fentry program on nf_ct_destroy and what it reported (counted only; ends
/// still reach the agent through ctnetlink).
struct EndHook {
    ends: RingBuf<MapData>,
    link: Option<OwnedFd>,
    _prog: OwnedFd,
    _btf_obj: Option<OwnedFd>,
    seen: u64,
    with_acct: u64,
    packets: u64,
    bytes: u64,
}

fn module_btf(module: Option<&String>) -> Result<Option<OwnedFd>, CaptureError> {
    let Some(module) = module else {
        return Ok(None);
    };
    sys::kernel_btf_fd_by_name(module)
        .map_err(|e| CaptureError::Kernel {
            step: "find the module's BTF object",
            detail: format!("{module}: {e}"),
        })?
        .ok_or(CaptureError::Unsupported {
            feature: "a BTF object for the module",
            hint: "needs Linux >= 5.11 with CONFIG_DEBUG_INFO_BTF_MODULES",
        })
        .map(Some)
}

fn attach_end(
    layout: &KernelLayout,
    end: &EndTarget,
    ring_bytes: u32,
) -> Result<EndHook, CaptureError> {
    let btf_obj = module_btf(end.module.as_ref())?;
    let loaded = loader::load(
        EBPF_OBJECT,
        &layout.program,
        4096,
        names::END_PROGRAM,
        sys::ProgKind::Tracing {
            attach_type: sys::BPF_TRACE_FENTRY,
            btf_id: end.btf_id,
            btf_obj: btf_obj.as_ref().map(AsFd::as_fd),
        },
        &loader::EndSpec {
            config: end.config,
            ring_bytes,
        },
    )?;
    let link = sys::attach_tracing(loaded.prog.as_fd()).map_err(|e| CaptureError::Kernel {
        step: "attach fentry program on nf_ct_destroy",
        detail: e.to_string(),
    })?;
    Ok(EndHook {
        ends: loaded.ends,
        link: Some(link),
        _prog: loaded.prog,
        _btf_obj: btf_obj,
        seen: 0,
        with_acct: 0,
        packets: 0,
        bytes: 0,
    })
}

impl EndHook {
    fn drain(&mut self, tuple: &TupleLayout) {
        while let Some(item) = self.ends.next() {
            if item.len() < size_of::<EndEvent>() {
                continue;
            }
            // SAFETY: one `EndEvent` per record, read unaligned.
            let ev = unsafe { item.as_ptr().cast::<EndEvent>().read_unaligned() };
            self.seen += 1;
            if log::log_enabled!(log::Level::Debug)
                && let Some((proto, t)) = tuple.decode(&ev.orig)
            {
                log::debug!(
                    "fentry end: proto {proto} {}:{} -> {}:{} zone {} acct {} packets {}/{} bytes {}/{}",
                    t.src,
                    t.src_port,
                    t.dst,
                    t.dst_port,
                    ev.zone,
                    ev.flags & END_HAS_ACCT != 0,
                    ev.packets[0],
                    ev.packets[1],
                    ev.bytes[0],
                    ev.bytes[1]
                );
            }
            if ev.flags & END_HAS_ACCT != 0 {
                self.with_acct += 1;
                self.packets += ev.packets[0] + ev.packets[1];
                self.bytes += ev.bytes[0] + ev.bytes[1];
            }
        }
    }
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
            &loader::EndSpec::default(),
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
        // PROTOTYPE: the end hook is best effort and only counted.
        let end = target.end.as_ref().and_then(|end| {
            attach_end(layout, end, options.ring_bytes)
                .map_err(|e| log::warn!("fentry: end hook on nf_ct_destroy not attached: {e}"))
                .ok()
        });
        if end.is_some() {
            log::info!("fentry: end hook on nf_ct_destroy attached (ends counted only)");
        }
        Ok(Self {
            tuple: layout.tuple,
            events: loaded.events,
            lost: loaded.lost,
            link: Some(link),
            dst_records: 0,
            _prog: loaded.prog,
            _btf_obj: btf_obj,
            end,
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
        if let Some(end) = &mut self.end {
            end.drain(&self.tuple);
        }
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
        if let Some(end) = &mut self.end {
            end.link = None;
            end.drain(&self.tuple);
            log::info!(
                "fentry: nf_ct_destroy saw {} ends of translated entries, {} with acct: packets {} bytes {}",
                end.seen,
                end.with_acct,
                end.packets,
                end.bytes
            );
        }
    }
}
