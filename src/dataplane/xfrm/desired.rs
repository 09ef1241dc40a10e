//! The desired XFRM state for a plan (pure).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::objects::*;
use crate::plan::{Peer, Plan, SaKey, Transform};

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

/// The overlay's families (IPv6 or not), one per cidr: two for a dual-stack overlay.
pub fn overlay_families(plan: &Plan) -> Vec<bool> {
    let mut v: Vec<bool> = plan.cidrs.iter().map(|c| c.network().is_ipv6()).collect();
    if v.is_empty() {
        v.push(plan.cidr.network().is_ipv6());
    }
    v
}

/// The inner family of the plan's tunnel-mode SAs: the overlay's, or both.
pub fn inner_of(plan: &Plan) -> Inner {
    match overlay_families(plan).as_slice() {
        [v6] => Inner::of(*v6),
        _ => Inner::Any,
    }
}

/// The fail-closed block policy: marked traffic that matches no pair policy is dropped.
pub fn block_policy(plan: &Plan) -> Policy {
    block_policy_of(plan, plan.cidr.network().is_ipv6())
}

/// [`block_policy`] for one family: a dual-stack overlay has one per family.
pub fn block_policy_of(plan: &Plan, v6: bool) -> Policy {
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
            if_id: 0,
            dev: 0,
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
///
/// Dual-stack: a block policy per family, and each remote prefix's policies are of its own
/// family (the wildcard side too), with the same templates: the tunnel's addresses are the
/// underlay's, whatever the inner family (v4-in-v6 and v6-in-v4 alike). One SA pair per
/// peer carries both families ([`Inner::Any`]).
pub fn desired(plan: &Plan) -> Desired {
    let mut d = Desired::default();
    for v6 in overlay_families(plan) {
        d.policies.push((Owner::Mesh, block_policy_of(plan, v6)));
    }
    let me: IpAddr = plan.endpoint;
    let out_mark = Mark {
        value: plan.marks.encrypt,
        mask: plan.marks.mask,
    };
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
                    if_id: 0,
                    dev: 0,
                },
                priority: PAIR_PRIORITY,
                action: Action::Allow,
                tmpl: Some(tmpl),
            };
            let anywhere = any(remote.network().is_ipv6());
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
        tunnel_sas(plan, p, &owner, 0, &mut d);
    }
    d
}

/// The tunnel-mode SAs of one peer (none without keys): the outbound one and one inbound SA
/// per accepted generation (a peer may switch first), bound to `if_id` (0: policy mode).
fn tunnel_sas(plan: &Plan, p: &Peer, owner: &Owner, if_id: u32, d: &mut Desired) {
    let Some(ko) = &p.key_out else {
        return;
    };
    let me = plan.endpoint;
    let encap = plan.udp_encap.then_some((NAT_T_PORT, NAT_T_PORT));
    let inner = inner_of(plan);
    let sa = |src, dst, spi, key, output_mark| Sa {
        id: SaId { dst, spi },
        src,
        reqid: p.reqid,
        inner,
        crypto: crypto(plan.transform, key),
        encap,
        output_mark,
        replay_window: plan.replay_window,
        esn: true,
        transport: false,
        if_id,
    };
    d.sas
        .push((owner.clone(), sa(me, p.endpoint, p.spi_out, ko, None)));
    let decrypted = Some(Mark {
        value: plan.marks.decrypt,
        mask: plan.marks.mask,
    });
    for (rx, ki) in p.rx.iter().filter_map(|r| r.key.as_ref().map(|k| (r, k))) {
        d.sas
            .push((owner.clone(), sa(p.endpoint, me, rx.spi, ki, decrypted)));
    }
}

