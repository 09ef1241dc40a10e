//! The rancher-metadata HTTP source (Rancher 1.x, e.g. `http://169.254.169.250/2015-12-19`).
//!
//! Two halves, kept apart so the mapping is testable without a network:
//!
//! - [`map_answers`] (pure): the metadata service's answers (`/self/host`, `/hosts`,
//!   `/containers`, `/networks`) -> a [`RawCluster`], which [`Cluster::validate`] then checks
//!   like any other source.
//! - [`RancherSource`] (I/O): plain-HTTP GETs with per-request timeouts, and the long-poll
//!   `GET /version?wait=true&value=<last>&maxWait=<secs>` for [`MetadataSource::wait_for_change`].
//!
//! Rancher's managed network is one flat overlay (default `10.42.0.0/16`) with one address per
//! container, so a host's subnets are the /32s of its containers on that network, aggregated
//! into the fewest prefixes. Unknown fields in Rancher's JSON are ignored (the service adds
//! fields between releases), unlike the native metadata file.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{json, json_error, MetadataError, MetadataSource, Snapshot};
use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};

/// The overlay when the managed network's metadata does not name one (Rancher's default).
pub const DEFAULT_CIDR: &str = "10.42.0.0/16";
/// Timeout of one ordinary request (connect, send, whole answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time the client gives a long-poll beyond the `maxWait` it asked the server for. The
/// real server re-checks a waiting poll only on a reload or on its 5 s tick, so a poll is held
/// up to `maxWait` + 5 s (maxWait=1: 3.7-5.0 s; maxWait=30: 30.0-30.8 s): the grace covers a
/// whole tick and a slow answer.
pub const WAIT_GRACE: Duration = Duration::from_secs(10);
/// Largest `maxWait` the real server honours (it caps larger values; 0 would mean 60 s).
pub const MAX_WAIT_SECS: u64 = 120;
/// How long the body of a large answer may take to arrive and decode once it has started
/// (`/containers` of thousands of hosts is tens of MB); the answer must start within the
/// request timeout.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer accepted by default (`--metadata-max-mb`): `/containers` of 4,500 hosts x 10
/// containers is 70 MB, and answers are decoded as they arrive, so memory follows the model,
/// not this limit.
pub const DEFAULT_BODY_LIMIT: u64 = 1024 * 1024 * 1024;
/// Largest error page read for the message.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

/// Container label of Rancher <= 1.1's per-host network agent (value `NetworkAgent`).
const LABEL_SYSTEM: &str = "io.rancher.container.system";
/// Labels the Rancher >= 1.2 network stacks (ipsec, vxlan) put on their per-host container.
const NETWORK_SERVICE_LABELS: [&str; 3] = [
    "io.rancher.network.macsync",
    "io.rancher.network.arpsync",
    "io.rancher.cni.link_mtu_overhead",
];
/// Container states whose address is live: what Rancher's plugin-manager counts as running
/// (`IsContainerConsideredRunning`: running, starting and stopping; a stopping container
/// still has traffic until it has stopped).
const LIVE_STATES: [&str; 3] = ["running", "starting", "stopping"];
/// A cniConfig value that is resolved per host from a host label, not a literal.
const HOST_LABEL_KEYWORD: &str = "__host_label__";

// ---------------------------------------------------------------------------------------------
// Wire shapes (field names as in rancher/go-rancher-metadata metadata/types.go). Only the
// fields used are declared; serde ignores the rest. Go marshals missing strings as "" and
// some as null, so optional fields accept both.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RancherHost {
    pub uuid: String,
    pub agent_ip: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RancherContainer {
    pub uuid: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub primary_ip: Option<String>,
    #[serde(default)]
    pub host_uuid: Option<String>,
    #[serde(default)]
    pub network_uuid: Option<String>,
    #[serde(default)]
    pub network_from_container_uuid: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub system: Option<bool>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RancherNetwork {
    pub uuid: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub is_default: Option<bool>,
    /// Free-form; the network driver's `cniConfig` (file name -> CNI config) lives here.
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// Everything one load reads from the metadata service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answers {
    pub self_host: RancherHost,
    pub hosts: Vec<RancherHost>,
    pub containers: Vec<RancherContainer>,
    pub networks: Vec<RancherNetwork>,
}

/// Which answer a mapping problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    SelfHost,
    Hosts,
    Containers,
    Networks,
}

impl Answer {
    /// The path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Answer::SelfHost => "/self/host",
            Answer::Hosts => "/hosts",
            Answer::Containers => "/containers",
            Answer::Networks => "/networks",
        }
    }
}

/// A problem in the answers that is not a model validation error (those come from
/// [`Cluster::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MapError {
    pub answer: Answer,
    pub message: String,
}

fn map_err(answer: Answer, message: String) -> MapError {
    MapError { answer, message }
}

