//! The desired XFRM state for a plan (pure).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::objects::*;
use crate::plan::{Plan, SaKey, Transform};

/// Priority of per-pair policies (lower value wins in the kernel).
pub const PAIR_PRIORITY: u32 = 0x2a00;
/// Priority of the fail-closed block policy: below every pair policy.
pub const BLOCK_PRIORITY: u32 = 0x000f_ff00;
/// NAT-T port.
pub const NAT_T_PORT: u16 = 4500;

/// What the kernel should hold, each object with its owner.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub policies: Vec<(Owner, Policy)>,
    pub sas: Vec<(Owner, Sa)>,
}

/// The catch-all prefix of a family.
pub fn any(v6: bool) -> IpNet {
    if v6 {
        IpNet::V6(Ipv6Net::default())
    } else {
        IpNet::V4(Ipv4Net::default())
    }
}

/// Kernel crypto for a transform and key.
pub fn crypto(t: Transform, key: &SaKey) -> Crypto {
    let owned = |b: &[u8]| zeroize::Zeroizing::new(b.to_vec());
    if t.is_aead() {
        Crypto::Aead {
            name: "rfc4106(gcm(aes))".into(),
            key: owned(key.enc()),
            icv_bits: (t.icv_len() * 8) as u32,
        }
    } else {
        Crypto::EncAuth {
            enc_name: "cbc(aes)".into(),
            enc_key: owned(key.enc()),
            auth_name: "hmac(sha256)".into(),
            auth_key: owned(key.auth()),
            trunc_bits: (t.icv_len() * 8) as u32,
        }
    }
}

/// The fail-closed block policy: marked traffic that matches no pair policy is dropped.
pub fn block_policy(plan: &Plan) -> Policy {
    let v6 = plan.cidr.network().is_ipv6();
    Policy {
        id: PolicyId {
            dir: Dir::Out,
            src: any(v6),
            dst: any(v6),
            l4: L4::ANY,
            mark: Mark {
                value: plan.marks.encrypt,
                mask: plan.marks.mask,
            },
        },
        priority: BLOCK_PRIORITY,
        action: Action::Block,
        tmpl: None,
    }
}

/// Policies and SAs for `plan`. Peers without keys (no PSK) get policies only: their
/// traffic is blocked, never sent in clear.
///
/// Per peer and remote prefix: `out 0/0 -> prefix` (encrypt mark; whatever the source: a
/// container, the host itself), `in` and `fwd` `prefix -> 0/0` (no mark) with the peer's
/// tunnel template. Inbound this means: a packet whose source is in a peer's prefix is
/// accepted only if it came through an SA from that peer's endpoint with that peer's reqid;
/// in clear it is dropped (`XfrmInNoPols`/`XfrmInTmplMismatch`), and a peer cannot inject
/// packets claiming another peer's addresses. Traffic from anywhere else (the host's own
/// containers, the internet) matches none of them.
pub fn desired(plan: &Plan) -> Desired {
    let mut d = Desired::default();
    d.policies.push((Owner::Mesh, block_policy(plan)));
    let me: IpAddr = plan.endpoint;
    let out_mark = Mark {
        value: plan.marks.encrypt,
        mask: plan.marks.mask,
    };
    let encap = plan.udp_encap.then_some((NAT_T_PORT, NAT_T_PORT));
    let inner_v6 = plan.cidr.network().is_ipv6();
    for p in &plan.peers {
        let owner = Owner::Peer(p.host.as_str().into());
        let out_t = Tmpl {
            src: me,
            dst: p.endpoint,
            reqid: p.reqid,
            transport: false,
        };
        let in_t = Tmpl {
            src: p.endpoint,
            dst: me,
            reqid: p.reqid,
            transport: false,
        };
        // One policy per direction and remote prefix, the local side a wildcard: the count
        // grows with the remote prefixes, not with local x remote, and with the SPD hash
        // thresholds set to (local 0, remote = shortest remote prefix) every one of them is
        // in the kernel's policy hash table, so the lookup per packet does not depend on
        // their number (see [`prefix_thresholds`] and BENCHMARKS.md).
        for remote in aggregate(&p.subnets) {
            let pol = |dir, src, dst, mark, tmpl| Policy {
                id: PolicyId {
                    dir,
                    src,
                    dst,
                    l4: L4::ANY,
                    mark,
                },
                priority: PAIR_PRIORITY,
                action: Action::Allow,
                tmpl: Some(tmpl),
            };
            let anywhere = any(inner_v6);
            d.policies.push((
                owner.clone(),
                pol(Dir::Out, anywhere, remote, out_mark, out_t),
            ));
            d.policies.push((
                owner.clone(),
                pol(Dir::In, remote, anywhere, Mark::NONE, in_t),
            ));
            d.policies.push((
                owner.clone(),
                pol(Dir::Fwd, remote, anywhere, Mark::NONE, in_t),
            ));
        }
        if let Some(ko) = &p.key_out {
            d.sas.push((
                owner.clone(),
                Sa {
                    id: SaId {
                        dst: p.endpoint,
                        spi: p.spi_out,
                    },
                    src: me,
                    reqid: p.reqid,
                    inner_v6,
                    crypto: crypto(plan.transform, ko),
                    encap,
                    output_mark: None,
                    replay_window: plan.replay_window,
                    esn: true,
                    transport: false,
                },
            ));
            // One inbound SA per accepted generation: a peer may switch first.
            for (rx, ki) in p.rx.iter().filter_map(|r| r.key.as_ref().map(|k| (r, k))) {
                d.sas.push((
                    owner.clone(),
                    Sa {
                        id: SaId {
                            dst: me,
                            spi: rx.spi,
                        },
                        src: p.endpoint,
                        reqid: p.reqid,
                        inner_v6,
                        crypto: crypto(plan.transform, ki),
                        encap,
                        output_mark: Some(Mark {
                            value: plan.marks.decrypt,
                            mask: plan.marks.mask,
                        }),
                        replay_window: plan.replay_window,
                        esn: true,
                        transport: false,
                    },
                ));
            }
        }
    }
    d
}

