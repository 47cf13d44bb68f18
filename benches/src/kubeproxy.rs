//! kube-proxy-shaped rule sets, for comparing kxdp's update path with kube-proxy's.
//!
//! kube-proxy programs Services by handing the kernel a whole rule set: in iptables mode an
//! `iptables-restore` input piped to `iptables-restore --noflush --counters`, in nftables mode
//! an `nft -f -` transaction. Timing those programs on inputs of the right shape and size is
//! how the kxdp benchmarks put a figure on "what kube-proxy would pay" for the same cluster.
//! This module only writes the text; running it (inside a throw-away network namespace, never
//! on the host's own tables) is the benchmark's business.
//!
//! The shapes follow kube-proxy's proxiers (`pkg/proxy/iptables/proxier.go`,
//! `pkg/proxy/nftables/proxier.go`, Kubernetes 1.30+) for ClusterIP and NodePort services with
//! `Cluster` traffic policies, no session affinity and no `loadBalancerSourceRanges`:
//!
//! - **iptables** ([`iptables_restore`]): `*filter` with kube-proxy's top-level chains and
//!   its `KUBE-FORWARD` / `KUBE-FIREWALL` rules, then `*nat`: chain lines for `KUBE-SERVICES`,
//!   `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ` and every `KUBE-SVC-*`,
//!   `KUBE-EXT-*`, `KUBE-SEP-*`; per service port a `KUBE-SERVICES` rule ("ns/name:port
//!   cluster IP"), a masquerade rule for off-cluster sources, one `-m statistic --mode random
//!   --probability 1/n, 1/(n-1), ...` jump per endpoint (the last unconditional), and per
//!   endpoint the hairpin `-s ip -j KUBE-MARK-MASQ` and the `-j DNAT --to-destination`.
//!   Above [`LARGE_CLUSTER_ENDPOINTS`] endpoints kube-proxy drops the per-endpoint comments
//!   ("large cluster mode"); so does this.
//! - **iptables, partial** ([`iptables_restore_partial`]): since Kubernetes 1.27
//!   (`MinimizeIPTablesRestore`, on by default from then) a sync after a change writes the
//!   top-level chains (all of `KUBE-SERVICES`, one rule per service port) and only the
//!   `KUBE-SVC/EXT/SEP` chains of the changed services. A full sync (the whole rule set)
//!   still happens at start, hourly, and after any failed restore; before 1.27 every sync
//!   was full.
//! - **jumps** ([`iptables_jumps`]): kube-proxy puts `PREROUTING`/`OUTPUT -> KUBE-SERVICES`,
//!   `POSTROUTING -> KUBE-POSTROUTING` and the filter-table hooks in place with `iptables -C`
//!   / `-I` on full syncs, not in the restore input; here they are a separate restore
//!   fragment to apply once.
//! - **nftables** ([`nft_full`], [`nft_partial`]): the knftables transaction of a sync: table
//!   `ip kube-proxy`, its base chains, the `service-ips` verdict map from `ip daddr . meta
//!   l4proto . th dport` to `goto service-<hash>-ns/name/proto/port`, per service chain a
//!   masquerade rule and `numgen random mod N vmap { 0 : goto endpoint-..., ... }`, per
//!   endpoint chain the hairpin rule and `dnat to ip:port`. A partial sync re-creates the
//!   changed service's chains and flushes endpoint chains that went away (kube-proxy deletes
//!   them a second later, in another transaction).
//!
//! Chain names are kube-proxy's: `KUBE-SVC-` + the first 16 base32 characters of
//! sha256("ns/name:port" + "tcp") (and `KUBE-SEP-` likewise with "ip:port" appended); nftables
//! names are `service-` / `endpoint-` + 8 base32 characters of the hash + "-" + the hashed
//! text. SHA-256 is implemented below (checked against FIPS 180-2 vectors and names from real
//! clusters) so that this crate needs no hashing dependency.
//!
//! Left out, because they are a handful of lines whatever the cluster size: the `mangle`
//! table's `KUBE-PROXY-CANARY` chain, the `nfacct` counting rules (which need nfacct objects
//! created beforehand), and the `iptables-save` / `nft list chains` calls kube-proxy makes to
//! find stale chains.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

