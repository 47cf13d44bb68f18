//! NetworkPolicy, end to end on the control side: Kubernetes objects are compiled into a
//! `PolicyUpdate`, which is built into the dataplane's `PolicyTables`; `check` must then give
//! the answers written by hand below from the Kubernetes rules (not from the compiler's
//! output). Then incremental changes, each compared with a fresh full compile.

use std::net::Ipv4Addr;

use control::compile::{Compiler, NodeContext};
use control::policy::PolicyCompiler;
use control::store::{Event, Kind, ObjKey, Object, Store};
use dataplane::counters::DropReason;
use dataplane::policy::{PolicyTables, PolicyUpdate, NOT_ISOLATED};

fn obj(yaml: &str) -> Object {
    Object::from_yaml(serde_yaml::from_str(yaml).unwrap()).unwrap()
}

fn ns(name: &str, team: &str) -> Object {
    obj(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n"
    ))
}

/// A running pod; `ports` is a YAML list of container ports.
fn pod(ns: &str, name: &str, app: &str, ip: &str, node: &str, ports: &str) -> Object {
    obj(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: {ports}}}]}}\n\
         status: {{phase: Running, podIP: {ip}}}\n"
    ))
}

fn policy(ns: &str, name: &str, spec: &str) -> Object {
    obj(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    ))
}

const W: &str = "10.1.0.1"; // prod/web, node-1, port http=8080
const A: &str = "10.1.0.2"; // prod/api, node-1 (egress-isolated by P2)
const D: &str = "10.1.0.3"; // prod/db, node-2, port pg=5432
const A2: &str = "10.1.0.4"; // prod/api-2, node-2
const C: &str = "10.2.0.1"; // dev/client, node-1

fn p1() -> Object {
    // web: ingress from api pods on the named port http; from client pods of team=b
    // namespaces on TCP 8000-8100.
    policy(
        "prod",
        "p1",
        "  podSelector: {matchLabels: {app: web}}\n  ingress:\n\
         \x20 - from: [{podSelector: {matchLabels: {app: api}}}]\n    ports: [{port: http}]\n\
         \x20 - from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: client}}}]\n\
         \x20   ports: [{port: 8000, endPort: 8100}]\n",
    )
}

fn cluster() -> Vec<Event> {
    let http = "[{name: http, containerPort: 8080}]";
    let pg = "[{name: pg, containerPort: 5432}]";
    vec![
        Event::Apply(ns("prod", "a")),
        Event::Apply(ns("dev", "b")),
        Event::Apply(pod("prod", "web", "web", W, "node-1", http)),
        Event::Apply(pod("prod", "api", "api", A, "node-1", "[]")),
        Event::Apply(pod("prod", "db", "db", D, "node-2", pg)),
        Event::Apply(pod("prod", "api-2", "api", A2, "node-2", "[]")),
        Event::Apply(pod("dev", "client", "client", C, "node-1", "[]")),
        Event::Apply(p1()),
        // api: egress only to db pods on the named port pg, to 192.168.0.0/16 except
        // 192.168.1.0/24 on anything, and UDP 53 anywhere.
        Event::Apply(policy(
            "prod",
            "p2",
            "  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress:\n\
             \x20 - to: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: pg}]\n\
             \x20 - to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]\n\
             \x20 - ports: [{port: 53, protocol: UDP}]\n",
        )),
        // every dev pod: ingress UDP 53 from 10.1.0.0/24 except 10.1.0.3/32 (pods included).
        Event::Apply(policy(
            "dev",
            "p3",
            "  podSelector: {}\n  ingress:\n\
             \x20 - from: [{ipBlock: {cidr: 10.1.0.0/24, except: [10.1.0.3/32]}}]\n\
             \x20   ports: [{port: 53, protocol: UDP}]\n",
        )),
    ]
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().unwrap())
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const OK: Result<(), DropReason> = Ok(());
const IN: Result<(), DropReason> = Err(DropReason::PolicyIngress);
const OUT: Result<(), DropReason> = Err(DropReason::PolicyEgress);

/// (src, dst, protocol, port, expected), from the Kubernetes rules.
/// (source, destination, protocol, destination port, expected verdict).
type Case = (&'static str, &'static str, u8, u16, Result<(), DropReason>);

