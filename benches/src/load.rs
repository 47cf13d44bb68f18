//! The load tool's pure half: flows, frames, pacing and the receiver's classification.
//!
//! `kxdp-load` (`src/bin/kxdp-load.rs`) transmits and receives over AF_XDP; everything it
//! decides per packet lives here so tests drive it in memory:
//!
//! - [`Flows`]: the traffic's 5-tuples. A flow is one (source address, source port) pair, so
//!   there are `sources x ports` flows; flow `f` goes to destination `f % destinations`. In
//!   [`Pattern::Established`] packet `k` belongs to flow `k % flows`, so every flow repeats; in
//!   [`Pattern::NewFlows`] packet `k` walks the whole (source address, source port 1024-65535)
//!   space, so consecutive packets never share a 5-tuple (the space holds `sources x 64,512`
//!   tuples before it wraps).
//! - [`FrameTemplate`]: one Ethernet/IPv4/UDP or TCP-SYN frame of a fixed size, built once;
//!   [`FrameTemplate::write`] patches a tuple into a buffer holding the template and fixes both
//!   checksums from sums precomputed over the constant bytes (a few dozen instructions, no
//!   allocation).
//! - [`Pacer`]: how many packets a rate limit allows by a given time.
//! - [`parse_rx`] and [`Flows::index`]: what a received frame is and which flow sent it. The
//!   receiver keys on the source address and port, which Service DNAT leaves unchanged, so it
//!   counts per flow behind any of the dataplanes compared.
//!
//! Invariants: every frame written has a valid IPv4 header checksum and a valid L4 checksum
//! (tests check both with etherparse); sizes outside [`MIN_FRAME`]..=[`MAX_FRAME`] and flow
//! counts over [`MAX_FLOWS`] are refused with a message, never clamped silently.

use std::net::Ipv4Addr;

/// Smallest frame (Ethernet minimum without FCS).
pub const MIN_FRAME: usize = 60;
/// Largest frame (1500-byte MTU plus the Ethernet header).
pub const MAX_FRAME: usize = 1514;
/// Most flows a run may name (the receiver keeps a counter per flow).
pub const MAX_FLOWS: u64 = 1 << 22;
/// First source port of the new-flow pattern.
pub const NEW_FLOW_PORT_BASE: u16 = 1024;
/// Source ports the new-flow pattern uses per source address.
pub const NEW_FLOW_PORTS: u32 = 65_536 - NEW_FLOW_PORT_BASE as u32;

const ETH: usize = 14;
const IP: usize = 20;
const L4: usize = ETH + IP;

/// The L4 protocol of the generated packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// UDP datagrams.
    Udp,
    /// TCP segments with only SYN set (connection attempts).
    TcpSyn,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::TcpSyn => 6,
        }
    }
    fn header_len(self) -> usize {
        match self {
            Proto::Udp => 8,
            Proto::TcpSyn => 20,
        }
    }
}

/// Which 5-tuple each packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Packet `k` is flow `k % flows`: a fixed set of flows, each repeating.
    Established,
    /// Every packet a 5-tuple not used before in the run (until the space wraps).
    NewFlows,
}

/// One packet's addresses and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dport: u16,
}

/// The traffic's flows: `sources` consecutive source addresses from `src`, `ports`
/// consecutive source ports from `sport`, `destinations` consecutive destination addresses
/// from `dst`, one destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flows {
    /// First source address.
    pub src: Ipv4Addr,
    /// Source addresses.
    pub sources: u32,
    /// First source port.
    pub sport: u16,
    /// Source ports per address.
    pub ports: u32,
    /// First destination address.
    pub dst: Ipv4Addr,
    /// Destination addresses.
    pub destinations: u32,
    /// Destination port.
    pub dport: u16,
}

