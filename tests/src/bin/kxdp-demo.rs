//! `kxdp-demo`: the README's demo. Builds a node namespace with pod namespaces, runs the
//! dataplane on the node's veths and the control plane on the demo manifests, sends TCP and UDP
//! traffic through the ClusterIPs from a client pod, prints what happened per service and per
//! backend, and tears everything down. Every address exists only inside the namespaces it makes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use kxdp_tests::*;

#[derive(Parser)]
#[command(name = "kxdp-demo", about = "kxdp demo in network namespaces (needs root)")]
struct Args {
    /// Kubernetes manifests the control plane compiles.
    #[arg(long, default_value = "config/demo")]
    manifests: PathBuf,
    /// HTTP requests to each TCP service.
    #[arg(long, default_value_t = 200)]
    http_requests: usize,
    /// UDP requests (each a new flow) to the UDP service.
    #[arg(long, default_value_t = 1000)]
    udp_requests: usize,
    /// Seconds of UDP burst for the packet rate figure.
    #[arg(long, default_value_t = 2)]
    burst_seconds: u64,
}

fn http_get(
    pod: &Pod,
    to: SocketAddr,
    count: usize,
) -> Result<(BTreeMap<String, usize>, usize), String> {
    pod.ns.run(move || {
        let mut per = BTreeMap::new();
        let mut refused = 0;
        for _ in 0..count {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let _ = write!(s, "GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
                    let mut body = String::new();
                    let _ = s.read_to_string(&mut body);
                    let who = body
                        .lines()
                        .last()
                        .unwrap_or("")
                        .trim_start_matches("backend ")
                        .to_string();
                    *per.entry(who).or_insert(0) += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Err(_) => {}
            }
        }
        (per, refused)
    })
}

fn udp_burst(pod: &Pod, to: SocketAddr, secs: u64) -> Result<(u64, u64, f64), String> {
    pod.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_nonblocking(true).ok();
        let (mut sent, mut got) = (0u64, 0u64);
        let start = Instant::now();
        let mut buf = [0u8; 256];
        while start.elapsed() < Duration::from_secs(secs) && sent < 50_000_000 {
            for _ in 0..32 {
                if s.send_to(b"burst", to).is_ok() {
                    sent += 1;
                }
            }
            while s.recv_from(&mut buf).is_ok() {
                got += 1;
            }
        }
        let t = start.elapsed().as_secs_f64();
        let drain_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < drain_until {
            if s.recv_from(&mut buf).is_ok() {
                got += 1;
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        (sent, got, t)
    })
}

