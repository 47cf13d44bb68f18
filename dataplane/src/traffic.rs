//! Per-backend traffic counters, for `kxdp-inspect services` and the metrics.
//!
//! Counted where the packet path already is: each conntrack flow record carries its packets
//! (as before) and bytes per direction, updated with the record the packet just matched, so
//! counting adds no memory access and no atomic per packet. When a flow leaves conntrack (end,
//! expiry, eviction, flush) its counts are added to its worker's [`Traffic`] of retired flows,
//! indexed by the backend's stable id (one access per flow). A backend's totals are then its
//! retired counts plus those of its live flows, which the worker sums on request between
//! batches ([`backend_totals`]), over all workers.
//!
//! Counted as `ipvsadm --stats` counts: connections are flows scheduled to the backend;
//! packets and bytes (IP datagram length) of translated flows, "in" from clients to the
//! backend, "out" from the backend back. A backend id above the capacity is not counted. The
//! arrays are allocated zeroed, so the pages of ids never used are never touched. Retiring a
//! flow writes one 16-byte record of narrow counters (four backends to a cache line); a
//! backend's wide counters (a 64-byte line of its own) take over the narrow ones only when one
//! would overflow.

use serde::{Deserialize, Serialize};

use crate::conntrack::{Conntrack, Flow};
use crate::mem::{HugeArray, Zeroable};
use crate::tables::BackendId;

/// One backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTraffic {
    /// Connections (new flows) scheduled to the backend.
    pub conns: u64,
    /// Packets from clients to the backend.
    pub packets_in: u64,
    /// Packets from the backend to clients.
    pub packets_out: u64,
    /// Bytes (IP datagrams) from clients to the backend.
    pub bytes_in: u64,
    /// Bytes (IP datagrams) from the backend to clients.
    pub bytes_out: u64,
    /// Flows to the backend in conntrack now (live ones only; 0 for retired counts).
    #[serde(default)]
    pub active: u64,
}

impl BackendTraffic {
    /// Adds another worker's counters into these.
    pub fn merge(&mut self, o: &BackendTraffic) {
        self.conns += o.conns;
        self.packets_in += o.packets_in;
        self.packets_out += o.packets_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.active += o.active;
    }
}

/// A worker's counters for backend ids `0..capacity`, in two arrays:
/// - wide: per id `[conns, packets_in, packets_out, bytes_in, bytes_out]` as `u64`s at the
///   start of its own 64-byte line (a spill touches one line, not two as 40-byte records
///   straddling lines would 60% of the time), in a plain `u64` array so that the allocation is
///   a zeroed one (`calloc`: pages of ids never used are never touched), whose first line
///   boundary is where id 0 starts;
/// - narrow: per id a 16-byte record ([`Narrow`]), which retiring a flow writes. At 100,000
///   backends it is 1.6 MB against 6.4 MB of wide lines, so the record an eviction updates is
///   more often still in cache (section "Issue 2, sixth session" of `benches/README.md`). A
///   retirement that would overflow a narrow counter first moves the backend's narrow counts,
///   and its own, into the wide line ("spills").
///
/// [`Traffic::get`] adds both, so totals are exact at any moment.
pub struct Traffic {
    words: Box<[u64]>,
    /// Index in `words` of id 0's line.
    first: usize,
    capacity: usize,
    /// Per backend id, the counts not yet spilled into `words`.
    narrow: HugeArray<Narrow>,
}

/// One backend's recent retirements, in counters narrow enough that four backends share a
/// cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
struct Narrow {
    bytes_in: u32,
    bytes_out: u32,
    packets_in: u16,
    packets_out: u16,
    conns: u16,
}

// SAFETY: integers only; all-zero is no count.
unsafe impl Zeroable for Narrow {}

const _: () = assert!(std::mem::size_of::<Narrow>() == 16);

/// `u64`s per backend: one cache line.
const STRIDE: usize = 8;
const CONNS: usize = 0;
const PACKETS_IN: usize = 1;
const PACKETS_OUT: usize = 2;
const BYTES_IN: usize = 3;
const BYTES_OUT: usize = 4;

impl Traffic {
    /// Counters for backend ids below `capacity`.
    pub fn new(capacity: usize) -> Self {
        // One line more than needed, to start id 0 on a line boundary.
        let words = vec![0u64; (capacity + 1) * STRIDE].into_boxed_slice();
        let misalign = (words.as_ptr() as usize % 64) / 8;
        let first = (STRIDE - misalign) % STRIDE;
        Self { words, first, capacity, narrow: HugeArray::zeroed(capacity) }
    }

