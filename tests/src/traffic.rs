//! Subscriber traffic and the servers that observe it: the truth of every binding.
//!
//! Clients run in threads that entered the subscribers namespace; each flow is a fresh socket
//! bound to a subscriber address, and its internal side is what `getsockname` says (for ICMP
//! ping sockets, the port is the echo identifier the kernel chose). Each flow carries a unique
//! token in its payload. Servers in the server namespace record, per token, the peer they
//! observed (TCP accept peer, UDP source, ICMP source address and echo identifier read by a
//! raw socket): the external side of the binding, as translated by the NAT. Joining the two by
//! token gives a [`FlowTruth`] that owes nothing to nattrace.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use crate::lab::{Lab, Ns, enter_netns};
use crate::sock;

/// TCP port of the servers.
pub const TCP_PORT: u16 = 7000;
/// UDP port of the servers.
pub const UDP_PORT: u16 = 7001;
/// Destination ports of the flood used by `nat-rate` (dropped and counted by the server ns).
pub const FLOOD_PORTS: (u16, u16) = (10000, 59999);

/// IANA protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
/// IANA protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

const MAGIC: &[u8; 4] = b"NTRC";
const PAYLOAD_LEN: usize = 12;
const FLOW_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_INTERVAL: Duration = Duration::from_millis(300);
const SERVER_POLL: Duration = Duration::from_millis(100);

/// Name of a protocol as `nattrace --proto` takes it.
#[must_use]
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        IPPROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

/// Transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    /// connect, send a token, receive the echo, close.
    Tcp,
    /// send a token, receive the echo.
    Udp,
    /// an ICMP / ICMPv6 echo request with the token as payload, from a ping socket.
    Icmp,
}

/// Transport and address family of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKind {
    /// Transport.
    pub l4: L4,
    /// IPv6 (NAT66 masquerade) rather than IPv4 (NAT44 pool).
    pub v6: bool,
}

impl FlowKind {
    /// TCP, UDP and ICMP over IPv4 and IPv6.
    pub const ALL: [FlowKind; 6] = [
        FlowKind {
            l4: L4::Tcp,
            v6: false,
        },
        FlowKind {
            l4: L4::Udp,
            v6: false,
        },
        FlowKind {
            l4: L4::Icmp,
            v6: false,
        },
        FlowKind {
            l4: L4::Tcp,
            v6: true,
        },
        FlowKind {
            l4: L4::Udp,
            v6: true,
        },
        FlowKind {
            l4: L4::Icmp,
            v6: true,
        },
    ];

    /// IANA protocol number of the flow.
    #[must_use]
    pub fn proto(self) -> u8 {
        match (self.l4, self.v6) {
            (L4::Tcp, _) => IPPROTO_TCP,
            (L4::Udp, _) => IPPROTO_UDP,
            (L4::Icmp, false) => IPPROTO_ICMP,
            (L4::Icmp, true) => IPPROTO_ICMPV6,
        }
    }

    /// The server address a flow of this kind goes to (port 0 for ICMP).
    #[must_use]
    pub fn destination(self) -> SocketAddr {
        let port = match self.l4 {
            L4::Tcp => TCP_PORT,
            L4::Udp => UDP_PORT,
            L4::Icmp => 0,
        };
        SocketAddr::new(Lab::server_ip(self.v6), port)
    }
}

/// One flow as the world outside nattrace knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowTruth {
    /// IANA protocol number (6, 17, 1, 58).
    pub proto: u8,
    /// The subscriber side: the client socket's own address (`getsockname`); for ICMP the
    /// port is the echo identifier.
    pub internal: SocketAddr,
    /// The public side as the server observed it; for ICMP the port is the echo identifier.
    pub external: SocketAddr,
    /// The server address (port 0 for ICMP).
    pub destination: SocketAddr,
    /// Taken by the client just before its first packet (before `connect` for TCP).
    pub sent_at: SystemTime,
    /// When the server received the first packet carrying the token: a moment at which the
    /// binding certainly existed, and the time an investigator finds in the server's log.
    pub seen_at: SystemTime,
    /// The flow's unique token (payload).
    pub token: u64,
}

