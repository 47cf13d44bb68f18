//! Queue and IRQ planning against fake sysfs/procfs trees: discovery of ENA, mlx5, Intel,
//! virtio and veth interfaces, the plan over them, and `apply` writing
//! `proc/irq/N/smp_affinity_list` in the tree. `/proc/interrupts` samples are in `tests/plan/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use dataplane::io::plan::{
    apply, discover, discover_with, plan, ChannelSource, EthtoolChannels, FailureKind, IfaceInfo,
    IrqKind, IrqMatch, Plan, PlanError, Topology,
};

/// A fake root (`sys/`, `proc/`) in a fresh temporary directory, removed on drop.
struct Tree {
    root: PathBuf,
}

/// One device and its interface in a fake tree.
struct Nic<'a> {
    name: &'a str,
    ifindex: u32,
    driver: &'a str,
    /// PCI address.
    pci: &'a str,
    rx: u32,
    tx: u32,
    /// `numa_node` as sysfs writes it (-1: none).
    numa: i32,
    local_cpulist: Option<&'a str>,
    msi: Vec<u32>,
}

impl Tree {
    fn new(tag: &str) -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "kxdp-plan-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        Tree { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn file(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn link(&self, rel: &str, target_rel: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::create_dir_all(self.path(target_rel)).unwrap();
        std::os::unix::fs::symlink(self.path(target_rel), p).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    /// Online CPUs and NUMA nodes.
    fn cpus(&self, online: &str, nodes: &[(u32, &str)]) {
        self.file("sys/devices/system/cpu/online", &format!("{online}\n"));
        for (n, list) in nodes {
            self.file(&format!("sys/devices/system/node/node{n}/cpulist"), &format!("{list}\n"));
        }
    }

    /// An interface without a device (veth, bridge).
    fn virtual_iface(&self, name: &str, ifindex: u32, queues: u32) {
        let d = format!("sys/class/net/{name}");
        self.file(&format!("{d}/ifindex"), &format!("{ifindex}\n"));
        for q in 0..queues {
            fs::create_dir_all(self.path(&format!("{d}/queues/rx-{q}"))).unwrap();
            fs::create_dir_all(self.path(&format!("{d}/queues/tx-{q}"))).unwrap();
        }
    }

    /// A PCI device and its interface.
    fn nic(&self, n: &Nic<'_>) {
        let d = format!("sys/class/net/{}", n.name);
        let dev = format!("sys/devices/pci0000:00/{}", n.pci);
        self.file(&format!("{d}/ifindex"), &format!("{}\n", n.ifindex));
        for q in 0..n.rx {
            fs::create_dir_all(self.path(&format!("{d}/queues/rx-{q}"))).unwrap();
        }
        for q in 0..n.tx {
            fs::create_dir_all(self.path(&format!("{d}/queues/tx-{q}"))).unwrap();
        }
        self.file(&format!("{dev}/numa_node"), &format!("{}\n", n.numa));
        if let Some(l) = n.local_cpulist {
            self.file(&format!("{dev}/local_cpulist"), &format!("{l}\n"));
        }
        for irq in &n.msi {
            self.file(&format!("{dev}/msi_irqs/{irq}"), "msix\n");
        }
        self.link(&format!("{dev}/driver"), &format!("sys/bus/pci/drivers/{}", n.driver));
        self.link(&format!("{d}/device"), &dev);
    }

    /// `proc/interrupts` and a `proc/irq/N/smp_affinity_list` (all CPUs) for each IRQ in it.
    fn interrupts(&self, text: &str) {
        self.file("proc/interrupts", text);
        for line in text.lines().skip(1) {
            if let Some(Ok(irq)) = line.split_once(':').map(|(n, _)| n.trim().parse::<u32>()) {
                self.file(&format!("proc/irq/{irq}/smp_affinity_list"), "0-63\n");
            }
        }
    }

