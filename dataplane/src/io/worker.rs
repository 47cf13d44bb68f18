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
use super::punt::Punt;
use super::xsk::Port;
use crate::counters::{Counters, PassReason};
use crate::pipeline::{process_batch, Frame, Verdict, WorkerState};
use crate::tables::Tables;

/// Frames per batch (a power of two, as the ring sizes are).
pub const BATCH: usize = 64;
const _: () = assert!(BATCH.is_power_of_two());
/// Conntrack slab entries swept per round.
const GC_BUDGET: usize = 64;

/// A frame handed from one worker to the worker owning its egress interface.
pub struct Handed {
    len: usize,
    data: Box<[u8; 2048]>,
}

/// Inboxes of every interface, by ifindex, and the pool of hand-off buffers.
pub struct Handoff {
    inboxes: HashMap<u32, ArrayQueue<Handed>>,
    pool: ArrayQueue<Box<[u8; 2048]>>,
}

impl Handoff {
    /// Inboxes for `ifindexes`, each holding up to `depth` frames, and a pool of `buffers`.
    pub fn new(ifindexes: &[u32], depth: usize, buffers: usize) -> Self {
        let pool = ArrayQueue::new(buffers.max(1));
        for _ in 0..buffers {
            let _ = pool.push(Box::new([0u8; 2048]));
        }
        Self {
            inboxes: ifindexes.iter().map(|&i| (i, ArrayQueue::new(depth.max(1)))).collect(),
            pool,
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
                        process_batch(&mut frames[..n], &mut verdicts[..n], &tables, &mut self.state, now);
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
            for p in self.ports.iter_mut() {
                p.flush_tx();
            }
            self.drain_inboxes(&local);
            self.state.ct.gc(now, GC_BUDGET);
            if now - last_publish > 100_000_000 {
                last_publish = now;
                self.publish();
            }
            if got == 0 {
                idle = idle.saturating_add(1);
                self.stats.idle_rounds.fetch_add(1, Ordering::Relaxed);
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
                self.stats.transmitted.fetch_add(1, Ordering::Relaxed);
                self.ports[pi].queue_tx(desc, len);
            }
            Verdict::Tx { ifindex } => {
                // SAFETY: the frame is still owned by userspace (received, not yet recycled).
                let data = unsafe { self.ports[pi].room(&desc) };
                let data = &data[..len.min(data.len())];
                let ok = if let Some(&qi) = local.get(&ifindex) {
                    self.ports[qi].queue_copy(data)
                } else if let Some(inbox) = self.handoff.inboxes.get(&ifindex) {
                    match self.handoff.pool.pop() {
                        Some(mut buf) => {
                            buf[..data.len()].copy_from_slice(data);
                            let ok = inbox.push(Handed { len: data.len(), data: buf }).map_err(
                                |h| {
                                    let _ = self.handoff.pool.push(h.data);
                                },
                            );
                            if ok.is_ok() {
                                self.stats.handed_off.fetch_add(1, Ordering::Relaxed);
                            }
                            ok.is_ok()
                        }
                        None => false,
                    }
                } else {
                    false
                };
                if ok {
                    self.stats.transmitted.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.ports[pi].recycle(desc);
            }
            Verdict::Pass(_) => {
                // SAFETY: as above.
                let data = unsafe { self.ports[pi].room(&desc) };
                let sent = self.punt.as_ref().is_some_and(|p| p.send(&data[..len.min(data.len())]));
                if sent {
                    self.stats.punted.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.punt_failed.fetch_add(1, Ordering::Relaxed);
                }
                self.ports[pi].recycle(desc);
            }
            Verdict::Drop(_) => self.ports[pi].recycle(desc),
        }
    }

    fn drain_inboxes(&mut self, local: &HashMap<u32, usize>) {
        for (&ifindex, &qi) in local.iter() {
            let Some(inbox) = self.handoff.inboxes.get(&ifindex) else { continue };
            let mut moved = false;
            for _ in 0..BATCH {
                let Some(h) = inbox.pop() else { break };
                if !self.ports[qi].queue_copy(&h.data[..h.len]) {
                    self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
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
