//! Object sources: each turns some outside truth into [`crate::store::Event`]s.
//!
//! - [`manifests`]: a directory of Kubernetes YAML, or the embedded demo set;
//! - [`kube`]: the Kubernetes API server (list + watch of the six kinds).

pub mod kube;
pub mod manifests;
