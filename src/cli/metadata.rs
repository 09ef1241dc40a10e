//! `ipsec-mesh metadata`: seed or inspect the fleet metadata.
//!
//! - `metadata push --metadata FILE --to etcd://...`: validate a metadata file and write it
//!   in the etcd layout (`PREFIX/network`, one `PREFIX/hosts/<id>` per host); `--prune` also
//!   deletes the host records under the prefix that the file does not list.
//! - `metadata show --metadata SRC [--format table|json]`: the hosts of any source (file,
//!   rancher-metadata, etcd); for etcd also the records left out and why.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use ipsec_mesh::metadata::etcd::{self, b64_encode, Client, EtcdSource, EtcdUrl, Skipped};
use ipsec_mesh::metadata::{self, json as mjson};
use ipsec_mesh::model::{Cluster, RawCluster};

use super::Format;

/// Puts per transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 128;

#[derive(Args, Debug)]
pub struct MetadataCmd {
    #[command(subcommand)]
    pub command: MetadataSub,
}

#[derive(Subcommand, Debug)]
pub enum MetadataSub {
    /// Write a metadata file to etcd (PREFIX/network, PREFIX/hosts/<id>).
    Push(PushCmd),
    /// Show the hosts of a metadata source (file, rancher-metadata URL or etcd:// URL).
    Show(ShowCmd),
}

#[derive(Args, Debug)]
pub struct PushCmd {
    /// The metadata file to push (the native JSON format; validated first).
    #[arg(long, value_name = "FILE")]
    pub metadata: std::path::PathBuf,

    /// Where: etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
    #[arg(long, value_name = "URL")]
    pub to: String,

    /// Also delete the host records under the prefix that the file does not list.
    #[arg(long)]
    pub prune: bool,

    #[command(flatten)]
    pub tls: EtcdTlsArgs,
}

#[derive(Args, Debug)]
pub struct ShowCmd {
    /// Metadata: a JSON file path, a rancher-metadata base URL or an etcd:// URL.
    #[arg(long, value_name = "SRC")]
    pub metadata: String,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    #[command(flatten)]
    pub tls: EtcdTlsArgs,
}

/// TLS to etcd, as etcd's own clients take it: on `plan`, `apply`, `run`, `cni-config` (in
/// [`super::SourceArgs`]) and `metadata push/show`. Without these flags the files named by
/// $IPSEC_MESH_ETCD_CACERT, $IPSEC_MESH_ETCD_CERT and $IPSEC_MESH_ETCD_KEY are used (also
/// how the CNI plugins, started by the runtime, get them); with none, etcd is spoken to over
/// http.
#[derive(Args, Debug, Clone, Default)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) that signed the etcd members' certificates: etcd over https.
    #[arg(long, value_name = "FILE")]
    pub etcd_cacert: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for etcd's --client-cert-auth (mutual TLS), with --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
}

impl EtcdTlsArgs {
    /// Every etcd source opened from now on uses these files (if any flag was given).
    pub fn apply(&self) {
        let t = etcd::TlsFiles {
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        };
        if !t.is_empty() {
            etcd::set_default_tls(t);
        }
    }
}

pub fn run(cmd: MetadataCmd) -> Result<ExitCode> {
    match cmd.command {
        MetadataSub::Push(c) => push(c),
        MetadataSub::Show(c) => show(c),
    }
}

