//! `cargo xtask rootfs`: builds the test root filesystems (placeholder, being written).

use std::path::PathBuf;

use anyhow::Result;

/// Builds (or finds in the cache) every test root filesystem; returns their paths.
pub fn build_all() -> Result<Vec<PathBuf>> {
    anyhow::bail!("not written yet")
}
