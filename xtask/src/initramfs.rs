//! The agent's initramfs: a `newc` cpio archive holding the static `hearth-agent` as `/init`,
//! the mount points it needs before it switches to the VM's root disk, and `/dev/console`
//! (the kernel opens it for init's stdio before any devtmpfs exists). Booting every guest with
//! it keeps the agent out of the images: one agent for all root filesystems.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::util;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive member.
#[derive(Debug)]
enum Member<'a> {
    Dir(&'a str),
    File {
        name: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDev {
        name: &'a str,
        major: u32,
        minor: u32,
    },
}

/// Builds the agent and its initramfs; returns the archive's path.
pub fn build() -> Result<PathBuf> {
    let agent = util::build_static("hearth-agent", "hearth-agent")?;
    let binary =
        std::fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let members = [
        Member::Dir("dev"),
        Member::CharDev {
            name: "dev/console",
            major: 5,
            minor: 1,
        },
        Member::Dir("proc"),
        Member::Dir("sys"),
        Member::Dir("newroot"),
        Member::File {
            name: "init",
            mode: 0o755,
            data: &binary,
        },
    ];
    let dir = util::workspace_root().join("target/hearth");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("agent-initramfs.cpio");
    std::fs::write(&path, archive(&members))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The `newc` archive of `members`, ending with the trailer.
fn archive(members: &[Member<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, member) in (1u32..).zip(members) {
        let (name, mode, data, rdev) = match member {
            Member::Dir(name) => (*name, S_IFDIR | 0o755, &[][..], (0, 0)),
            Member::File { name, mode, data } => (*name, S_IFREG | mode, *data, (0, 0)),
            Member::CharDev { name, major, minor } => {
                (*name, S_IFCHR | 0o600, &[][..], (*major, *minor))
            }
        };
        entry(&mut out, ino, name, mode, data, rdev);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[], (0, 0));
    out
}

fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
    let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so the archive is reproducible
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_archive_lists_members_with_cpio() {
        let members = [
            Member::Dir("dev"),
            Member::CharDev {
                name: "dev/console",
                major: 5,
                minor: 1,
            },
            Member::File {
                name: "init",
                mode: 0o755,
                data: b"#!/bin/sh\n",
            },
        ];
        let dir = std::env::temp_dir().join(format!("hearth-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.cpio");
        std::fs::write(&path, archive(&members)).unwrap();

        let out = std::process::Command::new("cpio")
            .args(["-itv", "-F"])
            .arg(&path)
            .output()
            .unwrap();

        let listing = String::from_utf8_lossy(&out.stdout);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("drwxr-xr-x"), "{listing}");
        assert!(listing.contains("crw-------"), "{listing}");
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("10 Jan  1  1970 init"), "{listing}");
    }

    #[test]
    fn test_archive_pads_name_and_data_to_four_bytes() {
        let members = [Member::File {
            name: "ab",
            mode: 0o644,
            data: b"xyz",
        }];

        let bytes = archive(&members);

        // 110-byte header + "ab\0" = 113, padded to 116; the data follows, padded to 120.
        assert_eq!(&bytes[116..119], b"xyz");
        assert_eq!(&bytes[120..126], b"070701");
    }
}
