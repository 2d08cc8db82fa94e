//! `conntrack -E` text: NEW and DESTROY events of entries with NAT, merged into bindings.
//!
//! The input is what `conntrack -E -o timestamp,extended` prints (`ktimestamp` and `id` may
//! be added to `-o`; `extended` may be left out), one event a line, a tab after the timestamp:
//!
//! ```text
//! [1795364740.233592]    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=100.64.0.10 dst=203.0.113.2 sport=38760 dport=443 [UNREPLIED] src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20081 id=1313698304
//! [1795364745.246067]  [DESTROY] ipv4     2 tcp      6 TIME_WAIT src=100.64.0.10 dst=203.0.113.2 sport=38760 dport=443 packets=5 bytes=273 src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20081 packets=5 bytes=283 [ASSURED] delta-time=2 [start=Sun Nov 22 16:25:40 2026] [stop=Sun Nov 22 16:25:42 2026] id=1313698304
//! ```
//!
//! The format comes from conntrack-tools (`[%-.8ld.%-.6ld]\t`: the time the tool received
//! the event, or with newer conntrack-tools and kernels the kernel's event time) and
//! libnetfilter_conntrack's `snprintf_default.c`: the original tuple (`src= dst=`, then
//! `sport= dport=`, `type= code= id=` for ICMP, `srckey= dstkey=` for GRE), its counters
//! with accounting on (`packets= bytes=`), `[UNREPLIED]`, the reply tuple and its counters,
//! then `[ASSURED]`, `mark=` (when not 0), `zone=`, `delta-time=` (with
//! `nf_conntrack_timestamp` on), `[start=…] [stop=…]` (`-o ktimestamp`, local time as
//! `ctime(3)` prints it), `id=` (`-o id`) and more that is ignored.
//!
//! A NEW and the DESTROY of the same entry — same protocol, original tuple and zone, the
//! DESTROY not earlier, conntrack ids equal when both printed — make one binding: start at
//! the NEW's timestamp, end and counters from the DESTROY. Several NEWs waiting for the same
//! key are matched first in, first out. A DESTROY without a NEW (the entry predates the log,
//! or its NEW was lost) gives a binding with an approximate start: the kernel's start time
//! when printed, else the DESTROY's time minus `delta-time`, else the DESTROY's time. It is
//! kept for [`REORDER_WINDOW_NS`] of log time first, in case its NEW comes later in the
//! input. A NEW still waiting at the end of the input gives an open binding.
//!
//! Events whose reply tuple mirrors the original one (no NAT) are skipped, as are `[UPDATE]`
//! events and conntrack's own messages.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead};
use std::net::IpAddr;

use super::{Context, LineError, invalid};
use crate::binding::{
    Binding, ConntrackKey, Counters, IPS_CONFIRMED, IPS_DST_NAT, IPS_SRC_NAT, StartSource, Tuple,
    is_icmp,
};

/// Lines longer than this are bad lines (a conntrack event is a few hundred bytes).
pub const MAX_LINE: usize = 64 << 10;

/// How long (in log time) a DESTROY without its NEW waits for the NEW to come later in the
/// input before it is written as a binding with an approximate start.
pub const REORDER_WINDOW_NS: i64 = 60 * NS_PER_SEC;

const NS_PER_SEC: i64 = 1_000_000_000;

/// NEW or DESTROY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The entry was created (confirmed): the binding starts.
    New,
    /// The entry is gone: the binding ends.
    Destroy,
}

/// A NEW or DESTROY event of an entry with NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEvent {
    /// NEW or DESTROY.
    pub kind: EventKind,
    /// When conntrack received the event (`-o timestamp`), nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// L4 protocol number.
    pub proto: u8,
    /// conntrack zone (`zone=`, else `zone-orig=`, else 0).
    pub zone: u16,
    /// conntrack mark, when printed (conntrack prints it only when not 0).
    pub mark: Option<u32>,
    /// `IPS_SRC_NAT` and/or `IPS_DST_NAT` (as the tuples tell), and `IPS_CONFIRMED`.
    pub status: u32,
    /// Original tuple; for ICMP `src_port` is the echo identifier and `dst_port` 0.
    pub orig: Tuple,
    /// Reply tuple; for ICMP `src_port` is the (translated) echo identifier and `dst_port` 0.
    pub reply: Tuple,
    /// Counters of the original direction (DESTROY with accounting on).
    pub orig_counters: Option<Counters>,
    /// Counters of the reply direction.
    pub reply_counters: Option<Counters>,
    /// conntrack's id of the entry (`-o id`).
    pub conntrack_id: Option<u32>,
    /// DESTROY: the kernel's start time of the entry, whole seconds (from `[start=…]` of
    /// `-o ktimestamp`, or `delta-time=`), nanoseconds since the Unix epoch.
    pub kernel_start_ns: Option<i64>,
}

impl CtEvent {
    /// What a NEW is matched to its DESTROY by.
    #[must_use]
    pub fn key(&self) -> ConntrackKey {
        ConntrackKey {
            proto: self.proto,
            orig: self.orig,
            zone: self.zone,
        }
    }
}

/// What one line of `conntrack -E` output is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtLine {
    /// A NEW or DESTROY event of an entry with NAT.
    Event(CtEvent),
    /// A NEW or DESTROY event of an entry without NAT: skipped.
    NotNat,
    /// An `[UPDATE]` event: skipped.
    Update,
    /// A message of conntrack itself (`conntrack v1.4.7 (conntrack-tools): 36 flow events
    /// have been shown.`, `NOTICE: …`, `WARNING: …`): skipped. `lost_events` when it says
    /// events were lost (ENOBUFS).
    Notice {
        /// conntrack reported lost events.
        lost_events: bool,
    },
    /// An empty line.
    Blank,
}

/// Parses one line of `conntrack -E -o timestamp,extended` output (with or without the line
/// end). Never panics.
pub fn parse_conntrack_line(line: &[u8]) -> Result<CtLine, LineError> {
    if line.len() > MAX_LINE + 2 {
        return Err(LineError::TooLong { max: MAX_LINE });
    }
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(CtLine::Blank);
    }
    if [
        "conntrack v",
        "NOTICE:",
        "WARNING:",
        "This message means",
        "Please, check",
    ]
    .iter()
    .any(|p| text.starts_with(p))
    {
        return Ok(CtLine::Notice {
            lost_events: text.contains("ENOBUFS") || text.contains("losing events"),
        });
    }
    let mut tokens = Tokens { rest: text };
    let first = tokens.next().ok_or(LineError::NotAnEvent)?;
    let (time_ns, kind) = match event_tag(first) {
        Some(kind) => (None, kind),
        None => {
            let time = timestamp(first)?;
            let kind = tokens
                .next()
                .and_then(event_tag)
                .ok_or(LineError::NotAnEvent)?;
            (Some(time), kind)
        }
    };
    let kind = match kind {
        Tag::Update => return Ok(CtLine::Update),
        Tag::New => EventKind::New,
        Tag::Destroy => EventKind::Destroy,
    };
    let time_ns = time_ns.ok_or(LineError::NoTimestamp)?;
    event(kind, time_ns, tokens)
}

