//! Command-line interface: one module per subcommand.

mod apply;
mod cleanup;
mod cni_config;
#[path = "metadata.rs"]
mod metadata_cmd;
mod plan;
mod run;
mod status;

use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use ipsec_mesh::dataplane::assemble::{DataplaneConfig, DriverKind};
use ipsec_mesh::metadata::{self, Snapshot};
use ipsec_mesh::plan::{Marks, PlanOptions, Transform};

#[derive(Parser, Debug)]
#[command(
    name = "ipsec-mesh",
    version,
    about = "IPsec mesh control plane for container hosts"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "debug" or "ipsec_mesh=trace".
    /// Default: $IPSEC_MESH_LOG, else "info".
    #[arg(long, global = true)]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the mesh this host should have (no changes to the system).
    Plan(plan::PlanCmd),
    /// Make the kernel match the plan once; exit 0 iff everything desired is in place.
    Apply(apply::ApplyCmd),
    /// Remove every object the driver owns, and nothing else.
    Cleanup(cleanup::CleanupCmd),
    /// The sidecar: watch the metadata and keep the dataplane matching it.
    Run(run::RunCmd),
    /// Show a running sidecar's status.
    Status(status::StatusCmd),
    /// Print a CNI network configuration for this host (ipsec-mesh-bridge + ipsec-mesh-ipam).
    CniConfig(cni_config::CniConfigCmd),
    /// Seed or inspect fleet metadata: push a file to etcd, show the hosts of any source.
    Metadata(metadata_cmd::MetadataCmd),
}

/// Dataplane drivers.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    /// Kernel XFRM policies and SAs, keys derived from the PSK (IKE-less).
    Xfrm,
    /// VXLAN device with static FDB/neighbour/route entries per peer (no encryption).
    Vxlan,
    /// strongSwan's charon over VICI: IKEv2 with the PSK, charon installs the SAs.
    Charon,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Where the metadata comes from and which host is "self".
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Metadata: a JSON file path, or a rancher-metadata base URL
    /// (http://169.254.169.250/2015-12-19).
    #[arg(long, value_name = "SRC")]
    pub metadata: String,

    /// This host's id in the metadata. Default: the host the metadata service says, else the
    /// host whose agent_ip is configured on a local interface.
    #[arg(long, value_name = "ID")]
    pub host: Option<String>,

    /// Largest metadata answer accepted from a metadata service, in MiB (answers are decoded
    /// as they arrive: memory follows the hosts and containers, not this limit).
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub metadata_max_mb: u64,

    /// TLS to an etcd:// source: --etcd-cacert, --etcd-cert, --etcd-key.
    #[command(flatten)]
    pub tls: metadata_cmd::EtcdTlsArgs,
}

/// Options that shape the plan beyond the metadata.
#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// File holding the pre-shared secret (mode 0600, at least 32 bytes).
    #[arg(long, value_name = "F")]
    pub psk_file: Option<std::path::PathBuf>,

    /// ESP transform: aes256gcm16, aes128gcm16, aes256-sha256 or aes128-sha256.
    #[arg(long, default_value = "aes256gcm16", value_parser = parse_transform)]
    pub transform: Transform,

    /// Encapsulate ESP in UDP (port 4500) on every pair.
    #[arg(long)]
    pub udp_encap: bool,

    /// Key generation (part of key derivation and SPIs; bump to rotate keys).
    #[arg(long, default_value_t = 1)]
    pub key_generation: u32,

    /// Maximum key age, seconds (xfrm drivers): the generation sent with advances every
    /// SECS from --key-generation (+ unix time / SECS); needs a plain PSK file, not a key ring.
    #[arg(long, value_name = "SECS")]
    pub rekey_every: Option<u64>,

    /// Anti-replay window of every SA, in packets: 32 to 4096, a multiple of 32 (ESN bitmap).
    #[arg(long, default_value_t = ipsec_mesh::plan::DEFAULT_REPLAY_WINDOW, value_parser = parse_replay_window)]
    pub replay_window: u32,

    /// Mark for traffic to encrypt (hex or decimal).
    #[arg(long, default_value = "0x100000", value_parser = parse_u32)]
    pub mark_encrypt: u32,

    /// Mark for traffic that arrived encrypted.
    #[arg(long, default_value = "0x200000", value_parser = parse_u32)]
    pub mark_decrypt: u32,

    /// The mark bits ipsec-mesh owns.
    #[arg(long, default_value = "0x300000", value_parser = parse_u32)]
    pub mark_mask: u32,
}

