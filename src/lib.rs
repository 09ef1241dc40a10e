//! ipsec-mesh: an IPsec control plane for container hosts.
//!
//! Data flow: [`metadata`] source -> validated [`model::Cluster`] -> pure [`plan`] ->
//! dataplane drivers (reconcile).

pub mod cni;
pub mod daemon;
pub mod dataplane;
pub mod localaddr;
pub mod metadata;
pub mod model;
pub mod plan;
pub mod render;
