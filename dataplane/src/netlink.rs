//! Next hops from the kernel: a read-only view of its links, addresses, neighbours and routes
//! over rtnetlink, and a watcher that says when to read them again.
//!
//! The dataplane forwards packets itself, so for each destination it needs the egress
//! interface, that interface's MAC and the neighbour's MAC. The kernel already knows all of
//! that, so we *read* it and never write it:
//!
//! - [`dump`] takes a [`KernelView`] snapshot with four rtnetlink dumps: every link
//!   (`RTM_GETLINK`), and the IPv4 addresses (`RTM_GETADDR`), neighbours (`RTM_GETNEIGH`) and
//!   main-table routes (`RTM_GETROUTE`).
//! - [`KernelView::routes`] turns a snapshot into the [`Routes`] table the pipeline reads, for the
//!   interfaces the dataplane manages.
//! - [`Watcher`] is a non-blocking socket subscribed to link, neighbour, IPv4 address and IPv4
//!   route notifications; a poll loop waits on its fd and calls [`Watcher::drain`], which says
//!   whether anything relevant changed. The caller then dumps again (coalescing bursts is its
//!   job).
//!
//! # Why only read
//!
//! ARP stays with the kernel. It already resolves neighbours, ages them, answers requests and
//! handles gratuitous ARP and failover; a second resolver in the dataplane would fight it over
//! the same addresses. The pipeline hands anything it cannot forward to the kernel (a lookup
//! miss is [`PassReason::NoNextHop`](crate::PassReason) or `NotOurs`), and the kernel's own
//! forwarding then triggers the ARP request; once the neighbour resolves, a notification
//! arrives, the caller dumps again and the next generation of tables forwards that destination
//! in the dataplane.
//!
//! # What becomes a next hop
//!
//! Only for interfaces in `managed`, which must be operationally up and have a non-zero,
//! unicast Ethernet MAC (the source MAC of every frame sent there):
//!
//! - a **host entry** for every usable IPv4 neighbour (state REACHABLE, STALE, DELAY, PROBE,
//!   PERMANENT or NOARP, with a non-zero unicast MAC; never INCOMPLETE or FAILED) whose address
//!   the kernel would reach on-link through that same interface (its best main-table route has
//!   no gateway and leaves through the neighbour's interface). Pod routes `/32 dev caliX`
//!   (Calico style) need nothing more than their neighbour entry.
//! - a **prefix entry** for every main-table unicast route with a single gateway whose
//!   interface is managed and whose gateway has a usable neighbour entry on that interface
//!   (destination MAC = the gateway's). A gateway without one is skipped: packets there miss,
//!   go to the kernel, and its forwarding resolves the gateway.
//!
//! # Invariants
//!
//! - **Never more than the kernel would do.** For every destination, [`Routes::lookup`] on the
//!   result either misses or gives the next hop the kernel's main table gives. Leaving a route
//!   out must not let a shorter prefix capture its destinations, so a prefix entry is emitted
//!   only when no route inside it (or equal to it, with a TOS) is left out and no local address
//!   lies inside it. A route that is left out but fully covered by a host entry (a `/32` pod
//!   route with a usable neighbour) does not count. In practice this means the default route is
//!   usually not emitted (the node's connected subnets lie inside it) and that traffic goes to
//!   the kernel.
//! - Routes the pipeline cannot express are left to the kernel: ECMP (`RTA_MULTIPATH`),
//!   nexthop objects (`RTA_NH_ID`), gateways of another family (`RTA_VIA`), dead or link-down
//!   next hops, non-unicast types (blackhole, unreachable, prohibit, throw), TOS routes.
//! - Only the main table is read: policy routing (`ip rule`) that steers traffic to other
//!   tables is not modelled.
//! - Output is deterministic: the same view gives the same table, whatever order the kernel
//!   dumped in. Between routes of the same prefix the lowest metric wins; between equal metrics
//!   the one the kernel dumped first (the one it uses); between neighbour entries for the same
//!   address on several managed links, the lowest ifindex.
//! - Create the [`Watcher`] *before* the first [`dump`], so no change between the two is lost.
//!   Each dump is consistent on its own (an interrupted dump is retried); the four dumps
//!   together may straddle a change, which the watcher then reports.

use core::net::Ipv4Addr;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage, State};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use crate::tables::{prefix_mask, NextHop, Routes};

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// The kernel's main routing table id (`RT_TABLE_MAIN`).
pub const RT_TABLE_MAIN: u32 = 254;

/// How long a dump waits for each reply datagram before giving up.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a dump interrupted by concurrent changes (`NLM_F_DUMP_INTR`) is retried.
pub const DUMP_ATTEMPTS: u32 = 5;

/// Receive buffer the [`Watcher`] asks for (the kernel caps it at `net.core.rmem_max`).
pub const WATCH_RCVBUF: usize = 1 << 20;

/// Why reading the kernel's tables failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Opening or setting up a netlink socket failed.
    #[error("netlink socket: {op}: {source}")]
    Socket {
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending a dump request failed.
    #[error("sending the {what} dump request: {source}")]
    Send {
        /// Which dump.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Receiving from a netlink socket failed.
    #[error("receiving {what}: {source}")]
    Recv {
        /// Which dump, or `notifications`.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer a dump in time.
    #[error("the {what} dump got no answer within {after:?}")]
    Timeout {
        /// Which dump.
        what: &'static str,
        /// How long we waited for one datagram.
        after: Duration,
    },
    /// The kernel answered a dump with an error (`NLMSG_ERROR`, or `NLMSG_DONE` with an error).
    #[error("the kernel refused the {what} dump: {source}")]
    Kernel {
        /// Which dump.
        what: &'static str,
        /// The errno the kernel gave.
        #[source]
        source: io::Error,
    },
    /// A reply could not be decoded. The whole dump fails: silently dropping one route or
    /// address could let a shorter prefix capture its destinations.
    #[error("decoding a {what} reply: {source}")]
    Decode {
        /// Which dump.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
    /// Every attempt at a dump was interrupted by concurrent changes (`NLM_F_DUMP_INTR`).
    #[error("the {what} dump was interrupted by concurrent changes {attempts} times in a row")]
    Interrupted {
        /// Which dump.
        what: &'static str,
        /// Attempts made.
        attempts: u32,
    },
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, if it is a 6-byte (Ethernet) one.
    pub mac: Option<Mac>,
    /// Operationally up: RFC 2863 state `up`, or `unknown` (drivers that report none, such as
    /// loopback) while the interface is administratively up and running.
    pub oper_up: bool,
    /// MTU.
    pub mtu: u32,
}

/// One IPv4 address of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    /// Interface index.
    pub ifindex: u32,
    /// The local address (`IFA_LOCAL`, or `IFA_ADDRESS` when there is no local one).
    pub ip: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
}

/// State of a neighbour entry (the kernel's `NUD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NeighState {
    /// Resolution in progress.
    Incomplete,
    /// Confirmed recently.
    Reachable,
    /// Valid but unconfirmed.
    Stale,
    /// Waiting before probing.
    Delay,
    /// Being probed.
    Probe,
    /// Resolution failed.
    Failed,
    /// No resolution needed (point-to-point, multicast, `nud noarp`).
    NoArp,
    /// Static (`nud permanent`).
    Permanent,
    /// No state.
    None,
    /// Any other bit combination.
    Other(u16),
}

const NUD_INCOMPLETE: u16 = 0x01;
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
/// The kernel's `NUD_VALID`: states whose link-layer address can be used.
const NUD_VALID: u16 =
    NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY;

impl NeighState {
    /// From the kernel's `ndm_state` bits.
    pub fn from_bits(bits: u16) -> Self {
        match bits {
            NUD_INCOMPLETE => Self::Incomplete,
            NUD_REACHABLE => Self::Reachable,
            NUD_STALE => Self::Stale,
            NUD_DELAY => Self::Delay,
            NUD_PROBE => Self::Probe,
            NUD_FAILED => Self::Failed,
            NUD_NOARP => Self::NoArp,
            NUD_PERMANENT => Self::Permanent,
            0 => Self::None,
            other => Self::Other(other),
        }
    }

    /// The kernel's `ndm_state` bits.
    pub fn bits(self) -> u16 {
        match self {
            Self::Incomplete => NUD_INCOMPLETE,
            Self::Reachable => NUD_REACHABLE,
            Self::Stale => NUD_STALE,
            Self::Delay => NUD_DELAY,
            Self::Probe => NUD_PROBE,
            Self::Failed => NUD_FAILED,
            Self::NoArp => NUD_NOARP,
            Self::Permanent => NUD_PERMANENT,
            Self::None => 0,
            Self::Other(bits) => bits,
        }
    }

    /// Whether the entry's link-layer address may be used (the kernel's `NUD_VALID`, and
    /// neither INCOMPLETE nor FAILED).
    pub fn is_valid(self) -> bool {
        let b = self.bits();
        b & NUD_VALID != 0 && b & (NUD_INCOMPLETE | NUD_FAILED) == 0
    }
}

/// One IPv4 neighbour (ARP) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Neighbour {
    /// The neighbour's address.
    pub ip: Ipv4Addr,
    /// Interface it is on.
    pub ifindex: u32,
    /// Its link-layer address, if it is a 6-byte one.
    pub mac: Option<Mac>,
    /// Entry state.
    pub state: NeighState,
}

