//! NetworkPolicy compilation: Pods, Namespaces and `networking.k8s.io/v1` NetworkPolicies in,
//! the dataplane's [`PolicyUpdate`] (identities, address ranges, allow sets) out.
//!
//! # Semantics (as Kubernetes defines them)
//!
//! - A pod counts when it has an IPv4 address (`status.podIPs`/`podIP`), is not
//!   `hostNetwork`, and its phase is not `Succeeded` or `Failed`.
//! - `spec.podSelector` selects pods of the policy's namespace (`{}`: all of them).
//!   `policyTypes` says which directions the policy isolates; when absent (or empty) it is
//!   `Ingress`, plus `Egress` when the policy has a non-empty `egress` list (Kubernetes'
//!   defaulting). A pod selected by some policy of a type allows, in that direction, only what
//!   the rules of all such policies allow together; a pod no policy of the type selects is not
//!   isolated in that direction.
//! - A rule's peers (`from`/`to`; absent or empty = any peer): `podSelector` alone (pods of the
//!   policy's namespace), `namespaceSelector` alone (every pod of the matching namespaces,
//!   whose labels include `kubernetes.io/metadata.name`), both in one peer (AND), or `ipBlock`
//!   (`cidr` minus each `except`; it matches pod addresses too). Peers of one rule add up (OR).
//! - A rule's ports (absent or empty = every port of every protocol, including ICMP):
//!   protocol (default TCP; TCP, UDP, SCTP), a number with optional `endPort`, or a name. A
//!   name resolves against container ports (name and protocol): for ingress those of the
//!   selected pod, for egress those of each peer pod. A name that resolves nowhere allows
//!   nothing; a rule with ports allows no ICMP.
//! - Label selectors follow `metav1.LabelSelectorAsSelector`: `matchLabels` and
//!   `matchExpressions` with `In`, `NotIn` (true when the label is absent), `Exists`,
//!   `DoesNotExist`; keys and values must be valid label syntax. A policy with an invalid
//!   selector, CIDR, port, protocol or policy type is skipped whole with a logged reason and a
//!   counter (never half-applied).
//!
//! # Identities
//!
//! All `ipBlock`s of all policies cut the IPv4 space into intervals; an interval's *class* is
//! the set of blocks it is in. Addresses of no pod get one identity per non-empty class (the
//! `ranges` of the update; the empty class is [`WORLD`]). A pod's identity is its (namespace,
//! namespace labels, pod labels, named container ports, class): everything a policy can tell
//! pods apart by, so one identity never needs two answers. Identity numbers are only meaningful
//! within one update (it is sent whole; conntrack never stores them) and are assigned in sorted
//! key order (block classes first, from 2), so the output is deterministic.
//!
//! # Incrementality
//!
//! Selector evaluation is memoized per *label key* (namespace, its labels, pod labels): for
//! each key in use, which policies select it and which rule peers match it. A new pod with a
//! known label key costs no selector evaluation; a new key is evaluated against every policy
//! once; a changed policy is evaluated against every key once.
//!
//! Everything after selection is kept between passes too. Each address is linked to one
//! identity (counted per identity, and per identity on this node); identities have internal
//! ids that stay put while they live, and the reverse indexes (pod peer -> identities, block
//! -> identities) and this node's allow sets are expressed in those ids. A pass then:
//! - re-links only the changed pods (and the pods of changed namespaces);
//! - for each identity that appeared or went away, updates the reverse indexes through its
//!   memo entry, and adds to or removes from the existing allow sets the entries for that
//!   one peer;
//! - recomputes whole only the allow sets of identities new on this node and of identities
//!   in the namespace of a changed policy (a policy can select pods of its namespace only);
//! - starts identities over only when the `ipBlock`s change (they cut the classes).
//!
//! The update is then assembled from that state: numbers by rank (block classes first, then
//! pod identities in key order, as a fresh compile numbers them, so an incremental update
//! equals a full compile of the same objects exactly), allow sets translated and
//! deduplicated, every address listed. That is linear in identities, set entries and
//! addresses, with no selector work and nothing per policy; it is published only when it
//! differs from the previous one.
//!
//! Invariants: identity 0 never appears; no pod has [`WORLD`]; every set index an endpoint
//! names exists; endpoints are sorted by address and unique; ranges are sorted, adjacent
//! ranges differ; nothing panics on bad input.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use dataplane::policy::{
    AllowSetSpec, Endpoint, Identity, PolicyUpdate, PortSet, ANY_PROTO, NOT_ISOLATED, WORLD,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::skips::Skips;
use crate::store::{Changes, Kind, ObjKey, Object, Store};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Labels, sorted.
pub type Labels = BTreeMap<String, String>;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
/// What a rule without ports allows: every port of every protocol.
const ALL_PROTOS: [u8; 4] = [ANY_PROTO, TCP, UDP, SCTP];

// ---------------------------------------------------------------------------------------------
// Label selectors

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector (`metav1.LabelSelector`); no requirement matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Parses `s` as Kubernetes does (`LabelSelectorAsSelector`), or says why it is invalid.
    pub fn parse(s: &LabelSelector) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            check_key(k)?;
            check_value(v)?;
            reqs.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for e in s.match_expressions.iter().flatten() {
            check_key(&e.key)?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            for v in &values {
                check_value(v)?;
            }
            let key = e.key.clone();
            reqs.push(match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("{} {}: values must not be empty", e.key, e.operator))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("{} {}: values must be empty", e.key, e.operator))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                op => return Err(format!("{}: unknown operator {op:?}", e.key)),
            });
        }
        reqs.sort();
        reqs.dedup();
        Ok(Self(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether it selects everything.
    pub fn is_everything(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::In(k, vs) if vs.len() == 1 => write!(f, "{k}={}", set(vs))?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// A label name: `[prefix/]name`, name ≤ 63 characters of `[A-Za-z0-9._-]` starting and
/// ending alphanumeric, prefix a DNS subdomain (≤ 253, lowercase).
fn check_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && l.as_bytes()[0].is_ascii_alphanumeric()
                && l.as_bytes()[l.len() - 1].is_ascii_alphanumeric()
        };
        if p.is_empty() || p.len() > 253 || !p.split('.').all(label_ok) {
            return Err(format!("invalid label key {k:?}: bad prefix"));
        }
    }
    if name.is_empty() || !valid_name(name) {
        return Err(format!("invalid label key {k:?}"));
    }
    Ok(())
}

/// A label value: empty, or ≤ 63 characters like a key's name part.
fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || valid_name(v) {
        Ok(())
    } else {
        Err(format!("invalid label value {v:?}"))
    }
}

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

// ---------------------------------------------------------------------------------------------
// Address blocks and classes

