//! Runs one pipeline scenario for a fixed number of batches, for profilers:
//!
//! ```sh
//! cargo build --release -p kxdp-benches --example pipeline_profile
//! valgrind --tool=callgrind --toggle-collect='*process_batch*' \
//!     target/release/examples/pipeline_profile established 10000 65536 2000
//! ```
//!
//! Arguments: scenario (`established`, `new_flow`, or `copy`: the frame copy alone), services,
//! conntrack flows, batches, and optionally the number of distinct template frames cycled
//! through (default 32,768, as the criterion benchmark: with 1M flows that touches about 8 MB
//! of conntrack, which a large L3 holds; pass the flow count to touch the whole table). The
//! set-up is the criterion benchmark's (`benches/pipeline.rs`), with a smaller table by
//! default so a callgrind run takes seconds and its instruction counts do not depend on the
//! caches.
//!
//! `spread-new_flow` and `spread-established` measure the spread from one service to
//! `services` in one process: both set-ups are built, then phases of `batches` batches
//! alternate between them (one, many, many, one, ...) for `rounds` rounds (the sixth
//! argument, default 20). A shared machine's speed drifts over seconds to minutes; phases of
//! a few tens of milliseconds, alternated, put that drift on both sides alike. Single rounds
//! still vary (on the development machine, ratios of 1.0 to 1.2 within one run), so it
//! prints each round's ratio and their median, and several runs are worth comparing. It
//! also prints `memory`'s 64 MB latency, taken before and after, to tag the run's spell.
//!
//! `memory` measures the machine, not the pipeline: the latency of one dependent load (a
//! pointer chase over a random cycle of cache lines, on huge pages) in working sets from 1 MB
//! (within this machine's 2 MB L2) through 4-64 MB (its 105 MB L3) to 512 MB (DRAM). The
//! development machine's L3 is shared with other guests and its speed swings between
//! spells; these latencies say which spell a measurement was made in.

use std::time::{Duration, Instant};

use dataplane::balance::Algorithm;
use dataplane::pipeline::{Verdict, WorkerState};
use dataplane::tables::Tables;
use kxdp_benches::*;

// The dataplane's allocator: the tables' small allocations on huge pages (`dataplane::mem`).
#[global_allocator]
static ALLOC: dataplane::mem::Allocator = dataplane::mem::Allocator;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: u32| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let scenario = args.get(1).map(String::as_str).unwrap_or("established").to_owned();
    let services = arg(2, 10_000);
    let flows = arg(3, 65_536);
    let batches = arg(4, 2_000);
    let templates = (arg(5, 64 * 512) as usize).max(BATCH).next_multiple_of(BATCH);
    if let Some(kind) = scenario.strip_prefix("spread-") {
        if !matches!(kind, "new_flow" | "established") {
            eprintln!("unknown scenario {scenario}: spread-new_flow or spread-established");
            std::process::exit(2);
        }
        spread(kind, services, flows, batches, templates, arg(6, 20).max(1));
        return;
    }
    if scenario == "memory" {
        for mb in [1, 2, 4, 16, 64, 512] {
            println!(
                "memory: {mb} MB working set, {:.1} ns a dependent load",
                load_latency(mb << 20)
            );
        }
        return;
    }
    let mut s = Setup::new(services, flows, templates);
    let cpu_before = cpu_times();
    let (el, tx) = s.run(&scenario, batches);
    // The share of the run the hypervisor gave this CPU to someone else (shared machines): a
    // round with much of it is a slow round for reasons outside the code.
    let steal = match (cpu_before, cpu_times()) {
        (Some((c0, s0)), Some((c1, s1))) if c0 == c1 => {
            format!(
                ", steal {:.1}%",
                (s1 - s0) as f64 * 1e9 / TICKS_PER_S / el.as_nanos() as f64 * 100.0
            )
        }
        _ => String::new(),
    };
    println!(
        "{scenario} services={services} flows={flows}: {batches} batches, {tx} tx, {:.1} ns/packet{steal}",
        per_packet(el, batches)
    );
}

/// One benchmark set-up: tables, a worker whose conntrack holds `flows` flows, and the
/// template frames.
struct Setup {
    t: Tables,
    w: WorkerState,
    batch: Batch,
    /// Frames of established flows.
    est: Vec<Vec<u8>>,
    /// Frames of new flows (their source port is set per pass over the templates).
    news: Vec<Vec<u8>>,
    /// Batches run so far (where the next run starts in the templates).
    done: usize,
}

impl Setup {
    fn new(services: u32, flows: u32, templates: usize) -> Self {
        let t = tables(services, 10, Algorithm::Random);
        let mut w = worker(flows as usize, (services * 10) as usize);
        let mut batch = Batch::new();
        let per_client = 50_000;
        let flow = |n: u32| {
            udp_frame(
                client_ip(n / per_client),
                1024 + (n % per_client) as u16,
                vip(n % services),
                53,
            )
        };
        let mut n = 0;
        while n < flows {
            let templates: Vec<Vec<u8>> = (n..(n + BATCH as u32).min(flows)).map(flow).collect();
            batch.run(&templates, &t, &mut w, 0);
            n += BATCH as u32;
        }
        let mut rng = dataplane::balance::FastRng::new(7);
        let est = (0..templates).map(|_| flow(rng.next_u64() as u32 % flows)).collect();
        let news = (0..templates as u32)
            .map(|k| udp_frame(client_ip(1000 + k), 1024, vip(k % services), 53))
            .collect();
        Self { t, w, batch, est, news, done: 0 }
    }

