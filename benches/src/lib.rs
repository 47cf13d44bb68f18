//! Shared set-up for the benchmarks: synthetic service tables and traffic.
//!
//! Addresses are fictional and only ever used in memory (or inside test network namespaces).

pub mod chart;
pub mod kubeproxy;
pub mod load;
pub mod restore;

use std::net::Ipv4Addr;

use dataplane::balance::Algorithm;
use dataplane::pipeline::{Frame, Shared, Verdict, WorkerConfig, WorkerState};
use dataplane::tables::{
    Backend, Frontend, FrontendKey, FrontendKind, NextHop, Protocol, Routes, ServicePort,
    ServiceSpec, Tables,
};
use etherparse::PacketBuilder;

/// Frames per batch, as the AF_XDP workers use.
pub const BATCH: usize = 64;
/// Interfaces of the synthetic node.
pub const IF_CLIENTS: u32 = 2;
/// Interface towards the backends.
pub const IF_BACKENDS: u32 = 3;

/// The ClusterIP of service `i` (10.96.0.0/12 style, i < 2^20).
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i + 1)
}

/// Backend `j` of service `i`: 10.128.0.0/9, one address per endpoint.
pub fn backend_ip(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + i * 16 + j + 1)
}

/// Client address `c` (172.16.0.0/12).
pub fn client_ip(c: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 + c + 1)
}

/// Tables with `services` UDP services of `endpoints` endpoints each, port 53 -> 5353, and a
/// next hop for every backend and a default route towards the clients.
pub fn tables(services: u32, endpoints: u32, algorithm: Algorithm) -> Tables {
    let mut b = Tables::builder(1);
    let mut routes = Routes::default();
    let hop_b =
        NextHop { ifindex: IF_BACKENDS, src_mac: [2, 0, 0, 0, 0, 3], dst_mac: [2, 0, 0, 0, 2, 0] };
    let hop_c =
        NextHop { ifindex: IF_CLIENTS, src_mac: [2, 0, 0, 0, 0, 2], dst_mac: [2, 0, 0, 0, 1, 0] };
    routes.add_prefix(Ipv4Addr::new(10, 128, 0, 0), 9, hop_b);
    routes.add_prefix(Ipv4Addr::new(172, 16, 0, 0), 12, hop_c);
    for i in 0..services {
        let id = i + 1;
        let backends = (0..endpoints)
            .map(|j| Backend::ready(i * endpoints + j + 1, backend_ip(i, j), 5353))
            .collect();
        let spec = ServiceSpec {
            id,
            name: format!("bench/svc-{i}:dns"),
            proto: Protocol::Udp,
            algorithm,
            affinity_timeout_s: None,
            maglev_size: dataplane::tables::DEFAULT_MAGLEV_SIZE,
        };
        b.upsert_service(std::sync::Arc::new(ServicePort::new(spec, backends))).unwrap();
        b.upsert_frontend(
            FrontendKey::new(vip(i), 53, Protocol::Udp),
            Frontend { service: id, kind: FrontendKind::ClusterIp, masquerade_remote: false },
        )
        .unwrap();
    }
    b.routes(routes).build()
}

/// A UDP frame from `src:sport` to `dst:dport` with a 18-byte payload (64-byte frame on the
/// wire with FCS).
pub fn udp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 0], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let payload = [0u8; 18];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).unwrap();
    out
}

/// A TCP SYN from `src:sport` to `dst:dport` (the source port sits where a UDP frame's does,
/// so [`Batch::run_with_sport`] renews it the same way).
pub fn tcp_syn_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 0], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64_240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).unwrap();
    out
}

/// A worker with room for `flows` flows.
pub fn worker(flows: usize, backends: usize) -> WorkerState {
    let cfg = WorkerConfig { conntrack_capacity: flows, ..WorkerConfig::default() };
    WorkerState::new(&cfg, &Shared::new(backends + 1, 1 << 16))
}

