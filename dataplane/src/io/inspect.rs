//! The inspect socket: what `kxdp-inspect` asks a running dataplane, and how it is answered.
//!
//! A Unix stream socket (mode 0600, next to the control socket by default), separate from the
//! control socket so that its protocol can grow without touching the control plane's. One
//! request per connection: the client writes one JSON [`Request`] line, the server answers with
//! one JSON [`Response`] line (a capture streams several, see [`crate::capture`]) and closes.
//!
//! What the server reads directly: the live tables (services, frontends, backends, generation),
//! the sync server's state, the counters each worker publishes every ~100 ms, and the shared
//! backend connection counts. What only a worker can answer (its conntrack, its per-backend
//! traffic counters, its sockets' kernel statistics, the flow query) is a [`WorkerRequest`] on
//! a channel the worker polls once per round of its loop; the worker answers with a bounded
//! snapshot, so no lock is ever taken on the packet path and a slow client never stalls a
//! worker. A worker that does not answer within [`WORKER_TIMEOUT`] makes the request fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam::channel::{Receiver, Sender};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::worker::WorkerStats;
use crate::capture::{Capture, CaptureFilter};
use crate::conntrack::{Dir, Flow, FlowKey, State};
use crate::counters::{Counters, DropReason, PassReason};
use crate::pipeline::{owner_of, peek_new_flow};
use crate::sync::{Applier, SyncStats};
use crate::tables::{FrontendKey, Protocol, Tables};
use crate::traffic::BackendTraffic;
use crate::wire::{IPPROTO_TCP, IPPROTO_UDP};
use crate::WorkerState;

/// How long the server waits for a worker's answer.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most conntrack entries one worker returns for a listing.
pub const MAX_LIST: usize = 100_000;
/// Largest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request to the dataplane.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Generation, control connection, uptime.
    Status,
    /// Services with frontends, backends and their counters.
    Services,
    /// Per-worker and per-queue counters.
    Workers,
    /// Conntrack entries matching a filter, at most `limit` in all.
    Conntrack {
        /// Which flows.
        filter: CtFilter,
        /// Most entries returned.
        limit: usize,
    },
    /// Removes the conntrack entries matching a filter.
    Flush {
        /// Which flows.
        filter: CtFilter,
    },
    /// Would this flow be allowed, and where would it go.
    Query {
        /// The packet's tuple.
        flow: Tuple,
        /// IP protocol number (6 TCP, 17 UDP).
        proto: u8,
    },
    /// Streams the frames the workers handle (see [`crate::capture`]).
    Capture {
        /// Which frames.
        filter: CaptureFilter,
        /// Stop after this many frames.
        max_packets: u64,
        /// Stop after this long.
        max_ms: u64,
    },
}

/// An answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// For [`Request::Status`].
    Status(Status),
    /// For [`Request::Services`].
    Services(Vec<ServiceInfo>),
    /// For [`Request::Workers`].
    Workers(Vec<WorkerInfo>),
    /// For [`Request::Conntrack`].
    Conntrack(CtList),
    /// For [`Request::Flush`]: flows removed.
    Flushed {
        /// How many.
        flows: u64,
    },
    /// For [`Request::Query`].
    Query(Explain),
    /// For [`Request::Capture`]: frames follow, then [`Response::CaptureEnd`].
    CaptureStarted,
    /// A captured frame.
    Frame(crate::capture::Captured),
    /// The end of a capture.
    CaptureEnd {
        /// Frames sent.
        packets: u64,
        /// Matching frames lost because the ring was full.
        lost: u64,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// An address and port pair in both directions of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dport: u16,
}

impl Tuple {
    fn of(k: &FlowKey) -> Self {
        Self {
            src: Ipv4Addr::from(k.src),
            sport: k.sport,
            dst: Ipv4Addr::from(k.dst),
            dport: k.dport,
        }
    }
    fn key(&self, proto: u8) -> FlowKey {
        FlowKey {
            src: u32::from(self.src),
            dst: u32::from(self.dst),
            sport: self.sport,
            dport: self.dport,
            proto,
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} -> {}:{}", self.src, self.sport, self.dst, self.dport)
    }
}

