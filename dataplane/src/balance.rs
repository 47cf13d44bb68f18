//! Backend selection: the IPVS scheduler set plus random (kube-proxy's default) and Maglev.
//!
//! A [`Scheduler`] is built once per service port, when tables are compiled, over that port's
//! selectable backends (its [`Candidate`]s, in table order: sorted by backend id). Workers then
//! call [`Scheduler::pick`] once per *new* flow; established flows follow conntrack and never
//! come here. `pick` returns an index into the candidates slice.
//!
//! # The algorithms
//!
//! | name | [`Algorithm`] | picks |
//! |------|---------------|-------|
//! | `random` | `Random` | uniformly among candidates of weight > 0 (kube-proxy's iptables mode), by the 5-tuple hash |
//! | `rr` | `RoundRobin` | the next candidate of weight > 0, cycling in order |
//! | `wrr` | `WeightedRoundRobin` | IPVS's interleaved weighted sequence (see below) |
//! | `lc` | `LeastConnection` | fewest active connections; ties to the first |
//! | `wlc` | `WeightedLeastConnection` | least `active / weight`; ties to the first |
//! | `sed` | `ShortestExpectedDelay` | least `(active + 1) / weight`; ties to the first |
//! | `nq` | `NeverQueue` | the first with no active connection, else as `sed` |
//! | `sh` | `SourceHash` | a 256-bucket table filled by weight, indexed by the client address |
//! | `dh` | `DestinationHash` | the same table, indexed by the service (destination) address |
//! | `maglev` / `mh` | `Maglev` | Maglev table indexed by a fixed hash of the 5-tuple ([`crate::maglev`]) |
//!
//! The IPVS ones follow the Linux `ip_vs_*.c` schedulers:
//!
//! - **wrr**: with `g` the gcd of the positive weights, IPVS walks the list at a current weight
//!   `cw` that starts at `max - (g - 1)` and drops by `g` after each pass, choosing every
//!   backend with `weight >= cw`. Weights 3, 2, 1 give `a a b a b c`. One period holds
//!   `sum(weights) / g` picks and gives each backend exactly its weight's share. The period is
//!   precomputed here and walked by an atomic cursor. If a period would exceed
//!   [`WRR_MAX_SEQUENCE`] picks, weights are first scaled to `max(1, w * WRR_MAX_SEQUENCE / sum)`
//!   (so the period has at most `WRR_MAX_SEQUENCE + n` entries, and proportions are kept up to
//!   that rounding).
//! - **lc / wlc / sed / nq**: IPVS's overhead is `activeconns * 256 + inactconns`. Conntrack here
//!   counts only active connections ([`ConnCounts`]), so the overhead is `active` (lc, wlc) or
//!   `active + 1` (sed, nq). Ratios are compared by cross-multiplication in 64 bits
//!   (`a1 * w2 < a2 * w1`), never by division, exactly as IPVS does.
//! - **sh / dh**: IPVS fills 256 buckets in candidate order, each backend `weight` consecutive
//!   buckets, wrapping round until all are filled, and hashes the address with the kernel's
//!   `hash_32` (`addr * 0x61C88647 >> 24`). The table is precomputed, so the same address maps to
//!   the same backend for as long as the backend set and weights are unchanged. Because there are
//!   256 buckets, at most 256 weight units are represented: with more backends (or larger
//!   weights) than that, the candidates at the end of the order get no bucket, as in IPVS. Note
//!   that `dh` on a ClusterIP sends every flow of the service to one backend (the destination is
//!   always the service address); it is meant for destinations that vary (cache clusters).
//!
//! Deliberate differences from IPVS, all documented where they apply: weight-0 backends are
//! excluded from every algorithm, including the sh/dh bucket fill (IPVS gives them a bucket and
//! then refuses the flow); `dh` fills its buckets by weight as `sh` does (IPVS's `dh` gives every
//! backend one bucket per turn, which is the same when all weights are 1, kube-proxy's case) and
//! uses the same `hash_32` as modern `sh`; "overloaded" (an IPVS upper threshold) does not exist.
//!
//! # Invariants, and why
//!
//! - **No per-flow allocation, locking or table-sized work.** Everything that depends only on the
//!   candidate set (the random/rr eligible list, the wrr period, the sh/dh buckets, the Maglev
//!   table) is computed in [`Scheduler::new`]. `pick` is O(1) for all algorithms except the
//!   lc family, which scans the candidates as IPVS does.
//! - **Send + Sync, shared by all workers.** The only mutable state is the rr/wrr cursor, an
//!   `AtomicU64` advanced with a relaxed `fetch_add`: workers share one cycle, so rr and wrr are
//!   exact across the whole node (as IPVS's per-service state is), at the cost of one contended
//!   cache line per new flow. 64 bits never wrap in practice, so the cycle never skips.
//! - **Connection counts are per backend and shared by all workers** ([`ConnCounts`], relaxed
//!   atomics indexed by backend id). A flow is created on one worker but may be expired by
//!   another, and least-connection only means something when it sees every worker's flows;
//!   per-worker counts would each see a fraction and disagree. Relaxed reads may be a few flows
//!   stale under concurrency, which balancing tolerates (IPVS reads its counters the same way).
//! - **Random keys on the worker's keyed 5-tuple hash** ([`PickKey::flow_hash`], the worker's
//!   conntrack hash, seeded at random per table, so a client can neither predict nor aim it): each
//!   distinct 5-tuple is an independent uniform draw, which is what kube-proxy's `statistic
//!   mode random` rules give a new connection. What changes is that the same 5-tuple, should
//!   its conntrack entry be lost, draws the same backend again on this worker. The gain: the
//!   choice is a pure function of the packet and the tables, so the batch pipeline can make it
//!   ahead of time and start loading the new flow's reply-key conntrack lines before it needs
//!   them (see [`Scheduler::pick_is_pure`]).
//! - **Maglev keys on a fixed hash of the 5-tuple** ([`PickKey::tuple_hash`], i.e.
//!   [`maglev::tuple_hash`], constant-seeded), never on the per-worker keyed `flow_hash`: every
//!   worker and node builds the same table and hashes a tuple the same way, so a connection
//!   sticks to its backend even if its conntrack entry is lost, it moves to another worker, or
//!   an ECMP rehash lands it on another node (Maglev's point, as in Katran and Cilium). One
//!   client's connections still spread. Client stickiness is session affinity's job.
//! - **sh and dh key on the address alone** (IPVS's definition), with the kernel's fixed
//!   `hash_32`: the same on every worker and node too.
//! - **`None` means "no backend"**: no candidates, or none with weight > 0.

