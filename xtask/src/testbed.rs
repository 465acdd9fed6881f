//! `cargo xtask testbed -- <command>`: runs a command where real KVM exists.
//!
//! On a host with `kvm_intel` or `kvm_amd` the command runs directly. Anywhere else (PVM, or
//! no KVM at all) it runs inside L1: a VM under QEMU's software emulator (TCG) with an emulated
//! AMD-V CPU, booting Debian's `linux-image-cloud-amd64` (fetched with apt), where `kvm_amd`
//! gives real KVM. L1's root filesystem is the host's own `/`, shared read-write through
//! virtiofs, so every path (the workspace, the build outputs, the cache, the host's tools)
//! resolves the same inside L1 as outside; `/tmp`, `/run` and `/dev` are L1's own. The
//! command's output streams through L1's serial console and its exit status comes back
//! through a file in the run directory. See `docs/TESTBED.md`.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm::kvm_host::KvmKind;

use crate::util::{self, shell_quote};

/// Bump when the L1 recipe (initramfs, module list, init) changes.
const RECIPE_VERSION: &str = "3";
/// The Debian package that provides L1's kernel.
const CLOUD_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// L1's own scratch space (on its `/run` tmpfs), given to the command as `TMPDIR`. `/tmp`
/// stays the host's, so a workspace or cache under it resolves the same inside L1.
const L1_TMPDIR: &str = "/run/tmp";
/// The virtiofs tag of the shared host root.
const ROOT_TAG: &str = "hostroot";
/// Printed by L1 once it is ready to run the command; the host times L1's boot to it.
const UP_MARKER: &str = "hearth-testbed: L1 up";
/// Printed by L1 once the command has finished; the host stops echoing the console there.
const DONE_MARKER: &str = "hearth-testbed: done";
/// Modules loaded in the initramfs, with their dependencies: the shared root, and real KVM.
/// Everything else (tun, nftables, overlay, bridge, ...) loads on first use.
const EARLY_MODULES: &[&str] = &["virtio_pci", "virtiofs", "kvm_amd"];
/// How often L1's second stage rewrites its heartbeat file.
const HEARTBEAT_SECS: u64 = 10;
/// With no new heartbeat for this long, L1 has frozen: its scheduler no longer runs, which
/// QEMU's emulation of nested SVM causes now and then (docs/TESTBED.md). On a live L1 the
/// heartbeat is a few seconds late at worst, however busy the command keeps it.
const FROZEN_AFTER: Duration = Duration::from_secs(180);

/// Arguments of the testbed task.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// L1's memory in MiB.
    #[arg(long, env = "HEARTH_TESTBED_MEM_MIB", default_value_t = 4096)]
    pub mem_mib: u32,
    /// L1's vCPUs. One by default: with two, QEMU's multi-threaded TCG emulation of nested
    /// SVM intermittently corrupted L1 or its guests under heavy guest I/O (docs/TESTBED.md).
    #[arg(long, env = "HEARTH_TESTBED_CPUS", default_value_t = 1)]
    pub cpus: u32,
    /// Stop L1 after this many seconds and fail.
    #[arg(long, env = "HEARTH_TESTBED_TIMEOUT_SECS", default_value_t = 3600)]
    pub timeout_secs: u64,
    /// The command to run, and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

impl Args {
    /// The settings from the command line's defaults and `HEARTH_TESTBED_*`, for `command`.
    pub fn for_command(command: Vec<String>) -> Result<Self> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: Args,
        }
        let argv = ["testbed".to_owned(), "--".to_owned()]
            .into_iter()
            .chain(command);
        Ok(<Wrapper as clap::Parser>::try_parse_from(argv)?.args)
    }
}

/// Runs this xtask binary's hidden `subcommand` with `paths` where real KVM exists; fails
/// unless it exits 0. The KVM halves of the demo and the benchmarks go through here.
pub fn run_xtask(subcommand: &str, paths: &[&Path]) -> Result<()> {
    let exe = std::env::current_exe().context("path of the xtask binary")?;
    let mut command = vec![exe.to_string_lossy().into_owned(), subcommand.to_owned()];
    command.extend(paths.iter().map(|p| p.to_string_lossy().into_owned()));
    let code = run(&Args::for_command(command)?)?;
    if code != 0 {
        bail!("`xtask {subcommand}` failed inside the test bed (exit status {code})");
    }
    Ok(())
}

