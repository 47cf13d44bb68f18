//! Table publication from the control plane: the wire protocol, the Unix-socket [`Server`] the
//! dataplane runs, and the [`Applier`] that turns messages into live [`Tables`].
//!
//! Control and dataplane are separate processes. The dataplane listens on a local Unix
//! socket (mode 0600: root only); the control plane connects and the exchange is:
//!
//! 1. the dataplane sends [`ToControl::Hello`] with its `epoch` (random, new each time the
//!    dataplane process starts), the last control `generation` it applied in that epoch
//!    (0: none) and the [`IdMap`] of its live tables (which name each service and backend id
//!    stands for). A control plane that has not compiled anything yet adopts those ids, so a
//!    restarted control plane gives every unchanged service and backend the id it had: the
//!    dataplane's conntrack entries, which remember ids, keep working across the restart;
//! 2. if that (epoch, generation) is not what the control plane last had acknowledged, it
//!    sends a [`ToDataplane::Snapshot`] of every service port; otherwise it goes on with
//!    [`ToDataplane::Delta`]s (service-port upserts with their frontends, removals), each
//!    naming the generation it applies on top of (`base`) and the new one;
//! 3. the dataplane answers each message, once the resulting tables are live, with
//!    [`ToControl::Ack`] carrying the new generation, or [`ToControl::Error`] (the tables are
//!    then unchanged).
//!
//! Framing: a little-endian `u32` length, then a `postcard` body; frames over [`MAX_FRAME`]
//! are refused with [`FrameError::TooLarge`] before anything is allocated.
//!
//! Invariants:
//! - The live tables are only ever replaced whole (one `ArcSwap` store per applied message),
//!   so workers, which load the tables once per batch, never see a half-applied message, and a
//!   snapshot replaces the previous content in one step: the tables never go empty during a
//!   resync, and nothing is cleared when the control plane disconnects.
//! - Routes and the source-NAT address belong to the dataplane and survive every apply.
//! - A malformed or refused message gets an error reply and a counter; it never panics and
//!   never touches the live tables.
//! - Every frontend has exactly one owning service port; a message that would give one key
//!   to two ports is refused whole.

use core::net::Ipv4Addr;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyError, PolicyTables, PolicyUpdate};
use crate::tables::{
    Backend, BackendId, Frontend, FrontendKey, FrontendKind, Protocol, ServiceId, ServicePort,
    ServiceSpec, TableError, Tables,
};

/// Version of this protocol, sent in the hello (2: the hello carries the [`IdMap`]).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame accepted in either direction (64 MiB: roughly a million backends).
pub const MAX_FRAME: usize = 64 << 20;
/// How long a reply may block on a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A frontend of a service port on the wire (its protocol is the port's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendEntry {
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// How it is reached.
    pub kind: FrontendKind,
    /// Masquerade flows to remote backends.
    pub masquerade_remote: bool,
}

/// A whole service port on the wire: settings, every backend, every frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortUpdate {
    /// Settings (with the stable id).
    pub spec: ServiceSpec,
    /// Every backend, in any state.
    pub backends: Vec<Backend>,
    /// Every frontend leading to it.
    pub frontends: Vec<FrontendEntry>,
}

/// What the ids of a dataplane's live tables stand for: service ports by name, backends by
/// (address, port, protocol). Sorted by id, each id once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// (id, `namespace/name:port` as in [`ServiceSpec::name`]).
    pub services: Vec<(ServiceId, String)>,
    /// (id, address, port, protocol).
    pub backends: Vec<(BackendId, Ipv4Addr, u16, Protocol)>,
}

impl IdMap {
    /// The ids in use in `t`.
    pub fn of(t: &Tables) -> IdMap {
        let mut services = Vec::new();
        let mut backends = Vec::new();
        for p in t.services() {
            services.push((p.id(), p.spec().name.clone()));
            for b in p.backends() {
                backends.push((b.id, b.ip, b.port, p.spec().proto));
            }
        }
        services.sort_unstable();
        backends.sort_by_key(|b| b.0);
        backends.dedup_by_key(|b| b.0);
        IdMap { services, backends }
    }
}

