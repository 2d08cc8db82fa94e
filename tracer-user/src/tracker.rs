//! Merges binding starts (from the capture backend) and ends (ctnetlink DESTROY events) into
//! interval records, and reconciles both with dumps of the conntrack table.
//!
//! Two channels race: an end can be read before its start. Ends without a start are held for
//! [`Tracker::EARLY_END_HOLD_NS`]; if no start comes (its record was lost), the end alone
//! becomes a binding whose start is taken from the conntrack timestamp, marked approximate.
//!
//! Bindings can also end unseen (DESTROY lost to a netlink overrun, an entry dropped at
//! confirm). [`Tracker::reconcile`] compares the open bindings with a dump of the table: an
//! open binding whose entry is gone gets the dump's time as its end, marked approximate (the
//! entry ended between the last dump that saw it and this one; the upper bound is recorded so
//! that a query never misses it). Live NAT entries without an open binding (they existed before
//! the agent started, or their start was lost) become bindings whose start is approximate.
//!
//! The tracker does no I/O: every record to store is pushed to an output vector.

use std::collections::{VecDeque, hash_map::Entry};

use smallvec::SmallVec;

use crate::{
    binding::{Binding, ConntrackKey, StartSource},
    capture::StartEvent,
    conntrack::CtEntry,
};

/// Hash maps keyed by conntrack tuples. Subscribers choose their ports, so the hasher is
/// randomly seeded (foldhash), and fast: the agent looks a key up for every start and end.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The open bindings of one key, oldest first. Almost always exactly one, kept inline in a
/// box: the map's buckets then hold only key and pointer, so the table of a busy NAT's
/// hundreds of thousands of open bindings stays compact and cheap to probe and grow.
type OpenList = Box<SmallVec<[Open; 1]>>;

/// An open binding and the last time the agent knew it was alive.
#[derive(Clone, Debug)]
struct Open {
    binding: Binding,
    last_seen_ns: i64,
}

#[derive(Clone, Debug)]
struct EarlyEnd {
    entry: CtEntry,
    received_ns: i64,
}

/// The merge state of the agent.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Open bindings by conntrack key, oldest first (a key can be reused after an entry
    /// ends, before that end has been read).
    open: HashMap<ConntrackKey, OpenList>,
    open_count: usize,
    /// Ends read before their start.
    early_ends: HashMap<ConntrackKey, VecDeque<EarlyEnd>>,
    /// Bindings closed approximately by a reconciliation, kept a while so that a DESTROY read
    /// late can still put in the exact end.
    closed_approx: HashMap<ConntrackKey, (Binding, i64)>,
}

/// Counts of what a reconciliation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Open bindings whose entry was gone: closed with an approximate end.
    pub closed: usize,
    /// Live entries without an open binding: opened with an approximate start.
    pub opened: usize,
}

impl Tracker {
    /// How long an end waits for its start before it is stored on its own.
    pub const EARLY_END_HOLD_NS: i64 = 2_000_000_000;
    /// Bindings that started this close before a dump may not be in it yet (not yet
    /// confirmed): a reconciliation leaves them open.
    pub const DUMP_GRACE_NS: i64 = 1_000_000_000;
    /// How long an approximately closed binding can still receive its exact end.
    const LATE_END_WINDOW_NS: i64 = 30_000_000_000;

    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of open bindings.
    #[must_use]
    pub fn open_count(&self) -> usize {
        self.open_count
    }

    /// Number of ends waiting for their start.
    #[must_use]
    pub fn early_end_count(&self) -> usize {
        self.early_ends.values().map(VecDeque::len).sum()
    }

    /// A start captured by the backend, its time already converted to UTC.
    pub fn on_start(
        &mut self,
        start: &StartEvent,
        start_ns: i64,
        alloc: &mut impl FnMut() -> u64,
        out: &mut Vec<Binding>,
    ) {
        let mut binding = Binding {
            id: alloc(),
            proto: start.proto,
            zone: start.zone,
            mark: start.mark,
            status: start.status,
            orig: start.orig,
            reply: start.reply,
            start_ns,
            start_approximate: false,
            start_source: StartSource::Ring,
            end_ns: None,
            end_approximate: false,
            orig_counters: None,
            reply_counters: None,
        };
        let key = binding.key();
        if let Some(end) = self.take_early_end(&key) {
            apply_end(&mut binding, &end.entry, end.received_ns);
            out.push(binding);
            return;
        }
        out.push(binding.clone());
        self.insert_open(Open {
            binding,
            last_seen_ns: start_ns,
        });
    }

