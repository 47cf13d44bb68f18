//! Queue and IRQ planning: which worker core serves each (interface, queue), and where each
//! queue's interrupt goes.
//!
//! # What is discovered
//!
//! [`discover`] reads sysfs and procfs under a root path (`/` in production, a fake tree in
//! tests), for each named interface:
//!
//! - `ifindex` from `/sys/class/net/IF/ifindex`;
//! - the driver, from the name the `/sys/class/net/IF/device/driver` symlink points to, and the
//!   bus id (PCI address, or `virtioN`) from the `device` symlink; a virtual device (veth,
//!   bridge, ...) has no `device` and so no driver, no NUMA node and no IRQs;
//! - receive and transmit queues from `/sys/class/net/IF/queues/{rx,tx}-N`; sysfs cannot tell
//!   a combined channel from a pair of rx and tx ones, so `combined` is `min(rx, tx)` unless
//!   the channel counts come from ethtool ([`discover_with`] and [`Ethtool`], behind the
//!   [`ChannelSource`] trait so that tests stay on fake trees);
//! - the NUMA node from `device/numa_node` (`-1` means none) and the CPUs local to the device
//!   from `device/local_cpulist` (or the node's `cpulist`), restricted to online CPUs;
//! - MSI IRQs from `device/msi_irqs/*` and, from `/proc/interrupts`, which of them serves
//!   which queue (below). For virtio the `device` is the virtio device: its PCI parent holds
//!   `msi_irqs`, `numa_node` and `local_cpulist`.
//!
//! [`Topology::discover`] reads the online CPUs (`/sys/devices/system/cpu/online`, a list
//! such as `0-3,6`) and each node's CPUs (`/sys/devices/system/node/nodeN/cpulist`).
//!
//! # How IRQs are matched to queues
//!
//! By name first, in `/proc/interrupts` (the last field of a line is the name the driver gave
//! the IRQ), for interface `IF`, driver `DRV`, PCI address `PCI`:
//!
//! | name                                   | drivers (examples)                 | queue  |
//! |----------------------------------------|------------------------------------|--------|
//! | `IF-TxRx-N`, `DRV-IF-TxRx-N`           | ixgbe, i40e, ice, iavf, bnxt, hns3 | rx+tx  |
//! | `IF-Tx-Rx-N`, `ena-IF-Tx-Rx-N`         | AWS ENA                            | rx+tx  |
//! | `IF-rxtx-N`, `IF-fp-N`, `IF-N`         | vmxnet3, bnx2x, sfc                | rx+tx  |
//! | `IF-rx-N` / `IF-tx-N`                  | igb, e1000e, ixgbe with split vectors | rx / tx |
//! | `mlx5_comp<N>@pci:PCI`                 | mlx5 (completion vector N)         | rx+tx  |
//! | `virtioK-input.N` / `virtioK-output.N` | virtio_net                         | rx / tx |
//! | `gve-ntfy-blk<N>@pci:PCI`              | Google gVNIC: the first half of the blocks serve tx queues, the second half rx | rx / tx |
//!
//! The middle word (`TxRx`, `rx`, ...) is compared without case. An IRQ must also be one of
//! the device's MSI IRQs when the device lists any, so a name can never pull in another
//! device's interrupt. When no name says anything (an unknown driver, a renamed interface
//! whose IRQs still carry the old name, an interface that is down so its IRQs are not
//! requested), IRQs are matched by MSI order: the device's MSI IRQs in ascending order,
//! without those whose names say they are not queues (`mgmnt`, `async`, `config`, `ctrl`,
//! `misc`, ...), give queue 0, 1, ... in turn. That is a guess and is marked as such
//! ([`IrqMatch::MsiOrder`], and a note in the plan). A queue may have several IRQs (split rx
//! and tx vectors); all of them follow the queue.
//!
//! # The balancing rule, and why
//!
//! [`plan`] gives every planned (interface, queue) one worker core so that the number of
//! queues per core differs by at most one between any two cores: exactly `total % cores` cores
//! carry `total / cores + 1` queues and the others `total / cores`. A worker's cost is
//! proportional to the traffic of its queues, and RSS spreads an interface's flows evenly
//! over its queues, but nothing tells us how busy each interface will be: so queues, not
//! interfaces, are what is balanced (8 + 4 + 2 queues over 3 cores gives 5/5/4, not 8/4/2).
//! Within that hard bound the choice for each queue prefers, in order:
//!
//! 1. a core local to the interface's NUMA node (DMA, rings and packet memory stay on the
//!    node; a remote core pays cross-node latency for every frame);
//! 2. a core that has fewer of this interface's queues (so one interface's queues, and its
//!    flows, spread over cores rather than piling up on one);
//! 3. the least loaded core, then the earliest in the `workers` list.
//!
//! Interfaces are placed one after the other, those with a known NUMA node first (they have a
//! preference to honour; the others fit anywhere), then the larger ones first, then by name:
//! a greedy placement, not a proven optimum, but one that is deterministic and independent of
//! the order interfaces are given in.
//!
//! A queue's IRQs go to the queue's worker core, so the softirq that fills and drains its rings
//! runs where the worker reads them. With a housekeeping set, they go round-robin over it
//! instead, leaving worker cores to busy-poll without interrupts.
//!
//! # Invariants
//!
//! - Every queue of every interface's `queues` is in the plan exactly once, on a core of
//!   `workers` (none when `workers` is empty, with a note).
//! - Queue counts per core differ by at most one.
//! - An IRQ is planned at most once (an IRQ shared by two queues follows the first).
//! - The plan depends only on the set of interfaces (not their order), the worker list and the
//!   housekeeping list; rows are sorted by interface name, ifindex and queue.
//!
//! # Applying
//!
//! [`apply`] writes each IRQ's CPU to `/proc/irq/N/smp_affinity_list`. An IRQ that is gone or
//! whose affinity the kernel refuses (managed IRQs, offline CPU) is reported in the
//! [`ApplyReport`], not fatal: traffic still flows, only less well placed. irqbalance, if it
//! runs, moves IRQs back; ban them from it (`--banirq`, or `IRQBALANCE_BANNED_CPULIST` for the
//! worker cores). Channel counts are not changed here (no `ethtool -L`): the plan uses the
//! queues the interfaces have.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why discovery or applying could not be done at all.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The interface has no directory under `sys/class/net`.
    #[error("interface {0} not found ({1} does not exist)")]
    NoInterface(String, PathBuf),
    /// A file that must be there could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A file's content is not what the kernel writes.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The plan has IRQs but there is no `proc/irq` to write them to.
    #[error("{0} does not exist: is procfs mounted?")]
    NoProcIrq(PathBuf),
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

/// What an IRQ serves on its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IrqKind {
    /// Both directions (a combined channel).
    TxRx,
    /// Receive only.
    Rx,
    /// Transmit only.
    Tx,
}

/// How an IRQ was matched to its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IrqMatch {
    /// Its name in `/proc/interrupts` says which queue it serves.
    Name,
    /// A guess from the order of the device's MSI IRQs (names said nothing).
    MsiOrder,
}

/// One IRQ of an interface and the queue it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueIrq {
    /// Queue index.
    pub queue: u32,
    /// IRQ number.
    pub irq: u32,
    /// Direction(s) served.
    pub kind: IrqKind,
    /// Name in `/proc/interrupts`, when listed there.
    pub name: Option<String>,
    /// How it was matched.
    pub matched: IrqMatch,
}