/// Runs the command where real KVM exists and returns its exit code.
pub fn run(args: &Args) -> Result<i32> {
    let kind = KvmKind::detect();
    if kind.is_hardware() {
        eprintln!("testbed: host KVM is {kind:?}, running the command directly");
        return run_direct(&args.command);
    }
    eprintln!("testbed: host KVM is {kind:?}, running the command in L1 (QEMU TCG + AMD-V)");
    let assets = l1_assets()?;
    let run_dir = RunDir::create()?;
    let l1 = L1 {
        args,
        assets: &assets,
        run_dir: &run_dir,
    };
    l1.run()
}

fn run_direct(command: &[String]) -> Result<i32> {
    let (program, rest) = command.split_first().context("no command given")?;
    let status = Command::new(program)
        .args(rest)
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    Ok(status.code().unwrap_or(128))
}

/// The cached pieces L1 boots from.
#[derive(Debug)]
struct L1Assets {
    kernel: PathBuf,
    initramfs: PathBuf,
    /// The module loader L1's kernel calls (see [`modprobe_script`]).
    modprobe: PathBuf,
}

/// Fetches the cloud kernel with apt and builds L1's initramfs, cached by package version.
fn l1_assets() -> Result<L1Assets> {
    let image_package = cloud_image_package()?;
    let version = util::output(Command::new("apt-cache").args([
        "show",
        "--no-all-versions",
        &image_package,
    ]))?
    .lines()
    .find_map(|l| l.strip_prefix("Version: "))
    .map(str::to_owned)
    .with_context(|| format!("apt knows no version of {image_package}"))?;
    let init = init_script();
    let key = util::content_hash(&[
        ("recipe", RECIPE_VERSION.as_bytes()),
        ("package", image_package.as_bytes()),
        ("version", version.as_bytes()),
        ("init", init.as_bytes()),
        ("early", EARLY_MODULES.join(",").as_bytes()),
    ]);
    let dir = util::cache_dir().join("testbed").join(&key[..16]);
    let assets = L1Assets {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio.gz"),
        modprobe: dir.join("modprobe.sh"),
    };
    if assets.initramfs.exists() {
        return Ok(assets);
    }
    eprintln!("testbed: preparing L1 from {image_package} {version}");
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("remove {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    build_l1_assets(&tmp, &image_package, &init)?;
    let modprobe = tmp.join("modprobe.sh");
    fs::write(&modprobe, modprobe_script(&dir.join("root")))?;
    fs::set_permissions(&modprobe, fs::Permissions::from_mode(0o755))?;
    util::publish_dir(&tmp, &dir)?;
    Ok(assets)
}

/// The versioned image package that `linux-image-cloud-amd64` depends on.
fn cloud_image_package() -> Result<String> {
    let depends = util::output(Command::new("apt-cache").args(["depends", CLOUD_KERNEL_PACKAGE]))
        .context("apt-cache cannot resolve the L1 kernel; run `apt-get update`")?;
    parse_image_dependency(&depends)
        .with_context(|| format!("{CLOUD_KERNEL_PACKAGE} depends on no linux-image package"))
}

fn parse_image_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_owned)
}

fn build_l1_assets(dir: &Path, image_package: &str, init: &str) -> Result<()> {
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    util::run(
        Command::new("apt-get")
            .args([
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                image_package,
            ])
            .current_dir(&debs),
    )?;
    let root = dir.join("root");
    for deb in fs::read_dir(&debs)? {
        let deb = deb?.path();
        util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    fs::remove_dir_all(&debs)?;
    let release = single_entry(&root.join("lib/modules"))?;
    util::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copy {}", vmlinuz.display()))?;

    let modules_dir = root.join("lib/modules").join(&release);
    let deps = fs::read_to_string(modules_dir.join("modules.dep"))?;
    let order = load_order(&deps, EARLY_MODULES)?;
    let staging = dir.join("initramfs");
    for sub in ["bin", "mods", "proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(staging.join(sub))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox"))
        .context("copy /bin/busybox (package busybox-static)")?;
    let mut order_file = String::new();
    for module in &order {
        let name = file_name(module);
        fs::copy(modules_dir.join(module), staging.join("mods").join(&name))?;
        writeln!(order_file, "{name}")?;
    }
    fs::write(staging.join("mods/order"), order_file)?;
    let init_path = staging.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;
    util::run(
        Command::new("sh")
            .arg("-c")
            .arg("find . | cpio -o -H newc --quiet | gzip -1 > ../initramfs.cpio.gz")
            .current_dir(&staging),
    )?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

fn single_entry(dir: &Path) -> Result<String> {
    let mut names = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    if names.len() != 1 {
        bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        );
    }
    Ok(names.remove(0))
}

