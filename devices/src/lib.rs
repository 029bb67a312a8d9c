//! Device models for wisp.
//!
//! This crate never depends on the VMM: devices talk to the outside world through
//! [`bus::BusDevice`] (guest accesses), `EventFd`s (interrupts and notifications) and
//! callbacks such as [`stop::StopCallback`]. Device state that must survive a snapshot or
//! a migration is exposed as plain serde structs.

pub mod bus;
pub mod host_file;
pub mod legacy;
pub mod stop;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusRange};
pub use stop::{StopCallback, StopReason};
