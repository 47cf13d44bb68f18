//! The XDP program's verdicts, driven with `BPF_PROG_TEST_RUN`: fixture rows
//! `{name, frame, verdict, reason}`, each checked to move exactly its own
//! counter by one. Needs root; skips otherwise.

mod common;

use std::net::Ipv4Addr;

use common::{arp_request, udp4, udp4_vlan, udp6, Xsk};
use xdp_redirect::{Counters, Direction, Error, Prefix, Verdict, XdpRedirect};

/// Service CIDR (dst).
const SVC_NET: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Highest address in 10.96.0.0/12, and the first past it.
const SVC_LAST: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 255);
const SVC_PAST: Ipv4Addr = Ipv4Addr::new(10, 112, 0, 0);
/// A node address for NodePorts (dst /32).
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NODE_NEXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// Pod CIDR (src).
const POD_NET: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
/// A client outside every prefix.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

/// Why the program gave its verdict: which counter must move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Steered,
    NotOurs,
    NonIpv4,
    Malformed,
    NoSocket,
    Draining,
}

fn counter(c: &Counters, r: Reason) -> u64 {
    match r {
        Reason::Steered => c.steered,
        Reason::NotOurs => c.passed_not_ours,
        Reason::NonIpv4 => c.passed_non_ipv4,
        Reason::Malformed => c.passed_malformed,
        Reason::NoSocket => c.passed_no_socket,
        Reason::Draining => c.passed_draining,
    }
}

const ALL: [Reason; 6] = [
    Reason::Steered,
    Reason::NotOurs,
    Reason::NonIpv4,
    Reason::Malformed,
    Reason::NoSocket,
    Reason::Draining,
];

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: Verdict,
    reason: Reason,
}

fn case(name: &'static str, frame: Vec<u8>, verdict: Verdict, reason: Reason) -> Case {
    Case { name, frame, verdict, reason }
}