use core::fmt;
use core::str::FromStr;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::maglev;
use crate::tables::BackendId;

/// A balancing algorithm, chosen per service port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Uniform random over the selectable backends (kube-proxy's iptables mode).
    #[default]
    Random,
    /// IPVS `rr`.
    RoundRobin,
    /// IPVS `wrr`.
    WeightedRoundRobin,
    /// IPVS `lc`.
    LeastConnection,
    /// IPVS `wlc`.
    WeightedLeastConnection,
    /// IPVS `sh`.
    SourceHash,
    /// IPVS `dh`.
    DestinationHash,
    /// IPVS `sed`.
    ShortestExpectedDelay,
    /// IPVS `nq`.
    NeverQueue,
    /// Maglev consistent hashing (IPVS `mh`).
    Maglev,
}

impl Algorithm {
    /// Every algorithm, in declaration order.
    pub const ALL: [Algorithm; 10] = [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnection,
        Algorithm::WeightedLeastConnection,
        Algorithm::SourceHash,
        Algorithm::DestinationHash,
        Algorithm::ShortestExpectedDelay,
        Algorithm::NeverQueue,
        Algorithm::Maglev,
    ];

    /// Short name, as shown by [`fmt::Display`]: the IPVS scheduler name (`rr`, `wrr`, `lc`,
    /// `wlc`, `sh`, `dh`, `sed`, `nq`), or `random` and `maglev`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "rr",
            Algorithm::WeightedRoundRobin => "wrr",
            Algorithm::LeastConnection => "lc",
            Algorithm::WeightedLeastConnection => "wlc",
            Algorithm::SourceHash => "sh",
            Algorithm::DestinationHash => "dh",
            Algorithm::ShortestExpectedDelay => "sed",
            Algorithm::NeverQueue => "nq",
            Algorithm::Maglev => "maglev",
        }
    }

    /// The IPVS scheduler name (`ipvsadm -s`), if IPVS has this algorithm: `mh` for Maglev,
    /// none for random.
    pub fn ipvs_name(self) -> Option<&'static str> {
        match self {
            Algorithm::Random => None,
            Algorithm::Maglev => Some("mh"),
            other => Some(other.name()),
        }
    }

    /// The configuration (serde, kebab-case) name, e.g. `weighted-round-robin`.
    pub fn config_name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::WeightedRoundRobin => "weighted-round-robin",
            Algorithm::LeastConnection => "least-connection",
            Algorithm::WeightedLeastConnection => "weighted-least-connection",
            Algorithm::SourceHash => "source-hash",
            Algorithm::DestinationHash => "destination-hash",
            Algorithm::ShortestExpectedDelay => "shortest-expected-delay",
            Algorithm::NeverQueue => "never-queue",
            Algorithm::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// unknown balancing algorithm {0:?} (expected random, rr, wrr, lc, wlc, sh, dh, sed, nq or maglev)
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown balancing algorithm {0:?} (expected random, rr, wrr, lc, wlc, sh, dh, sed, nq or maglev)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Accepts, ignoring ASCII case, the short name ([`Algorithm::name`]), the IPVS name
    /// (so also `mh`) and the configuration name ([`Algorithm::config_name`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Algorithm::ALL
            .into_iter()
            .find(|a| {
                s.eq_ignore_ascii_case(a.name())
                    || s.eq_ignore_ascii_case(a.config_name())
                    || a.ipvs_name().is_some_and(|n| s.eq_ignore_ascii_case(n))
            })
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

/// A backend as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Stable backend id (never 0).
    pub id: BackendId,
    /// Address, host order.
    pub ip: u32,
    /// Port.
    pub port: u16,
    /// Weight (0 means never chosen by weighted algorithms).
    pub weight: u16,
    /// Whether the backend runs on this node (decides masquerading for external frontends).
    pub local: bool,
}

/// What a new flow offers to hash on: its 5-tuple (to the service) and the worker's hash of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickKey {
    /// Client address.
    pub src_ip: u32,
    /// Service address.
    pub dst_ip: u32,
    /// Client port.
    pub src_port: u16,
    /// Service port.
    pub dst_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// The worker's keyed hash of the whole 5-tuple (its conntrack hash): random per worker,
    /// used by `random` only.
    pub flow_hash: u64,
}

impl PickKey {
    /// The fixed (unkeyed) hash of the 5-tuple, the same on every worker and node: Maglev's
    /// key ([`maglev::tuple_hash`]).
    #[inline(always)]
    pub fn tuple_hash(&self) -> u64 {
        maglev::tuple_hash(self.src_ip, self.dst_ip, self.src_port, self.dst_port, self.proto)
    }
}

/// Per-backend connection counts shared by all workers, indexed by backend id: the flows of
/// services whose scheduler reads them ([`Scheduler::reads_conns`]; see
/// [`crate::conntrack::Flow::counted`]).
pub struct ConnCounts {
    active: Box<[AtomicU32]>,
}

impl ConnCounts {
    /// Counts for backend ids `0..capacity`.
    pub fn new(capacity: usize) -> Self {
        Self { active: (0..capacity).map(|_| AtomicU32::new(0)).collect() }
    }
    /// How many backend ids are counted (`0..capacity`).
    pub fn capacity(&self) -> usize {
        self.active.len()
    }
    /// Current active connections of `id` (0 for ids out of range).
    #[inline]
    pub fn active(&self, id: BackendId) -> u32 {
        self.active.get(id as usize).map_or(0, |a| a.load(Ordering::Relaxed))
    }
    /// One more connection to `id`.
    #[inline]
    pub fn inc(&self, id: BackendId) {
        if let Some(a) = self.active.get(id as usize) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Starts loading the counter of `id` (a flow to or from it is about to be created or
    /// removed).
    #[inline(always)]
    pub fn prefetch(&self, id: BackendId) {
        crate::mem::prefetch(self.active.as_ptr().wrapping_add(id as usize));
    }
    /// One fewer connection to `id` (saturating at 0).
    #[inline]
    pub fn dec(&self, id: BackendId) {
        if let Some(a) = self.active.get(id as usize) {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }
}

/// A small fast PRNG (xorshift64*), for tests and benchmarks that need reproducible draws (the
/// schedulers themselves draw nothing: random picks by the 5-tuple hash).
#[derive(Clone, Debug)]
pub struct FastRng(u64);

impl FastRng {
    /// Seeds the generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }
    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift.
    #[inline]
    pub fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next_u64() as u32) * u64::from(n)) >> 32) as u32
    }
}

