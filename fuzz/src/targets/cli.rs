//! `cli`: the option parsers of `wisp run` and friends: `--disk`
//! (`vmm::config::parse_disk`), `--net` (`parse_net`, with `user`'s options and
//! `hostfwd=` from `vmm::usernet`), `--console` (`ConsoleSpec`), a migration's `--to`
//! address and `--on-timeout`.
//!
//! Input: a selector byte, then the option's value (UTF-8, as clap hands it over).
//! Oracles: a forward shown as a spec parses back to itself; a parsed `--net user`
//! configuration gives passt its arguments; an accepted disk is one `validate` accepts.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use vmm::config::{self, NetBackend, VmConfig};
use vmm::console::ConsoleSpec;
use vmm::migration::{Address, OnTimeout};
use vmm::usernet::{self, UserNetConfig};

use super::state::LIMITS;

fn check_user(cfg: &UserNetConfig) {
    for f in &cfg.forwards {
        let spec = f.spec();
        let again = usernet::parse_hostfwd(&spec, cfg.guest)
            .unwrap_or_else(|e| panic!("{spec} (shown) does not parse: {e}"));
        assert_eq!(&again, f, "{spec}");
    }
    let _ = usernet::passt_args(cfg, 3);
}

fn machine(
    disks: Vec<devices::virtio::block::BlockConfig>,
    nets: Vec<config::NetConfig>,
) -> VmConfig {
    VmConfig {
        name: "fuzz".into(),
        kernel: PathBuf::from("/vmlinux"),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory_mib: 64,
        disks,
        nets,
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(disk) = config::parse_disk(value) {
                let m = machine(vec![disk], vec![]);
                m.validate(&LIMITS)
                    .unwrap_or_else(|e| panic!("--disk {value} parsed but does not validate: {e}"));
            }
        }
        1 => {
            if let Ok(net) = config::parse_net(value) {
                if let NetBackend::User(cfg) = &net.backend {
                    check_user(cfg);
                }
                let m = machine(vec![], vec![net]);
                m.validate(&LIMITS)
                    .unwrap_or_else(|e| panic!("--net {value} parsed but does not validate: {e}"));
            }
        }
        2 => {
            let guest = Ipv4Addr::new(10, 0, 2, 15);
            if let Ok(f) = usernet::parse_hostfwd(value, guest) {
                let cfg = UserNetConfig {
                    forwards: vec![f],
                    ..UserNetConfig::default()
                };
                check_user(&cfg);
            }
        }
        3 => {
            let _ = value.parse::<ConsoleSpec>();
        }
        4 => {
            if let Ok(cfg) = usernet::parse_options(value.split(',')) {
                check_user(&cfg);
            }
        }
        5 => {
            if let Ok(a) = value.parse::<Address>() {
                let shown = a.to_string();
                assert!(
                    shown.parse::<Address>().is_ok(),
                    "{shown} (shown) does not parse"
                );
            }
        }
        _ => {
            let _ = value.parse::<OnTimeout>();
        }
    }
}
