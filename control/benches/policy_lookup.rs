//! Per-packet NetworkPolicy cost at 1, 1,000 and 10,000 policies over 10,000 pods: the
//! dataplane's lookup (`PolicyTables::check`) on tables compiled by the real compiler from the
//! synthetic clusters of `control::synthetic`, and the whole pipeline on new pod-to-pod flows
//! with that policy active.
//!
//! The traffic has the same mix at every size, so only the number of policies differs:
//! - the destination is pod 0 of this node, which policy 0 isolates for ingress at every
//!   size (its allow set grows with the policies; the bench prints its number of entries);
//! - sources are pods anywhere in the cluster (1% of them on this node, where they may be
//!   isolated for egress too), so every check finds both endpoints and does the full lookup;
//! - exactly half of the 4,096 tuples are allowed: those are drawn from the destination's
//!   allow set (a peer identity it names, a pod with that identity, a port in its ranges), the
//!   others are random (source, TCP/UDP port) pairs the tables refuse.
//!
//! Benchmarks:
//! - `check/N`: `PolicyTables::check` over the tuples, 64 per iteration;
//! - `check-spread/N`: the same, to every pod of this node isolated for ingress whose set names
//!   a pod identity (1 pod at 1 policy, 50 above: more sets touched, so less cache-friendly);
//! - `pipeline/N`: `process_batch` on 64 frames of the `check` tuples (TCP SYN or UDP, as the
//!   tuple says), every one a new flow (each frame its own source port, see `first_sport`):
//!   its policy checked, then tracked (evicting an old flow) or dropped.
//!
//! Before criterion it prints, per size, the tables' shape and memory and the share of tuples
//! allowed (which must be 50% everywhere).
//!
//! `cargo bench -p control --bench policy_lookup`; for callgrind, the profile mode: see
//! `profile` (`KXDP_POLICY_PROFILE=check:10000:110`).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use control::policy::PolicyCompiler;
use control::store::{Event, Store};
use control::synthetic::{synthetic_cluster, synthetic_pod_ip, SYNTHETIC_NODE};
use criterion::{Criterion, Throughput};
use dataplane::policy::{Identity, PolicyTables, ANY_PROTO, NOT_ISOLATED};
use dataplane::tables::{NextHop, Routes, Tables};
use kxdp_benches::{tcp_syn_frame, udp_frame, worker, Batch, BATCH};

const PODS: usize = 10_000;
const TUPLES: usize = 4096;
const TCP: u8 = 6;
const UDP: u8 = 17;

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

/// A deterministic pseudo-random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

type Tuple = (u32, u32, u8, u16);
/// A destination and the (peer pod identity, protocol, port ranges) entries it allows.
type Dest = (u32, Vec<(Identity, u8, Vec<(u16, u16)>)>);

/// The tuples for one size: half allowed, half refused, every one between two pods with a
/// full lookup (see the module docs).
fn traffic(t: &PolicyTables, only: Option<u32>) -> Vec<Tuple> {
    let u = t.update();
    let mut by_id: HashMap<Identity, Vec<u32>> = HashMap::new();
    for (ip, e) in &u.endpoints {
        by_id.entry(e.identity).or_default().push(u32::from(*ip));
    }
    let pods: Vec<u32> = u.endpoints.iter().map(|(ip, _)| u32::from(*ip)).collect();
    // Destinations and the TCP/UDP (peer pod identity, proto, ranges) entries they allow.
    let mut dsts: Vec<Dest> = Vec::new();
    for (ip, e) in &u.endpoints {
        if e.ingress == NOT_ISOLATED || only.is_some_and(|d| d != u32::from(*ip)) {
            continue;
        }
        let set = &u.sets[e.ingress as usize - 1];
        let entries: Vec<_> = set
            .peers
            .iter()
            .filter(|(id, p, _)| *p != ANY_PROTO && by_id.contains_key(id))
            .cloned()
            .collect();
        if !entries.is_empty() {
            dsts.push((u32::from(*ip), entries));
        }
    }
    assert!(!dsts.is_empty(), "some destination allows some pod");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(TUPLES);
    let mut tries = 0usize;
    while out.len() < TUPLES {
        tries += 1;
        assert!(tries < 1_000 * TUPLES, "cannot draw the traffic mix");
        let (dst, entries) = &dsts[rng.below(dsts.len())];
        let want = out.len() % 2 == 0;
        let tuple = if want {
            let (id, proto, ranges) = &entries[rng.below(entries.len())];
            let srcs = &by_id[id];
            let (a, b) = ranges[rng.below(ranges.len())];
            let port = a + (rng.below(usize::from(b - a) + 1) as u16);
            (srcs[rng.below(srcs.len())], *dst, *proto, port)
        } else {
            let (proto, port) = match rng.below(5) {
                0 => (TCP, 8080),
                1 => (TCP, 9050),
                2 => (TCP, 5432),
                3 => (UDP, 53),
                _ => (TCP, 22),
            };
            (pods[rng.below(pods.len())], *dst, proto, port)
        };
        // The source may be a local pod isolated for egress: keep only what the tables say.
        if tuple.0 != tuple.1 && t.check(tuple.0, tuple.1, tuple.2, tuple.3).is_ok() == want {
            out.push(tuple);
        }
    }
    out
}

/// Heap bytes of the tables' parts, as `PolicyTables::memory` reports them.
fn memory_line(n: usize, t: &PolicyTables) -> String {
    let m = t.memory();
    format!(
        "{n} policies: tables {} kB (endpoints {} kB, ranges {} kB, allow sets {} kB)",
        m.total() / 1024,
        m.endpoints / 1024,
        m.ranges / 1024,
        m.sets / 1024
    )
}

