//! [`Rng`]: the virtio-rng device as the transport sees it. It has no configuration space and
//! no device features; all the work happens on the worker thread.

use super::event_handler::RngHandler;
use super::QUEUE_SIZE;
use crate::devices::virtio::worker::{QueueWorker, WorkerSlot};
use crate::devices::virtio::{
    device_type, features, ActivateContext, ActivateError, QueuePosition, VirtioDevice,
};

/// A virtio-rng device with one request queue.
#[derive(Debug, Default)]
pub struct Rng {
    acked_features: u64,
    worker: WorkerSlot,
}

impl Rng {
    /// A device not yet activated.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker
            .start(QueueWorker::from_context(ctx, RngHandler::new())?)
    }

    fn reset(&mut self) -> bool {
        self.worker.stop()
    }

    fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError> {
        self.worker.quiesce()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::testing::{guest_memory, writable, TestQueue, DATA_ADDR};
    use crate::devices::virtio::mmio::{reg, status, MmioTransport, NOTIFY_OFFSET};
    use crate::devices::virtio::IrqTrigger;

    fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn test_rng_device_type_and_features() {
        let rng = Rng::new();

        assert_eq!(rng.device_type(), 4);
        assert_eq!(
            rng.avail_features(),
            features::VERSION_1 | features::RING_EVENT_IDX
        );
    }

    #[test]
    fn test_rng_read_config_reads_zeros() {
        let rng = Rng::new();
        let mut data = [0xffu8; 4];

        rng.read_config(u64::MAX, &mut data);

        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn test_rng_activate_without_queues_fails() {
        let mut rng = Rng::new();
        let ctx = ActivateContext {
            mem: guest_memory(),
            queues: Vec::new(),
            queue_evts: Vec::new(),
            irq: Arc::new(IrqTrigger::new().expect("irq")),
        };

        let result = rng.activate(ctx);

        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 1,
                found: 0
            })
        ));
    }

    #[test]
    fn test_rng_behind_transport_fills_buffer_then_resets() {
        let mem = guest_memory();
        let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone()).expect("transport");
        let mut tq = TestQueue::new(&mem, 16);
        let mut s = status::ACKNOWLEDGE | status::DRIVER;
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, s);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, reg::DRIVER_FEATURES, 1);
        s |= status::FEATURES_OK;
        write_reg(&mut t, reg::STATUS, s);
        tq.configure(&mut t, 0);
        write_reg(&mut t, reg::STATUS, s | status::DRIVER_OK);
        tq.add_chain(&mem, &[writable(DATA_ADDR, 256)]);

        write_reg(&mut t, NOTIFY_OFFSET, 0);
        let served = tq.wait_used(&mem, 1);
        write_reg(&mut t, reg::STATUS, 0);

        let mut data = [0u8; 256];
        mem.read_slice(&mut data, GuestAddress(DATA_ADDR))
            .expect("read");
        assert!(served);
        assert_eq!(tq.used_elem(&mem, 0).1, 256);
        assert_ne!(data, [0u8; 256]);
        assert!(!t.is_activated());
    }
}
