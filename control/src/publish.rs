//! The control plane's side of table publication: keeps the dataplane in step over its Unix
//! socket (protocol in `dataplane::sync`).
//!
//! A dedicated thread owns the connection. It receives the compiler's [`Diff`]s, folds them
//! into the desired state (every service port by id) and a set of ids changed since the
//! dataplane last acknowledged, and sends:
//! - a full snapshot when the dataplane's hello does not name the (epoch, generation) this
//!   process last had acknowledged — a new dataplane process, a dataplane that applied
//!   something else, or a new control process (which has acknowledged nothing yet);
//! - otherwise a delta built from the changed ids (several diffs merge into one delta);
//! - after an error reply, a snapshot (the dataplane kept its tables; this resynchronises);
//! - the NetworkPolicy state, whole, whenever it changed and after every snapshot (which
//!   leaves the dataplane's policy as it was, so it is never stale for longer than that).
//!
//! Nothing is sent before the first diff arrives: the caller sends it only once its sources
//! have listed everything, so a restarting control plane never pushes a partial or empty
//! snapshot over a dataplane's good tables.
//!
//! Lost connections are retried with exponential backoff ([`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`]). While idle, the thread checks the socket for end-of-file every
//! [`IDLE_CHECK`], so a restarted dataplane gets its snapshot without waiting for the next
//! Kubernetes change.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dataplane::policy::PolicyUpdate;
use dataplane::sync::{
    read_frame, write_frame, FrontendEntry, IdMap, PortUpdate, ToControl, ToDataplane,
    PROTOCOL_VERSION,
};
use dataplane::tables::ServiceId;

use crate::compile::{CompiledPort, Diff};

/// First retry delay after a failed connection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle connection is checked for end-of-file.
pub const IDLE_CHECK: Duration = Duration::from_millis(200);
/// How long to wait for the hello or a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the publisher has done, for tests and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishStatus {
    /// Whether a connection is open.
    pub connected: bool,
    /// The (epoch, generation) the dataplane last acknowledged.
    pub acked: Option<(u64, u64)>,
    /// Connections made.
    pub connections: u64,
    /// Snapshots acknowledged.
    pub snapshots: u64,
    /// Deltas acknowledged.
    pub deltas: u64,
    /// Policy updates acknowledged.
    pub policies: u64,
    /// Error replies received.
    pub errors: u64,
}

/// Converts a compiled port to its wire form.
pub fn port_update(p: &CompiledPort) -> PortUpdate {
    PortUpdate {
        spec: p.port.spec().clone(),
        backends: p.port.backends().to_vec(),
        frontends: p
            .frontends
            .iter()
            .map(|(k, f)| FrontendEntry {
                ip: k.ip.into(),
                port: k.port,
                kind: f.kind,
                masquerade_remote: f.masquerade_remote,
            })
            .collect(),
    }
}

/// Desired state and what the dataplane has acknowledged.
#[derive(Debug, Default)]
struct State {
    ready: bool,
    generation: u64,
    current: BTreeMap<ServiceId, Arc<CompiledPort>>,
    /// The state as of the last acknowledgement.
    sent: BTreeMap<ServiceId, Arc<CompiledPort>>,
    dirty: BTreeSet<ServiceId>,
    acked: Option<(u64, u64)>,
    need_snapshot: bool,
    /// The NetworkPolicy state (empty until the compiler produces one).
    policy: Arc<PolicyUpdate>,
    /// Whether `policy` has to be sent (changed, or the dataplane got a snapshot).
    policy_dirty: bool,
}

impl State {
    fn fold(&mut self, d: Diff) {
        self.ready = true;
        self.generation = self.generation.max(d.generation);
        for id in d.removals {
            self.current.remove(&id);
            self.dirty.insert(id);
        }
        for p in d.upserts {
            self.dirty.insert(p.id());
            self.current.insert(p.id(), p);
        }
        if let Some(p) = d.policy {
            self.policy = p;
            self.policy_dirty = true;
        }
    }

