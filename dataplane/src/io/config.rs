//! The node configuration file of the dataplane process (`config/*.yaml`).
//!
//! It names the interfaces the dataplane owns and their role, the queues to bind (default:
//! every receive queue the interface has), the worker cores, what the XDP program steers to
//! the dataplane, and table sizes. Unknown keys are refused, so a typo is an error at start,
//! not a silently ignored setting.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::conntrack::Timeouts;

/// An IPv4 prefix written `a.b.c.d/len` (a bare address means /32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.trim().parse().map_err(|e| format!("bad address in {s:?}: {e}"))?;
        let len: u8 = l.trim().parse().map_err(|e| format!("bad prefix length in {s:?}: {e}"))?;
        if len > 32 {
            return Err(format!("prefix length over 32 in {s:?}"));
        }
        Ok(Cidr { addr, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What an interface is for.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A pod's veth (host side).
    Pod,
    /// An uplink (ENI, NIC).
    Uplink,
}

/// One interface the dataplane owns.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Receive queues to bind (default: all of them).
    #[serde(default)]
    pub queues: Option<Vec<u32>>,
    /// Raw mode only: transmit everything received here out of this interface, untouched.
    #[serde(default)]
    pub raw_forward_to: Option<String>,
    /// Combined channels (queue pairs) to set at start (`ethtool -L combined N`), where the
    /// driver allows; when it does not, the reason is logged and the current count is used.
    #[serde(default)]
    pub channels: Option<u32>,
}

/// Interfaces picked up by name, at start and whenever one appears (a pod's veth, an ENI
/// attached); each is dropped again when it disappears.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfacePattern {
    /// A name pattern: `*` matches any run of characters, `?` one (`cali*`, `veth*`, `eth?`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Role of the interfaces it matches.
    pub role: Role,
    /// Combined channels to set on each (see [`InterfaceConfig::channels`]).
    #[serde(default)]
    pub channels: Option<u32>,
}

impl InterfacePattern {
    /// Whether `name` matches the pattern.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.pattern.as_bytes(), name.as_bytes())
    }
}

/// `*` and `?` glob matching, iterative with one back-tracking point (linear in practice).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// How frames are processed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The full pipeline: Service NAT, conntrack, forwarding.
    #[default]
    Nat,
    /// Receive and transmit unchanged (to `raw_forward_to`): the machine's I/O ceiling.
    Raw,
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Driver (native) mode.
    #[default]
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// What the XDP program steers to the dataplane.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerConfig {
    /// Destination prefixes: the service CIDR, pod CIDRs, node addresses (NodePorts).
    #[serde(default)]
    pub destinations: Vec<Cidr>,
    /// Source prefixes: pod CIDRs, so backend replies and pod traffic come to us.
    #[serde(default)]
    pub sources: Vec<Cidr>,
}

/// Conntrack sizing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Flows per worker.
    pub capacity: usize,
    /// Timeouts (seconds).
    pub timeouts: Timeouts,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self { capacity: 1 << 18, timeouts: Timeouts::default() }
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name (as in the Kubernetes Node object).
    pub node_name: String,
    /// Interfaces owned by the dataplane, by name (each must exist at start).
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
    /// Interfaces owned by the dataplane, by name pattern, picked up and dropped at runtime.
    #[serde(default)]
    pub interface_patterns: Vec<InterfacePattern>,
    /// Worker cores (default: every core). One worker thread per core.
    #[serde(default)]
    pub cores: Vec<usize>,
    /// Cores that take the queues' interrupts instead of the worker cores (empty: each IRQ
    /// goes to the core of its queue's worker).
    #[serde(default)]
    pub housekeeping_cores: Vec<usize>,
    /// Pin each queue's IRQ as the plan says (`/proc/irq/N/smp_affinity_list`).
    #[serde(default = "default_true")]
    pub irq_affinity: bool,
    /// Steering prefixes.
    #[serde(default)]
    pub steer: SteerConfig,
    /// The control socket the control plane connects to.
    #[serde(default = "default_socket")]
    pub control_socket: PathBuf,
    /// The inspect socket `kxdp-inspect` talks to (default: `inspect.sock` next to the
    /// control socket).
    #[serde(default)]
    pub inspect_socket: Option<PathBuf>,
    /// Where Prometheus metrics are served over HTTP (`null`: not served). Loopback by default:
    /// the dataplane runs in the host network, so any other address is reachable from outside.
    #[serde(default = "default_metrics")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Address used to source-NAT (masquerade, hairpin).
    #[serde(default)]
    pub snat_ip: Option<Ipv4Addr>,
    /// Processing mode.
    #[serde(default)]
    pub mode: Mode,
    /// XDP attach mode.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Conntrack sizing.
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    /// UMEM frames (2 KiB each) per socket. A worker whose sockets share one UMEM gets
    /// this many per socket planned for it at start (at least 8 sockets' worth when
    /// `interface_patterns` may bring more at runtime); each socket's fill ring gets an equal
    /// share of the pool (at most `ring_size`), less a reserve kept for copies.
    #[serde(default = "default_frames")]
    pub umem_frames: u32,
    /// Entries in each socket ring (fill, completion, rx, tx); a power of two.
    #[serde(default = "default_ring")]
    pub ring_size: u32,
    /// Let a worker's sockets share one UMEM (`XDP_SHARED_UMEM`), so frames move between
    /// interfaces without a copy. Where the kernel refuses, the socket gets its own UMEM
    /// (logged, counted); `false` gives every socket its own.
    #[serde(default = "default_true")]
    pub share_umem: bool,
    /// Name of the TUN device that hands frames to the kernel (empty: no punting; such frames
    /// are dropped and counted).
    #[serde(default = "default_punt")]
    pub punt_device: String,
    /// After this many empty polls in a row a worker sleeps in poll(2) for up to 1 ms, so idle
    /// workers do not burn a core (0: always busy-poll).
    #[serde(default = "default_idle")]
    pub idle_polls_before_sleep: u32,
}

