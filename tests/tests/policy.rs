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

/// What each test runs on: the namespaces, their servers, the dataplane, its control socket
/// and stats file.
struct Setup {
    topo: Topology,
    servers: Vec<Server>,
    dp: Proc,
    socket: std::path::PathBuf,
    stats: std::path::PathBuf,
}

/// The namespace topology with HTTP servers on the web and sticky pods and UDP echo on the
/// echo pods, and the dataplane on one worker.
fn setup(tag: &str) -> Setup {
    let pods: Vec<Ipv4Addr> = DEMO_PODS.iter().map(|a| Ipv4Addr::from(*a)).collect();
    let topo = Topology::build(tag, &pods).expect("topology");
    topo.resolve_neighbours().unwrap();
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
    let dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    Setup { topo, servers, dp, socket, stats }
}

/// What [`policy`] (or the equivalent NetworkPolicies) must enforce, checked with real
/// clients: pod to pod and through ClusterIPs, TCP, UDP and ICMP.
fn assert_enforced(topo: &Topology, dp: &Proc) {
    let client = &topo.pods[0];
    let web13 = &topo.pods[3];
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
}

/// Waits until the dataplane has counted at least `n` ingress-policy drops.
fn assert_ingress_drops(stats: &std::path::Path, n: u64, dp: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let ingress = loop {
        let got =
            read_stats(stats).and_then(|r| r["drops"]["policy_ingress"].as_u64()).unwrap_or(0);
        if got >= n || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ingress >= n, "policy_ingress drops counted: {ingress}\n{}", dp.log());
}

#[test]
fn network_policy_through_the_af_xdp_dataplane() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let Setup { topo, servers, mut dp, socket, stats } = setup("pol");
    push_snapshot(&socket, 1, demo_ports()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    // Before any policy: everyone reaches web .12 directly.
    fetch(&topo.pods[0], "http://10.200.1.12:8080/")
        .unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    push_policy(&socket, 1, 2, policy()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    assert_enforced(&topo, &dp);
    // Removing the policy opens .12 again.
    push_policy(&socket, 2, 3, PolicyUpdate::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    fetch(&topo.pods[0], "http://10.200.1.12:8080/").expect("open again");
    assert_ingress_drops(&stats, 4, &dp);
    dp.stop();
    drop(servers);
}

/// The demo pods as Kubernetes Pods (labels, named container ports, addresses, node-1).
fn pods_yaml() -> String {
    let pods = [
        ("client", "10.200.0.2", "app: client", "http", 8080, "TCP"),
        ("web-11", "10.200.1.11", "{app: web, tier: a}", "http", 8080, "TCP"),
        ("web-12", "10.200.1.12", "{app: web, tier: b}", "http", 8080, "TCP"),
        ("web-13", "10.200.1.13", "{app: web, tier: c}", "http", 8080, "TCP"),
        ("echo-21", "10.200.1.21", "{app: echo, tier: a}", "dns", 5353, "UDP"),
        ("echo-22", "10.200.1.22", "{app: echo, tier: b}", "dns", 5353, "UDP"),
        ("sticky-31", "10.200.1.31", "{app: sticky}", "http", 8080, "TCP"),
        ("sticky-32", "10.200.1.32", "{app: sticky}", "http", 8080, "TCP"),
    ];
    let mut out = String::new();
    for (name, ip, labels, port_name, port, proto) in pods {
        let labels =
            if labels.starts_with('{') { labels.to_string() } else { format!("{{{labels}}}") };
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: \
             {labels}}}\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    image: x\n    \
             ports: [{{name: {port_name}, containerPort: {port}, protocol: {proto}}}]\nstatus: \
             {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
        );
    }
    out
}

/// The NetworkPolicies equivalent to [`policy`]: web tier a and echo tier a take the client
/// on their named port; tier b takes nobody.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-a-from-client, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web, tier: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: echo-a-from-client, namespace: demo}
spec:
  podSelector: {matchLabels: {app: echo, tier: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: UDP, port: dns}]
"#;

const DENY_B: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: demo}
spec:
  podSelector: {matchLabels: {tier: b}}
  policyTypes: [Ingress]
"#;

#[test]
fn compiled_network_policies_from_manifests_are_enforced_and_follow_changes() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let Setup { topo, servers, mut dp, socket, stats } = setup("polc");
    // The demo's Services and EndpointSlices, the pods, and the policies, as a manifest
    // directory that kxdp-control watches.
    let dir = topo.dir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo");
    for e in std::fs::read_dir(&demo).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("pods.yaml"), pods_yaml()).unwrap();
    std::fs::write(dir.join("policies.yaml"), POLICIES).unwrap();
    std::fs::write(dir.join("deny-b.yaml"), DENY_B).unwrap();
    let ctl = binary("kxdp-control");
    let mut control = Proc::start(
        &topo.node,
        &[
            ctl.to_str().unwrap(),
            "--manifests",
            dir.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--node-name",
            "node-1",
            "--metrics-address",
            "none",
        ],
        &topo.dir.join("control.log"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let published = wait_for(Duration::from_secs(20), || {
        read_stats(&stats).is_some_and(|r| r["control_generation"].as_u64().unwrap_or(0) > 0)
    });
    assert!(published, "control published nothing:\n{}", control.log());
    // The policy follows the snapshot: wait until .12 is closed.
    let closed = wait_for(Duration::from_secs(10), || {
        fetch(&topo.pods[0], "http://10.200.1.12:8080/").is_err()
    });
    assert!(closed, "policy not enforced:\n{}\n{}", control.log(), dp.log());
    assert_enforced(&topo, &dp);
    // Deleting the deny-b policy (the directory is re-read) opens .12 again.
    std::fs::remove_file(dir.join("deny-b.yaml")).unwrap();
    let open = wait_for(Duration::from_secs(15), || {
        fetch(&topo.pods[0], "http://10.200.1.12:8080/").is_ok()
    });
    assert!(open, "policy removal not applied:\n{}", control.log());
    assert_ingress_drops(&stats, 4, &dp);
    control.stop();
    dp.stop();
    drop(servers);
}
