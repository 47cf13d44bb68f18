//! NetworkPolicy as the workers read it: identities, allow sets and an address-range map,
//! looked up at a cost that does not depend on the number of policies.
//!
//! The control plane does the Kubernetes part (selectors, namespaces, named ports, `ipBlock`
//! with `except`, policies adding up) and hands over a [`PolicyUpdate`]:
//! - every pod address known to it, with an **identity**: pods with the same namespace, labels
//!   and `ipBlock` class share one. Pods on this node also carry, per direction, the index of
//!   the [`AllowSet`] that applies to them, or [`NOT_ISOLATED`] when no policy of that type
//!   selects them;
//! - the identities of every other address, as ranges (`ipBlock` CIDRs and their `except`s cut
//!   the address space into intervals; each interval's identity says which blocks it is in);
//! - the allow sets: (peer identity, protocol) -> port ranges, plus protocol -> port ranges
//!   for rules that allow any peer. A rule with no ports allows every protocol, which
//!   control expresses as the protocols below with every port, and [`ANY_PROTO`] for the
//!   others (ICMP).
//!
//! A new connection from `src` to `dst` (after service DNAT: the policy sees the pod, not the
//! service address) is allowed when `src`'s egress set (if `src` is isolated for egress) allows
//! (identity of `dst`, protocol, port) and `dst`'s ingress set (if isolated for ingress) allows
//! (identity of `src`, protocol, port). Per packet that is at most two hash lookups to find the
//! endpoints, one range-map lookup per non-pod address (three array reads at most, see
//! [`RangeMap`]) and two or three hash lookups plus a binary search over a handful of ranges per
//! allow set: nothing grows with the number of policies, which only make the sets larger.
//!
//! Invariants: identity 0 is never handed out; allow-set index 0 is [`NOT_ISOLATED`]; every
//! index an endpoint names exists (checked when built, see [`PolicyError`]); the range map
//! covers the whole address space (addresses below the first range start have identity
//! [`WORLD`]).

use core::net::Ipv4Addr;
use std::collections::HashMap;

use ahash::RandomState;
use serde::{Deserialize, Serialize};

use crate::counters::DropReason;

/// A set of peers that policies cannot tell apart.
pub type Identity = u32;
/// The identity of addresses outside every pod and every `ipBlock`.
pub const WORLD: Identity = 1;
/// Allow-set index meaning "no policy of this type selects the pod".
pub const NOT_ISOLATED: u32 = 0;
/// Protocol number standing for every protocol without ports (ICMP and the like).
pub const ANY_PROTO: u8 = 0;

/// Sorted, merged, inclusive port ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSet(Box<[(u16, u16)]>);

impl PortSet {
    /// Every port.
    pub fn all() -> Self {
        Self(Box::new([(0, u16::MAX)]))
    }
    /// The union of `ranges` (each `(first, last)`, a reversed one is taken as empty).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16)>) -> Self {
        let mut v: Vec<(u16, u16)> = ranges.into_iter().filter(|(a, b)| a <= b).collect();
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self(out.into_boxed_slice())
    }
    /// Whether `port` is in the set.
    #[inline]
    pub fn contains(&self, port: u16) -> bool {
        // Ranges are disjoint and sorted: the only candidate is the last one starting at or
        // below `port`.
        let i = self.0.partition_point(|r| r.0 <= port);
        i > 0 && self.0[i - 1].1 >= port
    }
    /// The ranges.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }
    /// Whether no port is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one direction of one pod allows (the union of every rule of every policy selecting
/// it for that direction).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSet {
    peers: HashMap<(Identity, u8), PortSet, RandomState>,
    any_peer: HashMap<u8, PortSet, RandomState>,
}

impl AllowSet {
    /// Whether a new connection with `peer` on (`proto`, `port`) is allowed. `port` is the
    /// destination port (ignored for [`ANY_PROTO`] entries).
    #[inline]
    pub fn allows(&self, peer: Identity, proto: u8, port: u16) -> bool {
        let (proto, port) = if is_port_proto(proto) { (proto, port) } else { (ANY_PROTO, 0) };
        let hit = |s: Option<&PortSet>| s.is_some_and(|s| s.contains(port));
        hit(self.any_peer.get(&proto)) || hit(self.peers.get(&(peer, proto)))
    }
    /// The wire form (sorted, for deterministic dumps).
    pub fn spec(&self) -> AllowSetSpec {
        let mut peers: Vec<_> =
            self.peers.iter().map(|(&(id, p), s)| (id, p, s.ranges().to_vec())).collect();
        peers.sort();
        let mut any_peer: Vec<_> =
            self.any_peer.iter().map(|(&p, s)| (p, s.ranges().to_vec())).collect();
        any_peer.sort();
        AllowSetSpec { peers, any_peer }
    }
}

