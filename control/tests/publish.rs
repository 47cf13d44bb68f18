//! Publication over a real Unix socket: control's `Publisher` against the dataplane's sync
//! `Server` + `Applier`. Snapshot, deltas, a control restart (resync without the tables ever
//! going empty) and a dataplane restart (full snapshot to the new process).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use control::compile::NodeContext;
use control::publish::{PublishStatus, Publisher};
use control::run::Controller;
use control::source::manifests::{embedded_objects, replace_events};
use control::store::{Event, Object};
use dataplane::sync::{Applier, Server};
use dataplane::tables::{NextHop, Routes, Tables};

fn ctx() -> NodeContext {
    NodeContext { name: "node-1".into(), ..Default::default() }
}

fn demo_controller() -> (Controller, control::compile::Diff) {
    let mut c = Controller::new(ctx());
    let mut skips = control::skips::Skips::new();
    let diff = c.handle(replace_events(embedded_objects(&mut skips))).expect("first diff");
    (c, diff)
}

fn dataplane_tables() -> Arc<ArcSwap<Tables>> {
    let mut routes = Routes::default();
    routes.add_prefix(
        Ipv4Addr::new(10, 200, 0, 0),
        16,
        NextHop { ifindex: 3, src_mac: [2; 6], dst_mac: [4; 6] },
    );
    let t = Tables::builder(0).routes(routes).snat_ip(Some(Ipv4Addr::new(10, 200, 0, 1))).build();
    Arc::new(ArcSwap::from_pointee(t))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Samples the live tables until stopped; counts samples with no service after the first
/// non-empty one, and generations going backwards.
struct Sampler {
    stop: Arc<AtomicBool>,
    empty_after_full: Arc<AtomicU64>,
    backwards: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(live: Arc<ArcSwap<Tables>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let empty = Arc::new(AtomicU64::new(0));
        let back = Arc::new(AtomicU64::new(0));
        let (s, e, b) = (stop.clone(), empty.clone(), back.clone());
        let thread = std::thread::spawn(move || {
            let mut seen_full = false;
            let mut last_gen = 0;
            while !s.load(Ordering::Relaxed) {
                let t = live.load();
                let n = t.services().count();
                seen_full |= n > 0;
                if seen_full && n == 0 {
                    e.fetch_add(1, Ordering::Relaxed);
                }
                if t.generation() < last_gen {
                    b.fetch_add(1, Ordering::Relaxed);
                }
                last_gen = t.generation();
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Self { stop, empty_after_full: empty, backwards: back, thread: Some(thread) }
    }
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (self.empty_after_full.load(Ordering::Relaxed), self.backwards.load(Ordering::Relaxed))
    }
}

fn web_backends(t: &Tables) -> usize {
    t.services().find(|s| s.spec().name == "demo/web:http").map_or(0, |s| s.backends().len())
}

#[test]
fn snapshot_deltas_control_restart_and_dataplane_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run").join("control.sock");

    // The dataplane.
    let live = dataplane_tables();
    let server =
        Server::spawn(&sock, Arc::new(parking_lot::Mutex::new(Applier::new(live.clone()))))
            .unwrap();
    let sampler = Sampler::start(live.clone());

    // Control: snapshot.
    let (mut ctl, first) = demo_controller();
    let publisher = Publisher::spawn(&sock).unwrap();
    publisher.send(first);
    wait_for("snapshot", || publisher.status().snapshots == 1);
    let t = live.load_full();
    assert_eq!(t.services().count(), 4, "demo: web, echo, sticky, idle");
    assert_eq!(web_backends(&t), 3);
    assert_eq!(t.snat_ip(), Some(Ipv4Addr::new(10, 200, 0, 1)), "dataplane-owned state kept");

    // Deltas: web loses an endpoint, then echo is deleted.
    let Some(Object::EndpointSlice(slice)) = ctl
        .store()
        .get(control::store::Kind::EndpointSlice, &control::store::ObjKey::new("demo", "web-7x2kq"))
        .cloned()
    else {
        panic!("demo slice missing")
    };
    let mut slice = (*slice).clone();
    slice.endpoints.pop();
    let d = ctl.handle([Event::Apply(Object::EndpointSlice(Arc::new(slice)))]).expect("diff");
    assert_eq!((d.upserts.len(), d.removals.len()), (1, 0), "only web changes");
    publisher.send(d);
    let d = ctl
        .handle([Event::Delete(
            control::store::Kind::Service,
            control::store::ObjKey::new("demo", "echo"),
        )])
        .expect("diff");
    publisher.send(d);
    wait_for("two deltas", || {
        publisher.status().deltas >= 1 && live.load().services().count() == 3
    });
    assert_eq!(web_backends(&live.load()), 2);
    let deltas = publisher.status().deltas;
    assert!(deltas == 1 || deltas == 2, "queued diffs may merge: {deltas}");

    // Control restart: a new process (new publisher, ids from scratch) resyncs by snapshot.
    publisher.shutdown();
    let gen_before = live.load().generation();
    let (_ctl2, first2) = demo_controller();
    let publisher2 = Publisher::spawn(&sock).unwrap();
    publisher2.send(first2);
    wait_for("resync snapshot", || publisher2.status().snapshots == 1);
    assert!(live.load().generation() > gen_before);
    assert_eq!(live.load().services().count(), 4);
    assert_eq!(web_backends(&live.load()), 3);

    // Dataplane restart: a new server process with empty tables gets a full snapshot.
    server.shutdown();
    let live2 = dataplane_tables();
    let server2 =
        Server::spawn(&sock, Arc::new(parking_lot::Mutex::new(Applier::new(live2.clone()))))
            .unwrap();
    wait_for("snapshot to the new dataplane", || publisher2.status().snapshots == 2);
    assert_eq!(live2.load().services().count(), 4);
    let st: PublishStatus = publisher2.status();
    assert_eq!(st.connections, 2);
    assert_eq!(st.errors, 0);

    let (empty, backwards) = sampler.finish();
    assert_eq!(empty, 0, "the first dataplane's tables went empty during a resync");
    assert_eq!(backwards, 0, "generation went backwards");
    assert_eq!(live.load().services().count(), 4, "a disconnected dataplane keeps its tables");
    publisher2.shutdown();
    server2.shutdown();
}

fn ids_by_name(t: &Tables) -> std::collections::BTreeMap<String, u32> {
    t.services().map(|s| (s.spec().name.clone(), s.id())).collect()
}

#[test]
fn a_restarted_control_plane_adopts_the_dataplane_ids_and_keeps_every_port() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let live = dataplane_tables();
    let server =
        Server::spawn(&sock, Arc::new(parking_lot::Mutex::new(Applier::new(live.clone()))))
            .unwrap();

    // History that a fresh allocation would not reproduce: echo arrives after the others.
    let mut skips = control::skips::Skips::new();
    let all = embedded_objects(&mut skips);
    let is_echo = |o: &Object| o.meta().name.as_deref().is_some_and(|n| n.starts_with("echo"));
    let (echo, rest): (Vec<Object>, Vec<Object>) = all.iter().cloned().partition(is_echo);
    assert!(!echo.is_empty());
    let mut ctl = Controller::new(ctx());
    let publisher = Publisher::spawn(&sock).unwrap();
    publisher.send(ctl.handle(replace_events(rest)).expect("first diff"));
    publisher.send(ctl.handle(echo.into_iter().map(Event::Apply)).expect("echo diff"));
    wait_for("four services", || live.load().services().count() == 4);
    let before = live.load_full();
    publisher.shutdown();

    // Without adoption a new control plane would renumber: the test can tell.
    let mut fresh = Controller::new(ctx());
    fresh.handle(replace_events(all.clone())).expect("diff");
    let fresh_ids: std::collections::BTreeMap<String, u32> =
        fresh.compiler().ports().values().map(|p| (p.port.spec().name.clone(), p.id())).collect();
    assert_ne!(fresh_ids, ids_by_name(&before), "the history must matter for this test");

    // The restart: hello first, adopt, then compile and publish.
    let mut ctl2 = Controller::new(ctx());
    let publisher2 = Publisher::spawn(&sock).unwrap();
    let ids = publisher2.first_hello(Duration::from_secs(10)).expect("hello from the dataplane");
    assert_eq!(ctl2.adopt_ids(&ids).0, 4);
    publisher2.send(ctl2.handle(replace_events(all)).expect("first diff"));
    wait_for("resync", || publisher2.status().snapshots == 1);
    let after = live.load_full();
    assert!(after.generation() > before.generation());
    assert_eq!(ids_by_name(&after), ids_by_name(&before));
    for s in before.services() {
        let now = after.service_arc(s.id()).expect("same id");
        assert!(Arc::ptr_eq(s, now), "{} was rebuilt: its flows would lose state", s.spec().name);
    }
    assert_eq!(ctl2.adopt_ids(&ids), (0, 0), "no adoption once compiled");
    publisher2.shutdown();
    server.shutdown();
}

#[test]
fn first_hello_gives_up_when_no_dataplane_answers() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = Publisher::spawn(dir.path().join("nobody.sock")).unwrap();
    assert_eq!(publisher.first_hello(Duration::from_millis(300)), None);
    publisher.shutdown();
}
