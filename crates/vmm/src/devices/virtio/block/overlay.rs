//! A copy-on-write overlay over a read-only base image, so that every microVM cloned from one
//! snapshot shares the base and writes only to files of its own.
//!
//! An overlay is two files:
//! - the **data** file: sparse and exactly as long as the base, holding each written 4 KiB
//!   cluster at the cluster's own offset (the clusters never written are holes);
//! - the **map** file, `<data>.map`: a 40-byte header, then a bitmap with one bit per cluster,
//!   set when the data file holds that cluster. Integers are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HEARTHOV"
//!      8     4  version (1)
//!     12     4  cluster size in bytes (4096)
//!     16     8  disk size in bytes: the base's
//!     24     8  cluster count: the disk size / 4096, rounded up
//!     32     8  checksum: the first 8 bytes of the SHA-256 of bytes 0..32
//!     40     n  bitmap, n = cluster count / 8 rounded up: cluster i is bit i % 8 of byte i / 8;
//!               the bits past the last cluster are zero
//! ```
//!
//! Opening checks all of it against the base: magic, version, checksum, cluster size, disk
//! size, cluster count, the length of both files and the padding bits. Anything else is an
//! [`OverlayError`], never a guess. The data file is locked (`flock`) while open, so two disks
//! cannot write to one overlay.
//!
//! **I/O.** A read takes each cluster from the data file if its bit is set, else from the base,
//! straight into guest memory. A write goes straight from guest memory to the data file; a
//! cluster it covers only in part and that the overlay does not hold yet is first copied up
//! from the base (through a one-cluster buffer), so the rest of the cluster keeps the base's
//! bytes. The base is only ever opened read-only.
//!
//! **Durability.** While the disk is open the bitmap in memory is authoritative. A sync (the
//! guest's FLUSH, a snapshot, closing the disk) takes a copy of the parts of the bitmap that
//! changed since the last one, fdatasyncs the data file, and only then writes those parts to
//! the map and fdatasyncs it, so the map on disk never claims a cluster whose data is not on
//! disk. Bits only go from 0 to 1, so a crash during a sync, even one that tears a map write,
//! leaves a valid overlay. As on a real disk, writes the guest did not flush may be lost if the
//! host crashes: a cluster first written since the last sync reads from the base again, and
//! one overwritten since may hold the old data or the new.
//!
//! **Copies.** [`copy`] makes an independent overlay from a synced one; snapshots use it to
//! freeze a drive and to give each clone its own. Only the written clusters are copied, with
//! `copy_file_range(2)` (which shares extents on filesystems with reflinks), so holes stay
//! holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use log::{error, warn};
use sha2::{Digest, Sha256};

use crate::devices::virtio::mmio::error_chain;
use crate::fsutil;

/// The unit of copy-on-write, in bytes.
pub const CLUSTER_SIZE: u64 = 4096;
/// The first bytes of every map file.
pub const MAGIC: [u8; 8] = *b"HEARTHOV";
/// The map format this VMM reads and writes.
pub const VERSION: u32 = 1;
/// Length of the map's header; the bitmap follows it.
pub const HEADER_LEN: u64 = 40;
/// Bytes of bitmap written back to the map as a unit: 32768 clusters, 128 MiB of disk.
const MAP_CHUNK: u64 = 4096;

