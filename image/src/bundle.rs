//! An OCI runtime bundle (a directory holding `config.json` and a root file system, what
//! `runc run` reads and what containerd hands a shim) as a wisp VM: the process to run,
//! its host name, the VM size from `linux.resources`, and the network namespace. Fields
//! a VM cannot honour are refused by name rather than silently dropped; the README's
//! "containerd and Kubernetes" section lists both kinds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::process::{self, Process};
use crate::ImageError;

/// vCPUs when the spec sets no CPU limit.
pub const DEFAULT_CPUS: u64 = 1;
/// Guest RAM in MiB when the spec sets no memory limit.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// The smallest memory limit a VM can boot with (kernel and init included).
pub const MIN_MEMORY_MIB: u64 = 64;

/// At most this many bytes of bind-mounted files are copied into a VM.
pub const MAX_COPY_BYTES: u64 = 8 << 20;
/// At most this many bind-mounted files and directories.
pub const MAX_COPY_ENTRIES: usize = 1024;

/// Mount types the guest kernel provides by itself: wisp's init mounts /proc, /sys,
/// /dev, /dev/pts and /dev/shm; the others in a spec are not mounted (see README).
const KERNEL_MOUNTS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// A bundle, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The root file system (`root.path`, relative to `dir` unless absolute).
    pub rootfs: PathBuf,
    /// What runs.
    pub process: Process,
    /// `hostname`, else the bundle directory's name.
    pub hostname: String,
    /// vCPUs: `linux.resources.cpu` quota/period rounded up, else the count of its
    /// `cpus` set, else [`DEFAULT_CPUS`].
    pub cpus: u64,
    /// Guest RAM: `linux.resources.memory.limit` in MiB rounded up, else
    /// [`DEFAULT_MEMORY_MIB`].
    pub memory_mib: u64,
    /// The network namespace to join (a `network` namespace with a path, as CNI gives);
    /// `None`: the VM gets user-mode networking.
    pub netns: Option<PathBuf>,
    /// `annotations`, as the runtime's caller set them (CRI marks a pod's sandbox here).
    pub annotations: BTreeMap<String, String>,
    /// What bind mounts bring in, copied into the guest at start (a VM does not see
    /// host files): Kubernetes' /etc/hosts, /etc/resolv.conf, service-account tokens.
    pub copies: Vec<Copy>,
}

/// One host file or directory a bind mount names, for the guest's init to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copy {
    /// A directory at this absolute guest path.
    Dir(String),
    /// A regular file: host path, guest path, permission bits.
    File(PathBuf, String, u32),
}

#[derive(Deserialize)]
struct Spec {
    process: Option<SpecProcess>,
    root: Option<Root>,
    hostname: Option<String>,
    #[serde(default)]
    mounts: Vec<Mount>,
    linux: Option<Linux>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct SpecProcess {
    #[serde(default)]
    terminal: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: String,
    #[serde(rename = "commandLine")]
    command_line: Option<String>,
}

#[derive(Default, Deserialize)]
struct User {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(rename = "additionalGids", default)]
    additional_gids: Vec<u32>,
}

#[derive(Deserialize)]
struct Root {
    path: PathBuf,
}

#[derive(Deserialize)]
struct Mount {
    destination: String,
    #[serde(rename = "type")]
    typ: Option<String>,
    source: Option<String>,
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Default, Deserialize)]
struct Linux {
    resources: Option<Resources>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Default, Deserialize)]
struct Resources {
    cpu: Option<Cpu>,
    memory: Option<Memory>,
}

#[derive(Default, Deserialize)]
struct Cpu {
    quota: Option<i64>,
    period: Option<u64>,
    cpus: Option<String>,
}

#[derive(Default, Deserialize)]
struct Memory {
    limit: Option<i64>,
}

