//! A readable, deterministic text dump of compiled tables.
//!
//! Used by the golden tests (Kubernetes YAML in, this text out) and by `kxdp-control --dump`.
//! Service ports are listed by id; under each, its frontends sorted by address, then every
//! backend (sorted by id, in any state) with its conditions and whether new flows may pick it
//! (`selectable`, from the dataplane's own [`ServicePort::selectable`] rule).
//!
//! The NetworkPolicy section ([`dump_policy`]) lists every identity with what it stands for,
//! the address ranges, every pod (this node's with their ingress and egress allow sets) and
//! the allow sets, peers shown by identity number.
//!
//! Example:
//!
//! ```text
//! service #1 demo/web:http TCP algorithm=random affinity=none
//!   frontend 10.96.0.10:80/TCP cluster-ip
//!   backend #1 10.200.1.11:8080 weight=1 node=node-1 zone=- ready serving local selectable
//! ```

use std::fmt::Write as _;

use dataplane::tables::{Backend, FrontendKind, ServicePort, Tables};

use crate::compile::{algorithm_name, fmt_key};
use crate::policy::{proto_name, PolicyCompiler};
use crate::skips::Skips;

/// Dumps every service port with its frontends and backends.
pub fn dump(tables: &Tables) -> String {
    let mut out = String::new();
    // Sorted by key, grouped by service (stable: each group stays sorted by key).
    let mut frontends = tables.frontends();
    frontends.sort_by_key(|(_, f)| f.service);
    let mut count = 0usize;
    for svc in tables.services() {
        count += 1;
        dump_port(&mut out, svc);
        let first = frontends.partition_point(|(_, f)| f.service < svc.id());
        let mine = frontends[first..].iter().take_while(|(_, f)| f.service == svc.id());
        for (k, f) in mine {
            let _ = write!(out, "  frontend {} {}", fmt_key(k), kind_name(f.kind));
            if f.masquerade_remote {
                out.push_str(" masquerade-remote");
            }
            out.push('\n');
        }
        let selectable = svc.selectable();
        for (i, b) in svc.backends().iter().enumerate() {
            let sel = selectable.iter().any(|&s| usize::from(s) == i);
            dump_backend(&mut out, b, sel);
        }
    }
    if count == 0 {
        out.push_str("(no service ports)\n");
    }
    out
}

/// [`dump`] followed by the refused-input counters, one per line.
pub fn dump_with_skips(tables: &Tables, skips: &Skips) -> String {
    let mut out = dump(tables);
    if !skips.is_empty() {
        out.push_str("skipped:\n");
        for (reason, n) in skips.iter() {
            let _ = writeln!(out, "  {reason} {n}");
        }
    }
    out
}

fn dump_port(out: &mut String, svc: &ServicePort) {
    let spec = svc.spec();
    let proto = match spec.proto {
        dataplane::tables::Protocol::Tcp => "TCP",
        dataplane::tables::Protocol::Udp => "UDP",
    };
    let _ = write!(
        out,
        "service #{} {} {proto} algorithm={}",
        spec.id,
        spec.name,
        algorithm_name(spec.algorithm)
    );
    if spec.algorithm == dataplane::balance::Algorithm::Maglev {
        let _ = write!(out, " maglev-size={}", spec.maglev_size);
    }
    match spec.affinity_timeout_s {
        Some(t) => {
            let _ = write!(out, " affinity=client-ip/{t}s");
        }
        None => out.push_str(" affinity=none"),
    }
    if svc.backends().is_empty() {
        out.push_str(" (no backends: new flows refused)");
    } else if svc.selectable().is_empty() {
        out.push_str(" (no selectable backend: new flows refused)");
    }
    out.push('\n');
}

