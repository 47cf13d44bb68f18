//! The Kubernetes API server as an object source: list + watch of the six kinds through the
//! `kube` crate's watcher (no polling).
//!
//! Each kind has its own watcher task. The watcher lists (in pages), then watches from the
//! list's resourceVersion with bookmarks; when a watch ends it resumes from the last
//! resourceVersion seen; on `410 Gone` (the version was compacted away) it re-lists. Errors
//! (a refused connection, a lost API server, a failing list) are retried with the watcher's
//! default exponential backoff, and meanwhile the store — and so the dataplane's tables —
//! keeps the last known state.
//!
//! A (re-)list never reaches the store object by object: the task buffers the watcher's
//! `Init` / `InitApply` events and, at `InitDone`, sends one [`Event::Replace`] for the kind,
//! which the store applies in one step (deleting what the new list lacks, leaving equal
//! objects untouched). The tables therefore never flap to empty or to a partial list during
//! a re-list, and no state is lost: whatever happened while the watch was down shows up in
//! the fresh list.
//!
//! Scope: Services, EndpointSlices, NetworkPolicies, Namespaces and Pods cluster-wide, and only
//! this node's Node object (`metadata.name`). Pods of every node are needed because
//! NetworkPolicy peers select pods anywhere in the cluster: a local pod's allowed peers are
//! other nodes' pods too (their addresses get identities; see `crate::policy`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{Event, Kind, Object};

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// A kubeconfig file; otherwise the usual inference (`KUBECONFIG`, `~/.kube/config`,
    /// in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// An API server URL overriding the kubeconfig's (`--master`); alone, a plain client
    /// without credentials (e.g. `http://127.0.0.1:8080`).
    pub master: Option<String>,
}

/// Builds a client from the options.
pub async fn client(opts: &ClientOptions) -> anyhow::Result<Client> {
    let mut config = match (&opts.kubeconfig, &opts.master) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        (None, Some(master)) => Config::new(master.parse()?),
        (None, None) => Config::infer().await?,
    };
    if let (Some(_), Some(master)) = (&opts.kubeconfig, &opts.master) {
        config.cluster_url = master.parse()?;
    }
    Ok(Client::try_from(config)?)
}

/// Counters of the watchers.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Complete lists (initial and re-lists) handed to the store.
    pub lists: AtomicU64,
    /// Watch or list errors (each retried with backoff).
    pub errors: AtomicU64,
    /// Deleted objects without a usable key.
    pub bad_deletes: AtomicU64,
}

impl WatchStats {
    /// A counter's value.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Starts one watcher task per kind, sending store events to `tx`. The tasks end when `tx`
/// closes.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    tx: mpsc::Sender<Event>,
    stats: Arc<WatchStats>,
) -> Vec<JoinHandle<()>> {
    let all = watcher::Config::default();
    let node_field = format!("metadata.name={node_name}");
    vec![
        spawn_kind::<Service>(
            Api::all(client.clone()),
            all.clone(),
            Kind::Service,
            |o| Object::Service(Arc::new(o)),
            tx.clone(),
            stats.clone(),
        ),
        spawn_kind::<EndpointSlice>(
            Api::all(client.clone()),
            all.clone(),
            Kind::EndpointSlice,
            |o| Object::EndpointSlice(Arc::new(o)),
            tx.clone(),
            stats.clone(),
        ),
        spawn_kind::<NetworkPolicy>(
            Api::all(client.clone()),
            all.clone(),
            Kind::NetworkPolicy,
            |o| Object::NetworkPolicy(Arc::new(o)),
            tx.clone(),
            stats.clone(),
        ),
        spawn_kind::<Namespace>(
            Api::all(client.clone()),
            all.clone(),
            Kind::Namespace,
            |o| Object::Namespace(Arc::new(o)),
            tx.clone(),
            stats.clone(),
        ),
        spawn_kind::<Pod>(
            Api::all(client.clone()),
            all.clone(),
            Kind::Pod,
            |o| Object::Pod(Arc::new(crate::store::trim_pod(o))),
            tx.clone(),
            stats.clone(),
        ),
        spawn_kind::<Node>(
            Api::all(client),
            all.fields(&node_field),
            Kind::Node,
            |o| Object::Node(Arc::new(o)),
            tx,
            stats,
        ),
    ]
}

fn spawn_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<Event>,
    stats: Arc<WatchStats>,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        // Objects of a list in progress; None outside a list.
        let mut listing: Option<Vec<Object>> = None;
        let mut failing = false;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(watcher::Event::Init) => {
                    listing = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listing.get_or_insert_with(Vec::new).push(wrap(o));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    stats.lists.fetch_add(1, Ordering::Relaxed);
                    let objs = listing.take().unwrap_or_default();
                    tracing::info!(%kind, objects = objs.len(), "kube: list complete");
                    Some(Event::Replace(kind, objs))
                }
                Ok(watcher::Event::Apply(o)) => Some(Event::Apply(wrap(o))),
                Ok(watcher::Event::Delete(o)) => match wrap(o).key() {
                    Ok(key) => Some(Event::Delete(kind, key)),
                    Err(reason) => {
                        stats.bad_deletes.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%kind, reason, "kube: deleted object without key ignored");
                        None
                    }
                },
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    if failing {
                        tracing::debug!(%kind, error = %e, "kube: watch error (retrying)");
                    } else {
                        tracing::warn!(%kind, error = %e,
                            "kube: watch error; keeping the last state, retrying with backoff");
                    }
                    failing = true;
                    None
                }
            };
            if let Some(ev) = event {
                failing = false;
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    })
}
