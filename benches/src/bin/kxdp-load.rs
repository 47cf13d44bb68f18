//! `kxdp-load`: an AF_XDP traffic generator and counter, in the spirit of pktgen.
//!
//! - `kxdp-load send`: transmits UDP or TCP-SYN frames of a fixed size over an AF_XDP socket on
//!   one interface queue, as fast as the machine allows or at `--rate`, for `--duration` and/or
//!   `--count` packets, over `--sources x --ports` flows to `--destinations` addresses, either
//!   repeating those flows (`--pattern established`) or with a new 5-tuple every packet
//!   (`--pattern new-flows`). Frames are written once into the UMEM and only their tuple and
//!   checksums are patched per packet. No XDP program is needed to transmit.
//! - `kxdp-load recv`: loads the project's XDP program (crate `xdp-redirect`) on an interface,
//!   steering IPv4 destinations in `--steer` to an AF_XDP socket, and counts what arrives, in
//!   total and per flow (flows named by the same `--src/--sources/--sport/--ports` as the
//!   sender; the source address and port survive Service DNAT).
//!
//! Both stop at their time bound, their count bound, or SIGINT/SIGTERM, and then print one
//! summary (`--json` for a machine-readable line). The receiver's XDP program is detached when
//! it exits (its `Attachment` guard). Everything per packet is in `kxdp_benches::load`.

use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use kxdp_benches::load::{
    parse_duration, parse_mac, parse_rx, Flows, FrameTemplate, Pacer, Pattern, Proto,
};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{FrameDesc, Socket, Umem};

#[derive(Parser, Debug)]
#[command(name = "kxdp-load", about = "AF_XDP traffic generator and counter (send / recv)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Transmit frames over AF_XDP.
    Send(SendArgs),
    /// Count frames received over AF_XDP.
    Recv(RecvArgs),
}

/// The flows, shared by both sides.
#[derive(Args, Debug, Clone)]
struct FlowArgs {
    /// First source address.
    #[arg(long, default_value = "10.200.16.1")]
    src: Ipv4Addr,
    /// Number of consecutive source addresses.
    #[arg(long, default_value_t = 1)]
    sources: u32,
    /// First source port.
    #[arg(long, default_value_t = 10_000)]
    sport: u16,
    /// Number of consecutive source ports per address (flows = sources x ports).
    #[arg(long, default_value_t = 1)]
    ports: u32,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Interface to transmit on.
    #[arg(long)]
    iface: String,
    /// Queue of the interface.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Destination MAC (the next hop's).
    #[arg(long, value_parser = parse_mac)]
    dst_mac: [u8; 6],
    /// Source MAC (default: the interface's).
    #[arg(long, value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,
    /// L4 protocol.
    #[arg(long, value_enum, default_value = "udp")]
    proto: Proto,
    /// Frame size in bytes, Ethernet header included, FCS not (60..=1514).
    #[arg(long, default_value_t = 60)]
    size: usize,
    #[command(flatten)]
    flows: FlowArgs,
    /// First destination address.
    #[arg(long)]
    dst: Ipv4Addr,
    /// Number of consecutive destination addresses (flow f goes to dst + f % destinations).
    #[arg(long, default_value_t = 1)]
    destinations: u32,
    /// Destination port.
    #[arg(long, default_value_t = 80)]
    dport: u16,
    /// Repeat the flows, or a new 5-tuple every packet.
    #[arg(long, value_enum, default_value = "established")]
    pattern: Pattern,
    /// Packets per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to send (e.g. 500ms, 3s, 1m; at most 1 hour).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many packets (0: only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Number of the first packet in the pattern (so runs in sequence can use new tuples).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Pin the sending thread to this core.
    #[arg(long)]
    core: Option<usize>,
    /// UMEM frames (a power of two, 64..=65536).
    #[arg(long, default_value_t = 4096)]
    frames: u32,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RecvArgs {
    /// Interface to receive on.
    #[arg(long)]
    iface: String,
    /// Queue of the interface.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Destination prefixes steered to the socket (repeatable; default: all IPv4).
    #[arg(long = "steer")]
    steer: Vec<String>,
    #[command(flatten)]
    flows: FlowArgs,
    /// Count per flow (the flows given by --src/--sources/--sport/--ports).
    #[arg(long)]
    per_flow: bool,
    /// Write `flow,src,sport,packets` for every flow to this file (implies --per-flow).
    #[arg(long)]
    per_flow_csv: Option<std::path::PathBuf>,
    /// Longest time to run (at most 1 hour).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    duration: Duration,
    /// Stop when nothing arrived for this long after the first packet.
    #[arg(long, value_parser = parse_duration)]
    idle_exit: Option<Duration>,
    /// Stop after this many packets (0: no count bound).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Attach the XDP program in generic (skb) mode instead of native.
    #[arg(long)]
    generic: bool,
    /// Pin the receiving thread to this core.
    #[arg(long)]
    core: Option<usize>,
    /// UMEM frames (a power of two, 64..=65536).
    #[arg(long, default_value_t = 8192)]
    frames: u32,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("kxdp-load: cannot handle signal {sig}: {e}");
            std::process::exit(1);
        }
    }
    let r = match cli.cmd {
        Cmd::Send(a) => send(a, &stop),
        Cmd::Recv(a) => recv(a, &stop),
    };
    if let Err(e) = r {
        eprintln!("kxdp-load: {e}");
        std::process::exit(2);
    }
}