impl FlowTruth {
    /// `tcp`, `udp`, `icmp` or `icmpv6`.
    #[must_use]
    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }
}

/// What a server saw of one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The peer: external address and port (echo identifier for ICMP).
    pub peer: SocketAddr,
    /// When the first packet with the token arrived.
    pub at: SystemTime,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

/// A token unique within this process (and unlikely to collide with another process's).
fn next_token() -> u64 {
    (u64::from(std::process::id()) << 32) | NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
}

fn payload(token: u64) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    p[..4].copy_from_slice(MAGIC);
    p[4..].copy_from_slice(&token.to_be_bytes());
    p
}

fn parse_token(p: &[u8]) -> Option<u64> {
    if p.len() < PAYLOAD_LEN || &p[..4] != MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(p[4..PAYLOAD_LEN].try_into().ok()?))
}

type Observed = Arc<Mutex<HashMap<u64, Observation>>>;

/// An open client socket, an address that goes with it (its destination or its own), its token.
type OpenFlow = (OwnedFd, SocketAddr, u64);

fn record(observed: &Observed, token: u64, peer: SocketAddr) {
    let at = SystemTime::now();
    observed
        .lock()
        .expect("observations poisoned")
        .entry(token)
        .or_insert(Observation { peer, at });
}

/// The servers of the lab (TCP, UDP, ICMP over IPv4 and IPv6), recording what they observe.
/// Dropping stops them.
pub struct Servers {
    observed: Observed,
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

impl Servers {
    /// Starts every server in the lab's server namespace; returns once all are listening.
    pub fn start(lab: &Lab) -> Result<Servers> {
        let observed: Observed = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<(&'static str, Result<(), String>)>();
        let mut threads = Vec::new();
        for (name, v6, l4) in [
            ("tcp4", false, L4::Tcp),
            ("tcp6", true, L4::Tcp),
            ("udp4", false, L4::Udp),
            ("udp6", true, L4::Udp),
            ("icmp4", false, L4::Icmp),
            ("icmp6", true, L4::Icmp),
        ] {
            let (observed, stop, ready) = (observed.clone(), stop.clone(), ready_tx.clone());
            let handle = lab.spawn_in(Ns::Server, move || {
                let ip = Lab::server_ip(v6);
                let served = match l4 {
                    L4::Tcp => TcpListener::bind((ip, TCP_PORT))
                        .map_err(|e| format!("bind tcp {ip}:{TCP_PORT}: {e}"))
                        .map(|l| (Some(l), None)),
                    L4::Udp => UdpSocket::bind((ip, UDP_PORT))
                        .map_err(|e| format!("bind udp {ip}:{UDP_PORT}: {e}"))
                        .map(|s| (None, Some(OwnedFd::from(s)))),
                    L4::Icmp => sock::raw_icmp_socket(v6)
                        .map_err(|e| format!("raw icmp socket: {e}"))
                        .map(|s| (None, Some(s))),
                };
                let (listener, fd) = match served {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready.send((name, Err(e.clone())));
                        bail!(e);
                    }
                };
                if let Some(fd) = &fd {
                    // Bursts of thousands of first packets must not overflow the socket.
                    sock::force_rcvbuf(fd.as_raw_fd(), 64 << 20)?;
                    sock::set_recv_timeout(fd, SERVER_POLL)?;
                }
                let _ = ready.send((name, Ok(())));
                match (l4, listener, fd) {
                    (L4::Tcp, Some(l), _) => serve_tcp(&l, &observed, &stop),
                    (L4::Udp, _, Some(fd)) => serve_udp(&UdpSocket::from(fd), &observed, &stop),
                    (L4::Icmp, _, Some(fd)) => serve_icmp(&fd, v6, &observed, &stop),
                    _ => unreachable!("every server has its socket"),
                }
            });
            threads.push((name, handle));
        }
        drop(ready_tx);
        let servers = Servers {
            observed,
            stop,
            threads,
        };
        for _ in 0..servers.threads.len() {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => bail!("server {name} did not start: {e}"),
                Err(_) => bail!("servers did not start within 10 s"),
            }
        }
        Ok(servers)
    }