/// The control connection as the dataplane sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlState {
    /// Control connections open now.
    pub connected: u64,
    /// This dataplane's epoch (changes at every start).
    pub epoch: u64,
    /// Last control generation applied (0: none yet).
    pub generation: u64,
    /// Connections accepted since start.
    pub connections: u64,
    /// Snapshots applied.
    pub snapshots: u64,
    /// Deltas applied.
    pub deltas: u64,
    /// Messages refused.
    pub refused: u64,
    /// Messages that did not decode.
    pub malformed: u64,
}

/// For `kxdp-inspect status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Node name.
    pub node: String,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Live table generation.
    pub generation: u64,
    /// Service ports in the live tables.
    pub services: usize,
    /// Frontends in the live tables.
    pub frontends: usize,
    /// Workers running.
    pub workers: usize,
    /// Control connection.
    pub control: ControlState,
}

/// One frontend of a service port.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrontendInfo {
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// ClusterIp, NodePort, LoadBalancer, ExternalIp.
    pub kind: String,
}

/// One backend with its counters summed over workers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendInfo {
    /// Stable id.
    pub id: u32,
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Weight.
    pub weight: u16,
    /// Ready.
    pub ready: bool,
    /// Serving.
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    /// New flows may be scheduled to it.
    pub selectable: bool,
    /// Connections open now (all workers): flows to it in conntrack.
    pub active_conns: u32,
    /// Traffic since start.
    pub traffic: BackendTraffic,
}

/// One service port.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Stable id.
    pub id: u32,
    /// `namespace/name:port`.
    pub name: String,
    /// TCP or UDP.
    pub proto: String,
    /// Scheduler.
    pub algorithm: String,
    /// ClientIP affinity timeout.
    pub affinity_timeout_s: Option<u32>,
    /// Frontends.
    pub frontends: Vec<FrontendInfo>,
    /// Backends.
    pub backends: Vec<BackendInfo>,
    /// Traffic of all backends.
    pub traffic: BackendTraffic,
}

/// One AF_XDP socket, with the kernel's statistics of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Interface.
    pub iface: String,
    /// Queue.
    pub queue: u32,
    /// Frames the kernel dropped for this socket (rx ring full, no fill frame, ...).
    pub rx_dropped: u64,
    /// Invalid rx descriptors.
    pub rx_invalid_descs: u64,
    /// Invalid tx descriptors.
    pub tx_invalid_descs: u64,
    /// Times the rx ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty.
    pub rx_fill_ring_empty: u64,
    /// Times the tx ring was empty.
    pub tx_ring_empty: u64,
}

/// One worker's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Worker index.
    pub id: usize,
    /// Frames received.
    pub rx: u64,
    /// Frames sent out of an interface.
    pub tx: u64,
    /// Drops by reason (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    /// Frames to the kernel by reason (every reason).
    pub passes: BTreeMap<String, u64>,
    /// Other pipeline counters (new flows, translations, rejects, ...).
    pub pipeline: BTreeMap<String, u64>,
    /// I/O counters (transmitted, handed off, tx drops, punts).
    pub io: BTreeMap<String, u64>,
    /// Live conntrack flows.
    pub flows: u64,
    /// Conntrack evictions.
    pub evictions: u64,
    /// The worker's sockets.
    pub queues: Vec<QueueInfo>,
}

/// Which conntrack entries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CtFilter {
    /// An address on either side of either tuple.
    pub addr: Option<Ipv4Addr>,
    /// A port on either side of either tuple.
    pub port: Option<u16>,
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Service port name (exact `ns/name:port`, or `ns/name` for all its ports).
    pub service: Option<String>,
    /// Backend address.
    pub backend: Option<Ipv4Addr>,
}

/// The filter as a worker applies it (service names resolved to ids by the server).
#[derive(Clone, Debug, Default)]
pub struct CtMatch {
    addr: Option<u32>,
    port: Option<u16>,
    proto: Option<u8>,
    services: Option<Vec<u32>>,
    backend: Option<u32>,
}

