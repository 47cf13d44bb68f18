//! `process_batch` on batches of 64 frames: established flows and all-new flows, with 1, 1,000
//! and 10,000 services of 10 endpoints each, and a conntrack table holding 1M flows.
//! `established` cycles through 32,768 of the flows; `established_whole_table` (10,000
//! services) through all of them, so its conntrack reads come from DRAM.
//!
//! Each iteration copies 64 template frames into the batch buffers (the pipeline rewrites them
//! in place) and processes them; the copy is part of the measured time. `harness_copy` measures
//! that copy alone (the same templates as `established`, no processing), so the pipeline's own
//! time is the difference.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::balance::Algorithm;
use dataplane::pipeline::Verdict;
use kxdp_benches::*;

// The dataplane's allocator: the tables' small allocations on huge pages (`dataplane::mem`).
#[global_allocator]
static ALLOC: dataplane::mem::Allocator = dataplane::mem::Allocator;

const ENDPOINTS: u32 = 10;
const FLOWS: u32 = 1_000_000;
/// Templates cycled through by the established benchmark (random flows among the 1M).
const EST_TEMPLATES: usize = 64 * 512;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("process_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(4));
    for services in [1u32, 1_000, 10_000] {
        let t = tables(services, ENDPOINTS, Algorithm::Random);
        let mut w = worker(FLOWS as usize, (services * ENDPOINTS) as usize);
        let mut batch = Batch::new();
        // Fill conntrack with 1M flows spread over the services: client c, port p.
        let flow = |n: u32| {
            udp_frame(client_ip(n / 50_000), 1024 + (n % 50_000) as u16, vip(n % services), 53)
        };
        let mut n = 0;
        while n < FLOWS {
            let templates: Vec<Vec<u8>> = (n..(n + BATCH as u32).min(FLOWS)).map(flow).collect();
            batch.run(&templates, &t, &mut w, 0);
            n += BATCH as u32;
        }
        assert_eq!(w.ct.len(), FLOWS as usize, "conntrack holds 1M flows");
        // Established: random flows among the 1M.
        let mut rng = dataplane::balance::FastRng::new(7);
        let est: Vec<Vec<u8>> =
            (0..EST_TEMPLATES).map(|_| flow(rng.next_u64() as u32 % FLOWS)).collect();
        if services == 1 {
            let mut i = 0;
            g.bench_function("harness_copy", |b| {
                b.iter(|| {
                    let s = &est[i..i + BATCH];
                    i = (i + BATCH) % EST_TEMPLATES;
                    batch.copy_only(s, None)
                })
            });
        }
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("established", services), &services, |b, _| {
            b.iter(|| {
                let s = &est[i..i + BATCH];
                i = (i + BATCH) % EST_TEMPLATES;
                let v = batch.run(s, &t, &mut w, 1);
                debug_assert!(v.iter().all(|v| matches!(v, Verdict::Tx { .. })));
            })
        });
        if services == 10_000 {
            // Established over the whole table: every flow once per round, in random order, so
            // nearly every conntrack access misses the caches (the 32,768 templates above fit
            // a large L3, as the traffic of a node with that many busy flows would). The
            // templates are allocated in the order they are used, so the benchmark's own copy
            // of them streams through memory.
            let mut order: Vec<u32> = (0..FLOWS).collect();
            for k in (1..order.len()).rev() {
                order.swap(k, rng.next_u64() as usize % (k + 1));
            }
            let all: Vec<Vec<u8>> = order.iter().map(|&n| flow(n)).collect();
            let mut i = 0;
            g.bench_with_input(
                BenchmarkId::new("established_whole_table", services),
                &services,
                |b, _| {
                    b.iter(|| {
                        let s = &all[i..i + BATCH];
                        i = (i + BATCH) % (all.len() - all.len() % BATCH);
                        let v = batch.run(s, &t, &mut w, 1);
                        debug_assert!(v.iter().all(|v| matches!(v, Verdict::Tx { .. })));
                    })
                },
            );
        }
        assert_eq!(w.ct.stats().evicted, 0);
        // New flows: every packet a 5-tuple never seen, into a full table (each evicts one).
        let mut next = 0u32;
        let news: Vec<Vec<u8>> = (0..EST_TEMPLATES as u32)
            .map(|k| udp_frame(client_ip(1000 + k), 1024, vip(k % services), 53))
            .collect();
        let mut j = 0;
        g.bench_with_input(BenchmarkId::new("new_flow", services), &services, |b, _| {
            b.iter(|| {
                // Fresh source ports each time round the templates.
                let port = (next / EST_TEMPLATES as u32) as u16;
                let batch_t = &news[j..j + BATCH];
                j = (j + BATCH) % EST_TEMPLATES;
                next = next.wrapping_add(BATCH as u32);
                let v = batch.run_with_sport(batch_t, Some(2048 + port), &t, &mut w, 2);
                debug_assert!(v.iter().all(|v| matches!(v, Verdict::Tx { .. })));
            })
        });
        eprintln!(
            "services={services}: conntrack {} flows, {} evicted, counters nat_new={} nat_forward={}",
            w.ct.len(),
            w.ct.stats().evicted,
            w.counters.nat_new,
            w.counters.nat_forward
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