/// Protocols whose policy rules name ports.
#[inline(always)]
fn is_port_proto(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// Inclusive port ranges on the wire.
pub type PortRanges = Vec<(u16, u16)>;

/// An [`AllowSet`] on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllowSetSpec {
    /// (peer identity, protocol, port ranges).
    pub peers: Vec<(Identity, u8, PortRanges)>,
    /// (protocol, port ranges) allowed from or to any peer.
    pub any_peer: Vec<(u8, PortRanges)>,
}

impl AllowSetSpec {
    fn build(&self) -> AllowSet {
        let mut s = AllowSet::default();
        for (id, proto, ranges) in &self.peers {
            let e = s.peers.entry((*id, *proto)).or_default();
            *e = PortSet::from_ranges(e.ranges().iter().copied().chain(ranges.iter().copied()));
        }
        for (proto, ranges) in &self.any_peer {
            let e = s.any_peer.entry(*proto).or_default();
            *e = PortSet::from_ranges(e.ranges().iter().copied().chain(ranges.iter().copied()));
        }
        s
    }
}

/// A pod address as policies see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its identity (never 0).
    pub identity: Identity,
    /// Allow set for connections to it, or [`NOT_ISOLATED`] (pods of other nodes: always).
    pub ingress: u32,
    /// Allow set for connections from it, or [`NOT_ISOLATED`].
    pub egress: u32,
}

/// Everything a [`PolicyTables`] is built from, as the control plane sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyUpdate {
    /// Pod addresses.
    pub endpoints: Vec<(Ipv4Addr, Endpoint)>,
    /// Identities of other addresses: each entry starts a range that runs to the next entry's
    /// start (sorted by start; addresses before the first are [`WORLD`]).
    pub ranges: Vec<(Ipv4Addr, Identity)>,
    /// Allow sets; index `i + 1` is `sets[i]` (index 0 is [`NOT_ISOLATED`]).
    pub sets: Vec<AllowSetSpec>,
}

/// Why a policy update was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// An endpoint names an allow set that does not exist.
    #[error("endpoint {0} names allow set {1}, there are {2}")]
    NoSuchSet(Ipv4Addr, u32, usize),
    /// Identity 0 is reserved.
    #[error("identity 0 is reserved ({0})")]
    ZeroIdentity(Ipv4Addr),
    /// Range starts must increase.
    #[error("range starting at {0} is out of order")]
    RangeOrder(Ipv4Addr),
    /// The same address twice.
    #[error("endpoint {0} listed twice")]
    DuplicateEndpoint(Ipv4Addr),
}

/// Identities of non-pod addresses: a three-level table (16, 8 and 8 bits of the address,
/// as in DIR-24-8 routing tables), built from the ranges. A lookup reads at most three
/// entries whatever the number of ranges.
///
/// Each entry is either an identity (high bit clear) or, with the high bit set, the index of a
/// 256-entry table for the next 8 bits.
#[derive(Clone, Debug)]
pub struct RangeMap {
    top: Box<[u32]>,
    sub: Vec<[u32; 256]>,
}

const SUB: u32 = 1 << 31;

impl Default for RangeMap {
    fn default() -> Self {
        Self { top: vec![WORLD; 1 << 16].into_boxed_slice(), sub: Vec::new() }
    }
}

impl RangeMap {
    /// Builds the map from sorted range starts (addresses before the first are [`WORLD`]).
    pub fn build(ranges: &[(u32, Identity)]) -> Self {
        let mut m = Self::default();
        if ranges.is_empty() {
            return m;
        }
        // The identity of `a`, and the first address after `a` where it may change.
        let at = |a: u32| -> (Identity, u64) {
            let i = ranges.partition_point(|r| r.0 <= a);
            let id = if i == 0 { WORLD } else { ranges[i - 1].1 };
            let next = ranges.get(i).map_or(1u64 << 32, |r| u64::from(r.0));
            (id, next)
        };
        for hi in 0..(1u32 << 16) {
            m.top[hi as usize] = m.fill(&at, hi << 16, 16);
        }
        m
    }

    /// The entry for the block of `2^bits` addresses starting at `base`.
    fn fill(&mut self, at: &impl Fn(u32) -> (Identity, u64), base: u32, bits: u32) -> u32 {
        let (id, next) = at(base);
        if next >= u64::from(base) + (1u64 << bits) {
            return id & !SUB;
        }
        let idx = self.sub.len();
        self.sub.push([0; 256]);
        let step = bits - 8;
        for k in 0..256u32 {
            let e = self.fill(at, base + (k << step), step);
            self.sub[idx][k as usize] = e;
        }
        idx as u32 | SUB
    }

