//! Compile benchmark: 10,000 Services x 10 endpoints (100,000 endpoints).
//!
//! Prints, then measures with criterion:
//! - the full compile time (target <= 200 ms) and the RSS growth of store + compiled state;
//! - one endpoint change, from the store event to a new `Tables` published by the dataplane's
//!   `Applier` (store apply -> incremental compile -> wire delta -> apply), p50/p99 over many
//!   iterations (target p99 <= 1 ms), split into its control and dataplane halves;
//! - in the same run, what kube-proxy pays for the same cluster: `iptables-restore` of its
//!   rule set (full sync, and the partial sync it does after one endpoint change since 1.27)
//!   and `nft -f` of its nftables-mode transactions, each inside a network namespace of its
//!   own (never the host's tables), side by side with the kxdp figures. Needs root, `ip`,
//!   `iptables-legacy-restore` / `iptables-nft-restore` / `nft`; skipped (saying why)
//!   otherwise, or with `KXDP_BENCH_KUBE_PROXY=off`. Bounded by a time budget
//!   (`KXDP_BENCH_KUBE_PROXY_BUDGET` seconds, default 300); see `kube_proxy` below.
//!
//! `cargo bench -p control --bench compile`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use control::compile::{Compiler, NodeContext};
use control::publish::port_update;
use control::store::{Event, Object, Store, SERVICE_NAME_LABEL};
use criterion::Criterion;
use dataplane::sync::{Applier, ToDataplane};
use dataplane::tables::Tables;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn meta(name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("bench".into()),
        labels,
        ..Default::default()
    }
}

fn service(i: u32) -> Object {
    let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    Object::Service(Arc::new(Service {
        metadata: meta(&format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }))
}

fn slice(i: u32, ready_mask: u32) -> Object {
    let endpoints = (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e;
            Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 128 + n / 65_536, (n / 256) % 256, n % 256)],
                conditions: Some(EndpointConditions {
                    ready: Some(ready_mask & (1 << e) != 0),
                    serving: None,
                    terminating: None,
                }),
                node_name: Some(format!("node-{}", n % 50)),
                ..Default::default()
            }
        })
        .collect();
    let labels = BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), format!("svc-{i}"))]);
    Object::EndpointSlice(Arc::new(EndpointSlice {
        metadata: meta(&format!("svc-{i}-abcde"), Some(labels)),
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }))
}

