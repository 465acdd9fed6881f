//! Loading the guest kernel and describing the machine to it.
//!
//! Two formats: an ELF `vmlinux` with a PVH entry note (the project's kernel) boots through
//! PVH, entering 32-bit protected mode with an `hvm_start_info`; a `bzImage` boots through
//! the Linux 64-bit boot protocol with a zero page. Either way the kernel gets the command
//! line, an optional initrd, and the RAM map.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;

/// Why the kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF with a PVH note nor a bzImage.
    #[error("kernel {path} is neither an ELF vmlinux with a PVH entry nor a bzImage")]
    UnknownFormat { path: String },
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {path}: {detail}")]
    Load { path: String, detail: String },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit in low memory.
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooBig { size: u64 },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot information into guest memory: {0}")]
    BootInfo(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// PVH: 32-bit protected mode, paging off, `ebx` = the start info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = the zero page.
    Linux64,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub rip: GuestAddress,
    pub boot_info: GuestAddress,
}

/// What to boot.
#[derive(Debug)]
pub struct BootSource<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

struct Initrd {
    addr: GuestAddress,
    size: u64,
}

/// Loads the kernel, command line and initrd into `mem` and writes the boot information.
pub fn load(mem: &GuestMemoryMmap, source: &BootSource<'_>) -> Result<Entry, BootError> {
    let path = source.kernel.display().to_string();
    let mut kernel = File::open(source.kernel).map_err(|e| BootError::OpenKernel {
        path: path.clone(),
        source: e,
    })?;
    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(source.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_size = source.cmdline.len() + 1;

    let elf = Elf::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    );
    let loaded = match elf {
        Ok(result) => result,
        Err(_) => {
            kernel
                .seek(SeekFrom::Start(0))
                .map_err(|e| BootError::OpenKernel {
                    path: path.clone(),
                    source: e,
                })?;
            BzImage::load(
                mem,
                None,
                &mut kernel,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|_| BootError::UnknownFormat { path: path.clone() })?
        }
    };
    let initrd = source
        .initrd
        .map(|p| load_initrd(mem, p, loaded.kernel_end))
        .transpose()?;
    match (&loaded.pvh_boot_cap, &loaded.setup_header) {
        (PvhBootCapability::PvhEntryPresent(rip), _) => {
            write_pvh_info(mem, initrd.as_ref())?;
            Ok(Entry {
                kind: EntryKind::Pvh,
                rip: *rip,
                boot_info: GuestAddress(layout::BOOT_INFO_START),
            })
        }
        (_, Some(_)) => {
            write_zero_page(mem, &loaded, initrd.as_ref(), cmdline_size)?;
            Ok(Entry {
                kind: EntryKind::Linux64,
                rip: GuestAddress(loaded.kernel_load.raw_value() + 0x200),
                boot_info: GuestAddress(layout::BOOT_INFO_START),
            })
        }
        _ => Err(BootError::Load {
            path,
            detail: "an ELF kernel without a PVH entry note cannot be booted".to_owned(),
        }),
    }
}

/// The end of the RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    let last = mem.last_addr().raw_value() + 1;
    last.min(layout::MMIO_GAP_START)
}

/// Puts the initrd at the top of low RAM, page aligned, above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<Initrd, BootError> {
    let read_err = |e| BootError::ReadInitrd {
        path: path.display().to_string(),
        source: e,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a > kernel_end)
        .ok_or(BootError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::BootInfo(format!("initrd: {e}")))?;
    Ok(Initrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// The RAM map: base memory below the MP table, then each RAM region from 1 MiB on.
fn ram_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, layout::EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(layout::HIMEM_START);
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

fn write_pvh_info(mem: &GuestMemoryMmap, initrd: Option<&Initrd>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules_addr = GuestAddress(
        layout::MEMMAP_START + (memmap.len() * size_of::<hvm_memmap_table_entry>()) as u64,
    );
    if initrd.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modules_addr.raw_value();
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::BOOT_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], modules_addr);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::BootInfo(e.to_string()))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    loaded: &KernelLoaderResult,
    initrd: Option<&Initrd>,
    cmdline_size: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = loaded.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (i, (addr, size)) in ram_map(mem).into_iter().enumerate() {
        let Some(entry) = params.e820_table.get_mut(i) else {
            break;
        };
        entry.addr = addr;
        entry.size = size;
        entry.r#type = E820_RAM;
        params.e820_entries = i as u8 + 1;
    }
    let bp = BootParams::new(&params, GuestAddress(layout::BOOT_INFO_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::BootInfo(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("memory")
    }

    #[test]
    fn test_ram_map_small_guest() {
        let mem = memory(128 << 20);

        let map = ram_map(&mem);

        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START),
                (layout::HIMEM_START, (128 << 20) - layout::HIMEM_START)
            ]
        );
    }

    #[test]
    fn test_ram_map_large_guest_has_high_region() {
        let mem = memory(4 << 30);

        let map = ram_map(&mem);

        assert_eq!(map.len(), 3);
        assert_eq!(map[2], (1 << 32, (4 << 30) - layout::MMIO_GAP_START));
        assert_eq!(map[1].0 + map[1].1, layout::MMIO_GAP_START);
    }

    #[test]
    fn test_load_garbage_kernel_is_unknown_format() {
        let mem = memory(128 << 20);
        let path =
            std::env::temp_dir().join(format!("hearth-garbage-kernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 8192]).expect("write");
        let source = BootSource {
            kernel: &path,
            initrd: None,
            cmdline: "console=ttyS0",
        };

        let result = load(&mem, &source);

        let _ = std::fs::remove_file(&path);
        assert!(matches!(result, Err(BootError::UnknownFormat { .. })));
    }

    #[test]
    fn test_load_missing_kernel_says_which() {
        let mem = memory(128 << 20);
        let source = BootSource {
            kernel: Path::new("/nonexistent/vmlinux"),
            initrd: None,
            cmdline: "",
        };

        let err = load(&mem, &source).expect_err("must fail");

        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }
}