/// `Some(s)` for a non-empty string.
fn present(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------
// The pure mapping.
// ---------------------------------------------------------------------------------------------

/// Map the answers to the wire shape of the model (not yet validated).
pub fn map_answers(a: &Answers) -> Result<RawCluster, MapError> {
    let self_uuid = a.self_host.uuid.as_str();
    if !a.hosts.iter().any(|h| h.uuid == self_uuid) {
        return Err(map_err(
            Answer::Hosts,
            format!(
                "the self host {self_uuid:?} (from {}) is not in the host list",
                Answer::SelfHost.path()
            ),
        ));
    }
    let net = managed_network(a)?;
    let net_index = a
        .networks
        .iter()
        .position(|n| std::ptr::eq(n, net))
        .unwrap_or_default();
    let raw_network = network_settings(net_index, net)?;

    // Host uuid -> its container addresses on the managed network.
    let mut addrs: HashMap<&str, Vec<IpNet>> = a
        .hosts
        .iter()
        .map(|h| (h.uuid.as_str(), Vec::new()))
        .collect();
    // Host uuid -> the managed-network address of its network agent container: the VTEP
    // address (as rancher-net used its own container's address), never a workload's.
    let mut vteps: HashMap<&str, ((bool, &str), IpAddr)> = HashMap::new();
    for (index, c) in a.containers.iter().enumerate() {
        if present(&c.network_uuid) != Some(net.uuid.as_str())
            || present(&c.network_from_container_uuid).is_some()
            || !present(&c.state).is_some_and(|s| LIVE_STATES.contains(&s))
        {
            continue;
        }
        let Some(ip) = present(&c.primary_ip) else {
            continue;
        };
        let ip: IpAddr = ip.parse().map_err(|_| {
            map_err(
                Answer::Containers,
                format!(
                    "[{index}] (uuid {:?}{}).primary_ip: {ip:?} is not an IP address",
                    c.uuid,
                    present(&c.name).map_or(String::new(), |n| format!(", name {n:?}")),
                ),
            )
        })?;
        let host = present(&c.host_uuid).unwrap_or("");
        if is_network_agent(c) {
            // Two agents on one host (an upgrade: the old one stopping, the new one starting):
            // prefer a running one, then the lowest uuid, so the answer's order (which the
            // server shuffles on every reload) changes nothing.
            let rank = (present(&c.state) != Some("running"), c.uuid.as_str());
            match vteps.get(host) {
                Some((r, _)) if *r <= rank => {}
                _ => {
                    vteps.insert(host, (rank, ip));
                }
            }
        }
        match addrs.get_mut(host) {
            Some(list) => list.push(IpNet::from(ip)),
            None => tracing::warn!(
                container = %c.uuid,
                host_uuid = host,
                "rancher-metadata: container on an unknown host; ignored"
            ),
        }
    }

    let hosts = a
        .hosts
        .iter()
        .map(|h| {
            let subnets = IpNet::aggregate(&addrs[h.uuid.as_str()])
                .iter()
                .map(IpNet::to_string)
                .collect();
            RawHost {
                id: h.uuid.clone(),
                agent_ip: h.agent_ip.clone(),
                subnets,
                name: present(&h.name)
                    .or(present(&h.hostname))
                    .map(str::to_string),
                labels: h.labels.clone().unwrap_or_default(),
                vtep: vteps.get(h.uuid.as_str()).map(|(_, ip)| ip.to_string()),
                // Every address in an aggregate of container /32s may be a container's.
                workload_subnets: true,
            }
        })
        .collect();
    Ok(RawCluster {
        network: raw_network,
        hosts,
    })
}

/// Whether `c` is a host's network agent: Rancher <= 1.1's `NetworkAgent` system container, or
/// the per-host container of a Rancher >= 1.2 network stack (ipsec/vxlan).
fn is_network_agent(c: &RancherContainer) -> bool {
    let labels = c.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(LABEL_SYSTEM) == Some("NetworkAgent")
        || (c.system == Some(true) && NETWORK_SERVICE_LABELS.iter().any(|k| label(k).is_some()))
}

/// Find Rancher's managed network, in order: the network of the self host's network agent
/// (as rancher-net uses its own container's network), the network named `ipsec`, the
/// environment's default network.
pub fn managed_network(a: &Answers) -> Result<&RancherNetwork, MapError> {
    let by_uuid = |uuid: &str| a.networks.iter().find(|n| n.uuid == uuid);
    let agent = a.containers.iter().find(|c| {
        present(&c.host_uuid) == Some(a.self_host.uuid.as_str())
            && present(&c.network_from_container_uuid).is_none()
            && present(&c.network_uuid).is_some()
            && is_network_agent(c)
    });
    if let Some(agent) = agent {
        let uuid = present(&agent.network_uuid).unwrap_or_default();
        return by_uuid(uuid).ok_or_else(|| {
            map_err(
                Answer::Networks,
                format!(
                    "network {uuid:?} of the network agent container {:?} on the self host is \
                     not in the network list",
                    agent.uuid
                ),
            )
        });
    }
    if let Some(n) = a
        .networks
        .iter()
        .find(|n| present(&n.name) == Some("ipsec"))
    {
        return Ok(n);
    }
    if let Some(n) = a.networks.iter().find(|n| n.is_default == Some(true)) {
        return Ok(n);
    }
    Err(map_err(
        Answer::Networks,
        format!(
            "no managed network: no network agent container on the self host {:?}, no network \
             named \"ipsec\" and no default network among {} networks",
            a.self_host.uuid,
            a.networks.len()
        ),
    ))
}

/// The network's CNI config files (`metadata.cniConfig`: file name -> config), if any.
fn cni_files(n: &RancherNetwork) -> Vec<(&str, &serde_json::Map<String, Value>)> {
    n.metadata
        .as_ref()
        .and_then(|m| m.get("cniConfig"))
        .and_then(Value::as_object)
        .map(|files| {
            files
                .iter()
                .filter_map(|(k, v)| v.as_object().map(|o| (k.as_str(), o)))
                .collect()
        })
        .unwrap_or_default()
}

/// cidr, backend and mtu from the managed network's metadata; `index` is its position in
/// the `/networks` answer (for the JSON path in errors).
fn network_settings(index: usize, n: &RancherNetwork) -> Result<RawNetwork, MapError> {
    let files = cni_files(n);
    let literal = |v: Option<&Value>| -> Option<String> {
        let s = v?.as_str()?.trim();
        (!s.is_empty() && !s.starts_with(HOST_LABEL_KEYWORD)).then(|| s.to_string())
    };
    let cidr = files
        .iter()
        .find_map(|(_, f)| {
            literal(f.get("bridgeSubnet"))
                .or_else(|| literal(f.get("ipam").and_then(|i| i.get("subnet"))))
        })
        .unwrap_or_else(|| DEFAULT_CIDR.to_string());

    let mut mtu = None;
    for (file, f) in &files {
        let bad = |v: &Value| {
            map_err(
                Answer::Networks,
                format!(
                    "[{index}] (uuid {:?}).metadata.cniConfig[{file:?}].mtu: {v} is not an MTU \
                     (a whole number of bytes)",
                    n.uuid
                ),
            )
        };
        let found = match f.get("mtu") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(v @ Value::String(s)) => Some(s.trim().parse::<u32>().map_err(|_| bad(v))?),
            Some(v @ Value::Number(num)) => Some(
                num.as_u64()
                    .and_then(|m| u32::try_from(m).ok())
                    .ok_or_else(|| bad(v))?,
            ),
            Some(v) => return Err(bad(v)),
        };
        if found.is_some() {
            mtu = found;
            break;
        }
    }

    let vxlan = present(&n.name) == Some("vxlan")
        || files.iter().any(|(file, f)| {
            file.contains("vxlan") || f.get("name").and_then(Value::as_str) == Some("vxlan")
        });
    Ok(RawNetwork {
        cidr: cidr.into(),
        backend: Some(if vxlan { "vxlan" } else { "ipsec" }.to_string()),
        mtu,
    })
}