/// Encrypted VXLAN: ESP in transport mode for the VXLAN traffic (UDP to `port`) between this
/// host and each peer. Per peer an `out` and an `in` policy selecting exactly that traffic
/// (unmarked: VXLAN to a peer never leaves in clear, and plaintext VXLAN from a peer is
/// refused) and the two SAs, with the same SPIs and keys as the mesh's.
pub fn vxlan_esp(plan: &Plan, port: u16) -> Desired {
    let mut d = Desired::default();
    let me = plan.endpoint;
    let host = |ip: IpAddr| IpNet::from(ip);
    let l4 = L4 {
        proto: 17,
        dport: port,
    };
    for p in &plan.peers {
        let owner = Owner::Peer(p.host.as_str().into());
        let pol = |dir, src: IpAddr, dst: IpAddr| Policy {
            id: PolicyId {
                dir,
                src: host(src),
                dst: host(dst),
                l4,
                mark: Mark::NONE,
            },
            priority: PAIR_PRIORITY,
            action: Action::Allow,
            tmpl: Some(Tmpl {
                src,
                dst,
                reqid: p.reqid,
                transport: true,
            }),
        };
        d.policies
            .push((owner.clone(), pol(Dir::Out, me, p.endpoint)));
        d.policies
            .push((owner.clone(), pol(Dir::In, p.endpoint, me)));
        if let Some(ko) = &p.key_out {
            let sa = |src, dst, spi, key| Sa {
                id: SaId { dst, spi },
                src,
                reqid: p.reqid,
                inner_v6: me.is_ipv6(),
                crypto: crypto(plan.transform, key),
                encap: None,
                output_mark: None,
                replay_window: plan.replay_window,
                esn: true,
                transport: true,
            };
            d.sas
                .push((owner.clone(), sa(me, p.endpoint, p.spi_out, ko)));
            for (rx, ki) in p.rx.iter().filter_map(|r| r.key.as_ref().map(|k| (r, k))) {
                d.sas.push((owner.clone(), sa(p.endpoint, me, rx.spi, ki)));
            }
        }
    }
    d
}

/// Prefixes with host bits cleared, deduplicated, adjacent ones merged.
fn aggregate(nets: &[IpNet]) -> Vec<IpNet> {
    let v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    IpNet::aggregate(&v)
}

