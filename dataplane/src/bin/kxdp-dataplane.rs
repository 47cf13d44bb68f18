//! `kxdp-dataplane`: the node dataplane process.
//!
//! Flags follow kube-proxy's and Cilium's conventions where they overlap (`--config`,
//! `--hostname-override`, `-v`/`--log-level`); everything else lives in the configuration file.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dataplane::io::config::{Mode, NodeConfig, XdpMode};
use dataplane::io::Dataplane;

#[derive(Parser, Debug)]
#[command(name = "kxdp-dataplane", version, about = "Userspace AF_XDP Kubernetes node dataplane")]
struct Args {
    /// Node configuration file (see config/).
    #[arg(long, default_value = "/etc/kxdp/node.yaml")]
    config: PathBuf,
    /// Node name, overriding the configuration file.
    #[arg(long)]
    hostname_override: Option<String>,
    /// Control socket path, overriding the configuration file.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Inspect socket path (for kxdp-inspect), overriding the configuration file.
    #[arg(long)]
    inspect_socket: Option<PathBuf>,
    /// Prometheus metrics address (`none` to disable), overriding the configuration file.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Worker cores, overriding the configuration file (e.g. `0,1`).
    #[arg(long, value_delimiter = ',')]
    cores: Option<Vec<usize>>,
    /// Processing mode, overriding the configuration file.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// XDP attach mode, overriding the configuration file.
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
    /// Write a JSON report of every counter to this file, every `--stats-interval`.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// How often to write the stats file.
    #[arg(long, default_value = "1s", value_parser = dataplane::io::config::parse_duration)]
    stats_interval: Duration,
    /// Print the queue and IRQ plan (which core serves each interface queue) and exit.
    #[arg(long)]
    print_plan: bool,
    /// With --print-plan: print it as JSON.
    #[arg(long)]
    json: bool,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, default_value = "info")]
    log_level: String,
}

// The dataplane's allocator: the tables' small allocations on huge pages (`dataplane::mem`).
#[global_allocator]
static ALLOC: dataplane::mem::Allocator = dataplane::mem::Allocator;

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kxdp-dataplane: {e}");
            std::process::exit(2);
        }
    };
    if let Some(n) = args.hostname_override {
        cfg.node_name = n;
    }
    if let Some(s) = args.control_socket {
        cfg.control_socket = s;
    }
    if let Some(s) = args.inspect_socket {
        cfg.inspect_socket = Some(s);
    }
    match args.metrics_address.as_deref() {
        None => {}
        Some("none") => cfg.metrics_address = None,
        Some(a) => match a.parse() {
            Ok(a) => cfg.metrics_address = Some(a),
            Err(e) => {
                eprintln!("kxdp-dataplane: --metrics-address {a}: {e}");
                std::process::exit(2);
            }
        },
    }
    if let Some(c) = args.cores {
        cfg.cores = c;
    }
    if let Some(m) = args.mode {
        cfg.mode = m;
    }
    if let Some(m) = args.xdp_mode {
        cfg.xdp_mode = m;
    }
    if args.print_plan {
        match dataplane::io::make_plan(&cfg) {
            Ok(p) if args.json => match serde_json::to_string_pretty(&p) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("kxdp-dataplane: {e}");
                    std::process::exit(1);
                }
            },
            Ok(p) => print!("{p}"),
            Err(e) => {
                eprintln!("kxdp-dataplane: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("kxdp-dataplane: cannot handle signal {sig}: {e}");
            std::process::exit(1);
        }
    }
    tracing::info!(node = %cfg.node_name, mode = ?cfg.mode, "starting");
    let mut dp = match Dataplane::start(cfg) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("kxdp-dataplane: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!("forwarding");
    let r =
        dataplane::io::run_until(&mut dp, &stop, args.stats_file.as_deref(), args.stats_interval);
    tracing::info!("stopping");
    dp.shutdown();
    if let Err(e) = r {
        eprintln!("kxdp-dataplane: {e}");
        std::process::exit(1);
    }
    let rep = dp.report();
    tracing::info!(rx = rep.totals.rx, tx = rep.totals.tx, "stopped");
}
