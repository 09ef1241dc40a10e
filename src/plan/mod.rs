//! The pure planner: a validated [`Cluster`] and the self host's id in, the desired mesh for
//! that host out. No I/O, no clock, no randomness: the same input gives the same plan,
//! whatever the order of hosts, and adding or removing a host changes no other pair's reqid,
//! SPIs, marks or keys (see [`ids`] for the one, documented, exception: a hash collision).

pub mod ids;
pub mod keys;
pub mod rekey;
pub mod transform;

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Backend, Cluster, HostId};
use ids::HostIds;
pub use keys::{KeyDeriver, Psk, SaKey};
pub use transform::{overlay_mtu, Encapsulation, Transform};

/// Firewall / XFRM mark bits owned by ipsec-mesh.
///
/// The default (mask `0x00300000`) stays clear of kube-proxy (`0x4000`, `0x8000`), Rancher
/// 1.x (`0x1068`), Weave (`0x20000`, `0x40000`) and Cilium (`0xf00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Marks {
    /// Set on packets that must leave encrypted.
    pub encrypt: u32,
    /// Set (as the SA's output mark) on packets that arrived encrypted.
    pub decrypt: u32,
    /// The bits ipsec-mesh owns.
    pub mask: u32,
}

impl Default for Marks {
    fn default() -> Marks {
        Marks {
            encrypt: 0x0010_0000,
            decrypt: 0x0020_0000,
            mask: 0x0030_0000,
        }
    }
}

impl Marks {
    /// Check that the marks are usable: non-zero, distinct, inside the mask.
    pub fn validate(&self) -> Result<(), String> {
        if self.mask == 0 {
            return Err("mark mask is 0".into());
        }
        for (name, v) in [("encrypt", self.encrypt), ("decrypt", self.decrypt)] {
            if v == 0 {
                return Err(format!("{name} mark is 0"));
            }
            if v & !self.mask != 0 {
                return Err(format!(
                    "{name} mark {v:#x} has bits outside the mask {:#x}",
                    self.mask
                ));
            }
        }
        if self.encrypt == self.decrypt {
            return Err(format!(
                "encrypt and decrypt marks are both {:#x}",
                self.encrypt
            ));
        }
        Ok(())
    }
}

/// Default anti-replay window of every SA, in packets (Cilium uses 1024 too).
pub const DEFAULT_REPLAY_WINDOW: u32 = 1024;

/// Knobs that shape the plan beyond the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    pub transform: Transform,
    /// Force ESP-in-UDP (port 4500) on every pair.
    pub udp_encap: bool,
    /// Key generation: part of every key's derivation and the low nibble of every SPI.
    pub generation: u32,
    pub marks: Marks,
    /// Anti-replay window of every SA, in packets (ESN bitmap; a multiple of 32).
    pub replay_window: u32,
    /// Peers (host ids) whose outbound direction sends one generation ahead, with
    /// `generation + 1`, which they already accept (a usage-limit rekey; [`rekey`]).
    pub ahead: BTreeSet<String>,
}

impl Default for PlanOptions {
    fn default() -> PlanOptions {
        PlanOptions {
            transform: Transform::default(),
            udp_encap: false,
            generation: 1,
            marks: Marks::default(),
            replay_window: DEFAULT_REPLAY_WINDOW,
            ahead: BTreeSet::new(),
        }
    }
}

/// One peer of the self host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub host: HostId,
    pub endpoint: IpAddr,
    pub subnets: Vec<IpNet>,
    /// The peer's VTEP address ([`crate::model::Host::vtep`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep: Option<IpAddr>,
    /// Request id of this pair's policies and SAs on the self host.
    pub reqid: u32,
    /// SPI of the SA self -> peer (equals the peer's `spi_in` from self).
    pub spi_out: u32,
    /// Key generation of the SA self -> peer: the plan's, or one ahead (`PlanOptions::ahead`).
    pub out_generation: u32,
    /// SPI of the SA peer -> self.
    pub spi_in: u32,
    /// Mark on traffic to encrypt towards this peer (under `Plan::marks.mask`).
    pub mark_out: u32,
    /// Mark put on traffic decrypted from this peer.
    pub mark_in: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_out_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_in_id: Option<String>,
    /// Key of the outbound SA. Never serialized.
    #[serde(skip)]
    pub key_out: Option<SaKey>,
    /// Key of the inbound SA. Never serialized.
    #[serde(skip)]
    pub key_in: Option<SaKey>,
    /// Every inbound SA this host holds from the peer, one per accepted generation
    /// ([`rx_generations`]; the current generation's is `spi_in`/`key_in`).
    pub rx: Vec<RxSa>,
}

