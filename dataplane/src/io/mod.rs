//! The dataplane process: AF_XDP sockets, pinned workers, the XDP program, table publication.
//!
//! Start-up order matters and is: read the configuration; set channel counts where asked; open
//! every socket (a worker's sockets share its UMEM) and the punt device; start the control
//! socket server and load the kernel's next hops; start the workers and wait until each is
//! polling; only then load the XDP program on every interface, fill its socket map and
//! prefixes, and attach it (replacing a stale program a crashed run left, never a foreign one).
//! Stopping reverses it: detach XDP first, so the kernel gets the traffic back before the
//! sockets close, then stop and join the workers.
//!
//! Interfaces come and go at runtime ([`Dataplane::reconcile`], driven by the netlink watcher
//! in [`run_until`]): an interface that appears and is named in the configuration or matches
//! one of its patterns gets its sockets (each queue on the least-loaded worker, sharing that
//! worker's UMEM), sent to the workers over their command channels, then its XDP program; one
//! that disappears loses its program, then its sockets (the workers close them between rounds
//! and take their frames back). Other interfaces' sockets, programs and flows are untouched.

pub mod config;
pub mod inspect;
pub mod metrics;
pub mod plan;
pub mod punt;
pub mod worker;
pub mod xsk;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;

use crossbeam::channel::Sender;
use xsk_rs::Umem;

use self::config::{Mode, NodeConfig, Role, XdpMode};
use self::punt::Punt;
use self::worker::{Command, Handoff, Worker, WorkerStats};
use self::xsk::{Geometry, Opened, Pool, Port};
use crate::counters::Counters;
use crate::pipeline::{Shared, WorkerConfig, WorkerState};
use crate::sync::{Applier, Server};
use crate::tables::Tables;

/// Why the dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// An interface does not exist.
    #[error("interface {0} not found")]
    NoInterface(String),
    /// Socket set-up failed.
    #[error(transparent)]
    Xsk(#[from] xsk::XskError),
    /// Punt device set-up failed.
    #[error(transparent)]
    Punt(#[from] punt::PuntError),
    /// The XDP program failed to load or attach.
    #[error("XDP on {iface}: {source}")]
    Xdp {
        /// Interface.
        iface: String,
        /// Cause.
        source: xdp_redirect::Error,
    },
    /// The control socket could not be served.
    #[error("control socket {path}: {source}")]
    Control {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Discovering queues and IRQs failed.
    #[error("planning queues and IRQs: {0}")]
    Plan(String),
    /// The inspect socket or the metrics listener could not be opened.
    #[error("{what}: {source}")]
    Ops {
        /// Which (socket path or address).
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading the kernel's tables failed.
    #[error("reading next hops from the kernel: {0}")]
    Netlink(String),
}

/// Frames a capture session can hold in flight (2 KiB each, allocated at start).
const CAPTURE_FRAMES: usize = 4096;

/// Receive queues of an interface, from sysfs (at least 1).
pub fn rx_queues(iface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}

fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The worker cores of a configuration (default: every core).
pub fn worker_cores(cfg: &NodeConfig) -> Vec<usize> {
    if cfg.cores.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        cfg.cores.clone()
    }
}

/// An interface the configuration selects, by name or by pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Queues to bind (None: all).
    pub queues: Option<Vec<u32>>,
    /// Combined channels to set.
    pub channels: Option<u32>,
}

/// Whether the configuration selects interface `name`, and how.
pub fn select(cfg: &NodeConfig, name: &str) -> Option<Selected> {
    if name == "lo" || (!cfg.punt_device.is_empty() && name == cfg.punt_device) {
        return None;
    }
    if let Some(i) = cfg.interfaces.iter().find(|i| i.name == name) {
        return Some(Selected {
            name: name.into(),
            role: i.role,
            queues: i.queues.clone(),
            channels: i.channels,
        });
    }
    cfg.interface_patterns.iter().find(|p| p.matches(name)).map(|p| Selected {
        name: name.into(),
        role: p.role,
        queues: None,
        channels: p.channels,
    })
}

/// The interfaces selected now: every named one, then every existing one a pattern matches
/// (from `/sys/class/net`), sorted by name.
pub fn selected_now(cfg: &NodeConfig) -> Vec<Selected> {
    let mut out: Vec<Selected> =
        cfg.interfaces.iter().filter_map(|i| select(cfg, &i.name)).collect();
    if !cfg.interface_patterns.is_empty() {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            if !out.iter().any(|s| s.name == n) {
                out.extend(select(cfg, &n));
            }
        }
    }
    out
}

