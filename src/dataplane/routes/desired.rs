//! The desired rule and routes for a plan (pure).

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::objects::{RouteConfig, RouteKey, RuleKey, Underlay, THROW};
use crate::dataplane::firewall::Family;
use crate::plan::{Marks, Plan};

/// What the routing must express; [`RouteSpec::from_plan`] derives it from a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub config: RouteConfig,
    /// Family of the overlay (rule and routes).
    pub family: Family,
    pub marks: Marks,
    /// Every peer's subnets (aggregated into the fewest routes).
    pub remote_subnets: Vec<IpNet>,
    pub underlay: Underlay,
}

impl RouteSpec {
    pub fn from_plan(plan: &Plan, config: RouteConfig) -> RouteSpec {
        RouteSpec {
            config,
            family: Family::of(&plan.cidr),
            marks: plan.marks,
            remote_subnets: plan
                .peers
                .iter()
                .flat_map(|p| p.subnets.iter().copied())
                .collect(),
            underlay: Underlay::Address(plan.endpoint),
        }
    }
}

/// The desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub rule: RuleKey,
    pub routes: BTreeSet<RouteKey>,
}

/// Desired rule and routes for `spec`, with the underlay device's index.
pub fn desired(spec: &RouteSpec, underlay_index: u32) -> Desired {
    let nets: Vec<IpNet> = spec.remote_subnets.iter().map(IpNet::trunc).collect();
    Desired {
        rule: RuleKey {
            family: spec.family,
            priority: spec.config.priority,
            table: spec.config.table,
            fwmark: spec.marks.encrypt,
            fwmask: spec.marks.mask,
            to: None,
        },
        routes: IpNet::aggregate(&nets)
            .into_iter()
            .filter(|n| Family::of(n) == spec.family)
            .map(|dst| RouteKey {
                dst,
                table: spec.config.table,
                oif: underlay_index,
                if_id: 0,
            })
            .collect(),
    }
}

/// Route mode ([`crate::dataplane::xfrmi`]): where each remote prefix goes instead of the
/// underlay device, and which prefixes of the overlay are this host's own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelRoutes {
    /// Remote prefix -> the name of the XFRM interface it is routed into, and the interface
    /// id the route carries as metadata (the one collect_md interface: the peer's id; an
    /// interface per peer: 0, the interface has the id).
    pub via: Vec<(IpNet, String, u32)>,
    /// This host's own subnets: `throw` routes, so that the destination rule leaves them to
    /// the main table (their bridge or veth routes) and their reverse-path look-up never
    /// names an XFRM interface.
    pub local: Vec<IpNet>,
}

impl TunnelRoutes {
    /// Each peer's subnets into the peer's interface ([`crate::dataplane::xfrmi::name`]), and
    /// this host's own subnets.
    pub fn from_plan(plan: &Plan) -> TunnelRoutes {
        Self::build(plan, |p| {
            let id = crate::dataplane::xfrmi::if_id(p);
            (crate::dataplane::xfrmi::name(id), 0)
        })
    }

    /// Each peer's subnets into the one collect_md interface
    /// ([`crate::dataplane::xfrmi::ONE_NAME`]) with the peer's interface id as the route's
    /// metadata, and this host's own subnets.
    pub fn from_plan_one(plan: &Plan) -> TunnelRoutes {
        Self::build(plan, |p| {
            (
                crate::dataplane::xfrmi::ONE_NAME.to_string(),
                crate::dataplane::xfrmi::if_id(p),
            )
        })
    }

    fn build(plan: &Plan, via: impl Fn(&crate::plan::Peer) -> (String, u32)) -> TunnelRoutes {
        TunnelRoutes {
            via: plan
                .peers
                .iter()
                .flat_map(|p| {
                    let (dev, id) = via(p);
                    p.subnets.iter().map(move |n| (n.trunc(), dev.clone(), id))
                })
                .collect(),
            local: plan.subnets.iter().map(IpNet::trunc).collect(),
        }
    }
}

