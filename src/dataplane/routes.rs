//! fwmark forwarding, routing part: policy routing by mark.
//!
//! One ip rule `fwmark <encrypt>/<mask> lookup <table>` at our priority, and in that table one
//! route per (aggregated) remote subnet `dev <underlay>`, so that marked traffic is routable
//! and the XFRM out policy (which matches the same mark) can take it.
//!
//! What ipsec-mesh owns here, and nothing else: rules at our priority that look up our table
//! ([`RouteConfig`], default 1042/1042), and every route in our table. Reconcile dumps them,
//! diffs against the desired state and adds/removes only the difference (0 writes when
//! nothing changed). Message building ([`request`]) and diffing ([`diff`]) are pure;
//! [`reconcile_with`] / [`cleanup_with`] do the I/O over one rtnetlink socket, and
//! [`reconcile`] / [`cleanup`] wrap them in a current-thread runtime for sync callers (do not
//! call those from inside a tokio runtime: use the `_with` variants there).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;

use futures::stream::TryStreamExt;
use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, IpVersion};
use tracing::{debug, info};

use crate::dataplane::firewall::Family;
use crate::plan::{Marks, Plan};

/// Default route table for marked traffic.
pub const DEFAULT_TABLE: u32 = 1042;
/// Default priority (`pref`) of our ip rule.
pub const DEFAULT_PRIORITY: u32 = 1042;

/// Which table and rule priority we own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteConfig {
    pub table: u32,
    pub priority: u32,
}

impl Default for RouteConfig {
    fn default() -> RouteConfig {
        RouteConfig {
            table: DEFAULT_TABLE,
            priority: DEFAULT_PRIORITY,
        }
    }
}

/// How to find the underlay device the routes point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Underlay {
    /// The interface holding this address (the plan's endpoint).
    Address(IpAddr),
    /// An interface by name.
    Name(String),
}

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

/// The identity of a rule of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    pub fwmark: u32,
    pub fwmask: u32,
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rule pref {} fwmark {:#x}/{:#x} lookup {}",
            self.family, self.priority, self.fwmark, self.fwmask, self.table
        )
    }
}

/// The identity of a route of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub dst: IpNet,
    pub table: u32,
    /// Output interface index (0: none).
    pub oif: u32,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "route {} dev #{} table {}",
            self.dst, self.oif, self.table
        )
    }
}

/// A rule dumped from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRule {
    pub key: RuleKey,
    /// Only the attributes in `key` select packets (no iif, src, tos, ...) and it looks up a
    /// table: exactly the shape we create.
    pub exact: bool,
    pub msg: RuleMessage,
}

/// A route dumped from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRoute {
    pub key: RouteKey,
    /// A plain unicast `dst dev X` route (no gateway, multipath, source, ...).
    pub exact: bool,
    /// Metric, kept to delete exactly this route.
    pub priority: Option<u32>,
    pub tos: u8,
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
        let route = |k: &RouteKey| {
            let dev = names
                .get(&k.oif)
                .cloned()
                .unwrap_or_else(|| format!("#{}", k.oif));
            format!("route {} dev {dev} table {}", k.dst, k.table)
        };
        match self {
            RouteChange::DelRule(r) => format!("delete {}", r.key),
            RouteChange::AddRule(k) => format!("add {k}"),
            RouteChange::DelRoute(r) => format!("delete {}", route(&r.key)),
            RouteChange::AddRoute(k) => format!("add {}", route(k)),
        }
    }

    fn is_delete(&self) -> bool {
        matches!(self, RouteChange::DelRule(_) | RouteChange::DelRoute(_))
    }
}

impl fmt::Display for RouteChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(&BTreeMap::new()))
    }
}

fn family_of_af(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

fn af(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn ip_version(family: Family) -> IpVersion {
    match family {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    }
}

/// Header table byte for `table` (`RT_TABLE_UNSPEC` plus an attribute above 255).
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// Read a dumped rule (None for a non-IP family).
pub fn parse_rule(msg: RuleMessage) -> Option<FoundRule> {
    let family = family_of_af(msg.header.family)?;
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let (mut priority, mut fwmark, mut fwmask) = (0, 0, None);
    let mut exact =
        h.action == RuleAction::ToTable && h.src_len == 0 && h.dst_len == 0 && h.tos == 0;
    for a in &msg.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(m) => fwmark = *m,
            RuleAttribute::FwMask(m) => fwmask = Some(*m),
            RuleAttribute::Protocol(_) | RuleAttribute::Other(_) => {}
            // The kernel dumps these as -1 when unset.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => exact = false,
        }
    }
    let fwmask = fwmask.unwrap_or(if fwmark != 0 { u32::MAX } else { 0 });
    Some(FoundRule {
        key: RuleKey {
            family,
            priority,
            table,
            fwmark,
            fwmask,
        },
        exact,
        msg,
    })
}