    /// The next message to send, if any.
    fn next_message(&mut self) -> Option<ToDataplane> {
        if !self.ready {
            return None;
        }
        if self.need_snapshot {
            return Some(ToDataplane::Snapshot {
                generation: self.generation,
                ports: self.current.values().map(|p| port_update(p)).collect(),
            });
        }
        if self.policy_dirty {
            return Some(ToDataplane::Policy {
                base: self.acked.map_or(0, |(_, g)| g),
                generation: self.generation,
                policy: (*self.policy).clone(),
            });
        }
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for id in &self.dirty {
            match (self.current.get(id), self.sent.get(id)) {
                (Some(c), Some(s)) if Arc::ptr_eq(c, s) => {}
                (Some(c), _) => upserts.push(port_update(c)),
                (None, Some(_)) => removals.push(*id),
                (None, None) => {}
            }
        }
        if upserts.is_empty() && removals.is_empty() {
            self.dirty.clear();
            return None;
        }
        let base = self.acked.map_or(0, |(_, g)| g);
        Some(ToDataplane::Delta { base, generation: self.generation, upserts, removals })
    }

    fn acknowledged(&mut self, epoch: u64, generation: u64, kind: Sent) {
        self.acked = Some((epoch, generation));
        if kind == Sent::Policy {
            self.policy_dirty = false;
            return;
        }
        if kind == Sent::Snapshot {
            self.sent = self.current.clone();
            self.dirty.clear();
            // A snapshot leaves the dataplane's policy as it was: send ours after it.
            self.policy_dirty = true;
        } else {
            // Only the changed ids differ: O(change), not O(state).
            for id in std::mem::take(&mut self.dirty) {
                match self.current.get(&id) {
                    Some(p) => self.sent.insert(id, p.clone()),
                    None => self.sent.remove(&id),
                };
            }
        }
        self.need_snapshot = false;
    }
}

/// Handle to the publisher thread.
#[derive(Debug)]
pub struct Publisher {
    tx: Option<mpsc::Sender<Diff>>,
    status: Arc<Mutex<PublishStatus>>,
    hello: Arc<FirstHello>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Starts publishing to the dataplane socket at `socket`.
    pub fn spawn(socket: impl Into<PathBuf>) -> io::Result<Publisher> {
        let socket = socket.into();
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(PublishStatus::default()));
        let hello = Arc::new(FirstHello::default());
        let (st, h) = (status.clone(), hello.clone());
        let thread = std::thread::Builder::new()
            .name("kxdp-publish".into())
            .spawn(move || run(socket, rx, st, h))?;
        Ok(Publisher { tx: Some(tx), status, hello, thread: Some(thread) })
    }

    /// The ids named by the first dataplane hello this publisher received, waiting at most
    /// `wait` for it (`None`: no dataplane answered in time).
    pub fn first_hello(&self, wait: Duration) -> Option<IdMap> {
        let FirstHello(slot, cv) = &*self.hello;
        let guard = slot.lock().ok()?;
        let (guard, _) = cv.wait_timeout_while(guard, wait, |s| s.is_none()).ok()?;
        guard.clone()
    }

    /// Queues a diff (the first one marks the state complete and allows publication).
    pub fn send(&self, diff: Diff) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(diff);
        }
    }

    /// The live status, shared (for the metrics endpoint).
    pub fn status_handle(&self) -> Arc<Mutex<PublishStatus>> {
        self.status.clone()
    }

    /// A copy of the status.
    pub fn status(&self) -> PublishStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the thread (the dataplane keeps its tables).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ids of the first hello received, for [`Publisher::first_hello`].
#[derive(Debug, Default)]
struct FirstHello(Mutex<Option<IdMap>>, Condvar);

impl FirstHello {
    fn offer(&self, ids: IdMap) {
        if let Ok(mut s) = self.0.lock() {
            if s.is_none() {
                *s = Some(ids);
                self.1.notify_all();
            }
        }
    }
}

/// What kind of message was acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Snapshot,
    Delta,
    Policy,
}

enum Flow {
    /// The caller went away.
    Stop,
    /// The connection failed.
    Lost,
}