/// Longest weighted round-robin period kept before weights are scaled down (see the module
/// docs).
pub const WRR_MAX_SEQUENCE: u64 = 65_536;
/// Number of source/destination hash buckets (IPVS's default `IP_VS_SH_TAB_BITS` = 8).
pub const HASH_BUCKETS: usize = 1 << HASH_BITS;
const HASH_BITS: u32 = 8;
/// The kernel's `GOLDEN_RATIO_32`, the multiplier of `hash_32`.
const GOLDEN_RATIO_32: u32 = 0x61c8_8647;
/// Most candidates a scheduler considers (indices are `u16`; the tables never hold more).
pub const MAX_CANDIDATES: usize = u16::MAX as usize;

/// Prepared, immutable selection state for one service port, built off the hot path.
pub struct Scheduler {
    algorithm: Algorithm,
    /// Number of candidates given to [`Scheduler::new`] (at most [`MAX_CANDIDATES`]).
    n: u32,
    /// Candidate indices prepared for the algorithm: the candidates of weight > 0 in order
    /// (random, rr), one wrr period, the sh/dh buckets, or the Maglev table; empty for the
    /// lc family (they scan) and when no candidate has a weight.
    table: Box<[u16]>,
    /// Position in `table` for rr and wrr, shared by all workers.
    cursor: AtomicU64,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The table can hold 65 537 entries; show its size, not its content.
        f.debug_struct("Scheduler")
            .field("algorithm", &self.algorithm)
            .field("candidates", &self.n)
            .field("table_len", &self.table.len())
            .field("cursor", &self.cursor.load(Ordering::Relaxed))
            .finish()
    }
}

