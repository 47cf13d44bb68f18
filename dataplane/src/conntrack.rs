//! Per-worker connection tracking with NAT state.
//!
//! A flow is known under two keys, as in Linux conntrack: the *original* tuple (what the client
//! sent: client -> service address) and the *reply* tuple (what the backend sends back:
//! backend -> client, or -> the source-NAT address). Translating a packet is then the same
//! operation in both directions: a forward packet is rewritten to the reverse of the reply
//! tuple, a reply packet to the reverse of the original tuple.
//!
//! Layout and invariants:
//! - Flow records live in a slab of fixed capacity; free slab indices sit on a free list whose
//!   capacity is reserved up front, so inserting and removing never allocate.
//! - Keys live in a set-associative index: `2^k` buckets of [`WAYS`] slots. A slot holds a key
//!   and `slab index + 1` (0 = empty) with the reply-direction flag in the top bit. A live flow
//!   always has exactly two slots, one per key; removing a flow clears both.
//! - Each key has two candidate buckets (two-choice hashing, from two halves of one hash) and
//!   goes to the less loaded of the two; lookups check the first, then the second. With one
//!   bucket per key, a table at half load would already overflow about 2% of its buckets and
//!   evict live flows; with two choices it holds its full capacity.
//! - When both buckets (or the slab) are full, the flow with the oldest `last_seen` among the
//!   candidates is evicted (an expired one first). Eviction is counted; the table never grows
//!   and never refuses a new flow, so memory is bounded whatever the traffic.
//! - Expiry is lazy (a lookup that finds an expired flow removes it) plus an incremental sweep
//!   ([`Conntrack::gc`]) that the I/O loop runs with a small budget, so connection counts used by
//!   the least-connection schedulers drop back when flows end.
//! - Timeouts follow Linux's `nf_conntrack` defaults and are configurable.
//!
//! The hash is seeded per table (aHash), so a sender cannot aim collisions at one bucket to
//! evict other flows.

use std::sync::Arc;

use ahash::RandomState;
use serde::{Deserialize, Serialize};

use crate::balance::ConnCounts;
use crate::tables::{BackendId, ServiceId};
use crate::wire::{tcp_flags, IPPROTO_TCP, IPPROTO_UDP};

/// Slots per bucket.
pub const WAYS: usize = 8;
/// Slab entries examined when the slab is full and a victim is needed.
const SLAB_SCAN: usize = 16;
const REPLY_BIT: u32 = 1 << 31;

/// A 5-tuple (ICMP queries use the identifier as both ports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowKey {
    /// Source address, host order.
    pub src: u32,
    /// Destination address, host order.
    pub dst: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl FlowKey {
    #[inline(always)]
    fn pack(&self) -> [u64; 2] {
        [
            (u64::from(self.src) << 32) | u64::from(self.dst),
            (u64::from(self.sport) << 24) | (u64::from(self.dport) << 8) | u64::from(self.proto),
        ]
    }
    /// The same flow seen from the other side.
    #[inline]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// Direction of a packet relative to its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Dir {
    /// Client to service (the original tuple).
    Orig,
    /// Backend to client (the reply tuple).
    Reply,
}

/// Connection state (TCP states as Linux names them; UDP and ICMP use the first two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum State {
    /// UDP/ICMP: only the original direction seen.
    Unreplied,
    /// UDP/ICMP: both directions seen.
    Replied,
    /// TCP: SYN sent.
    SynSent,
    /// TCP: SYN+ACK seen.
    SynRecv,
    /// TCP: handshake done (or picked up mid-stream).
    Established,
    /// TCP: one side sent FIN.
    FinWait,
    /// TCP: both sides sent FIN.
    LastAck,
    /// TCP: final ACK after both FINs.
    TimeWait,
    /// TCP: reset.
    Close,
}

