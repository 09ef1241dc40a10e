//! The mesh as the plugins see it: load the metadata once, find this host, plan its MTU.
//!
//! A metadata service that does not answer is a transient condition (code 11: the runtime
//! retries); metadata that is invalid, or that does not know this host, is not (codes 101 and
//! 102, with the reason). Nothing here polls or waits beyond one request's timeout.

use crate::metadata::{self, MetadataError, Snapshot};
use crate::plan::{self, PlanOptions, Transform};

use super::config::MeshRef;
use super::spec::{code, CniError};

/// The loaded metadata and this host's id.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub snapshot: Snapshot,
    pub self_id: String,
}

/// The CNI error for a metadata failure.
pub fn metadata_error(e: &MetadataError) -> CniError {
    let c = match e {
        MetadataError::Http { .. } => code::TRY_AGAIN,
        _ => code::METADATA,
    };
    CniError::new(c, format!("mesh metadata: {e}"))
}

/// Load `src` and find this host: `host` if given, else what the source says (rancher's
/// `/self/host`), else the host whose `agent_ip` is a local address.
pub fn load(src: &str, host: Option<&str>) -> Result<Mesh, CniError> {
    let snapshot = metadata::open_for(src, host, crate::metadata::rancher::DEFAULT_BODY_LIMIT)
        .and_then(|mut s| s.load())
        .map_err(|e| metadata_error(&e))?;
    let self_id = self_host(&snapshot, src, host)?;
    Ok(Mesh { snapshot, self_id })
}

fn self_host(snap: &Snapshot, src: &str, host: Option<&str>) -> Result<String, CniError> {
    metadata::self_host(snap, src, host, "set \"host\" in the ipam section")
        .map_err(|e| CniError::new(code::UNKNOWN_HOST, e.to_string()))
}

/// (container MTU, underlay MTU) the planner gives this host for `mesh`'s transform.
pub fn plan_mtu(mesh: &MeshRef) -> Result<(u16, u16), CniError> {
    let m = load(&mesh.metadata, mesh.host.as_deref())?;
    let transform = match &mesh.transform {
        Some(t) => t.parse::<Transform>().map_err(CniError::config)?,
        None => Transform::default(),
    };
    let opts = PlanOptions {
        transform,
        udp_encap: mesh.udp_encap,
        ..PlanOptions::default()
    };
    let p = plan::plan(&m.snapshot.cluster, &m.self_id, &opts, None)
        .map_err(|e| CniError::new(code::UNKNOWN_HOST, e.to_string()))?;
    Ok((p.mtu, p.underlay_mtu))
}
