//! Guest memory: anonymous private mappings laid out by `arch::x86_64::layout`, reserved
//! lazily (MAP_NORESERVE) so the host commits only what the guest touches. A restored VM maps
//! the same layout from a snapshot file instead.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout;
use crate::devices::virtio::GuestMemoryMmap;

/// The smallest guest memory Hearth accepts, in MiB.
pub const MIN_MEM_MIB: u64 = 128;
/// The largest guest memory Hearth accepts, in MiB.
pub const MAX_MEM_MIB: u64 = 32 * 1024;

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is outside the supported range.
    #[error("guest memory of {0} MiB is outside {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB")]
    Size(u64),
    /// The host could not map it.
    #[error("cannot map {mib} MiB of guest memory: {detail}")]
    Map { mib: u64, detail: String },
}

/// Anonymous guest memory of `mib` MiB.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        mib,
        detail: e.to_string(),
    })
}

/// How many bytes of guest memory are resident on the host (pages the guest touched).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    let mut resident = 0u64;
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host..host + len` is the region's own mapping, alive while `mem` is borrowed,
        // and `vec` has one byte per page of it, as mincore(2) requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64;
        }
    }
    resident
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn test_create_rejects_too_small() {
        let err = create(64).expect_err("too small");

        assert!(err.to_string().contains("64 MiB"));
    }

    #[test]
    fn test_create_rejects_too_large() {
        assert!(matches!(create(MAX_MEM_MIB + 1), Err(MemoryError::Size(_))));
    }

    #[test]
    fn test_resident_bytes_counts_touched_pages() {
        let mem = create(MIN_MEM_MIB).expect("memory");
        let before = resident_bytes(&mem);

        for i in 0..16u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096 + (1 << 20)))
                .expect("write");
        }

        assert!(resident_bytes(&mem) >= before + 16 * 4096);
    }
}
