//! The validated cluster model.
//!
//! Metadata sources produce a [`RawCluster`] (the wire shape: strings as given, unknown fields
//! rejected) and hand it to [`Cluster::validate`], the single validation path. Every error
//! names where it is (`hosts[1] (id "host-b").subnets[0]`) and what is wrong with the value.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Smallest underlay MTU accepted (IPv6 minimum link MTU).
pub const MTU_MIN: u16 = 1280;
/// Largest underlay MTU accepted (jumbo frames).
pub const MTU_MAX: u16 = 9000;
/// Underlay MTU when the metadata does not say.
pub const MTU_DEFAULT: u16 = 1500;
/// Longest host id accepted (a DNS name's length).
pub const HOST_ID_MAX_LEN: usize = 253;

/// The wire shape of a metadata document: what a file or an adapter produces before
/// validation. Unknown fields are errors so that typos such as `subnet` are caught.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub network: RawNetwork,
    pub hosts: Vec<RawHost>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// The overlay: one prefix (a string, single-family) or a list of one or two prefixes
    /// of different families (dual-stack).
    pub cidr: RawCidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `network.cidr` as written: a string (one overlay family) or a list of one or two
/// prefixes of different families (a dual-stack overlay). A string serializes as a string,
/// so single-family metadata round-trips unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawCidr {
    One(String),
    List(Vec<String>),
}

impl Default for RawCidr {
    fn default() -> RawCidr {
        RawCidr::One(String::new())
    }
}

impl RawCidr {
    /// The prefix as written when one string is given, else the first of the list (`""`
    /// for an empty list): for callers that take one prefix (etcd's `--subnet auto`).
    pub fn as_str(&self) -> &str {
        match self {
            RawCidr::One(s) => s,
            RawCidr::List(l) => l.first().map_or("", String::as_str),
        }
    }

    /// The prefixes with their JSON paths below `network` (`cidr`, `cidr[1]`).
    fn items(&self) -> Vec<(String, &str)> {
        match self {
            RawCidr::One(s) => vec![("cidr".to_string(), s.as_str())],
            RawCidr::List(l) => l
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("cidr[{i}]"), s.as_str()))
                .collect(),
        }
    }
}

impl From<&str> for RawCidr {
    fn from(s: &str) -> RawCidr {
        RawCidr::One(s.to_string())
    }
}

impl From<String> for RawCidr {
    fn from(s: String) -> RawCidr {
        RawCidr::One(s)
    }
}