impl Flows {
    /// Checks the ranges: non-empty, no wrap past 255.255.255.255 or port 65535, at most
    /// [`MAX_FLOWS`] flows.
    pub fn new(
        src: Ipv4Addr,
        sources: u32,
        sport: u16,
        ports: u32,
        dst: Ipv4Addr,
        destinations: u32,
        dport: u16,
    ) -> Result<Flows, String> {
        if sources == 0 || ports == 0 || destinations == 0 {
            return Err("--sources, --ports and --destinations must each be at least 1".into());
        }
        if u64::from(u32::from(src)) + u64::from(sources) > 1 << 32 {
            return Err(format!("{sources} source addresses from {src} run past 255.255.255.255"));
        }
        if u64::from(u32::from(dst)) + u64::from(destinations) > 1 << 32 {
            return Err(format!(
                "{destinations} destination addresses from {dst} run past 255.255.255.255"
            ));
        }
        if u32::from(sport) + ports > 65_536 {
            return Err(format!("{ports} source ports from {sport} run past 65535"));
        }
        let flows = u64::from(sources) * u64::from(ports);
        if flows > MAX_FLOWS {
            return Err(format!(
                "{sources} sources x {ports} ports = {flows} flows, more than the {MAX_FLOWS} allowed"
            ));
        }
        Ok(Flows { src, sources, sport, ports, dst, destinations, dport })
    }

    /// Number of flows (`sources x ports`).
    pub fn count(&self) -> u32 {
        self.sources * self.ports
    }

    fn dst_of(&self, k: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.dst) + (k % u64::from(self.destinations)) as u32)
    }

    /// The tuple of packet number `k` under `pattern`.
    #[inline]
    pub fn tuple(&self, pattern: Pattern, k: u64) -> Tuple {
        match pattern {
            Pattern::Established => {
                let f = k % u64::from(self.count());
                let (s, p) = (f / u64::from(self.ports), f % u64::from(self.ports));
                Tuple {
                    src: Ipv4Addr::from(u32::from(self.src) + s as u32),
                    sport: self.sport + p as u16,
                    dst: self.dst_of(f),
                    dport: self.dport,
                }
            }
            Pattern::NewFlows => {
                // Port first, so consecutive packets differ in the port and the destination.
                let space = u64::from(self.sources) * u64::from(NEW_FLOW_PORTS);
                let t = k % space;
                let (s, p) = (t / u64::from(NEW_FLOW_PORTS), t % u64::from(NEW_FLOW_PORTS));
                Tuple {
                    src: Ipv4Addr::from(u32::from(self.src) + s as u32),
                    sport: NEW_FLOW_PORT_BASE + p as u16,
                    dst: self.dst_of(k),
                    dport: self.dport,
                }
            }
        }
    }

    /// The established-pattern flow a packet from `src:sport` belongs to, if any.
    #[inline]
    pub fn index(&self, src: Ipv4Addr, sport: u16) -> Option<u32> {
        let s = u32::from(src).wrapping_sub(u32::from(self.src));
        let p = u32::from(sport.wrapping_sub(self.sport));
        (s < self.sources && p < self.ports && sport >= self.sport).then(|| s * self.ports + p)
    }
}

