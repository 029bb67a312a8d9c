//! `wisp run --image REF [-- CMD...]`: an OCI or Docker image as a microVM. The image
//! becomes a cached ext4 disk (the `wisp-image` crate); the guest boots the default
//! kernel with wisp's image init (target/guest/image-init.cpio) and a second cpio
//! holding the process to run, mounts the disk read-only under a tmpfs overlay, and
//! its process's exit status becomes wisp's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use devices::virtio::block::BlockConfig;
use wisp_image::bundle::Copy;
use wisp_image::cpio::{self, Entry};
use wisp_image::process::{self, Overrides};
use wisp_image::{convert, ImageRef};

/// The serial of the image's disk; the guest's init mounts it (the first disk).
const IMAGE_DISK_ID: &str = "wisp-image";

/// The image options of `wisp run`.
#[derive(Args, Clone, Debug, Default)]
pub struct ImageArgs {
    /// Run an image instead of a kernel's own userland: `oci:DIR[:TAG]` (an OCI image
    /// layout, as `skopeo copy` writes), `docker-archive:FILE` (`docker save`), or
    /// `dir:PATH` (an unpacked root file system; give the command after --), or
    /// `bundle:DIR` (an OCI runtime bundle as `runc run` takes: DIR/config.json gives the
    /// process, user, environment and host name; its root is packed for this run). The
    /// image is converted once into an ext4 disk cached under $XDG_CACHE_HOME/wisp/images
    /// (default ~/.cache/wisp/images); the VM sees it read-only with its writes in a
    /// tmpfs, gone when it exits. wisp exits with the process's status.
    #[arg(long, value_name = "REF", conflicts_with = "initrd")]
    pub image: Option<String>,

    /// With --image: an environment variable for the process, on top of the image's
    /// (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", requires = "image", value_parser = env_var)]
    pub env: Vec<String>,

    /// With --image: forward host port HOSTPORT (on 127.0.0.1) to GUESTPORT, as
    /// `docker run -p` (repeatable); gives the VM a user-mode network card if it has
    /// none (the same as `--net user,hostfwd=tcp::HOSTPORT-:GUESTPORT`).
    #[arg(long, value_name = "HOSTPORT:GUESTPORT", requires = "image", value_parser = publish)]
    pub publish: Vec<(u16, u16)>,

    /// With --image: the command to run instead of the image's Cmd (after `--`, as for
    /// `docker run IMAGE CMD...`; the image's Entrypoint stays).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn env_var(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((name, _)) if !name.is_empty() && !s.contains('\0') => Ok(s.to_string()),
        _ => Err("expected NAME=VALUE, e.g. --env DEBUG=1".into()),
    }
}

fn publish(s: &str) -> Result<(u16, u16), String> {
    let bad =
        || format!("expected HOSTPORT:GUESTPORT with ports 1 to 65535, e.g. 8080:80 (not {s:?})");
    let (h, g) = s.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    Ok((port(h).ok_or_else(bad)?, port(g).ok_or_else(bad)?))
}

/// What an image run adds to the VM.
pub struct ImageBoot {
    /// The per-run initramfs (image init + the process), removed after the VM is built.
    pub initrd: PathBuf,
    /// The image's disk, read-only, first.
    pub disk: BlockConfig,
    /// Words for the kernel command line.
    pub cmdline: String,
    /// A disk made for this run only (`dir:` images), removed at exit.
    pub scratch_disk: Option<PathBuf>,
}

/// `--net` with `--publish` folded in: the forwards go onto the first user-mode card,
/// or onto a new one.
pub fn nets_with_publish(nets: &[String], publish: &[(u16, u16)]) -> Vec<String> {
    let mut nets = nets.to_vec();
    if publish.is_empty() {
        return nets;
    }
    let fwd: String = publish
        .iter()
        .map(|(h, g)| format!(",hostfwd=tcp::{h}-:{g}"))
        .collect();
    match nets
        .iter_mut()
        .find(|n| *n == "user" || n.starts_with("user,"))
    {
        Some(n) => n.push_str(&fwd),
        None => nets.push(format!("user{fwd}")),
    }
    nets
}

/// A plain file of `root` as text (see [`convert::read_plain`]), for /etc/passwd.
fn read_plain(root: &Path, rel: &str) -> Option<String> {
    convert::read_plain(root, rel).and_then(|b| String::from_utf8(b).ok())
}

/// Opens image `r` (an OCI layout or a docker archive), checks that it has a command,
/// converts it into the cache (or finds it there) and resolves its process against
/// its own passwd and group: what `wisp run --image` and `wisp bench --image` share.
/// `progress` gets the conversion's lines.
pub fn convert_image(
    r: &ImageRef,
    over: &Overrides,
    progress: &mut dyn FnMut(&str),
) -> Result<(convert::Converted, process::Process)> {
    let image = wisp_image::source::open(r)?;
    process::command(&image.config, over)?;
    let exe = std::env::current_exe().context("cannot find the wisp binary")?;
    let helper = |root: &Path, limit: u64| {
        let mut c = Command::new(&exe);
        c.arg("__image-layer").arg(root).arg(limit.to_string());
        c
    };
    let done = convert::ensure(&image, &convert::default_cache(), &helper, progress)?;
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let p = process::resolve(
        &image.config,
        over,
        read(done.entry.passwd()).as_deref(),
        read(done.entry.group()).as_deref(),
    )?;
    Ok((done, p))
}

/// Packs the root file system `root` (of a `dir:` image or a bundle) into a disk for this
/// run only, in `work_dir`.
fn pack_scratch(root: &Path, work_dir: &Path, hostname: &str) -> Result<PathBuf> {
    let disk = work_dir.join(format!("{hostname}.rootfs.ext4"));
    log::info!("image: packing {} into ext4 (not cached)", root.display());
    convert::pack_dir(root, &disk)?;
    Ok(disk)
}

