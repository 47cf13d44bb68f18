//! The dataplane process: AF_XDP sockets, pinned workers, the XDP program, table publication.
//!
//! Start-up order matters and is: read the configuration; open every socket and the punt
//! device; start the control socket server and load the kernel's next hops; start the workers
//! and wait until each is polling; only then load the XDP program on every interface, fill its
//! socket map and prefixes, and attach it (replacing a stale program a crashed run left, never
//! a foreign one). Stopping reverses it: detach XDP first, so the kernel gets the traffic back
//! before the sockets close, then stop and join the workers.

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

use self::config::{Mode, NodeConfig, XdpMode};
use self::punt::Punt;
use self::worker::{Handoff, Worker, WorkerStats};
use self::xsk::Port;
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

/// Opens a socket, retrying for a few seconds while the queue is busy: the kernel releases the
/// sockets of a process that just died asynchronously, so a restart after a crash can find the
/// queue still bound for a moment.
fn open_port(iface: &str, ifindex: u32, queue: u32, frames: u32) -> Result<Port, xsk::XskError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Port::open(iface, ifindex, queue, frames) {
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                tracing::warn!(iface, queue, "queue busy (a previous run's socket?), retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
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

/// Discovers the configured interfaces' queues and IRQs and plans which worker core serves
/// each queue and where each IRQ goes (see [`plan`]).
pub fn make_plan(cfg: &NodeConfig) -> Result<plan::Plan, StartError> {
    let names: Vec<&str> = cfg.interfaces.iter().map(|i| i.name.as_str()).collect();
    let mut ifs = plan::discover_with(std::path::Path::new("/"), &names, &plan::Ethtool)
        .map_err(|e| StartError::Plan(e.to_string()))?;
    for (info, conf) in ifs.iter_mut().zip(&cfg.interfaces) {
        if let Some(q) = &conf.queues {
            info.queues.retain(|x| q.contains(x));
            for x in q {
                if !info.queues.contains(x) {
                    info.queues.push(*x);
                }
            }
            info.queues.sort_unstable();
        }
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

/// A running dataplane.
pub struct Dataplane {
    cfg: NodeConfig,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Vec<Arc<WorkerStats>>,
    applier: Arc<Mutex<Applier>>,
    server: Option<Server>,
    live: Arc<ArcSwap<Tables>>,
    progs: Vec<(String, xdp_redirect::XdpRedirect)>,
    attachments: Vec<xdp_redirect::Attachment>,
    managed: Vec<u32>,
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
        // Which worker core serves each (interface, queue), and where its IRQ goes.
        let the_plan = make_plan(&cfg)?;
        tracing::info!("queue plan:\n{the_plan}");
        if cfg.irq_affinity && !the_plan.irqs.is_empty() {
            match plan::apply(&the_plan, std::path::Path::new("/")) {
                Ok(r) => tracing::info!("IRQ affinity: {r}"),
                Err(e) => tracing::warn!(error = %e, "IRQ affinity not applied"),
            }
        }
        let cores = the_plan.workers.clone();
        let nworkers = cores.len().max(1);
        // Sockets, each handed to its planned worker.
        let mut per_worker: Vec<Vec<Port>> = (0..nworkers).map(|_| Vec::new()).collect();
        let mut fds: Vec<(String, u32, u32, i32)> = Vec::new();
        let mut managed = Vec::new();
        for i in &cfg.interfaces {
            let ifindex =
                ifindex_of(&i.name).ok_or_else(|| StartError::NoInterface(i.name.clone()))?;
            managed.push(ifindex);
        }
        for q in &the_plan.queues {
            let p = open_port(&q.iface, q.ifindex, q.queue, cfg.umem_frames)?;
            tracing::info!(iface = %q.iface, ifindex = q.ifindex, queue = q.queue, worker = q.worker, core = q.core, "AF_XDP socket open");
            fds.push((p.name.clone(), p.ifindex, p.queue, p.fd()));
            per_worker[q.worker.min(nworkers - 1)].push(p);
        }
        let punt = if cfg.punt_device.is_empty() {
            None
        } else {
            Some(Arc::new(Punt::open(&cfg.punt_device)?))
        };
        // Tables: control socket and kernel next hops.
        let live = Arc::new(ArcSwap::from_pointee(Tables::builder(0).snat_ip(cfg.snat_ip).build()));
        let applier = Arc::new(Mutex::new(Applier::new(live.clone())));
        if let Some(dir) = cfg.control_socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let server = Server::spawn(&cfg.control_socket, applier.clone())
            .map_err(|source| StartError::Control { path: cfg.control_socket.clone(), source })?;
        tracing::info!(socket = %cfg.control_socket.display(), "control socket listening");
        refresh_routes(&applier, &managed).map_err(StartError::Netlink)?;

        // Workers.
        let shared = Shared::new(1 << 20, 1 << 16);
        let handoff = Arc::new(Handoff::new(&managed, nworkers, 1024, 8192));
        let raw_map: HashMap<u32, u32> = cfg
            .interfaces
            .iter()
            .filter_map(|i| {
                let to = i.raw_forward_to.as_ref()?;
                Some((ifindex_of(&i.name)?, ifindex_of(to)?))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        // A worker with no queue planned for it has nothing to poll: it is not started, and
        // the running ones are numbered densely (flow ownership is computed over them).
        let running: Vec<(usize, Vec<Port>)> = per_worker
            .into_iter()
            .enumerate()
            .filter(|(_, p)| !p.is_empty())
            .map(|(i, p)| (cores[i], p))
            .collect();
        let busy = running.len();
        let ready = Arc::new(std::sync::Barrier::new(busy + 1));
        let mut threads = Vec::new();
        let mut stats = Vec::new();
        let capture = Arc::new(crate::capture::Capture::new(CAPTURE_FRAMES));
        let mut requests = Vec::new();
        for (id, (core, ports)) in running.into_iter().enumerate() {
            let wcfg = WorkerConfig {
                worker_id: id as u16,
                workers: busy as u16,
                conntrack_capacity: cfg.conntrack.capacity,
                timeouts: cfg.conntrack.timeouts,
                ..WorkerConfig::default()
            };
            let st = Arc::new(WorkerStats::default());
            stats.push(st.clone());
            let (req_tx, req_rx) = inspect::channel();
            requests.push(req_tx);
            let w = Worker {
                id,
                core: Some(core),
                ports,
                state: WorkerState::new(&wcfg, &shared),
                live: live.clone(),
                mode: cfg.mode,
                raw_map: raw_map.clone(),
                punt: punt.clone(),
                handoff: handoff.clone(),
                stats: st,
                stop: stop.clone(),
                idle_polls_before_sleep: cfg.idle_polls_before_sleep,
                local: Default::default(),
                ops: Some(inspect::WorkerOps { requests: req_rx, capture: capture.clone() }),
            };
            let ready = ready.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("kxdp-worker-{id}"))
                    .spawn(move || {
                        ready.wait();
                        w.run()
                    })
                    .expect("spawning a worker thread"),
            );
        }
        ready.wait();
        let ops = Arc::new(inspect::Context {
            node: cfg.node_name.clone(),
            started,
            live: live.clone(),
            applier: applier.clone(),
            stats: stats.clone(),
            workers: requests,
            conns: shared.conns.clone(),
            capture,
        });

        let mut dp = Dataplane {
            cfg,
            stop,
            threads,
            stats,
            applier,
            server: Some(server),
            live,
            progs: Vec::new(),
            attachments: Vec::new(),
            managed,
            started,
            ops: Some(ops),
            inspect: None,
            metrics: None,
        };
        if let Err(e) = dp.start_ops() {
            dp.shutdown();
            return Err(e);
        }
        // XDP last: one program instance (own socket map) per interface.
        if let Err(e) = dp.attach_xdp(&fds) {
            dp.shutdown();
            return Err(e);
        }
        Ok(dp)
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

    fn attach_xdp(&mut self, fds: &[(String, u32, u32, i32)]) -> Result<(), StartError> {
        use xdp_redirect::{AttachMode, Direction, XdpRedirect};
        let mode = match self.cfg.xdp_mode {
            XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        };
        for i in &self.cfg.interfaces.clone() {
            let xe = |source| StartError::Xdp { iface: i.name.clone(), source };
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
            for (name, _, queue, fd) in fds.iter().filter(|f| f.0 == i.name) {
                prog.set_socket(*queue, *fd)
                    .map_err(|source| StartError::Xdp { iface: name.clone(), source })?;
            }
            let ifindex =
                ifindex_of(&i.name).ok_or_else(|| StartError::NoInterface(i.name.clone()))?;
            let att = prog.attach(ifindex, mode).map_err(xe)?;
            tracing::info!(iface = %i.name, ifindex, mode = ?mode, "XDP program attached");
            self.attachments.push(att);
            self.progs.push((i.name.clone(), prog));
        }
        Ok(())
    }

    /// Re-reads the kernel's next hops into the live tables.
    pub fn refresh_routes(&self) -> Result<(), String> {
        refresh_routes(&self.applier, &self.managed)
    }

    /// The live tables.
    pub fn live(&self) -> &Arc<ArcSwap<Tables>> {
        &self.live
    }

    /// Interfaces managed, by ifindex.
    pub fn managed(&self) -> &[u32] {
        &self.managed
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
            .progs
            .iter()
            .filter_map(|(n, p)| {
                let c = p.counters().ok()?;
                Some((
                    n.clone(),
                    XdpReport {
                        steered: c.steered,
                        passed: c.passed(),
                        no_socket: c.passed_no_socket,
                    },
                ))
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
        }
    }

    /// Detaches XDP, stops the workers and closes everything. Idempotent.
    pub fn shutdown(&mut self) {
        for a in self.attachments.drain(..) {
            let name = a.ifname().to_string();
            if let Err(e) = a.detach() {
                tracing::warn!(iface = %name, error = %e, "detaching XDP");
            } else {
                tracing::info!(iface = %name, "XDP program detached");
            }
        }
        self.progs.clear();
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

/// Runs the main loop until `stop` is set: re-reads next hops when the kernel's tables change
/// and writes the stats file every `stats_every`.
pub fn run_until(
    dp: &Dataplane,
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
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        if !events.is_empty() {
            match watcher.drain() {
                Ok(true) | Err(_) => {
                    if let Err(e) = dp.refresh_routes() {
                        tracing::warn!(error = %e, "refreshing next hops");
                    }
                }
                Ok(false) => {}
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
