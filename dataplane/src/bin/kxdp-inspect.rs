//! `kxdp-inspect`: looks into a running kxdp-dataplane through its inspect socket.
//!
//! Every command prints a readable table by default and the dataplane's answer as JSON with
//! `--json`. Exit status: 0 on success, 1 when the dataplane refused or failed, 2 when it could
//! not be reached (not running, or the caller lacks rights on the socket).

use std::fs::File;
use std::io::BufWriter;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dataplane::capture::{unhex, CaptureFilter, Stage};
use dataplane::io::inspect::{
    request, BackendInfo, Client, ClientError, CtFilter, Request, Response, Tuple,
};

#[derive(Parser, Debug)]
#[command(name = "kxdp-inspect", version, about = "Inspect a running kxdp dataplane")]
struct Cli {
    /// The dataplane's inspect socket.
    #[arg(long, global = true, default_value = "/run/kxdp/inspect.sock")]
    socket: PathBuf,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Table generation, control connection, uptime.
    Status,
    /// Services with frontends, backends, scheduler, affinity and per-backend counters.
    Services,
    /// Per-worker counters (every drop and pass reason) and per-queue socket statistics.
    Workers,
    /// Conntrack entries.
    Conntrack {
        #[command(subcommand)]
        op: CtOp,
    },
    /// Would this flow be allowed, and where would it go (runs the pipeline's own lookups).
    Query {
        /// Protocol.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: u8,
        /// Client address and port (`ip:port`).
        #[arg(long)]
        src: String,
        /// Destination address and port (`ip:port`).
        #[arg(long)]
        dst: String,
    },
    /// Writes a pcap file of the frames the dataplane handles, before and after NAT.
    Capture {
        /// Output pcap file.
        #[arg(short = 'w', long)]
        write: PathBuf,
        /// Stop after this many frames.
        #[arg(short = 'c', long, default_value_t = 1000)]
        count: u64,
        /// Stop after this long (e.g. 10s, 500ms).
        #[arg(long, default_value = "10s", value_parser = dataplane::io::config::parse_duration)]
        duration: Duration,
        /// Which frames: rx (as received, before NAT), tx (as sent, after NAT) or both.
        #[arg(long, default_value = "both")]
        stage: String,
        #[command(flatten)]
        filter: CapFilter,
    },
}