const TRUTH: &[Case] = &[
    // web's ingress (P1). api-2 is remote, so only web's ingress decides.
    (A2, W, TCP, 8080, OK),
    (A2, W, TCP, 8081, IN),
    (A2, W, UDP, 8080, IN),
    (A2, W, ICMP, 0, IN),
    (C, W, TCP, 8000, OK),
    (C, W, TCP, 8100, OK),
    (C, W, TCP, 8101, IN),
    (C, W, TCP, 7999, IN),
    (C, W, TCP, 8080, OK), // inside 8000-8100
    (C, W, TCP, 9000, IN),
    (D, W, TCP, 8050, IN),
    (D, W, TCP, 8080, IN),
    ("10.9.9.9", W, TCP, 8080, IN),
    // api's egress (P2) refuses web before web's ingress is looked at.
    (A, W, TCP, 8080, OUT),
    (A, D, TCP, 5432, OK),
    (A, D, TCP, 5433, OUT),
    (A, D, UDP, 5432, OUT),
    (A, "192.168.0.5", TCP, 22, OK),
    (A, "192.168.0.5", ICMP, 0, OK),
    (A, "192.168.1.5", TCP, 22, OUT),
    (A, "192.169.0.1", TCP, 22, OUT),
    (A, "8.8.8.8", UDP, 53, OK),
    (A, "8.8.8.8", TCP, 53, OUT),
    // client's ingress (P3): api (10.1.0.2) is in the block and its egress allows UDP 53.
    (A, C, UDP, 53, OK),
    (W, C, UDP, 53, OK),
    (W, C, TCP, 53, IN),
    (D, C, UDP, 53, IN),
    ("10.1.0.77", C, UDP, 53, OK),
    ("10.1.1.1", C, UDP, 53, IN),
    // Not isolated: web's egress, api's ingress, anything between remote pods.
    (W, A, TCP, 1234, OK),
    (C, A, ICMP, 0, OK),
    (D, A2, TCP, 80, OK),
    (W, "1.1.1.1", TCP, 443, OK),
];

fn tables(u: &PolicyUpdate) -> PolicyTables {
    PolicyTables::build(u.clone()).expect("the compiled update builds")
}

fn check_truth(t: &PolicyTables, truth: &[Case]) {
    for &(s, d, proto, port, want) in truth {
        assert_eq!(
            t.check(ip(s), ip(d), proto, port),
            want,
            "{s} -> {d} proto {proto} port {port}"
        );
    }
}

fn store() -> Store {
    let mut st = Store::new();
    st.apply_all(cluster());
    st
}

/// The incremental compiler's update equals a fresh full compile of the same store.
fn same_as_fresh(pc: &PolicyCompiler, st: &Store) {
    let mut fresh = PolicyCompiler::new("node-1");
    fresh.compile_all(st);
    assert_eq!(**pc.update(), **fresh.update(), "incremental != full");
}

#[test]
fn compiled_tables_answer_like_kubernetes() {
    let st = store();
    let mut pc = PolicyCompiler::new("node-1");
    let u = pc.compile_all(&st).expect("an update");
    let t = tables(&u);
    check_truth(&t, TRUTH);
    // api and api-2 share an identity (same namespace, labels, ports, block class).
    assert_eq!(t.identity(ip(A)), t.identity(ip(A2)));
    assert_ne!(t.identity(ip(A)), t.identity(ip(D)));
    assert!(t
        .endpoint(ip(D))
        .is_some_and(|e| e.ingress == NOT_ISOLATED && e.egress == NOT_ISOLATED));
    assert!(pc.skips().is_empty(), "{}", pc.skips());
    // Nothing changed: no new update.
    assert!(pc.compile_all(&st).is_none());
}

#[test]
fn a_new_pod_with_a_known_identity_costs_no_selector_evaluation() {
    let (mut st, mut pc) = compiled();
    let before = pc.evaluations();
    st.apply(Event::Apply(pod("prod", "api-3", "api", "10.1.0.5", "node-2", "[]")));
    let u = step(&mut pc, &mut st).expect("the new pod is an update");
    assert_eq!(pc.evaluations(), before, "known label key: no selector evaluated");
    let t = tables(&u);
    assert_eq!(t.check(ip("10.1.0.5"), ip(W), TCP, 8080), OK, "enforced as soon as it appears");
    assert_eq!(t.identity(ip("10.1.0.5")), t.identity(ip(A2)));
    check_truth(&t, TRUTH);
    same_as_fresh(&pc, &st);
    // A pod with new labels is evaluated at most once per policy (here: the two policies of
    // its namespace; p3 is in dev and p1's namespaceSelector peer does not match prod).
    st.apply(Event::Apply(pod("prod", "new", "new", "10.1.0.6", "node-2", "[]")));
    step(&mut pc, &mut st).expect("update");
    assert_eq!(pc.evaluations(), before + 2);
    same_as_fresh(&pc, &st);
}