fn parse_replay_window(s: &str) -> std::result::Result<u32, String> {
    let max = ipsec_mesh::dataplane::xfrm::seq::MAX_REPLAY_WINDOW;
    match s.parse::<u32>() {
        Ok(n) if (32..=max).contains(&n) && n % 32 == 0 => Ok(n),
        _ => Err(format!(
            "{s:?}: the replay window is a number of packets from 32 to {max}, a multiple of 32"
        )),
    }
}

impl PlanArgs {
    pub fn options(&self) -> Result<PlanOptions> {
        let marks = Marks {
            encrypt: self.mark_encrypt,
            decrypt: self.mark_decrypt,
            mask: self.mark_mask,
        };
        marks.validate().map_err(|e| anyhow!("--mark-*: {e}"))?;
        let rekey = self.rekey(None, None)?;
        Ok(PlanOptions {
            transform: self.transform,
            udp_encap: self.udp_encap,
            generation: rekey.generation(self.key_generation, std::time::SystemTime::now()),
            marks,
            replay_window: self.replay_window,
            ahead: Default::default(),
        })
    }

    /// The rekey settings (`--rekey-every` here, the usage limits from `run`), checked.
    pub fn rekey(
        &self,
        bytes: Option<u64>,
        packets: Option<u64>,
    ) -> Result<ipsec_mesh::plan::rekey::Rekey> {
        let r = ipsec_mesh::plan::rekey::Rekey {
            every: self.rekey_every.map(std::time::Duration::from_secs),
            bytes,
            packets,
        };
        r.validate().map_err(|e| anyhow!(e))?;
        Ok(r)
    }

    /// Check the rekey settings against the PSK and driver: a key ring lists fixed
    /// generations, and charon rekeys its own SAs over IKE.
    pub fn check_rekey(
        &self,
        psk: Option<&ipsec_mesh::plan::Psk>,
        driver: Option<&DriverArgs>,
    ) -> Result<()> {
        let Some(p) = self.rekey_every else {
            return Ok(());
        };
        if psk.and_then(|k| k.generations()).is_some() {
            bail!(
                "--rekey-every {p}: the PSK file is a key ring (fixed generations); automatic \
                 rekeying needs a plain PSK file, which keys every generation"
            );
        }
        if driver.is_some_and(|d| matches!(d.driver, Driver::Charon)) {
            bail!(
                "--rekey-every {p}: with --driver charon, charon rekeys its SAs over IKE \
                 (rekey_time in its connection settings)"
            );
        }
        Ok(())
    }

    pub fn psk(&self) -> Result<Option<ipsec_mesh::plan::Psk>> {
        match &self.psk_file {
            None => Ok(None),
            Some(p) => Ok(Some(ipsec_mesh::plan::Psk::from_file(p)?)),
        }
    }
}

/// The driver and its settings.
#[derive(Args, Debug, Clone)]
pub struct DriverArgs {
    /// Dataplane driver.
    #[arg(long, value_enum)]
    pub driver: Driver,

    #[command(flatten)]
    pub forwarding: ForwardingArgs,

    #[command(flatten)]
    pub vxlan: VxlanArgs,

    #[command(flatten)]
    pub charon: CharonArgs,
}

impl DriverArgs {
    /// The dataplane these flags describe ([`DataplaneConfig::build`] makes the driver).
    pub fn config(&self, opts: &PlanOptions) -> Result<DataplaneConfig> {
        Ok(DataplaneConfig {
            driver: match self.driver {
                Driver::Xfrm => DriverKind::Xfrm,
                Driver::Vxlan => DriverKind::Vxlan,
                Driver::Charon => DriverKind::Charon,
            },
            marks: opts.marks,
            forwarding: ipsec_mesh::dataplane::driver::Forwarding {
                firewall: self.forwarding.firewall,
                bridge: self.forwarding.bridge.clone(),
                underlay_dev: self.forwarding.underlay_dev.clone(),
                routes: self.forwarding.route_config(),
                xfrm_mode: self.forwarding.xfrm_mode,
                route_devices: self.forwarding.xfrm_route_devices,
            },
            vxlan: self.vxlan.config()?,
            charon: self.charon.config(opts),
        })
    }

