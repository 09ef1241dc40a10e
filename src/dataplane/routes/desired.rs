//! The desired rule and routes for a plan (pure).

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::objects::{RouteConfig, RouteKey, RuleKey, Underlay};
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
        },
        routes: IpNet::aggregate(&nets)
            .into_iter()
            .filter(|n| Family::of(n) == spec.family)
            .map(|dst| RouteKey {
                dst,
                table: spec.config.table,
                oif: underlay_index,
            })
            .collect(),
    }
}

/// Route mode ([`crate::dataplane::xfrmi`]): where each remote prefix goes instead of the
/// underlay device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelRoutes {
    /// Remote prefix -> the name of its peer's XFRM interface.
    pub via: Vec<(IpNet, String)>,
}

impl TunnelRoutes {
    /// Each peer's subnets into the peer's interface ([`crate::dataplane::xfrmi::name`]).
    pub fn from_plan(plan: &Plan) -> TunnelRoutes {
        TunnelRoutes {
            via: plan
                .peers
                .iter()
                .flat_map(|p| {
                    let dev = crate::dataplane::xfrmi::name(crate::dataplane::xfrmi::if_id(p));
                    p.subnets.iter().map(move |n| (n.trunc(), dev.clone()))
                })
                .collect(),
        }
    }
}

/// The desired state in route mode: the same rule; each remote prefix (host bits cleared,
/// aggregated per peer only) routed into its peer's interface, whose index `links` gives
/// (a prefix whose interface is missing gets no route); and `unreachable <overlay>`, so a
/// marked packet to an overlay address of no peer (or of a peer whose interface is gone) is
/// dropped by the routing itself, never sent in clear. Longest prefix wins: every peer route
/// is more specific than the overlay's.
pub fn desired_tunnels(
    spec: &RouteSpec,
    overlay: IpNet,
    tunnels: &TunnelRoutes,
    links: &std::collections::BTreeMap<String, u32>,
) -> Desired {
    let mut by_dev: std::collections::BTreeMap<&str, Vec<IpNet>> = Default::default();
    for (n, dev) in &tunnels.via {
        by_dev.entry(dev.as_str()).or_default().push(*n);
    }
    let table = spec.config.table;
    let mut routes: BTreeSet<RouteKey> = by_dev
        .into_iter()
        .filter_map(|(dev, nets)| links.get(dev).map(|i| (*i, nets)))
        .flat_map(|(oif, nets)| {
            IpNet::aggregate(&nets)
                .into_iter()
                .map(move |dst| RouteKey { dst, table, oif })
        })
        .filter(|k| Family::of(&k.dst) == spec.family)
        .collect();
    routes.insert(RouteKey {
        dst: overlay.trunc(),
        table,
        oif: 0,
    });
    Desired {
        rule: desired(spec, 0).rule,
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
                fwmask: 0x300000
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
                (net("10.42.7.9/32"), "imx1".into()),
                (net("10.42.7.8/32"), "imx1".into()),
                (net("10.42.7.10/32"), "imx2".into()),
                (net("10.42.9.1/32"), "imx3".into()),
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
                "route 10.42.7.8/31 dev #11 table 1042",
                "route 10.42.7.10/32 dev #12 table 1042",
            ],
            "aggregated per peer only; imx3 is missing: its prefix falls to the unreachable route"
        );
        assert_eq!(d.rule, desired(&spec(&[]), 0).rule);
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