/// One inbound SA from a peer, for one key generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RxSa {
    pub generation: u32,
    pub spi: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Never serialized.
    #[serde(skip)]
    pub key: Option<SaKey>,
}

/// The desired mesh for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub host: HostId,
    pub backend: Backend,
    /// The self host's underlay address.
    pub endpoint: IpAddr,
    /// The self host's container subnets.
    pub subnets: Vec<IpNet>,
    /// The self host's VTEP address ([`crate::model::Host::vtep`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep: Option<IpAddr>,
    /// The overlay cidr: the first listed in the metadata (a dual-stack overlay's other
    /// family is in `cidrs`).
    pub cidr: IpNet,
    /// Every overlay cidr, one per family (two for a dual-stack overlay), in the metadata's
    /// order. Peers' `subnets` hold prefixes of every family listed here; one SA pair per peer
    /// carries them all, over the pair's one underlay family.
    pub cidrs: Vec<IpNet>,
    /// Underlay MTU from the metadata.
    pub underlay_mtu: u16,
    /// MTU left for container interfaces under this backend and transform.
    pub mtu: u16,
    pub transform: Transform,
    pub udp_encap: bool,
    pub key_generation: u32,
    pub marks: Marks,
    /// Anti-replay window of every SA (packets).
    #[serde(skip)]
    pub replay_window: u32,
    /// Other hosts, sorted by id.
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("host {id:?} is not in the metadata (known hosts: {known})")]
    UnknownSelf { id: String, known: String },
    #[error("--key-generation {generation}: the PSK key ring has no secret for it (it lists generations {listed})")]
    NoSecretForGeneration { generation: u32, listed: String },
}

/// The generations a host receives with while it sends with `gen`: `gen - 1`, `gen` and
/// `gen + 1`, those the PSK covers. A peer may therefore move one generation up or down
/// before this host does, and traffic keeps flowing (rolling rotation; docs/keying.md).
pub fn rx_generations(gen: u32, keys: Option<&KeyDeriver>) -> Vec<u32> {
    [gen.checked_sub(1), Some(gen), gen.checked_add(1)]
        .into_iter()
        .flatten()
        .filter(|g| keys.is_none_or(|k| k.covers(*g)))
        .collect()
}

/// Slots of every host of a cluster, in `cluster.hosts` order. Computing them is O(hosts);
/// a caller planning for many hosts of one cluster computes them once ([`plan_with`]).
pub fn mesh_ids(cluster: &Cluster) -> Vec<HostIds> {
    let ids: Vec<&str> = cluster.hosts.iter().map(|h| h.id.as_str()).collect();
    ids::assign(&ids, ids::SLOT_BITS)
}

/// Plan the mesh for `self_id`. With a PSK, each peer gets its per-direction keys.
pub fn plan(
    cluster: &Cluster,
    self_id: &str,
    opts: &PlanOptions,
    psk: Option<&Psk>,
) -> Result<Plan, PlanError> {
    let ids = mesh_ids(cluster);
    let keys = psk.map(KeyDeriver::new);
    plan_with(cluster, &ids, self_id, opts, keys.as_ref())
}

