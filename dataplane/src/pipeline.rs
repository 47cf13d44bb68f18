//! The packet pipeline: a pure function over a batch of frames.
//!
//! [`process_batch`] owns no I/O. The AF_XDP workers call it on frames in UMEM; tests, fixtures,
//! fuzzing and benchmarks call it on frames in ordinary buffers. It reads one [`Tables`]
//! generation for the whole batch (the caller loads it once per batch) and mutates only the
//! worker's own state (conntrack, fragment table, counters) plus the shared affinity table
//! and backend connection counts, which it touches only when a flow is created or ends.
//!
//! Per frame, in order:
//! 1. Parse Ethernet (with up to two VLAN tags) and IPv4. ARP, IPv6 and other EtherTypes go to
//!    the kernel; truncated or inconsistent headers and bad IP checksums are counted drops.
//! 2. A TTL that would expire goes to the kernel, which sends the time-exceeded error.
//! 3. Fragments: first fragments are processed normally and remembered; later fragments get
//!    their datagram's translation (see [`crate::frag`]).
//! 4. TCP and UDP: a conntrack hit is translated (DNAT forward, reverse NAT on replies) after
//!    checking, once per table generation, that its backend still exists: a removed backend's
//!    TCP flows get a reset, its UDP flows move to a live backend on their next packet. A miss on
//!    a frontend creates a flow (session affinity, then the service's scheduler) or, with no
//!    usable endpoint, rejects it (TCP reset, ICMP port unreachable for UDP). Traffic to a pod
//!    address is forwarded as is; anything else goes to the kernel.
//! 5. ICMP: echo requests to a service address are answered; errors that embed a translated
//!    flow's header are translated (outer and inner), so the client sees them come from the
//!    service address.
//! 6. Forwarding decrements the TTL and rewrites the MACs from the next-hop table; with no next
//!    hop known the packet goes to the kernel, which routes it (and resolves ARP).
//!
//! Checksums are updated incrementally (RFC 1624). Every drop and pass has a reason and a
//! counter. Nothing here allocates.

use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::affinity::AffinityTable;
use crate::balance::{uniform_pick, Candidate, ConnCounts, PickKey};
use crate::conntrack::{Conntrack, Dir, Flow, FlowKey, Timeouts, HOP_NONE, HOP_UNRESOLVED};
use crate::counters::{Counters, DropReason, PassReason};
use crate::frag::FragTable;
use crate::mem::prefetch;
use crate::tables::{Frontend, FrontendKey, NextHop, ServicePort, Tables};
use crate::wire::{
    self, csum_fold, csum_partial, csum_replace2, ip, rd16, rd32, tcp_flags, wr16, wr32, Offsets,
    Parsed, ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

/// First port of the source-NAT range (Linux's ephemeral range).
pub const SNAT_PORT_MIN: u16 = 32768;
/// Last port of the source-NAT range.
pub const SNAT_PORT_MAX: u16 = 60999;
const SNAT_PROBES: u32 = 64;
const NS: u64 = 1_000_000_000;

/// One frame of a batch.
pub struct Frame<'a> {
    /// The frame's buffer, from the first byte of the packet to the end of its room. Replies
    /// (resets, ICMP errors) are built in place and may use room past `len`.
    pub buf: &'a mut [u8],
    /// Length of the packet in `buf`; updated when the pipeline changes it.
    pub len: usize,
    /// Interface it arrived on.
    pub ifindex: u32,
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit `len` bytes of the (rewritten) frame on this interface.
    Tx {
        /// Egress interface index.
        ifindex: u32,
    },
    /// Hand the frame to the kernel (unchanged, except after a translation whose next hop is
    /// unknown: [`PassReason::NoNextHop`]).
    Pass(PassReason),
    /// Drop it.
    Drop(DropReason),
    /// The flow belongs to another worker: give it the frame, untouched (see [`owner_of`]).
    Handoff {
        /// The owning worker's index.
        worker: u16,
    },
}

/// Sizes and settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// This worker's index, `0..workers`.
    pub worker_id: u16,
    /// How many workers there are (source-NAT ports are split among them).
    pub workers: u16,
    /// Conntrack capacity in flows.
    pub conntrack_capacity: usize,
    /// Conntrack timeouts.
    pub timeouts: Timeouts,
    /// Fragment table capacity in datagrams.
    pub frag_capacity: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: 0,
            workers: 1,
            conntrack_capacity: 1 << 18,
            timeouts: Timeouts::default(),
            frag_capacity: 4096,
        }
    }
}

/// State shared by all workers.
pub struct Shared {
    /// Per-backend connection counts (for the least-connection schedulers).
    pub conns: Arc<ConnCounts>,
    /// ClientIP affinity.
    pub affinity: Arc<AffinityTable>,
}

impl Shared {
    /// Shared state for backend ids below `max_backends` and about `affinity_capacity` clients.
    pub fn new(max_backends: usize, affinity_capacity: usize) -> Self {
        Self {
            conns: Arc::new(ConnCounts::new(max_backends)),
            affinity: Arc::new(AffinityTable::new(affinity_capacity)),
        }
    }
}

/// Everything one worker owns.
pub struct WorkerState {
    /// Connection table.
    pub ct: Conntrack,
    /// Fragment table.
    pub frags: FragTable,
    /// Counters.
    pub counters: Counters,
    affinity: Arc<AffinityTable>,
    conns: Arc<ConnCounts>,
    worker_id: u16,
    workers: u16,
    /// Set while processing frames another worker handed over: they are this worker's, so
    /// they are never handed on again.
    pub local_only: bool,
    /// Every frame takes the general path of pass 3 (the fast path for established packets,
    /// [`established`], is off): tests compare the two.
    pub(crate) general_only: bool,
}

impl WorkerState {
    /// A worker with the given sizes, sharing `shared`.
    pub fn new(cfg: &WorkerConfig, shared: &Shared) -> Self {
        Self {
            ct: Conntrack::new(cfg.conntrack_capacity, cfg.timeouts, shared.conns.clone()),
            frags: FragTable::new(cfg.frag_capacity),
            counters: Counters::default(),
            affinity: shared.affinity.clone(),
            conns: shared.conns.clone(),
            worker_id: cfg.worker_id,
            workers: cfg.workers.max(1),
            local_only: false,
            general_only: false,
        }
    }
    /// This worker's index.
    pub fn worker_id(&self) -> u16 {
        self.worker_id
    }
    /// The shared affinity table.
    pub fn affinity(&self) -> &AffinityTable {
        &self.affinity
    }
}

/// Frames handled per pass: per-frame state for one chunk lives on the stack.
const CHUNK: usize = 64;

/// Processes a batch: `verdicts[i]` is set for `frames[i]` (both must be the same length; extra
/// entries of the longer one are ignored). `now` is a monotonic clock in nanoseconds.
///
/// The work is done in passes over each chunk of up to 64 frames, as VPP and DPDK do, so that
/// the cache misses of the whole chunk overlap instead of being paid one after the other:
/// 1. parse each frame, hash its 5-tuple and prefetch the key's first conntrack index line
///    (where all but a few keys in a thousand are);
/// 2. read the tags in that line and prefetch the flow records they point at; for a key with
///    no matching tag there whose first bucket counts keys overflowed into their second
///    (rare), prefetch its second index line, and read that one's tags after the other
///    frames' first ones. A key with no matching tag in either is not in conntrack
///    (most likely a new flow): prefetch its frontend slot (and, the table being full, the
///    records of the flows the clock hand would evict for as many new flows,
///    [`Conntrack::prefetch_clock`]); then, only when the chunk has such keys:
///    - 2a: look their frontends up; where the frontend's slot holds the port's candidates
///      (kube-proxy's case: random, no affinity; [`Tables::frontend_quick`]) prefetch the
///      candidate the flow will get, which is all a new flow reads of the service; otherwise
///      prefetch the first line of the service port;
///
///    and only when the chunk has new flows:
///    - 2b: for the ports 2a prefetched, prefetch what their schedulers will read (see
///      [`crate::balance::Scheduler::prefetch`]);
///    - 2c: prefetch what evicting a flow for each of them writes
///      ([`Conntrack::prefetch_evictions`]); where the scheduler's pick is a pure function of
///      the packet (random, sh, dh, Maglev, without session affinity), pick now, hash the
///      reply key the new flow would have and prefetch its first conntrack index line (where
///      the check for a clash and the insert almost always end);
/// 3. process each frame in order, reusing the parse, the hash, the frontend and the pick; a
///    packet of a known flow in a common frame takes a fast path ([`established`]) that
///    confirms pass 2's tag match instead of searching again, the first packet of a new flow
///    whose backend pass 2c picked takes another (`fresh`) that writes the flow's record in
///    place, and both fall back to the general path for anything unusual.
///
/// The early passes read the frames and the tables but change nothing (and the tables do not
/// change during a batch), so the result is the same as processing the frames one by one.
pub fn process_batch(
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
    tables: &Tables,
    w: &mut WorkerState,
    now: u64,
) {
    let n = frames.len().min(verdicts.len());
    for (f, v) in frames[..n].chunks_mut(CHUNK).zip(verdicts[..n].chunks_mut(CHUNK)) {
        process_chunk(f, v, tables, w, now);
    }
}

/// What pass 1 (and pass 2, `slot`) keeps of every frame: 40 bytes, so a chunk's 64 are
/// 2.5 KB of stack, zeroed in one `memset`. The parse is kept compactly ([`Lane::parsed`] restores it).
#[derive(Clone, Copy, Default)]
struct Lane {
    /// The 5-tuple (with [`KEYED`]).
    key: FlowKey,
    /// Its conntrack hash (with [`KEYED`]).
    h: u64,
    /// The index slot of its first tag match in pass 2 (0: none), for
    /// [`Conntrack::confirm`].
    slot: u32,
    /// [`Offsets`] of an IPv4 frame (no field exceeds these widths: `l3` is at most 22,
    /// `l4` at most 82, `end` at most 65,557).
    end: u32,
    l3: u8,
    l4: u8,
    proto: u8,
    /// The `Parsed` variant ([`CODE`] bits; 0 is `Ipv4`) and the flags below.
    bits: u8,
}

