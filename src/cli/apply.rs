//! `ipsec-mesh apply`: one reconcile; exit 0 iff everything desired is in place.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use ipsec_mesh::plan;

use super::{DriverArgs, PlanArgs, SourceArgs};

#[derive(Args, Debug)]
pub struct ApplyCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub plan: PlanArgs,

    #[command(flatten)]
    pub driver: DriverArgs,

    /// Print every change made (one line each).
    #[arg(long)]
    pub diff: bool,
}

pub fn run(cmd: ApplyCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    let psk = cmd.plan.psk()?;
    cmd.plan.check_rekey(psk.as_ref(), Some(&cmd.driver))?;
    cmd.driver.check_psk(psk.is_some(), &opts)?;
    let snap = super::load(&cmd.source)?;
    let me = super::self_id(&cmd.source, &snap)?;
    let p = plan::plan(&snap.cluster, &me, &opts, psk.as_ref())?;
    let dataplane = cmd.driver.config(&opts)?;
    let mut driver = dataplane.build(psk.as_ref())?;
    let report = driver.reconcile(&p);
    for w in dataplane.one_shot_warnings(&p) {
        eprintln!("ipsec-mesh: warning: {w}");
    }
    super::print_report(&report, cmd.diff);
    println!(
        "{}: host {me}: {} peers, {} writes, {} errors",
        driver.name(),
        p.peers.len(),
        report.writes,
        report.errors.len()
    );
    for (part, writes) in &report.parts {
        println!("  {part}: {writes} writes");
    }
    Ok(super::exit_code(&report))
}