/// Sums 16-bit big-endian words (odd tail padded with zero), without folding.
fn sum16(data: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut c = data.chunks_exact(2);
    for w in &mut c {
        s += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = c.remainder() {
        s += u64::from(*b) << 8;
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn addr_sum(a: Ipv4Addr) -> u64 {
    let v = u32::from(a);
    u64::from(v >> 16) + u64::from(v & 0xffff)
}

/// A frame of one size and protocol between two MACs; the tuple is patched in per packet.
#[derive(Clone, Debug)]
pub struct FrameTemplate {
    bytes: Vec<u8>,
    proto: Proto,
    /// Sum of the IPv4 header words other than the addresses and the checksum.
    ip_sum: u64,
    /// Sum of the L4 segment (ports and checksum zero) and the pseudo-header's protocol and
    /// length.
    l4_sum: u64,
}

impl FrameTemplate {
    /// A `size`-byte frame (without FCS) from `src_mac` to `dst_mac`; every byte past the
    /// headers is L4 payload (zeros).
    pub fn new(
        proto: Proto,
        size: usize,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
    ) -> Result<FrameTemplate, String> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&size) {
            return Err(format!(
                "frame size {size} is outside {MIN_FRAME}..={MAX_FRAME} bytes (Ethernet header \
                 included, FCS not)"
            ));
        }
        let mut b = vec![0u8; size];
        b[0..6].copy_from_slice(&dst_mac);
        b[6..12].copy_from_slice(&src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip_len = (size - ETH) as u16;
        let ip = &mut b[ETH..L4];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = proto.number();
        let l4_len = size - L4;
        match proto {
            Proto::Udp => {
                b[L4 + 4..L4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            }
            Proto::TcpSyn => {
                let t = &mut b[L4..L4 + 20];
                t[4..8].copy_from_slice(&0x6b78_6470u32.to_be_bytes()); // sequence "kxdp"
                t[12] = 5 << 4; // data offset: 20 bytes, no options
                t[13] = 0x02; // SYN
                t[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
            }
        }
        let ip_sum = sum16(&b[ETH..L4]);
        let l4_sum = sum16(&b[L4..]) + u64::from(proto.number()) + l4_len as u64;
        Ok(FrameTemplate { bytes: b, proto, ip_sum, l4_sum })
    }

    /// The template (tuple and checksums zero); copy it into a buffer once, then
    /// [`FrameTemplate::write`] per packet.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Frame length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never: a template is at least [`MIN_FRAME`] bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Patches `t` into `buf`, which must already hold this template's bytes (from a previous
    /// `write` of any tuple, or a copy of [`FrameTemplate::bytes`]); fixes both checksums.
    /// Returns the frame length.
    #[inline]
    pub fn write(&self, buf: &mut [u8], t: &Tuple) -> usize {
        let buf = &mut buf[..self.bytes.len()];
        let addrs = addr_sum(t.src) + addr_sum(t.dst);
        buf[ETH + 12..ETH + 16].copy_from_slice(&t.src.octets());
        buf[ETH + 16..ETH + 20].copy_from_slice(&t.dst.octets());
        let ip_csum = !fold(self.ip_sum + addrs);
        buf[ETH + 10..ETH + 12].copy_from_slice(&ip_csum.to_be_bytes());
        buf[L4..L4 + 2].copy_from_slice(&t.sport.to_be_bytes());
        buf[L4 + 2..L4 + 4].copy_from_slice(&t.dport.to_be_bytes());
        let mut l4 = !fold(self.l4_sum + addrs + u64::from(t.sport) + u64::from(t.dport));
        let at = match self.proto {
            Proto::Udp => {
                if l4 == 0 {
                    l4 = 0xffff; // 0 means "no checksum" in UDP
                }
                L4 + 6
            }
            Proto::TcpSyn => L4 + 16,
        };
        buf[at..at + 2].copy_from_slice(&l4.to_be_bytes());
        self.bytes.len()
    }

    /// The L4 header length of this template's protocol.
    pub fn l4_header_len(&self) -> usize {
        self.proto.header_len()
    }
}

/// What the receiver reads from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rx {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port.
    pub sport: u16,
}

/// Reads an untagged Ethernet/IPv4 UDP or TCP frame's protocol, source address and port;
/// `None` for anything else (ARP, IPv6, fragments after the first, truncated frames).
#[inline]
pub fn parse_rx(frame: &[u8]) -> Option<Rx> {
    if frame.len() < L4 || frame[12..14] != [0x08, 0x00] || frame[ETH] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let proto = frame[ETH + 9];
    let frag_offset = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]) & 0x1fff;
    if ihl < IP || frag_offset != 0 || !matches!(proto, 6 | 17) || frame.len() < ETH + ihl + 4 {
        return None;
    }
    let src = Ipv4Addr::new(frame[ETH + 12], frame[ETH + 13], frame[ETH + 14], frame[ETH + 15]);
    let sport = u16::from_be_bytes([frame[ETH + ihl], frame[ETH + ihl + 1]]);
    Some(Rx { proto, src, sport })
}

/// A rate limit: how many packets may have been sent `elapsed_ns` after the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    /// Packets per second; 0 means unlimited.
    pub rate: u64,
}

impl Pacer {
    /// Packets allowed in total by `elapsed_ns` (`u64::MAX` when unlimited).
    #[inline]
    pub fn allowed(&self, elapsed_ns: u64) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        // At least one packet at time 0, so a limited run starts at once.
        (u128::from(self.rate) * u128::from(elapsed_ns) / 1_000_000_000) as u64 + 1
    }
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC {s:?}: expected six hex bytes separated by ':'"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {s:?}: {p:?} is not hex"))?;
    }
    Ok(mac)
}