/// Decode the JSON answer from `url`; errors name the URL, the JSON path in the answer and
/// the position (`.../hosts: [1].agent_ip: invalid type: ... (line 9, column 21)`).
pub fn parse_answer<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, MetadataError> {
    json::from_slice(body).map_err(|e| json_error(url, e))
}

/// A `/version` answer: a JSON string (`Accept: application/json`) or the bare text.
pub fn parse_version(origin: &str, body: &[u8]) -> Result<String, MetadataError> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let version = if text.starts_with('"') {
        json::from_str::<String>(text).map_err(|e| json_error(origin, e))?
    } else {
        text.to_string()
    };
    if version.is_empty() {
        return Err(MetadataError::Rancher {
            url: origin.to_string(),
            message: "the version is empty".to_string(),
        });
    }
    Ok(version)
}

/// Percent-encode a query value (everything but RFC 3986 unreserved characters).
fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP.
// ---------------------------------------------------------------------------------------------

pub struct RancherSource {
    base: String,
    agent: ureq::Agent,
    request_timeout: Duration,
    /// `--host`: the self host, so `/self/host` is not needed.
    self_host: Option<String>,
    /// Largest answer accepted, bytes.
    body_limit: u64,
}

impl RancherSource {
    /// `url` is the metadata service's versioned base URL, e.g.
    /// `http://169.254.169.250/2015-12-19`.
    pub fn new(url: &str) -> Result<RancherSource, MetadataError> {
        let base = url.trim().trim_end_matches('/').to_string();
        let rest = match base.strip_prefix("http://") {
            Some(rest) => rest,
            None => {
                let message = if base.starts_with("https://") {
                    "https is not supported for rancher-metadata (it is served over plain \
                     http inside the environment; TLS is for etcd:// sources)"
                } else {
                    "not an http:// URL"
                };
                return Err(MetadataError::Rancher {
                    url: url.to_string(),
                    message: message.to_string(),
                });
            }
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(MetadataError::Rancher {
                url: url.to_string(),
                message: "the URL has no host".to_string(),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The service is link-local (169.254.169.250): never go through a proxy from the
            // environment.
            .proxy(None)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("ipsec-mesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(RancherSource {
            base,
            agent,
            request_timeout: REQUEST_TIMEOUT,
            self_host: None,
            body_limit: DEFAULT_BODY_LIMIT,
        })
    }

    /// Override the timeout of ordinary requests (long-polls use `maxWait` + [`WAIT_GRACE`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> RancherSource {
        self.request_timeout = timeout;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `url`: the response of a 2xx answer, else an error naming the URL and status.
    /// `timeout` bounds the whole exchange.
    fn call(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, MetadataError> {
        self.call_with(url, timeout, None)
    }

    /// [`call`](Self::call); with `body`, `timeout` bounds the exchange up to the answer's
    /// headers and `body` the reading of the body.
    fn call_with(
        &self,
        url: &str,
        timeout: Duration,
        body: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>, MetadataError> {
        let http_err = |message: String| MetadataError::Http {
            url: url.to_string(),
            message,
        };
        let mut response = self
            .agent
            .get(url)
            .header("Accept", "application/json")
            .config()
            .timeout_global(Some(body.map_or(timeout, |b| timeout + b)))
            .timeout_recv_response(Some(timeout))
            .timeout_recv_body(body)
            .build()
            .call()
            .map_err(|e| http_err(describe(&e, timeout)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response
                .body_mut()
                .with_config()
                .limit(ERROR_BODY_LIMIT)
                .read_to_vec()
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            let snippet: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let snippet: String = snippet.chars().take(200).collect();
            let mut message = format!("HTTP status {status}");
            if !snippet.is_empty() {
                message.push_str(&format!(": {snippet}"));
            }
            return Err(http_err(message));
        }
        Ok(response)
    }

    fn too_large(&self, url: &str) -> MetadataError {
        MetadataError::Http {
            url: url.to_string(),
            message: format!(
                "the answer is larger than {} MiB (--metadata-max-mb)",
                self.body_limit / (1024 * 1024)
            ),
        }
    }

    /// GET `url`; the body of a 2xx answer.
    fn get(&self, url: &str, timeout: Duration) -> Result<Vec<u8>, MetadataError> {
        let mut response = self.call(url, timeout)?;
        response
            .body_mut()
            .with_config()
            .limit(self.body_limit)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => self.too_large(url),
                e => MetadataError::Http {
                    url: url.to_string(),
                    message: format!("reading the answer: {}", describe(&e, timeout)),
                },
            })
    }

    /// GET an answer and decode it as it arrives.
    fn get_json<T: DeserializeOwned>(&self, answer: Answer) -> Result<T, MetadataError> {
        let url = self.url(answer.path());
        let mut response = self.call_with(&url, self.request_timeout, Some(BODY_TIMEOUT))?;
        let reader = response
            .body_mut()
            .with_config()
            .limit(self.body_limit)
            .reader();
        json::from_reader(reader).map_err(|e| {
            if e.message.contains("exceeds limit") || e.message.contains("larger than") {
                self.too_large(&url)
            } else {
                json_error(&url, e)
            }
        })
    }

    fn version(&self) -> Result<String, MetadataError> {
        let url = self.url("/version");
        let body = self.get(&url, self.request_timeout)?;
        parse_version(&url, &body)
    }

    /// Read all the answers (the version first, so the snapshot is never newer than it).
    /// With `--host` the self host is that entry of `/hosts`, and `/self/host` is not asked.
    fn read(&self) -> Result<(String, Answers), MetadataError> {
        let version = self.version()?;
        let hosts: Vec<RancherHost> = self.get_json(Answer::Hosts)?;
        let self_host = match &self.self_host {
            Some(id) => hosts
                .iter()
                .find(|h| h.uuid == *id)
                .cloned()
                .ok_or_else(|| MetadataError::Rancher {
                    url: self.url(Answer::Hosts.path()),
                    message: format!("--host {id:?} is not the uuid of a listed host"),
                })?,
            None => self.self_host_answer()?,
        };
        let answers = Answers {
            self_host,
            hosts,
            containers: self.get_json(Answer::Containers)?,
            networks: self.get_json(Answer::Networks)?,
        };
        Ok((version, answers))
    }

    /// `/self/host`, with the real server's two ways of not knowing said in words: `200 null`
    /// (this container points at a host no longer listed) and 404.
    fn self_host_answer(&self) -> Result<RancherHost, MetadataError> {
        let url = self.url(Answer::SelfHost.path());
        let body = match self.get(&url, self.request_timeout) {
            Ok(b) => b,
            Err(MetadataError::Http { message, .. }) if message.contains("404") => {
                return Err(MetadataError::Rancher {
                    url,
                    message:
                        "HTTP status 404 Not Found: rancher-metadata does not know which host this \
                              container runs on; pass --host"
                            .into(),
                });
            }
            Err(e) => return Err(e),
        };
        if body.trim_ascii() == b"null" {
            return Err(MetadataError::Rancher {
                url,
                message: "null: rancher-metadata knows this container but not its host (it \
                          points at a host no longer listed); pass --host"
                    .into(),
            });
        }
        parse_answer(&url, &body)
    }
}

fn describe(e: &ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "cannot connect: connection refused (is rancher-metadata running?)".to_string()
        }
        ureq::Error::Io(io) => format!("request failed: {io}"),
        ureq::Error::Timeout(t) => {
            format!("no complete answer within {}s ({t})", timeout.as_secs_f64())
        }
        ureq::Error::HostNotFound => "cannot resolve the host name".to_string(),
        ureq::Error::ConnectionFailed => "cannot connect".to_string(),
        other => format!("request failed: {other}"),
    }
}

impl MetadataSource for RancherSource {
    fn origin(&self) -> String {
        self.base.clone()
    }

