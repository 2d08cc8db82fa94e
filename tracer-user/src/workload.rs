//! A synthetic carrier-grade NAT workload: a deterministic stream of finished SNAT bindings
//! shaped like a Linux CGNAT's, for benchmarks and tests of the storage format.
//!
//! The model, per binding (all draws from one seeded PRNG, so a seed gives the same stream):
//!
//! - **Arrivals**: a Poisson process whose rate follows a 24 h sinusoid (peak at 21:00 UTC,
//!   trough at 09:00 UTC, peak/trough ratio [`WorkloadConfig::diurnal_peak_to_trough`]) around
//!   [`WorkloadConfig::mean_rate`]. Times are whole milliseconds.
//! - **Subscribers**: [`WorkloadConfig::subscribers`] addresses in 100.64.0.0/10 (RFC 6598),
//!   dense from 100.64.0.1, each with a Pareto(α = 1.5) weight: a few heavy users make many
//!   sessions, most few. Each subscriber always maps to the same public address
//!   (`hash(subscriber) % public_ips`, as Linux SNAT over an address range does with
//!   `persistent`), from 203.0.113.0/24 (RFC 5737 TEST-NET-3) starting at 203.0.113.1.
//! - **Ports**: each subscriber's stack allocates source ports sequentially (small random
//!   steps) from a Linux (32768–60999) or an IANA (49152–65535) ephemeral range; ICMP echo
//!   identifiers are random. With probability [`WorkloadConfig::keep_port_share`] the NAT
//!   keeps the internal port as the external port when that public (address, port) is free;
//!   otherwise it searches 1024–65535 as `nf_nat_l4proto_unique_tuple` does: 128
//!   consecutive ports from a random offset (current kernels draw it with
//!   `get_random_u16()`), then 64, 32, 16 and 8 from new random offsets. Under load many
//!   internal ports are taken (the ~625 subscribers of a public address draw from the same
//!   ephemeral ranges), so the share of bindings that keep their port is lower than
//!   `keep_port_share`: with the defaults above 80 % in the first seconds, about 40 % once
//!   the ports have filled (after some minutes). An external (address, port) is free again
//!   only [`WorkloadConfig::reuse_guard_ms`] (120 s) after the previous binding on it ended.
//!   TCP, UDP and ICMP share one port space per public address here (stricter than Linux,
//!   which keeps one per protocol), so "who held address:port at T" has one answer. When a
//!   public address has no free port at all the session is dropped, as the kernel would
//!   drop it, and counted in [`WorkloadStats::dropped`] (none with the defaults).
//! - **Protocols and durations**: TCP 65 % (log-normal, median 8 s, σ 1.6; 3 % long-lived
//!   sessions Pareto from 5 min, α 1.3, capped at 8 h; conntrack's TIME_WAIT is left out, as
//!   CGNs tune it short), UDP 33 % (DNS: the 30 s UDP timeout after a reply within
//!   milliseconds; other UDP: log-normal activity plus the 30 s or, past 2 s of activity, the
//!   120 s stream timeout), ICMP 2 % (a few echo requests a second apart plus 30 s).
//! - **Destinations**: [`WorkloadConfig::destinations`] addresses drawn by Zipf
//!   (s = [`WorkloadConfig::zipf_s`]): the 256 most popular in 198.51.100.0/24, the next 256
//!   in 192.0.2.0/24, the rest scattered pseudo-randomly over the global unicast IPv4 space
//!   (this is generated data, never sent anywhere). DNS goes to one of four resolvers
//!   (192.0.2.53–56) 80 % of the time. Destination ports: TCP mostly 443 and 80, UDP mostly
//!   53 and 443, each with a tail.
//! - **Counters** ([`WorkloadConfig::full_records`]): packets and bytes both ways,
//!   heavy-tailed, growing with the duration; bytes = packets × a per-flow mean packet size
//!   plus a spread of up to 8 bytes a packet (exact 84-byte packets for ICMP echo).
//!   Mapping-only records (RFC 6888: no destination logged) have destination 0.0.0.0 port 0
//!   and no counters; the PRNG draws the same, so a mapping-only stream is the full stream
//!   with those fields blanked.
//!
//! Ids are assigned as the agent does, `(1 << 32) | n` with `n` counting from 1, in start
//! order; every binding is SNAT (`IPS_SRC_NAT | IPS_CONFIRMED`), zone 0, mark 0, start source
//! `Ring`, exact times.

