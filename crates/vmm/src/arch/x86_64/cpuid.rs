//! CPUID as the guest sees it: KVM's supported set, with the topology describing `n` vCPUs of
//! one core each in one package, each vCPU's APIC ID equal to its index, and the hypervisor bit
//! set. Every vCPU gets its own copy (the APIC ID differs).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The number of APIC ID bits that hold a vCPU index below `n`.
fn index_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites one entry for vCPU `index` of `count`.
fn normalize_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    match entry.function {
        LEAF_FEATURES => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count32 - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = LEVEL_SMT << 8;
                }
                1 => {
                    entry.eax = index_bits(count);
                    entry.ebx = count32;
                    entry.ecx = (LEVEL_CORE << 8) | 1;
                }
                n => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = n;
                }
            }
        }
        LEAF_EXT_FEATURES => {
            if count > 1 {
                entry.ecx |= ECX_CMP_LEGACY;
            } else {
                entry.ecx &= !ECX_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZE => {
            entry.ecx = (entry.ecx & !0xf0ff) | (index_bits(count) << 12) | (count32 - 1);
        }
        LEAF_AMD_TOPOLOGY => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// Advertises the LAPIC's TSC deadline mode in leaf 1 (call only where KVM emulates it:
/// `KVM_CAP_TSC_DEADLINE_TIMER`).
pub fn enable_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// The CPUID of vCPU `index` out of `count`, from KVM's supported set.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, index, count);
    }
    cpuid
}

/// The XSAVE features a guest can enable in XCR0: leaf 0xD, subleaf 0, EDX:EAX. x87 is always
/// included (XCR0 bit 0 can never be clear).
pub fn xcr0_supported(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn test_leaf1_carries_apic_id_and_count() {
        let mut e = entry(LEAF_FEATURES, 0);
        e.ebx = 0x0000_0800;

        normalize_entry(&mut e, 3, 4);

        assert_eq!(e.ebx, (3 << 24) | (4 << 16) | 0x0800);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn test_topology_core_level_counts_vcpus() {
        let mut e = entry(LEAF_TOPOLOGY, 1);

        normalize_entry(&mut e, 5, 6);

        assert_eq!(
            (e.eax, e.ebx, e.ecx, e.edx),
            (3, 6, (LEVEL_CORE << 8) | 1, 5)
        );
    }

    #[test]
    fn test_enable_tsc_deadline_sets_leaf1_ecx_bit24_only() {
        let mut cpuid = CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(0x7, 0)]).unwrap();

        enable_tsc_deadline(&mut cpuid);

        assert_eq!(cpuid.as_slice()[0].ecx, ECX_TSC_DEADLINE);
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
    }

    #[test]
    fn test_xcr0_supported_reads_leaf_0xd() {
        let mut xsave = entry(0xd, 0);
        xsave.eax = 0x7;
        xsave.edx = 0x1;
        let cpuid = CpuId::from_entries(&[entry(0xd, 1), xsave]).unwrap();

        assert_eq!(xcr0_supported(&cpuid), 0x1_0000_0007);
    }

    #[test]
    fn test_xcr0_supported_without_xsave_is_x87() {
        let cpuid = CpuId::from_entries(&[entry(1, 0)]).unwrap();

        assert_eq!(xcr0_supported(&cpuid), 1);
    }

    #[test]
    fn test_index_bits() {
        assert_eq!(index_bits(1), 0);
        assert_eq!(index_bits(2), 1);
        assert_eq!(index_bits(3), 2);
        assert_eq!(index_bits(16), 4);
    }
}
