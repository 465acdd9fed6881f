//! virtio-blk (virtio 1.2, section 5.2) over a raw disk image, or over a read-only base image
//! with a copy-on-write overlay that takes the writes.
//!
//! - `disk`: the image files and positional I/O straight between them and guest memory.
//! - [`overlay`]: the copy-on-write overlay (format, crash semantics, [`overlay::copy`]).
//! - `request`: the pure request logic; it parses a descriptor chain into a [`Request`],
//!   validating every descriptor, and executes it against a [`Disk`].
//! - `device`: [`Block`], the [`VirtioDevice`](super::VirtioDevice) with its features and
//!   configuration space, and its [`BlockConfig`].
//! - `event_handler`: what the worker thread does with each request chain.

mod device;
mod disk;
mod event_handler;
pub mod overlay;
pub mod request;
#[cfg(test)]
mod test_utils;

pub use device::{Block, BlockConfig, BlockError};
pub use disk::{Disk, DiskError};
pub use request::{Request, RequestError, RequestType};

/// Bytes in a sector, the unit of `capacity` and of request offsets whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data descriptors in one request (`seg_max`): a chain also holds a header and a status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data descriptor (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = 20;
