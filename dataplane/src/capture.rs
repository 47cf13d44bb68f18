//! Packet capture of the frames the workers handle, before and after NAT.
//!
//! Frames handled through AF_XDP never reach the kernel's taps, so tcpdump does not see them;
//! `kxdp-inspect capture` asks the dataplane for them instead. One capture session at a time:
//! while it is active, each worker copies the frames that match its filter into a bounded ring
//! of preallocated buffers, once as received ([`Stage::Rx`], before NAT) and once as
//! transmitted ([`Stage::Tx`], after NAT); the inspect server drains the ring and streams the
//! frames to the CLI, which writes a pcap file. When no session is active a worker pays one
//! relaxed atomic load per batch ([`Capture::active`]). A full ring loses frames (counted in
//! `lost`), it never blocks a worker; nothing is allocated while capturing.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crossbeam::queue::ArrayQueue;
use serde::{Deserialize, Serialize};

use crate::wire::{self, ip, rd16, Parsed};

/// Largest frame kept (longer frames are truncated to it, as a snap length).
pub const SNAPLEN: usize = 2048;

/// Which frames a capture keeps; every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureFilter {
    /// Source or destination address.
    pub addr: Option<Ipv4Addr>,
    /// Source or destination port (TCP, UDP).
    pub port: Option<u16>,
    /// IP protocol number.
    pub proto: Option<u8>,
}

impl CaptureFilter {
    /// Whether the frame `b` matches. Non-IPv4 frames match only an empty filter.
    pub fn matches(&self, b: &[u8]) -> bool {
        if *self == CaptureFilter::default() {
            return true;
        }
        let Parsed::Ipv4(o) = wire::parse(b) else { return false };
        if self.proto.is_some_and(|p| p != o.proto) {
            return false;
        }
        if let Some(a) = self.addr {
            let a = u32::from(a);
            if ip::src(b, o.l3) != a && ip::dst(b, o.l3) != a {
                return false;
            }
        }
        if let Some(p) = self.port {
            let l4 = o.has_l4 && matches!(o.proto, wire::IPPROTO_TCP | wire::IPPROTO_UDP);
            if !l4 || (rd16(b, o.l4) != p && rd16(b, o.l4 + 2) != p) {
                return false;
            }
        }
        true
    }
}

/// Where in the pipeline a frame was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// As received, before the pipeline (before NAT).
    Rx,
    /// As transmitted, after the pipeline (after NAT).
    Tx,
}

/// A captured frame, as streamed to the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Captured {
    /// Wall-clock time, ns since the Unix epoch.
    pub ts_ns: u64,
    /// Before or after the pipeline.
    pub stage: Stage,
    /// Ingress interface (rx) or egress interface (tx).
    pub ifindex: u32,
    /// Worker that handled it.
    pub worker: u16,
    /// Original length.
    pub orig_len: u32,
    /// The frame's bytes, hex (truncated to [`SNAPLEN`]).
    pub hex: String,
}

struct Slot {
    mono_ns: u64,
    stage: Stage,
    ifindex: u32,
    worker: u16,
    orig_len: u32,
    len: usize,
    data: Box<[u8; SNAPLEN]>,
}

/// The capture session shared by the workers and the inspect server.
pub struct Capture {
    claimed: AtomicBool,
    active: AtomicBool,
    filter: ArcSwap<CaptureFilter>,
    pool: ArrayQueue<Box<[u8; SNAPLEN]>>,
    ring: ArrayQueue<Slot>,
    lost: AtomicU64,
    /// The clock the workers' `now` counts from, to timestamp frames in wall-clock time.
    epoch: (Instant, SystemTime),
}