/// Parses a duration written `500ms`, `3s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}: expected e.g. 3s"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration {s:?}: unit must be ms, s or m")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 3600.0 {
        return Err(format!("duration {s:?} must be more than 0 and at most 1 hour"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn flows() -> Flows {
        Flows::new(Ipv4Addr::new(10, 200, 16, 1), 3, 5000, 4, Ipv4Addr::new(10, 96, 0, 1), 5, 80)
            .unwrap()
    }

    /// Checks the frame with etherparse, including both checksums, and returns its tuple.
    fn check(frame: &[u8], proto: Proto) -> Tuple {
        let p = SlicedPacket::from_ethernet(frame).expect("parses");
        let Some(NetSlice::Ipv4(ip)) = p.net else { panic!("not IPv4") };
        let h = ip.header().to_header();
        assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 header checksum");
        let payload = ip.payload().payload;
        let (sport, dport) = match (proto, p.transport) {
            (Proto::Udp, Some(TransportSlice::Udp(u))) => {
                let uh = u.to_header();
                assert_eq!(
                    uh.calc_checksum_ipv4(&h, &payload[8..]).unwrap(),
                    uh.checksum,
                    "UDP checksum"
                );
                (uh.source_port, uh.destination_port)
            }
            (Proto::TcpSyn, Some(TransportSlice::Tcp(t))) => {
                assert!(t.syn() && !t.ack() && !t.rst() && !t.fin());
                let th = t.to_header();
                assert_eq!(
                    th.calc_checksum_ipv4(&h, &payload[20..]).unwrap(),
                    th.checksum,
                    "TCP checksum"
                );
                (th.source_port, th.destination_port)
            }
            other => panic!("wrong transport {other:?}"),
        };
        Tuple { src: Ipv4Addr::from(h.source), sport, dst: Ipv4Addr::from(h.destination), dport }
    }

    #[test]
    fn frames_have_valid_checksums_for_every_size_and_tuple() {
        let f = flows();
        for proto in [Proto::Udp, Proto::TcpSyn] {
            for size in [60, 61, 64, 128, 999, 1514] {
                let t = FrameTemplate::new(proto, size, A, B).unwrap();
                let mut buf = t.bytes().to_vec();
                for pattern in [Pattern::Established, Pattern::NewFlows] {
                    for k in [0, 1, 7, 11, 12, 1000, 70_000, 1 << 40] {
                        let tuple = f.tuple(pattern, k);
                        assert_eq!(t.write(&mut buf, &tuple), size);
                        assert_eq!(check(&buf, proto), tuple, "{proto:?} {size} {k}");
                        assert_eq!(&buf[0..6], &B);
                        assert_eq!(&buf[6..12], &A);
                        let rx = parse_rx(&buf).unwrap();
                        assert_eq!((rx.src, rx.sport), (tuple.src, tuple.sport));
                        assert_eq!(rx.proto, proto.number());
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_addresses_and_ports_still_checksum() {
        let t = FrameTemplate::new(Proto::Udp, 60, A, B).unwrap();
        let mut buf = t.bytes().to_vec();
        for (src, sport, dst, dport) in [
            (Ipv4Addr::BROADCAST, 65535, Ipv4Addr::BROADCAST, 65535),
            (Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0),
            (Ipv4Addr::new(255, 255, 0, 0), 1, Ipv4Addr::new(0, 0, 255, 255), 65534),
        ] {
            let tuple = Tuple { src, sport, dst, dport };
            t.write(&mut buf, &tuple);
            assert_eq!(check(&buf, Proto::Udp), tuple);
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [0, 42, 59, 1515, 9000] {
            let e = FrameTemplate::new(Proto::Udp, size, A, B).unwrap_err();
            assert!(e.contains("outside 60..=1514"), "{e}");
        }
    }

    #[test]
    fn established_pattern_cycles_over_every_flow() {
        let f = flows();
        assert_eq!(f.count(), 12);
        let mut seen = std::collections::HashSet::new();
        for k in 0..12 {
            let t = f.tuple(Pattern::Established, k);
            assert!(seen.insert((t.src, t.sport)));
            assert_eq!(f.index(t.src, t.sport), Some(k as u32));
            assert_eq!(t.dst, Ipv4Addr::new(10, 96, 0, 1 + (k % 5) as u8));
            assert_eq!(t.dport, 80);
            assert_eq!(f.tuple(Pattern::Established, k + 12), t);
        }
        assert!(seen.contains(&(Ipv4Addr::new(10, 200, 16, 3), 5003)));
    }

    #[test]
    fn new_flow_pattern_never_repeats_a_tuple_before_the_space_wraps() {
        let f = flows();
        let mut seen = std::collections::HashSet::new();
        for k in 0..200_000u64 {
            let t = f.tuple(Pattern::NewFlows, k);
            assert!(t.sport >= NEW_FLOW_PORT_BASE);
            assert!(seen.insert((t.src, t.sport, t.dst)), "repeat at {k}");
        }
        let space = 3 * u64::from(NEW_FLOW_PORTS);
        assert_eq!(f.tuple(Pattern::NewFlows, space).src, f.tuple(Pattern::NewFlows, 0).src);
    }

    #[test]
    fn flow_index_rejects_foreign_sources() {
        let f = flows();
        assert_eq!(f.index(Ipv4Addr::new(10, 200, 16, 0), 5000), None);
        assert_eq!(f.index(Ipv4Addr::new(10, 200, 16, 4), 5000), None);
        assert_eq!(f.index(Ipv4Addr::new(10, 200, 16, 1), 4999), None);
        assert_eq!(f.index(Ipv4Addr::new(10, 200, 16, 1), 5004), None);
        assert_eq!(f.index(Ipv4Addr::new(10, 200, 16, 2), 5001), Some(5));
    }

    #[test]
    fn flow_ranges_are_checked() {
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let e = |r: Result<Flows, String>| r.unwrap_err();
        assert!(e(Flows::new(ip, 0, 1, 1, ip, 1, 80)).contains("at least 1"));
        assert!(e(Flows::new(ip, 1, 1, 1, ip, 0, 80)).contains("at least 1"));
        assert!(e(Flows::new(ip, 1, 65535, 2, ip, 1, 80)).contains("past 65535"));
        assert!(e(Flows::new(Ipv4Addr::BROADCAST, 2, 1, 1, ip, 1, 80)).contains("source"));
        assert!(e(Flows::new(ip, 1, 1, 1, Ipv4Addr::BROADCAST, 2, 80)).contains("destination"));
        assert!(e(Flows::new(ip, 65536, 0, 65536, ip, 1, 80)).contains("more than"));
        assert!(Flows::new(ip, 1, 65535, 1, Ipv4Addr::BROADCAST, 1, 80).is_ok());
    }

    #[test]
    fn parse_rx_refuses_what_it_cannot_count() {
        let t = FrameTemplate::new(Proto::Udp, 60, A, B).unwrap();
        let mut buf = t.bytes().to_vec();
        t.write(&mut buf, &flows().tuple(Pattern::Established, 0));
        assert!(parse_rx(&buf).is_some());
        assert_eq!(parse_rx(&buf[..30]), None);
        let mut arp = buf.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_rx(&arp), None);
        let mut frag = buf.clone();
        frag[ETH + 7] = 1;
        assert_eq!(parse_rx(&frag), None);
        let mut icmp = buf.clone();
        icmp[ETH + 9] = 1;
        assert_eq!(parse_rx(&icmp), None);
        let mut short_ihl = buf;
        short_ihl[ETH] = 0x44;
        assert_eq!(parse_rx(&short_ihl), None);
    }

    #[test]
    fn pacer_allows_rate_times_time() {
        let p = Pacer { rate: 1000 };
        assert_eq!(p.allowed(0), 1);
        assert_eq!(p.allowed(1_000_000), 2);
        assert_eq!(p.allowed(1_000_000_000), 1001);
        assert_eq!(p.allowed(3_600_000_000_000), 3_600_001);
        assert_eq!(Pacer { rate: 0 }.allowed(5), u64::MAX);
    }

    #[test]
    fn macs_and_durations_parse_or_say_why() {
        assert_eq!(parse_mac("02:0a:ff:00:01:9B").unwrap(), [2, 10, 255, 0, 1, 0x9b]);
        assert!(parse_mac("02:0a:ff:00:01").unwrap_err().contains("six hex bytes"));
        assert!(parse_mac("02:0a:ff:00:01:zz").unwrap_err().contains("not hex"));
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("3h").unwrap_err().contains("unit"));
        assert!(parse_duration("0s").unwrap_err().contains("more than 0"));
        assert!(parse_duration("x").unwrap_err().contains("bad duration"));
    }
}
