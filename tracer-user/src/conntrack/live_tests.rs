//! Tests against the running kernel. Each test makes a network namespace of its own
//! (deleted on drop, even on failure), runs the module in a thread moved into it, and
//! inserts and deletes entries with the `conntrack` tool in the same namespace: what was
//! inserted is the truth the module's output is compared with. They need root, `ip` and
//! `conntrack`, and are skipped (with a message) without them.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ConntrackSysctls, CtEntry, DestroyListener, RecvOutcome, dump_table};
use crate::binding::{
    ConntrackKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPS_DST_NAT, IPS_SRC_NAT,
    Tuple,
};

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, or returns `None` (test skipped) when not root or a tool is
    /// missing.
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: live conntrack tests need root");
            return None;
        }
        for tool in ["ip", "conntrack"] {
            if Command::new(tool).arg("--version").output().is_err() {
                eprintln!(
                    "skipped: live conntrack tests need `{tool}` \
                     (apt-get install iproute2 conntrack)"
                );
                return None;
            }
        }
        let name = format!("nattrace-ct-{}-{tag}", std::process::id());
        // A namespace left over by an earlier run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { name })
    }

    /// Runs a command inside the namespace and returns its stdout; panics if it fails.
    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `conntrack` with whitespace-separated `args` inside the namespace.
    fn conntrack(&self, args: &str) {
        let mut all = vec!["conntrack"];
        all.extend(args.split_whitespace());
        self.exec(&all);
    }

    /// A sysctl of the namespace, read by a separate process.
    fn sysctl(&self, name: &str) -> String {
        self.exec(&["cat", &format!("/proc/sys/net/netfilter/{name}")])
            .trim()
            .to_owned()
    }

    fn set_sysctl(&self, name: &str, value: &str) {
        self.exec(&[
            "sh",
            "-c",
            &format!("echo {value} > /proc/sys/net/netfilter/{name}"),
        ]);
    }

    /// Runs `f` in a thread that has entered the namespace (only that thread moves).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let ns = File::open(format!("/run/netns/{}", self.name)).unwrap();
                // SAFETY: a valid namespace descriptor; setns only affects this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now_ns() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_nanos()).unwrap()
}

/// One entry to insert: the `conntrack -I` arguments and what the kernel must report.
struct Case {
    /// `conntrack` arguments that insert the entry.
    insert: &'static str,
    /// `conntrack` arguments that delete it.
    delete: &'static str,
    proto: u8,
    orig: Tuple,
    reply: Tuple,
    zone: u16,
    mark: u32,
    /// NAT status bit the entry must carry, if any.
    nat: u32,
}

impl Case {
    fn key(&self) -> ConntrackKey {
        ConntrackKey {
            proto: self.proto,
            orig: self.orig,
            zone: self.zone,
        }
    }

    fn check(&self, e: &CtEntry) {
        assert_eq!(e.proto, self.proto, "{e:?}");
        assert_eq!(e.orig, self.orig, "{e:?}");
        assert_eq!(e.reply, self.reply, "{e:?}");
        assert_eq!(e.zone, self.zone, "{e:?}");
        assert_eq!(e.mark, self.mark, "{e:?}");
        if self.nat != 0 {
            assert_eq!(e.status & self.nat, self.nat, "{e:?}");
            assert!(e.is_nat());
        }
        // Inserted with accounting on and nothing sent: zero counters, both directions.
        assert_eq!(
            e.orig_counters.map(|c| (c.packets, c.bytes)),
            Some((0, 0)),
            "{e:?}"
        );
        assert_eq!(
            e.reply_counters.map(|c| (c.packets, c.bytes)),
            Some((0, 0)),
            "{e:?}"
        );
    }
}

