//! Guest memory: anonymous private mappings laid out by `arch::x86_64::layout`, reserved
//! lazily (MAP_NORESERVE) so the host commits only what the guest touches. A restored VM maps
//! the same layout MAP_PRIVATE from a snapshot's memory file instead, with a diff layered on
//! top (see [`restore`]).
//!
//! A memory file holds the regions back to back, each page at its guest offset, holes where
//! the guest never wrote. A diff file has the same layout but holds only the pages listed in
//! its runs; every other page comes from the base memory file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::layout;

/// Guest memory as the VMM and its devices see it. The bitmap records every page the VMM
/// writes (a device filling a buffer), which KVM's dirty log cannot see; diff snapshots need
/// both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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
    /// A memory or diff file could not be read or written.
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A memory file is smaller than the guest memory it should hold.
    #[error("the memory file {path} holds {len} bytes, the guest has {expected}")]
    FileSize {
        path: String,
        len: u64,
        expected: u64,
    },
    /// A diff run lies outside guest memory.
    #[error("a diff run of {pages} pages at page {first} is outside guest memory")]
    Run { first: u64, pages: u64 },
}

/// Bytes in a page: the unit of dirty tracking and of memory files.
pub const PAGE_SIZE: u64 = 4096;

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MemoryError + 'a {
    move |source| MemoryError::File {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// One bitmap per region, one bit per page: the pages that differ from a base memory file.
pub type PageBitmap = Vec<Vec<u64>>;

/// Runs of pages, `(first page, page count)` over the whole memory file, in order.
pub type PageRuns = Vec<(u64, u64)>;

/// Anonymous guest memory of `mib` MiB, offered to transparent huge pages (see
/// [`advise_huge_pages`]).
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        mib,
        detail: e.to_string(),
    })?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages behind booted guest memory (`MADV_HUGEPAGE`, as Cloud
/// Hypervisor does by default), so they back it also where the host's policy is `madvise`:
/// one fault then maps 2 MiB for the guest (with huge pages off, a 256 MiB boot in the test
/// bed took about 0.15 s longer), at the price of a few MiB more resident memory. Only a
/// hint: the host may have huge pages off, and then this does nothing. Restored memory is a
/// private file mapping, which the kernel backs with small pages whatever the hint.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: the range is exactly a mapping `mem` owns; MADV_HUGEPAGE changes how it is
        // backed, never its contents.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::debug!(
                "no transparent huge pages for guest memory: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Guest memory of `mib` MiB mapped MAP_PRIVATE from the memory file `base`: nothing is read
/// until the guest touches it, and every VM mapping the same file shares its page cache. The
/// pages of `diff` (a file with the same layout) listed in `runs` are mapped over the base the
/// same way.
pub fn restore(
    mib: u64,
    base: &Path,
    diff: Option<(&Path, &PageRuns)>,
) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let file = File::open(base).map_err(file_err("cannot open the memory file", base))?;
    let len = file
        .metadata()
        .map_err(file_err("cannot read the size of", base))?
        .len();
    if len < mib << 20 {
        return Err(MemoryError::FileSize {
            path: base.display().to_string(),
            len,
            expected: mib << 20,
        });
    }
    let map_err = |e: &dyn std::fmt::Display| MemoryError::Map {
        mib,
        detail: e.to_string(),
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, size) in layout::ram_regions(mib << 20) {
        let clone = file.try_clone().map_err(file_err("cannot open", base))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(
            size as usize,
            <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size as usize),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .with_file_offset(FileOffset::new(clone, file_offset))
        .build()
        .map_err(|e| map_err(&e))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_err(&"the region overflows the guest address space"))?;
        regions.push(region);
        file_offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(&e))?;
    if let Some((path, runs)) = diff {
        map_diff(&mem, path, runs)?;
    }
    Ok(mem)
}

/// The host address and length of each region, with its offset in a memory file.
fn file_layout(mem: &GuestMemoryMmap) -> Vec<(*mut u8, u64, u64)> {
    let mut offset = 0u64;
    mem.iter()
        .filter_map(|region| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()?;
            let entry = (host, offset, region.len());
            offset += region.len();
            Some(entry)
        })
        .collect()
}

/// Where the run of `pages` pages from page `first` of the memory file layout is mapped:
/// `(host address, file offset, bytes)`. A run must lie inside one region (writers split runs
/// at region ends); anything else, or an overflow, is [`MemoryError::Run`].
fn locate_run(
    layout: &[(*mut u8, u64, u64)],
    first: u64,
    pages: u64,
) -> Result<(*mut u8, u64, u64), MemoryError> {
    let bad_run = || MemoryError::Run { first, pages };
    let start = first.checked_mul(PAGE_SIZE).ok_or_else(bad_run)?;
    let len = pages.checked_mul(PAGE_SIZE).ok_or_else(bad_run)?;
    let end = start.checked_add(len).ok_or_else(bad_run)?;
    let &(host, offset, _) = layout
        .iter()
        .find(|&&(_, offset, size)| start >= offset && end <= offset + size)
        .ok_or_else(bad_run)?;
    Ok((host.wrapping_add((start - offset) as usize), start, len))
}

