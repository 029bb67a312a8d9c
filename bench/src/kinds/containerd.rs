//! containerd running the workload, as container platforms run containers: a private
//! containerd of the kind's own (see [`crate::containerd`]) with the workload imported
//! as an image, and `ctr run --rm` attached to it (as `docker run` is), in the slot's
//! container namespace (`--with-ns network:...`), with the same read-only root and
//! tmpfs /tmp as the OCI kinds.
//!
//! `containerd-runc` runs it with containerd's default runtime, `io.containerd.runc.v2`
//! (runc); `containerd-wisp` with `io.containerd.wisp.v2`, for which containerd starts
//! `containerd-shim-wisp-v2` (built next to wisp, put first on the daemon's PATH), and
//! the container is a wisp microVM.
//!
//! The instance is the shim's process tree (the shim and the container's processes, or
//! the VM), found once the marker shows; its CPU time until ready also counts `ctr`'s
//! and what containerd spent meanwhile; its memory is the shim's tree (the client and
//! the daemon, which serves every container, are left out).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use wisp_image::fixture::{self, Item};

use super::{runs_ok, spawn, Env, Kind, KindError, KindName};
use crate::containerd::{version_of, Containerd};
use crate::instance::Instance;
use crate::netns::{Link, Slot};

/// The workload's image in the private containerd.
pub const IMAGE: &str = "docker.io/wisp-bench/workload:latest";
/// containerd's default runtime (runc).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The runtime that makes containerd start [`WISP_SHIM`].
pub const WISP_RUNTIME: &str = "io.containerd.wisp.v2";
/// wisp's shim binary, built next to wisp.
pub const WISP_SHIM: &str = "containerd-shim-wisp-v2";
/// The tmpfs /tmp every bench container has (as in the OCI kinds' bundles).
const TMP_MOUNT: &str = "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777";
/// How long `ctr run --rm` may take to delete the container after its task is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `ctr run` arguments (after `ctr --address SOCK --namespace NS`) that run
/// container `cid` of [`IMAGE`] with `runtime` in the network namespace `netns`, its
/// I/O FIFOs in `fifo_dir`, and for runc its state in `runc_root`. `size` (vCPUs, MiB)
/// becomes the container's CPU and memory limits, which size a wisp VM as the bench's
/// other VMs are sized (and cap runc's container alike).
fn run_args(
    runtime: &str,
    runc_root: Option<&Path>,
    netns: &Path,
    fifo_dir: &Path,
    cid: &str,
    size: (u32, u64),
) -> Vec<OsString> {
    let mut with_ns = OsString::from("network:");
    with_ns.push(netns);
    let mut args: Vec<OsString> = ["run", "--rm", "--read-only", "--mount", TMP_MOUNT]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.extend([
        "--with-ns".into(),
        with_ns,
        "--fifo-dir".into(),
        fifo_dir.into(),
        "--runtime".into(),
        runtime.into(),
        "--cpus".into(),
        size.0.to_string().into(),
        "--memory-limit".into(),
        (size.1 << 20).to_string().into(),
    ]);
    if let Some(root) = runc_root {
        args.extend(["--runc-root".into(), root.into()]);
    }
    args.extend([IMAGE.into(), cid.into()]);
    args
}

/// The value of flag `name` in `args` (`-name V`, `--name V`, `-name=V`, `--name=V`,
/// as Go's flag package takes them).
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'))?;
        match bare.split_once('=') {
            Some((n, v)) if n == name => Some(v),
            None if bare == name => args.get(i + 1).map(String::as_str),
            _ => None,
        }
    })
}

/// Whether command line `args` is the running shim of container `cid` of the daemon at
/// `socket` (not the `start` or `delete` invocation containerd makes around it).
fn is_shim_of(args: &[String], socket: &str, cid: &str) -> bool {
    flag_value(args, "id") == Some(cid)
        && flag_value(args, "address") == Some(socket)
        && !matches!(args.last().map(String::as_str), Some("start" | "delete"))
}

/// The process id of container `cid`'s shim, from /proc.
fn find_shim(socket: &Path, cid: &str) -> Result<u32, String> {
    let socket_text = socket.to_string_lossy();
    let dir = fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))?;
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .find(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let args: Vec<String> = raw
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                is_shim_of(&args, &socket_text, cid)
            })
        })
        .ok_or_else(|| format!("the container runs but no shim process of {cid} was found"))
}

/// A file of the root file system, as read for the image layer.
enum Node {
    Dir(String, u32),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
}