/// [`plan`] with precomputed [`mesh_ids`] and key deriver.
pub fn plan_with(
    cluster: &Cluster,
    ids: &[HostIds],
    self_id: &str,
    opts: &PlanOptions,
    keys: Option<&KeyDeriver>,
) -> Result<Plan, PlanError> {
    let me = cluster
        .hosts
        .binary_search_by(|h| h.id.as_str().cmp(self_id))
        .map_err(|_| PlanError::UnknownSelf {
            id: self_id.to_string(),
            known: known_hosts(cluster),
        })?;
    let host = &cluster.hosts[me];
    let my_ids = ids[me];
    let gen = opts.generation;
    if let Some(k) = keys {
        if !k.covers(gen) {
            return Err(PlanError::NoSecretForGeneration {
                generation: gen,
                listed: k.generations_listed(),
            });
        }
    }
    let rx_gens = rx_generations(gen, keys);

    let make_peer = |&(peer, peer_ids): &(&crate::model::Host, HostIds)| -> Peer {
        let out_gen = match gen.checked_add(1) {
            Some(next)
                if opts.ahead.contains(peer.id.as_str()) && keys.is_none_or(|k| k.covers(next)) =>
            {
                next
            }
            _ => gen,
        };
        let key_out =
            keys.map(|k| k.derive(host.id.as_str(), peer.id.as_str(), out_gen, opts.transform));
        let rx: Vec<RxSa> = rx_gens
            .iter()
            .map(|&g| {
                let key =
                    keys.map(|k| k.derive(peer.id.as_str(), host.id.as_str(), g, opts.transform));
                RxSa {
                    generation: g,
                    spi: ids::spi(peer_ids, my_ids, g),
                    key_id: key.as_ref().map(|k| k.id().to_string()),
                    key,
                }
            })
            .collect();
        // The current generation's inbound key is one of the receive set's (always, as the
        // sending generation is covered); derived once.
        let key_in = rx
            .iter()
            .find(|r| r.generation == gen)
            .and_then(|r| r.key.clone())
            .or_else(|| {
                keys.map(|k| k.derive(peer.id.as_str(), host.id.as_str(), gen, opts.transform))
            });
        Peer {
            host: peer.id.clone(),
            endpoint: peer.agent_ip,
            subnets: peer.subnets.clone(),
            vtep: peer.vtep,
            reqid: peer_ids.reqid(),
            spi_out: ids::spi(my_ids, peer_ids, out_gen),
            out_generation: out_gen,
            spi_in: ids::spi(peer_ids, my_ids, gen),
            mark_out: opts.marks.encrypt,
            mark_in: opts.marks.decrypt,
            key_out_id: key_out.as_ref().map(|k| k.id().to_string()),
            key_in_id: key_in.as_ref().map(|k| k.id().to_string()),
            key_out,
            key_in,
            rx,
        }
    };
    let others: Vec<(&crate::model::Host, HostIds)> = cluster
        .hosts
        .iter()
        .zip(ids.iter().copied())
        .filter(|(h, _)| h.id != host.id)
        .collect();
    let peers = derive_in_parallel(&others, keys.is_some(), &make_peer);

    let encap = Encapsulation {
        backend: cluster.network.backend,
        transform: opts.transform,
        udp_encap: opts.udp_encap,
        ipv6_underlay: host.agent_ip.is_ipv6(),
    };
    Ok(Plan {
        host: host.id.clone(),
        backend: cluster.network.backend,
        endpoint: host.agent_ip,
        subnets: host.subnets.clone(),
        vtep: host.vtep,
        cidr: cluster.network.cidr(),
        cidrs: cluster.network.cidrs.clone(),
        underlay_mtu: cluster.network.mtu,
        mtu: overlay_mtu(cluster.network.mtu, encap),
        transform: opts.transform,
        udp_encap: opts.udp_encap,
        key_generation: gen,
        marks: opts.marks,
        replay_window: opts.replay_window,
        peers,
    })
}

/// Peers from which parallel key derivation pays for its threads.
const PARALLEL_FROM: usize = 4096;

/// `make` over `items` in order; with keys and many items, on every available core (key
/// derivation is most of the planner's time at fleet scale). The result does not depend on
/// the number of threads.
fn derive_in_parallel<T: Sync, U: Send>(
    items: &[T],
    keyed: bool,
    make: &(dyn Fn(&T) -> U + Sync),
) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !keyed || items.len() < PARALLEL_FROM || threads < 2 {
        return items.iter().map(make).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(make).collect::<Vec<U>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("key derivation does not panic"))
            .collect()
    })
}

