//! containerd-shim-wisp-v2 under a real containerd (Debian's `containerd` package), which
//! each test starts privately (its own root, state, socket; no CRI) with the shim on its
//! PATH. An image the test writes (busybox) is imported with `ctr image import`, then
//! run with `ctr run --runtime io.containerd.wisp.v2`: the output and exit status match
//! the same command under runc, `ctr task ls/pause/resume/metrics/kill/delete` drive
//! the VM, a killed shim's task ends and its VM goes, bad bundles are refused through
//! ctr, and a spec'd network namespace reaches the guest. After every delete nothing is
//! left: no VM, no work directory, no mount. Needs root.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wisp_image::fixture;

/// One VM-heavy test at a time (the machine has two cores).
static SERIAL: Mutex<()> = Mutex::new(());

const IMAGE: &str = "wisp.test/busybox:1";
const RUNTIME: &str = "io.containerd.wisp.v2";
/// A boot where guest kernel mode is emulated takes seconds.
const SLOW: Duration = Duration::from_secs(300);

const APPLETS: [&str; 12] = [
    "sh", "echo", "cat", "id", "pwd", "sleep", "wget", "ls", "env", "hostname", "grep", "true",
];

fn shim() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-wisp-v2"))
}

/// The image: busybox and its applets, run as its user `app`.
fn image_tar(to: &Path) {
    let layer = fixture::busybox_layer(
        &APPLETS,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        b"root:x:0:\napp:x:1000:\n",
        &[],
    )
    .expect("layer");
    let config = fixture::config(
        serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "User": "app" }),
        std::slice::from_ref(&layer),
    );
    fixture::docker_archive(to, IMAGE, &config, &[layer]).expect("docker archive");
}

/// A private containerd, stopped and removed on drop.
struct Containerd {
    dir: PathBuf,
    child: Child,
    _serial: MutexGuard<'static, ()>,
}

/// What a ctr command did.
struct Ran {
    code: i32,
    out: String,
    err: String,
}

