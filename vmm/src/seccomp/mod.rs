//! seccomp-BPF filters for every thread of a running VM (`x86_64.json`, compiled with
//! rust-vmm's seccompiler).
//!
//! Each thread installs its own filter before it touches guest input: a vCPU before
//! its first KVM_RUN, the migration thread when it starts, the VMM thread once the
//! machine is built and the other threads run (so they do not inherit its filter). A
//! call outside the filter raises SIGSYS; the handler names the thread and the system
//! call on stderr and ends wisp with status 159 (128 + SIGSYS), as a process killed by
//! it would have.
//!
//! The policy comes from the command line: the built-in filters, none (`--seccomp
//! off`, for debugging), or a JSON file in seccompiler's format with one filter per
//! thread kind (`--seccomp-filter FILE`). It is compiled before anything else is set up,
//! so a bad file is one error line.

mod names;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};
use thiserror::Error;

/// The built-in filters.
pub const DEFAULT_FILTERS: &str = include_str!("x86_64.json");
/// wisp's exit status after a forbidden system call.
pub const EXIT_SIGSYS: i32 = 128 + libc::SIGSYS;

/// Errors of seccomp set-up.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The filter file cannot be read.
    #[error("--seccomp-filter {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The filter file does not compile.
    #[error("--seccomp-filter {path}: {why}; the format is seccompiler's JSON (see vmm/src/seccomp/x86_64.json)")]
    Compile {
        /// The file.
        path: PathBuf,
        /// What seccompiler said.
        why: String,
    },
    /// A thread kind has no filter in the file.
    #[error("--seccomp-filter {path}: no filter for the {kind:?} thread; the file needs one each for \"vmm\", \"vcpu\" and \"migrate\"")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The thread kind.
        kind: &'static str,
    },
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of the {thread} thread: {why} (run with --seccomp off if this kernel has no seccomp)")]
    Install {
        /// The thread.
        thread: String,
        /// Cause.
        why: String,
    },
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Which filters the threads get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The built-in filters.
    Default,
    /// No filters (debugging).
    Off,
    /// Filters from a seccompiler JSON file.
    File(PathBuf),
}

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The VMM thread's event loop.
    Vmm,
    /// A vCPU.
    Vcpu,
    /// The migration sender.
    Migrate,
}

impl Thread {
    const ALL: [Thread; 3] = [Thread::Vmm, Thread::Vcpu, Thread::Migrate];

    /// The filter's name in the JSON file.
    pub fn key(self) -> &'static str {
        match self {
            Thread::Vmm => "vmm",
            Thread::Vcpu => "vcpu",
            Thread::Migrate => "migrate",
        }
    }
}

/// Compiled filters, one per thread kind.
#[derive(Debug)]
pub struct Filters {
    programs: HashMap<&'static str, BpfProgram>,
}

impl Filters {
    /// Compiles `json` (named `path` in errors).
    pub fn compile(json: &str, path: &Path) -> Result<Filters, SeccompError> {
        let mut map =
            seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64).map_err(|e| {
                SeccompError::Compile {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                }
            })?;
        let mut programs = HashMap::new();
        for t in Thread::ALL {
            let p = map.remove(t.key()).ok_or(SeccompError::Missing {
                path: path.to_path_buf(),
                kind: t.key(),
            })?;
            programs.insert(t.key(), p);
        }
        Ok(Filters { programs })
    }

    /// The filters `policy` names: `None` for [`Policy::Off`].
    pub fn for_policy(policy: &Policy) -> Result<Option<Filters>, SeccompError> {
        match policy {
            Policy::Off => Ok(None),
            Policy::Default => Self::compile(DEFAULT_FILTERS, Path::new("(built-in)")).map(Some),
            Policy::File(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::compile(&json, path).map(Some)
            }
        }
    }
}

/// The process's filters, set once by [`configure`].
static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

