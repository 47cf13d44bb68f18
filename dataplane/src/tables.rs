//! The lookup tables workers read: an immutable snapshot with a generation number.
//!
//! Invariants:
//! - A [`Tables`] value never changes after it is built; a new generation is a new value,
//!   published by an atomic pointer swap and loaded by each worker once per batch. A worker
//!   therefore sees one consistent generation for a whole batch.
//! - Service ids and backend ids are stable across generations and never 0 (0 is reserved as
//!   "invalid", so a zeroed conntrack slot can never name a live backend). Conntrack entries
//!   remember ids, not pointers, and are re-validated against a newer generation on their next
//!   packet.
//! - Each service port's backends are sorted by id, so table dumps and selection are
//!   deterministic, and membership checks are a binary search.
//! - Service ports are held behind `Arc`, so a generation that changes one service shares every
//!   other service's data with the previous generation instead of copying it.
//! - The maps around them are sharded the same way: frontends and frontend addresses in
//!   [`SHARDS`] `Arc`'d hash maps, service slots in `Arc`'d chunks of [`CHUNK`] ids, routes
//!   behind one `Arc`. Starting a generation ([`Tables::next`]) copies only those pointers, and
//!   a change copies only the shard or chunk it touches (`Arc::make_mut`): one endpoint change
//!   at 10,000 services costs a few microseconds, not a copy of every table.
//! - The packet path does not probe the frontend hash maps: each shard also has a small
//!   open-addressed probe table, remade by [`TablesBuilder::build`] for the shards a generation
//!   changed (a few dozen entries each at 10,000 services). A lookup usually reads one cache
//!   line whose address follows from the key, so the batch pipeline prefetches it.
//! - A service port's first cache line holds what a new flow reads of it (see [`ServicePort`]).
//! - For kube-proxy's case, a new flow does not read the port at all: when the port's
//!   scheduler is a uniform random pick and it has no session affinity, each probe slot of its
//!   frontends holds its candidates ([`ServicePort::quick`], shared by `Arc`), so the new flow
//!   reads the frontend's line and the candidate it picks. The tables know each port's
//!   frontends, and every change of a port remakes their probe tables: a slot always holds the
//!   candidates of the port its generation has, or none.

use core::net::Ipv4Addr;
use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use serde::{Deserialize, Serialize};

use crate::balance::{Algorithm, Candidate, Scheduler};
use crate::policy::PolicyTables;
use crate::wire::{IPPROTO_TCP, IPPROTO_UDP};

/// Stable backend id; 0 is invalid.
pub type BackendId = u32;
/// Stable service-port id; 0 is invalid.
pub type ServiceId = u32;

/// Default Maglev table size (a prime, as Maglev requires).
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
/// Default ClientIP affinity timeout (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// Key of the frontend table: what a client sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Address, host order.
    pub ip: u32,
    /// Port.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl FrontendKey {
    /// A key from parts.
    pub fn new(ip: Ipv4Addr, port: u16, proto: Protocol) -> Self {
        Self { ip: u32::from(ip), port, proto: proto.number() }
    }
}

/// How a frontend is reached; decides source NAT for remote backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrontendKind {
    /// A ClusterIP.
    ClusterIp,
    /// A NodePort on one of the node's addresses.
    NodePort,
    /// A LoadBalancer status ingress IP.
    LoadBalancer,
    /// An externalIP.
    ExternalIp,
}

/// Value of the frontend table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The service port it leads to.
    pub service: ServiceId,
    /// How it is reached.
    pub kind: FrontendKind,
    /// Source-NAT (masquerade) flows that go to a backend on another node, so replies come back
    /// through this node (externalTrafficPolicy Cluster for external frontends).
    pub masquerade_remote: bool,
}

/// One backend (endpoint address and target port) of a service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Stable id, never 0.
    pub id: BackendId,
    /// Address.
    pub ip: Ipv4Addr,
    /// Target port.
    pub port: u16,
    /// Weight for weighted algorithms (kube-proxy gives every endpoint 1).
    pub weight: u16,
    /// Node the endpoint runs on (may be empty).
    pub node: String,
    /// Zone of the endpoint (may be empty).
    pub zone: String,
    /// EndpointSlice condition `ready`.
    pub ready: bool,
    /// EndpointSlice condition `serving`.
    pub serving: bool,
    /// EndpointSlice condition `terminating`.
    pub terminating: bool,
    /// Whether the endpoint is on this node.
    pub local: bool,
}

impl Backend {
    /// A ready local-unknown backend with weight 1 (handy for tests and demos).
    pub fn ready(id: BackendId, ip: Ipv4Addr, port: u16) -> Self {
        Self {
            id,
            ip,
            port,
            weight: 1,
            node: String::new(),
            zone: String::new(),
            ready: true,
            serving: true,
            terminating: false,
            local: true,
        }
    }
}

/// Settings of one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Stable id, never 0.
    pub id: ServiceId,
    /// Readable name, `namespace/name:port`.
    pub name: String,
    /// Protocol.
    pub proto: Protocol,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// ClientIP session affinity timeout in seconds, if affinity is on.
    pub affinity_timeout_s: Option<u32>,
    /// Maglev table size (prime); used only by [`Algorithm::Maglev`].
    pub maglev_size: u32,
}