/// Channel counts as `ethtool -l` reports them (`ETHTOOL_GCHANNELS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EthtoolChannels {
    /// Most receive-only channels.
    pub max_rx: u32,
    /// Most transmit-only channels.
    pub max_tx: u32,
    /// Most other channels (link, management).
    pub max_other: u32,
    /// Most combined channels.
    pub max_combined: u32,
    /// Receive-only channels.
    pub rx: u32,
    /// Transmit-only channels.
    pub tx: u32,
    /// Other channels.
    pub other: u32,
    /// Combined channels.
    pub combined: u32,
}

/// Where channel counts come from, besides sysfs.
pub trait ChannelSource {
    /// The interface's channels, or `None` when unknown (no such interface, not supported).
    fn channels(&self, iface: &str) -> Option<EthtoolChannels>;
}

/// No channel source: sysfs queue counts only.
#[derive(Clone, Copy, Debug, Default)]
pub struct SysfsOnly;

impl ChannelSource for SysfsOnly {
    fn channels(&self, _iface: &str) -> Option<EthtoolChannels> {
        None
    }
}

/// The `ETHTOOL_GCHANNELS` ioctl, in the calling thread's network namespace. Needs no
/// privilege; devices without channel support (veth before 5.x, lo) answer `None`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ethtool;

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Default)]
struct RawChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx: u32,
    tx: u32,
    other: u32,
    combined: u32,
}

/// One `SIOCETHTOOL` channels request (`cmd` in `raw`) on `iface`, in the calling thread's
/// network namespace.
fn channels_ioctl(iface: &str, raw: &mut RawChannels) -> std::io::Result<()> {
    const SIOCETHTOOL: u64 = 0x8946;
    /// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit).
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let bytes = iface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], data: (raw as *mut RawChannels).cast(), _pad: [0; 16] };
    for (d, s) in req.name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns; OwnedFd closes it once.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `req` is a valid ifreq whose NUL-terminated name fits IFNAMSIZ and whose data
    // pointer points to `raw`, a live `struct ethtool_channels`; both outlive the call.
    let rc = unsafe {
        libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), SIOCETHTOOL as _, &mut req as *mut IfReq)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const ETHTOOL_SCHANNELS: u32 = 0x3d;

impl ChannelSource for Ethtool {
    fn channels(&self, iface: &str) -> Option<EthtoolChannels> {
        let mut raw = RawChannels { cmd: ETHTOOL_GCHANNELS, ..RawChannels::default() };
        channels_ioctl(iface, &mut raw).ok()?;
        Some(EthtoolChannels {
            max_rx: raw.max_rx,
            max_tx: raw.max_tx,
            max_other: raw.max_other,
            max_combined: raw.max_combined,
            rx: raw.rx,
            tx: raw.tx,
            other: raw.other,
            combined: raw.combined,
        })
    }
}

/// What [`set_channels`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelChange {
    /// The interface already had that many.
    Unchanged,
    /// Changed from `before` queue pairs.
    Set {
        /// The count before.
        before: u32,
    },
}

/// What a channel request should be for a device: `Ok(None)` when it already has `want`
/// queue pairs, `Ok(Some(new))` for the `ETHTOOL_SCHANNELS` settings, or why the driver
/// cannot. Drivers with combined channels (most NICs, ENA, virtio) get `combined = want`;
/// those with separate rx and tx counts only (veth) get both set to `want`.
pub fn channel_request(
    have: &EthtoolChannels,
    want: u32,
) -> Result<Option<EthtoolChannels>, String> {
    if want == 0 {
        return Err("0 channels asked for".into());
    }
    if have.max_combined > 0 {
        if want > have.max_combined {
            return Err(format!(
                "the driver allows at most {} combined channels",
                have.max_combined
            ));
        }
        if have.combined == want {
            return Ok(None);
        }
        return Ok(Some(EthtoolChannels { combined: want, ..*have }));
    }
    if have.max_rx > 0 && have.max_tx > 0 {
        let most = have.max_rx.min(have.max_tx);
        if want > most {
            return Err(format!(
                "the driver allows at most {} rx and {} tx channels",
                have.max_rx, have.max_tx
            ));
        }
        if have.rx == want && have.tx == want {
            return Ok(None);
        }
        return Ok(Some(EthtoolChannels { rx: want, tx: want, ..*have }));
    }
    Err("the driver reports no adjustable channels".into())
}

/// Sets `iface` to `want` queue pairs (`ethtool -L`) where its driver allows it, in the
/// calling thread's network namespace; needs CAP_NET_ADMIN. An error says why not (no such
/// device, the driver cannot change channels, more than its maximum).
pub fn set_channels(iface: &str, want: u32) -> Result<ChannelChange, String> {
    let have = Ethtool.channels(iface).ok_or_else(|| {
        format!("{iface}: the driver does not report channels (ETHTOOL_GCHANNELS)")
    })?;
    let Some(new) = channel_request(&have, want)? else {
        return Ok(ChannelChange::Unchanged);
    };
    let mut raw = RawChannels {
        cmd: ETHTOOL_SCHANNELS,
        max_rx: new.max_rx,
        max_tx: new.max_tx,
        max_other: new.max_other,
        max_combined: new.max_combined,
        rx: new.rx,
        tx: new.tx,
        other: new.other,
        combined: new.combined,
    };
    channels_ioctl(iface, &mut raw).map_err(|e| format!("{iface}: ETHTOOL_SCHANNELS: {e}"))?;
    let before = if have.max_combined > 0 { have.combined } else { have.rx.min(have.tx) };
    Ok(ChannelChange::Set { before })
}

/// What discovery found about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceInfo {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Driver (`device/driver` symlink name); `None` for virtual devices.
    pub driver: Option<String>,
    /// Bus id of the device: PCI address, or `virtioN`.
    pub bus_id: Option<String>,
    /// Receive queues in sysfs.
    pub rx_queues: u32,
    /// Transmit queues in sysfs.
    pub tx_queues: u32,
    /// Combined channels: ethtool's count when known, else `min(rx_queues, tx_queues)`.
    pub combined: u32,
    /// Channel counts from ethtool, when a [`ChannelSource`] gave them.
    pub ethtool: Option<EthtoolChannels>,
    /// The receive queues to plan, ascending: all of them after discovery; a caller may
    /// narrow this to the configured subset before planning.
    pub queues: Vec<u32>,
    /// NUMA node of the device (`None`: unknown, or `-1` in sysfs).
    pub numa_node: Option<u32>,
    /// Online CPUs local to the device (empty when the NUMA node is unknown).
    pub local_cpus: Vec<usize>,
    /// MSI IRQs of the device, ascending.
    pub msi_irqs: Vec<u32>,
    /// IRQs matched to queues, sorted by (queue, irq).
    pub irqs: Vec<QueueIrq>,
}

impl IfaceInfo {
    /// An interface with `queues` receive and transmit queues and nothing else known (no
    /// device, no NUMA node, no IRQs), as a veth is.
    pub fn new(name: &str, ifindex: u32, queues: u32) -> IfaceInfo {
        IfaceInfo {
            name: name.to_string(),
            ifindex,
            rx_queues: queues,
            tx_queues: queues,
            combined: queues,
            queues: (0..queues).collect(),
            ..IfaceInfo::default()
        }
    }

