//! AF_XDP sockets, one per (interface, queue), and the UMEM pools their frames live in.
//!
//! A worker's sockets share one UMEM (`XDP_SHARED_UMEM`): each socket has its own fill and
//! completion rings (every (device, queue) needs its own), but all draw frames from one
//! [`Pool`], so a frame received on interface A is transmitted on interface B by passing its
//! descriptor, without a copy. Where the kernel refuses to share (kernels before 5.10 refuse
//! sockets on other devices or queues; a driver in zero-copy mode may refuse a foreign UMEM),
//! or where the configuration turns sharing off, a socket gets its own pool and a frame
//! leaving by it is copied into that pool (the caller logs and counts the refusal).
//!
//! Frame ownership is what keeps this module sound, and the pool accounts for every frame in
//! a per-frame owner table: each frame is, at any moment, in exactly one place, recorded as
//! `FREE` (on the pool's free stack), `HELD` (a worker's hands between receive and
//! transmit/recycle, or queued for transmission) or the tag of the socket whose kernel rings
//! hold it (its fill ring, its rx ring not yet read, its tx ring or its completion ring). A
//! frame is only read or written while userspace owns it. Every transition checks the state
//! it leaves; one that does not match (a frame completed by a socket that did not send it, a
//! frame freed twice) is counted in [`Pool::anomalies`] and the frame is not used twice. When a
//! socket goes away (its interface was deleted), every frame tagged with it returns to the
//! free stack: the kernel no longer touches them once the socket is closed (copy mode copies
//! frames into socket buffers; the rings themselves are unmapped with the socket).
//!
//! One caveat comes from libxdp: the first socket created on a UMEM uses the UMEM's own file
//! descriptor, which libxdp closes only with the UMEM, so closing that socket leaves it bound
//! to its (device, queue) until the worker's pool goes. The dataplane closes sockets when
//! their interface is deleted (the kernel unbinds them then) or renamed out of the selection;
//! in the second case that one queue stays bound, and taking the interface over again fails
//! on it (busy, logged) until a restart.
//!
//! Sockets are created with libxdp's program loading inhibited: our own XDP program (crate
//! `xdp-redirect`) is loaded separately and the socket fds are inserted into its XSKMAP.

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Bytes per UMEM frame.
pub const FRAME_SIZE: u32 = 2048;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// UMEM creation failed.
    #[error("cannot create UMEM for {iface} queue {queue}: {reason}")]
    Umem {
        /// Interface.
        iface: String,
        /// Queue.
        queue: u32,
        /// Cause.
        reason: String,
    },
    /// Socket creation failed.
    #[error("cannot create AF_XDP socket on {iface} queue {queue}: {reason}")]
    Socket {
        /// Interface.
        iface: String,
        /// Queue.
        queue: u32,
        /// Cause.
        reason: String,
        /// The OS error, if any.
        errno: Option<i32>,
    },
    /// A bad setting.
    #[error("{0}")]
    Config(String),
}

impl XskError {
    /// Whether the queue was busy (still bound by another socket).
    pub fn is_busy(&self) -> bool {
        matches!(self, XskError::Socket { errno: Some(e), .. } if *e == libc::EBUSY)
    }
}

/// The UMEM region's base address, so a frame's full room (not just its current length) can be
/// handed to the pipeline, which builds replies in place.
struct Area {
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer is into an mmap'd region owned by the pool's `Umem`, which lives as long
// as the pool (and every socket holds a `Umem` handle too); the pool moves between threads as
// a whole and is used by one thread at a time.
unsafe impl Send for Area {}

/// Frames the kernel sends per tx kick in copy mode (`TX_BATCH_SIZE` in `net/xdp/xsk.c`).
pub const KICK_BUDGET: usize = 32;
/// Kicks per flush at most (a batch of 64 needs 2; more drains a backlog).
const MAX_KICKS: usize = 4;

/// Owner-table value of a frame on the free stack.
const FREE: u16 = 0;
/// Owner-table value of a frame in a worker's hands (received, or queued to transmit).
const HELD: u16 = 1;
/// First socket tag; a frame tagged `t >= FIRST_TAG` is in socket `t`'s kernel rings.
const FIRST_TAG: u16 = 2;

/// Ring sizes and UMEM geometry.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Frames in a pool.
    pub frames: u32,
    /// Entries in each ring (fill, completion, rx, tx); a power of two.
    pub ring: u32,
}