impl CtMatch {
    /// Resolves `f` against `t`: an unknown service name matches nothing.
    pub fn new(f: &CtFilter, t: &Tables) -> Self {
        let services = f.service.as_ref().map(|name| {
            t.services()
                .filter(|s| {
                    let n = &s.spec().name;
                    n == name || n.split_once(':').is_some_and(|(base, _)| base == name)
                })
                .map(|s| s.id())
                .collect()
        });
        Self {
            addr: f.addr.map(u32::from),
            port: f.port,
            proto: f.proto,
            services,
            backend: f.backend.map(u32::from),
        }
    }

    /// Whether `flow` matches.
    pub fn matches(&self, flow: &Flow) -> bool {
        let (o, r) = (&flow.orig, &flow.reply);
        self.addr.is_none_or(|a| [o.src, o.dst, r.src, r.dst].contains(&a))
            && self.port.is_none_or(|p| [o.sport, o.dport, r.sport, r.dport].contains(&p))
            && self.proto.is_none_or(|p| o.proto == p)
            && self.services.as_ref().is_none_or(|s| s.contains(&flow.service))
            && self.backend.is_none_or(|b| flow.service != 0 && r.src == b)
    }
}

/// One conntrack entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowEntry {
    /// Owning worker.
    pub worker: usize,
    /// tcp, udp.
    pub proto: String,
    /// Connection state.
    pub state: String,
    /// As the client sends it.
    pub orig: Tuple,
    /// As the backend answers.
    pub reply: Tuple,
    /// Service port id (0: untranslated).
    pub service_id: u32,
    /// Service port name (empty when untranslated or gone).
    pub service: String,
    /// Backend id.
    pub backend_id: u32,
    /// Packets from the client.
    pub packets_orig: u64,
    /// Packets from the backend.
    pub packets_reply: u64,
    /// Seconds until it expires.
    pub expires_in_s: f64,
}

/// A conntrack listing.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CtList {
    /// Entries matching, over all workers.
    pub matched: u64,
    /// Entries returned (at most the limit).
    pub entries: Vec<FlowEntry>,
}

/// The answer to a flow query.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Explain {
    /// The worker that owns the flow (and answered).
    pub worker: usize,
    /// Live table generation used.
    pub generation: u64,
    /// What the pipeline does with the packet: `existing-flow`, `new-flow`, `reject`,
    /// `drop`, `forward` (untranslated, to a pod), `kernel` (handed to the kernel).
    pub verdict: String,
    /// Why, in words.
    pub reason: String,
    /// The conntrack entry the packet belongs to, and its direction (`orig`/`reply`).
    pub conntrack: Option<(FlowEntry, String)>,
    /// Service port matched.
    pub service: Option<String>,
    /// Backend chosen (id, address, port).
    pub backend: Option<(u32, Ipv4Addr, u16)>,
    /// The choice followed a session-affinity entry.
    pub by_affinity: bool,
    /// The flow is source-NATed.
    pub snat: bool,
    /// The packet as it leaves, after translation.
    pub translated: Option<Tuple>,
    /// Egress interface index (none: the kernel routes it).
    pub egress_ifindex: Option<u32>,
}

/// What a worker is asked; each carries the channel for its answer.
pub enum WorkerRequest {
    /// Traffic counters of these backend ids.
    Traffic(Vec<u32>, Sender<Vec<BackendTraffic>>),
    /// Conntrack entries matching, at most `limit`, with the number matching.
    List(CtMatch, usize, Sender<(u64, Vec<FlowEntry>)>),
    /// Removes matching conntrack entries; answers how many.
    Flush(CtMatch, Sender<u64>),
    /// The flow query.
    Query(FlowKey, Sender<Explain>),
    /// The worker's pipeline counters as of now, and its sockets' kernel statistics.
    Counters(Sender<(Counters, Vec<QueueInfo>)>),
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        n => n.to_string(),
    }
}

fn state_name(s: State) -> String {
    format!("{s:?}").to_ascii_uppercase()
}

