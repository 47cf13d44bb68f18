//! Maglev consistent hashing: the lookup table behind [`Algorithm::Maglev`].
//!
//! # What it is
//!
//! Maglev (Eisenbud et al., NSDI 2016, section 3.4) maps a flow to a backend through a lookup
//! table of `M` slots (`M` prime). Every backend `b` owns a permutation of the slots,
//! `offset(b) + j * skip(b) mod M` for `j = 0, 1, 2, …`, with `offset = h1(b) mod M` and
//! `skip = h2(b) mod (M - 1) + 1`. Backends take turns; on its turn a backend claims the next
//! slot of its permutation that is still empty, until every slot is claimed. A new flow goes to
//! `table[flow_hash mod M]`.
//!
//! Weights follow the scheme of Katran's `MaglevHashV2`: each round every backend adds its
//! weight to an accumulator and takes a turn only when the accumulator reaches the largest
//! weight (which is then subtracted). A backend of weight `w` therefore gets `w / max_weight`
//! turns per round, and with equal weights every backend gets exactly one turn per round,
//! which is the paper's algorithm. Weight 0 backends take no turns and own no slot.
//!
//! # Invariants, and why
//!
//! - **Deterministic across processes, workers and nodes.** A backend's permutation depends only
//!   on its identity (address and port, hashed by [`identity_hash`], a fixed seedless FNV-1a)
//!   and on `M`; nothing is seeded at random. Every worker and every node therefore builds the
//!   same table for the same backend set, so a flow that moves between nodes (ECMP rehash, node
//!   failover) still reaches the same backend.
//! - **Independent of input order.** [`build`] sorts backends by identity hash before the fill,
//!   so the table maps each slot to the same *identity* whatever order the backends are given
//!   in (the returned entries are indices into the slice as given). Only duplicate identities
//!   (equal hashes) fall back to input order among themselves.
//! - **Even.** Each round gives every equal-weight backend one slot, so slot counts differ by at
//!   most one between equal-weight backends (while `N <= M`).
//! - **Minimal disruption.** Removing or adding one of `N` backends changes close to `1/N` of the
//!   slots (a little more, as the paper measures), so most established-but-untracked flows and
//!   other nodes' flows keep their backend.
//! - **Full.** `M` is prime and `skip` is in `1..M`, so every permutation visits every slot and
//!   the fill always terminates with no empty slot (unless no backend has a weight).
//!
//! # Why the tuple hash, and why a fixed one
//!
//! The pipeline looks the table up with a hash of the whole 5-tuple (as Cilium and Katran do),
//! not the client address: different connections from one client spread over all backends,
//! while every packet of one connection maps to the same backend.
//!
//! That hash is [`tuple_hash`], a fixed function of the tuple with a constant seed, the same in
//! every process, worker and node, and *not* the conntrack hash (which each worker seeds at
//! random so that senders cannot aim bucket collisions). This is what makes Maglev consistent:
//! a connection whose conntrack entry was lost, that is steered to another worker (a queue
//! change) or that arrives at another node (an ECMP rehash, a node failover) is looked up in
//! the same table with the same hash and reaches the same backend. The price is that a sender
//! can predict which slot its tuple lands in; it already chooses its own ports, and a slot only
//! names a backend (no table or bucket can be overloaded through it). Changing [`tuple_hash`]
//! between releases moves connections during a rolling upgrade, so it is part of the format,
//! pinned by a test. Client stickiness is the job of session affinity, not of the scheduler.
//!
//! # Size
//!
//! `M` defaults to 65 537 (a prime), i.e. 128 KiB per service port using Maglev. The paper
//! recommends `M > 100 * N` for good balance; with the cap of 131 071 that holds up to about
//! 1 300 backends. Requested sizes are normalized by [`table_size`] (never a panic): 0 means the
//! default, values are clamped to `MIN_SIZE..=MAX_SIZE` and rounded up to the next prime.
//!
//! [`Algorithm::Maglev`]: crate::balance::Algorithm::Maglev