#[derive(Deserialize)]
struct Namespace {
    #[serde(rename = "type")]
    typ: String,
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Device {
    path: String,
}

impl Bundle {
    /// Reads and checks `dir/config.json`. Every refusal names the field and why.
    pub fn open(dir: &Path) -> Result<Bundle, ImageError> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|source| ImageError::Read {
            what: file.display().to_string(),
            source,
        })?;
        Self::parse(dir, &text)
    }

    /// Parses `text` as the bundle `dir`'s config.json (for tests and fuzzing).
    pub fn parse(dir: &Path, text: &str) -> Result<Bundle, ImageError> {
        let spec: Spec = serde_json::from_str(text).map_err(|e| bad(dir, e.to_string()))?;
        Self::from_spec(dir, spec)
    }

    fn from_spec(dir: &Path, spec: Spec) -> Result<Bundle, ImageError> {
        let err = |why: String| bad(dir, why);
        let p = spec
            .process
            .ok_or_else(|| err("it has no process to run".into()))?;
        if p.command_line.is_some() {
            return Err(err(
                "process.commandLine is for Windows; give process.args".into()
            ));
        }
        if p.args.first().is_none_or(|a| a.is_empty()) {
            return Err(err("process.args is empty: nothing to run".into()));
        }
        if !p.cwd.starts_with('/') {
            return Err(err(format!("process.cwd {:?} is not absolute", p.cwd)));
        }
        if p.user.additional_gids.len() > process::MAX_GROUPS {
            return Err(err(format!(
                "process.user.additionalGids has {} groups; wisp's init takes at most {}",
                p.user.additional_gids.len(),
                process::MAX_GROUPS
            )));
        }
        let root = spec
            .root
            .ok_or_else(|| err("it has no root (root.path)".into()))?;
        let rootfs = if root.path.is_absolute() {
            root.path
        } else {
            dir.join(root.path)
        };
        if !rootfs.is_dir() {
            return Err(err(format!(
                "its root file system {} is not a directory (root.path)",
                rootfs.display()
            )));
        }
        let mut copies = Vec::new();
        let mut bytes = 0u64;
        for m in &spec.mounts {
            if is_bind(m) {
                copy_bind(m, &mut copies, &mut bytes).map_err(&err)?;
            } else {
                check_mount(m).map_err(&err)?;
            }
        }
        let linux = spec.linux.unwrap_or_default();
        if let Some(d) = linux.devices.first() {
            return Err(err(format!(
                "linux.devices names {}: a wisp VM has no host devices; its guest has its own /dev",
                d.path
            )));
        }
        let mut netns = None;
        for ns in &linux.namespaces {
            match (ns.typ.as_str(), &ns.path) {
                ("network", Some(path)) => netns = Some(path.clone()),
                // The sandbox's namespaces (Kubernetes passes ipc and uts paths): the
                // VM has its own kernel, so joining them has no meaning.
                ("ipc" | "uts" | "cgroup" | "mount", _) | (_, None) => {}
                (other, Some(path)) => {
                    return Err(err(format!(
                        "joining the {other} namespace {} is not supported: the process runs \
                         in a VM with a kernel of its own",
                        path.display()
                    )))
                }
            }
        }
        let res = linux.resources.unwrap_or_default();
        let cpus = cpus(res.cpu.unwrap_or_default()).map_err(&err)?;
        let memory_mib = memory(res.memory.unwrap_or_default()).map_err(&err)?;
        let hostname = match spec.hostname.filter(|h| !h.is_empty()) {
            Some(h) => h,
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "wisp".into()),
        };
        let process = Process {
            args: p.args,
            env: p.env,
            cwd: p.cwd,
            uid: p.user.uid,
            gid: p.user.gid,
            groups: p.user.additional_gids,
            terminal: p.terminal,
        };
        process::check(&process, &hostname)?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            rootfs,
            process,
            hostname,
            cpus,
            memory_mib,
            netns,
            annotations: spec.annotations,
            copies,
        })
    }
}

fn bad(dir: &Path, why: String) -> ImageError {
    ImageError::Malformed {
        what: format!("bundle {}: config.json", dir.display()),
        why,
    }
}

fn is_bind(m: &Mount) -> bool {
    m.typ.as_deref() == Some("bind") || m.options.iter().any(|o| o == "bind" || o == "rbind")
}

/// A bind mount's files, walked on the host (symlinks followed, as a bind would show
/// them), within [`MAX_COPY_BYTES`] and [`MAX_COPY_ENTRIES`].
fn copy_bind(m: &Mount, out: &mut Vec<Copy>, bytes: &mut u64) -> Result<(), String> {
    let source = PathBuf::from(m.source.as_deref().unwrap_or(""));
    let dest = &m.destination;
    let too_big = || {
        format!(
            "the bind mount of {} at {dest} holds more than wisp copies into a VM ({} files, \
             {} MiB in all): a VM does not see host files; put them in the image",
            source.display(),
            MAX_COPY_ENTRIES,
            MAX_COPY_BYTES >> 20
        )
    };
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
        return Err(format!(
            "the bind mount at {dest:?} is not an absolute, plain path"
        ));
    }
    let mut stack = vec![(source.clone(), dest.trim_end_matches('/').to_string(), 0u32)];
    while let Some((host, guest, depth)) = stack.pop() {
        let meta = std::fs::metadata(&host).map_err(|e| {
            format!(
                "the bind mount of {} at {dest}: cannot read {}: {e}",
                source.display(),
                host.display()
            )
        })?;
        if out.len() >= MAX_COPY_ENTRIES || depth > 16 {
            return Err(too_big());
        }
        let guest = if guest.is_empty() {
            "/".to_string()
        } else {
            guest
        };
        if meta.is_dir() {
            out.push(Copy::Dir(guest.clone()));
            let rd = std::fs::read_dir(&host).map_err(|e| {
                format!(
                    "the bind mount at {dest}: cannot list {}: {e}",
                    host.display()
                )
            })?;
            let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            names.sort();
            for n in names.into_iter().rev() {
                let name = n.to_string_lossy().into_owned();
                let g = format!("{}/{name}", guest.trim_end_matches('/'));
                stack.push((host.join(&n), g, depth + 1));
            }
        } else if meta.is_file() {
            *bytes += meta.len();
            if *bytes > MAX_COPY_BYTES {
                return Err(too_big());
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
            out.push(Copy::File(host, guest, mode));
        } else {
            return Err(format!(
                "the bind mount at {dest}: {} is not a file or directory (sockets and \
                 devices cannot be copied into a VM)",
                host.display()
            ));
        }
    }
    Ok(())
}