    /// What the servers saw of `token`, if anything yet.
    #[must_use]
    pub fn observation(&self, token: u64) -> Option<Observation> {
        self.observed
            .lock()
            .expect("observations poisoned")
            .get(&token)
            .copied()
    }

    /// How many distinct tokens the servers saw so far.
    #[must_use]
    pub fn observed_count(&self) -> usize {
        self.observed.lock().expect("observations poisoned").len()
    }

    /// Waits until every token was observed, or `timeout`; returns what was observed of them.
    #[must_use]
    pub fn wait_for(&self, tokens: &[u64], timeout: Duration) -> HashMap<u64, Observation> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: HashMap<u64, Observation> = {
                let map = self.observed.lock().expect("observations poisoned");
                tokens
                    .iter()
                    .filter_map(|t| map.get(t).map(|o| (*t, *o)))
                    .collect()
            };
            if found.len() == tokens.len() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Names of servers whose thread ended (with its error); empty while all run.
    #[must_use]
    pub fn failed(&self) -> Vec<&'static str> {
        self.threads
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| *n)
            .collect()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (name, handle) in self.threads.drain(..) {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("server {name}: {e:#}"),
                Err(_) => eprintln!("server {name} panicked"),
            }
        }
    }
}

fn serve_tcp(listener: &TcpListener, observed: &Observed, stop: &AtomicBool) -> Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                // A broken client is the client's failure (it reports it); serve the next.
                let _ = (|| -> io::Result<()> {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(FLOW_TIMEOUT))?;
                    let mut buf = [0u8; PAYLOAD_LEN];
                    stream.read_exact(&mut buf)?;
                    if let Some(token) = parse_token(&buf) {
                        record(observed, token, peer);
                    }
                    stream.write_all(&buf)
                })();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sock::wait_readable(listener, SERVER_POLL)?;
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn serve_udp(socket: &UdpSocket, observed: &Observed, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Some(token) = parse_token(&buf[..n]) {
                    record(observed, token, peer);
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("udp recv_from"),
        }
    }
    Ok(())
}

/// Records echo requests seen by a raw socket (the kernel answers them by itself).
fn serve_icmp(fd: &OwnedFd, v6: bool, observed: &Observed, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match sock::recv_from(fd, &mut buf) {
            Ok((n, peer)) => {
                let packet = &buf[..n];
                // IPv4 raw sockets deliver the IP header; IPv6 ones start at the ICMPv6 header.
                let icmp = if v6 {
                    packet
                } else {
                    let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
                    packet.get(ihl..).unwrap_or_default()
                };
                let echo_request = if v6 { 128 } else { 8 };
                if icmp.len() >= 8 && icmp[0] == echo_request {
                    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
                    if let Some(token) = parse_token(&icmp[8..]) {
                        record(observed, token, SocketAddr::new(peer.ip(), id));
                    }
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("raw icmp recv_from"),
        }
    }
    Ok(())
}

/// What to generate: every kind × subscriber × `flows_per_kind`.
#[derive(Clone, Debug)]
pub struct TrafficPlan {
    /// Kinds of flow.
    pub kinds: Vec<FlowKind>,
    /// Indexes into the lab's subscriber lists (the same index gives the IPv4 and IPv6 address).
    pub subscribers: Vec<usize>,
    /// Flows of each kind from each subscriber.
    pub flows_per_kind: usize,
    /// Client threads.
    pub threads: usize,
}

impl TrafficPlan {
    /// Every kind from every subscriber of `lab`, `flows_per_kind` each.
    #[must_use]
    pub fn everything(lab: &Lab, flows_per_kind: usize) -> TrafficPlan {
        TrafficPlan {
            kinds: FlowKind::ALL.to_vec(),
            subscribers: (0..lab.subscribers_v4.len()).collect(),
            flows_per_kind,
            threads: 4,
        }
    }

    /// Number of flows the plan makes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.kinds.len() * self.subscribers.len() * self.flows_per_kind
    }

    /// True when the plan makes no flow.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client side of one finished flow.
struct ClientFlow {
    proto: u8,
    internal: SocketAddr,
    destination: SocketAddr,
    sent_at: SystemTime,
    token: u64,
}

impl ClientFlow {
    /// The flow's truth: the client's side joined with what the server observed of it.
    fn truth(&self, o: Observation) -> FlowTruth {
        FlowTruth {
            proto: self.proto,
            internal: self.internal,
            external: o.peer,
            destination: self.destination,
            sent_at: self.sent_at,
            seen_at: o.at,
            token: self.token,
        }
    }
}

/// A new socket whose (protocol, address, port) no earlier flow of the lab used. Sockets
/// the kernel gave an already used port are kept open in `rejects` so it does not offer the
/// same port again.
fn fresh_socket(
    lab: &Lab,
    proto: u8,
    rejects: &mut Vec<OwnedFd>,
    make: impl Fn() -> io::Result<OwnedFd>,
) -> Result<(OwnedFd, SocketAddr)> {
    for _ in 0..1000 {
        let fd = make()?;
        let local = sock::local_addr(&fd)?;
        if lab.claim_tuple(proto, local.ip(), local.port()) {
            return Ok((fd, local));
        }
        rejects.push(fd);
    }
    bail!("no unused local port for protocol {proto} after 1000 sockets")
}

fn icmp_echo(v6: bool, token: u64) -> Vec<u8> {
    let mut msg = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 0, 0, 1];
    msg.extend_from_slice(&payload(token));
    msg
}

