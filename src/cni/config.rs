//! What a plugin is given: the `CNI_*` environment ([`Env`]) and the network configuration
//! on stdin ([`NetConf`], and the plugin sections [`BridgeConf`] and [`IpamConf`]).
//!
//! Every error names the variable or the configuration key (`ipam.dataDir: ...`), so a typo
//! in a config file is one read away from being fixed. Keys a plugin does not know are
//! ignored, as CNI runtimes add their own (`runtimeConfig`, `args`, `prevResult`, ...).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::spec::{self, code, CniError, Route};
use crate::metadata::json;

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Path of the container's network namespace (may be empty on DEL).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K2=V2`.
    pub args: BTreeMap<String, String>,
    /// `CNI_ARGS` as given (passed on to a delegated IPAM plugin).
    pub args_raw: String,
    /// `CNI_PATH`: where plugin binaries are.
    pub path: Vec<PathBuf>,
}

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

impl Env {
    /// Read and check the environment for the command (`get` is `std::env::var`, or a map in
    /// tests). ADD and CHECK need a container id, a netns and an interface name; DEL needs
    /// the container id and interface name; GC, STATUS and VERSION need nothing more.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).unwrap_or_default();
        let cmd = var("CNI_COMMAND");
        let command = match Command::parse(&cmd) {
            Some(c) => c,
            None if cmd.is_empty() => {
                return Err(CniError::env(
                    "CNI_COMMAND is not set (ADD, DEL, CHECK, GC, STATUS or VERSION)",
                ))
            }
            None => {
                return Err(CniError::env(format!(
                    "CNI_COMMAND {cmd:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                )))
            }
        };
        let env = Env {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS"))?,
            args_raw: var("CNI_ARGS"),
            path: std::env::split_paths(&var("CNI_PATH"))
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        if needs_container {
            if env.container_id.is_empty() {
                return Err(CniError::env(format!(
                    "CNI_CONTAINERID is required for {}",
                    command.as_str()
                )));
            }
            check_container_id(&env.container_id)?;
            if env.ifname.is_empty() {
                return Err(CniError::env(format!(
                    "CNI_IFNAME is required for {}",
                    command.as_str()
                )));
            }
            check_ifname("CNI_IFNAME", &env.ifname).map_err(CniError::env)?;
        }
        if matches!(command, Command::Add | Command::Check) && env.netns.is_empty() {
            return Err(CniError::env(format!(
                "CNI_NETNS is required for {}",
                command.as_str()
            )));
        }
        Ok(env)
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(CniError::env(format!(
                    "CNI_ARGS: {pair:?} is not KEY=VALUE"
                )))
            }
        }
    }
    Ok(out)
}

/// Container ids as the spec allows: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::env(format!(
            "CNI_CONTAINERID {id:?} is not a valid container id (letters, digits, '_', '.', '-'; starting with a letter or digit)"
        )))
    }
}

/// An interface name the kernel accepts.
pub fn check_ifname(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > IFNAME_MAX {
        return Err(format!(
            "{what} {name:?} is longer than {IFNAME_MAX} characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} {name:?} is not an interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{what} {name:?} contains {c:?}"));
    }
    Ok(())
}

/// The keys every configuration has, plus the parsed document for the plugin sections.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub kind: String,
    pub prev_result: Option<Value>,
    pub doc: Map<String, Value>,
}

impl NetConf {
    /// Decode stdin: not JSON -> code 6; missing or mistyped keys -> code 7; a version this
    /// plugin does not speak -> code 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = json::from_slice(stdin).map_err(|e| {
            let msg = if e.path.is_empty() {
                "the network configuration is not valid JSON".to_string()
            } else {
                format!("the network configuration is not valid JSON at {}", e.path)
            };
            CniError::new(code::DECODE, msg).with_details(e.to_string())
        })?;
        let Value::Object(doc) = v else {
            return Err(CniError::new(
                code::DECODE,
                "the network configuration is not a JSON object",
            ));
        };
        let cni_version = req_str(&doc, "", "cniVersion")?;
        if !spec::is_supported(&cni_version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {cni_version:?} is not supported (supported: {})",
                    spec::SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = req_str(&doc, "", "name")?;
        let kind = req_str(&doc, "", "type")?;
        let prev_result = match doc.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => {
                return Err(CniError::config(format!(
                    "prevResult must be an object, not {}",
                    type_name(v)
                )))
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            kind,
            prev_result,
            doc,
        })
    }

    /// The `cniVersion` of a configuration that may not parse (for the error object).
    pub fn sniff_version(stdin: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(stdin).ok()?;
        let s = v.get("cniVersion")?.as_str()?;
        spec::is_supported(s).then(|| s.to_string())
    }
}