/// A service port as workers see it: its settings, every backend (in any state, sorted by id)
/// and the prepared scheduler over the selectable ones.
///
/// Laid out so that what a new flow reads (candidates, scheduler, id, affinity timeout) is the
/// first cache line, which starts the value (`align(64)`, so also in an `Arc`): the batch
/// pipeline prefetches that one line per new flow.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ServicePort {
    /// `selectable` as the scheduler sees it.
    candidates: Arc<[Candidate]>,
    sched: Scheduler,
    /// `spec.id`, here for the first line.
    id: ServiceId,
    /// `spec.affinity_timeout_s`, here for the first line.
    affinity_timeout_s: Option<u32>,
    spec: ServiceSpec,
    backends: Box<[Backend]>,
    /// Indices into `backends` that new flows may go to.
    selectable: Box<[u16]>,
}

const _: () = {
    // The new-flow fields fit the first line.
    assert!(std::mem::offset_of!(ServicePort, affinity_timeout_s) + 8 <= 64);
    assert!(std::mem::align_of::<ServicePort>() == 64);
};

impl ServicePort {
    /// Builds a service port. Backends are sorted by id; duplicates by id are dropped (the first
    /// kept). New flows go, as kube-proxy does it, to ready backends, or when none is ready to
    /// backends that are serving and terminating; if neither exists the port rejects new flows.
    pub fn new(spec: ServiceSpec, mut backends: Vec<Backend>) -> Self {
        backends.sort_by_key(|b| b.id);
        backends.dedup_by_key(|b| b.id);
        backends.truncate(usize::from(u16::MAX));
        let ready: Vec<u16> =
            (0..backends.len() as u16).filter(|&i| backends[usize::from(i)].ready).collect();
        let selectable: Box<[u16]> = if ready.is_empty() {
            (0..backends.len() as u16)
                .filter(|&i| {
                    let b = &backends[usize::from(i)];
                    b.serving && b.terminating
                })
                .collect()
        } else {
            ready.into()
        };
        let candidates: Arc<[Candidate]> = selectable
            .iter()
            .map(|&i| {
                let b = &backends[usize::from(i)];
                Candidate {
                    id: b.id,
                    ip: u32::from(b.ip),
                    port: b.port,
                    weight: b.weight,
                    local: b.local,
                }
            })
            .collect();
        let sched = Scheduler::new(spec.algorithm, &candidates, spec.maglev_size);
        Self {
            candidates,
            sched,
            id: spec.id,
            affinity_timeout_s: spec.affinity_timeout_s,
            spec,
            backends: backends.into(),
            selectable,
        }
    }

    /// Settings.
    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }
    /// Stable id.
    #[inline]
    pub fn id(&self) -> ServiceId {
        self.id
    }
    /// ClientIP session affinity timeout in seconds, if affinity is on (as in the spec).
    #[inline]
    pub fn affinity_timeout_s(&self) -> Option<u32> {
        self.affinity_timeout_s
    }
    /// All backends, sorted by id.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }
    /// Indices into [`ServicePort::backends`] that new flows may go to.
    pub fn selectable(&self) -> &[u16] {
        &self.selectable
    }
    /// The selectable backends as scheduler candidates.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }
    /// The candidates again, shared, when a new flow needs nothing else of the port: its
    /// scheduler is random with every candidate weighted (kube-proxy's case; the pick is then
    /// [`crate::balance::uniform_pick`] of the flow hash) and it has no session affinity. The
    /// probe slots of the port's frontends hold them ([`Tables::frontend_quick`]).
    pub fn quick(&self) -> Option<Arc<[Candidate]>> {
        (self.affinity_timeout_s.is_none() && self.sched.is_uniform_random())
            .then(|| self.candidates.clone())
    }
    /// The prepared scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }
    /// The backend with this id, in any state.
    #[inline]
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.backends.binary_search_by_key(&id, |b| b.id).ok().map(|i| &self.backends[i])
    }
    /// Whether the backend with this id is selectable for new flows.
    #[inline]
    pub fn is_selectable(&self, id: BackendId) -> bool {
        self.candidates.iter().any(|c| c.id == id)
    }
}

/// Where to send a packet for a destination: out of which interface, with which MACs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    /// Egress interface index.
    pub ifindex: u32,
    /// Source MAC (the egress interface's).
    pub src_mac: [u8; 6],
    /// Destination MAC (the neighbour's).
    pub dst_mac: [u8; 6],
}

/// Next hops by destination: exact host entries (pod IPs) and prefixes (gateways), longest
/// prefix first.
///
/// Every route names an entry of one array of next hops; [`Routes::resolve`] returns that
/// entry's index, which a conntrack flow caches per direction for the table generation it was
/// resolved in (so an established packet reads its next hop with [`Routes::hop`], one indexed
/// load, instead of a lookup). The longest-prefix lookup is bounded whatever the number of
/// prefixes: a scan of at most [`PREFIX_SCAN`] entries, or else one hash probe per distinct
/// prefix length present (at most 33).
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// Next hops; host and prefix entries hold indices into it.
    hops: Vec<NextHop>,
    hosts: HashMap<u32, u32, RandomState>,
    /// (network, netmask, hop index), sorted by prefix length (so by netmask), longest first.
    prefixes: Vec<(u32, u32, u32)>,
    /// Prefix entries by `network << 8 | length`, for tables of more than [`PREFIX_SCAN`].
    by_prefix: HashMap<u64, u32, RandomState>,
    /// The distinct prefix lengths present, longest first.
    lens: Vec<u8>,
}

/// Up to this many prefixes, the lookup scans them (longest first) rather than probing a hash
/// table per prefix length.
pub const PREFIX_SCAN: usize = 8;

#[inline(always)]
fn prefix_key(net: u32, len: u8) -> u64 {
    (u64::from(net) << 8) | u64::from(len)
}

