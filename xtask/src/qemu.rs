//! QEMU `-M microvm` under KVM, booting the project's guest kernel: the reference the
//! benchmarks compare `hearth-vmm` with. Needs real KVM (the test bed).
//!
//! [`Microvm`] builds the command line (machine, kernel, initrd, root disk, vsock, console,
//! QMP socket, incoming migration); [`MicrovmBoot`] is the busybox boot of the `boot` suite on
//! top of it; [`Qmp`] is a small blocking client of QEMU's control protocol.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::util::shell_quote;

/// The machine: no ACPI (the kernel has none) and no automatic command line, since QEMU would
/// append its devices after our `--`, where the kernel hands them to init instead.
const MACHINE: &str = "microvm,acpi=off,rtc=off,isa-serial=on,auto-kernel-cmdline=off";
/// The start of the kernel command line of every guest: the serial console, reset through the
/// i8042 (which `-no-reboot` turns into QEMU exiting), no reboot delay on panic.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// QEMU 7.2's microvm has this many virtio-mmio transports, at `TRANSPORT_BASE + 512 * n`
/// with IRQ `TRANSPORT_IRQ_BASE + n`, and fills them from the top: the first device on the
/// command line takes the last transport, the next one the one below it.
const TRANSPORTS: u32 = 8;
const TRANSPORT_BASE: u64 = 0xfeb0_0000;
const TRANSPORT_SIZE: u64 = 512;
const TRANSPORT_IRQ_BASE: u32 = 5;

/// The `virtio_mmio.device=` entry for the `index`-th virtio device on QEMU's command line
/// (with `auto-kernel-cmdline=off` the kernel finds the devices only through these).
fn transport_entry(index: u32) -> String {
    let n = TRANSPORTS - 1 - index;
    format!(
        "virtio_mmio.device={TRANSPORT_SIZE}@{:#x}:{}",
        TRANSPORT_BASE + TRANSPORT_SIZE * u64::from(n),
        TRANSPORT_IRQ_BASE + n
    )
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// QEMU's stdout (piped by [`Microvm::command`]).
    Stdout,
    /// A file.
    File(PathBuf),
}

/// One QEMU microvm: 1 or more vCPUs, the project's kernel (and an initramfs), the root disk
/// as the first virtio-mmio device and optionally vsock as the second.
#[derive(Debug, Clone)]
pub struct Microvm {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    rootfs: PathBuf,
    cpus: u32,
    mem_mib: u32,
    cmdline_tail: String,
    vsock_cid: Option<u32>,
    console: Console,
    qmp: Option<PathBuf>,
    incoming: Option<PathBuf>,
}

impl Microvm {
    /// A machine booting `kernel` with `rootfs` as `/dev/vda`, read-only, its console on
    /// stdout.
    pub fn new(kernel: &Path, rootfs: &Path, cpus: u32, mem_mib: u32) -> Self {
        Self {
            kernel: kernel.to_owned(),
            initrd: None,
            rootfs: rootfs.to_owned(),
            cpus,
            mem_mib,
            cmdline_tail: String::new(),
            vsock_cid: None,
            console: Console::Stdout,
            qmp: None,
            incoming: None,
        }
    }

    /// Boots with this initramfs (the kernel runs its `/init`).
    pub fn initrd(mut self, initrd: &Path) -> Self {
        self.initrd = Some(initrd.to_owned());
        self
    }

    /// Appends `words` to the kernel command line, after the devices (e.g. `-- <init args>`).
    pub fn cmdline_tail(mut self, words: &str) -> Self {
        self.cmdline_tail = words.to_owned();
        self
    }

    /// Adds a virtio-mmio vsock device on the host's vhost-vsock (`/dev/vhost-vsock`), so the
    /// host reaches the guest at context ID `cid` over `AF_VSOCK`.
    pub fn vsock(mut self, cid: u32) -> Self {
        self.vsock_cid = Some(cid);
        self
    }

    /// Where the serial console goes (stdout by default).
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Serves QMP on the Unix socket `path`.
    pub fn qmp(mut self, path: &Path) -> Self {
        self.qmp = Some(path.to_owned());
        self
    }

    /// Starts from the migration stream in `file` (written by `migrate` to `exec:cat > file`)
    /// instead of booting, and runs once it is loaded. The rest of the command line must be
    /// the one the stream was taken with, bar the vsock CID, the console and the QMP socket.
    pub fn incoming(mut self, file: &Path) -> Self {
        self.incoming = Some(file.to_owned());
        self
    }

