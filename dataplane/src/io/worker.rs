//! A worker: one thread pinned to one core, busy-polling the AF_XDP sockets it owns.
//!
//! The loop, per round: take any port added or removed since the last round from the
//! worker's command channel; load the tables once; for each socket reap completions, refill
//! the fill ring, receive a batch of up to [`BATCH`] frames, run [`process_batch`] on them in
//! place in UMEM, and act on the verdicts (transmit by passing the descriptor when the egress
//! socket shares the ingress socket's UMEM, copy into the egress socket's pool when it does
//! not, hand to another worker, punt to the kernel, or recycle); then flush every socket's tx
//! ring (kicking the kernel only when it asks, `need_wakeup`), drain this worker's inbox of
//! frames to transmit, and sweep a little conntrack.
//!
//! Ports come and go at runtime (an interface created or deleted): the dataplane opens a new
//! interface's sockets on its own thread (sharing the worker's UMEM) and sends them here; a
//! removed interface's sockets are closed here, between rounds, and every frame they held
//! goes back to the pool. Other ports keep running throughout.
//!
//! Nothing is allocated in the loop: descriptor arrays are fixed-size, the hand-off buffers
//! come from a pool filled at start. When nothing arrives for a while the worker waits in
//! poll(2) for up to a millisecond instead of spinning, so an idle node does not burn its cores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam::channel::Receiver;
use crossbeam::queue::ArrayQueue;
use parking_lot::Mutex;
use serde::Serialize;
use xsk_rs::FrameDesc;

use super::config::Mode;
use super::inspect::{self, WorkerOps};
use super::punt::Punt;
use super::xsk::{Pool, Port};
use crate::capture;
use crate::counters::{Counters, PassReason};
use crate::pipeline::{process_batch, Frame, Verdict, WorkerState};
use crate::tables::Tables;

/// Frames per batch (a power of two, as the ring sizes are).
pub const BATCH: usize = 64;
const _: () = assert!(BATCH.is_power_of_two());
/// Conntrack slab entries swept per round.
const GC_BUDGET: usize = 64;

/// A frame handed from one worker to another.
pub struct Handed {
    len: usize,
    ifindex: u32,
    data: Box<[u8; 2048]>,
}

impl Handed {
    /// The frame as the pipeline sees it (its buffer is the whole hand-off buffer).
    pub fn frame(&mut self) -> Frame<'_> {
        Frame { buf: &mut self.data[..], len: self.len, ifindex: self.ifindex }
    }
}

/// Cross-worker queues and the pool of hand-off buffers.
///
/// Two kinds of hand-off: a frame to *transmit* goes to the transmit inbox of the worker
/// owning a socket on its egress interface (the `egress` map, republished when interfaces come
/// and go); a frame to *process* goes to the inbox of the worker that owns its flow
/// ([`crate::pipeline::owner_of`]), which runs the pipeline on it.
pub struct Handoff {
    transmit: Vec<ArrayQueue<Handed>>,
    process: Vec<ArrayQueue<Handed>>,
    pool: ArrayQueue<Box<[u8; 2048]>>,
    /// Egress interface -> the worker that transmits on it.
    pub egress: ArcSwap<HashMap<u32, usize>>,
}

