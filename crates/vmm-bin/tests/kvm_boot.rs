//! `hearth-vmm` booting the project's guest kernel on real KVM (run by `cargo xtask test` in
//! the test bed). Each test writes a config, runs the binary to the guest's power-off, and
//! checks what the guest printed on its serial console or wrote to its disks.
//!
//! The guest is the busybox test image: its init runs the command after `--` on the kernel
//! command line, prints `hearth-init: exit status N` and resets the machine through the i8042.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{asset, make_ext4, request, Scratch};

struct Boot {
    output: Output,
    console: String,
}

/// Boots the busybox image with `vcpus`, `memory_mib`, extra drives, running `command`.
fn boot(
    scratch: &Scratch,
    vcpus: u8,
    memory_mib: u64,
    drives: serde_json::Value,
    command: &str,
) -> Boot {
    let console = scratch.path("console.log");
    let mut all_drives = vec![serde_json::json!({
        "id": "root", "path": asset("HEARTH_TEST_ROOTFS_BUSYBOX"), "read_only": true, "root": true
    })];
    all_drives.extend(drives.as_array().cloned().unwrap_or_default());
    let config = serde_json::json!({
        "version": 1,
        "machine": {"vcpus": vcpus, "memory_mib": memory_mib},
        "boot": {
            "kernel": asset("HEARTH_TEST_KERNEL"),
            "cmdline": format!("console=ttyS0 reboot=k panic=-1 quiet -- {command}")
        },
        "drives": all_drives,
        "serial": {"output": "file", "path": console},
    });
    let config_path = scratch.path("vm.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let output = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_hearth-vmm"))
            .arg("--config")
            .arg(&config_path),
        Duration::from_secs(180),
    );
    let console = std::fs::read_to_string(&console)
        .unwrap_or_default()
        .replace("\r\n", "\n");
    Boot { output, console }
}

fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hearth-vmm");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > timeout {
            // The caller's assertions report the failure with the console attached.
            eprintln!("hearth-vmm did not exit within {timeout:?}: killing it");
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn value_after<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().find_map(|l| l.trim().strip_prefix(key))
}

