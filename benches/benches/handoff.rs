//! The per-packet cost of the cross-worker path next to the local one, in memory.
//!
//! Two workers share the tables; every flow is established and owned by worker 1.
//! - `local`: worker 1 receives a batch of 64 frames of its own flows and processes them.
//! - `handoff`: worker 0 receives the same batch, misses in its own conntrack, returns
//!   `Verdict::Handoff`; each frame is copied into a pooled buffer and queued to worker 1
//!   through the I/O layer's `Handoff` (the queues and buffers the AF_XDP workers use); worker 1
//!   takes them and processes them (`local_only`, as its I/O loop does).
//!
//! Both run on one thread, so `handoff` is the total CPU cost of a handed frame (both workers'
//! shares), measured side by side with `local` in the same run. Each iteration copies the 64
//! template frames into the receive buffers first, in both.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::balance::Algorithm;
use dataplane::io::worker::Handoff;
use dataplane::pipeline::{owner_of, Shared, Verdict, WorkerConfig, WorkerState};
use dataplane::{Frame, PassReason};
use kxdp_benches::*;

// The dataplane's allocator: the tables' small allocations on huge pages (`dataplane::mem`).
#[global_allocator]
static ALLOC: dataplane::mem::Allocator = dataplane::mem::Allocator;

const FLOWS: usize = 4096;

fn bench(c: &mut Criterion) {
    let t = tables(1, 10, Algorithm::Random);
    let shared = Shared::new(1 << 16, 1 << 12);
    let mut ws: Vec<WorkerState> = (0..2u16)
        .map(|id| {
            let cfg = WorkerConfig {
                worker_id: id,
                workers: 2,
                conntrack_capacity: FLOWS * 2,
                ..WorkerConfig::default()
            };
            WorkerState::new(&cfg, &shared)
        })
        .collect();
    // Flows owned by worker 1 (by their client side), established in its table.
    let client = client_ip(0);
    let flows: Vec<Vec<u8>> = (1024u16..)
        .filter(|&p| owner_of(&t, u32::from(client), p, 2) == 1)
        .take(FLOWS)
        .map(|p| udp_frame(client, p, vip(0), 53))
        .collect();
    let mut rx = Batch::new();
    for chunk in flows.chunks(BATCH).filter(|c| c.len() == BATCH) {
        rx.run(chunk, &t, &mut ws[1], 1);
    }
    assert_eq!(ws[1].ct.len(), FLOWS);
    let handoff = Handoff::new(2, 1024, 4096);
    let mut g = c.benchmark_group("cross_worker");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(3));
    let batches: Vec<&[Vec<u8>]> = flows.chunks(BATCH).filter(|c| c.len() == BATCH).collect();
    let (w0, w1) = ws.split_at_mut(1);
    let (w0, w1) = (&mut w0[0], &mut w1[0]);
    let mut i = 0;
    g.bench_function("local", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            let v = rx.run(batches[i], &t, w1, 1);
            debug_assert!(v.iter().all(|v| matches!(v, Verdict::Tx { .. })));
        })
    });
    let mut out = [Verdict::Pass(PassReason::NotOurs); BATCH];
    g.bench_function("handoff", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            let mut to = [0u16; BATCH];
            for (k, v) in rx.run(batches[i], &t, w0, 1).iter().enumerate() {
                let Verdict::Handoff { worker } = *v else {
                    panic!("frame {k} not handed off: {v:?}")
                };
                to[k] = worker;
            }
            for (k, &worker) in to.iter().enumerate() {
                assert!(handoff.hand_to(usize::from(worker), rx.frame(k), IF_CLIENTS));
            }
            let mut held: [Option<_>; BATCH] = std::array::from_fn(|_| handoff.take_for(1));
            {
                let mut it = held.iter_mut();
                let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|_| {
                    it.next().and_then(|h| h.as_mut()).expect("64 handed").frame()
                });
                w1.local_only = true;
                dataplane::process_batch(&mut frames, &mut out, &t, w1, 1);
                w1.local_only = false;
            }
            for h in held.iter_mut() {
                handoff.give_back(h.take().expect("held"));
            }
            debug_assert!(out.iter().all(|v| matches!(v, Verdict::Tx { .. })));
        })
    });
    g.finish();
    eprintln!("worker 1: nat_forward {} nat_new {}", w1.counters.nat_forward, w1.counters.nat_new);
}

criterion_group!(benches, bench);
criterion_main!(benches);
