//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, IO-APIC, local APICs) and PIT,
//! and the irqfd/ioeventfd wiring devices use to raise interrupts and take notifications
//! without a trip through the VMM.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
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

/// A KVM VM with its irqchip and PIT.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
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
        Ok(Self { fd })
    }

    /// Gives KVM the guest memory, one slot per region.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
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
                flags: 0,
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

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
