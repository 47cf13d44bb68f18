//! Network-namespace test harness: a node namespace with pod namespaces on veth pairs, the
//! dataplane running on the node's interfaces, and real servers in the pods.
//!
//! Every address lives inside namespaces this harness creates; traffic goes only to them.
//! Every namespace is deleted when its [`Netns`] guard drops (also on panic), and every
//! process the harness starts is stopped when its guard drops. Loops are bounded in count and
//! time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether privileged tests can run here (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, failing with its output when it fails.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates a namespace (deleting a stale one of the same name first).
    pub fn new(name: &str) -> Result<Netns, String> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
    /// `ip -n NAME ...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
    /// `ip netns exec NAME ...`.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
    /// Runs `f` on a thread inside this namespace (sockets it creates belong here).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, String>> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
    }
    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        self.spawn(f).join().map_err(|_| "thread panicked".to_string())?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A pod: its namespace, address and the node-side veth.
pub struct Pod {
    /// Namespace.
    pub ns: Netns,
    /// Address.
    pub ip: Ipv4Addr,
    /// Node-side interface name.
    pub host_if: String,
}

/// The link-local gateway pods route through (Calico style).
pub const GATEWAY: &str = "169.254.1.1";

/// A node namespace with pods.
pub struct Topology {
    /// Pods (client first).
    pub pods: Vec<Pod>,
    /// The node.
    pub node: Netns,
    /// Scratch directory (config, sockets, stats).
    pub dir: PathBuf,
}

impl Topology {
    /// Builds a node and one pod per address, each on its own veth pair. `tag` keeps names
    /// unique between concurrent runs.
    pub fn build(tag: &str, pod_ips: &[Ipv4Addr]) -> Result<Topology, String> {
        Self::build_with(tag, pod_ips, 1)
    }

    /// [`Topology::build`] with `queues` receive and transmit queues on both ends of every
    /// veth.
    pub fn build_with(tag: &str, pod_ips: &[Ipv4Addr], queues: u32) -> Result<Topology, String> {
        let node = Netns::new(&format!("kxdp-{tag}-node"))?;
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let dir = std::env::temp_dir().join(format!("kxdp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut topo = Topology { pods: Vec::new(), node, dir };
        for ip in pod_ips {
            topo.add_pod(tag, *ip, queues)?;
        }
        Ok(topo)
    }

    /// Adds a pod (namespace `kxdp-TAG-pN`, node-side veth `kxTAGN`) with `queues` queues on
    /// both ends of its veth, as a CNI plugin would: veth, address, routes both ways.
    pub fn add_pod(&mut self, tag: &str, ip: Ipv4Addr, queues: u32) -> Result<&Pod, String> {
        let i = self.pods.len();
        let node = &self.node;
        let ns = Netns::new(&format!("kxdp-{tag}-p{i}"))?;
        let host_if = format!("kx{tag}{i}");
        let host_if = host_if.chars().take(15).collect::<String>();
        let q = queues.max(1).to_string();
        node.ip(&[
            "link",
            "add",
            &host_if,
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "netns",
            &ns.name,
        ])?;
        node.ip(&["link", "set", &host_if, "up"])?;
        let mac = node.ip(&["-br", "link", "show", &host_if])?;
        let mac = mac.split_whitespace().nth(2).ok_or("no MAC")?.to_string();
        let cidr = format!("{ip}/32");
        ns.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        // A pod's veth hands the kernel's packets over with the L4 checksum left for the
        // device to finish (CHECKSUM_PARTIAL); a frame redirected to AF_XDP carries no such
        // note, so the pod must send complete checksums (as with DPDK or AF_XDP on veth).
        ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        ns.ip(&["neigh", "add", GATEWAY, "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
        ns.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink"])?;
        node.ip(&["route", "add", &ip.to_string(), "dev", &host_if])?;
        self.pods.push(Pod { ns, ip, host_if });
        Ok(&self.pods[i])
    }

    /// Lets the node's kernel learn every pod's MAC (as it would by forwarding to it), so
    /// the dataplane has next hops from the start.
    pub fn resolve_neighbours(&self) -> Result<(), String> {
        for p in &self.pods {
            let _ = self.node.exec(&[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                &p.host_if,
                &p.ip.to_string(),
            ]);
        }
        Ok(())
    }
}

/// A child process stopped with SIGTERM (then SIGKILL) on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `args` inside `ns`, logging to `log`.
    pub fn start(ns: &Netns, args: &[&str], log: &Path) -> Result<Proc, String> {
        let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", args.join(" ")))?;
        Ok(Proc { child, log: log.into() })
    }
    /// Stops it (SIGTERM, up to 20 s, then SIGKILL); returns whether it exited by itself.
    /// (Closing AF_XDP sockets and detaching XDP wait for RCU and the rtnl lock, which take
    /// seconds when other tests create and delete namespaces at the same time.)
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            self.stop();
        }
    }
}

/// Path of a workspace binary (built by cargo before the tests run).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    dir.join(name)
}

