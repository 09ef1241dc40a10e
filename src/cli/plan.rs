//! `ipsec-mesh plan`: print the desired mesh, change nothing.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use ipsec_mesh::plan::{self, KeyDeriver};
use ipsec_mesh::render;

use super::{Format, PlanArgs, SourceArgs};

#[derive(Args, Debug)]
pub struct PlanCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub plan: PlanArgs,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Plan every host of the metadata, not just this one (JSON: an array of plans).
    #[arg(long, conflicts_with = "host")]
    pub all: bool,
}

pub fn run(cmd: PlanCmd) -> Result<ExitCode> {
    let opts = cmd.plan.options()?;
    let psk = cmd.plan.psk()?;
    cmd.plan.check_rekey(psk.as_ref(), None)?;
    let snap = super::load(&cmd.source)?;
    let cluster = &snap.cluster;

    let selves: Vec<String> = if cmd.all {
        cluster.hosts.iter().map(|h| h.id.to_string()).collect()
    } else {
        vec![super::self_id(&cmd.source, &snap)?]
    };
    let ids = plan::mesh_ids(cluster);
    let keys = psk.as_ref().map(KeyDeriver::new);
    let plans = selves
        .iter()
        .map(|id| plan::plan_with(cluster, &ids, id, &opts, keys.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;

    let out = match cmd.format {
        Format::Json if cmd.all => serde_json::to_string_pretty(&plans)? + "\n",
        Format::Json => serde_json::to_string_pretty(&plans[0])? + "\n",
        Format::Table => plans
            .iter()
            .map(render::plan_table)
            .collect::<Vec<_>>()
            .join("\n"),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