impl Neighbour {
    /// The MAC to send to, if the entry is usable: a valid state and a non-zero unicast MAC.
    pub fn usable_mac(&self) -> Option<Mac> {
        self.mac.filter(|m| self.state.is_valid() && is_unicast_mac(m))
    }
}

/// Type of a route (the kernel's `RTN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// A gateway or directly connected route.
    Unicast,
    /// Drop silently.
    Blackhole,
    /// Drop with ICMP unreachable.
    Unreachable,
    /// Drop with ICMP prohibited.
    Prohibit,
    /// Continue in the next table.
    Throw,
    /// Anything else (local, broadcast, multicast, ... in the main table).
    Other(u8),
}

impl From<RouteType> for RouteKind {
    fn from(t: RouteType) -> Self {
        match t {
            RouteType::Unicast => Self::Unicast,
            RouteType::BlackHole => Self::Blackhole,
            RouteType::Unreachable => Self::Unreachable,
            RouteType::Prohibit => Self::Prohibit,
            RouteType::Throw => Self::Throw,
            other => Self::Other(u8::from(other)),
        }
    }
}

/// One IPv4 route of the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination network (host bits cleared).
    pub dst: Ipv4Addr,
    /// Destination prefix length.
    pub prefix_len: u8,
    /// TOS selector (0 for ordinary routes).
    pub tos: u8,
    /// Route type.
    pub kind: RouteKind,
    /// Gateway (`via`), if any.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface (`dev`), if any.
    pub oif: Option<u32>,
    /// Metric (`RTA_PRIORITY`); lower wins.
    pub metric: u32,
    /// The next hop is something the dataplane does not model: ECMP (`RTA_MULTIPATH`), a
    /// nexthop object (`RTA_NH_ID`) or a gateway of another family (`RTA_VIA`).
    pub complex_nexthop: bool,
    /// The next hop is dead or its link is down (`RTNH_F_DEAD`, `RTNH_F_LINKDOWN`).
    pub dead: bool,
}

impl Route {
    fn net(&self) -> u32 {
        u32::from(self.dst) & prefix_mask(self.prefix_len)
    }
    fn contains(&self, ip: u32) -> bool {
        ip & prefix_mask(self.prefix_len) == self.net()
    }
}

/// A snapshot of what the kernel knows about IPv4 next hops.
///
/// Every collection is sorted (see each field), so two snapshots of the same kernel state
/// compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Every link, by ifindex.
    pub links: BTreeMap<u32, Link>,
    /// IPv4 addresses, sorted by (ifindex, ip, prefix length).
    pub addresses: Vec<Address>,
    /// IPv4 neighbours, sorted by (ip, ifindex).
    pub neighbours: Vec<Neighbour>,
    /// IPv4 routes of the main table, sorted by (dst, prefix length, tos, metric); routes equal
    /// in all four keep the kernel's order.
    pub main_routes: Vec<Route>,
}

