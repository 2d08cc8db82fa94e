//! The CGNAT lab: three network namespaces, created for one test or demo and deleted on drop.
//!
//! ```text
//!  subscribers ns                  NAT ns                              server ns
//!  sub0 ─────── veth ─────── nat-sub    nat-up ─────── veth ─────── srv0
//!  100.64.0.10…/10           100.64.0.1/10  192.0.2.1/24               192.0.2.2/24
//!  fd00:64::10…/64           fd00:64::1/64  2001:db8:1::1/64           2001:db8:1::2/64
//!                            nftables: snat 100.64.0.0/10 → 203.0.113.7-203.0.113.9
//!                            (ports 20000-40000 for TCP/UDP), masquerade fd00:64::/64
//! ```
//!
//! The server routes the public pool 203.0.113.0/24 back through the NAT. Conntrack timeouts
//! in the NAT namespace are short (a few seconds) so that bindings end during a test.
//! Namespace names carry the process id and a counter, so parallel or leftover runs never
//! collide; nothing is routed out of the lab.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{describe, require_root, require_tools, run_ok, run_stdout};

/// Interface of the subscribers namespace (towards the NAT).
pub const SUB_IF: &str = "sub0";
/// Interface of the NAT namespace towards the subscribers.
pub const NAT_SUB_IF: &str = "nat-sub";
/// Interface of the NAT namespace towards the server (the "public" side).
pub const NAT_UP_IF: &str = "nat-up";
/// Interface of the server namespace.
pub const SRV_IF: &str = "srv0";

/// NAT address on the subscriber side (IPv4 gateway of the subscribers).
pub const NAT_SUB_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// NAT address on the subscriber side (IPv6 gateway of the subscribers).
pub const NAT_SUB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1);
/// NAT upstream address (the server's gateway to the pool).
pub const NAT_UP_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// NAT upstream IPv6 address: the external address of every NAT66 (masquerade) binding.
pub const NAT_UP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The server's IPv4 address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// First address of the public SNAT pool.
pub const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Last address of the public SNAT pool.
pub const POOL_LAST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// External port range of TCP and UDP bindings in the pool.
pub const POOL_PORTS: (u16, u16) = (20000, 40000);

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Number of subscriber addresses (each has an IPv4 and an IPv6 address).
    pub subscribers: usize,
    /// Conntrack timeout, in whole seconds, of UDP (both), ICMP, ICMPv6 and the closing TCP
    /// states in the NAT namespace: bindings end this long after their last packet.
    pub conntrack_timeout_secs: u32,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            subscribers: 20,
            conntrack_timeout_secs: 3,
        }
    }
}

/// Which namespace of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    /// Where the subscribers' sockets live.
    Subscribers,
    /// Where NAT (nftables + conntrack) happens and the agent runs.
    Nat,
    /// Where the servers live; what they observe is the external side of each binding.
    Server,
}

/// A running lab; dropping it kills whatever still runs in its namespaces and deletes them.
#[derive(Debug)]
pub struct Lab {
    /// Unique prefix of every namespace name of this lab (`nt<pid>x<n>`).
    pub prefix: String,
    /// The configuration the lab was built with.
    pub config: LabConfig,
    /// The subscribers' IPv4 addresses, 100.64.0.10 onwards.
    pub subscribers_v4: Vec<Ipv4Addr>,
    /// The subscribers' IPv6 addresses, fd00:64::10 onwards.
    pub subscribers_v6: Vec<Ipv6Addr>,
    /// Namespaces created so far, deleted in reverse order on drop.
    created: Vec<String>,
    /// (protocol, local address, port or echo id) of every client socket of this lab, so that
    /// no flow reuses an earlier flow's conntrack tuple.
    used_tuples: Mutex<HashSet<(u8, IpAddr, u16)>>,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The nftables ruleset of the NAT namespace.
fn nat_ruleset() -> String {
    let (first, last) = (POOL_FIRST, POOL_LAST);
    let (lo, hi) = POOL_PORTS;
    format!(
        "table inet nattrace_lab {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"{NAT_UP_IF}\" ip saddr 100.64.0.0/10 meta l4proto {{ tcp, udp }} snat ip to {first}-{last}:{lo}-{hi}
        oifname \"{NAT_UP_IF}\" ip saddr 100.64.0.0/10 snat ip to {first}-{last}
        oifname \"{NAT_UP_IF}\" ip6 saddr fd00:64::/64 masquerade
    }}
}}
"
    )
}

