//! Compilation: the object [`Store`] plus this node's context in, the dataplane's service ports
//! (with their frontends) out, with Kubernetes semantics as kube-proxy implements them.
//!
//! # Rules
//!
//! Which Services are proxied (kube-proxy's `ShouldSkipService`):
//! - `type: ExternalName`, headless Services (`clusterIP: None`), Services without a ClusterIP
//!   and Services labelled `service.kubernetes.io/service-proxy-name` (another proxy owns them)
//!   are left alone. IPv4 only: IPv6 cluster/external/ingress addresses are skipped with a
//!   reason; a Service with no IPv4 ClusterIP is skipped whole.
//!
//! Service ports: every `spec.ports[]` entry is a dataplane service port named
//! `namespace/name:portname` (the port number when unnamed). TCP and UDP; SCTP and anything
//! else is refused with a logged reason and a counter.
//!
//! Frontends: each IPv4 ClusterIP ([`FrontendKind::ClusterIp`]); the `nodePort` on each of the
//! node's addresses ([`FrontendKind::NodePort`]); each `status.loadBalancer.ingress[].ip` whose
//! `ipMode` is not `Proxy` ([`FrontendKind::LoadBalancer`]); each `spec.externalIPs` entry
//! ([`FrontendKind::ExternalIp`]). The last three are *external*: with
//! `externalTrafficPolicy: Cluster` they set [`Frontend::masquerade_remote`].
//!
//! Endpoints: the EndpointSlices labelled `kubernetes.io/service-name` with `addressType:
//! IPv4`. As in kube-proxy, a service port takes its endpoints' port from the slice port whose
//! *name* (and protocol) equals the service port's name — this is how a named `targetPort`
//! resolves per endpoint, since the EndpointSlice controller already resolved it per pod.
//! Only an endpoint's first address counts; the same address and port in several slices is
//! kept once (the local copy wins, as in kube-proxy). Conditions: nil `ready` is true, nil
//! `serving` is `ready`, nil `terminating` is false; `publishNotReadyAddresses` makes every
//! endpoint ready. [`Backend::local`] is `nodeName == this node`.
//!
//! Traffic policies (kube-proxy's `CategorizeEndpoints`): `internalTrafficPolicy: Local`
//! gives ClusterIP frontends only this node's endpoints; `externalTrafficPolicy: Local` does
//! the same for external frontends. When the two policies differ for an externally reachable
//! port, one Kubernetes port becomes *two* dataplane service ports with their own ids:
//! `ns/name:port` (ClusterIP frontends) and `ns/name:port (external)` (the others).
//! A policy with no local endpoint yields a port with no backends: new flows are refused.
//! The dataplane's [`ServicePort::new`] picks ready backends, else serving-and-terminating
//! ones — the same fallback kube-proxy applies.
//!
//! Topology (`trafficDistribution`, hints): for Cluster-policy endpoints, node hints
//! (`forNodes`, PreferSameNode) are used when every ready endpoint has some and one names this
//! node; otherwise zone hints (`forZones`, PreferClose/PreferSameZone) when every ready
//! endpoint has some and one names this node's zone; otherwise none. Like kube-proxy (1.31+),
//! the hints decide, not the `trafficDistribution` field: the EndpointSlice controller writes
//! hints from it. An endpoint the hints exclude stays in the backend list with `ready: false`,
//! so flows already on it keep being forwarded, but no new flow picks it (`ready` in a
//! [`Backend`] means "ready for new flows from this node").
//!
//! Settings: `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`
//! (default 10800, valid 1..=86400); annotation `kxdp.io/lb-algorithm` (the serde names of
//! [`Algorithm`] such as `round-robin`, or IPVS names such as `rr`, `wlc`, `mh`; default
//! `random`); annotation `kxdp.io/maglev-table-size` (a prime in 251..=131071).
//!
//! # Determinism and incrementality
//!
//! Services compile in key order and ports in spec order; backends are sorted. Ids come from
//! [`Ids`] and stay stable while in use. The compiler keeps the last [`CompiledPort`] of every
//! service port and rebuilds only the Services the store reports as changed (all of them when
//! this node's Node object changes); an output equal to the previous one keeps the previous
//! `Arc`, so the scheduler (Maglev) is rebuilt only when its inputs changed. Each pass yields
//! a [`Diff`]. Two service ports claiming one frontend: the first claimant keeps it (in a full
//! compile, the smaller Service key), the other is refused with a counter and recompiled when
//! the frontend frees up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use dataplane::balance::Algorithm;
use dataplane::tables::{
    Backend, Frontend, FrontendKey, FrontendKind, Protocol, ServiceId, ServicePort, ServiceSpec,
    Tables, DEFAULT_AFFINITY_TIMEOUT_S, DEFAULT_MAGLEV_SIZE,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::ids::{BackendKey, Ids};
use crate::policy::PolicyCompiler;
use crate::skips::Skips;
use crate::store::{Changes, ObjKey, Store};
use dataplane::policy::PolicyUpdate;

/// Annotation choosing the balancing algorithm of every port of a Service.
pub const LB_ALGORITHM_ANNOTATION: &str = "kxdp.io/lb-algorithm";
/// Annotation setting the Maglev table size of every port of a Service.
pub const MAGLEV_SIZE_ANNOTATION: &str = "kxdp.io/maglev-table-size";
/// Label that hands a Service to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Node label with the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Suffix of the external half of a Kubernetes port whose traffic policies differ.
pub const EXTERNAL_SUFFIX: &str = " (external)";
/// Smallest Maglev table size accepted by the annotation.
pub const MAGLEV_MIN: u32 = 251;
/// Largest Maglev table size accepted by the annotation.
pub const MAGLEV_MAX: u32 = 131_071;

/// What the compiler knows about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (as in `spec.nodeName` / EndpointSlice `nodeName`).
    pub name: String,
    /// Addresses NodePorts listen on; when empty, the Node object's IPv4 InternalIP and
    /// ExternalIP addresses are used.
    pub addresses: Vec<Ipv4Addr>,
    /// Zone; when `None`, the Node object's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// One compiled dataplane service port and the frontends leading to it.
#[derive(Debug)]
pub struct CompiledPort {
    /// The service port, as the dataplane will hold it.
    pub port: Arc<ServicePort>,
    /// Its frontends, sorted by key.
    pub frontends: Vec<(FrontendKey, Frontend)>,
}

impl CompiledPort {
    /// Stable id.
    pub fn id(&self) -> ServiceId {
        self.port.id()
    }
}

/// What one compilation pass changed.
#[derive(Clone, Debug, Default)]
pub struct Diff {
    /// The compiler's generation after this pass (bumped only when something changed).
    pub generation: u64,
    /// New or changed service ports, by id.
    pub upserts: Vec<Arc<CompiledPort>>,
    /// Service ports that are gone.
    pub removals: Vec<ServiceId>,
    /// The whole NetworkPolicy state, when it changed.
    pub policy: Option<Arc<PolicyUpdate>>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty() && self.policy.is_none()
    }
}