enum Tag {
    New,
    Update,
    Destroy,
}

fn event_tag(token: &str) -> Option<Tag> {
    match token {
        "[NEW]" => Some(Tag::New),
        "[UPDATE]" => Some(Tag::Update),
        "[DESTROY]" => Some(Tag::Destroy),
        _ => None,
    }
}

/// The `[seconds.micros]` of `-o timestamp`. conntrack-tools prints it as
/// `[%-.8ld.%-.6ld]` (microseconds zero-padded to six digits, a decimal fraction); older
/// releases printed `[%-8ld.%-6ld]`, microseconds not zero-padded but followed by spaces
/// (`[1795364708.1234  ]` is 1795364708.001234), which is read as such. Any other fraction is
/// decimal (`[1700000005.5]` is 1700000005.5).
fn timestamp(token: &str) -> Result<i64, LineError> {
    let Some(inner) = token.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
        return Err(LineError::NotAnEvent);
    };
    if !inner.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
        return Err(LineError::NotAnEvent);
    }
    let bad = || invalid("timestamp", token, "[seconds.microseconds]");
    let (secs, frac) = inner.split_once('.').unwrap_or((inner, ""));
    let secs = secs.trim();
    let digits = frac.trim_end();
    if secs.is_empty()
        || !secs.bytes().all(|c| c.is_ascii_digit())
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || digits.len() > 9
        || (inner.contains('.') && digits.is_empty())
    {
        return Err(bad());
    }
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    let nanos: i64 = if digits.is_empty() {
        0
    } else if digits.len() < frac.len() && digits.len() < 6 {
        // "%-6ld": microseconds padded with spaces.
        digits.parse::<i64>().map_err(|_| bad())? * 1000
    } else {
        format!("{digits:0<9}").parse().map_err(|_| bad())?
    };
    secs.checked_mul(NS_PER_SEC)
        .and_then(|n| n.checked_add(nanos))
        .ok_or_else(bad)
}

/// Splits on white space, except that a token starting with `[` runs to the next `]`
/// (`[start=Sun Nov 22 16:25:40 2026]`, `[1795364708.1234  ]`).
struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start();
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let end = if s.starts_with('[') {
            s.find(']').map_or(s.len(), |i| i + 1)
        } else {
            s.find(char::is_whitespace).unwrap_or(s.len())
        };
        let (token, rest) = s.split_at(end);
        self.rest = rest;
        Some(token)
    }
}

/// One tuple as printed.
#[derive(Default)]
struct Side {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    icmp_code: bool,
    icmp_id: Option<u16>,
    packets: Option<u64>,
    bytes: Option<u64>,
}

impl Side {
    fn tuple(&self, proto: u8, which: &str) -> Result<Tuple, LineError> {
        let missing = |key: &str| LineError::Malformed(format!("{which} tuple without {key}="));
        let src = self.src.ok_or_else(|| missing("src"))?;
        let dst = self.dst.ok_or_else(|| missing("dst"))?;
        let (src_port, dst_port) = if is_icmp(proto) {
            (self.icmp_id.ok_or_else(|| missing("id"))?, 0)
        } else if has_ports(proto) {
            (
                self.sport.ok_or_else(|| missing("sport"))?,
                self.dport.ok_or_else(|| missing("dport"))?,
            )
        } else {
            (self.sport.unwrap_or(0), self.dport.unwrap_or(0))
        };
        Ok(Tuple {
            src,
            dst,
            src_port,
            dst_port,
        })
    }

    fn counters(&self) -> Result<Option<Counters>, LineError> {
        match (self.packets, self.bytes) {
            (Some(packets), Some(bytes)) => Ok(Some(Counters { packets, bytes })),
            (None, None) => Ok(None),
            _ => Err(LineError::Malformed(
                "packets= and bytes= do not come together".into(),
            )),
        }
    }
}

/// Protocols whose tuples conntrack prints with `sport=` and `dport=`: TCP, UDP, DCCP, SCTP,
/// UDP-Lite.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

/// Sets `slot` once; a second value for the same key is an error.
fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), LineError> {
    if slot.is_some() {
        return Err(LineError::Malformed(format!("{key}= twice in one tuple")));
    }
    *slot = Some(value);
    Ok(())
}

fn num<T: std::str::FromStr>(
    field: &'static str,
    v: &str,
    expected: &'static str,
) -> Result<T, LineError> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(field, v, expected));
    }
    v.parse().map_err(|_| invalid(field, v, expected))
}

fn hex16(field: &'static str, v: &str) -> Result<u16, LineError> {
    v.strip_prefix("0x")
        .and_then(|h| u16::from_str_radix(h, 16).ok())
        .ok_or_else(|| invalid(field, v, "a hexadecimal key 0x0-0xffff"))
}

fn address(field: &'static str, v: &str) -> Result<IpAddr, LineError> {
    v.parse()
        .map_err(|_| invalid(field, v, "an IPv4 or IPv6 address"))
}