/// A tuple from text addresses and ports.
fn tuple(s: &str, d: &str, sp: u16, dp: u16) -> Tuple {
    Tuple {
        src: ip(s),
        dst: ip(d),
        src_port: sp,
        dst_port: dp,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // TCP with an explicit reply tuple, in zone 5 with a mark.
        Case {
            insert: "-I -p tcp -s 100.64.0.10 -d 192.0.2.2 --sport 40000 --dport 80 -r 192.0.2.2 \
                -q 203.0.113.7 --reply-port-src 80 --reply-port-dst 20001 --state ESTABLISHED \
                -t 300 --zone 5 --mark 42",
            delete: "-D -p tcp -s 100.64.0.10 -d 192.0.2.2 --sport 40000 --dport 80 --zone 5",
            proto: IPPROTO_TCP,
            orig: tuple("100.64.0.10", "192.0.2.2", 40000, 80),
            reply: tuple("192.0.2.2", "203.0.113.7", 80, 20001),
            zone: 5,
            mark: 42,
            nat: 0,
        },
        // Source NAT set up by the kernel.
        Case {
            insert: "-I -p tcp -s 100.64.0.11 -d 192.0.2.2 --sport 40001 --dport 80 \
                --state ESTABLISHED -t 300 --src-nat 203.0.113.8:20002",
            delete: "-D -p tcp -s 100.64.0.11 -d 192.0.2.2 --sport 40001 --dport 80",
            proto: IPPROTO_TCP,
            orig: tuple("100.64.0.11", "192.0.2.2", 40001, 80),
            reply: tuple("192.0.2.2", "203.0.113.8", 80, 20002),
            zone: 0,
            mark: 0,
            nat: IPS_SRC_NAT,
        },
        // Destination NAT (a port forward).
        Case {
            insert: "-I -p udp -s 198.51.100.9 -d 203.0.113.7 --sport 5555 --dport 8080 -t 300 \
                --dst-nat 100.64.0.20:80",
            delete: "-D -p udp -s 198.51.100.9 -d 203.0.113.7 --sport 5555 --dport 8080",
            proto: IPPROTO_UDP,
            orig: tuple("198.51.100.9", "203.0.113.7", 5555, 8080),
            reply: tuple("100.64.0.20", "198.51.100.9", 80, 5555),
            zone: 0,
            mark: 0,
            nat: IPS_DST_NAT,
        },
        // ICMP echo: the identifier is the "port" in both directions.
        Case {
            insert: "-I -p icmp -s 100.64.0.12 -d 192.0.2.2 --icmp-type 8 --icmp-code 0 \
                --icmp-id 1234 -t 300",
            delete: "-D -p icmp -s 100.64.0.12 -d 192.0.2.2",
            proto: IPPROTO_ICMP,
            orig: tuple("100.64.0.12", "192.0.2.2", 1234, 0),
            reply: tuple("192.0.2.2", "100.64.0.12", 1234, 0),
            zone: 0,
            mark: 0,
            nat: 0,
        },
        // IPv6 UDP with a mark.
        Case {
            insert: "-I -p udp -s fd00::1 -d 2001:db8::2 --sport 5000 --dport 53 -t 300 --mark 7",
            delete: "-D -p udp -s fd00::1 -d 2001:db8::2 --sport 5000 --dport 53",
            proto: IPPROTO_UDP,
            orig: tuple("fd00::1", "2001:db8::2", 5000, 53),
            reply: tuple("2001:db8::2", "fd00::1", 53, 5000),
            zone: 0,
            mark: 7,
            nat: 0,
        },
        // ICMPv6 echo in zone 9.
        Case {
            insert: "-I -p icmpv6 -s fd00::1 -d 2001:db8::2 --icmpv6-type 128 --icmpv6-code 0 \
                --icmpv6-id 77 -t 300 --zone 9",
            delete: "-D -p icmpv6 -s fd00::1 -d 2001:db8::2 --zone 9",
            proto: IPPROTO_ICMPV6,
            orig: tuple("fd00::1", "2001:db8::2", 77, 0),
            reply: tuple("2001:db8::2", "fd00::1", 77, 0),
            zone: 9,
            mark: 0,
            nat: 0,
        },
    ]
}

/// Waits up to `timeout` for the descriptor to become readable.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, ms) };
}

/// Drains until `want` entries arrived or 5 s passed; returns them and whether an overrun
/// was reported.
fn collect(listener: &mut DestroyListener, want: usize) -> (Vec<CtEntry>, bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    let mut overrun = false;
    loop {
        match listener.drain(&mut out).unwrap() {
            RecvOutcome::Overrun => {
                overrun = true;
                continue;
            }
            RecvOutcome::WouldBlock => {}
        }
        let now = Instant::now();
        if out.len() >= want || now >= deadline {
            return (out, overrun);
        }
        wait_readable(listener.as_raw_fd(), deadline - now);
    }
}

#[test]
fn live_sysctls_are_enabled_then_restored() {
    let Some(ns) = Netns::new("sysctl") else {
        return;
    };
    ns.set_sysctl("nf_conntrack_events", "0");
    ns.set_sysctl("nf_conntrack_acct", "1");
    ns.set_sysctl("nf_conntrack_timestamp", "0");
    ns.run(|| {
        let guard = ConntrackSysctls::enable().unwrap();
        for name in [
            "nf_conntrack_events",
            "nf_conntrack_acct",
            "nf_conntrack_timestamp",
        ] {
            assert_eq!(ns.sysctl(name), "1", "{name}");
        }
        guard.restore().unwrap();
    });
    assert_eq!(ns.sysctl("nf_conntrack_events"), "0");
    assert_eq!(ns.sysctl("nf_conntrack_acct"), "1");
    assert_eq!(ns.sysctl("nf_conntrack_timestamp"), "0");

    // Dropping restores too, and the files opened in the namespace keep acting on it even
    // when the guard is dropped by a thread in another namespace.
    let guard = ns.run(|| ConntrackSysctls::enable().unwrap());
    assert_eq!(ns.sysctl("nf_conntrack_timestamp"), "1");
    drop(guard);
    assert_eq!(ns.sysctl("nf_conntrack_events"), "0");
    assert_eq!(ns.sysctl("nf_conntrack_timestamp"), "0");
}