/// Sets `iface`'s channel count to `want` where the driver allows it, logging what happened.
fn apply_channels(iface: &str, want: u32) {
    match plan::set_channels(iface, want) {
        Ok(plan::ChannelChange::Unchanged) => {
            tracing::info!(iface, channels = want, "channel count already as configured")
        }
        Ok(plan::ChannelChange::Set { before }) => {
            tracing::info!(iface, from = before, to = want, "channel count set")
        }
        Err(reason) => {
            tracing::warn!(iface, wanted = want, %reason, "channel count not changed; using the current one")
        }
    }
}

fn restrict_queues(info: &mut plan::IfaceInfo, q: &Option<Vec<u32>>) {
    if let Some(q) = q {
        info.queues.retain(|x| q.contains(x));
        for x in q {
            if !info.queues.contains(x) {
                info.queues.push(*x);
            }
        }
        info.queues.sort_unstable();
    }
}

/// Pins the IRQs of an interface taken over at runtime to the cores of the workers its queues
/// were given (or to the housekeeping cores). Workers are all running when interfaces may
/// appear, so worker `w` is the plan's `w`-th core. Failures are logged, not fatal.
fn pin_irqs_of(cfg: &NodeConfig, sel: &Selected, assigned: &[(u32, usize)]) {
    let mut p = match make_plan_for(cfg, std::slice::from_ref(sel)) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(iface = %sel.name, error = %e, "IRQs of a new interface not pinned");
            return;
        }
    };
    plan::follow_workers(&mut p, assigned);
    if p.irqs.is_empty() {
        return;
    }
    match plan::apply(&p, std::path::Path::new("/")) {
        Ok(r) => tracing::info!(iface = %sel.name, "IRQ affinity: {r}"),
        Err(e) => tracing::warn!(iface = %sel.name, error = %e, "IRQ affinity not applied"),
    }
}

/// Discovers the selected interfaces' queues and IRQs and plans which worker core serves
/// each queue and where each IRQ goes (see [`plan`]).
pub fn make_plan(cfg: &NodeConfig) -> Result<plan::Plan, StartError> {
    make_plan_for(cfg, &selected_now(cfg))
}

fn make_plan_for(cfg: &NodeConfig, sel: &[Selected]) -> Result<plan::Plan, StartError> {
    let names: Vec<&str> = sel.iter().map(|i| i.name.as_str()).collect();
    let mut ifs = plan::discover_with(std::path::Path::new("/"), &names, &plan::Ethtool)
        .map_err(|e| StartError::Plan(e.to_string()))?;
    for (info, conf) in ifs.iter_mut().zip(sel) {
        restrict_queues(info, &conf.queues);
    }
    let hk = (!cfg.housekeeping_cores.is_empty()).then_some(cfg.housekeeping_cores.as_slice());
    Ok(plan::plan(&ifs, &worker_cores(cfg), hk))
}

/// A snapshot of the process's counters, as written to the stats file.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Seconds since start.
    pub uptime_s: f64,
    /// Live table generation.
    pub generation: u64,
    /// Control generation applied.
    pub control_generation: u64,
    /// Service ports in the live tables.
    pub services: usize,
    /// Pipeline counters summed over workers.
    pub totals: Counters,
    /// Drop counters by reason name (non-zero only).
    pub drops: HashMap<&'static str, u64>,
    /// Pass counters by reason name (non-zero only).
    pub passes: HashMap<&'static str, u64>,
    /// Per worker: (flows, evictions, punted, punt_failed, handed_off, tx_dropped, transmitted).
    pub workers: Vec<WorkerReport>,
    /// XDP program counters per interface.
    pub xdp: HashMap<String, XdpReport>,
    /// Managed interfaces.
    pub interfaces: Vec<InterfaceReport>,
    /// Sockets whose UMEM could not be shared because the kernel refused (each got its own).
    pub umem_share_refused: u64,
    /// Interfaces added and removed at runtime.
    pub interfaces_added: u64,
    /// Interfaces removed at runtime.
    pub interfaces_removed: u64,
}

