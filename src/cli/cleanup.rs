//! `ipsec-mesh cleanup`: remove everything the driver owns, nothing else. Idempotent, and
//! keeps going when one part fails.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{DriverArgs, PlanArgs};

#[derive(Args, Debug)]
pub struct CleanupCmd {
    /// Mark settings (they identify the block policy as ours).
    #[command(flatten)]
    pub plan: PlanArgs,

    #[command(flatten)]
    pub driver: DriverArgs,

    /// Print every object removed.
    #[arg(long)]
    pub diff: bool,
}

pub fn run(cmd: CleanupCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    let mut driver = cmd.driver.build(&opts, None)?;
    let report = driver.cleanup();
    super::print_report(&report, cmd.diff);
    println!(
        "{} cleanup: {} removed, {} errors",
        driver.name(),
        report.writes,
        report.errors.len()
    );
    Ok(super::exit_code(&report))
}