impl Geometry {
    fn umem_config(&self) -> Result<UmemConfig, XskError> {
        UmemConfig::builder()
            .frame_size(
                FrameSize::new(FRAME_SIZE)
                    .map_err(|e| XskError::Config(format!("frame size: {e}")))?,
            )
            .fill_queue_size(qsize(self.ring)?)
            .comp_queue_size(qsize(self.ring)?)
            .build()
            .map_err(|e| XskError::Config(format!("UMEM config: {e}")))
    }
}

fn qsize(n: u32) -> Result<QueueSize, XskError> {
    QueueSize::new(n).map_err(|e| XskError::Config(format!("queue size {n}: {e}")))
}

/// A UMEM and the accounting of its frames (see the module docs).
pub struct Pool {
    umem: Umem,
    area: Area,
    /// Every frame's descriptor as the UMEM handed it out, by frame index.
    all: Vec<FrameDesc>,
    /// Frames userspace owns and is not using.
    free: Vec<FrameDesc>,
    /// Where each frame is, by frame index (`FREE`, `HELD` or a socket tag).
    owner: Vec<u16>,
    next_tag: u16,
    /// Frames kept on the free stack for copies and replies (not put in fill rings).
    pub reserve: usize,
    /// Transitions that found a frame somewhere it should not be (never expected; counted).
    pub anomalies: u64,
}

impl Pool {
    /// A new UMEM of `geo.frames` frames, all free.
    pub fn new(geo: Geometry, what: &str) -> Result<Pool, XskError> {
        let count =
            NonZeroU32::new(geo.frames).ok_or_else(|| XskError::Config("0 frames".into()))?;
        let (umem, mut descs) =
            Umem::new(geo.umem_config()?, count, false).map_err(|e| XskError::Umem {
                iface: what.into(),
                queue: 0,
                reason: format!("{e} ({:?})", std::error::Error::source(&e)),
            })?;
        // The region's base: frame 0's data segment address minus its offset.
        let d0 = &mut descs[0];
        let addr0 = d0.addr();
        // SAFETY: `d0` is a descriptor of this UMEM, owned by us (nothing is in any ring yet).
        let p0 = unsafe { umem.data_mut(d0) }.contents_mut().as_mut_ptr();
        // SAFETY: `addr0` is frame 0's offset from the start of the region, so subtracting it
        // stays inside the region.
        let base = unsafe { p0.sub(addr0) };
        let area = Area { base, len: geo.frames as usize * FRAME_SIZE as usize };
        let n = descs.len();
        // Free stack popped from the end: hand out low frames first.
        let mut free = descs.clone();
        free.reverse();
        Ok(Pool {
            umem,
            area,
            all: descs,
            free,
            owner: vec![FREE; n],
            next_tag: FIRST_TAG,
            reserve: (n / 8).max(64).min(n / 2),
            anomalies: 0,
        })
    }

    /// A handle on the UMEM, to create sockets sharing it from another thread.
    pub fn umem(&self) -> Umem {
        self.umem.clone()
    }

    /// Frames in the pool.
    pub fn frames(&self) -> usize {
        self.all.len()
    }

    /// Frames on the free stack.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Checks the owner table against the free stack and the sockets' in-kernel counts:
    /// returns (free, held, in kernel) counted from the table, and whether they agree with
    /// the free stack and with `in_kernel` (the sum of the pool's sockets' counts).
    pub fn audit(&self, in_kernel: usize) -> (usize, usize, usize, bool) {
        let (mut f, mut h, mut k) = (0, 0, 0);
        for &o in &self.owner {
            match o {
                FREE => f += 1,
                HELD => h += 1,
                _ => k += 1,
            }
        }
        (f, h, k, f == self.free.len() && k == in_kernel && f + h + k == self.all.len())
    }

    #[inline]
    fn index(&self, desc: &FrameDesc) -> usize {
        desc.addr() / FRAME_SIZE as usize
    }

    /// Moves frame `desc` from state `from` to `to`; false (counted) if it was not in `from`.
    #[inline]
    fn transition(&mut self, desc: &FrameDesc, from: u16, to: u16) -> bool {
        let i = self.index(desc);
        match self.owner.get_mut(i) {
            Some(o) if *o == from => {
                *o = to;
                true
            }
            _ => {
                self.anomalies += 1;
                false
            }
        }
    }

    /// Takes a free frame into a worker's hands.
    #[inline]
    fn take(&mut self) -> Option<FrameDesc> {
        let d = self.free.pop()?;
        let i = self.index(&d);
        self.owner[i] = HELD;
        Some(d)
    }

    /// Gives a frame in a worker's hands back to the free stack.
    #[inline]
    pub fn recycle(&mut self, desc: FrameDesc) {
        if self.transition(&desc, HELD, FREE) {
            self.free.push(desc);
        }
    }

