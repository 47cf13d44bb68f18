//! Test support: root gating, a network namespace guard, a bare AF_XDP
//! socket, an AF_PACKET sender, and frame builders.
//!
//! Everything here stays inside namespaces the tests create; nothing is sent
//! to an address outside them.

#![allow(dead_code)] // each test binary uses a different part of this

use std::ffi::CString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

/// Whether the tests can use BPF: we are root. Prints the skip line if not.
pub fn can_run_bpf() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("skipped: needs root and BPF");
    }
    root
}

/// Returns from the test, printing the skip line, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::can_run_bpf() {
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// Network namespaces

static NS_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace created for one test, deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    let out =
        Command::new("ip").args(args).output().expect("running ip(8); is iproute2 installed?");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates `kxdp-t-<pid>-<n>`.
    pub fn new() -> Self {
        let name =
            format!("kxdp-t-{}-{}", std::process::id(), NS_SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Adds a veth pair `a`/`b` inside the namespace, both up, with no
    /// IPv6 link-local addresses so the kernel sends nothing on its own.
    pub fn add_veth(&self, a: &str, b: &str) {
        self.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        for dev in [a, b] {
            self.ip(&["link", "set", dev, "addrgenmode", "none"]);
            self.ip(&["link", "set", dev, "up"]);
        }
    }

    /// Runs `f` on a new thread that has entered this namespace, so the
    /// test harness's threads stay where they are.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `file` is an open netns fd; setns only moves this
                // thread, which exists for this closure alone.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces, and with them any
        // XDP program still attached there.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}: {}", std::io::Error::last_os_error());
    idx
}

// ---------------------------------------------------------------------------
// AF_XDP

const FRAME_SIZE: u32 = 2048;
const FRAMES: u32 = 64;
const RING: u32 = 64;

/// One mapped XDP ring: producer and consumer indexes and descriptors.
struct Ring {
    map: NonNull<libc::c_void>,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    desc: *mut u8,
}

impl Ring {
    fn map(fd: RawFd, off: &libc::xdp_ring_offset, desc_size: usize, pgoff: u64) -> Self {
        let map_len = off.desc as usize + RING as usize * desc_size;
        // SAFETY: mapping a ring of a live AF_XDP socket at the page offset
        // the kernel defines for it, with the length it describes.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff as libc::off_t,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap ring: {}", std::io::Error::last_os_error());
        let base = map.cast::<u8>();
        // SAFETY: the offsets come from XDP_MMAP_OFFSETS and lie inside
        // the mapping; producer and consumer are u32 the kernel updates
        // concurrently, so they are only read through atomics.
        unsafe {
            Ring {
                map: NonNull::new(map).unwrap(),
                map_len,
                producer: base.add(off.producer as usize).cast(),
                consumer: base.add(off.consumer as usize).cast(),
                desc: base.add(off.desc as usize),
            }
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping, aligned by the kernel.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.consumer }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `Ring::map`.
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

/// A bare AF_XDP socket with its own small UMEM, fill ring and RX ring
/// (plus the completion and TX rings the kernel wants sized). Built on raw
/// syscalls so the tests need no libxdp.
pub struct Xsk {
    // Drop order is field order: rings unmapped, socket closed, then UMEM.
    fill: Option<Ring>,
    rx: Option<Ring>,
    fd: OwnedFd,
    umem: Umem,
}

fn setsockopt_u32(fd: RawFd, opt: libc::c_int, val: u32) {
    // SAFETY: passing a u32 of its own size to setsockopt.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            opt,
            (&val as *const u32).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
}

impl Xsk {
    /// Creates the socket, registers the UMEM and sizes the rings. The
    /// socket is not bound; [`bind`](Self::bind) does that.
    pub fn new() -> Self {
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket(AF_XDP): {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let umem_len = (FRAME_SIZE * FRAMES) as usize;
        // SAFETY: anonymous private mapping, no fd involved.
        let umem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(umem, libc::MAP_FAILED, "mmap umem: {}", std::io::Error::last_os_error());
        let umem = Umem { ptr: NonNull::new(umem).unwrap(), len: umem_len };

        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        // SAFETY: passing a valid xdp_umem_reg of its own size; the UMEM it
        // describes lives until `Drop`, after the socket is closed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_UMEM_REG,
                (&reg as *const libc::xdp_umem_reg).cast(),
                size_of::<libc::xdp_umem_reg>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "XDP_UMEM_REG: {}", std::io::Error::last_os_error());
        for opt in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            setsockopt_u32(fd.as_raw_fd(), opt, RING);
        }
        Xsk { fill: None, rx: None, fd, umem }
    }

    /// The socket's fd, for `XdpRedirect::set_socket`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Maps the fill and RX rings, gives every UMEM frame to the kernel and
    /// binds to `ifindex`/`queue` in copy mode.
    pub fn bind(&mut self, ifindex: u32, queue: u32) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: xdp_mmap_offsets is plain integers; all-zero is valid.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "XDP_MMAP_OFFSETS: {}", std::io::Error::last_os_error());

        let fill = Ring::map(fd, &off.fr, size_of::<u64>(), libc::XDP_UMEM_PGOFF_FILL_RING);
        let rx =
            Ring::map(fd, &off.rx, size_of::<libc::xdp_desc>(), libc::XDP_PGOFF_RX_RING as u64);
        let prod = fill.producer().load(Ordering::Relaxed);
        for i in 0..RING.min(FRAMES) {
            let slot = ((prod + i) & (RING - 1)) as usize;
            // SAFETY: `slot` < RING, inside the fill ring's descriptor area,
            // which the kernel does not read past the producer index.
            unsafe { fill.desc.cast::<u64>().add(slot).write(u64::from(i * FRAME_SIZE)) };
        }
        fill.producer().store(prod + RING.min(FRAMES), Ordering::Release);

        let sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `sa` is a valid sockaddr_xdp of the length given.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_xdp).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind AF_XDP: {}", std::io::Error::last_os_error());
        self.fill = Some(fill);
        self.rx = Some(rx);
    }

    /// Waits up to `timeout` for one frame on the RX ring and returns a copy.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let rx = self.rx.as_ref().expect("bind first");
        let deadline = Instant::now() + timeout;
        loop {
            let cons = rx.consumer().load(Ordering::Relaxed);
            let prod = rx.producer().load(Ordering::Acquire);
            if prod != cons {
                let slot = (cons & (RING - 1)) as usize;
                // SAFETY: the kernel published this descriptor (Acquire on
                // producer above); `slot` < RING.
                let desc = unsafe { rx.desc.cast::<libc::xdp_desc>().add(slot).read() };
                assert!(desc.addr as usize + desc.len as usize <= self.umem.len);
                // SAFETY: the descriptor lies inside the UMEM (checked just
                // above) and the kernel is done writing it.
                let frame = unsafe {
                    std::slice::from_raw_parts(
                        self.umem.ptr.as_ptr().cast::<u8>().add(desc.addr as usize),
                        desc.len as usize,
                    )
                }
                .to_vec();
                rx.consumer().store(cons + 1, Ordering::Release);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd =
                libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as libc::c_int) };
        }
    }
}

