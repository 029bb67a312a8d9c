//! Building a VM from a [`VmConfig`] and running it: memory, kernel, boot structures,
//! in-kernel irqchip and PIT, legacy devices, vCPU threads, and the VMM event loop.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::serial::{SerialOutput, SERIAL_PORT_COUNT};
use devices::legacy::{
    AcpiSleep, BootTimer, DebugExit, SerialDevice, BOOT_COMPLETE_PORT, DEBUG_EXIT_PORT, I8042,
    I8042_COMMAND_PORT, I8042_DATA_PORT,
};
use devices::virtio::mmio::MmioTransport;
use devices::{Bus, BusError, StopCallback};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::ApiServer;
use crate::arch::acpi::{self, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::arch::boot::{self, BootInfo};
use crate::arch::layout::{CMDLINE_START, KVM_TSS_ADDRESS};
use crate::arch::mptable;
use crate::arch::regs::EntryPoint;
use crate::arch::vcpu_state::StateCaps;
use crate::cmdline;
use crate::config::VmConfig;
use crate::console::Input;
use crate::device_manager::{self, DeviceManagerError};
use crate::event_loop::EventLoop;
use crate::loader;
use crate::machine::Machine;
use crate::memory::{self, GuestMemory};
use crate::outcome::{ExitLatch, Outcome};
use crate::run_control::{RunControl, VcpuThreads};
use crate::signals::SignalFd;
use crate::vcpu::{self, Vcpu};

/// COM1's port base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's IRQ (ISA IRQ 4 = GSI 4).
pub const SERIAL_IRQ: u32 = 4;
const KVM_IDENTITY_MAP_ADDRESS: u64 = KVM_TSS_ADDRESS - 0x1000;

/// Errors building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// A VM-level KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel or initrd.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// Command line.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// Command line copy into guest memory.
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    /// Boot structures.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Device wiring.
    #[error("device set-up: {0}")]
    Bus(#[from] BusError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Event loop or other host I/O.
    #[error("VMM I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Event loop.
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// Virtio devices and their backends.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// What KVM offers for saving vCPU state could not be queried.
    #[error("cannot query KVM's vCPU state support: {0}")]
    StateCaps(crate::arch::vcpu_state::VcpuStateError),
    /// Loading a snapshot's state into the new VM.
    #[error("cannot restore the snapshot: {0}")]
    Restore(#[from] crate::restore::RestoreError),
}

/// Called once a VM's vCPUs run; false stops it (see [`Vm::run_then`]).
pub type StartedHook = Box<dyn FnOnce() -> bool>;

/// How to build the VM beyond its machine configuration.
pub struct BuildOptions {
    /// Whether guest kernel mode is emulated on this host (adds the friendly cmdline).
    pub emulated_kernel_mode: bool,
    /// wisp's process start, for the boot-complete time.
    pub start: Instant,
    /// Where guest serial output goes.
    pub serial_output: SerialOutput,
}

/// A built VM, ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs and the VM fd (in `machine`) go before the memory
    // they map (also in `machine`, after the fd).
    vcpus: Vec<Vcpu>,
    machine: Machine,
    _kvm: Kvm,
    serial_drained: EventFd,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    latch: Arc<ExitLatch>,
    entry: Option<EntryPoint>,
    start: Instant,
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// A VM with its in-kernel irqchip and PIT.
pub(crate) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

/// The devices of a VM, wired to its buses and to KVM.
pub(crate) struct Wired {
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// The UART's interrupt, registered by [`Wired::connect_serial`].
    serial_irq: EventFd,
    pub(crate) serial_drained: EventFd,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) virtio: device_manager::VirtioDevices,
    pub(crate) latch: Arc<ExitLatch>,
    pub(crate) io_bus: Arc<Bus>,
    pub(crate) mmio_bus: Arc<Bus>,
}

/// Creates the legacy and virtio devices of `config` (disk images locked now, or with
/// `lock_disks` false only when the devices claim them, see
/// [`device_manager::DiskLocks`]). The caller connects COM1's interrupt last.
pub(crate) fn wire_devices(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    config: &VmConfig,
    start: Instant,
    serial_output: SerialOutput,
    disk_locks: device_manager::DiskLocks,
) -> Result<Wired, VmError> {
    let mut mmio_bus = Bus::new();
    let virtio = device_manager::attach(vm_fd, mem, &mut mmio_bus, config, disk_locks)?;

    let latch = Arc::new(ExitLatch::new()?);
    let stop_latch = latch.clone();
    let on_stop: StopCallback = Arc::new(move |reason| stop_latch.set(Outcome::Guest(reason)));

    let serial_irq = EventFd::new(EFD_NONBLOCK)?;
    let serial_drained = EventFd::new(EFD_NONBLOCK)?;
    let irq = serial_irq.try_clone()?;
    let drained = serial_drained.try_clone()?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, drained, serial_output)));
    let boot_timer = BootTimer::new(start);
    let i8042 = Arc::new(Mutex::new(I8042::new(on_stop.clone())));
    let acpi_sleep = Arc::new(Mutex::new(AcpiSleep::new(on_stop.clone())));

    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), SERIAL_PORT.into(), SERIAL_PORT_COUNT)?;
    io_bus.insert(i8042.clone(), I8042_DATA_PORT.into(), 1)?;
    io_bus.insert(i8042.clone(), I8042_COMMAND_PORT.into(), 1)?;
    io_bus.insert(acpi_sleep.clone(), SLEEP_CONTROL_PORT.into(), 1)?;
    io_bus.insert(acpi_sleep, SLEEP_STATUS_PORT.into(), 1)?;
    io_bus.insert(
        Arc::new(Mutex::new(DebugExit::new(on_stop))),
        DEBUG_EXIT_PORT.into(),
        1,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(boot_timer)),
        BOOT_COMPLETE_PORT.into(),
        1,
    )?;
    Ok(Wired {
        serial,
        serial_irq,
        serial_drained,
        i8042,
        virtio,
        latch,
        io_bus: Arc::new(io_bus),
        mmio_bus: Arc::new(mmio_bus),
    })
}

