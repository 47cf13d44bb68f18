//! Timing kube-proxy's rule-set writes: one `iptables-restore` / `nft -f -` process run inside
//! a network namespace with its input on stdin, and the sequence of one-endpoint changes the
//! benchmarks apply. Shared by `control/benches/compile.rs` (update cost alone) and
//! `kxdp-compare` (update cost next to forwarding rates).
//!
//! Every command runs under `ip netns exec NS`, so the host's tables are never read or
//! written; the namespace is the caller's (created and deleted by its guard). Each run is
//! bounded by a timeout after which the child (started here, killed by its own handle) is
//! stopped.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kubeproxy::{Endpoint, ServicePort};

/// One timed process run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Wall time from spawn to exit (including `ip netns exec`).
    pub time: Duration,
    /// Peak RSS of the process (sampled from /proc every 20 ms).
    pub peak_rss_kib: u64,
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Runs `argv` in namespace `ns` with `input` on stdin; fails on a non-zero exit, any stderr
/// output, or `timeout`.
pub fn run(ns: &str, argv: &[&str], input: &str, timeout: Duration) -> Result<Run, String> {
    let t0 = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (outcome, msg) = std::thread::scope(|s| {
        s.spawn(move || {
            // A child that fails early closes the pipe; its exit status reports that.
            let _ = stdin.write_all(input.as_bytes());
        });
        let err = s.spawn(move || {
            let mut msg = String::new();
            let _ = stderr.read_to_string(&mut msg);
            msg
        });
        let mut peak = 0;
        let mut last_sample = t0;
        let outcome = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok((status, t0.elapsed(), peak)),
                Ok(None) => {}
                Err(e) => break Err(e.to_string()),
            }
            if last_sample.elapsed() >= Duration::from_millis(20) {
                peak = peak.max(vm_hwm_kib(pid));
                last_sample = Instant::now();
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {:.0} s", timeout.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        (outcome, err.join().unwrap_or_default())
    });
    let (status, time, peak) = outcome?;
    if !status.success() || !msg.trim().is_empty() {
        let first: Vec<&str> = msg.lines().take(3).collect();
        return Err(format!("{} failed ({status}): {}", argv[0], first.join(" | ")));
    }
    Ok(Run { time, peak_rss_kib: peak })
}

/// One-endpoint changes in sequence: even steps remove an endpoint of some service, odd
/// steps put it back, so every step is one endpoint change from what the kernel holds.
#[derive(Default)]
pub struct Changes {
    step: usize,
    removed: Option<(usize, usize, Endpoint)>,
}

impl Changes {
    /// No change applied yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the next change to `ports`; returns the changed service port and the
    /// endpoint that went away (for nftables' stale-chain flush).
    pub fn next(&mut self, ports: &mut [ServicePort]) -> (usize, Option<Endpoint>) {
        self.step += 1;
        if let Some((s, e, ep)) = self.removed.take() {
            ports[s].endpoints.insert(e, ep);
            return (s, None);
        }
        let k = self.step / 2;
        let s = (k * 7919) % ports.len();
        let e = k % ports[s].endpoints.len();
        let ep = ports[s].endpoints.remove(e);
        self.removed = Some((s, e, ep));
        (s, Some(ep))
    }

    /// Puts back an endpoint still removed.
    pub fn undo(self, ports: &mut [ServicePort]) {
        if let Some((s, e, ep)) = self.removed {
            ports[s].endpoints.insert(e, ep);
        }
    }
}

/// The median of `v` (sorts it); `None` when empty.
pub fn median(v: &mut [Duration]) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeproxy::cluster;

    #[test]
    fn changes_alternate_remove_and_restore() {
        let mut ports = cluster(20, 3);
        let orig = ports.clone();
        let mut c = Changes::new();
        let (s, gone) = c.next(&mut ports);
        assert_eq!(ports[s].endpoints.len(), 2);
        assert!(gone.is_some());
        let (s2, back) = c.next(&mut ports);
        assert_eq!((s2, back), (s, None));
        assert_eq!(ports, orig);
        c.next(&mut ports);
        assert_ne!(ports, orig);
        c.undo(&mut ports);
        assert_eq!(ports, orig);
    }

    #[test]
    fn median_of_odd_and_empty() {
        let ms = Duration::from_millis;
        assert_eq!(median(&mut [ms(3), ms(1), ms(2)]), Some(ms(2)));
        assert_eq!(median(&mut []), None);
    }
}
