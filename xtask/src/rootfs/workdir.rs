//! Temporary build directories beside the cache entries, and the mounts debootstrap may leave
//! in them (`proc` and `sys` of the target). A [`WorkDir`] is swept of mounts and removed when
//! dropped, after a failure too, unless it was published; nothing is removed while anything
//! under it is still mounted, so a cleanup can never reach into the host's `/proc` or `/dev`.
//! Directories left by a build that was killed are swept by the next build of the same image.

use std::cmp::Reverse;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use super::system_tool;
use crate::util;

/// A build directory that is removed on drop unless published.
#[derive(Debug)]
pub(super) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `parent/name` afresh, removing what a previous run left there.
    pub(super) fn create(parent: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        let parent =
            fs::canonicalize(parent).with_context(|| format!("resolve {}", parent.display()))?;
        let path = parent.join(name);
        if path.exists() {
            remove_tree(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the directory to `dst` in one rename, replacing what was there.
    pub(super) fn publish(self, dst: &Path) -> Result<()> {
        util::publish_dir(&self.path, dst)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        if let Err(err) = remove_tree(&self.path) {
            eprintln!(
                "rootfs: warning: cannot clean up {}: {err:#}",
                self.path.display()
            );
        }
    }
}

/// The name prefix of the work directories of image `name`.
pub(super) fn work_dir_prefix(name: &str) -> String {
    format!(".{name}-")
}

/// Removes the work directories of image `name` under `parent` whose build process is gone.
pub(super) fn sweep_stale(parent: &Path, name: &str) -> Result<()> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(());
    };
    let prefix = work_dir_prefix(name);
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", parent.display()))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|rest| rest.rsplit_once('.'))
            .map(|(_, pid)| pid)
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        eprintln!("rootfs: removing {} left by a killed build", file_name);
        remove_tree(&entry.path())?;
    }
    Ok(())
}

/// Unmounts everything under `dir`, then removes it.
pub(super) fn remove_tree(dir: &Path) -> Result<()> {
    unmount_all_under(dir)?;
    fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
}

/// Unmounts every mount point at or under `dir`, deepest first (lazily if a plain unmount
/// fails), and checks that none is left.
pub(super) fn unmount_all_under(dir: &Path) -> Result<()> {
    let dir = fs::canonicalize(dir).with_context(|| format!("resolve {}", dir.display()))?;
    for point in mount_points_under(&read_mountinfo()?, &dir) {
        eprintln!("rootfs: unmounting {}", point.display());
        let umount = || Command::new(system_tool("umount"));
        if util::output(umount().arg(&point)).is_err() {
            util::output(umount().arg("-l").arg(&point))?;
        }
    }
    let left = mount_points_under(&read_mountinfo()?, &dir);
    ensure!(
        left.is_empty(),
        "still mounted under {}: {left:?}",
        dir.display()
    );
    Ok(())
}

fn read_mountinfo() -> Result<String> {
    fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")
}

/// The mount points in `mountinfo` (the format of `/proc/self/mountinfo`) at or under `dir`,
/// deepest first. A path mounted over several times is listed as often.
fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| Reverse(point.components().count()));
    points
}

/// Decodes the `\ooo` escapes the kernel writes for spaces, tabs, newlines and backslashes.
fn unescape_octal(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], digits) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, b| acc.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 22 0:5 / /proc rw,nosuid - proc proc rw
51 22 0:40 / /cache/.debian-x.1.tmp/root/proc rw - proc proc rw
52 51 0:41 / /cache/.debian-x.1.tmp/root/proc/sys/fs/binfmt_misc rw - binfmt_misc b rw
53 22 0:42 / /cache/.debian-x.1.tmp/root/sys rw - sysfs sysfs rw
54 22 0:43 / /cache/.debian-x.1.tmp.old/root/sys rw - sysfs sysfs rw
";

    #[test]
    fn test_mount_points_under_work_dir_deepest_first() {
        let dir = Path::new("/cache/.debian-x.1.tmp");

        let points = mount_points_under(MOUNTINFO, dir);

        assert_eq!(
            points,
            [
                "/cache/.debian-x.1.tmp/root/proc/sys/fs/binfmt_misc",
                "/cache/.debian-x.1.tmp/root/proc",
                "/cache/.debian-x.1.tmp/root/sys",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn test_mount_points_under_unmounted_dir_is_empty() {
        let dir = Path::new("/cache/.busybox-y.1.tmp");

        let points = mount_points_under(MOUNTINFO, dir);

        assert!(points.is_empty());
    }

    #[test]
    fn test_unescape_octal_space_and_backslash_decoded() {
        let field = r"/mnt/a\040b\134c";

        let path = unescape_octal(field);

        assert_eq!(path, PathBuf::from(r"/mnt/a b\c"));
    }

    #[test]
    fn test_unescape_octal_trailing_backslash_kept() {
        let field = r"/mnt/a\04";

        let path = unescape_octal(field);

        assert_eq!(path, PathBuf::from(r"/mnt/a\04"));
    }
}