impl Containerd {
    fn start(tag: &str) -> Containerd {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "containerd tests need root");
        let dir = std::env::temp_dir().join(format!("wisp-ctd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shim")).unwrap();
        let d = dir.display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/ctd.sock\"\n"
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let path = format!(
            "{}:{}",
            shim().parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("WISP_SHIM_DIR", dir.join("shim"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (scripts/install-deps.sh installs it)");
        let c = Containerd {
            dir,
            child,
            _serial: serial,
        };
        let t0 = Instant::now();
        while c.ctr(&["version"], Duration::from_secs(5)).code != 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let tar = c.dir.join("image.tar");
        image_tar(&tar);
        c.ok(&["image", "import", tar.to_str().unwrap()]);
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str], timeout: Duration) -> Ran {
        let mut child = Command::new("ctr")
            .arg("-a")
            .arg(self.dir.join("ctd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr");
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let t0 = Instant::now();
        let code = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s.code().unwrap_or(-1);
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                panic!("ctr {args:?} did not finish in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ran {
            code,
            out: o.join().unwrap(),
            err: e.join().unwrap(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.ctr(args, SLOW);
        assert_eq!(
            r.code,
            0,
            "ctr {args:?}: {}{}\n{}",
            r.out,
            r.err,
            self.log()
        );
        r.out
    }

    /// `ctr run --rm` of container `id` under wisp, with `extra` options, fetching `url`
    /// with the image's wget.
    fn fetch(&self, extra: &[&str], id: &str, url: &str) -> Ran {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend([IMAGE, id, "wget", "-q", "-O", "-", url]);
        self.ctr(&args, SLOW)
    }

    /// The STATUS column of `ctr task ls` for `id`, if listed.
    fn task_status(&self, id: &str) -> Option<String> {
        self.ok(&["task", "ls"]).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    }

    fn wait_status(&self, id: &str, want: &str) {
        let t0 = Instant::now();
        loop {
            let s = self.task_status(id);
            if s.as_deref() == Some(want) {
                return;
            }
            assert!(t0.elapsed() < SLOW, "task {id} is {s:?}, not {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The shim of container `id` left no socket in /run/containerd/s/ (where containerd
    /// 1.6 names it: the SHA-256 of ADDRESS/NAMESPACE/ID).
    fn assert_no_shim_socket(&self, id: &str) {
        let key = format!("{}/default/{id}", self.dir.join("ctd.sock").display());
        let path =
            Path::new("/run/containerd/s").join(wisp_image::digest::sha256_of(key.as_bytes()));
        assert!(!path.exists(), "the shim of {id} left {}", path.display());
    }

    /// Nothing of the shim's is left: no work directory, no VM or shim process of this
    /// containerd, no mount under its state.
    fn assert_clean(&self) {
        let t0 = Instant::now();
        loop {
            let work: Vec<_> = std::fs::read_dir(self.dir.join("shim"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            let procs = processes_mentioning(&self.dir.display().to_string());
            let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&*self.dir.join("state").to_string_lossy()))
                .map(str::to_string)
                .collect();
            if work.is_empty() && procs.is_empty() && mounts.is_empty() {
                return;
            }
            let procs: Vec<String> = procs
                .iter()
                .map(|p| {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
                })
                .collect();
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "left behind: work {work:?}, processes {procs:?}, mounts {mounts:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever a failed test left running.
        for pid in processes_mentioning(&self.dir.display().to_string()) {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let state = self.dir.join("state");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&*state.to_string_lossy()) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Processes (other than this test) whose command line or environment names `text`:
/// the shims and VMs of one private containerd (`WISP_SHIM_DIR` is under its dir).
fn processes_mentioning(text: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if !matches!(
            comm.trim(),
            "wisp" | "containerd-shim" | "passt" | "passt.avx2"
        ) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |b: &[u8]| b.windows(text.len()).any(|w| w == text.as_bytes());
        if has(&cmd) || has(&env) {
            out.push(pid);
        }
    }
    out
}

/// One HTTP answer on a fresh port of `addr`, in a thread: `answer(peer)` gives the
/// body and what the thread returns. Returns the port and the thread.
fn serve_once<T: Send + 'static>(
    addr: &str,
    answer: impl FnOnce(std::net::IpAddr) -> (String, T) + Send + 'static,
) -> (u16, std::thread::JoinHandle<T>) {
    let server = TcpListener::bind((addr, 0)).unwrap();
    let port = server.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut s, peer) = server.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let (body, out) = answer(peer.ip());
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        out
    });
    (port, thread)
}

/// The command both runtimes run: output from the image's files, the environment,
/// the working directory, the user, and an exit status of its own.
const SCRIPT: &str = "echo hello from $(cat /etc/group | grep app); echo FOO=$FOO; pwd; id; \
                      cat /srv/greeting /srv/conf/a /srv/conf/sub/b; exit 3";

#[test]
fn a_container_runs_as_a_vm_with_the_output_and_exit_status_it_has_under_runc() {
    let c = Containerd::start("run");
    // Bind mounts, as Kubernetes gives /etc/hosts and secrets: a file and a tree.
    let host = c.dir.join("binds");
    std::fs::create_dir_all(host.join("conf/sub")).unwrap();
    std::fs::write(host.join("greeting"), "a bound file\n").unwrap();
    std::fs::write(host.join("conf/a"), "a bound tree\n").unwrap();
    std::fs::write(host.join("conf/sub/b"), "deeper\n").unwrap();
    let file = format!(
        "type=bind,src={},dst=/srv/greeting,options=rbind:ro",
        host.join("greeting").display()
    );
    let tree = format!(
        "type=bind,src={},dst=/srv/conf,options=rbind:ro",
        host.join("conf").display()
    );
    let run = |runtime: Option<&str>, id: &str| {
        let mut args = vec!["run", "--rm", "--env", "FOO=bar", "--cwd", "/tmp"];
        args.extend(["--mount", &file, "--mount", &tree]);
        if let Some(r) = runtime {
            args.extend(["--runtime", r]);
        }
        args.extend([IMAGE, id, "/bin/sh", "-c", SCRIPT]);
        c.ctr(&args, SLOW)
    };
    let runc = run(None, "under-runc");
    let wisp = run(Some(RUNTIME), "under-wisp");
    assert_eq!(runc.code, 3, "runc: {}{}", runc.out, runc.err);
    assert_eq!(
        runc.out,
        "hello from app:x:1000:\nFOO=bar\n/tmp\nuid=1000(app) gid=1000(app) groups=1000(app)\n\
         a bound file\na bound tree\ndeeper\n"
    );
    assert_eq!(wisp.code, 3, "wisp: {}{}\n{}", wisp.out, wisp.err, c.log());
    assert_eq!(wisp.out, runc.out, "the same bytes as under runc");
    assert_eq!(c.task_status("under-wisp"), None);
    c.assert_clean();
    c.assert_no_shim_socket("under-wisp");
}

#[test]
fn a_running_task_is_listed_paused_resumed_measured_and_killed() {
    let c = Containerd::start("life");
    let id = "long";
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "268435456",
        "--cpus",
        "2",
        IMAGE,
        id,
        "/bin/sh",
        "-c",
        "while true; do sleep 1; done",
    ]);
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"));
    // The VM's own control socket says what containerd says.
    let sock = std::fs::read_dir(c.dir.join("shim"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("api.sock"))
        .next()
        .expect("a work directory");
    let vm_state = || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("the VM's socket");
        s.write_all(b"{\"op\":\"status\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["status"].clone()
    };
    let st = vm_state();
    assert_eq!(st["cpus"], 2, "--cpus 2 gives 2 vCPUs: {st}");
    assert_eq!(
        st["memory_mib"], 256,
        "--memory-limit 256 MiB sizes the VM: {st}"
    );
    c.ok(&["task", "pause", id]);
    assert_eq!(c.task_status(id).as_deref(), Some("PAUSED"));
    assert_eq!(vm_state()["state"], "paused");
    c.ok(&["task", "resume", id]);
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"));
    assert_eq!(vm_state()["state"], "running");
    let metrics = c.ok(&["task", "metrics", id]);
    assert!(
        metrics.contains("memory.limit_in_bytes    268435456"),
        "metrics: {metrics}"
    );
    let pids = c.ok(&["task", "ps", id]);
    assert_eq!(pids.lines().count(), 2, "one process, the VM: {pids}");
    let bad = c.ctr(&["task", "exec", "--exec-id", "e1", id, "/bin/true"], SLOW);
    assert_ne!(bad.code, 0);
    assert!(bad.err.contains("exec is not supported"), "{}", bad.err);
    // The exit reaches containerd as a TaskExit event too.
    let mut events = Command::new("ctr")
        .arg("-a")
        .arg(c.dir.join("ctd.sock"))
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    std::thread::sleep(Duration::from_millis(300));
    c.ok(&["task", "kill", id]);
    c.wait_status(id, "STOPPED");
    std::thread::sleep(Duration::from_millis(300));
    let _ = events.kill();
    let mut seen = String::new();
    let _ = events.stdout.take().unwrap().read_to_string(&mut seen);
    let _ = events.wait();
    let exit = seen.lines().find(|l| l.contains("/tasks/exit"));
    assert!(
        exit.is_some_and(|l| l.contains(id) && l.contains("143")),
        "a /tasks/exit event for {id} with status 143 in: {seen}"
    );
    let deleted = c.ctr(&["task", "delete", id], SLOW);
    assert!(
        deleted.err.contains("143") || deleted.code == 0,
        "{}",
        deleted.err
    );
    c.ok(&["container", "rm", id]);
    c.assert_clean();
}

#[test]
fn a_killed_shim_ends_its_task_and_its_vm_goes() {
    let c = Containerd::start("crash");
    let id = "orphan";
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "/bin/sh",
        "-c",
        "sleep 1000",
    ]);
    let shims: Vec<i32> = processes_mentioning(&c.dir.display().to_string())
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "containerd-shim")
        })
        .collect();
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    // SAFETY: kill has no memory effects; the pid is this test's shim.
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    // containerd sees the shim go, runs `containerd-shim-wisp-v2 delete`, and the task
    // ends (it may be gone from the list already).
    let t0 = Instant::now();
    while !matches!(c.task_status(id).as_deref(), None | Some("STOPPED")) {
        assert!(t0.elapsed() < SLOW, "the task outlived its shim");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["task", "delete", id], SLOW);
    c.ok(&["container", "rm", id]);
    c.assert_clean();
    c.assert_no_shim_socket(id);
}

