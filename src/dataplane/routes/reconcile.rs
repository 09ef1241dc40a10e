//! The pure diff between the rules and routes we own in the kernel and the desired ones, as
//! an ordered list of writes: deletions first, so an add never collides with a stale object.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::desired::Desired;
use super::objects::{FoundRoute, FoundRule, RouteKey, RuleKey};
use crate::dataplane::report::Change;

/// The layer name in [`Change`]s.
pub const LAYER: &str = "routes";

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    DelRule(FoundRule),
    DelRoute(FoundRoute),
    AddRule(RuleKey),
    AddRoute(RouteKey),
}

impl RouteChange {
    /// Human-readable, with interface names where known.
    pub fn describe(&self, names: &BTreeMap<u32, String>) -> String {
        let verb = if self.is_delete() { "delete" } else { "add" };
        format!("{verb} {}", self.change(names).object)
    }

    pub fn is_delete(&self) -> bool {
        matches!(self, RouteChange::DelRule(_) | RouteChange::DelRoute(_))
    }

    /// The change for the report ([`Change`]), with interface names where known.
    pub fn change(&self, names: &BTreeMap<u32, String>) -> Change {
        let route = |k: &RouteKey| {
            if k.oif == 0 || k.oif == super::objects::THROW {
                return k.to_string();
            }
            let dev = names
                .get(&k.oif)
                .cloned()
                .unwrap_or_else(|| format!("#{}", k.oif));
            format!("route {} dev {dev} table {}", k.dst, k.table)
        };
        match self {
            RouteChange::DelRule(r) => Change::delete(LAYER, r.key.to_string()),
            RouteChange::AddRule(k) => Change::add(LAYER, k.to_string()),
            RouteChange::DelRoute(r) => Change::delete(LAYER, route(&r.key)),
            RouteChange::AddRoute(k) => Change::add(LAYER, route(k)),
        }
    }
}

impl fmt::Display for RouteChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(&BTreeMap::new()))
    }
}

/// The writes that turn what we own (`rules`, `routes`: already filtered to ours) into `want`
/// (`None`: remove everything). Deletions come first, so an add never collides with a stale
/// object.
pub fn diff(
    rules: &[FoundRule],
    routes: &[FoundRoute],
    want: Option<&Desired>,
) -> Vec<RouteChange> {
    let mut dels = Vec::new();
    let mut adds = Vec::new();
    let Some(want) = want else {
        dels.extend(rules.iter().cloned().map(RouteChange::DelRule));
        dels.extend(routes.iter().cloned().map(RouteChange::DelRoute));
        return dels;
    };
    let mut have_rule = false;
    for r in rules {
        if r.exact && r.key == want.rule && !have_rule {
            have_rule = true;
        } else {
            dels.push(RouteChange::DelRule(r.clone()));
        }
    }
    if !have_rule {
        adds.push(RouteChange::AddRule(want.rule));
    }
    let mut seen = BTreeSet::new();
    for r in routes {
        if r.exact && want.routes.contains(&r.key) && seen.insert(r.key) {
            continue;
        }
        dels.push(RouteChange::DelRoute(r.clone()));
    }
    adds.extend(
        want.routes
            .iter()
            .filter(|k| !seen.contains(*k))
            .map(|k| RouteChange::AddRoute(*k)),
    );
    dels.extend(adds);
    dels
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::desired::{desired, tests::spec};
    use super::super::messages::rule_message;
    use super::*;

    pub fn found(k: RouteKey) -> FoundRoute {
        FoundRoute {
            key: k,
            exact: true,
            priority: None,
            tos: 0,
        }
    }

    pub fn found_rule(k: RuleKey) -> FoundRule {
        FoundRule {
            key: k,
            exact: true,
            msg: rule_message(&k),
        }
    }

    #[test]
    fn diff_is_empty_when_equal_and_minimal_otherwise() {
        let d = desired(&spec(&["10.42.2.0/24", "10.42.4.0/24"]), 3);
        let rules = vec![found_rule(d.rule)];
        let routes: Vec<FoundRoute> = d.routes.iter().copied().map(found).collect();
        assert!(diff(&rules, &routes, Some(&d)).is_empty());

        // A peer left: only its route goes.
        let d2 = desired(&spec(&["10.42.2.0/24"]), 3);
        let ch = diff(&rules, &routes, Some(&d2));
        assert_eq!(ch.len(), 1);
        assert_eq!(
            ch[0].to_string(),
            "delete route 10.42.4.0/24 dev #3 table 1042"
        );

        // The underlay moved: every route replaced, deletions first.
        let d3 = desired(&spec(&["10.42.2.0/24"]), 5);
        let ch = diff(&rules, &routes[..1], Some(&d3));
        let s: Vec<String> = ch.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            s,
            vec![
                "delete route 10.42.2.0/24 dev #3 table 1042",
                "add route 10.42.2.0/24 dev #5 table 1042"
            ]
        );

        // From nothing: rule and routes.
        let ch = diff(&[], &[], Some(&d));
        assert_eq!(ch.len(), 3);
        assert_eq!(
            ch[0].to_string(),
            "add IPv4 rule pref 1042 fwmark 0x100000/0x300000 lookup 1042"
        );
    }

    #[test]
    fn diff_replaces_wrong_or_duplicate_rules_and_odd_routes() {
        let d = desired(&spec(&["10.42.2.0/24"]), 3);
        let mut other_mark = d.rule;
        other_mark.fwmark = 0x200000;
        let mut odd = found(*d.routes.iter().next().unwrap());
        odd.exact = false; // e.g. has a gateway
        let rules = vec![
            found_rule(d.rule),
            found_rule(d.rule),
            found_rule(other_mark),
        ];
        let ch = diff(&rules, &[odd.clone()], Some(&d));
        assert_eq!(ch.len(), 4, "{ch:?}");
        assert!(matches!(&ch[0], RouteChange::DelRule(r) if r.key == d.rule));
        assert!(matches!(&ch[1], RouteChange::DelRule(r) if r.key == other_mark));
        assert_eq!(ch[2], RouteChange::DelRoute(odd));
        assert!(matches!(ch[3], RouteChange::AddRoute(_)));
        // Cleanup removes all.
        assert_eq!(diff(&rules, &[], None).len(), 3);
        assert!(diff(&[], &[], None).is_empty());
    }

    #[test]
    fn changes_name_the_device_when_known() {
        let d = desired(&spec(&["10.42.2.0/24"]), 3);
        let add = RouteChange::AddRoute(*d.routes.iter().next().unwrap());
        let names = BTreeMap::from([(3, "eth0".to_string())]);
        assert_eq!(
            add.describe(&names),
            "add route 10.42.2.0/24 dev eth0 table 1042"
        );
        assert!(!add.is_delete());
        assert!(RouteChange::DelRule(found_rule(d.rule)).is_delete());
    }
}
