//! The few `bpf(2)` commands aya 0.14 cannot issue for a netfilter program: loading it with
//! its real program type, linking it to a netfilter hook, and finalising global data maps.
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

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_FREEZE: libc::c_long = 22;
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

/// Loads a netfilter program. On failure, loads again with the verifier log on so the
/// error can say why.
pub fn prog_load_netfilter(
    name: &str,
    insns: &[Insn],
    license: &CStr,
) -> Result<OwnedFd, LoadFailure> {
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_NETFILTER,
            insn_cnt: u32::try_from(insns.len()).expect("program fits u32 instructions"),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_NETFILTER,
            ..Default::default()
        };
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
        assert_eq!(offset_of!(LinkCreateNetfilterAttr, pf), 16);
        assert_eq!(offset_of!(LinkCreateNetfilterAttr, priority), 24);
        assert_eq!(size_of::<LinkCreateNetfilterAttr>(), 32);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, flags), 24);
    }
}
