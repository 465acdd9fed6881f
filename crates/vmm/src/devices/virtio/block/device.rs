//! [`Block`]: the virtio-blk device as the transport sees it — its features, its
//! configuration space and the lifecycle of its worker thread — and [`BlockConfig`], what the
//! user asks for.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};

use super::disk::{Disk, DiskError};
use super::event_handler::BlockHandler;
use super::{QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::devices::virtio::mmio::error_chain;
use crate::devices::virtio::worker::{QueueWorker, WorkerSlot};
use crate::devices::virtio::{
    device_type, features, ActivateContext, ActivateError, QueuePosition, VirtioDevice,
};

/// Length of the configuration space the device exposes: capacity, size_max, seg_max,
/// geometry (zero) and blk_size (virtio 1.2, section 5.2.4).
const CONFIG_LEN: usize = 24;

/// A block device as configured by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// The raw disk image (or host block device).
    pub path: PathBuf,
    /// Whether the guest may only read.
    pub read_only: bool,
    /// The serial GET_ID returns, at most 20 bytes.
    #[serde(default)]
    pub id: Option<String>,
    /// The data file of a copy-on-write overlay (created if missing): `path` is then a
    /// read-only base and the guest's writes go to the overlay. `read_only` is then ignored.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("cannot set up the disk")]
    Disk(#[source] DiskError),
}

/// A virtio-blk device with one request queue.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_LEN],
    worker: WorkerSlot,
}

