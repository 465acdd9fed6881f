//! What the virtio-rng worker does with each chain (the thread itself is the shared
//! [`QueueWorker`](crate::devices::virtio::worker::QueueWorker)): fill its device-writable
//! buffers with bytes from getrandom(2), at most [`MAX_BYTES_PER_REQUEST`] per chain through a
//! bounce buffer allocated once.

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryError};

use super::MAX_BYTES_PER_REQUEST;
use crate::devices::virtio::worker::{ChainHandler, GuestLog};
use crate::devices::virtio::GuestMemoryMmap;

/// Why a chain was only partly filled.
#[derive(Debug, thiserror::Error)]
pub(super) enum RngError {
    /// The guest offered a buffer the device may not write.
    #[error("descriptor {index} is device-readable")]
    ReadableDescriptor {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// The host ran out of entropy to give, or getrandom failed.
    #[error("getrandom failed")]
    Entropy(#[source] io::Error),
    /// The buffer is not in guest memory.
    #[error("cannot write to guest memory")]
    GuestWrite(#[source] GuestMemoryError),
}

/// Fills chains from getrandom(2) through a bounce buffer.
#[derive(Debug)]
pub(super) struct RngHandler {
    buffer: Vec<u8>,
}

impl RngHandler {
    pub(super) fn new() -> Self {
        Self {
            buffer: vec![0; MAX_BYTES_PER_REQUEST],
        }
    }
}

impl ChainHandler for RngHandler {
    const NAME: &'static str = "rng";

    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        log: &mut GuestLog,
    ) -> u32 {
        fill_chain(mem, &mut self.buffer, chain).unwrap_or_else(|(written, e)| {
            log.report(&e);
            written
        })
    }
}

/// Fills the chain's writable buffers in order, up to the bounce buffer's length; returns the
/// bytes written, also on error (with the error).
fn fill_chain(
    mem: &GuestMemoryMmap,
    buffer: &mut [u8],
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, (u32, RngError)> {
    let mut written = 0usize;
    for (index, desc) in chain.enumerate() {
        let done = |e| (written as u32, e);
        if !desc.is_write_only() {
            return Err(done(RngError::ReadableDescriptor { index }));
        }
        let room = buffer.len() - written;
        if room == 0 {
            break;
        }
        let len = room.min(desc.len() as usize);
        let chunk = buffer.get_mut(..len).unwrap_or_default();
        fill_random(chunk).map_err(|e| done(RngError::Entropy(e)))?;
        mem.write_slice(chunk, desc.addr())
            .map_err(|e| done(RngError::GuestWrite(e)))?;
        written += len;
    }
    Ok(written as u32)
}

/// Fills `buf` from getrandom(2), retrying short reads and interruptions.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0usize;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` bytes, and
        // getrandom writes at most that many bytes to it.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(ret) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::mmio::testing::{
        guest_memory, readable, writable, TestQueue, XorShift, DATA_ADDR, MEM_SIZE,
    };
    use crate::devices::virtio::worker::QueueWorker;
    use crate::devices::virtio::{IrqKind, IrqTrigger};

    const BUF: u64 = DATA_ADDR;
    const BUF2: u64 = DATA_ADDR + 0x4_0000;

    struct Fixture {
        mem: GuestMemoryMmap,
        tq: TestQueue,
        irq: Arc<IrqTrigger>,
    }

    impl Fixture {
        fn new() -> Self {
            let mem = guest_memory();
            let tq = TestQueue::new(&mem, 16);
            Self {
                mem,
                tq,
                irq: Arc::new(IrqTrigger::new().expect("irq")),
            }
        }

        fn worker(&self) -> QueueWorker<RngHandler> {
            QueueWorker::new(
                self.tq.queue(&self.mem, false),
                self.mem.clone(),
                Arc::clone(&self.irq),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                RngHandler::new(),
            )
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut data = vec![0u8; len];
            self.mem
                .read_slice(&mut data, GuestAddress(addr))
                .expect("read");
            data
        }
    }

    #[test]
    fn test_rng_worker_fills_writable_buffer_and_interrupts() {
        let mut f = Fixture::new();
        let head = f.tq.add_chain(&f.mem, &[writable(BUF, 4096)]);
        let mut worker = f.worker();

        worker.handle_queue_event();

        assert_eq!(f.tq.used_elem(&f.mem, 0), (u32::from(head), 4096));
        assert_ne!(f.bytes(BUF, 4096), vec![0u8; 4096]);
        assert_eq!(f.irq.status(), IrqKind::Vring as u32);
    }

    #[test]
    fn test_rng_worker_fills_every_buffer_of_a_chain() {
        let mut f = Fixture::new();
        f.tq.add_chain(&f.mem, &[writable(BUF, 64), writable(BUF2, 64)]);
        let mut worker = f.worker();

        worker.handle_queue_event();

        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 128);
        assert_ne!(f.bytes(BUF2, 64), vec![0u8; 64]);
    }