    /// Drivers that derive keys need the PSK.
    pub fn check_psk(&self, have: bool, opts: &PlanOptions) -> Result<()> {
        match self.config(opts)?.psk_needed() {
            Some(why) if !have => bail!("{why}"),
            _ => Ok(()),
        }
    }

    /// The driver.
    pub fn build(
        &self,
        opts: &PlanOptions,
        psk: Option<&ipsec_mesh::plan::Psk>,
    ) -> Result<Box<dyn ipsec_mesh::dataplane::driver::Driver>> {
        Ok(self.config(opts)?.build(psk)?)
    }
}

/// The charon driver's settings.
#[derive(Args, Debug, Clone)]
pub struct CharonArgs {
    /// charon's VICI socket (`charon.plugins.vici.socket`, without `unix://`).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/ipsec-mesh/charon.vici"
    )]
    pub vici_socket: std::path::PathBuf,

    /// IKE proposals for charon (comma-separated strongSwan keywords).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "aes256gcm16-prfsha256-ecp256"
    )]
    pub ike_proposals: String,

    /// ESP proposals for charon (comma-separated; default follows --transform).
    #[arg(long, value_name = "LIST")]
    pub esp_proposals: Option<String>,

    /// charon installs SAs only (`policies = no`, children with the plan's reqids);
    /// ipsec-mesh installs the XFRM policies, marks, guard and routes itself, as the xfrm
    /// driver does (fail closed while charon negotiates).
    #[arg(long)]
    pub no_charon_policies: bool,
}

impl CharonArgs {
    pub fn config(
        &self,
        opts: &PlanOptions,
    ) -> ipsec_mesh::dataplane::charon::desired::CharonConfig {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        };
        ipsec_mesh::dataplane::charon::desired::CharonConfig {
            vici_socket: self.vici_socket.clone(),
            ike_proposals: list(&self.ike_proposals),
            esp_proposals: list(
                self.esp_proposals
                    .as_deref()
                    .unwrap_or(opts.transform.name()),
            ),
            encap: opts.udp_encap,
            policies: !self.no_charon_policies,
            ..Default::default()
        }
    }
}

/// The VXLAN driver's device.
#[derive(Args, Debug, Clone)]
pub struct VxlanArgs {
    /// VXLAN device (owned by ipsec-mesh with --driver vxlan).
    #[arg(long, value_name = "DEV", default_value = ipsec_mesh::dataplane::vxlan::objects::DEFAULT_DEV)]
    pub vxlan_dev: String,

    /// VXLAN network identifier.
    #[arg(long, value_name = "VNI", default_value_t = ipsec_mesh::dataplane::vxlan::objects::DEFAULT_VNI)]
    pub vxlan_vni: u32,

    /// VXLAN UDP destination port.
    #[arg(long, value_name = "PORT", default_value_t = ipsec_mesh::dataplane::vxlan::objects::DEFAULT_PORT)]
    pub vxlan_port: u16,

    /// Encrypt VXLAN between hosts with ESP in transport mode (keys from --psk-file); VXLAN
    /// to a peer never leaves in clear, plaintext VXLAN from a peer is refused.
    #[arg(long)]
    pub vxlan_encrypt: bool,
}

impl VxlanArgs {
    pub fn config(&self) -> Result<ipsec_mesh::dataplane::vxlan::VxlanConfig> {
        let c = ipsec_mesh::dataplane::vxlan::VxlanConfig {
            dev: self.vxlan_dev.clone(),
            vni: self.vxlan_vni,
            port: self.vxlan_port,
            esp: self.vxlan_encrypt,
        };
        c.validate().map_err(|e| anyhow!("--vxlan-*: {e}"))?;
        Ok(c)
    }
}

/// How marked traffic is steered (firewall devices, route table and rule priority).
#[derive(Args, Debug, Clone)]
pub struct ForwardingArgs {
    /// Container bridge: mark traffic entering from it (default: from any interface).
    #[arg(long, value_name = "DEV")]
    pub bridge: Option<String>,