fn store() -> Store {
    let mut st = Store::new();
    for i in 0..SERVICES {
        st.apply(Event::Apply(service(i)));
        st.apply(Event::Apply(slice(i, u32::MAX)));
    }
    st.take_changes();
    st
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ctx() -> NodeContext {
    NodeContext { name: "node-1".into(), ..Default::default() }
}

/// The kxdp figures the kube-proxy comparison is set against.
struct Kxdp {
    full_compile: Duration,
    snapshot_apply: Duration,
    change_p50: Duration,
    change_p99: Duration,
}

fn report() -> Kxdp {
    let rss0 = rss_kib();
    let mut st = store();
    let rss1 = rss_kib();
    let mut compiler = Compiler::new(ctx());
    let t = Instant::now();
    let diff = compiler.compile_all(&st);
    let full = t.elapsed();
    let rss2 = rss_kib();
    println!(
        "full compile: {} services x {} endpoints -> {} service ports in {:.1} ms",
        SERVICES,
        ENDPOINTS,
        diff.upserts.len(),
        full.as_secs_f64() * 1e3
    );
    println!(
        "RSS: store +{} MiB, compiled state +{} MiB",
        rss1.saturating_sub(rss0) / 1024,
        rss2.saturating_sub(rss1) / 1024
    );

    let live = Arc::new(ArcSwap::from_pointee(Tables::empty()));
    let mut applier = Applier::new(live.clone());
    let snap = ToDataplane::Snapshot {
        generation: diff.generation,
        ports: compiler.ports().values().map(|p| port_update(p)).collect(),
    };
    let t = Instant::now();
    applier.apply(snap).unwrap();
    let snapshot_apply = t.elapsed();
    println!("dataplane snapshot apply: {:.1} ms", snapshot_apply.as_secs_f64() * 1e3);
    println!("RSS after dataplane tables: +{} MiB", rss_kib().saturating_sub(rss2) / 1024);

    let iters = 2_000u32;
    let (mut total, mut ctl, mut dp) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..iters {
        let i = (k * 7919) % SERVICES;
        // Flip one endpoint's readiness.
        let mask = if k % 2 == 0 { !(1 << (k % ENDPOINTS)) } else { u32::MAX };
        let ev = Event::Apply(slice(i, mask));
        let t0 = Instant::now();
        st.apply(ev);
        let changes = st.take_changes();
        let d = compiler.compile(&st, &changes);
        let msg = ToDataplane::Delta {
            base: applier.generation(),
            generation: d.generation,
            upserts: d.upserts.iter().map(|p| port_update(p)).collect(),
            removals: d.removals.clone(),
        };
        let t1 = Instant::now();
        applier.apply(msg).unwrap();
        let t2 = Instant::now();
        assert_eq!(live.load().generation(), u64::from(k) + 2);
        total.push(t2 - t0);
        ctl.push(t1 - t0);
        dp.push(t2 - t1);
    }
    for (name, v) in [
        ("total", &mut total),
        ("control (store+compile+encode)", &mut ctl),
        ("dataplane apply (tables.next + publish)", &mut dp),
    ] {
        println!(
            "one endpoint change, {name}: p50 {:.1} us, p99 {:.1} us, max {:.1} us ({iters} iterations)",
            pct(v, 0.5).as_secs_f64() * 1e6,
            pct(v, 0.99).as_secs_f64() * 1e6,
            pct(v, 1.0).as_secs_f64() * 1e6,
        );
    }
    let t = Instant::now();
    for _ in 0..100 {
        let _ = live.load().next().build();
    }
    println!("tables.next().build() alone: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / 100.0);
    Kxdp {
        full_compile: full,
        snapshot_apply,
        change_p50: pct(&mut total, 0.5),
        change_p99: pct(&mut total, 0.99),
    }
}

fn main() {
    let kxdp = report();
    {
        let st = store();
        let mut c = Criterion::default().sample_size(10).configure_from_args();
        c.bench_function("compile_all_10k_services_100k_endpoints", |b| {
            b.iter(|| Compiler::new(ctx()).compile_all(&st).upserts.len())
        });
        c.final_summary();
    }
    // Last: the kernel tears the namespaces' rule sets down in the background for a while
    // afterwards, which would disturb the measurements above.
    kube_proxy::compare(&kxdp);
}

/// kube-proxy's side of the comparison, at the size of the kxdp figures.
///
/// kube-proxy turns a change into a rule-set write: iptables mode pipes an `iptables-restore`
/// input (whole, or since Kubernetes 1.27 only the changed services' chains plus all of
/// `KUBE-SERVICES`) to `iptables-restore --noflush --counters`; nftables mode pipes a
/// transaction to `nft -f -`. The inputs come from `kxdp_benches::kubeproxy`, which writes
/// them in kube-proxy's shape. Each timed figure is the wall time of that one process, from
/// spawn to exit, input piped on stdin as kube-proxy does; kube-proxy's own time to build the
/// input (and its `iptables-save` / `nft list` calls) is not included, so these are lower
/// bounds on its sync time. Every command runs under `ip netns exec` in a namespace created
/// for the purpose (see [`Netns`]); the host's tables are never read or written.
///
/// Sizes and budget: iptables-legacy and nft are measured at the kxdp size (10,000 services
/// x 10 endpoints); iptables-nft (Debian's default `iptables`) at 1,000 x 10, because its
/// restore time grows far faster than the rule set (6 s at 1,000 services, 61 s at 2,000 on
/// the development machine) and the full size does not finish in minutes. Each
/// series stops when the budget would be exceeded; what was cut is printed.
mod kube_proxy {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use kxdp_benches::kubeproxy::{self as kp, ServicePort};
    use kxdp_benches::restore::{Changes, Run};

    use super::{Kxdp, ENDPOINTS, SERVICES};

    /// Services in the reduced-size series (iptables-nft, and nft for comparison with it).
    const SMALL_SERVICES: u32 = 1_000;

    /// A network namespace `kxdp-bench-<pid>` of our own, deleted on drop, so that nothing
    /// this benchmark restores can reach the host's tables.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Result<Self, String> {
            let name = format!("kxdp-bench-{}", std::process::id());
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .map_err(|e| format!("ip netns add: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip netns add {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(Self { name })
        }

        /// Output of a quick command inside the namespace (versions), or "".
        fn output(&self, argv: &[&str]) -> String {
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    /// `kxdp_benches::restore::run` in our namespace.
    fn run(ns: &Netns, argv: &[&str], input: &str, timeout: Duration) -> Result<Run, String> {
        kxdp_benches::restore::run(&ns.name, argv, input, timeout)
    }

    /// The wall-clock budget of the whole comparison.
    struct Budget {
        until: Instant,
    }

    impl Budget {
        fn left(&self) -> Duration {
            self.until.saturating_duration_since(Instant::now())
        }

        /// The timeout for a run expected to take about `expect` (capped at `cap`), or None
        /// when the budget cannot afford it.
        fn allow(&self, expect: Duration, cap: Duration) -> Option<Duration> {
            let left = self.left();
            (left > expect + expect / 4).then(|| left.min(cap))
        }
    }

    /// The figures of one backend at one size.
    #[derive(Default)]
    struct Series {
        label: String,
        size: String,
        /// Full load into the empty namespace.
        cold: Option<Run>,
        /// Full re-syncs, each carrying one endpoint change.
        full: Vec<Run>,
        /// Partial syncs after one endpoint change.
        partial: Vec<Run>,
        /// nftables: one `service-ips` element replaced.
        element: Vec<Run>,
        notes: Vec<String>,
    }

    fn median(runs: &[Run]) -> Option<Duration> {
        let mut v: Vec<Duration> = runs.iter().map(|r| r.time).collect();
        v.sort();
        v.get(v.len() / 2).copied().filter(|_| !v.is_empty())
    }

    fn fmt_d(d: Duration) -> String {
        if d >= Duration::from_secs(1) {
            format!("{:.2} s", d.as_secs_f64())
        } else if d >= Duration::from_millis(1) {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        } else {
            format!("{:.0} us", d.as_secs_f64() * 1e6)
        }
    }

    fn fmt_runs(runs: &[Run]) -> String {
        match median(runs) {
            None => "not measured".into(),
            Some(m) => {
                let rss = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
                let all: Vec<String> = runs.iter().map(|r| fmt_d(r.time)).collect();
                format!(
                    "median {} ({} runs: {}; peak RSS {} MiB)",
                    fmt_d(m),
                    runs.len(),
                    all.join(", "),
                    rss / 1024
                )
            }
        }
    }

    impl Series {
        fn print(&self) {
            println!("  {} [{}]", self.label, self.size);
            if let Some(c) = self.cold {
                println!(
                    "    full load, empty namespace:     {} (peak RSS {} MiB)",
                    fmt_d(c.time),
                    c.peak_rss_kib / 1024
                );
            }
            println!("    full re-sync, 1 endpoint change: {}", fmt_runs(&self.full));
            println!("    partial sync, 1 endpoint change: {}", fmt_runs(&self.partial));
            if !self.element.is_empty() {
                println!("    one service-ips element change:  {}", fmt_runs(&self.element));
            }
            for n in &self.notes {
                println!("    note: {n}");
            }
        }
    }

    /// Where runs go: a namespace, the command, the budget.
    struct Target<'a> {
        ns: &'a Netns,
        argv: &'a [&'a str],
        budget: &'a Budget,
    }

    impl Target<'_> {
        /// Up to `n` timed runs of inputs from `input`, while the budget lasts; what cut the
        /// series short goes to `notes`.
        fn series(
            &self,
            what: &str,
            n: usize,
            cap: Duration,
            notes: &mut Vec<String>,
            mut input: impl FnMut() -> String,
        ) -> Vec<Run> {
            let mut runs: Vec<Run> = Vec::new();
            for _ in 0..n {
                let expect = runs.iter().map(|r| r.time).max().unwrap_or_default();
                let Some(timeout) = self.budget.allow(expect, cap) else {
                    notes.push(format!("{what}: stopped after {} runs (time budget)", runs.len()));
                    break;
                };
                let text = input();
                match run(self.ns, self.argv, &text, timeout) {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        notes.push(format!("{what}: {e}"));
                        break;
                    }
                }
            }
            runs
        }
    }

    fn iptables(
        label: &str,
        restore: &str,
        ports: &mut [ServicePort],
        budget: &Budget,
    ) -> Result<Series, String> {
        let ns = Netns::new()?;
        let argv = [restore, "-w", "5", "--noflush", "--counters"];
        let mut s = Series {
            label: format!("{label} ({})", ns.output(&[&restore.replace("-restore", ""), "-V"])),
            size: format!("{} services x {} endpoints", ports.len(), ports[0].endpoints.len()),
            ..Default::default()
        };
        run(&ns, &argv, &kp::iptables_jumps(), Duration::from_secs(30))?;
        let full = kp::iptables_restore(ports);
        let timeout =
            budget.allow(Duration::ZERO, Duration::from_secs(120)).ok_or("time budget")?;
        s.cold = Some(run(&ns, &argv, &full, timeout).map_err(|e| format!("full load: {e}"))?);
        drop(full);
        let mut changes = Changes::new();
        let cap = Duration::from_secs(120);
        let target = Target { ns: &ns, argv: &argv, budget };
        s.full = target.series("full re-sync", 3, cap, &mut s.notes, || {
            changes.next(ports);
            kp::iptables_restore(ports)
        });
        s.partial = target.series("partial", 5, cap, &mut s.notes, || {
            let (svc, _) = changes.next(ports);
            kp::iptables_restore_partial(ports, &[svc])
        });
        changes.undo(ports);
        Ok(s)
    }

    fn nftables(ports: &mut [ServicePort], budget: &Budget) -> Result<Series, String> {
        let ns = Netns::new()?;
        let argv = ["nft", "-f", "-"];
        let mut s = Series {
            label: format!("nftables mode ({})", ns.output(&["nft", "-v"])),
            size: format!("{} services x {} endpoints", ports.len(), ports[0].endpoints.len()),
            ..Default::default()
        };
        let timeout =
            budget.allow(Duration::ZERO, Duration::from_secs(240)).ok_or("time budget")?;
        let load = kp::nft_full(ports);
        s.cold = Some(run(&ns, &argv, &load, timeout).map_err(|e| format!("full load: {e}"))?);
        drop(load);
        let cold = s.cold.map(|r| r.time).unwrap_or_default();
        let mut changes = Changes::new();
        let target = Target { ns: &ns, argv: &argv, budget };
        // A full re-sync costs about what the load did; skip it when the load alone was long.
        if cold < Duration::from_secs(20) {
            s.full =
                target.series("full re-sync", 3, Duration::from_secs(120), &mut s.notes, || {
                    changes.next(ports);
                    kp::nft_full(ports)
                });
        } else {
            s.notes.push(format!("full re-sync not repeated (the load took {})", fmt_d(cold)));
        }
        let cap = Duration::from_secs(60);
        s.partial = target.series("partial", 5, cap, &mut s.notes, || {
            let (svc, gone) = changes.next(ports);
            kp::nft_partial(ports, svc, gone.as_slice())
        });
        let mut k = 0;
        let n = ports.len();
        let elements = target.series("element", 5, cap, &mut s.notes, || {
            k += 1;
            kp::nft_map_element_change(&ports[(k * 104_729) % n])
        });
        s.element = elements;
        changes.undo(ports);
        Ok(s)
    }

    fn euid() -> Option<u32> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    fn in_path(prog: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
    }

    fn ratio(theirs: Option<Duration>, ours: Duration) -> String {
        match theirs {
            Some(t) if !ours.is_zero() => {
                format!("{} ({:.0}x kxdp)", fmt_d(t), t.as_secs_f64() / ours.as_secs_f64())
            }
            _ => "-".into(),
        }
    }

    /// Measures and prints kube-proxy's figures next to kxdp's; prints why when it cannot.
    pub fn compare(kxdp: &Kxdp) {
        println!("\nkube-proxy comparison, same run");
        if std::env::var("KXDP_BENCH_KUBE_PROXY").is_ok_and(|v| v == "off" || v == "0") {
            println!("  skipped: KXDP_BENCH_KUBE_PROXY=off");
            return;
        }
        if euid() != Some(0) {
            println!("  skipped: needs root (network namespaces, iptables, nft)");
            return;
        }
        if !in_path("ip") {
            println!("  skipped: `ip` (iproute2) not found");
            return;
        }
        let secs = std::env::var("KXDP_BENCH_KUBE_PROXY_BUDGET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let budget = Budget { until: Instant::now() + Duration::from_secs(secs) };
        let mut big = kp::cluster(SERVICES, ENDPOINTS);
        let mut small = kp::cluster(SMALL_SERVICES, ENDPOINTS);
        let (big_rules, big_bytes) = {
            let r = kp::iptables_restore(&big);
            (r.lines().filter(|l| l.starts_with("-A ")).count(), r.len())
        };
        let big_chains = 4 + big.len() + big.iter().map(|p| p.endpoints.len()).sum::<usize>();
        println!(
            "  rule set at {SERVICES} x {ENDPOINTS}: {big_chains} nat chains, {big_rules} rules"
        );
        println!(
            "  input: {:.1} MiB for iptables-restore, {:.1} MiB for nft (budget {secs} s)",
            big_bytes as f64 / 1048576.0,
            kp::nft_full(&big).len() as f64 / 1048576.0
        );
        if let Ok(ns) = Netns::new() {
            println!("  `iptables` here is: {}", ns.output(&["iptables", "-V"]));
            let mut t: Vec<Duration> = (0..5)
                .filter_map(|_| {
                    run(&ns, &["true"], "", Duration::from_secs(5)).ok().map(|r| r.time)
                })
                .collect();
            t.sort();
            if let Some(m) = t.get(t.len() / 2) {
                println!(
                    "  `ip netns exec NS true` (included in every figure below): {}",
                    fmt_d(*m)
                );
            }
        }

        let mut results: Vec<Series> = Vec::new();
        let mut attempt =
            |name: &str, prog: &str, f: &mut dyn FnMut() -> Result<Series, String>| {
                if !in_path(prog) {
                    println!("  {name}: skipped, `{prog}` not found");
                    return;
                }
                match f() {
                    Ok(s) => {
                        s.print();
                        results.push(s);
                    }
                    Err(e) => println!("  {name}: not measured: {e}"),
                }
            };
        // Cheapest first; the full-size nft load (minutes) goes last and gets what is left.
        let (b, sm) =
            (format!("{SERVICES} x {ENDPOINTS}"), format!("{SMALL_SERVICES} x {ENDPOINTS}"));
        attempt(&format!("iptables-legacy [{b}]"), "iptables-legacy-restore", &mut || {
            iptables("iptables-legacy", "iptables-legacy-restore", &mut big, &budget)
        });
        attempt(&format!("iptables-nft [{sm}]"), "iptables-nft-restore", &mut || {
            iptables("iptables-nft", "iptables-nft-restore", &mut small, &budget)
        });
        attempt(&format!("nftables mode [{sm}]"), "nft", &mut || nftables(&mut small, &budget));
        attempt(&format!("nftables mode [{b}]"), "nft", &mut || nftables(&mut big, &budget));

        let full_kxdp = kxdp.full_compile + kxdp.snapshot_apply;
        println!(
            "  kxdp at {SERVICES} x {ENDPOINTS}: full compile + snapshot apply {}; \
             one endpoint change p50 {}, p99 {}",
            fmt_d(full_kxdp),
            fmt_d(kxdp.change_p50),
            fmt_d(kxdp.change_p99)
        );
        let size = format!("{SERVICES} services x {ENDPOINTS} endpoints");
        for s in results.iter().filter(|s| s.size == size) {
            let (what, full) = match median(&s.full) {
                Some(m) => ("full re-sync", Some(m)),
                None => ("full load", s.cold.map(|r| r.time)),
            };
            println!(
                "  vs {}: {what} {}; one change: partial {}, full re-sync {} (against kxdp p50)",
                s.label,
                ratio(full, full_kxdp),
                ratio(median(&s.partial), kxdp.change_p50),
                ratio(median(&s.full), kxdp.change_p50),
            );
        }
        println!("  (smaller series have no kxdp counterpart at their size and get no ratio)");
    }
}
