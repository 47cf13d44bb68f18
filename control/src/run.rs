//! The control loop: source events -> store -> compiler -> publication.
//!
//! Events are taken in batches (everything queued at the moment), applied to the store, and
//! the compiler then rebuilds what the batch touched. Nothing is compiled or published until
//! every kind has been listed once ([`Event::Replace`] seen for all six): before that the
//! picture is partial, and publishing it could shrink a dataplane's good tables. The first
//! diff after that is always delivered, even when empty, so an empty cluster still yields an
//! (empty) snapshot.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::compile::{Compiler, Diff, NodeContext};
use crate::publish::Publisher;
use crate::source::kube::{self as kube_source, ClientOptions, WatchStats};
use crate::source::manifests::{embedded_objects, replace_events, ManifestDir, POLL_INTERVAL};
use crate::store::{Event, Kind, Store};

/// How long [`run`] waits for a running dataplane's hello (and its ids) before compiling.
/// A dataplane that answers later has either no tables (it started after us) or gets a
/// snapshot with fresh ids, as before adoption existed.
pub const HELLO_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Store and compiler, fed by events.
#[derive(Debug)]
pub struct Controller {
    store: Store,
    compiler: Compiler,
    listed: BTreeSet<Kind>,
    started: bool,
}

impl Controller {
    /// A controller for the node described by `ctx`.
    pub fn new(ctx: NodeContext) -> Self {
        Self {
            store: Store::new(),
            compiler: Compiler::new(ctx),
            listed: BTreeSet::new(),
            started: false,
        }
    }
    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// The compiler.
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }
    /// Adopts a running dataplane's ids; only effective before compilation starts.
    pub fn adopt_ids(&mut self, map: &dataplane::sync::IdMap) -> (usize, usize) {
        if self.started {
            return (0, 0);
        }
        self.compiler.adopt_ids(map)
    }
    /// Whether every kind has been listed (compilation has started).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Applies a batch of events; returns the diff to publish, if any.
    pub fn handle(&mut self, events: impl IntoIterator<Item = Event>) -> Option<Diff> {
        for e in events {
            if let Event::Replace(kind, _) = &e {
                self.listed.insert(*kind);
            }
            self.store.apply(e);
        }
        if !self.started {
            if self.listed.len() < Kind::ALL.len() {
                return None;
            }
            self.started = true;
            self.store.take_changes();
            return Some(self.compiler.compile_all(&self.store));
        }
        let changes = self.store.take_changes();
        if changes.is_empty() {
            return None;
        }
        let diff = self.compiler.compile(&self.store, &changes);
        (!diff.is_empty()).then_some(diff)
    }
}

/// Receives events until `rx` closes, handing each diff to `sink`.
pub async fn drive(
    mut rx: mpsc::Receiver<Event>,
    controller: &mut Controller,
    mut sink: impl FnMut(&Controller, Diff),
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(e) = rx.try_recv() {
            batch.push(e);
        }
        if let Some(diff) = controller.handle(batch) {
            tracing::info!(
                generation = diff.generation,
                upserts = diff.upserts.len(),
                removals = diff.removals.len(),
                ports = controller.compiler().ports().len(),
                policy = diff.policy.as_ref().map(|p| p.endpoints.len()),
                "compiled"
            );
            sink(controller, diff);
        }
    }
}

/// Where objects come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The Kubernetes API server.
    Kube(ClientOptions),
    /// A manifest directory, polled for changes.
    Manifests(PathBuf),
    /// The demo manifests compiled into the binary.
    Embedded,
}

/// Starts a source sending into `tx`.
pub async fn start_source(
    source: &Source,
    node_name: &str,
    tx: mpsc::Sender<Event>,
    stats: Arc<WatchStats>,
) -> anyhow::Result<()> {
    match source {
        Source::Kube(opts) => {
            let client = kube_source::client(opts).await?;
            kube_source::spawn_watchers(client, node_name, tx, stats);
        }
        Source::Manifests(dir) => {
            tokio::spawn(ManifestDir::new(dir.clone()).run(tx, POLL_INTERVAL));
        }
        Source::Embedded => {
            let mut skips = crate::skips::Skips::new();
            let events = replace_events(embedded_objects(&mut skips));
            tokio::spawn(async move {
                for e in events {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                // Keep the channel open: the embedded set never changes.
                tx.closed().await;
            });
        }
    }
    Ok(())
}

/// Loads a source once, compiles, and returns the controller (for `--dump`). For the API
/// server this waits until every kind has been listed.
pub async fn load_once(source: &Source, ctx: NodeContext) -> anyhow::Result<Controller> {
    let mut controller = Controller::new(ctx.clone());
    match source {
        Source::Manifests(dir) => {
            let events = ManifestDir::new(dir.clone()).load()?;
            controller.handle(events);
        }
        Source::Embedded => {
            let mut skips = crate::skips::Skips::new();
            controller.handle(replace_events(embedded_objects(&mut skips)));
        }
        Source::Kube(_) => {
            let (tx, mut rx) = mpsc::channel(1024);
            start_source(source, &ctx.name, tx, Arc::default()).await?;
            while !controller.started() {
                let Some(e) = rx.recv().await else {
                    anyhow::bail!("API server source ended before every kind was listed");
                };
                controller.handle([e]);
            }
        }
    }
    Ok(controller)
}

/// Runs the control plane until the source ends: compile, publish to `socket`; with
/// `metrics`, serve Prometheus metrics (watch state, publication) on that address.
pub async fn run(
    source: Source,
    ctx: NodeContext,
    socket: PathBuf,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4096);
    let watch = Arc::new(WatchStats::default());
    start_source(&source, &ctx.name, tx, watch.clone()).await?;
    let publisher = Publisher::spawn(&socket)?;
    let _metrics = match metrics {
        Some(addr) => {
            let c = crate::metrics::ControlCollector {
                watch: matches!(source, Source::Kube(_)).then_some(watch),
                publish: publisher.status_handle(),
            };
            let server =
                dataplane::io::metrics::MetricsServer::spawn(addr, crate::metrics::registry(c))
                    .map_err(|e| anyhow::anyhow!("metrics on {addr}: {e}"))?;
            Some(server)
        }
        None => None,
    };
    let mut controller = Controller::new(ctx);
    // A dataplane that is already running names the ids its tables (and flows) use: adopt
    // them before compiling anything, so a control restart renumbers nothing.
    match publisher.first_hello(HELLO_WAIT) {
        Some(ids) => {
            let (s, b) = controller.adopt_ids(&ids);
            tracing::info!(services = s, backends = b, "adopted the dataplane's ids");
        }
        None => tracing::info!(
            wait_ms = HELLO_WAIT.as_millis() as u64,
            "no dataplane hello yet; ids start afresh"
        ),
    }
    drive(rx, &mut controller, |_, diff| publisher.send(diff)).await;
    publisher.shutdown();
    Ok(())
}
