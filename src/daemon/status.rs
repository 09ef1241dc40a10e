//! The sidecar's status: what `/status` shows as JSON and `/metrics` as Prometheus text.
//! Rendering is pure; the daemon loop updates the state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::dataplane::driver::{PeerCounters, PeerState};
use crate::plan::Plan;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MetadataStatus {
    pub source: String,
    pub version: Option<String>,
    /// When the last good metadata was loaded (unix seconds).
    pub loaded_at: Option<u64>,
    /// The last load or validation error; the last good state is kept meanwhile.
    pub last_error: Option<String>,
    /// Records the last good load left out (etcd: malformed host records), by key and why.
    pub skipped: Vec<crate::metadata::etcd::Skipped>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileStatus {
    pub count: u64,
    pub errors: u64,
    pub last_at: Option<u64>,
    pub last_duration_ms: f64,
    pub total_duration_ms: f64,
    pub last_writes: usize,
    /// The changes of the most recent reconcile that wrote something (a no-op reconcile
    /// keeps them): the first [`CHANGES_SHOWN`], typed as in `apply --diff`.
    pub last_changes: Vec<crate::dataplane::report::Change>,
    /// How many changes that reconcile made (more than `last_changes` holds when cut).
    pub last_changes_total: usize,
    /// When it ran (seconds since the epoch).
    pub last_changed_at: Option<u64>,
    /// Metadata version of the plan the last reconcile applied: once it equals
    /// `metadata.version`, the dataplane has been reconciled to the current metadata.
    pub last_version: Option<String>,
    /// Reconciles asked for by the driver: a kernel notification about one of its objects
    /// (drift repaired at once) or, for charon, the daemon restarting.
    pub driver_wakes: u64,
}

/// How many changes of a reconcile `/status` shows.
pub const CHANGES_SHOWN: usize = 100;

/// Key generations and automatic rekeying (xfrm drivers; docs/keying.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyingStatus {
    /// The generation sent with (directions in `ahead` send with the next one).
    pub generation: u32,
    /// `--rekey-every` in seconds (maximum key age), if set.
    pub rekey_every_s: Option<u64>,
    /// When the generation next advances (unix seconds): the next rekey due by age.
    pub next_rekey_at: Option<u64>,
    /// Usage limits of one outbound SA (`--rekey-bytes`, `--rekey-packets`).
    pub rekey_bytes: Option<u64>,
    pub rekey_packets: Option<u64>,
    /// Peers whose outbound direction moved one generation ahead on its usage limit.
    pub ahead: Vec<String>,
    /// Rekeys since the start: generation advances (age) and directions moved ahead (usage).
    pub rekeys_age: u64,
    pub rekeys_usage: u64,
}

impl KeyingStatus {
    pub fn update(
        &mut self,
        r: &crate::plan::rekey::Rekey,
        generation: u32,
        ahead: Vec<String>,
        now: SystemTime,
    ) {
        self.generation = generation;
        self.rekey_every_s = r.every.map(|d| d.as_secs());
        self.next_rekey_at = r.next_at(now);
        self.rekey_bytes = r.bytes;
        self.rekey_packets = r.packets;
        self.ahead = ahead;
    }