/// Control plane -> dataplane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDataplane {
    /// Replace every service port and frontend.
    Snapshot {
        /// The generation this snapshot is.
        generation: u64,
        /// Every service port.
        ports: Vec<PortUpdate>,
    },
    /// Change some service ports.
    Delta {
        /// The generation this applies on top of.
        base: u64,
        /// The generation it produces.
        generation: u64,
        /// Service ports added or replaced (with all their frontends).
        upserts: Vec<PortUpdate>,
        /// Service ports removed (with all their frontends).
        removals: Vec<ServiceId>,
    },
    /// Replace the NetworkPolicy tables (service ports unchanged). Sequenced like a delta;
    /// a control plane sends one after every snapshot, so policy is never left stale.
    Policy {
        /// The generation this applies on top of.
        base: u64,
        /// The generation it produces.
        generation: u64,
        /// The whole policy state.
        policy: PolicyUpdate,
    },
}

/// Dataplane -> control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToControl {
    /// Sent once when a connection opens.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// Random per dataplane process.
        epoch: u64,
        /// Last control generation applied in this epoch (0: none).
        generation: u64,
        /// The ids of the live tables.
        ids: IdMap,
    },
    /// The message producing `generation` is live.
    Ack {
        /// The generation now live.
        generation: u64,
    },
    /// The message was refused; the tables are unchanged.
    Error {
        /// Why.
        reason: String,
    },
}

/// A framing failure.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// I/O failed (including a close in the middle of a frame).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The length prefix exceeds [`MAX_FRAME`]; the stream cannot be trusted any more.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message; the stream is still aligned on frames.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = postcard::to_allocvec(msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's body (bounded by [`MAX_FRAME`]).
pub fn read_frame_bytes<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads and decodes one frame.
pub fn read_frame<R: Read, T: serde::de::DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let body = read_frame_bytes(r)?;
    postcard::from_bytes(&body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Why a message was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// A delta's base is not the generation the dataplane has.
    #[error("delta base {base} does not match applied generation {have}")]
    OutOfSequence {
        /// The delta's base.
        base: u64,
        /// What is applied.
        have: u64,
    },
    /// The tables refused a service port.
    #[error("{0}")]
    Table(#[from] TableError),
    /// The policy tables refused an update.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// A service id appears twice in one message.
    #[error("service {0} appears twice in one message")]
    DuplicateService(ServiceId),
    /// Two service ports claim one frontend.
    #[error("frontend {ip}:{port} claimed by service {a} and service {b}")]
    FrontendConflict {
        /// Address.
        ip: Ipv4Addr,
        /// Port.
        port: u16,
        /// One claimant.
        a: ServiceId,
        /// The other.
        b: ServiceId,
    },
}

/// Counters of the sync server and applier.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Snapshots applied.
    pub snapshots: AtomicU64,
    /// Deltas applied.
    pub deltas: AtomicU64,
    /// Policy updates applied.
    pub policies: AtomicU64,
    /// Messages that did not decode (error reply sent).
    pub malformed: AtomicU64,
    /// Messages refused by the applier (error reply sent).
    pub refused: AtomicU64,
    /// Frames over the size limit (connection closed).
    pub too_large: AtomicU64,
    /// Control connections open now (inspect, metrics).
    pub active: AtomicU64,
    /// Time from a control message read to its tables live (inspect, metrics).
    pub apply_latency: crate::histogram::Histogram,
}

impl SyncStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    /// A counter's value.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Applies control messages to the live tables.
///
/// Keeps, next to the tables, which frontends each service port owns, so an upsert can drop
/// the frontends its port no longer has without scanning the whole frontend table.
pub struct Applier {
    live: Arc<ArcSwap<Tables>>,
    epoch: u64,
    generation: u64,
    owners: HashMap<FrontendKey, ServiceId>,
    by_service: HashMap<ServiceId, Vec<FrontendKey>>,
    stats: Arc<SyncStats>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("epoch", &self.epoch)
            .field("generation", &self.generation)
            .field("frontends", &self.owners.len())
            .finish()
    }
}

