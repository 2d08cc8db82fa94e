//! The few `bpf(2)` and `perf_event_open(2)` calls the capture backends make themselves,
//! because aya 0.14 cannot make them for programs it did not load: loading a netfilter
//! program with its real program type and linking it to a netfilter hook, loading an
//! fentry/fexit program against a kernel module's BTF object (aya 0.14 never sets
//! `attach_btf_obj_fd`), finding that object, attaching the tracing program, loading a kprobe
//! program and attaching it through a perf kprobe event, and finalising global data maps.
//!
//! Each `bpf_attr` variant used here is declared as its own `#[repr(C)]` struct with the
//! kernel's field order (include/uapi/linux/bpf.h); the tests pin their layout.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `BPF_PROG_TYPE_NETFILTER`.
pub const BPF_PROG_TYPE_NETFILTER: u32 = 32;
/// `BPF_NETFILTER` attach type.
pub const BPF_NETFILTER: u32 = 45;
/// `NF_INET_POST_ROUTING`.
pub const NF_INET_POST_ROUTING: u32 = 4;
/// `NFPROTO_IPV4`.
pub const NFPROTO_IPV4: u32 = 2;
/// `NFPROTO_IPV6`.
pub const NFPROTO_IPV6: u32 = 10;

/// `BPF_PROG_TYPE_KPROBE`.
pub const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `BPF_PROG_TYPE_TRACING`.
pub const BPF_PROG_TYPE_TRACING: u32 = 26;
/// `BPF_TRACE_FENTRY` attach type.
pub const BPF_TRACE_FENTRY: u32 = 24;
/// `BPF_TRACE_FEXIT` attach type.
pub const BPF_TRACE_FEXIT: u32 = 25;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_MAP_FREEZE: libc::c_long = 22;
const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
const BPF_LINK_CREATE: libc::c_long = 28;

/// One eBPF instruction, as the kernel takes it.
pub type Insn = aya_obj::generated::bpf_insn;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    /// `attach_btf_obj_fd` (union with `attach_prog_fd`): the module's BTF object, or 0 for
    /// vmlinux.
    attach_btf_obj_fd: u32,
    core_relo_cnt: u32,
}

