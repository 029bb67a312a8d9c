//! wisp: a small, fast KVM virtual machine monitor.
//!
//! See ARCHITECTURE.md at the repository root for the big picture.

pub mod api;
pub mod arch;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod doctor;
pub mod event_loop;
pub mod host;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod outcome;
pub mod restore;
pub mod run_control;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod usernet;
pub mod vcpu;
pub mod vm;
