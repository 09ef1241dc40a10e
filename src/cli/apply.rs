//! `ipsec-mesh apply`: one reconcile; exit 0 iff everything desired is in place.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use ipsec_mesh::dataplane::{firewall, routes, xfrm};
use ipsec_mesh::plan;

use super::{Driver, ForwardingArgs, PlanArgs, SourceArgs};

#[derive(Args, Debug)]
pub struct ApplyCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub plan: PlanArgs,

    #[command(flatten)]
    pub forwarding: ForwardingArgs,

    /// Dataplane driver.
    #[arg(long, value_enum)]
    pub driver: Driver,

    /// Print every change made (one line each).
    #[arg(long)]
    pub diff: bool,
}

/// Per-component outcome, printed as `  <name>: N writes`.
struct Part {
    name: &'static str,
    writes: usize,
    changes: Vec<String>,
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
            let mut errors: Vec<String> = Vec::new();
            let mut parts = Vec::new();

            // XFRM first: the block policy makes marked traffic fail closed before any
            // marking rule exists.
            let x = xfrm::reconcile(&p)?;
            errors.extend(x.errors.iter().map(|(o, e)| format!("{o}: {e}")));
            parts.push(Part {
                name: "xfrm objects",
                writes: x.writes,
                changes: x.changes,
            });

            let spec = firewall::FirewallSpec::from_plan(&p).with_devices(
                cmd.forwarding.bridge.clone(),
                cmd.forwarding.underlay_dev.clone(),
            );
            match firewall::apply(&spec) {
                Ok(r) => parts.push(Part {
                    name: "firewall",
                    writes: r.writes,
                    changes: r.changes,
                }),
                Err(e) => errors.push(format!("mesh: firewall: {}", super::one_line(&e.into()))),
            }

            let rspec = routes::RouteSpec::from_plan(&p, cmd.forwarding.route_config());
            match routes::reconcile(&rspec) {
                Ok(r) => parts.push(Part {
                    name: "routes",
                    writes: r.writes,
                    changes: r.changes,
                }),
                Err(e) => errors.push(format!("mesh: routes: {}", super::one_line(&e.into()))),
            }

            let total: usize = parts.iter().map(|p| p.writes).sum();
            for part in &parts {
                if cmd.diff {
                    for c in &part.changes {
                        println!("{c}");
                    }
                }
            }
            for e in &errors {
                eprintln!("ipsec-mesh: {e}");
            }
            println!(
                "xfrm: host {me}: {} peers, {total} writes, {} errors",
                p.peers.len(),
                errors.len()
            );
            for part in &parts {
                println!("  {}: {} writes", part.name, part.writes);
            }
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
