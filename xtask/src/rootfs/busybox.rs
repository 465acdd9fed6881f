//! The recipe of `busybox.ext4`: Debian's static busybox (`busybox-static`) as `/bin/busybox`,
//! a symbolic link in `/bin` for each of its applets, the usual empty top-level directories, a
//! minimal `/etc` and the Hearth init. It is staged in a plain directory and turned into ext4
//! with `mkfs.ext4 -d`, so building it needs neither root nor loop mounts.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

use super::{install_init, make_ext4, write_file, Recipe, INIT_SCRIPT, MIB, RECIPE_VERSION};
use crate::util;

/// This file, hashed into the cache key so that any change to the recipe rebuilds the image.
const SOURCE: &str = include_str!("busybox.rs");

const PACKAGE: &str = "busybox-static";
const BUSYBOX: &str = "/bin/busybox";
const LABEL: &str = "hearth-busybox";
const IMAGE_SIZE: u64 = 16 * MIB;

/// Top-level directories and their permission bits.
const DIRS: [(&str, u32); 10] = [
    ("bin", 0o755),
    ("sbin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("mnt", 0o755),
    ("run", 0o755),
    ("root", 0o700),
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";
const HOSTNAME: &str = "hearth\n";

pub(super) fn recipe() -> Result<Recipe> {
    let version = util::deb_version(PACKAGE)?;
    let key = util::content_hash(&[
        ("recipe-version", RECIPE_VERSION.as_bytes()),
        ("recipe", SOURCE.as_bytes()),
        ("init", INIT_SCRIPT.as_bytes()),
        (PACKAGE, version.as_bytes()),
    ]);
    Ok(Recipe {
        name: "busybox",
        about: format!("{PACKAGE} {version}"),
        key,
        build,
    })
}

fn build(staging: &Path, image: &Path) -> Result<()> {
    populate(staging)?;
    make_ext4(staging, image, IMAGE_SIZE, LABEL)
}

fn populate(root: &Path) -> Result<()> {
    for (dir, mode) in DIRS {
        let path = root.join(dir);
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    let bin = root.join("bin");
    let busybox = bin.join("busybox");
    fs::copy(BUSYBOX, &busybox)
        .with_context(|| format!("copy {BUSYBOX}; is {PACKAGE} installed?"))?;
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", busybox.display()))?;
    for applet in applets()? {
        let link = bin.join(&applet);
        symlink("busybox", &link).with_context(|| format!("link {}", link.display()))?;
    }
    write_file(&root.join("etc/passwd"), PASSWD, 0o644)?;
    write_file(&root.join("etc/group"), GROUP, 0o644)?;
    write_file(&root.join("etc/hostname"), HOSTNAME, 0o644)?;
    install_init(root)
}

/// The applets of the host's busybox (`busybox --list`), without `busybox` itself.
fn applets() -> Result<Vec<String>> {
    let list = util::output(Command::new(BUSYBOX).arg("--list"))?;
    let applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox")
        .map(str::to_owned)
        .collect();
    let odd = applets
        .iter()
        .find(|name| name.contains('/') || name.starts_with('.'));
    ensure!(
        odd.is_none(),
        "{BUSYBOX} --list gave an odd applet name: {odd:?}"
    );
    ensure!(
        applets.iter().any(|name| name == "sh"),
        "{BUSYBOX} has no `sh` applet"
    );
    Ok(applets)
}
