//! Shared pieces of wisp's fuzz targets (`fuzz_targets/`): an input reader, a guest
//! memory the fuzzer fills, a virtqueue laid out in it, an in-memory network backend,
//! and the encoders that write the seed corpus (`seeds`).
//!
//! Every target decodes its input with [`input::Input`], which never fails: bytes past
//! the end read as zero, so any input is a valid (if dull) run.

pub mod backend;
pub mod disk;
pub mod input;
pub mod memory;
pub mod ring;
pub mod seeds;
pub mod targets;