use std::net::{IpAddr, Ipv4Addr};

use crate::binding::{
    Binding, Counters, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_SRC_NAT,
    StartSource, Tuple,
};

/// Nanoseconds per millisecond.
const MS: i64 = 1_000_000;
/// Lowest port the NAT allocates when it does not keep the internal port.
const PORT_MIN: u16 = 1024;
/// Seconds in a day.
const DAY_S: f64 = 86_400.0;
/// Time of day (seconds, UTC) of the diurnal peak.
const PEAK_AT_S: f64 = 21.0 * 3600.0;
/// The DNS resolvers most DNS queries go to.
const RESOLVERS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(192, 0, 2, 53),
    Ipv4Addr::new(192, 0, 2, 54),
    Ipv4Addr::new(192, 0, 2, 55),
    Ipv4Addr::new(192, 0, 2, 56),
];

/// Parameters of a [`Workload`]. [`Default`] gives a mid-size CGNAT.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadConfig {
    /// Number of subscribers (addresses in 100.64.0.0/10, at most 2^22 - 1).
    pub subscribers: u32,
    /// Number of public addresses (in 203.0.113.0/24, 1 to 254).
    pub public_ips: u32,
    /// PRNG seed: the same seed and configuration give the same stream.
    pub seed: u64,
    /// Time of the first possible arrival, ns since the Unix epoch (rounded down to ms).
    pub start_ns: i64,
    /// Mean arrival rate over a day, bindings per second.
    pub mean_rate: f64,
    /// Destinations and counters are recorded (`false`: mapping-only records).
    pub full_records: bool,
    /// Number of distinct destination addresses (Zipf-distributed popularity).
    pub destinations: u32,
    /// Zipf exponent of destination popularity.
    pub zipf_s: f64,
    /// Ratio of the arrival rate at the daily peak to that at the trough (1 = flat).
    pub diurnal_peak_to_trough: f64,
    /// Probability that the NAT keeps the internal port as the external one when it is free.
    pub keep_port_share: f64,
    /// How long an external (address, port) stays unused after a binding on it ended, ms.
    pub reuse_guard_ms: i64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            subscribers: 5000,
            public_ips: 8,
            seed: 1,
            // 2026-11-02T00:00:00Z
            start_ns: 1_793_577_600 * 1_000_000_000,
            mean_rate: 1000.0,
            full_records: true,
            destinations: 200_000,
            zipf_s: 1.1,
            diurnal_peak_to_trough: 3.0,
            keep_port_share: 0.9,
            reuse_guard_ms: 120_000,
        }
    }
}

/// What a [`Workload`] did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Bindings yielded.
    pub generated: u64,
    /// Bindings whose external port equals their internal port.
    pub kept_port: u64,
    /// Bindings whose internal port was free on their public address (and at least 1024):
    /// those the NAT could keep.
    pub port_free: u64,
    /// Sessions dropped because their public address had no free port.
    pub dropped: u64,
}