    /// The IRQs serving `queue`.
    pub fn irqs_of(&self, queue: u32) -> impl Iterator<Item = &QueueIrq> {
        self.irqs.iter().filter(move |i| i.queue == queue)
    }
}

/// Online CPUs and NUMA nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Online CPUs, ascending.
    pub online: Vec<usize>,
    /// CPUs of each NUMA node, ascending.
    pub nodes: BTreeMap<u32, Vec<usize>>,
}

impl Topology {
    /// Reads `sys/devices/system/cpu/online` and `sys/devices/system/node/node*/cpulist` under
    /// `root`. A machine without the node directory has no NUMA nodes.
    pub fn discover(root: &Path) -> Result<Topology, PlanError> {
        let path = root.join("sys/devices/system/cpu/online");
        let online = parse_cpu_list(&read(&path)?).map_err(|msg| PlanError::Parse { path, msg })?;
        let mut nodes = BTreeMap::new();
        if let Ok(dir) = fs::read_dir(root.join("sys/devices/system/node")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let path = e.path().join("cpulist");
                let cpus =
                    parse_cpu_list(&read(&path)?).map_err(|msg| PlanError::Parse { path, msg })?;
                nodes.insert(n, cpus);
            }
        }
        Ok(Topology { online, nodes })
    }

    /// The NUMA node of `cpu`.
    pub fn node_of(&self, cpu: usize) -> Option<u32> {
        self.nodes.iter().find(|(_, c)| c.contains(&cpu)).map(|(n, _)| *n)
    }
}