/// The rest of a NEW or DESTROY line after the tag.
fn event<'a>(
    kind: EventKind,
    time_ns: i64,
    mut tokens: impl Iterator<Item = &'a str>,
) -> Result<CtLine, LineError> {
    // "ipv4     2 tcp      6 120 SYN_SENT src=…": layer 3 (with -o extended), protocol
    // name and number, then timeout and state when printed.
    let mut family = None;
    let mut name = tokens
        .next()
        .ok_or(LineError::Malformed("nothing after the event".into()))?;
    if name == "ipv4" || name == "ipv6" {
        family = Some(name == "ipv6");
        let _l3num = tokens.next();
        name = tokens
            .next()
            .ok_or(LineError::Malformed("no protocol".into()))?;
    }
    if name.contains('=') || name.starts_with('[') {
        return Err(LineError::Malformed("no protocol".into()));
    }
    let proto_s = tokens
        .next()
        .ok_or(LineError::Malformed("no protocol number".into()))?;
    let proto: u8 = num("protocol number", proto_s, "a protocol number 0-255")?;
    let icmp = is_icmp(proto);

    let mut sides: [Side; 2] = Default::default();
    let mut n_sides = 0usize;
    let (mut zone, mut zone_orig, mut mark, mut ct_id, mut delta) = (None, None, None, None, None);
    let (mut kstart, mut kstop) = (None, None);
    for token in tokens {
        if let Some(flag) = token.strip_prefix('[') {
            let flag = flag.strip_suffix(']').unwrap_or(flag);
            if let Some(t) = flag.strip_prefix("start=") {
                kstart = Some(t);
            } else if let Some(t) = flag.strip_prefix("stop=") {
                kstop = Some(t);
            }
            continue;
        }
        let Some((key, v)) = token.split_once('=') else {
            continue; // timeout, state ("SYN_SENT")
        };
        if key == "src" {
            if n_sides == 2 {
                return Err(LineError::Malformed("more than two tuples".into()));
            }
            n_sides += 1;
            sides[n_sides - 1].src = Some(address("src", v)?);
            continue;
        }
        let side = n_sides.checked_sub(1).map(|i| &mut sides[i]);
        match (key, side) {
            ("dst", Some(s)) => set(&mut s.dst, key, address("dst", v)?)?,
            ("sport", Some(s)) => set(&mut s.sport, key, num("sport", v, "a port 0-65535")?)?,
            ("dport", Some(s)) => set(&mut s.dport, key, num("dport", v, "a port 0-65535")?)?,
            ("srckey", Some(s)) => set(&mut s.sport, key, hex16("srckey", v)?)?,
            ("dstkey", Some(s)) => set(&mut s.dport, key, hex16("dstkey", v)?)?,
            ("type", Some(_)) => {
                let _: u8 = num("type", v, "an ICMP type 0-255")?;
            }
            ("code", Some(s)) => {
                let _: u8 = num("code", v, "an ICMP code 0-255")?;
                s.icmp_code = true;
            }
            // The id= right after an ICMP tuple's code= is the echo identifier; any other
            // is conntrack's id of the entry (-o id).
            ("id", Some(s)) if icmp && s.icmp_code && s.icmp_id.is_none() => {
                s.icmp_id = Some(num("id", v, "an ICMP identifier 0-65535")?);
            }
            ("packets", Some(s)) => set(&mut s.packets, key, num("packets", v, "a count")?)?,
            ("bytes", Some(s)) => set(&mut s.bytes, key, num("bytes", v, "a count")?)?,
            (
                "dst" | "sport" | "dport" | "srckey" | "dstkey" | "type" | "code" | "packets"
                | "bytes",
                None,
            ) => {
                return Err(LineError::Malformed(format!("{key}= before src=")));
            }
            ("id", _) => ct_id = Some(num::<u32>("id", v, "a conntrack id")?),
            ("zone", _) => zone = Some(num::<u16>("zone", v, "a zone 0-65535")?),
            ("zone-orig", _) => zone_orig = Some(num::<u16>("zone-orig", v, "a zone 0-65535")?),
            ("mark", _) => mark = Some(num::<u32>("mark", v, "a mark 0-4294967295")?),
            ("delta-time", _) => delta = Some(num::<u64>("delta-time", v, "seconds")?),
            _ => {} // use=, secmark=, helper=, labels=, portid=, progname=, zone-reply=, …
        }
    }
    if n_sides < 2 {
        return Err(LineError::Malformed(
            "expected an original and a reply tuple (src=… dst=… twice)".into(),
        ));
    }
    let orig = sides[0].tuple(proto, "original")?;
    let reply = sides[1].tuple(proto, "reply")?;
    let v6 = orig.src.is_ipv6();
    if [orig.dst, reply.src, reply.dst]
        .iter()
        .any(|a| a.is_ipv6() != v6)
        || family.is_some_and(|f| f != v6)
    {
        return Err(LineError::MixedFamilies);
    }
    let status = nat_status(proto, &orig, &reply);
    if status == 0 {
        return Ok(CtLine::NotNat);
    }
    let kernel_start_ns = if kind == EventKind::Destroy {
        kernel_start(time_ns, kstart, kstop, delta)
    } else {
        None
    };
    Ok(CtLine::Event(CtEvent {
        kind,
        time_ns,
        proto,
        zone: zone.or(zone_orig).unwrap_or(0),
        mark,
        status: status | IPS_CONFIRMED,
        orig,
        reply,
        orig_counters: sides[0].counters()?,
        reply_counters: sides[1].counters()?,
        conntrack_id: ct_id,
        kernel_start_ns,
    }))
}

/// `IPS_SRC_NAT` when the reply does not go back to the original source (address, port or
/// ICMP identifier), `IPS_DST_NAT` when it does not come from the original destination.
fn nat_status(proto: u8, orig: &Tuple, reply: &Tuple) -> u32 {
    let (snat, dnat) = if is_icmp(proto) {
        (
            reply.dst != orig.src || reply.src_port != orig.src_port,
            reply.src != orig.dst,
        )
    } else {
        (
            reply.dst != orig.src || reply.dst_port != orig.src_port,
            reply.src != orig.dst || reply.src_port != orig.dst_port,
        )
    };
    (if snat { IPS_SRC_NAT } else { 0 }) | (if dnat { IPS_DST_NAT } else { 0 })
}

/// The kernel's start time of a destroyed entry. `[start=…]` and `[stop=…]` are the local
/// time of the machine that ran conntrack, whose offset is not printed: it is taken as the
/// difference between `[stop=…]` and the event's timestamp (UTC), rounded to 15 minutes
/// (the kernel stops the entry at most seconds before the event is received). Without them,
/// `delta-time` seconds before the event. `None` when neither is usable.
fn kernel_start(
    time_ns: i64,
    start: Option<&str>,
    stop: Option<&str>,
    delta: Option<u64>,
) -> Option<i64> {
    let recv_secs = time_ns.div_euclid(NS_PER_SEC);
    let from_ktimestamp = || -> Option<i64> {
        let start = ctime_secs(start?)?;
        let stop = ctime_secs(stop?)?;
        let offset = round_to(stop.checked_sub(recv_secs)?, 900);
        if !(-12 * 3600..=14 * 3600).contains(&offset) || stop < start {
            return None;
        }
        let ns = start.checked_sub(offset)?.checked_mul(NS_PER_SEC)?;
        (ns <= time_ns).then_some(ns)
    };
    from_ktimestamp().or_else(|| {
        let delta = i64::try_from(delta?).ok()?.checked_mul(NS_PER_SEC)?;
        time_ns.checked_sub(delta)
    })
}

