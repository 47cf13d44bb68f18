//! A fixed-bucket latency histogram of atomics, for durations measured off the packet path
//! (table updates) and exported as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, seconds (Prometheus' `le`), from 10 µs to 10 s.
pub const BOUNDS: [f64; 13] =
    [1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0, 10.0];

/// Counts of observations per bucket, their sum and number.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket (upper bound, count) with a last `+Inf` bucket for
    /// the observations over every bound), as Prometheus encoders take them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let count = self.count.load(Ordering::Relaxed);
        let mut buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let within: u64 = buckets.iter().map(|b| b.1).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(within)));
        (self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_buckets_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(20));
        let (sum, count, b) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 20.000703).abs() < 1e-9);
        assert_eq!(b[0], (1e-5, 1));
        assert_eq!(b[5], (1e-3, 1));
        assert_eq!(b.len(), BOUNDS.len() + 1);
        assert_eq!(*b.last().unwrap(), (f64::INFINITY, 1), "over the last bound");
    }
}