/// One managed interface.
#[derive(Debug, Serialize)]
pub struct InterfaceReport {
    /// Name.
    pub name: String,
    /// Index.
    pub ifindex: u32,
    /// (queue, worker) of each socket.
    pub queues: Vec<(u32, usize)>,
}

/// One worker's figures.
#[derive(Debug, Serialize)]
pub struct WorkerReport {
    /// Worker index.
    pub id: usize,
    /// Frames received.
    pub rx: u64,
    /// Live flows.
    pub flows: u64,
    /// Conntrack evictions.
    pub evictions: u64,
    /// Frames punted to the kernel.
    pub punted: u64,
    /// Punts that failed.
    pub punt_failed: u64,
    /// Frames handed to another worker.
    pub handed_off: u64,
    /// Frames that could not be transmitted.
    pub tx_dropped: u64,
    /// Frames transmitted.
    pub transmitted: u64,
    /// Frames moved to another interface by passing the descriptor (shared UMEM).
    pub zero_copy: u64,
    /// Frames copied into another socket's UMEM.
    pub copied: u64,
    /// Per socket.
    pub ports: Vec<worker::PortStats>,
    /// Per UMEM pool: frame accounting.
    pub pools: Vec<worker::PoolStats>,
}

/// The XDP program's counters on one interface.
#[derive(Debug, Serialize)]
pub struct XdpReport {
    /// Frames steered to sockets.
    pub steered: u64,
    /// Frames passed to the kernel.
    pub passed: u64,
    /// Frames steered-but-no-socket.
    pub no_socket: u64,
}

/// An interface the dataplane manages now.
struct Managed {
    name: String,
    ifindex: u32,
    /// (queue, worker, socket fd) of each socket.
    queues: Vec<(u32, usize, i32)>,
    prog: Option<xdp_redirect::XdpRedirect>,
    attachment: Option<xdp_redirect::Attachment>,
}

/// A running dataplane.
pub struct Dataplane {
    cfg: NodeConfig,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Vec<Arc<WorkerStats>>,
    applier: Arc<Mutex<Applier>>,
    server: Option<Server>,
    live: Arc<ArcSwap<Tables>>,
    ifaces: Vec<Managed>,
    /// Per running worker: its command channel and its shared UMEM (when sharing).
    commands: Vec<Sender<Command>>,
    umems: Vec<Option<Umem>>,
    handoff: Arc<Handoff>,
    geo: Geometry,
    share_refused: u64,
    added: u64,
    removed: u64,
    started: Instant,
    // Ops (io::inspect, io::metrics): started after the workers, stopped before them.
    ops: Option<Arc<inspect::Context>>,
    inspect: Option<inspect::InspectServer>,
    metrics: Option<metrics::MetricsServer>,
}