#[derive(Subcommand, Debug)]
enum CtOp {
    /// Lists entries.
    List {
        #[command(flatten)]
        filter: CtArgs,
        /// Most entries shown.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Removes entries (a filter, or --all).
    Flush {
        #[command(flatten)]
        filter: CtArgs,
        /// Remove every entry.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args, Debug, Clone)]
struct CtArgs {
    #[command(flatten)]
    flow: CapFilter,
    /// Service port (`ns/name:port`) or service (`ns/name`).
    #[arg(long)]
    service: Option<String>,
    /// Backend address.
    #[arg(long)]
    backend: Option<Ipv4Addr>,
}

impl CtArgs {
    fn filter(&self) -> CtFilter {
        CtFilter {
            addr: self.flow.addr,
            port: self.flow.port,
            proto: self.flow.proto,
            service: self.service.clone(),
            backend: self.backend,
        }
    }
    fn is_empty(&self) -> bool {
        self.flow.addr.is_none()
            && self.flow.port.is_none()
            && self.flow.proto.is_none()
            && self.service.is_none()
            && self.backend.is_none()
    }
}

#[derive(Args, Debug, Clone)]
struct CapFilter {
    /// An address on either side (source or destination).
    #[arg(long)]
    addr: Option<Ipv4Addr>,
    /// A port on either side (source or destination).
    #[arg(long)]
    port: Option<u16>,
    /// Protocol (tcp, udp, icmp or a number).
    #[arg(long, value_parser = parse_proto)]
    proto: Option<u8>,
}

fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        n => n.parse().map_err(|_| format!("unknown protocol {s:?} (tcp, udp, icmp or a number)")),
    }
}

fn parse_endpoint(s: &str) -> Result<(Ipv4Addr, u16), String> {
    let (ip, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected ip:port"))?;
    Ok((
        ip.parse().map_err(|e| format!("{s:?}: {e}"))?,
        port.parse().map_err(|e| format!("{s:?}: {e}"))?,
    ))
}

/// A failure and the exit status it gives.
struct Fail(i32, String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::NotRunning(_) | ClientError::Denied(_) => 2,
            _ => 1,
        };
        Fail(code, e.to_string())
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(Fail(code, msg)) = run(&cli) {
        eprintln!("kxdp-inspect: {msg}");
        std::process::exit(code);
    }
}

fn print_json(r: &Response) -> Result<(), Fail> {
    let s = serde_json::to_string_pretty(r).map_err(|e| Fail(1, e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn run(cli: &Cli) -> Result<(), Fail> {
    let req = match &cli.cmd {
        Cmd::Status => Request::Status,
        Cmd::Services => Request::Services,
        Cmd::Workers => Request::Workers,
        Cmd::Conntrack { op: CtOp::List { filter, limit } } => {
            Request::Conntrack { filter: filter.filter(), limit: *limit }
        }
        Cmd::Conntrack { op: CtOp::Flush { filter, all } } => {
            if filter.is_empty() && !all {
                return Err(Fail(1, "flush needs a filter, or --all to remove every entry".into()));
            }
            Request::Flush { filter: filter.filter() }
        }
        Cmd::Query { proto, src, dst } => {
            let (s, sp) = parse_endpoint(src).map_err(|e| Fail(1, e))?;
            let (d, dp) = parse_endpoint(dst).map_err(|e| Fail(1, e))?;
            Request::Query { flow: Tuple { src: s, sport: sp, dst: d, dport: dp }, proto: *proto }
        }
        Cmd::Capture { write, count, duration, stage, filter } => {
            return capture(cli, write, *count, *duration, stage, filter);
        }
    };
    let answer = request(&cli.socket, &req)?;
    if cli.json {
        return print_json(&answer);
    }
    match answer {
        Response::Status(s) => {
            println!("node:              {}", s.node);
            println!("uptime:            {:.0} s", s.uptime_s);
            println!("table generation:  {}", s.generation);
            println!("services:          {} service ports, {} frontends", s.services, s.frontends);
            println!("workers:           {}", s.workers);
            let c = &s.control;
            println!(
                "control:           {} (generation {}, epoch {:#x})",
                if c.connected > 0 { "connected" } else { "NOT CONNECTED" },
                c.generation,
                c.epoch
            );
            println!(
                "control messages:  {} snapshots, {} deltas, {} refused, {} malformed, {} connections",
                c.snapshots, c.deltas, c.refused, c.malformed, c.connections
            );
        }
        Response::Services(list) => {
            println!("Prot LocalAddress:Port Scheduler Flags");
            println!(
                "  -> RemoteAddress:Port        Weight ActiveConn      Conns     InPkts    OutPkts    InBytes   OutBytes"
            );
            for s in &list {
                let flags = match s.affinity_timeout_s {
                    Some(t) => format!("persistent {t}"),
                    None => String::new(),
                };
                for f in &s.frontends {
                    println!(
                        "{:<4} {:<21} {} {}  # {} ({})",
                        s.proto,
                        format!("{}:{}", f.ip, f.port),
                        s.algorithm,
                        flags,
                        s.name,
                        f.kind
                    );
                }
                if s.frontends.is_empty() {
                    println!(
                        "{:<4} {:<21} {} {}  # {} (no frontend)",
                        s.proto, "-", s.algorithm, flags, s.name
                    );
                }
                for b in &s.backends {
                    println!("{}", backend_line(b));
                }
            }
        }
        Response::Workers(ws) => {
            for w in &ws {
                println!(
                    "worker {}: rx {} tx {} flows {} evictions {}",
                    w.id, w.rx, w.tx, w.flows, w.evictions
                );
                let nz = |m: &std::collections::BTreeMap<String, u64>| {
                    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                };
                println!("  drops:    {}", nz(&w.drops));
                println!("  kernel:   {}", nz(&w.passes));
                println!("  pipeline: {}", nz(&w.pipeline));
                println!("  io:       {}", nz(&w.io));
                for q in &w.queues {
                    println!(
                        "  queue {}/{}: rx_dropped={} rx_ring_full={} fill_ring_empty={} tx_ring_empty={} invalid_descs={}/{}",
                        q.iface,
                        q.queue,
                        q.rx_dropped,
                        q.rx_ring_full,
                        q.rx_fill_ring_empty,
                        q.tx_ring_empty,
                        q.rx_invalid_descs,
                        q.tx_invalid_descs
                    );
                }
            }
        }
        Response::Conntrack(l) => {
            println!(
                "{:<4} {:<12} {:<45} {:<45} {:>8} {:>8} {:>8}  service",
                "prot", "state", "original", "reply", "pkts>", "pkts<", "expires"
            );
            for e in &l.entries {
                println!(
                    "{:<4} {:<12} {:<45} {:<45} {:>8} {:>8} {:>7.0}s  {}",
                    e.proto,
                    e.state,
                    e.orig.to_string(),
                    e.reply.to_string(),
                    e.packets_orig,
                    e.packets_reply,
                    e.expires_in_s,
                    e.service
                );
            }
            println!("{} entries shown, {} matching", l.entries.len(), l.matched);
        }
        Response::Flushed { flows } => println!("{flows} conntrack entries removed"),
        Response::Query(e) => {
            println!("verdict:     {} ({})", e.verdict, e.reason);
            if let Some(s) = &e.service {
                println!("service:     {s}");
            }
            if let Some((id, ip, port)) = e.backend {
                let how = if e.by_affinity { " (session affinity)" } else { "" };
                println!("backend:     {ip}:{port} (id {id}){how}");
            }
            if let Some((c, dir)) = &e.conntrack {
                println!(
                    "conntrack:   {} {} -> reply {} ({dir} direction)",
                    c.state, c.orig, c.reply
                );
            }
            if let Some(t) = e.translated {
                println!("sent as:     {t}{}", if e.snat { " (source NAT)" } else { "" });
            }
            match e.egress_ifindex {
                Some(i) => println!("egress:      ifindex {i}"),
                None if e.translated.is_some() => {
                    println!("egress:      the kernel (no next hop yet)")
                }
                None => {}
            }
            println!("worker:      {} (table generation {})", e.worker, e.generation);
        }
        other => return Err(Fail(1, format!("unexpected answer {other:?}"))),
    }
    Ok(())
}

fn backend_line(b: &BackendInfo) -> String {
    let mut state = Vec::new();
    if !b.ready {
        state.push("not-ready");
    }
    if b.terminating {
        state.push("terminating");
    }
    if !b.selectable {
        state.push("not-selectable");
    }
    let t = &b.traffic;
    format!(
        "  -> {:<26} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {}",
        format!("{}:{}", b.ip, b.port),
        b.weight,
        b.active_conns,
        t.conns,
        t.packets_in,
        t.packets_out,
        t.bytes_in,
        t.bytes_out,
        state.join(",")
    )
}

fn capture(
    cli: &Cli,
    path: &PathBuf,
    count: u64,
    duration: Duration,
    stage: &str,
    f: &CapFilter,
) -> Result<(), Fail> {
    let want = match stage {
        "both" => None,
        "rx" => Some(Stage::Rx),
        "tx" => Some(Stage::Tx),
        s => return Err(Fail(1, format!("--stage {s}: use rx, tx or both"))),
    };
    let filter = CaptureFilter { addr: f.addr, port: f.port, proto: f.proto };
    let req = Request::Capture { filter, max_packets: count, max_ms: duration.as_millis() as u64 };
    let mut client = Client::send(&cli.socket, &req)?;
    let file = File::create(path).map_err(|e| Fail(1, format!("{}: {e}", path.display())))?;
    let header = pcap_file::pcap::PcapHeader {
        snaplen: dataplane::capture::SNAPLEN as u32,
        ts_resolution: pcap_file::TsResolution::NanoSecond,
        ..Default::default()
    };
    let mut w = pcap_file::pcap::PcapWriter::with_header(BufWriter::new(file), header)
        .map_err(|e| Fail(1, format!("{}: {e}", path.display())))?;
    let mut written = 0u64;
    loop {
        match client.next_answer()? {
            Some(Response::CaptureStarted) => {
                if !cli.json {
                    eprintln!("capturing to {} ({count} frames or {duration:?})", path.display());
                }
            }
            Some(Response::Frame(c)) => {
                if want.is_some_and(|s| s != c.stage) {
                    continue;
                }
                let data =
                    unhex(&c.hex).ok_or_else(|| Fail(1, "bad frame from dataplane".into()))?;
                let pkt = pcap_file::pcap::PcapPacket::new(
                    Duration::from_nanos(c.ts_ns),
                    c.orig_len,
                    &data,
                );
                w.write_packet(&pkt).map_err(|e| Fail(1, format!("{}: {e}", path.display())))?;
                written += 1;
                if cli.json {
                    let mut c = c;
                    c.hex.clear();
                    println!("{}", serde_json::to_string(&c).unwrap_or_default());
                }
            }
            Some(Response::CaptureEnd { packets, lost }) => {
                if !cli.json {
                    eprintln!(
                        "{written} frames written ({packets} captured, {lost} lost to a full ring)"
                    );
                }
                break;
            }
            Some(other) => return Err(Fail(1, format!("unexpected answer {other:?}"))),
            None => return Err(Fail(1, "the dataplane closed the capture early".into())),
        }
    }
    w.into_writer().into_inner().map_err(|e| Fail(1, e.to_string()))?;
    Ok(())
}