fn check_frames(frames: u32) -> Result<NonZeroU32, String> {
    if !frames.is_power_of_two() || !(64..=65_536).contains(&frames) {
        return Err(format!("--frames {frames}: must be a power of two from 64 to 65536"));
    }
    NonZeroU32::new(frames).ok_or_else(|| "--frames 0".into())
}

fn ifindex(iface: &str) -> Result<u32, String> {
    let name = std::ffi::CString::new(iface).map_err(|_| format!("bad interface {iface:?}"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        return Err(format!("no interface {iface:?} in this network namespace"));
    }
    Ok(i)
}

fn iface_mac(iface: &str) -> Result<[u8; 6], String> {
    let p = format!("/sys/class/net/{iface}/address");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e} (give --src-mac)"))?;
    parse_mac(&s)
}

fn pin(core: Option<usize>) -> Result<(), String> {
    if let Some(c) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
            return Err(format!("cannot pin to core {c}"));
        }
    }
    Ok(())
}

fn xsk_socket(
    iface: &str,
    queue: u32,
    frames: NonZeroU32,
) -> Result<(Umem, Vec<FrameDesc>, TxSock), String> {
    let ring = QueueSize::new(frames.get() / 2).map_err(|e| format!("ring size: {e}"))?;
    let umem_cfg = UmemConfig::builder()
        .frame_size(FrameSize::new(2048).map_err(|e| format!("frame size: {e}"))?)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()
        .map_err(|e| format!("UMEM config: {e}"))?;
    let (umem, descs) =
        Umem::new(umem_cfg, frames, false).map_err(|e| format!("cannot create UMEM: {e}"))?;
    let cfg = SocketConfig::builder()
        .rx_queue_size(ring)
        .tx_queue_size(ring)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
        .build();
    let name: Interface = iface.parse().map_err(|e| format!("interface {iface:?}: {e:?}"))?;
    // SAFETY: the UMEM is new and not shared with another socket; libxdp's program loading
    // is inhibited.
    let sock = unsafe { Socket::new(cfg, &umem, &name, queue) }.map(|(tx, rx, rings)| {
        drop(rx);
        (tx, rings)
    });
    let (tx, rings) = sock.map_err(|e| {
        format!(
            "cannot open an AF_XDP socket on {iface} queue {queue}: {e} ({:?})",
            std::error::Error::source(&e)
        )
    })?;
    let (_fq, cq) = rings.ok_or("no completion ring for an unshared UMEM")?;
    Ok((umem, descs, TxSock { tx, cq }))
}

/// The transmit half of an AF_XDP socket.
struct TxSock {
    tx: xsk_rs::TxQueue,
    cq: xsk_rs::CompQueue,
}

/// Frames submitted per ring operation (copy-mode veth transmits 32 per wake-up).
const BATCH: usize = 32;