fn entry(worker: usize, f: &Flow, now: u64) -> FlowEntry {
    FlowEntry {
        worker,
        proto: proto_name(f.orig.proto),
        state: state_name(f.state),
        orig: Tuple::of(&f.orig),
        reply: Tuple::of(&f.reply),
        service_id: f.service,
        service: String::new(),
        backend_id: f.backend,
        packets_orig: f.packets_orig,
        packets_reply: f.packets_reply,
        expires_in_s: f.expires.saturating_sub(now) as f64 / 1e9,
    }
}

/// Answers one request in a worker, between two rounds of its loop. `queues` gives the
/// worker's sockets (only called for [`WorkerRequest::Counters`]). A dropped receiver (the
/// server gave up waiting) is ignored.
pub fn serve_worker(
    req: WorkerRequest,
    w: &mut WorkerState,
    t: &Tables,
    now: u64,
    queues: impl FnOnce() -> Vec<QueueInfo>,
) {
    let id = usize::from(w.worker_id());
    match req {
        WorkerRequest::Traffic(ids, tx) => {
            let _ = tx.send(crate::traffic::backend_totals(&w.ct, &ids));
        }
        WorkerRequest::List(m, limit, tx) => {
            let mut n = 0u64;
            let mut out = Vec::new();
            for f in w.ct.iter().filter(|f| f.expires > now && m.matches(f)) {
                n += 1;
                if out.len() < limit.min(MAX_LIST) {
                    out.push(entry(id, f, now));
                }
            }
            let _ = tx.send((n, out));
        }
        WorkerRequest::Flush(m, tx) => {
            let n = w.ct.flush(|f| m.matches(f));
            if n > 0 {
                tracing::info!(worker = id, flows = n, "conntrack entries flushed on request");
            }
            let _ = tx.send(n as u64);
        }
        WorkerRequest::Query(key, tx) => {
            let _ = tx.send(explain(w, t, &key, now));
        }
        WorkerRequest::Counters(tx) => {
            let _ = tx.send((w.counters.clone(), queues()));
        }
    }
}

/// The flow query, on the worker that owns the flow: its conntrack first (as the pipeline
/// looks it up), then the new-flow decision ([`peek_new_flow`]), then the untranslated paths.
pub fn explain(w: &mut WorkerState, t: &Tables, key: &FlowKey, now: u64) -> Explain {
    let mut e = Explain {
        worker: usize::from(w.worker_id()),
        generation: t.generation(),
        ..Explain::default()
    };
    let name = |id| t.service(id).map(|s| s.spec().name.clone());
    if let Some((idx, dir)) = w.ct.lookup(key, now) {
        let f = *w.ct.flow(idx);
        let mut ent = entry(e.worker, &f, now);
        ent.service = name(f.service).unwrap_or_default();
        let alive =
            f.service == 0 || t.service(f.service).is_some_and(|s| s.backend(f.backend).is_some());
        let to = if dir == Dir::Orig { f.reply } else { f.orig };
        e.service = name(f.service);
        e.backend =
            t.service(f.service).and_then(|s| s.backend(f.backend)).map(|b| (b.id, b.ip, b.port));
        e.snat = f.service != 0 && f.reply.dst != f.orig.src;
        if alive {
            e.verdict = "existing-flow".into();
            e.reason = format!("conntrack entry ({:?} direction)", dir);
            let out = FlowKey { src: to.dst, dst: to.src, sport: to.dport, dport: to.sport, ..to };
            e.translated = Some(Tuple::of(&out));
            e.egress_ifindex = t.routes().lookup(out.dst).map(|h| h.ifindex);
        } else {
            e.verdict = "drop".into();
            e.reason = "the flow's backend or service was removed (TCP: reset sent; UDP: \
                        re-balanced on its next packet)"
                .into();
        }
        let d = if dir == Dir::Orig { "orig" } else { "reply" };
        e.conntrack = Some((ent, d.into()));
        return e;
    }
    if let Some(c) = peek_new_flow(t, w, key, now) {
        e.service = name(c.frontend.service);
        match c.backend {
            Some(b) if c.policy.is_err() => {
                e.verdict = "drop".into();
                e.reason = format!(
                    "NetworkPolicy ({}) to backend {}:{}",
                    c.policy.err().map_or("", |r| r.as_str()),
                    Ipv4Addr::from(b.ip),
                    b.port
                );
                e.backend = Some((b.id, Ipv4Addr::from(b.ip), b.port));
            }
            Some(b) => {
                e.verdict = "new-flow".into();
                e.reason = format!(
                    "{:?} frontend; {}",
                    c.frontend.kind,
                    if c.by_affinity { "session affinity" } else { "scheduler pick" }
                );
                e.backend = Some((b.id, Ipv4Addr::from(b.ip), b.port));
                e.by_affinity = c.by_affinity;
                e.snat = c.snat;
                let src = if c.snat { t.snat_ip().map_or(key.src, u32::from) } else { key.src };
                let out = FlowKey { src, dst: b.ip, sport: key.sport, dport: b.port, ..*key };
                e.translated = Some(Tuple::of(&out));
                e.egress_ifindex = t.routes().lookup(b.ip).map(|h| h.ifindex);
            }
            None => {
                e.verdict = "reject".into();
                e.reason = "no usable endpoint: TCP reset / ICMP port unreachable".into();
            }
        }
        return e;
    }
    if t.frontend(&FrontendKey { ip: key.dst, port: key.dport, proto: key.proto }).is_some() {
        e.verdict = "drop".into();
        e.reason = DropReason::ServiceRemoved.as_str().into();
    } else if t.is_vip(key.dst) {
        e.verdict = "drop".into();
        e.reason = format!("{}: a service address, not this port", DropReason::VipNoPort);
    } else if let Some(r) = plain_policy_denies(t, key) {
        e.verdict = "drop".into();
        e.reason = format!("NetworkPolicy ({r})");
    } else if let Some(h) = t.routes().host(key.dst) {
        e.verdict = "forward".into();
        e.reason = "untranslated, to a pod this node routes".into();
        e.translated = Some(Tuple::of(key));
        e.egress_ifindex = Some(h.ifindex);
    } else {
        e.verdict = "kernel".into();
        e.reason = PassReason::NotOurs.as_str().into();
    }
    e
}

