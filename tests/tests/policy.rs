//! End to end: NetworkPolicy enforced by the AF_XDP dataplane between pod namespaces, with
//! real TCP (curl to HTTP servers) and UDP (echo) clients, through a ClusterIP and pod to pod.
//!
//! The policy tables are pushed over the control socket as the control plane would send them
//! (identities and allow sets written out here; the compiler's own truth tables live in
//! `control/`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use dataplane::policy::{AllowSetSpec, Endpoint, PolicyUpdate, NOT_ISOLATED};
use kxdp_tests::*;

const CLIENT: u32 = 10;
const OTHER: u32 = 11;

/// Demo pods: client 10.200.0.2; web 10.200.1.11-13 (HTTP 8080); echo 10.200.1.21-22 (UDP
/// 5353); sticky 10.200.1.31-32.
/// - web .11: ingress from the client on TCP 8080 only;
/// - web .12: ingress denied to everyone;
/// - echo .21: ingress from the client on UDP 5353; echo .22: ingress denied;
/// - web .13 and the rest: not isolated.
fn policy() -> PolicyUpdate {
    let ep = |a: [u8; 4], identity, ingress| {
        (Ipv4Addr::from(a), Endpoint { identity, ingress, egress: NOT_ISOLATED })
    };
    PolicyUpdate {
        endpoints: vec![
            ep([10, 200, 0, 2], CLIENT, NOT_ISOLATED),
            ep([10, 200, 1, 11], 20, 1),
            ep([10, 200, 1, 12], 21, 3),
            ep([10, 200, 1, 13], OTHER, NOT_ISOLATED),
            ep([10, 200, 1, 21], 22, 2),
            ep([10, 200, 1, 22], 23, 3),
        ],
        ranges: vec![],
        sets: vec![
            AllowSetSpec { peers: vec![(CLIENT, 6, vec![(8080, 8080)])], any_peer: vec![] },
            AllowSetSpec { peers: vec![(CLIENT, 17, vec![(5353, 5353)])], any_peer: vec![] },
            AllowSetSpec::default(),
        ],
    }
}

fn fetch(pod: &Pod, url: &str) -> Result<String, String> {
    pod.ns.exec(&["curl", "-sS", "--max-time", "2", url])
}

#[test]
fn network_policy_through_the_af_xdp_dataplane() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let pods: Vec<Ipv4Addr> = DEMO_PODS.iter().map(|a| Ipv4Addr::from(*a)).collect();
    let topo = Topology::build("pol", &pods).expect("topology");
    topo.resolve_neighbours().unwrap();
    let client = &topo.pods[0];
    let web13 = &topo.pods[3];
    let mut servers = Vec::new();
    for b in &topo.pods[1..] {
        if b.ip.octets()[3] / 10 == 2 {
            servers.push(udp_echo(b, 5353).unwrap());
        } else {
            servers.push(http_server(b, 8080).unwrap());
        }
    }
    let (cfg, socket) = write_node_config(&topo, &[0]).unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    push_snapshot(&socket, 1, demo_ports()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    // Before any policy: everyone reaches web .12 directly.
    fetch(client, "http://10.200.1.12:8080/").unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    push_policy(&socket, 1, 2, policy()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));

    // Pod to pod, TCP: the client reaches .11 (allowed) and .13 (not isolated), not .12.
    let body = fetch(client, "http://10.200.1.11:8080/").unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("10.200.1.11"), "{body}");
    fetch(client, "http://10.200.1.13:8080/").expect("not isolated");
    let t = Instant::now();
    let err = fetch(client, "http://10.200.1.12:8080/").unwrap_err();
    assert!(err.contains("curl: (28)"), "denied connections time out (silent drop): {err}");
    assert!(t.elapsed() >= Duration::from_secs(1));
    // Another pod may not reach .11: only the client is allowed.
    assert!(fetch(web13, "http://10.200.1.11:8080/").is_err(), "web .13 -> .11 denied");

    // Through the ClusterIP: the policy sees the backend chosen after DNAT. Of web's three
    // backends only .12 refuses the client, so some requests fail and none is answered by .12.
    let mut answered = std::collections::BTreeMap::<String, usize>::new();
    let mut failed = 0;
    for _ in 0..12 {
        match fetch(client, "http://10.96.0.10/") {
            Ok(b) => *answered.entry(b.trim().to_string()).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    assert!(answered.keys().all(|b| !b.contains("10.200.1.12")), "{answered:?}");
    assert!(!answered.is_empty(), "allowed backends answer: {answered:?}, {failed} failed");

    // UDP through the echo ClusterIP: only .21 answers (.22 denies all ingress).
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    let replies = udp_requests(client, echo, 30).unwrap();
    assert!(!replies.is_empty(), "some UDP replies\n{}", dp.log());
    assert!(
        replies.iter().all(|(from, who)| *from == echo && who.contains("10.200.1.21")),
        "{replies:?}"
    );

    // ICMP: .11 allows only TCP 8080, so ping is refused; .13 is not isolated.
    assert!(client.ns.exec(&["ping", "-c", "1", "-W", "1", "10.200.1.11"]).is_err());
    client.ns.exec(&["ping", "-c", "1", "-W", "2", "10.200.1.13"]).expect("ping .13");

    // Removing the policy opens .12 again.
    push_policy(&socket, 2, 3, PolicyUpdate::default()).unwrap();
    fetch(client, "http://10.200.1.12:8080/").expect("open again");

    // The dataplane counted the refusals by reason.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ingress = loop {
        let n = read_stats(&stats).and_then(|r| r["drops"]["policy_ingress"].as_u64()).unwrap_or(0);
        if n >= 4 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ingress >= 4, "policy_ingress drops counted: {ingress}\n{}", dp.log());
    dp.stop();
    drop(servers);
}