fn dump_backend(out: &mut String, b: &Backend, selectable: bool) {
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let _ = write!(
        out,
        "  backend #{} {}:{} weight={} node={} zone={}",
        b.id,
        b.ip,
        b.port,
        b.weight,
        dash(&b.node),
        dash(&b.zone)
    );
    for (on, name) in [(b.ready, "ready"), (b.serving, "serving"), (b.terminating, "terminating")] {
        let _ = write!(out, " {}{name}", if on { "" } else { "!" });
    }
    if b.local {
        out.push_str(" local");
    }
    if selectable {
        out.push_str(" selectable");
    }
    out.push('\n');
}

fn kind_name(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "cluster-ip",
        FrontendKind::NodePort => "node-port",
        FrontendKind::LoadBalancer => "load-balancer",
        FrontendKind::ExternalIp => "external-ip",
    }
}

/// The NetworkPolicy state of `c` (its last update), or nothing when it is empty (no pod, no
/// policy).
pub fn dump_policy(c: &PolicyCompiler) -> String {
    let u = c.update();
    let v = c.view();
    let mut out = String::new();
    if u.endpoints.is_empty() && u.ranges.is_empty() && u.sets.is_empty() {
        return out;
    }
    out.push_str("policy:\n");
    for (id, what) in v.identities.iter().enumerate().skip(1) {
        let _ = writeln!(out, "  identity {id}: {what}");
    }
    // Ranges as intervals, starting with the WORLD space before the first start.
    let mut starts: Vec<(u32, u32)> = Vec::with_capacity(u.ranges.len() + 1);
    if u.ranges.first().is_none_or(|r| u32::from(r.0) != 0) {
        starts.push((0, dataplane::policy::WORLD));
    }
    starts.extend(u.ranges.iter().map(|(a, id)| (u32::from(*a), *id)));
    for (i, (a, id)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(u32::MAX, |n| n.0 - 1);
        let _ = writeln!(
            out,
            "  range {}-{} identity {id}",
            std::net::Ipv4Addr::from(*a),
            std::net::Ipv4Addr::from(end)
        );
    }
    let set_name = |s: u32| {
        if s == dataplane::policy::NOT_ISOLATED {
            "not-isolated".to_string()
        } else {
            format!("set-{s}")
        }
    };
    for (key, ip, node, e) in &v.pods {
        let _ = write!(out, "  pod {key} {ip} identity {} node={}", e.identity, dash(node));
        if !node.is_empty() && node.as_str() == c.node() {
            let _ = write!(out, " ingress={} egress={}", set_name(e.ingress), set_name(e.egress));
        } else {
            out.push_str(" (remote)");
        }
        out.push('\n');
    }
    let ports = |r: &[(u16, u16)]| {
        r.iter()
            .map(|(a, b)| match (a, b) {
                (0, 65535) => "all".to_string(),
                (a, b) if a == b => a.to_string(),
                (a, b) => format!("{a}-{b}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    for (i, s) in u.sets.iter().enumerate() {
        let _ = writeln!(out, "  set-{}:", i + 1);
        if s.peers.is_empty() && s.any_peer.is_empty() {
            out.push_str("    (nothing allowed)\n");
        }
        // Each peer's entries, with "every protocol" (a rule without ports) folded into one.
        type Entries<'a> = Vec<(u8, &'a [(u16, u16)])>;
        let mut lines: Vec<(String, Entries)> = Vec::new();
        lines.push(("any peer".into(), s.any_peer.iter().map(|(p, r)| (*p, &r[..])).collect()));
        for (id, p, r) in &s.peers {
            let who = format!("identity {id}");
            match lines.last_mut() {
                Some((w, v)) if *w == who => v.push((*p, r)),
                _ => lines.push((who, vec![(*p, r)])),
            }
        }
        for (who, entries) in lines {
            let every = entries.len() == 4 && entries.iter().all(|(_, r)| *r == [(0, 65535)]);
            if every {
                let _ = writeln!(out, "    {who} every protocol and port");
                continue;
            }
            for (p, r) in entries {
                let _ = writeln!(out, "    {who} {} {}", proto_name(p), ports(r));
            }
        }
    }
    out
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}
