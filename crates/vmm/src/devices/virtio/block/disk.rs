//! The disk image behind a virtio-blk device: a raw file (or host block device) opened
//! read-only or read-write, or a read-only base with a copy-on-write overlay (see
//! [`super::overlay`]). Data moves by positional vectored I/O (`preadv`/`pwritev`) straight
//! between the files and guest memory: one call covers all of a request's buffers (for an
//! overlay, each run of the request that lives in one file), the worker never seeks, and it
//! never copies through a buffer (except to copy a cluster up from an overlay's base).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use log::warn;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::overlay::{Overlay, OverlayError};
use super::request::Segment;
use super::{ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::GuestMemoryMmap;

/// Why the disk could not be opened or accessed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open the disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of the disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The ID does not fit the 20 bytes GET_ID returns.
    #[error("the disk ID is {len} bytes long, the limit is 20")]
    IdTooLong {
        /// The length of the ID given.
        len: usize,
    },
    /// A write reached a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// Moving data between the image and guest memory failed.
    #[error("disk I/O at byte {offset} failed")]
    Io {
        /// The offset into the image.
        offset: u64,
        /// The cause.
        #[source]
        source: GuestMemoryError,
    },
    /// fdatasync failed.
    #[error("cannot flush the disk image")]
    Flush(#[source] io::Error),
    /// The copy-on-write overlay could not be opened, used or synced.
    #[error("the copy-on-write overlay failed")]
    Overlay(#[source] OverlayError),
}

/// Where a disk's bytes live.
#[derive(Debug)]
enum Backing {
    /// A raw image.
    Raw(File),
    /// A read-only base with a copy-on-write overlay.
    Overlay(Overlay),
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    backing: Backing,
    read_only: bool,
    sectors: u64,
    id: Option<[u8; ID_BYTES]>,
}

impl Disk {
    /// Opens the image at `path`; its capacity is its size in whole sectors. `id` is what
    /// GET_ID returns, at most 20 bytes (zero-padded).
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let id = id.map(pad_id).transpose()?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = image_len(&mut file, path)?;
        Ok(Self {
            backing: Backing::Raw(file),
            read_only,
            sectors: len / SECTOR_SIZE,
            id,
        })
    }

    /// Opens the image at `base` read-only, with the copy-on-write overlay whose data file is
    /// `overlay` (created if neither of its files exists) taking the guest's writes. The disk
    /// is writable; its capacity is the base's.
    pub fn open_overlay(base: &Path, overlay: &Path, id: Option<&str>) -> Result<Self, DiskError> {
        let id = id.map(pad_id).transpose()?;
        let mut file = File::open(base).map_err(|source| DiskError::Open {
            path: base.to_owned(),
            source,
        })?;
        let len = image_len(&mut file, base)?;
        let overlay = Overlay::open(file, len, overlay).map_err(DiskError::Overlay)?;
        Ok(Self {
            backing: Backing::Overlay(overlay),
            read_only: false,
            sectors: len / SECTOR_SIZE,
            id,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID string, zero-padded to 20 bytes.
    pub fn id(&self) -> Option<&[u8; ID_BYTES]> {
        self.id.as_ref()
    }

    /// Reads the image from `offset` on into the guest buffers `bufs`, filled one after
    /// another: one `preadv` per run of the image that lives in one file (the whole request for
    /// a raw image), not one `pread` per buffer.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[Segment],
        offset: u64,
    ) -> Result<(), DiskError> {
        let overlay = match &self.backing {
            Backing::Raw(file) => {
                let all = pieces(bufs, 0, u64::MAX);
                return transfer_guest(file, mem, all, offset, Direction::ToGuest);
            }
            Backing::Overlay(overlay) => overlay,
        };
        for run in overlay.runs(offset, total_len(bufs)) {
            let part = pieces(bufs, run.offset - offset, run.len);
            transfer_guest(run.file, mem, part, run.offset, Direction::ToGuest)?;
        }
        Ok(())
    }

    /// Writes the guest buffers `bufs`, one after another, to the image from `offset` on, with
    /// one `pwritev`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[Segment],
        offset: u64,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let all = pieces(bufs, 0, u64::MAX);
        let overlay = match &self.backing {
            Backing::Raw(file) => {
                return transfer_guest(file, mem, all, offset, Direction::FromGuest)
            }
            Backing::Overlay(overlay) => overlay,
        };
        let len = total_len(bufs);
        overlay
            .prepare_write(offset, len)
            .map_err(DiskError::Overlay)?;
        transfer_guest(overlay.data_file(), mem, all, offset, Direction::FromGuest)?;
        overlay.mark_written(offset, len);
        Ok(())
    }

    /// Makes written data durable: fdatasync, or an overlay's sync (its data file, then its
    /// map). A read-only disk has nothing to flush.
    pub fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        match &self.backing {
            Backing::Raw(file) => file.sync_data().map_err(DiskError::Flush),
            Backing::Overlay(overlay) => overlay.sync().map_err(DiskError::Overlay),
        }
    }
}

/// The length of the image `file`, warning if the guest cannot see all of it.
fn image_len(file: &mut File, path: &Path) -> Result<u64, DiskError> {
    // Seeking to the end also sizes host block devices, whose metadata length is 0.
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|source| DiskError::Size {
            path: path.to_owned(),
            source,
        })?;
    if len % SECTOR_SIZE != 0 {
        warn!(
            "disk image {} is {len} bytes, not a whole number of sectors; \
             the guest will not see the last {} bytes",
            path.display(),
            len % SECTOR_SIZE
        );
    }
    Ok(len)
}

