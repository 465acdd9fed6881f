//! Placing devices in the machine: each virtio device gets an MMIO window and an IRQ, KVM gets
//! its irqfd and ioeventfds, and the kernel command line gets the `virtio_mmio.device=` entry
//! through which the guest discovers it (the guest has no ACPI and no PCI).

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout;
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::mmio::{self, MmioError, MmioTransport, TransportState};
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::vstate::vm::{Vm, VmError};

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// All IRQs are taken.
    #[error("no IRQ left for another virtio device (at most {} devices)", layout::IRQ_MAX - layout::IRQ_BASE + 1)]
    NoIrq,
    /// The transport could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// The bus refused the window.
    #[error("cannot place the device on the MMIO bus")]
    Bus(#[source] BusError),
    /// KVM refused the irqfd or ioeventfd.
    #[error("cannot wire the device into KVM")]
    Kvm(#[source] VmError),
}

/// A device placed in the machine.
#[derive(Debug, Clone)]
pub struct AttachedDevice {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Hands out MMIO windows and IRQs in order.
#[derive(Debug, Default)]
pub struct MmioDeviceManager {
    devices: Vec<AttachedDevice>,
}

impl MmioDeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `device`: transport, bus window, irqfd, one ioeventfd per queue. With
    /// `state` (from a snapshot), the transport's registers and queues come from it and the
    /// device starts where it was.
    pub fn attach(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        state: Option<&TransportState>,
    ) -> Result<&AttachedDevice, DeviceManagerError> {
        let slot = self.devices.len() as u64;
        let irq = layout::IRQ_BASE + slot as u32;
        if irq > layout::IRQ_MAX {
            return Err(DeviceManagerError::NoIrq);
        }
        let base = layout::MMIO_DEVICES_START + slot * layout::MMIO_DEVICE_SIZE;
        let transport = match state {
            None => MmioTransport::new(device, mem.clone()),
            Some(state) => MmioTransport::restore(device, mem.clone(), state),
        }
        .map_err(DeviceManagerError::Transport)?;
        vm.register_irqfd(transport.irq().eventfd(), irq)
            .map_err(DeviceManagerError::Kvm)?;
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_mmio_ioevent(evt, base + mmio::NOTIFY_OFFSET, index as u32)
                .map_err(DeviceManagerError::Kvm)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, layout::MMIO_DEVICE_SIZE)
            .map_err(DeviceManagerError::Bus)?;
        self.devices.push(AttachedDevice {
            base,
            irq,
            transport,
        });
        Ok(&self.devices[self.devices.len() - 1])
    }

    /// The `virtio_mmio.device=` entries for the kernel command line.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| cmdline_entry(d.base, d.irq))
            .collect()
    }

    /// Stops every device between two requests (the vCPUs must be paused) and returns their
    /// states, in attachment order.
    pub fn quiesce(&self) -> Result<Vec<TransportState>, DeviceManagerError> {
        self.devices
            .iter()
            .map(|d| {
                d.transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .quiesce()
                    .map_err(DeviceManagerError::Transport)
            })
            .collect()
    }

    /// Starts the devices again after [`MmioDeviceManager::quiesce`].
    pub fn resume_after_snapshot(&self) {
        for d in &self.devices {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resume_after_snapshot();
        }
    }

    /// The attached devices, in order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }
}

fn cmdline_entry(base: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{base:#x}:{irq}",
        layout::MMIO_DEVICE_SIZE >> 10
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cmdline_entry_format() {
        assert_eq!(
            cmdline_entry(0xd000_1000, 5),
            "virtio_mmio.device=4K@0xd0001000:5"
        );
    }
}
