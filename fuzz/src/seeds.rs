//! The seed corpus: a few well-formed inputs per target, written by the encoders here.
//!
//! `WISP_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml seeds` writes
//! them to `fuzz/corpus/TARGET/NAME`; without the variable the test checks that the
//! committed files are these, and that every seed runs through its target cleanly.

mod devices;
mod machine;

pub use self::devices::{block, chain, mmio, net};
pub use self::machine::{api, cli, memory_file, migration, state};

/// Every seed: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (target, seeds) in [
        ("chain", chain()),
        ("block", block()),
        ("net", net()),
        ("mmio", mmio()),
        ("state", state()),
        ("memory_file", memory_file()),
        ("migration", migration()),
        ("api", api()),
        ("cli", cli()),
    ] {
        out.extend(seeds.into_iter().map(|(name, bytes)| (target, name, bytes)));
    }
    out
}

/// Runs `data` through target `name`.
pub fn run(target: &str, data: &[u8]) {
    use crate::targets;
    match target {
        "chain" => targets::chain::run(data),
        "block" => targets::block::run(data),
        "net" => targets::net::run(data),
        "mmio" => targets::mmio::run(data),
        "state" => targets::state::run(data),
        "memory_file" => targets::memory_file::run(data),
        "migration" => targets::migration::run(data),
        "api" => targets::api::run(data),
        "cli" => targets::cli::run(data),
        other => panic!("no target {other}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
    }

    #[test]
    fn seeds_are_committed_and_run_clean() {
        let write = std::env::var_os("WISP_FUZZ_WRITE_SEEDS").is_some();
        for (target, name, bytes) in super::all() {
            let path = corpus().join(target).join(name);
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e}; write the seeds (see seeds.rs)", path.display())
            });
            assert!(
                committed == bytes,
                "{} is stale; write the seeds again",
                path.display()
            );
            super::run(target, &bytes);
        }
    }
}
