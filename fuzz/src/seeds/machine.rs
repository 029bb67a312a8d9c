//! Seeds of the VMM targets: a snapshot state, memory files, a migration stream,
//! control requests, command-line options.

use std::path::PathBuf;

use devices::legacy::{I8042State, SerialSnapshot};
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::Net;
use devices::virtio::persist::TransportState;
use devices::virtio::VirtioDevice;
use devices::BusDevice;
use vmm::arch::layout::ram_ranges;
use vmm::arch::vcpu_state::{FpuState, Msr, VcpuState};
use vmm::arch::vm_state::VmState;
use vmm::config::{NetBackend, NetConfig, VmConfig};
use vmm::migration::protocol::{self, Hello, Kind, PageBatch, PageDigest};
use vmm::snapshot::memory_file::{MemoryInfo, RegionInfo};
use vmm::snapshot::SnapshotState;
use vmm::state::format::{self, crc64_digest, FORMAT_VERSION};
use vmm::state::{DevicesState, MachineState};
use vmm::usernet::UserNetConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::ScriptedBackend;
use crate::disk;
use crate::input::Writer;
use crate::memory::guest_memory;
use crate::ring::layout;

type Seeds = Vec<(&'static str, Vec<u8>)>;

const MAC: devices::virtio::net::MacAddr =
    devices::virtio::net::MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const MEMORY_MIB: u64 = 16;

/// A transport over `dev` driven to DRIVER_OK, queue `i` of 8 entries at `0x100 * i`.
fn running(dev: Box<dyn VirtioDevice>, features: u64) -> TransportState {
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let queues = dev.queue_max_sizes().len();
    let mut t = MmioTransport::new(dev, guest_memory(), irq).expect("a transport");
    let mut w = |off: u64, v: u32| t.write(0, off, &v.to_le_bytes());
    w(0x70, 3);
    w(0x24, 0);
    w(0x20, features as u32);
    w(0x24, 1);
    w(0x20, (features >> 32) as u32);
    w(0x70, 0xb);
    for i in 0..queues {
        let (desc, avail, used) = layout(8, 0x100 * i as u64);
        w(0x30, i as u32);
        w(0x38, 8);
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            w(off, addr as u32);
            w(off + 4, 0);
        }
        w(0x44, 1);
    }
    w(0x70, 0xf);
    t.save()
}

fn config() -> VmConfig {
    VmConfig {
        name: "fuzz".into(),
        kernel: PathBuf::from("/vmlinux"),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        cpus: 1,
        memory_mib: MEMORY_MIB,
        // Any path: the targets restore a disk's state into their own image.
        disks: vec![devices::virtio::block::BlockConfig {
            path: PathBuf::from("/var/lib/wisp/disk.img"),
            read_only: false,
            id: "vda".into(),
        }],
        nets: vec![NetConfig {
            backend: NetBackend::User(UserNetConfig::default()),
            mac: Some(MAC),
        }],
    }
}

/// A consistent machine state: one vCPU, a running disk and network card.
fn machine() -> MachineState {
    disk::reset(false);
    let block = Block::open_unlocked(&disk::config(false), "seed-blk".into()).expect("the disk");
    let net = Net::new(
        "seed-net".into(),
        Box::new(ScriptedBackend::new(&[], false)),
        MAC,
    );
    let version_1 = 1 << 32;
    let vcpu = VcpuState {
        index: 0,
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ecx: 0x8000_0000,
            ..Default::default()
        }],
        mp_state: Default::default(),
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000,
            rflags: 2,
            ..Default::default()
        },
        sregs: Default::default(),
        fpu: FpuState::default(),
        xsave: None,
        xcrs: None,
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Msr {
            index: 0x10,
            data: 12345,
        }],
        events: Default::default(),
        tsc_khz: Some(2_000_000),
    };
    MachineState {
        wisp_version: "fuzz".into(),
        config: config(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![vcpu],
        devices: DevicesState {
            serial: SerialSnapshot::default(),
            i8042: I8042State::default(),
            virtio: vec![
                running(Box::new(block), version_1 | 1 << 9),
                running(
                    Box::new(net),
                    version_1 | 1 << 5 | 1 << 16 | 1 << 17 | 1 << 21,
                ),
            ],
        },
    }
}

fn snapshot_state() -> SnapshotState {
    let regions = ram_ranges(MEMORY_MIB << 20)
        .into_iter()
        .map(|(guest_addr, len)| RegionInfo { guest_addr, len })
        .collect();
    SnapshotState {
        machine: machine(),
        memory: MemoryInfo {
            regions,
            data_pages: 0,
            digest: crc64_digest().finalize(),
        },
    }
}

/// `state`: the body alone (wrapped by the target) and a whole state file.
pub fn state() -> Seeds {
    let s = snapshot_state();
    let body = serde_json::to_vec(&s).expect("encode");
    let mut wrapped = vec![1];
    wrapped.extend_from_slice(&body);
    let mut file = vec![0];
    file.extend_from_slice(&format::encode(&s).expect("encode"));
    vec![("body", wrapped), ("file", file)]
}