impl Wired {
    /// Registers COM1's irqfd. Done once the vCPUs and the irqchip have their state: a
    /// restored UART may raise its interrupt as it is created, and that event, pending
    /// on the eventfd, is delivered by KVM when the irqfd is registered, so it lands in
    /// the loaded irqchip instead of being overwritten by it.
    pub(crate) fn connect_serial(&self, vm_fd: &VmFd) -> Result<(), VmError> {
        vm_fd
            .register_irqfd(&self.serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))
    }
}

/// What a VM is assembled from.
pub(crate) struct Parts {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemory,
    pub(crate) config: VmConfig,
    pub(crate) wired: Wired,
    pub(crate) vcpus: Vec<Vcpu>,
    /// vCPU 0's CPUID, as the guest sees it.
    pub(crate) guest_cpuid: Vec<kvm_cpuid_entry2>,
    pub(crate) entry: Option<EntryPoint>,
    pub(crate) start: Instant,
}

/// Creates the vCPUs of `config` (not yet configured).
pub(crate) fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    cpus: u8,
    wired: &Wired,
    mem: &GuestMemory,
) -> Result<Vec<Vcpu>, VmError> {
    let caps = Arc::new(StateCaps::query(kvm).map_err(VmError::StateCaps)?);
    (0..cpus)
        .map(|index| {
            Vcpu::new(
                vm_fd,
                index,
                wired.io_bus.clone(),
                wired.mmio_bus.clone(),
                mem.clone(),
                caps.clone(),
            )
            .map_err(VmError::from)
        })
        .collect()
}

impl Vm {
    /// Assembles a VM from its parts (boot or restore).
    pub(crate) fn assemble(p: Parts) -> Self {
        Self {
            vcpus: p.vcpus,
            machine: Machine {
                vm_fd: Arc::new(p.vm_fd),
                mem: p.mem,
                config: p.config,
                serial: p.wired.serial,
                i8042: p.wired.i8042,
                guest_cpuid: p.guest_cpuid,
            },
            _kvm: p.kvm,
            serial_drained: p.wired.serial_drained,
            virtio: p.wired.virtio.transports,
            latch: p.wired.latch,
            entry: p.entry,
            start: p.start,
        }
    }

    /// Builds the VM described by `config` on `kvm`, ready to boot its kernel.
    pub fn build(kvm: Kvm, config: &VmConfig, opts: BuildOptions) -> Result<Self, VmError> {
        let vm_fd = create_vm(&kvm)?;
        let mem = memory::create(config.memory_mib << 20)?;
        let start = opts.start;
        // Registering the memory slot waits for KVM's SRCU grace period: milliseconds,
        // mostly asleep. Loading the kernel and setting up devices and vCPUs does not
        // need the slot (they write guest memory through wisp's own mapping), so they
        // run meanwhile; no vCPU runs before both are done.
        let (entry, wired, vcpus, guest_cpuid) = std::thread::scope(|s| {
            let registering = s.spawn(|| memory::register(&vm_fd, &mem));
            let rest = Self::prepare_boot(&kvm, &vm_fd, &mem, config, opts);
            let registered = registering
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            registered?;
            rest
        })?;
        Ok(Self::assemble(Parts {
            kvm,
            vm_fd,
            mem,
            config: config.clone(),
            wired,
            vcpus,
            guest_cpuid,
            entry: Some(entry),
            start,
        }))
    }

