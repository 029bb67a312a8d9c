//! Network namespaces for hermetic network tests: everything the test creates (TAPs,
//! bridges, addresses) lives in a namespace that is deleted afterwards, so no traffic
//! leaves the machine. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn ip");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Creates namespace `wisp-TAG-PID` with `lo` up and IPv6 off (no router
    /// solicitations or MLD reports to disturb frame counts).
    pub fn new(tag: &str) -> NetNs {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "network tests create namespaces, TAPs and bridges: run the test suite as root"
        );
        let name = format!("wisp-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        for key in ["all", "default"] {
            run(Command::new("ip").args([
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]));
        }
        ns
    }

    /// Runs `ip -n NS ARGS`, failing the test if it fails.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into the namespace: sockets it opens and processes it
    /// spawns from now on live there. (Test threads are not reused across tests.)
    pub fn enter(&self) {
        enter(&self.name);
    }

    /// Gives the namespace a routable uplink: a veth pair with an address and a default
    /// route (user-mode networking needs a host interface with a default route; nothing
    /// answers on the other end, so no traffic leaves).
    pub fn uplink(&self) {
        self.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        self.ip(&["addr", "add", "192.0.2.2/24", "dev", "up0"]);
        self.ip(&["link", "set", "up0", "up"]);
        self.ip(&["link", "set", "up1", "up"]);
        self.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    }

    /// Creates TAP `name` (up, with a deep queue) in the namespace.
    pub fn tap(&self, name: &str) {
        self.ip(&["tuntap", "add", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "txqueuelen", "10000", "up"]);
    }
}

/// Moves the calling thread into network namespace `name` (see [`NetNs::enter`]),
/// which someone else owns.
pub fn enter(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Ethertype the probe's test frames use (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
const PACKET_OUTGOING: u8 = 4;

/// An AF_PACKET socket bound to one interface of the calling thread's namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens a raw packet socket on `ifname` with a large receive buffer.
    pub fn open(ifname: &str) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).expect("ifname");
        // SAFETY: cname is NUL-terminated and lives across the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
        let s = PacketSocket { fd, ifindex };
        s.set_int(libc::SO_RCVBUFFORCE, 8 << 20);
        s
    }

    fn set_int(&self, opt: i32, v: i32) {
        // SAFETY: setsockopt with a pointer to a live int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const i32).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "setsockopt {opt}: {}", io::Error::last_os_error());
    }

    /// Sends one Ethernet frame out of the interface (towards the TAP's reader).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and sll are valid for the lengths passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            r,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// Receives the next incoming frame (not one this host sent) with ethertype
    /// [`ETHERTYPE`], or None after `timeout` without one.
    pub fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv_frame(timeout, |f| u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE)
    }

    /// Receives the next incoming frame (not one this host sent) that `wanted`
    /// accepts, or None after `timeout` without one.
    pub fn recv_frame(&self, timeout: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let tv = libc::timeval {
                tv_sec: left.as_secs() as i64,
                tv_usec: i64::from(left.subsec_micros()).max(1),
            };
            // SAFETY: setsockopt with a pointer to a live timeval of the size passed.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            // SAFETY: sockaddr_ll is plain data; zero is a valid value to receive into.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and sll are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                panic!("recvfrom: {e}");
            }
            let frame = &buf[..n as usize];
            if sll.sll_pkttype == PACKET_OUTGOING || frame.len() < 14 {
                continue;
            }
            if wanted(frame) {
                return Some(frame.to_vec());
            }
        }
    }
}

/// A test frame of `len` bytes: `dst`, `src`, [`ETHERTYPE`], a u32 LE sequence
/// number, then filler: payload byte `i` (counted from the end of the Ethernet header)
/// is `(seq + i) as u8`. This is the probe's `net-send` format.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    while f.len() < len {
        let i = f.len() - 14;
        f.push(seq.wrapping_add(i as u32) as u8);
    }
    f
}

/// The sequence number of a `net-send` test frame.
pub fn seq_of(frame: &[u8]) -> u32 {
    u32::from_le_bytes([frame[14], frame[15], frame[16], frame[17]])
}

/// Receives `net-send` frames on `sock` until `seqs` holds `n` sequence numbers; a
/// minute without one fails the test with `context()`.
pub fn collect_seqs(
    sock: &PacketSocket,
    seqs: &mut Vec<u32>,
    n: usize,
    context: impl Fn() -> String,
) {
    while seqs.len() < n {
        let f = sock
            .recv_test_frame(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no frames: {}", context()));
        seqs.push(seq_of(&f));
    }
}

/// Takes in the `net-send` frames `sock` still holds (until 500 ms pass without one).
pub fn drain_seqs(sock: &PacketSocket, seqs: &mut Vec<u32>) {
    while let Some(f) = sock.recv_test_frame(Duration::from_millis(500)) {
        seqs.push(seq_of(&f));
    }
}

/// Asserts that `seqs` is 0, 1, 2, ...: no frame lost or repeated around a move
/// (snapshot, migration) after index `moved_at`.
pub fn assert_exactly_once(seqs: &[u32], moved_at: usize) {
    let expected: Vec<u32> = (0..seqs.len() as u32).collect();
    if seqs != expected {
        let bad = seqs
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "frames lost or repeated around index {bad} (moved at {moved_at}): {:?}",
            &seqs[bad.saturating_sub(3)..(bad + 5).min(seqs.len())]
        );
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).expect("hex MAC byte"))
        .collect();
    v.try_into().expect("6-byte MAC")
}