impl Handoff {
    /// Inboxes for `workers`, each holding up to `depth` frames, and a pool of `buffers`.
    pub fn new(workers: usize, depth: usize, buffers: usize) -> Self {
        let pool = ArrayQueue::new(buffers.max(1));
        for _ in 0..buffers {
            let _ = pool.push(Box::new([0u8; 2048]));
        }
        let queues = || (0..workers).map(|_| ArrayQueue::new(depth.max(1))).collect();
        Self {
            transmit: queues(),
            process: queues(),
            pool,
            egress: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// Hands a frame received on `ifindex` to `worker` to process (copied into a pooled
    /// buffer); false when the pool or that worker's inbox is full, or there is no such worker.
    pub fn hand_to(&self, worker: usize, data: &[u8], ifindex: u32) -> bool {
        self.process.get(worker).is_some_and(|q| self.push(q, data, ifindex))
    }

    /// The next frame handed to `worker` to process.
    pub fn take_for(&self, worker: usize) -> Option<Handed> {
        self.process.get(worker)?.pop()
    }

    /// Returns a hand-off buffer to the pool.
    pub fn give_back(&self, h: Handed) {
        let _ = self.pool.push(h.data);
    }

    /// Copies `data` into a pooled buffer and queues it; false when the pool or queue is full.
    fn push(&self, q: &ArrayQueue<Handed>, data: &[u8], ifindex: u32) -> bool {
        let Some(mut buf) = self.pool.pop() else { return false };
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        match q.push(Handed { len: n, ifindex, data: buf }) {
            Ok(()) => true,
            Err(h) => {
                let _ = self.pool.push(h.data);
                false
            }
        }
    }
}

/// What the dataplane tells a worker between rounds.
pub enum Command {
    /// Poll this socket from now on.
    Add {
        /// The socket.
        port: Box<Port>,
        /// Its own pool, when it does not share the worker's UMEM.
        pool: Option<Box<Pool>>,
        /// Told once the socket's fill ring is stocked (so its XDP program may be attached).
        adopted: Option<crossbeam::channel::Sender<()>>,
    },
    /// Close every socket on this interface (it is gone) and take its frames back.
    Remove {
        /// The interface.
        ifindex: u32,
    },
}

/// One socket's figures, as published.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PortStats {
    /// Interface.
    pub iface: String,
    /// Interface index.
    pub ifindex: u32,
    /// Queue.
    pub queue: u32,
    /// Whether it shares the worker's UMEM (false: its own, frames to it are copied).
    pub shared_umem: bool,
    /// Frames received.
    pub rx: u64,
    /// Frames handed to the tx ring.
    pub tx: u64,
    /// Frames dropped on a full tx ring.
    pub tx_ring_full: u64,
    /// Copies that found no free frame.
    pub no_free_frame: u64,
    /// Frames in its kernel rings.
    pub in_kernel: usize,
    /// The kernel's counters for the socket (`XDP_STATISTICS`): frames dropped for want of
    /// a fill frame, for a full rx ring, or otherwise.
    pub rx_fill_ring_empty: u64,
    /// Frames the kernel could not put in the full rx ring.
    pub rx_ring_full: u64,
    /// Frames the kernel dropped for other reasons (too big, ...).
    pub rx_dropped: u64,
}

/// One UMEM pool's accounting, as published.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolStats {
    /// Frames in the pool.
    pub frames: usize,
    /// Sockets drawing from it.
    pub sockets: usize,
    /// Frames free (counted from the owner table).
    pub free: usize,
    /// Frames in the worker's hands (0 between rounds).
    pub held: usize,
    /// Frames in the sockets' kernel rings.
    pub in_kernel: usize,
    /// Whether the owner table, the free stack and the sockets' counts agree, and every
    /// frame is in exactly one place.
    pub consistent: bool,
    /// Transitions that found a frame in the wrong place (a leak or double use avoided).
    pub anomalies: u64,
}

/// Counters a worker publishes for others to read.
#[derive(Default)]
pub struct WorkerStats {
    /// Pipeline counters (copied from the worker every ~100 ms and at exit).
    pub counters: Mutex<Counters>,
    /// Per socket.
    pub ports: Mutex<Vec<PortStats>>,
    /// Per UMEM pool.
    pub pools: Mutex<Vec<PoolStats>>,
    /// Live conntrack flows.
    pub flows: AtomicU64,
    /// Conntrack evictions.
    pub evictions: AtomicU64,
    /// Frames punted to the kernel.
    pub punted: AtomicU64,
    /// Frames that should have gone to the kernel but could not (no punt device, write error).
    pub punt_failed: AtomicU64,
    /// Frames handed to another worker.
    pub handed_off: AtomicU64,
    /// Frames dropped because nothing could transmit them (no socket on the egress interface,
    /// full inbox, no free frame, full tx ring).
    pub tx_dropped: AtomicU64,
    /// Frames transmitted.
    pub transmitted: AtomicU64,
    /// Frames moved to another interface by passing the descriptor (shared UMEM).
    pub zero_copy: AtomicU64,
    /// Frames copied into another socket's UMEM.
    pub copied: AtomicU64,
    /// Rounds that received nothing.
    pub idle_rounds: AtomicU64,
}

/// A worker's I/O counters, plain integers it alone writes; copied into [`WorkerStats`] with
/// the pipeline counters every ~100 ms, so the per-packet path touches no atomic.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCounters {
    transmitted: u64,
    handed_off: u64,
    tx_dropped: u64,
    punted: u64,
    punt_failed: u64,
    zero_copy: u64,
    copied: u64,
    idle_rounds: u64,
}

