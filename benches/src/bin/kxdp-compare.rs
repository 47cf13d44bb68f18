//! `kxdp-compare`: kxdp next to kube-proxy's iptables and nftables rule sets, in one run, with
//! the same generator, topology and receiver.
//!
//! Topology (all namespaces created here, deleted by their guards on exit or interrupt):
//!
//! ```text
//!  kxdp-cmp-p0 (generator)        kxdp-cmp-node (the node)           kxdp-cmp-p1 (backends)
//!  eth0 10.200.0.2 ---veth--- kxcmp0        kxcmp1 ---veth--- eth0 10.200.1.2
//!  kxdp-load send                 mode under test                    kxdp-load recv (XDP+AF_XDP)
//! ```
//!
//! Clients are 10.200.16.0/20 (inside kube-proxy's cluster CIDR, so nothing is masqueraded),
//! service `i` has ClusterIP 10.96.0.1 + i, UDP port 80, and 10 endpoints in 10.128.0.0/9 that
//! the node routes to the backend namespace via 10.200.1.2; the receiver there counts every
//! frame by its source (which DNAT keeps). Modes, each applied to the same node namespace in
//! turn:
//!
//! 1. `kxdp`: `kxdp-dataplane` on both node veths (one worker, on the node core), the services
//!    pushed as a snapshot over its control socket.
//! 2. `raw`: `kxdp-dataplane` in raw mode (receive, transmit unchanged to the other veth): the
//!    AF_XDP I/O ceiling of this machine.
//! 3. `iptables`: the kernel forwarding with kube-proxy's iptables-mode rule set
//!    (`kxdp_benches::kubeproxy::iptables_restore`, loaded with `iptables-legacy-restore`).
//! 4. `nftables`: the kernel forwarding with kube-proxy's nftables-mode rule set (`nft -f`).
//!
//! In the kernel modes the node's receive work is steered to the node core with RPS, so in
//! every mode the generator has one core and the node the other. IPVS is not measured: this
//! kernel has no IPVS.
//!
//! Per mode and size: established-flow packets per second (a fixed set of flows, warmed up
//! first so their conntrack entries exist), new-flow rate (every packet a new 5-tuple), and the
//! time to apply one endpoint change (kxdp: a delta over the control socket until its ack;
//! iptables: kube-proxy's partial `iptables-restore`; nftables: its partial `nft -f`). Rates
//! are the frames the receiver counted divided by the seconds the generator sent, medians of
//! `--repeat` runs.
//!
//! Every step is bounded in time; SIGINT/SIGTERM stop the run at the next step (a second
//! SIGINT exits at once) and the guards remove namespaces, rules and programs.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dataplane::balance::Algorithm;
use dataplane::sync::{read_frame, write_frame, FrontendEntry, PortUpdate, ToControl, ToDataplane};
use dataplane::tables::{Backend, FrontendKind, Protocol, ServiceSpec};
use kxdp_benches::kubeproxy::{self as kp, ServicePort};
use kxdp_benches::load::parse_duration;
use kxdp_benches::restore::{self, median, Changes};
use kxdp_tests::{sh, start_dataplane, wait_for, Netns, Proc, Topology};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "kxdp-compare", about = "kxdp vs raw AF_XDP vs kube-proxy iptables/nftables")]
struct Cli {
    /// Service counts to measure (10 endpoints each).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,5000,10000")]
    services: Vec<u32>,
    /// Fewer sizes (1 and 1,000) and shorter measurements.
    #[arg(long)]
    quick: bool,
    /// Modes to run.
    #[arg(long, value_delimiter = ',', default_value = "kxdp,raw,iptables,nftables")]
    modes: Vec<Mode>,
    /// Length of each rate measurement.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    duration: Duration,
    /// Measurements per rate (the median is reported, the spread in the details).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Frame size (bytes, Ethernet header included).
    #[arg(long, default_value_t = 60)]
    size: usize,
    /// Established flows (source ports per address; 40 addresses).
    #[arg(long, default_value_t = 256)]
    ports: u32,
    /// Longest time any one rule-set load may take before that mode is skipped at that size.
    #[arg(long, value_parser = parse_duration, default_value = "240s")]
    load_timeout: Duration,
    /// Output path without extension (`.md`, `.svg` and `.json` are written).
    #[arg(long, default_value = "benches/results/compare")]
    out: PathBuf,
    /// Core of the generator.
    #[arg(long, default_value_t = 0)]
    gen_core: usize,
    /// Core of the node (dataplane worker, or the kernel's receive work via RPS).
    #[arg(long, default_value_t = 1)]
    node_core: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Kxdp,
    Raw,
    Iptables,
    Nftables,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Kxdp => "kxdp",
            Mode::Raw => "raw AF_XDP",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// What one (mode, size) gave.
#[derive(Clone, Debug, Default, Serialize)]
struct Cell {
    mode: Option<Mode>,
    services: u32,
    established_pps: Option<f64>,
    established_spread: Option<(f64, f64)>,
    new_flow_spread: Option<(f64, f64)>,
    established_sent_pps: Option<f64>,
    new_flow_pps: Option<f64>,
    new_flow_sent_pps: Option<f64>,
    flows_seen: Option<u64>,
    flows: Option<u64>,
    change_ms: Option<f64>,
    change_runs: usize,
    load_s: Option<f64>,
    notes: Vec<String>,
}

const GEN_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BK_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 200, 16, 1);
const CLIENT_ADDRS: u32 = 40;
/// Source addresses of the new-flow pattern (10.200.16.1 to 10.200.32.0): with 64,512 ports
/// each, room for 264 million tuples, so no new-flow run of the benchmark repeats another's.
const NEW_FLOW_ADDRS: u32 = 4096;
/// Packets of the new-flow pattern set aside per run and second of run (more than this
/// machine's generator sends; the space wraps after about 88 run-seconds, long after the
/// first runs' conntrack entries expired).
const NEW_FLOWS_PER_SECOND: u64 = 3_000_000;
const VIP0: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const ENDPOINTS: u32 = 10;
const SERVICE_PORT: u16 = 80;

