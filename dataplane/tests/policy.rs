//! NetworkPolicy through the whole pipeline: the policy sees the backend pod after service
//! DNAT, replies of allowed connections pass through conntrack, pod-to-pod connections are
//! checked and tracked, `ipBlock` ranges classify outside addresses, ICMP echo is checked, and
//! two workers keep tracked pod-to-pod flows consistent.
//!
//! The policy tables are written by hand here (the control plane's compiler has its own
//! truth-table tests); this file checks what the pipeline does with them.

mod common;

use std::sync::Arc;

use common::*;
use dataplane::counters::DropReason as D;
use dataplane::pipeline::{owner_of, Verdict, WorkerState};
use dataplane::policy::{
    AllowSetSpec, Endpoint, PolicyTables, PolicyUpdate, ANY_PROTO, NOT_ISOLATED, WORLD,
};
use dataplane::tables::Tables;
use etherparse::Icmpv4Type;

const ID_CLIENT: u32 = 10;
const ID_WEB: u32 = 20;
const ID_DNS: u32 = 21;
const ID_DNS2: u32 = 22;
/// The class of 203.0.113.0/24 (an `ipBlock` some policy names).
const ID_PARTNERS: u32 = 30;
const OUTSIDER: [u8; 4] = [198, 51, 100, 1];

/// - client: egress to web on TCP 8080, DNS (UDP 5353) to anyone; ingress: nothing (deny all).
/// - web backend: ingress from the client on TCP 8080 and from 203.0.113.0/24 on any TCP port.
/// - dns backend: not isolated.  - dns backend 2: ingress denied to everyone.
fn policy() -> PolicyUpdate {
    let ep = |identity, ingress, egress| Endpoint { identity, ingress, egress };
    PolicyUpdate {
        endpoints: vec![
            (ip(CLIENT), ep(ID_CLIENT, 3, 1)),
            (ip(WEB_BACKEND), ep(ID_WEB, 2, NOT_ISOLATED)),
            (ip(DNS_BACKEND), ep(ID_DNS, NOT_ISOLATED, NOT_ISOLATED)),
            (ip(DNS_BACKEND2), ep(ID_DNS2, 3, NOT_ISOLATED)),
        ],
        ranges: vec![(ip([203, 0, 113, 0]), ID_PARTNERS), (ip([203, 0, 114, 0]), WORLD)],
        sets: vec![
            AllowSetSpec {
                peers: vec![(ID_WEB, 6, vec![(8080, 8080)])],
                any_peer: vec![(17, vec![(5353, 5353)])],
            },
            AllowSetSpec {
                peers: vec![(ID_CLIENT, 6, vec![(8080, 8080)]), (ID_PARTNERS, 6, vec![(0, 65535)])],
                any_peer: vec![],
            },
            AllowSetSpec::default(),
        ],
    }
}

fn with_policy(t: Tables, u: PolicyUpdate) -> Tables {
    let mut b = t.next();
    b.set_policy(Arc::new(PolicyTables::build(u).expect("valid policy")));
    b.build()
}

fn syn(l2: L2, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp(l2, src, sport, dst, dport, 64, "S", 1, 0, b"")
}

#[test]
fn services_are_checked_against_the_backend_pod_after_dnat() {
    let t = with_policy(tables(), policy());
    let mut w = worker();
    // Client -> web service: egress allows web:8080, web's ingress allows the client.
    let (v, out) = run(&t, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 40000, WEB_VIP, 80), 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(tuple(&out), (CLIENT, 40000, WEB_BACKEND, 8080));
    // Its reply passes although the client is isolated for ingress: it is a known flow.
    let reply = tcp(FROM_BACKENDS, WEB_BACKEND, 8080, CLIENT, 40000, 64, "SA", 9, 2, b"");
    let (v, back) = run(&t, &mut w, IF_BACKENDS, &reply, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_CLIENT });
    assert_eq!(tuple(&back), (WEB_VIP, 80, CLIENT, 40000));
    // DNS to anyone on UDP 5353 (the backend port, not the service port 53).
    let q = udp(FROM_CLIENT, CLIENT, 40001, DNS_VIP, 53, 64, b"q");
    assert_eq!(run(&t, &mut w, IF_CLIENT, &q, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    // The round-robin service's backends are not allowed by the client's egress.
    let (v, _) = run(&t, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 40002, RR_VIP, 80), 0);
    assert_eq!(v, Verdict::Drop(D::PolicyEgress));
    assert_eq!(w.counters.drops(D::PolicyEgress), 1);
    // Without policy the same packet goes through: the policy made the difference.
    let (v, _) =
        run(&tables(), &mut worker(), IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 40002, RR_VIP, 80), 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
}