    #[test]
    fn test_rng_worker_caps_bytes_per_request() {
        let mut f = Fixture::new();
        let big = 2 * MAX_BYTES_PER_REQUEST as u32;
        f.tq.add_chain(&f.mem, &[writable(BUF, big), writable(BUF2, big)]);
        let mut worker = f.worker();

        worker.handle_queue_event();

        let len = MAX_BYTES_PER_REQUEST;
        assert_eq!(f.tq.used_elem(&f.mem, 0).1, len as u32);
        assert_eq!(f.bytes(BUF + len as u64, 4096), vec![0u8; 4096]);
        assert_eq!(f.bytes(BUF2, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn test_rng_worker_readable_descriptor_stops_the_chain() {
        let mut f = Fixture::new();
        f.tq.add_chain(&f.mem, &[writable(BUF, 32), readable(BUF2, 32)]);
        let mut worker = f.worker();

        worker.handle_queue_event();

        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 32);
        assert_eq!(f.bytes(BUF2, 32), vec![0u8; 32]);
    }

    #[test]
    fn test_rng_worker_buffer_outside_memory_is_used_with_len_zero() {
        let mut f = Fixture::new();
        f.tq.add_chain(&f.mem, &[writable(MEM_SIZE as u64 - 16, 64)]);
        let mut worker = f.worker();

        worker.handle_queue_event();

        assert_eq!(f.tq.used_idx(&f.mem), 1);
        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 0);
    }

    #[test]
    fn test_rng_worker_descriptor_loop_terminates() {
        let mut f = Fixture::new();
        f.tq.set_desc(&f.mem, 0, writable(BUF, 8), Some(0));
        f.tq.push_avail(&f.mem, 0);
        let mut worker = f.worker();

        worker.handle_queue_event();

        assert_eq!(f.tq.used_elem(&f.mem, 0), (0, 16 * 8));
    }

    #[test]
    fn test_rng_worker_thread_serves_notification_and_stops() {
        let mut f = Fixture::new();
        let worker = f.worker();
        let kick = worker.queue_evt().try_clone().expect("clone");
        let mut handle = worker.spawn().expect("spawn");
        f.tq.add_chain(&f.mem, &[writable(BUF, 16)]);

        kick.write(1).expect("kick");
        let served = f.tq.wait_used(&f.mem, 1);
        let stopped = handle.shutdown();

        assert!(served);
        assert!(stopped);
    }

    #[test]
    fn test_fill_random_fills_large_buffer() {
        let mut buf = vec![0u8; 1 << 20];

        fill_random(&mut buf).expect("getrandom");

        assert_ne!(buf[buf.len() - 64..], [0u8; 64]);
    }

    #[test]
    fn test_rng_worker_random_descriptor_tables_never_panic() {
        let mut f = Fixture::new();
        let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut worker = f.worker();

        for _ in 0..500 {
            f.tq.scramble(&f.mem, &mut rng, BUF);
            worker.handle_queue_event();
        }

        assert!(f.tq.used_idx(&f.mem) <= 1500);
    }
}
