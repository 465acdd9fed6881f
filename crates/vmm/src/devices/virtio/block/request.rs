//! virtio-blk requests (virtio 1.2, section 5.2.6): turning a descriptor chain into a
//! [`Request`] and executing it against a [`Disk`]. No queue and no thread here, so that every
//! rule can be tested against plain guest memory.
//!
//! A chain is a 16-byte device-readable header descriptor (type, reserved, sector), data
//! descriptors (device-writable for IN and GET_ID, device-readable for OUT; ignored for FLUSH
//! and unsupported types), and a device-writable status descriptor whose first byte receives
//! the status. Everything the guest wrote is checked before the disk is touched: descriptor
//! directions, lengths and addresses, the sector range against the capacity, with
//! overflow-checked arithmetic and caps on the descriptor count and the data length.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;

use super::disk::{Disk, DiskError};
use super::{ID_BYTES, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::devices::virtio::GuestMemoryMmap;

/// Length of the request header.
pub const HEADER_LEN: u32 = 16;
/// Most descriptors in a chain: the header, [`SEG_MAX`] data descriptors and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Most data bytes in one request: what `seg_max` and `size_max` allow together.
pub const MAX_DATA_LEN: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request type is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else, answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// Why a request was rejected or failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor (a head index past the table, or an unreadable
    /// indirect table).
    #[error("the descriptor chain is empty")]
    EmptyChain,
    /// The chain is longer than [`MAX_DESCRIPTORS`].
    #[error("the descriptor chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// The last descriptor is not a device-writable buffer of at least one byte in guest
    /// memory.
    #[error("the chain does not end with a device-writable status byte")]
    MissingStatus,
    /// The chain holds only a status descriptor.
    #[error("the chain has no header descriptor")]
    MissingHeader,
    /// The header descriptor is device-writable.
    #[error("the header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is not 16 bytes long.
    #[error("the header descriptor is {len} bytes long, not {HEADER_LEN}")]
    HeaderLength {
        /// The descriptor's length.
        len: u32,
    },
    /// The header could not be read from guest memory.
    #[error("cannot read the request header")]
    HeaderRead(#[source] GuestMemoryError),
    /// A data descriptor goes the wrong way for the request type.
    #[error("data descriptor {index} has the wrong direction for the request")]
    DataDirection {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A data descriptor is longer than `size_max`.
    #[error("data descriptor {index} is {len} bytes long, above size_max")]
    SegmentTooLong {
        /// Position of the descriptor in the chain.
        index: usize,
        /// The descriptor's length.
        len: u32,
    },
    /// A data descriptor does not lie in guest memory.
    #[error("data descriptor {index} at {addr:#x} of {len} bytes is outside guest memory")]
    SegmentOutOfMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// The descriptor's guest address.
        addr: u64,
        /// The descriptor's length.
        len: u32,
    },
    /// The data descriptors hold more than [`MAX_DATA_LEN`] bytes.
    #[error("the request carries more than {MAX_DATA_LEN} data bytes")]
    DataTooLong,
    /// An IN or OUT request's data is not a whole number of sectors.
    #[error("the data length {len} is not a multiple of {SECTOR_SIZE}")]
    PartialSector {
        /// The total data length.
        len: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("{count} sectors from sector {sector} go past the capacity of {capacity} sectors")]
    SectorRange {
        /// The first sector.
        sector: u64,
        /// The number of sectors.
        count: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A write reached a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The request type is not implemented.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// GET_ID on a disk configured without an ID.
    #[error("the disk has no ID")]
    NoId,
    /// The ID or the status could not be written to guest memory.
    #[error("cannot write the response to guest memory")]
    GuestWrite(#[source] GuestMemoryError),
    /// The disk failed.
    #[error("disk access failed")]
    Disk(#[source] DiskError),
}

impl RequestError {
    /// The status byte that reports this error to the driver.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::NoId => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A chain that does not form a request, and where to report that: the status byte if the
/// chain has a usable one, otherwise nowhere (the chain is returned with a used length of 0).
#[derive(Debug)]
pub struct Malformed {
    /// The status byte's guest address, if the chain ends with a usable one.
    pub status: Option<GuestAddress>,
    /// What is wrong.
    pub error: RequestError,
}

/// A guest buffer that data moves to or from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    request_type: RequestType,
    sector: u64,
    data: Vec<Segment>,
    data_len: u64,
    status: GuestAddress,
}

impl Request {
    /// Parses and validates the descriptors of one chain for a disk of `capacity` sectors.
    pub fn parse<I>(mem: &GuestMemoryMmap, chain: I, capacity: u64) -> Result<Self, Malformed>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let descs: Vec<Descriptor> = chain.into_iter().take(MAX_DESCRIPTORS + 1).collect();
        let unreported = |error| Malformed {
            status: None,
            error,
        };
        if descs.len() > MAX_DESCRIPTORS {
            return Err(unreported(RequestError::TooManyDescriptors));
        }
        let (last, rest) = descs
            .split_last()
            .ok_or_else(|| unreported(RequestError::EmptyChain))?;
        let status =
            status_address(mem, last).ok_or_else(|| unreported(RequestError::MissingStatus))?;
        Self::parse_with_status(mem, rest, capacity, status).map_err(|error| Malformed {
            status: Some(status),
            error,
        })
    }

    fn parse_with_status(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        capacity: u64,
        status: GuestAddress,
    ) -> Result<Self, RequestError> {
        let (header, data_descs) = descs.split_first().ok_or(RequestError::MissingHeader)?;
        let (request_type, sector) = read_header(mem, header)?;
        let (data, data_len) = match request_type {
            RequestType::In | RequestType::GetId => data_segments(mem, data_descs, true)?,
            RequestType::Out => data_segments(mem, data_descs, false)?,
            RequestType::Flush | RequestType::Unsupported(_) => (Vec::new(), 0),
        };
        if matches!(request_type, RequestType::In | RequestType::Out) {
            check_sectors(sector, data_len, capacity)?;
        }
        Ok(Self {
            request_type,
            sector,
            data,
            data_len,
            status,
        })
    }

    /// What the request asks for.
    pub fn request_type(&self) -> RequestType {
        self.request_type
    }

    /// The first sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// The data buffers, in chain order.
    pub fn data(&self) -> &[Segment] {
        &self.data
    }

    /// The guest address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// Runs the request; returns how many bytes it wrote into the guest's data buffers.
    pub fn execute(&self, mem: &GuestMemoryMmap, disk: &Disk) -> Result<u32, RequestError> {
        match self.request_type {
            RequestType::In => {
                disk.read_to_guest(mem, &self.data, self.disk_offset(disk)?)
                    .map_err(RequestError::Disk)?;
                Ok(u32::try_from(self.data_len).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                if disk.is_read_only() {
                    return Err(RequestError::ReadOnly);
                }
                disk.write_from_guest(mem, &self.data, self.disk_offset(disk)?)
                    .map_err(RequestError::Disk)?;
                Ok(0)
            }
            RequestType::Flush => disk.flush().map(|()| 0).map_err(RequestError::Disk),
            RequestType::GetId => self.write_id(mem, disk),
            RequestType::Unsupported(value) => Err(RequestError::Unsupported(value)),
        }
    }

    /// Where on `disk` the data starts; checks the range against this disk (parsing checked it
    /// against the capacity).
    fn disk_offset(&self, disk: &Disk) -> Result<u64, RequestError> {
        check_sectors(self.sector, self.data_len, disk.sectors())?;
        Ok(self.sector * SECTOR_SIZE)
    }

    fn write_id(&self, mem: &GuestMemoryMmap, disk: &Disk) -> Result<u32, RequestError> {
        let id = disk.id().ok_or(RequestError::NoId)?;
        let mut rest: &[u8] = id;
        for seg in &self.data {
            let n = rest.len().min(seg.len as usize);
            let (chunk, tail) = rest.split_at(n);
            mem.write_slice(chunk, seg.addr)
                .map_err(RequestError::GuestWrite)?;
            rest = tail;
        }
        Ok((ID_BYTES - rest.len()) as u32)
    }
}

/// Writes the status byte; returns the used length: the data bytes written plus the status.
pub fn complete(
    mem: &GuestMemoryMmap,
    status: GuestAddress,
    code: u8,
    written: u32,
) -> Result<u32, RequestError> {
    mem.write_obj(code, status)
        .map_err(RequestError::GuestWrite)?;
    Ok(written.saturating_add(1))
}

fn status_address(mem: &GuestMemoryMmap, desc: &Descriptor) -> Option<GuestAddress> {
    let usable = desc.is_write_only()
        && desc.len() >= 1
        && GuestMemory::check_range(mem, desc.addr(), 1, Permissions::Write);
    usable.then_some(desc.addr())
}

fn read_header(
    mem: &GuestMemoryMmap,
    desc: &Descriptor,
) -> Result<(RequestType, u64), RequestError> {
    if desc.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if desc.len() != HEADER_LEN {
        return Err(RequestError::HeaderLength { len: desc.len() });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, desc.addr())
        .map_err(RequestError::HeaderRead)?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    Ok((request_type.into(), sector))
}

/// Checks the data descriptors (`index` counts from the header at 0) and returns them with
/// their total length.
fn data_segments(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    device_writes: bool,
) -> Result<(Vec<Segment>, u64), RequestError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    let mut segments = Vec::with_capacity(descs.len());
    for (i, desc) in descs.iter().enumerate() {
        let index = i + 1;
        let len = desc.len();
        if desc.is_write_only() != device_writes {
            return Err(RequestError::DataDirection { index });
        }
        if len > SIZE_MAX {
            return Err(RequestError::SegmentTooLong { index, len });
        }
        if !GuestMemory::check_range(mem, desc.addr(), len as usize, access) {
            return Err(RequestError::SegmentOutOfMemory {
                index,
                addr: desc.addr().0,
                len,
            });
        }
        total = total
            .checked_add(u64::from(len))
            .filter(|&total| total <= MAX_DATA_LEN)
            .ok_or(RequestError::DataTooLong)?;
        segments.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    Ok((segments, total))
}

fn check_sectors(sector: u64, data_len: u64, capacity: u64) -> Result<(), RequestError> {
    if data_len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector { len: data_len });
    }
    let count = data_len / SECTOR_SIZE;
    let in_range = sector.checked_add(count).is_some_and(|end| end <= capacity);
    if !in_range {
        return Err(RequestError::SectorRange {
            sector,
            count,
            capacity,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueT;

    use super::super::test_utils::TempImage;
    use super::*;
    use crate::devices::virtio::mmio::testing::{
        guest_memory, readable, writable, TestDesc, TestQueue, DATA_ADDR, MEM_SIZE,
    };

    const HEADER: u64 = DATA_ADDR;
    const BUF: u64 = DATA_ADDR + 0x1000;
    const BUF2: u64 = DATA_ADDR + 0x3000;
    const STATUS: u64 = DATA_ADDR + 0x8000;
    const CAPACITY: u64 = 8;

    fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER))
            .expect("header");
    }

    /// Makes `descs` available in a fresh queue and parses the chain the device pops.
    fn parse(mem: &GuestMemoryMmap, descs: &[TestDesc]) -> Result<Request, Malformed> {
        let mut tq = TestQueue::new(mem, 16);
        tq.add_chain(mem, descs);
        let mut queue = tq.queue(mem, false);
        let chain = queue.pop_descriptor_chain(mem).expect("chain");
        Request::parse(mem, chain, CAPACITY)
    }

    fn header() -> TestDesc {
        readable(HEADER, 16)
    }

    fn status() -> TestDesc {
        writable(STATUS, 1)
    }

    fn error_of(result: Result<Request, Malformed>) -> (Option<GuestAddress>, RequestError) {
        let malformed = result.expect_err("malformed");
        (malformed.status, malformed.error)
    }

    #[test]
    fn test_parse_read_returns_request_with_segments() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 2);

        let request = parse(
            &mem,
            &[header(), writable(BUF, 512), writable(BUF2, 1024), status()],
        )
        .expect("request");

        assert_eq!(request.request_type(), RequestType::In);
        assert_eq!(request.sector(), 2);
        assert_eq!(
            request.data(),
            [
                Segment {
                    addr: GuestAddress(BUF),
                    len: 512
                },
                Segment {
                    addr: GuestAddress(BUF2),
                    len: 1024
                }
            ]
        );
        assert_eq!(request.status_addr(), GuestAddress(STATUS));
    }

    #[test]
    fn test_parse_header_shorter_than_16_bytes_is_malformed_with_status() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let (status, error) = error_of(parse(&mem, &[readable(HEADER, 8), status()]));

        assert_eq!(status, Some(GuestAddress(STATUS)));
        assert!(matches!(error, RequestError::HeaderLength { len: 8 }));
    }

    #[test]
    fn test_parse_zero_length_header_is_malformed() {
        let mem = guest_memory();

        let (_, error) = error_of(parse(&mem, &[readable(HEADER, 0), status()]));

        assert!(matches!(error, RequestError::HeaderLength { len: 0 }));
    }

    #[test]
    fn test_parse_writable_header_is_malformed() {
        let mem = guest_memory();

        let (_, error) = error_of(parse(&mem, &[writable(HEADER, 16), status()]));

        assert!(matches!(error, RequestError::HeaderWritable));
    }

    #[test]
    fn test_parse_header_outside_memory_is_malformed() {
        let mem = guest_memory();

        let (_, error) = error_of(parse(&mem, &[readable(MEM_SIZE as u64 - 8, 16), status()]));

        assert!(matches!(error, RequestError::HeaderRead(_)));
    }

    #[test]
    fn test_parse_read_into_readable_buffer_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let (_, error) = error_of(parse(&mem, &[header(), readable(BUF, 512), status()]));

        assert!(matches!(error, RequestError::DataDirection { index: 1 }));
    }

    #[test]
    fn test_parse_write_from_writable_buffer_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);

        let (_, error) = error_of(parse(
            &mem,
            &[header(), readable(BUF, 512), writable(BUF2, 512), status()],
        ));

        assert!(matches!(error, RequestError::DataDirection { index: 2 }));
    }

    #[test]
    fn test_parse_readable_last_descriptor_is_malformed_without_status() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);

        let (status, error) = error_of(parse(&mem, &[header(), readable(BUF, 512)]));

        assert_eq!(status, None);
        assert!(matches!(error, RequestError::MissingStatus));
    }

    #[test]
    fn test_parse_zero_length_status_is_malformed_without_status() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        let (status, error) = error_of(parse(&mem, &[header(), writable(STATUS, 0)]));

        assert_eq!(status, None);
        assert!(matches!(error, RequestError::MissingStatus));
    }

    #[test]
    fn test_parse_status_outside_memory_is_malformed_without_status() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        let (status, _) = error_of(parse(&mem, &[header(), writable(MEM_SIZE as u64, 1)]));

        assert_eq!(status, None);
    }

    #[test]
    fn test_parse_status_only_is_missing_header() {
        let mem = guest_memory();

        let (status, error) = error_of(parse(&mem, &[status()]));

        assert_eq!(status, Some(GuestAddress(STATUS)));
        assert!(matches!(error, RequestError::MissingHeader));
    }

    #[test]
    fn test_parse_data_outside_memory_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let addr = MEM_SIZE as u64 - 256;

        let (_, error) = error_of(parse(&mem, &[header(), writable(addr, 512), status()]));

        assert!(matches!(
            error,
            RequestError::SegmentOutOfMemory {
                index: 1,
                len: 512,
                ..
            }
        ));
    }

    #[test]
    fn test_parse_data_at_top_of_address_space_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let (_, error) = error_of(parse(
            &mem,
            &[header(), writable(u64::MAX - 100, 512), status()],
        ));

        assert!(matches!(error, RequestError::SegmentOutOfMemory { .. }));
    }

    #[test]
    fn test_parse_sector_past_capacity_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, CAPACITY - 1);

        let (_, error) = error_of(parse(&mem, &[header(), writable(BUF, 1024), status()]));

        assert!(matches!(
            error,
            RequestError::SectorRange {
                sector: 7,
                count: 2,
                capacity: 8
            }
        ));
    }

    #[test]
    fn test_parse_sector_overflowing_u64_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, u64::MAX);

        let (_, error) = error_of(parse(&mem, &[header(), readable(BUF, 512), status()]));

        assert!(matches!(error, RequestError::SectorRange { .. }));
    }

    #[test]
    fn test_parse_partial_sector_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let (_, error) = error_of(parse(&mem, &[header(), writable(BUF, 100), status()]));

        assert!(matches!(error, RequestError::PartialSector { len: 100 }));
    }

    #[test]
    fn test_parse_segment_above_size_max_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let (_, error) = error_of(parse(
            &mem,
            &[header(), writable(BUF, SIZE_MAX + 512), status()],
        ));

        assert!(matches!(
            error,
            RequestError::SegmentTooLong { index: 1, .. }
        ));
    }

    #[test]
    fn test_parse_unknown_type_is_unsupported_request() {
        let mem = guest_memory();
        write_header(&mem, 77, 0);

        let request = parse(&mem, &[header(), readable(BUF, 7), status()]).expect("request");

        assert_eq!(request.request_type(), RequestType::Unsupported(77));
    }

    #[test]
    fn test_parse_flush_ignores_data_descriptors() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        let request = parse(&mem, &[header(), writable(BUF, 3), status()]).expect("request");

        assert_eq!(request.request_type(), RequestType::Flush);
        assert!(request.data().is_empty());
    }

    #[test]
    fn test_parse_descriptor_loop_stops_and_is_malformed() {
        let mem = guest_memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut tq = TestQueue::new(&mem, 16);
        tq.set_desc(&mem, 0, header(), Some(1));
        tq.set_desc(&mem, 1, writable(BUF, 512), Some(0));
        tq.push_avail(&mem, 0);
        let mut queue = tq.queue(&mem, false);
        let chain = queue.pop_descriptor_chain(&mem).expect("chain");

        let (status, error) = error_of(Request::parse(&mem, chain, CAPACITY));

        assert_eq!(status, Some(GuestAddress(BUF)));
        assert!(matches!(error, RequestError::DataDirection { index: 2 }));
    }

    #[test]
    fn test_parse_head_past_descriptor_table_is_empty_chain() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 16);
        tq.push_avail(&mem, 200);
        let mut queue = tq.queue(&mem, false);
        let chain = queue.pop_descriptor_chain(&mem).expect("chain");

        let (status, error) = error_of(Request::parse(&mem, chain, CAPACITY));

        assert_eq!(status, None);
        assert!(matches!(error, RequestError::EmptyChain));
    }

    #[test]
    fn test_parse_more_than_max_descriptors_is_malformed_without_status() {
        let mem = guest_memory();
        let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        let descs = vec![Descriptor::new(STATUS, 1, flags, 0); MAX_DESCRIPTORS + 1];

        let (status, error) = error_of(Request::parse(&mem, descs, CAPACITY));

        assert_eq!(status, None);
        assert!(matches!(error, RequestError::TooManyDescriptors));
    }

    #[test]
    fn test_parse_max_segments_of_size_max_is_accepted() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE_MAX as usize)]).expect("memory");
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 0)];
        let data = Descriptor::new(
            0,
            SIZE_MAX,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        );
        descs.extend(std::iter::repeat_n(data, SEG_MAX as usize));
        descs.push(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0));

        let result = Request::parse(&mem, descs, u64::MAX);

        assert!(result.is_ok());
    }

    fn disk(image: &TempImage, read_only: bool, id: Option<&str>) -> Disk {
        Disk::open(image.path(), read_only, id).expect("disk")
    }

    #[test]
    fn test_execute_read_fills_each_segment_in_order() {
        let mem = guest_memory();
        let image = TempImage::with_pattern(8 * 512);
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        let request = parse(
            &mem,
            &[header(), writable(BUF, 512), writable(BUF2, 1024), status()],
        )
        .expect("request");

        let written = request
            .execute(&mem, &disk(&image, true, None))
            .expect("read");

        let mut first = vec![0u8; 512];
        let mut second = vec![0u8; 1024];
        mem.read_slice(&mut first, GuestAddress(BUF))
            .expect("first");
        mem.read_slice(&mut second, GuestAddress(BUF2))
            .expect("second");
        let contents = image.contents();
        assert_eq!(written, 1536);
        assert_eq!(first, contents[512..1024]);
        assert_eq!(second, contents[1024..2048]);
    }

    #[test]
    fn test_execute_write_stores_guest_data_at_sector() {
        let mem = guest_memory();
        let image = TempImage::with_len(8 * 512);
        mem.write_slice(&[0x5a; 512], GuestAddress(BUF))
            .expect("data");
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        let request = parse(&mem, &[header(), readable(BUF, 512), status()]).expect("request");

        let written = request
            .execute(&mem, &disk(&image, false, None))
            .expect("write");

        let contents = image.contents();
        assert_eq!(written, 0);
        assert_eq!(contents[3 * 512..4 * 512], [0x5a; 512]);
        assert_eq!(contents[..3 * 512], [0; 3 * 512]);
    }

    #[test]
    fn test_execute_write_to_read_only_disk_fails_and_keeps_file() {
        let mem = guest_memory();
        let image = TempImage::with_pattern(8 * 512);
        let before = image.contents();
        mem.write_slice(&[0x5a; 512], GuestAddress(BUF))
            .expect("data");
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let request = parse(&mem, &[header(), readable(BUF, 512), status()]).expect("request");

        let error = request
            .execute(&mem, &disk(&image, true, None))
            .expect_err("read-only");

        assert!(matches!(error, RequestError::ReadOnly));
        assert_eq!(error.status(), STATUS_IOERR);
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn test_execute_flush_succeeds() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let request = parse(&mem, &[header(), status()]).expect("request");

        let written = request
            .execute(&mem, &disk(&image, false, None))
            .expect("flush");

        assert_eq!(written, 0);
    }

    #[test]
    fn test_execute_get_id_writes_20_bytes() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let request = parse(&mem, &[header(), writable(BUF, 64), status()]).expect("request");

        let written = request
            .execute(&mem, &disk(&image, true, Some("rootfs")))
            .expect("id");

        let mut id = [0xffu8; ID_BYTES];
        mem.read_slice(&mut id, GuestAddress(BUF)).expect("id");
        assert_eq!(written, 20);
        assert_eq!(&id[..7], b"rootfs\0");
    }

    #[test]
    fn test_execute_get_id_into_short_buffer_truncates() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let request = parse(&mem, &[header(), writable(BUF, 4), status()]).expect("request");

        let written = request
            .execute(&mem, &disk(&image, true, Some("rootfs")))
            .expect("id");

        assert_eq!(written, 4);
    }

    #[test]
    fn test_execute_get_id_without_id_is_unsupported() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let request = parse(&mem, &[header(), writable(BUF, 20), status()]).expect("request");

        let error = request
            .execute(&mem, &disk(&image, true, None))
            .expect_err("no id");

        assert_eq!(error.status(), STATUS_UNSUPP);
    }

    #[test]
    fn test_execute_unsupported_type_reports_unsupp() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, 11, 0);
        let request = parse(&mem, &[header(), status()]).expect("request");

        let error = request
            .execute(&mem, &disk(&image, false, None))
            .expect_err("unsupported");

        assert_eq!(error.status(), STATUS_UNSUPP);
    }

    #[test]
    fn test_execute_read_past_smaller_disk_fails() {
        let mem = guest_memory();
        let image = TempImage::with_len(512);
        write_header(&mem, VIRTIO_BLK_T_IN, 4);
        let request = parse(&mem, &[header(), writable(BUF, 512), status()]).expect("request");

        let error = request
            .execute(&mem, &disk(&image, true, None))
            .expect_err("range");

        assert!(matches!(error, RequestError::SectorRange { .. }));
    }

    #[test]
    fn test_complete_writes_status_and_counts_it() {
        let mem = guest_memory();

        let used = complete(&mem, GuestAddress(STATUS), STATUS_IOERR, 512).expect("complete");

        let code: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
        assert_eq!((used, code), (513, STATUS_IOERR));
    }
}