/// An IPv4 prefix as an inclusive interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// First address (host bits cleared).
    pub base: u32,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` (host bits are cleared, as Go's `net.ParseCIDR` does). `Ok(None)`
    /// for an IPv6 prefix.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let (a, n) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR"))?;
        if a.contains(':') {
            return match (a.parse::<std::net::Ipv6Addr>(), n.parse::<u8>()) {
                (Ok(_), Ok(n)) if n <= 128 => Ok(None),
                _ => Err(format!("{s:?} is not a CIDR")),
            };
        }
        let ip: Ipv4Addr = a.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
        let len: u8 = n.parse().ok().filter(|n| *n <= 32).ok_or(format!("{s:?}: bad length"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Some(Self { base: u32::from(ip) & mask, len }))
    }
    /// First address.
    pub fn first(self) -> u32 {
        self.base
    }
    /// Last address.
    pub fn last(self) -> u32 {
        self.base | u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0)
    }
    /// Whether `ip` is inside.
    pub fn contains(self, ip: u32) -> bool {
        self.first() <= ip && ip <= self.last()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

/// An `ipBlock`: a CIDR minus its exceptions (sorted, deduplicated).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    /// The block.
    pub cidr: Cidr,
    /// Its exceptions.
    pub except: Vec<Cidr>,
}

impl Block {
    /// Whether `ip` is in the block and in none of its exceptions.
    pub fn contains(&self, ip: u32) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
    /// The block as disjoint, sorted inclusive intervals.
    fn intervals(&self) -> Vec<(u32, u32)> {
        let mut ex: Vec<(u32, u32)> = self.except.iter().map(|e| (e.first(), e.last())).collect();
        ex.sort_unstable();
        let (mut at, end) = (u64::from(self.cidr.first()), u64::from(self.cidr.last()));
        let mut out = Vec::new();
        for (a, b) in ex {
            let (a, b) = (u64::from(a).max(at), u64::from(b).min(end));
            if a > b {
                continue;
            }
            if a > at {
                out.push((at as u32, (a - 1) as u32));
            }
            at = at.max(b + 1);
        }
        if at <= end {
            out.push((at as u32, end as u32));
        }
        out
    }
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.cidr)?;
        for (i, e) in self.except.iter().enumerate() {
            write!(f, "{}{e}", if i == 0 { " except " } else { "," })?;
        }
        Ok(())
    }
}

/// The IPv4 space cut by a list of blocks: `starts[i]..starts[i+1]` has class `class_at[i]`
/// (an index into `classes`, which holds sorted block indices; class 0 is the empty one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Space {
    /// The blocks, sorted (indices in classes refer to this order).
    pub blocks: Vec<Block>,
    /// Interval starts (the first is 0), adjacent intervals have different classes.
    pub starts: Vec<u32>,
    /// Class of each interval.
    pub class_at: Vec<u32>,
    /// Classes: sorted block indices; `classes[0]` is empty.
    pub classes: Vec<Vec<u32>>,
}

impl Space {
    /// Cuts the space by `blocks` (sorted and deduplicated here).
    pub fn new(mut blocks: Vec<Block>) -> Self {
        blocks.sort();
        blocks.dedup();
        // Sweep: each block's intervals open and close it.
        let mut events: Vec<(u64, bool, u32)> = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            for (a, z) in b.intervals() {
                events.push((u64::from(a), true, i as u32));
                events.push((u64::from(z) + 1, false, i as u32));
            }
        }
        events.sort_unstable();
        let mut class_ids: HashMap<Vec<u32>, u32> = HashMap::from([(Vec::new(), 0)]);
        let mut classes = vec![Vec::new()];
        let (mut starts, mut class_at) = (vec![0u32], vec![0u32]);
        let mut active: BTreeSet<u32> = BTreeSet::new();
        let mut i = 0;
        while i < events.len() {
            let at = events[i].0;
            while i < events.len() && events[i].0 == at {
                let (_, open, b) = events[i];
                if open {
                    active.insert(b);
                } else {
                    active.remove(&b);
                }
                i += 1;
            }
            if at > u64::from(u32::MAX) {
                break;
            }
            let key: Vec<u32> = active.iter().copied().collect();
            let next = classes.len() as u32;
            let c = *class_ids.entry(key.clone()).or_insert_with(|| {
                classes.push(key);
                next
            });
            if *class_at.last().unwrap_or(&u32::MAX) == c {
                continue;
            }
            if *starts.last().unwrap_or(&u32::MAX) == at as u32 {
                class_at.pop();
                starts.pop();
                if class_at.last() == Some(&c) {
                    continue;
                }
            }
            starts.push(at as u32);
            class_at.push(c);
        }
        Self { blocks, starts, class_at, classes }
    }

    /// The class of `ip`.
    pub fn class_of(&self, ip: u32) -> u32 {
        let i = self.starts.partition_point(|s| *s <= ip);
        // starts[0] == 0, so i >= 1.
        self.class_at[i.saturating_sub(1)]
    }
}

impl Default for Space {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

// ---------------------------------------------------------------------------------------------
// Parsed policies

/// Who a rule's peer is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// Pods: in the policy's namespace (`namespaces: None`) or in namespaces matching the
    /// selector; matching `pods` (`None`: all).
    Pods { namespaces: Option<Selector>, pods: Option<Selector> },
    /// Addresses in a block (pods' too).
    Block(Block),
    /// An IPv6 block: matches no IPv4 address.
    Ipv6,
}

/// A rule's ports: every port of every protocol when `all`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ports {
    all: bool,
    /// (protocol, first, last).
    numeric: Vec<(u8, u16, u16)>,
    /// (protocol, container port name).
    named: Vec<(u8, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// Empty: any peer.
    peers: Vec<Peer>,
    ports: Ports,
}

/// A NetworkPolicy reduced to what enforcement needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Policy {
    key: ObjKey,
    subject: Selector,
    /// `Some` when the policy isolates for the direction ([`INGRESS`], [`EGRESS`]).
    rules: [Option<Vec<Rule>>; 2],
}

const INGRESS: usize = 0;
const EGRESS: usize = 1;

impl Policy {
    /// Peers with a `namespaceSelector`: ((direction, rule, peer), the selector).
    fn ns_peers(&self) -> impl Iterator<Item = ((u8, u32, u32), &Selector)> {
        self.rules.iter().enumerate().flat_map(|(d, rules)| {
            rules.iter().flatten().enumerate().flat_map(move |(ri, rule)| {
                rule.peers.iter().enumerate().filter_map(move |(pi, peer)| match peer {
                    Peer::Pods { namespaces: Some(ns), .. } => {
                        Some(((d as u8, ri as u32, pi as u32), ns))
                    }
                    _ => None,
                })
            })
        })
    }
    /// The peer at (direction, rule, peer).
    fn peer(&self, (d, r, p): (u8, u32, u32)) -> Option<&Peer> {
        self.rules.get(d as usize)?.as_ref()?.get(r as usize)?.peers.get(p as usize)
    }
    fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.rules.iter().flatten().flatten().flat_map(|r| &r.peers).filter_map(|p| match p {
            Peer::Block(b) => Some(b),
            _ => None,
        })
    }
}

fn parse_policy(key: &ObjKey, np: &NetworkPolicy, skips: &mut Skips) -> Result<Policy, String> {
    let spec = np.spec.as_ref().ok_or("no spec")?;
    let subject = match &spec.pod_selector {
        Some(s) => Selector::parse(s).map_err(|e| format!("podSelector: {e}"))?,
        None => Selector::default(),
    };
    let egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let types: Vec<&str> = match spec.policy_types.as_deref() {
        Some(t) if !t.is_empty() => t.iter().map(String::as_str).collect(),
        _ if egress_rules => vec!["Ingress", "Egress"],
        _ => vec!["Ingress"],
    };
    let mut isolates = [false; 2];
    for t in types {
        match t {
            "Ingress" => isolates[INGRESS] = true,
            "Egress" => isolates[EGRESS] = true,
            other => return Err(format!("unknown policy type {other:?}")),
        }
    }
    type RawRule<'a> = (Option<&'a [NetworkPolicyPeer]>, Option<&'a [NetworkPolicyPort]>);
    let raw: [Vec<RawRule>; 2] = [
        spec.ingress.iter().flatten().map(|r| (r.from.as_deref(), r.ports.as_deref())).collect(),
        spec.egress.iter().flatten().map(|r| (r.to.as_deref(), r.ports.as_deref())).collect(),
    ];
    let mut rules: [Option<Vec<Rule>>; 2] = [None, None];
    for (d, name) in [(INGRESS, "ingress"), (EGRESS, "egress")] {
        if !isolates[d] {
            continue;
        }
        let mut v = Vec::new();
        for (i, (peers, ports)) in raw[d].iter().enumerate() {
            v.push(parse_rule(*peers, *ports, &format!("{name}[{i}]"), skips)?);
        }
        rules[d] = Some(v);
    }
    Ok(Policy { key: key.clone(), subject, rules })
}

fn parse_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    what: &str,
    skips: &mut Skips,
) -> Result<Rule, String> {
    let mut out = Vec::new();
    for (j, p) in peers.unwrap_or_default().iter().enumerate() {
        let w = format!("{what} peer {j}");
        out.push(parse_peer(p, &w, skips)?);
    }
    let ports = match ports {
        None | Some([]) => Ports { all: true, ..Ports::default() },
        Some(list) => {
            let mut p = Ports::default();
            for (j, port) in list.iter().enumerate() {
                parse_port(port, &mut p).map_err(|e| format!("{what} port {j}: {e}"))?;
            }
            p
        }
    };
    Ok(Rule { peers: out, ports })
}

fn parse_peer(p: &NetworkPolicyPeer, what: &str, skips: &mut Skips) -> Result<Peer, String> {
    let sel = |s: &Option<LabelSelector>, name: &str| {
        s.as_ref().map(Selector::parse).transpose().map_err(|e| format!("{what} {name}: {e}"))
    };
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(b), None, None) => match parse_block(b).map_err(|e| format!("{what}: {e}"))? {
            Some(b) => Ok(Peer::Block(b)),
            None => {
                skips.bump("policy_ipblock_ipv6");
                Ok(Peer::Ipv6)
            }
        },
        (Some(_), _, _) => Err(format!("{what}: ipBlock together with a selector")),
        (None, None, None) => Err(format!("{what}: no podSelector, namespaceSelector or ipBlock")),
        (None, ps, ns) => Ok(Peer::Pods {
            namespaces: sel(ns, "namespaceSelector")?,
            pods: sel(ps, "podSelector")?,
        }),
    }
}

fn parse_block(b: &IPBlock) -> Result<Option<Block>, String> {
    let Some(cidr) = Cidr::parse(&b.cidr)? else {
        return Ok(None);
    };
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        match Cidr::parse(e)? {
            Some(c) if c.len > cidr.len && cidr.contains(c.base) => except.push(c),
            _ => return Err(format!("except {e} is not strictly inside {}", b.cidr)),
        }
    }
    except.sort();
    except.dedup();
    Ok(Some(Block { cidr, except }))
}

fn parse_protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(TCP),
        "UDP" => Ok(UDP),
        "SCTP" => Ok(SCTP),
        other => Err(format!("unsupported protocol {other:?}")),
    }
}

fn parse_port(p: &NetworkPolicyPort, out: &mut Ports) -> Result<(), String> {
    let proto = parse_protocol(p.protocol.as_deref())?;
    let port_num = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (&p.port, p.end_port) {
        (None, None) => out.numeric.push((proto, 0, u16::MAX)),
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let first = port_num(*n).ok_or(format!("port {n} out of range"))?;
            let last = match end {
                None => first,
                Some(e) => port_num(e)
                    .filter(|e| *e >= first)
                    .ok_or(format!("endPort {e} out of range or below port {first}"))?,
            };
            out.numeric.push((proto, first, last));
        }
        (Some(IntOrString::String(s)), None) => match s.parse::<i32>() {
            // A numeric string is a number (what the API server stores for `"80"`).
            Ok(n) => {
                let n = port_num(n).ok_or(format!("port {n} out of range"))?;
                out.numeric.push((proto, n, n));
            }
            Err(_) if valid_port_name(s) => out.named.push((proto, s.clone())),
            Err(_) => return Err(format!("invalid port name {s:?}")),
        },
        (Some(IntOrString::String(_)), Some(_)) => return Err("endPort with a named port".into()),
    }
    Ok(())
}

/// An IANA service name: 1–15 lowercase alphanumerics and `-`, at least one letter.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

// ---------------------------------------------------------------------------------------------
// Pods

/// What selectors look at: namespace, its labels and the pod's labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LabelKey {
    ns: String,
    labels: Labels,
    ns_labels: Labels,
}

/// A named container port: (name, protocol, port).
type NamedPort = (String, u8, u16);

#[derive(Clone, Debug)]
struct PodRec {
    ip: Ipv4Addr,
    local: bool,
    node: String,
    label_key: Arc<LabelKey>,
    ports: Arc<[NamedPort]>,
    /// The address's block class.
    class: u32,
}

/// The pods at one address: the first by key is the one in the update, linked to its
/// identity as `linked` (internal id, on this node).
#[derive(Clone, Debug, Default)]
struct IpEntry {
    keys: BTreeSet<ObjKey>,
    linked: Option<(u32, bool)>,
}

/// Allow sets as kept between passes: peers by internal identity id (stable while the
/// identity lives), port ranges normalized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LocalSet {
    peers: BTreeMap<(u32, u8), Vec<(u16, u16)>>,
    any_peer: BTreeMap<u8, Vec<(u16, u16)>>,
}

/// One identity between passes. Its slab index is its internal id; the update's number is
/// its rank, assigned at assembly.
#[derive(Debug)]
struct IdState {
    /// `None` for a block class's identity.
    key: Option<IdKey>,
    /// Addresses in the update with this identity, and how many of them are on this node.
    count: usize,
    local: usize,
    /// Whether the peer indexes include it (it was settled with `count > 0`).
    live: bool,
    /// (ingress, egress) allow sets while `local > 0` (`None` inside: not isolated).
    sets: Option<[Option<LocalSet>; 2]>,
    /// `sets` in the update's numbers, kept while neither they nor the numbering change.
    specs: Option<[Option<AllowSetSpec>; 2]>,
}

impl IdState {
    fn ports(&self) -> &[NamedPort] {
        self.key.as_ref().map_or(&[], |k| &k.ports)
    }
}

/// The pod's first IPv4 address, if it takes part in policy at all.
fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ips = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    ips.chain(status.pod_ip.as_deref()).find_map(|s| s.parse::<Ipv4Addr>().ok())
}

fn named_ports(pod: &Pod) -> Vec<NamedPort> {
    let mut v: Vec<NamedPort> = Vec::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            let (Some(name), Ok(port)) = (&p.name, u16::try_from(p.container_port)) else {
                continue;
            };
            if let Ok(proto) = parse_protocol(p.protocol.as_deref()) {
                v.push((name.clone(), proto, port));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// The compiler

/// A rule peer: (policy slot, direction, rule index, peer index).
type PeerRef = (u32, u8, u32, u32);

/// What one label key is matched by.
#[derive(Clone, Debug, Default)]
struct Matches {
    /// Slots of the policies whose `podSelector` selects it.
    subject_of: Vec<u32>,
    /// Pod peers it matches.
    peer_of: Vec<PeerRef>,
}

/// An identity key by the addresses of its interned parts, and the class.
type PtrKey = (usize, usize, u32);

/// What an identity stands for.
#[derive(Clone, Debug, Default)]
enum IdDesc {
    #[default]
    World,
    Block(u32),
    Pod(IdKey),
}

/// A full identity key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdKey {
    label_key: Arc<LabelKey>,
    ports: Arc<[NamedPort]>,
    class: u32,
}

/// Readable form of the last update (for dumps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyView {
    /// Every pod in the update: (pod, address, node, endpoint), sorted by address.
    pub pods: Vec<(ObjKey, Ipv4Addr, String, Endpoint)>,
    /// What each identity stands for, indexed by identity (0 unused).
    pub identities: Vec<String>,
}

/// Compiles Pods, Namespaces and NetworkPolicies into [`PolicyUpdate`]s, incrementally.
#[derive(Debug, Default)]
pub struct PolicyCompiler {
    node: String,
    /// Valid policies, by key -> slot.
    by_key: BTreeMap<ObjKey, u32>,
    slots: Vec<Option<Arc<Policy>>>,
    free: Vec<u32>,
    space: Arc<Space>,
    blocks_dirty: bool,
    /// Interned label keys and what matches them (an entry only the map holds is unused).
    memo: HashMap<Arc<LabelKey>, Matches>,
    /// Slots of the policies of each namespace (their subjects and own-namespace peers can
    /// only match pods there).
    by_ns: HashMap<String, BTreeSet<u32>>,
    /// Slots of the policies with `namespaceSelector` peers.
    cross: BTreeSet<u32>,
    /// Namespace labels -> the `namespaceSelector` peers they satisfy (checked once per
    /// namespace, so a new label key only checks those peers' pod selectors).
    ns_memo: HashMap<Labels, Vec<PeerRef>>,
    ns_labels: HashMap<String, Labels>,
    pods: BTreeMap<ObjKey, PodRec>,
    /// Pod addresses and the identity each one is counted under.
    by_ip: BTreeMap<Ipv4Addr, IpEntry>,
    /// Identities by internal id (`None`: free, listed in `free_ids`).
    slab: Vec<Option<IdState>>,
    free_ids: Vec<u32>,
    iid_of: HashMap<PtrKey, u32>,
    /// Pod identities in key order (the order of their numbers).
    order: BTreeMap<IdKey, u32>,
    /// Block classes' identities.
    class_iid: BTreeMap<u32, u32>,
    /// Pod peer -> identities it matches; block -> identities inside it.
    peer_ids: HashMap<PeerRef, BTreeSet<u32>>,
    block_ids: Vec<BTreeSet<u32>>,
    /// Identities whose counts changed in this pass.
    touched: BTreeSet<u32>,
    /// The update's number of each internal id, valid unless `renumber`.
    number: Vec<Identity>,
    renumber: bool,
    last: Arc<PolicyUpdate>,
    /// What each identity of the last update stands for (index = identity).
    ids: Vec<IdDesc>,
    /// Interned container port lists.
    port_lists: std::collections::HashSet<Arc<[NamedPort]>>,
    skips: Skips,
    evaluations: u64,
}

impl PolicyCompiler {
    /// A compiler for the node named `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self { node: node.into(), ..Self::default() }
    }

    /// The node this compiler enforces for.
    pub fn node(&self) -> &str {
        &self.node
    }
    /// The last update compiled.
    pub fn update(&self) -> &Arc<PolicyUpdate> {
        &self.last
    }
    /// A readable form of the last update (built on demand: for dumps).
    pub fn view(&self) -> PolicyView {
        let identities = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                _ if i == 0 => String::new(),
                IdDesc::World => "world (no pod, no ipBlock)".to_string(),
                IdDesc::Block(c) => format!("address in {}", class_text(&self.space, *c)),
                IdDesc::Pod(k) => id_text(&self.space, k),
            })
            .collect();
        // The first pod (by key) at each address is the one in the update.
        let mut at: HashMap<Ipv4Addr, (&ObjKey, &PodRec)> = HashMap::new();
        for (k, rec) in &self.pods {
            at.entry(rec.ip).or_insert((k, rec));
        }
        let pods = self
            .last
            .endpoints
            .iter()
            .filter_map(|(ip, e)| {
                at.get(ip).map(|(k, rec)| ((*k).clone(), *ip, rec.node.clone(), *e))
            })
            .collect();
        PolicyView { pods, identities }
    }
    /// The address space cut by the current `ipBlock`s.
    pub fn space(&self) -> &Space {
        &self.space
    }
    /// Refused input (invalid policies, duplicate pod addresses), counted per pass.
    pub fn skips(&self) -> &Skips {
        &self.skips
    }
    /// How many (policy, label key) pairs were evaluated so far (selector work done).
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// Recompiles from every Pod, Namespace and NetworkPolicy of `store`; returns the update
    /// when it differs from the last one.
    pub fn compile_all(&mut self, store: &Store) -> Option<Arc<PolicyUpdate>> {
        let mut ch = Changes::default();
        let keys = |k: Kind| store.iter(k).map(|(k, _)| k.clone()).collect::<BTreeSet<_>>();
        ch.pods = keys(Kind::Pod);
        ch.pods.extend(self.pods.keys().cloned());
        ch.policies = keys(Kind::NetworkPolicy);
        ch.policies.extend(self.by_key.keys().cloned());
        ch.namespaces = keys(Kind::Namespace).into_iter().map(|k| k.name).collect();
        ch.namespaces.extend(self.ns_labels.keys().cloned());
        self.compile(store, &ch)
    }

    /// Applies what `changes` says about Pods, Namespaces and NetworkPolicies; returns the
    /// update when it differs from the last one.
    pub fn compile(&mut self, store: &Store, changes: &Changes) -> Option<Arc<PolicyUpdate>> {
        if !changes.touches_policy() {
            return None;
        }
        // Slots whose policy changed, and the namespaces of those policies (the only ones
        // whose pods they can select).
        let mut dirty_slots = BTreeSet::new();
        let mut dirty_ns = BTreeSet::new();
        for key in &changes.policies {
            let (old, new) = self.update_policy(store, key);
            if old.is_some() || new.is_some() {
                dirty_slots.extend(old.into_iter().chain(new));
                dirty_ns.insert(key.namespace.clone());
            }
        }
        if self.blocks_dirty {
            self.blocks_dirty = false;
            let blocks = self.policies().flat_map(|p| p.blocks().cloned()).collect();
            self.space = Arc::new(Space::new(blocks));
            // Every class may have changed: identities start over.
            self.reset_identities();
        }
        let mut dirty_pods = changes.pods.clone();
        for ns in &changes.namespaces {
            match store.get(Kind::Namespace, &ObjKey::new("", ns.as_str())) {
                Some(Object::Namespace(n)) => {
                    let labels = n.metadata.labels.clone().unwrap_or_default();
                    self.ns_labels.insert(ns.clone(), labels);
                }
                _ => {
                    self.ns_labels.remove(ns);
                }
            }
            let lo = ObjKey::new(ns.as_str(), "");
            dirty_pods.extend(
                self.pods
                    .range(lo..)
                    .take_while(|(k, _)| k.namespace == *ns)
                    .map(|(k, _)| k.clone()),
            );
            dirty_pods.extend(store.iter_namespace(Kind::Pod, ns).map(|(k, _)| k.clone()));
        }
        for key in &dirty_pods {
            self.update_pod(store, key);
        }
        self.settle(&dirty_slots, &dirty_ns);
        let update = self.assemble();
        if update == *self.last {
            return None;
        }
        self.last = Arc::new(update);
        Some(self.last.clone())
    }

    fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.slots.iter().flatten()
    }

    /// Applies the policy at `key`; returns its old and new slot when it changed.
    fn update_policy(&mut self, store: &Store, key: &ObjKey) -> (Option<u32>, Option<u32>) {
        let parsed = match store.get(Kind::NetworkPolicy, key) {
            Some(Object::NetworkPolicy(np)) => match parse_policy(key, np, &mut self.skips) {
                Ok(p) => Some(Arc::new(p)),
                Err(reason) => {
                    tracing::warn!(policy = %key, reason, "NetworkPolicy skipped");
                    self.skips.bump("policy_invalid");
                    None
                }
            },
            _ => None,
        };
        let old_slot = self.by_key.get(key).copied();
        let old = old_slot.and_then(|s| self.slots[s as usize].clone());
        if old.as_deref() == parsed.as_deref() {
            return (None, None);
        }
        let has_blocks =
            |p: &Option<Arc<Policy>>| p.as_ref().is_some_and(|p| p.blocks().next().is_some());
        self.blocks_dirty |= has_blocks(&old) || has_blocks(&parsed);
        if let Some(s) = old_slot {
            self.slots[s as usize] = None;
            self.free.push(s);
            self.by_key.remove(key);
            self.cross.remove(&s);
            if let Some(set) = self.by_ns.get_mut(&key.namespace) {
                set.remove(&s);
            }
            for m in self.memo.values_mut() {
                m.subject_of.retain(|x| *x != s);
                m.peer_of.retain(|r| r.0 != s);
            }
            for v in self.ns_memo.values_mut() {
                v.retain(|r| r.0 != s);
            }
        }
        let Some(p) = parsed else { return (old_slot, None) };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize] = Some(p.clone());
        self.by_key.insert(key.clone(), slot);
        self.by_ns.entry(key.namespace.clone()).or_default().insert(slot);
        if p.ns_peers().next().is_some() {
            self.cross.insert(slot);
            for (labels, v) in self.ns_memo.iter_mut() {
                v.extend(
                    p.ns_peers()
                        .filter(|(_, sel)| sel.matches(labels))
                        .map(|(r, _)| (slot, r.0, r.1, r.2)),
                );
            }
        }
        for (lk, m) in self.memo.iter_mut() {
            self.evaluations += 1;
            evaluate(slot, &p, lk, m);
        }
        (old_slot, Some(slot))
    }

    fn update_pod(&mut self, store: &Store, key: &ObjKey) {
        let rec = match store.get(Kind::Pod, key) {
            Some(Object::Pod(p)) => self.pod_rec(key, p),
            _ => None,
        };
        self.set_pod(key, rec);
    }

    /// What the compiler keeps of a pod, or `None` when it takes no part in policy.
    fn pod_rec(&mut self, key: &ObjKey, pod: &Pod) -> Option<PodRec> {
        let ip = pod_ip(pod)?;
        let mut ns_labels = self.ns_labels.get(&key.namespace).cloned().unwrap_or_default();
        ns_labels.insert(NAMESPACE_NAME_LABEL.into(), key.namespace.clone());
        let lk = LabelKey {
            ns: key.namespace.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ns_labels,
        };
        let label_key = match self.memo.get_key_value(&lk) {
            Some((k, _)) => k.clone(),
            None => {
                let k = Arc::new(lk);
                let m = self.evaluate_new(&k);
                self.memo.insert(k.clone(), m);
                k
            }
        };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let local = !node.is_empty() && node == self.node;
        let ports: Vec<NamedPort> = named_ports(pod);
        let ports = match self.port_lists.get(&ports[..]) {
            Some(p) => p.clone(),
            None => {
                let p: Arc<[NamedPort]> = ports.into();
                self.port_lists.insert(p.clone());
                p
            }
        };
        let class = self.space.class_of(u32::from(ip));
        Some(PodRec { ip, local, node, label_key, ports, class })
    }

    /// Replaces the record of the pod at `key` and re-links the addresses involved.
    fn set_pod(&mut self, key: &ObjKey, rec: Option<PodRec>) {
        let new_ip = rec.as_ref().map(|r| r.ip);
        let old_ip = match rec {
            Some(r) => self.pods.insert(key.clone(), r),
            None => self.pods.remove(key),
        }
        .map(|r| r.ip);
        if let Some(ip) = old_ip.filter(|ip| Some(*ip) != new_ip) {
            if let Some(e) = self.by_ip.get_mut(&ip) {
                e.keys.remove(key);
            }
            self.relink(ip);
        }
        if let Some(ip) = new_ip {
            let e = self.by_ip.entry(ip).or_default();
            if e.keys.insert(key.clone()) && e.keys.len() > 1 {
                let other = e.keys.iter().find(|k| *k != key).cloned();
                tracing::debug!(pod = %key, other = ?other, %ip, "duplicate pod address");
                self.skips.bump("pod_ip_duplicate");
            }
            self.relink(ip);
        }
    }

    /// Counts the first pod at `ip` (by key) under its identity, and no other.
    fn relink(&mut self, ip: Ipv4Addr) {
        let Some(first) = self.by_ip.get(&ip).map(|e| e.keys.first().cloned()) else { return };
        let want = first.and_then(|k| {
            let rec = self.pods.get(&k)?;
            let local = rec.local;
            Some((self.identity_of(rec.clone()), local))
        });
        let Some(e) = self.by_ip.get_mut(&ip) else { return };
        let had = std::mem::replace(&mut e.linked, want);
        if e.keys.is_empty() {
            self.by_ip.remove(&ip);
        }
        if had == want {
            return;
        }
        for (link, delta) in [(had, -1isize), (want, 1)] {
            let Some((iid, local)) = link else { continue };
            if let Some(Some(st)) = self.slab.get_mut(iid as usize) {
                st.count = st.count.wrapping_add_signed(delta);
                if local {
                    st.local = st.local.wrapping_add_signed(delta);
                }
                self.touched.insert(iid);
            }
        }
    }

    /// The internal id of `rec`'s identity, created (uncounted) if new.
    fn identity_of(&mut self, rec: PodRec) -> u32 {
        let pk: PtrKey = (
            Arc::as_ptr(&rec.label_key) as usize,
            Arc::as_ptr(&rec.ports) as *const NamedPort as usize,
            rec.class,
        );
        if let Some(&iid) = self.iid_of.get(&pk) {
            return iid;
        }
        let key = IdKey { label_key: rec.label_key, ports: rec.ports, class: rec.class };
        let iid = self.alloc(IdState {
            key: Some(key.clone()),
            count: 0,
            local: 0,
            live: false,
            sets: None,
            specs: None,
        });
        self.iid_of.insert(pk, iid);
        self.order.insert(key, iid);
        iid
    }

    fn alloc(&mut self, st: IdState) -> u32 {
        match self.free_ids.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(st);
                i
            }
            None => {
                self.slab.push(Some(st));
                (self.slab.len() - 1) as u32
            }
        }
    }

    /// Drops every identity and index and re-links every pod (after the block classes
    /// changed).
    fn reset_identities(&mut self) {
        self.by_ip.clear();
        self.slab.clear();
        self.free_ids.clear();
        self.iid_of.clear();
        self.order.clear();
        self.class_iid.clear();
        self.peer_ids.clear();
        self.touched.clear();
        self.renumber = true;
        let space = self.space.clone();
        self.block_ids = vec![BTreeSet::new(); space.blocks.len()];
        let mut classes: Vec<u32> = space.class_at.iter().copied().filter(|c| *c != 0).collect();
        classes.sort_unstable();
        classes.dedup();
        for c in classes {
            let st = IdState { key: None, count: 1, local: 0, live: true, sets: None, specs: None };
            let iid = self.alloc(st);
            self.class_iid.insert(c, iid);
            for &b in &space.classes[c as usize] {
                self.block_ids[b as usize].insert(iid);
            }
        }
        let keys: Vec<ObjKey> = self.pods.keys().cloned().collect();
        for k in keys {
            let Some(mut rec) = self.pods.get(&k).cloned() else { continue };
            rec.class = space.class_of(u32::from(rec.ip));
            self.set_pod(&k, Some(rec));
        }
    }

    /// What matches a label key not seen before: the policies of its namespace, and the
    /// `namespaceSelector` peers its namespace satisfies.
    fn evaluate_new(&mut self, k: &LabelKey) -> Matches {
        let mut m = Matches::default();
        if !self.ns_memo.contains_key(&k.ns_labels) {
            let mut v = Vec::new();
            for &slot in &self.cross {
                if let Some(Some(p)) = self.slots.get(slot as usize) {
                    let hits = p.ns_peers().filter(|(_, sel)| sel.matches(&k.ns_labels));
                    v.extend(hits.map(|(r, _)| (slot, r.0, r.1, r.2)));
                }
            }
            self.ns_memo.insert(k.ns_labels.clone(), v);
        }
        for &slot in self.by_ns.get(&k.ns).into_iter().flatten() {
            if let Some(Some(p)) = self.slots.get(slot as usize) {
                self.evaluations += 1;
                evaluate_own(slot, p, k, &mut m);
            }
        }
        for r in self.ns_memo.get(&k.ns_labels).into_iter().flatten() {
            let Some(Some(p)) = self.slots.get(r.0 as usize) else { continue };
            let Some(Peer::Pods { pods, .. }) = p.peer((r.1, r.2, r.3)) else { continue };
            self.evaluations += 1;
            if pods.as_ref().is_none_or(|s| s.matches(&k.labels)) {
                m.peer_of.push(*r);
            }
        }
        m
    }

    /// Brings the peer indexes and the allow sets of this node's identities up to date with
    /// the identities that appeared or went away in this pass and the policies that changed
    /// (`dirty_slots`, in namespaces `dirty_ns`). Allow sets are recomputed whole only for
    /// identities that are new on this node or in a namespace whose policies changed; the
    /// others get the entries of appearing peers added and those of departed peers removed.
    fn settle(&mut self, dirty_slots: &BTreeSet<u32>, dirty_ns: &BTreeSet<String>) {
        let mut appeared = Vec::new();
        let mut gone = Vec::new();
        for iid in std::mem::take(&mut self.touched) {
            let Some(Some(st)) = self.slab.get(iid as usize) else { continue };
            match (st.live, st.count > 0) {
                (false, true) => appeared.push(iid),
                (true, false) => gone.push(iid),
                (false, false) => self.free(iid),
                (true, true) => {}
            }
        }
        let memo = &self.memo;
        let matches = |st: &IdState| st.key.as_ref().map(|k| &memo[&k.label_key]);
        // Peer indexes: a changed policy's peers are looked up again in every live identity.
        if !dirty_slots.is_empty() {
            self.peer_ids.retain(|r, _| !dirty_slots.contains(&r.0));
            for (iid, st) in self.slab.iter().enumerate() {
                let Some(st) = st.as_ref().filter(|st| st.live && st.count > 0) else { continue };
                for r in matches(st).into_iter().flat_map(|m| &m.peer_of) {
                    if dirty_slots.contains(&r.0) {
                        self.peer_ids.entry(*r).or_default().insert(iid as u32);
                    }
                }
            }
        }
        for (&iid, add) in gone.iter().map(|i| (i, false)).chain(appeared.iter().map(|i| (i, true)))
        {
            let Some(Some(st)) = self.slab.get(iid as usize) else { continue };
            for r in matches(st).into_iter().flat_map(|m| &m.peer_of) {
                if add {
                    self.peer_ids.entry(*r).or_default().insert(iid);
                } else if let Some(v) = self.peer_ids.get_mut(r) {
                    v.remove(&iid);
                }
            }
            let class = st.key.as_ref().map_or(0, |k| k.class);
            for &b in &self.space.classes[class as usize] {
                if add {
                    self.block_ids[b as usize].insert(iid);
                } else {
                    self.block_ids[b as usize].remove(&iid);
                }
            }
        }
        self.peer_ids.retain(|_, v| !v.is_empty());
        self.renumber |= !appeared.is_empty() || !gone.is_empty();
        for &iid in &appeared {
            if let Some(Some(st)) = self.slab.get_mut(iid as usize) {
                st.live = true;
            }
        }
        for &iid in &gone {
            if let Some(Some(st)) = self.slab.get_mut(iid as usize) {
                st.live = false;
            }
        }
        // Allow sets.
        let ctx = SetCtx {
            slots: &self.slots,
            space: &self.space,
            peer_ids: &self.peer_ids,
            block_ids: &self.block_ids,
            slab: &self.slab,
            order: &self.order,
        };
        let mut work: Vec<(u32, [Option<LocalSet>; 2])> = Vec::new();
        for (iid, st) in self.slab.iter().enumerate() {
            let Some(st) = st else { continue };
            let Some(k) = st.key.as_ref().filter(|_| st.count > 0 && st.local > 0) else {
                continue;
            };
            let m = &self.memo[&k.label_key];
            let sets = match &st.sets {
                Some(sets) if !dirty_ns.contains(&k.label_key.ns) => {
                    if appeared.is_empty() && gone.is_empty() {
                        continue;
                    }
                    let mut sets = sets.clone();
                    for (d, set) in sets.iter_mut().enumerate() {
                        let Some(set) = set else { continue };
                        for &x in &gone {
                            set.peers.retain(|(id, _), _| *id != x);
                        }
                        for &x in &appeared {
                            if let Some(add) = ctx.allow_set(m, &k.ports, d, Some(x)) {
                                for (key, v) in add.peers {
                                    set.peers.insert(key, v);
                                }
                            }
                        }
                    }
                    if sets == *st.sets.as_ref().expect("matched Some") {
                        continue;
                    }
                    sets
                }
                _ => [INGRESS, EGRESS].map(|d| ctx.allow_set(m, &k.ports, d, None)),
            };
            work.push((iid as u32, sets));
        }
        for (iid, sets) in work {
            if let Some(Some(st)) = self.slab.get_mut(iid as usize) {
                st.sets = Some(sets);
                st.specs = None;
            }
        }
        for st in self.slab.iter_mut().flatten() {
            if st.count == 0 || st.local == 0 {
                st.sets = None;
                st.specs = None;
            }
        }
        for iid in gone {
            self.free(iid);
        }
    }

    /// Forgets identity `iid` (no address has it any more).
    fn free(&mut self, iid: u32) {
        let Some(st) = self.slab.get_mut(iid as usize).and_then(Option::take) else { return };
        if let Some(k) = st.key {
            let pk: PtrKey = (
                Arc::as_ptr(&k.label_key) as usize,
                Arc::as_ptr(&k.ports) as *const NamedPort as usize,
                k.class,
            );
            self.iid_of.remove(&pk);
            self.order.remove(&k);
        }
        self.free_ids.push(iid);
    }

    /// Builds the update from the settled identities and allow sets: numbers by rank (block
    /// classes first, then pod identities in key order), allow sets deduplicated and sorted,
    /// every address. Linear in identities, set entries and addresses; no selector work.
    fn assemble(&mut self) -> PolicyUpdate {
        // Label keys (and namespaces) no pod uses any more.
        let keys = self.memo.len();
        self.memo.retain(|k, _| Arc::strong_count(k) > 1);
        if self.memo.len() != keys {
            let used: std::collections::HashSet<&Labels> =
                self.memo.keys().map(|k| &k.ns_labels).collect();
            self.ns_memo.retain(|l, _| used.contains(l));
            self.port_lists.retain(|p| Arc::strong_count(p) > 1);
        }
        let space = self.space.clone();
        if std::mem::take(&mut self.renumber) {
            self.number = vec![0; self.slab.len()];
            let mut descr = vec![IdDesc::World, IdDesc::World];
            for (&c, &iid) in &self.class_iid {
                self.number[iid as usize] = descr.len() as Identity;
                descr.push(IdDesc::Block(c));
            }
            for (k, &iid) in &self.order {
                self.number[iid as usize] = descr.len() as Identity;
                descr.push(IdDesc::Pod(k.clone()));
            }
            self.ids = descr;
            for st in self.slab.iter_mut().flatten() {
                st.specs = None;
            }
        }
        let number = &self.number;
        let spec = |s: &LocalSet| {
            let mut peers: Vec<(Identity, u8, dataplane::policy::PortRanges)> = s
                .peers
                .iter()
                .map(|((iid, p), v)| (number[*iid as usize], *p, v.clone()))
                .collect();
            peers.sort_unstable();
            let any_peer = s.any_peer.iter().map(|(p, v)| (*p, v.clone())).collect();
            AllowSetSpec { peers, any_peer }
        };
        for st in self.slab.iter_mut().flatten() {
            if let (Some(sets), None) = (&st.sets, &st.specs) {
                st.specs = Some([&sets[0], &sets[1]].map(|s| s.as_ref().map(spec)));
            }
        }
        let local_specs = || {
            self.slab.iter().enumerate().filter_map(|(i, st)| {
                st.as_ref().and_then(|st| st.specs.as_ref()).map(|s| (i as u32, s))
            })
        };
        let mut specs: Vec<&AllowSetSpec> =
            local_specs().flat_map(|(_, s)| s.iter().flatten()).collect();
        specs.sort_unstable();
        specs.dedup();
        let index = |s: &Option<AllowSetSpec>| match s {
            None => NOT_ISOLATED,
            // Every spec is in `specs`, which is sorted.
            Some(s) => specs.binary_search(&s).map_or(NOT_ISOLATED, |i| i as u32 + 1),
        };
        let set_of: HashMap<u32, (u32, u32)> =
            local_specs().map(|(i, [a, b])| (i, (index(a), index(b)))).collect();
        let sets: Vec<AllowSetSpec> = specs.iter().map(|s| (*s).clone()).collect();
        let mut endpoints = Vec::with_capacity(self.by_ip.len());
        for (ip, e) in &self.by_ip {
            let Some((iid, local)) = e.linked else { continue };
            let (ingress, egress) = match set_of.get(&iid) {
                Some(&(i, e)) if local => (i, e),
                _ => (NOT_ISOLATED, NOT_ISOLATED),
            };
            endpoints.push((*ip, Endpoint { identity: number[iid as usize], ingress, egress }));
        }
        let mut ranges = Vec::new();
        for (start, c) in space.starts.iter().zip(&space.class_at) {
            let id = match self.class_iid.get(c) {
                Some(iid) if *c != 0 => self.number[*iid as usize],
                _ => WORLD,
            };
            if ranges.is_empty() && id == WORLD {
                continue;
            }
            ranges.push((Ipv4Addr::from(*start), id));
        }
        PolicyUpdate { endpoints, ranges, sets }
    }
}

