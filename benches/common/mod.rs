//! Shared by the benchmarks: a synthetic mesh (host ids `host-00000`..., agent IPs in
//! 172.16.0.0/16, one /24 per host in 10.0.0.0/8), planned for `host-00000`.
#![allow(dead_code)]

use ipsec_mesh::model::{Cluster, RawCluster, RawHost, RawNetwork};
use ipsec_mesh::plan::{self, Plan, PlanOptions, Psk};

/// The metadata of `hosts` hosts.
pub fn raw_mesh(hosts: usize, backend: Option<&str>) -> RawCluster {
    RawCluster {
        network: RawNetwork {
            cidr: "10.0.0.0/8".into(),
            backend: backend.map(String::from),
            mtu: Some(1500),
        },
        hosts: (0..hosts)
            .map(|i| RawHost {
                id: format!("host-{i:05}"),
                agent_ip: format!("172.16.{}.{}", i / 250, i % 250 + 1),
                subnets: vec![format!("10.{}.{}.0/24", 42 + i / 256, i % 256)],
                ..Default::default()
            })
            .collect(),
    }
}

/// `host-00000`'s plan in a mesh of `peers + 1` hosts.
pub fn plan_for(peers: usize, backend: Option<&str>, psk: Option<&Psk>) -> Plan {
    let c = Cluster::validate(&raw_mesh(peers + 1, backend)).unwrap();
    plan::plan(&c, "host-00000", &PlanOptions::default(), psk).unwrap()
}