/// Why an overlay could not be opened, used or copied.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file could not be created, opened, read, written or synced.
    #[error("I/O on {} failed", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file is not a valid overlay file, or not one for this base.
    #[error("{} is not a valid overlay file", path.display())]
    Invalid {
        /// The data or map file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        defect: Defect,
    },
    /// Another open disk holds the overlay.
    #[error("the overlay {} is in use by another disk", path.display())]
    InUse {
        /// The data file.
        path: PathBuf,
    },
    /// A write would end past the end of the disk (and grow the data file).
    #[error("a write of {len} bytes at byte {offset} ends past the end of the disk")]
    PastEnd {
        /// Where the write starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A cluster could not be copied up from the base.
    #[error("cannot copy the cluster at byte {offset} up from the base")]
    CopyUp {
        /// The cluster's offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What is wrong with an overlay file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Defect {
    /// The data file exists without its map.
    #[error("its map file is missing")]
    MissingMap,
    /// The map exists without its data file.
    #[error("its data file is missing")]
    MissingData,
    /// The map does not start with [`MAGIC`].
    #[error("it does not start with the overlay magic")]
    Magic,
    /// The map is of another format version.
    #[error("format version {found}; this VMM reads version {VERSION}")]
    Version {
        /// The version in the map.
        found: u32,
    },
    /// The header's checksum does not match its contents.
    #[error("the header checksum does not match")]
    Checksum,
    /// The map is for another cluster size.
    #[error("cluster size {found}; this VMM uses {CLUSTER_SIZE}")]
    ClusterSize {
        /// The cluster size in the map.
        found: u32,
    },
    /// The cluster count does not match the disk size.
    #[error("{found} clusters for a {disk_size}-byte disk")]
    ClusterCount {
        /// The cluster count in the map.
        found: u64,
        /// The disk size in the map.
        disk_size: u64,
    },
    /// The overlay was made for a base of another size.
    #[error("made for a {found}-byte base; this base has {base} bytes")]
    DiskSize {
        /// The disk size in the map.
        found: u64,
        /// The base's size.
        base: u64,
    },
    /// The map is truncated or too long.
    #[error("the map is {found} bytes long; {expected} expected")]
    MapLength {
        /// The map's length.
        found: u64,
        /// The length its header (or the base) calls for.
        expected: u64,
    },
    /// The data file is not as long as the disk.
    #[error("the data file is {found} bytes long; {expected} expected")]
    DataLength {
        /// The data file's length.
        found: u64,
        /// The disk size.
        expected: u64,
    },
    /// Bits are set past the last cluster.
    #[error("bits are set past the last cluster")]
    StrayBits,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, defect: Defect) -> OverlayError {
    OverlayError::Invalid {
        path: path.to_owned(),
        defect,
    }
}

/// The map file of the overlay whose data file is `data`: `<data>.map`.
pub fn map_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".map");
    PathBuf::from(name)
}

/// Clusters in a disk of `disk_size` bytes.
fn clusters(disk_size: u64) -> u64 {
    disk_size.div_ceil(CLUSTER_SIZE)
}

/// Bytes of bitmap for a disk of `disk_size` bytes.
fn bitmap_len(disk_size: u64) -> u64 {
    clusters(disk_size).div_ceil(8)
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&digest[..8]);
    sum
}

fn encode_header(disk_size: u64) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
    header[16..24].copy_from_slice(&disk_size.to_le_bytes());
    header[24..32].copy_from_slice(&clusters(disk_size).to_le_bytes());
    let sum = checksum(&header[..32]);
    header[32..40].copy_from_slice(&sum);
    header
}

/// Checks a map header; returns the disk size it is for.
fn decode_header(header: &[u8; HEADER_LEN as usize]) -> Result<u64, Defect> {
    let u32_at = |at: usize| {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&header[at..at + 4]);
        u32::from_le_bytes(bytes)
    };
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if header[0..8] != MAGIC {
        return Err(Defect::Magic);
    }
    if u32_at(8) != VERSION {
        return Err(Defect::Version { found: u32_at(8) });
    }
    if header[32..40] != checksum(&header[..32]) {
        return Err(Defect::Checksum);
    }
    if u64::from(u32_at(12)) != CLUSTER_SIZE {
        return Err(Defect::ClusterSize { found: u32_at(12) });
    }
    let disk_size = u64_at(16);
    if u64_at(24) != clusters(disk_size) {
        return Err(Defect::ClusterCount {
            found: u64_at(24),
            disk_size,
        });
    }
    Ok(disk_size)
}

/// The bitmap in memory, with a dirty flag for each [`MAP_CHUNK`] of it. Atomic, so that the
/// worker and a snapshot's sync can share it.
#[derive(Debug)]
struct Bitmap {
    words: Vec<AtomicU64>,
    dirty: Vec<AtomicBool>,
    /// Its length in the map, in bytes.
    len: u64,
}