/// Runs every case and checks verdict and counters; reports all failures.
fn run_cases(x: &XdpRedirect, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let before = x.counters().unwrap();
        let verdict = x.test_run(&c.frame).unwrap();
        let after = x.counters().unwrap();
        if verdict != c.verdict {
            failures.push(format!("{}: verdict {verdict:?}, want {:?}", c.name, c.verdict));
        }
        for r in ALL {
            let moved = counter(&after, r) - counter(&before, r);
            let want = u64::from(r == c.reason);
            if moved != want {
                failures.push(format!("{}: counter {r:?} moved by {moved}, want {want}", c.name));
            }
        }
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

/// A loaded program with the test prefixes: 10.96.0.0/12 and 192.0.2.10/32
/// by destination, 10.244.0.0/16 by source.
fn loaded() -> XdpRedirect {
    let x = XdpRedirect::load().unwrap();
    x.add_prefix(Direction::Dst, SVC_NET, 12).unwrap();
    x.add_prefix(Direction::Dst, NODE, 32).unwrap();
    x.add_prefix(Direction::Src, POD_NET, 16).unwrap();
    x
}

/// `udp4(CLIENT, VIP)` with a byte of the IPv4 header changed.
fn vip_frame_with(offset_in_ip: usize, value: u8) -> Vec<u8> {
    let mut f = udp4(CLIENT, VIP, b"hello");
    f[14 + offset_in_ip] = value;
    f
}

/// `udp4(CLIENT, VIP)` with the IPv4 total length set to `len`.
fn vip_frame_tot_len(len: u16) -> Vec<u8> {
    let mut f = udp4(CLIENT, VIP, b"hello");
    f[16..18].copy_from_slice(&len.to_be_bytes());
    f
}

/// A VLAN frame with a second 802.1Q tag inside the first (QinQ).
fn double_tagged() -> Vec<u8> {
    let mut f = udp4_vlan(100, CLIENT, VIP, b"hello");
    // After the MACs: [0x8100, tci] then [0x0800 ...]; insert another tag.
    f.splice(16..16, [0x00, 0x64, 0x81, 0x00]);
    f
}

/// Every case that does not depend on a socket being present. `ours` is
/// the verdict and reason for packets the dataplane owns.
#[rustfmt::skip] // a table reads better as one row per case
fn common_cases(ours: (Verdict, Reason)) -> Vec<Case> {
    use Reason::*;
    use Verdict::Pass;
    let (v, r) = ours;
    // IHL 15 (60 bytes) in a frame holding 20 bytes of IPv4 header and 8 of
    // UDP: the options would run past the end of the frame.
    let mut long_options = vip_frame_with(0, 0x4f);
    long_options.truncate(14 + 28);
    // Ethernet pads short frames to 60 bytes, so the frame is longer than
    // the IPv4 total length. That is normal, not malformed.
    let mut padded = udp4(CLIENT, VIP, b"");
    padded.resize(60, 0);
    let vip_empty = udp4(CLIENT, VIP, b"");
    let vlan_empty = udp4_vlan(100, CLIENT, VIP, b"");

    vec![
        case("dst in service CIDR",                     udp4(CLIENT, VIP, b"hello"),        v,    r),
        case("dst at the last address of the CIDR",     udp4(CLIENT, SVC_LAST, b"x"),       v,    r),
        case("dst just past the CIDR",                  udp4(CLIENT, SVC_PAST, b"x"),       Pass, NotOurs),
        case("dst is the node address (/32)",           udp4(CLIENT, NODE, b"x"),           v,    r),
        case("dst next to the node address",            udp4(CLIENT, NODE_NEXT, b"x"),      Pass, NotOurs),
        case("src in pod CIDR (backend reply)",         udp4(POD, CLIENT, b"x"),            v,    r),
        case("src in service CIDR is not a src prefix", udp4(VIP, CLIENT, b"x"),            Pass, NotOurs),
        case("dst in pod CIDR is not a dst prefix",     udp4(CLIENT, POD, b"x"),            Pass, NotOurs),
        case("neither address ours",                    udp4(CLIENT, OTHER, b"x"),          Pass, NotOurs),
        case("ARP request for a VIP",                   arp_request(CLIENT, VIP),           Pass, NonIpv4),
        case("IPv6",                                    udp6(),                             Pass, NonIpv4),
        case("802.1Q tagged, dst VIP",                  udp4_vlan(100, CLIENT, VIP, b"x"),  v,    r),
        case("802.1Q tagged, src pod",                  udp4_vlan(7, POD, CLIENT, b"x"),    v,    r),
        case("802.1Q tagged, not ours",                 udp4_vlan(100, CLIENT, OTHER, b"x"), Pass, NotOurs),
        case("double tagged (QinQ)",                    double_tagged(),                    Pass, NonIpv4),
        case("Ethernet padding after the packet",       padded,                             v,    r),
        case("Ethernet header only, IPv4 type",         vip_empty[..14].to_vec(),           Pass, Malformed),
        case("IPv4 header cut at 19 bytes",             vip_empty[..14 + 19].to_vec(),      Pass, Malformed),
        case("802.1Q tag cut short",                    vlan_empty[..16].to_vec(),          Pass, Malformed),
        case("802.1Q tagged, IPv4 header cut",          vlan_empty[..18 + 12].to_vec(),     Pass, Malformed),
        case("IPv4 type but version 6",                 vip_frame_with(0, 0x65),            Pass, Malformed),
        case("IHL 4 (below minimum)",                   vip_frame_with(0, 0x44),            Pass, Malformed),
        case("IHL 15, options past the frame",          long_options,                       Pass, Malformed),
        case("total length past the frame",             vip_frame_tot_len(1000),            Pass, Malformed),
        case("total length below header length",        vip_frame_tot_len(19),              Pass, Malformed),
    ]
}

#[test]
fn verdicts_without_a_socket() {
    require_root!();
    let x = loaded();
    run_cases(&x, &common_cases((Verdict::Pass, Reason::NoSocket)));
}

#[test]
fn verdicts_with_a_socket_on_the_queue() {
    require_root!();
    let x = loaded();
    let xsk = Xsk::new();
    // test_run delivers on queue 0 of loopback.
    x.set_socket(0, xsk.fd()).unwrap();
    run_cases(&x, &common_cases((Verdict::Redirect, Reason::Steered)));
}

#[test]
fn no_prefixes_steers_nothing() {
    require_root!();
    let x = XdpRedirect::load().unwrap();
    let xsk = Xsk::new();
    x.set_socket(0, xsk.fd()).unwrap();
    run_cases(
        &x,
        &[
            case("VIP", udp4(CLIENT, VIP, b"x"), Verdict::Pass, Reason::NotOurs),
            case("pod", udp4(POD, CLIENT, b"x"), Verdict::Pass, Reason::NotOurs),
        ],
    );
}

#[test]
fn socket_slot_is_per_queue_and_can_be_cleared() {
    require_root!();
    let x = loaded();
    let xsk = Xsk::new();
    let vip = || udp4(CLIENT, VIP, b"x");

    // A socket on queue 1 does not take queue 0's packets.
    x.set_socket(1, xsk.fd()).unwrap();
    run_cases(&x, &[case("socket on queue 1 only", vip(), Verdict::Pass, Reason::NoSocket)]);

    x.set_socket(0, xsk.fd()).unwrap();
    run_cases(&x, &[case("socket on queue 0", vip(), Verdict::Redirect, Reason::Steered)]);

    x.clear_socket(0).unwrap();
    x.clear_socket(0).unwrap(); // already empty: fine
    run_cases(&x, &[case("cleared", vip(), Verdict::Pass, Reason::NoSocket)]);
}

#[test]
fn closing_the_socket_empties_its_slot() {
    require_root!();
    // What makes a crash safe: the kernel removes a closed socket from the
    // map, and its queue's packets fall back to the kernel.
    let x = loaded();
    let xsk = Xsk::new();
    x.set_socket(0, xsk.fd()).unwrap();
    run_cases(&x, &[case("open", udp4(CLIENT, VIP, b"x"), Verdict::Redirect, Reason::Steered)]);
    drop(xsk);
    run_cases(&x, &[case("closed", udp4(CLIENT, VIP, b"x"), Verdict::Pass, Reason::NoSocket)]);
}

#[test]
fn draining_passes_everything() {
    require_root!();
    let x = loaded();
    let xsk = Xsk::new();
    x.set_socket(0, xsk.fd()).unwrap();
    assert!(!x.draining().unwrap(), "steering is on after load");

    x.set_draining(true).unwrap();
    assert!(x.draining().unwrap());
    run_cases(
        &x,
        &[
            case("VIP", udp4(CLIENT, VIP, b"x"), Verdict::Pass, Reason::Draining),
            case("ARP", arp_request(CLIENT, VIP), Verdict::Pass, Reason::Draining),
        ],
    );

    x.set_draining(false).unwrap();
    run_cases(&x, &[case("resumed", udp4(CLIENT, VIP, b"x"), Verdict::Redirect, Reason::Steered)]);
}

#[test]
fn prefixes_add_list_remove() {
    require_root!();
    let x = XdpRedirect::load().unwrap();
    let p = |a: [u8; 4], l| Prefix::new(Ipv4Addr::from(a), l).unwrap();

    assert_eq!(x.prefixes(Direction::Dst).unwrap(), vec![]);
    x.add_prefix(Direction::Dst, Ipv4Addr::new(192, 0, 2, 10), 32).unwrap();
    x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 12).unwrap();
    x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 12).unwrap(); // idempotent
    x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 16).unwrap();
    x.add_prefix(Direction::Src, Ipv4Addr::new(10, 244, 0, 0), 16).unwrap();

    assert_eq!(
        x.prefixes(Direction::Dst).unwrap(),
        vec![p([10, 96, 0, 0], 12), p([10, 96, 0, 0], 16), p([192, 0, 2, 10], 32)]
    );
    assert_eq!(x.prefixes(Direction::Src).unwrap(), vec![p([10, 244, 0, 0], 16)]);

    // Removal is of an exact entry: the /16 goes, the /12 stays.
    assert!(x.remove_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 16).unwrap());
    assert!(!x.remove_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 16).unwrap());
    assert!(!x.remove_prefix(Direction::Src, Ipv4Addr::new(192, 0, 2, 10), 32).unwrap());
    assert_eq!(
        x.prefixes(Direction::Dst).unwrap(),
        vec![p([10, 96, 0, 0], 12), p([192, 0, 2, 10], 32)]
    );

    let err = x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 1), 12).unwrap_err();
    assert!(matches!(err, Error::InvalidPrefix { .. }), "{err}");
    let err = x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 40).unwrap_err();
    assert!(matches!(err, Error::InvalidPrefix { .. }), "{err}");
}

