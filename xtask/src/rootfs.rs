//! `cargo xtask rootfs`: builds the ext4 root filesystems that tests and benchmarks boot.
//!
//! Two images, `busybox.ext4` (a few MiB) and `debian-bookworm.ext4` (minbase with python3),
//! both with the Hearth init (`guest/rootfs/busybox-init.sh`) as `/sbin/init`. Each is cached at
//! `cache_dir()/rootfs/<name>-<hash>/<name>.ext4`, the hash taken over its recipe: the recipe
//! module's source, the init script, `RECIPE_VERSION` and the version of the Debian package
//! it is made from (never the mirror it is downloaded from). An image is built in a
//! work directory beside its entry and published with one rename, so an entry is either absent or
//! complete. This module owns the cache entries and the ext4 creation; `busybox` and `debian`
//! the recipes, `sources` the host's apt sources, `workdir` the build directories and the
//! mounts debootstrap may leave in them.

mod busybox;
mod debian;
mod sources;
mod workdir;

use std::collections::HashSet;
use std::fs::{self, File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::util;
use workdir::WorkDir;

/// Bump when the shared image code (the `mkfs.ext4` options, the cache layout) changes; the
/// recipe modules are hashed by their source text.
const RECIPE_VERSION: &str = "1";

/// The Hearth init, installed as `/sbin/init` in every image.
const INIT_SCRIPT: &str = include_str!("../../guest/rootfs/busybox-init.sh");

const MIB: u64 = 1 << 20;

/// The smallest image [`image_size`] returns.
const MIN_IMAGE_SIZE: u64 = 512 * MIB;

/// One image: its name, the hash of everything it is made from, and how to make it.
#[derive(Debug)]
struct Recipe {
    /// The image is `<name>.ext4`.
    name: &'static str,
    /// What the build prints before it starts (say, the package version it uses).
    about: String,
    /// [`util::content_hash`] over the recipe.
    key: String,
    /// Populates the staging directory (first argument, empty) and writes the image (second).
    build: fn(&Path, &Path) -> Result<()>,
}

/// Builds (or finds in the cache) every test root filesystem; returns their paths.
pub fn build_all() -> Result<Vec<PathBuf>> {
    Ok(vec![busybox()?, debian()?])
}

/// The busybox image: `/bin/busybox` with its applets, the Hearth init, nothing else.
pub fn busybox() -> Result<PathBuf> {
    cached(&busybox::recipe()?)
}

/// The Debian bookworm minbase image with python3 and the Hearth init. Building it needs root.
pub fn debian() -> Result<PathBuf> {
    cached(&debian::recipe()?)
}

/// Returns the cached image of `recipe`, building and publishing it first if absent.
fn cached(recipe: &Recipe) -> Result<PathBuf> {
    let start = Instant::now();
    let file_name = format!("{}.ext4", recipe.name);
    let parent = util::cache_dir().join("rootfs");
    let entry = parent.join(format!("{}-{}", recipe.name, recipe.key));
    let image = entry.join(&file_name);
    if image.is_file() {
        eprintln!(
            "rootfs: {file_name}: cached ({:.1} s)",
            start.elapsed().as_secs_f64()
        );
        return Ok(image);
    }

    eprintln!("rootfs: {file_name}: building ({})", recipe.about);
    workdir::sweep_stale(&parent, recipe.name)?;
    let work = WorkDir::create(
        &parent,
        &format!(
            "{}{}.{}.tmp",
            workdir::work_dir_prefix(recipe.name),
            recipe.key,
            std::process::id()
        ),
    )?;
    let staging = work.path().join("root");
    fs::create_dir(&staging).with_context(|| format!("create {}", staging.display()))?;
    (recipe.build)(&staging, &work.path().join(&file_name))
        .with_context(|| format!("build {file_name}"))?;
    workdir::remove_tree(&staging)?;
    work.publish(&entry)?;
    eprintln!(
        "rootfs: {file_name}: built in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// The size of an image holding `content` bytes: a quarter more for headroom and the
/// filesystem's own metadata, rounded up to a MiB, at least [`MIN_IMAGE_SIZE`].
fn image_size(content: u64) -> u64 {
    let padded = content.saturating_add(content.div_ceil(4));
    (padded.div_ceil(MIB).saturating_mul(MIB)).max(MIN_IMAGE_SIZE)
}

/// Writes an ext4 image of `size` bytes labelled `label` holding the tree at `staging`, with
/// every file owned by root whoever runs the build.
fn make_ext4(staging: &Path, image: &Path, size: u64, label: &str) -> Result<()> {
    File::create(image)
        .and_then(|file| file.set_len(size))
        .with_context(|| format!("create {}", image.display()))?;
    util::run(
        Command::new(system_tool("mkfs.ext4"))
            .args(["-q", "-F", "-t", "ext4", "-L", label])
            .args(["-E", "root_owner=0:0", "-d"])
            .arg(staging)
            .arg(image)
            .stdout(std::io::stderr()),
    )?;
    let owner = fs::metadata(staging).with_context(|| format!("stat {}", staging.display()))?;
    if owner.uid() != 0 || owner.gid() != 0 {
        chown_to_root(staging, image)?;
    }
    Ok(())
}

/// `mkfs.ext4 -d` copies owners from the staging tree, which is the builder's when not root:
/// rewrites every inode's owner to root with debugfs.
fn chown_to_root(staging: &Path, image: &Path) -> Result<()> {
    let mut script = String::new();
    walk(staging, &mut |path, _| {
        let inner = path.strip_prefix(staging).unwrap_or(path);
        let inner = inner.to_string_lossy();
        script.push_str(&format!("sif \"/{inner}\" uid 0\nsif \"/{inner}\" gid 0\n"));
        Ok(())
    })?;
    let script_path = image.with_extension("debugfs");
    fs::write(&script_path, script).with_context(|| format!("write {}", script_path.display()))?;
    util::output(
        Command::new(system_tool("debugfs"))
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(image),
    )?;
    fs::remove_file(&script_path).with_context(|| format!("remove {}", script_path.display()))
}

/// The bytes the tree at `dir` takes on disk, counting hard-linked files once.
fn disk_usage(dir: &Path) -> Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    walk(dir, &mut |_, meta| {
        if seen.insert((meta.dev(), meta.ino())) {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
        Ok(())
    })?;
    Ok(total)
}

/// Calls `visit` on every entry under `dir` (not `dir` itself), parents first, without
/// following symbolic links.
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, &Metadata) -> Result<()>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        visit(&path, &meta)?;
        if meta.is_dir() {
            walk(&path, visit)?;
        }
    }
    Ok(())
}

