//! The `kxdp-control` binary: `--dump` on the embedded demo set and on the demo directory.

use std::process::Command;

fn dump(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kxdp-control"))
        .args(["--dump", "--node-name", "node-1", "--log-level", "warn"])
        .args(args)
        .output()
        .expect("run kxdp-control");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dump_of_embedded_demo_equals_dump_of_demo_directory() {
    let embedded = dump(&[]);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo");
    assert_eq!(embedded, dump(&["--manifests", dir]), "embedded demo is stale");
    for line in [
        "demo/web:http TCP algorithm=random affinity=none",
        "  frontend 10.96.0.10:80/TCP cluster-ip",
        "10.200.1.13:8080 weight=1 node=node-1",
        "demo/echo:echo UDP",
        "demo/sticky:http TCP algorithm=random affinity=client-ip/600s",
        "demo/idle:http TCP algorithm=random affinity=none (no backends: new flows refused)",
    ] {
        assert!(embedded.contains(line), "missing {line:?} in:\n{embedded}");
    }
    assert_eq!(embedded.matches("selectable").count(), 7, "3 web + 2 echo + 2 sticky");
}

#[test]
fn bad_flags_fail_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_kxdp-control"))
        .args(["--node-ip", "not-an-ip", "--dump"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// GET /metrics on `addr`, or `None` while nothing listens.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn metrics_show_the_publication_to_a_dataplane() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    // A dataplane's control socket, served in this process.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let live = Arc::new(arc_swap::ArcSwap::from_pointee(dataplane::tables::Tables::empty()));
    let applier = Arc::new(parking_lot::Mutex::new(dataplane::sync::Applier::new(live)));
    let server = dataplane::sync::Server::spawn(&sock, applier).unwrap();
    // A free loopback port for the metrics.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kxdp-control"))
        .args(["--manifests", demo, "--node-name", "node-1", "--log-level", "warn"])
        .arg("--socket")
        .arg(&sock)
        .arg("--metrics-address")
        .arg(addr.to_string())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    let mut ok = false;
    while Instant::now() < deadline {
        if let Some(m) = scrape(addr) {
            ok = m.contains("\nkxdp_control_dataplane_connected 1")
                && m.contains("\nkxdp_control_publish_acks_total{kind=\"snapshot\"} 1\n")
                && m.contains("\nkxdp_control_acked_generation ");
            last = m;
            if ok {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    server.shutdown();
    assert!(ok, "metrics after publishing:\n{last}");
    assert!(last.contains("# TYPE kxdp_control_publish_errors counter"), "{last}");
    assert!(!last.contains("kxdp_control_watch_lists"), "no API watch with a manifest source");
}
