//! `cargo xtask`: the command line of the developer and CI tasks in the `xtask` library.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{bench, demo, deps, kernel, rootfs, test, testbed};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Hearth developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run a benchmark suite, Hearth beside QEMU, where real KVM is.
    Bench {
        #[arg(value_enum)]
        suite: bench::Suite,
    },
    /// The part of the boot benchmark that needs KVM (run in the test bed).
    #[command(hide = true)]
    BenchBootInKvm {
        vmm: PathBuf,
        kernel: PathBuf,
        rootfs: PathBuf,
    },
    /// The part of the agent benchmark that needs KVM (run in the test bed).
    #[command(hide = true)]
    BenchAgentInKvm {
        vmm: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        rootfs: PathBuf,
    },
    /// The part of the snapshot benchmark that needs KVM (run in the test bed).
    #[command(hide = true)]
    BenchSnapshotInKvm {
        vmm: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        rootfs: PathBuf,
    },
    /// Demonstrate the engine: boot, python3 through the agent, snapshot, 3 clones, suspend
    /// and resume, with each step's time.
    Demo,
    /// The part of the demo that needs KVM (the demo runs it in the test bed).
    #[command(hide = true)]
    DemoInKvm {
        vmm: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        rootfs: PathBuf,
    },
    /// Install the Debian packages the tasks need (as root), or say which are missing.
    Deps,
    /// Build the guest kernel (cached by content hash); prints its path last.
    GuestKernel,
    /// Build the test root filesystems (cached); prints one image path per line.
    Rootfs,
    /// Run a command where real KVM exists: directly, or inside the L1 test bed VM.
    Testbed(testbed::Args),
    /// Run every check and test: format, lints, unit tests, and the KVM suites in the test bed.
    Test {
        /// Run only this KVM suite (e.g. `kvm_snapshot`), without the checks and unit tests.
        #[arg(long)]
        kvm: Option<String>,
        /// With `--kvm`: arguments for the suite's test binary (a test name filter).
        #[arg(last = true, requires = "kvm")]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Bench { suite } => bench::run(suite),
        Task::BenchBootInKvm {
            vmm,
            kernel,
            rootfs,
        } => bench::boot_in_kvm(&vmm, &kernel, &rootfs),
        Task::BenchAgentInKvm {
            vmm,
            kernel,
            initrd,
            rootfs,
        } => bench::agent_in_kvm(&vmm, &kernel, &initrd, &rootfs),
        Task::BenchSnapshotInKvm {
            vmm,
            kernel,
            initrd,
            rootfs,
        } => bench::snapshot_in_kvm(&vmm, &kernel, &initrd, &rootfs),
        Task::Demo => demo::run(),
        Task::DemoInKvm {
            vmm,
            kernel,
            initrd,
            rootfs,
        } => demo::run_in_kvm(&vmm, &kernel, &initrd, &rootfs),
        Task::Deps => deps::ensure(),
        Task::GuestKernel => {
            let path = kernel::build()?;
            println!("{}", path.display());
            Ok(())
        }
        Task::Rootfs => {
            for path in rootfs::build_all()? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Task::Testbed(args) => {
            let code = testbed::run(&args)?;
            std::process::exit(code);
        }
        Task::Test { kvm: None, .. } => test::run(),
        Task::Test {
            kvm: Some(suite),
            args,
        } => test::run_kvm_suite(&suite, &args),
    }
}
