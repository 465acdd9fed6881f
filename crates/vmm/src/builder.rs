//! From a validated [`VmConfig`] to a running microVM: guest memory, the KVM VM, the legacy
//! devices, the virtio devices, the kernel with its command line, the MP table, and the vCPU
//! threads.

use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootSource};
use crate::arch::x86_64::{cpuid, layout, mptable};
use crate::config::{SerialOutput, VmConfig};
use crate::device_manager::{DeviceManagerError, MmioDeviceManager};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::boot_timer::{self, BootTime, BootTimer};
use crate::devices::legacy::i8042::{self, I8042};
use crate::devices::legacy::serial::{self, ConsoleOut, SerialDevice};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::{Block, BlockConfig, BlockError, DiskError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuShared, VcpuThreads};
use crate::vstate::vm::{Vm, VmError};

/// Why a microVM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A legacy device could not be placed.
    #[error("cannot place a legacy device")]
    Bus(#[source] BusError),
    /// The serial output file could not be opened.
    #[error("serial.path: cannot open {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A virtio device could not be created.
    #[error("{field}: {message}")]
    Device { field: String, message: String },
    /// A virtio device could not be attached.
    #[error("cannot attach a virtio device")]
    Attach(#[from] DeviceManagerError),
    /// The kernel could not be loaded.
    #[error("boot.kernel: {0}")]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// KVM's supported CPUID could not be read.
    #[error("cannot read KVM's supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// A microVM whose vCPUs run.
#[derive(Debug)]
pub struct MicroVm {
    pub mem: GuestMemoryMmap,
    pub shared: Arc<VcpuShared>,
    pub boot_time: BootTime,
    pub vcpus: Option<VcpuThreads>,
    pub devices: MmioDeviceManager,
    pub vcpu_count: u8,
    pub memory_mib: u64,
    /// The configuration the VM runs with (for a restored VM: the snapshot's, with the
    /// restore's overrides).
    pub config: VmConfig,
    /// The serial port, whose registers a snapshot records.
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The memory file the guest memory is compared against for diff snapshots.
    pub memory_base: Option<MemoryBase>,
    /// How long the restore took, for a restored VM.
    pub restore_time: Option<std::time::Duration>,
    pub(crate) kvm: Kvm,
    // Dropped last: the VM's memory slots point into `mem`.
    pub(crate) vm: Vm,
}

/// The full memory file a VM's memory descends from, and the pages that differ from it.
#[derive(Debug)]
pub struct MemoryBase {
    /// The memory file, absolute.
    pub path: std::path::PathBuf,
    /// Pages that differ from it (KVM's and the VMM's writes since, and a restored diff).
    pub differing: memory::PageBitmap,
    /// Whether the guest memory is mapped from `path` (a restored VM) rather than anonymous.
    pub mapped: bool,
}

pub(crate) fn device_err(field: impl Into<String>, e: impl std::fmt::Display) -> BuildError {
    BuildError::Device {
        field: field.into(),
        message: e.to_string(),
    }
}

fn console_out(config: &VmConfig) -> Result<Option<ConsoleOut>, BuildError> {
    match config.serial.output {
        SerialOutput::Off => Ok(None),
        SerialOutput::Stdout => Ok(Some(Box::new(std::io::stdout()))),
        SerialOutput::File => {
            let path = config.serial.path.clone().unwrap_or_default();
            let file = File::create(&path).map_err(|source| BuildError::SerialFile {
                path: path.display().to_string(),
                source,
            })?;
            Ok(Some(Box::new(file)))
        }
    }
}

/// The virtio devices of `config`, in the order they are attached, with the config field
/// each comes from.
pub(crate) fn virtio_devices(config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, d) in config.drives.iter().enumerate() {
        let block = Block::new(&BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            id: Some(d.id.clone()),
            overlay: d.overlay.clone(),
        })
        .map_err(|e| {
            let field = match e {
                BlockError::Disk(DiskError::Overlay(_)) => "overlay",
                _ => "path",
            };
            device_err(format!("drives[{i}].{field}"), error_chain(&e))
        })?;
        devices.push(Box::new(block));
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(&VsockConfig {
            guest_cid: u64::from(v.guest_cid),
            uds_path: v.uds_path.clone(),
        })
        .map_err(|e| device_err("vsock", error_chain(&e)))?;
        devices.push(Box::new(vsock));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    Ok(devices)
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The kernel command line: the user's, with the root drive and the virtio devices added
/// before any `--` (what follows `--` belongs to init).
fn kernel_cmdline(config: &VmConfig, devices: &MmioDeviceManager) -> String {
    let (kernel_part, init_part) = match config.boot.cmdline.split_once(" -- ") {
        Some((k, i)) => (k.to_owned(), Some(i.to_owned())),
        None => (config.boot.cmdline.clone(), None),
    };
    let mut parts = vec![kernel_part];
    if let Some(pos) = config.drives.iter().position(|d| d.root) {
        let letter = (b'a' + pos as u8) as char;
        let mode = if config.drives[pos].read_only {
            "ro"
        } else {
            "rw"
        };
        parts.push(format!("root=/dev/vd{letter} {mode}"));
    }
    parts.extend(devices.cmdline_entries());
    if let Some(init) = init_part {
        parts.push(format!("-- {init}"));
    }
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The port-I/O and MMIO buses with the legacy devices on them.
pub(crate) struct Legacy {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit_evt: EventFd,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    pub boot_time: BootTime,
}

impl Legacy {
    /// The buses and exit event the vCPU threads share, once every device is on them; the
    /// serial port and boot timer the VM keeps.
    pub(crate) fn into_shared(
        self,
    ) -> (Arc<VcpuShared>, Option<Arc<Mutex<SerialDevice>>>, BootTime) {
        let shared = Arc::new(VcpuShared {
            pio: self.pio,
            mmio: self.mmio,
            exit_evt: self.exit_evt,
            exit: Mutex::new(None),
            metrics: Default::default(),
        });
        (shared, self.serial, self.boot_time)
    }
}

/// Creates the serial port (its registers from `serial_state` for a restore), the i8042 and
/// the boot timer.
pub(crate) fn legacy_devices(
    config: &VmConfig,
    vm: &Vm,
    serial_state: Option<&serial::SerialState>,
) -> Result<Legacy, BuildError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let mut serial_handle = None;
    if let Some(out) = console_out(config)? {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irq, layout::SERIAL_IRQ)?;
        let serial = match serial_state {
            Some(state) => SerialDevice::restore(EventFdTrigger(irq), out, state)
                .ok_or_else(|| device_err("serial", "the snapshot's serial state is impossible"))?,
            None => SerialDevice::new(EventFdTrigger(irq), out),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), serial::COM1_PORT, serial::PORT_LEN)
            .map_err(BuildError::Bus)?;
        serial_handle = Some(serial);
    }
    let reset = exit_evt.try_clone().map_err(BuildError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(EventFdTrigger(reset)))),
        i8042::I8042_PORT,
        i8042::PORT_LEN,
    )
    .map_err(BuildError::Bus)?;
    let boot_time = BootTime::default();
    mmio.insert(
        Arc::new(Mutex::new(BootTimer::new(boot_time.clone()))),
        layout::BOOT_TIMER_START,
        boot_timer::MMIO_LEN,
    )
    .map_err(BuildError::Bus)?;
    Ok(Legacy {
        pio,
        mmio,
        exit_evt,
        serial: serial_handle,
        boot_time,
    })
}