/// `n` rounded to the nearest multiple of `m`.
fn round_to(n: i64, m: i64) -> i64 {
    (n + n.signum() * m / 2) / m * m
}

/// A `ctime(3)` time ("Sun Nov 22 16:25:40 2026", "Sun Nov  2 06:05:04 2026") as seconds
/// since the epoch, as if it were UTC.
fn ctime_secs(s: &str) -> Option<i64> {
    let normalized = s.split_whitespace().collect::<Vec<_>>().join(" ");
    chrono::NaiveDateTime::parse_from_str(&normalized, "%a %b %d %H:%M:%S %Y")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// Merges NEW and DESTROY events into bindings (id 0, start source import).
#[derive(Debug, Default)]
pub struct Merger {
    /// NEWs waiting for their DESTROY, by key, oldest first, with their arrival number.
    pending: HashMap<ConntrackKey, VecDeque<(u64, CtEvent)>>,
    /// DESTROYs without a NEW, waiting [`REORDER_WINDOW_NS`] for one.
    orphans: HashMap<ConntrackKey, VecDeque<(u64, CtEvent)>>,
    /// (time, key, arrival number) of each orphan, in arrival order.
    orphan_order: VecDeque<(i64, ConntrackKey, u64)>,
    arrivals: u64,
    latest_ns: Option<i64>,
}

impl Merger {
    /// An empty merger.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// NEW events waiting for their DESTROY.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.pending.values().map(VecDeque::len).sum()
    }

    /// Takes one event; appends to `out` the bindings it completes.
    pub fn push(&mut self, ev: CtEvent, out: &mut Vec<Binding>) {
        self.latest_ns = Some(self.latest_ns.map_or(ev.time_ns, |t| t.max(ev.time_ns)));
        self.arrivals += 1;
        let seq = self.arrivals;
        let key = ev.key();
        match ev.kind {
            EventKind::New => {
                if let Some(destroy) = take(&mut self.orphans, &key, |_, d| fits(&ev, d)) {
                    out.push(closed(&ev, &destroy));
                } else {
                    self.pending.entry(key).or_default().push_back((seq, ev));
                }
            }
            EventKind::Destroy => {
                if let Some(new) = take(&mut self.pending, &key, |_, n| fits(n, &ev)) {
                    out.push(closed(&new, &ev));
                } else {
                    self.orphan_order.push_back((ev.time_ns, key, seq));
                    self.orphans.entry(key).or_default().push_back((seq, ev));
                }
            }
        }
        self.expire(out);
    }

    /// Writes the orphan DESTROYs older than the reorder window.
    fn expire(&mut self, out: &mut Vec<Binding>) {
        let Some(latest) = self.latest_ns else {
            return;
        };
        while let Some(&(t, key, seq)) = self.orphan_order.front() {
            if t.saturating_add(REORDER_WINDOW_NS) >= latest {
                break;
            }
            self.orphan_order.pop_front();
            // Gone already if a NEW came for it.
            if let Some(d) = take(&mut self.orphans, &key, |s, _| s == seq) {
                out.push(unmatched_destroy(&d));
            }
        }
    }

    /// The end of the input: every waiting DESTROY becomes a binding with an approximate
    /// start, every waiting NEW an open binding (in the order they arrived).
    pub fn finish(mut self, out: &mut Vec<Binding>) {
        for (_, key, seq) in std::mem::take(&mut self.orphan_order) {
            if let Some(d) = take(&mut self.orphans, &key, |s, _| s == seq) {
                out.push(unmatched_destroy(&d));
            }
        }
        let mut open: Vec<(u64, CtEvent)> = self.pending.into_values().flatten().collect();
        open.sort_by_key(|(seq, _)| *seq);
        out.extend(open.iter().map(|(_, n)| open_binding(n)));
    }
}

/// Removes and returns the first event of `key` that `ok` accepts (given its arrival number).
fn take(
    map: &mut HashMap<ConntrackKey, VecDeque<(u64, CtEvent)>>,
    key: &ConntrackKey,
    ok: impl Fn(u64, &CtEvent) -> bool,
) -> Option<CtEvent> {
    let queue = map.get_mut(key)?;
    let i = queue.iter().position(|(seq, e)| ok(*seq, e))?;
    let (_, ev) = queue.remove(i)?;
    if queue.is_empty() {
        map.remove(key);
    }
    Some(ev)
}

/// `new` can be the NEW of `destroy`'s entry: not later, and the same conntrack id when both
/// have one.
fn fits(new: &CtEvent, destroy: &CtEvent) -> bool {
    new.time_ns <= destroy.time_ns
        && match (new.conntrack_id, destroy.conntrack_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

fn base(ev: &CtEvent) -> Binding {
    Binding {
        id: 0,
        proto: ev.proto,
        zone: ev.zone,
        mark: ev.mark.unwrap_or(0),
        status: ev.status,
        orig: ev.orig,
        reply: ev.reply,
        start_ns: ev.time_ns,
        start_approximate: false,
        start_source: StartSource::Import,
        end_ns: None,
        end_approximate: false,
        orig_counters: None,
        reply_counters: None,
    }
}

/// A NEW and its DESTROY.
fn closed(new: &CtEvent, destroy: &CtEvent) -> Binding {
    Binding {
        mark: destroy.mark.or(new.mark).unwrap_or(0),
        end_ns: Some(destroy.time_ns.max(new.time_ns)),
        orig_counters: destroy.orig_counters,
        reply_counters: destroy.reply_counters,
        ..base(new)
    }
}

/// A DESTROY whose NEW is not in the input.
fn unmatched_destroy(destroy: &CtEvent) -> Binding {
    Binding {
        start_ns: destroy
            .kernel_start_ns
            .map_or(destroy.time_ns, |s| s.min(destroy.time_ns)),
        start_approximate: true,
        end_ns: Some(destroy.time_ns),
        orig_counters: destroy.orig_counters,
        reply_counters: destroy.reply_counters,
        ..base(destroy)
    }
}

/// A NEW whose DESTROY is not in the input.
fn open_binding(new: &CtEvent) -> Binding {
    base(new)
}

/// Reads `conntrack -E` text from `input` into `ctx`.
pub(crate) fn import(input: &mut dyn BufRead, ctx: &mut Context<'_>) -> anyhow::Result<()> {
    let mut merger = Merger::new();
    let mut line = Vec::with_capacity(512);
    let mut done = Vec::new();
    let (mut line_no, mut bytes) = (0u64, 0u64);
    let mut warned_loss = false;
    loop {
        let (n, too_long) = read_line(input, &mut line, MAX_LINE).map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot read {}", ctx.input_name()))
        })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        bytes += n;
        ctx.summary.lines = line_no;
        let parsed = if too_long {
            Err(LineError::TooLong { max: MAX_LINE })
        } else {
            parse_conntrack_line(&line)
        };
        if !matches!(parsed, Ok(CtLine::Blank)) {
            ctx.summary.content_lines += 1;
        }
        match parsed {
            Ok(CtLine::Blank) => {}
            Ok(CtLine::Event(ev)) => {
                ctx.ready()?;
                merger.push(ev, &mut done);
                for b in done.drain(..) {
                    ctx.write(b)?;
                }
            }
            Ok(CtLine::NotNat) => ctx.summary.not_nat += 1,
            Ok(CtLine::Update) => ctx.summary.other_skipped += 1,
            Ok(CtLine::Notice { lost_events }) => {
                ctx.summary.other_skipped += 1;
                if lost_events && !warned_loss {
                    warned_loss = true;
                    ctx.warn(
                        line_no,
                        "conntrack reported lost events (ENOBUFS): bindings from about here on may be missing, or lack their start or end",
                    )?;
                }
            }
            Err(e) => ctx.bad(line_no, &e)?,
        }
        ctx.progress(bytes);
    }
    merger.finish(&mut done);
    for b in done {
        ctx.write(b)?;
    }
    Ok(())
}

