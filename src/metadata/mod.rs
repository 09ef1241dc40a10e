//! Metadata sources: where the cluster comes from.
//!
//! Every source produces a [`Snapshot`] holding a validated [`Cluster`] (through
//! [`Cluster::validate`], the one validation path) and a version string that changes whenever
//! the content may have changed. [`open`] picks the source from the `--metadata` argument:
//! an `http://` URL is a rancher-metadata service, anything else a file.

pub mod file;
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
    #[error("{path}:{line}:{column}: not valid UTF-8")]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
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
}

/// A source of cluster metadata.
pub trait MetadataSource: Send {
    /// Human-readable origin (file path or URL), for logs and errors.
    fn origin(&self) -> String;

    /// Read and validate the current metadata.
    fn load(&mut self) -> Result<Snapshot, MetadataError>;

    /// Block until the content may differ from `version`, or `max_wait` has passed.
    /// Returns the new version, or `None` when nothing changed within `max_wait`.
    fn wait_for_change(
        &mut self,
        version: &str,
        max_wait: Duration,
    ) -> Result<Option<String>, MetadataError>;
}

/// Open the source named by a `--metadata` argument.
pub fn open(src: &str) -> Result<Box<dyn MetadataSource>, MetadataError> {
    if src.starts_with("http://") || src.starts_with("https://") {
        Ok(Box::new(rancher::RancherSource::new(src)?))
    } else {
        Ok(Box::new(file::FileSource::new(src)))
    }
}

/// Split a serde_json error into position and message (its Display appends the position).
pub(crate) fn json_error(origin: &str, e: &serde_json::Error) -> MetadataError {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    };
    MetadataError::Parse {
        origin: origin.to_string(),
        line: e.line(),
        column: e.column(),
        message,
    }
}