impl Applier {
    /// An applier publishing into `live`, with a fresh random epoch. Frontends already in the
    /// live tables are adopted.
    pub fn new(live: Arc<ArcSwap<Tables>>) -> Self {
        let mut a = Self {
            live,
            epoch: fresh_epoch(),
            generation: 0,
            owners: HashMap::new(),
            by_service: HashMap::new(),
            stats: Arc::new(SyncStats::default()),
        };
        for (k, f) in a.live.load().frontends() {
            a.owners.insert(k, f.service);
            a.by_service.entry(f.service).or_default().push(k);
        }
        a
    }
    /// The live tables.
    pub fn live(&self) -> &Arc<ArcSwap<Tables>> {
        &self.live
    }
    /// This process's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Last control generation applied (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Counters.
    pub fn stats(&self) -> &Arc<SyncStats> {
        &self.stats
    }
    /// The hello for a new connection.
    pub fn hello(&self) -> ToControl {
        ToControl::Hello {
            version: PROTOCOL_VERSION,
            epoch: self.epoch,
            generation: self.generation,
            ids: IdMap::of(&self.live.load()),
        }
    }

    /// Applies one message; on success the new tables are live and the new generation is
    /// returned. On error nothing changed.
    pub fn apply(&mut self, msg: ToDataplane) -> Result<u64, ApplyError> {
        let r = match msg {
            ToDataplane::Snapshot { generation, ports } => self.snapshot(generation, ports),
            ToDataplane::Delta { base, generation, upserts, removals } => {
                self.delta(base, generation, upserts, removals)
            }
            ToDataplane::Policy { base, generation, policy } => {
                self.policy(base, generation, policy)
            }
        };
        if r.is_err() {
            SyncStats::bump(&self.stats.refused);
        }
        r
    }

    /// Changes the dataplane's own parts of the tables (routes, source-NAT address) through
    /// the same publication path, so they and control updates never overwrite each other.
    pub fn update_local(
        &mut self,
        f: impl FnOnce(crate::tables::TablesBuilder) -> crate::tables::TablesBuilder,
    ) {
        let cur = self.live.load_full();
        self.live.store(Arc::new(f(cur.next()).build()));
    }

    fn snapshot(&mut self, generation: u64, ports: Vec<PortUpdate>) -> Result<u64, ApplyError> {
        let cur = self.live.load_full();
        let mut seen = HashSet::with_capacity(ports.len());
        let mut owners: HashMap<FrontendKey, ServiceId> = HashMap::new();
        for p in &ports {
            check_port(p)?;
            if !seen.insert(p.spec.id) {
                return Err(ApplyError::DuplicateService(p.spec.id));
            }
            for fe in &p.frontends {
                let key = FrontendKey::new(fe.ip, fe.port, p.spec.proto);
                if let Some(other) = owners.insert(key, p.spec.id) {
                    return Err(conflict(key, other, p.spec.id));
                }
            }
        }
        let mut b = Tables::builder(cur.generation() + 1)
            .routes(cur.routes().clone())
            .snat_ip(cur.snat_ip());
        b.set_policy(cur.policy_arc().clone());
        let mut by_service: HashMap<ServiceId, Vec<FrontendKey>> = HashMap::new();
        for p in ports {
            let id = p.spec.id;
            let keys: Vec<FrontendKey> =
                p.frontends.iter().map(|f| FrontendKey::new(f.ip, f.port, p.spec.proto)).collect();
            let fes: Vec<Frontend> = p
                .frontends
                .iter()
                .map(|f| Frontend {
                    service: id,
                    kind: f.kind,
                    masquerade_remote: f.masquerade_remote,
                })
                .collect();
            b.upsert_service(reuse_or_build(&cur, p.spec, p.backends))?;
            for (k, f) in keys.iter().zip(fes) {
                b.upsert_frontend(*k, f)?;
            }
            by_service.insert(id, keys);
        }
        self.live.store(Arc::new(b.build()));
        self.owners = owners;
        self.by_service = by_service;
        self.generation = generation;
        SyncStats::bump(&self.stats.snapshots);
        Ok(generation)
    }