/// Makes one flow of `kind` from `src` (in the calling thread's namespace: subscribers).
fn client_flow(
    lab: &Lab,
    kind: FlowKind,
    src: IpAddr,
    rejects: &mut Vec<OwnedFd>,
) -> Result<(ClientFlow, OwnedFd)> {
    let token = next_token();
    let body = payload(token);
    let destination = kind.destination();
    let proto = kind.proto();
    let (fd, internal, sent_at) = match kind.l4 {
        L4::Tcp => {
            let (fd, internal) = fresh_socket(lab, proto, rejects, || {
                sock::bound_socket(src, libc::SOCK_STREAM)
            })?;
            let sent_at = SystemTime::now();
            let mut stream = sock::connect(fd, destination, FLOW_TIMEOUT)
                .with_context(|| format!("tcp connect {internal} -> {destination}"))?;
            stream.set_read_timeout(Some(FLOW_TIMEOUT))?;
            stream.write_all(&body)?;
            let mut reply = [0u8; PAYLOAD_LEN];
            stream
                .read_exact(&mut reply)
                .with_context(|| format!("tcp echo {internal} -> {destination}"))?;
            if reply != body {
                bail!("tcp echo {internal} -> {destination}: wrong reply");
            }
            (OwnedFd::from(stream), internal, sent_at)
        }
        L4::Udp | L4::Icmp => {
            let (fd, internal) = if kind.l4 == L4::Udp {
                fresh_socket(lab, proto, rejects, || {
                    sock::bound_socket(src, libc::SOCK_DGRAM)
                })?
            } else {
                fresh_socket(lab, proto, rejects, || sock::ping_socket(src))?
            };
            let msg = if kind.l4 == L4::Udp {
                body.to_vec()
            } else {
                icmp_echo(kind.v6, token)
            };
            sock::set_recv_timeout(&fd, RETRY_INTERVAL)?;
            let sent_at = SystemTime::now();
            let deadline = Instant::now() + FLOW_TIMEOUT;
            let mut buf = [0u8; 2048];
            'attempts: loop {
                if Instant::now() >= deadline {
                    bail!(
                        "{} {internal} -> {destination}: no echo within {FLOW_TIMEOUT:?}",
                        proto_name(proto)
                    );
                }
                // Retries reuse the socket, hence the same binding.
                sock::send_to(&fd, &msg, destination)?;
                loop {
                    match sock::recv_from(&fd, &mut buf) {
                        // A ping socket returns the ICMP header (type, code, sum, id, seq) first.
                        Ok((n, _)) => {
                            let got = if kind.l4 == L4::Udp {
                                &buf[..n]
                            } else {
                                buf.get(8..n).unwrap_or_default()
                            };
                            if parse_token(got) == Some(token) {
                                break 'attempts;
                            }
                        }
                        Err(e) if is_timeout(&e) => continue 'attempts,
                        Err(e) => bail!("{} recv on {internal}: {e}", proto_name(proto)),
                    }
                }
            }
            (fd, internal, sent_at)
        }
    };
    Ok((
        ClientFlow {
            proto,
            internal,
            destination,
            sent_at,
            token,
        },
        fd,
    ))
}

