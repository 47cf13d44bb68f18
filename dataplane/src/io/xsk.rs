//! One AF_XDP socket on one (interface, queue), with its own UMEM.
//!
//! Frame ownership is what keeps this module sound. Each of the UMEM's frames is, at any
//! moment, in exactly one place: the kernel (fill ring, or rx/tx in flight), the port's `free`
//! stack, or a worker's hands between `rx` and `tx`/`recycle`. A frame is only read or written
//! while userspace owns it. Every port has its own UMEM: veth does AF_XDP in copy mode only, and
//! a frame that leaves by another interface is copied into that interface's UMEM (the copy is
//! the price of not sharing UMEM across devices; see the crate README).
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
/// Frames a copy-mode socket transmits per `sendto` (`TX_BATCH_SIZE` in `net/xdp/xsk.c`).
const COPY_TX_BATCH: usize = 32;

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

// SAFETY: the pointer is into an mmap'd region owned by the port's `Umem`, which lives as long as
// the port; the port (and so the pointer) moves between threads as a whole and is used by one
// thread at a time.
unsafe impl Send for Area {}

/// An AF_XDP socket with its rings and UMEM.
pub struct Port {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Queue id.
    pub queue: u32,
    umem: Umem,
    area: Area,
    fq: FillQueue,
    cq: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    /// Frames userspace owns and is not using.
    free: Vec<FrameDesc>,
    /// Frames queued for transmission at the end of the batch.
    tx_pending: Vec<FrameDesc>,
    fill_target: usize,
    /// Entries of the tx ring.
    tx_size: u32,
    /// Frames dropped because the tx ring was full.
    pub tx_ring_full: u64,
    /// Frames dropped because no free frame was left to copy into.
    pub no_free_frame: u64,
}

impl Port {
    /// Opens a socket on `iface` queue `queue` with `frames` UMEM frames (a power of two).
    pub fn open(iface: &str, ifindex: u32, queue: u32, frames: u32) -> Result<Port, XskError> {
        let ring = frames / 2;
        let qsize = |n: u32| {
            QueueSize::new(n).map_err(|e| XskError::Config(format!("queue size {n}: {e}")))
        };
        let umem_cfg = UmemConfig::builder()
            .frame_size(
                FrameSize::new(FRAME_SIZE)
                    .map_err(|e| XskError::Config(format!("frame size: {e}")))?,
            )
            .fill_queue_size(qsize(ring)?)
            .comp_queue_size(qsize(ring)?)
            .build()
            .map_err(|e| XskError::Config(format!("UMEM config: {e}")))?;
        let count = NonZeroU32::new(frames).ok_or_else(|| XskError::Config("0 frames".into()))?;
        let (umem, mut descs) = Umem::new(umem_cfg, count, false).map_err(|e| XskError::Umem {
            iface: iface.into(),
            queue,
            reason: format!("{e} ({:?})", std::error::Error::source(&e)),
        })?;
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(qsize(ring)?)
            .tx_queue_size(qsize(ring)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let ifname: Interface = iface
            .parse()
            .map_err(|e| XskError::Config(format!("interface name {iface:?}: {e:?}")))?;
        // SAFETY: the UMEM is new and not shared, so the shared-UMEM precondition of
        // `Socket::new` does not apply; program loading is inhibited as well.
        let (tx, rx, rings) =
            unsafe { Socket::new(sock_cfg, &umem, &ifname, queue) }.map_err(|e| {
                XskError::Socket {
                    iface: iface.into(),
                    queue,
                    reason: format!("{e} ({:?})", std::error::Error::source(&e)),
                    errno: std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<std::io::Error>())
                        .and_then(|io| io.raw_os_error()),
                }
            })?;
        let (fq, cq) = rings.ok_or_else(|| XskError::Socket {
            iface: iface.into(),
            queue,
            reason: "no fill/completion rings returned for an unshared UMEM".into(),
            errno: None,
        })?;
        // The region's base: frame 0's data segment address minus its offset.
        let d0 = &mut descs[0];
        let addr0 = d0.addr();
        // SAFETY: `d0` is a descriptor of this UMEM, owned by us (nothing is in any ring yet).
        let p0 = unsafe { umem.data_mut(d0) }.contents_mut().as_mut_ptr();
        // SAFETY: `addr0` is frame 0's offset from the start of the region, so subtracting it
        // stays inside the region.
        let base = unsafe { p0.sub(addr0) };
        let area = Area { base, len: frames as usize * FRAME_SIZE as usize };
        let fill_target = ring as usize;
        let mut port = Port {
            name: iface.into(),
            ifindex,
            queue,
            umem,
            area,
            fq,
            cq,
            tx,
            rx,
            free: descs,
            tx_pending: Vec::with_capacity(ring as usize),
            fill_target,
            tx_size: ring,
            tx_ring_full: 0,
            no_free_frame: 0,
        };
        port.refill();
        Ok(port)
    }