/// Converts (or finds converted) the image and writes the run's initramfs to
/// `work_dir`. `guest_dir` holds image-init.cpio; `hostname` is the VM's name.
pub fn prepare(
    args: &ImageArgs,
    reference: &str,
    guest_dir: &Path,
    work_dir: &Path,
    hostname: &str,
    user_net: bool,
) -> Result<ImageBoot> {
    let r = ImageRef::parse(reference)?;
    let init = guest_dir.join("image-init.cpio");
    if !init.is_file() {
        bail!(
            "--image needs wisp's image init ({} is missing): run scripts/build-guest.sh",
            init.display()
        );
    }
    let over = Overrides {
        cmd: args.command.clone(),
        env: args.env.clone(),
        hostname: hostname.to_string(),
    };
    let mut guest_hostname = hostname.to_string();
    // Bind-mounted files (bundles): `dir`/`file` keys for the init, and the files,
    // which go into the cpio as wisp/files/N.
    let mut bind_keys = Vec::new();
    let mut files = Vec::new();
    let (disk, proc, scratch_disk) = match &r {
        ImageRef::Dir(root) => {
            if !root.is_dir() {
                bail!("image {r}: {} is not a directory", root.display());
            }
            let config = wisp_image::process::empty_config();
            process::command(&config, &over)?;
            let p = process::resolve(
                &config,
                &over,
                read_plain(root, "etc/passwd").as_deref(),
                read_plain(root, "etc/group").as_deref(),
            )?;
            let disk = pack_scratch(root, work_dir, hostname)?;
            (disk.clone(), p, Some(disk))
        }
        ImageRef::Bundle(dir) => {
            if !args.command.is_empty() || !args.env.is_empty() {
                bail!("image {r}: a bundle's config.json gives the command and environment: leave out -- CMD and --env");
            }
            let b = wisp_image::Bundle::open(dir)?;
            guest_hostname = b.hostname.clone();
            // Read before the packing: a file that cannot be read is an error, not a
            // slow one.
            for c in &b.copies {
                match c {
                    Copy::Dir(guest) => process::put_pair(&mut bind_keys, "dir", guest),
                    Copy::File(host, guest, mode) => {
                        let data = std::fs::read(host).with_context(|| {
                            format!("cannot read {} (bind-mounted at {guest})", host.display())
                        })?;
                        process::put_pair(&mut bind_keys, "file", &format!("{mode:o} {guest}"));
                        files.push((format!("wisp/files/{}", files.len()), *mode, data));
                    }
                }
            }
            let disk = pack_scratch(&b.rootfs, work_dir, hostname)?;
            (disk.clone(), b.process, Some(disk))
        }
        _ => {
            let (done, p) = convert_image(&r, &over, &mut |line| log::info!("{line}"))?;
            if done.converted {
                log::info!(
                    "image: {r} converted in {:.1} s into {}",
                    done.took.as_secs_f64(),
                    done.entry.dir.display()
                );
            }
            (done.entry.disk(), p, None)
        }
    };
    let mut run = process::run_file(&proc, "/dev/vda", &guest_hostname);
    run.extend(bind_keys);
    if run.len() > process::MAX_RUN_FILE {
        bail!(
            "image {r}: its command, environment and bind mounts take {} bytes; wisp passes at most {}",
            run.len(),
            process::MAX_RUN_FILE
        );
    }
    let mut initrd_bytes =
        std::fs::read(&init).with_context(|| format!("cannot read {}", init.display()))?;
    let mut entries = vec![
        Entry::Dir {
            path: "wisp",
            mode: 0o755,
        },
        Entry::File {
            path: "wisp/run",
            mode: 0o600,
            data: &run,
        },
        Entry::Dir {
            path: "wisp/files",
            mode: 0o700,
        },
    ];
    entries.extend(files.iter().map(|(path, mode, data)| Entry::File {
        path,
        mode: *mode,
        data,
    }));
    // Linux unpacks concatenated cpio archives one after the other.
    initrd_bytes.extend(cpio::archive(&entries));
    let initrd = work_dir.join(format!("{hostname}.image-initrd"));
    std::fs::write(&initrd, initrd_bytes)
        .with_context(|| format!("cannot write {}", initrd.display()))?;
    let mut cmdline = "quiet".to_string();
    if user_net {
        cmdline.push_str(" ip=dhcp");
    }
    Ok(ImageBoot {
        initrd,
        disk: BlockConfig {
            path: disk,
            read_only: true,
            id: IMAGE_DISK_ID.to_string(),
        },
        cmdline,
        scratch_disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_env_parse() {
        assert_eq!(publish("8080:80"), Ok((8080, 80)));
        for bad in ["8080", "0:80", "80:", "a:b", "70000:80"] {
            assert!(publish(bad).is_err(), "{bad}");
        }
        assert!(env_var("A=1").is_ok() && env_var("A=").is_ok());
        assert!(env_var("=1").is_err() && env_var("A").is_err());
    }

    #[test]
    fn publish_joins_the_user_card_or_makes_one() {
        assert_eq!(
            nets_with_publish(&["tap=t0".into(), "user".into()], &[(8080, 80)]),
            ["tap=t0", "user,hostfwd=tcp::8080-:80"]
        );
        assert_eq!(
            nets_with_publish(&[], &[(1, 2), (3, 4)]),
            ["user,hostfwd=tcp::1-:2,hostfwd=tcp::3-:4"]
        );
        assert!(nets_with_publish(&["tap=t0".into()], &[]) == ["tap=t0"]);
    }
}