#[test]
fn outside_clients_are_classified_by_ip_block() {
    let t = with_policy(tables(), policy());
    let mut w = worker();
    // NodePort to the web backend: from the partner block, allowed on any TCP port.
    let partner = syn(FROM_UPLINK, EXTERNAL, 7000, NODE_IP, NP_PORT);
    assert_eq!(run(&t, &mut w, IF_UPLINK, &partner, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    let outsider = syn(FROM_UPLINK, OUTSIDER, 7000, NODE_IP, NP_PORT);
    assert_eq!(run(&t, &mut w, IF_UPLINK, &outsider, 0).0, Verdict::Drop(D::PolicyIngress));
    assert_eq!(w.counters.drops(D::PolicyIngress), 1);
}

#[test]
fn pod_to_pod_connections_are_checked_and_their_replies_tracked() {
    let t = with_policy(tables(), policy());
    let mut w = worker();
    // Client -> web pod directly: allowed, tracked.
    let (v, out) =
        run(&t, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 41000, WEB_BACKEND, 8080), 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(tuple(&out), (CLIENT, 41000, WEB_BACKEND, 8080), "no translation");
    assert_eq!(w.counters.policy_flows, 1);
    // The web pod's reply reaches the client, which denies all ingress: conntrack lets it.
    let reply = tcp(FROM_BACKENDS, WEB_BACKEND, 8080, CLIENT, 41000, 64, "SA", 9, 2, b"");
    let (v, back) = run(&t, &mut w, IF_BACKENDS, &reply, 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_CLIENT });
    assert_eq!(tuple(&back), (WEB_BACKEND, 8080, CLIENT, 41000));
    // The web pod opening a connection to the client is refused by the client's ingress.
    let (v, _) =
        run(&t, &mut w, IF_BACKENDS, &syn(FROM_BACKENDS, WEB_BACKEND, 8080, CLIENT, 41001), 0);
    assert_eq!(v, Verdict::Drop(D::PolicyIngress));
    // An unisolated pod to the web pod: refused by web's ingress (only the client may).
    let (v, _) =
        run(&t, &mut w, IF_BACKENDS, &syn(FROM_BACKENDS, DNS_BACKEND, 5000, WEB_BACKEND, 8080), 0);
    assert_eq!(v, Verdict::Drop(D::PolicyIngress));
    // The client to a port its egress does not allow.
    let (v, _) = run(&t, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 41002, WEB_BACKEND, 22), 0);
    assert_eq!(v, Verdict::Drop(D::PolicyEgress));
    // Between unisolated pods nothing is checked or tracked.
    let q = udp(FROM_BACKENDS, DNS_BACKEND, 5000, [10, 0, 2, 31], 80, 64, b"x");
    assert_eq!(run(&t, &mut w, IF_BACKENDS, &q, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    assert_eq!(w.counters.policy_flows, 1);
}

#[test]
fn established_connections_survive_a_stricter_policy() {
    let t1 = with_policy(tables(), policy());
    let mut w = worker();
    let (v, _) =
        run(&t1, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 42000, WEB_BACKEND, 8080), 0);
    assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
    // Web now denies all ingress.
    let mut strict = policy();
    strict.endpoints[1].1.ingress = 3;
    let t2 = with_policy(t1.clone(), strict);
    let ack = tcp(FROM_CLIENT, CLIENT, 42000, WEB_BACKEND, 8080, 64, "A", 2, 10, b"x");
    assert_eq!(run(&t2, &mut w, IF_CLIENT, &ack, 0).0, Verdict::Tx { ifindex: IF_BACKENDS });
    let (v, _) =
        run(&t2, &mut w, IF_CLIENT, &syn(FROM_CLIENT, CLIENT, 42001, WEB_BACKEND, 8080), 0);
    assert_eq!(v, Verdict::Drop(D::PolicyIngress), "new connections see the new policy");
}

#[test]
fn icmp_echo_needs_a_rule_without_ports() {
    let mut u = policy();
    // The dns backend gets an ingress set allowing the client everything (no ports).
    u.sets.push(AllowSetSpec {
        peers: vec![
            (ID_CLIENT, 6, vec![(0, 65535)]),
            (ID_CLIENT, 17, vec![(0, 65535)]),
            (ID_CLIENT, ANY_PROTO, vec![(0, 65535)]),
        ],
        any_peer: vec![],
    });
    u.endpoints[2].1.ingress = 4;
    // ...and the client's egress allows everything to it.
    u.sets[0].peers.push((ID_DNS, ANY_PROTO, vec![(0, 65535)]));
    let t = with_policy(tables(), u);
    let mut w = worker();
    let echo = |src, dst| {
        icmp(
            FROM_CLIENT,
            src,
            dst,
            64,
            Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 7, seq: 1 }),
            b"ping",
        )
    };
    assert!(matches!(
        run(&t, &mut w, IF_CLIENT, &echo(CLIENT, DNS_BACKEND), 0).0,
        Verdict::Tx { .. }
    ));
    assert_eq!(
        run(&t, &mut w, IF_CLIENT, &echo(CLIENT, WEB_BACKEND), 0).0,
        Verdict::Drop(D::PolicyEgress)
    );
    assert_eq!(
        run(&t, &mut w, IF_BACKENDS, &echo(DNS_BACKEND, DNS_BACKEND2), 0).0,
        Verdict::Drop(D::PolicyIngress)
    );
    assert!(matches!(
        run(&t, &mut w, IF_BACKENDS, &echo(DNS_BACKEND, [10, 0, 2, 31]), 0).0,
        Verdict::Tx { .. }
    ));
}