fn file_name(module_path: &str) -> String {
    module_path
        .rsplit('/')
        .next()
        .unwrap_or(module_path)
        .to_owned()
}

/// The order in which to load `wanted` and their dependencies, from `modules.dep` text.
/// Names match with `-` and `_` alike, as modprobe does.
fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut deps = std::collections::HashMap::new();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module.to_owned(),
            rest.split_whitespace().collect::<Vec<_>>(),
        );
    }
    let by_name = |name: &str| {
        let want = name.replace('-', "_");
        deps.keys()
            .find(|path| {
                file_name(path)
                    .trim_end_matches(".ko")
                    .replace('-', "_")
                    .eq(&want)
            })
            .cloned()
    };
    let mut order = Vec::new();
    for name in wanted {
        let path = by_name(name).with_context(|| format!("no module {name} in modules.dep"))?;
        // modules.dep lists a module's dependencies so that loading them in reverse order works.
        let chain = deps.get(&path).map(Vec::as_slice).unwrap_or_default();
        for dep in chain.iter().rev() {
            if !order.iter().any(|m: &String| m == dep) {
                order.push((*dep).to_owned());
            }
        }
        if !order.contains(&path) {
            order.push(path);
        }
    }
    Ok(order)
}

/// L1's first stage, run by busybox from the initramfs: load the modules for virtiofs and
/// KVM, mount the host root and everything a Linux system needs on it, point the kernel's
/// module loader at the cloud kernel's modules, and switch to the second stage named on the
/// kernel command line. Done here because every exec from the shared root costs a lot
/// under TCG, while busybox in the initramfs is cheap.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin
bb=/bin/busybox
n=/newroot
$bb mount -t proc proc /proc
$bb mount -t devtmpfs dev /dev
for m in $($bb cat /mods/order); do
    $bb insmod /mods/$m || echo "testbed init: insmod $m failed"
done
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
    hearth.stage2=*) stage2="${{arg#*=}}" ;;
    hearth.modprobe=*) modprobe="${{arg#*=}}" ;;
    esac
done
if ! $bb mount -t virtiofs {ROOT_TAG} $n; then
    echo "testbed init: cannot mount the host root"
    $bb poweroff -f
fi
$bb mount --move /proc $n/proc
$bb mount --move /dev $n/dev
$bb mount -t sysfs sysfs $n/sys
# KVM starts a huge page recovery thread for every VM unless the iTLB multihit mitigation is
# off for good; on a CPU the bug does not affect the thread has nothing to do, and starting it
# was 9-16 ms of each KVM_CREATE_VM here (docs/TESTBED.md).
nx=$n/sys/module/kvm/parameters/nx_huge_pages
if [ "$($bb cat $n/sys/devices/system/cpu/vulnerabilities/itlb_multihit)" = "Not affected" ]; then
    echo never > $nx || echo "testbed init: cannot set kvm.nx_huge_pages=never"
fi
$bb mount -t cgroup2 cgroup2 $n/sys/fs/cgroup
$bb mkdir -p $n/dev/pts $n/dev/shm $n/dev/net
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $n/dev/pts
for d in /dev/shm /run; do $bb mount -t tmpfs tmpfs $n$d; done
$bb mkdir -p $n{L1_TMPDIR}
[ -c $n/dev/net/tun ] || $bb mknod $n/dev/net/tun c 10 200
echo "$modprobe" > $n/proc/sys/kernel/modprobe
$bb hostname hearth-testbed
$bb ip link set lo up
exec $bb switch_root $n /bin/bash "$stage2"
"#
    )
}

/// The kernel's module loader in L1 (`/proc/sys/kernel/modprobe`): modprobe over the cloud
/// kernel's modules, so tun, nftables and the rest load on first use.
fn modprobe_script(modules_root: &Path) -> String {
    let root = shell_quote(&modules_root.to_string_lossy());
    format!("#!/bin/sh\nexec /sbin/modprobe -d {root} \"$@\"\n")
}

