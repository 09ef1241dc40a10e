//! The desired VXLAN state for one host, from its plan (pure).
//!
//! Addressing: every host has a VTEP address ([`crate::model::Host::vtep`]), an overlay
//! address that no workload can hold, put on our device as a host address (`/32`, `/128` for
//! IPv6). It is the metadata's `vtep` when given (rancher-metadata: the host's network agent
//! container's address, as rancher-net used its own container's address), otherwise the
//! network address of the host's first subnet with one to spare (`10.42.N.0/24` ->
//! `10.42.N.0`, the Flannel scheme: an allocator never hands the network address out). It is
//! never derived from rancher-metadata's subnets, which aggregate container /32s: there, the
//! first address of a subnet is a container's (a VTEP taking it cut that container off).
//! Towards each peer:
//!
//! - FDB `00:00:00:00:00:00 dst <peer endpoint>` (broadcast/unknown/multicast) and
//!   FDB `<peer VTEP MAC> dst <peer endpoint>`;
//! - a permanent neighbour `<peer VTEP address> lladdr <peer VTEP MAC>`;
//! - `route <peer subnet> via <peer VTEP address> dev <our device> onlink`, one per subnet,
//!   and `route <peer VTEP address>/32 via <peer VTEP address> onlink` when no subnet of the
//!   peer holds its VTEP address (a `vtep` outside its subnets).
//!
//! A peer without a VTEP address gets its FDB entries but no neighbour or route, and, if it
//! has subnets, is reported ([`Desired::no_vtep`]): they are unreachable until the metadata
//! gives it one. Being possibly inside the peer's own subnet, the gateway needs `onlink`. Traffic the
//! host itself sends to a remote container leaves from its VTEP address, which the peer
//! routes back through the same tunnel; forwarded container traffic keeps its own addresses.
//! Neither ARP nor learning is involved: every mapping is static, so nothing floods and
//! nothing ages out.
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
    /// Peers with subnets but without a VTEP address (nothing routes to them).
    pub no_vtep: Vec<Owner>,
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
    let mut no_vtep = Vec::new();
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
        let Some(via) = p.vtep else {
            if !p.subnets.is_empty() {
                no_vtep.push(owner);
            }
            continue;
        };
        neighbours.push((owner.clone(), Neighbour { ip: via, mac }));
        if !p.subnets.iter().any(|s| s.contains(&via)) {
            routes.push((
                owner.clone(),
                Route {
                    dst: host_prefix(via),
                    via,
                },
            ));
        }
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
        address: plan.vtep.map(host_prefix),
        fdb,
        neighbours,
        routes,
        no_vtep,
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
                .map(|(id, ip, nets)| crate::test_cluster::host(id, ip, nets))
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

    /// A plan for `me` among raw hosts (vtep and workload_subnets as given).
    fn raw_plan(hosts: Vec<RawHost>, me: &str) -> Plan {
        let c = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                backend: Some("vxlan".into()),
                mtu: Some(1500),
            },
            hosts,
        })
        .unwrap();
        plan(&c, me, &PlanOptions::default(), None).unwrap()
    }

    /// A rancher-metadata-shaped host: aggregated container /32s, VTEP from its agent.
    fn rancher_host(id: &str, ip: &str, subnets: &[&str], vtep: Option<&str>) -> RawHost {
        RawHost {
            id: id.into(),
            agent_ip: ip.into(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            vtep: vtep.map(str::to_string),
            workload_subnets: true,
            ..Default::default()
        }
    }

    #[test]
    fn file_mode_vtep_is_the_first_subnets_network_address() {
        let p = mk_plan(&HOSTS, "h1", "vxlan");
        let d = desired(&p, &VxlanConfig::default(), 7);
        assert_eq!(d.address, Some("10.42.1.0/32".parse().unwrap()));
        let h2 = p.peers.iter().find(|p| p.host.as_str() == "h2").unwrap();
        assert_eq!(h2.vtep, Some("10.42.2.0".parse().unwrap()));
        assert!(d.no_vtep.is_empty());
        assert_eq!(
            host_prefix("fd42::".parse().unwrap()).to_string(),
            "fd42::/128"
        );
    }

    #[test]
    fn rancher_addressing_never_routes_a_container_as_a_vtep() {
        // Random container /32s; node-2's agent is 10.42.4.1, its other containers
        // 10.42.4.241 (the case that broke: it was taken as the VTEP) and 10.42.9.17; node-3
        // has no agent yet.
        let hosts = vec![
            rancher_host(
                "node-1",
                "192.168.77.1",
                &["10.42.1.179/32"],
                Some("10.42.1.179"),
            ),
            rancher_host(
                "node-2",
                "192.168.77.2",
                &["10.42.4.1/32", "10.42.4.241/32", "10.42.9.17/32"],
                Some("10.42.4.1"),
            ),
            rancher_host("node-3", "192.168.77.3", &["10.42.0.4/30"], None),
        ];
        let p = raw_plan(hosts, "node-1");
        let d = desired(&p, &VxlanConfig::default(), 7);
        assert_eq!(d.address, Some("10.42.1.179/32".parse().unwrap()));
        let via: IpAddr = "10.42.4.1".parse().unwrap();
        let routes: Vec<(IpNet, IpAddr)> = d.routes.iter().map(|(_, r)| (r.dst, r.via)).collect();
        assert_eq!(
            routes,
            [
                ("10.42.4.1/32".parse().unwrap(), via),
                ("10.42.4.241/32".parse().unwrap(), via),
                ("10.42.9.17/32".parse().unwrap(), via),
            ]
        );
        assert_eq!(
            d.neighbours.iter().map(|(_, n)| n.ip).collect::<Vec<_>>(),
            [via]
        );
        // node-3: an aggregate /30 of containers; its network address 10.42.0.4 is a
        // container, so it has no VTEP, and is reported instead of being routed.
        assert_eq!(d.no_vtep, [Owner::Peer("node-3".into())]);
        assert!(d
            .routes
            .iter()
            .all(|(o, _)| *o != Owner::Peer("node-3".into())));
        assert_eq!(
            d.fdb
                .iter()
                .filter(|(o, _)| *o == Owner::Peer("node-3".into()))
                .count(),
            2
        );
    }

    #[test]
    fn a_vtep_outside_the_peers_subnets_gets_a_route_of_its_own() {
        let mut h2 = rancher_host("h2", "192.168.77.2", &["10.42.2.0/24"], Some("10.42.200.2"));
        h2.workload_subnets = false;
        let hosts = vec![
            rancher_host("h1", "192.168.77.1", &["10.42.1.0/24"], Some("10.42.200.1")),
            h2,
        ];
        let p = raw_plan(hosts, "h1");
        let d = desired(&p, &VxlanConfig::default(), 7);
        let via: IpAddr = "10.42.200.2".parse().unwrap();
        let routes: Vec<(IpNet, IpAddr)> = d.routes.iter().map(|(_, r)| (r.dst, r.via)).collect();
        assert_eq!(
            routes,
            [
                ("10.42.200.2/32".parse().unwrap(), via),
                ("10.42.2.0/24".parse().unwrap(), via),
            ]
        );
        assert_eq!(d.address, Some("10.42.200.1/32".parse().unwrap()));
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
        // Over IPv6 the device's local address and every FDB remote are IPv6; encrypted
        // VXLAN (ESP transport mode, no second IP header) leaves its overhead on top.
        let d = desired(&v6, &VxlanConfig::default(), 2);
        assert_eq!(
            (d.device.local.to_string(), d.device.mtu),
            ("2001:db8::1".into(), 1430)
        );
        assert!(d
            .fdb
            .iter()
            .all(|(_, e)| e.dst.to_string() == "2001:db8::2"));
        let esp = VxlanConfig {
            esp: true,
            ..VxlanConfig::default()
        };
        assert_eq!(desired(&v6, &esp, 2).device.mtu, 1430 - 37);
        assert_eq!(desired(&p, &esp, 2).device.mtu, 1450 - 37);
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