/// [`Lane::bits`]: the frame has a TCP or UDP tuple, hashed, its index lines prefetched.
const KEYED: u8 = 0x80;
/// [`Lane::bits`]: the frame is the common one of [`wire::parse_common`] (offsets 14 and 34).
const COMMON: u8 = 0x40;
/// [`Lane::bits`]: `Offsets::has_l4`.
const HAS_L4: u8 = 0x20;
/// [`Lane::bits`]: `Offsets::fragment`.
const FRAGMENT: u8 = 0x10;
/// [`Lane::bits`]: the `Parsed` variant, in declaration order.
const CODE: u8 = 0x07;

impl Lane {
    #[inline(always)]
    fn set_ipv4(&mut self, o: &Offsets, bits: u8) {
        self.end = o.end as u32;
        self.l3 = o.l3 as u8;
        self.l4 = o.l4 as u8;
        self.proto = o.proto;
        self.bits =
            bits | if o.has_l4 { HAS_L4 } else { 0 } | if o.fragment { FRAGMENT } else { 0 };
    }

    #[inline(always)]
    fn set(&mut self, p: &Parsed) {
        self.bits = match p {
            Parsed::Ipv4(o) => return self.set_ipv4(o, 0),
            Parsed::Arp => 1,
            Parsed::Ipv6 => 2,
            Parsed::OtherEthertype => 3,
            Parsed::EthTruncated => 4,
            Parsed::IpMalformed => 5,
            Parsed::IpChecksum => 6,
            Parsed::L4Malformed => 7,
        };
    }

    #[inline(always)]
    fn parsed(&self) -> Parsed {
        match self.bits & CODE {
            0 => Parsed::Ipv4(Offsets {
                l3: usize::from(self.l3),
                l4: usize::from(self.l4),
                end: self.end as usize,
                proto: self.proto,
                has_l4: self.bits & HAS_L4 != 0,
                fragment: self.bits & FRAGMENT != 0,
            }),
            1 => Parsed::Arp,
            2 => Parsed::Ipv6,
            3 => Parsed::OtherEthertype,
            4 => Parsed::EthTruncated,
            5 => Parsed::IpMalformed,
            6 => Parsed::IpChecksum,
            _ => Parsed::L4Malformed,
        }
    }
}

/// What passes 2a-2c learnt about a frame whose tuple matched no tag in pass 2 (a new flow,
/// most likely).
#[derive(Clone, Copy)]
struct Miss<'t> {
    fe: Option<Frontend>,
    /// The service port `fe` leads to, looked up once (pass 2a) for passes 2b, 2c and 3;
    /// `None` when `quick` has what a new flow needs (the port is then not read).
    svc: Option<&'t ServicePort>,
    /// The port's candidates, from the frontend's slot, when a new flow needs nothing else.
    quick: Option<&'t [Candidate]>,
    ahead: Ahead,
}

impl<'t> Miss<'t> {
    /// The candidates of the service port: the slot's when it has them, else the port's.
    #[inline(always)]
    fn candidates(&self) -> Option<&'t [Candidate]> {
        self.quick.or_else(|| self.svc.map(ServicePort::candidates))
    }
}

/// What pass 2c decided ahead for a new flow ([`pick_ahead`]).
#[derive(Clone, Copy, Default)]
struct Ahead {
    /// The backend, for a service whose scheduler is pure and has no session affinity.
    pick: Option<Pick>,
}

/// A new flow's backend picked ahead: the same answer [`choose`] gives in pass 3, since the
/// tables do not change during a batch.
#[derive(Clone, Copy)]
struct Pick {
    /// Index into the service's candidates.
    ci: u16,
    /// The conntrack hash of the reply key without source NAT (`direct_reply`); 0 when the
    /// flow is source-NATed anyway.
    h_direct: u64,
}

#[inline]
fn process_chunk(
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
    tables: &Tables,
    w: &mut WorkerState,
    now: u64,
) {
    debug_assert!(frames.len() <= CHUNK && frames.len() == verdicts.len());
    let n = frames.len().min(CHUNK);
    let mut lanes = [Lane::default(); CHUNK];
    for (f, l) in frames.iter_mut().zip(lanes.iter_mut()) {
        let len = f.len.min(f.buf.len());
        f.len = len;
        let frame = &f.buf[..len];
        // The common frame (its offsets are constants here) and the others, each with its
        // own copy of the tuple read.
        l.key = match wire::parse_common(frame) {
            Some(o) => {
                l.set_ipv4(&o, KEYED | COMMON);
                tuple(frame, &o)
            }
            None => {
                let p = wire::parse_general(frame);
                l.set(&p);
                match &p {
                    Parsed::Ipv4(o)
                        if o.has_l4 && (o.proto == IPPROTO_TCP || o.proto == IPPROTO_UDP) =>
                    {
                        l.bits |= KEYED;
                        tuple(frame, o)
                    }
                    _ => continue,
                }
            }
        };
        l.h = w.ct.hash(&l.key);
        w.ct.prefetch_first_bucket(l.h);
    }
    // Frames whose tuple matched no tag (a bit per frame), and what the next passes learn of
    // them: `miss[i]` is written for every frame in `missed`, and read only for those.
    let mut missed = 0u64;
    let mut miss = [const { MaybeUninit::<Miss<'_>>::uninit() }; CHUNK];
    // Frames whose tuple matched no tag in its first bucket: the second is loading.
    let mut second = 0u64;
    for (i, l) in lanes[..n].iter_mut().enumerate() {
        if l.bits & KEYED != 0 {
            l.slot = w.ct.probe_first(l.h);
            if l.slot == 0 {
                second |= 1 << i;
            }
        }
    }
    for i in bits(second) {
        let l = &mut lanes[i];
        l.slot = w.ct.probe_second(l.h);
        if l.slot == 0 {
            tables.prefetch_frontend(&frontend_key(&l.key));
            missed |= 1 << i;
        }
    }
    w.ct.prefetch_clock(missed.count_ones() as usize);
    let mut new_flows = 0;
    for i in bits(missed) {
        let l = &lanes[i];
        let (fe, quick) = match tables.frontend_quick(&frontend_key(&l.key)) {
            Some((fe, quick)) => (Some(*fe), quick),
            None => (None, None),
        };
        let mut svc = None;
        match quick {
            // The pick is known already: start loading the candidate itself.
            Some(c) => {
                prefetch(c.as_ptr().wrapping_add(usize::from(uniform_pick(l.h, c.len()))));
                new_flows += 1;
            }
            None => {
                svc = fe.and_then(|fe| tables.service_arc(fe.service));
                if let Some(svc) = svc {
                    // What a new flow reads of it is its first line.
                    prefetch(Arc::as_ptr(svc));
                    new_flows += 1;
                }
            }
        }
        miss[i].write(Miss { fe, svc: svc.map(|s| &**s), quick, ahead: Ahead::default() });
    }
    if new_flows > 0 {
        for i in bits(missed) {
            let (l, m) = (&lanes[i], written(&miss, missed, i));
            if let Some(svc) = m.svc {
                svc.scheduler().prefetch(svc.candidates(), &pick_key(&l.key, l.h));
            }
        }
        w.ct.prefetch_evictions(new_flows, now);
        for i in bits(missed) {
            let (l, m) = (&lanes[i], written(&miss, missed, i));
            if let Some(fe) = m.fe {
                let ahead = pick_ahead(tables, w, &l.key, l.h, &fe, m);
                // SAFETY: `i` is in `missed`, every frame of which pass 2a wrote (`written`
                // read it just above).
                unsafe { miss[i].assume_init_mut() }.ahead = ahead;
            }
        }
    }
    let (generation, routes) = (tables.generation(), tables.routes());
    // Packets the fast paths sent, how many of them were replies, and how many started a
    // flow.
    let (mut fast_tx, mut reply, mut fresh_tx) = (0u64, 0u64, 0u64);
    let fast = if w.general_only { 0 } else { COMMON };
    let n = n.min(verdicts.len());
    let (frames, verdicts, lanes) = (&mut frames[..n], &mut verdicts[..n], &lanes[..n]);
    // `missed` shifted right by the frame's index.
    let mut missed_rest = missed;
    for i in 0..n {
        let (f, v, l) = (&mut frames[i], &mut verdicts[i], &lanes[i]);
        let missed_here = missed_rest & 1 != 0;
        missed_rest >>= 1;
        if l.bits & fast != 0 {
            if !missed_here {
                if let Some((ifindex, dir)) = established(f, l, w, generation, routes, now) {
                    fast_tx += 1;
                    reply += dir as u64;
                    *v = Verdict::Tx { ifindex };
                    continue;
                }
            } else if let Some(ifindex) =
                fresh(f, l, written(&miss, missed, i), tables, w, routes, now)
            {
                fresh_tx += 1;
                *v = Verdict::Tx { ifindex };
                continue;
            }
        }
        let m = missed_here.then(|| written(&miss, missed, i));
        let keyed = (l.bits & KEYED != 0).then_some((l.key, l.h));
        let verdict = process_one(f, l.parsed(), keyed, m, tables, w, now);
        match verdict {
            Verdict::Tx { .. } => w.counters.tx += 1,
            Verdict::Pass(r) => w.counters.passed(r),
            Verdict::Drop(r) => w.counters.dropped(r),
            Verdict::Handoff { .. } => w.counters.handed_off += 1,
        }
        *v = verdict;
    }
    let c = &mut w.counters;
    c.rx += n as u64;
    c.tx += fast_tx + fresh_tx;
    c.nat_forward += fast_tx - reply;
    c.nat_reply += reply;
    c.nat_new += fresh_tx;
}

/// `miss[i]`, for a frame `i` in `missed`: `process_chunk` writes `miss[i]` for every such
/// frame before it reads any.
#[inline(always)]
fn written<'a, 't>(
    miss: &'a [MaybeUninit<Miss<'t>>; CHUNK],
    missed: u64,
    i: usize,
) -> &'a Miss<'t> {
    assert!(missed & (1 << i) != 0);
    // SAFETY: `i` is in `missed` (checked above), and `process_chunk` writes `miss[i]` for
    // every frame in `missed` in pass 2a, before any call.
    unsafe { miss[i].assume_init_ref() }
}

/// The set bits of `m`, lowest first.
#[inline(always)]
fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            i
        })
    })
}

