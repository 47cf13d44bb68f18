//! Fixture rows in Katran's style: {description, input frame, expected verdict, expected output
//! frame}. Inputs and expected outputs are built with etherparse, independently of the code
//! under test, and compared byte for byte, so every checksum the pipeline updated
//! incrementally is checked against a full computation. Rows run in order on one worker, so a
//! reply row sees the flow its request row created.

mod common;

use common::*;
use dataplane::counters::{DropReason as D, PassReason as P};
use dataplane::pipeline::Verdict;
use etherparse::{icmpv4, Icmpv4Type};

struct Row {
    desc: &'static str,
    ifindex: u32,
    input: Vec<u8>,
    verdict: Verdict,
    /// Expected frame after processing; `None` means "unchanged" (passes and drops).
    output: Option<Vec<u8>>,
}

fn tx(ifindex: u32) -> Verdict {
    Verdict::Tx { ifindex }
}

fn with_udp_checksum_zero(mut f: Vec<u8>) -> Vec<u8> {
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

fn vlan_udp(
    vid: u16,
    l2: L2,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ttl: u8,
) -> Vec<u8> {
    let f = udp(l2, src, sport, dst, dport, ttl, b"vlan");
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00, (vid >> 8) as u8, vid as u8]);
    out.extend_from_slice(&f[12..]);
    out
}

/// A UDP datagram whose IPv4 header carries 4 bytes of options (a NOP-padded router alert).
fn udp_with_options(
    l2: L2,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ttl: u8,
) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::new(0, ttl, etherparse::IpNumber::UDP, src, dst).unwrap();
    h.identification = 0x1234;
    h.options = [0x94u8, 0x04, 0x00, 0x00][..].try_into().unwrap();
    let b = etherparse::PacketBuilder::ethernet2(l2.src, l2.dst)
        .ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        .udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, b"opts").unwrap();
    out
}