/// Waits until `f` is true, up to `timeout`.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A server running in a pod until dropped; counts what it served.
pub struct Server {
    /// Requests served.
    pub served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// An HTTP/1.1 server on `0.0.0.0:port` in `pod` answering `backend <ip>` to every request.
pub fn http_server(pod: &Pod, port: u16) -> Result<Server, String> {
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2, ip) = (served.clone(), stop.clone(), pod.ip);
    let (tx, rx) = std::sync::mpsc::channel();
    pod.ns.spawn(move || {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        l.set_nonblocking(true).ok();
        let _ = tx.send(Ok(()));
        while !st2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).ok();
                    c.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut r = BufReader::new(c.try_clone().expect("clone"));
                    let mut line = String::new();
                    // Read the request head.
                    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        if line == "\r\n" || line == "\n" {
                            break;
                        }
                        line.clear();
                    }
                    let body = format!("backend {ip}\n");
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    s2.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())??;
    Ok(Server { served, stop })
}

/// A UDP echo server on `0.0.0.0:port` in `pod`: answers `<ip> <payload>`.
pub fn udp_echo(pod: &Pod, port: u16) -> Result<Server, String> {
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2, ip) = (served.clone(), stop.clone(), pod.ip);
    let (tx, rx) = std::sync::mpsc::channel();
    pod.ns.spawn(move || {
        let s = match UdpSocket::bind(("0.0.0.0", port)) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(50))).ok();
        let _ = tx.send(Ok(()));
        let mut buf = [0u8; 2048];
        while !st2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut out = format!("{ip} ").into_bytes();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, from);
                s2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())??;
    Ok(Server { served, stop })
}

/// Sends `count` UDP requests from `pod` to `to`, each from a new socket (so a new flow),
/// and returns the (replying address, first word of the reply) of each answered one.
pub fn udp_requests(
    pod: &Pod,
    to: SocketAddr,
    count: usize,
) -> Result<Vec<(SocketAddr, String)>, String> {
    pod.ns.run(move || {
        let mut out = Vec::new();
        for i in 0..count {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { continue };
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            if s.send_to(format!("ping {i}").as_bytes(), to).is_err() {
                continue;
            }
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                out.push((from, text.split_whitespace().next().unwrap_or("").to_string()));
            }
        }
        out
    })
}

/// One HTTP GET with curl from `pod`; returns the body or curl's error.
pub fn curl(pod: &Pod, url: &str) -> Result<String, String> {
    pod.ns.exec(&["curl", "-sS", "--max-time", "3", url])
}

/// A connected UDP socket's error after sending one datagram (e.g. ECONNREFUSED from an ICMP
/// port unreachable), or the reply.
pub fn udp_probe(pod: &Pod, to: SocketAddr) -> Result<Result<String, std::io::ErrorKind>, String> {
    pod.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        let _ = s.send(b"probe");
        let mut buf = [0u8; 512];
        match s.recv(&mut buf) {
            Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => Err(e.kind()),
        }
    })
}

/// Reads a TCP stream to the end (bounded by its timeout).
pub fn read_all(s: &mut impl Read) -> String {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    String::from_utf8_lossy(&v).into_owned()
}

