//! The `snapshot` suite: `hearth-vmm`'s snapshots against QEMU `-M microvm`'s migration to and
//! from a file. Every VM has 1 vCPU and boots the project's kernel with the agent's initramfs
//! over the Debian test image (read-only root); Hearth reaches the agent through its vsock Unix
//! socket, QEMU through vhost-vsock (`AF_VSOCK`). Figures (method in `docs/BENCHMARKS.md`):
//! - `restore_to_running_ms`: from spawning the restoring VMM process until its vCPUs run
//!   (Hearth: the `restore` request answered; QEMU `-incoming`: loaded, `cont`, and
//!   `query-status` says running);
//! - `restore_to_agent_ms`: from the same spawn until the guest's agent answers its handshake;
//! - `clone_memory_ratio`: the summed PSS of `CLONES` VMMs restored at once from one 512 MiB
//!   image, each agent having run one `true`, over the PSS of one clone alone;
//! - `suspend_2g_ms`: a 2 GiB VM with 50 MiB freshly dirtied, from the request until its state
//!   is in files and the VM stopped (Hearth: a diff snapshot with `stop`, of a VM restored from
//!   a full one; QEMU: `stop` and `migrate` to `exec:cat > file` until completed).
//!
//! Everything lives in a scratch directory under `$TMPDIR` and each process is killed when
//! its handle drops, so an error anywhere leaves nothing behind.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_proto::AgentClient;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{median, print_figure};
use crate::qemu::{Console, Microvm, Qmp, BASE_CMDLINE};

/// Guest memory of the image the restore and clone figures start from.
const BASE_MIB: u32 = 512;
/// Guest memory of the suspended VM.
const SUSPEND_MIB: u32 = 2048;
/// Restores per VMM. Medians of 5 moved by 10-25 ms between runs of the same code; two full
/// runs with 9 (one full, one restore-only) gave 172 and 182 ms to the agent.
const RESTORE_RUNS: usize = 9;
const SUSPEND_RUNS: usize = 3;
const CLONES: usize = 10;
/// Dirties 50 MiB of guest memory: `/dev/shm` is a tmpfs (the agent mounts it).
const DIRTY_SCRIPT: &str = "head -c 50M /dev/urandom > /dev/shm/dirty";
/// QEMU VMs get context IDs from here up, a new one each (but see [`Suite::qemu_restore`]).
const FIRST_CID: u32 = 100;
/// How often QEMU's state is polled: each poll costs its main loop a QMP round trip.
const QMP_POLL: Duration = Duration::from_millis(10);

/// The test bed emulates its CPU, so everything is slow there; these only catch hangs.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(240);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one handshake attempt may take before the bench retries. An answered handshake
/// takes well under 0.2 s after a restore; but in one run (2026-12-03) QEMU's guest left the
/// first connection after every restore unanswered, and with the client's default of 5 s per
/// attempt each of those restores paid 5 s for it: a figure of the client, not of QEMU.
const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(1);

/// The part that needs KVM: measure everything and print the figures.
pub fn snapshot_in_kvm(vmm: &Path, kernel: &Path, initrd: &Path, rootfs: &Path) -> Result<()> {
    ensure_vhost_vsock()?;
    let scratch = Scratch::create()?;
    let suite = Suite {
        vmm,
        kernel,
        initrd,
        rootfs,
        dir: scratch.0.clone(),
        next_id: Cell::new(0),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(suite.run())
}

/// QEMU's vsock device needs the host's vhost-vsock; in the test bed's L1 it is a module,
/// loaded through the kernel's module loader (which L1 points at its own modules).
fn ensure_vhost_vsock() -> Result<()> {
    let device = Path::new("/dev/vhost-vsock");
    if !device.exists() {
        let modprobe = std::fs::read_to_string("/proc/sys/kernel/modprobe")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "modprobe".to_owned());
        let status = Command::new(&modprobe).arg("vhost_vsock").status();
        eprintln!("bench: {modprobe} vhost_vsock: {status:?}");
    }
    if !device.exists() {
        bail!("QEMU's vsock needs /dev/vhost-vsock and `modprobe vhost_vsock` did not provide it");
    }
    Ok(())
}