/// Parses a kernel CPU list (`0-3,6,8-9`; empty means none) into ascending, distinct CPUs.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("bad CPU list {s:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 1 << 16 {
                    return Err(format!("bad CPU range {part:?} in {s:?}"));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(part)?);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Formats CPUs as a kernel CPU list, ranges collapsed (`0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let set: BTreeSet<usize> = cpus.iter().copied().collect();
    let mut out: Vec<String> = Vec::new();
    let mut it = set.into_iter().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b += 1;
            it.next();
        }
        out.push(if a == b { a.to_string() } else { format!("{a}-{b}") });
    }
    out.join(",")
}

/// Parses `/proc/interrupts` into (irq, name) for the numbered lines; the name is the line's
/// last field.
pub fn parse_interrupts(text: &str) -> Vec<(u32, String)> {
    let mut lines = text.lines();
    let ncpu = lines.next().map_or(0, |h| h.split_whitespace().count());
    let mut out = Vec::new();
    for line in lines {
        let Some((irq, rest)) = line.split_once(':') else { continue };
        let Ok(irq) = irq.trim().parse::<u32>() else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Counts, then chip, hwirq and type, then the name: no name without all of them.
        if fields.len() <= ncpu {
            continue;
        }
        if let Some(name) = fields.last() {
            out.push((irq, name.trim_end_matches(',').to_string()));
        }
    }
    out
}

/// What an IRQ name is matched against.
struct Matcher<'a> {
    iface: &'a str,
    driver: Option<&'a str>,
    bus_id: Option<&'a str>,
}

impl Matcher<'_> {
    /// The queue and kind an IRQ name gives, for the patterns whose queue needs no context.
    fn queue_of(&self, name: &str) -> Option<(u32, IrqKind)> {
        let digits = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
        };
        if let (Some(rest), Some(pci)) = (name.strip_prefix("mlx5_comp"), self.bus_id) {
            let (n, at) = rest.split_once("@pci:")?;
            return (at == pci).then(|| digits(n).map(|n| (n, IrqKind::TxRx)))?;
        }
        if let Some(v) = self.bus_id.filter(|b| b.starts_with("virtio")) {
            if let Some(rest) = name.strip_prefix(v).and_then(|r| r.strip_prefix('-')) {
                if let Some(n) = rest.strip_prefix("input.") {
                    return digits(n).map(|n| (n, IrqKind::Rx));
                }
                if let Some(n) = rest.strip_prefix("output.") {
                    return digits(n).map(|n| (n, IrqKind::Tx));
                }
            }
        }
        let prefixes = [self.driver, Some("ena"), None];
        for p in prefixes {
            let rest = match p {
                Some(p) => match name.strip_prefix(p).and_then(|r| r.strip_prefix('-')) {
                    Some(r) => r,
                    None => continue,
                },
                None => name,
            };
            let Some(tail) = rest.strip_prefix(self.iface).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            if let Some(n) = digits(tail) {
                return Some((n, IrqKind::TxRx));
            }
            let (word, n) = tail.rsplit_once('-')?;
            let n = digits(n)?;
            let kind = match word.to_ascii_lowercase().as_str() {
                "txrx" | "tx-rx" | "rxtx" | "rx-tx" | "fp" | "combined" => IrqKind::TxRx,
                "rx" => IrqKind::Rx,
                "tx" => IrqKind::Tx,
                _ => return None,
            };
            return Some((n, kind));
        }
        None
    }

    /// `gve-ntfy-blk<N>@pci:<PCI>` of this device: the block number.
    fn gve_block(&self, name: &str) -> Option<u32> {
        let (n, at) = name.strip_prefix("gve-ntfy-blk")?.split_once("@pci:")?;
        (Some(at) == self.bus_id).then(|| n.parse().ok())?
    }
}

/// Names of MSI IRQs that serve no queue.
fn is_non_queue_name(name: &str) -> bool {
    const WORDS: [&str; 10] =
        ["mgmnt", "mgmt", "async", "config", "ctrl", "misc", "admin", "-aq", "link", "pages"];
    let n = name.to_ascii_lowercase();
    WORDS.iter().any(|w| n.contains(w))
}

/// Matches the device's IRQs to its queues (see the module docs).
fn match_irqs(
    m: &Matcher<'_>,
    msi: &[u32],
    interrupts: &[(u32, String)],
    queues: &[u32],
) -> Vec<QueueIrq> {
    let of_device = |irq: u32| msi.is_empty() || msi.binary_search(&irq).is_ok();
    let mut out = Vec::new();
    let mut gve = Vec::new();
    for (irq, name) in interrupts.iter().filter(|(irq, _)| of_device(*irq)) {
        if let Some((queue, kind)) = m.queue_of(name) {
            let name = Some(name.clone());
            out.push(QueueIrq { queue, irq: *irq, kind, name, matched: IrqMatch::Name });
        } else if let Some(b) = m.gve_block(name) {
            gve.push((b, *irq, name.clone()));
        }
    }
    if out.is_empty() && !gve.is_empty() {
        // gve: tx queue i uses block i, rx queue i block (blocks / 2 + i).
        let half = gve.len() as u32 / 2;
        for (b, irq, name) in gve {
            let (queue, kind) = if b < half { (b, IrqKind::Tx) } else { (b - half, IrqKind::Rx) };
            out.push(QueueIrq { queue, irq, kind, name: Some(name), matched: IrqMatch::Name });
        }
    }
    if out.is_empty() && !msi.is_empty() {
        let names: BTreeMap<u32, &str> = interrupts.iter().map(|(i, n)| (*i, n.as_str())).collect();
        let candidates = msi.iter().filter(|irq| match names.get(irq) {
            Some(n) => !is_non_queue_name(n),
            // Not listed: not requested, unless there is no /proc/interrupts at all.
            None => interrupts.is_empty(),
        });
        for (&queue, &irq) in queues.iter().zip(candidates) {
            out.push(QueueIrq {
                queue,
                irq,
                kind: IrqKind::TxRx,
                name: names.get(&irq).map(|n| n.to_string()),
                matched: IrqMatch::MsiOrder,
            });
        }
    }
    out.sort_by_key(|i| (i.queue, i.irq));
    out.dedup_by_key(|i| i.irq);
    out
}

fn read(path: &Path) -> Result<String, PlanError> {
    fs::read_to_string(path).map_err(|source| PlanError::Read { path: path.to_path_buf(), source })
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Queue indices of one direction (`rx` or `tx`) under `queues/`, ascending.
fn sysfs_queues(dir: &Path, prefix: &str) -> Vec<u32> {
    let mut q: Vec<u32> = fs::read_dir(dir.join("queues"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    q.sort_unstable();
    q
}

/// Discovers the named interfaces under `root` from sysfs and procfs only.
pub fn discover<S: AsRef<str>>(root: &Path, names: &[S]) -> Result<Vec<IfaceInfo>, PlanError> {
    discover_with(root, names, &SysfsOnly)
}

/// Discovers the named interfaces under `root`, channel counts also from `channels`.
pub fn discover_with<S: AsRef<str>>(
    root: &Path,
    names: &[S],
    channels: &dyn ChannelSource,
) -> Result<Vec<IfaceInfo>, PlanError> {
    let topo = Topology::discover(root).unwrap_or_default();
    let interrupts = fs::read_to_string(root.join("proc/interrupts"))
        .map(|t| parse_interrupts(&t))
        .unwrap_or_default();
    names.iter().map(|n| discover_one(root, n.as_ref(), &topo, &interrupts, channels)).collect()
}

fn discover_one(
    root: &Path,
    name: &str,
    topo: &Topology,
    interrupts: &[(u32, String)],
    channels: &dyn ChannelSource,
) -> Result<IfaceInfo, PlanError> {
    let dir = root.join("sys/class/net").join(name);
    if !dir.is_dir() {
        return Err(PlanError::NoInterface(name.to_string(), dir));
    }
    let path = dir.join("ifindex");
    let ifindex = read(&path)?
        .trim()
        .parse()
        .map_err(|_| PlanError::Parse { path, msg: "not an interface index".into() })?;
    let rx = sysfs_queues(&dir, "rx-");
    let tx = sysfs_queues(&dir, "tx-");
    let ethtool = channels.channels(name);
    let mut info = IfaceInfo {
        name: name.to_string(),
        ifindex,
        rx_queues: rx.len() as u32,
        tx_queues: tx.len() as u32,
        combined: ethtool.map_or(rx.len().min(tx.len()) as u32, |c| c.combined),
        ethtool,
        queues: rx,
        ..IfaceInfo::default()
    };
    let device = dir.join("device");
    let Ok(real) = fs::canonicalize(&device) else {
        return Ok(info); // virtual: no device, no IRQs
    };
    info.driver = link_name(&device.join("driver"));
    info.bus_id = real.file_name().map(|n| n.to_string_lossy().into_owned());
    // virtio: the PCI function above the virtio device holds the interesting attributes.
    let attr_dir = match (&info.bus_id, real.parent()) {
        (Some(b), Some(parent)) if b.starts_with("virtio") => parent.to_path_buf(),
        _ => real.clone(),
    };
    info.numa_node = fs::read_to_string(attr_dir.join("numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok());
    if let Some(node) = info.numa_node {
        let local = fs::read_to_string(attr_dir.join("local_cpulist"))
            .ok()
            .and_then(|s| parse_cpu_list(&s).ok())
            .or_else(|| topo.nodes.get(&node).cloned())
            .unwrap_or_default();
        info.local_cpus = if topo.online.is_empty() {
            local
        } else {
            local.into_iter().filter(|c| topo.online.contains(c)).collect()
        };
    }
    let mut msi: Vec<u32> = fs::read_dir(attr_dir.join("msi_irqs"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    msi.sort_unstable();
    let m = Matcher { iface: name, driver: info.driver.as_deref(), bus_id: info.bus_id.as_deref() };
    info.irqs = match_irqs(&m, &msi, interrupts, &info.queues);
    info.msi_irqs = msi;
    Ok(info)
}

// ---------------------------------------------------------------------------------------------
// Planning
// ---------------------------------------------------------------------------------------------

/// One queue's place in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePlan {
    /// Interface name.
    pub iface: String,
    /// Interface index.
    pub ifindex: u32,
    /// Queue index.
    pub queue: u32,
    /// Worker index (position of `core` in [`Plan::workers`]).
    pub worker: usize,
    /// Core of that worker.
    pub core: usize,
    /// The queue's IRQs that this plan pins (empty: none, as on veth).
    pub irqs: Vec<u32>,
    /// NUMA node of the interface.
    pub numa: Option<u32>,
    /// Whether `core` is local to the interface (`None`: NUMA node unknown).
    pub local: Option<bool>,
}

/// One IRQ's place in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqPlan {
    /// IRQ number.
    pub irq: u32,
    /// Interface it serves.
    pub iface: String,
    /// Queue it serves.
    pub queue: u32,
    /// Direction(s).
    pub kind: IrqKind,
    /// Name in `/proc/interrupts`.
    pub name: Option<String>,
    /// How it was matched to the queue.
    pub matched: IrqMatch,
    /// The CPU it is pinned to.
    pub cpu: usize,
}

/// Which core serves each queue and where each IRQ goes. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Worker cores; a worker's index is its position here.
    pub workers: Vec<usize>,
    /// Housekeeping cores taking the IRQs, if any.
    pub housekeeping: Option<Vec<usize>>,
    /// Every planned queue, sorted by (interface name, ifindex, queue).
    pub queues: Vec<QueuePlan>,
    /// Every IRQ to pin, in the order of `queues`.
    pub irqs: Vec<IrqPlan>,
    /// What an operator should know (guessed IRQs, no IRQs, remote cores, conflicts).
    pub notes: Vec<String>,
}

impl Plan {
    /// Queues per worker, by worker index.
    pub fn load(&self) -> Vec<usize> {
        let mut l = vec![0; self.workers.len()];
        for q in &self.queues {
            if let Some(n) = l.get_mut(q.worker) {
                *n += 1;
            }
        }
        l
    }

    /// The queues of worker `worker`.
    pub fn queues_of(&self, worker: usize) -> impl Iterator<Item = &QueuePlan> {
        self.queues.iter().filter(move |q| q.worker == worker)
    }

    /// The core serving `queue` of `iface`.
    pub fn core_of(&self, iface: &str, queue: u32) -> Option<usize> {
        self.queues.iter().find(|q| q.iface == iface && q.queue == queue).map(|q| q.core)
    }
}

/// Assigns every (interface, queue) to a worker core and every queue IRQ to a CPU; see the
/// module docs for the rule. `workers` are cores (duplicates ignored); `housekeeping`, when
/// given and not empty, takes the IRQs round-robin instead of the worker cores.
pub fn plan(ifaces: &[IfaceInfo], workers: &[usize], housekeeping: Option<&[usize]>) -> Plan {
    let mut cores: Vec<usize> = Vec::with_capacity(workers.len());
    for &c in workers {
        if !cores.contains(&c) {
            cores.push(c);
        }
    }
    let mut notes = Vec::new();
    let housekeeping: Option<Vec<usize>> = match housekeeping {
        Some([]) => {
            notes.push("empty housekeeping set: IRQs follow their queues' workers".to_string());
            None
        }
        Some(h) => {
            let mut v: Vec<usize> = Vec::new();
            for &c in h {
                if !v.contains(&c) {
                    v.push(c);
                }
            }
            let both: Vec<usize> = v.iter().copied().filter(|c| cores.contains(c)).collect();
            if !both.is_empty() {
                notes.push(format!(
                    "housekeeping cores {} are also worker cores: their workers take interrupts",
                    format_cpu_list(&both)
                ));
            }
            Some(v)
        }
        None => None,
    };
    let queue_lists: Vec<Vec<u32>> = ifaces
        .iter()
        .map(|i| {
            let mut q = i.queues.clone();
            q.sort_unstable();
            q.dedup();
            q
        })
        .collect();
    let total: usize = queue_lists.iter().map(Vec::len).sum();
    if cores.is_empty() {
        if total > 0 {
            notes.push(format!("no worker cores: {total} queues left unassigned"));
        }
        return Plan { workers: cores, housekeeping, queues: Vec::new(), irqs: Vec::new(), notes };
    }

    // Queue placement under the balance bound.
    let w = cores.len();
    let (base, extra) = (total / w, total % w);
    let mut load = vec![0usize; w];
    let mut above_base = 0usize;
    let mut order: Vec<usize> = (0..ifaces.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&ifaces[a], &ifaces[b]);
        (x.local_cpus.is_empty(), std::cmp::Reverse(queue_lists[a].len()), &x.name, x.ifindex).cmp(
            &(y.local_cpus.is_empty(), std::cmp::Reverse(queue_lists[b].len()), &y.name, y.ifindex),
        )
    });
    let mut rows = Vec::with_capacity(total);
    for &i in &order {
        let iface = &ifaces[i];
        let local = |k: usize| iface.local_cpus.contains(&cores[k]);
        let mut mine = vec![0usize; w];
        let mut remote = 0;
        for &queue in &queue_lists[i] {
            let k = (0..w)
                .filter(|&k| load[k] < base || (load[k] == base && above_base < extra))
                .min_by_key(|&k| (!local(k), mine[k], load[k], k))
                .expect("the slots add up to the queue count");
            if load[k] == base {
                above_base += 1;
            }
            load[k] += 1;
            mine[k] += 1;
            let is_local = (!iface.local_cpus.is_empty()).then(|| local(k));
            remote += usize::from(is_local == Some(false));
            rows.push(QueuePlan {
                iface: iface.name.clone(),
                ifindex: iface.ifindex,
                queue,
                worker: k,
                core: cores[k],
                irqs: Vec::new(),
                numa: iface.numa_node,
                local: is_local,
            });
        }
        if remote > 0 {
            notes.push(format!(
                "{}: {remote} of {} queues on cores outside NUMA node {} (balance comes first)",
                iface.name,
                queue_lists[i].len(),
                iface.numa_node.map_or("?".to_string(), |n| n.to_string()),
            ));
        }
    }
    rows.sort_by(|a, b| (&a.iface, a.ifindex, a.queue).cmp(&(&b.iface, b.ifindex, b.queue)));

    // IRQs follow their queues, or go round-robin over the housekeeping set.
    let by_key: BTreeMap<(&str, u32), &IfaceInfo> =
        ifaces.iter().map(|i| ((i.name.as_str(), i.ifindex), i)).collect();
    let mut irqs = Vec::new();
    let mut seen: BTreeMap<u32, (String, u32)> = BTreeMap::new();
    let mut rr = 0;
    for row in &mut rows {
        let iface = by_key[&(row.iface.as_str(), row.ifindex)];
        for qi in iface.irqs_of(row.queue) {
            if let Some((other, q)) = seen.get(&qi.irq) {
                notes.push(format!(
                    "IRQ {} serves {} queue {} and {other} queue {q}: it follows the latter",
                    qi.irq, row.iface, row.queue
                ));
                continue;
            }
            let cpu = match &housekeeping {
                Some(h) => {
                    rr += 1;
                    h[(rr - 1) % h.len()]
                }
                None => row.core,
            };
            seen.insert(qi.irq, (row.iface.clone(), row.queue));
            row.irqs.push(qi.irq);
            irqs.push(IrqPlan {
                irq: qi.irq,
                iface: row.iface.clone(),
                queue: row.queue,
                kind: qi.kind,
                name: qi.name.clone(),
                matched: qi.matched,
                cpu,
            });
        }
    }

    // Notes per interface, in name order.
    let mut sorted: Vec<&IfaceInfo> = ifaces.iter().collect();
    sorted.sort_by(|a, b| (&a.name, a.ifindex).cmp(&(&b.name, b.ifindex)));
    for iface in sorted {
        let planned: BTreeSet<u32> = iface.queues.iter().copied().collect();
        if iface.irqs.is_empty() && !planned.is_empty() {
            notes.push(format!(
                "{}: no queue IRQs found ({}): nothing to pin",
                iface.name,
                if iface.bus_id.is_none() { "virtual device" } else { "names and MSI say nothing" }
            ));
        }
        if iface.irqs.iter().any(|i| i.matched == IrqMatch::MsiOrder) {
            notes.push(format!(
                "{}: IRQs matched to queues by MSI order, a guess (names did not say): check \
                 /proc/interrupts",
                iface.name
            ));
        }
        let left: Vec<u32> =
            iface.irqs.iter().filter(|i| !planned.contains(&i.queue)).map(|i| i.irq).collect();
        if !left.is_empty() {
            notes.push(format!(
                "{}: IRQs {} serve queues not planned: left as they are",
                iface.name,
                left.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ));
        }
    }
    Plan { workers: cores, housekeeping, queues: rows, irqs, notes }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpu_of: BTreeMap<u32, usize> = self.irqs.iter().map(|i| (i.irq, i.cpu)).collect();
        let head = ["interface", "queue", "irq", "irq cpu", "worker", "core", "numa", "local"];
        let mut table: Vec<[String; 8]> = vec![head.map(String::from)];
        for q in &self.queues {
            let (irq, irq_cpu) = if q.irqs.is_empty() {
                ("none".to_string(), "-".to_string())
            } else {
                let cpus: Vec<usize> =
                    q.irqs.iter().filter_map(|i| cpu_of.get(i).copied()).collect();
                let irqs: Vec<String> = q.irqs.iter().map(u32::to_string).collect();
                (irqs.join(","), format_cpu_list(&cpus))
            };
            table.push([
                q.iface.clone(),
                q.queue.to_string(),
                irq,
                irq_cpu,
                q.worker.to_string(),
                q.core.to_string(),
                q.numa.map_or("-".to_string(), |n| n.to_string()),
                match q.local {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                }
                .to_string(),
            ]);
        }
        let mut width = [0usize; 8];
        for row in &table {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.len());
            }
        }
        for row in &table {
            let mut line = String::new();
            for (i, (c, w)) in row.iter().zip(width).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                // Names left-aligned, numbers right-aligned.
                if i == 0 || i == 2 || i == 3 {
                    line.push_str(&format!("{c:<w$}"));
                } else {
                    line.push_str(&format!("{c:>w$}"));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        let load: Vec<String> =
            self.load().iter().zip(&self.workers).map(|(n, c)| format!("core {c}: {n}")).collect();
        writeln!(f, "queues per worker: {}", load.join(", "))?;
        match &self.housekeeping {
            Some(h) => {
                writeln!(f, "IRQs: round-robin over housekeeping cores {}", format_cpu_list(h))?
            }
            None => writeln!(f, "IRQs: on their queue's worker core")?,
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Applying
// ---------------------------------------------------------------------------------------------

/// Why one IRQ could not be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// `/proc/irq/N` (or its `smp_affinity_list`) does not exist.
    Missing,
    /// The file could not be opened or written.
    NotWritable,
    /// The kernel refused the value (managed IRQ, offline CPU).
    Refused,
}

/// One IRQ written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqWritten {
    /// IRQ number.
    pub irq: u32,
    /// CPU written.
    pub cpu: usize,
}

/// One IRQ not pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqFailure {
    /// IRQ number.
    pub irq: u32,
    /// Interface it serves.
    pub iface: String,
    /// Queue it serves.
    pub queue: u32,
    /// What went wrong.
    pub kind: FailureKind,
    /// For the operator.
    pub message: String,
}

/// What [`apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// IRQs pinned.
    pub written: Vec<IrqWritten>,
    /// IRQs not pinned, with why.
    pub failed: Vec<IrqFailure>,
}

