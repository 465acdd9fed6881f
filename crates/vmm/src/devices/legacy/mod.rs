//! Legacy devices on port I/O and one MMIO page: the 8250 serial console, the i8042 whose
//! reset line is the guest's way out, and the boot timer userspace writes to once it starts.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A `vm_superio::Trigger` that signals an eventfd (an irqfd, or the VMM's exit event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
