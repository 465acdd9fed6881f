//! What the virtio-blk worker does with each chain (the thread itself is the shared
//! [`QueueWorker`](crate::devices::virtio::worker::QueueWorker)): parse it into a request,
//! execute it against the disk and write its status. A malformed chain costs the guest an
//! IOERR, never the worker. If the driver did not accept VIRTIO_BLK_F_FLUSH the disk is
//! write-through: every write is made durable before it completes (virtio 1.2, section
//! 5.2.6.2).

use std::sync::Arc;

use virtio_queue::DescriptorChain;

use super::disk::Disk;
use super::request::{
    complete, Malformed, Request, RequestError, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::devices::virtio::worker::{ChainHandler, GuestLog};
use crate::devices::virtio::GuestMemoryMmap;

/// Serves block requests against one disk.
#[derive(Debug)]
pub(super) struct BlockHandler {
    disk: Arc<Disk>,
    write_through: bool,
}

impl BlockHandler {
    pub(super) fn new(disk: Arc<Disk>) -> Self {
        Self {
            disk,
            write_through: false,
        }
    }

    /// Makes every write durable before it completes (no FLUSH negotiated).
    pub(super) fn with_write_through(mut self, write_through: bool) -> Self {
        self.write_through = write_through;
        self
    }
}

impl BlockHandler {
    fn execute(&self, request: &Request, mem: &GuestMemoryMmap) -> Result<u32, RequestError> {
        let written = request.execute(mem, &self.disk)?;
        if self.write_through && request.request_type() == RequestType::Out {
            self.disk.flush().map_err(RequestError::Disk)?;
        }
        Ok(written)
    }
}

impl ChainHandler for BlockHandler {
    const NAME: &'static str = "blk";

    /// Parses and executes one chain and writes its status; returns the used length.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        log: &mut GuestLog,
    ) -> u32 {
        let (status, code, written) = match Request::parse(mem, chain, self.disk.sectors()) {
            Ok(request) => match self.execute(&request, mem) {
                Ok(written) => (request.status_addr(), STATUS_OK, written),
                Err(e) => {
                    if e.status() != STATUS_UNSUPP {
                        log.report(&e);
                    }
                    (request.status_addr(), e.status(), 0)
                }
            },
            Err(Malformed { status, error }) => {
                log.report(&error);
                let Some(status) = status else {
                    return 0;
                };
                (status, STATUS_IOERR, 0)
            }
        };
        complete(mem, status, code, written).unwrap_or_else(|e| {
            log.report(&e);
            0
        })
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
        guest_memory, readable, writable, TestQueue, XorShift, DATA_ADDR, MEM_SIZE,
    };
    use crate::devices::virtio::worker::QueueWorker;
    use crate::devices::virtio::{IrqKind, IrqTrigger};
    use vmm_sys_util::eventfd::EventFd;

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

        fn handler(&self, read_only: bool) -> BlockHandler {
            let disk = Disk::open(self.image.path(), read_only, None).expect("disk");
            BlockHandler::new(Arc::new(disk))
        }

        fn worker_with(&self, handler: BlockHandler, event_idx: bool) -> QueueWorker<BlockHandler> {
            QueueWorker::new(
                self.tq.queue(&self.mem, event_idx),
                self.mem.clone(),
                Arc::clone(&self.irq),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                handler,
            )
        }

        fn worker(&self, read_only: bool, event_idx: bool) -> QueueWorker<BlockHandler> {
            self.worker_with(self.handler(read_only), event_idx)
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
        let mut worker = f.worker_with(f.handler(false).with_write_through(true), false);

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
        let kick = worker.queue_evt().try_clone().expect("clone");
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
            f.tq.scramble(&f.mem, &mut rng, HEADER);
            worker.handle_queue_event();
        }

        assert!(f.tq.used_idx(&f.mem) <= 1500);
    }
}