fn assert_clean_exit(boot: &Boot) {
    assert!(
        boot.output.status.success(),
        "hearth-vmm failed: {:?}\nstderr: {}\nconsole:\n{}",
        boot.output.status,
        String::from_utf8_lossy(&boot.output.stderr),
        boot.console
    );
    assert_eq!(
        value_after(&boot.console, "hearth-init: exit status "),
        Some("0"),
        "console:\n{}",
        boot.console
    );
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_boot_writes_file_to_second_disk_host_reads_it() {
    let scratch = Scratch::new("kvm-boot", "disk");
    let data = scratch.path("data.ext4");
    make_ext4(&data, 16);
    let drives = serde_json::json!([{"id": "data", "path": data}]);

    let boot = boot(
        &scratch,
        1,
        128,
        drives,
        "mount /dev/vdb /mnt && echo written-by-guest > /mnt/out.txt && umount /mnt",
    );

    assert_clean_exit(&boot);
    let out = Command::new("debugfs")
        .args(["-R", "cat /out.txt"])
        .arg(&data)
        .output()
        .expect("debugfs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "written-by-guest"
    );
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_boot_nproc_matches_vcpus() {
    for vcpus in [1u8, 2, 4] {
        let scratch = Scratch::new("kvm-boot", &format!("nproc{vcpus}"));

        let boot = boot(
            &scratch,
            vcpus,
            128,
            serde_json::json!([]),
            "echo nproc=$(nproc)",
        );

        assert_clean_exit(&boot);
        assert_eq!(
            value_after(&boot.console, "nproc="),
            Some(vcpus.to_string().as_str())
        );
    }
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_boot_memory_shows_in_meminfo() {
    for mib in [128u64, 2048] {
        let scratch = Scratch::new("kvm-boot", &format!("mem{mib}"));

        let boot = boot(
            &scratch,
            1,
            mib,
            serde_json::json!([]),
            "grep MemTotal /proc/meminfo",
        );

        assert_clean_exit(&boot);
        let kib: u64 = value_after(&boot.console, "MemTotal:")
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("MemTotal on the console");
        // The kernel keeps its own image and reservations out of MemTotal.
        assert!(
            kib <= mib * 1024 && kib >= mib * 1024 * 8 / 10,
            "MemTotal {kib} kB for {mib} MiB"
        );
    }
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_boot_read_only_disk_rejects_writes() {
    let scratch = Scratch::new("kvm-boot", "ro");
    let data = scratch.path("ro.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).expect("image");
    let drives = serde_json::json!([{"id": "ro", "path": data, "read_only": true}]);

    let boot = boot(
        &scratch,
        1,
        128,
        drives,
        "echo x | dd of=/dev/vdb 2>/dev/null; echo dd=$?; cat /sys/block/vdb/ro",
    );

    assert_clean_exit(&boot);
    assert_ne!(value_after(&boot.console, "dd="), Some("0"));
    assert_eq!(
        std::fs::read(&data).expect("read image"),
        vec![0u8; 1 << 20]
    );
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_control_socket_configure_start_describe_pause_resume_stop() {
    let scratch = Scratch::new("kvm-boot", "ctl");
    let sock = scratch.path("ctl.sock");
    let console = scratch.path("console.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hearth-vmm");
    wait_for("the control socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let config = serde_json::json!({
        "version": 1,
        "machine": {"vcpus": 2, "memory_mib": 256},
        "boot": {
            "kernel": asset("HEARTH_TEST_KERNEL"),
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet -- devmem 0xd0000000 8 123; echo userspace-up; sleep 600"
        },
        "drives": [{"id": "root", "path": asset("HEARTH_TEST_ROOTFS_BUSYBOX"), "read_only": true, "root": true}],
        "serial": {"output": "file", "path": console},
    });

    let bad = request(
        &sock,
        r#"{"version":1,"action":"configure","config":{"version":1,"machine":{"vcpus":1,"memory_mib":100000},"boot":{"kernel":"/k"}}}"#,
    );
    let configured = request(
        &sock,
        &serde_json::json!({"version": 1, "action": "configure", "config": config}).to_string(),
    );
    let started = request(&sock, r#"{"version":1,"action":"start"}"#);
    wait_for("the guest's userspace", Duration::from_secs(120), || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("userspace-up"))
    });
    let described = request(&sock, r#"{"version":1,"action":"describe"}"#);
    let paused = request(&sock, r#"{"version":1,"action":"pause"}"#);
    let described_paused = request(&sock, r#"{"version":1,"action":"describe"}"#);
    let resumed = request(&sock, r#"{"version":1,"action":"resume"}"#);
    let stopped = request(&sock, r#"{"version":1,"action":"stop"}"#);
    let status = run_to_exit(&mut child, Duration::from_secs(60));

    assert_eq!(bad["error"]["field"], "machine.memory_mib");
    assert_eq!(configured["result"]["state"], "configured");
    assert_eq!(started["result"]["state"], "running", "{started}");
    assert_eq!(described["result"]["state"], "running");
    assert!(
        described["result"]["boot_to_userspace_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{described}"
    );
    assert!(
        described["result"]["memory"]["vmm_overhead_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{described}"
    );
    assert_eq!(described["result"]["vcpus"], 2);
    assert_eq!(paused["result"]["state"], "paused");
    assert_eq!(described_paused["result"]["state"], "paused");
    assert_eq!(resumed["result"]["state"], "running");
    assert_eq!(stopped["result"]["state"], "exited");
    assert!(status.success());
}

const VSOCK_GUEST_SCRIPT: &str = r#"
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, 7000))
s.sendall(b"ping-from-guest\n")
print("guest-to-host:" + s.recv(100).decode().strip(), flush=True)
s.close()
l = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
l.bind((socket.VMADDR_CID_ANY, 5000))
l.listen(1)
print("guest-listening", flush=True)
c, _ = l.accept()
c.sendall(b"guest-echo:" + c.recv(100))
c.close()
"#;

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_vsock_echo_guest_to_host_and_host_to_guest() {
    use std::io::{BufRead, BufReader, Read, Write};
    let scratch = Scratch::new("kvm-boot", "vsock");
    let uds = scratch.path("v.sock");
    let host_listener =
        std::os::unix::net::UnixListener::bind(format!("{}_7000", uds.display())).expect("bind");
    let host_echo = std::thread::spawn(move || {
        let (stream, _) = host_listener.accept().expect("guest connection");
        let mut line = String::new();
        BufReader::new(stream.try_clone().expect("clone"))
            .read_line(&mut line)
            .expect("read");
        (&stream)
            .write_all(format!("host-echo:{line}").as_bytes())
            .expect("write");
    });
    let script_dir = scratch.path("script");
    std::fs::create_dir_all(&script_dir).expect("script dir");
    std::fs::write(script_dir.join("vsock.py"), VSOCK_GUEST_SCRIPT).expect("script");
    let disk = scratch.path("script.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&script_dir)
        .arg(&disk)
        .arg("8M")
        .status()
        .expect("mkfs.ext4");
    assert!(mkfs.success());
    let console = scratch.path("console.log");
    let config = serde_json::json!({
        "version": 1,
        "machine": {"vcpus": 1, "memory_mib": 256},
        "boot": {
            "kernel": asset("HEARTH_TEST_KERNEL"),
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet -- mount -o ro /dev/vdb /mnt && python3 /mnt/vsock.py"
        },
        "drives": [
            {"id": "root", "path": asset("HEARTH_TEST_ROOTFS_DEBIAN"), "read_only": true, "root": true},
            {"id": "script", "path": disk, "read_only": true}
        ],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "serial": {"output": "file", "path": console},
    });
    let config_path = scratch.path("vm.json");
    std::fs::write(&config_path, config.to_string()).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth-vmm"))
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hearth-vmm");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    wait_for(
        "the guest's vsock listener",
        Duration::from_secs(180),
        || console_text().contains("guest-listening"),
    );
    let mut host = std::os::unix::net::UnixStream::connect(&uds).expect("connect vsock socket");
    host.write_all(b"CONNECT 5000\n").expect("CONNECT");
    let mut reader = BufReader::new(host.try_clone().expect("clone"));
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("OK line");
    host.write_all(b"ping-from-host\n").expect("send");
    let mut echoed = String::new();
    reader.read_to_string(&mut echoed).expect("echo");
    host_echo.join().expect("host echo thread");
    let status = run_to_exit(&mut child, Duration::from_secs(60));

    assert!(ok.starts_with("OK "), "{ok:?}");
    assert_eq!(echoed, "guest-echo:ping-from-host\n");
    assert!(
        console_text().contains("guest-to-host:host-echo:ping-from-guest"),
        "{}",
        console_text()
    );
    assert!(status.success());
}

fn run_to_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
fn test_boot_bzimage_with_initrd() {
    let scratch = Scratch::new("kvm-boot", "bzimage");
    let root = scratch.path("initrd-root");
    std::fs::create_dir_all(root.join("bin")).expect("initrd dirs");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (busybox-static)");
    let init = "#!/bin/busybox sh\n/bin/busybox echo initrd-userspace-$(/bin/busybox nproc)\n/bin/busybox reboot -f\n";
    std::fs::write(root.join("init"), init).expect("init");
    let chmod = Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let initrd = scratch.path("initrd.cpio");
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            initrd.display()
        ))
        .status()
        .expect("cpio");
    assert!(cpio.success());
    let console = scratch.path("console.log");
    let config = serde_json::json!({
        "version": 1,
        // The project's kernel as a bzImage; 2 vCPUs, so the MP table reaches it this way too.
        "machine": {"vcpus": 2, "memory_mib": 256},
        "boot": {
            "kernel": asset("HEARTH_TEST_BZIMAGE"),
            "initrd": initrd,
            "cmdline": "console=ttyS0 reboot=k panic=-1 quiet"
        },
        "serial": {"output": "file", "path": console},
    });
    let config_path = scratch.path("vm.json");
    std::fs::write(&config_path, config.to_string()).expect("config");

    let output = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_hearth-vmm"))
            .arg("--config")
            .arg(&config_path),
        Duration::from_secs(180),
    );

    let console = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(output.status.success(), "{output:?}\n{console}");
    assert!(console.contains("initrd-userspace-2"), "{console}");
}