/// Above this many endpoints kube-proxy (iptables mode) leaves the comments out of the
/// per-endpoint rules to shrink the input (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit 14`).
pub const MASQUERADE_MARK: &str = "0x4000";
/// The pod CIDR of the local-traffic detector (`--cluster-cidr`): traffic from outside it to a
/// ClusterIP is masqueraded. Covers the synthetic endpoints of [`cluster`].
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
/// The Service CIDR (nftables mode drops traffic to unallocated ClusterIPs in it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The node's address, for nftables mode's `nodeport-ips` set (its default
/// `--nodeport-addresses primary`). Fictional.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
/// The nftables table kube-proxy owns.
pub const NFT_TABLE: &str = "ip kube-proxy";

/// L4 protocol of a service port, spelled as kube-proxy spells it in names and rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// `tcp`
    Tcp,
    /// `udp`
    Udp,
}

impl Proto {
    /// Lower-case name, as in `-p tcp` and in the hashed chain names.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One ready endpoint of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address.
    pub ip: Ipv4Addr,
    /// Target port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// A service port as kube-proxy sees it after its change trackers: one `spec.ports[]` entry
/// with its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `metadata.namespace`
    pub namespace: String,
    /// `metadata.name`
    pub name: String,
    /// `spec.ports[].name` (may be empty).
    pub port_name: String,
    /// `spec.ports[].protocol`
    pub proto: Proto,
    /// `spec.clusterIP`
    pub cluster_ip: Ipv4Addr,
    /// `spec.ports[].port`
    pub port: u16,
    /// `spec.ports[].nodePort`, for NodePort services.
    pub node_port: Option<u16>,
    /// Ready endpoints, in kube-proxy's order (sorted by "ip:port" text).
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: "ns/name:port", or "ns/name" for an unnamed
    /// port.
    pub fn name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    fn port_proto_hash(&self) -> String {
        let input = format!("{}{}", self.name_string(), self.proto.as_str());
        hash::base32_prefix(&hash::sha256(input.as_bytes()), 16)
    }

    /// `KUBE-SVC-<hash>`: the Cluster-policy chain.
    pub fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", self.port_proto_hash())
    }

    /// `KUBE-EXT-<hash>`: the chain external (NodePort) traffic goes through.
    pub fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", self.port_proto_hash())
    }

    /// `KUBE-SEP-<hash>`: one endpoint's chain.
    pub fn sep_chain(&self, ep: &Endpoint) -> String {
        let input = format!("{}{}{}", self.name_string(), self.proto.as_str(), ep);
        format!("KUBE-SEP-{}", hash::base32_prefix(&hash::sha256(input.as_bytes()), 16))
    }

    fn nft_base(&self) -> String {
        format!("{}/{}/{}/{}", self.namespace, self.name, self.proto.as_str(), self.port_name)
    }

    /// `service-<hash>-ns/name/proto/port`: the nftables Cluster-policy chain.
    pub fn nft_service_chain(&self) -> String {
        format!("service-{}", hash::hash_and_truncate(&self.nft_base()))
    }

    /// `external-<hash>-ns/name/proto/port`.
    pub fn nft_external_chain(&self) -> String {
        format!("external-{}", hash::hash_and_truncate(&self.nft_base()))
    }

    /// `endpoint-<hash>-ns/name/proto/port__ip/port`.
    pub fn nft_endpoint_chain(&self, ep: &Endpoint) -> String {
        let base = format!("{}__{}/{}", self.nft_base(), ep.ip, ep.port);
        format!("endpoint-{}", hash::hash_and_truncate(&base))
    }

    /// Sorts the endpoints as kube-proxy's endpoint cache does (by "ip:port" text).
    pub fn sort_endpoints(&mut self) {
        self.endpoints.sort_by_cached_key(|e| e.to_string());
    }
}

