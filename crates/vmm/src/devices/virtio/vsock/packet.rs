//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little endian) and its
//! transfer to and from descriptor chains. Pure: no sockets and no connection state. Everything
//! the guest supplies is checked: a chain too short for a header, a `len` the chain does not
//! hold or above [`MAX_PKT_PAYLOAD`], descriptors outside guest memory. The header and the
//! payload may be split across descriptors in any way.

use std::io::{self, Read, Write};

use virtio_queue::{DescriptorChain, Writer};

use super::super::GuestMemoryMmap;

/// The dirty-bitmap slice guest memory hands out for a descriptor chain.
type BitmapSliceOf<'a> = vm_memory::bitmap::MS<'a, GuestMemoryMmap>;
use super::MAX_PKT_PAYLOAD;

/// The size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// VIRTIO_VSOCK_TYPE_STREAM, the only socket type the device supports.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, the only event-queue event.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused, aborted, or the answer to a full shutdown).
    Rst = 3,
    /// The sender stops receiving and/or sending (flags [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate = 6,
    /// The sender asks for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl Op {
    /// The operation with wire value `raw`, if any.
    pub fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Rst),
            4 => Some(Self::Shutdown),
            5 => Some(Self::Rw),
            6 => Some(Self::CreditUpdate),
            7 => Some(Self::CreditRequest),
            _ => None,
        }
    }
}

/// A packet header with its fields as on the wire (`op` and `type_` raw, since the guest may
/// send any value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// A stream header with the given addresses and operation, no payload and no credit.
    pub fn new(src: (u64, u32), dst: (u64, u32), op: Op) -> Self {
        Self {
            src_cid: src.0,
            dst_cid: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Self::default()
        }
    }

    /// The operation, if it is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    /// Parses the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Serialises to the wire layout.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain does not hold a valid packet, or cannot take one.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// A descriptor of the chain lies outside guest memory.
    #[error("descriptor chain does not map to guest memory")]
    Chain(#[source] virtio_queue::Error),
    /// The device-readable part of a tx chain is shorter than a header.
    #[error("tx chain holds {0} readable bytes, less than a packet header")]
    ShortHeader(usize),
    /// The header's `len` is above [`MAX_PKT_PAYLOAD`].
    #[error("payload length {} is above the {MAX_PKT_PAYLOAD}-byte limit", .0.len)]
    PayloadTooLarge(PacketHeader),
    /// The header's `len` is more than the chain holds after the header.
    #[error("payload length {} is more than the {available} bytes the chain holds", .header.len)]
    ShortPayload {
        /// The header as the guest sent it.
        header: PacketHeader,
        /// The readable bytes after the header.
        available: usize,
    },
    /// The device-writable part of an rx or event chain is too short.
    #[error("chain holds {available} writable bytes, {needed} needed")]
    ShortBuffer {
        /// The writable bytes in the chain.
        available: usize,
        /// The bytes the device needs to write.
        needed: usize,
    },
    /// Guest memory could not be read or written.
    #[error("cannot access the chain's guest memory")]
    Memory(#[source] io::Error),
}

impl PacketError {
    /// The header, when the chain held a readable one (so the sender can be answered).
    pub fn header(&self) -> Option<&PacketHeader> {
        match self {
            Self::PayloadTooLarge(header) | Self::ShortPayload { header, .. } => Some(header),
            _ => None,
        }
    }
}

/// The chains a queue hands out.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Reads a guest tx packet: returns its header and leaves exactly `len` payload bytes in
/// `payload` (whose allocation is reused).
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    payload: &mut Vec<u8>,
) -> Result<PacketHeader, PacketError> {
    payload.clear();
    let mut reader = chain.reader(mem).map_err(PacketError::Chain)?;
    let available = reader.available_bytes();
    if available < HDR_SIZE {
        return Err(PacketError::ShortHeader(available));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
    let header = PacketHeader::from_bytes(&raw);

    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(header));
    }
    let available = reader.available_bytes();
    if len > available {
        return Err(PacketError::ShortPayload { header, available });
    }
    payload.resize(len, 0);
    reader.read_exact(payload).map_err(PacketError::Memory)?;
    Ok(header)
}

/// A guest rx buffer, checked to hold at least a header.
pub struct RxBuffer<'a> {
    writer: Writer<'a, BitmapSliceOf<'a>>,
}

impl std::fmt::Debug for RxBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("capacity", &self.writer.available_bytes())
            .finish()
    }
}

impl<'a> RxBuffer<'a> {
    /// Maps the device-writable descriptors of `chain`.
    pub fn new(mem: &'a GuestMemoryMmap, chain: Chain<'a>) -> Result<Self, PacketError> {
        let writer = chain.writer(mem).map_err(PacketError::Chain)?;
        let available = writer.available_bytes();
        if available < HDR_SIZE {
            return Err(PacketError::ShortBuffer {
                available,
                needed: HDR_SIZE,
            });
        }
        Ok(Self { writer })
    }