    fn affinity(&self, irq: u32) -> String {
        self.read(&format!("proc/irq/{irq}/smp_affinity_list")).trim().to_string()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn fixture(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plan").join(name)).unwrap()
}

fn spread(p: &Plan) -> usize {
    let l = p.load();
    l.iter().max().unwrap() - l.iter().min().unwrap()
}

/// Every planned IRQ's file holds its planned CPU.
fn assert_applied(t: &Tree, p: &Plan) {
    for i in &p.irqs {
        assert_eq!(t.affinity(i.irq), i.cpu.to_string(), "IRQ {}", i.irq);
    }
}

/// `/proc/interrupts` of ENA ENIs with the given queue counts, IRQs numbered from 24, one
/// management IRQ per ENI; names alternate between the two ENA forms.
fn ena_tree(t: &Tree, queues: &[u32]) -> Vec<String> {
    t.cpus("0-3", &[(0, "0-3")]);
    let mut text = String::from("           CPU0       CPU1       CPU2       CPU3\n");
    let mut irq = 24;
    let mut names = Vec::new();
    for (k, &q) in queues.iter().enumerate() {
        let name = format!("ens{}", 5 + k);
        let pci = format!("0000:00:{:02x}.0", 5 + k);
        let mut msi = vec![irq];
        text.push_str(&format!("{irq:>4}: 0 0 0 0 PCI-MSIX-{pci} 0-edge ena-mgmnt@pci:{pci}\n"));
        irq += 1;
        for n in 0..q {
            let label = if k % 2 == 0 {
                format!("{name}-Tx-Rx-{n}")
            } else {
                format!("ena-{name}-Tx-Rx-{n}")
            };
            text.push_str(&format!("{irq:>4}: 1 2 3 4 PCI-MSIX-{pci} {}-edge {label}\n", n + 1));
            msi.push(irq);
            irq += 1;
        }
        t.nic(&Nic {
            name: &name,
            ifindex: 2 + k as u32,
            driver: "ena",
            pci: &pci,
            rx: q,
            tx: q,
            numa: -1,
            local_cpulist: Some("0-3"),
            msi,
        });
        names.push(name);
    }
    t.interrupts(&text);
    names
}

#[test]
fn one_to_four_enis_with_uneven_queues_are_found_balanced_and_pinned() {
    let cases: &[&[u32]] = &[&[1], &[32], &[8, 4, 2], &[32, 17, 3, 1], &[4, 4], &[2, 7, 1, 5]];
    for &queues in cases {
        for workers in [&[1usize][..], &[1, 2, 3], &[0, 1, 2, 3]] {
            let t = Tree::new("ena");
            let names = ena_tree(&t, queues);
            let ifs = discover(&t.root, &names).unwrap();
            for (i, &q) in ifs.iter().zip(queues) {
                assert_eq!(i.driver.as_deref(), Some("ena"));
                assert_eq!((i.rx_queues, i.tx_queues, i.combined), (q, q, q));
                assert_eq!(i.queues, (0..q).collect::<Vec<_>>());
                assert_eq!(i.numa_node, None);
                assert_eq!(i.msi_irqs.len(), q as usize + 1);
                // Every queue has exactly its IRQ, matched by name; management left out.
                assert_eq!(i.irqs.len(), q as usize, "{}", i.name);
                for (n, qi) in i.irqs.iter().enumerate() {
                    assert_eq!(
                        (qi.queue, qi.kind, qi.matched),
                        (n as u32, IrqKind::TxRx, IrqMatch::Name)
                    );
                    assert_eq!(qi.irq, i.msi_irqs[n + 1]);
                }
            }
            let p = plan(&ifs, workers, None);
            assert_eq!(p.queues.len(), queues.iter().sum::<u32>() as usize);
            assert!(spread(&p) <= 1, "{queues:?} over {workers:?}:\n{p}");
            let r = apply(&p, &t.root).unwrap();
            assert!(r.is_complete(), "{r}");
            assert_eq!(r.written.len(), p.queues.len());
            assert_applied(&t, &p);
            // Management IRQs are untouched.
            for i in &ifs {
                assert_eq!(t.affinity(i.msi_irqs[0]), "0-63");
            }
        }
    }
}

#[test]
fn eight_four_two_over_three_cores_is_five_five_four() {
    let t = Tree::new("842");
    let names = ena_tree(&t, &[8, 4, 2]);
    let p = plan(&discover(&t.root, &names).unwrap(), &[1, 2, 3], None);
    let mut l = p.load();
    l.sort_unstable();
    assert_eq!(l, vec![4, 5, 5], "\n{p}");
}

#[test]
fn ena_fixture_both_name_forms() {
    let t = Tree::new("enafix");
    t.cpus("0-3", &[(0, "0-3")]);
    let nic = |name, ifindex, pci, msi: Vec<u32>, q| Nic {
        name,
        ifindex,
        driver: "ena",
        pci,
        rx: q,
        tx: q,
        numa: 0,
        local_cpulist: Some("0-3"),
        msi,
    };
    t.nic(&nic("ens5", 2, "0000:00:05.0", (24..=28).collect(), 4));
    t.nic(&nic("ens6", 3, "0000:00:06.0", (29..=31).collect(), 2));
    t.interrupts(&fixture("interrupts-ena.txt"));
    let ifs = discover(&t.root, &["ens5", "ens6"]).unwrap();
    let irqs = |i: &IfaceInfo| i.irqs.iter().map(|q| (q.queue, q.irq)).collect::<Vec<_>>();
    assert_eq!(irqs(&ifs[0]), vec![(0, 25), (1, 26), (2, 27), (3, 28)]);
    assert_eq!(irqs(&ifs[1]), vec![(0, 30), (1, 31)]);
    assert_eq!(ifs[1].irqs[0].name.as_deref(), Some("ena-ens6-Tx-Rx-0"));
    assert_eq!(ifs[0].numa_node, Some(0));
    assert_eq!(ifs[0].local_cpus, vec![0, 1, 2, 3]);

    let p = plan(&ifs, &[2, 3], None);
    assert_eq!(p.load(), vec![3, 3]);
    let r = apply(&p, &t.root).unwrap();
    assert!(r.is_complete(), "{r}");
    assert_applied(&t, &p);
    assert_eq!(t.affinity(24), "0-63");
    assert_eq!(t.affinity(29), "0-63");
    assert!(p.queues.iter().all(|q| q.local == Some(true)));
}

#[test]
fn mlx5_by_pci_address_and_numa_preference() {
    let t = Tree::new("mlx5");
    // Node 0: CPUs 0-3, node 1: CPUs 4-7; both ports on node 1.
    t.cpus("0-7", &[(0, "0-3"), (1, "4-7")]);
    let port = |name, ifindex, pci, msi: Vec<u32>, q| Nic {
        name,
        ifindex,
        driver: "mlx5_core",
        pci,
        rx: q,
        tx: q,
        numa: 1,
        local_cpulist: None, // from the node's cpulist
        msi,
    };
    t.nic(&port("enp59s0f0", 4, "0000:3b:00.0", (98..=102).collect(), 4));
    t.nic(&port("enp59s0f1", 5, "0000:3b:00.1", (103..=105).collect(), 2));
    t.interrupts(&fixture("interrupts-mlx5.txt"));
    let ifs = discover(&t.root, &["enp59s0f0", "enp59s0f1"]).unwrap();
    assert_eq!(ifs[0].driver.as_deref(), Some("mlx5_core"));
    assert_eq!(ifs[0].bus_id.as_deref(), Some("0000:3b:00.0"));
    assert_eq!(ifs[0].local_cpus, vec![4, 5, 6, 7]);
    let irqs = |i: &IfaceInfo| i.irqs.iter().map(|q| (q.queue, q.irq)).collect::<Vec<_>>();
    assert_eq!(irqs(&ifs[0]), vec![(0, 99), (1, 100), (2, 101), (3, 102)]);
    assert_eq!(irqs(&ifs[1]), vec![(0, 104), (1, 105)]);

    // Workers on both nodes: 6 queues over 6 cores, all fit on node 1's 4 cores only if they
    // take two each, which the bound forbids: 4 local, 2 remote.
    let p = plan(&ifs, &[2, 3, 4, 5, 6, 7], None);
    assert_eq!(p.load(), vec![1; 6]);
    assert_eq!(p.queues.iter().filter(|q| q.local == Some(true)).count(), 4, "\n{p}");
    // Over 4 cores, two per node: 6 queues, two cores may take 2: both local ones do.
    let p = plan(&ifs, &[0, 1, 4, 5], None);
    assert_eq!(p.load(), vec![1, 1, 2, 2], "\n{p}");
    assert_eq!(p.queues.iter().filter(|q| q.local == Some(true)).count(), 4);
    let r = apply(&p, &t.root).unwrap();
    assert!(r.is_complete(), "{r}");
    assert_applied(&t, &p);
    assert_eq!(t.affinity(98), "0-63"); // async EQ untouched
}

#[test]
fn intel_driver_prefix_and_split_rx_tx_vectors() {
    let t = Tree::new("intel");
    t.cpus("0-1", &[]);
    let nic = |name, ifindex, driver, pci, msi: Vec<u32>| Nic {
        name,
        ifindex,
        driver,
        pci,
        rx: 2,
        tx: 2,
        numa: -1,
        local_cpulist: Some("0-1"),
        msi,
    };
    t.nic(&nic("eth2", 6, "i40e", "0000:01:00.0", (40..=42).collect()));
    t.nic(&nic("eth3", 7, "igb", "0000:02:00.0", (50..=54).collect()));
    t.interrupts(&fixture("interrupts-intel.txt"));
    let ifs = discover(&t.root, &["eth2", "eth3"]).unwrap();
    let irqs = |i: &IfaceInfo| i.irqs.iter().map(|q| (q.queue, q.irq, q.kind)).collect::<Vec<_>>();
    assert_eq!(irqs(&ifs[0]), vec![(0, 41, IrqKind::TxRx), (1, 42, IrqKind::TxRx)]);
    assert_eq!(
        irqs(&ifs[1]),
        vec![
            (0, 50, IrqKind::Rx),
            (0, 52, IrqKind::Tx),
            (1, 51, IrqKind::Rx),
            (1, 53, IrqKind::Tx)
        ]
    );
    let p = plan(&ifs, &[0, 1], None);
    // Both vectors of a queue follow it.
    for q in p.queues.iter().filter(|q| q.iface == "eth3") {
        assert_eq!(q.irqs.len(), 2);
    }
    apply(&p, &t.root).unwrap();
    assert_applied(&t, &p);
    assert_eq!(t.affinity(40), "0-63"); // misc
    assert_eq!(t.affinity(54), "0-63"); // link
}

#[test]
fn virtio_attributes_come_from_the_pci_parent() {
    let t = Tree::new("virtio");
    t.cpus("0-1", &[(0, "0-1")]);
    let pci = "sys/devices/pci0000:00/0000:00:03.0";
    t.file(&format!("{pci}/numa_node"), "-1\n");
    t.file(&format!("{pci}/local_cpulist"), "0-1\n");
    for irq in 37..=41 {
        t.file(&format!("{pci}/msi_irqs/{irq}"), "msix\n");
    }
    t.link(&format!("{pci}/virtio2/driver"), "sys/bus/virtio/drivers/virtio_net");
    t.virtual_iface("eth0", 2, 2);
    t.link("sys/class/net/eth0/device", &format!("{pci}/virtio2"));
    t.interrupts(&fixture("interrupts-virtio.txt"));
    let ifs = discover(&t.root, &["eth0"]).unwrap();
    let i = &ifs[0];
    assert_eq!(i.driver.as_deref(), Some("virtio_net"));
    assert_eq!(i.bus_id.as_deref(), Some("virtio2"));
    assert_eq!(i.numa_node, None);
    assert!(i.local_cpus.is_empty());
    assert_eq!(i.msi_irqs, vec![37, 38, 39, 40, 41]);
    let irqs: Vec<_> = i.irqs.iter().map(|q| (q.queue, q.irq, q.kind)).collect();
    assert_eq!(
        irqs,
        vec![
            (0, 38, IrqKind::Rx),
            (0, 39, IrqKind::Tx),
            (1, 40, IrqKind::Rx),
            (1, 41, IrqKind::Tx)
        ]
    );
    let p = plan(&ifs, &[0, 1], None);
    assert!(p.queues.iter().all(|q| q.local.is_none()));
    apply(&p, &t.root).unwrap();
    assert_applied(&t, &p);
}

#[test]
fn veth_has_no_irqs_and_the_plan_still_works() {
    let t = Tree::new("veth");
    t.cpus("0-3", &[]);
    t.virtual_iface("veth0", 10, 1);
    t.virtual_iface("veth1", 11, 4);
    // No proc/interrupts, no proc/irq at all.
    let ifs = discover(&t.root, &["veth0", "veth1"]).unwrap();
    for i in &ifs {
        assert_eq!(i.driver, None);
        assert_eq!(i.bus_id, None);
        assert!(i.irqs.is_empty() && i.msi_irqs.is_empty());
    }
    let p = plan(&ifs, &[1, 2], Some(&[0]));
    assert_eq!(p.load(), vec![3, 2]);
    assert!(p.irqs.is_empty());
    assert!(p.to_string().contains("none"));
    assert!(p
        .notes
        .iter()
        .any(|n| n == "veth0: no queue IRQs found (virtual device): nothing to pin"));
    let r = apply(&p, &t.root).unwrap();
    assert!(r.is_complete() && r.written.is_empty());
}

#[test]
fn unknown_names_fall_back_to_msi_order() {
    let t = Tree::new("msi");
    t.cpus("0-3", &[]);
    t.nic(&Nic {
        name: "eth9",
        ifindex: 9,
        driver: "acme",
        pci: "0000:07:00.0",
        rx: 3,
        tx: 3,
        numa: -1,
        local_cpulist: None,
        msi: vec![60, 61, 62, 63],
    });
    t.interrupts(
        "           CPU0       CPU1\n\
         \x2060: 0 0 PCI-MSIX-0000:07:00.0 0-edge acme-ctrl@0000:07:00.0\n\
         \x2061: 0 0 PCI-MSIX-0000:07:00.0 1-edge acme-q@0000:07:00.0\n\
         \x2062: 0 0 PCI-MSIX-0000:07:00.0 2-edge acme-q@0000:07:00.0\n\
         \x2063: 0 0 PCI-MSIX-0000:07:00.0 3-edge acme-q@0000:07:00.0\n",
    );
    let ifs = discover(&t.root, &["eth9"]).unwrap();
    let irqs: Vec<_> = ifs[0].irqs.iter().map(|q| (q.queue, q.irq, q.matched)).collect();
    assert_eq!(
        irqs,
        vec![(0, 61, IrqMatch::MsiOrder), (1, 62, IrqMatch::MsiOrder), (2, 63, IrqMatch::MsiOrder)]
    );
    let p = plan(&ifs, &[1, 2, 3], None);
    assert!(p.notes.iter().any(|n| n.contains("eth9: IRQs matched to queues by MSI order")));
}

#[test]
fn housekeeping_takes_the_irqs_round_robin() {
    let t = Tree::new("hk");
    let names = ena_tree(&t, &[4, 2]);
    let ifs = discover(&t.root, &names).unwrap();
    let p = plan(&ifs, &[2, 3], Some(&[0, 1]));
    let cpus: Vec<usize> = p.irqs.iter().map(|i| i.cpu).collect();
    assert_eq!(cpus, vec![0, 1, 0, 1, 0, 1]);
    apply(&p, &t.root).unwrap();
    assert_applied(&t, &p);
    for i in &p.irqs {
        assert!(["0", "1"].contains(&t.affinity(i.irq).as_str()));
    }
    assert!(p.to_string().contains("IRQs: round-robin over housekeeping cores 0-1"));
}

#[test]
fn apply_reports_missing_and_unwritable_irqs_and_writes_the_rest() {
    let t = Tree::new("fail");
    let names = ena_tree(&t, &[4]);
    let ifs = discover(&t.root, &names).unwrap();
    let p = plan(&ifs, &[1, 2], None);
    // IRQ 25 went away; IRQ 26's file cannot be written (a directory where the file should be:
    // root may write anything, so permissions cannot fake this); IRQ 27's directory has no file.
    fs::remove_dir_all(t.path("proc/irq/25")).unwrap();
    fs::remove_file(t.path("proc/irq/26/smp_affinity_list")).unwrap();
    fs::create_dir(t.path("proc/irq/26/smp_affinity_list")).unwrap();
    fs::remove_file(t.path("proc/irq/27/smp_affinity_list")).unwrap();
    let r = apply(&p, &t.root).unwrap();
    assert!(!r.is_complete());
    assert_eq!(r.written.len(), 1);
    assert_eq!(r.written[0].irq, 28);
    assert_eq!(t.affinity(28), p.irqs.iter().find(|i| i.irq == 28).unwrap().cpu.to_string());
    let kinds: Vec<(u32, FailureKind)> = r.failed.iter().map(|f| (f.irq, f.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (25, FailureKind::Missing),
            (26, FailureKind::NotWritable),
            (27, FailureKind::Missing)
        ]
    );
    let m = &r.failed[0].message;
    assert!(m.starts_with("IRQ 25 (ens5 queue 0) to CPU ") && m.contains("does not exist"), "{m}");
    assert!(r.failed[1].message.contains("smp_affinity_list"), "{}", r.failed[1].message);
    // Never created.
    assert!(!t.path("proc/irq/27/smp_affinity_list").exists());
    let s = r.to_string();
    assert!(s.starts_with("1 IRQs pinned, 3 not\n"), "{s}");
}

#[test]
fn apply_without_proc_irq_is_an_error_only_with_irqs_to_pin() {
    let t = Tree::new("noproc");
    let names = ena_tree(&t, &[2]);
    let p = plan(&discover(&t.root, &names).unwrap(), &[0], None);
    fs::remove_dir_all(t.path("proc/irq")).unwrap();
    let e = apply(&p, &t.root).unwrap_err();
    assert!(matches!(e, PlanError::NoProcIrq(_)));
    assert!(e.to_string().ends_with("proc/irq does not exist: is procfs mounted?"), "{e}");
}

#[test]
fn a_missing_interface_is_an_error() {
    let t = Tree::new("missing");
    t.cpus("0", &[]);
    let e = discover(&t.root, &["nope0"]).unwrap_err();
    assert!(matches!(&e, PlanError::NoInterface(n, _) if n == "nope0"), "{e}");
}

#[test]
fn topology_reads_online_cpus_and_nodes() {
    let t = Tree::new("topo");
    t.cpus("0-3,6", &[(0, "0-3"), (1, "6-7")]);
    t.file("sys/devices/system/node/online", "0-1\n"); // not a node directory
    let topo = Topology::discover(&t.root).unwrap();
    assert_eq!(topo.online, vec![0, 1, 2, 3, 6]);
    assert_eq!(topo.nodes.get(&1), Some(&vec![6, 7]));
    assert_eq!(topo.node_of(6), Some(1));
    assert_eq!(topo.node_of(5), None);
    // Offline CPUs are not local.
    t.nic(&Nic {
        name: "eth0",
        ifindex: 2,
        driver: "ice",
        pci: "0000:81:00.0",
        rx: 1,
        tx: 1,
        numa: 1,
        local_cpulist: Some("4-7"),
        msi: vec![],
    });
    let ifs = discover(&t.root, &["eth0"]).unwrap();
    assert_eq!(ifs[0].local_cpus, vec![6]);
}

struct FakeEthtool;

impl ChannelSource for FakeEthtool {
    fn channels(&self, iface: &str) -> Option<EthtoolChannels> {
        (iface == "ens5").then_some(EthtoolChannels {
            max_combined: 8,
            combined: 2,
            max_other: 1,
            other: 1,
            ..EthtoolChannels::default()
        })
    }
}

#[test]
fn channel_counts_from_a_channel_source() {
    let t = Tree::new("ethtool");
    let names = ena_tree(&t, &[2, 1]);
    let ifs = discover_with(&t.root, &names, &FakeEthtool).unwrap();
    assert_eq!(ifs[0].ethtool.map(|c| c.max_combined), Some(8));
    assert_eq!(ifs[0].combined, 2);
    assert_eq!(ifs[1].ethtool, None);
    assert_eq!(ifs[1].combined, 1);
}

#[test]
fn plan_and_reports_round_trip_through_json() {
    let t = Tree::new("json");
    let names = ena_tree(&t, &[3, 2]);
    t.virtual_iface("veth0", 20, 1);
    let mut names: Vec<String> = names;
    names.push("veth0".into());
    let ifs = discover(&t.root, &names).unwrap();
    let p = plan(&ifs, &[1, 2], Some(&[0]));
    let s = serde_json::to_string_pretty(&p).unwrap();
    let back: Plan = serde_json::from_str(&s).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.to_string(), p.to_string());
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["irqs"][0]["matched"], "name");
    assert_eq!(v["irqs"][0]["kind"], "tx-rx");
    let back: Vec<IfaceInfo> = serde_json::from_str(&serde_json::to_string(&ifs).unwrap()).unwrap();
    assert_eq!(back, ifs);
    fs::remove_dir_all(t.path("proc/irq/25")).unwrap();
    let r = apply(&p, &t.root).unwrap();
    let back: dataplane::io::plan::ApplyReport =
        serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

#[test]
fn same_tree_same_plan() {
    let t = Tree::new("det");
    let names = ena_tree(&t, &[5, 3, 2, 7]);
    let a = plan(&discover(&t.root, &names).unwrap(), &[3, 1, 2], Some(&[0]));
    let mut rev = names.clone();
    rev.reverse();
    let b = plan(&discover(&t.root, &rev).unwrap(), &[3, 1, 2], Some(&[0]));
    assert_eq!(a, b);
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
}

/// The real machine: `lo` always exists and, being virtual, has no IRQs; the ethtool ioctl
/// answers without privileges and never panics.
#[test]
fn real_root_loopback() {
    let ifs = discover(Path::new("/"), &["lo"]).unwrap();
    assert_eq!(ifs[0].ifindex, 1);
    assert!(ifs[0].irqs.is_empty() && ifs[0].driver.is_none());
    let p = plan(&ifs, &[0], None);
    assert!(p.irqs.is_empty());
    let _ = dataplane::io::plan::Ethtool.channels("lo");
    assert_eq!(dataplane::io::plan::Ethtool.channels("no-such-if0"), None);
    assert_eq!(dataplane::io::plan::Ethtool.channels("a-name-far-too-long-for-linux"), None);
}