fn key(section: &str, k: &str) -> String {
    if section.is_empty() {
        k.to_string()
    } else {
        format!("{section}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn req_str(m: &Map<String, Value>, section: &str, k: &str) -> Result<String, CniError> {
    match opt_str(m, section, k)? {
        Some(s) if !s.is_empty() => Ok(s),
        Some(_) => Err(CniError::config(format!("{} is empty", key(section, k)))),
        None => Err(CniError::config(format!("{} is missing", key(section, k)))),
    }
}

fn opt_str(m: &Map<String, Value>, section: &str, k: &str) -> Result<Option<String>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(CniError::config(format!(
            "{} must be a string, not {}",
            key(section, k),
            type_name(v)
        ))),
    }
}

fn opt_bool(m: &Map<String, Value>, section: &str, k: &str) -> Result<bool, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(CniError::config(format!(
            "{} must be true or false, not {}",
            key(section, k),
            type_name(v)
        ))),
    }
}

/// A non-negative integer; 0 counts as unset (as in the reference plugins).
fn opt_u32(m: &Map<String, Value>, section: &str, k: &str) -> Result<Option<u32>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(0) => Ok(None),
            Some(n) => Ok(Some(n)),
            None => Err(CniError::config(format!(
                "{} must be a non-negative integer, not {n}",
                key(section, k)
            ))),
        },
        Some(v) => Err(CniError::config(format!(
            "{} must be a number, not {}",
            key(section, k),
            type_name(v)
        ))),
    }
}

/// Smallest MTU accepted on an interface (IPv4's minimum).
pub const MTU_MIN: u32 = 68;
/// Largest MTU accepted.
pub const MTU_MAX: u32 = 65535;

fn check_mtu(what: &str, mtu: u32) -> Result<u32, CniError> {
    if (MTU_MIN..=MTU_MAX).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(CniError::config(format!(
            "{what} {mtu} is outside {MTU_MIN}..={MTU_MAX}"
        )))
    }
}

/// A unicast MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(what: &str, s: &str) -> Result<[u8; 6], CniError> {
    let bad = || {
        CniError::config(format!(
            "{what} {s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
        ))
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(CniError::config(format!(
            "{what} {s} is a multicast address"
        )));
    }
    if mac == [0; 6] {
        return Err(CniError::config(format!("{what} {s} is all zeros")));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where the mesh metadata is and which host this is (for the planner's MTU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRef {
    /// SRC: a file path or a rancher-metadata URL.
    pub metadata: String,
    pub host: Option<String>,
    /// ESP transform (`aes256gcm16`, ...): it decides the tunnel overhead.
    pub transform: Option<String>,
    pub udp_encap: bool,
}

/// The bridge plugin's keys (those of the reference `bridge` plugin it implements, plus the
/// mesh ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConf {
    /// Bridge device name (default `cni0`).
    pub bridge: String,
    /// Put the gateway address of each IP on the bridge (and enable forwarding).
    pub is_gateway: bool,
    /// Also route the container's default route via the gateway (implies `is_gateway`).
    pub is_default_gateway: bool,
    pub hairpin_mode: bool,
    /// Masquerade traffic to destinations outside the mesh (`ipMasq`, see [`super::masq`]).
    pub ip_masq: bool,
    /// Explicit MTU; with `link_mtu_overhead` the underlay MTU it is subtracted from.
    pub mtu: Option<u32>,
    /// Rancher's `linkMTUOverhead`: container MTU = underlay MTU - overhead.
    pub link_mtu_overhead: Option<u32>,
    /// Container interface MAC (`mac`, `runtimeConfig.mac` or `CNI_ARGS` `MAC`).
    pub mac: Option<[u8; 6]>,
    /// Mesh metadata for the default MTU: this section's `metadata`/`host`, else the
    /// `ipam` section's.
    pub mesh: Option<MeshRef>,
    /// `ipam.type`: the IPAM plugin binary to run.
    pub ipam_type: String,
}

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "cni0";