/// A directory for one L1 run: the second stage, the virtiofsd socket and the exit status.
#[derive(Debug)]
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = util::cache_dir()
            .join("testbed/runs")
            .join(format!("{}-{stamp}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }

    fn stage2(&self) -> PathBuf {
        self.0.join("stage2.sh")
    }

    fn status(&self) -> PathBuf {
        self.0.join("status")
    }

    fn socket(&self) -> PathBuf {
        self.0.join("virtiofs.sock")
    }

    /// QEMU's human monitor, read when L1 froze.
    fn monitor(&self) -> PathBuf {
        self.0.join("monitor.sock")
    }

    /// Rewritten by L1 every [`HEARTBEAT_SECS`] while it runs.
    fn heartbeat(&self) -> PathBuf {
        self.0.join("heartbeat")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// L1's second stage, run by bash on the host's root: start the heartbeat, run the command in
/// the caller's directory and environment, record its status for the host, and power off.
fn stage2_script(command: &[String], status: &Path, heartbeat: &Path) -> Result<String> {
    let cwd = std::env::current_dir()?;
    let mut env = String::new();
    for (key, value) in std::env::vars() {
        let valid = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if valid {
            writeln!(env, "export {key}={}", shell_quote(&value))?;
        }
    }
    let command = command
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let status = shell_quote(&status.to_string_lossy());
    let cwd = shell_quote(&cwd.to_string_lossy());
    let heartbeat = shell_quote(&heartbeat.to_string_lossy());
    // The heartbeat is all bash builtins (a fork, never an exec): `read -t` on a FIFO that
    // nobody writes is its sleep.
    Ok(format!(
        r#"set -u
{env}export HEARTH_TESTBED=1 TMPDIR={L1_TMPDIR}
/bin/busybox mkfifo /run/heartbeat.fifo
exec 9<>/run/heartbeat.fifo
( while :; do printf '%s\n' "$SECONDS" > {heartbeat}; read -t {HEARTBEAT_SECS} -u 9 tick; done ) &
echo "{UP_MARKER}"
cd {cwd} && {command} 9<&-
echo $? > {status}
echo "{DONE_MARKER}"
exec /bin/busybox poweroff -f
"#
    ))
}

/// One boot of L1 for one command.
struct L1<'a> {
    args: &'a Args,
    assets: &'a L1Assets,
    run_dir: &'a RunDir,
}

impl L1<'_> {
    fn run(&self) -> Result<i32> {
        let script = stage2_script(
            &self.args.command,
            &self.run_dir.status(),
            &self.run_dir.heartbeat(),
        )?;
        fs::write(self.run_dir.stage2(), script)?;
        let mut virtiofsd = self.start_virtiofsd()?;
        let result = self.boot_and_stream();
        let _ = virtiofsd.kill();
        let _ = virtiofsd.wait();
        result?;
        let status = fs::read_to_string(self.run_dir.status())
            .context("L1 stopped without reporting the command's exit status")?;
        status
            .trim()
            .parse()
            .with_context(|| format!("bad exit status {status:?} from L1"))
    }

    fn start_virtiofsd(&self) -> Result<Child> {
        let socket = self.run_dir.socket();
        // cache=always: L1 keeps file pages across opens, so an exec does not read its binary
        // through FUSE again (docs/TESTBED.md, Caching). Nothing on the host writes while L1 runs.
        let child = Command::new("/usr/lib/qemu/virtiofsd")
            .arg(format!("--socket-path={}", socket.display()))
            .args([
                "-o",
                "source=/",
                "-o",
                "cache=always",
                "-o",
                "sandbox=chroot",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start /usr/lib/qemu/virtiofsd (package qemu-system-common)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("virtiofsd did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(child)
    }

    fn qemu_command(&self) -> Command {
        let mem = format!("{}M", self.args.mem_mib);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "EPYC,+svm,+npt",
            "-M",
            "q35",
        ])
        .args(["-m", &mem, "-smp", &self.args.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            self.run_dir.monitor().display()
        ))
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vfs,path={}",
            self.run_dir.socket().display()
        ))
        .arg("-device")
        .arg(format!(
            "vhost-user-fs-pci,queue-size=1024,chardev=vfs,tag={ROOT_TAG}"
        ))
        .arg("-kernel")
        .arg(&self.assets.kernel)
        .arg("-initrd")
        .arg(&self.assets.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 hearth.stage2={} hearth.modprobe={}",
            self.run_dir.stage2().display(),
            self.assets.modprobe.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    /// Boots L1, hides its boot chatter until the up marker (showing it only if L1 never
    /// comes up), then streams the command's output.
    fn boot_and_stream(&self) -> Result<()> {
        let start = Instant::now();
        let mut qemu = self
            .qemu_command()
            .spawn()
            .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
        let stderr = qemu.stderr.take().context("qemu stderr")?;
        let stderr_thread = std::thread::spawn(move || forward_qemu_stderr(stderr));
        let stdout = qemu.stdout.take().context("qemu stdout")?;
        let watchdog = Watchdog {
            pid: qemu.id(),
            start,
            timeout: Duration::from_secs(self.args.timeout_secs),
            heartbeat: self.run_dir.heartbeat(),
            monitor: self.run_dir.monitor(),
            frozen_after: FROZEN_AFTER,
            poll: Duration::from_secs(HEARTBEAT_SECS / 2),
        };
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || watchdog.watch(&finished));
        let up = stream_console(stdout, start);
        let status = qemu.wait()?;
        drop(done);
        let stopped = watchdog.join().unwrap_or(None);
        let _ = stderr_thread.join();
        eprintln!("testbed: L1 ran for {:.1} s", start.elapsed().as_secs_f64());
        match stopped {
            Some(Stop::Froze) => return Err(L1Froze.into()),
            Some(Stop::Timeout) => bail!("L1 still running after {} s", self.args.timeout_secs),
            None => {}
        }
        if !up {
            bail!("L1 did not come up (qemu {status})");
        }
        Ok(())
    }
}

/// The error of a run whose L1 froze (see [`FROZEN_AFTER`]): the emulator's failure, not the
/// command's, so a caller may run the command again in a fresh L1.
#[derive(Debug, thiserror::Error)]
#[error(
    "L1 froze: no heartbeat for {} s (QEMU's nested SVM emulation; docs/TESTBED.md)",
    FROZEN_AFTER.as_secs()
)]
pub struct L1Froze;