/// The cluster, compiled in full, with the store's changes taken.
fn compiled() -> (Store, PolicyCompiler) {
    let mut st = store();
    let mut pc = PolicyCompiler::new("node-1");
    pc.compile_all(&st);
    st.take_changes();
    (st, pc)
}

/// One incremental pass over what changed in `st`.
fn step(pc: &mut PolicyCompiler, st: &mut Store) -> Option<std::sync::Arc<PolicyUpdate>> {
    let ch = st.take_changes();
    pc.compile(st, &ch)
}

#[test]
fn label_namespace_and_policy_changes_are_followed() {
    let (mut st, mut pc) = compiled();
    // api-2 becomes a db: no longer allowed to web on http.
    st.apply(Event::Apply(pod("prod", "api-2", "db", A2, "node-2", "[]")));
    let t = tables(&step(&mut pc, &mut st).expect("update"));
    assert_eq!(t.check(ip(A2), ip(W), TCP, 8080), IN);
    assert_ne!(t.identity(ip(A2)), t.identity(ip(A)));
    same_as_fresh(&pc, &st);
    // dev stops being team=b: client loses TCP 8000-8100 to web.
    st.apply(Event::Apply(ns("dev", "c")));
    let t = tables(&step(&mut pc, &mut st).expect("update"));
    assert_eq!(t.check(ip(C), ip(W), TCP, 8000), IN);
    same_as_fresh(&pc, &st);
    // ... and back.
    st.apply(Event::Apply(ns("dev", "b")));
    let t = tables(&step(&mut pc, &mut st).expect("update"));
    assert_eq!(t.check(ip(C), ip(W), TCP, 8000), OK);
    // P1 deleted: web is no longer isolated for ingress.
    st.apply(Event::Delete(Kind::NetworkPolicy, ObjKey::new("prod", "p1")));
    let t = tables(&step(&mut pc, &mut st).expect("update"));
    assert_eq!(t.endpoint(ip(W)).map(|e| e.ingress), Some(NOT_ISOLATED));
    assert_eq!(t.check(ip(D), ip(W), TCP, 1), OK);
    same_as_fresh(&pc, &st);
    // Re-created: isolated again.
    st.apply(Event::Apply(p1()));
    let t = tables(&step(&mut pc, &mut st).expect("update"));
    assert_eq!(t.check(ip(D), ip(W), TCP, 1), IN);
    same_as_fresh(&pc, &st);
    // A pod going away takes its address out.
    st.apply(Event::Delete(Kind::Pod, ObjKey::new("dev", "client")));
    let u = step(&mut pc, &mut st).expect("update");
    assert!(u.endpoints.iter().all(|(a, _)| *a != C.parse::<Ipv4Addr>().unwrap()));
    same_as_fresh(&pc, &st);
}

#[test]
fn the_service_compiler_publishes_policy_only_when_it_changes() {
    let mut st = store();
    let mut c = Compiler::new(NodeContext { name: "node-1".into(), ..NodeContext::default() });
    let d = c.compile_all(&st);
    assert!(d.policy.is_some() && d.generation == 1);
    st.take_changes();
    // A label nobody selects on, on a pod whose identity it changes: a new update.
    st.apply(Event::Apply(pod("prod", "db", "db", D, "node-2", "[]")));
    let d = {
        let ch = st.take_changes();
        c.compile(&st, &ch)
    };
    assert!(d.policy.is_some() && d.generation == 2);
    // Re-applying the same object: no change at all.
    st.apply(Event::Apply(pod("prod", "db", "db", D, "node-2", "[]")));
    let d = {
        let ch = st.take_changes();
        c.compile(&st, &ch)
    };
    assert!(d.is_empty() && d.generation == 2);
    // A policy change that changes nothing compiled (an extra equal rule) publishes nothing.
    st.apply(Event::Apply(policy(
        "dev",
        "p3",
        "  podSelector: {}\n  ingress:\n\
         \x20 - from: [{ipBlock: {cidr: 10.1.0.0/24, except: [10.1.0.3/32]}}]\n\
         \x20   ports: [{port: 53, protocol: UDP}, {port: 53, protocol: UDP}]\n",
    )));
    let d = {
        let ch = st.take_changes();
        c.compile(&st, &ch)
    };
    assert!(d.policy.is_none() && d.generation == 2);
}

