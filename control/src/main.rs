//! `kxdp-control`: watches Kubernetes (or a manifest directory), compiles the dataplane's
//! tables and keeps the dataplane process in step over its Unix socket.
//!
//! Source selection: `--kubeconfig` or `--master` -> the API server; otherwise, when running
//! in a pod (`KUBERNETES_SERVICE_HOST` set) -> the API server with in-cluster credentials;
//! otherwise `--manifests DIR`, or the demo manifests embedded in the binary.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;
use control::compile::NodeContext;
use control::dump::{dump_policy, dump_with_skips};
use control::run::{load_once, run, Source};
use control::skips::Skips;
use control::source::kube::ClientOptions;

/// kxdp control plane: Kubernetes Services in, dataplane tables out.
#[derive(Debug, Parser)]
#[command(name = "kxdp-control", version)]
struct Args {
    /// Path to a kubeconfig file (API server source).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's (API server source).
    #[arg(long)]
    master: Option<String>,
    /// Directory of Kubernetes YAML to serve instead of an API server (polled for changes).
    /// Default: the demo manifests embedded in the binary.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// This node's name (as in pods' spec.nodeName). Default: $NODE_NAME, else the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// An address NodePorts listen on (repeatable). Default: the Node object's addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<Ipv4Addr>,
    /// This node's zone. Default: the Node object's topology.kubernetes.io/zone label.
    #[arg(long)]
    zone: Option<String>,
    /// The dataplane's socket.
    #[arg(long, default_value = "/run/kxdp/control.sock")]
    socket: PathBuf,
    /// Serve Prometheus metrics (API watch state, publication) on this address; `none` to
    /// disable.
    #[arg(long, default_value = "127.0.0.1:9965")]
    metrics_address: String,
    /// Print the compiled table dump and exit.
    #[arg(long)]
    dump: bool,
    /// Log filter (tracing-subscriber EnvFilter syntax, e.g. `info`, `control=debug`).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn node_name(arg: Option<String>) -> String {
    arg.or_else(|| std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level)?)
        .with_writer(std::io::stderr)
        .init();
    let ctx = NodeContext {
        name: node_name(args.node_name.clone()),
        addresses: args.node_ips.clone(),
        zone: args.zone.clone(),
    };
    let source = if args.kubeconfig.is_some() || args.master.is_some() {
        Source::Kube(ClientOptions {
            kubeconfig: args.kubeconfig.clone(),
            master: args.master.clone(),
        })
    } else if let Some(dir) = &args.manifests {
        Source::Manifests(dir.clone())
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        Source::Kube(ClientOptions::default())
    } else {
        Source::Embedded
    };
    tracing::info!(node = ctx.name, ?source, "kxdp-control starting");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        if args.dump {
            let c = load_once(&source, ctx).await?;
            let mut skips = Skips::new();
            skips.merge(c.store().skips());
            skips.merge(c.compiler().skips());
            skips.merge(c.compiler().policy().skips());
            print!("{}", dump_with_skips(&c.compiler().tables(c.compiler().generation()), &skips));
            print!("{}", dump_policy(c.compiler().policy()));
            return Ok(());
        }
        let metrics = match args.metrics_address.as_str() {
            "none" => None,
            a => Some(a.parse().map_err(|e| anyhow::anyhow!("--metrics-address {a}: {e}"))?),
        };
        run(source, ctx, args.socket, metrics).await
    })
}
