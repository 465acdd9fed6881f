//! What the test bed promises the suites that run in it (`docs/TESTBED.md`): real KVM,
//! `/dev/net/tun`, nftables, cgroup v2, and the workspace at the same path. Run by
//! `cargo xtask test` inside the test bed (or directly on a host with hardware KVM).

use std::process::Command;

fn sh(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "needs the test bed: `cargo xtask test` runs it there"]
fn test_testbed_has_hardware_kvm() {
    let kind = vmm::kvm_host::KvmKind::detect();

    assert!(kind.is_hardware(), "KVM here is {kind:?}");
    assert!(std::fs::metadata("/dev/kvm").is_ok());
}

#[test]
#[ignore = "needs the test bed: `cargo xtask test` runs it there"]
fn test_testbed_tun_device_opens() {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");

    assert!(tun.is_ok(), "{tun:?}");
}

#[test]
#[ignore = "needs the test bed: `cargo xtask test` runs it there"]
fn test_testbed_nftables_table_can_be_created() {
    let (ok, out) = sh(
        "nft add table inet hearth_probe && nft list tables && nft delete table inet hearth_probe",
    );

    assert!(ok, "{out}");
    assert!(out.contains("hearth_probe"), "{out}");
}

#[test]
#[ignore = "needs the test bed: `cargo xtask test` runs it there"]
fn test_testbed_cgroup2_has_controllers() {
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").expect("cgroup2");

    for c in ["cpu", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "{controllers}"
        );
    }
}

#[test]
#[ignore = "needs the test bed: `cargo xtask test` runs it there"]
fn test_testbed_workspace_resolves_at_same_path() {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");

    assert!(manifest.exists(), "{}", manifest.display());
}
