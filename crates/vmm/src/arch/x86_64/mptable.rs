//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its vCPUs
//! (one processor entry each), the IO-APIC and the routing of ISA IRQs 0-23 to its pins.
//! It sits at the top of base memory (639 KiB), where Linux looks for it.

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// The most vCPUs the table describes (APIC IDs 0..=254; the IO-APIC takes the next ID).
pub const MAX_VCPUS: u8 = 254;

/// Why the table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for an MP table.
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_VCPUS})")]
    TooManyVcpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP configuration table (header and entries) for `vcpus`, placed at `table_addr`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    for irq in 0..=layout::IRQ_MAX as u8 {
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = vcpus as u16 + 1 + 1 + (layout::IRQ_MAX as u16 + 1) + 2;
    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0]);
    table.extend_from_slice(b"HEARTH  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The MP floating pointer structure pointing at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[..4].copy_from_slice(MPF_SIGNATURE);
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1;
    mpf[9] = MP_SPEC_REV;
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the floating pointer and the table for `vcpus` vCPUs.
pub fn setup(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    if vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    let table_addr = layout::EBDA_START + 16;
    mem.write_slice(
        &floating_pointer(table_addr as u32),
        GuestAddress(layout::EBDA_START),
    )
    .map_err(|e| MptableError::Memory(e.to_string()))?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))
        .map_err(|e| MptableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn test_config_table_checksums_to_zero() {
        let table = config_table(4);

        assert_eq!(sum(&table), 0);
        assert_eq!(
            u16::from_le_bytes([table[4], table[5]]) as usize,
            table.len()
        );
    }

    #[test]
    fn test_config_table_lists_each_vcpu() {
        let table = config_table(3);

        let cpus: Vec<u8> = table[44..].chunks(20).take(3).map(|c| c[1]).collect();

        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
    }

    #[test]
    fn test_floating_pointer_checksums_to_zero() {
        assert_eq!(sum(&floating_pointer(0x9fc10)), 0);
    }

    #[test]
    fn test_setup_fits_below_640k_for_max_supported_vcpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");

        setup(&mem, 16).expect("setup");

        assert!(layout::EBDA_START + 16 + config_table(16).len() as u64 <= 0xa_0000);
    }
}