impl Bitmap {
    fn from_bytes(bytes: &[u8]) -> Self {
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                AtomicU64::new(u64::from_le_bytes(word))
            })
            .collect();
        let len = bytes.len() as u64;
        Self {
            words,
            dirty: (0..len.div_ceil(MAP_CHUNK))
                .map(|_| AtomicBool::new(false))
                .collect(),
            len,
        }
    }

    fn get(&self, cluster: u64) -> bool {
        self.words
            .get((cluster / 64) as usize)
            .is_some_and(|word| word.load(Ordering::Acquire) & 1 << (cluster % 64) != 0)
    }

    fn set(&self, cluster: u64) {
        let Some(word) = self.words.get((cluster / 64) as usize) else {
            return;
        };
        let bit = 1 << (cluster % 64);
        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.mark_dirty(cluster / 8);
        }
    }

    /// Marks the chunk holding bitmap byte `byte` for the next sync.
    fn mark_dirty(&self, byte: u64) {
        if let Some(flag) = self.dirty.get((byte / MAP_CHUNK) as usize) {
            flag.store(true, Ordering::Release);
        }
    }

    /// Bitmap bytes `start..end` (`start` a multiple of 8).
    fn bytes(&self, start: u64, end: u64) -> Vec<u8> {
        let words = self
            .words
            .get((start / 8) as usize..end.div_ceil(8) as usize)
            .unwrap_or(&[]);
        let mut bytes: Vec<u8> = words
            .iter()
            .flat_map(|word| word.load(Ordering::Acquire).to_le_bytes())
            .collect();
        bytes.truncate((end - start) as usize);
        bytes
    }

    /// Clears the dirty flags; returns the chunks they marked, as (byte offset, bytes).
    fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut chunks = Vec::new();
        for (index, flag) in self.dirty.iter().enumerate() {
            if flag.swap(false, Ordering::AcqRel) {
                let start = index as u64 * MAP_CHUNK;
                chunks.push((start, self.bytes(start, (start + MAP_CHUNK).min(self.len))));
            }
        }
        chunks
    }

    /// Whether any bit from `clusters` on is set.
    fn has_stray_bits(&self, clusters: u64) -> bool {
        (clusters..self.len * 8).any(|cluster| self.get(cluster))
    }

    /// The runs of set bits, as cluster ranges `(first, end)`.
    fn set_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let low = u64::from(bits.trailing_zeros());
                let ones = u64::from((bits >> low).trailing_ones());
                let first = index as u64 * 64 + low;
                match runs.last_mut() {
                    Some(run) if run.1 == first => run.1 = first + ones,
                    _ => runs.push((first, first + ones)),
                }
                let seen = low + ones;
                bits = if seen >= 64 {
                    0
                } else {
                    bits & !((1 << seen) - 1)
                };
            }
        }
        runs
    }

    fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// Reads and checks the map in `map`; returns the disk size and the bitmap. With `base_len`,