#[test]
fn bad_bundles_are_refused_through_ctr_with_the_reason() {
    let c = Containerd::start("bad");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--with-ns", "network:/var/run/netns/wisp-none-such"],
            "cannot open the network namespace /var/run/netns/wisp-none-such",
        ),
        (
            &[
                "--mount",
                "type=bind,src=/nonexistent-src,dst=/data,options=rbind:ro",
            ],
            "the bind mount of /nonexistent-src at /data: cannot read",
        ),
        (
            &["--memory-limit", "1048576"],
            "a wisp VM needs at least 64 MiB",
        ),
        (
            &["--mount", "type=bind,src=/usr,dst=/data,options=rbind:ro"],
            "holds more than wisp copies into a VM",
        ),
        (&["--rootfs"], "is not a directory (root.path)"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let id = format!("bad{i}");
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        // With --rootfs the "image" is a root file system path: one that is missing.
        let image = if extra.contains(&"--rootfs") {
            "/nonexistent-rootfs"
        } else {
            IMAGE
        };
        args.extend([image, &id, "/bin/true"]);
        let r = c.ctr(&args, SLOW);
        assert_ne!(r.code, 0, "{extra:?} was accepted");
        assert!(r.err.contains(want), "{extra:?}: {}", r.err);
        let _ = c.ctr(&["container", "rm", &id], SLOW);
    }
    c.assert_clean();
}

