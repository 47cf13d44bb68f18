//! Per-worker connection tracking with NAT state.
//!
//! A flow is known under two keys, as in Linux conntrack: the *original* tuple (what the client
//! sent: client -> service address) and the *reply* tuple (what the backend sends back:
//! backend -> client, or -> the source-NAT address). Translating a packet is then the same
//! operation in both directions: a forward packet is rewritten to the reverse of the reply
//! tuple, a reply packet to the reverse of the original tuple.
//!
//! Layout and invariants:
//! - Flow records live in a slab of fixed capacity, one 128-byte aligned entry (two cache lines)
//!   per flow; free slab indices sit on a free list whose capacity is reserved up front, so
//!   inserting and removing never allocate.
//! - Keys are found through an index of `2^k` buckets, each exactly one 64-byte cache line of
//!   [`WAYS`] slots. A slot holds `slab index + 1` (0 = empty) with the reply-direction flag in
//!   the top bit, and a 16-bit tag from hash bits that bucket selection (mostly) does not use.
//!   The keys themselves are not in the index: a tag match is confirmed against the key stored
//!   in the flow record (its orig or reply tuple, by the direction flag), which the packet needs
//!   anyway. A lookup thus touches one or two bucket lines and the flow's record; a false tag
//!   match (20 tags compared at most: under one lookup in 3,000) costs one more record read.
//! - A live flow always has exactly two slots, one per key; the record remembers where they are,
//!   so removing a flow clears both without hashing. (A key's other candidate bucket is found
//!   by hashing it again, only when both of a new key's buckets are full.)
//! - The record also holds what translating its packets needs, prepared once: per direction
//!   the checksum deltas of the rewrite ([`crate::wire::nat_deltas`]) and the next hop, cached
//!   for one table generation (see `pipeline::known_flow`).
//! - Each key has two candidate buckets (from two halves of one hash). It goes to its first
//!   unless that is full, and then to its second, where its first bucket counts it
//!   (`overflow`, kept in the line's spare bytes; the flow's recorded position is marked, so
//!   removing it finds the count to decrement). A lookup reads the first bucket, and the
//!   second only when the first has no match and a non-zero count. The index is sized for at
//!   most 0.5 load. Measured under churn (test `at_half_load_few_keys_overflow_and_none_is_evicted`
//!   and a run at a million flows): 0.46% of keys overflow at 0.5 load and 0.09% at a million
//!   flows (0.38), and a key that is not there finds a non-zero count 0.56% and 0.15% of the
//!   time. So a key that is not in the table (every new flow, twice: its own key, then its
//!   reply key before the insert) costs one index line instead of two, and a key that is, one
//!   instead of 1.4: choosing the less loaded of the two buckets, as this index did before at
//!   0.8 load, put a third of the keys in their second bucket and needed both lines to
//!   insert or to miss. The index is twice the size for it: 32 MB at a million flows, beside
//!   a 128 MB slab.
//! - When both buckets of a new key are full, a key already there is first moved to its
//!   other candidate bucket if that has room (one cuckoo step), so the table holds its full
//!   capacity without evicting; only if none can move is the oldest flow there evicted.
//! - When the slab is full, the victim is chosen by a clock over the slab (second chance, as
//!   page replacement does it): a hand moves over the entries in order and takes the first
//!   flow that has expired or has had no packet since its first one or since the hand last
//!   passed it; a flow with such a packet loses its mark and is passed over (at most
//!   `CLOCK_SCAN` per insert, then the next flow goes whatever its mark, so the cost stays
//!   bounded). A flow that keeps sending at least once per turn of the hand therefore survives
//!   any flood of new flows, and one-packet flows (scans, spoofed floods) evict each other
//!   first. (Sampling a few flows near the new key instead evicts an active flow with a
//!   probability that grows with the active share of the table, and reads several random
//!   records per insert.) The clock reads consecutive records, which the batch pipeline
//!   prefetches before it needs them. Eviction is counted; the table never grows and never
//!   refuses a new flow, so memory is bounded whatever the traffic.
//! - The index and the slab are allocated on transparent huge pages ([`crate::mem`]): at a
//!   million flows they span about 160 MB, and on 4 KiB pages every random access would also
//!   miss the TLB.
//! - [`Conntrack::prefetch_first_bucket`], [`Conntrack::probe_first`] and
//!   [`Conntrack::probe_second`] let the batch pipeline start the cache misses of a whole
//!   batch before it processes any packet (a key's second bucket is loaded only when its
//!   first has no matching tag);
//!   [`Conntrack::prefetch_clock`] and [`Conntrack::prefetch_evictions`] do the same for
//!   the flows the batch's new flows will evict: their records, then what removing them
//!   writes.
//! - Expiry is lazy (a lookup that finds an expired flow removes it) plus an incremental sweep
//!   ([`Conntrack::gc`]) that the I/O loop runs with a small budget, so connection counts used by
//!   the least-connection schedulers drop back when flows end.
//! - Timeouts follow Linux's `nf_conntrack` defaults and are configurable.
//!
//! The hash is seeded at random per table (foldhash: one folded 64x64->128-bit multiply of the
//! packed tuple with secret seeds, hashbrown's default), so a sender cannot compute colliding
//! tuples to aim at one bucket without knowing the seeds. It is not a keyed cryptographic hash
//! (SipHash costs several times more per packet); what a sender who finds collisions anyway
//! can do is bounded: a full bucket pair evicts (counted), the table never grows.

use crate::traffic::Traffic;
use std::sync::Arc;

use foldhash::fast::SeedableRandomState as RandomState;
use foldhash::SharedSeed;
use serde::{Deserialize, Serialize};
use std::hash::BuildHasher;

use crate::balance::ConnCounts;
use crate::mem::{prefetch, HugeArray, Zeroable};
use crate::tables::{BackendId, ServiceId};
use crate::wire::{nat_deltas_both, tcp_flags, IPPROTO_TCP, IPPROTO_UDP};

/// Slots per bucket (ten 4-byte values and ten 2-byte tags fill one 64-byte line).
pub const WAYS: usize = 10;
/// Most slab entries the eviction hand passes over (clearing their second-chance marks) to
/// find a victim; the next one is taken whatever its mark.
const CLOCK_SCAN: usize = 32;
const REPLY_BIT: u32 = 1 << 31;
/// Largest capacity: slot positions (`bucket << 4 | way`) must fit in 31 bits, the top one
/// being [`IN_SECOND`] (at most `2^26` buckets of the index at this capacity: below).
const MAX_CAPACITY: usize = 1 << 27;
const ALL_WAYS: u32 = (1 << WAYS) - 1;

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
    fn pack(&self) -> u128 {
        // The address pair and the port pair as words, as the packet holds them (so a key
        // just read from a packet as words, `pipeline::tuple`, packs without shuffling).
        let addrs = u64::from(self.src) << 32 | u64::from(self.dst);
        let ports = u32::from(self.sport) << 16 | u32::from(self.dport);
        u128::from(addrs) << 64 | u128::from(ports) << 8 | u128::from(self.proto)
    }
    /// `self == other`, compared as three words (the addresses, the ports, the protocol)
    /// instead of five fields: what the packet path's [`Conntrack::confirm`] uses.
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let addrs = |k: &Self| u64::from(k.src) | u64::from(k.dst) << 32;
        let ports = |k: &Self| u32::from(k.sport) | u32::from(k.dport) << 16;
        addrs(self) == addrs(other) && ports(self) == ports(other) && self.proto == other.proto
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
#[repr(u8)]
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

/// [`Timeouts`] in nanoseconds, indexed by `State as usize`, ICMP's at [`ICMP_SLOT`]: what a
/// packet's expiry update reads (one indexed load).
#[derive(Clone, Copy, Debug)]
struct TimeoutsNs([u64; 10]);

const ICMP_SLOT: usize = 9;