/// the map must be for a base of that size.
fn read_map(map: &File, path: &Path, base_len: Option<u64>) -> Result<(u64, Bitmap), OverlayError> {
    let found = map.metadata().map_err(io_err(path))?.len();
    if found < HEADER_LEN {
        let expected = HEADER_LEN + base_len.map_or(0, bitmap_len);
        return Err(invalid(path, Defect::MapLength { found, expected }));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    map.read_exact_at(&mut header, 0).map_err(io_err(path))?;
    let disk_size = decode_header(&header).map_err(|defect| invalid(path, defect))?;
    if let Some(base) = base_len.filter(|&base| base != disk_size) {
        return Err(invalid(
            path,
            Defect::DiskSize {
                found: disk_size,
                base,
            },
        ));
    }
    let expected = HEADER_LEN + bitmap_len(disk_size);
    if found != expected {
        return Err(invalid(path, Defect::MapLength { found, expected }));
    }
    // The length matched the file's, so this allocates no more than the map holds.
    let mut bytes = vec![0u8; bitmap_len(disk_size) as usize];
    map.read_exact_at(&mut bytes, HEADER_LEN)
        .map_err(io_err(path))?;
    let bitmap = Bitmap::from_bytes(&bytes);
    if bitmap.has_stray_bits(clusters(disk_size)) {
        return Err(invalid(path, Defect::StrayBits));
    }
    Ok((disk_size, bitmap))
}

fn check_data_len(data: &File, path: &Path, disk_size: u64) -> Result<(), OverlayError> {
    let found = data.metadata().map_err(io_err(path))?.len();
    if found != disk_size {
        return Err(invalid(
            path,
            Defect::DataLength {
                found,
                expected: disk_size,
            },
        ));
    }
    Ok(())
}

/// Takes the overlay's exclusive lock, held until `data` is closed.
fn lock(data: &File, path: &Path) -> Result<(), OverlayError> {
    // SAFETY: flock on a descriptor `data` keeps open; no memory is involved.
    if unsafe { libc::flock(data.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        return Err(OverlayError::InUse {
            path: path.to_owned(),
        });
    }
    // Some filesystems have no locks; the overlay works without one.
    warn!("cannot lock the overlay {}: {e}", path.display());
    Ok(())
}

/// Makes the names of new files in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), OverlayError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(dir))
}

/// Files being created, removed again unless [`NewFiles::keep`] is called, so that a failed
/// creation or copy leaves nothing behind.
#[derive(Debug, Default)]
struct NewFiles(Vec<PathBuf>);

impl NewFiles {
    fn create(&mut self, path: &Path) -> Result<File, OverlayError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        self.0.push(path.to_owned());
        Ok(file)
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates an empty overlay for a disk of `disk_size` bytes: a data file of holes and a map
/// with no bit set, both synced.
fn create(data: &Path, map: &Path, disk_size: u64) -> Result<(), OverlayError> {
    let mut new = NewFiles::default();
    let data_file = new.create(data)?;
    let map_file = new.create(map)?;
    data_file.set_len(disk_size).map_err(io_err(data))?;
    data_file.sync_all().map_err(io_err(data))?;
    map_file
        .write_all_at(&encode_header(disk_size), 0)
        .map_err(io_err(map))?;
    map_file
        .set_len(HEADER_LEN + bitmap_len(disk_size))
        .map_err(io_err(map))?;
    map_file.sync_all().map_err(io_err(map))?;
    sync_parent(data)?;
    new.keep();
    Ok(())
}

/// An open overlay and its base.
#[derive(Debug)]
pub struct Overlay {
    base: File,
    data: File,
    data_path: PathBuf,
    map: File,
    map_path: PathBuf,
    disk_size: u64,
    bitmap: Bitmap,
    /// Serialises syncs: the worker's FLUSH, a snapshot's and the one on drop.
    sync_lock: Mutex<()>,
}

impl Overlay {
    /// Opens the overlay whose data file is `data` over `base` (opened read-only, `base_len`
    /// bytes long), creating it if neither of its files exists, and locks it.
    pub fn open(base: File, base_len: u64, data: &Path) -> Result<Self, OverlayError> {
        let map_path = map_path(data);
        let exists = |path: &Path| path.try_exists().map_err(io_err(path));
        match (exists(data)?, exists(&map_path)?) {
            (false, false) => create(data, &map_path, base_len)?,
            (true, false) => return Err(invalid(data, Defect::MissingMap)),
            (false, true) => return Err(invalid(&map_path, Defect::MissingData)),
            (true, true) => {}
        }
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err(path))
        };
        let data_file = open(data)?;
        lock(&data_file, data)?;
        let map = open(&map_path)?;
        let (disk_size, bitmap) = read_map(&map, &map_path, Some(base_len))?;
        check_data_len(&data_file, data, disk_size)?;
        Ok(Self {
            base,
            data: data_file,
            data_path: data.to_owned(),
            map,
            map_path,
            disk_size,
            bitmap,
            sync_lock: Mutex::new(()),
        })
    }

    /// The disk's size in bytes: the base's.
    pub fn size(&self) -> u64 {
        self.disk_size
    }

    /// How many clusters the overlay holds.
    pub fn written_clusters(&self) -> u64 {
        self.bitmap.count()
    }

    /// Splits `offset..offset + len` into runs that each come from one file.
    pub(super) fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        Runs {
            overlay: self,
            at: offset,
            end: offset.saturating_add(len),
        }
    }

    /// The file writes go to once [`Overlay::prepare_write`] has readied their range.
    pub(super) fn data_file(&self) -> &File {
        &self.data
    }

    /// Readies `offset..offset + len` to be written to the data file: a cluster at either end
    /// that the write covers only in part, and that the overlay does not hold yet, is copied up
    /// from the base. Call [`Overlay::mark_written`] once the data is written.
    pub(super) fn prepare_write(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.disk_size)
            .ok_or(OverlayError::PastEnd { offset, len })?;
        if len == 0 {
            return Ok(());
        }
        for cluster in [offset / CLUSTER_SIZE, (end - 1) / CLUSTER_SIZE] {
            let start = cluster * CLUSTER_SIZE;
            let stop = (start + CLUSTER_SIZE).min(self.disk_size);
            let covered = offset <= start && end >= stop;
            if !covered && !self.bitmap.get(cluster) {
                self.copy_up(cluster)?;
            }
        }
        Ok(())
    }

    /// Records that `offset..offset + len` is in the data file.
    pub(super) fn mark_written(&self, offset: u64, len: u64) {
        let Some(last) = offset.checked_add(len).and_then(|end| end.checked_sub(1)) else {
            return;
        };
        for cluster in offset / CLUSTER_SIZE..=last / CLUSTER_SIZE {
            self.bitmap.set(cluster);
        }
    }

    fn copy_up(&self, cluster: u64) -> Result<(), OverlayError> {
        let start = cluster * CLUSTER_SIZE;
        let len = CLUSTER_SIZE.min(self.disk_size.saturating_sub(start));
        let mut buf = vec![0u8; len as usize];
        let copy_err = |source| OverlayError::CopyUp {
            offset: start,
            source,
        };
        self.base.read_exact_at(&mut buf, start).map_err(copy_err)?;
        self.data.write_all_at(&buf, start).map_err(copy_err)?;
        self.bitmap.set(cluster);
        Ok(())
    }

    /// Makes everything written so far durable: the data file first, then the parts of the
    /// bitmap changed since the last sync (see the module documentation).
    pub fn sync(&self) -> Result<(), OverlayError> {
        let _guard = self
            .sync_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Every bit in this copy was set after its cluster was written, so syncing the data
        // file next puts all of them on disk.
        let chunks = self.bitmap.take_dirty();
        let result = self.write_back(&chunks);
        if result.is_err() {
            for (start, _) in &chunks {
                self.bitmap.mark_dirty(*start);
            }
        }
        result
    }

    fn write_back(&self, chunks: &[(u64, Vec<u8>)]) -> Result<(), OverlayError> {
        self.data.sync_data().map_err(io_err(&self.data_path))?;
        if chunks.is_empty() {
            return Ok(());
        }
        for (start, bytes) in chunks {
            self.map
                .write_all_at(bytes, HEADER_LEN + start)
                .map_err(io_err(&self.map_path))?;
        }
        self.map.sync_data().map_err(io_err(&self.map_path))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            error!("cannot sync the overlay on close: {}", error_chain(&e));
        }
    }
}

