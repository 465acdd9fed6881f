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
/// guest does not have) and the rest are read on.
pub fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
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
}