/// Read a dumped route (None for a non-IP family).
pub fn parse_route(msg: &RouteMessage) -> Option<FoundRoute> {
    let family = family_of_af(msg.header.address_family)?;
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let mut dst: Option<IpAddr> = None;
    let (mut oif, mut priority) = (0, None);
    let mut exact = h.kind == RouteType::Unicast && h.source_prefix_length == 0;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::Priority(p) => priority = Some(*p),
            RouteAttribute::Gateway(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Source(_)
            | RouteAttribute::Encap(_)
            | RouteAttribute::NhId(_) => exact = false,
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match family {
        Family::V4 => IpAddr::from([0u8; 4]),
        Family::V6 => IpAddr::from([0u16; 8]),
    });
    let dst = IpNet::new(dst, h.destination_prefix_length).ok()?;
    Some(FoundRoute {
        key: RouteKey { dst, table, oif },
        exact,
        priority,
        tos: h.tos,
    })
}

/// Whether a dumped rule is ours: our priority, our table.
pub fn is_owned_rule(r: &FoundRule, config: &RouteConfig) -> bool {
    r.key.priority == config.priority && r.key.table == config.table
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

/// The netlink request for one change (pure).
pub fn request(change: &RouteChange) -> NetlinkMessage<RouteNetlinkMessage> {
    let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let delete = NLM_F_REQUEST | NLM_F_ACK;
    let (payload, flags) = match change {
        RouteChange::AddRule(k) => (RouteNetlinkMessage::NewRule(rule_message(k)), create),
        // Deleting by the dumped message removes exactly that rule.
        RouteChange::DelRule(r) => (RouteNetlinkMessage::DelRule(r.msg.clone()), delete),
        RouteChange::AddRoute(k) => (RouteNetlinkMessage::NewRoute(route_add_message(k)), create),
        RouteChange::DelRoute(r) => (RouteNetlinkMessage::DelRoute(route_del_message(r)), delete),
    };
    let mut m = NetlinkMessage::from(payload);
    m.header.flags = flags;
    m.finalize();
    m
}

/// `ip rule add pref P fwmark M/K lookup T`.
pub fn rule_message(k: &RuleKey) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = af(k.family);
    m.header.table = header_table(k.table);
    m.header.action = RuleAction::ToTable;
    m.attributes = vec![
        RuleAttribute::Priority(k.priority),
        RuleAttribute::FwMark(k.fwmark),
        RuleAttribute::FwMask(k.fwmask),
        RuleAttribute::Table(k.table),
    ];
    m
}

fn dst_attr(dst: &IpNet) -> RouteAttribute {
    RouteAttribute::Destination(match dst {
        IpNet::V4(n) => RouteAddress::Inet(n.network()),
        IpNet::V6(n) => RouteAddress::Inet6(n.network()),
    })
}

fn family_of_net(n: &IpNet) -> Family {
    Family::of(n)
}

/// `ip route add DST dev OIF table T proto static scope link`.
pub fn route_add_message(k: &RouteKey) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af(family_of_net(&k.dst));
    m.header.destination_prefix_length = k.dst.prefix_len();
    m.header.table = header_table(k.table);
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes = vec![
        dst_attr(&k.dst),
        RouteAttribute::Oif(k.oif),
        RouteAttribute::Table(k.table),
    ];
    m
}

