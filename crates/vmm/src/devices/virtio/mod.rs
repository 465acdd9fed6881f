//! Virtio devices and their MMIO transport (virtio 1.x, MMIO version 2).
//!
//! A device implements [`VirtioDevice`]: the transport (`mmio`) owns the registers, the
//! feature negotiation and the queue configuration, and hands the device its queues once the
//! driver sets DRIVER_OK ([`VirtioDevice::activate`]). From then on the device serves its
//! queues on a worker thread of its own: it waits on the queues' eventfds (KVM signals them
//! through ioeventfds when the guest writes QueueNotify; the transport signals them itself when
//! a write reaches userspace) and raises interrupts through an [`IrqTrigger`].

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use crate::vstate::memory::GuestMemoryMmap;

/// Device type IDs (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bits every device offers.
pub mod features {
    /// VIRTIO_F_VERSION_1: the device is a modern (1.x) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// VIRTIO_RING_F_EVENT_IDX: used/avail event index notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Bits of the MMIO InterruptStatus register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqKind {
    /// The device used buffers in a queue.
    Vring = 1,
    /// The device's configuration changed.
    Config = 2,
}

/// A device's interrupt line: the InterruptStatus bits the driver reads and acknowledges,
/// and the eventfd that KVM (through an irqfd) turns into a guest interrupt.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger with a fresh eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Sets the status bit for `kind` and signals the interrupt.
    pub fn trigger(&self, kind: IrqKind) -> io::Result<()> {
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as KVM's irqfd for this device's GSI.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them, in index order.
    pub queues: Vec<virtio_queue::Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt line.
    pub irq: Arc<IrqTrigger>,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("expected {expected} queues, the driver set up {found}")]
    QueueCount { expected: usize, found: usize },
    /// The device's worker thread could not start.
    #[error("cannot start the device worker")]
    Worker(#[source] io::Error),
    /// The device's backend failed.
    #[error("device backend failed: {0}")]
    Backend(String),
}

/// Where a device left a queue: the transport records it in snapshots and starts the queue
/// there again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio device behind the MMIO transport. Implementations never panic on guest input.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (including [`features::VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of the offered ones).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues (the driver wrote 0 to Status); the device may be activated
    /// again afterwards. Returns false if the device cannot be reset.
    fn reset(&mut self) -> bool;
    /// Stops serving the queues for a snapshot, between two requests, and returns where each
    /// active queue stands (empty if the device is not active). Pending writes are made
    /// durable. The transport later activates the device again, from a snapshot or in the same
    /// VM, with queues that start at these positions ([`VirtioDevice::activate_restored`]).
    fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError>;
    /// Activates a device whose driver state comes from a snapshot (or that was quiesced for
    /// one). Devices whose host side cannot survive a snapshot tell the driver here.
    fn activate_restored(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activate(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_irq_trigger_sets_status_and_signals() {
        let irq = IrqTrigger::new().expect("eventfd");

        irq.trigger(IrqKind::Vring).expect("trigger");

        assert_eq!(irq.status(), 1);
        assert_eq!(irq.eventfd().read().expect("read"), 1);
    }

    #[test]
    fn test_irq_trigger_ack_clears_only_acked_bits() {
        let irq = IrqTrigger::new().expect("eventfd");
        irq.trigger(IrqKind::Vring).expect("trigger");
        irq.trigger(IrqKind::Config).expect("trigger");

        irq.ack(IrqKind::Vring as u32);

        assert_eq!(irq.status(), IrqKind::Config as u32);
    }
}