#[test]
fn live_dump_reports_inserted_entries() {
    let Some(ns) = Netns::new("dump") else { return };
    ns.run(|| {
        let _sysctls = ConntrackSysctls::enable().unwrap();
        assert!(
            dump_table().unwrap().is_empty(),
            "a new namespace has an empty table"
        );
        let cases = cases();
        let before = now_ns();
        for c in &cases {
            ns.conntrack(c.insert);
        }
        let after = now_ns();
        let entries = dump_table().unwrap();
        assert_eq!(entries.len(), cases.len(), "{entries:#?}");
        for c in &cases {
            let e = entries
                .iter()
                .find(|e| e.key() == c.key())
                .unwrap_or_else(|| panic!("{:?} not in the dump {entries:#?}", c.key()));
            c.check(e);
            let start = e.start_ns.expect("timestamps are on");
            assert!(
                start >= before - 1_000_000_000 && start <= after + 1_000_000_000,
                "{e:?}"
            );
            assert_eq!(e.stop_ns, None, "a live entry has no stop time");
        }
        // Only what this namespace holds: nothing of the host's table.
        for e in &entries {
            assert!(cases.iter().any(|c| c.key() == e.key()), "unexpected {e:?}");
        }
    });
}

#[test]
fn live_destroy_events_match_deleted_entries() {
    let Some(ns) = Netns::new("destroy") else {
        return;
    };
    ns.run(|| {
        let _sysctls = ConntrackSysctls::enable().unwrap();
        let mut listener = DestroyListener::new(4 << 20).unwrap();
        assert!(listener.rcvbuf() >= 4 << 20);
        let cases = cases();
        let before = now_ns();
        for c in &cases {
            ns.conntrack(c.insert);
        }
        for c in &cases {
            ns.conntrack(c.delete);
        }
        let after = now_ns();
        let (events, overrun) = collect(&mut listener, cases.len());
        assert!(!overrun);
        let got: BTreeSet<ConntrackKey> = events.iter().map(CtEntry::key).collect();
        let want: BTreeSet<ConntrackKey> = cases.iter().map(Case::key).collect();
        assert_eq!(got, want, "{events:#?}");
        assert_eq!(events.len(), cases.len());
        for c in &cases {
            let e = events.iter().find(|e| e.key() == c.key()).unwrap();
            c.check(e);
            let (start, stop) = (
                e.start_ns.unwrap(),
                e.stop_ns.expect("destroy has a stop time"),
            );
            assert!(before - 1_000_000_000 <= start && start <= stop, "{e:?}");
            assert!(stop <= after + 1_000_000_000, "{e:?}");
        }
        let mut more = Vec::new();
        assert_eq!(listener.drain(&mut more).unwrap(), RecvOutcome::WouldBlock);
        assert!(more.is_empty());
    });
}

#[test]
fn live_tiny_receive_buffer_reports_overrun() {
    const N: usize = 64;
    let Some(ns) = Netns::new("overrun") else {
        return;
    };
    ns.run(|| {
        let _sysctls = ConntrackSysctls::enable().unwrap();
        let mut listener = DestroyListener::new(1).unwrap();
        ns.exec(&[
            "sh",
            "-c",
            &format!(
                "for i in $(seq 1 {N}); do conntrack -I -p udp -s 100.64.1.1 -d 192.0.2.9 \
                 --sport $((10000 + i)) --dport 53 -t 300 2>/dev/null || exit 1; done"
            ),
        ]);
        assert_eq!(dump_table().unwrap().len(), N);
        // One flush: N destroy events at once, far more than the buffer holds.
        ns.conntrack("-F");
        let (events, overrun) = collect(&mut listener, N);
        assert!(
            overrun,
            "no overrun reported; got {} of {N} events",
            events.len()
        );
        assert!(events.len() < N, "{} events", events.len());
        assert!(events.iter().all(|e| e.orig.src == ip("100.64.1.1")));

        // The socket remains usable afterwards.
        ns.conntrack(
            "-I -p tcp -s 100.64.1.2 -d 192.0.2.9 --sport 1 --dport 2 --state ESTABLISHED -t 300",
        );
        ns.conntrack("-D -s 100.64.1.2");
        let (events, _) = collect(&mut listener, 1);
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].orig, tuple("100.64.1.2", "192.0.2.9", 1, 2));
    });
    // The namespace's sysctls are back to their defaults (restored inside the thread).
    assert_eq!(ns.sysctl("nf_conntrack_events"), "2");
}
