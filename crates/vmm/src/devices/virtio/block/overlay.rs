//! A copy-on-write overlay over a read-only base image, so that every microVM restored from one
//! snapshot writes only to its own file while they all share the base.
//!
//! An overlay is two files:
//! - the **data** file: sparse, as long as the base, holding each written 4 KiB cluster at its
//!   own offset;
//! - the **map** file (`<data>.map`): a header, then a bitmap with one bit per cluster, set
//!   when the data file holds that cluster.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HEARTHOV"
//!      8     4  version, u32 little-endian (1)
//!     12     4  cluster size, u32 little-endian (4096)
//!     16     8  disk size in bytes (the base's), u64 little-endian
//!     24     8  cluster count, u64 little-endian
//!     32     …  bitmap: bit i of byte i/8 is cluster i
//! ```
//!
//! Reads take each cluster from the data file if its bit is set, else from the base. A write
//! that covers part of a cluster not yet in the overlay first copies the cluster up from the
//! base. The bitmap lives in memory while the VM runs; a flush (the guest's FLUSH, a snapshot,
//! closing the disk) syncs the data file and only then writes the changed parts of the bitmap
//! and syncs the map, so the map never claims data that is not on disk. Writes the guest did
//! not flush may be lost in a host crash, as on a real disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::disk::DiskError;
use crate::fsutil;

/// The overlay's unit of copy-on-write.
pub const CLUSTER_SIZE: u64 = 4096;
const MAGIC: &[u8; 8] = b"HEARTHOV";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
/// The bitmap is written back in chunks of this many bytes.
const MAP_CHUNK: usize = 4096;

/// The map file of the overlay whose data file is `data`.
pub fn map_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".map");
    PathBuf::from(name)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Open {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, message: String) -> DiskError {
    DiskError::Overlay {
        path: path.to_owned(),
        message,
    }
}

/// An open overlay with its base.
#[derive(Debug)]
pub struct Overlay {
    base: File,
    data: File,
    map: File,
    map_path: PathBuf,
    disk_size: u64,
    bits: Vec<AtomicU64>,
    /// Chunks of the bitmap changed since the last flush.
    dirty_chunks: Vec<AtomicBool>,
    /// Serialises flushes (the worker is the only writer, but a snapshot flushes too).
    flush_lock: Mutex<()>,
}

impl Overlay {
    /// Opens `data` (and its map) over `base`, creating both if `data` does not exist.
    pub fn open(base: &Path, data: &Path) -> Result<Self, DiskError> {
        let base_file = File::open(base).map_err(io_err(base))?;
        let disk_size = base_file.metadata().map_err(io_err(base))?.len();
        let clusters = disk_size.div_ceil(CLUSTER_SIZE);
        let bitmap_bytes = clusters.div_ceil(8);
        let map_path = map_path(data);
        if !data.exists() {
            create(data, &map_path, disk_size, clusters, bitmap_bytes)?;
        }
        let data_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(data)
            .map_err(io_err(data))?;
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&map_path)
            .map_err(io_err(&map_path))?;
        let data_len = data_file.metadata().map_err(io_err(data))?.len();
        if data_len != disk_size {
            return Err(invalid(
                data,
                format!("the data file holds {data_len} bytes, the base {disk_size}"),
            ));
        }
        let map_len = map.metadata().map_err(io_err(&map_path))?.len();
        if map_len != HEADER_LEN + bitmap_bytes {
            return Err(invalid(
                &map_path,
                format!(
                    "the map is {map_len} bytes, {} expected for this base",
                    HEADER_LEN + bitmap_bytes
                ),
            ));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        map.read_exact_at(&mut header, 0)
            .map_err(io_err(&map_path))?;
        check_header(&header, disk_size, clusters).map_err(|m| invalid(&map_path, m))?;
        let mut bytes = vec![0u8; bitmap_bytes as usize];
        map.read_exact_at(&mut bytes, HEADER_LEN)
            .map_err(io_err(&map_path))?;
        let bits = bytes
            .chunks(8)
            .map(|c| {
                let mut word = [0u8; 8];
                word[..c.len()].copy_from_slice(c);
                AtomicU64::new(u64::from_le_bytes(word))
            })
            .collect();
        let chunks = (bitmap_bytes as usize).div_ceil(MAP_CHUNK);
        Ok(Self {
            base: base_file,
            data: data_file,
            map,
            map_path,
            disk_size,
            bits,
            dirty_chunks: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            flush_lock: Mutex::new(()),
        })
    }