/// Reads one line (up to and with its `\n`) into `buf`, keeping at most `max` bytes of it
/// (a longer line is consumed whole and reported as too long). Returns the bytes consumed (0
/// at the end of the input) and whether the line was too long.
fn read_line(input: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<(u64, bool)> {
    buf.clear();
    let mut consumed = 0u64;
    let mut too_long = false;
    loop {
        let (used, done) = {
            let available = match input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok((consumed, too_long));
            }
            let (chunk, done) = match available.iter().position(|&c| c == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            if !too_long {
                if buf.len() + chunk.len() > max + 2 {
                    too_long = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            (chunk.len(), done)
        };
        input.consume(used);
        consumed += used as u64;
        if done {
            return Ok((consumed, too_long));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
    use crate::import::tests::ip;

    const S: i64 = NS_PER_SEC;

    // Lines printed by conntrack-tools 1.4.7 (`conntrack -E -o timestamp,extended,ktimestamp,id`,
    // TZ=UTC) in a lab: SNAT to 203.0.113.7 (ports 20000-20100) and 2001:db8:1::1.
    const NEW_TCP: &str = "[1795365323.542490]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=100.64.0.10 dst=203.0.113.2 sport=54326 dport=443 [UNREPLIED] src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20059 mark=7 id=4198896583";
    const DESTROY_TCP: &str = "[1795365327.723565]\t[DESTROY] ipv4     2 tcp      6 TIME_WAIT src=100.64.0.10 dst=203.0.113.2 sport=54326 dport=443 packets=6 bytes=325 src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20059 packets=4 bytes=231 [ASSURED] mark=7 delta-time=2 [start=Sun Nov 22 16:35:23 2026] [stop=Sun Nov 22 16:35:25 2026] id=4198896583";
    const NEW_ICMP: &str = "[1795365323.543307]\t    [NEW] ipv4     2 icmp     1 3 src=100.64.0.10 dst=203.0.113.2 type=8 code=0 id=4242 [UNREPLIED] src=203.0.113.2 dst=203.0.113.7 type=0 code=0 id=4242 id=3855156589";
    const DESTROY_ICMPV6_UTC: &str = "[1795365353.669629]\t[DESTROY] ipv6     10 icmpv6   58 25 src=fd00:64::10 dst=2001:db8:1::2 type=128 code=0 id=4343 packets=1 bytes=52 src=2001:db8:1::2 dst=2001:db8:1::1 type=129 code=0 id=4343 packets=1 bytes=52 delta-time=4 [start=Sun Nov 22 16:35:49 2026] [stop=Sun Nov 22 16:35:53 2026] id=1812382963 [USERSPACE] portid=4670 progname=conntrack";
    // The same event printed by a second listener with TZ=Asia/Kathmandu (+05:45).
    const DESTROY_ICMPV6_KTM: &str = "[1795365353.669766]\t[DESTROY] ipv6     10 icmpv6   58 25 src=fd00:64::10 dst=2001:db8:1::2 type=128 code=0 id=4343 packets=1 bytes=52 src=2001:db8:1::2 dst=2001:db8:1::1 type=129 code=0 id=4343 packets=1 bytes=52 delta-time=4 [start=Sun Nov 22 22:20:49 2026] [stop=Sun Nov 22 22:20:53 2026] id=1812382963 [USERSPACE] portid=4670 progname=conntrack";
    const NEW_UDP6_ZONE: &str = "[1795365323.542995]\t    [NEW] ipv6     10 udp      17 3 src=fd00:64::10 dst=2001:db8:1::2 sport=48140 dport=5000 [UNREPLIED] src=2001:db8:1::2 dst=2001:db8:1::1 sport=5000 dport=20022 zone=3 id=2457267608";
    const NEW_DNAT: &str = "[1795365323.697137]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=203.0.113.2 dst=203.0.113.7 sport=49896 dport=8080 [UNREPLIED] src=100.64.0.10 dst=203.0.113.2 sport=80 dport=49896 id=1520925113";
    const NEW_NOT_NAT: &str = "[1795365323.703362]\t    [NEW] ipv4     2 udp      17 3 src=203.0.113.2 dst=203.0.113.7 sport=44006 dport=9999 [UNREPLIED] src=203.0.113.7 dst=203.0.113.2 sport=9999 dport=44006 id=2136826464";
    const UPDATE: &str = "[1795364708.899828]\t [UPDATE] ipv4     2 tcp      6 60 SYN_RECV src=100.64.0.10 dst=203.0.113.2 sport=53950 dport=443 src=203.0.113.2 dst=203.0.113.7 sport=443 dport=20086 id=719612381";

    fn event(line: &str) -> CtEvent {
        match parse_conntrack_line(line.as_bytes()) {
            Ok(CtLine::Event(e)) => e,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn secs(s: &str) -> i64 {
        timestamp(&format!("[{s}]")).unwrap()
    }

    #[test]
    fn parses_a_tcp_new_with_mark_and_conntrack_id() {
        let e = event(NEW_TCP);
        assert_eq!(e.kind, EventKind::New);
        assert_eq!(e.time_ns, 1_795_365_323 * S + 542_490_000);
        assert_eq!(e.proto, IPPROTO_TCP);
        assert_eq!(e.status, IPS_SRC_NAT | IPS_CONFIRMED);
        assert_eq!(
            e.orig,
            Tuple {
                src: ip("100.64.0.10"),
                dst: ip("203.0.113.2"),
                src_port: 54326,
                dst_port: 443
            }
        );
        assert_eq!(
            e.reply,
            Tuple {
                src: ip("203.0.113.2"),
                dst: ip("203.0.113.7"),
                src_port: 443,
                dst_port: 20059
            }
        );
        assert_eq!(
            (e.mark, e.zone, e.conntrack_id),
            (Some(7), 0, Some(4_198_896_583))
        );
        assert_eq!(
            (e.orig_counters, e.reply_counters, e.kernel_start_ns),
            (None, None, None)
        );
    }

    #[test]
    fn parses_a_destroy_with_counters_and_kernel_times() {
        let e = event(DESTROY_TCP);
        assert_eq!(e.kind, EventKind::Destroy);
        assert_eq!(
            e.orig_counters,
            Some(Counters {
                packets: 6,
                bytes: 325
            })
        );
        assert_eq!(
            e.reply_counters,
            Some(Counters {
                packets: 4,
                bytes: 231
            })
        );
        // Sun Nov 22 16:35:23 2026 UTC
        assert_eq!(e.kernel_start_ns, Some(1_795_365_323 * S));
        assert_eq!(e.key(), event(NEW_TCP).key());
    }

    #[test]
    fn kernel_start_does_not_depend_on_the_time_zone_conntrack_ran_in() {
        let utc = event(DESTROY_ICMPV6_UTC);
        let ktm = event(DESTROY_ICMPV6_KTM);
        assert_eq!(utc.kernel_start_ns, Some(1_795_365_349 * S)); // 16:35:49Z
        assert_eq!(ktm.kernel_start_ns, utc.kernel_start_ns);
        // Without [start=]/[stop=]: delta-time before the event; without it, nothing.
        let no_kts = DESTROY_TCP.split(" [start=").next().unwrap();
        assert_eq!(
            event(no_kts).kernel_start_ns,
            Some(1_795_365_327 * S + 723_565_000 - 2 * S)
        );
        let plain = DESTROY_TCP.split(" delta-time").next().unwrap();
        assert_eq!(event(plain).kernel_start_ns, None);
        // An unusable local time falls back to delta-time.
        let odd = DESTROY_TCP.replace(
            "[stop=Sun Nov 22 16:35:25 2026]",
            "[stop=Sun Nov 22 16:35:25 1999]",
        );
        assert_eq!(
            event(&odd).kernel_start_ns,
            Some(1_795_365_327 * S + 723_565_000 - 2 * S)
        );
        // ctime pads one-digit days with a space.
        assert_eq!(
            ctime_secs("Mon Nov  2 06:05:04 2026"),
            ctime_secs("Mon Nov 02 06:05:04 2026")
        );
        assert!(ctime_secs("Mon Nov  2 06:05:04 2026").is_some());
    }

    #[test]
    fn icmp_identifiers_and_conntrack_id_are_told_apart() {
        let e = event(NEW_ICMP);
        assert_eq!(e.proto, IPPROTO_ICMP);
        assert_eq!((e.orig.src_port, e.orig.dst_port), (4242, 0));
        assert_eq!((e.reply.src_port, e.reply.dst_port), (4242, 0));
        assert_eq!(e.conntrack_id, Some(3_855_156_589));
        assert_eq!(e.status, IPS_SRC_NAT | IPS_CONFIRMED, "address translated");
        let e = event(DESTROY_ICMPV6_UTC);
        assert_eq!(e.proto, IPPROTO_ICMPV6);
        assert_eq!(e.orig.src, ip("fd00:64::10"));
        assert_eq!(e.reply.dst, ip("2001:db8:1::1"));
        assert_eq!(e.conntrack_id, Some(1_812_382_963));
        // A translated identifier.
        let e = event(&NEW_ICMP.replace("code=0 id=4242 id=", "code=0 id=777 id="));
        assert_eq!((e.orig.src_port, e.reply.src_port), (4242, 777));
        let b = open_binding(&e);
        assert_eq!(b.internal(), (ip("100.64.0.10"), 4242));
        assert_eq!(b.external(), (ip("203.0.113.7"), 777));
        assert_eq!(b.destination(), (ip("203.0.113.2"), 0));
    }

    #[test]
    fn ipv6_zone_dnat_not_nat_update_and_notices() {
        let e = event(NEW_UDP6_ZONE);
        assert_eq!((e.proto, e.zone, e.mark), (IPPROTO_UDP, 3, None));
        assert_eq!(e.reply.dst, ip("2001:db8:1::1"));
        let e = event(NEW_DNAT);
        assert_eq!(e.status, IPS_DST_NAT | IPS_CONFIRMED);
        let b = open_binding(&e);
        assert!(b.is_dnat_only());
        assert_eq!(b.internal(), (ip("100.64.0.10"), 80));
        assert_eq!(b.external(), (ip("203.0.113.7"), 8080));
        assert_eq!(b.destination(), (ip("203.0.113.2"), 49896));
        assert_eq!(
            parse_conntrack_line(NEW_NOT_NAT.as_bytes()),
            Ok(CtLine::NotNat)
        );
        assert_eq!(parse_conntrack_line(UPDATE.as_bytes()), Ok(CtLine::Update));
        assert_eq!(
            parse_conntrack_line(b" [UPDATE] ipv4 2 tcp 6 60 src=1.2.3.4"),
            Ok(CtLine::Update),
            "UPDATE lines are skipped unread"
        );
        assert_eq!(parse_conntrack_line(b"  \r\n"), Ok(CtLine::Blank));
        assert_eq!(
            parse_conntrack_line(
                b"conntrack v1.4.7 (conntrack-tools): 35 flow events have been shown.\n"
            ),
            Ok(CtLine::Notice { lost_events: false })
        );
        assert_eq!(
            parse_conntrack_line(b"WARNING: We have hit ENOBUFS! We are losing events."),
            Ok(CtLine::Notice { lost_events: true })
        );
        // Without -o extended, with CRLF.
        let short = NEW_TCP.replace("ipv4     2 ", "") + "\r\n";
        assert_eq!(event(&short), event(NEW_TCP));
        // GRE keys.
        let gre = event(
            "[1.5] [NEW] ipv4 2 gre 47 src=10.0.0.1 dst=10.0.0.2 srckey=0x1 dstkey=0x0 src=10.0.0.2 dst=10.0.0.9 srckey=0x0 dstkey=0x1",
        );
        assert_eq!(
            (gre.proto, gre.orig.src_port, gre.reply.dst_port),
            (47, 1, 1)
        );
        assert_eq!(gre.time_ns, S + S / 2);
    }

    #[test]
    fn timestamps_old_and_new_formats() {
        assert_eq!(secs("1795364708.899781"), 1_795_364_708 * S + 899_781_000);
        assert_eq!(secs("1795372.006068"), 1_795_372 * S + 6_068_000);
        // conntrack-tools before [%-.8ld.%-.6ld]: microseconds followed by spaces.
        assert_eq!(secs("1795364708.6068  "), 1_795_364_708 * S + 6_068_000);
        assert_eq!(secs("1795364708.5     "), 1_795_364_708 * S + 5_000);
        // Written by hand: a decimal fraction.
        assert_eq!(secs("1700000005.5"), 1_700_000_005 * S + 500_000_000);
        assert_eq!(secs("1700000005"), 1_700_000_005 * S);
        assert_eq!(secs("12345   .123456"), 12_345 * S + 123_456_000);
        for bad in ["1.", "1.2.3", "1.1234567890", "99999999999", "1e5", "-1.5"] {
            assert!(timestamp(&format!("[{bad}]")).is_err(), "{bad}");
        }
        let line = NEW_TCP.replace("[1795365323.542490]", "[17953x5323.542490]");
        assert!(matches!(
            parse_conntrack_line(line.as_bytes()),
            Err(LineError::Invalid {
                field: "timestamp",
                ..
            })
        ));
    }

    #[test]
    fn bad_lines_say_why() {
        let err = |line: &str| parse_conntrack_line(line.as_bytes()).unwrap_err();
        assert_eq!(
            err(NEW_TCP.split_once('\t').unwrap().1),
            LineError::NoTimestamp
        );
        assert_eq!(err("hello world"), LineError::NotAnEvent);
        assert_eq!(err("[1795365323.542490] [FOO] ipv4"), LineError::NotAnEvent);
        assert_eq!(err("[1795365323.542490]"), LineError::NotAnEvent);
        assert_eq!(
            err("[1795365323.542490] [NEW]").to_string(),
            "malformed conntrack event: nothing after the event"
        );
        assert_eq!(
            err("[1.0] [NEW] ipv4 2 tcp 6 120 src=1.2.3.4 dst=5.6.7.8 sport=1 dport=2"),
            LineError::Malformed(
                "expected an original and a reply tuple (src=… dst=… twice)".into()
            )
        );
        assert_eq!(
            err(&NEW_TCP.replace("dport=20059", "dport=70000")).to_string(),
            "dport: invalid value '70000': expected a port 0-65535"
        );
        assert_eq!(
            err(&NEW_TCP.replace("dst=203.0.113.7", "dst=203.0.113")).to_string(),
            "dst: invalid value '203.0.113': expected an IPv4 or IPv6 address"
        );
        assert_eq!(
            err(&NEW_TCP.replace(" sport=443 dport=20059", " sport=443")),
            LineError::Malformed("reply tuple without dport=".into())
        );
        assert_eq!(
            err(&NEW_TCP.replace("dst=203.0.113.7", "dst=2001:db8::7")),
            LineError::MixedFamilies
        );
        assert_eq!(
            err(&NEW_TCP.replace("ipv4     2", "ipv6     10")),
            LineError::MixedFamilies
        );
        assert_eq!(
            err(&format!("{NEW_TCP} src=1.2.3.4")),
            LineError::Malformed("more than two tuples".into())
        );
        assert_eq!(
            err(&NEW_TCP.replace("sport=54326", "sport=54326 sport=1")),
            LineError::Malformed("sport= twice in one tuple".into())
        );
        assert_eq!(
            err("[1.0] [NEW] ipv4 2 tcp 6 dst=1.2.3.4 src=5.6.7.8"),
            LineError::Malformed("dst= before src=".into())
        );
        assert_eq!(
            err("[1.0] [NEW] ipv4 2 tcp x src=5.6.7.8").to_string(),
            "protocol number: invalid value 'x': expected a protocol number 0-255"
        );
        assert_eq!(
            err(&DESTROY_TCP.replace("bytes=325 ", "")),
            LineError::Malformed("packets= and bytes= do not come together".into())
        );
        assert_eq!(
            err(&NEW_ICMP.replace("type=0 code=0 id=4242 id=3855156589", "type=0 code=0")),
            LineError::Malformed("reply tuple without id=".into())
        );
        assert_eq!(
            parse_conntrack_line(b"[1.0] [NEW] \xff"),
            Err(LineError::NotUtf8)
        );
        let long = format!("{NEW_TCP}{}", " x".repeat(MAX_LINE));
        assert_eq!(
            parse_conntrack_line(long.as_bytes()),
            Err(LineError::TooLong { max: MAX_LINE })
        );
    }

    #[test]
    fn mutated_lines_never_panic() {
        for seed in [NEW_TCP, DESTROY_TCP, NEW_ICMP, DESTROY_ICMPV6_KTM, NEW_DNAT] {
            crate::import::tests::mutations(seed.as_bytes(), 8_000, |input| {
                let _ = parse_conntrack_line(input);
            });
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        for input in [
            "[",
            "]",
            "[]",
            "[.]",
            "[ ]",
            "[1.]",
            "[1] [NEW",
            "[1] [NEW] ipv4",
            "[1] [NEW] ipv4 2",
            "[1] [NEW] ipv4 2 tcp",
            "[1] [NEW] [x",
            "[1] [DESTROY] tcp 6 src= dst=",
            "[1] [DESTROY] icmp 1 src=1.2.3.4 dst=1.2.3.5 id=1 id=2 id=3 src=1.2.3.5 dst=1.2.3.6 code=0 id=4",
            "[1] [DESTROY] tcp 6 src=1.2.3.4 dst=1.2.3.5 sport=1 dport=2 src=1.2.3.5 dst=1.2.3.6 sport=2 dport=3 delta-time=18446744073709551615",
            "[1] [DESTROY] tcp 6 src=1.2.3.4 dst=1.2.3.5 sport=1 dport=2 src=1.2.3.5 dst=1.2.3.6 sport=2 dport=3 [start=Sat Jan  1 00:00:00 262143] [stop=Sat Jan  1 00:00:00 262143]",
            "[9223372036.854775807] [NEW] udp 17 src=1.2.3.4 dst=1.2.3.5 sport=1 dport=2 src=1.2.3.5 dst=1.2.3.6 sport=2 dport=3",
            "[0] [DESTROY] udp 17 src=1.2.3.4 dst=1.2.3.5 sport=1 dport=2 src=1.2.3.5 dst=1.2.3.6 sport=2 dport=3 delta-time=9223372036 [start=Thu Jan  1 00:00:00 1970] [stop=Fri Dec 31 23:59:59 9999]",
            "[1] [NEW] gre 47 src=1.2.3.4 dst=1.2.3.5 srckey=0x src=1.2.3.5 dst=1.2.3.6",
            "\u{feff}[1] [NEW] é 1",
        ] {
            let _ = parse_conntrack_line(input.as_bytes());
        }
    }

    fn run(lines: &[&str]) -> Vec<Binding> {
        let mut m = Merger::new();
        let mut out = Vec::new();
        for l in lines {
            m.push(event(l), &mut out);
        }
        m.finish(&mut out);
        out
    }

    #[test]
    fn new_and_destroy_make_one_binding() {
        let out = run(&[NEW_TCP, DESTROY_TCP]);
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(b.start_ns, event(NEW_TCP).time_ns);
        assert_eq!(b.end_ns, Some(event(DESTROY_TCP).time_ns));
        assert!(!b.start_approximate && !b.end_approximate);
        assert_eq!(b.start_source, StartSource::Import);
        assert_eq!(b.mark, 7);
        assert_eq!(b.orig_counters, event(DESTROY_TCP).orig_counters);
        assert_eq!(b.internal(), (ip("100.64.0.10"), 54326));
        assert_eq!(b.external(), (ip("203.0.113.7"), 20059));
        assert_eq!(b.destination(), (ip("203.0.113.2"), 443));
    }

    /// A NEW/DESTROY pair of a UDP flow from port `sport`, at seconds `t0` and `t1`.
    fn udp(sport: u16, t0: &str, t1: &str) -> (String, String) {
        let tuples = format!(
            "src=100.64.0.10 dst=192.0.2.2 sport={sport} dport=53 src=192.0.2.2 dst=203.0.113.7 sport=53 dport={}",
            sport + 1000
        );
        (
            format!("[{t0}] [NEW] ipv4 2 udp 17 30 {tuples}"),
            format!("[{t1}] [DESTROY] ipv4 2 udp 17 {tuples} delta-time=1"),
        )
    }

    #[test]
    fn interleaved_out_of_order_and_unmatched_events() {
        let (new_a, destroy_a) = udp(1, "100", "110");
        let (new_b, destroy_b) = udp(2, "101", "105");
        let (new_c, _) = udp(3, "102", "");
        let (_, destroy_d) = udp(4, "", "103");
        let out = run(&[&new_a, &new_b, &new_c, &destroy_d, &destroy_b, &destroy_a]);
        let view: Vec<(u16, i64, Option<i64>, bool)> = out
            .iter()
            .map(|b| {
                (
                    b.orig.src_port,
                    b.start_ns / S,
                    b.end_ns.map(|e| e / S),
                    b.start_approximate,
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                (2, 101, Some(105), false),
                (1, 100, Some(110), false),
                (4, 102, Some(103), true), // DESTROY without NEW: start from delta-time
                (3, 102, None, false),     // NEW without DESTROY: open
            ]
        );
    }

    #[test]
    fn same_key_is_matched_first_in_first_out() {
        let (n1, d1) = udp(1, "100", "150");
        let (n2, d2) = udp(1, "120", "160");
        let out = run(&[&n1, &n2, &d1, &d2]);
        let spans: Vec<(i64, Option<i64>)> = out
            .iter()
            .map(|b| (b.start_ns / S, b.end_ns.map(|e| e / S)))
            .collect();
        assert_eq!(spans, [(100, Some(150)), (120, Some(160))]);
        // A DESTROY earlier than every waiting NEW is not theirs.
        let (n, _) = udp(1, "200", "");
        let (_, d) = udp(1, "", "190");
        let out = run(&[&n, &d]);
        let spans: Vec<(i64, Option<i64>, bool)> = out
            .iter()
            .map(|b| (b.start_ns / S, b.end_ns.map(|e| e / S), b.start_approximate))
            .collect();
        assert_eq!(spans, [(189, Some(190), true), (200, None, false)]);
    }

    #[test]
    fn destroy_before_its_new_is_merged_within_the_window() {
        let (n, d) = udp(1, "100", "105");
        let out = run(&[&d, &n]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start_ns / S, out[0].end_ns), (100, Some(105 * S)));
        assert!(!out[0].start_approximate);
        // Past the window the DESTROY is written alone; the late NEW stays open.
        let (_, late) = udp(9, "", "300");
        let out = run(&[&d, &late, &n]);
        let spans: Vec<(u16, i64, Option<i64>)> = out
            .iter()
            .map(|b| (b.orig.src_port, b.start_ns / S, b.end_ns.map(|e| e / S)))
            .collect();
        assert_eq!(
            spans,
            [(1, 104, Some(105)), (9, 299, Some(300)), (1, 100, None)]
        );
    }

    #[test]
    fn conntrack_ids_keep_entries_apart() {
        let (n, d) = udp(1, "100", "105");
        let out = run(&[&format!("{n} id=1"), &format!("{d} id=2")]);
        assert_eq!(out.len(), 2, "different entries");
        let out = run(&[&format!("{n} id=1"), &format!("{d} id=1")]);
        assert_eq!(out.len(), 1);
        let out = run(&[&n, &format!("{d} id=1")]);
        assert_eq!(
            out.len(),
            1,
            "an id on one side only does not keep them apart"
        );
    }

    #[test]
    fn reads_lines_with_a_limit() {
        let long = format!("{}\nshort\nlast", "x".repeat(100));
        let mut input = long.as_bytes();
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut input, &mut buf, 10).unwrap(), (101, true));
        assert_eq!(read_line(&mut input, &mut buf, 10).unwrap(), (6, false));
        assert_eq!(buf, b"short\n");
        assert_eq!(read_line(&mut input, &mut buf, 10).unwrap(), (4, false));
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut input, &mut buf, 10).unwrap(), (0, false));
    }
}