    /// The identity of `ip`.
    #[inline]
    pub fn lookup(&self, ip: u32) -> Identity {
        let mut e = self.top[(ip >> 16) as usize];
        let mut shift = 8;
        while e & SUB != 0 {
            // Every SUB entry names a table this map built, so the index is in bounds.
            e = self.sub[(e & !SUB) as usize][((ip >> shift) & 0xff) as usize];
            if shift == 0 {
                break;
            }
            shift -= 8;
        }
        e
    }
}

/// The policy tables of one generation.
#[derive(Clone, Debug, Default)]
pub struct PolicyTables {
    endpoints: HashMap<u32, Endpoint, RandomState>,
    ranges: RangeMap,
    /// Index `i` is allow set `i`; 0 is a placeholder for [`NOT_ISOLATED`].
    sets: Vec<AllowSet>,
    /// Whether any endpoint is isolated (if not, nothing needs checking).
    active: bool,
    update: PolicyUpdate,
}

impl PolicyTables {
    /// Builds the tables, or says what is wrong with `u`.
    pub fn build(u: PolicyUpdate) -> Result<Self, PolicyError> {
        let n = u.sets.len();
        let mut endpoints =
            HashMap::with_capacity_and_hasher(u.endpoints.len(), RandomState::new());
        let mut active = false;
        for &(ip, e) in &u.endpoints {
            if e.identity == 0 {
                return Err(PolicyError::ZeroIdentity(ip));
            }
            for s in [e.ingress, e.egress] {
                if s as usize > n {
                    return Err(PolicyError::NoSuchSet(ip, s, n));
                }
            }
            active |= e.ingress != NOT_ISOLATED || e.egress != NOT_ISOLATED;
            if endpoints.insert(u32::from(ip), e).is_some() {
                return Err(PolicyError::DuplicateEndpoint(ip));
            }
        }
        let mut ranges = Vec::with_capacity(u.ranges.len());
        for (i, &(start, id)) in u.ranges.iter().enumerate() {
            if id == 0 {
                return Err(PolicyError::ZeroIdentity(start));
            }
            if i > 0 && u32::from(start) <= u32::from(u.ranges[i - 1].0) {
                return Err(PolicyError::RangeOrder(start));
            }
            ranges.push((u32::from(start), id));
        }
        let mut sets = Vec::with_capacity(n + 1);
        sets.push(AllowSet::default());
        sets.extend(u.sets.iter().map(AllowSetSpec::build));
        Ok(Self { endpoints, ranges: RangeMap::build(&ranges), sets, active, update: u })
    }

    /// Whether any pod is isolated: when not, [`PolicyTables::check`] always allows.
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active
    }

    /// The pod at `ip`, if it is one.
    #[inline]
    pub fn endpoint(&self, ip: u32) -> Option<&Endpoint> {
        self.endpoints.get(&ip)
    }

    /// The identity of any address.
    #[inline]
    pub fn identity(&self, ip: u32) -> Identity {
        match self.endpoints.get(&ip) {
            Some(e) => e.identity,
            None => self.ranges.lookup(ip),
        }
    }

    /// Whether `ip` is a pod of this node isolated in either direction: its connections need
    /// checking and tracking.
    #[inline]
    pub fn isolated(&self, ip: u32) -> bool {
        self.endpoints
            .get(&ip)
            .is_some_and(|e| e.ingress != NOT_ISOLATED || e.egress != NOT_ISOLATED)
    }

    /// Whether a new connection from `src` to `dst` on (`proto`, destination `port`) is
    /// allowed; when not, the reason names the direction that refused it.
    ///
    /// Inlined up to the `active` test, so that a node with no policy pays a load and a
    /// branch per new connection (not a call that saves and restores registers).
    #[inline(always)]
    pub fn check(&self, src: u32, dst: u32, proto: u8, port: u16) -> Result<(), DropReason> {
        if !self.active {
            return Ok(());
        }
        self.check_active(src, dst, proto, port)
    }

    /// [`PolicyTables::check`] when some pod is isolated.
    #[inline(never)]
    fn check_active(&self, src: u32, dst: u32, proto: u8, port: u16) -> Result<(), DropReason> {
        let s = self.endpoints.get(&src);
        let d = self.endpoints.get(&dst);
        if let Some(se) = s.filter(|e| e.egress != NOT_ISOLATED) {
            let peer = d.map_or_else(|| self.ranges.lookup(dst), |e| e.identity);
            // `build` checked every index.
            if !self.sets[se.egress as usize].allows(peer, proto, port) {
                return Err(DropReason::PolicyEgress);
            }
        }
        if let Some(de) = d.filter(|e| e.ingress != NOT_ISOLATED) {
            let peer = s.map_or_else(|| self.ranges.lookup(src), |e| e.identity);
            if !self.sets[de.ingress as usize].allows(peer, proto, port) {
                return Err(DropReason::PolicyIngress);
            }
        }
        Ok(())
    }

    /// What these tables were built from.
    pub fn update(&self) -> &PolicyUpdate {
        &self.update
    }

    /// Heap bytes the lookup structures hold (from their capacities: a hash table's slots
    /// plus one control byte each, boxed port ranges; not the kept [`PolicyUpdate`]).
    pub fn memory(&self) -> PolicyMemory {
        fn table<K, V, S>(m: &HashMap<K, V, S>) -> usize {
            m.capacity() * (size_of::<(K, V)>() + 1)
        }
        let ports = |s: &PortSet| size_of_val(s.ranges());
        let sets = self
            .sets
            .iter()
            .map(|s| {
                table(&s.peers)
                    + table(&s.any_peer)
                    + s.peers.values().chain(s.any_peer.values()).map(ports).sum::<usize>()
            })
            .sum::<usize>()
            + self.sets.capacity() * size_of::<AllowSet>();
        PolicyMemory {
            endpoints: table(&self.endpoints),
            ranges: size_of_val(&*self.ranges.top) + self.ranges.sub.capacity() * 1024,
            sets,
        }
    }
}