/// Timeouts in seconds (Linux `nf_conntrack_*_timeout*` defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timeouts {
    /// TCP SYN_SENT.
    pub tcp_syn_sent: u32,
    /// TCP SYN_RECV.
    pub tcp_syn_recv: u32,
    /// TCP ESTABLISHED.
    pub tcp_established: u32,
    /// TCP FIN_WAIT.
    pub tcp_fin_wait: u32,
    /// TCP LAST_ACK.
    pub tcp_last_ack: u32,
    /// TCP TIME_WAIT.
    pub tcp_time_wait: u32,
    /// TCP CLOSE (after RST).
    pub tcp_close: u32,
    /// UDP, one direction seen.
    pub udp: u32,
    /// UDP, both directions seen.
    pub udp_stream: u32,
    /// ICMP queries.
    pub icmp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 432_000,
            tcp_fin_wait: 120,
            tcp_last_ack: 30,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp: 30,
            udp_stream: 120,
            icmp: 30,
        }
    }
}

impl Timeouts {
    fn of(&self, s: State) -> u32 {
        match s {
            State::Unreplied => self.udp,
            State::Replied => self.udp_stream,
            State::SynSent => self.tcp_syn_sent,
            State::SynRecv => self.tcp_syn_recv,
            State::Established => self.tcp_established,
            State::FinWait => self.tcp_fin_wait,
            State::LastAck => self.tcp_last_ack,
            State::TimeWait => self.tcp_time_wait,
            State::Close => self.tcp_close,
        }
    }
}

const FIN_ORIG: u8 = 1;
const FIN_REPLY: u8 = 2;

/// One tracked flow.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Flow {
    /// Tuple as the client sends it.
    pub orig: FlowKey,
    /// Tuple as the backend sends back.
    pub reply: FlowKey,
    /// Service port the flow belongs to (0 for untranslated flows).
    pub service: ServiceId,
    /// Backend chosen (0 for untranslated flows).
    pub backend: BackendId,
    /// Table generation against which the backend was last checked.
    pub generation: u64,
    /// Expiry time, ns.
    pub expires: u64,
    /// Last packet time, ns.
    pub last_seen: u64,
    /// Packets seen, original direction.
    pub packets_orig: u64,
    /// Packets seen, reply direction.
    pub packets_reply: u64,
    /// Connection state.
    pub state: State,
    fins: u8,
    live: bool,
}

impl Flow {
    const EMPTY: Flow = Flow {
        orig: FlowKey { src: 0, dst: 0, sport: 0, dport: 0, proto: 0 },
        reply: FlowKey { src: 0, dst: 0, sport: 0, dport: 0, proto: 0 },
        service: 0,
        backend: 0,
        generation: 0,
        expires: 0,
        last_seen: 0,
        packets_orig: 0,
        packets_reply: 0,
        state: State::Unreplied,
        fins: 0,
        live: false,
    };

    /// A new flow in its initial state for the first packet's TCP flags.
    pub fn new(
        orig: FlowKey,
        reply: FlowKey,
        service: ServiceId,
        backend: BackendId,
        generation: u64,
    ) -> Self {
        Flow { orig, reply, service, backend, generation, live: true, ..Flow::EMPTY }
    }

    /// Advances the state machine for one packet and refreshes the expiry.
    #[inline]
    pub fn on_packet(&mut self, dir: Dir, flags: u8, now: u64, t: &Timeouts) {
        self.last_seen = now;
        match dir {
            Dir::Orig => self.packets_orig += 1,
            Dir::Reply => self.packets_reply += 1,
        }
        self.state = match self.orig.proto {
            IPPROTO_TCP => self.tcp_next(dir, flags),
            _ => match dir {
                Dir::Orig if self.packets_reply == 0 => State::Unreplied,
                _ => State::Replied,
            },
        };
        let timeout = if self.orig.proto == IPPROTO_TCP || self.orig.proto == IPPROTO_UDP {
            t.of(self.state)
        } else {
            t.icmp
        };
        self.expires = now + u64::from(timeout) * 1_000_000_000;
    }

    fn tcp_next(&mut self, dir: Dir, flags: u8) -> State {
        use State::*;
        let syn = flags & tcp_flags::SYN != 0;
        let ack = flags & tcp_flags::ACK != 0;
        if flags & tcp_flags::RST != 0 {
            return Close;
        }
        let first = self.packets_orig + self.packets_reply == 1;
        if first {
            // Loose pick-up, as Linux with nf_conntrack_tcp_loose=1: a flow first seen
            // mid-stream is taken as established.
            return if syn && !ack { SynSent } else { Established };
        }
        if flags & tcp_flags::FIN != 0 {
            self.fins |= if dir == Dir::Orig { FIN_ORIG } else { FIN_REPLY };
            return if self.fins == FIN_ORIG | FIN_REPLY { LastAck } else { FinWait };
        }
        match (self.state, dir) {
            // A new connection reusing the tuple of a finished one (Linux re-opens it).
            (TimeWait | Close, Dir::Orig) if syn && !ack => {
                self.fins = 0;
                SynSent
            }
            (SynSent, Dir::Reply) if syn && ack => SynRecv,
            (SynSent | SynRecv, Dir::Orig) if ack && !syn => Established,
            (LastAck, _) if ack => TimeWait,
            (s, _) => s,
        }
    }
}