/// NetworkPolicy on an untranslated connection, as the pipeline checks it: only when either
/// side is isolated.
fn plain_policy_denies(t: &Tables, key: &FlowKey) -> Option<DropReason> {
    let pol = t.policy();
    if !pol.active() || !(pol.isolated(key.src) || pol.isolated(key.dst)) {
        return None;
    }
    pol.check(key.src, key.dst, key.proto, key.dport).err()
}

/// What the server needs from the running dataplane.
pub struct Context {
    /// Node name.
    pub node: String,
    /// Start time.
    pub started: Instant,
    /// The live tables.
    pub live: Arc<ArcSwap<Tables>>,
    /// The sync applier (control generation, epoch, stats).
    pub applier: Arc<Mutex<Applier>>,
    /// Workers' published counters.
    pub stats: Vec<Arc<WorkerStats>>,
    /// Workers' request channels, by worker index.
    pub workers: Vec<Sender<WorkerRequest>>,
    /// The capture session.
    pub capture: Arc<Capture>,
}

fn ask<T>(
    to: &Sender<WorkerRequest>,
    make: impl FnOnce(Sender<T>) -> WorkerRequest,
) -> Result<T, String> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    to.send_timeout(make(tx), WORKER_TIMEOUT).map_err(|e| match e {
        crossbeam::channel::SendTimeoutError::Timeout(_) => "a worker is not answering".to_string(),
        crossbeam::channel::SendTimeoutError::Disconnected(_) => "a worker has stopped".to_string(),
    })?;
    rx.recv_timeout(WORKER_TIMEOUT).map_err(|_| "a worker did not answer in time".to_string())
}

impl Context {
    /// Generation, control state, uptime.
    pub fn status(&self) -> Status {
        let t = self.live.load();
        let (epoch, generation, s) = {
            let a = self.applier.lock();
            (a.epoch(), a.generation(), a.stats().clone())
        };
        Status {
            node: self.node.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            generation: t.generation(),
            services: t.services().count(),
            frontends: t.frontends().len(),
            workers: self.workers.len(),
            control: ControlState {
                connected: SyncStats::get(&s.active),
                epoch,
                generation,
                connections: SyncStats::get(&s.connections),
                snapshots: SyncStats::get(&s.snapshots),
                deltas: SyncStats::get(&s.deltas),
                refused: SyncStats::get(&s.refused),
                malformed: SyncStats::get(&s.malformed),
            },
        }
    }

