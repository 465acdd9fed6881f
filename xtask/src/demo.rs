//! `cargo xtask demo`: the README's main job until the engine exists. It builds the guest
//! kernel and the test root filesystems, then, where real KVM is (the test bed otherwise),
//! boots the project's kernel on the busybox root filesystem under QEMU `-M microvm` and runs
//! a command in it, printing each step's time.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::qemu::MicrovmBoot;
use crate::test::TestAssets;
use crate::testbed;

/// The host side: build the assets, then run [`run_in_kvm`] where real KVM is.
pub fn run() -> Result<()> {
    let start = Instant::now();
    let assets = TestAssets::build()?;
    println!(
        "demo: guest kernel and root filesystems ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    println!("demo:   kernel  {}", assets.kernel.display());
    println!("demo:   rootfs  {}", assets.busybox.display());
    println!("demo:   rootfs  {}", assets.debian.display());
    let exe = std::env::current_exe().context("path of the xtask binary")?;
    let command = vec![
        exe.to_string_lossy().into_owned(),
        "demo-in-kvm".to_owned(),
        assets.kernel.to_string_lossy().into_owned(),
        assets.busybox.to_string_lossy().into_owned(),
    ];
    let code = testbed::run(&testbed::Args::for_command(command)?)?;
    if code != 0 {
        bail!("the demo failed inside the test bed (exit status {code})");
    }
    Ok(())
}

/// The part that needs KVM: boot the guest kernel and show what the guest sees.
pub fn run_in_kvm(kernel: &std::path::Path, rootfs: &std::path::Path) -> Result<()> {
    let kind = vmm::kvm_host::KvmKind::detect();
    println!("demo: KVM here is {kind:?}");
    let boot = MicrovmBoot {
        kernel,
        rootfs,
        cpus: 2,
        mem_mib: 256,
        command: "echo guest: kernel $(uname -r), $(nproc) vCPUs, \
                  $(grep MemTotal /proc/meminfo | tr -s ' '), up $(cut -d' ' -f1 /proc/uptime) s",
    };
    let out = boot.run(Duration::from_secs(120))?;
    for line in out.console.lines().filter(|l| l.starts_with("guest:")) {
        println!("demo: {line}");
    }
    if out.exit_status() != Some(0) {
        bail!("the guest did not run its command:\n{}", out.console);
    }
    println!(
        "demo: QEMU -M microvm booted the project kernel, ran the command and exited in {:.2} s",
        out.wall.as_secs_f64()
    );
    Ok(())
}