    /// The most payload bytes a packet in this buffer can carry.
    pub fn payload_capacity(&self) -> usize {
        self.writer
            .available_bytes()
            .saturating_sub(HDR_SIZE)
            .min(MAX_PKT_PAYLOAD)
    }

    /// Writes `header` (with `len` set to the payload's length) and `payload`; returns the bytes
    /// written, for the used ring.
    pub fn write_packet(
        mut self,
        header: PacketHeader,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let needed = HDR_SIZE + payload.len();
        if payload.len() > self.payload_capacity() {
            return Err(PacketError::ShortBuffer {
                available: self.writer.available_bytes(),
                needed,
            });
        }
        let header = PacketHeader {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            ..header
        };
        self.writer
            .write_all(&header.to_bytes())
            .and_then(|()| self.writer.write_all(payload))
            .map_err(PacketError::Memory)?;
        // `needed` is at most HDR_SIZE + MAX_PKT_PAYLOAD.
        Ok(u32::try_from(needed).unwrap_or(u32::MAX))
    }
}

/// Writes a `struct virtio_vsock_event` (`id`, le32) into an event-queue chain; returns the
/// bytes written.
pub fn write_event(mem: &GuestMemoryMmap, chain: Chain<'_>, id: u32) -> Result<u32, PacketError> {
    let mut writer = chain.writer(mem).map_err(PacketError::Chain)?;
    let available = writer.available_bytes();
    if available < 4 {
        return Err(PacketError::ShortBuffer {
            available,
            needed: 4,
        });
    }
    writer
        .write_all(&id.to_le_bytes())
        .map_err(PacketError::Memory)?;
    Ok(4)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::{test_memory, Desc, TestQueue, DATA_BASE};
    use super::*;

    fn sample_header(len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 17,
        }
    }

    /// Writes `bytes` at `addr` and returns a readable descriptor for them.
    fn readable(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Desc {
        mem.write_slice(bytes, GuestAddress(addr)).expect("write");
        Desc::readable(addr, u32::try_from(bytes.len()).expect("len"))
    }

    fn read_first_chain(
        mem: &GuestMemoryMmap,
        tq: &TestQueue,
        payload: &mut Vec<u8>,
    ) -> Result<PacketHeader, PacketError> {
        let mut queue = tq.queue();
        let chain = super::super::test_utils::pop(&mut queue, mem).expect("chain");
        read_tx_packet(mem, chain, payload)
    }

    #[test]
    fn test_header_round_trip_preserves_fields() {
        let header = sample_header(9);

        let parsed = PacketHeader::from_bytes(&header.to_bytes());

        assert_eq!(parsed, header);
    }

    #[test]
    fn test_header_to_bytes_uses_wire_offsets() {
        let header = sample_header(0x0102_0304);

        let bytes = header.to_bytes();

        assert_eq!(&bytes[24..28], &[4, 3, 2, 1]);
        assert_eq!(&bytes[28..30], &[1, 0]);
        assert_eq!(&bytes[30..32], &[5, 0]);
    }

    #[test]
    fn test_op_from_raw_unknown_is_none() {
        let op = Op::from_raw(8);

        assert_eq!(op, None);
    }

    #[test]
    fn test_read_tx_packet_header_and_payload_in_separate_descriptors_ok() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let hdr = readable(&mem, DATA_BASE, &sample_header(5).to_bytes());
        let data = readable(&mem, DATA_BASE + 0x1000, b"hello");
        tq.add_chain(&mem, &[hdr, data]);
        let mut payload = Vec::new();

        let header = read_first_chain(&mem, &tq, &mut payload).expect("packet");

        assert_eq!(header, sample_header(5));
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn test_read_tx_packet_header_split_across_descriptors_ok() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let mut bytes = sample_header(3).to_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let first = readable(&mem, DATA_BASE, &bytes[..10]);
        let second = readable(&mem, DATA_BASE + 0x1000, &bytes[10..30]);
        let third = readable(&mem, DATA_BASE + 0x2000, &bytes[30..]);
        tq.add_chain(&mem, &[first, second, third]);
        let mut payload = Vec::new();

        let header = read_first_chain(&mem, &tq, &mut payload).expect("packet");

        assert_eq!(header.len, 3);
        assert_eq!(payload, b"abc");
    }

    #[test]
    fn test_read_tx_packet_short_header_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let short = readable(&mem, DATA_BASE, &sample_header(0).to_bytes()[..40]);
        tq.add_chain(&mem, &[short]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(matches!(result, Err(PacketError::ShortHeader(40))));
    }

    #[test]
    fn test_read_tx_packet_write_only_header_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(&mem, &[Desc::writable(DATA_BASE, 64)]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(matches!(result, Err(PacketError::ShortHeader(0))));
    }

    #[test]
    fn test_read_tx_packet_len_beyond_chain_is_rejected_with_header() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let hdr = readable(&mem, DATA_BASE, &sample_header(100).to_bytes());
        let data = readable(&mem, DATA_BASE + 0x1000, b"only ten b");
        tq.add_chain(&mem, &[hdr, data]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        let err = result.expect_err("short payload");
        assert!(matches!(
            err,
            PacketError::ShortPayload { available: 10, .. }
        ));
        assert_eq!(err.header().map(|h| h.src_port), Some(1234));
    }

    #[test]
    fn test_read_tx_packet_huge_len_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let hdr = readable(&mem, DATA_BASE, &sample_header(u32::MAX).to_bytes());
        tq.add_chain(&mem, &[hdr]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(matches!(result, Err(PacketError::PayloadTooLarge(_))));
    }

    #[test]
    fn test_read_tx_packet_descriptor_outside_memory_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(&mem, &[Desc::readable(0xFFFF_FFFF_0000, 44)]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(matches!(result, Err(PacketError::Chain(_))));
    }

    #[test]
    fn test_read_tx_packet_descriptor_len_past_memory_end_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let end = super::super::test_utils::MEM_SIZE;
        tq.add_chain(&mem, &[Desc::readable(end - 16, 44)]);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(matches!(result, Err(PacketError::Chain(_))));
    }

    #[test]
    fn test_read_tx_packet_looping_chain_terminates() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        let hdr = readable(&mem, DATA_BASE, &sample_header(0).to_bytes());
        tq.add_looping_chain(&mem, hdr);
        let mut payload = Vec::new();

        let result = read_first_chain(&mem, &tq, &mut payload);

        assert!(result.is_ok());
    }

    #[test]
    fn test_rx_buffer_write_packet_splits_across_descriptors() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(
            &mem,
            &[
                Desc::writable(DATA_BASE, 20),
                Desc::writable(DATA_BASE + 0x1000, 100),
            ],
        );
        let mut queue = tq.queue();
        let chain = super::super::test_utils::pop(&mut queue, &mem).expect("chain");
        let buffer = RxBuffer::new(&mem, chain).expect("buffer");

        let written = buffer
            .write_packet(sample_header(0), b"xyz")
            .expect("write");

        let mut first = [0u8; 20];
        let mut second = [0u8; 27];
        mem.read_slice(&mut first, GuestAddress(DATA_BASE))
            .expect("read");
        mem.read_slice(&mut second, GuestAddress(DATA_BASE + 0x1000))
            .expect("read");
        let mut bytes = first.to_vec();
        bytes.extend_from_slice(&second);
        let mut raw = [0u8; HDR_SIZE];
        raw.copy_from_slice(&bytes[..HDR_SIZE]);
        assert_eq!(written, 47);
        assert_eq!(PacketHeader::from_bytes(&raw), sample_header(3));
        assert_eq!(&bytes[HDR_SIZE..], b"xyz");
    }

    #[test]
    fn test_rx_buffer_read_only_chain_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(&mem, &[Desc::readable(DATA_BASE, 4096)]);
        let mut queue = tq.queue();
        let chain = super::super::test_utils::pop(&mut queue, &mem).expect("chain");

        let result = RxBuffer::new(&mem, chain);

        assert!(matches!(
            result,
            Err(PacketError::ShortBuffer { available: 0, .. })
        ));
    }

    #[test]
    fn test_rx_buffer_payload_over_capacity_is_rejected() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(&mem, &[Desc::writable(DATA_BASE, 48)]);
        let mut queue = tq.queue();
        let chain = super::super::test_utils::pop(&mut queue, &mem).expect("chain");
        let buffer = RxBuffer::new(&mem, chain).expect("buffer");

        let result = buffer.write_packet(sample_header(0), b"hello");

        assert!(matches!(result, Err(PacketError::ShortBuffer { .. })));
    }

    #[test]
    fn test_write_event_writes_le32_id() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0, 16);
        tq.add_chain(&mem, &[Desc::writable(DATA_BASE, 8)]);
        let mut queue = tq.queue();
        let chain = super::super::test_utils::pop(&mut queue, &mem).expect("chain");
        mem.write_obj(0xFFFF_FFFFu32, GuestAddress(DATA_BASE))
            .expect("write");

        let written = write_event(&mem, chain, EVENT_TRANSPORT_RESET).expect("event");

        let id: u32 = mem.read_obj(GuestAddress(DATA_BASE)).expect("read");
        assert_eq!(written, 4);
        assert_eq!(id, EVENT_TRANSPORT_RESET);
    }
}
