//! The XDP program that decides which packets the kxdp dataplane sees.
//!
//! The dataplane reads packets from AF_XDP sockets, one per NIC queue. This
//! crate owns the small XDP program in front of those sockets
//! (`src/bpf/redirect.bpf.c`) and the API to load it, fill its maps, attach it
//! to an interface and take it off again.
//!
//! # What gets steered
//!
//! A packet goes to the AF_XDP socket of the queue it arrived on when it is
//! IPv4 (plain Ethernet or behind one 802.1Q tag) and its destination is in
//! the [`Direction::Dst`] prefixes (service VIPs, pod CIDRs, node addresses
//! for NodePorts) or its source is in the [`Direction::Src`] prefixes (replies
//! from backend pods). Everything else is the kernel's: ARP, IPv6, other IPv4,
//! frames too short or malformed to judge, and packets on a queue with no
//! socket. The program's only verdicts are `XDP_REDIRECT` and `XDP_PASS`:
//! it never drops. Every pass has a reason with its own counter
//! ([`Counters`]).
//!
//! # Attachment and restarts
//!
//! The program is attached through netlink, not through a BPF link, on
//! purpose: if the process dies the program stays on the interface, the
//! kernel removes the dead sockets from the socket map, and every packet falls
//! back to the kernel (counted as `passed_no_socket`). The next run finds the
//! stale program by its name ([`PROGRAM_NAME`]) and replaces it atomically
//! (see [`XdpRedirect::attach`]); a program with any other name is left alone
//! and reported as [`Error::ForeignProgram`]. Nothing is pinned in bpffs,
//! because `ip netns exec` hides it.
//!
//! Interface indexes are always those of the calling thread's network
//! namespace.

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::mem::{size_of, ManuallyDrop, MaybeUninit};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{libbpf_sys, MapCore, MapFlags, OpenObject, ProgramInput};

/// The generated libbpf-rs skeleton of `src/bpf/redirect.bpf.c`.
///
/// Generated code: its unsafe blocks are libbpf-cargo's, not ours, and carry
/// no `SAFETY:` comments.
#[allow(clippy::undocumented_unsafe_blocks, missing_docs)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/redirect.skel.rs"));
}

use skel::{RedirectSkel, RedirectSkelBuilder};

/// The name the kernel knows the program by (`bpf_prog_info.name`). A program
/// with this name found on an interface is taken to be a previous run's.
pub const PROGRAM_NAME: &str = "xdp_redirect";

/// Which address of a packet a prefix is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The destination address (map `steer_dst`): service VIPs, pod CIDRs,
    /// node addresses for NodePorts.
    Dst,
    /// The source address (map `steer_src`): pod CIDRs, so that replies from
    /// backend pods reach the dataplane.
    Src,
}

impl Direction {
    fn map_name(self) -> &'static str {
        match self {
            Direction::Dst => "steer_dst",
            Direction::Src => "steer_src",
        }
    }
}

