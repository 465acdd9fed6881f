//! `cargo xtask demo`: the README's main job until the snapshot demo exists. It builds the
//! guest kernel, the test root filesystems and `hearth-vmm`, then, where real KVM is (the test
//! bed otherwise), boots the project's kernel on the busybox root filesystem with `hearth-vmm`,
//! runs a command in the guest, and prints each step's time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::test::TestAssets;
use crate::{deps, testbed};

/// The host side: build what the demo boots, then run [`run_in_kvm`] where real KVM is.
pub fn run() -> Result<()> {
    deps::ensure()?;
    let start = Instant::now();
    let assets = TestAssets::build()?;
    println!(
        "demo: hearth-vmm, guest kernel and root filesystems ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    println!("demo:   kernel  {}", assets.kernel.display());
    println!("demo:   rootfs  {}", assets.busybox.display());
    testbed::run_xtask(
        "demo-in-kvm",
        &[&assets.vmm, &assets.kernel, &assets.busybox],
    )
}

/// The part that needs KVM: boot the guest with `hearth-vmm` and show what the guest sees.
pub fn run_in_kvm(vmm: &Path, kernel: &Path, rootfs: &Path) -> Result<()> {
    let kind = vmm::kvm_host::KvmKind::detect();
    println!("demo: KVM here is {kind:?}");
    let config = serde_json::json!({
        "version": 1,
        "machine": {"vcpus": 2, "memory_mib": 256},
        "boot": {
            "kernel": kernel,
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet -- devmem 0xd0000000 8 123; \
                        echo guest: kernel $(uname -r), $(nproc) vCPUs, \
                        $(grep MemTotal /proc/meminfo | tr -s ' '), root disk vda of $(($(cat /sys/block/vda/size) / 2048)) MiB",
        },
        "drives": [{"id": "root", "path": rootfs, "read_only": true, "root": true}],
        "rng": true,
        "serial": {"output": "stdout"},
    });
    let path = std::env::temp_dir().join(format!("hearth-demo-{}.json", std::process::id()));
    std::fs::write(&path, config.to_string())?;
    let start = Instant::now();
    let out = Command::new(vmm)
        .arg("--config")
        .arg(&path)
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", vmm.display()))?;
    let wall = start.elapsed();
    let _ = std::fs::remove_file(&path);
    let console = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    for line in console.lines().filter(|l| l.starts_with("guest:")) {
        println!("demo: {line}");
    }
    if !out.status.success() || !console.contains("hearth-init: exit status 0") {
        bail!(
            "the guest did not run its command ({}):\n{console}\n{log}",
            out.status
        );
    }
    if let Some(line) = log.lines().find(|l| l.contains("userspace started")) {
        println!(
            "demo: boot timer: {}",
            line.rsplit(": ").next().unwrap_or(line)
        );
    }
    println!(
        "demo: hearth-vmm booted the guest, ran the command and exited 0 on its power-off in {:.2} s",
        wall.as_secs_f64()
    );
    Ok(())
}