impl BridgeConf {
    pub fn parse(conf: &NetConf, env: &Env) -> Result<BridgeConf, CniError> {
        let d = &conf.doc;
        let bridge = opt_str(d, "", "bridge")?.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        check_ifname("bridge", &bridge).map_err(CniError::config)?;
        let is_default_gateway = opt_bool(d, "", "isDefaultGateway")?;
        let is_gateway = opt_bool(d, "", "isGateway")? || is_default_gateway;
        let hairpin_mode = opt_bool(d, "", "hairpinMode")?;
        let ip_masq = opt_bool(d, "", "ipMasq")?;
        let mtu = opt_u32(d, "", "mtu")?;
        if let Some(m) = mtu {
            check_mtu("mtu", m)?;
        }
        let link_mtu_overhead = opt_u32(d, "", "linkMTUOverhead")?;
        let runtime_mac = || match d.get("runtimeConfig") {
            Some(Value::Object(rc)) => opt_str(rc, "runtimeConfig", "mac"),
            _ => Ok(None),
        };
        let mac = match opt_str(d, "", "mac")? {
            Some(s) => Some(parse_mac("mac", &s)?),
            None => match runtime_mac()? {
                Some(s) => Some(parse_mac("runtimeConfig.mac", &s)?),
                None => match env.args.get("MAC") {
                    Some(s) => Some(parse_mac("CNI_ARGS MAC", s)?),
                    None => None,
                },
            },
        };
        let ipam = match d.get("ipam") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => {
                return Err(CniError::config("ipam is missing (the IPAM plugin to use)"))
            }
            Some(v) => {
                return Err(CniError::config(format!(
                    "ipam must be an object, not {}",
                    type_name(v)
                )))
            }
        };
        let ipam_type = req_str(ipam, "ipam", "type")?;
        if ipam_type.contains('/') || ipam_type == "." || ipam_type == ".." {
            return Err(CniError::config(format!(
                "ipam.type {ipam_type:?} must be a plugin name, not a path"
            )));
        }
        let transform = opt_str(d, "", "transform")?;
        if let Some(t) = &transform {
            t.parse::<crate::plan::Transform>()
                .map_err(|e| CniError::config(format!("transform: {e}")))?;
        }
        let udp_encap = opt_bool(d, "", "udpEncap")?;
        let mesh = match opt_str(d, "", "metadata")? {
            Some(m) => Some(MeshRef {
                metadata: m,
                host: opt_str(d, "", "host")?,
                transform,
                udp_encap,
            }),
            None => match opt_str(ipam, "ipam", "metadata")? {
                Some(m) => Some(MeshRef {
                    metadata: m,
                    host: opt_str(ipam, "ipam", "host")?,
                    transform,
                    udp_encap,
                }),
                None => None,
            },
        };
        Ok(BridgeConf {
            bridge,
            is_gateway,
            is_default_gateway,
            hairpin_mode,
            ip_masq,
            mtu,
            link_mtu_overhead,
            mac,
            mesh,
            ipam_type,
        })
    }
}

/// Where the IPAM plugin keeps its allocations by default.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks/ipsec-mesh";

/// The IPAM plugin's `ipam` section.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamConf {
    /// The network's `name` (allocations are recorded per network).
    pub network: String,
    /// SRC: a metadata file path or a rancher-metadata URL.
    pub metadata: String,
    /// This host's id (default: what rancher-metadata says, else the host whose `agent_ip`
    /// is a local address).
    pub host: Option<String>,
    pub data_dir: PathBuf,
    /// Routes put in the result as given.
    pub routes: Vec<Route>,
    /// How long a released address stays reserved for the same container and interface
    /// (`ipam.keepReleasedSeconds`; 0: not at all).
    pub keep_released: std::time::Duration,
    /// `ipam.ranges` (host-local's layout, written by `cni-config` for runtimes and people
    /// to read): the subnets it names. The metadata stays the source of truth.
    pub ranges: Vec<IpNet>,
}