fn main() {
    let mut cli = Cli::parse();
    if cli.quick {
        cli.services.retain(|&s| s <= 1000);
        if cli.services.is_empty() {
            cli.services = vec![1, 1000];
        }
        cli.repeat = cli.repeat.min(2);
        cli.duration = cli.duration.min(Duration::from_secs(1));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal exits at once; the first only asks the run to stop.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone());
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    if let Err(e) = run(&cli, &stop) {
        eprintln!("kxdp-compare: {e}");
        std::process::exit(1);
    }
}

fn check_setup(cli: &Cli) -> Result<(), String> {
    if !kxdp_tests::is_root() {
        return Err("needs root (network namespaces, XDP, iptables, nft)".into());
    }
    for s in &cli.services {
        if *s == 0 || *s > 100_000 {
            return Err(format!("--services {s}: must be 1 to 100000"));
        }
    }
    if !(1..=20).contains(&cli.repeat) {
        return Err(format!("--repeat {}: must be 1 to 20", cli.repeat));
    }
    if !(1..=256).contains(&cli.ports) {
        return Err(format!("--ports {}: must be 1 to 256", cli.ports));
    }
    if cli.duration > Duration::from_secs(60) {
        return Err("--duration: at most 60s per measurement".into());
    }
    if cli.gen_core == cli.node_core {
        return Err("--gen-core and --node-core must differ".into());
    }
    let mut need = vec!["ip", "ethtool"];
    if cli.modes.contains(&Mode::Iptables) {
        need.push("iptables-legacy-restore");
    }
    if cli.modes.contains(&Mode::Nftables) {
        need.push("nft");
    }
    for p in need {
        if sh(&["sh", "-c", &format!("command -v {p}")]).is_err() {
            return Err(format!("`{p}` not found (scripts/setup.sh installs it)"));
        }
    }
    for b in ["kxdp-load", "kxdp-dataplane"] {
        if !kxdp_tests::binary(b).is_file() {
            return Err(format!(
                "{} missing: build with `cargo build --release -p dataplane -p kxdp-benches --bins`",
                kxdp_tests::binary(b).display()
            ));
        }
    }
    Ok(())
}

/// The services, in kube-proxy's model (for the rule sets): UDP port 80 -> 8080, contiguous
/// ClusterIPs from 10.96.0.1, endpoints as `kubeproxy::cluster` places them.
fn cluster(services: u32) -> Vec<ServicePort> {
    let mut ports = kp::cluster(services, ENDPOINTS);
    for (i, p) in ports.iter_mut().enumerate() {
        p.proto = kp::Proto::Udp;
        p.cluster_ip = Ipv4Addr::from(u32::from(VIP0) + i as u32);
        p.port = SERVICE_PORT;
    }
    ports
}