/// The SPD hash thresholds (local, remote prefix bits) that put every pair policy in the
/// kernel's policy hash table: the local side of each is a wildcard (0 bits), the remote side
/// at least the shortest remote prefix. `None` without peers.
pub fn prefix_thresholds(plan: &Plan) -> Option<(u8, u8)> {
    let local = 0;
    let remote = plan
        .peers
        .iter()
        .flat_map(|p| p.subnets.iter().map(|n| n.prefix_len()))
        .min()?;
    Some((local, remote))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};
    use crate::plan::{plan, PlanOptions, Psk};

    fn a_plan(psk: bool) -> Plan {
        let c = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                ..Default::default()
            },
            hosts: vec![
                RawHost {
                    id: "a".into(),
                    agent_ip: "192.168.77.1".into(),
                    subnets: vec!["10.42.1.0/24".into()],
                    ..Default::default()
                },
                RawHost {
                    id: "b".into(),
                    agent_ip: "192.168.77.2".into(),
                    subnets: vec!["10.42.2.0/24".into(), "10.42.102.0/24".into()],
                    ..Default::default()
                },
            ],
        })
        .unwrap();
        let k = Psk::from_bytes(&[1; 32]);
        plan(&c, "a", &PlanOptions::default(), psk.then_some(&k)).unwrap()
    }

    #[test]
    fn policies_per_subnet_pair_and_direction() {
        let p = a_plan(true);
        let d = desired(&p);
        // block + 2 subnet pairs x 3 directions
        assert_eq!(d.policies.len(), 7);
        // One out SA; in SAs for generations 0, 1 and 2 (the default generation is 1).
        assert_eq!(d.sas.len(), 4);
        let out: Vec<_> = d
            .policies
            .iter()
            .filter(|(_, x)| x.id.dir == Dir::Out && x.tmpl.is_some())
            .collect();
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|(_, x)| x.id.mark.value == 0x100000 && x.id.mark.mask == 0x300000));
        let fwd = d
            .policies
            .iter()
            .find(|(_, x)| x.id.dir == Dir::Fwd)
            .unwrap();
        assert_eq!(
            fwd.1.id.mark,
            Mark::NONE,
            "inbound policies must catch plaintext too"
        );
        assert_eq!(fwd.1.tmpl.unwrap().src.to_string(), "192.168.77.2");
        let sa_out = &d.sas[0].1;
        assert_eq!(sa_out.id.spi, p.peers[0].spi_out);
        assert_eq!(sa_out.id.dst.to_string(), "192.168.77.2");
        assert!(
            matches!(&sa_out.crypto, Crypto::Aead { key, icv_bits: 128, .. } if key.len() == 36)
        );
        assert!(d.sas[1..].iter().all(|(_, s)| s.output_mark.is_some()));
        let in_spis: Vec<u32> = d.sas[1..].iter().map(|(_, s)| s.id.spi).collect();
        let want: Vec<u32> = p.peers[0].rx.iter().map(|r| r.spi).collect();
        assert_eq!(in_spis, want);
        assert!(in_spis.contains(&p.peers[0].spi_in));
        assert_eq!(
            in_spis.iter().map(|s| s & 0xf).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "the generation is the SPI's low nibble"
        );
        assert!(d.sas.iter().all(|(_, s)| s.esn && s.replay_window == 1024));
        assert_eq!(prefix_thresholds(&p), Some((0, 24)));
        // The local side of every pair policy is the wildcard; the remote side a peer prefix.
        for (_, x) in d.policies.iter().filter(|(_, x)| x.tmpl.is_some()) {
            let (local, remote) = match x.id.dir {
                Dir::Out => (x.id.src, x.id.dst),
                _ => (x.id.dst, x.id.src),
            };
            assert_eq!(local.prefix_len(), 0, "{x:?}");
            assert!(p.peers[0].subnets.contains(&remote), "{x:?}");
        }
    }

    #[test]
    fn policies_do_not_multiply_with_local_subnets() {
        // A Rancher-shaped host: 10 local /32s and 2 peers with 10 random /32s each.
        let host = |id: &str, ip: &str, subnets: &[String]| RawHost {
            id: id.into(),
            agent_ip: ip.into(),
            subnets: subnets.to_vec(),
            ..Default::default()
        };
        let addrs = |seed: u32| -> Vec<String> {
            (0..10u32)
                .map(|i| {
                    let x = (seed * 7919 + i * 104_729) % 65_000;
                    format!("10.42.{}.{}/32", x / 254, x % 254 + 1)
                })
                .collect()
        };
        let (a, b, c) = (addrs(1), addrs(2), addrs(3));
        let cluster = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                ..Default::default()
            },
            hosts: vec![
                host("a", "192.168.77.1", &a),
                host("b", "192.168.77.2", &b),
                host("c", "192.168.77.3", &c),
            ],
        })
        .unwrap();
        let p = plan(&cluster, "a", &PlanOptions::default(), None).unwrap();
        let d = desired(&p);
        // 3 directions x 20 remote prefixes + the block policy (was 3 x 10 x 20 + 1 = 601).
        assert_eq!(d.policies.len(), 3 * 20 + 1);
        assert_eq!(prefix_thresholds(&p), Some((0, 32)));
    }

    #[test]
    fn a_key_ring_limits_the_inbound_generations_to_its_secrets() {
        let c = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                ..Default::default()
            },
            hosts: ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, id)| RawHost {
                    id: id.to_string(),
                    agent_ip: format!("192.168.77.{}", i + 1),
                    subnets: vec![format!("10.42.{}.0/24", i + 1)],
                    ..Default::default()
                })
                .collect(),
        })
        .unwrap();
        let ring = Psk::ring(&[(4, &[4; 32]), (5, &[5; 32])]);
        let opts = |generation| PlanOptions {
            generation,
            ..Default::default()
        };
        let p = plan(&c, "a", &opts(4), Some(&ring)).unwrap();
        let gens: Vec<u32> = p.peers[0].rx.iter().map(|r| r.generation).collect();
        assert_eq!(gens, vec![4, 5], "3 is not in the ring");
        assert_eq!(desired(&p).sas.len(), 3);
        // Keys of different generations come from different secrets.
        assert_ne!(p.peers[0].rx[0].key_id, p.peers[0].rx[1].key_id);
        let e = plan(&c, "a", &opts(6), Some(&ring)).unwrap_err();
        assert!(e.to_string().contains("no secret for it"), "{e}");
        assert!(e.to_string().contains("4, 5"), "{e}");
        // The sender's key of generation 5 is what the receiver holds for generation 5.
        let b = plan(&c, "b", &opts(5), Some(&ring)).unwrap();
        let rx5 = p.peers[0].rx.iter().find(|r| r.generation == 5).unwrap();
        assert_eq!(rx5.spi, b.peers[0].spi_out);
        assert_eq!(rx5.key_id, b.peers[0].key_out_id);
    }

    #[test]
    fn encrypted_vxlan_selects_udp_to_the_port_between_endpoints() {
        let p = a_plan(true);
        let d = vxlan_esp(&p, 4789);
        assert_eq!(d.policies.len(), 2);
        assert_eq!(d.sas.len(), 4, "out + in for generations 0, 1, 2");
        let out = &d.policies[0].1;
        assert_eq!(out.id.src.to_string(), "192.168.77.1/32");
        assert_eq!(out.id.dst.to_string(), "192.168.77.2/32");
        assert_eq!(
            out.id.l4,
            L4 {
                proto: 17,
                dport: 4789
            }
        );
        assert_eq!(out.id.mark, Mark::NONE);
        assert!(out.tmpl.unwrap().transport);
        assert!(d.sas.iter().all(|(_, s)| s.transport && s.encap.is_none()));
        assert_eq!(d.sas[0].1.id.spi, p.peers[0].spi_out);
    }

    #[test]
    fn without_psk_policies_only() {
        let d = desired(&a_plan(false));
        assert!(d.sas.is_empty());
        assert_eq!(d.policies.len(), 7);
    }

    #[test]
    fn ownership() {
        let p = a_plan(true);
        let d = desired(&p);
        assert!(d.policies.iter().all(|(_, x)| x.is_owned(&p.marks)));
        let mut foreign = d.policies[1].1.clone();
        foreign.tmpl.as_mut().unwrap().reqid = 1;
        assert!(!foreign.is_owned(&p.marks));
        let mut other_block = block_policy(&p);
        other_block.id.mark.value = 0x4000;
        assert!(!other_block.is_owned(&p.marks));
    }
}