#[test]
fn removing_a_prefix_stops_steering() {
    require_root!();
    let x = loaded();
    run_cases(&x, &[case("before", udp4(CLIENT, NODE, b"x"), Verdict::Pass, Reason::NoSocket)]);
    assert!(x.remove_prefix(Direction::Dst, NODE, 32).unwrap());
    run_cases(&x, &[case("after", udp4(CLIENT, NODE, b"x"), Verdict::Pass, Reason::NotOurs)]);
}

#[test]
fn sync_prefixes_writes_only_the_difference() {
    require_root!();
    let x = XdpRedirect::load().unwrap();
    let p = |a: [u8; 4], l| Prefix::new(Ipv4Addr::from(a), l).unwrap();
    let first = [p([10, 96, 0, 0], 12), p([192, 0, 2, 10], 32)];
    assert_eq!(x.sync_prefixes(Direction::Dst, &first).unwrap(), (2, 0));
    assert_eq!(x.sync_prefixes(Direction::Dst, &first).unwrap(), (0, 0));

    let second = [p([192, 0, 2, 11], 32), p([10, 96, 0, 0], 12), p([10, 96, 0, 0], 12)];
    assert_eq!(x.sync_prefixes(Direction::Dst, &second).unwrap(), (1, 1));
    assert_eq!(
        x.prefixes(Direction::Dst).unwrap(),
        vec![p([10, 96, 0, 0], 12), p([192, 0, 2, 11], 32)]
    );
    assert_eq!(x.prefixes(Direction::Src).unwrap(), vec![], "Src untouched");
    assert_eq!(x.sync_prefixes(Direction::Dst, &[]).unwrap(), (0, 2));
    assert_eq!(x.prefixes(Direction::Dst).unwrap(), vec![]);
}