impl TimeoutsNs {
    fn new(t: &Timeouts) -> Self {
        use State::*;
        let mut ns = [0; 10];
        for s in
            [Unreplied, Replied, SynSent, SynRecv, Established, FinWait, LastAck, TimeWait, Close]
        {
            ns[s as usize] = u64::from(t.of(s)) * 1_000_000_000;
        }
        ns[ICMP_SLOT] = u64::from(t.icmp) * 1_000_000_000;
        Self(ns)
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

/// [`Flow::hop`] of a flow whose next hops are not resolved yet.
pub const HOP_UNRESOLVED: u32 = 0;
/// [`Flow::hop`] when the tables have no route for the direction's destination.
pub const HOP_NONE: u32 = u32::MAX;

const FIN_ORIG: u8 = 1;
const FIN_REPLY: u8 = 2;

/// One tracked flow.
///
/// The fields are laid out (`repr(C)`) so that everything eviction and removal read (times,
/// backend, slot positions, liveness) is in the record's first cache line.
#[derive(Clone, Copy, Debug, Serialize)]
#[repr(C)]
pub struct Flow {
    /// Expiry time, ns.
    pub expires: u64,
    /// Last packet time, ns.
    pub last_seen: u64,
    /// Table generation against which the backend was last checked.
    pub generation: u64,
    /// Packets seen, original direction.
    pub packets_orig: u64,
    /// Packets seen, reply direction.
    pub packets_reply: u64,
    /// Service port the flow belongs to (0 for untranslated flows).
    pub service: ServiceId,
    /// Backend chosen (0 for untranslated flows).
    pub backend: BackendId,
    /// Index positions of the orig and reply keys (`bucket << 4 | way`).
    #[serde(skip)]
    slots: [u32; 2],
    /// Connection state.
    pub state: State,
    fins: u8,
    live: bool,
    /// A packet was seen since the flow's first one, or since the eviction hand last passed
    /// it (the second-chance mark of [`Conntrack`]'s clock eviction).
    recent: bool,
    /// The flow is in the shared backend connection counts ([`ConnCounts`]): set when it is
    /// created for a service whose scheduler reads them (the least-connection family,
    /// [`crate::balance::Scheduler::reads_conns`]), so that a flow of any other service (the
    /// common case) touches no count, shared by every worker, when it starts or ends.
    /// Inspection counts live flows per backend from the tables themselves
    /// ([`crate::traffic::backend_totals`]).
    #[serde(skip)]
    pub counted: bool,
    /// Tuple as the client sends it.
    pub orig: FlowKey,
    /// Tuple as the backend sends back.
    pub reply: FlowKey,
    /// Per direction (orig, reply), the checksum deltas of translating a packet of that
    /// direction ([`crate::wire::nat_deltas`]), computed once when the flow is created from
    /// `orig` and `reply`, which therefore never change afterwards (build a new flow instead).
    #[serde(skip)]
    nat: [[u16; 2]; 2],
    /// Per direction, the next hop of the translated packet in the tables of generation
    /// `generation`: [`Routes`](crate::tables::Routes) hop index + 1, [`HOP_UNRESOLVED`] or
    /// [`HOP_NONE`].
    #[serde(skip)]
    hops: [u32; 2],
    /// Bytes (IP datagrams) seen, original direction (per-backend traffic, `crate::traffic`).
    pub bytes_orig: u64,
    /// Bytes seen, reply direction.
    pub bytes_reply: u64,
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
        slots: [0; 2],
        state: State::Unreplied,
        fins: 0,
        live: false,
        recent: false,
        counted: false,
        nat: [[0; 2]; 2],
        hops: [HOP_UNRESOLVED; 2],
        bytes_orig: 0,
        bytes_reply: 0,
    };

    /// A new flow in its initial state for the first packet's TCP flags.
    #[inline]
    pub fn new(
        orig: FlowKey,
        reply: FlowKey,
        service: ServiceId,
        backend: BackendId,
        generation: u64,
    ) -> Self {
        // A packet of one direction is rewritten to the reverse of the other's tuple.
        let tuple = |k: &FlowKey| (k.src, k.dst, k.sport, k.dport);
        let nat = nat_deltas_both(tuple(&orig), tuple(&reply));
        Flow { orig, reply, service, backend, generation, live: true, nat, ..Flow::EMPTY }
    }

    /// This flow, counted in the backend connection counts or not ([`Flow::counted`]).
    #[inline(always)]
    pub fn with_count(mut self, counted: bool) -> Self {
        self.counted = counted;
        self
    }

    /// The tuple a packet of direction `dir` is rewritten to (the reverse of the other
    /// direction's), and the checksum deltas of that rewrite ([`crate::wire::nat_apply`]).
    #[inline(always)]
    pub fn nat(&self, dir: Dir) -> (FlowKey, [u16; 2]) {
        match dir {
            Dir::Orig => (self.reply.reversed(), self.nat[0]),
            Dir::Reply => (self.orig.reversed(), self.nat[1]),
        }
    }

    /// The cached next hop of direction `dir` ([`Flow::set_hops`]).
    #[inline(always)]
    pub fn hop(&self, dir: Dir) -> u32 {
        self.hops[dir as usize]
    }

    /// Caches the next hops of both directions for the tables of `generation` (values as
    /// [`Flow::hop`] returns them: a route's hop index + 1, or [`HOP_NONE`]).
    #[inline]
    pub fn set_hops(&mut self, generation: u64, hops: [u32; 2]) {
        self.generation = generation;
        self.hops = hops;
    }

    /// Advances the state machine for one packet and refreshes the expiry.
    #[inline(always)]
    pub fn on_packet(&mut self, dir: Dir, flags: u8, now: u64, t: &Timeouts) {
        self.on_packet_ns(dir, flags, now, &TimeoutsNs::new(t));
    }

    #[inline(always)]
    fn on_packet_ns(&mut self, dir: Dir, flags: u8, now: u64, t: &TimeoutsNs) {
        self.last_seen = now;
        self.recent = true;
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
        let slot = if self.orig.proto == IPPROTO_TCP || self.orig.proto == IPPROTO_UDP {
            self.state as usize
        } else {
            ICMP_SLOT
        };
        self.expires = now + t.0[slot];
    }

    #[inline(always)]
    fn count_bytes(&mut self, dir: Dir, bytes: usize) {
        match dir {
            Dir::Orig => self.bytes_orig += bytes as u64,
            Dir::Reply => self.bytes_reply += bytes as u64,
        }
    }

    #[inline(never)]
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

/// One index bucket: a single cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket {
    /// `slab index + 1` (0 = empty), with [`REPLY_BIT`] for a reply-direction key.
    vals: [u32; WAYS],
    /// Tag of each slot's key, 0 when empty (a key's tag is never 0).
    tags: [u16; WAYS],
    /// Keys whose first bucket this is that sit in their second one: while 0, a key not found
    /// here is not in the table, and its second bucket is not read. Saturates at `u16::MAX`,
    /// and then stays there (a lookup reads the second bucket: slower, still right).
    overflow: u16,
    _pad: u16,
}

// SAFETY: all fields are integers; all-zero is an empty bucket.
unsafe impl Zeroable for Bucket {}

/// A slab entry: a flow record on its own pair of cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(128))]
struct Entry(Flow);

// SAFETY: every field of `Flow` is an integer, a bool, an array or struct of integers, or
// `State`, whose variant 0 (`Unreplied`, checked below) is valid; all-zero is `Flow::EMPTY`.
unsafe impl Zeroable for Entry {}

/// Where a bucket's tags start: they and the two `u16`s after them are its last 24 bytes.
const TAGS_AT: usize = std::mem::offset_of!(Bucket, tags);

const _: () = {
    // The largest index's slot positions stay clear of `IN_SECOND`.
    assert!((index_buckets(MAX_CAPACITY) << 4) <= IN_SECOND as usize);
    assert!(std::mem::size_of::<Bucket>() == 64);
    assert!(TAGS_AT + 24 == 64 && std::mem::offset_of!(Bucket, overflow) == TAGS_AT + 2 * WAYS);
    assert!(std::mem::size_of::<Entry>() == 128);
    assert!(State::Unreplied as u8 == 0);
    // What eviction and removal read sits in the record's first line.
    assert!(std::mem::offset_of!(Flow, live) < 64);
    assert!(std::mem::offset_of!(Flow, slots) + 8 <= 64);
};

impl Bucket {
    /// Ways whose tag equals `tag`, a bit per way (empty ways never match a key's tag).
    #[inline(always)]
    fn matching(&self, tag: u16) -> u32 {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            // SAFETY: SSE2 is part of the x86-64 baseline, so the intrinsics are available. The
            // loads read the bucket's last 24 bytes (`tags`, `overflow`, `_pad`: 16 from the
            // start of `tags`, 8 from 16 bytes on), integers all, inside `self` (`repr(C)`, 64
            // bytes, checked below); unaligned loads are allowed. Lanes 10 and 11 (`overflow`,
            // `_pad`) are masked off.
            unsafe {
                let p = std::ptr::from_ref(self).cast::<u8>().add(TAGS_AT).cast::<u16>();
                let lo = _mm_loadu_si128(p.cast());
                let hi = _mm_loadl_epi64(p.add(8).cast());
                let t = _mm_set1_epi16(tag as i16);
                // 16-bit lanes equal -> -1, packed to one byte per way (ways 10.. are 0).
                let eq = _mm_packs_epi16(_mm_cmpeq_epi16(lo, t), _mm_cmpeq_epi16(hi, t));
                _mm_movemask_epi8(eq) as u32 & ALL_WAYS
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let mut m = 0;
            for w in 0..WAYS {
                m |= u32::from(self.tags[w] == tag) << w;
            }
            m
        }
    }

