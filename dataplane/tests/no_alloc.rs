//! Nothing is allocated per packet once a worker is set up: a counting global allocator
//! watches a run over every kind of packet (new flows, established, replies, rejects, echo,
//! ICMP errors, fragments, evictions, UDP re-balancing after a table change).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use dataplane::balance::Algorithm;
use dataplane::pipeline::{Frame, Verdict};
use dataplane::tables::{Protocol, ServicePort};

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn no_allocation_per_packet() {
    let t1 = tables();
    let mut b = t1.next();
    b.upsert_service(std::sync::Arc::new(ServicePort::new(
        spec(2, "demo/dns:dns", Protocol::Udp, Algorithm::Random),
        vec![backend(22, DNS_BACKEND2, 5353)],
    )))
    .unwrap();
    let t2 = b.build();
    // A small table, so the run also evicts.
    let mut w = worker_with(64);

    // Prepare every frame beforehand.
    let mut packets: Vec<(u32, Vec<u8>)> = Vec::new();
    for p in 0..200u16 {
        packets.push((
            IF_CLIENT,
            tcp(FROM_CLIENT, CLIENT, 20000 + p, WEB_VIP, 80, 64, "S", 1, 0, b""),
        ));
        packets.push((IF_CLIENT, udp(FROM_CLIENT, CLIENT, 30000 + p, DNS_VIP, 53, 64, b"q")));
        packets.push((
            IF_BACKENDS,
            udp(FROM_BACKENDS, DNS_BACKEND, 5353, CLIENT, 30000 + p, 64, b"a"),
        ));
        packets.push((
            IF_CLIENT,
            tcp(FROM_CLIENT, CLIENT, 40000 + p, AFF_VIP, 80, 64, "S", 1, 0, b""),
        ));
        packets.push((
            IF_CLIENT,
            tcp(FROM_CLIENT, CLIENT, 50000 + p, EMPTY_VIP, 80, 64, "S", 1, 0, b""),
        ));
        packets.push((IF_CLIENT, udp(FROM_CLIENT, CLIENT, 50000 + p, EMPTY_VIP, 81, 64, b"u")));
        packets.push((
            IF_UPLINK,
            tcp(FROM_UPLINK, EXTERNAL, 1000 + p, NODE_IP, NP_PORT, 64, "S", 1, 0, b""),
        ));
        packets.push((
            IF_CLIENT,
            icmp(
                FROM_CLIENT,
                CLIENT,
                WEB_VIP,
                64,
                etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: p, seq: 1 }),
                b"x",
            ),
        ));
    }
    let mut bufs: Vec<(u32, usize, Vec<u8>)> = packets
        .iter()
        .map(|(i, p)| {
            let mut b = vec![0u8; 2048];
            b[..p.len()].copy_from_slice(p);
            (*i, p.len(), b)
        })
        .collect();
    let mut verdicts = vec![Verdict::Pass(dataplane::PassReason::NotOurs); 64];

    COUNTING.store(true, Ordering::SeqCst);
    for (round, t) in [(0u64, &t1), (1, &t2)] {
        for chunk in bufs.chunks_mut(64) {
            let mut frames: [Option<Frame<'_>>; 64] = [const { None }; 64];
            let n = chunk.len();
            for (slot, (i, len, b)) in frames.iter_mut().zip(chunk.iter_mut()) {
                *slot = Some(Frame { buf: &mut b[..], len: *len, ifindex: *i });
            }
            // A batch is a slice of frames; build it without allocating.
            let mut batch: [Frame<'_>; 64] =
                frames.map(|f| f.unwrap_or(Frame { buf: &mut [], len: 0, ifindex: 0 }));
            dataplane::process_batch(
                &mut batch[..n],
                &mut verdicts[..n],
                t,
                &mut w,
                round * 40 * S,
            );
        }
        w.ct.gc(round * 40 * S, 1024);
    }
    COUNTING.store(false, Ordering::SeqCst);
    let allocs = ALLOCS.load(Ordering::SeqCst);
    assert!(w.counters.nat_new > 0 && w.counters.rejects_sent > 0 && w.counters.echo_replies > 0);
    assert!(w.ct.stats().evicted > 0, "the run exercised eviction");
    assert_eq!(allocs, 0, "allocations during packet processing");
}