/// Subscriber IPv4 address number `i` (0-based): 100.64.0.10, 100.64.0.11, …
fn subscriber_v4(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i + 10).expect("subscriber count fits u32");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + n)
}

/// Subscriber IPv6 address number `i` (0-based): fd00:64::10, fd00:64::11, … (the decimal
/// digits read as hex, so that the last group matches the IPv4 address where it can).
fn subscriber_v6(i: usize) -> Ipv6Addr {
    let last =
        u16::from_str_radix(&(i + 10).to_string(), 16).expect("subscriber count below 10000");
    Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, last)
}

impl Lab {
    /// Builds the lab. Needs root and iproute2, nftables, procps (sysctl), conntrack-tools.
    pub fn new(config: LabConfig) -> Result<Lab> {
        require_root()?;
        require_tools(&["ip", "nft", "sysctl", "conntrack"])?;
        if config.subscribers == 0 || config.subscribers > 9000 {
            bail!(
                "LabConfig.subscribers must be 1..=9000, not {}",
                config.subscribers
            );
        }
        let prefix = format!(
            "nt{}x{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            subscribers_v4: (0..config.subscribers).map(subscriber_v4).collect(),
            subscribers_v6: (0..config.subscribers).map(subscriber_v6).collect(),
            config,
            created: Vec::new(),
            used_tuples: Mutex::new(HashSet::new()),
        };
        // On error `lab` is dropped here, which deletes whatever was created.
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    /// Name of one of the lab's namespaces.
    #[must_use]
    pub fn ns(&self, which: Ns) -> String {
        let suffix = match which {
            Ns::Subscribers => "sub",
            Ns::Nat => "nat",
            Ns::Server => "srv",
        };
        format!("{}-{suffix}", self.prefix)
    }

    /// The subscribers' addresses of one family.
    #[must_use]
    pub fn subscribers(&self, v6: bool) -> Vec<IpAddr> {
        if v6 {
            self.subscribers_v6
                .iter()
                .copied()
                .map(IpAddr::V6)
                .collect()
        } else {
            self.subscribers_v4
                .iter()
                .copied()
                .map(IpAddr::V4)
                .collect()
        }
    }

    /// The server's address of one family.
    #[must_use]
    pub fn server_ip(v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(SERVER_V6)
        } else {
            IpAddr::V4(SERVER_V4)
        }
    }