/// Pass 3's fast path: a packet of a known flow in a common frame (pass 1 found offsets 14
/// and 34, TCP or UDP, not a fragment) whose record is live, was checked against this table
/// generation and has a next hop. It does what [`known_flow`] does in that case, and returns
/// the egress interface and the packet's direction. `None` (TTL about to expire, no live
/// flow, a new generation, no next hop) changes nothing: the frame then takes the general
/// path, which handles every case, this one included.
#[inline(always)]
fn established(
    f: &mut Frame<'_>,
    l: &Lane,
    w: &mut WorkerState,
    generation: u64,
    routes: &crate::tables::Routes,
    now: u64,
) -> Option<(u32, Dir)> {
    // `parse_common` checked that the headers are in the frame (the TCP header's 20 bytes at
    // 34 for TCP); with 54 bytes of room every offset below is a constant in range.
    let b: &mut [u8; 54] = f.buf.first_chunk_mut()?;
    if b[ETH_HLEN + 8] <= 1 {
        // The TTL would expire: the general path gives it to the kernel.
        return None;
    }
    let (idx, dir) = w.ct.confirm(l.slot, &l.key, now)?;
    let fl = w.ct.flow(idx);
    if fl.generation != generation {
        return None;
    }
    // `HOP_UNRESOLVED` (0) wraps to `u32::MAX` and `HOP_NONE` to `u32::MAX - 1`: no such hop.
    let hop = routes.hop(fl.hop(dir).wrapping_sub(1))?;
    let proto = l.key.proto;
    let flags = if proto == IPPROTO_TCP { b[ETH_HLEN + 20 + 13] } else { 0 };
    let end = l.end as usize;
    // Ethernet padding is not part of the datagram. (Written now, as nothing below fails,
    // so that `end` need not be kept.)
    f.len = end;
    let (to, deltas) = w.ct.account(idx, dir, flags, now, end - ETH_HLEN).nat(dir);
    wire::nat_apply(b, ETH_HLEN, ETH_HLEN + 20, proto, to.src, to.dst, to.sport, to.dport, deltas);
    set_macs(b, hop);
    Some((hop.ifindex, dir))
}

/// Pass 3's fast path for a new flow: the first packet of a flow in a common frame (as for
/// [`established`]) whose backend pass 2c picked ahead ([`pick_ahead`]: a pure scheduler, no
/// session affinity, a flow this worker owns), that needs no source NAT, whose keys are both
/// unused, that NetworkPolicy allows and whose backend has a next hop. It does what
/// [`new_flow`] does in that case, with the record built in its slab entry
/// ([`Conntrack::insert_new`]), and returns the egress interface. `None` (anything else: a
/// TTL about to expire, a TCP reset, source NAT, a key in use, a policy drop, no route)
/// changes nothing, and the frame takes the general path.
#[inline(always)]
fn fresh(
    f: &mut Frame<'_>,
    l: &Lane,
    m: &Miss<'_>,
    t: &Tables,
    w: &mut WorkerState,
    routes: &crate::tables::Routes,
    now: u64,
) -> Option<u32> {
    let (a, fe) = (m.ahead.pick?, m.fe?);
    // Pure schedulers read no connection counts, so the flow is not counted (`insert_new`).
    debug_assert!(m.svc.is_none_or(|svc| !svc.scheduler().reads_conns()));
    // A pick made ahead (from the frontend's slot or from the port) is the port's scheduler's.
    debug_assert!(t.service(fe.service).is_some_and(|s| {
        s.scheduler().pick(s.candidates(), &pick_key(&l.key, l.h), &w.conns) == Some(a.ci)
    }));
    // `h_direct` is 0 for a flow that needs source NAT (or, once in 2^64 flows, a reply key
    // hashing to 0: the general path then does the same work).
    if a.h_direct == 0 {
        return None;
    }
    // As in `established`: the headers are in the frame, at constant offsets.
    let b: &mut [u8; 54] = f.buf.first_chunk_mut()?;
    if b[ETH_HLEN + 8] <= 1 {
        return None;
    }
    let key = l.key;
    let flags = if key.proto == IPPROTO_TCP { b[ETH_HLEN + 20 + 13] } else { 0 };
    if flags & tcp_flags::RST != 0 {
        return None;
    }
    let cand = *m.candidates()?.get(usize::from(a.ci))?;
    // NetworkPolicy sees the backend pod, as in `new_flow`.
    t.policy().check(key.src, cand.ip, key.proto, cand.port).ok()?;
    let reply = direct_reply(&key, &cand);
    // Pass 2 found no tag of the key, but an earlier frame of this chunk may have inserted
    // it since; and the reply key may be another flow's (then source NAT is needed).
    if w.ct.holds(&key, l.h) || w.ct.holds(&reply, a.h_direct) {
        return None;
    }
    let hops = flow_hops(t, &key, &reply);
    let hop = routes.hop(hops[0].wrapping_sub(1))?;
    let end = l.end as usize;
    f.len = end;
    let idx = w.ct.insert_new(
        (key, l.h),
        (reply, a.h_direct),
        (fe.service, cand.id),
        t.generation(),
        hops,
        flags,
        now,
        end - ETH_HLEN,
    );
    let (to, deltas) = w.ct.flow(idx).nat(Dir::Orig);
    wire::nat_apply(
        b,
        ETH_HLEN,
        ETH_HLEN + 20,
        key.proto,
        to.src,
        to.dst,
        to.sport,
        to.dport,
        deltas,
    );
    set_macs(b, hop);
    Some(hop.ifindex)
}

/// One frame, parsed in pass 1 (`f.len` is already clamped to the buffer): `keyed` is its
/// 5-tuple and conntrack hash (TCP and UDP with an L4 header), `miss` what passes 2a-2c learnt
/// of it when its tuple matched no tag in pass 2.
#[inline]
fn process_one(
    f: &mut Frame<'_>,
    parsed: Parsed,
    keyed: Option<(FlowKey, u64)>,
    miss: Option<&Miss>,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
) -> Verdict {
    let o = match parsed {
        Parsed::Ipv4(o) => o,
        Parsed::Arp => return Verdict::Pass(PassReason::Arp),
        Parsed::Ipv6 => return Verdict::Pass(PassReason::Ipv6),
        Parsed::OtherEthertype => return Verdict::Pass(PassReason::OtherEthertype),
        Parsed::EthTruncated => return Verdict::Drop(DropReason::EthTruncated),
        Parsed::IpMalformed => return Verdict::Drop(DropReason::IpMalformed),
        Parsed::IpChecksum => return Verdict::Drop(DropReason::IpChecksum),
        Parsed::L4Malformed => return Verdict::Drop(DropReason::L4Malformed),
    };
    // Ethernet padding is not part of the datagram and must not be forwarded as if it were.
    f.len = o.end;
    if ip::ttl(f.buf, o.l3) <= 1 {
        return Verdict::Pass(PassReason::TtlExpired);
    }
    match (o.proto, keyed) {
        (IPPROTO_TCP | IPPROTO_UDP, Some((key, h))) => l4(f, &o, t, w, now, key, h, miss),
        (IPPROTO_TCP | IPPROTO_UDP, None) => later_fragment(f, &o, t, w, now),
        (IPPROTO_ICMP, _) if !o.fragment => icmp(f, &o, t, w, now),
        _ => {
            let dst = ip::dst(f.buf, o.l3);
            if t.is_vip(dst) {
                Verdict::Drop(DropReason::VipNoPort)
            } else {
                Verdict::Pass(PassReason::OtherProto)
            }
        }
    }
}

/// Reads the tuple of a TCP/UDP datagram whose L4 header is present.
#[inline(always)]
fn tuple(b: &[u8], o: &Offsets) -> FlowKey {
    // Two range checks: the addresses, the ports; each pair read as one word (so the key's
    // packing for the hash, `FlowKey::pack`, is these words again).
    let addrs = u64::from_be_bytes(*b[o.l3 + 12..].first_chunk().expect("IPv4 header"));
    let ports = u32::from_be_bytes(*b[o.l4..].first_chunk().expect("L4 header"));
    FlowKey {
        src: (addrs >> 32) as u32,
        dst: addrs as u32,
        sport: (ports >> 16) as u16,
        dport: ports as u16,
        proto: o.proto,
    }
}

/// The frontend key a tuple would match.
#[inline(always)]
fn frontend_key(key: &FlowKey) -> FrontendKey {
    FrontendKey { ip: key.dst, port: key.dport, proto: key.proto }
}

/// A TCP or UDP datagram with its L4 header; `key` is its tuple, `h` the tuple's conntrack hash,
/// `miss` what passes 2a-2c found for it (its frontend, looked up, and maybe its backend,
/// picked ahead) when its tuple matched no tag in pass 2.
#[allow(clippy::too_many_arguments)]
#[inline]
fn l4(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    key: FlowKey,
    h: u64,
    miss: Option<&Miss>,
) -> Verdict {
    if o.fragment {
        let id = ip::id(f.buf, o.l3);
        w.frags.insert(key.src, key.dst, id, key.proto, (key.sport, key.dport), now);
    }
    let flags = if o.proto == IPPROTO_TCP { f.buf[o.l4 + 13] } else { 0 };
    if let Some((idx, dir)) = w.ct.lookup_hashed(&key, h, now) {
        return known_flow(f, o, t, w, now, Hit { key, h, idx, dir, flags });
    }
    let fe = match miss {
        Some(m) => m.fe,
        None => t.frontend(&frontend_key(&key)).copied(),
    };
    if w.workers > 1 && !w.local_only {
        // Not in this worker's table: the flow (or the new flow this packet starts) belongs
        // to the worker that owns its client side. A packet to a frontend is client to
        // service (client = source); anything else may be a reply (client = destination).
        let owner = match fe {
            Some(_) => owner_of(t, key.src, key.sport, w.workers),
            None => owner_of(t, key.dst, key.dport, w.workers),
        };
        if owner != w.worker_id {
            return Verdict::Handoff { worker: owner };
        }
    }
    if let Some(fe) = fe {
        let (svc, ahead) = match miss {
            Some(m) => (m.svc.or_else(|| t.service(fe.service)), &m.ahead),
            None => (t.service(fe.service), &Ahead::default()),
        };
        return new_flow(f, o, t, w, now, key, h, fe, svc, flags, ahead);
    }
    if t.is_vip(key.dst) {
        return Verdict::Drop(DropReason::VipNoPort);
    }
    let pol = t.policy();
    if pol.active() && (pol.isolated(key.src) || pol.isolated(key.dst)) {
        return new_plain_flow(f, o, t, w, now, key, h, flags);
    }
    forward_plain(f, o, t, w, key.dst)
}

