//! Property tests: NAT then reverse NAT restores the original tuple; every rewritten packet's
//! checksums equal an independent full recomputation; malformed frames never panic.

mod common;

use common::*;
use dataplane::pipeline::Verdict;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn nat_then_reverse_nat_restores_the_tuple(
        client in any::<[u8; 4]>().prop_filter("not a table address", |a| a[0] != 10 && a[0] != 192 && a[0] != 0),
        sport in 1u16..,
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        is_tcp in any::<bool>(),
        seq in any::<u32>(),
    ) {
        let t = tables();
        let mut w = worker();
        let (vip, vport) = if is_tcp { (WEB_VIP, 80) } else { (DNS_VIP, 53) };
        let req = if is_tcp {
            tcp(FROM_UPLINK, client, sport, vip, vport, 64, "S", seq, 0, &payload)
        } else {
            udp(FROM_UPLINK, client, sport, vip, vport, 64, &payload)
        };
        let (v, fwd) = run(&t, &mut w, IF_UPLINK, &req, 0);
        prop_assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
        prop_assert!(checksums_ok(&fwd), "forward checksums");
        let (s, sp, d, dp) = tuple(&fwd);
        prop_assert_eq!((s, sp), (client, sport));
        // The backend answers the tuple it saw.
        let resp = if is_tcp {
            tcp(FROM_BACKENDS, d, dp, s, sp, 64, "SA", 1, seq.wrapping_add(1), &payload)
        } else {
            udp(FROM_BACKENDS, d, dp, s, sp, 64, &payload)
        };
        let (v, back) = run(&t, &mut w, IF_BACKENDS, &resp, 1);
        prop_assert_eq!(v, Verdict::Tx { ifindex: IF_UPLINK });
        prop_assert!(checksums_ok(&back), "reply checksums");
        prop_assert_eq!(tuple(&back), (vip, vport, client, sport));
        // Payload untouched both ways.
        prop_assert_eq!(&fwd[fwd.len() - payload.len()..], &payload[..]);
        prop_assert_eq!(&back[back.len() - payload.len()..], &payload[..]);
    }

    #[test]
    fn masqueraded_flows_restore_too(
        client in any::<[u8; 4]>().prop_filter("not a table address", |a| a[0] != 10 && a[0] != 192 && a[0] != 0),
        sport in 1u16..,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let t = tables();
        let mut w = worker();
        let req = tcp(FROM_UPLINK, client, sport, NODE_IP, NP_PORT, 64, "S", 5, 0, &payload);
        let (_, fwd) = run(&t, &mut w, IF_UPLINK, &req, 0);
        prop_assert!(checksums_ok(&fwd));
        let (s, sp, d, dp) = tuple(&fwd);
        let resp = tcp(FROM_BACKENDS, d, dp, s, sp, 64, "SA", 1, 6, &payload);
        let (_, back) = run(&t, &mut w, IF_BACKENDS, &resp, 1);
        prop_assert!(checksums_ok(&back));
        prop_assert_eq!(tuple(&back), (NODE_IP, NP_PORT, client, sport));
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), ethertype_ipv4 in any::<bool>()) {
        let t = tables();
        let mut w = worker();
        let mut f = bytes;
        if ethertype_ipv4 && f.len() > 14 {
            f[12] = 0x08;
            f[13] = 0x00;
            f[14] = 0x45;
        }
        let (v, _) = run(&t, &mut w, IF_CLIENT, &f, 0);
        // Whatever it is, it is counted.
        let c = &w.counters;
        prop_assert_eq!(c.rx, 1);
        match v {
            Verdict::Tx { .. } => prop_assert_eq!(c.tx, 1),
            Verdict::Pass(_) => prop_assert_eq!(c.total_passes(), 1),
            Verdict::Drop(_) => prop_assert_eq!(c.total_drops(), 1),
            Verdict::Handoff { .. } => prop_assert!(false, "a single worker never hands off"),
        }
    }

    #[test]
    fn truncations_and_corruptions_of_valid_packets_never_panic(
        cut in 0usize..120,
        flip_at in 0usize..120,
        flip in any::<u8>(),
        kind in 0u8..4,
    ) {
        let t = tables();
        let mut w = worker();
        let mut f = match kind {
            0 => tcp(FROM_CLIENT, CLIENT, 1000, WEB_VIP, 80, 64, "S", 1, 0, b"abcdef"),
            1 => udp(FROM_CLIENT, CLIENT, 1000, DNS_VIP, 53, 64, b"abcdef"),
            2 => udp(FROM_CLIENT, CLIENT, 1000, EMPTY_VIP, 81, 64, b"abcdef"),
            _ => icmp(FROM_BACKENDS, DNS_BACKEND, CLIENT, 64,
                etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
                &udp(TO_BACKENDS, CLIENT, 1000, DNS_BACKEND, 5353, 63, b"q")[14..42]),
        };
        if flip_at < f.len() {
            f[flip_at] ^= flip;
        }
        f.truncate(cut.max(1).min(f.len()));
        let (v, out) = run(&t, &mut w, IF_CLIENT, &f, 0);
        if let Verdict::Tx { .. } = v {
            prop_assert!(checksums_ok(&out) || flip_at >= 34, "a forwarded frame has valid checksums");
        }
    }
}
