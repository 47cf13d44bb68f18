//! NetworkPolicy compile benchmark: 10,000 pods (100 nodes, this node has 100 of them) with
//! 1, 1,000 and 10,000 policies of the shapes in `control::synthetic`.
//!
//! For each size, prints the size of the resulting `PolicyUpdate` (endpoints, ranges, allow
//! sets, peer entries, encoded bytes on the control socket) and the time to build the
//! dataplane's `PolicyTables` from it, then measures with criterion:
//! - `full/N`: a fresh `PolicyCompiler` compiling the whole store;
//! - `pod-known/N`: one pod added whose identity exists already (no selector evaluated);
//! - `pod-new/N`: one pod added with new labels (every policy evaluated once for it);
//! - `label-change/N`: one pod relabelled between two existing apps.
//!
//! `cargo bench -p control --bench policy`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use control::policy::PolicyCompiler;
use control::store::{Event, Kind, ObjKey, Object, Store};
use control::synthetic::{synthetic_cluster, synthetic_pod, SYNTHETIC_NODE};
use criterion::Criterion;
use dataplane::policy::{PolicyTables, PolicyUpdate};
use dataplane::sync::{write_frame, ToDataplane};

const PODS: usize = 10_000;

fn store(policies: usize) -> Store {
    let mut st = Store::new();
    st.apply_all(synthetic_cluster(PODS, policies).into_iter().map(Event::Apply));
    st.take_changes();
    st
}

fn size_report(policies: usize, u: &PolicyUpdate, full: std::time::Duration) {
    let peers: usize = u.sets.iter().map(|s| s.peers.len() + s.any_peer.len()).sum();
    let mut buf = Vec::new();
    let msg = ToDataplane::Policy { base: 1, generation: 2, policy: u.clone() };
    write_frame(&mut buf, &msg).expect("encodes");
    let t = Instant::now();
    let tables = PolicyTables::build(u.clone()).expect("builds");
    let build = t.elapsed();
    black_box(tables);
    println!(
        "policies={policies}: full compile {:.1} ms (one run); update: {} endpoints, {} ranges, \
         {} allow sets, {peers} set entries, {} bytes encoded; PolicyTables::build {:.2} ms",
        full.as_secs_f64() * 1e3,
        u.endpoints.len(),
        u.ranges.len(),
        u.sets.len(),
        buf.len(),
        build.as_secs_f64() * 1e3
    );
}

/// Pod `i` of the synthetic cluster with its name and address moved past the end (so it is
/// new) and, with `fresh_labels`, labels no other pod has.
fn extra_pod(i: usize, fresh_labels: bool) -> Object {
    let Object::Pod(p) = synthetic_pod(i % PODS, PODS) else { unreachable!("a pod") };
    let mut p = (*p).clone();
    p.metadata.name = Some(format!("extra-{i}"));
    if let Some(s) = p.status.as_mut() {
        s.pod_ip = Some(control::synthetic::synthetic_pod_ip(PODS + i).to_string());
    }
    if fresh_labels {
        p.metadata.labels.get_or_insert_default().insert("extra".into(), i.to_string());
    }
    Object::Pod(Arc::new(p))
}

fn bench_size(c: &mut Criterion, policies: usize) {
    let st = store(policies);
    let t = Instant::now();
    let mut pc = PolicyCompiler::new(SYNTHETIC_NODE);
    let u = pc.compile_all(&st).expect("an update");
    size_report(policies, &u, t.elapsed());

    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function(format!("full/{policies}"), |b| {
        b.iter(|| {
            let mut pc = PolicyCompiler::new(SYNTHETIC_NODE);
            black_box(pc.compile_all(&st))
        })
    });
    drop(g);

    let mut g = c.benchmark_group("policy");
    g.sample_size(20);
    let mut st = st;
    let mut n = 0usize;
    for (name, fresh) in [("pod-known", false), ("pod-new", true)] {
        g.bench_function(format!("{name}/{policies}"), |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let pod = extra_pod(n, fresh);
                    let key = pod.key().expect("named");
                    let t = Instant::now();
                    st.apply(Event::Apply(pod));
                    let ch = st.take_changes();
                    black_box(pc.compile(&st, &ch));
                    total += t.elapsed();
                    st.apply(Event::Delete(Kind::Pod, key));
                    let ch = st.take_changes();
                    pc.compile(&st, &ch);
                }
                total
            })
        });
    }
    // Relabel pod 0 between two existing apps (of its namespace), back and forth.
    let Object::Pod(p0) = synthetic_pod(0, PODS) else { unreachable!("a pod") };
    let key = ObjKey::new("ns-0", "pod-0");
    let mut moved = (*p0).clone();
    moved.metadata.labels.get_or_insert_default().insert("app".into(), "app-100".into());
    let variants = [Object::Pod(Arc::new(moved)), Object::Pod(p0)];
    let mut flip = 0usize;
    g.bench_function(format!("label-change/{policies}"), |b| {
        b.iter(|| {
            flip += 1;
            st.apply(Event::Apply(variants[flip % 2].clone()));
            let ch = st.take_changes();
            black_box(pc.compile(&st, &ch))
        })
    });
    assert!(st.get(Kind::Pod, &key).is_some());
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    for policies in [1, 1_000, 10_000] {
        bench_size(&mut c, policies);
    }
    c.final_summary();
}