impl KernelView {
    /// The link with this index.
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    /// The link with this name.
    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }

    /// The index of the link with this name.
    pub fn ifindex(&self, name: &str) -> Option<u32> {
        self.link_by_name(name).map(|l| l.ifindex)
    }

    /// The IPv4 addresses of a link, sorted.
    pub fn addresses(&self, ifindex: u32) -> impl Iterator<Item = &Address> + '_ {
        self.addresses.iter().filter(move |a| a.ifindex == ifindex)
    }

    /// The neighbour entry for `ip` on `ifindex`.
    pub fn neighbour(&self, ip: Ipv4Addr, ifindex: u32) -> Option<&Neighbour> {
        self.neighbours.iter().find(|n| n.ip == ip && n.ifindex == ifindex)
    }

    /// Whether `ip` is one of this host's addresses.
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.addresses.iter().any(|a| a.ip == ip)
    }

    /// The main-table routes the kernel would pick from: per (prefix, TOS), the lowest metric
    /// (the first dumped among equals), in a deterministic order.
    fn best_routes(&self) -> Vec<&Route> {
        let mut all: Vec<&Route> = self.main_routes.iter().collect();
        // Stable: routes equal in every key keep the kernel's order, so the first is its pick.
        all.sort_by_key(|r| (r.net(), r.prefix_len, r.tos, r.metric));
        all.dedup_by_key(|r| (r.net(), r.prefix_len, r.tos));
        all
    }

    /// The route the kernel's main table gives for `ip` (TOS 0): longest prefix, then lowest
    /// metric.
    fn lookup<'a>(best: &[&'a Route], ip: u32) -> Option<&'a Route> {
        best.iter()
            .copied()
            .filter(|r| r.tos == 0 && r.contains(ip))
            .min_by_key(|r| (core::cmp::Reverse(r.prefix_len), r.metric))
    }

    /// The next-hop table for the interfaces in `managed` (see the module docs for what is
    /// included and why some routes are left to the kernel).
    pub fn routes(&self, managed: &[u32]) -> Routes {
        let managed: BTreeSet<u32> = managed.iter().copied().collect();
        let src_mac = |ifindex: u32| -> Option<Mac> {
            if !managed.contains(&ifindex) {
                return None;
            }
            let link = self.links.get(&ifindex)?;
            link.mac.filter(|m| link.oper_up && is_unicast_mac(m))
        };
        let best = self.best_routes();
        let mut out = Routes::default();

        // Host entries. `neighbours` may be in any order here; sort for determinism.
        let mut neighbours: Vec<&Neighbour> = self.neighbours.iter().collect();
        neighbours.sort_by_key(|n| (n.ip, n.ifindex));
        for n in neighbours {
            let (Some(dst_mac), Some(src)) = (n.usable_mac(), src_mac(n.ifindex)) else {
                continue;
            };
            if !is_unicast_ip(n.ip) || self.is_local(n.ip) || out.host(u32::from(n.ip)).is_some() {
                continue;
            }
            let on_link = Self::lookup(&best, u32::from(n.ip)).is_some_and(|r| {
                r.kind == RouteKind::Unicast
                    && r.gateway.is_none()
                    && r.oif == Some(n.ifindex)
                    && !r.complex_nexthop
                    && !r.dead
            });
            if on_link {
                out.add_host(n.ip, NextHop { ifindex: n.ifindex, src_mac: src, dst_mac });
            }
        }

        // Prefix entries, and the holes that forbid a shorter prefix from covering them.
        let mut candidates: Vec<(Ipv4Addr, u8, NextHop)> = Vec::new();
        let mut holes: Vec<(u32, u8)> = Vec::new();
        for r in &best {
            let hop = (r.tos == 0).then(|| self.gateway_hop(r, &src_mac)).flatten();
            match hop {
                Some(hop) => candidates.push((Ipv4Addr::from(r.net()), r.prefix_len, hop)),
                None => {
                    let covered = r.prefix_len == 32
                        && out.host(r.net()).is_some_and(|h| Some(h.ifindex) == r.oif);
                    if !covered {
                        holes.push((r.net(), r.prefix_len));
                    }
                }
            }
        }
        holes.extend(self.addresses.iter().map(|a| (u32::from(a.ip), 32)));
        for (net, len, hop) in candidates {
            let shadows =
                holes.iter().any(|&(h, hl)| hl >= len && h & prefix_mask(len) == u32::from(net));
            if !shadows {
                out.add_prefix(net, len, hop);
            }
        }
        out
    }

    /// The next hop of a single-gateway unicast route through a managed link, if its gateway
    /// is resolved there.
    fn gateway_hop(&self, r: &Route, src_mac: &dyn Fn(u32) -> Option<Mac>) -> Option<NextHop> {
        if r.kind != RouteKind::Unicast || r.complex_nexthop || r.dead {
            return None;
        }
        let (gw, oif) = (r.gateway?, r.oif?);
        let src = src_mac(oif)?;
        let dst_mac = self.neighbour(gw, oif)?.usable_mac()?;
        Some(NextHop { ifindex: oif, src_mac: src, dst_mac })
    }
}

fn is_unicast_mac(m: &Mac) -> bool {
    *m != [0; 6] && m[0] & 1 == 0
}

fn is_unicast_ip(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

// ---------------------------------------------------------------------------
// Dumps

/// Reads the kernel's links, IPv4 addresses, IPv4 neighbours and IPv4 main-table routes of the
/// calling thread's network namespace.
pub fn dump() -> Result<KernelView, NetlinkError> {
    let mut s = DumpSocket::open()?;
    let mut view = KernelView::default();

    let mut req = LinkMessage::default();
    // Statistics are large and unused.
    req.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    for m in s.dump("link", RouteNetlinkMessage::GetLink(req))? {
        if let RouteNetlinkMessage::NewLink(m) = m {
            let link = parse_link(&m);
            view.links.insert(link.ifindex, link);
        }
    }

    let mut req = AddressMessage::default();
    req.header.family = AddressFamily::Inet;
    for m in s.dump("address", RouteNetlinkMessage::GetAddress(req))? {
        if let RouteNetlinkMessage::NewAddress(m) = m {
            view.addresses.extend(parse_address(&m));
        }
    }
    view.addresses.sort();
    view.addresses.dedup();

    let mut req = NeighbourMessage::default();
    req.header.family = AddressFamily::Inet;
    for m in s.dump("neighbour", RouteNetlinkMessage::GetNeighbour(req))? {
        if let RouteNetlinkMessage::NewNeighbour(m) = m {
            view.neighbours.extend(parse_neighbour(&m));
        }
    }
    view.neighbours.sort_by_key(|n| (n.ip, n.ifindex));

    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    for m in s.dump("route", RouteNetlinkMessage::GetRoute(req))? {
        if let RouteNetlinkMessage::NewRoute(m) = m {
            view.main_routes.extend(parse_route(&m));
        }
    }
    // Stable, so equal routes keep the kernel's preference order.
    view.main_routes.sort_by_key(|r| (r.net(), r.prefix_len, r.tos, r.metric));
    Ok(view)
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut link =
        Link { ifindex: m.header.index, name: String::new(), mac: None, oper_up: false, mtu: 0 };
    let mut oper = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(b) => link.mac = <Mac>::try_from(b.as_slice()).ok(),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            LinkAttribute::OperState(s) => oper = Some(*s),
            _ => {}
        }
    }
    let running = m.header.flags.contains(LinkFlags::Up | LinkFlags::Running);
    link.oper_up = match oper {
        Some(State::Up) => true,
        Some(State::Unknown) | None => running,
        Some(_) => false,
    };
    link
}

fn parse_address(m: &AddressMessage) -> Option<Address> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    Some(Address { ifindex: m.header.index, ip, prefix_len: m.header.prefix_len })
}

fn parse_neighbour(m: &NeighbourMessage) -> Option<Neighbour> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            NeighbourAttribute::LinkLayerAddress(b) => mac = <Mac>::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour {
        ip: ip?,
        ifindex: m.header.ifindex,
        mac,
        state: NeighState::from_bits(u16::from(m.header.state)),
    })
}

/// The route's table: `RTA_TABLE` when present (tables above 255), else the header's.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(m.header.table))
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    let h: &RouteHeader = &m.header;
    if h.address_family != AddressFamily::Inet
        || route_table(m) != RT_TABLE_MAIN
        || h.flags.contains(RouteFlags::Cloned)
    {
        return None;
    }
    let mut r = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix_len: h.destination_prefix_length.min(32),
        tos: h.tos,
        kind: RouteKind::from(h.kind),
        gateway: None,
        oif: None,
        metric: 0,
        complex_nexthop: false,
        dead: h.flags.intersects(RouteFlags::Dead | RouteFlags::Linkdown),
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) | RouteAttribute::NhId(_) => {
                r.complex_nexthop = true
            }
            _ => {}
        }
    }
    r.dst = Ipv4Addr::from(r.net());
    Some(r)
}