    fn set_body_limit(&mut self, bytes: u64) {
        self.body_limit = bytes;
    }

    fn set_self_host(&mut self, host: &str) {
        self.self_host = Some(host.to_string());
    }

    fn load(&mut self) -> Result<Snapshot, MetadataError> {
        let (version, answers) = self.read()?;
        let raw = map_answers(&answers).map_err(|e| MetadataError::Rancher {
            url: self.url(e.answer.path()),
            message: e.message,
        })?;
        let cluster = Cluster::validate(&raw).map_err(|error| MetadataError::Invalid {
            origin: self.base.clone(),
            error,
        })?;
        // map_answers checked the self host is listed, and validation accepted its id.
        let self_id = cluster
            .host(&answers.self_host.uuid)
            .map(|h| h.id.clone())
            .ok_or_else(|| MetadataError::Rancher {
                url: self.url(Answer::SelfHost.path()),
                message: format!(
                    "the self host {:?} is not in the host list",
                    answers.self_host.uuid
                ),
            })?;
        tracing::debug!(
            origin = %self.base,
            %version,
            hosts = cluster.hosts.len(),
            cidr = %cluster.network,
            "rancher-metadata loaded"
        );
        Ok(Snapshot {
            cluster,
            version,
            self_id: Some(self_id),
        })
    }