/// The demo's services as dataplane service ports (what `config/demo/` compiles to), for
/// tests that feed the dataplane directly instead of through the control plane.
pub fn demo_ports() -> Vec<dataplane::sync::PortUpdate> {
    use dataplane::balance::Algorithm;
    use dataplane::sync::{FrontendEntry, PortUpdate};
    use dataplane::tables::{Backend, FrontendKind, Protocol, ServiceSpec};
    let port = |id: u32,
                name: &str,
                proto,
                affinity,
                vip: [u8; 4],
                vport,
                backends: &[(u32, [u8; 4], u16)]| PortUpdate {
        spec: ServiceSpec {
            id,
            name: name.into(),
            proto,
            algorithm: Algorithm::Random,
            affinity_timeout_s: affinity,
            maglev_size: dataplane::tables::DEFAULT_MAGLEV_SIZE,
        },
        backends: backends
            .iter()
            .map(|&(bid, ip, p)| Backend::ready(bid, Ipv4Addr::from(ip), p))
            .collect(),
        frontends: vec![FrontendEntry {
            ip: Ipv4Addr::from(vip),
            port: vport,
            kind: FrontendKind::ClusterIp,
            masquerade_remote: false,
        }],
    };
    vec![
        port(
            1,
            "demo/web:http",
            Protocol::Tcp,
            None,
            [10, 96, 0, 10],
            80,
            &[
                (1, [10, 200, 1, 11], 8080),
                (2, [10, 200, 1, 12], 8080),
                (3, [10, 200, 1, 13], 8080),
            ],
        ),
        port(
            2,
            "demo/echo:echo",
            Protocol::Udp,
            None,
            [10, 96, 0, 20],
            5353,
            &[(4, [10, 200, 1, 21], 5353), (5, [10, 200, 1, 22], 5353)],
        ),
        port(
            3,
            "demo/sticky:http",
            Protocol::Tcp,
            Some(600),
            [10, 96, 0, 30],
            80,
            &[(6, [10, 200, 1, 31], 8080), (7, [10, 200, 1, 32], 8080)],
        ),
        port(4, "demo/idle:http", Protocol::Tcp, None, [10, 96, 0, 40], 80, &[]),
    ]
}

/// Sends a snapshot to a dataplane's control socket and waits for its acknowledgement.
pub fn push_snapshot(
    socket: &Path,
    generation: u64,
    ports: Vec<dataplane::sync::PortUpdate>,
) -> Result<(), String> {
    push(socket, dataplane::sync::ToDataplane::Snapshot { generation, ports }, generation)
}

/// Sends NetworkPolicy tables (on top of `base`) and waits for their acknowledgement.
pub fn push_policy(
    socket: &Path,
    base: u64,
    generation: u64,
    policy: dataplane::policy::PolicyUpdate,
) -> Result<(), String> {
    push(socket, dataplane::sync::ToDataplane::Policy { base, generation, policy }, generation)
}

/// Sends one message on a new control connection and waits for the ack of `generation`.
fn push(socket: &Path, msg: dataplane::sync::ToDataplane, generation: u64) -> Result<(), String> {
    use dataplane::sync::{read_frame, write_frame, ToControl};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    // Generous: under a loaded machine the dataplane may take seconds to apply and answer.
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let hello: ToControl = read_frame(&mut s).map_err(|e| e.to_string())?;
    if !matches!(hello, ToControl::Hello { .. }) {
        return Err(format!("expected hello, got {hello:?}"));
    }
    write_frame(&mut s, &msg).map_err(|e| e.to_string())?;
    match read_frame::<_, ToControl>(&mut s).map_err(|e| e.to_string())? {
        ToControl::Ack { generation: g } if g == generation => Ok(()),
        other => Err(format!("expected ack of {generation}, got {other:?}")),
    }
}

/// The demo topology (a client pod and the backends of [`DEMO_PODS`]) with neighbours
/// resolved, UDP echo servers on port 5353 of the echo backends and HTTP servers on port 8080
/// of the others, serving until dropped.
pub fn demo_topology(tag: &str) -> Result<(Topology, Vec<Server>), String> {
    let pods: Vec<Ipv4Addr> = DEMO_PODS.iter().map(|a| Ipv4Addr::from(*a)).collect();
    let topo = Topology::build(tag, &pods)?;
    topo.resolve_neighbours()?;
    let mut servers = Vec::new();
    for b in &topo.pods[1..] {
        if b.ip.octets()[3] / 10 == 2 {
            servers.push(udp_echo(b, 5353)?);
        } else {
            servers.push(http_server(b, 8080)?);
        }
    }
    Ok((topo, servers))
}