/// The total length of `bufs`.
fn total_len(bufs: &[Segment]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// The pieces of `bufs` (taken as one run of bytes) that cover `len` bytes from byte `skip`
/// on, as guest address and length.
fn pieces(
    bufs: &[Segment],
    skip: u64,
    len: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut at = 0u64;
    let end = skip.saturating_add(len);
    bufs.iter().filter_map(move |buf| {
        let (start, stop) = (at, at + u64::from(buf.len));
        at = stop;
        let (from, to) = (start.max(skip), stop.min(end));
        // A sum past the address space saturates to an address no memory region holds, which
        // `get_slices` then rejects.
        (from < to).then(|| {
            (
                GuestAddress(buf.addr.0.saturating_add(from - start)),
                (to - from) as usize,
            )
        })
    })
}

/// The most buffers one `preadv` or `pwritev` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Which way a transfer moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Image to guest memory (`preadv`).
    ToGuest,
    /// Guest memory to image (`pwritev`).
    FromGuest,
}

/// Moves the guest buffers `bufs`, one after another, between guest memory and `file` from
/// file `offset` on; a read marks the buffers dirty for incremental snapshots.
fn transfer_guest(
    file: &File,
    mem: &GuestMemoryMmap,
    bufs: impl Iterator<Item = (GuestAddress, usize)>,
    offset: u64,
    direction: Direction,
) -> Result<(), DiskError> {
    let mut slices = Vec::new();
    for (addr, len) in bufs {
        for slice in mem.get_slices(addr, len) {
            slices.push(slice.map_err(|source| DiskError::Io { offset, source })?);
        }
    }
    // A mutable guard serves both directions: it keeps its slice mapped during the call.
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let iovs = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    let result = transfer(file, iovs, offset, |fd, iov, count, at| {
        // SAFETY: the fd is open for as long as `file` is borrowed; each iovec points into a
        // slice of guest memory that `guards` keeps mapped, and the call reads or writes at
        // most its length there. Guest memory may change under us, which the kernel's copy
        // tolerates.
        unsafe {
            match direction {
                Direction::ToGuest => libc::preadv(fd, iov, count, at),
                Direction::FromGuest => libc::pwritev(fd, iov, count, at),
            }
        }
    });
    if direction == Direction::ToGuest {
        // Marking more than was read is safe: a snapshot then saves a page it did not need to.
        for slice in &slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
    result
}

/// Moves all of `iovs` with `op(fd, iovs, count, file offset)`, a `preadv` or `pwritev`, from
/// file `offset` on: calls again after a short transfer or an interruption, and fails at the
/// end of the file (a disk image does not shrink under a running guest).
fn transfer(
    file: &File,
    mut iovs: Vec<libc::iovec>,
    offset: u64,
    mut op: impl FnMut(RawFd, *const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> Result<(), DiskError> {
    let expected: usize = iovs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while first < iovs.len() {
        // Past i64::MAX the conversion below fails: an error, never an overflow.
        let at = offset.saturating_add(done as u64);
        let io_err = |source: io::Error| DiskError::Io {
            offset: at,
            source: GuestMemoryError::IOError(source),
        };
        let pos =
            libc::off_t::try_from(at).map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
        let count = (iovs.len() - first).min(IOV_MAX);
        // `count` is at most IOV_MAX, so it fits a c_int.
        match usize::try_from(op(
            file.as_raw_fd(),
            iovs[first..].as_ptr(),
            count as libc::c_int,
            pos,
        )) {
            Ok(0) => {
                return Err(DiskError::Io {
                    offset,
                    source: GuestMemoryError::PartialBuffer {
                        expected,
                        completed: done,
                    },
                })
            }
            Ok(mut n) => {
                done += n;
                while n > 0 {
                    let iov = &mut iovs[first];
                    if n < iov.iov_len {
                        // SAFETY: `n` < the iovec's length, so the pointer stays inside it.
                        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                        iov.iov_len -= n;
                        n = 0;
                    } else {
                        n -= iov.iov_len;
                        first += 1;
                    }
                }
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(io_err(e));
                }
            }
        }
    }
    Ok(())
}

fn pad_id(id: &str) -> Result<[u8; ID_BYTES], DiskError> {
    let bytes = id.as_bytes();
    let mut padded = [0u8; ID_BYTES];
    padded
        .get_mut(..bytes.len())
        .ok_or(DiskError::IdTooLong { len: bytes.len() })?
        .copy_from_slice(bytes);
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryRegion};
    use vmm_sys_util::tempdir::TempDir;

    use super::super::test_utils::TempImage;
    use super::*;
    use crate::devices::virtio::mmio::testing::{guest_memory, DATA_ADDR};

    #[test]
    fn test_disk_open_capacity_rounds_down_to_sectors() {
        let image = TempImage::with_len(3 * 512 + 100);

        let disk = Disk::open(image.path(), false, None).expect("open");

        assert_eq!(disk.sectors(), 3);
    }

    #[test]
    fn test_disk_open_missing_file_fails() {
        let path = Path::new("/nonexistent/hearth/disk.img");

        let result = Disk::open(path, true, None);

        assert!(matches!(result, Err(DiskError::Open { .. })));
    }

    #[test]
    fn test_disk_open_id_longer_than_20_bytes_fails() {
        let image = TempImage::with_len(512);

        let result = Disk::open(image.path(), true, Some("an-id-that-is-too-long"));

        assert!(matches!(result, Err(DiskError::IdTooLong { len: 22 })));
    }

    #[test]
    fn test_disk_open_short_id_is_zero_padded() {
        let image = TempImage::with_len(512);

        let disk = Disk::open(image.path(), true, Some("hearth")).expect("open");

        let mut expected = [0u8; ID_BYTES];
        expected[..6].copy_from_slice(b"hearth");
        assert_eq!(disk.id(), Some(&expected));
    }

    /// A guest buffer of `len` bytes at `addr`.
    fn buf(addr: u64, len: usize) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len: len as u32,
        }
    }

    /// Guest buffers out of address order, of 512, 1536 and 1024 bytes.
    fn scattered() -> [Segment; 3] {
        [
            buf(DATA_ADDR + 0x3000, 512),
            buf(DATA_ADDR, 1536),
            buf(DATA_ADDR + 0x8000, 1024),
        ]
    }

    fn guest_bytes(mem: &GuestMemoryMmap, seg: &Segment) -> Vec<u8> {
        let mut data = vec![0u8; seg.len as usize];
        mem.read_slice(&mut data, seg.addr).expect("guest");
        data
    }

    #[test]
    fn test_disk_read_to_guest_fills_buffers_one_after_another() {
        let image = TempImage::with_pattern(16 * 512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();
        let bufs = scattered();

        disk.read_to_guest(&mem, &bufs, 1024).expect("read");

        let got: Vec<u8> = bufs.iter().flat_map(|b| guest_bytes(&mem, b)).collect();
        assert_eq!(got, image.contents()[1024..1024 + 3072]);
    }

    #[test]
    fn test_disk_write_from_guest_stores_buffers_back_to_back() {
        let image = TempImage::with_len(16 * 512);
        let disk = Disk::open(image.path(), false, None).expect("open");
        let mem = guest_memory();
        let bufs = scattered();
        for (i, b) in bufs.iter().enumerate() {
            mem.write_slice(&vec![0x10 + i as u8; b.len as usize], b.addr)
                .expect("guest");
        }

        disk.write_from_guest(&mem, &bufs, 2048).expect("write");

        let mut expected = vec![0u8; 16 * 512];
        expected[2048..2560].fill(0x10);
        expected[2560..4096].fill(0x11);
        expected[4096..5120].fill(0x12);
        assert_eq!(image.contents(), expected);
    }

    #[test]
    fn test_disk_read_to_guest_marks_the_buffers_dirty() {
        let image = TempImage::with_pattern(16 * 512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();
        let region = mem.find_region(GuestAddress(0)).expect("region");

        disk.read_to_guest(&mem, &scattered(), 0).expect("read");

        let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
        assert!(dirty(DATA_ADDR) && dirty(DATA_ADDR + 0x3000) && dirty(DATA_ADDR + 0x8000));
        assert!(!dirty(DATA_ADDR + 0x5000));
    }

    #[test]
    fn test_transfer_resumes_after_short_and_interrupted_calls() {
        let source: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut bufs = [vec![0u8; 1000], vec![0u8; 300], vec![0u8; 1700]];
        let iovs = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let file = tempfile_file();
        let mut calls = 0;

        let result = transfer(&file, iovs, 0, |_, iov, count, pos| {
            calls += 1;
            if calls == 2 {
                // SAFETY: only sets the thread's errno.
                unsafe { *libc::__errno_location() = libc::EINTR };
                return -1;
            }
            // A "file" that moves at most 700 bytes per call, into the first iovec only.
            // SAFETY: the test's iovecs point into `bufs`, which outlive the call.
            let first = unsafe { &*iov };
            assert!(count >= 1);
            let n = first.iov_len.min(700);
            let pos = pos as usize;
            // SAFETY: `n` is at most the iovec's length.
            unsafe {
                std::ptr::copy_nonoverlapping(source[pos..].as_ptr(), first.iov_base.cast(), n)
            };
            n as isize
        });

        result.expect("transfer");
        assert_eq!(bufs.concat(), source);
        assert_eq!(calls, 7);
    }

    #[test]
    fn test_transfer_fails_at_end_of_file_with_what_it_moved() {
        let mut data = vec![0u8; 100];
        let iovs = vec![libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        let file = tempfile_file();
        let mut calls = 0;

        let result = transfer(&file, iovs, 512, |_, _, _, _| {
            calls += 1;
            if calls == 1 {
                60
            } else {
                0
            }
        });

        assert!(matches!(
            result,
            Err(DiskError::Io {
                offset: 512,
                source: GuestMemoryError::PartialBuffer {
                    expected: 100,
                    completed: 60
                },
            })
        ));
    }

    fn tempfile_file() -> File {
        let image = TempImage::with_len(512);
        File::open(image.path()).expect("open")
    }

    #[test]
    fn test_disk_read_to_guest_copies_at_offset() {
        let image = TempImage::with_pattern(4 * 512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();

        disk.read_to_guest(&mem, &[buf(DATA_ADDR, 512)], 1024)
            .expect("read");

        let mut data = vec![0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA_ADDR))
            .expect("guest");
        assert_eq!(data, image.contents()[1024..1536]);
    }

    #[test]
    fn test_disk_read_past_end_of_file_fails() {
        let image = TempImage::with_len(512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();

        let result = disk.read_to_guest(&mem, &[buf(DATA_ADDR, 1024)], 0);

        assert!(matches!(result, Err(DiskError::Io { offset: 0, .. })));
    }

    #[test]
    fn test_disk_write_from_guest_on_read_only_disk_fails() {
        let image = TempImage::with_pattern(512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();

        let result = disk.write_from_guest(&mem, &[buf(DATA_ADDR, 512)], 0);

        assert!(matches!(result, Err(DiskError::ReadOnly)));
    }

    /// A base image of `len` bytes (byte `i` is `i % 251`) in a directory of its own, with
    /// the disk opened over it with an overlay.
    struct OverlayFixture {
        _dir: TempDir,
        base: PathBuf,
        overlay: PathBuf,
        mem: GuestMemoryMmap,
    }

    impl OverlayFixture {
        fn new(len: usize) -> Self {
            let (dir, base) = super::super::overlay::tests::base_image(len);
            let overlay = dir.as_path().join("disk.overlay");
            Self {
                _dir: dir,
                base,
                overlay,
                mem: guest_memory(),
            }
        }

        fn open(&self) -> Disk {
            Disk::open_overlay(&self.base, &self.overlay, None).expect("open")
        }

        fn base_contents(&self) -> Vec<u8> {
            std::fs::read(&self.base).expect("base")
        }

        fn write(&self, disk: &Disk, offset: u64, bytes: &[u8]) {
            self.mem
                .write_slice(bytes, GuestAddress(DATA_ADDR))
                .expect("guest");
            disk.write_from_guest(&self.mem, &[buf(DATA_ADDR, bytes.len())], offset)
                .expect("write");
        }

        fn read(&self, disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
            disk.read_to_guest(&self.mem, &[buf(DATA_ADDR, len)], offset)
                .expect("read");
            let mut data = vec![0u8; len];
            self.mem
                .read_slice(&mut data, GuestAddress(DATA_ADDR))
                .expect("guest");
            data
        }
    }

    #[test]
    fn test_disk_overlay_is_writable_with_the_base_capacity() {
        let f = OverlayFixture::new(3 * 4096 + 512);

        let disk = f.open();

        assert_eq!((disk.sectors(), disk.is_read_only()), (25, false));
    }

    #[test]
    fn test_disk_overlay_read_falls_through_to_base() {
        let f = OverlayFixture::new(3 * 4096);
        let disk = f.open();

        let data = f.read(&disk, 512, 2 * 4096);

        assert_eq!(data, f.base_contents()[512..512 + 2 * 4096]);
    }

    #[test]
    fn test_disk_overlay_write_goes_to_overlay_and_base_stays_unchanged() {
        let f = OverlayFixture::new(3 * 4096);
        let before = f.base_contents();
        let disk = f.open();

        f.write(&disk, 4096, &[0x5a; 4096]);

        let mut in_overlay = vec![0u8; 4096];
        File::open(&f.overlay)
            .expect("overlay")
            .read_exact_at(&mut in_overlay, 4096)
            .expect("overlay");
        assert_eq!(f.read(&disk, 4096, 4096), [0x5a; 4096]);
        assert_eq!(in_overlay, [0x5a; 4096]);
        assert_eq!(f.base_contents(), before);
    }

    #[test]
    fn test_disk_overlay_partial_sector_write_keeps_rest_of_cluster_from_base() {
        let f = OverlayFixture::new(3 * 4096);
        let mut expected = f.base_contents();
        let disk = f.open();

        f.write(&disk, 4096 + 1024, &[0x5a; 512]);

        expected[4096 + 1024..4096 + 1536].fill(0x5a);
        assert_eq!(f.read(&disk, 0, 3 * 4096), expected);
    }

    #[test]
    fn test_disk_overlay_write_across_cluster_boundaries_reads_back() {
        let f = OverlayFixture::new(4 * 4096);
        let mut expected = f.base_contents();
        let disk = f.open();

        f.write(&disk, 4096 - 512, &[0x5a; 2 * 4096 + 1024]);

        expected[4096 - 512..3 * 4096 + 512].fill(0x5a);
        assert_eq!(f.read(&disk, 0, 4 * 4096), expected);
    }

    #[test]
    fn test_disk_overlay_read_across_written_and_unwritten_clusters_merges_them() {
        let f = OverlayFixture::new(4 * 4096);
        let mut expected = f.base_contents();
        let disk = f.open();
        f.write(&disk, 4096, &[0x5a; 4096]);
        f.write(&disk, 3 * 4096, &[0xa5; 512]);

        let data = f.read(&disk, 2048, 4 * 4096 - 2048);

        expected[4096..2 * 4096].fill(0x5a);
        expected[3 * 4096..3 * 4096 + 512].fill(0xa5);
        assert_eq!(data, expected[2048..]);
    }

    #[test]
    fn test_disk_overlay_read_into_buffers_that_straddle_runs_merges_them() {
        let f = OverlayFixture::new(4 * 4096);
        let mut expected = f.base_contents();
        let disk = f.open();
        f.write(&disk, 4096, &[0x5a; 4096]);
        // Buffers of 3000, 4096 and 5192 bytes: their edges fall inside the written cluster
        // and inside the base's clusters around it.
        let bufs = [
            buf(DATA_ADDR + 0x10000, 3000),
            buf(DATA_ADDR, 4096),
            buf(DATA_ADDR + 0x4000, 5192),
        ];

        disk.read_to_guest(&f.mem, &bufs, 0).expect("read");

        expected[4096..2 * 4096].fill(0x5a);
        let got: Vec<u8> = bufs.iter().flat_map(|b| guest_bytes(&f.mem, b)).collect();
        assert_eq!(got, expected[..3000 + 4096 + 5192]);
    }

    #[test]
    fn test_disk_overlay_write_from_buffers_across_a_cluster_boundary_reads_back() {
        let f = OverlayFixture::new(4 * 4096);
        let mut expected = f.base_contents();
        let disk = f.open();
        let bufs = scattered();
        for (i, b) in bufs.iter().enumerate() {
            f.mem
                .write_slice(&vec![0x20 + i as u8; b.len as usize], b.addr)
                .expect("guest");
        }

        disk.write_from_guest(&f.mem, &bufs, 4096 - 1024)
            .expect("write");

        expected[3072..3584].fill(0x20);
        expected[3584..5120].fill(0x21);
        expected[5120..6144].fill(0x22);
        assert_eq!(f.read(&disk, 0, 4 * 4096), expected);
    }

    #[test]
    fn test_disk_overlay_write_at_end_of_unaligned_disk_reads_back() {
        let f = OverlayFixture::new(2 * 4096 + 1024);
        let mut expected = f.base_contents();
        let disk = f.open();

        f.write(&disk, 2 * 4096 + 512, &[0x5a; 512]);

        expected[2 * 4096 + 512..].fill(0x5a);
        assert_eq!(f.read(&disk, 0, 2 * 4096 + 1024), expected);
        assert_eq!(
            std::fs::metadata(&f.overlay).expect("overlay").len(),
            2 * 4096 + 1024
        );
    }

    #[test]
    fn test_disk_overlay_write_keeps_bytes_past_the_last_sector() {
        let f = OverlayFixture::new(4096 + 700);
        let mut expected = f.base_contents();
        let disk = f.open();

        f.write(&disk, 4096, &[0x5a; 512]);
        drop(disk);

        let mut tail = vec![0u8; 700];
        File::open(&f.overlay)
            .expect("overlay")
            .read_exact_at(&mut tail, 4096)
            .expect("overlay");
        expected[4096..4096 + 512].fill(0x5a);
        assert_eq!(tail, expected[4096..]);
    }

    #[test]
    fn test_disk_overlay_flush_then_reopen_keeps_writes() {
        let f = OverlayFixture::new(4 * 4096);
        let disk = f.open();
        f.write(&disk, 2 * 4096 + 512, &[0x5a; 512]);
        disk.flush().expect("flush");
        drop(disk);

        let disk = f.open();

        let mut expected = f.base_contents()[2 * 4096..3 * 4096].to_vec();
        expected[512..1024].fill(0x5a);
        assert_eq!(f.read(&disk, 2 * 4096, 4096), expected);
    }

    #[test]
    fn test_disk_overlay_with_corrupt_map_fails_to_open() {
        let f = OverlayFixture::new(4096);
        drop(f.open());
        std::fs::write(super::super::overlay::map_path(&f.overlay), b"garbage").expect("map");

        let result = Disk::open_overlay(&f.base, &f.overlay, None);

        assert!(matches!(
            result,
            Err(DiskError::Overlay(OverlayError::Invalid { .. }))
        ));
    }

    #[test]
    fn test_disk_overlay_missing_base_fails_to_open() {
        let f = OverlayFixture::new(4096);

        let result = Disk::open_overlay(Path::new("/nonexistent/base"), &f.overlay, None);

        assert!(matches!(result, Err(DiskError::Open { .. })));
        assert!(!f.overlay.exists());
    }
}
