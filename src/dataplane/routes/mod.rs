//! fwmark forwarding, routing part: policy routing by mark.
//!
//! One ip rule `fwmark <encrypt>/<mask> lookup <table>` at our priority, and in that table one
//! route per (aggregated) remote subnet `dev <underlay>`, so that marked traffic is routable
//! and the XFRM out policy (which matches the same mark) can take it.
//!
//! What ipsec-mesh owns here, and nothing else: rules at our priority that look up our table
//! ([`RouteConfig`], default 1042/1042), and every route in our table. Reconcile dumps them,
//! diffs against the desired state and adds/removes only the difference (0 writes when
//! nothing changed).
//!
//! `objects` (comparable values) <- `desired` (pure, from the plan) and `messages` (pure,
//! build/parse) -> `reconcile::diff` (pure) -> [`reconcile_with`] / [`cleanup_with`] here,
//! the only code that talks to the kernel, over one rtnetlink socket through
//! [`rtnl`](crate::dataplane::rtnl). [`reconcile`] / [`cleanup`] wrap them in a
//! current-thread runtime for sync callers (do not call those from inside a tokio runtime:
//! use the `_with` variants there).

pub mod desired;
pub mod messages;
pub mod objects;
pub mod reconcile;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteMessage;
use rtnetlink::Handle;
use tracing::{debug, info};

use crate::dataplane::firewall::Family;
use crate::dataplane::rtnl::{self, Reason};
use crate::plan::Plan;
pub use desired::{desired, desired_tunnels, Desired, RouteSpec, TunnelRoutes};
pub use messages::{
    parse_route, parse_route_via, parse_rule, request, route_add_message, route_del_message,
    rule_message,
};
pub use objects::{
    is_owned_rule, FoundRoute, FoundRule, RouteConfig, RouteKey, RuleKey, Underlay,
    DEFAULT_PRIORITY, DEFAULT_TABLE,
};
pub use reconcile::{diff, RouteChange};

/// A change the kernel refused.
#[derive(Debug)]
pub struct ChangeFailure {
    pub change: String,
    pub reason: Reason,
}

impl fmt::Display for ChangeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.change, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The socket, a dump or the whole exchange.
    #[error(transparent)]
    Rtnl(#[from] rtnl::Error),
    #[error(
        "no interface holds the underlay address {addr} (the plan's endpoint): is --host right?"
    )]
    UnderlayNotFound { addr: IpAddr },
    #[error("underlay device {name:?} does not exist")]
    UnderlayDeviceNotFound { name: String },
    #[error("{} of {total} routing changes failed ({done} applied): {}", failures.len(),
        failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    Apply {
        total: usize,
        done: usize,
        failures: Vec<ChangeFailure>,
    },
}

/// The outcome of a reconcile or a cleanup: the [common report](crate::dataplane::report);
/// `writes` counts rules and routes added or deleted, 0 = no-op.
pub use crate::dataplane::report::Report as RouteReport;

/// Reconcile (sync: own current-thread runtime and socket).
pub fn reconcile(spec: &RouteSpec) -> Result<RouteReport, RouteError> {
    rtnl::block_on(async { reconcile_with(&rtnl::connect()?, spec).await })
}

/// Remove our rules (both families) and every route in our table (sync).
pub fn cleanup(config: &RouteConfig) -> Result<RouteReport, RouteError> {
    rtnl::block_on(async { cleanup_with(&rtnl::connect()?, config).await })
}

/// Find the underlay device: (index, name).
pub async fn resolve_underlay(h: &Handle, u: &Underlay) -> Result<(u32, String), RouteError> {
    let links = link_names(h).await?;
    let index = match u {
        Underlay::Name(name) => links
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(i, _)| *i)
            .ok_or_else(|| RouteError::UnderlayDeviceNotFound { name: name.clone() })?,
        Underlay::Address(addr) => {
            let addrs = rtnl::dump("addresses", h.address().get().execute()).await?;
            addrs
                .iter()
                .find(|m| {
                    m.attributes.iter().any(|a| {
                        matches!(a, AddressAttribute::Address(x) | AddressAttribute::Local(x) if x == addr)
                    })
                })
                .map(|m| m.header.index)
                .ok_or(RouteError::UnderlayNotFound { addr: *addr })?
        }
    };
    let name = links.get(&index).cloned().unwrap_or_default();
    Ok((index, name))
}

async fn link_names(h: &Handle) -> Result<BTreeMap<u32, String>, rtnl::Error> {
    let links = rtnl::dump("links", h.link().get().execute()).await?;
    Ok(links
        .into_iter()
        .filter_map(|l| {
            let idx = l.header.index;
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((idx, n)),
                _ => None,
            })
        })
        .collect())
}

/// Our rules (priority and table) of one family.
pub async fn dump_owned_rules(
    h: &Handle,
    family: Family,
    config: &RouteConfig,
) -> Result<Vec<FoundRule>, RouteError> {
    let msgs = rtnl::dump(
        "ip rules",
        h.rule().get(messages::ip_version(family)).execute(),
    )
    .await?;
    Ok(msgs
        .into_iter()
        .filter_map(parse_rule)
        .filter(|r| r.key.family == family && is_owned_rule(r, config))
        .collect())
}

