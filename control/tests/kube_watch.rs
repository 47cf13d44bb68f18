//! The real `kube` client against a small in-process API server on 127.0.0.1 that implements
//! list and watch as the Kubernetes API server does for the six kinds: resourceVersions,
//! `?watch=1` streaming JSON lines (ADDED/MODIFIED/DELETED/BOOKMARK), `allowWatchBookmarks`,
//! and a `410 Gone` ERROR event when a watch asks for a compacted resourceVersion.
//!
//! Scenario: create a Service and its EndpointSlice -> tables show them; change endpoints ->
//! update; drop every watch connection -> the client resumes; compact the history and drop
//! the connections while changing endpoints -> 410 -> re-list -> converge; stop the whole API
//! server for a while -> tables kept; start it again -> converge. Throughout, the published
//! tables never go empty once filled.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use control::compile::NodeContext;
use control::publish::port_update;
use control::run::{drive, Controller};
use control::source::kube::{client, spawn_watchers, ClientOptions, WatchStats};
use dataplane::sync::{Applier, ToDataplane};
use dataplane::tables::Tables;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

/// Collection paths and their list kinds.
const KINDS: &[(&str, &str, &str)] = &[
    ("/api/v1/services", "v1", "Service"),
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/nodes", "v1", "Node"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1", "NetworkPolicy"),
];

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    path: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Data {
    rv: u64,
    /// path -> (namespace/name -> object)
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
}

#[derive(Clone)]
struct ApiServer {
    data: Arc<Mutex<Data>>,
    events: broadcast::Sender<Change>,
    /// Bumped to cut every open watch.
    cut: Arc<watch::Sender<u64>>,
}

fn path_of(obj: &Value) -> &'static str {
    let kind = obj["kind"].as_str().unwrap();
    KINDS.iter().find(|(_, _, k)| *k == kind).unwrap().0
}

fn obj_key(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap()
    )
}

impl ApiServer {
    fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { data: Arc::default(), events, cut: Arc::new(watch::channel(0).0) }
    }

    fn put(&self, mut obj: Value) {
        let mut d = self.data.lock().unwrap();
        d.rv += 1;
        let rv = d.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let path = path_of(&obj);
        let key = obj_key(&obj);
        let existed = d.objects.entry(path).or_default().insert(key, obj.clone()).is_some();
        let c = Change { rv, path, kind: if existed { "MODIFIED" } else { "ADDED" }, object: obj };
        d.history.push(c.clone());
        let _ = self.events.send(c);
    }

    fn delete(&self, obj: &Value) {
        let mut d = self.data.lock().unwrap();
        let path = path_of(obj);
        let Some(mut old) = d.objects.entry(path).or_default().remove(&obj_key(obj)) else {
            return;
        };
        d.rv += 1;
        let rv = d.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = Change { rv, path, kind: "DELETED", object: old };
        d.history.push(c.clone());
        let _ = self.events.send(c);
    }

    /// Forgets history: watches from any older resourceVersion get 410 Gone.
    fn compact(&self) {
        let mut d = self.data.lock().unwrap();
        d.compacted = d.rv + 1;
        d.history.clear();
    }

    fn cut_watches(&self) {
        self.cut.send_modify(|v| *v += 1);
    }

    async fn handle(
        State(s): State<ApiServer>,
        uri: Uri,
        Query(q): Query<BTreeMap<String, String>>,
    ) -> Response {
        let Some(&(path, api_version, kind)) = KINDS.iter().find(|(p, _, _)| *p == uri.path())
        else {
            return (StatusCode::NOT_FOUND, "not found").into_response();
        };
        let watching = q.get("watch").is_some_and(|v| v == "1" || v == "true");
        if !watching {
            let d = s.data.lock().unwrap();
            let items: Vec<Value> =
                d.objects.get(path).map(|m| m.values().cloned().collect()).unwrap_or_default();
            let body = json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": d.rv.to_string()},
                "items": items,
            });
            return ([("content-type", "application/json")], body.to_string()).into_response();
        }
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true" || v == "1");
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
        let line = |v: Value| Ok::<_, Infallible>(Bytes::from(format!("{v}\n")));
        // Subscribe before reading history so nothing falls between the two.
        let mut live = s.events.subscribe();
        let mut cut = s.cut.subscribe();
        let (replay, rv_now, gone) = {
            let d = s.data.lock().unwrap();
            let gone = from < d.compacted;
            let replay: Vec<Change> =
                d.history.iter().filter(|c| c.path == path && c.rv > from).cloned().collect();
            (replay, d.rv, gone)
        };
        tokio::spawn(async move {
            if gone {
                let status = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from}"),
                    "reason": "Expired", "code": 410}});
                let _ = tx.send(line(status)).await;
                return;
            }
            let mut last = from;
            for c in replay {
                last = c.rv;
                if tx.send(line(json!({"type": c.kind, "object": c.object}))).await.is_err() {
                    return;
                }
            }
            if bookmarks {
                let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv_now.max(last).to_string()}}});
                if tx.send(line(bm)).await.is_err() {
                    return;
                }
            }
            let epoch = *cut.borrow_and_update();
            loop {
                tokio::select! {
                    biased;
                    _ = cut.changed() => return,
                    ev = live.recv() => match ev {
                        // A cut is synchronous for the test: nothing is forwarded after it.
                        Ok(_) if *cut.borrow() != epoch => return,
                        Ok(c) if c.path == path && c.rv > last => {
                            last = c.rv;
                            if tx.send(line(json!({"type": c.kind, "object": c.object}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
        });
        let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (b, rx))
        }));
        ([("content-type", "application/json")], body).into_response()
    }

    /// Serves on `addr` (port 0: any) until the returned handle is aborted.
    async fn serve(&self, addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let app = Router::new().fallback(ApiServer::handle).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (local, task)
    }
}

fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}})
}

fn slice(ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

/// What the (in-process) dataplane has live, and whether it ever went empty once filled.
#[derive(Default)]
struct Observed {
    ever_full: bool,
    went_empty: u64,
    publications: u64,
}

fn web_backends(t: &Tables) -> Vec<String> {
    t.services()
        .find(|s| s.spec().name == "demo/web:http")
        .map(|s| s.backends().iter().map(|b| format!("{}:{}", b.ip, b.port)).collect())
        .unwrap_or_default()
}

async fn wait_for(what: &str, live: &ArcSwap<Tables>, f: impl Fn(&Tables) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f(&live.load()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; web = {:?}",
            web_backends(&live.load())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watch_lists_watches_relists_and_never_publishes_empty() {
    let api = ApiServer::new();
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}));
    api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}}));
    api.put(service());
    api.put(slice(&["10.244.1.1", "10.244.1.2"]));
    let (addr, server) = api.serve("127.0.0.1:0".parse().unwrap()).await;

    let opts = ClientOptions { kubeconfig: None, master: Some(format!("http://{addr}")) };
    let kube = client(&opts).await.unwrap();
    let stats = Arc::new(WatchStats::default());
    let (tx, rx) = mpsc::channel(1024);
    let _watchers = spawn_watchers(kube, "node-1", tx, stats.clone());

    // The dataplane side, in process: every diff goes through the wire types and the Applier.
    let live = Arc::new(ArcSwap::from_pointee(Tables::empty()));
    let observed = Arc::new(Mutex::new(Observed::default()));
    {
        let live = live.clone();
        let observed = observed.clone();
        tokio::spawn(async move {
            let mut applier = Applier::new(live.clone());
            let mut controller =
                Controller::new(NodeContext { name: "node-1".into(), ..Default::default() });
            drive(rx, &mut controller, |_, diff| {
                let msg = ToDataplane::Delta {
                    base: applier.generation(),
                    generation: diff.generation,
                    upserts: diff.upserts.iter().map(|p| port_update(p)).collect(),
                    removals: diff.removals.clone(),
                };
                applier.apply(msg).expect("delta applies");
                let n = live.load().services().count();
                let mut o = observed.lock().unwrap();
                o.publications += 1;
                o.ever_full |= n > 0;
                if o.ever_full && n == 0 {
                    o.went_empty += 1;
                }
            })
            .await;
        });
    }

    // 1. Initial list.
    wait_for("initial list", &live, |t| web_backends(t).len() == 2).await;
    assert_eq!(web_backends(&live.load()), ["10.244.1.1:8080", "10.244.1.2:8080"]);
    assert_eq!(stats.lists.load(Ordering::Relaxed), 6, "one list per kind");

    // 2. A watch event.
    api.put(slice(&["10.244.1.1", "10.244.1.2", "10.244.1.3"]));
    wait_for("endpoint added", &live, |t| web_backends(t).len() == 3).await;

    // 3. Watch connections dropped: the client re-watches from its resourceVersion.
    api.cut_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.put(slice(&["10.244.1.2", "10.244.1.3"]));
    wait_for("change after reconnect", &live, |t| web_backends(t).len() == 2).await;
    assert_eq!(stats.lists.load(Ordering::Relaxed), 6, "resumed without re-listing");

    // 4. History compacted and connections dropped, and a change made meanwhile: the resumed
    //    watch gets 410 Gone, the client re-lists and converges.
    api.compact();
    api.cut_watches();
    api.put(slice(&["10.244.1.3", "10.244.1.4"]));
    wait_for("re-list after 410", &live, |t| {
        web_backends(t) == ["10.244.1.3:8080", "10.244.1.4:8080"]
    })
    .await;
    assert!(stats.lists.load(Ordering::Relaxed) > 6, "a 410 must cause a re-list");
    assert!(stats.errors.load(Ordering::Relaxed) >= 1, "the 410 is reported as a watch error");

    // 5. The API server goes away: the tables stay as they are.
    server.abort();
    api.cut_watches();
    let _ = server.await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(web_backends(&live.load()).len(), 2, "tables kept while the API server is gone");
    // It comes back (same data, same address) with a change made while it was down.
    api.put(slice(&["10.244.1.3", "10.244.1.4", "10.244.1.5"]));
    let (_, server2) = api.serve(addr).await;
    wait_for("converged after the API server returned", &live, |t| web_backends(t).len() == 3)
        .await;

    assert_eq!(observed.lock().unwrap().went_empty, 0, "tables went empty before the deletion");

    // 6. Deleting the Service removes its port.
    api.delete(&service());
    wait_for("service removed", &live, |t| web_backends(t).is_empty()).await;

    assert!(observed.lock().unwrap().publications >= 5);
    server2.abort();
}