/// Adds what policy `slot` says about label key `lk` to `m`.
fn evaluate(slot: u32, p: &Policy, lk: &LabelKey, m: &mut Matches) {
    evaluate_own(slot, p, lk, m);
    for (r, ns) in p.ns_peers() {
        if ns.matches(&lk.ns_labels) {
            if let Some(Peer::Pods { pods, .. }) = p.peer(r) {
                if pods.as_ref().is_none_or(|s| s.matches(&lk.labels)) {
                    m.peer_of.push((slot, r.0, r.1, r.2));
                }
            }
        }
    }
}

/// Adds what policy `slot` says about `lk` through its subject and its own-namespace peers
/// (nothing unless `lk` is in the policy's namespace).
fn evaluate_own(slot: u32, p: &Policy, lk: &LabelKey, m: &mut Matches) {
    if lk.ns != p.key.namespace {
        return;
    }
    if p.subject.matches(&lk.labels) {
        m.subject_of.push(slot);
    }
    for (d, rules) in p.rules.iter().enumerate() {
        for (ri, rule) in rules.iter().flatten().enumerate() {
            for (pi, peer) in rule.peers.iter().enumerate() {
                let hit = match peer {
                    Peer::Pods { namespaces: None, pods } => {
                        pods.as_ref().is_none_or(|s| s.matches(&lk.labels))
                    }
                    _ => false,
                };
                if hit {
                    m.peer_of.push((slot, d as u8, ri as u32, pi as u32));
                }
            }
        }
    }
}