/// A connection between pod addresses (no service) that NetworkPolicy isolates on either
/// side: checked, then tracked (with no translation) so its replies pass without a check.
///
/// Ownership: like a service flow, a tracked plain flow lives with the worker owning its
/// client side, here its source. A miss first went to the owner of its destination (where it
/// would be, were it a reply), so a frame handed over once may be handed on once more, to the
/// owner of its source, which then processes it: at most two hops.
#[allow(clippy::too_many_arguments)]
#[cold]
fn new_plain_flow(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    key: FlowKey,
    h: u64,
    flags: u8,
) -> Verdict {
    if w.workers > 1 {
        let owner = owner_of(t, key.src, key.sport, w.workers);
        if owner != w.worker_id {
            return Verdict::Handoff { worker: owner };
        }
    }
    if key.proto == IPPROTO_TCP && flags & tcp_flags::RST != 0 {
        return Verdict::Drop(DropReason::TcpNoFlow);
    }
    if let Err(r) = t.policy().check(key.src, key.dst, key.proto, key.dport) {
        return Verdict::Drop(r);
    }
    let reply = key.reversed();
    let h_reply = w.ct.hash(&reply);
    // A reply key in use belongs to another flow (a service flow whose backend answers from
    // this very tuple): forward without tracking rather than disturb it.
    if w.ct.lookup_hashed(&reply, h_reply, now).is_none() {
        w.ct.insert_hashed(Flow::new(key, reply, 0, 0, t.generation()), h, h_reply, flags, now);
        w.counters.policy_flows += 1;
    }
    forward_plain(f, o, t, w, key.dst)
}

/// A conntrack match: the packet's tuple and its hash, the flow's slab index, the packet's
/// direction and its TCP flags.
#[derive(Clone, Copy)]
struct Hit {
    key: FlowKey,
    h: u64,
    idx: u32,
    dir: Dir,
    flags: u8,
}

/// A packet of a flow in this worker's conntrack: translated with what the flow record
/// prepared (the rewritten tuple, the checksum deltas, the next hop cached for this table
/// generation), so the common case reads no table but the flow's own record.
#[inline]
fn known_flow(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    hit: Hit,
) -> Verdict {
    let Hit { idx, dir, flags, .. } = hit;
    let fl = w.ct.flow(idx);
    if fl.generation != t.generation() || fl.hop(dir) == HOP_UNRESOLVED {
        if let Err(v) = refresh_flow(f, o, t, w, now, &hit) {
            return v;
        }
    }
    match dir {
        Dir::Orig => w.counters.nat_forward += 1,
        Dir::Reply => w.counters.nat_reply += 1,
    }
    let fl = w.ct.account(idx, dir, flags, now, o.end - o.l3);
    let (to, deltas) = fl.nat(dir);
    let hop = fl.hop(dir);
    translate(f, o, t, &to, deltas, hop)
}

/// A known flow first seen in this table generation (or whose next hops were never
/// resolved): checks that its backend is still there (a removed backend stops the flow: TCP
/// gets a reset, UDP is re-balanced at once), then resolves and caches both directions' next
/// hops. `Err` is the packet's verdict when the flow was stopped.
#[cold]
#[inline(never)]
fn refresh_flow(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    hit: &Hit,
) -> Result<(), Verdict> {
    let Hit { key, h, idx, dir, flags } = *hit;
    let fl = *w.ct.flow(idx);
    if fl.generation != t.generation() && fl.service != 0 {
        let alive = t.service(fl.service).is_some_and(|s| s.backend(fl.backend).is_some());
        if !alive {
            let service_gone = t.service(fl.service).is_none();
            w.ct.remove(idx);
            if dir == Dir::Orig && key.proto == IPPROTO_UDP {
                // Stale UDP conntrack is kube-proxy's most reported bug: re-balance at once.
                if let Some(fe) =
                    t.frontend(&FrontendKey { ip: key.dst, port: key.dport, proto: key.proto })
                {
                    w.counters.udp_rebalanced += 1;
                    let svc = t.service(fe.service);
                    return Err(new_flow(
                        f,
                        o,
                        t,
                        w,
                        now,
                        key,
                        h,
                        *fe,
                        svc,
                        flags,
                        &Ahead::default(),
                    ));
                }
            }
            let reason =
                if service_gone { DropReason::ServiceRemoved } else { DropReason::BackendRemoved };
            if dir == Dir::Orig && key.proto == IPPROTO_TCP && flags & tcp_flags::RST == 0 {
                w.counters.dropped(reason);
                return Err(reject(f, o, w));
            }
            return Err(Verdict::Drop(reason));
        }
    }
    let hops = flow_hops(t, &fl.orig, &fl.reply);
    w.ct.flow_mut(idx).set_hops(t.generation(), hops);
    Ok(())
}

/// Pass 2c's part of a new flow: when the service's scheduler is pure and there is no session
/// affinity, picks the backend now and starts loading the reply key's conntrack lines and the
/// backend's connection count. A frame another worker owns gets nothing (it is handed over in
/// pass 3).
#[inline(always)]
fn pick_ahead(
    t: &Tables,
    w: &WorkerState,
    key: &FlowKey,
    h: u64,
    fe: &Frontend,
    m: &Miss<'_>,
) -> Ahead {
    if w.workers > 1 && !w.local_only && owner_of(t, key.src, key.sport, w.workers) != w.worker_id {
        return Ahead::default();
    }
    Ahead { pick: pick_now(m, w, key, h, fe) }
}

/// [`pick_ahead`]'s pick, with its prefetches.
#[inline(always)]
fn pick_now(m: &Miss<'_>, w: &WorkerState, key: &FlowKey, h: u64, fe: &Frontend) -> Option<Pick> {
    let (ci, cand) = match m.quick {
        // The slot's candidates: what the port's scheduler would pick, without reading it.
        Some(c) => {
            let ci = uniform_pick(h, c.len());
            (ci, *c.get(usize::from(ci))?)
        }
        None => {
            let svc = m.svc?;
            if svc.affinity_timeout_s().is_some() || !svc.scheduler().pick_is_pure() {
                return None;
            }
            let ci = svc.scheduler().pick(svc.candidates(), &pick_key(key, h), &w.conns)?;
            (ci, svc.candidates()[usize::from(ci)])
        }
    };
    // (No connection count to prefetch: a pure scheduler's flows are not counted.)
    let h_direct = if needs_snat(fe, &cand, key) {
        0
    } else {
        let hr = w.ct.hash(&direct_reply(key, &cand));
        w.ct.prefetch_first_bucket(hr);
        hr
    };
    Some(Pick { ci, h_direct })
}

/// What the scheduler hashes on for a new flow `key` whose conntrack hash is `h`.
#[inline(always)]
fn pick_key(key: &FlowKey, h: u64) -> PickKey {
    PickKey {
        src_ip: key.src,
        dst_ip: key.dst,
        src_port: key.sport,
        dst_port: key.dport,
        proto: key.proto,
        flow_hash: h,
    }
}

/// The reply key of a flow to `cand` without source NAT: the backend answering the client.
#[inline(always)]
fn direct_reply(key: &FlowKey, cand: &Candidate) -> FlowKey {
    FlowKey { src: cand.ip, dst: key.src, sport: cand.port, dport: key.sport, proto: key.proto }
}

