//! The destination side: listen, take one migration, and hand the VM to the caller.
//!
//! `wisp receive` drives it in steps, so that it can check the offer as `wisp restore`
//! checks a snapshot and answer a refusal before it gives up:
//! [`Listener::accept`], [`Incoming::hello`], [`Incoming::check_offer`],
//! [`Incoming::accept`], [`Incoming::receive_memory`] (pages until the state), and,
//! once the VM's vCPUs run, [`Incoming::running`]. Any step can end in
//! [`Incoming::refuse`]. Every read waits for the source at most [`IDLE_TIMEOUT`] and
//! returns at once when a termination signal arrives.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use thiserror::Error;

use super::protocol::{self, CpuFeatures, Hello, Kind, PageDigest, ProtocolError};
use super::send::Conn;
use super::Address;
use crate::arch::layout::ram_ranges;
use crate::config::VmConfig;
use crate::memory::GuestMemory;
use crate::signals::SignalFd;
use crate::state::format::FORMAT_VERSION;
use crate::state::{InconsistentState, MachineState};

/// How long the source may stay silent mid-migration.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a migration could not be received.
#[derive(Debug, Error)]
pub enum ReceiveError {
    /// The address cannot be listened on.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        source: io::Error,
    },
    /// A unix socket path that is not a stale socket.
    #[error("{0} exists and is not a socket; choose another path")]
    PathTaken(PathBuf),
    /// A termination signal arrived.
    #[error("interrupted; no VM was started")]
    Interrupted,
    /// The stream broke, made no sense, or the source gave up.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The offer does not fit this host.
    #[error("{0}")]
    Offer(String),
    /// The final state contradicts itself or the offer.
    #[error("the source's state is refused: {0}")]
    State(String),
}

impl From<InconsistentState> for ReceiveError {
    fn from(e: InconsistentState) -> Self {
        ReceiveError::State(e.to_string())
    }
}

/// Waits until `fd` is readable; Interrupted if a signal arrives on `signals` first,
/// TimedOut after `timeout` (None: forever).
fn wait_readable(
    fd: RawFd,
    signals: &SignalFd,
    timeout: Option<Duration>,
) -> Result<(), ReceiveError> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ProtocolError::Io(e).into());
        }
        if fds[1].revents != 0 {
            return Err(ReceiveError::Interrupted);
        }
        if r == 0 {
            return Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the source sent nothing for {} s", IDLE_TIMEOUT.as_secs()),
            ))
            .into());
        }
        return Ok(());
    }
}

