//! The process an image runs, as `docker run` would start it: Entrypoint + Cmd (a
//! command given on wisp's command line replaces Cmd), the image's Env with `--env`
//! on top, WorkingDir, and User resolved against the image's own /etc/passwd and
//! /etc/group. Written for the guest's init as `/wisp/run`.

use oci_spec::image::ImageConfiguration;

use crate::ImageError;

/// At most this many argv words, and as many variables: the guest's init has room
/// for 512 of each (guest/image-init/init.c, MAX_WORDS).
pub const MAX_WORDS: usize = 512;
/// At most this many supplementary groups (init.c, MAX_GROUPS).
pub const MAX_GROUPS: usize = 64;
/// The largest `/wisp/run` the guest's init reads whole (its buffer is 256 KiB).
pub const MAX_RUN_FILE: usize = 255 * 1024;

/// PATH when the image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the guest runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// argv; the first word is the program (searched in PATH when it has no '/').
    pub args: Vec<String>,
    /// NAME=value.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (`setgroups`); none for images, as `docker run` without
    /// `--group-add`.
    pub groups: Vec<u32>,
    /// Whether the console stays a terminal for the process (echo, line editing,
    /// "\n" written as "\r\n"); false: the guest's init puts it in raw mode, so its
    /// bytes pass unchanged, as through a pipe.
    pub terminal: bool,
}

/// What the user asked for on top of the image.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// The command after `--`, replacing the image's Cmd; empty: the image's.
    pub cmd: Vec<String>,
    /// `--env NAME=value`, in order.
    pub env: Vec<String>,
    /// The guest's host name (also `HOSTNAME` in the environment).
    pub hostname: String,
}

fn bad(why: String) -> ImageError {
    ImageError::Malformed {
        what: "the image's config".into(),
        why,
    }
}

/// One `name:x:id:gid:...` line's fields of a passwd or group file.
fn lookup<'a>(file: Option<&'a str>, name: &str) -> Option<Vec<&'a str>> {
    file?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[0] == name)
}

fn by_id(file: Option<&str>, id: u32) -> Option<Vec<&str>> {
    file?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[2].parse::<u32>().ok() == Some(id))
}

/// Resolves the image's `User` ("", "uid", "name", "uid:gid", "name:group").
fn user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32, Option<String>), ImageError> {
    if spec.is_empty() {
        return Ok((0, 0, Some("/root".into())));
    }
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, entry) = match u.parse::<u32>() {
        Ok(id) => (id, by_id(passwd, id)),
        Err(_) => {
            let e = lookup(passwd, u)
                .ok_or_else(|| bad(format!("user {u:?} is not in the image's /etc/passwd")))?;
            let id = e[2]
                .parse()
                .map_err(|_| bad(format!("user {u:?} has uid {:?} in /etc/passwd", e[2])))?;
            (id, Some(e))
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => {
                let e = lookup(group, g)
                    .ok_or_else(|| bad(format!("group {g:?} is not in the image's /etc/group")))?;
                e[2].parse()
                    .map_err(|_| bad(format!("group {g:?} has gid {:?} in /etc/group", e[2])))?
            }
        },
        None => entry
            .as_ref()
            .and_then(|e| e.get(3)?.parse().ok())
            .unwrap_or(0),
    };
    let home = entry.and_then(|e| e.get(5).map(|h| h.to_string()));
    Ok((uid, gid, home))
}

/// The command line: Entrypoint + Cmd, or Entrypoint + the command of `over`. Checked
/// before an image is converted (it needs nothing from the layers).
pub fn command(config: &ImageConfiguration, over: &Overrides) -> Result<Vec<String>, ImageError> {
    let c = config.config().as_ref();
    let entrypoint = c.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = if over.cmd.is_empty() {
        c.and_then(|c| c.cmd().clone()).unwrap_or_default()
    } else {
        over.cmd.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(bad(
            "it has no command (no Entrypoint or Cmd): give one after `--`".into(),
        ));
    }
    Ok(args)
}

