//! Operating the dataplane: `kxdp-inspect` against a dataplane running in network namespaces
//! with known traffic (counters asserted), the Prometheus endpoint scraped and checked against
//! the same counters, and a packet capture read back with a pcap reader, before and after NAT.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kxdp_tests::*;
use serde_json::Value;

/// Runs `kxdp-inspect --socket SOCK --json ARGS` and returns its output.
fn inspect_raw(socket: &Path, args: &[&str]) -> Output {
    Command::new(binary("kxdp-inspect"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()
        .expect("kxdp-inspect runs")
}

/// Runs an inspect command that must succeed and parses its JSON answer.
fn inspect(socket: &Path, args: &[&str]) -> Value {
    let o = inspect_raw(socket, args);
    assert!(
        o.status.success(),
        "kxdp-inspect {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The service named `name` in a `services` answer.
fn service<'a>(services: &'a Value, name: &str) -> &'a Value {
    services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// Sum of one traffic counter over a service's backends.
fn backend_sum(svc: &Value, field: &str) -> u64 {
    svc["backends"].as_array().unwrap().iter().map(|b| u(&b["traffic"][field])).sum()
}

/// GET /metrics from inside the node namespace.
fn scrape(node: &Netns) -> String {
    node.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9964").expect("metrics listening");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .unwrap()
}

/// The value of the sample `name{labels}` (labels in the encoder's order), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn inspect_metrics_and_capture_on_a_live_dataplane() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let (topo, servers) = demo_topology("ops").expect("topology");
    let client = &topo.pods[0];
    let (cfg, socket) = write_node_config(&topo, &[0]).unwrap();
    let isock = topo.dir.join("inspect.sock");

    // Not running: a clear error and exit status 2.
    let o = inspect_raw(&isock, &["status"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not running"), "{err}");

    let stats = topo.dir.join("stats.json");
    let dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));

    // No rights: the socket is root's, mode 0600.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("kxdp-inspect"))
        .arg("--socket")
        .arg(&isock)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("permission denied"), "{err}");

    // Before any table: generation 0, control never connected.
    let st = inspect(&isock, &["status"]);
    assert_eq!(u(&st["status"]["control"]["snapshots"]), 0);
    assert_eq!(u(&st["status"]["control"]["connected"]), 0);
    push_snapshot(&socket, 1, demo_ports()).unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    // A control connection held open shows as connected.
    let held = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    assert!(wait_for(Duration::from_secs(3), || {
        u(&inspect(&isock, &["status"])["status"]["control"]["connected"]) == 1
    }));
    let st = inspect(&isock, &["status"]);
    assert!(u(&st["status"]["generation"]) >= 1);
    assert_eq!(u(&st["status"]["control"]["generation"]), 1);
    assert_eq!(u(&st["status"]["control"]["snapshots"]), 1);
    assert_eq!(u(&st["status"]["services"]), 4);
    drop(held);

    // Known traffic: 100 UDP requests (each a new flow) to the echo service, 10 HTTP requests
    // to web, one to the service with no endpoints.
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    let replies = udp_requests(client, echo, 100).unwrap();
    assert!(replies.len() >= 95, "UDP replies {} of 100\n{}", replies.len(), dp.log());
    for _ in 0..10 {
        curl(client, "http://10.96.0.10/").unwrap_or_else(|e| panic!("{e}\n{}", dp.log()));
    }
    assert!(curl(client, "http://10.96.0.40/").is_err());

    // services: per-backend counters as ipvsadm --stats shows them. Worker counters are read
    // through the workers' request channels, so they are exact at once.
    let svcs = inspect(&isock, &["services"]);
    let e = service(&svcs, "demo/echo:echo");
    assert_eq!(e["proto"], "UDP");
    assert_eq!(e["algorithm"], "random");
    assert_eq!(e["frontends"][0]["ip"], "10.96.0.20");
    assert_eq!(e["frontends"][0]["port"], 5353);
    assert_eq!(e["backends"].as_array().unwrap().len(), 2);
    assert_eq!(backend_sum(e, "packets_in"), 100, "{e}");
    // "ping 0".."ping 9" are 6 bytes, "ping 10".."ping 99" 7; plus 28 bytes of IP and UDP.
    assert_eq!(backend_sum(e, "bytes_in"), 100 * 28 + 10 * 6 + 90 * 7, "{e}");
    let out = backend_sum(e, "packets_out");
    assert!(
        out >= replies.len() as u64 && out <= 100,
        "{out} replies counted, {} seen",
        replies.len()
    );
    assert!(backend_sum(e, "conns") >= 95, "{e}");
    assert_eq!(u(&e["traffic"]["packets_in"]), 100, "service total");
    for b in e["backends"].as_array().unwrap() {
        assert!(u(&b["traffic"]["packets_in"]) > 0, "random spreads over both: {e}");
    }
    let web = service(&svcs, "demo/web:http");
    assert_eq!(backend_sum(web, "conns"), 10, "{web}");
    assert!(backend_sum(web, "packets_out") >= 30, "SYN-ACK, data, FIN per connection: {web}");
    let sticky = service(&svcs, "demo/sticky:http");
    assert_eq!(u(&sticky["affinity_timeout_s"]), 600);
    assert_eq!(backend_sum(service(&svcs, "demo/idle:http"), "conns"), 0);
    // The readable form carries the same rows.
    let text = Command::new(binary("kxdp-inspect"))
        .arg("--socket")
        .arg(&isock)
        .arg("services")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    println!("kxdp-inspect services:\n{text}");
    assert!(text.contains("UDP  10.96.0.20:5353"), "{text}");
    assert!(text.contains("-> 10.200.1.21:5353"), "{text}");

    // workers: every drop reason listed; the reject counted.
    let ws = inspect(&isock, &["workers"]);
    let w0 = &ws["workers"][0];
    assert_eq!(w0["drops"].as_object().unwrap().len(), dataplane::DropReason::COUNT);
    assert_eq!(w0["passes"].as_object().unwrap().len(), dataplane::PassReason::COUNT);
    assert!(u(&w0["drops"]["no_endpoints"]) >= 1, "{w0}");
    assert!(u(&w0["pipeline"]["rejects_sent"]) >= 1, "{w0}");
    assert!(u(&w0["rx"]) >= 200, "{w0}");
    assert_eq!(w0["queues"].as_array().unwrap().len(), topo.pods.len(), "one socket per veth");

    // conntrack: list by service, query an existing flow, flush by service.
    let ct = inspect(&isock, &["conntrack", "list", "--service", "demo/echo"]);
    let listed = u(&ct["conntrack"]["matched"]);
    assert!(listed >= 95, "{ct}");
    let entries = ct["conntrack"]["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["service"] == "demo/echo:echo" && e["proto"] == "udp"));
    let first = &entries[0];
    let (src, sport) = (first["orig"]["src"].as_str().unwrap(), u(&first["orig"]["sport"]));
    let q = inspect(
        &isock,
        &[
            "query",
            "--proto",
            "udp",
            "--src",
            &format!("{src}:{sport}"),
            "--dst",
            "10.96.0.20:5353",
        ],
    );
    assert_eq!(q["query"]["verdict"], "existing-flow", "{q}");
    assert_eq!(q["query"]["conntrack"][0]["reply"], first["reply"]);
    assert_eq!(q["query"]["translated"]["dst"], first["reply"]["src"], "sent to its backend");
    let limited = inspect(&isock, &["conntrack", "list", "--proto", "udp", "--limit", "3"]);
    assert_eq!(limited["conntrack"]["entries"].as_array().unwrap().len(), 3);

    // The flow query for new flows: the real lookups, no side effect.
    let q = inspect(
        &isock,
        &["query", "--proto", "udp", "--src", "10.200.0.2:4242", "--dst", "10.96.0.20:5353"],
    );
    assert_eq!(q["query"]["verdict"], "new-flow", "{q}");
    let b = q["query"]["backend"][1].as_str().unwrap().to_string();
    assert!(b == "10.200.1.21" || b == "10.200.1.22", "{q}");
    assert_eq!(q["query"]["translated"]["dst"], b.as_str());
    assert_eq!(q["query"]["translated"]["dport"], 5353);
    assert!(q["query"]["egress_ifindex"].is_u64(), "next hop known: {q}");
    let again = inspect(
        &isock,
        &["query", "--proto", "udp", "--src", "10.200.0.2:4242", "--dst", "10.96.0.20:5353"],
    );
    assert_eq!(again["query"]["backend"], q["query"]["backend"], "a query changes nothing");
    let q = inspect(&isock, &["query", "--src", "10.200.0.2:4242", "--dst", "10.96.0.40:80"]);
    assert_eq!(q["query"]["verdict"], "reject", "{q}");
    let q = inspect(&isock, &["query", "--src", "10.200.0.2:4242", "--dst", "10.96.0.10:81"]);
    assert_eq!(q["query"]["verdict"], "drop", "{q}");
    let q = inspect(&isock, &["query", "--src", "10.200.0.2:4242", "--dst", "10.200.1.11:8080"]);
    assert_eq!(q["query"]["verdict"], "forward", "{q}");
    let q = inspect(&isock, &["query", "--src", "10.200.0.2:4242", "--dst", "192.0.2.1:80"]);
    assert_eq!(q["query"]["verdict"], "kernel", "{q}");

    // Flush without a filter is refused; by service it removes exactly the listed flows.
    assert_eq!(inspect_raw(&isock, &["conntrack", "flush"]).status.code(), Some(1));
    let f = inspect(&isock, &["conntrack", "flush", "--service", "demo/echo:echo"]);
    assert_eq!(u(&f["flushed"]["flows"]), listed);
    let ct = inspect(&isock, &["conntrack", "list", "--service", "demo/echo"]);
    assert_eq!(u(&ct["conntrack"]["matched"]), 0);

    // Metrics: the same counters over HTTP, Prometheus names and labels.
    let m = scrape(&topo.node);
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    let backend_in = |ip: &str| {
        sample(
            &m,
            &format!("kxdp_backend_packets_total{{service=\"demo/echo:echo\",backend=\"{ip}:5353\",direction=\"in\"}}"),
        )
        .unwrap_or_else(|| panic!("no backend series for {ip}:\n{m}"))
    };
    assert_eq!(backend_in("10.200.1.21") + backend_in("10.200.1.22"), 100.0);
    assert_eq!(
        sample(&m, "kxdp_service_packets_total{service=\"demo/echo:echo\",direction=\"in\"}"),
        Some(100.0)
    );
    assert!(sample(&m, "kxdp_worker_dropped_packets_total{worker=\"0\",reason=\"no_endpoints\"}")
        .is_some_and(|v| v >= 1.0));
    assert!(sample(&m, "kxdp_table_generation").is_some_and(|v| v >= 1.0), "{m}");
    assert_eq!(sample(&m, "kxdp_control_update_duration_seconds_count"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "kxdp_control_connected"), Some(0.0));
    assert!(sample(&m, "kxdp_conntrack_entries{worker=\"0\"}").is_some());
    assert!(m.contains("# TYPE kxdp_control_update_duration_seconds histogram"), "{m}");

    // Capture: one UDP exchange, before and after NAT, read back with a pcap reader.
    let pcap = topo.dir.join("cap.pcap");
    let mut cap = Command::new(binary("kxdp-inspect"))
        .arg("--socket")
        .arg(&isock)
        .args(["capture", "-w"])
        .arg(&pcap)
        .args(["--count", "4", "--duration", "20s", "--proto", "udp", "--port", "5353"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has started, send until the capture has its four frames (request and reply,
    // each before and after NAT).
    let mut started = String::new();
    // Kept open until the capture ends: it still writes its summary there.
    let mut cap_err = std::io::BufReader::new(cap.stderr.take().unwrap());
    std::io::BufRead::read_line(&mut cap_err, &mut started).unwrap();
    assert!(started.starts_with("capturing to"), "{started}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut done = None;
    while Instant::now() < deadline {
        if let Some(s) = cap.try_wait().unwrap() {
            done = Some(s);
            break;
        }
        let _ = udp_requests(client, echo, 1);
    }
    let status = done.unwrap_or_else(|| {
        let _ = cap.kill();
        let _ = cap.wait();
        panic!("capture did not finish\n{}", dp.log())
    });
    let mut rest = String::new();
    let _ = cap_err.read_to_string(&mut rest);
    assert!(status.success(), "capture failed: {status:?} {rest}");
    let file = std::fs::File::open(&pcap).unwrap();
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("a pcap file");
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        frames.push(p.unwrap().data.into_owned());
    }
    assert_eq!(frames.len(), 4, "four frames");
    let tuples: Vec<(Ipv4Addr, u16, Ipv4Addr, u16)> = frames
        .iter()
        .map(|f| {
            let p = etherparse::SlicedPacket::from_ethernet(f).expect("a frame");
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("IPv4") };
            let Some(etherparse::TransportSlice::Udp(udp)) = p.transport else { panic!("UDP") };
            (
                ip.header().source_addr(),
                udp.source_port(),
                ip.header().destination_addr(),
                udp.destination_port(),
            )
        })
        .collect();
    // The first exchange captured: the request as sent to the service, then as sent to its
    // backend, the reply from the backend, then as sent back from the service address.
    let (c, cport, vip, vport) = tuples[0];
    assert_eq!((c, vip, vport), (client.ip, Ipv4Addr::new(10, 96, 0, 20), 5353), "{tuples:?}");
    let (s1, p1, backend, bport) = tuples[1];
    assert_eq!((s1, p1, bport), (client.ip, cport, 5353), "after NAT: {tuples:?}");
    assert!(backend.octets()[..3] == [10, 200, 1], "to a backend: {tuples:?}");
    assert_eq!(tuples[2], (backend, 5353, client.ip, cport), "reply before NAT: {tuples:?}");
    assert_eq!(tuples[3], (vip, 5353, client.ip, cport), "reply after NAT: {tuples:?}");
    drop(servers);
}

#[test]
fn inspect_sums_over_two_workers_and_finds_flows_on_their_owner() {
    if !is_root() {
        eprintln!("skipped: needs root, network namespaces and BPF");
        return;
    }
    let (topo, servers) = demo_topology("ops2").expect("topology");
    let client = &topo.pods[0];
    let (cfg, socket) = write_node_config(&topo, &[0, 1]).unwrap();
    let isock = topo.dir.join("inspect.sock");
    let stats = topo.dir.join("stats.json");
    let dp =
        start_dataplane(&topo, &cfg, &stats, "dataplane.log").unwrap_or_else(|e| panic!("{e}"));
    push_snapshot(&socket, 1, demo_ports()).unwrap();
    assert_eq!(u(&inspect(&isock, &["status"])["status"]["workers"]), 2);
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    let replies = udp_requests(client, echo, 100).unwrap();
    assert!(replies.len() >= 95, "UDP replies {} of 100\n{}", replies.len(), dp.log());
    // Counters live in both workers' conntrack; the answer is their sum.
    let svcs = inspect(&isock, &["services"]);
    let e = service(&svcs, "demo/echo:echo");
    assert_eq!(backend_sum(e, "packets_in"), 100, "{e}");
    let ws = inspect(&isock, &["workers"]);
    assert_eq!(ws["workers"].as_array().unwrap().len(), 2);
    // Every flow is listed once, whichever worker owns it, and the query finds it there.
    let ct = inspect(&isock, &["conntrack", "list", "--service", "demo/echo:echo"]);
    let entries = ct["conntrack"]["entries"].as_array().unwrap();
    assert!(entries.len() >= 95, "{ct}");
    let workers: std::collections::HashSet<u64> = entries.iter().map(|e| u(&e["worker"])).collect();
    assert_eq!(workers.len(), 2, "flows on both workers: {workers:?}");
    for e in entries.iter().take(10) {
        let src = format!("{}:{}", e["orig"]["src"].as_str().unwrap(), u(&e["orig"]["sport"]));
        let q = inspect(
            &isock,
            &["query", "--proto", "udp", "--src", &src, "--dst", "10.96.0.20:5353"],
        );
        assert_eq!(q["query"]["verdict"], "existing-flow", "{q}");
        assert_eq!(q["query"]["worker"], e["worker"], "answered by the owner: {q}");
    }
    drop(servers);
}
