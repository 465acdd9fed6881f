//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, IO-APIC, local APICs) and PIT,
//! and the irqfd/ioeventfd wiring devices use to raise interrupts and take notifications
//! without a trip through the VMM.

use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::devices::virtio::GuestMemoryMmap;

/// Why the VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A memory region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostMapping(u64),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What KVM holds for the VM outside the vCPUs, as a snapshot records it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its irqchip and PIT.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    /// Whether the memory slots log dirty pages.
    dirty_log: bool,
}

impl Vm {
    /// Creates the VM, its TSS, the in-kernel irqchip and the PIT.
    pub fn new(hypervisor: &Kvm) -> Result<Self, VmError> {
        let fd = hypervisor.create_vm().map_err(kvm("create the KVM VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm("set the TSS address"))?;
        fd.create_irq_chip().map_err(kvm("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("create the PIT"))?;
        Ok(Self {
            fd,
            dirty_log: false,
        })
    }

    /// Gives KVM the guest memory, one slot per region; with `dirty_log`, KVM records the
    /// pages the guest writes (for diff snapshots) at the cost of a fault on each page's first
    /// write after each snapshot.
    pub fn register_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        dirty_log: bool,
    ) -> Result<(), VmError> {
        self.dirty_log = dirty_log;
        for (slot, region) in mem.iter().enumerate() {
            let start = region.start_addr().raw_value();
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::NoHostMapping(start))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`; the
            // caller keeps `mem` alive for as long as the VM exists (the VMM holds both).
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(kvm("register guest memory"))?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise `gsi` in the guest.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm("register an irqfd"))
    }

    /// Makes a guest write of `datamatch` at MMIO `addr` signal `evt` inside KVM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm("register an ioeventfd"))
    }

    /// Whether KVM logs dirty pages.
    pub fn logs_dirty_pages(&self) -> bool {
        self.dirty_log
    }

    /// The pages the guest wrote since the last call (or since the memory was registered), one
    /// bitmap per region, one bit per 4 KiB page; the log starts afresh.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(kvm("read the dirty page log"))
            })
            .collect()
    }

    /// Reads the irqchip, the PIT and kvmclock. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(kvm("read the irqchip"))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm("read the PIT"))?,
            clock: self.clock()?,
        })
    }

    /// Loads the irqchip and the PIT of a state saved by [`Vm::save_state`]; kvmclock follows
    /// the vCPUs, in [`Vm::restore_clock`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm("restore the irqchip"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm("restore the PIT"))?;
        Ok(())
    }

    /// Loads kvmclock from `state`, advanced by `since`. It continues from the saved value, so
    /// guest monotonic time does not jump over the time the VM spent saved (the agent's
    /// restore notification sets the wall clock). The vCPUs' TSCs must follow it (see
    /// [`crate::arch::x86_64::tsc`]).
    pub fn restore_clock(&self, state: &VmState, since: Duration) -> Result<(), VmError> {
        let since = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        let clock = kvm_clock_data {
            clock: state.clock.clock.saturating_add(since),
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm("restore kvmclock"))?;
        Ok(())
    }

    /// Reads kvmclock, with the host TSC of the moment when KVM has it (`KVM_CLOCK_HOST_TSC`).
    pub fn clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(kvm("read kvmclock"))
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
