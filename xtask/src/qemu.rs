//! QEMU `-M microvm` under KVM, booting the project's guest kernel on a test root filesystem:
//! the reference the benchmarks compare `hearth-vmm` with. Needs real KVM (the test bed).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Result};

/// The machine: no ACPI (the kernel has none) and no automatic command line, since QEMU would
/// append its devices after our `--`, where the kernel hands them to init instead.
const MACHINE: &str = "microvm,acpi=off,rtc=off,isa-serial=on,auto-kernel-cmdline=off";
/// Where QEMU puts the one virtio-mmio device (the root disk): the last of its transports at
/// 0xfeb00000 + 512 * n, with IRQ 5 + n. QEMU 7.2 fills them from the top.
const ROOT_DEVICE: &str = "virtio_mmio.device=512@0xfeb00e00:12";

/// One boot of a guest whose init (`guest/rootfs/busybox-init.sh`) runs `command` and
/// resets the machine.
#[derive(Debug)]
pub struct MicrovmBoot<'a> {
    pub kernel: &'a Path,
    pub rootfs: &'a Path,
    pub cpus: u32,
    pub mem_mib: u32,
    /// A shell command for the guest's init. The kernel splits it into init's arguments and
    /// init joins them with spaces again, so it must not contain double quotes.
    pub command: &'a str,
    /// Passed as `hearth_boot_marker=`: init prints it the moment it starts.
    pub marker: Option<&'a str>,
}

impl MicrovmBoot<'_> {
    /// The QEMU command line: microvm with an i8042 (so `reboot=k` resets the machine and
    /// `-no-reboot` turns that into QEMU exiting), the serial console on stdout, and the root
    /// filesystem as a virtio-mmio block device in snapshot mode (writes are discarded).
    pub fn command(&self) -> Result<Command> {
        if self.command.contains('"') {
            bail!("the guest command must not contain double quotes");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", MACHINE])
            .args(["-enable-kvm", "-cpu", "host"])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &format!("{}M", self.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-device", "i8042"])
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw {ROOT_DEVICE}{} -- {}",
                self.marker
                    .map(|m| format!(" hearth_boot_marker={m}"))
                    .unwrap_or_default(),
                self.command
            ))
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,snapshot=on",
                self.rootfs.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_command_rejects_double_quotes() {
        let boot = MicrovmBoot {
            kernel: Path::new("/k"),
            rootfs: Path::new("/r"),
            cpus: 1,
            mem_mib: 128,
            command: "echo \"x\"",
            marker: None,
        };

        assert!(boot.command().is_err());
    }
}