/// The file's document, validated (nothing invalid is pushed).
fn read_file(path: &std::path::Path) -> Result<RawCluster> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    // The file source's own parser gives the same errors `plan --metadata FILE` does.
    metadata::file::parse(path, &bytes)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    mjson::from_str(text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn put_op(key: &str, value: &[u8]) -> Value {
    json!({ "request_put": { "key": b64_encode(key.as_bytes()), "value": b64_encode(value) } })
}

fn delete_op(key: &str) -> Value {
    json!({ "request_delete_range": { "key": b64_encode(key.as_bytes()) } })
}

fn push(cmd: PushCmd) -> Result<ExitCode> {
    cmd.tls.apply();
    let raw = read_file(&cmd.metadata)?;
    let url = EtcdUrl::parse(&cmd.to).map_err(|e| anyhow!("--to {}: {e}", cmd.to))?;
    let client = Client::new(url.clone())?;
    let origin = url.origin();
    let kv = etcd::layout_of(&url, &raw);

    let mut stale = Vec::new();
    if cmd.prune {
        let (entries, _) = client
            .list(&url.hosts_dir(), 1 << 30)
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        let wanted: BTreeSet<&String> = kv.keys().collect();
        stale = entries
            .into_iter()
            .map(|e| e.key)
            .filter(|k| !wanted.contains(k))
            .collect();
    }

    // The network first (hosts are validated against it), then the hosts, in transactions.
    let network_key = url.network_key();
    let mut ops: Vec<Value> = vec![put_op(&network_key, &kv[&network_key])];
    ops.extend(
        kv.iter()
            .filter(|(k, _)| **k != network_key)
            .map(|(k, v)| put_op(k, v)),
    );
    ops.extend(stale.iter().map(|k| delete_op(k)));
    let mut revision = 0;
    for chunk in ops.chunks(TXN_OPS) {
        let r = client
            .txn(&json!({ "success": chunk }))
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        if !r.succeeded {
            bail!("{origin}: the transaction was not applied");
        }
        revision = r.header.revision;
    }
    println!(
        "pushed the network and {} hosts to {origin}{} (revision {revision})",
        raw.hosts.len(),
        if stale.is_empty() {
            String::new()
        } else {
            format!(", deleted {} host records not in the file", stale.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// A host as `show` prints it.
fn host_json(h: &ipsec_mesh::model::Host) -> Value {
    let mut v = json!({
        "id": h.id.as_str(),
        "agent_ip": h.agent_ip.to_string(),
        "subnets": h.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    });
    if let Some(n) = &h.name {
        v["name"] = json!(n);
    }
    if !h.labels.is_empty() {
        v["labels"] = json!(h.labels);
    }
    if let Some(t) = h.vtep {
        v["vtep"] = json!(t.to_string());
    }
    v
}

fn show(cmd: ShowCmd) -> Result<ExitCode> {
    cmd.tls.apply();
    let (cluster, version, skipped): (Cluster, String, Vec<(String, Skipped)>) =
        if cmd.metadata.starts_with("etcd://") {
            let src = EtcdSource::new(&cmd.metadata)?;
            let loaded = src.read()?;
            let url = &src.client().url;
            let skipped = loaded
                .skipped
                .into_iter()
                .map(|s| (url.key_origin(&s.key), s))
                .collect();
            (loaded.cluster, loaded.revision.to_string(), skipped)
        } else {
            let mut src = metadata::open(&cmd.metadata)?;
            let snap = src.load()?;
            (snap.cluster, snap.version, Vec::new())
        };
    match cmd.format {
        Format::Json => {
            let doc = json!({
                "source": cmd.metadata,
                "version": version,
                "network": {
                    "cidr": cluster.network.cidr_json(),
                    "backend": cluster.network.backend.as_str(),
                    "mtu": cluster.network.mtu,
                },
                "hosts": cluster.hosts.iter().map(host_json).collect::<Vec<_>>(),
                "skipped": skipped.iter().map(|(origin, s)| json!({
                    "key": s.key, "record": origin, "error": s.error,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Format::Table => print!("{}", table(&cmd.metadata, &cluster, &version, &skipped)),
    }
    Ok(ExitCode::SUCCESS)
}

fn table(src: &str, c: &Cluster, version: &str, skipped: &[(String, Skipped)]) -> String {
    let mut out = format!(
        "{src}  version {version}  network {} backend {} mtu {}  {} hosts\n",
        c.network,
        c.network.backend,
        c.network.mtu,
        c.hosts.len()
    );
    let rows: Vec<[String; 5]> = c
        .hosts
        .iter()
        .map(|h| {
            [
                h.id.to_string(),
                h.agent_ip.to_string(),
                h.subnets
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                h.vtep.map_or("-".to_string(), |v| v.to_string()),
                h.name.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    let head = ["ID", "AGENT_IP", "SUBNETS", "VTEP", "NAME"].map(String::from);
    let mut width = [0usize; 5];
    for r in std::iter::once(&head).chain(rows.iter()) {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    for r in std::iter::once(&head).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for (origin, s) in skipped {
        out.push_str(&format!("left out: {origin}: {}\n", s.error));
    }
    out
}

/// `run`'s etcd options: TLS, and `--register` (this host writes its own record).
#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    /// Register this host in the etcd metadata (with --metadata etcd://..., --host, --agent-ip
    /// and --subnet): its record PREFIX/hosts/<host> is kept under a lease; when this sidecar
    /// is gone longer than --register-ttl, the record expires and peers remove the host.
    #[arg(long, requires_all = ["agent_ip", "subnet", "host"])]
    pub register: bool,

    /// This host's underlay address (the record's agent_ip), with --register.
    #[arg(long, value_name = "IP", requires = "register")]
    pub agent_ip: Option<std::net::IpAddr>,

    /// A container subnet of this host (repeatable), with --register; `auto` allocates a free
    /// subnet from the network cidr, one per family on a dual-stack network (by transaction:
    /// never one another host holds), and keeps it across restarts of the same --host.
    #[arg(long = "subnet", value_name = "CIDR|auto", requires = "register")]
    pub subnet: Vec<String>,

    /// Lease TTL of the registered record, seconds.
    #[arg(long, value_name = "SECS", default_value_t = etcd::DEFAULT_REGISTER_TTL, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    pub register_ttl: i64,

    /// Prefix length of a `--subnet auto` allocation (on a dual-stack network: of its IPv4
    /// one) [default: 24 from an IPv4 network cidr, 64 from an IPv6 one].
    #[arg(long, value_name = "LEN", value_parser = clap::value_parser!(u8).range(1..=128))]
    pub auto_subnet_len: Option<u8>,

    /// How long a `--subnet auto` allocation outlives this host, seconds: its guard key has
    /// a lease of its own, kept alive with the record's (at least --register-ttl). A host
    /// gone longer loses the subnet to the next newcomer; back sooner, it keeps it.
    #[arg(long, value_name = "SECS", default_value_t = etcd::DEFAULT_AUTO_SUBNET_GRACE, value_parser = clap::value_parser!(i64).range(1..=90 * 86_400))]
    pub auto_subnet_grace: i64,
}

/// Apply the etcd TLS flags (in [`super::SourceArgs`]), then start `--register`: the first
/// registration now (its errors that can never go away, like no free subnet, stop `run`),
/// then a thread that keeps the lease alive.
pub fn start_registration(src: &super::SourceArgs, r: &RegisterArgs) -> Result<()> {
    src.tls.apply();
    if !r.register {
        return Ok(());
    }
    if !src.metadata.starts_with("etcd://") {
        bail!(
            "--register: the metadata must be an etcd:// URL (not {:?})",
            src.metadata
        );
    }
    let host = src
        .host
        .clone()
        .ok_or_else(|| anyhow!("--register: needs --host ID"))?;
    let agent_ip = r
        .agent_ip
        .ok_or_else(|| anyhow!("--register: needs --agent-ip IP"))?;
    let mut subnets = Vec::new();
    for s in &r.subnet {
        if s == "auto" {
            subnets.push(etcd::SubnetSpec::Auto(r.auto_subnet_len));
        } else {
            let n = ipsec_mesh::model::parse_prefix(s).map_err(|e| anyhow!("--subnet: {e}"))?;
            subnets.push(etcd::SubnetSpec::Fixed(n));
        }
    }
    if subnets.is_empty() {
        bail!("--register: needs at least one --subnet CIDR|auto");
    }
    let url = EtcdUrl::parse(&src.metadata).map_err(|e| anyhow!("{}: {e}", src.metadata))?;
    let mut reg = etcd::Registrar::new(
        Client::new(url)?,
        etcd::Registration {
            host,
            agent_ip,
            subnets,
            ttl: r.register_ttl,
            guard_ttl: r.auto_subnet_grace.max(r.register_ttl),
        },
    );
    match reg.register() {
        Ok(_) => {}
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "--register: etcd unreachable; registering in the background")
        }
        Err(e) => return Err(e.into()),
    }
    reg.spawn()
        .map_err(|e| anyhow!("--register: cannot start the keep-alive thread: {e}"))?;
    Ok(())
}