/// An endpoint as read from a slice, before it becomes a [`Backend`].
#[derive(Clone, Debug)]
struct Endpoint {
    ip: Ipv4Addr,
    node: String,
    zone: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// A slice reduced to what compilation needs.
struct SliceView {
    /// (name, protocol, port) of each usable slice port.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<Endpoint>,
}

/// A dataplane service port before ids are assigned.
#[derive(Debug)]
struct Draft {
    name: String,
    proto: Protocol,
    algorithm: Algorithm,
    affinity_timeout_s: Option<u32>,
    maglev_size: u32,
    /// (endpoint, target port), sorted by (ip, port).
    backends: Vec<(Endpoint, u16)>,
    frontends: BTreeMap<FrontendKey, (FrontendKind, bool)>,
}

/// Per-Service settings shared by its ports.
struct ServiceSettings {
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    internal_local: bool,
    external_local: bool,
    publish_not_ready: bool,
    affinity_timeout_s: Option<u32>,
    algorithm: Algorithm,
    maglev_size: u32,
}

/// The incremental compiler.
#[derive(Debug)]
pub struct Compiler {
    ctx: NodeContext,
    /// Effective zone and NodePort addresses (context, else the Node object).
    zone: String,
    node_ips: Vec<Ipv4Addr>,
    node_seen: bool,
    ids: Ids,
    /// Service key -> ids of the ports it produced.
    by_service: HashMap<ObjKey, Vec<ServiceId>>,
    ports: BTreeMap<ServiceId, Arc<CompiledPort>>,
    /// Frontend -> service port that owns it.
    owners: HashMap<FrontendKey, ServiceId>,
    /// Frontend -> Services refused it because another port owned it.
    waiting: HashMap<FrontendKey, BTreeSet<ObjKey>>,
    generation: u64,
    skips: Skips,
    /// NetworkPolicy, compiled alongside (see [`crate::policy`]).
    policy: PolicyCompiler,
}

impl Compiler {
    /// A compiler for the node described by `ctx`, with default id grace.
    pub fn new(ctx: NodeContext) -> Self {
        Self::with_ids(ctx, Ids::default())
    }