    /// Firewall backend for the marks and the fail-closed guard: auto (the default: nftables
    /// when iptables is the nf_tables variant or only nft exists, else iptables; the choice is
    /// logged and shown in status), iptables, nftables, or none (the operator manages the
    /// firewall; see README).
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = parse_firewall)]
    pub firewall: ipsec_mesh::dataplane::firewall::FirewallKind,

    /// Physical NIC: mark traffic entering from it too (with --bridge).
    #[arg(long, value_name = "DEV")]
    pub underlay_dev: Option<String>,

    /// Route table for marked traffic (owned by ipsec-mesh).
    #[arg(long, default_value_t = ipsec_mesh::dataplane::routes::DEFAULT_TABLE)]
    pub route_table: u32,

    /// Priority of the ip rule selecting that table by mark.
    #[arg(long, default_value_t = ipsec_mesh::dataplane::routes::DEFAULT_PRIORITY)]
    pub rule_priority: u32,

    /// xfrm driver: how a packet finds its peer. auto (the default): route when the kernel
    /// has XFRM interfaces, else policy (the choice is logged); policy: XFRM policies per
    /// remote prefix; route: one XFRM interface per peer with the remote prefixes routed into
    /// it, so the XFRM policies and SAs grow with the peers only (needs the kernel's
    /// xfrm_interface, CONFIG_XFRM_INTERFACE).
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = parse_xfrm_mode)]
    pub xfrm_mode: ipsec_mesh::dataplane::xfrmi::XfrmMode,

    /// xfrm route mode: one (a single XFRM interface in collect_md mode, the routes carrying
    /// each peer's interface id; Linux >= 6.0 and nft, whose table checks each decrypted
    /// packet's source against its SA's peer), per-peer (an interface per peer, any kernel
    /// with XFRM interfaces) or auto (the default: one where it can work, else per-peer; the
    /// choice is logged). Per packet the one interface costs the same at any number of
    /// peers; interfaces per peer cost the kernel a walk of ~peers/256 devices.
    #[arg(long, value_name = "DEVICES", default_value = "auto", value_parser = parse_route_devices)]
    pub xfrm_route_devices: ipsec_mesh::dataplane::xfrmi::RouteDevices,
}

impl ForwardingArgs {
    pub fn route_config(&self) -> ipsec_mesh::dataplane::routes::RouteConfig {
        ipsec_mesh::dataplane::routes::RouteConfig {
            table: self.route_table,
            priority: self.rule_priority,
        }
    }
}

fn parse_xfrm_mode(s: &str) -> Result<ipsec_mesh::dataplane::xfrmi::XfrmMode, String> {
    s.parse()
}

fn parse_route_devices(s: &str) -> Result<ipsec_mesh::dataplane::xfrmi::RouteDevices, String> {
    s.parse()
}

fn parse_firewall(s: &str) -> Result<ipsec_mesh::dataplane::firewall::FirewallKind, String> {
    s.parse()
}

fn parse_transform(s: &str) -> Result<Transform, String> {
    s.parse()
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x hex)"))
}

/// Print a driver's report: every change with `--diff`, every error on stderr.
pub fn print_report(report: &ipsec_mesh::dataplane::driver::DriverReport, diff: bool) {
    if diff {
        for c in &report.changes {
            println!("{c}");
        }
    }
    for f in &report.errors {
        eprintln!("ipsec-mesh: {f}");
    }
}

/// Exit 0 iff the report has no error.
pub fn exit_code(report: &ipsec_mesh::dataplane::driver::DriverReport) -> ExitCode {
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Load the metadata once.
pub fn load(src: &SourceArgs) -> Result<Snapshot> {
    src.tls.apply();
    let mut source = metadata::open_for(
        &src.metadata,
        src.host.as_deref(),
        src.metadata_max_mb << 20,
    )?;
    Ok(source.load()?)
}

/// Which host this is ([`metadata::self_host`]).
pub fn self_id(src: &SourceArgs, snap: &Snapshot) -> Result<String> {
    Ok(metadata::self_host(
        snap,
        &src.metadata,
        src.host.as_deref(),
        "pass --host ID",
    )?)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan(cmd) => plan::run(cmd),
        Command::Apply(cmd) => apply::run(cmd),
        Command::Cleanup(cmd) => cleanup::run(cmd),
        Command::Run(cmd) => run::run(cmd),
        Command::Status(cmd) => status::run(cmd),
        Command::CniConfig(cmd) => cni_config::run(cmd),
        Command::Metadata(cmd) => metadata_cmd::run(cmd),
    }
}

pub fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let spec = filter
        .map(str::to_string)
        .or_else(|| std::env::var("IPSEC_MESH_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    // Netlink crates log every message at debug; keep them quiet unless asked by name.
    let spec = format!("netlink_proto=warn,netlink_sys=warn,rtnetlink=warn,{spec}");
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The error and its causes on one line, without repeating a cause the message already
/// contains.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out.replace('\n', " ")
}