/// A small, fast PRNG: xoshiro256++ seeded through splitmix64. Not cryptographic.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of splitmix64: a good 64-bit mixer, also used as a hash.
#[must_use]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator seeded from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = splitmix64(x);
        }
        Self { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `(0, 1]` (safe for `ln`).
    pub fn f64_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (bias below 2^-32 for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Exponential with mean 1.
    pub fn exp(&mut self) -> f64 {
        -self.f64_open().ln()
    }

    /// Standard normal (Box–Muller, one of the pair).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64_open();
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with the given median and σ of the logarithm.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Pareto with scale `xm` and shape `alpha`.
    pub fn pareto(&mut self, xm: f64, alpha: f64) -> f64 {
        xm * self.f64_open().powf(-1.0 / alpha)
    }
}

/// Samples an index `0..cdf.len()` from a cumulative weight table.
fn pick(cdf: &[f64], rng: &mut Rng) -> usize {
    let total = *cdf.last().expect("non-empty table");
    let u = rng.f64() * total;
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

/// A subscriber: its address, its public address and its stack's port allocator.
#[derive(Clone, Debug)]
struct Subscriber {
    addr: Ipv4Addr,
    public: usize,
    port_lo: u16,
    port_hi: u16,
    next_port: u16,
}

impl Subscriber {
    fn next_port(&mut self, rng: &mut Rng) -> u16 {
        let p = self.next_port;
        let next = u32::from(p) + 1 + rng.below(3) as u32;
        let (lo, hi) = (u32::from(self.port_lo), u32::from(self.port_hi));
        let next = if next > hi {
            lo + (next - hi - 1)
        } else {
            next
        };
        self.next_port = u16::try_from(next).expect("within the ephemeral range");
        p
    }
}

/// The public address of a subscriber: the same one for every session.
#[must_use]
pub fn public_index(subscriber: Ipv4Addr, public_ips: u32) -> usize {
    let h = splitmix64(u64::from(u32::from(subscriber)));
    ((u128::from(h) * u128::from(public_ips)) >> 64) as usize
}

/// The `i`-th public address (0-based): 203.0.113.(i + 1).
#[must_use]
pub fn public_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        203,
        0,
        113,
        1 + u8::try_from(i).expect("at most 254 public addresses"),
    )
}

/// The destination address of popularity rank `rank` (0 = most popular).
fn destination_addr(rank: u32, seed: u64) -> Ipv4Addr {
    if rank < 256 {
        return Ipv4Addr::new(198, 51, 100, rank as u8);
    }
    if rank < 512 {
        return Ipv4Addr::new(192, 0, 2, (rank - 256) as u8);
    }
    let mut h = splitmix64(u64::from(rank) ^ seed.rotate_left(17));
    loop {
        let a = Ipv4Addr::from(h as u32);
        let [o0, o1, ..] = a.octets();
        let reserved = o0 == 0
            || o0 == 10
            || o0 == 127
            || o0 >= 224
            || (o0 == 100 && (64..128).contains(&o1))
            || (o0 == 169 && o1 == 254)
            || (o0 == 172 && (16..32).contains(&o1))
            || (o0 == 192 && o1 == 168)
            || (o0 == 203 && o1 == 0);
        if !reserved {
            return a;
        }
        h = splitmix64(h);
    }
}

/// An endless, deterministic stream of finished SNAT bindings in start order
/// (see the module documentation). Take as many as needed with [`Iterator::take`].
#[derive(Clone, Debug)]
pub struct Workload {
    cfg: WorkloadConfig,
    rng: Rng,
    /// Seconds since `start_ms` of the last arrival.
    t_s: f64,
    start_ms: i64,
    next_n: u64,
    subs: Vec<Subscriber>,
    sub_cdf: Vec<f64>,
    dst_cdf: Vec<f64>,
    dst_addrs: Vec<Ipv4Addr>,
    /// Per public address and port: first ms at which the port may be allocated again.
    free_from: Vec<i64>,
    amplitude: f64,
    stats: WorkloadStats,
}