/// Everything under `root`/`rel`, parents before children, in name order (devices
/// and sockets are left out: the workload has none).
fn walk(root: &Path, rel: &Path, out: &mut Vec<Node>) -> io::Result<()> {
    let mut entries = fs::read_dir(root.join(rel))?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        let name = rel.to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(e.path())?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(e.path())?.to_string_lossy().into_owned();
            out.push(Node::Symlink(name, target));
        } else if meta.is_dir() {
            out.push(Node::Dir(name, mode));
            walk(root, &rel, out)?;
        } else if meta.is_file() {
            out.push(Node::File(name, fs::read(e.path())?, mode));
        }
    }
    Ok(())
}

/// Writes the workload's root file system `rootfs` as a `docker save` archive of
/// [`IMAGE`] (one layer; the image's command is the workload's /init) to `file`.
pub(crate) fn image_archive(rootfs: &Path, file: &Path) -> io::Result<()> {
    let mut nodes = Vec::new();
    walk(rootfs, Path::new(""), &mut nodes)?;
    let items: Vec<Item<'_>> = nodes
        .iter()
        .map(|n| match n {
            Node::Dir(p, mode) => Item::Dir(p, *mode),
            Node::File(p, data, mode) => Item::File(p, data, *mode, 0),
            Node::Symlink(p, target) => Item::Symlink(p, target),
        })
        .collect();
    let layer = fixture::tar(&items)?;
    let layers = [layer];
    let config = fixture::config(
        json!({ "Cmd": ["/bin/sh", "/init"], "Env": ["PATH=/bin"], "WorkingDir": "/" }),
        &layers,
    );
    fixture::docker_archive(file, IMAGE, &config, &layers)
}

/// The first line of `program ARG`'s output, or nothing.
fn first_line(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_default()
}

/// `ctr run` on a private containerd, with runc or wisp's shim.
pub struct CtrRun {
    env: Env,
    name: KindName,
    runtime: &'static str,
    /// The directory of wisp's shim (first on the daemon's PATH); `None` for runc.
    shim_dir: Option<PathBuf>,
    what: String,
    /// Started by `prepare`, stopped (and its directory removed) when the kind goes.
    daemon: OnceLock<Result<Containerd, String>>,
}

impl CtrRun {
    pub(super) fn new(env: &Env, name: KindName) -> Result<Self, String> {
        runs_ok("containerd", "--version")?;
        runs_ok("ctr", "--version")?;
        let version = version_of(&first_line("containerd", "--version"));
        let (runtime, shim_dir, what) = if name == KindName::ContainerdWisp {
            let shim = env.wisp.with_file_name(WISP_SHIM);
            if !shim.is_file() {
                return Err(format!(
                    "{} is not built (cargo build --release -p wisp-shim builds it next to wisp)",
                    shim.display()
                ));
            }
            let what = format!(
                "a wisp microVM: containerd {version} (a private daemon), ctr run --runtime {WISP_RUNTIME}, {}",
                shim.display()
            );
            (WISP_RUNTIME, shim.parent().map(Path::to_path_buf), what)
        } else {
            runs_ok("runc", "--version")?;
            runs_ok("containerd-shim-runc-v2", "-v")?;
            let what = format!(
                "the host kernel; containerd {version} (a private daemon), ctr run, {RUNC_RUNTIME} with {}",
                first_line("runc", "--version")
            );
            (RUNC_RUNTIME, None, what)
        };
        Ok(Self {
            env: env.clone(),
            name,
            runtime,
            shim_dir,
            what,
            daemon: OnceLock::new(),
        })
    }

    /// Starts the kind's containerd and imports the workload's image.
    fn start_daemon(&self) -> Result<Containerd, String> {
        let dir = self.env.scratch.join(self.name.as_str());
        let d = Containerd::start(&dir, self.shim_dir.as_slice()).map_err(|e| e.to_string())?;
        let archive = d.layout().dir.join("workload-image.tar");
        image_archive(&self.env.workload.rootfs, &archive)
            .map_err(|e| format!("cannot write {}: {e}", archive.display()))?;
        d.import(&archive).map_err(|e| e.to_string())?;
        let _ = fs::remove_file(&archive);
        Ok(d)
    }

    fn daemon(&self) -> Result<&Containerd, KindError> {
        self.daemon
            .get_or_init(|| self.start_daemon())
            .as_ref()
            .map_err(|why| KindError::Prepare(why.clone()))
    }
}

impl Kind for CtrRun {
    fn name(&self) -> KindName {
        self.name
    }

    fn link(&self) -> Link {
        Link::Veth
    }

    fn runs(&self) -> String {
        self.what.clone()
    }

    fn prepare(&self, _slot: &Slot) -> Result<(), KindError> {
        self.daemon().map(|_| ())
    }