    /// The counters of `backend`, if in range.
    #[inline(always)]
    fn line(&self, backend: BackendId) -> Option<&[u64]> {
        let i = backend as usize;
        (i < self.capacity).then(|| &self.words[self.first + i * STRIDE..][..5])
    }

    /// Starts loading the counters of `backend` (a flow of it is about to be retired).
    #[inline(always)]
    pub fn prefetch(&self, backend: BackendId) {
        crate::mem::prefetch(self.narrow.as_ptr().wrapping_add(backend as usize));
    }

    /// Adds a removed flow's counts to its backend's (in the narrow record, or through a
    /// spill when one of them would overflow there).
    #[inline]
    pub fn retire(&mut self, backend: BackendId, f: &Flow) {
        let Some(n) = self.narrow.get_mut(backend as usize) else {
            return;
        };
        // The sums, wide (a flow's counts are far below 2^63, as the wide line's are).
        let bytes = [u64::from(n.bytes_in) + f.bytes_orig, u64::from(n.bytes_out) + f.bytes_reply];
        let packets =
            [u64::from(n.packets_in) + f.packets_orig, u64::from(n.packets_out) + f.packets_reply];
        if (bytes[0] | bytes[1]) >> 32 == 0
            && (packets[0] | packets[1]) >> 16 == 0
            && n.conns < u16::MAX
        {
            // Each sum fits its field (checked just above).
            (n.bytes_in, n.bytes_out) = (bytes[0] as u32, bytes[1] as u32);
            (n.packets_in, n.packets_out) = (packets[0] as u16, packets[1] as u16);
            n.conns += 1;
        } else {
            self.spill(backend as usize, f);
        }
    }

    /// Moves backend `i`'s narrow counts, plus flow `f`'s, into its wide line.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, i: usize, f: &Flow) {
        let n = std::mem::take(&mut self.narrow[i]);
        let c = &mut self.words[self.first + i * STRIDE..][..5];
        c[CONNS] += u64::from(n.conns) + 1;
        c[PACKETS_IN] += u64::from(n.packets_in) + f.packets_orig;
        c[PACKETS_OUT] += u64::from(n.packets_out) + f.packets_reply;
        c[BYTES_IN] += u64::from(n.bytes_in) + f.bytes_orig;
        c[BYTES_OUT] += u64::from(n.bytes_out) + f.bytes_reply;
    }

    /// The counters of `backend` (zero when out of range).
    pub fn get(&self, backend: BackendId) -> BackendTraffic {
        let (Some(c), Some(n)) = (self.line(backend), self.narrow.get(backend as usize)) else {
            return BackendTraffic::default();
        };
        BackendTraffic {
            conns: c[CONNS] + u64::from(n.conns),
            packets_in: c[PACKETS_IN] + u64::from(n.packets_in),
            packets_out: c[PACKETS_OUT] + u64::from(n.packets_out),
            bytes_in: c[BYTES_IN] + u64::from(n.bytes_in),
            bytes_out: c[BYTES_OUT] + u64::from(n.bytes_out),
            active: 0,
        }
    }
}