impl Workload {
    /// A workload for `cfg`.
    ///
    /// # Panics
    /// When `public_ips` is not in 1..=254, `subscribers` not in 1..2^22, `destinations`
    /// is 0 or `mean_rate` is not positive.
    #[must_use]
    pub fn new(cfg: WorkloadConfig) -> Self {
        assert!(
            (1..=254).contains(&cfg.public_ips),
            "public_ips must be 1..=254"
        );
        assert!(
            (1..1 << 22).contains(&cfg.subscribers),
            "subscribers must be 1..2^22"
        );
        assert!(cfg.destinations > 0, "destinations must be positive");
        assert!(cfg.mean_rate > 0.0, "mean_rate must be positive");
        let mut rng = Rng::new(cfg.seed);
        let base = u32::from(Ipv4Addr::new(100, 64, 0, 1));
        let mut subs = Vec::with_capacity(cfg.subscribers as usize);
        let mut sub_cdf = Vec::with_capacity(cfg.subscribers as usize);
        let mut acc = 0.0;
        for i in 0..cfg.subscribers {
            let addr = Ipv4Addr::from(base + i);
            let (port_lo, port_hi) = if rng.chance(0.5) {
                (32768, 60999)
            } else {
                (49152, 65535)
            };
            let next_port = rng.range(u64::from(port_lo), u64::from(port_hi)) as u16;
            subs.push(Subscriber {
                addr,
                public: public_index(addr, cfg.public_ips),
                port_lo,
                port_hi,
                next_port,
            });
            acc += rng.pareto(1.0, 1.5);
            sub_cdf.push(acc);
        }
        let mut dst_cdf = Vec::with_capacity(cfg.destinations as usize);
        let mut acc = 0.0;
        for k in 1..=cfg.destinations {
            acc += f64::from(k).powf(-cfg.zipf_s);
            dst_cdf.push(acc);
        }
        let dst_addrs = (0..cfg.destinations)
            .map(|r| destination_addr(r, cfg.seed))
            .collect();
        let r = cfg.diurnal_peak_to_trough.max(1.0);
        Self {
            amplitude: (r - 1.0) / (r + 1.0),
            start_ms: cfg.start_ns.div_euclid(MS),
            free_from: vec![i64::MIN; cfg.public_ips as usize * 65536],
            cfg,
            rng,
            t_s: 0.0,
            next_n: 1,
            subs,
            sub_cdf,
            dst_cdf,
            dst_addrs,
            stats: WorkloadStats::default(),
        }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &WorkloadConfig {
        &self.cfg
    }

    /// What was generated so far.
    #[must_use]
    pub fn stats(&self) -> WorkloadStats {
        self.stats
    }

    /// The public address subscriber `addr` is mapped to.
    #[must_use]
    pub fn public_ip_of(&self, addr: Ipv4Addr) -> Ipv4Addr {
        public_addr(public_index(addr, self.cfg.public_ips))
    }

    /// The arrival rate at `t_s` seconds after the start, per second.
    fn rate(&self, t_s: f64) -> f64 {
        let tod = (self.start_ms as f64 / 1000.0 + t_s).rem_euclid(DAY_S);
        let phase = std::f64::consts::TAU * (tod - PEAK_AT_S) / DAY_S;
        self.cfg.mean_rate * (1.0 + self.amplitude * phase.cos())
    }

    /// Finds a free external port on public address `public` at `start_ms`: the internal
    /// port, when free, with probability `keep_port_share`; otherwise as
    /// `nf_nat_l4proto_unique_tuple` searches: 128 consecutive ports from a random offset,
    /// then 64, 32, 16 and 8 from new random offsets, then give up.
    /// Also says whether the internal port was free.
    fn allocate(&mut self, public: usize, internal: u16, start_ms: i64) -> (Option<u16>, bool) {
        let table = &self.free_from[public * 65536..(public + 1) * 65536];
        let free = internal >= PORT_MIN && table[usize::from(internal)] <= start_ms;
        if free && self.rng.chance(self.cfg.keep_port_share) {
            return (Some(internal), true);
        }
        let span = 65536 - u32::from(PORT_MIN);
        let mut attempts = 128;
        loop {
            let off = self.rng.below(u64::from(span)) as u32;
            let found = (0..attempts)
                .map(|i| (u32::from(PORT_MIN) + (off + i) % span) as u16)
                .find(|&p| table[usize::from(p)] <= start_ms);
            if found.is_some() || attempts < 16 {
                return (found, free);
            }
            attempts /= 2;
        }
    }

    /// Duration (ms), destination and counters of one session.
    fn session(&mut self, proto: u8) -> (i64, (Ipv4Addr, u16), (Counters, Counters)) {
        let rng = &mut self.rng;
        let (dur_s, dport, resolver) = match proto {
            IPPROTO_TCP => {
                let d = if rng.chance(0.03) {
                    rng.pareto(300.0, 1.3).min(8.0 * 3600.0)
                } else {
                    rng.lognormal(8.0, 1.6).clamp(0.01, 8.0 * 3600.0)
                };
                let u = rng.f64();
                let port = if u < 0.75 {
                    443
                } else if u < 0.87 {
                    80
                } else if u < 0.97 {
                    [8080, 5228, 993, 587, 22, 5223, 8443, 853, 1935, 3389][rng.below(10) as usize]
                } else {
                    rng.range(1024, 65535) as u16
                };
                (d, port, false)
            }
            IPPROTO_UDP => {
                let u = rng.f64();
                if u < 0.55 {
                    (
                        30.0 + rng.lognormal(0.02, 1.0).min(5.0),
                        53,
                        rng.chance(0.8),
                    )
                } else {
                    let active = rng.lognormal(5.0, 2.0).min(4.0 * 3600.0);
                    let timeout = if active > 2.0 { 120.0 } else { 30.0 };
                    let v = rng.f64();
                    let port = if v < 0.75 {
                        443
                    } else if v < 0.80 {
                        123
                    } else if v < 0.88 {
                        [3478, 19302, 500, 4500][rng.below(4) as usize]
                    } else {
                        rng.range(1024, 65535) as u16
                    };
                    (active + timeout, port, false)
                }
            }
            _ => {
                let pings = 1.0 + (rng.exp() * 3.0).floor();
                (pings - 1.0 + rng.f64() * 0.1 + 30.0, 0, false)
            }
        };
        let dst = if resolver {
            RESOLVERS[rng.below(RESOLVERS.len() as u64) as usize]
        } else {
            self.dst_addrs[pick(&self.dst_cdf, rng)]
        };
        let dur_ms = ((dur_s * 1000.0).round() as i64).max(1);
        let counters = counters(rng, proto, dport, dur_s);
        (dur_ms, (dst, dport), counters)
    }
}

/// Packet and byte counters (out, in) of a session.
fn counters(rng: &mut Rng, proto: u8, dport: u16, dur_s: f64) -> (Counters, Counters) {
    // Bytes: packets times a per-flow mean size, plus a spread (packets are not all alike).
    fn c(rng: &mut Rng, packets: u64, size: u64) -> Counters {
        Counters {
            packets,
            bytes: packets * size + rng.below(packets * 8 + 1),
        }
    }
    match proto {
        IPPROTO_UDP if dport == 53 => {
            let replied = u64::from(rng.chance(0.97));
            let (out, back) = (rng.range(56, 110), rng.range(72, 512));
            (c(rng, 1, out), c(rng, replied, back))
        }
        IPPROTO_TCP | IPPROTO_UDP => {
            let scale = (1.0 + dur_s / 30.0).sqrt();
            let pin = 2 + (rng.lognormal(12.0, 1.8) * scale).min(5e8) as u64;
            let pout = (pin as f64 * (0.3 + 0.6 * rng.f64())) as u64 + 1;
            let big = if rng.chance(0.5) { 1400 } else { 500 };
            let (out, back) = (rng.range(52, 160), rng.range(200, big));
            (c(rng, pout, out), c(rng, pin, back))
        }
        _ => {
            let pings = ((dur_s - 30.0).max(0.0).floor() as u64) + 1;
            let lost = rng.below(pings.min(2) + 1).min(pings);
            // Echo requests and replies all have the same size.
            let echo = |packets: u64| Counters {
                packets,
                bytes: packets * 84,
            };
            (echo(pings), echo(pings - lost))
        }
    }
}

impl Iterator for Workload {
    type Item = Binding;

