//! kxdp dataplane: the packet pipeline of a userspace Kubernetes node dataplane.
//!
//! The heart of the crate is [`pipeline::process_batch`], a pure function over a batch of
//! frames: it owns no I/O, so the AF_XDP workers, unit tests, fixtures, fuzzing and benchmarks
//! all drive the same code. Around it:
//!
//! - [`wire`]: zero-copy header parsing and RFC 1624 incremental checksums;
//! - [`tables`]: the immutable, generation-numbered lookup tables (frontends, service ports
//!   with their backends and schedulers, next hops), swapped atomically and read once per batch;
//! - [`balance`]: the IPVS scheduler set, random and Maglev;
//! - [`conntrack`]: the per-worker, fixed-capacity connection table with NAT state;
//! - [`affinity`]: ClientIP session affinity shared by the workers;
//! - [`counters`]: per-worker counters, one per drop and pass reason.
//!
//! Nothing in the per-packet path allocates: every table is sized when a worker starts.

pub mod affinity;
pub mod balance;
pub mod capture;
pub mod conntrack;
pub mod counters;
pub mod frag;
pub mod histogram;
pub mod io;
pub mod maglev;
pub mod mem;
pub mod netlink;
pub mod pipeline;
pub mod policy;
pub mod sync;
pub mod tables;
pub mod traffic;
pub mod wire;

pub use counters::{Counters, DropReason, PassReason};
pub use pipeline::{process_batch, Frame, Verdict, WorkerState};
