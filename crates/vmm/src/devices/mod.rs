//! The devices a microVM sees: legacy port-I/O devices (`legacy`), the virtio devices and their
//! MMIO transport (`virtio`), and the buses that route vCPU exits to them (`bus`).

pub mod bus;
pub mod legacy;
pub mod virtio;
