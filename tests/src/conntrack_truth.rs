//! The independent record of when bindings start and end: `conntrack -E` in the NAT
//! namespace, and chunked deletions that force ends without overrunning it.
//!
//! conntrack-tools 1.4.7 (Debian bookworm) applies `--buffer-size` to the wrong netlink
//! socket: strace shows `SO_RCVBUFFORCE` on its command socket while the event subscription
//! is on another one, which keeps the default ~208 KiB buffer and overruns (ENOBUFS) at a
//! few hundred events at once. The listener therefore also enlarges every netlink socket of
//! the conntrack process itself, through `pidfd_getfd`, before it reports ready; with that,
//! 2987 of 2987 DESTROY events of one `conntrack -F` arrived here. The overrun check stays.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

use crate::lab::{Lab, Ns};
use crate::traffic::{FlowTruth, IPPROTO_ICMP, IPPROTO_ICMPV6, proto_name};
use crate::util::{describe, signal};

/// Receive buffer the listener's event socket gets (what `--buffer-size 134217728` asks for).
pub const LISTENER_RCVBUF: usize = 128 << 20;

/// What happened to a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtEventKind {
    /// Entry created (confirmed).
    New,
    /// Entry changed (only seen if asked for).
    Update,
    /// Entry gone.
    Destroy,
}

/// One direction of an entry. For ICMP and ICMPv6 `sport` is the echo identifier and `dport` 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtTuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port, or ICMP echo identifier.
    pub sport: u16,
    /// Destination port, 0 for ICMP.
    pub dport: u16,
}

/// One event printed by `conntrack -E -o timestamp,extended,ktimestamp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEvent {
    /// When conntrack received it (its `-o timestamp`).
    pub time: SystemTime,
    /// For DESTROY, the kernel's own stop time of the entry (`-o ktimestamp`, whole seconds,
    /// printed when nf_conntrack_timestamp is on). It can be seconds before `time`: an entry
    /// whose timeout ran out is reaped lazily, and the kernel dates its stop back to the expiry.
    pub kernel_stop: Option<SystemTime>,
    /// NEW, UPDATE or DESTROY.
    pub kind: CtEventKind,
    /// L4 protocol number.
    pub proto: u8,
    /// Original direction (subscriber → destination for SNAT).
    pub orig: CtTuple,
    /// Reply direction (destination → external address for SNAT).
    pub reply: Option<CtTuple>,
    /// Conntrack zone (0 when not printed).
    pub zone: u16,
}

/// Key of an entry: protocol and original tuple (zone 0 in the lab).
pub type CtKey = (u8, CtTuple);

/// The original tuple conntrack keeps for a flow of the lab.
#[must_use]
pub fn orig_tuple(flow: &FlowTruth) -> CtTuple {
    let icmp = flow.proto == IPPROTO_ICMP || flow.proto == IPPROTO_ICMPV6;
    CtTuple {
        src: flow.internal.ip(),
        dst: flow.destination.ip(),
        sport: flow.internal.port(),
        dport: if icmp { 0 } else { flow.destination.port() },
    }
}

/// Key of a flow's conntrack entry.
#[must_use]
pub fn flow_key(flow: &FlowTruth) -> CtKey {
    (flow.proto, orig_tuple(flow))
}

fn parse_time(text: &str) -> Option<SystemTime> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
    let secs: u64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos: u32 = format!("{digits:0<9}").parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[derive(Default)]
struct Group {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    id: Option<u16>,
}

impl Group {
    fn tuple(&self, icmp: bool) -> Option<CtTuple> {
        let (sport, dport) = if icmp {
            (self.id?, 0)
        } else {
            (self.sport?, self.dport?)
        };
        Some(CtTuple {
            src: self.src?,
            dst: self.dst?,
            sport,
            dport,
        })
    }
}