    /// A compiler with a given id allocator.
    pub fn with_ids(ctx: NodeContext, ids: Ids) -> Self {
        let zone = ctx.zone.clone().unwrap_or_default();
        let node_ips = ctx.addresses.clone();
        let ctx_name = ctx.name.clone();
        Self {
            ctx,
            zone,
            node_ips,
            node_seen: false,
            ids,
            by_service: HashMap::new(),
            ports: BTreeMap::new(),
            owners: HashMap::new(),
            waiting: HashMap::new(),
            generation: 0,
            skips: Skips::new(),
            policy: PolicyCompiler::new(ctx_name),
        }
    }

    /// The node context.
    pub fn context(&self) -> &NodeContext {
        &self.ctx
    }
    /// The zone in effect.
    pub fn zone(&self) -> &str {
        &self.zone
    }
    /// The NodePort addresses in effect.
    pub fn node_ips(&self) -> &[Ipv4Addr] {
        &self.node_ips
    }
    /// Input refused so far (counted each time a Service is compiled).
    pub fn skips(&self) -> &Skips {
        &self.skips
    }
    /// Generation of the last pass that changed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Every compiled service port, by id.
    pub fn ports(&self) -> &BTreeMap<ServiceId, Arc<CompiledPort>> {
        &self.ports
    }
    /// The NetworkPolicy compiler (its last update, a readable view, its skips).
    pub fn policy(&self) -> &PolicyCompiler {
        &self.policy
    }
    /// The id allocator.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }
    /// Adopts a running dataplane's ids before the first compilation (see [`Ids::adopt`]);
    /// returns how many service and backend ids were adopted ((0, 0) once anything compiled).
    pub fn adopt_ids(&mut self, map: &dataplane::sync::IdMap) -> (usize, usize) {
        self.ids.adopt(map, Instant::now())
    }

    /// Compiles every Service from scratch-equivalent: each is re-evaluated, unchanged
    /// outputs keep their `Arc`.
    pub fn compile_all(&mut self, store: &Store) -> Diff {
        let mut changes = Changes {
            services: store.services().map(|(k, _)| k.clone()).collect(),
            ..Changes::default()
        };
        changes.services.extend(self.by_service.keys().cloned());
        changes.nodes.insert(self.ctx.name.clone());
        self.pass(store, &changes, Instant::now(), true)
    }

    /// Compiles what `changes` touched.
    pub fn compile(&mut self, store: &Store, changes: &Changes) -> Diff {
        self.compile_at(store, changes, Instant::now())
    }

    /// Compiles what `changes` touched, with `now` as the id allocator's clock.
    pub fn compile_at(&mut self, store: &Store, changes: &Changes, now: Instant) -> Diff {
        self.pass(store, changes, now, false)
    }

    /// One pass; `all_policy` recompiles NetworkPolicy from the whole store.
    fn pass(&mut self, store: &Store, changes: &Changes, now: Instant, all_policy: bool) -> Diff {
        let mut dirty: BTreeSet<ObjKey> = changes.services.clone();
        if !self.node_seen || changes.nodes.contains(&self.ctx.name) {
            self.node_seen = true;
            if self.refresh_node(store) {
                dirty.extend(store.services().map(|(k, _)| k.clone()));
                dirty.extend(self.by_service.keys().cloned());
            }
        }
        let mut upserts: BTreeMap<ServiceId, Arc<CompiledPort>> = BTreeMap::new();
        let mut removals: BTreeSet<ServiceId> = BTreeSet::new();
        // Services refused a frontend are recompiled when it frees up. A Service is requeued
        // at most once per pass, which bounds the loop; a frontend freed later in the pass
        // than that is picked up by the next pass touching either Service.
        let mut requeued: BTreeSet<ObjKey> = BTreeSet::new();
        while let Some(key) = dirty.pop_first() {
            let freed = self.compile_service(store, &key, now, &mut upserts, &mut removals);
            for fk in freed {
                if let Some(waiters) = self.waiting.remove(&fk) {
                    for w in waiters {
                        if requeued.insert(w.clone()) {
                            dirty.insert(w);
                        } else {
                            self.waiting.entry(fk).or_default().insert(w);
                        }
                    }
                }
            }
        }
        // An id both removed and upserted in one pass was re-created: it is an upsert.
        removals.retain(|id| !upserts.contains_key(id));
        let diff = Diff {
            generation: 0,
            upserts: upserts.into_values().collect(),
            removals: removals.into_iter().collect(),
            policy: if all_policy {
                self.policy.compile_all(store)
            } else {
                self.policy.compile(store, changes)
            },
        };
        if !diff.is_empty() {
            self.generation += 1;
        }
        Diff { generation: self.generation, ..diff }
    }