impl Routes {
    /// Adds or replaces a host route.
    pub fn add_host(&mut self, ip: Ipv4Addr, hop: NextHop) {
        match self.hosts.get(&u32::from(ip)) {
            Some(&i) => self.hops[i as usize] = hop,
            None => {
                self.hosts.insert(u32::from(ip), self.hops.len() as u32);
                self.hops.push(hop);
            }
        }
    }
    /// Adds or replaces a prefix route (`len` 0..=32).
    pub fn add_prefix(&mut self, net: Ipv4Addr, len: u8, hop: NextHop) {
        let len = len.min(32);
        let net = u32::from(net) & prefix_mask(len);
        if let Some(&i) = self.by_prefix.get(&prefix_key(net, len)) {
            self.hops[i as usize] = hop;
            return;
        }
        let i = self.hops.len() as u32;
        self.hops.push(hop);
        self.by_prefix.insert(prefix_key(net, len), i);
        self.prefixes.push((net, prefix_mask(len), i));
        self.prefixes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if !self.lens.contains(&len) {
            self.lens.push(len);
            self.lens.sort_by(|a, b| b.cmp(a));
        }
    }
    /// Exact host route (pod addresses).
    #[inline]
    pub fn host(&self, ip: u32) -> Option<&NextHop> {
        self.hosts.get(&ip).map(|&i| &self.hops[i as usize])
    }
    /// Longest-prefix lookup.
    #[inline]
    pub fn lookup(&self, ip: u32) -> Option<&NextHop> {
        self.resolve(ip).map(|i| &self.hops[i as usize])
    }
    /// Longest-prefix lookup, as the index of the next hop for [`Routes::hop`].
    ///
    /// Inlined up to the scan of a few prefixes with no host routes (a node whose pods are
    /// reached through prefixes: two tests and a load, an AND and a compare per prefix); with
    /// host routes or many prefixes, a call.
    #[inline(always)]
    pub fn resolve(&self, ip: u32) -> Option<u32> {
        if !self.hosts.is_empty() || self.prefixes.len() > PREFIX_SCAN {
            return self.resolve_hashed(ip);
        }
        self.scan(ip)
    }
    /// The first (longest) prefix holding `ip`, of a table of at most [`PREFIX_SCAN`].
    #[inline(always)]
    fn scan(&self, ip: u32) -> Option<u32> {
        self.prefixes.iter().find(|&&(n, m, _)| ip & m == n).map(|e| e.2)
    }
    /// [`Routes::resolve`] with host routes or more than [`PREFIX_SCAN`] prefixes.
    #[inline(never)]
    fn resolve_hashed(&self, ip: u32) -> Option<u32> {
        if let Some(&i) = self.hosts.get(&ip) {
            return Some(i);
        }
        if self.prefixes.len() <= PREFIX_SCAN {
            return self.scan(ip);
        }
        self.lens
            .iter()
            .find_map(|&l| self.by_prefix.get(&prefix_key(ip & prefix_mask(l), l)))
            .copied()
    }
    /// The next hop of an index [`Routes::resolve`] returned for this table.
    #[inline(always)]
    pub fn hop(&self, i: u32) -> Option<&NextHop> {
        self.hops.get(i as usize)
    }
    /// Host routes, sorted by address.
    pub fn hosts(&self) -> Vec<(Ipv4Addr, NextHop)> {
        let mut v: Vec<_> = self
            .hosts
            .iter()
            .map(|(&ip, &i)| (Ipv4Addr::from(ip), self.hops[i as usize]))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }
    /// Prefix routes, longest first.
    pub fn prefixes(&self) -> impl Iterator<Item = (Ipv4Addr, u8, NextHop)> + '_ {
        self.prefixes
            .iter()
            .map(|&(n, m, i)| (Ipv4Addr::from(n), m.count_ones() as u8, self.hops[i as usize]))
    }
}

/// Netmask of a prefix length.
#[inline(always)]
pub fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// Number of frontend shards (a power of two).
pub const SHARDS: usize = 256;
/// Service slots per chunk (a power of two).
pub const CHUNK: usize = 256;

/// A hash map split into [`SHARDS`] copy-on-write shards.
#[derive(Clone, Debug)]
struct Sharded<K, V> {
    shards: Box<[Arc<HashMap<K, V, RandomState>>]>,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Arc::new(HashMap::default())).collect() }
    }
}

impl<K: core::hash::Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    #[inline(always)]
    fn get(&self, shard: usize, k: &K) -> Option<&V> {
        // `shard` is masked, so the index is always in bounds.
        self.shards[shard & (SHARDS - 1)].get(k)
    }
    fn get_mut(&mut self, shard: usize) -> &mut HashMap<K, V, RandomState> {
        Arc::make_mut(&mut self.shards[shard & (SHARDS - 1)])
    }
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

/// Shard of a frontend key: a multiplicative hash of address and port, so consecutive
/// service addresses spread over every shard.
#[inline(always)]
fn frontend_shard(k: &FrontendKey) -> usize {
    ((k.ip ^ u32::from(k.port).wrapping_mul(0x85EB_CA6B)).wrapping_mul(0x9E37_79B1) >> 24) as usize
}

/// One slot of a frontend shard's probe table ([`Tables::frontend_quick`]); 32 bytes and
/// aligned to them, so a slot never straddles two cache lines.
#[derive(Clone, Debug)]
#[repr(C, align(32))]
struct FrontendSlot {
    key: FrontendKey,
    /// `service` 0 marks an empty slot (service ids are never 0).
    fe: Frontend,
    /// [`ServicePort::quick`] of the port `fe` leads to, as the tables of this generation hold
    /// it (`build` remakes the probe table of every frontend of a port that changed).
    quick: Option<Arc<[Candidate]>>,
}