/// Sets the process's policy (compiled already, by [`Filters::for_policy`]) and
/// installs the SIGSYS handler. Threads started before this run unfiltered; so do all
/// of them if it is never called (unit tests, `wisp doctor`).
pub fn configure(filters: Option<Filters>) -> Result<(), SeccompError> {
    if filters.is_some() {
        install_handler()?;
        // glibc gives each thread an arena of its own, and an arena that shrinks reads
        // /proc/sys/vm/overcommit_memory: an openat no filter but the VMM thread's
        // allows. With one arena (brk-based, shared) nothing reads a file.
        // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    let _ = FILTERS.set(filters);
    Ok(())
}

thread_local! {
    /// This thread's name, for the SIGSYS handler (which may not allocate).
    static NAME: Cell<([u8; 16], usize)> = const { Cell::new(([0; 16], 0)) };
}

/// Installs the filter of `kind` on the calling thread, if the policy has filters.
pub fn enter(kind: Thread) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    let current = std::thread::current();
    // The VMM thread is the main thread; the others are named after what they run.
    let name = match kind {
        Thread::Vmm => kind.key(),
        _ => current.name().unwrap_or(kind.key()),
    };
    let mut buf = [0u8; 16];
    let n = name.len().min(buf.len());
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    NAME.with(|c| c.set((buf, n)));
    let program = filters
        .programs
        .get(kind.key())
        .ok_or_else(|| SeccompError::Install {
            thread: name.to_string(),
            why: "no filter".into(),
        })?;
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        thread: name.to_string(),
        why: e.to_string(),
    })?;
    log::debug!("{name}: seccomp filter {:?} installed", kind.key());
    Ok(())
}

/// The name of system call `nr`, or "" if unknown.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .unwrap_or("")
}

/// Appends `bytes` to `buf` at `*at`, as far as it has room.
fn put(buf: &mut [u8], at: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        if let Some(slot) = buf.get_mut(*at) {
            *slot = b;
            *at += 1;
        }
    }
}

/// The SIGSYS message for system call `nr` made by thread `thread`.
fn message(buf: &mut [u8], thread: &[u8], nr: i64) -> usize {
    let mut at = 0;
    put(buf, &mut at, b"\r\nwisp: error: seccomp: the ");
    put(buf, &mut at, thread);
    put(buf, &mut at, b" thread made system call ");
    let name = syscall_name(nr);
    if name.is_empty() {
        put(buf, &mut at, b"number ");
    } else {
        put(buf, &mut at, name.as_bytes());
        put(buf, &mut at, b" (");
    }
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        put(buf, &mut at, b"-");
    }
    put(buf, &mut at, &digits[i..]);
    if !name.is_empty() {
        put(buf, &mut at, b")");
    }
    put(
        buf,
        &mut at,
        b", which its filter does not allow; wisp stops (run with --seccomp off to debug, and report it if the filter is wisp's own)\r\n",
    );
    at
}

/// The offset of `si_syscall` in an x86_64 `siginfo_t` for SIGSYS (after signo,
/// errno, code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for a
    // seccomp SIGSYS it carries the system call number at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let (name, len) = NAME.with(Cell::get);
    let mut buf = [0u8; 320];
    let n = message(&mut buf, &name[..len], i64::from(nr));
    // SAFETY: write and _exit are async-signal-safe, and every filter allows both; the
    // buffer lives on this stack.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(EXIT_SIGSYS);
    }
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern
    // "C" function with the SA_SIGINFO signature, and sigemptyset gets a valid mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_filters_compile_for_every_thread() {
        let f = Filters::for_policy(&Policy::Default).unwrap().unwrap();
        for t in Thread::ALL {
            assert!(!f.programs[t.key()].is_empty(), "{t:?}");
        }
        assert!(Filters::for_policy(&Policy::Off).unwrap().is_none());
    }

    #[test]
    fn bad_files_name_the_problem() {
        let p = Path::new("f.json");
        let e = Filters::compile("{", p).unwrap_err().to_string();
        assert!(e.starts_with("--seccomp-filter f.json:"), "{e}");
        let e = Filters::compile(
            r#"{"vmm": {"mismatch_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]}}"#,
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no filter for the \"vcpu\" thread"), "{e}");
        let e = Filters::compile(
            r#"{"vmm": {"mismatch_action": "trap", "filter_action": "allow", "filter": [{"syscall": "no_such_call"}]}}"#,
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no_such_call"), "{e}");
    }

    #[test]
    fn the_message_names_thread_and_call() {
        let mut buf = [0u8; 320];
        let n = message(&mut buf, b"vcpu0", 16);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            text.contains("the vcpu0 thread made system call ioctl (16),"),
            "{text}"
        );
        let n = message(&mut buf, b"vmm", 9999);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.contains("system call number 9999,"), "{text}");
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(-1), "");
    }
}