/// A listening socket for one incoming migration.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket, removed when dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `addr`. A unix socket path may replace only a stale socket.
    pub fn bind(addr: &Address) -> Result<Self, ReceiveError> {
        let listen_err = |source| ReceiveError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            Address::Tcp(hp) => TcpListener::bind(hp.as_str())
                .map(Listener::Tcp)
                .map_err(listen_err),
            Address::Unix(path) => {
                if let Ok(m) = path.symlink_metadata() {
                    let stale = m.file_type().is_socket()
                        && UnixStream::connect(path)
                            .is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED));
                    if !stale {
                        return Err(if m.file_type().is_socket() {
                            listen_err(io::ErrorKind::AddrInUse.into())
                        } else {
                            ReceiveError::PathTaken(path.clone())
                        });
                    }
                    std::fs::remove_file(path).map_err(listen_err)?;
                }
                UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(listen_err)
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// Waits for the source to connect (or for a termination signal).
    pub fn accept(&self, signals: &SignalFd) -> Result<Incoming, ReceiveError> {
        wait_readable(self.fd(), signals, None)?;
        let conn = match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        }
        .map_err(ProtocolError::Io)?;
        conn.set_timeouts(IDLE_TIMEOUT, IDLE_TIMEOUT)
            .map_err(ProtocolError::Io)?;
        Ok(Incoming {
            conn,
            digest: PageDigest::default(),
            pages: 0,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One incoming migration.
pub struct Incoming {
    conn: Conn,
    digest: PageDigest,
    pages: u64,
}

/// Reads from the connection, giving up on a signal or after [`IDLE_TIMEOUT`].
struct Patient<'a> {
    conn: &'a mut Conn,
    signals: &'a SignalFd,
    interrupted: bool,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = match &*self.conn {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        };
        match wait_readable(fd, self.signals, Some(IDLE_TIMEOUT)) {
            Ok(()) => self.conn.read(buf),
            Err(ReceiveError::Interrupted) => {
                self.interrupted = true;
                // Not ErrorKind::Interrupted: read_exact retries that, and the signal
                // still pending would bring it back here forever.
                Err(io::Error::other("interrupted by a termination signal"))
            }
            Err(ReceiveError::Protocol(ProtocolError::Io(e))) => Err(e),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

/// The CPU feature registers a guest's CPUID is compared on: leaf 1 ECX/EDX, leaf 7
/// subleaf 0 EBX/ECX/EDX, leaf 0xd subleaf 1 EAX, leaf 0x8000_0001 ECX/EDX. Bits that
/// the guest's own state turns on (OSXSAVE, OSPKE) or that the VMM sets (hypervisor)
/// are left out.
const FEATURE_REGS: [(u32, u32, u8, u32); 8] = [
    (1, 0, 2, !((1 << 27) | (1 << 31))),
    (1, 0, 3, !0),
    (7, 0, 1, !0),
    (7, 0, 2, !(1 << 4)),
    (7, 0, 3, !0),
    (0xd, 1, 0, !0),
    (0x8000_0001, 0, 2, !0),
    (0x8000_0001, 0, 3, !0),
];

fn register(e: &kvm_bindings::kvm_cpuid_entry2, reg: u8) -> u32 {
    match reg {
        0 => e.eax,
        1 => e.ebx,
        2 => e.ecx,
        _ => e.edx,
    }
}

/// The feature registers of `cpuid` (a guest's), for the HELLO.
pub fn cpu_features(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuFeatures> {
    FEATURE_REGS
        .iter()
        .filter_map(|&(leaf, subleaf, reg, mask)| {
            let e = cpuid
                .iter()
                .find(|e| e.function == leaf && e.index == subleaf)?;
            Some(CpuFeatures {
                leaf,
                subleaf,
                reg,
                bits: register(e, reg) & mask,
            })
        })
        .collect()
}

/// The features of `wanted` that none of `offered` (CPUID tables this host gives a
/// guest) has.
fn missing_features(wanted: &[CpuFeatures], offered: &[&CpuId]) -> Vec<String> {
    wanted
        .iter()
        .filter_map(|w| {
            let have = offered
                .iter()
                .flat_map(|c| c.as_slice())
                .filter(|e| e.function == w.leaf && e.index == w.subleaf)
                .fold(0, |acc, e| acc | register(e, w.reg));
            let lacking = w.bits & !have;
            (lacking != 0).then(|| {
                format!(
                    "leaf {:#x}.{} {} bits {lacking:#x}",
                    w.leaf,
                    w.subleaf,
                    ["EAX", "EBX", "ECX", "EDX"][usize::from(w.reg.min(3))]
                )
            })
        })
        .collect()
}

/// Reads the preamble and the HELLO from `r` (the source's side of the stream).
pub fn read_hello(r: &mut impl Read) -> Result<Hello, ProtocolError> {
    protocol::read_preamble(r)
        .and_then(|()| protocol::expect_frame(r, Kind::Hello))
        .and_then(|p| protocol::parse_hello(&p))
}

/// What the PAGES frames of one migration came to so far.
#[derive(Default)]
pub struct Received {
    /// The digest of every PAGES payload.
    pub digest: PageDigest,
    /// Pages written.
    pub pages: u64,
}

/// The destination's side after ACCEPT, from any reader: writes PAGES into `mem`
/// (every entry checked first) until the STATE frame, then checks the page digest and
/// the state's consistency and returns it (the caller checks it against the offer).
pub fn receive_pages(
    r: &mut impl Read,
    mem: &GuestMemory,
    progress: &mut Received,
) -> Result<MachineState, ReceiveError> {
    loop {
        let frame = protocol::read_frame(r)?;
        match frame.kind {
            Kind::Pages => {
                progress.pages += protocol::apply_pages(mem, &frame.payload)? as u64;
                progress.digest.update(&frame.payload);
            }
            Kind::State => {
                let (digest, state) = protocol::parse_state(&frame.payload)?;
                if digest != progress.digest.value() {
                    return Err(ProtocolError::Corrupt(format!(
                        "the page digest does not match ({} pages received)",
                        progress.pages
                    ))
                    .into());
                }
                state.check()?;
                return Ok(state);
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other,
                    want: "PAGES or STATE",
                }
                .into())
            }
        }
    }
}

impl Incoming {
    fn patient<'a>(&'a mut self, signals: &'a SignalFd) -> Patient<'a> {
        Patient {
            conn: &mut self.conn,
            signals,
            interrupted: false,
        }
    }

    fn map_read(e: ProtocolError, interrupted: bool) -> ReceiveError {
        if interrupted {
            ReceiveError::Interrupted
        } else {
            e.into()
        }
    }

    /// Reads the preamble and the HELLO.
    pub fn hello(&mut self, signals: &SignalFd) -> Result<Hello, ReceiveError> {
        let mut r = self.patient(signals);
        let result = read_hello(&mut r);
        result.map_err(|e| Self::map_read(e, r.interrupted))
    }

    /// Checks what the HELLO offers against `config` (the offered configuration with
    /// the user's overrides, validated) and this host's KVM: the state format, the
    /// memory layout, and the CPU features the guest uses.
    pub fn check_offer(hello: &Hello, config: &VmConfig, kvm: &Kvm) -> Result<(), ReceiveError> {
        if hello.format_version != FORMAT_VERSION {
            return Err(ReceiveError::Offer(format!(
                "the source writes state format version {}, this wisp reads only version {FORMAT_VERSION}; use the same wisp version on both sides",
                hello.format_version
            )));
        }
        let layout = config
            .memory_mib
            .checked_mul(1 << 20)
            .map(ram_ranges)
            .unwrap_or_default();
        if hello.memory != layout {
            return Err(ReceiveError::Offer(format!(
                "the memory layout {:x?} does not match {} MiB of RAM",
                hello.memory, config.memory_mib
            )));
        }
        let kvm_err =
            |what: &str, e: kvm_ioctls::Error| ReceiveError::Offer(format!("{what} failed: {e}"));
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID", e))?;
        // What a vCPU given that table reports back: the same table on most hosts;
        // where the host's KVM does not apply CPUID (guests see the host's own bits,
        // and a saved vCPU state holds those), the host's bits.
        let vm = kvm.create_vm().map_err(|e| kvm_err("KVM_CREATE_VM", e))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
        vcpu.set_cpuid2(&supported)
            .map_err(|e| kvm_err("KVM_SET_CPUID2", e))?;
        let effective = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_err("KVM_GET_CPUID2", e))?;
        let missing = missing_features(&hello.cpu, &[&supported, &effective]);
        if !missing.is_empty() {
            return Err(ReceiveError::Offer(format!(
                "this host's CPU (as KVM offers it) lacks features the guest uses: {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }

    /// Tells the source why not (best effort: it may be gone).
    pub fn refuse(&mut self, why: &str) {
        let _ = protocol::write_frame(&mut self.conn, Kind::Refuse, why.as_bytes());
        let _ = self.conn.flush();
    }

    /// Tells the source to start sending memory.
    pub fn accept(&mut self) -> Result<(), ReceiveError> {
        protocol::write_frame(&mut self.conn, Kind::Accept, &[]).map_err(ProtocolError::Io)?;
        self.conn.flush().map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// Receives pages into `mem` until the STATE frame, checks the page digest, and
    /// returns the state (format and consistency checked; the caller checks it against
    /// the offer).
    pub fn receive_memory(
        &mut self,
        mem: &GuestMemory,
        signals: &SignalFd,
    ) -> Result<MachineState, ReceiveError> {
        let mut progress = Received {
            digest: std::mem::take(&mut self.digest),
            pages: self.pages,
        };
        let mut r = self.patient(signals);
        let result = receive_pages(&mut r, mem, &mut progress);
        let interrupted = r.interrupted;
        self.digest = progress.digest;
        self.pages = progress.pages;
        // Only a read can be interrupted, and it fails the step.
        result.map_err(|e| {
            if interrupted {
                ReceiveError::Interrupted
            } else {
                e
            }
        })
    }

    /// Pages received so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Tells the source that the VM runs here now; false if that could not be sent (the
    /// source will then resume it there, so this side must stop).
    pub fn running(mut self) -> bool {
        protocol::write_frame(&mut self.conn, Kind::Running, &[]).is_ok()
            && self.conn.flush().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    /// A termination signal while the source is silent ends the step at once. It used
    /// to spin for ever: the read returned ErrorKind::Interrupted, which read_exact
    /// retries, and the pending signal answered every retry the same way.
    #[test]
    fn a_signal_interrupts_a_read() {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Blocks the signals in this thread only, which takes its own signal.
            let signals = SignalFd::new().unwrap();
            let (ours, _source) = UnixStream::pair().unwrap();
            let mut incoming = Incoming {
                conn: Conn::Unix(ours),
                digest: PageDigest::default(),
                pages: 0,
            };
            // SAFETY: a signal to this thread, which blocks it (the signalfd gets it).
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
            let hello = incoming.hello(&signals).map(drop);
            let mem = crate::memory::create(1 << 20).unwrap();
            let state = incoming.receive_memory(&mem, &signals).map(drop);
            let _ = done.send((hello, state));
        });
        let (hello, state) = result
            .recv_timeout(Duration::from_secs(10))
            .expect("the reads return");
        assert!(matches!(hello, Err(ReceiveError::Interrupted)), "{hello:?}");
        assert!(matches!(state, Err(ReceiveError::Interrupted)), "{state:?}");
    }

    #[test]
    fn cpu_features_missing_on_the_destination_are_named() {
        let entry = |function, index, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        };
        let guest = [
            entry(1, 0, 0b1011 | (1 << 27) | (1 << 31), 0x10),
            entry(7, 0, 0b10, 0),
        ];
        let wanted = cpu_features(&guest);
        // OSXSAVE and the hypervisor bit are left out.
        assert_eq!(wanted[0].bits, 0b1011);
        let same = CpuId::from_entries(&guest).unwrap();
        assert!(missing_features(&wanted, &[&same]).is_empty());
        let fewer = CpuId::from_entries(&[entry(1, 0, 0b0011, 0x10)]).unwrap();
        let missing = missing_features(&wanted, &[&fewer]);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(
            missing[0].contains("leaf 0x1.0 ECX bits 0x8"),
            "{missing:?}"
        );
        assert!(
            missing[1].contains("leaf 0x7.0 ECX bits 0x2"),
            "{missing:?}"
        );
    }
}
