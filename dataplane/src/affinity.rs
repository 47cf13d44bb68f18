//! ClientIP session affinity, shared by every worker.
//!
//! Why shared: receive-side scaling hashes each connection's 5-tuple to a queue, so two
//! connections from one client usually land on different workers. A per-worker table would
//! send them to different backends and break the affinity Kubernetes promises.
//!
//! The table is touched only when a flow is created (never for packets of known flows), so a
//! lock per bucket costs little: buckets of [`WAYS`] entries, each behind its own small mutex,
//! fixed capacity, oldest-entry eviction (counted). Entries are keyed by (service port id,
//! client address) and hold the backend id and an expiry; the timeout is refreshed by every new
//! connection, as kube-proxy's `recent` match does with `--set`.

use core::sync::atomic::{AtomicU64, Ordering};

use ahash::RandomState;
use parking_lot::Mutex;

use crate::tables::{BackendId, ServiceId};

/// Entries per bucket.
pub const WAYS: usize = 4;

#[derive(Clone, Copy, Default)]
struct Entry {
    service: ServiceId,
    client: u32,
    backend: BackendId,
    expires: u64,
}

/// The shared affinity table.
pub struct AffinityTable {
    buckets: Box<[Mutex<[Entry; WAYS]>]>,
    mask: usize,
    hasher: RandomState,
    evictions: AtomicU64,
}

impl AffinityTable {
    /// A table for about `capacity` clients.
    pub fn new(capacity: usize) -> Self {
        let n = capacity.div_ceil(WAYS).next_power_of_two().max(1);
        Self {
            buckets: (0..n).map(|_| Mutex::new([Entry::default(); WAYS])).collect(),
            mask: n - 1,
            hasher: RandomState::new(),
            evictions: AtomicU64::new(0),
        }
    }

    fn bucket(&self, service: ServiceId, client: u32) -> &Mutex<[Entry; WAYS]> {
        let h = self.hasher.hash_one((service, client)) as usize;
        &self.buckets[h & self.mask]
    }

    /// The backend remembered for this client, if not expired at `now` (ns).
    pub fn lookup(&self, service: ServiceId, client: u32, now: u64) -> Option<BackendId> {
        let mut b = self.bucket(service, client).lock();
        for e in b.iter_mut() {
            if e.service == service && e.client == client {
                if e.expires > now {
                    return Some(e.backend);
                }
                *e = Entry::default();
                return None;
            }
        }
        None
    }

    /// Remembers (or refreshes) this client's backend until `expires` (ns).
    pub fn insert(
        &self,
        service: ServiceId,
        client: u32,
        backend: BackendId,
        expires: u64,
        now: u64,
    ) {
        let mut b = self.bucket(service, client).lock();
        let slot = match b.iter().position(|e| e.service == service && e.client == client) {
            Some(i) => i,
            None => match b.iter().position(|e| e.service == 0 || e.expires <= now) {
                Some(i) => i,
                None => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    (0..WAYS).min_by_key(|&i| b[i].expires).unwrap_or(0)
                }
            },
        };
        b[slot] = Entry { service, client, backend, expires };
    }

    /// Forgets this client's entry.
    pub fn remove(&self, service: ServiceId, client: u32) {
        let mut b = self.bucket(service, client).lock();
        for e in b.iter_mut() {
            if e.service == service && e.client == client {
                *e = Entry::default();
            }
        }
    }

    /// Live entries evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Every unexpired entry as (service, client, backend, expires); for inspection.
    pub fn entries(&self, now: u64) -> Vec<(ServiceId, u32, BackendId, u64)> {
        let mut v = Vec::new();
        for b in self.buckets.iter() {
            for e in b.lock().iter() {
                if e.service != 0 && e.expires > now {
                    v.push((e.service, e.client, e.backend, e.expires));
                }
            }
        }
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const S: u64 = 1_000_000_000;

    #[test]
    fn entries_expire_and_refresh() {
        let t = AffinityTable::new(64);
        t.insert(1, 7, 3, 10 * S, 0);
        assert_eq!(t.lookup(1, 7, 9 * S), Some(3));
        assert_eq!(t.lookup(2, 7, 9 * S), None);
        t.insert(1, 7, 3, 20 * S, 9 * S);
        assert_eq!(t.lookup(1, 7, 15 * S), Some(3));
        assert_eq!(t.lookup(1, 7, 20 * S), None);
        assert_eq!(t.lookup(1, 7, 0), None, "an expired entry is gone");
    }

    #[test]
    fn full_bucket_evicts_soonest_expiring() {
        let t = AffinityTable::new(1); // One bucket of WAYS entries.
        for c in 0..WAYS as u32 {
            t.insert(1, c, 1, (10 + u64::from(c)) * S, 0);
        }
        t.insert(1, 99, 2, 100 * S, 0);
        assert_eq!(t.evictions(), 1);
        assert_eq!(t.lookup(1, 0, S), None);
        assert_eq!(t.lookup(1, 99, S), Some(2));
        assert_eq!(t.lookup(1, 1, S), Some(1));
    }
}
