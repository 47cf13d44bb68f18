//! Attaching, replacing and detaching on real interfaces, and one packet's
//! trip from a veth peer into an AF_XDP socket. Each test makes its own
//! network namespace (deleted on drop) with a veth pair inside, and sends
//! only inside it. Needs root; skips otherwise.

mod common;

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{arp_request, ifindex, udp4, Netns, PacketSender, Xsk};
use libbpf_rs::libbpf_sys;
use libbpf_rs::{Xdp, XdpFlags};
use xdp_redirect::{attached_prog_id, detach, AttachMode, Counters, Direction, Error, XdpRedirect};

/// A namespace with veth pair `xr0` (where the program goes) / `xr1`.
fn veth_ns() -> Netns {
    let ns = Netns::new();
    ns.add_veth("xr0", "xr1");
    ns
}

/// Loads a two-instruction XDP program (`return XDP_PASS`) named `name`,
/// standing in for someone else's program.
fn foreign_prog(name: &str) -> OwnedFd {
    let mut insns = [libbpf_sys::bpf_insn::default(); 2];
    insns[0].code = (libbpf_sys::BPF_ALU64 | libbpf_sys::BPF_MOV | libbpf_sys::BPF_K) as u8;
    insns[0].imm = libbpf_sys::XDP_PASS as i32; // r0 = XDP_PASS
    insns[1].code = (libbpf_sys::BPF_JMP | libbpf_sys::BPF_EXIT) as u8;
    let name = CString::new(name).unwrap();
    let license = CString::new("GPL").unwrap();
    // SAFETY: valid NUL-terminated strings and an instruction array of the
    // length given; null opts means defaults.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            libbpf_sys::BPF_PROG_TYPE_XDP,
            name.as_ptr(),
            license.as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            std::ptr::null_mut(),
        )
    };
    assert!(fd >= 0, "bpf_prog_load: {}", std::io::Error::from_raw_os_error(-fd));
    // SAFETY: a fresh program fd that we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Polls the counters until `done` holds (the veth delivers
/// asynchronously); panics with the last values after 5 s.
fn wait_for_counters(x: &XdpRedirect, done: impl Fn(&Counters) -> bool) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = x.counters().unwrap();
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "counters never got there: {c:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn prog_id_of(fd: &OwnedFd) -> u32 {
    libbpf_rs::Program::id_from_fd(fd.as_fd()).unwrap()
}

#[test]
fn attach_detach_and_replace_stale() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        assert_eq!(attached_prog_id(idx).unwrap(), None);

        let first = XdpRedirect::load().unwrap();
        let att = first.attach(idx, AttachMode::Native).unwrap();
        assert_eq!(att.mode(), AttachMode::Native);
        assert_eq!(att.ifname(), "xr0");
        assert_eq!(att.prog_id(), first.prog_id().unwrap());
        assert_eq!(attached_prog_id(idx).unwrap(), Some(first.prog_id().unwrap()));

        // Attaching the same instance twice is refused, not silently shared.
        let err = first.attach(idx, AttachMode::Native).unwrap_err();
        assert!(matches!(err, Error::AlreadyAttached { .. }), "{err}");

        // Simulate a crash: the program stays attached, nobody detaches it.
        std::mem::forget(att);
        drop(first);

        let second = XdpRedirect::load().unwrap();
        let id2 = second.prog_id().unwrap();
        let att2 = second.attach(idx, AttachMode::Native).unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), Some(id2), "stale program replaced");

        drop(att2);
        assert_eq!(attached_prog_id(idx).unwrap(), None, "detached on drop");
    });
}

#[test]
fn stale_program_in_the_other_mode_is_replaced() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        let stale = XdpRedirect::load().unwrap();
        std::mem::forget(stale.attach(idx, AttachMode::Generic).unwrap());

        let fresh = XdpRedirect::load().unwrap();
        let att = fresh.attach(idx, AttachMode::Native).unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), Some(fresh.prog_id().unwrap()));
        att.detach().unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), None);
    });
}

#[test]
fn generic_mode_attach_and_explicit_detach() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        let x = XdpRedirect::load().unwrap();
        let att = x.attach(idx, AttachMode::Generic).unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), Some(x.prog_id().unwrap()));
        att.detach().unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), None);
    });
}