/// A piece of a read that comes from one file.
#[derive(Debug)]
pub(super) struct Run<'a> {
    /// Where it starts on the disk (and in `file`).
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The data file or the base.
    pub file: &'a File,
}

/// The iterator of [`Overlay::runs`].
#[derive(Debug)]
pub(super) struct Runs<'a> {
    overlay: &'a Overlay,
    at: u64,
    end: u64,
}

impl<'a> Iterator for Runs<'a> {
    type Item = Run<'a>;

    fn next(&mut self) -> Option<Run<'a>> {
        if self.at >= self.end {
            return None;
        }
        let bitmap = &self.overlay.bitmap;
        let offset = self.at;
        let from_overlay = bitmap.get(offset / CLUSTER_SIZE);
        let mut next = (offset / CLUSTER_SIZE + 1).saturating_mul(CLUSTER_SIZE);
        while next < self.end && bitmap.get(next / CLUSTER_SIZE) == from_overlay {
            next = next.saturating_add(CLUSTER_SIZE);
        }
        self.at = next.min(self.end);
        Some(Run {
            offset,
            len: self.at - offset,
            file: if from_overlay {
                &self.overlay.data
            } else {
                &self.overlay.base
            },
        })
    }
}

/// Makes `dst` an independent copy of the overlay whose data file is `src`, with its own map;
/// neither file of `dst` may exist. Only the written clusters are copied, with
/// `copy_file_range` (sharing extents where the filesystem can), so holes stay holes. The
/// source must be synced and not written meanwhile; it is checked as [`Overlay::open`] would,
/// except against a base. On failure nothing is left at `dst`.
pub fn copy(src: &Path, dst: &Path) -> Result<(), OverlayError> {
    let src_map_path = map_path(src);
    let src_map = File::open(&src_map_path).map_err(io_err(&src_map_path))?;
    let (disk_size, bitmap) = read_map(&src_map, &src_map_path, None)?;
    let src_data = File::open(src).map_err(io_err(src))?;
    check_data_len(&src_data, src, disk_size)?;

    let dst_map_path = map_path(dst);
    let mut new = NewFiles::default();
    let dst_data = new.create(dst)?;
    let dst_map = new.create(&dst_map_path)?;
    dst_data.set_len(disk_size).map_err(io_err(dst))?;
    for (first, end) in bitmap.set_runs() {
        let start = first * CLUSTER_SIZE;
        let stop = (end * CLUSTER_SIZE).min(disk_size);
        fsutil::copy_range(&src_data, &dst_data, start, stop - start).map_err(io_err(dst))?;
    }
    // The data before the map that points at it.
    dst_data.sync_all().map_err(io_err(dst))?;
    let mut map = encode_header(disk_size).to_vec();
    map.extend(bitmap.bytes(0, bitmap.len));
    dst_map
        .write_all_at(&map, 0)
        .map_err(io_err(&dst_map_path))?;
    dst_map.sync_all().map_err(io_err(&dst_map_path))?;
    sync_parent(dst)?;
    new.keep();
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::MetadataExt;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    /// A base image of `len` bytes, byte `i` being `i % 251`, and where its overlay goes.
    struct Fixture {
        dir: TempDir,
        base: PathBuf,
        data: PathBuf,
    }

    /// A new directory holding `base.img`, `len` bytes with byte `i` being `i % 251`; returns
    /// the directory and the image's path. Shared with the disk's overlay tests.
    pub(crate) fn base_image(len: usize) -> (TempDir, PathBuf) {
        let dir = TempDir::new().expect("tempdir");
        let base = dir.as_path().join("base.img");
        let contents: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, contents).expect("base");
        (dir, base)
    }

    impl Fixture {
        fn new(len: usize) -> Self {
            let (dir, base) = base_image(len);
            let data = dir.as_path().join("disk.overlay");
            Self { dir, base, data }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.as_path().join(name)
        }

        fn base_contents(&self) -> Vec<u8> {
            std::fs::read(&self.base).expect("base")
        }

        fn open(&self) -> Result<Overlay, OverlayError> {
            open(&self.base, &self.data)
        }

        /// Creates the overlay and closes it again.
        fn create(&self) {
            drop(self.open().expect("create"));
        }

        fn map(&self) -> Vec<u8> {
            std::fs::read(map_path(&self.data)).expect("map")
        }

        fn write_map(&self, bytes: &[u8]) {
            std::fs::write(map_path(&self.data), bytes).expect("map");
        }

        /// Rewrites the map's header with `edit` applied and a valid checksum.
        fn edit_header(&self, edit: impl FnOnce(&mut [u8])) {
            let mut map = self.map();
            edit(&mut map[..32]);
            let sum = checksum(&map[..32]);
            map[32..40].copy_from_slice(&sum);
            self.write_map(&map);
        }
    }

    fn open(base: &Path, data: &Path) -> Result<Overlay, OverlayError> {
        let file = File::open(base).expect("base");
        let len = file.metadata().expect("base").len();
        Overlay::open(file, len, data)
    }

    fn read(overlay: &Overlay, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for run in overlay.runs(offset, len) {
            let mut buf = vec![0u8; run.len as usize];
            run.file.read_exact_at(&mut buf, run.offset).expect("read");
            out.extend(buf);
        }
        out
    }

    fn write(overlay: &Overlay, offset: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        overlay.prepare_write(offset, len).expect("prepare");
        overlay
            .data_file()
            .write_all_at(bytes, offset)
            .expect("write");
        overlay.mark_written(offset, len);
    }

    fn defect(result: Result<Overlay, OverlayError>) -> Defect {
        match result {
            Err(OverlayError::Invalid { defect, .. }) => defect,
            other => panic!("expected an invalid overlay, got {other:?}"),
        }
    }

    #[test]
    fn test_overlay_open_new_creates_sparse_data_and_empty_map() {
        let f = Fixture::new(3 * 4096 + 512);

        let overlay = f.open().expect("open");

        let data = std::fs::metadata(&f.data).expect("data");
        let mut expected_map = encode_header(3 * 4096 + 512).to_vec();
        expected_map.push(0);
        assert_eq!(overlay.size(), 3 * 4096 + 512);
        assert_eq!(data.len(), 3 * 4096 + 512);
        assert_eq!(data.blocks(), 0);
        assert_eq!(f.map(), expected_map);
    }

    #[test]
    fn test_overlay_runs_of_fresh_overlay_come_from_base() {
        let f = Fixture::new(3 * 4096);
        let overlay = f.open().expect("open");

        let contents = read(&overlay, 100, 3 * 4096 - 200);

        assert_eq!(contents, f.base_contents()[100..3 * 4096 - 100]);
    }

    #[test]
    fn test_overlay_runs_split_where_source_changes() {
        let f = Fixture::new(4 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 4096, &[1; 2 * 4096]);

        let runs: Vec<(u64, u64, bool)> = overlay
            .runs(512, 4 * 4096 - 1024)
            .map(|r| (r.offset, r.len, std::ptr::eq(r.file, overlay.data_file())))
            .collect();

        assert_eq!(
            runs,
            [
                (512, 4096 - 512, false),
                (4096, 2 * 4096, true),
                (3 * 4096, 4096 - 512, false)
            ]
        );
    }

    #[test]
    fn test_overlay_write_keeps_base_unchanged() {
        let f = Fixture::new(2 * 4096);
        let before = f.base_contents();
        let overlay = f.open().expect("open");

        write(&overlay, 0, &[7; 4096]);

        assert_eq!(read(&overlay, 0, 4096), [7; 4096]);
        assert_eq!(f.base_contents(), before);
    }

    #[test]
    fn test_overlay_whole_cluster_write_needs_no_copy_up() {
        let f = Fixture::new(2 * 4096);
        let overlay = f.open().expect("open");

        overlay.prepare_write(4096, 4096).expect("prepare");

        assert_eq!(overlay.written_clusters(), 0);
    }

    #[test]
    fn test_overlay_partial_write_copies_up_the_cluster_first() {
        let f = Fixture::new(2 * 4096);
        let overlay = f.open().expect("open");

        overlay.prepare_write(4096 + 512, 512).expect("prepare");

        let mut copied = vec![0u8; 4096];
        overlay
            .data_file()
            .read_exact_at(&mut copied, 4096)
            .expect("data");
        assert_eq!(overlay.written_clusters(), 1);
        assert_eq!(copied, f.base_contents()[4096..]);
    }

    #[test]
    fn test_overlay_write_past_end_of_disk_is_refused() {
        let f = Fixture::new(2 * 4096);
        let overlay = f.open().expect("open");

        let result = overlay.prepare_write(2 * 4096 - 512, 1024);

        assert!(matches!(result, Err(OverlayError::PastEnd { .. })));
    }

    #[test]
    fn test_overlay_write_without_sync_leaves_map_unchanged() {
        let f = Fixture::new(2 * 4096);
        let overlay = f.open().expect("open");
        let before = f.map();

        write(&overlay, 0, &[7; 4096]);

        assert_eq!(f.map(), before);
    }

    #[test]
    fn test_overlay_sync_writes_changed_bits_to_map() {
        let f = Fixture::new(20 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 9 * 4096, &[7; 4096]);

        overlay.sync().expect("sync");

        assert_eq!(f.map()[HEADER_LEN as usize..], [0, 0b10, 0]);
    }

    #[test]
    fn test_overlay_bitmap_persists_across_sync_and_reopen() {
        let f = Fixture::new(4 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 2 * 4096, &[7; 4096]);
        overlay.sync().expect("sync");
        drop(overlay);

        let overlay = f.open().expect("reopen");

        assert_eq!(overlay.written_clusters(), 1);
        assert_eq!(read(&overlay, 2 * 4096, 4096), [7; 4096]);
    }

    #[test]
    fn test_overlay_drop_syncs_the_bitmap() {
        let f = Fixture::new(4 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 0, &[7; 4096]);

        drop(overlay);

        assert_eq!(f.map()[HEADER_LEN as usize], 1);
    }

    #[test]
    fn test_overlay_open_twice_is_in_use() {
        let f = Fixture::new(4096);
        let _first = f.open().expect("open");

        let second = f.open();

        assert!(matches!(second, Err(OverlayError::InUse { .. })));
    }

    #[test]
    fn test_overlay_open_wrong_magic_is_rejected() {
        let f = Fixture::new(4096);
        f.create();
        let mut map = f.map();
        map[0] = b'X';
        f.write_map(&map);

        assert_eq!(defect(f.open()), Defect::Magic);
    }

    #[test]
    fn test_overlay_open_wrong_version_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        f.edit_header(|h| h[8..12].copy_from_slice(&2u32.to_le_bytes()));

        assert_eq!(defect(f.open()), Defect::Version { found: 2 });
    }

    #[test]
    fn test_overlay_open_bad_checksum_is_rejected() {
        let f = Fixture::new(4096);
        f.create();
        let mut map = f.map();
        map[20] ^= 1;
        f.write_map(&map);

        assert_eq!(defect(f.open()), Defect::Checksum);
    }

    #[test]
    fn test_overlay_open_wrong_cluster_size_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        f.edit_header(|h| h[12..16].copy_from_slice(&512u32.to_le_bytes()));

        assert_eq!(defect(f.open()), Defect::ClusterSize { found: 512 });
    }

    #[test]
    fn test_overlay_open_wrong_cluster_count_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        f.edit_header(|h| h[24..32].copy_from_slice(&9u64.to_le_bytes()));

        assert_eq!(
            defect(f.open()),
            Defect::ClusterCount {
                found: 9,
                disk_size: 4096
            }
        );
    }

    #[test]
    fn test_overlay_open_over_base_of_other_size_is_rejected() {
        let f = Fixture::new(4096);
        f.create();
        let other = f.path("other.img");
        std::fs::write(&other, [0u8; 8192]).expect("other");

        let result = open(&other, &f.data);

        assert_eq!(
            defect(result),
            Defect::DiskSize {
                found: 4096,
                base: 8192
            }
        );
    }

    #[test]
    fn test_overlay_open_truncated_map_is_rejected() {
        let f = Fixture::new(64 * 4096);
        f.create();
        let map = f.map();

        f.write_map(&map[..map.len() - 1]);

        assert_eq!(
            defect(f.open()),
            Defect::MapLength {
                found: HEADER_LEN + 7,
                expected: HEADER_LEN + 8
            }
        );
    }

    #[test]
    fn test_overlay_open_map_shorter_than_header_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        f.write_map(&f.map()[..10]);

        assert!(matches!(
            defect(f.open()),
            Defect::MapLength { found: 10, .. }
        ));
    }

    #[test]
    fn test_overlay_open_wrong_size_data_file_is_rejected() {
        let f = Fixture::new(2 * 4096);
        f.create();

        std::fs::write(&f.data, [0u8; 4096]).expect("data");

        assert_eq!(
            defect(f.open()),
            Defect::DataLength {
                found: 4096,
                expected: 2 * 4096
            }
        );
    }

    #[test]
    fn test_overlay_open_bits_past_last_cluster_are_rejected() {
        let f = Fixture::new(3 * 4096);
        f.create();
        let mut map = f.map();

        map[HEADER_LEN as usize] = 0b1000;
        f.write_map(&map);

        assert_eq!(defect(f.open()), Defect::StrayBits);
    }

    #[test]
    fn test_overlay_open_data_without_map_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        std::fs::remove_file(map_path(&f.data)).expect("remove");

        assert_eq!(defect(f.open()), Defect::MissingMap);
    }

    #[test]
    fn test_overlay_open_map_without_data_is_rejected() {
        let f = Fixture::new(4096);
        f.create();

        std::fs::remove_file(&f.data).expect("remove");

        assert_eq!(defect(f.open()), Defect::MissingData);
    }

    #[test]
    fn test_overlay_error_message_names_file_and_defect() {
        let f = Fixture::new(4096);
        f.create();
        f.write_map(b"not a map at all, but long enough to have a header");

        let e = f.open().expect_err("invalid");

        let message = error_chain(&e);
        assert!(message.contains("disk.overlay.map"), "{message}");
        assert!(message.contains("magic"), "{message}");
    }

    #[test]
    fn test_overlay_copy_carries_written_clusters() {
        let f = Fixture::new(4 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 4096 + 100, &[7; 100]);
        overlay.sync().expect("sync");
        let expected = read(&overlay, 0, 4 * 4096);
        let copy_path = f.path("copy.overlay");

        copy(&f.data, &copy_path).expect("copy");

        let copied = open(&f.base, &copy_path).expect("open copy");
        assert_eq!(read(&copied, 0, 4 * 4096), expected);
        assert_eq!(std::fs::read(map_path(&copy_path)).expect("map"), f.map());
    }

    #[test]
    fn test_overlay_copy_is_independent_of_original() {
        let f = Fixture::new(4 * 4096);
        let overlay = f.open().expect("open");
        write(&overlay, 0, &[1; 4096]);
        overlay.sync().expect("sync");
        let copy_path = f.path("copy.overlay");
        copy(&f.data, &copy_path).expect("copy");
        let copied = open(&f.base, &copy_path).expect("open copy");

        write(&copied, 0, &[2; 4096]);
        write(&copied, 3 * 4096, &[2; 4096]);
        copied.sync().expect("sync");

        assert_eq!(read(&overlay, 0, 4096), [1; 4096]);
        assert_eq!(
            read(&overlay, 3 * 4096, 4096),
            f.base_contents()[3 * 4096..]
        );
        assert_eq!(overlay.written_clusters(), 1);
    }

    #[test]
    fn test_overlay_copy_keeps_holes() {
        let f = Fixture::new(16 << 20);
        let overlay = f.open().expect("open");
        write(&overlay, 8 << 20, &[7; 4096]);
        overlay.sync().expect("sync");
        let copy_path = f.path("copy.overlay");

        copy(&f.data, &copy_path).expect("copy");

        let copied = std::fs::metadata(&copy_path).expect("copy");
        assert_eq!(copied.len(), 16 << 20);
        assert!(
            copied.blocks() * 512 <= 1 << 20,
            "{} blocks",
            copied.blocks()
        );
    }

    #[test]
    fn test_overlay_copy_onto_existing_file_fails_and_keeps_it() {
        let f = Fixture::new(4096);
        f.create();
        let existing = f.path("existing");
        std::fs::write(&existing, b"keep").expect("existing");

        let result = copy(&f.data, &existing);

        assert!(matches!(result, Err(OverlayError::Io { .. })));
        assert_eq!(std::fs::read(&existing).expect("existing"), b"keep");
    }

    #[test]
    fn test_overlay_copy_of_corrupt_overlay_fails_and_leaves_nothing() {
        let f = Fixture::new(4096);
        f.create();
        f.write_map(&f.map()[..HEADER_LEN as usize]);
        let copy_path = f.path("copy.overlay");

        let result = copy(&f.data, &copy_path);

        assert!(matches!(result, Err(OverlayError::Invalid { .. })));
        assert!(!copy_path.exists());
        assert!(!map_path(&copy_path).exists());
    }

    #[test]
    fn test_bitmap_set_runs_merges_across_words() {
        let bitmap = Bitmap::from_bytes(&[0; 24]);
        for cluster in (3..5).chain(60..130).chain([191]) {
            bitmap.set(cluster);
        }

        assert_eq!(bitmap.set_runs(), [(3, 5), (60, 130), (191, 192)]);
    }
}
