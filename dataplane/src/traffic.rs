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
//! array is allocated zeroed, so the pages of ids never used are never touched; each backend's
//! counters sit at the start of a cache line of their own (64 bytes per id), so retiring a flow
//! writes one line.

use serde::{Deserialize, Serialize};

use crate::conntrack::{Conntrack, Flow};
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

/// A worker's counters for backend ids `0..capacity`: per id `[conns, packets_in, packets_out,
/// bytes_in, bytes_out]` at the start of its own 64-byte line (so retiring a flow touches one
/// line, not two as 40-byte records straddling lines would 60% of the time), in a plain `u64`
/// array so that the allocation is a zeroed one (`calloc`: pages of ids never used are never
/// touched), whose first line boundary is where id 0 starts.
pub struct Traffic {
    words: Box<[u64]>,
    /// Index in `words` of id 0's line.
    first: usize,
    capacity: usize,
}

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
        Self { words, first, capacity }
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
        let p = self.words.as_ptr().wrapping_add(self.first + backend as usize * STRIDE);
        crate::mem::prefetch(p);
    }

    /// Adds a removed flow's counts to its backend's.
    #[inline]
    pub fn retire(&mut self, backend: BackendId, f: &Flow) {
        let i = backend as usize;
        if i < self.capacity {
            let c = &mut self.words[self.first + i * STRIDE..][..5];
            c[CONNS] += 1;
            c[PACKETS_IN] += f.packets_orig;
            c[PACKETS_OUT] += f.packets_reply;
            c[BYTES_IN] += f.bytes_orig;
            c[BYTES_OUT] += f.bytes_reply;
        }
    }

    /// The counters of `backend` (zero when out of range).
    pub fn get(&self, backend: BackendId) -> BackendTraffic {
        self.line(backend).map_or_else(BackendTraffic::default, |c| BackendTraffic {
            conns: c[CONNS],
            packets_in: c[PACKETS_IN],
            packets_out: c[PACKETS_OUT],
            bytes_in: c[BYTES_IN],
            bytes_out: c[BYTES_OUT],
            active: 0,
        })
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
