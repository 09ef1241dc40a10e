//! `ipsec-mesh apply`: one reconcile; exit 0 iff everything desired is in place.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use ipsec_mesh::dataplane::xfrm;
use ipsec_mesh::plan;

use super::{Driver, PlanArgs, SourceArgs};

#[derive(Args, Debug)]
pub struct ApplyCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub plan: PlanArgs,

    /// Dataplane driver.
    #[arg(long, value_enum)]
    pub driver: Driver,

    /// Print every change made (one line each).
    #[arg(long)]
    pub diff: bool,
}

pub fn run(cmd: ApplyCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    let psk = cmd.plan.psk()?;
    let snap = super::load(&cmd.source)?;
    let me = super::self_id(&cmd.source, &snap)?;
    match cmd.driver {
        Driver::Xfrm => {
            if psk.is_none() {
                bail!("--driver xfrm needs --psk-file (the keys are derived from it)");
            }
            let p = plan::plan(&snap.cluster, &me, &opts, psk.as_ref())?;
            let report = xfrm::reconcile(&p)?;
            if cmd.diff {
                for c in &report.changes {
                    println!("{c}");
                }
            }
            for (owner, e) in &report.errors {
                eprintln!("ipsec-mesh: {owner}: {e}");
            }
            println!(
                "xfrm: host {me}: {} peers, {} writes, {} errors",
                p.peers.len(),
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
