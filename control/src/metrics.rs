//! Prometheus metrics of kxdp-control (`--metrics-address`): the API watch state and the
//! publication to the dataplane, read at scrape time. Served by the dataplane crate's small
//! HTTP server ([`dataplane::io::metrics::MetricsServer`]).

use std::sync::{Arc, Mutex};

use dataplane::io::metrics::{family, Rows};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::publish::PublishStatus;
use crate::source::kube::WatchStats;

/// What the control plane's metrics read.
#[derive(Debug)]
pub struct ControlCollector {
    /// The API watchers' counters (`None` for a manifest source).
    pub watch: Option<Arc<WatchStats>>,
    /// The publisher's status.
    pub publish: Arc<Mutex<PublishStatus>>,
}

impl Collector for ControlCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let one = |v: u64| Rows(vec![(Vec::new(), v as f64)]);
        let c = MetricType::Counter;
        if let Some(w) = &self.watch {
            let get = WatchStats::get;
            family(
                &mut enc,
                "kxdp_control_watch_lists",
                "Complete API lists (initial and re-lists).",
                c,
                one(get(&w.lists)),
            )?;
            family(
                &mut enc,
                "kxdp_control_watch_errors",
                "API watch or list errors (each retried with backoff).",
                c,
                one(get(&w.errors)),
            )?;
            family(
                &mut enc,
                "kxdp_control_watch_bad_deletes",
                "Deleted objects without a usable key.",
                c,
                one(get(&w.bad_deletes)),
            )?;
        }
        let p = self.publish.lock().map(|s| s.clone()).unwrap_or_default();
        let g = MetricType::Gauge;
        family(
            &mut enc,
            "kxdp_control_dataplane_connected",
            "1 while connected to the dataplane's control socket.",
            g,
            one(u64::from(p.connected)),
        )?;
        family(
            &mut enc,
            "kxdp_control_acked_generation",
            "Last generation the dataplane acknowledged.",
            g,
            one(p.acked.map_or(0, |a| a.1)),
        )?;
        family(
            &mut enc,
            "kxdp_control_dataplane_connections",
            "Connections made to the dataplane.",
            c,
            one(p.connections),
        )?;
        let acks = [("snapshot", p.snapshots), ("delta", p.deltas), ("policy", p.policies)];
        family(
            &mut enc,
            "kxdp_control_publish_acks",
            "Updates the dataplane acknowledged, by kind.",
            c,
            Rows(acks.iter().map(|(k, v)| (vec![("kind", k.to_string())], *v as f64)).collect()),
        )?;
        family(
            &mut enc,
            "kxdp_control_publish_errors",
            "Error replies from the dataplane.",
            c,
            one(p.errors),
        )?;
        Ok(())
    }
}

/// A registry holding the control plane's collector.
pub fn registry(c: ControlCollector) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(c));
    r
}