    /// The whole room of the frame `desc` names, from its data start to the end of its chunk.
    ///
    /// # Safety
    /// `desc` must be a descriptor of this pool's UMEM that userspace owns (received and not
    /// yet handed back to the kernel), and no other live slice may cover the same frame.
    #[inline]
    pub unsafe fn room<'a>(&self, desc: &FrameDesc) -> &'a mut [u8] {
        let addr = desc.addr();
        let chunk_end = (addr / FRAME_SIZE as usize + 1) * FRAME_SIZE as usize;
        debug_assert!(chunk_end <= self.area.len);
        // SAFETY: `addr..chunk_end` lies inside the mmap'd region (aligned chunks of
        // FRAME_SIZE); the caller guarantees exclusive ownership of this frame.
        unsafe { std::slice::from_raw_parts_mut(self.area.base.add(addr), chunk_end - addr) }
    }

    /// Sets the length to transmit for `desc`.
    #[inline]
    fn set_len(&self, desc: &mut FrameDesc, len: usize) {
        // SAFETY: the descriptor belongs to this UMEM and is owned by userspace; this only
        // updates its length field through the cursor.
        unsafe { self.umem.data_mut(desc) }.cursor().set_pos(len);
    }

    fn new_tag(&mut self) -> u16 {
        // Tags are never reused while a socket might still hold frames: 65,534 sockets over a
        // process's life, after which tags wrap past the two reserved values.
        let t = self.next_tag;
        self.next_tag = self.next_tag.checked_add(1).unwrap_or(FIRST_TAG);
        t
    }

    /// Returns to the free stack every frame socket `tag` held (its socket is closed).
    fn reclaim(&mut self, tag: u16) -> usize {
        let mut n = 0;
        for i in 0..self.owner.len() {
            if self.owner[i] == tag {
                self.owner[i] = FREE;
                self.free.push(self.all[i]);
                n += 1;
            }
        }
        n
    }
}

/// An AF_XDP socket with its rings; its frames come from a [`Pool`] the worker holds.
pub struct Port {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Queue id.
    pub queue: u32,
    /// Index of its pool in the worker's pools (set when the worker adopts it).
    pub pool: usize,
    /// Whether it shares its worker's UMEM.
    pub shared: bool,
    tag: u16,
    fq: FillQueue,
    cq: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    /// Frames queued for transmission at the end of the batch.
    tx_pending: Vec<FrameDesc>,
    ring: usize,
    /// Frames this socket keeps in its fill ring (set by the worker from the pool's size).
    pub fill_target: usize,
    /// Frames in this socket's fill and rx rings.
    in_fill: usize,
    /// Frames in this socket's tx and completion rings.
    in_tx: usize,
    /// Frames received.
    pub rx_frames: u64,
    /// Frames handed to the tx ring.
    pub tx_frames: u64,
    /// Frames dropped because the tx ring was full.
    pub tx_ring_full: u64,
    /// Frames dropped because no free frame was left to copy into.
    pub no_free_frame: u64,
}

/// How a socket was opened.
pub enum Opened {
    /// Sharing the given UMEM.
    Shared(Port),
    /// With its own pool: sharing was not asked for, or the kernel refused it (the reason).
    Own(Port, Pool, Option<String>),
}

impl Port {
    /// Opens a socket on `iface` queue `queue`. With `share`, it binds to that UMEM
    /// (`XDP_SHARED_UMEM`); if the kernel refuses (other than the queue being busy), it falls
    /// back to a pool of its own and says why.
    pub fn open(
        iface: &str,
        ifindex: u32,
        queue: u32,
        geo: Geometry,
        share: Option<&Umem>,
    ) -> Result<Opened, XskError> {
        let mut refused = None;
        if let Some(umem) = share {
            match Self::bind(iface, ifindex, queue, geo, umem) {
                Ok(mut p) => {
                    p.shared = true;
                    return Ok(Opened::Shared(p));
                }
                Err(e) if e.is_busy() => return Err(e),
                Err(e) => refused = Some(e.to_string()),
            }
        }
        let pool = Pool::new(geo, iface)?;
        let p = Self::bind(iface, ifindex, queue, geo, &pool.umem)?;
        Ok(Opened::Own(p, pool, refused))
    }

