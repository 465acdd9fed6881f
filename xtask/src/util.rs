//! Plumbing shared by the tasks: where the workspace and the cache are, content hashing,
//! and running external commands with errors that say what failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cache of built artifacts (kernels, root filesystems, test bed images): `$HEARTH_CACHE`,
/// else `$XDG_CACHE_HOME/hearth`, else `~/.cache/hearth`. It lives outside the workspace so
/// fresh clones on the same machine reuse it; every entry is keyed by a content hash.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("hearth");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/hearth")
}

/// A SHA-256 over labelled parts, as lowercase hex. Each part is length-prefixed so that
/// moving bytes from one part to the next changes the hash.
pub fn content_hash(parts: &[(&str, &[u8])]) -> String {
    let mut hasher = Sha256::new();
    for (label, bytes) in parts {
        hasher.update((label.len() as u64).to_le_bytes());
        hasher.update(label.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The target static executables are built for: the host's own, named explicitly so that
/// `+crt-static` reaches only the target crates, not build scripts and proc macros.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds binary `bin` of `package` in release mode as a static executable (glibc with
/// `-C target-feature=+crt-static`) and returns its path. Static binaries start without the
/// dynamic loader's work, and the guest agent must not depend on the guest's libraries.
pub fn build_static(package: &str, bin: &str) -> Result<PathBuf> {
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "--quiet", "-p", package])
            .args(["--target", STATIC_TARGET])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(workspace_root()),
    )?;
    Ok(workspace_root()
        .join("target")
        .join(STATIC_TARGET)
        .join("release")
        .join(bin))
}

/// Builds `hearth-vmm` (release, static) and returns its path.
pub fn build_release_vmm() -> Result<PathBuf> {
    build_static("hearth-vmm", "hearth-vmm")
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The installed version of a Debian package, or an error naming it.
pub fn deb_version(package: &str) -> Result<String> {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .with_context(|| format!("package {package} is not installed; run `cargo xtask deps`"))?;
    Ok(out.trim().to_owned())
}

/// Replaces `dst` by `src` atomically (a rename within one filesystem), so a cache entry is
/// either absent or complete.
pub fn publish_dir(src: &Path, dst: &Path) -> Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst).with_context(|| format!("remove {}", dst.display()))?;
    }
    std::fs::rename(src, dst)
        .with_context(|| format!("rename {} to {}", src.display(), dst.display()))
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_content_hash_part_boundaries_matter() {
        let a = content_hash(&[("x", b"ab"), ("y", b"c")]);
        let b = content_hash(&[("x", b"a"), ("y", b"bc")]);

        assert_ne!(a, b);
    }

    #[test]
    fn test_content_hash_is_stable_hex() {
        let h = content_hash(&[("x", b"1")]);

        assert_eq!(h.len(), 64);
        assert_eq!(h, content_hash(&[("x", b"1")]));
    }

    #[test]
    fn test_shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