const _: () = assert!(size_of::<FrontendSlot>() == 32);

const EMPTY_SLOT: FrontendSlot = FrontendSlot {
    key: FrontendKey { ip: 0, port: 0, proto: 0 },
    fe: Frontend { service: 0, kind: FrontendKind::ClusterIp, masquerade_remote: false },
    quick: None,
};

/// A frontend shard's probe table: the shard's map copied into a power-of-two number of slots,
/// at most half full, with linear probing from [`frontend_slot`]. Built by
/// [`TablesBuilder::build`] for each shard the generation changed. A lookup usually reads one
/// cache line, whose address the key alone gives, so the batch pipeline can prefetch it
/// ([`Tables::prefetch_frontend`]); a hash map lookup reads a control group, then an entry.
type ProbeTable = Arc<[FrontendSlot]>;

/// The probe tables of the [`SHARDS`] frontend shards.
#[derive(Clone, Debug)]
struct Probes(Box<[ProbeTable]>);

impl Default for Probes {
    fn default() -> Self {
        let empty: ProbeTable = Arc::new([]);
        Self((0..SHARDS).map(|_| empty.clone()).collect())
    }
}

fn probe_table(
    map: &HashMap<FrontendKey, Frontend, RandomState>,
    quick: impl Fn(ServiceId) -> Option<Arc<[Candidate]>>,
) -> ProbeTable {
    if map.is_empty() {
        return Arc::new([]);
    }
    let n = (map.len() * 2).next_power_of_two().max(4);
    let mut slots = vec![EMPTY_SLOT; n];
    for (k, fe) in map {
        let mut i = frontend_slot(k) & (n - 1);
        while slots[i].fe.service != 0 {
            i = (i + 1) & (n - 1);
        }
        slots[i] = FrontendSlot { key: *k, fe: *fe, quick: quick(fe.service) };
    }
    slots.into()
}

/// Home slot of a frontend key in its shard's probe table (before masking): the top bits of a
/// 64-bit multiplicative hash of the whole key, independent of the shard choice.
#[inline(always)]
fn frontend_slot(k: &FrontendKey) -> usize {
    let x = (u64::from(k.ip) << 24) | (u64::from(k.port) << 8) | u64::from(k.proto);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize
}

/// Shard of a frontend address.
#[inline(always)]
fn vip_shard(ip: u32) -> usize {
    (ip.wrapping_mul(0x9E37_79B1) >> 24) as usize
}

/// One generation of every table a worker reads.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    generation: u64,
    frontends: Sharded<FrontendKey, Frontend>,
    /// The frontend shards' probe tables, one per shard (what the packet path reads).
    probes: Probes,
    /// Per service id, the frontends that lead to it (sharded by id): a change of the port
    /// remakes the probe tables holding its candidates. Behind one more `Arc`, so that a
    /// generation that changes no frontend (an endpoint change) copies one pointer, not 256.
    fronts: Arc<Sharded<ServiceId, Vec<FrontendKey>>>,
    /// Frontend addresses with their number of frontends, for ICMP echo to a service address.
    vips: Sharded<u32, u32>,
    /// Service slots by id in chunks of [`CHUNK`]; slot 0 is always empty.
    services: Vec<Arc<[Option<Arc<ServicePort>>; CHUNK]>>,
    routes: Arc<Routes>,
    /// The node address used to source-NAT (masquerade and hairpin).
    snat_ip: Option<Ipv4Addr>,
    /// NetworkPolicy (replaced whole when policies, pods or namespaces change).
    policy: Arc<PolicyTables>,
}

