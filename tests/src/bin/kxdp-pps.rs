//! `kxdp-pps`: packets per second through the AF_XDP dataplane on veths in namespaces, for
//! several configurations side by side in one run.
//!
//! Topology: a client pod and two backend pods, every veth with two queues on both ends (so
//! two workers each serve one queue of every interface). A bounded sender in the client pod
//! (one thread per flow, UDP with sendmmsg in batches of 64, stopping after `--seconds`)
//! pushes 60-byte datagrams; what arrives is read from the receiving pods' `rx_packets`.
//!
//! Scenarios, each with a fresh dataplane process:
//! - `raw/shared/Nw`: raw mode, every frame from the client's veth transmitted unchanged on
//!   the first backend's veth, with N workers whose sockets share one UMEM (descriptor passed);
//! - `raw/copy/Nw`: the same with `share_umem: false` (each frame copied into the egress
//!   socket's UMEM);
//! - `nat/Nw`: the full pipeline, every datagram to a ClusterIP with two backends (DNAT,
//!   conntrack, checksums, MAC rewrite), N workers.
//!
//! Usage: `kxdp-pps [--seconds S] [--flows F] [--rounds R]` (as root). Prints one line per
//! scenario and round, then the median per scenario. Traffic goes only to the namespaces'
//! own addresses; every namespace is deleted at exit.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kxdp_tests::*;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends 60-byte datagrams from `flows` sockets (one thread each) to `to` for `secs` seconds.
fn blast(pod: &Pod, to: SocketAddr, flows: u64, secs: u64) -> u64 {
    let handles: Vec<_> = (0..flows)
        .map(|_| {
            pod.ns.spawn(move || {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.connect(to).expect("connect");
                let payload = [0u8; 18]; // 14 + 20 + 8 + 18 = 60 bytes on the wire
                let mut iov: Vec<libc::iovec> = (0..64)
                    .map(|_| libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: 18 })
                    .collect();
                // SAFETY: mmsghdr is plain data; zeroed is a valid empty header.
                let mut msgs: Vec<libc::mmsghdr> =
                    (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
                for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
                    m.msg_hdr.msg_iov = v;
                    m.msg_hdr.msg_iovlen = 1;
                }
                let end = Instant::now() + Duration::from_secs(secs);
                let mut sent = 0u64;
                while Instant::now() < end {
                    // SAFETY: `msgs` holds 64 valid headers pointing at live iovecs and payload.
                    let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), 64, 0) };
                    if n > 0 {
                        sent += n as u64;
                    }
                }
                sent
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().ok().and_then(|r| r.ok()).unwrap_or(0)).sum()
}

fn rx_packets(p: &Pod) -> u64 {
    p.ns.exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn config(topo: &Topology, mode: &str, cores: &[usize], share: bool) -> std::path::PathBuf {
    let (path, _) = write_node_config(topo, cores).expect("config");
    let mut text = std::fs::read_to_string(&path).expect("config");
    text.push_str(&format!("share_umem: {share}\nidle_polls_before_sleep: 0\n"));
    text = text.replace("idle_polls_before_sleep: 2000\n", "");
    if mode == "raw" {
        let (a, b) = (&topo.pods[0].host_if, &topo.pods[1].host_if);
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("  - {name:") {
                continue;
            }
            out.push_str(line);
            out.push('\n');
            if line == "interfaces:" {
                out.push_str(&format!(
                    "  - {{name: {a}, role: pod, raw_forward_to: {b}}}\n  - {{name: {b}, role: pod, raw_forward_to: {a}}}\n"
                ));
            }
        }
        text = out + "mode: raw\n";
    }
    std::fs::write(&path, text).expect("config");
    path
}

