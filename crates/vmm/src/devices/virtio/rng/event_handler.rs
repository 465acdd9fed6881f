//! The virtio-rng worker thread. It waits (epoll) on the request queue's eventfd and on a stop
//! eventfd; on a notification it fills the device-writable buffers of every available chain
//! with bytes from getrandom(2), at most [`MAX_BYTES_PER_REQUEST`] per chain through a bounce
//! buffer allocated once, and interrupts the driver when the queue says so.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::MAX_BYTES_PER_REQUEST;
use crate::devices::virtio::mmio::{error_chain, LogLimiter, GUEST_LOG_INTERVAL};
use crate::devices::virtio::{GuestMemoryMmap, IrqKind, IrqTrigger};

const QUEUE_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;
/// Chains served before the worker looks at its stop eventfd again.
const BATCH: usize = 256;

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

/// A running worker thread.
#[derive(Debug)]
pub(super) struct WorkerHandle {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it; false if it could not be told to stop.
    pub(super) fn shutdown(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        if let Err(e) = self.stop_evt.write(1) {
            error!("virtio-rng: cannot stop the worker: {e}");
            self.thread = Some(thread);
            return false;
        }
        if thread.join().is_err() {
            error!("virtio-rng: the worker panicked");
        }
        true
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves the request queue of one activation.
#[derive(Debug)]
pub(super) struct RngWorker {
    queue: Queue,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queue_evt: EventFd,
    buffer: Vec<u8>,
    log: LogLimiter,
}

impl RngWorker {
    pub(super) fn new(
        queue: Queue,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        queue_evt: EventFd,
    ) -> Self {
        Self {
            queue,
            mem,
            irq,
            queue_evt,
            buffer: vec![0; MAX_BYTES_PER_REQUEST],
            log: LogLimiter::new(GUEST_LOG_INTERVAL),
        }
    }

    /// Starts the thread.
    pub(super) fn spawn(self) -> io::Result<WorkerHandle> {
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.queue_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, QUEUE_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let thread = thread::Builder::new()
            .name("hearth-rng".into())
            .spawn(move || self.run(&epoll))?;
        Ok(WorkerHandle {
            stop_evt,
            thread: Some(thread),
        })
    }

    fn run(mut self, epoll: &Epoll) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let count = match epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("virtio-rng: the worker cannot wait for events: {e}");
                    return;
                }
            };
            for event in events.iter().take(count) {
                match event.data() {
                    STOP_TOKEN => return,
                    QUEUE_TOKEN => {
                        // EAGAIN means another wake-up already consumed the count.
                        let _ = self.queue_evt.read();
                        self.handle_queue_event();
                    }
                    _ => {}
                }
            }
        }
    }

    /// Fills the available chains and interrupts the driver if it asked for it.
    pub(super) fn handle_queue_event(&mut self) {
        if self.process_queue() {
            self.signal_used();
        }
    }

    /// Serves up to [`BATCH`] chains; returns whether any was returned to the used ring.
    fn process_queue(&mut self) -> bool {
        let Self {
            queue,
            mem,
            queue_evt,
            buffer,
            log,
            ..
        } = self;
        let mut served = 0usize;
        loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                report(log, &e);
            }
            loop {
                if served == BATCH {
                    // Come back after looking at the stop eventfd.
                    if let Err(e) = queue_evt.write(1) {
                        error!("virtio-rng: cannot requeue the queue event: {e}");
                    }
                    return true;
                }
                let chain = match queue.iter(&*mem) {
                    Ok(mut available) => available.next(),
                    Err(e) => {
                        // A driver that published a bogus index; wait for its next kick.
                        report(log, &e);
                        let _ = queue.enable_notification(&*mem);
                        return served > 0;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let len = fill_chain(mem, buffer, chain).unwrap_or_else(|(written, e)| {
                    report(log, &e);
                    written
                });
                if let Err(e) = queue.add_used(&*mem, head, len) {
                    report(log, &e);
                }
                served += 1;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    report(log, &e);
                    break;
                }
            }
        }
        served > 0
    }

    fn signal_used(&mut self) {
        let notify = match self.queue.needs_notification(&self.mem) {
            Ok(notify) => notify,
            Err(e) => {
                report(&mut self.log, &e);
                true
            }
        };
        if notify {
            if let Err(e) = self.irq.trigger(IrqKind::Vring) {
                error!("virtio-rng: cannot interrupt the driver: {e}");
            }
        }
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

fn report(log: &mut LogLimiter, e: &dyn std::error::Error) {
    if let Some(dropped) = log.allow() {
        warn!(
            "virtio-rng: {} ({dropped} similar messages suppressed)",
            error_chain(e)
        );
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::mmio::testing::{
        guest_memory, random_desc, readable, writable, TestQueue, XorShift, DATA_ADDR, MEM_SIZE,
    };

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

        fn worker(&self) -> RngWorker {
            RngWorker::new(
                self.tq.queue(&self.mem, false),
                self.mem.clone(),
                Arc::clone(&self.irq),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
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
        let kick = worker.queue_evt.try_clone().expect("clone");
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
            for index in 0..16 {
                f.tq.set_raw_desc(&f.mem, index, random_desc(&mut rng, BUF));
            }
            for _ in 0..rng.next() % 4 {
                f.tq.push_avail(&f.mem, (rng.next() % 20) as u16);
            }
            worker.handle_queue_event();
        }

        assert!(f.tq.used_idx(&f.mem) <= 1500);
    }
}