fn send(a: SendArgs, stop: &AtomicBool) -> Result<(), String> {
    let frames = check_frames(a.frames)?;
    let f = &a.flows;
    let flows = Flows::new(f.src, f.sources, f.sport, f.ports, a.dst, a.destinations, a.dport)?;
    // The size first, so a bad one is reported whatever the interface.
    FrameTemplate::new(a.proto, a.size, a.dst_mac, a.dst_mac)?;
    ifindex(&a.iface)?;
    let src_mac = match a.src_mac {
        Some(m) => m,
        None => iface_mac(&a.iface)?,
    };
    let template = FrameTemplate::new(a.proto, a.size, src_mac, a.dst_mac)?;
    pin(a.core)?;
    let (umem, mut free, TxSock { mut tx, mut cq }) = xsk_socket(&a.iface, a.queue, frames)?;
    for d in free.iter_mut() {
        // SAFETY: every descriptor is ours (nothing is in any ring yet), each frame distinct.
        let mut data = unsafe { umem.data_mut(d) };
        let mut c = data.cursor();
        std::io::Write::write_all(&mut c, template.bytes()).map_err(|e| e.to_string())?;
    }
    let pacer = Pacer { rate: a.rate };
    let limit = if a.count == 0 { u64::MAX } else { a.count };
    let mut batch: Vec<FrameDesc> = Vec::with_capacity(BATCH);
    let mut done = [FrameDesc::default(); 256];
    let (mut produced, mut completed) = (0u64, 0u64);
    let len = template.len();
    let start = Instant::now();
    let reap = |cq: &mut xsk_rs::CompQueue, free: &mut Vec<FrameDesc>, done: &mut [FrameDesc]| {
        let mut n_all = 0u64;
        loop {
            // SAFETY: completed descriptors are frames of this UMEM the kernel is done with.
            let n = unsafe { cq.consume(done) };
            free.extend_from_slice(&done[..n]);
            n_all += n as u64;
            if n < done.len() {
                return n_all;
            }
        }
    };
    loop {
        completed += reap(&mut cq, &mut free, &mut done);
        let elapsed = start.elapsed();
        if stop.load(Ordering::Relaxed) || elapsed >= a.duration || produced >= limit {
            break;
        }
        let allowed = pacer.allowed(elapsed.as_nanos() as u64).saturating_sub(produced);
        let want = (BATCH as u64).min(free.len() as u64).min(allowed).min(limit - produced);
        for i in 0..want {
            let mut d = free.pop().expect("counted above");
            let t = flows.tuple(a.pattern, a.first.wrapping_add(produced + i));
            // SAFETY: the frame came off the free list, so userspace owns it exclusively.
            let mut data = unsafe { umem.data_mut(&mut d) };
            data.cursor().set_pos(len);
            template.write(data.contents_mut(), &t);
            batch.push(d);
        }
        if !batch.is_empty() {
            // SAFETY: every descriptor is a frame of this UMEM owned by userspace with its
            // length set; the kernel owns the produced ones until they complete.
            let n = unsafe { tx.produce(&batch) };
            free.extend(batch.drain(..).skip(n));
            produced += n as u64;
        }
        if produced > completed {
            // Copy mode transmits only inside this system call; its errors (EAGAIN, ENOBUFS
            // while the ring drains) only mean "call again".
            let _ = tx.wakeup();
        } else if want == 0 && allowed == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let sending = start.elapsed();
    // Let the kernel finish what was submitted (bounded).
    let drain_until = Instant::now() + Duration::from_secs(1);
    while completed < produced && Instant::now() < drain_until {
        let _ = tx.wakeup();
        completed += reap(&mut cq, &mut free, &mut done);
        std::thread::sleep(Duration::from_micros(50));
    }
    let secs = sending.as_secs_f64();
    let summary = serde_json::json!({
        "role": "send",
        "iface": a.iface,
        "proto": format!("{:?}", a.proto),
        "pattern": format!("{:?}", a.pattern),
        "size": a.size,
        "flows": flows.count(),
        "submitted": produced,
        "sent": completed,
        "not_completed": produced - completed,
        "seconds": secs,
        "pps": completed as f64 / secs.max(1e-9),
        "interrupted": stop.load(Ordering::Relaxed),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "sent {completed} frames ({} not completed) in {secs:.3} s: {:.0} pps, {:.1} Mbit/s",
            produced - completed,
            completed as f64 / secs,
            completed as f64 * (a.size + 24) as f64 * 8.0 / secs / 1e6
        );
    }
    Ok(())
}

fn recv(a: RecvArgs, stop: &AtomicBool) -> Result<(), String> {
    use dataplane::io::xsk::{Geometry, Opened, Port};
    use xdp_redirect::{AttachMode, Direction, XdpRedirect};
    let frames = check_frames(a.frames)?;
    let per_flow = a.per_flow || a.per_flow_csv.is_some();
    let f = &a.flows;
    let flows = Flows::new(f.src, f.sources, f.sport, f.ports, Ipv4Addr::UNSPECIFIED, 1, 0)?;
    let mut steer = Vec::new();
    for s in if a.steer.is_empty() { vec!["0.0.0.0/0".to_string()] } else { a.steer.clone() } {
        let c: dataplane::io::config::Cidr = s.parse().map_err(|e| format!("--steer: {e}"))?;
        xdp_redirect::Prefix::new(c.addr, c.len).map_err(|e| format!("--steer {s}: {e}"))?;
        steer.push(c);
    }
    let idx = ifindex(&a.iface)?;
    pin(a.core)?;
    // A socket with a UMEM of its own (nothing to share it with).
    let geo = Geometry { frames: frames.get(), ring: frames.get() / 2 };
    let Opened::Own(mut port, mut pool, _) =
        Port::open(&a.iface, idx, a.queue, geo, None).map_err(|e| e.to_string())?
    else {
        return Err("a socket opened without sharing came back shared".into());
    };
    port.adopt(&mut pool, 0);
    port.refill(&mut pool);
    let prog = XdpRedirect::load().map_err(|e| e.to_string())?;
    for c in &steer {
        prog.add_prefix(Direction::Dst, c.addr, c.len).map_err(|e| format!("--steer {c}: {e}"))?;
    }
    prog.set_socket(a.queue, port.fd()).map_err(|e| e.to_string())?;
    let mode = if a.generic { AttachMode::Generic } else { AttachMode::Native };
    let attachment = prog.attach(idx, mode).map_err(|e| e.to_string())?;
    eprintln!("kxdp-load: receiving on {} queue {} ({mode} XDP)", a.iface, a.queue);

    let mut counts: Vec<u32> = if per_flow { vec![0; flows.count() as usize] } else { Vec::new() };
    let (mut total, mut matched, mut other) = (0u64, 0u64, 0u64);
    let (mut udp, mut tcp) = (0u64, 0u64);
    let mut rx = [FrameDesc::default(); 64];
    let start = Instant::now();
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let limit = if a.count == 0 { u64::MAX } else { a.count };
    let mut idle = 0u32;
    loop {
        if stop.load(Ordering::Relaxed) || start.elapsed() >= a.duration || total >= limit {
            break;
        }
        if let (Some(l), Some(d)) = (last, a.idle_exit) {
            if l.elapsed() >= d {
                break;
            }
        }
        let n = port.recv(&mut pool, &mut rx);
        if n > 0 {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            idle = 0;
        }
        for d in rx.iter().take(n) {
            // SAFETY: the descriptor was just received, so userspace owns the frame until
            // `recycle` below.
            let data = unsafe { pool.room(d) };
            let frame = &data[..Port::len_of(d).min(data.len())];
            total += 1;
            match parse_rx(frame) {
                Some(r) => {
                    if r.proto == 17 {
                        udp += 1;
                    } else {
                        tcp += 1;
                    }
                    match flows.index(r.src, r.sport) {
                        Some(i) => {
                            matched += 1;
                            if per_flow {
                                counts[i as usize] = counts[i as usize].saturating_add(1);
                            }
                        }
                        None => other += 1,
                    }
                }
                None => other += 1,
            }
        }
        for d in rx.iter().take(n) {
            pool.recycle(*d);
        }
        port.refill(&mut pool);
        if n == 0 {
            idle = idle.saturating_add(1);
            if idle > 64 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    let stats = port.xdp_stats();
    drop(attachment);
    let window = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let (seen, min, max) = if per_flow {
        (
            counts.iter().filter(|&&c| c > 0).count(),
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        )
    } else {
        (0, 0, 0)
    };
    if let Some(p) = &a.per_flow_csv {
        let mut s = String::from("flow,src,sport,packets\n");
        for (i, c) in counts.iter().enumerate() {
            let t = flows.tuple(Pattern::Established, i as u64);
            s.push_str(&format!("{i},{},{},{c}\n", t.src, t.sport));
        }
        std::fs::write(p, s).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let summary = serde_json::json!({
        "role": "recv",
        "iface": a.iface,
        "received": total,
        "matched": matched,
        "other": other,
        "udp": udp,
        "tcp": tcp,
        "window_seconds": window,
        "pps": if window > 0.0 { (total.saturating_sub(1)) as f64 / window } else { 0.0 },
        "flows": if per_flow { flows.count() } else { 0 },
        "flows_seen": seen,
        "per_flow_min": min,
        "per_flow_max": max,
        "socket_rx_dropped": stats.as_ref().map(|s| s.rx_dropped()),
        "socket_rx_ring_full": stats.as_ref().map(|s| s.rx_ring_full()),
        "socket_fill_ring_empty": stats.as_ref().map(|s| s.rx_fill_ring_empty_descs()),
        "interrupted": stop.load(Ordering::Relaxed),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "received {total} frames ({matched} from the flows, {other} other) over {window:.3} s: {:.0} pps",
            summary["pps"].as_f64().unwrap_or(0.0)
        );
        if per_flow {
            println!("flows: {seen} of {} seen, per flow min {min} max {max}", flows.count());
        }
    }
    Ok(())
}