fn run(
    socket: PathBuf,
    rx: mpsc::Receiver<Diff>,
    status: Arc<Mutex<PublishStatus>>,
    hello: Arc<FirstHello>,
) {
    let mut st = State::default();
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => {
                if failing {
                    tracing::info!(socket = %socket.display(), "publish: connected to dataplane");
                }
                failing = false;
                backoff = BACKOFF_MIN;
                let flow = session(stream, &rx, &mut st, &status, &hello);
                set(&status, |s| s.connected = false);
                if let Flow::Stop = flow {
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(socket = %socket.display(), error = %e,
                        "publish: dataplane not reachable; retrying with backoff");
                }
                failing = true;
            }
        }
        // Wait out the backoff while still folding diffs in.
        let deadline = std::time::Instant::now() + backoff;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(d) => st.fold(d),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn set(status: &Mutex<PublishStatus>, f: impl FnOnce(&mut PublishStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

fn session(
    mut stream: UnixStream,
    rx: &mpsc::Receiver<Diff>,
    st: &mut State,
    status: &Mutex<PublishStatus>,
    hello: &FirstHello,
) -> Flow {
    if stream.set_read_timeout(Some(REPLY_TIMEOUT)).is_err() {
        return Flow::Lost;
    }
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let (epoch, generation) = match read_frame::<_, ToControl>(&mut stream) {
        Ok(ToControl::Hello { version, epoch, generation, ids }) if version == PROTOCOL_VERSION => {
            hello.offer(ids);
            (epoch, generation)
        }
        Ok(other) => {
            tracing::error!(reply = ?other, "publish: unexpected hello (protocol version?)");
            return Flow::Lost;
        }
        Err(e) => {
            tracing::warn!(error = %e, "publish: no hello from dataplane");
            return Flow::Lost;
        }
    };
    set(status, |s| {
        s.connected = true;
        s.connections += 1;
    });
    if st.acked != Some((epoch, generation)) {
        tracing::info!(epoch, generation, acked = ?st.acked,
            "publish: dataplane state unknown to us; full snapshot");
        st.need_snapshot = true;
    }
    loop {
        // Take every queued diff first, so a burst becomes one message.
        loop {
            match rx.try_recv() {
                Ok(d) => st.fold(d),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Flow::Stop,
            }
        }
        if let Some(msg) = st.next_message() {
            let (kind, sent_gen) = match &msg {
                ToDataplane::Snapshot { generation, .. } => (Sent::Snapshot, *generation),
                ToDataplane::Delta { generation, .. } => (Sent::Delta, *generation),
                ToDataplane::Policy { generation, .. } => (Sent::Policy, *generation),
            };
            let snapshot = kind == Sent::Snapshot;
            if let Err(e) = write_frame(&mut stream, &msg) {
                tracing::warn!(error = %e, "publish: send failed; reconnecting");
                return Flow::Lost;
            }
            match read_frame::<_, ToControl>(&mut stream) {
                Ok(ToControl::Ack { generation }) if generation == sent_gen => {
                    st.acknowledged(epoch, generation, kind);
                    set(status, |s| {
                        s.acked = Some((epoch, generation));
                        match kind {
                            Sent::Snapshot => s.snapshots += 1,
                            Sent::Delta => s.deltas += 1,
                            Sent::Policy => s.policies += 1,
                        }
                    });
                    tracing::debug!(generation, snapshot, "publish: acknowledged");
                }
                Ok(reply) => {
                    tracing::warn!(?reply, "publish: dataplane refused; resending a snapshot");
                    set(status, |s| s.errors += 1);
                    st.need_snapshot = true;
                    if snapshot {
                        // A refused snapshot will be refused again: back off via reconnect.
                        return Flow::Lost;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publish: no reply; reconnecting");
                    return Flow::Lost;
                }
            }
            continue;
        }
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(d) => st.fold(d),
            Err(RecvTimeoutError::Disconnected) => return Flow::Stop,
            Err(RecvTimeoutError::Timeout) => {
                if peer_closed(&stream) {
                    tracing::info!("publish: dataplane closed the connection; reconnecting");
                    return Flow::Lost;
                }
            }
        }
    }
}

/// Whether the peer has closed (or broken) the connection, without blocking.
fn peer_closed(stream: &UnixStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 1];
    let mut s: &UnixStream = stream;
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        // The dataplane never speaks unasked: unexpected bytes mean a broken session.
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    closed || stream.set_nonblocking(false).is_err()
}