    /// Re-reads this node's zone and addresses; true when they changed.
    fn refresh_node(&mut self, store: &Store) -> bool {
        let node = store.node(&self.ctx.name);
        let zone = self.ctx.zone.clone().unwrap_or_else(|| {
            node.and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
                .unwrap_or_default()
        });
        let ips = if !self.ctx.addresses.is_empty() {
            self.ctx.addresses.clone()
        } else {
            let mut v: Vec<Ipv4Addr> = node
                .and_then(|n| n.status.as_ref()?.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let changed = zone != self.zone || ips != self.node_ips;
        self.zone = zone;
        self.node_ips = ips;
        changed
    }

    fn skip(&mut self, reason: &'static str, what: &dyn std::fmt::Display, detail: &str) {
        tracing::warn!(reason, object = %what, detail, "input skipped");
        self.skips.bump(reason);
    }

    /// Recompiles one Service; returns the frontends it gave up.
    fn compile_service(
        &mut self,
        store: &Store,
        key: &ObjKey,
        now: Instant,
        upserts: &mut BTreeMap<ServiceId, Arc<CompiledPort>>,
        removals: &mut BTreeSet<ServiceId>,
    ) -> Vec<FrontendKey> {
        let drafts = match store.service(key) {
            Some(svc) => self.drafts(key, svc, store),
            None => Vec::new(),
        };
        let old_ids = self.by_service.remove(key).unwrap_or_default();
        // Give up this Service's frontends first; its new ports claim them again below.
        let mut given_up: BTreeSet<FrontendKey> = BTreeSet::new();
        for id in &old_ids {
            if let Some(p) = self.ports.get(id) {
                for (fk, _) in &p.frontends {
                    if self.owners.get(fk) == Some(id) {
                        self.owners.remove(fk);
                        given_up.insert(*fk);
                    }
                }
            }
        }
        let mut new_ids = Vec::with_capacity(drafts.len());
        for draft in drafts {
            // Names embed the Service key, so a live name is one of this Service's old ports.
            let (id, fresh) = match self.ids.services.get(&draft.name) {
                Some(id) => (id, false),
                None => match self.ids.services.acquire(&draft.name, now) {
                    Some(id) => (id, true),
                    None => {
                        self.skip("service_ids_exhausted", key, &draft.name);
                        continue;
                    }
                },
            };
            let name = draft.name.clone();
            let Some(port) = self.build_port(key, id, draft, now) else {
                if fresh {
                    self.ids.services.release(&name, now);
                }
                continue;
            };
            for (fk, _) in &port.frontends {
                self.owners.insert(*fk, id);
                given_up.remove(fk);
            }
            match self.ports.get(&id) {
                Some(old) if same_port(old, &port) => {
                    // Unchanged: keep the old Arc (and its scheduler); drop the new references.
                    self.release_backends(&port, now);
                }
                old => {
                    if let Some(old) = old.cloned() {
                        self.release_backends(&old, now);
                    }
                    let port = Arc::new(port);
                    self.ports.insert(id, port.clone());
                    upserts.insert(id, port);
                }
            }
            new_ids.push(id);
        }
        for id in &old_ids {
            if new_ids.contains(id) {
                continue;
            }
            if let Some(old) = self.ports.remove(id) {
                self.release_backends(&old, now);
                self.ids.services.release(&old.port.spec().name, now);
                upserts.remove(id);
                removals.insert(*id);
            }
        }
        if !new_ids.is_empty() {
            self.by_service.insert(key.clone(), new_ids);
        }
        given_up.into_iter().collect()
    }

    fn port_name(&self, id: ServiceId) -> Option<String> {
        self.ports.get(&id).map(|p| p.port.spec().name.clone())
    }

    fn release_backends(&mut self, port: &CompiledPort, now: Instant) {
        let proto = port.port.spec().proto;
        for b in port.port.backends() {
            self.ids.backends.release(&(b.ip, b.port, proto), now);
        }
    }

    /// Turns a draft into a compiled port: assigns backend ids, claims frontends.
    fn build_port(
        &mut self,
        key: &ObjKey,
        id: ServiceId,
        draft: Draft,
        now: Instant,
    ) -> Option<CompiledPort> {
        let mut backends = Vec::with_capacity(draft.backends.len());
        for (ep, port) in draft.backends {
            let bkey: BackendKey = (ep.ip, port, draft.proto);
            let Some(bid) = self.ids.backends.acquire(&bkey, now) else {
                for b in &backends {
                    let b: &Backend = b;
                    self.ids.backends.release(&(b.ip, b.port, draft.proto), now);
                }
                self.skip("backend_ids_exhausted", key, &draft.name);
                return None;
            };
            backends.push(Backend {
                id: bid,
                ip: ep.ip,
                port,
                weight: 1,
                local: is_local(&ep, &self.ctx.name),
                node: ep.node,
                zone: ep.zone,
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
            });
        }
        let mut frontends = Vec::with_capacity(draft.frontends.len());
        for (fk, (kind, masquerade_remote)) in draft.frontends {
            match self.owners.get(&fk) {
                Some(&other) if other != id => {
                    let other_name = self.port_name(other).unwrap_or_default();
                    self.skip(
                        "frontend_conflict",
                        key,
                        &format!("{} {} already used by {other_name}", draft.name, fmt_key(&fk)),
                    );
                    self.waiting.entry(fk).or_default().insert(key.clone());
                }
                _ => frontends.push((fk, Frontend { service: id, kind, masquerade_remote })),
            }
        }
        let spec = ServiceSpec {
            id,
            name: draft.name,
            proto: draft.proto,
            algorithm: draft.algorithm,
            affinity_timeout_s: draft.affinity_timeout_s,
            maglev_size: draft.maglev_size,
        };
        Some(CompiledPort { port: Arc::new(ServicePort::new(spec, backends)), frontends })
    }

    /// The dataplane service ports one Service asks for (no ids yet).
    fn drafts(&mut self, key: &ObjKey, svc: &Service, store: &Store) -> Vec<Draft> {
        if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
            tracing::debug!(service = %key, "service-proxy-name set: another proxy owns it");
            self.skips.bump("service_other_proxy");
            return Vec::new();
        }
        let Some(spec) = svc.spec.as_ref() else {
            self.skip("service_missing_spec", key, "");
            return Vec::new();
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            tracing::debug!(service = %key, "ExternalName: nothing to proxy");
            self.skips.bump("service_external_name");
            return Vec::new();
        }
        let Some(settings) = self.settings(key, svc) else { return Vec::new() };
        let slices = self.slice_views(key, store);

        let mut drafts = Vec::new();
        let mut seen_names = BTreeSet::new();
        for sp in spec.ports.iter().flatten() {
            let port_label = sp.name.clone().filter(|n| !n.is_empty());
            let Ok(port) = u16::try_from(sp.port) else {
                self.skip("service_port_invalid", key, &format!("port {}", sp.port));
                continue;
            };
            if port == 0 {
                self.skip("service_port_invalid", key, "port 0");
                continue;
            }
            let proto = match sp.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => {
                    self.skip(
                        "service_port_sctp",
                        key,
                        &format!("port {port} is SCTP, which the dataplane does not proxy"),
                    );
                    continue;
                }
                other => {
                    self.skip("service_port_protocol", key, &format!("protocol {other:?}"));
                    continue;
                }
            };
            let name = format!("{key}:{}", port_label.clone().unwrap_or_else(|| port.to_string()));
            let node_port = match sp.node_port {
                None | Some(0) => None,
                Some(n) => match u16::try_from(n) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.skip("service_node_port_invalid", key, &format!("nodePort {n}"));
                        None
                    }
                },
            };
            if !seen_names.insert(name.clone()) {
                self.skip("service_port_duplicate", key, &name);
                continue;
            }
            let mut endpoints =
                endpoints_for(&slices, port_label.as_deref().unwrap_or(""), proto, &self.ctx.name);
            if settings.publish_not_ready {
                for (ep, _) in &mut endpoints {
                    ep.ready = true;
                }
            }