    /// Everything of [`Vm::build`] but the memory slot: the kernel, initrd and boot
    /// tables in guest memory, the devices, and the configured vCPUs (and the CPUID
    /// they got).
    fn prepare_boot(
        kvm: &Kvm,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        config: &VmConfig,
        opts: BuildOptions,
    ) -> Result<(EntryPoint, Wired, Vec<Vcpu>, Vec<kvm_cpuid_entry2>), VmError> {
        let mem_size = config.memory_mib << 20;
        let kernel = loader::load_kernel(mem, mem_size, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(loader::load_initrd(mem, mem_size, &kernel, path)?),
            None => None,
        };
        let wired = wire_devices(
            vm_fd,
            mem,
            config,
            opts.start,
            opts.serial_output,
            device_manager::DiskLocks::Now,
        )?;
        let slots = &wired.virtio.slots;
        let announce = if cmdline::acpi_off(&config.cmdline) {
            device_manager::cmdline_entries(slots)
        } else {
            String::new()
        };
        let cmdline = cmdline::compose(&config.cmdline, opts.emulated_kernel_mode, &announce)?;
        linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(VmError::CmdlineWrite)?;
        let cmdline_len = cmdline
            .as_cstring()
            .map(|c| c.as_bytes().len())
            .unwrap_or(0);
        log::debug!("kernel cmdline: {:?}", cmdline.as_cstring());

        mptable::setup(mem, config.cpus)?;
        let acpi_virtio: Vec<(u64, u32)> = slots.iter().map(|s| (s.base, s.gsi)).collect();
        let rsdp = acpi::setup(mem, config.cpus, &acpi_virtio)?;
        let info = BootInfo {
            mem_size,
            cmdline_len,
            initrd,
            rsdp: Some(rsdp),
        };
        match kernel.entry {
            EntryPoint::Pvh(_) => boot::write_pvh_start_info(mem, &info)?,
            EntryPoint::Linux64(_) => boot::write_boot_params(mem, &info, kernel.header)?,
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpus = create_vcpus(kvm, vm_fd, config.cpus, &wired, mem)?;
        let mut guest_cpuid = Vec::new();
        for vcpu in &vcpus {
            let cpuid = vcpu.configure(
                kvm,
                &supported,
                config.cpus,
                kernel.entry,
                opts.emulated_kernel_mode,
            )?;
            if guest_cpuid.is_empty() {
                guest_cpuid = cpuid.as_slice().to_vec();
            }
        }
        wired.connect_serial(vm_fd)?;
        Ok((kernel.entry, wired, vcpus, guest_cpuid))
    }

    /// How the kernel is entered (None for a restored VM).
    pub fn entry(&self) -> Option<EntryPoint> {
        self.entry
    }

    /// Runs the VM until the guest stops, crashes, or the user, a signal or the control
    /// socket `api` ends it.
    pub fn run(self, input: Option<Input>, api: Option<ApiServer>) -> Result<Outcome, VmError> {
        self.run_then(input, api, None)
    }

    /// [`Vm::run`], calling `started` once every vCPU thread runs (a migration's
    /// destination tells its source then); if it returns false, the VM stops at once
    /// with [`Outcome::HandOverFailed`].
    pub fn run_then(
        self,
        input: Option<Input>,
        api: Option<ApiServer>,
        started: Option<StartedHook>,
    ) -> Result<Outcome, VmError> {
        let Vm {
            vcpus,
            machine,
            _kvm,
            serial_drained,
            virtio,
            latch,
            start,
            ..
        } = self;
        vcpu::install_kick_handler()?;
        let signals = SignalFd::new()?;
        let mut event_loop = EventLoop::new(
            latch.clone(),
            serial_drained,
            signals,
            input,
            virtio,
            api,
            machine,
            start,
        )?;
        let control = Arc::new(RunControl::default());
        let mut threads = VcpuThreads::new(control.clone(), vcpus.len());
        let mut spawn_error = None;
        for vcpu in vcpus {
            match vcpu.spawn(control.clone(), latch.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        if spawn_error.is_none() {
            // Every other thread runs (each under its own filter): the VMM thread's
            // filter goes on before the event loop serves anything.
            if let Err(e) = crate::seccomp::enter(crate::seccomp::Thread::Vmm) {
                latch.set(Outcome::Crash(e.to_string()));
            }
            if let Some(hook) = started {
                if !hook() {
                    latch.set(Outcome::HandOverFailed(
                        "the source did not get word that the VM runs here".into(),
                    ));
                }
            }
        }
        let result = match spawn_error {
            Some(e) => Err(e.into()),
            None => event_loop.run(&threads).map_err(VmError::from),
        };
        threads.stop();
        result
    }
}