impl Dataplane {
    /// Sets everything up and starts forwarding; see the module docs for the order.
    pub fn start(cfg: NodeConfig) -> Result<Dataplane, StartError> {
        let started = Instant::now();
        let sel = selected_now(&cfg);
        for i in &cfg.interfaces {
            if ifindex_of(&i.name).is_none() {
                return Err(StartError::NoInterface(i.name.clone()));
            }
        }
        for s in &sel {
            if let Some(n) = s.channels {
                apply_channels(&s.name, n);
            }
        }
        // Which worker core serves each (interface, queue), and where its IRQ goes.
        let the_plan = make_plan_for(&cfg, &sel)?;
        tracing::info!("queue plan:\n{the_plan}");
        if cfg.irq_affinity && !the_plan.irqs.is_empty() {
            match plan::apply(&the_plan, std::path::Path::new("/")) {
                Ok(r) => tracing::info!("IRQ affinity: {r}"),
                Err(e) => tracing::warn!(error = %e, "IRQ affinity not applied"),
            }
        }
        let cores = the_plan.workers.clone();
        let nworkers = cores.len().max(1);
        // A worker with no queue planned for it has nothing to poll: it is not started
        // (unless interfaces may appear later), and the running ones are numbered densely
        // (flow ownership is computed over them).
        let mut planned = vec![false; nworkers];
        for q in &the_plan.queues {
            planned[q.worker.min(nworkers - 1)] = true;
        }
        let dynamic = !cfg.interface_patterns.is_empty();
        let running: Vec<usize> = (0..nworkers).filter(|&w| dynamic || planned[w]).collect();
        let dense: HashMap<usize, usize> =
            running.iter().enumerate().map(|(id, &w)| (w, id)).collect();
        let busy = running.len();
        let geo = Geometry { frames: cfg.umem_frames, ring: cfg.ring_size };
        let mut pools: Vec<Option<Pool>> = Vec::new();
        let mut umems = Vec::new();
        let mut commands = Vec::new();
        let mut receivers = Vec::new();
        for &w in &running {
            // A worker's shared UMEM holds `umem_frames` per socket planned for it (at least
            // 8 sockets' worth when interfaces may appear at runtime).
            let planned_sockets = the_plan.queues.iter().filter(|q| q.worker == w).count();
            let sockets = if dynamic { planned_sockets.max(8) } else { planned_sockets.max(1) };
            let pool_geo = Geometry { frames: geo.frames.saturating_mul(sockets as u32), ..geo };
            let pool = if cfg.share_umem { Some(Pool::new(pool_geo, "worker")?) } else { None };
            umems.push(pool.as_ref().map(Pool::umem));
            pools.push(pool);
            let (tx, rx) = crossbeam::channel::unbounded();
            commands.push(tx);
            receivers.push(rx);
        }
        let punt = if cfg.punt_device.is_empty() {
            None
        } else {
            Some(Arc::new(Punt::open(&cfg.punt_device)?))
        };
        let handoff = Arc::new(Handoff::new(busy, 1024, 8192));
        let mut dp = Dataplane {
            cfg,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            stats: Vec::new(),
            applier: Arc::new(Mutex::new(Applier::new(Arc::new(ArcSwap::from_pointee(
                Tables::builder(0).build(),
            ))))),
            server: None,
            live: Arc::new(ArcSwap::from_pointee(Tables::builder(0).build())),
            ifaces: Vec::new(),
            commands,
            umems,
            handoff,
            geo,
            share_refused: 0,
            added: 0,
            removed: 0,
            started,
            ops: None,
            inspect: None,
            metrics: None,
        };
        // Sockets, each sent to its planned worker (which adopts it on its first round).
        for s in &sel {
            let ifindex =
                ifindex_of(&s.name).ok_or_else(|| StartError::NoInterface(s.name.clone()))?;
            let mut m = Managed {
                name: s.name.clone(),
                ifindex,
                queues: Vec::new(),
                prog: None,
                attachment: None,
            };
            for q in the_plan.queues.iter().filter(|q| q.iface == s.name) {
                let w = dense[&q.worker.min(nworkers - 1)];
                dp.open_socket(&mut m, q.queue, w, None)?;
            }
            dp.ifaces.push(m);
        }
        dp.publish_egress();
        // Tables: control socket and kernel next hops.
        dp.live =
            Arc::new(ArcSwap::from_pointee(Tables::builder(0).snat_ip(dp.cfg.snat_ip).build()));
        dp.applier = Arc::new(Mutex::new(Applier::new(dp.live.clone())));
        if let Some(dir) = dp.cfg.control_socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let server =
            Server::spawn(&dp.cfg.control_socket, dp.applier.clone()).map_err(|source| {
                StartError::Control { path: dp.cfg.control_socket.clone(), source }
            })?;
        dp.server = Some(server);
        tracing::info!(socket = %dp.cfg.control_socket.display(), "control socket listening");
        dp.refresh_routes().map_err(StartError::Netlink)?;

        // Workers.
        let shared = Shared::new(1 << 20, 1 << 16);
        let raw_map: HashMap<u32, u32> = dp
            .cfg
            .interfaces
            .iter()
            .filter_map(|i| {
                let to = i.raw_forward_to.as_ref()?;
                Some((ifindex_of(&i.name)?, ifindex_of(to)?))
            })
            .collect();
        let ready = Arc::new(std::sync::Barrier::new(busy + 1));
        let capture = Arc::new(crate::capture::Capture::new(CAPTURE_FRAMES));
        let mut requests = Vec::new();
        for (id, ((&w, rx), pool)) in running.iter().zip(receivers).zip(pools).enumerate() {
            let wcfg = WorkerConfig {
                worker_id: id as u16,
                workers: busy as u16,
                conntrack_capacity: dp.cfg.conntrack.capacity,
                timeouts: dp.cfg.conntrack.timeouts,
                ..WorkerConfig::default()
            };
            let st = Arc::new(WorkerStats::default());
            dp.stats.push(st.clone());
            let (req_tx, req_rx) = inspect::channel();
            requests.push(req_tx);
            let wk = Worker {
                id,
                core: Some(cores[w]),
                ports: Vec::new(),
                pools: vec![pool],
                commands: rx,
                state: WorkerState::new(&wcfg, &shared),
                live: dp.live.clone(),
                mode: dp.cfg.mode,
                raw_map: raw_map.clone(),
                punt: punt.clone(),
                handoff: dp.handoff.clone(),
                stats: st,
                stop: dp.stop.clone(),
                idle_polls_before_sleep: dp.cfg.idle_polls_before_sleep,
                local: Default::default(),
                ops: Some(inspect::WorkerOps { requests: req_rx, capture: capture.clone() }),
            };
            let ready = ready.clone();
            dp.threads.push(
                std::thread::Builder::new()
                    .name(format!("kxdp-worker-{id}"))
                    .spawn(move || {
                        ready.wait();
                        wk.run()
                    })
                    .expect("spawning a worker thread"),
            );
        }
        ready.wait();
        dp.ops = Some(Arc::new(inspect::Context {
            node: dp.cfg.node_name.clone(),
            started,
            live: dp.live.clone(),
            applier: dp.applier.clone(),
            stats: dp.stats.clone(),
            workers: requests,
            capture,
        }));
        if let Err(e) = dp.start_ops() {
            dp.shutdown();
            return Err(e);
        }

        // XDP last: one program instance (own socket map) per interface.
        for k in 0..dp.ifaces.len() {
            if let Err(e) = dp.attach_xdp(k) {
                dp.shutdown();
                return Err(e);
            }
        }
        Ok(dp)
    }

