//! Shared test topology and packet builders (etherparse: independent of the code under test).
#![allow(dead_code)]

use std::net::Ipv4Addr;

use dataplane::balance::Algorithm;
use dataplane::pipeline::{Frame, Shared, Verdict, WorkerConfig, WorkerState};
use dataplane::tables::{
    Backend, Frontend, FrontendKey, FrontendKind, NextHop, Protocol, Routes, ServicePort,
    ServiceSpec, Tables, TablesBuilder,
};
use etherparse::{IpHeaders, Ipv4Header, PacketBuilder, TcpHeader};

pub const S: u64 = 1_000_000_000;

/// The node's interfaces.
pub const IF_UPLINK: u32 = 1;
pub const IF_CLIENT: u32 = 2;
pub const IF_BACKENDS: u32 = 3;

pub const MAC_NODE_UPLINK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const MAC_NODE_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 1, 0x05];
pub const MAC_NODE_BACKENDS: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
pub const MAC_BACKENDS: [u8; 6] = [0x02, 0, 0, 0, 2, 0x00];

pub const CLIENT: [u8; 4] = [10, 0, 1, 5];
pub const NODE_IP: [u8; 4] = [192, 168, 50, 2];
pub const EXTERNAL: [u8; 4] = [203, 0, 113, 9];
pub const REMOTE_POD: [u8; 4] = [10, 0, 9, 9];

pub const WEB_VIP: [u8; 4] = [10, 96, 0, 10];
pub const WEB_BACKEND: [u8; 4] = [10, 0, 2, 11];
pub const DNS_VIP: [u8; 4] = [10, 96, 0, 53];
pub const DNS_BACKEND: [u8; 4] = [10, 0, 2, 21];
pub const DNS_BACKEND2: [u8; 4] = [10, 0, 2, 22];
pub const EMPTY_VIP: [u8; 4] = [10, 96, 0, 99];
pub const RR_VIP: [u8; 4] = [10, 96, 0, 20];
pub const AFF_VIP: [u8; 4] = [10, 96, 0, 30];
pub const TERM_VIP: [u8; 4] = [10, 96, 0, 40];
pub const NP_PORT: u16 = 30080;

pub fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

pub fn spec(id: u32, name: &str, proto: Protocol, algorithm: Algorithm) -> ServiceSpec {
    ServiceSpec {
        id,
        name: name.into(),
        proto,
        algorithm,
        affinity_timeout_s: None,
        maglev_size: 65_537,
    }
}

pub fn backend(id: u32, a: [u8; 4], port: u16) -> Backend {
    Backend::ready(id, ip(a), port)
}

pub fn fe(service: u32) -> Frontend {
    Frontend { service, kind: FrontendKind::ClusterIp, masquerade_remote: false }
}

pub fn routes() -> Routes {
    let mut r = Routes::default();
    r.add_host(
        ip(CLIENT),
        NextHop { ifindex: IF_CLIENT, src_mac: MAC_NODE_CLIENT, dst_mac: MAC_CLIENT },
    );
    for b in [
        WEB_BACKEND,
        DNS_BACKEND,
        DNS_BACKEND2,
        [10, 0, 2, 31],
        [10, 0, 2, 32],
        [10, 0, 2, 33],
        [10, 0, 2, 41],
        [10, 0, 2, 42],
    ] {
        r.add_host(
            ip(b),
            NextHop { ifindex: IF_BACKENDS, src_mac: MAC_NODE_BACKENDS, dst_mac: MAC_BACKENDS },
        );
    }
    r.add_prefix(
        ip([0, 0, 0, 0]),
        0,
        NextHop { ifindex: IF_UPLINK, src_mac: MAC_NODE_UPLINK, dst_mac: MAC_GW },
    );
    r
}