fn class_text(space: &Space, class: u32) -> String {
    let blocks: Vec<String> = space.classes[class as usize]
        .iter()
        .map(|b| space.blocks[*b as usize].to_string())
        .collect();
    format!("ipBlock {}", blocks.join(" and "))
}

fn id_text(space: &Space, k: &IdKey) -> String {
    let mut s = format!("pods {}/{{", k.label_key.ns);
    for (i, (l, v)) in k.label_key.labels.iter().enumerate() {
        let _ = write!(s, "{}{l}={v}", if i == 0 { "" } else { "," });
    }
    s.push('}');
    let ns_extra: Vec<String> = k
        .label_key
        .ns_labels
        .iter()
        .filter(|(l, _)| *l != NAMESPACE_NAME_LABEL)
        .map(|(l, v)| format!("{l}={v}"))
        .collect();
    if !ns_extra.is_empty() {
        let _ = write!(s, " ns{{{}}}", ns_extra.join(","));
    }
    if !k.ports.is_empty() {
        let ports: Vec<String> =
            k.ports.iter().map(|(n, p, num)| format!("{n}={}/{num}", proto_name(*p))).collect();
        let _ = write!(s, " ports[{}]", ports.join(","));
    }
    if k.class != 0 {
        let _ = write!(s, " in {}", class_text(space, k.class));
    }
    s
}

