//! Test-only disk images: temporary files removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A temporary disk image file.
#[derive(Debug)]
pub(crate) struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// An image of `contents`.
    pub(crate) fn with_contents(contents: &[u8]) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("hearth-blk-test-{}-{n}.img", std::process::id()));
        std::fs::write(&path, contents).expect("write image");
        Self { path }
    }

    /// An image of `len` zero bytes.
    pub(crate) fn with_len(len: usize) -> Self {
        Self::with_contents(&vec![0u8; len])
    }

    /// An image of `len` bytes, byte `i` being `i % 251`.
    pub(crate) fn with_pattern(len: usize) -> Self {
        let contents: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        Self::with_contents(&contents)
    }

    /// The image's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The image's current contents.
    pub(crate) fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read image")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
