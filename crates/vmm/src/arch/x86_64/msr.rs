//! The model-specific registers every vCPU starts with: syscall entry points cleared, fast
//! string operations on, and write-back as the default memory type.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// Why the MSRs could not be set.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    Build,
    /// KVM refused the ioctl.
    #[error("cannot set the boot MSRs")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM refused to restore one saved MSR.
    #[error("KVM refused to restore MSR {index:#x}")]
    Refused { index: u32 },
    /// KVM set only some of them.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Partial { set: usize, wanted: usize },
}

/// The boot MSR values.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs on `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Kvm)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Reads every MSR in `indices` that KVM can read on `vcpu`, for a snapshot. KVM stops at the
/// first MSR it cannot read; that one is skipped (some listed MSRs depend on CPU features the
/// guest does not have) and the rest are read on. The TSC is read last (and so comes last in
/// the result, and is written last on restore), so the moment this returns is the moment the
/// TSC had the saved value, which the fallback of [`super::tsc`] relies on.
pub fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let ordered = tsc_last(indices);
    let mut saved = Vec::with_capacity(ordered.len());
    let mut rest = ordered.as_slice();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::Build)?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(MsrError::Kvm)?
            .min(entries.len());
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Past a refused MSR, skip it.
        let next = if read == entries.len() {
            read
        } else {
            read + 1
        };
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(saved)
}

/// Writes MSRs saved by [`save_msrs`] back.
pub fn restore_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| MsrError::Build)?;
        let set = vcpu.set_msrs(&msrs).map_err(MsrError::Kvm)?;
        if set != chunk.len() {
            return Err(MsrError::Refused {
                index: chunk[set].index,
            });
        }
    }
    Ok(())
}

/// `indices` with the TSC, if listed, moved to the end.
fn tsc_last(indices: &[u32]) -> Vec<u32> {
    let mut ordered: Vec<u32> = indices
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC)
        .collect();
    if indices.contains(&MSR_IA32_TSC) {
        ordered.push(MSR_IA32_TSC);
    }
    ordered
}

/// The TSC among saved MSRs `entries`, if it was saved.
pub fn tsc(entries: &[kvm_msr_entry]) -> Option<u64> {
    entries
        .iter()
        .find(|e| e.index == MSR_IA32_TSC)
        .map(|e| e.data)
}

/// Replaces the TSC among saved MSRs `entries` by `value`: a snapshot saves it as of the
/// moment kvmclock was read (see [`super::tsc`]).
pub fn set_tsc(entries: &mut [kvm_msr_entry], value: u64) {
    for entry in entries.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
        entry.data = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_boot_msrs_default_memory_type_is_write_back() {
        let entries = boot_msr_entries();

        let mtrr = entries
            .iter()
            .find(|e| e.index == MSR_MTRR_DEF_TYPE)
            .map(|e| e.data);

        assert_eq!(mtrr, Some(MTRR_ENABLE | MTRR_MEM_TYPE_WB));
    }

    #[test]
    fn test_tsc_last_moves_only_the_tsc_to_the_end() {
        assert_eq!(
            tsc_last(&[MSR_STAR, MSR_IA32_TSC, MSR_LSTAR]),
            vec![MSR_STAR, MSR_LSTAR, MSR_IA32_TSC]
        );
        assert_eq!(tsc_last(&[MSR_STAR, MSR_LSTAR]), vec![MSR_STAR, MSR_LSTAR]);
    }

    #[test]
    fn test_set_tsc_replaces_the_tsc_only() {
        let mut entries = boot_msr_entries();
        for e in &mut entries {
            e.data = 1000;
        }

        set_tsc(&mut entries, 5_001_000);

        assert_eq!(tsc(&entries), Some(5_001_000));
        for e in entries.iter().filter(|e| e.index != MSR_IA32_TSC) {
            assert_eq!(e.data, 1000, "MSR {:#x}", e.index);
        }
    }
}
