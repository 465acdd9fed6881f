//! `cargo xtask testbed -- <command>` (placeholder, being written).

use anyhow::Result;

/// Arguments of the testbed task.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The command to run, and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the command and returns its exit code.
pub fn run(_args: &Args) -> Result<i32> {
    anyhow::bail!("not written yet")
}