impl Block {
    /// Opens the disk of `config`.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let disk = match &config.overlay {
            Some(overlay) => Disk::open_overlay(&config.path, overlay, config.id.as_deref()),
            None => Disk::open(&config.path, config.read_only, config.id.as_deref()),
        }
        .map_err(BlockError::Disk)?;
        let mut avail_features = features::VERSION_1
            | features::RING_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if disk.is_read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config_space[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config_space[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Self {
            disk: Arc::new(disk),
            avail_features,
            acked_features: 0,
            config_space,
            worker: WorkerSlot::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = usize::try_from(offset)
            .ok()
            .and_then(|start| self.config_space.get(start..))
            .unwrap_or(&[]);
        let n = config.len().min(data.len());
        data[..n].copy_from_slice(&config[..n]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the exposed configuration space is writable.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let write_through = self.acked_features & 1 << VIRTIO_BLK_F_FLUSH == 0;
        let handler = BlockHandler::new(Arc::clone(&self.disk)).with_write_through(write_through);
        self.worker.start(QueueWorker::from_context(ctx, handler)?)
    }

    fn reset(&mut self) -> bool {
        self.worker.stop()
    }

    fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError> {
        let positions = self.worker.quiesce()?;
        self.disk
            .flush()
            .map_err(|e| ActivateError::Backend(error_chain(&e)))?;
        Ok(positions)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::request::STATUS_OK;
    use super::super::test_utils::TempImage;
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::testing::{
        guest_memory, readable, writable, TestQueue, DATA_ADDR,
    };
    use crate::devices::virtio::mmio::{reg, status, MmioTransport, NOTIFY_OFFSET};
    use crate::devices::virtio::{GuestMemoryMmap, IrqTrigger};

    fn config(image: &TempImage, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: image.path().to_owned(),
            read_only,
            id: None,
            overlay: None,
        }
    }

    fn read_u32(block: &Block, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        block.read_config(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn test_block_config_space_reports_capacity() {
        let image = TempImage::with_len(16 * 512);
        let block = Block::new(&config(&image, true)).expect("block");
        let mut capacity = [0u8; 8];

        block.read_config(0, &mut capacity);

        assert_eq!(u64::from_le_bytes(capacity), 16);
    }

    #[test]
    fn test_block_config_space_reports_limits_and_block_size() {
        let image = TempImage::with_len(512);
        let block = Block::new(&config(&image, true)).expect("block");

        let values = [
            read_u32(&block, 8),
            read_u32(&block, 12),
            read_u32(&block, 20),
        ];

        assert_eq!(values, [SIZE_MAX, SEG_MAX, 512]);
    }

    #[test]
    fn test_block_read_config_past_end_reads_zeros() {
        let image = TempImage::with_len(512);
        let block = Block::new(&config(&image, true)).expect("block");
        let mut data = [0xffu8; 8];

        block.read_config(20, &mut data);
        let tail = data;
        block.read_config(u64::MAX, &mut data);

        assert_eq!(tail, [0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(data, [0; 8]);
    }

    #[test]
    fn test_block_read_only_disk_offers_ro() {
        let image = TempImage::with_len(512);

        let block = Block::new(&config(&image, true)).expect("block");

        assert_ne!(block.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn test_block_read_write_disk_does_not_offer_ro() {
        let image = TempImage::with_len(512);

        let block = Block::new(&config(&image, false)).expect("block");

        assert_eq!(block.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(block.avail_features() & features::VERSION_1, 0);
    }

    #[test]
    fn test_block_with_overlay_does_not_offer_ro() {
        let image = TempImage::with_len(4096);
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("tempdir");
        let mut config = config(&image, false);
        config.overlay = Some(dir.as_path().join("disk.overlay"));

        let block = Block::new(&config).expect("block");

        assert_eq!(block.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(block.capacity(), 8);
    }

    #[test]
    fn test_block_new_with_id_longer_than_20_bytes_fails() {
        let image = TempImage::with_len(512);
        let mut config = config(&image, true);
        config.id = Some("x".repeat(21));

        let result = Block::new(&config);

        assert!(matches!(
            result,
            Err(BlockError::Disk(DiskError::IdTooLong { len: 21 }))
        ));
    }

    #[test]
    fn test_block_activate_with_two_queues_fails() {
        let image = TempImage::with_len(512);
        let mut block = Block::new(&config(&image, true)).expect("block");
        let mem = guest_memory();
        let tq = TestQueue::new(&mem, 16);
        let ctx = ActivateContext {
            queues: vec![tq.queue(&mem, false), tq.queue(&mem, false)],
            queue_evts: vec![EventFd::new(0).expect("evt"), EventFd::new(0).expect("evt")],
            mem,
            irq: Arc::new(IrqTrigger::new().expect("irq")),
        };

        let result = block.activate(ctx);

        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 1,
                found: 2
            })
        ));
    }

    #[test]
    fn test_block_config_deserializes_without_id() {
        let json = r#"{"path": "/tmp/disk.img", "read_only": true}"#;

        let config: BlockConfig = serde_json::from_str(json).expect("config");

        assert_eq!(config.id, None);
        assert!(config.read_only);
    }

    const HEADER: u64 = DATA_ADDR;
    const BUF: u64 = DATA_ADDR + 0x1000;
    const STATUS: u64 = DATA_ADDR + 0x8000;

    fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Brings the transport to DRIVER_OK with `tq` as queue 0, the way a driver would.
    fn start(t: &mut MmioTransport, tq: &TestQueue) {
        let mut s = status::ACKNOWLEDGE;
        write_reg(t, reg::STATUS, s);
        s |= status::DRIVER;
        write_reg(t, reg::STATUS, s);
        write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
        write_reg(t, reg::DRIVER_FEATURES, 1);
        s |= status::FEATURES_OK;
        write_reg(t, reg::STATUS, s);
        tq.configure(t, 0);
        s |= status::DRIVER_OK;
        write_reg(t, reg::STATUS, s);
    }

    fn read_request(mem: &GuestMemoryMmap, tq: &mut TestQueue, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER))
            .expect("header");
        tq.add_chain(
            mem,
            &[
                readable(HEADER, 16),
                writable(BUF, 512),
                writable(STATUS, 1),
            ],
        );
    }

    #[test]
    fn test_block_behind_transport_serves_read_after_notify() {
        let image = TempImage::with_pattern(8 * 512);
        let block = Block::new(&config(&image, true)).expect("block");
        let mem = guest_memory();
        let mut t = MmioTransport::new(Box::new(block), mem.clone()).expect("transport");
        let mut tq = TestQueue::new(&mem, 16);
        start(&mut t, &tq);
        read_request(&mem, &mut tq, 3);

        write_reg(&mut t, NOTIFY_OFFSET, 0);
        let served = tq.wait_used(&mem, 1);

        let mut data = vec![0u8; 512];
        mem.read_slice(&mut data, GuestAddress(BUF)).expect("data");
        let code: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
        assert!(served);
        assert!(t.is_activated());
        assert_eq!(code, STATUS_OK);
        assert_eq!(data, image.contents()[3 * 512..4 * 512]);
    }

    #[test]
    fn test_block_reset_stops_worker_and_reactivation_serves_again() {
        let image = TempImage::with_pattern(8 * 512);
        let block = Block::new(&config(&image, true)).expect("block");
        let mem = guest_memory();
        let mut t = MmioTransport::new(Box::new(block), mem.clone()).expect("transport");
        let mut tq = TestQueue::new(&mem, 16);
        start(&mut t, &tq);
        write_reg(&mut t, reg::STATUS, 0);
        let after_reset = t.is_activated();
        tq = TestQueue::new(&mem, 16);
        start(&mut t, &tq);
        read_request(&mem, &mut tq, 1);

        write_reg(&mut t, NOTIFY_OFFSET, 0);

        assert!(!after_reset);
        assert!(tq.wait_used(&mem, 1));
    }
}
