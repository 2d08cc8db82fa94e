//! A kernel without BPF netfilter programs, met through the agent's real probe path.
//!
//! This host has the feature, so the test makes the kernel answer as Linux < 6.4 does: a
//! seccomp filter installed in the agent's process makes `bpf(BPF_PROG_LOAD, …)` fail with
//! EINVAL, which is what an unknown program type gets. The agent's probe (aya's
//! `is_program_supported` followed by our loader) is not bypassed or switched by any
//! test-only flag; only the kernel's answer is changed.

use std::{os::unix::process::CommandExt as _, process::Command};

use nattrace_e2e::{agent::nattrace_bin, util::require_root};

/// Installs a seccomp filter: `bpf(BPF_PROG_LOAD, …)` fails with EINVAL, all else allowed.
fn deny_prog_load() -> std::io::Result<()> {
    const BPF_PROG_LOAD: u32 = 5;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let sys_bpf = u32::try_from(libc::SYS_bpf).expect("syscall numbers are small");
    let errno = u32::try_from(libc::EINVAL).expect("errno is small");
    let ld = |k: u32| libc::sock_filter {
        code: 0x20,
        jt: 0,
        jf: 0,
        k,
    }; // BPF_LD|BPF_W|BPF_ABS
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15,
        jt,
        jf,
        k,
    }; // BPF_JMP|BPF_JEQ|BPF_K
    let ret = |k: u32| libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k,
    }; // BPF_RET|BPF_K
    // struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }
    let filter = [
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(SECCOMP_RET_ALLOW),
        ld(0),
        jeq(sys_bpf, 0, 3),
        ld(16), // args[0], low half on little-endian
        jeq(BPF_PROG_LOAD, 0, 1),
        ret(SECCOMP_RET_ERRNO | errno),
        ret(SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).expect("short"),
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls with a valid, live filter program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `nattrace run --backend BACKEND` in a new network namespace with a fresh data directory
/// path (not created), program loads denied when `deny` is set. Returns the exit status, the
/// last line of stderr, stderr, and whether the data directory exists afterwards.
fn run_refused(backend: &str, deny: bool) -> (Option<i32>, String, String, bool) {
    require_root().expect("run the end-to-end tests as root (cargo xtask test)");
    let data = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new("unshare");
    cmd.arg("--net")
        .arg(nattrace_bin())
        .args(["run", "--backend", backend, "--data-dir"])
        .arg(data.path().join("d"));
    if deny {
        // SAFETY: the closure only makes async-signal-safe prctl calls.
        unsafe { cmd.pre_exec(deny_prog_load) };
    }
    let out = cmd.output().expect("start nattrace under unshare");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    (
        out.status.code(),
        last,
        stderr,
        data.path().join("d").exists(),
    )
}

#[test]
#[ignore = "privileged: run through `cargo xtask test`"]
#[cfg(target_arch = "x86_64")]
fn kernel_without_bpf_netfilter_programs_is_an_environment_error() {
    let (status, last, stderr, data_dir) = run_refused("netfilter", true);
    assert_eq!(status, Some(4), "exit status; stderr: {stderr}");
    assert!(
        last.starts_with("nattrace: ") && last.contains("netfilter") && last.contains("6.4"),
        "one line naming the missing feature and the kernel it needs, got: {stderr}"
    );
    assert!(
        !data_dir,
        "a failed probe must not create or touch the data directory"
    );
}

/// `--backend auto` on a kernel that offers no backend at all (this host with program loads
/// denied: no netfilter programs, fentry refused at load, no kprobes): one line, exit 4, and
/// the data directory untouched, although the refusal of fentry shows only at load time.
#[test]
#[ignore = "privileged: run through `cargo xtask test`"]
#[cfg(target_arch = "x86_64")]
fn auto_without_any_backend_is_an_environment_error_before_the_data_dir() {
    let (status, last, stderr, data_dir) = run_refused("auto", true);
    assert_eq!(status, Some(4), "exit status; stderr: {stderr}");
    assert!(
        last.starts_with("nattrace: "),
        "one line saying why, got: {stderr}"
    );
    assert!(
        !data_dir,
        "a backend refused at load must not leave a data directory behind: {stderr}"
    );
}

/// On this host (6.18 built without kprobes) `--backend kprobe` is refused by its check.
#[test]
#[ignore = "privileged: run through `cargo xtask test`"]
fn kprobe_backend_without_kprobes_says_so() {
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        eprintln!("skipped: this kernel has kprobe events (the VM matrix runs the kprobe backend)");
        return;
    }
    let (status, last, stderr, data_dir) = run_refused("kprobe", false);
    assert_eq!(status, Some(4), "exit status; stderr: {stderr}");
    assert!(
        last.contains("kprobe perf events") && last.contains("CONFIG_KPROBE_EVENTS"),
        "names the missing feature: {stderr}"
    );
    assert!(!data_dir);
}