/// Conntrack statistics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CtStats {
    /// Flows inserted.
    pub inserted: u64,
    /// Flows removed because they expired.
    pub expired: u64,
    /// Live flows evicted to make room.
    pub evicted: u64,
    /// Flows removed on request (backend gone, flush).
    pub removed: u64,
}

/// A per-worker connection table.
pub struct Conntrack {
    keys: Box<[[u64; 2]]>,
    vals: Box<[u32]>,
    bucket_mask: usize,
    flows: Box<[Flow]>,
    free: Vec<u32>,
    hasher: RandomState,
    conns: Arc<ConnCounts>,
    timeouts: Timeouts,
    gc_cursor: usize,
    hand: usize,
    len: usize,
    stats: CtStats,
}

impl Conntrack {
    /// A table for `capacity` flows (at least 16). Backend connection counts are kept in
    /// `conns`: incremented on insert, decremented when a flow leaves.
    pub fn new(capacity: usize, timeouts: Timeouts, conns: Arc<ConnCounts>) -> Self {
        let capacity = capacity.clamp(16, (REPLY_BIT - 1) as usize);
        // Two keys per flow at a load factor of at most 0.8.
        let slots = (capacity * 2 * 5 / 4).next_power_of_two().max(WAYS);
        let buckets = slots / WAYS;
        let mut free: Vec<u32> = Vec::with_capacity(capacity);
        free.extend((0..capacity as u32).rev());
        Self {
            keys: vec![[0u64; 2]; slots].into_boxed_slice(),
            vals: vec![0u32; slots].into_boxed_slice(),
            bucket_mask: buckets - 1,
            flows: vec![Flow::EMPTY; capacity].into_boxed_slice(),
            free,
            hasher: RandomState::new(),
            conns,
            timeouts,
            gc_cursor: 0,
            hand: 0,
            len: 0,
            stats: CtStats::default(),
        }
    }

    /// Flows the table can hold.
    pub fn capacity(&self) -> usize {
        self.flows.len()
    }
    /// Live flows (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Statistics.
    pub fn stats(&self) -> CtStats {
        self.stats
    }
    /// Timeouts in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }
    /// The shared backend connection counts.
    pub fn conns(&self) -> &Arc<ConnCounts> {
        &self.conns
    }

