//! The control-socket clients: `wisp ls`, `status`, `pause`, `resume`, `stop`, and
//! `wisp doctor`.

use anyhow::{Context, Result};
use clap::Args;
use vmm::host;

#[derive(Args)]
#[command(after_long_help = "\
A running VM is found by its control socket: $XDG_RUNTIME_DIR/wisp/NAME.sock, else
/run/wisp/NAME.sock for root, else /tmp/wisp-$UID/NAME.sock. The protocol is one line
of JSON each way, e.g. {\"op\":\"status\"}; see the Control socket section of the README.")]
pub struct Target {
    /// The VM's --name, or the path of its control socket (anything with a '/').
    name: String,
}

pub fn control(target: &Target, req: vmm::api::Request) -> Result<u8> {
    let s = vmm::api::call(&target.name, &req)?
        .status
        .context("the VM answered without a status")?;
    match req {
        vmm::api::Request::Status => print_status(&[s]),
        _ => println!(
            "{}: {}",
            s.name,
            if req == vmm::api::Request::Stop {
                "stopping"
            } else {
                &s.state
            }
        ),
    }
    Ok(0)
}

fn print_status(list: &[vmm::api::Status]) {
    println!(
        "{:<20} {:<8} {:>5} {:>10} {:>10} {:>8}",
        "NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "PID"
    );
    for s in list {
        let up = s.uptime_s as u64;
        println!(
            "{:<20} {:<8} {:>5} {:>7} MiB {:>10} {:>8}",
            s.name,
            s.state,
            s.cpus,
            s.memory_mib,
            format!("{}:{:02}:{:02}", up / 3600, up / 60 % 60, up % 60),
            s.pid
        );
        if let Some(p) = &s.migration {
            println!("  {}", super::migrate::bar(p));
        }
    }
}

pub fn ls() -> Result<u8> {
    let listing = vmm::api::list();
    let running: Vec<_> = listing.running.into_iter().map(|(_, s)| s).collect();
    print_status(&running);
    for path in &listing.removed {
        eprintln!(
            "wisp: removed stale control socket {} (the wisp that made it is gone)",
            path.display()
        );
    }
    for (path, e) in &listing.failed {
        eprintln!("wisp: {}: {e}", path.display());
    }
    Ok(0)
}

pub fn doctor() -> Result<u8> {
    let kvm = host::open_kvm()?;
    let report = vmm::doctor::run(&kvm, vmm::doctor::DOCTOR_ITERATIONS);
    print!("{}", report.text);
    Ok(if report.ok { 0 } else { 1 })
}