/// The same services as kxdp tables.
fn port_update(i: usize, p: &ServicePort) -> PortUpdate {
    let id = i as u32 + 1;
    PortUpdate {
        spec: ServiceSpec {
            id,
            name: p.name_string(),
            proto: Protocol::Udp,
            algorithm: Algorithm::Random,
            affinity_timeout_s: None,
            maglev_size: dataplane::tables::DEFAULT_MAGLEV_SIZE,
        },
        backends: p
            .endpoints
            .iter()
            .map(|e| Backend::ready(u32::from(e.ip) - 0x0a80_0000 + 1, e.ip, e.port))
            .collect(),
        frontends: vec![FrontendEntry {
            ip: p.cluster_ip,
            port: p.port,
            kind: FrontendKind::ClusterIp,
            masquerade_remote: false,
        }],
    }
}

struct Bench<'a> {
    cli: &'a Cli,
    stop: &'a AtomicBool,
    topo: Topology,
    node_mac: String,
    load: PathBuf,
    /// Cells measured so far (for per-cell established source ports).
    cells_done: std::cell::Cell<u32>,
    /// New-flow runs so far (each starts past the packets of all earlier ones).
    new_flow_runs: std::cell::Cell<u64>,
}

fn run(cli: &Cli, stop: &AtomicBool) -> Result<(), String> {
    check_setup(cli)?;
    let started = Instant::now();
    let date = sh(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default().trim().to_string();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    eprintln!("building the topology");
    let topo = Topology::build("cmp", &[GEN_IP, BK_IP])?;
    let (gen_if, bk_if) = (topo.pods[0].host_if.clone(), topo.pods[1].host_if.clone());
    let node = &topo.node;
    // Both pods' neighbours fixed, so the dataplane has next hops for them from the start
    // (a pod route without one would also keep it from using the 10.128.0.0/9 route, which
    // covers 10.200.0.0/16).
    for (pod, iface) in [(&topo.pods[0], &gen_if), (&topo.pods[1], &bk_if)] {
        let (ip, m) = (pod.ip.to_string(), mac(&pod.ns, "eth0")?);
        node.ip(&["neigh", "replace", &ip, "lladdr", &m, "dev", iface, "nud", "permanent"])?;
    }
    node.ip(&["route", "add", "10.128.0.0/9", "via", &BK_IP.to_string(), "dev", &bk_if])?;
    for (k, v) in [
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        (&format!("net.ipv4.conf.{gen_if}.rp_filter") as &str, "0"),
    ] {
        node.exec(&["sysctl", "-qw", &format!("{k}={v}")])?;
    }
    // The kernel modes' receive work on the node core (the dataplane's worker is pinned there).
    let mask = format!("{:x}", 1u64 << cli.node_core);
    node.exec(&[
        "sh",
        "-c",
        &format!("echo {mask} > /sys/class/net/{gen_if}/queues/rx-0/rps_cpus"),
    ])?;
    let node_mac = mac(node, &gen_if)?;
    let bench = Bench {
        cli,
        stop,
        node_mac,
        load: kxdp_tests::binary("kxdp-load"),
        topo,
        cells_done: Default::default(),
        new_flow_runs: Default::default(),
    };

    let mut cells: Vec<Cell> = Vec::new();
    for &n in &cli.services {
        let mut ports = cluster(n);
        for &mode in &cli.modes {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            eprintln!("== {} services, {}", n, mode.label());
            let mut cell = Cell { mode: Some(mode), services: n, ..Default::default() };
            if let Err(e) = bench.measure(mode, &mut ports, &mut cell) {
                eprintln!("   {}: {e}", mode.label());
                cell.notes.push(e);
            }
            eprintln!(
                "   established {:?} pps, new flows {:?}/s, change {:?} ms",
                cell.established_pps.map(|v| v.round()),
                cell.new_flow_pps.map(|v| v.round()),
                cell.change_ms
            );
            cells.push(cell);
        }
    }
    let interrupted = stop.load(Ordering::Relaxed);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let meta = Meta {
        date,
        command,
        load_before: load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_after: load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        duration_s: cli.duration.as_secs_f64(),
        repeat: cli.repeat,
        size: cli.size,
        flows: CLIENT_ADDRS * cli.ports,
        interrupted,
        kernel: sh(&["uname", "-r"]).unwrap_or_default().trim().to_string(),
    };
    write_results(&cli.out, &meta, &cli.services, &cli.modes, &cells)?;
    eprintln!("wrote {}.md, .svg, .json", cli.out.display());
    if interrupted {
        return Err("interrupted; partial results written, namespaces removed".into());
    }
    Ok(())
}

fn mac(ns: &Netns, iface: &str) -> Result<String, String> {
    let out = ns.ip(&["-br", "link", "show", iface])?;
    out.split_whitespace().nth(2).map(str::to_string).ok_or(format!("no MAC for {iface}"))
}

/// The receiver's and sender's summaries of one measurement.
struct Rate {
    /// Frames the receiver's own socket dropped (its ring full): a receiver limit.
    dropped: u64,
    received_pps: f64,
    sent_pps: f64,
    flows_seen: u64,
}

impl Bench<'_> {
    fn stopped(&self) -> Result<(), String> {
        if self.stop.load(Ordering::Relaxed) {
            Err("interrupted".into())
        } else {
            Ok(())
        }
    }

    fn measure(
        &self,
        mode: Mode,
        ports: &mut [ServicePort],
        cell: &mut Cell,
    ) -> Result<(), String> {
        let n = ports.len() as u32;
        match mode {
            Mode::Kxdp | Mode::Raw => {
                let cfg = self.dataplane_config(mode)?;
                let stats = self.topo.dir.join("stats.json");
                let log = format!("dataplane-{}-{n}.log", mode.label().replace(' ', "-"));
                let mut dp = start_dataplane(&self.topo, &cfg, &stats, &log)?;
                renice(dp.child.id())?;
                let socket = self.topo.dir.join("control.sock");
                let r = (|| {
                    let mut ctl = None;
                    if mode == Mode::Kxdp {
                        let t = Instant::now();
                        let mut c = Control::connect(&socket)?;
                        c.snapshot(
                            ports.iter().enumerate().map(|(i, p)| port_update(i, p)).collect(),
                        )?;
                        cell.load_s = Some(t.elapsed().as_secs_f64());
                        ctl = Some(c);
                    }
                    self.rates(ports.len() as u32, cell)?;
                    if let Some(mut c) = ctl {
                        let mut times = Vec::new();
                        let mut changes = Changes::new();
                        for _ in 0..11 {
                            self.stopped()?;
                            let (s, _) = changes.next(ports);
                            times.push(c.delta(port_update(s, &ports[s]))?);
                        }
                        changes.undo(ports);
                        cell.change_runs = times.len();
                        cell.change_ms = median(&mut times).map(|d| d.as_secs_f64() * 1e3);
                    }
                    Ok::<(), String>(())
                })();
                let clean = dp.stop();
                for p in &self.topo.pods {
                    let _ = self.topo.node.ip(&["link", "set", "dev", &p.host_if, "xdp", "off"]);
                }
                if !clean {
                    cell.notes.push(format!("dataplane did not stop on SIGTERM:\n{}", dp.log()));
                }
                r
            }
            Mode::Iptables => self.kernel_mode(
                ports,
                cell,
                &["iptables-legacy-restore", "-w", "5", "--noflush", "--counters"],
                IPTABLES_FLUSH,
                &[kp::iptables_jumps(), kp::iptables_restore(ports)],
                &|ports, s, _| kp::iptables_restore_partial(ports, &[s]),
            ),
            Mode::Nftables => self.kernel_mode(
                ports,
                cell,
                &["nft", "-f", "-"],
                NFT_FLUSH,
                &[kp::nft_full(ports)],
                &|ports, s, gone| kp::nft_partial(ports, s, gone.as_slice()),
            ),
        }
    }

    /// A kube-proxy rule set in the node namespace: `loads` piped to `argv` in order (the last
    /// one timed as the load), the rates, then three one-endpoint changes each written as
    /// `partial(ports, changed service, endpoint gone)` makes it; `cleanup` removes the rules
    /// afterwards, also on error.
    fn kernel_mode(
        &self,
        ports: &mut [ServicePort],
        cell: &mut Cell,
        argv: &[&str],
        cleanup: &[&[&str]],
        loads: &[String],
        partial: &PartialSync,
    ) -> Result<(), String> {
        let ns = self.topo.node.name.as_str();
        let _guard = Cleanup { ns, cmds: cleanup };
        for input in loads {
            let load = restore::run(ns, argv, input, self.cli.load_timeout)
                .map_err(|e| format!("rule set load: {e}"))?;
            cell.load_s = Some(load.time.as_secs_f64());
        }
        self.rates(ports.len() as u32, cell)?;
        let mut changes = Changes::new();
        let mut times = Vec::new();
        for _ in 0..3 {
            self.stopped()?;
            let (s, gone) = changes.next(ports);
            let input = partial(ports, s, gone);
            times.push(restore::run(ns, argv, &input, Duration::from_secs(120))?.time);
        }
        changes.undo(ports);
        cell.change_runs = times.len();
        cell.change_ms = median(&mut times).map(|d| d.as_secs_f64() * 1e3);
        Ok(())
    }

    fn dataplane_config(&self, mode: Mode) -> Result<PathBuf, String> {
        let (a, b) = (&self.topo.pods[0].host_if, &self.topo.pods[1].host_if);
        let ifaces = match mode {
            Mode::Raw => format!(
                "  - {{name: {a}, role: pod, raw_forward_to: {b}}}\n  - {{name: {b}, role: pod, raw_forward_to: {a}}}\nmode: raw\n"
            ),
            _ => format!("  - {{name: {a}, role: pod}}\n  - {{name: {b}, role: pod}}\n"),
        };
        let text = format!(
            "node_name: bench\ninterfaces:\n{ifaces}cores: [{}]\nirq_affinity: false\nsteer:\n  destinations: [10.96.0.0/16]\ncontrol_socket: {}\nconntrack: {{capacity: 1048576}}\numem_frames: 8192\npunt_device: kxcp{}\nidle_polls_before_sleep: 0\n",
            self.cli.node_core,
            self.topo.dir.join("control.sock").display(),
            std::process::id() % 100_000,
        );
        let path = self.topo.dir.join("node.yaml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// Established flows (after a warm-up that creates their conntrack entries), then new
    /// flows.
    fn rates(&self, services: u32, cell: &mut Cell) -> Result<(), String> {
        let d = self.cli.duration;
        // Established flows get source ports of their own in every cell, so no conntrack entry
        // left by an earlier mode (the node namespace is kept) serves them.
        let cell_no = self.cells_done.get();
        self.cells_done.set(cell_no + 1);
        let sport = 10_000 + (cell_no % 200) * self.cli.ports;
        let sport = u16::try_from(sport).map_err(|_| "--ports too large".to_string())?;
        // Warm-up: every flow seen, conntrack entries in place; not counted.
        self.send(&Traffic::established(self.cli.ports, sport), services, Duration::from_secs(1))?;
        let mut runs = Vec::new();
        for _ in 0..self.cli.repeat {
            runs.push(self.measured(&Traffic::established(self.cli.ports, sport), services, d)?);
        }
        let (r, spread) = median_run(&mut runs);
        cell.established_pps = Some(r.received_pps);
        cell.established_sent_pps = Some(r.sent_pps);
        cell.established_spread = spread;
        cell.flows_seen = Some(runs.iter().map(|r| r.flows_seen).min().unwrap_or(0));
        cell.flows = Some(u64::from(CLIENT_ADDRS * self.cli.ports));
        let dropped: u64 = runs.iter().map(|r| r.dropped).sum();
        if dropped > 0 {
            cell.notes.push(format!("receiver socket dropped {dropped} (established)"));
        }
        let mut runs = Vec::new();
        for _ in 0..self.cli.repeat {
            // Every run starts where no earlier run of the whole benchmark has been.
            let first = self.new_flow_runs.get();
            self.new_flow_runs.set(first + 1);
            let per_run = NEW_FLOWS_PER_SECOND * d.as_secs_f64().ceil() as u64;
            let t = Traffic::new_flows(first * per_run);
            runs.push(self.measured(&t, services, d)?);
        }
        let (r, spread) = median_run(&mut runs);
        cell.new_flow_pps = Some(r.received_pps);
        cell.new_flow_sent_pps = Some(r.sent_pps);
        cell.new_flow_spread = spread;
        let dropped: u64 = runs.iter().map(|r| r.dropped).sum();
        if dropped > 0 {
            cell.notes.push(format!("receiver socket dropped {dropped} (new flows)"));
        }
        Ok(())
    }

    fn send(&self, t: &Traffic, services: u32, d: Duration) -> Result<serde_json::Value, String> {
        self.stopped()?;
        let gen = &self.topo.pods[0].ns;
        let load = self.load.to_string_lossy();
        let (dur, core) = (format!("{}ms", d.as_millis()), self.cli.gen_core.to_string());
        let (services, size) = (services.to_string(), self.cli.size.to_string());
        let (src, dst) = (CLIENTS.to_string(), VIP0.to_string());
        let (sources, sport, ports, first) =
            (t.sources.to_string(), t.sport.to_string(), t.ports.to_string(), t.first.to_string());
        let out = gen.exec(&[
            "nice",
            "-n",
            NICE,
            &load,
            "send",
            "--iface",
            "eth0",
            "--dst-mac",
            &self.node_mac,
            "--proto",
            "udp",
            "--size",
            &size,
            "--src",
            &src,
            "--sources",
            &sources,
            "--sport",
            &sport,
            "--ports",
            &ports,
            "--dst",
            &dst,
            "--destinations",
            &services,
            "--dport",
            "80",
            "--pattern",
            t.pattern,
            "--first",
            &first,
            "--duration",
            &dur,
            "--core",
            &core,
            "--json",
        ])?;
        serde_json::from_str(out.trim()).map_err(|e| format!("sender output {out:?}: {e}"))
    }

    fn measured(&self, t: &Traffic, services: u32, d: Duration) -> Result<Rate, String> {
        let bk = &self.topo.pods[1];
        let load = self.load.to_string_lossy();
        let log = self.topo.dir.join(format!("recv-{}.log", t.pattern));
        let (addrs, ports, src) = (t.sources.to_string(), t.ports.to_string(), CLIENTS.to_string());
        let sport = t.sport.to_string();
        let max = format!("{}ms", (d + Duration::from_secs(20)).as_millis());
        // Not pinned: the frames reach its socket in the node core's softirq; the process
        // only drains the ring (with room for a few milliseconds of frames).
        let mut args = vec![
            "nice",
            "-n",
            NICE,
            load.as_ref(),
            "recv",
            "--iface",
            "eth0",
            "--steer",
            "10.0.0.0/8",
            "--duration",
            &max,
            "--frames",
            "16384",
            "--json",
        ];
        if t.pattern == "established" {
            args.extend([
                "--per-flow",
                "--src",
                &src,
                "--sources",
                &addrs,
                "--sport",
                &sport,
                "--ports",
                &ports,
            ]);
        }
        let mut rx = Proc::start(&bk.ns, &args, &log)?;
        if !wait_for(Duration::from_secs(10), || rx.log().contains("receiving on")) {
            return Err(format!("receiver did not start: {}", rx.log()));
        }
        let sent = self.send(t, services, d);
        std::thread::sleep(Duration::from_millis(300));
        rx.stop();
        let sent = sent?;
        let log = rx.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| format!("no receiver summary: {log}"))?;
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("receiver output {line:?}: {e}"))?;
        Ok(Rate {
            dropped: v["socket_rx_dropped"].as_u64().unwrap_or(0)
                + v["socket_rx_ring_full"].as_u64().unwrap_or(0),
            // What arrived per second of sending: a stall or loss anywhere (start-up
            // included) counts against the mode, and a short burst cannot inflate it.
            received_pps: v["received"].as_f64().unwrap_or(0.0)
                / sent["seconds"].as_f64().unwrap_or(f64::INFINITY).max(1e-3),
            sent_pps: sent["pps"].as_f64().unwrap_or(0.0),
            flows_seen: v["flows_seen"].as_u64().unwrap_or(0),
        })
    }
}