    /// The table's seeded hash of a key (also usable as a flow hash for schedulers).
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key.pack())
    }

    /// The two candidate buckets of a hash (first slot index of each).
    #[inline(always)]
    fn buckets(&self, h: u64) -> [usize; 2] {
        [(h as usize & self.bucket_mask) * WAYS, ((h >> 32) as usize & self.bucket_mask) * WAYS]
    }

    /// Finds a live flow by either of its keys. An expired flow found here is removed.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u64) -> Option<(u32, Dir)> {
        let h = self.hash(key);
        self.lookup_hashed(key, h, now)
    }

    /// [`Conntrack::lookup`] with the key's hash already computed.
    #[inline]
    pub fn lookup_hashed(&mut self, key: &FlowKey, h: u64, now: u64) -> Option<(u32, Dir)> {
        let (idx, dir) = self.find(key.pack(), h)?;
        if self.flows[idx as usize].expires <= now {
            self.remove_inner(idx);
            self.stats.expired += 1;
            return None;
        }
        Some((idx, dir))
    }

    /// Whether a key is in use by a live (unexpired) flow.
    pub fn contains(&mut self, key: &FlowKey, now: u64) -> bool {
        self.lookup(key, now).is_some()
    }

    #[inline(always)]
    fn find(&self, packed: [u64; 2], h: u64) -> Option<(u32, Dir)> {
        for b in self.buckets(h) {
            for s in b..b + WAYS {
                let v = self.vals[s];
                if v != 0 && self.keys[s] == packed {
                    let dir = if v & REPLY_BIT != 0 { Dir::Reply } else { Dir::Orig };
                    return Some(((v & !REPLY_BIT) - 1, dir));
                }
            }
        }
        None
    }

    /// A flow by slab index.
    #[inline(always)]
    pub fn flow(&self, idx: u32) -> &Flow {
        &self.flows[idx as usize]
    }
    /// A flow by slab index, mutable.
    #[inline(always)]
    pub fn flow_mut(&mut self, idx: u32) -> &mut Flow {
        &mut self.flows[idx as usize]
    }
    /// Updates a flow's state for a packet.
    #[inline]
    pub fn on_packet(&mut self, idx: u32, dir: Dir, flags: u8, now: u64) {
        let t = self.timeouts;
        self.flows[idx as usize].on_packet(dir, flags, now, &t);
    }

    /// Inserts a new flow (its keys must not be in use: check with [`Conntrack::contains`]),
    /// evicting the oldest flows where its buckets or the slab are full. The flow's first
    /// packet is accounted. Returns its slab index.
    pub fn insert(&mut self, mut flow: Flow, flags: u8, now: u64) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let v = self.slab_victim(now);
                self.evict(v, now);
                self.free.pop().expect("evicting a flow frees its slab entry")
            }
        };
        flow.live = true;
        flow.fins = 0;
        flow.packets_orig = 0;
        flow.packets_reply = 0;
        flow.on_packet(Dir::Orig, flags, now, &self.timeouts);
        self.flows[idx as usize] = flow;
        let orig = flow.orig.pack();
        let reply = flow.reply.pack();
        let so = self.free_slot(self.hash(&flow.orig), idx, now);
        self.keys[so] = orig;
        self.vals[so] = idx + 1;
        let sr = self.free_slot(self.hash(&flow.reply), idx, now);
        self.keys[sr] = reply;
        self.vals[sr] = (idx + 1) | REPLY_BIT;
        if flow.backend != 0 {
            self.conns.inc(flow.backend);
        }
        self.len += 1;
        self.stats.inserted += 1;
        idx
    }

    /// A free slot in one of the key's buckets, evicting the oldest other flow there if both
    /// are full.
    fn free_slot(&mut self, h: u64, own: u32, now: u64) -> usize {
        let bs = self.buckets(h);
        // The less loaded of the two buckets (the power of two choices).
        let free = |b: usize| (b..b + WAYS).filter(|&s| self.vals[s] == 0).count();
        let (f0, f1) = (free(bs[0]), free(bs[1]));
        if f0 + f1 > 0 {
            let b = if f0 >= f1 { bs[0] } else { bs[1] };
            return (b..b + WAYS).find(|&s| self.vals[s] == 0).expect("counted a free slot");
        }
        let mut victim: Option<(u64, u32)> = None;
        for b in bs {
            for s in b..b + WAYS {
                let fi = (self.vals[s] & !REPLY_BIT) - 1;
                if fi == own {
                    continue;
                }
                let f = &self.flows[fi as usize];
                // Expired flows sort before every live one.
                let age = if f.expires <= now { 0 } else { f.last_seen.saturating_add(1) };
                if victim.is_none_or(|(a, _)| age < a) {
                    victim = Some((age, fi));
                }
            }
        }
        let (_, fi) = victim.expect("two full buckets hold at least one other flow");
        self.evict(fi, now);
        bs.into_iter()
            .flat_map(|b| b..b + WAYS)
            .find(|&s| self.vals[s] == 0)
            .expect("eviction freed a slot in these buckets")
    }

    fn slab_victim(&mut self, now: u64) -> u32 {
        let n = self.flows.len();
        let mut best: Option<(u64, u32)> = None;
        for _ in 0..SLAB_SCAN.min(n) {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let f = &self.flows[i];
            if !f.live {
                continue;
            }
            let age = if f.expires <= now { 0 } else { f.last_seen.saturating_add(1) };
            if best.is_none_or(|(a, _)| age < a) {
                best = Some((age, i as u32));
            }
        }
        // The slab is full, so every entry is live and the scan found one.
        best.map_or(0, |b| b.1)
    }

    fn evict(&mut self, idx: u32, now: u64) {
        if self.flows[idx as usize].expires <= now {
            self.stats.expired += 1;
        } else {
            self.stats.evicted += 1;
        }
        self.remove_inner(idx);
    }

    /// Removes a flow (backend gone, flush, close).
    pub fn remove(&mut self, idx: u32) {
        if self.flows.get(idx as usize).is_some_and(|f| f.live) {
            self.remove_inner(idx);
            self.stats.removed += 1;
        }
    }

    fn remove_inner(&mut self, idx: u32) {
        let f = self.flows[idx as usize];
        debug_assert!(f.live);
        for (key, bit) in [(f.orig, 0), (f.reply, REPLY_BIT)] {
            let want = (idx + 1) | bit;
            let bs = self.buckets(self.hash(&key));
            if let Some(s) = bs.into_iter().flat_map(|b| b..b + WAYS).find(|&s| self.vals[s] == want)
            {
                self.vals[s] = 0;
            }
        }
        if f.backend != 0 {
            self.conns.dec(f.backend);
        }
        self.flows[idx as usize].live = false;
        self.free.push(idx);
        self.len -= 1;
    }

    /// Sweeps up to `budget` slab entries for expired flows; returns how many were removed.
    pub fn gc(&mut self, now: u64, budget: usize) -> usize {
        let n = self.flows.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let i = self.gc_cursor;
            self.gc_cursor = (self.gc_cursor + 1) % n;
            let f = &self.flows[i];
            if f.live && f.expires <= now {
                self.remove_inner(i as u32);
                self.stats.expired += 1;
                removed += 1;
            }
        }
        removed
    }

    /// Removes every flow matching `pred`; returns how many.
    pub fn flush(&mut self, mut pred: impl FnMut(&Flow) -> bool) -> usize {
        let mut n = 0;
        for i in 0..self.flows.len() {
            if self.flows[i].live && pred(&self.flows[i]) {
                self.remove_inner(i as u32);
                self.stats.removed += 1;
                n += 1;
            }
        }
        n
    }

    /// Every live flow (for inspection; not for the hot path).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter().filter(|f| f.live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(i: u32) -> FlowKey {
        FlowKey { src: 0x0a00_0000 | i, dst: 0x0a60_0001, sport: 40000, dport: 80, proto: 6 }
    }
    fn reply(i: u32) -> FlowKey {
        FlowKey { src: 0x0af4_0001, dst: 0x0a00_0000 | i, sport: 8080, dport: 40000, proto: 6 }
    }
    fn table(cap: usize) -> Conntrack {
        Conntrack::new(cap, Timeouts::default(), Arc::new(ConnCounts::new(16)))
    }

    #[test]
    fn both_keys_find_the_flow_and_removal_clears_both() {
        let mut ct = table(64);
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0), tcp_flags::SYN, 0);
        assert_eq!(ct.lookup(&key(1), 1), Some((i, Dir::Orig)));
        assert_eq!(ct.lookup(&reply(1), 1), Some((i, Dir::Reply)));
        assert_eq!(ct.conns().active(3), 1);
        ct.remove(i);
        assert_eq!(ct.lookup(&key(1), 1), None);
        assert_eq!(ct.lookup(&reply(1), 1), None);
        assert_eq!(ct.conns().active(3), 0);
        assert!(ct.is_empty());
    }

    #[test]
    fn tcp_state_machine_and_timeouts_follow_linux() {
        let mut ct = table(64);
        let t = Timeouts::default();
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0), tcp_flags::SYN, 0);
        assert_eq!(ct.flow(i).state, State::SynSent);
        assert_eq!(ct.flow(i).expires, u64::from(t.tcp_syn_sent) * S);
        ct.on_packet(i, Dir::Reply, tcp_flags::SYN | tcp_flags::ACK, S);
        assert_eq!(ct.flow(i).state, State::SynRecv);
        ct.on_packet(i, Dir::Orig, tcp_flags::ACK, 2 * S);
        assert_eq!(ct.flow(i).state, State::Established);
        assert_eq!(ct.flow(i).expires, 2 * S + u64::from(t.tcp_established) * S);
        ct.on_packet(i, Dir::Orig, tcp_flags::FIN | tcp_flags::ACK, 3 * S);
        assert_eq!(ct.flow(i).state, State::FinWait);
        ct.on_packet(i, Dir::Reply, tcp_flags::FIN | tcp_flags::ACK, 4 * S);
        assert_eq!(ct.flow(i).state, State::LastAck);
        ct.on_packet(i, Dir::Orig, tcp_flags::ACK, 5 * S);
        assert_eq!(ct.flow(i).state, State::TimeWait);
        assert_eq!(ct.flow(i).expires, 5 * S + u64::from(t.tcp_time_wait) * S);
        // Expired at the deadline, removed by the lookup.
        assert!(ct.lookup(&key(1), 5 * S + 120 * S).is_none());
        assert_eq!(ct.stats().expired, 1);
        assert_eq!(ct.conns().active(3), 0);
    }

    #[test]
    fn rst_closes_and_mid_stream_is_picked_up() {
        let mut ct = table(64);
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0), tcp_flags::ACK, 0);
        assert_eq!(ct.flow(i).state, State::Established);
        ct.on_packet(i, Dir::Reply, tcp_flags::RST, S);
        assert_eq!(ct.flow(i).state, State::Close);
        assert_eq!(ct.flow(i).expires, S + 10 * S);
    }

    #[test]
    fn udp_timeouts_unreplied_then_stream() {
        let mut ct = table(64);
        let mut k = key(2);
        k.proto = IPPROTO_UDP;
        let mut r = reply(2);
        r.proto = IPPROTO_UDP;
        let i = ct.insert(Flow::new(k, r, 1, 3, 0), 0, 0);
        assert_eq!(ct.flow(i).state, State::Unreplied);
        assert_eq!(ct.flow(i).expires, 30 * S);
        ct.on_packet(i, Dir::Reply, 0, S);
        assert_eq!(ct.flow(i).state, State::Replied);
        assert_eq!(ct.flow(i).expires, S + 120 * S);
        ct.on_packet(i, Dir::Orig, 0, 2 * S);
        assert_eq!(ct.flow(i).state, State::Replied);
    }

    #[test]
    fn full_table_evicts_oldest_and_counts() {
        let mut ct = table(16);
        for n in 0..16 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, u64::from(n) * S);
        }
        assert_eq!(ct.len(), 16);
        assert_eq!(ct.conns().active(3), 16);
        ct.insert(Flow::new(key(100), reply(100), 1, 3, 0), tcp_flags::SYN, 20 * S);
        assert_eq!(ct.len(), 16);
        assert_eq!(ct.stats().evicted, 1);
        assert_eq!(ct.conns().active(3), 16);
        assert!(ct.lookup(&key(100), 21 * S).is_some());
        // Some older flow is gone; the newest ones stayed.
        assert!(ct.lookup(&key(15), 21 * S).is_some());
    }

    #[test]
    fn many_flows_keep_both_keys_consistent() {
        let mut ct = table(4096);
        for n in 0..20_000u32 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, u64::from(n));
            assert!(ct.len() <= 4096);
        }
        // Every live flow is found under both keys, and nothing else is.
        let live: Vec<Flow> = ct.iter().copied().collect();
        assert_eq!(live.len(), ct.len());
        for f in &live {
            let (a, da) = ct.lookup(&f.orig, 0).expect("orig key");
            let (b, db) = ct.lookup(&f.reply, 0).expect("reply key");
            assert_eq!((a, da, db), (b, Dir::Orig, Dir::Reply));
        }
        assert_eq!(ct.conns().active(3) as usize, ct.len());
        let s = ct.stats();
        assert_eq!(s.inserted - s.evicted - s.expired - s.removed, ct.len() as u64);
    }

    #[test]
    fn a_table_holds_its_full_capacity_without_evicting() {
        let mut ct = table(1 << 16);
        for n in 0..(1u32 << 16) {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, 1);
        }
        assert_eq!(ct.len(), 1 << 16);
        assert_eq!(ct.stats().evicted, 0);
    }

    #[test]
    fn gc_sweeps_expired_flows() {
        let mut ct = table(64);
        for n in 0..10 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, 0);
        }
        assert_eq!(ct.gc(119 * S, 1000), 0);
        assert_eq!(ct.gc(121 * S, 1000), 10);
        assert!(ct.is_empty());
        assert_eq!(ct.conns().active(3), 0);
    }
}
