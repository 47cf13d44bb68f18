//! kxdp control plane: Kubernetes objects in, dataplane tables out.
//!
//! The pieces, in the order data flows through them:
//!
//! - [`source`]: where objects come from — the Kubernetes API server ([`source::kube`], list
//!   and watch through the `kube` crate) or a directory of manifests
//!   ([`source::manifests`], the embedded demo set by default). Sources emit [`store::Event`]s.
//! - [`store`]: the in-memory objects (Services, EndpointSlices, NetworkPolicies, Pods,
//!   Namespaces, Nodes), which records what each event changed.
//! - [`compile`]: the Kubernetes service semantics (as kube-proxy implements them) turned into
//!   the dataplane's service ports and frontends, incrementally, with stable ids from [`ids`].
//! - [`policy`]: NetworkPolicy (with Pods and Namespaces) turned into the dataplane's
//!   identities, address ranges and allow sets, incrementally.
//! - [`dump`]: a readable, deterministic text form of compiled tables (golden tests, `--dump`).
//! - [`publish`]: the client that keeps the dataplane process in step over its Unix socket
//!   (full snapshot when the dataplane's state is unknown, deltas otherwise).
//! - [`run`]: the loop tying them together.
//! - [`synthetic`]: generated clusters (namespaces, pods, policies) for benchmarks.
//!
//! Nothing here panics on bad input: refused input is logged with a reason and counted in
//! [`skips::Skips`].

pub mod compile;
pub mod dump;
pub mod ids;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod run;
pub mod skips;
pub mod source;
pub mod store;
pub mod synthetic;