fn main() {
    if !is_root() {
        eprintln!("kxdp-pps: needs root (namespaces, BPF)");
        std::process::exit(2);
    }
    let secs = arg("--seconds", 5);
    let flows = arg("--flows", 4);
    let rounds = arg("--rounds", 3);
    let pods = [[10, 200, 0, 2], [10, 200, 1, 21], [10, 200, 1, 22]].map(Ipv4Addr::from);
    let topo = Topology::build_with("pps", &pods, 2).expect("topology");
    topo.resolve_neighbours().expect("neighbours");
    let scenarios: [(&str, &str, &[usize], bool); 6] = [
        ("raw/shared/1w", "raw", &[0], true),
        ("raw/copy/1w", "raw", &[0], false),
        ("raw/shared/2w", "raw", &[0, 1], true),
        ("raw/copy/2w", "raw", &[0, 1], false),
        ("nat/1w", "nat", &[0], true),
        ("nat/2w", "nat", &[0, 1], true),
    ];
    let mut results: Vec<(&str, Vec<f64>)> = scenarios.iter().map(|s| (s.0, Vec::new())).collect();
    let stats = topo.dir.join("stats.json");
    for round in 0..rounds {
        for (k, (name, mode, cores, share)) in scenarios.iter().enumerate() {
            if std::env::var("KXDP_PPS_ONLY").is_ok_and(|o| !name.starts_with(o.as_str())) {
                continue;
            }
            let cfg = config(&topo, mode, cores, *share);
            let mut dp = match start_dataplane(&topo, &cfg, &stats, "pps.log") {
                Ok(dp) => dp,
                Err(e) => {
                    eprintln!("{name}: {e}");
                    continue;
                }
            };
            let (to, sinks): (SocketAddr, Vec<&Pod>) = if *mode == "raw" {
                ((pods[1], 9).into(), vec![&topo.pods[1]])
            } else {
                let socket = topo.dir.join("control.sock");
                push_snapshot(&socket, 1, demo_ports()).expect("snapshot");
                ("10.96.0.20:5353".parse().unwrap(), vec![&topo.pods[1], &topo.pods[2]])
            };
            let before: u64 = sinks.iter().map(|p| rx_packets(p)).sum();
            let t = Instant::now();
            let sent = blast(&topo.pods[0], to, flows, secs);
            std::thread::sleep(Duration::from_millis(200));
            let got: u64 = sinks.iter().map(|p| rx_packets(p)).sum::<u64>() - before;
            let el = t.elapsed().as_secs_f64() - 0.2;
            let pps = got as f64 / el;
            let report = read_stats(&stats);
            // Where frames went: summed over workers and over sockets.
            let sum = |key: &str, per_port: bool| -> u64 {
                let Some(r) = report.as_ref() else { return 0 };
                let ws = r["workers"].as_array().cloned().unwrap_or_default();
                ws.iter()
                    .map(|w| {
                        if per_port {
                            let ps = w["ports"].as_array().cloned().unwrap_or_default();
                            ps.iter().map(|p| p[key].as_u64().unwrap_or(0)).sum()
                        } else {
                            w[key].as_u64().unwrap_or(0)
                        }
                    })
                    .sum()
            };
            println!(
                "round {round} {name:14} sent {sent:>9} ({:.3} Mpps) delivered {got:>9} ({:.3} Mpps) | zero-copy {} copied {} handed {} tx_dropped {} tx_ring_full {} fill_empty {} rx_ring_full {}",
                sent as f64 / el / 1e6,
                pps / 1e6,
                sum("zero_copy", false),
                sum("copied", false),
                sum("handed_off", false),
                sum("tx_dropped", false),
                sum("tx_ring_full", true),
                sum("rx_fill_ring_empty", true),
                sum("rx_ring_full", true),
            );
            // Every frame of every UMEM pool accounted for exactly once after the run.
            std::thread::sleep(Duration::from_millis(300));
            match read_stats(&stats).map(|r| pools_consistent(&r)) {
                Some(Ok(n)) => println!("  frames of {n} UMEM pool(s) all accounted for"),
                Some(Err(e)) => println!("  FRAME ACCOUNTING BROKEN: {e}"),
                None => println!("  no report"),
            }
            if std::env::var("KXDP_PPS_VERBOSE").is_ok() {
                if let Some(r) = &report {
                    for w in r["workers"].as_array().into_iter().flatten() {
                        println!("  worker {}: pools {} ports {}", w["id"], w["pools"], w["ports"]);
                    }
                }
            }
            results[k].1.push(pps);
            dp.stop();
        }
    }
    println!("\nmedian delivered Mpps over {rounds} rounds of {secs} s, {flows} flows:");
    for (name, mut v) in results {
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v.get(v.len() / 2).copied().unwrap_or(0.0);
        println!("{name:14} {:.3}", med / 1e6);
    }
}