/// The priority of the generator, the receiver and the dataplane: the machine is shared, and
/// the kernel modes' forwarding runs in softirq context, ahead of any process, while the
/// dataplane's worker is a process competing with whatever else runs on its core.
const NICE: &str = "-10";

/// Gives every thread of `pid` the benchmark's priority (`renice` of a pid changes one thread).
fn renice(pid: u32) -> Result<(), String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        sh(&["renice", "-n", NICE, "-p", &tid])?;
    }
    Ok(())
}

/// The generator's traffic in one measurement.
struct Traffic {
    pattern: &'static str,
    sources: u32,
    sport: u16,
    ports: u32,
    first: u64,
}

impl Traffic {
    /// `CLIENT_ADDRS x ports` flows from source port `sport` on.
    fn established(ports: u32, sport: u16) -> Traffic {
        Traffic { pattern: "established", sources: CLIENT_ADDRS, sport, ports, first: 0 }
    }

    /// A new 5-tuple every packet, from packet number `first` of the pattern on.
    fn new_flows(first: u64) -> Traffic {
        Traffic { pattern: "new-flows", sources: NEW_FLOW_ADDRS, sport: 10_000, ports: 1, first }
    }
}

/// The median run by received rate, and the (min, max) received rate over the runs.
fn median_run(runs: &mut [Rate]) -> (&Rate, Option<(f64, f64)>) {
    runs.sort_by(|a, b| a.received_pps.total_cmp(&b.received_pps));
    let spread =
        (runs.len() > 1).then(|| (runs[0].received_pps, runs[runs.len() - 1].received_pps));
    (&runs[runs.len() / 2], spread)
}