#[test]
fn foreign_program_is_left_alone() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        let foreign = foreign_prog("not_kxdp");
        let foreign_id = prog_id_of(&foreign);
        Xdp::new(foreign.as_fd()).attach(idx as i32, XdpFlags::DRV_MODE).unwrap();

        let x = XdpRedirect::load().unwrap();
        let err = x.attach(idx, AttachMode::Native).unwrap_err();
        match &err {
            Error::ForeignProgram { prog_id, prog_name, mode, ifname, .. } => {
                assert_eq!(*prog_id, foreign_id);
                assert_eq!(prog_name, "not_kxdp");
                assert_eq!(*mode, "native");
                assert_eq!(ifname, "xr0");
            }
            other => panic!("want ForeignProgram, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("not_kxdp") && msg.contains("xr0"), "{msg}");
        // Also in the other mode: still refused, still in place.
        assert!(matches!(x.attach(idx, AttachMode::Generic), Err(Error::ForeignProgram { .. })));
        assert_eq!(attached_prog_id(idx).unwrap(), Some(foreign_id));

        // The tools' detach takes anything off.
        detach(idx).unwrap();
        assert_eq!(attached_prog_id(idx).unwrap(), None);
        detach(idx).unwrap(); // nothing there: fine
    });
}

#[test]
fn dropping_a_handle_leaves_a_program_that_replaced_ours() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        let x = XdpRedirect::load().unwrap();
        let att = x.attach(idx, AttachMode::Native).unwrap();

        // Someone takes the interface over.
        detach(idx).unwrap();
        let foreign = foreign_prog("other_xdp");
        Xdp::new(foreign.as_fd()).attach(idx as i32, XdpFlags::DRV_MODE).unwrap();

        att.detach().unwrap();
        assert_eq!(
            attached_prog_id(idx).unwrap(),
            Some(prog_id_of(&foreign)),
            "our detach must not remove another program"
        );
        detach(idx).unwrap();
    });
}

#[test]
fn handle_dropped_in_another_namespace_detaches_in_its_own() {
    require_root!();
    let ns = veth_ns();
    let (att, idx) = ns.run(|| {
        let idx = ifindex("xr0");
        let x = XdpRedirect::load().unwrap();
        (x.attach(idx, AttachMode::Native).unwrap(), idx)
    });
    // This thread is in the test's original namespace, where `idx` may be
    // another interface or none.
    drop(att);
    ns.run(|| assert_eq!(attached_prog_id(idx).unwrap(), None));
}

#[test]
fn unknown_interface_is_a_clear_error() {
    require_root!();
    let ns = Netns::new();
    ns.run(|| {
        let x = XdpRedirect::load().unwrap();
        let err = x.attach(4242, AttachMode::Native).unwrap_err();
        assert!(matches!(err, Error::NoSuchInterface { ifindex: 4242 }), "{err}");
        assert!(matches!(attached_prog_id(4242), Err(Error::NoSuchInterface { ifindex: 4242 })));
        assert!(matches!(detach(4242), Err(Error::NoSuchInterface { .. })));
    });
}

#[test]
fn packets_from_the_wire_reach_the_socket_or_the_kernel() {
    require_root!();
    let ns = veth_ns();
    ns.run(|| {
        let idx = ifindex("xr0");
        let peer = ifindex("xr1");
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let client = Ipv4Addr::new(198, 51, 100, 7);

        let x = XdpRedirect::load().unwrap();
        x.add_prefix(Direction::Dst, Ipv4Addr::new(10, 96, 0, 0), 12).unwrap();
        let _att = x.attach(idx, AttachMode::Native).unwrap();
        let mut xsk = Xsk::new();
        xsk.bind(idx, 0);
        x.set_socket(0, xsk.fd()).unwrap();
        let sender = PacketSender::new(peer);

        // Ours: arrives in the socket byte for byte.
        let frame = udp4(client, vip, b"to the dataplane");
        sender.send(&frame);
        let got = xsk.recv(Duration::from_secs(2)).expect("steered frame in the socket");
        assert_eq!(got, frame);
        assert_eq!(x.counters().unwrap().steered, 1);

        // Not ours: the kernel gets it, the socket does not.
        sender.send(&udp4(client, Ipv4Addr::new(198, 51, 100, 8), b"not ours"));
        sender.send(&arp_request(client, vip));
        let c = wait_for_counters(&x, |c| c.passed_not_ours == 1 && c.passed_non_ipv4 == 1);
        assert_eq!(xsk.recv(Duration::from_millis(200)), None);
        // Nothing else arrived: the veths have no IPv6 addresses to announce.
        assert_eq!(x.counters().unwrap(), Counters { steered: 1, ..c });
        assert_eq!(c.total(), 3, "{c:?}");

        // With the socket gone, ours falls back to the kernel.
        drop(xsk);
        sender.send(&frame);
        let c = wait_for_counters(&x, |c| c.passed_no_socket == 1);
        assert_eq!(c.steered, 1, "{c:?}");
    });
}
