//! `ipsec-mesh cni-config`: print a ready CNI network configuration for this host.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};

use ipsec_mesh::cni::generate::{self, Options};
use ipsec_mesh::plan::{self, PlanOptions, Transform};

use super::SourceArgs;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConfFormat {
    /// A .conflist: `plugins` holding the bridge plugin.
    Conflist,
    /// A single-plugin .conf.
    Conf,
}

#[derive(Args, Debug)]
pub struct CniConfigCmd {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Bridge device the containers attach to.
    #[arg(long, value_name = "NAME", default_value = ipsec_mesh::cni::config::DEFAULT_BRIDGE)]
    pub bridge: String,

    /// Network name.
    #[arg(long, value_name = "NET", default_value = "ipsec-mesh")]
    pub name: String,

    /// ESP transform the MTU is planned for.
    #[arg(long, default_value = "aes256gcm16", value_parser = parse_transform)]
    pub transform: Transform,

    /// Plan the MTU for ESP-in-UDP.
    #[arg(long)]
    pub udp_encap: bool,

    /// IPAM allocation store (default: the plugin's, /var/lib/cni/networks/ipsec-mesh).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,

    /// Output shape.
    #[arg(long, value_enum, default_value_t = ConfFormat::Conflist)]
    pub format: ConfFormat,

    /// Leave out the reference `portmap` plugin (published ports: `podman run -p`), which a
    /// conflist chains by default.
    #[arg(long)]
    pub no_portmap: bool,

    /// Do not masquerade container traffic to destinations outside the mesh (`ipMasq`);
    /// mesh traffic is never masqueraded.
    #[arg(long)]
    pub no_masquerade: bool,
}

fn parse_transform(s: &str) -> Result<Transform, String> {
    s.parse()
}

pub fn run(cmd: CniConfigCmd) -> Result<ExitCode> {
    ipsec_mesh::cni::config::check_ifname("--bridge", &cmd.bridge).map_err(anyhow::Error::msg)?;
    if let Some(d) = &cmd.data_dir {
        anyhow::ensure!(
            d.starts_with('/'),
            "--data-dir {d:?} must be an absolute path"
        );
    }
    let snap = super::load(&cmd.source)?;
    // The plugins find this host the same way; it is written down only when given.
    let me = super::self_id(&cmd.source, &snap)?;
    let opts = PlanOptions {
        transform: cmd.transform,
        udp_encap: cmd.udp_encap,
        ..PlanOptions::default()
    };
    let p = plan::plan(&snap.cluster, &me, &opts, None)?;
    anyhow::ensure!(
        !p.subnets.is_empty(),
        "host {me:?} has no container subnet in {}: the IPAM plugin would have nothing to hand out",
        cmd.source.metadata
    );
    // The runtime runs the plugins from another directory: a file path must be absolute.
    let metadata = if cmd.source.metadata.contains("://") {
        cmd.source.metadata.clone()
    } else {
        std::fs::canonicalize(&cmd.source.metadata)?
            .to_string_lossy()
            .into_owned()
    };
    let doc = generate::config(&Options {
        name: cmd.name,
        bridge: cmd.bridge,
        metadata,
        host: cmd.source.host.clone(),
        mtu: p.mtu,
        data_dir: cmd.data_dir,
        conflist: cmd.format == ConfFormat::Conflist,
        portmap: !cmd.no_portmap,
        masquerade: !cmd.no_masquerade,
        subnets: p.subnets.clone(),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(ExitCode::SUCCESS)
}