/// Parses one line of `conntrack -E -o timestamp,extended`, e.g.
/// `[1795356651.883671]    [NEW] ipv4     2 udp      17 30 src=100.64.0.1 dst=192.0.2.2
/// sport=52596 dport=5000 [UNREPLIED] src=192.0.2.2 dst=203.0.113.8 sport=5000 dport=36645`.
/// `None` for anything else.
#[must_use]
pub fn parse_event(line: &str) -> Option<CtEvent> {
    let line = line.trim();
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(']')?;
    let time = parse_time(stamp.trim())?;
    let rest = rest.trim_start();
    let (kind, rest) = if let Some(r) = rest.strip_prefix("[NEW]") {
        (CtEventKind::New, r)
    } else if let Some(r) = rest.strip_prefix("[UPDATE]") {
        (CtEventKind::Update, r)
    } else if let Some(r) = rest.strip_prefix("[DESTROY]") {
        (CtEventKind::Destroy, r)
    } else {
        return None;
    };
    let tokens: Vec<&str> = rest.split_whitespace().collect();
    // "ipv4 2 udp 17 [timeout]" then key=value groups.
    let family_at = tokens.iter().position(|t| *t == "ipv4" || *t == "ipv6")?;
    let proto: u8 = tokens.get(family_at + 3)?.parse().ok()?;
    let icmp = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
    let mut groups: Vec<Group> = vec![Group::default()];
    let mut zone = 0u16;
    for token in &tokens[family_at + 4..] {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        if key == "src" && groups.last().is_some_and(|g| g.src.is_some()) {
            groups.push(Group::default());
        }
        let g = groups.last_mut().expect("at least one group");
        match key {
            "src" => g.src = value.parse().ok(),
            "dst" => g.dst = value.parse().ok(),
            "sport" => g.sport = value.parse().ok(),
            "dport" => g.dport = value.parse().ok(),
            // The first id= of a group is the ICMP identifier; a later one is conntrack's id.
            "id" if g.id.is_none() => g.id = value.parse().ok(),
            "zone" => zone = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    let orig = groups.first()?.tuple(icmp)?;
    let reply = groups.get(1).and_then(|g| g.tuple(icmp));
    let kernel_stop = rest
        .split_once("[stop=")
        .and_then(|(_, t)| t.split_once(']'))
        .and_then(|(t, _)| {
            chrono::NaiveDateTime::parse_from_str(t.trim(), "%a %b %e %H:%M:%S %Y").ok()
        })
        .map(|t| SystemTime::from(t.and_utc()));
    Some(CtEvent {
        time,
        kernel_stop,
        kind,
        proto,
        orig,
        reply,
        zone,
    })
}

/// `conntrack -E -e NEW,DESTROY` running in the NAT namespace, collecting parsed events.
/// Dropping it stops it.
pub struct ConntrackListener {
    child: Option<Child>,
    events: Arc<Mutex<Vec<CtEvent>>>,
    unparsed: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Receive buffer of the event socket after enlarging it.
    pub rcvbuf: usize,
}

impl ConntrackListener {
    /// Starts the listener in the lab's NAT namespace and returns once it is subscribed and
    /// its buffer enlarged (events from then on are caught).
    pub fn start(lab: &Lab) -> Result<ConntrackListener> {
        let mut cmd = lab.command_in(Ns::Nat, "conntrack");
        cmd.args([
            "-E",
            "-e",
            "NEW,DESTROY",
            "-o",
            "timestamp,extended,ktimestamp",
            "--buffer-size",
        ])
        // ktimestamp prints local time: make it UTC.
        .env("TZ", "UTC")
        .arg(LISTENER_RCVBUF.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let what = describe(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let events: Arc<Mutex<Vec<CtEvent>>> = Arc::default();
        let unparsed: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        let readers = vec![
            {
                let (events, unparsed) = (events.clone(), unparsed.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        match parse_event(&line) {
                            Some(e) => events.lock().expect("events poisoned").push(e),
                            None if line.trim().is_empty() => {}
                            None => unparsed.lock().expect("unparsed poisoned").push(line),
                        }
                    }
                })
            },
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        // conntrack prints this right after it subscribed.
                        if line.contains("Netlink socket buffer size") {
                            let _ = ready_tx.send(());
                        }
                        let mut s = stderr.lock().expect("stderr poisoned");
                        s.push_str(&line);
                        s.push('\n');
                    }
                })
            },
        ];
        let mut listener = ConntrackListener {
            child: Some(child),
            events,
            unparsed,
            stderr,
            readers,
            rcvbuf: 0,
        };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            bail!(
                "`{what}` did not subscribe within 10 s; stderr: {}",
                listener.stderr()
            );
        }
        let pid = listener.child.as_ref().expect("child present").id();
        listener.rcvbuf = enlarge_netlink_sockets(pid, LISTENER_RCVBUF)
            .with_context(|| format!("enlarging the event socket of `{what}` (pid {pid})"))?;
        Ok(listener)
    }

    /// A copy of every event so far, in arrival order.
    #[must_use]
    pub fn events(&self) -> Vec<CtEvent> {
        self.events.lock().expect("events poisoned").clone()
    }

    /// Lines of stdout that were not events (should stay empty).
    #[must_use]
    pub fn unparsed(&self) -> Vec<String> {
        self.unparsed.lock().expect("unparsed poisoned").clone()
    }

    /// conntrack's stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr poisoned").clone()
    }

    /// True if conntrack reported an overrun (ENOBUFS): events were lost, the truth is
    /// incomplete.
    #[must_use]
    pub fn overrun(&self) -> bool {
        let s = self.stderr();
        s.contains("ENOBUFS") || s.contains("losing events")
    }

    /// Fails if conntrack reported an overrun.
    pub fn check_no_overrun(&self) -> Result<()> {
        if self.overrun() {
            bail!(
                "the truth listener (conntrack -E) overran and lost events: {}",
                self.stderr().trim()
            );
        }
        Ok(())
    }

    /// An index of the events so far.
    #[must_use]
    pub fn index(&self) -> TruthIndex {
        TruthIndex::new(&self.events())
    }

    /// Waits until every key has a DESTROY event after `after`, or `timeout`; returns the keys
    /// still without one.
    #[must_use]
    pub fn wait_for_destroys(
        &self,
        keys: &[CtKey],
        after: SystemTime,
        timeout: Duration,
    ) -> Vec<CtKey> {
        let deadline = Instant::now() + timeout;
        loop {
            let index = self.index();
            let missing: Vec<CtKey> = keys
                .iter()
                .filter(|k| index.destroy_after(k, after).is_none())
                .copied()
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops conntrack (SIGINT, then SIGKILL after 5 s) and collects the last events.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = signal(child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(())
    }
}

impl Drop for ConntrackListener {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Sets `SO_RCVBUFFORCE` on every netlink socket of process `pid` (which we started), through
/// duplicates obtained with `pidfd_getfd`; returns the smallest resulting buffer.
fn enlarge_netlink_sockets(pid: u32, bytes: usize) -> Result<usize> {
    let pid_c = libc::pid_t::try_from(pid)?;
    // SAFETY: plain system call; the result is a new fd we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_c, 0) };
    if pidfd < 0 {
        bail!("pidfd_open: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `pidfd` was just created and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd)?) };
    let mut smallest: Option<usize> = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(remote) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: plain system call; the result is a new fd (same open socket) we own.
        let local = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                remote,
                0,
            )
        };
        if local < 0 {
            bail!("pidfd_getfd({remote}): {}", std::io::Error::last_os_error());
        }
        // SAFETY: `local` was just created and is owned by nobody else.
        let local = unsafe { OwnedFd::from_raw_fd(i32::try_from(local)?) };
        let mut domain: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>())?;
        // SAFETY: `domain` has room for an int.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&local),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&raw mut domain).cast(),
                &raw mut len,
            )
        };
        if rc != 0 || domain != libc::AF_NETLINK {
            continue;
        }
        let got = crate::sock::force_rcvbuf(std::os::fd::AsRawFd::as_raw_fd(&local), bytes)?;
        smallest = Some(smallest.map_or(got, |s| s.min(got)));
    }
    let got = smallest.ok_or_else(|| anyhow!("no netlink socket in /proc/{pid}/fd"))?;
    if got < bytes {
        bail!("event socket buffer is {got} bytes after asking for {bytes}");
    }
    Ok(got)
}

