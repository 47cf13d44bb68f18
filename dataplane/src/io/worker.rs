//! A worker: one thread pinned to one core, busy-polling the AF_XDP sockets it owns.
//!
//! The loop, per round: load the tables once; for each socket reap completions, refill the
//! fill ring, receive a batch of up to [`BATCH`] frames, run [`process_batch`] on them in place
//! in UMEM, and act on the verdicts (transmit on the same socket without copying, copy into
//! another socket's UMEM, hand to another worker's inbox, punt to the kernel, or recycle);
//! then flush every socket's tx ring (kicking the kernel only when it asks, `need_wakeup`),
//! drain the inboxes of the interfaces it owns, and sweep a little conntrack.
//!
//! Nothing is allocated in the loop: descriptor arrays are fixed-size, the hand-off buffers
//! come from a pool filled at start. When nothing arrives for a while the worker waits in
//! poll(2) for up to a millisecond instead of spinning, so an idle node does not burn its cores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam::queue::ArrayQueue;
use parking_lot::Mutex;
use xsk_rs::FrameDesc;

use super::config::Mode;
use super::inspect::{self, WorkerOps};
use super::punt::Punt;
use super::xsk::Port;
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

/// Cross-worker queues and the pool of hand-off buffers.
///
/// Two kinds of hand-off: a frame to *transmit* goes to the inbox of its egress interface
/// (drained by a worker owning a socket there); a frame to *process* goes to the inbox of the
/// worker that owns its flow ([`crate::pipeline::owner_of`]), which runs the pipeline on it.
pub struct Handoff {
    inboxes: HashMap<u32, ArrayQueue<Handed>>,
    process: Vec<ArrayQueue<Handed>>,
    pool: ArrayQueue<Box<[u8; 2048]>>,
}

