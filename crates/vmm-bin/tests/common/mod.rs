#![allow(dead_code)] // each suite uses its own part of this module
//! What the KVM suites of `hearth-vmm` share: the assets `cargo xtask test` names in the
//! environment, per-test scratch directories and control socket requests.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The asset path in the environment variable `var`.
pub fn asset(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(var).unwrap_or_else(|| panic!("{var} is not set: run `cargo xtask test`")),
    )
}

/// A scratch directory for one test, removed at the end.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `$TMPDIR/hearth-<suite>-<name>-<pid>`, empty.
    pub fn new(suite: &str, name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("hearth-{suite}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends one request line on the control socket and returns the parsed response.
pub fn request(sock: &Path, line: &str) -> serde_json::Value {
    let mut stream = std::os::unix::net::UnixStream::connect(sock).expect("connect control socket");
    // Bounded, so a VMM that never answers fails the test instead of hanging it.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(180)))
        .expect("read timeout");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send");
    let mut response = String::new();
    BufReader::new(stream)
        .read_line(&mut response)
        .expect("receive");
    serde_json::from_str(&response).expect("response is JSON")
}

/// The VMM's log level in the KVM suites: `HEARTH_TEST_VMM_LOG`, else `debug` (a few lines
/// per VM, which name the step a failing VMM was at).
pub fn vmm_log_level() -> String {
    std::env::var("HEARTH_TEST_VMM_LOG").unwrap_or_else(|_| "debug".to_owned())
}

/// A fresh ext4 image of `mib` MiB, labelled `data`, at `path`.
pub fn make_ext4(path: &Path, mib: u64) {
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data"])
        .arg(path)
        .arg(format!("{mib}M"))
        .status()
        .expect("mkfs.ext4");
    assert!(status.success());
}