impl Capture {
    /// A session with room for `frames` frames in flight (allocated now).
    pub fn new(frames: usize) -> Self {
        let pool = ArrayQueue::new(frames.max(1));
        for _ in 0..frames.max(1) {
            let _ = pool.push(Box::new([0u8; SNAPLEN]));
        }
        Self {
            claimed: AtomicBool::new(false),
            active: AtomicBool::new(false),
            filter: ArcSwap::from_pointee(CaptureFilter::default()),
            pool,
            ring: ArrayQueue::new(frames.max(1)),
            lost: AtomicU64::new(0),
            epoch: (Instant::now(), SystemTime::now()),
        }
    }

    /// Whether a session is running (one relaxed load; workers check it once per batch).
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts a session; false when one is already running.
    pub fn start(&self, filter: CaptureFilter) -> bool {
        if self.claimed.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        self.filter.store(std::sync::Arc::new(filter));
        self.lost.store(0, Ordering::Relaxed);
        self.active.store(true, Ordering::SeqCst);
        true
    }

    /// Ends the session and returns the frames still queued to the pool.
    pub fn stop(&self) {
        self.active.store(false, Ordering::SeqCst);
        while let Some(s) = self.ring.pop() {
            let _ = self.pool.push(s.data);
        }
        self.claimed.store(false, Ordering::SeqCst);
    }

    /// The filter of the running session (workers load it once per batch while active).
    pub fn filter(&self) -> arc_swap::Guard<std::sync::Arc<CaptureFilter>> {
        self.filter.load()
    }

