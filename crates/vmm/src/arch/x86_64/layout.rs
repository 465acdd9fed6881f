//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT (bzImage boot)          0x0000_9000  PML4, PDPTE, PDE (bzImage boot)
//! 0x0000_6000  PVH start info / zero page  0x0000_7000  PVH memory map
//! 0x0002_0000  kernel command line         0x0009_fc00  MP table (to the end of base RAM)
//! 0x0010_0000  kernel (1 MiB)              ...          RAM up to 3 GiB
//! 0xc000_0000  MMIO gap (1 GiB): boot timer at 0xd000_0000, virtio-mmio devices after it
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// Start of the kernel's load area.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the PVH `hvm_start_info` (or the bzImage zero page) goes.
pub const BOOT_INFO_START: u64 = 0x6000;
/// Where the PVH memory map goes.
pub const MEMMAP_START: u64 = 0x7000;
/// Where the kernel command line goes.
pub const CMDLINE_START: u64 = 0x2_0000;
/// The largest command line the x86 kernel accepts, with its NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the low RAM the kernel may use below 1 MiB (the MP table sits just under it).
pub const EBDA_START: u64 = 0x9_fc00;
/// The GDT and IDT used to enter long mode for bzImage boot.
pub const GDT_START: u64 = 0x500;
/// The IDT (empty) used for bzImage boot.
pub const IDT_START: u64 = 0x520;
/// Identity page tables for bzImage boot.
pub const PML4_START: u64 = 0x9000;
/// The page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// The page directory (1 GiB of 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Start of the MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Size of the MMIO gap.
pub const MMIO_GAP_SIZE: u64 = 0x4000_0000;
/// The boot timer device's MMIO address.
pub const BOOT_TIMER_START: u64 = 0xd000_0000;
/// Where virtio-mmio devices start, one page each.
pub const MMIO_DEVICES_START: u64 = 0xd000_1000;
/// The size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The local APIC's default address.
pub const APIC_START: u64 = 0xfee0_0000;
/// The IO-APIC's default address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The first IRQ (IO-APIC pin) given to virtio devices.
pub const IRQ_BASE: u32 = 5;
/// The last IRQ the IO-APIC has.
pub const IRQ_MAX: u32 = 23;
/// The serial port's IRQ (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// The i8042's keyboard IRQ.
pub const I8042_IRQ: u32 = 1;
/// The three pages KVM needs for the real-mode TSS on Intel (KVM_SET_TSS_ADDR), in the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        return vec![(0, mem_size)];
    }
    let high = MMIO_GAP_START + MMIO_GAP_SIZE;
    vec![(0, MMIO_GAP_START), (high, mem_size - MMIO_GAP_START)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ram_regions_small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn test_ram_regions_large_memory_skips_mmio_gap() {
        let regions = ram_regions(32 << 30);

        assert_eq!(regions[0], (0, MMIO_GAP_START));
        assert_eq!(regions[1], (1 << 32, (32 << 30) - MMIO_GAP_START));
    }
}