    /// The disk's size in bytes (the base's).
    pub fn size(&self) -> u64 {
        self.disk_size
    }

    fn is_set(&self, cluster: u64) -> bool {
        self.bits
            .get((cluster / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0)
    }

    fn set(&self, cluster: u64) {
        if let Some(word) = self.bits.get((cluster / 64) as usize) {
            word.fetch_or(1 << (cluster % 64), Ordering::AcqRel);
            let chunk = (cluster / 8) as usize / MAP_CHUNK;
            if let Some(flag) = self.dirty_chunks.get(chunk) {
                flag.store(true, Ordering::Release);
            }
        }
    }

    /// Splits `offset..offset + len` into runs that come from the same file: `(start, len,
    /// from_overlay)`.
    pub fn read_segments(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut segments: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let cluster = at / CLUSTER_SIZE;
            let next = ((cluster + 1) * CLUSTER_SIZE).min(end);
            let from_overlay = self.is_set(cluster);
            match segments.last_mut() {
                Some(last) if last.2 == from_overlay && last.0 + last.1 == at => {
                    last.1 += next - at;
                }
                _ => segments.push((at, next - at, from_overlay)),
            }
            at = next;
        }
        segments
    }

    /// The file a segment of [`Overlay::read_segments`] comes from.
    pub fn file(&self, from_overlay: bool) -> &File {
        if from_overlay {
            &self.data
        } else {
            &self.base
        }
    }

    /// Makes `offset..offset + len` writable in the data file: the partly covered clusters at
    /// either end that the overlay does not hold yet are copied up from the base. Call
    /// [`Overlay::mark_written`] once the data is written.
    pub fn prepare_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / CLUSTER_SIZE;
        let last = (end - 1) / CLUSTER_SIZE;
        for cluster in [first, last] {
            let start = cluster * CLUSTER_SIZE;
            let covered = offset <= start && end >= (start + CLUSTER_SIZE).min(self.disk_size);
            if !covered && !self.is_set(cluster) {
                self.copy_up(cluster)?;
            }
        }
        Ok(())
    }

    /// Records that `offset..offset + len` is now in the data file.
    pub fn mark_written(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for cluster in offset / CLUSTER_SIZE..=(offset + len - 1) / CLUSTER_SIZE {
            self.set(cluster);
        }
    }

    fn copy_up(&self, cluster: u64) -> Result<(), DiskError> {
        let start = cluster * CLUSTER_SIZE;
        let len = CLUSTER_SIZE.min(self.disk_size - start) as usize;
        let mut buf = vec![0u8; len];
        self.base
            .read_exact_at(&mut buf, start)
            .map_err(|e| DiskError::CopyUp {
                offset: start,
                source: e,
            })?;
        self.data
            .write_all_at(&buf, start)
            .map_err(|e| DiskError::CopyUp {
                offset: start,
                source: e,
            })?;
        self.set(cluster);
        Ok(())
    }

    /// Syncs the data file, then writes the changed bitmap chunks and syncs the map.
    pub fn flush(&self) -> io::Result<()> {
        let _guard = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.data.sync_data()?;
        let mut wrote = false;
        for (chunk, flag) in self.dirty_chunks.iter().enumerate() {
            if !flag.swap(false, Ordering::AcqRel) {
                continue;
            }
            let bytes = self.bitmap_bytes();
            let start = chunk * MAP_CHUNK;
            let end = (start + MAP_CHUNK).min(bytes.len());
            if let Err(e) = self
                .map
                .write_all_at(&bytes[start..end], HEADER_LEN + start as u64)
            {
                flag.store(true, Ordering::Release);
                return Err(e);
            }
            wrote = true;
        }
        if wrote {
            self.map.sync_data()?;
        }
        Ok(())
    }

    fn bitmap_bytes(&self) -> Vec<u8> {
        let total = self.disk_size.div_ceil(CLUSTER_SIZE).div_ceil(8) as usize;
        let mut out: Vec<u8> = self
            .bits
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        out.truncate(total);
        out
    }

    /// The map file's path.
    pub fn map_file(&self) -> &Path {
        &self.map_path
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!(
                "cannot flush the overlay map {}: {e}",
                self.map_path.display()
            );
        }
    }
}