/// A flow's first packet to frontend `fe`, whose service port is `svc` (`None`: removed):
/// affinity or the scheduler picks a backend (unless `ahead` already did, [`pick_ahead`], for
/// this very key), then policy, source NAT and the conntrack entry.
#[allow(clippy::too_many_arguments)]
#[inline]
fn new_flow(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    key: FlowKey,
    h: u64,
    fe: Frontend,
    svc: Option<&ServicePort>,
    flags: u8,
    ahead: &Ahead,
) -> Verdict {
    if key.proto == IPPROTO_TCP && flags & tcp_flags::RST != 0 {
        return Verdict::Drop(DropReason::TcpNoFlow);
    }
    let Some(svc) = svc else {
        return Verdict::Drop(DropReason::ServiceRemoved);
    };
    let picked = match ahead.pick {
        Some(a) => {
            // What `choose` would answer: the scheduler is pure and there is no affinity.
            debug_assert_eq!(
                svc.scheduler().pick(svc.candidates(), &pick_key(&key, h), &w.conns),
                Some(a.ci)
            );
            Some(a.ci)
        }
        None => choose(svc, &key, h, w, now),
    };
    let Some(ci) = picked else {
        w.counters.dropped(DropReason::NoEndpoints);
        return reject(f, o, w);
    };
    let cand = svc.candidates()[usize::from(ci)];
    // NetworkPolicy sees the backend pod, not the service address (as after kube-proxy's DNAT).
    if let Err(r) = t.policy().check(key.src, cand.ip, key.proto, cand.port) {
        return Verdict::Drop(r);
    }
    let snat = needs_snat(&fe, &cand, &key);
    let mut reply = direct_reply(&key, &cand);
    // Source NAT when the flow needs it, or when the backend already talks to this client from
    // this very tuple (a direct connection): then this one goes through a port of our own.
    let mut hr = None;
    let needs_port = snat || {
        let h0 = match ahead.pick {
            Some(a) => a.h_direct,
            None => w.ct.hash(&reply),
        };
        debug_assert_eq!(h0, w.ct.hash(&reply));
        hr = Some(h0);
        w.ct.lookup_hashed(&reply, h0, now).is_some()
    };
    if needs_port {
        match t.snat_ip() {
            // Without an address to masquerade to, send it unmasqueraded (as before SNAT was
            // configured): the kernel path would behave the same. (`hr` is still `None`.)
            None if snat => {}
            None => return Verdict::Drop(DropReason::SnatExhausted),
            Some(sip) => {
                reply.dst = u32::from(sip);
                let Some((port, h_port)) = snat_port(w, &reply, h, now) else {
                    return Verdict::Drop(DropReason::SnatExhausted);
                };
                reply.dport = port;
                hr = Some(h_port);
                w.counters.snat_flows += 1;
            }
        }
    }
    finish_new(f, o, t, w, now, key, h, reply, hr, svc, cand.id, flags)
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn finish_new(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
    key: FlowKey,
    h: u64,
    reply: FlowKey,
    h_reply: Option<u64>,
    svc: &ServicePort,
    backend: u32,
    flags: u8,
) -> Verdict {
    if let Some(timeout) = svc.affinity_timeout_s() {
        w.affinity.insert(svc.id(), key.src, backend, now + u64::from(timeout) * NS, now);
    }
    let h_reply = h_reply.unwrap_or_else(|| w.ct.hash(&reply));
    let mut flow = Flow::new(key, reply, svc.id(), backend, t.generation())
        .with_count(svc.scheduler().reads_conns());
    // Both directions' next hops now, as `refresh_flow` would on the flow's next packet (each
    // direction goes to the source of the other's tuple): neither direction's next packet
    // then leaves the fast path, and this one is forwarded as they will be.
    flow.set_hops(t.generation(), flow_hops(t, &key, &reply));
    w.ct.insert_packet(flow, h, h_reply, flags, now, o.end - o.l3);
    w.counters.nat_new += 1;
    let (to, deltas) = flow.nat(Dir::Orig);
    translate(f, o, t, &to, deltas, flow.hop(Dir::Orig))
}

/// Both directions' [`Flow::hop`] values (orig, reply) of a flow with tuples `orig` and
/// `reply` in tables `t`: each direction goes to the source of the other's tuple.
#[inline(always)]
fn flow_hops(t: &Tables, orig: &FlowKey, reply: &FlowKey) -> [u32; 2] {
    [hop_index(t, reply.src), hop_index(t, orig.src)]
}

/// [`Flow::hop`]'s value for the route to `dst` in tables `t`.
#[inline(always)]
fn hop_index(t: &Tables, dst: u32) -> u32 {
    t.routes().resolve(dst).map_or(HOP_NONE, |i| i + 1)
}

/// Rewrites a TCP/UDP packet of a flow to tuple `to` with the flow's checksum `deltas` for it
/// ([`Flow::nat`]) and forwards it by the flow's cached next hop `hop` ([`Flow::hop`]); with
/// no route, the kernel gets the translated packet with its TTL untouched, as [`forward`]
/// leaves it.
#[inline(always)]
fn translate(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    to: &FlowKey,
    deltas: [u16; 2],
    hop: u32,
) -> Verdict {
    match t.routes().hop(hop.wrapping_sub(1)) {
        Some(hop) => {
            let (src, dst, sport, dport) = (to.src, to.dst, to.sport, to.dport);
            match f.buf.first_chunk_mut::<54>() {
                // Ethernet II and IPv4 without options, as most frames are: constant offsets
                // in 54 bytes of room, no further bounds checks.
                Some(b) if o.l3 == ETH_HLEN && o.l4 == ETH_HLEN + 20 => {
                    let l4 = ETH_HLEN + 20;
                    wire::nat_apply(b, ETH_HLEN, l4, o.proto, src, dst, sport, dport, deltas);
                }
                _ => wire::nat_apply(f.buf, o.l3, o.l4, o.proto, src, dst, sport, dport, deltas),
            }
            set_macs(f.buf, hop);
            Verdict::Tx { ifindex: hop.ifindex }
        }
        None => {
            let l4_len = o.end - o.l4;
            wire::rewrite_tuple(
                f.buf, o.l3, o.l4, o.proto, true, l4_len, to.src, to.dst, to.sport, to.dport,
            );
            Verdict::Pass(PassReason::NoNextHop)
        }
    }
}

/// Hairpin (a client reaching itself through the service) and masqueraded external traffic to
/// other nodes need the source rewritten so replies come back through us.
#[inline]
fn needs_snat(fe: &Frontend, cand: &Candidate, key: &FlowKey) -> bool {
    cand.ip == key.src || (fe.masquerade_remote && !cand.local)
}

/// Affinity first, then the scheduler. Returns an index into the service's candidates.
#[inline]
fn choose(svc: &ServicePort, key: &FlowKey, h: u64, w: &mut WorkerState, now: u64) -> Option<u16> {
    match affinity_candidate(svc, key.src, &w.affinity, now) {
        Some(Ok(i)) => {
            w.counters.affinity_hits += 1;
            return Some(i);
        }
        // The remembered backend is gone or no longer selectable.
        Some(Err(())) => w.affinity.remove(svc.id(), key.src),
        None => {}
    }
    let pk = pick_key(key, h);
    svc.scheduler().pick(svc.candidates(), &pk, &w.conns)
}

/// The candidate index a live affinity entry of `client` names (`Err` when it names a backend
/// that is no longer selectable); `None` without affinity or entry.
#[inline]
fn affinity_candidate(
    svc: &ServicePort,
    client: u32,
    affinity: &AffinityTable,
    now: u64,
) -> Option<Result<u16, ()>> {
    svc.affinity_timeout_s()?;
    let bid = affinity.lookup(svc.id(), client, now)?;
    Some(svc.candidates().iter().position(|c| c.id == bid).map(|i| i as u16).ok_or(()))
}

/// The worker that owns flows whose client side is `ip:port`, out of `workers`.
///
/// Receive-side scaling spreads a connection's two directions over different queues, so over
/// different workers, and conntrack is per worker. Every flow therefore has one owner, fixed by
/// its client side, which both directions carry: the source of a client's packets, the
/// destination of the replies. With source NAT the replies' destination is the node address and
/// a port from the owner's share of the range ([`snat_port`]), so the owner is read back from
/// the port. A worker that misses in its own table hands the frame to the owner
/// ([`Verdict::Handoff`]), as VPP's NAT hands off between threads.
#[inline]
pub fn owner_of(t: &Tables, ip: u32, port: u16, workers: u16) -> u16 {
    let n = u32::from(workers.max(1));
    if n == 1 {
        return 0;
    }
    if t.snat_ip().is_some_and(|s| u32::from(s) == ip) && port >= SNAT_PORT_MIN {
        return ((u32::from(port - SNAT_PORT_MIN)) % n) as u16;
    }
    let x = ((u64::from(ip) << 16) | u64::from(port)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 32) % u64::from(n)) as u16
}

/// A free source-NAT port for `reply` (whose `dst` is the SNAT address), from this worker's
/// share of the range, so workers never hand out the same port; with the conntrack hash of the
/// reply key using it.
fn snat_port(w: &mut WorkerState, reply: &FlowKey, h: u64, now: u64) -> Option<(u16, u64)> {
    let n = u32::from(w.workers);
    let span = (u32::from(SNAT_PORT_MAX) - u32::from(SNAT_PORT_MIN) + 1) / n;
    let start = (h >> 16) as u32 % span;
    for i in 0..SNAT_PROBES.min(span) {
        let slot = (start + i) % span;
        let port = (u32::from(SNAT_PORT_MIN) + slot * n + u32::from(w.worker_id)) as u16;
        let k = FlowKey { dport: port, ..*reply };
        let hk = w.ct.hash(&k);
        if w.ct.lookup_hashed(&k, hk, now).is_none() {
            return Some((port, hk));
        }
    }
    None
}

/// Non-first fragments: translate by the datagram's remembered ports.
fn later_fragment(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
) -> Verdict {
    let b = &*f.buf;
    let (src, dst, id) = (ip::src(b, o.l3), ip::dst(b, o.l3), ip::id(b, o.l3));
    let Some((sport, dport)) = w.frags.lookup(src, dst, id, o.proto, now) else {
        return if t.is_vip(dst) {
            Verdict::Drop(DropReason::FragmentUnknown)
        } else {
            Verdict::Pass(PassReason::FragmentUnknown)
        };
    };
    let key = FlowKey { src, dst, sport, dport, proto: o.proto };
    match w.ct.lookup(&key, now) {
        Some((idx, dir)) => {
            let flow = *w.ct.flow(idx);
            let to = if dir == Dir::Orig { flow.reply } else { flow.orig };
            wire::rewrite_tuple(f.buf, o.l3, o.l4, o.proto, false, 0, to.dst, to.src, 0, 0);
            w.counters.fragments_translated += 1;
            forward(f, o, t, to.src)
        }
        None => forward_plain(f, o, t, w, dst),
    }
}

/// Untranslated traffic: forwarded only to pod addresses we have a host route for.
#[inline]
fn forward_plain(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    dst: u32,
) -> Verdict {
    if t.routes().host(dst).is_none() {
        return Verdict::Pass(PassReason::NotOurs);
    }
    w.counters.forwarded_plain += 1;
    forward(f, o, t, dst)
}

/// TTL decrement and MAC rewrite towards `dst`.
#[inline]
fn forward(f: &mut Frame<'_>, o: &Offsets, t: &Tables, dst: u32) -> Verdict {
    let Some(hop) = t.routes().lookup(dst) else {
        return Verdict::Pass(PassReason::NoNextHop);
    };
    ip::dec_ttl(f.buf, o.l3);
    set_macs(f.buf, hop);
    Verdict::Tx { ifindex: hop.ifindex }
}

/// Rewrites the frame's Ethernet addresses for next hop `hop`.
#[inline(always)]
fn set_macs(b: &mut [u8], hop: &NextHop) {
    b[0..6].copy_from_slice(&hop.dst_mac);
    b[6..12].copy_from_slice(&hop.src_mac);
}

fn swap_macs(b: &mut [u8]) {
    let mut tmp = [0u8; 6];
    tmp.copy_from_slice(&b[0..6]);
    b.copy_within(6..12, 0);
    b[6..12].copy_from_slice(&tmp);
}

/// Answers the sender of a TCP/UDP packet that cannot be served: a TCP reset, or ICMP port
/// unreachable for UDP, from the address and port it sent to, out of the interface it came in
/// on. The frame is rewritten in place.
fn reject(f: &mut Frame<'_>, o: &Offsets, w: &mut WorkerState) -> Verdict {
    let ok = if o.proto == IPPROTO_TCP { build_rst(f, o) } else { build_port_unreachable(f, o) };
    if !ok {
        return Verdict::Drop(DropReason::NoRoom);
    }
    w.counters.rejects_sent += 1;
    Verdict::Tx { ifindex: f.ifindex }
}

fn write_ipv4_header(b: &mut [u8], l3: usize, total: u16, proto: u8, src: u32, dst: u32) {
    b[l3] = 0x45;
    b[l3 + 1] = 0;
    wr16(b, l3 + 2, total);
    wr16(b, l3 + 4, 0);
    wr16(b, l3 + 6, 0x4000); // DF
    b[l3 + 8] = 64;
    b[l3 + 9] = proto;
    wr32(b, l3 + 12, src);
    wr32(b, l3 + 16, dst);
    ip::fill_checksum(b, l3);
}

