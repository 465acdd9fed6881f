//! `cargo xtask demo`: the README's main job, a tour of the engine. It builds the guest kernel,
//! the Debian test image, the agent's initramfs and `hearth-vmm`, then, where real KVM is (the
//! test bed otherwise, and it says so):
//! 1. boots the Debian image with `hearth-agent` as PID 1;
//! 2. runs `python3` in the guest through the agent;
//! 3. takes a full snapshot of the running VM;
//! 4. restores 3 clones of it side by side, each with its own vsock socket and disk;
//! 5. suspends one clone to disk (a diff snapshot) and resumes it;
//! 6. prints each step's time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_proto::{AgentClient, RestoreInfo};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::test::TestAssets;
use crate::{deps, testbed};

const AGENT_TIMEOUT: Duration = Duration::from_secs(240);

/// The host side: build what the demo boots, then run [`run_in_kvm`] where real KVM is.
pub fn run() -> Result<()> {
    deps::ensure()?;
    let start = Instant::now();
    let assets = TestAssets::build()?;
    println!(
        "demo: hearth-vmm, guest kernel, Debian image and agent initramfs ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    testbed::run_xtask(
        "demo-in-kvm",
        &[
            &assets.vmm,
            &assets.kernel,
            &assets.agent_initrd,
            &assets.debian,
        ],
    )
}

/// A `hearth-vmm` process serving a control socket in the demo's directory.
struct Vmm {
    name: String,
    child: Child,
    api: PathBuf,
    vsock: PathBuf,
    console: PathBuf,
}