/// Default table size (a prime).
pub const DEFAULT_SIZE: u32 = 65_537;
/// Smallest table size accepted (a prime); smaller requests are raised to it.
pub const MIN_SIZE: u32 = 251;
/// Largest table size accepted (the prime 2^17 - 1); larger requests are lowered to it.
pub const MAX_SIZE: u32 = 131_071;
/// Largest number of backends a table can index (entries are `u16`, and `u16::MAX` marks an
/// empty slot while the table is filled).
pub const MAX_BACKENDS: usize = u16::MAX as usize;
/// Marks a slot not yet claimed during the fill; never present in a returned table.
const EMPTY: u16 = u16::MAX;

/// Seeds that derive the two Maglev hashes `h1` (offset) and `h2` (skip) from one identity hash.
const OFFSET_SEED: u64 = 0x5851_f42d_4c95_7f2d;
const SKIP_SEED: u64 = 0x1405_7b7e_f767_814f;

/// Whether `n` is prime (trial division; meant for table sizes, off the hot path).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n`, or `None` if it does not fit in a `u32` (`n > 4_294_967_291`).
pub fn next_prime(n: u32) -> Option<u32> {
    (n.max(2)..=u32::MAX).find(|&c| is_prime(c))
}

/// The table size actually used for a requested one: 0 means [`DEFAULT_SIZE`]; otherwise the
/// request is clamped to `MIN_SIZE..=MAX_SIZE` and rounded up to the next prime. The result is
/// always a prime in `MIN_SIZE..=MAX_SIZE`.
pub fn table_size(requested: u32) -> u32 {
    if requested == 0 {
        return DEFAULT_SIZE;
    }
    // Both bounds are prime, so the rounded value stays within them.
    next_prime(requested.clamp(MIN_SIZE, MAX_SIZE)).unwrap_or(MAX_SIZE)
}