/// An IPv4 prefix with no host bits set, e.g. `10.96.0.0/12`.
///
/// Ordered by address, then length, so listings are deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Prefix {
    /// A prefix of `len` bits starting at `addr`.
    ///
    /// Rejects `len > 32`, and addresses with bits set past `len`: the trie
    /// would ignore them, so `10.0.0.1/8` and `10.0.0.0/8` would be one entry
    /// and a listing would not give back what was added.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, Error> {
        if len > 32 {
            return Err(Error::InvalidPrefix { addr, len, reason: "length is more than 32" });
        }
        if u32::from(addr) & !mask(len) != 0 {
            return Err(Error::InvalidPrefix {
                addr,
                len,
                reason: "host bits are set past the prefix length",
            });
        }
        Ok(Prefix { addr, len })
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length in bits, 0..=32.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// The LPM trie key: `struct lpm_v4_key { u32 prefixlen; be32 addr; }`.
    fn key(&self) -> [u8; 8] {
        let mut key = [0u8; 8];
        key[..4].copy_from_slice(&u32::from(self.len).to_ne_bytes());
        key[4..].copy_from_slice(&self.addr.octets());
        key
    }

    fn from_key(key: &[u8]) -> Option<Self> {
        let len = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
        let octets: [u8; 4] = key.get(4..8)?.try_into().ok()?;
        Prefix::new(Ipv4Addr::from(octets), u8::try_from(len).ok()?).ok()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The netmask of a prefix length, as a host-order `u32`.
fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l => u32::MAX << (32 - u32::from(l.min(32))),
    }
}

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`). What production uses; needs
    /// driver support (veth has it).
    Native,
    /// In the generic network stack (`XDP_FLAGS_SKB_MODE`). Works on any
    /// interface, slowly; for tests and drivers without XDP.
    Generic,
}

impl AttachMode {
    fn flags(self) -> u32 {
        match self {
            AttachMode::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            AttachMode::Generic => libbpf_sys::XDP_FLAGS_SKB_MODE,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// An XDP verdict, as returned by a test run of the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `XDP_ABORTED`; the program never returns it.
    Aborted,
    /// `XDP_DROP`; the program never returns it.
    Drop,
    /// `XDP_PASS`: the packet goes to the kernel stack.
    Pass,
    /// `XDP_TX`; the program never returns it.
    Tx,
    /// `XDP_REDIRECT`: the packet goes to the queue's AF_XDP socket.
    Redirect,
    /// Any other return value.
    Other(u32),
}

impl From<u32> for Verdict {
    fn from(v: u32) -> Self {
        match v {
            libbpf_sys::XDP_ABORTED => Verdict::Aborted,
            libbpf_sys::XDP_DROP => Verdict::Drop,
            libbpf_sys::XDP_PASS => Verdict::Pass,
            libbpf_sys::XDP_TX => Verdict::Tx,
            libbpf_sys::XDP_REDIRECT => Verdict::Redirect,
            other => Verdict::Other(other),
        }
    }
}

/// Packet counts by outcome, summed over all CPUs since the program was
/// loaded. Every packet the program sees is counted exactly once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Ours, with a socket on the queue: handed to `bpf_redirect_map`.
    pub steered: u64,
    /// IPv4, but neither address is in a steering prefix.
    pub passed_not_ours: u64,
    /// Not IPv4 (ARP, IPv6, double-tagged, ...).
    pub passed_non_ipv4: u64,
    /// Too short or invalid to parse (Ethernet, 802.1Q or IPv4 header, or an
    /// IPv4 total length the frame does not hold).
    pub passed_malformed: u64,
    /// Ours, but no socket is set for the queue it arrived on.
    pub passed_no_socket: u64,
    /// Steering is off ([`XdpRedirect::set_draining`]).
    pub passed_draining: u64,
}

/// Counter slots, in the order of `enum counter` in `redirect.bpf.c`.
const COUNTER_SLOTS: u32 = 6;

impl Counters {
    /// All packets given to the kernel, whatever the reason.
    pub fn passed(&self) -> u64 {
        self.passed_not_ours
            + self.passed_non_ipv4
            + self.passed_malformed
            + self.passed_no_socket
            + self.passed_draining
    }

    /// All packets the program has seen.
    pub fn total(&self) -> u64 {
        self.steered + self.passed()
    }

    fn slot_mut(&mut self, slot: u32) -> &mut u64 {
        match slot {
            0 => &mut self.steered,
            1 => &mut self.passed_not_ours,
            2 => &mut self.passed_non_ipv4,
            3 => &mut self.passed_malformed,
            4 => &mut self.passed_no_socket,
            5 => &mut self.passed_draining,
            _ => unreachable!("counter slot {slot} has no field"),
        }
    }
}

/// Errors of this crate. Each message says what failed and on what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or loading the BPF object failed.
    #[error(
        "loading the {PROGRAM_NAME} XDP program failed (it needs root, or CAP_BPF and \
         CAP_NET_ADMIN, and a kernel with BPF and AF_XDP): {0}"
    )]
    Load(#[source] libbpf_rs::Error),
    /// The loaded object does not have the layout this crate was written for.
    #[error("the loaded {PROGRAM_NAME} program does not match this crate: {0}")]
    Layout(String),
    /// A prefix is not a valid IPv4 network.
    #[error("invalid prefix {addr}/{len}: {reason}")]
    InvalidPrefix {
        /// The address given.
        addr: Ipv4Addr,
        /// The length given.
        len: u8,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A queue index past the end of the socket map.
    #[error("queue {queue} is out of range: the socket map has {slots} slots (0..{slots})")]
    QueueOutOfRange {
        /// The queue given.
        queue: u32,
        /// The size of the socket map.
        slots: u32,
    },
    /// A BPF map operation failed.
    #[error("{op} on map {map} failed: {source}")]
    Map {
        /// What was being done, e.g. "insert 10.0.0.0/8".
        op: String,
        /// The map's name in `redirect.bpf.c`.
        map: &'static str,
        /// The error from libbpf.
        #[source]
        source: libbpf_rs::Error,
    },
    /// Running the program with `BPF_PROG_TEST_RUN` failed.
    #[error("test run of {PROGRAM_NAME} failed: {0}")]
    TestRun(#[source] libbpf_rs::Error),
    /// No interface has this index in the calling thread's namespace.
    #[error("no interface has index {ifindex} in this network namespace")]
    NoSuchInterface {
        /// The index given.
        ifindex: u32,
    },
    /// Another XDP program, not ours, is attached to the interface.
    #[error(
        "interface {ifname} (index {ifindex}) already has XDP program id {prog_id} \
         named {prog_name:?} attached in {mode} mode; it is not {PROGRAM_NAME}, so it was \
         left in place: remove it first (ip link set dev {ifname} xdp off)"
    )]
    ForeignProgram {
        /// The interface index.
        ifindex: u32,
        /// The interface name, or the index as text if it has none.
        ifname: String,
        /// The id of the program found there.
        prog_id: u32,
        /// Its name, as the kernel reports it.
        prog_name: String,
        /// The mode it is attached in: "native", "generic" or "offload".
        mode: &'static str,
    },
    /// This very program is already attached to the interface.
    #[error(
        "{PROGRAM_NAME} program id {prog_id} is already attached to interface {ifname} \
         (index {ifindex}) by this instance"
    )]
    AlreadyAttached {
        /// The interface index.
        ifindex: u32,
        /// The interface name.
        ifname: String,
        /// Our program's id.
        prog_id: u32,
    },
    /// An XDP netlink operation (query, attach, replace, detach) failed.
    #[error("{op} XDP on interface {ifname} (index {ifindex}) failed: {source}")]
    Netlink {
        /// What was being done, e.g. "attach (native mode)".
        op: String,
        /// The interface index.
        ifindex: u32,
        /// The interface name.
        ifname: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading information about a BPF program by id failed.
    #[error("reading information of BPF program id {prog_id} failed: {source}")]
    ProgInfo {
        /// The program id.
        prog_id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading information about our own loaded program failed.
    #[error("reading information of the loaded {PROGRAM_NAME} program failed: {0}")]
    OwnProgInfo(#[source] std::io::Error),
    /// Working with network namespaces failed (only when an [`Attachment`]
    /// is detached from a thread in another namespace).
    #[error("network namespace: {0}")]
    Netns(#[source] std::io::Error),
}

/// A loaded, unattached-until-asked instance of the XDP program and its maps.
///
/// Dropping it closes this process's handles; a program still attached (see
/// [`Attachment`]) keeps running with its maps.
pub struct XdpRedirect {
    // Declared (so dropped) before the storage it borrows; dropped by hand
    // in `Drop` to make the order explicit.
    skel: ManuallyDrop<RedirectSkel<'static>>,
    /// Heap slot holding the libbpf object the skeleton refers to. Owned
    /// here, freed in `Drop` after the skeleton.
    storage: NonNull<MaybeUninit<OpenObject>>,
}

// SAFETY: the skeleton is `Send` and `Sync` (libbpf-cargo marks it so: the
// libbpf object is not mutated after load and every map or program operation
// is a syscall on an fd). `storage` is only the skeleton's backing memory,
// never touched except to free it in `Drop`.
unsafe impl Send for XdpRedirect {}
// SAFETY: as above; all methods take `&self` and only issue syscalls.
unsafe impl Sync for XdpRedirect {}

/// Owns the heap slot for the libbpf object until `XdpRedirect` takes it.
struct Storage(NonNull<MaybeUninit<OpenObject>>);

impl Storage {
    fn new() -> Self {
        Storage(NonNull::from(Box::leak(Box::new(MaybeUninit::uninit()))))
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::leak` in `Storage::new`, and
        // this `Storage` is dropped only on error paths, after the skeleton
        // that borrowed the slot (declared later, so dropped earlier).
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl XdpRedirect {
    /// Opens and loads the program and its maps into the kernel. Nothing is
    /// attached: see [`attach`](Self::attach). Steering starts enabled, with
    /// no prefixes and no sockets.
    pub fn load() -> Result<Self, Error> {
        let storage = Storage::new();
        // SAFETY: `storage` is a fresh heap allocation, valid and unaliased
        // until it is freed. It is freed only after the skeleton is dropped:
        // on error below by drop order (`storage` is declared first), and on
        // success by `XdpRedirect::drop`. So the reference never dangles,
        // although it is typed 'static.
        let slot: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *storage.0.as_ptr() };
        let open = RedirectSkelBuilder::default().open(slot).map_err(Error::Load)?;
        let skel = open.load().map_err(Error::Load)?;

        let counters = skel.maps.counters.max_entries();
        if counters != COUNTER_SLOTS {
            return Err(Error::Layout(format!(
                "counters map has {counters} slots, expected {COUNTER_SLOTS}"
            )));
        }

        let storage = ManuallyDrop::new(storage);
        Ok(XdpRedirect { skel: ManuallyDrop::new(skel), storage: storage.0 })
    }

    /// The kernel's id of the loaded program.
    pub fn prog_id(&self) -> Result<u32, Error> {
        let info = prog_info(self.skel.progs.xdp_redirect.as_fd().as_raw_fd())
            .map_err(Error::OwnProgInfo)?;
        Ok(info.id)
    }

    fn trie(&self, dir: Direction) -> &libbpf_rs::MapMut<'static> {
        match dir {
            Direction::Dst => &self.skel.maps.steer_dst,
            Direction::Src => &self.skel.maps.steer_src,
        }
    }

    /// Steers packets whose `dir` address is in `net/len`. Adding a prefix
    /// that is already there is not an error.
    pub fn add_prefix(&self, dir: Direction, net: Ipv4Addr, len: u8) -> Result<(), Error> {
        let prefix = Prefix::new(net, len)?;
        self.trie(dir).update(&prefix.key(), &[1u8], MapFlags::ANY).map_err(|source| Error::Map {
            op: format!("insert {prefix}"),
            map: dir.map_name(),
            source,
        })
    }

    /// Stops steering by `net/len` (an exact entry, not every prefix inside
    /// it). Returns whether the prefix was there.
    pub fn remove_prefix(&self, dir: Direction, net: Ipv4Addr, len: u8) -> Result<bool, Error> {
        let prefix = Prefix::new(net, len)?;
        match self.trie(dir).delete(&prefix.key()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(false),
            Err(source) => {
                Err(Error::Map { op: format!("delete {prefix}"), map: dir.map_name(), source })
            }
        }
    }

    /// The prefixes for `dir`, sorted.
    pub fn prefixes(&self, dir: Direction) -> Result<Vec<Prefix>, Error> {
        let mut out = Vec::new();
        for key in self.trie(dir).keys() {
            let prefix = Prefix::from_key(&key).ok_or_else(|| {
                Error::Layout(format!(
                    "map {} holds a key that is not a prefix: {key:?}",
                    dir.map_name()
                ))
            })?;
            out.push(prefix);
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Makes the prefixes for `dir` exactly `want`, writing only what
    /// changed: first the additions, then the removals, so that an address
    /// covered both before and after is never unsteered in between. Returns
    /// `(added, removed)`.
    pub fn sync_prefixes(&self, dir: Direction, want: &[Prefix]) -> Result<(usize, usize), Error> {
        let have = self.prefixes(dir)?;
        let mut want = want.to_vec();
        want.sort_unstable();
        want.dedup();
        let mut added = 0;
        for p in want.iter().filter(|p| have.binary_search(p).is_err()) {
            self.add_prefix(dir, p.addr, p.len)?;
            added += 1;
        }
        let mut removed = 0;
        for p in have.iter().filter(|p| want.binary_search(p).is_err()) {
            if self.remove_prefix(dir, p.addr, p.len)? {
                removed += 1;
            }
        }
        Ok((added, removed))
    }

    /// The number of socket slots, i.e. queues `0..socket_slots()` can have
    /// a socket. Packets on higher queues always go to the kernel.
    pub fn socket_slots(&self) -> u32 {
        self.skel.maps.xsks.max_entries()
    }

    fn check_queue(&self, queue: u32) -> Result<(), Error> {
        let slots = self.socket_slots();
        if queue >= slots {
            return Err(Error::QueueOutOfRange { queue, slots });
        }
        Ok(())
    }

    /// Sends steered packets arriving on `queue` to the AF_XDP socket
    /// `xsk_fd`, replacing any socket there. The kernel checks that the fd is
    /// an AF_XDP socket with an RX ring and UMEM; the slot is emptied by the
    /// kernel when the socket closes.
    pub fn set_socket(&self, queue: u32, xsk_fd: RawFd) -> Result<(), Error> {
        self.check_queue(queue)?;
        self.skel
            .maps
            .xsks
            .update(&queue.to_ne_bytes(), &xsk_fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                op: format!("set socket fd {xsk_fd} for queue {queue}"),
                map: "xsks",
                source,
            })
    }

    /// Empties the socket slot of `queue`: its steered packets go to the
    /// kernel. Emptying an empty slot is not an error (the kernel does not
    /// tell the two apart for this map type).
    pub fn clear_socket(&self, queue: u32) -> Result<(), Error> {
        self.check_queue(queue)?;
        match self.skel.maps.xsks.delete(&queue.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Map {
                op: format!("clear socket of queue {queue}"),
                map: "xsks",
                source,
            }),
        }
    }

    /// With `true`, every packet goes to the kernel (counted as
    /// `passed_draining`) while the program stays attached; `false` resumes
    /// steering.
    pub fn set_draining(&self, drain: bool) -> Result<(), Error> {
        let value = u32::from(drain).to_ne_bytes();
        self.skel.maps.config.update(&0u32.to_ne_bytes(), &value, MapFlags::ANY).map_err(|source| {
            Error::Map { op: format!("set drain={drain}"), map: "config", source }
        })
    }

    /// Whether steering is off ([`set_draining`](Self::set_draining)).
    pub fn draining(&self) -> Result<bool, Error> {
        let map_err = |source| Error::Map { op: "read drain".into(), map: "config", source };
        let value = self
            .skel
            .maps
            .config
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err)?
            .ok_or_else(|| Error::Layout("config map has no slot 0".into()))?;
        let drain: [u8; 4] = value
            .get(..4)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Layout(format!("config value is {} bytes", value.len())))?;
        Ok(u32::from_ne_bytes(drain) != 0)
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        let mut out = Counters::default();
        for slot in 0..COUNTER_SLOTS {
            let per_cpu = self
                .skel
                .maps
                .counters
                .lookup_percpu(&slot.to_ne_bytes(), MapFlags::ANY)
                .map_err(|source| Error::Map {
                    op: format!("read counter slot {slot}"),
                    map: "counters",
                    source,
                })?
                .ok_or_else(|| Error::Layout(format!("counters map has no slot {slot}")))?;
            let mut sum = 0u64;
            for value in per_cpu {
                let bytes: [u8; 8] =
                    value.get(..8).and_then(|v| v.try_into().ok()).ok_or_else(|| {
                        Error::Layout(format!("counter value is {} bytes", value.len()))
                    })?;
                sum = sum.wrapping_add(u64::from_ne_bytes(bytes));
            }
            *out.slot_mut(slot) = sum;
        }
        Ok(out)
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN`, as if it
    /// arrived on queue 0 of the loopback interface, and returns its verdict.
    /// Counters move as for a real packet; nothing is actually redirected.
    /// For tests, fixtures and benchmarks.
    pub fn test_run(&self, frame: &[u8]) -> Result<Verdict, Error> {
        let input = ProgramInput { data_in: Some(frame), ..Default::default() };
        let out = self.skel.progs.xdp_redirect.test_run(input).map_err(Error::TestRun)?;
        Ok(Verdict::from(out.return_value))
    }

    /// Attaches the program to interface `ifindex` in `mode`, and returns the
    /// handle that detaches it when dropped.
    ///
    /// If the interface has no XDP program, ours is attached with
    /// `XDP_FLAGS_UPDATE_IF_NOEXIST`, so a program attached concurrently is
    /// never overwritten. If it has one named [`PROGRAM_NAME`] (left by a
    /// previous run that did not detach), that one is replaced: atomically
    /// when it is in the same mode, else by detaching it and attaching ours.
    /// Any other program is left alone and [`Error::ForeignProgram`] says
    /// which it is.
    pub fn attach(&self, ifindex: u32, mode: AttachMode) -> Result<Attachment, Error> {
        let ifname = ifname(ifindex).ok_or(Error::NoSuchInterface { ifindex })?;
        let prog_fd = self.skel.progs.xdp_redirect.as_fd().try_clone_to_owned().map_err(|e| {
            Error::Netlink {
                op: "duplicate program fd to attach".into(),
                ifindex,
                ifname: ifname.clone(),
                source: e,
            }
        })?;
        let prog_id = self.prog_id()?;
        let netns = Netns::current().map_err(Error::Netns)?;

        let attached = query(ifindex, &ifname)?;
        let mut replaced = false;
        for (slot_mode, slot_flags, old_id) in attached.slots() {
            if old_id == prog_id {
                return Err(Error::AlreadyAttached { ifindex, ifname, prog_id });
            }
            let name = prog_name(old_id)?;
            if name != PROGRAM_NAME {
                return Err(Error::ForeignProgram {
                    ifindex,
                    ifname,
                    prog_id: old_id,
                    prog_name: name,
                    mode: slot_mode,
                });
            }
            let old_fd = prog_fd_by_id(old_id)
                .map_err(|source| Error::ProgInfo { prog_id: old_id, source })?;
            if slot_flags == mode.flags() {
                // Same mode: swap in one step, so no packet meets an
                // interface without a program.
                xdp_attach(
                    ifindex,
                    prog_fd.as_raw_fd(),
                    mode.flags() | libbpf_sys::XDP_FLAGS_REPLACE,
                    old_fd.as_raw_fd(),
                )
                .map_err(|source| Error::Netlink {
                    op: format!("replace stale {PROGRAM_NAME} id {old_id} ({mode} mode) on"),
                    ifindex,
                    ifname: ifname.clone(),
                    source,
                })?;
                replaced = true;
            } else {
                // Native and generic programs cannot coexist on a device:
                // take the stale one off, ours goes on below.
                xdp_attach(ifindex, -1, slot_flags, old_fd.as_raw_fd()).map_err(|source| {
                    Error::Netlink {
                        op: format!(
                            "detach stale {PROGRAM_NAME} id {old_id} ({slot_mode} mode) from"
                        ),
                        ifindex,
                        ifname: ifname.clone(),
                        source,
                    }
                })?;
            }
        }
        if !replaced {
            xdp_attach(
                ifindex,
                prog_fd.as_raw_fd(),
                mode.flags() | libbpf_sys::XDP_FLAGS_UPDATE_IF_NOEXIST,
                0,
            )
            .map_err(|source| Error::Netlink {
                op: format!("attach {PROGRAM_NAME} ({mode} mode) to"),
                ifindex,
                ifname: ifname.clone(),
                source,
            })?;
        }
        Ok(Attachment { ifindex, ifname, mode, prog_id, prog_fd, netns, detached: false })
    }
}

impl Drop for XdpRedirect {
    fn drop(&mut self) {
        // SAFETY: `skel` is dropped exactly once, here, and not used after.
        unsafe { ManuallyDrop::drop(&mut self.skel) };
        // SAFETY: `storage` came from `Box::leak` in `Storage::new` and was
        // handed over by `load`; the skeleton that borrowed it is gone.
        drop(unsafe { Box::from_raw(self.storage.as_ptr()) });
    }
}

impl fmt::Debug for XdpRedirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpRedirect").field("prog_id", &self.prog_id().ok()).finish_non_exhaustive()
    }
}

/// The program attached to one interface. Dropping it detaches the program,
/// but only if it is still the one attached there; errors on drop are
/// ignored, use [`detach`](Self::detach) to see them.
///
/// Dropping it on a thread in another network namespace than the one it was
/// attached in is fine: the detach is done from the original namespace.
#[derive(Debug)]
pub struct Attachment {
    ifindex: u32,
    ifname: String,
    mode: AttachMode,
    prog_id: u32,
    prog_fd: OwnedFd,
    netns: Netns,
    detached: bool,
}

impl Attachment {
    /// The interface index (in the namespace it was attached in).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface name at attach time.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The attach mode.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The attached program's id.
    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }

    /// Detaches the program now. Succeeds with nothing done if the program
    /// is no longer the one attached (someone replaced or removed it).
    pub fn detach(mut self) -> Result<(), Error> {
        self.detached = true;
        self.detach_inner()
    }

    fn detach_inner(&self) -> Result<(), Error> {
        let run = || -> Result<(), Error> {
            // Look first, so the common "someone replaced us" case is a
            // quiet no-op; the expected-fd detach below still closes the
            // race with a replacement in between.
            if query(self.ifindex, &self.ifname)?.id(self.mode) != self.prog_id {
                return Ok(());
            }
            match xdp_attach(self.ifindex, -1, self.mode.flags(), self.prog_fd.as_raw_fd()) {
                Ok(()) => Ok(()),
                // EEXIST: the program there is not ours any more;
                // ENODEV: the interface is gone, and our program with it.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENODEV)) => Ok(()),
                Err(source) => Err(Error::Netlink {
                    op: format!("detach {PROGRAM_NAME} ({} mode) from", self.mode),
                    ifindex: self.ifindex,
                    ifname: self.ifname.clone(),
                    source,
                }),
            }
        };
        if self.netns.is_current().map_err(Error::Netns)? {
            return run();
        }
        // Another namespace: do it from a short-lived thread that enters the
        // original one, so the calling thread's namespace is left alone.
        std::thread::scope(|s| {
            s.spawn(|| {
                self.netns.enter().map_err(Error::Netns)?;
                run()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Netns(std::io::Error::other(
                    "the thread detaching in the original namespace panicked",
                )))
            })
        })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.detach_inner();
        }
    }
}

/// A handle on a network namespace: an open `/proc/thread-self/ns/net`.
#[derive(Debug)]
struct Netns {
    fd: OwnedFd,
    id: (u64, u64),
}

impl Netns {
    fn current() -> std::io::Result<Self> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let meta = file.metadata()?;
        Ok(Netns { id: (meta.dev(), meta.ino()), fd: file.into() })
    }

    fn is_current(&self) -> std::io::Result<bool> {
        let meta = std::fs::metadata("/proc/thread-self/ns/net")?;
        Ok((meta.dev(), meta.ino()) == self.id)
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: `fd` is an open namespace fd owned by `self`; setns only
        // changes the calling thread's namespace.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// XDP programs attached to one interface, by mode.
#[derive(Debug, Default, Clone, Copy)]
struct Attached {
    native: u32,
    generic: u32,
    offload: u32,
}

impl Attached {
    /// The program id in `mode`, 0 if none.
    fn id(&self, mode: AttachMode) -> u32 {
        match mode {
            AttachMode::Native => self.native,
            AttachMode::Generic => self.generic,
        }
    }

    /// `(mode name, mode flag, prog id)` of each occupied mode.
    fn slots(&self) -> impl Iterator<Item = (&'static str, u32, u32)> {
        [
            ("native", libbpf_sys::XDP_FLAGS_DRV_MODE, self.native),
            ("generic", libbpf_sys::XDP_FLAGS_SKB_MODE, self.generic),
            ("offload", libbpf_sys::XDP_FLAGS_HW_MODE, self.offload),
        ]
        .into_iter()
        .filter(|&(_, _, id)| id != 0)
    }
}

fn query(ifindex: u32, ifname: &str) -> Result<Attached, Error> {
    let mut opts = libbpf_sys::bpf_xdp_query_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_query_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    let ifindex_c = i32::try_from(ifindex).map_err(|_| Error::NoSuchInterface { ifindex })?;
    // SAFETY: `opts` is a valid, correctly sized bpf_xdp_query_opts that
    // outlives the call; libbpf only writes into it.
    let rc = unsafe { libbpf_sys::bpf_xdp_query(ifindex_c, 0, &mut opts) };
    if rc < 0 {
        return Err(Error::Netlink {
            op: "query".into(),
            ifindex,
            ifname: ifname.to_owned(),
            source: std::io::Error::from_raw_os_error(-rc),
        });
    }
    Ok(Attached { native: opts.drv_prog_id, generic: opts.skb_prog_id, offload: opts.hw_prog_id })
}

/// `bpf_xdp_attach` with an expected current program: `prog_fd` -1 detaches;
/// `old_prog_fd` 0 means "whatever is there".
fn xdp_attach(ifindex: u32, prog_fd: RawFd, flags: u32, old_prog_fd: RawFd) -> std::io::Result<()> {
    let ifindex =
        i32::try_from(ifindex).map_err(|_| std::io::Error::from_raw_os_error(libc::ENODEV))?;
    let opts = libbpf_sys::bpf_xdp_attach_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_attach_opts>() as libbpf_sys::size_t,
        old_prog_fd,
        ..Default::default()
    };
    // SAFETY: `opts` is a valid, correctly sized bpf_xdp_attach_opts that
    // outlives the call; the fds are plain integers the kernel validates.
    // libbpf sets XDP_FLAGS_REPLACE itself when `old_prog_fd` is nonzero.
    let rc = unsafe {
        if prog_fd < 0 {
            libbpf_sys::bpf_xdp_detach(ifindex, flags, &opts)
        } else {
            libbpf_sys::bpf_xdp_attach(ifindex, prog_fd, flags, &opts)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

/// The name of interface `ifindex` in the calling thread's namespace, or
/// `None` if there is none.
fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name in `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// An fd for program `prog_id`.
fn prog_fd_by_id(prog_id: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall wrapper; it returns a new fd or -errno.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(prog_id) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: `fd` is a fresh fd returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf_prog_info` of the program behind `fd`.
fn prog_info(fd: RawFd) -> std::io::Result<libbpf_sys::bpf_prog_info> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is a writable bpf_prog_info of `len` bytes; the kernel
    // writes at most `len` bytes into it, and no pointers are set in it, so
    // it writes nothing elsewhere.
    let rc = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(
            fd,
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok(info)
}

/// The kernel's name of program `prog_id` (at most 15 bytes).
fn prog_name(prog_id: u32) -> Result<String, Error> {
    let info = prog_fd_by_id(prog_id)
        .and_then(|fd| prog_info(fd.as_raw_fd()))
        .map_err(|source| Error::ProgInfo { prog_id, source })?;
    let bytes: Vec<u8> = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The id of the XDP program attached to interface `ifindex` (in any mode),
/// or `None`. For tools and tests.
pub fn attached_prog_id(ifindex: u32) -> Result<Option<u32>, Error> {
    let ifname = ifname(ifindex).ok_or(Error::NoSuchInterface { ifindex })?;
    let attached = query(ifindex, &ifname)?;
    Ok(attached.slots().map(|(_, _, id)| id).next())
}

/// Removes every XDP program from interface `ifindex`, in every mode,
/// whoever attached it. For tools and tests; the dataplane detaches through
/// its [`Attachment`].
pub fn detach(ifindex: u32) -> Result<(), Error> {
    let ifname = ifname(ifindex).ok_or(Error::NoSuchInterface { ifindex })?;
    let attached = query(ifindex, &ifname)?;
    for (mode, flags, id) in attached.slots() {
        xdp_attach(ifindex, -1, flags, 0).map_err(|source| Error::Netlink {
            op: format!("detach program id {id} ({mode} mode) from"),
            ifindex,
            ifname: ifname.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rejects_host_bits_and_long_lengths() {
        assert!(Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 8).is_ok());
        assert!(Prefix::new(Ipv4Addr::new(0, 0, 0, 0), 0).is_ok());
        assert!(Prefix::new(Ipv4Addr::new(10, 1, 2, 3), 32).is_ok());
        let err = Prefix::new(Ipv4Addr::new(10, 0, 0, 1), 8).unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let err = Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 33).unwrap_err();
        assert!(err.to_string().contains("more than 32"), "{err}");
        assert!(Prefix::new(Ipv4Addr::new(1, 0, 0, 0), 0).is_err());
    }

    #[test]
    fn prefix_contains_and_display() {
        let p = Prefix::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap();
        assert_eq!(p.to_string(), "10.96.0.0/12");
        assert!(p.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!p.contains(Ipv4Addr::new(10, 112, 0, 0)));
        let all = Prefix::new(Ipv4Addr::UNSPECIFIED, 0).unwrap();
        assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1)));
    }

    #[test]
    fn prefix_key_round_trips_with_the_c_layout() {
        let p = Prefix::new(Ipv4Addr::new(192, 168, 4, 0), 22).unwrap();
        let key = p.key();
        // struct lpm_v4_key { __u32 prefixlen; __be32 addr; }
        assert_eq!(&key[..4], &22u32.to_ne_bytes());
        assert_eq!(&key[4..], &[192, 168, 4, 0]);
        assert_eq!(
            size_of::<skel::types::lpm_v4_key>(),
            key.len(),
            "key size differs from the BTF of redirect.bpf.c"
        );
        assert_eq!(Prefix::from_key(&key), Some(p));
    }

    #[test]
    fn verdict_from_return_value() {
        assert_eq!(Verdict::from(2), Verdict::Pass);
        assert_eq!(Verdict::from(4), Verdict::Redirect);
        assert_eq!(Verdict::from(1), Verdict::Drop);
        assert_eq!(Verdict::from(99), Verdict::Other(99));
    }

    #[test]
    fn counters_totals() {
        let c = Counters {
            steered: 1,
            passed_not_ours: 2,
            passed_non_ipv4: 3,
            passed_malformed: 4,
            passed_no_socket: 5,
            passed_draining: 6,
        };
        assert_eq!(c.passed(), 20);
        assert_eq!(c.total(), 21);
        let mut d = Counters::default();
        for slot in 0..COUNTER_SLOTS {
            *d.slot_mut(slot) = u64::from(slot) + 1;
        }
        assert_eq!(c, d, "slot order must follow enum counter in redirect.bpf.c");
    }
}