/// The process `config` describes, with `over` applied; `passwd` and `group` are the
/// image's files, if it has them.
pub fn resolve(
    config: &ImageConfiguration,
    over: &Overrides,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<Process, ImageError> {
    let c = config.config().as_ref();
    let args = command(config, over)?;
    let cwd = c
        .and_then(|c| c.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(bad(format!("WorkingDir {cwd:?} is not absolute")));
    }
    let spec = c.and_then(|c| c.user().clone()).unwrap_or_default();
    let (uid, gid, home) = user(&spec, passwd, group)?;
    let mut env: Vec<String> = c.and_then(|c| c.env().clone()).unwrap_or_default();
    let mut set = |kv: &str, replace: bool| {
        let name = kv.split('=').next().unwrap_or("");
        match env.iter().position(|e| e.split('=').next() == Some(name)) {
            Some(i) if replace => env[i] = kv.to_string(),
            Some(_) => {}
            None => env.push(kv.to_string()),
        }
    };
    set(&format!("PATH={DEFAULT_PATH}"), false);
    set(&format!("HOSTNAME={}", over.hostname), true);
    if let Some(h) = home.filter(|h| !h.is_empty()) {
        set(&format!("HOME={h}"), false);
    }
    for kv in &over.env {
        set(kv, true);
    }
    let p = Process {
        args,
        env,
        cwd,
        uid,
        gid,
        groups: Vec::new(),
        terminal: true,
    };
    check(&p, &over.hostname)?;
    Ok(p)
}

/// Checks what the guest's init can take: no NUL byte, at most [`MAX_WORDS`] words and
/// variables, and a `/wisp/run` of at most [`MAX_RUN_FILE`] bytes.
pub fn check(p: &Process, hostname: &str) -> Result<(), ImageError> {
    if p.args
        .iter()
        .chain(&p.env)
        .chain([&p.cwd])
        .any(|s| s.contains('\0'))
    {
        return Err(bad(
            "a command word, variable or directory holds a NUL byte".into(),
        ));
    }
    if p.args.len() > MAX_WORDS || p.env.len() > MAX_WORDS {
        return Err(bad(format!(
            "{} command words and {} variables; wisp passes at most {MAX_WORDS} of each",
            p.args.len(),
            p.env.len()
        )));
    }
    let size = run_file(p, "/dev/vda", hostname).len();
    if size > MAX_RUN_FILE {
        return Err(bad(format!(
            "its command and environment take {size} bytes; wisp passes at most {MAX_RUN_FILE}"
        )));
    }
    Ok(())
}

/// The config of an image that has none (`dir:`): the command comes from wisp's
/// command line.
pub fn empty_config() -> ImageConfiguration {
    ImageConfiguration::default()
}

/// Appends one key and value to a `/wisp/run` file.
pub fn put_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(0);
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// The `/wisp/run` file for the guest's init: NUL-ended key and value pairs.
pub fn run_file(p: &Process, disk: &str, hostname: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |k: &str, v: &str| put_pair(&mut out, k, v);
    put("disk", disk);
    put("hostname", hostname);
    put("cwd", &p.cwd);
    put("uid", &p.uid.to_string());
    put("gid", &p.gid.to_string());
    for g in &p.groups {
        put("group", &g.to_string());
    }
    if !p.terminal {
        put("tty", "raw");
    }
    for a in &p.args {
        put("arg", a);
    }
    for e in &p.env {
        put("env", e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> ImageConfiguration {
        let full = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [] },
            "config": json
        });
        serde_json::from_value(full).unwrap()
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\napp:x:1001:\n";

    fn over(cmd: &[&str], env: &[&str]) -> Overrides {
        Overrides {
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            hostname: "vm1".into(),
        }
    }

    #[test]
    fn entrypoint_cmd_env_workdir_and_user_as_docker_run() {
        let c = config(serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
            "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/srv", "User": "app"
        }));
        let p = resolve(&c, &over(&[], &["A=2", "B=3"]), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            p.env,
            ["PATH=/bin", "A=2", "HOSTNAME=vm1", "HOME=/home/app", "B=3"]
        );
        assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/srv", 1000, 1001));
        let p = resolve(
            &c,
            &over(&["echo", "other"], &[]),
            Some(PASSWD),
            Some(GROUP),
        )
        .unwrap();
        assert_eq!(
            p.args,
            ["/bin/sh", "-c", "echo", "other"],
            "-- CMD replaces Cmd only"
        );
    }

    #[test]
    fn users_numeric_named_and_with_groups() {
        let u = |s| user(s, Some(PASSWD), Some(GROUP)).map(|(u, g, _)| (u, g));
        assert_eq!(u("").unwrap(), (0, 0));
        assert_eq!(u("1000").unwrap(), (1000, 1001));
        assert_eq!(u("4242").unwrap(), (4242, 0));
        assert_eq!(u("app:staff").unwrap(), (1000, 50));
        assert_eq!(u("1000:7").unwrap(), (1000, 7));
        assert!(u("nobody").unwrap_err().to_string().contains("/etc/passwd"));
        assert!(u("app:wheel")
            .unwrap_err()
            .to_string()
            .contains("/etc/group"));
    }

    #[test]
    fn no_command_and_relative_workdir_are_refused() {
        let e = resolve(&config(serde_json::json!({})), &over(&[], &[]), None, None).unwrap_err();
        assert!(e.to_string().contains("give one after `--`"), "{e}");
        let c = config(serde_json::json!({"Cmd": ["x"], "WorkingDir": "srv"}));
        assert!(resolve(&c, &over(&[], &[]), None, None).is_err());
        let p = resolve(
            &config(serde_json::json!({})),
            &over(&["ls"], &[]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.cwd, "/");
    }

    #[test]
    fn more_words_than_the_guest_takes_are_refused() {
        let c = config(serde_json::json!({}));
        let many: Vec<String> = (0..=MAX_WORDS).map(|i| i.to_string()).collect();
        let o = Overrides {
            cmd: many,
            ..over(&[], &[])
        };
        assert!(resolve(&c, &o, None, None)
            .unwrap_err()
            .to_string()
            .contains("at most 512"));
        let o = Overrides {
            cmd: vec!["x".repeat(MAX_RUN_FILE)],
            ..over(&[], &[])
        };
        assert!(resolve(&c, &o, None, None)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
    }

    #[test]
    fn the_run_file_is_key_value_pairs() {
        let p = Process {
            args: vec!["ls".into(), "-l".into()],
            env: vec!["A=1".into()],
            cwd: "/".into(),
            uid: 1,
            gid: 2,
            groups: vec![4, 5],
            terminal: true,
        };
        let f = run_file(&p, "/dev/vda", "h");
        let words: Vec<&[u8]> = f.split(|b| *b == 0).collect();
        assert_eq!(words.len() % 2, 1, "pairs, then the empty tail");
        let text: Vec<String> = words
            .iter()
            .map(|w| String::from_utf8_lossy(w).into())
            .collect();
        assert_eq!(
            text[..text.len() - 1],
            [
                "disk", "/dev/vda", "hostname", "h", "cwd", "/", "uid", "1", "gid", "2", "group",
                "4", "group", "5", "arg", "ls", "arg", "-l", "env", "A=1"
            ]
        );
    }
}
