//! Handing frames back to the kernel.
//!
//! A frame the XDP program redirected to an AF_XDP socket never reaches the kernel's stack, so
//! a `Pass` verdict cannot simply return it. The dataplane writes the IP datagram into a TUN
//! device instead: the kernel receives it as if it had arrived there and routes it (resolving
//! ARP for next hops the dataplane does not know yet, delivering node-local traffic, sending
//! ICMP time exceeded). The device is set up with loose reverse-path filtering, since punted
//! datagrams carry sources routed through other interfaces.
//!
//! Only IPv4 is punted (the XDP program steers nothing else); anything else is counted as not
//! puntable. One write(2) per frame: punting is the exception path, not the fast path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;

use crate::wire::{self, Parsed};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device datagrams are written into.
pub struct Punt {
    file: File,
    name: String,
}

/// Why the punt device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PuntError {
    /// Opening /dev/net/tun or creating the device failed.
    #[error("cannot create TUN device {name}: {source}")]
    Create {
        /// Device name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bringing the device up failed.
    #[error("cannot configure TUN device {name}: {detail}")]
    Configure {
        /// Device name.
        name: String,
        /// What failed.
        detail: String,
    },
}

impl Punt {
    /// Creates (or attaches to) TUN device `name`, brings it up and relaxes its reverse-path
    /// filter.
    pub fn open(name: &str) -> Result<Punt, PuntError> {
        let err = |source| PuntError::Create { name: name.into(), source };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        }
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err)?;
        let mut req =
            IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads an `ifreq` of the layout above from a valid pointer.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let cfg = |detail: String| PuntError::Configure { name: name.into(), detail };
        let st = std::process::Command::new("ip")
            .args(["link", "set", "dev", name, "up"])
            .status()
            .map_err(|e| cfg(format!("running ip: {e}")))?;
        if !st.success() {
            return Err(cfg(format!("ip link set {name} up: {st}")));
        }
        for (key, val) in [("rp_filter", "2"), ("accept_local", "1")] {
            let path = format!("/proc/sys/net/ipv4/conf/{name}/{key}");
            std::fs::write(&path, val).map_err(|e| cfg(format!("{path}: {e}")))?;
        }
        Ok(Punt { file, name: name.into() })
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes the IPv4 datagram in `frame` to the kernel. False when the frame holds no
    /// IPv4 datagram or the write failed.
    pub fn send(&self, frame: &[u8]) -> bool {
        let (l3, end) = match wire::parse(frame) {
            Parsed::Ipv4(o) => (o.l3, o.end),
            _ => return false,
        };
        (&self.file).write(&frame[l3..end]).is_ok()
    }
}