impl From<&[&str]> for RawCidr {
    fn from(l: &[&str]) -> RawCidr {
        RawCidr::List(l.iter().map(|s| s.to_string()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for RawCidr {
    fn from(l: [&str; N]) -> RawCidr {
        RawCidr::from(&l[..])
    }
}

impl PartialEq<&str> for RawCidr {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, RawCidr::One(s) if s == other)
    }
}

impl PartialEq<str> for RawCidr {
    fn eq(&self, other: &str) -> bool {
        matches!(self, RawCidr::One(s) if s == other)
    }
}

impl Serialize for RawCidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawCidr::One(c) => s.serialize_str(c),
            RawCidr::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RawCidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawCidr, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCidr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a prefix (\"10.42.0.0/16\") or a list of one prefix per family")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawCidr, E> {
                Ok(RawCidr::One(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<RawCidr, E> {
                Ok(RawCidr::One(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<RawCidr, A::Error> {
                let mut l = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    l.push(s);
                }
                Ok(RawCidr::List(l))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub id: String,
    pub agent_ip: String,
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The host's VTEP address on the overlay (the VXLAN device's address), when the source
    /// names one; see [`Host::vtep`] for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<String>,
    /// Set by sources whose subnets are aggregates of workload addresses (rancher-metadata:
    /// one /32 per container), where any address inside a subnet may be a workload's, so no
    /// VTEP address is derived from them. Not part of the file format.
    #[serde(skip)]
    pub workload_subnets: bool,
}

/// Which dataplane the network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ipsec,
    Vxlan,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Ipsec => "ipsec",
            Backend::Vxlan => "vxlan",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipsec" => Ok(Backend::Ipsec),
            "vxlan" => Ok(Backend::Vxlan),
            other => Err(format!(
                "unknown backend {other:?} (expected \"ipsec\" or \"vxlan\")"
            )),
        }
    }
}

/// A host identity: non-empty, at most [`HOST_ID_MAX_LEN`] characters of `[A-Za-z0-9._:-]`
/// (it ends up in connection names, logs and key derivation, so it stays printable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HostId(String);

impl HostId {
    pub fn new(s: &str) -> Result<HostId, Invalid> {
        if s.is_empty() {
            return Err(Invalid::EmptyId);
        }
        if s.len() > HOST_ID_MAX_LEN {
            return Err(Invalid::IdTooLong { len: s.len() });
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(Invalid::IdCharacter {
                value: s.to_string(),
                character: c,
            });
        }
        Ok(HostId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The overlay: one prefix per family (one, or two for a dual-stack overlay), in the
    /// metadata's order; every host subnet lies inside the one of its family.
    pub cidrs: Vec<IpNet>,
    pub backend: Backend,
    /// Underlay MTU.
    pub mtu: u16,
}

impl Network {
    /// The first overlay prefix listed (the only one of a single-family network).
    pub fn cidr(&self) -> IpNet {
        self.cidrs[0]
    }

    /// The overlay prefix of a family, if the network has that family.
    pub fn cidr_of(&self, v6: bool) -> Option<IpNet> {
        self.cidrs
            .iter()
            .copied()
            .find(|c| c.network().is_ipv6() == v6)
    }

    /// Both families on the overlay.
    pub fn dual_stack(&self) -> bool {
        self.cidrs.len() > 1
    }

    /// The cidrs as the file format writes them: a string for one, a list for two.
    pub fn cidr_json(&self) -> serde_json::Value {
        match self.cidrs.as_slice() {
            [one] => serde_json::Value::String(one.to_string()),
            many => many
                .iter()
                .map(|c| serde_json::Value::String(c.to_string()))
                .collect(),
        }
    }
}

impl fmt::Display for Network {
    /// The cidrs, comma-separated (`10.42.0.0/16,fd42::/48`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c: Vec<String> = self.cidrs.iter().map(IpNet::to_string).collect();
        f.write_str(&c.join(","))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: HostId,
    pub name: Option<String>,
    /// Underlay address: the tunnel endpoint.
    pub agent_ip: IpAddr,
    /// Container subnets on this host, sorted, no host bits, inside the network cidr.
    pub subnets: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
    /// The host's VTEP address: the address of its VXLAN device, towards which peers route
    /// its subnets. An address no workload can hold: the metadata's `vtep` if given
    /// (rancher-metadata: the host's network agent container's address), otherwise the
    /// network address of the host's first subnet that has one to spare (IPv4 /30 or wider,
    /// IPv6 /126 or wider; an allocator never hands it out). None when neither exists
    /// (e.g. a rancher-metadata host without a network agent): such a host cannot be a
    /// VXLAN peer, and the vxlan driver reports it.
    pub vtep: Option<IpAddr>,
}

/// A validated cluster. Hosts are sorted by id, so the order of the input changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub network: Network,
    pub hosts: Vec<Host>,
}

/// Where in the metadata an error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location(String);

impl Location {
    fn network(field: &str) -> Location {
        Location(format!("network.{field}"))
    }
    fn host(index: usize, id: &str, field: &str) -> Location {
        if id.is_empty() {
            Location(format!("hosts[{index}].{field}"))
        } else {
            Location(format!("hosts[{index}] (id {id:?}).{field}"))
        }
    }
    fn subnet(index: usize, id: &str, subnet: usize) -> Location {
        Location::host(index, id, &format!("subnets[{subnet}]"))
    }
    fn hosts() -> Location {
        Location("hosts".to_string())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("host id is empty")]
    EmptyId,
    #[error("host id is {len} characters long (at most {HOST_ID_MAX_LEN})")]
    IdTooLong { len: usize },
    #[error(
        "host id {value:?} contains {character:?} (allowed: letters, digits, '.', '_', ':', '-')"
    )]
    IdCharacter { value: String, character: char },
    #[error("{value:?} is not an IP address")]
    BadAddress { value: String },
    #[error("{value:?} is not a usable endpoint address ({why})")]
    UnusableAddress { value: String, why: &'static str },
    #[error("{value:?} is not a prefix in CIDR notation (address/length): {reason}")]
    BadPrefix { value: String, reason: String },
    #[error("{value:?} has host bits set (did you mean {suggestion}?)")]
    HostBits { value: String, suggestion: IpNet },
    #[error("{value} is not inside the network cidr {cidr}")]
    OutsideCidr { value: IpNet, cidr: IpNet },
    #[error("{value} overlaps {other} of host {other_host:?}")]
    SubnetOverlap {
        value: IpNet,
        other: IpNet,
        other_host: String,
    },
    #[error(
        "agent_ip {value} lies inside the overlay cidr {cidr}; the underlay must be outside it"
    )]
    AgentInOverlay { value: IpAddr, cidr: IpNet },
    #[error("duplicate host id {id:?} (also hosts[{first}])")]
    DuplicateId { id: String, first: usize },
    #[error("agent_ip {value} is also the agent_ip of host {other_host:?}")]
    DuplicateAgentIp { value: IpAddr, other_host: String },
    #[error("agent_ip {value} is IPv{family} but host {first_host:?} has an IPv{other_family} agent_ip; tunnels need one underlay family")]
    MixedFamily {
        value: IpAddr,
        family: u8,
        first_host: String,
        other_family: u8,
    },
    /// A subnet or VTEP address of the other family than the overlay: the model has one
    /// overlay family per network (its `cidr`'s), whatever the underlay's family.
    #[error("{what} {value} is IPv{family} but the network cidr {cidr} is IPv{cidr_family}: one overlay family per network (for a dual-stack overlay, list one cidr per family: \"cidr\": [\"10.42.0.0/16\", \"fd42::/48\"])")]
    OverlayFamily {
        what: &'static str,
        value: String,
        family: u8,
        cidr: IpNet,
        cidr_family: u8,
    },
    #[error("vtep {value} is not inside the network cidr {cidr}")]
    VtepOutsideCidr { value: IpAddr, cidr: IpNet },
    /// Dual-stack: a subnet (or VTEP) outside the cidr of its own family.
    #[error("{what}{value} is outside the network's IPv{family} cidr {cidr}")]
    OutsideFamilyCidr {
        what: &'static str,
        value: String,
        family: u8,
        cidr: IpNet,
    },
    #[error("a second IPv{family} prefix (one per family)")]
    SecondOfFamily { family: u8 },
    #[error("{count} prefixes listed: at most two, one per family")]
    TooManyCidrs { count: usize },
    #[error("an empty list: give one prefix, or one per family for a dual-stack overlay")]
    NoCidr,
    #[error("a dual-stack overlay needs the ipsec backend (the vxlan backend carries one overlay family)")]
    DualStackVxlan,
    #[error("vtep {value} lies inside {subnet} of host {other_host:?}, where it may be a workload's address")]
    VtepInOtherHost {
        value: IpAddr,
        subnet: IpNet,
        other_host: String,
    },
    #[error("vtep {value} is also the VTEP address of host {other_host:?}")]
    DuplicateVtep { value: IpAddr, other_host: String },
    #[error("the host list is empty")]
    NoHosts,
    #[error("{value} is outside {MTU_MIN}..={MTU_MAX}")]
    Mtu { value: u32 },
    #[error("{0}")]
    Backend(String),
}

/// A validation error: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {what}")]
pub struct ValidationError {
    pub location: Location,
    pub what: Invalid,
}

fn err(location: Location, what: Invalid) -> ValidationError {
    ValidationError { location, what }
}

/// Parse `a.b.c.d/len` strictly: the length must be present, the address must have no
/// host bits.
pub fn parse_prefix(value: &str) -> Result<IpNet, Invalid> {
    if !value.contains('/') {
        return Err(Invalid::BadPrefix {
            value: value.to_string(),
            reason: "the prefix length is missing".to_string(),
        });
    }
    let net = IpNet::from_str(value).map_err(|_| {
        let (addr, len) = value.split_once('/').unwrap_or((value, ""));
        let reason = match IpAddr::from_str(addr) {
            Err(_) => format!("{addr:?} is not an IP address"),
            Ok(a) => {
                let max = if a.is_ipv4() { 32 } else { 128 };
                format!("prefix length {len:?} is not a number in 0..={max}")
            }
        };
        Invalid::BadPrefix {
            value: value.to_string(),
            reason,
        }
    })?;
    if net.trunc() != net {
        return Err(Invalid::HostBits {
            value: value.to_string(),
            suggestion: net.trunc(),
        });
    }
    Ok(net)
}

fn parse_endpoint(value: &str) -> Result<IpAddr, Invalid> {
    let ip = IpAddr::from_str(value).map_err(|_| Invalid::BadAddress {
        value: value.to_string(),
    })?;
    let why = if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        Some("broadcast")
    } else {
        None
    };
    match why {
        Some(why) => Err(Invalid::UnusableAddress {
            value: value.to_string(),
            why,
        }),
        None => Ok(ip),
    }
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// `what` (`ip`, written `value`) is of the other family than the overlay `cidr`.
fn family_mismatch(what: &'static str, ip: IpAddr, value: String, cidr: IpNet) -> Option<Invalid> {
    let (family, cidr_family) = (family_of(ip), family_of(cidr.network()));
    (family != cidr_family).then_some(Invalid::OverlayFamily {
        what,
        value,
        family,
        cidr,
        cidr_family,
    })
}

/// The network address of the first of `subnets` that has one to spare: IPv4 /30 or wider,
/// IPv6 /126 or wider (in a /31 or /32 every address may be a host's).
fn spare_network_address(subnets: &[IpNet]) -> Option<IpAddr> {
    subnets
        .iter()
        .find(|n| n.prefix_len() + 2 <= n.max_prefix_len())
        .map(IpNet::network)
}

/// Every VTEP address is unique and lies in no other host's subnet (where a workload of that
/// host could hold it). `hosts` are in input order; `subnets` is sorted by network address
/// and free of overlaps.
fn check_vteps(
    raw: &RawCluster,
    hosts: &[Host],
    subnets: &[(IpNet, usize, usize)],
) -> Result<(), ValidationError> {
    let mut seen: HashMap<IpAddr, usize> = HashMap::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let Some(ip) = h.vtep else { continue };
        let at = || Location::host(i, &raw.hosts[i].id, "vtep");
        // The only subnet that can hold `ip`: the last one starting at or before it.
        let k = subnets.partition_point(|(n, _, _)| n.network() <= ip);
        if let Some(&(net, owner, _)) = k.checked_sub(1).map(|k| &subnets[k]) {
            if owner != i && net.contains(&ip) {
                return Err(err(
                    at(),
                    Invalid::VtepInOtherHost {
                        value: ip,
                        subnet: net,
                        other_host: raw.hosts[owner].id.clone(),
                    },
                ));
            }
        }
        if let Some(&other) = seen.get(&ip) {
            return Err(err(
                at(),
                Invalid::DuplicateVtep {
                    value: ip,
                    other_host: raw.hosts[other].id.clone(),
                },
            ));
        }
        seen.insert(ip, i);
    }
    Ok(())
}