fn default_true() -> bool {
    true
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/kxdp/control.sock")
}
fn default_metrics() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9964)))
}
fn default_frames() -> u32 {
    4096
}
fn default_ring() -> u32 {
    2048
}
fn default_punt() -> String {
    "kxdp-punt".into()
}
fn default_idle() -> u32 {
    10_000
}

/// Parses a command-line duration: a number with `ms`, `s` (the default) or `m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("invalid configuration {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: serde_yaml::Error,
    },
    /// The content is inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.into(), source },
            e => e,
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: NodeConfig = serde_yaml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: PathBuf::new(), source })?;
        c.check()?;
        Ok(c)
    }

    /// The inspect socket: `inspect_socket`, or `inspect.sock` next to the control socket.
    pub fn inspect_socket_path(&self) -> PathBuf {
        self.inspect_socket
            .clone()
            .unwrap_or_else(|| self.control_socket.with_file_name("inspect.sock"))
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() && self.interface_patterns.is_empty() {
            return Err(ConfigError::Invalid("no interfaces and no interface patterns".into()));
        }
        if self.mode == Mode::Raw && !self.interface_patterns.is_empty() {
            return Err(ConfigError::Invalid(
                "raw mode forwards between named interfaces; interface_patterns are not allowed"
                    .into(),
            ));
        }
        if !self.ring_size.is_power_of_two() || !(64..=32768).contains(&self.ring_size) {
            return Err(ConfigError::Invalid(
                "ring_size must be a power of two from 64 to 32768".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for i in &self.interfaces {
            if !names.insert(i.name.as_str()) {
                return Err(ConfigError::Invalid(format!("interface {} listed twice", i.name)));
            }
        }
        for i in &self.interfaces {
            match (&i.raw_forward_to, self.mode) {
                (Some(to), Mode::Raw) if !names.contains(to.as_str()) => {
                    return Err(ConfigError::Invalid(format!(
                        "{} forwards to {to}, which is not a configured interface",
                        i.name
                    )))
                }
                (None, Mode::Raw) => {
                    return Err(ConfigError::Invalid(format!(
                        "raw mode: interface {} needs raw_forward_to",
                        i.name
                    )))
                }
                _ => {}
            }
        }
        if !self.umem_frames.is_power_of_two() || self.umem_frames < 256 {
            return Err(ConfigError::Invalid(
                "umem_frames must be a power of two, at least 256".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_in_config_parses() {
        let c = NodeConfig::parse(include_str!("../../../config/node.yaml")).unwrap();
        assert_eq!(c.interfaces.len(), 2);
        assert_eq!(c.snat_ip, Some(Ipv4Addr::new(192, 168, 50, 2)));
    }

    #[test]
    fn parses_a_full_file_and_refuses_typos() {
        let c = NodeConfig::parse(
            "node_name: n1\ninterfaces:\n  - {name: eth0, role: uplink}\n  - {name: veth1, role: pod, queues: [0]}\ncores: [0, 1]\nsteer:\n  destinations: [10.96.0.0/12, 192.168.1.2]\n  sources: [10.244.0.0/16]\nconntrack: {capacity: 1024}\n",
        )
        .unwrap();
        assert_eq!(c.interfaces[1].queues, Some(vec![0]));
        assert_eq!(c.steer.destinations[1], Cidr { addr: Ipv4Addr::new(192, 168, 1, 2), len: 32 });
        assert_eq!(c.conntrack.capacity, 1024);
        assert_eq!(c.conntrack.timeouts.udp, 30);
        assert!(NodeConfig::parse(
            "node_name: n\ninterfaces: [{name: a, role: pod}]\ncorse: [1]\n"
        )
        .unwrap_err()
        .to_string()
        .contains("corse"));
        assert!(NodeConfig::parse("node_name: n\ninterfaces: [{name: a, role: pod}]\nsteer: {destinations: [10.0.0.0/33]}\n").is_err());
        assert!(NodeConfig::parse("node_name: n\ninterfaces: [{name: a, role: pod}]\nmode: raw\n")
            .is_err());
    }

    #[test]
    fn interface_patterns_match_names() {
        let c = NodeConfig::parse(
            "node_name: n\ninterface_patterns:\n  - {match: 'cali*', role: pod}\n  - {match: 'eth?', role: uplink, channels: 4}\n",
        )
        .unwrap();
        assert!(c.interfaces.is_empty());
        let (cali, eth) = (&c.interface_patterns[0], &c.interface_patterns[1]);
        assert!(cali.matches("cali1234abcd") && cali.matches("cali"));
        assert!(!cali.matches("xcali1") && !cali.matches("cal"));
        assert!(eth.matches("eth0") && !eth.matches("eth10") && !eth.matches("eth"));
        assert_eq!(eth.channels, Some(4));
        let mid = InterfacePattern { pattern: "v*h*1".into(), role: Role::Pod, channels: None };
        assert!(mid.matches("veth1") && mid.matches("vXhY1") && !mid.matches("veth12"));
        assert!(NodeConfig::parse("node_name: n\n").is_err(), "no interfaces at all");
        assert!(NodeConfig::parse(
            "node_name: n\ninterface_patterns: [{match: 'a*', role: pod}]\nring_size: 100\n"
        )
        .is_err());
    }
}
