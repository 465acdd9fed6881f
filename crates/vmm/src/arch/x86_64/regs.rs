//! The boot vCPU's registers for each entry protocol, and the FPU and XCR0 state every vCPU
//! starts with.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

use super::boot::{Entry, EntryKind};
use super::layout;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const BOOT_STACK: u64 = 0x8ff0;

/// Why the registers could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The GDT or page tables could not be written.
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// A flat GDT descriptor: base 0, limit 4 GiB.
const fn gdt_entry(flags: u64, access: u64) -> u64 {
    (flags << 52) | (0xf << 48) | (access << 40) | 0xffff
}

/// The segment register matching a GDT entry.
fn segment(table_index: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: table_index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Sets up the boot vCPU to enter the kernel at `entry`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: &Entry,
) -> Result<(), RegsError> {
    let code = match entry.kind {
        EntryKind::Pvh => gdt_entry(0xc, 0x9b),
        EntryKind::Linux64 => gdt_entry(0xa, 0x9b),
    };
    let data = gdt_entry(0xc, 0x93);
    let tss = gdt_entry(0x8, 0x8b);
    let gdt = [0u64, code, data, tss];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::Memory(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|e| RegsError::Memory(e.to_string()))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(1, code);
    let ds = segment(2, data);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
    sregs.tr = segment(3, tss);
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip.0,
        ..Default::default()
    };
    match entry.kind {
        EntryKind::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = entry.boot_info.0;
        }
        EntryKind::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = entry.boot_info.0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("registers"))
}

/// Identity-maps the first GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| RegsError::Memory(e.to_string()))
    };
    write(layout::PDPTE_START | 0x3, layout::PML4_START)?;
    write(layout::PDE_START | 0x3, layout::PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }
    Ok(())
}

/// The FPU state of a freshly reset x86 CPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))
}

/// Starts XCR0 at every feature the guest's CPUID enumerates, which is what a Linux guest
/// programs it to. The guest still writes XCR0 itself with XSETBV, so this changes nothing on
/// hardware KVM. It matters where the CPU under KVM does not trap XSETBV (KVM nested in QEMU's
/// TCG, as in the test bed): KVM then never sees the guest's write and sizes CPUID leaf 0xD's
/// EBX for the reset XCR0, and Linux spends a long `WARN` on the mismatch while booting.
pub fn setup_xcr0(vcpu: &VcpuFd, xcr0: u64) -> Result<(), RegsError> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).map_err(kvm("XCR0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_segment_from_64bit_code_entry() {
        let seg = segment(1, gdt_entry(0xa, 0x9b));

        assert_eq!(
            (
                seg.selector,
                seg.type_,
                seg.l,
                seg.db,
                seg.present,
                seg.s,
                seg.g
            ),
            (8, 0xb, 1, 0, 1, 1, 1)
        );
    }

    #[test]
    fn test_segment_from_32bit_code_entry() {
        let seg = segment(1, gdt_entry(0xc, 0x9b));

        assert_eq!((seg.l, seg.db), (0, 1));
    }

    #[test]
    fn test_identity_page_tables_map_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");

        write_identity_page_tables(&mem).expect("tables");

        let last: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 511 * 8))
            .expect("read");
        assert_eq!(last, (511 << 21) | 0x83);
    }
}