/// A backend's identity for Maglev: 64-bit FNV-1a over the six bytes `ip || port`, both big
/// endian. Fixed and seedless, so it is the same in every process, run and node.
pub fn identity_hash(ip: u32, port: u16) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in ip.to_be_bytes().into_iter().chain(port.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The fixed hash of a 5-tuple that Maglev indexes its table with: the same on every worker and
/// node (see "Why the tuple hash" above). The tuple is packed into two words, `a` (source and
/// destination address) and `b` (ports and protocol); the result is
/// `fmix64(fmix64(a ^ K) ^ b)` with [`fmix64`] MurmurHash3's finalizer and `K` a constant (the
/// first digits of pi). Both steps are bijections, so for one address pair distinct ports never
/// collide. Addresses and ports are in host order. Do not change it without need: see the
/// module docs.
#[inline(always)]
pub fn tuple_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u64 {
    const K: u64 = 0x243f_6a88_85a3_08d3;
    let a = u64::from(src) << 32 | u64::from(dst);
    let b = u64::from(sport) << 24 | u64::from(dport) << 8 | u64::from(proto);
    fmix64(fmix64(a ^ K) ^ b)
}

/// MurmurHash3's 64-bit finalizer: a fixed bijective mix with full avalanche. FNV-1a of six
/// bytes mixes its high bits poorly, so `h1`/`h2` are derived through this.
#[inline(always)]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// One backend's walk through its permutation during the fill.
struct Walk {
    /// Index into the caller's slice (the value stored in the table).
    index: u16,
    /// Weight (> 0).
    weight: u32,
    /// Weight accumulated towards the next turn.
    credit: u32,
    /// Next slot of the permutation to try.
    next: u32,
    /// Permutation step, in `1..m`.
    skip: u32,
}

/// Builds a Maglev lookup table for `backends`, given as `(identity hash, weight)` pairs (see
/// [`identity_hash`]). Each entry is an index into `backends`.
///
/// The table has [`table_size`]`(m)` slots (so a non-prime `m` is rounded up to a prime; the
/// length of the result is the size in effect). It is empty when no backend has a weight
/// above 0. Weight-0 backends never appear. Only the first [`MAX_BACKENDS`] backends are
/// considered. The result depends only on the set of `(identity, weight)` pairs, not on their
/// order (see the module docs).
///
/// Cost: about `M ln M` slot probes for equal weights, plus one accumulator step per backend
/// per round for skewed weights; it runs when tables are compiled, never per packet.
pub fn build(backends: &[(u64, u16)], m: u32) -> Box<[u16]> {
    let m = table_size(m);
    let mut walks: Vec<(u64, Walk)> = backends
        .iter()
        .take(MAX_BACKENDS)
        .enumerate()
        .filter(|(_, &(_, w))| w > 0)
        .map(|(i, &(id, w))| {
            let offset = (fmix64(id ^ OFFSET_SEED) % u64::from(m)) as u32;
            let skip = (fmix64(id ^ SKIP_SEED) % u64::from(m - 1)) as u32 + 1;
            let walk =
                Walk { index: i as u16, weight: u32::from(w), credit: 0, next: offset, skip };
            (id, walk)
        })
        .collect();
    if walks.is_empty() {
        return Box::default();
    }
    // Fill order by identity, so the table does not depend on the caller's order. The sort is
    // stable: equal identities keep their input order.
    walks.sort_by_key(|(id, _)| *id);
    let mut walks: Vec<Walk> = walks.into_iter().map(|(_, w)| w).collect();
    let max_weight = walks.iter().map(|w| w.weight).max().unwrap_or(1);

    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    // Terminates: the max-weight backend takes a turn every round, and every turn claims one
    // slot, because a full permutation of a prime-sized table always reaches an empty slot.
    loop {
        for w in &mut walks {
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            let mut slot = w.next;
            while table[slot as usize] != EMPTY {
                slot += w.skip;
                if slot >= m {
                    slot -= m;
                }
            }
            table[slot as usize] = w.index;
            w.next = slot + w.skip;
            if w.next >= m {
                w.next -= m;
            }
            filled += 1;
            if filled == m {
                return table.into_boxed_slice();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic test identities: backend `i` at 10.1.x.y:8080.
    fn ids(n: usize) -> Vec<u64> {
        (0..n).map(|i| identity_hash(0x0a01_0000 + i as u32, 8080)).collect()
    }

    fn equal(ids: &[u64]) -> Vec<(u64, u16)> {
        ids.iter().map(|&id| (id, 1)).collect()
    }

    /// The table as identities, so tables over different slices can be compared.
    fn as_identities(table: &[u16], backends: &[(u64, u16)]) -> Vec<u64> {
        table.iter().map(|&i| backends[usize::from(i)].0).collect()
    }

    fn slot_counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table {
            counts[usize::from(i)] += 1;
        }
        counts
    }

    /// splitmix64, an independent stream of random 64-bit keys.
    fn keys(seed: u64) -> impl Iterator<Item = u64> {
        let mut s = seed;
        core::iter::repeat_with(move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        for p in [251, 65_537, 131_071, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [1, 65_535, 65_536, 131_073, 4_294_967_295] {
            assert!(!is_prime(c), "{c}");
        }
        assert_eq!(next_prime(0), Some(2));
        assert_eq!(next_prime(65_536), Some(65_537));
        assert_eq!(next_prime(65_537), Some(65_537));
        assert_eq!(next_prime(4_294_967_291), Some(4_294_967_291));
        assert_eq!(next_prime(4_294_967_292), None);
    }

    #[test]
    fn table_size_is_normalized_to_a_prime_in_range() {
        assert_eq!(table_size(0), DEFAULT_SIZE);
        assert_eq!(table_size(65_537), 65_537);
        assert_eq!(table_size(65_536), 65_537);
        assert_eq!(table_size(1), MIN_SIZE);
        assert_eq!(table_size(252), 257);
        assert_eq!(table_size(u32::MAX), MAX_SIZE);
        assert_eq!(table_size(131_070), MAX_SIZE);
        for r in [1, 2, 100, 1000, 4096, 10_007, 65_536, 100_000, 200_000] {
            let m = table_size(r);
            assert!(is_prime(m) && (MIN_SIZE..=MAX_SIZE).contains(&m), "{r} -> {m}");
        }
        // `build` applies the same rule: the table length is the size in effect.
        assert_eq!(build(&equal(&ids(3)), 1000).len(), 1009);
    }

    /// Golden values from an independent implementation (Python) of FNV-1a and of this fill, so
    /// a change to the hash or the fill (which would move flows between backends on upgrade,
    /// and make nodes of different versions disagree) is caught.
    #[test]
    fn identity_hash_and_table_are_stable() {
        assert_eq!(identity_hash(0, 0), 0xd7e4_fcfa_299d_713d);
        assert_eq!(identity_hash(0x0a00_0001, 80), 0x6d1b_bbf7_7027_b8bc);
        let backends = equal(&ids(3));
        let t: String = build(&backends, 251).iter().map(|i| i.to_string()).collect();
        assert_eq!(t, GOLDEN_251);
    }

    /// `build(3 backends 10.1.0.{0,1,2}:8080, weight 1, M = 251)`, one digit per slot.
    const GOLDEN_251: &str = "\
        12122121010200200021212212101120010001221221210212101000022002121221210210011000212102\
        12102120110002120021211212012100022002120121211210001000212022121121001200001202212012\
        1201210101002212012121121010200201201212012101120010000221201212112101000022120";

    #[test]
    fn empty_and_zero_weight_give_an_empty_table() {
        assert!(build(&[], DEFAULT_SIZE).is_empty());
        assert!(build(&[(1, 0), (2, 0)], DEFAULT_SIZE).is_empty());
    }

    #[test]
    fn weight_zero_backends_own_no_slot() {
        let mut backends = equal(&ids(5));
        backends[2].1 = 0;
        let t = build(&backends, DEFAULT_SIZE);
        assert!(t.iter().all(|&i| i != 2));
        assert!(t.iter().all(|&i| i < 5));
    }

    #[test]
    fn slots_and_keys_spread_within_one_percent_of_even() {
        for n in [3usize, 10, 100] {
            let backends = equal(&ids(n));
            let t = build(&backends, 65_537);
            assert_eq!(t.len(), 65_537);
            let m = t.len() as f64;
            let even = 1.0 / n as f64;
            // One slot per backend per round: counts differ by at most one.
            let counts = slot_counts(&t, n);
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "n={n}: slot counts {lo}..{hi}");
            for (b, &c) in counts.iter().enumerate() {
                let share = c as f64 / m;
                assert!((share - even).abs() <= 0.01, "n={n} backend {b}: slot share {share}");
            }
            // A million random flow hashes, looked up as the scheduler does.
            let mut hits = vec![0usize; n];
            for k in keys(n as u64).take(1_000_000) {
                hits[usize::from(t[(k % m as u64) as usize])] += 1;
            }
            for (b, &h) in hits.iter().enumerate() {
                let share = h as f64 / 1e6;
                assert!((share - even).abs() <= 0.01, "n={n} backend {b}: key share {share}");
            }
        }
    }

    /// Fraction of slots whose backend identity differs between two tables of the same size.
    fn changed(a: &[u64], b: &[u64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    #[test]
    fn removing_or_adding_one_backend_moves_about_one_nth() {
        for n in [3usize, 10, 100] {
            let all = equal(&ids(n + 1));
            let before = &all[..n];
            let t = as_identities(&build(before, 65_537), before);
            let bound = 1.0 / n as f64 + 0.01;
            // Remove each of a few backends in turn (first, middle, last).
            for gone in [0, n / 2, n - 1] {
                let after: Vec<(u64, u16)> = before
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != gone)
                    .map(|(_, b)| *b)
                    .collect();
                let u = as_identities(&build(&after, 65_537), &after);
                let f = changed(&t, &u);
                assert!(f <= bound, "n={n} remove {gone}: {f} of slots changed (bound {bound})");
                // The removed backend's own slots must all move; that alone is about 1/n.
                assert!(f >= 1.0 / n as f64 - 0.01, "n={n} remove {gone}: only {f} changed");
            }
            // Add one.
            let u = as_identities(&build(&all, 65_537), &all);
            let f = changed(&t, &u);
            assert!(f <= bound, "n={n} add: {f} of slots changed (bound {bound})");
        }
    }

    #[test]
    fn table_is_reproducible_and_independent_of_input_order() {
        let backends = equal(&ids(10));
        let a = build(&backends, 65_537);
        let b = build(&backends, 65_537);
        assert_eq!(a, b);
        let mut reversed = backends.clone();
        reversed.reverse();
        let r = build(&reversed, 65_537);
        assert_eq!(as_identities(&a, &backends), as_identities(&r, &reversed));
        // Entries index the slice as given.
        assert_ne!(a, r);
    }

    #[test]
    fn weights_give_proportional_slots() {
        let i = ids(2);
        let t = build(&[(i[0], 2), (i[1], 1)], 65_537);
        let c = slot_counts(&t, 2);
        let ratio = c[0] as f64 / c[1] as f64;
        assert!((ratio - 2.0).abs() < 0.01, "2:1 weights gave {c:?}");

        let i = ids(3);
        let t = build(&[(i[0], 3), (i[1], 2), (i[2], 1)], 65_537);
        let c = slot_counts(&t, 3);
        for (b, w) in [3.0, 2.0, 1.0].into_iter().enumerate() {
            let share = c[b] as f64 / t.len() as f64;
            assert!((share - w / 6.0).abs() < 0.01, "3:2:1 weights gave {c:?}");
        }
    }

    #[test]
    fn more_backends_than_slots_still_fills() {
        let backends = equal(&ids(300));
        let t = build(&backends, MIN_SIZE);
        assert_eq!(t.len(), MIN_SIZE as usize);
        assert!(t.iter().all(|&i| i < 300));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any backend set: the table is full, names only weighted backends, gives equal-weight
        /// backends slot counts within one of each other, and does not depend on input order.
        #[test]
        fn any_set_fills_evenly_and_order_independently(
            ports in proptest::collection::btree_set(1u16.., 1..40),
            weights in proptest::collection::vec(0u16..4, 40),
            rotate in 0usize..40,
        ) {
            let backends: Vec<(u64, u16)> = ports
                .iter()
                .zip(&weights)
                .map(|(&p, &w)| (identity_hash(0x0a00_0001, p), w))
                .collect();
            let t = build(&backends, 1009);
            if backends.iter().all(|b| b.1 == 0) {
                prop_assert!(t.is_empty());
                return Ok(());
            }
            prop_assert_eq!(t.len(), 1009);
            prop_assert!(t.iter().all(|&i| backends[usize::from(i)].1 > 0));
            let counts = slot_counts(&t, backends.len());
            for w in 1..4u16 {
                let same: Vec<usize> = counts
                    .iter()
                    .zip(&backends)
                    .filter(|(_, b)| b.1 == w)
                    .map(|(&c, _)| c)
                    .collect();
                if let (Some(lo), Some(hi)) = (same.iter().min(), same.iter().max()) {
                    prop_assert!(hi - lo <= 1, "weight {} counts {:?}", w, same);
                }
            }
            let mut rotated = backends.clone();
            rotated.rotate_left(rotate % backends.len());
            let r = build(&rotated, 1009);
            prop_assert_eq!(as_identities(&t, &backends), as_identities(&r, &rotated));
        }
    }

    #[test]
    fn tuple_hash_is_pinned() {
        // The hash is part of the format: every node and release must agree on it (a change
        // moves Maglev connections during a rolling upgrade). These values pin it (computed
        // independently from the formula in the docs).
        const PIN: [u64; 3] = [0xf590_4f05_c982_8dd6, 0x12da_bf7f_8286_a004, 0xfaa1_c38a_462b_6425];
        assert_eq!(tuple_hash(0, 0, 0, 0, 0), PIN[0]);
        assert_eq!(tuple_hash(0x0a80_0001, 0x0a60_0001, 40_000, 443, 6), PIN[1]);
        assert_eq!(tuple_hash(0x0a80_0001, 0x0a60_0001, 40_001, 443, 6), PIN[2]);
        // Every field matters.
        let base = (0x0a80_0001, 0x0a60_0001, 40_000, 443, 6);
        let h = |(a, b, c, d, e): (u32, u32, u16, u16, u8)| tuple_hash(a, b, c, d, e);
        for other in [
            (1, base.1, base.2, base.3, base.4),
            (base.0, 1, base.2, base.3, base.4),
            (base.0, base.1, 1, base.3, base.4),
            (base.0, base.1, base.2, 1, base.4),
            (base.0, base.1, base.2, base.3, 17),
        ] {
            assert_ne!(h(other), h(base), "{other:?}");
        }
    }
}
