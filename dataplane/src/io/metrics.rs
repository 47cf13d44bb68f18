//! Prometheus metrics over HTTP (`GET /metrics`), from the same sources as the inspect socket.
//!
//! Everything is read at scrape time ([`Collector`]): the counters each worker publishes every
//! ~100 ms, the per-backend traffic each worker reports through its request channel, the live
//! tables and the sync server's state. Nothing is added to the packet path. The server is a
//! plain `TcpListener` thread answering one request per connection; it binds loopback by
//! default (the dataplane runs in the host network namespace, so any other address is
//! reachable from outside the node).
//!
//! Names follow Prometheus conventions: a `kxdp_` prefix, base units (bytes, seconds),
//! `_total` on counters, labels for the dimensions (`worker`, `reason`, `service`, `backend`,
//! `direction`, `interface`, `queue`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::inspect::Context;

/// A sample's labels.
pub type Labels = Vec<(&'static str, String)>;

/// A family of metrics of one name: (labels, value) rows.
pub struct Rows(pub Vec<(Labels, f64)>);

/// Encodes one metric family of counters or gauges (a single row without labels is written
/// bare). Counters get Prometheus' `_total` suffix from the encoder.
pub fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Rows,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    fn value(e: MetricEncoder<'_>, kind: MetricType, v: f64) -> Result<(), std::fmt::Error> {
        match kind {
            MetricType::Counter => ConstCounter::new(v as u64).encode(e),
            _ => ConstGauge::new(v).encode(e),
        }
    }
    match rows.0.as_slice() {
        // A metric without labels is written bare (`name value`, not `name{} value`).
        [(labels, v)] if labels.is_empty() => value(m, kind, *v)?,
        rows => {
            for (labels, v) in rows {
                value(m.encode_family(labels)?, kind, *v)?;
            }
        }
    }
    Ok(())
}

/// The dataplane's metrics, gathered at each scrape.
#[derive(Clone)]
pub struct DataplaneCollector(pub Arc<Context>);

