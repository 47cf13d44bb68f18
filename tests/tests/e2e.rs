//! End to end: the dataplane on a node namespace's veths, real TCP and UDP clients and
//! servers in pod namespaces, traffic through ClusterIPs.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use kxdp_tests::*;

#[test]
fn clusterip_traffic_through_the_af_xdp_dataplane() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let pods: Vec<Ipv4Addr> = DEMO_PODS.iter().map(|a| Ipv4Addr::from(*a)).collect();
    let topo = Topology::build("e2e", &pods).expect("topology");
    topo.resolve_neighbours().unwrap();
    let (client, backends) = topo.pods.split_first().unwrap();
    let mut servers = Vec::new();
    let mut by_ip: HashMap<Ipv4Addr, &Pod> = HashMap::new();
    for b in backends {
        by_ip.insert(b.ip, b);
        if b.ip.octets()[3] / 10 == 2 {
            servers.push((b.ip, udp_echo(b, 5353).unwrap()));
        } else {
            servers.push((b.ip, http_server(b, 8080).unwrap()));
        }
    }
    let (cfg, socket) = write_node_config(&topo, &[0]).unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    push_snapshot(&socket, 1, demo_ports()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));

    // UDP through a ClusterIP: replies come from the service address; load spreads.
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    if let Ok(secs) = std::env::var("KXDP_E2E_PAUSE") {
        eprintln!("paused for inspection: {}", topo.dir.display());
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
    }
    let replies = udp_requests(client, echo, 100).unwrap();
    assert!(replies.len() >= 95, "UDP replies: {} of 100\n{}", replies.len(), dp.log());
    assert!(replies.iter().all(|(from, _)| *from == echo), "replies from the service address");
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for (_, who) in &replies {
        *per_backend.entry(who.clone()).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 2, "both echo backends answered: {per_backend:?}");

    // TCP (HTTP with curl) through a ClusterIP.
    let mut web: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let body =
            curl(client, "http://10.96.0.10/").unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
        *web.entry(body.trim().to_string()).or_default() += 1;
    }
    assert!(web.len() >= 2, "web load spread over backends: {web:?}");

    // Session affinity: one client, one backend.
    let mut sticky = std::collections::HashSet::new();
    for _ in 0..10 {
        sticky.insert(curl(client, "http://10.96.0.30/").unwrap().trim().to_string());
    }
    assert_eq!(sticky.len(), 1, "affinity holds: {sticky:?}");

    // No endpoints: TCP refused at once (reset), UDP gets port unreachable.
    let t = std::time::Instant::now();
    let err = curl(client, "http://10.96.0.40/").unwrap_err();
    assert!(err.contains("curl: (7)"), "connection refused: {err}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused at once, not timed out");

    // Pod to pod through the kernel or the dataplane: ping works.
    client.ns.exec(&["ping", "-c", "2", "-W", "2", "10.200.1.11"]).expect("ping pod to pod");

    // The dataplane counted it: 100 UDP + 40 TCP new flows (a few UDP source ports may repeat
    // and join an existing flow), one reject. Counters are published every 100-200 ms.
    let counted = |r: &serde_json::Value| {
        r["totals"]["nat_new"].as_u64().unwrap_or(0) >= 130
            && r["totals"]["rejects_sent"].as_u64().unwrap_or(0) >= 1
            && r["drops"]["no_endpoints"].as_u64().unwrap_or(0) >= 1
    };
    assert!(
        wait_for(Duration::from_secs(3), || read_stats(&stats).is_some_and(|r| counted(&r))),
        "{:?}",
        read_stats(&stats)
    );

    // The kernel still resolves neighbours (ARP) on the node's veths.
    let neigh = topo.node.ip(&["neigh", "show", "10.200.1.21"]).unwrap();
    assert!(neigh.contains("lladdr"), "ARP entry for a backend: {neigh}");

    // A crash leaves the XDP programs attached; the next start replaces them and serves.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(dp.child.id() as i32, libc::SIGKILL) };
    let _ = dp.child.wait();
    let stale = topo.node.ip(&["-d", "link", "show", &topo.pods[0].host_if]).unwrap();
    assert!(stale.contains("prog/xdp"), "a killed dataplane leaves its program: {stale}");
    let mut dp = start_dataplane(&topo, &cfg, &stats, "dataplane2.log")
        .unwrap_or_else(|e| panic!("restart after a crash: {e}"));
    push_snapshot(&socket, 1, demo_ports()).unwrap();
    let replies = udp_requests(client, echo, 20).unwrap();
    assert!(replies.len() >= 18, "traffic after restart: {}\n{}", replies.len(), dp.log());

    // Stopping leaves no XDP program behind.
    assert!(dp.stop(), "dataplane exits on SIGTERM:\n{}", dp.log());
    for p in &topo.pods {
        let link = topo.node.ip(&["-d", "link", "show", &p.host_if]).unwrap();
        assert!(!link.contains("prog/xdp"), "XDP left on {}: {link}", p.host_if);
    }
}