    fn wait_for_change(
        &mut self,
        version: &str,
        max_wait: Duration,
    ) -> Result<Option<String>, MetadataError> {
        // The service takes whole seconds; round up so we never return before max_wait.
        let secs = max_wait.as_secs() + u64::from(max_wait.subsec_nanos() > 0);
        let secs = secs.clamp(1, MAX_WAIT_SECS);
        let url = self.url(&format!(
            "/version?wait=true&value={}&maxWait={secs}",
            encode_query_value(version)
        ));
        let body = self.get(&url, Duration::from_secs(secs) + WAIT_GRACE)?;
        let now = parse_version(&url, &body)?;
        Ok((now != version).then_some(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host(uuid: &str, ip: &str) -> Value {
        json!({ "uuid": uuid, "name": format!("name-{uuid}"), "agent_ip": ip,
                "hostname": format!("{uuid}.example"), "labels": { "zone": "a" },
                "memory": 4096, "host_id": 7 })
    }

    fn container(uuid: &str, host: &str, ip: &str, network: &str, state: &str) -> Value {
        json!({ "uuid": uuid, "name": format!("c-{uuid}"), "primary_ip": ip,
                "host_uuid": host, "network_uuid": network, "state": state,
                "network_from_container_uuid": "", "system": false, "labels": {},
                "ips": [ip], "create_index": 1 })
    }

    fn ipsec_network(meta: Value) -> Value {
        json!({ "uuid": "net-ipsec", "name": "ipsec", "is_default": true,
                "host_ports": true, "default_policy_action": "allow", "metadata": meta })
    }

    fn answers(hosts: Value, containers: Value, networks: Value) -> Answers {
        Answers {
            self_host: serde_json::from_value(hosts[0].clone()).unwrap(),
            hosts: serde_json::from_value(hosts).unwrap(),
            containers: serde_json::from_value(containers).unwrap(),
            networks: serde_json::from_value(networks).unwrap(),
        }
    }

    fn two_hosts() -> Value {
        json!([host("h1", "192.168.1.1"), host("h2", "192.168.1.2")])
    }

    fn cni(file: &str, conf: Value) -> Value {
        json!({ "cniConfig": { file: conf } })
    }

    #[test]
    fn maps_hosts_and_aggregates_live_containers() {
        let mut sidekick = container("side", "h1", "10.42.0.8", "net-ipsec", "running");
        sidekick["network_from_container_uuid"] = json!("c1");
        let a = answers(
            two_hosts(),
            json!([
                container("c1", "h1", "10.42.0.8", "net-ipsec", "running"),
                container("c2", "h1", "10.42.0.9", "net-ipsec", "starting"),
                container("c3", "h1", "10.42.0.10", "net-ipsec", "running"),
                container("c4", "h1", "10.42.0.11", "net-ipsec", "running"),
                container("stopped", "h1", "10.42.0.12", "net-ipsec", "stopped"),
                sidekick,
                container("noip", "h1", "", "net-ipsec", "running"),
                container("bridge", "h1", "172.17.0.2", "net-bridge", "running"),
                container("other", "h2", "10.42.7.1", "net-ipsec", "running"),
            ]),
            json!([ipsec_network(json!({})), { "uuid": "net-bridge", "name": "bridge" }]),
        );
        let raw = map_answers(&a).unwrap();
        assert_eq!(raw.network.cidr, DEFAULT_CIDR);
        assert_eq!(raw.network.backend.as_deref(), Some("ipsec"));
        assert_eq!(raw.network.mtu, None);
        assert_eq!(raw.hosts.len(), 2);
        assert_eq!(raw.hosts[0].id, "h1");
        assert_eq!(raw.hosts[0].agent_ip, "192.168.1.1");
        assert_eq!(raw.hosts[0].name.as_deref(), Some("name-h1"));
        assert_eq!(
            raw.hosts[0].labels.get("zone").map(String::as_str),
            Some("a")
        );
        assert_eq!(raw.hosts[0].subnets, vec!["10.42.0.8/30"]);
        assert_eq!(raw.hosts[1].subnets, vec!["10.42.7.1/32"]);
        let c = Cluster::validate(&raw).unwrap();
        assert_eq!(c.hosts.len(), 2);
    }

    fn agent(uuid: &str, host: &str, ip: &str, state: &str) -> Value {
        let mut c = container(uuid, host, ip, "net-ipsec", state);
        c["system"] = json!(true);
        c["labels"] = json!({ "io.rancher.network.macsync": "true" });
        c
    }

    #[test]
    fn the_vtep_is_the_hosts_network_agent_never_a_workload() {
        // Random /32s as Rancher hands them out: h1's first (lowest) address is a workload's
        // (10.42.1.179, the address the VTEP once took); its agent is 10.42.200.3. During an
        // upgrade h2 has two agents, the stopping old one and the running new one.
        let a = answers(
            json!([
                host("h1", "192.168.1.1"),
                host("h2", "192.168.1.2"),
                host("h3", "192.168.1.3")
            ]),
            json!([
                container("db", "h1", "10.42.1.179", "net-ipsec", "running"),
                agent("agent-1", "h1", "10.42.200.3", "running"),
                agent("agent-2-old", "h2", "10.42.4.9", "stopping"),
                container("web", "h2", "10.42.4.241", "net-ipsec", "running"),
                agent("agent-2-new", "h2", "10.42.66.6", "running"),
                agent("agent-3-gone", "h3", "10.42.9.9", "stopped"),
                container("app", "h3", "10.42.0.4", "net-ipsec", "running"),
                container("app2", "h3", "10.42.0.5", "net-ipsec", "running"),
            ]),
            json!([ipsec_network(json!({}))]),
        );
        let raw = map_answers(&a).unwrap();
        let vtep = |i: usize| raw.hosts[i].vtep.clone();
        assert_eq!(vtep(0).as_deref(), Some("10.42.200.3"));
        assert_eq!(vtep(1).as_deref(), Some("10.42.66.6"));
        assert_eq!(vtep(2), None);
        assert!(raw.hosts.iter().all(|h| h.workload_subnets));
        let c = Cluster::validate(&raw).unwrap();
        // h3's aggregate 10.42.0.4/31 starts with a container: nothing is derived from it.
        assert_eq!(
            c.host("h3").unwrap().subnets,
            ["10.42.0.4/31".parse().unwrap()]
        );
        assert_eq!(c.host("h3").unwrap().vtep, None);
        // The answer's order changes nothing (the real server shuffles on every reload).
        let mut b = a.clone();
        b.containers.reverse();
        assert_eq!(map_answers(&b).unwrap(), raw);
    }

    #[test]
    fn host_without_containers_has_no_subnets_and_name_falls_back_to_hostname() {
        let mut hosts = two_hosts();
        hosts[1]["name"] = json!("");
        let a = answers(hosts, json!([]), json!([ipsec_network(Value::Null)]));
        let raw = map_answers(&a).unwrap();
        assert!(raw.hosts.iter().all(|h| h.subnets.is_empty()));
        assert_eq!(raw.hosts[1].name.as_deref(), Some("h2.example"));
    }

    #[test]
    fn finds_the_network_of_the_self_hosts_agent() {
        // The agent (1.1 style label) is on "managed"; an "ipsec"-named network also exists.
        let mut agent = container("agent", "h1", "10.50.0.2", "managed", "running");
        agent["labels"] = json!({ "io.rancher.container.system": "NetworkAgent" });
        let mut holder = container("holder", "h2", "10.42.0.2", "net-ipsec", "running");
        holder["system"] = json!(true);
        holder["labels"] = json!({ "io.rancher.network.arpsync": "true" });
        let a = answers(
            two_hosts(),
            json!([holder, agent]),
            json!([ipsec_network(json!({})),
                   { "uuid": "managed", "name": "custom",
                     "metadata": cni("10-rancher.conf", json!({ "bridgeSubnet": "10.50.0.0/16" })) }]),
        );
        assert_eq!(managed_network(&a).unwrap().uuid, "managed");
        let raw = map_answers(&a).unwrap();
        assert_eq!(raw.network.cidr, "10.50.0.0/16");
        assert_eq!(raw.hosts[0].subnets, vec!["10.50.0.2/32"]);
        assert!(raw.hosts[1].subnets.is_empty());

        // 1.2 style: a system container with the network stack's labels.
        let mut holder = container("holder", "h1", "10.42.0.2", "net-ipsec", "running");
        holder["system"] = json!(true);
        holder["labels"] = json!({ "io.rancher.cni.link_mtu_overhead": "0" });
        let a = answers(
            two_hosts(),
            json!([holder]),
            json!([{ "uuid": "first", "name": "bridge", "is_default": true },
                   { "uuid": "net-ipsec", "name": "whatever" }]),
        );
        assert_eq!(managed_network(&a).unwrap().uuid, "net-ipsec");

        // The agent's network is missing from /networks.
        let mut agent = container("agent", "h1", "10.42.0.2", "gone", "running");
        agent["labels"] = json!({ "io.rancher.container.system": "NetworkAgent" });
        let a = answers(
            two_hosts(),
            json!([agent]),
            json!([ipsec_network(json!({}))]),
        );
        let e = map_answers(&a).unwrap_err();
        assert_eq!(e.answer, Answer::Networks);
        assert!(
            e.message.contains("\"gone\"") && e.message.contains("\"agent\""),
            "{e}"
        );
    }

    #[test]
    fn falls_back_to_the_ipsec_name_then_the_default_network() {
        let a = answers(
            two_hosts(),
            json!([]),
            json!([{ "uuid": "d", "name": "default-net", "is_default": true },
                   { "uuid": "i", "name": "ipsec" }]),
        );
        assert_eq!(managed_network(&a).unwrap().uuid, "i");
        let a = answers(
            two_hosts(),
            json!([]),
            json!([{ "uuid": "b", "name": "bridge" }, { "uuid": "d", "is_default": true }]),
        );
        assert_eq!(managed_network(&a).unwrap().uuid, "d");
        let a = answers(
            two_hosts(),
            json!([]),
            json!([{ "uuid": "b", "name": "bridge" }]),
        );
        let e = map_answers(&a).unwrap_err();
        assert_eq!(e.answer, Answer::Networks);
        assert!(e.message.starts_with("no managed network"), "{e}");
    }

    #[test]
    fn network_settings_from_cni_config() {
        let settings = |meta: Value, name: &str| {
            let mut n = ipsec_network(meta);
            n["name"] = json!(name);
            network_settings(2, &serde_json::from_value(n).unwrap())
        };
        let real = cni(
            "10-rancher.conf",
            json!({ "name": "rancher-cni-network", "type": "rancher-bridge", "bridge": "docker0",
                    "bridgeSubnet": "10.43.0.0/16", "mtu": 1400, "linkMTUOverhead": 98,
                    "ipam": { "type": "rancher-cni-ipam", "logToFile": "/var/log/rancher-cni.log" } }),
        );
        let s = settings(real, "ipsec").unwrap();
        assert_eq!(
            (s.cidr.as_str(), s.backend.as_deref(), s.mtu),
            ("10.43.0.0/16", Some("ipsec"), Some(1400))
        );

        let ipam = cni(
            "10-x.conf",
            json!({ "ipam": { "subnet": "10.44.0.0/16" }, "mtu": "9000" }),
        );
        let s = settings(ipam, "ipsec").unwrap();
        assert_eq!((s.cidr.as_str(), s.mtu), ("10.44.0.0/16", Some(9000)));

        // A per-host keyword is not an overlay cidr: fall back to the default.
        let keyword = cni(
            "10-rancher.conf",
            json!({ "bridgeSubnet": "__host_label__: subnet", "mtu": "" }),
        );
        let s = settings(keyword, "ipsec").unwrap();
        assert_eq!((s.cidr.as_str(), s.mtu), (DEFAULT_CIDR, None));

        let vx = cni(
            "10-rancher-vxlan.conf",
            json!({ "bridgeSubnet": "10.42.0.0/16" }),
        );
        assert_eq!(
            settings(vx, "overlay").unwrap().backend.as_deref(),
            Some("vxlan")
        );
        assert_eq!(
            settings(json!({}), "vxlan").unwrap().backend.as_deref(),
            Some("vxlan")
        );

        for bad in [
            json!("big"),
            json!(-1),
            json!(1.5),
            json!(true),
            json!(5_000_000_000u64),
        ] {
            let meta = cni("10-rancher.conf", json!({ "mtu": bad }));
            let e = settings(meta, "ipsec").unwrap_err();
            assert_eq!(
                e.message,
                format!(
                    "[2] (uuid \"net-ipsec\").metadata.cniConfig[\"10-rancher.conf\"].mtu: \
                     {bad} is not an MTU (a whole number of bytes)"
                )
            );
            assert_eq!(e.answer, Answer::Networks);
        }
    }

    #[test]
    fn ipv6_agent_ips_and_an_ipv6_managed_network_map_through() {
        // Rancher 1.6's own IPAM hands out IPv4 only, but a host registered with an IPv6
        // CATTLE_AGENT_IP and a managed network whose CNI config names an IPv6 subnet carry
        // over: agent_ip as given (the tunnel endpoints), container addresses as /128s
        // (aggregated like /32s), and the cluster validates (an IPv6 mesh on an IPv6 underlay).
        let hosts = json!([host("h1", "fd77::1"), host("h2", "fd77::2")]);
        let net = ipsec_network(cni(
            "10-rancher.conf",
            json!({ "bridgeSubnet": "fd42::/48", "mtu": 1500 }),
        ));
        let a = answers(
            hosts.clone(),
            json!([
                container("c1", "h1", "fd42::8", "net-ipsec", "running"),
                container("c2", "h1", "fd42::9", "net-ipsec", "running"),
                container("c3", "h2", "fd42::1:5", "net-ipsec", "running"),
            ]),
            json!([net.clone()]),
        );
        let raw = map_answers(&a).unwrap();
        assert_eq!(raw.network.cidr.as_str(), "fd42::/48");
        assert_eq!(raw.hosts[0].agent_ip, "fd77::1");
        assert_eq!(raw.hosts[0].subnets, vec!["fd42::8/127"]);
        assert_eq!(raw.hosts[1].subnets, vec!["fd42::1:5/128"]);
        let c = Cluster::validate(&raw).unwrap();
        assert!(c.hosts.iter().all(|h| h.agent_ip.is_ipv6()));

        // IPv4 containers (what Rancher's IPAM gives) over IPv6 agent_ips: v4-in-v6 tunnels.
        let a = answers(
            hosts,
            json!([
                container("c1", "h1", "10.42.0.8", "net-ipsec", "running"),
                container("c3", "h2", "10.42.7.1", "net-ipsec", "running"),
            ]),
            json!([ipsec_network(json!({}))]),
        );
        let raw = map_answers(&a).unwrap();
        let c = Cluster::validate(&raw).unwrap();
        assert!(c.hosts[0].agent_ip.is_ipv6() && c.hosts[0].subnets[0].addr().is_ipv4());
    }

    #[test]
    fn bad_primary_ip_names_the_container_unless_the_container_is_unused() {
        let a = answers(
            two_hosts(),
            json!([container(
                "c-bad",
                "h1",
                "10.42.0.300",
                "net-ipsec",
                "running"
            )]),
            json!([ipsec_network(json!({}))]),
        );
        let e = map_answers(&a).unwrap_err();
        assert_eq!(e.answer, Answer::Containers);
        assert_eq!(
            e.message,
            "[0] (uuid \"c-bad\", name \"c-c-bad\").primary_ip: \"10.42.0.300\" is not an IP address"
        );
        let a = answers(
            two_hosts(),
            json!([container("c-bad", "h1", "garbage", "net-ipsec", "stopped")]),
            json!([ipsec_network(json!({}))]),
        );
        assert!(map_answers(&a).is_ok());
    }

    #[test]
    fn container_on_unknown_host_is_skipped_and_self_host_must_be_listed() {
        let a = answers(
            two_hosts(),
            json!([container("c", "h9", "10.42.0.1", "net-ipsec", "running")]),
            json!([ipsec_network(json!({}))]),
        );
        let raw = map_answers(&a).unwrap();
        assert!(raw.hosts.iter().all(|h| h.subnets.is_empty()));

        let mut a = a;
        a.self_host.uuid = "h9".into();
        let e = map_answers(&a).unwrap_err();
        assert_eq!(e.answer, Answer::Hosts);
        assert!(e.message.contains("\"h9\""), "{e}");
    }

    #[test]
    fn nulls_and_unknown_fields_are_accepted() {
        let c: RancherContainer = serde_json::from_value(json!({
            "uuid": "x", "primary_ip": null, "labels": null, "health_state": null,
            "brand_new_field": { "nested": [1, 2] } }))
        .unwrap();
        assert_eq!(c.primary_ip, None);
        let e = serde_json::from_value::<RancherHost>(json!({ "uuid": "x" })).unwrap_err();
        assert!(e.to_string().contains("missing field `agent_ip`"), "{e}");
    }

    const URL: &str = "http://h/2015-12-19/hosts";

    fn answer_error<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> json::JsonError {
        match parse_answer::<T>(URL, body.as_bytes()).unwrap_err() {
            MetadataError::Parse { origin, error } => {
                assert_eq!(origin, URL);
                error
            }
            e => panic!("expected a parse error, got {e}"),
        }
    }

    fn pretty(v: &Value) -> String {
        serde_json::to_string_pretty(v).unwrap()
    }

    /// The line (1-based) of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn answer_errors_name_the_json_path() {
        // A wrong type at a nested position of /hosts.
        let mut hosts = two_hosts();
        hosts[1]["agent_ip"] = json!(5);
        let body = pretty(&hosts);
        let e = answer_error::<Vec<RancherHost>>(&body);
        assert_eq!(e.path, "[1].agent_ip");
        assert_eq!(e.message, "invalid type: integer `5`, expected a string");
        assert_eq!(e.line, line_of(&body, "\"agent_ip\": 5"));
        let msg = parse_answer::<Vec<RancherHost>>(URL, body.as_bytes())
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!(
                "{URL}: [1].agent_ip: invalid type: integer `5`, expected a string (line {}, column {})",
                e.line, e.column
            )
        );

        // A label value that is not a string: its key is not an identifier, so it is quoted.
        let mut hosts = two_hosts();
        hosts[0]["labels"] = json!({ "io.rancher.host.zone": 3 });
        let e = answer_error::<Vec<RancherHost>>(&pretty(&hosts));
        assert_eq!(e.path, "[0].labels[\"io.rancher.host.zone\"]");

        // A missing field names the object it is missing from.
        let mut hosts = two_hosts();
        hosts[1].as_object_mut().unwrap().remove("agent_ip");
        let e = answer_error::<Vec<RancherHost>>(&pretty(&hosts));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("[1]", "missing field `agent_ip`")
        );

        // /self/host, /containers and /networks alike.
        let body = r#"{"uuid": ["h1"], "agent_ip": "192.168.1.1"}"#;
        let e = answer_error::<RancherHost>(body);
        // serde_json reports the column of the character before the unexpected `[`.
        let column = body.find('[').unwrap();
        assert_eq!((e.path.as_str(), e.line, e.column), ("uuid", 1, column));
        let mut containers = json!([container("c1", "h1", "10.42.0.8", "net-ipsec", "running")]);
        containers[0]["system"] = json!("no");
        let e = answer_error::<Vec<RancherContainer>>(&pretty(&containers));
        assert_eq!(e.path, "[0].system");
        assert!(e.message.contains("expected a boolean"), "{e}");
        let e = answer_error::<Vec<RancherNetwork>>(r#"[{"uuid": "n", "is_default": 1}]"#);
        assert_eq!(e.path, "[0].is_default");

        // The wrong shape for the whole answer has no path, only the position.
        let e = answer_error::<Vec<RancherHost>>(r#"{"uuid": "h1"}"#);
        assert_eq!(e.path, "");
        assert!(e.message.contains("expected a sequence"), "{e}");

        // Unknown fields are Rancher's additions between releases: accepted.
        let mut hosts = two_hosts();
        hosts[0]["brand_new"] = json!({ "x": [1] });
        assert!(parse_answer::<Vec<RancherHost>>(URL, pretty(&hosts).as_bytes()).is_ok());
    }

    #[test]
    fn truncated_answer_keeps_line_column_and_the_open_path() {
        let body = pretty(&two_hosts());
        let cut = &body[..body.rfind("\"labels\"").unwrap()];
        let e = answer_error::<Vec<RancherHost>>(cut);
        assert_eq!(e.path, "[1]");
        assert!(e.message.starts_with("EOF while parsing"), "{e}");
        assert_eq!(e.line, cut.lines().count());
        assert!(e.column > 0, "{e}");
    }

    #[test]
    fn version_answers_and_query_encoding() {
        assert_eq!(parse_version("u", b"\"42\"\n").unwrap(), "42");
        assert_eq!(
            parse_version("u", b" 2016-01-01-abc \n").unwrap(),
            "2016-01-01-abc"
        );
        assert_eq!(
            parse_version("u", b"\"42").unwrap_err().to_string(),
            "u: EOF while parsing a string (line 1, column 3)"
        );
        assert_eq!(
            parse_version("u", b"\"42\" x").unwrap_err().to_string(),
            "u: trailing characters (line 1, column 6)"
        );
        assert!(matches!(
            parse_version("u", b"  "),
            Err(MetadataError::Rancher { .. })
        ));
        assert_eq!(encode_query_value("a-b.c_d~1"), "a-b.c_d~1");
        assert_eq!(encode_query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn new_rejects_non_http_urls() {
        assert!(RancherSource::new("http://169.254.169.250/2015-12-19/").is_ok());
        for bad in [
            "https://x/2015-12-19",
            "ftp://x",
            "/etc/meta.json",
            "http://",
            "http:///x",
        ] {
            let e = RancherSource::new(bad).err().expect(bad);
            assert!(matches!(e, MetadataError::Rancher { .. }), "{bad}: {e}");
        }
        let s = RancherSource::new("http://h/2015-12-19/").unwrap();
        assert_eq!(s.origin(), "http://h/2015-12-19");
        // The binary has TLS (for etcd): the message says why https is refused here
        // without claiming otherwise.
        let e = RancherSource::new("https://x/2015-12-19").err().unwrap();
        let text = e.to_string();
        assert!(
            text.contains("https is not supported for rancher-metadata")
                && text.contains("TLS is for etcd:// sources")
                && !text.contains("built without TLS"),
            "{text}"
        );
    }
}