    fn start(&self, slot: &Slot, id: &str) -> Result<Instance, KindError> {
        let d = self.daemon()?;
        let netns = slot
            .container_ns_path()
            .ok_or_else(|| KindError::Prepare("the slot has no container namespace".into()))?;
        let dir = &d.layout().dir;
        let fifo_dir = dir.join("fifo");
        fs::create_dir_all(&fifo_dir).map_err(|source| KindError::Write {
            path: fifo_dir.clone(),
            source,
        })?;
        let runc_root = self.shim_dir.is_none().then(|| dir.join("runc"));
        let cid = format!("wb-{id}");
        let mut cmd = d.ctr();
        cmd.args(run_args(
            self.runtime,
            runc_root.as_deref(),
            &netns,
            &fifo_dir,
            &cid,
            (self.env.cpus, self.env.memory_mib),
        ));
        d.track(&cid);
        let daemon_cpu = crate::procfs::cpu_ms(&[d.pid()]);
        let mut inst = spawn(cmd, slot, false, "ctr run")?;
        inst.count_cpu_of(d.pid(), daemon_cpu);
        let socket = d.layout().socket.clone();
        let shim_of = cid.clone();
        inst.find_root_when_ready(Box::new(move || find_shim(&socket, &shim_of)));
        // ctr run --rm deletes the container once its task is gone.
        let mut kill = d.ctr();
        kill.args(["task", "kill", "--signal", "SIGKILL", &cid]);
        inst.on_stop(kill);
        inst.stop_grace(STOP_GRACE);
        Ok(inst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn run_command_lines() {
        let runc = run_args(
            RUNC_RUNTIME,
            Some(Path::new("/s/containerd-runc/runc")),
            Path::new("/run/netns/wb1-2c"),
            Path::new("/s/containerd-runc/fifo"),
            "wb-containerd-runc-0",
            (2, 256),
        );
        assert_eq!(
            strings(&runc).join(" "),
            "run --rm --read-only --mount type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777 \
             --with-ns network:/run/netns/wb1-2c --fifo-dir /s/containerd-runc/fifo \
             --runtime io.containerd.runc.v2 --cpus 2 --memory-limit 268435456 \
             --runc-root /s/containerd-runc/runc \
             docker.io/wisp-bench/workload:latest wb-containerd-runc-0"
        );
        let wisp = strings(&run_args(
            WISP_RUNTIME,
            None,
            Path::new("/run/netns/wb1-3c"),
            Path::new("/f"),
            "wb-x",
            (1, 128),
        ));
        assert!(wisp
            .windows(2)
            .any(|w| w == ["--runtime", "io.containerd.wisp.v2"]));
        assert!(!wisp.iter().any(|a| a == "--runc-root"));
        assert_eq!(wisp[wisp.len() - 2..], [IMAGE, "wb-x"]);
    }

    #[test]
    fn the_shim_is_told_from_its_start_and_delete_calls() {
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        let sock = "/s/c/containerd.sock";
        // containerd-shim-runc-v2 (Go) and the Rust shim crate's re-exec.
        let go = args("/usr/bin/containerd-shim-runc-v2 -namespace wisp-bench -id wb-1 -address /s/c/containerd.sock");
        let rust = args(
            "containerd-shim-wisp-v2 -namespace wisp-bench -id=wb-1 --address /s/c/containerd.sock",
        );
        assert!(is_shim_of(&go, sock, "wb-1"));
        assert!(is_shim_of(&rust, sock, "wb-1"));
        assert!(!is_shim_of(&go, sock, "wb-10"));
        assert!(!is_shim_of(&go, "/other.sock", "wb-1"));
        let start = args("containerd-shim-wisp-v2 -namespace wisp-bench -address /s/c/containerd.sock -publish-binary containerd -id wb-1 start");
        assert!(!is_shim_of(&start, sock, "wb-1"));
        let ctr =
            args("ctr --address /s/c/containerd.sock --namespace wisp-bench run docker.io/x wb-1");
        assert!(!is_shim_of(&ctr, sock, "wb-1"));
        assert_eq!(flag_value(&args("-id"), "id"), None);
    }

    #[test]
    fn the_image_archive_holds_the_root_file_system_and_the_command() {
        let tmp = std::env::temp_dir().join(format!("wisp-bench-ctd-{}", std::process::id()));
        let root = tmp.join("rootfs");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("www")).unwrap();
        fs::write(root.join("init"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("www/index.html"), b"page").unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        let file = tmp.join("image.tar");
        image_archive(&root, &file).unwrap();
        let tar = fs::read(&file).unwrap();
        let has = |s: &str| tar.windows(s.len()).any(|w| w == s.as_bytes());
        for s in [
            "manifest.json",
            IMAGE,
            "bin/sh",
            "www/index.html",
            "#!/bin/sh\necho hi\n",
            "\"Cmd\":[\"/bin/sh\",\"/init\"]",
        ] {
            assert!(has(s), "{s:?} not in the archive");
        }
        fs::remove_dir_all(&tmp).unwrap();
    }
}