    /// Every service port with its frontends, backends and counters, by name.
    pub fn services(&self) -> Result<Vec<ServiceInfo>, String> {
        let t = self.live.load_full();
        let mut ids: Vec<u32> = Vec::new();
        for s in t.services() {
            ids.extend(s.backends().iter().map(|b| b.id));
        }
        let mut traffic = vec![BackendTraffic::default(); ids.len()];
        for w in &self.workers {
            let got = ask(w, |tx| WorkerRequest::Traffic(ids.clone(), tx))?;
            for (a, b) in traffic.iter_mut().zip(&got) {
                a.merge(b);
            }
        }
        let by_id: std::collections::HashMap<u32, BackendTraffic> =
            ids.iter().copied().zip(traffic).collect();
        let mut frontends: BTreeMap<u32, Vec<FrontendInfo>> = BTreeMap::new();
        for (k, f) in t.frontends() {
            frontends.entry(f.service).or_default().push(FrontendInfo {
                ip: Ipv4Addr::from(k.ip),
                port: k.port,
                kind: format!("{:?}", f.kind),
            });
        }
        let mut out: Vec<ServiceInfo> = t
            .services()
            .map(|s| {
                let spec = s.spec();
                let backends: Vec<BackendInfo> = s
                    .backends()
                    .iter()
                    .map(|b| {
                        let traffic = by_id.get(&b.id).copied().unwrap_or_default();
                        BackendInfo {
                            id: b.id,
                            ip: b.ip,
                            port: b.port,
                            weight: b.weight,
                            ready: b.ready,
                            serving: b.serving,
                            terminating: b.terminating,
                            local: b.local,
                            selectable: s.is_selectable(b.id),
                            active_conns: u32::try_from(traffic.active).unwrap_or(u32::MAX),
                            traffic,
                        }
                    })
                    .collect();
                let mut sum = BackendTraffic::default();
                for b in &backends {
                    sum.merge(&b.traffic);
                }
                let mut fes = frontends.remove(&s.id()).unwrap_or_default();
                fes.sort_by_key(|f| (f.ip, f.port));
                ServiceInfo {
                    id: s.id(),
                    name: spec.name.clone(),
                    proto: match spec.proto {
                        Protocol::Tcp => "TCP".into(),
                        Protocol::Udp => "UDP".into(),
                        #[allow(unreachable_patterns)]
                        p => format!("{p:?}"),
                    },
                    algorithm: spec.algorithm.name().into(),
                    affinity_timeout_s: spec.affinity_timeout_s,
                    frontends: fes,
                    backends,
                    traffic: sum,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Per-worker counters with every drop and pass reason, and each worker's sockets.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>, String> {
        let mut out = Vec::new();
        for (id, s) in self.stats.iter().enumerate() {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            // Pipeline counters from the worker itself (exact now); I/O counters as the
            // worker last published them (every ~100 ms).
            let (c, queues) = match self.workers.get(id) {
                Some(w) => ask(w, WorkerRequest::Counters)?,
                None => (s.counters.lock().clone(), Vec::new()),
            };
            let pipeline = [
                ("nat_new", c.nat_new),
                ("nat_forward", c.nat_forward),
                ("nat_reply", c.nat_reply),
                ("forwarded_plain", c.forwarded_plain),
                ("affinity_hits", c.affinity_hits),
                ("rejects_sent", c.rejects_sent),
                ("echo_replies", c.echo_replies),
                ("icmp_errors_translated", c.icmp_errors_translated),
                ("fragments_translated", c.fragments_translated),
                ("udp_rebalanced", c.udp_rebalanced),
                ("snat_flows", c.snat_flows),
                ("handed_off", c.handed_off),
                ("policy_flows", c.policy_flows),
            ];
            let io = [
                ("transmitted", get(&s.transmitted)),
                ("handed_off", get(&s.handed_off)),
                ("tx_dropped", get(&s.tx_dropped)),
                ("punted", get(&s.punted)),
                ("punt_failed", get(&s.punt_failed)),
                ("idle_rounds", get(&s.idle_rounds)),
            ];
            out.push(WorkerInfo {
                id,
                rx: c.rx,
                tx: c.tx,
                drops: DropReason::ALL.iter().map(|r| (r.as_str().into(), c.drops(*r))).collect(),
                passes: PassReason::ALL.iter().map(|r| (r.as_str().into(), c.passes(*r))).collect(),
                pipeline: pipeline.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                io: io.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                flows: get(&s.flows),
                evictions: get(&s.evictions),
                queues,
            });
        }
        Ok(out)
    }

    /// Conntrack entries matching `f`, at most `limit` over all workers.
    pub fn conntrack(&self, f: &CtFilter, limit: usize) -> Result<CtList, String> {
        let t = self.live.load_full();
        let m = CtMatch::new(f, &t);
        let mut list = CtList::default();
        for w in &self.workers {
            let left = limit.saturating_sub(list.entries.len());
            let (n, entries) = ask(w, |tx| WorkerRequest::List(m.clone(), left, tx))?;
            list.matched += n;
            list.entries.extend(entries);
        }
        for e in &mut list.entries {
            e.service = t.service(e.service_id).map(|s| s.spec().name.clone()).unwrap_or_default();
        }
        Ok(list)
    }

    /// Removes matching conntrack entries on every worker.
    pub fn flush(&self, f: &CtFilter) -> Result<u64, String> {
        let t = self.live.load_full();
        let m = CtMatch::new(f, &t);
        let mut n = 0;
        for w in &self.workers {
            n += ask(w, |tx| WorkerRequest::Flush(m.clone(), tx))?;
        }
        Ok(n)
    }

    /// The flow query, answered by the worker that owns the flow; if another worker holds a
    /// conntrack entry for the tuple (a reply-direction query), that worker's answer wins.
    pub fn query(&self, flow: Tuple, proto: u8) -> Result<Explain, String> {
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Err(format!("protocol {proto}: only TCP (6) and UDP (17) flows are queried"));
        }
        if self.workers.is_empty() {
            return Err("no worker is running".into());
        }
        let key = flow.key(proto);
        let t = self.live.load_full();
        let n = self.workers.len() as u16;
        let owner = if t.frontend(&FrontendKey { ip: key.dst, port: key.dport, proto }).is_some() {
            owner_of(&t, key.src, key.sport, n)
        } else {
            owner_of(&t, key.dst, key.dport, n)
        };
        let mut answer =
            ask(&self.workers[usize::from(owner)], |tx| WorkerRequest::Query(key, tx))?;
        if answer.conntrack.is_none() {
            for (i, w) in self.workers.iter().enumerate() {
                if i != usize::from(owner) {
                    let e = ask(w, |tx| WorkerRequest::Query(key, tx))?;
                    if e.conntrack.is_some() {
                        answer = e;
                        break;
                    }
                }
            }
        }
        Ok(answer)
    }
}

/// The inspect server: one thread accepting, one short-lived thread per connection.
pub struct InspectServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl InspectServer {
    /// Binds `path` (mode 0600; a stale socket is replaced, a live one is an error).
    pub fn spawn(path: &Path, ctx: Arc<Context>) -> std::io::Result<InspectServer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            std::thread::Builder::new().name("kxdp-inspect".into()).spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    let ctx = ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name("kxdp-inspect-conn".into())
                        .spawn(move || serve_conn(s, &ctx));
                }
            })?
        };
        Ok(InspectServer { path: path.to_path_buf(), stop, accept: Some(accept) })
    }

    /// Stops accepting and removes the socket.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for InspectServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_line(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

