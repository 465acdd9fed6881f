//! virtio-rng (virtio 1.2, section 5.4): an entropy source backed by the host's getrandom(2).
//!
//! - `device`: [`Rng`], the [`VirtioDevice`](super::VirtioDevice) and its worker lifecycle.
//! - `event_handler`: what the worker thread does with each chain: fill the guest's buffers.

mod device;
mod event_handler;

pub use device::Rng;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes returned for one chain, whatever buffers the guest offers: the worker fills them
/// through a bounce buffer of this size.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