/// `BPF_BTF_GET_NEXT_ID` / `BPF_BTF_GET_FD_BY_ID` (`start_id`/`btf_id`, `next_id`, `open_flags`).
#[repr(C)]
#[derive(Default)]
struct GetIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_btf_info`.
#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// `BPF_RAW_TRACEPOINT_OPEN`: with no name it attaches a tracing (fentry/fexit) program to
/// the function it was loaded for.
#[repr(C)]
#[derive(Default)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateNetfilterAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    nf_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct MapFreezeAttr {
    map_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of `union bpf_attr`
    // and its size is passed alongside; the kernel zero-extends the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_from(ret: libc::c_long) -> OwnedFd {
    let fd = i32::try_from(ret).expect("bpf(2) returns an fd that fits an int");
    // SAFETY: the kernel just returned this new file descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A failed program load, with the verifier's log when it gave one.
#[derive(Debug)]
pub struct LoadFailure {
    pub error: io::Error,
    pub verifier_log: String,
}

/// What kind of program to load, and for tracing programs what it attaches to.
#[derive(Clone, Copy, Debug)]
pub enum ProgKind<'a> {
    /// `BPF_PROG_TYPE_NETFILTER`, attach type `BPF_NETFILTER`.
    Netfilter,
    /// `BPF_PROG_TYPE_TRACING` with `expected_attach_type` (`BPF_TRACE_FENTRY`/`FEXIT`) on
    /// the function whose BTF type id is `btf_id`, in the module BTF object `btf_obj` (None:
    /// vmlinux).
    Tracing {
        attach_type: u32,
        btf_id: u32,
        btf_obj: Option<BorrowedFd<'a>>,
    },
    /// `BPF_PROG_TYPE_KPROBE`, attached later with [`attach_kprobe`].
    Kprobe,
}

/// Loads a program. On failure, loads again with the verifier log on so the error can say
/// why.
pub fn prog_load(
    kind: ProgKind<'_>,
    name: &str,
    insns: &[Insn],
    license: &CStr,
) -> Result<OwnedFd, LoadFailure> {
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            insn_cnt: u32::try_from(insns.len()).expect("program fits u32 instructions"),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        match kind {
            ProgKind::Netfilter => {
                attr.prog_type = BPF_PROG_TYPE_NETFILTER;
                attr.expected_attach_type = BPF_NETFILTER;
            }
            ProgKind::Tracing {
                attach_type,
                btf_id,
                btf_obj,
            } => {
                attr.prog_type = BPF_PROG_TYPE_TRACING;
                attr.expected_attach_type = attach_type;
                attr.attach_btf_id = btf_id;
                attr.attach_btf_obj_fd = btf_obj.map_or(0, |fd| {
                    u32::try_from(fd.as_raw_fd()).expect("fds are non-negative")
                });
            }
            ProgKind::Kprobe => attr.prog_type = BPF_PROG_TYPE_KPROBE,
        }
        for (dst, src) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src;
        }
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = u32::try_from(log.len()).expect("log buffer fits u32");
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        bpf(BPF_PROG_LOAD, &mut attr).map(fd_from)
    };
    attempt(None).map_err(|error| {
        let mut log = vec![0u8; 1 << 20];
        let _ = attempt(Some(&mut log));
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        // The last lines say what the verifier rejected.
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        LoadFailure {
            error,
            verifier_log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    })
}

/// Attaches a loaded fentry/fexit program to the function it was loaded for. It stays
/// attached while the returned fd is open.
pub fn attach_tracing(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = RawTracepointAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).expect("fds are non-negative"),
        ..Default::default()
    };
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).map(fd_from)
}

/// Opens the kernel BTF object named `name` (a module's, e.g. `nf_nat`): walks the loaded
/// BTF objects by id and asks each for its name. `Ok(None)` when no object has that name.
pub fn kernel_btf_fd_by_name(name: &str) -> io::Result<Option<OwnedFd>> {
    let mut id = 0u32;
    loop {
        let mut attr = GetIdAttr {
            id,
            ..Default::default()
        };
        match bpf(BPF_BTF_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut attr = GetIdAttr {
            id,
            ..Default::default()
        };
        let fd = match bpf(BPF_BTF_GET_FD_BY_ID, &mut attr) {
            Ok(ret) => fd_from(ret),
            // Unloaded between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let mut buf = [0u8; 64];
        let mut info = BtfInfo {
            name: buf.as_mut_ptr() as u64,
            name_len: u32::try_from(buf.len()).expect("small"),
            ..Default::default()
        };
        let mut attr = InfoAttr {
            bpf_fd: u32::try_from(fd.as_raw_fd()).expect("fds are non-negative"),
            info_len: u32::try_from(size_of::<BtfInfo>()).expect("small"),
            info: std::ptr::from_mut(&mut info) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if info.kernel_btf != 0 && &buf[..end] == name.as_bytes() {
            return Ok(Some(fd));
        }
    }
}

/// Links a loaded netfilter program to a hook in the caller's network namespace. The hook
/// stays attached while the returned fd is open.
pub fn link_netfilter(
    prog: BorrowedFd<'_>,
    pf: u32,
    hooknum: u32,
    priority: i32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateNetfilterAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).expect("fds are non-negative"),
        attach_type: BPF_NETFILTER,
        pf,
        hooknum,
        priority,
        ..Default::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_from)
}

/// Where the kernel lists the dynamic PMU of kprobe perf events (Linux >= 4.17).
const KPROBE_PMU_TYPE: &str = "/sys/bus/event_source/devices/kprobe/type";
/// `PERF_ATTR_SIZE_VER5`: every field up to `sample_max_stack`; enough for a kprobe.
const PERF_ATTR_SIZE: u32 = 112;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_EVENT_IOC_ENABLE`: `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `PERF_EVENT_IOC_SET_BPF`: `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// The prefix of `struct perf_event_attr` a kprobe event needs, `PERF_ATTR_SIZE` bytes.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// `kprobe_func`: the probed function's name.
    config1: u64,
    /// `probe_offset`.
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

