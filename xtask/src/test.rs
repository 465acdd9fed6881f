//! `cargo xtask test`: every test of the workspace, as the README's test command and CI run
//! them. Formatting and lints first, then the unit tests (anywhere), then the assets the KVM
//! suites boot (guest kernel, root filesystems), then the KVM suites in the test bed.
//!
//! A KVM suite is an integration test target named `kvm_*` in some crate's `tests/`; its tests
//! are `#[ignore]`d so that a plain `cargo test` anywhere skips them, and run here with
//! `--ignored`. They find the assets through `HEARTH_TEST_KERNEL`,
//! `HEARTH_TEST_ROOTFS_BUSYBOX`, `HEARTH_TEST_ROOTFS_DEBIAN`, `HEARTH_TEST_BZIMAGE`,
//! `HEARTH_TEST_VMM` (the release, static `hearth-vmm`) and `HEARTH_TEST_AGENT_INITRD`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{deps, initramfs, kernel, rootfs, testbed, util};

/// Runs every check and test; fails on the first that fails.
pub fn run() -> Result<()> {
    deps::ensure()?;
    step("format", || {
        util::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("lints", || {
        util::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("unit tests", || {
        util::run(cargo().args(["test", "--workspace"]))
    })?;
    let assets = step("test assets", TestAssets::build)?;
    assets.export();
    let suites = step("build KVM suites", kvm_suites)?;
    step("KVM suites in the test bed", || {
        run_in_testbed(&suites, &[])
    })
}

/// Runs one KVM suite (a `kvm_*` test target) in the test bed with `args` after the usual
/// `--ignored --test-threads=1 --nocapture`: the quick loop while working on one suite.
pub fn run_kvm_suite(name: &str, args: &[String]) -> Result<()> {
    deps::ensure()?;
    let assets = step("test assets", TestAssets::build)?;
    assets.export();
    let suites = step("build KVM suites", kvm_suites)?;
    let suite = suites
        .into_iter()
        .find(|path| {
            path.file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.rsplit_once('-'))
                .is_some_and(|(stem, _)| stem == name)
        })
        .with_context(|| format!("no KVM suite named {name}"))?;
    step("KVM suite in the test bed", || {
        run_in_testbed(&[suite], args)
    })
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("xtask test: {name}");
    let start = std::time::Instant::now();
    let out = f().with_context(|| format!("step `{name}` failed"))?;
    eprintln!(
        "xtask test: {name} done in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// What the KVM suites boot.
#[derive(Debug)]
pub struct TestAssets {
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    pub debian: PathBuf,
    /// The guest kernel as a bzImage.
    pub bzimage: PathBuf,
    /// `hearth-vmm`, release and static.
    pub vmm: PathBuf,
    /// The initramfs with `hearth-agent` as `/init`.
    pub agent_initrd: PathBuf,
}

impl TestAssets {
    /// Builds (or finds in the cache) the guest kernel, the test root filesystems, the release
    /// VMM and the agent's initramfs.
    pub fn build() -> Result<Self> {
        Ok(Self {
            kernel: kernel::build()?,
            busybox: rootfs::busybox()?,
            debian: rootfs::debian()?,
            bzimage: kernel::bzimage()?,
            vmm: util::build_release_vmm()?,
            agent_initrd: initramfs::build()?,
        })
    }

    /// Puts the asset paths in this process's environment, which the test bed passes on.
    pub fn export(&self) {
        std::env::set_var("HEARTH_TEST_KERNEL", &self.kernel);
        std::env::set_var("HEARTH_TEST_ROOTFS_BUSYBOX", &self.busybox);
        std::env::set_var("HEARTH_TEST_ROOTFS_DEBIAN", &self.debian);
        std::env::set_var("HEARTH_TEST_BZIMAGE", &self.bzimage);
        std::env::set_var("HEARTH_TEST_VMM", &self.vmm);
        std::env::set_var("HEARTH_TEST_AGENT_INITRD", &self.agent_initrd);
    }
}

/// Builds the workspace's tests and returns the executables of the `kvm_*` test targets.
fn kvm_suites() -> Result<Vec<PathBuf>> {
    let out = util::output(cargo().args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let suites = kvm_executables(&out);
    if suites.is_empty() {
        bail!("no kvm_* test targets found");
    }
    Ok(suites)
}

/// The executables of test targets named `kvm_*` in cargo's JSON messages.
fn kvm_executables(cargo_json: &str) -> Vec<PathBuf> {
    cargo_json
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["kind"][0] == "test")
        .filter(|msg| {
            msg["target"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kvm_"))
        })
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .collect()
}

/// A KVM suite's L1 is stopped after this long. The slowest suite takes a few minutes.
const SUITE_TIMEOUT_SECS: u64 = 1500;
/// Runs of one suite when its L1 froze (never when the suite itself failed).
const SUITE_ATTEMPTS: u32 = 2;

/// Runs each suite in an L1 of its own, so an L1 that froze costs one suite's rerun, and
/// reports every suite that failed.
fn run_in_testbed(suites: &[PathBuf], args: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for suite in suites {
        let name = suite.file_name().map_or_else(
            || suite.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        if let Err(err) = run_suite_in_testbed(suite, args) {
            eprintln!("xtask test: {name} failed: {err:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("KVM suites failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One suite in a fresh L1, run again (once) if that L1 froze.
fn run_suite_in_testbed(suite: &std::path::Path, args: &[String]) -> Result<()> {
    let mut command = vec![
        suite.to_string_lossy().into_owned(),
        "--ignored".to_owned(),
        "--test-threads=1".to_owned(),
        "--nocapture".to_owned(),
    ];
    command.extend(args.iter().cloned());
    let mut testbed_args = testbed::Args::for_command(command)?;
    testbed_args.timeout_secs = testbed_args.timeout_secs.min(SUITE_TIMEOUT_SECS);
    let mut attempt = 1;
    loop {
        eprintln!("== {} (attempt {attempt})", suite.display());
        match testbed::run(&testbed_args) {
            Ok(0) => return Ok(()),
            Ok(code) => bail!("exit status {code}"),
            Err(err) if err.is::<testbed::L1Froze>() && attempt < SUITE_ATTEMPTS => {
                eprintln!("xtask test: {err}; running the suite again in a fresh L1");
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kvm_executables_picks_kvm_test_targets_only() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"kvm_loop"},"executable":"/t/kvm_loop-1"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"blk"},"executable":"/t/blk-2"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kvm_x"},"executable":null}
{"reason":"build-finished","success":true}"#;

        let found = kvm_executables(json);

        assert_eq!(found, vec![PathBuf::from("/t/kvm_loop-1")]);
    }
}