/// Writes `contents` to `path` with permission bits `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    fs::write(path, contents).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Installs [`INIT_SCRIPT`] as `<root>/sbin/init`, refusing a `sbin` that leads out of `root`.
fn install_init(root: &Path) -> Result<()> {
    let sbin = root.join("sbin");
    let real_root =
        fs::canonicalize(root).with_context(|| format!("resolve {}", root.display()))?;
    let real_sbin =
        fs::canonicalize(&sbin).with_context(|| format!("resolve {}", sbin.display()))?;
    ensure!(
        real_sbin.starts_with(&real_root),
        "{} leads out of the image, to {}",
        sbin.display(),
        real_sbin.display()
    );
    write_file(&real_sbin.join("init"), INIT_SCRIPT, 0o755)
}

/// `name` from the system directories, which a non-root `PATH` may lack; else `name` itself.
fn system_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_image_size_small_content_is_minimum() {
        let size = image_size(10 * MIB);

        assert_eq!(size, MIN_IMAGE_SIZE);
    }

    #[test]
    fn test_image_size_large_content_adds_a_quarter() {
        let size = image_size(800 * MIB);

        assert_eq!(size, 1000 * MIB);
    }

    #[test]
    fn test_image_size_partial_mib_rounds_up() {
        let size = image_size(800 * MIB + 1);

        assert_eq!(size, 1001 * MIB);
    }

    #[test]
    fn test_init_script_reports_exit_status() {
        let script = INIT_SCRIPT;

        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("echo \"hearth-init: exit status $status\""));
    }
}