#[test]
fn two_workers_keep_tracked_pod_to_pod_flows_with_at_most_two_hops() {
    use dataplane::pipeline::{Shared, WorkerConfig};
    let t = with_policy(tables(), policy());
    let shared = Shared::new(1024, 1024);
    let mut ws: Vec<WorkerState> = (0..2u16)
        .map(|id| {
            let cfg = WorkerConfig {
                worker_id: id,
                workers: 2,
                conntrack_capacity: 1024,
                ..Default::default()
            };
            WorkerState::new(&cfg, &shared)
        })
        .collect();
    // Delivers to worker `at`, following hand-offs as the I/O loop does; returns the hops.
    let deliver = |ws: &mut Vec<WorkerState>, at: usize, ifindex: u32, pkt: &[u8]| {
        let (mut v, mut out) = run(&t, &mut ws[at], ifindex, pkt, 0);
        let mut hops = 0;
        while let Verdict::Handoff { worker } = v {
            hops += 1;
            assert!(hops <= 2, "more than two hops");
            assert_eq!(out, pkt, "a handed-off frame is untouched");
            let k = usize::from(worker);
            ws[k].local_only = true;
            (v, out) = run(&t, &mut ws[k], ifindex, pkt, 0);
            ws[k].local_only = false;
        }
        (v, out, hops)
    };
    let mut max_hops = 0;
    for port in 43000..43040u16 {
        let s = syn(FROM_CLIENT, CLIENT, port, WEB_BACKEND, 8080);
        let (v, _, h1) = deliver(&mut ws, usize::from(port % 2 == 0), IF_CLIENT, &s);
        assert_eq!(v, Verdict::Tx { ifindex: IF_BACKENDS });
        let reply = tcp(FROM_BACKENDS, WEB_BACKEND, 8080, CLIENT, port, 64, "SA", 9, 2, b"");
        let (v, _, h2) = deliver(&mut ws, usize::from(port % 3 == 0), IF_BACKENDS, &reply);
        assert_eq!(v, Verdict::Tx { ifindex: IF_CLIENT }, "reply of port {port} found its flow");
        max_hops = max_hops.max(h1).max(h2);
        let owner = usize::from(owner_of(&t, u32::from(ip(CLIENT)), port, 2));
        assert!(!ws[owner].ct.is_empty());
    }
    assert_eq!(max_hops, 2, "some flows needed the second hop");
    let tracked: u64 = ws.iter().map(|w| w.counters.policy_flows).sum();
    assert_eq!(tracked, 40, "each flow tracked once, by its source's owner");
}
