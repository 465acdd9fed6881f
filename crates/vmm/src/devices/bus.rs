//! Routing of guest port-I/O and MMIO accesses to devices. A vCPU exit names an address; the
//! bus finds the device whose range holds it and calls it with the offset into that range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range. A device
/// never panics on any offset or length: the guest chooses both.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; unknown registers read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`; unknown registers ignore writes.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid bus range at {base:#x} of length {len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device already on the bus.
    #[error("bus range at {base:#x} of length {len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Devices keyed by the start of their range.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Reads from the device at `addr`; returns false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, entry)) = self.find(addr) else {
            return false;
        };
        // A poisoned lock means a device thread panicked; the device state is still the best
        // we have, and the vCPU must not die with it.
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.read(offset, data);
        true
    }

    /// Writes to the device at `addr`; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, entry)) = self.find(addr) else {
            return false;
        };
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn shared() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn test_bus_read_passes_offset_within_range() {
        let mut bus = Bus::new();
        bus.insert(shared(), 0x100, 0x10).expect("insert");
        let mut data = [0u8; 2];

        let hit = bus.read(0x105, &mut data);

        assert!(hit);
        assert_eq!(data, [5, 5]);
    }

    #[test]
    fn test_bus_write_outside_every_range_misses() {
        let mut bus = Bus::new();
        bus.insert(shared(), 0x100, 0x10).expect("insert");

        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.write(0xff, &[1]));
    }

    #[test]
    fn test_bus_write_reaches_device() {
        let mut bus = Bus::new();
        let dev = shared();
        bus.insert(dev.clone(), 0x100, 0x10).expect("insert");

        bus.write(0x10f, &[7, 8]);

        let last = dev.lock().expect("lock").last_write.clone();
        assert_eq!(last, Some((0xf, vec![7, 8])));
    }

    #[test]
    fn test_bus_insert_overlap_fails() {
        let mut bus = Bus::new();
        bus.insert(shared(), 0x100, 0x10).expect("insert");

        assert_eq!(
            bus.insert(shared(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert!(bus.insert(shared(), 0xf8, 0x10).is_err());
        assert!(bus.insert(shared(), 0x110, 0x10).is_ok());
    }

    #[test]
    fn test_bus_insert_wrapping_range_fails() {
        let mut bus = Bus::new();

        assert!(bus.insert(shared(), u64::MAX, 2).is_err());
        assert!(bus.insert(shared(), 0, 0).is_err());
    }
}