fn create(
    data: &Path,
    map_path: &Path,
    disk_size: u64,
    clusters: u64,
    bitmap_bytes: u64,
) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(data)
        .map_err(io_err(data))?;
    file.set_len(disk_size).map_err(io_err(data))?;
    let map = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(map_path)
        .map_err(io_err(map_path))?;
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
    header.extend_from_slice(&disk_size.to_le_bytes());
    header.extend_from_slice(&clusters.to_le_bytes());
    map.write_all_at(&header, 0).map_err(io_err(map_path))?;
    map.set_len(HEADER_LEN + bitmap_bytes)
        .map_err(io_err(map_path))?;
    file.sync_all().map_err(io_err(data))?;
    map.sync_all().map_err(io_err(map_path))?;
    Ok(())
}

fn check_header(header: &[u8], disk_size: u64, clusters: u64) -> Result<(), String> {
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().unwrap_or_default());
    if &header[..8] != MAGIC {
        return Err("not a Hearth overlay map (bad magic)".into());
    }
    if u32_at(8) != VERSION {
        return Err(format!(
            "overlay version {}; this build reads version {VERSION}",
            u32_at(8)
        ));
    }
    if u64::from(u32_at(12)) != CLUSTER_SIZE {
        return Err(format!(
            "cluster size {}, expected {CLUSTER_SIZE}",
            u32_at(12)
        ));
    }
    if u64_at(16) != disk_size || u64_at(24) != clusters {
        return Err(format!(
            "the overlay is for a {}-byte disk, the base has {disk_size} bytes",
            u64_at(16)
        ));
    }
    Ok(())
}