/// Default for `ipam.keepReleasedSeconds`: a restart or a `network reload` (DEL then ADD of
/// the same container id) keeps the address when it comes within this time.
pub const DEFAULT_KEEP_RELEASED_SECS: u64 = 300;

impl IpamConf {
    pub fn parse(conf: &NetConf) -> Result<IpamConf, CniError> {
        let ipam = match conf.doc.get("ipam") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => return Err(CniError::config("ipam is missing")),
            Some(v) => {
                return Err(CniError::config(format!(
                    "ipam must be an object, not {}",
                    type_name(v)
                )))
            }
        };
        let metadata = req_str(ipam, "ipam", "metadata")?;
        let host = opt_str(ipam, "ipam", "host")?;
        if let Some(h) = &host {
            crate::model::HostId::new(h)
                .map_err(|e| CniError::config(format!("ipam.host: {e}")))?;
        }
        let data_dir = match opt_str(ipam, "ipam", "dataDir")? {
            None => PathBuf::from(DEFAULT_DATA_DIR),
            Some(p) if p.starts_with('/') => PathBuf::from(p),
            Some(p) => {
                return Err(CniError::config(format!(
                    "ipam.dataDir {p:?} must be an absolute path"
                )))
            }
        };
        let routes = match ipam.get("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, r)| parse_route(&format!("ipam.routes[{i}]"), r))
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(CniError::config(format!(
                    "ipam.routes must be an array, not {}",
                    type_name(v)
                )))
            }
        };
        let keep_released = match ipam.get("keepReleasedSeconds") {
            None | Some(Value::Null) => DEFAULT_KEEP_RELEASED_SECS,
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                CniError::config(format!(
                    "ipam.keepReleasedSeconds must be a non-negative integer, not {n}"
                ))
            })?,
            Some(v) => {
                return Err(CniError::config(format!(
                    "ipam.keepReleasedSeconds must be a number, not {}",
                    type_name(v)
                )))
            }
        };
        let ranges = parse_ranges(ipam.get("ranges"))?;
        Ok(IpamConf {
            network: conf.name.clone(),
            metadata,
            host,
            data_dir,
            routes,
            keep_released: std::time::Duration::from_secs(keep_released),
            ranges,
        })
    }
}

/// The subnets of host-local's `ranges` layout: `[[{"subnet": CIDR, "gateway": IP}, ...], ...]`.
fn parse_ranges(v: Option<&Value>) -> Result<Vec<IpNet>, CniError> {
    let sets = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(CniError::config(format!(
                "ipam.ranges must be an array of range sets, not {}",
                type_name(v)
            )))
        }
    };
    let mut out = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let Value::Array(set) = set else {
            return Err(CniError::config(format!(
                "ipam.ranges[{i}] must be an array of ranges, not {}",
                type_name(set)
            )));
        };
        for (j, r) in set.iter().enumerate() {
            let what = format!("ipam.ranges[{i}][{j}]");
            let Value::Object(m) = r else {
                return Err(CniError::config(format!(
                    "{what} must be an object {{\"subnet\": CIDR}}, not {}",
                    type_name(r)
                )));
            };
            let s = req_str(m, &what, "subnet")?;
            let net: IpNet = s.parse().map_err(|_| {
                CniError::config(format!(
                    "{what}.subnet {s:?} is not a prefix (10.42.1.0/24)"
                ))
            })?;
            out.push(net.trunc());
        }
    }
    Ok(out)
}

/// One statically requested address: the address, and the prefix length when one was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub ip: IpAddr,
    pub prefix: Option<u8>,
    /// Where it came from (for errors).
    pub source: &'static str,
}

fn parse_requested(source: &'static str, s: &str) -> Result<Requested, CniError> {
    let bad = || {
        CniError::config(format!(
            "{source}: {s:?} is not an IP address (10.42.1.200 or 10.42.1.200/24)"
        ))
    };
    let s = s.trim();
    let (ip, prefix) = match s.split_once('/') {
        Some((a, _)) => {
            let net: IpNet = s.parse().map_err(|_| bad())?;
            (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                Some(net.prefix_len()),
            )
        }
        None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
    };
    Ok(Requested { ip, prefix, source })
}

