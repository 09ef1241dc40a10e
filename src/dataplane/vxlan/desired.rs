//! The desired VXLAN state for one host, from its plan (pure).
//!
//! Addressing (the Flannel scheme): every host's VTEP address is the first address of its
//! first container subnet (`10.42.N.0/24` -> `10.42.N.0`), put on our device as a host
//! address (`/32`, `/128` for IPv6). Towards each peer:
//!
//! - FDB `00:00:00:00:00:00 dst <peer endpoint>` (broadcast/unknown/multicast) and
//!   FDB `<peer VTEP MAC> dst <peer endpoint>`;
//! - a permanent neighbour `<peer VTEP address> lladdr <peer VTEP MAC>`;
//! - `route <peer subnet> via <peer VTEP address> dev <our device> onlink`, one per subnet.
//!
//! The network address is never a container's address and the gateway `.1` usually sits on
//! the container bridge, so `.0` is free on every host. Being inside the peer's own subnet,
//! the gateway needs `onlink`, and no route of its own. Traffic the host itself sends to a
//! remote container leaves from its VTEP address, which the peer routes back through the
//! same tunnel; forwarded container traffic keeps its own addresses. Neither ARP nor learning
//! is involved: every mapping is static, so nothing floods and nothing ages out.
//!
//! A host's VTEP MAC is derived from its id (see [`vtep_mac`]), so every host computes every
//! other host's MAC without talking to it.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::objects::*;
use crate::model::Backend;
use crate::plan::{overlay_mtu, Encapsulation, Plan};

/// The VTEP MAC of a host: the first 6 bytes of SHA-256 of its id, made locally
/// administered (bit 0x02 of the first octet set) and unicast (bit 0x01 cleared).
pub fn vtep_mac(host_id: &str) -> Mac {
    let d = ring::digest::digest(&ring::digest::SHA256, host_id.as_bytes());
    let mut m = [0u8; 6];
    m.copy_from_slice(&d.as_ref()[..6]);
    m[0] = (m[0] | 0x02) & !0x01;
    Mac(m)
}

/// A host's VTEP address: the first address of its first subnet (None without subnets).
pub fn vtep_ip(subnets: &[IpNet]) -> Option<IpAddr> {
    subnets.first().map(|n| n.network())
}

/// `ip` as a host prefix (/32 or /128).
pub fn host_prefix(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, 32).expect("/32")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, 128).expect("/128")),
    }
}

/// MTU of the VXLAN device: underlay MTU - 50 (- 70 over an IPv6 underlay). Equal to
/// `plan.mtu` when the metadata says `backend: vxlan`; computed for VXLAN otherwise.
pub fn mtu(plan: &Plan) -> u16 {
    if plan.backend == Backend::Vxlan {
        return plan.mtu;
    }
    overlay_mtu(
        plan.underlay_mtu,
        Encapsulation {
            backend: Backend::Vxlan,
            transform: plan.transform,
            udp_encap: false,
            ipv6_underlay: plan.endpoint.is_ipv6(),
        },
    )
}

/// Everything that should exist on our device, each object with its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub device: DeviceSpec,
    /// The self host's VTEP address (as a host prefix).
    pub address: Option<IpNet>,
    pub fdb: Vec<(Owner, FdbEntry)>,
    pub neighbours: Vec<(Owner, Neighbour)>,
    pub routes: Vec<(Owner, Route)>,
}

