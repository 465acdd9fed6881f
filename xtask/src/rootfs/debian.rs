//! The recipe of `debian-bookworm.ext4`: `debootstrap --variant=minbase --include=python3`
//! from the host's Debian mirror (see `sources`), with its own hostname, the Hearth init as
//! `/sbin/init` (minbase has no init), no apt caches and no copy of the host's
//! `resolv.conf`, turned into ext4 with `mkfs.ext4 -d` sized to the content. debootstrap
//! chroots, so building needs root; the mounts it leaves in the target are undone before
//! `mkfs`, and by the work directory after a failure.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{
    disk_usage, image_size, install_init, make_ext4, sources, system_tool, workdir, write_file,
    Recipe, INIT_SCRIPT, RECIPE_VERSION,
};
use crate::util;

/// This file, hashed into the cache key so that any change to the recipe rebuilds the image.
const SOURCE: &str = include_str!("debian.rs");

const PACKAGE: &str = "debootstrap";
const SUITE: &str = "bookworm";
const VARIANT: &str = "minbase";
const INCLUDE: &str = "python3";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const LABEL: &str = "hearth-debian";
const HOSTNAME: &str = "hearth-debian\n";

/// Directories whose entries are removed (all, or those with the given suffix).
const CLEAN: [(&str, &str); 3] = [
    ("var/cache/apt/archives", ".deb"),
    ("var/cache/apt", ".bin"),
    ("var/lib/apt/lists", ""),
];

pub(super) fn recipe() -> Result<Recipe> {
    let version = util::deb_version(PACKAGE)?;
    let key = util::content_hash(&[
        ("recipe-version", RECIPE_VERSION.as_bytes()),
        ("recipe", SOURCE.as_bytes()),
        ("init", INIT_SCRIPT.as_bytes()),
        (PACKAGE, version.as_bytes()),
        ("suite", SUITE.as_bytes()),
        ("variant", VARIANT.as_bytes()),
        ("include", INCLUDE.as_bytes()),
    ]);
    Ok(Recipe {
        name: "debian-bookworm",
        about: format!("{PACKAGE} {version}, {SUITE} {VARIANT} with {INCLUDE}"),
        key,
        build,
    })
}

fn build(staging: &Path, image: &Path) -> Result<()> {
    if util::output(Command::new("id").arg("-u"))?.trim() != "0" {
        bail!(
            "building the Debian image needs root, as debootstrap chroots into it: run \
             `cargo xtask rootfs` as root (set HEARTH_CACHE to share the cache with your user)"
        );
    }
    let mirror = sources::host_mirror(SUITE)?;
    eprintln!("rootfs: debootstrap {SUITE} from {mirror}");
    let bootstrapped = debootstrap(staging, &mirror);
    workdir::unmount_all_under(staging)?;
    bootstrapped?;
    customize(staging)?;
    let content = disk_usage(staging)?;
    let size = image_size(content);
    eprintln!(
        "rootfs: {} MiB of content, image of {} MiB",
        content.div_ceil(super::MIB),
        size / super::MIB
    );
    make_ext4(staging, image, size, LABEL)
}

fn debootstrap(staging: &Path, mirror: &str) -> Result<()> {
    util::run(
        Command::new(system_tool("debootstrap"))
            .arg(format!("--variant={VARIANT}"))
            .arg(format!("--include={INCLUDE}"))
            .arg(format!("--keyring={KEYRING}"))
            .arg(SUITE)
            .arg(staging)
            .arg(mirror)
            .stdout(std::io::stderr()),
    )
}

fn customize(root: &Path) -> Result<()> {
    write_file(&root.join("etc/hostname"), HOSTNAME, 0o644)?;
    let resolv = root.join("etc/resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok() {
        fs::remove_file(&resolv).with_context(|| format!("remove {}", resolv.display()))?;
    }
    install_init(root)?;
    for (dir, suffix) in CLEAN {
        clean(&root.join(dir), suffix)?;
    }
    Ok(())
}

/// Removes the entries of `dir` whose names end with `suffix`, directories included.
fn clean(dir: &Path, suffix: &str) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read {}", dir.display()))?;
        if !entry.file_name().to_string_lossy().ends_with(suffix) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}