#[test]
fn set_socket_rejects_bad_queue_and_non_xdp_fd() {
    require_root!();
    let x = XdpRedirect::load().unwrap();
    let slots = x.socket_slots();
    assert!(slots >= 64, "room for a NIC's queues: {slots}");

    let xsk = Xsk::new();
    let err = x.set_socket(slots, xsk.fd()).unwrap_err();
    assert!(matches!(err, Error::QueueOutOfRange { queue, .. } if queue == slots), "{err}");
    assert!(matches!(x.clear_socket(slots), Err(Error::QueueOutOfRange { .. })));

    // Bound to loopback only; nothing is sent.
    let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let err = x.set_socket(0, std::os::fd::AsRawFd::as_raw_fd(&udp)).unwrap_err();
    assert!(matches!(err, Error::Map { map: "xsks", .. }), "{err}");
    assert!(err.to_string().contains("queue 0"), "{err}");
}

#[test]
fn counters_start_at_zero_per_instance() {
    require_root!();
    let a = loaded();
    a.test_run(&udp4(CLIENT, VIP, b"x")).unwrap();
    assert_eq!(a.counters().unwrap().total(), 1);
    let b = loaded();
    assert_eq!(b.counters().unwrap(), Counters::default());
    assert_ne!(a.prog_id().unwrap(), b.prog_id().unwrap());
}