fn check_mount(m: &Mount) -> Result<(), String> {
    match m.typ.as_deref() {
        Some(t) if KERNEL_MOUNTS.contains(&t) => Ok(()),
        t => Err(format!(
            "the mount at {} has type {}: only the guest kernel's own file systems ({}) \
             are supported",
            m.destination,
            t.unwrap_or("(none)"),
            KERNEL_MOUNTS.join(", ")
        )),
    }
}

fn cpus(c: Cpu) -> Result<u64, String> {
    if let (Some(quota), Some(period)) = (c.quota, c.period) {
        if quota > 0 && period > 0 {
            return Ok((quota as u64).div_ceil(period).max(1));
        }
    }
    match c.cpus.as_deref().filter(|s| !s.is_empty()) {
        Some(set) => cpu_set_len(set).ok_or_else(|| {
            format!("linux.resources.cpu.cpus {set:?} is not a CPU list like 0-3,6")
        }),
        None => Ok(DEFAULT_CPUS),
    }
}

/// How many CPUs a list like `0-3,6` names.
fn cpu_set_len(set: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in set.split(',') {
        let (a, b) = match part.trim().split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let a = part.trim().parse::<u64>().ok()?;
                (a, a)
            }
        };
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    Some(n)
}

fn memory(m: Memory) -> Result<u64, String> {
    match m.limit {
        Some(limit) if limit > 0 => {
            let mib = (limit as u64).div_ceil(1 << 20);
            if mib < MIN_MEMORY_MIB {
                return Err(format!(
                    "linux.resources.memory.limit is {mib} MiB; a wisp VM needs at least \
                     {MIN_MEMORY_MIB} MiB (its kernel and init run in it)"
                ));
            }
            Ok(mib)
        }
        _ => Ok(DEFAULT_MEMORY_MIB),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(spec: serde_json::Value) -> Result<Bundle, String> {
        let dir = std::env::temp_dir().join(format!("wisp-bundle-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        Bundle::parse(&dir, &spec.to_string()).map_err(|e| e.to_string())
    }

    fn spec(extra: serde_json::Value) -> serde_json::Value {
        let mut s = json!({
            "ociVersion": "1.0.2",
            "process": { "args": ["/bin/echo", "hi"], "env": ["PATH=/bin"], "cwd": "/",
                         "user": { "uid": 1000, "gid": 100, "additionalGids": [10, 20] } },
            "root": { "path": "rootfs" },
            "hostname": "box",
            "mounts": [ { "destination": "/proc", "type": "proc", "source": "proc" },
                        { "destination": "/dev/shm", "type": "tmpfs", "source": "shm" } ],
            "linux": { "namespaces": [ { "type": "pid" }, { "type": "network" } ] }
        });
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    }

    #[test]
    fn a_plain_spec_gives_its_process_and_the_defaults() {
        let b = bundle(spec(json!({}))).unwrap();
        assert_eq!(b.process.args, ["/bin/echo", "hi"]);
        assert_eq!((b.process.uid, b.process.gid), (1000, 100));
        assert_eq!(b.process.groups, [10, 20]);
        assert!(!b.process.terminal);
        assert_eq!(b.hostname, "box");
        assert_eq!((b.cpus, b.memory_mib), (DEFAULT_CPUS, DEFAULT_MEMORY_MIB));
        assert_eq!(b.netns, None);
        assert!(b.rootfs.ends_with("rootfs"));
        assert!(b.annotations.is_empty());
        let b = bundle(spec(json!({ "annotations": { "a.b/c": "d" } }))).unwrap();
        assert_eq!(b.annotations.get("a.b/c").map(String::as_str), Some("d"));
    }

    #[test]
    fn bind_mounts_become_copies_of_their_files() {
        let host = std::env::temp_dir().join(format!("wisp-bind-test-{}", std::process::id()));
        std::fs::create_dir_all(host.join("sa/..data")).unwrap();
        std::fs::write(host.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(host.join("sa/..data/token"), "t").unwrap();
        let _ = std::os::unix::fs::symlink("..data/token", host.join("sa/token"));
        let b = bundle(spec(json!({ "mounts": [
            { "destination": "/etc/hosts", "type": "bind", "source": host.join("hosts"), "options": ["rbind", "ro"] },
            { "destination": "/var/run/secrets/sa", "type": "bind", "source": host.join("sa"), "options": ["rbind"] }
        ] })))
        .unwrap();
        let mode = |p: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(host.join(p)).unwrap().permissions(),
            ) & 0o7777
        };
        assert_eq!(
            b.copies,
            [
                Copy::File(host.join("hosts"), "/etc/hosts".into(), mode("hosts")),
                Copy::Dir("/var/run/secrets/sa".into()),
                Copy::Dir("/var/run/secrets/sa/..data".into()),
                Copy::File(
                    host.join("sa/..data/token"),
                    "/var/run/secrets/sa/..data/token".into(),
                    mode("sa/..data/token")
                ),
                Copy::File(
                    host.join("sa/token"),
                    "/var/run/secrets/sa/token".into(),
                    mode("sa/token")
                ),
            ]
        );
        let _ = std::fs::remove_dir_all(&host);
    }

    #[test]
    fn resources_size_the_vm() {
        let linux = |r: serde_json::Value| spec(json!({ "linux": { "resources": r } }));
        let b = bundle(linux(json!({ "cpu": { "quota": 150000, "period": 100000 },
                                     "memory": { "limit": 268435456 } })))
        .unwrap();
        assert_eq!((b.cpus, b.memory_mib), (2, 256));
        let b = bundle(linux(json!({ "cpu": { "cpus": "0-2,5" } }))).unwrap();
        assert_eq!(b.cpus, 4);
        let e = bundle(linux(json!({ "memory": { "limit": 1048576 } }))).unwrap_err();
        assert!(e.contains("at least 64 MiB"), "{e}");
        let e = bundle(linux(json!({ "cpu": { "cpus": "3-1" } }))).unwrap_err();
        assert!(e.contains("not a CPU list"), "{e}");
    }

    #[test]
    fn a_network_namespace_path_is_joined_and_others_are_refused() {
        let ns = |n: serde_json::Value| spec(json!({ "linux": { "namespaces": n } }));
        let b = bundle(ns(
            json!([{ "type": "network", "path": "/var/run/netns/x" },
                                 { "type": "ipc", "path": "/proc/1/ns/ipc" }]),
        ))
        .unwrap();
        assert_eq!(b.netns, Some(PathBuf::from("/var/run/netns/x")));
        let e = bundle(ns(json!([{ "type": "pid", "path": "/proc/1/ns/pid" }]))).unwrap_err();
        assert!(
            e.contains("pid namespace /proc/1/ns/pid is not supported"),
            "{e}"
        );
    }

    #[test]
    fn what_a_vm_cannot_honour_is_refused_by_name() {
        let cases = [
            (json!({ "process": null }), "no process"),
            (
                json!({ "process": { "args": [], "cwd": "/" } }),
                "process.args is empty",
            ),
            (
                json!({ "process": { "args": ["x"], "cwd": "rel" } }),
                "not absolute",
            ),
            (
                json!({ "process": { "args": ["x"], "cwd": "/", "user": { "uid": 0, "gid": 0, "additionalGids": (0..100).collect::<Vec<u32>>() } } }),
                "additionalGids has 100 groups",
            ),
            (
                json!({ "root": { "path": "missing" } }),
                "is not a directory",
            ),
            (
                json!({ "mounts": [{ "destination": "/data", "type": "bind", "source": "/nonexistent", "options": ["rbind"] }] }),
                "the bind mount of /nonexistent at /data: cannot read",
            ),
            (
                json!({ "mounts": [{ "destination": "/data", "type": "bind", "source": "/usr", "options": ["rbind"] }] }),
                "holds more than wisp copies",
            ),
            (
                json!({ "mounts": [{ "destination": "/data", "type": "nfs", "source": "h:/x" }] }),
                "has type nfs",
            ),
            (
                json!({ "linux": { "devices": [{ "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229 }] } }),
                "linux.devices names /dev/fuse",
            ),
            (json!({ "hostname": 5 }), "config.json"),
        ];
        for (extra, want) in cases {
            let e = bundle(spec(extra.clone())).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}