/// The suite's scratch directory, removed with everything in it when dropped.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("hearth-bench-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VMM process with a directory of its own (sockets, console, log); killed and its
/// directory removed when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    dir: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stderr in `dir/log`; `dir` must exist.
    fn spawn(name: String, dir: PathBuf, mut cmd: Command) -> Result<Self> {
        let log = File::create(dir.join("log"))?;
        // Same clean environment for both VMMs: cargo's LD_LIBRARY_PATH would send QEMU's
        // dynamic loader through the toolchain's directories first.
        let child = cmd
            .env_remove("LD_LIBRARY_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("{name}: cannot start {cmd:?}"))?;
        Ok(Self { name, child, dir })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the console and of the VMM's log, for error messages.
    fn tails(&self) -> String {
        let tail = |file: &str| {
            let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "{}: console:\n{}\n{} log:\n{}",
            self.name,
            tail("console"),
            self.name,
            tail("log")
        )
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}\n{}", self.name, self.tails());
        }
        Ok(())
    }

    /// Connects to the Unix socket the process listens on at `path`, once it does.
    fn connect(&mut self, path: &Path, timeout: Duration) -> Result<UnixStream> {
        let start = Instant::now();
        loop {
            // The socket file exists from bind(), a moment before listen().
            if let Ok(stream) = UnixStream::connect(path) {
                return Ok(stream);
            }
            self.check_alive()?;
            if start.elapsed() > timeout {
                bail!(
                    "{}: nothing listens on {} after {timeout:?}",
                    self.name,
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the process to exit 0.
    fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}\n{}", self.name, self.tails());
                }
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // A process stuck in the kernel dies only once it leaves it: wait a while, not forever.
        let start = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if start.elapsed() > KILL_TIMEOUT {
                eprintln!(
                    "bench: {} still alive {KILL_TIMEOUT:?} after SIGKILL",
                    self.name
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `hearth-vmm` serving its control socket.
#[derive(Debug)]
struct HearthVm(Proc);

impl HearthVm {
    fn api(&self) -> PathBuf {
        self.0.dir.join("api")
    }

    fn vsock(&self) -> PathBuf {
        self.0.dir.join("vsock")
    }

    fn console(&self) -> PathBuf {
        self.0.dir.join("console")
    }

    fn agent(&self) -> AgentClient {
        AgentClient::new(self.vsock())
    }

    /// One control socket request; its `result`. `vmm::rpc::call` blocks without a bound, so
    /// it runs on a thread of its own: on a timeout the caller drops the VM, which kills the
    /// process and so ends the call.
    fn call(&self, request: Value, timeout: Duration) -> Result<Value> {
        let (tx, rx) = mpsc::channel();
        let api = self.api();
        let sent = request.clone();
        std::thread::spawn(move || {
            let _ = tx.send(vmm::rpc::call(&api, &sent));
        });
        let action = request["action"].as_str().unwrap_or("?");
        match rx.recv_timeout(timeout) {
            Ok(result) => {
                result.with_context(|| format!("{}: {request}\n{}", self.0.name, self.0.tails()))
            }
            Err(_) => bail!("{}: no answer to {action} within {timeout:?}", self.0.name),
        }
    }
}

/// QEMU with its QMP connection and vsock CID.
#[derive(Debug)]
struct QemuVm {
    proc: Proc,
    qmp: Qmp,
    cid: u32,
}

impl QemuVm {
    fn agent(&self) -> AgentClient {
        AgentClient::vsock(self.cid)
    }

    /// Polls `query-status` until the incoming migration is loaded, then resumes the VM:
    /// the stream was taken from a stopped VM, so QEMU leaves it paused (as libvirt's
    /// restore does, which then sends `cont` too). Returns once the VM runs.
    fn run_when_loaded(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let status = self.qmp.status().with_context(|| self.proc.tails())?;
            match status.as_str() {
                "running" => return Ok(()),
                "inmigrate" => {}
                "paused" => {
                    self.qmp.execute("cont", None)?;
                    continue;
                }
                _ => bail!(
                    "{}: the VM is {status}\n{}",
                    self.proc.name,
                    self.proc.tails()
                ),
            }
            self.proc.check_alive()?;
            if start.elapsed() > timeout {
                bail!("{}: still {status} after {timeout:?}", self.proc.name);
            }
            std::thread::sleep(QMP_POLL);
        }
    }

    /// Stops the VM and migrates it into `file`.
    fn save(&mut self, file: &Path) -> Result<()> {
        self.qmp.execute("stop", None)?;
        self.qmp
            .migrate_to_file(file, MIGRATE_TIMEOUT)
            .with_context(|| self.proc.tails())
    }

    /// Ends QEMU through QMP and waits for it to exit 0.
    fn quit(&mut self) -> Result<()> {
        // QEMU may close the socket before its answer arrives; the exit status tells.
        let _ = self.qmp.execute("quit", None);
        self.proc.wait_exit(EXIT_TIMEOUT)
    }
}

/// The figures of one restore.
#[derive(Debug, Clone, Copy)]
struct Restore {
    running_ms: f64,
    agent_ms: f64,
}

/// Whether the part `name` (`restore`, `clones`, `suspend`) of the suite runs: all of them
/// unless `HEARTH_BENCH_PARTS` lists some, comma-separated (a developer's shortcut).
fn part_wanted(name: &str) -> bool {
    std::env::var("HEARTH_BENCH_PARTS").map_or(true, |parts| parts.split(',').any(|p| p == name))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `Pss:` of `/proc/<pid>/smaps_rollup` text, in KiB.
fn pss_kib(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The summed PSS of `pids`, in MiB.
fn total_pss_mib(pids: impl Iterator<Item = u32>) -> Result<f64> {
    let mut kib = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        kib += pss_kib(&text).with_context(|| format!("no Pss in {path}"))?;
    }
    Ok(kib as f64 / 1024.0)
}

fn booted(proc: &Proc, mem_mib: u32, start: Instant) {
    eprintln!(
        "bench: {}: {mem_mib} MiB VM booted, its agent ran `true` {:.1} s after the spawn",
        proc.name,
        start.elapsed().as_secs_f64()
    );
}

/// Waits for the agent's handshake.
async fn wait_agent(agent: &AgentClient, timeout: Duration, proc: &Proc) -> Result<()> {
    agent
        .wait_ready_with(timeout, HANDSHAKE_ATTEMPT)
        .await
        .with_context(|| format!("the agent never answered\n{}", proc.tails()))?;
    Ok(())
}

/// Runs `argv` in the guest; fails unless it exits 0.
async fn exec(agent: &AgentClient, argv: &[&str], proc: &Proc) -> Result<()> {
    let out = tokio::time::timeout(EXEC_TIMEOUT, agent.run(argv))
        .await
        .with_context(|| format!("{argv:?} took over {EXEC_TIMEOUT:?}\n{}", proc.tails()))??;
    if !out.status.success() {
        bail!(
            "{argv:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The suite's inputs and the counter that names its VMs.
#[derive(Debug)]
struct Suite<'a> {
    vmm: &'a Path,
    kernel: &'a Path,
    initrd: &'a Path,
    rootfs: &'a Path,
    dir: PathBuf,
    next_id: Cell<u32>,
}

impl Suite<'_> {
    async fn run(&self) -> Result<()> {
        let hearth_image = self.dir.join("hearth-image");
        let qemu_image = self.dir.join("qemu-image");
        eprintln!("bench: booting the {BASE_MIB} MiB images");
        self.hearth_image(BASE_MIB, &hearth_image)
            .await
            .context("hearth: making the image")?;
        let image_cid = self
            .qemu_image(BASE_MIB, &qemu_image)
            .await
            .context("qemu: making the image")?;
        self.hearth_record_working_set(&hearth_image)
            .await
            .context("hearth: recording the working set")?;
        if part_wanted("restore") {
            self.restore_figures(&hearth_image, &qemu_image, image_cid)
                .await?;
        }
        if part_wanted("clones") {
            let hearth_ratio = self
                .hearth_clone_ratio(&hearth_image)
                .await
                .context("hearth: clones")?;
            let qemu_ratio = self
                .qemu_clone_ratio(&qemu_image)
                .await
                .context("qemu: clones")?;
            print_figure("clone_memory_ratio", hearth_ratio, Some(qemu_ratio), "x");
        }
        let _ = std::fs::remove_dir_all(&hearth_image);
        let _ = std::fs::remove_file(&qemu_image);
        if part_wanted("suspend") {
            self.suspend_figures().await?;
        }
        Ok(())
    }

    async fn restore_figures(
        &self,
        hearth_image: &Path,
        qemu_image: &Path,
        image_cid: u32,
    ) -> Result<()> {
        let mut hearth = Vec::new();
        let mut hearth_prefetch = Vec::new();
        let mut qemu = Vec::new();
        for run in 0..RESTORE_RUNS {
            let h = self.hearth_restore_run(hearth_image, false).await;
            let h = h.with_context(|| format!("hearth: restore run {run}"))?;
            let p = self.hearth_restore_run(hearth_image, true).await;
            let p = p.with_context(|| format!("hearth: restore run {run} with prefetch"))?;
            let q = self.qemu_restore_run(qemu_image, image_cid).await;
            let q = q.with_context(|| format!("qemu: restore run {run}"))?;
            eprintln!(
                "bench: restore run {run}: hearth running {:.1} ms, agent {:.1} ms \
                 (with prefetch {:.1} ms, {:.1} ms); qemu running {:.1} ms, agent {:.1} ms",
                h.running_ms, h.agent_ms, p.running_ms, p.agent_ms, q.running_ms, q.agent_ms
            );
            hearth.push(h);
            hearth_prefetch.push(p);
            qemu.push(q);
        }
        print_figure(
            "restore_to_running_ms",
            median(hearth.iter().map(|r| r.running_ms)),
            Some(median(qemu.iter().map(|r| r.running_ms))),
            "ms",
        );
        print_figure(
            "restore_to_agent_ms",
            median(hearth.iter().map(|r| r.agent_ms)),
            Some(median(qemu.iter().map(|r| r.agent_ms))),
            "ms",
        );
        print_figure(
            "restore_to_agent_prefetch_ms",
            median(hearth_prefetch.iter().map(|r| r.agent_ms)),
            None,
            "ms",
        );
        Ok(())
    }

    async fn suspend_figures(&self) -> Result<()> {
        let mut hearth = Vec::new();
        let mut qemu = Vec::new();
        for run in 0..SUSPEND_RUNS {
            let h = self.hearth_suspend_run().await;
            hearth.push(h.with_context(|| format!("hearth: suspend run {run}"))?);
            let q = self.qemu_suspend_run().await;
            qemu.push(q.with_context(|| format!("qemu: suspend run {run}"))?);
        }
        print_figure(
            "suspend_2g_ms",
            median(hearth.into_iter()),
            Some(median(qemu.into_iter())),
            "ms",
        );
        Ok(())
    }

    /// A new VM's name and directory, and a CID for it.
    fn next_vm(&self, kind: &str) -> Result<(String, PathBuf, u32)> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let name = format!("{kind}{id}");
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok((name, dir, FIRST_CID + id))
    }

    // --- Hearth ---

    /// Starts `hearth-vmm` and waits for its control socket.
    fn hearth_spawn(&self) -> Result<HearthVm> {
        let (name, dir, _) = self.next_vm("hearth")?;
        let mut cmd = Command::new(self.vmm);
        cmd.arg("--api-sock")
            .arg(dir.join("api"))
            .args(["--log-level", "info"]);
        let mut proc = Proc::spawn(name, dir, cmd)?;
        // A first connection that sends nothing: the VMM is ready for requests.
        drop(proc.connect(&proc.dir.join("api"), START_TIMEOUT)?);
        Ok(HearthVm(proc))
    }

    /// Boots a VM of `mem_mib` and waits until its agent has run `true`.
    async fn hearth_boot(&self, mem_mib: u32) -> Result<HearthVm> {
        let start = Instant::now();
        let vm = self.hearth_spawn()?;
        let config = json!({
            "version": 1,
            "machine": {"vcpus": 1, "memory_mib": mem_mib},
            "boot": {"kernel": self.kernel, "initrd": self.initrd, "cmdline": BASE_CMDLINE},
            "drives": [{"id": "root", "path": self.rootfs, "read_only": true, "root": true}],
            "vsock": {"guest_cid": 3, "uds_path": vm.vsock()},
            "serial": {"output": "file", "path": vm.console()},
        });
        vm.call(
            json!({"action": "configure", "config": config}),
            RPC_TIMEOUT,
        )?;
        vm.call(json!({"action": "start"}), RPC_TIMEOUT)?;
        let agent = vm.agent();
        wait_agent(&agent, BOOT_TIMEOUT, &vm.0).await?;
        exec(&agent, &["true"], &vm.0).await?;
        booted(&vm.0, mem_mib, start);
        Ok(vm)
    }

    /// Boots a VM and suspends it into the snapshot directory `into` (full, untimed).
    async fn hearth_image(&self, mem_mib: u32, into: &Path) -> Result<()> {
        let mut vm = self.hearth_boot(mem_mib).await?;
        vm.call(
            json!({"action": "snapshot", "path": into, "kind": "full", "stop": true}),
            RPC_TIMEOUT,
        )?;
        vm.0.wait_exit(EXIT_TIMEOUT)
    }

    /// A fresh `hearth-vmm` restoring `snapshot` with its own vsock socket and console;
    /// returns once the restore is answered, with the VMM's own `restore_ms`.
    fn hearth_restore(&self, snapshot: &Path) -> Result<(HearthVm, f64)> {
        let vm = self.hearth_spawn()?;
        let result = self.hearth_restore_in(&vm, snapshot, false)?;
        Ok((vm, result["restore_ms"].as_f64().unwrap_or(f64::NAN)))
    }

    /// Restores `snapshot` into the spawned `vm`, faulting in its recorded working set first
    /// if `prefetch`; the VMM's answer.
    fn hearth_restore_in(&self, vm: &HearthVm, snapshot: &Path, prefetch: bool) -> Result<Value> {
        let result = vm.call(
            json!({
                "action": "restore",
                "path": snapshot,
                "overrides": {
                    "vsock_uds_path": vm.vsock(),
                    "serial": {"output": "file", "path": vm.console()},
                },
                "prefetch": prefetch,
            }),
            RPC_TIMEOUT,
        )?;
        if result["state"] != json!("running") {
            bail!("{}: restored into {result}", vm.0.name);
        }
        Ok(result)
    }

    /// Restores the image once, lets its agent answer and run `true`, and records the pages
    /// that took into the image as its working set, as an image pipeline would (untimed).
    async fn hearth_record_working_set(&self, snapshot: &Path) -> Result<()> {
        let vm = self.hearth_spawn()?;
        self.hearth_restore_in(&vm, snapshot, false)?;
        let agent = vm.agent();
        wait_agent(&agent, RESTORE_TIMEOUT, &vm.0).await?;
        exec(&agent, &["true"], &vm.0).await?;
        let result = vm.call(
            json!({"action": "record_working_set", "path": snapshot}),
            RPC_TIMEOUT,
        )?;
        let mib = |key: &str| result[key].as_f64().unwrap_or(f64::NAN) / f64::from(1 << 20);
        eprintln!(
            "bench: the image's working set is {:.1} MiB, {:.1} MiB of it written",
            mib("working_set_bytes"),
            mib("working_set_written_bytes")
        );
        Ok(())
    }

    async fn hearth_restore_run(&self, snapshot: &Path, prefetch: bool) -> Result<Restore> {
        let start = Instant::now();
        let vm = self.hearth_spawn()?;
        let spawned = start.elapsed();
        let result = self.hearth_restore_in(&vm, snapshot, prefetch)?;
        let running = start.elapsed();
        wait_agent(&vm.agent(), RESTORE_TIMEOUT, &vm.0).await?;
        let agent = start.elapsed();
        eprintln!(
            "bench: hearth-vmm (prefetch {prefetch}) answered its socket after {:.1} ms, \
             reports {}; agent answered {:.1} ms after running",
            ms(spawned),
            result,
            ms(agent - running)
        );
        let log = std::fs::read_to_string(vm.0.dir.join("log")).unwrap_or_default();
        // The restore's phases and when the guest's driver handled the transport reset (the
        // log's stamps are seconds since the VMM started).
        let phases = |l: &&str| l.contains("restore: ") || l.contains("transport reset");
        for line in log.lines().filter(phases) {
            eprintln!("bench:   {line}");
        }
        Ok(Restore {
            running_ms: ms(running),
            agent_ms: ms(agent),
        })
    }

    /// The summed PSS of `n` clones of `snapshot`, running at once, each having run `true`.
    async fn hearth_clones_pss_mib(&self, snapshot: &Path, n: usize) -> Result<f64> {
        let mut vms = Vec::with_capacity(n);
        for _ in 0..n {
            vms.push(self.hearth_restore(snapshot)?.0);
        }
        for vm in &vms {
            let agent = vm.agent();
            wait_agent(&agent, RESTORE_TIMEOUT, &vm.0).await?;
            exec(&agent, &["true"], &vm.0).await?;
        }
        total_pss_mib(vms.iter().map(|vm| vm.0.pid()))
    }

    async fn hearth_clone_ratio(&self, snapshot: &Path) -> Result<f64> {
        let one = self.hearth_clones_pss_mib(snapshot, 1).await?;
        let all = self.hearth_clones_pss_mib(snapshot, CLONES).await?;
        eprintln!("bench: hearth PSS: 1 clone {one:.1} MiB, {CLONES} clones {all:.1} MiB");
        Ok(all / one)
    }

    /// Boots a 2 GiB VM, suspends it (full, untimed), restores it, dirties 50 MiB and times
    /// a diff snapshot with `stop`.
    async fn hearth_suspend_run(&self) -> Result<f64> {
        let (_, dir, _) = self.next_vm("hearth-suspend")?;
        let _cleanup = Scratch(dir.clone());
        let full = dir.join("full");
        let diff = dir.join("diff");
        self.hearth_image(SUSPEND_MIB, &full).await?;
        let (mut vm, _) = self.hearth_restore(&full)?;
        let agent = vm.agent();
        wait_agent(&agent, RESTORE_TIMEOUT, &vm.0).await?;
        exec(&agent, &["/bin/sh", "-c", DIRTY_SCRIPT], &vm.0).await?;
        let start = Instant::now();
        let result = vm.call(
            json!({"action": "snapshot", "path": diff, "kind": "diff", "stop": true}),
            RPC_TIMEOUT,
        )?;
        let answered = start.elapsed();
        vm.0.wait_exit(EXIT_TIMEOUT)?;
        let exited = start.elapsed();
        let report = &result["snapshot"];
        let field = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "bench: hearth suspend: answered after {:.1} ms, exited 0 after {:.1} ms, \
             {:.1} MiB of memory written (pause {:.1} ms; devices {:.1}, memory {:.1}, disks \
             {:.1} ms)",
            ms(answered),
            ms(exited),
            field("memory_bytes") / 1048576.0,
            result["pause_ms"].as_f64().unwrap_or(f64::NAN),
            field("devices_ms"),
            field("memory_ms"),
            field("disks_ms"),
        );
        Ok(ms(answered))
    }

    // --- QEMU ---

    /// The machine every QEMU VM runs, booted or restored.
    fn qemu_machine(&self, mem_mib: u32) -> Microvm {
        Microvm::new(self.kernel, self.rootfs, 1, mem_mib).initrd(self.initrd)
    }

    /// Starts QEMU with its console, QMP socket and vsock CID (a fresh one unless given),
    /// and connects to QMP.
    fn qemu_spawn(&self, machine: Microvm, cid: Option<u32>) -> Result<QemuVm> {
        let (name, dir, fresh_cid) = self.next_vm("qemu")?;
        let cid = cid.unwrap_or(fresh_cid);
        let qmp_path = dir.join("qmp");
        let cmd = machine
            .vsock(cid)
            .console(Console::File(dir.join("console")))
            .qmp(&qmp_path)
            .command();
        let mut proc = Proc::spawn(name, dir, cmd)?;
        let stream = proc.connect(&qmp_path, START_TIMEOUT)?;
        let qmp = Qmp::new(stream).with_context(|| proc.tails())?;
        Ok(QemuVm { proc, qmp, cid })
    }

    /// Boots a VM of `mem_mib` and waits until its agent has run `true`.
    async fn qemu_boot(&self, mem_mib: u32) -> Result<QemuVm> {
        let start = Instant::now();
        let vm = self.qemu_spawn(self.qemu_machine(mem_mib), None)?;
        let agent = vm.agent();
        wait_agent(&agent, BOOT_TIMEOUT, &vm.proc).await?;
        exec(&agent, &["true"], &vm.proc).await?;
        booted(&vm.proc, mem_mib, start);
        Ok(vm)
    }

    /// Boots a VM and migrates it into the file `into` (untimed); returns the VM's CID.
    async fn qemu_image(&self, mem_mib: u32, into: &Path) -> Result<u32> {
        let mut vm = self.qemu_boot(mem_mib).await?;
        vm.qmp.uncap_migration()?;
        vm.save(into)?;
        vm.quit()?;
        Ok(vm.cid)
    }

    /// A fresh QEMU loading `image` (an incoming migration), with the vsock CID `cid` or a
    /// fresh one. The guest learns a new CID only from the TRANSPORT_RESET event QEMU sends
    /// once it runs; a connection that arrives before then is answered from the old CID,
    /// which the host drops, and waits out the kernel's 2 s connect timeout. So the timed
    /// restores keep the image's CID, as a VM resumed from its own saved state does; clones
    /// each need their own.
    fn qemu_restore(&self, image: &Path, cid: Option<u32>) -> Result<QemuVm> {
        self.qemu_spawn(self.qemu_machine(BASE_MIB).incoming(image), cid)
    }

    async fn qemu_restore_run(&self, image: &Path, cid: u32) -> Result<Restore> {
        let start = Instant::now();
        let mut vm = self.qemu_restore(image, Some(cid))?;
        let qmp = start.elapsed();
        vm.run_when_loaded(RESTORE_TIMEOUT)?;
        let running = start.elapsed();
        wait_agent(&vm.agent(), RESTORE_TIMEOUT, &vm.proc).await?;
        let agent = start.elapsed();
        eprintln!("bench: qemu answered on QMP after {:.1} ms", ms(qmp));
        Ok(Restore {
            running_ms: ms(running),
            agent_ms: ms(agent),
        })
    }

    /// The summed PSS of `n` QEMUs restored from `image` at once, each having run `true`.
    async fn qemu_clones_pss_mib(&self, image: &Path, n: usize) -> Result<f64> {
        let mut vms = Vec::with_capacity(n);
        for _ in 0..n {
            vms.push(self.qemu_restore(image, None)?);
        }
        for vm in &mut vms {
            vm.run_when_loaded(RESTORE_TIMEOUT)?;
            let agent = vm.agent();
            wait_agent(&agent, RESTORE_TIMEOUT, &vm.proc).await?;
            exec(&agent, &["true"], &vm.proc).await?;
        }
        total_pss_mib(vms.iter().map(|vm| vm.proc.pid()))
    }

    async fn qemu_clone_ratio(&self, image: &Path) -> Result<f64> {
        let one = self.qemu_clones_pss_mib(image, 1).await?;
        let all = self.qemu_clones_pss_mib(image, CLONES).await?;
        eprintln!("bench: qemu PSS: 1 clone {one:.1} MiB, {CLONES} clones {all:.1} MiB");
        Ok(all / one)
    }

    /// Boots a 2 GiB VM, dirties 50 MiB and times `stop` plus a migration to a file.
    async fn qemu_suspend_run(&self) -> Result<f64> {
        let mut vm = self.qemu_boot(SUSPEND_MIB).await?;
        exec(&vm.agent(), &["/bin/sh", "-c", DIRTY_SCRIPT], &vm.proc).await?;
        vm.qmp.uncap_migration()?;
        let file = vm.proc.dir.join("suspended");
        let start = Instant::now();
        vm.save(&file)?;
        let completed = start.elapsed();
        let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        vm.quit()?;
        let exited = start.elapsed();
        eprintln!(
            "bench: qemu suspend: completed after {:.1} ms, exited 0 after {:.1} ms, \
             {:.1} MiB written",
            ms(completed),
            ms(exited),
            bytes as f64 / 1048576.0
        );
        Ok(ms(completed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pss_kib_reads_the_pss_line() {
        let rollup = "\
55d4c2a00000-7ffd3c9f1000 ---p 00000000 00:00 0                          [rollup]
Rss:              123456 kB
Pss:               65432 kB
Pss_Anon:          60000 kB
";

        assert_eq!(pss_kib(rollup), Some(65_432));
    }

    #[test]
    fn test_pss_kib_none_without_pss() {
        assert_eq!(pss_kib("Rss: 1 kB\n"), None);
    }
}
