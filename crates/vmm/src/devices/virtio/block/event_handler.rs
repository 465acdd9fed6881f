//! The virtio-blk worker thread. It waits (epoll) on the request queue's eventfd and on a stop
//! eventfd; on a notification it serves every available chain, returns each to the used ring
//! and interrupts the driver when the queue says the driver wants it (EVENT_IDX aware). A
//! malformed chain costs the guest an IOERR, never the worker. If the driver did not accept
//! VIRTIO_BLK_F_FLUSH the disk is write-through: every write is made durable before it
//! completes (virtio 1.2, section 5.2.6.2).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{
    complete, Malformed, Request, RequestError, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::devices::virtio::mmio::{error_chain, LogLimiter, GUEST_LOG_INTERVAL};
use crate::devices::virtio::{GuestMemoryMmap, IrqKind, IrqTrigger};

const QUEUE_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;
/// Chains served before the worker looks at its stop eventfd again.
const BATCH: usize = 256;

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
            error!("virtio-blk: cannot stop the worker: {e}");
            self.thread = Some(thread);
            return false;
        }
        if thread.join().is_err() {
            error!("virtio-blk: the worker panicked");
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
pub(super) struct BlockWorker {
    queue: Queue,
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
    irq: Arc<IrqTrigger>,
    queue_evt: EventFd,
    write_through: bool,
    log: LogLimiter,
}

impl BlockWorker {
    pub(super) fn new(
        queue: Queue,
        mem: GuestMemoryMmap,
        disk: Arc<Disk>,
        irq: Arc<IrqTrigger>,
        queue_evt: EventFd,
    ) -> Self {
        Self {
            queue,
            mem,
            disk,
            irq,
            queue_evt,
            write_through: false,
            log: LogLimiter::new(GUEST_LOG_INTERVAL),
        }
    }

    /// Makes every write durable before it completes (no FLUSH negotiated).
    pub(super) fn with_write_through(mut self, write_through: bool) -> Self {
        self.write_through = write_through;
        self
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
            .name("hearth-blk".into())
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
                    error!("virtio-blk: the worker cannot wait for events: {e}");
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

    /// Serves the available chains and interrupts the driver if it asked for it.
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
            disk,
            log,
            queue_evt,
            write_through,
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
                        error!("virtio-blk: cannot requeue the queue event: {e}");
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
                let len = serve(mem, disk, *write_through, log, chain);
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
                error!("virtio-blk: cannot interrupt the driver: {e}");
            }
        }
    }
}

/// Parses and executes one chain and writes its status; returns the used length.
fn serve(
    mem: &GuestMemoryMmap,
    disk: &Disk,
    write_through: bool,
    log: &mut LogLimiter,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let (status, code, written) = match Request::parse(mem, chain, disk.sectors()) {
        Ok(request) => match execute(&request, mem, disk, write_through) {
            Ok(written) => (request.status_addr(), STATUS_OK, written),
            Err(e) => {
                if e.status() != STATUS_UNSUPP {
                    report(log, &e);
                }
                (request.status_addr(), e.status(), 0)
            }
        },
        Err(Malformed { status, error }) => {
            report(log, &error);
            let Some(status) = status else {
                return 0;
            };
            (status, STATUS_IOERR, 0)
        }
    };
    complete(mem, status, code, written).unwrap_or_else(|e| {
        report(log, &e);
        0
    })
}

fn execute(
    request: &Request,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    write_through: bool,
) -> Result<u32, RequestError> {
    let written = request.execute(mem, disk)?;
    if write_through && request.request_type() == RequestType::Out {
        disk.flush().map_err(RequestError::Disk)?;
    }
    Ok(written)
}

