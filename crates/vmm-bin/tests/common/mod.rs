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
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send");
    let mut response = String::new();
    BufReader::new(stream)
        .read_line(&mut response)
        .expect("receive");
    serde_json::from_str(&response).expect("response is JSON")
}