/// The route mode's rule: `to <overlay> lookup <table>` at our priority, with no mark match.
///
/// Selecting by destination rather than by the encrypt mark is what lets the reverse-path
/// check on the XFRM interfaces work ([`crate::dataplane::xfrmi`] explains the check): its
/// look-up of a decrypted packet's source carries no mark (`xt_rpfilter` without
/// `--validmark`, nft `fib saddr . iif` without `. mark`), so only a rule that matches the
/// destination (the packet's source) reaches the table that knows which peer owns which
/// prefix. Forward look-ups are unchanged for marked traffic (the mark is only ever set on
/// traffic to the overlay, which this rule covers) and now also cover unmarked traffic to
/// the overlay: into a peer's interface, to the `unreachable` route, or, for this host's own
/// subnets, through a `throw` route on to the main table.
pub fn tunnel_rule(spec: &RouteSpec, overlay: IpNet) -> RuleKey {
    RuleKey {
        family: spec.family,
        priority: spec.config.priority,
        table: spec.config.table,
        fwmark: 0,
        fwmask: 0,
        to: Some(overlay.trunc()),
    }
}

/// The desired state in route mode: the destination rule ([`tunnel_rule`]); each remote
/// prefix (host bits cleared, aggregated per peer only) routed into its peer's interface,
/// whose index `links` gives (a prefix whose interface is missing gets no route); each of
/// this host's own subnets inside the overlay a `throw` route (aggregated); and
/// `unreachable <overlay>`, so a packet to an overlay address of no peer (or of a peer whose
/// interface is gone) is dropped by the routing itself, never sent in clear. Longest prefix
/// wins: every peer and local route is more specific than the overlay's.
pub fn desired_tunnels(
    spec: &RouteSpec,
    overlay: IpNet,
    tunnels: &TunnelRoutes,
    links: &std::collections::BTreeMap<String, u32>,
) -> Desired {
    // Aggregated per interface and id, i.e. per peer.
    let mut by_dev: std::collections::BTreeMap<(&str, u32), Vec<IpNet>> = Default::default();
    for (n, dev, id) in &tunnels.via {
        by_dev.entry((dev.as_str(), *id)).or_default().push(*n);
    }
    let table = spec.config.table;
    let overlay = overlay.trunc();
    let local: Vec<IpNet> = tunnels.local.iter().map(IpNet::trunc).collect();
    let throws = IpNet::aggregate(&local)
        .into_iter()
        .filter(|n| overlay.contains(n) && *n != overlay)
        .map(|dst| RouteKey {
            dst,
            table,
            oif: THROW,
            if_id: 0,
        });
    let mut routes: BTreeSet<RouteKey> = by_dev
        .into_iter()
        .filter_map(|((dev, if_id), nets)| links.get(dev).map(|i| (*i, if_id, nets)))
        .flat_map(|(oif, if_id, nets)| {
            IpNet::aggregate(&nets)
                .into_iter()
                .map(move |dst| RouteKey {
                    dst,
                    table,
                    oif,
                    if_id,
                })
        })
        .chain(throws)
        .filter(|k| Family::of(&k.dst) == spec.family)
        .collect();
    routes.insert(RouteKey {
        dst: overlay,
        table,
        oif: 0,
        if_id: 0,
    });
    Desired {
        rule: tunnel_rule(spec, overlay),
        routes,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    pub fn spec(remote: &[&str]) -> RouteSpec {
        RouteSpec {
            config: RouteConfig::default(),
            family: Family::V4,
            marks: Marks::default(),
            remote_subnets: remote.iter().map(|s| net(s)).collect(),
            underlay: Underlay::Address("192.168.77.1".parse().unwrap()),
        }
    }

    #[test]
    fn desired_aggregates_and_uses_config() {
        let d = desired(&spec(&["10.42.3.0/24", "10.42.2.0/24", "10.42.7.1/24"]), 3);
        assert_eq!(
            d.rule,
            RuleKey {
                family: Family::V4,
                priority: 1042,
                table: 1042,
                fwmark: 0x100000,
                fwmask: 0x300000,
                to: None,
            }
        );
        let r: Vec<String> = d.routes.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            r,
            vec![
                "route 10.42.2.0/23 dev #3 table 1042",
                "route 10.42.7.0/24 dev #3 table 1042"
            ]
        );
    }

    #[test]
    fn route_mode_routes_prefixes_into_their_peers_interfaces() {
        let tunnels = TunnelRoutes {
            via: vec![
                (net("10.42.7.9/32"), "imx1".into(), 0),
                (net("10.42.7.8/32"), "imx1".into(), 0),
                (net("10.42.7.10/32"), "imx2".into(), 0),
                (net("10.42.9.1/32"), "imx3".into(), 0),
            ],
            local: vec![
                net("10.42.1.2/32"),
                net("10.42.1.3/32"),
                net("10.42.200.9/32"),
                net("10.99.0.1/32"),
            ],
        };
        let links =
            std::collections::BTreeMap::from([("imx1".to_string(), 11), ("imx2".into(), 12)]);
        let d = desired_tunnels(&spec(&[]), net("10.42.0.0/16"), &tunnels, &links);
        let r: Vec<String> = d.routes.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            r,
            vec![
                "route unreachable 10.42.0.0/16 table 1042",
                "route throw 10.42.1.2/31 table 1042",
                "route 10.42.7.8/31 dev #11 table 1042",
                "route 10.42.7.10/32 dev #12 table 1042",
                "route throw 10.42.200.9/32 table 1042",
            ],
            "aggregated per peer only; imx3 is missing: its prefix falls to the unreachable \
             route; local subnets inside the overlay thrown to the next rule"
        );
        assert_eq!(
            d.rule.to_string(),
            "IPv4 rule pref 1042 to 10.42.0.0/16 lookup 1042",
            "by destination, no mark"
        );
        assert_eq!((d.rule.fwmark, d.rule.fwmask), (0, 0));
        assert_ne!(
            d.rule,
            desired(&spec(&[]), 0).rule,
            "policy mode keeps the mark rule"
        );
    }

    #[test]
    fn one_interface_routes_carry_each_peers_id() {
        let tunnels = TunnelRoutes {
            via: vec![
                (net("10.42.7.9/32"), "imxmesh".into(), 0x5000_0001),
                (net("10.42.7.8/32"), "imxmesh".into(), 0x5000_0001),
                (net("10.42.7.10/32"), "imxmesh".into(), 0x5000_0002),
            ],
            local: vec![],
        };
        let links = std::collections::BTreeMap::from([("imxmesh".to_string(), 40)]);
        let d = desired_tunnels(&spec(&[]), net("10.42.0.0/16"), &tunnels, &links);
        let r: Vec<String> = d.routes.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            r,
            vec![
                "route unreachable 10.42.0.0/16 table 1042",
                "route 10.42.7.8/31 dev #40 encap xfrm if_id 0x50000001 table 1042",
                "route 10.42.7.10/32 dev #40 encap xfrm if_id 0x50000002 table 1042",
            ],
            "aggregated per peer (id), never across peers sharing the interface"
        );
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let p = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let one = TunnelRoutes::from_plan_one(&p);
        assert!(one
            .via
            .iter()
            .all(|(_, dev, id)| dev == crate::dataplane::xfrmi::ONE_NAME && *id != 0));
        assert_eq!(one.local, TunnelRoutes::from_plan(&p).local);
    }

    #[test]
    fn route_mode_v6_rule_and_throws_are_v6() {
        let mut s = spec(&[]);
        s.family = Family::V6;
        let tunnels = TunnelRoutes {
            via: vec![(net("fd42:0:0:2::/64"), "imx2".into(), 0)],
            local: vec![net("fd42:0:0:1::/64"), net("10.42.1.0/24")],
        };
        let links = std::collections::BTreeMap::from([("imx2".to_string(), 5)]);
        let d = desired_tunnels(&s, net("fd42::/48"), &tunnels, &links);
        let r: Vec<String> = d.routes.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            r,
            vec![
                "route unreachable fd42::/48 table 1042",
                "route throw fd42:0:0:1::/64 table 1042",
                "route fd42:0:0:2::/64 dev #5 table 1042",
            ]
        );
        assert_eq!(
            d.rule.to_string(),
            "IPv6 rule pref 1042 to fd42::/48 lookup 1042"
        );
    }

    #[test]
    fn tunnel_routes_from_plan_carry_the_local_subnets() {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let p = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let t = TunnelRoutes::from_plan(&p);
        assert_eq!(t.local, p.subnets);
        assert_eq!(
            t.via.len(),
            p.peers.iter().map(|p| p.subnets.len()).sum::<usize>()
        );
    }

    #[test]
    fn from_plan_uses_endpoint_and_family() {
        let c = crate::test_cluster::valid(&crate::test_cluster::on_77(&["h1", "h2", "h3"]));
        let p = crate::plan::plan(&c, "h1", &Default::default(), None).unwrap();
        let s = RouteSpec::from_plan(&p, RouteConfig::default());
        assert_eq!(
            s.underlay,
            Underlay::Address("192.168.77.1".parse().unwrap())
        );
        assert_eq!(s.family, Family::V4);
        let d = desired(&s, 2);
        let r: Vec<String> = d.routes.iter().map(|k| k.dst.to_string()).collect();
        assert_eq!(r, vec!["10.42.2.0/23"]);
    }
}