/// Every route of one family in `table`.
pub async fn dump_table(
    h: &Handle,
    family: Family,
    table: u32,
) -> Result<Vec<FoundRoute>, RouteError> {
    let mut q = RouteMessage::default();
    q.header.address_family = messages::af(family);
    let msgs = rtnl::dump("routes", h.route().get(q).execute()).await?;
    Ok(msgs
        .iter()
        .filter_map(parse_route)
        .filter(|r| r.key.table == table && Family::of(&r.key.dst) == family)
        .collect())
}

/// Send the changes (deletions, then additions, each batch pipelined on one socket);
/// collect every failure.
async fn execute(
    h: &Handle,
    changes: &[RouteChange],
    names: &BTreeMap<u32, String>,
) -> Result<usize, RouteError> {
    let mut done = 0;
    let mut failures = Vec::new();
    for phase in [true, false] {
        let batch: Vec<&RouteChange> = changes.iter().filter(|c| c.is_delete() == phase).collect();
        let results = rtnl::send_all(h, batch.iter().map(|c| request(c))).await;
        for (c, r) in batch.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    done += 1;
                    info!("routing: {}", c.describe(names));
                }
                Err(reason) => failures.push(ChangeFailure {
                    change: c.describe(names),
                    reason,
                }),
            }
        }
    }
    if failures.is_empty() {
        Ok(done)
    } else {
        Err(RouteError::Apply {
            total: changes.len(),
            done,
            failures,
        })
    }
}

/// Apply `changes`, naming the devices in what the report says.
async fn apply(
    h: &Handle,
    changes: &[RouteChange],
    report: &mut RouteReport,
) -> Result<(), RouteError> {
    let names = link_names(h).await?;
    report.writes = execute(h, changes, &names).await?;
    report.changes = changes.iter().map(|c| c.change(&names)).collect();
    Ok(())
}

/// Reconcile over an existing handle (async callers, on a runtime with timers enabled: every
/// request waits at most [`rtnl::REQUEST_TIMEOUT`] for the kernel).
pub async fn reconcile_with(h: &Handle, spec: &RouteSpec) -> Result<RouteReport, RouteError> {
    let (index, name) = resolve_underlay(h, &spec.underlay).await?;
    debug!(underlay = %name, index, "routing via the underlay device");
    sync(h, spec, &desired(spec, index)).await
}

/// Make our rule and table in `spec`'s family hold exactly `want`: dump, diff, write the
/// difference (nothing when it matches).
async fn sync(h: &Handle, spec: &RouteSpec, want: &Desired) -> Result<RouteReport, RouteError> {
    let rules = dump_owned_rules(h, spec.family, &spec.config).await?;
    let routes = dump_table(h, spec.family, spec.config.table).await?;
    let changes = diff(&rules, &routes, Some(want));
    let mut report = RouteReport::default();
    if changes.is_empty() {
        debug!(table = spec.config.table, "routing up to date");
        return Ok(report);
    }
    apply(h, &changes, &mut report).await?;
    Ok(report)
}

/// Route mode (sync): the rule by destination, each remote prefix into its peer's XFRM
/// interface, `throw` for this host's own subnets, and `unreachable <overlay>`
/// ([`desired_tunnels`]).
pub fn reconcile_tunnels(
    spec: &RouteSpec,
    overlay: ipnet::IpNet,
    tunnels: &TunnelRoutes,
) -> Result<RouteReport, RouteError> {
    rtnl::block_on(async {
        reconcile_tunnels_with(&rtnl::connect()?, spec, overlay, tunnels).await
    })
}

/// [`reconcile_tunnels`] over an existing handle.
pub async fn reconcile_tunnels_with(
    h: &Handle,
    spec: &RouteSpec,
    overlay: ipnet::IpNet,
    tunnels: &TunnelRoutes,
) -> Result<RouteReport, RouteError> {
    let links = crate::dataplane::xfrmi::indexes(h).await?;
    sync(h, spec, &desired_tunnels(spec, overlay, tunnels, &links)).await
}

/// [`reconcile_tunnels`] with the interfaces given (name -> index) rather than found among
/// the XFRM interfaces of ours: for tests on kernels without them, where veths named `imx*`
/// stand in (sync).
pub fn reconcile_tunnels_into(
    spec: &RouteSpec,
    overlay: ipnet::IpNet,
    tunnels: &TunnelRoutes,
    links: &BTreeMap<String, u32>,
) -> Result<RouteReport, RouteError> {
    rtnl::block_on(async {
        let h = rtnl::connect()?;
        sync(&h, spec, &desired_tunnels(spec, overlay, tunnels, links)).await
    })
}