    /// Copies `frame` into the ring if `filter` matches; a full ring counts a lost frame.
    #[inline]
    pub fn offer(
        &self,
        filter: &CaptureFilter,
        stage: Stage,
        frame: &[u8],
        ifindex: u32,
        worker: u16,
    ) {
        if !filter.matches(frame) {
            return;
        }
        let Some(mut data) = self.pool.pop() else {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let len = frame.len().min(SNAPLEN);
        data[..len].copy_from_slice(&frame[..len]);
        let slot = Slot {
            mono_ns: self.epoch.0.elapsed().as_nanos() as u64,
            stage,
            ifindex,
            worker,
            orig_len: frame.len() as u32,
            len,
            data,
        };
        if let Err(s) = self.ring.push(slot) {
            let _ = self.pool.push(s.data);
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The next captured frame, if any.
    pub fn pop(&self) -> Option<Captured> {
        let s = self.ring.pop()?;
        let ts = self.epoch.1 + Duration::from_nanos(s.mono_ns);
        let mut hex = String::with_capacity(s.len * 2);
        for b in &s.data[..s.len] {
            hex.push_str(&format!("{b:02x}"));
        }
        let c = Captured {
            ts_ns: ts.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            stage: s.stage,
            ifindex: s.ifindex,
            worker: s.worker,
            orig_len: s.orig_len,
            hex,
        };
        let _ = self.pool.push(s.data);
        Some(c)
    }

    /// Matching frames lost to a full ring in this session.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Runs one session for a client: starts it, sends [`Response::CaptureStarted`], then each
/// frame, until `max_packets` frames or `max_ms` have passed or the client goes away, then
/// [`Response::CaptureEnd`].
///
/// [`Response::CaptureStarted`]: crate::io::inspect::Response::CaptureStarted
/// [`Response::CaptureEnd`]: crate::io::inspect::Response::CaptureEnd
pub fn stream(
    cap: &Capture,
    filter: CaptureFilter,
    max_packets: u64,
    max_ms: u64,
    mut send: impl FnMut(crate::io::inspect::Response) -> std::io::Result<()>,
) {
    use crate::io::inspect::Response;
    if !cap.start(filter.clone()) {
        let _ = send(Response::Error { message: "a capture is already running".into() });
        return;
    }
    tracing::info!(?filter, max_packets, max_ms, "capture started");
    let deadline = Instant::now() + Duration::from_millis(max_ms);
    let mut sent = 0u64;
    let mut ok = send(Response::CaptureStarted).is_ok();
    while ok && sent < max_packets && Instant::now() < deadline {
        match cap.pop() {
            Some(f) => {
                ok = send(Response::Frame(f)).is_ok();
                sent += 1;
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let lost = cap.lost();
    cap.stop();
    tracing::info!(packets = sent, lost, "capture ended");
    if ok {
        let _ = send(Response::CaptureEnd { packets: sent, lost });
    }
}

/// Decodes a [`Captured::hex`] string.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Offers a processed batch to a running session: with `verdicts`, the frames transmitted
/// (after NAT, tagged with their egress interface); without, the frames as received.
pub fn offer_batch(
    cap: &Capture,
    frames: &[crate::Frame<'_>],
    verdicts: Option<&[crate::Verdict]>,
    worker: u16,
) {
    let filter = cap.filter();
    for (k, f) in frames.iter().enumerate() {
        let bytes = &f.buf[..f.len.min(f.buf.len())];
        match verdicts.map(|v| v[k]) {
            None => cap.offer(&filter, Stage::Rx, bytes, f.ifindex, worker),
            Some(crate::Verdict::Tx { ifindex }) => {
                cap.offer(&filter, Stage::Tx, bytes, ifindex, worker)
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut b = vec![0u8; 14 + 20 + 8 + 4];
        b[12] = 0x08;
        let ipl = 20 + 8 + 4;
        b[14] = 0x45;
        b[16..18].copy_from_slice(&(ipl as u16).to_be_bytes());
        b[22] = 64;
        b[23] = 17;
        b[26..30].copy_from_slice(&src);
        b[30..34].copy_from_slice(&dst);
        let c = wire::csum_fold(wire::csum_partial(&b[14..34], 0));
        b[24..26].copy_from_slice(&c.to_be_bytes());
        b[34..36].copy_from_slice(&sport.to_be_bytes());
        b[36..38].copy_from_slice(&dport.to_be_bytes());
        b[38..40].copy_from_slice(&12u16.to_be_bytes());
        b
    }

    #[test]
    fn filter_by_address_port_and_protocol() {
        let f = udp([10, 0, 0, 1], [10, 96, 0, 10], 40000, 53);
        assert!(CaptureFilter::default().matches(&f));
        let by = |addr: Option<[u8; 4]>, port, proto| CaptureFilter {
            addr: addr.map(Ipv4Addr::from),
            port,
            proto,
        };
        assert!(by(Some([10, 0, 0, 1]), None, None).matches(&f));
        assert!(by(Some([10, 96, 0, 10]), Some(53), Some(17)).matches(&f));
        assert!(by(None, Some(40000), None).matches(&f));
        assert!(!by(Some([10, 0, 0, 2]), None, None).matches(&f));
        assert!(!by(None, Some(80), None).matches(&f));
        assert!(!by(None, None, Some(6)).matches(&f));
        assert!(!by(None, Some(53), None).matches(&[0u8; 10]), "garbage never matches a filter");
    }

    #[test]
    fn ring_is_bounded_and_counts_losses_and_only_runs_when_started() {
        let c = Capture::new(2);
        assert!(!c.active());
        assert!(c.start(CaptureFilter::default()));
        assert!(!c.start(CaptureFilter::default()), "one session at a time");
        let f = udp([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        let filt = c.filter();
        for _ in 0..3 {
            c.offer(&filt, Stage::Rx, &f, 7, 0);
        }
        assert_eq!(c.lost(), 1);
        let got = c.pop().unwrap();
        assert_eq!(got.stage, Stage::Rx);
        assert_eq!(got.ifindex, 7);
        assert_eq!(unhex(&got.hex).unwrap(), f);
        c.stop();
        assert!(c.pop().is_none(), "stop empties the ring");
        assert!(!c.active());
        // Buffers went back to the pool: a new session has its full room again.
        assert!(c.start(CaptureFilter::default()));
        c.offer(&c.filter(), Stage::Tx, &f, 7, 0);
        c.offer(&c.filter(), Stage::Tx, &f, 7, 0);
        assert_eq!(c.lost(), 0);
    }
}