            let mut internal_fe = BTreeMap::new();
            for &ip in &settings.cluster_ips {
                internal_fe
                    .insert(FrontendKey::new(ip, port, proto), (FrontendKind::ClusterIp, false));
            }
            let mut external_fe = BTreeMap::new();
            let masq = !settings.external_local;
            if let Some(np) = node_port {
                for &ip in &self.node_ips {
                    external_fe
                        .insert(FrontendKey::new(ip, np, proto), (FrontendKind::NodePort, masq));
                }
            }
            for &ip in &settings.lb_ips {
                external_fe
                    .entry(FrontendKey::new(ip, port, proto))
                    .or_insert((FrontendKind::LoadBalancer, masq));
            }
            for &ip in &settings.external_ips {
                external_fe
                    .entry(FrontendKey::new(ip, port, proto))
                    .or_insert((FrontendKind::ExternalIp, masq));
            }
            let externally_accessible = !external_fe.is_empty();
            let base = |name: String, backends, frontends| Draft {
                name,
                proto,
                algorithm: settings.algorithm,
                affinity_timeout_s: settings.affinity_timeout_s,
                maglev_size: settings.maglev_size,
                backends,
                frontends,
            };
            if externally_accessible && settings.internal_local != settings.external_local {
                let internal_set = self.select(endpoints.clone(), settings.internal_local);
                let external_set = self.select(endpoints, settings.external_local);
                drafts.push(base(name.clone(), internal_set, internal_fe));
                drafts.push(base(format!("{name}{EXTERNAL_SUFFIX}"), external_set, external_fe));
            } else {
                let mut all = internal_fe;
                for (k, v) in external_fe {
                    all.entry(k).or_insert(v);
                }
                drafts.push(base(name, self.select(endpoints, settings.internal_local), all));
            }
        }
        drafts
    }

    /// The backends a policy uses: with `local`, this node's endpoints; otherwise every
    /// endpoint with topology hints applied (excluded ones marked not ready).
    fn select(&self, endpoints: Vec<(Endpoint, u16)>, local: bool) -> Vec<(Endpoint, u16)> {
        if local {
            let mut endpoints = endpoints;
            endpoints.retain(|(ep, _)| is_local(ep, &self.ctx.name));
            return endpoints;
        }
        let mode = topology_mode(endpoints.iter().map(|(e, _)| e), &self.ctx.name, &self.zone);
        if mode == Topology::None {
            return endpoints;
        }
        endpoints
            .into_iter()
            .map(|(mut ep, p)| {
                let keep = match mode {
                    Topology::None => true,
                    Topology::Node => ep.node_hints.contains(&self.ctx.name),
                    Topology::Zone => ep.zone_hints.contains(&self.zone),
                };
                if !keep {
                    ep.ready = false;
                }
                (ep, p)
            })
            .collect()
    }

    /// Reads the per-Service settings; `None` when the Service is skipped whole.
    fn settings(&mut self, key: &ObjKey, svc: &Service) -> Option<ServiceSettings> {
        let spec = svc.spec.as_ref()?;
        let mut raw_cluster: Vec<&str> =
            spec.cluster_ips.iter().flatten().map(String::as_str).collect();
        if raw_cluster.is_empty() {
            raw_cluster.extend(spec.cluster_ip.as_deref());
        }
        match raw_cluster.first() {
            None | Some(&"") => {
                tracing::debug!(service = %key, "no ClusterIP allocated: nothing to proxy");
                self.skips.bump("service_no_cluster_ip");
                return None;
            }
            Some(&"None") => {
                tracing::debug!(service = %key, "headless: nothing to proxy");
                self.skips.bump("service_headless");
                return None;
            }
            Some(_) => {}
        }
        let cluster_ips = self.ipv4_list(key, raw_cluster.iter().copied(), "cluster_ip");
        if cluster_ips.is_empty() {
            self.skip("service_no_ipv4_cluster_ip", key, "IPv4 proxy: no IPv4 ClusterIP");
            return None;
        }
        let external_ips = self.ipv4_list(
            key,
            spec.external_ips.iter().flatten().map(String::as_str),
            "external_ip",
        );
        let mut lb_raw = Vec::new();
        for ing in svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
        {
            let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else { continue };
            if ing.ip_mode.as_deref() == Some("Proxy") {
                tracing::debug!(service = %key, ip, "ingress ipMode Proxy: the load balancer proxies");
                self.skips.bump("lb_ingress_ip_mode_proxy");
                continue;
            }
            lb_raw.push(ip);
        }
        let lb_ips = self.ipv4_list(key, lb_raw.into_iter(), "lb_ingress_ip");

        let policy = |this: &mut Self, v: Option<&str>, what: &'static str| match v {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                this.skip(what, key, other);
                false
            }
        };
        let internal_local = policy(
            self,
            spec.internal_traffic_policy.as_deref(),
            "service_invalid_internal_policy",
        );
        let external_local = policy(
            self,
            spec.external_traffic_policy.as_deref(),
            "service_invalid_external_policy",
        );

        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                Some(match t {
                    None => DEFAULT_AFFINITY_TIMEOUT_S,
                    Some(t) if (1..=86_400).contains(&t) => t as u32,
                    Some(t) => {
                        self.skip("service_invalid_affinity_timeout", key, &t.to_string());
                        DEFAULT_AFFINITY_TIMEOUT_S
                    }
                })
            }
            Some(other) => {
                self.skip("service_invalid_session_affinity", key, other);
                None
            }
        };
        let annotations = svc.metadata.annotations.as_ref();
        let algorithm = match annotations.and_then(|a| a.get(LB_ALGORITHM_ANNOTATION)) {
            None => Algorithm::default(),
            Some(v) => match parse_algorithm(v) {
                Some(a) => a,
                None => {
                    self.skip("annotation_invalid_lb_algorithm", key, v);
                    Algorithm::default()
                }
            },
        };
        let maglev_size = match annotations.and_then(|a| a.get(MAGLEV_SIZE_ANNOTATION)) {
            None => DEFAULT_MAGLEV_SIZE,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (MAGLEV_MIN..=MAGLEV_MAX).contains(&n) && is_prime(n) => n,
                _ => {
                    self.skip("annotation_invalid_maglev_size", key, v);
                    DEFAULT_MAGLEV_SIZE
                }
            },
        };
        Some(ServiceSettings {
            cluster_ips,
            external_ips,
            lb_ips,
            internal_local,
            external_local,
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
            affinity_timeout_s,
            algorithm,
            maglev_size,
        })
    }

    /// Parses addresses, keeping IPv4 ones (sorted, deduplicated) and counting the rest.
    fn ipv4_list<'a>(
        &mut self,
        key: &ObjKey,
        raw: impl Iterator<Item = &'a str>,
        what: &'static str,
    ) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for s in raw {
            match s.trim().parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => out.push(ip),
                Ok(IpAddr::V6(_)) => {
                    tracing::debug!(service = %key, address = s, "IPv6 address skipped");
                    self.skips.bump(match what {
                        "cluster_ip" => "service_ipv6_cluster_ip",
                        "external_ip" => "service_ipv6_external_ip",
                        _ => "service_ipv6_lb_ingress_ip",
                    });
                }
                Err(_) => self.skip(
                    match what {
                        "cluster_ip" => "service_invalid_cluster_ip",
                        "external_ip" => "service_invalid_external_ip",
                        _ => "service_invalid_lb_ingress_ip",
                    },
                    key,
                    s,
                ),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Reads the Service's EndpointSlices (sorted by name), skipping what is unusable.
    fn slice_views(&mut self, key: &ObjKey, store: &Store) -> Vec<SliceView> {
        let slices: Vec<Arc<EndpointSlice>> = store.slices_for(key).cloned().collect();
        let mut out = Vec::with_capacity(slices.len());
        for slice in slices {
            let sname = slice.metadata.name.clone().unwrap_or_default();
            if slice.address_type != "IPv4" {
                tracing::debug!(service = %key, slice = sname, address_type = slice.address_type,
                    "non-IPv4 EndpointSlice skipped");
                self.skips.bump("endpointslice_not_ipv4");
                continue;
            }
            let mut ports = Vec::new();
            for p in slice.ports.iter().flatten() {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    // SCTP slice ports match no proxied service port; not an error.
                    _ => continue,
                };
                match p.port.map(u16::try_from) {
                    Some(Ok(n)) if n != 0 => {
                        ports.push((p.name.clone().unwrap_or_default(), proto, n))
                    }
                    other => self.skip(
                        "endpointslice_port_invalid",
                        key,
                        &format!("slice {sname} port {:?}: {other:?}", p.name),
                    ),
                }
            }
            let mut endpoints = Vec::with_capacity(slice.endpoints.len());
            for ep in &slice.endpoints {
                let Some(addr) = ep.addresses.first() else {
                    self.skip("endpoint_no_address", key, &sname);
                    continue;
                };
                let Ok(ip) = addr.trim().parse::<Ipv4Addr>() else {
                    self.skip("endpoint_invalid_address", key, addr);
                    continue;
                };
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let hints = ep.hints.as_ref();
                endpoints.push(Endpoint {
                    ip,
                    node: ep.node_name.clone().unwrap_or_default(),
                    zone: ep.zone.clone().unwrap_or_default(),
                    ready,
                    serving,
                    terminating,
                    zone_hints: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                });
            }
            out.push(SliceView { ports, endpoints });
        }
        out
    }

    /// A complete [`Tables`] of generation `generation` holding every compiled port.
    pub fn tables(&self, generation: u64) -> Tables {
        let mut b = Tables::builder(generation);
        for p in self.ports.values() {
            // Ids are non-zero and frontends match their port's protocol by construction.
            if let Err(e) = b.upsert_service(p.port.clone()) {
                tracing::error!(error = %e, "compiled port refused by the tables");
                continue;
            }
            for (k, f) in &p.frontends {
                if let Err(e) = b.upsert_frontend(*k, *f) {
                    tracing::error!(error = %e, "compiled frontend refused by the tables");
                }
            }
        }
        b.build()
    }
}

