//! Stateful behaviours across table generations and time: backend removal, UDP re-balancing,
//! session affinity, expiry with an injected clock, source NAT, fragments.

mod common;

use std::collections::HashMap;

use common::*;
use dataplane::balance::Algorithm;
use dataplane::counters::DropReason as D;
use dataplane::pipeline::Verdict;
use dataplane::tables::{Protocol, ServicePort, Tables};

/// The standard tables with dns balanced by least connection (one backend, so the same
/// picks): its flows are in the connection counts.
fn tables_lc_dns() -> Tables {
    builder(1)
        .service(ServicePort::new(
            spec(2, "demo/dns:dns", Protocol::Udp, Algorithm::LeastConnection),
            vec![backend(21, DNS_BACKEND, 5353)],
        ))
        .unwrap()
        .build()
}

#[test]
fn removed_backend_resets_tcp_and_rebalances_udp_at_once() {
    let t1 = tables_lc_dns();
    let mut w = worker();
    // A TCP flow and a UDP flow, both established.
    let syn = tcp(FROM_CLIENT, CLIENT, 41000, WEB_VIP, 80, 64, "S", 1, 0, b"");
    assert_eq!(run(&t1, &mut w, IF_CLIENT, &syn, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    let q = udp(FROM_CLIENT, CLIENT, 41001, DNS_VIP, 53, 64, b"q");
    let (_, out) = run(&t1, &mut w, IF_CLIENT, &q, 0);
    assert_eq!(tuple(&out).2, DNS_BACKEND);

    // Generation 2: web's backend is gone; dns's backend 21 is replaced by 22.
    let mut b = t1.next();
    b.upsert_service(std::sync::Arc::new(ServicePort::new(
        spec(1, "demo/web:http", Protocol::Tcp, Algorithm::Random),
        vec![backend(12, [10, 0, 2, 31], 8080)],
    )))
    .unwrap();
    b.upsert_service(std::sync::Arc::new(ServicePort::new(
        spec(2, "demo/dns:dns", Protocol::Udp, Algorithm::LeastConnection),
        vec![backend(22, DNS_BACKEND2, 5353)],
    )))
    .unwrap();
    let t2 = b.build();
    assert_eq!(t2.generation(), 2);

    // The TCP flow stops at once: the client gets a reset from the service address.
    let data = tcp(FROM_CLIENT, CLIENT, 41000, WEB_VIP, 80, 64, "PA", 2, 9, b"x");
    let (v, out) = run(&t2, &mut w, IF_CLIENT, &data, S);
    assert_eq!(v, Verdict::Tx { ifindex: IF_CLIENT });
    assert_eq!(out, rst(BACK_TO_CLIENT, WEB_VIP, 80, CLIENT, 41000, 9, None));
    assert_eq!(w.counters.drops(D::BackendRemoved), 1);
    // The UDP flow moves to the live backend on its next packet.
    let (v, out) = run(&t2, &mut w, IF_CLIENT, &q, S);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(tuple(&out), (CLIENT, 41001, DNS_BACKEND2, 5353));
    assert_eq!(w.counters.udp_rebalanced, 1);
    // A straggling reply from the removed backend matches nothing translated any more.
    let stale = udp(FROM_BACKENDS, DNS_BACKEND, 5353, CLIENT, 41001, 64, b"a");
    let (_, out) = run(&t2, &mut w, IF_BACKENDS, &stale, S);
    assert_eq!(tuple(&out).0, DNS_BACKEND, "not disguised as the service");
    // Connection counts followed: the removed backends hold none.
    assert_eq!(w.ct.conns().active(11), 0);
    assert_eq!(w.ct.conns().active(21), 0);
    assert_eq!(w.ct.conns().active(22), 1);
}

#[test]
fn only_flows_of_least_connection_services_are_counted() {
    // Random (web) reads no connection counts: its flows stay out of them, so starting and
    // ending one touches no count shared by the workers. Least connection (dns) counts its
    // flows from the first packet until they leave conntrack.
    let t = tables_lc_dns();
    let mut w = worker();
    let syn = tcp(FROM_CLIENT, CLIENT, 41000, WEB_VIP, 80, 64, "S", 1, 0, b"");
    assert_eq!(run(&t, &mut w, IF_CLIENT, &syn, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    for port in [41001, 41002] {
        let q = udp(FROM_CLIENT, CLIENT, port, DNS_VIP, 53, 64, b"q");
        assert_eq!(run(&t, &mut w, IF_CLIENT, &q, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    }
    // A NodePort flow (random too) is source-NATed, which the general path does.
    let np = tcp(FROM_CLIENT, CLIENT, 41003, NODE_IP, NP_PORT, 64, "S", 1, 0, b"");
    assert_eq!(run(&t, &mut w, IF_CLIENT, &np, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(w.counters.snat_flows, 1);
    assert_eq!(w.ct.len(), 4);
    assert_eq!(w.ct.conns().active(11), 0, "random: not counted");
    assert_eq!(w.ct.conns().active(21), 2, "least connection: counted");
    // Expired and swept, the counted flows leave the counts.
    w.ct.gc(200 * S, 1 << 20);
    assert_eq!(w.ct.conns().active(21), 0);
}

#[test]
fn a_new_generation_keeps_flows_whose_backend_stays() {
    let t1 = tables();
    let mut w = worker();
    let syn = tcp(FROM_CLIENT, CLIENT, 41100, WEB_VIP, 80, 64, "S", 1, 0, b"");
    run(&t1, &mut w, IF_CLIENT, &syn, 0);
    // Generation 2 adds a backend and marks the first one terminating: existing flows stay.
    let mut b = t1.next();
    let mut old = backend(11, WEB_BACKEND, 8080);
    old.ready = false;
    old.terminating = true;
    b.upsert_service(std::sync::Arc::new(ServicePort::new(
        spec(1, "demo/web:http", Protocol::Tcp, Algorithm::Random),
        vec![old, backend(12, [10, 0, 2, 31], 8080)],
    )))
    .unwrap();
    let t2 = b.build();
    let data = tcp(FROM_CLIENT, CLIENT, 41100, WEB_VIP, 80, 64, "A", 2, 9, b"");
    let (v, out) = run(&t2, &mut w, IF_CLIENT, &data, S);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(tuple(&out).2, WEB_BACKEND);
    // New flows avoid the terminating backend.
    for p in 0..20 {
        let syn = tcp(FROM_CLIENT, CLIENT, 42000 + p, WEB_VIP, 80, 64, "S", 1, 0, b"");
        let (_, out) = run(&t2, &mut w, IF_CLIENT, &syn, S);
        assert_eq!(tuple(&out).2, [10, 0, 2, 31]);
    }
}

#[test]
fn session_affinity_holds_until_timeout_and_drops_removed_backends() {
    let t = tables();
    let mut w = worker();
    let send =
        |w: &mut dataplane::WorkerState, t: &dataplane::tables::Tables, port: u16, now: u64| {
            let syn = tcp(FROM_CLIENT, CLIENT, port, AFF_VIP, 80, 64, "S", 1, 0, b"");
            let (v, out) = run(t, w, IF_CLIENT, &syn, now);
            assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
            tuple(&out).2
        };
    let first = send(&mut w, &t, 43000, 0);
    for p in 1..50 {
        assert_eq!(send(&mut w, &t, 43000 + p, p as u64 * S), first, "same client, same backend");
    }
    assert_eq!(w.counters.affinity_hits, 49);
    // Each new connection refreshed the 100 s timeout: still held at 49 + 99 s.
    assert_eq!(send(&mut w, &t, 43100, 148 * S), first);
    // After the timeout the client is balanced afresh: over many expiries, other backends show.
    let mut seen = std::collections::HashSet::new();
    for i in 0..40u64 {
        seen.insert(send(&mut w, &t, 44000 + i as u16, (300 + i * 200) * S));
    }
    assert!(seen.len() > 1, "expired affinity is re-balanced: {seen:?}");

    // An entry pointing at a removed backend is dropped.
    let now = 10_000 * S;
    let held = send(&mut w, &t, 45000, now);
    let mut b = t.next();
    let remaining: Vec<_> = [[10, 0, 2, 31], [10, 0, 2, 32], [10, 0, 2, 33]]
        .into_iter()
        .zip([31u32, 32, 33])
        .filter(|(a, _)| *a != held)
        .map(|(a, id)| backend(id, a, 80))
        .collect();
    let mut s = spec(6, "demo/aff:http", Protocol::Tcp, Algorithm::Random);
    s.affinity_timeout_s = Some(100);
    b.upsert_service(std::sync::Arc::new(ServicePort::new(s, remaining))).unwrap();
    let t2 = b.build();
    let moved = send(&mut w, &t2, 45001, now + S);
    assert_ne!(moved, held);
    // And the new choice is sticky again.
    assert_eq!(send(&mut w, &t2, 45002, now + 2 * S), moved);
}

#[test]
fn round_robin_cycles_over_backends_in_order() {
    let t = tables();
    let mut w = worker();
    let mut got = Vec::new();
    for p in 0..6 {
        let syn = tcp(FROM_CLIENT, CLIENT, 46000 + p, RR_VIP, 80, 64, "S", 1, 0, b"");
        got.push(tuple(&run(&t, &mut w, IF_CLIENT, &syn, 0).1).2[3]);
    }
    // Whatever the starting point, the order is 31, 32, 33 repeating.
    let start = got.iter().position(|&b| b == 31).unwrap();
    let rotated: Vec<u8> = got.iter().cycle().skip(start).take(6).copied().collect();
    assert_eq!(rotated, vec![31, 32, 33, 31, 32, 33]);
}

#[test]
fn udp_flow_expires_like_linux_conntrack() {
    let t = tables();
    let mut w = worker();
    let q = udp(FROM_CLIENT, CLIENT, 47000, DNS_VIP, 53, 64, b"q");
    run(&t, &mut w, IF_CLIENT, &q, 0);
    assert_eq!(w.counters.nat_new, 1);
    run(&t, &mut w, IF_CLIENT, &q, 29 * S);
    assert_eq!((w.counters.nat_new, w.counters.nat_forward), (1, 1), "alive before 30 s unreplied");
    run(&t, &mut w, IF_CLIENT, &q, 59 * S + 1);
    assert_eq!(w.counters.nat_new, 2, "expired 30 s after the last packet: a new flow");
    // A replied flow lives 120 s.
    let r = udp(FROM_BACKENDS, DNS_BACKEND, 5353, CLIENT, 47000, 64, b"a");
    run(&t, &mut w, IF_BACKENDS, &r, 60 * S);
    run(&t, &mut w, IF_CLIENT, &q, 179 * S);
    assert_eq!(w.counters.nat_new, 2);
    assert_eq!(w.ct.gc(400 * S, 1 << 20), 1, "the sweep removes it once expired");
    assert!(w.ct.is_empty());
}

#[test]
fn nodeport_to_a_remote_backend_is_masqueraded_and_replies_restored() {
    let t = tables();
    let mut w = worker();
    let syn = tcp(FROM_UPLINK, EXTERNAL, 5555, NODE_IP, NP_PORT, 64, "S", 1, 0, b"");
    let (v, out) = run(&t, &mut w, IF_UPLINK, &syn, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    let (s, sp, d, dp) = tuple(&out);
    assert_eq!((s, d, dp), (NODE_IP, WEB_BACKEND, 8080));
    assert!((32768..=60999).contains(&sp));
    assert!(checksums_ok(&out));
    assert_eq!(w.counters.snat_flows, 1);
    let reply = tcp(FROM_BACKENDS, WEB_BACKEND, 8080, NODE_IP, sp, 64, "SA", 100, 2, b"");
    let (v, out) = run(&t, &mut w, IF_BACKENDS, &reply, S);
    assert_eq!(v, Verdict::Tx { ifindex: IF_UPLINK });
    assert_eq!(out, tcp(TO_UPLINK, NODE_IP, NP_PORT, EXTERNAL, 5555, 63, "SA", 100, 2, b""));
}

#[test]
fn hairpin_is_source_natted() {
    // A backend reaching its own service gets its source rewritten so the reply returns here.
    let t = tables();
    let mut w = worker();
    let syn = udp(FROM_BACKENDS, DNS_BACKEND, 48000, DNS_VIP, 53, 64, b"self");
    let (v, out) = run(&t, &mut w, IF_BACKENDS, &syn, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    let (s, sp, d, dp) = tuple(&out);
    assert_eq!((s, d, dp), (NODE_IP, DNS_BACKEND, 5353));
    let back = udp(FROM_BACKENDS, DNS_BACKEND, 5353, NODE_IP, sp, 64, b"r");
    let (_, out) = run(&t, &mut w, IF_BACKENDS, &back, S);
    assert_eq!(tuple(&out), (DNS_VIP, 53, DNS_BACKEND, 48000));
}

/// A UDP datagram split in two fragments (8-byte aligned), built by hand.
fn fragments(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, id: u16) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..40u8).collect();
    let whole = udp(FROM_CLIENT, src, sport, dst, dport, 64, &payload);
    let l4 = &whole[34..]; // 8 UDP header + 40 payload = 48 bytes
    let mk = |part: &[u8], offset_units: u16, more: bool| {
        let mut f = whole[..34].to_vec();
        f.extend_from_slice(part);
        let total = (20 + part.len()) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        let frag = (if more { 0x2000 } else { 0 }) | offset_units;
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[24] = 0;
        f[25] = 0;
        let c = dataplane::wire::csum_fold(dataplane::wire::csum_partial(&f[14..34], 0));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    (mk(&l4[..24], 0, true), mk(&l4[24..], 3, false))
}

#[test]
fn fragments_follow_their_first_fragment() {
    let t = tables();
    let mut w = worker();
    let (first, second) = fragments(CLIENT, 49000, DNS_VIP, 53, 0x4242);
    // The second fragment alone, before the first: to a service address, a counted drop.
    let (v, _) = run(&t, &mut w, IF_CLIENT, &second, 0);
    assert_eq!(v, Verdict::Drop(D::FragmentUnknown));
    let (v, out1) = run(&t, &mut w, IF_CLIENT, &first, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    let (v, out2) = run(&t, &mut w, IF_CLIENT, &second, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(w.counters.fragments_translated, 1);
    // Reassembled, the datagram is the whole original one translated, checksum right.
    let mut whole = out1[..34].to_vec();
    whole.extend_from_slice(&out1[34..]);
    whole.extend_from_slice(&out2[34..]);
    let total = (whole.len() - 14) as u16;
    whole[16..18].copy_from_slice(&total.to_be_bytes());
    whole[20] = 0x40; // DF, no MF, offset 0
    whole[21] = 0;
    whole[24] = 0;
    whole[25] = 0;
    let c = dataplane::wire::csum_fold(dataplane::wire::csum_partial(&whole[14..34], 0));
    whole[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(tuple(&whole), (CLIENT, 49000, DNS_BACKEND, 5353));
    assert_eq!(&out2[26..34], &[10, 0, 1, 5, 10, 0, 2, 21], "addresses of the later fragment");
    assert!(checksums_ok(&whole));
}

#[test]
fn random_spreads_new_flows_over_backends() {
    // kube-proxy's default: each new flow picks uniformly.
    let mut b = tables().next();
    b.upsert_service(std::sync::Arc::new(ServicePort::new(
        spec(1, "demo/web:http", Protocol::Tcp, Algorithm::Random),
        vec![
            backend(31, [10, 0, 2, 31], 80),
            backend(32, [10, 0, 2, 32], 80),
            backend(33, [10, 0, 2, 33], 80),
        ],
    )))
    .unwrap();
    let t = b.build();
    let mut w = worker_with(1 << 14);
    let mut counts: HashMap<u8, u32> = HashMap::new();
    for p in 0..6000u32 {
        let syn = tcp(
            FROM_CLIENT,
            [10, 0, 1, (p % 200) as u8],
            10000 + (p / 200) as u16,
            WEB_VIP,
            80,
            64,
            "S",
            1,
            0,
            b"",
        );
        let (_, out) = run(&t, &mut w, IF_CLIENT, &syn, 0);
        *counts.entry(tuple(&out).2[3]).or_default() += 1;
    }
    for b in [31, 32, 33] {
        let n = counts[&b];
        assert!((1800..2200).contains(&n), "backend {b}: {n} of 6000");
    }
}

/// Two workers sharing affinity and connection counts, as the I/O loop sets them up.
fn two_workers() -> Vec<dataplane::WorkerState> {
    use dataplane::pipeline::{Shared, WorkerConfig, WorkerState};
    let shared = Shared::new(1024, 1024);
    (0..2u16)
        .map(|id| {
            let cfg = WorkerConfig {
                worker_id: id,
                workers: 2,
                conntrack_capacity: 1024,
                ..WorkerConfig::default()
            };
            WorkerState::new(&cfg, &shared)
        })
        .collect()
}

#[test]
fn flows_are_owned_by_one_worker_whichever_worker_receives_them() {
    use dataplane::pipeline::{owner_of, WorkerState};
    let t = tables();
    let mut workers: Vec<WorkerState> = two_workers();
    // Deliver a frame to worker `at`, following hand-offs as the I/O loop does.
    let deliver = |ws: &mut Vec<WorkerState>, at: usize, ifindex: u32, pkt: &[u8]| {
        let (v, out) = run(&t, &mut ws[at], ifindex, pkt, 0);
        match v {
            Verdict::Handoff { worker } => {
                assert_ne!(usize::from(worker), at);
                assert_eq!(out, pkt, "a handed-off frame is untouched");
                ws[usize::from(worker)].local_only = true;
                let r = run(&t, &mut ws[usize::from(worker)], ifindex, pkt, 0);
                ws[usize::from(worker)].local_only = false;
                (usize::from(worker), r.0, r.1)
            }
            v => (at, v, out),
        }
    };
    let mut crossed = 0;
    for port in 50000..50040u16 {
        let owner = usize::from(owner_of(&t, u32::from(ip(CLIENT)), port, 2));
        // The request arrives at one worker, the reply at the other.
        let req = udp(FROM_CLIENT, CLIENT, port, DNS_VIP, 53, 64, b"q");
        let (w1, v, out) = deliver(&mut workers, usize::from(port % 2 == 0), IF_CLIENT, &req);
        assert_eq!((w1, v), (owner, Verdict::Tx { ifindex: IF_BACKENDS }));
        let (s, sp, d, dp) = tuple(&out);
        let resp = udp(FROM_BACKENDS, d, dp, s, sp, 64, b"a");
        let (w2, v, back) = deliver(&mut workers, usize::from(port % 2 == 1), IF_BACKENDS, &resp);
        assert_eq!((w2, v), (owner, Verdict::Tx { ifindex: IF_CLIENT }));
        assert_eq!(tuple(&back), (DNS_VIP, 53, CLIENT, port), "reply translated by the owner");
        crossed += 1;
    }
    assert_eq!(crossed, 40);
    let handed: u64 = workers.iter().map(|w| w.counters.handed_off).sum();
    assert_eq!(handed, 40, "each flow crossed workers exactly once per direction pair");
    // Masqueraded flows: the reply's destination port tells the owner.
    let syn = tcp(FROM_UPLINK, EXTERNAL, 7000, NODE_IP, NP_PORT, 64, "S", 1, 0, b"");
    let (owner, v, out) = deliver(&mut workers, 0, IF_UPLINK, &syn);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    let (s, sp, d, dp) = tuple(&out);
    assert_eq!(usize::from(owner_of(&t, u32::from(ip(s)), sp, 2)), owner);
    let reply = tcp(FROM_BACKENDS, d, dp, s, sp, 64, "SA", 1, 2, b"");
    let (w, v, back) = deliver(&mut workers, 1 - owner, IF_BACKENDS, &reply);
    assert_eq!((w, v), (owner, Verdict::Tx { ifindex: IF_UPLINK }));
    assert_eq!(tuple(&back), (NODE_IP, NP_PORT, EXTERNAL, 7000));
}

#[test]
fn icmp_errors_reach_the_worker_that_owns_the_flow() {
    use dataplane::pipeline::owner_of;
    let t = tables();
    let mut ws = two_workers();
    // A port whose flow belongs to worker 1.
    let port = (40000..41000u16).find(|&p| owner_of(&t, u32::from(ip(CLIENT)), p, 2) == 1).unwrap();
    ws[1].local_only = true;
    let (v, _) =
        run(&t, &mut ws[1], IF_CLIENT, &udp(FROM_CLIENT, CLIENT, port, DNS_VIP, 53, 64, b"q"), 0);
    ws[1].local_only = false;
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    // The backend's port unreachable about it arrives at worker 0: handed to worker 1.
    let quote = l3(&udp(TO_BACKENDS, CLIENT, port, DNS_BACKEND, 5353, 63, b"q"))[..28].to_vec();
    let unreach = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::Port,
    );
    let err = icmp(FROM_BACKENDS, DNS_BACKEND, CLIENT, 64, unreach.clone(), &quote);
    assert_eq!(run(&t, &mut ws[0], IF_BACKENDS, &err, 0).0, Verdict::Handoff { worker: 1 });
    ws[1].local_only = true;
    let (v, out) = run(&t, &mut ws[1], IF_BACKENDS, &err, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_CLIENT });
    assert_eq!(&out[26..30], &DNS_VIP, "from the service address");
}
