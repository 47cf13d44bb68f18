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