/// A blocking rtnetlink socket for request/dump exchanges.
struct DumpSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl DumpSocket {
    fn open() -> Result<Self, NetlinkError> {
        let sock_err = |op| move |source| NetlinkError::Socket { op, source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(sock_err("socket"))?;
        sock.bind_auto().map_err(sock_err("bind"))?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(sock_err("connect"))?;
        set_recv_timeout(&sock, DUMP_TIMEOUT).map_err(sock_err("SO_RCVTIMEO"))?;
        Ok(Self { sock, seq: 0, buf: vec![0; 32 << 10] })
    }

    /// Runs one dump to its end, retrying it if the kernel says it was interrupted.
    fn dump(
        &mut self,
        what: &'static str,
        req: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(msgs) = self.dump_once(what, req.clone())? {
                return Ok(msgs);
            }
        }
        Err(NetlinkError::Interrupted { what, attempts: DUMP_ATTEMPTS })
    }

    /// One dump; `None` if it was interrupted (`NLM_F_DUMP_INTR`) and must be redone.
    fn dump_once(
        &mut self,
        what: &'static str,
        req: RouteNetlinkMessage,
    ) -> Result<Option<Vec<RouteNetlinkMessage>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(req));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.sock.send(&out, 0).map_err(|source| NetlinkError::Send { what, source })?;

        let mut msgs = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.recv_datagram(what)?;
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let frame = NetlinkBuffer::new_checked(bytes)
                    .map_err(|source| NetlinkError::Decode { what, source })?;
                let len = frame.length() as usize;
                // Messages are 4-byte aligned within a datagram.
                off += (len + 3) & !3;
                if frame.sequence_number() != seq {
                    continue; // not ours (a stale reply); skip
                }
                if frame.flags() & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                    .map_err(|source| NetlinkError::Decode { what, source })?;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => msgs.push(m),
                    NetlinkPayload::Done(d) => {
                        if d.code < 0 {
                            let source = io::Error::from_raw_os_error(-d.code);
                            return Err(NetlinkError::Kernel { what, source });
                        }
                        return Ok((!interrupted).then_some(msgs));
                    }
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(NetlinkError::Kernel { what, source: e.to_io() });
                    }
                    _ => {} // an ACK or NOOP: nothing to keep
                }
            }
        }
    }

    /// Receives one whole datagram into `buf` (growing it to fit) and returns its length.
    fn recv_datagram(&mut self, what: &'static str) -> Result<usize, NetlinkError> {
        loop {
            // Peek at the size first, so a datagram larger than the buffer is never truncated.
            let mut empty: &mut [u8] = &mut [];
            let size = match self.sock.recv(&mut empty, libc::MSG_PEEK | libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(NetlinkError::Timeout { what, after: DUMP_TIMEOUT })
                    }
                    _ => return Err(NetlinkError::Recv { what, source: e }),
                },
            };
            if self.buf.len() < size {
                self.buf.resize(size, 0);
            }
            let mut dst: &mut [u8] = &mut self.buf[..];
            match self.sock.recv(&mut dst, 0) {
                Ok(n) => return Ok(n.min(self.buf.len())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::Recv { what, source: e }),
            }
        }
    }
}