    fn next(&mut self) -> Option<Binding> {
        loop {
            self.t_s += self.rng.exp() / self.rate(self.t_s);
            let start_ms = self.start_ms + (self.t_s * 1000.0).floor() as i64;
            let si = pick(&self.sub_cdf, &mut self.rng);
            let u = self.rng.f64();
            let proto = if u < 0.65 {
                IPPROTO_TCP
            } else if u < 0.98 {
                IPPROTO_UDP
            } else {
                IPPROTO_ICMP
            };
            let internal_port = if proto == IPPROTO_ICMP {
                self.rng.below(65536) as u16
            } else {
                let rng = &mut self.rng;
                self.subs[si].next_port(rng)
            };
            let (dur_ms, dst, ctrs) = self.session(proto);
            let sub = &self.subs[si];
            let (addr, public) = (sub.addr, sub.public);
            let (ext_port, free) = self.allocate(public, internal_port, start_ms);
            let Some(ext_port) = ext_port else {
                self.stats.dropped += 1;
                continue;
            };
            let end_ms = start_ms + dur_ms;
            self.free_from[public * 65536 + usize::from(ext_port)] =
                end_ms + self.cfg.reuse_guard_ms;
            let n = self.next_n;
            self.next_n += 1;
            self.stats.generated += 1;
            self.stats.port_free += u64::from(free);
            if ext_port == internal_port {
                self.stats.kept_port += 1;
            }
            let (dst_ip, dst_port) = if self.cfg.full_records {
                dst
            } else {
                (Ipv4Addr::UNSPECIFIED, 0)
            };
            let (orig_counters, reply_counters) = if self.cfg.full_records {
                (Some(ctrs.0), Some(ctrs.1))
            } else {
                (None, None)
            };
            let icmp = proto == IPPROTO_ICMP;
            let (int_ip, ext_ip, dst_ip) = (
                IpAddr::V4(addr),
                IpAddr::V4(public_addr(public)),
                IpAddr::V4(dst_ip),
            );
            return Some(Binding {
                id: (1 << 32) | n,
                proto,
                zone: 0,
                mark: 0,
                status: IPS_SRC_NAT | IPS_CONFIRMED,
                orig: Tuple {
                    src: int_ip,
                    dst: dst_ip,
                    src_port: internal_port,
                    dst_port: if icmp { 0 } else { dst_port },
                },
                reply: Tuple {
                    src: dst_ip,
                    dst: ext_ip,
                    src_port: if icmp { ext_port } else { dst_port },
                    dst_port: if icmp { 0 } else { ext_port },
                },
                start_ns: start_ms * MS,
                start_approximate: false,
                start_source: StartSource::Ring,
                end_ns: Some(end_ms * MS),
                end_approximate: false,
                orig_counters,
                reply_counters,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn small(seed: u64, full: bool) -> Workload {
        Workload::new(WorkloadConfig {
            seed,
            full_records: full,
            ..WorkloadConfig::default()
        })
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a: Vec<Binding> = small(7, true).take(20_000).collect();
        let b: Vec<Binding> = small(7, true).take(20_000).collect();
        let c: Vec<Binding> = small(8, true).take(20_000).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn mapping_only_is_the_full_stream_without_destination_and_counters() {
        let full = small(3, true).take(5000);
        let map = small(3, false).take(5000);
        for (f, m) in full.zip(map) {
            assert_eq!((f.id, f.start_ns, f.end_ns), (m.id, m.start_ns, m.end_ns));
            assert_eq!((f.internal(), f.external()), (m.internal(), m.external()));
            assert!(f.orig_counters.is_some() && f.reply_counters.is_some());
            assert_eq!((m.orig_counters, m.reply_counters), (None, None));
            assert_eq!(m.destination(), (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        }
    }

    #[test]
    fn starts_in_order_ids_sequential_times_whole_ms() {
        let mut prev_start = i64::MIN;
        for (i, b) in small(1, true).take(50_000).enumerate() {
            assert_eq!(b.id, (1 << 32) | (i as u64 + 1));
            assert!(b.start_ns >= prev_start);
            prev_start = b.start_ns;
            let end = b.end_ns.expect("finished");
            assert!(end > b.start_ns);
            assert_eq!(b.start_ns % MS, 0);
            assert_eq!(end % MS, 0);
            assert_eq!(b.status, IPS_SRC_NAT | IPS_CONFIRMED);
        }
    }

    #[test]
    fn external_endpoint_never_reused_within_guard() {
        // An overloaded NAT: two public addresses for 5000 subscribers, so ports are
        // contended, reused, and some sessions find no port at all.
        let mut w = Workload::new(WorkloadConfig {
            public_ips: 2,
            ..WorkloadConfig::default()
        });
        let guard = w.config().reuse_guard_ms * MS;
        let mut last_end: HashMap<(IpAddr, u16), i64> = HashMap::new();
        let mut reused = 0u64;
        for b in w.by_ref().take(300_000) {
            let key = b.external();
            if let Some(&end) = last_end.get(&key) {
                assert!(
                    b.start_ns >= end + guard,
                    "{key:?} reused {} ms after the previous binding ended",
                    (b.start_ns - end) / MS
                );
                reused += 1;
            }
            last_end.insert(key, b.end_ns.expect("finished"));
        }
        assert!(reused > 10_000, "the test should exercise reuse ({reused})");
        assert!(w.stats().dropped > 0, "the test should exercise exhaustion");
    }

    #[test]
    fn each_subscriber_has_one_public_address() {
        let w = small(5, true);
        let mut seen: HashMap<IpAddr, IpAddr> = HashMap::new();
        let mut per_public: HashMap<IpAddr, u64> = HashMap::new();
        for b in w.clone().take(100_000) {
            let (int, ext) = (b.internal().0, b.external().0);
            assert_eq!(
                *seen.entry(int).or_insert(ext),
                ext,
                "{int} mapped to two addresses"
            );
            let IpAddr::V4(v4) = int else {
                panic!("IPv4 only")
            };
            assert_eq!(IpAddr::V4(w.public_ip_of(v4)), ext);
            *per_public.entry(ext).or_default() += 1;
        }
        assert_eq!(per_public.len(), 8, "every public address is used");
        assert!(
            seen.len() > 2000,
            "many subscribers are active ({})",
            seen.len()
        );
    }

    #[test]
    fn internal_port_is_usually_kept() {
        let mut w = small(9, true);
        let n = 200_000;
        let mut kept = 0u64;
        for b in w.by_ref().take(n) {
            if b.internal().1 == b.external().1 {
                kept += 1;
            }
        }
        let st = w.stats();
        assert_eq!(st.kept_port, kept);
        assert_eq!(st.dropped, 0);
        // When the internal port is free the NAT keeps it ~90 % of the time (a random
        // search landing on it adds a hair).
        let when_free = kept as f64 / st.port_free as f64;
        assert!(
            (0.88..0.93).contains(&when_free),
            "kept when free {when_free}"
        );
        // Contention for the ephemeral ranges makes the overall share lower.
        let share = kept as f64 / n as f64;
        assert!((0.5..0.9).contains(&share), "kept share {share}");
    }

    #[test]
    fn mix_of_protocols_durations_and_destinations_is_heavy_tailed() {
        let v: Vec<Binding> = small(11, true).take(100_000).collect();
        let share = |p: u8| v.iter().filter(|b| b.proto == p).count() as f64 / v.len() as f64;
        assert!((0.62..0.68).contains(&share(IPPROTO_TCP)));
        assert!((0.30..0.36).contains(&share(IPPROTO_UDP)));
        assert!((0.01..0.03).contains(&share(IPPROTO_ICMP)));
        let mut durs: Vec<i64> = v.iter().map(|b| b.end_ns.unwrap() - b.start_ns).collect();
        durs.sort_unstable();
        let median = durs[durs.len() / 2];
        let max = durs[durs.len() - 1];
        assert!(median < 60_000 * MS, "median duration {} ms", median / MS);
        assert!(max > 3_600_000 * MS, "longest {} ms", max / MS);
        let mut dst: HashMap<IpAddr, u64> = HashMap::new();
        for b in &v {
            *dst.entry(b.destination().0).or_default() += 1;
        }
        let top = *dst.values().max().unwrap();
        assert!(top as f64 > 0.02 * v.len() as f64, "a popular destination");
        assert!(
            dst.len() > 10_000,
            "a long tail of destinations ({})",
            dst.len()
        );
        let https = v.iter().filter(|b| b.destination().1 == 443).count();
        assert!(https as f64 > 0.5 * v.len() as f64);
    }
}