/// The standard topology: see the constants above.
pub fn builder(generation: u64) -> TablesBuilder {
    let web = ServicePort::new(
        spec(1, "demo/web:http", Protocol::Tcp, Algorithm::Random),
        vec![backend(11, WEB_BACKEND, 8080)],
    );
    let dns = ServicePort::new(
        spec(2, "demo/dns:dns", Protocol::Udp, Algorithm::Random),
        vec![backend(21, DNS_BACKEND, 5353)],
    );
    let empty_tcp =
        ServicePort::new(spec(3, "demo/empty:tcp", Protocol::Tcp, Algorithm::Random), vec![]);
    let empty_udp =
        ServicePort::new(spec(4, "demo/empty:udp", Protocol::Udp, Algorithm::Random), vec![]);
    let rr = ServicePort::new(
        spec(5, "demo/rr:http", Protocol::Tcp, Algorithm::RoundRobin),
        vec![
            backend(31, [10, 0, 2, 31], 80),
            backend(32, [10, 0, 2, 32], 80),
            backend(33, [10, 0, 2, 33], 80),
        ],
    );
    let mut aff_spec = spec(6, "demo/aff:http", Protocol::Tcp, Algorithm::Random);
    aff_spec.affinity_timeout_s = Some(100);
    let aff = ServicePort::new(
        aff_spec,
        vec![
            backend(31, [10, 0, 2, 31], 80),
            backend(32, [10, 0, 2, 32], 80),
            backend(33, [10, 0, 2, 33], 80),
        ],
    );
    let mut t41 = backend(41, [10, 0, 2, 41], 80);
    t41.ready = false;
    t41.terminating = true;
    let mut t42 = backend(42, [10, 0, 2, 42], 80);
    t42.ready = false;
    t42.serving = false;
    t42.terminating = true;
    let term = ServicePort::new(
        spec(7, "demo/term:http", Protocol::Tcp, Algorithm::Random),
        vec![t41, t42],
    );
    let np =
        ServicePort::new(spec(8, "demo/web:http (external)", Protocol::Tcp, Algorithm::Random), {
            let mut b = backend(11, WEB_BACKEND, 8080);
            b.local = false;
            vec![b]
        });
    Tables::builder(generation)
        .service(web)
        .unwrap()
        .service(dns)
        .unwrap()
        .service(empty_tcp)
        .unwrap()
        .service(empty_udp)
        .unwrap()
        .service(rr)
        .unwrap()
        .service(aff)
        .unwrap()
        .service(term)
        .unwrap()
        .service(np)
        .unwrap()
        .frontend(FrontendKey::new(ip(WEB_VIP), 80, Protocol::Tcp), fe(1))
        .unwrap()
        .frontend(FrontendKey::new(ip(DNS_VIP), 53, Protocol::Udp), fe(2))
        .unwrap()
        .frontend(FrontendKey::new(ip(EMPTY_VIP), 80, Protocol::Tcp), fe(3))
        .unwrap()
        .frontend(FrontendKey::new(ip(EMPTY_VIP), 81, Protocol::Udp), fe(4))
        .unwrap()
        .frontend(FrontendKey::new(ip(RR_VIP), 80, Protocol::Tcp), fe(5))
        .unwrap()
        .frontend(FrontendKey::new(ip(AFF_VIP), 80, Protocol::Tcp), fe(6))
        .unwrap()
        .frontend(FrontendKey::new(ip(TERM_VIP), 80, Protocol::Tcp), fe(7))
        .unwrap()
        .frontend(
            FrontendKey::new(ip(NODE_IP), NP_PORT, Protocol::Tcp),
            Frontend { service: 8, kind: FrontendKind::NodePort, masquerade_remote: true },
        )
        .unwrap()
        .routes(routes())
        .snat_ip(Some(ip(NODE_IP)))
}

pub fn tables() -> Tables {
    builder(1).build()
}

pub fn worker() -> WorkerState {
    worker_with(1 << 12)
}

pub fn worker_with(capacity: usize) -> WorkerState {
    let cfg = WorkerConfig { conntrack_capacity: capacity, ..WorkerConfig::default() };
    WorkerState::new(&cfg, &Shared::new(1024, 1024))
}

/// Runs one frame through the pipeline; returns the verdict and the frame as it left.
pub fn run(
    t: &Tables,
    w: &mut WorkerState,
    ifindex: u32,
    pkt: &[u8],
    now: u64,
) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..pkt.len()].copy_from_slice(pkt);
    let mut frames = [Frame { buf: &mut buf, len: pkt.len(), ifindex }];
    let mut v = [Verdict::Drop(dataplane::DropReason::NoRoom)];
    dataplane::process_batch(&mut frames, &mut v, t, w, now);
    let len = frames[0].len;
    (v[0], buf[..len].to_vec())
}

