//! Shared by the benchmarks: a synthetic mesh (host ids `host-00000`..., agent IPs in
//! 172.16.0.0/16, one /24 per host in 10.0.0.0/8), planned for `host-00000`.
#![allow(dead_code)]

use ipsec_mesh::model::{Cluster, RawCluster};

/// The tests' cluster generator (one for tests and benchmarks).
#[path = "../../tests/common/cluster.rs"]
#[allow(clippy::duplicate_mod)] // benches/etcd.rs also includes tests/common, which has it
pub mod cluster;
use ipsec_mesh::plan::{self, Plan, PlanOptions, Psk};

/// The metadata of `hosts` hosts.
pub fn raw_mesh(hosts: usize, backend: Option<&str>) -> RawCluster {
    let mut r = cluster::numbered(hosts);
    r.network.backend = backend.map(String::from);
    r.network.mtu = Some(1500);
    r
}

/// `host-00000`'s plan in a mesh of `peers + 1` hosts.
pub fn plan_for(peers: usize, backend: Option<&str>, psk: Option<&Psk>) -> Plan {
    let c = Cluster::validate(&raw_mesh(peers + 1, backend)).unwrap();
    plan::plan(&c, "host-00000", &PlanOptions::default(), psk).unwrap()
}