impl Scheduler {
    /// Prepares selection over `candidates` (the selectable backends, in their table order).
    ///
    /// `maglev_size` is used only by [`Algorithm::Maglev`] and is normalized by
    /// [`maglev::table_size`] (0 means the default 65 537; otherwise clamped to
    /// 251..=131 071 and rounded up to a prime). Only the first [`MAX_CANDIDATES`] candidates
    /// are considered.
    pub fn new(algorithm: Algorithm, candidates: &[Candidate], maglev_size: u32) -> Self {
        let candidates = &candidates[..candidates.len().min(MAX_CANDIDATES)];
        let table: Box<[u16]> = match algorithm {
            Algorithm::Random | Algorithm::RoundRobin => {
                weighted(candidates).map(|(i, _)| i).collect()
            }
            Algorithm::WeightedRoundRobin => wrr_sequence(candidates).into(),
            Algorithm::SourceHash | Algorithm::DestinationHash => hash_buckets(candidates),
            Algorithm::Maglev => {
                let backends: Vec<(u64, u16)> = candidates
                    .iter()
                    .map(|c| (maglev::identity_hash(c.ip, c.port), c.weight))
                    .collect();
                maglev::build(&backends, maglev_size)
            }
            Algorithm::LeastConnection
            | Algorithm::WeightedLeastConnection
            | Algorithm::ShortestExpectedDelay
            | Algorithm::NeverQueue => Box::default(),
        };
        Self { algorithm, n: candidates.len() as u32, table, cursor: AtomicU64::new(0) }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The Maglev lookup table (entries are candidate indices), for table dumps and diffs;
    /// `None` for other algorithms. Empty when no candidate has a weight.
    pub fn maglev_table(&self) -> Option<&[u16]> {
        (self.algorithm == Algorithm::Maglev).then_some(&*self.table)
    }

    /// Picks an index into the candidates given to [`Scheduler::new`]; `None` when there are
    /// none (or none with a usable weight).
    ///
    /// `candidates` must be the slice given to `new` (the lc family reads weights and ids from
    /// it; the other algorithms only bound-check against it). `key` is used by random
    /// (`flow_hash`), Maglev (the whole tuple, [`PickKey::tuple_hash`]), sh (`src_ip`) and dh
    /// (`dst_ip`); `conns` by the lc family.
    #[inline]
    pub fn pick(&self, candidates: &[Candidate], key: &PickKey, conns: &ConnCounts) -> Option<u16> {
        self.select(candidates, key, conns, true)
    }

    /// What [`Scheduler::pick`] would return now, without its side effects: the round-robin
    /// position does not move (the next connection gets this answer). For the inspect CLI's
    /// flow query.
    pub fn peek(&self, candidates: &[Candidate], key: &PickKey, conns: &ConnCounts) -> Option<u16> {
        self.select(candidates, key, conns, false)
    }

    /// Whether [`Scheduler::pick`] is a pure function of its key and the candidates (random,
    /// sh, dh, Maglev): no cursor, no connection counts. The batch pipeline then picks ahead of
    /// time to prefetch what the new flow will touch.
    #[inline]
    pub fn pick_is_pure(&self) -> bool {
        matches!(
            self.algorithm,
            Algorithm::Random
                | Algorithm::SourceHash
                | Algorithm::DestinationHash
                | Algorithm::Maglev
        )
    }

    /// Whether this is a random pick over candidates that all have a weight (kube-proxy's
    /// case): the pick is then [`uniform_pick`] of the flow hash and the number of
    /// candidates, and reads nothing but the picked candidate.
    #[inline]
    pub fn is_uniform_random(&self) -> bool {
        self.algorithm == Algorithm::Random && self.n > 0 && self.table.len() == self.n as usize
    }

    /// Whether picks read the backend connection counts (IPVS lc, wlc, sed, nq): only flows
    /// of such services are counted ([`crate::conntrack::Flow::counted`]).
    #[inline]
    pub fn reads_conns(&self) -> bool {
        matches!(
            self.algorithm,
            Algorithm::LeastConnection
                | Algorithm::WeightedLeastConnection
                | Algorithm::ShortestExpectedDelay
                | Algorithm::NeverQueue
        )
    }

    /// Starts loading what a pick for `key` will read: for random over candidates that all
    /// have a weight (kube-proxy's case: the table is the identity and is skipped), the one
    /// candidate it picks; otherwise the table (Maglev: the one entry `key` selects; the others
    /// when small) and the candidates (up to 1 KiB).
    #[inline(always)]
    pub fn prefetch(&self, candidates: &[Candidate], key: &PickKey) {
        let (t, len) = (self.table.as_ptr(), self.table.len());
        match self.algorithm {
            Algorithm::Random if self.is_uniform_random() => {
                let i = uniform_pick(key.flow_hash, candidates.len());
                crate::mem::prefetch(candidates.as_ptr().wrapping_add(usize::from(i)));
                return;
            }
            Algorithm::Maglev if len > 0 => {
                crate::mem::prefetch(t.wrapping_add((key.tuple_hash() % len as u64) as usize))
            }
            _ if len > 0 && len <= 32 => {
                crate::mem::prefetch(t);
                crate::mem::prefetch(t.wrapping_add(len - 1));
            }
            _ => {}
        }
        crate::mem::prefetch_bytes(candidates.as_ptr(), size_of_val(candidates));
    }

    #[inline(always)]
    fn select(
        &self,
        candidates: &[Candidate],
        key: &PickKey,
        conns: &ConnCounts,
        advance: bool,
    ) -> Option<u16> {
        debug_assert_eq!(
            candidates.len().min(MAX_CANDIDATES),
            self.n as usize,
            "pick() needs the candidates given to new()"
        );
        let index = match self.algorithm {
            Algorithm::Random => {
                let len = self.table.len() as u32;
                if len == 0 {
                    return None;
                }
                // Every candidate has a weight: the table is the identity, not read.
                if len == self.n {
                    uniform_pick(key.flow_hash, len as usize)
                } else {
                    self.table[hash_below(key.flow_hash, len) as usize]
                }
            }
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => {
                let len = self.table.len() as u64;
                if len == 0 {
                    return None;
                }
                let at = if advance {
                    self.cursor.fetch_add(1, Ordering::Relaxed)
                } else {
                    self.cursor.load(Ordering::Relaxed)
                } % len;
                self.table[at as usize]
            }
            Algorithm::LeastConnection => least_connection(candidates, conns)?,
            Algorithm::WeightedLeastConnection => weighted_least(candidates, conns, 0, false)?,
            Algorithm::ShortestExpectedDelay => weighted_least(candidates, conns, 1, false)?,
            Algorithm::NeverQueue => weighted_least(candidates, conns, 1, true)?,
            Algorithm::SourceHash => *self.table.get(hash_bucket(key.src_ip))?,
            Algorithm::DestinationHash => *self.table.get(hash_bucket(key.dst_ip))?,
            Algorithm::Maglev => {
                let m = self.table.len() as u64;
                if m == 0 {
                    return None;
                }
                self.table[(key.tuple_hash() % m) as usize]
            }
        };
        // Cheap guard against a caller passing a different slice than `new` got.
        (usize::from(index) < candidates.len()).then_some(index)
    }
}

/// The candidate a random scheduler picks for a flow whose hash is `flow_hash`, among `n > 0`
/// candidates that all have a weight ([`Scheduler::is_uniform_random`]).
#[inline(always)]
pub fn uniform_pick(flow_hash: u64, n: usize) -> u16 {
    hash_below(flow_hash, n.min(MAX_CANDIDATES) as u32) as u16
}

/// Uniform in `0..n` (n > 0) from a 64-bit hash: the hash is mixed (so its bits that chose the
/// flow's conntrack buckets do not decide alone), then Lemire's multiply-shift.
#[inline(always)]
fn hash_below(h: u64, n: u32) -> u32 {
    let x = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (((x >> 32) * u64::from(n)) >> 32) as u32
}

/// The candidates of weight > 0 with their indices, in order.
fn weighted(candidates: &[Candidate]) -> impl Iterator<Item = (u16, u16)> + '_ {
    candidates
        .iter()
        .take(MAX_CANDIDATES)
        .enumerate()
        .filter(|(_, c)| c.weight > 0)
        .map(|(i, c)| (i as u16, c.weight))
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One period of IPVS's weighted round-robin over `candidates` (see the module docs).
fn wrr_sequence(candidates: &[Candidate]) -> Vec<u16> {
    let mut eligible: Vec<(u16, u64)> =
        weighted(candidates).map(|(i, w)| (i, u64::from(w))).collect();
    if eligible.is_empty() {
        return Vec::new();
    }
    let sum: u64 = eligible.iter().map(|&(_, w)| w).sum();
    let g = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w));
    if sum / g > WRR_MAX_SEQUENCE {
        for (_, w) in &mut eligible {
            *w = (*w * WRR_MAX_SEQUENCE / sum).max(1);
        }
    }
    let g = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w));
    let max = eligible.iter().map(|&(_, w)| w).max().unwrap_or(1);
    // Distinct weights, largest first: the set of backends with `weight >= cw` only changes when
    // `cw` passes one of them, so it is rebuilt at most once per distinct weight and the whole
    // build costs O(period + distinct weights * n).
    let mut distinct: Vec<u64> = eligible.iter().map(|&(_, w)| w).collect();
    distinct.sort_unstable_by(|a, b| b.cmp(a));
    distinct.dedup();
    let mut next_distinct = 0;
    let mut chosen: Vec<u16> = Vec::new();
    let period: u64 = eligible.iter().map(|&(_, w)| w / g).sum();
    let mut seq = Vec::with_capacity(period as usize);
    // IPVS: mw = max - (di - 1); cw starts at mw and drops by di while it stays positive.
    let mut cw = max - (g - 1);
    loop {
        if next_distinct < distinct.len() && distinct[next_distinct] >= cw {
            while next_distinct < distinct.len() && distinct[next_distinct] >= cw {
                next_distinct += 1;
            }
            chosen = eligible.iter().filter(|&&(_, w)| w >= cw).map(|&(i, _)| i).collect();
        }
        seq.extend_from_slice(&chosen);
        if cw <= g {
            break;
        }
        cw -= g;
    }
    debug_assert_eq!(seq.len() as u64, period);
    seq
}