impl Vmm {
    fn spawn(exe: &Path, dir: &Path, name: &str) -> Result<Self> {
        let api = dir.join(format!("{name}.api"));
        let child = Command::new(exe)
            .arg("--api-sock")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let start = Instant::now();
        while !api.exists() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{name}: hearth-vmm never opened its control socket");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            api,
            vsock: dir.join(format!("{name}.vsock")),
            console: dir.join(format!("{name}.console")),
        })
    }

    fn call(&self, request: Value) -> Result<Value> {
        vmm::rpc::call(&self.api, &request).with_context(|| format!("{}: {request}", self.name))
    }

    fn agent(&self) -> AgentClient {
        AgentClient::new(&self.vsock)
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for the VMM to exit 0 (after a suspend or a power-off).
    fn wait_exit(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}", self.name);
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{} did not exit", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> String {
    format!("{:8.1} ms", d.as_secs_f64() * 1000.0)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

async fn wait_agent(vmm: &Vmm) -> Result<AgentClient> {
    let agent = vmm.agent();
    agent.wait_ready(AGENT_TIMEOUT).await.with_context(|| {
        format!(
            "{}: the agent never answered\n{}",
            vmm.name,
            vmm.console_tail()
        )
    })?;
    Ok(agent)
}

/// Runs `python3 -c code` in the guest and returns its trimmed stdout.
async fn python(agent: &AgentClient, code: &str) -> Result<String> {
    let out = agent.run(&["python3", "-c", code]).await?;
    if !out.status.success() {
        bail!(
            "python3 failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Tells a restored guest the host's time and gives it fresh entropy, as hearthd will.
async fn restored(agent: &AgentClient, clone: u8) -> Result<()> {
    use std::io::Read;
    let mut entropy = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
    agent
        .restored(RestoreInfo {
            wall_clock_ns: now_ns(),
            entropy,
            hostname: Some(format!("clone{clone}")),
        })
        .await?;
    Ok(())
}

/// Restores `snapshot` into a new VMM; returns it with the time until the vCPUs ran and until
/// the agent answered.
async fn restore(
    exe: &Path,
    dir: &Path,
    name: &str,
    snapshot: &Path,
) -> Result<(Vmm, Duration, Duration)> {
    let start = Instant::now();
    let vmm = Vmm::spawn(exe, dir, name)?;
    vmm.call(json!({
        "action": "restore",
        "path": snapshot,
        "overrides": {
            "vsock_uds_path": vmm.vsock,
            "serial": {"output": "file", "path": vmm.console},
        },
    }))?;
    let running = start.elapsed();
    let agent = wait_agent(&vmm).await?;
    let answered = start.elapsed();
    agent.ping().await?;
    Ok((vmm, running, answered))
}

/// The part that needs KVM.
pub fn run_in_kvm(exe: &Path, kernel: &Path, initrd: &Path, rootfs: &Path) -> Result<()> {
    let kind = vmm::kvm_host::KvmKind::detect();
    if kind.is_hardware() {
        println!("demo: KVM here is {kind:?}");
    } else {
        println!("demo: KVM here is {kind:?}, not hardware KVM: running in the test bed");
    }
    let dir = std::env::temp_dir().join(format!("hearth-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(tour(exe, kernel, initrd, rootfs, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tour(exe: &Path, kernel: &Path, initrd: &Path, rootfs: &Path, dir: &Path) -> Result<()> {
    // 1. Boot.
    let start = Instant::now();
    let mut origin = Vmm::spawn(exe, dir, "origin")?;
    let config = json!({
        "version": 1,
        "machine": {"vcpus": 1, "memory_mib": 512},
        "boot": {
            "kernel": kernel,
            "initrd": initrd,
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet hearth.hostname=origin",
        },
        "drives": [{"id": "root", "path": rootfs, "read_only": true, "root": true}],
        "vsock": {"guest_cid": 3, "uds_path": origin.vsock},
        "rng": true,
        "serial": {"output": "file", "path": origin.console},
    });
    origin.call(json!({"action": "configure", "config": config}))?;
    origin.call(json!({"action": "start"}))?;
    let agent = wait_agent(&origin).await?;
    println!(
        "demo: {} boot: Debian with hearth-agent as PID 1, agent answering",
        ms(start.elapsed())
    );

    // 2. python3 through the agent, leaving state in the guest.
    let start = Instant::now();
    let out = python(
        &agent,
        "import platform, sys; open('/tmp/state', 'w').write('written before the snapshot'); \
         print(f'Python {platform.python_version()} on Linux {platform.release()}, 2**100 = {2**100}')",
    )
    .await?;
    println!("demo: {} python3 in the guest: {out}", ms(start.elapsed()));

    // 3. Snapshot.
    let image = dir.join("image");
    let start = Instant::now();
    let result = origin.call(json!({"action": "snapshot", "path": image, "kind": "full"}))?;
    let mib = result["snapshot"]["memory_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    println!(
        "demo: {} full snapshot of the running VM ({mib:.0} MiB of memory written); the VM runs on",
        ms(start.elapsed())
    );
    agent.shutdown(None).await?;
    origin.wait_exit()?;

    // 4. Three clones.
    let mut clones = Vec::new();
    for i in 1..=3u8 {
        let (clone, running, answered) = restore(exe, dir, &format!("clone{i}"), &image).await?;
        println!(
            "demo: {} clone{i} restored, vCPUs running; agent answered after {}",
            ms(running),
            ms(answered).trim()
        );
        clones.push(clone);
    }
    for (i, clone) in clones.iter().enumerate() {
        let agent = clone.agent();
        restored(&agent, i as u8 + 1).await?;
        let out = python(
            &agent,
            "import os, socket; print(socket.gethostname(), open('/tmp/state').read(), \
             'random:', os.urandom(4).hex())",
        )
        .await?;
        println!("demo:             clone{}: {out}", i + 1);
    }

    // 5. Suspend clone1 (a diff snapshot: only the pages it wrote) and resume it.
    let suspended = dir.join("clone1-suspended");
    let start = Instant::now();
    let result = clones[0].call(json!({
        "action": "snapshot", "path": suspended, "kind": "diff", "stop": true
    }))?;
    clones[0].wait_exit()?;
    let mib = result["snapshot"]["memory_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    println!(
        "demo: {} clone1 suspended to disk ({mib:.1} MiB of dirty memory written), its VMM exited",
        ms(start.elapsed())
    );
    let (resumed, running, answered) = restore(exe, dir, "clone1-resumed", &suspended).await?;
    let agent = resumed.agent();
    restored(&agent, 1).await?;
    let out = python(
        &agent,
        "import socket; print(socket.gethostname(), open('/tmp/state').read())",
    )
    .await?;
    println!(
        "demo: {} clone1 resumed, vCPUs running; agent answered after {}: {out}",
        ms(running),
        ms(answered).trim()
    );

    // Power everything off.
    let start = Instant::now();
    let mut all = vec![resumed];
    all.extend(clones.drain(1..));
    for mut vmm in all {
        vmm.agent().shutdown(None).await?;
        vmm.wait_exit()?;
    }
    println!(
        "demo: {} the 3 running VMs powered off, every hearth-vmm exited 0",
        ms(start.elapsed())
    );
    Ok(())
}