    /// A ctnetlink DESTROY event received at `now_ns`.
    pub fn on_destroy(&mut self, entry: CtEntry, now_ns: i64, out: &mut Vec<Binding>) {
        if !entry.is_nat() {
            return;
        }
        let key = entry.key();
        if let Some(open) = self.pop_oldest_open(&key) {
            let mut binding = open.binding;
            apply_end(&mut binding, &entry, now_ns);
            out.push(binding);
            return;
        }
        if let Some((mut binding, _)) = self.closed_approx.remove(&key) {
            apply_end(&mut binding, &entry, now_ns);
            out.push(binding);
            return;
        }
        self.early_ends.entry(key).or_default().push_back(EarlyEnd {
            entry,
            received_ns: now_ns,
        });
    }

    /// Stores ends that waited too long for their start as bindings of their own, and forgets
    /// old approximately closed bindings.
    pub fn expire(&mut self, now_ns: i64, alloc: &mut impl FnMut() -> u64, out: &mut Vec<Binding>) {
        self.early_ends.retain(|_, ends| {
            while let Some(front) = ends.front() {
                if now_ns - front.received_ns < Self::EARLY_END_HOLD_NS {
                    break;
                }
                let end = ends.pop_front().expect("front exists");
                out.push(binding_from_end_only(&end, alloc()));
            }
            !ends.is_empty()
        });
        self.closed_approx
            .retain(|_, (_, closed_at)| now_ns - *closed_at < Self::LATE_END_WINDOW_NS);
    }

    /// Takes over bindings a previous agent run left open: those still alive in `dump` stay
    /// open under their id, the others get `dump_ns` as an approximate end.
    pub fn adopt(
        &mut self,
        previous: Vec<Binding>,
        dump: &[CtEntry],
        dump_ns: i64,
        out: &mut Vec<Binding>,
    ) {
        let alive: HashMap<ConntrackKey, &CtEntry> = dump
            .iter()
            .filter(|e| e.is_nat())
            .map(|e| (e.key(), e))
            .collect();
        for mut binding in previous {
            let key = binding.key();
            let same_entry = alive.get(&key).is_some_and(|e| {
                // A reused tuple is a different entry if it started after the binding.
                e.start_ns
                    .is_none_or(|s| s <= binding.start_ns + Self::DUMP_GRACE_NS)
            });
            if same_entry && !self.open.contains_key(&key) {
                self.insert_open(Open {
                    binding,
                    last_seen_ns: dump_ns,
                });
            } else {
                binding.end_ns = Some(dump_ns);
                binding.end_approximate = true;
                out.push(binding);
            }
        }
    }

    /// Reconciles with a dump of the conntrack table taken at `dump_ns`. The caller drains
    /// the capture backend and the DESTROY listener after taking the dump and before calling
    /// this, so that every entry in the dump has had its start read.
    pub fn reconcile(
        &mut self,
        dump: &[CtEntry],
        dump_ns: i64,
        alloc: &mut impl FnMut() -> u64,
        out: &mut Vec<Binding>,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let alive: HashSet<ConntrackKey> = dump
            .iter()
            .filter(|e| e.is_nat())
            .map(CtEntry::key)
            .collect();
        let mut closed = Vec::new();
        for (key, list) in &mut self.open {
            let present = alive.contains(key);
            // When the entry is alive, its newest binding is the live one; older ones with the
            // same key ended unseen, each before the next one started.
            let keep_newest = usize::from(present);
            let mut i = 0;
            while i + keep_newest < list.len() {
                let o = &list[i];
                if o.binding.start_ns >= dump_ns - Self::DUMP_GRACE_NS {
                    i += 1;
                    continue;
                }
                let next_start = list.get(i + 1).map(|n| n.binding.start_ns);
                let mut b = list.remove(i).binding;
                b.end_ns = Some(next_start.map_or(dump_ns, |s| s.min(dump_ns)));
                b.end_approximate = true;
                closed.push(b);
            }
            if present && let Some(newest) = list.last_mut() {
                newest.last_seen_ns = dump_ns;
            }
        }
        self.open.retain(|_, l| !l.is_empty());
        self.open_count -= closed.len();
        report.closed = closed.len();
        for b in closed {
            self.closed_approx.insert(b.key(), (b.clone(), dump_ns));
            out.push(b);
        }
        for entry in dump.iter().filter(|e| e.is_nat()) {
            let key = entry.key();
            if self.open.contains_key(&key) || self.early_ends.contains_key(&key) {
                continue;
            }
            let binding = binding_from_entry(
                entry,
                alloc(),
                entry.start_ns.unwrap_or(dump_ns),
                StartSource::Dump,
            );
            out.push(binding.clone());
            self.insert_open(Open {
                binding,
                last_seen_ns: dump_ns,
            });
            report.opened += 1;
        }
        report
    }

