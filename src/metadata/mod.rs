//! Metadata sources: where the cluster comes from.
//!
//! Every source produces a [`Snapshot`] holding a validated [`Cluster`] (through
//! [`Cluster::validate`], the one validation path) and a version string that changes whenever
//! the content may have changed. [`open`] picks the source from the `--metadata` argument:
//! an `http://` URL is a rancher-metadata service, an `etcd://` URL an etcd v3 cluster,
//! anything else a file.

pub mod etcd;
pub mod file;
pub mod json;
pub mod rancher;

use std::path::PathBuf;
use std::time::Duration;

use crate::model::{Cluster, HostId, ValidationError};

/// One consistent view of the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub cluster: Cluster,
    /// Opaque; different whenever the content may differ.
    pub version: String,
    /// The host this process runs on, when the source knows it (rancher-metadata's
    /// `/self/host`). A file does not.
    pub self_id: Option<HostId>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid UTF-8 (line {line}, column {column})")]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// Not JSON, or JSON of the wrong shape: `meta.json: network.mtu: invalid type: string
    /// "big", expected u32 (line 1, column 69)`.
    #[error("{origin}: {error}")]
    Parse {
        origin: String,
        #[source]
        error: json::JsonError,
    },
    #[error("{origin}: {error}")]
    Invalid {
        origin: String,
        #[source]
        error: ValidationError,
    },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: {message}")]
    Rancher { url: String, message: String },
    #[error("{origin}: {message}")]
    Etcd { origin: String, message: String },
}

/// A source of cluster metadata.
pub trait MetadataSource: Send {
    /// Human-readable origin (file path or URL), for logs and errors.
    fn origin(&self) -> String;

    /// Read and validate the current metadata.
    fn load(&mut self) -> Result<Snapshot, MetadataError>;

    /// The host this process runs on, when the caller knows it (`--host`): a source that
    /// would otherwise ask for it (rancher-metadata's `/self/host`) does not.
    fn set_self_host(&mut self, _host: &str) {}

    /// Largest answer a network source accepts (`--metadata-max-mb`).
    fn set_body_limit(&mut self, _bytes: u64) {}

    /// The records the last good load left out (partial validity: etcd's malformed host
    /// records), by key and why. Sources that are all-or-nothing have none.
    fn skipped(&self) -> Vec<etcd::Skipped> {
        Vec::new()
    }

    /// Block until the content may differ from `version`, or `max_wait` has passed.
    /// Returns the new version, or `None` when nothing changed within `max_wait`.
    fn wait_for_change(
        &mut self,
        version: &str,
        max_wait: Duration,
    ) -> Result<Option<String>, MetadataError>;
}

/// Why the host this process runs on could not be told.
#[derive(Debug, thiserror::Error)]
pub enum SelfHostError {
    #[error("host {host:?} is not in the metadata {origin} (known hosts: {known})")]
    Unknown {
        host: String,
        origin: String,
        known: String,
    },
    #[error("cannot tell which host of {origin} this is: no local address is the agent_ip of a host; {hint} (known hosts: {known})")]
    NoLocalMatch {
        origin: String,
        hint: &'static str,
        known: String,
    },
    #[error("cannot tell which host of {origin} this is: listing local addresses: {source}")]
    LocalAddresses {
        origin: String,
        #[source]
        source: std::io::Error,
    },
}

/// The host this process runs on, the one place every caller asks: `host` (`--host`, the
/// CNI config's `host`) if given and listed, else what the source says (rancher-metadata's
/// `/self/host`), else the host whose `agent_ip` is a local address. `hint` says how the
/// caller names the host explicitly (for the error when none matches).
pub fn self_host(
    snap: &Snapshot,
    origin: &str,
    host: Option<&str>,
    hint: &'static str,
) -> Result<String, SelfHostError> {
    let known = || snap.cluster.known_ids(8);
    if let Some(h) = host {
        if snap.cluster.host(h).is_none() {
            return Err(SelfHostError::Unknown {
                host: h.to_string(),
                origin: origin.to_string(),
                known: known(),
            });
        }
        return Ok(h.to_string());
    }
    if let Some(h) = &snap.self_id {
        return Ok(h.to_string());
    }
    let addrs =
        crate::localaddr::local_addresses().map_err(|source| SelfHostError::LocalAddresses {
            origin: origin.to_string(),
            source,
        })?;
    match snap.cluster.host_by_agent_ip(&addrs) {
        Some(h) => Ok(h.id.to_string()),
        None => Err(SelfHostError::NoLocalMatch {
            origin: origin.to_string(),
            hint,
            known: known(),
        }),
    }
}

/// [`open`], told the self host when `--host` names it and the largest answer to accept.
pub fn open_for(
    src: &str,
    host: Option<&str>,
    max_bytes: u64,
) -> Result<Box<dyn MetadataSource>, MetadataError> {
    let mut s = open(src)?;
    s.set_body_limit(max_bytes);
    if let Some(h) = host {
        s.set_self_host(h);
    }
    Ok(s)
}

/// Open the source named by a `--metadata` argument.
pub fn open(src: &str) -> Result<Box<dyn MetadataSource>, MetadataError> {
    if src.starts_with("etcd://") {
        Ok(Box::new(etcd::EtcdSource::new(src)?))
    } else if src.starts_with("http://") || src.starts_with("https://") {
        Ok(Box::new(rancher::RancherSource::new(src)?))
    } else {
        Ok(Box::new(file::FileSource::new(src)))
    }
}

/// A [`json::JsonError`] of the input read from `origin`.
pub(crate) fn json_error(origin: &str, error: json::JsonError) -> MetadataError {
    MetadataError::Parse {
        origin: origin.to_string(),
        error,
    }
}