fn main() {
    let args = Args::parse();
    if !is_root() {
        eprintln!("kxdp-demo: needs root (network namespaces, XDP, AF_XDP)");
        std::process::exit(2);
    }
    if let Err(e) = run(&args) {
        eprintln!("kxdp-demo: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let pods: Vec<Ipv4Addr> = DEMO_PODS.iter().map(|a| Ipv4Addr::from(*a)).collect();
    println!("== building a node namespace and {} pod namespaces", pods.len());
    let topo = Topology::build("demo", &pods)?;
    topo.resolve_neighbours()?;
    let (client, backends) = topo.pods.split_first().ok_or("no pods")?;
    let mut servers = Vec::new();
    for b in backends {
        let s = if b.ip.octets()[3] / 10 == 2 { udp_echo(b, 5353)? } else { http_server(b, 8080)? };
        servers.push((b.ip, s));
    }
    // One core is left to the clients and servers of the demo itself (they share the machine).
    let ncores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores: Vec<usize> = (0..ncores.saturating_sub(1).max(1)).collect();
    let (cfg, socket) = write_node_config(&topo, &cores)?;
    let stats = topo.dir.join("stats.json");
    let mut dp = start_dataplane(&topo, &cfg, &stats, "dataplane.log")?;
    println!(
        "== dataplane up on {} veths, {} worker(s) (log: {})",
        topo.pods.len(),
        cores.len().min(topo.pods.len()),
        dp.log.display()
    );
    let ctl = binary("kxdp-control");
    let manifests = std::fs::canonicalize(&args.manifests)
        .map_err(|e| format!("{}: {e}", args.manifests.display()))?;
    let mut control = Proc::start(
        &topo.node,
        &[
            ctl.to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--node-name",
            "node-1",
        ],
        &topo.dir.join("control.log"),
    )?;
    if !wait_for(Duration::from_secs(20), || {
        read_stats(&stats).is_some_and(|r| r["control_generation"].as_u64().unwrap_or(0) > 0)
    }) {
        return Err(format!("the control plane did not publish tables:\n{}", control.log()));
    }
    let r = read_stats(&stats).unwrap_or_default();
    println!(
        "== control plane published generation {} ({} service ports)",
        r["control_generation"], r["services"]
    );

    let before = read_stats(&stats).unwrap_or_default();
    let t0 = Instant::now();
    println!(
        "\n{:<14} {:<18} {:>9} {:>9} {:>9}  per backend",
        "service", "frontend", "requests", "answered", "refused"
    );
    for (name, vip) in [
        ("demo/web", "10.96.0.10:80"),
        ("demo/sticky", "10.96.0.30:80"),
        ("demo/idle", "10.96.0.40:80"),
    ] {
        let to: SocketAddr = vip.parse().unwrap();
        let (per, refused) = http_get(client, to, args.http_requests)?;
        let answered: usize = per.values().sum();
        let spread: Vec<String> = per.iter().map(|(b, n)| format!("{b}={n}")).collect();
        println!(
            "{name:<14} {:<18} {:>9} {answered:>9} {refused:>9}  {}",
            format!("{vip}/TCP"),
            args.http_requests,
            spread.join(" ")
        );
    }
    let echo: SocketAddr = "10.96.0.20:5353".parse().unwrap();
    let replies = udp_requests(client, echo, args.udp_requests)?;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    let mut from_vip = 0;
    for (from, who) in &replies {
        *per.entry(who.clone()).or_default() += 1;
        from_vip += usize::from(*from == echo);
    }
    let spread: Vec<String> = per.iter().map(|(b, n)| format!("{b}={n}")).collect();
    println!(
        "{:<14} {:<18} {:>9} {:>9} {:>9}  {}",
        "demo/echo",
        "10.96.0.20:5353/UDP",
        args.udp_requests,
        replies.len(),
        0,
        spread.join(" ")
    );
    println!("  (UDP replies seen from the service address: {from_vip} of {})", replies.len());
    let elapsed = t0.elapsed().as_secs_f64();

    println!(
        "\n== UDP burst to 10.96.0.20:5353 for {} s from one client socket",
        args.burst_seconds
    );
    let b0 = read_stats(&stats).unwrap_or_default();
    let (sent, got, t) = udp_burst(client, echo, args.burst_seconds)?;
    std::thread::sleep(Duration::from_millis(400));
    let b1 = read_stats(&stats).unwrap_or_default();
    // Frames one worker handed to another are counted on both: count them once.
    let own = |r: &serde_json::Value| {
        r["totals"]["rx"].as_u64().unwrap_or(0) - r["totals"]["handed_off"].as_u64().unwrap_or(0)
    };
    let rx = own(&b1) - own(&b0);
    println!(
        "sent {sent}, echoed back {got}; the dataplane handled {rx} packets (both directions): {:.0} packets/s",
        rx as f64 / t
    );
    println!("(the client and the echo servers are kernel UDP sockets in this same process: they, not the dataplane, set this rate)");

    let after = read_stats(&stats).unwrap_or_default();
    let d = |k: &str| {
        after["totals"][k].as_u64().unwrap_or(0) - before["totals"][k].as_u64().unwrap_or(0)
    };
    println!("\n== dataplane counters for the request phase ({elapsed:.1} s) and burst");
    println!(
        "rx {} (of which handed between workers {})  tx {}  new flows {}  forward {}  reply {}  affinity hits {}  rejects {}",
        d("rx"),
        d("handed_off"),
        d("tx"),
        d("nat_new"),
        d("nat_forward"),
        d("nat_reply"),
        d("affinity_hits"),
        d("rejects_sent")
    );
    println!("drops: {}  kernel passes: {}", after["drops"], after["passes"]);
    for (ip, s) in &servers {
        println!("backend {ip}: served {}", s.served.load(std::sync::atomic::Ordering::Relaxed));
    }
    println!("\n== tearing down");
    control.stop();
    if !dp.stop() {
        return Err("the dataplane did not stop on SIGTERM".into());
    }
    let mut leftover = Vec::new();
    for p in &topo.pods {
        if topo
            .node
            .ip(&["-d", "link", "show", &p.host_if])
            .unwrap_or_default()
            .contains("prog/xdp")
        {
            leftover.push(p.host_if.clone());
        }
    }
    drop(servers);
    if !leftover.is_empty() {
        return Err(format!("XDP programs left on {leftover:?}"));
    }
    println!("done: XDP detached, processes stopped, namespaces removed");
    Ok(())
}