/// Why the watchdog stopped L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Froze,
}

/// Stops L1's QEMU when the run's time is up or L1's heartbeat stops.
struct Watchdog {
    pid: u32,
    start: Instant,
    timeout: Duration,
    heartbeat: PathBuf,
    /// QEMU's monitor socket: where L1's CPU is when it froze.
    monitor: PathBuf,
    /// With no new heartbeat for this long, L1 has frozen.
    frozen_after: Duration,
    /// How often the heartbeat is read.
    poll: Duration,
}

impl Watchdog {
    /// What QEMU's monitor says of L1's CPU (registers, the code at RIP), or why it cannot.
    fn cpu_state(&self) -> String {
        use std::io::Write;
        let ask = || -> std::io::Result<String> {
            let mut sock = std::os::unix::net::UnixStream::connect(&self.monitor)?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            sock.write_all(b"info registers\nx/8i $pc\ninfo status\n")?;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match sock.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if out.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        };
        ask().unwrap_or_else(|e| format!("(the monitor did not answer: {e})"))
    }

    /// Watches until `finished` is closed (QEMU exited) or L1 must be stopped, and says why
    /// it stopped L1.
    fn watch(self, finished: &std::sync::mpsc::Receiver<()>) -> Option<Stop> {
        let mut last_beat = None;
        let mut last_progress = Instant::now();
        loop {
            match finished.recv_timeout(self.poll) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return None,
            }
            let beat = fs::read(&self.heartbeat).ok();
            if beat.is_some() && beat != last_beat {
                last_beat = beat;
                last_progress = Instant::now();
            }
            let stop = if self.start.elapsed() > self.timeout {
                eprintln!(
                    "testbed: L1 still running after {:?}, stopping it",
                    self.timeout
                );
                Stop::Timeout
            } else if last_progress.elapsed() > self.frozen_after {
                eprintln!(
                    "testbed: L1 froze (no heartbeat for {:?}), stopping it",
                    self.frozen_after
                );
                eprintln!("testbed: L1's CPU as it froze:\n{}", self.cpu_state());
                Stop::Froze
            } else {
                continue;
            };
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
            return Some(stop);
        }
    }
}

