//! Keeping a snapshot's TSC and kvmclock in step.
//!
//! A guest reads two clocks that KVM keeps separately: each vCPU's TSC (the host TSC plus a
//! per-vCPU offset) and kvmclock (nanoseconds kept by the host). Linux's clocksource watchdog
//! compares them every half second and marks the TSC unstable when they drift apart by more
//! than 0.4 ms (Linux 6.1: the two clocksources' uncertainty margins, 200 us each), then
//! spends a kernel thread on the switch. A snapshot must therefore save and restore both as
//! of one moment.
//!
//! KVM gives that moment exactly when the host runs its master clock (a stable host TSC):
//! KVM_GET_CLOCK then returns kvmclock together with the host TSC it was read at
//! (`KVM_CLOCK_HOST_TSC`), and the `KVM_VCPU_TSC_OFFSET` attribute (Linux 5.16) reads and
//! sets each vCPU's offset. So
//!
//! - on save, each vCPU's TSC is taken as the host TSC of the kvmclock read plus its offset
//!   ([`tsc_at`]): the two values belong to one instant, however long the VMM was descheduled
//!   between its ioctls;
//! - on restore, kvmclock is loaded first, read back with its host TSC, and each offset is set
//!   so that the TSC stands as far past the saved one as kvmclock does ([`offset_for`]).
//!
//! This is the procedure of the KVM API documentation (`KVM_VCPU_TSC_OFFSET`). Without a
//! master clock, or with a scaled TSC (a snapshot restored on a host of another TSC
//! frequency), the VMM falls back on timing its own ioctls ([`advance`]), which is exact to
//! within how long it was descheduled between them.

use std::time::Duration;

use kvm_bindings::{kvm_device_attr, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

// kvm-ioctls offers the device attribute ioctls on an x86 vCPU's file descriptor only to
// aarch64 builds; they are the same ioctls (include/uapi/linux/kvm.h).
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, 0xAE, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, 0xAE, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, 0xAE, 0xe3, kvm_device_attr);

/// Runs the device attribute ioctl `request` on the vCPU's TSC offset, read from or written
/// to the u64 at `addr`.
///
/// # Safety
///
/// `addr` must point at a u64 that is valid for the call, and writable for
/// KVM_GET_DEVICE_ATTR.
unsafe fn offset_ioctl(vcpu: &VcpuFd, request: u64, addr: *const u64) -> errno::Result<()> {
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: addr as u64,
    };
    // SAFETY: `attr` is a whole `kvm_device_attr`; KVM touches no memory but the 8 bytes at
    // `addr`, which the caller vouches for.
    let ret = unsafe { ioctl_with_ref(vcpu, request, &attr) };
    if ret == 0 {
        Ok(())
    } else {
        Err(errno::Error::last())
    }
}

/// The vCPU's TSC offset (guest TSC = host TSC + offset when unscaled), or `None` on hosts
/// before Linux 5.16.
pub fn offset(vcpu: &VcpuFd) -> Option<u64> {
    let mut value = 0u64;
    let addr = std::ptr::addr_of_mut!(value).cast_const();
    // SAFETY: `value` is a u64 on this frame, writable, and outlives both calls.
    unsafe {
        offset_ioctl(vcpu, KVM_HAS_DEVICE_ATTR(), addr).ok()?;
        offset_ioctl(vcpu, KVM_GET_DEVICE_ATTR(), addr).ok()?;
    }
    Some(value)
}

/// Sets the vCPU's TSC offset.
pub fn set_offset(vcpu: &VcpuFd, value: u64) -> errno::Result<()> {
    // SAFETY: `value` is a u64 on this frame that outlives the call; KVM only reads it.
    unsafe { offset_ioctl(vcpu, KVM_SET_DEVICE_ATTR(), &value) }
}

/// The guest TSC at host TSC `host_tsc`, for a vCPU of offset `offset` (unscaled).
pub fn tsc_at(host_tsc: u64, offset: u64) -> u64 {
    host_tsc.wrapping_add(offset)
}

/// The offset that puts the guest TSC at `saved_tsc` advanced by `since` at `khz` kHz, at
/// host TSC `host_tsc`.
pub fn offset_for(saved_tsc: u64, khz: u32, since: Duration, host_tsc: u64) -> u64 {
    advance(saved_tsc, khz, since).wrapping_sub(host_tsc)
}

/// `tsc` advanced by `by` at `khz` kHz: the value a TSC that read `tsc` reads `by` later.
pub fn advance(tsc: u64, khz: u32, by: Duration) -> u64 {
    let cycles = by.as_nanos() * u128::from(khz) / 1_000_000;
    tsc.wrapping_add(u64::try_from(cycles).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_advance_adds_the_cycles_of_the_interval() {
        // 2 GHz for 1.5 ms is 3 million cycles.
        assert_eq!(
            advance(1_000, 2_000_000, Duration::from_micros(1_500)),
            3_001_000
        );
        assert_eq!(advance(7, 2_000_000, Duration::ZERO), 7);
    }

    #[test]
    fn test_offset_for_and_tsc_at_round_trip() {
        let host_tsc = 0xffff_ffff_0000_0000;
        let since = Duration::from_millis(3);
        let offset = offset_for(500, 1_000_000, since, host_tsc);
        // The guest TSC at that host TSC is the saved one, 3 ms (3 million cycles) on, even
        // though the offset wraps.
        assert_eq!(tsc_at(host_tsc, offset), 3_000_500);
    }
}