    fn delta(
        &mut self,
        base: u64,
        generation: u64,
        upserts: Vec<PortUpdate>,
        removals: Vec<ServiceId>,
    ) -> Result<u64, ApplyError> {
        if base != self.generation {
            return Err(ApplyError::OutOfSequence { base, have: self.generation });
        }
        // Validate everything before touching anything.
        let mut touched: HashSet<ServiceId> = HashSet::new();
        for id in &removals {
            if !touched.insert(*id) {
                return Err(ApplyError::DuplicateService(*id));
            }
        }
        let mut claimed: HashMap<FrontendKey, ServiceId> = HashMap::new();
        for p in &upserts {
            check_port(p)?;
            if !touched.insert(p.spec.id) {
                return Err(ApplyError::DuplicateService(p.spec.id));
            }
        }
        for p in &upserts {
            for fe in &p.frontends {
                let key = FrontendKey::new(fe.ip, fe.port, p.spec.proto);
                if let Some(other) = claimed.insert(key, p.spec.id) {
                    return Err(conflict(key, other, p.spec.id));
                }
                // Owned by a port this message does not touch: a conflict. (A touched owner
                // either is removed or re-lists its frontends, so its claim is re-decided here.)
                if let Some(&o) = self.owners.get(&key) {
                    if o != p.spec.id && !touched.contains(&o) {
                        return Err(conflict(key, o, p.spec.id));
                    }
                }
            }
        }

        let cur = self.live.load_full();
        let mut b = cur.next();
        for id in &removals {
            let keys = self.by_service.remove(id).unwrap_or_default();
            b.remove_service(*id, &keys);
            for k in keys {
                if self.owners.get(&k) == Some(id) {
                    self.owners.remove(&k);
                }
            }
        }
        for p in upserts {
            let id = p.spec.id;
            let proto = p.spec.proto;
            let new: Vec<(FrontendKey, Frontend)> = p
                .frontends
                .iter()
                .map(|f| {
                    let fe = Frontend {
                        service: id,
                        kind: f.kind,
                        masquerade_remote: f.masquerade_remote,
                    };
                    (FrontendKey::new(f.ip, f.port, proto), fe)
                })
                .collect();
            // Cannot fail: check_port validated the ids.
            b.upsert_service(reuse_or_build(&cur, p.spec, p.backends))?;
            for k in self.by_service.remove(&id).unwrap_or_default() {
                if self.owners.get(&k) == Some(&id) && !new.iter().any(|(n, _)| *n == k) {
                    self.owners.remove(&k);
                    b.remove_frontend(&k);
                }
            }
            for (k, f) in &new {
                // Cannot fail: the service was just inserted with this protocol.
                b.upsert_frontend(*k, *f)?;
                self.owners.insert(*k, id);
            }
            self.by_service.insert(id, new.into_iter().map(|(k, _)| k).collect());
        }
        self.live.store(Arc::new(b.build()));
        self.generation = generation;
        SyncStats::bump(&self.stats.deltas);
        Ok(generation)
    }
}

impl Applier {
    fn policy(&mut self, base: u64, generation: u64, u: PolicyUpdate) -> Result<u64, ApplyError> {
        if base != self.generation {
            return Err(ApplyError::OutOfSequence { base, have: self.generation });
        }
        let p = PolicyTables::build(u)?;
        let cur = self.live.load_full();
        let mut b = cur.next();
        b.set_policy(Arc::new(p));
        self.live.store(Arc::new(b.build()));
        self.generation = generation;
        SyncStats::bump(&self.stats.policies);
        Ok(generation)
    }
}

fn conflict(key: FrontendKey, a: ServiceId, b: ServiceId) -> ApplyError {
    ApplyError::FrontendConflict { ip: Ipv4Addr::from(key.ip), port: key.port, a, b }
}

fn check_port(p: &PortUpdate) -> Result<(), ApplyError> {
    if p.spec.id == 0 {
        return Err(TableError::ZeroServiceId.into());
    }
    if p.backends.iter().any(|b| b.id == 0) {
        return Err(TableError::ZeroBackendId(p.spec.id).into());
    }
    Ok(())
}

/// The current port when it is identical (keeping its prepared scheduler), else a new one.
fn reuse_or_build(cur: &Tables, spec: ServiceSpec, mut backends: Vec<Backend>) -> Arc<ServicePort> {
    backends.sort_by_key(|b| b.id);
    if let Some(old) = cur.service_arc(spec.id) {
        if *old.spec() == spec && old.backends() == &backends[..] {
            return old.clone();
        }
    }
    Arc::new(ServicePort::new(spec, backends))
}

fn fresh_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// The sync server: accepts control-plane connections on a Unix socket, one thread each.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
    applier: Arc<Mutex<Applier>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