    /// One byte per way, -1 where the way is empty, 0 where occupied; bytes 10 and 11 are -1
    /// too (ways that do not exist: callers mask them off), 12 to 15 are 0.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn empty_bytes(&self) -> core::arch::x86_64::__m128i {
        use core::arch::x86_64::*;
        // SAFETY: SSE2 is part of the x86-64 baseline. The loads read inside `self.vals` (40
        // bytes: 16 at 0, 16 at 16, 8 at 32); unaligned loads are allowed.
        unsafe {
            let p = self.vals.as_ptr();
            let z = _mm_setzero_si128();
            let a = _mm_cmpeq_epi32(_mm_loadu_si128(p.cast()), z);
            let b = _mm_cmpeq_epi32(_mm_loadu_si128(p.add(4).cast()), z);
            // Ways 8 and 9; the upper half loads as zero (so compares as empty).
            let c = _mm_cmpeq_epi32(_mm_loadl_epi64(p.add(8).cast()), z);
            _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, z))
        }
    }

    /// Occupied ways, a bit per way.
    #[inline(always)]
    fn occupied(&self) -> u32 {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            // SAFETY: SSE2 is part of the x86-64 baseline.
            !(unsafe { _mm_movemask_epi8(self.empty_bytes()) } as u32) & ALL_WAYS
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let mut m = 0;
            for w in 0..WAYS {
                m |= u32::from(self.vals[w] != 0) << w;
            }
            m
        }
    }

    #[inline(always)]
    fn free(&self) -> u32 {
        !self.occupied() & ALL_WAYS
    }
}

/// The index tag of a hash: bits 16..32 folded with 48..64, which bucket selection (bits 0..k
/// and 32..32+k) leaves alone for tables of up to 2^16 buckets and mixes in beyond. Never 0,
/// the tag of an empty way.
#[inline(always)]
fn tag_of(h: u64) -> u16 {
    (((h >> 16) ^ (h >> 48)) as u16).max(1)
}

#[inline(always)]
fn slot_pos(bucket: usize, way: usize) -> u32 {
    ((bucket as u32) << 4) | way as u32
}

/// In a flow's recorded slot position: the key sits in its second bucket (so its first
/// bucket counts it in `overflow`).
const IN_SECOND: u32 = 1 << 31;

/// The bucket of a recorded slot position.
#[inline(always)]
fn pos_bucket(pos: u32) -> usize {
    ((pos & !IN_SECOND) >> 4) as usize
}

/// The way of a recorded slot position.
#[inline(always)]
fn pos_way(pos: u32) -> usize {
    (pos & 0xf) as usize
}

/// Index buckets for `capacity` flows: two keys per flow at a load factor of at most 0.5
/// (module docs: what makes a lookup of a key that is not there read one line).
const fn index_buckets(capacity: usize) -> usize {
    let b = (capacity * 2 * 2).div_ceil(WAYS).next_power_of_two();
    if b < 8 {
        8
    } else {
        b
    }
}

#[inline(always)]
fn slab_index(v: u32) -> u32 {
    (v & !REPLY_BIT) - 1
}

/// A per-worker connection table.
pub struct Conntrack {
    index: HugeArray<Bucket>,
    bucket_mask: usize,
    flows: HugeArray<Entry>,
    free: Vec<u32>,
    hasher: RandomState,
    conns: Arc<ConnCounts>,
    timeouts: Timeouts,
    timeouts_ns: TimeoutsNs,
    gc_cursor: usize,
    hand: usize,
    len: usize,
    stats: CtStats,
    retired: Traffic,
}

impl Conntrack {
    /// A table for `capacity` flows (at least 16, at most 2^27). Backend connection counts are
    /// kept in `conns`: incremented on insert, decremented when a flow leaves.
    pub fn new(capacity: usize, timeouts: Timeouts, conns: Arc<ConnCounts>) -> Self {
        Self::with_hasher(capacity, timeouts, conns, RandomState::random())
    }

    /// [`Conntrack::new`] with a fixed hash seed, for tests that compare two tables: the
    /// bucket layout and the flow hash (so random and Maglev picks) are then the same in both.
    /// A fixed seed lets a sender aim collisions; the packet path uses [`Conntrack::new`].
    pub fn with_seed(
        capacity: usize,
        timeouts: Timeouts,
        conns: Arc<ConnCounts>,
        seed: u64,
    ) -> Self {
        Self::with_hasher(
            capacity,
            timeouts,
            conns,
            RandomState::with_seed(seed, SharedSeed::global_fixed()),
        )
    }

    /// [`Conntrack::with_seed`] over `buckets` index buckets (a power of two, at least
    /// `capacity / 5`) instead of the sized number: a crowded index, for tests of the paths
    /// that keys in their second bucket take.
    #[cfg(test)]
    pub(crate) fn crowded(
        capacity: usize,
        buckets: usize,
        conns: Arc<ConnCounts>,
        seed: u64,
    ) -> Self {
        let hasher = RandomState::with_seed(seed, SharedSeed::global_fixed());
        Self::with_layout(capacity, buckets, Timeouts::default(), conns, hasher)
    }

    /// Keys now in their second bucket (tests).
    #[cfg(test)]
    pub(crate) fn keys_in_second(&self) -> usize {
        self.iter().flat_map(|f| f.slots).filter(|s| s & IN_SECOND != 0).count()
    }

    fn with_hasher(
        capacity: usize,
        timeouts: Timeouts,
        conns: Arc<ConnCounts>,
        hasher: RandomState,
    ) -> Self {
        let capacity = capacity.clamp(16, MAX_CAPACITY);
        Self::with_layout(capacity, index_buckets(capacity), timeouts, conns, hasher)
    }