/// The endpoints of the slice ports named `name` with protocol `proto`, deduplicated by
/// (ip, port) — the first slice wins, except that a local copy beats a remote one, as in
/// kube-proxy — sorted by (ip, port).
fn endpoints_for(
    slices: &[SliceView],
    name: &str,
    proto: Protocol,
    node: &str,
) -> Vec<(Endpoint, u16)> {
    use std::collections::btree_map::Entry;
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for s in slices {
        let Some(&(_, _, port)) = s.ports.iter().find(|(n, p, _)| n == name && *p == proto) else {
            continue;
        };
        for ep in &s.endpoints {
            match by_addr.entry((ep.ip, port)) {
                Entry::Vacant(v) => {
                    v.insert(ep.clone());
                }
                Entry::Occupied(mut o) => {
                    if is_local(ep, node) && !is_local(o.get(), node) {
                        o.insert(ep.clone());
                    }
                }
            }
        }
    }
    by_addr.into_iter().map(|((_, port), ep)| (ep, port)).collect()
}

fn is_local(ep: &Endpoint, node: &str) -> bool {
    !ep.node.is_empty() && ep.node == node
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    Node,
    Zone,
}

/// kube-proxy's `topologyModeFromHints`: node hints when every ready endpoint has some and
/// one names this node; else zone hints likewise; else none.
fn topology_mode<'a>(
    endpoints: impl Iterator<Item = &'a Endpoint> + Clone,
    node: &str,
    zone: &str,
) -> Topology {
    let ready = endpoints.filter(|e| e.ready);
    let (mut all_node, mut for_node, mut all_zone, mut for_zone) = (true, false, true, false);
    let mut any = false;
    for e in ready {
        any = true;
        if e.node_hints.is_empty() {
            all_node = false;
        } else if e.node_hints.iter().any(|n| n == node) {
            for_node = true;
        }
        if e.zone_hints.is_empty() {
            all_zone = false;
        } else if !zone.is_empty() && e.zone_hints.iter().any(|z| z == zone) {
            for_zone = true;
        }
    }
    if !any {
        return Topology::None;
    }
    if all_node && for_node {
        return Topology::Node;
    }
    if all_zone && for_zone {
        return Topology::Zone;
    }
    Topology::None
}

