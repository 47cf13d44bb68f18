//! `kxdp-load` end to end: a sender and a receiver in two network namespaces joined by a veth
//! pair (created here, deleted by their guards), a bounded count of packets, and the receiver
//! must have counted exactly what the sender sent, per flow. Also the command line's refusals.
//! The namespace tests need root and skip otherwise.

use std::process::Command;
use std::time::Duration;

use kxdp_tests::{is_root, wait_for, Netns, Proc};

const LOAD: &str = env!("CARGO_BIN_EXE_kxdp-load");

fn pair(tag: &str) -> (Netns, Netns, String) {
    let a = Netns::new(&format!("kx-load-{tag}-a")).expect("namespace a");
    let b = Netns::new(&format!("kx-load-{tag}-b")).expect("namespace b");
    a.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name])
        .expect("veth");
    a.ip(&["link", "set", "eth0", "up"]).unwrap();
    b.ip(&["link", "set", "eth0", "up"]).unwrap();
    let mac = b.ip(&["-br", "link", "show", "eth0"]).unwrap();
    let mac = mac.split_whitespace().nth(2).unwrap().to_string();
    (a, b, mac)
}

fn json_line(text: &str) -> serde_json::Value {
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{text}"));
    serde_json::from_str(line).unwrap()
}

fn send_and_count(tag: &str, proto: &str, size: &str) {
    let (a, b, mac) = pair(tag);
    let dir = std::env::temp_dir().join(format!("kx-load-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("flows.csv");
    let flows = ["--src", "10.200.16.1", "--sources", "4", "--sport", "4000", "--ports", "25"];
    let mut args = vec![
        LOAD,
        "recv",
        "--iface",
        "eth0",
        "--steer",
        "10.96.0.0/16",
        "--duration",
        "30s",
        "--idle-exit",
        "2s",
        // Room for 0.3 s of the sender's 50,000 frames/s: on two shared cores the receiver
        // may not run for tens of milliseconds (the default 8,192-frame UMEM, with a
        // 4,096-entry fill ring, lost 1,963 frames twice).
        "--frames",
        "32768",
        "--per-flow-csv",
        csv.to_str().unwrap(),
        "--json",
    ];
    args.extend(flows);
    let mut rx = Proc::start(&b, &args, &dir.join("recv.log")).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || rx.log().contains("receiving on")),
        "receiver did not start: {}",
        rx.log()
    );
    let mut args = vec![
        LOAD,
        "send",
        "--iface",
        "eth0",
        "--dst-mac",
        &mac,
        "--proto",
        proto,
        "--size",
        size,
        "--dst",
        "10.96.0.1",
        "--destinations",
        "7",
        "--count",
        "20000",
        "--rate",
        "50000",
        "--duration",
        "20s",
        "--json",
    ];
    args.extend(flows);
    let sent = json_line(&a.exec(&args).expect("sender"));
    assert_eq!(sent["sent"], 20_000, "{sent}");
    assert_eq!(sent["submitted"], 20_000);
    // The rate limit holds: 20,000 packets at 50,000/s take about 0.4 s.
    let secs = sent["seconds"].as_f64().unwrap();
    assert!((0.35..5.0).contains(&secs), "{secs} s");
    // The receiver stops after 2 s without packets.
    assert!(wait_for(Duration::from_secs(10), || !rx.running()), "receiver did not stop");
    let got = json_line(&rx.log());
    assert_eq!(got["received"], 20_000, "{got}");
    assert_eq!(got["matched"], 20_000);
    assert_eq!(got["flows_seen"], 100);
    assert_eq!(got["per_flow_min"], 200);
    assert_eq!(got["per_flow_max"], 200);
    let key = if proto == "udp" { "udp" } else { "tcp" };
    assert_eq!(got[key], 20_000);
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 101);
    assert!(csv.contains("\n99,10.200.16.4,4024,200\n"), "{csv}");
    // The receiver took its XDP program off the interface when it exited.
    let link = b.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "{link}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn udp_count_arrives_whole_per_flow() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    send_and_count("u", "udp", "60");
}

#[test]
fn tcp_syn_count_arrives_whole_per_flow() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    send_and_count("t", "tcp-syn", "128");
}

fn refused(args: &[&str], message: &str) {
    let out = Command::new(LOAD).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(message), "{args:?}: {err}");
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let base = ["send", "--iface", "lo", "--dst-mac", "02:00:00:00:00:01", "--dst", "10.96.0.1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    refused(&with(&["--size", "40"]), "outside 60..=1514");
    refused(&with(&["--size", "9000"]), "outside 60..=1514");
    refused(&with(&["--proto", "icmp"]), "invalid value 'icmp'");
    refused(&with(&["--duration", "2h"]), "unit must be ms, s or m");
    refused(&with(&["--duration", "0s"]), "more than 0");
    refused(&with(&["--sources", "0"]), "at least 1");
    refused(&with(&["--sport", "65000", "--ports", "600"]), "past 65535");
    refused(&with(&["--sources", "65536", "--ports", "65536", "--sport", "0"]), "more than");
    refused(&with(&["--frames", "1000"]), "power of two");
    refused(
        &["send", "--iface", "no-such-if0", "--dst-mac", "02:00:00:00:00:01", "--dst", "10.0.0.1"],
        "no interface \"no-such-if0\"",
    );
    refused(
        &["send", "--iface", "lo", "--dst-mac", "02:00:00:00:00", "--dst", "10.0.0.1"],
        "six hex bytes",
    );
    refused(&["send", "--iface", "lo", "--dst-mac", "02:00:00:00:00:01"], "--dst");
    refused(&["recv", "--iface", "lo", "--steer", "10.0.0.0/40"], "prefix length over 32");
    refused(&["recv", "--iface", "lo", "--steer", "10.0.0.1/8"], "host bits");
}
