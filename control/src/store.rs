//! The in-memory store of the Kubernetes objects the control plane reads.
//!
//! Six kinds are kept: Services, EndpointSlices (`discovery.k8s.io/v1`), NetworkPolicies,
//! Pods, Namespaces and Nodes, each keyed by namespace/name (cluster-scoped kinds have an
//! empty namespace). Sources feed it [`Event`]s; it records which Services (and which Nodes)
//! the events touched, so the compiler rebuilds only what changed.
//!
//! Invariants:
//! - Applying an object equal to the stored one records no change, so a re-list that returns
//!   the same objects (after a watch error or a `410 Gone`) causes no recompilation.
//! - [`Event::Replace`] swaps a whole kind in one step: the store is never observed half
//!   re-listed, and objects missing from the new list are deleted at that moment.
//! - EndpointSlices are indexed by the Service named in their `kubernetes.io/service-name`
//!   label; a slice moving from one Service to another touches both.
//! - Pods are stored trimmed to what NetworkPolicy reads ([`trim_pod`]: name, namespace,
//!   labels, node, `hostNetwork`, named container ports, phase and addresses): they are
//!   watched cluster-wide, so the rest (annotations, managed fields, volumes, conditions, ...)
//!   would cost memory per pod of the cluster, and changes to it (status conditions) would
//!   record changes that compile to nothing.
//! - Nothing here panics on bad input: an object without a name (or a namespaced object
//!   without a namespace) is skipped with a logged reason and a [`Skips`] counter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::skips::Skips;

/// `pod` with only what the control plane reads: name, namespace, labels; node name,
/// `hostNetwork`, each container's name and ports (name, number, protocol); phase, `podIP`
/// and `podIPs`. Idempotent.
pub fn trim_pod(pod: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodIP, PodSpec, PodStatus};
    let m = pod.metadata;
    let metadata =
        ObjectMeta { name: m.name, namespace: m.namespace, labels: m.labels, ..Default::default() };
    let spec = pod.spec.map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        containers: s
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ps| {
                    ps.into_iter()
                        .map(|p| ContainerPort {
                            name: p.name,
                            container_port: p.container_port,
                            protocol: p.protocol,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    let status = pod.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips.map(|v| v.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
        ..Default::default()
    });
    Pod { metadata, spec, status }
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object kind the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `v1` Node (cluster-scoped).
    Node,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
    ];
    /// The Kubernetes `kind` name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
    /// The `apiVersion` the store accepts for this kind.
    pub const fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }
    /// Whether objects of this kind live in a namespace.
    pub const fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
    /// The kind named `kind` with api version `api_version`, if the store keeps it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind && k.api_version() == api_version)
    }
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Namespace and name of an object (the namespace is empty for cluster-scoped kinds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjKey {
    /// A key from parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// One stored object, shared (cloning is a reference-count increment).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A Namespace.
    Namespace(Arc<Namespace>),
    /// A Node.
    Node(Arc<Node>),
    /// A Pod.
    Pod(Arc<Pod>),
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A NetworkPolicy.
    NetworkPolicy(Arc<NetworkPolicy>),
}

/// Why a document could not be turned into an [`Object`].
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The document is not a mapping with `apiVersion` and `kind` strings.
    #[error("document has no apiVersion/kind")]
    NoType,
    /// The kind is not one the store keeps.
    #[error("unsupported kind {kind} ({api_version})")]
    Unsupported {
        /// `apiVersion` of the document.
        api_version: String,
        /// `kind` of the document.
        kind: String,
    },
    /// The document does not match the kind's schema.
    #[error("invalid {kind}: {error}")]
    Invalid {
        /// The kind it claimed to be.
        kind: Kind,
        /// The deserializer's complaint.
        error: String,
    },
}