    fn bind(
        iface: &str,
        ifindex: u32,
        queue: u32,
        geo: Geometry,
        umem: &Umem,
    ) -> Result<Port, XskError> {
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(qsize(geo.ring)?)
            .tx_queue_size(qsize(geo.ring)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let ifname: Interface = iface
            .parse()
            .map_err(|e| XskError::Config(format!("interface name {iface:?}: {e:?}")))?;
        // SAFETY: program loading is inhibited, which is what `Socket::new` requires when the
        // UMEM is shared and the (interface, queue) pair is already bound.
        let (tx, rx, rings) =
            unsafe { Socket::new(sock_cfg, umem, &ifname, queue) }.map_err(|e| {
                XskError::Socket {
                    iface: iface.into(),
                    queue,
                    reason: format!("{e} ({:?})", std::error::Error::source(&e)),
                    errno: std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<std::io::Error>())
                        .and_then(|io| io.raw_os_error()),
                }
            })?;
        // A (device, queue) bound once from a UMEM gets its own fill and completion rings; a
        // second socket on the same pair would share them, which we never do.
        let (fq, cq) = rings.ok_or_else(|| XskError::Socket {
            iface: iface.into(),
            queue,
            reason: "this (interface, queue) is already bound from this UMEM".into(),
            errno: Some(libc::EBUSY),
        })?;
        let ring = geo.ring as usize;
        Ok(Port {
            name: iface.into(),
            ifindex,
            queue,
            pool: 0,
            shared: false,
            tag: 0,
            fq,
            cq,
            tx,
            rx,
            tx_pending: Vec::with_capacity(ring),
            ring,
            fill_target: ring,
            in_fill: 0,
            in_tx: 0,
            rx_frames: 0,
            tx_frames: 0,
            tx_ring_full: 0,
            no_free_frame: 0,
        })
    }

    /// Makes this socket draw from `pool` (at index `index` in its worker's pools).
    pub fn adopt(&mut self, pool: &mut Pool, index: usize) {
        self.pool = index;
        self.tag = pool.new_tag();
    }

    /// Closes the socket and returns its frames to `pool`; returns how many came back.
    pub fn close(mut self, pool: &mut Pool) -> usize {
        for d in self.tx_pending.drain(..) {
            pool.recycle(d);
        }
        let tag = self.tag;
        drop(self);
        pool.reclaim(tag)
    }

    /// The socket's fd (for the XSKMAP and poll(2)).
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Frames in this socket's kernel rings.
    pub fn in_kernel(&self) -> usize {
        self.in_fill + self.in_tx
    }

    /// Length of received frame `desc`.
    #[inline]
    pub fn len_of(desc: &FrameDesc) -> usize {
        desc.lengths().data()
    }

    /// Receives up to `out.len()` frames into the worker's hands; returns how many.
    #[inline]
    pub fn recv(&mut self, pool: &mut Pool, out: &mut [FrameDesc]) -> usize {
        // SAFETY: `out` receives descriptors of frames the kernel hands back to userspace.
        let n = unsafe { self.rx.consume(out) };
        let mut k = 0;
        for i in 0..n {
            if pool.transition(&out[i], self.tag, HELD) {
                out[k] = out[i];
                k += 1;
            }
        }
        self.in_fill -= n;
        self.rx_frames += k as u64;
        k
    }

    /// Queues a frame in the worker's hands, of this socket's pool, for transmission.
    #[inline]
    pub fn queue_tx(&mut self, pool: &Pool, mut desc: FrameDesc, len: usize) {
        pool.set_len(&mut desc, len);
        self.tx_pending.push(desc);
    }

    /// Copies `data` into a free frame and queues it; false (counted) when none is free.
    #[inline]
    pub fn queue_copy(&mut self, pool: &mut Pool, data: &[u8]) -> bool {
        let Some(desc) = pool.take() else {
            self.no_free_frame += 1;
            return false;
        };
        // SAFETY: the frame came off the free stack, so userspace owns it exclusively.
        let room = unsafe { pool.room(&desc) };
        let n = data.len().min(room.len());
        room[..n].copy_from_slice(&data[..n]);
        self.queue_tx(pool, desc, n);
        true
    }

    /// Submits queued frames to the tx ring and, while the kernel holds frames to send and
    /// asks to be woken, kicks it: in copy mode each kick (sendto) sends at most
    /// [`KICK_BUDGET`] frames, so a batch needs several, and frames left in the ring by an
    /// earlier round are sent even when nothing new was queued.
    pub fn flush_tx(&mut self, pool: &mut Pool) {
        if !self.tx_pending.is_empty() {
            // SAFETY: every pending descriptor is a frame of this socket's UMEM owned by
            // userspace, with its length set; from here the kernel owns the ones produced.
            let sent = unsafe { self.tx.produce(&self.tx_pending) };
            for d in &self.tx_pending[..sent] {
                pool.transition(d, HELD, self.tag);
            }
            self.in_tx += sent;
            self.tx_frames += sent as u64;
            for d in self.tx_pending.drain(..).skip(sent) {
                self.tx_ring_full += 1;
                pool.recycle(d);
            }
        }
        // Kick until the kernel has taken every entry of the ring (it may still be completing
        // them), bounded per round.
        for _ in 0..MAX_KICKS {
            if self.in_tx == 0
                || self.tx.nb_free_exact() as usize >= self.ring
                || !self.tx.needs_wakeup()
            {
                break;
            }
            let _ = self.tx.wakeup();
        }
        self.reap(pool);
    }