/// Builds the microVM of `config` and starts its vCPUs.
pub fn build_and_start(config: &VmConfig) -> Result<MicroVm, BuildError> {
    let start = std::time::Instant::now();
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let mem = memory::create(config.machine.memory_mib)?;
    let mut vm = Vm::new(&kvm)?;
    vm.register_memory(&mem, config.machine.track_dirty_pages)?;
    let mut legacy = legacy_devices(config, &vm, None)?;
    let mut devices = MmioDeviceManager::new();
    for device in virtio_devices(config)? {
        devices.attach(&vm, &mut legacy.mmio, &mem, device, None)?;
    }

    let devices_done = start.elapsed();
    let cmdline = kernel_cmdline(config, &devices);
    let entry = boot::load(
        &mem,
        &BootSource {
            kernel: &config.boot.kernel,
            initrd: config.boot.initrd.as_deref(),
            cmdline: &cmdline,
        },
    )?;
    let count = config.machine.vcpus;
    let loaded = start.elapsed();
    mptable::setup(&mem, count)?;
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        cpuid::enable_tsc_deadline(&mut supported);
    }
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(&supported, count, &mem, (index == 0).then_some(&entry))?;
        vcpus.push(vcpu);
    }
    let (shared, serial, boot_time) = legacy.into_shared();
    boot_time.start();
    let threads = VcpuThreads::start(vcpus, shared.clone(), false)?;
    log::info!(
        "built the VM in {:.1} ms: memory, VM and devices by {:.1} ms, kernel loaded by {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3,
        devices_done.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3
    );
    Ok(MicroVm {
        mem,
        shared,
        boot_time,
        vcpus: Some(threads),
        devices,
        vcpu_count: count,
        memory_mib: config.machine.memory_mib,
        config: config.clone(),
        serial,
        memory_base: None,
        restore_time: None,
        kvm,
        vm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cmdline: &str) -> VmConfig {
        VmConfig::from_json(
            &serde_json::json!({
                "version": 1,
                "machine": {"vcpus": 1, "memory_mib": 128},
                "boot": {"kernel": "/k", "cmdline": cmdline},
                "drives": [{"id": "data", "path": "/d"}, {"id": "root", "path": "/r", "root": true, "read_only": true}]
            })
            .to_string(),
        )
        .expect("config")
    }

    #[test]
    fn test_kernel_cmdline_puts_devices_before_init_args() {
        let config = config("console=ttyS0 -- echo hi");

        let line = kernel_cmdline(&config, &MmioDeviceManager::new());

        assert_eq!(line, "console=ttyS0 root=/dev/vdb ro -- echo hi");
    }

    #[test]
    fn test_kernel_cmdline_without_init_args() {
        let config = config("console=ttyS0");

        assert_eq!(
            kernel_cmdline(&config, &MmioDeviceManager::new()),
            "console=ttyS0 root=/dev/vdb ro"
        );
    }
}