impl Object {
    /// Kind of the object.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }
    /// Metadata of the object.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }
    /// Key of the object, or why it has none.
    pub fn key(&self) -> Result<ObjKey, &'static str> {
        let meta = self.meta();
        let name = match meta.name.as_deref() {
            Some(n) if !n.is_empty() => n,
            _ => return Err("object_missing_name"),
        };
        if self.kind().namespaced() {
            match meta.namespace.as_deref() {
                Some(ns) if !ns.is_empty() => Ok(ObjKey::new(ns, name)),
                _ => Err("object_missing_namespace"),
            }
        } else {
            Ok(ObjKey::new("", name))
        }
    }
    /// Parses one YAML document (already split from a multi-document stream).
    pub fn from_yaml(doc: serde_yaml::Value) -> Result<Object, ParseError> {
        let ty = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let (Some(api_version), Some(kind_name)) = (ty("apiVersion"), ty("kind")) else {
            return Err(ParseError::NoType);
        };
        let Some(kind) = Kind::from_type(&api_version, &kind_name) else {
            return Err(ParseError::Unsupported { api_version, kind: kind_name });
        };
        fn de<T: serde::de::DeserializeOwned>(
            kind: Kind,
            doc: serde_yaml::Value,
        ) -> Result<Arc<T>, ParseError> {
            serde_yaml::from_value(doc)
                .map(Arc::new)
                .map_err(|e| ParseError::Invalid { kind, error: e.to_string() })
        }
        Ok(match kind {
            Kind::Namespace => Object::Namespace(de(kind, doc)?),
            Kind::Node => Object::Node(de(kind, doc)?),
            Kind::Pod => Object::Pod(de(kind, doc)?),
            Kind::Service => Object::Service(de(kind, doc)?),
            Kind::EndpointSlice => Object::EndpointSlice(de(kind, doc)?),
            Kind::NetworkPolicy => Object::NetworkPolicy(de(kind, doc)?),
        })
    }
    /// The Service an EndpointSlice belongs to (its namespace and service-name label).
    fn slice_service(&self) -> Option<ObjKey> {
        let Object::EndpointSlice(s) = self else { return None };
        let ns = s.metadata.namespace.as_deref()?;
        let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some(ObjKey::new(ns, svc.as_str()))
    }
    fn same(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Namespace(a), Object::Namespace(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Node(a), Object::Node(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Pod(a), Object::Pod(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::NetworkPolicy(a), Object::NetworkPolicy(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

/// A change fed to the store by a source.
#[derive(Clone, Debug)]
pub enum Event {
    /// Create or update an object.
    Apply(Object),
    /// Delete an object.
    Delete(Kind, ObjKey),
    /// Replace every object of a kind (after a full list); objects not in the list are deleted.
    Replace(Kind, Vec<Object>),
}

/// What a batch of events touched, as far as compilation cares (Services and Nodes for the
/// service tables; Pods, Namespaces and NetworkPolicies for policy enforcement).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose object or EndpointSlices changed.
    pub services: BTreeSet<ObjKey>,
    /// Nodes (by name) that changed.
    pub nodes: BTreeSet<String>,
    /// Pods that changed (created, updated, deleted).
    pub pods: BTreeSet<ObjKey>,
    /// Namespaces (by name) that changed.
    pub namespaces: BTreeSet<String>,
    /// NetworkPolicies that changed.
    pub policies: BTreeSet<ObjKey>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.nodes.is_empty() && !self.touches_policy()
    }
    /// Whether anything NetworkPolicy enforcement reads (Pods, Namespaces, policies) changed.
    pub fn touches_policy(&self) -> bool {
        !(self.pods.is_empty() && self.namespaces.is_empty() && self.policies.is_empty())
    }
}

/// The object store.
#[derive(Debug, Default)]
pub struct Store {
    /// One map per kind, indexed by [`Kind::index`].
    objects: [BTreeMap<ObjKey, Object>; 6],
    /// Service key -> keys of the EndpointSlices labelled with it.
    slices_by_service: HashMap<ObjKey, BTreeSet<ObjKey>>,
    changes: Changes,
    skips: Skips,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event, recording what it changed.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Apply(obj) => match obj.key() {
                Ok(key) => self.put(key, obj),
                Err(reason) => self.skip(reason, &obj),
            },
            Event::Delete(kind, key) => self.remove(kind, &key),
            Event::Replace(kind, objs) => self.replace(kind, objs),
        }
    }

    /// Applies several events.
    pub fn apply_all(&mut self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            self.apply(e);
        }
    }

    /// Takes what changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Input refused so far.
    pub fn skips(&self) -> &Skips {
        &self.skips
    }

    /// How many objects of `kind` are stored.
    pub fn len(&self, kind: Kind) -> usize {
        self.objects[kind.index()].len()
    }

    /// Whether the store holds no object at all.
    pub fn is_empty(&self) -> bool {
        self.objects.iter().all(BTreeMap::is_empty)
    }

    /// The object of `kind` at `key`.
    pub fn get(&self, kind: Kind, key: &ObjKey) -> Option<&Object> {
        self.objects[kind.index()].get(key)
    }

    /// Every object of `kind`, sorted by key.
    pub fn iter(&self, kind: Kind) -> impl Iterator<Item = (&ObjKey, &Object)> {
        self.objects[kind.index()].iter()
    }

    /// Every object of `kind` in namespace `ns`, sorted by name.
    pub fn iter_namespace<'a>(
        &'a self,
        kind: Kind,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Object)> + 'a {
        self.objects[kind.index()]
            .range(ObjKey::new(ns, "")..)
            .take_while(move |(k, _)| k.namespace == ns)
    }

    /// The Service at `key`.
    pub fn service(&self, key: &ObjKey) -> Option<&Arc<Service>> {
        match self.get(Kind::Service, key) {
            Some(Object::Service(s)) => Some(s),
            _ => None,
        }
    }

    /// Every Service, sorted by key.
    pub fn services(&self) -> impl Iterator<Item = (&ObjKey, &Arc<Service>)> {
        self.iter(Kind::Service).filter_map(|(k, o)| match o {
            Object::Service(s) => Some((k, s)),
            _ => None,
        })
    }

    /// The EndpointSlices labelled with the Service `svc`, sorted by slice name.
    pub fn slices_for(&self, svc: &ObjKey) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.slices_by_service.get(svc).into_iter().flatten().filter_map(|k| {
            match self.get(Kind::EndpointSlice, k) {
                Some(Object::EndpointSlice(s)) => Some(s),
                _ => None,
            }
        })
    }

    /// The Node named `name`.
    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        match self.get(Kind::Node, &ObjKey::new("", name)) {
            Some(Object::Node(n)) => Some(n),
            _ => None,
        }
    }

    fn skip(&mut self, reason: &'static str, obj: &Object) {
        tracing::warn!(kind = %obj.kind(), reason, name = ?obj.meta().name, "object skipped");
        self.skips.bump(reason);
    }

    fn touch(&mut self, key: &ObjKey, obj: &Object) {
        match obj {
            Object::Service(_) => {
                self.changes.services.insert(key.clone());
            }
            Object::EndpointSlice(_) => {
                if let Some(svc) = obj.slice_service() {
                    self.changes.services.insert(svc);
                }
            }
            Object::Node(_) => {
                self.changes.nodes.insert(key.name.clone());
            }
            Object::Pod(_) => {
                self.changes.pods.insert(key.clone());
            }
            Object::Namespace(_) => {
                self.changes.namespaces.insert(key.name.clone());
            }
            Object::NetworkPolicy(_) => {
                self.changes.policies.insert(key.clone());
            }
        }
    }

    fn index_slice(&mut self, key: &ObjKey, obj: &Object, add: bool) {
        if !matches!(obj, Object::EndpointSlice(_)) {
            return;
        }
        let Some(svc) = obj.slice_service() else {
            if add {
                tracing::debug!(slice = %key, "EndpointSlice without {SERVICE_NAME_LABEL}: unused");
                self.skips.bump("endpointslice_no_service_label");
            }
            return;
        };
        if add {
            self.slices_by_service.entry(svc).or_default().insert(key.clone());
        } else if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
    }

    fn put(&mut self, key: ObjKey, obj: Object) {
        let obj = match obj {
            Object::Pod(p) => Object::Pod(Arc::new(trim_pod(Arc::unwrap_or_clone(p)))),
            other => other,
        };
        let kind = obj.kind();
        if let Some(old) = self.objects[kind.index()].get(&key) {
            if old.same(&obj) {
                return;
            }
            let old = old.clone();
            self.touch(&key, &old);
            self.index_slice(&key, &old, false);
        }
        self.touch(&key, &obj);
        self.index_slice(&key, &obj, true);
        self.objects[kind.index()].insert(key, obj);
    }

    fn remove(&mut self, kind: Kind, key: &ObjKey) {
        if let Some(old) = self.objects[kind.index()].remove(key) {
            self.touch(key, &old);
            self.index_slice(key, &old, false);
        }
    }

    fn replace(&mut self, kind: Kind, objs: Vec<Object>) {
        let mut fresh: BTreeMap<ObjKey, Object> = BTreeMap::new();
        for obj in objs {
            if obj.kind() != kind {
                self.skip("replace_wrong_kind", &obj);
                continue;
            }
            match obj.key() {
                Ok(key) => {
                    fresh.insert(key, obj);
                }
                Err(reason) => self.skip(reason, &obj),
            }
        }
        let stale: Vec<ObjKey> = self.objects[kind.index()]
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            self.remove(kind, &key);
        }
        for (key, obj) in fresh {
            self.put(key, obj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Object {
        Object::from_yaml(serde_yaml::from_str(s).unwrap()).unwrap()
    }

    fn slice(name: &str, svc: &str) -> Object {
        yaml(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: ns\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\n\
             endpoints: []\n"
        ))
    }

    #[test]
    fn apply_same_object_records_no_change() {
        let mut st = Store::new();
        let svc = yaml("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\n");
        st.apply(Event::Apply(svc.clone()));
        assert_eq!(st.take_changes().services.len(), 1);
        st.apply(Event::Apply(svc));
        assert!(st.take_changes().is_empty());
    }

    #[test]
    fn slice_relabel_touches_both_services() {
        let mut st = Store::new();
        st.apply(Event::Apply(slice("s1", "a")));
        assert_eq!(st.slices_for(&ObjKey::new("ns", "a")).count(), 1);
        st.take_changes();
        st.apply(Event::Apply(slice("s1", "b")));
        let ch = st.take_changes();
        assert_eq!(
            ch.services.into_iter().collect::<Vec<_>>(),
            vec![ObjKey::new("ns", "a"), ObjKey::new("ns", "b")]
        );
        assert_eq!(st.slices_for(&ObjKey::new("ns", "a")).count(), 0);
        assert_eq!(st.slices_for(&ObjKey::new("ns", "b")).count(), 1);
    }

    #[test]
    fn replace_deletes_missing_and_keeps_equal_without_change() {
        let mut st = Store::new();
        st.apply(Event::Replace(Kind::EndpointSlice, vec![slice("s1", "a"), slice("s2", "b")]));
        st.take_changes();
        st.apply(Event::Replace(Kind::EndpointSlice, vec![slice("s1", "a")]));
        let ch = st.take_changes();
        assert_eq!(ch.services.into_iter().collect::<Vec<_>>(), vec![ObjKey::new("ns", "b")]);
        assert_eq!(st.len(Kind::EndpointSlice), 1);
    }

    #[test]
    fn pods_are_kept_trimmed_and_status_noise_is_no_change() {
        let full = "apiVersion: v1\nkind: Pod\n\
            metadata: {name: p, namespace: ns, labels: {app: web}, annotations: {a: b},\n\
              ownerReferences: [{apiVersion: v1, kind: X, name: o, uid: u}]}\n\
            spec: {nodeName: n1, hostNetwork: false, volumes: [{name: v}],\n\
              containers: [{name: c, image: img, env: [{name: E, value: x}],\n\
                ports: [{name: http, containerPort: 8080, protocol: TCP, hostPort: 80}]}]}\n\
            status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}], hostIP: 1.2.3.4,\n\
              conditions: [{type: Ready, status: 'True'}]}\n";
        let mut st = Store::new();
        st.apply(Event::Apply(yaml(full)));
        let key = ObjKey::new("ns", "p");
        let Some(Object::Pod(p)) = st.get(Kind::Pod, &key) else { panic!("stored") };
        assert_eq!(p.metadata.labels.as_ref().map(|l| l["app"].as_str()), Some("web"));
        assert!(p.metadata.annotations.is_none() && p.metadata.owner_references.is_none());
        let spec = p.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert!(spec.volumes.is_none() && spec.containers[0].image.is_none());
        let port = &spec.containers[0].ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port, port.host_port),
            (Some("http"), 8080, None)
        );
        let status = p.status.as_ref().expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert!(status.host_ip.is_none() && status.conditions.is_none());
        assert_eq!(**p, trim_pod((**p).clone()), "idempotent");
        st.take_changes();
        // A condition flipping changes nothing the store keeps: no change recorded.
        st.apply(Event::Apply(yaml(&full.replace("'True'", "'False'"))));
        assert!(st.take_changes().pods.is_empty());
        st.apply(Event::Apply(yaml(&full.replace("app: web", "app: db"))));
        assert_eq!(st.take_changes().pods.len(), 1);
    }

    #[test]
    fn objects_without_name_or_namespace_are_skipped_and_counted() {
        let mut st = Store::new();
        st.apply(Event::Apply(yaml("apiVersion: v1\nkind: Service\nmetadata: {namespace: ns}\n")));
        st.apply(Event::Apply(yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")));
        assert_eq!(st.skips().get("object_missing_name"), 1);
        assert_eq!(st.skips().get("object_missing_namespace"), 1);
        assert!(st.is_empty());
    }

    #[test]
    fn unsupported_and_invalid_documents_are_errors() {
        let v = |s: &str| serde_yaml::from_str::<serde_yaml::Value>(s).unwrap();
        assert!(matches!(
            Object::from_yaml(v("apiVersion: apps/v1\nkind: Deployment\n")),
            Err(ParseError::Unsupported { .. })
        ));
        assert!(matches!(Object::from_yaml(v("- 1\n- 2\n")), Err(ParseError::NoType)));
        assert!(matches!(
            Object::from_yaml(v("apiVersion: v1\nkind: Service\nspec: {ports: 7}\n")),
            Err(ParseError::Invalid { .. })
        ));
    }
}