impl Desired {
    /// Number of objects (device and address included).
    pub fn len(&self) -> usize {
        1 + usize::from(self.address.is_some())
            + self.fdb.len()
            + self.neighbours.len()
            + self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The desired state for `plan`, with the underlay device's index.
pub fn desired(plan: &Plan, cfg: &VxlanConfig, underlay: u32) -> Desired {
    let device = DeviceSpec {
        name: cfg.dev.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local: plan.endpoint,
        underlay,
        mtu: u32::from(if cfg.esp {
            mtu(plan) - crate::plan::transform::esp_transport_overhead(plan.transform)
        } else {
            mtu(plan)
        }),
        mac: vtep_mac(plan.host.as_str()),
        no_ipv6_ll: plan.cidr.network().is_ipv4(),
    };
    let mut fdb = Vec::with_capacity(plan.peers.len() * 2);
    let mut neighbours = Vec::with_capacity(plan.peers.len());
    let mut routes = Vec::with_capacity(plan.peers.len());
    for p in &plan.peers {
        let owner = Owner::Peer(p.host.to_string());
        let mac = vtep_mac(p.host.as_str());
        fdb.push((
            owner.clone(),
            FdbEntry {
                mac: Mac::ZERO,
                dst: p.endpoint,
            },
        ));
        fdb.push((
            owner.clone(),
            FdbEntry {
                mac,
                dst: p.endpoint,
            },
        ));
        let Some(via) = vtep_ip(&p.subnets) else {
            continue;
        };
        neighbours.push((owner.clone(), Neighbour { ip: via, mac }));
        for s in &p.subnets {
            routes.push((
                owner.clone(),
                Route {
                    dst: s.trunc(),
                    via,
                },
            ));
        }
    }
    Desired {
        device,
        address: vtep_ip(&plan.subnets).map(host_prefix),
        fdb,
        neighbours,
        routes,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};
    use crate::plan::{plan, PlanOptions};

    /// A plan for `me` among `hosts` (id, endpoint, subnets).
    pub(crate) fn mk_plan(hosts: &[(&str, &str, &[&str])], me: &str, backend: &str) -> Plan {
        let c = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                backend: Some(backend.into()),
                mtu: Some(1500),
            },
            hosts: hosts
                .iter()
                .map(|(id, ip, nets)| RawHost {
                    id: id.to_string(),
                    agent_ip: ip.to_string(),
                    subnets: nets.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                })
                .collect(),
        })
        .unwrap();
        plan(&c, me, &PlanOptions::default(), None).unwrap()
    }

    pub(crate) const HOSTS: [(&str, &str, &[&str]); 3] = [
        ("h1", "192.168.77.1", &["10.42.1.0/24"]),
        ("h2", "192.168.77.2", &["10.42.2.0/24", "10.42.102.0/24"]),
        ("h3", "192.168.77.3", &["10.42.3.0/24"]),
    ];

    #[test]
    fn mac_is_deterministic_unicast_and_locally_administered() {
        let a = vtep_mac("host-a");
        assert_eq!(a, vtep_mac("host-a"));
        assert_ne!(a, vtep_mac("host-b"));
        // SHA-256("host-a") starts with these bytes; first octet adjusted.
        let d = ring::digest::digest(&ring::digest::SHA256, b"host-a");
        assert_eq!(&a.0[1..], &d.as_ref()[1..6]);
        assert_eq!(a.0[0], (d.as_ref()[0] | 0x02) & !0x01);
        for i in 0..1000 {
            let m = vtep_mac(&format!("host-{i}"));
            assert_eq!(m.0[0] & 0x01, 0, "unicast: {m}");
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered: {m}");
            assert!(!m.is_zero());
        }
        // A known value, so other tools can rely on the derivation.
        assert_eq!(vtep_mac("h1").to_string(), {
            let d = ring::digest::digest(&ring::digest::SHA256, b"h1");
            let b = d.as_ref();
            Mac([(b[0] | 2) & !1, b[1], b[2], b[3], b[4], b[5]]).to_string()
        });
    }

    #[test]
    fn vtep_ip_is_the_first_subnets_network_address() {
        let nets: Vec<IpNet> = vec!["10.42.7.0/24".parse().unwrap()];
        assert_eq!(vtep_ip(&nets), Some("10.42.7.0".parse().unwrap()));
        assert_eq!(vtep_ip(&[]), None);
        assert_eq!(
            host_prefix("fd42::".parse().unwrap()).to_string(),
            "fd42::/128"
        );
    }

    #[test]
    fn desired_for_three_hosts() {
        let p = mk_plan(&HOSTS, "h1", "vxlan");
        let d = desired(&p, &VxlanConfig::default(), 2);
        assert_eq!(d.device.name, "vtep1042");
        assert_eq!(d.device.vni, 1042);
        assert_eq!(d.device.port, 4789);
        assert_eq!(d.device.local.to_string(), "192.168.77.1");
        assert_eq!(d.device.underlay, 2);
        assert_eq!(d.device.mtu, 1450);
        assert_eq!(d.device.mac, vtep_mac("h1"));
        assert!(d.device.no_ipv6_ll);
        assert_eq!(d.address.unwrap().to_string(), "10.42.1.0/32");
        let fdb: Vec<String> = d.fdb.iter().map(|(o, e)| format!("{o}: {e}")).collect();
        assert_eq!(
            fdb,
            vec![
                "h2: fdb 00:00:00:00:00:00 dst 192.168.77.2".to_string(),
                format!("h2: fdb {} dst 192.168.77.2", vtep_mac("h2")),
                "h3: fdb 00:00:00:00:00:00 dst 192.168.77.3".to_string(),
                format!("h3: fdb {} dst 192.168.77.3", vtep_mac("h3")),
            ]
        );
        let n: Vec<String> = d.neighbours.iter().map(|(_, n)| n.to_string()).collect();
        assert_eq!(
            n,
            vec![
                format!("neigh 10.42.2.0 lladdr {} permanent", vtep_mac("h2")),
                format!("neigh 10.42.3.0 lladdr {} permanent", vtep_mac("h3")),
            ]
        );
        let r: Vec<String> = d.routes.iter().map(|(o, r)| format!("{o}: {r}")).collect();
        assert_eq!(
            r,
            vec![
                "h2: route 10.42.2.0/24 via 10.42.2.0 onlink",
                "h2: route 10.42.102.0/24 via 10.42.2.0 onlink",
                "h3: route 10.42.3.0/24 via 10.42.3.0 onlink",
            ]
        );
        assert_eq!(d.len(), 1 + 1 + 4 + 2 + 3);
    }

    #[test]
    fn mtu_is_vxlan_overhead_even_if_metadata_says_ipsec() {
        let p = mk_plan(&HOSTS, "h1", "ipsec");
        assert_ne!(p.mtu, 1450);
        assert_eq!(mtu(&p), 1450);
        let d = desired(&p, &VxlanConfig::default(), 2);
        assert_eq!(d.device.mtu, 1450);
        let v6 = mk_plan(
            &[
                ("a", "2001:db8::1", &["10.42.1.0/24"]),
                ("b", "2001:db8::2", &["10.42.2.0/24"]),
            ],
            "a",
            "vxlan",
        );
        assert_eq!(mtu(&v6), 1430);
    }

    #[test]
    fn peer_without_subnets_gets_fdb_only_and_config_is_used() {
        let p = mk_plan(
            &[
                ("h1", "192.168.77.1", &["10.42.1.0/24"]),
                ("h2", "192.168.77.2", &[]),
            ],
            "h1",
            "vxlan",
        );
        let cfg = VxlanConfig {
            dev: "vx9".into(),
            vni: 9,
            port: 8472,
            esp: false,
        };
        let d = desired(&p, &cfg, 5);
        assert_eq!(d.fdb.len(), 2);
        assert!(d.neighbours.is_empty() && d.routes.is_empty());
        assert_eq!(
            (d.device.name.as_str(), d.device.vni, d.device.port),
            ("vx9", 9, 8472)
        );
    }
}