/// `ip route del DST table T [dev OIF] [metric M]` (scope nowhere: any scope).
pub fn route_del_message(r: &FoundRoute) -> RouteMessage {
    let k = &r.key;
    let mut m = RouteMessage::default();
    m.header.address_family = af(family_of_net(&k.dst));
    m.header.destination_prefix_length = k.dst.prefix_len();
    m.header.table = header_table(k.table);
    m.header.tos = r.tos;
    m.header.scope = RouteScope::NoWhere;
    m.attributes = vec![dst_attr(&k.dst), RouteAttribute::Table(k.table)];
    if k.oif != 0 {
        m.attributes.push(RouteAttribute::Oif(k.oif));
    }
    if let Some(p) = r.priority {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    m
}

/// A change the kernel refused.
#[derive(Debug)]
pub struct ChangeFailure {
    pub change: String,
    pub reason: io::Error,
}

impl fmt::Display for ChangeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.change, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot start the netlink runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot open a netlink route socket")]
    Socket(#[source] io::Error),
    #[error("the routing netlink exchange did not finish")]
    Timeout(#[source] io::Error),
    #[error("dumping {what} failed")]
    Dump {
        what: &'static str,
        #[source]
        source: io::Error,
    },
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

/// The outcome of a reconcile or a cleanup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteReport {
    /// Rules and routes added or deleted. 0 = no-op.
    pub writes: usize,
    pub changes: Vec<String>,
    /// The underlay device used (index, name), for a reconcile.
    pub underlay: Option<(u32, String)>,
}

fn nl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        e => io::Error::other(e.to_string()),
    }
}

/// Open a route socket on the current tokio runtime (the socket lives in the calling
/// thread's network namespace).
pub fn connect() -> Result<Handle, RouteError> {
    super::rtnl::connect().map_err(RouteError::Socket)
}

fn block_on<T>(f: impl Future<Output = Result<T, RouteError>>) -> Result<T, RouteError> {
    super::rtnl::block_on(f).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => RouteError::Timeout(e),
        _ => RouteError::Runtime(e),
    })?
}

/// Collect a dump, failing when the kernel does not finish it within `limit`.
async fn dump_within<T>(
    limit: std::time::Duration,
    what: &'static str,
    f: impl Future<Output = Result<Vec<T>, rtnetlink::Error>>,
) -> Result<Vec<T>, RouteError> {
    let source = match super::rtnl::within(limit, &format!("a dump of {what}"), f).await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => nl_io(e),
        Err(timeout) => timeout,
    };
    Err(RouteError::Dump { what, source })
}

async fn dump<T>(
    what: &'static str,
    f: impl Future<Output = Result<Vec<T>, rtnetlink::Error>>,
) -> Result<Vec<T>, RouteError> {
    dump_within(super::rtnl::REQUEST_TIMEOUT, what, f).await
}

/// Reconcile (sync: own current-thread runtime and socket).
pub fn reconcile(spec: &RouteSpec) -> Result<RouteReport, RouteError> {
    block_on(async { reconcile_with(&connect()?, spec).await })
}