impl ApplyReport {
    /// Whether every IRQ of the plan was pinned.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} IRQs pinned, {} not", self.written.len(), self.failed.len())?;
        for x in &self.failed {
            writeln!(f, "  {}", x.message)?;
        }
        Ok(())
    }
}

/// Points the IRQs of `p` at the cores of the workers their queues were actually given
/// (`assigned`: (queue, worker index into [`Plan::workers`])), unless IRQs go to housekeeping
/// cores. For an interface that appeared at runtime: its queues go to the least-loaded
/// workers, not necessarily where [`plan`] would have put them, and its IRQs must follow.
pub fn follow_workers(p: &mut Plan, assigned: &[(u32, usize)]) {
    if p.housekeeping.is_some() {
        return;
    }
    for irq in &mut p.irqs {
        if let Some(&(_, w)) = assigned.iter().find(|(q, _)| *q == irq.queue) {
            if let Some(&core) = p.workers.get(w) {
                irq.cpu = core;
            }
        }
    }
}

/// Writes each planned IRQ's CPU into `root/proc/irq/N/smp_affinity_list`. IRQs that are gone
/// or whose file cannot be written are reported, not fatal; only a missing `proc/irq` (with
/// IRQs to pin) is an error.
pub fn apply(plan: &Plan, root: &Path) -> Result<ApplyReport, PlanError> {
    let mut report = ApplyReport::default();
    if plan.irqs.is_empty() {
        return Ok(report);
    }
    let base = root.join("proc/irq");
    if !base.is_dir() {
        return Err(PlanError::NoProcIrq(base));
    }
    for i in &plan.irqs {
        let what = format!("IRQ {} ({} queue {}) to CPU {}", i.irq, i.iface, i.queue, i.cpu);
        let dir = base.join(i.irq.to_string());
        let path = dir.join("smp_affinity_list");
        let fail = |kind, message| IrqFailure {
            irq: i.irq,
            iface: i.iface.clone(),
            queue: i.queue,
            kind,
            message,
        };
        if !dir.is_dir() {
            report.failed.push(fail(
                FailureKind::Missing,
                format!(
                    "{what}: {} does not exist; the IRQ was freed since discovery (interface \
                     down or reset?)",
                    dir.display()
                ),
            ));
            continue;
        }
        // Never create: procfs has the file for every IRQ, a fake tree must too.
        let res = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{}\n", i.cpu).as_bytes()));
        match res {
            Ok(()) => report.written.push(IrqWritten { irq: i.irq, cpu: i.cpu }),
            Err(e) => {
                let p = path.display();
                let (kind, message) = match (e.kind(), e.raw_os_error()) {
                    (io::ErrorKind::NotFound, _) => {
                        (FailureKind::Missing, format!("{what}: {p} does not exist"))
                    }
                    (io::ErrorKind::PermissionDenied, _) => (
                        FailureKind::NotWritable,
                        format!("{what}: {p} not writable ({e}): needs root (CAP_SYS_ADMIN)"),
                    ),
                    (_, Some(libc::EIO)) => (
                        FailureKind::Refused,
                        format!(
                            "{what}: the kernel refused ({e}): a managed IRQ, whose affinity \
                             the kernel keeps"
                        ),
                    ),
                    (_, Some(libc::EINVAL)) => (
                        FailureKind::Refused,
                        format!(
                            "{what}: the kernel refused ({e}): CPU {} offline or not allowed",
                            i.cpu
                        ),
                    ),
                    _ => (FailureKind::NotWritable, format!("{what}: writing {p}: {e}")),
                };
                report.failed.push(fail(kind, message));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, ifindex: u32, queues: u32) -> IfaceInfo {
        IfaceInfo::new(name, ifindex, queues)
    }

    fn with_irqs(mut i: IfaceInfo, first_irq: u32) -> IfaceInfo {
        i.irqs = i
            .queues
            .iter()
            .map(|&q| QueueIrq {
                queue: q,
                irq: first_irq + q,
                kind: IrqKind::TxRx,
                name: Some(format!("{}-TxRx-{q}", i.name)),
                matched: IrqMatch::Name,
            })
            .collect();
        i
    }

    fn numa(mut i: IfaceInfo, node: u32, cpus: &[usize]) -> IfaceInfo {
        i.numa_node = Some(node);
        i.local_cpus = cpus.to_vec();
        i
    }

    fn spread(p: &Plan) -> usize {
        let l = p.load();
        l.iter().max().unwrap_or(&0) - l.iter().min().unwrap_or(&0)
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(parse_cpu_list("0-3,6\n").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("8-9, 0 ,1").unwrap(), vec![0, 1, 8, 9]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert_eq!(format_cpu_list(&[6, 0, 1, 2, 3, 9, 10]), "0-3,6,9-10");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn interrupts_lines_give_irq_and_name() {
        let text = "           CPU0       CPU1\n\
                    \x20 0:         22          0   IO-APIC   2-edge      timer\n\
                    \x2038:          0      10621 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0\n\
                    \x2099:          0          0\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    LOC:    1234567    2345678   Local timer interrupts\n";
        assert_eq!(
            parse_interrupts(text),
            vec![(0, "timer".to_string()), (38, "virtio2-input.0".to_string())]
        );
    }

    /// (name in /proc/interrupts, interface, driver, bus id, expected).
    #[test]
    fn irq_names_say_their_queue() {
        use IrqKind::*;
        let pci = Some("0000:00:05.0");
        let rows: &[(&str, &str, Option<&str>, Option<&str>, Option<(u32, IrqKind)>)] = &[
            ("eth0-TxRx-3", "eth0", Some("ixgbe"), pci, Some((3, TxRx))),
            ("i40e-eth0-TxRx-7", "eth0", Some("i40e"), pci, Some((7, TxRx))),
            ("eth0-txrx-2", "eth0", None, pci, Some((2, TxRx))),
            ("eth0-rx-1", "eth0", Some("igb"), pci, Some((1, Rx))),
            ("eth0-tx-1", "eth0", Some("igb"), pci, Some((1, Tx))),
            ("eth0-12", "eth0", Some("sfc"), pci, Some((12, TxRx))),
            ("ens5-Tx-Rx-0", "ens5", Some("ena"), pci, Some((0, TxRx))),
            ("ena-ens5-Tx-Rx-31", "ens5", Some("ena"), pci, Some((31, TxRx))),
            ("ens192-rxtx-4", "ens192", Some("vmxnet3"), pci, Some((4, TxRx))),
            ("eth0-fp-2", "eth0", Some("bnx2x"), pci, Some((2, TxRx))),
            ("mlx5_comp5@pci:0000:00:05.0", "eth0", Some("mlx5_core"), pci, Some((5, TxRx))),
            ("virtio2-input.3", "eth0", Some("virtio_net"), Some("virtio2"), Some((3, Rx))),
            ("virtio2-output.3", "eth0", Some("virtio_net"), Some("virtio2"), Some((3, Tx))),
            // Not queues, or not this interface / device.
            ("eth0", "eth0", Some("ixgbe"), pci, None),
            ("eth0-lsc", "eth0", None, pci, None),
            ("eth1-TxRx-0", "eth0", None, pci, None),
            ("eth01-TxRx-0", "eth0", None, pci, None),
            ("veth0-TxRx-0", "eth0", None, pci, None),
            ("mlx5_comp5@pci:0000:00:06.0", "eth0", Some("mlx5_core"), pci, None),
            ("mlx5_async0@pci:0000:00:05.0", "eth0", Some("mlx5_core"), pci, None),
            ("ena-mgmnt@pci:0000:00:05.0", "ens5", Some("ena"), pci, None),
            ("virtio3-input.0", "eth0", Some("virtio_net"), Some("virtio2"), None),
            ("virtio2-config", "eth0", Some("virtio_net"), Some("virtio2"), None),
            ("eth0-TxRx-x", "eth0", None, pci, None),
        ];
        for (name, ifname, driver, bus, want) in rows {
            let m = Matcher { iface: ifname, driver: *driver, bus_id: *bus };
            assert_eq!(m.queue_of(name), *want, "{name} on {ifname}");
        }
    }

    #[test]
    fn gve_blocks_split_into_tx_then_rx() {
        let m = Matcher { iface: "ens4", driver: Some("gve"), bus_id: Some("0000:00:04.0") };
        let ints: Vec<(u32, String)> = (0..4)
            .map(|b| (40 + b, format!("gve-ntfy-blk{b}@pci:0000:00:04.0")))
            .chain([(39, "gve-mgmnt@pci:0000:00:04.0".to_string())])
            .collect();
        let got = match_irqs(&m, &[39, 40, 41, 42, 43], &ints, &[0, 1]);
        let got: Vec<(u32, u32, IrqKind)> = got.iter().map(|i| (i.queue, i.irq, i.kind)).collect();
        assert_eq!(
            got,
            vec![
                (0, 40, IrqKind::Tx),
                (0, 42, IrqKind::Rx),
                (1, 41, IrqKind::Tx),
                (1, 43, IrqKind::Rx)
            ]
        );
    }

    #[test]
    fn msi_order_skips_management_irqs_and_unrequested_ones() {
        let m = Matcher { iface: "eth0", driver: Some("foo"), bus_id: Some("0000:00:05.0") };
        let ints = vec![
            (24, "foo-mgmnt@pci:0000:00:05.0".to_string()),
            (25, "foo-q0".to_string()),
            (26, "foo-q1".to_string()),
        ];
        // 27 is an MSI vector nobody requested: not listed, not used.
        let got = match_irqs(&m, &[24, 25, 26, 27], &ints, &[0, 1, 2]);
        let got: Vec<(u32, u32, IrqMatch)> =
            got.iter().map(|i| (i.queue, i.irq, i.matched)).collect();
        assert_eq!(got, vec![(0, 25, IrqMatch::MsiOrder), (1, 26, IrqMatch::MsiOrder)]);
        // Without /proc/interrupts every MSI vector counts, in order.
        let got = match_irqs(&m, &[24, 25], &[], &[0, 1, 2]);
        assert_eq!(
            got.iter().map(|i| (i.queue, i.irq)).collect::<Vec<_>>(),
            vec![(0, 24), (1, 25)]
        );
    }

    #[test]
    fn names_must_be_the_devices_own_msi_irqs() {
        let m = Matcher { iface: "eth0", driver: None, bus_id: Some("0000:00:05.0") };
        let ints = vec![(30, "eth0-TxRx-0".to_string()), (31, "eth0-TxRx-1".to_string())];
        let got = match_irqs(&m, &[31], &ints, &[0, 1]);
        assert_eq!(got.iter().map(|i| (i.queue, i.irq)).collect::<Vec<_>>(), vec![(1, 31)]);
    }

    #[test]
    fn uneven_interfaces_balance_over_three_cores() {
        let ifs = [iface("a", 1, 8), iface("b", 2, 4), iface("c", 3, 2)];
        let p = plan(&ifs, &[2, 3, 4], None);
        assert_eq!(p.queues.len(), 14);
        let mut l = p.load();
        l.sort_unstable();
        assert_eq!(l, vec![4, 5, 5]);
        // One interface's queues spread over the cores.
        for name in ["a", "b"] {
            let cores: BTreeSet<usize> =
                p.queues.iter().filter(|q| q.iface == name).map(|q| q.core).collect();
            assert_eq!(cores.len(), 3, "{name}");
        }
    }

    #[test]
    fn numa_local_cores_are_preferred_within_the_bound() {
        // Cores 0,1 on node 0; 2,3 on node 1.
        let a = numa(iface("a", 1, 4), 0, &[0, 1]);
        let b = numa(iface("b", 2, 4), 1, &[2, 3]);
        let p = plan(&[b.clone(), a.clone()], &[0, 1, 2, 3], None);
        assert!(p.queues.iter().all(|q| q.local == Some(true)), "{p}");
        assert_eq!(spread(&p), 0);
        // Locality never beats balance: 6 queues on node 0, 2 node-0 cores of 4.
        let a = numa(iface("a", 1, 6), 0, &[0, 1]);
        let p = plan(&[a], &[0, 1, 2, 3], None);
        assert!(spread(&p) <= 1);
        assert_eq!(p.queues.iter().filter(|q| q.local == Some(true)).count(), 4);
        assert!(p.notes.iter().any(|n| n.contains("2 of 6 queues on cores outside NUMA node 0")));
    }

    #[test]
    fn interfaces_without_numa_yield_local_cores_to_those_with() {
        // "a" has no NUMA node; "b" is local to core 0 only. a sorts first by name but b is
        // placed first, so b gets core 0 for both its queues.
        let a = iface("a", 1, 2);
        let b = numa(iface("b", 2, 2), 0, &[0]);
        let p = plan(&[a, b], &[0, 1], None);
        assert!(p.queues.iter().filter(|q| q.iface == "b").all(|q| q.core == 0), "{p}");
    }

    #[test]
    fn irqs_follow_workers_or_housekeeping_round_robin() {
        let ifs = [with_irqs(iface("eth0", 2, 4), 40), iface("veth0", 9, 1)];
        let p = plan(&ifs, &[2, 3], None);
        for q in &p.queues {
            for irq in &q.irqs {
                let i = p.irqs.iter().find(|i| i.irq == *irq).unwrap();
                assert_eq!(i.cpu, q.core);
            }
        }
        assert!(p.queues.iter().filter(|q| q.iface == "veth0").all(|q| q.irqs.is_empty()));
        assert!(p.notes.iter().any(|n| n.starts_with("veth0: no queue IRQs")));

        let p = plan(&ifs, &[2, 3], Some(&[0, 1]));
        let cpus: Vec<usize> = p.irqs.iter().map(|i| i.cpu).collect();
        assert_eq!(cpus, vec![0, 1, 0, 1]);
        assert_eq!(p.housekeeping, Some(vec![0, 1]));
        // Queues are placed the same way either way.
        let q: Vec<usize> = p.queues.iter().map(|q| q.core).collect();
        assert_eq!(q, plan(&ifs, &[2, 3], None).queues.iter().map(|q| q.core).collect::<Vec<_>>());
    }

    #[test]
    fn irqs_of_a_runtime_interface_follow_the_workers_it_was_given() {
        let ifs = [with_irqs(iface("eth9", 2, 4), 40)];
        let mut p = plan(&ifs, &[2, 3], None);
        // Every queue went to worker 1 (core 3), say because worker 0 was busier.
        let assigned: Vec<(u32, usize)> = (0..4).map(|q| (q, 1)).collect();
        follow_workers(&mut p, &assigned);
        assert!(!p.irqs.is_empty());
        assert!(p.irqs.iter().all(|i| i.cpu == 3), "{:?}", p.irqs);
        // With housekeeping cores the IRQs stay there.
        let mut h = plan(&ifs, &[2, 3], Some(&[0]));
        follow_workers(&mut h, &assigned);
        assert!(h.irqs.iter().all(|i| i.cpu == 0));
    }

    #[test]
    fn edge_cases_are_noted_not_panics() {
        let ifs = [iface("a", 1, 3)];
        let p = plan(&ifs, &[], None);
        assert!(p.queues.is_empty());
        assert!(p.notes.iter().any(|n| n.contains("no worker cores")));
        let p = plan(&ifs, &[1, 1, 1], Some(&[]));
        assert_eq!(p.workers, vec![1]);
        assert_eq!(p.load(), vec![3]);
        assert!(p.notes.iter().any(|n| n.contains("empty housekeeping")));
        let p = plan(&ifs, &[0, 1, 2, 3, 4], None);
        assert_eq!(p.load(), vec![1, 1, 1, 0, 0]);
        let p = plan(&[], &[0, 1], None);
        assert!(p.queues.is_empty() && p.notes.is_empty());
        let p = plan(&ifs, &[0, 1], Some(&[1, 5]));
        assert!(p.notes.iter().any(|n| n.contains("housekeeping cores 1 are also worker cores")));
    }

    #[test]
    fn a_shared_irq_is_planned_once() {
        let a = with_irqs(iface("a", 1, 1), 50);
        let b = with_irqs(iface("b", 2, 1), 50);
        let p = plan(&[a, b], &[0, 1], None);
        assert_eq!(p.irqs.len(), 1);
        assert!(p.notes.iter().any(|n| n.contains("IRQ 50 serves b queue 0 and a queue 0")));
    }

    #[test]
    fn display_is_a_table() {
        let ifs = [numa(with_irqs(iface("eth0", 2, 2), 40), 0, &[0]), iface("veth0", 9, 1)];
        let p = plan(&ifs, &[0, 1], None);
        let s = p.to_string();
        let want = "\
interface  queue  irq   irq cpu  worker  core  numa  local
eth0           0  40    0             0     0     0    yes
eth0           1  41    0             0     0     0    yes
veth0          0  none  -             1     1     -      -
queues per worker: core 0: 2, core 1: 1
IRQs: on their queue's worker core
note: veth0: no queue IRQs found (virtual device): nothing to pin
";
        assert_eq!(s, want, "\n{s}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn ifaces() -> impl Strategy<Value = Vec<IfaceInfo>> {
            proptest::collection::vec((1u32..=32, proptest::option::of(0u32..2)), 1..=4).prop_map(
                |v| {
                    v.into_iter()
                        .enumerate()
                        .map(|(k, (q, node))| {
                            let i = with_irqs(
                                iface(&format!("eni{k}"), k as u32 + 2, q),
                                100 * k as u32,
                            );
                            match node {
                                // Node n owns cores 4n..4n+4.
                                Some(n) => {
                                    let c = 4 * n as usize;
                                    numa(i, n, &[c, c + 1, c + 2, c + 3])
                                }
                                None => i,
                            }
                        })
                        .collect()
                },
            )
        }

        proptest! {
            #[test]
            fn every_queue_once_and_balanced(
                ifs in ifaces(),
                workers in proptest::collection::btree_set(0usize..8, 1..=8),
                hk in proptest::option::of(proptest::collection::vec(0usize..8, 1..3)),
            ) {
                let workers: Vec<usize> = workers.into_iter().collect();
                let p = plan(&ifs, &workers, hk.as_deref());
                let total: usize = ifs.iter().map(|i| i.queues.len()).sum();
                prop_assert_eq!(p.queues.len(), total);
                let keys: BTreeSet<(String, u32)> =
                    p.queues.iter().map(|q| (q.iface.clone(), q.queue)).collect();
                prop_assert_eq!(keys.len(), total);
                prop_assert!(spread(&p) <= 1, "{}", p);
                prop_assert!(p.queues.iter().all(|q| workers[q.worker] == q.core));
                // Every IRQ once, on a worker or housekeeping core.
                prop_assert_eq!(p.irqs.len(), total);
                for i in &p.irqs {
                    match &hk {
                        Some(h) => prop_assert!(h.contains(&i.cpu)),
                        None => prop_assert_eq!(Some(i.cpu), p.core_of(&i.iface, i.queue)),
                    }
                }
                // Deterministic, and independent of the order interfaces come in.
                prop_assert_eq!(&p, &plan(&ifs, &workers, hk.as_deref()));
                let mut rev = ifs.clone();
                rev.reverse();
                prop_assert_eq!(&p, &plan(&rev, &workers, hk.as_deref()));
            }

            #[test]
            fn one_numa_interface_fills_its_local_cores_first(q in 1u32..=32, w in 2usize..=8) {
                // Local cores 0..w/2; balance allows ceil(q/w) each.
                let local: Vec<usize> = (0..w / 2).collect();
                let i = numa(iface("eni0", 2, q), 0, &local);
                let workers: Vec<usize> = (0..w).collect();
                let p = plan(&[i], &workers, None);
                let on_local = p.queues.iter().filter(|q| q.local == Some(true)).count();
                let cap = (q as usize).div_ceil(w);
                let best = (q as usize).min(local.len() * cap)
                    // The bound also caps how many cores may carry the extra queue.
                    .min(local.len() * (q as usize / w) + (q as usize % w).min(local.len()));
                prop_assert_eq!(on_local, best, "{}", p);
            }
        }
    }

    #[test]
    fn channel_requests_follow_the_drivers_kind_and_maximum() {
        let nic = EthtoolChannels { max_combined: 8, combined: 4, ..Default::default() };
        assert_eq!(channel_request(&nic, 4), Ok(None));
        assert_eq!(channel_request(&nic, 2).unwrap().unwrap().combined, 2);
        assert!(channel_request(&nic, 9).unwrap_err().contains("at most 8"));
        let veth = EthtoolChannels { max_rx: 4, max_tx: 4, rx: 4, tx: 4, ..Default::default() };
        let r = channel_request(&veth, 2).unwrap().unwrap();
        assert_eq!((r.rx, r.tx, r.combined), (2, 2, 0));
        assert!(channel_request(&veth, 5).unwrap_err().contains("at most 4 rx"));
        assert!(channel_request(&EthtoolChannels::default(), 1).is_err());
        assert!(channel_request(&nic, 0).is_err());
    }
}
