//! Per-backend traffic counters of one worker, for `kxdp-inspect services` and the metrics.
//!
//! Plain integers indexed by the backend's stable id (the tables give each backend an id that
//! does not change while it exists), owned and written by the worker alone: counting a packet
//! is one indexed add, no atomic and no lock. Others read them through a worker request (see
//! `io::inspect`), which the worker answers between batches with the ids asked for. Totals over
//! workers are the sum of each worker's answer.
//!
//! Counted as `ipvsadm --stats` counts: connections are new flows scheduled to the backend;
//! packets and bytes (IP datagram length) of translated flows, "in" from clients to the
//! backend, "out" from the backend back. A backend id above the capacity is not counted.
//! The array is allocated zeroed, so the pages of ids never used are never touched.

use serde::{Deserialize, Serialize};

use crate::conntrack::Dir;
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
}

impl BackendTraffic {
    /// Adds another worker's counters into these.
    pub fn merge(&mut self, o: &BackendTraffic) {
        self.conns += o.conns;
        self.packets_in += o.packets_in;
        self.packets_out += o.packets_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }
}

/// A worker's counters for backend ids `0..capacity`: per id `[conns, packets_in, packets_out,
/// bytes_in, bytes_out]`, plain `u64` arrays so that the allocation is a zeroed one.
pub struct Traffic {
    per: Box<[[u64; 5]]>,
}

const CONNS: usize = 0;
const PACKETS_IN: usize = 1;
const PACKETS_OUT: usize = 2;
const BYTES_IN: usize = 3;
const BYTES_OUT: usize = 4;

impl Traffic {
    /// Counters for backend ids below `capacity`.
    pub fn new(capacity: usize) -> Self {
        Self { per: vec![[0u64; 5]; capacity].into_boxed_slice() }
    }

    /// Counts one packet of `bytes` of a flow to `backend`, in direction `dir`.
    #[inline(always)]
    pub fn packet(&mut self, backend: BackendId, dir: Dir, bytes: usize) {
        if let Some(c) = self.per.get_mut(backend as usize) {
            let (p, b) = match dir {
                Dir::Orig => (PACKETS_IN, BYTES_IN),
                Dir::Reply => (PACKETS_OUT, BYTES_OUT),
            };
            c[p] += 1;
            c[b] += bytes as u64;
        }
    }

    /// Counts a new connection to `backend` with its first packet of `bytes`.
    #[inline(always)]
    pub fn connection(&mut self, backend: BackendId, bytes: usize) {
        if let Some(c) = self.per.get_mut(backend as usize) {
            c[CONNS] += 1;
            c[PACKETS_IN] += 1;
            c[BYTES_IN] += bytes as u64;
        }
    }

    /// The counters of `backend` (zero when out of range).
    pub fn get(&self, backend: BackendId) -> BackendTraffic {
        self.per.get(backend as usize).map_or_else(BackendTraffic::default, |c| BackendTraffic {
            conns: c[CONNS],
            packets_in: c[PACKETS_IN],
            packets_out: c[PACKETS_OUT],
            bytes_in: c[BYTES_IN],
            bytes_out: c[BYTES_OUT],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_direction_and_ignores_ids_out_of_range() {
        let mut t = Traffic::new(8);
        t.connection(3, 60);
        t.packet(3, Dir::Orig, 52);
        t.packet(3, Dir::Reply, 1500);
        t.packet(9, Dir::Orig, 52);
        t.connection(8, 60);
        assert_eq!(
            t.get(3),
            BackendTraffic {
                conns: 1,
                packets_in: 2,
                packets_out: 1,
                bytes_in: 112,
                bytes_out: 1500
            }
        );
        assert_eq!(t.get(9), BackendTraffic::default());
        assert_eq!(t.get(8), BackendTraffic::default());
        let mut sum = t.get(3);
        sum.merge(&t.get(3));
        assert_eq!(sum.conns, 2);
        assert_eq!(sum.bytes_out, 3000);
    }
}
