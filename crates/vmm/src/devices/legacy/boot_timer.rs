//! The boot timer: one MMIO page at `layout::BOOT_TIMER_START`. Guest userspace writes the
//! magic byte 123 to its first byte once it runs (the busybox test image does it with
//! `devmem`, the agent through `/dev/mem`), and the VMM records the time from the vCPUs'
//! start to that write: boot to userspace.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::BusDevice;

/// The value userspace writes.
pub const MAGIC: u8 = 123;
/// The device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;

/// When the vCPUs started and when userspace said it runs.
#[derive(Debug, Default)]
struct Times {
    start: Option<Instant>,
    userspace: Option<Duration>,
}

/// A handle to the recorded boot time, shared with whoever describes the VM.
#[derive(Debug, Clone, Default)]
pub struct BootTime(Arc<Mutex<Times>>);

impl BootTime {
    /// Marks the moment the vCPUs start.
    pub fn start(&self) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.start = Some(Instant::now());
    }

    /// Boot to userspace, once userspace has written the magic byte.
    pub fn to_userspace(&self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).userspace
    }

    fn record(&self) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(start), None) = (t.start, t.userspace) {
            let elapsed = start.elapsed();
            t.userspace = Some(elapsed);
            log::info!(
                "guest userspace started {} ms after boot",
                elapsed.as_millis()
            );
        }
    }
}

/// The boot timer on the MMIO bus.
#[derive(Debug)]
pub struct BootTimer(BootTime);

impl BootTimer {
    /// A timer recording into `time`.
    pub fn new(time: BootTime) -> Self {
        Self(time)
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC) {
            self.0.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_boot_timer_records_first_magic_write_only() {
        let time = BootTime::default();
        time.start();
        let mut dev = BootTimer::new(time.clone());

        dev.write(0, &[MAGIC]);
        let first = time.to_userspace();
        std::thread::sleep(Duration::from_millis(2));
        dev.write(0, &[MAGIC]);

        assert!(first.is_some());
        assert_eq!(time.to_userspace(), first);
    }

    #[test]
    fn test_boot_timer_ignores_other_values_and_offsets() {
        let time = BootTime::default();
        time.start();
        let mut dev = BootTimer::new(time.clone());

        dev.write(0, &[1]);
        dev.write(8, &[MAGIC]);

        assert_eq!(time.to_userspace(), None);
    }

    #[test]
    fn test_boot_timer_before_start_records_nothing() {
        let time = BootTime::default();
        let mut dev = BootTimer::new(time.clone());

        dev.write(0, &[MAGIC]);

        assert_eq!(time.to_userspace(), None);
    }
}