    /// Takes back frames the kernel finished sending.
    pub fn reap(&mut self, pool: &mut Pool) {
        let mut done = [FrameDesc::default(); 64];
        loop {
            // SAFETY: completed descriptors are frames of this UMEM the kernel is done with.
            let n = unsafe { self.cq.consume(&mut done) };
            self.in_tx -= n;
            for d in &done[..n] {
                if pool.transition(d, self.tag, FREE) {
                    pool.free.push(*d);
                }
            }
            if n < done.len() {
                break;
            }
        }
    }

    /// Tops the fill ring up to its target from the pool, leaving the pool's reserve.
    pub fn refill(&mut self, pool: &mut Pool) {
        let filled = self.in_fill;
        if filled >= self.fill_target || pool.free.len() <= pool.reserve {
            return;
        }
        let want = (self.fill_target - filled)
            .min(pool.free.len() - pool.reserve)
            .min(self.fq.nb_free(self.ring as u32) as usize);
        if want == 0 {
            return;
        }
        let start = pool.free.len() - want;
        // SAFETY: these frames are owned by userspace and unused; the kernel owns the ones
        // produced from here on.
        let n = unsafe { self.fq.produce(&pool.free[start..]) };
        for i in start..start + n {
            let d = pool.free[i];
            let ix = pool.index(&d);
            pool.owner[ix] = self.tag;
        }
        pool.free.drain(start..start + n);
        self.in_fill += n;
        if self.fq.needs_wakeup() {
            let fd = self.rx.fd_mut();
            let _ = self.fq.wakeup(fd, 0);
        }
    }

    /// Kernel-side statistics of the socket.
    pub fn xdp_stats(&self) -> Option<xsk_rs::socket::XdpStatistics> {
        self.rx.fd().xdp_statistics().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool needs an AF_XDP socket for its UMEM registration (CAP_NET_RAW).
    fn pool() -> Option<Pool> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a UMEM needs root");
            return None;
        }
        Some(Pool::new(Geometry { frames: 256, ring: 64 }, "test").expect("UMEM"))
    }

    #[test]
    fn frames_are_accounted_for_and_never_used_twice() {
        let Some(mut p) = pool() else { return };
        assert_eq!(p.audit(0), (256, 0, 0, true));
        let taken: Vec<FrameDesc> = (0..10).map(|_| p.take().unwrap()).collect();
        assert_eq!(p.audit(0), (246, 10, 0, true));
        for d in &taken {
            p.recycle(*d);
        }
        assert_eq!(p.audit(0), (256, 0, 0, true));
        // A second recycle of the same frame is refused and counted, not a duplicate.
        p.recycle(taken[0]);
        assert_eq!(p.anomalies, 1);
        assert_eq!(p.free_frames(), 256);
        assert_eq!(p.audit(0), (256, 0, 0, true));
        // A frame "completed" by a socket that does not hold it is refused too.
        assert!(!p.transition(&taken[1], 7, FREE));
        assert_eq!(p.anomalies, 2);
    }

    #[test]
    fn a_closed_sockets_frames_come_back() {
        let Some(mut p) = pool() else { return };
        let (a, b) = (p.new_tag(), p.new_tag());
        // As a refill does: frames move from the free stack into a socket's rings.
        for (tag, n) in [(a, 20), (b, 30)] {
            for _ in 0..n {
                let d = p.free.pop().unwrap();
                let i = p.index(&d);
                p.owner[i] = tag;
            }
        }
        assert_eq!(p.audit(50), (206, 0, 50, true));
        assert!(!p.audit(49).3, "a miscount is seen");
        assert_eq!(p.reclaim(a), 20);
        assert_eq!(p.audit(30), (226, 0, 30, true));
        assert_eq!(p.reclaim(a), 0, "nothing twice");
        assert_eq!(p.reclaim(b), 30);
        assert_eq!(p.audit(0), (256, 0, 0, true));
        // Every frame is on the free stack exactly once.
        let mut seen: Vec<usize> = p.free.iter().map(|d| p.index(d)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }
}