#[derive(Clone, Copy)]
pub struct L2 {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

pub const FROM_CLIENT: L2 = L2 { src: MAC_CLIENT, dst: MAC_NODE_CLIENT };
pub const TO_BACKENDS: L2 = L2 { src: MAC_NODE_BACKENDS, dst: MAC_BACKENDS };
pub const FROM_BACKENDS: L2 = L2 { src: MAC_BACKENDS, dst: MAC_NODE_BACKENDS };
pub const TO_CLIENT: L2 = L2 { src: MAC_NODE_CLIENT, dst: MAC_CLIENT };
pub const FROM_UPLINK: L2 = L2 { src: MAC_GW, dst: MAC_NODE_UPLINK };
pub const TO_UPLINK: L2 = L2 { src: MAC_NODE_UPLINK, dst: MAC_GW };
/// A reply leaving out of the interface it came in on (MACs swapped).
pub const BACK_TO_CLIENT: L2 = L2 { src: MAC_NODE_CLIENT, dst: MAC_CLIENT };

fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, id: u16) -> Ipv4Header {
    let mut h = Ipv4Header::new(0, ttl, etherparse::IpNumber::UDP, src, dst).unwrap();
    h.identification = id;
    h
}

pub fn udp(
    l2: L2,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ip(IpHeaders::Ipv4(ipv4(src, dst, ttl, 0x1234), Default::default()))
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

/// TCP flags as a string of letters: S, A, F, R, P.
pub fn tcp(
    l2: L2,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ttl: u8,
    flags: &str,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = TcpHeader::new(sport, dport, seq, 64240);
    h.syn = flags.contains('S');
    h.fin = flags.contains('F');
    h.rst = flags.contains('R');
    h.psh = flags.contains('P');
    if flags.contains('A') {
        h.ack = true;
        h.acknowledgment_number = ack;
    }
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ip(IpHeaders::Ipv4(ipv4(src, dst, ttl, 0x1234), Default::default()))
        .tcp_header(h);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

/// The reset the pipeline answers with: from `src:sport` to `dst:dport`.
pub fn rst(
    l2: L2,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let mut h = TcpHeader::new(sport, dport, seq, 0);
    h.rst = true;
    if let Some(a) = ack {
        h.ack = true;
        h.acknowledgment_number = a;
    }
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ip(IpHeaders::Ipv4(ipv4(src, dst, 64, 0), Default::default()))
        .tcp_header(h);
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

pub fn icmp(
    l2: L2,
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ty: etherparse::Icmpv4Type,
    payload: &[u8],
) -> Vec<u8> {
    icmp_with_id(l2, src, dst, ttl, 0x1234, ty, payload)
}

/// Like [`icmp`] with the IP id and DF of a locally built reply (id 0, DF).
pub fn icmp_reply(
    l2: L2,
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ty: etherparse::Icmpv4Type,
    payload: &[u8],
) -> Vec<u8> {
    icmp_with_id(l2, src, dst, ttl, 0, ty, payload)
}

fn icmp_with_id(
    l2: L2,
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    id: u16,
    ty: etherparse::Icmpv4Type,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ip(IpHeaders::Ipv4(ipv4(src, dst, ttl, id), Default::default()))
        .icmpv4(ty);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// Strips the Ethernet header.
pub fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// Recomputes every checksum of a frame independently (etherparse) and says whether the ones
/// in the frame are right.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ipv4)) = &p.net else { return false };
    let h = ipv4.header().to_header();
    if h.calc_header_checksum() != h.header_checksum {
        return false;
    }
    let src = ipv4.header().source();
    let dst = ipv4.header().destination();
    match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => {
            let c = t.to_header().calc_checksum_ipv4_raw(src, dst, t.payload()).unwrap();
            c == t.checksum()
        }
        Some(etherparse::TransportSlice::Udp(u)) => {
            if u.checksum() == 0 {
                return true;
            }
            let hdr = u.to_header();
            hdr.calc_checksum_ipv4_raw(src, dst, u.payload()).unwrap() == u.checksum()
        }
        Some(etherparse::TransportSlice::Icmpv4(i)) => {
            let t = i.icmp_type();
            t.calc_checksum(i.payload()) == i.checksum()
        }
        _ => true,
    }
}

/// (source, source port, destination, destination port) of a TCP or UDP frame.
pub fn tuple(f: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
    let p = etherparse::SlicedPacket::from_ethernet(f).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not ipv4") };
    let (s, d) = (ip.header().source(), ip.header().destination());
    match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (s, t.source_port(), d, t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => (s, u.source_port(), d, u.destination_port()),
        _ => (s, 0, d, 0),
    }
}
