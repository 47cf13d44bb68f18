//! Every manifest in `config/deploy/` parses into its Kubernetes type with no field lost: each
//! document is deserialized into the k8s-openapi type its `kind` names, serialized back, and
//! compared with the original as JSON values, so a misspelt or misplaced field (which serde
//! would otherwise ignore) fails the test. The ConfigMap's node configuration is parsed with
//! the dataplane's own configuration parser, which refuses unknown keys.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/deploy")
}

/// Deserializes `doc` as `T` and checks the round trip gives back the same JSON value.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &serde_json::Value, what: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse as its type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, doc, "{what}: fields lost or changed in the round trip (unknown field?)");
    typed
}

/// Every YAML document of every file, as (file:index, JSON value).
fn documents() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("config/deploy exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, d) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let v = serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}#{i}: not YAML: {e}", f.display()));
            if v.is_null() {
                continue;
            }
            let j = serde_json::to_value(&v).unwrap();
            docs.push((format!("{}#{i}", f.file_name().unwrap().to_string_lossy()), j));
        }
    }
    docs
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_without_unknown_fields() {
    let docs = documents();
    let mut kinds = Vec::new();
    let mut daemonset = None;
    let mut role = None;
    let mut node_config = None;
    for (what, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{what}: no kind"));
        kinds.push(kind.to_string());
        match kind {
            "ServiceAccount" => {
                round_trip::<ServiceAccount>(doc, what);
            }
            "ClusterRole" => role = Some(round_trip::<ClusterRole>(doc, what)),
            "ClusterRoleBinding" => {
                let b = round_trip::<ClusterRoleBinding>(doc, what);
                assert_eq!(b.role_ref.name, "kxdp-control");
            }
            "ConfigMap" => {
                let c = round_trip::<ConfigMap>(doc, what);
                node_config = c.data.and_then(|d| d.get("node.yaml").cloned());
            }
            "DaemonSet" => daemonset = Some(round_trip::<DaemonSet>(doc, what)),
            other => panic!("{what}: unexpected kind {other}"),
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"],
        "one of each object"
    );

    // The node configuration in the ConfigMap is one the dataplane accepts.
    let node = node_config.expect("ConfigMap has node.yaml");
    let cfg = dataplane::io::config::NodeConfig::parse(&node)
        .unwrap_or_else(|e| panic!("ConfigMap node.yaml: {e}"));
    assert_eq!(cfg.control_socket, Path::new("/run/kxdp/control.sock"));

    // The ClusterRole only reads, and only the kinds control watches.
    let role = role.unwrap();
    for r in role.rules.as_deref().unwrap_or_default() {
        for v in &r.verbs {
            assert!(v == "list" || v == "watch", "read-only verbs, found {v}");
        }
    }
    let mut resources: Vec<&str> = role
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .flat_map(|r| r.resources.as_deref().unwrap_or_default().iter().map(String::as_str))
        .collect();
    resources.sort();
    assert_eq!(
        resources,
        ["endpointslices", "namespaces", "networkpolicies", "nodes", "pods", "services"]
    );

    // The DaemonSet: host network, two containers, the dataplane with exactly the documented
    // capabilities and not privileged, control with none.
    let ds = daemonset.unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("kxdp"));
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["dataplane", "control"]);
    let caps = |i: usize| {
        let sc = pod.containers[i].security_context.clone().unwrap();
        assert_ne!(sc.privileged, Some(true), "{} is not privileged", names[i]);
        let c = sc.capabilities.unwrap();
        assert_eq!(c.drop.as_deref(), Some(&["ALL".to_string()][..]));
        c.add.unwrap_or_default()
    };
    assert_eq!(caps(0), ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "IPC_LOCK", "SYS_NICE"]);
    assert!(caps(1).is_empty(), "control needs no capability");
}

#[test]
fn an_unknown_field_is_caught() {
    // The check above must be able to fail: a misspelt field disappears in the round trip.
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "y"},
        "automountServiceAccountTokn": false,
    });
    let r = std::panic::catch_unwind(|| round_trip::<ServiceAccount>(&doc, "typo"));
    assert!(r.is_err(), "a misspelt field is reported");
}
