//! Compile benchmark: 10,000 Services x 10 endpoints (100,000 endpoints).
//!
//! Prints, then measures with criterion:
//! - the full compile time (target <= 200 ms) and the RSS growth of store + compiled state;
//! - one endpoint change, from the store event to a new `Tables` published by the dataplane's
//!   `Applier` (store apply -> incremental compile -> wire delta -> apply), p50/p99 over many
//!   iterations (target p99 <= 1 ms), split into its control and dataplane halves.
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

fn report() {
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
    println!("dataplane snapshot apply: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
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
}

fn main() {
    report();
    let st = store();
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    c.bench_function("compile_all_10k_services_100k_endpoints", |b| {
        b.iter(|| Compiler::new(ctx()).compile_all(&st).upserts.len())
    });
    c.final_summary();
}
