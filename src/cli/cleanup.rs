//! `ipsec-mesh cleanup`: remove everything the driver owns, nothing else. Idempotent, and
//! keeps going when one part fails.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use ipsec_mesh::dataplane::{firewall, routes, xfrm};

use super::{Driver, ForwardingArgs, PlanArgs};

#[derive(Args, Debug)]
pub struct CleanupCmd {
    /// Dataplane driver.
    #[arg(long, value_enum)]
    pub driver: Driver,

    /// Mark settings (they identify the block policy as ours).
    #[command(flatten)]
    pub plan: PlanArgs,

    #[command(flatten)]
    pub forwarding: ForwardingArgs,

    /// Print every object removed.
    #[arg(long)]
    pub diff: bool,
}

pub fn run(cmd: CleanupCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    match cmd.driver {
        Driver::Xfrm => {
            let mut removed = 0;
            let mut changes = Vec::new();
            let mut errors = Vec::new();
            // Reverse of apply: stop steering first, then remove the policies and SAs.
            match routes::cleanup(&cmd.forwarding.route_config()) {
                Ok(r) => {
                    removed += r.writes;
                    changes.extend(r.changes);
                }
                Err(e) => errors.push(format!("routes: {}", super::one_line(&e.into()))),
            }
            match firewall::cleanup() {
                Ok(r) => {
                    removed += r.writes;
                    changes.extend(r.changes);
                }
                Err(e) => errors.push(format!("firewall: {}", super::one_line(&e.into()))),
            }
            match xfrm::cleanup(&opts.marks) {
                Ok(r) => {
                    removed += r.writes;
                    changes.extend(r.changes);
                    errors.extend(r.errors.iter().map(|(o, e)| format!("{o}: {e}")));
                }
                Err(e) => errors.push(format!("xfrm: {}", super::one_line(&e.into()))),
            }
            if cmd.diff {
                for c in &changes {
                    println!("{c}");
                }
            }
            for e in &errors {
                eprintln!("ipsec-mesh: {e}");
            }
            println!("xfrm cleanup: {removed} removed, {} errors", errors.len());
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