/// Events indexed by entry, for looking up a flow's start and end.
#[derive(Debug, Default)]
pub struct TruthIndex {
    by_key: HashMap<CtKey, Vec<(CtEventKind, SystemTime)>>,
    /// Kernel stop time of each DESTROY, by key and receive time.
    kernel_stops: HashMap<(CtKey, SystemTime), SystemTime>,
}

/// When conntrack says an entry was destroyed: within `[earliest, latest]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestroyTime {
    /// Lower bound.
    pub earliest: SystemTime,
    /// Upper bound.
    pub latest: SystemTime,
}

impl TruthIndex {
    /// Indexes `events`.
    #[must_use]
    pub fn new(events: &[CtEvent]) -> TruthIndex {
        let mut by_key: HashMap<CtKey, Vec<(CtEventKind, SystemTime)>> = HashMap::new();
        let mut kernel_stops = HashMap::new();
        for e in events {
            by_key
                .entry((e.proto, e.orig))
                .or_default()
                .push((e.kind, e.time));
            if let Some(stop) = e.kernel_stop {
                kernel_stops.insert(((e.proto, e.orig), e.time), stop);
            }
        }
        TruthIndex {
            by_key,
            kernel_stops,
        }
    }

    fn first_after(&self, key: &CtKey, kind: CtEventKind, after: SystemTime) -> Option<SystemTime> {
        self.by_key
            .get(key)?
            .iter()
            .filter(|(k, t)| *k == kind && *t >= after)
            .map(|(_, t)| *t)
            .min()
    }

