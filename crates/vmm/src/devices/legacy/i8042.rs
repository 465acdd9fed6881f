//! The i8042 keyboard controller at ports 0x60-0x64, from `vm-superio`. Its only job here is
//! the reset line: the guest kernel (booted with `reboot=k`) writes 0xfe to port 0x64 to reset
//! the machine, and the VMM treats that as the guest shutting down.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// The controller's first port (data); the command port is at +4.
pub const I8042_PORT: u64 = 0x60;
/// The controller's port window.
pub const PORT_LEN: u64 = 5;

/// The i8042 on the port-I/O bus.
#[derive(Debug)]
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller that signals `reset` when the guest pulses the reset line.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.0.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(offset, *byte) {
                log::warn!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn test_i8042_reset_command_signals_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().expect("clone")));

        dev.write(4, &[0xfe]);

        assert_eq!(evt.read().expect("reset signalled"), 1);
    }

    #[test]
    fn test_i8042_other_commands_do_not_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().expect("clone")));

        dev.write(4, &[0x20]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0xfe]);

        assert!(evt.read().is_err());
    }
}
