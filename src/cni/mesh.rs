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
    let known = || {
        let ids: Vec<&str> = snap
            .cluster
            .hosts
            .iter()
            .take(8)
            .map(|h| h.id.as_str())
            .collect();
        ids.join(", ")
    };
    if let Some(h) = host {
        if snap.cluster.host(h).is_none() {
            return Err(CniError::new(
                code::UNKNOWN_HOST,
                format!(
                    "host {h:?} is not in the mesh metadata {src} (known hosts: {})",
                    known()
                ),
            ));
        }
        return Ok(h.to_string());
    }
    if let Some(h) = &snap.self_id {
        return Ok(h.to_string());
    }
    let addrs = crate::localaddr::local_addresses()
        .map_err(|e| CniError::new(code::UNKNOWN_HOST, format!("listing local addresses: {e}")))?;
    match snap.cluster.host_by_agent_ip(&addrs) {
        Some(h) => Ok(h.id.to_string()),
        None => Err(CniError::new(
            code::UNKNOWN_HOST,
            format!(
                "cannot tell which host of {src} this is: no local address is a host's agent_ip; set \"host\" in the ipam section (known hosts: {})",
                known()
            ),
        )),
    }
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
