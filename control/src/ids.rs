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
//! - A restarted control plane does not start afresh: before its first compilation it adopts
//!   the ids the running dataplane reports in its hello ([`Ids::adopt`]). Adopted ids start
//!   quarantined, so the same service or backend reclaims its old id when the compiler meets
//!   it again (and the dataplane's flows, which remember ids, keep working), while ids whose
//!   object has gone are freed only after the grace, like any released id.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dataplane::sync::IdMap;
use dataplane::tables::Protocol;

/// Default quarantine of released ids.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Largest jump over unused ids that [`IdSpace::adopt`] accepts: ids are dense, so a wider
/// gap means a corrupt map, and following it would fill the free set with millions of ids.
pub const MAX_ADOPT_GAP: u32 = 1 << 22;

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
    /// Whether `acquire` ever ran (adoption is only allowed before).
    acquired: bool,
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
            acquired: false,
        }
    }

    /// The id of `key` if it is in use.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.live.get(key).map(|&(id, _)| id)
    }

    /// Takes one reference to `key`, allocating its id if needed. `None` only when all
    /// 2^32 - 1 ids are in use or quarantined.
    pub fn acquire(&mut self, key: &K, now: Instant) -> Option<u32> {
        self.acquired = true;
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

    /// Records that `key` had `id` in a previous incarnation: it is quarantined as if
    /// released at `now`, so `key` reclaims it and nothing else takes it within the grace.
    /// Only before anything was acquired; an id of 0, an id or key already adopted, or an id
    /// more than [`MAX_ADOPT_GAP`] above the highest so far (ids are dense) is refused
    /// (`false`).
    pub fn adopt(&mut self, key: &K, id: u32, now: Instant) -> bool {
        if id == 0 || self.acquired || self.quarantined.contains_key(key) {
            return false;
        }
        if id < self.next {
            // Below the high-water mark: only a gap id is still free.
            if !self.free.remove(&id) {
                return false;
            }
        } else {
            if id - self.next > MAX_ADOPT_GAP {
                return false;
            }
            // The ids skipped over were nobody's: free at once.
            self.free.extend(self.next..id);
            self.next = id.wrapping_add(1);
        }
        self.quarantined.insert(key.clone(), (id, now));
        self.expiry.push_back((now, id, key.clone()));
        true
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

impl Ids {
    /// Adopts a dataplane's ids (see [`IdSpace::adopt`]); returns how many service and
    /// backend ids were adopted. Entries refused (duplicates, 0, wild gaps) are skipped and
    /// logged: they only cost those objects a fresh id.
    pub fn adopt(&mut self, map: &IdMap, now: Instant) -> (usize, usize) {
        let mut n = (0, 0);
        for (id, name) in &map.services {
            if self.services.adopt(name, *id, now) {
                n.0 += 1;
            } else {
                tracing::warn!(id, name, "ids: service id not adopted");
            }
        }
        for &(id, ip, port, proto) in &map.backends {
            if self.backends.adopt(&(ip, port, proto), id, now) {
                n.1 += 1;
            } else {
                tracing::warn!(id, %ip, port, "ids: backend id not adopted");
            }
        }
        n
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
    fn adopted_ids_are_reclaimed_by_their_keys_and_gaps_are_free() {
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let mut s = IdSpace::<String>::new(g);
        assert!(s.adopt(&"x".into(), 5, t0));
        assert!(s.adopt(&"y".into(), 2, t0));
        assert!(!s.adopt(&"z".into(), 5, t0), "an id is adopted once");
        assert!(!s.adopt(&"x".into(), 7, t0), "a key is adopted once");
        assert!(!s.adopt(&"w".into(), 0, t0));
        assert!(!s.adopt(&"w".into(), 6 + MAX_ADOPT_GAP + 1, t0));
        // Keys met again get their ids; new keys take the gaps, then fresh ids.
        assert_eq!(s.acquire(&"y".into(), t0), Some(2));
        assert_eq!(s.acquire(&"new1".into(), t0), Some(1));
        assert_eq!(s.acquire(&"x".into(), t0), Some(5));
        assert_eq!(s.acquire(&"new2".into(), t0), Some(3));
        assert_eq!(s.acquire(&"new3".into(), t0), Some(4));
        assert_eq!(s.acquire(&"new4".into(), t0), Some(6));
        assert!(!s.adopt(&"late".into(), 9, t0), "no adoption after the first acquire");
    }

    #[test]
    fn adopted_ids_nobody_claims_are_freed_after_the_grace() {
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let mut s = IdSpace::<String>::new(g);
        assert!(s.adopt(&"gone".into(), 1, t0));
        assert_eq!(s.acquire(&"a".into(), t0), Some(2), "quarantined within the grace");
        assert_eq!(s.acquire(&"b".into(), t0 + g), Some(1), "freed after it");
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