    /// The first DESTROY of `key` at or after `after`.
    #[must_use]
    pub fn destroy_after(&self, key: &CtKey, after: SystemTime) -> Option<SystemTime> {
        self.first_after(key, CtEventKind::Destroy, after)
    }

    /// When conntrack reported the flow's entry created (the first NEW at or after a second
    /// before the client's first packet).
    #[must_use]
    pub fn new_of(&self, flow: &FlowTruth) -> Option<SystemTime> {
        self.first_after(
            &flow_key(flow),
            CtEventKind::New,
            flow.sent_at - Duration::from_secs(1),
        )
    }

    /// When conntrack reported the flow's entry gone (the first DESTROY after its first packet):
    /// the kernel's stop time when conntrack printed it (whole seconds, so the second after it),
    /// else the time the event was received.
    #[must_use]
    pub fn destroy_of(&self, flow: &FlowTruth) -> Option<DestroyTime> {
        let key = flow_key(flow);
        let received = self.destroy_after(&key, flow.sent_at)?;
        Some(match self.kernel_stops.get(&(key, received)) {
            Some(&stop) => DestroyTime {
                earliest: stop,
                latest: stop + Duration::from_secs(1),
            },
            None => DestroyTime {
                earliest: received,
                latest: received,
            },
        })
    }

    /// Number of NEW events of `proto` to `destination` from any of `sources`, at or after
    /// `after`.
    #[must_use]
    pub fn count_new(
        &self,
        proto: u8,
        sources: &[IpAddr],
        destination: SocketAddr,
        after: SystemTime,
    ) -> usize {
        self.by_key
            .iter()
            .filter(|((p, t), _)| {
                *p == proto
                    && sources.contains(&t.src)
                    && t.dst == destination.ip()
                    && t.dport == destination.port()
            })
            .map(|(_, evs)| {
                evs.iter()
                    .filter(|(k, t)| *k == CtEventKind::New && *t >= after)
                    .count()
            })
            .sum()
    }
}