/// Joins client flows with what the servers observed; fails naming the flows never observed.
fn join_truth(servers: &Servers, flows: Vec<ClientFlow>) -> Result<Vec<FlowTruth>> {
    let tokens: Vec<u64> = flows.iter().map(|f| f.token).collect();
    let seen = servers.wait_for(&tokens, Duration::from_secs(5));
    let missing: Vec<String> = flows
        .iter()
        .filter(|f| !seen.contains_key(&f.token))
        .map(|f| {
            format!(
                "{} {} -> {}",
                proto_name(f.proto),
                f.internal,
                f.destination
            )
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} flow(s) answered but never recorded by the servers (failed servers: {:?}), e.g. {}",
            missing.len(),
            servers.failed(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut truth: Vec<FlowTruth> = flows
        .into_iter()
        .map(|f| {
            let o = seen[&f.token];
            f.truth(o)
        })
        .collect();
    truth.sort_by_key(|f| f.seen_at);
    Ok(truth)
}

/// Generates the flows of `plan` from the subscribers namespace and returns their truth,
/// ordered by the time the server saw them. Every flow completed its exchange (the TCP and
/// UDP echo, the ICMP echo reply) and was observed by a server; any failure is an error.
pub fn generate(lab: &Lab, servers: &Servers, plan: &TrafficPlan) -> Result<Vec<FlowTruth>> {
    let mut jobs = VecDeque::new();
    for _ in 0..plan.flows_per_kind {
        for &s in &plan.subscribers {
            for &kind in &plan.kinds {
                let src = if kind.v6 {
                    IpAddr::V6(
                        *lab.subscribers_v6
                            .get(s)
                            .ok_or_else(|| anyhow!("no subscriber {s}"))?,
                    )
                } else {
                    IpAddr::V4(
                        *lab.subscribers_v4
                            .get(s)
                            .ok_or_else(|| anyhow!("no subscriber {s}"))?,
                    )
                };
                jobs.push_back((kind, src));
            }
        }
    }
    let jobs = Mutex::new(jobs);
    let done = Mutex::new(Vec::with_capacity(plan.len()));
    let sub_ns = lab.ns(Ns::Subscribers);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..plan.threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    enter_netns(&sub_ns)?;
                    let mut rejects = Vec::new();
                    loop {
                        let Some((kind, src)) = jobs.lock().expect("jobs poisoned").pop_front()
                        else {
                            return Ok(());
                        };
                        // The socket closes at the end of this iteration; the lab's tuple
                        // registry keeps later flows off its address and port.
                        let (flow, _fd) = client_flow(lab, kind, src, &mut rejects)?;
                        done.lock().expect("results poisoned").push(flow);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("traffic worker panicked"))??;
        }
        Ok(())
    })?;
    join_truth(servers, done.into_inner().expect("results poisoned"))
}