/// The cluster of `control/benches/compile.rs`: `services` ClusterIP Services `bench/svc-<i>`
/// with one TCP port `http` (80 -> 8080) and `endpoints` ready endpoints each. Same addresses:
/// ClusterIP `10.96.<i/250>.<i%250+1>`, endpoint `n = i*endpoints + e` at
/// `10.<128+n/65536>.<(n/256)%256>.<n%256>`.
pub fn cluster(services: u32, endpoints: u32) -> Vec<ServicePort> {
    (0..services)
        .map(|i| {
            let mut sp = ServicePort {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
                port_name: "http".into(),
                proto: Proto::Tcp,
                cluster_ip: Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8),
                port: 80,
                node_port: None,
                endpoints: (0..endpoints)
                    .map(|e| {
                        let n = i * endpoints + e;
                        Endpoint {
                            ip: Ipv4Addr::new(
                                10,
                                (128 + n / 65_536) as u8,
                                ((n / 256) % 256) as u8,
                                (n % 256) as u8,
                            ),
                            port: 8080,
                        }
                    })
                    .collect(),
            };
            sp.sort_endpoints();
            sp
        })
        .collect()
}

/// The probability kube-proxy writes for the first of `n` remaining endpoints (`%0.10f` of
/// 1/n).
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The whole `iptables-restore` input of a full kube-proxy sync (`*filter` and `*nat`), as
/// piped to `iptables-restore --noflush --counters`.
pub fn iptables_restore(ports: &[ServicePort]) -> String {
    iptables_write(ports, None)
}

/// The input of a partial sync after the service ports at indices `changed` changed: the
/// top-level chains in full, the per-service chains of `changed` only.
pub fn iptables_restore_partial(ports: &[ServicePort], changed: &[usize]) -> String {
    iptables_write(ports, Some(changed))
}

