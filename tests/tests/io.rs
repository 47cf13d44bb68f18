//! The AF_XDP layer on multi-queue veths: queues spread over workers, channel counts set by
//! the dataplane, interfaces added and removed under traffic, frame accounting of shared
//! UMEMs checked at the end of each run.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dataplane::io::plan::{set_channels, ChannelChange, ChannelSource, Ethtool};
use kxdp_tests::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return true;
    }
    false
}

/// The echo service of the demo (backends 10.200.1.21 and .22 on port 5353).
const ECHO: &str = "10.96.0.20:5353";

#[test]
fn channel_counts_are_set_where_the_driver_allows() {
    if skip() {
        return;
    }
    let ns = Netns::new("kx-mq-chan").unwrap();
    ns.ip(&[
        "link",
        "add",
        "mqa",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
        "type",
        "veth",
        "peer",
        "name",
        "mqb",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
    ])
    .unwrap();
    let r = ns
        .run(|| {
            let before = Ethtool.channels("mqa");
            let set = set_channels("mqa", 2);
            let after = Ethtool.channels("mqa");
            let again = set_channels("mqa", 2);
            let too_many = set_channels("mqa", 8);
            let missing = set_channels("nosuchdev0", 1);
            (before, set, after, again, too_many, missing)
        })
        .unwrap();
    let (before, set, after, again, too_many, missing) = r;
    let before = before.expect("veth reports channels");
    assert_eq!((before.max_rx, before.max_tx), (4, 4), "{before:?}");
    assert!(matches!(set, Ok(ChannelChange::Set { .. })), "{set:?}");
    let after = after.unwrap();
    assert_eq!((after.rx, after.tx), (2, 2), "{after:?}");
    assert_eq!(again, Ok(ChannelChange::Unchanged));
    assert!(too_many.as_ref().unwrap_err().contains("at most 4"), "{too_many:?}");
    assert!(missing.is_err());
    let queues = ns.exec(&["ls", "/sys/class/net/mqa/queues"]).unwrap();
    assert_eq!(queues.split_whitespace().filter(|q| q.starts_with("rx-")).count(), 2, "{queues}");
}

#[test]
fn two_workers_serve_both_queues_of_multi_queue_veths() {
    if skip() {
        return;
    }
    // Client and the two echo backends, every veth with 4 queues on both ends; the pods keep
    // 2 (ethtool -L in the pod), the dataplane sets the node sides to 2 (`channels: 2`).
    let pods = [[10, 200, 0, 2], [10, 200, 1, 21], [10, 200, 1, 22]].map(Ipv4Addr::from);
    let topo = Topology::build_with("mq", &pods, 4).expect("topology");
    for p in &topo.pods {
        p.ns.exec(&["ethtool", "-L", "eth0", "rx", "2", "tx", "2"]).unwrap();
    }
    topo.resolve_neighbours().unwrap();
    let _servers: Vec<_> = topo.pods[1..].iter().map(|b| udp_echo(b, 5353).unwrap()).collect();
    let (cfg, socket) = write_node_config(&topo, &[0, 1]).unwrap();
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("role: pod}", "role: pod, channels: 2}");
    std::fs::write(&cfg, text).unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    push_snapshot(&socket, 1, demo_ports()).unwrap();
    let client = &topo.pods[0];
    let report = read_stats(&stats).unwrap();
    let ifs = report["interfaces"].as_array().unwrap();
    for i in ifs {
        let q: Vec<u64> =
            i["queues"].as_array().unwrap().iter().map(|q| q[0].as_u64().unwrap()).collect();
        assert_eq!(q, vec![0, 1], "two queues after `channels: 2`: {i}\n{}", dp.log());
    }
    // Each request from a new socket: the pod's kernel spreads them over its two transmit
    // queues by flow hash, and a veth delivers on the peer's receive queue of the same number.
    let echo: SocketAddr = ECHO.parse().unwrap();
    let replies = udp_requests(client, echo, 200).unwrap();
    assert!(replies.len() >= 190, "UDP replies: {} of 200\n{}", replies.len(), dp.log());
    assert!(replies.iter().all(|(from, _)| *from == echo));
    let settled = |r: &serde_json::Value| {
        let q = rx_by_queue(r);
        let c = &client.host_if;
        q.get(&(c.clone(), 0)).copied().unwrap_or(0) > 0
            && q.get(&(c.clone(), 1)).copied().unwrap_or(0) > 0
            && r["totals"]["handed_off"].as_u64().unwrap_or(0) > 0
    };
    assert!(
        wait_for(Duration::from_secs(3), || read_stats(&stats).is_some_and(|r| settled(&r))),
        "both queues of the client's veth received and flows crossed workers: {:#}",
        read_stats(&stats).unwrap()
    );
    let r = read_stats(&stats).unwrap();
    let workers = r["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert!(
        workers.iter().all(|w| w["rx"].as_u64().unwrap_or(0) > 0),
        "both workers received: {r:#}"
    );
    // The two queues of the client's veth are served by different workers (the plan spreads
    // 6 queues over 2 cores, an interface's queues over both).
    let owners: Vec<u64> = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == client.host_if.as_str())
        .unwrap()["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q[1].as_u64().unwrap())
        .collect();
    assert_ne!(owners[0], owners[1], "queues on different workers: {owners:?}");
    std::thread::sleep(Duration::from_millis(300));
    let r = read_stats(&stats).unwrap();
    assert!(pools_consistent(&r).unwrap_or_else(|e| panic!("{e}")) >= 2);
    assert!(dp.stop(), "{}", dp.log());
}