/// IPVS's sh/dh bucket fill: in candidate order, each candidate of weight > 0 takes `weight`
/// consecutive buckets, wrapping round the candidates until all buckets are taken.
fn hash_buckets(candidates: &[Candidate]) -> Box<[u16]> {
    let eligible: Vec<(u16, u16)> = weighted(candidates).collect();
    if eligible.is_empty() {
        return Box::default();
    }
    eligible
        .iter()
        .cycle()
        .flat_map(|&(i, w)| core::iter::repeat_n(i, usize::from(w)))
        .take(HASH_BUCKETS)
        .collect()
}

/// The kernel's `hash_32(addr, 8)`: the top bits of a golden-ratio multiplication.
#[inline]
fn hash_bucket(addr: u32) -> usize {
    (addr.wrapping_mul(GOLDEN_RATIO_32) >> (32 - HASH_BITS)) as usize
}

/// IPVS `lc`: fewest active connections among candidates of weight > 0; ties to the first.
#[inline]
fn least_connection(candidates: &[Candidate], conns: &ConnCounts) -> Option<u16> {
    let mut least: Option<(u16, u32)> = None;
    for (i, c) in candidates.iter().take(MAX_CANDIDATES).enumerate() {
        if c.weight == 0 {
            continue;
        }
        let active = conns.active(c.id);
        if least.is_none_or(|(_, l)| active < l) {
            least = Some((i as u16, active));
        }
    }
    least.map(|(i, _)| i)
}

