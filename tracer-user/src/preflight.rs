//! Checks made before the agent touches the kernel or the data directory, so that a user
//! gets one line naming the cause and what to do instead of a failed system call.

use crate::exit::UserError;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails unless the process may load and attach eBPF programs and talk ctnetlink: root, or
/// CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (CAP_SYS_ADMIN stands in for the first and last).
pub fn check_privileges() -> Result<(), UserError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| {
        UserError::environment(format!(
            "cannot read /proc/self/status to check privileges: {e}"
        ))
    })?;
    let missing = missing_capabilities(&status);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(UserError::environment(format!(
            "`nattrace run` needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (missing: {}); run it as root or grant those capabilities (see README, systemd unit)",
            missing.join(", ")
        )))
    }
}

/// Names of the needed capabilities absent from a `/proc/<pid>/status` text.
fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert!(missing_capabilities("Name:\tx\nCapEff:\t000001ffffffffff\n").is_empty());
    }

    #[test]
    fn unprivileged_misses_all_three() {
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000000000\n"),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }

    #[test]
    fn exact_capabilities_suffice() {
        let eff = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert!(missing_capabilities(&format!("CapEff:\t{eff:016x}\n")).is_empty());
    }
}
