//! Test helpers: a guest memory with split virtqueues laid out by hand (descriptor table, avail
//! and used rings), playing the driver's side, and helpers to write vsock packets into them.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::super::GuestMemoryMmap;
use super::packet::{Chain, PacketHeader, HDR_SIZE};

/// The size of the test guest memory.
pub const MEM_SIZE: u64 = 0x80_0000;
/// Where data buffers start; each test queue owns 1 MiB from here on.
pub const DATA_BASE: u64 = 0x10_0000;
const DATA_REGION: u64 = 0x10_0000;

/// A fresh guest memory of [`MEM_SIZE`] bytes at address 0.
pub fn test_memory() -> GuestMemoryMmap {
    let size = usize::try_from(MEM_SIZE).expect("size");
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Pops the next chain of `queue`.
pub fn pop<'a>(queue: &mut Queue, mem: &'a GuestMemoryMmap) -> Option<Chain<'a>> {
    queue.pop_descriptor_chain(mem)
}

/// One descriptor the test driver places in a chain.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's view of one split virtqueue in the test memory.
#[derive(Debug)]
pub struct TestQueue {
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    data_next: u64,
    data_end: u64,
}

impl TestQueue {
    /// Queue number `index` (rings at `0x10000 * (index + 1)`, data at
    /// `DATA_BASE + index * 1 MiB`), of `size` entries.
    pub fn new(index: u64, size: u16) -> Self {
        let base = 0x1_0000 * (index + 1);
        let data = DATA_BASE + index * DATA_REGION;
        Self {
            size,
            desc_table: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            data_next: data,
            data_end: data + DATA_REGION,
        }
    }

    /// The device's `Queue`, configured and ready as a transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).expect("queue");
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .expect("desc table");
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("avail ring");
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .expect("used ring");
        queue.set_ready(true);
        queue
    }

    /// Reserves `len` bytes of this queue's data region.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let len = u64::try_from(len).expect("len").max(1).next_multiple_of(16);
        if self.data_next + len > self.data_end {
            self.data_next = self.data_end - DATA_REGION;
        }
        let addr = self.data_next;
        self.data_next += len;
        addr
    }

    /// Writes the descriptors as one chain and makes it available; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = Descriptor::new(d.addr, d.len, u16::try_from(flags).expect("flags"), next);
            mem.write_obj(desc, GuestAddress(self.desc_table + u64::from(index) * 16))
                .expect("descriptor");
            self.next_desc = next;
        }
        self.publish(mem, head);
        head
    }

    /// Makes available a chain whose single descriptor links to itself.
    pub fn add_looping_chain(&mut self, mem: &GuestMemoryMmap, d: Desc) -> u16 {
        let head = self.next_desc;
        let flags = u16::try_from(VRING_DESC_F_NEXT).expect("flags");
        let desc = Descriptor::new(d.addr, d.len, flags, head);
        mem.write_obj(desc, GuestAddress(self.desc_table + u64::from(head) * 16))
            .expect("descriptor");
        self.next_desc = (head + 1) % self.size;
        self.publish(mem, head);
        head
    }

    /// Puts an arbitrary head index in the avail ring (a hostile driver).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + slot * 2))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// The next used element (head, len) the device returned, if any.
    pub fn next_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        if used_idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let addr = self.used + 4 + slot * 8;
        let id: u32 = mem.read_obj(GuestAddress(addr)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).expect("used len");
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// The address of the first descriptor of the chain at `head`.
    pub fn desc_addr(&self, mem: &GuestMemoryMmap, head: u32) -> u64 {
        mem.read_obj(GuestAddress(self.desc_table + u64::from(head) * 16))
            .expect("descriptor")
    }

    /// Makes available a tx packet: the header in one descriptor, the payload in another.
    pub fn add_tx_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        header: &PacketHeader,
        payload: &[u8],
    ) -> u16 {
        let header = PacketHeader {
            len: u32::try_from(payload.len()).expect("len"),
            ..*header
        };
        let hdr_addr = self.alloc(HDR_SIZE);
        mem.write_slice(&header.to_bytes(), GuestAddress(hdr_addr))
            .expect("header");
        let hdr_len = u32::try_from(HDR_SIZE).expect("len");
        if payload.is_empty() {
            return self.add_chain(mem, &[Desc::readable(hdr_addr, hdr_len)]);
        }
        let data_addr = self.alloc(payload.len());
        mem.write_slice(payload, GuestAddress(data_addr))
            .expect("payload");
        let data_len = u32::try_from(payload.len()).expect("len");
        self.add_chain(
            mem,
            &[
                Desc::readable(hdr_addr, hdr_len),
                Desc::readable(data_addr, data_len),
            ],
        )
    }

    /// Makes available an rx buffer of `len` bytes; returns its address.
    pub fn add_rx_buffer(&mut self, mem: &GuestMemoryMmap, len: u32) -> u64 {
        let addr = self.alloc(usize::try_from(len).expect("len"));
        self.add_chain(mem, &[Desc::writable(addr, len)]);
        addr
    }
}

/// Reads the packet the device wrote at `addr`.
pub fn read_rx_packet(mem: &GuestMemoryMmap, addr: u64) -> (PacketHeader, Vec<u8>) {
    let mut raw = [0u8; HDR_SIZE];
    mem.read_slice(&mut raw, GuestAddress(addr))
        .expect("header");
    let header = PacketHeader::from_bytes(&raw);
    let mut payload = vec![0u8; usize::try_from(header.len).expect("len")];
    mem.read_slice(&mut payload, GuestAddress(addr + HDR_SIZE as u64))
        .expect("payload");
    (header, payload)
}