impl Handoff {
    /// Transmit inboxes for `ifindexes` and process inboxes for `workers`, each holding up to
    /// `depth` frames, and a pool of `buffers`.
    pub fn new(ifindexes: &[u32], workers: usize, depth: usize, buffers: usize) -> Self {
        let pool = ArrayQueue::new(buffers.max(1));
        for _ in 0..buffers {
            let _ = pool.push(Box::new([0u8; 2048]));
        }
        Self {
            inboxes: ifindexes.iter().map(|&i| (i, ArrayQueue::new(depth.max(1)))).collect(),
            process: (0..workers).map(|_| ArrayQueue::new(depth.max(1))).collect(),
            pool,
        }
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

/// Counters a worker publishes for others to read.
#[derive(Default)]
pub struct WorkerStats {
    /// Pipeline counters (copied from the worker every ~100 ms and at exit).
    pub counters: Mutex<Counters>,
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
    idle_rounds: u64,
}

/// Everything a worker owns.
pub struct Worker {
    /// Index of the worker.
    pub id: usize,
    /// Core to pin to, if any.
    pub core: Option<usize>,
    /// Sockets owned.
    pub ports: Vec<Port>,
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

impl Worker {
    /// Runs until `stop` is set.
    pub fn run(mut self) {
        if let Some(c) = self.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                tracing::warn!(worker = self.id, core = c, "could not pin worker to its core");
            }
        }
        tracing::info!(
            worker = self.id,
            core = ?self.core,
            sockets = ?self.ports.iter().map(|p| format!("{}:{}", p.name, p.queue)).collect::<Vec<_>>(),
            "worker started"
        );
        // Egress: the first local socket of each interface.
        let mut local: HashMap<u32, usize> = HashMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            local.entry(p.ifindex).or_insert(i);
        }
        let start = Instant::now();
        let mut rx = [FrameDesc::default(); BATCH];
        let mut verdicts = [Verdict::Pass(PassReason::NotOurs); BATCH];
        let mut lens = [0usize; BATCH];
        let mut idle: u32 = 0;
        let mut last_publish = 0u64;
        let mut pollfds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .map(|p| libc::pollfd { fd: p.fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        while !self.stop.load(Ordering::Relaxed) {
            let tables = self.live.load();
            let now = monotonic_ns(start);
            let mut got = 0;
            for pi in 0..self.ports.len() {
                self.ports[pi].reap();
                self.ports[pi].refill();
                let n = self.ports[pi].recv(&mut rx);
                if n == 0 {
                    continue;
                }
                got += n;
                let ingress = self.ports[pi].ifindex;
                match self.mode {
                    Mode::Nat => {
                        let port = &self.ports[pi];
                        let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|k| {
                            if k < n {
                                Frame {
                                    // SAFETY: the descriptor was just received, so userspace
                                    // owns the frame; each k names a different frame.
                                    buf: unsafe { port.room(&rx[k]) },
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
                    self.dispatch(pi, rx[k], verdicts[k], lens[k], &local);
                }
            }
            self.process_handed(now, &tables, &local);
            for p in self.ports.iter_mut() {
                p.flush_tx();
            }
            self.drain_inboxes(&local);
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
                    // SAFETY: `pollfds` is a valid array of pollfd of the given length.
                    unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 1) };
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

    fn publish(&self) {
        *self.stats.counters.lock() = self.state.counters.clone();
        self.stats.flows.store(self.state.ct.len() as u64, Ordering::Relaxed);
        self.stats.evictions.store(self.state.ct.stats().evicted, Ordering::Relaxed);
        let l = self.local;
        self.stats.transmitted.store(l.transmitted, Ordering::Relaxed);
        self.stats.handed_off.store(l.handed_off, Ordering::Relaxed);
        self.stats.tx_dropped.store(l.tx_dropped, Ordering::Relaxed);
        self.stats.punted.store(l.punted, Ordering::Relaxed);
        self.stats.punt_failed.store(l.punt_failed, Ordering::Relaxed);
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
    ) {
        match verdict {
            Verdict::Tx { ifindex } if ifindex == self.ports[pi].ifindex => {
                self.local.transmitted += 1;
                self.ports[pi].queue_tx(desc, len);
            }
            verdict => {
                // SAFETY: the frame is still owned by userspace (received, not yet recycled).
                let data = unsafe { self.ports[pi].room(&desc) };
                let ingress = self.ports[pi].ifindex;
                self.dispatch_bytes(&data[..len.min(data.len())], ingress, verdict, local);
                self.ports[pi].recycle(desc);
            }
        }
    }

    /// Acts on a verdict for a frame that is not (or no longer) in a socket's own UMEM slot.
    #[inline]
    fn dispatch_bytes(
        &mut self,
        data: &[u8],
        ingress: u32,
        verdict: Verdict,
        local: &HashMap<u32, usize>,
    ) {
        match verdict {
            Verdict::Tx { ifindex } => {
                let ok = if let Some(&qi) = local.get(&ifindex) {
                    self.ports[qi].queue_copy(data)
                } else if let Some(inbox) = self.handoff.inboxes.get(&ifindex) {
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
                let ok = self
                    .handoff
                    .process
                    .get(usize::from(worker))
                    .is_some_and(|q| self.handoff.push(q, data, ingress));
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
    fn process_handed(&mut self, now: u64, tables: &Tables, local: &HashMap<u32, usize>) {
        let Some(q) = self.handoff.process.get(self.id) else { return };
        let mut held: [Option<Handed>; BATCH] = [const { None }; BATCH];
        let mut n = 0;
        while n < BATCH {
            match q.pop() {
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
                Some(Some(h)) => Frame { buf: &mut h.data[..], len: h.len, ifindex: h.ifindex },
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
                self.dispatch_bytes(&h.data[..len], ifs[k], verdicts[k], local);
                let _ = self.handoff.pool.push(h.data);
            }
        }
    }

    fn drain_inboxes(&mut self, local: &HashMap<u32, usize>) {
        for (&ifindex, &qi) in local.iter() {
            let Some(inbox) = self.handoff.inboxes.get(&ifindex) else { continue };
            let mut moved = false;
            for _ in 0..BATCH {
                let Some(h) = inbox.pop() else { break };
                if !self.ports[qi].queue_copy(&h.data[..h.len]) {
                    self.local.tx_dropped += 1;
                }
                let _ = self.handoff.pool.push(h.data);
                moved = true;
            }
            if moved {
                self.ports[qi].flush_tx();
            }
        }
    }
}