/// The totals of backends `ids` on one worker: retired flows plus live ones (a scan of the
/// worker's conntrack; for inspection, not the packet path).
pub fn backend_totals(ct: &Conntrack, ids: &[BackendId]) -> Vec<BackendTraffic> {
    let mut out: Vec<BackendTraffic> = ids.iter().map(|&b| ct.retired().get(b)).collect();
    let at: std::collections::HashMap<BackendId, usize> =
        ids.iter().enumerate().map(|(i, &b)| (b, i)).collect();
    for f in ct.iter() {
        if f.backend == 0 {
            continue;
        }
        if let Some(&i) = at.get(&f.backend) {
            out[i].merge(&BackendTraffic {
                conns: 1,
                packets_in: f.packets_orig,
                packets_out: f.packets_reply,
                bytes_in: f.bytes_orig,
                bytes_out: f.bytes_reply,
                active: 1,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_counts_on_a_line_of_its_own() {
        for capacity in [1, 7, 1000] {
            let mut t = Traffic::new(capacity);
            for id in 0..capacity as BackendId {
                let p = t.line(id).unwrap().as_ptr() as usize;
                assert_eq!(p % 64, 0, "id {id} starts a line");
            }
            assert!(t.line(capacity as BackendId).is_none());
            // The last id's counters are its own, and one past it is not counted.
            let mut f = crate::conntrack::Flow::new(
                Default::default(),
                Default::default(),
                1,
                capacity as BackendId - 1,
                0,
            );
            f.packets_orig = 3;
            t.retire(capacity as BackendId - 1, &f);
            t.retire(capacity as BackendId, &f);
            assert_eq!(t.get(capacity as BackendId - 1).packets_in, 3);
            assert_eq!(t.get(capacity as BackendId - 1).conns, 1);
            let others: u64 = (0..capacity as BackendId - 1).map(|id| t.get(id).conns).sum();
            assert_eq!(others, 0);
        }
    }

    #[test]
    fn narrow_counters_spill_into_exact_totals() {
        // Flows whose counts overflow each narrow counter (a 5 GB flow, a 70,000-packet one,
        // 70,000 one-packet flows), mixed with small ones: every total is the plain sum.
        let mut t = Traffic::new(4);
        let mut want = BackendTraffic::default();
        let mut retire = |t: &mut Traffic, pin: u64, pout: u64, bin: u64, bout: u64| {
            let mut f =
                crate::conntrack::Flow::new(Default::default(), Default::default(), 1, 2, 0);
            (f.packets_orig, f.packets_reply, f.bytes_orig, f.bytes_reply) = (pin, pout, bin, bout);
            t.retire(2, &f);
            want.merge(&BackendTraffic {
                conns: 1,
                packets_in: pin,
                packets_out: pout,
                bytes_in: bin,
                bytes_out: bout,
                active: 0,
            });
            assert_eq!(t.get(2), want);
        };
        retire(&mut t, 3, 2, 500, 900);
        retire(&mut t, 4_000_000, 3_000_000, 5_000_000_000, 1);
        retire(&mut t, 70_000, 1, 10, 6_000_000_000);
        retire(&mut t, 1, 70_000, 4_294_967_295, 4_294_967_295);
        for n in 0..70_000u64 {
            retire(&mut t, 1, n % 2, 60, 40 * (n % 3));
        }
        assert_eq!(t.get(2).conns, 70_004);
        assert_eq!(t.get(1), BackendTraffic::default(), "other backends untouched");
        assert!(t.narrow[2].conns > 0, "recent counts are narrow");
        assert!(t.line(2).unwrap()[CONNS] > 0, "older ones spilled");
    }

    #[test]
    fn totals_are_retired_plus_live_flows() {
        use crate::balance::ConnCounts;
        use crate::conntrack::{Dir, FlowKey, Timeouts};
        let mut ct =
            Conntrack::new(64, Timeouts::default(), std::sync::Arc::new(ConnCounts::new(8)));
        let key = |sport| FlowKey { src: 1, dst: 2, sport, dport: 53, proto: 17 };
        let rev = |k: FlowKey| FlowKey { src: 9, dst: k.src, sport: 53, dport: k.sport, proto: 17 };
        let insert = |ct: &mut Conntrack, k: FlowKey, backend, bytes| {
            let (h, hr) = (ct.hash(&k), ct.hash(&rev(k)));
            ct.insert_packet(Flow::new(k, rev(k), 1, backend, 1), h, hr, 0, 0, bytes)
        };
        let a = insert(&mut ct, key(1), 3, 40);
        ct.account(a, Dir::Reply, 0, 1, 100);
        insert(&mut ct, key(2), 3, 41);
        ct.insert(Flow::new(key(3), rev(key(3)), 1, 20, 1), 0, 0);
        let want = |conns, pin, pout, bin, bout, active| BackendTraffic {
            conns,
            packets_in: pin,
            packets_out: pout,
            bytes_in: bin,
            bytes_out: bout,
            active,
        };
        assert_eq!(
            backend_totals(&ct, &[3, 5]),
            [want(2, 2, 1, 81, 100, 2), want(0, 0, 0, 0, 0, 0)]
        );
        // A removed flow's counts stay with its backend; it is no longer active.
        ct.remove(a);
        assert_eq!(backend_totals(&ct, &[3]), [want(2, 2, 1, 81, 100, 1)]);
        assert_eq!(ct.retired().get(3), want(1, 1, 1, 40, 100, 0));
        // Backend 20 is beyond the retired array: live flows count, retired ones cannot.
        assert_eq!(backend_totals(&ct, &[20])[0].conns, 1);
    }
}