fn set_recv_timeout(sock: &Socket, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval of the length given, read by the kernel during the call;
    // the fd is the open socket `sock` owns.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------
// Notifications

/// A non-blocking rtnetlink socket subscribed to link, neighbour, IPv4 route and IPv4 address
/// notifications of the namespace it was created in.
///
/// Register [`AsRawFd::as_raw_fd`] for readability with a poller (mio's `SourceFd`, edge- or
/// level-triggered) and call [`Watcher::drain`] when it fires.
#[derive(Debug)]
pub struct Watcher {
    sock: Socket,
    buf: Vec<u8>,
    overruns: u64,
}

impl Watcher {
    /// Subscribes with a receive buffer of [`WATCH_RCVBUF`].
    pub fn new() -> Result<Self, NetlinkError> {
        Self::with_recv_buffer(WATCH_RCVBUF)
    }

    /// Subscribes with a receive buffer of `bytes` (the kernel doubles it for bookkeeping and
    /// caps it at `net.core.rmem_max`). A small buffer overruns sooner; an overrun only costs a
    /// re-dump.
    pub fn with_recv_buffer(bytes: usize) -> Result<Self, NetlinkError> {
        let sock_err = |op| move |source| NetlinkError::Socket { op, source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(sock_err("socket"))?;
        sock.bind_auto().map_err(sock_err("bind"))?;
        sock.set_rx_buf_sz(bytes).map_err(sock_err("SO_RCVBUF"))?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV4_ROUTE,
        ] {
            sock.add_membership(group).map_err(sock_err("NETLINK_ADD_MEMBERSHIP"))?;
        }
        sock.set_non_blocking(true).map_err(sock_err("O_NONBLOCK"))?;
        Ok(Self { sock, buf: vec![0; 64 << 10], overruns: 0 })
    }

    /// Reads every pending notification, until the socket would block (as edge-triggered
    /// pollers require), and returns whether any of them may change [`KernelView::routes`]:
    /// a link change, or an IPv4 address, IPv4 neighbour or IPv4 main-table route change.
    ///
    /// Lost notifications also count as a change: a receive-queue overrun (`ENOBUFS`, counted
    /// in [`Watcher::overruns`]), a truncated datagram or one that does not decode. The caller
    /// re-dumps, so nothing is missed for long.
    pub fn drain(&mut self) -> Result<bool, NetlinkError> {
        let mut changed = false;
        loop {
            let mut dst: &mut [u8] = &mut self.buf[..];
            match self.sock.recv(&mut dst, libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => changed = true, // truncated: re-dump
                Ok(n) => changed |= relevant(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(changed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.overruns += 1;
                    changed = true;
                }
                Err(source) => return Err(NetlinkError::Recv { what: "notifications", source }),
            }
        }
    }

    /// How many times the receive queue overran (`ENOBUFS`) since creation.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Whether any message of a notification datagram may change the next-hop table.
fn relevant(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let Ok(frame) = NetlinkBuffer::new_checked(bytes) else {
            return true; // cannot tell what was lost: assume a change
        };
        let len = frame.length() as usize;
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len]) else {
            return true;
        };
        let hit = match msg.payload {
            NetlinkPayload::InnerMessage(m) => match m {
                RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => true,
                RouteNetlinkMessage::NewAddress(m) | RouteNetlinkMessage::DelAddress(m) => {
                    m.header.family == AddressFamily::Inet
                }
                RouteNetlinkMessage::NewNeighbour(m) | RouteNetlinkMessage::DelNeighbour(m) => {
                    m.header.family == AddressFamily::Inet
                }
                RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m) => {
                    m.header.address_family == AddressFamily::Inet
                        && route_table(&m) == RT_TABLE_MAIN
                }
                _ => false,
            },
            NetlinkPayload::Error(_) | NetlinkPayload::Overrun(_) => true,
            _ => false,
        };
        if hit {
            return true;
        }
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A locally administered MAC ending in `last`.
    fn mac(last: u8) -> Mac {
        [0x02, 0, 0, 0, 0, last]
    }

    fn fmt_mac(m: &Mac) -> String {
        m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// The table as readable lines, hosts then prefixes (longest first).
    fn table(r: &Routes) -> Vec<String> {
        let hop = |h: &NextHop| {
            format!("if{} {} > {}", h.ifindex, fmt_mac(&h.src_mac), fmt_mac(&h.dst_mac))
        };
        let mut out: Vec<String> =
            r.hosts().iter().map(|(ip, h)| format!("host {ip} {}", hop(h))).collect();
        out.extend(r.prefixes().map(|(n, l, h)| format!("prefix {n}/{l} {}", hop(&h))));
        out
    }

    // -----------------------------------------------------------------------
    // routes() on hand-built views

    fn link(ifindex: u32, name: &str, last: u8) -> Link {
        Link { ifindex, name: name.into(), mac: Some(mac(last)), oper_up: true, mtu: 1500 }
    }

    fn neigh(addr: &str, ifindex: u32, mac: Option<Mac>, state: NeighState) -> Neighbour {
        Neighbour { ip: ip(addr), ifindex, mac, state }
    }

    fn route(net: &str, len: u8, gateway: Option<&str>, oif: u32, metric: u32) -> Route {
        Route {
            dst: ip(net),
            prefix_len: len,
            tos: 0,
            kind: RouteKind::Unicast,
            gateway: gateway.map(ip),
            oif: Some(oif),
            metric,
            complex_nexthop: false,
            dead: false,
        }
    }

    /// Link 2 `a` (managed in most tests) and link 3 `c`, each with a connected /24 and a
    /// resolved neighbour, and a gateway route through each.
    fn base() -> KernelView {
        KernelView {
            links: [(2, link(2, "a", 0x01)), (3, link(3, "c", 0x03))].into(),
            addresses: vec![
                Address { ifindex: 2, ip: ip("10.9.0.1"), prefix_len: 24 },
                Address { ifindex: 3, ip: ip("10.8.0.1"), prefix_len: 24 },
            ],
            neighbours: vec![
                neigh("10.9.0.2", 2, Some(mac(0x02)), NeighState::Permanent),
                neigh("10.8.0.2", 3, Some(mac(0x22)), NeighState::Reachable),
            ],
            main_routes: vec![
                route("10.9.0.0", 24, None, 2, 0),
                route("10.8.0.0", 24, None, 3, 0),
                route("10.50.0.0", 16, Some("10.9.0.2"), 2, 0),
                route("10.70.0.0", 16, Some("10.8.0.2"), 3, 0),
            ],
        }
    }

    #[test]
    fn routes_give_host_and_gateway_entries_for_managed_links_only() {
        let v = base();
        assert_eq!(
            table(&v.routes(&[2])),
            [
                "host 10.9.0.2 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
                "prefix 10.50.0.0/16 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
            ]
        );
        assert_eq!(
            table(&v.routes(&[3, 2])),
            [
                "host 10.8.0.2 if3 02:00:00:00:00:03 > 02:00:00:00:00:22",
                "host 10.9.0.2 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
                "prefix 10.50.0.0/16 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
                "prefix 10.70.0.0/16 if3 02:00:00:00:00:03 > 02:00:00:00:00:22",
            ]
        );
        assert!(table(&v.routes(&[])).is_empty());
        assert!(table(&v.routes(&[99])).is_empty());
    }

    #[test]
    fn routes_take_only_usable_neighbours() {
        let mut v = base();
        let usable = [
            (NeighState::Reachable, 0x10),
            (NeighState::Stale, 0x11),
            (NeighState::Delay, 0x12),
            (NeighState::Probe, 0x13),
            (NeighState::Permanent, 0x14),
            (NeighState::NoArp, 0x15),
        ];
        for (state, last) in usable {
            v.neighbours.push(neigh(&format!("10.9.0.{last}"), 2, Some(mac(last)), state));
        }
        let unusable = [
            neigh("10.9.0.32", 2, None, NeighState::Incomplete),
            neigh("10.9.0.33", 2, Some(mac(0x33)), NeighState::Failed),
            neigh("10.9.0.34", 2, Some(mac(0x34)), NeighState::Incomplete),
            neigh("10.9.0.35", 2, Some([0; 6]), NeighState::NoArp),
            neigh("10.9.0.36", 2, Some([0x01, 0, 0x5e, 0, 0, 1]), NeighState::NoArp),
            neigh("10.9.0.37", 2, Some(mac(0x37)), NeighState::None),
            neigh("10.9.0.38", 2, None, NeighState::Reachable),
            neigh("10.9.0.255", 2, Some([0xff; 6]), NeighState::NoArp),
            neigh("224.0.0.22", 2, Some(mac(0x39)), NeighState::NoArp),
        ];
        v.neighbours.extend(unusable);
        let hosts: Vec<Ipv4Addr> = v.routes(&[2]).hosts().iter().map(|e| e.0).collect();
        let mut want = vec![ip("10.9.0.2")];
        want.extend(usable.iter().map(|&(_, last)| Ipv4Addr::new(10, 9, 0, last)));
        assert_eq!(hosts, want);
    }

    #[test]
    fn neigh_state_bits_round_trip_and_validity() {
        for bits in [0u16, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xc0, 0x21] {
            assert_eq!(NeighState::from_bits(bits).bits(), bits);
        }
        assert!(NeighState::from_bits(NUD_PERMANENT | NUD_NOARP).is_valid());
        assert!(!NeighState::from_bits(NUD_STALE | NUD_FAILED).is_valid());
        assert!(!NeighState::None.is_valid());
    }

    #[test]
    fn routes_skip_gateways_without_a_neighbour() {
        let mut v = base();
        v.main_routes.push(route("10.60.0.0", 16, Some("10.9.0.3"), 2, 0));
        // A neighbour for the gateway on another link does not resolve it on this one.
        v.neighbours.push(neigh("10.9.0.3", 3, Some(mac(0x33)), NeighState::Permanent));
        let r = v.routes(&[2, 3]);
        assert!(r.lookup(u32::from(ip("10.60.1.1"))).is_none());
        assert!(r.lookup(u32::from(ip("10.50.1.1"))).is_some());
    }

    #[test]
    fn routes_never_let_a_shorter_prefix_capture_a_route_left_to_the_kernel() {
        let mut v = base();
        v.main_routes.push(route("0.0.0.0", 0, Some("10.9.0.2"), 2, 0));
        v.main_routes.push(route("10.50.7.0", 24, Some("10.9.0.3"), 2, 0)); // unresolved
        v.main_routes.push(route("10.51.0.0", 16, Some("10.9.0.2"), 2, 0));
        v.main_routes.push(route("10.51.3.0", 24, Some("10.8.0.2"), 3, 0)); // unmanaged
        v.main_routes.push(route("10.52.0.0", 16, Some("10.9.0.2"), 2, 0));
        v.addresses.push(Address { ifindex: 2, ip: ip("10.52.0.1"), prefix_len: 32 }); // local
        v.main_routes.push(route("10.53.0.0", 16, Some("10.9.0.2"), 2, 0));
        let mut tos = route("10.53.0.0", 16, Some("10.9.0.3"), 2, 0);
        tos.tos = 0x10;
        v.main_routes.push(tos);
        v.main_routes.push(route("10.54.0.0", 16, Some("10.9.0.2"), 2, 0));
        v.main_routes
            .push(Route { kind: RouteKind::Blackhole, ..route("10.54.9.0", 24, None, 0, 0) });

        let r = v.routes(&[2]);
        assert_eq!(
            table(&r),
            ["host 10.9.0.2 if2 02:00:00:00:00:01 > 02:00:00:00:00:02"],
            "every gateway prefix here contains something the kernel must handle"
        );
        for miss in ["10.50.7.1", "10.50.1.1", "10.51.3.1", "10.51.1.1", "10.52.0.1", "1.1.1.1"] {
            assert!(r.lookup(u32::from(ip(miss))).is_none(), "{miss}");
        }
    }

    #[test]
    fn routes_keep_a_prefix_whose_pod_routes_are_all_resolved() {
        let mut v = base();
        // Calico style: the pod block's /32s point at their own interface, resolved.
        v.links.insert(7, link(7, "cali1", 0xee));
        v.main_routes.push(route("10.50.0.5", 32, None, 7, 0));
        v.neighbours.push(neigh("10.50.0.5", 7, Some(mac(0x55)), NeighState::Reachable));
        assert_eq!(
            table(&v.routes(&[2, 7])),
            [
                "host 10.9.0.2 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
                "host 10.50.0.5 if7 02:00:00:00:00:ee > 02:00:00:00:00:55",
                "prefix 10.50.0.0/16 if2 02:00:00:00:00:01 > 02:00:00:00:00:02",
            ]
        );
        // Unmanaged, or unresolved, that /32 punches a hole the /16 must not cover.
        assert_eq!(
            table(&v.routes(&[2])),
            ["host 10.9.0.2 if2 02:00:00:00:00:01 > 02:00:00:00:00:02"]
        );
    }

    #[test]
    fn routes_follow_the_lowest_metric() {
        let mut v = base();
        v.neighbours.push(neigh("10.9.0.4", 2, Some(mac(0x04)), NeighState::Stale));
        v.main_routes.push(route("10.60.0.0", 16, Some("10.9.0.4"), 2, 200));
        v.main_routes.push(route("10.60.0.0", 16, Some("10.9.0.2"), 2, 100));
        v.main_routes.push(route("10.61.0.0", 16, Some("10.9.0.2"), 2, 200));
        v.main_routes.push(route("10.61.0.0", 16, Some("10.9.0.3"), 2, 100)); // unresolved
        let r = v.routes(&[2]);
        assert_eq!(r.lookup(u32::from(ip("10.60.0.1"))).map(|h| h.dst_mac), Some(mac(0x02)));
        assert!(r.lookup(u32::from(ip("10.61.0.1"))).is_none(), "the kernel uses metric 100");
    }

    #[test]
    fn routes_leave_complex_dead_and_non_unicast_routes_to_the_kernel() {
        let mut v = base();
        v.main_routes.push(Route { complex_nexthop: true, ..route("10.60.0.0", 16, None, 2, 0) });
        v.main_routes.push(Route { dead: true, ..route("10.61.0.0", 16, Some("10.9.0.2"), 2, 0) });
        v.main_routes.push(Route {
            kind: RouteKind::Unreachable,
            ..route("10.62.0.0", 16, Some("10.9.0.2"), 2, 0)
        });
        let r = v.routes(&[2]);
        for miss in ["10.60.0.1", "10.61.0.1", "10.62.0.1"] {
            assert!(r.lookup(u32::from(ip(miss))).is_none(), "{miss}");
        }
        assert!(r.lookup(u32::from(ip("10.50.0.1"))).is_some());
    }

    #[test]
    fn routes_need_an_up_link_with_a_mac() {
        for change in [
            |l: &mut Link| l.oper_up = false,
            |l: &mut Link| l.mac = None,
            |l: &mut Link| l.mac = Some([0; 6]),
        ] {
            let mut v = base();
            change(v.links.get_mut(&2).unwrap());
            assert!(table(&v.routes(&[2])).is_empty());
        }
    }

    #[test]
    fn host_entries_need_the_kernel_to_reach_the_neighbour_on_link_there() {
        let mut v = base();
        // No route covers it.
        v.neighbours.push(neigh("192.168.1.1", 2, Some(mac(0x31)), NeighState::Permanent));
        // Its route goes through a gateway.
        v.neighbours.push(neigh("10.50.0.9", 2, Some(mac(0x32)), NeighState::Permanent));
        // Its route leaves through another interface.
        v.neighbours.push(neigh("10.8.0.9", 2, Some(mac(0x33)), NeighState::Permanent));
        // A local address.
        v.neighbours.push(neigh("10.9.0.1", 2, Some(mac(0x34)), NeighState::Permanent));
        let hosts: Vec<Ipv4Addr> = v.routes(&[2, 3]).hosts().iter().map(|e| e.0).collect();
        assert_eq!(hosts, [ip("10.8.0.2"), ip("10.9.0.2")]);
    }

    #[test]
    fn routes_are_deterministic_whatever_the_input_order() {
        let mut v = base();
        v.links.insert(4, link(4, "e", 0x04));
        v.main_routes.push(route("10.7.0.0", 24, None, 4, 0));
        // The same address resolved on two managed links: the lower ifindex wins.
        v.neighbours.push(neigh("10.9.0.2", 4, Some(mac(0x42)), NeighState::Permanent));
        v.main_routes.push(route("10.9.0.2", 32, None, 4, 10));
        let want = table(&v.routes(&[2, 3, 4]));
        v.neighbours.reverse();
        v.main_routes.reverse();
        v.addresses.reverse();
        assert_eq!(table(&v.routes(&[4, 3, 2])), want);
    }

    // -----------------------------------------------------------------------
    // Parsing and notification filtering on crafted messages

    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
            msg.finalize();
            let mut b = vec![0; msg.buffer_len()];
            msg.serialize(&mut b);
            out.extend_from_slice(&b);
            out.resize((out.len() + 3) & !3, 0);
        }
        out
    }

    fn neigh_msg(family: AddressFamily) -> RouteNetlinkMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        RouteNetlinkMessage::NewNeighbour(m)
    }

    fn route_msg(table: u8, extra: Option<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = table;
        m.header.kind = RouteType::Unicast;
        m.header.destination_prefix_length = 16;
        m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(ip("10.50.3.4"))));
        m.attributes.extend(extra);
        m
    }

    #[test]
    fn notifications_are_filtered_to_what_routes_reads() {
        let main = RT_TABLE_MAIN as u8;
        let cases: Vec<(&str, Vec<RouteNetlinkMessage>, bool)> = vec![
            ("ipv4 neighbour", vec![neigh_msg(AddressFamily::Inet)], true),
            ("ipv6 neighbour", vec![neigh_msg(AddressFamily::Inet6)], false),
            ("bridge fdb", vec![neigh_msg(AddressFamily::Bridge)], false),
            ("main route", vec![RouteNetlinkMessage::NewRoute(route_msg(main, None))], true),
            ("table 100", vec![RouteNetlinkMessage::DelRoute(route_msg(100, None))], false),
            (
                "RTA_TABLE main",
                vec![RouteNetlinkMessage::NewRoute(route_msg(
                    252,
                    Some(RouteAttribute::Table(RT_TABLE_MAIN)),
                ))],
                true,
            ),
            (
                "RTA_TABLE 1000",
                vec![RouteNetlinkMessage::NewRoute(route_msg(
                    252,
                    Some(RouteAttribute::Table(1000)),
                ))],
                false,
            ),
            ("link", vec![RouteNetlinkMessage::DelLink(LinkMessage::default())], true),
            (
                "irrelevant then relevant",
                vec![neigh_msg(AddressFamily::Inet6), neigh_msg(AddressFamily::Inet)],
                true,
            ),
        ];
        for (name, msgs, want) in cases {
            assert_eq!(relevant(&datagram(msgs)), want, "{name}");
        }
        assert!(relevant(&[1, 2, 3]), "undecodable counts as a change");
        assert!(!relevant(&[]));
    }

    #[test]
    fn route_messages_parse_main_table_only() {
        let mut m = route_msg(RT_TABLE_MAIN as u8, None);
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(ip("10.9.0.2"))));
        m.attributes.push(RouteAttribute::Oif(2));
        m.attributes.push(RouteAttribute::Priority(50));
        let r = parse_route(&m).unwrap();
        assert_eq!(
            r,
            Route {
                metric: 50,
                ..route("10.50.0.0", 16, Some("10.9.0.2"), 2, 0) // host bits cleared
            }
        );
        assert!(parse_route(&route_msg(255, None)).is_none(), "local table");
        let mut cloned = route_msg(RT_TABLE_MAIN as u8, None);
        cloned.header.flags = RouteFlags::Cloned;
        assert!(parse_route(&cloned).is_none());
        let mut nh = route_msg(RT_TABLE_MAIN as u8, Some(RouteAttribute::NhId(7)));
        nh.header.flags = RouteFlags::Linkdown;
        let r = parse_route(&nh).unwrap();
        assert!(r.complex_nexthop && r.dead);
    }

    // -----------------------------------------------------------------------
    // Against the kernel, in network namespaces of our own

    use std::fs::File;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Whether we are root; prints the skip line if not.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            println!("skipped: needs root to create network namespaces");
        }
        root
    }

    static NS_SEQ: AtomicUsize = AtomicUsize::new(0);

    /// A network namespace of our own, deleted on drop (with every interface in it).
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Self {
            let name = format!(
                "kxdp-nl-{}-{}",
                std::process::id(),
                NS_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            run_ip(&["netns", "add", &name], None);
            Netns { name }
        }

        /// `ip -n NAME ARGS...`, panicking on failure.
        fn ip(&self, args: &str) {
            let mut all = vec!["-n", &self.name];
            all.extend(args.split_whitespace());
            run_ip(&all, None);
        }

        /// `ip -n NAME -batch -` with `lines` on stdin.
        fn ip_batch(&self, lines: &str) {
            run_ip(&["-n", &self.name, "-batch", "-"], Some(lines));
        }

        /// Runs `f` on a new thread that entered this namespace, so the harness's threads stay
        /// where they are. Sockets opened there stay in the namespace wherever they are used.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/var/run/netns/{}", self.name);
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: `file` is an open netns fd; setns moves only this thread, which
                    // exists for this closure alone.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        }

        /// Dumps until every named link is operationally up (the kernel reports carrier
        /// asynchronously), at most 5 s.
        fn dump_when_up(&self, names: &[&str]) -> KernelView {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let v = self.run(dump).expect("dump");
                if names.iter().all(|n| v.link_by_name(n).is_some_and(|l| l.oper_up)) {
                    return v;
                }
                assert!(Instant::now() < deadline, "links {names:?} not up: {:?}", v.links);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    fn run_ip(args: &[&str], stdin: Option<&str>) {
        let mut child = Command::new("ip")
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ip(8); is iproute2 installed?");
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Two veth pairs: `a` (MAC ..:01, 10.9.0.1/24, meant to be managed) with peer `b`, and `c`
    /// (MAC ..:03, 10.8.0.1/24) with peer `d`. No IPv6 link-local addresses and no ARP probes,
    /// so the kernel sends nothing on its own; nothing here sends traffic at all.
    fn two_links() -> Netns {
        let ns = Netns::new();
        for (x, y, last, addr) in [("a", "b", 0x01, "10.9.0.1/24"), ("c", "d", 0x03, "10.8.0.1/24")]
        {
            ns.ip(&format!("link add name {x} type veth peer name {y}"));
            ns.ip(&format!("link set dev {x} address {}", fmt_mac(&mac(last))));
            for dev in [x, y] {
                ns.ip(&format!("link set dev {dev} addrgenmode none"));
                ns.ip(&format!("link set dev {dev} up"));
            }
            ns.ip(&format!(
                "ntable change name arp_cache dev {x} mcast_probes 0 ucast_probes 0 app_probes 0"
            ));
            ns.ip(&format!("addr add {addr} dev {x}"));
        }
        ns
    }

    #[test]
    fn dump_and_routes_match_the_kernel() {
        if !root() {
            return;
        }
        let ns = two_links();
        ns.ip_batch(
            "neigh add 10.9.0.2 lladdr 02:00:00:00:00:02 dev a nud permanent
             neigh add 10.9.0.7 lladdr 02:00:00:00:00:07 dev a nud stale
             neigh add 10.9.0.8 lladdr 02:00:00:00:00:08 dev a nud reachable
             neigh add 10.9.0.11 lladdr 02:00:00:00:00:0b dev a nud noarp
             neigh add 10.9.0.10 lladdr 00:00:00:00:00:00 dev a nud noarp
             neigh add 10.9.0.5 dev a nud incomplete
             neigh add 10.9.0.6 dev a nud failed
             neigh add 10.8.0.2 lladdr 02:00:00:00:00:22 dev c nud permanent
             route add 10.50.0.0/16 via 10.9.0.2 dev a
             route add 10.51.0.0/16 via 10.9.0.2 dev a metric 50
             route add 10.60.0.0/16 via 10.9.0.3 dev a
             route add 10.70.0.0/16 via 10.8.0.2 dev c
             route add 10.244.0.5/32 dev a scope link
             neigh add 10.244.0.5 lladdr 02:00:00:00:00:05 dev a nud permanent
             route add 10.244.0.6/32 dev a scope link
             route add default via 10.9.0.2 dev a
             route add 10.77.0.0/16 via 10.9.0.2 dev a table 100
             ",
        );
        let v = ns.dump_when_up(&["a", "c"]);
        let a = v.ifindex("a").expect("link a");
        let c = v.ifindex("c").expect("link c");

        let la = v.link_by_name("a").unwrap();
        assert_eq!((la.mac, la.mtu, la.oper_up), (Some(mac(0x01)), 1500, true));
        assert_eq!(v.link(c).unwrap().mac, Some(mac(0x03)));
        let lo = v.link_by_name("lo").expect("lo");
        assert!(!lo.oper_up, "lo is down in a new namespace");
        assert_eq!(
            v.addresses(a).copied().collect::<Vec<_>>(),
            [Address { ifindex: a, ip: ip("10.9.0.1"), prefix_len: 24 }]
        );

        let state = |addr: &str| v.neighbour(ip(addr), a).map(|n| n.state);
        assert_eq!(state("10.9.0.2"), Some(NeighState::Permanent));
        assert_eq!(state("10.9.0.7"), Some(NeighState::Stale));
        assert_eq!(state("10.9.0.11"), Some(NeighState::NoArp));
        assert_eq!(state("10.9.0.6"), Some(NeighState::Failed));
        assert!(matches!(state("10.9.0.5"), Some(NeighState::Incomplete | NeighState::Failed)));
        assert_eq!(v.neighbour(ip("10.9.0.10"), a).unwrap().mac, Some([0; 6]));
        assert_eq!(v.neighbour(ip("10.9.0.2"), a).unwrap().mac, Some(mac(0x02)));

        let find = |net: &str, len: u8| {
            v.main_routes.iter().find(|r| r.dst == ip(net) && r.prefix_len == len).copied()
        };
        let r50 = find("10.50.0.0", 16).expect("10.50.0.0/16");
        assert_eq!((r50.gateway, r50.oif, r50.metric), (Some(ip("10.9.0.2")), Some(a), 0));
        assert_eq!(find("10.51.0.0", 16).unwrap().metric, 50);
        assert_eq!(find("10.9.0.0", 24).map(|r| (r.gateway, r.oif)), Some((None, Some(a))));
        assert!(find("10.77.0.0", 16).is_none(), "table 100 is not read");
        assert!(v.main_routes.iter().all(|r| r.kind == RouteKind::Unicast), "local table");

        let hop = |dst: u8| format!("02:00:00:00:00:01 > 02:00:00:00:00:{dst:02x}");
        assert_eq!(
            table(&v.routes(&[a])),
            [
                format!("host 10.9.0.2 if{a} {}", hop(0x02)),
                format!("host 10.9.0.7 if{a} {}", hop(0x07)),
                format!("host 10.9.0.8 if{a} {}", hop(0x08)),
                format!("host 10.9.0.11 if{a} {}", hop(0x0b)),
                format!("host 10.244.0.5 if{a} {}", hop(0x05)),
                format!("prefix 10.50.0.0/16 if{a} {}", hop(0x02)),
                format!("prefix 10.51.0.0/16 if{a} {}", hop(0x02)),
            ],
            "no 10.60/16 (gateway unresolved), no 10.70/16 (c unmanaged), no default \
             (it contains the connected subnets)"
        );
        let both = v.routes(&[a, c]);
        assert_eq!(
            both.host(u32::from(ip("10.8.0.2"))),
            Some(&NextHop { ifindex: c, src_mac: mac(0x03), dst_mac: mac(0x22) })
        );
        assert_eq!(
            both.lookup(u32::from(ip("10.70.1.1"))),
            Some(&NextHop { ifindex: c, src_mac: mac(0x03), dst_mac: mac(0x22) })
        );
        assert!(both.lookup(u32::from(ip("10.60.1.1"))).is_none());
        assert!(both.lookup(u32::from(ip("1.1.1.1"))).is_none());
    }

    #[test]
    fn dump_reads_multipart_replies() {
        if !root() {
            return;
        }
        let ns = two_links();
        let mut batch = String::new();
        for i in 0..1000u32 {
            let (hi, lo) = (i / 250, i % 250 + 1);
            batch += &format!(
                "neigh add 10.9.{}.{lo} lladdr 02:00:00:01:{hi:02x}:{lo:02x} dev a nud permanent\n",
                100 + hi
            );
        }
        ns.ip_batch(&batch);
        let v = ns.run(dump).expect("dump");
        let a = v.ifindex("a").unwrap();
        let ours =
            v.neighbours.iter().filter(|n| n.ifindex == a && n.ip.octets()[2] >= 100).count();
        assert_eq!(ours, 1000, "one dump spans many datagrams");
        assert!(v.neighbours.windows(2).all(|w| (w[0].ip, w[0].ifindex) < (w[1].ip, w[1].ifindex)));
    }

    /// Waits up to `timeout` for `fd` to become readable.
    fn readable(fd: RawFd, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        n > 0
    }

    /// Drains until nothing arrives for 300 ms (at most 5 s), so earlier setup is forgotten.
    fn settle(w: &mut Watcher) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while readable(w.as_raw_fd(), Duration::from_millis(300)) && Instant::now() < deadline {
            w.drain().expect("drain");
        }
    }

    /// Whether the watcher reports a relevant change within `timeout`.
    fn changed_within(w: &mut Watcher, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !readable(w.as_raw_fd(), left) {
                return false;
            }
            if w.drain().expect("drain") {
                return true;
            }
        }
    }

    #[test]
    fn watcher_signals_relevant_changes_only() {
        if !root() {
            return;
        }
        let ns = two_links();
        ns.ip("neigh add 10.9.0.2 lladdr 02:00:00:00:00:02 dev a nud permanent");
        ns.ip("route add 10.50.0.0/16 via 10.9.0.2 dev a");
        let mut w = ns.run(Watcher::new).expect("watcher");
        ns.dump_when_up(&["a", "c"]);
        settle(&mut w);
        assert!(!w.drain().unwrap(), "nothing pending after settling");

        // Irrelevant: another table, an IPv6 neighbour. Each arrives, and is not a change.
        for change in [
            "route add 10.77.0.0/16 via 10.9.0.2 dev a table 100",
            "-6 neigh add fd00::2 lladdr 02:00:00:00:00:62 dev a nud permanent",
        ] {
            ns.ip(change);
            assert!(readable(w.as_raw_fd(), Duration::from_secs(2)), "{change}: nothing arrived");
            assert!(!changed_within(&mut w, Duration::from_millis(300)), "{change}");
        }

        // Relevant: the gateway's MAC changes; a re-dump sees it.
        ns.ip("neigh replace 10.9.0.2 lladdr 02:00:00:00:00:09 dev a nud permanent");
        assert!(changed_within(&mut w, Duration::from_secs(2)), "neigh replace");
        let v = ns.run(dump).unwrap();
        let a = v.ifindex("a").unwrap();
        assert_eq!(v.routes(&[a]).lookup(u32::from(ip("10.50.0.1"))).unwrap().dst_mac, mac(0x09));

        for change in [
            "route add 10.60.0.0/16 via 10.9.0.2 dev a",
            "addr add 10.9.0.100/32 dev a",
            "link set dev c down",
        ] {
            ns.ip(change);
            assert!(changed_within(&mut w, Duration::from_secs(2)), "{change}");
        }
        assert_eq!(w.overruns(), 0);
    }

    #[test]
    fn watcher_overrun_asks_for_a_redump() {
        if !root() {
            return;
        }
        let ns = two_links();
        let mut w = ns.run(|| Watcher::with_recv_buffer(4096)).expect("watcher");
        let mut batch = String::new();
        for i in 0..500u32 {
            let (hi, lo) = (i / 250, i % 250 + 1);
            batch += &format!(
                "neigh add 10.9.{}.{lo} lladdr 02:00:00:02:{hi:02x}:{lo:02x} dev a nud permanent\n",
                100 + hi
            );
        }
        ns.ip_batch(&batch);
        assert!(w.drain().expect("an overrun is not an error"), "overrun counts as a change");
        assert!(w.overruns() >= 1, "the queue of {} bytes overran", 4096);
        settle(&mut w);
        assert!(!w.drain().unwrap(), "after the overrun, the socket works on");
        ns.ip("neigh replace 10.9.0.2 lladdr 02:00:00:00:00:02 dev a nud permanent");
        assert!(changed_within(&mut w, Duration::from_secs(2)));
    }
}
