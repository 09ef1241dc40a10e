//! `ipsec-mesh cleanup`: remove everything the driver owns, nothing else. Idempotent.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use ipsec_mesh::dataplane::xfrm;

use super::{Driver, PlanArgs};

#[derive(Args, Debug)]
pub struct CleanupCmd {
    /// Dataplane driver.
    #[arg(long, value_enum)]
    pub driver: Driver,

    /// Mark settings (they identify the block policy as ours).
    #[command(flatten)]
    pub plan: PlanArgs,

    /// Print every object removed.
    #[arg(long)]
    pub diff: bool,
}

pub fn run(cmd: CleanupCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    match cmd.driver {
        Driver::Xfrm => {
            let report = xfrm::cleanup(&opts.marks)?;
            if cmd.diff {
                for c in &report.changes {
                    println!("{c}");
                }
            }
            for (owner, e) in &report.errors {
                eprintln!("ipsec-mesh: {owner}: {e}");
            }
            println!(
                "xfrm cleanup: {} removed, {} errors",
                report.writes,
                report.errors.len()
            );
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