/// Remove our rules (both families) and every route in our table (sync).
pub fn cleanup(config: &RouteConfig) -> Result<RouteReport, RouteError> {
    block_on(async { cleanup_with(&connect()?, config).await })
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
            let addrs = dump("addresses", h.address().get().execute().try_collect()).await?;
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

async fn link_names(h: &Handle) -> Result<BTreeMap<u32, String>, RouteError> {
    let links = dump("links", h.link().get().execute().try_collect()).await?;
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
    let msgs: Vec<RuleMessage> = dump(
        "ip rules",
        h.rule().get(ip_version(family)).execute().try_collect(),
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
    q.header.address_family = af(family);
    let msgs: Vec<RouteMessage> = dump("routes", h.route().get(q).execute().try_collect()).await?;
    Ok(msgs
        .iter()
        .filter_map(parse_route)
        .filter(|r| r.key.table == table && Family::of(&r.key.dst) == family)
        .collect())
}

async fn send(mut h: Handle, msg: NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()> {
    let mut resp = h.request(msg).map_err(nl_io)?;
    let answered = async move {
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(e.to_io());
                }
            }
        }
        Ok(())
    };
    super::rtnl::within(super::rtnl::REQUEST_TIMEOUT, "a routing change", answered).await?
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
        let results =
            futures::future::join_all(batch.iter().map(|c| send(h.clone(), request(c)))).await;
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

/// Reconcile over an existing handle (async callers, on a runtime with timers enabled: every
/// request waits at most [`super::rtnl::REQUEST_TIMEOUT`] for the kernel).
pub async fn reconcile_with(h: &Handle, spec: &RouteSpec) -> Result<RouteReport, RouteError> {
    let (index, name) = resolve_underlay(h, &spec.underlay).await?;
    let want = desired(spec, index);
    let rules = dump_owned_rules(h, spec.family, &spec.config).await?;
    let routes = dump_table(h, spec.family, spec.config.table).await?;
    let changes = diff(&rules, &routes, Some(&want));
    let mut report = RouteReport {
        underlay: Some((index, name)),
        ..Default::default()
    };
    if changes.is_empty() {
        debug!("routing up to date");
        return Ok(report);
    }
    let names = link_names(h).await?;
    report.writes = execute(h, &changes, &names).await?;
    report.changes = changes.iter().map(|c| c.describe(&names)).collect();
    Ok(report)
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
    if changes.is_empty() {
        return Ok(report);
    }
    let names = link_names(h).await?;
    report.writes = execute(h, &changes, &names).await?;
    report.changes = changes.iter().map(|c| c.describe(&names)).collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec(remote: &[&str]) -> RouteSpec {
        RouteSpec {
            config: RouteConfig::default(),
            family: Family::V4,
            marks: Marks::default(),
            remote_subnets: remote.iter().map(|s| net(s)).collect(),
            underlay: Underlay::Address("192.168.77.1".parse().unwrap()),
        }
    }

    fn found(k: RouteKey) -> FoundRoute {
        FoundRoute {
            key: k,
            exact: true,
            priority: None,
            tos: 0,
        }
    }

    fn found_rule(k: RuleKey) -> FoundRule {
        FoundRule {
            key: k,
            exact: true,
            msg: rule_message(&k),
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
    fn messages() {
        let k = RuleKey {
            family: Family::V4,
            priority: 1042,
            table: 1042,
            fwmark: 0x100000,
            fwmask: 0x300000,
        };
        let m = rule_message(&k);
        assert_eq!(m.header.table, 0, "table > 255 goes in the attribute");
        assert_eq!(m.header.action, RuleAction::ToTable);
        let back = parse_rule(m.clone()).unwrap();
        assert!(back.exact);
        // As the kernel dumps it: header table RT_TABLE_COMPAT, "unset" suppressors.
        let mut dumped = m.clone();
        dumped.header.table = 252;
        dumped
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        assert_eq!(parse_rule(dumped.clone()).unwrap().key, k);
        assert!(parse_rule(dumped.clone()).unwrap().exact);
        dumped.attributes.push(RuleAttribute::SuppressPrefixLen(0));
        assert!(!parse_rule(dumped).unwrap().exact);
        assert_eq!(back.key, k);
        let small = rule_message(&RuleKey { table: 100, ..k });
        assert_eq!(small.header.table, 100);

        let mut with_iif = m.clone();
        with_iif
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        assert!(!parse_rule(with_iif).unwrap().exact);

        let rk = RouteKey {
            dst: net("fd42:0:2::/64"),
            table: 1042,
            oif: 7,
        };
        let r = route_add_message(&rk);
        assert_eq!(r.header.address_family, AddressFamily::Inet6);
        assert_eq!(r.header.destination_prefix_length, 64);
        assert_eq!(r.header.protocol, RouteProtocol::Static);
        let back = parse_route(&r).unwrap();
        assert_eq!(back.key, rk);
        assert!(back.exact);

        let del = route_del_message(&FoundRoute {
            key: rk,
            exact: true,
            priority: Some(1024),
            tos: 0,
        });
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert!(del.attributes.contains(&RouteAttribute::Priority(1024)));
        assert!(del.attributes.contains(&RouteAttribute::Oif(7)));

        let req = request(&RouteChange::AddRoute(rk));
        assert_eq!(
            req.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert!(matches!(
            req.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(_))
        ));
        let req = request(&RouteChange::DelRule(found_rule(k)));
        assert_eq!(req.header.flags, NLM_F_REQUEST | NLM_F_ACK);

        let mut gw = route_add_message(&rk);
        gw.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(
                "fe80::1".parse().unwrap(),
            )));
        assert!(!parse_route(&gw).unwrap().exact);
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

    #[test]
    fn a_dump_that_never_ends_fails_with_a_timeout() {
        let rt = crate::dataplane::rtnl::runtime().unwrap();
        let e = rt
            .block_on(dump_within::<()>(
                std::time::Duration::from_millis(50),
                "routes",
                std::future::pending(),
            ))
            .unwrap_err();
        assert!(
            matches!(&e, RouteError::Dump { what: "routes", source } if source.kind() == io::ErrorKind::TimedOut),
            "{e:?}"
        );
        let RouteError::Dump { source, .. } = &e else {
            unreachable!()
        };
        assert_eq!(
            source.to_string(),
            "no answer from the kernel within 0.05 s for a dump of routes (rtnetlink)"
        );
    }
}