fn serve_conn(mut s: UnixStream, ctx: &Context) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    // A client that stops reading ends its capture instead of holding the session.
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = s.try_clone().map(|c| BufReader::new(c).take(MAX_REQUEST).read_line(&mut line));
    let req: Result<Request, String> = match read {
        Ok(Ok(_)) => serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
        Ok(Err(e)) | Err(e) => Err(format!("reading the request: {e}")),
    };
    let answer = match req {
        Err(message) => Response::Error { message },
        Ok(Request::Status) => Response::Status(ctx.status()),
        Ok(Request::Services) => ctx.services().map_or_else(err, Response::Services),
        Ok(Request::Workers) => ctx.workers().map_or_else(err, Response::Workers),
        Ok(Request::Conntrack { filter, limit }) => {
            ctx.conntrack(&filter, limit).map_or_else(err, Response::Conntrack)
        }
        Ok(Request::Flush { filter }) => {
            ctx.flush(&filter).map_or_else(err, |flows| Response::Flushed { flows })
        }
        Ok(Request::Query { flow, proto }) => {
            ctx.query(flow, proto).map_or_else(err, Response::Query)
        }
        Ok(Request::Capture { filter, max_packets, max_ms }) => {
            crate::capture::stream(&ctx.capture, filter, max_packets, max_ms, |r| {
                write_line(&mut s, &r)
            });
            return;
        }
    };
    let _ = write_line(&mut s, &answer);
}