/// IPVS `wlc` (`extra` = 0) and `sed` (`extra` = 1): least `(active + extra) / weight` among
/// candidates of weight > 0, compared by cross-multiplication; ties to the first. With
/// `idle_first` (IPVS `nq`), the first candidate with no active connection wins outright.
#[inline]
fn weighted_least(
    candidates: &[Candidate],
    conns: &ConnCounts,
    extra: u64,
    idle_first: bool,
) -> Option<u16> {
    // (index, overhead, weight) of the best so far.
    let mut least: Option<(u16, u64, u64)> = None;
    for (i, c) in candidates.iter().take(MAX_CANDIDATES).enumerate() {
        if c.weight == 0 {
            continue;
        }
        let active = conns.active(c.id);
        if idle_first && active == 0 {
            return Some(i as u16);
        }
        let (overhead, weight) = (u64::from(active) + extra, u64::from(c.weight));
        // overhead / weight < l_overhead / l_weight, as IPVS writes it: loh * dw > doh * lw.
        if least.is_none_or(|(_, lo, lw)| lo * weight > overhead * lw) {
            least = Some((i as u16, overhead, weight));
        }
    }
    least.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Candidates with ids 1.., addresses 10.0.0.1.. port 80, and the given weights.
    fn cands(weights: &[u16]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                id: i as BackendId + 1,
                ip: 0x0a00_0001 + i as u32,
                port: 80,
                weight,
                local: true,
            })
            .collect()
    }

    /// Connection counts with `active[i]` connections on candidate `i` (id `i + 1`).
    fn conns(active: &[u32]) -> ConnCounts {
        let counts = ConnCounts::new(active.len() + 1);
        for (i, &a) in active.iter().enumerate() {
            for _ in 0..a {
                counts.inc(i as BackendId + 1);
            }
        }
        counts
    }

    fn pick_one(alg: Algorithm, weights: &[u16], active: &[u32]) -> Option<u16> {
        let c = cands(weights);
        let s = Scheduler::new(alg, &c, 0);
        s.pick(&c, &PickKey::default(), &conns(active))
    }

    /// `count` successive picks for as many flows: fixed addresses, random 5-tuple hashes.
    fn picks(s: &Scheduler, c: &[Candidate], count: usize) -> Vec<u16> {
        let (counts, mut rng) = (ConnCounts::new(c.len() + 1), FastRng::new(7));
        (0..count)
            .map(|_| {
                let key = PickKey { flow_hash: rng.next_u64(), ..PickKey::default() };
                s.pick(c, &key, &counts).unwrap()
            })
            .collect()
    }

    fn histogram(picks: impl IntoIterator<Item = u16>, n: usize) -> Vec<usize> {
        let mut h = vec![0; n];
        for p in picks {
            h[usize::from(p)] += 1;
        }
        h
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
            assert_eq!(a.config_name().parse::<Algorithm>(), Ok(a));
            assert_eq!(a.name().to_uppercase().parse::<Algorithm>(), Ok(a));
            if let Some(n) = a.ipvs_name() {
                assert_eq!(n.parse::<Algorithm>(), Ok(a));
            }
            // The configuration names are the serde names.
            let de =
                serde::de::value::StrDeserializer::<serde::de::value::Error>::new(a.config_name());
            assert_eq!(<Algorithm as serde::Deserialize>::deserialize(de), Ok(a));
        }
        let short: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
        assert_eq!(short, ["random", "rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq", "maglev"]);
        assert_eq!("mh".parse(), Ok(Algorithm::Maglev));
        assert_eq!(Algorithm::Maglev.ipvs_name(), Some("mh"));
        assert_eq!(Algorithm::Random.ipvs_name(), None);
        assert_eq!(Algorithm::default(), Algorithm::Random);
        let err = "lblc".parse::<Algorithm>().unwrap_err();
        assert_eq!(err, UnknownAlgorithm("lblc".into()));
        assert!(err.to_string().contains("unknown balancing algorithm \"lblc\""));
    }

    #[test]
    fn scheduler_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Scheduler>();
        check::<ConnCounts>();
    }

    #[test]
    fn every_algorithm_returns_none_without_a_usable_candidate() {
        for a in Algorithm::ALL {
            assert_eq!(pick_one(a, &[], &[]), None, "{a}: no candidates");
            assert_eq!(pick_one(a, &[0, 0, 0], &[0, 0, 0]), None, "{a}: all weights 0");
            assert!(pick_one(a, &[0, 1, 0], &[0, 0, 0]) == Some(1), "{a}: only candidate 1");
        }
    }

    #[test]
    fn random_is_a_function_of_the_flow_hash_alone() {
        let c = cands(&[1; 7]);
        let s = Scheduler::new(Algorithm::Random, &c, 0);
        assert!(s.pick_is_pure());
        let counts = ConnCounts::new(8);
        let mut rng = FastRng::new(42);
        for _ in 0..1000 {
            let flow_hash = rng.next_u64();
            let key = PickKey {
                src_ip: 0x0a80_0001,
                dst_ip: 0x0a60_0001,
                flow_hash,
                ..PickKey::default()
            };
            let want = hash_below(flow_hash, 7) as u16;
            assert_eq!(s.pick(&c, &key, &counts), Some(want));
            // The addresses, the connection counts and earlier picks do not matter.
            counts.inc(c[usize::from(want)].id);
            let other = PickKey { src_ip: 1, dst_ip: 2, flow_hash, ..PickKey::default() };
            assert_eq!(s.pick(&c, &other, &counts), Some(want));
            assert_eq!(s.peek(&c, &other, &counts), Some(want));
        }
        for a in Algorithm::ALL {
            let pure = matches!(
                a,
                Algorithm::Random
                    | Algorithm::SourceHash
                    | Algorithm::DestinationHash
                    | Algorithm::Maglev
            );
            assert_eq!(Scheduler::new(a, &c, 0).pick_is_pure(), pure, "{a}");
        }
    }

    #[test]
    fn random_is_uniform_over_sequential_and_structured_hashes() {
        // However the hashes are laid out (sequential, or differing only in the bits that
        // chose the conntrack buckets, or only above them), the picks spread evenly.
        let c = cands(&[1; 10]);
        let s = Scheduler::new(Algorithm::Random, &c, 0);
        let counts = ConnCounts::new(11);
        let n = 100_000u64;
        let layouts: [fn(u64) -> u64; 3] = [|i| i, |i| i << 32, |i| (i << 48) | 0x1234_5678];
        for layout in layouts {
            let h = histogram(
                (0..n).map(|i| {
                    let key = PickKey { flow_hash: layout(i), ..PickKey::default() };
                    s.pick(&c, &key, &counts).unwrap()
                }),
                10,
            );
            let expected = n as f64 / 10.0;
            let chi2: f64 = h.iter().map(|&x| (x as f64 - expected).powi(2) / expected).sum();
            // 9 degrees of freedom: p = 0.001 at 27.88.
            assert!(chi2 < 27.88, "chi-square {chi2}, histogram {h:?}");
        }
    }

    #[test]
    fn random_is_uniform_over_positive_weights() {
        // Weights other than 0 do not matter: kube-proxy's random is uniform.
        let c = cands(&[1, 5, 0, 1, 2]);
        let s = Scheduler::new(Algorithm::Random, &c, 0);
        let n = 100_000;
        let h = histogram(picks(&s, &c, n), c.len());
        assert_eq!(h[2], 0, "weight 0 chosen");
        let expected = n as f64 / 4.0;
        let mut chi2 = 0.0;
        for i in [0, 1, 3, 4] {
            let d = h[i] as f64 - expected;
            assert!(d.abs() / expected < 0.02, "candidate {i}: {} of {n}", h[i]);
            chi2 += d * d / expected;
        }
        // 3 degrees of freedom: p = 0.001 at 16.27.
        assert!(chi2 < 16.27, "chi-square {chi2}, histogram {h:?}");
    }

    #[test]
    fn round_robin_cycles_in_order_skipping_weight_zero() {
        let c = cands(&[1, 0, 7, 1]);
        let s = Scheduler::new(Algorithm::RoundRobin, &c, 0);
        assert_eq!(picks(&s, &c, 9), [0, 2, 3, 0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn round_robin_is_exact_across_workers() {
        let c = Arc::new(cands(&[1, 1, 1]));
        let s = Arc::new(Scheduler::new(Algorithm::RoundRobin, &c, 0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (s, c) = (Arc::clone(&s), Arc::clone(&c));
                std::thread::spawn(move || histogram(picks(&s, &c, 3000), 3))
            })
            .collect();
        let mut total = [0; 3];
        for w in workers {
            for (t, h) in total.iter_mut().zip(w.join().unwrap()) {
                *t += h;
            }
        }
        assert_eq!(total, [4000; 3]);
    }

    /// IPVS's `ip_vs_wrr_schedule` as written (state `cl`, `cw`, `mw`, `di`), without the
    /// overload paths, which cannot trigger here: the reference the precomputed period must match.
    fn ipvs_wrr(weights: &[u16], count: usize) -> Vec<Option<u16>> {
        let w: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
        let di = w.iter().filter(|&&w| w > 0).fold(0, |g, &w| gcd(g, w as u64)).max(1) as i64;
        let mw = w.iter().copied().max().unwrap_or(0) - (di - 1);
        let (mut cw, mut cl) = (mw, None::<usize>);
        (0..count)
            .map(|_| {
                if mw == 0 {
                    return None;
                }
                let mut dest = cl;
                loop {
                    let start = dest.map_or(0, |d| d + 1);
                    if let Some(d) = (start..w.len()).find(|&d| w[d] >= cw) {
                        cl = Some(d);
                        return Some(d as u16);
                    }
                    dest = None;
                    cw -= di;
                    if cw <= 0 {
                        cw = mw;
                    }
                }
            })
            .collect()
    }

    #[test]
    fn wrr_3_2_1_is_the_ipvs_sequence_and_exactly_proportional() {
        let c = cands(&[3, 2, 1]);
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
        // cw = 3: a; cw = 2: a b; cw = 1: a b c.
        assert_eq!(picks(&s, &c, 12), [0, 0, 1, 0, 1, 2, 0, 0, 1, 0, 1, 2]);
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
        assert_eq!(histogram(picks(&s, &c, 6000), 3), [3000, 2000, 1000]);
    }

    #[test]
    fn wrr_steps_by_the_gcd_and_skips_weight_zero() {
        // g = 2, cw starts at 4 - 1 = 3: a; then 1: a b.
        let c = cands(&[4, 2]);
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
        assert_eq!(picks(&s, &c, 6), [0, 0, 1, 0, 0, 1]);
        // g = 2, cw = 5: d; 3: a d; 1: a b d.
        let w = [4, 2, 0, 6];
        let c = cands(&w);
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
        assert_eq!(picks(&s, &c, 6), [3, 0, 3, 0, 1, 3]);
        let expected: Vec<u16> = ipvs_wrr(&w, 6).into_iter().map(Option::unwrap).collect();
        assert_eq!(picks(&s, &c, 6), expected);
    }

    #[test]
    fn wrr_scales_huge_periods_and_keeps_proportions() {
        let c = cands(&[60_000, 30_000, 1]);
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
        // Scaled to 43 690, 21 845 and 1 (raised from 0): one period of 65 536.
        assert_eq!(s.table.len(), 65_536);
        let h = histogram(s.table.iter().copied(), 3);
        assert_eq!(h, [43_690, 21_845, 1]);
        // Many backends with large co-prime weights: bounded by WRR_MAX_SEQUENCE + n.
        let w: Vec<u16> = (0..2000).map(|i| 65_535 - i).collect();
        let s = Scheduler::new(Algorithm::WeightedRoundRobin, &cands(&w), 0);
        assert!(s.table.len() as u64 <= WRR_MAX_SEQUENCE + 2000, "{}", s.table.len());
        assert!(s.table.len() as u64 >= WRR_MAX_SEQUENCE / 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The precomputed period walked by the cursor is exactly what IPVS's scheduler yields.
        #[test]
        fn wrr_matches_the_ipvs_scheduler(weights in proptest::collection::vec(0u16..12, 1..9)) {
            let c = cands(&weights);
            let s = Scheduler::new(Algorithm::WeightedRoundRobin, &c, 0);
            let period: u64 = {
                let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w))).max(1);
                weights.iter().map(|&w| u64::from(w) / g).sum()
            };
            let count = 3 * period as usize + 5;
            let counts = ConnCounts::new(c.len() + 1);
            let ours: Vec<Option<u16>> = (0..count)
                .map(|_| s.pick(&c, &PickKey::default(), &counts))
                .collect();
            prop_assert_eq!(ours, ipvs_wrr(&weights, count));
        }
    }

    #[test]
    fn lc_picks_fewest_active_first_on_ties() {
        use Algorithm::LeastConnection as Lc;
        assert_eq!(pick_one(Lc, &[1, 1, 1, 1], &[3, 1, 1, 2]), Some(1));
        // Weight is ignored except 0, which is never chosen even when idle.
        assert_eq!(pick_one(Lc, &[0, 1, 9], &[0, 2, 3]), Some(1));
        assert_eq!(pick_one(Lc, &[1, 1, 1], &[0, 0, 0]), Some(0));
    }

    #[test]
    fn lc_follows_inc_and_dec() {
        let c = cands(&[1, 1, 1]);
        let s = Scheduler::new(Algorithm::LeastConnection, &c, 0);
        let counts = ConnCounts::new(4);
        let key = PickKey::default();
        // Each new flow is counted on its backend, so lc deals them out in turn.
        let mut got = Vec::new();
        for _ in 0..6 {
            let i = s.pick(&c, &key, &counts).unwrap();
            counts.inc(c[usize::from(i)].id);
            got.push(i);
        }
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
        counts.dec(c[2].id);
        assert_eq!(s.pick(&c, &key, &counts), Some(2));
    }

    #[test]
    fn wlc_picks_least_active_per_weight() {
        use Algorithm::WeightedLeastConnection as Wlc;
        // 1/1, 1/2, 1/3.
        assert_eq!(pick_one(Wlc, &[1, 2, 3], &[1, 1, 1]), Some(2));
        // 0/1 beats everything.
        assert_eq!(pick_one(Wlc, &[1, 2, 3], &[0, 5, 9]), Some(0));
        // 4/2 vs 3/1: candidate 0.
        assert_eq!(pick_one(Wlc, &[2, 1], &[4, 3]), Some(0));
        // Tie 2/1 = 4/2: the first.
        assert_eq!(pick_one(Wlc, &[1, 2], &[2, 4]), Some(0));
        // Weight 0 is never chosen, even idle.
        assert_eq!(pick_one(Wlc, &[0, 1], &[0, 7]), Some(1));
    }

    #[test]
    fn sed_counts_the_new_connection() {
        use Algorithm::{ShortestExpectedDelay as Sed, WeightedLeastConnection as Wlc};
        // wlc: 0/1 < 1/3; sed: (0+1)/1 > (1+1)/3.
        assert_eq!(pick_one(Wlc, &[1, 3], &[0, 1]), Some(0));
        assert_eq!(pick_one(Sed, &[1, 3], &[0, 1]), Some(1));
        // Tie (1+1)/1 = (3+1)/2: the first.
        assert_eq!(pick_one(Sed, &[1, 2], &[1, 3]), Some(0));
        assert_eq!(pick_one(Sed, &[1, 1], &[0, 0]), Some(0));
        assert_eq!(pick_one(Sed, &[0, 1], &[0, 5]), Some(1));
    }

    #[test]
    fn nq_prefers_an_idle_backend_then_sed() {
        use Algorithm::{NeverQueue as Nq, ShortestExpectedDelay as Sed};
        // sed: 2/1, 1/1, 6/10 -> 2; nq takes the idle one.
        assert_eq!(pick_one(Sed, &[1, 1, 10], &[1, 0, 5]), Some(2));
        assert_eq!(pick_one(Nq, &[1, 1, 10], &[1, 0, 5]), Some(1));
        // The first idle one.
        assert_eq!(pick_one(Nq, &[1, 1, 10], &[1, 0, 0]), Some(1));
        // None idle: as sed (2/1, 3/1, 6/10).
        assert_eq!(pick_one(Nq, &[1, 1, 10], &[1, 2, 5]), Some(2));
        // An idle weight-0 backend does not count.
        assert_eq!(pick_one(Nq, &[0, 1, 10], &[0, 1, 5]), Some(2));
    }

    #[test]
    fn sh_fills_buckets_as_ipvs() {
        let s = Scheduler::new(Algorithm::SourceHash, &cands(&[3, 0, 2, 1]), 0);
        assert_eq!(s.table.len(), HASH_BUCKETS);
        assert_eq!(&s.table[..9], [0, 0, 0, 2, 2, 3, 0, 0, 0]);
        // 42 full turns of 6, then 0 0 0 2.
        assert_eq!(histogram(s.table.iter().copied(), 4), [129, 0, 85, 42]);
        // IPVS's hash_32(addr, 8).
        assert_eq!(hash_bucket(0), 0);
        assert_eq!(hash_bucket(1), 0x61);
        assert_eq!(
            hash_bucket(0x0a00_0001),
            (0x0a00_0001u32.wrapping_mul(0x61c8_8647) >> 24) as usize
        );
    }

    /// Shares of 60 000 clients (or service addresses) for a hash scheduler.
    fn hash_shares(alg: Algorithm, weights: &[u16]) -> Vec<f64> {
        let c = cands(weights);
        let s = Scheduler::new(alg, &c, 0);
        let counts = ConnCounts::new(c.len() + 1);
        let n = 60_000u32;
        let mut h = vec![0usize; c.len()];
        for a in 0..n {
            let addr = 0x0a80_0000 + a;
            let key = match alg {
                Algorithm::SourceHash => {
                    PickKey { src_ip: addr, dst_ip: 0x0a60_0001, ..PickKey::default() }
                }
                _ => PickKey { src_ip: 0x0a60_0001, dst_ip: addr, ..PickKey::default() },
            };
            let first = s.pick(&c, &key, &counts).unwrap();
            // Same address, any other field: same backend.
            let again = PickKey { flow_hash: u64::from(a) * 7919, ..key };
            let other = match alg {
                Algorithm::SourceHash => PickKey { dst_ip: 1, ..again },
                _ => PickKey { src_ip: 1, ..again },
            };
            assert_eq!(s.pick(&c, &other, &counts), Some(first));
            h[usize::from(first)] += 1;
        }
        h.iter().map(|&x| x as f64 / f64::from(n)).collect()
    }

    #[test]
    fn sh_and_dh_are_sticky_and_weight_proportional() {
        for alg in [Algorithm::SourceHash, Algorithm::DestinationHash] {
            let shares = hash_shares(alg, &[3, 2, 1, 0]);
            assert_eq!(shares[3], 0.0, "{alg}: weight 0 chosen");
            for (i, w) in [3.0, 2.0, 1.0].into_iter().enumerate() {
                assert!((shares[i] - w / 6.0).abs() < 0.02, "{alg}: shares {shares:?}");
            }
            let shares = hash_shares(alg, &[1; 10]);
            assert!(shares.iter().all(|s| (s - 0.1).abs() < 0.01), "{alg}: shares {shares:?}");
        }
    }

    #[test]
    fn sh_covers_at_most_256_weight_units() {
        // As in IPVS: with 300 backends of weight 1 the last 44 own no bucket.
        let s = Scheduler::new(Algorithm::SourceHash, &cands(&[1; 300]), 0);
        let h = histogram(s.table.iter().copied(), 300);
        assert!(h[..256].iter().all(|&x| x == 1));
        assert!(h[256..].iter().all(|&x| x == 0));
    }

    #[test]
    fn maglev_keys_on_the_fixed_tuple_hash() {
        let c = cands(&[1, 1, 0, 1, 1]);
        let s = Scheduler::new(Algorithm::Maglev, &c, 0);
        assert_eq!(s.maglev_table().map(<[u16]>::len), Some(65_537));
        let counts = ConnCounts::new(6);
        let mut h = [0usize; 5];
        for f in 0..40_000u32 {
            // One client, one service, its connections differing by source port only.
            let key = PickKey {
                src_ip: 0x0a80_0001,
                dst_ip: 0x0a60_0001,
                src_port: 1024 + (f % 60_000) as u16,
                dst_port: if f < 30_000 { 80 } else { 443 },
                proto: 6,
                flow_hash: u64::from(f),
            };
            let i = s.pick(&c, &key, &counts).unwrap();
            let slot = (key.tuple_hash() % 65_537) as usize;
            assert_eq!(i, s.maglev_table().unwrap()[slot]);
            // The worker's keyed hash does not matter (other workers, other seeds).
            let other =
                PickKey { flow_hash: u64::from(f).wrapping_mul(0x9e37_79b9_7f4a_7c15), ..key };
            assert_eq!(s.pick(&c, &other, &counts), Some(i));
            assert_eq!(s.peek(&c, &other, &counts), Some(i));
            h[usize::from(i)] += 1;
        }
        // One client's connections spread over every backend of weight > 0.
        assert_eq!(h[2], 0);
        assert!(
            h.iter().enumerate().all(|(i, &x)| i == 2 || (x as f64 / 10_000.0 - 1.0).abs() < 0.05),
            "{h:?}"
        );
    }

    #[test]
    fn maglev_size_is_normalized() {
        let c = cands(&[1, 1]);
        let len = |m| Scheduler::new(Algorithm::Maglev, &c, m).maglev_table().unwrap().len();
        assert_eq!(len(0), 65_537);
        assert_eq!(len(1000), 1009);
        assert_eq!(len(7), 251);
        assert_eq!(len(u32::MAX), 131_071);
        assert_eq!(Scheduler::new(Algorithm::Random, &c, 0).maglev_table(), None);
    }

    #[test]
    fn maglev_table_follows_identity_not_position() {
        // The same backends in another order (as after an id change) map slots to the same
        // addresses: every node agrees whatever ids it assigned.
        let c = cands(&[1, 1, 1, 1]);
        let mut r = c.clone();
        r.reverse();
        let a = Scheduler::new(Algorithm::Maglev, &c, 0);
        let b = Scheduler::new(Algorithm::Maglev, &r, 0);
        let ips = |s: &Scheduler, c: &[Candidate]| -> Vec<u32> {
            s.maglev_table().unwrap().iter().map(|&i| c[usize::from(i)].ip).collect()
        };
        assert_eq!(ips(&a, &c), ips(&b, &r));
    }
}
