//! A readable, deterministic text dump of compiled tables.
//!
//! Used by the golden tests (Kubernetes YAML in, this text out) and by `kxdp-control --dump`.
//! Service ports are listed by id; under each, its frontends sorted by address, then every
//! backend (sorted by id, in any state) with its conditions and whether new flows may pick it
//! (`selectable`, from the dataplane's own [`ServicePort::selectable`] rule).
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