/// Route mode ([`crate::dataplane::xfrmi`]): per peer three policies, `out`, `in` and `fwd`,
/// all `0/0 -> 0/0` of the overlay's family, bound to the peer's XFRM interface id (its
/// reqid) and unmarked, with the same tunnel templates and SAs (also bound to the id) as
/// policy mode. What selects the peer is the route: a remote prefix routed into the peer's
/// interface `imx<slot>` reaches the kernel's policy lookup with that interface's id. The
/// kernel keeps policies in per-(if_id, family, direction) bins, so each lookup sees exactly
/// one `0/0` policy whatever the number of peers and containers: `3 x peers` policies plus
/// the two [`underlay_blocks`], O(1) per packet.
///
/// There is no outbound block policy here: the kernel's first (if_id 0) lookup of a packet
/// routed into an XFRM interface would match it and drop everything. Outbound fail-closed is
/// the unreachable route for the overlay in the mesh's table ([`crate::dataplane::routes`]),
/// the interface itself (it never sends in clear: no policy or no SA for its id drops the
/// packet) and the firewall guard.
///
/// Inbound: a decrypted packet arrives on the peer's interface and is checked against that
/// id's `in`/`fwd` policy (the template: this peer's endpoint and reqid). The peer's own
/// prefixes are not in the selectors, so unlike policy mode the policies do not stop a peer
/// from sending with another peer's container addresses (see README, route mode).
pub fn route_mode(plan: &Plan, underlay_dev: u32) -> Desired {
    let mut d = Desired::default();
    d.policies.extend(underlay_blocks(plan, underlay_dev));
    let me: IpAddr = plan.endpoint;
    for p in &plan.peers {
        let owner = Owner::Peer(p.host.as_str().into());
        let if_id = crate::dataplane::xfrmi::if_id(p);
        // Dual-stack: the three policies for each overlay family.
        for anywhere in overlay_families(plan).into_iter().map(any) {
            let pol = |dir, src, dst| Policy {
                id: PolicyId {
                    dir,
                    src: anywhere,
                    dst: anywhere,
                    l4: L4::ANY,
                    mark: Mark::NONE,
                    if_id,
                    dev: 0,
                },
                priority: PAIR_PRIORITY,
                action: Action::Allow,
                tmpl: Some(Tmpl {
                    src,
                    dst,
                    reqid: p.reqid,
                    transport: false,
                }),
            };
            d.policies
                .push((owner.clone(), pol(Dir::Out, me, p.endpoint)));
            d.policies
                .push((owner.clone(), pol(Dir::In, p.endpoint, me)));
            d.policies
                .push((owner.clone(), pol(Dir::Fwd, p.endpoint, me)));
        }
        tunnel_sas(plan, p, &owner, if_id, &mut d);
    }
    d
}

/// Route mode, inbound fail-closed: `in` and `fwd` block policies (interface id 0) for
/// packets from the overlay that arrive in clear on the underlay device. On the inbound
/// check the kernel matches the selector's device against the interface the packet came in
/// on (`skb_iif`) and uses interface id 0 for anything not decrypted by an XFRM interface,
/// so plaintext claiming an overlay source from the underlay is dropped, while traffic from
/// this host's containers (another device) and decrypted traffic (its peer's interface id)
/// never meets these policies. Mark 0 under our mask identifies them as ours.
pub fn underlay_blocks(plan: &Plan, underlay_dev: u32) -> Vec<(Owner, Policy)> {
    let cidrs = if plan.cidrs.is_empty() {
        vec![plan.cidr]
    } else {
        plan.cidrs.clone()
    };
    cidrs
        .into_iter()
        .flat_map(|c| [(c, Dir::In), (c, Dir::Fwd)])
        .map(|(cidr, dir)| {
            let v6 = cidr.network().is_ipv6();
            (
                Owner::Mesh,
                Policy {
                    id: PolicyId {
                        dir,
                        src: cidr.trunc(),
                        dst: any(v6),
                        l4: L4::ANY,
                        mark: Mark {
                            value: 0,
                            mask: plan.marks.mask,
                        },
                        if_id: 0,
                        dev: underlay_dev,
                    },
                    priority: BLOCK_PRIORITY,
                    action: Action::Block,
                    tmpl: None,
                },
            )
        })
        .collect()
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
                if_id: 0,
                dev: 0,
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
                inner: Inner::of(me.is_ipv6()),
                crypto: crypto(plan.transform, key),
                encap: None,
                output_mark: None,
                replay_window: plan.replay_window,
                esn: true,
                transport: true,
                if_id: 0,
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
    prefix_thresholds_of(plan, plan.cidr.network().is_ipv6())
}

