//! File helpers snapshots and overlays share: a sparse-aware copy that moves only a file's data extents,
//! with `copy_file_range(2)` (which shares extents on filesystems with reflinks, and copies
//! in the kernel elsewhere), so holes stay holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The buffer of a copy through memory.
const COPY_BUF: usize = 1 << 20;

/// The next data extent at or after `offset`: `(start, end)`, or None past the last one.
fn next_extent(file: &File, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start as u64, (end as u64).min(len))))
}

/// Copies the data extents of `src` into `dst` at the same offsets; `dst` must already be
/// at least as long. Returns the bytes copied.
pub fn copy_extents(src: &File, dst: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut offset = 0u64;
    let mut copied = 0u64;
    while offset < len {
        let Some((start, end)) = next_extent(src, offset, len)? else {
            break;
        };
        copy_range(src, dst, start, end - start)?;
        copied += end - start;
        offset = end;
    }
    Ok(copied)
}

/// Copies `src` to a new file `dst` (which must not exist), keeping holes, and syncs it.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    to.set_len(from.metadata()?.len())?;
    let copied = copy_extents(&from, &to)?;
    to.sync_all()?;
    Ok(copied)
}

/// Copies `len` bytes at `offset` from `src` to the same offset in `dst`, with
/// `copy_file_range(2)`, or through memory where that cannot work (across filesystems on
/// older kernels, or a filesystem without it). A source shorter than `offset + len` is an
/// `UnexpectedEof` error.
pub fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = libc::loff_t::try_from(offset + done)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut off_out = off_in;
        let want = usize::try_from(len - done).unwrap_or(usize::MAX);
        // SAFETY: both descriptors stay open for the call, borrowed from `src` and `dst`; the
        // kernel reads and updates only the two offsets, locals of this frame.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match u64::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Across filesystems on older kernels, or where the filesystem has no
                    // copy_file_range: copy through memory.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_buffered(src, dst, offset + done, len - done)
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// The slow path of [`copy_range`].
fn copy_buffered(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(COPY_BUF).min(COPY_BUF)];
    let mut done = 0u64;
    while done < len {
        let n = buf
            .len()
            .min(usize::try_from(len - done).unwrap_or(usize::MAX));
        let chunk = &mut buf[..n];
        src.read_exact_at(chunk, offset + done)?;
        dst.write_all_at(chunk, offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn test_copy_sparse_keeps_data_and_holes() {
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("tempdir");
        let src = dir.as_path().join("src");
        let dst = dir.as_path().join("dst");
        let file = File::create(&src).expect("create");
        file.set_len(16 << 20).expect("size");
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_at(b"tail", (16 << 20) - 4).expect("write");
        file.write_all_at(&[7u8; 8192], 8 << 20).expect("write");

        copy_sparse(&src, &dst).expect("copy");

        assert_eq!(
            std::fs::read(&dst).expect("read"),
            std::fs::read(&src).expect("read")
        );
        let blocks =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).expect("meta"));
        assert!(
            blocks * 512 < 4 << 20,
            "the copy is not sparse: {blocks} blocks"
        );
    }

    #[test]
    fn test_copy_sparse_refuses_existing_destination() {
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("tempdir");
        let src = dir.as_path().join("src");
        std::fs::write(&src, b"x").expect("write");
        std::fs::write(dir.as_path().join("dst"), b"keep").expect("write");

        assert!(copy_sparse(&src, &dir.as_path().join("dst")).is_err());
        assert_eq!(
            std::fs::read(dir.as_path().join("dst")).expect("read"),
            b"keep"
        );
    }
}