/// Deletes the NAT namespace's conntrack entries of each source address and protocol, one
/// `conntrack -D -s ADDR -p PROTO` at a time (a few dozen entries each) with a pause between,
/// so that no listener overruns. Returns how many entries were deleted.
pub fn delete_chunked(lab: &Lab, sources: &[IpAddr], protos: &[u8]) -> Result<usize> {
    let mut total = 0;
    for src in sources {
        for &proto in protos {
            let v6 = src.is_ipv6();
            if (proto == IPPROTO_ICMP && v6) || (proto == IPPROTO_ICMPV6 && !v6) {
                continue;
            }
            let mut cmd = lab.command_in(Ns::Nat, "conntrack");
            cmd.args([
                "-D",
                "-f",
                if v6 { "ipv6" } else { "ipv4" },
                "-s",
                &src.to_string(),
                "-p",
                proto_name(proto),
            ]);
            let out = cmd
                .output()
                .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
            let text = String::from_utf8_lossy(&out.stderr);
            // "conntrack v1.4.7 (conntrack-tools): 12 flow entries have been deleted."
            // (exit status 1 when nothing matched)
            let n = text
                .split("):")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<usize>().ok());
            match n {
                Some(n) => total += n,
                None => bail!(
                    "`{}` failed ({}): {}",
                    describe(&cmd),
                    out.status,
                    text.trim()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(total)
}

/// Number of entries in the NAT namespace's conntrack table.
pub fn table_count(lab: &Lab) -> Result<usize> {
    let out = lab.exec_in(Ns::Nat, "conntrack", &["-C"])?;
    out.trim()
        .parse()
        .with_context(|| format!("conntrack -C printed {out:?}"))
}

/// Dumps the NAT namespace's conntrack table once: the kernel evicts entries whose timeout
/// passed (with a DESTROY event each) during a dump, instead of at its next garbage collection,
/// which can be up to a minute away on an idle table.
pub fn evict_expired(lab: &Lab) -> Result<()> {
    lab.exec_in(Ns::Nat, "conntrack", &["-L", "-o", "extended"])
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_udp_new() {
        let e = parse_event(
            "[1795356651.883671]\t    [NEW] ipv4     2 udp      17 30 src=100.64.0.1 dst=192.0.2.2 sport=52596 dport=5000 [UNREPLIED] src=192.0.2.2 dst=203.0.113.8 sport=5000 dport=36645",
        )
        .unwrap();
        assert_eq!(e.kind, CtEventKind::New);
        assert_eq!(e.proto, 17);
        assert_eq!(
            e.time,
            UNIX_EPOCH + Duration::new(1_795_356_651, 883_671_000)
        );
        assert_eq!(e.orig.src.to_string(), "100.64.0.1");
        assert_eq!((e.orig.sport, e.orig.dport), (52596, 5000));
        let r = e.reply.unwrap();
        assert_eq!(
            (r.dst.to_string().as_str(), r.dport),
            ("203.0.113.8", 36645)
        );
    }

    #[test]
    fn parses_icmp_destroy_with_counters_and_ids() {
        let e = parse_event(
            "[1795356651.901286]\t[DESTROY] ipv4     2 icmp     1 src=100.64.0.1 dst=192.0.2.2 type=8 code=0 id=15106 packets=1 bytes=33 src=192.0.2.2 dst=203.0.113.8 type=0 code=0 id=15107 packets=1 bytes=33 id=1453776854 [USERSPACE] portid=3429377535",
        )
        .unwrap();
        assert_eq!(e.kind, CtEventKind::Destroy);
        assert_eq!(e.proto, 1);
        assert_eq!((e.orig.sport, e.orig.dport), (15106, 0));
        assert_eq!(e.reply.unwrap().sport, 15107);
    }

    #[test]
    fn parses_ipv6_tcp_and_zone() {
        let e = parse_event(
            "[1795356651.1]\t    [NEW] ipv6     10 tcp      6 120 SYN_SENT src=fd00:64::10 dst=2001:db8:1::2 sport=40000 dport=7000 [UNREPLIED] src=2001:db8:1::2 dst=2001:db8:1::1 sport=7000 dport=40000 zone=3",
        )
        .unwrap();
        assert_eq!(e.proto, 6);
        assert_eq!(e.zone, 3);
        assert_eq!(e.orig.dst.to_string(), "2001:db8:1::2");
        assert_eq!(
            e.time,
            UNIX_EPOCH + Duration::new(1_795_356_651, 100_000_000)
        );
    }

    #[test]
    fn reads_the_kernel_stop_time() {
        let e = parse_event(
            "[1795359474.517772]\t[DESTROY] ipv4     2 udp      17 src=100.64.0.2 dst=192.0.2.2 sport=35698 dport=7777 [UNREPLIED] src=192.0.2.2 dst=203.0.113.9 sport=7777 dport=35698 delta-time=2 [start=Sun Nov 22 14:57:46 2026] [stop=Sun Nov 22 14:57:48 2026]",
        )
        .unwrap();
        assert_eq!(
            e.kernel_stop,
            Some(UNIX_EPOCH + Duration::from_secs(1_795_359_468))
        );
    }

    #[test]
    fn ignores_other_lines() {
        assert!(
            parse_event("NOTICE: Netlink socket buffer size has been set to 268435456 bytes.")
                .is_none()
        );
        assert!(
            parse_event("conntrack v1.4.7 (conntrack-tools): 4 flow events have been shown.")
                .is_none()
        );
    }
}