/// Maps the pages of `runs` from the diff file at `path` over `mem` (MAP_FIXED|MAP_PRIVATE).
fn map_diff(mem: &GuestMemoryMmap, path: &Path, runs: &PageRuns) -> Result<(), MemoryError> {
    let file = File::open(path).map_err(file_err("cannot open the diff file", path))?;
    let layout = file_layout(mem);
    for &(first, pages) in runs {
        let (host, start, len) = locate_run(&layout, first, pages)?;
        // SAFETY: `host..host + len` lies inside one region's own mapping (`locate_run`),
        // which `mem` keeps alive; MAP_FIXED replaces those pages of that mapping with a
        // private mapping of the same size, so no other memory is touched and the guest memory
        // stays a valid read-write mapping.
        let addr = unsafe {
            libc::mmap(
                host.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::File {
                what: "cannot map the diff file",
                path: path.display().to_string(),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Writes every page of anonymous guest memory the host holds (resident or swapped, from
/// /proc/self/pagemap) to a new sparse memory file at `path`; pages never touched stay holes
/// and read as zero, as they are in the guest. Returns the bytes written.
pub fn write_full(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, MemoryError> {
    let file = File::create(path).map_err(file_err("cannot create the memory file", path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)
        .map_err(file_err("cannot size the memory file", path))?;
    let pagemap = Pagemap::open()?;
    let mut written = 0u64;
    for (host, offset, size) in file_layout(mem) {
        for (first, count) in pagemap.held_runs(host, size / PAGE_SIZE)? {
            written += write_run(&file, path, host, offset, first, count)?;
        }
    }
    file.sync_all()
        .map_err(file_err("cannot sync the memory file", path))?;
    Ok(written)
}

/// This process's page table, as /proc/self/pagemap shows it.
struct Pagemap(File);

impl Pagemap {
    const PATH: &'static str = "/proc/self/pagemap";

    fn open() -> Result<Self, MemoryError> {
        File::open(Self::PATH)
            .map(Self)
            .map_err(file_err("cannot read", Path::new(Self::PATH)))
    }

    /// The runs of pages among the `pages` pages mapped at `host` whose pagemap entry
    /// satisfies `pick`, as page indexes from `host`.
    fn runs(
        &self,
        host: *mut u8,
        pages: u64,
        pick: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, u64)>, MemoryError> {
        let mut entries = vec![0u8; (pages * 8) as usize];
        self.0
            .read_exact_at(&mut entries, (host as u64 / PAGE_SIZE) * 8)
            .map_err(file_err("cannot read", Path::new(Self::PATH)))?;
        let picked = |page: u64| {
            let i = (page * 8) as usize;
            pick(u64::from_le_bytes(
                entries[i..i + 8].try_into().unwrap_or_default(),
            ))
        };
        Ok(runs_of(pages, picked))
    }

    /// The runs the host holds for this mapping (present in RAM or swapped out).
    fn held_runs(&self, host: *mut u8, pages: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
        self.runs(host, pages, pagemap_held)
    }

    /// The runs of a private file mapping that were written (see [`pagemap_written`]).
    fn written_runs(&self, host: *mut u8, pages: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
        self.runs(host, pages, pagemap_written)
    }
}

/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Whether a page is held: present in RAM or swapped out.
fn pagemap_held(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0
}

/// Whether a page of a private file mapping was written: its own copy, present (not the
/// file's page cache page) or swapped out (only private copies swap).
fn pagemap_written(entry: u64) -> bool {
    entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE == 0)
}

/// The working set of a restored VM: the pages of its memory file layout that its mappings
/// hold, which (the mappings being MAP_PRIVATE of files, so faulted in on first use) are the
/// pages the guest or the devices have touched since the restore; and apart, those of them
/// that were written (the mappings hold private copies of them).
pub fn working_set(mem: &GuestMemoryMmap) -> Result<(PageRuns, PageRuns), MemoryError> {
    let pagemap = Pagemap::open()?;
    let mut runs = Vec::new();
    let mut written = Vec::new();
    for (host, offset, size) in file_layout(mem) {
        for (first, count) in pagemap.held_runs(host, size / PAGE_SIZE)? {
            runs.push((offset / PAGE_SIZE + first, count));
        }
        for (first, count) in pagemap.written_runs(host, size / PAGE_SIZE)? {
            written.push((offset / PAGE_SIZE + first, count));
        }
    }
    Ok((runs, written))
}

/// What [`prefetch`] did, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefetched {
    /// Pages given their private copies ahead of the guest.
    pub copied: u64,
    /// Pages faulted in (or read ahead) from the memory file.
    pub read: u64,
}

/// Gets guest memory ready ahead of the guest, in the memory file layout. The pages of
/// `written` get their private copies (`MADV_POPULATE_WRITE`): KVM maps a page the host maps
/// read-only (a private file page not yet copied) read-only into the guest, so a page the
/// guest reads and then writes costs it two exits, each tens of microseconds under nested
/// virtualisation. Then the pages of `read` are faulted into the mappings of `mem`
/// (`MADV_POPULATE_READ`; `MADV_WILLNEED`, which only reads ahead, on kernels before 5.14), so
/// the guest's first touch of each finds it mapped. Before Linux 5.14 nothing is copied: the
/// guest's writes make the copies. Runs outside `mem` are an error.
pub fn prefetch(
    mem: &GuestMemoryMmap,
    read: &PageRuns,
    written: &PageRuns,
) -> Result<Prefetched, MemoryError> {
    let layout = file_layout(mem);
    let map_err = |what: &str, first: u64, pages: u64, err: io::Error| MemoryError::Map {
        mib: mem.iter().map(|r| r.len()).sum::<u64>() >> 20,
        detail: format!("{what} pages {first}+{pages}: {err}"),
    };
    let mut done = Prefetched::default();
    for &(first, pages) in written {
        let (addr, _, len) = locate_run(&layout, first, pages)?;
        // SAFETY: `addr..addr + len` lies inside one region (`locate_run`), so it is that
        // region's own mapping, alive while `mem` is borrowed. The private copy holds the
        // file's bytes, as the one the guest's first write would have made.
        let rc = unsafe { libc::madvise(addr.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                // Before Linux 5.14.
                break;
            }
            return Err(map_err("copying", first, pages, err));
        }
        done.copied += len;
    }
    let mut advice = libc::MADV_POPULATE_READ;
    for &(first, pages) in read {
        let (addr, _, len) = locate_run(&layout, first, pages)?;
        // SAFETY: as above; populating or reading ahead a private file mapping changes no
        // byte of it.
        let mut rc = unsafe { libc::madvise(addr.cast(), len as usize, advice) };
        if rc != 0
            && advice == libc::MADV_POPULATE_READ
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
        {
            advice = libc::MADV_WILLNEED;
            // SAFETY: as above.
            rc = unsafe { libc::madvise(addr.cast(), len as usize, advice) };
        }
        if rc != 0 {
            return Err(map_err(
                "prefetching",
                first,
                pages,
                io::Error::last_os_error(),
            ));
        }
        done.read += len;
    }
    Ok(done)
}

/// Writes the pages set in `pages` (one bitmap per region) at their offsets in the memory file
/// layout: into a new sparse diff file at `path` with `create`, else into the existing memory
/// file there. Returns the runs written.
pub fn write_diff(
    mem: &GuestMemoryMmap,
    pages: &PageBitmap,
    path: &Path,
    create: bool,
) -> Result<PageRuns, MemoryError> {
    let file = if create {
        let file = File::create(path).map_err(file_err("cannot create the diff file", path))?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total)
            .map_err(file_err("cannot size the diff file", path))?;
        file
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(file_err("cannot open the memory file", path))?
    };
    let mut all_runs = Vec::new();
    for ((host, offset, size), bitmap) in file_layout(mem).into_iter().zip(pages) {
        let set = |page: u64| {
            bitmap
                .get((page / 64) as usize)
                .is_some_and(|word| word & (1 << (page % 64)) != 0)
        };
        for (first, count) in runs_of(size / PAGE_SIZE, set) {
            write_run(&file, path, host, offset, first, count)?;
            all_runs.push((offset / PAGE_SIZE + first, count));
        }
    }
    file.sync_all()
        .map_err(file_err("cannot sync the diff file", path))?;
    Ok(all_runs)
}

/// Writes `count` pages from page `first` of the region at `host` (file offset `offset`).
fn write_run(
    file: &File,
    path: &Path,
    host: *mut u8,
    offset: u64,
    first: u64,
    count: u64,
) -> Result<u64, MemoryError> {
    let len = (count * PAGE_SIZE) as usize;
    // SAFETY: the run lies inside the region mapped at `host` (callers derive it from the
    // region's page count), which the caller's `&GuestMemoryMmap` keeps alive; the vCPUs and
    // device workers are paused, so nothing writes it while it is read.
    let bytes = unsafe { std::slice::from_raw_parts(host.add((first * PAGE_SIZE) as usize), len) };
    file.write_all_at(bytes, offset + first * PAGE_SIZE)
        .map_err(file_err("cannot write", path))?;
    Ok(len as u64)
}

/// The runs of consecutive pages among `0..pages` for which `set` holds.
fn runs_of(pages: u64, set: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut page = 0;
    while page < pages {
        if !set(page) {
            page += 1;
            continue;
        }
        let first = page;
        while page < pages && set(page) {
            page += 1;
        }
        runs.push((first, page - first));
    }
    runs
}

/// An empty page bitmap for `mem`.
pub fn empty_bitmap(mem: &GuestMemoryMmap) -> PageBitmap {
    mem.iter()
        .map(|r| vec![0u64; (r.len() / PAGE_SIZE).div_ceil(64) as usize])
        .collect()
}

/// Sets in `into` every page listed in `runs` (runs over the whole memory file).
pub fn mark_runs(mem: &GuestMemoryMmap, into: &mut PageBitmap, runs: &PageRuns) {
    for (bitmap, (_, offset, size)) in into.iter_mut().zip(file_layout(mem)) {
        let (lo, hi) = (offset / PAGE_SIZE, (offset + size) / PAGE_SIZE);
        for &(first, count) in runs {
            for page in first.max(lo)..(first + count).min(hi) {
                let page = page - lo;
                if let Some(word) = bitmap.get_mut((page / 64) as usize) {
                    *word |= 1 << (page % 64);
                }
            }
        }
    }
}

/// Forgets the pages the VMM wrote so far (they are in a snapshot just taken).
pub fn clear_vmm_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let vmm: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        vmm.reset();
    }
}

/// ORs into `into` the pages KVM logged (`kvm`, one bitmap per region) and the pages the VMM
/// wrote (the regions' own bitmaps, which this clears).
pub fn merge_dirty(mem: &GuestMemoryMmap, into: &mut PageBitmap, kvm: &[Vec<u64>]) {
    for ((region, bitmap), logged) in mem.iter().zip(into.iter_mut()).zip(kvm) {
        for (word, k) in bitmap.iter_mut().zip(logged) {
            *word |= k;
        }
        let vmm: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        for (word, v) in bitmap.iter_mut().zip(vmm.get_and_reset()) {
            *word |= v;
        }
    }
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

    /// A memory file of `MIN_MEM_MIB` holding `value` in page `page`, mapped as a restore does.
    fn restored(dir: &Path, page: u64, value: u8) -> GuestMemoryMmap {
        let path = dir.join("memory");
        let file = File::create(&path).expect("memory file");
        file.set_len(MIN_MEM_MIB << 20).expect("size");
        file.write_all_at(&[value], page * PAGE_SIZE)
            .expect("write");
        restore(MIN_MEM_MIB, &path, None).expect("restore")
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-mem-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn test_working_set_is_the_pages_touched_since_restore() {
        let dir = scratch("ws");
        let mem = restored(&dir, 300, 7);

        assert_eq!(working_set(&mem).expect("working set"), (vec![], vec![]));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(300 * PAGE_SIZE))
                .expect("read"),
            7
        );
        for page in 10..13 {
            mem.write_obj(1u8, GuestAddress(page * PAGE_SIZE))
                .expect("write");
        }

        // Page 300 was only read: it is the file's page, held but not written.
        assert_eq!(
            working_set(&mem).expect("working set"),
            (vec![(10, 3), (300, 1)], vec![(10, 3)])
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn test_prefetch_maps_the_runs_without_changing_them() {
        let dir = scratch("prefetch");
        let mem = restored(&dir, 301, 9);

        let done = prefetch(&mem, &vec![(300, 4), (1000, 1)], &vec![(301, 1)]).expect("prefetch");

        assert_eq!(
            done,
            Prefetched {
                copied: PAGE_SIZE,
                read: 5 * PAGE_SIZE
            }
        );
        // The kernel maps the page cache around a read fault (fault-around), so the set may
        // hold more than the runs, never less; only page 301 has its own copy.
        let (held, written) = working_set(&mem).expect("working set");
        assert_eq!(written, vec![(301, 1)]);
        let holds = |page: u64| held.iter().any(|&(f, n)| (f..f + n).contains(&page));
        assert!((300..304).chain([1000]).all(holds), "{held:?}");
        assert!(!holds(5000), "{held:?}");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(301 * PAGE_SIZE))
                .expect("read"),
            9
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn test_prefetch_rejects_runs_outside_memory() {
        let dir = scratch("prefetch-bad");
        let mem = restored(&dir, 0, 1);
        let pages = (MIN_MEM_MIB << 20) / PAGE_SIZE;

        for runs in [
            vec![(pages - 1, 2)],
            vec![(u64::MAX, 1)],
            vec![(0, u64::MAX)],
        ] {
            assert!(matches!(
                prefetch(&mem, &runs, &vec![]),
                Err(MemoryError::Run { .. })
            ));
            assert!(matches!(
                prefetch(&mem, &vec![], &runs),
                Err(MemoryError::Run { .. })
            ));
        }
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
