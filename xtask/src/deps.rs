//! The Debian packages the tasks need, listed once in `xtask/apt-packages.txt`. As root the
//! missing ones are installed with apt-get; otherwise the error names them.

use std::process::Command;

use anyhow::{bail, Result};

use crate::util;

const PACKAGES: &str = include_str!("../apt-packages.txt");

/// The package names in `apt-packages.txt`.
pub fn packages() -> Vec<&'static str> {
    PACKAGES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn missing() -> Vec<&'static str> {
    packages()
        .into_iter()
        .filter(|p| {
            !util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s.contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect()
}

/// Makes sure every package is installed.
pub fn ensure() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    if util::output(Command::new("id").arg("-u"))?.trim() != "0" {
        bail!(
            "missing Debian packages: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    util::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_packages_skip_comments_and_blanks() {
        let pkgs = packages();

        assert!(pkgs.contains(&"qemu-system-x86"));
        assert!(pkgs.iter().all(|p| !p.starts_with('#') && !p.is_empty()));
    }
}