/// Copies the overlay whose data file is `src` to a new, independent overlay at `dst` (which
/// must not exist): only the written extents move (reflinked where the filesystem can), holes
/// stay holes. The source must be flushed and not written meanwhile.
pub fn copy(src: &Path, dst: &Path) -> Result<(), DiskError> {
    fsutil::copy_sparse(src, dst).map_err(io_err(dst))?;
    let dst_map = map_path(dst);
    if let Err(e) = fsutil::copy_sparse(&map_path(src), &dst_map) {
        let _ = std::fs::remove_file(dst);
        return Err(io_err(&dst_map)(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn base(dir: &TempDir, len: usize) -> PathBuf {
        let path = dir.as_path().join("base");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, bytes).expect("base");
        path
    }

    fn read(o: &Overlay, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (start, n, from_overlay) in o.read_segments(offset, len) {
            let mut buf = vec![0u8; n as usize];
            o.file(from_overlay)
                .read_exact_at(&mut buf, start)
                .expect("read");
            out.extend(buf);
        }
        out
    }

    fn write(o: &Overlay, offset: u64, bytes: &[u8]) {
        o.prepare_write(offset, bytes.len() as u64)
            .expect("prepare");
        o.data.write_all_at(bytes, offset).expect("write");
        o.mark_written(offset, bytes.len() as u64);
    }

    #[test]
    fn test_overlay_reads_fall_through_to_base() {
        let dir = TempDir::new().expect("dir");
        let base = base(&dir, 3 * 4096);
        let o = Overlay::open(&base, &dir.as_path().join("ov")).expect("open");

        assert_eq!(
            read(&o, 100, 5000),
            std::fs::read(&base).expect("base")[100..5100]
        );
    }

    #[test]
    fn test_overlay_partial_write_keeps_rest_of_cluster_and_base_unchanged() {
        let dir = TempDir::new().expect("dir");
        let base = base(&dir, 3 * 4096);
        let before = std::fs::read(&base).expect("base");
        let o = Overlay::open(&base, &dir.as_path().join("ov")).expect("open");

        write(&o, 4096 + 512, &[0xaa; 512]);

        let mut expected = before.clone();
        expected[4096 + 512..4096 + 1024].fill(0xaa);
        assert_eq!(read(&o, 0, 3 * 4096), expected);
        assert_eq!(std::fs::read(&base).expect("base"), before);
    }

    #[test]
    fn test_overlay_write_across_clusters_and_unaligned_disk_end() {
        let dir = TempDir::new().expect("dir");
        let base = base(&dir, 2 * 4096 + 1024);
        let mut expected = std::fs::read(&base).expect("base");
        let o = Overlay::open(&base, &dir.as_path().join("ov")).expect("open");

        write(&o, 4000, &[1; 200]);
        write(&o, 2 * 4096 + 512, &[2; 512]);

        expected[4000..4200].fill(1);
        expected[2 * 4096 + 512..].fill(2);
        assert_eq!(read(&o, 0, expected.len() as u64), expected);
    }

    #[test]
    fn test_overlay_bitmap_persists_across_flush_and_reopen() {
        let dir = TempDir::new().expect("dir");
        let base = base(&dir, 4 * 4096);
        let ov = dir.as_path().join("ov");
        {
            let o = Overlay::open(&base, &ov).expect("open");
            write(&o, 8192, &[7; 4096]);
            o.flush().expect("flush");
        }
        let o = Overlay::open(&base, &ov).expect("reopen");

        assert_eq!(read(&o, 8192, 4096), vec![7; 4096]);
    }

    #[test]
    fn test_overlay_corrupt_or_mismatched_map_is_rejected() {
        let dir = TempDir::new().expect("dir");
        let base_path = base(&dir, 4 * 4096);
        let ov = dir.as_path().join("ov");
        drop(Overlay::open(&base_path, &ov).expect("create"));
        let map = map_path(&ov);
        let good = std::fs::read(&map).expect("map");

        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&map, &bad).expect("write");
        let err = Overlay::open(&base_path, &ov).expect_err("bad magic");
        assert!(err.to_string().contains("magic"), "{err}");

        std::fs::write(&map, &good[..good.len() - 1]).expect("truncate");
        assert!(Overlay::open(&base_path, &ov).is_err());

        std::fs::write(&map, &good).expect("restore");
        let other = dir.as_path().join("other");
        std::fs::write(&other, vec![0u8; 8 * 4096]).expect("other base");
        assert!(Overlay::open(&other, &ov).is_err());
    }

    #[test]
    fn test_overlay_copy_is_independent() {
        let dir = TempDir::new().expect("dir");
        let base = base(&dir, 4 * 4096);
        let a = dir.as_path().join("a");
        let b = dir.as_path().join("b");
        {
            let o = Overlay::open(&base, &a).expect("open");
            write(&o, 0, &[1; 4096]);
            o.flush().expect("flush");
        }
        copy(&a, &b).expect("copy");
        {
            let ob = Overlay::open(&base, &b).expect("open copy");
            assert_eq!(read(&ob, 0, 4096), vec![1; 4096]);
            write(&ob, 0, &[2; 4096]);
        }
        let oa = Overlay::open(&base, &a).expect("reopen");

        assert_eq!(read(&oa, 0, 4096), vec![1; 4096]);
        assert!(copy(&a, &b).is_err(), "copy over an existing overlay");
    }
}
