//! Proves that this host's KVM is real, hardware-style KVM: a guest in 64-bit long mode runs
//! 100 million `dec/jnz` iterations and halts. Real KVM (or KVM nested under QEMU's AMD-V
//! emulation in the test bed) takes well under a second; PVM's instruction emulator takes
//! about two minutes. Also checks the KVM clock facts snapshots rely on. Run it with
//! `cargo xtask test`, which runs it in the test bed.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clock_data, KVM_CLOCK_HOST_TSC};
use kvm_bindings::{kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::arch::x86_64::tsc;

const MEM_SIZE: usize = 2 << 20;
const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const CODE_ADDR: u64 = 0x10000;
const ITERATIONS: u64 = 100_000_000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0b11;
const PDE_HUGE: u64 = 1 << 7;

/// `mov rcx, ITERATIONS; 1: dec rcx; jnz 1b; hlt`
fn loop_code() -> Vec<u8> {
    let mut code = vec![0x48, 0xb9];
    code.extend_from_slice(&ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9, 0x75, 0xfb, 0xf4]);
    code
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Identity-maps the first 2 MiB with one large page, and writes a flat 64-bit GDT.
fn write_long_mode_tables(mem: &GuestMemoryMmap) {
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))
        .expect("write PML4");
    mem.write_obj(PD_ADDR | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR))
        .expect("write PDPT");
    mem.write_obj(PTE_PRESENT_RW | PDE_HUGE, GuestAddress(PD_ADDR))
        .expect("write PD");
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .expect("write GDT");
    }
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_kvm_long_mode_loop_runs_at_hardware_speed() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let region = mem.iter().next().expect("one region");
    let host_addr = mem.get_host_address(GuestAddress(0)).expect("host address");
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host_addr as u64,
        flags: 0,
    };
    // SAFETY: `slot` describes `mem`'s single mapping, which stays mapped for the VM's life
    // (both live until the end of this function, and `mem` is dropped after `vm`).
    unsafe { vm.set_user_memory_region(slot) }.expect("set memory region");
    write_long_mode_tables(&mem);
    mem.write_slice(&loop_code(), GuestAddress(CODE_ADDR))
        .expect("write code");
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.get_sregs().expect("get sregs");
    sregs.cs = segment(0x8, 0xb, true);
    let data = segment(0x10, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 23;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("get regs");
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    regs.rsp = 0x8000;
    vcpu.set_regs(&regs).expect("set regs");

    let start = Instant::now();
    let exit = loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Hlt => break "hlt",
            VcpuExit::Intr => continue,
            other => panic!("unexpected vCPU exit: {other:?}"),
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    let rcx = vcpu.get_regs().expect("get regs").rcx;

    println!("kvm_loop_100m_iterations_s={elapsed:.3}");
    assert_eq!(exit, "hlt");
    assert_eq!(rcx, 0, "the loop did not run to completion");
    assert!(
        elapsed < 10.0,
        "100 million iterations took {elapsed:.1} s: this KVM instruction-emulates (PVM?)"
    );
}

const MSR_IA32_TSC: u32 = 0x10;

/// Snapshots pair each vCPU's TSC with kvmclock exactly (`vmm::arch::x86_64::tsc`) when KVM
/// reads kvmclock with its host TSC and reports and sets TSC offsets. Without them they fall
/// back on timing their own ioctls, and on a loaded host restored guests then mark their TSC
/// unstable.
#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_kvm_reads_kvmclock_with_the_host_tsc_and_sets_tsc_offsets() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let khz = vcpu.get_tsc_khz().expect("read the TSC frequency");
    assert!(
        tsc::offset(&vcpu).is_some(),
        "KVM cannot report a vCPU's TSC offset (KVM_VCPU_TSC_OFFSET, Linux 5.16)"
    );
    // KVM decides on its master clock when kvmclock is set (as a restore does) or a vCPU
    // runs; a VM that has done neither reads kvmclock without the host TSC.
    vm.set_clock(&kvm_clock_data {
        clock: 1_000_000_000,
        ..Default::default()
    })
    .expect("set kvmclock");
    let clock = vm.get_clock().expect("read kvmclock");
    // KVM runs its master clock only on a host whose clocksource is the TSC (as in the test
    // bed); elsewhere snapshots pair the clocks by timing, and only the offsets are checked.
    let host_clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    if host_clocksource.trim() != "tsc" {
        eprintln!("the host's clocksource is {host_clocksource:?}: no master clock to check");
        tsc::set_offset(&vcpu, 12345).expect("set the TSC offset");
        assert_eq!(tsc::offset(&vcpu), Some(12345));
        return;
    }
    assert_ne!(
        clock.flags & KVM_CLOCK_HOST_TSC,
        0,
        "KVM_GET_CLOCK gave no host TSC: the host runs no KVM master clock (flags {:#x})",
        clock.flags
    );

    // Put the guest TSC at 2^40 as of the clock's host TSC, then read it through the MSR.
    let want = 1u64 << 40;
    let offset = tsc::offset_for(want, khz, Duration::ZERO, clock.host_tsc);
    tsc::set_offset(&vcpu, offset).expect("set the TSC offset");
    assert_eq!(tsc::offset(&vcpu), Some(offset));
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .expect("MSR list");
    assert_eq!(vcpu.get_msrs(&mut msrs).expect("read the TSC"), 1);
    let guest_tsc = msrs.as_slice()[0].data;

    // The guest TSC has run on from 2^40 since that host TSC: by less than a second's cycles.
    let ran = guest_tsc.wrapping_sub(want);
    assert!(
        ran < u64::from(khz) * 1000,
        "the guest TSC is {guest_tsc}, {ran} cycles past the {want} it was set to"
    );
}
