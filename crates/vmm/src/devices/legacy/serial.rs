//! The 8250 UART at COM1 (port 0x3f8, IRQ 4), from `vm-superio`, writing the guest's console
//! to a file, to the VMM's stdout, or nowhere. Guest input is not wired.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// COM1's port.
pub const COM1_PORT: u64 = 0x3f8;
/// The UART's register window.
pub const PORT_LEN: u64 = 8;

/// Where the console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The serial port on the port-I/O bus.
pub struct SerialDevice {
    inner: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

/// The UART's registers and receive FIFO, as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART raising its interrupt through `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: ConsoleOut) -> Self {
        Self {
            inner: Serial::new(irq, out),
        }
    }

    /// A UART whose registers come from a snapshot; None if the state is impossible (a
    /// receive FIFO over its size).
    pub fn restore(irq: EventFdTrigger, out: ConsoleOut, state: &SerialState) -> Option<Self> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, NoEvents, out)
            .ok()
            .map(|inner| Self { inner })
    }

    /// The UART's registers.
    pub fn state(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.inner.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // An error here is the console sink failing (a full disk, a closed pipe): the
            // guest must not notice, and the output is lost.
            let _ = self.inner.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_serial_transmit_register_writes_to_sink() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut serial = SerialDevice::new(irq, Box::new(sink.clone()));

        serial.write(0, b"h");
        serial.write(0, b"i");

        assert_eq!(sink.0.lock().expect("lock").as_slice(), b"hi");
    }

    #[test]
    fn test_serial_wide_access_is_ignored() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut serial = SerialDevice::new(irq, Box::new(sink.clone()));
        let mut data = [0xaa; 4];

        serial.write(0, b"ab");
        serial.read(u64::MAX, &mut data);

        assert!(sink.0.lock().expect("lock").is_empty());
        assert_eq!(data, [0; 4]);
    }
}
