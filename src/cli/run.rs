//! `ipsec-mesh run`: the sidecar.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use ipsec_mesh::daemon::{self, server};

use super::{DriverArgs, PlanArgs, SourceArgs};

#[derive(Args, Debug)]
pub struct RunCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub plan: PlanArgs,

    #[command(flatten)]
    pub driver: DriverArgs,

    /// Seconds between full resyncs. Changes to the XFRM, route, rule and VXLAN objects
    /// are repaired at once (kernel notifications); this is the safety net, and the repair
    /// of iptables changes (which notify nothing).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub resync: u64,

    /// Status and metrics listener: host:port, or unix:/path. "none" disables it.
    #[arg(long, default_value = server::DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,

    /// Usage-limit rekey (with --rekey-every): once the outbound SA to a peer carried this
    /// many bytes, that direction moves one key generation ahead (docs/keying.md).
    #[arg(long, value_name = "N")]
    pub rekey_bytes: Option<u64>,

    /// Usage-limit rekey by packets (with --rekey-every), like --rekey-bytes.
    #[arg(long, value_name = "N")]
    pub rekey_packets: Option<u64>,

    /// Remove everything owned when stopping (default: the dataplane stays).
    #[arg(long)]
    pub cleanup_on_exit: bool,

    #[command(flatten)]
    pub register: super::metadata_cmd::RegisterArgs,
}

pub fn run(cmd: RunCmd) -> Result<ExitCode> {
    if cmd.resync == 0 {
        bail!("--resync: must be at least 1 second");
    }
    let opts = cmd.plan.options()?;
    let rekey = cmd.plan.rekey(cmd.rekey_bytes, cmd.rekey_packets)?;
    let psk = cmd.plan.psk()?;
    cmd.plan.check_rekey(psk.as_ref(), Some(&cmd.driver))?;
    cmd.driver.check_psk(psk.is_some(), &opts)?;
    let driver = cmd.driver.build(&opts, psk.as_ref())?;
    super::metadata_cmd::start_registration(&cmd.source, &cmd.register)?;
    let cfg = daemon::DaemonConfig {
        source: cmd.source.metadata.clone(),
        host: cmd.source.host.clone(),
        metadata_max_bytes: cmd.source.metadata_max_mb << 20,
        resync: Duration::from_secs(cmd.resync),
        listen: (cmd.listen != "none").then(|| server::Listen::parse(&cmd.listen)),
        cleanup_on_exit: cmd.cleanup_on_exit,
        base_generation: cmd.plan.key_generation,
        plan: opts,
        rekey,
        psk,
    };
    daemon::run(cfg, driver)?;
    Ok(ExitCode::SUCCESS)
}