/// Heap bytes of a [`PolicyTables`], by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMemory {
    /// The pod address table.
    pub endpoints: usize,
    /// The range map (its 65,536-entry top level is always there).
    pub ranges: usize,
    /// The allow sets.
    pub sets: usize,
}

impl PolicyMemory {
    /// All of it.
    pub fn total(&self) -> usize {
        self.endpoints + self.ranges + self.sets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn port_sets_merge_and_contain() {
        let s = PortSet::from_ranges([(80, 80), (8000, 8100), (81, 82), (5, 3), (8050, 9000)]);
        assert_eq!(s.ranges(), &[(80, 82), (8000, 9000)]);
        for (p, want) in [(79, false), (80, true), (82, true), (83, false), (9000, true)] {
            assert_eq!(s.contains(p), want, "{p}");
        }
        assert!(PortSet::all().contains(0) && PortSet::all().contains(65535));
        assert!(!PortSet::default().contains(80));
    }

    #[test]
    fn range_map_matches_a_linear_scan() {
        let ranges = vec![
            (ip("10.0.0.0"), 5),
            (ip("10.0.1.0"), 6),
            (ip("10.0.1.128"), 5),
            (ip("10.0.2.0"), WORLD),
            (ip("192.168.7.7"), 9),
            (ip("192.168.7.8"), WORLD),
            (ip("255.255.255.255"), 12),
        ];
        let m = RangeMap::build(&ranges);
        let scan = |a: u32| ranges.iter().rev().find(|r| r.0 <= a).map_or(WORLD, |r| r.1);
        let probes = [
            "0.0.0.0",
            "9.255.255.255",
            "10.0.0.0",
            "10.0.0.255",
            "10.0.1.0",
            "10.0.1.127",
            "10.0.1.128",
            "10.0.1.255",
            "10.0.2.0",
            "192.168.7.6",
            "192.168.7.7",
            "192.168.7.8",
            "255.255.255.254",
            "255.255.255.255",
        ];
        for p in probes {
            assert_eq!(m.lookup(ip(p)), scan(ip(p)), "{p}");
        }
        // A pseudo-random sweep too.
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let a = x & 0x0a00_ffff | (x & 0x1000_0000);
            assert_eq!(m.lookup(a), scan(a));
            assert_eq!(m.lookup(x), scan(x));
        }
    }