/// Writes kube-proxy's input for one endpoint change: (services, changed service, endpoint
/// gone).
type PartialSync = dyn Fn(&[ServicePort], usize, Option<kp::Endpoint>) -> String;

/// Commands run in the node namespace when a kernel mode ends (also on error or interrupt).
struct Cleanup<'a> {
    ns: &'a str,
    cmds: &'a [&'a [&'a str]],
}

const IPTABLES_FLUSH: &[&[&str]] = &[
    &["iptables-legacy", "-t", "nat", "-F"],
    &["iptables-legacy", "-t", "nat", "-X"],
    &["iptables-legacy", "-t", "filter", "-F"],
    &["iptables-legacy", "-t", "filter", "-X"],
];
const NFT_FLUSH: &[&[&str]] = &[&["nft", "delete", "table", "ip", "kube-proxy"]];

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for c in self.cmds {
            let mut v = vec!["ip", "netns", "exec", self.ns];
            v.extend_from_slice(c);
            if let Err(e) = sh(&v) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A control-plane connection to the dataplane: one snapshot, then timed deltas.
struct Control {
    s: std::os::unix::net::UnixStream,
    generation: u64,
}

impl Control {
    fn connect(path: &Path) -> Result<Control, String> {
        let mut s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        match read_frame::<_, ToControl>(&mut s).map_err(|e| e.to_string())? {
            ToControl::Hello { generation, .. } => Ok(Control { s, generation }),
            other => Err(format!("expected hello, got {other:?}")),
        }
    }

    fn send(&mut self, msg: &ToDataplane, generation: u64) -> Result<Duration, String> {
        let t = Instant::now();
        write_frame(&mut self.s, msg).map_err(|e| e.to_string())?;
        match read_frame::<_, ToControl>(&mut self.s).map_err(|e| e.to_string())? {
            ToControl::Ack { generation: g } if g == generation => {
                self.generation = generation;
                Ok(t.elapsed())
            }
            other => Err(format!("expected ack of {generation}, got {other:?}")),
        }
    }

    fn snapshot(&mut self, ports: Vec<PortUpdate>) -> Result<Duration, String> {
        let g = self.generation + 1;
        self.send(&ToDataplane::Snapshot { generation: g, ports }, g)
    }

    /// Time from writing a one-port delta to its ack (the new tables are live then).
    fn delta(&mut self, port: PortUpdate) -> Result<Duration, String> {
        let g = self.generation + 1;
        let msg = ToDataplane::Delta {
            base: self.generation,
            generation: g,
            upserts: vec![port],
            removals: vec![],
        };
        self.send(&msg, g)
    }
}

#[derive(Serialize)]
struct Meta {
    date: String,
    command: String,
    load_before: String,
    load_after: String,
    minutes: f64,
    duration_s: f64,
    repeat: u32,
    size: usize,
    flows: u32,
    interrupted: bool,
    kernel: String,
}

fn find(cells: &[Cell], mode: Mode, n: u32) -> Option<&Cell> {
    cells.iter().find(|c| c.mode == Some(mode) && c.services == n)
}

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.0} k", v / 1e3),
        Some(v) => format!("{v:.0}"),
        None => "—".into(),
    }
}

