//! The `agent` suite: what a host client sees of `hearth-agent` in a real guest. It boots the
//! project's kernel with the agent's initramfs and the Debian test image, then measures
//! - `exec_roundtrip_ms`: the median over `EXECS` runs of `true`, from the request to the
//!   exit status (a fresh vsock connection, the handshake, spawn, exit, reap);
//! - `stdout_throughput`: 100 MiB of `/dev/zero` streamed through an exec's stdout.
//!
//! QEMU has no agent, so the lines carry Hearth's figure alone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_proto::{AgentClient, ExecEvent, ExecRequest};
use anyhow::{bail, Context, Result};

use super::{median, print_figure};

const EXECS: usize = 200;
const WARMUP: usize = 5;
const STDOUT_BYTES: u64 = 100 << 20;
/// A single exec that takes this long is a hang, not a figure.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The part that needs KVM: boot, measure, power off.
pub fn agent_in_kvm(vmm: &Path, kernel: &Path, initrd: &Path, rootfs: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hearth-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds = dir.join("vsock.sock");
    let config = serde_json::json!({
        "version": 1,
        "machine": {"vcpus": 1, "memory_mib": 512},
        "boot": {
            "kernel": kernel,
            "initrd": initrd,
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet",
        },
        "drives": [{"id": "root", "path": rootfs, "read_only": true, "root": true}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "serial": {"output": "file", "path": dir.join("console.log")},
    });
    let config_path = dir.join("vm.json");
    std::fs::write(&config_path, config.to_string())?;
    let mut child = Command::new(vmm)
        .arg("--config")
        .arg(&config_path)
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", vmm.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure(AgentClient::new(&uds)));
    let _ = child.kill();
    let _ = child.wait();
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    result.with_context(|| format!("guest console:\n{console}"))
}

async fn measure(client: AgentClient) -> Result<()> {
    let boot = Instant::now();
    client.wait_ready(Duration::from_secs(240)).await?;
    eprintln!(
        "bench: agent answered {:.1} s after the VMM started",
        boot.elapsed().as_secs_f64()
    );
    let mut samples = Vec::with_capacity(EXECS);
    for i in 0..WARMUP + EXECS {
        let start = Instant::now();
        let out = tokio::time::timeout(EXEC_TIMEOUT, client.run(&["true"]))
            .await
            .with_context(|| format!("exec {i} of `true` took over {EXEC_TIMEOUT:?}"))??;
        if !out.status.success() {
            bail!("`true` failed: {:?}", out.status);
        }
        if i >= WARMUP {
            samples.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let exec_ms = median(samples.iter().copied());
    eprintln!("bench: {EXECS} execs done, median {exec_ms:.1} ms");
    let throughput = stdout_throughput(&client).await?;
    print_figure("exec_roundtrip_ms", exec_ms, None, "ms");
    print_figure("stdout_throughput", throughput, None, "MiB/s");
    client.shutdown(None).await?;
    Ok(())
}

/// Streams `STDOUT_BYTES` of zeros through an exec's stdout; MiB/s.
async fn stdout_throughput(client: &AgentClient) -> Result<f64> {
    let request = ExecRequest {
        argv: ["head", "-c", &STDOUT_BYTES.to_string(), "/dev/zero"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut session = client.exec(request).await?;
    let mut received = 0u64;
    loop {
        match session.next_event().await? {
            ExecEvent::Stdout(b) => received += b.len() as u64,
            ExecEvent::Stderr(b) => bail!("stderr: {}", String::from_utf8_lossy(&b)),
            ExecEvent::Exited(status) if status.success() => break,
            ExecEvent::Exited(status) => bail!("head failed: {status:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if received != STDOUT_BYTES {
        bail!("received {received} bytes of {STDOUT_BYTES}");
    }
    Ok(received as f64 / f64::from(1 << 20) / secs)
}
