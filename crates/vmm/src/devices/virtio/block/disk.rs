//! The disk image behind a virtio-blk device: a raw file (or host block device) opened
//! read-only or read-write, or a read-only base with a copy-on-write overlay (see
//! [`super::overlay`]). Data moves by positional I/O (`pread`/`pwrite`) straight between the
//! files and guest memory, so the worker never seeks and never copies through a buffer (except
//! to copy a cluster up from an overlay's base).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use log::warn;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryError, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::overlay::{Overlay, OverlayError};
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

    /// Reads `len` bytes at image `offset` into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), DiskError> {
        let overlay = match &self.backing {
            Backing::Raw(file) => return read_from(file, mem, addr, len, offset),
            Backing::Overlay(overlay) => overlay,
        };
        for run in overlay.runs(offset, len as u64) {
            let at = addr.checked_add(run.offset - offset).ok_or(DiskError::Io {
                offset: run.offset,
                source: GuestMemoryError::InvalidGuestAddress(addr),
            })?;
            read_from(run.file, mem, at, run.len as usize, run.offset)?;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to image `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let overlay = match &self.backing {
            Backing::Raw(file) => return write_to(file, mem, addr, len, offset),
            Backing::Overlay(overlay) => overlay,
        };
        overlay
            .prepare_write(offset, len as u64)
            .map_err(DiskError::Overlay)?;
        write_to(overlay.data_file(), mem, addr, len, offset)?;
        overlay.mark_written(offset, len as u64);
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

fn read_from(
    file: &File,
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    offset: u64,
) -> Result<(), DiskError> {
    let mut cursor = FileCursor { file, offset };
    mem.read_exact_volatile_from(addr, &mut cursor, len)
        .map_err(|source| DiskError::Io { offset, source })
}

fn write_to(
    file: &File,
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    offset: u64,
) -> Result<(), DiskError> {
    let mut cursor = FileCursor { file, offset };
    mem.write_all_volatile_to(addr, &mut cursor, len)
        .map_err(|source| DiskError::Io { offset, source })
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

/// Positional access to a file: each transfer starts at `offset` and advances it. A single
/// `read_volatile` loops until the slice is full or the file ends, so a short `pread` never
/// turns into an error.
struct FileCursor<'a> {
    file: &'a File,
    offset: u64,
}

impl FileCursor<'_> {
    fn file_offset(&self, done: usize) -> Result<libc::off_t, VolatileMemoryError> {
        self.offset
            .checked_add(done as u64)
            .and_then(|offset| libc::off_t::try_from(offset).ok())
            .ok_or_else(|| VolatileMemoryError::IOError(io::ErrorKind::InvalidInput.into()))
    }

    /// Moves `len` bytes with `op(fd, offset, done)`, a `pread` or `pwrite` of the bytes from
    /// `done` on at file `offset`, called only while `done < len`. Retries short transfers and
    /// interruptions, stops at the end of the file; returns the bytes moved and advances the
    /// cursor by them.
    fn transfer(
        &mut self,
        len: usize,
        mut op: impl FnMut(RawFd, libc::off_t, usize) -> isize,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        while done < len {
            let offset = self.file_offset(done)?;
            match usize::try_from(op(self.file.as_raw_fd(), offset, done)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(VolatileMemoryError::IOError(e));
                }
            }
        }
        self.offset = self.offset.saturating_add(done as u64);
        Ok(done)
    }
}

impl ReadVolatile for FileCursor<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let len = buf.len();
        let result = self.transfer(len, |fd, offset, done| {
            // SAFETY: the fd is open for as long as `self.file` is borrowed. `guard` keeps the
            // slice's memory mapped; `as_ptr() + done` stays inside it since `transfer` only
            // calls this while `done < len`, and pread writes at most `len - done` bytes from
            // there. Guest memory may change under us, which the kernel copy tolerates.
            unsafe { libc::pread(fd, guard.as_ptr().add(done).cast(), len - done, offset) }
        });
        buf.bitmap().mark_dirty(0, *result.as_ref().unwrap_or(&len));
        result
    }
}

impl WriteVolatile for FileCursor<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let len = buf.len();
        self.transfer(len, |fd, offset, done| {
            // SAFETY: the fd is open for as long as `self.file` is borrowed. `guard` keeps the
            // slice's memory mapped; `as_ptr() + done` stays inside it since `transfer` only
            // calls this while `done < len`, and pwrite reads at most `len - done` bytes from
            // there.
            unsafe { libc::pwrite(fd, guard.as_ptr().add(done).cast(), len - done, offset) }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

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

    #[test]
    fn test_disk_read_to_guest_copies_at_offset() {
        let image = TempImage::with_pattern(4 * 512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();

        disk.read_to_guest(&mem, GuestAddress(DATA_ADDR), 512, 1024)
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

        let result = disk.read_to_guest(&mem, GuestAddress(DATA_ADDR), 1024, 0);

        assert!(matches!(result, Err(DiskError::Io { offset: 0, .. })));
    }

    #[test]
    fn test_disk_write_from_guest_on_read_only_disk_fails() {
        let image = TempImage::with_pattern(512);
        let disk = Disk::open(image.path(), true, None).expect("open");
        let mem = guest_memory();

        let result = disk.write_from_guest(&mem, GuestAddress(DATA_ADDR), 512, 0);

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
            disk.write_from_guest(&self.mem, GuestAddress(DATA_ADDR), bytes.len(), offset)
                .expect("write");
        }

        fn read(&self, disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
            disk.read_to_guest(&self.mem, GuestAddress(DATA_ADDR), len, offset)
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