fn same_port(a: &CompiledPort, b: &CompiledPort) -> bool {
    a.port.spec() == b.port.spec()
        && a.port.backends() == b.port.backends()
        && a.frontends == b.frontends
}

/// Parses an algorithm name: the serde (kebab-case) names of [`Algorithm`] or IPVS names.
pub fn parse_algorithm(s: &str) -> Option<Algorithm> {
    let s = s.trim().to_ascii_lowercase();
    let ipvs = match s.as_str() {
        "rr" => Some(Algorithm::RoundRobin),
        "wrr" => Some(Algorithm::WeightedRoundRobin),
        "lc" => Some(Algorithm::LeastConnection),
        "wlc" => Some(Algorithm::WeightedLeastConnection),
        "sh" => Some(Algorithm::SourceHash),
        "dh" => Some(Algorithm::DestinationHash),
        "sed" => Some(Algorithm::ShortestExpectedDelay),
        "nq" => Some(Algorithm::NeverQueue),
        "mh" => Some(Algorithm::Maglev),
        _ => None,
    };
    ipvs.or_else(|| serde_json::from_value(serde_json::Value::String(s)).ok())
}

/// The serde (kebab-case) name of an algorithm.
pub fn algorithm_name(a: Algorithm) -> String {
    match serde_json::to_value(a) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{a:?}"),
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// `ip:port/PROTO` of a frontend key.
pub fn fmt_key(k: &FrontendKey) -> String {
    let proto = match Protocol::from_number(k.proto) {
        Some(Protocol::Tcp) => "TCP".to_string(),
        Some(Protocol::Udp) => "UDP".to_string(),
        None => format!("proto{}", k.proto),
    };
    format!("{}:{}/{proto}", Ipv4Addr::from(k.ip), k.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_serde_and_ipvs() {
        assert_eq!(parse_algorithm("mh"), Some(Algorithm::Maglev));
        assert_eq!(parse_algorithm("maglev"), Some(Algorithm::Maglev));
        assert_eq!(parse_algorithm("round-robin"), Some(Algorithm::RoundRobin));
        assert_eq!(parse_algorithm("WLC"), Some(Algorithm::WeightedLeastConnection));
        assert_eq!(parse_algorithm("fastest"), None);
        assert_eq!(algorithm_name(Algorithm::WeightedRoundRobin), "weighted-round-robin");
    }

    #[test]
    fn primes() {
        assert!(is_prime(251) && is_prime(65_537) && is_prime(131_071));
        assert!(!is_prime(1) && !is_prime(65_536) && !is_prime(255));
    }
}