/// Everything a worker owns.
pub struct Worker {
    /// Index of the worker.
    pub id: usize,
    /// Core to pin to, if any.
    pub core: Option<usize>,
    /// Sockets owned (they arrive as [`Command::Add`], at start-up too).
    pub ports: Vec<Port>,
    /// UMEM pools: the worker's shared one first (when sharing), then sockets' own ones.
    pub pools: Vec<Option<Pool>>,
    /// Ports added and removed at runtime.
    pub commands: Receiver<Command>,
    /// Pipeline state.
    pub state: WorkerState,
    /// Live tables.
    pub live: Arc<ArcSwap<Tables>>,
    /// Processing mode.
    pub mode: Mode,
    /// Raw mode: egress ifindex by ingress ifindex.
    pub raw_map: HashMap<u32, u32>,
    /// Punt device.
    pub punt: Option<Arc<Punt>>,
    /// Cross-worker hand-off.
    pub handoff: Arc<Handoff>,
    /// Published counters.
    pub stats: Arc<WorkerStats>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// Empty rounds before sleeping in poll(2) (0: never).
    pub idle_polls_before_sleep: u32,
    /// I/O counters (published with the rest).
    pub local: IoCounters,
    /// Inspect requests and packet capture (`None`: not inspected, as in tests).
    pub ops: Option<WorkerOps>,
}

fn monotonic_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// What a worker derives from its port list (rebuilt when ports come or go).
struct Layout {
    /// Egress: the first local socket of each interface.
    local: HashMap<u32, usize>,
    pollfds: Vec<libc::pollfd>,
}

