//! Host TAP devices: open an existing one, or create one and attach it to a bridge.
//!
//! The TAP is opened with IFF_VNET_HDR and a 12-byte header (`virtio_net_hdr_v1`), so
//! frames cross between the guest and the host kernel with their offload metadata
//! unchanged. A TAP wisp creates is not persistent: the kernel deletes it when the
//! descriptor closes, whatever way wisp exits.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const TUN_PATH: &str = "/dev/net/tun";
const IFNAMSIZ: usize = 16;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a short

/// TUNSETOFFLOAD: the reader (the guest) accepts partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: the reader accepts TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: the reader accepts TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;

/// Size of the virtio-net header in front of every frame on the TAP.
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening or creating a TAP.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is too long or has a NUL byte.
    #[error("bad interface name {0:?}: at most 15 bytes")]
    BadName(String),
    /// /dev/net/tun is missing or not accessible.
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded? `modprobe tun` as root)")]
    OpenTun(io::Error),
    /// --net tap=NAME for an interface that does not exist.
    #[error("TAP {0} does not exist; create it with `sudo ip tuntap add {0} mode tap user $USER && sudo ip link set {0} up`")]
    NoSuchTap(String),
    /// --net tap=NAME for an interface that is not a TAP.
    #[error("{0} is not a TAP device (it is not a tun/tap interface, or it is a TUN)")]
    NotTap(String),
    /// Attaching to a TAP owned by someone else.
    #[error("no permission to use TAP {0}; create it for your user with `sudo ip tuntap add {0} mode tap user $USER`, or run wisp as root")]
    TapPermission(String),
    /// Another process has the TAP open.
    #[error("TAP {0} is already in use by another process")]
    TapBusy(String),
    /// Bridge mode without CAP_NET_ADMIN.
    #[error("--net bridge={0} creates a TAP and needs CAP_NET_ADMIN: run wisp as root, or use --net tap=NAME with a TAP created for your user")]
    NeedNetAdmin(String),
    /// Bridge mode with an interface that is not a bridge.
    #[error("--net bridge={0}: {0} is not a bridge; give a bridge (create one with `sudo scripts/net-bridge-up.sh BRIDGE`), or use --net tap=NAME for a TAP")]
    NotBridge(String),
    /// Bridge mode with a bridge that does not exist.
    #[error("bridge {0} does not exist; create it with `sudo scripts/net-bridge-up.sh {0}`")]
    NoSuchBridge(String),
    /// Any other ioctl failure.
    #[error("{what} on {name}: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The interface.
        name: String,
        /// Cause.
        source: io::Error,
    },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    // ifr_flags (short) or ifr_ifindex (int), padded to the size of the kernel's union.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(name.to_string()));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Runs `ioctl(fd, req, ifr)`.
