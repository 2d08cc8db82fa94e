//! Small helpers shared by the lab, the truth listeners and the tests: running external
//! commands, checking the environment, formatting times the way `nattrace` parses them.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// Fails unless the process runs as root (the lab creates namespaces, the agent loads eBPF).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the nattrace end-to-end tests and the demo must run as root \
             (they create network namespaces and load eBPF): use `cargo xtask test` / `cargo xtask demo`"
        );
    }
    Ok(())
}

/// Fails with one message naming every tool of `tools` that is not on `PATH`.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tool(s) on PATH: {} (Debian packages iproute2, nftables, conntrack, util-linux, procps; \
             `cargo xtask setup` installs them)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Describes a command for error messages: program and arguments, space separated.
#[must_use]
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command to completion and returns its output; a non-zero exit is an error that
/// quotes the command and its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs a command to completion and returns its stdout as text (see [`run_ok`]).
pub fn run_stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run_ok(cmd)?.stdout).into_owned())
}

/// A time as RFC 3339 in UTC with nanoseconds (`2026-11-22T14:09:01.123456789Z`).
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A time as RFC 3339 in UTC with milliseconds, for people to read.
#[must_use]
pub fn rfc3339_millis(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A time as unix seconds with a nanosecond fraction (`1795356809.163302000`).
#[must_use]
pub fn unix_secs(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Parses an RFC 3339 time (any offset).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("not an RFC 3339 time: {text:?}"))?;
    Ok(SystemTime::from(t))
}

/// `b - a` in seconds, negative when `b` is earlier: for messages and tolerance checks.
#[must_use]
pub fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `|a - b| <= tolerance`.
#[must_use]
pub fn within(a: SystemTime, b: SystemTime, tolerance: Duration) -> bool {
    secs_between(a, b).abs() <= tolerance.as_secs_f64()
}

/// An address as `nattrace` takes it on the command line: `IP:PORT`, IPv6 as `[IP]:PORT`.
#[must_use]
pub fn endpoint_arg(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Raises the soft limit of open files to the hard limit (bursts keep thousands of sockets
/// open at once so that no source port is reused).
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            bail!(
                "setrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(lim.rlim_cur)
}

/// Sends `signal` to the process `pid` (one process we started, by its id).
pub fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// How a command ended under [`run_with_timeout`].
#[derive(Debug)]
pub struct Finished {
    /// Exit status; `None` when killed by a signal (including on timeout).
    pub status: Option<i32>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// True when it was still running at the timeout and was stopped (SIGTERM, then SIGKILL).
    pub timed_out: bool,
}

/// Runs a command (stdin closed) and collects its output; stops it if it runs longer than
/// `timeout` (SIGTERM, SIGKILL 5 s later). Not being able to start it is an error.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = std::time::Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() >= timeout && !timed_out {
            timed_out = true;
            let _ = signal(child.id(), libc::SIGTERM);
        }
        if start.elapsed() >= timeout + Duration::from_secs(5) {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Finished {
        status: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_795_356_809, 163_302_123);
        assert_eq!(unix_secs(t), "1795356809.163302123");
        assert_eq!(parse_rfc3339(&rfc3339(t)).unwrap(), t);
        assert!((secs_between(t, t + Duration::from_millis(1500)) - 1.5).abs() < 1e-9);
        assert!((secs_between(t + Duration::from_secs(2), t) + 2.0).abs() < 1e-9);
    }

    #[test]
    fn endpoints_print_as_the_cli_parses_them() {
        assert_eq!(
            endpoint_arg("203.0.113.7:20001".parse().unwrap()),
            "203.0.113.7:20001"
        );
        assert_eq!(
            endpoint_arg("[2001:db8:1::1]:5".parse().unwrap()),
            "[2001:db8:1::1]:5"
        );
    }
}