#[test]
fn raw_mode_forwards_frames_unchanged() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let pods = [Ipv4Addr::new(10, 201, 0, 2), Ipv4Addr::new(10, 201, 0, 3)];
    let topo = Topology::build("raw", &pods).expect("topology");
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    let socket = topo.dir.join("control.sock");
    let cfg = topo.dir.join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: n\nmode: raw\ninterfaces:\n  - {{name: {}, role: pod, raw_forward_to: {}}}\n  - {{name: {}, role: pod, raw_forward_to: {}}}\ncores: [0]\ncontrol_socket: {}\npunt_device: ''\nidle_polls_before_sleep: 2000\n",
            a.host_if, b.host_if, b.host_if, a.host_if, socket.display()
        ),
    )
    .unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    let rx_packets = |p: &Pod| -> u64 {
        let out = p.ns.exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"]).unwrap();
        out.trim().parse().unwrap()
    };
    let before = rx_packets(b);
    // 200 datagrams from pod a to pod b: each crosses the node untouched (raw mode).
    let to: SocketAddr = (pods[1], 9).into();
    a.ns.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..200 {
            let _ = s.send_to(b"raw", to);
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(3), || rx_packets(b) >= before + 200),
        "pod b received {} of 200\n{}",
        rx_packets(b) - before,
        dp.log()
    );
    assert!(
        wait_for(Duration::from_secs(3), || read_stats(&stats).is_some_and(|r| r["workers"][0]
            ["transmitted"]
            .as_u64()
            .unwrap_or(0)
            >= 200)),
        "{:?}",
        read_stats(&stats)
    );
    assert!(dp.stop());
}

#[test]
fn two_workers_keep_flows_whose_directions_cross_workers() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let (topo, _servers) = demo_topology("e2w").expect("topology");
    let client = &topo.pods[0];
    // Two workers: the veths are split between them, so a flow's request and reply are
    // received by different workers.
    let (cfg, socket) = write_node_config(&topo, &[0, 1]).unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_stats(&stats).unwrap()["workers"].as_array().unwrap().len(), 2);
    push_snapshot(&socket, 1, demo_ports()).unwrap();
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    let replies = udp_requests(client, echo, 100).unwrap();
    assert!(replies.len() >= 95, "UDP replies: {} of 100\n{}", replies.len(), dp.log());
    assert!(replies.iter().all(|(from, _)| *from == echo));
    for _ in 0..20 {
        curl(client, "http://10.96.0.10/").unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    }
    let mut sticky = std::collections::HashSet::new();
    for _ in 0..10 {
        sticky.insert(curl(client, "http://10.96.0.30/").unwrap().trim().to_string());
    }
    assert_eq!(sticky.len(), 1, "affinity holds across workers: {sticky:?}");
    assert!(
        wait_for(Duration::from_secs(3), || read_stats(&stats).is_some_and(|r| r["totals"]
            ["handed_off"]
            .as_u64()
            .unwrap_or(0)
            > 0)),
        "flows crossed workers: {:?}",
        read_stats(&stats)
    );
    assert!(dp.stop());
}
