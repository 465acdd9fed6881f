//! `cargo xtask`: the developer and CI tasks of the Hearth workspace. Each task lives in the
//! module named for it; shared plumbing (paths, caching, running commands) is in `util`.
#![forbid(unsafe_code)]

mod deps;
mod kernel;
mod rootfs;
mod testbed;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Hearth developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the Debian packages the tasks need (as root), or say which are missing.
    Deps,
    /// Build the guest kernel (cached by content hash); prints its path last.
    GuestKernel,
    /// Build the test root filesystems (cached); prints one image path per line.
    Rootfs,
    /// Run a command where real KVM exists: directly, or inside the L1 test bed VM.
    Testbed(testbed::Args),
}

fn main() -> Result<()> {
    match Cli::parse().task {
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
    }
}