    /// Runs `batches` batches of `scenario`; returns the time taken and the frames sent.
    fn run(&mut self, scenario: &str, batches: u32) -> (Duration, usize) {
        let Self { t, w, batch, est, news, done } = self;
        let templates = est.len();
        let mut tx = 0usize;
        let start = Instant::now();
        for b in *done..*done + batches as usize {
            let j = (b * BATCH) % templates;
            let v = match scenario {
                "new_flow" => {
                    let port = 2048 + ((b * BATCH) / templates) as u16;
                    batch.run_with_sport(&news[j..j + BATCH], Some(port), t, w, 2)
                }
                // The benchmark's own frame copy alone (what `established` costs besides the
                // pipeline).
                "copy" => {
                    tx += batch.copy_only(&est[j..j + BATCH], None);
                    continue;
                }
                _ => batch.run(&est[j..j + BATCH], t, w, 1),
            };
            tx += v.iter().filter(|v| matches!(v, Verdict::Tx { .. })).count();
        }
        let el = start.elapsed();
        *done += batches as usize;
        (el, tx)
    }
}

/// Nanoseconds per packet of `batches` batches run in `el`.
fn per_packet(el: Duration, batches: u32) -> f64 {
    el.as_nanos() as f64 / (f64::from(batches) * BATCH as f64)
}

/// The `spread-*` scenarios: one service against `services`, phases alternated.
fn spread(kind: &str, services: u32, flows: u32, batches: u32, templates: usize, rounds: u32) {
    // The machine's state at the start and the end (see `memory`): a slow spell shows here.
    let before = load_latency(64 << 20);
    let mut one = Setup::new(1, flows, templates);
    let mut many = Setup::new(services, flows, templates);
    // A first phase of each, untimed: both tables and code warm.
    one.run(kind, batches);
    many.run(kind, batches);
    let (mut ns_one, mut ns_many, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // One, many, then many, one: a drift within a round weighs on both alike.
        let (a, b) = if r % 2 == 0 {
            let a = per_packet(one.run(kind, batches).0, batches);
            (a, per_packet(many.run(kind, batches).0, batches))
        } else {
            let b = per_packet(many.run(kind, batches).0, batches);
            (per_packet(one.run(kind, batches).0, batches), b)
        };
        println!(
            "round {r}: 1 service {a:.1} ns/packet, {services} services {b:.1}, ratio {:.3}",
            b / a
        );
        ns_one.push(a);
        ns_many.push(b);
        ratios.push(b / a);
    }
    println!(
        "{kind} spread 1 -> {services} services (flows={flows}, {batches} batches a phase, {rounds} rounds): \
         medians {:.1} / {:.1} ns/packet, median ratio {:.3}",
        median(&mut ns_one),
        median(&mut ns_many),
        median(&mut ratios)
    );
    println!(
        "memory: 64 MB working set, {before:.1} ns a dependent load before, {:.1} after",
        load_latency(64 << 20)
    );
}

/// Nanoseconds per load of a pointer chase through a random cycle over the cache lines of a
/// `bytes`-sized array (Sattolo's shuffle: one cycle through every line), after one untimed
/// pass. Each load's address comes from the previous load, so loads do not overlap and
/// hardware prefetchers cannot guess the next line.
fn load_latency(bytes: usize) -> f64 {
    const WORDS: usize = 8; // u64s in a cache line
    let lines = bytes / 64;
    let mut next = dataplane::mem::HugeArray::<u64>::zeroed(lines * WORDS);
    let mut order: Vec<usize> = (0..lines).collect();
    let mut rng = dataplane::balance::FastRng::new(11);
    for k in (1..lines).rev() {
        order.swap(k, rng.next_u64() as usize % k);
    }
    // `order` is now one cycle: line i's successor is order[i].
    for (i, &j) in order.iter().enumerate() {
        next[i * WORDS] = (j * WORDS) as u64;
    }
    let chase = |steps: usize| {
        let mut at = 0usize;
        for _ in 0..steps {
            at = next[at] as usize;
        }
        std::hint::black_box(at)
    };
    chase(lines);
    let steps = lines.clamp(1 << 20, 1 << 22);
    let start = Instant::now();
    chase(steps);
    start.elapsed().as_nanos() as f64 / steps as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Clock ticks per second of `/proc/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// The CPU this thread runs on and its steal time so far, in ticks (`/proc/stat`), if known.
fn cpu_times() -> Option<(usize, u64)> {
    // SAFETY: `sched_getcpu` has no preconditions.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&name))?;
    // Fields after the name: user nice system idle iowait irq softirq steal ...
    let steal = line.split_whitespace().nth(8)?.parse().ok()?;
    Some((cpu, steal))
}