/// UDP flows kept alive by a packet every `interval` until dropped; used for bindings that
/// must exist before the agent starts.
pub struct LongLivedUdp {
    /// The truth of each flow (its first exchange).
    pub flows: Vec<FlowTruth>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LongLivedUdp {
    /// Opens `per_subscriber` UDP flows from each subscriber address of the given families
    /// (false: IPv4, true: IPv6) and keeps them alive.
    pub fn open(
        lab: &Lab,
        servers: &Servers,
        families: &[bool],
        per_subscriber: usize,
        interval: Duration,
    ) -> Result<Self> {
        let mut sources = Vec::new();
        for &v6 in families {
            for ip in lab.subscribers(v6) {
                for _ in 0..per_subscriber {
                    sources.push((v6, ip));
                }
            }
        }
        let sub_ns = lab.ns(Ns::Subscribers);
        let (flows, sockets) = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<(Vec<ClientFlow>, Vec<OpenFlow>)> {
                    enter_netns(&sub_ns)?;
                    let mut rejects = Vec::new();
                    let mut flows = Vec::new();
                    let mut sockets = Vec::new();
                    for (v6, ip) in sources {
                        let (flow, fd) =
                            client_flow(lab, FlowKind { l4: L4::Udp, v6 }, ip, &mut rejects)?;
                        sockets.push((fd, flow.destination, flow.token));
                        flows.push(flow);
                    }
                    Ok((flows, sockets))
                })
                .join()
                .map_err(|_| anyhow!("long-lived flow opener panicked"))?
        })?;
        let flows = join_truth(servers, flows)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                for (fd, dest, token) in &sockets {
                    let _ = sock::send_to(fd, &payload(*token), *dest);
                    // Drain the echoes without waiting.
                    while sock::wait_readable(fd, Duration::ZERO).unwrap_or(false) {
                        if sock::recv_from(fd, &mut buf).is_err() {
                            break;
                        }
                    }
                }
                let until = Instant::now() + interval;
                while Instant::now() < until && !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Ok(LongLivedUdp {
            flows,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the keep-alive packets and closes the sockets (the bindings then time out).
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LongLivedUdp {
    fn drop(&mut self) {
        self.close();
    }
}

/// The result of a UDP burst.
#[derive(Debug)]
pub struct Burst {
    /// Datagrams the clients handed to the kernel (one per socket, each a new binding if it
    /// reached the NAT).
    pub sent: usize,
    /// The truth of each flow the servers observed (those whose packet made it through).
    pub observed: Vec<FlowTruth>,
    /// Just before the first datagram.
    pub started: SystemTime,
    /// Just after the last datagram.
    pub finished: SystemTime,
}

/// Sends one UDP datagram from each of `count` fresh sockets (spread over the subscribers'
/// addresses of one family), as fast as two threads can: a burst of new bindings. Sockets
/// are made before the burst and kept open until the servers saw what they will see, so no
/// source port is reused.
pub fn udp_burst(lab: &Lab, servers: &Servers, count: usize, v6: bool) -> Result<Burst> {
    crate::util::raise_nofile_limit()?;
    let kind = FlowKind { l4: L4::Udp, v6 };
    let sources = lab.subscribers(v6);
    let sub_ns = lab.ns(Ns::Subscribers);
    let sockets = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<OpenFlow>> {
                enter_netns(&sub_ns)?;
                let mut rejects = Vec::new();
                (0..count)
                    .map(|i| {
                        let src = sources[i % sources.len()];
                        let (fd, local) = fresh_socket(lab, IPPROTO_UDP, &mut rejects, || {
                            sock::bound_socket(src, libc::SOCK_DGRAM)
                        })?;
                        Ok((fd, local, next_token()))
                    })
                    .collect()
            })
            .join()
            .map_err(|_| anyhow!("burst socket maker panicked"))?
    })?;
    let destination = kind.destination();
    let started = SystemTime::now();
    let half = sockets.len().div_ceil(2);
    let (sent, sent_at) = std::thread::scope(|scope| {
        let senders: Vec<_> = sockets
            .chunks(half.max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut sent = Vec::with_capacity(chunk.len());
                    for (fd, _, token) in chunk {
                        let at = SystemTime::now();
                        if sock::send_to(fd, &payload(*token), destination).is_ok() {
                            sent.push((*token, at));
                        }
                    }
                    sent
                })
            })
            .collect();
        let mut all = HashMap::new();
        for s in senders {
            all.extend(s.join().expect("burst sender panicked"));
        }
        (all.len(), all)
    });
    let finished = SystemTime::now();
    let flows: Vec<ClientFlow> = sockets
        .iter()
        .filter_map(|(_, local, token)| {
            sent_at.get(token).map(|&at| ClientFlow {
                proto: IPPROTO_UDP,
                internal: *local,
                destination,
                sent_at: at,
                token: *token,
            })
        })
        .collect();
    let tokens: Vec<u64> = flows.iter().map(|f| f.token).collect();
    let seen = servers.wait_for(&tokens, Duration::from_secs(3));
    let observed = flows
        .into_iter()
        .filter_map(|f| seen.get(&f.token).map(|o| f.truth(*o)))
        .collect();
    drop(sockets);
    Ok(Burst {
        sent,
        observed,
        started,
        finished,
    })
}