    pub fn count(&mut self, why: crate::plan::rekey::Reason) {
        match why {
            crate::plan::rekey::Reason::Age => self.rekeys_age += 1,
            crate::plan::rekey::Reason::Usage => self.rekeys_usage += 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    pub host: String,
    pub endpoint: String,
    pub state: PeerState,
    pub reqid: u32,
    pub spi_out: u32,
    pub spi_in: u32,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
    /// Per-direction SA detail (xfrm drivers): key generation, SA add times, ESN counters,
    /// inbound replay and integrity drops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sa: Option<crate::dataplane::driver::SaDetail>,
    pub last_error: Option<String>,
    /// When the state last changed (unix seconds).
    pub last_change: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub host: Option<String>,
    pub driver: String,
    /// The firewall backend in use (`iptables`, `nftables`, `none`), for drivers with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<String>,
    pub metadata: MetadataStatus,
    pub reconciles: ReconcileStatus,
    pub keying: KeyingStatus,
    pub peers: Vec<PeerStatus>,
    /// Errors not tied to one peer (shared objects, the driver as a whole).
    pub mesh_errors: Vec<String>,
    /// The driver has kernel IPsec SAs ([`crate::dataplane::driver::Driver::has_sas`]): key
    /// and XFRM metrics are only shown then (plain VXLAN has neither).
    #[serde(skip)]
    pub has_sas: bool,
}

impl Status {
    /// Fold a plan, the driver's counters and the last errors into the peer list, keeping
    /// `last_change` of peers whose state did not change.
    pub fn update_peers(
        &mut self,
        plan: &Plan,
        counters: &BTreeMap<String, PeerCounters>,
        errors: &BTreeMap<String, String>,
        now: u64,
    ) {
        let before: BTreeMap<String, (PeerState, Option<u64>)> = self
            .peers
            .iter()
            .map(|p| (p.host.clone(), (p.state, p.last_change)))
            .collect();
        self.peers = plan
            .peers
            .iter()
            .map(|p| {
                let id = p.host.to_string();
                let c = counters.get(&id).cloned().unwrap_or_default();
                let state = c.state;
                let last_change = match before.get(&id) {
                    Some((s, t)) if *s == state => *t,
                    _ => Some(now),
                };
                PeerStatus {
                    host: id.clone(),
                    endpoint: p.endpoint.to_string(),
                    state,
                    reqid: p.reqid,
                    spi_out: p.spi_out,
                    spi_in: p.spi_in,
                    bytes_out: c.bytes_out,
                    packets_out: c.packets_out,
                    bytes_in: c.bytes_in,
                    packets_in: c.packets_in,
                    sa: c.sa.clone(),
                    last_error: errors.get(&id).cloned(),
                    last_change,
                }
            })
            .collect();
        // A set: with every peer failing, a scan of the peers per error was O(peers^2)
        // (76 % of the sidecar's CPU at 20,000 failing peers, BENCHMARKS.md).
        let peers: std::collections::HashSet<&str> =
            plan.peers.iter().map(|p| p.host.as_str()).collect();
        self.mesh_errors = errors
            .iter()
            .filter(|(k, _)| !peers.contains(k.as_str()))
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of the status. Names follow the Prometheus conventions (and
/// `promtool check metrics`, see tests/metrics_promtool.rs): counters end in `_total`, units
/// are suffixes (`_seconds`, `_bytes_total`), every family has `# HELP` and `# TYPE`.
pub fn metrics(s: &Status, xfrm_stat: &[(String, u64)], now: u64) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(o, "# HELP ipsec_mesh_{name} {help}");
        let _ = writeln!(o, "# TYPE ipsec_mesh_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "ipsec_mesh_{name}{labels} {v}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    metric(
        "peers",
        "Peers in the current plan.",
        "gauge",
        one(s.peers.len().to_string()),
    );
    metric(
        "peers_up",
        "Peers whose SAs are up.",
        "gauge",
        one(s
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Up)
            .count()
            .to_string()),
    );
    metric(
        "sas_up",
        "SAs installed and up (two per peer that is up).",
        "gauge",
        one((2 * s.peers.iter().filter(|p| p.state == PeerState::Up).count()).to_string()),
    );
    metric(
        "reconciles_total",
        "Reconciles run.",
        "counter",
        one(s.reconciles.count.to_string()),
    );
    metric(
        "reconcile_driver_wakes_total",
        "Reconciles asked for by the driver (a kernel change to its objects, charon restarted).",
        "counter",
        one(s.reconciles.driver_wakes.to_string()),
    );
    metric(
        "reconcile_errors_total",
        "Reconciles that left something not in place.",
        "counter",
        one(s.reconciles.errors.to_string()),
    );
    metric(
        "reconcile_duration_seconds_total",
        "Total time spent reconciling.",
        "counter",
        one(format!("{:.6}", s.reconciles.total_duration_ms / 1e3)),
    );
    metric(
        "reconcile_last_duration_seconds",
        "Duration of the last reconcile.",
        "gauge",
        one(format!("{:.6}", s.reconciles.last_duration_ms / 1e3)),
    );
    metric(
        "reconcile_last_writes",
        "Kernel/charon writes of the last reconcile.",
        "gauge",
        one(s.reconciles.last_writes.to_string()),
    );
    if let Some(v) = &s.metadata.version {
        metric(
            "metadata_version_info",
            "Version of the metadata in use.",
            "gauge",
            vec![(format!("{{version=\"{}\"}}", label(v)), "1".into())],
        );
    }
    if let Some(t) = s.metadata.loaded_at {
        metric(
            "metadata_age_seconds",
            "Seconds since the metadata in use was loaded.",
            "gauge",
            one(now.saturating_sub(t).to_string()),
        );
    }
    metric(
        "metadata_error",
        "1 while the latest metadata failed to load or validate.",
        "gauge",
        one(u8::from(s.metadata.last_error.is_some()).to_string()),
    );
    metric(
        "metadata_skipped_records",
        "Records the metadata in use left out (malformed etcd host records; /status says which).",
        "gauge",
        one(s.metadata.skipped.len().to_string()),
    );
    if s.has_sas {
        metric(
            "key_generation",
            "Key generation this host sends with (directions ahead use the next one).",
            "gauge",
            one(s.keying.generation.to_string()),
        );
    }
    if let Some(t) = s.keying.next_rekey_at {
        metric(
            "next_rekey_timestamp_seconds",
            "When the key generation next advances (--rekey-every), unix time.",
            "gauge",
            one(t.to_string()),
        );
    }
    metric(
        "rekeys_total",
        "Automatic rekeys: generation advances (age) and directions moved ahead (usage).",
        "counter",
        vec![
            ("{reason=\"age\"}".into(), s.keying.rekeys_age.to_string()),
            (
                "{reason=\"usage\"}".into(),
                s.keying.rekeys_usage.to_string(),
            ),
        ],
    );
    let per_peer = |f: &dyn Fn(&PeerStatus) -> u64, dir: &str| -> Vec<(String, String)> {
        s.peers
            .iter()
            .map(|p| {
                (
                    format!("{{peer=\"{}\",direction=\"{dir}\"}}", label(&p.host)),
                    f(p).to_string(),
                )
            })
            .collect()
    };
    let mut bytes = per_peer(&|p| p.bytes_out, "out");
    bytes.extend(per_peer(&|p| p.bytes_in, "in"));
    metric(
        "peer_bytes_total",
        "Bytes through each peer's SAs.",
        "counter",
        bytes,
    );
    let mut packets = per_peer(&|p| p.packets_out, "out");
    packets.extend(per_peer(&|p| p.packets_in, "in"));
    metric(
        "peer_packets_total",
        "Packets through each peer's SAs.",
        "counter",
        packets,
    );
    metric(
        "peer_up",
        "1 when the peer's SAs are up.",
        "gauge",
        s.peers
            .iter()
            .map(|p| {
                (
                    format!("{{peer=\"{}\"}}", label(&p.host)),
                    u8::from(p.state == PeerState::Up).to_string(),
                )
            })
            .collect(),
    );
    let with_sa: Vec<(&PeerStatus, &crate::dataplane::driver::SaDetail)> = s
        .peers
        .iter()
        .filter_map(|p| p.sa.as_ref().map(|d| (p, d)))
        .collect();
    if !with_sa.is_empty() {
        let peer = |p: &PeerStatus| format!("{{peer=\"{}\"}}", label(&p.host));
        let dir =
            |p: &PeerStatus, d: &str| format!("{{peer=\"{}\",direction=\"{d}\"}}", label(&p.host));
        metric(
            "peer_replay_drops_total",
            "Inbound packets of the peer dropped as replays or outside the anti-replay window.",
            "counter",
            with_sa
                .iter()
                .map(|(p, d)| (peer(p), d.replay_drops_in.to_string()))
                .collect(),
        );
        metric(
            "peer_integrity_failures_total",
            "Inbound packets of the peer that failed the integrity check.",
            "counter",
            with_sa
                .iter()
                .map(|(p, d)| (peer(p), d.integrity_failed_in.to_string()))
                .collect(),
        );
        let mut gens = Vec::new();
        for (p, d) in &with_sa {
            gens.push((dir(p, "out"), d.generation.to_string()));
            gens.push((dir(p, "in"), d.in_generation.to_string()));
        }
        metric(
            "peer_key_generation",
            "Key generation of each direction: sent with (out), newest received (in).",
            "gauge",
            gens,
        );
        let mut age = Vec::new();
        for (p, d) in &with_sa {
            for (t, name) in [(d.out_added, "out"), (d.in_added, "in")] {
                if t > 0 {
                    age.push((dir(p, name), now.saturating_sub(t).to_string()));
                }
            }
        }
        metric(
            "peer_sa_age_seconds",
            "Seconds since each of the peer's SAs was added.",
            "gauge",
            age,
        );
    }
    if !xfrm_stat.is_empty() {
        metric(
            "xfrm_stat_total",
            "Kernel XFRM error counters (/proc/net/xfrm_stat), by counter name.",
            "counter",
            xfrm_stat
                .iter()
                .map(|(k, v)| (format!("{{counter=\"{}\"}}", label(k)), v.to_string()))
                .collect(),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_peers_keeps_peer_errors_on_peers_and_the_rest_as_mesh_errors() {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let plan = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let errors = BTreeMap::from([
            ("h2".to_string(), "no SA".to_string()),
            ("mesh".to_string(), "routes: dump failed".to_string()),
        ]);
        let mut s = Status::default();
        s.update_peers(&plan, &BTreeMap::new(), &errors, 5);
        assert_eq!(s.mesh_errors, ["mesh: routes: dump failed"]);
        let h2 = s.peers.iter().find(|p| p.host == "h2").unwrap();
        assert_eq!(h2.last_error.as_deref(), Some("no SA"));
        assert_eq!(h2.state, PeerState::Down);
        assert!(s
            .peers
            .iter()
            .all(|p| p.host == "h2" || p.last_error.is_none()));
    }

    #[test]
    fn metrics_render() {
        let s = Status {
            metadata: MetadataStatus {
                version: Some("ab\"c".into()),
                loaded_at: Some(100),
                skipped: vec![crate::metadata::etcd::Skipped {
                    key: "/m/hosts/h9".into(),
                    error: "unknown field `subnet`".into(),
                }],
                ..Default::default()
            },
            reconciles: ReconcileStatus {
                count: 3,
                errors: 1,
                ..Default::default()
            },
            peers: vec![PeerStatus {
                host: "b".into(),
                state: PeerState::Up,
                bytes_out: 7,
                sa: Some(crate::dataplane::driver::SaDetail {
                    generation: 2,
                    out_added: 100,
                    in_added: 0,
                    replay_drops_in: 5,
                    integrity_failed_in: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            has_sas: true,
            ..Default::default()
        };
        let m = metrics(&s, &[("XfrmOutNoStates".into(), 4)], 130);
        assert!(m.contains("ipsec_mesh_key_generation "));
        // Plain VXLAN: no keys, no XFRM counters.
        let plain = metrics(
            &Status {
                has_sas: false,
                ..s.clone()
            },
            &[],
            130,
        );
        assert!(
            !plain.contains("ipsec_mesh_key_generation ") && !plain.contains("xfrm_stat"),
            "{plain}"
        );
        assert!(m.contains("ipsec_mesh_peers 1\n"));
        assert!(m.contains("ipsec_mesh_sas_up 2\n"));
        assert!(m.contains("ipsec_mesh_reconciles_total 3\n"));
        assert!(m.contains("ipsec_mesh_metadata_version_info{version=\"ab\\\"c\"} 1\n"));
        assert!(m.contains("ipsec_mesh_metadata_age_seconds 30\n"));
        assert!(m.contains("ipsec_mesh_metadata_skipped_records 1\n"));
        assert!(m.contains("ipsec_mesh_peer_bytes_total{peer=\"b\",direction=\"out\"} 7\n"));
        assert!(m.contains("ipsec_mesh_xfrm_stat_total{counter=\"XfrmOutNoStates\"} 4\n"));
        assert!(m.contains("ipsec_mesh_reconcile_duration_seconds_total 0.000000\n"));
        assert!(m.contains("ipsec_mesh_peer_replay_drops_total{peer=\"b\"} 5\n"));
        assert!(m.contains("ipsec_mesh_peer_integrity_failures_total{peer=\"b\"} 1\n"));
        assert!(m.contains("ipsec_mesh_peer_key_generation{peer=\"b\",direction=\"out\"} 2\n"));
        assert!(m.contains("ipsec_mesh_peer_sa_age_seconds{peer=\"b\",direction=\"out\"} 30\n"));
        assert!(
            !m.contains("direction=\"in\"} 130"),
            "a missing SA (added 0) has no age"
        );
        // Counters end in `_total` (the Prometheus naming rule promtool checks).
        for l in m.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut it = l.split(' ').skip(2);
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
        }
        // Every sample line belongs to a declared metric.
        for l in m.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(m.contains(&format!("# TYPE {name} ")), "{l}");
        }
    }
}
