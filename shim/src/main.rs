//! `containerd-shim-wisp-v2`: containerd's runtime `io.containerd.wisp.v2`. containerd
//! starts it once per container; it serves the shim v2 task API and runs the container
//! as a wisp microVM (the `wisp` binary next to it). README, "containerd and Kubernetes".

mod container;
mod netns;
mod rootfs;
mod service;

/// The hidden first argument of the process that holds a pod sandbox's network
/// namespace (a Kubernetes pod's "pause" container has no VM).
pub const HOLD_ARG: &str = "__hold-netns";

fn main() {
    if std::env::args().nth(1).as_deref() == Some(HOLD_ARG) {
        // The shim entered the namespace before exec; wait for the kill.
        loop {
            // SAFETY: pause has no preconditions; it returns when a signal arrives.
            unsafe { libc::pause() };
        }
    }
    containerd_shim::run::<service::Service>("io.containerd.wisp.v2", Some(service::config()));
}
