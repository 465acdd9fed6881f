//! The `boot` suite: boot to userspace and the VMM's RSS overhead, `hearth-vmm` against QEMU
//! `-M microvm` on the same kernel and root filesystem (method in `docs/BENCHMARKS.md`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{median, print_figure};
use crate::qemu::MicrovmBoot;

/// Printed by the guest's init first thing, through `hearth_boot_marker=` on the kernel
/// command line (see `guest/rootfs/busybox-init.sh`).
const MARKER: &str = "hearth-bench-userspace";
/// Boots per VMM; the median is reported.
const RUNS: usize = 9;
const VCPUS: u32 = 1;
const MEM_MIB: u32 = 256;
/// How long after the marker the RSS is sampled (the guest is idle in `sleep` by then).
const SETTLE: Duration = Duration::from_millis(500);
/// How much memory [`recycle_freed_memory`] writes before each boot: more than the previous
/// boot freed (guest memory touched, about 35 MiB, and QEMU's own, about 50 MiB).
const RECYCLE_BYTES: usize = (MEM_MIB as usize + 64) << 20;

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    boot_ms: f64,
    overhead_mib: f64,
}

/// The part that needs KVM: boot each VMM `RUNS` times after a warm-up, alternating, and print
/// the medians.
pub fn boot_in_kvm(vmm: &Path, kernel: &Path, rootfs: &Path) -> Result<()> {
    let command = "sleep 2";
    let scratch = std::env::temp_dir().join(format!("hearth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let config = scratch.join("vm.json");
    std::fs::write(&config, hearth_config(kernel, rootfs, command).to_string())?;
    let qemu = MicrovmBoot {
        kernel,
        rootfs,
        cpus: VCPUS,
        mem_mib: MEM_MIB,
        command,
        marker: Some(MARKER),
    };
    let mut hearth_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    // Run 0 warms up what a fresh host has cold (page cache, the binaries' first pages) and
    // is left out of the figures.
    for run in 0..=RUNS {
        let mut cmd = Command::new(vmm);
        cmd.arg("--config").arg(&config);
        recycle_freed_memory(RECYCLE_BYTES);
        let h = measure(cmd).with_context(|| format!("hearth-vmm, run {run}"))?;
        recycle_freed_memory(RECYCLE_BYTES);
        let q = measure(qemu.command()?).with_context(|| format!("qemu, run {run}"))?;
        let label = if run == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {run}")
        };
        eprintln!(
            "bench: {label}: hearth {:.0} ms {:.1} MiB, qemu {:.0} ms {:.1} MiB",
            h.boot_ms, h.overhead_mib, q.boot_ms, q.overhead_mib
        );
        if run > 0 {
            hearth_samples.push(h);
            qemu_samples.push(q);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print_figure(
        "boot_to_userspace_ms",
        median(hearth_samples.iter().map(|s| s.boot_ms)),
        Some(median(qemu_samples.iter().map(|s| s.boot_ms))),
        "ms",
    );
    print_figure(
        "vmm_rss_overhead_mib",
        median(hearth_samples.iter().map(|s| s.overhead_mib)),
        Some(median(qemu_samples.iter().map(|s| s.overhead_mib))),
        "MiB",
    );
    Ok(())
}

fn hearth_config(kernel: &Path, rootfs: &Path, command: &str) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "machine": {"vcpus": VCPUS, "memory_mib": MEM_MIB},
        "boot": {
            "kernel": kernel,
            "cmdline": format!(
                "console=ttyS0 reboot=k panic=-1 quiet hearth_boot_marker={MARKER} -- {command}"
            ),
        },
        "drives": [{"id": "root", "path": rootfs, "read_only": true, "root": true}],
        "serial": {"output": "stdout"},
    })
}

/// Starts `cmd`, times it to the guest's marker on the console, samples its memory while the
/// guest idles, and waits for it to exit.
fn measure(mut cmd: Command) -> Result<Sample> {
    // Both VMMs start with the same clean environment: cargo's LD_LIBRARY_PATH would send the
    // dynamic loader through the toolchain's directories first.
    cmd.env_remove("LD_LIBRARY_PATH");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == MARKER {
                let _ = tx.send(start.elapsed());
            }
        }
    });
    let boot = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(elapsed) => elapsed,
        Err(_) => {
            kill(&mut child);
            bail!("the guest never reached userspace");
        }
    };
    std::thread::sleep(SETTLE);
    let overhead = rss_overhead_bytes(child.id(), u64::from(MEM_MIB) << 20);
    wait_with_timeout(&mut child, Duration::from_secs(60))?;
    let _ = reader.join();
    Ok(Sample {
        boot_ms: boot.as_secs_f64() * 1000.0,
        overhead_mib: overhead? as f64 / f64::from(1 << 20),
    })
}

/// Writes `bytes` of fresh memory, a byte per page, and frees it again, so that the next
/// boot starts on memory no earlier process left code in.
///
/// The kernel hands a process first the pages another one freed last: each boot gets the
/// pages of the VM before it, whichever VMM ran that. Under an emulated CPU (the test bed's L1
/// runs on QEMU's TCG) the first write to a page that held code the emulator translated, such
/// as the previous guest's kernel, throws those translations away: a kernel-sized copy into
/// such pages took 81-92 ms instead of 15, and whole boots 200-500 ms longer
/// (`docs/BENCHMARKS.md`), paid by whoever writes the pages first. This pays it here, outside
/// the timed window and the same for both VMMs. On a host with hardware virtualisation it only
/// costs the few ms of writing the memory.
fn recycle_freed_memory(bytes: usize) {
    // Zeroed allocations this large are fresh mappings: nothing is backed until written.
    let mut memory = vec![0u8; bytes];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&memory);
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("the VMM exited with {status}");
            }
            return Ok(());
        }
        if start.elapsed() > timeout {
            kill(child);
            bail!("the VMM did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The process's RSS minus what is resident of its guest RAM mapping: the VMM's own memory.
fn rss_overhead_bytes(pid: u32, guest_bytes: u64) -> Result<u64> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("no VmRSS")?;
    let smaps = std::fs::read_to_string(proc.join("smaps"))?;
    let guest_kib = guest_mapping_rss_kib(&smaps, guest_bytes >> 10)
        .context("no mapping of the guest's RAM size in smaps")?;
    Ok(rss_kib.saturating_sub(guest_kib) << 10)
}

/// The Rss of the mapping holding guest RAM: the one whose size is the guest's memory, or a
/// little more (QEMU adds a guard page and alignment).
fn guest_mapping_rss_kib(smaps: &str, guest_kib: u64) -> Option<u64> {
    let mut size = None;
    let mut best = None;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.split_whitespace().next()?.parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let rss = v.split_whitespace().next()?.parse::<u64>().ok()?;
            if size.is_some_and(|s| s >= guest_kib && s <= guest_kib + 4096) {
                best = Some(best.map_or(rss, |b: u64| b.max(rss)));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_mapping_rss_picks_guest_sized_mapping() {
        let smaps = "\
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               20000 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
";

        assert_eq!(guest_mapping_rss_kib(smaps, 262_144), Some(20_000));
    }

    #[test]
    fn test_guest_mapping_rss_none_without_guest_mapping() {
        let smaps = "a-b rw-p 0 00:00 0\nSize: 1024 kB\nRss: 1024 kB\n";

        assert_eq!(guest_mapping_rss_kib(smaps, 262_144), None);
    }
}
