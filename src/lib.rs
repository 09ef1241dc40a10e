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

// The tests' cluster generator (tests/common/cluster.rs), for the unit tests too: one
// generator for every test and bench. It names the crate `ipsec_mesh` as outside tests do.
#[cfg(test)]
extern crate self as ipsec_mesh;
#[cfg(test)]
#[path = "../tests/common/cluster.rs"]
pub(crate) mod test_cluster;