fn report(log: &mut LogLimiter, e: &dyn std::error::Error) {
    if let Some(dropped) = log.allow() {
        warn!(
            "virtio-blk: {} ({dropped} similar messages suppressed)",
            error_chain(e)
        );
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::TempImage;
    use super::*;
    use crate::devices::virtio::mmio::testing::{
        guest_memory, random_desc, readable, writable, TestQueue, XorShift, DATA_ADDR, MEM_SIZE,
    };

    const HEADER: u64 = DATA_ADDR;
    const HEADER2: u64 = DATA_ADDR + 0x100;
    const BUF: u64 = DATA_ADDR + 0x1000;
    const STATUS: u64 = DATA_ADDR + 0x8000;
    const STATUS2: u64 = DATA_ADDR + 0x8010;

    struct Fixture {
        mem: GuestMemoryMmap,
        tq: TestQueue,
        image: TempImage,
        irq: Arc<IrqTrigger>,
    }

    impl Fixture {
        fn new(image: TempImage) -> Self {
            let mem = guest_memory();
            let tq = TestQueue::new(&mem, 16);
            Self {
                mem,
                tq,
                image,
                irq: Arc::new(IrqTrigger::new().expect("irq")),
            }
        }

        fn worker(&self, read_only: bool, event_idx: bool) -> BlockWorker {
            let disk = Disk::open(self.image.path(), read_only, None).expect("disk");
            BlockWorker::new(
                self.tq.queue(&self.mem, event_idx),
                self.mem.clone(),
                Arc::new(disk),
                Arc::clone(&self.irq),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )
        }

        fn header(&self, addr: u64, request_type: u32, sector: u64) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&header, GuestAddress(addr))
                .expect("header");
        }

        fn status(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).expect("status")
        }
    }

    #[test]
    fn test_worker_read_completes_ok_and_interrupts() {
        let mut f = Fixture::new(TempImage::with_pattern(8 * 512));
        f.header(HEADER, VIRTIO_BLK_T_IN, 2);
        let head = f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 1024),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(true, false);

        worker.handle_queue_event();

        let mut data = vec![0u8; 1024];
        f.mem
            .read_slice(&mut data, GuestAddress(BUF))
            .expect("data");
        assert_eq!(f.tq.used_elem(&f.mem, 0), (u32::from(head), 1025));
        assert_eq!(f.status(STATUS), STATUS_OK);
        assert_eq!(data, f.image.contents()[1024..2048]);
        assert_eq!(f.irq.status(), IrqKind::Vring as u32);
    }

    #[test]
    fn test_worker_write_to_read_only_disk_completes_ioerr_and_keeps_file() {
        let mut f = Fixture::new(TempImage::with_pattern(8 * 512));
        let before = f.image.contents();
        f.header(HEADER, VIRTIO_BLK_T_OUT, 0);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                readable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(true, false);

        worker.handle_queue_event();

        assert_eq!(f.status(STATUS), STATUS_IOERR);
        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 1);
        assert_eq!(f.image.contents(), before);
    }

    #[test]
    fn test_worker_out_of_range_sector_completes_ioerr() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.header(HEADER, VIRTIO_BLK_T_IN, 8);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.status(STATUS), STATUS_IOERR);
        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 1);
    }

    #[test]
    fn test_worker_data_outside_memory_completes_ioerr() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(MEM_SIZE as u64 - 512, 1024),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.status(STATUS), STATUS_IOERR);
    }

    #[test]
    fn test_worker_write_through_write_completes_ok_and_lands() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.mem
            .write_slice(&[0xa5; 512], GuestAddress(BUF))
            .expect("data");
        f.header(HEADER, VIRTIO_BLK_T_OUT, 5);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                readable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(false, false).with_write_through(true);

        worker.handle_queue_event();

        assert_eq!(f.status(STATUS), STATUS_OK);
        assert_eq!(f.tq.used_elem(&f.mem, 0).1, 1);
        assert_eq!(f.image.contents()[5 * 512..6 * 512], [0xa5; 512]);
    }

    #[test]
    fn test_worker_missing_status_is_used_with_len_zero() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.header(HEADER, VIRTIO_BLK_T_OUT, 0);
        let head =
            f.tq.add_chain(&f.mem, &[readable(HEADER, 16), readable(BUF, 512)]);
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.tq.used_idx(&f.mem), 1);
        assert_eq!(f.tq.used_elem(&f.mem, 0), (u32::from(head), 0));
    }

    #[test]
    fn test_worker_descriptor_loop_is_used_with_len_zero() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.tq.set_desc(&f.mem, 0, readable(HEADER, 16), Some(0));
        f.tq.push_avail(&f.mem, 0);
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.tq.used_elem(&f.mem, 0), (0, 0));
    }

    #[test]
    fn test_worker_head_past_table_is_skipped_and_next_chain_served() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.tq.push_avail(&f.mem, 300);
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.tq.used_idx(&f.mem), 1);
        assert_eq!(f.status(STATUS), STATUS_OK);
    }

    #[test]
    fn test_worker_bogus_avail_index_returns_without_serving() {
        let f = Fixture::new(TempImage::with_len(8 * 512));
        f.mem
            .write_obj(100u16, GuestAddress(0x2002))
            .expect("avail idx");
        let mut worker = f.worker(false, false);

        worker.handle_queue_event();

        assert_eq!(f.tq.used_idx(&f.mem), 0);
        assert_eq!(f.irq.status(), 0);
    }

    #[test]
    fn test_worker_event_idx_interrupts_only_past_used_event() {
        let mut f = Fixture::new(TempImage::with_len(8 * 512));
        f.tq.set_used_event(&f.mem, 1);
        let mut worker = f.worker(false, true);
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
        worker.handle_queue_event();
        let after_first = f.irq.status();
        f.header(HEADER2, VIRTIO_BLK_T_IN, 1);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER2, 16),
                writable(BUF, 512),
                writable(STATUS2, 1),
            ],
        );

        worker.handle_queue_event();

        assert_eq!(after_first, 0);
        assert_eq!(f.irq.status(), IrqKind::Vring as u32);
        assert_eq!(f.tq.used_idx(&f.mem), 2);
    }

    #[test]
    fn test_worker_thread_serves_notification_and_stops_on_shutdown() {
        let mut f = Fixture::new(TempImage::with_pattern(8 * 512));
        let worker = f.worker(true, false);
        let kick = worker.queue_evt.try_clone().expect("clone");
        let mut handle = worker.spawn().expect("spawn");
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        f.tq.add_chain(
            &f.mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 512),
                writable(STATUS, 1),
            ],
        );

        kick.write(1).expect("kick");
        let served = f.tq.wait_used(&f.mem, 1);
        let stopped = handle.shutdown();

        assert!(served);
        assert!(stopped);
        assert_eq!(f.status(STATUS), STATUS_OK);
    }

    #[test]
    fn test_worker_random_descriptor_tables_never_panic() {
        let mut f = Fixture::new(TempImage::with_pattern(64 * 512));
        let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            11,
        ];
        for slot in 0..64 {
            let request_type = types[rng.next() as usize % types.len()];
            f.header(HEADER + slot * 16, request_type, rng.next() % 80);
        }
        let mut worker = f.worker(false, true);

        for _ in 0..500 {
            for index in 0..16 {
                f.tq.set_raw_desc(&f.mem, index, random_desc(&mut rng, HEADER));
            }
            for _ in 0..rng.next() % 4 {
                f.tq.push_avail(&f.mem, (rng.next() % 20) as u16);
            }
            worker.handle_queue_event();
        }

        assert!(f.tq.used_idx(&f.mem) <= 1500);
    }
}