fn err(message: String) -> Response {
    Response::Error { message }
}

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the dataplane is not running (nothing at {0}; is kxdp-dataplane started, and is --socket right?)")]
    NotRunning(PathBuf),
    /// The socket is not ours to use.
    #[error("permission denied on {0}: the inspect socket is root's (mode 0600); run as root")]
    Denied(PathBuf),
    /// Anything else on the socket.
    #[error("talking to the dataplane at {path}: {source}")]
    Io {
        /// Socket.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The dataplane answered with an error.
    #[error("the dataplane refused: {0}")]
    Refused(String),
    /// The answer did not decode.
    #[error("unexpected answer from the dataplane: {0}")]
    Protocol(String),
}

/// A connection to the inspect socket with the request sent.
pub struct Client {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Client {
    /// Connects to `path` and sends `req`.
    pub fn send(path: &Path, req: &Request) -> Result<Client, ClientError> {
        let p = path.to_path_buf();
        let mut s = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(p.clone())
            }
            std::io::ErrorKind::PermissionDenied => ClientError::Denied(p.clone()),
            _ => ClientError::Io { path: p.clone(), source: e },
        })?;
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        s.write_all(&line).map_err(|source| ClientError::Io { path: p.clone(), source })?;
        Ok(Client { reader: BufReader::new(s), path: p })
    }

    /// The next answer line (`None` at the end of the stream).
    pub fn next_answer(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Ok(None);
        }
        match serde_json::from_str(&line) {
            Ok(Response::Error { message }) => Err(ClientError::Refused(message)),
            Ok(r) => Ok(Some(r)),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }
}

/// Sends one request and returns its single answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut c = Client::send(path, req)?;
    c.next_answer()?
        .ok_or_else(|| ClientError::Protocol("connection closed without an answer".into()))
}

/// What a worker gets for inspection: its request channel and the capture session.
pub struct WorkerOps {
    /// Requests from the inspect server and the metrics.
    pub requests: Receiver<WorkerRequest>,
    /// The capture session.
    pub capture: Arc<Capture>,
}

/// The kernel's statistics of a worker's sockets.
pub fn queue_info(ports: &[super::xsk::Port]) -> Vec<QueueInfo> {
    ports
        .iter()
        .map(|p| {
            let s = p.xdp_stats().unwrap_or_default();
            QueueInfo {
                iface: p.name.clone(),
                queue: p.queue,
                rx_dropped: s.rx_dropped(),
                rx_invalid_descs: s.rx_invalid_descs(),
                tx_invalid_descs: s.tx_invalid_descs(),
                rx_ring_full: s.rx_ring_full(),
                rx_fill_ring_empty: s.rx_fill_ring_empty_descs(),
                tx_ring_empty: s.tx_ring_empty_descs(),
            }
        })
        .collect()
}

/// Creates the request channel of one worker.
pub fn channel() -> (Sender<WorkerRequest>, Receiver<WorkerRequest>) {
    crossbeam::channel::bounded(16)
}
