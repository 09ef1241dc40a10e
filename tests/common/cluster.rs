//! One cluster generator for the tests and the benchmarks (benches/common includes this file
//! by path): hosts and clusters in the shapes the suites need, so no suite hand-builds a
//! `RawCluster` of its own.
//!
//! - [`lettered`]: `host-a`, `host-b`, ... on one underlay /24 (192.168.77.N), one /24 each
//!   (10.42.N.0/24): small namespace labs.
//! - [`numbered_host`] / [`numbered`]: `host-00000`, ... with agent IPs in 172.16.0.0/16 and one
//!   /24 each in host order (10.42.0.0/24, 10.42.1.0/24, ...): property tests and benchmarks
//!   where only the count matters.
//! - [`on_77`]: the given ids, the ith on 192.168.77.(i+1) with 10.42.(i+1).0/24.
//! - [`spread_24s`]: the same ids and agents, but every host's /24 drawn at random from
//!   10.0.0.0/8 (fixed seed, no duplicates) as a real allocator leaves them, so remote prefixes
//!   do not aggregate into a few blocks.
//! - [`random_32s`]: Rancher's addressing (every container a /32 drawn at random from
//!   10.42.0.0/16); the fake rancher-metadata server's environments are in `rancher.rs`.
//!
//! The library's unit tests include this file too (`crate::test_cluster`, with
//! `extern crate self as ipsec_mesh`), so there is one generator for every test and bench.
#![allow(dead_code)]

use std::collections::BTreeSet;

use ipsec_mesh::model::{Cluster, RawCluster, RawHost, RawNetwork};

/// One host as the file format has it.
pub fn host(id: &str, agent_ip: &str, subnets: &[&str]) -> RawHost {
    RawHost {
        id: id.to_string(),
        agent_ip: agent_ip.to_string(),
        subnets: subnets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A cluster of `hosts` in overlay `cidr` (backend and MTU left to their defaults).
pub fn raw(cidr: &str, hosts: Vec<RawHost>) -> RawCluster {
    RawCluster {
        network: RawNetwork {
            cidr: cidr.into(),
            backend: None,
            mtu: None,
        },
        hosts,
    }
}

/// A dual-stack network (`cidr` ["10.42.0.0/16", "fd42::/48"]) of three hosts `ids`: host N
/// has 10.42.N.0/24, the first two also fd42:0:0:N::/64 (the third is IPv4 only); agents
/// 192.168.77.N, or fd77::N with `agent_v6` (an IPv6 underlay).
pub fn dual_stack(ids: [&str; 3], agent_v6: bool) -> RawCluster {
    let ip = |i: usize| {
        if agent_v6 {
            format!("fd77::{i}")
        } else {
            format!("192.168.77.{i}")
        }
    };
    let hosts = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let n = i + 1;
            let (v4, v6) = (format!("10.42.{n}.0/24"), format!("fd42:0:0:{n}::/64"));
            let subnets: Vec<&str> = if n < 3 { vec![&v4, &v6] } else { vec![&v4] };
            host(id, &ip(n), &subnets)
        })
        .collect();
    let mut r = raw("10.42.0.0/16", hosts);
    r.network.cidr = ["10.42.0.0/16", "fd42::/48"].into();
    r
}

/// `raw`, validated (the generators only make valid clusters).
pub fn valid(raw: &RawCluster) -> Cluster {
    Cluster::validate(raw).expect("generated test metadata is valid")
}

/// `host-a`, `host-b`, ...: letter N (a = 1) has agent 192.168.77.N and 10.42.N.0/24, in
/// 10.42.0.0/16.
pub fn lettered(ids: &[&str]) -> RawCluster {
    raw(
        "10.42.0.0/16",
        ids.iter()
            .map(|id| {
                let n = id.as_bytes()[id.len() - 1] - b'a' + 1;
                host(
                    id,
                    &format!("192.168.77.{n}"),
                    &[&format!("10.42.{n}.0/24")],
                )
            })
            .collect(),
    )
}

/// `ids[i]` on 192.168.77.(i + 1) with 10.42.(i + 1).0/24, in 10.42.0.0/16.
pub fn on_77(ids: &[&str]) -> RawCluster {
    raw(
        "10.42.0.0/16",
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                host(
                    id,
                    &format!("192.168.77.{}", i + 1),
                    &[&format!("10.42.{}.0/24", i + 1)],
                )
            })
            .collect(),
    )
}

/// Rancher-shaped: `hosts` hosts `host-0`, ... (agents 192.168.(77 + i / 250).(i % 250 + 1)),
/// each with `containers` /32s drawn at random (xorshift from `seed`, distinct, never a .0
/// or .255) from 10.42.0.0/16, as Rancher's IPAM leaves them.
pub fn random_32s(hosts: usize, containers: usize, seed: u32) -> RawCluster {
    let mut x = seed | 1;
    let mut used = BTreeSet::new();
    let mut next = || loop {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let a = x & 0xffff;
        if a & 0xff != 0 && a & 0xff != 0xff && used.insert(a) {
            return format!("10.42.{}.{}/32", a >> 8, a & 0xff);
        }
    };
    raw(
        "10.42.0.0/16",
        (0..hosts)
            .map(|i| RawHost {
                id: format!("host-{i}"),
                agent_ip: format!("192.168.{}.{}", 77 + i / 250, i % 250 + 1),
                subnets: (0..containers).map(|_| next()).collect(),
                ..Default::default()
            })
            .collect(),
    )
}

/// Agent IP of the `i`th numbered host: 172.16.(i / 250).(i % 250 + 1).
pub fn agent_ip(i: usize) -> String {
    format!("172.16.{}.{}", i / 250, i % 250 + 1)
}

/// The `i`th numbered host, named `id`, with the `i`th /24 from 10.42.0.0 on.
pub fn numbered_host(i: usize, id: &str) -> RawHost {
    host(
        id,
        &agent_ip(i),
        &[&format!("10.{}.{}.0/24", 42 + i / 256, i % 256)],
    )
}

/// `n` numbered hosts `host-00000`, ... in 10.0.0.0/8.
pub fn numbered(n: usize) -> RawCluster {
    raw(
        "10.0.0.0/8",
        (0..n)
            .map(|i| numbered_host(i, &format!("host-{i:05}")))
            .collect(),
    )
}

/// `n` hosts as an allocator leaves them: `host-00000` (the self host of most suites) owns
/// 10.42.1.0/24, every other host one /24 drawn at random (xorshift from `seed`, no
/// duplicates) from 10.0.0.0/8. Agent IPs as [`agent_ip`].
pub fn spread_24s(n: usize, seed: u32) -> RawCluster {
    let mut x = seed.max(1);
    let mut used = BTreeSet::from(["10.42.1.0/24".to_string()]);
    let mut subnets = vec!["10.42.1.0/24".to_string()];
    while subnets.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let s = format!("10.{}.{}.0/24", (x >> 8) & 0xff, x & 0xff);
        if used.insert(s.clone()) {
            subnets.push(s);
        }
    }
    raw(
        "10.0.0.0/8",
        subnets
            .iter()
            .enumerate()
            .map(|(i, s)| host(&format!("host-{i:05}"), &agent_ip(i), &[s]))
            .collect(),
    )
}