/// An anonymous mapping used as UMEM, unmapped on drop.
struct Umem {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `Xsk::new`; the
        // socket that registered it is closed by now (field order in `Xsk`).
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

// ---------------------------------------------------------------------------
// AF_PACKET sender

/// Sends raw Ethernet frames out of one interface.
pub struct PacketSender {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSender {
    /// An AF_PACKET socket for interface `ifindex` of the calling thread's
    /// namespace.
    pub fn new(ifindex: u32) -> Self {
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                0, // send only: receive nothing
            )
        };
        assert!(raw >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        PacketSender { fd, ifindex }
    }

    /// Sends `frame` as is.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain integers; all-zero is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` is readable for its length; `sa` is a valid
        // sockaddr_ll of the length given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
}

// ---------------------------------------------------------------------------
// Frames

/// Source MAC of test frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of test frames.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An Ethernet/IPv4/UDP frame from `src` to `dst` with `payload`.
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, 80);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// The same, behind an 802.1Q tag with VLAN id `vid`.
pub fn udp4_vlan(vid: u16, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .single_vlan(vid.try_into().unwrap())
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, 80);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// An Ethernet/IPv6/UDP frame.
pub fn udp6() -> Vec<u8> {
    let mut src = [0u8; 16];
    src[..2].copy_from_slice(&[0xfd, 0x00]);
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC).ipv6(src, dst, 64).udp(40000, 80);
    let mut out = Vec::with_capacity(builder.size(4));
    builder.write(&mut out, b"ping").unwrap();
    out
}

/// An ARP request for `target` from `sender` (built by hand: etherparse
/// 0.16 has no ARP builder).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}
