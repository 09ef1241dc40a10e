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

/// GNU time (Debian package `time`), for a child's peak RSS.
pub const TIME: &str = "/usr/bin/time";

/// Run `ipsec-mesh plan` (`bin`) on `metadata` for `host`: (seconds, peak RSS in MiB). The RSS
/// is GNU time's `%M` (the child's `ru_maxrss`): measured through it, because a child forked
/// from a big bench process would count the parent's pages it shared before its exec.
pub fn plan_once(bin: &str, metadata: &str, host: &str) -> (f64, f64) {
    let t = std::time::Instant::now();
    let out = std::process::Command::new(TIME)
        .args([
            "-f",
            "%M",
            bin,
            "plan",
            "--metadata",
            metadata,
            "--host",
            host,
        ])
        .args(["--format", "json"])
        .env("IPSEC_MESH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .output()
        .expect("run /usr/bin/time ipsec-mesh");
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "plan failed on {metadata}: {err}");
    let kib: f64 = err
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no %M from {TIME}: {err}"));
    (secs, kib / 1024.0)
}

/// The median (upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