/// The addresses a runtime asks for, as host-local reads them: `CNI_ARGS` `IP=a[,b]`,
/// `args.cni.ips` and `runtimeConfig.ips` (the `ips` capability), in that order, duplicates
/// dropped. Empty: allocate dynamically.
pub fn static_requests(conf: &NetConf, env: &Env) -> Result<Vec<Requested>, CniError> {
    let mut out: Vec<Requested> = Vec::new();
    if let Some(list) = env.args.get("IP") {
        for s in list.split(',').filter(|s| !s.trim().is_empty()) {
            out.push(parse_requested("CNI_ARGS IP", s)?);
        }
    }
    let arrays: [(&'static str, Option<&Value>); 2] = [
        (
            "args.cni.ips",
            conf.doc
                .get("args")
                .and_then(|a| a.get("cni"))
                .and_then(|c| c.get("ips")),
        ),
        (
            "runtimeConfig.ips",
            conf.doc.get("runtimeConfig").and_then(|r| r.get("ips")),
        ),
    ];
    for (source, v) in arrays {
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for (i, x) in a.iter().enumerate() {
                    match x {
                        Value::String(s) => out.push(parse_requested(source, s)?),
                        x => {
                            return Err(CniError::config(format!(
                                "{source}[{i}] must be a string, not {}",
                                type_name(x)
                            )))
                        }
                    }
                }
            }
            Some(v) => {
                return Err(CniError::config(format!(
                    "{source} must be an array of addresses, not {}",
                    type_name(v)
                )))
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|r| seen.insert(r.ip));
    Ok(out)
}

fn parse_route(what: &str, v: &Value) -> Result<Route, CniError> {
    let Value::Object(m) = v else {
        return Err(CniError::config(format!(
            "{what} must be an object {{\"dst\": CIDR, \"gw\": IP}}, not {}",
            type_name(v)
        )));
    };
    let dst = req_str(m, what, "dst")?;
    let dst: IpNet = dst.parse().map_err(|_| {
        CniError::config(format!("{what}.dst {dst:?} is not a prefix (10.0.0.0/8)"))
    })?;
    let gw = match opt_str(m, what, "gw")? {
        None => None,
        Some(g) => Some(
            g.parse::<IpAddr>()
                .map_err(|_| CniError::config(format!("{what}.gw {g:?} is not an IP address")))?,
        ),
    };
    if let Some(g) = gw {
        if g.is_ipv4() != dst.addr().is_ipv4() {
            return Err(CniError::config(format!(
                "{what}: gw {g} and dst {dst} are of different families"
            )));
        }
    }
    let extra = m
        .iter()
        .filter(|(k, _)| *k != "dst" && *k != "gw")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Route {
        dst: dst.trunc(),
        gw,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    fn add_env() -> Env {
        env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:00:00:00:00:07"),
        ])
        .unwrap()
    }

    #[test]
    fn env_add() {
        let e = add_env();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.args["IgnoreUnknown"], "1");
    }

    #[test]
    fn env_errors_name_the_variable() {
        for (pairs, needle) in [
            (vec![], "CNI_COMMAND is not set"),
            (vec![("CNI_COMMAND", "ADDD")], "\"ADDD\""),
            (vec![("CNI_COMMAND", "ADD")], "CNI_CONTAINERID is required"),
            (
                vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")],
                "CNI_IFNAME is required",
            ),
            (
                vec![
                    ("CNI_COMMAND", "CHECK"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS is required",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "-bad"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "not a valid container id",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "a-very-long-interface"),
                ],
                "longer than 15",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "novalue"),
                ],
                "CNI_ARGS",
            ),
        ] {
            let e = env_of(&pairs).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{e}");
            assert!(e.msg.contains(needle), "{needle}: {e}");
        }
        // DEL without a netns, STATUS and VERSION without anything are fine.
        env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        env_of(&[("CNI_COMMAND", "STATUS")]).unwrap();
        env_of(&[("CNI_COMMAND", "VERSION")]).unwrap();
    }

    fn conf(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn syntax_errors_name_the_path_and_position() {
        let text = "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"type\": \"t\",\n \"ipam\": {\"routes\": [{\"dst\": \"0.0.0.0/0\" ";
        let e = NetConf::parse(text.as_bytes()).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert_eq!(
            e.msg,
            "the network configuration is not valid JSON at ipam.routes[0]"
        );
        assert_eq!(
            e.details,
            format!(
                "ipam.routes[0]: EOF while parsing an object (line 2, column {})",
                text.lines().last().unwrap().len()
            )
        );
        let e = NetConf::parse(b"{\"a\": 1} x").unwrap_err();
        assert_eq!(
            (e.msg.as_str(), e.details.as_str()),
            (
                "the network configuration is not valid JSON",
                "trailing characters (line 1, column 10)"
            )
        );
    }

    #[test]
    fn netconf_errors_have_the_spec_codes() {
        assert_eq!(NetConf::parse(b"{nope").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"[1]").unwrap_err().code, code::DECODE);
        let e = conf(json!({"cniVersion": "9.0.0", "name": "n", "type": "t"})).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("1.0.0"), "{e}");
        let e = conf(json!({"cniVersion": "1.0.0", "type": "t"})).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (code::INVALID_CONFIG, "name is missing")
        );
        let e = conf(json!({"cniVersion": "1.0.0", "name": 3, "type": "t"})).unwrap_err();
        assert_eq!(e.msg, "name must be a string, not a number");
        let e = conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "prevResult": []}))
            .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                code::INVALID_CONFIG,
                "prevResult must be an object, not an array"
            )
        );
        assert_eq!(
            NetConf::sniff_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(NetConf::sniff_version(br#"{"cniVersion":"7"}"#), None);
    }

    fn bridge(v: Value) -> Result<BridgeConf, CniError> {
        let mut base = json!({"cniVersion": "1.0.0", "name": "mesh", "type": "ipsec-mesh-bridge",
                              "ipam": {"type": "ipsec-mesh-ipam", "metadata": "/etc/mesh.json"}});
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        BridgeConf::parse(&conf(base)?, &add_env())
    }

    #[test]
    fn bridge_defaults_and_keys() {
        let b = bridge(json!({})).unwrap();
        assert_eq!(b.bridge, "cni0");
        assert!(!b.is_gateway && !b.hairpin_mode);
        assert_eq!(b.mtu, None);
        // The MAC came from CNI_ARGS.
        assert_eq!(b.mac, Some([2, 0, 0, 0, 0, 7]));
        assert_eq!(b.ipam_type, "ipsec-mesh-ipam");
        assert_eq!(b.mesh.as_ref().unwrap().metadata, "/etc/mesh.json");

        let b = bridge(
            json!({"bridge": "br-mesh", "isDefaultGateway": true, "hairpinMode": true,
                              "mtu": 1500, "linkMTUOverhead": 60, "mac": "0a:58:0a:2a:01:05",
                              "metadata": "/m.json", "host": "host-a", "transform": "aes128-sha256",
                              "udpEncap": true}),
        )
        .unwrap();
        assert_eq!(b.bridge, "br-mesh");
        assert!(b.is_gateway && b.is_default_gateway && b.hairpin_mode);
        assert_eq!((b.mtu, b.link_mtu_overhead), (Some(1500), Some(60)));
        assert_eq!(b.mac, Some([0x0a, 0x58, 0x0a, 0x2a, 1, 5]));
        let m = b.mesh.unwrap();
        assert_eq!(m.metadata, "/m.json");
        assert_eq!(m.host.as_deref(), Some("host-a"));
        assert!(m.udp_encap);
        // mtu 0 means unset, as in the reference plugin.
        assert_eq!(bridge(json!({"mtu": 0})).unwrap().mtu, None);
    }

    #[test]
    fn bridge_errors_name_the_key() {
        for (v, needle) in [
            (
                json!({"bridge": 5}),
                "bridge must be a string, not a number",
            ),
            (json!({"bridge": "a/b"}), "bridge \"a/b\" contains '/'"),
            (
                json!({"isGateway": "yes"}),
                "isGateway must be true or false",
            ),
            (json!({"mtu": -1}), "mtu must be a non-negative integer"),
            (json!({"mtu": 10}), "mtu 10 is outside"),
            (json!({"mtu": "1400"}), "mtu must be a number"),
            (
                json!({"mac": "zz:00:00:00:00:00"}),
                "mac \"zz:00:00:00:00:00\" is not a MAC",
            ),
            (json!({"mac": "01:00:00:00:00:00"}), "multicast"),
            (
                json!({"runtimeConfig": {"mac": 5}}),
                "runtimeConfig.mac must be a string, not a number",
            ),
            (
                json!({"runtimeConfig": {"mac": "zz"}}),
                "runtimeConfig.mac \"zz\" is not a MAC",
            ),
            (json!({"ipam": null}), "ipam is missing"),
            (json!({"ipam": {"metadata": "x"}}), "ipam.type is missing"),
            (json!({"ipam": {"type": "../x"}}), "must be a plugin name"),
            (json!({"transform": "rot13"}), "transform:"),
        ] {
            let e = bridge(v.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{v}: {e}");
            assert!(e.msg.contains(needle), "{v}: {needle:?} not in {:?}", e.msg);
        }
    }

    fn ipam(v: Value) -> Result<IpamConf, CniError> {
        IpamConf::parse(&conf(
            json!({"cniVersion": "1.0.0", "name": "mesh", "type": "bridge", "ipam": v}),
        )?)
    }

    #[test]
    fn ipam_keys() {
        let c = ipam(
            json!({"type": "ipsec-mesh-ipam", "metadata": "http://169.254.169.250/2015-12-19"}),
        )
        .unwrap();
        assert_eq!(c.network, "mesh");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(c.routes.is_empty() && c.host.is_none());
        let c = ipam(json!({"type": "x", "metadata": "/m", "host": "host-a", "dataDir": "/tmp/d",
                            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "169.254.169.250/32", "gw": "10.42.1.1"}]}))
        .unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[1].gw, Some("10.42.1.1".parse().unwrap()));
        assert_eq!(c.host.as_deref(), Some("host-a"));
    }

    #[test]
    fn ipam_errors_name_the_key() {
        for (v, needle) in [
            (json!({"type": "x"}), "ipam.metadata is missing"),
            (
                json!({"type": "x", "metadata": "/m", "dataDir": "rel"}),
                "ipam.dataDir \"rel\" must be an absolute path",
            ),
            (
                json!({"type": "x", "metadata": "/m", "host": "a b"}),
                "ipam.host:",
            ),
            (
                json!({"type": "x", "metadata": "/m", "routes": {}}),
                "ipam.routes must be an array",
            ),
            (
                json!({"type": "x", "metadata": "/m", "routes": [{"dst": "10.0.0.0"}]}),
                "ipam.routes[0].dst",
            ),
            (
                json!({"type": "x", "metadata": "/m", "routes": [{"gw": "10.0.0.1"}]}),
                "ipam.routes[0].dst is missing",
            ),
            (
                json!({"type": "x", "metadata": "/m", "routes": [{"dst": "10.0.0.0/8", "gw": "fd00::1"}]}),
                "different families",
            ),
            (json!("x"), "ipam must be an object"),
        ] {
            let e = ipam(v.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{v}: {e}");
            assert!(e.msg.contains(needle), "{v}: {needle:?} not in {:?}", e.msg);
        }
    }

    fn env_args(args: &str) -> Env {
        env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ])
        .unwrap()
    }

    #[test]
    fn static_requests_from_args_capability_and_cni_args() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "t"})).unwrap();
        let env = env_args("IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.42.1.200,10.42.1.201");
        assert_eq!(
            env.args_raw,
            "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.42.1.200,10.42.1.201"
        );
        let r = static_requests(&c, &env).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.ip.to_string(), r.prefix, r.source))
                .collect::<Vec<_>>(),
            [
                ("10.42.1.200".to_string(), None, "CNI_ARGS IP"),
                ("10.42.1.201".to_string(), None, "CNI_ARGS IP")
            ]
        );
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "t",
                            "args": {"cni": {"ips": ["fd42::7"]}},
                            "runtimeConfig": {"ips": ["10.42.1.200/24", "10.42.1.9/24"]}}))
        .unwrap();
        let r = static_requests(&c, &env_args("IP=10.42.1.200")).unwrap();
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.ip.to_string(), r.prefix, r.source))
            .collect();
        assert_eq!(
            got,
            [
                ("10.42.1.200".to_string(), None, "CNI_ARGS IP"),
                ("fd42::7".to_string(), None, "args.cni.ips"),
                ("10.42.1.9".to_string(), Some(24), "runtimeConfig.ips"),
            ],
            "in host-local's order, the duplicate dropped"
        );
        // Nothing asked: dynamic.
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "t"})).unwrap();
        assert!(static_requests(&c, &env_args("IgnoreUnknown=1"))
            .unwrap()
            .is_empty());
        // Errors name the source.
        for (doc, args, needle) in [
            (
                json!({}),
                "IP=10.42.1.300",
                "CNI_ARGS IP: \"10.42.1.300\" is not an IP address",
            ),
            (
                json!({}),
                "IP=10.42.1.2/33",
                "CNI_ARGS IP: \"10.42.1.2/33\"",
            ),
            (
                json!({"runtimeConfig": {"ips": "10.42.1.2"}}),
                "",
                "runtimeConfig.ips must be an array",
            ),
            (
                json!({"runtimeConfig": {"ips": [5]}}),
                "",
                "runtimeConfig.ips[0] must be a string",
            ),
            (
                json!({"args": {"cni": {"ips": ["x"]}}}),
                "",
                "args.cni.ips: \"x\"",
            ),
        ] {
            let mut d = json!({"cniVersion": "1.0.0", "name": "n", "type": "t"});
            for (k, v) in doc.as_object().unwrap() {
                d[k] = v.clone();
            }
            let e = static_requests(&conf(d).unwrap(), &env_args(args)).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e}");
            assert!(e.msg.contains(needle), "{needle:?} not in {:?}", e.msg);
        }
    }

    #[test]
    fn ipam_keep_released_and_ranges() {
        let c = ipam(json!({"type": "x", "metadata": "/m"})).unwrap();
        assert_eq!(c.keep_released.as_secs(), DEFAULT_KEEP_RELEASED_SECS);
        assert!(c.ranges.is_empty());
        let c = ipam(
            json!({"type": "x", "metadata": "/m", "keepReleasedSeconds": 0,
                            "ranges": [[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}],
                                       [{"subnet": "fd42:0:0:1::/64"}]]}),
        )
        .unwrap();
        assert!(c.keep_released.is_zero());
        assert_eq!(
            c.ranges,
            ["10.42.1.0/24", "fd42:0:0:1::/64"].map(|s| s.parse::<IpNet>().unwrap())
        );
        for (v, needle) in [
            (
                json!({"keepReleasedSeconds": -1}),
                "ipam.keepReleasedSeconds must be a non-negative integer",
            ),
            (
                json!({"keepReleasedSeconds": "5"}),
                "ipam.keepReleasedSeconds must be a number",
            ),
            (
                json!({"ranges": {}}),
                "ipam.ranges must be an array of range sets",
            ),
            (
                json!({"ranges": [{}]}),
                "ipam.ranges[0] must be an array of ranges",
            ),
            (
                json!({"ranges": [[{"gateway": "10.42.1.1"}]]}),
                "ipam.ranges[0][0].subnet is missing",
            ),
            (
                json!({"ranges": [[{"subnet": "10.42.1.0"}]]}),
                "ipam.ranges[0][0].subnet \"10.42.1.0\" is not a prefix",
            ),
        ] {
            let mut d = json!({"type": "x", "metadata": "/m"});
            for (k, x) in v.as_object().unwrap() {
                d[k] = x.clone();
            }
            let e = ipam(d).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e}");
            assert!(e.msg.contains(needle), "{needle:?} not in {:?}", e.msg);
        }
    }

    #[test]
    fn bridge_ip_masq() {
        assert!(!bridge(json!({})).unwrap().ip_masq);
        assert!(bridge(json!({"ipMasq": true})).unwrap().ip_masq);
        let e = bridge(json!({"ipMasq": 1})).unwrap_err();
        assert!(e.msg.contains("ipMasq must be true or false"), "{e}");
    }

    #[test]
    fn macs() {
        assert_eq!(format_mac(&[0x0a, 0, 0xff, 1, 2, 3]), "0a:00:ff:01:02:03");
        assert!(parse_mac("m", "0a:00:ff:01:02").is_err());
        assert!(parse_mac("m", "0a:00:ff:01:02:003").is_err());
        assert!(parse_mac("m", "00:00:00:00:00:00").is_err());
    }
}