/// A deterministic pseudo-random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A random policy over the small vocabulary of `random_changes_match_a_full_compile`:
/// every peer kind, ports numeric, named or absent, and egress with named ports to anyone.
fn random_policy(r: &mut Rng, name: &str) -> Object {
    let app = |r: &mut Rng| format!("a{}", r.below(5));
    let peer = match r.below(5) {
        0 => format!("{{podSelector: {{matchLabels: {{app: {}}}}}}}", app(r)),
        1 => format!("{{namespaceSelector: {{matchLabels: {{team: t{}}}}}}}", r.below(3)),
        2 => format!(
            "{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchLabels: {{app: {}}}}}}}",
            r.below(3),
            app(r)
        ),
        3 => format!("{{ipBlock: {{cidr: 10.9.0.0/{}, except: [10.9.0.{}/30]}}}}", 26 + r.below(3), 4 * r.below(8)),
        _ => "{podSelector: {}}".to_string(),
    };
    let ports = match r.below(4) {
        0 => "",
        1 => "\n    ports: [{port: 8080}]",
        2 => "\n    ports: [{port: http}]",
        _ => "\n    ports: [{port: 9000, endPort: 9100, protocol: UDP}]",
    };
    let egress = match r.below(3) {
        0 => "".to_string(),
        1 => "  egress:\n  - ports: [{port: http}]\n".to_string(),
        _ => format!("  egress:\n  - to: [{peer}]\n    ports: [{{port: 5432}}]\n"),
    };
    let ns = format!("ns{}", r.below(3));
    policy(
        &ns,
        name,
        &format!(
            "  podSelector: {{matchLabels: {{app: {}}}}}\n  ingress:\n  - from: [{peer}]{ports}\n{egress}",
            app(r)
        ),
    )
}

#[test]
fn random_changes_match_a_full_compile() {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut st = Store::new();
    let mut pc = PolicyCompiler::new("node-1");
    let ports =
        ["[]", "[{name: http, containerPort: 8080}]", "[{name: http, containerPort: 8081}]"];
    let mut pods: Vec<ObjKey> = Vec::new();
    let mut policies: Vec<ObjKey> = Vec::new();
    let mut kinds = [0usize; 8];
    for step in 0..400 {
        let op = if step < 30 { step % 3 } else { r.below(8) };
        kinds[op] += 1;
        match op {
            // A pod added or changed: labels, node, ports, address (a small pool, so
            // addresses are shared and the ipBlocks cut through the pods).
            0 | 1 => {
                let name = format!("p{}", r.below(40));
                let ns = format!("ns{}", r.below(3));
                let ip = format!("10.9.0.{}", 1 + r.below(60));
                let node = format!("node-{}", r.below(2));
                let app = format!("a{}", r.below(5));
                st.apply(Event::Apply(pod(&ns, &name, &app, &ip, &node, ports[r.below(3)])));
                pods.push(ObjKey::new(ns.as_str(), name.as_str()));
            }
            2 => {
                let name = format!("np{}", r.below(12));
                let p = random_policy(&mut r, &name);
                policies.push(p.key().expect("named"));
                st.apply(Event::Apply(p));
            }
            3 if !pods.is_empty() => {
                let k = pods.swap_remove(r.below(pods.len()));
                st.apply(Event::Delete(Kind::Pod, k));
            }
            4 if !policies.is_empty() => {
                let k = policies.swap_remove(r.below(policies.len()));
                st.apply(Event::Delete(Kind::NetworkPolicy, k));
            }
            5 => st
                .apply(Event::Apply(ns(&format!("ns{}", r.below(3)), &format!("t{}", r.below(3))))),
            6 => {
                // Two changes in one pass.
                let name = format!("p{}", r.below(40));
                let ns = format!("ns{}", r.below(3));
                let ip = format!("10.9.0.{}", 1 + r.below(60));
                st.apply(Event::Apply(pod(&ns, &name, "a0", &ip, "node-1", ports[1])));
                pods.push(ObjKey::new(ns.as_str(), name.as_str()));
                let name = format!("np{}", r.below(12));
                let p = random_policy(&mut r, &name);
                policies.push(p.key().expect("named"));
                st.apply(Event::Apply(p));
            }
            _ => {}
        }
        let ch = st.take_changes();
        pc.compile(&st, &ch);
        let mut fresh = PolicyCompiler::new("node-1");
        fresh.compile_all(&st);
        assert_eq!(**pc.update(), **fresh.update(), "step {step} (op {op}): incremental != full");
        assert_eq!(pc.view(), fresh.view(), "step {step}");
    }
    let isolated = pc.update().endpoints.iter().filter(|(_, e)| e.ingress != NOT_ISOLATED).count();
    assert!(isolated > 0 && !pc.update().sets.is_empty(), "the sequence exercised enforcement");
    assert!(kinds.iter().take(7).all(|k| *k > 10), "every kind of change ran: {kinds:?}");
}