/// Copies L1's console to stdout from the up marker on; returns whether it came up.
fn stream_console(stdout: impl Read, start: Instant) -> bool {
    let mut reader = BufReader::new(stdout);
    let mut boot_log = Vec::new();
    let mut up = false;
    let mut done = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
            line.push(b'\n');
        }
        let text = String::from_utf8_lossy(&line);
        if up && text.contains(DONE_MARKER) {
            done = true;
        }
        if up && !done {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line);
            let _ = out.flush();
        } else if text.contains(UP_MARKER) {
            up = true;
            eprintln!(
                "testbed: L1 up in {:.2} s (QEMU start to userspace ready, TCG)",
                start.elapsed().as_secs_f64()
            );
        } else {
            boot_log.extend_from_slice(&line);
        }
    }
    if !up {
        eprintln!(
            "testbed: L1 console before it stopped:\n{}",
            String::from_utf8_lossy(&boot_log)
        );
    }
    up
}

fn forward_qemu_stderr(stderr: impl Read) {
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if !line.contains("TCG doesn't support requested feature") {
            eprintln!("qemu: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES_DEP: &str = "\
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
";

    fn position(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|m| m.ends_with(name))
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn test_load_order_dependencies_come_first() {
        let order = load_order(MODULES_DEP, &["virtio_pci", "virtiofs"]).expect("order");

        assert!(position(&order, "/virtio_ring.ko") < position(&order, "/virtio.ko"));
        assert!(position(&order, "/virtio.ko") < position(&order, "/virtio_pci.ko"));
        assert!(position(&order, "/fuse.ko") < position(&order, "/virtiofs.ko"));
        assert_eq!(order.len(), 7);
    }

    #[test]
    fn test_load_order_dash_and_underscore_match() {
        let order = load_order(MODULES_DEP, &["kvm_amd"]).expect("order");

        assert_eq!(
            order.last().map(String::as_str),
            Some("kernel/arch/x86/kvm/kvm-amd.ko")
        );
    }

    #[test]
    fn test_load_order_unknown_module_fails() {
        let result = load_order(MODULES_DEP, &["no_such_module"]);

        assert!(result.is_err());
    }

    #[test]
    fn test_parse_image_dependency_finds_versioned_image() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";

        let package = parse_image_dependency(text);

        assert_eq!(package.as_deref(), Some("linux-image-6.1.0-57-cloud-amd64"));
    }

    fn watchdog(child: &Child, heartbeat: PathBuf) -> Watchdog {
        Watchdog {
            pid: child.id(),
            start: Instant::now(),
            timeout: Duration::from_secs(60),
            heartbeat,
            monitor: PathBuf::from("/nonexistent/monitor.sock"),
            frozen_after: Duration::from_millis(300),
            poll: Duration::from_millis(20),
        }
    }

    #[test]
    fn test_watchdog_without_heartbeat_stops_l1_as_frozen() {
        let mut child = Command::new("sleep").arg("60").spawn().expect("sleep");
        let (_done, finished) = std::sync::mpsc::channel::<()>();

        let stop = watchdog(&child, PathBuf::from("/nonexistent/heartbeat")).watch(&finished);

        assert_eq!(stop, Some(Stop::Froze));
        assert!(!child.wait().expect("wait").success());
    }

    #[test]
    fn test_watchdog_with_heartbeat_waits_for_the_end() {
        let dir = std::env::temp_dir().join(format!("hearth-watchdog-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let heartbeat = dir.join("heartbeat");
        let mut child = Command::new("sleep").arg("60").spawn().expect("sleep");
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let beats = {
            let heartbeat = heartbeat.clone();
            std::thread::spawn(move || {
                for beat in 0..40 {
                    fs::write(&heartbeat, beat.to_string()).expect("beat");
                    std::thread::sleep(Duration::from_millis(25));
                }
                drop(done);
            })
        };

        let stop = watchdog(&child, heartbeat).watch(&finished);

        beats.join().expect("beats");
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(stop, None);
    }

    #[test]
    fn test_stage2_script_runs_command_and_records_status() {
        let command = vec!["echo".to_owned(), "a b".to_owned()];

        let script = stage2_script(&command, Path::new("/run/x/status"), Path::new("/run/x/hb"))
            .expect("script");

        assert!(script.contains("'echo' 'a b' 9<&-"));
        assert!(script.contains("echo $? > '/run/x/status'"));
        assert!(script.contains("> '/run/x/hb'"));
    }
}