/// A protocol's name in dumps.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        TCP => "TCP",
        UDP => "UDP",
        SCTP => "SCTP",
        ANY_PROTO => "other",
        _ => "?",
    }
}

/// What allow sets are built from in one pass.
struct SetCtx<'a> {
    slots: &'a [Option<Arc<Policy>>],
    space: &'a Space,
    peer_ids: &'a HashMap<PeerRef, BTreeSet<u32>>,
    block_ids: &'a [BTreeSet<u32>],
    slab: &'a [Option<IdState>],
    order: &'a BTreeMap<IdKey, u32>,
}

impl SetCtx<'_> {
    /// The allow set of direction `d` for a pod with matches `m` and named ports `own`, or
    /// `None` when no policy of that type selects it. With `only`, just the entries for that
    /// peer identity (and no any-peer entries).
    fn allow_set(
        &self,
        m: &Matches,
        own: &[NamedPort],
        d: usize,
        only: Option<u32>,
    ) -> Option<LocalSet> {
        let mut isolated = false;
        let mut peers: BTreeMap<(u32, u8), Vec<(u16, u16)>> = BTreeMap::new();
        let mut any: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
        let one: [u32; 1] = [only.unwrap_or(0)];
        for &slot in &m.subject_of {
            let Some(Some(p)) = self.slots.get(slot as usize) else { continue };
            let Some(rules) = &p.rules[d] else { continue };
            isolated = true;
            for (ri, rule) in rules.iter().enumerate() {
                // Ports that do not depend on the peer.
                let fixed = fixed_ports(&rule.ports, (d == INGRESS).then_some(own));
                let peer_named = d == EGRESS && !rule.ports.named.is_empty();
                if rule.peers.is_empty() {
                    if only.is_none() {
                        for &(proto, a, b) in &fixed {
                            any.entry(proto).or_default().push((a, b));
                        }
                    }
                    if peer_named {
                        match only {
                            Some(x) => self.add_named(&mut peers, x, &rule.ports),
                            None => {
                                for &id in self.order.values() {
                                    // Identities departing in this pass are still listed.
                                    if self.slab.get(id as usize).is_some_and(|st| {
                                        st.as_ref().is_some_and(|st| st.count > 0)
                                    }) {
                                        self.add_named(&mut peers, id, &rule.ports);
                                    }
                                }
                            }
                        }
                    }
                    continue;
                }
                for (pi, peer) in rule.peers.iter().enumerate() {
                    let set = match peer {
                        Peer::Pods { .. } => {
                            self.peer_ids.get(&(slot, d as u8, ri as u32, pi as u32))
                        }
                        Peer::Block(b) => match self.space.blocks.binary_search(b) {
                            Ok(i) => self.block_ids.get(i),
                            Err(_) => None,
                        },
                        Peer::Ipv6 => None,
                    };
                    let Some(set) = set else { continue };
                    let ids: Box<dyn Iterator<Item = &u32>> = match only {
                        Some(x) if set.contains(&x) => Box::new(one.iter()),
                        Some(_) => continue,
                        None => Box::new(set.iter()),
                    };
                    for &id in ids {
                        for &(proto, a, b) in &fixed {
                            peers.entry((id, proto)).or_default().push((a, b));
                        }
                        if peer_named {
                            self.add_named(&mut peers, id, &rule.ports);
                        }
                    }
                }
            }
        }
        if !isolated {
            return None;
        }
        let norm = |v: Vec<(u16, u16)>| PortSet::from_ranges(v).ranges().to_vec();
        Some(LocalSet {
            peers: peers.into_iter().map(|(k, v)| (k, norm(v))).collect(),
            any_peer: any.into_iter().map(|(p, v)| (p, norm(v))).collect(),
        })
    }

    /// Egress named ports resolved against peer `id`'s container ports.
    fn add_named(&self, peers: &mut BTreeMap<(u32, u8), Vec<(u16, u16)>>, id: u32, ports: &Ports) {
        let Some(Some(st)) = self.slab.get(id as usize) else { return };
        for (proto, name) in &ports.named {
            for (n, p, num) in st.ports() {
                if n == name && p == proto {
                    peers.entry((id, *proto)).or_default().push((*num, *num));
                }
            }
        }
    }
}