/// Installs, in the server namespace, an nftables rule that counts and drops UDP to
/// [`FLOOD_PORTS`]: each such packet of a flood is a new binding that made it through the NAT.
pub fn install_flood_sink(lab: &Lab) -> Result<()> {
    let (lo, hi) = FLOOD_PORTS;
    let rules = format!(
        "table inet nattrace_flood {{\n  counter flood {{ }}\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    udp dport {lo}-{hi} counter name \"flood\" drop\n  }}\n}}\n"
    );
    let mut cmd = lab.command_in(Ns::Server, "nft");
    cmd.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("cannot start nft")?;
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("nft rejected the flood sink ruleset:\n{rules}");
    }
    Ok(())
}

/// Packets counted by the flood sink so far.
pub fn flood_sink_count(lab: &Lab) -> Result<u64> {
    let out = lab.exec_in(
        Ns::Server,
        "nft",
        &["-j", "list", "counter", "inet", "nattrace_flood", "flood"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("nft -j output is not JSON")?;
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item["counter"]["packets"].as_u64())
        .ok_or_else(|| anyhow!("no flood counter in nft output: {out}"))
}

/// The result of a flood.
#[derive(Debug)]
pub struct Flood {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// How long the flood ran.
    pub elapsed: Duration,
}

/// Floods the NAT with new UDP bindings for `duration` or until `max_datagrams` were sent:
/// `sockets_per_subscriber` sockets on every IPv4 subscriber address (many source ports),
/// each sending to successive ports of [`FLOOD_PORTS`] on the server, so every datagram is a
/// new conntrack entry. `first_port` lets successive floods use other destination ports.
pub fn udp_flood(
    lab: &Lab,
    duration: Duration,
    max_datagrams: u64,
    sockets_per_subscriber: usize,
    threads: usize,
    first_port: u16,
) -> Result<Flood> {
    let sources = lab.subscribers(false);
    let sub_ns = lab.ns(Ns::Subscribers);
    let sockets: Vec<OwnedFd> = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<OwnedFd>> {
                enter_netns(&sub_ns)?;
                let mut all = Vec::new();
                for ip in &sources {
                    for _ in 0..sockets_per_subscriber {
                        all.push(sock::bound_socket(
                            *ip,
                            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                        )?);
                    }
                }
                Ok(all)
            })
            .join()
            .map_err(|_| anyhow!("flood socket maker panicked"))?
    })?;
    let server = Lab::server_ip(false);
    let (lo, hi) = FLOOD_PORTS;
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread = sockets.len().div_ceil(threads.max(1));
    let total = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for chunk in sockets.chunks(per_thread.max(1)) {
            let total = &total;
            scope.spawn(move || {
                let mut port = first_port.clamp(lo, hi);
                let body = [0u8; 16];
                loop {
                    let mut sent = 0u64;
                    for fd in chunk {
                        if sock::send_to(fd, &body, SocketAddr::new(server, port)).is_ok() {
                            sent += 1;
                        }
                    }
                    port = if port >= hi { lo } else { port + 1 };
                    if total.fetch_add(sent, Ordering::Relaxed) + sent >= max_datagrams
                        || Instant::now() >= deadline
                    {
                        break;
                    }
                }
            });
        }
    });
    let sent = total.into_inner();
    Ok(Flood {
        sent,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let t = next_token();
        assert_eq!(parse_token(&payload(t)), Some(t));
        assert_eq!(parse_token(b"NTRCshort"), None);
        assert_eq!(parse_token(&icmp_echo(false, t)[8..]), Some(t));
    }

    #[test]
    fn kinds() {
        assert_eq!(
            FlowKind {
                l4: L4::Icmp,
                v6: true
            }
            .proto(),
            IPPROTO_ICMPV6
        );
        assert_eq!(
            FlowKind {
                l4: L4::Udp,
                v6: false
            }
            .destination()
            .to_string(),
            "192.0.2.2:7001"
        );
        assert_eq!(
            FlowKind {
                l4: L4::Icmp,
                v6: true
            }
            .destination()
            .to_string(),
            "[2001:db8:1::2]:0"
        );
    }
}