    /// The socket's fd (for the XSKMAP and poll(2)).
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Frames userspace holds unused.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// The whole room of the frame `desc` names, from its data start to the end of its chunk.
    ///
    /// # Safety
    /// `desc` must be a descriptor of this port's UMEM that userspace owns (received and not
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

    /// Length of received frame `desc`.
    #[inline]
    pub fn len_of(desc: &FrameDesc) -> usize {
        desc.lengths().data()
    }

    /// Sets the length to transmit for `desc`.
    #[inline]
    fn set_len(&self, desc: &mut FrameDesc, len: usize) {
        // SAFETY: the descriptor belongs to this UMEM and is owned by userspace; this only
        // updates its length field through the cursor.
        unsafe { self.umem.data_mut(desc) }.cursor().set_pos(len);
    }

    /// Receives up to `out.len()` frames; returns how many.
    #[inline]
    pub fn recv(&mut self, out: &mut [FrameDesc]) -> usize {
        // SAFETY: `out` receives descriptors of frames the kernel hands back to userspace.
        unsafe { self.rx.consume(out) }
    }

    /// Queues a frame of this UMEM for transmission with length `len`.
    #[inline]
    pub fn queue_tx(&mut self, mut desc: FrameDesc, len: usize) {
        self.set_len(&mut desc, len);
        self.tx_pending.push(desc);
    }

    /// Copies `data` into a free frame and queues it; false (counted) when none is free.
    #[inline]
    pub fn queue_copy(&mut self, data: &[u8]) -> bool {
        let Some(desc) = self.free.pop() else {
            self.no_free_frame += 1;
            return false;
        };
        // SAFETY: the frame came off the free stack, so userspace owns it exclusively.
        let room = unsafe { self.room(&desc) };
        let n = data.len().min(room.len());
        room[..n].copy_from_slice(&data[..n]);
        self.queue_tx(desc, n);
        true
    }

    /// Gives a frame back to the free stack.
    #[inline]
    pub fn recycle(&mut self, desc: FrameDesc) {
        self.free.push(desc);
    }

    /// Submits queued frames to the tx ring and kicks the kernel when it asks to be woken.
    pub fn flush_tx(&mut self) {
        if self.tx_pending.is_empty() {
            return;
        }
        // SAFETY: every pending descriptor is a frame of this UMEM owned by userspace, with
        // its length set; from here the kernel owns the ones produced.
        let sent = unsafe { self.tx.produce(&self.tx_pending) };
        for d in self.tx_pending.drain(..).skip(sent) {
            self.tx_ring_full += 1;
            self.free.push(d);
        }
        if sent > 0 && self.tx.needs_wakeup() {
            // Copy mode (veth) transmits at most `COPY_TX_BATCH` frames per system call (the
            // kernel's default TX budget) and leaves the rest in the ring: kick until the
            // kernel has taken everything, bounded by what was just produced.
            for _ in 0..sent.div_ceil(COPY_TX_BATCH) + 1 {
                let _ = self.tx.wakeup();
                if self.tx.nb_free_exact() >= self.tx_size {
                    break;
                }
            }
        }
    }

    /// Takes back frames the kernel finished sending.
    pub fn reap(&mut self) {
        let mut done = [FrameDesc::default(); 64];
        loop {
            // SAFETY: completed descriptors are frames of this UMEM the kernel is done with.
            let n = unsafe { self.cq.consume(&mut done) };
            self.free.extend_from_slice(&done[..n]);
            if n < done.len() {
                break;
            }
        }
    }

    /// Tops the fill ring up from the free stack, keeping half of the frames for copies in.
    pub fn refill(&mut self) {
        let keep = self.fill_target / 2;
        if self.free.len() <= keep {
            return;
        }
        let want = (self.free.len() - keep).min(self.fq.nb_free(self.fill_target as u32) as usize);
        if want == 0 {
            return;
        }
        let start = self.free.len() - want;
        // SAFETY: these frames are owned by userspace and unused; the kernel owns the ones
        // produced from here on.
        let n = unsafe { self.fq.produce(&self.free[start..]) };
        self.free.drain(start..start + n);
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