/// Fills the TCP checksum of a segment at `l4` of length `len` (pseudo-header included).
fn fill_tcp_checksum(b: &mut [u8], l3: usize, l4: usize, len: usize) {
    wr16(b, l4 + 16, 0);
    let mut sum = csum_partial(&b[l3 + 12..l3 + 20], 0);
    sum += u32::from(IPPROTO_TCP) + len as u32;
    sum = csum_partial(&b[l4..l4 + len], sum);
    wr16(b, l4 + 16, csum_fold(sum));
}

/// RFC 793 reset generation: answer with the peer's ACK as our sequence number, or with an
/// ACK of everything it sent.
fn build_rst(f: &mut Frame<'_>, o: &Offsets) -> bool {
    let b = &mut *f.buf;
    let (l3, l4) = (o.l3, o.l4);
    if b.len() < l3 + 40 {
        return false;
    }
    let src = ip::src(b, l3);
    let dst = ip::dst(b, l3);
    let sport = rd16(b, l4);
    let dport = rd16(b, l4 + 2);
    let seq = rd32(b, l4 + 4);
    let ack = rd32(b, l4 + 8);
    let flags = b[l4 + 13];
    let doff = usize::from(b[l4 + 12] >> 4) * 4;
    let payload = (o.end - l4 - doff) as u32;
    let (rseq, rack, rflags) = if flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        let span = payload
            + u32::from(flags & tcp_flags::SYN != 0)
            + u32::from(flags & tcp_flags::FIN != 0);
        (0, seq.wrapping_add(span), tcp_flags::RST | tcp_flags::ACK)
    };
    swap_macs(b);
    write_ipv4_header(b, l3, 40, IPPROTO_TCP, dst, src);
    let t = l3 + 20;
    wr16(b, t, dport);
    wr16(b, t + 2, sport);
    wr32(b, t + 4, rseq);
    wr32(b, t + 8, rack);
    b[t + 12] = 5 << 4;
    b[t + 13] = rflags;
    wr16(b, t + 14, 0);
    wr16(b, t + 18, 0);
    fill_tcp_checksum(b, l3, t, 20);
    f.len = l3 + 40;
    true
}

/// ICMP destination unreachable, port unreachable (RFC 792), quoting the IP header and the
/// first 8 bytes of the offending datagram.
fn build_port_unreachable(f: &mut Frame<'_>, o: &Offsets) -> bool {
    let b = &mut *f.buf;
    let l3 = o.l3;
    let ihl = ip::hlen(b, l3);
    let quoted = (ihl + 8).min(o.end - l3);
    let total = 20 + 8 + quoted;
    if b.len() < l3 + total {
        return false;
    }
    let src = ip::src(b, l3);
    let dst = ip::dst(b, l3);
    b.copy_within(l3..l3 + quoted, l3 + 28);
    swap_macs(b);
    write_ipv4_header(b, l3, total as u16, IPPROTO_ICMP, dst, src);
    let i = l3 + 20;
    b[i] = 3;
    b[i + 1] = 3;
    wr16(b, i + 2, 0);
    wr32(b, i + 4, 0);
    let c = csum_fold(csum_partial(&b[i..i + 8 + quoted], 0));
    wr16(b, i + 2, c);
    f.len = l3 + total;
    true
}

fn icmp(f: &mut Frame<'_>, o: &Offsets, t: &Tables, w: &mut WorkerState, now: u64) -> Verdict {
    let (l3, l4) = (o.l3, o.l4);
    let ty = f.buf[l4];
    let dst = ip::dst(f.buf, l3);
    match ty {
        8 if t.is_vip(dst) => {
            // Echo request to a service address: answer it, as Cilium does.
            let b = &mut *f.buf;
            let src = ip::src(b, l3);
            // Swapping the addresses leaves the IP header checksum as it was.
            wr32(b, l3 + 12, dst);
            wr32(b, l3 + 16, src);
            let old = rd16(b, l4);
            b[l4] = 0;
            let c = csum_replace2(rd16(b, l4 + 2), old, rd16(b, l4));
            wr16(b, l4 + 2, c);
            swap_macs(b);
            w.counters.echo_replies += 1;
            Verdict::Tx { ifindex: f.ifindex }
        }
        3 | 11 | 12 => icmp_error(f, o, t, w, now),
        _ if t.is_vip(dst) => Verdict::Drop(DropReason::IcmpToVip),
        8 => match t.policy().check(ip::src(f.buf, l3), dst, IPPROTO_ICMP, 0) {
            Ok(()) => forward_plain(f, o, t, w, dst),
            Err(r) => Verdict::Drop(r),
        },
        _ => forward_plain(f, o, t, w, dst),
    }
}

/// Translates an ICMP error whose quoted datagram belongs to a translated flow.
fn icmp_error(
    f: &mut Frame<'_>,
    o: &Offsets,
    t: &Tables,
    w: &mut WorkerState,
    now: u64,
) -> Verdict {
    let (l3, l4, end) = (o.l3, o.l4, o.end);
    let outer_dst = ip::dst(f.buf, l3);
    let il3 = l4 + 8;
    // The quoted header must be whole, with at least the 8 bytes that hold the ports.
    let inner = (|| {
        let b = &*f.buf;
        if end < il3 + 20 || b[il3] >> 4 != 4 {
            return None;
        }
        let ihl = ip::hlen(b, il3);
        let il4 = il3 + ihl;
        if ihl < 20 || end < il4 + 8 {
            return None;
        }
        let proto = b[il3 + 9];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return None;
        }
        let k = FlowKey {
            src: ip::src(b, il3),
            dst: ip::dst(b, il3),
            sport: rd16(b, il4),
            dport: rd16(b, il4 + 2),
            proto,
        };
        Some((il4, k))
    })();
    let Some((il4, quoted)) = inner else {
        return if t.is_vip(outer_dst) {
            Verdict::Drop(DropReason::IcmpToVip)
        } else {
            forward_plain(f, o, t, w, outer_dst)
        };
    };
    // The quoted datagram travelled the other way: its reverse is the key this error's
    // direction would have.
    let Some((idx, dir)) = w.ct.lookup(&quoted.reversed(), now) else {
        if w.workers > 1 && !w.local_only {
            // The flow may be another worker's: its client side is the quoted datagram's
            // destination when the client sent the error (to a service address), else its
            // source.
            let owner = if t.is_vip(outer_dst) {
                owner_of(t, quoted.dst, quoted.dport, w.workers)
            } else {
                owner_of(t, quoted.src, quoted.sport, w.workers)
            };
            if owner != w.worker_id {
                return Verdict::Handoff { worker: owner };
            }
        }
        return if t.is_vip(outer_dst) {
            Verdict::Drop(DropReason::IcmpToVip)
        } else {
            forward_plain(f, o, t, w, outer_dst)
        };
    };
    let flow = *w.ct.flow(idx);
    // `seen` is the tuple the quoted datagram should show; `to` the outer addresses.
    let (seen, outer_src_from, outer_src_to, new_dst) = match dir {
        // Error about a forward packet (sent by the backend or a router on its way): the
        // client must see its own datagram to the service address.
        Dir::Reply => (flow.orig, flow.reply.src, flow.orig.dst, flow.orig.src),
        // Error sent by the client about a reply: the backend must see its own datagram.
        Dir::Orig => (flow.reply, flow.orig.src, flow.reply.dst, flow.reply.src),
    };
    let b = &mut *f.buf;
    let outer_src = ip::src(b, l3);
    let new_src = if outer_src == outer_src_from { outer_src_to } else { outer_src };
    wire::rewrite_tuple(
        b,
        il3,
        il4,
        quoted.proto,
        true,
        end - il4,
        seen.src,
        seen.dst,
        seen.sport,
        seen.dport,
    );
    ip::set_addr(b, l3, 12, new_src);
    ip::set_addr(b, l3, 16, new_dst);
    // The ICMP checksum covers the quoted bytes, several of which changed: recompute it
    // (errors are rare and short).
    wr16(b, l4 + 2, 0);
    let c = csum_fold(csum_partial(&b[l4..end], 0));
    wr16(b, l4 + 2, c);
    w.counters.icmp_errors_translated += 1;
    forward(f, o, t, new_dst)
}

// ---- Inspect hook (`io::inspect`'s flow query): the new-flow decision without side effects.

/// What a new flow would get from the pipeline now (see [`peek_new_flow`]).
#[derive(Clone, Copy, Debug)]
pub struct NewFlowChoice {
    /// The frontend the tuple matches.
    pub frontend: Frontend,
    /// The backend candidate chosen (`None`: no usable endpoint, the flow is rejected).
    pub backend: Option<Candidate>,
    /// The choice follows a session-affinity entry.
    pub by_affinity: bool,
    /// The flow would be source-NATed (hairpin or masquerade).
    pub snat: bool,
    /// NetworkPolicy's verdict on the client to the chosen backend (`Ok` without a backend).
    pub policy: Result<(), DropReason>,
}