fn rows() -> Vec<Row> {
    let port_unreach = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    let udp_to_empty = udp(FROM_CLIENT, CLIENT, 40010, EMPTY_VIP, 81, 64, b"hello");
    // ICMP quotes the offending IP header and the first 8 bytes of its payload.
    let quoted_empty = l3(&udp_to_empty)[..28].to_vec();
    let dns_request_at_backend = udp(TO_BACKENDS, CLIENT, 40002, DNS_BACKEND, 5353, 63, b"q");
    let backend_error_quote = l3(&dns_request_at_backend)[..28].to_vec();
    let client_view_quote =
        l3(&udp(TO_BACKENDS, CLIENT, 40002, DNS_VIP, 53, 63, b"q"))[..28].to_vec();
    let mut padded = udp(FROM_CLIENT, CLIENT, 40003, DNS_VIP, 53, 64, b"");
    padded.resize(60, 0);
    let echo = Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 7, seq: 1 });
    let echo_reply = Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 7, seq: 1 });
    let mut echo_reply_frame = icmp(BACK_TO_CLIENT, WEB_VIP, CLIENT, 64, echo_reply, b"ping");
    // The echo reply keeps the request's IP id and TTL (only addresses are swapped).
    echo_reply_frame.truncate(echo_reply_frame.len());
    let arp = {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&MAC_CLIENT);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    let ipv6 = {
        let b = etherparse::PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE_CLIENT)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 2);
        let mut out = Vec::new();
        b.write(&mut out, b"v6").unwrap();
        out
    };
    let truncated_tcp = {
        let mut f = tcp(FROM_CLIENT, CLIENT, 40004, WEB_VIP, 80, 64, "S", 1, 0, b"");
        // Keep 10 bytes of TCP header, and make the IP length agree.
        f.truncate(14 + 20 + 10);
        f[16] = 0;
        f[17] = 30;
        // Fix the IP header checksum for the new length.
        f[24] = 0;
        f[25] = 0;
        let c = dataplane::wire::csum_fold(dataplane::wire::csum_partial(&f[14..34], 0));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    let bad_ip_checksum = {
        let mut f = udp(FROM_CLIENT, CLIENT, 40005, DNS_VIP, 53, 64, b"x");
        f[24] ^= 0xff;
        f
    };
    let bad_ip_length = {
        let mut f = udp(FROM_CLIENT, CLIENT, 40005, DNS_VIP, 53, 64, b"x");
        f[16] = 0x05; // total length 1280 > frame
        f
    };

    vec![
        Row {
            desc: "TCP SYN to a ClusterIP is DNATed to the backend, TTL decremented, MACs rewritten",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40000, WEB_VIP, 80, 64, "S", 1000, 0, b""),
            verdict: tx(IF_BACKENDS),
            output: Some(tcp(TO_BACKENDS, CLIENT, 40000, WEB_BACKEND, 8080, 63, "S", 1000, 0, b"")),
        },
        Row {
            desc: "SYN+ACK from the backend is reverse-NATed to the service address",
            ifindex: IF_BACKENDS,
            input: tcp(FROM_BACKENDS, WEB_BACKEND, 8080, CLIENT, 40000, 64, "SA", 5000, 1001, b""),
            verdict: tx(IF_CLIENT),
            output: Some(tcp(TO_CLIENT, WEB_VIP, 80, CLIENT, 40000, 63, "SA", 5000, 1001, b"")),
        },
        Row {
            desc: "established data from the client follows the flow",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40000, WEB_VIP, 80, 64, "PA", 1001, 5001, b"GET / HTTP/1.1\r\n\r\n"),
            verdict: tx(IF_BACKENDS),
            output: Some(tcp(TO_BACKENDS, CLIENT, 40000, WEB_BACKEND, 8080, 63, "PA", 1001, 5001, b"GET / HTTP/1.1\r\n\r\n")),
        },
        Row {
            desc: "UDP to a ClusterIP is DNATed (service port 53 to target port 5353)",
            ifindex: IF_CLIENT,
            input: udp(FROM_CLIENT, CLIENT, 40002, DNS_VIP, 53, 64, b"q"),
            verdict: tx(IF_BACKENDS),
            output: Some(dns_request_at_backend.clone()),
        },
        Row {
            desc: "UDP reply is reverse-NATed",
            ifindex: IF_BACKENDS,
            input: udp(FROM_BACKENDS, DNS_BACKEND, 5353, CLIENT, 40002, 64, b"answer"),
            verdict: tx(IF_CLIENT),
            output: Some(udp(TO_CLIENT, DNS_VIP, 53, CLIENT, 40002, 63, b"answer")),
        },
        Row {
            desc: "ICMP port unreachable from the backend about a DNATed datagram reaches the client from the service address, quoting the service tuple",
            ifindex: IF_BACKENDS,
            input: icmp(FROM_BACKENDS, DNS_BACKEND, CLIENT, 64, port_unreach.clone(), &backend_error_quote),
            verdict: tx(IF_CLIENT),
            output: Some(icmp(TO_CLIENT, DNS_VIP, CLIENT, 63, port_unreach.clone(), &client_view_quote)),
        },
        Row {
            desc: "UDP without checksum (0) keeps it absent after NAT",
            ifindex: IF_CLIENT,
            input: with_udp_checksum_zero(udp(FROM_CLIENT, CLIENT, 40006, DNS_VIP, 53, 64, b"nocsum")),
            verdict: tx(IF_BACKENDS),
            output: Some(with_udp_checksum_zero(udp(TO_BACKENDS, CLIENT, 40006, DNS_BACKEND, 5353, 63, b"nocsum"))),
        },
        Row {
            desc: "802.1Q-tagged UDP to a ClusterIP is translated with its tag kept",
            ifindex: IF_CLIENT,
            input: vlan_udp(100, FROM_CLIENT, CLIENT, 40007, DNS_VIP, 53, 64),
            verdict: tx(IF_BACKENDS),
            output: Some(vlan_udp(100, TO_BACKENDS, CLIENT, 40007, DNS_BACKEND, 5353, 63)),
        },
        Row {
            desc: "IPv4 options are skipped and kept",
            ifindex: IF_CLIENT,
            input: udp_with_options(FROM_CLIENT, CLIENT, 40008, DNS_VIP, 53, 64),
            verdict: tx(IF_BACKENDS),
            output: Some(udp_with_options(TO_BACKENDS, CLIENT, 40008, DNS_BACKEND, 5353, 63)),
        },
        Row {
            desc: "Ethernet padding is trimmed from a forwarded frame",
            ifindex: IF_CLIENT,
            input: padded,
            verdict: tx(IF_BACKENDS),
            output: Some(udp(TO_BACKENDS, CLIENT, 40003, DNS_BACKEND, 5353, 63, b"")),
        },
        Row {
            desc: "TCP SYN to a service port with no endpoints is answered with a reset from the service address",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40001, EMPTY_VIP, 80, 64, "S", 777, 0, b""),
            verdict: tx(IF_CLIENT),
            output: Some(rst(BACK_TO_CLIENT, EMPTY_VIP, 80, CLIENT, 40001, 0, Some(778))),
        },
        Row {
            desc: "TCP ACK to a service port with no endpoints gets a reset with seq = its ack",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40011, EMPTY_VIP, 80, 64, "A", 10, 99, b""),
            verdict: tx(IF_CLIENT),
            output: Some(rst(BACK_TO_CLIENT, EMPTY_VIP, 80, CLIENT, 40011, 99, None)),
        },
        Row {
            desc: "UDP to a service port with no endpoints gets ICMP port unreachable from the service address",
            ifindex: IF_CLIENT,
            input: udp_to_empty,
            verdict: tx(IF_CLIENT),
            output: Some(icmp_reply(BACK_TO_CLIENT, EMPTY_VIP, CLIENT, 64, port_unreach.clone(), &quoted_empty)),
        },
        Row {
            desc: "serving-and-terminating endpoints take new flows when none is ready; non-serving ones never",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40012, TERM_VIP, 80, 64, "S", 1, 0, b""),
            verdict: tx(IF_BACKENDS),
            output: Some(tcp(TO_BACKENDS, CLIENT, 40012, [10, 0, 2, 41], 80, 63, "S", 1, 0, b"")),
        },
        Row {
            desc: "ICMP echo to a service address is answered",
            ifindex: IF_CLIENT,
            input: icmp(FROM_CLIENT, CLIENT, WEB_VIP, 64, echo, b"ping"),
            verdict: tx(IF_CLIENT),
            output: Some(echo_reply_frame),
        },
        Row {
            desc: "TCP to a service address on a port it does not serve is dropped",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40013, WEB_VIP, 443, 64, "S", 1, 0, b""),
            verdict: Verdict::Drop(D::VipNoPort),
            output: None,
        },
        Row {
            desc: "pod to pod traffic is forwarded untranslated",
            ifindex: IF_CLIENT,
            input: udp(FROM_CLIENT, CLIENT, 40014, DNS_BACKEND, 9999, 64, b"direct"),
            verdict: tx(IF_BACKENDS),
            output: Some(udp(TO_BACKENDS, CLIENT, 40014, DNS_BACKEND, 9999, 63, b"direct")),
        },
        Row {
            desc: "traffic to an address no table claims goes to the kernel",
            ifindex: IF_CLIENT,
            input: udp(FROM_CLIENT, CLIENT, 40015, EXTERNAL, 53, 64, b"out"),
            verdict: Verdict::Pass(P::NotOurs),
            output: None,
        },
        Row {
            desc: "TTL 1 goes to the kernel, which sends time exceeded",
            ifindex: IF_CLIENT,
            input: udp(FROM_CLIENT, CLIENT, 40016, DNS_VIP, 53, 1, b"ttl"),
            verdict: Verdict::Pass(P::TtlExpired),
            output: None,
        },
        Row { desc: "ARP goes to the kernel", ifindex: IF_CLIENT, input: arp, verdict: Verdict::Pass(P::Arp), output: None },
        Row { desc: "IPv6 goes to the kernel", ifindex: IF_CLIENT, input: ipv6, verdict: Verdict::Pass(P::Ipv6), output: None },
        Row {
            desc: "truncated TCP header is a counted drop",
            ifindex: IF_CLIENT,
            input: truncated_tcp,
            verdict: Verdict::Drop(D::L4Malformed),
            output: None,
        },
        Row {
            desc: "bad IP header checksum is a counted drop",
            ifindex: IF_CLIENT,
            input: bad_ip_checksum,
            verdict: Verdict::Drop(D::IpChecksum),
            output: None,
        },
        Row {
            desc: "IP total length past the frame is a counted drop",
            ifindex: IF_CLIENT,
            input: bad_ip_length,
            verdict: Verdict::Drop(D::IpMalformed),
            output: None,
        },
        Row {
            desc: "a frame shorter than Ethernet is a counted drop",
            ifindex: IF_CLIENT,
            input: vec![1, 2, 3],
            verdict: Verdict::Drop(D::EthTruncated),
            output: None,
        },
        Row {
            desc: "TCP RST matching no flow is dropped",
            ifindex: IF_CLIENT,
            input: tcp(FROM_CLIENT, CLIENT, 40017, WEB_VIP, 80, 64, "R", 1, 0, b""),
            verdict: Verdict::Drop(D::TcpNoFlow),
            output: None,
        },
    ]
}

