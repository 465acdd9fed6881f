//! The local APIC's interrupt pins: LINT0 takes the legacy PIC's ExtINT, LINT1 takes NMI, as
//! on a PC and as the MP table says.

use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why the local APIC could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the local APIC")]
pub struct LapicError(#[source] pub kvm_ioctls::Error);

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

fn read_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs.get(offset + i).map_or(0, |c| *c as u8);
    }
    u32::from_le_bytes(bytes)
}

fn write_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        if let Some(slot) = regs.get_mut(offset + i) {
            *slot = *b as std::os::raw::c_char;
        }
    }
}

/// Routes LINT0 to ExtINT and LINT1 to NMI.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut state = vcpu.get_lapic().map_err(LapicError)?;
    let lvt0 = read_reg(&state.regs, APIC_LVT0);
    write_reg(
        &mut state.regs,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = read_reg(&state.regs, APIC_LVT1);
    write_reg(
        &mut state.regs,
        APIC_LVT1,
        set_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&state).map_err(LapicError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_set_delivery_mode_replaces_only_mode_bits() {
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }

    #[test]
    fn test_reg_roundtrip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];

        write_reg(&mut regs, APIC_LVT1, 0xdead_beef);

        assert_eq!(read_reg(&regs, APIC_LVT1), 0xdead_beef);
    }
}