    fn build(&mut self) -> Result<()> {
        let (sub, nat, srv) = (
            self.ns(Ns::Subscribers),
            self.ns(Ns::Nat),
            self.ns(Ns::Server),
        );
        for ns in [&sub, &nat, &srv] {
            run_ok(Command::new("ip").args(["netns", "add", ns]))?;
            self.created.push(ns.clone());
            // No duplicate address detection: addresses are usable at once.
            sysctl_in(
                ns,
                &[
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                ],
            )?;
        }
        run_ok(Command::new("ip").args([
            "link", "add", SUB_IF, "netns", &sub, "type", "veth", "peer", "name", NAT_SUB_IF,
            "netns", &nat,
        ]))?;
        run_ok(Command::new("ip").args([
            "link", "add", NAT_UP_IF, "netns", &nat, "type", "veth", "peer", "name", SRV_IF,
            "netns", &srv,
        ]))?;

        let mut batch = format!("link set lo up\nlink set {SUB_IF} up\n");
        for a in &self.subscribers_v4 {
            batch += &format!("address add {a}/10 dev {SUB_IF}\n");
        }
        for a in &self.subscribers_v6 {
            batch += &format!("address add {a}/64 dev {SUB_IF} nodad\n");
        }
        batch +=
            &format!("route add default via {NAT_SUB_V4}\nroute add default via {NAT_SUB_V6}\n");
        ip_batch(&sub, &batch)?;

        ip_batch(
            &nat,
            &format!(
                "link set lo up\nlink set {NAT_SUB_IF} up\nlink set {NAT_UP_IF} up\n\
                 address add {NAT_SUB_V4}/10 dev {NAT_SUB_IF}\naddress add {NAT_SUB_V6}/64 dev {NAT_SUB_IF} nodad\n\
                 address add {NAT_UP_V4}/24 dev {NAT_UP_IF}\naddress add {NAT_UP_V6}/64 dev {NAT_UP_IF} nodad\n"
            ),
        )?;

        ip_batch(
            &srv,
            &format!(
                "link set lo up\nlink set {SRV_IF} up\naddress add {SERVER_V4}/24 dev {SRV_IF}\n\
                 address add {SERVER_V6}/64 dev {SRV_IF} nodad\nroute add 203.0.113.0/24 via {NAT_UP_V4}\n"
            ),
        )?;

        sysctl_in(&sub, &[("net.ipv4.ping_group_range", "0 2147483647")])?;
        sysctl_in(
            &nat,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ],
        )?;

        let mut nft = self.command_in(Ns::Nat, "nft");
        nft.args(["-f", "-"]);
        run_with_stdin(&mut nft, &nat_ruleset())?;

        // After the ruleset: the NAT pulled conntrack into the namespace.
        let t = self.config.conntrack_timeout_secs.to_string();
        let timeouts: Vec<(&str, &str)> = [
            "net.netfilter.nf_conntrack_udp_timeout",
            "net.netfilter.nf_conntrack_udp_timeout_stream",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
            "net.netfilter.nf_conntrack_tcp_timeout_close",
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
            "net.netfilter.nf_conntrack_tcp_timeout_fin_wait",
            "net.netfilter.nf_conntrack_tcp_timeout_last_ack",
            "net.netfilter.nf_conntrack_icmp_timeout",
            "net.netfilter.nf_conntrack_icmpv6_timeout",
        ]
        .into_iter()
        .map(|k| (k, t.as_str()))
        .collect();
        sysctl_in(&nat, &timeouts)?;
        Ok(())
    }

    /// Sets sysctls inside one of the lab's namespaces.
    pub fn sysctl(&self, which: Ns, settings: &[(&str, &str)]) -> Result<()> {
        sysctl_in(&self.ns(which), settings)
    }

    /// A command that will run `program` inside one of the lab's namespaces
    /// (`ip netns exec NS program`); add arguments and run it as you like.
    #[must_use]
    pub fn command_in(&self, which: Ns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(which)]).arg(program);
        cmd
    }

    /// Runs `program args…` inside a namespace, fails on a non-zero exit, returns stdout.
    pub fn exec_in(&self, which: Ns, program: &str, args: &[&str]) -> Result<String> {
        run_stdout(self.command_in(which, program).args(args))
    }

    /// Runs `f` in a new thread that has entered the namespace `which` (sockets it creates
    /// live there), and returns its handle. The thread's result is `f`'s.
    pub fn spawn_in<T, F>(&self, which: Ns, f: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let ns = self.ns(which);
        std::thread::spawn(move || {
            enter_netns(&ns)?;
            f()
        })
    }

    /// Runs `f` in a thread that has entered the namespace `which` and waits for it.
    pub fn run_in<T, F>(&self, which: Ns, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        match self.spawn_in(which, f).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Records that a client socket of protocol `proto` uses `(ip, port)`; false when an
    /// earlier flow of this lab already used it (the caller then picks another socket, so that
    /// every flow is its own conntrack entry and its own binding).
    pub fn claim_tuple(&self, proto: u8, ip: IpAddr, port: u16) -> bool {
        self.used_tuples
            .lock()
            .expect("tuple registry poisoned")
            .insert((proto, ip, port))
    }

    /// A human summary of the lab, for the demo.
    #[must_use]
    pub fn describe(&self) -> String {
        let n = self.subscribers_v4.len();
        format!(
            "namespaces   {sub} (subscribers), {nat} (NAT, agent), {srv} (server)\n\
             subscribers  {n} × IPv4 {v4a}…{v4b}, {n} × IPv6 {v6a}…{v6b}\n\
             NAT44        snat 100.64.0.0/10 → {POOL_FIRST}-{POOL_LAST}, ports {p0}-{p1} (TCP/UDP)\n\
             NAT66        masquerade fd00:64::/64 → {NAT_UP_V6}\n\
             server       {SERVER_V4}, {SERVER_V6}\n\
             conntrack    UDP/ICMP/TCP-closing timeouts {t} s in the NAT namespace",
            sub = self.ns(Ns::Subscribers),
            nat = self.ns(Ns::Nat),
            srv = self.ns(Ns::Server),
            v4a = self.subscribers_v4[0],
            v4b = self.subscribers_v4[n - 1],
            v6a = self.subscribers_v6[0],
            v6b = self.subscribers_v6[n - 1],
            p0 = POOL_PORTS.0,
            p1 = POOL_PORTS.1,
            t = self.config.conntrack_timeout_secs,
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let me = std::process::id();
        for ns in self.created.iter().rev() {
            // Processes we started in the lab (agents, listeners) normally stop through their
            // own guards; whatever is still there was started by this lab's user and goes now.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<u32>()
                        && pid != me
                    {
                        eprintln!(
                            "lab {}: killing leftover process {pid} in {ns}",
                            self.prefix
                        );
                        let _ = crate::util::signal(pid, libc::SIGKILL);
                    }
                }
            }
            let mut del = Command::new("ip");
            del.args(["netns", "del", ns]);
            match del.output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "lab: `{}` failed: {}",
                    describe(&del),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("lab: cannot run `{}`: {e}", describe(&del)),
            }
        }
    }
}