/// The jump rules kube-proxy ensures (with `iptables -I`) from the built-in chains to its own,
/// as one restore fragment (it declares the target chains, which must exist). Apply once to
/// a fresh namespace, before the restores.
pub fn iptables_jumps() -> String {
    let mut s = String::from("*filter\n");
    for c in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let new = "-m conntrack --ctstate NEW ";
    for (src, extra, comment, dst) in [
        ("INPUT", new, "kubernetes externally-visible service portals", "KUBE-EXTERNAL-SERVICES"),
        ("FORWARD", new, "kubernetes externally-visible service portals", "KUBE-EXTERNAL-SERVICES"),
        ("INPUT", "", "kubernetes health check service ports", "KUBE-NODEPORTS"),
        ("FORWARD", new, "kubernetes service portals", "KUBE-SERVICES"),
        ("OUTPUT", new, "kubernetes service portals", "KUBE-SERVICES"),
        ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
        ("INPUT", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
        ("OUTPUT", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
        ("FORWARD", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
    ] {
        let _ = writeln!(s, "-I {src} 1 {extra}-m comment --comment \"{comment}\" -j {dst}");
    }
    s.push_str("-I INPUT 1 -j KUBE-FIREWALL\n-I OUTPUT 1 -j KUBE-FIREWALL\nCOMMIT\n*nat\n");
    for c in ["KUBE-SERVICES", "KUBE-POSTROUTING"] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(concat!(
        "-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-I POSTROUTING 1 -m comment --comment \"kubernetes postrouting rules\" ",
        "-j KUBE-POSTROUTING\n",
        "COMMIT\n",
    ));
    s
}

fn iptables_write(ports: &[ServicePort], changed: Option<&[usize]>) -> String {
    let total: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large = total > LARGE_CLUSTER_ENDPOINTS;
    let m = MASQUERADE_MARK;

    let mut out = String::with_capacity(total * 300 + 4096);
    out.push_str("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // localhostNodePorts (the default) mitigation, then the forwarding rules.
    out.push_str(concat!(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" ",
        "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    ));
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT"
    );
    out.push_str(concat!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" ",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n*nat\n",
    ));

    // kube-proxy writes chain lines and rules into two buffers, chains first.
    let mut chains = String::with_capacity(total * 30 + 1024);
    let mut rules = String::with_capacity(total * 270 + 4096);
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {m}");
    rules.push_str(concat!(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" ",
        "-j MASQUERADE --random-fully\n",
    ));
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {m}");

    for (idx, sp) in ports.iter().enumerate() {
        if sp.endpoints.is_empty() {
            // kube-proxy REJECTs these in the filter table; the benchmarks have none.
            continue;
        }
        let name = sp.name_string();
        let proto = sp.proto.as_str();
        let svc = sp.svc_chain();
        let ext = sp.ext_chain();
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} -j {svc}",
            sp.cluster_ip, sp.port
        );
        if let Some(np) = sp.node_port {
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext}"
            );
        }
        if changed.is_some_and(|c| !c.contains(&idx)) {
            continue;
        }
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            sp.cluster_ip, sp.port
        );
        if sp.node_port.is_some() {
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(rules, "-A {ext} -j {svc}");
        }
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let seps: Vec<String> = sp.endpoints.iter().map(|e| sp.sep_chain(e)).collect();
        let n = sp.endpoints.len();
        for (i, (ep, sep)) in sp.endpoints.iter().zip(&seps).enumerate() {
            let _ = write!(rules, "-A {svc} ");
            if !large {
                let _ = write!(rules, "-m comment --comment \"{name} -> {ep}\" ");
            }
            if i < n - 1 {
                let _ = write!(
                    rules,
                    "-m statistic --mode random --probability {} ",
                    probability(n - i)
                );
            }
            let _ = writeln!(rules, "-j {sep}");
        }
        for (ep, sep) in sp.endpoints.iter().zip(&seps) {
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment =
                if large { String::new() } else { format!("-m comment --comment {name} ") };
            let _ = writeln!(rules, "-A {sep} {comment}-s {} -j KUBE-MARK-MASQ", ep.ip);
            let _ = writeln!(
                rules,
                "-A {sep} {comment}-m {proto} -p {proto} -j DNAT --to-destination {ep}"
            );
        }
    }
    // iptables nodePortAddresses default (all local addresses), localhostNodePorts on.
    rules.push_str(concat!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be ",
        "the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    ));
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// The `nft -f -` transaction of a full kube-proxy (nftables mode) sync after start-up:
/// every chain added and flushed, every set and map flushed and refilled.
pub fn nft_full(ports: &[ServicePort]) -> String {
    let total: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let mut tx = String::with_capacity(total * 330 + 16_384);
    nft_setup(&mut tx);
    for sp in ports {
        nft_service(&mut tx, sp, true);
    }
    tx
}

/// The transaction of a partial sync after the service port `ports[changed]` changed: its
/// chains re-created and refilled, and `stale` endpoint chains (endpoints it no longer has)
/// flushed. Its map elements are unchanged by an endpoint change, so not in the transaction.
pub fn nft_partial(ports: &[ServicePort], changed: usize, stale: &[Endpoint]) -> String {
    let mut tx = String::new();
    let sp = &ports[changed];
    nft_service(&mut tx, sp, false);
    for ep in stale {
        let _ = writeln!(tx, "flush chain {NFT_TABLE} {}", sp.nft_endpoint_chain(ep));
    }
    tx
}

/// A one-element change of the `service-ips` map: the element of `sp` deleted and added back
/// (what kube-proxy does when an element's verdict changes).
pub fn nft_map_element_change(sp: &ServicePort) -> String {
    let key = format!("{} . {} . {}", sp.cluster_ip, sp.proto.as_str(), sp.port);
    format!(
        "delete element {NFT_TABLE} service-ips {{ {key} }}\nadd element {NFT_TABLE} service-ips {{ {key} : goto {} }}\n",
        sp.nft_service_chain()
    )
}

fn nft_setup(tx: &mut String) {
    let t = NFT_TABLE;
    let m = MASQUERADE_MARK;
    let _ = writeln!(tx, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    // kube-proxy asks for "dstnat-10", "dstnat+10", "dstnat" and "srcnat"; nft accepts those
    // names only on the prerouting / postrouting hooks, so they are written as the numbers
    // they stand for (dstnat = -100, srcnat = 100).
    for (name, kind, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        let _ =
            writeln!(tx, "add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}");
        let _ = writeln!(tx, "flush chain {t} {name}");
    }
    let mut created: Vec<&str> = Vec::new();
    let mut ensure = |tx: &mut String, chain: &'static str| {
        if !created.contains(&chain) {
            created.push(chain);
            let _ = writeln!(tx, "add chain {t} {chain}");
            let _ = writeln!(tx, "flush chain {t} {chain}");
        }
    };
    for (dst, src, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        ("cluster-ips-check", "filter-output-post-dnat", "ct state new "),
    ] {
        ensure(tx, dst);
        let _ = writeln!(tx, "add rule {t} {src} {extra}jump {dst}");
    }
    for chain in ["services", "cluster-ips-check", "masquerading", "mark-for-masquerade"] {
        ensure(tx, chain);
    }
    let _ = writeln!(tx, "add rule {t} mark-for-masquerade mark set mark or {m}");
    let _ = writeln!(tx, "add rule {t} masquerading mark and {m} == 0 return");
    let _ = writeln!(tx, "add rule {t} masquerading mark set mark xor {m}");
    let _ = writeln!(tx, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        tx,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        tx,
        "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    let _ = writeln!(
        tx,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(tx, "flush set {t} nodeport-ips");
    let _ = writeln!(tx, "add element {t} nodeport-ips {{ {NODE_IP} }}");
    let _ = writeln!(
        tx,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(tx, "flush chain {t} reject-chain");
    let _ = writeln!(tx, "add rule {t} reject-chain reject");
    let _ = writeln!(
        tx,
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        tx,
        "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        tx,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        tx,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ =
        writeln!(tx, "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips");
    let _ = writeln!(
        tx,
        "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(tx, "flush set {t} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(tx, "flush map {t} {map}");
    }
}

/// One service port's part of a sync: its chains (added and flushed), with `elements` its
/// set/map elements, then its rules.
fn nft_service(tx: &mut String, sp: &ServicePort, elements: bool) {
    if sp.endpoints.is_empty() {
        return;
    }
    let t = NFT_TABLE;
    let proto = sp.proto.as_str();
    let eps: Vec<String> = sp.endpoints.iter().map(|e| sp.nft_endpoint_chain(e)).collect();
    let svc = sp.nft_service_chain();
    let ext = sp.nft_external_chain();
    for c in &eps {
        let _ = writeln!(tx, "add chain {t} {c}\nflush chain {t} {c}");
    }
    let _ = writeln!(tx, "add chain {t} {svc}\nflush chain {t} {svc}");
    if sp.node_port.is_some() {
        let _ = writeln!(tx, "add chain {t} {ext}\nflush chain {t} {ext}");
    }
    if elements {
        let _ = writeln!(tx, "add element {t} cluster-ips {{ {} }}", sp.cluster_ip);
        let _ = writeln!(
            tx,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {svc} }}",
            sp.cluster_ip, sp.port
        );
        if let Some(np) = sp.node_port {
            let _ =
                writeln!(tx, "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}");
        }
    }
    let _ = writeln!(
        tx,
        "add rule {t} {svc} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        sp.cluster_ip, sp.port
    );
    if sp.node_port.is_some() {
        let _ = writeln!(tx, "add rule {t} {ext} jump mark-for-masquerade");
        let _ = writeln!(tx, "add rule {t} {ext} goto {svc}");
    }
    let _ = write!(tx, "add rule {t} {svc} numgen random mod {} vmap {{ ", eps.len());
    for (i, c) in eps.iter().enumerate() {
        let sep = if i + 1 < eps.len() { " ," } else { "" };
        let _ = write!(tx, "{i} : goto {c}{sep} ");
    }
    tx.push_str("}\n");
    for (ep, c) in sp.endpoints.iter().zip(&eps) {
        let _ = writeln!(tx, "add rule {t} {c} ip saddr {} jump mark-for-masquerade", ep.ip);
        let _ = writeln!(tx, "add rule {t} {c} meta l4proto {proto} dnat to {ep}");
    }
}

/// SHA-256 and the base32 prefixes kube-proxy cuts from it.
mod hash {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// SHA-256 (FIPS 180-4) of `data`.
    pub fn sha256(data: &[u8]) -> [u8; 32] {
        let mut h: [u32; 8] = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ];
        let mut msg = data.to_vec();
        msg.push(0x80);
        while msg.len() % 64 != 56 {
            msg.push(0);
        }
        msg.extend_from_slice(&(data.len() as u64 * 8).to_be_bytes());
        for block in msg.chunks_exact(64) {
            let mut w = [0u32; 64];
            for (i, word) in block.chunks_exact(4).enumerate() {
                w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
            for i in 0..64 {
                let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
                let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = s0.wrapping_add(maj);
                hh = g;
                g = f;
                f = e;
                e = d.wrapping_add(t1);
                d = c;
                c = b;
                b = a;
                a = t1.wrapping_add(t2);
            }
            for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
                *x = x.wrapping_add(y);
            }
        }
        let mut out = [0u8; 32];
        for (chunk, x) in out.chunks_exact_mut(4).zip(h) {
            chunk.copy_from_slice(&x.to_be_bytes());
        }
        out
    }

    /// The first `n` characters of the RFC 4648 base32 encoding of `bytes` (Go's
    /// `base32.StdEncoding`), `n` at most 8/5 of the input length.
    pub fn base32_prefix(bytes: &[u8], n: usize) -> String {
        const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        (0..n)
            .map(|i| {
                let bit = i * 5;
                let hi = u16::from(bytes[bit / 8]) << 8;
                let lo = bytes.get(bit / 8 + 1).copied().map_or(0, u16::from);
                let v = ((hi | lo) >> (11 - bit % 8)) & 0x1f;
                char::from(ALPHABET[v as usize])
            })
            .collect()
    }

    /// kube-proxy nftables' `hashAndTruncate`: 8 base32 characters of the hash, "-", the name
    /// (truncated with "..." to 240 characters, which names of valid objects never reach).
    pub fn hash_and_truncate(name: &str) -> String {
        let mut s = format!("{}-{}", base32_prefix(&sha256(name.as_bytes()), 8), name);
        if s.len() > 240 {
            s.truncate(237);
            s.push_str("...");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn port(ns: &str, name: &str, port_name: &str, proto: Proto) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            proto,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 53,
            node_port: None,
            endpoints: vec![],
        }
    }

    #[test]
    fn sha256_matches_fips_vectors() {
        assert_eq!(
            hex(&hash::sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&hash::sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&hash::sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names seen in real clusters / kube-proxy's unit tests.
        assert_eq!(
            port("default", "kubernetes", "https", Proto::Tcp).svc_chain(),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            port("kube-system", "kube-dns", "dns", Proto::Udp).svc_chain(),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            port("kube-system", "kube-dns", "dns-tcp", Proto::Tcp).svc_chain(),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        let p = port("ns1", "svc1", "p80", Proto::Tcp);
        assert_eq!(p.nft_service_chain(), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        let ep = Endpoint { ip: Ipv4Addr::new(10, 180, 0, 1), port: 80 };
        assert_eq!(p.nft_endpoint_chain(&ep), "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80");
        assert_eq!(p.sep_chain(&ep), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        // iptables chain names are at most 28 characters.
        assert_eq!(p.svc_chain().len(), 25);
    }

    #[test]
    fn probabilities_are_formatted_as_kube_proxy_does() {
        assert_eq!(probability(10), "0.1000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(7), "0.1428571429");
    }

    fn lines<'a>(s: &'a str, prefix: &str) -> Vec<&'a str> {
        s.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn iptables_small_cluster_structure() {
        let mut ports = cluster(3, 4);
        ports[1].node_port = Some(30080);
        let r = iptables_restore(&ports);
        let nat = r.split("*nat\n").nth(1).unwrap();
        // 4 top-level chains + per port SVC + 4 SEP, + one EXT.
        assert_eq!(lines(nat, ":").len(), 4 + 3 * 5 + 1);
        assert_eq!(lines(nat, ":KUBE-SEP-").len(), 12);
        // KUBE-SERVICES: one rule per port, then the nodeports rule, last.
        let svcs = lines(nat, "-A KUBE-SERVICES ");
        assert_eq!(svcs.len(), 4);
        assert!(svcs[0].contains("--comment \"bench/svc-0:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KUBE-SVC-"));
        assert!(svcs[3].contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
        assert_eq!(lines(nat, "-A KUBE-NODEPORTS ").len(), 1);
        // Each SVC chain: masquerade rule + 1/4, 1/3, 1/2, unconditional.
        let svc = ports[0].svc_chain();
        let rules = lines(nat, &format!("-A {svc} "));
        assert_eq!(rules.len(), 5);
        assert!(rules[0].ends_with(&format!("! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ")));
        for (r, p) in rules[1..4].iter().zip(["0.2500000000", "0.3333333333", "0.5000000000"]) {
            assert!(
                r.contains(&format!("-m statistic --mode random --probability {p} -j KUBE-SEP-")),
                "{r}"
            );
        }
        assert!(!rules[4].contains("statistic"));
        // Small cluster: per-endpoint comments present.
        let ep = ports[0].endpoints[0];
        assert!(rules[1].contains(&format!("--comment \"bench/svc-0:http -> {ep}\"")));
        let sep = ports[0].sep_chain(&ep);
        let sep_rules = lines(nat, &format!("-A {sep} "));
        assert_eq!(
            sep_rules,
            vec![
                format!("-A {sep} -m comment --comment bench/svc-0:http -s {} -j KUBE-MARK-MASQ", ep.ip).as_str(),
                format!("-A {sep} -m comment --comment bench/svc-0:http -m tcp -p tcp -j DNAT --to-destination {ep}").as_str(),
            ]
        );
        // 3 ports x (1 + 1 + 4 + 8) + nodeport rule + 2 EXT rules + postrouting/masq (4) + final.
        assert_eq!(lines(nat, "-A ").len(), 3 * 14 + 1 + 2 + 4 + 1);
        assert!(r.starts_with("*filter\n") && r.ends_with("COMMIT\n"));
        assert_eq!(r.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn iptables_large_cluster_drops_endpoint_comments() {
        let ports = cluster(200, 10);
        let r = iptables_restore(&ports);
        let nat = r.split("*nat\n").nth(1).unwrap();
        assert_eq!(lines(nat, ":KUBE-SVC-").len(), 200);
        assert_eq!(lines(nat, ":KUBE-SEP-").len(), 2000);
        assert_eq!(lines(nat, "-A KUBE-SEP-").len(), 4000);
        assert!(lines(nat, "-A KUBE-SEP-").iter().all(|l| !l.contains("comment")));
        let jumps: Vec<_> =
            lines(nat, "-A KUBE-SVC-").into_iter().filter(|l| l.contains("-j KUBE-SEP-")).collect();
        assert_eq!(jumps.len(), 2000);
        assert!(jumps.iter().all(|l| !l.contains("comment")));
        assert_eq!(jumps.iter().filter(|l| l.contains("--probability 0.1000000000 ")).count(), 200);
        assert_eq!(jumps.iter().filter(|l| !l.contains("statistic")).count(), 200);
    }

    #[test]
    fn iptables_partial_writes_only_changed_service_chains() {
        let mut ports = cluster(50, 3);
        ports[7].endpoints.remove(1);
        let r = iptables_restore_partial(&ports, &[7]);
        let nat = r.split("*nat\n").nth(1).unwrap();
        assert_eq!(
            lines(nat, ":KUBE-SVC-"),
            vec![format!(":{} - [0:0]", ports[7].svc_chain()).as_str()]
        );
        assert_eq!(lines(nat, ":KUBE-SEP-").len(), 2);
        // KUBE-SERVICES is always written whole.
        assert_eq!(lines(nat, "-A KUBE-SERVICES ").len(), 51);
        assert_eq!(lines(nat, "-A KUBE-SVC-").len(), 1 + 2);
        assert_eq!(
            lines(nat, "-A KUBE-SVC-")[1]
                .split(" --probability ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next(),
            Some("0.5000000000")
        );
        // A full sync with the same change is the whole set.
        let full = iptables_restore(&ports);
        assert_eq!(lines(full.split("*nat\n").nth(1).unwrap(), ":KUBE-SEP-").len(), 149);
    }

    #[test]
    fn iptables_jumps_declare_their_targets() {
        let j = iptables_jumps();
        assert!(j.contains("-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"));
        assert!(j.contains(
            "-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert!(j.contains(":KUBE-POSTROUTING - [0:0]\n"));
        assert_eq!(j.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn nft_structure() {
        let mut ports = cluster(3, 4);
        ports[2].node_port = Some(30053);
        let tx = nft_full(&ports);
        let t = NFT_TABLE;
        assert!(
            tx.starts_with(&format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n"))
        );
        assert_eq!(lines(&tx, &format!("add map {t} service-ips ")).len(), 1);
        assert!(tx.contains(&format!(
            "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n"
        )));
        // Per port: 4 endpoint chains + service chain (+ external chain for the NodePort).
        assert_eq!(lines(&tx, &format!("add chain {t} endpoint-")).len(), 12);
        // (`service-endpoints-check` is kube-proxy's, not a service's.)
        let per_service = |prefix: &str| {
            lines(&tx, &format!("add chain {t} {prefix}"))
                .iter()
                .filter(|l| l.contains("/tcp/"))
                .count()
        };
        assert_eq!(per_service("service-"), 3);
        assert_eq!(per_service("external-"), 1);
        let svc = ports[0].nft_service_chain();
        assert!(svc.starts_with("service-") && svc.ends_with("-bench/svc-0/tcp/http"));
        assert!(tx.contains(&format!(
            "add element {t} service-ips {{ 10.96.0.1 . tcp . 80 : goto {svc} }}\n"
        )));
        assert_eq!(lines(&tx, &format!("add element {t} service-ips ")).len(), 3);
        assert_eq!(lines(&tx, &format!("add element {t} cluster-ips ")).len(), 3);
        assert_eq!(lines(&tx, &format!("add element {t} service-nodeports ")).len(), 1);
        let numgen = lines(&tx, &format!("add rule {t} {svc} numgen "));
        assert_eq!(numgen.len(), 1);
        let eps: Vec<String> =
            ports[0].endpoints.iter().map(|e| ports[0].nft_endpoint_chain(e)).collect();
        assert_eq!(
            numgen[0],
            format!(
                "add rule {t} {svc} numgen random mod 4 vmap {{ 0 : goto {} , 1 : goto {} , 2 : goto {} , 3 : goto {} }}",
                eps[0], eps[1], eps[2], eps[3]
            )
        );
        let ep = ports[0].endpoints[0];
        assert_eq!(
            lines(&tx, &format!("add rule {t} {} ", eps[0])),
            vec![
                format!("add rule {t} {} ip saddr {} jump mark-for-masquerade", eps[0], ep.ip)
                    .as_str(),
                format!("add rule {t} {} meta l4proto tcp dnat to {ep}", eps[0]).as_str(),
            ]
        );
    }

    #[test]
    fn nft_partial_and_element_change() {
        let mut ports = cluster(20, 3);
        let gone = ports[5].endpoints.remove(0);
        let tx = nft_partial(&ports, 5, &[gone]);
        let t = NFT_TABLE;
        assert_eq!(lines(&tx, &format!("add chain {t} endpoint-")).len(), 2);
        assert_eq!(lines(&tx, &format!("add chain {t} service-")).len(), 1);
        assert!(tx.contains("numgen random mod 2 vmap"));
        assert!(!tx.contains("add element"));
        assert_eq!(
            lines(&tx, "flush chain ").last().copied(),
            Some(format!("flush chain {t} {}", ports[5].nft_endpoint_chain(&gone)).as_str())
        );
        let m = nft_map_element_change(&ports[5]);
        assert_eq!(m.lines().count(), 2);
        assert!(
            m.starts_with(&format!("delete element {t} service-ips {{ 10.96.0.6 . tcp . 80 }}\n"))
        );
    }

    #[test]
    fn cluster_matches_the_compile_bench() {
        let ports = cluster(10_000, 10);
        assert_eq!(ports[9_999].cluster_ip, Ipv4Addr::new(10, 96, 39, 250));
        assert_eq!(ports[0].name_string(), "bench/svc-0:http");
        let mut all: Vec<_> = ports.iter().flat_map(|p| p.endpoints.iter().copied()).collect();
        assert_eq!(all.len(), 100_000);
        assert!(all.contains(&Endpoint { ip: Ipv4Addr::new(10, 129, 134, 159), port: 8080 }));
        all.sort_by_key(|e| u32::from(e.ip));
        all.dedup();
        assert_eq!(all.len(), 100_000);
    }
}