/// Routing for a whole plan, each family on its own: for each family of the overlay (both of
/// a dual-stack one) its rule and routes, policy mode ([`desired`]) or, with `tunnels`, route
/// mode ([`desired_tunnels`]); and in a family the overlay does not have, nothing of ours (a
/// change of overlay family, or dual-stack back to one family, leaves no rule or route of
/// the old one). Sync; the reports of both families in one.
pub fn reconcile_plan(
    plan: &Plan,
    config: RouteConfig,
    tunnels: Option<&TunnelRoutes>,
) -> Result<RouteReport, RouteError> {
    rtnl::block_on(async {
        let h = rtnl::connect()?;
        let mut report = RouteReport::default();
        let links = match tunnels {
            Some(_) => Some(crate::dataplane::xfrmi::indexes(&h).await?),
            None => None,
        };
        let mut underlay = None;
        for family in [Family::V4, Family::V6] {
            let mut spec = RouteSpec::from_plan(plan, config);
            spec.family = family;
            let want = match (plan.cidrs.iter().find(|c| Family::of(c) == family), tunnels) {
                (Some(overlay), Some(t)) => desired_tunnels(
                    &spec,
                    *overlay,
                    t,
                    links.as_ref().unwrap_or(&BTreeMap::new()),
                ),
                (Some(_), None) => {
                    if underlay.is_none() {
                        let (index, name) = resolve_underlay(&h, &spec.underlay).await?;
                        debug!(underlay = %name, index, "routing via the underlay device");
                        underlay = Some(index);
                    }
                    desired(&spec, underlay.unwrap_or_default())
                }
                (None, _) => {
                    let rules = dump_owned_rules(&h, family, &config).await?;
                    let routes = dump_table(&h, family, config.table).await?;
                    let changes = diff(&rules, &routes, None);
                    if !changes.is_empty() {
                        let mut r = RouteReport::default();
                        apply(&h, &changes, &mut r).await?;
                        report.absorb(r);
                    }
                    continue;
                }
            };
            report.absorb(sync(&h, &spec, &want).await?);
        }
        Ok(report)
    })
}

/// Cleanup over an existing handle: our rules of both families, every route in our table.
pub async fn cleanup_with(h: &Handle, config: &RouteConfig) -> Result<RouteReport, RouteError> {
    let mut changes = Vec::new();
    for family in [Family::V4, Family::V6] {
        let rules = dump_owned_rules(h, family, config).await?;
        let routes = dump_table(h, family, config.table).await?;
        changes.extend(diff(&rules, &routes, None));
    }
    let mut report = RouteReport::default();
    if !changes.is_empty() {
        apply(h, &changes, &mut report).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::rtnl::KernelError;

    #[test]
    fn a_refused_change_is_reported_with_the_kernels_words() {
        let e = RouteError::Apply {
            total: 3,
            done: 2,
            failures: vec![ChangeFailure {
                change: "add route 10.42.2.0/24 dev eth0 table 1042".into(),
                reason: Reason::Kernel(KernelError {
                    errno: libc::ENETDOWN,
                    message: Some("Nexthop device is not up".into()),
                }),
            }],
        };
        assert_eq!(
            e.to_string(),
            "1 of 3 routing changes failed (2 applied): add route 10.42.2.0/24 dev eth0 table \
             1042: Nexthop device is not up (Network is down (os error 100))"
        );
        let dump: RouteError = rtnl::Error::failed(
            "dumping links",
            Reason::Kernel(KernelError {
                errno: libc::EPERM,
                message: None,
            }),
        )
        .into();
        assert_eq!(
            dump.to_string(),
            "dumping links failed: Operation not permitted (os error 1)"
        );
    }

    #[test]
    #[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
    fn a_route_the_kernel_refuses_carries_its_extended_ack_text() {
        assert!(
            crate::dataplane::netns::is_root(),
            "needs root (unshare CLONE_NEWNET)"
        );
        // A namespace of its own; a route through a device that is down is refused.
        let e = crate::dataplane::netns::in_new_netns(|| {
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "down"])
                .status()
                .unwrap();
            assert!(st.success(), "ip link set lo down");
            let spec = RouteSpec {
                config: RouteConfig::default(),
                family: Family::V4,
                marks: Default::default(),
                remote_subnets: vec!["10.42.2.0/24".parse().unwrap()],
                underlay: Underlay::Name("lo".into()),
            };
            reconcile(&spec).unwrap_err()
        })
        .unwrap();
        let RouteError::Apply {
            total,
            done,
            failures,
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!((*total, *done, failures.len()), (2, 1, 1), "{e}");
        assert_eq!(
            failures[0].change,
            "add route 10.42.2.0/24 dev lo table 1042"
        );
        let Reason::Kernel(k) = &failures[0].reason else {
            panic!("{e}")
        };
        assert_eq!(k.errno, libc::ENETDOWN, "{e}");
        let text = k.message.as_deref().unwrap_or_default();
        assert!(text.contains("not up"), "the kernel's own words: {e}");
        assert!(e.to_string().contains(text), "{e}");
        eprintln!("{e}");
    }
}