/// `memory_file`: two regions with data and holes; right, wrong and given digests.
pub fn memory_file() -> Seeds {
    let mut out = Vec::new();
    for (name, mode) in [("right-digest", 0u8), ("wrong-digest", 2), ("recorded", 1)] {
        let mut w = Writer::default();
        w.u8(mode).u8(2).u8(0).u8(4).u8(0x10).u8(2).u8(0);
        if mode & 1 != 0 {
            w.u64(2).u64(0x0123_4567_89ab_cdef);
        }
        // Pages 0 and 4 with data, page 3 written with zeros (not a hole, not counted).
        w.u8(0).u8(0xaa).u16(5).u8(1);
        w.u8(3).u8(0).u16(0).u8(0);
        w.u8(4).u8(0x55).u16(4095).u8(0x66);
        out.push((name, w.0));
    }
    out
}

fn hello() -> Vec<u8> {
    let hello = Hello {
        wisp_version: "fuzz".into(),
        format_version: FORMAT_VERSION,
        config: config(),
        memory: ram_ranges(MEMORY_MIB << 20),
        cpu: vec![],
    };
    serde_json::to_vec(&hello).expect("encode")
}

fn spec(w: &mut Writer, kind: Kind, payload: &[u8]) {
    w.u8(kind as u8).u16(payload.len() as u16).bytes(payload);
}

/// `migration`: a stream as the source sends it, and frame specs the target completes.
pub fn migration() -> Seeds {
    let mut raw = vec![0];
    protocol::write_preamble(&mut raw).expect("write");
    protocol::write_frame(&mut raw, Kind::Hello, &hello()).expect("write");
    let mut batch = PageBatch::default();
    batch.push(0, &[0; 4096], true);
    batch.push(0x1000, &[0x5a; 4096], false);
    let pages = batch.take_payload().to_vec();
    let mut digest = PageDigest::default();
    digest.update(&pages);
    protocol::write_frame(&mut raw, Kind::Pages, &pages).expect("write");
    protocol::write_state(&mut raw, digest.value(), &machine()).expect("write");

    let mut built = Writer::default();
    built.u8(6);
    spec(&mut built, Kind::Hello, &hello());
    spec(&mut built, Kind::Pages, &[3, 0, 0x11, 0x81, 0, 0x20, 0x22]);
    let body = serde_json::to_vec(&machine()).expect("encode");
    spec(&mut built, Kind::State, &body);
    vec![("stream", raw), ("frames", built.0)]
}

/// `api`: every request kind, and a migration event.
pub fn api() -> Seeds {
    [
        ("status", r#"{"op":"status"}"#),
        ("snapshot", r#"{"op":"snapshot","to":"/tmp/snap","force":true,"stop":false}"#),
        (
            "migrate",
            r#"{"op":"migrate","to":"tcp:127.0.0.1:4444","downtime_ms":50,"timeout_s":10,"on_timeout":"stop-copy","bandwidth_mbps":100}"#,
        ),
        ("migrate-cancel", "{\"op\":\"migrate-cancel\"}\n{\"op\":\"stop\"}"),
        ("event", r#"{"event":"failed","error":"the source gave up"}"#),
    ]
    .into_iter()
    .map(|(name, line)| (name, line.as_bytes().to_vec()))
    .collect()
}

/// `cli`: one value per parser.
pub fn cli() -> Seeds {
    [
        ("disk", 0u8, "disk.img,ro,id=vda"),
        (
            "net-user",
            1,
            "user,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53,mac=52:54:00:12:34:56",
        ),
        ("net-tap", 1, "tap=tap0,mac=52:54:00:ab:cd:ef"),
        ("hostfwd", 2, "tcp:0.0.0.0:8080-:80"),
        ("console", 3, "file:/tmp/console.log"),
        ("user-options", 4, "net=10.0.3.0/24,host=10.0.3.2,dns=10.0.3.3,guest=10.0.3.15"),
        ("address", 5, "tcp:localhost:4444"),
        ("on-timeout", 6, "stop-copy"),
    ]
    .into_iter()
    .map(|(name, which, value)| {
        let mut v = vec![which];
        v.extend_from_slice(value.as_bytes());
        (name, v)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::state::LIMITS;

    /// The seeds get past every check, so the fuzzer starts from the deep end.
    #[test]
    fn the_machine_seeds_pass_the_checks() {
        let s = snapshot_state();
        s.check().unwrap();
        s.machine.config.validate(&LIMITS).unwrap();
        for t in &s.machine.devices.virtio {
            assert_eq!(t.status, 0xf, "a running device");
        }
        let hello = protocol::parse_hello(&hello()).unwrap();
        hello.config.validate(&LIMITS).unwrap();
    }
}