/// A namespace with a veth, as CNI leaves it: `eth0` 10.201.7.2/24 inside, the host
/// end 10.201.7.1/24 outside. Removed on drop.
struct Pod {
    ns: String,
    host_if: String,
    /// eth0's MAC as CNI left it.
    mac: String,
}

impl Pod {
    fn new() -> Pod {
        let pid = std::process::id();
        let mut p = Pod {
            ns: format!("wisp-ctd-{pid}"),
            host_if: format!("wctd{}", pid % 100_000),
            mac: String::new(),
        };
        let sh = |args: &[&str]| {
            let s = Command::new("ip").args(args).status().unwrap();
            assert!(s.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", &p.ns]).output();
        sh(&["netns", "add", &p.ns]);
        sh(&[
            "link", "add", &p.host_if, "type", "veth", "peer", "name", "eth0", "netns", &p.ns,
        ]);
        sh(&["addr", "add", "10.201.7.1/24", "dev", &p.host_if]);
        sh(&["link", "set", &p.host_if, "up"]);
        for a in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.201.7.2/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", "10.201.7.1"],
        ] {
            let mut v = vec!["-n", &p.ns];
            v.extend_from_slice(a);
            sh(&v);
        }
        let out = Command::new("ip")
            .args(["-n", &p.ns, "-o", "link", "show", "eth0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        p.mac = text
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        assert!(!p.mac.is_empty(), "eth0's MAC: {text}");
        p
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    /// No bridge, no TAP: only what CNI made, eth0 with its MAC and address.
    fn assert_as_cni_left_it(&self, when: &str) {
        let links = Command::new("ip")
            .args(["-n", &self.ns, "-o", "link", "show"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&links.stdout);
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_string()))
            .collect();
        assert_eq!(
            names,
            ["lo", "eth0"],
            "{when}: the bridge and the TAP are gone"
        );
        assert!(
            text.contains(&self.mac),
            "{when}: eth0 has its MAC back: {text}"
        );
        let addr = self.addr_of_eth0();
        assert!(
            addr.contains("10.201.7.2/24"),
            "{when}: eth0 has its address back: {addr}"
        );
    }

    fn addr_of_eth0(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn a_network_namespace_brings_the_pod_address_into_the_guest() {
    let c = Containerd::start("net");
    let pod = Pod::new();
    let host_if = pod.host_if.clone();
    let (port, serve) = serve_once("10.201.7.1", move |peer| {
        // While the guest is up (the namespace's restore later flaps the veth, and the
        // host forgets its neighbours): the host's entry for the pod's address.
        let neigh = Command::new("ip")
            .args(["neigh", "show", "10.201.7.2", "dev", &host_if])
            .output()
            .unwrap();
        let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
        (format!("seen from {peer}"), neigh)
    });
    let ns = format!("network:{}", pod.path());
    let url = format!("http://10.201.7.1:{port}/");
    let r = c.fetch(&["--with-ns", &ns], "netpod", &url);
    assert_eq!(r.code, 0, "{}{}\n{}", r.out, r.err, c.log());
    assert_eq!(
        r.out, "seen from 10.201.7.2",
        "the guest has the pod's address"
    );
    // The guest speaks with the veth's MAC, so the host's entry for the pod's address
    // stays right.
    let neigh = serve.join().unwrap();
    assert!(
        neigh.contains(&pod.mac),
        "the host's neighbour entry: {neigh:?}, eth0's MAC {}",
        pod.mac
    );
    pod.assert_as_cni_left_it("after a run");
    // SIGKILL reaches wisp itself, which then cannot remove its TAP: the shim does.
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &ns,
        IMAGE,
        "killed",
        "sleep",
        "1000",
    ]);
    c.ok(&["task", "kill", "-s", "SIGKILL", "killed"]);
    c.wait_status("killed", "STOPPED");
    let deleted = c.ctr(&["task", "delete", "killed"], SLOW);
    assert!(
        deleted.err.contains("137") || deleted.code == 0,
        "{}",
        deleted.err
    );
    c.ok(&["container", "rm", "killed"]);
    pod.assert_as_cni_left_it("after a SIGKILL");
    c.assert_clean();
}

#[test]
fn a_pod_sandbox_holds_its_network_namespace_without_a_vm() {
    let c = Containerd::start("sandbox");
    let pod = Pod::new();
    let ns = format!("network:{}", pod.path());
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--with-ns",
        &ns,
        IMAGE,
        "pause",
        "/pause",
    ]);
    let pids = c.ok(&["task", "ps", "pause"]);
    let pid: i32 = pids
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap();
    let ino = |p: &str| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    assert_eq!(
        ino(&format!("/proc/{pid}/ns/net")),
        ino(&pod.path()),
        "it holds the pod's namespace"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "containerd-shim"
    );
    c.ok(&["task", "kill", "pause"]);
    c.wait_status("pause", "STOPPED");
    let _ = c.ctr(&["task", "delete", "pause"], SLOW);
    c.ok(&["container", "rm", "pause"]);
    c.assert_clean();
}

#[test]
fn without_a_network_namespace_the_vm_gets_user_mode_nat() {
    let c = Containerd::start("nat");
    // passt's gateway address (10.0.2.2) reaches the host's loopback.
    let (port, serve) = serve_once("127.0.0.1", |_| ("from nat".to_string(), ()));
    let url = format!("http://10.0.2.2:{port}/");
    let r = c.fetch(&[], "natpod", &url);
    assert_eq!(r.code, 0, "{}{}\n{}", r.out, r.err, c.log());
    assert_eq!(r.out, "from nat");
    serve.join().unwrap();
    c.assert_clean();
}
