//! Runs one pipeline scenario for a fixed number of batches, for profilers:
//!
//! ```sh
//! cargo build --release -p kxdp-benches --example pipeline_profile
//! valgrind --tool=callgrind --toggle-collect='*process_batch*' \
//!     target/release/examples/pipeline_profile established 10000 65536 2000
//! ```
//!
//! Arguments: scenario (`established`, `new_flow`, or `copy`: the frame copy alone), services, conntrack flows, batches, and
//! optionally the number of distinct template frames cycled through (default 32,768, as the
//! criterion benchmark: with 1M flows that touches about 8 MB of conntrack, which a large L3
//! holds; pass the flow count to touch the whole table). The set-up is the criterion benchmark's (`benches/pipeline.rs`), with a smaller table by default
//! so a callgrind run takes seconds and its instruction counts do not depend on the caches.

use dataplane::balance::Algorithm;
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
    let t = tables(services, 10, Algorithm::Random);
    let mut w = worker(flows as usize, (services * 10) as usize);
    let mut batch = Batch::new();
    let per_client = 50_000;
    let flow = |n: u32| {
        udp_frame(client_ip(n / per_client), 1024 + (n % per_client) as u16, vip(n % services), 53)
    };
    let mut n = 0;
    while n < flows {
        let templates: Vec<Vec<u8>> = (n..(n + BATCH as u32).min(flows)).map(flow).collect();
        batch.run(&templates, &t, &mut w, 0);
        n += BATCH as u32;
    }
    let mut rng = dataplane::balance::FastRng::new(7);
    let templates = (arg(5, 64 * 512) as usize).max(BATCH).next_multiple_of(BATCH);
    let (est, news): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (
        (0..templates).map(|_| flow(rng.next_u64() as u32 % flows)).collect(),
        (0..templates as u32)
            .map(|k| udp_frame(client_ip(1000 + k), 1024, vip(k % services), 53))
            .collect(),
    );
    let mut tx = 0usize;
    let cpu_before = cpu_times();
    let start = std::time::Instant::now();
    for b in 0..batches as usize {
        let j = (b * BATCH) % templates;
        let v = match scenario.as_str() {
            "new_flow" => {
                let port = 2048 + ((b * BATCH) / templates) as u16;
                batch.run_with_sport(&news[j..j + BATCH], Some(port), &t, &mut w, 2)
            }
            // The benchmark's own frame copy alone (what `established` costs besides the pipeline).
            "copy" => {
                tx += batch.copy_only(&est[j..j + BATCH], None);
                continue;
            }
            _ => batch.run(&est[j..j + BATCH], &t, &mut w, 1),
        };
        tx += v.iter().filter(|v| matches!(v, dataplane::pipeline::Verdict::Tx { .. })).count();
    }
    let el = start.elapsed();
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
        el.as_nanos() as f64 / (batches as f64 * BATCH as f64)
    );
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