    fn insert_open(&mut self, open: Open) {
        self.open.entry(open.binding.key()).or_default().push(open);
        self.open_count += 1;
    }

    fn pop_oldest_open(&mut self, key: &ConntrackKey) -> Option<Open> {
        let Entry::Occupied(mut slot) = self.open.entry(*key) else {
            return None;
        };
        let list = slot.get_mut();
        let open = (!list.is_empty()).then(|| list.remove(0));
        if slot.get().is_empty() {
            slot.remove();
        }
        if open.is_some() {
            self.open_count -= 1;
        }
        open
    }

    fn take_early_end(&mut self, key: &ConntrackKey) -> Option<EarlyEnd> {
        // Almost always empty: skip hashing the key on every start.
        if self.early_ends.is_empty() {
            return None;
        }
        let Entry::Occupied(mut slot) = self.early_ends.entry(*key) else {
            return None;
        };
        let end = slot.get_mut().pop_front();
        if slot.get().is_empty() {
            slot.remove();
        }
        end
    }
}

/// Puts the end of `entry` into `binding`: the kernel's stop timestamp when it has one (exact),
/// else the time the event was received (approximate), and the counters.
fn apply_end(binding: &mut Binding, entry: &CtEntry, received_ns: i64) {
    binding.end_ns = Some(entry.stop_ns.unwrap_or(received_ns));
    binding.end_approximate = entry.stop_ns.is_none();
    binding.orig_counters = entry.orig_counters;
    binding.reply_counters = entry.reply_counters;
}

/// A binding known only from its DESTROY event.
fn binding_from_end_only(end: &EarlyEnd, id: u64) -> Binding {
    let entry = &end.entry;
    let end_ns = entry.stop_ns.unwrap_or(end.received_ns);
    let mut binding = binding_from_entry(
        entry,
        id,
        entry.start_ns.unwrap_or(end_ns),
        StartSource::Destroy,
    );
    apply_end(&mut binding, entry, end.received_ns);
    binding
}