fn known_hosts(cluster: &Cluster) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<&str> = cluster
        .hosts
        .iter()
        .take(SHOWN)
        .map(|h| h.id.as_str())
        .collect();
    if cluster.hosts.len() > SHOWN {
        s.push("…");
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize) -> Cluster {
        let ids: Vec<String> = (0..n).map(|i| format!("host-{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::test_cluster::valid(&crate::test_cluster::on_77(&ids))
    }

    #[test]
    fn a_direction_ahead_sends_with_the_next_generation_its_peer_already_accepts() {
        let c = cluster(3);
        let psk = Psk::from_bytes(&[7u8; 32]);
        let o = PlanOptions {
            generation: 9,
            ..PlanOptions::default()
        };
        let mut ahead = o.clone();
        ahead.ahead.insert("host-1".into());
        let a = plan(&c, "host-0", &o, Some(&psk)).unwrap();
        let a2 = plan(&c, "host-0", &ahead, Some(&psk)).unwrap();
        let b = plan(&c, "host-1", &o, Some(&psk)).unwrap();
        let (p1, q1) = (&a.peers[0], &a2.peers[0]);
        assert_eq!((p1.out_generation, q1.out_generation), (9, 10));
        assert_ne!(p1.spi_out, q1.spi_out);
        assert_ne!(p1.key_out_id, q1.key_out_id);
        assert_eq!(ids::with_generation(p1.spi_out, 10), q1.spi_out);
        // host-1, still at 9, holds an inbound SA for generation 10 from host-0: same SPI, key.
        let from_a = b
            .peers
            .iter()
            .find(|p| p.host.as_str() == "host-0")
            .unwrap();
        let rx10 = from_a.rx.iter().find(|r| r.generation == 10).unwrap();
        assert_eq!((rx10.spi, &rx10.key_id), (q1.spi_out, &q1.key_out_id));
        // Only that direction moved: the other peer and the inbound side are unchanged.
        assert_eq!(a.peers[1], a2.peers[1]);
        assert_eq!((p1.spi_in, &p1.rx), (q1.spi_in, &q1.rx));
        // A key ring without the next generation keeps the direction where it is.
        let ring = Psk::ring(&[(9, &[1u8; 32])]);
        let r = plan(&c, "host-0", &ahead, Some(&ring)).unwrap();
        assert_eq!(r.peers[0].out_generation, 9);
    }

    #[test]
    fn parallel_derivation_keeps_order_and_keys() {
        let v: Vec<usize> = (0..10_000).collect();
        let par = derive_in_parallel(&v, true, &|x: &usize| x * 3);
        assert_eq!(par, v.iter().map(|x| x * 3).collect::<Vec<_>>());
        let c = crate::test_cluster::valid(&crate::test_cluster::raw(
            "10.0.0.0/8",
            (0..PARALLEL_FROM + 5)
                .map(|i| crate::test_cluster::numbered_host(i, &format!("host-{i}")))
                .collect(),
        ));
        let psk = Psk::from_bytes(&[7u8; 32]);
        let p = plan(&c, "host-0", &PlanOptions::default(), Some(&psk)).unwrap();
        let k = KeyDeriver::new(&psk);
        let t = Transform::default();
        for q in p.peers.iter().step_by(397) {
            let out = k.derive("host-0", q.host.as_str(), 1, t);
            let inn = k.derive(q.host.as_str(), "host-0", 1, t);
            assert_eq!(q.key_out_id.as_deref(), Some(out.id()));
            assert_eq!(q.key_in_id.as_deref(), Some(inn.id()));
            assert_eq!(q.rx[1].key_id.as_deref(), Some(inn.id()));
        }
        let hosts: Vec<&str> = p.peers.iter().map(|q| q.host.as_str()).collect();
        let mut sorted = hosts.clone();
        sorted.sort();
        assert_eq!(hosts, sorted, "peers stay sorted by id");
    }

    #[test]
    fn pairs_agree() {
        let c = cluster(3);
        let psk = Psk::from_bytes(&[7u8; 32]);
        let o = PlanOptions::default();
        let a = plan(&c, "host-0", &o, Some(&psk)).unwrap();
        let b = plan(&c, "host-1", &o, Some(&psk)).unwrap();
        assert_eq!(a.peers.len(), 2);
        let ab = &a.peers[0];
        let ba = &b.peers[0];
        assert_eq!((ab.host.as_str(), ba.host.as_str()), ("host-1", "host-0"));
        assert_eq!(ab.spi_out, ba.spi_in);
        assert_eq!(ab.spi_in, ba.spi_out);
        assert_ne!(ab.spi_in, ab.spi_out);
        assert_eq!(ab.key_out_id, ba.key_in_id);
        assert_eq!(
            ab.key_out.as_ref().unwrap().enc(),
            ba.key_in.as_ref().unwrap().enc()
        );
        assert_ne!(ab.key_out_id, ab.key_in_id);
        assert_eq!(a.mtu, 1446);
        assert_eq!(ab.endpoint.to_string(), "192.168.77.2");
    }

    /// Issue 18 item 2: a host that adds an IPv6 subnet (the network becoming dual-stack)
    /// changes no pair's reqid, SPIs, marks or keys; the peers' `subnets` list both families
    /// and the plan carries both cidrs.
    #[test]
    fn dual_stack_keeps_every_pairs_ids_and_keys() {
        let single = crate::test_cluster::on_77(&["host-0", "host-1", "host-2"]);
        let mut dual = single.clone();
        dual.network.cidr = ["10.42.0.0/16", "fd42::/48"].into();
        dual.hosts[1].subnets.push("fd42:0:0:2::/64".into());
        let psk = Psk::from_bytes(&[7u8; 32]);
        let o = PlanOptions::default();
        for me in ["host-0", "host-1", "host-2"] {
            let a = plan(&crate::test_cluster::valid(&single), me, &o, Some(&psk)).unwrap();
            let b = plan(&crate::test_cluster::valid(&dual), me, &o, Some(&psk)).unwrap();
            assert_eq!(a.mtu, b.mtu, "one underlay family, one MTU");
            assert_eq!(b.cidrs.len(), 2);
            assert_eq!(a.cidr, b.cidr);
            for (x, y) in a.peers.iter().zip(&b.peers) {
                assert_eq!(
                    (x.reqid, x.spi_out, x.spi_in, x.mark_out, x.mark_in),
                    (y.reqid, y.spi_out, y.spi_in, y.mark_out, y.mark_in)
                );
                assert_eq!(
                    (&x.key_out_id, &x.key_in_id, &x.rx),
                    (&y.key_out_id, &y.key_in_id, &y.rx)
                );
            }
        }
        let p = plan(&crate::test_cluster::valid(&dual), "host-0", &o, None).unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["cidr"], "10.42.0.0/16");
        assert_eq!(
            json["cidrs"],
            serde_json::json!(["10.42.0.0/16", "fd42::/48"])
        );
        assert_eq!(
            json["peers"][0]["subnets"],
            serde_json::json!(["10.42.2.0/24", "fd42:0:0:2::/64"])
        );
    }

    #[test]
    fn json_never_carries_keys() {
        let c = cluster(2);
        let psk = Psk::from_bytes(&[9u8; 32]);
        let p = plan(&c, "host-0", &PlanOptions::default(), Some(&psk)).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let key = p.peers[0].key_out.as_ref().unwrap();
        let hex: String = key.enc().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!json.contains(&hex));
        assert!(!json.contains("key_out\""));
        assert!(json.contains("\"key_out_id\""));
        let without =
            serde_json::to_string(&plan(&c, "host-0", &PlanOptions::default(), None).unwrap())
                .unwrap();
        assert!(!without.contains("key_out_id"));
    }

    #[test]
    fn unknown_self_lists_hosts() {
        let e = plan(&cluster(3), "host-9", &PlanOptions::default(), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host \"host-9\" is not in the metadata (known hosts: host-0, host-1, host-2)"
        );
    }

    #[test]
    fn marks_validation() {
        assert!(Marks::default().validate().is_ok());
        let m = Marks {
            encrypt: 0x10,
            decrypt: 0x10,
            mask: 0x30,
        };
        assert!(m.validate().unwrap_err().contains("both"));
        let m = Marks {
            encrypt: 0x40,
            decrypt: 0x10,
            mask: 0x30,
        };
        assert!(m.validate().unwrap_err().contains("outside the mask"));
        let d = Marks::default();
        for foreign in [0x4000u32, 0x8000, 0x1068, 0x20000, 0x40000, 0xf00] {
            assert_eq!(d.mask & foreign, 0, "{foreign:#x}");
        }
    }
}