impl Tables {
    /// An empty generation 0.
    pub fn empty() -> Self {
        Self::default()
    }
    /// Generation number.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Frontend lookup.
    #[inline]
    pub fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.frontend_quick(key).map(|(fe, _)| fe)
    }
    /// Frontend lookup, with the candidates of the service port it leads to when a new flow
    /// needs nothing else of the port ([`ServicePort::quick`]): the same cache line, so such a
    /// new flow does not read the port at all.
    #[inline(always)]
    pub fn frontend_quick(&self, key: &FrontendKey) -> Option<(&Frontend, Option<&[Candidate]>)> {
        let slots = self.probes.0.get(frontend_shard(key))?;
        let mask = slots.len().wrapping_sub(1);
        let mut i = frontend_slot(key) & mask;
        // At most half full: an empty slot ends every probe.
        while let Some(s) = slots.get(i) {
            if s.fe.service == 0 {
                return None;
            }
            if s.key == *key {
                return Some((&s.fe, s.quick.as_deref()));
            }
            i = (i + 1) & mask;
        }
        None
    }
    /// Starts loading the line [`Tables::frontend`] will read first for `key` (a pass of the
    /// batch pipeline ahead of the lookup).
    #[inline(always)]
    pub fn prefetch_frontend(&self, key: &FrontendKey) {
        if let Some(slots) = self.probes.0.get(frontend_shard(key)) {
            let i = frontend_slot(key) & slots.len().wrapping_sub(1);
            crate::mem::prefetch(slots.as_ptr().wrapping_add(i));
        }
    }
    /// Whether `ip` is some frontend's address.
    #[inline]
    pub fn is_vip(&self, ip: u32) -> bool {
        self.vips.get(vip_shard(ip), &ip).is_some()
    }
    /// Service port by id.
    #[inline]
    pub fn service(&self, id: ServiceId) -> Option<&ServicePort> {
        self.service_arc(id).map(|s| &**s)
    }
    /// Service port by id, shared.
    #[inline]
    pub fn service_arc(&self, id: ServiceId) -> Option<&Arc<ServicePort>> {
        let id = id as usize;
        self.services.get(id / CHUNK).and_then(|c| c[id % CHUNK].as_ref())
    }
    /// Every service port, by id.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServicePort>> {
        self.services.iter().flat_map(|c| c.iter().flatten())
    }
    /// Every frontend, sorted by key.
    pub fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
        let mut v: Vec<_> = self.frontends.iter().map(|(k, f)| (*k, *f)).collect();
        v.sort_by_key(|e| e.0);
        v
    }
    /// Next-hop table.
    #[inline]
    pub fn routes(&self) -> &Routes {
        &self.routes
    }
    /// The source-NAT address, if any.
    #[inline]
    pub fn snat_ip(&self) -> Option<Ipv4Addr> {
        self.snat_ip
    }
    /// NetworkPolicy tables.
    #[inline]
    pub fn policy(&self) -> &PolicyTables {
        &self.policy
    }
    /// NetworkPolicy tables, shared.
    pub fn policy_arc(&self) -> &Arc<PolicyTables> {
        &self.policy
    }

    /// Starts the next generation from this one (sharing every service port).
    pub fn next(&self) -> TablesBuilder {
        TablesBuilder {
            t: Tables { generation: self.generation + 1, ..self.clone() },
            changed: [0; SHARDS / 64],
        }
    }
    /// Starts generation `generation` from nothing.
    pub fn builder(generation: u64) -> TablesBuilder {
        TablesBuilder { t: Tables { generation, ..Tables::default() }, changed: [0; SHARDS / 64] }
    }
}

/// Builds a [`Tables`] generation.
#[derive(Debug)]
pub struct TablesBuilder {
    t: Tables,
    /// Frontend shards changed (a bit each), whose probe tables `build` makes anew.
    changed: [u64; SHARDS / 64],
}

/// Why a table change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// Service id 0 is reserved.
    #[error("service id 0 is reserved as invalid")]
    ZeroServiceId,
    /// Backend id 0 is reserved.
    #[error("backend id 0 is reserved as invalid (service {0})")]
    ZeroBackendId(ServiceId),
    /// A frontend names a service that is not in the tables.
    #[error("frontend {0:?} names unknown service {1}")]
    UnknownService(FrontendKey, ServiceId),
    /// A frontend's protocol differs from its service's.
    #[error("frontend {0:?} protocol differs from service {1}")]
    ProtocolMismatch(FrontendKey, ServiceId),
}