    /// A table of `capacity` flows (in range) over `buckets` index buckets (a power of two,
    /// enough for `2 * capacity` keys).
    fn with_layout(
        capacity: usize,
        buckets: usize,
        timeouts: Timeouts,
        conns: Arc<ConnCounts>,
        hasher: RandomState,
    ) -> Self {
        debug_assert!(buckets.is_power_of_two() && buckets * WAYS >= 2 * capacity);
        let conns_capacity = conns.capacity();
        let mut free: Vec<u32> = Vec::with_capacity(capacity);
        free.extend((0..capacity as u32).rev());
        Self {
            index: HugeArray::zeroed(buckets),
            bucket_mask: buckets - 1,
            flows: HugeArray::zeroed(capacity),
            free,
            hasher,
            conns,
            timeouts_ns: TimeoutsNs::new(&timeouts),
            timeouts,
            gc_cursor: 0,
            hand: 0,
            len: 0,
            stats: CtStats::default(),
            retired: Traffic::new(conns_capacity),
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

    /// The two candidate buckets of a hash.
    #[inline(always)]
    fn buckets(&self, h: u64) -> [usize; 2] {
        [h as usize & self.bucket_mask, (h >> 32) as usize & self.bucket_mask]
    }

    /// Bucket `b` of the index, `b` from [`Conntrack::buckets`] (so in range): the lookup
    /// path's index reads, without a bounds check.
    #[inline(always)]
    fn bucket(&self, b: usize) -> &Bucket {
        debug_assert!(b <= self.bucket_mask && self.bucket_mask < self.index.len());
        // SAFETY: `b` is a hash masked with `bucket_mask`, and the index has exactly
        // `bucket_mask + 1` buckets (set in `new`, never resized).
        unsafe { self.index.get_unchecked(b) }
    }

    /// [`Conntrack::bucket`], mutable.
    #[inline(always)]
    fn bucket_mut(&mut self, b: usize) -> &mut Bucket {
        debug_assert!(b <= self.bucket_mask && self.bucket_mask < self.index.len());
        // SAFETY: as in `bucket`: `b` is in range.
        unsafe { self.index.get_unchecked_mut(b) }
    }

    /// Starts loading the first of the two index lines of hash `h`, where a lookup looks
    /// first and almost every key is, and which alone says whether the key may be in the
    /// second (first pass over a batch; [`Conntrack::probe_first`] follows; also what a new
    /// flow's reply key needs before [`Conntrack::holds`] and the insert).
    #[inline(always)]
    pub fn prefetch_first_bucket(&self, h: u64) {
        prefetch(self.index.as_ptr().wrapping_add(self.buckets(h)[0]));
    }

    /// Second pass over a batch, after [`Conntrack::prefetch_first_bucket`]: looks for the tag
    /// of hash `h` in its first bucket and starts loading the flow records whose tags match
    /// there (normally just the key's own flow). Returns the index slot value of the first
    /// match ([`Conntrack::confirm`] checks it); with no match, returns 0 and, if keys of this
    /// first bucket overflowed into their second (rare), starts loading the key's second
    /// bucket; [`Conntrack::probe_second`] follows in a later pass. A match in the first
    /// bucket ends the search, as it ends the lookup (a false tag match there, under one
    /// lookup in 3,000, leaves the real record for the lookup to load).
    #[inline(always)]
    pub fn probe_first(&self, h: u64) -> u32 {
        let [b0, b1] = self.buckets(h);
        let hit = self.probe_bucket(b0, tag_of(h));
        if hit == 0 && self.may_overflow(b0, b1) {
            prefetch(self.index.as_ptr().wrapping_add(b1));
        }
        hit
    }

    /// [`Conntrack::probe_first`] in the second bucket, for a key whose first bucket had no
    /// matching tag: 0 at once if no key of that first bucket overflowed (its line is in
    /// cache). Returns 0 when no tag matched there either: the key is then certainly not in
    /// the table.
    #[inline(always)]
    pub fn probe_second(&self, h: u64) -> u32 {
        let [b0, b1] = self.buckets(h);
        if !self.may_overflow(b0, b1) {
            return 0;
        }
        self.probe_bucket(b1, tag_of(h))
    }

    /// Whether a key whose buckets are `b0` (first) and `b1` may sit in `b1`.
    #[inline(always)]
    fn may_overflow(&self, b0: usize, b1: usize) -> bool {
        b0 != b1 && self.bucket(b0).overflow != 0
    }

    /// Bucket `b`'s first way whose tag is `tag` (0 if none), with the records of every match
    /// prefetched.
    #[inline(always)]
    fn probe_bucket(&self, b: usize, tag: u16) -> u32 {
        let base = self.flows.as_ptr();
        let fetch = |v: u32| {
            let e = base.wrapping_add(slab_index(v) as usize);
            prefetch(e);
            prefetch(e.cast::<u8>().wrapping_add(64));
        };
        let bk = self.bucket(b);
        let m = bk.matching(tag);
        if m == 0 {
            return 0;
        }
        // The first match (occupied: a key's tag is never an empty way's 0), then any others
        // (false matches, rare).
        let hit = bk.vals[m.trailing_zeros() as usize];
        fetch(hit);
        let mut rest = m & (m - 1);
        while rest != 0 {
            fetch(bk.vals[rest.trailing_zeros() as usize]);
            rest &= rest - 1;
        }
        hit
    }

    /// The live, unexpired flow that index slot value `slot` (from [`Conntrack::probe_first`],
    /// earlier in the same batch) points at, if it holds `key` in that slot's direction: what
    /// a lookup would find (without removing an expired flow), without searching the buckets
    /// again. A key is in
    /// the table at most once, so a live record holding it is its flow even if the slot was
    /// reused since. `None` (a false tag match, or the flow changed since) says nothing:
    /// search with [`Conntrack::lookup_hashed`].
    #[inline(always)]
    pub fn confirm(&self, slot: u32, key: &FlowKey, now: u64) -> Option<(u32, Dir)> {
        let idx = slab_index(slot);
        let f = &self.flows.get(idx as usize)?.0;
        let (held, dir) =
            if slot & REPLY_BIT == 0 { (&f.orig, Dir::Orig) } else { (&f.reply, Dir::Reply) };
        (f.live && held.same(key) && f.expires > now).then_some((idx, dir))
    }

    /// How many of the next `inserts` inserts evict (the free list serves the others).
    #[inline(always)]
    fn evictions(&self, inserts: usize) -> usize {
        inserts.saturating_sub(self.free.len())
    }

    /// Starts loading the slab entries the evictions of the next `inserts` inserts examine:
    /// those from the clock hand on (a few more than needed, for flows the hand passes over),
    /// both lines of each, since the new flow rewrites the whole record. Consecutive entries,
    /// so the loads overlap. The first step for a batch's new flows, once they are known
    /// ([`Conntrack::probe_second`] returned 0).
    #[inline(always)]
    pub fn prefetch_clock(&self, inserts: usize) {
        let k = self.evictions(inserts);
        if k == 0 {
            return;
        }
        let n = self.flows.len();
        let base = self.flows.as_ptr();
        let mut i = self.hand;
        for _ in 0..(k + k / 4 + 2).min(n) {
            let e = base.wrapping_add(i);
            prefetch(e);
            prefetch(e.cast::<u8>().wrapping_add(64));
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// The second step, once [`Conntrack::prefetch_clock`]'s lines have had time to arrive:
    /// for each flow the next `inserts` inserts will evict (as `Conntrack::clock_victim`
    /// would choose them now; packets in between may change that, which only costs a miss),
    /// starts loading what removing it writes: the index lines of its two keys, its backend's
    /// retired-traffic counters and connection count.
    #[inline(always)]
    pub fn prefetch_evictions(&self, inserts: usize, now: u64) {
        let base = self.index.as_ptr();
        self.next_victims(inserts, now, |f| {
            // (A key in its second bucket also decrements its first's `overflow`: rare, not
            // prefetched.)
            for s in f.slots {
                prefetch(base.wrapping_add(pos_bucket(s)));
            }
            if f.backend != 0 {
                self.retired.prefetch(f.backend);
                if f.counted {
                    self.conns.prefetch(f.backend);
                }
            }
        });
    }

    /// Calls `f` with each flow the next `inserts` inserts would evict, in order, if nothing
    /// changed in between: [`Conntrack::clock_victim`]'s walk, without clearing marks, reading
    /// at most one scan's worth of passed-over entries in all.
    #[inline(always)]
    fn next_victims(&self, inserts: usize, now: u64, mut f: impl FnMut(&Flow)) {
        let mut k = self.evictions(inserts);
        let n = self.flows.len();
        let mut i = self.hand;
        let mut budget = k + CLOCK_SCAN;
        let mut passed = 0;
        while k > 0 && budget > 0 {
            budget -= 1;
            let fl = &self.flows[i].0;
            i = if i + 1 == n { 0 } else { i + 1 };
            if fl.recent && fl.expires > now && passed < CLOCK_SCAN {
                passed += 1;
                continue;
            }
            passed = 0;
            k -= 1;
            f(fl);
        }
    }

    /// Finds a live flow by either of its keys. An expired flow found here is removed.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u64) -> Option<(u32, Dir)> {
        let h = self.hash(key);
        self.lookup_hashed(key, h, now)
    }

    /// [`Conntrack::lookup`] with the key's hash already computed.
    #[inline(always)]
    pub fn lookup_hashed(&mut self, key: &FlowKey, h: u64, now: u64) -> Option<(u32, Dir)> {
        let (idx, dir) = self.find(key, h)?;
        if self.flows[idx as usize].0.expires <= now {
            self.expire(idx);
            return None;
        }
        Some((idx, dir))
    }

    #[cold]
    #[inline(never)]
    fn expire(&mut self, idx: u32) {
        self.remove_inner(idx);
        self.stats.expired += 1;
    }

    /// Whether a key is in use by a live (unexpired) flow.
    pub fn contains(&mut self, key: &FlowKey, now: u64) -> bool {
        self.lookup(key, now).is_some()
    }

    /// The flow holding `key` (hash `h`): its first bucket, then its second only if a key
    /// of that first bucket overflowed there.
    #[inline(always)]
    fn find(&self, key: &FlowKey, h: u64) -> Option<(u32, Dir)> {
        let [b0, b1] = self.buckets(h);
        let tag = tag_of(h);
        match self.find_in(b0, key, tag) {
            None if self.may_overflow(b0, b1) => self.find_in(b1, key, tag),
            found => found,
        }
    }

    /// The flow holding `key` (tag `tag`) in bucket `b`.
    #[inline(always)]
    fn find_in(&self, b: usize, key: &FlowKey, tag: u16) -> Option<(u32, Dir)> {
        let bk = self.bucket(b);
        let mut m = bk.matching(tag);
        while m != 0 {
            let w = m.trailing_zeros() as usize;
            m &= m - 1;
            let v = bk.vals[w];
            let idx = slab_index(v);
            let f = &self.flows[idx as usize].0;
            if v & REPLY_BIT == 0 {
                if f.orig == *key {
                    return Some((idx, Dir::Orig));
                }
            } else if f.reply == *key {
                return Some((idx, Dir::Reply));
            }
        }
        None
    }

    /// Whether key `key` (hash `h`) is in the index, for a live flow or an expired one not yet
    /// removed: [`Conntrack::lookup_hashed`] without its side effect (removing an expired
    /// flow found), for a caller that leaves every found key to the general path.
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey, h: u64) -> bool {
        self.find(key, h).is_some()
    }

    /// A flow by slab index.
    #[inline(always)]
    pub fn flow(&self, idx: u32) -> &Flow {
        &self.flows[idx as usize].0
    }
    /// A flow by slab index, mutable.
    #[inline(always)]
    pub fn flow_mut(&mut self, idx: u32) -> &mut Flow {
        &mut self.flows[idx as usize].0
    }
    /// Updates a flow's state for a packet.
    #[inline(always)]
    pub fn on_packet(&mut self, idx: u32, dir: Dir, flags: u8, now: u64) {
        let Self { flows, timeouts_ns, .. } = self;
        flows[idx as usize].0.on_packet_ns(dir, flags, now, timeouts_ns);
    }

    /// [`Conntrack::on_packet`] and the packet's bytes (see [`crate::traffic`]) in one (one slab access, for the
    /// packet path); returns the flow.
    #[inline(always)]
    pub fn account(&mut self, idx: u32, dir: Dir, flags: u8, now: u64, bytes: usize) -> &Flow {
        let Self { flows, timeouts_ns, .. } = self;
        let f = &mut flows[idx as usize].0;
        f.on_packet_ns(dir, flags, now, timeouts_ns);
        f.count_bytes(dir, bytes);
        f
    }

    /// Traffic of the flows removed so far, by backend (see [`crate::traffic`]).
    pub fn retired(&self) -> &Traffic {
        &self.retired
    }

    /// Inserts a new flow (its keys must not be in use: check with [`Conntrack::contains`]),
    /// evicting the oldest flows where its buckets or the slab are full. The flow's first
    /// packet is accounted. Returns its slab index.
    pub fn insert(&mut self, flow: Flow, flags: u8, now: u64) -> u32 {
        let (ho, hr) = (self.hash(&flow.orig), self.hash(&flow.reply));
        self.insert_hashed(flow, ho, hr, flags, now)
    }

    /// [`Conntrack::insert`] with the hashes of the flow's orig and reply keys already computed.
    pub fn insert_hashed(
        &mut self,
        flow: Flow,
        h_orig: u64,
        h_reply: u64,
        flags: u8,
        now: u64,
    ) -> u32 {
        self.insert_packet(flow, h_orig, h_reply, flags, now, 0)
    }

    /// [`Conntrack::insert_hashed`] for the packet path: the first packet's `bytes` (its IP
    /// datagram) are counted too, in the same write of the record.
    #[inline]
    pub fn insert_packet(
        &mut self,
        flow: Flow,
        h_orig: u64,
        h_reply: u64,
        flags: u8,
        now: u64,
        bytes: usize,
    ) -> u32 {
        self.insert_with(h_orig, h_reply, flags, now, bytes, |f| {
            *f = flow;
            f.live = true;
            f.fins = 0;
            f.packets_orig = 0;
            f.packets_reply = 0;
        })
    }

    /// A new flow for its first packet, written straight into its slab entry (no record built
    /// elsewhere and copied): [`Flow::new`]`(orig, reply, service, backend, generation)` with
    /// next hops `hops` ([`Flow::set_hops`]), inserted as [`Conntrack::insert_packet`] inserts
    /// it, first packet (`flags`, `bytes`) counted. The keys must not be in use (the new-flow
    /// fast path of the batch pipeline checks both with [`Conntrack::holds`]). Returns the
    /// flow's slab index. The flow is not in the connection counts ([`Flow::counted`]): the
    /// fast path creates flows only for schedulers that do not read them.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn insert_new(
        &mut self,
        (orig, h_orig): (FlowKey, u64),
        (reply, h_reply): (FlowKey, u64),
        (service, backend): (ServiceId, BackendId),
        generation: u64,
        hops: [u32; 2],
        flags: u8,
        now: u64,
        bytes: usize,
    ) -> u32 {
        self.insert_with(h_orig, h_reply, flags, now, bytes, |f| {
            *f = Flow::new(orig, reply, service, backend, generation);
            f.hops = hops;
        })
    }

    /// Takes a slab entry (evicting by the clock when none is free), lets `init` write the
    /// flow into it (every field but the first packet's accounting: `packets_*` 0, `live`),
    /// accounts the first packet and indexes both keys.
    #[inline(always)]
    fn insert_with(
        &mut self,
        h_orig: u64,
        h_reply: u64,
        flags: u8,
        now: u64,
        bytes: usize,
        init: impl FnOnce(&mut Flow),
    ) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => self.evict_next(now),
        };
        let Self { flows, timeouts_ns, .. } = self;
        let f = &mut flows[idx as usize].0;
        init(f);
        f.on_packet_ns(Dir::Orig, flags, now, timeouts_ns);
        // A flow earns its second chance with a later packet, not its first: a flood of
        // one-packet flows then evicts its own kind before any flow in use.
        f.recent = false;
        f.count_bytes(Dir::Orig, bytes);
        let (backend, counted) = (f.backend, f.counted);
        self.place(h_orig, idx + 1, now);
        self.place(h_reply, (idx + 1) | REPLY_BIT, now);
        if counted && backend != 0 {
            self.conns.inc(backend);
        }
        self.len += 1;
        self.stats.inserted += 1;
        idx
    }

    /// The slab is full: evicts the clock's victim ([`Conntrack::clock_victim`]) and returns
    /// its entry, now free, for the insert to reuse (not put on the free list).
    #[inline]
    fn evict_next(&mut self, now: u64) -> u32 {
        let idx = self.clock_victim(now);
        self.count_eviction(idx, now);
        self.unlink(idx);
        idx
    }

    /// Puts index value `val` (of a flow whose record is already in the slab) into a free way
    /// of its key's first bucket, else of its second (counted in the first's `overflow`),
    /// making room if both are full, and records the position in the flow. The second bucket
    /// is read only when the first is full.
    #[inline(always)]
    fn place(&mut self, h: u64, val: u32, now: u64) {
        let [b0, b1] = self.buckets(h);
        let f0 = self.bucket(b0).free();
        let (b, free) = if f0 != 0 {
            (b0, f0)
        } else {
            let f1 = if b1 != b0 { self.bucket(b1).free() } else { 0 };
            if f1 != 0 {
                (b1, f1)
            } else {
                let b = self.make_room(b0, b1, slab_index(val), now);
                (b, self.index[b].free())
            }
        };
        self.put(b, free, val, tag_of(h), (b != b0).then_some(b0));
    }

    /// Writes `val` into a free way of bucket `b` (`free` is its mask of free ways, not empty)
    /// and records the position in the flow; `first` is the key's first bucket when `b` is
    /// its second (whose `overflow` then counts it).
    #[inline(always)]
    fn put(&mut self, b: usize, free: u32, val: u32, tag: u16, first: Option<usize>) {
        let w = free.trailing_zeros() as usize;
        let bk = self.bucket_mut(b);
        bk.vals[w] = val;
        bk.tags[w] = tag;
        let mut pos = slot_pos(b, w);
        if let Some(b0) = first {
            pos |= IN_SECOND;
            let o = &mut self.bucket_mut(b0).overflow;
            *o = o.saturating_add(1);
        }
        let d = usize::from(val & REPLY_BIT != 0);
        self.flows[slab_index(val) as usize].0.slots[d] = pos;
    }

    /// A key of first bucket `b0` left its second bucket.
    #[inline(always)]
    fn overflow_left(&mut self, b0: usize) {
        let o = &mut self.bucket_mut(b0).overflow;
        // Saturated: stays (it may count keys that are gone, never too few).
        if *o != u16::MAX {
            debug_assert!(*o > 0, "a key in its second bucket is counted in its first");
            *o = o.saturating_sub(1);
        }
    }

    /// The candidate bucket of index value `v` (sitting in bucket `b`) other than `b`: its key
    /// hashed again (the records have no room to remember it; only [`Conntrack::make_room`],
    /// which is rare, needs it).
    fn other_bucket(&self, v: u32, b: usize) -> usize {
        let f = &self.flows[slab_index(v) as usize].0;
        let key = if v & REPLY_BIT == 0 { &f.orig } else { &f.reply };
        let [b0, b1] = self.buckets(self.hash(key));
        if b0 == b {
            b1
        } else {
            b0
        }
    }

    /// Both buckets of a new key are full: moves a key from one of them to its other candidate
    /// bucket if one has room, else evicts the oldest flow there other than `own`. Returns the
    /// bucket that now has a free way. Rare: the index is sized for at most 0.5 load, where
    /// under 0.5% of keys even leave their first bucket.
    #[cold]
    fn make_room(&mut self, b0: usize, b1: usize, own: u32, now: u64) -> usize {
        for b in [b0, b1] {
            for w in 0..WAYS {
                let v = self.index[b].vals[w];
                let alt = self.other_bucket(v, b);
                let free = self.index[alt].free();
                if alt != b && free != 0 {
                    let tag = self.index[b].tags[w];
                    let bk = &mut self.index[b];
                    bk.vals[w] = 0;
                    bk.tags[w] = 0;
                    let d = usize::from(v & REPLY_BIT != 0);
                    if self.flows[slab_index(v) as usize].0.slots[d] & IN_SECOND != 0 {
                        // Back to its first bucket, `alt`.
                        self.put(alt, free, v, tag, None);
                        self.overflow_left(alt);
                    } else {
                        // From its first bucket, `b`, to its second.
                        self.put(alt, free, v, tag, Some(b));
                    }
                    return b;
                }
            }
        }
        let mut victim: Option<(u64, u32)> = None;
        for b in [b0, b1] {
            for w in 0..WAYS {
                let fi = slab_index(self.index[b].vals[w]);
                if fi == own {
                    continue;
                }
                let age = self.age(fi, now);
                if victim.is_none_or(|(a, _)| age < a) {
                    victim = Some((age, fi));
                }
            }
        }
        let (_, fi) = victim.expect("two full buckets hold at least one other flow");
        self.evict(fi, now);
        if self.index[b0].free() != 0 {
            b0
        } else {
            debug_assert!(self.index[b1].free() != 0, "eviction freed a way in these buckets");
            b1
        }
    }

    /// Eviction order: expired flows first, then by last packet, oldest first.
    #[inline(always)]
    fn age(&self, fi: u32, now: u64) -> u64 {
        let f = &self.flows[fi as usize].0;
        if f.expires <= now {
            0
        } else {
            f.last_seen.saturating_add(1)
        }
    }

    /// The slab is full: the flow the next insert evicts, by the clock (second chance). The
    /// hand moves over the slab in order; an expired flow, or one with no packet since its
    /// first or since the hand last passed it, is the victim; a recently active one loses its
    /// mark and is passed over, at most [`CLOCK_SCAN`] of them, after which the next flow is
    /// taken whatever its mark (so an insert's cost is bounded even when every flow is
    /// active).
    #[inline]
    fn clock_victim(&mut self, now: u64) -> u32 {
        let n = self.flows.len();
        let mut passed = 0;
        loop {
            let i = self.hand;
            self.hand = if i + 1 == n { 0 } else { i + 1 };
            let f = &mut self.flows[i].0;
            debug_assert!(f.live, "the slab is full");
            if f.recent && f.expires > now && passed < CLOCK_SCAN {
                f.recent = false;
                passed += 1;
                continue;
            }
            return i as u32;
        }
    }

    fn evict(&mut self, idx: u32, now: u64) {
        self.count_eviction(idx, now);
        self.remove_inner(idx);
    }

    /// Counts the eviction of live flow `idx`: as expired if it was, else as evicted.
    #[inline(always)]
    fn count_eviction(&mut self, idx: u32, now: u64) {
        if self.flows[idx as usize].0.expires <= now {
            self.stats.expired += 1;
        } else {
            self.stats.evicted += 1;
        }
    }

    /// Removes a flow (backend gone, flush, close).
    pub fn remove(&mut self, idx: u32) {
        if self.flows.get(idx as usize).is_some_and(|e| e.0.live) {
            self.remove_inner(idx);
            self.stats.removed += 1;
        }
    }

    fn remove_inner(&mut self, idx: u32) {
        self.unlink(idx);
        self.free.push(idx);
    }

    /// Takes live flow `idx` out of the index and the counts; its slab entry is then unused
    /// but not on the free list (the caller puts it there, or reuses it at once).
    #[inline(always)]
    fn unlink(&mut self, idx: u32) {
        let f = &mut self.flows[idx as usize].0;
        debug_assert!(f.live);
        f.live = false;
        let (slots, backend, counted) = (f.slots, f.backend, f.counted);
        if backend != 0 {
            // The flow's traffic stays in its backend's totals (one more line read, per flow).
            self.retired.retire(backend, f);
        }
        for (d, s) in slots.into_iter().enumerate() {
            let want = (idx + 1) | if d == 1 { REPLY_BIT } else { 0 };
            let (b, w) = (pos_bucket(s), pos_way(s));
            let bk = &mut self.index[b];
            debug_assert_eq!(bk.vals[w], want, "a flow's recorded slot holds it");
            // Blind stores: the line is often not in cache, and a store miss does not stall.
            bk.vals[w] = 0;
            bk.tags[w] = 0;
            if s & IN_SECOND != 0 {
                // Rare (under 0.5% of keys): hash the key again for its first bucket.
                let f = &self.flows[idx as usize].0;
                let h = self.hash(if d == 0 { &f.orig } else { &f.reply });
                self.overflow_left(self.buckets(h)[0]);
            }
        }
        if counted && backend != 0 {
            self.conns.dec(backend);
        }
        self.len -= 1;
    }

    /// Sweeps up to `budget` slab entries for expired flows; returns how many were removed.
    pub fn gc(&mut self, now: u64, budget: usize) -> usize {
        let n = self.flows.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let i = self.gc_cursor;
            self.gc_cursor = (self.gc_cursor + 1) % n;
            let f = &self.flows[i].0;
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
            if self.flows[i].0.live && pred(&self.flows[i].0) {
                self.remove_inner(i as u32);
                self.stats.removed += 1;
                n += 1;
            }
        }
        n
    }

    /// Every live flow (for inspection; not for the hot path).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter().map(|e| &e.0).filter(|f| f.live)
    }

    /// Checks every invariant of the index and the slab (tests only: reads the whole table).
    #[cfg(test)]
    fn check(&self) {
        let mut keys = 0;
        let mut overflow = vec![0u32; self.index.len()];
        for b in 0..self.index.len() {
            let bk = &self.index[b];
            assert_eq!(bk._pad, 0, "padding");
            for w in 0..WAYS {
                let v = bk.vals[w];
                if v == 0 {
                    assert_eq!(bk.tags[w], 0, "an empty way has no tag");
                    continue;
                }
                keys += 1;
                let f = &self.flows[slab_index(v) as usize].0;
                assert!(f.live, "the index points at live flows only");
                let d = usize::from(v & REPLY_BIT != 0);
                let pos = f.slots[d];
                assert_eq!(pos & !IN_SECOND, slot_pos(b, w), "the flow knows where its key is");
                let h = self.hash(if d == 0 { &f.orig } else { &f.reply });
                assert_eq!(bk.tags[w], tag_of(h));
                let [b0, b1] = self.buckets(h);
                if pos & IN_SECOND == 0 {
                    assert_eq!(b, b0, "a key not marked is in its first bucket");
                } else {
                    assert!(b == b1 && b1 != b0, "a key marked is in its second bucket");
                    overflow[b0] += 1;
                }
                let alt = self.other_bucket(v, b);
                assert!([b0, b1] == [b, alt] || [b0, b1] == [alt, b]);
            }
        }
        for (b, &n) in overflow.iter().enumerate() {
            let o = self.index[b].overflow;
            assert!(
                u32::from(o) == n || o == u16::MAX,
                "bucket {b} counts {o} keys in their second bucket, {n} are"
            );
        }
        assert_eq!(keys, 2 * self.len, "two keys per live flow");
        assert_eq!(self.iter().count(), self.len);
        assert_eq!(self.free.len() + self.len, self.capacity());
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

    /// A table of `cap` flows over `buckets` buckets, fixed seed: crowded on purpose.
    fn crowded(cap: usize, buckets: usize, seed: u64) -> Conntrack {
        Conntrack::crowded(cap, buckets, Arc::new(ConnCounts::new(16)), seed)
    }

    /// What a lookup finds, without removing an expired flow.
    fn found(ct: &Conntrack, key: &FlowKey, now: u64) -> Option<(u32, Dir)> {
        ct.find(key, ct.hash(key)).filter(|&(i, _)| ct.flow(i).expires > now)
    }

    /// What the batch pipeline's probes say of a key.
    #[derive(Debug)]
    enum Probed {
        /// No tag matched in either bucket: the key is not in the table.
        Absent,
        /// The first tag match is the key's live flow.
        Found((u32, Dir)),
        /// The first tag match is not the key's (the pipeline then does a full lookup).
        FalseMatch,
    }

    /// `probe_first`, then `probe_second` on no match, then `confirm`, as the batch pipeline
    /// runs them.
    fn probes_find(ct: &Conntrack, key: &FlowKey, now: u64) -> Probed {
        let h = ct.hash(key);
        let slot = match ct.probe_first(h) {
            0 => ct.probe_second(h),
            slot => slot,
        };
        match slot {
            0 => Probed::Absent,
            slot => ct.confirm(slot, key, now).map_or(Probed::FalseMatch, Probed::Found),
        }
    }

    #[test]
    fn keys_overflow_into_their_second_bucket_and_are_found_there() {
        // 0.8 load at capacity: first buckets fill, keys overflow, both buckets of some keys
        // fill (cuckoo moves, evictions), and removals take overflowed keys out again.
        let (mut most_second, mut lookups_in_second, mut false_matches) = (0, 0, 0);
        for seed in 0..4 {
            let mut ct = crowded(256, 64, seed);
            for n in 0..4000u32 {
                let now = u64::from(n) * S / 10;
                let f = Flow::new(key(n), reply(n), 1, 3, 0).with_count(true);
                ct.insert(f, tcp_flags::SYN, now);
                if n % 5 == 2 {
                    if let Some((i, _)) = ct.lookup(&key(n - 2), now) {
                        ct.remove(i);
                    }
                }
                if n % 97 == 0 {
                    ct.check();
                    most_second = most_second.max(ct.keys_in_second());
                    for m in n.saturating_sub(300)..=n {
                        for k in [key(m), reply(m)] {
                            let found = found(&ct, &k, now);
                            match probes_find(&ct, &k, now) {
                                Probed::Absent => assert_eq!(found, None, "key {k:?}"),
                                Probed::Found(x) => assert_eq!(Some(x), found, "key {k:?}"),
                                Probed::FalseMatch => false_matches += 1,
                            }
                            if let Some((i, d)) = found {
                                let s = ct.flow(i).slots[d as usize];
                                lookups_in_second += usize::from(s & IN_SECOND != 0);
                            }
                        }
                    }
                    // Keys never inserted are not found, by either path.
                    for m in 10_000..10_050 {
                        assert_eq!(found(&ct, &key(m), now), None);
                        assert!(!matches!(probes_find(&ct, &key(m), now), Probed::Found(_)));
                    }
                }
            }
            ct.check();
            assert_eq!(ct.conns().active(3) as usize, ct.len());
        }
        assert!(most_second > 20, "the test crowds the index: {most_second} keys overflowed");
        assert!(lookups_in_second > 100, "{lookups_in_second} keys found in their second bucket");
        // A false tag match (16-bit tags: about one lookup in 3,000 here) is the one case the
        // probes leave to a full lookup.
        assert!(false_matches < 100, "{false_matches} false tag matches");
    }

    #[test]
    fn a_saturated_overflow_count_stays_and_lookups_still_read_the_second_bucket() {
        let mut ct = crowded(256, 64, 7);
        for n in 0..400u32 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, 1);
        }
        // Flows with a key in its second bucket.
        let marked: Vec<FlowKey> = ct
            .iter()
            .filter(|f| f.slots.iter().any(|s| s & IN_SECOND != 0))
            .map(|f| f.orig)
            .collect();
        assert!(!marked.is_empty());
        // Every key found where a lookup finds it, by the pipeline's probes.
        let probes_agree = |ct: &Conntrack| {
            for n in 0..400u32 {
                let found = found(ct, &key(n), 1);
                match probes_find(ct, &key(n), 1) {
                    Probed::Absent => assert_eq!(found, None),
                    Probed::Found(x) => assert_eq!(Some(x), found),
                    Probed::FalseMatch => {}
                }
            }
        };
        // Saturate every count: keys in their second bucket are still found; then remove
        // every flow with such a key.
        for b in 0..ct.index.len() {
            ct.index[b].overflow = u16::MAX;
        }
        ct.check();
        probes_agree(&ct);
        for k in &marked {
            if let Some((i, _)) = ct.lookup(k, 1) {
                ct.remove(i);
            }
        }
        ct.check();
        assert!(ct.index.iter().all(|b| b.overflow == u16::MAX), "saturated counts stay");
        assert_eq!(ct.keys_in_second(), 0);
        probes_agree(&ct);
    }

    #[test]
    fn at_half_load_few_keys_overflow_and_none_is_evicted() {
        // 81,920 flows: 163,840 keys over exactly 32,768 buckets of 10, the sizing's worst
        // load (0.5). Fill, then replace the oldest flow 160,000 times (no slab eviction).
        let cap = 81_920;
        let mut ct =
            Conntrack::with_seed(cap, Timeouts::default(), Arc::new(ConnCounts::new(16)), 3);
        assert_eq!(ct.index.len() * WAYS, 4 * cap);
        let mut live = std::collections::VecDeque::new();
        for n in 0..(cap as u32 + 160_000) {
            if live.len() == cap {
                let i: u32 = live.pop_front().unwrap();
                ct.remove(i);
            }
            live.push_back(ct.insert(Flow::new(key(n), reply(n), 1, 3, 0), tcp_flags::SYN, 1));
        }
        ct.check();
        let share = ct.keys_in_second() as f64 / (2 * cap) as f64;
        assert!(share < 0.03, "{:.2}% of keys in their second bucket", share * 100.0);
        assert_eq!(ct.stats().evicted, 0);
    }

    #[test]
    fn the_packed_key_comparison_is_equality() {
        let mut rng = crate::balance::FastRng::new(11);
        for n in 0..50_000u32 {
            let a = FlowKey {
                src: rng.next_u64() as u32,
                dst: rng.next_u64() as u32,
                sport: rng.next_u64() as u16,
                dport: rng.next_u64() as u16,
                proto: rng.next_u64() as u8,
            };
            // The same key, or one field changed (by one bit, or to a random value).
            let bit = 1u64 << (rng.next_u64() % 32);
            let x = if n % 2 == 0 { bit } else { rng.next_u64() };
            let mut b = a;
            match n % 6 {
                0 => b.src ^= x as u32,
                1 => b.dst ^= x as u32,
                2 => b.sport ^= x as u16,
                3 => b.dport ^= x as u16,
                4 => b.proto ^= x as u8,
                _ => {}
            }
            assert_eq!(a.same(&b), a == b, "{a:?} {b:?}");
            assert_eq!(b.same(&a), a == b);
        }
    }

    #[test]
    fn both_keys_find_the_flow_and_removal_clears_both() {
        let mut ct = table(64);
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0).with_count(true), tcp_flags::SYN, 0);
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
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0).with_count(true), tcp_flags::SYN, 0);
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
        let i = ct.insert(Flow::new(key(1), reply(1), 1, 3, 0).with_count(true), tcp_flags::ACK, 0);
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
        let i = ct.insert(Flow::new(k, r, 1, 3, 0).with_count(true), 0, 0);
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
            ct.insert(
                Flow::new(key(n), reply(n), 1, 3, 0).with_count(true),
                tcp_flags::SYN,
                u64::from(n) * S,
            );
        }
        assert_eq!(ct.len(), 16);
        assert_eq!(ct.conns().active(3), 16);
        ct.insert(
            Flow::new(key(100), reply(100), 1, 3, 0).with_count(true),
            tcp_flags::SYN,
            20 * S,
        );
        assert_eq!(ct.len(), 16);
        assert_eq!(ct.stats().evicted, 1);
        assert_eq!(ct.conns().active(3), 16);
        assert!(ct.lookup(&key(100), 21 * S).is_some());
        // None had a second packet: the first inserted went, the others stayed.
        assert!(ct.lookup(&key(0), 21 * S).is_none());
        assert!((1..16).all(|n| ct.lookup(&key(n), 21 * S).is_some()));
        ct.check();
    }

    #[test]
    fn many_flows_keep_both_keys_consistent() {
        let mut ct = table(4096);
        for n in 0..20_000u32 {
            ct.insert(
                Flow::new(key(n), reply(n), 1, 3, 0).with_count(true),
                tcp_flags::SYN,
                u64::from(n),
            );
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
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), tcp_flags::SYN, 1);
        }
        assert_eq!(ct.len(), 1 << 16);
        assert_eq!(ct.stats().evicted, 0);
    }

    #[test]
    fn bucket_masks_match_a_plain_scan() {
        let mut rng = crate::balance::FastRng::new(3);
        for _ in 0..2000 {
            // The overflow count and the padding share the tags' vector loads: values equal to
            // the tag looked for there must not match.
            let (overflow, _pad) = (rng.next_u64() as u16 % 4, rng.next_u64() as u16 % 4);
            let mut b = Bucket { vals: [0; WAYS], tags: [0; WAYS], overflow, _pad };
            for w in 0..WAYS {
                if rng.next_u64() % 3 != 0 {
                    b.vals[w] = (rng.next_u64() as u32 % 4).max(1) << (rng.next_u64() % 32);
                    b.tags[w] = (rng.next_u64() as u16 % 4).max(1);
                }
            }
            let tag = (rng.next_u64() as u16 % 4).max(1);
            let (mut occ, mut hit) = (0, 0);
            for w in 0..WAYS {
                occ |= u32::from(b.vals[w] != 0) << w;
                hit |= u32::from(b.tags[w] == tag) << w;
            }
            assert_eq!((b.occupied(), b.matching(tag), b.free()), (occ, hit, !occ & ALL_WAYS));
        }
    }

    #[test]
    fn full_capacity_holds_whatever_the_seed() {
        // The hash seed differs per table: a few tables, each filled to capacity.
        for _ in 0..4 {
            let mut ct = table(1 << 15);
            for n in 0..(1u32 << 15) {
                ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), tcp_flags::SYN, 1);
            }
            assert_eq!(ct.stats().evicted, 0);
            ct.check();
        }
    }

    #[test]
    fn index_stays_consistent_under_churn() {
        // A small table at full load: buckets overflow often, so keys are moved between their
        // two buckets and flows evicted from both the index and the slab.
        let mut ct = table(64);
        for n in 0..3000u32 {
            let now = u64::from(n) * S / 10;
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), tcp_flags::SYN, now);
            if n % 7 == 3 {
                if let Some((i, _)) = ct.lookup(&key(n - 3), now) {
                    ct.remove(i);
                }
            }
            if n % 50 == 0 {
                ct.gc(now, 16);
            }
            ct.check();
            assert!(ct.lookup(&key(n), now).is_some(), "the newest flow is always there");
        }
        let s = ct.stats();
        assert!(s.evicted > 0);
        assert_eq!(s.inserted - s.evicted - s.expired - s.removed, ct.len() as u64);
        assert_eq!(ct.conns().active(3) as usize, ct.len());
    }

    #[test]
    fn a_flood_of_new_flows_does_not_evict_flows_in_use() {
        let mut ct = table(1024);
        for n in 0..1024u32 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), tcp_flags::SYN, 0);
        }
        // 100 flows in use, each with a packet every 50 new flows, through a flood of ten
        // tables' worth of one-packet flows.
        let active: Vec<u32> = (0..100u32).map(|n| n * 10).collect();
        for m in 0..10_240u32 {
            let now = S + u64::from(m);
            if m % 50 == 0 {
                for &n in &active {
                    let (i, d) = ct.lookup(&key(n), now).expect("a flow in use stays");
                    ct.on_packet(i, d, tcp_flags::ACK, now);
                }
            }
            ct.insert(Flow::new(key(5000 + m), reply(5000 + m), 1, 3, 0).with_count(true), 0, now);
        }
        assert_eq!(ct.len(), 1024);
        assert_eq!(ct.stats().evicted, 10_240);
        let now = S + 10_240;
        assert!(active.iter().all(|&n| ct.lookup(&key(n), now).is_some()));
        ct.check();
    }

    #[test]
    fn expired_flows_go_before_active_ones() {
        let mut ct = table(64);
        let udp = |n: u32| FlowKey { proto: IPPROTO_UDP, ..key(n) };
        let udp_reply = |n: u32| FlowKey { proto: IPPROTO_UDP, ..reply(n) };
        // Even: established TCP (days); odd: UDP (30 s unreplied). All with a second packet.
        for n in 0..64u32 {
            let (k, r, flags) = if n % 2 == 0 {
                (key(n), reply(n), tcp_flags::ACK)
            } else {
                (udp(n), udp_reply(n), 0)
            };
            let i = ct.insert(Flow::new(k, r, 1, 3, 0).with_count(true), flags, 0);
            ct.on_packet(i, Dir::Orig, flags, S);
        }
        let now = 100 * S;
        for n in 0..32u32 {
            ct.insert(Flow::new(key(1000 + n), reply(1000 + n), 1, 3, 0).with_count(true), 0, now);
        }
        assert_eq!((ct.stats().expired, ct.stats().evicted), (32, 0));
        assert!((0..64u32).step_by(2).all(|n| ct.lookup(&key(n), now).is_some()));
        ct.check();
    }

    #[test]
    fn an_insert_passes_over_a_bounded_number_of_active_flows() {
        let mut ct = table(64);
        for n in 0..64u32 {
            let i = ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), 0, 0);
            assert_eq!(i, n, "the free list hands out entries in order");
            ct.on_packet(i, Dir::Orig, 0, 1);
        }
        // Every flow is marked: the hand clears CLOCK_SCAN marks, then takes the next flow.
        let i = ct.insert(Flow::new(key(100), reply(100), 1, 3, 0).with_count(true), 0, 2);
        assert_eq!(i as usize, CLOCK_SCAN);
        assert_eq!(ct.stats().evicted, 1);
        assert!(ct.lookup(&key(CLOCK_SCAN as u32), 3).is_none());
        assert!((0..CLOCK_SCAN).all(|n| !ct.flow(n as u32).recent));
        // Those passed over now go first, in order.
        for n in 0..CLOCK_SCAN as u32 {
            assert_eq!(
                ct.insert(Flow::new(key(200 + n), reply(200 + n), 1, 3, 0).with_count(true), 0, 3),
                n
            );
        }
        ct.check();
    }

    #[test]
    fn the_victims_prefetched_are_the_victims_taken() {
        let mut ct = table(512);
        let mut rng = crate::balance::FastRng::new(5);
        for n in 0..512u32 {
            let i = ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), 0, 0);
            if rng.next_u64() % 3 != 0 {
                ct.on_packet(i, Dir::Orig, 0, 1);
            }
        }
        // What each slab entry holds, to name the flow an insert replaced.
        let mut held: Vec<FlowKey> = (0..512u32).map(|i| ct.flow(i).orig).collect();
        let (mut n, mut seen) = (10_000, 0);
        for round in 0..100u64 {
            let now = 2 + round;
            let k = 1 + (rng.next_u64() % 64) as usize;
            let mut predicted = Vec::new();
            ct.next_victims(k, now, |f| predicted.push(f.orig));
            let mut taken = Vec::new();
            for _ in 0..k {
                let i = ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), 0, now)
                    as usize;
                taken.push(std::mem::replace(&mut held[i], key(n)));
                n += 1;
                // Some of the new flows in use again before the hand comes round.
                if rng.next_u64() % 2 == 0 {
                    ct.on_packet(i as u32, Dir::Orig, 0, now);
                }
            }
            // All of them, or as many as the walk's bound let it name, in order.
            assert!(!predicted.is_empty() && taken.starts_with(&predicted), "round {round}");
            seen += predicted.len();
        }
        assert!(seen > (n as usize - 10_000) / 2, "{seen} of {} victims foreseen", n - 10_000);
        ct.check();
    }

    #[test]
    fn a_flows_deltas_are_nat_deltas_each_way() {
        use crate::wire::nat_deltas;
        let mut rng = crate::balance::FastRng::new(11);
        let tuple = |k: &FlowKey| (k.src, k.dst, k.sport, k.dport);
        for n in 0..20_000 {
            let mut r = || rng.next_u64();
            // Fields often equal (unchanged by the translation) or at the extremes.
            let pick = |x: u64, same: u32| match x % 4 {
                0 => same,
                1 => 0,
                2 => u32::MAX,
                _ => (x >> 8) as u32,
            };
            let orig = FlowKey {
                src: r() as u32,
                dst: r() as u32,
                sport: r() as u16,
                dport: r() as u16,
                proto: 17,
            };
            let (a, b, c, d) = (r(), r(), r(), r());
            let reply = FlowKey {
                src: pick(a, orig.dst),
                dst: pick(b, orig.src),
                sport: pick(c, u32::from(orig.dport)) as u16,
                dport: pick(d, u32::from(orig.sport)) as u16,
                proto: 17,
            };
            let f = Flow::new(orig, reply, 1, 1, 0);
            let want = [
                nat_deltas(tuple(&orig), tuple(&reply.reversed())),
                nat_deltas(tuple(&reply), tuple(&orig.reversed())),
            ];
            assert_eq!(f.nat, want, "{n}: {orig:?} {reply:?}");
        }
    }

    #[test]
    fn gc_sweeps_expired_flows() {
        let mut ct = table(64);
        for n in 0..10 {
            ct.insert(Flow::new(key(n), reply(n), 1, 3, 0).with_count(true), tcp_flags::SYN, 0);
        }
        assert_eq!(ct.gc(119 * S, 1000), 0);
        assert_eq!(ct.gc(121 * S, 1000), 10);
        assert!(ct.is_empty());
        assert_eq!(ct.conns().active(3), 0);
    }
}
