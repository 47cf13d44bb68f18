//! Stable id allocation: service-port name -> `ServiceId`, (ip, port, protocol) -> `BackendId`.
//!
//! Invariants:
//! - Ids are never 0 (0 is the dataplane's "invalid": a zeroed conntrack slot names nothing).
//! - A key keeps its id for as long as it is in use, across any number of compilations.
//! - Ids are dense: the lowest free id is handed out first, so the dataplane's per-id arrays
//!   (service slots, per-backend connection counts) stay as small as the live set.
//! - A released id is *quarantined* for a grace period before it can name something else.
//!   Conntrack entries remember ids; during the grace, a flow whose service or backend vanished
//!   fails re-validation cleanly (the id names nothing) instead of silently landing on whatever
//!   took the id over. If the same key comes back within the grace it gets its old id back.
//!   We chose a grace (default [`DEFAULT_GRACE`]) over never reusing ids because pod churn
//!   would otherwise grow backend ids, and every per-id array, without bound.
//! - The allocator is per process: a restarted control plane starts afresh and the dataplane
//!   receives a full snapshot (see `control::publish`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dataplane::tables::Protocol;

/// Default quarantine of released ids.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Key of a backend id.
pub type BackendKey = (Ipv4Addr, u16, Protocol);

/// One id space: keys to non-zero `u32` ids with reference counts and a quarantine.
#[derive(Debug)]
pub struct IdSpace<K: Hash + Eq + Clone> {
    live: HashMap<K, (u32, u32)>,
    /// Released recently: key -> (id, released at). A key coming back reclaims its id.
    quarantined: HashMap<K, (u32, Instant)>,
    /// Release order, for expiry: (released at, id, key).
    expiry: VecDeque<(Instant, u32, K)>,
    free: BTreeSet<u32>,
    next: u32,
    grace: Duration,
}

impl<K: Hash + Eq + Clone> IdSpace<K> {
    /// An empty space whose released ids wait `grace` before reuse.
    pub fn new(grace: Duration) -> Self {
        Self {
            live: HashMap::new(),
            quarantined: HashMap::new(),
            expiry: VecDeque::new(),
            free: BTreeSet::new(),
            next: 1,
            grace,
        }
    }

    /// The id of `key` if it is in use.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.live.get(key).map(|&(id, _)| id)
    }

    /// Takes one reference to `key`, allocating its id if needed. `None` only when all
    /// 2^32 - 1 ids are in use or quarantined.
    pub fn acquire(&mut self, key: &K, now: Instant) -> Option<u32> {
        if let Some((id, refs)) = self.live.get_mut(key) {
            *refs += 1;
            return Some(*id);
        }
        let id = if let Some((id, _)) = self.quarantined.remove(key) {
            id
        } else {
            self.expire(now);
            if let Some(id) = self.free.pop_first() {
                id
            } else if self.next != 0 {
                let id = self.next;
                self.next = self.next.wrapping_add(1);
                id
            } else {
                return None;
            }
        };
        self.live.insert(key.clone(), (id, 1));
        Some(id)
    }

    /// Drops one reference to `key`; the last one quarantines its id.
    pub fn release(&mut self, key: &K, now: Instant) {
        let Some((id, refs)) = self.live.get_mut(key) else { return };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let id = *id;
        self.live.remove(key);
        self.quarantined.insert(key.clone(), (id, now));
        self.expiry.push_back((now, id, key.clone()));
    }

    /// Moves ids whose quarantine is over to the free set.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(at, id, _)) = self.expiry.front() {
            if now.saturating_duration_since(at) < self.grace {
                break;
            }
            let (_, _, key) = self.expiry.pop_front().expect("front exists");
            // The key may have come back (reclaiming the id) and been released again later;
            // only the entry matching this release frees the id.
            if self.quarantined.get(&key).is_some_and(|&(qid, qat)| qid == id && qat == at) {
                self.quarantined.remove(&key);
                self.free.insert(id);
            }
        }
    }

    /// How many keys are in use.
    pub fn live(&self) -> usize {
        self.live.len()
    }
    /// How many ids are quarantined.
    pub fn quarantined(&self) -> usize {
        self.quarantined.len()
    }
}

/// The control plane's two id spaces.
#[derive(Debug)]
pub struct Ids {
    /// Service-port name -> service id.
    pub services: IdSpace<String>,
    /// (ip, port, protocol) -> backend id.
    pub backends: IdSpace<BackendKey>,
}

impl Ids {
    /// Both spaces with the same grace.
    pub fn new(grace: Duration) -> Self {
        Self { services: IdSpace::new(grace), backends: IdSpace::new(grace) }
    }
}

impl Default for Ids {
    fn default() -> Self {
        Self::new(DEFAULT_GRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_are_stable_while_referenced() {
        let t0 = Instant::now();
        let mut s = IdSpace::<String>::new(Duration::from_secs(10));
        let a = s.acquire(&"a".into(), t0).unwrap();
        let b = s.acquire(&"b".into(), t0).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(s.acquire(&"a".into(), t0), Some(1));
        s.release(&"a".into(), t0);
        assert_eq!(s.get(&"a".into()), Some(1), "one reference left");
    }

    #[test]
    fn released_ids_wait_out_the_grace_then_lowest_first() {
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let mut s = IdSpace::<String>::new(g);
        for k in ["a", "b", "c"] {
            s.acquire(&k.into(), t0);
        }
        s.release(&"b".into(), t0);
        s.release(&"a".into(), t0);
        // Within the grace a new key gets a fresh id, never a quarantined one.
        assert_eq!(s.acquire(&"d".into(), t0 + g / 2), Some(4));
        assert_eq!(s.quarantined(), 2);
        // After it, the lowest freed id comes first.
        assert_eq!(s.acquire(&"e".into(), t0 + g), Some(1));
        assert_eq!(s.acquire(&"f".into(), t0 + g), Some(2));
        assert_eq!(s.acquire(&"g".into(), t0 + g), Some(5));
    }

    #[test]
    fn a_key_returning_within_the_grace_gets_its_id_back() {
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let mut s = IdSpace::<String>::new(g);
        s.acquire(&"a".into(), t0);
        s.acquire(&"b".into(), t0);
        s.release(&"a".into(), t0);
        assert_eq!(s.acquire(&"a".into(), t0 + g / 2), Some(1));
        // The old quarantine entry must not free id 1 while "a" holds it.
        assert_eq!(s.acquire(&"c".into(), t0 + g * 2), Some(3));
        assert_eq!(s.get(&"a".into()), Some(1));
    }
}
