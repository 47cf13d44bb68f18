//! Incremental compilation: only changed Services are rebuilt, unchanged ports keep their
//! `Arc`, ids are stable, diffs name exactly what changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::compile::{Compiler, NodeContext};
use control::ids::Ids;
use control::source::manifests::{parse_documents, replace_events};
use control::store::{Event, Kind, ObjKey, Object, Store};

fn objs(yaml: &str) -> Vec<Object> {
    let mut skips = control::skips::Skips::new();
    let v = parse_documents(yaml, "test", &mut skips);
    assert!(skips.is_empty(), "{skips}");
    v
}

fn svc(name: &str, ip: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
         spec:\n  clusterIP: {ip}\n{extra}  ports:\n  - {{name: http, port: 80}}\n---\n"
    )
}

fn slice(svc: &str, ips: &[&str]) -> String {
    let eps: String =
        ips.iter().map(|ip| format!("  - {{addresses: [{ip}], nodeName: node-1}}\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  \
         namespace: ns\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\n\
         ports:\n  - {{name: http, protocol: TCP, port: 8080}}\nendpoints:\n{eps}---\n"
    )
}

fn setup(yaml: &str) -> (Store, Compiler) {
    let mut store = Store::new();
    store.apply_all(replace_events(objs(yaml)));
    store.take_changes();
    let mut c = Compiler::with_ids(
        NodeContext {
            name: "node-1".into(),
            addresses: vec!["192.168.1.10".parse().unwrap()],
            zone: None,
        },
        Ids::new(Duration::from_secs(60)),
    );
    let d = c.compile_all(&store);
    assert_eq!(d.generation, 1);
    (store, c)
}

fn apply(store: &mut Store, c: &mut Compiler, yaml: &str) -> control::compile::Diff {
    for o in objs(yaml) {
        store.apply(Event::Apply(o));
    }
    let ch = store.take_changes();
    c.compile(store, &ch)
}

#[test]
fn endpoint_change_rebuilds_only_its_service() {
    let base = format!(
        "{}{}{}{}",
        svc("a", "10.96.0.1", ""),
        slice("a", &["10.244.0.1"]),
        svc("b", "10.96.0.2", ""),
        slice("b", &["10.244.0.2"])
    );
    let (mut store, mut c) = setup(&base);
    let before: Vec<_> = c.ports().values().cloned().collect();
    let d = apply(&mut store, &mut c, &slice("a", &["10.244.0.1", "10.244.0.9"]));
    assert_eq!(d.generation, 2);
    assert_eq!(d.upserts.len(), 1);
    assert!(d.removals.is_empty());
    assert_eq!(d.upserts[0].port.spec().name, "ns/a:http");
    assert_eq!(d.upserts[0].id(), before[0].id(), "service id stable");
    assert_eq!(
        d.upserts[0].port.backends()[0].id,
        before[0].port.backends()[0].id,
        "backend id stable"
    );
    assert!(Arc::ptr_eq(&c.ports()[&before[1].id()], &before[1]), "b untouched, same Arc");

    // The same slice again: nothing to do, generation unchanged.
    let d = apply(&mut store, &mut c, &slice("a", &["10.244.0.1", "10.244.0.9"]));
    assert!(d.is_empty());
    assert_eq!(d.generation, 2);
}

#[test]
fn deleted_service_is_removed_and_its_id_returns_within_the_grace() {
    let (mut store, mut c) =
        setup(&format!("{}{}", svc("a", "10.96.0.1", ""), slice("a", &["10.244.0.1"])));
    let id = *c.ports().keys().next().unwrap();
    store.apply(Event::Delete(Kind::Service, ObjKey::new("ns", "a")));
    let ch = store.take_changes();
    let d = c.compile(&store, &ch);
    assert_eq!(d.removals, vec![id]);
    assert!(c.ports().is_empty());
    assert_eq!(c.ids().services.quarantined(), 1);
    assert_eq!(c.ids().backends.quarantined(), 1);
    let d = apply(&mut store, &mut c, &svc("a", "10.96.0.1", ""));
    assert_eq!(d.upserts[0].id(), id, "same name within the grace: same id");
    assert_eq!(d.upserts[0].port.backends().len(), 1, "the slice stayed in the store");
}

#[test]
fn frontend_conflict_is_handed_over_when_the_owner_leaves() {
    let ext = "  externalIPs: [198.51.100.1]\n";
    let (mut store, mut c) =
        setup(&format!("{}{}", svc("a", "10.96.0.1", ext), svc("b", "10.96.0.2", ext)));
    assert_eq!(c.skips().get("frontend_conflict"), 1);
    let b_id = c.ports().values().find(|p| p.port.spec().name == "ns/b:http").unwrap().id();
    assert_eq!(c.ports()[&b_id].frontends.len(), 1, "b has only its ClusterIP");
    store.apply(Event::Delete(Kind::Service, ObjKey::new("ns", "a")));
    let ch = store.take_changes();
    let d = c.compile(&store, &ch);
    assert_eq!(d.removals.len(), 1);
    assert_eq!(d.upserts.len(), 1, "b recompiled in the same pass");
    assert_eq!(d.upserts[0].id(), b_id);
    assert_eq!(d.upserts[0].frontends.len(), 2, "b took the external IP over");
}

#[test]
fn traffic_policy_change_splits_a_port_and_node_zone_change_recompiles() {
    let base = format!(
        "{}{}",
        svc("a", "10.96.0.1", "  type: NodePort\n")
            .replace("- {name: http, port: 80}", "- {name: http, port: 80, nodePort: 30080}"),
        slice("a", &["10.244.0.1"])
    );
    let (mut store, mut c) = setup(&base);
    assert_eq!(c.ports().len(), 1);
    let local =
        base.replace("  type: NodePort\n", "  type: NodePort\n  externalTrafficPolicy: Local\n");
    let d = apply(&mut store, &mut c, &local);
    let names: Vec<_> = d.upserts.iter().map(|p| p.port.spec().name.clone()).collect();
    assert_eq!(names, ["ns/a:http", "ns/a:http (external)"]);
    assert_eq!(c.ports().len(), 2);

    // This node's zone appears on its Node object: every Service is re-evaluated; nothing
    // uses hints here, so nothing changes and the diff is empty.
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {topology.kubernetes.io/zone: z1}\n";
    let t = Instant::now();
    let d = apply(&mut store, &mut c, node);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(c.zone(), "z1");
    assert!(t.elapsed() < Duration::from_secs(5));
}