    /// Opens interface `m`'s socket on `queue` for worker `w` (sharing its UMEM when the
    /// configuration and the kernel allow) and sends it to the worker.
    fn open_socket(
        &mut self,
        m: &mut Managed,
        queue: u32,
        w: usize,
        adopted: Option<&Sender<()>>,
    ) -> Result<(), StartError> {
        let share = self.umems.get(w).and_then(|u| u.as_ref());
        let deadline = Instant::now() + Duration::from_secs(5);
        // Retry while the queue is busy: the kernel releases the sockets of a process that
        // just died asynchronously, so a restart after a crash can find it still bound.
        let opened = loop {
            match Port::open(&m.name, m.ifindex, queue, self.geo, share) {
                Err(e) if e.is_busy() && Instant::now() < deadline => {
                    tracing::warn!(iface = %m.name, queue, "queue busy (a previous run's socket?), retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => break r?,
            }
        };
        let (port, pool) = match opened {
            Opened::Shared(p) => (p, None),
            Opened::Own(p, pool, refused) => {
                if let Some(reason) = refused {
                    if self.share_refused == 0 {
                        tracing::warn!(iface = %m.name, queue, %reason, "the kernel refused to share the worker's UMEM; this socket gets its own and frames to it are copied (logged once, counted in umem_share_refused)");
                    }
                    self.share_refused += 1;
                }
                (p, Some(pool))
            }
        };
        tracing::info!(iface = %m.name, ifindex = m.ifindex, queue, worker = w, shared = port.shared, "AF_XDP socket open");
        let fd = port.fd();
        self.commands[w]
            .send(Command::Add {
                port: Box::new(port),
                pool: pool.map(Box::new),
                adopted: adopted.cloned(),
            })
            .map_err(|_| StartError::Plan("worker gone".into()))?;
        m.queues.push((queue, w, fd));
        Ok(())
    }

    /// Opens the inspect socket and the metrics listener.
    fn start_ops(&mut self) -> Result<(), StartError> {
        let Some(ctx) = self.ops.clone() else { return Ok(()) };
        let path = self.cfg.inspect_socket_path();
        let server = inspect::InspectServer::spawn(&path, ctx.clone())
            .map_err(|source| StartError::Ops { what: path.display().to_string(), source })?;
        tracing::info!(socket = %path.display(), "inspect socket listening");
        self.inspect = Some(server);
        if let Some(addr) = self.cfg.metrics_address {
            let m = metrics::MetricsServer::spawn(addr, metrics::registry(ctx))
                .map_err(|source| StartError::Ops { what: format!("metrics on {addr}"), source })?;
            self.metrics = Some(m);
        }
        Ok(())
    }

    /// The metrics listener's address, when serving.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    /// What the inspect socket and the metrics read.
    pub fn ops(&self) -> Option<&Arc<inspect::Context>> {
        self.ops.as_ref()
    }

    fn attach_xdp(&mut self, k: usize) -> Result<(), StartError> {
        use xdp_redirect::{AttachMode, Direction, XdpRedirect};
        let mode = match self.cfg.xdp_mode {
            XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        };
        let m = &mut self.ifaces[k];
        let xe = |source| StartError::Xdp { iface: m.name.clone(), source };
        let prog = XdpRedirect::load().map_err(xe)?;
        if self.cfg.mode == Mode::Raw {
            // Raw mode steers everything IPv4.
            prog.add_prefix(Direction::Dst, std::net::Ipv4Addr::UNSPECIFIED, 0).map_err(xe)?;
        } else {
            for c in &self.cfg.steer.destinations {
                prog.add_prefix(Direction::Dst, c.addr, c.len).map_err(xe)?;
            }
            for c in &self.cfg.steer.sources {
                prog.add_prefix(Direction::Src, c.addr, c.len).map_err(xe)?;
            }
        }
        for &(queue, _, fd) in &m.queues {
            prog.set_socket(queue, fd).map_err(xe)?;
        }
        let att = prog.attach(m.ifindex, mode).map_err(xe)?;
        tracing::info!(iface = %m.name, ifindex = m.ifindex, mode = ?mode, "XDP program attached");
        m.attachment = Some(att);
        m.prog = Some(prog);
        Ok(())
    }

    /// Tells the workers which worker transmits on each interface.
    fn publish_egress(&self) {
        let mut map = HashMap::new();
        for m in &self.ifaces {
            if let Some(&(_, w, _)) = m.queues.first() {
                map.insert(m.ifindex, w);
            }
        }
        self.handoff.egress.store(Arc::new(map));
    }

    /// Brings the managed interfaces in line with the kernel's links: adds every selected
    /// interface that appeared, removes every managed one that disappeared (or was renamed
    /// out of the selection). Returns (added, removed).
    pub fn reconcile(&mut self, view: &crate::netlink::KernelView) -> (usize, usize) {
        let gone: Vec<usize> = (0..self.ifaces.len())
            .rev()
            .filter(|&k| {
                let m = &self.ifaces[k];
                view.link(m.ifindex).is_none_or(|l| l.name != m.name)
            })
            .collect();
        let removed = gone.len();
        for k in gone {
            self.remove_iface(k);
        }
        let mut added = 0;
        for l in view.links.values() {
            if self.ifaces.iter().any(|m| m.ifindex == l.ifindex) {
                continue;
            }
            let Some(sel) = select(&self.cfg, &l.name) else { continue };
            match self.add_iface(&sel, l.ifindex) {
                Ok(()) => added += 1,
                Err(e) => tracing::warn!(iface = %l.name, error = %e, "interface not taken over"),
            }
        }
        if added + removed > 0 {
            self.publish_egress();
            if let Err(e) = self.refresh_routes() {
                tracing::warn!(error = %e, "refreshing next hops");
            }
        }
        (added, removed)
    }

    /// Takes over an interface that appeared: channels, sockets on the least-loaded workers,
    /// XDP program.
    fn add_iface(&mut self, sel: &Selected, ifindex: u32) -> Result<(), StartError> {
        if let Some(n) = sel.channels {
            apply_channels(&sel.name, n);
        }
        let mut info = plan::IfaceInfo::new(&sel.name, ifindex, rx_queues(&sel.name));
        restrict_queues(&mut info, &sel.queues);
        let mut load = vec![0usize; self.commands.len()];
        for m in &self.ifaces {
            for &(_, w, _) in &m.queues {
                load[w] += 1;
            }
        }
        let mut m = Managed {
            name: sel.name.clone(),
            ifindex,
            queues: Vec::new(),
            prog: None,
            attachment: None,
        };
        let (adopted, acks) = crossbeam::channel::unbounded();
        for &q in &info.queues {
            let w = (0..load.len()).min_by_key(|&w| (load[w], w)).unwrap_or(0);
            if let Err(e) = self.open_socket(&mut m, q, w, Some(&adopted)) {
                self.ifaces.push(m);
                let k = self.ifaces.len() - 1;
                self.remove_iface(k);
                return Err(e);
            }
            load[w] += 1;
        }
        // Steer traffic to the sockets only once their workers have stocked their fill rings
        // (bounded: a worker is at most one round away).
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..m.queues.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if acks.recv_timeout(left).is_err() {
                tracing::warn!(iface = %m.name, "a worker did not take its socket within 1 s");
                break;
            }
        }
        self.ifaces.push(m);
        let k = self.ifaces.len() - 1;
        if let Err(e) = self.attach_xdp(k) {
            self.remove_iface(k);
            return Err(e);
        }
        self.added += 1;
        if self.cfg.irq_affinity {
            let assigned: Vec<(u32, usize)> =
                self.ifaces[k].queues.iter().map(|q| (q.0, q.1)).collect();
            pin_irqs_of(&self.cfg, sel, &assigned);
        }
        tracing::info!(iface = %sel.name, ifindex, queues = ?self.ifaces[k].queues.iter().map(|q| (q.0, q.1)).collect::<Vec<_>>(), "interface added");
        Ok(())
    }

    /// Lets go of an interface: its XDP program first (when it still exists), then its
    /// sockets (closed by their workers, frames returned).
    fn remove_iface(&mut self, k: usize) {
        let m = self.ifaces.remove(k);
        if let Some(a) = m.attachment {
            if let Err(e) = a.detach() {
                tracing::debug!(iface = %m.name, error = %e, "detaching XDP from a vanished interface");
            }
        }
        drop(m.prog);
        let mut told = Vec::new();
        for &(_, w, _) in &m.queues {
            if !told.contains(&w) {
                let _ = self.commands[w].send(Command::Remove { ifindex: m.ifindex });
                told.push(w);
            }
        }
        self.removed += 1;
        tracing::info!(iface = %m.name, ifindex = m.ifindex, "interface removed");
    }

    /// Re-reads the kernel's next hops into the live tables.
    pub fn refresh_routes(&self) -> Result<(), String> {
        refresh_routes(&self.applier, &self.managed())
    }

    /// The live tables.
    pub fn live(&self) -> &Arc<ArcSwap<Tables>> {
        &self.live
    }

    /// Interfaces managed, by ifindex.
    pub fn managed(&self) -> Vec<u32> {
        self.ifaces.iter().map(|m| m.ifindex).collect()
    }

    /// A report of every counter.
    pub fn report(&self) -> Report {
        let mut totals = Counters::default();
        let mut workers = Vec::new();
        for (id, s) in self.stats.iter().enumerate() {
            let c = s.counters.lock().clone();
            totals.merge(&c);
            workers.push(WorkerReport {
                id,
                rx: c.rx,
                flows: s.flows.load(Ordering::Relaxed),
                evictions: s.evictions.load(Ordering::Relaxed),
                punted: s.punted.load(Ordering::Relaxed),
                punt_failed: s.punt_failed.load(Ordering::Relaxed),
                handed_off: s.handed_off.load(Ordering::Relaxed),
                tx_dropped: s.tx_dropped.load(Ordering::Relaxed),
                transmitted: s.transmitted.load(Ordering::Relaxed),
                zero_copy: s.zero_copy.load(Ordering::Relaxed),
                copied: s.copied.load(Ordering::Relaxed),
                ports: s.ports.lock().clone(),
                pools: s.pools.lock().clone(),
            });
        }
        let drops = crate::DropReason::ALL
            .iter()
            .filter(|r| totals.drops(**r) > 0)
            .map(|r| (r.as_str(), totals.drops(*r)))
            .collect();
        let passes = crate::PassReason::ALL
            .iter()
            .filter(|r| totals.passes(**r) > 0)
            .map(|r| (r.as_str(), totals.passes(*r)))
            .collect();
        let xdp = self
            .ifaces
            .iter()
            .filter_map(|m| {
                let c = m.prog.as_ref()?.counters().ok()?;
                Some((
                    m.name.clone(),
                    XdpReport {
                        steered: c.steered,
                        passed: c.passed(),
                        no_socket: c.passed_no_socket,
                    },
                ))
            })
            .collect();
        let interfaces = self
            .ifaces
            .iter()
            .map(|m| InterfaceReport {
                name: m.name.clone(),
                ifindex: m.ifindex,
                queues: m.queues.iter().map(|q| (q.0, q.1)).collect(),
            })
            .collect();
        let t = self.live.load();
        Report {
            uptime_s: self.started.elapsed().as_secs_f64(),
            generation: t.generation(),
            control_generation: self.applier.lock().generation(),
            services: t.services().count(),
            totals,
            drops,
            passes,
            workers,
            xdp,
            interfaces,
            umem_share_refused: self.share_refused,
            interfaces_added: self.added,
            interfaces_removed: self.removed,
        }
    }

    /// Detaches XDP, stops the workers and closes everything. Idempotent.
    pub fn shutdown(&mut self) {
        for m in self.ifaces.iter_mut() {
            if let Some(a) = m.attachment.take() {
                let name = a.ifname().to_string();
                if let Err(e) = a.detach() {
                    tracing::warn!(iface = %name, error = %e, "detaching XDP");
                } else {
                    tracing::info!(iface = %name, "XDP program detached");
                }
            }
            m.prog = None;
        }
        // Ops servers ask the workers: stop them while the workers still answer.
        if let Some(mut m) = self.metrics.take() {
            m.shutdown();
        }
        if let Some(mut i) = self.inspect.take() {
            i.shutdown();
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn refresh_routes(applier: &Mutex<Applier>, managed: &[u32]) -> Result<(), String> {
    let view = crate::netlink::dump().map_err(|e| e.to_string())?;
    let routes = view.routes(managed);
    applier.lock().update_local(|b| b.routes(routes));
    Ok(())
}

/// Runs the main loop until `stop` is set: when the kernel's links, addresses, neighbours or
/// routes change, takes over interfaces that appeared, lets go of those that vanished and
/// re-reads next hops; writes the stats file every `stats_every`.
pub fn run_until(
    dp: &mut Dataplane,
    stop: &AtomicBool,
    stats_file: Option<&std::path::Path>,
    stats_every: Duration,
) -> Result<(), String> {
    let mut watcher = crate::netlink::Watcher::new().map_err(|e| e.to_string())?;
    let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
    let fd = watcher.as_raw_fd();
    poll.registry()
        .register(&mut mio::unix::SourceFd(&fd), mio::Token(0), mio::Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let mut events = mio::Events::with_capacity(16);
    let mut last_stats = Instant::now() - stats_every;
    // Interfaces that appeared between start-up and the watcher's subscription.
    let mut dirty = true;
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        if !events.is_empty() {
            dirty |= !matches!(watcher.drain(), Ok(false));
        }
        if dirty {
            dirty = false;
            match crate::netlink::dump() {
                Ok(view) => {
                    let (added, removed) = dp.reconcile(&view);
                    if added + removed == 0 {
                        dp.applier.lock().update_local(|b| b.routes(view.routes(&dp.managed())));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the kernel's tables"),
            }
        }
        if let Some(path) = stats_file {
            if last_stats.elapsed() >= stats_every {
                last_stats = Instant::now();
                write_report(dp, path);
            }
        }
    }
    if let Some(path) = stats_file {
        write_report(dp, path);
    }
    Ok(())
}

fn write_report(dp: &Dataplane, path: &std::path::Path) {
    let r = dp.report();
    let tmp = path.with_extension("tmp");
    if let Ok(s) = serde_json::to_string_pretty(&r) {
        if std::fs::write(&tmp, s).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}