/// An open binding made from a conntrack entry rather than a captured first packet: its
/// start is approximate.
fn binding_from_entry(
    entry: &CtEntry,
    id: u64,
    start_ns: i64,
    start_source: StartSource,
) -> Binding {
    Binding {
        id,
        proto: entry.proto,
        zone: entry.zone,
        mark: entry.mark,
        status: entry.status,
        orig: entry.orig,
        reply: entry.reply,
        start_ns,
        start_approximate: true,
        start_source,
        end_ns: None,
        end_approximate: false,
        orig_counters: None,
        reply_counters: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{Counters, IPPROTO_UDP, IPS_CONFIRMED, IPS_SRC_NAT, Tuple};

    const S: i64 = 1_000_000_000;

    fn tuple(sport: u16) -> (Tuple, Tuple) {
        let orig = Tuple {
            src: "100.64.0.10".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            src_port: sport,
            dst_port: 53,
        };
        let reply = Tuple {
            src: "192.0.2.2".parse().unwrap(),
            dst: "203.0.113.7".parse().unwrap(),
            src_port: 53,
            dst_port: sport + 1000,
        };
        (orig, reply)
    }

    fn start(sport: u16) -> StartEvent {
        let (orig, reply) = tuple(sport);
        StartEvent {
            proto: IPPROTO_UDP,
            orig,
            reply,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT,
            boot_ns: 0,
        }
    }

    fn entry(sport: u16, start_ns: Option<i64>, stop_ns: Option<i64>) -> CtEntry {
        let (orig, reply) = tuple(sport);
        CtEntry {
            proto: IPPROTO_UDP,
            orig,
            reply,
            zone: 0,
            mark: 0,
            status: IPS_SRC_NAT | IPS_CONFIRMED,
            orig_counters: Some(Counters {
                packets: 2,
                bytes: 100,
            }),
            reply_counters: Some(Counters {
                packets: 1,
                bytes: 60,
            }),
            start_ns,
            stop_ns,
        }
    }

    fn ids() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn start_then_end_makes_one_interval() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_start(&start(1), 10 * S, &mut alloc, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].end_ns, None);
        t.on_destroy(entry(1, Some(10 * S), Some(20 * S)), 21 * S, &mut out);
        assert_eq!(out.len(), 2);
        let b = &out[1];
        assert_eq!(
            (b.id, b.start_ns, b.end_ns, b.end_approximate),
            (1, 10 * S, Some(20 * S), false)
        );
        assert_eq!(b.orig_counters.unwrap().bytes, 100);
        assert_eq!(t.open_count(), 0);
    }

    #[test]
    fn end_before_start_is_held_and_merged() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_destroy(entry(1, Some(10 * S), Some(11 * S)), 11 * S, &mut out);
        assert!(out.is_empty());
        t.on_start(&start(1), 10 * S, &mut alloc, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].start_source, out[0].end_ns),
            (StartSource::Ring, Some(11 * S))
        );
        assert_eq!(t.early_end_count(), 0);
    }

    #[test]
    fn end_without_start_becomes_a_recovered_binding() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_destroy(entry(1, Some(10 * S), Some(11 * S)), 11 * S, &mut out);
        t.expire(12 * S, &mut alloc, &mut out);
        assert!(out.is_empty(), "held for two seconds");
        t.expire(13 * S + 1, &mut alloc, &mut out);
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(
            (b.start_source, b.start_approximate, b.start_ns),
            (StartSource::Destroy, true, 10 * S)
        );
        assert_eq!((b.end_ns, b.end_approximate), (Some(11 * S), false));
    }

    #[test]
    fn non_nat_entries_are_ignored() {
        let (mut t, mut out) = (Tracker::new(), Vec::new());
        let mut e = entry(1, None, None);
        e.status = IPS_CONFIRMED;
        t.on_destroy(e, S, &mut out);
        assert_eq!(t.early_end_count(), 0);
    }

    #[test]
    fn reconcile_closes_gone_entries_and_opens_unknown_ones() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_start(&start(1), 10 * S, &mut alloc, &mut out); // will be gone
        t.on_start(&start(2), 10 * S, &mut alloc, &mut out); // still alive
        t.on_start(&start(3), 30 * S, &mut alloc, &mut out); // too recent to judge
        out.clear();
        let dump = [entry(2, None, None), entry(4, Some(5 * S), None)];
        let r = t.reconcile(&dump, 30 * S + S / 2, &mut alloc, &mut out);
        assert_eq!(
            r,
            ReconcileReport {
                closed: 1,
                opened: 1
            }
        );
        let closed = out.iter().find(|b| b.orig.src_port == 1).unwrap();
        assert_eq!(
            (closed.end_ns, closed.end_approximate),
            (Some(30 * S + S / 2), true)
        );
        let opened = out.iter().find(|b| b.orig.src_port == 4).unwrap();
        assert_eq!(
            (
                opened.start_source,
                opened.start_approximate,
                opened.start_ns
            ),
            (StartSource::Dump, true, 5 * S)
        );
        assert_eq!(t.open_count(), 3);
    }

    #[test]
    fn late_destroy_corrects_an_approximate_end() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_start(&start(1), 10 * S, &mut alloc, &mut out);
        t.reconcile(&[], 20 * S, &mut alloc, &mut out);
        out.clear();
        t.on_destroy(entry(1, Some(10 * S), Some(15 * S)), 20 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].id, out[0].end_ns, out[0].end_approximate),
            (1, Some(15 * S), false)
        );
    }

    #[test]
    fn reused_key_closes_the_older_binding_first() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        t.on_start(&start(1), 10 * S, &mut alloc, &mut out);
        t.on_start(&start(1), 12 * S, &mut alloc, &mut out);
        out.clear();
        t.on_destroy(entry(1, Some(10 * S), Some(11 * S)), 13 * S, &mut out);
        assert_eq!(out[0].id, 1);
        t.reconcile(
            &[entry(1, Some(12 * S), None)],
            20 * S,
            &mut alloc,
            &mut out,
        );
        assert_eq!(t.open_count(), 1, "the newer binding is the live entry");
    }

    #[test]
    fn adopt_keeps_live_bindings_and_closes_the_rest() {
        let (mut t, mut out, mut alloc) = (Tracker::new(), Vec::new(), ids());
        let mut prev = Vec::new();
        t.on_start(&start(1), 10 * S, &mut alloc, &mut prev);
        t.on_start(&start(2), 10 * S, &mut alloc, &mut prev);
        let mut fresh = Tracker::new();
        fresh.adopt(prev, &[entry(1, None, None)], 50 * S, &mut out);
        assert_eq!(fresh.open_count(), 1);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].orig.src_port, out[0].end_ns, out[0].end_approximate),
            (2, Some(50 * S), true)
        );
    }
}