impl Cluster {
    /// The one validation path every metadata source goes through.
    pub fn validate(raw: &RawCluster) -> Result<Cluster, ValidationError> {
        let items = raw.network.cidr.items();
        if items.is_empty() {
            return Err(err(Location::network("cidr"), Invalid::NoCidr));
        }
        if items.len() > 2 {
            return Err(err(
                Location::network("cidr"),
                Invalid::TooManyCidrs { count: items.len() },
            ));
        }
        let mut cidrs: Vec<IpNet> = Vec::with_capacity(items.len());
        for (path, value) in &items {
            let c = parse_prefix(value).map_err(|e| err(Location::network(path), e))?;
            if cidrs
                .iter()
                .any(|o| o.network().is_ipv6() == c.network().is_ipv6())
            {
                return Err(err(
                    Location::network(path),
                    Invalid::SecondOfFamily {
                        family: family_of(c.network()),
                    },
                ));
            }
            cidrs.push(c);
        }
        let dual = cidrs.len() > 1;
        // The single-family network's cidr (the first listed when dual-stack: only used for
        // single-family checks and messages).
        let cidr = cidrs[0];
        let cidr_for = |ip: IpAddr| -> IpNet {
            cidrs
                .iter()
                .copied()
                .find(|c| c.network().is_ipv6() == ip.is_ipv6())
                .unwrap_or(cidr)
        };
        let backend = match &raw.network.backend {
            None => Backend::Ipsec,
            Some(b) => Backend::from_str(b)
                .map_err(|e| err(Location::network("backend"), Invalid::Backend(e)))?,
        };
        if dual && backend == Backend::Vxlan {
            return Err(err(Location::network("cidr"), Invalid::DualStackVxlan));
        }
        let mtu = match raw.network.mtu {
            None => MTU_DEFAULT,
            Some(m) if (MTU_MIN as u32..=MTU_MAX as u32).contains(&m) => m as u16,
            Some(m) => return Err(err(Location::network("mtu"), Invalid::Mtu { value: m })),
        };
        if raw.hosts.is_empty() {
            return Err(err(Location::hosts(), Invalid::NoHosts));
        }

        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(raw.hosts.len());
        let mut agents: HashMap<IpAddr, usize> = HashMap::with_capacity(raw.hosts.len());
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        // (subnet, host index, subnet index) for the overlap check.
        let mut all_subnets: Vec<(IpNet, usize, usize)> = Vec::new();

        for (i, rh) in raw.hosts.iter().enumerate() {
            let id = HostId::new(&rh.id).map_err(|e| err(Location::host(i, &rh.id, "id"), e))?;
            if let Some(&first) = ids.get(rh.id.as_str()) {
                return Err(err(
                    Location::host(i, &rh.id, "id"),
                    Invalid::DuplicateId {
                        id: rh.id.clone(),
                        first,
                    },
                ));
            }
            ids.insert(&rh.id, i);

            let agent_ip = parse_endpoint(&rh.agent_ip)
                .map_err(|e| err(Location::host(i, &rh.id, "agent_ip"), e))?;
            if let Some(&c) = cidrs.iter().find(|c| c.contains(&agent_ip)) {
                return Err(err(
                    Location::host(i, &rh.id, "agent_ip"),
                    Invalid::AgentInOverlay {
                        value: agent_ip,
                        cidr: c,
                    },
                ));
            }
            let family = |ip: &IpAddr| family_of(*ip);
            if let Some(first) = hosts.first().map(|h: &Host| h.agent_ip) {
                if family(&first) != family(&agent_ip) {
                    return Err(err(
                        Location::host(i, &rh.id, "agent_ip"),
                        Invalid::MixedFamily {
                            value: agent_ip,
                            family: family(&agent_ip),
                            first_host: raw.hosts[0].id.clone(),
                            other_family: family(&first),
                        },
                    ));
                }
            }
            if let Some(&other) = agents.get(&agent_ip) {
                return Err(err(
                    Location::host(i, &rh.id, "agent_ip"),
                    Invalid::DuplicateAgentIp {
                        value: agent_ip,
                        other_host: raw.hosts[other].id.clone(),
                    },
                ));
            }
            agents.insert(agent_ip, i);

            let mut subnets = Vec::with_capacity(rh.subnets.len());
            for (j, s) in rh.subnets.iter().enumerate() {
                let net = parse_prefix(s).map_err(|e| err(Location::subnet(i, &rh.id, j), e))?;
                if dual {
                    let c = cidr_for(net.network());
                    if !c.contains(&net) {
                        return Err(err(
                            Location::subnet(i, &rh.id, j),
                            Invalid::OutsideFamilyCidr {
                                what: "",
                                value: net.to_string(),
                                family: family_of(net.network()),
                                cidr: c,
                            },
                        ));
                    }
                } else {
                    if let Some(e) = family_mismatch("subnet", net.network(), net.to_string(), cidr)
                    {
                        return Err(err(Location::subnet(i, &rh.id, j), e));
                    }
                    if !cidr.contains(&net) {
                        return Err(err(
                            Location::subnet(i, &rh.id, j),
                            Invalid::OutsideCidr { value: net, cidr },
                        ));
                    }
                }
                subnets.push(net);
                all_subnets.push((net, i, j));
            }
            subnets.sort();

            let vtep = match &rh.vtep {
                Some(v) => {
                    let ip =
                        parse_endpoint(v).map_err(|e| err(Location::host(i, &rh.id, "vtep"), e))?;
                    if dual {
                        let c = cidr_for(ip);
                        if !c.contains(&ip) {
                            return Err(err(
                                Location::host(i, &rh.id, "vtep"),
                                Invalid::OutsideFamilyCidr {
                                    what: "vtep ",
                                    value: ip.to_string(),
                                    family: family_of(ip),
                                    cidr: c,
                                },
                            ));
                        }
                    } else if let Some(e) = family_mismatch("vtep", ip, ip.to_string(), cidr) {
                        return Err(err(Location::host(i, &rh.id, "vtep"), e));
                    }
                    if !cidr_for(ip).contains(&ip) {
                        return Err(err(
                            Location::host(i, &rh.id, "vtep"),
                            Invalid::VtepOutsideCidr {
                                value: ip,
                                cidr: cidr_for(ip),
                            },
                        ));
                    }
                    Some(ip)
                }
                None if rh.workload_subnets => None,
                // Dual-stack: from the subnets of the first listed family.
                None => {
                    let first_family: Vec<IpNet> = subnets
                        .iter()
                        .copied()
                        .filter(|n| n.network().is_ipv6() == cidr.network().is_ipv6())
                        .collect();
                    spare_network_address(&first_family)
                }
            };

            hosts.push(Host {
                id,
                name: rh.name.clone(),
                agent_ip,
                subnets,
                labels: rh.labels.clone(),
                vtep,
            });
        }

        // Overlaps: sorted by network address then by length, two prefixes overlap iff the
        // later one starts inside the widest prefix seen so far.
        all_subnets.sort_by(|a, b| {
            (a.0.network(), a.0.prefix_len(), a.1, a.2).cmp(&(
                b.0.network(),
                b.0.prefix_len(),
                b.1,
                b.2,
            ))
        });
        let mut widest: Option<(IpNet, usize, usize)> = None;
        for &(net, i, j) in &all_subnets {
            if let Some((w, wi, wj)) = widest {
                if w.contains(&net.network()) {
                    // Report against the one later in the input so the message points at
                    // the newcomer.
                    let ((a, ai, aj), (b, bi)) = if (wi, wj) > (i, j) {
                        ((w, wi, wj), (net, i))
                    } else {
                        ((net, i, j), (w, wi))
                    };
                    return Err(err(
                        Location::subnet(ai, &raw.hosts[ai].id, aj),
                        Invalid::SubnetOverlap {
                            value: a,
                            other: b,
                            other_host: raw.hosts[bi].id.clone(),
                        },
                    ));
                }
                if net.broadcast() > w.broadcast() {
                    widest = Some((net, i, j));
                }
            } else {
                widest = Some((net, i, j));
            }
        }

        check_vteps(raw, &hosts, &all_subnets)?;

        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Cluster {
            network: Network {
                cidrs,
                backend,
                mtu,
            },
            hosts,
        })
    }

    pub fn host(&self, id: &str) -> Option<&Host> {
        self.hosts
            .binary_search_by(|h| h.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.hosts[i])
    }

    /// The first `max` host ids, comma-separated (`…` when there are more), for errors.
    pub fn known_ids(&self, max: usize) -> String {
        let ids: Vec<&str> = self.hosts.iter().take(max).map(|h| h.id.as_str()).collect();
        let more = if self.hosts.len() > max { ", …" } else { "" };
        format!("{}{more}", ids.join(", "))
    }

    /// The host whose agent_ip is one of `addrs` (self discovery from local addresses).
    pub fn host_by_agent_ip(&self, addrs: &[IpAddr]) -> Option<&Host> {
        self.hosts.iter().find(|h| addrs.contains(&h.agent_ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, ip: &str, subnets: &[&str]) -> RawHost {
        RawHost {
            id: id.into(),
            agent_ip: ip.into(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn raw(hosts: Vec<RawHost>) -> RawCluster {
        RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                backend: None,
                mtu: None,
            },
            hosts,
        }
    }

    fn good() -> RawCluster {
        raw(vec![
            host("host-b", "192.168.77.2", &["10.42.2.0/24"]),
            host(
                "host-a",
                "192.168.77.1",
                &["10.42.1.0/24", "10.42.101.0/24"],
            ),
        ])
    }

    fn fails(r: &RawCluster) -> ValidationError {
        Cluster::validate(r).expect_err("validation should fail")
    }

    fn with_vtep(mut h: RawHost, vtep: &str) -> RawHost {
        h.vtep = Some(vtep.into());
        h
    }

    fn vtep_of(c: &Cluster, id: &str) -> Option<String> {
        c.host(id).unwrap().vtep.map(|v| v.to_string())
    }

    #[test]
    fn vtep_defaults_to_a_spare_network_address_only() {
        let mut r = raw(vec![
            host("a", "192.168.77.1", &["10.42.1.0/24", "10.42.9.0/24"]),
            host("b", "192.168.77.2", &["10.42.2.0/31", "10.42.3.0/30"]),
            host("c", "192.168.77.3", &["10.42.4.7/32"]),
            host("d", "192.168.77.4", &[]),
            host("e", "192.168.77.5", &["10.42.5.0/24"]),
        ]);
        r.hosts[4].workload_subnets = true;
        let c = Cluster::validate(&r).unwrap();
        assert_eq!(vtep_of(&c, "a").as_deref(), Some("10.42.1.0"));
        // A /31 has no spare address; the /30 after it has.
        assert_eq!(vtep_of(&c, "b").as_deref(), Some("10.42.3.0"));
        assert_eq!(vtep_of(&c, "c"), None);
        assert_eq!(vtep_of(&c, "d"), None);
        // Aggregated workload addresses: nothing is derived.
        assert_eq!(vtep_of(&c, "e"), None);

        let mut r6 = raw(vec![
            host("a", "2001:db8::1", &["fd42:0:0:1::/64"]),
            host("b", "2001:db8::2", &["fd42:0:0:2::/127"]),
        ]);
        r6.network.cidr = "fd42::/48".into();
        let c = Cluster::validate(&r6).unwrap();
        assert_eq!(vtep_of(&c, "a").as_deref(), Some("fd42:0:0:1::"));
        assert_eq!(vtep_of(&c, "b"), None);
    }

    #[test]
    fn an_explicit_vtep_may_sit_in_its_own_subnets_or_outside_them() {
        let r = raw(vec![
            with_vtep(host("a", "192.168.77.1", &["10.42.1.7/32"]), "10.42.1.7"),
            with_vtep(host("b", "192.168.77.2", &["10.42.2.0/24"]), "10.42.200.2"),
        ]);
        let c = Cluster::validate(&r).unwrap();
        assert_eq!(vtep_of(&c, "a").as_deref(), Some("10.42.1.7"));
        assert_eq!(vtep_of(&c, "b").as_deref(), Some("10.42.200.2"));
    }

    #[test]
    fn bad_vteps_name_the_field_and_the_reason() {
        let e = fails(&raw(vec![with_vtep(
            host("a", "192.168.77.1", &["10.42.1.0/24"]),
            "10.42.1.x",
        )]));
        assert_eq!(
            e.to_string(),
            r#"hosts[0] (id "a").vtep: "10.42.1.x" is not an IP address"#
        );

        let e = fails(&raw(vec![with_vtep(
            host("a", "192.168.77.1", &["10.42.1.0/24"]),
            "10.43.0.1",
        )]));
        assert_eq!(
            e.to_string(),
            r#"hosts[0] (id "a").vtep: vtep 10.43.0.1 is not inside the network cidr 10.42.0.0/16"#
        );

        // Inside another host's subnet: it may be one of that host's containers.
        let e = fails(&raw(vec![
            host("a", "192.168.77.1", &["10.42.1.0/24", "10.42.4.241/32"]),
            with_vtep(host("b", "192.168.77.2", &["10.42.2.0/24"]), "10.42.4.241"),
        ]));
        assert_eq!(
            e.to_string(),
            r#"hosts[1] (id "b").vtep: vtep 10.42.4.241 lies inside 10.42.4.241/32 of host "a", where it may be a workload's address"#
        );
        // Someone else's derived VTEP is inside that host's subnet too.
        let e = fails(&raw(vec![
            host("a", "192.168.77.1", &["10.42.1.0/24"]),
            with_vtep(host("b", "192.168.77.2", &["10.42.2.0/24"]), "10.42.1.0"),
        ]));
        assert!(matches!(e.what, Invalid::VtepInOtherHost { .. }), "{e}");

        let e = fails(&raw(vec![
            with_vtep(host("a", "192.168.77.1", &["10.42.1.0/24"]), "10.42.200.1"),
            with_vtep(host("b", "192.168.77.2", &["10.42.2.0/24"]), "10.42.200.1"),
        ]));
        assert_eq!(
            e.to_string(),
            r#"hosts[1] (id "b").vtep: vtep 10.42.200.1 is also the VTEP address of host "a""#
        );
    }

    #[test]
    fn accepts_and_sorts() {
        let c = Cluster::validate(&good()).unwrap();
        assert_eq!(c.hosts[0].id.as_str(), "host-a");
        assert_eq!(c.network.backend, Backend::Ipsec);
        assert_eq!(c.network.mtu, 1500);
        assert_eq!(
            c.host("host-b").unwrap().agent_ip.to_string(),
            "192.168.77.2"
        );
        assert!(c.host("host-c").is_none());
    }

    #[test]
    fn rejects_empty_host_list() {
        let e = fails(&raw(vec![]));
        assert_eq!(e.what, Invalid::NoHosts);
        assert_eq!(e.to_string(), "hosts: the host list is empty");
    }

    #[test]
    fn rejects_duplicate_id() {
        let mut r = good();
        r.hosts.push(host("host-a", "192.168.77.3", &[]));
        let e = fails(&r);
        assert!(
            matches!(e.what, Invalid::DuplicateId { first: 1, .. }),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("hosts[2] (id \"host-a\").id"),
            "{e}"
        );
    }

    #[test]
    fn rejects_duplicate_agent_ip() {
        let mut r = good();
        r.hosts.push(host("host-c", "192.168.77.2", &[]));
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::DuplicateAgentIp { .. }), "{e}");
        assert!(e.to_string().contains("host-b"), "{e}");
    }

    #[test]
    fn rejects_subnet_outside_cidr() {
        let mut r = good();
        r.hosts[0].subnets = vec!["10.43.2.0/24".into()];
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::OutsideCidr { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("hosts[0] (id \"host-b\").subnets[0]"),
            "{e}"
        );
    }

    #[test]
    fn rejects_overlap_across_hosts() {
        let mut r = good();
        r.hosts
            .push(host("host-c", "192.168.77.3", &["10.42.0.0/20"]));
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::SubnetOverlap { .. }), "{e}");
        assert!(e.to_string().contains("host-c"), "{e}");
    }

    #[test]
    fn rejects_overlap_within_host_and_identical() {
        let mut r = good();
        r.hosts[0].subnets = vec!["10.42.2.0/24".into(), "10.42.2.128/25".into()];
        assert!(matches!(fails(&r).what, Invalid::SubnetOverlap { .. }));
        let mut r = good();
        r.hosts[0].subnets = vec!["10.42.1.0/24".into()];
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::SubnetOverlap { .. }), "{e}");
    }

    #[test]
    fn overlap_check_is_not_fooled_by_a_nested_gap() {
        // 10.42.0.0/20 contains 10.42.8.0/24 even though 10.42.4.0/24 sorts between them.
        let r = raw(vec![
            host("a", "192.168.1.1", &["10.42.0.0/20"]),
            host("b", "192.168.1.2", &["10.42.4.0/24"]),
        ]);
        assert!(matches!(fails(&r).what, Invalid::SubnetOverlap { .. }));
        let r = raw(vec![
            host("a", "192.168.1.1", &["10.42.0.0/23", "10.42.8.0/24"]),
            host("b", "192.168.1.2", &["10.42.2.0/24"]),
        ]);
        assert!(Cluster::validate(&r).is_ok());
    }

    #[test]
    fn rejects_host_bits() {
        let mut r = good();
        r.hosts[0].subnets = vec!["10.42.2.5/24".into()];
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::HostBits { .. }), "{e}");
        assert!(e.to_string().contains("did you mean 10.42.2.0/24"), "{e}");
        let mut r = good();
        r.network.cidr = "10.42.1.0/16".into();
        let e = fails(&r);
        assert_eq!(e.location.to_string(), "network.cidr");
    }

    #[test]
    fn rejects_bad_addresses_and_prefixes() {
        for (bad, needle) in [
            ("10.42.2.0/33", "prefix length"),
            ("10.42.2/24", "is not an IP address"),
            ("10.42.2.0", "prefix length is missing"),
            ("fe80::/129", "prefix length"),
            ("", "prefix length is missing"),
        ] {
            let mut r = good();
            r.hosts[0].subnets = vec![bad.into()];
            let e = fails(&r);
            assert!(matches!(e.what, Invalid::BadPrefix { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        for bad in ["192.168.77.300", "host-b.example", "", "192.168.77.2/32"] {
            let mut r = good();
            r.hosts[0].agent_ip = bad.into();
            let e = fails(&r);
            assert!(matches!(e.what, Invalid::BadAddress { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("agent_ip"), "{e}");
        }
        for bad in ["0.0.0.0", "224.0.0.1", "::", "255.255.255.255"] {
            let mut r = good();
            r.hosts[0].agent_ip = bad.into();
            assert!(
                matches!(fails(&r).what, Invalid::UnusableAddress { .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_agent_ip_in_overlay() {
        let mut r = good();
        r.hosts[0].agent_ip = "10.42.200.1".into();
        let e = fails(&r);
        assert!(matches!(e.what, Invalid::AgentInOverlay { .. }), "{e}");
    }

    #[test]
    fn rejects_bad_ids() {
        let mut r = good();
        r.hosts[0].id = "".into();
        let e = fails(&r);
        assert_eq!(e.what, Invalid::EmptyId);
        assert_eq!(e.location.to_string(), "hosts[0].id");
        let mut r = good();
        r.hosts[0].id = "host b".into();
        assert!(matches!(
            fails(&r).what,
            Invalid::IdCharacter { character: ' ', .. }
        ));
        let mut r = good();
        r.hosts[0].id = "x".repeat(300);
        assert!(matches!(fails(&r).what, Invalid::IdTooLong { len: 300 }));
    }

    #[test]
    fn rejects_unknown_backend_and_mtu() {
        let mut r = good();
        r.network.backend = Some("wireguard".into());
        let e = fails(&r);
        assert!(e
            .to_string()
            .starts_with("network.backend: unknown backend \"wireguard\""));
        for m in [0, 1279, 9001, 65536] {
            let mut r = good();
            r.network.mtu = Some(m);
            let e = fails(&r);
            assert_eq!(e.what, Invalid::Mtu { value: m });
            assert_eq!(e.location.to_string(), "network.mtu");
        }
        for m in [1280, 9000] {
            let mut r = good();
            r.network.mtu = Some(m);
            assert_eq!(Cluster::validate(&r).unwrap().network.mtu as u32, m);
        }
    }

    #[test]
    fn ipv6_underlay_and_overlay() {
        let r = RawCluster {
            network: RawNetwork {
                cidr: "fd42::/48".into(),
                backend: Some("vxlan".into()),
                mtu: Some(9000),
            },
            hosts: vec![
                host("a", "2001:db8::1", &["fd42:0:0:1::/64"]),
                host("b", "2001:db8::2", &["fd42:0:0:2::/64"]),
            ],
        };
        let c = Cluster::validate(&r).unwrap();
        let mut mixed = r.clone();
        mixed.hosts[1].agent_ip = "192.0.2.1".into();
        assert!(matches!(
            fails(&mixed).what,
            Invalid::MixedFamily {
                family: 4,
                other_family: 6,
                ..
            }
        ));
        assert_eq!(c.network.backend, Backend::Vxlan);
        // A v4 subnet in a v6 overlay: refused by family, naming the JSON path.
        let mut r2 = r.clone();
        r2.hosts[0].subnets = vec!["10.0.0.0/24".into()];
        assert_eq!(
            fails(&r2).to_string(),
            r#"hosts[0] (id "a").subnets[0]: subnet 10.0.0.0/24 is IPv4 but the network cidr fd42::/48 is IPv6: one overlay family per network (for a dual-stack overlay, list one cidr per family: "cidr": ["10.42.0.0/16", "fd42::/48"])"#
        );
    }

    /// Issue 18: the underlay's family and the overlay's are independent (VXLAN and ESP
    /// tunnel mode carry either inner family over either outer one), but the overlay has one
    /// family: a host's subnets (and VTEP) all of the cidr's.
    #[test]
    fn ipv6_agent_ip_with_an_ipv4_overlay_and_single_family_overlays() {
        let r = raw(vec![
            host("a", "fd77::1", &["10.42.1.0/24"]),
            host("b", "2001:db8::2", &["10.42.2.0/24", "10.42.102.0/24"]),
        ]);
        let c = Cluster::validate(&r).unwrap();
        assert_eq!(c.host("a").unwrap().agent_ip.to_string(), "fd77::1");
        assert_eq!(vtep_of(&c, "b").as_deref(), Some("10.42.2.0"));
        // IPv4 agent_ip with an IPv6 overlay, likewise.
        let mut r4 = raw(vec![host("a", "192.168.77.1", &["fd42:0:0:1::/64"])]);
        r4.network.cidr = "fd42::/48".into();
        assert!(Cluster::validate(&r4).is_ok());

        // Mixed subnets of one host (dual-stack): refused at the other family's subnet.
        let mut mixed = r.clone();
        mixed.hosts[1].subnets = vec!["10.42.2.0/24".into(), "fd42:0:0:2::/64".into()];
        let e = fails(&mixed);
        assert_eq!(e.location.to_string(), r#"hosts[1] (id "b").subnets[1]"#);
        assert!(
            matches!(
                e.what,
                Invalid::OverlayFamily {
                    what: "subnet",
                    family: 6,
                    cidr_family: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("fd42:0:0:2::/64 is IPv6 but the network cidr 10.42.0.0/16 is IPv4"),
            "{e}"
        );
        // A VTEP of the other family.
        let e = fails(&raw(vec![with_vtep(
            host("a", "fd77::1", &["10.42.1.0/24"]),
            "fd42::1",
        )]));
        assert_eq!(
            e.to_string(),
            r#"hosts[0] (id "a").vtep: vtep fd42::1 is IPv6 but the network cidr 10.42.0.0/16 is IPv4: one overlay family per network (for a dual-stack overlay, list one cidr per family: "cidr": ["10.42.0.0/16", "fd42::/48"])"#
        );
        // Agent IPs still share one family (one underlay for every tunnel).
        let mut u = r.clone();
        u.hosts[1].agent_ip = "192.168.77.2".into();
        assert!(matches!(fails(&u).what, Invalid::MixedFamily { .. }));
    }

    fn dual(hosts: Vec<RawHost>) -> RawCluster {
        let mut r = raw(hosts);
        r.network.cidr = ["10.42.0.0/16", "fd42::/48"].into();
        r
    }

    /// Issue 18 item 2: `network.cidr` as a list of one prefix per family.
    #[test]
    fn dual_stack_overlay_accepted_with_subnets_of_both_families() {
        let r = dual(vec![
            host("b", "192.168.77.2", &["fd42:0:0:2::/64", "10.42.2.0/24"]),
            host("a", "192.168.77.1", &["10.42.1.0/24", "fd42:0:0:1::/64"]),
            // A host of one family only is fine too.
            host("c", "192.168.77.3", &["fd42:0:0:3::/64"]),
        ]);
        let c = Cluster::validate(&r).unwrap();
        assert!(c.network.dual_stack());
        assert_eq!(
            c.network.cidrs,
            vec![
                "10.42.0.0/16".parse::<IpNet>().unwrap(),
                "fd42::/48".parse().unwrap()
            ]
        );
        assert_eq!(c.network.cidr_of(true).unwrap().to_string(), "fd42::/48");
        assert_eq!(
            c.network.cidr_of(false).unwrap().to_string(),
            "10.42.0.0/16"
        );
        assert_eq!(c.network.to_string(), "10.42.0.0/16,fd42::/48");
        let b = c.host("b").unwrap();
        let subnets: Vec<String> = b.subnets.iter().map(|s| s.to_string()).collect();
        assert_eq!(subnets, ["10.42.2.0/24", "fd42:0:0:2::/64"]);
        // The default VTEP comes from the first listed family's subnets.
        assert_eq!(vtep_of(&c, "b").as_deref(), Some("10.42.2.0"));
        assert_eq!(vtep_of(&c, "c"), None);
        // An IPv6 underlay carries both families as well.
        let mut r6 = r.clone();
        for (i, h) in r6.hosts.iter_mut().enumerate() {
            h.agent_ip = format!("fd77::{}", i + 1);
        }
        assert!(Cluster::validate(&r6).is_ok());
        // A list of one prefix is a single-family network.
        let mut one = raw(vec![host("a", "192.168.77.1", &["10.42.1.0/24"])]);
        one.network.cidr = ["10.42.0.0/16"].into();
        let c1 = Cluster::validate(&one).unwrap();
        assert!(!c1.network.dual_stack());
        assert_eq!(c1.network.cidr_json(), serde_json::json!("10.42.0.0/16"));
        assert_eq!(
            c.network.cidr_json(),
            serde_json::json!(["10.42.0.0/16", "fd42::/48"])
        );
    }

    #[test]
    fn dual_stack_errors_name_the_json_path() {
        let cases: Vec<(RawCidr, &str)> = vec![
            (
                ["10.42.0.0/16", "10.43.0.0/16"].into(),
                "network.cidr[1]: a second IPv4 prefix (one per family)",
            ),
            (
                ["fd42::/48", "fd43::/48"].into(),
                "network.cidr[1]: a second IPv6 prefix (one per family)",
            ),
            (
                ["10.42.0.0/16", "fd42::1/48"].into(),
                "network.cidr[1]: \"fd42::1/48\" has host bits set (did you mean fd42::/48?)",
            ),
            (
                ["10.42.0.0/16", "fd42::/48", "fd43::/48"].into(),
                "network.cidr: 3 prefixes listed: at most two, one per family",
            ),
            (
                RawCidr::List(vec![]),
                "network.cidr: an empty list: give one prefix, or one per family for a dual-stack overlay",
            ),
            (
                ["nope", "fd42::/48"].into(),
                "network.cidr[0]: \"nope\" is not a prefix in CIDR notation (address/length): the prefix length is missing",
            ),
        ];
        for (cidr, want) in cases {
            let mut r = good();
            r.network.cidr = cidr.clone();
            assert_eq!(fails(&r).to_string(), want, "{cidr:?}");
        }
        // A subnet outside the cidr of its own family.
        let r = dual(vec![
            host("h1", "192.168.77.1", &["10.42.1.0/24"]),
            host("h2", "192.168.77.2", &["10.42.2.0/24"]),
            host("h3", "192.168.77.3", &["10.42.3.0/24", "fd43::/64"]),
        ]);
        assert_eq!(
            fails(&r).to_string(),
            r#"hosts[2] (id "h3").subnets[1]: fd43::/64 is outside the network's IPv6 cidr fd42::/48"#
        );
        let r = dual(vec![host(
            "h1",
            "192.168.77.1",
            &["fd42:0:0:1::/64", "10.43.0.0/24"],
        )]);
        assert_eq!(
            fails(&r).to_string(),
            r#"hosts[0] (id "h1").subnets[1]: 10.43.0.0/24 is outside the network's IPv4 cidr 10.42.0.0/16"#
        );
        // VTEPs: inside the cidr of their own family.
        let r = dual(vec![with_vtep(
            host("h1", "192.168.77.1", &["10.42.1.0/24"]),
            "fd43::1",
        )]);
        assert_eq!(
            fails(&r).to_string(),
            r#"hosts[0] (id "h1").vtep: vtep fd43::1 is outside the network's IPv6 cidr fd42::/48"#
        );
        let r = dual(vec![with_vtep(
            host("h1", "192.168.77.1", &["10.42.1.0/24"]),
            "fd42::1",
        )]);
        assert_eq!(
            vtep_of(&Cluster::validate(&r).unwrap(), "h1").as_deref(),
            Some("fd42::1")
        );
        // An agent IP inside either overlay.
        let r = dual(vec![host("h1", "fd42::ff:1", &["10.42.1.0/24"])]);
        assert!(matches!(fails(&r).what, Invalid::AgentInOverlay { .. }));
        // Overlaps stay per family and across hosts.
        let r = dual(vec![
            host("h1", "192.168.77.1", &["fd42:0:0:1::/64"]),
            host("h2", "192.168.77.2", &["fd42::/56"]),
        ]);
        assert!(matches!(fails(&r).what, Invalid::SubnetOverlap { .. }));
        // The vxlan backend carries one overlay family.
        let mut r = dual(vec![host("h1", "192.168.77.1", &["10.42.1.0/24"])]);
        r.network.backend = Some("vxlan".into());
        assert_eq!(
            fails(&r).to_string(),
            "network.cidr: a dual-stack overlay needs the ipsec backend (the vxlan backend carries one overlay family)"
        );
    }

    #[test]
    fn cidr_wire_format_string_or_list() {
        let one: RawNetwork = serde_json::from_str(r#"{"cidr":"10.42.0.0/16"}"#).unwrap();
        assert_eq!(one.cidr, "10.42.0.0/16");
        assert_eq!(
            serde_json::to_string(&one).unwrap(),
            r#"{"cidr":"10.42.0.0/16"}"#
        );
        let two: RawNetwork =
            serde_json::from_str(r#"{"cidr":["10.42.0.0/16","fd42::/48"],"mtu":1500}"#).unwrap();
        assert_eq!(two.cidr, RawCidr::from(["10.42.0.0/16", "fd42::/48"]));
        assert_eq!(
            serde_json::to_string(&two).unwrap(),
            r#"{"cidr":["10.42.0.0/16","fd42::/48"],"mtu":1500}"#
        );
        let e = serde_json::from_str::<RawNetwork>(r#"{"cidr":5}"#).unwrap_err();
        assert!(e.to_string().contains("a prefix"), "{e}");
        let e = serde_json::from_str::<RawNetwork>(r#"{"cidr":["10.42.0.0/16",5]}"#).unwrap_err();
        assert!(e.to_string().contains("expected a string"), "{e}");
    }

    #[test]
    fn self_discovery_by_address() {
        let c = Cluster::validate(&good()).unwrap();
        let found = c.host_by_agent_ip(&[
            "127.0.0.1".parse().unwrap(),
            "192.168.77.2".parse().unwrap(),
        ]);
        assert_eq!(found.unwrap().id.as_str(), "host-b");
        assert!(c
            .host_by_agent_ip(&["127.0.0.1".parse().unwrap()])
            .is_none());
    }
}