#[test]
fn fixture_rows() {
    let t = tables();
    let mut w = worker();
    let mut failures = Vec::new();
    for (i, row) in rows().into_iter().enumerate() {
        let (verdict, out) = run(&t, &mut w, row.ifindex, &row.input, i as u64 * S);
        if verdict != row.verdict {
            failures.push(format!(
                "row {i} `{}`: verdict {verdict:?}, expected {:?}",
                row.desc, row.verdict
            ));
            continue;
        }
        let expected = row.output.unwrap_or_else(|| {
            let mut f = row.input.clone();
            // Passes and drops leave the frame as it came (Ethernet padding aside).
            f.truncate(out.len());
            f
        });
        if out != expected {
            failures.push(format!(
                "row {i} `{}`: output differs\n   got      {:02x?}\n   expected {:02x?}",
                row.desc, out, expected
            ));
        }
        if matches!(verdict, Verdict::Tx { .. }) && !checksums_ok(&out) {
            failures.push(format!("row {i} `{}`: checksums wrong", row.desc));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every verdict was counted under its reason.
    let c = &w.counters;
    assert_eq!(c.rx, rows().len() as u64);
    assert_eq!(c.drops(D::L4Malformed), 1);
    assert_eq!(c.drops(D::IpChecksum), 1);
    assert_eq!(c.drops(D::IpMalformed), 1);
    assert_eq!(c.drops(D::EthTruncated), 1);
    assert_eq!(c.drops(D::NoEndpoints), 3);
    assert_eq!(c.drops(D::VipNoPort), 1);
    assert_eq!(c.drops(D::TcpNoFlow), 1);
    assert_eq!(c.passes(P::Arp), 1);
    assert_eq!(c.passes(P::Ipv6), 1);
    assert_eq!(c.passes(P::TtlExpired), 1);
    assert_eq!(c.passes(P::NotOurs), 1);
    assert_eq!(c.rejects_sent, 3);
    assert_eq!(c.echo_replies, 1);
    assert_eq!(c.icmp_errors_translated, 1);
    assert_eq!(c.forwarded_plain, 1);
    assert_eq!(c.tx + c.total_drops() + c.total_passes() - c.drops(D::NoEndpoints), c.rx);
}
