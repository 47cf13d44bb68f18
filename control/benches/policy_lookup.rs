//! Per-packet NetworkPolicy cost at 1, 1,000 and 10,000 policies over 10,000 pods: the
//! dataplane's lookup (`PolicyTables::check`) on tables compiled by the real compiler from the
//! synthetic clusters of `control::synthetic`, and the whole pipeline on new pod-to-pod flows
//! with that policy active.
//!
//! - `check/N`: 4,096 (source, destination, protocol, port) tuples cycled through: sources are
//!   pods anywhere in the cluster and addresses inside and outside the policies' `ipBlock`s,
//!   destinations are the pods of this node (every one selected by some policy), ports and
//!   protocols those the policies name and others. Each iteration checks 64 of them.
//! - `check-isolated/N`: the same tuples, all to pod 0 of this node, which policy 0 isolates at
//!   every size: every check does the full lookup (both endpoints, the source's identity, the
//!   destination's ingress set).
//! - `pipeline/N`: `process_batch` on 64 UDP frames, every one a new flow from such a source to
//!   a pod of this node (its policy checked, then tracked or dropped).
//!
//! The share of allowed tuples differs between sizes (more policies allow more), so it is
//! printed; allowed and refused checks cost the same lookups.
//!
//! `cargo bench -p control --bench policy_lookup`

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use control::policy::PolicyCompiler;
use control::store::{Event, Store};
use control::synthetic::{synthetic_cluster, synthetic_pod_ip, SYNTHETIC_NODE};
use criterion::{Criterion, Throughput};
use dataplane::policy::PolicyTables;
use dataplane::tables::{NextHop, Routes, Tables};
use kxdp_benches::{udp_frame, worker, Batch, BATCH};

const PODS: usize = 10_000;
/// Pods 0..100 run on the local node (`control::synthetic`).
const LOCAL: usize = 100;
const TUPLES: usize = 4096;

fn tables(policies: usize) -> Tables {
    let mut st = Store::new();
    st.apply_all(synthetic_cluster(PODS, policies).into_iter().map(Event::Apply));
    let mut pc = PolicyCompiler::new(SYNTHETIC_NODE);
    let u = pc.compile_all(&st).expect("a policy update");
    let p = PolicyTables::build((*u).clone()).expect("valid tables");
    let mut routes = Routes::default();
    let hop = |i| NextHop { ifindex: i, src_mac: [2, 0, 0, 0, 0, i as u8], dst_mac: [2; 6] };
    routes.add_prefix(Ipv4Addr::new(10, 128, 0, 0), 9, hop(3));
    routes.add_prefix(Ipv4Addr::new(0, 0, 0, 0), 0, hop(1));
    let mut b = Tables::builder(1).routes(routes);
    b.set_policy(Arc::new(p));
    b.build()
}

/// Tuple `k`: (source, destination, protocol, destination port).
fn tuple(k: usize) -> (Ipv4Addr, Ipv4Addr, u8, u16) {
    let x = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
    let src = match k % 4 {
        // An address of the policies' ipBlocks (some in an except).
        3 => Ipv4Addr::new(192, 168, (x % 256) as u8, (x >> 8) as u8),
        _ => synthetic_pod_ip((x % PODS as u64) as usize),
    };
    let dst = synthetic_pod_ip((x >> 16) as usize % LOCAL);
    let (proto, port) = match (x >> 24) % 5 {
        0 => (6, 8080),
        1 => (6, 9050),
        2 => (6, 5432),
        3 => (17, 53),
        _ => (6, 22),
    };
    (src, dst, proto, port)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let tuples: Vec<(u32, u32, u8, u16)> = (0..TUPLES)
        .map(|k| {
            let (s, d, p, port) = tuple(k);
            (u32::from(s), u32::from(d), p, port)
        })
        .collect();
    let frames: Vec<Vec<u8>> = (0..TUPLES)
        .map(|k| {
            let (s, d, _, _) = tuple(k);
            udp_frame(s, 1024, d, 8080)
        })
        .collect();
    let sizes = [1usize, 1_000, 10_000];
    let built: Vec<Tables> = sizes.iter().map(|&n| tables(n)).collect();
    for (n, t) in sizes.iter().zip(&built) {
        let allowed = tuples
            .iter()
            .filter(|&&(s, d, p, port)| t.policy().check(s, d, p, port).is_ok())
            .count();
        println!(
            "{n} policies: {} endpoints, {} allow sets; {allowed} of {TUPLES} tuples allowed",
            t.policy().update().endpoints.len(),
            t.policy().update().sets.len()
        );
    }
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (n, t) in sizes.iter().zip(&built) {
        let mut i = 0usize;
        g.bench_function(format!("check/{n}"), |b| {
            b.iter(|| {
                let p = t.policy();
                let mut ok = 0u32;
                for &(s, d, proto, port) in &tuples[i..i + BATCH] {
                    ok += u32::from(p.check(s, d, proto, port).is_ok());
                }
                i = (i + BATCH) % TUPLES;
                black_box(ok)
            })
        });
    }
    let to_pod0: Vec<(u32, u32, u8, u16)> = tuples
        .iter()
        .map(|&(s, _, p, port)| (s, u32::from(synthetic_pod_ip(0)), p, port))
        .collect();
    for (n, t) in sizes.iter().zip(&built) {
        assert!(t.policy().isolated(u32::from(synthetic_pod_ip(0))));
        let allowed = to_pod0
            .iter()
            .filter(|&&(s, d, p, port)| t.policy().check(s, d, p, port).is_ok())
            .count();
        println!("{n} policies, to pod 0: {allowed} of {TUPLES} allowed");
        let mut i = 0usize;
        g.bench_function(format!("check-isolated/{n}"), |b| {
            b.iter(|| {
                let p = t.policy();
                let mut ok = 0u32;
                for &(s, d, proto, port) in &to_pod0[i..i + BATCH] {
                    ok += u32::from(p.check(s, d, proto, port).is_ok());
                }
                i = (i + BATCH) % TUPLES;
                black_box(ok)
            })
        });
    }
    for (n, t) in sizes.iter().zip(&built) {
        let mut w = worker(1 << 20, 16);
        let mut batch = Batch::new();
        let (mut i, mut sport) = (0usize, 1024u16);
        g.bench_function(format!("pipeline/{n}"), |b| {
            b.iter(|| {
                // New source ports every round over the tuple set: every frame a new flow.
                if i == 0 {
                    sport = sport.wrapping_add(1).max(1024);
                }
                let v = batch.run_with_sport(&frames[i..i + BATCH], Some(sport), t, &mut w, 0);
                i = (i + BATCH) % TUPLES;
                black_box(v.len())
            })
        });
    }
    g.finish();
    c.final_summary();
}
