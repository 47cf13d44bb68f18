//! Synthetic clusters for benchmarks: Namespaces, Pods and NetworkPolicies of realistic
//! shapes, deterministic for a given size.
//!
//! Shape (for `pods` pods and `policies` policies):
//! - 100 namespaces `ns-0`..`ns-99`, labelled `team: t<n % 10>`;
//! - pod `i` is `ns-<i % 100>/pod-<i>`, labelled `app: app-<i % apps>` (`apps` = pods / 10,
//!   rounded up to a multiple of 100, so each app's pods share a namespace), address
//!   `10.128.0.0 + i + 1`, container port `http` = TCP 8080, on node `node-<i / 100>` (100
//!   pods per node, so a node's pods span 100 apps and every policy shape); [`SYNTHETIC_NODE`] (`node-0`) is the local node;
//! - policy `k` lives in `ns-<k % 100>` and selects `app: app-<k % apps>`; its ingress rule
//!   allows, by `k % 4`: pods of another app of its namespace, every pod of the namespaces of
//!   one team, pods of an app in a team's namespaces (both selectors), or an `ipBlock`
//!   (`192.168.x.0/24` except a `/28`); every other policy names ports (TCP 8080, the named
//!   port `http`, or TCP 9000-9100); every seventh also isolates egress (to another app on
//!   TCP 5432, and UDP 53 to anyone).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::store::Object;

/// The node whose pods the synthetic policies isolate.
pub const SYNTHETIC_NODE: &str = "node-0";
/// Namespaces in a synthetic cluster.
pub const SYNTHETIC_NAMESPACES: usize = 100;
const PODS_PER_NODE: usize = 100;

fn labels(kv: &[(&str, String)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn meta(ns: Option<String>, name: String, l: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta { name: Some(name), namespace: ns, labels: Some(l), ..Default::default() }
}

fn apps(pods: usize) -> usize {
    pods.div_ceil(10).div_ceil(SYNTHETIC_NAMESPACES).max(1) * SYNTHETIC_NAMESPACES
}

/// The address of synthetic pod `i`.
pub fn synthetic_pod_ip(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a80_0000u32.wrapping_add(i as u32 + 1))
}

/// Synthetic pod `i` of a cluster of `pods` pods (see the module docs).
pub fn synthetic_pod(i: usize, pods: usize) -> Object {
    let nodes = pods.div_ceil(PODS_PER_NODE).max(1);
    let ip = synthetic_pod_ip(i).to_string();
    Object::Pod(Arc::new(Pod {
        metadata: meta(
            Some(format!("ns-{}", i % SYNTHETIC_NAMESPACES)),
            format!("pod-{i}"),
            labels(&[("app", format!("app-{}", i % apps(pods)))]),
        ),
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", (i / PODS_PER_NODE) % nodes)),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip),
            ..Default::default()
        }),
    }))
}

fn app(a: usize) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(labels(&[("app", format!("app-{a}"))])),
        ..Default::default()
    })
}

fn team(t: usize) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(labels(&[("team", format!("t{t}"))])),
        ..Default::default()
    })
}

fn port(p: IntOrString, end: Option<i32>, proto: &str) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(p), end_port: end, protocol: Some(proto.into()) }
}

/// Synthetic policy `k` of a cluster of `pods` pods (see the module docs).
pub fn synthetic_policy(k: usize, pods: usize) -> Object {
    let apps = apps(pods);
    let a = k % apps;
    // Another app of the same namespace (apps are a multiple of the namespace count).
    let other = (a + SYNTHETIC_NAMESPACES) % apps;
    let peer = match k % 4 {
        0 => NetworkPolicyPeer { pod_selector: app(other), ..Default::default() },
        1 => NetworkPolicyPeer { namespace_selector: team(k % 10), ..Default::default() },
        2 => NetworkPolicyPeer {
            namespace_selector: team((k + 1) % 10),
            pod_selector: app((k * 7) % apps),
            ..Default::default()
        },
        _ => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: format!("192.168.{}.0/24", k % 256),
                except: Some(vec![format!("192.168.{}.{}/28", k % 256, (k % 16) * 16)]),
            }),
            ..Default::default()
        },
    };
    let ports = match k % 6 {
        0 => Some(vec![port(IntOrString::Int(8080), None, "TCP")]),
        2 => Some(vec![port(IntOrString::String("http".into()), None, "TCP")]),
        4 => Some(vec![port(IntOrString::Int(9000), Some(9100), "TCP")]),
        _ => None,
    };
    let egress = (k % 7 == 0).then(|| {
        vec![
            NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    pod_selector: app(other),
                    ..Default::default()
                }]),
                ports: Some(vec![port(IntOrString::Int(5432), None, "TCP")]),
            },
            NetworkPolicyEgressRule {
                to: None,
                ports: Some(vec![port(IntOrString::Int(53), None, "UDP")]),
            },
        ]
    });
    let mut types = vec!["Ingress".to_string()];
    if egress.is_some() {
        types.push("Egress".into());
    }
    Object::NetworkPolicy(Arc::new(NetworkPolicy {
        metadata: meta(
            Some(format!("ns-{}", k % SYNTHETIC_NAMESPACES)),
            format!("policy-{k}"),
            BTreeMap::new(),
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: app(a),
            policy_types: Some(types),
            ingress: Some(vec![NetworkPolicyIngressRule { from: Some(vec![peer]), ports }]),
            egress,
        }),
    }))
}

/// A whole synthetic cluster: namespaces, `pods` pods and `policies` policies.
pub fn synthetic_cluster(pods: usize, policies: usize) -> Vec<Object> {
    let mut v = Vec::with_capacity(SYNTHETIC_NAMESPACES + pods + policies);
    for n in 0..SYNTHETIC_NAMESPACES {
        v.push(Object::Namespace(Arc::new(Namespace {
            metadata: meta(None, format!("ns-{n}"), labels(&[("team", format!("t{}", n % 10))])),
            ..Default::default()
        })));
    }
    v.extend((0..pods).map(|i| synthetic_pod(i, pods)));
    v.extend((0..policies).map(|k| synthetic_policy(k, pods)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyCompiler;
    use crate::store::{Event, Store};

    #[test]
    fn synthetic_clusters_compile_and_isolate_local_pods() {
        let mut st = Store::new();
        st.apply_all(synthetic_cluster(1_000, 100).into_iter().map(Event::Apply));
        let mut pc = PolicyCompiler::new(SYNTHETIC_NODE);
        let u = pc.compile_all(&st).expect("an update");
        assert_eq!(u.endpoints.len(), 1_000);
        assert!(pc.skips().is_empty(), "{}", pc.skips());
        // 100 policies over 100 apps: every app of node-0's pods is selected.
        let isolated = u.endpoints.iter().filter(|(_, e)| e.ingress != 0).count();
        assert_eq!(isolated, 100, "node-0 has 100 pods, all selected");
        assert!(!u.sets.is_empty() && !u.ranges.is_empty());
        dataplane::policy::PolicyTables::build((*u).clone()).expect("builds");
    }
}