/// Makes the calling thread enter the named network namespace (`/run/netns/NAME`). Sockets
/// the thread creates afterwards live in that namespace; other threads are unaffected.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets sysctls inside the named namespace (`ip netns exec NS sysctl -q -w k=v …`).
fn sysctl_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sysctl", "-q", "-w"]);
    for (k, v) in settings {
        cmd.arg(format!("{k}={v}"));
    }
    run_ok(&mut cmd).map(drop)
}

/// Runs `ip -n NS -batch -` with `commands` on stdin.
fn ip_batch(ns: &str, commands: &str) -> Result<()> {
    run_with_stdin(Command::new("ip").args(["-n", ns, "-batch", "-"]), commands)
}

/// Runs a command with `input` on stdin; fails on a non-zero exit, quoting stderr.
fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}\ninput was:\n{input}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// How long to wait for the lab's bindings to time out after their last packet: the conntrack
/// timeout plus a second. (The kernel reaps them later still, at its next garbage collection or
/// table dump; see [`crate::conntrack_truth::evict_expired`].)
#[must_use]
pub fn expiry_wait(lab: &Lab) -> Duration {
    Duration::from_secs(u64::from(lab.config.conntrack_timeout_secs) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_addresses() {
        assert_eq!(subscriber_v4(0), Ipv4Addr::new(100, 64, 0, 10));
        assert_eq!(subscriber_v4(246), Ipv4Addr::new(100, 64, 1, 0));
        assert_eq!(subscriber_v6(0).to_string(), "fd00:64::10");
        assert_eq!(subscriber_v6(19).to_string(), "fd00:64::29");
    }

    #[test]
    fn ruleset_names_pool_and_ports() {
        let r = nat_ruleset();
        assert!(
            r.contains("snat ip to 203.0.113.7-203.0.113.9:20000-40000"),
            "{r}"
        );
        assert!(r.contains("masquerade"), "{r}");
    }
}