/// [`prefix_thresholds`] of one family (the kernel keeps a pair per family).
pub fn prefix_thresholds_of(plan: &Plan, v6: bool) -> Option<(u8, u8)> {
    let local = 0;
    let remote = plan
        .peers
        .iter()
        .flat_map(|p| p.subnets.iter())
        .filter(|n| n.network().is_ipv6() == v6)
        .map(|n| n.prefix_len())
        .min()?;
    Some((local, remote))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cluster;
    use crate::plan::{plan, PlanOptions, Psk};
    use crate::test_cluster as tc;

    fn a_plan(psk: bool) -> Plan {
        let c = tc::valid(&tc::raw(
            "10.42.0.0/16",
            vec![
                tc::host("a", "192.168.77.1", &["10.42.1.0/24"]),
                tc::host("b", "192.168.77.2", &["10.42.2.0/24", "10.42.102.0/24"]),
            ],
        ));
        let k = Psk::from_bytes(&[1; 32]);
        plan(&c, "a", &PlanOptions::default(), psk.then_some(&k)).unwrap()
    }

    fn dual_plan(agent_v6: bool, psk: bool) -> Plan {
        let r = tc::dual_stack(["a", "b", "c"], agent_v6);
        let k = Psk::from_bytes(&[1; 32]);
        plan(
            &tc::valid(&r),
            "a",
            &PlanOptions::default(),
            psk.then_some(&k),
        )
        .unwrap()
    }

    /// Issue 18 item 2: policies per family per peer prefix, the tunnel template of the
    /// underlay's family, one SA pair per peer for both inner families (selector AF_UNSPEC).
    #[test]
    fn dual_stack_policies_per_family_templates_of_the_underlay_family() {
        for agent_v6 in [false, true] {
            let p = dual_plan(agent_v6, true);
            let d = desired(&p);
            // 2 blocks (one per family) + (b: 2 prefixes, c: 1) x 3 directions.
            assert_eq!(d.policies.len(), 2 + 3 * 3, "{agent_v6}");
            let blocks: Vec<_> = d
                .policies
                .iter()
                .filter(|(_, x)| x.action == Action::Block)
                .map(|(_, x)| (x.id.src, x.id.dst))
                .collect();
            assert_eq!(
                blocks,
                vec![(any(false), any(false)), (any(true), any(true))]
            );
            for (_, x) in d.policies.iter().filter(|(_, x)| x.tmpl.is_some()) {
                // Selector: both sides of one family (the remote prefix's).
                assert_eq!(
                    x.id.src.network().is_ipv6(),
                    x.id.dst.network().is_ipv6(),
                    "{x:?}"
                );
                let t = x.tmpl.unwrap();
                assert_eq!(
                    t.src.is_ipv6(),
                    agent_v6,
                    "template family = underlay: {x:?}"
                );
                assert_eq!(t.dst.is_ipv6(), agent_v6, "{x:?}");
            }
            let b_v6: Vec<_> = d
                .policies
                .iter()
                .filter(|(o, x)| {
                    *o == Owner::Peer("b".into()) && x.id.dst.to_string() == "fd42:0:0:2::/64"
                })
                .collect();
            assert_eq!(b_v6.len(), 1);
            assert_eq!(b_v6[0].1.id.src, any(true));
            assert_eq!(b_v6[0].1.id.dir, Dir::Out);
            // One out SA + 3 in SAs per peer, whatever the number of families, inner Any.
            assert_eq!(d.sas.len(), 2 * 4);
            assert!(d
                .sas
                .iter()
                .all(|(_, s)| s.inner == Inner::Any && !s.transport));
            assert!(d.sas.iter().all(|(_, s)| s.src.is_ipv6() == agent_v6));
            // The SPIs are the single-family plan's.
            assert_eq!(d.sas[0].1.id.spi, p.peers[0].spi_out);
            assert_eq!(prefix_thresholds_of(&p, false), Some((0, 24)));
            assert_eq!(prefix_thresholds_of(&p, true), Some((0, 64)));
            assert_eq!(inner_of(&p), Inner::Any);
        }
        // A single-family plan keeps the overlay's family on its SAs.
        let single = a_plan(true);
        assert_eq!(inner_of(&single), Inner::V4);
        assert!(desired(&single)
            .sas
            .iter()
            .all(|(_, s)| s.inner == Inner::V4));
    }

    #[test]
    fn dual_stack_route_mode_has_policies_and_underlay_blocks_per_family() {
        let p = dual_plan(false, false);
        let d = route_mode(&p, 7);
        // 2 underlay blocks per family + 3 policies per family per peer.
        assert_eq!(d.policies.len(), 4 + 2 * 2 * 3);
        let blocks: Vec<String> = d
            .policies
            .iter()
            .filter(|(_, x)| x.action == Action::Block)
            .map(|(_, x)| x.id.src.to_string())
            .collect();
        assert_eq!(
            blocks,
            ["10.42.0.0/16", "10.42.0.0/16", "fd42::/48", "fd42::/48"]
        );
        let fams: std::collections::BTreeSet<bool> = d
            .policies
            .iter()
            .filter(|(_, x)| x.tmpl.is_some())
            .map(|(_, x)| x.id.src.network().is_ipv6())
            .collect();
        assert_eq!(fams.len(), 2);
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
        let host = |id: &str, ip: &str, subnets: &[String]| {
            let s: Vec<&str> = subnets.iter().map(String::as_str).collect();
            tc::host(id, ip, &s)
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
        let cluster = tc::valid(&tc::raw(
            "10.42.0.0/16",
            vec![
                host("a", "192.168.77.1", &a),
                host("b", "192.168.77.2", &b),
                host("c", "192.168.77.3", &c),
            ],
        ));
        let p = plan(&cluster, "a", &PlanOptions::default(), None).unwrap();
        let d = desired(&p);
        // 3 directions x 20 remote prefixes + the block policy (was 3 x 10 x 20 + 1 = 601).
        assert_eq!(d.policies.len(), 3 * 20 + 1);
        assert_eq!(prefix_thresholds(&p), Some((0, 32)));
    }

    /// A Rancher-shaped cluster ([`tc::random_32s`]).
    fn rancher_cluster(hosts: usize, containers: usize, seed: u32) -> Cluster {
        tc::valid(&tc::random_32s(hosts, containers, seed))
    }

    #[test]
    fn route_mode_objects_grow_with_peers_only() {
        let k = Psk::from_bytes(&[3; 32]);
        let count = |hosts, containers| {
            let c = rancher_cluster(hosts, containers, 0x9e37_79b9);
            let p = plan(&c, "host-0", &PlanOptions::default(), Some(&k)).unwrap();
            let d = route_mode(&p, 2);
            (p, d)
        };
        let (p, d) = count(50, 10);
        let peers = p.peers.len();
        assert_eq!(peers, 49);
        // 3 per peer + the two inbound block policies; policy mode would hold 3 x 490 + 1.
        assert_eq!(d.policies.len(), 3 * peers + 2);
        assert_eq!(desired(&p).policies.len(), 3 * 49 * 10 + 1);
        for containers in [1, 2, 40] {
            let (_, other) = count(50, containers);
            assert_eq!(
                other.policies.len(),
                d.policies.len(),
                "{containers} containers each"
            );
            assert_eq!(other.sas.len(), d.sas.len());
        }
        // One out SA and three inbound generations per peer, as in policy mode.
        assert_eq!(d.sas.len(), 4 * peers);
        assert_eq!(d.sas.len(), desired(&p).sas.len());
        // Every pair policy is 0/0 -> 0/0, unmarked, bound to its peer's interface id, and
        // the ids are distinct.
        let mut ids = std::collections::BTreeSet::new();
        for (owner, x) in &d.policies {
            if x.tmpl.is_none() {
                continue;
            }
            assert_eq!(
                (x.id.src.prefix_len(), x.id.dst.prefix_len()),
                (0, 0),
                "{x}"
            );
            assert_eq!(x.id.mark, Mark::NONE, "{x}");
            let peer = p
                .peers
                .iter()
                .find(|q| Owner::Peer(q.host.as_str().into()) == *owner)
                .unwrap();
            assert_eq!(x.id.if_id, peer.reqid, "{x}");
            assert_eq!(x.tmpl.unwrap().reqid, peer.reqid);
            ids.insert(x.id.if_id);
        }
        assert_eq!(ids.len(), peers);
        assert!(d.sas.iter().all(|(_, s)| ids.contains(&s.if_id)));
        // The inbound block policies: ours, on the underlay device, from the overlay.
        let blocks: Vec<&Policy> = d
            .policies
            .iter()
            .map(|(_, x)| x)
            .filter(|x| x.tmpl.is_none())
            .collect();
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            assert_eq!(b.action, Action::Block);
            assert_eq!((b.id.dev, b.id.if_id), (2, 0));
            assert_eq!(b.id.src, p.cidr);
            assert!(b.is_owned(&p.marks), "{b}");
            assert_ne!(
                b.id.dir,
                Dir::Out,
                "an outbound block would drop what goes into the interfaces"
            );
        }
        assert!(d.policies.iter().all(|(_, x)| x.is_owned(&p.marks)));
    }

    #[test]
    fn a_key_ring_limits_the_inbound_generations_to_its_secrets() {
        let c = tc::valid(&tc::on_77(&["a", "b"]));
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