/// Buffers for one batch, refilled from templates before each run (the pipeline rewrites
/// frames in place). Running a batch allocates nothing.
pub struct Batch {
    mem: Vec<u8>,
    lens: [usize; BATCH],
    verdicts: [Verdict; BATCH],
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// Room per frame, as an AF_XDP chunk.
pub const FRAME_ROOM: usize = 2048;

impl Batch {
    /// Room for [`BATCH`] frames of 2 KiB.
    pub fn new() -> Self {
        Self {
            mem: vec![0u8; FRAME_ROOM * BATCH],
            lens: [0; BATCH],
            verdicts: [Verdict::Pass(dataplane::PassReason::NotOurs); BATCH],
        }
    }

    /// Frame `k` of the last run, as the pipeline left it.
    pub fn frame(&self, k: usize) -> &[u8] {
        &self.mem[k * FRAME_ROOM..k * FRAME_ROOM + self.lens[k]]
    }

    /// Copies `templates` in and runs the pipeline over them; returns the verdicts.
    #[inline]
    pub fn run(
        &mut self,
        templates: &[Vec<u8>],
        tables: &Tables,
        w: &mut WorkerState,
        now: u64,
    ) -> &[Verdict] {
        self.run_with_sport(templates, None, tables, w, now)
    }

    /// Like [`Batch::run`], overwriting each frame's UDP source port with `sport` when given
    /// (so a template set yields new 5-tuples; the L4 checksum, which the pipeline updates but
    /// does not verify, is left stale).
    #[inline]
    pub fn run_with_sport(
        &mut self,
        templates: &[Vec<u8>],
        sport: Option<u16>,
        tables: &Tables,
        w: &mut WorkerState,
        now: u64,
    ) -> &[Verdict] {
        self.run_ports(templates, |_| sport, tables, w, now)
    }

    /// Like [`Batch::run_with_sport`], giving frame `k` the source port `first + k` (wrapping),
    /// so that frames of one batch built from equal templates are still distinct flows.
    #[inline]
    pub fn run_with_sports(
        &mut self,
        templates: &[Vec<u8>],
        first: u16,
        tables: &Tables,
        w: &mut WorkerState,
        now: u64,
    ) -> &[Verdict] {
        self.run_ports(templates, |k| Some(first.wrapping_add(k as u16)), tables, w, now)
    }

    #[inline(always)]
    fn run_ports(
        &mut self,
        templates: &[Vec<u8>],
        sport: impl Fn(usize) -> Option<u16>,
        tables: &Tables,
        w: &mut WorkerState,
        now: u64,
    ) -> &[Verdict] {
        let n = self.with_frames(templates, sport, |frames, verdicts| {
            dataplane::process_batch(frames, verdicts, tables, w, now)
        });
        &self.verdicts[..n]
    }

    /// What [`Batch::run_with_sport`] does besides processing: copies the templates in and
    /// builds the frame descriptors, then hands them to `std::hint::black_box` instead of the
    /// pipeline. The benchmark's own cost, measured alone so it can be told apart.
    pub fn copy_only(&mut self, templates: &[Vec<u8>], sport: Option<u16>) -> usize {
        self.with_frames(
            templates,
            |_| sport,
            |frames, verdicts| {
                std::hint::black_box((frames, verdicts));
            },
        )
    }

    #[inline(always)]
    fn with_frames(
        &mut self,
        templates: &[Vec<u8>],
        sport: impl Fn(usize) -> Option<u16>,
        run: impl FnOnce(&mut [Frame<'_>], &mut [Verdict]),
    ) -> usize {
        let n = templates.len().min(BATCH);
        for (k, t) in templates.iter().take(n).enumerate() {
            let buf = &mut self.mem[k * FRAME_ROOM..k * FRAME_ROOM + t.len()];
            buf.copy_from_slice(t);
            if let Some(p) = sport(k) {
                buf[34..36].copy_from_slice(&p.to_be_bytes());
            }
            self.lens[k] = t.len();
        }
        let mut chunks = self.mem.chunks_mut(FRAME_ROOM);
        let lens = &self.lens;
        let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|k| Frame {
            buf: chunks.next().expect("BATCH chunks"),
            len: lens[k],
            ifindex: IF_CLIENTS,
        });
        run(&mut frames[..n], &mut self.verdicts[..n]);
        n
    }
}
