//! The targets' bodies, one module each; `fuzz_targets/NAME.rs` only calls `run`.
//! Living here, they are built by `cargo test` too, which runs every seed through them.

pub mod api;
pub mod block;
pub mod chain;
pub mod cli;
pub mod memory_file;
pub mod migration;
pub mod mmio;
pub mod net;
pub mod state;