/// Demo addresses: the client pod first, then the backends of web, echo and sticky.
pub const DEMO_PODS: [[u8; 4]; 8] = [
    [10, 200, 0, 2],
    [10, 200, 1, 11],
    [10, 200, 1, 12],
    [10, 200, 1, 13],
    [10, 200, 1, 21],
    [10, 200, 1, 22],
    [10, 200, 1, 31],
    [10, 200, 1, 32],
];

/// Writes the dataplane configuration for a topology: every node-side veth a pod interface.
pub fn write_node_config(topo: &Topology, cores: &[usize]) -> Result<(PathBuf, PathBuf), String> {
    let socket = topo.dir.join("control.sock");
    let ifaces: Vec<String> =
        topo.pods.iter().map(|p| format!("  - {{name: {}, role: pod}}", p.host_if)).collect();
    let text = format!(
        "node_name: node-1\ninterfaces:\n{}\ncores: [{}]\nsteer:\n  destinations: [10.96.0.0/16, 10.200.0.0/16]\n  sources: [10.200.0.0/16]\ncontrol_socket: {}\nconntrack: {{capacity: 65536}}\numem_frames: 4096\npunt_device: kxp{}\nidle_polls_before_sleep: 2000\n",
        ifaces.join("\n"),
        cores.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
        socket.display(),
        std::process::id() % 100000,
    );
    let path = topo.dir.join("node.yaml");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok((path, socket))
}

/// The dataplane's JSON report.
pub fn read_stats(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Starts `kxdp-dataplane` in the node namespace with configuration `cfg`, writing its stats
/// to `stats` every 200 ms and its log to `log_name` in the scratch directory, and waits until
/// it reports (up to 20 s).
pub fn start_dataplane(
    topo: &Topology,
    cfg: &Path,
    stats: &Path,
    log_name: &str,
) -> Result<Proc, String> {
    let bin = binary("kxdp-dataplane");
    let _ = std::fs::remove_file(stats);
    let (b, c, st) = (bin.to_string_lossy(), cfg.to_string_lossy(), stats.to_string_lossy());
    let args = [
        b.as_ref(),
        "--config",
        c.as_ref(),
        "--stats-file",
        st.as_ref(),
        "--stats-interval",
        "200ms",
    ];
    let dp = Proc::start(&topo.node, &args, &topo.dir.join(log_name))?;
    if !wait_for(Duration::from_secs(20), || read_stats(stats).is_some()) {
        return Err(format!("the dataplane did not start:\n{}", dp.log()));
    }
    Ok(dp)
}

/// Sends UDP requests from `pod` to `to` one after another (a new socket, so a new flow, for
/// each), each waiting up to 300 ms for its answer, until `stop` is set or `limit` requests
/// were sent; returns (sent, answered).
pub fn udp_load(
    pod: &Pod,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    limit: u64,
) -> std::thread::JoinHandle<Result<(u64, u64), String>> {
    pod.ns.spawn(move || {
        let (mut sent, mut answered) = (0u64, 0u64);
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) && sent < limit {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { continue };
            s.set_read_timeout(Some(Duration::from_millis(300))).ok();
            if s.send_to(b"load", to).is_err() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            sent += 1;
            if s.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        (sent, answered)
    })
}

/// Frames received per (interface, queue), summed over workers, from a stats report.
pub fn rx_by_queue(report: &serde_json::Value) -> std::collections::BTreeMap<(String, u64), u64> {
    let mut out = std::collections::BTreeMap::new();
    for w in report["workers"].as_array().into_iter().flatten() {
        for p in w["ports"].as_array().into_iter().flatten() {
            let key =
                (p["iface"].as_str().unwrap_or("").to_string(), p["queue"].as_u64().unwrap_or(0));
            *out.entry(key).or_insert(0) += p["rx"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// Whether every UMEM pool of every worker accounts for each of its frames exactly once and
/// saw no frame in the wrong place; the pools' descriptions otherwise.
pub fn pools_consistent(report: &serde_json::Value) -> Result<usize, String> {
    let mut n = 0;
    for w in report["workers"].as_array().into_iter().flatten() {
        for p in w["pools"].as_array().into_iter().flatten() {
            n += 1;
            if p["consistent"] != serde_json::Value::Bool(true)
                || p["anomalies"].as_u64() != Some(0)
            {
                return Err(format!("worker {}: pool {p}", w["id"]));
            }
        }
    }
    Ok(n)
}