    /// The kernel command line: base, root disk, the devices' transports, then the tail.
    fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            BASE_CMDLINE.to_owned(),
            "root=/dev/vda ro".to_owned(),
            transport_entry(0),
        ];
        if self.vsock_cid.is_some() {
            words.push(transport_entry(1));
        }
        if !self.cmdline_tail.is_empty() {
            words.push(self.cmdline_tail.clone());
        }
        words.join(" ")
    }

    /// The QEMU command line: microvm with an i8042 (so `reboot=k` resets the machine and
    /// `-no-reboot` turns that into QEMU exiting), stdin closed, stdout and stderr piped.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", MACHINE])
            .args(["-enable-kvm", "-cpu", "host"])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &format!("{}M", self.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-device", "i8042"])
            .arg("-serial")
            .arg(match &self.console {
                Console::Stdout => "stdio".to_owned(),
                Console::File(path) => format!("file:{}", path.display()),
            })
            .arg("-kernel")
            .arg(&self.kernel);
        if let Some(initrd) = &self.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.arg("-append").arg(self.kernel_cmdline());
        cmd.arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,readonly=on",
                self.rootfs.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
        if let Some(cid) = self.vsock_cid {
            cmd.arg("-device")
                .arg(format!("vhost-vsock-device,guest-cid={cid}"));
        }
        if let Some(path) = &self.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", path.display()));
        }
        if let Some(file) = &self.incoming {
            cmd.arg("-incoming")
                .arg(format!("exec:cat {}", shell_quote(&file.to_string_lossy())));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

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
    /// The QEMU command line: the serial console on stdout, and the root filesystem
    /// read-only, as the benchmark's `hearth-vmm` configuration has it.
    pub fn command(&self) -> Result<Command> {
        if self.command.contains('"') {
            bail!("the guest command must not contain double quotes");
        }
        let marker = self
            .marker
            .map(|m| format!("hearth_boot_marker={m} "))
            .unwrap_or_default();
        Ok(
            Microvm::new(self.kernel, self.rootfs, self.cpus, self.mem_mib)
                .cmdline_tail(&format!("{marker}-- {}", self.command))
                .command(),
        )
    }
}

/// A QMP connection: QEMU's JSON control protocol on a Unix socket, one command at a time.
/// Every read has a timeout, so a stuck QEMU fails the caller instead of hanging it.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// How long one reply may take.
    const READ_TIMEOUT: Duration = Duration::from_secs(60);

    /// Takes over a fresh connection to QEMU's QMP socket: reads the greeting and leaves
    /// capabilities negotiation mode.
    pub fn new(stream: UnixStream) -> Result<Self> {
        stream.set_read_timeout(Some(Self::READ_TIMEOUT))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting expected, got {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("no answer on QMP")?;
        if n == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Runs `command` and returns its `return` value; events that arrive meanwhile are
    /// skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}").context("cannot write to QMP")?;
        loop {
            let mut reply = self.read()?;
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = reply.get("error") {
                bail!("QMP {command}: {error}");
            }
        }
    }

    /// The VM's run state from `query-status`: `inmigrate`, `running`, `paused`,
    /// `postmigrate`, ...
    pub fn status(&mut self) -> Result<String> {
        let status = self.execute("query-status", None)?;
        status["status"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("query-status without a status: {status}"))
    }

    /// Migrates the (stopped or running) VM into `file` through `exec:cat > file`, with no
    /// bandwidth cap, and waits until `query-migrate` reports it completed.
    pub fn migrate_to_file(&mut self, file: &Path, timeout: Duration) -> Result<()> {
        let uri = format!("exec:cat > {}", shell_quote(&file.to_string_lossy()));
        self.execute("migrate", Some(json!({ "uri": uri })))?;
        let start = Instant::now();
        loop {
            let state = self.execute("query-migrate", None)?;
            match state["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => bail!("migration to {}: {state}", file.display()),
                _ if start.elapsed() > timeout => {
                    bail!("migration not completed after {timeout:?}: {state}")
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Lifts QEMU's default migration bandwidth cap (32 MiB/s), which would otherwise set the
    /// time of a migration to a file.
    pub fn uncap_migration(&mut self) -> Result<()> {
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 100u64 << 30 })),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// The busybox boot of a 1-vCPU, 128 MiB machine on `/k` and `/r`.
    fn boot<'a>(command: &'a str, marker: Option<&'a str>) -> MicrovmBoot<'a> {
        MicrovmBoot {
            kernel: Path::new("/k"),
            rootfs: Path::new("/r"),
            cpus: 1,
            mem_mib: 128,
            command,
            marker,
        }
    }

    #[test]
    fn test_command_rejects_double_quotes() {
        let boot = boot("echo \"x\"", None);

        assert!(boot.command().is_err());
    }

    #[test]
    fn test_boot_command_line_has_root_device_then_init_command() {
        let boot = boot("sleep 2", Some("m"));

        let args = args(&boot.command().expect("command"));

        assert_eq!(
            after(&args, "-append"),
            ["console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda ro \
              virtio_mmio.device=512@0xfeb00e00:12 hearth_boot_marker=m -- sleep 2"]
        );
    }

    #[test]
    fn test_boot_root_drive_is_read_only() {
        let boot = boot("sleep 2", None);

        let args = args(&boot.command().expect("command"));

        assert_eq!(
            after(&args, "-drive"),
            ["id=root,file=/r,format=raw,if=none,readonly=on"]
        );
    }

    #[test]
    fn test_vsock_takes_the_transport_below_the_root_disk() {
        let vm = Microvm::new(Path::new("/k"), Path::new("/r"), 1, 512).vsock(42);

        let args = args(&vm.command());

        assert_eq!(
            after(&args, "-append"),
            ["console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda ro \
              virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11"]
        );
        assert_eq!(
            after(&args, "-device"),
            [
                "i8042",
                "virtio-blk-device,drive=root",
                "vhost-vsock-device,guest-cid=42"
            ]
        );
    }

    #[test]
    fn test_incoming_reads_the_file_through_cat() {
        let vm = Microvm::new(Path::new("/k"), Path::new("/r"), 1, 512)
            .incoming(Path::new("/s/mig ration"));

        let args = args(&vm.command());

        assert_eq!(after(&args, "-incoming"), ["exec:cat '/s/mig ration'"]);
    }
}