impl TablesBuilder {
    /// Sets the generation number.
    pub fn generation(mut self, g: u64) -> Self {
        self.t.generation = g;
        self
    }
    /// Adds or replaces a service port.
    pub fn service(mut self, svc: ServicePort) -> Result<Self, TableError> {
        self.upsert_service(Arc::new(svc))?;
        Ok(self)
    }
    /// Adds or replaces a shared service port.
    pub fn upsert_service(&mut self, svc: Arc<ServicePort>) -> Result<(), TableError> {
        let id = svc.id();
        if id == 0 {
            return Err(TableError::ZeroServiceId);
        }
        if svc.backends().iter().any(|b| b.id == 0) {
            return Err(TableError::ZeroBackendId(id));
        }
        if self.t.service_arc(id).is_some_and(|cur| Arc::ptr_eq(cur, &svc)) {
            return Ok(());
        }
        let i = id as usize;
        while self.t.services.len() <= i / CHUNK {
            self.t.services.push(Arc::new([const { None }; CHUNK]));
        }
        Arc::make_mut(&mut self.t.services[i / CHUNK])[i % CHUNK] = Some(svc);
        // Its frontends' probe slots hold its candidates.
        self.frontends_changed(id);
        Ok(())
    }
    /// Marks the shards of the frontends leading to service `id` as changed.
    fn frontends_changed(&mut self, id: ServiceId) {
        if let Some(keys) = self.t.fronts.get(id as usize, &id) {
            for k in keys {
                let shard = frontend_shard(k);
                self.changed[shard / 64] |= 1 << (shard % 64);
            }
        }
    }
    /// Records that frontend `key` leads to service `id` (`link`) or no longer does.
    fn link(&mut self, id: ServiceId, key: &FrontendKey, link: bool) {
        let map = Arc::make_mut(&mut self.t.fronts).get_mut(id as usize);
        if link {
            map.entry(id).or_default().push(*key);
        } else if let Some(keys) = map.get_mut(&id) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                map.remove(&id);
            }
        }
    }
    /// Removes a service port and, of `frontends`, those leading to it. The caller names the
    /// port's frontends (the control socket's applier tracks them), so removal never scans
    /// the other services' entries; a frontend left pointing at a removed port would make
    /// its packets miss (the pipeline finds no service) and is a caller bug.
    pub fn remove_service(&mut self, id: ServiceId, frontends: &[FrontendKey]) {
        for k in frontends {
            // The map: probe tables are remade by `build`.
            if self.t.frontends.get(frontend_shard(k), k).is_some_and(|f| f.service == id) {
                self.remove_frontend(k);
            }
        }
        let i = id as usize;
        if self.t.service_arc(id).is_some() {
            Arc::make_mut(&mut self.t.services[i / CHUNK])[i % CHUNK] = None;
            // Frontends not named (a caller bug) lose the port's candidates too.
            self.frontends_changed(id);
        }
    }
    /// Adds or replaces a frontend.
    pub fn frontend(mut self, key: FrontendKey, fe: Frontend) -> Result<Self, TableError> {
        self.upsert_frontend(key, fe)?;
        Ok(self)
    }
    /// Adds or replaces a frontend; its service must already be present.
    pub fn upsert_frontend(&mut self, key: FrontendKey, fe: Frontend) -> Result<(), TableError> {
        let Some(svc) = self.t.service(fe.service) else {
            return Err(TableError::UnknownService(key, fe.service));
        };
        if svc.spec().proto.number() != key.proto {
            return Err(TableError::ProtocolMismatch(key, fe.service));
        }
        let shard = frontend_shard(&key);
        self.changed[shard / 64] |= 1 << (shard % 64);
        match self.t.frontends.get_mut(shard).insert(key, fe) {
            None => {
                *self.t.vips.get_mut(vip_shard(key.ip)).entry(key.ip).or_insert(0) += 1;
                self.link(fe.service, &key, true);
            }
            Some(old) if old.service != fe.service => {
                self.link(old.service, &key, false);
                self.link(fe.service, &key, true);
            }
            Some(_) => {}
        }
        Ok(())
    }
    /// Removes a frontend.
    pub fn remove_frontend(&mut self, key: &FrontendKey) {
        let shard = frontend_shard(key);
        if self.t.frontends.get(shard, key).is_none() {
            return;
        }
        self.changed[shard / 64] |= 1 << (shard % 64);
        if let Some(old) = self.t.frontends.get_mut(shard).remove(key) {
            self.link(old.service, key, false);
        }
        let vips = self.t.vips.get_mut(vip_shard(key.ip));
        if let Some(n) = vips.get_mut(&key.ip) {
            *n -= 1;
            if *n == 0 {
                vips.remove(&key.ip);
            }
        }
    }
    /// Replaces the next-hop table.
    pub fn routes(mut self, routes: Routes) -> Self {
        self.t.routes = Arc::new(routes);
        self
    }
    /// Mutable access to the next-hop table (copied first if shared).
    pub fn routes_mut(&mut self) -> &mut Routes {
        Arc::make_mut(&mut self.t.routes)
    }
    /// Sets the source-NAT address.
    pub fn snat_ip(mut self, ip: Option<Ipv4Addr>) -> Self {
        self.t.snat_ip = ip;
        self
    }
    /// Replaces the NetworkPolicy tables.
    pub fn set_policy(&mut self, p: Arc<PolicyTables>) {
        self.t.policy = p;
    }
    /// Finishes the generation (making the probe tables of the frontend shards it changed).
    pub fn build(mut self) -> Tables {
        for shard in 0..SHARDS {
            if self.changed[shard / 64] & (1 << (shard % 64)) != 0 {
                let t = &self.t;
                let p = probe_table(&t.frontends.shards[shard], |id| {
                    t.service(id).and_then(ServicePort::quick)
                });
                self.t.probes.0[shard] = p;
            }
        }
        self.t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: ServiceId) -> ServiceSpec {
        ServiceSpec {
            id,
            name: format!("ns/s{id}:p"),
            proto: Protocol::Udp,
            algorithm: Algorithm::Random,
            affinity_timeout_s: None,
            maglev_size: 65_537,
        }
    }

    fn key(id: u32, port: u16) -> FrontendKey {
        FrontendKey::new(Ipv4Addr::from(0x0a60_0000 + id), port, Protocol::Udp)
    }

    fn fe(id: ServiceId) -> Frontend {
        Frontend { service: id, kind: FrontendKind::ClusterIp, masquerade_remote: false }
    }

    fn big() -> Tables {
        let mut b = Tables::builder(1);
        for id in 1..=2_000 {
            let be = Backend::ready(id, Ipv4Addr::from(0x0ac8_0000 + id), 8080);
            b.upsert_service(Arc::new(ServicePort::new(spec(id), vec![be]))).unwrap();
            b.upsert_frontend(key(id, 53), fe(id)).unwrap();
        }
        b.build()
    }

    #[test]
    fn a_change_copies_only_the_shard_and_chunk_it_touches() {
        let t1 = big();
        let mut b = t1.next();
        let be = Backend::ready(99, Ipv4Addr::new(10, 200, 9, 9), 8080);
        b.upsert_service(Arc::new(ServicePort::new(spec(700), vec![be]))).unwrap();
        b.upsert_frontend(key(700, 5353), fe(700)).unwrap();
        let t2 = b.build();
        let shared = |a: &Sharded<FrontendKey, Frontend>, b: &Sharded<FrontendKey, Frontend>| {
            a.shards.iter().zip(b.shards.iter()).filter(|(x, y)| Arc::ptr_eq(x, y)).count()
        };
        assert_eq!(shared(&t1.frontends, &t2.frontends), SHARDS - 1);
        let chunks =
            t1.services.iter().zip(t2.services.iter()).filter(|(x, y)| Arc::ptr_eq(x, y)).count();
        assert_eq!(chunks, t1.services.len() - 1);
        assert!(Arc::ptr_eq(&t1.routes, &t2.routes));
        // The old generation is untouched; the new one has the change.
        assert_eq!(t1.service(700).unwrap().backends()[0].id, 700);
        assert_eq!(t2.service(700).unwrap().backends()[0].id, 99);
        assert!(t1.frontend(&key(700, 5353)).is_none());
        assert_eq!(t2.frontend(&key(700, 5353)).unwrap().service, 700);
        // Frontends spread over the shards.
        let used = t1.frontends.shards.iter().filter(|s| !s.is_empty()).count();
        assert!(used > SHARDS * 9 / 10, "only {used} shards used");
    }

    #[test]
    fn probe_tables_answer_as_the_maps() {
        let t = big();
        let mut longest = 0;
        for (k, f) in t.frontends() {
            assert_eq!(t.frontend(&k), Some(&f));
            let slots = &t.probes.0[frontend_shard(&k)];
            assert!(slots.len() >= 2 * t.frontends.shards[frontend_shard(&k)].len());
            let home = frontend_slot(&k) & (slots.len() - 1);
            let at = slots.iter().position(|s| s.key == k && s.fe.service != 0).unwrap();
            longest = longest.max((at + slots.len() - home) % slots.len());
            // Neighbours that are no frontend: other ports, protocol, addresses.
            assert_eq!(t.frontend(&FrontendKey { port: k.port + 1, ..k }), None);
            assert_eq!(t.frontend(&FrontendKey { proto: IPPROTO_TCP, ..k }), None);
            assert_eq!(t.frontend(&FrontendKey { ip: k.ip + 100_000, ..k }), None);
        }
        // Probes stay short (at most half full, keys spread within shards).
        assert!(longest < 12, "a probe of {longest} slots");
        assert_eq!(Tables::empty().frontend(&key(1, 53)), None);
    }

    #[test]
    fn removing_a_service_drops_its_named_frontends_and_keeps_shared_addresses() {
        let t1 = big();
        let mut b = t1.next();
        b.upsert_frontend(key(5, 80), fe(5)).unwrap();
        // Another service on the same address keeps it a VIP.
        b.upsert_frontend(key(5, 443), fe(6)).unwrap();
        b.remove_service(5, &[key(5, 53), key(5, 80), key(5, 443)]);
        let t2 = b.build();
        assert!(t2.service(5).is_none());
        assert!(t2.frontend(&key(5, 53)).is_none() && t2.frontend(&key(5, 80)).is_none());
        assert_eq!(t2.frontend(&key(5, 443)).unwrap().service, 6, "not the removed port's");
        assert!(t2.is_vip(key(5, 443).ip));
        let mut b = t2.next();
        b.remove_frontend(&key(5, 443));
        let t3 = b.build();
        assert!(!t3.is_vip(key(5, 443).ip));
        assert!(t3.is_vip(key(6, 53).ip));
        assert_eq!(t3.services().count(), 1_999);
        assert_eq!(t3.frontends().len(), 1_999);
    }

    /// A change to the tables, for [`frontend_slots_hold_their_ports_candidates`].
    #[derive(Clone, Debug)]
    enum Op {
        /// Service id, algorithm (0 random, 1 Maglev, 2 rr), affinity, backend weights (0:
        /// no weight; more than 3: not ready).
        Service(ServiceId, u8, bool, Vec<u16>),
        Frontend(usize, ServiceId),
        RemoveFrontend(usize),
        /// Service id, and whether its frontends are named.
        RemoveService(ServiceId, bool),
        /// Builds the generation and starts the next.
        Build,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (1u32..4, 0u8..3, any::<bool>(), proptest::collection::vec(0u16..5, 0..4))
                .prop_map(|(id, a, aff, w)| Op::Service(id, a, aff, w)),
            3 => (0usize..8, 1u32..4).prop_map(|(k, id)| Op::Frontend(k, id)),
            1 => (0usize..8).prop_map(Op::RemoveFrontend),
            2 => (1u32..4, any::<bool>()).prop_map(|(id, named)| Op::RemoveService(id, named)),
            2 => Just(Op::Build),
        ]
    }

    /// Frontend keys of the test: two ports on four addresses.
    fn fkey(k: usize) -> FrontendKey {
        key(k as u32 / 2, 53 + (k % 2) as u16)
    }

    /// The invariant the packet path relies on: each frontend's slot holds exactly the
    /// candidates (`ServicePort::quick`) of the port this generation has for it.
    fn check_slots(t: &Tables) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        for k in 0..8 {
            let k = fkey(k);
            let map = t.frontends.get(frontend_shard(&k), &k);
            let Some((fe, quick)) = t.frontend_quick(&k) else {
                prop_assert!(map.is_none(), "{k:?} in the map, not in the probe table");
                continue;
            };
            prop_assert_eq!(Some(fe), map);
            let port = t.service(fe.service);
            let want = port.and_then(ServicePort::quick);
            prop_assert_eq!(quick, want.as_deref(), "{:?} -> {}", k, fe.service);
            if let (Some(q), Some(p)) = (quick, port) {
                // The port's own candidates, shared, not a copy.
                prop_assert!(std::ptr::eq(q, p.candidates()));
                prop_assert!(p.scheduler().is_uniform_random());
                prop_assert!(p.affinity_timeout_s().is_none());
            }
        }
        Ok(())
    }

    #[test]
    fn a_frontend_left_on_a_removed_port_loses_its_candidates() {
        let mut b = Tables::builder(1);
        let be = Backend::ready(9, Ipv4Addr::new(10, 200, 0, 9), 80);
        b.upsert_service(Arc::new(ServicePort::new(spec(1), vec![be]))).unwrap();
        b.upsert_frontend(fkey(0), fe(1)).unwrap();
        let t1 = b.build();
        assert_eq!(t1.frontend_quick(&fkey(0)).unwrap().1.unwrap()[0].id, 9);
        let mut b = t1.next();
        // Not named: the frontend stays, leading nowhere (a caller bug the pipeline counts).
        b.remove_service(1, &[]);
        let t2 = b.build();
        assert_eq!(t2.frontend_quick(&fkey(0)), Some((&fe(1), None)));
        check_slots(&t2).unwrap();
        check_slots(&t1).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever sequence of changes, in whatever generations: each frontend's probe slot
        /// holds the candidates of the port its generation has, and earlier generations keep
        /// theirs.
        #[test]
        fn frontend_slots_hold_their_ports_candidates(
            ops in proptest::collection::vec(op(), 1..40)
        ) {
            let mut done: Vec<Tables> = vec![Tables::empty()];
            let mut b = Tables::builder(1);
            let mut next_backend = 1;
            for op in ops {
                match op {
                    Op::Service(id, a, aff, weights) => {
                        let algorithm = [Algorithm::Random, Algorithm::Maglev, Algorithm::RoundRobin]
                            [usize::from(a)];
                        let backends = weights
                            .iter()
                            .map(|&w| {
                                next_backend += 1;
                                let ip = Ipv4Addr::from(0x0ac8_0000 + next_backend);
                                let mut be = Backend::ready(next_backend, ip, 8080);
                                be.weight = w.min(3);
                                be.ready = w <= 3;
                                be
                            })
                            .collect();
                        let s = ServiceSpec {
                            algorithm,
                            affinity_timeout_s: aff.then_some(60),
                            maglev_size: 251,
                            ..spec(id)
                        };
                        b.upsert_service(Arc::new(ServicePort::new(s, backends))).unwrap();
                    }
                    Op::Frontend(k, id) => {
                        // Refused (and nothing changed) when the service is not there.
                        let had = b.t.frontends.get(frontend_shard(&fkey(k)), &fkey(k)).copied();
                        if b.upsert_frontend(fkey(k), fe(id)).is_err() {
                            let now = b.t.frontends.get(frontend_shard(&fkey(k)), &fkey(k));
                            proptest::prop_assert_eq!(now.copied(), had);
                        }
                    }
                    Op::RemoveFrontend(k) => b.remove_frontend(&fkey(k)),
                    Op::RemoveService(id, named) => {
                        let keys: Vec<FrontendKey> = if named {
                            (0..8).map(fkey).collect()
                        } else {
                            Vec::new()
                        };
                        b.remove_service(id, &keys);
                    }
                    Op::Build => {
                        let t = b.build();
                        check_slots(&t)?;
                        b = t.next();
                        done.push(t);
                    }
                }
            }
            let t = b.build();
            check_slots(&t)?;
            for old in &done {
                check_slots(old)?;
            }
        }
    }

    #[test]
    fn route_lookup_is_the_longest_matching_prefix_at_any_table_size() {
        let hop = |i: u32| NextHop { ifindex: i, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2; 6] };
        let mut rng = crate::balance::FastRng::new(11);
        for n in [0usize, 1, 3, PREFIX_SCAN, PREFIX_SCAN + 1, 200] {
            let mut r = Routes::default();
            let mut all: Vec<(u32, u8, u32)> = Vec::new();
            for i in 0..n as u32 {
                // Prefixes clustered in 10.0.0.0/8, so that they nest and overlap.
                let len = (rng.next_u64() % 33) as u8;
                let net = (0x0a00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff)) & prefix_mask(len);
                r.add_prefix(Ipv4Addr::from(net), len, hop(i + 1));
                all.retain(|&(a, l, _)| !(a == net && l == len));
                all.push((net, len, i + 1));
            }
            // The reference: the host route, else the longest matching prefix.
            let longest = |ip: u32| {
                all.iter()
                    .filter(|&&(a, l, _)| ip & prefix_mask(l) == a)
                    .max_by_key(|e| e.1)
                    .map(|e| e.2)
            };
            let addr = |k: u32, rng: &mut crate::balance::FastRng| {
                if k == 0 {
                    0x0a01_0203
                } else {
                    0x0a00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff)
                }
            };
            // Prefixes only (the scan, for up to `PREFIX_SCAN`), then with a host route.
            for k in 0..5_000u32 {
                let ip = addr(k, &mut rng);
                assert_eq!(r.lookup(ip).map(|h| h.ifindex), longest(ip), "{n} prefixes, {ip:#x}");
                assert_eq!(r.resolve(ip).and_then(|i| r.hop(i)), r.lookup(ip));
            }
            r.add_host(Ipv4Addr::new(10, 1, 2, 3), hop(1000));
            r.add_host(Ipv4Addr::new(10, 1, 2, 3), hop(1001));
            for k in 0..5_000u32 {
                let ip = addr(k, &mut rng);
                let want = if ip == 0x0a01_0203 { Some(1001) } else { longest(ip) };
                assert_eq!(r.lookup(ip).map(|h| h.ifindex), want, "{n} prefixes, {ip:#x}");
                let i = r.resolve(ip);
                assert_eq!(i.and_then(|i| r.hop(i)), r.lookup(ip));
            }
            let listed: Vec<(u32, u8)> = r.prefixes().map(|(a, l, _)| (u32::from(a), l)).collect();
            let mut want: Vec<(u32, u8)> = all.iter().map(|&(a, l, _)| (a, l)).collect();
            want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            assert_eq!(listed, want);
            assert_eq!(r.prefixes().count(), all.len());
            assert_eq!(r.hosts().len(), 1);
        }
    }
}