fn bench_check(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: String,
    t: &Tables,
    tuples: &[Tuple],
) {
    let mut i = 0usize;
    g.bench_function(name, |b| {
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

/// `KXDP_POLICY_PROFILE=<what>:<policies>:<rounds>` (what: `check` or `pipeline`): build
/// one size only, run `rounds` rounds of 4,096 tuples or frames without criterion and exit.
/// For callgrind: two runs with different `rounds`, the difference in instructions divided
/// by the extra tuples is the cost per tuple with the set-up removed.
fn profile(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [what, n, rounds] = parts[..] else { panic!("want <what>:<policies>:<rounds>") };
    let (n, rounds): (usize, usize) =
        (n.parse().expect("policies"), rounds.parse().expect("rounds"));
    let t = tables(n);
    let p = t.policy();
    let tuples = traffic(p, Some(u32::from(synthetic_pod_ip(0))));
    let mut ok = 0usize;
    match what {
        "check" => {
            for _ in 0..rounds {
                for &(s, d, proto, port) in &tuples {
                    ok += usize::from(black_box(p).check(s, d, proto, port).is_ok());
                }
            }
        }
        "pipeline" => {
            let frames = frames(&tuples);
            let mut w = worker(PIPELINE_FLOWS, 16);
            let mut batch = Batch::new();
            let mut g = 0u32;
            for _ in 0..rounds {
                for c in frames.chunks(BATCH) {
                    ok += batch.run_with_sports(c, first_sport(&mut g), &t, &mut w, 0).len();
                }
            }
        }
        _ => panic!("what: check or pipeline"),
    }
    println!("{what}/{n}: {rounds} rounds, {ok}");
}

/// Conntrack room of the pipeline benchmark's worker: far fewer flows than the traffic's
/// distinct 5-tuples, so a tuple comes back only after its flow was evicted.
const PIPELINE_FLOWS: usize = 1 << 16;

/// The first source port of the next batch: frame `k` of it gets `first + k`. The counter
/// `g` advances by a batch; ports cycle through 64,000 values while the tuples cycle through
/// 4,096, so a (tuple, port) pair recurs only every 512,000 frames (far more than
/// [`PIPELINE_FLOWS`]): every frame is a new flow at every size, whatever the number of
/// distinct tuples the tables allow.
fn first_sport(g: &mut u32) -> u16 {
    let first = 1024 + (*g % 64_000) as u16;
    *g = g.wrapping_add(BATCH as u32);
    first
}

/// Frames for the tuples: TCP SYN or UDP, as the tuple says.
fn frames(tuples: &[Tuple]) -> Vec<Vec<u8>> {
    tuples
        .iter()
        .map(|&(s, d, proto, port)| {
            let (s, d) = (Ipv4Addr::from(s), Ipv4Addr::from(d));
            if proto == UDP {
                udp_frame(s, 1024, d, port)
            } else {
                tcp_syn_frame(s, 1024, d, port)
            }
        })
        .collect()
}

fn main() {
    if let Ok(spec) = std::env::var("KXDP_POLICY_PROFILE") {
        return profile(&spec);
    }
    let mut c = Criterion::default().configure_from_args();
    let sizes = [1usize, 1_000, 10_000];
    let built: Vec<Tables> = sizes.iter().map(|&n| tables(n)).collect();
    let mut mixes = Vec::new();
    let pod0 = u32::from(synthetic_pod_ip(0));
    for (n, t) in sizes.iter().zip(&built) {
        let p = t.policy();
        let tuples = traffic(p, Some(pod0));
        let spread = traffic(p, None);
        let allowed =
            |v: &[Tuple]| v.iter().filter(|&&(s, d, pr, po)| p.check(s, d, pr, po).is_ok()).count();
        let dsts: std::collections::BTreeSet<u32> = spread.iter().map(|t| t.1).collect();
        let set = p.update().endpoints.iter().find(|(ip, _)| u32::from(*ip) == pod0);
        let entries = set.map_or(0, |(_, e)| p.update().sets[e.ingress as usize - 1].peers.len());
        println!(
            "{n} policies: {} endpoints, {} ranges, {} allow sets; pod 0's ingress set: {entries} \
             peer entries; allowed: {} of {TUPLES} (check), {} of {TUPLES} to {} destinations \
             (check-spread)",
            p.update().endpoints.len(),
            p.update().ranges.len(),
            p.update().sets.len(),
            allowed(&tuples),
            allowed(&spread),
            dsts.len(),
        );
        println!("{}", memory_line(*n, p));
        let frames = frames(&tuples);
        mixes.push((tuples, spread, frames));
    }
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(BATCH as u64));
    for ((n, t), (tuples, _, _)) in sizes.iter().zip(&built).zip(&mixes) {
        bench_check(&mut g, format!("check/{n}"), t, tuples);
    }
    for ((n, t), (_, spread, _)) in sizes.iter().zip(&built).zip(&mixes) {
        bench_check(&mut g, format!("check-spread/{n}"), t, spread);
    }
    for ((n, t), (_, _, frames)) in sizes.iter().zip(&built).zip(&mixes) {
        let mut w = worker(PIPELINE_FLOWS, 16);
        let mut batch = Batch::new();
        let (mut i, mut sports) = (0usize, 0u32);
        g.bench_function(format!("pipeline/{n}"), |b| {
            b.iter(|| {
                let first = first_sport(&mut sports);
                let v = batch.run_with_sports(&frames[i..i + BATCH], first, t, &mut w, 0);
                i = (i + BATCH) % TUPLES;
                black_box(v.len())
            })
        });
    }
    g.finish();
    c.final_summary();
}