impl std::fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataplaneCollector")
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ctx = &self.0;
        let st = ctx.status();
        let one = |v: f64| Rows(vec![(Vec::new(), v)]);
        family(
            &mut enc,
            "kxdp_table_generation",
            "Live table generation.",
            MetricType::Gauge,
            one(st.generation as f64),
        )?;
        family(
            &mut enc,
            "kxdp_services",
            "Service ports in the live tables.",
            MetricType::Gauge,
            one(st.services as f64),
        )?;
        family(
            &mut enc,
            "kxdp_control_connected",
            "Control-plane connections open (1 when kxdp-control is connected).",
            MetricType::Gauge,
            one(st.control.connected as f64),
        )?;
        family(
            &mut enc,
            "kxdp_control_generation",
            "Last control generation applied.",
            MetricType::Gauge,
            one(st.control.generation as f64),
        )?;
        let c = &st.control;
        let msgs = [
            ("snapshot", c.snapshots),
            ("delta", c.deltas),
            ("refused", c.refused),
            ("malformed", c.malformed),
        ];
        family(
            &mut enc,
            "kxdp_control_messages",
            "Control messages received, by result.",
            MetricType::Counter,
            Rows(msgs.iter().map(|(k, v)| (vec![("result", k.to_string())], *v as f64)).collect()),
        )?;
        family(
            &mut enc,
            "kxdp_control_connections",
            "Control connections accepted.",
            MetricType::Counter,
            one(c.connections as f64),
        )?;
        {
            let stats = ctx.applier.lock().stats().clone();
            let (sum, count, buckets) = stats.apply_latency.snapshot();
            let mut m = enc.encode_descriptor(
                "kxdp_control_update_duration_seconds",
                "Time from a control message received to its tables live.",
                None,
                MetricType::Histogram,
            )?;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
        }
        if let Ok(workers) = ctx.workers() {
            let w = |id: usize| ("worker", id.to_string());
            let mut rx = Vec::new();
            let mut tx = Vec::new();
            let mut drops = Vec::new();
            let mut passes = Vec::new();
            let mut events = Vec::new();
            let mut io = Vec::new();
            let mut flows = Vec::new();
            let mut evictions = Vec::new();
            let mut queues: Vec<(&str, Vec<(Labels, f64)>)> = vec![
                ("kxdp_xsk_rx_dropped", Vec::new()),
                ("kxdp_xsk_rx_invalid_descs", Vec::new()),
                ("kxdp_xsk_tx_invalid_descs", Vec::new()),
                ("kxdp_xsk_rx_ring_full", Vec::new()),
                ("kxdp_xsk_rx_fill_ring_empty", Vec::new()),
                ("kxdp_xsk_tx_ring_empty", Vec::new()),
            ];
            for x in &workers {
                rx.push((vec![w(x.id)], x.rx as f64));
                tx.push((vec![w(x.id)], x.tx as f64));
                for (r, v) in &x.drops {
                    drops.push((vec![w(x.id), ("reason", r.clone())], *v as f64));
                }
                for (r, v) in &x.passes {
                    passes.push((vec![w(x.id), ("reason", r.clone())], *v as f64));
                }
                for (r, v) in &x.pipeline {
                    events.push((vec![w(x.id), ("event", r.clone())], *v as f64));
                }
                for (r, v) in &x.io {
                    io.push((vec![w(x.id), ("event", r.clone())], *v as f64));
                }
                flows.push((vec![w(x.id)], x.flows as f64));
                evictions.push((vec![w(x.id)], x.evictions as f64));
                for q in &x.queues {
                    let l = vec![
                        w(x.id),
                        ("interface", q.iface.clone()),
                        ("queue", q.queue.to_string()),
                    ];
                    let vals = [
                        q.rx_dropped,
                        q.rx_invalid_descs,
                        q.tx_invalid_descs,
                        q.rx_ring_full,
                        q.rx_fill_ring_empty,
                        q.tx_ring_empty,
                    ];
                    for (slot, v) in queues.iter_mut().zip(vals) {
                        slot.1.push((l.clone(), v as f64));
                    }
                }
            }
            let c = MetricType::Counter;
            family(
                &mut enc,
                "kxdp_worker_rx_packets",
                "Frames received by the pipeline.",
                c,
                Rows(rx),
            )?;
            family(
                &mut enc,
                "kxdp_worker_tx_packets",
                "Frames the pipeline sent out of an interface.",
                c,
                Rows(tx),
            )?;
            family(
                &mut enc,
                "kxdp_worker_dropped_packets",
                "Frames dropped, by reason.",
                c,
                Rows(drops),
            )?;
            family(
                &mut enc,
                "kxdp_worker_kernel_packets",
                "Frames handed to the kernel, by reason.",
                c,
                Rows(passes),
            )?;
            family(
                &mut enc,
                "kxdp_worker_pipeline_events",
                "Pipeline events (new flows, translations, rejects, ...).",
                c,
                Rows(events),
            )?;
            family(
                &mut enc,
                "kxdp_worker_io_packets",
                "Worker I/O (transmitted, handed off, tx drops, punts).",
                c,
                Rows(io),
            )?;
            family(
                &mut enc,
                "kxdp_conntrack_entries",
                "Live conntrack entries.",
                MetricType::Gauge,
                Rows(flows),
            )?;
            family(
                &mut enc,
                "kxdp_conntrack_evictions",
                "Conntrack entries evicted to make room for new flows (table or index buckets full).",
                c,
                Rows(evictions),
            )?;
            for (name, rows) in queues {
                family(&mut enc, name, "AF_XDP socket statistics from the kernel.", c, Rows(rows))?;
            }
        }
        if let Ok(services) = ctx.services() {
            let mut pk = Vec::new();
            let mut by = Vec::new();
            let mut conns = Vec::new();
            let mut active = Vec::new();
            let mut spk = Vec::new();
            let mut sby = Vec::new();
            let mut sconns = Vec::new();
            for s in &services {
                let sl = || vec![("service", s.name.clone())];
                spk.push((with(sl(), "direction", "in"), s.traffic.packets_in as f64));
                spk.push((with(sl(), "direction", "out"), s.traffic.packets_out as f64));
                sby.push((with(sl(), "direction", "in"), s.traffic.bytes_in as f64));
                sby.push((with(sl(), "direction", "out"), s.traffic.bytes_out as f64));
                sconns.push((sl(), s.traffic.conns as f64));
                for b in &s.backends {
                    let bl = || {
                        vec![
                            ("service", s.name.clone()),
                            ("backend", format!("{}:{}", b.ip, b.port)),
                        ]
                    };
                    pk.push((with(bl(), "direction", "in"), b.traffic.packets_in as f64));
                    pk.push((with(bl(), "direction", "out"), b.traffic.packets_out as f64));
                    by.push((with(bl(), "direction", "in"), b.traffic.bytes_in as f64));
                    by.push((with(bl(), "direction", "out"), b.traffic.bytes_out as f64));
                    conns.push((bl(), b.traffic.conns as f64));
                    active.push((bl(), f64::from(b.active_conns)));
                }
            }
            let c = MetricType::Counter;
            family(
                &mut enc,
                "kxdp_service_packets",
                "Packets of a service port's flows.",
                c,
                Rows(spk),
            )?;
            family(
                &mut enc,
                "kxdp_service_bytes",
                "Bytes (IP) of a service port's flows.",
                c,
                Rows(sby),
            )?;
            family(
                &mut enc,
                "kxdp_service_connections",
                "Connections scheduled to a service port.",
                c,
                Rows(sconns),
            )?;
            family(&mut enc, "kxdp_backend_packets", "Packets of a backend's flows.", c, Rows(pk))?;
            family(
                &mut enc,
                "kxdp_backend_bytes",
                "Bytes (IP) of a backend's flows.",
                c,
                Rows(by),
            )?;
            family(
                &mut enc,
                "kxdp_backend_connections",
                "Connections scheduled to a backend.",
                c,
                Rows(conns),
            )?;
            family(
                &mut enc,
                "kxdp_backend_active_connections",
                "Connections open to a backend.",
                MetricType::Gauge,
                Rows(active),
            )?;
        }
        Ok(())
    }
}

fn with(mut l: Labels, k: &'static str, v: &str) -> Labels {
    l.push((k, v.to_string()));
    l
}

/// Renders the registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    out
}

/// The metrics HTTP server.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` from `registry`.
    pub fn spawn(addr: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("kxdp-metrics".into()).spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(s) = s {
                        if let Err(e) = serve(s, &registry) {
                            tracing::debug!(error = %e, "metrics: request failed");
                        }
                    }
                }
            })?
        };
        tracing::info!(%addr, "metrics served at http://{addr}/metrics");
        Ok(MetricsServer { addr, stop, thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(mut s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_string())
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", render(registry))
    } else {
        ("404 Not Found", "text/plain", "metrics are at /metrics\n".to_string())
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A registry holding the dataplane's collector.
pub fn registry(ctx: Arc<Context>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DataplaneCollector(ctx)));
    r
}