impl Server {
    /// Binds `path` (mode 0600; a missing parent directory is created with mode 0700; a stale
    /// socket left by a dead process is replaced, a live one is an `AddrInUse` error) and
    /// serves from a background thread.
    pub fn spawn(path: impl AsRef<Path>, applier: Arc<Mutex<Applier>>) -> io::Result<Server> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if !md.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, conns, applier) = (stop.clone(), conns.clone(), applier.clone());
            std::thread::Builder::new()
                .name("kxdp-sync".into())
                .spawn(move || accept_loop(listener, stop, conns, applier))?
        };
        Ok(Server { path, stop, conns, accept: Some(accept), applier })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared applier.
    pub fn applier(&self) -> &Arc<Mutex<Applier>> {
        &self.applier
    }

    /// Stops accepting, closes every connection and removes the socket. The live tables are
    /// left as they are.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_now();
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    applier: Arc<Mutex<Applier>>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "sync: accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Ok(c) = stream.try_clone() {
            let mut list = conns.lock();
            // Forget connections that have ended (their peer address is gone).
            list.retain(|s| s.peer_addr().is_ok() && s.take_error().ok().flatten().is_none());
            list.push(c);
        }
        let applier = applier.clone();
        let spawned = std::thread::Builder::new()
            .name("kxdp-sync-conn".into())
            .spawn(move || serve_conn(stream, &applier));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "sync: cannot start connection thread");
        }
    }
}

