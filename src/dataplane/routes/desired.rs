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
    fn from_plan_uses_endpoint_and_family() {
        use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};
        let c = Cluster::validate(&RawCluster {
            network: RawNetwork {
                cidr: "10.42.0.0/16".into(),
                backend: None,
                mtu: None,
            },
            hosts: (1..=3)
                .map(|i| RawHost {
                    id: format!("h{i}"),
                    agent_ip: format!("192.168.77.{i}"),
                    subnets: vec![format!("10.42.{i}.0/24")],
                    ..Default::default()
                })
                .collect(),
        })
        .unwrap();
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