fn ifreq_ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq`-sized buffer for the whole call;
    // every request used here reads or writes at most that struct.
    let r = unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn int_ioctl(fd: RawFd, req: libc::c_ulong, v: libc::c_int) -> io::Result<()> {
    let mut v = v;
    // SAFETY: the request reads one int from the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The index of interface `name` in this network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    (index != 0).then_some(index)
}

/// An open TAP queue (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    fn open_tun() -> Result<File, TapError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)
    }

    fn setup(file: File, name: String) -> Result<Self, TapError> {
        let fd = file.as_raw_fd();
        int_ioctl(fd, TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int).map_err(|source| {
            TapError::Ioctl {
                what: "TUNSETVNETHDRSZ",
                name: name.clone(),
                source,
            }
        })?;
        let tap = Tap { file, name };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Fails as [`Tap::open`] would if interface `name` does not exist (opens nothing).
    pub fn check_exists(name: &str) -> Result<(), TapError> {
        IfReq::new(name)?;
        // Ask the kernel, not sysfs: sysfs shows the namespace it was mounted in, which
        // need not be ours.
        match ifindex(name) {
            Some(_) => Ok(()),
            None => Err(TapError::NoSuchTap(name.to_string())),
        }
    }

    /// Fails as [`Tap::create_on_bridge`] would if `bridge` does not exist.
    pub fn check_bridge(bridge: &str) -> Result<(), TapError> {
        IfReq::new(bridge)?;
        match ifindex(bridge) {
            Some(_) => Ok(()),
            None => Err(TapError::NoSuchBridge(bridge.to_string())),
        }
    }

    /// Opens the existing TAP `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut ifr = IfReq::new(name)?;
        Self::check_exists(name)?;
        let file = Self::open_tun()?;
        ifr.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ifreq_ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => TapError::TapPermission(name.to_string()),
            Some(libc::EBUSY) => TapError::TapBusy(name.to_string()),
            Some(libc::EINVAL) => TapError::NotTap(name.to_string()),
            _ => TapError::Ioctl {
                what: "TUNSETIFF",
                name: name.to_string(),
                source: e,
            },
        })?;
        Self::setup(file, name.to_string())
    }

    /// Creates a new TAP (named from `template`, e.g. `wisp%d`), brings it up and
    /// attaches it to `bridge`. It disappears when wisp closes it.
    pub fn create_on_bridge(template: &str, bridge: &str) -> Result<Self, TapError> {
        Self::check_bridge(bridge)?;
        let mut ifr = IfReq::new(template)?;
        let file = Self::open_tun()?;
        ifr.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL);
        ifreq_ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => TapError::NeedNetAdmin(bridge.to_string()),
            _ => TapError::Ioctl {
                what: "TUNSETIFF",
                name: template.to_string(),
                source: e,
            },
        })?;
        let mut got = IfReq::new("x")?;
        ifreq_ioctl(file.as_raw_fd(), TUNGETIFF, &mut got).map_err(|source| TapError::Ioctl {
            what: "TUNGETIFF",
            name: template.to_string(),
            source,
        })?;
        let name = got.name();
        let tap = Self::setup(file, name.clone())?;
        let sock = control_socket().map_err(|source| TapError::Ioctl {
            what: "socket",
            name: name.clone(),
            source,
        })?;
        let ioctl_err = |what: &'static str, n: &str| {
            let n = n.to_string();
            move |source| TapError::Ioctl {
                what,
                name: n,
                source,
            }
        };
        let mut flags = IfReq::new(&name)?;
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut flags)
            .map_err(ioctl_err("SIOCGIFFLAGS", &name))?;
        flags.set_short(flags.short() | libc::IFF_UP as libc::c_short);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut flags)
            .map_err(ioctl_err("SIOCSIFFLAGS", &name))?;
        let cname =
            std::ffi::CString::new(name.clone()).map_err(|_| TapError::BadName(name.clone()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(ioctl_err("if_nametoindex", &name)(
                io::Error::last_os_error(),
            ));
        }
        let mut br = IfReq::new(bridge)?;
        br.set_int(index as libc::c_int);
        ifreq_ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut br).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EPERM) => TapError::NeedNetAdmin(bridge.to_string()),
                // The bridge ioctls answer this for any interface that is not a bridge.
                Some(libc::EOPNOTSUPP) => TapError::NotBridge(bridge.to_string()),
                _ => ioctl_err("SIOCBRADDIF", bridge)(e),
            }
        })?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader accepts (`TUN_F_*`).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags by value, not by pointer.
        // SAFETY: no pointer is passed; the kernel only reads the integer argument.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETOFFLOAD",
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header); `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(IfReq::new("").is_err());
        assert!(IfReq::new("0123456789abcdef").is_err());
        assert!(IfReq::new("a\0b").is_err());
        assert_eq!(IfReq::new("tap0").unwrap().name(), "tap0");
    }

    #[test]
    fn missing_tap_is_named_with_the_fix() {
        let e = Tap::open("nosuchtap9").unwrap_err();
        assert!(matches!(e, TapError::NoSuchTap(_)));
        assert!(e.to_string().contains("ip tuntap add nosuchtap9"));
    }

    #[test]
    fn missing_bridge_is_named_with_the_fix() {
        let e = Tap::create_on_bridge("wisp%d", "nosuchbr9").unwrap_err();
        assert!(matches!(e, TapError::NoSuchBridge(_)));
    }
}