/// Serves one control-plane connection until it closes, then shuts the socket down (the
/// server keeps a clone of every connection for [`Server::shutdown`], so dropping ours would
/// not close it).
pub fn serve_conn(stream: UnixStream, applier: &Mutex<Applier>) {
    let mut stream = stream;
    let stats = applier.lock().stats().clone();
    stats.active.fetch_add(1, Ordering::Relaxed);
    tracing::info!("sync: control connected");
    serve(&mut stream, applier);
    stats.active.fetch_sub(1, Ordering::Relaxed);
    tracing::info!("sync: control disconnected");
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve(stream: &mut UnixStream, applier: &Mutex<Applier>) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (hello, stats) = {
        let a = applier.lock();
        (a.hello(), a.stats().clone())
    };
    SyncStats::bump(&stats.connections);
    if let Err(e) = write_frame(stream, &hello) {
        tracing::debug!(error = %e, "sync: hello not sent");
        return;
    }
    loop {
        let reply = match read_frame::<_, ToDataplane>(stream) {
            Ok(msg) => match (Instant::now(), applier.lock().apply(msg)) {
                (t0, Ok(generation)) => {
                    stats.apply_latency.observe(t0.elapsed());
                    tracing::info!(generation, "sync: tables live");
                    ToControl::Ack { generation }
                }
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "sync: message refused, tables unchanged");
                    ToControl::Error { reason: e.to_string() }
                }
            },
            Err(FrameError::Decode(e)) => {
                SyncStats::bump(&stats.malformed);
                tracing::warn!(error = %e, "sync: malformed message, tables unchanged");
                ToControl::Error { reason: format!("malformed message: {e}") }
            }
            Err(FrameError::TooLarge(n)) => {
                SyncStats::bump(&stats.too_large);
                tracing::warn!(len = n, "sync: oversized frame, closing connection");
                let _ = write_frame(
                    stream,
                    &ToControl::Error { reason: FrameError::TooLarge(n).to_string() },
                );
                return;
            }
            Err(FrameError::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "sync: connection ended");
                return;
            }
        };
        if let Err(e) = write_frame(stream, &reply) {
            tracing::debug!(error = %e, "sync: reply not sent, closing connection");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Algorithm;
    use crate::tables::{NextHop, Protocol, Routes};

    fn port(id: ServiceId, vip: [u8; 4], backends: &[(u32, u8)]) -> PortUpdate {
        PortUpdate {
            spec: ServiceSpec {
                id,
                name: format!("ns/svc{id}:http"),
                proto: Protocol::Tcp,
                algorithm: Algorithm::Random,
                affinity_timeout_s: None,
                maglev_size: 65_537,
            },
            backends: backends
                .iter()
                .map(|&(bid, last)| Backend::ready(bid, Ipv4Addr::new(10, 244, 0, last), 8080))
                .collect(),
            frontends: vec![FrontendEntry {
                ip: Ipv4Addr::from(vip),
                port: 80,
                kind: FrontendKind::ClusterIp,
                masquerade_remote: false,
            }],
        }
    }

    fn fk(vip: [u8; 4]) -> FrontendKey {
        FrontendKey::new(Ipv4Addr::from(vip), 80, Protocol::Tcp)
    }

    fn live_with_routes() -> Arc<ArcSwap<Tables>> {
        let mut routes = Routes::default();
        let hop = NextHop { ifindex: 7, src_mac: [2; 6], dst_mac: [4; 6] };
        routes.add_prefix(Ipv4Addr::new(10, 244, 0, 0), 16, hop);
        let t =
            Tables::builder(0).routes(routes).snat_ip(Some(Ipv4Addr::new(192, 168, 1, 10))).build();
        Arc::new(ArcSwap::from_pointee(t))
    }

    #[test]
    fn snapshot_then_delta_keeps_routes_and_reuses_unchanged_ports() {
        let live = live_with_routes();
        let mut a = Applier::new(live.clone());
        let snap = ToDataplane::Snapshot {
            generation: 5,
            ports: vec![
                port(1, [10, 96, 0, 1], &[(1, 1), (2, 2)]),
                port(2, [10, 96, 0, 2], &[(3, 3)]),
            ],
        };
        assert_eq!(a.apply(snap), Ok(5));
        let t1 = live.load_full();
        assert_eq!(t1.services().count(), 2);
        assert_eq!(t1.frontend(&fk([10, 96, 0, 1])).unwrap().service, 1);
        assert_eq!(t1.snat_ip(), Some(Ipv4Addr::new(192, 168, 1, 10)));
        assert!(t1.routes().lookup(u32::from(Ipv4Addr::new(10, 244, 3, 3))).is_some());

        // Port 1 moves to a new VIP and loses a backend; port 2 goes away.
        let mut p1 = port(1, [10, 96, 0, 9], &[(1, 1)]);
        p1.spec.name = "ns/svc1:http".into();
        let d = ToDataplane::Delta { base: 5, generation: 6, upserts: vec![p1], removals: vec![2] };
        assert_eq!(a.apply(d), Ok(6));
        let t2 = live.load_full();
        assert_eq!(t2.generation(), t1.generation() + 1);
        assert!(t2.frontend(&fk([10, 96, 0, 1])).is_none());
        assert!(t2.frontend(&fk([10, 96, 0, 2])).is_none());
        assert_eq!(t2.frontend(&fk([10, 96, 0, 9])).unwrap().service, 1);
        assert!(!t2.is_vip(u32::from(Ipv4Addr::new(10, 96, 0, 1))));
        assert_eq!(t2.service(1).unwrap().backends().len(), 1);
        assert!(t2.service(2).is_none());
        assert!(t2.routes().lookup(u32::from(Ipv4Addr::new(10, 244, 3, 3))).is_some());

        // A snapshot equal to the live state shares the service ports.
        let same = ToDataplane::Snapshot {
            generation: 7,
            ports: vec![port(1, [10, 96, 0, 9], &[(1, 1)])],
        };
        assert_eq!(a.apply(same), Ok(7));
        assert!(Arc::ptr_eq(t2.service_arc(1).unwrap(), live.load().service_arc(1).unwrap()));
    }

    #[test]
    fn refused_messages_leave_tables_unchanged() {
        let live = live_with_routes();
        let mut a = Applier::new(live.clone());
        a.apply(ToDataplane::Snapshot {
            generation: 1,
            ports: vec![port(1, [10, 96, 0, 1], &[(1, 1)])],
        })
        .unwrap();
        let before = live.load_full();
        let bad = [
            ToDataplane::Delta { base: 9, generation: 10, upserts: vec![], removals: vec![] },
            ToDataplane::Delta {
                base: 1,
                generation: 2,
                upserts: vec![port(0, [1, 1, 1, 1], &[])],
                removals: vec![],
            },
            ToDataplane::Delta {
                base: 1,
                generation: 2,
                upserts: vec![port(3, [1, 1, 1, 1], &[(0, 1)])],
                removals: vec![],
            },
            // Takes port 1's frontend while port 1 stays: conflict.
            ToDataplane::Delta {
                base: 1,
                generation: 2,
                upserts: vec![port(2, [10, 96, 0, 1], &[])],
                removals: vec![],
            },
            ToDataplane::Snapshot {
                generation: 3,
                ports: vec![port(1, [10, 96, 0, 1], &[]), port(2, [10, 96, 0, 1], &[])],
            },
            ToDataplane::Snapshot {
                generation: 3,
                ports: vec![port(1, [1, 1, 1, 1], &[]), port(1, [2, 2, 2, 2], &[])],
            },
        ];
        for m in bad {
            assert!(a.apply(m.clone()).is_err(), "{m:?}");
            assert!(Arc::ptr_eq(&before, &live.load_full()), "{m:?} changed the tables");
        }
        assert_eq!(SyncStats::get(&a.stats().refused), 6);
        assert_eq!(a.generation(), 1);
        // A frontend handed over between two ports in one delta is fine.
        let d = ToDataplane::Delta {
            base: 1,
            generation: 2,
            upserts: vec![port(1, [10, 96, 0, 7], &[]), port(2, [10, 96, 0, 1], &[])],
            removals: vec![],
        };
        assert_eq!(a.apply(d), Ok(2));
        assert_eq!(live.load().frontend(&fk([10, 96, 0, 1])).unwrap().service, 2);
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let msg = ToDataplane::Snapshot {
            generation: 1,
            ports: vec![port(1, [10, 96, 0, 1], &[(1, 1)])],
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        assert_eq!(read_frame::<_, ToDataplane>(&mut &buf[..]).unwrap(), msg);
        // Truncated body.
        assert!(matches!(
            read_frame::<_, ToDataplane>(&mut &buf[..buf.len() - 1]),
            Err(FrameError::Io(_))
        ));
        // Empty stream: closed.
        assert!(matches!(read_frame::<_, ToDataplane>(&mut &[][..]), Err(FrameError::Closed)));
        // Oversized length prefix: refused before allocating.
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame::<_, ToDataplane>(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        // Garbage body.
        let mut junk = 3u32.to_le_bytes().to_vec();
        junk.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(read_frame::<_, ToDataplane>(&mut &junk[..]), Err(FrameError::Decode(_))));
    }

    fn tmp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kxdp-sync-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("sub").join("control.sock")
    }

    #[test]
    fn server_socket_is_private_and_survives_malformed_frames() {
        let path = tmp_socket("server");
        let live = live_with_routes();
        let applier = Arc::new(Mutex::new(Applier::new(live.clone())));
        let server = Server::spawn(&path, applier.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(Server::spawn(&path, applier.clone()).is_err(), "a live socket is not replaced");

        let mut c = UnixStream::connect(&path).unwrap();
        let epoch = applier.lock().epoch();
        assert_eq!(
            read_frame::<_, ToControl>(&mut c).unwrap(),
            ToControl::Hello {
                version: PROTOCOL_VERSION,
                epoch,
                generation: 0,
                ids: IdMap::default()
            }
        );
        // A garbage body: error reply, connection still usable.
        c.write_all(&[2, 0, 0, 0, 0xff, 0xff]).unwrap();
        assert!(matches!(read_frame::<_, ToControl>(&mut c).unwrap(), ToControl::Error { .. }));
        let snap = ToDataplane::Snapshot {
            generation: 4,
            ports: vec![port(1, [10, 96, 0, 1], &[(1, 1)])],
        };
        write_frame(&mut c, &snap).unwrap();
        assert_eq!(read_frame::<_, ToControl>(&mut c).unwrap(), ToControl::Ack { generation: 4 });
        assert_eq!(live.load().services().count(), 1);
        // An oversized frame: error reply and close; tables untouched.
        c.write_all(&((MAX_FRAME as u32) + 1).to_le_bytes()).unwrap();
        assert!(matches!(read_frame::<_, ToControl>(&mut c).unwrap(), ToControl::Error { .. }));
        assert!(matches!(
            read_frame::<_, ToControl>(&mut c),
            Err(FrameError::Closed | FrameError::Io(_))
        ));
        assert_eq!(live.load().services().count(), 1);
        // A new connection's hello names what the live ids stand for.
        let mut c2 = UnixStream::connect(&path).unwrap();
        let ToControl::Hello { generation, ids, .. } = read_frame::<_, ToControl>(&mut c2).unwrap()
        else {
            panic!("no hello")
        };
        assert_eq!(generation, 4);
        assert_eq!(ids.services, vec![(1, "ns/svc1:http".to_string())]);
        assert_eq!(ids.backends, vec![(1, Ipv4Addr::new(10, 244, 0, 1), 8080, Protocol::Tcp)]);
        drop(c2);
        {
            let a = applier.lock();
            assert_eq!(SyncStats::get(&a.stats().malformed), 1);
            assert_eq!(SyncStats::get(&a.stats().too_large), 1);
        }
        server.shutdown();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