fn with_spread(v: Option<f64>, spread: Option<(f64, f64)>) -> String {
    match spread {
        Some((lo, hi)) => {
            format!("{} ({}–{})", fmt_rate(v), fmt_rate(Some(lo)), fmt_rate(Some(hi)))
        }
        None => fmt_rate(v),
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1e3),
        Some(v) if v >= 1.0 => format!("{v:.1} ms"),
        Some(v) => format!("{:.0} µs", v * 1e3),
        None => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "—".into(),
    }
}

/// Reads one figure of a cell.
type Metric = fn(&Cell) -> Option<f64>;

fn write_results(
    out: &Path,
    meta: &Meta,
    sizes: &[u32],
    modes: &[Mode],
    cells: &[Cell],
) -> Result<(), String> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let get = |m, n, f: fn(&Cell) -> Option<f64>| find(cells, m, n).and_then(f);
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# kxdp vs raw AF_XDP vs kube-proxy (iptables, nftables)\n");
    let _ = writeln!(
        w,
        "Made by `{}` on {} (kernel {}), {:.1} minutes, load average before {} / after {}{}.\n",
        meta.command,
        meta.date,
        meta.kernel,
        meta.minutes,
        meta.load_before,
        meta.load_after,
        if meta.interrupted { "; INTERRUPTED, partial" } else { "" }
    );
    let _ = writeln!(w, "Generator `kxdp-load send` (AF_XDP, one core) -> node namespace (mode under test, one core) -> backend namespace (`kxdp-load recv`, counting). UDP, {}-byte frames, {} established flows, {} runs of {:.0} s per rate (median shown), rates = frames the receiver counted / seconds the generator sent. Services of 10 endpoints each. IPVS: not measured, this kernel has no IPVS.\n",
        meta.size, meta.flows, meta.repeat, meta.duration_s);
    let metrics: [(&str, Metric, bool); 3] = [
        ("Established-flow packets per second (received)", |c| c.established_pps, true),
        ("New flows per second (every packet a new 5-tuple; received)", |c| c.new_flow_pps, true),
        ("One endpoint change applied (median)", |c| c.change_ms, false),
    ];
    for (title, f, is_rate) in metrics {
        let _ = writeln!(w, "## {title}\n");
        let shown: Vec<Mode> =
            modes.iter().copied().filter(|m| is_rate || *m != Mode::Raw).collect();
        let mut head = String::from("| services |");
        for m in &shown {
            head.push_str(&format!(" {} |", m.label()));
        }
        let peers: Vec<Mode> = shown.iter().copied().filter(|m| *m != Mode::Kxdp).collect();
        for p in &peers {
            head.push_str(&if is_rate {
                format!(" kxdp / {} |", p.label())
            } else {
                format!(" {} / kxdp |", p.label())
            });
        }
        let _ = writeln!(w, "{head}");
        let _ = writeln!(w, "|---:|{}", "---:|".repeat(shown.len() + peers.len()));
        for &n in sizes {
            let mut row = format!("| {n} |");
            for &m in &shown {
                let v = get(m, n, f);
                row.push_str(&format!(" {} |", if is_rate { fmt_rate(v) } else { fmt_ms(v) }));
            }
            for &p in &peers {
                let (k, o) = (get(Mode::Kxdp, n, f), get(p, n, f));
                row.push_str(&format!(" {} |", if is_rate { ratio(k, o) } else { ratio(o, k) }));
            }
            let _ = writeln!(w, "{row}");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "## Details\n");
    let _ = writeln!(w, "| services | mode | sent pps (established) | received: median (min–max) | flows seen | sent pps (new flows) | received: median (min–max) | rules/tables loaded in | notes |");
    let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for c in cells {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.services,
            c.mode.map(Mode::label).unwrap_or("?"),
            fmt_rate(c.established_sent_pps),
            with_spread(c.established_pps, c.established_spread),
            match (c.flows_seen, c.flows) {
                (Some(s), Some(f)) => format!("{s} / {f}"),
                _ => "—".into(),
            },
            fmt_rate(c.new_flow_sent_pps),
            with_spread(c.new_flow_pps, c.new_flow_spread),
            c.load_s.map(|s| format!("{s:.2} s")).unwrap_or("—".into()),
            c.notes.join("; ").replace('\n', " ").replace('|', "/"),
        );
    }
    let _ = writeln!(w);
    let path = out.with_extension("md");
    std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
    let svg = kxdp_benches::chart::compare_svg(
        &format!("kxdp vs kube-proxy, {} ({})", meta.date, meta.command),
        sizes,
        &modes.iter().map(|m| m.label()).collect::<Vec<_>>(),
        &[
            ("established flows: packets/s received", false, &|mi, n| {
                get(modes[mi], n, |c| c.established_pps)
            }),
            ("new flows per second", false, &|mi, n| get(modes[mi], n, |c| c.new_flow_pps)),
            ("one endpoint change: time (log scale, lower is better)", true, &|mi, n| {
                get(modes[mi], n, |c| c.change_ms.map(|m| m / 1e3))
            }),
        ],
    );
    let path = out.with_extension("svg");
    std::fs::write(&path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
    let json = serde_json::json!({ "meta": meta, "cells": cells });
    let path = out.with_extension("json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