/// True when the kernel offers kprobe perf events (a kernel built with CONFIG_KPROBES and
/// CONFIG_KPROBE_EVENTS, Linux >= 4.17).
#[must_use]
pub fn kprobe_pmu_available() -> bool {
    std::path::Path::new(KPROBE_PMU_TYPE).exists()
}

/// Creates a kprobe on the entry of kernel function `function` (in vmlinux or a loaded
/// module) as a perf event, runs the loaded kprobe program `prog` on every hit, on every CPU,
/// and enables it. The probe stays while the returned fd is open.
pub fn attach_kprobe(prog: BorrowedFd<'_>, function: &str) -> io::Result<OwnedFd> {
    let pmu: u32 = std::fs::read_to_string(KPROBE_PMU_TYPE)?
        .trim()
        .parse()
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{KPROBE_PMU_TYPE}: {e}"),
            )
        })?;
    let name = std::ffi::CString::new(function)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = PerfEventAttr {
        kind: pmu,
        size: PERF_ATTR_SIZE,
        config1: name.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a zero-padded perf_event_attr prefix of the size it declares; `name`
    // outlives the call. pid -1 with cpu 0 is how a system-wide kprobe is opened.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_mut(&mut attr),
            -1 as libc::c_int,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let event = fd_from(ret);
    for (request, arg) in [
        (
            PERF_EVENT_IOC_SET_BPF,
            libc::c_ulong::try_from(prog.as_raw_fd()).expect("fds are non-negative"),
        ),
        (PERF_EVENT_IOC_ENABLE, 0),
    ] {
        // SAFETY: both requests take an integer argument.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(event)
}

/// Writes a global-data map's single value (key 0).
pub fn map_update_key0(map: BorrowedFd<'_>, value: &[u8]) -> io::Result<()> {
    let key = 0u32;
    let mut attr = MapElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).expect("fds are non-negative"),
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Freezes a map: no more writes from user space, and the verifier treats its contents
/// as constants (needed for the offsets in `.rodata`).
pub fn map_freeze(map: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = MapFreezeAttr {
        map_fd: u32::try_from(map.as_raw_fd()).expect("fds are non-negative"),
    };
    bpf(BPF_MAP_FREEZE, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn attr_layouts_match_the_kernel_uapi() {
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(offset_of!(ProgLoadAttr, func_info), 80);
        assert_eq!(offset_of!(ProgLoadAttr, line_info), 96);
        assert_eq!(offset_of!(ProgLoadAttr, attach_btf_id), 108);
        assert_eq!(offset_of!(ProgLoadAttr, attach_btf_obj_fd), 112);
        assert_eq!(size_of::<ProgLoadAttr>(), 120);
        assert_eq!(offset_of!(BtfInfo, name), 16);
        assert_eq!(offset_of!(BtfInfo, kernel_btf), 28);
        assert_eq!(size_of::<BtfInfo>(), 32);
        assert_eq!(size_of::<RawTracepointAttr>(), 16);
        assert_eq!(offset_of!(LinkCreateNetfilterAttr, pf), 16);
        assert_eq!(offset_of!(LinkCreateNetfilterAttr, priority), 24);
        assert_eq!(size_of::<LinkCreateNetfilterAttr>(), 32);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, flags), 24);
        assert_eq!(offset_of!(PerfEventAttr, config), 8);
        assert_eq!(offset_of!(PerfEventAttr, flags), 40);
        assert_eq!(offset_of!(PerfEventAttr, config1), 56);
        assert_eq!(offset_of!(PerfEventAttr, config2), 64);
        assert_eq!(offset_of!(PerfEventAttr, sample_max_stack), 108);
        assert_eq!(size_of::<PerfEventAttr>(), PERF_ATTR_SIZE as usize);
    }
}