#[test]
fn pod_interfaces_come_and_go_under_traffic() {
    if skip() {
        return;
    }
    // Client and one echo backend at start; interfaces are selected by pattern only.
    let pods = [[10, 200, 0, 2], [10, 200, 1, 21]].map(Ipv4Addr::from);
    let mut topo = Topology::build("hp", &pods).expect("topology");
    topo.resolve_neighbours().unwrap();
    let mut servers = vec![udp_echo(&topo.pods[1], 5353).unwrap()];
    let (cfg, socket) = write_node_config(&topo, &[0, 1]).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut out = String::new();
    let mut in_ifaces = false;
    for line in text.lines() {
        if line == "interfaces:" {
            in_ifaces = true;
            out.push_str("interface_patterns:\n  - {match: 'kxhp*', role: pod}\n");
            continue;
        }
        if in_ifaces && line.starts_with("  - ") {
            continue;
        }
        in_ifaces = false;
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(&cfg, out).unwrap();
    let stats = topo.dir.join("stats.json");
    let mut dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    // Only the first echo backend exists: the service's other backend is the pod to come.
    let mut ports = demo_ports();
    let echo_port = ports.iter_mut().find(|p| p.spec.name == "demo/echo:echo").unwrap();
    echo_port.backends.retain(|b| b.ip == Ipv4Addr::new(10, 200, 1, 21));
    push_snapshot(&socket, 1, ports.clone()).unwrap();
    let echo: SocketAddr = ECHO.parse().unwrap();
    // The first answer may take a moment on a loaded machine (neighbours, first rounds).
    let client = &topo.pods[0];
    wait_for(Duration::from_secs(10), || udp_requests(client, echo, 1).is_ok_and(|r| r.len() == 1));
    let warm = udp_requests(&topo.pods[0], echo, 20).unwrap().len();
    assert!(
        warm >= 18,
        "before any change: {warm} of 20 answered\n{:#}\n{}",
        read_stats(&stats).unwrap_or_default(),
        dp.log()
    );

    // Background traffic to the existing pod while another comes and goes.
    let stop = Arc::new(AtomicBool::new(false));
    let load = udp_load(&topo.pods[0], echo, stop.clone(), 200_000);
    std::thread::sleep(Duration::from_millis(500));

    // A new pod: its veth appears, the dataplane takes it over without a restart.
    let new_ip = Ipv4Addr::new(10, 200, 1, 22);
    let new_if = topo.add_pod("hp", new_ip, 1).unwrap().host_if.clone();
    servers.push(udp_echo(&topo.pods[2], 5353).unwrap());
    let has_if = |r: &serde_json::Value, name: &str| {
        r["interfaces"].as_array().is_some_and(|a| a.iter().any(|i| i["name"] == name))
    };
    assert!(
        wait_for(Duration::from_secs(5), || read_stats(&stats)
            .is_some_and(|r| has_if(&r, &new_if))),
        "new interface taken over: {:#}\n{}",
        read_stats(&stats).unwrap(),
        dp.log()
    );
    let _ = topo.node.exec(&["ping", "-c", "1", "-W", "1", &new_ip.to_string()]);
    // It becomes reachable through a service: a new service with the new pod as backend.
    let mut with_new = ports.clone();
    let mut svc = with_new.iter().find(|p| p.spec.name == "demo/echo:echo").unwrap().clone();
    svc.spec.id = 50;
    svc.spec.name = "demo/new:echo".into();
    svc.backends = vec![dataplane::tables::Backend::ready(50, new_ip, 5353)];
    svc.frontends[0].ip = Ipv4Addr::new(10, 96, 0, 50);
    with_new.push(svc);
    push_snapshot(&socket, 2, with_new).unwrap();
    let new_svc: SocketAddr = "10.96.0.50:5353".parse().unwrap();
    let replies = udp_requests(&topo.pods[0], new_svc, 50).unwrap();
    assert!(
        replies.len() >= 48,
        "new pod through its service: {} of 50\n{}",
        replies.len(),
        dp.log()
    );
    assert!(replies.iter().all(|(from, who)| *from == new_svc && who == "10.200.1.22"));

    // The pod is deleted: its veth vanishes (deleted as a CNI plugin does, not left to the
    // kernel's asynchronous namespace clean-up), the dataplane lets it go.
    servers.pop();
    topo.node.ip(&["link", "del", &new_if]).unwrap();
    drop(topo.pods.pop());
    assert!(
        wait_for(Duration::from_secs(10), || read_stats(&stats).is_some_and(|r| !has_if(
            &r, &new_if
        ) && r
            ["interfaces_removed"]
            .as_u64()
            == Some(1))),
        "interface let go: {:#}",
        read_stats(&stats).unwrap()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (sent, answered) = load.join().unwrap().unwrap();
    // Zero or bounded loss for the pod that stayed: at most 1% (a UDP round trip on a
    // loaded 2-core machine may time out), and traffic flowed throughout.
    assert!(sent >= 100, "background requests sent: {sent}");
    assert!(
        answered * 100 >= sent * 99,
        "background traffic: {answered} of {sent} answered\n{}",
        dp.log()
    );
    // Traffic keeps flowing after the removal, and every frame of every pool is accounted for
    // (the closed socket's frames went back to its pool).
    let after = udp_requests(&topo.pods[0], echo, 20).unwrap().len();
    assert!(after >= 18, "after the removal: {after} of 20 answered\n{}", dp.log());
    std::thread::sleep(Duration::from_millis(300));
    let r = read_stats(&stats).unwrap();
    pools_consistent(&r).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r["interfaces_added"].as_u64(), Some(1), "{r:#}");
    assert!(dp.stop(), "{}", dp.log());
}
