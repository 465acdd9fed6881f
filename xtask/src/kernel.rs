//! `cargo xtask guest-kernel`: builds the guest kernel (placeholder, being written).

use std::path::PathBuf;

use anyhow::Result;

/// Builds (or finds in the cache) the guest kernel and returns the path of its `vmlinux`.
pub fn build() -> Result<PathBuf> {
    anyhow::bail!("not written yet")
}
