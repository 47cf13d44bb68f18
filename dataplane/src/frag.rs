//! IPv4 fragment tracking, so non-first fragments follow their datagram's translation.
//!
//! Only the first fragment carries the TCP/UDP header, so only it can be matched to a flow.
//! When a first fragment passes, its ports are remembered under (source, destination, IP id,
//! protocol); later fragments of the same datagram look the ports up, find the flow, and get
//! the same address translation (their bytes hold no L4 header to rewrite; the L4 checksum in
//! the first fragment already covers the whole datagram). A non-first fragment that arrives
//! before its first fragment is not reassembled or queued: it is counted and dropped (when sent
//! to a service address) or handed to the kernel. Entries live 30 s (Linux `ipfrag_time`).
//!
//! The table is per worker, fixed size, 4-way set-associative, oldest-first replacement.

use ahash::RandomState;

const WAYS: usize = 4;
/// Lifetime of an entry, ns.
pub const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

#[derive(Clone, Copy, Default)]
struct Entry {
    key: u128,
    sport: u16,
    dport: u16,
    expires: u64,
}

/// Per-worker fragment table.
pub struct FragTable {
    entries: Box<[Entry]>,
    mask: usize,
    hasher: RandomState,
}

fn pack(src: u32, dst: u32, id: u16, proto: u8) -> u128 {
    // The top bit marks the entry as used, so an all-zero key cannot match an empty slot.
    (1u128 << 127)
        | (u128::from(src) << 64)
        | (u128::from(dst) << 32)
        | (u128::from(id) << 8)
        | u128::from(proto)
}

impl FragTable {
    /// A table for about `capacity` datagrams in flight.
    pub fn new(capacity: usize) -> Self {
        let buckets = capacity.div_ceil(WAYS).next_power_of_two().max(1);
        Self {
            entries: vec![Entry::default(); buckets * WAYS].into_boxed_slice(),
            mask: buckets - 1,
            hasher: RandomState::new(),
        }
    }

    fn bucket(&self, key: u128) -> usize {
        (self.hasher.hash_one(key) as usize & self.mask) * WAYS
    }

    /// Remembers a first fragment's ports.
    pub fn insert(&mut self, src: u32, dst: u32, id: u16, proto: u8, ports: (u16, u16), now: u64) {
        let key = pack(src, dst, id, proto);
        let b = self.bucket(key);
        let slot = (b..b + WAYS)
            .find(|&s| self.entries[s].key == key)
            .or_else(|| (b..b + WAYS).find(|&s| self.entries[s].expires <= now))
            .unwrap_or_else(|| (b..b + WAYS).min_by_key(|&s| self.entries[s].expires).unwrap_or(b));
        self.entries[slot] =
            Entry { key, sport: ports.0, dport: ports.1, expires: now + FRAG_TIMEOUT_NS };
    }

    /// The ports of the datagram this fragment belongs to.
    pub fn lookup(&self, src: u32, dst: u32, id: u16, proto: u8, now: u64) -> Option<(u16, u16)> {
        let key = pack(src, dst, id, proto);
        let b = self.bucket(key);
        self.entries[b..b + WAYS]
            .iter()
            .find(|e| e.key == key && e.expires > now)
            .map(|e| (e.sport, e.dport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_ports_until_timeout() {
        let mut t = FragTable::new(16);
        t.insert(1, 2, 77, 17, (1000, 53), 0);
        assert_eq!(t.lookup(1, 2, 77, 17, 1), Some((1000, 53)));
        assert_eq!(t.lookup(1, 2, 78, 17, 1), None);
        assert_eq!(t.lookup(1, 2, 77, 17, FRAG_TIMEOUT_NS), None);
    }
}