impl Worker {
    fn layout(&mut self) -> Layout {
        let mut local: HashMap<u32, usize> = HashMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            local.entry(p.ifindex).or_insert(i);
        }
        // Each pool's frames, less its reserve, are split between the sockets drawing on it.
        for (pi, pool) in self.pools.iter().enumerate() {
            let Some(pool) = pool else { continue };
            let n = self.ports.iter().filter(|p| p.pool == pi).count().max(1);
            let share = (pool.frames() - pool.reserve) / n;
            for p in self.ports.iter_mut().filter(|p| p.pool == pi) {
                p.fill_target = share.max(BATCH);
            }
        }
        let pollfds = self
            .ports
            .iter()
            .map(|p| libc::pollfd { fd: p.fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        Layout { local, pollfds }
    }

    /// Carries out a command; returns whom to tell once the new port's fill ring is stocked.
    fn command(&mut self, cmd: Command) -> Option<crossbeam::channel::Sender<()>> {
        match cmd {
            Command::Add { port, pool, adopted } => {
                self.add_port(*port, pool.map(|p| *p));
                adopted
            }
            Command::Remove { ifindex } => {
                self.remove_ports(ifindex);
                None
            }
        }
    }

    /// Adopts a new port (and its own pool, if it has one).
    fn add_port(&mut self, mut port: Port, pool: Option<Pool>) {
        let index = match pool {
            Some(pool) => {
                self.pools.push(Some(pool));
                self.pools.len() - 1
            }
            None => 0,
        };
        let Some(Some(pool)) = self.pools.get_mut(index) else {
            tracing::error!(worker = self.id, iface = %port.name, "a shared port but no shared pool");
            return;
        };
        port.adopt(pool, index);
        tracing::info!(worker = self.id, iface = %port.name, queue = port.queue, shared = port.shared, "socket added");
        self.ports.push(port);
    }

    /// Closes every port on `ifindex` and returns its frames to their pools.
    fn remove_ports(&mut self, ifindex: u32) {
        let mut k = 0;
        while k < self.ports.len() {
            if self.ports[k].ifindex != ifindex {
                k += 1;
                continue;
            }
            let port = self.ports.swap_remove(k);
            let (name, queue, pi, shared) = (port.name.clone(), port.queue, port.pool, port.shared);
            if let Some(Some(pool)) = self.pools.get_mut(pi) {
                let back = port.close(pool);
                tracing::info!(worker = self.id, iface = %name, queue, frames_back = back, "socket closed");
            }
            if !shared {
                // Its own pool has no other user.
                if let Some(slot) = self.pools.get_mut(pi) {
                    *slot = None;
                }
            }
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self) {
        if let Some(c) = self.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                tracing::warn!(worker = self.id, core = c, "could not pin worker to its core");
            }
        }
        // Ports, those of start-up included, arrive over the command channel.
        while let Ok(cmd) = self.commands.try_recv() {
            self.command(cmd);
        }
        tracing::info!(
            worker = self.id,
            core = ?self.core,
            sockets = ?self.ports.iter().map(|p| format!("{}:{}", p.name, p.queue)).collect::<Vec<_>>(),
            "worker started"
        );
        let mut layout = self.layout();
        let start = Instant::now();
        let mut rx = [FrameDesc::default(); BATCH];
        let mut verdicts = [Verdict::Pass(PassReason::NotOurs); BATCH];
        let mut lens = [0usize; BATCH];
        let mut idle: u32 = 0;
        let mut last_publish = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let mut changed = false;
            let mut acks: [Option<crossbeam::channel::Sender<()>>; 4] = Default::default();
            let mut k = 0;
            while k < acks.len() {
                let Ok(cmd) = self.commands.try_recv() else { break };
                acks[k] = self.command(cmd);
                k += 1;
                changed = true;
            }
            if changed {
                layout = self.layout();
                for k in 0..self.ports.len() {
                    if let Some(Some(pool)) = self.pools.get_mut(self.ports[k].pool) {
                        self.ports[k].refill(pool);
                    }
                }
                for a in acks.iter_mut().filter_map(Option::take) {
                    let _ = a.send(());
                }
            }
            let tables = self.live.load();
            let egress = self.handoff.egress.load_full();
            let now = monotonic_ns(start);
            let mut got = 0;
            for pi in 0..self.ports.len() {
                let Some(Some(pool)) = self.pools.get_mut(self.ports[pi].pool) else { continue };
                let port = &mut self.ports[pi];
                port.reap(pool);
                port.refill(pool);
                let n = port.recv(pool, &mut rx);
                if n == 0 {
                    continue;
                }
                got += n;
                let ingress = port.ifindex;
                match self.mode {
                    Mode::Nat => {
                        let pool = &*pool;
                        let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|k| {
                            if k < n {
                                Frame {
                                    // SAFETY: the descriptor was just received, so userspace
                                    // owns the frame; each k names a different frame.
                                    buf: unsafe { pool.room(&rx[k]) },
                                    len: Port::len_of(&rx[k]),
                                    ifindex: ingress,
                                }
                            } else {
                                Frame { buf: &mut [], len: 0, ifindex: 0 }
                            }
                        });
                        // Ops hook: capture before and after the pipeline (crate::capture).
                        let cap = self.ops.as_ref().map(|o| &*o.capture).filter(|c| c.active());
                        if let Some(c) = cap {
                            capture::offer_batch(c, &frames[..n], None, self.id as u16);
                        }
                        process_batch(
                            &mut frames[..n],
                            &mut verdicts[..n],
                            &tables,
                            &mut self.state,
                            now,
                        );
                        if let Some(c) = cap {
                            let v = Some(&verdicts[..n]);
                            capture::offer_batch(c, &frames[..n], v, self.id as u16);
                        }
                        for (l, f) in lens.iter_mut().zip(frames.iter()).take(n) {
                            *l = f.len;
                        }
                    }
                    Mode::Raw => {
                        let to = self.raw_map.get(&ingress).copied().unwrap_or(ingress);
                        for k in 0..n {
                            verdicts[k] = Verdict::Tx { ifindex: to };
                            lens[k] = Port::len_of(&rx[k]);
                        }
                    }
                }
                for k in 0..n {
                    self.dispatch(pi, rx[k], verdicts[k], lens[k], &layout.local, &egress);
                }
            }
            self.process_handed(now, &tables, &layout.local, &egress);
            self.flush_all();
            self.drain_inbox(&layout.local);
            self.state.ct.gc(now, GC_BUDGET);
            // Ops hook: answer inspect requests (conntrack, counters, flow query) between
            // rounds, never in the middle of a batch (io::inspect).
            if let Some(ops) = &self.ops {
                while let Ok(r) = ops.requests.try_recv() {
                    let ports = &self.ports;
                    inspect::serve_worker(r, &mut self.state, &tables, now, || {
                        inspect::queue_info(ports)
                    });
                }
            }
            if now - last_publish > 100_000_000 {
                last_publish = now;
                self.publish();
            }
            if got == 0 {
                idle = idle.saturating_add(1);
                self.local.idle_rounds += 1;
                if self.idle_polls_before_sleep > 0 && idle > self.idle_polls_before_sleep {
                    let fds = &mut layout.pollfds;
                    // SAFETY: `fds` is a valid array of pollfd of the given length (poll with
                    // none just sleeps).
                    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
                } else {
                    std::hint::spin_loop();
                }
            } else {
                idle = 0;
            }
        }
        self.publish();
        tracing::info!(worker = self.id, "worker stopped");
    }

    fn flush_all(&mut self) {
        for p in self.ports.iter_mut() {
            if let Some(Some(pool)) = self.pools.get_mut(p.pool) {
                p.flush_tx(pool);
            }
        }
    }

    fn publish(&self) {
        *self.stats.counters.lock() = self.state.counters.clone();
        *self.stats.ports.lock() = self
            .ports
            .iter()
            .map(|p| (p, p.xdp_stats()))
            .map(|(p, x)| PortStats {
                iface: p.name.clone(),
                ifindex: p.ifindex,
                queue: p.queue,
                shared_umem: p.shared,
                rx: p.rx_frames,
                tx: p.tx_frames,
                tx_ring_full: p.tx_ring_full,
                no_free_frame: p.no_free_frame,
                in_kernel: p.in_kernel(),
                rx_fill_ring_empty: x.as_ref().map_or(0, |x| x.rx_fill_ring_empty_descs()),
                rx_ring_full: x.as_ref().map_or(0, |x| x.rx_ring_full()),
                rx_dropped: x.as_ref().map_or(0, |x| x.rx_dropped()),
            })
            .collect();
        *self.stats.pools.lock() = self
            .pools
            .iter()
            .enumerate()
            .filter_map(|(i, pool)| {
                let pool = pool.as_ref()?;
                let users = self.ports.iter().filter(|p| p.pool == i);
                let in_kernel = users.clone().map(|p| p.in_kernel()).sum();
                let (free, held, counted, consistent) = pool.audit(in_kernel);
                Some(PoolStats {
                    frames: pool.frames(),
                    sockets: users.count(),
                    free,
                    held,
                    in_kernel: counted,
                    consistent,
                    anomalies: pool.anomalies,
                })
            })
            .collect();
        self.stats.flows.store(self.state.ct.len() as u64, Ordering::Relaxed);
        self.stats.evictions.store(self.state.ct.stats().evicted, Ordering::Relaxed);
        let l = self.local;
        self.stats.transmitted.store(l.transmitted, Ordering::Relaxed);
        self.stats.handed_off.store(l.handed_off, Ordering::Relaxed);
        self.stats.tx_dropped.store(l.tx_dropped, Ordering::Relaxed);
        self.stats.punted.store(l.punted, Ordering::Relaxed);
        self.stats.punt_failed.store(l.punt_failed, Ordering::Relaxed);
        self.stats.zero_copy.store(l.zero_copy, Ordering::Relaxed);
        self.stats.copied.store(l.copied, Ordering::Relaxed);
        self.stats.idle_rounds.store(l.idle_rounds, Ordering::Relaxed);
    }

    #[inline]
    fn dispatch(
        &mut self,
        pi: usize,
        desc: FrameDesc,
        verdict: Verdict,
        len: usize,
        local: &HashMap<u32, usize>,
        egress: &HashMap<u32, usize>,
    ) {
        let from = self.ports[pi].pool;
        let Some(Some(pool)) = self.pools.get_mut(from) else { return };
        match verdict {
            Verdict::Tx { ifindex } if ifindex == self.ports[pi].ifindex => {
                self.local.transmitted += 1;
                self.ports[pi].queue_tx(pool, desc, len);
            }
            // Another interface whose socket shares this UMEM: pass the descriptor.
            Verdict::Tx { ifindex }
                if local.get(&ifindex).is_some_and(|&qi| self.ports[qi].pool == from) =>
            {
                let qi = local[&ifindex];
                self.local.transmitted += 1;
                self.local.zero_copy += 1;
                self.ports[qi].queue_tx(pool, desc, len);
            }
            verdict => {
                // SAFETY: the frame is still owned by userspace (received, not yet recycled).
                let data = unsafe { pool.room(&desc) };
                let ingress = self.ports[pi].ifindex;
                self.dispatch_bytes(&data[..len.min(data.len())], ingress, verdict, local, egress);
                if let Some(Some(pool)) = self.pools.get_mut(from) {
                    pool.recycle(desc);
                }
            }
        }
    }

    /// Copies `data` into the local socket `qi`'s pool and queues it.
    fn copy_out(&mut self, qi: usize, data: &[u8]) -> bool {
        let Some(Some(pool)) = self.pools.get_mut(self.ports[qi].pool) else { return false };
        self.ports[qi].queue_copy(pool, data)
    }

    /// Acts on a verdict for a frame that is not (or no longer) in a socket's own UMEM slot.
    #[inline]
    fn dispatch_bytes(
        &mut self,
        data: &[u8],
        ingress: u32,
        verdict: Verdict,
        local: &HashMap<u32, usize>,
        egress: &HashMap<u32, usize>,
    ) {
        match verdict {
            Verdict::Tx { ifindex } => {
                let ok = if let Some(&qi) = local.get(&ifindex) {
                    let ok = self.copy_out(qi, data);
                    self.local.copied += u64::from(ok);
                    ok
                } else if let Some(inbox) =
                    egress.get(&ifindex).and_then(|&w| self.handoff.transmit.get(w))
                {
                    let ok = self.handoff.push(inbox, data, ifindex);
                    if ok {
                        self.local.handed_off += 1;
                    }
                    ok
                } else {
                    false
                };
                if ok {
                    self.local.transmitted += 1;
                } else {
                    self.local.tx_dropped += 1;
                }
            }
            Verdict::Pass(_) => {
                if self.punt.as_ref().is_some_and(|p| p.send(data)) {
                    self.local.punted += 1;
                } else {
                    self.local.punt_failed += 1;
                }
            }
            Verdict::Handoff { worker } => {
                let ok = self.handoff.hand_to(usize::from(worker), data, ingress);
                if ok {
                    self.local.handed_off += 1;
                } else {
                    self.local.tx_dropped += 1;
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Runs the pipeline on frames other workers handed to this one (their flows are ours).
    fn process_handed(
        &mut self,
        now: u64,
        tables: &Tables,
        local: &HashMap<u32, usize>,
        egress: &HashMap<u32, usize>,
    ) {
        let mut held: [Option<Handed>; BATCH] = [const { None }; BATCH];
        let mut n = 0;
        while n < BATCH {
            match self.handoff.take_for(self.id) {
                Some(h) => {
                    held[n] = Some(h);
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return;
        }
        let mut verdicts = [Verdict::Pass(PassReason::NotOurs); BATCH];
        let mut lens = [0usize; BATCH];
        let mut ifs = [0u32; BATCH];
        {
            let mut it = held.iter_mut();
            let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|_| match it.next() {
                Some(Some(h)) => h.frame(),
                _ => Frame { buf: &mut [], len: 0, ifindex: 0 },
            });
            self.state.local_only = true;
            process_batch(&mut frames[..n], &mut verdicts[..n], tables, &mut self.state, now);
            self.state.local_only = false;
            // Ops hook: handed frames were captured as received by the worker that got them.
            if let Some(c) = self.ops.as_ref().map(|o| &*o.capture).filter(|c| c.active()) {
                capture::offer_batch(c, &frames[..n], Some(&verdicts[..n]), self.id as u16);
            }
            for k in 0..n {
                lens[k] = frames[k].len;
                ifs[k] = frames[k].ifindex;
            }
        }
        for k in 0..n {
            if let Some(h) = held[k].take() {
                let len = lens[k].min(h.data.len());
                self.dispatch_bytes(&h.data[..len], ifs[k], verdicts[k], local, egress);
                self.handoff.give_back(h);
            }
        }
    }

    /// Transmits frames other workers queued for interfaces this worker has sockets on.
    fn drain_inbox(&mut self, local: &HashMap<u32, usize>) {
        let Some(inbox) = self.handoff.transmit.get(self.id) else { return };
        let mut moved = false;
        for _ in 0..BATCH {
            let Some(h) = inbox.pop() else { break };
            let ok = match local.get(&h.ifindex) {
                Some(&qi) => {
                    let Some(Some(pool)) = self.pools.get_mut(self.ports[qi].pool) else {
                        let _ = self.handoff.pool.push(h.data);
                        self.local.tx_dropped += 1;
                        continue;
                    };
                    self.ports[qi].queue_copy(pool, &h.data[..h.len])
                }
                // The interface went away while the frame waited.
                None => false,
            };
            if !ok {
                self.local.tx_dropped += 1;
            }
            let _ = self.handoff.pool.push(h.data);
            moved = true;
        }
        if moved {
            self.flush_all();
        }
    }
}
