//! `cargo xtask bench <suite>`: benchmarks that print Hearth's figures, beside QEMU's where
//! QEMU has a counterpart, measured in the same run on the same kernel and root filesystem,
//! where real KVM is (the test bed otherwise). Each figure is one line:
//! `<figure> hearth=<value> [qemu=<value> ratio=<hearth/qemu>] unit=<unit>`.
//!
//! `boot` (boot.rs): boot to userspace and the VMM's RSS overhead against QEMU `-M microvm`.
//! `agent` (agent.rs): exec round trip and stdout throughput through `hearth-agent`.
//! `snapshot` (snapshot.rs): restore to running and to the agent, suspend of a 2 GiB VM and
//! the memory of 10 clones, against QEMU's migration to and from a file.

mod agent;
mod boot;
mod snapshot;

pub use agent::agent_in_kvm;
pub use boot::boot_in_kvm;
pub use snapshot::snapshot_in_kvm;

use anyhow::Result;

use crate::test::TestAssets;
use crate::{deps, testbed};

/// The benchmark suites.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// Boot to userspace and VMM memory overhead, against QEMU.
    Boot,
    /// Exec round trip and stdout throughput through the guest agent.
    Agent,
    /// Restore, suspend and clone memory, against QEMU's migration to and from a file.
    Snapshot,
}

/// The host side: build the release VMM and the assets, then run the suite where KVM is.
pub fn run(suite: Suite) -> Result<()> {
    deps::ensure()?;
    let assets = TestAssets::build()?;
    match suite {
        Suite::Boot => testbed::run_xtask(
            "bench-boot-in-kvm",
            &[&assets.vmm, &assets.kernel, &assets.busybox],
        ),
        Suite::Agent => testbed::run_xtask(
            "bench-agent-in-kvm",
            &[
                &assets.vmm,
                &assets.kernel,
                &assets.agent_initrd,
                &assets.debian,
            ],
        ),
        Suite::Snapshot => testbed::run_xtask(
            "bench-snapshot-in-kvm",
            &[
                &assets.vmm,
                &assets.kernel,
                &assets.agent_initrd,
                &assets.debian,
            ],
        ),
    }
}

/// The median of `values` (the upper one of the middle two for an even count).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Prints one figure line; `qemu` is `None` where QEMU has no counterpart.
fn print_figure(name: &str, hearth: f64, qemu: Option<f64>, unit: &str) {
    match qemu {
        Some(qemu) => println!(
            "{name} hearth={hearth:.1} qemu={qemu:.1} ratio={:.2} unit={unit}",
            hearth / qemu
        ),
        None => println!("{name} hearth={hearth:.1} unit={unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_median_of_odd_count_is_middle() {
        let m = median([5.0, 1.0, 3.0].into_iter());

        assert_eq!(m, 3.0);
    }

    #[test]
    fn test_median_of_nothing_is_nan() {
        let m = median(std::iter::empty());

        assert!(m.is_nan());
    }
}