/// A rule's ports that do not depend on the peer: numbers, every protocol for a rule without
/// ports, and names resolved against `own` (ingress) when given.
fn fixed_ports(ports: &Ports, own: Option<&[NamedPort]>) -> Vec<(u8, u16, u16)> {
    if ports.all {
        return ALL_PROTOS.iter().map(|p| (*p, 0, u16::MAX)).collect();
    }
    let mut v = ports.numeric.clone();
    if let Some(own) = own {
        for (proto, name) in &ports.named {
            for (n, p, num) in own {
                if n == name && p == proto {
                    v.push((*proto, *num, *num));
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use proptest::prelude::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_follow_kubernetes() {
        let sel = |ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>| {
            Selector::parse(&LabelSelector {
                match_labels: (!ml.is_empty()).then(|| labels(ml)),
                match_expressions: (!me.is_empty()).then_some(me),
            })
        };
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = Labels::new();
        let everything = sel(&[], vec![]).unwrap();
        assert!(everything.matches(&web) && everything.matches(&none));
        let app_web = sel(&[("app", "web")], vec![]).unwrap();
        assert!(app_web.matches(&web) && !app_web.matches(&db) && !app_web.matches(&none));
        let in_ = sel(&[], vec![expr("app", "In", &["web", "api"])]).unwrap();
        assert!(in_.matches(&web) && !in_.matches(&db) && !in_.matches(&none));
        let not_in = sel(&[], vec![expr("app", "NotIn", &["web"])]).unwrap();
        assert!(!not_in.matches(&web) && not_in.matches(&db));
        assert!(not_in.matches(&none), "NotIn matches a missing label");
        let exists = sel(&[], vec![expr("tier", "Exists", &[])]).unwrap();
        assert!(exists.matches(&web) && !exists.matches(&db));
        let dne = sel(&[], vec![expr("tier", "DoesNotExist", &[])]).unwrap();
        assert!(!dne.matches(&web) && dne.matches(&db) && dne.matches(&none));
        // matchLabels and matchExpressions are ANDed.
        let both = sel(&[("app", "web")], vec![expr("tier", "NotIn", &["front"])]).unwrap();
        assert!(!both.matches(&web));
        // Invalid selectors.
        assert!(sel(&[], vec![expr("app", "In", &[])]).is_err(), "In without values");
        assert!(sel(&[], vec![expr("app", "Exists", &["x"])]).is_err(), "Exists with values");
        assert!(sel(&[], vec![expr("app", "Equals", &["x"])]).is_err(), "unknown operator");
        assert!(sel(&[("bad key!", "x")], vec![]).is_err());
        assert!(sel(&[("app", "-x")], vec![]).is_err());
        assert!(sel(&[("Example.com/app", "x")], vec![]).is_err(), "prefix is lowercase");
        assert!(sel(&[("example.com/app", "")], vec![]).is_ok(), "empty value is valid");
        assert!(sel(&[("a", &"x".repeat(64))], vec![]).is_err(), "value too long");
    }

    #[test]
    fn cidrs_parse_like_go() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap(), Some(Cidr { base: 0x0a00_0000, len: 8 }));
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().unwrap().last(), u32::MAX);
        assert_eq!(Cidr::parse("fd00::/8").unwrap(), None);
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "x/8", "fd00::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    fn block(cidr: (u32, u8), except: Vec<(u32, u8)>) -> Block {
        let c = |(a, l): (u32, u8)| Cidr {
            base: if l == 0 { 0 } else { a & (u32::MAX << (32 - l)) },
            len: l,
        };
        let cidr = c(cidr);
        let mut except: Vec<Cidr> = except
            .into_iter()
            .map(c)
            .filter(|e| e.len > cidr.len && cidr.contains(e.base))
            .collect();
        except.sort();
        except.dedup();
        Block { cidr, except }
    }

    /// Addresses where classes may change (and their neighbours).
    fn probes(blocks: &[Block]) -> Vec<u32> {
        let mut v = vec![0, u32::MAX];
        for b in blocks {
            for c in std::iter::once(&b.cidr).chain(&b.except) {
                for x in [c.first(), c.last()] {
                    v.extend([x.wrapping_sub(1), x, x.wrapping_add(1)]);
                }
            }
        }
        v
    }

    proptest! {
        #[test]
        fn classes_match_a_per_address_evaluation(
            raw in prop::collection::vec(
                ((any::<u32>(), 0u8..=32), prop::collection::vec((any::<u32>(), 0u8..=32), 0..4)),
                0..6,
            ),
            narrow in any::<bool>(),
        ) {
            // Mostly addresses in one /16 so blocks overlap.
            let fix = |a: u32| if narrow { 0x0a00_0000 | (a & 0xffff) } else { a };
            let blocks: Vec<Block> = raw
                .into_iter()
                .map(|((a, l), ex)| block((fix(a), l), ex.into_iter().map(|(a, l)| (fix(a), l)).collect()))
                .collect();
            let space = Space::new(blocks.clone());
            // Adjacent intervals differ, starts increase from 0.
            prop_assert_eq!(space.starts[0], 0);
            for w in space.starts.windows(2) { prop_assert!(w[0] < w[1]); }
            for w in space.class_at.windows(2) { prop_assert_ne!(w[0], w[1]); }
            for ip in probes(&blocks) {
                let want: BTreeSet<&Block> = blocks.iter().filter(|b| b.contains(ip)).collect();
                let got: BTreeSet<&Block> = space.classes[space.class_of(ip) as usize]
                    .iter()
                    .map(|i| &space.blocks[*i as usize])
                    .collect();
                prop_assert_eq!(got, want, "at {}", Ipv4Addr::from(ip));
            }
        }
    }

    #[test]
    fn ports_and_peers_are_validated() {
        let port = |proto: Option<&str>, port: Option<IntOrString>, end: Option<i32>| {
            let mut p = Ports::default();
            parse_port(
                &NetworkPolicyPort { protocol: proto.map(String::from), port, end_port: end },
                &mut p,
            )
            .map(|_| p)
        };
        let n = |x| Some(IntOrString::Int(x));
        assert_eq!(port(None, n(80), Some(90)).unwrap().numeric, vec![(TCP, 80, 90)]);
        assert_eq!(port(Some("UDP"), None, None).unwrap().numeric, vec![(UDP, 0, 65535)]);
        let named = port(None, Some(IntOrString::String("http".into())), None).unwrap();
        assert_eq!(named.named, vec![(TCP, "http".to_string())]);
        let numstr = port(None, Some(IntOrString::String("8080".into())), None).unwrap();
        assert_eq!(numstr.numeric, vec![(TCP, 8080, 8080)]);
        assert!(port(None, n(0), None).is_err());
        assert!(port(None, n(70000), None).is_err());
        assert!(port(None, n(90), Some(80)).is_err(), "endPort below port");
        assert!(port(None, None, Some(80)).is_err(), "endPort without port");
        assert!(port(None, Some(IntOrString::String("http".into())), Some(90)).is_err());
        assert!(port(Some("ICMP"), n(1), None).is_err());
        assert!(port(None, Some(IntOrString::String("Bad_Name".into())), None).is_err());
    }
}