/// The decision [`process_batch`] would take for a new flow with tuple `key` on this worker,
/// through the same lookups: the frontend table, the affinity entry ([`affinity_candidate`],
/// as `choose` uses it) and the service's scheduler ([`crate::balance::Scheduler::peek`]: the
/// round-robin position does not move, so the answer is what the next new flow would get;
/// random, like Maglev, answers by the tuple's hash, as the flow itself would), then NetworkPolicy on the backend pod as
/// `new_flow` checks it. Nothing is changed: no affinity entry is
/// added or removed, no counter moves. `None` when no frontend matches or its service port is
/// gone. A backend that already has a direct connection with this very tuple would make the
/// real flow take a source-NAT port; that case is not reported.
pub fn peek_new_flow(
    t: &Tables,
    w: &WorkerState,
    key: &FlowKey,
    now: u64,
) -> Option<NewFlowChoice> {
    let frontend = *t.frontend(&frontend_key(key))?;
    let svc = t.service(frontend.service)?;
    let (ci, by_affinity) = match affinity_candidate(svc, key.src, &w.affinity, now) {
        Some(Ok(i)) => (Some(i), true),
        _ => {
            let pk = pick_key(key, w.ct.hash(key));
            (svc.scheduler().peek(svc.candidates(), &pk, &w.conns), false)
        }
    };
    let backend = ci.map(|i| svc.candidates()[usize::from(i)]);
    let snat = backend.is_some_and(|c| needs_snat(&frontend, &c, key));
    let policy = backend.map_or(Ok(()), |c| t.policy().check(key.src, c.ip, key.proto, c.port));
    Some(NewFlowChoice { frontend, backend, by_affinity, snat, policy })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::balance::Algorithm;
    use crate::tables::{
        Backend, FrontendKind, NextHop, Protocol, Routes, ServiceSpec, DEFAULT_MAGLEV_SIZE,
    };

    const VIP: u32 = 0x0a60_0000;
    const BACKEND: u32 = 0x0a80_0000;
    const CLIENT: u32 = 0xac10_0000;

    /// Backends (10.128/16) out of interface 3, clients (172.16/16) out of interface 2.
    fn routes() -> Routes {
        let mut routes = Routes::default();
        let hop =
            |ifindex| NextHop { ifindex, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2] };
        routes.add_prefix(Ipv4Addr::from(BACKEND), 16, hop(3));
        routes.add_prefix(Ipv4Addr::from(CLIENT), 16, hop(2));
        routes
    }

    /// Services 1..=3 on 10.96.0.i:53/UDP, each with one backend 10.128.0.i:5353.
    fn tables() -> Tables {
        let mut b = Tables::builder(1);
        for i in 1..=3u32 {
            let spec = ServiceSpec {
                id: i,
                name: format!("t/svc-{i}:dns"),
                proto: Protocol::Udp,
                algorithm: Algorithm::Random,
                affinity_timeout_s: None,
                maglev_size: DEFAULT_MAGLEV_SIZE,
            };
            let backends = vec![Backend::ready(i, Ipv4Addr::from(BACKEND + i), 5353)];
            b.upsert_service(Arc::new(ServicePort::new(spec, backends))).unwrap();
            let fe =
                Frontend { service: i, kind: FrontendKind::ClusterIp, masquerade_remote: false };
            b.upsert_frontend(FrontendKey::new(Ipv4Addr::from(VIP + i), 53, Protocol::Udp), fe)
                .unwrap();
        }
        b.routes(routes()).build()
    }

    fn udp(src: u32, sport: u16, dst: u32, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4(Ipv4Addr::from(src).octets(), Ipv4Addr::from(dst).octets(), 64)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(4));
        b.write(&mut out, b"ping").unwrap();
        out
    }

    fn worker(capacity: usize) -> WorkerState {
        let cfg = WorkerConfig { conntrack_capacity: capacity, ..WorkerConfig::default() };
        WorkerState::new(&cfg, &Shared::new(16, 16))
    }

    fn run(
        pkts: &[Vec<u8>],
        batch: usize,
        w: &mut WorkerState,
        t: &Tables,
    ) -> Vec<(Verdict, Vec<u8>)> {
        run_at(pkts, batch, w, t, 1)
    }

    /// [`run`] at time `now`.
    fn run_at(
        pkts: &[Vec<u8>],
        batch: usize,
        w: &mut WorkerState,
        t: &Tables,
        now: u64,
    ) -> Vec<(Verdict, Vec<u8>)> {
        let mut out = Vec::new();
        for chunk in pkts.chunks(batch) {
            let mut bufs: Vec<Vec<u8>> = chunk
                .iter()
                .map(|p| {
                    let mut b = p.clone();
                    b.resize(2048, 0);
                    b
                })
                .collect();
            let mut frames: Vec<Frame<'_>> = bufs
                .iter_mut()
                .zip(chunk)
                .map(|(b, p)| Frame { buf: b, len: p.len(), ifindex: 2 })
                .collect();
            let mut v = vec![Verdict::Drop(DropReason::NoRoom); frames.len()];
            process_batch(&mut frames, &mut v, t, w, now);
            let lens: Vec<usize> = frames.iter().map(|f| f.len).collect();
            for ((v, b), len) in v.into_iter().zip(&bufs).zip(lens) {
                out.push((v, b[..len].to_vec()));
            }
        }
        out
    }

    /// Services 1..=7 on 10.96.0.i:53/UDP, one per scheduler kind that pass 2c picks ahead for
    /// (and rr, which it does not), four backends each, one of them the client 172.16.0.1
    /// itself (hairpin, source-NATed); service 5 with session affinity, service 6 masquerading
    /// its remote backends.
    fn mixed_tables() -> Tables {
        let mut b = Tables::builder(1);
        let algs = [
            Algorithm::Random,
            Algorithm::Maglev,
            Algorithm::SourceHash,
            Algorithm::RoundRobin,
            Algorithm::Random,
            Algorithm::Random,
            Algorithm::WeightedLeastConnection,
        ];
        for (i, alg) in (1..=7u32).zip(algs) {
            let spec = ServiceSpec {
                id: i,
                name: format!("t/svc-{i}:dns"),
                proto: Protocol::Udp,
                algorithm: alg,
                affinity_timeout_s: (i == 5).then_some(60),
                maglev_size: 251,
            };
            let mut backends: Vec<Backend> = (0..3)
                .map(|j| {
                    let mut be =
                        Backend::ready(i * 10 + j, Ipv4Addr::from(BACKEND + i * 16 + j), 5353);
                    be.local = j != 1;
                    be
                })
                .collect();
            backends.push(Backend::ready(i * 10 + 3, Ipv4Addr::from(CLIENT + 1), 5353));
            b.upsert_service(Arc::new(ServicePort::new(spec, backends))).unwrap();
            let fe =
                Frontend { service: i, kind: FrontendKind::ClusterIp, masquerade_remote: i == 6 };
            b.upsert_frontend(FrontendKey::new(Ipv4Addr::from(VIP + i), 53, Protocol::Udp), fe)
                .unwrap();
        }
        b.routes(routes()).snat_ip(Some(Ipv4Addr::new(10, 0, 0, 1))).build()
    }

    #[test]
    fn maglev_picks_the_same_backend_on_every_worker_and_node() {
        // Two workers with different conntrack seeds (as two workers, or two nodes), each with
        // its own separately built Tables of the same services: the same tuples reach the same
        // Maglev backend (service 2), in batches and one by one. Random (service 1) keys on
        // the per-worker hash, so there the seeds do make a difference.
        let pkts = |vip: u32| -> Vec<Vec<u8>> {
            (0..600u32).map(|n| udp(CLIENT + 2 + n % 50, 2000 + n as u16, vip, 53)).collect()
        };
        let backend_of = |seed: u64, batch: usize, vip: u32| -> Vec<[u8; 4]> {
            let mut w = worker(1024);
            w.ct = Conntrack::with_seed(1024, Timeouts::default(), w.conns.clone(), seed);
            run(&pkts(vip), batch, &mut w, &mixed_tables())
                .into_iter()
                .map(|(v, b)| {
                    assert!(matches!(v, Verdict::Tx { .. }), "{v:?}");
                    b[30..34].try_into().unwrap()
                })
                .collect()
        };
        let maglev = backend_of(1, 64, VIP + 2);
        assert_eq!(maglev, backend_of(0xdead_beef, 64, VIP + 2));
        assert_eq!(maglev, backend_of(0xdead_beef, 1, VIP + 2));
        // Every backend gets some of the flows.
        let distinct: std::collections::BTreeSet<_> = maglev.iter().collect();
        assert_eq!(distinct.len(), 4, "{distinct:?}");
        assert_ne!(backend_of(1, 64, VIP + 1), backend_of(0xdead_beef, 64, VIP + 1));
    }

    /// `frames` UDP frames to the seven services of [`mixed_tables`] from `clients` clients
    /// over `ports` source ports; frame `n` with `n % every.0 == every.1` is a backend's reply
    /// (to a flow of the same client and port, when there is one).
    fn mixed_traffic(frames: u32, clients: u32, ports: u32, every: (u32, u32)) -> Vec<Vec<u8>> {
        (0..frames)
            .map(|n| {
                let (c, s) = (CLIENT + 1 + n % clients, 1 + n % 7);
                let sport = 1000 + (n % ports) as u16;
                if n % every.0 == every.1 {
                    udp(BACKEND + s * 16 + (n % 3), 5353, c, sport)
                } else {
                    udp(c, sport, VIP + s, 53)
                }
            })
            .collect()
    }

    #[test]
    fn picking_ahead_gives_what_frames_one_by_one_give() {
        // New flows to every kind of service (picked ahead or not, with affinity, hairpin and
        // masquerade), repeats, replies; a small table, so new flows evict.
        let pkts = mixed_traffic(400, 5, 90, (9, 4));
        // Tables each (the round-robin cursor lives in them), the same hash seed, so random and Maglev pick alike in both.
        let seeded = || {
            let mut w = worker(32);
            w.ct = Conntrack::with_seed(32, Timeouts::default(), w.conns.clone(), 7);
            w
        };
        let (mut one, mut all) = (seeded(), seeded());
        let expected = run(&pkts, 1, &mut one, &mixed_tables());
        let got = run(&pkts, 64, &mut all, &mixed_tables());
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
            panic!(
                "frame {i} ({:?}): {:?} vs one by one {:?}",
                &pkts[i][26..38],
                got[i],
                expected[i]
            );
        }
        assert!(all.ct.stats().evicted > 0);
        assert!(all.counters.snat_flows > 0 && all.counters.affinity_hits > 0);
        assert_eq!(format!("{:?}", one.counters), format!("{:?}", all.counters));
    }

    #[test]
    fn a_crowded_conntrack_index_gives_the_same_verdicts_in_batches() {
        // 64 flows over 8 index buckets (0.8 load against the 0.5 the sizing allows), so keys
        // overflow into their second bucket: the batch pipeline's probes (second line read
        // only on a non-zero count), its picks ahead and the new-flow and established fast
        // paths give what frames one by one give. New flows, repeats and replies.
        let pkts = mixed_traffic(600, 11, 70, (5, 3));
        // Room for every client's affinity (the affinity table's hash is seeded at random: an
        // eviction there would make the two runs differ for a reason of its own).
        let crowded = || {
            let cfg = WorkerConfig { conntrack_capacity: 32, ..WorkerConfig::default() };
            let mut w = WorkerState::new(&cfg, &Shared::new(16, 256));
            w.ct = Conntrack::crowded(32, 8, w.conns.clone(), 11);
            w
        };
        let (mut one, mut all) = (crowded(), crowded());
        let (t1, t64) = (mixed_tables(), mixed_tables());
        let (mut expected, mut got, mut most_second) = (Vec::new(), Vec::new(), 0);
        for part in pkts.chunks(100) {
            expected.extend(run(part, 1, &mut one, &t1));
            got.extend(run(part, 64, &mut all, &t64));
            most_second = most_second.max(all.ct.keys_in_second());
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
            panic!("frame {i}: {:?} vs one by one {:?}", got[i], expected[i]);
        }
        assert!(most_second >= 3, "keys in their second bucket: {most_second}");
        assert!(all.ct.stats().evicted > 0);
        assert_eq!(format!("{:?}", one.counters), format!("{:?}", all.counters));
    }

    #[test]
    fn a_batch_gives_what_frames_one_by_one_give() {
        // New flows, their repeats and their replies within one batch, plain traffic, junk; 150
        // frames, so more than one chunk. A small table, so new flows also evict.
        let mut pkts = Vec::new();
        for n in 0..150u32 {
            // A reply (n % 6 == 3) answers the packet just before it.
            let m = if n % 6 == 3 { n - 1 } else { n };
            let (c, s) = (CLIENT + 1 + m % 7, 1 + m % 3);
            let sport = 1000 + (m % 40) as u16;
            pkts.push(match n % 6 {
                0..=2 => udp(c, sport, VIP + s, 53),
                3 => udp(BACKEND + s, 5353, c, sport),
                4 => udp(c, sport, BACKEND + 9, 80),
                _ => b"junk".to_vec(),
            });
        }
        let t = tables();
        let (mut one, mut all) = (worker(16), worker(16));
        let expected = run(&pkts, 1, &mut one, &t);
        let got = run(&pkts, pkts.len(), &mut all, &t);
        assert_eq!(got, expected);
        assert!(expected.iter().any(|(v, _)| *v == Verdict::Tx { ifindex: 3 }));
        assert!(expected.iter().any(|(v, _)| *v == Verdict::Tx { ifindex: 2 }));
        assert!(all.ct.stats().evicted > 0);
        assert_eq!(format!("{:?}", one.counters), format!("{:?}", all.counters));
    }

    #[test]
    fn the_established_fast_path_gives_what_the_general_path_gives() {
        // A random mix of TCP (every flag combination that matters) and UDP packets in both
        // directions, TTLs that expire, time jumps past the timeouts, table generations that
        // move the routes, a small table that evicts, random batch sizes: the same frames
        // through two workers with the same conntrack seed, one with the fast path off, give
        // the same verdicts, bytes, counters and conntrack.
        use crate::balance::FastRng;
        // Services 1..=3 as `tables` (UDP), service 4 on 10.96.0.4:80/TCP.
        let build = |generation: u64, routes: Routes| {
            let mut b = Tables::builder(generation);
            for i in 1..=4u32 {
                let (proto, port, target) =
                    if i == 4 { (Protocol::Tcp, 80, 8080) } else { (Protocol::Udp, 53, 5353) };
                let spec = ServiceSpec {
                    id: i,
                    name: format!("t/svc-{i}"),
                    proto,
                    algorithm: Algorithm::Random,
                    affinity_timeout_s: None,
                    maglev_size: DEFAULT_MAGLEV_SIZE,
                };
                let backends = vec![Backend::ready(i, Ipv4Addr::from(BACKEND + i), target)];
                b.upsert_service(Arc::new(ServicePort::new(spec, backends))).unwrap();
                let fe = Frontend {
                    service: i,
                    kind: FrontendKind::ClusterIp,
                    masquerade_remote: false,
                };
                b.upsert_frontend(FrontendKey::new(Ipv4Addr::from(VIP + i), port, proto), fe)
                    .unwrap();
            }
            b.routes(routes).build()
        };
        // Generation 2 sends the backends out of interface 5, generation 3 has no route to
        // them (the kernel gets those packets).
        let mut moved = routes();
        let hop5 = NextHop { ifindex: 5, src_mac: [2, 0, 0, 0, 0, 5], dst_mac: [2, 0, 0, 0, 0, 6] };
        moved.add_prefix(Ipv4Addr::from(BACKEND), 24, hop5);
        let mut clients_only = Routes::default();
        let hop2 = NextHop { ifindex: 2, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2] };
        clients_only.add_prefix(Ipv4Addr::from(CLIENT), 16, hop2);
        let gens = [build(1, routes()), build(2, moved), build(3, clients_only)];

        let tcp = |src: u32, sport: u16, dst: u32, dport: u16, ttl: u8, flags: u8| {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
                .ipv4(Ipv4Addr::from(src).octets(), Ipv4Addr::from(dst).octets(), ttl)
                .tcp(sport, dport, 1000, 512);
            let mut out = Vec::with_capacity(b.size(4));
            b.write(&mut out, b"data").unwrap();
            // Flags at byte 14 + 20 + 13; the pipeline does not verify the TCP checksum.
            out[47] = flags;
            out
        };
        let flag_sets = [
            tcp_flags::SYN,
            tcp_flags::SYN | tcp_flags::ACK,
            tcp_flags::ACK,
            tcp_flags::ACK,
            tcp_flags::FIN | tcp_flags::ACK,
            tcp_flags::RST,
        ];
        let mut rng = FastRng::new(11);
        let mut r = |n: u64| rng.next_u64() % n;
        let (mut fast, mut general) = (worker(64), worker(64));
        for w in [&mut fast, &mut general] {
            w.ct = Conntrack::with_seed(64, Timeouts::default(), w.conns.clone(), 5);
        }
        general.general_only = true;
        let mut now = NS;
        let mut seen_tx = [0u32; 6];
        for _ in 0..400 {
            let t = &gens[r(3) as usize];
            let n = 1 + r(64) as usize;
            let pkts: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let (c, sport) = (CLIENT + 1 + r(5) as u32, 1000 + r(6) as u16);
                    let ttl = [64, 64, 64, 2, 1][r(5) as usize];
                    let s = 1 + r(4) as u32;
                    let reply = r(2) == 0;
                    if s == 4 {
                        let f = flag_sets[r(6) as usize];
                        if reply {
                            tcp(BACKEND + 4, 8080, c, sport, ttl, f)
                        } else {
                            tcp(c, sport, VIP + 4, 80, ttl, f)
                        }
                    } else if reply {
                        udp_ttl(BACKEND + s, 5353, c, sport, ttl)
                    } else {
                        udp_ttl(c, sport, VIP + s, 53, ttl)
                    }
                })
                .collect();
            let a = run_at(&pkts, n, &mut fast, t, now);
            let b = run_at(&pkts, n, &mut general, t, now);
            assert_eq!(a, b);
            for (v, _) in &a {
                if let Verdict::Tx { ifindex } = v {
                    seen_tx[*ifindex as usize] += 1;
                }
            }
            // Mostly within the timeouts, sometimes past UDP's and TCP's closing ones.
            now += [NS / 10, NS, 40 * NS, 200 * NS][r(4) as usize];
        }
        assert_eq!(format!("{:?}", fast.counters), format!("{:?}", general.counters));
        assert_eq!(format!("{:?}", fast.ct.stats()), format!("{:?}", general.ct.stats()));
        let flows = |w: &WorkerState| {
            let mut v: Vec<String> = w.ct.iter().map(|f| format!("{f:?}")).collect();
            v.sort();
            v
        };
        assert_eq!(flows(&fast), flows(&general));
        // The mix did reach every case: both egress interfaces, the moved route, expiries,
        // evictions, expiring TTLs, and the fast path itself.
        assert!(seen_tx[2] > 0 && seen_tx[3] > 0 && seen_tx[5] > 0, "{seen_tx:?}");
        let c = &fast.counters;
        assert!(c.passes(PassReason::TtlExpired) > 0 && c.passes(PassReason::NoNextHop) > 0);
        assert!(fast.ct.stats().expired > 0 && fast.ct.stats().evicted > 0);
        assert!(c.nat_forward > 100 && c.nat_reply > 100, "{c:?}");
    }

    /// `udp` with a given TTL.
    fn udp_ttl(src: u32, sport: u16, dst: u32, dport: u16, ttl: u8) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4(Ipv4Addr::from(src).octets(), Ipv4Addr::from(dst).octets(), ttl)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(4));
        b.write(&mut out, b"ping").unwrap();
        out
    }

    #[test]
    fn known_flows_follow_route_changes_and_go_to_the_kernel_without_a_route() {
        let t1 = tables();
        let mut w = worker(64);
        let (c, vip, be) = (CLIENT + 1, VIP + 1, BACKEND + 1);
        let fwd = udp(c, 1000, vip, 53);
        let reply = udp(be, 5353, c, 1000);
        // New flow, then a packet of it each way: the cached next hops.
        for _ in 0..2 {
            let out = run(&[fwd.clone(), reply.clone()], 2, &mut w, &t1);
            assert_eq!(out[0].0, Verdict::Tx { ifindex: 3 });
            assert_eq!(out[1].0, Verdict::Tx { ifindex: 2 });
            assert_eq!(out[1].1[12..], udp_ttl(vip, 53, c, 1000, 63)[12..]);
        }
        // Generation 2: the backends' route moves, the clients' goes away.
        let mut routes = Routes::default();
        let moved =
            NextHop { ifindex: 7, src_mac: [2, 0, 0, 0, 0, 7], dst_mac: [2, 0, 0, 0, 0, 8] };
        routes.add_prefix(Ipv4Addr::from(BACKEND), 16, moved);
        let t2 = t1.next().routes(routes.clone()).build();
        let out = run(&[fwd.clone(), reply.clone()], 2, &mut w, &t2);
        assert_eq!(out[0].0, Verdict::Tx { ifindex: 7 });
        assert_eq!(out[0].1[..12], [2, 0, 0, 0, 0, 8, 2, 0, 0, 0, 0, 7]);
        assert_eq!(out[0].1[14..], udp_ttl(c, 1000, be, 5353, 63)[14..]);
        // No route for the reply: the kernel gets it translated, TTL untouched.
        assert_eq!(out[1].0, Verdict::Pass(PassReason::NoNextHop));
        assert_eq!(out[1].1[12..], udp_ttl(vip, 53, c, 1000, 64)[12..]);
        assert_eq!((w.counters.nat_new, w.counters.nat_forward), (1, 2));
        assert_eq!(w.counters.nat_reply, 3);
        // Generation 3: the route is back.
        let hop = NextHop { ifindex: 2, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2] };
        routes.add_prefix(Ipv4Addr::from(CLIENT), 16, hop);
        let t3 = t2.next().routes(routes).build();
        let out = run(&[reply], 1, &mut w, &t3);
        assert_eq!(out[0].0, Verdict::Tx { ifindex: 2 });
        assert_eq!(out[0].1[12..], udp_ttl(vip, 53, c, 1000, 63)[12..]);
    }
}