    fn tables() -> PolicyTables {
        // 10.200.0.2 client (egress isolated: only to identity 20 on TCP 80 and DNS to any),
        // 10.200.1.11 server (ingress: from identity 10 on TCP 80-90, from the 192.168.0.0/16
        // block except 192.168.1.0/24 (identity 30) on any port), 10.200.1.12 (not isolated).
        let u = PolicyUpdate {
            endpoints: vec![
                (Ipv4Addr::new(10, 200, 0, 2), Endpoint { identity: 10, ingress: 0, egress: 1 }),
                (Ipv4Addr::new(10, 200, 1, 11), Endpoint { identity: 20, ingress: 2, egress: 0 }),
                (Ipv4Addr::new(10, 200, 1, 12), Endpoint { identity: 21, ingress: 0, egress: 0 }),
            ],
            ranges: vec![
                (Ipv4Addr::new(192, 168, 0, 0), 30),
                (Ipv4Addr::new(192, 168, 1, 0), WORLD),
                (Ipv4Addr::new(192, 168, 2, 0), 30),
                (Ipv4Addr::new(192, 169, 0, 0), WORLD),
            ],
            sets: vec![
                AllowSetSpec {
                    peers: vec![(20, 6, vec![(80, 80)])],
                    any_peer: vec![(17, vec![(53, 53)])],
                },
                AllowSetSpec {
                    peers: vec![(10, 6, vec![(80, 90)]), (30, 6, vec![(0, 65535)])],
                    any_peer: vec![],
                },
            ],
        };
        PolicyTables::build(u).unwrap()
    }

    #[test]
    fn check_follows_both_directions() {
        let t = tables();
        let (client, server, open) = (ip("10.200.0.2"), ip("10.200.1.11"), ip("10.200.1.12"));
        assert_eq!(t.check(client, server, 6, 80), Ok(()));
        assert_eq!(t.check(client, server, 6, 85), Err(DropReason::PolicyEgress));
        assert_eq!(t.check(client, open, 6, 80), Err(DropReason::PolicyEgress));
        assert_eq!(t.check(client, ip("8.8.8.8"), 17, 53), Ok(()), "DNS to anyone");
        assert_eq!(t.check(client, ip("8.8.8.8"), 6, 53), Err(DropReason::PolicyEgress));
        assert_eq!(t.check(open, server, 6, 80), Err(DropReason::PolicyIngress));
        assert_eq!(t.check(ip("192.168.0.9"), server, 6, 22), Ok(()), "in the block");
        assert_eq!(t.check(ip("192.168.1.9"), server, 6, 22), Err(DropReason::PolicyIngress));
        assert_eq!(t.check(ip("192.168.2.9"), server, 6, 22), Ok(()));
        assert_eq!(t.check(open, client, 6, 22), Ok(()), "client has no ingress isolation");
        assert_eq!(t.check(client, server, 1, 0), Err(DropReason::PolicyEgress), "ICMP: no rule");
        assert!(t.active() && t.isolated(client) && !t.isolated(open));
    }

    #[test]
    fn rules_without_ports_allow_other_protocols() {
        let u = PolicyUpdate {
            endpoints: vec![(
                Ipv4Addr::new(10, 0, 0, 1),
                Endpoint { identity: 2, ingress: 1, egress: 0 },
            )],
            ranges: vec![],
            sets: vec![AllowSetSpec {
                peers: vec![(WORLD, ANY_PROTO, vec![(0, 65535)]), (WORLD, 6, vec![(0, 65535)])],
                any_peer: vec![],
            }],
        };
        let t = PolicyTables::build(u).unwrap();
        assert_eq!(t.check(ip("1.1.1.1"), ip("10.0.0.1"), 1, 0), Ok(()));
        assert_eq!(t.check(ip("1.1.1.1"), ip("10.0.0.1"), 47, 0), Ok(()), "GRE");
        assert_eq!(t.check(ip("1.1.1.1"), ip("10.0.0.1"), 17, 53), Err(DropReason::PolicyIngress));
    }

    #[test]
    fn bad_updates_are_refused() {
        let e = |identity, ingress| Endpoint { identity, ingress, egress: 0 };
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let no_set = PolicyUpdate { endpoints: vec![(a, e(2, 1))], ..Default::default() };
        assert_eq!(PolicyTables::build(no_set).unwrap_err(), PolicyError::NoSuchSet(a, 1, 0));
        let zero = PolicyUpdate { endpoints: vec![(a, e(0, 0))], ..Default::default() };
        assert_eq!(PolicyTables::build(zero).unwrap_err(), PolicyError::ZeroIdentity(a));
        let dup =
            PolicyUpdate { endpoints: vec![(a, e(2, 0)), (a, e(3, 0))], ..Default::default() };
        assert_eq!(PolicyTables::build(dup).unwrap_err(), PolicyError::DuplicateEndpoint(a));
        let order = PolicyUpdate { ranges: vec![(a, 3), (a, 4)], ..Default::default() };
        assert_eq!(PolicyTables::build(order).unwrap_err(), PolicyError::RangeOrder(a));
        assert!(!PolicyTables::default().active());
    }
}
